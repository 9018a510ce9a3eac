
/*
 * Copyright (C) nginx-meter authors
 *
 * meter_status json: {"version":1,"zones":[{"name":...,FIGURE:VALUE,...}]},
 * redis_connected as a boolean.
 */


#include "ngx_http_meter_module.h"


void
ngx_http_meter_status_json(ngx_http_request_t *r, ngx_buf_t *b,
    ngx_shm_zone_t **zones, ngx_uint_t nzones, uint64_t *v)
{
    ngx_uint_t  z, i, n;

    n = NGX_HTTP_METER_NSTATS;

    b->last = ngx_cpymem(b->last, "{\"version\":1,\"zones\":[",
                         sizeof("{\"version\":1,\"zones\":[") - 1);

    for (z = 0; z < nzones; z++) {
        b->last = ngx_sprintf(b->last, "%s{\"name\":\"%V\"",
                              z ? "," : "", &zones[z]->shm.name);

        for (i = 0; i < n; i++) {
            if (i == NGX_HTTP_METER_STAT_REDIS_CONNECTED) {
                b->last = ngx_sprintf(b->last, ",\"%s\":%s",
                                      ngx_http_meter_stats[i].name,
                                      v[z * n + i] ? "true" : "false");
                continue;
            }

            b->last = ngx_sprintf(b->last, ",\"%s\":%uL",
                                  ngx_http_meter_stats[i].name,
                                  v[z * n + i]);
        }

        *b->last++ = '}';
    }

    b->last = ngx_cpymem(b->last, "]}\n", 3);
    ngx_str_set(&r->headers_out.content_type, "application/json");
}
