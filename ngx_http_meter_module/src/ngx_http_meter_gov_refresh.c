
/*
 * Copyright (C) nginx-meter authors
 *
 * Governance, the refresh: one worker per node (under the governance
 * zone's lease) reads mtr:gov, mtr:gov:version, mtr:gov:credit and the
 * usage of keys with credit through the flush's Redis connection, and
 * publishes a compact copy in the governance zone for the access phase
 * (ngx_http_meter_gov.c).  A failed refresh leaves the last copy in force.
 *
 * A refresh costs what changed, not what exists:
 *
 *   - when mtr:gov:version moved and mtr:gov:log lists, without a gap,
 *     the fields each version since the view's rewrote, only those are
 *     read (HMGET) and applied to the view and to the published copy in
 *     place: a change of one customer costs its keys;
 *   - otherwise mtr:gov is read again, in HSCAN pages (a 1M-field HGETALL
 *     reply is ~100 MB in hiredis, freed in one go); each page is parsed
 *     as it comes, customers found by a hash;
 *   - the key table is rebuilt only for a new scan; when only credit
 *     moved, the new copy shares the published key table and only the
 *     customer table is written;
 *   - when neither the version nor a grant nor a usage moved, nothing is
 *     written: the published copy, and what requests count into it since
 *     (local), stays exact;
 *   - every loop over keys, customers or counters runs in slices of at
 *     most NGX_HTTP_METER_GOV_BUDGET us, the next one from
 *     ngx_posted_next_events, which nginx runs only after another round
 *     of epoll (src/event/ngx_event.c, ngx_process_events_and_timers):
 *     requests are served between slices.
 *
 * The copy being built is never the published one: requests read one
 * pointer (sh->snap), swapped when the copy is complete.
 */


#include "ngx_http_meter_module.h"

#include <malloc.h>


/* the phases of a refresh, in order */
#define NGX_HTTP_METER_GOV_IDLE     0
#define NGX_HTTP_METER_GOV_READ     1   /* version, HLEN, credit pages */
#define NGX_HTTP_METER_GOV_SCAN     2   /* mtr:gov pages */
#define NGX_HTTP_METER_GOV_ZERO     3   /* the spare key table, zeroed */
#define NGX_HTTP_METER_GOV_KEYS     4   /* ... and filled */
#define NGX_HTTP_METER_GOV_RESET    5   /* last refresh's grants dropped */
#define NGX_HTTP_METER_GOV_ASSIGN   6   /* this one's put on customers */
#define NGX_HTTP_METER_GOV_SEND     7   /* usage of keys with credit */
#define NGX_HTTP_METER_GOV_CHECK    8   /* did anything change? */
#define NGX_HTTP_METER_GOV_CUSTS    9   /* the spare customer table */
#define NGX_HTTP_METER_GOV_SEED     10  /* unflushed counts into local */
#define NGX_HTTP_METER_GOV_PUBLISH  11
#define NGX_HTTP_METER_GOV_PAGE     12  /* a page of mtr:gov, parsed
                                         * (between SCAN replies) */
#define NGX_HTTP_METER_GOV_DELTA    13  /* HMGET of the fields logged */
#define NGX_HTTP_METER_GOV_APPLY    14  /* ... applied */

#define NGX_HTTP_METER_GOV_LOGV     "256"   /* versions read from the log */
#define NGX_HTTP_METER_GOV_DMAX     4096    /* fields applied, at most */
#define NGX_HTTP_METER_GOV_WALK     65536   /* key list steps, same */

#define NGX_HTTP_METER_GOV_START    (NGX_HTTP_METER_GOV_NIL - 1)
#define NGX_HTTP_METER_GOV_ZCHUNK   16384   /* bytes zeroed between checks */
#define NGX_HTTP_METER_GOV_UNMAP    (1024 * 1024) /* bytes unmapped, same */
#define NGX_HTTP_METER_GOV_POOL     (1024 * 1024) /* a view's pool blocks */
#define NGX_HTTP_METER_GOV_TRIM     (256 * 1024 * 1024) /* M_TRIM_THRESHOLD */


static void ngx_http_meter_gov_ready(void *data);
static void ngx_http_meter_gov_down(void *data);
static void ngx_http_meter_gov_tick(ngx_event_t *ev);
static ngx_int_t ngx_http_meter_gov_send(ngx_http_meter_gov_refresh_t *gr,
    redisCallbackFn *fn, void *privdata, int argc, const char **argv,
    const size_t *len);
static ngx_int_t ngx_http_meter_gov_reply_ok(ngx_http_meter_gov_refresh_t *gr,
    redisReply *reply, int type);
static ngx_int_t ngx_http_meter_gov_page(ngx_http_meter_gov_refresh_t *gr,
    redisReply *reply, redisReply **items);
