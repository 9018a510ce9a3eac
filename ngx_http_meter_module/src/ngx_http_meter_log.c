
/*
 * Copyright (C) nginx-meter authors
 *
 * The log phase: counts a call into the shared-memory table of each
 * zone its meters name, and the rewrite phase that remembers which meters
 * a call passed.  The request path touches shared memory only
 * (meter_core.c: a lock-free table); Redis is the flush's business.
 */


#include "ngx_http_meter_module.h"


static void ngx_http_meter_fresh_vars(ngx_http_request_t *r,
    ngx_array_t *vars);
static ngx_int_t ngx_http_meter_count(ngx_http_request_t *r,
    ngx_http_meter_t *m, ngx_http_meter_req_ctx_t *rctx, ngx_uint_t status,
    uint32_t method);


/*
 * A key $http_NAME that nginx reads with its prefix variable "http_" (no
 * "set", no variable of that name of nginx's own such as $http_cookie,
 * no longer prefix of a module) is read from the headers by the request
 * path itself: one walk gives the gate the count and the key.  nginx
 * 1.23 joins repeated headers in the variable: there the variable stays.
 */

void
ngx_http_meter_key_init(ngx_cycle_t *cycle, ngx_http_meter_main_conf_t *mcf)
{
#if (nginx_version < 1023000)
    ngx_uint_t                  i, n;
    ngx_shm_zone_t            **zones;
    ngx_http_variable_t        *v, *pv;
    ngx_http_meter_zone_ctx_t  *ctx;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_core_module);
    v = cmcf->variables.elts;
    pv = cmcf->prefix_variables.elts;
    zones = mcf->zones.elts;

    for (n = 0; n < cmcf->prefix_variables.nelts; n++) {
        if (pv[n].name.len == 5
            && ngx_strncmp(pv[n].name.data, "http_", 5) == 0)
        {
            break;
        }
    }

    if (n == cmcf->prefix_variables.nelts) {
        return;
    }

    for (i = 0; i < mcf->zones.nelts; i++) {
        ctx = zones[i]->data;

        ctx->key_direct = ctx->key_header.len
                          && ctx->key_index != NGX_ERROR
                          && v[ctx->key_index].get_handler
                             == pv[n].get_handler
                          && v[ctx->key_index].data
                             == (uintptr_t) &v[ctx->key_index].name;
    }
#endif
}


/*
 * The rewrite phase of every location a call passes, before the rewrite
 * module's script ("rewrite ... last" leaves in it): remembers the
 * location's meters for the log phase, in case the call ends where
 * nothing meters.
 */

ngx_int_t
ngx_http_meter_rewrite_handler(ngx_http_request_t *r)
{
    ngx_http_meter_loc_conf_t   *mlcf;
    ngx_http_meter_main_conf_t  *mcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);

    if (mlcf->meters == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    /* a slot, not an allocation: most calls never need a context */
    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);
    r->variables[mcf->meters_var].data = (u_char *) mlcf->meters;

    return NGX_DECLINED;
}


/*
 * One billing decision per client call.  The log phase runs once for a
 * call, after its internal redirects, in the location that answered it;
 * when that location has no meter at all, the meters of the location the
 * call came from apply (an error_page target is rarely metered).  A
 * subrequest (auth_request, mirror, SSI, addition) is not a call: nginx
 * runs its log phase only with log_subrequest on, and even then only
 * meters with subrequests=on count it.
 */

