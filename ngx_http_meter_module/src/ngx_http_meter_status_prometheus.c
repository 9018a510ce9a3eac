
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
    uint64_t                x;
    ngx_uint_t              z, i, n;
    const char             *name;
    ngx_http_meter_stat_t  *st;

    n = NGX_HTTP_METER_NSTATS;

    /* one group per metric family, as the text format requires */
    for (i = 0; i < n; i++) {
        st = &ngx_http_meter_stats[i];
        name = (st->prom != NULL) ? st->prom : st->name;

        b->last = ngx_sprintf(b->last,
                              "# HELP nginx_meter_%s %s\n"
                              "# TYPE nginx_meter_%s %s\n",
                              name, st->help, name, st->type);

        for (z = 0; z < nzones; z++) {
            x = v[z * n + i];

            if (st->ms) {
                b->last = ngx_sprintf(b->last,
                                      "nginx_meter_%s{zone=\"%V\"} "
                                      "%uL.%03uL\n", name,
                                      &zones[z]->shm.name, x / 1000,
                                      x % 1000);
                continue;
            }

            b->last = ngx_sprintf(b->last,
                                  "nginx_meter_%s{zone=\"%V\"} %uL\n",
                                  name, &zones[z]->shm.name, x);
        }
    }

    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4");
}