static void ngx_http_meter_gov_version_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_hlen_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_credit_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_log_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_scan_start(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_delta_send(
    ngx_http_meter_gov_refresh_t *gr);
static void ngx_http_meter_gov_delta_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static ngx_int_t ngx_http_meter_gov_apply(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_apply_field(
    ngx_http_meter_gov_refresh_t *gr, u_char *hex, redisReply *val);
static ngx_uint_t ngx_http_meter_gov_blocked_keys(
    ngx_http_meter_gov_view_t *v, uint32_t ci);
static ngx_int_t ngx_http_meter_gov_parse(u_char *p, u_char *end,
    u_char **tab);
static uint32_t ngx_http_meter_gov_reason(u_char **tab);
static ngx_int_t ngx_http_meter_gov_view_init(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v, ngx_uint_t n);
static void ngx_http_meter_gov_view_free(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v);
static void *ngx_http_meter_gov_mmap(size_t size);
static ngx_int_t ngx_http_meter_gov_vec_init(ngx_http_meter_gov_vec_t *a,
    ngx_uint_t n, size_t size);
static void *ngx_http_meter_gov_vec_push(ngx_http_meter_gov_vec_t *a);
static void ngx_http_meter_gov_junk(ngx_http_meter_gov_refresh_t *gr,
    void *p, size_t len);
static ngx_int_t ngx_http_meter_gov_drain(ngx_http_meter_gov_refresh_t *gr,
    ngx_uint_t all);
static uint64_t *ngx_http_meter_gov_map_slot(ngx_http_meter_gov_view_t *v,
    u_char *id, size_t len);
static ngx_int_t ngx_http_meter_gov_map_grow(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v);
static void ngx_http_meter_gov_scan_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static ngx_int_t ngx_http_meter_gov_scan_page(
    ngx_http_meter_gov_refresh_t *gr);
static void ngx_http_meter_gov_take(ngx_http_meter_gov_refresh_t *gr,
    redisReply *items, ngx_uint_t phase);
static void ngx_http_meter_gov_page_free(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_next(ngx_http_meter_gov_refresh_t *gr,
    ngx_uint_t phase, ngx_uint_t why);
static ngx_int_t ngx_http_meter_gov_scan_field(
    ngx_http_meter_gov_refresh_t *gr, ngx_http_meter_gov_view_t *v,
    redisReply *f, redisReply *val);
static ngx_int_t ngx_http_meter_hex_decode(uint8_t *dst, u_char *hex);
static void ngx_http_meter_gov_used_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_slice_handler(ngx_event_t *ev);
static void ngx_http_meter_gov_run(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_zero(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_keys(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_reset(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_assign(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_send_used(
    ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_check(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_custs(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_seed(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_gov_publish(ngx_http_meter_gov_refresh_t *gr);
static void *ngx_http_meter_gov_buf(ngx_http_meter_gov_refresh_t *gr,
    void **buf, size_t *cap, size_t size);
static void ngx_http_meter_gov_finish(ngx_http_meter_gov_refresh_t *gr,
    const char *how);
static void ngx_http_meter_gov_abort(ngx_http_meter_gov_refresh_t *gr,
    ngx_uint_t invalidate);
static uint64_t ngx_http_meter_gov_usec(clockid_t clock);
static void ngx_http_meter_gov_account(ngx_http_meter_gov_refresh_t *gr);
static void ngx_http_meter_gov_begin(ngx_http_meter_gov_refresh_t *gr);
static void ngx_http_meter_gov_end(ngx_http_meter_gov_refresh_t *gr);
static ngx_uint_t ngx_http_meter_gov_over(ngx_http_meter_gov_refresh_t *gr,
    ngx_uint_t every);


void
ngx_http_meter_gov_refresh_init(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_redis_t *rd)
{
    gr->mcf = rd->mcf;
    gr->log = rd->log;
    gr->redis = rd;
    gr->gov_kbuf = -1;

    ngx_http_meter_init_event(&gr->gov_tick, ngx_http_meter_gov_tick, gr,
                              gr->log);
    ngx_http_meter_init_event(&gr->gov_slice,
                              ngx_http_meter_gov_slice_handler, gr, gr->log);

    ngx_http_meter_redis_hook(rd, ngx_http_meter_gov_ready, NULL,
                              ngx_http_meter_gov_down, gr);

    /*
     * A rebuild frees ~100 MB of hiredis replies a page at a time; with
     * glibc's defaults a free() now and then returns the top of the heap
     * to the kernel (systrim) or a large malloc() consolidates every
     * fastbin first: one call held the loop 7 ms here.  A fixed trim
     * threshold keeps the heap (its peak is a few pages of replies) and
     * the 128 KB mmap threshold, so that larger blocks are mapped apart.
     */
    if (gr->mcf->gov_zone != NULL) {
        (void) mallopt(M_TRIM_THRESHOLD, NGX_HTTP_METER_GOV_TRIM);
        (void) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    }
}


void
ngx_http_meter_gov_refresh_exit(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_http_meter_gov_zone_t  *gz;

    if (gr->mcf->gov_zone != NULL) {
        gz = gr->mcf->gov_zone->data;
        ngx_http_meter_lease_release(&gz->sh->lease);
    }

    if (gr->gov_slice.posted) {
        ngx_delete_posted_event(&gr->gov_slice);
    }

    gr->gov_phase = NGX_HTTP_METER_GOV_IDLE;

    ngx_http_meter_gov_page_free(gr);
    ngx_http_meter_gov_view_free(gr, &gr->gov_view);
    ngx_http_meter_gov_view_free(gr, &gr->gov_scan);
    ngx_http_meter_gov_view_free(gr, &gr->gov_spare_view);
    (void) ngx_http_meter_gov_drain(gr, 1);
    gr->gov_valid = 0;

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

    if (gr->gov_phase == NGX_HTTP_METER_GOV_READ
        || gr->gov_phase == NGX_HTTP_METER_GOV_SCAN
        || gr->gov_phase == NGX_HTTP_METER_GOV_DELTA
        || gr->gov_phase == NGX_HTTP_METER_GOV_SEND)
    {
        ngx_http_meter_gov_abort(gr, 0);
    }
}


static void
ngx_http_meter_gov_tick(ngx_event_t *ev)
{
    u_char                         from[NGX_INT64_LEN + 2], *p;
    size_t                         len[2], len6[7];
    const char                    *argv[7];
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

    if (gr->redis->state != NGX_HTTP_METER_REDIS_READY) {
        return;
    }

    /* one refresher per node; renewed while a long refresh runs too */
    gz = gr->mcf->gov_zone->data;

    if (ngx_http_meter_lease(&gz->sh->lease, gr->mcf->gov_refresh)
        == NGX_DECLINED)
    {
        return;
    }

    if (gr->gov_phase != NGX_HTTP_METER_GOV_IDLE || gr->gov_busy) {
        return;
    }

    if (__atomic_load_n(&gz->sh->pubgen, __ATOMIC_ACQUIRE) != gr->gov_pubgen)
    {
        /* another worker published since: what we know is not what is
         * published */
        gr->gov_valid = 0;
        gr->gov_kbuf = -1;
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
    gr->gov_phase = NGX_HTTP_METER_GOV_READ;
    gr->gov_started = ngx_current_msec;
    gr->gov_rebuilt = 0;
    gr->gov_slices = 0;
    gr->gov_longest = 0;
    gr->gov_longest_cpu = 0;
    gr->gov_total = 0;
    gr->gov_begun = ngx_current_msec;
    gr->gov_hlen = 0;

    ngx_http_meter_gov_begin(gr);

    argv[0] = "GET"; len[0] = 3;
    argv[1] = MTR_GOV_VERSION; len[1] = sizeof(MTR_GOV_VERSION) - 1;
    (void) ngx_http_meter_gov_send(gr, ngx_http_meter_gov_version_reply, gr,
                                   2, argv, len);

    argv[0] = "HLEN"; len[0] = 4;
    argv[1] = MTR_GOV; len[1] = sizeof(MTR_GOV) - 1;
    (void) ngx_http_meter_gov_send(gr, ngx_http_meter_gov_hlen_reply, gr,
                                   2, argv, len);

    ngx_memcpy(gr->gov_cursor, "0", 2);
    (void) ngx_http_meter_gov_hscan(gr, MTR_GOV_CREDIT,
                                    sizeof(MTR_GOV_CREDIT) - 1,
                                    gr->gov_cursor,
                                    ngx_http_meter_gov_credit_reply);

    /* what the versions after the view's changed, if it can be applied */
    gr->gov_log_all = 1;
    gr->gov_log_upto = gr->gov_view.version;

    if (gr->gov_valid && gr->gov_kbuf >= 0
        && ngx_array_init(&gr->gov_delta, gr->gov_tmp, 16,
                          sizeof(ngx_http_meter_gov_delta_t))
           == NGX_OK)
    {
        gr->gov_log_all = 0;

        p = ngx_sprintf(from, "(%uL", gr->gov_view.version);

        argv[0] = "ZRANGEBYSCORE"; len6[0] = 13;
        argv[1] = MTR_GOV_LOG; len6[1] = sizeof(MTR_GOV_LOG) - 1;
        argv[2] = (char *) from; len6[2] = p - from;
        argv[3] = "+inf"; len6[3] = 4;
        argv[4] = "LIMIT"; len6[4] = 5;
        argv[5] = "0"; len6[5] = 1;
        argv[6] = NGX_HTTP_METER_GOV_LOGV;
        len6[6] = sizeof(NGX_HTTP_METER_GOV_LOGV) - 1;

        (void) ngx_http_meter_gov_send(gr, ngx_http_meter_gov_log_reply, gr,
                                       7, argv, len6);
    }

    /* plans and quotas: ngx_http_meter_quota.c */
    (void) ngx_http_meter_quota_read(gr);

    if (gr->gov_busy == 0) {
        ngx_http_meter_gov_abort(gr, 0);
    }

    ngx_http_meter_gov_end(gr);
}


static ngx_int_t
ngx_http_meter_gov_send(ngx_http_meter_gov_refresh_t *gr, redisCallbackFn *fn,
    void *privdata, int argc, const char **argv, const size_t *len)
{
    if (gr->redis->ac == NULL
        || redisAsyncCommandArgv(gr->redis->ac, fn, privdata, argc, argv,
                                 len)
           != REDIS_OK)
    {
        gr->gov_failed = 1;
        return NGX_ERROR;
    }

    gr->gov_busy++;

    return NGX_OK;
}


/* HSCAN KEY CURSOR COUNT n: one page of a hash (the quota pages too) */

ngx_int_t
ngx_http_meter_gov_hscan(ngx_http_meter_gov_refresh_t *gr, const char *key,
    size_t klen, const char *cursor, redisCallbackFn *fn)
{
    size_t       len[5];
    const char  *argv[5];

    argv[0] = "HSCAN"; len[0] = 5;
    argv[1] = key; len[1] = klen;
    argv[2] = cursor; len[2] = ngx_strlen(cursor);
    argv[3] = "COUNT"; len[3] = 5;
    argv[4] = NGX_HTTP_METER_GOV_COUNT;
    len[4] = sizeof(NGX_HTTP_METER_GOV_COUNT) - 1;

    return ngx_http_meter_gov_send(gr, fn, gr, 5, argv, len);
}


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


/*
 * An HSCAN reply, [cursor, [field, value, ...]]: keeps the cursor, returns
 * the page in *items (NULL: empty); NGX_DONE when the scan is complete.
 */

static ngx_int_t
ngx_http_meter_gov_page(ngx_http_meter_gov_refresh_t *gr, redisReply *reply,
    redisReply **items)
{
    redisReply  *cur;

    *items = NULL;

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_ARRAY) != NGX_OK
        || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[0]->len >= sizeof(gr->gov_cursor)
        || reply->element[1]->type != REDIS_REPLY_ARRAY)
    {
        gr->gov_failed = 1;
        return NGX_ERROR;
    }

    cur = reply->element[0];
    ngx_memcpy(gr->gov_cursor, cur->str, cur->len);
    gr->gov_cursor[cur->len] = '\0';

    *items = reply->element[1];

    return (cur->len == 1 && cur->str[0] == '0') ? NGX_DONE : NGX_OK;
}


static void
ngx_http_meter_gov_version_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    ngx_int_t                      n;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    gr->gov_started = ngx_current_msec;

    if (gr->gov_phase == NGX_HTTP_METER_GOV_READ
        && ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_STRING)
           == NGX_OK)
    {
        n = 0;

        if (reply->type == REDIS_REPLY_STRING) {
            n = ngx_atoi((u_char *) reply->str, reply->len);
        }

        gr->gov_new_version = (n == NGX_ERROR) ? 0 : (uint64_t) n;
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_read_done(gr);
    }
}


static void
ngx_http_meter_gov_hlen_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    gr->gov_started = ngx_current_msec;

    if (gr->gov_phase == NGX_HTTP_METER_GOV_READ
        && ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_INTEGER)
           == NGX_OK
        && reply->type == REDIS_REPLY_INTEGER && reply->integer > 0)
    {
        /* only sizes the arrays: a scan may find more */
        gr->gov_hlen = (ngx_uint_t) ngx_min(reply->integer, 1 << 28);
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_read_done(gr);
    }
}


/* a page of mtr:gov:credit: CUSTOMER|METER -> units granted */

static void
ngx_http_meter_gov_credit_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    u_char                        *bar, *f;
    size_t                         i, flen;
    ngx_int_t                      n, rc;
    redisReply                    *items;
    ngx_http_meter_gov_refresh_t  *gr = privdata;
    ngx_http_meter_gov_grant_t    *g;

    gr->gov_started = ngx_current_msec;

    if (gr->gov_phase != NGX_HTTP_METER_GOV_READ) {
        gr->gov_busy--;
        return;
    }

    ngx_http_meter_gov_begin(gr);

    rc = ngx_http_meter_gov_page(gr, reply, &items);

    for (i = 0; items != NULL && i + 1 < items->elements; i += 2) {
        if (items->element[i]->type != REDIS_REPLY_STRING
            || items->element[i + 1]->type != REDIS_REPLY_STRING)
        {
            continue;
        }

        f = (u_char *) items->element[i]->str;
        flen = items->element[i]->len;

        bar = ngx_strlchr(f, f + flen, MTR_GOV_CREDIT_SEP);
        n = ngx_atoi((u_char *) items->element[i + 1]->str,
                     items->element[i + 1]->len);

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

        ngx_memzero(g, sizeof(ngx_http_meter_gov_grant_t));

        g->cust.len = bar - f;
        g->cust.data = ngx_pnalloc(gr->gov_tmp, g->cust.len);
        g->meter.len = f + flen - bar - 1;
        g->meter.data = ngx_pnalloc(gr->gov_tmp, g->meter.len);

        if (g->cust.data == NULL || g->meter.data == NULL) {
            gr->gov_failed = 1;
            break;
        }

        ngx_memcpy(g->cust.data, f, g->cust.len);
        ngx_memcpy(g->meter.data, bar + 1, g->meter.len);
        g->granted = n;
    }

    if (rc == NGX_OK && !gr->gov_failed) {
        (void) ngx_http_meter_gov_hscan(gr, MTR_GOV_CREDIT,
                                        sizeof(MTR_GOV_CREDIT) - 1,
                                        gr->gov_cursor,
                                        ngx_http_meter_gov_credit_reply);
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_read_done(gr);
    }

    ngx_http_meter_gov_end(gr);
}


/*
 * mtr:gov:log after the view's version: "VERSION KH KH ...", in order of
 * version.  The fields of the versions that follow the view's without a
 * gap are kept; "*", a bad entry or too many fields: read all of mtr:gov.
 */

static void
ngx_http_meter_gov_log_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    redisReply                    *reply = r;
    u_char                        *p, *end, *sp;
    size_t                         i;
    ngx_int_t                      v;
    ngx_http_meter_gov_delta_t    *d;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    gr->gov_started = ngx_current_msec;

    if (gr->gov_phase != NGX_HTTP_METER_GOV_READ) {
        gr->gov_busy--;
        return;
    }

    if (reply == NULL) {
        gr->gov_failed = 1;

    } else if (reply->type != REDIS_REPLY_ARRAY) {
        gr->gov_log_all = 1;

    } else {
        for (i = 0; i < reply->elements && !gr->gov_log_all; i++) {
            if (reply->element[i]->type != REDIS_REPLY_STRING) {
                gr->gov_log_all = 1;
                break;
            }

            p = (u_char *) reply->element[i]->str;
            end = p + reply->element[i]->len;
            sp = ngx_strlchr(p, end, ' ');

            v = ngx_atoi(p, (sp ? sp : end) - p);

            /* a gap: the log is complete only up to here */
            if (v == NGX_ERROR || (uint64_t) v != gr->gov_log_upto + 1) {
                break;
            }

            for (p = sp; p != NULL && p < end; p += 1 + METER_HEX_LEN) {
                if (end - p < 1 + METER_HEX_LEN
                    || (end - p > 1 + METER_HEX_LEN
                        && p[1 + METER_HEX_LEN] != ' ')
                    || gr->gov_delta.nelts == NGX_HTTP_METER_GOV_DMAX)
                {
                    /* MTR_GOV_LOG_ALL, or more than we apply */
                    gr->gov_log_all = 1;
                    break;
                }

                d = ngx_array_push(&gr->gov_delta);
                if (d == NULL) {
                    gr->gov_log_all = 1;
                    break;
                }

                d->version = (uint64_t) v;
                ngx_memcpy(d->hex, p + 1, METER_HEX_LEN);
            }

            gr->gov_log_upto = (uint64_t) v;
        }
    }

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_read_done(gr);
    }
}


/* version, HLEN, every grant and the log are in: the key map, if its
 * version moved */

void
ngx_http_meter_gov_read_done(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_gov_shctx_t  *sh;

    if (gr->gov_phase != NGX_HTTP_METER_GOV_READ) {
        return;
    }

    if (gr->gov_failed || gr->redis->ac == NULL) {
        ngx_http_meter_gov_abort(gr, 0);
        return;
    }

    if (gr->gov_valid && gr->gov_view.version == gr->gov_new_version) {
        gr->gov_phase = (gr->gov_kbuf < 0) ? NGX_HTTP_METER_GOV_ZERO
                                           : NGX_HTTP_METER_GOV_RESET;
        gr->gov_i = 0;
        ngx_http_meter_gov_run(gr);
        return;
    }

    if (gr->gov_valid && gr->gov_kbuf >= 0 && !gr->gov_log_all
        && gr->gov_new_version > gr->gov_view.version
        && gr->gov_log_upto >= gr->gov_new_version)
    {
        /* the copy requests read is ours: the delta goes into it too */
        gz = gr->mcf->gov_zone->data;
        sh = gz->sh;

        gr->gov_inplace = (sh->snap != NULL
                           && sh->snap->keys == sh->kbuf[gr->gov_kbuf]
                           && sh->pubgen == gr->gov_pubgen);

        if (ngx_http_meter_gov_delta_send(gr) != NGX_OK) {
            ngx_http_meter_gov_abort(gr, 0);
            return;
        }

        if (gr->gov_phase == NGX_HTTP_METER_GOV_APPLY) {
            ngx_http_meter_gov_run(gr);
        }

        return;
    }

    ngx_http_meter_gov_scan_start(gr);
}


/* the version read before the scan: a change during it is seen by the
 * next refresh, which scans again */

static void
ngx_http_meter_gov_scan_start(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_http_meter_gov_view_free(gr, &gr->gov_scan);

    if (ngx_http_meter_gov_view_init(gr, &gr->gov_scan, gr->gov_hlen)
        != NGX_OK)
    {
        ngx_http_meter_gov_abort(gr, 0);
        return;
    }

    gr->gov_scan.version = gr->gov_new_version;
    gr->gov_phase = NGX_HTTP_METER_GOV_SCAN;

    ngx_memcpy(gr->gov_cursor, "0", 2);

    if (ngx_http_meter_gov_hscan(gr, MTR_GOV, sizeof(MTR_GOV) - 1,
                                 gr->gov_cursor,
                                 ngx_http_meter_gov_scan_reply)
        != NGX_OK)
    {
        ngx_http_meter_gov_abort(gr, 0);
    }
}


/*
 * HMGET mtr:gov of the fields the versions up to the one read rewrote
 * (the log may hold later ones: the next refresh's).  None (grants only
 * moved): straight to applying nothing.
 */

static ngx_int_t
ngx_http_meter_gov_delta_send(ngx_http_meter_gov_refresh_t *gr)
{
    size_t                      *len;
    ngx_uint_t                   i, n;
    const char                 **argv;
    ngx_http_meter_gov_delta_t  *d;

    d = gr->gov_delta.elts;

    for (i = 0, n = 0; i < gr->gov_delta.nelts; i++) {
        if (d[i].version <= gr->gov_new_version) {
            d[n++] = d[i];
        }
    }

    gr->gov_delta.nelts = n;
    gr->gov_i = 0;

    if (n == 0) {
        gr->gov_phase = NGX_HTTP_METER_GOV_APPLY;
        return NGX_OK;
    }

    argv = ngx_palloc(gr->gov_tmp, (n + 2) * sizeof(char *));
    len = ngx_palloc(gr->gov_tmp, (n + 2) * sizeof(size_t));
    if (argv == NULL || len == NULL) {
        return NGX_ERROR;
    }

    argv[0] = "HMGET"; len[0] = 5;
    argv[1] = MTR_GOV; len[1] = sizeof(MTR_GOV) - 1;

    for (i = 0; i < n; i++) {
        argv[2 + i] = (char *) d[i].hex;
        len[2 + i] = METER_HEX_LEN;
    }

    gr->gov_phase = NGX_HTTP_METER_GOV_DELTA;

    return ngx_http_meter_gov_send(gr, ngx_http_meter_gov_delta_reply, gr,
                                   (int) (n + 2), argv, len);
}


/* the values, taken from hiredis's reply and applied in slices */

static void
ngx_http_meter_gov_delta_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    gr->gov_started = ngx_current_msec;
    gr->gov_busy--;

    if (gr->gov_phase != NGX_HTTP_METER_GOV_DELTA) {
        return;
    }

    ngx_http_meter_gov_begin(gr);

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_ARRAY) != NGX_OK
        || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != gr->gov_delta.nelts)
    {
        ngx_http_meter_gov_abort(gr, 0);

    } else {
        ngx_http_meter_gov_take(gr, reply, NGX_HTTP_METER_GOV_APPLY);
    }

    ngx_http_meter_gov_end(gr);
}


/*
 * The fields logged, applied one by one to the view, to the key table of
 * the view and, when it is the published one, to the customer table
 * requests read.  One that cannot be applied in place (a field gone, a
 * table that would be too full): all of mtr:gov is read instead.
 */

static ngx_int_t
ngx_http_meter_gov_apply(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_int_t                    rc;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_gov_delta_t  *d;

    d = gr->gov_delta.elts;

    for ( /* void */ ; gr->gov_i < gr->gov_page_n; gr->gov_i++) {
        if (ngx_http_meter_gov_over(gr, 0)) {
            return NGX_AGAIN;
        }

        rc = ngx_http_meter_gov_apply_field(gr, d[gr->gov_i].hex,
                                            gr->gov_page[gr->gov_i]);

        if (rc == NGX_DECLINED) {
            ngx_log_debug0(NGX_LOG_DEBUG_CORE, gr->log, 0,
                           "meter: governance refresh: the log cannot be "
                           "applied in place, reading mtr:gov");

            ngx_http_meter_gov_page_free(gr);
            gr->gov_valid = 0;
            ngx_http_meter_gov_scan_start(gr);

            return (gr->gov_phase == NGX_HTTP_METER_GOV_SCAN) ? NGX_DONE
                                                              : NGX_ERROR;
        }

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }
    }

    ngx_http_meter_gov_page_free(gr);

    gr->gov_view.version = gr->gov_new_version;

    if (gr->gov_inplace) {
        gz = gr->mcf->gov_zone->data;

        __atomic_store_n(&gz->sh->delinquent, (uint64_t) gr->gov_delinquent,
                         __ATOMIC_RELAXED);
        __atomic_store_n(&gz->sh->blocked, (uint64_t) gr->gov_blocked,
                         __ATOMIC_RELAXED);
    }

    return ngx_http_meter_gov_next(gr, NGX_HTTP_METER_GOV_RESET, 3);
}