ngx_int_t
ngx_http_meter_log_handler(ngx_http_request_t *r)
{
    uint32_t                     method;
    ngx_str_t                    key;
    ngx_uint_t                   i, status, sub;
    ngx_array_t                 *meters;
    ngx_shm_zone_t              *keyed;
    ngx_http_meter_t            *m;
    ngx_http_meter_req_ctx_t    *rctx, *cur, own;
    ngx_http_meter_zone_ctx_t   *ctx;
    ngx_http_meter_loc_conf_t   *mlcf;
    ngx_http_meter_main_conf_t  *mcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);
    meters = mlcf->meters;

    sub = (r != r->main);

    /* the slots are the main request's: a subrequest shares them */
    if (sub) {
        rctx = NULL;

        if (meters == NULL) {
            return NGX_OK;
        }

    } else {
        mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);
        rctx = ngx_http_meter_req_ctx_find(r, mcf);

        if (rctx != NULL && rctx->unbilled) {
            return NGX_OK;
        }

        if (meters == NULL) {
            meters = (ngx_array_t *) r->variables[mcf->meters_var].data;

            if (meters == NULL) {
                return NGX_OK;
            }
        }
    }

    /* "meter off" */
    if (meters->nelts == 0) {
        return NGX_OK;
    }

    /* the status the access log shows */
    if (r->err_status) {
        status = r->err_status;

    } else if (r->headers_out.status) {
        status = r->headers_out.status;

    } else if (r->http_version == NGX_HTTP_VERSION_9) {
        status = 9;

    } else {
        status = 0;
    }

    /* meter_core's method bits are nginx's own (checked at start) */
    method = (uint32_t) r->method;

    /*
     * The key is read and hashed once per zone, not once per meter, and
     * not again for the zone whose key the gate hashed: the call is billed
     * to the key it was admitted with.  Without a gate's context, the
     * hash is kept on the stack.
     */
    keyed = NULL;
    cur = NULL;

    m = meters->elts;

    for (i = 0; i < meters->nelts; i++) {

        if (sub && !m[i].subrequests) {
            continue;
        }

        if (m[i].shm_zone != keyed) {
            keyed = m[i].shm_zone;
            cur = NULL;

            if (rctx != NULL && rctx->zone == keyed) {
                cur = rctx;

            } else {
                ctx = keyed->data;

                if (ngx_http_meter_key(r, ctx, &key) != NGX_OK) {
                    return NGX_OK;
                }

                if (key.len) {
                    meter_key_hash(key.data, key.len, own.hash);
                    own.zone = keyed;
                    own.cust = NULL;
                    cur = &own;
                }
            }
        }

        if (cur == NULL) {
            continue;
        }

        if (ngx_http_meter_count(r, &m[i], cur, status, method) != NGX_OK) {
            return NGX_OK;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_count(ngx_http_request_t *r, ngx_http_meter_t *m,
    ngx_http_meter_req_ctx_t *rctx, ngx_uint_t status, uint32_t method)
{
    time_t                      now;
    uint32_t                    j;
    uint64_t                    value, last;
    ngx_str_t                   v;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_gov_key_t   *k;
    ngx_http_meter_gov_cust_t  *cust;
    ngx_http_meter_gov_snap_t  *snap;
    ngx_http_meter_zone_ctx_t  *ctx;
    ngx_http_meter_gov_zone_t  *gz;
    ngx_http_meter_main_conf_t *mcf;

    /* inline the common case: no status filter */
    if (m->status.n && !meter_status_match(&m->status, status)) {
        return NGX_OK;
    }

    if (m->methods && (m->methods & method) == 0) {
        return NGX_OK;
    }

    ctx = m->shm_zone->data;
    sh = ctx->sh;

    if (m->vars) {
        ngx_http_meter_fresh_vars(r, m->vars);
    }

    if (m->filter) {
        if (ngx_http_complex_value(r, m->filter, &v) != NGX_OK) {
            return NGX_ERROR;
        }

        if (v.len == 0 || (v.len == 1 && v.data[0] == '0')) {
            return NGX_OK;
        }
    }

    if (m->unique) {
        /* no credit drawn, no counter: the dedupe table */
        return ngx_http_meter_unique_count(r, m, rctx->hash);
    }

    value = 1;

    if (m->value) {
        if (ngx_http_complex_value(r, m->value, &v) != NGX_OK) {
            return NGX_ERROR;
        }

        /* a gauge without a reading (no header) has nothing to count */
        if (m->gauge && v.len == 0) {
            return NGX_OK;
        }

        if (meter_parse_value((const char *) v.data, v.len, &value) != 0) {

            /* a last= reading too large for a count is clamped anyway */
            if (m->gauge == NGX_HTTP_METER_GAUGE_LAST
                && ngx_http_meter_gauge_digits(&v))
            {
                value = MTR_GAUGE_LAST_MASK;

            } else {
                (void) __atomic_fetch_add(&sh->value_errors, 1,
                                          __ATOMIC_RELAXED);
                if (m->gauge) {
                    ngx_http_meter_gauge_bad(r, m, &v);
                }

                return NGX_OK;
            }
        }
    }

    now = ngx_time();

    /*
     * Prepaid credit: what this node counts draws the balance down now.
     * A request that outlived a refresh must not write into a copy that
     * may be recycled: find its customer again in the current one.
     */
    cust = NULL;

    if (rctx->cust != NULL) {
        mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);
        gz = mcf->gov_zone->data;
        snap = __atomic_load_n(&gz->sh->snap, __ATOMIC_ACQUIRE);

        if (snap == rctx->snap) {
            cust = rctx->cust;

        } else if (snap != NULL) {
            k = ngx_http_meter_gov_find(snap, rctx->hash);
            cust = (k != NULL) ? &snap->custs[k->cust - 1] : NULL;
        }
    }

    if (cust != NULL) {
        for (j = 0; j < cust->ncredits; j++) {
            if (ngx_strncmp(cust->credits[j].meter, m->name.data,
                            m->name.len) == 0
                && (m->name.len == METER_NAME_MAX
                    || cust->credits[j].meter[m->name.len] == '\0'))
            {
                (void) __atomic_fetch_add(&cust->credits[j].local,
                                          (int64_t) value, __ATOMIC_RELAXED);
            }
        }
    }

    if (m->gauge == NGX_HTTP_METER_GAUGE_LAST) {
        value = ngx_http_meter_gauge_last(r, value);
    }

    /* meter_hour() of a start time, never negative, inlined */
    if ((m->gauge ? meter_table_max : meter_table_add)
            (&sh->table, (uint32_t) (r->start_sec / 3600), rctx->hash,
             (const char *) m->name.data, m->name.len, value,
             (uint32_t) now)
        == 0)
    {
        return NGX_OK;
    }

    /* zone full: counted in "dropped" by the table, logged once a period */

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    last = __atomic_load_n(&sh->dropped_logged, __ATOMIC_RELAXED);

    if ((ngx_msec_t) ((uint64_t) now - last) * 1000
        >= ngx_max(mcf->flush_interval, 1000)
        && __atomic_compare_exchange_n(&sh->dropped_logged, &last,
                                       (uint64_t) now,
                                       0, __ATOMIC_RELAXED,
                                       __ATOMIC_RELAXED))
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "meter_zone \"%V\" is full, %uL calls not counted "
                      "so far; increase its size",
                      &m->shm_zone->shm.name,
                      (uint64_t) __atomic_load_n(&sh->table.dropped,
                                                 __ATOMIC_RELAXED));
    }

    return NGX_OK;
}


/*
 * A variable read before the log phase (add_header $bytes_sent, a
 * subrequest, an earlier meter) keeps the value it had then: nginx caches
 * it in r->variables.  Bill what the log module would log: read them
 * afresh.  Variables that "set" and other directives write are left alone,
 * their value is what was written.
 */

static void
ngx_http_meter_fresh_vars(ngx_http_request_t *r, ngx_array_t *vars)
{
    ngx_uint_t                  i, *index;
    ngx_http_variable_t        *v;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_core_module);
    v = cmcf->variables.elts;
    index = vars->elts;

    for (i = 0; i < vars->nelts; i++) {
        if (v[index[i]].flags & NGX_HTTP_VAR_CHANGEABLE) {
            continue;
        }

        r->variables[index[i]].valid = 0;
        r->variables[index[i]].not_found = 0;
    }
}
