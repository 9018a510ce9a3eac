
/*
 * Copyright (C) nginx-meter authors
 *
 * Gauges: "meter zone=Z NAME max=$var;" keeps the largest value per key
 * and hour instead of a sum.  The counter stays an absolute value that
 * only grows, so the flush, both Redis layouts and eviction are those of
 * a sum; the name in Redis carries MTR_GAUGE_MAX_SFX, which tells the
 * worker to bill the largest value over counters, not their sum.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_meter_module.h"


ngx_int_t
ngx_http_meter_gauge_name(ngx_conf_t *cf, ngx_http_meter_t *m)
{
    u_char  *p;

    if (m->name.len + MTR_GAUGE_SFX_LEN > METER_NAME_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "gauge meter name \"%V\" is too long: at most "
                           "%d characters with \"max=\"", &m->name,
                           METER_NAME_MAX - MTR_GAUGE_SFX_LEN);
        return NGX_ERROR;
    }

    p = ngx_pnalloc(cf->pool, m->name.len + MTR_GAUGE_SFX_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(ngx_cpymem(p, m->name.data, m->name.len), MTR_GAUGE_MAX_SFX,
               MTR_GAUGE_SFX_LEN);

    m->name.data = p;
    m->name.len += MTR_GAUGE_SFX_LEN;

    return NGX_OK;
}


/* a gauge's value that is not a count: said once per request, nothing
 * counted for it (a sum meter's bad values only show in value_errors) */
void
ngx_http_meter_gauge_bad(ngx_http_request_t *r, ngx_http_meter_t *m,
    ngx_str_t *v)
{
    ngx_str_t  s;

    s.data = v->data;
    s.len = ngx_min(v->len, 32);

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "meter \"%*s\": gauge value \"%V%s\" is not an integer "
                  "from 0 to %uL, not counted",
                  m->name.len - MTR_GAUGE_SFX_LEN, m->name.data, &s,
                  v->len > s.len ? "..." : "", (uint64_t) METER_VALUE_MAX);
}
