
/*
 * Copyright (C) nginx-meter authors
 *
 * The flush: from the tick of every worker, the one that holds a zone's
 * lease sends the zone's changed counters to Redis as absolute values
 * (docs/redis-schema.md), in slices so that a large zone never stalls the
 * event loop; the exit flushes once more, blocking.  A lost reply is
 * retried without double counting.
 *
 * Two layouts.  Most counters go into the writer layout: one plain HSET
 * per (session, hour) and batch, many fields, RESP built here into a
 * reused buffer.  Counters of keys with prepaid credit go through the
 * max-only script of the key layout, which also keeps mtr:used.  Either
 * way a value is the slot's absolute count, so the worker's maximum over
 * every copy of a slot is exact whatever was written twice.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>

#include "ngx_http_meter_module.h"


/* the RESP of one batch at most (see ngx_http_meter_batch_cmds) */
#define NGX_HTTP_METER_OUT_ITEM     768
#define NGX_HTTP_METER_OUT_SIZE                                               \
    (NGX_HTTP_METER_BATCH * NGX_HTTP_METER_OUT_ITEM + 1024)


/* the blocking flush at exit: which reply belongs to which command */
typedef struct {
    redisContext                *rc;
    ngx_uint_t                   n;
    ngx_uint_t                   tags[4 * NGX_HTTP_METER_BATCH];
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
static ngx_int_t ngx_http_meter_send_ubatch(ngx_http_meter_flush_t *fl,
    ngx_http_meter_zone_ctx_t *ctx);
static ngx_int_t ngx_http_meter_load_scripts(ngx_http_meter_flush_t *fl);
static ngx_int_t ngx_http_meter_sha1(const char *script, char *hex);
static ngx_uint_t ngx_http_meter_keyed(ngx_http_meter_main_conf_t *mcf,
    meter_batch_item_t *it);
static ngx_int_t ngx_http_meter_batch_cmds(ngx_http_meter_flush_t *fl,
    meter_batch_t *b, ngx_http_meter_shctx_t *sh, ngx_http_meter_wsess_t *ws,
    ngx_http_meter_emit_pt emit, void *data);
static u_char *ngx_http_meter_resp_argv(u_char *p, int argc,
    const char **argv, const size_t *len);
static ngx_int_t ngx_http_meter_emit_async(void *data, u_char *cmd,
    size_t len, ngx_uint_t tag);
static ngx_int_t ngx_http_meter_emit_sync(void *data, u_char *cmd,
    size_t len, ngx_uint_t tag);
static void ngx_http_meter_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_confirm_tag(ngx_http_meter_flush_t *fl,
    ngx_http_meter_shctx_t *sh, meter_batch_t *b, meter_ubatch_t *ub,
    ngx_uint_t tag);
static void ngx_http_meter_confirm(ngx_http_meter_shctx_t *sh,
    meter_batch_item_t *it);
static void ngx_http_meter_batch_done(ngx_http_meter_flush_t *fl);
static void ngx_http_meter_zone_done(ngx_http_meter_flush_t *fl,
    ngx_http_meter_zone_ctx_t *ctx);
static void ngx_http_meter_final_flush(ngx_http_meter_flush_t *fl,
    ngx_log_t *log);
static ngx_uint_t ngx_http_meter_final_resync(ngx_http_meter_shctx_t *sh,
    u_char *run_id, ngx_str_t *zone, ngx_log_t *log);


ngx_int_t
ngx_http_meter_flush_init(ngx_http_meter_flush_t *fl,
    ngx_http_meter_redis_t *rd)
{
    fl->mcf = rd->mcf;
    fl->log = rd->log;
    fl->redis = rd;
    fl->batch.items = fl->items;
    fl->batch.cap = NGX_HTTP_METER_BATCH;
    fl->ubatch.items = fl->uitems;
    fl->ubatch.cap = NGX_HTTP_METER_UBATCH;

    fl->sess = ngx_pcalloc(ngx_cycle->pool, sizeof(ngx_http_meter_wsess_t)
                                            * ngx_max(fl->mcf->zones.nelts,
                                                      1));
    fl->out = ngx_palloc(ngx_cycle->pool, NGX_HTTP_METER_OUT_SIZE);

    if (fl->sess == NULL || fl->out == NULL) {
        return NGX_ERROR;
    }

    ngx_http_meter_init_event(&fl->tick, ngx_http_meter_tick, fl, fl->log);
    ngx_http_meter_init_event(&fl->slice, ngx_http_meter_slice_handler, fl,
                              fl->log);

    /* the script's SHA-1 is its name in Redis: known before SCRIPT LOAD
     * answers, so EVALSHA can follow it in the same pipeline */
    if (ngx_http_meter_sha1(meter_script_max, fl->script_sha) != NGX_OK
        || ngx_http_meter_sha1(meter_script_uniq, fl->uscript_sha) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_meter_redis_hook(rd, ngx_http_meter_flush_ready,
                              ngx_http_meter_flush_refused,
                              ngx_http_meter_flush_down, fl);

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_sha1(const char *script, char *hex)
{
    uint8_t  sha[20];

    if (EVP_Digest(script, ngx_strlen(script), sha, NULL, EVP_sha1(), NULL)
        != 1)
    {
        return NGX_ERROR;
    }

    meter_hex(sha, 20, hex);

    return NGX_OK;
}


/* the last flush, then the zones are free for the other workers */

void
ngx_http_meter_flush_exit(ngx_http_meter_flush_t *fl, ngx_log_t *log)
{
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    ngx_http_meter_final_flush(fl, log);

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

    /* a new connection is a new writer session in every zone */
    ngx_memzero(fl->sess, sizeof(ngx_http_meter_wsess_t)
                          * fl->mcf->zones.nelts);

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

            /* unique users first: a few, and new ones are each a user */
            fl->usent = 0;
            fl->ubatch.cursor = 0;
            fl->ubatch.wrapped = 0;
            fl->ubatch.all = fl->batch.all;
            /* a takeover's full scan finds a dead flusher's SENT ones */
            fl->ubatch.full = (fl->zone_mode >= NGX_HTTP_METER_MODE_FULL);
        }

        if (!fl->usent) {
            if (meter_uniq_collect(ctx->sh->uniq, &fl->ubatch,
                                   NGX_HTTP_METER_SCAN)
                > 0)
            {
                if (ngx_http_meter_send_ubatch(fl, ctx) != NGX_OK) {
                    fl->pass = 0;
                }

                return;
            }

            if (!fl->ubatch.wrapped) {
                ngx_post_event(&fl->slice, &ngx_posted_events);
                return;
            }

            fl->usent = 1;
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
 * Whether an item goes into the key layout: its key's customer has prepaid
 * credit for its meter, as the node's governance copy says (mtr:used must
 * count it), or the copy is not loaded yet.  A slot may change layout from
 * one flush to the next: both hold its absolute count, the worker takes
 * the larger.
 */

static ngx_uint_t
ngx_http_meter_keyed(ngx_http_meter_main_conf_t *mcf, meter_batch_item_t *it)
{
    ngx_uint_t                   j;
    ngx_http_meter_gov_key_t    *k;
    ngx_http_meter_gov_cust_t   *cust;
    ngx_http_meter_gov_snap_t   *snap;
    ngx_http_meter_gov_zone_t   *gz;

    if (mcf->gov_zone == NULL) {
        return 0;
    }

    gz = mcf->gov_zone->data;
    snap = __atomic_load_n(&gz->sh->snap, __ATOMIC_ACQUIRE);

    if (snap == NULL) {
        return 1;
    }

    k = ngx_http_meter_gov_find(snap, it->e->key);

    if (k == NULL || k->cust == 0 || k->cust > snap->ncust) {
        return 0;
    }

    cust = &snap->custs[k->cust - 1];

    for (j = 0; j < cust->ncredits && j < NGX_HTTP_METER_GOV_CREDITS; j++) {
        if (ngx_strncmp(cust->credits[j].meter, it->e->meter,
                        METER_NAME_MAX)
            == 0)
        {
            return 1;
        }
    }

    return 0;
}


/* one command of argv into p: for the rare commands, no per-field speed */

static u_char *
ngx_http_meter_resp_argv(u_char *p, int argc, const char **argv,
    const size_t *len)
{
    int  i;

    p = (u_char *) meter_resp_array((char *) p, (unsigned) argc);

    for (i = 0; i < argc; i++) {
        p = (u_char *) meter_resp_bulk((char *) p, argv[i], len[i]);
    }

    return p;
}


/*
 * The commands of one batch (docs/redis-schema.md), for the async flush and
 * the blocking one at exit alike, RESP built into fl->out:
 *
 *   - writer layout, per hour and part of the batch: the first time in
 *     this session and hour SADD mtr:widx:HOUR EPOCH:SID:NPARTS and ZADD
 *     mtr:hours NX, then one HSET mtr:wu:{EPOCH}:SID:HOUR:PART with every
 *     field of the group;
 *   - key layout (credit), per hour: ZADD mtr:hours NX and one SADD
 *     mtr:idx:HOUR, then one max-only script call per counter.
 *
 * An index goes first on the same connection, so it exists before the data
 * it points to.  emit() gets each command with its reply's tag.
 */

static ngx_int_t
ngx_http_meter_batch_cmds(ngx_http_meter_flush_t *fl, meter_batch_t *b,
    ngx_http_meter_shctx_t *sh, ngx_http_meter_wsess_t *ws,
    ngx_http_meter_emit_pt emit, void *data)
{
    char                 key[METER_WKEY_SIZE], idx[METER_WIDX_KEY_SIZE];
    char                 hour[METER_HOUR_LEN + 1], start[24];
    char                 writer[METER_WRITER_SIZE], value[24];
    char                 field[METER_FIELD_SIZE], used[METER_USED_KEY_SIZE];
    char                 dkey[METER_DATA_KEY_SIZE], base[24];
    char                 hex[NGX_HTTP_METER_BATCH][METER_HEX_LEN + 1];
    u_char              *p, *cmd;
    size_t               len[8];
    uint64_t             epoch;
    uint32_t             h, nparts;
    ngx_uint_t           i, j, n, g, nk, keyed;
    const char          *argv[8];
    meter_batch_item_t  *it;

    epoch = sh->table.epoch;
    p = fl->out;
    fl->ngroups = 0;
    keyed = 0;

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];
        it->keyed = (uint32_t) ngx_http_meter_keyed(fl->mcf, it);
        it->part = (uint32_t) (it->e - sh->table.slots) >> MTR_WPART_SHIFT;
        keyed += it->keyed;
    }

    /*
     * The writer layout: the items into groups of one (hour, part).  They
     * come in slot order, so an item's group is nearly always the last one
     * or the one before (two hours interleaved); otherwise a new group, a
     * second HSET into the same hash now and then, which is harmless.
     */

    g = 0;

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        if (it->keyed) {
            continue;
        }

        if (fl->ngroups == 0
            || fl->ghour[g] != it->hour || fl->gpart[g] != it->part)
        {
            g = fl->ngroups;

            if (g > 1 && fl->ghour[g - 2] == it->hour
                && fl->gpart[g - 2] == it->part)
            {
                g -= 2;

            } else if (g > 0 && fl->ghour[g - 1] == it->hour
                       && fl->gpart[g - 1] == it->part)
            {
                g -= 1;

            } else {
                fl->ghour[g] = it->hour;
                fl->gpart[g] = it->part;
                fl->gfirst[g] = (uint16_t) i;
                fl->gn[g] = 0;
                fl->ngroups++;
            }
        }

        if (fl->gn[g] > 0) {
            fl->inext[fl->glast[g]] = (uint16_t) i;
        }

        fl->glast[g] = (uint16_t) i;
        fl->gn[g]++;
    }

    nparts = meter_wparts(sh->table.nslots);

    for (g = 0; g < fl->ngroups; g++) {
        h = fl->ghour[g];

        if (ws->sid == 0) {
            ws->sid = __atomic_add_fetch(&sh->writers, 1, __ATOMIC_RELAXED);
        }

        (void) meter_hour_format(h, hour);

        if (ws->hours[0] != h && ws->hours[1] != h) {
            argv[0] = "SADD"; len[0] = 4;
            argv[1] = idx; len[1] = meter_fmt_widx_key(idx, hour);
            argv[2] = writer;
            len[2] = meter_fmt_writer(writer, epoch, ws->sid, nparts);

            cmd = p;
            p = ngx_http_meter_resp_argv(p, 3, argv, len);

            if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_INDEX) != NGX_OK) {
                return NGX_ERROR;
            }

            argv[0] = "ZADD"; len[0] = 4;
            argv[1] = MTR_HOURS; len[1] = sizeof(MTR_HOURS) - 1;
            argv[2] = "NX"; len[2] = 2;
            argv[3] = start;
            len[3] = meter_fmt_u64(start, meter_hour_start(h));
            argv[4] = hour; len[4] = METER_HOUR_LEN;

            cmd = p;
            p = ngx_http_meter_resp_argv(p, 5, argv, len);

            if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_INDEX) != NGX_OK) {
                return NGX_ERROR;
            }

            /* the newer hour stays: late usage of the last one is rare */
            ws->hours[ws->hours[0] < ws->hours[1] ? 0 : 1] = h;
        }

        cmd = p;
        p = (u_char *) meter_resp_array((char *) p,
                                        (unsigned) (2 + 2 * fl->gn[g]));
        p = (u_char *) meter_resp_bulk((char *) p, "HSET", 4);
        p = (u_char *) meter_resp_bulk((char *) p, key,
                                       meter_fmt_wkey(key, epoch, ws->sid,
                                                      hour, fl->gpart[g]));

        for (n = 0, j = fl->gfirst[g]; n < fl->gn[g]; n++, j = fl->inext[j]) {
            p = (u_char *) meter_resp_wfield((char *) p, &b->items[j]);
        }

        if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_GROUP + g) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (keyed == 0) {
        return NGX_OK;
    }

    /* the key layout: indexes per hour, then the script per counter */

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        if (!it->keyed) {
            continue;
        }

        for (j = 0; j < i; j++) {
            if (b->items[j].keyed && b->items[j].hour == it->hour) {
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

        cmd = p;
        p = ngx_http_meter_resp_argv(p, 5, argv, len);

        if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_INDEX) != NGX_OK) {
            return NGX_ERROR;
        }

        nk = 0;
        for (j = i; j < b->n; j++) {
            nk += (b->items[j].keyed && b->items[j].hour == it->hour);
        }

        cmd = p;
        p = (u_char *) meter_resp_array((char *) p, (unsigned) (2 + nk));
        p = (u_char *) meter_resp_bulk((char *) p, "SADD", 4);
        p = (u_char *) meter_resp_bulk((char *) p, idx,
                                       meter_fmt_idx_key(idx, it->hour));

        for (j = i; j < b->n; j++) {
            if (b->items[j].keyed && b->items[j].hour == it->hour) {
                meter_hex(b->items[j].e->key, METER_HASH_LEN, hex[j]);
                p = (u_char *) meter_resp_bulk((char *) p, hex[j],
                                               METER_HEX_LEN);
            }
        }

        if (emit(data, cmd, p - cmd, NGX_HTTP_METER_TAG_INDEX) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        if (!it->keyed) {
            continue;
        }

        argv[0] = "EVALSHA"; len[0] = 7;
        argv[1] = fl->script_sha; len[1] = 40;
        argv[2] = "2"; len[2] = 1;
        argv[3] = dkey;
        len[3] = meter_fmt_data_key(dkey, it->e->key, it->hour);
        argv[4] = used; len[4] = meter_fmt_used_key(used, it->e->key);
        argv[5] = field;
        len[5] = meter_fmt_field(field, it->e->meter, epoch, it->gen);
        argv[6] = value; len[6] = meter_fmt_u64(value, it->value);
        /* what Redis confirmed, maybe in the writer layout: a slot that
         * changes layout adds to mtr:used only what came after */
        argv[7] = base;
        len[7] = meter_fmt_u64(base, __atomic_load_n(&it->e->flushed,
                                                     __ATOMIC_ACQUIRE));

        cmd = p;
        p = ngx_http_meter_resp_argv(p, 8, argv, len);

        if (emit(data, cmd, p - cmd, i) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_emit_async(void *data, u_char *cmd, size_t len,
    ngx_uint_t tag)
{
    ngx_http_meter_flush_t   *fl = data;

    if (redisAsyncFormattedCommand(fl->redis->ac, ngx_http_meter_reply,
                                   (void *) (uintptr_t) tag, (char *) cmd,
                                   len)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    fl->outstanding++;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_emit_sync(void *data, u_char *cmd, size_t len, ngx_uint_t tag)
{
    ngx_http_meter_sync_t  *sc = data;

    if (redisAppendFormattedCommand(sc->rc, (char *) cmd, len) != REDIS_OK) {
        return NGX_ERROR;
    }

    sc->tags[sc->n++] = tag;

    return NGX_OK;
}


/* both scripts, after a new connection or a NOSCRIPT, before the batch */

static ngx_int_t
ngx_http_meter_load_scripts(ngx_http_meter_flush_t *fl)
{
    size_t       len[3];
    ngx_uint_t   i;
    const char  *argv[3], *scripts[2];

    if (!fl->reload_script) {
        return NGX_OK;
    }

    scripts[0] = meter_script_max;
    scripts[1] = meter_script_uniq;

    for (i = 0; i < 2; i++) {
        argv[0] = "SCRIPT"; len[0] = 6;
        argv[1] = "LOAD"; len[1] = 4;
        argv[2] = scripts[i]; len[2] = ngx_strlen(scripts[i]);

        if (redisAsyncCommandArgv(fl->redis->ac,
                                  ngx_http_meter_redis_setup_reply,
                                  fl->redis, 3, argv, len)
            != REDIS_OK)
        {
            ngx_http_meter_redis_fail(fl->redis, "send",
                                      fl->redis->ac->errstr);
            return NGX_ERROR;
        }
    }

    fl->reload_script = 0;

    return NGX_OK;
}


/* a batch of unique users, the zone's before its counters */

static ngx_int_t
ngx_http_meter_send_ubatch(ngx_http_meter_flush_t *fl,
    ngx_http_meter_zone_ctx_t *ctx)
{
    fl->outstanding = 0;
    fl->failed = 0;
    fl->ubusy = 1;

    if (ngx_http_meter_load_scripts(fl) != NGX_OK) {
        meter_uniq_remark(ctx->sh->uniq, &fl->ubatch);
        return NGX_ERROR;
    }

    fl->index_failed = 0;

    if (ngx_http_meter_unique_cmds(fl, ctx->sh, &fl->ubatch,
                                   ngx_http_meter_emit_async, fl)
        != NGX_OK)
    {
        /* callbacks already queued will be called with no reply */
        meter_uniq_remark(ctx->sh->uniq, &fl->ubatch);
        fl->failed = 1;
        ngx_http_meter_redis_fail(fl->redis, "send",
                                  fl->redis->ac ? fl->redis->ac->errstr
                                                : "");
        return NGX_ERROR;
    }

    ngx_http_meter_redis_wait(fl->redis);

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_send_batch(ngx_http_meter_flush_t  *fl,
    ngx_http_meter_zone_ctx_t *ctx)
{
    fl->outstanding = 0;
    fl->failed = 0;
    fl->ubusy = 0;

    if (ngx_http_meter_load_scripts(fl) != NGX_OK) {
        return NGX_ERROR;
    }

    fl->index_failed = 0;

    if (ngx_http_meter_batch_cmds(fl, &fl->batch, ctx->sh,
                                  &fl->sess[fl->zone],
                                  ngx_http_meter_emit_async, fl)
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
    ngx_uint_t                tag;
    ngx_shm_zone_t          **zones;
    ngx_http_meter_flush_t   *fl;
    ngx_http_meter_shctx_t   *sh;

    /* privdata is the tag: the flush is the worker's */
    fl = (ngx_http_meter_worker != NULL) ? &ngx_http_meter_worker->flush
                                         : NULL;

    if (fl == NULL || fl->outstanding == 0) {
        return;
    }

    tag = (uintptr_t) privdata;

    if (reply == NULL) {
        fl->failed = 1;

    } else if (reply->type == REDIS_REPLY_ERROR) {
        if (!fl->failed) {
            ngx_log_error(NGX_LOG_ERR, fl->log, 0,
                          "meter: redis refused a flush: %*s",
                          (int) ngx_min(reply->len, 256), reply->str);
        }

        /* -READONLY: reconnects, to the master Sentinel names */
        ngx_http_meter_redis_error(fl->redis, reply);

        if (ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            fl->reload_script = 1;
        }

        if (tag == NGX_HTTP_METER_TAG_INDEX) {
            /* data without its index would be unseen: confirm nothing
             * after it, and send the index again */
            fl->index_failed = 1;
        }

        fl->failed = 1;

    } else if (!fl->index_failed) {
        /* acknowledged: only these values are known to be in Redis */
        zones = fl->mcf->zones.elts;
        sh = ((ngx_http_meter_zone_ctx_t *) zones[fl->zone]->data)->sh;

        ngx_http_meter_confirm_tag(fl, sh, &fl->batch,
                                   fl->ubusy ? &fl->ubatch : NULL, tag);
    }

    if (--fl->outstanding == 0) {
        ngx_http_meter_batch_done(fl);
    }
}


static void
ngx_http_meter_confirm_tag(ngx_http_meter_flush_t *fl,
    ngx_http_meter_shctx_t *sh, meter_batch_t *b, meter_ubatch_t *ub,
    ngx_uint_t tag)
{
    ngx_uint_t  g, i, n;

    if (ub != NULL) {
        /* unique users: the script of group g holds its members now */
        if (tag < NGX_HTTP_METER_TAG_UGROUP) {
            return;
        }

        g = tag - NGX_HTTP_METER_TAG_UGROUP;

        for (i = 0; i < ub->n; i++) {
            if (ub->items[i].group == g) {
                meter_uniq_confirm(sh->uniq, &ub->items[i]);
            }
        }

        return;
    }

    if (tag < NGX_HTTP_METER_TAG_GROUP) {
        ngx_http_meter_confirm(sh, &b->items[tag]);
        return;
    }

    if (tag >= NGX_HTTP_METER_TAG_INDEX) {
        return;
    }

    g = tag - NGX_HTTP_METER_TAG_GROUP;

    for (n = 0, i = fl->gfirst[g]; n < fl->gn[g]; n++, i = fl->inext[i]) {
        ngx_http_meter_confirm(sh, &b->items[i]);
    }
}


/* raises the slot's flushed mark and counts what Redis newly holds */

static void
ngx_http_meter_confirm(ngx_http_meter_shctx_t *sh, meter_batch_item_t *it)
{
    uint64_t  d;

    d = meter_batch_confirm(&sh->table, it);

    /* what a flush costs grows with these, not with units (bench/cost.py) */
    (void) __atomic_fetch_add(&sh->flushed_counters, 1, __ATOMIC_RELAXED);

    if (d) {
        (void) __atomic_fetch_add(&sh->flushed_total, d, __ATOMIC_RELAXED);
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

    if (fl->ubusy) {
        fl->ubusy = 0;

        if (fl->failed) {
            /* not confirmed: DIRTY again, with the index, next pass */
            meter_uniq_remark(ctx->sh->uniq, &fl->ubatch);
            (void) __atomic_fetch_add(&ctx->sh->flush_errors, 1,
                                      __ATOMIC_RELAXED);
            fl->pass = 0;
            return;
        }

        if (fl->ubatch.wrapped) {
            fl->usent = 1;
        }

        goto next;
    }

    /* what Redis now holds of past hours frees its slot, in every pass */
    now = ngx_time();
    (void) meter_batch_reclaim(&ctx->sh->table, &fl->batch, meter_hour(now),
                               (uint32_t) now);

    if (fl->failed) {
        /* unconfirmed values stay pending and go with the next pass; the
         * indexes are sent again with them */
        fl->sess[fl->zone].hours[0] = 0;
        fl->sess[fl->zone].hours[1] = 0;
        meter_batch_remark(&ctx->sh->table, &fl->batch);
        (void) __atomic_fetch_add(&ctx->sh->flush_errors, 1,
                                  __ATOMIC_RELAXED);
        fl->pass = 0;
        return;
    }

    if (fl->batch.wrapped) {
        ngx_http_meter_zone_done(fl, ctx);
    }

next:

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
 * A Redis the zone did not flush to yet (a failover the async connection
 * had not followed when the worker began to exit), or one the zone owes a
 * rewrite: every counter, not only those that moved, as the async flush
 * does after INFO (what the old master acknowledged may not have reached
 * the new one).
 */

static ngx_uint_t
ngx_http_meter_final_resync(ngx_http_meter_shctx_t *sh, u_char *run_id,
    ngx_str_t *zone, ngx_log_t *log)
{
    if (!__atomic_load_n(&sh->resync, __ATOMIC_ACQUIRE)
        && (run_id[0] == '\0' || sh->run_id[0] == '\0'
            || ngx_memcmp(sh->run_id, run_id, 40) == 0))
    {
        return 0;
    }

    ngx_log_error(NGX_LOG_NOTICE, log, 0,
                  "meter: final flush: redis was restarted or replaced; "
                  "rewriting every counter of meter_zone \"%V\"", zone);

    return 1;
}


/*
 * On exit nothing drives the event loop any more: one last blocking
 * pipeline with the same commands and the same max-only script.  What it
 * cannot send stays in the zone, which outlives a reload.
 */

static void
ngx_http_meter_final_flush(ngx_http_meter_flush_t *fl, ngx_log_t *log)
{
    u_char                      run_id[40];
    ngx_uint_t                  z, i, sent, ok, index_ok;
    redisReply                 *reply;
    struct timeval              tv;
    redisContext               *rc;
    meter_batch_t               batch;
    meter_ubatch_t              ubatch;
    meter_uitem_t              *uitems;
    meter_batch_item_t         *items;
    ngx_http_meter_sync_t      *sc;
    ngx_http_meter_wsess_t      ws;
    ngx_shm_zone_t            **zones;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_zone_ctx_t  *ctx;
    ngx_http_meter_main_conf_t *mcf;

    mcf = fl->mcf;
    items = NULL;
    uitems = NULL;
    sc = NULL;

    tv.tv_sec = mcf->redis_timeout / 1000;
    tv.tv_usec = (mcf->redis_timeout % 1000) * 1000;

    /* the master Sentinel names, or the address, after AUTH and SELECT,
     * ROLE master; NULL: logged */
    rc = ngx_http_meter_redis_connect_sync(mcf, tv, log, run_id);
    if (rc == NULL) {
        goto done;
    }

    /* the scripts, by name as in the async flush */
    reply = redisCommand(rc, "SCRIPT LOAD %s", meter_script_max);
    if (reply == NULL) {
        goto done;
    }

    freeReplyObject(reply);

    reply = redisCommand(rc, "SCRIPT LOAD %s", meter_script_uniq);
    if (reply == NULL) {
        goto done;
    }

    freeReplyObject(reply);

    items = ngx_alloc(sizeof(meter_batch_item_t) * NGX_HTTP_METER_BATCH,
                      log);
    uitems = ngx_alloc(sizeof(meter_uitem_t) * NGX_HTTP_METER_UBATCH, log);
    sc = ngx_alloc(sizeof(ngx_http_meter_sync_t), log);

    if (items == NULL || uitems == NULL || sc == NULL) {
        goto done;
    }

    zones = mcf->zones.elts;

    for (z = 0; z < mcf->zones.nelts; z++) {
        ctx = zones[z]->data;
        sh = ctx->sh;

        /* this connection is a writer session of its own */
        ngx_memzero(&ws, sizeof(ngx_http_meter_wsess_t));

        ngx_memzero(&batch, sizeof(meter_batch_t));
        batch.items = items;
        batch.cap = NGX_HTTP_METER_BATCH;
        batch.all = ngx_http_meter_final_resync(sh, run_id,
                                                &zones[z]->shm.name, log);

        while (!batch.wrapped) {
            if (meter_batch_collect(&sh->table, &batch, sh->table.nslots)
                == 0)
            {
                continue;
            }

            sc->rc = rc;
            sc->n = 0;

            if (ngx_http_meter_batch_cmds(fl, &batch, sh, &ws,
                                          ngx_http_meter_emit_sync, sc)
                != NGX_OK)
            {
                goto done;
            }

            sent = 0;
            index_ok = 1;

            for (i = 0; i < sc->n; i++) {
                if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
                    ngx_log_error(NGX_LOG_WARN, log, 0,
                                  "meter: final flush: %s; counters stay "
                                  "in shared memory", rc->errstr);
                    goto done;
                }

                ok = (reply->type != REDIS_REPLY_ERROR);
                freeReplyObject(reply);

                if (!ok && sc->tags[i] == NGX_HTTP_METER_TAG_INDEX) {
                    index_ok = 0;
                }

                if (!ok || !index_ok) {
                    continue;
                }

                ngx_http_meter_confirm_tag(fl, sh, &batch, NULL,
                                           sc->tags[i]);

                sent++;
            }

            if (!index_ok) {
                ws.hours[0] = 0;
                ws.hours[1] = 0;
            }

            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, log, 0,
                           "meter: final flush sent %ui commands of %ui",
                           sent, sc->n);
        }

        /* unique users not confirmed yet, the same way */
        ngx_memzero(&ubatch, sizeof(meter_ubatch_t));
        ubatch.items = uitems;
        ubatch.cap = NGX_HTTP_METER_UBATCH;
        ubatch.full = 1;

        while (!ubatch.wrapped) {
            if (meter_uniq_collect(sh->uniq, &ubatch, sh->uniq->nslots)
                == 0)
            {
                continue;
            }

            sc->rc = rc;
            sc->n = 0;

            if (ngx_http_meter_unique_cmds(fl, sh, &ubatch,
                                           ngx_http_meter_emit_sync, sc)
                != NGX_OK)
            {
                meter_uniq_remark(sh->uniq, &ubatch);
                goto done;
            }

            index_ok = 1;

            for (i = 0; i < sc->n; i++) {
                if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
                    ngx_log_error(NGX_LOG_WARN, log, 0,
                                  "meter: final flush: %s; unique users "
                                  "stay in shared memory", rc->errstr);
                    meter_uniq_remark(sh->uniq, &ubatch);
                    goto done;
                }

                ok = (reply->type != REDIS_REPLY_ERROR);
                freeReplyObject(reply);

                if (!ok && sc->tags[i] == NGX_HTTP_METER_TAG_INDEX) {
                    index_ok = 0;
                }

                if (ok && index_ok) {
                    ngx_http_meter_confirm_tag(fl, sh, &batch, &ubatch,
                                               sc->tags[i]);
                }
            }

            /* what was not confirmed is sent by the next flusher */
            meter_uniq_remark(sh->uniq, &ubatch);
        }
    }

done:

    if (items) {
        ngx_free(items);
    }

    if (uitems) {
        ngx_free(uitems);
    }

    if (sc) {
        ngx_free(sc);
    }

    if (rc) {
        redisFree(rc);
    }
}
