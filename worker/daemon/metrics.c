
/*
 * Copyright (C) nginx-meter authors
 *
 * Names follow the Prometheus conventions that "promtool check metrics"
 * lints (prometheus/prometheus util/promlint): counters end in _total,
 * base units (seconds), timestamps as _timestamp_seconds.  The text is
 * rendered by the main thread and copied under a mutex by the listener's
 * thread; the textfile is written to PATH.tmp, fsync'ed and renamed, so
 * node_exporter never reads half a file.
 */


#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"
#include "util.h"


static pthread_mutex_t  meter_metrics_lock = PTHREAD_MUTEX_INITIALIZER;
static char            *meter_metrics_buf;
static size_t           meter_metrics_len;


int
meter_metrics_check(const meter_conf_t *cf, char *err, size_t errlen)
{
    const char  *v;

    v = meter_conf_get(cf, "metrics.http");
    if (v != NULL && strcmp(v, "on") != 0 && strcmp(v, "off") != 0) {
        snprintf(err, errlen, "\"metrics.http\": \"%s\" is not on or off", v);
        return -1;
    }

    if (v != NULL && strcmp(v, "on") == 0
        && meter_conf_get(cf, "webhook.listen") == NULL)
    {
        snprintf(err, errlen, "\"metrics.http\" is on but \"webhook.listen\" "
                 "is not set (the listener serves /metrics)");
        return -1;
    }

    v = meter_conf_get(cf, "metrics.textfile");
    if (v != NULL && (v[0] != '/' || strlen(v) > 4000)) {
        snprintf(err, errlen, "\"metrics.textfile\": \"%s\" is not an "
                 "absolute path", v);
        return -1;
    }

    return 0;
}


int
meter_metrics_http(const meter_conf_t *cf)
{
    const char  *v;

    v = meter_conf_get(cf, "metrics.http");

    return v != NULL && strcmp(v, "on") == 0;
}


static int
meter_metrics_render(const meter_metrics_t *m, time_t now, meter_str_t *s)
{
    const char  *p;
    int          rc;

    p = m->provider;

#define meter_metric(name, type, help)                                       \
    meter_str_printf(s, "# HELP meter_worker_" name " " help "\n"            \
                     "# TYPE meter_worker_" name " " type "\n")

    rc = 0;

    rc |= meter_metric("records_sent_total", "counter",
                       "Records the provider accepted.");
    rc |= meter_str_printf(s, "meter_worker_records_sent_total"
                           "{provider=\"%s\"} %llu\n", p, m->sent);
    rc |= meter_metric("records_failed_total", "counter",
                       "Delivery attempts that failed and will be retried.");
    rc |= meter_str_printf(s, "meter_worker_records_failed_total"
                           "{provider=\"%s\"} %llu\n", p, m->failed);
    rc |= meter_metric("records_dead_lettered_total", "counter",
                       "Records moved to the dead letters.");
    rc |= meter_str_printf(s, "meter_worker_records_dead_lettered_total"
                           "{provider=\"%s\"} %llu\n", p, m->dead);
    rc |= meter_metric("requests_in_flight", "gauge",
                       "Provider requests open now.");
    rc |= meter_str_printf(s, "meter_worker_requests_in_flight"
                           "{provider=\"%s\"} %u\n", p, m->in_flight);
    rc |= meter_metric("backlog_records", "gauge",
                       "Key-hours of closed hours not yet billed (about the "
                       "records still to send).");
    rc |= meter_str_printf(s, "meter_worker_backlog_records %llu\n",
                           m->backlog);
    rc |= meter_metric("drain_rate_records_per_second", "gauge",
                       "Records finished per second while there was work.");
    rc |= meter_str_printf(s, "meter_worker_drain_rate_records_per_second "
                           "%.3f\n", m->rate);
    rc |= meter_metric("oldest_unbilled_hour_timestamp_seconds", "gauge",
                       "Start of the oldest closed hour not yet billed "
                       "(0: none).");
    rc |= meter_str_printf(s, "meter_worker_oldest_unbilled_hour_timestamp_"
                           "seconds %lld\n", (long long) m->oldest_unbilled);
    rc |= meter_metric("last_drain_timestamp_seconds", "gauge",
                       "End of the last complete drain pass (0: none yet).");
    rc |= meter_str_printf(s, "meter_worker_last_drain_timestamp_seconds "
                           "%lld\n", (long long) m->last_drain);
    rc |= meter_metric("last_sync_timestamp_seconds", "gauge",
                       "End of the last successful delinquency sync "
                       "(0: none yet).");
    rc |= meter_str_printf(s, "meter_worker_last_sync_timestamp_seconds "
                           "%lld\n", (long long) m->sync_last);

    if (m->sync_last != 0) {
        rc |= meter_metric("sync_age_seconds", "gauge",
                           "Seconds since the last successful delinquency "
                           "sync.");
        rc |= meter_str_printf(s, "meter_worker_sync_age_seconds %lld\n",
                               (long long) (now - m->sync_last));
    }

#undef meter_metric

    return rc != 0 ? -1 : 0;
}


static int
meter_metrics_write(const char *path, const char *data, size_t len)
{
    char     tmp[4096 + 8];
    int      fd;
    size_t   done;
    ssize_t  n;

    snprintf(tmp, sizeof(tmp), "%s.tmp", path);

    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd == -1) {
        meter_log(LOG_WARNING, "metrics.textfile: cannot open \"%s\": %s",
                  tmp, strerror(errno));
        return -1;
    }

    for (done = 0; done < len; done += (size_t) n) {
        n = write(fd, data + done, len - done);
        if (n == -1 && errno == EINTR) {
            n = 0;
            continue;
        }

        if (n <= 0) {
            meter_log(LOG_WARNING, "metrics.textfile: cannot write \"%s\": "
                      "%s", tmp, strerror(errno));
            close(fd);
            unlink(tmp);
            return -1;
        }
    }

    if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        meter_log(LOG_WARNING, "metrics.textfile: cannot replace \"%s\": %s",
                  path, strerror(errno));
        unlink(tmp);
        return -1;
    }

    return 0;
}


int
meter_metrics_publish(const meter_conf_t *cf, const meter_metrics_t *m,
    time_t now)
{
    const char   *path;
    meter_str_t   s;
    char         *old;
    int           rc;

    memset(&s, 0, sizeof(meter_str_t));

    if (meter_metrics_render(m, now, &s) != 0) {
        meter_str_free(&s);
        return -1;
    }

    rc = 0;
    path = meter_conf_get(cf, "metrics.textfile");

    if (path != NULL) {
        rc = meter_metrics_write(path, s.data, s.len);
    }

    pthread_mutex_lock(&meter_metrics_lock);
    old = meter_metrics_buf;
    meter_metrics_buf = s.data;
    meter_metrics_len = s.len;
    pthread_mutex_unlock(&meter_metrics_lock);

    free(old);

    return rc;
}


char *
meter_metrics_text(size_t *len)
{
    char  *p;

    p = NULL;
    *len = 0;

    pthread_mutex_lock(&meter_metrics_lock);

    if (meter_metrics_buf != NULL) {
        p = malloc(meter_metrics_len + 1);
        if (p != NULL) {
            memcpy(p, meter_metrics_buf, meter_metrics_len);
            p[meter_metrics_len] = '\0';
            *len = meter_metrics_len;
        }
    }

    pthread_mutex_unlock(&meter_metrics_lock);

    return p;
}
