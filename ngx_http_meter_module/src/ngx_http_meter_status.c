
/*
 * Copyright (C) nginx-meter authors
 *
 * meter_status: the figures of every zone, collected here and written by
 * ngx_http_meter_status_json.c or ngx_http_meter_status_prometheus.c.
 */


#include "ngx_http_meter_module.h"


static void ngx_http_meter_collect_stats(ngx_shm_zone_t *zone,
    ngx_shm_zone_t *gov_zone, ngx_uint_t connected, uint64_t *v);


/* the figures' names, help and types, indexed by ngx_http_meter_stat_e */

ngx_http_meter_stat_t  ngx_http_meter_stats[NGX_HTTP_METER_NSTATS] = {
    [NGX_HTTP_METER_STAT_KEYS] =
        { "keys", "Counters in use.", "gauge" },
    [NGX_HTTP_METER_STAT_SLOTS] =
        { "slots", "Counter slots in the zone.", "gauge" },
    [NGX_HTTP_METER_STAT_SHM_BYTES] =
        { "shm_bytes", "Zone size in bytes.", "gauge" },
    [NGX_HTTP_METER_STAT_SHM_USED] =
        { "shm_used", "Zone bytes in use.", "gauge", "shm_used_bytes" },
    [NGX_HTTP_METER_STAT_SHM_FREE] =
        { "shm_free", "Zone bytes free.", "gauge", "shm_free_bytes" },
    [NGX_HTTP_METER_STAT_PENDING] =
        { "pending", "Units counted and not yet confirmed by Redis.",
          "gauge", "pending_units" },
    [NGX_HTTP_METER_STAT_FLUSHED_TOTAL] =
        { "flushed_total", "Units confirmed by Redis.", "counter" },
    [NGX_HTTP_METER_STAT_FLUSHED_COUNTERS] =
        { "flushed_counters", "Counter values confirmed by Redis (one per "
          "dirty counter and flush).", "counter", "flushed_counters_total" },
    [NGX_HTTP_METER_STAT_FLUSHES] =
        { "flushes", "Completed flush passes.", "counter", "flushes_total" },
    [NGX_HTTP_METER_STAT_FLUSH_ERRORS] =
        { "flush_errors", "Failed flush batches.", "counter",
          "flush_errors_total" },
    [NGX_HTTP_METER_STAT_LAST_FLUSH_MS] =
        { "last_flush_ms", "Duration of the last flush pass.", "gauge",
          "last_flush_seconds", 1 },
    [NGX_HTTP_METER_STAT_REDIS_CONNECTED] =
        { "redis_connected", "This worker's Redis connection is up.",
          "gauge" },
    [NGX_HTTP_METER_STAT_DROPPED] =
        { "dropped", "Calls not counted because the zone was full.",
          "counter", "dropped_total" },
    [NGX_HTTP_METER_STAT_DROPPED_VALUE] =
        { "dropped_value", "Units not counted because the zone was full.",
          "counter", "dropped_value_total" },
    [NGX_HTTP_METER_STAT_VALUE_ERRORS] =
        { "value_errors", "Meter values that were not an integer.",
          "counter", "value_errors_total" },
    [NGX_HTTP_METER_STAT_GOV_DELINQUENT] =
        { "gov_customers_delinquent", "Customers marked delinquent.",
          "gauge" },
    [NGX_HTTP_METER_STAT_GOV_BLOCKED] =
        { "gov_keys_blocked", "Keys refused at the last refresh.", "gauge" },
    [NGX_HTTP_METER_STAT_GOV_REFRESHED] =
        { "gov_refreshed", "Unix time of the last governance refresh.",
          "gauge", "gov_refreshed_timestamp_seconds" },
    [NGX_HTTP_METER_STAT_GOV_REFRESH_AGE] =
        { "gov_refresh_age", "Seconds since the last governance refresh.",
          "gauge", "gov_refresh_age_seconds" },
    [NGX_HTTP_METER_STAT_GOV_DENIED_OVERDUE] =
        { "gov_denied_invoice_overdue", "Requests refused: invoice overdue.",
          "counter", "gov_denied_invoice_overdue_total" },
    [NGX_HTTP_METER_STAT_GOV_DENIED_CREDIT] =
        { "gov_denied_credit_exhausted", "Requests refused: credit used up.",
          "counter", "gov_denied_credit_exhausted_total" },
    [NGX_HTTP_METER_STAT_GOV_DENIED_UNKNOWN] =
        { "gov_denied_unknown_key", "Requests refused: missing, unknown or "
          "revoked key.", "counter", "gov_denied_unknown_key_total" },
    [NGX_HTTP_METER_STAT_GOV_DENIED_DOWN] =
        { "gov_denied_redis_down", "Requests refused: state unavailable.",
          "counter", "gov_denied_redis_down_total" },
    [NGX_HTTP_METER_STAT_UNIQUE_ENTRIES] =
        { "unique_entries", "Unique users table: entries in use.",
          "gauge" },
    [NGX_HTTP_METER_STAT_UNIQUE_SLOTS] =
        { "unique_slots", "Unique users table: entries in the zone.",
          "gauge" },
    [NGX_HTTP_METER_STAT_UNIQUE_DIRTY] =
        { "unique_dirty", "Unique users not yet confirmed by Redis.",
          "gauge" },
    [NGX_HTTP_METER_STAT_UNIQUE_EVICTED] =
        { "unique_evicted", "Confirmed unique users overwritten by new "
          "ones (a resend if they come back).", "counter",
          "unique_evicted_total" },
    [NGX_HTTP_METER_STAT_UNIQUE_DROPPED] =
        { "unique_dropped", "Unique users not counted: the table was full "
          "of unconfirmed ones.", "counter", "unique_dropped_total" }
};


