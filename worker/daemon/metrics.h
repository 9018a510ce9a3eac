
/*
 * Copyright (C) nginx-meter authors
 *
 * The worker's own Prometheus metrics: a text exposition rendered by the
 * main loop, written to metrics.textfile (node_exporter's textfile
 * collector) and served as GET /metrics by the webhook listener with
 * metrics.http = on.
 */


#ifndef _METER_METRICS_H_INCLUDED_
#define _METER_METRICS_H_INCLUDED_


#include <stddef.h>
#include <time.h>

#include "config.h"


typedef struct {
    const char                 *provider;
    unsigned long long          sent;           /* records accepted */
    unsigned long long          failed;         /* attempts to retry */
    unsigned long long          dead;           /* dead-lettered */
    unsigned                    in_flight;      /* requests open now */
    unsigned long long          backlog;        /* records due, estimate */
    time_t                      oldest_unbilled;    /* hour start; 0 none */
    time_t                      last_drain;     /* complete pass; 0 never */
    time_t                      sync_last;      /* successful poll; 0 */
    double                      rate;           /* records/s while busy */
} meter_metrics_t;


/* checks the metrics.* settings; 0 or -1 with err naming the key */
int meter_metrics_check(const meter_conf_t *cf, char *err, size_t errlen);

/* renders m (the copy /metrics serves) and writes metrics.textfile, if
 * set, atomically (a temporary file renamed over it); 0 or -1 */
int meter_metrics_publish(const meter_conf_t *cf, const meter_metrics_t *m,
    time_t now);

/* the last rendering, malloc'ed (the caller frees), or NULL */
char *meter_metrics_text(size_t *len);

/* metrics.http = on: /metrics on the webhook listener */
int meter_metrics_http(const meter_conf_t *cf);


#endif /* _METER_METRICS_H_INCLUDED_ */
