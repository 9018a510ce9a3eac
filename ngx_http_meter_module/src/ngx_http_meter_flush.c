
/*
 * Copyright (C) nginx-meter authors
 *
 * The flush: from the tick of every worker, the one that holds a zone's
 * lease sends the zone's changed counters to Redis as absolute values
 * through a max-only script (docs/redis-schema.md), in slices so that a
 * large zone never stalls the event loop; the exit flushes once more,
 * blocking.  A lost reply is retried without double counting.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>

#include "ngx_http_meter_module.h"


typedef ngx_int_t (*ngx_http_meter_emit_pt)(void *data, int argc,
    const char **argv, const size_t *len, ngx_int_t item);


/* the blocking flush at exit: which reply belongs to which item */
typedef struct {
    redisContext                *rc;
    ngx_uint_t                   n;
    ngx_int_t                    items[3 * NGX_HTTP_METER_BATCH];
} ngx_http_meter_sync_t;


static void ngx_http_meter_flush_ready(void *data);
static void ngx_http_meter_flush_refused(void *data);
static void ngx_http_meter_flush_down(void *data);
static void ngx_http_meter_info_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_tick(ngx_event_t *ev);
static void ngx_http_meter_slice_handler(ngx_event_t *ev);
static void ngx_http_meter_next_slice(ngx_http_meter_flush_t *fl);
static ngx_int_t ngx_http_meter_send_batch(ngx_http_meter_flush_t *fl,
    ngx_http_meter_zone_ctx_t *ctx);
static ngx_int_t ngx_http_meter_batch_cmds(meter_batch_t *b, uint64_t epoch,
    const char *sha, ngx_http_meter_emit_pt emit, void *data);
static ngx_int_t ngx_http_meter_emit_async(void *data, int argc,
    const char **argv, const size_t *len, ngx_int_t item);
static ngx_int_t ngx_http_meter_emit_sync(void *data, int argc,
    const char **argv, const size_t *len, ngx_int_t item);
static void ngx_http_meter_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_confirm(ngx_http_meter_shctx_t *sh,
    meter_batch_item_t *it);
static void ngx_http_meter_batch_done(ngx_http_meter_flush_t *fl);
static void ngx_http_meter_zone_done(ngx_http_meter_flush_t *fl,
    ngx_http_meter_zone_ctx_t *ctx);
static void ngx_http_meter_final_flush(ngx_http_meter_main_conf_t *mcf,
    ngx_log_t *log);


ngx_int_t
ngx_http_meter_flush_init(ngx_http_meter_flush_t *fl,
    ngx_http_meter_redis_t *rd)
{
    uint8_t  sha[20];

    fl->mcf = rd->mcf;
    fl->log = rd->log;
    fl->redis = rd;
    fl->batch.items = fl->items;
    fl->batch.cap = NGX_HTTP_METER_BATCH;

    ngx_http_meter_init_event(&fl->tick, ngx_http_meter_tick, fl, fl->log);
    ngx_http_meter_init_event(&fl->slice, ngx_http_meter_slice_handler, fl,
                              fl->log);

    /* the script's SHA-1 is its name in Redis: known before SCRIPT LOAD
     * answers, so EVALSHA can follow it in the same pipeline */
    if (EVP_Digest(meter_script_max, ngx_strlen(meter_script_max), sha,
                   NULL, EVP_sha1(), NULL)
        != 1)
    {
        return NGX_ERROR;
    }

    meter_hex(sha, 20, fl->script_sha);

    ngx_http_meter_redis_hook(rd, ngx_http_meter_flush_ready,
                              ngx_http_meter_flush_refused,
                              ngx_http_meter_flush_down, fl);

    return NGX_OK;
}


/* the last flush, then the zones are free for the other workers */

void
ngx_http_meter_flush_exit(ngx_http_meter_flush_t *fl, ngx_log_t *log)
{
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    ngx_http_meter_final_flush(fl->mcf, log);

    zones = fl->mcf->zones.elts;

    for (z = 0; z < fl->mcf->zones.nelts; z++) {
        ctx = zones[z]->data;
        ngx_http_meter_lease_release(&ctx->sh->lease);
    }
}


/* a new connection: it may be to a new Redis, and has no script loaded */

