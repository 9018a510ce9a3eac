
/*
 * Copyright (C) nginx-meter authors
 *
 * Governance, the refresh: one worker per node (under the governance
 * zone's lease) reads mtr:gov, mtr:gov:version, mtr:gov:credit and the
 * usage of keys with credit through the flush's Redis connection, and
 * publishes a compact copy in the governance zone for the access phase
 * (ngx_http_meter_gov.c).  A failed refresh leaves the last copy in force.
 */


#include "ngx_http_meter_module.h"


typedef struct {
    ngx_str_t                    id;
    uint8_t                      key[METER_HASH_LEN];
    uint32_t                     reason;
    uint32_t                     revoked;
    int64_t                      since;
} ngx_http_meter_gov_rec_t;


static void ngx_http_meter_gov_ready(void *data);
static void ngx_http_meter_gov_down(void *data);
static void ngx_http_meter_gov_tick(ngx_event_t *ev);
static ngx_int_t ngx_http_meter_gov_reply_ok(ngx_http_meter_gov_refresh_t *gr,
    redisReply *reply, int type);
static void ngx_http_meter_gov_version_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_credit_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_stage2(ngx_http_meter_gov_refresh_t *gr);
static int ngx_libc_cdecl ngx_http_meter_gov_cmp(const void *a,
    const void *b);
static void ngx_http_meter_gov_map_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static ngx_int_t ngx_http_meter_hex_decode(uint8_t *dst, u_char *hex);
static void ngx_http_meter_gov_stage3(ngx_http_meter_gov_refresh_t *gr);
static void ngx_http_meter_gov_used_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_done(ngx_http_meter_gov_refresh_t *gr);
static void ngx_http_meter_gov_seed(ngx_http_meter_shctx_t *sh,
    ngx_http_meter_gov_snap_t *snap);
static void ngx_http_meter_gov_publish(ngx_http_meter_gov_refresh_t *gr);


void
ngx_http_meter_gov_refresh_init(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_redis_t *rd)
{
    gr->mcf = rd->mcf;
    gr->log = rd->log;
    gr->redis = rd;

    ngx_http_meter_init_event(&gr->gov_tick, ngx_http_meter_gov_tick, gr,
                              gr->log);

    ngx_http_meter_redis_hook(rd, ngx_http_meter_gov_ready, NULL,
                              ngx_http_meter_gov_down, gr);
}


void
ngx_http_meter_gov_refresh_exit(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_http_meter_gov_zone_t  *gz;

    if (gr->mcf->gov_zone != NULL) {
        gz = gr->mcf->gov_zone->data;
        ngx_http_meter_lease_release(&gz->sh->lease);
    }

    if (gr->gov_pool) {
        ngx_destroy_pool(gr->gov_pool);
        gr->gov_pool = NULL;
    }

    if (gr->gov_tmp) {
        ngx_destroy_pool(gr->gov_tmp);
        gr->gov_tmp = NULL;
    }
}


/* a new connection may see a new state: refresh now */

static void
ngx_http_meter_gov_ready(void *data)
{
    ngx_http_meter_gov_refresh_t  *gr = data;

    if (gr->gov_tick.timer_set) {
        ngx_del_timer(&gr->gov_tick);
        ngx_add_timer(&gr->gov_tick, 1);
    }
}


/* the replies outstanding have all run, with no reply */

static void
ngx_http_meter_gov_down(void *data)
{
    ngx_http_meter_gov_refresh_t  *gr = data;

    gr->gov_busy = 0;
}