static void
ngx_http_meter_collect_stats(ngx_shm_zone_t *zone, ngx_shm_zone_t *gov_zone,
    ngx_uint_t connected, uint64_t *v)
{
    uint64_t                     pending, nfree;
    meter_table_t               *t;
    ngx_http_meter_shctx_t      *sh;
    ngx_http_meter_zone_ctx_t   *ctx;
    ngx_http_meter_gov_shctx_t  *gsh;

    ctx = zone->data;
    sh = ctx->sh;
    t = &sh->table;

    /* kept by the adds and confirms: no walk over the slots, so a scrape
     * of a 1M-key zone does not stall this worker's event loop */
    pending = meter_table_pending(t);

    nfree = (uint64_t) ctx->shpool->pfree * ngx_pagesize;

    v[NGX_HTTP_METER_STAT_KEYS] = __atomic_load_n(&t->live,
                                                  __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_SLOTS] = t->nslots;
    v[NGX_HTTP_METER_STAT_SHM_BYTES] = zone->shm.size;
    v[NGX_HTTP_METER_STAT_SHM_USED] = zone->shm.size - nfree;
    v[NGX_HTTP_METER_STAT_SHM_FREE] = nfree;
    v[NGX_HTTP_METER_STAT_PENDING] = pending;
    v[NGX_HTTP_METER_STAT_FLUSHED_TOTAL] =
        __atomic_load_n(&sh->flushed_total, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_FLUSHED_COUNTERS] =
        __atomic_load_n(&sh->flushed_counters, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_FLUSHES] =
        __atomic_load_n(&sh->flushes, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_FLUSH_ERRORS] =
        __atomic_load_n(&sh->flush_errors, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_LAST_FLUSH_MS] =
        __atomic_load_n(&sh->last_flush_ms, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_REDIS_CONNECTED] = connected;
    v[NGX_HTTP_METER_STAT_DROPPED] =
        __atomic_load_n(&t->dropped, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_DROPPED_VALUE] =
        __atomic_load_n(&t->dropped_value, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_VALUE_ERRORS] =
        __atomic_load_n(&sh->value_errors, __ATOMIC_RELAXED);
    /* the node's governance state, shown with each zone it gates */
    gsh = (ctx->governance && gov_zone != NULL)
          ? ((ngx_http_meter_gov_zone_t *) gov_zone->data)->sh : NULL;

    v[NGX_HTTP_METER_STAT_GOV_DELINQUENT] =
        gsh ? __atomic_load_n(&gsh->delinquent, __ATOMIC_RELAXED) : 0;
    v[NGX_HTTP_METER_STAT_GOV_BLOCKED] =
        gsh ? __atomic_load_n(&gsh->blocked, __ATOMIC_RELAXED) : 0;
    v[NGX_HTTP_METER_STAT_GOV_REFRESHED] =
        gsh ? __atomic_load_n(&gsh->refreshed, __ATOMIC_RELAXED) : 0;
    v[NGX_HTTP_METER_STAT_GOV_REFRESH_AGE] =
        v[NGX_HTTP_METER_STAT_GOV_REFRESHED]
        ? (uint64_t) ngx_time() - v[NGX_HTTP_METER_STAT_GOV_REFRESHED] : 0;
    v[NGX_HTTP_METER_STAT_GOV_DENIED_OVERDUE] =
        __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_OVERDUE],
                        __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_GOV_DENIED_CREDIT] =
        __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_CREDIT],
                        __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_GOV_DENIED_UNKNOWN] =
        __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_UNKNOWN],
                        __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_GOV_DENIED_DOWN] =
        __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_DOWN],
                        __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_UNIQUE_ENTRIES] =
        __atomic_load_n(&sh->uniq->live, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_UNIQUE_SLOTS] = sh->uniq->nslots;
    v[NGX_HTTP_METER_STAT_UNIQUE_DIRTY] =
        __atomic_load_n(&sh->uniq->dirty, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_UNIQUE_EVICTED] =
        __atomic_load_n(&sh->uniq->evicted, __ATOMIC_RELAXED);
    v[NGX_HTTP_METER_STAT_UNIQUE_DROPPED] =
        __atomic_load_n(&sh->uniq->dropped, __ATOMIC_RELAXED);
}


