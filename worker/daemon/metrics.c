
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


/* one metric: HELP, TYPE and its sample (labels "" or {provider="..."}) */
static int
meter_metrics_one(meter_str_t *s, const char *name, const char *type,
    const char *help, const char *labels, const char *value)
{
    return meter_str_printf(s, "# HELP meter_worker_%s %s\n"
                            "# TYPE meter_worker_%s %s\n"
                            "meter_worker_%s%s %s\n",
                            name, help, name, type, name, labels, value);
}


static int
meter_metrics_render(const meter_metrics_t *m, time_t now, meter_str_t *s)
{
    char    lp[160], v[9][32];
    size_t  i;

    static const struct {
        const char  *name;
        const char  *type;
        int          labelled;
        const char  *help;
    } metrics[] = {
        { "records_sent_total", "counter", 1,
          "Records the provider accepted." },
        { "records_failed_total", "counter", 1,
          "Delivery attempts that failed and will be retried." },
        { "records_dead_lettered_total", "counter", 1,
          "Records moved to the dead letters." },
        { "requests_in_flight", "gauge", 1,
          "Provider requests open now." },
        { "backlog_records", "gauge", 0,
          "Counters of closed hours not yet billed (about the records "
          "still to send)." },
        { "drain_rate_records_per_second", "gauge", 0,
          "Records finished per second while there was work." },
        { "oldest_unbilled_hour_timestamp_seconds", "gauge", 0,
          "Start of the oldest closed hour not yet billed (0: none)." },
        { "last_drain_timestamp_seconds", "gauge", 0,
          "End of the last complete drain pass (0: none yet)." },
        { "last_sync_timestamp_seconds", "gauge", 0,
          "End of the last successful delinquency sync (0: none yet)." },
    };

    snprintf(lp, sizeof(lp), "{provider=\"%s\"}", m->provider);
    snprintf(v[0], sizeof(v[0]), "%llu", m->sent);
    snprintf(v[1], sizeof(v[1]), "%llu", m->failed);
    snprintf(v[2], sizeof(v[2]), "%llu", m->dead);
    snprintf(v[3], sizeof(v[3]), "%u", m->in_flight);
    snprintf(v[4], sizeof(v[4]), "%llu", m->backlog);
    snprintf(v[5], sizeof(v[5]), "%.3f", m->rate);
    snprintf(v[6], sizeof(v[6]), "%lld", (long long) m->oldest_unbilled);
    snprintf(v[7], sizeof(v[7]), "%lld", (long long) m->last_drain);
    snprintf(v[8], sizeof(v[8]), "%lld", (long long) m->sync_last);

    for (i = 0; i < sizeof(metrics) / sizeof(metrics[0]); i++) {
        if (meter_metrics_one(s, metrics[i].name, metrics[i].type,
                              metrics[i].help,
                              metrics[i].labelled ? lp : "", v[i])
            != 0)
        {
            return -1;
        }
    }

    if (m->sync_last != 0) {
        snprintf(v[0], sizeof(v[0]), "%lld", (long long) (now - m->sync_last));

        if (meter_metrics_one(s, "sync_age_seconds", "gauge",
                              "Seconds since the last successful "
                              "delinquency sync.", "", v[0])
            != 0)
        {
            return -1;
        }
    }

    return 0;
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
