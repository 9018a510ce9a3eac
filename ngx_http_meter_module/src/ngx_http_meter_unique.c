
/*
 * Copyright (C) nginx-meter authors
 *
 * Unique users: "meter zone=Z NAME unique=$var [period=month|day|hour];"
 * counts the distinct values of the variable per key and unique period
 * (docs/redis-schema.md, "Unique users").  Only the first 64 bits of a
 * value's SHA-256 (the member) leave nginx.  The request path records a
 * member in the zone's dedupe table (meter_core.h): one seen before costs
 * no Redis work.  The flush sends the new ones: the index first, then one
 * script call per key, meter and period with its members.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_meter_module.h"


static ngx_str_t  ngx_http_meter_uperiods[] = {
    ngx_string("month"),
    ngx_string("day"),
    ngx_string("hour")
};


ngx_int_t
ngx_http_meter_unique_period(ngx_conf_t *cf, ngx_http_meter_t *m,
    ngx_str_t *arg)
{
    ngx_str_t   s;
    ngx_uint_t  i;

    if (m->uperiod) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate \"%V\" in \"meter\" directive", arg);
        return NGX_ERROR;
    }

    s.data = arg->data + 7;
    s.len = arg->len - 7;

    for (i = 0; i < 3; i++) {
        if (s.len == ngx_http_meter_uperiods[i].len
            && ngx_strncmp(s.data, ngx_http_meter_uperiods[i].data, s.len)
               == 0)
        {
            m->uperiod = i + 1;
            return NGX_OK;
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid \"%V\" in \"meter\" directive: the unique "
                       "period is \"month\", \"day\" or \"hour\"", arg);

    return NGX_ERROR;
}


/* unique= takes one variable or text with variables: not "", "$", "${" */

ngx_int_t
ngx_http_meter_unique_var(ngx_conf_t *cf, ngx_str_t *arg, ngx_str_t *var)
{
    u_char      *p, *last;
    ngx_uint_t   named;

    named = 0;
    p = var->data;
    last = var->data + var->len;

    while (p < last) {
        if (*p++ != '$' || p == last) {
            continue;
        }

        if (*p == '{') {
            p++;
        }

        if (p < last
            && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                || *p == '_'))
        {
            named = 1;
        }
    }

    if (!named) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid \"%V\" in \"meter\" directive: a "
                           "variable name is expected, such as "
                           "$http_x_user_id", arg);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the log phase: records the member of the value; empty: not counted */

ngx_int_t
ngx_http_meter_unique_count(ngx_http_request_t *r, ngx_http_meter_t *m,
    uint8_t *hash)
{
    time_t                       now;
    uint64_t                     last;
    uint32_t                     up;
    ngx_str_t                    v;
    ngx_http_variable_value_t   *vv;
    ngx_http_meter_shctx_t      *sh;
    ngx_http_meter_zone_ctx_t   *ctx;
    ngx_http_meter_main_conf_t  *mcf;

    if (m->vindex != NGX_ERROR) {
        /* one variable: its value as it is (read afresh, see m->vars) */
        vv = ngx_http_get_indexed_variable(r, m->vindex);

        if (vv == NULL || vv->not_found) {
            return NGX_OK;
        }

        v.data = vv->data;
        v.len = vv->len;

    } else if (ngx_http_complex_value(r, m->value, &v) != NGX_OK) {
        return NGX_ERROR;
    }

    if (v.len == 0) {
        return NGX_OK;
    }

    ctx = m->shm_zone->data;
    sh = ctx->sh;

    up = meter_uperiod(r->start_sec,
                       m->uperiod ? m->uperiod - 1 : METER_UPERIOD_MONTH);

    now = ngx_time();

    if (meter_uniq_add(sh->uniq, hash, (const char *) m->name.data,
                       m->name.len, up, v.data, v.len, (uint32_t) now)
        >= 0)
    {
        return NGX_OK;
    }

    /* every slot of the window unconfirmed: logged once a period */

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    last = __atomic_load_n(&sh->uniq_logged, __ATOMIC_RELAXED);

    if ((ngx_msec_t) ((uint64_t) now - last) * 1000
        >= ngx_max(mcf->flush_interval, 1000)
        && __atomic_compare_exchange_n(&sh->uniq_logged, &last,
                                       (uint64_t) now, 0, __ATOMIC_RELAXED,
                                       __ATOMIC_RELAXED))
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "meter_zone \"%V\": the unique users table is full "
                      "of values Redis has not confirmed, %uL not counted "
                      "so far",
                      &m->shm_zone->shm.name,
                      (uint64_t) __atomic_load_n(&sh->uniq->dropped,
                                                 __ATOMIC_RELAXED));
    }

    return NGX_OK;
}