static void
ngx_http_meter_gov_tick(ngx_event_t *ev)
{
    size_t                         len[2];
    const char                    *argv[2];
    ngx_http_meter_gov_refresh_t  *gr = ev->data;
    ngx_http_meter_gov_zone_t     *gz;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    ngx_add_timer(&gr->gov_tick, gr->mcf->gov_refresh);

    if (gr->redis->state == NGX_HTTP_METER_REDIS_READY && gr->gov_busy
        && ngx_current_msec - gr->gov_started > gr->mcf->redis_timeout)
    {
        /* a Redis that stopped answering: drop the connection */
        ngx_http_meter_redis_fail(gr->redis, "governance refresh",
                                  "timed out");
        return;
    }

    if (gr->redis->state != NGX_HTTP_METER_REDIS_READY || gr->gov_busy) {
        return;
    }

    /* one refresher per node */
    gz = gr->mcf->gov_zone->data;

    if (ngx_http_meter_lease(&gz->sh->lease, gr->mcf->gov_refresh)
        == NGX_DECLINED)
    {
        return;
    }

    if (gr->gov_tmp) {
        ngx_destroy_pool(gr->gov_tmp);
    }

    gr->gov_tmp = ngx_create_pool(4096, gr->log);
    if (gr->gov_tmp == NULL) {
        return;
    }

    if (ngx_array_init(&gr->gov_grants, gr->gov_tmp, 8,
                       sizeof(ngx_http_meter_gov_grant_t))
        != NGX_OK)
    {
        return;
    }

    gr->gov_failed = 0;
    gr->gov_busy = 2;
    gr->gov_started = ngx_current_msec;

    argv[0] = "GET"; len[0] = 3;
    argv[1] = MTR_GOV_VERSION; len[1] = sizeof(MTR_GOV_VERSION) - 1;
    (void) redisAsyncCommandArgv(gr->redis->ac,
                                 ngx_http_meter_gov_version_reply, gr, 2,
                                 argv, len);

    argv[0] = "HGETALL"; len[0] = 7;
    argv[1] = MTR_GOV_CREDIT; len[1] = sizeof(MTR_GOV_CREDIT) - 1;
    (void) redisAsyncCommandArgv(gr->redis->ac,
                                 ngx_http_meter_gov_credit_reply, gr, 2,
                                 argv, len);
}


/* a reply ends a stage when it is the stage's last one */

static ngx_int_t
ngx_http_meter_gov_reply_ok(ngx_http_meter_gov_refresh_t *gr,
    redisReply *reply, int type)
{
    if (reply == NULL) {
        gr->gov_failed = 1;
        return NGX_ERROR;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        if (!gr->gov_failed) {
            ngx_log_error(NGX_LOG_ERR, gr->log, 0,
                          "meter: governance refresh refused: %*s",
                          (int) ngx_min(reply->len, 256), reply->str);
        }

        gr->gov_failed = 1;
        return NGX_ERROR;
    }

    if (type != REDIS_REPLY_NIL && reply->type != type
        && reply->type != REDIS_REPLY_NIL)
    {
        gr->gov_failed = 1;
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_meter_gov_version_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    ngx_int_t                      n;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_STRING) == NGX_OK)
    {
        n = 0;

        if (reply->type == REDIS_REPLY_STRING) {
            n = ngx_atoi((u_char *) reply->str, reply->len);
        }

        gr->gov_new_version = (n == NGX_ERROR) ? 0 : (uint64_t) n;
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_stage2(gr);
    }
}


static void
ngx_http_meter_gov_credit_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    u_char                        *bar, *f;
    size_t                         i, flen;
    ngx_int_t                      n;
    ngx_http_meter_gov_refresh_t  *gr = privdata;
    ngx_http_meter_gov_grant_t    *g;

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_ARRAY) == NGX_OK
        && reply->type == REDIS_REPLY_ARRAY)
    {
        for (i = 0; i + 1 < reply->elements; i += 2) {
            f = (u_char *) reply->element[i]->str;
            flen = reply->element[i]->len;

            bar = ngx_strlchr(f, f + flen, MTR_GOV_CREDIT_SEP);
            n = ngx_atoi((u_char *) reply->element[i + 1]->str,
                         reply->element[i + 1]->len);

            if (bar == NULL || bar == f || n == NGX_ERROR
                || !meter_valid_name((char *) bar + 1, f + flen - bar - 1))
            {
                continue;
            }

            g = ngx_array_push(&gr->gov_grants);
            if (g == NULL) {
                gr->gov_failed = 1;
                break;
            }

            g->cust.len = bar - f;
            g->cust.data = ngx_pnalloc(gr->gov_tmp, g->cust.len);
            g->meter.len = f + flen - bar - 1;
            g->meter.data = ngx_pnalloc(gr->gov_tmp, g->meter.len + 1);

            if (g->cust.data == NULL || g->meter.data == NULL) {
                gr->gov_failed = 1;
                break;
            }

            ngx_memcpy(g->cust.data, f, g->cust.len);
            (void) ngx_cpystrn(g->meter.data, bar + 1, g->meter.len + 1);
            g->granted = n;
        }
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_stage2(gr);
    }
}


/* stage 2: the key map, only when its version moved */

