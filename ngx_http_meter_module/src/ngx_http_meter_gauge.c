
/*
 * Copyright (C) nginx-meter authors
 *
 * Gauges: "meter zone=Z NAME max=$var;" keeps the largest value per key
 * and hour instead of a sum, "last=$var" the latest.  The counter stays
 * an absolute value that only grows, so the flush, both Redis layouts and
 * eviction are those of a sum; the name in Redis carries MTR_GAUGE_MAX_SFX
 * or MTR_GAUGE_LAST_SFX, which tells the readers how to take it.
 *
 * last= reuses the max-only update: the value counted is
 * (ms into the UTC hour) << 40 | reading (docs/redis-schema.md "Gauges"),
 * so the largest is the reading of the latest request start.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_meter_module.h"


ngx_int_t
ngx_http_meter_gauge_name(ngx_conf_t *cf, ngx_http_meter_t *m)
{
    u_char      *p;
    size_t       len;
    const char  *sfx, *arg;

    if (m->gauge == NGX_HTTP_METER_GAUGE_LAST) {
        sfx = MTR_GAUGE_LAST_SFX;
        len = NGX_HTTP_METER_LAST_SFX_LEN;
        arg = "last=";

    } else {
        sfx = MTR_GAUGE_MAX_SFX;
        len = MTR_GAUGE_SFX_LEN;
        arg = "max=";
    }

    if (m->name.len + len > METER_NAME_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "gauge meter name \"%V\" is too long: at most "
                           "%d characters with \"%s\"", &m->name,
                           (int) (METER_NAME_MAX - len), arg);
        return NGX_ERROR;
    }

    p = ngx_pnalloc(cf->pool, m->name.len + len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(ngx_cpymem(p, m->name.data, m->name.len), sfx, len);

    m->name.data = p;
    m->name.len += len;

    return NGX_OK;
}


/* only decimal digits: a reading too large to count, clamped by last= */
ngx_int_t
ngx_http_meter_gauge_digits(ngx_str_t *v)
{
    size_t  i;

    for (i = 0; i < v->len; i++) {
        if (v->data[i] < '0' || v->data[i] > '9') {
            return 0;
        }
    }

    return v->len > 0;
}


/* the counted value of a last= reading: at most 3,599,999 << 40 | 2^40-1,
 * below 2^62, so it is a valid count (METER_VALUE_MAX = 2^63 - 1) */
uint64_t
ngx_http_meter_gauge_last(ngx_http_request_t *r, uint64_t value)
{
    uint64_t  ms;

    ms = (uint64_t) (r->start_sec % 3600) * 1000 + r->start_msec;

    if (value > MTR_GAUGE_LAST_MASK) {
        value = MTR_GAUGE_LAST_MASK;
    }

    return ms << MTR_GAUGE_LAST_SHIFT | value;
}


/* a gauge's value that is not a count: said once per request, nothing
 * counted for it (a sum meter's bad values only show in value_errors) */
void
ngx_http_meter_gauge_bad(ngx_http_request_t *r, ngx_http_meter_t *m,
    ngx_str_t *v)
{
    size_t     sfx;
    ngx_str_t  s;

    s.data = v->data;
    s.len = ngx_min(v->len, 32);

    sfx = (m->gauge == NGX_HTTP_METER_GAUGE_LAST) ? NGX_HTTP_METER_LAST_SFX_LEN
                                                  : MTR_GAUGE_SFX_LEN;

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "meter \"%*s\": gauge value \"%V%s\" is not an integer "
                  "from 0 to %uL, not counted",
                  m->name.len - sfx, m->name.data, &s,
                  v->len > s.len ? "..." : "", (uint64_t) METER_VALUE_MAX);
}
