
/*
 * Copyright (C) nginx-meter authors
 *
 * meter_status prometheus: the text exposition format 0.0.4, one family
 * per figure (nginx_meter_FIGURE{zone="NAME"}).
 */


#include "ngx_http_meter_module.h"


void
ngx_http_meter_status_prometheus(ngx_http_request_t *r, ngx_buf_t *b,
    ngx_shm_zone_t **zones, ngx_uint_t nzones, uint64_t *v)
{
    ngx_uint_t  z, i, n;

    n = NGX_HTTP_METER_NSTATS;

    /* one group per metric family, as the text format requires */
    for (i = 0; i < n; i++) {
        b->last = ngx_sprintf(b->last,
                              "# HELP nginx_meter_%s %s\n"
                              "# TYPE nginx_meter_%s %s\n",
                              ngx_http_meter_stats[i].name,
                              ngx_http_meter_stats[i].help,
                              ngx_http_meter_stats[i].name,
                              ngx_http_meter_stats[i].type);

        for (z = 0; z < nzones; z++) {
            b->last = ngx_sprintf(b->last,
                                  "nginx_meter_%s{zone=\"%V\"} %uL\n",
                                  ngx_http_meter_stats[i].name,
                                  &zones[z]->shm.name, v[z * n + i]);
        }
    }

    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4");
}