static void
ngx_http_meter_gov_stage2(ngx_http_meter_gov_refresh_t *gr)
{
    size_t       len[2];
    const char  *argv[2];

    if (gr->gov_failed || gr->redis->ac == NULL) {
        gr->gov_failed = 1;
        ngx_http_meter_gov_done(gr);
        return;
    }

    if (gr->gov_valid && gr->gov_version == gr->gov_new_version) {
        ngx_http_meter_gov_stage3(gr);
        return;
    }

    gr->gov_busy = 1;

    argv[0] = "HGETALL"; len[0] = 7;
    argv[1] = MTR_GOV; len[1] = sizeof(MTR_GOV) - 1;

    if (redisAsyncCommandArgv(gr->redis->ac, ngx_http_meter_gov_map_reply,
                              gr, 2, argv, len)
        != REDIS_OK)
    {
        gr->gov_busy = 0;
        gr->gov_failed = 1;
        ngx_http_meter_gov_done(gr);
    }
}


static int ngx_libc_cdecl
ngx_http_meter_gov_cmp(const void *a, const void *b)
{
    const ngx_http_meter_gov_rec_t  *x = a;
    const ngx_http_meter_gov_rec_t  *y = b;
    ngx_int_t                        rc;

    rc = ngx_memn2cmp(x->id.data, y->id.data, x->id.len, y->id.len);

    return (rc > 0) - (rc < 0);
}


static void
ngx_http_meter_gov_map_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    u_char                        *v, *end, *tab[4];
    size_t                         i, n, t, nrec;
    ngx_int_t                      since, revoked;
    ngx_pool_t                    *pool;
    redisReply                    *f, *val;
    ngx_http_meter_gov_refresh_t  *gr = privdata;
    ngx_http_meter_gov_rec_t      *recs, *rec;
    ngx_http_meter_gov_ckey_t     *k;
    ngx_http_meter_gov_ccust_t    *c;

    gr->gov_busy = 0;
    pool = NULL;

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_ARRAY) != NGX_OK) {
        goto failed;
    }

    pool = ngx_create_pool(16384, gr->log);
    if (pool == NULL) {
        goto failed;
    }

    n = (reply->type == REDIS_REPLY_ARRAY) ? reply->elements / 2 : 0;

    recs = ngx_palloc(pool, sizeof(ngx_http_meter_gov_rec_t) * (n + 1));
    if (recs == NULL) {
        goto failed;
    }

    /* KH -> "CUSTOMER\tSTATUS\tREASON\tSINCE\tREVOKED" */
    nrec = 0;

    for (i = 0; i < n; i++) {
        f = reply->element[2 * i];
        val = reply->element[2 * i + 1];

        if (f->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING
            || f->len != METER_HEX_LEN)
        {
            continue;
        }

        v = (u_char *) val->str;
        end = v + val->len;

        for (t = 0; t < 4; t++) {
            tab[t] = ngx_strlchr(t ? tab[t - 1] + 1 : v, end, MTR_GOV_SEP);
            if (tab[t] == NULL) {
                break;
            }
        }

        if (t < 4 || tab[0] == v) {
            continue;
        }

        rec = &recs[nrec];

        if (ngx_http_meter_hex_decode(rec->key, (u_char *) f->str)
            != NGX_OK)
        {
            continue;
        }

        since = ngx_atoi(tab[2] + 1, tab[3] - tab[2] - 1);
        revoked = ngx_atoi(tab[3] + 1, end - tab[3] - 1);

        rec->id.len = tab[0] - v;
        rec->id.data = ngx_pnalloc(pool, rec->id.len);
        if (rec->id.data == NULL) {
            goto failed;
        }

        ngx_memcpy(rec->id.data, v, rec->id.len);

        rec->reason = 0;

        if (tab[1] - tab[0] - 1 == 1 && tab[0][1] == MTR_GOV_DELINQUENT) {
            rec->reason = (tab[2] - tab[1] - 1
                           == sizeof(MTR_REASON_CREDIT) - 1
                           && ngx_strncmp(tab[1] + 1, MTR_REASON_CREDIT,
                                          sizeof(MTR_REASON_CREDIT) - 1)
                              == 0)
                          ? NGX_HTTP_METER_REASON_CREDIT
                          : NGX_HTTP_METER_REASON_OVERDUE;
        }

        rec->since = (since == NGX_ERROR) ? 0 : since;
        rec->revoked = (revoked != NGX_ERROR && revoked > 0);

        nrec++;
    }

    /* keys of one customer side by side: one customer entry each */
    ngx_qsort(recs, nrec, sizeof(ngx_http_meter_gov_rec_t),
              ngx_http_meter_gov_cmp);

    if (ngx_array_init(&gr->gov_keys, pool, nrec ? nrec : 1,
                       sizeof(ngx_http_meter_gov_ckey_t))
        != NGX_OK
        || ngx_array_init(&gr->gov_custs, pool, 16,
                          sizeof(ngx_http_meter_gov_ccust_t))
           != NGX_OK)
    {
        goto failed;
    }

    c = NULL;

    for (i = 0; i < nrec; i++) {
        if (i == 0 || ngx_http_meter_gov_cmp(&recs[i - 1], &recs[i]) != 0) {
            c = ngx_array_push(&gr->gov_custs);
            if (c == NULL) {
                goto failed;
            }

            ngx_memzero(c, sizeof(ngx_http_meter_gov_ccust_t));

            c->id = recs[i].id;
            c->reason = recs[i].reason;
            c->since = recs[i].since;
        }

        k = ngx_array_push(&gr->gov_keys);
        if (k == NULL) {
            goto failed;
        }

        ngx_memcpy(k->key, recs[i].key, METER_HASH_LEN);
        k->cust = gr->gov_custs.nelts - 1;
        k->revoked = recs[i].revoked;
    }

    if (gr->gov_pool) {
        ngx_destroy_pool(gr->gov_pool);
    }

    gr->gov_pool = pool;
    gr->gov_version = gr->gov_new_version;
    gr->gov_valid = 1;

    ngx_http_meter_gov_stage3(gr);
    return;