static void
ngx_http_meter_flush_ready(void *data)
{
    ngx_http_meter_flush_t  *fl = data;

    size_t                   len[2];
    const char              *argv[2];

    /* queued before any EVALSHA, so the script exists when they run */
    fl->reload_script = 1;

    argv[0] = "INFO"; len[0] = 4;
    argv[1] = "server"; len[1] = 6;
    (void) redisAsyncCommandArgv(fl->redis->ac, ngx_http_meter_info_reply,
                                 fl, 2, argv, len);
}


static void
ngx_http_meter_flush_refused(void *data)
{
    ngx_http_meter_flush_t  *fl = data;

    fl->failed = 1;
}


static void
ngx_http_meter_flush_down(void *data)
{
    ngx_http_meter_flush_t  *fl = data;

    fl->pass = 0;

    if (fl->outstanding) {
        fl->outstanding = 0;
        fl->failed = 1;
    }
}


void
ngx_http_meter_announce(ngx_http_meter_flush_t  *fl)
{
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    zones = fl->mcf->zones.elts;

    for (z = 0; z < fl->mcf->zones.nelts; z++) {
        ctx = zones[z]->data;

        if (meter_table_announce(&ctx->sh->table, (uint32_t) ngx_pid) != 0
            && !fl->qs_logged)
        {
            fl->qs_logged = 1;
            ngx_log_error(NGX_LOG_WARN, fl->log, 0,
                          "meter_zone \"%V\": more than %d processes, "
                          "freed slots are reused after %d s only",
                          &zones[z]->shm.name, METER_QS_MAX,
                          METER_TOMB_GRACE);
        }
    }
}


/* compares the server's run_id with the one each zone last flushed to */

static void
ngx_http_meter_info_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                  *reply = r;
    u_char                      *p, *end;
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_shctx_t      *sh;
    ngx_http_meter_flush_t      *fl = privdata;

    if (reply == NULL || reply->type != REDIS_REPLY_STRING) {
        return;
    }

    p = (u_char *) ngx_strnstr((u_char *) reply->str, "run_id:",
                               reply->len);
    if (p == NULL) {
        return;
    }

    p += sizeof("run_id:") - 1;
    end = (u_char *) reply->str + reply->len;

    if (end - p < 40) {
        return;
    }

    zones = fl->mcf->zones.elts;

    for (z = 0; z < fl->mcf->zones.nelts; z++) {
        sh = ((ngx_http_meter_zone_ctx_t *) zones[z]->data)->sh;

        if (!ngx_trylock(&sh->run_id_lock)) {
            continue;               /* another worker is at it */
        }

        if (ngx_memcmp(sh->run_id, p, 40) != 0) {
            if (sh->run_id[0] != '\0') {
                ngx_log_error(NGX_LOG_NOTICE, fl->log, 0,
                              "meter: redis was restarted or replaced; "
                              "rewriting every counter of meter_zone "
                              "\"%V\"", &zones[z]->shm.name);
                __atomic_store_n(&sh->resync, 1, __ATOMIC_RELEASE);
            }

            ngx_memcpy(sh->run_id, p, 40);
        }

        ngx_unlock(&sh->run_id_lock);
    }
}


static void
ngx_http_meter_tick(ngx_event_t *ev)
{
    ngx_http_meter_flush_t   *fl = ev->data;

    /* outside any add: the slots this worker saw evicted may be reused */
    ngx_http_meter_announce(fl);

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        if (!ngx_terminate) {
            /* still serving its last requests: keep announcing */
            ngx_add_timer(&fl->tick, fl->mcf->flush_interval);
        }

        return;
    }

    if (fl->redis->state == NGX_HTTP_METER_REDIS_DOWN) {
        if ((ngx_msec_int_t) (ngx_current_msec - fl->redis->next_connect)
            >= 0)
        {
            ngx_http_meter_redis_connect(fl->redis);
        }

    } else if (fl->redis->state == NGX_HTTP_METER_REDIS_READY && !fl->pass) {
        fl->pass = 1;
        fl->zone = 0;
        fl->zone_start = ngx_current_msec;
        fl->batch.cursor = 0;
        fl->batch.wrapped = 0;

        fl->zone_mode = NGX_HTTP_METER_MODE_UNSET;
        fl->passes++;

        ngx_http_meter_next_slice(fl);
    }

    ngx_add_timer(&fl->tick, fl->mcf->flush_interval);
}