ngx_int_t
ngx_http_meter_status_handler(ngx_http_request_t *r)
{
    size_t                       size, len;
    uint64_t                    *v;
    ngx_int_t                    rc;
    ngx_buf_t                   *b;
    ngx_uint_t                   z, i, n, connected;
    ngx_chain_t                  out;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_loc_conf_t   *mlcf;
    ngx_http_meter_main_conf_t  *mcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);
    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    zones = mcf->zones.elts;
    n = NGX_HTTP_METER_NSTATS;

    connected = ngx_http_meter_redis_ready();

    v = ngx_palloc(r->pool, sizeof(uint64_t) * n * (mcf->zones.nelts + 1));
    if (v == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    for (z = 0; z < mcf->zones.nelts; z++) {
        ngx_http_meter_collect_stats(zones[z], mcf->gov_zone, connected,
                                     &v[z * n]);
    }

    size = sizeof("{\"version\":1,\"zones\":[]}\n");

    for (i = 0; i < n; i++) {
        len = ngx_strlen(ngx_http_meter_stats[i].name);

        if (ngx_http_meter_stats[i].prom != NULL) {
            len = ngx_max(len, ngx_strlen(ngx_http_meter_stats[i].prom));
        }

        size += 2 * len + ngx_strlen(ngx_http_meter_stats[i].help)
                + sizeof("# HELP nginx_meter_ \n# TYPE nginx_meter_ counter\n");

        for (z = 0; z < mcf->zones.nelts; z++) {
            /* "." and three decimals for seconds */
            size += sizeof("nginx_meter_{zone=\"\"} .000\n") + NGX_INT64_LEN
                    + len + zones[z]->shm.name.len;
        }
    }

    for (z = 0; z < mcf->zones.nelts; z++) {
        size += sizeof(",{\"name\":\"\"}") + zones[z]->shm.name.len;
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (mlcf->status == NGX_HTTP_METER_STATUS_JSON) {
        ngx_http_meter_status_json(r, b, zones, mcf->zones.nelts, v);

    } else {
        ngx_http_meter_status_prometheus(r, b, zones, mcf->zones.nelts, v);
    }

    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