failed:

    gr->gov_failed = 1;
    gr->gov_valid = 0;

    if (pool) {
        ngx_destroy_pool(pool);
    }

    ngx_http_meter_gov_done(gr);
}


static ngx_int_t
ngx_http_meter_hex_decode(uint8_t *dst, u_char *hex)
{
    u_char      ch;
    ngx_uint_t  i, nib, v;

    for (i = 0; i < METER_HEX_LEN; i++) {
        ch = hex[i];

        if (ch >= '0' && ch <= '9') {
            nib = ch - '0';

        } else if (ch >= 'a' && ch <= 'f') {
            nib = ch - 'a' + 10;

        } else {
            return NGX_ERROR;
        }

        v = (i & 1) ? (dst[i / 2] | nib) : (nib << 4);
        dst[i / 2] = (uint8_t) v;
    }

    return NGX_OK;
}


/*
 * Stage 3: credit.  Grants go onto their customers; then, for the keys of
 * customers with credit, their lifetime usage, because usage moves even
 * when the version does not.
 */

static void
ngx_http_meter_gov_stage3(ngx_http_meter_gov_refresh_t *gr)
{
    char                         data[METER_USED_KEY_SIZE];
    size_t                       i, j, lo, hi, mid;
    size_t                       len[2 + NGX_HTTP_METER_GOV_CREDITS];
    ngx_int_t                    rc;
    ngx_str_t                    id;
    const char                  *argv[2 + NGX_HTTP_METER_GOV_CREDITS];
    ngx_http_meter_gov_ckey_t   *keys;
    ngx_http_meter_gov_ccust_t  *custs, *c;
    ngx_http_meter_gov_grant_t  *g;

    custs = gr->gov_custs.elts;
    keys = gr->gov_keys.elts;
    g = gr->gov_grants.elts;

    for (i = 0; i < gr->gov_custs.nelts; i++) {
        custs[i].ncredits = 0;
    }

    for (i = 0; i < gr->gov_grants.nelts; i++) {
        id = g[i].cust;

        /* customers are sorted by id */
        lo = 0;
        hi = gr->gov_custs.nelts;
        c = NULL;

        while (lo < hi) {
            mid = (lo + hi) / 2;
            rc = ngx_memn2cmp(custs[mid].id.data, id.data, custs[mid].id.len,
                              id.len);
            if (rc == 0) {
                c = &custs[mid];
                break;
            }

            if (rc < 0) {
                lo = mid + 1;

            } else {
                hi = mid;
            }
        }

        if (c == NULL || c->ncredits == NGX_HTTP_METER_GOV_CREDITS) {
            continue;
        }

        c->credits[c->ncredits].meter = g[i].meter;
        c->credits[c->ncredits].granted = g[i].granted;
        c->credits[c->ncredits].used = 0;
        c->ncredits++;
    }

    gr->gov_busy = 0;

    for (i = 0; i < gr->gov_keys.nelts && gr->redis->ac != NULL; i++) {
        c = &custs[keys[i].cust];

        if (c->ncredits == 0) {
            continue;
        }

        argv[0] = "HMGET"; len[0] = 5;
        argv[1] = data;
        len[1] = meter_fmt_used_key(data, keys[i].key);

        for (j = 0; j < c->ncredits; j++) {
            argv[2 + j] = (char *) c->credits[j].meter.data;
            len[2 + j] = c->credits[j].meter.len;
        }

        if (redisAsyncCommandArgv(gr->redis->ac,
                                  ngx_http_meter_gov_used_reply,
                                  (void *) (uintptr_t) i, 2 + c->ncredits,
                                  argv, len)
            != REDIS_OK)
        {
            gr->gov_failed = 1;
            break;
        }

        gr->gov_busy++;
    }

    if (gr->gov_busy == 0) {
        ngx_http_meter_gov_done(gr);
    }
}