static void
ngx_http_meter_slice_handler(ngx_event_t *ev)
{
    ngx_http_meter_flush_t   *fl = ev->data;

    if (fl->pass && fl->outstanding == 0) {
        ngx_http_meter_next_slice(fl);
    }
}


/*
 * Sends the next slice of dirty counters, or moves on to the next zone.
 * A slice scans a bounded number of slots, so a large zone never stalls
 * the event loop: the scan goes on from a posted event.
 */

static void
ngx_http_meter_next_slice(ngx_http_meter_flush_t  *fl)
{
    time_t                       now;
    uint32_t                     from;
    ngx_int_t                    rc;
    ngx_uint_t                   n;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    zones = fl->mcf->zones.elts;

    while (fl->zone < fl->mcf->zones.nelts) {

        if (fl->redis->state != NGX_HTTP_METER_REDIS_READY) {
            fl->pass = 0;
            return;
        }

        ctx = zones[fl->zone]->data;

        rc = ngx_http_meter_lease(&ctx->sh->lease, fl->mcf->flush_interval);

        if (rc == NGX_DECLINED) {
            fl->zone++;
            fl->zone_mode = NGX_HTTP_METER_MODE_UNSET;
            fl->zone_start = ngx_current_msec;
            fl->batch.cursor = 0;
            fl->batch.wrapped = 0;
            continue;
        }

        if (fl->zone_mode == NGX_HTTP_METER_MODE_UNSET) {
            now = ngx_time();
            fl->zone_hour = meter_hour(now);
            meter_table_quiesce(&ctx->sh->table, (uint32_t) now);

            /* now and then, after a takeover, and when the hour changed
             * (to free the last hour's slots), look at every slot */
            fl->zone_mode = (rc == NGX_DONE
                            || (fl->passes - 1)
                               % ngx_max(NGX_HTTP_METER_FULL_EVERY
                                         / fl->mcf->flush_interval, 1)
                               == 0
                            || __atomic_load_n(&ctx->sh->table.swept_hour,
                                               __ATOMIC_ACQUIRE)
                               < fl->zone_hour)
                           ? NGX_HTTP_METER_MODE_FULL
                           : NGX_HTTP_METER_MODE_DIRTY;

            if (__atomic_load_n(&ctx->sh->resync, __ATOMIC_ACQUIRE)) {
                fl->zone_mode = NGX_HTTP_METER_MODE_RESYNC;
            }

            fl->batch.all = (fl->zone_mode == NGX_HTTP_METER_MODE_RESYNC);
        }

        if (fl->zone_mode == NGX_HTTP_METER_MODE_DIRTY) {
            n = meter_batch_collect_dirty(&ctx->sh->table, &fl->batch,
                                          NGX_HTTP_METER_SCAN_WORDS);

        } else {
            from = fl->batch.cursor;

            n = meter_batch_collect(&ctx->sh->table, &fl->batch,
                                    NGX_HTTP_METER_SCAN);

            /* evict what this slice saw flushed: no stall on a big zone */
            now = ngx_time();
            (void) meter_table_sweep_range(&ctx->sh->table, from,
                                           fl->batch.wrapped
                                           ? ctx->sh->table.nslots
                                           : fl->batch.cursor,
                                           meter_hour(now), (uint32_t) now);
        }

        if (n > 0) {
            if (ngx_http_meter_send_batch(fl, ctx) == NGX_OK) {
                return;
            }

            fl->pass = 0;
            return;
        }

        if (fl->batch.wrapped) {
            ngx_http_meter_zone_done(fl, ctx);
            continue;
        }

        ngx_post_event(&fl->slice, &ngx_posted_events);
        return;
    }

    fl->pass = 0;
}


/*
 * The commands of one batch (docs/redis-schema.md), for the async flush and
 * the blocking one at exit alike: per hour, the hour and key indexes first
 * (one SADD with every key of the batch), then one max-only script call per
 * counter.  emit() gets the item index for a script call, -1 otherwise.
 */