/* same key, meter and period */

static ngx_uint_t
ngx_http_meter_ugroup_eq(meter_uentry_t *a, meter_uentry_t *b)
{
    return a->period == b->period
           && ngx_memcmp(a->key, b->key, METER_HASH_LEN) == 0
           && ngx_memcmp(a->meter, b->meter, METER_NAME_MAX) == 0;
}


/* "mtr:uq:{KH}:NAME:UPERIOD" (pre is MTR_UQ_PRE or MTR_UH_PRE) */

static size_t
ngx_http_meter_ukey(u_char *buf, const char *pre, size_t plen,
    meter_uentry_t *e)
{
    u_char  *p;
    size_t   mlen;

    mlen = ngx_strnlen((u_char *) e->meter, METER_NAME_MAX);

    p = ngx_cpymem(buf, pre, plen);
    meter_hex(e->key, METER_HASH_LEN, (char *) p);
    p += METER_HEX_LEN;
    p = ngx_cpymem(p, MTR_UQ_MID, sizeof(MTR_UQ_MID) - 1);
    p = ngx_cpymem(p, e->meter, mlen);
    *p++ = ':';
    p += meter_uperiod_format(e->period, (char *) p);

    return p - buf;
}


/*
 * The commands of one batch of unique users, RESP built into fl->out:
 * per month of the batch one SADD mtr:uqidx:YYYYMM of KH|NAME|UPERIOD
 * (tag INDEX: an error confirms nothing after it), then per key, meter
 * and period one EVALSHA of the script with its members (tag UGROUP + g).
 * The items' groups are numbered here, for the replies.
 */