static void
ngx_http_meter_gov_used_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    size_t                         j;
    ngx_int_t                      n;
    ngx_http_meter_gov_refresh_t  *gr;
    ngx_http_meter_gov_ckey_t     *k;
    ngx_http_meter_gov_ccust_t    *c;

    /* privdata is the key: the refresh is the worker's */
    gr = (ngx_http_meter_worker != NULL) ? &ngx_http_meter_worker->gov
                                         : NULL;

    if (gr == NULL) {
        return;
    }

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_ARRAY) == NGX_OK
        && reply->type == REDIS_REPLY_ARRAY && gr->gov_valid)
    {
        k = &((ngx_http_meter_gov_ckey_t *) gr->gov_keys.elts)
                                                    [(uintptr_t) privdata];
        c = &((ngx_http_meter_gov_ccust_t *) gr->gov_custs.elts)[k->cust];

        for (j = 0; j < reply->elements && j < c->ncredits; j++) {
            if (reply->element[j]->type != REDIS_REPLY_STRING) {
                continue;
            }

            n = ngx_atoi((u_char *) reply->element[j]->str,
                         reply->element[j]->len);

            if (n != NGX_ERROR) {
                c->credits[j].used += n;
            }
        }
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_done(gr);
    }
}


/* the end of a refresh: publish a new copy */

static void
ngx_http_meter_gov_done(ngx_http_meter_gov_refresh_t *gr)
{
    gr->gov_busy = 0;

    if (gr->gov_failed || !gr->gov_valid) {
        /* the last known state stays in force */
        return;
    }

    ngx_http_meter_gov_publish(gr);
}


/*
 * The balance read from Redis lacks what this node counted and has not
 * flushed yet: start the local count with it.  What is left out is only
 * what Redis confirmed between the read and now.
 */

static void
ngx_http_meter_gov_seed(ngx_http_meter_shctx_t *sh,
    ngx_http_meter_gov_snap_t *snap)
{
    uint32_t                    i, j;
    meter_entry_t              *e;
    meter_table_t              *t;
    ngx_http_meter_gov_key_t   *k;
    ngx_http_meter_gov_cust_t  *c;

    t = &sh->table;

    for (i = 0; i < t->nslots; i++) {
        e = &t->slots[i];

        if (__atomic_load_n(&e->state, __ATOMIC_ACQUIRE) != METER_SLOT_LIVE)
        {
            continue;
        }

        k = ngx_http_meter_gov_find(snap, e->key);
        if (k == NULL) {
            continue;
        }

        c = &snap->custs[k->cust - 1];

        for (j = 0; j < c->ncredits; j++) {
            if (ngx_strncmp(c->credits[j].meter, e->meter, METER_NAME_MAX)
                == 0)
            {
                c->credits[j].local += (int64_t) meter_entry_pending(e);
            }
        }
    }
}