/* the keys of a customer that a request refuses */

static ngx_uint_t
ngx_http_meter_gov_blocked_keys(ngx_http_meter_gov_view_t *v, uint32_t ci)
{
    ngx_uint_t                      j;
    ngx_http_meter_gov_ccust_t     *c;
    ngx_http_meter_gov_ccredits_t  *cr;

    c = &((ngx_http_meter_gov_ccust_t *) v->custs.elts)[ci];

    if (c->reason) {
        return c->nlive;
    }

    if (c->credit != NGX_HTTP_METER_GOV_NIL) {
        cr = &((ngx_http_meter_gov_ccredits_t *) v->credits.elts)[c->credit];

        for (j = 0; j < cr->npub; j++) {
            if (cr->pub[j].granted - cr->pub[j].used <= 0) {
                return c->nlive;
            }
        }
    }

    return 0;
}


static ngx_int_t
ngx_http_meter_gov_apply_field(ngx_http_meter_gov_refresh_t *gr,
    u_char *hex, redisReply *val)
{
    u_char                      *p, *end, *tab[4];
    uint8_t                      key[METER_HASH_LEN];
    int64_t                      since;
    uint32_t                     h, n, ci, oi, ki, prev, reason, revoked;
    uint64_t                    *mslot;
    ngx_int_t                    t;
    ngx_uint_t                   exists, steps, before;
    ngx_http_meter_gov_key_t    *table, *slot, *empty, *k_slot;
    ngx_http_meter_gov_cust_t   *pc;
    ngx_http_meter_gov_snap_t   *snap;
    ngx_http_meter_gov_view_t   *v;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_gov_ckey_t   *k;
    ngx_http_meter_gov_ccust_t  *c;
    ngx_http_meter_gov_shctx_t  *sh;

    /* a field gone (nothing deletes one) or one the scan would skip */
    if (val->type != REDIS_REPLY_STRING
        || ngx_http_meter_hex_decode(key, hex) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    p = (u_char *) val->str;
    end = p + val->len;

    if (ngx_http_meter_gov_parse(p, end, tab) != NGX_OK) {
        return NGX_DECLINED;
    }

    reason = ngx_http_meter_gov_reason(tab);

    t = ngx_atoi(tab[2] + 1, tab[3] - tab[2] - 1);
    since = (t == NGX_ERROR) ? 0 : t;

    t = ngx_atoi(tab[3] + 1, end - tab[3] - 1);
    revoked = (t != NGX_ERROR && t > 0);

    gz = gr->mcf->gov_zone->data;
    sh = gz->sh;
    snap = sh->snap;
    v = &gr->gov_view;
    table = sh->kbuf[gr->gov_kbuf];

    /* the key in the view's key table, or where it goes */
    ngx_memcpy(&h, key, sizeof(uint32_t));

    slot = NULL;
    empty = NULL;

    for (n = 0; n <= gr->gov_mask; n++) {
        k_slot = &table[(h + n) & gr->gov_mask];

        if (k_slot->cust == 0) {
            empty = k_slot;
            break;
        }

        if (ngx_memcmp(k_slot->key, key, METER_HASH_LEN) == 0) {
            slot = k_slot;
            break;
        }
    }

    exists = (slot != NULL);

    /* load at most 5/8 for keys added in place; past it, a rebuild */
    if (!exists
        && (empty == NULL
            || (gr->gov_tkeys + 1) * 8 > ((ngx_uint_t) gr->gov_mask + 1) * 5))
    {
        return NGX_DECLINED;
    }

    /* the customer, maybe a new one */
    if (2 * (v->custs.nelts + 1) > v->map_mask
        && ngx_http_meter_gov_map_grow(gr, v) != NGX_OK)
    {
        return NGX_ERROR;
    }

    mslot = ngx_http_meter_gov_map_slot(v, p, tab[0] - p);

    if ((uint32_t) *mslot == 0) {
        /* requests must find it in the customer table before the key */
        if (gr->gov_inplace
            && (v->custs.nelts + 1) * sizeof(ngx_http_meter_gov_cust_t)
               > sh->ccap[snap->custs == sh->cbuf[0] ? 0 : 1])
        {
            return NGX_DECLINED;
        }

        c = ngx_http_meter_gov_vec_push(&v->custs);
        if (c == NULL) {
            return NGX_ERROR;
        }

        c->id.len = tab[0] - p;
        c->id.data = ngx_pnalloc(v->pool, c->id.len);
        if (c->id.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(c->id.data, p, c->id.len);
        c->reason = 0;
        c->since = 0;
        c->khead = NGX_HTTP_METER_GOV_NIL;
        c->nlive = 0;
        c->credit = NGX_HTTP_METER_GOV_NIL;

        *mslot = ((uint64_t) v->gen << 32) | v->custs.nelts;

        if (gr->gov_inplace) {
            pc = &snap->custs[v->custs.nelts - 1];
            ngx_memzero(pc, sizeof(ngx_http_meter_gov_cust_t));
            ngx_memcpy(pc->id, c->id.data,
                       ngx_min(c->id.len, MTR_CUSTOMER_MAX));
            __atomic_store_n(&snap->ncust, (uint32_t) v->custs.nelts,
                             __ATOMIC_RELEASE);
        }
    }

    ci = (uint32_t) *mslot - 1;
    oi = exists ? slot->cust - 1 : ci;

    /* the key in the view: on its customer's list */
    ki = NGX_HTTP_METER_GOV_NIL;
    prev = NGX_HTTP_METER_GOV_NIL;

    if (exists) {
        k = v->keys.elts;
        steps = 0;

        for (ki = ((ngx_http_meter_gov_ccust_t *) v->custs.elts)[oi].khead;
             ki != NGX_HTTP_METER_GOV_NIL;
             prev = ki, ki = k[ki].next)
        {
            if (!k[ki].dup
                && ngx_memcmp(k[ki].key, key, METER_HASH_LEN) == 0)
            {
                break;
            }

            if (++steps == NGX_HTTP_METER_GOV_WALK) {
                return NGX_DECLINED;
            }
        }

        if (ki == NGX_HTTP_METER_GOV_NIL) {
            return NGX_DECLINED;
        }
    }

    /* what the status figures counted for both customers, then again */
    before = ngx_http_meter_gov_blocked_keys(v, ci)
             + (oi != ci ? ngx_http_meter_gov_blocked_keys(v, oi) : 0);

    c = v->custs.elts;
    gr->gov_delinquent -= (c[ci].reason != 0);

    if (exists) {
        k = &((ngx_http_meter_gov_ckey_t *) v->keys.elts)[ki];

        if (k->revoked) {
            v->nrevoked--;
            gr->gov_blocked--;

        } else {
            c[oi].nlive--;
        }

        if (oi != ci) {
            if (prev == NGX_HTTP_METER_GOV_NIL) {
                c[oi].khead = k->next;

            } else {
                ((ngx_http_meter_gov_ckey_t *) v->keys.elts)[prev].next =
                                                                   k->next;
            }

            k->next = c[ci].khead;
            c[ci].khead = ki;
        }

    } else {
        k = ngx_http_meter_gov_vec_push(&v->keys);
        if (k == NULL) {
            return NGX_ERROR;
        }

        ki = v->keys.nelts - 1;
        ngx_memcpy(k->key, key, METER_HASH_LEN);
        k->dup = 0;
        k->next = c[ci].khead;
        c[ci].khead = ki;
    }

    k->cust = ci;
    k->revoked = (uint8_t) revoked;

    if (revoked) {
        v->nrevoked++;
        gr->gov_blocked++;

    } else {
        c[ci].nlive++;
    }

    c[ci].reason = reason;
    c[ci].since = since;

    gr->gov_delinquent += (reason != 0);
    gr->gov_blocked += ngx_http_meter_gov_blocked_keys(v, ci)
                       + (oi != ci ? ngx_http_meter_gov_blocked_keys(v, oi)
                                   : 0);
    gr->gov_blocked -= before;

    /*
     * The customer as requests read it: in good standing before its
     * "since" matters, so that a request never pairs a reason with a
     * since of another state (ngx_http_meter_access_handler()).
     */
    if (gr->gov_inplace) {
        pc = &snap->custs[ci];
        since = ngx_min(since, (int64_t) ngx_time());

        if (reason) {
            if (pc->reason != reason || pc->since != since) {
                __atomic_store_n(&pc->reason, 0, __ATOMIC_RELEASE);
                __atomic_store_n(&pc->since, since, __ATOMIC_RELEASE);
                __atomic_store_n(&pc->reason, reason, __ATOMIC_RELEASE);
            }

        } else {
            __atomic_store_n(&pc->reason, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&pc->since, since, __ATOMIC_RELEASE);
        }
    }

    /* the key itself: found by its hash, then its customer */
    if (exists) {
        __atomic_store_n(&slot->revoked, revoked, __ATOMIC_RELEASE);
        __atomic_store_n(&slot->cust, ci + 1, __ATOMIC_RELEASE);

    } else {
        ngx_memcpy(empty->key, key, METER_HASH_LEN);
        empty->revoked = revoked;
        __atomic_store_n(&empty->cust, ci + 1, __ATOMIC_RELEASE);
        gr->gov_tkeys++;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_gov_view_init(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v, ngx_uint_t n)
{
    size_t                      size;
    ngx_http_meter_gov_view_t  *sp;

    ngx_memzero(v, sizeof(ngx_http_meter_gov_view_t));

    /*
     * Customer ids come from blocks of 1 MB: every new block is a large
     * malloc(), which first consolidates glibc's fastbins, full of the
     * freed reply objects of the pages (~0.1 ms each time with 16 KB ones).
     * The blocks of the view before are reused: a fresh page's first
     * touch cost up to milliseconds on this virtual machine.
     */
    sp = &gr->gov_spare_view;

    if (sp->pool != NULL) {
        v->pool = sp->pool;
        sp->pool = NULL;
        ngx_reset_pool(v->pool);

    } else {
        v->pool = ngx_create_pool(NGX_HTTP_METER_GOV_POOL, gr->log);
        if (v->pool == NULL) {
            return NGX_ERROR;
        }
    }

    /* sized for what HLEN said: pages are touched only as filled */
    n += n / 16 + 64;

    for (size = 16; size < 2 * n; size *= 2) { /* void */ }

    /*
     * The arrays of the view before, when large enough: the first touch of
     * fresh pages costs up to milliseconds here (a virtual machine backs
     * them on demand), in the middle of a slice.
     */
    if (sp->keys.elts != NULL && sp->custs.elts != NULL && sp->map != NULL
        && sp->keys.nalloc >= n && sp->custs.nalloc >= n
        && sp->map_mask + 1 >= size)
    {
        v->keys = sp->keys;
        v->custs = sp->custs;
        v->map = sp->map;
        v->map_mask = sp->map_mask;
        v->keys.nelts = 0;
        v->custs.nelts = 0;
        ngx_memzero(sp, sizeof(ngx_http_meter_gov_view_t));

    } else if (ngx_http_meter_gov_vec_init(&v->keys, n,
                                           sizeof(ngx_http_meter_gov_ckey_t))
               != NGX_OK
               || ngx_http_meter_gov_vec_init(&v->custs, n,
                                        sizeof(ngx_http_meter_gov_ccust_t))
                  != NGX_OK
               || (v->map = ngx_http_meter_gov_mmap(size * sizeof(uint64_t)))
                  == NULL)
    {
        ngx_http_meter_gov_view_free(gr, v);
        return NGX_ERROR;

    } else {
        v->map_mask = size - 1;
    }

    /* a new generation frees every entry of the map at once */
    v->gen = ++gr->gov_gen;

    if (ngx_array_init(&v->credits, v->pool, 16,
                       sizeof(ngx_http_meter_gov_ccredits_t))
        != NGX_OK)
    {
        ngx_http_meter_gov_view_free(gr, v);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* its arrays are kept for the next scan; the ones kept before go */

static void
ngx_http_meter_gov_view_free(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v)
{
    ngx_http_meter_gov_view_t  *sp;

    sp = &gr->gov_spare_view;

    if (v->keys.elts != NULL && v != sp && !ngx_exiting && !ngx_terminate) {
        ngx_http_meter_gov_view_free(gr, sp);

        sp->keys = v->keys;
        sp->custs = v->custs;
        sp->map = v->map;
        sp->map_mask = v->map_mask;
        sp->pool = v->pool;

        v->keys.elts = NULL;
        v->custs.elts = NULL;
        v->map = NULL;
        v->pool = NULL;
    }

    if (v->keys.elts != NULL) {
        ngx_http_meter_gov_junk(gr, v->keys.elts,
                                v->keys.nalloc * v->keys.size);
    }

    if (v->custs.elts != NULL) {
        ngx_http_meter_gov_junk(gr, v->custs.elts,
                                v->custs.nalloc * v->custs.size);
    }

    if (v->map != NULL) {
        ngx_http_meter_gov_junk(gr, v->map,
                                (v->map_mask + 1) * sizeof(uint64_t));
    }

    if (v->pool != NULL) {
        ngx_destroy_pool(v->pool);
    }

    ngx_memzero(v, sizeof(ngx_http_meter_gov_view_t));
}


/* anonymous pages: zeroed by the kernel, written only where used */

static void *
ngx_http_meter_gov_mmap(size_t size)
{
    void  *p;

    p = mmap(NULL, size, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

    return (p == MAP_FAILED) ? NULL : p;
}


static ngx_int_t
ngx_http_meter_gov_vec_init(ngx_http_meter_gov_vec_t *a, ngx_uint_t n,
    size_t size)
{
    a->elts = ngx_http_meter_gov_mmap(n * size);
    a->nelts = 0;
    a->nalloc = n;
    a->size = size;

    return (a->elts != NULL) ? NGX_OK : NGX_ERROR;
}


static void *
ngx_http_meter_gov_vec_push(ngx_http_meter_gov_vec_t *a)
{
    void  *p;

    if (a->nelts == a->nalloc) {
        p = mremap(a->elts, a->nalloc * a->size, 2 * a->nalloc * a->size,
                   MREMAP_MAYMOVE);
        if (p == MAP_FAILED) {
            return NULL;
        }

        a->elts = p;
        a->nalloc *= 2;
    }

    return (u_char *) a->elts + a->size * a->nelts++;
}


/* unmapping 100 MB of touched pages takes milliseconds: done in slices */

static void
ngx_http_meter_gov_junk(ngx_http_meter_gov_refresh_t *gr, void *p,
    size_t len)
{
    if (gr->gov_njunk == sizeof(gr->gov_junk) / sizeof(gr->gov_junk[0])) {
        (void) munmap(p, len);
        return;
    }

    gr->gov_junk[gr->gov_njunk].p = p;
    gr->gov_junk[gr->gov_njunk].len = len;
    gr->gov_njunk++;
}


static ngx_int_t
ngx_http_meter_gov_drain(ngx_http_meter_gov_refresh_t *gr, ngx_uint_t all)
{
    size_t                      n;
    ngx_http_meter_gov_junk_t  *j;

    while (gr->gov_njunk) {
        if (!all && ngx_http_meter_gov_over(gr, 0)) {
            return NGX_AGAIN;
        }

        j = &gr->gov_junk[gr->gov_njunk - 1];

        n = all ? j->len : ngx_min(j->len, NGX_HTTP_METER_GOV_UNMAP);

        /* from the end: the first page stays the region's start */
        (void) munmap(j->p + j->len - n, n);
        j->len -= n;

        if (j->len == 0) {
            gr->gov_njunk--;
        }
    }

    return NGX_OK;
}


static uint64_t *
ngx_http_meter_gov_map_slot(ngx_http_meter_gov_view_t *v, u_char *id,
    size_t len)
{
    uint32_t                    i;
    ngx_http_meter_gov_ccust_t *custs, *c;

    custs = v->custs.elts;

    for (i = ngx_murmur_hash2(id, len) & v->map_mask; /* void */ ;
         i = (i + 1) & v->map_mask)
    {
        if ((uint32_t) (v->map[i] >> 32) != v->gen) {
            v->map[i] = (uint64_t) v->gen << 32;
            return &v->map[i];
        }

        if ((uint32_t) v->map[i] == 0) {
            return &v->map[i];
        }

        c = &custs[(uint32_t) v->map[i] - 1];

        if (c->id.len == len && ngx_memcmp(c->id.data, id, len) == 0) {
            return &v->map[i];
        }
    }
}


/* more customers than HLEN foretold: rare, one hold of O(customers) */

static ngx_int_t
ngx_http_meter_gov_map_grow(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v)
{
    uint32_t                    i, j, size;
    uint64_t                   *map, tag;
    ngx_http_meter_gov_ccust_t *custs;

    size = (v->map_mask + 1) * 2;

    map = ngx_http_meter_gov_mmap(size * sizeof(uint64_t));
    if (map == NULL) {
        return NGX_ERROR;
    }

    custs = v->custs.elts;
    tag = (uint64_t) v->gen << 32;

    for (i = 0; i < v->custs.nelts; i++) {
        for (j = ngx_murmur_hash2(custs[i].id.data, custs[i].id.len)
                 & (size - 1);
             map[j] != 0;
             j = (j + 1) & (size - 1))
        {
            /* void */
        }

        map[j] = tag | (i + 1);
    }

    ngx_http_meter_gov_junk(gr, v->map, (v->map_mask + 1) * sizeof(uint64_t));
    v->map = map;
    v->map_mask = size - 1;

    return NGX_OK;
}


/*
 * A page of mtr:gov is taken from hiredis's reply (which frees what is
 * left in it after this callback) and parsed in slices.
 */

static void
ngx_http_meter_gov_scan_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                    *reply = r;
    ngx_int_t                      rc;
    redisReply                    *items;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    gr->gov_started = ngx_current_msec;
    gr->gov_busy--;

    if (gr->gov_phase != NGX_HTTP_METER_GOV_SCAN) {
        return;
    }

    ngx_http_meter_gov_begin(gr);

    rc = ngx_http_meter_gov_page(gr, reply, &items);

    if (rc == NGX_ERROR) {
        ngx_http_meter_gov_abort(gr, 0);

    } else {
        gr->gov_last_page = (rc == NGX_DONE);
        ngx_http_meter_gov_take(gr, items, NGX_HTTP_METER_GOV_PAGE);
    }

    ngx_http_meter_gov_end(gr);
}


/* the elements of a reply, taken from hiredis (which frees what is left
 * in it after the callback), for a phase that works through them */

static void
ngx_http_meter_gov_take(ngx_http_meter_gov_refresh_t *gr, redisReply *items,
    ngx_uint_t phase)
{
    gr->gov_page = items->element;
    gr->gov_page_n = items->elements;
    items->element = NULL;
    items->elements = 0;

    gr->gov_phase = phase;
    gr->gov_i = 0;

    ngx_http_meter_gov_run(gr);
}


/*
 * A phase is done: the next starts at its first element. why, if not 0, is
 * what makes this refresh rebuild (1 customers, 3 the delta); the first
 * reason stays, for the debug line and the finish.
 */

static ngx_int_t
ngx_http_meter_gov_next(ngx_http_meter_gov_refresh_t *gr, ngx_uint_t phase,
    ngx_uint_t why)
{
    if (why != 0 && gr->gov_rebuilt == 0) {
        gr->gov_rebuilt = why;
    }

    gr->gov_phase = phase;
    gr->gov_i = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_gov_scan_page(ngx_http_meter_gov_refresh_t *gr)
{
    redisReply  **e;

    e = gr->gov_page;

    for ( /* void */ ; gr->gov_i + 1 < gr->gov_page_n; gr->gov_i += 2) {
        if (ngx_http_meter_gov_over(gr, 7)) {
            return NGX_AGAIN;
        }

        if (ngx_http_meter_gov_scan_field(gr, &gr->gov_scan, e[gr->gov_i],
                                          e[gr->gov_i + 1])
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        freeReplyObject(e[gr->gov_i]);
        freeReplyObject(e[gr->gov_i + 1]);
        e[gr->gov_i] = NULL;
        e[gr->gov_i + 1] = NULL;
    }

    ngx_http_meter_gov_page_free(gr);

    if (!gr->gov_last_page) {
        gr->gov_phase = NGX_HTTP_METER_GOV_SCAN;

        if (ngx_http_meter_gov_hscan(gr, MTR_GOV, sizeof(MTR_GOV) - 1,
                                     gr->gov_cursor,
                                     ngx_http_meter_gov_scan_reply)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        return NGX_DONE;
    }

    /* the scan is complete: it is the view now */
    ngx_http_meter_gov_view_free(gr, &gr->gov_view);
    gr->gov_view = gr->gov_scan;
    ngx_memzero(&gr->gov_scan, sizeof(ngx_http_meter_gov_view_t));

    gr->gov_valid = 1;
    gr->gov_kbuf = -1;

    return ngx_http_meter_gov_next(gr, NGX_HTTP_METER_GOV_ZERO, 0);
}


static void
ngx_http_meter_gov_page_free(ngx_http_meter_gov_refresh_t *gr)
{
    size_t  i;

    if (gr->gov_page == NULL) {
        return;
    }

    for (i = 0; i < gr->gov_page_n; i++) {
        if (gr->gov_page[i] != NULL) {
            freeReplyObject(gr->gov_page[i]);
        }
    }

    free(gr->gov_page);
    gr->gov_page = NULL;
    gr->gov_page_n = 0;
}


/* KH -> "CUSTOMER\tSTATUS\tREASON\tSINCE\tREVOKED"; a bad one is skipped */

static ngx_int_t
ngx_http_meter_gov_scan_field(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_gov_view_t *v, redisReply *f, redisReply *val)
{
    u_char                      *p, *end, *tab[4];
    uint64_t                    *slot;
    ngx_int_t                    since, revoked;
    ngx_http_meter_gov_ckey_t   *k;
    ngx_http_meter_gov_ccust_t  *c;

    if (f->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING
        || f->len != METER_HEX_LEN)
    {
        return NGX_OK;
    }

    p = (u_char *) val->str;
    end = p + val->len;

    if (ngx_http_meter_gov_parse(p, end, tab) != NGX_OK) {
        return NGX_OK;
    }

    k = ngx_http_meter_gov_vec_push(&v->keys);
    if (k == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_meter_hex_decode(k->key, (u_char *) f->str) != NGX_OK) {
        v->keys.nelts--;
        return NGX_OK;
    }

    if (2 * (v->custs.nelts + 1) > v->map_mask
        && ngx_http_meter_gov_map_grow(gr, v) != NGX_OK)
    {
        return NGX_ERROR;
    }

    slot = ngx_http_meter_gov_map_slot(v, p, tab[0] - p);

    if ((uint32_t) *slot == 0) {
        c = ngx_http_meter_gov_vec_push(&v->custs);
        if (c == NULL) {
            return NGX_ERROR;
        }

        c->id.len = tab[0] - p;
        c->id.data = ngx_pnalloc(v->pool, c->id.len);
        if (c->id.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(c->id.data, p, c->id.len);

        /* a customer's state is the same in all its keys: the first one */
        c->reason = ngx_http_meter_gov_reason(tab);

        since = ngx_atoi(tab[2] + 1, tab[3] - tab[2] - 1);
        c->since = (since == NGX_ERROR) ? 0 : since;
        c->khead = NGX_HTTP_METER_GOV_NIL;
        c->nlive = 0;
        c->credit = NGX_HTTP_METER_GOV_NIL;

        *slot = ((uint64_t) v->gen << 32) | v->custs.nelts;
    }

    c = &((ngx_http_meter_gov_ccust_t *) v->custs.elts)
                                                [(uint32_t) *slot - 1];

    revoked = ngx_atoi(tab[3] + 1, end - tab[3] - 1);

    k->cust = (uint32_t) *slot - 1;
    k->revoked = (revoked != NGX_ERROR && revoked > 0);
    k->dup = 0;
    k->next = c->khead;
    c->khead = v->keys.nelts - 1;

    return NGX_OK;
}


/* the four tabs of "CUSTOMER\tSTATUS\tREASON\tSINCE\tREVOKED" */

static ngx_int_t
ngx_http_meter_gov_parse(u_char *p, u_char *end, u_char **tab)
{
    ngx_uint_t  t;

    for (t = 0; t < 4; t++) {
        tab[t] = ngx_strlchr(t ? tab[t - 1] + 1 : p, end, MTR_GOV_SEP);
        if (tab[t] == NULL) {
            return NGX_DECLINED;
        }
    }

    return (tab[0] == p) ? NGX_DECLINED : NGX_OK;
}


static uint32_t
ngx_http_meter_gov_reason(u_char **tab)
{
    if (tab[1] - tab[0] - 1 != 1 || tab[0][1] != MTR_GOV_DELINQUENT) {
        return 0;
    }

    return (tab[2] - tab[1] - 1 == sizeof(MTR_REASON_CREDIT) - 1
            && ngx_strncmp(tab[1] + 1, MTR_REASON_CREDIT,
                           sizeof(MTR_REASON_CREDIT) - 1)
               == 0)
           ? NGX_HTTP_METER_REASON_CREDIT
           : NGX_HTTP_METER_REASON_OVERDUE;
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


static void
ngx_http_meter_gov_used_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                     *reply = r;
    size_t                          j;
    ngx_int_t                       n;
    ngx_http_meter_gov_refresh_t   *gr;
    ngx_http_meter_gov_ckey_t      *k;
    ngx_http_meter_gov_ccust_t     *c;
    ngx_http_meter_gov_ccredits_t  *cr;

    /* privdata is the key: the refresh is the worker's */
    gr = (ngx_http_meter_worker != NULL) ? &ngx_http_meter_worker->gov
                                         : NULL;

    if (gr == NULL) {
        return;
    }

    gr->gov_started = ngx_current_msec;
    gr->gov_busy--;

    if (gr->gov_phase != NGX_HTTP_METER_GOV_SEND) {
        return;
    }

    if (ngx_http_meter_gov_reply_ok(gr, reply, REDIS_REPLY_ARRAY) == NGX_OK
        && reply->type == REDIS_REPLY_ARRAY)
    {
        k = &((ngx_http_meter_gov_ckey_t *) gr->gov_view.keys.elts)
                                                    [(uintptr_t) privdata];
        c = &((ngx_http_meter_gov_ccust_t *) gr->gov_view.custs.elts)
                                                                 [k->cust];
        cr = &((ngx_http_meter_gov_ccredits_t *) gr->gov_view.credits.elts)
                                                                [c->credit];

        for (j = 0; j < reply->elements && j < cr->n; j++) {
            if (reply->element[j]->type != REDIS_REPLY_STRING) {
                continue;
            }

            n = ngx_atoi((u_char *) reply->element[j]->str,
                         reply->element[j]->len);

            if (n != NGX_ERROR) {
                cr->c[j].used += n;
            }
        }
    }

    if (gr->gov_busy == 0 && gr->gov_sent) {
        if (gr->gov_failed) {
            ngx_http_meter_gov_abort(gr, 0);
            return;
        }

        gr->gov_phase = NGX_HTTP_METER_GOV_CHECK;
        gr->gov_i = 0;

        ngx_http_meter_gov_run(gr);
    }
}


static void
ngx_http_meter_gov_slice_handler(ngx_event_t *ev)
{
    ngx_http_meter_gov_refresh_t  *gr = ev->data;

    ngx_http_meter_gov_run(gr);
}


/*
 * Runs phases until one waits for Redis (NGX_DONE), is out of budget
 * (NGX_AGAIN: the next slice is posted) or fails.  A phase that ends sets
 * the next one and returns NGX_OK.
 */

static void
ngx_http_meter_gov_run(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_int_t                   rc;
    ngx_http_meter_gov_zone_t  *gz;

    ngx_http_meter_gov_begin(gr);

    gz = gr->mcf->gov_zone->data;

    for ( ;; ) {
        if (ngx_exiting || ngx_quit || ngx_terminate
            || (__atomic_load_n(&gz->sh->lease, __ATOMIC_ACQUIRE) >> 32)
               != (uint64_t) ngx_pid)
        {
            /* another worker may be building into the same buffers */
            ngx_http_meter_gov_abort(gr, 1);
            break;
        }

        /* the pages of the last view go first, a slice at a time */
        if (ngx_http_meter_gov_drain(gr, 0) == NGX_AGAIN) {
            rc = NGX_AGAIN;

        } else switch (gr->gov_phase) {

        case NGX_HTTP_METER_GOV_PAGE:
            rc = ngx_http_meter_gov_scan_page(gr);
            break;

        case NGX_HTTP_METER_GOV_APPLY:
            rc = ngx_http_meter_gov_apply(gr);
            break;

        case NGX_HTTP_METER_GOV_ZERO:
            rc = ngx_http_meter_gov_zero(gr);
            break;

        case NGX_HTTP_METER_GOV_KEYS:
            rc = ngx_http_meter_gov_keys(gr);
            break;

        case NGX_HTTP_METER_GOV_RESET:
            rc = ngx_http_meter_gov_reset(gr);
            break;

        case NGX_HTTP_METER_GOV_ASSIGN:
            rc = ngx_http_meter_gov_assign(gr);
            break;

        case NGX_HTTP_METER_GOV_SEND:
            rc = ngx_http_meter_gov_send_used(gr);
            break;

        case NGX_HTTP_METER_GOV_CHECK:
            rc = ngx_http_meter_gov_check(gr);
            break;

        case NGX_HTTP_METER_GOV_CUSTS:
            rc = ngx_http_meter_gov_custs(gr);
            break;

        case NGX_HTTP_METER_GOV_SEED:
            rc = ngx_http_meter_gov_seed(gr);
            break;

        case NGX_HTTP_METER_GOV_PUBLISH:
            rc = ngx_http_meter_gov_publish(gr);
            break;

        default:
            rc = NGX_DONE;
        }

        if (rc == NGX_OK) {
            continue;
        }

        if (rc == NGX_AGAIN) {
            ngx_post_event(&gr->gov_slice, &ngx_posted_next_events);

        } else if (rc == NGX_ERROR) {
            /* what was built half way into the zone: start over */
            ngx_http_meter_gov_abort(gr,
                                     gr->gov_phase == NGX_HTTP_METER_GOV_ZERO
                                     || gr->gov_phase
                                        == NGX_HTTP_METER_GOV_KEYS
                                     || gr->gov_phase
                                        == NGX_HTTP_METER_GOV_APPLY
                                     || (gr->gov_phase
                                         >= NGX_HTTP_METER_GOV_CUSTS
                                         && gr->gov_phase
                                            <= NGX_HTTP_METER_GOV_PUBLISH));
        }

        break;
    }

    ngx_http_meter_gov_end(gr);
}


/* the key table not published: sized for the view, zeroed */

static ngx_int_t
ngx_http_meter_gov_zero(ngx_http_meter_gov_refresh_t *gr)
{
    size_t                       size, n;
    uint32_t                     nslots;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_gov_shctx_t  *sh;

    gz = gr->mcf->gov_zone->data;
    sh = gz->sh;

    for (nslots = 16; nslots < gr->gov_view.keys.nelts * 2; nslots *= 2) {
        /* load factor at most 1/2 */
    }

    size = (size_t) nslots * sizeof(ngx_http_meter_gov_key_t);

    if (gr->gov_i == 0) {
        gr->gov_spare = (sh->snap != NULL && sh->snap->keys == sh->kbuf[0])
                        ? 1 : 0;

        if (ngx_http_meter_gov_buf(gr, (void **) &sh->kbuf[gr->gov_spare],
                                   &sh->kcap[gr->gov_spare], size)
            == NULL)
        {
            return NGX_ERROR;
        }

        gr->gov_mask = nslots - 1;
        gr->gov_rebuilt = 2;
    }

    while (gr->gov_i < size) {
        if (ngx_http_meter_gov_over(gr, 0)) {
            return NGX_AGAIN;
        }

        n = ngx_min(size - gr->gov_i, NGX_HTTP_METER_GOV_ZCHUNK);
        ngx_memzero((u_char *) sh->kbuf[gr->gov_spare] + gr->gov_i, n);
        gr->gov_i += n;
    }

    return ngx_http_meter_gov_next(gr, NGX_HTTP_METER_GOV_KEYS, 0);
}


static ngx_int_t
ngx_http_meter_gov_keys(ngx_http_meter_gov_refresh_t *gr)
{
    uint32_t                     h, n;
    ngx_http_meter_gov_key_t    *table, *slot;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_gov_ckey_t   *keys, *k;
    ngx_http_meter_gov_ccust_t  *custs;

    gz = gr->mcf->gov_zone->data;
    table = gz->sh->kbuf[gr->gov_spare];
    keys = gr->gov_view.keys.elts;
    custs = gr->gov_view.custs.elts;

    if (gr->gov_i == 0) {
        gr->gov_view.nrevoked = 0;
        gr->gov_tkeys = 0;
    }

    for ( /* void */ ; gr->gov_i < gr->gov_view.keys.nelts; gr->gov_i++) {
        if (ngx_http_meter_gov_over(gr, 15)) {
            return NGX_AGAIN;
        }

        k = &keys[gr->gov_i];

        ngx_memcpy(&h, k->key, sizeof(uint32_t));

        /* at most half full: a free slot is always found */
        for (n = 0; n <= gr->gov_mask; n++) {
            slot = &table[(h + n) & gr->gov_mask];

            if (slot->cust == 0
                || ngx_memcmp(slot->key, k->key, METER_HASH_LEN) == 0)
            {
                break;
            }
        }

        if (slot->cust != 0) {
            /* HSCAN may return a field twice: the first one stands */
            k->dup = 1;
            continue;
        }

        ngx_memcpy(slot->key, k->key, METER_HASH_LEN);
        slot->cust = k->cust + 1;
        slot->revoked = k->revoked;
        gr->gov_tkeys++;

        if (k->revoked) {
            gr->gov_view.nrevoked++;

        } else {
            custs[k->cust].nlive++;
        }
    }

    gr->gov_kbuf = gr->gov_spare;

    return ngx_http_meter_gov_next(gr, NGX_HTTP_METER_GOV_RESET, 0);
}


static ngx_int_t
ngx_http_meter_gov_reset(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_http_meter_gov_ccredits_t  *cr;

    cr = gr->gov_view.credits.elts;

    for ( /* void */ ; gr->gov_i < gr->gov_view.credits.nelts; gr->gov_i++)
    {
        if (ngx_http_meter_gov_over(gr, 255)) {
            return NGX_AGAIN;
        }

        cr[gr->gov_i].n = 0;
        cr[gr->gov_i].plan[0] = '\0';
    }

    gr->gov_phase = NGX_HTTP_METER_GOV_ASSIGN;
    gr->gov_i = 0;
    gr->gov_credit = 0;

    return NGX_OK;
}


/* grants go onto their customers */

static ngx_int_t
ngx_http_meter_gov_assign(ngx_http_meter_gov_refresh_t *gr)
{
    uint64_t                       *slot;
    ngx_http_meter_gov_view_t      *v;
    ngx_http_meter_gov_grant_t     *g;
    ngx_http_meter_gov_ccust_t     *c;
    ngx_http_meter_gov_ccredit_t   *cc;
    ngx_http_meter_gov_ccredits_t  *cr;

    v = &gr->gov_view;
    g = gr->gov_grants.elts;

    for ( /* void */ ; gr->gov_i < gr->gov_grants.nelts; gr->gov_i++) {
        if (ngx_http_meter_gov_over(gr, 63)) {
            return NGX_AGAIN;
        }

        slot = ngx_http_meter_gov_map_slot(v, g[gr->gov_i].cust.data,
                                           g[gr->gov_i].cust.len);
        if ((uint32_t) *slot == 0) {
            continue;
        }

        c = &((ngx_http_meter_gov_ccust_t *) v->custs.elts)
                                                [(uint32_t) *slot - 1];

        if (c->credit == NGX_HTTP_METER_GOV_NIL) {
            cr = ngx_array_push(&v->credits);
            if (cr == NULL) {
                return NGX_ERROR;
            }

            ngx_memzero(cr, sizeof(ngx_http_meter_gov_ccredits_t));
            cr->cust = (uint32_t) *slot - 1;
            c->credit = v->credits.nelts - 1;
        }

        cr = &((ngx_http_meter_gov_ccredits_t *) v->credits.elts)[c->credit];

        if (g[gr->gov_i].plan.len) {
            ngx_memzero(cr->plan, MTR_PLAN_MAX);
            ngx_memcpy(cr->plan, g[gr->gov_i].plan.data,
                       ngx_min(g[gr->gov_i].plan.len, MTR_PLAN_MAX));
            continue;
        }

        if (cr->n == NGX_HTTP_METER_GOV_CREDITS) {
            continue;
        }

        cc = &cr->c[cr->n++];
        ngx_memzero(cc->meter, METER_NAME_MAX);
        cc->len = ngx_min(g[gr->gov_i].meter.len, METER_NAME_MAX);
        ngx_memcpy(cc->meter, g[gr->gov_i].meter.data, cc->len);
        cc->granted = g[gr->gov_i].granted;
        cc->used = 0;
        cc->q = g[gr->gov_i].q;

        gr->gov_credit = 1;
    }

    gr->gov_phase = NGX_HTTP_METER_GOV_SEND;
    gr->gov_i = 0;
    gr->gov_k = NGX_HTTP_METER_GOV_START;
    gr->gov_sent = 0;

    return NGX_OK;
}


/*
 * The lifetime usage of the keys of customers with credit, because usage
 * moves even when the version does not: HMGET mtr:used:{KH} METER...
 */

static ngx_int_t
ngx_http_meter_gov_send_used(ngx_http_meter_gov_refresh_t *gr)
{
    char                            data[METER_USED_KEY_SIZE];
    size_t                          j, len[2 + NGX_HTTP_METER_GOV_CREDITS];
    uint32_t                        next;
    const char                     *argv[2 + NGX_HTTP_METER_GOV_CREDITS];
    ngx_http_meter_gov_ckey_t      *keys, *k;
    ngx_http_meter_gov_ccust_t     *custs;
    ngx_http_meter_gov_ccredits_t  *cr;

    if (gr->gov_sent) {
        /* woken before the last reply: it resumes the refresh */
        return NGX_DONE;
    }

    keys = gr->gov_view.keys.elts;
    custs = gr->gov_view.custs.elts;

    while (gr->gov_i < gr->gov_view.credits.nelts) {
        cr = &((ngx_http_meter_gov_ccredits_t *) gr->gov_view.credits.elts)
                                                                [gr->gov_i];

        if (cr->n == 0) {
            gr->gov_i++;
            continue;
        }

        if (gr->gov_k == NGX_HTTP_METER_GOV_START) {
            gr->gov_k = custs[cr->cust].khead;
        }

        while (gr->gov_k != NGX_HTTP_METER_GOV_NIL) {
            if (ngx_http_meter_gov_over(gr, 15)) {
                return NGX_AGAIN;
            }

            k = &keys[gr->gov_k];
            next = k->next;

            if (!k->dup) {
                argv[0] = "HMGET"; len[0] = 5;
                argv[1] = data;
                len[1] = meter_fmt_used_key(data, k->key);

                for (j = 0; j < cr->n; j++) {
                    argv[2 + j] = (char *) cr->c[j].meter;
                    len[2 + j] = cr->c[j].len;
                }

                if (ngx_http_meter_gov_send(gr,
                                            ngx_http_meter_gov_used_reply,
                                            (void *) (uintptr_t) gr->gov_k,
                                            2 + cr->n, argv, len)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }
            }

            gr->gov_k = next;
        }

        gr->gov_i++;
        gr->gov_k = NGX_HTTP_METER_GOV_START;
    }

    gr->gov_sent = 1;

    if (gr->gov_busy) {
        return NGX_DONE;
    }

    return ngx_http_meter_gov_next(gr, NGX_HTTP_METER_GOV_CHECK, 0);
}


/*
 * Nothing changed (the key table published is this view's, no grant and
 * no usage moved): the published copy stays, and so does what requests
 * counted into it since; a new one would be the same, less exact.
 */

static ngx_int_t
ngx_http_meter_gov_check(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_uint_t                      j;
    ngx_http_meter_gov_zone_t      *gz;
    ngx_http_meter_gov_shctx_t     *sh;
    ngx_http_meter_gov_ccredits_t  *cr;

    gz = gr->mcf->gov_zone->data;
    sh = gz->sh;

    if (gr->gov_i == 0
        && (sh->snap == NULL || sh->snap->keys != sh->kbuf[gr->gov_kbuf]
            || sh->pubgen != gr->gov_pubgen))
    {
        goto changed;
    }

    cr = gr->gov_view.credits.elts;

    for ( /* void */ ; gr->gov_i < gr->gov_view.credits.nelts; gr->gov_i++)
    {
        if (ngx_http_meter_gov_over(gr, 255)) {
            return NGX_AGAIN;
        }

        if (cr[gr->gov_i].n != cr[gr->gov_i].npub
            || ngx_memcmp(cr[gr->gov_i].plan, cr[gr->gov_i].pubplan,
                          MTR_PLAN_MAX)
               != 0)
        {
            goto changed;
        }

        for (j = 0; j < cr[gr->gov_i].n; j++) {
            if (cr[gr->gov_i].c[j].granted != cr[gr->gov_i].pub[j].granted
                || cr[gr->gov_i].c[j].used != cr[gr->gov_i].pub[j].used
                || ngx_memcmp(&cr[gr->gov_i].c[j].q, &cr[gr->gov_i].pub[j].q,
                              sizeof(ngx_http_meter_gov_quota_t))
                   != 0
                || ngx_memcmp(cr[gr->gov_i].c[j].meter,
                              cr[gr->gov_i].pub[j].meter, METER_NAME_MAX)
                   != 0)
            {
                goto changed;
            }
        }
    }

    __atomic_store_n(&sh->refreshed, (uint64_t) ngx_time(),
                     __ATOMIC_RELAXED);

    ngx_http_meter_gov_finish(gr, gr->gov_rebuilt == 3 ? "delta" : "none");

    return NGX_DONE;

changed:

    return ngx_http_meter_gov_next(gr, NGX_HTTP_METER_GOV_CUSTS, 1);
}


static ngx_int_t
ngx_http_meter_gov_custs(ngx_http_meter_gov_refresh_t *gr)
{
    size_t                          size;
    time_t                          now;
    ngx_uint_t                      j, n, blocked;
    ngx_http_meter_gov_cust_t      *c;
    ngx_http_meter_gov_snap_t      *h;
    ngx_http_meter_gov_zone_t      *gz;
    ngx_http_meter_gov_ccust_t     *cc;
    ngx_http_meter_gov_shctx_t     *sh;
    ngx_http_meter_gov_ccredits_t  *cr;

    gz = gr->mcf->gov_zone->data;
    sh = gz->sh;
    n = gr->gov_view.custs.nelts;

    if (gr->gov_i == 0) {
        gr->gov_cspare = (sh->snap != NULL && sh->snap->custs == sh->cbuf[0])
                         ? 1 : 0;

        /* room for customers a delta adds in place */
        size = (n + 1) * sizeof(ngx_http_meter_gov_cust_t);

        if (sh->ccap[gr->gov_cspare] < size) {
            size += (n / 16 + 16) * sizeof(ngx_http_meter_gov_cust_t);
        }

        if (ngx_http_meter_gov_buf(gr, (void **) &sh->cbuf[gr->gov_cspare],
                                   &sh->ccap[gr->gov_cspare], size)
            == NULL)
        {
            return NGX_ERROR;
        }

        gr->gov_delinquent = 0;
        gr->gov_blocked = gr->gov_view.nrevoked;
    }

    now = ngx_time();

    for ( /* void */ ; gr->gov_i < n; gr->gov_i++) {
        if (ngx_http_meter_gov_over(gr, 63)) {
            return NGX_AGAIN;
        }

        cc = &((ngx_http_meter_gov_ccust_t *) gr->gov_view.custs.elts)
                                                                [gr->gov_i];
        c = &sh->cbuf[gr->gov_cspare][gr->gov_i];

        /* NUL padded like a table entry's name */
        ngx_memzero(c, sizeof(ngx_http_meter_gov_cust_t));

        c->reason = cc->reason;
        ngx_memcpy(c->id, cc->id.data, ngx_min(cc->id.len, MTR_CUSTOMER_MAX));

        /* dated ahead: from now on (and since + grace cannot overflow) */
        c->since = ngx_min(cc->since, (int64_t) now);

        blocked = (c->reason != 0);

        if (cc->credit != NGX_HTTP_METER_GOV_NIL) {
            cr = &((ngx_http_meter_gov_ccredits_t *)
                                    gr->gov_view.credits.elts)[cc->credit];

            c->ncredits = cr->n;

            for (j = 0; j < cr->n; j++) {
                ngx_memcpy(c->credits[j].meter, cr->c[j].meter,
                           METER_NAME_MAX);
                c->credits[j].remaining = cr->c[j].granted - cr->c[j].used;
                c->credits[j].q = cr->c[j].q;

                if (c->credits[j].remaining <= 0 && cr->c[j].q.window == 0) {
                    blocked = 1;
                }

                cr->pub[j] = cr->c[j];
            }

            cr->npub = cr->n;
            ngx_memcpy(c->plan, cr->plan, MTR_PLAN_MAX);
            ngx_memcpy(cr->pubplan, cr->plan, MTR_PLAN_MAX);
        }

        if (c->reason) {
            gr->gov_delinquent++;
        }

        if (blocked) {
            gr->gov_blocked += cc->nlive;
        }
    }

    h = (sh->snap == &sh->hdr[0]) ? &sh->hdr[1] : &sh->hdr[0];

    h->version = gr->gov_view.version;
    h->mask = gr->gov_mask;
    h->ncust = n;
    h->keys = sh->kbuf[gr->gov_kbuf];
    h->custs = sh->cbuf[gr->gov_cspare];

    gr->gov_phase = gr->gov_credit ? NGX_HTTP_METER_GOV_SEED
                                   : NGX_HTTP_METER_GOV_PUBLISH;
    gr->gov_i = 0;
    gr->gov_z = 0;

    return NGX_OK;
}


/*
 * The balance read from Redis lacks what this node counted and has not
 * flushed yet: start the local count with it.  What is left out is what
 * Redis confirmed between the read and the publish, and what was counted
 * into a slot after this scan passed it: both make the node allow more,
 * never less, until the next refresh.
 */

static ngx_int_t
ngx_http_meter_gov_seed(ngx_http_meter_gov_refresh_t *gr)
{
    uint32_t                     j;
    meter_entry_t               *e;
    meter_table_t               *t;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_gov_key_t    *k;
    ngx_http_meter_gov_cust_t   *c;
    ngx_http_meter_gov_snap_t   *h;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_zone_ctx_t   *ctx;

    gz = gr->mcf->gov_zone->data;
    h = (gz->sh->snap == &gz->sh->hdr[0]) ? &gz->sh->hdr[1]
                                          : &gz->sh->hdr[0];
    zones = gr->mcf->zones.elts;

    for ( /* void */ ; gr->gov_z < gr->mcf->zones.nelts; gr->gov_z++) {
        ctx = zones[gr->gov_z]->data;

        if (!ctx->governance) {
            continue;
        }

        t = &ctx->sh->table;

        for ( /* void */ ; gr->gov_i < t->nslots; gr->gov_i++) {
            if (ngx_http_meter_gov_over(gr, 255)) {
                return NGX_AGAIN;
            }

            e = &t->slots[gr->gov_i];

            if (__atomic_load_n(&e->state, __ATOMIC_ACQUIRE)
                != METER_SLOT_LIVE)
            {
                continue;
            }

            k = ngx_http_meter_gov_find(h, e->key);
            if (k == NULL) {
                continue;
            }

            c = &h->custs[k->cust - 1];

            for (j = 0; j < c->ncredits; j++) {
                if (ngx_strncmp(c->credits[j].meter, e->meter,
                                METER_NAME_MAX)
                    == 0)
                {
                    c->credits[j].local += (int64_t) meter_entry_pending(e);
                }
            }
        }

        gr->gov_i = 0;
    }

    gr->gov_phase = NGX_HTTP_METER_GOV_PUBLISH;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_gov_publish(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_http_meter_gov_snap_t   *h;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_gov_shctx_t  *sh;

    gz = gr->mcf->gov_zone->data;
    sh = gz->sh;
    h = (sh->snap == &sh->hdr[0]) ? &sh->hdr[1] : &sh->hdr[0];

    __atomic_store_n(&sh->snap, h, __ATOMIC_RELEASE);
    gr->gov_pubgen = __atomic_add_fetch(&sh->pubgen, 1, __ATOMIC_ACQ_REL);

    __atomic_store_n(&sh->refreshed, (uint64_t) ngx_time(),
                     __ATOMIC_RELAXED);
    __atomic_store_n(&sh->delinquent, (uint64_t) gr->gov_delinquent,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&sh->blocked, (uint64_t) gr->gov_blocked,
                     __ATOMIC_RELAXED);

    ngx_http_meter_gov_finish(gr, gr->gov_rebuilt == 2 ? "keys"
                                  : gr->gov_rebuilt == 3 ? "delta+customers"
                                  : "customers");

    return NGX_DONE;
}


/* a buffer of the governance zone that holds size bytes; NULL: full */

static void *
ngx_http_meter_gov_buf(ngx_http_meter_gov_refresh_t *gr, void **buf,
    size_t *cap, size_t size)
{
    void                       *p;
    ngx_http_meter_gov_zone_t  *gz;

    if (*cap >= size) {
        return *buf;
    }

    gz = gr->mcf->gov_zone->data;

    ngx_shmtx_lock(&gz->shpool->mutex);

    if (*buf != NULL) {
        ngx_slab_free_locked(gz->shpool, *buf);
        *buf = NULL;
        *cap = 0;
    }

    p = ngx_slab_alloc_locked(gz->shpool, size);

    ngx_shmtx_unlock(&gz->shpool->mutex);

    if (p == NULL) {
        ngx_log_error(NGX_LOG_ALERT, gr->log, 0,
                      "meter_governance_size is too small for the "
                      "governance state of %ui keys and %ui customers "
                      "(a table of %uz bytes, two of each); the last copy "
                      "stays in force: raise it",
                      gr->gov_view.keys.nelts, gr->gov_view.custs.nelts,
                      size);
        return NULL;
    }

    *buf = p;
    *cap = size;

    return p;
}


static void
ngx_http_meter_gov_finish(ngx_http_meter_gov_refresh_t *gr, const char *how)
{
    /* the slice running now counts: it is accounted here */
    if (gr->gov_depth) {
        ngx_http_meter_gov_account(gr);
        gr->gov_slice_start = ngx_http_meter_gov_usec(CLOCK_MONOTONIC);
        gr->gov_slice_cpu = ngx_http_meter_gov_usec(CLOCK_THREAD_CPUTIME_ID);
    }

    gr->gov_phase = NGX_HTTP_METER_GOV_IDLE;

    ngx_log_debug8(NGX_LOG_DEBUG_CORE, gr->log, 0,
                   "meter: governance refresh: keys=%ui customers=%ui "
                   "rebuilt=%s slices=%ui longest_us=%uL longest_cpu_us=%uL "
                   "total_us=%uL wall_ms=%M",
                   gr->gov_view.keys.nelts, gr->gov_view.custs.nelts, how,
                   gr->gov_slices, gr->gov_longest, gr->gov_longest_cpu,
                   gr->gov_total, ngx_current_msec - gr->gov_begun);
}


/* the last copy stays in force; invalidate: what was built is not sure */

static void
ngx_http_meter_gov_abort(ngx_http_meter_gov_refresh_t *gr,
    ngx_uint_t invalidate)
{
    if (gr->gov_slice.posted) {
        ngx_delete_posted_event(&gr->gov_slice);
    }

    gr->gov_failed = 1;

    ngx_http_meter_gov_page_free(gr);

    if (invalidate) {
        gr->gov_valid = 0;
        gr->gov_kbuf = -1;
    }

    ngx_http_meter_gov_view_free(gr, &gr->gov_scan);

    if (gr->gov_phase != NGX_HTTP_METER_GOV_IDLE) {
        ngx_http_meter_gov_finish(gr, "failed");
    }
}


static uint64_t
ngx_http_meter_gov_usec(clockid_t clock)
{
    struct timespec  ts;

    (void) clock_gettime(clock, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}


/*
 * A slice: from an event handler's start to its end, nested calls in it.
 * Wall time is what a request waits; CPU time leaves out the preemption
 * of a busy machine.
 */

static void
ngx_http_meter_gov_begin(ngx_http_meter_gov_refresh_t *gr)
{
    if (gr->gov_depth++ == 0) {
        gr->gov_slice_start = ngx_http_meter_gov_usec(CLOCK_MONOTONIC);
        gr->gov_slice_cpu = ngx_http_meter_gov_usec(CLOCK_THREAD_CPUTIME_ID);
        gr->gov_budget_n = 0;
        gr->gov_slice_phase = gr->gov_phase;
    }
}


static void
ngx_http_meter_gov_end(ngx_http_meter_gov_refresh_t *gr)
{
    if (--gr->gov_depth == 0) {
        ngx_http_meter_gov_account(gr);
    }
}


static void
ngx_http_meter_gov_account(ngx_http_meter_gov_refresh_t *gr)
{
    uint64_t  d, cpu;

    d = ngx_http_meter_gov_usec(CLOCK_MONOTONIC) - gr->gov_slice_start;
    cpu = ngx_http_meter_gov_usec(CLOCK_THREAD_CPUTIME_ID) - gr->gov_slice_cpu;

    gr->gov_slices++;
    gr->gov_total += cpu;
    gr->gov_longest = ngx_max(gr->gov_longest, d);
    gr->gov_longest_cpu = ngx_max(gr->gov_longest_cpu, cpu);

    if (d > 1000) {
        ngx_log_debug4(NGX_LOG_DEBUG_CORE, gr->log, 0,
                       "meter: governance refresh: a slice of phase %ui "
                       "held %uL us (%uL us CPU), from phase %ui",
                       gr->gov_phase, d, cpu, gr->gov_slice_phase);
    }
}


/* the slice has had its budget; the clock is read every (every + 1) calls */

static ngx_uint_t
ngx_http_meter_gov_over(ngx_http_meter_gov_refresh_t *gr, ngx_uint_t every)
{
    if ((gr->gov_budget_n++ & every) != every) {
        return 0;
    }

    return ngx_http_meter_gov_usec(CLOCK_MONOTONIC) - gr->gov_slice_start
           >= NGX_HTTP_METER_GOV_BUDGET;
}