ngx_int_t
ngx_http_meter_unique_cmds(ngx_http_meter_flush_t *fl,
    ngx_http_meter_shctx_t *sh, meter_ubatch_t *b,
    ngx_http_meter_emit_pt emit, void *data)
{
    u_char           *p, *cmd;
    u_char            key[sizeof(MTR_UQ_PRE) + METER_HEX_LEN + 2
                          + METER_NAME_MAX + 1 + METER_UPERIOD_LEN + 1];
    u_char            hkey[sizeof(key)];
    u_char            idx[sizeof(MTR_UQIDX_PRE) + 6 + 1];
    u_char            memb[METER_HEX_LEN + 1 + METER_NAME_MAX + 1
                           + METER_UPERIOD_LEN];
    u_char            mem[METER_MEMBER_LEN];
    char              limit[24];
    size_t            n, klen, hlen, ilen, mlen, llen;
    uint32_t          month, first[NGX_HTTP_METER_UBATCH];
    ngx_uint_t        i, j, g, ng, cnt;
    meter_uentry_t   *e, *f;
    meter_uniq_t     *u;

    u = sh->uniq;
    p = fl->out;
    ng = 0;

    /* groups in order of first appearance; first[g] is an item of g */
    for (i = 0; i < b->n; i++) {
        e = meter_uniq_entry(u, b->items[i].slot);

        for (g = ng; g > 0; g--) {
            f = meter_uniq_entry(u, b->items[first[g - 1]].slot);

            if (ngx_http_meter_ugroup_eq(e, f)) {
                break;
            }
        }

        if (g == 0) {
            first[ng] = (uint32_t) i;
            b->items[i].group = (uint32_t) ng++;

        } else {
            b->items[i].group = (uint32_t) (g - 1);
        }
    }

    fl->ngroups_u = ng;

    /* the index of every group first, per month */
    for (g = 0; g < ng; g++) {
        e = meter_uniq_entry(u, b->items[first[g]].slot);
        month = meter_uperiod_month(e->period);

        for (j = 0; j < g; j++) {
            f = meter_uniq_entry(u, b->items[first[j]].slot);

            if (meter_uperiod_month(f->period) == month) {
                break;
            }
        }

        if (j < g) {
            continue;               /* this month's SADD is sent already */
        }

        cnt = 0;

        for (j = g; j < ng; j++) {
            f = meter_uniq_entry(u, b->items[first[j]].slot);
            cnt += (meter_uperiod_month(f->period) == month);
        }

        ilen = ngx_cpymem(idx, MTR_UQIDX_PRE, sizeof(MTR_UQIDX_PRE) - 1)
               - idx;
        ilen += meter_uperiod_format(month, (char *) idx + ilen);

        cmd = p;
        p = (u_char *) meter_resp_array((char *) p, (unsigned) (2 + cnt));
        p = (u_char *) meter_resp_bulk((char *) p, "SADD", 4);
        p = (u_char *) meter_resp_bulk((char *) p, (char *) idx, ilen);

        for (j = g; j < ng; j++) {
            f = meter_uniq_entry(u, b->items[first[j]].slot);

            if (meter_uperiod_month(f->period) != month) {
                continue;
            }

            meter_hex(f->key, METER_HASH_LEN, (char *) memb);
            n = METER_HEX_LEN;
            memb[n++] = MTR_FIELD_SEP;
            mlen = ngx_strnlen((u_char *) f->meter, METER_NAME_MAX);
            n = ngx_cpymem(memb + n, f->meter, mlen) - memb;
            memb[n++] = MTR_FIELD_SEP;
            n += meter_uperiod_format(f->period, (char *) memb + n);

            p = (u_char *) meter_resp_bulk((char *) p, (char *) memb, n);
        }

        if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_INDEX) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    llen = ngx_sprintf((u_char *) limit, "%d", MTR_UNIQUE_EXACT)
           - (u_char *) limit;

    for (g = 0; g < ng; g++) {
        e = meter_uniq_entry(u, b->items[first[g]].slot);

        cnt = 0;

        for (i = first[g]; i < b->n; i++) {
            cnt += (b->items[i].group == g);
        }

        klen = ngx_http_meter_ukey(key, MTR_UQ_PRE, sizeof(MTR_UQ_PRE) - 1,
                                   e);
        hlen = ngx_http_meter_ukey(hkey, MTR_UH_PRE, sizeof(MTR_UH_PRE) - 1,
                                   e);

        cmd = p;
        p = (u_char *) meter_resp_array((char *) p, (unsigned) (6 + cnt));
        p = (u_char *) meter_resp_bulk((char *) p, "EVALSHA", 7);
        p = (u_char *) meter_resp_bulk((char *) p, fl->uscript_sha, 40);
        p = (u_char *) meter_resp_bulk((char *) p, "2", 1);
        p = (u_char *) meter_resp_bulk((char *) p, (char *) key, klen);
        p = (u_char *) meter_resp_bulk((char *) p, (char *) hkey, hlen);
        p = (u_char *) meter_resp_bulk((char *) p, limit, llen);

        for (i = first[g]; i < b->n; i++) {
            if (b->items[i].group != g) {
                continue;
            }

            f = meter_uniq_entry(u, b->items[i].slot);
            meter_member_format(f->member, (char *) mem);
            p = (u_char *) meter_resp_bulk((char *) p, (char *) mem,
                                           METER_MEMBER_LEN);
        }

        if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_UGROUP + g)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}