static void
ngx_http_meter_gov_publish(ngx_http_meter_gov_refresh_t *gr)
{
    time_t                        now;
    size_t                        size, nslots;
    uint32_t                      h, n;
    ngx_uint_t                    i, j, b, z, blocked, delinquent, credits;
    ngx_shm_zone_t              **zones;
    ngx_http_meter_gov_key_t     *slot;
    ngx_http_meter_gov_snap_t    *snap;
    ngx_http_meter_gov_ckey_t    *keys;
    ngx_http_meter_gov_ccust_t   *custs;
    ngx_http_meter_gov_cust_t    *c;
    ngx_http_meter_gov_zone_t    *gz;
    ngx_http_meter_gov_shctx_t   *sh;
    ngx_http_meter_zone_ctx_t    *ctx;

    gz = gr->mcf->gov_zone->data;
    sh = gz->sh;
    now = ngx_time();
    keys = gr->gov_keys.elts;
    custs = gr->gov_custs.elts;

    for (nslots = 16; nslots < gr->gov_keys.nelts * 2; nslots *= 2) {
        /* load factor at most 1/2 */
    }

    size = sizeof(ngx_http_meter_gov_snap_t)
           + nslots * sizeof(ngx_http_meter_gov_key_t)
           + (gr->gov_custs.nelts + 1) * sizeof(ngx_http_meter_gov_cust_t);

    /* the buffer that is not published */
    b = (sh->snap == sh->buf[0]) ? 1 : 0;

    if (sh->cap[b] < size) {
        ngx_shmtx_lock(&gz->shpool->mutex);

        if (sh->buf[b]) {
            ngx_slab_free_locked(gz->shpool, sh->buf[b]);
            sh->buf[b] = NULL;
            sh->cap[b] = 0;
        }

        snap = ngx_slab_alloc_locked(gz->shpool, size);

        ngx_shmtx_unlock(&gz->shpool->mutex);

        if (snap == NULL) {
            ngx_log_error(NGX_LOG_ALERT, gr->log, 0,
                          "meter_governance_size is too small for the "
                          "governance state of %ui keys and %ui customers "
                          "(%uz bytes a copy, two copies); the last one "
                          "stays in force: raise it",
                          gr->gov_keys.nelts, gr->gov_custs.nelts, size);
            return;
        }

        sh->buf[b] = snap;
        sh->cap[b] = size;
    }

    snap = sh->buf[b];
    ngx_memzero(snap, size);

    snap->version = gr->gov_version;
    snap->mask = nslots - 1;
    snap->ncust = gr->gov_custs.nelts;
    snap->keys = (ngx_http_meter_gov_key_t *) (snap + 1);
    snap->custs = (ngx_http_meter_gov_cust_t *) (snap->keys + nslots);

    delinquent = 0;
    credits = 0;

    for (i = 0; i < gr->gov_custs.nelts; i++) {
        c = &snap->custs[i];

        c->reason = custs[i].reason;

        /* dated ahead: from now on (and since + grace cannot overflow) */
        c->since = ngx_min(custs[i].since, (int64_t) now);
        c->ncredits = custs[i].ncredits;

        for (j = 0; j < custs[i].ncredits; j++) {
            /* NUL padded like a table entry's name (snap is zeroed) */
            ngx_memcpy(c->credits[j].meter, custs[i].credits[j].meter.data,
                       ngx_min(custs[i].credits[j].meter.len,
                               METER_NAME_MAX));
            c->credits[j].remaining = custs[i].credits[j].granted
                                      - custs[i].credits[j].used;
            c->credits[j].local = 0;
            credits = 1;
        }

        if (c->reason) {
            delinquent++;
        }
    }

    blocked = 0;

    for (i = 0; i < gr->gov_keys.nelts; i++) {
        ngx_memcpy(&h, keys[i].key, sizeof(uint32_t));

        /* at most half full: a free slot is always found */
        slot = &snap->keys[h & snap->mask];

        for (n = 0; n < nslots; n++) {
            slot = &snap->keys[(h + n) & snap->mask];

            if (slot->cust == 0) {
                break;
            }
        }

        ngx_memcpy(slot->key, keys[i].key, METER_HASH_LEN);
        slot->cust = keys[i].cust + 1;
        slot->revoked = keys[i].revoked;

        c = &snap->custs[keys[i].cust];

        if (slot->revoked || c->reason) {
            blocked++;
            continue;
        }

        for (j = 0; j < c->ncredits; j++) {
            if (c->credits[j].remaining <= 0) {
                blocked++;
                break;
            }
        }
    }

    if (credits) {
        zones = gr->mcf->zones.elts;

        for (z = 0; z < gr->mcf->zones.nelts; z++) {
            ctx = zones[z]->data;

            if (ctx->governance) {
                ngx_http_meter_gov_seed(ctx->sh, snap);
            }
        }
    }

    __atomic_store_n(&sh->snap, snap, __ATOMIC_RELEASE);
    __atomic_store_n(&sh->refreshed, (uint64_t) now, __ATOMIC_RELAXED);
    __atomic_store_n(&sh->delinquent, (uint64_t) delinquent,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&sh->blocked, (uint64_t) blocked, __ATOMIC_RELAXED);
}