static ngx_int_t
ngx_http_meter_batch_cmds(meter_batch_t *b, uint64_t epoch, const char *sha,
    ngx_http_meter_emit_pt emit, void *data)
{
    static char          hex[NGX_HTTP_METER_BATCH][METER_HEX_LEN + 1];
    static size_t        slen[2 + NGX_HTTP_METER_BATCH];
    static const char   *sargv[2 + NGX_HTTP_METER_BATCH];

    char                 key[METER_DATA_KEY_SIZE], idx[METER_IDX_KEY_SIZE];
    char                 field[METER_FIELD_SIZE], value[24];
    char                 hour[METER_HOUR_LEN + 1], start[24];
    char                 used[METER_USED_KEY_SIZE];
    size_t               len[7];
    ngx_uint_t           i, j, n;
    const char          *argv[7];
    meter_batch_item_t  *it;

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        for (j = 0; j < i; j++) {
            if (b->items[j].hour == it->hour) {
                break;
            }
        }

        if (j < i) {
            continue;           /* this hour's indexes are sent already */
        }

        argv[0] = "ZADD"; len[0] = 4;
        argv[1] = MTR_HOURS; len[1] = sizeof(MTR_HOURS) - 1;
        argv[2] = "NX"; len[2] = 2;
        argv[3] = start;
        len[3] = meter_fmt_u64(start, meter_hour_start(it->hour));
        argv[4] = hour; len[4] = meter_hour_format(it->hour, hour);

        if (emit(data, 5, argv, len, -1) != NGX_OK) {
            return NGX_ERROR;
        }

        sargv[0] = "SADD"; slen[0] = 4;
        sargv[1] = idx; slen[1] = meter_fmt_idx_key(idx, it->hour);
        n = 2;

        for (j = i; j < b->n; j++) {
            if (b->items[j].hour == it->hour) {
                meter_hex(b->items[j].e->key, METER_HASH_LEN, hex[j]);
                sargv[n] = hex[j];
                slen[n++] = METER_HEX_LEN;
            }
        }

        if (emit(data, (int) n, sargv, slen, -1) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        if (sha != NULL) {
            argv[0] = "EVALSHA"; len[0] = 7;
            argv[1] = sha; len[1] = 40;

        } else {
            /* a connection that loaded no script */
            argv[0] = "EVAL"; len[0] = 4;
            argv[1] = meter_script_max; len[1] = ngx_strlen(meter_script_max);
        }

        argv[2] = "2"; len[2] = 1;
        argv[3] = key; len[3] = meter_fmt_data_key(key, it->e->key, it->hour);
        argv[4] = used; len[4] = meter_fmt_used_key(used, it->e->key);
        argv[5] = field;
        len[5] = meter_fmt_field(field, it->e->meter, epoch, it->gen);
        argv[6] = value; len[6] = meter_fmt_u64(value, it->value);

        if (emit(data, 7, argv, len, (ngx_int_t) i) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_emit_async(void *data, int argc, const char **argv,
    const size_t *len, ngx_int_t item)
{
    ngx_http_meter_flush_t   *fl = data;

    if (redisAsyncCommandArgv(fl->redis->ac,
                              item >= 0 ? ngx_http_meter_reply : NULL,
                              (void *) (uintptr_t) item, argc, argv, len)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    if (item >= 0) {
        fl->outstanding++;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_emit_sync(void *data, int argc, const char **argv,
    const size_t *len, ngx_int_t item)
{
    ngx_http_meter_sync_t  *sc = data;

    if (redisAppendCommandArgv(sc->rc, argc, argv, len) != REDIS_OK) {
        return NGX_ERROR;
    }

    sc->items[sc->n++] = item;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_send_batch(ngx_http_meter_flush_t  *fl,
    ngx_http_meter_zone_ctx_t *ctx)
{
    size_t       len[3];
    const char  *argv[3];

    fl->outstanding = 0;
    fl->failed = 0;

    if (fl->reload_script) {
        argv[0] = "SCRIPT"; len[0] = 6;
        argv[1] = "LOAD"; len[1] = 4;
        argv[2] = meter_script_max; len[2] = ngx_strlen(meter_script_max);

        if (redisAsyncCommandArgv(fl->redis->ac,
                                  ngx_http_meter_redis_setup_reply,
                                  fl->redis, 3, argv, len)
            != REDIS_OK)
        {
            ngx_http_meter_redis_fail(fl->redis, "send",
                                      fl->redis->ac->errstr);
            return NGX_ERROR;
        }

        fl->reload_script = 0;
    }

    if (ngx_http_meter_batch_cmds(&fl->batch, ctx->sh->table.epoch,
                                  fl->script_sha, ngx_http_meter_emit_async,
                                  fl)
        != NGX_OK)
    {
        goto failed;
    }

    ngx_http_meter_redis_wait(fl->redis);

    return NGX_OK;

failed:

    /* callbacks already queued will be called with no reply */
    meter_batch_remark(&ctx->sh->table, &fl->batch);
    fl->failed = 1;
    ngx_http_meter_redis_fail(fl->redis, "send",
                              fl->redis->ac ? fl->redis->ac->errstr : "");

    return NGX_ERROR;
}


static void
ngx_http_meter_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    redisReply               *reply = r;
    ngx_shm_zone_t          **zones;
    ngx_http_meter_flush_t   *fl;
    ngx_http_meter_shctx_t   *sh;

    /* privdata is the item: the flush is the worker's */
    fl = (ngx_http_meter_worker != NULL) ? &ngx_http_meter_worker->flush
                                         : NULL;

    if (fl == NULL || fl->outstanding == 0) {
        return;
    }

    if (reply == NULL) {
        fl->failed = 1;

    } else if (reply->type == REDIS_REPLY_ERROR) {
        if (!fl->failed) {
            ngx_log_error(NGX_LOG_ERR, fl->log, 0,
                          "meter: redis refused a flush: %*s",
                          (int) ngx_min(reply->len, 256), reply->str);
        }

        if (ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            fl->reload_script = 1;
        }

        fl->failed = 1;

    } else {
        /* acknowledged: only this item's value is known to be in Redis */
        zones = fl->mcf->zones.elts;
        sh = ((ngx_http_meter_zone_ctx_t *) zones[fl->zone]->data)->sh;

        ngx_http_meter_confirm(sh, &fl->batch.items[(uintptr_t) privdata]);
    }

    if (--fl->outstanding == 0) {
        ngx_http_meter_batch_done(fl);
    }
}


/* raises the slot's flushed mark and counts what Redis newly holds */

static void
ngx_http_meter_confirm(ngx_http_meter_shctx_t *sh, meter_batch_item_t *it)
{
    uint64_t  before;

    before = __atomic_load_n(&it->e->flushed, __ATOMIC_ACQUIRE);

    meter_batch_confirm(it);

    if (it->value > before && it->e->gen == it->gen) {
        (void) __atomic_fetch_add(&sh->flushed_total, it->value - before,
                                  __ATOMIC_RELAXED);
    }
}


static void
ngx_http_meter_batch_done(ngx_http_meter_flush_t  *fl)
{
    time_t                       now;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    ngx_http_meter_redis_answered(fl->redis);

    zones = fl->mcf->zones.elts;
    ctx = zones[fl->zone]->data;

    /* what Redis now holds of past hours frees its slot, in every pass */
    now = ngx_time();
    (void) meter_batch_reclaim(&ctx->sh->table, &fl->batch, meter_hour(now),
                               (uint32_t) now);

    if (fl->failed) {
        /* unconfirmed values stay pending and go with the next pass */
        meter_batch_remark(&ctx->sh->table, &fl->batch);
        (void) __atomic_fetch_add(&ctx->sh->flush_errors, 1,
                                  __ATOMIC_RELAXED);
        fl->pass = 0;
        return;
    }

    if (fl->batch.wrapped) {
        ngx_http_meter_zone_done(fl, ctx);
    }

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        fl->pass = 0;
        return;
    }

    /*
     * A pause between sent batches spreads a pass over the interval, so
     * that Redis's work (on the same machine, often) does not come as one
     * burst that competes with the requests.
     */
    ngx_add_timer(&fl->slice, NGX_HTTP_METER_SLICE_PAUSE);
}


static void
ngx_http_meter_zone_done(ngx_http_meter_flush_t  *fl,
    ngx_http_meter_zone_ctx_t *ctx)
{
    if (fl->zone_mode == NGX_HTTP_METER_MODE_RESYNC) {
        /* every counter reached this Redis */
        __atomic_store_n(&ctx->sh->resync, 0, __ATOMIC_RELEASE);
        fl->batch.all = 0;
    }

    if (fl->zone_mode >= NGX_HTTP_METER_MODE_FULL) {
        /* every slot of an hour before zone_hour was looked at */
        __atomic_store_n(&ctx->sh->table.swept_hour, fl->zone_hour,
                         __ATOMIC_RELEASE);
    }

    (void) __atomic_fetch_add(&ctx->sh->flushes, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&ctx->sh->last_flush_ms,
                     (uint64_t) (ngx_current_msec - fl->zone_start),
                     __ATOMIC_RELAXED);

    fl->zone++;
    fl->zone_mode = NGX_HTTP_METER_MODE_UNSET;
    fl->zone_start = ngx_current_msec;
    fl->batch.cursor = 0;
    fl->batch.wrapped = 0;
}


/*
 * On exit nothing drives the event loop any more: one last blocking
 * pipeline with the same commands and the same max-only script.  What it
 * cannot send stays in the zone, which outlives a reload.
 */

static void
ngx_http_meter_final_flush(ngx_http_meter_main_conf_t *mcf, ngx_log_t *log)
{
    char                        db[24];
    size_t                      len[2][2];
    ngx_uint_t                  z, i, n, sent, ok;
    const char                 *argv[2][2];
    redisReply                 *reply;
    struct timeval              tv;
    redisContext               *rc;
    meter_batch_t               batch;
    meter_batch_item_t         *items, *it;
    ngx_http_meter_sync_t       sc;
    ngx_shm_zone_t            **zones;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_zone_ctx_t  *ctx;

    tv.tv_sec = mcf->redis_timeout / 1000;
    tv.tv_usec = (mcf->redis_timeout % 1000) * 1000;

    if (mcf->redis_path.len) {
        rc = redisConnectUnixWithTimeout((char *) mcf->redis_path.data, tv);

    } else {
        rc = redisConnectWithTimeout((char *) mcf->redis_host.data,
                                     (int) mcf->redis_port, tv);
    }

    if (rc == NULL || rc->err) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "meter: final flush: redis unreachable (%s); counters "
                      "stay in shared memory",
                      rc ? rc->errstr : "out of memory");
        goto done;
    }

    (void) redisSetTimeout(rc, tv);

    n = ngx_http_meter_redis_setup_cmds(mcf, argv, len, db);

    for (i = 0; i < n; i++) {
        redisAppendCommandArgv(rc, 2, argv[i], len[i]);
    }

    for (i = 0; i < n; i++) {
        if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
            goto done;
        }

        ok = (reply->type != REDIS_REPLY_ERROR);
        freeReplyObject(reply);

        if (!ok) {
            ngx_log_error(NGX_LOG_WARN, log, 0,
                          "meter: final flush: redis refused AUTH/SELECT");
            goto done;
        }
    }

    items = ngx_alloc(sizeof(meter_batch_item_t) * NGX_HTTP_METER_BATCH,
                      log);
    if (items == NULL) {
        goto done;
    }

    zones = mcf->zones.elts;

    for (z = 0; z < mcf->zones.nelts; z++) {
        ctx = zones[z]->data;
        sh = ctx->sh;

        ngx_memzero(&batch, sizeof(meter_batch_t));
        batch.items = items;
        batch.cap = NGX_HTTP_METER_BATCH;

        while (!batch.wrapped) {
            if (meter_batch_collect(&sh->table, &batch, sh->table.nslots)
                == 0)
            {
                continue;
            }

            sc.rc = rc;
            sc.n = 0;

            if (ngx_http_meter_batch_cmds(&batch, sh->table.epoch, NULL,
                                          ngx_http_meter_emit_sync, &sc)
                != NGX_OK)
            {
                ngx_free(items);
                goto done;
            }

            sent = 0;

            for (i = 0; i < sc.n; i++) {
                if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
                    ngx_log_error(NGX_LOG_WARN, log, 0,
                                  "meter: final flush: %s; counters stay "
                                  "in shared memory", rc->errstr);
                    ngx_free(items);
                    goto done;
                }

                ok = (reply->type != REDIS_REPLY_ERROR);
                freeReplyObject(reply);

                if (sc.items[i] < 0 || !ok) {
                    continue;
                }

                it = &batch.items[sc.items[i]];

                ngx_http_meter_confirm(sh, it);

                sent++;
            }

            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, log, 0,
                           "meter: final flush sent %ui of %ui",
                           sent, batch.n);
        }
    }

    ngx_free(items);

done:

    if (rc) {
        redisFree(rc);
    }
}
