
/*
 * Copyright (C) nginx-meter authors
 *
 * Shared memory: the meter zones (a lock-free counter table each, see
 * meter_core.h) and the node's governance zone, and the leases that let
 * one worker at a time flush a zone or refresh governance.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/rand.h>

#include "ngx_http_meter_module.h"


ngx_int_t
ngx_http_meter_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_meter_zone_ctx_t  *octx = data;

    size_t                      size;
    uint32_t                    nslots, nuniq;
    uint64_t                    epoch, seed;
    meter_uniq_t               *uniq;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_zone_ctx_t  *ctx;

    ctx = shm_zone->data;

    if (octx) {
        if (ctx->key.value.len != octx->key.value.len
            || ngx_strncmp(ctx->key.value.data, octx->key.value.data,
                           ctx->key.value.len)
               != 0)
        {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "meter_zone \"%V\" uses the \"%V\" key "
                          "while previously it used the \"%V\" key",
                          &shm_zone->shm.name, &ctx->key.value,
                          &octx->key.value);
            return NGX_ERROR;
        }

        /* reload: counters and unflushed values carry over */
        ctx->sh = octx->sh;
        ctx->shpool = octx->shpool;

        return NGX_OK;
    }

    ctx->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        ctx->sh = ctx->shpool->data;
        return NGX_OK;
    }

    /* small allocations first: the table then takes what is left */
    size = sizeof(" in meter_zone \"\"") + shm_zone->shm.name.len;

    ctx->shpool->log_ctx = ngx_slab_alloc(ctx->shpool, size);
    if (ctx->shpool->log_ctx == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "meter_zone \"%V\" is too small",
                      &shm_zone->shm.name);
        return NGX_ERROR;
    }

    ngx_sprintf(ctx->shpool->log_ctx, " in meter_zone \"%V\"%Z",
                &shm_zone->shm.name);

    /*
     * Unique users: 1/16 of the zone (at least 64 entries), whether or not
     * a meter uses it yet, so that a reload that adds unique= finds it.
     */
    nuniq = meter_uniq_slots_for(shm_zone->shm.size / METER_UNIQ_SHARE);
    nuniq = ngx_max(nuniq, METER_UNIQ_MIN);

    uniq = ngx_slab_alloc(ctx->shpool, meter_uniq_size(nuniq));
    if (uniq == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "meter_zone \"%V\" is too small",
                      &shm_zone->shm.name);
        return NGX_ERROR;
    }

    /* the largest table the slab allocator can place; failed tries are
     * expected, so keep them out of the log */
    ctx->shpool->log_nomem = 0;

    size = shm_zone->shm.size - meter_uniq_size(nuniq);

    nslots = meter_table_slots_for(size - sizeof(ngx_http_meter_shctx_t));

    for ( ;; ) {
        if (nslots < 64) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "meter_zone \"%V\" is too small",
                          &shm_zone->shm.name);
            return NGX_ERROR;
        }

        sh = ngx_slab_alloc(ctx->shpool, sizeof(ngx_http_meter_shctx_t)
                                         + meter_table_size(nslots));
        if (sh != NULL) {
            break;
        }

        nslots -= nslots / 16 + 1;
    }

    ngx_memzero(sh, sizeof(ngx_http_meter_shctx_t));

    if (RAND_bytes((unsigned char *) &epoch, sizeof(epoch)) != 1) {
        epoch = ((uint64_t) ngx_random() << 32) ^ (uint64_t) ngx_random()
                ^ (uint64_t) ngx_time();
    }

    meter_table_init(&sh->table, nslots, epoch);

    /* the value hash's seed: another random word, not the public epoch */
    if (RAND_bytes((unsigned char *) &seed, sizeof(seed)) != 1) {
        seed = epoch * 0x9e3779b97f4a7c15ULL ^ (uint64_t) ngx_random();
    }

    meter_uniq_init(uniq, nuniq, seed);
    sh->uniq = uniq;

    ctx->sh = sh;
    ctx->shpool->data = sh;

    return NGX_OK;
}


ngx_int_t
ngx_http_meter_gov_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_meter_gov_zone_t  *ogz = data;

    ngx_http_meter_gov_zone_t  *gz;

    gz = shm_zone->data;

    if (ogz) {
        /* reload: the published state stays in force */
        gz->sh = ogz->sh;
        gz->shpool = ogz->shpool;
        return NGX_OK;
    }

    gz->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        gz->sh = gz->shpool->data;
        return NGX_OK;
    }

    gz->shpool->log_ctx = (u_char *) " in meter_governance zone";

    /* a full zone is reported by the refresh itself */
    gz->shpool->log_nomem = 0;

    gz->sh = ngx_slab_calloc(gz->shpool, sizeof(ngx_http_meter_gov_shctx_t));
    if (gz->sh == NULL) {
        return NGX_ERROR;
    }

    gz->shpool->data = gz->sh;

    return NGX_OK;
}


/*
 * One flusher per zone at a time.  The lease is a pid and an expiry in one
 * word, taken with a compare-and-swap; a dead holder's lease just expires.
 */

ngx_int_t
ngx_http_meter_lease(uint64_t *lease, ngx_msec_t interval)
{
    time_t    now;
    uint64_t  cur, mine, ttl;

    now = ngx_time();
    ttl = ngx_max(interval * 3 / 1000, 5);

    cur = __atomic_load_n(lease, __ATOMIC_ACQUIRE);
    mine = ((uint64_t) ngx_pid << 32) | (uint32_t) (now + ttl);

    if ((cur >> 32) != (uint64_t) ngx_pid
        && (cur & 0xffffffff) >= (uint64_t) now)
    {
        return NGX_DECLINED;
    }

    if (!__atomic_compare_exchange_n(lease, &cur, mine, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    {
        return NGX_DECLINED;
    }

    /* taken over: the last holder may have died with marks in hand */
    return ((cur >> 32) == (uint64_t) ngx_pid) ? NGX_OK : NGX_DONE;
}


void
ngx_http_meter_lease_release(uint64_t *lease)
{
    uint64_t  cur;

    cur = __atomic_load_n(lease, __ATOMIC_ACQUIRE);

    if ((cur >> 32) == (uint64_t) ngx_pid) {
        (void) __atomic_compare_exchange_n(lease, &cur, 0, 0,
                                           __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
}
