
/*
 * Copyright (C) nginx-meter authors
 *
 * meter-worker: drains closed hours of usage from Redis into a billing
 * provider, exactly once, as a systemd notify service or with --once.
 *
 * EXIT STATUS
 *   0   success (--once: everything due was accepted)
 *   64  usage: bad command line
 *   65  --once: some records were dead-lettered (see "meterctl status")
 *   69  Redis unreachable at start (--once)
 *   75  temporary: another worker holds the lock, or records wait for a
 *       retry, or Redis failed mid-drain; run again later
 *   78  configuration error (the message names file:line and key)
 *
 * Besides draining, the daemon polls the provider for overdue customers
 * every sync_interval (sync.c) and, with "webhook.listen", serves the
 * provider's webhooks in a thread (webhook.c).
 */


#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <systemd/sd-daemon.h>

#include "alerts.h"
#include "config.h"
#include "drain.h"
#include "due.h"
#include "http.h"
#include "jsonl.h"
#include "log.h"
#include "meter_schema.h"
#include "metrics.h"
#include "provider.h"
#include "redis.h"
#include "gov.h"
#include "sync.h"
#include "unique_retention.h"
#include "util.h"
#include "webhook.h"


#define METER_VERSION       "0.1.0"
#define METER_ONCE_WAIT     60      /* --once waits for retries this close */


typedef struct {
    meter_conf_t               *cf;
    meter_provider_t            provider;
    int                         provider_ok;
    meter_jsonl_t               audit;
    int                         audit_ok;
    meter_redis_t               redis;
    meter_webhook_srv_t        *webhook;
    meter_alerts_t             *alerts;         /* NULL: no rule */
    uint64_t                    watchdog_usec;
    struct timespec             petted;
    meter_metrics_t             metrics;
    time_t                      pause;          /* provider down: s */
} meter_worker_t;


static volatile sig_atomic_t  meter_stop;
static volatile sig_atomic_t  meter_reload;


static void
meter_signal(int signo)
{
    if (signo == SIGHUP) {
        meter_reload = 1;

    } else {
        meter_stop = 1;
    }
}


static void
meter_usage(FILE *f)
{
    fprintf(f,
        "Usage: meter-worker -c FILE [options]\n"
        "\n"
        "Drains closed hours of metered usage from Redis into the billing\n"
        "provider configured in FILE, exactly once.\n"
        "\n"
        "  -c, --config FILE    config file (required)\n"
        "      --once           drain what is due, then exit\n"
        "      --before TIME    treat every hour that ended before TIME\n"
        "                       (ISO 8601, UTC) as closed\n"
        "      --dry-run        print what would be sent; change nothing\n"
        "      --sync-only      with --once: poll the provider for overdue\n"
        "                       customers (delinquency sync) instead of\n"
        "                       draining\n"
        "  -t, --test-config    check the config and the provider, then exit\n"
        "  -h, --help           this help\n"
        "  -V, --version        print the version\n"
        "\n"
        "Exit status: 0 ok, 64 usage, 65 records dead-lettered (--once),\n"
        "69 Redis unavailable, 75 try again later, 78 config error.\n");
}


static void
meter_tick(void *data)
{
    meter_worker_t   *w;
    struct timespec   now;
    uint64_t          el;

    w = data;

    if (w->watchdog_usec == 0) {
        return;
    }

    clock_gettime(CLOCK_MONOTONIC, &now);
    el = (uint64_t) (now.tv_sec - w->petted.tv_sec) * 1000000
         + (uint64_t) ((now.tv_nsec - w->petted.tv_nsec) / 1000);

    if (el >= w->watchdog_usec / 2) {
        sd_notify(0, "WATCHDOG=1");
        w->petted = now;
    }
}


/* provider and audit log for cf; 0 or -1 with err */
static int
meter_worker_open(meter_conf_t *cf, meter_provider_t *p, meter_jsonl_t *audit,
    int *audit_ok, int dry_run, char *err, size_t errlen)
{
    char  e[512];

    *audit_ok = 0;

    if (meter_provider_by_name(cf->provider, p) != 0) {
        snprintf(err, errlen, "%s: unknown provider \"%s\"", cf->path,
                 cf->provider);
        return -1;
    }

    if (dry_run) {
        return 0;
    }

    if (p->init(p, cf, e, sizeof(e)) != 0) {
        snprintf(err, errlen, "%s: provider %s: %s", cf->path, p->name, e);
        return -1;
    }

    if (p->send == NULL) {
        snprintf(err, errlen, "provider %s has no send function", p->name);
        if (p->cleanup != NULL) {
            p->cleanup(p);
        }
        return -1;
    }

    if (cf->audit_path != NULL) {
        if (meter_jsonl_open(audit, cf->audit_path, e, sizeof(e)) != 0) {
            snprintf(err, errlen, "%s: \"audit.path\": %s", cf->path, e);
            if (p->cleanup != NULL) {
                p->cleanup(p);
            }
            return -1;
        }

        *audit_ok = 1;
    }

    return 0;
}


static void
meter_worker_close(meter_worker_t *w)
{
    if (w->provider_ok && w->provider.cleanup != NULL) {
        w->provider.cleanup(&w->provider);
    }

    w->provider_ok = 0;

    if (w->audit_ok) {
        meter_jsonl_close(&w->audit);
        w->audit_ok = 0;
    }
}


static int
meter_worker_connect(meter_worker_t *w, char *err, size_t errlen)
{
    char  e[512];
    int   rc;

    rc = meter_redis_open(&w->redis, w->cf->redis_host, w->cf->redis_port,
                          w->cf->redis_unix, w->cf->redis_password_file,
                          w->cf->redis_db, w->cf->redis_timeout_ms, e,
                          sizeof(e));

    if (rc == -2) {
        snprintf(err, errlen, "%s: \"redis.password_file\": %s", w->cf->path,
                 e);
        return -1;
    }

    if (rc != 0) {
        snprintf(err, errlen, "%s", e);
    }

    return rc;
}


/*
 * Lago requires external_subscription_id (getlago/lago-openapi
 * src/schemas/EventInputObject.yaml): -t names the customers without a
 * subscription.  Redis unreachable: a warning, the config is still ok.
 */
static int
meter_lago_check(meter_worker_t *w, char *err, size_t errlen)
{
    int          n;
    size_t       i, len;
    char         e[512];
    const char  *fmt;
    redisReply  *ids, *rp;

    fmt = meter_conf_get(w->cf, "http.format");

    if (strcmp(w->cf->provider, "http") != 0 || fmt == NULL
        || strcmp(fmt, "lago") != 0)
    {
        return 0;
    }

    if (meter_worker_connect(w, e, sizeof(e)) != 0) {
        meter_log(LOG_WARNING, "Lago customers not checked: %s", e);
        return 0;
    }

    ids = meter_redis_cmd(&w->redis, "SMEMBERS " MTR_CUSTOMERS);
    if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(ids);
        meter_log(LOG_WARNING, "Lago customers not checked: Redis error");
        return 0;
    }

    n = snprintf(err, errlen, "Lago requires external_subscription_id; "
                 "customers without a subscription (meterctl customers add "
                 "ID --subscription SUB):");
    len = n > 0 ? (size_t) n : 0;
    n = 0;

    for (i = 0; i < ids->elements; i++) {
        rp = meter_redis_cmd(&w->redis, "HMGET " MTR_CUST_FMT " provider "
                             "subscription", ids->element[i]->str);

        if (meter_reply_ok(rp) && rp->type == REDIS_REPLY_ARRAY
            && rp->elements == 2 && rp->element[0]->type == REDIS_REPLY_STRING
            && strcmp(rp->element[0]->str, "http") == 0
            && rp->element[1]->type != REDIS_REPLY_STRING)
        {
            n++;
            if (len < errlen) {
                len += snprintf(err + len, errlen - len, " %s",
                                ids->element[i]->str);
            }
        }

        freeReplyObject(rp);
    }

    freeReplyObject(ids);

    return n > 0 ? -1 : 0;
}


static void meter_worker_alerts_reload(meter_worker_t *w);


static void
meter_worker_reload(meter_worker_t *w)
{
    char               err[1024];
    struct timespec    ts;
    meter_conf_t      *cf;
    meter_jsonl_t      audit;
    meter_provider_t   p;
    int                audit_ok;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
               (unsigned long long) ts.tv_sec * 1000000
               + (unsigned long long) ts.tv_nsec / 1000);

    cf = meter_conf_load(w->cf->path, err, sizeof(err));
    if (cf == NULL) {
        meter_log(LOG_ERR, "reload failed, keeping the old config: %s", err);
        sd_notify(0, "READY=1");
        return;
    }

    /* the old provider may hold the audit/output files: close first, and
     * reopen the old set if the new one fails */
    meter_worker_close(w);

    if (meter_worker_open(cf, &p, &audit, &audit_ok, 0, err, sizeof(err))
        != 0)
    {
        meter_log(LOG_ERR, "reload failed, keeping the old config: %s", err);
        meter_conf_free(cf);

        if (meter_worker_open(w->cf, &w->provider, &w->audit, &w->audit_ok,
                              0, err, sizeof(err))
            != 0)
        {
            meter_log(LOG_ERR, "cannot reopen the old provider: %s", err);
            meter_stop = 1;

        } else {
            w->provider_ok = 1;
        }

        sd_notify(0, "READY=1");
        return;
    }

    meter_conf_free(w->cf);
    w->cf = cf;
    w->provider = p;
    w->provider_ok = 1;
    w->audit = audit;
    w->audit_ok = audit_ok;
    meter_log_level = cf->log_level;

    /* the Redis settings may have changed */
    meter_redis_close(&w->redis);

    meter_worker_alerts_reload(w);

    meter_log(LOG_NOTICE, "config reloaded from %s", cf->path);
    sd_notify(0, "READY=1");
}


/* a bad alert rule keeps the old rules (the rest of the new config is
 * already in use) */
static void
meter_worker_alerts_reload(meter_worker_t *w)
{
    char             err[1024];
    meter_alerts_t  *a;

    if (meter_alerts_open(w->cf, &a, err, sizeof(err)) != 0) {
        meter_log(LOG_ERR, "alerts: keeping the old rules: %s", err);
        return;
    }

    meter_alerts_free(w->alerts);
    w->alerts = a;
}


/* the next time an hour closes, after now */
static time_t
meter_next_close(time_t now, time_t grace)
{
    return meter_period_start(now - grace, METER_HOUR) + METER_HOUR + grace;
}


static void
meter_sleep_until(meter_worker_t *w, time_t until)
{
    struct timespec  ts;

    while (!meter_stop && !meter_reload && time(NULL) < until
           && !meter_alerts_due(w->alerts, time(NULL)))
    {
        meter_tick(w);

        ts.tv_sec = 1;
        ts.tv_nsec = 0;
        nanosleep(&ts, NULL);
    }
}


/* one delinquency poll; 0, or -1 when Redis failed */
static int
meter_worker_sync(meter_worker_t *w)
{
    meter_sync_t  s;

    memset(&s, 0, sizeof(meter_sync_t));
    s.cf = w->cf;
    s.provider = &w->provider;
    s.redis = &w->redis;
    s.stop = &meter_stop;

    sd_notify(0, "STATUS=delinquency sync");

    if (meter_sync_run(&s) != 0) {
        meter_log(LOG_ERR, "sync: %s", s.error);
        return -1;
    }

    return s.provider_ok ? 0 : 1;
}


static int
meter_run_sync_once(meter_worker_t *w)
{
    char  err[1024];
    int   rc;

    if (!meter_sync_enabled(w->cf, &w->provider)) {
        meter_log(LOG_ERR, "provider %s has no delinquency sync (or "
                  "\"sync.delinquency = off\")", w->cf->provider);
        return EX_CONFIG;
    }

    if (meter_worker_connect(w, err, sizeof(err)) != 0) {
        meter_log(LOG_ERR, "%s", err);
        return EX_UNAVAILABLE;
    }

    rc = meter_worker_sync(w);

    return rc == 0 ? EX_OK : EX_TEMPFAIL;
}


/* quotas of plans: republished every sync_interval and at each reset
 * (lib/gov.c); *next is when to come back */
static void
meter_worker_quota(meter_worker_t *w, time_t now, time_t *next)
{
    char  err[1024];

    *next = 0;

    if (meter_gov_quota_all(&w->redis, w->cf, now, next, err, sizeof(err))
        != 0)
    {
        meter_log(LOG_ERR, "quota: %s", err);
        *next = now + 5;
        return;
    }

    if (*next == 0 || *next > now + w->cf->sync_interval) {
        *next = now + w->cf->sync_interval;
    }
}


/*
 * After a drain turn: the counters, the rate while busy, the backlog and
 * its ETA's inputs in mtr:{worker}:stats (meterctl status), the metrics.
 */
static void
meter_worker_account(meter_worker_t *w, const meter_drain_t *d,
    meter_drain_rc_e rc, double secs)
{
    time_t               now, oldest;
    double               r;
    redisReply          *rp;
    meter_metrics_t     *m;
    unsigned long long   backlog;

    m = &w->metrics;
    now = time(NULL);

    m->provider = w->cf->provider;
    m->sent += d->sent;
    m->failed += d->retried;
    m->dead += d->dead;
    m->in_flight = meter_send_stats.in_flight;      /* lib/http_multi.c */

    if (rc == METER_DRAIN_OK) {
        m->last_drain = now;
    }

    /* records/s of the turns that had work, smoothed */
    if (d->sent > 0 && secs > 0.001) {
        r = (double) d->sent / secs;
        m->rate = (m->rate == 0.0) ? r : 0.7 * m->rate + 0.3 * r;
    }

    if (w->redis.ctx == NULL
        || meter_due_backlog(&w->redis, now - w->cf->grace, now, &backlog,
                             &oldest)
           != 0)
    {
        return;
    }

    m->backlog = backlog;
    m->oldest_unbilled = oldest;

    rp = meter_redis_cmd(&w->redis, "HSET " MTR_W_STATS " backlog %llu "
                         "oldest_unbilled %lld rate %.3f backlog_at %lld",
                         backlog, (long long) oldest, m->rate,
                         (long long) now);
    freeReplyObject(rp);

    meter_metrics_publish(w->cf, m, now);
}


static int
meter_run_daemon(meter_worker_t *w)
{
    char              err[1024];
    time_t            now, next, retry, next_sync, next_quota, wake;
    int               ready, backoff, standby;
    meter_drain_t     d;
    struct timespec   t0, t1;
    meter_drain_rc_e  rc;

    ready = 0;
    standby = 0;
    backoff = 1;
    next = 0;       /* catch up at once */
    next_sync = 0;
    next_quota = 0;

    while (!meter_stop) {
        if (meter_reload) {
            meter_reload = 0;

            /* the listener reads the config being replaced */
            meter_webhook_stop(w->webhook);
            w->webhook = NULL;

            meter_worker_reload(w);

            if (meter_webhook_start(w->cf, &w->webhook, err, sizeof(err))
                != 0)
            {
                meter_log(LOG_ERR, "%s; webhooks are not served", err);
            }

            next = 0;
            next_sync = 0;
            next_quota = 0;
            continue;
        }

        meter_tick(w);

        if (w->redis.ctx == NULL) {
            if (meter_worker_connect(w, err, sizeof(err)) != 0) {
                meter_log(LOG_ERR, "%s; retrying in %ds", err, backoff);
                sd_notifyf(0, "STATUS=waiting for Redis: %s", err);
                meter_sleep_until(w, time(NULL) + backoff);
                backoff = (backoff < 30) ? backoff * 2 : 30;
                continue;
            }

            backoff = 1;

            if (!ready) {
                ready = 1;
                sd_notify(0, "READY=1");
                meter_log(LOG_NOTICE, "started: provider %s, %s periods",
                          w->cf->provider,
                          w->cf->report_period == METER_DAY ? "day" : "hour");
            }
        }

        now = time(NULL);

        /* the sync, alerts and quotas write too: not to a master that the
         * Sentinels replaced (drain.c asks them again during a pass) */
        if (meter_redis_follow(&w->redis, w->cf->redis_host,
                               w->cf->redis_timeout_ms)
            != 0)
        {
            meter_log(LOG_WARNING, "%s", w->redis.err);
            continue;
        }

        if (now >= next_sync && meter_sync_enabled(w->cf, &w->provider)) {
            next_sync = now + w->cf->sync_interval;

            switch (meter_worker_sync(w)) {
            case -1:
                meter_redis_close(&w->redis);
                next_sync = now + 5;
                continue;
            case 0:
                w->metrics.sync_last = time(NULL);
                break;
            default:
                break;
            }
        }

        if (meter_alerts_run(w->alerts, &w->redis, now, &meter_stop,
                             meter_tick, w)
            != 0)
        {
            meter_log(LOG_ERR, "alerts interrupted by a Redis error; "
                      "reconnecting");
            meter_redis_close(&w->redis);
            continue;
        }

        if (now >= next_quota) {
            meter_worker_quota(w, now, &next_quota);

            if (w->redis.ctx == NULL) {
                continue;
            }
        }

        if (now < next) {
            wake = meter_sync_enabled(w->cf, &w->provider)
                   && next_sync < next ? next_sync : next;
            meter_sleep_until(w, next_quota < wake ? next_quota : wake);
            continue;
        }

        memset(&d, 0, sizeof(meter_drain_t));
        d.cf = w->cf;
        d.provider = &w->provider;
        d.redis = &w->redis;
        d.audit = w->audit_ok ? &w->audit : NULL;
        d.stop = &meter_stop;
        d.tick = meter_tick;
        d.tick_data = w;

        /* bounded work per turn: the sync and the watchdog get their turn
         * during a long backlog (webhooks have their own thread) */
        clock_gettime(CLOCK_MONOTONIC, &t0);
        d.deadline = t0;
        d.deadline.tv_sec += w->cf->turn_ms / 1000;
        d.deadline.tv_nsec += (w->cf->turn_ms % 1000) * 1000000;
        if (d.deadline.tv_nsec >= 1000000000) {
            d.deadline.tv_sec++;
            d.deadline.tv_nsec -= 1000000000;
        }

        sd_notify(0, "STATUS=draining");

        rc = meter_drain_run(&d);

        /* unique users have no EXPIRE: removed here, after a full pass */
        if (rc == METER_DRAIN_OK && !d.dry_run) {
            (void) meter_unique_retention(&w->redis, w->cf, time(NULL));
        }

        clock_gettime(CLOCK_MONOTONIC, &t1);
        meter_worker_account(w, &d, rc, (double) (t1.tv_sec - t0.tv_sec)
                             + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9);

        now = time(NULL);
        next = meter_next_close(now, w->cf->grace);

        if (now + w->cf->sync_interval < next) {
            next = now + w->cf->sync_interval;
        }

        if (d.next_due != 0 && d.next_due < next) {
            next = (d.next_due > now) ? d.next_due : now + 1;
        }

        if (d.sent > 0 || rc == METER_DRAIN_OK) {
            w->pause = 0;
        }

        switch (rc) {

        case METER_DRAIN_OK:
            if (standby) {
                standby = 0;
                meter_log(LOG_NOTICE, "the drain lock is free: this worker "
                          "drains now");
            }

            meter_log(d.created || d.sent || d.dead || d.retried
                      ? LOG_INFO : LOG_DEBUG,
                      "drain: %u sent, %u to retry, %u dead-lettered, "
                      "%u held (no customer), %u waiting", d.sent, d.retried,
                      d.dead, d.held, d.waiting);
            sd_notifyf(0, "STATUS=last drain: %u sent, %u to retry, "
                       "%u dead-lettered, %u held", d.sent, d.retried,
                       d.dead, d.held);
            break;

        case METER_DRAIN_LOCKED:
            /* a standby: back when the active worker's lock runs out (it
             * renews it every lock_ttl/3), so a dead one is replaced
             * within lock_ttl and a second */
            retry = now + (w->cf->lock_ttl / 2 > 0 ? w->cf->lock_ttl / 2 : 1);
            if (d.lock_pttl >= 0 && now + d.lock_pttl / 1000 + 1 < retry) {
                retry = now + d.lock_pttl / 1000 + 1;
            }

            if (retry < next) {
                next = retry;
            }

            if (!standby) {
                standby = 1;
                meter_log(LOG_NOTICE, "standby: another worker holds the "
                          "drain lock (%lld ms left); taking over when it "
                          "runs out", d.lock_pttl);
            }

            sd_notify(0, "STATUS=standby: another worker holds the drain "
                      "lock");
            break;

        case METER_DRAIN_STOPPED:
            break;

        case METER_DRAIN_MORE:
            if (d.paused) {
                /* the provider is failing: try again soon, backing off */
                w->pause = (w->pause == 0) ? 1 : w->pause * 2;
                if (w->pause > 60) {
                    w->pause = 60;
                }

                next = now + w->pause;
                sd_notifyf(0, "STATUS=provider failing; drain paused %llds",
                           (long long) w->pause);
                break;
            }

            /* the turn's time is up: the loop's other work, then on */
            next = now;
            sd_notifyf(0, "STATUS=catching up: %llu due, %.0f records/s",
                       w->metrics.backlog, w->metrics.rate);
            break;

        default:
            meter_log(LOG_ERR, "drain interrupted by a Redis error; "
                      "reconnecting");
            sd_notify(0, "STATUS=Redis error during drain; reconnecting");
            meter_redis_close(&w->redis);
            next = now + 5;
            break;
        }
    }

    sd_notify(0, "STOPPING=1");
    meter_log(LOG_NOTICE, "stopping");

    return EX_OK;
}


static int
meter_run_once(meter_worker_t *w, time_t before, int dry_run)
{
    char              err[1024];
    time_t            now;
    unsigned          dead, sent;
    meter_drain_t     d;
    meter_drain_rc_e  rc;

    if (meter_worker_connect(w, err, sizeof(err)) != 0) {
        meter_log(LOG_ERR, "%s", err);
        return EX_UNAVAILABLE;
    }

    dead = 0;
    sent = 0;

    for ( ;; ) {
        memset(&d, 0, sizeof(meter_drain_t));
        d.cf = w->cf;
        d.provider = &w->provider;
        d.redis = &w->redis;
        d.audit = w->audit_ok ? &w->audit : NULL;
        d.before = before;
        d.dry_run = dry_run;
        d.stop = &meter_stop;

        rc = meter_drain_run(&d);

        if (rc == METER_DRAIN_OK && !dry_run) {
            (void) meter_unique_retention(&w->redis, w->cf, time(NULL));
        }

        dead += d.dead;
        sent += d.sent;

        if (rc == METER_DRAIN_MORE && d.next_due == 0) {
            d.next_due = time(NULL) + 1;
        }

        if ((rc != METER_DRAIN_OK && rc != METER_DRAIN_MORE) || dry_run) {
            break;
        }

        now = time(NULL);

        /* retries due soon are worth waiting for; later ones are left to
         * the next run */
        if (d.next_due == 0 || d.next_due > now + METER_ONCE_WAIT
            || meter_stop)
        {
            break;
        }

        while (!meter_stop && time(NULL) < d.next_due) {
            sleep(1);
        }
    }

    switch (rc) {

    case METER_DRAIN_OK:
    case METER_DRAIN_MORE:
        break;

    case METER_DRAIN_LOCKED:
        meter_log(LOG_ERR, "another worker holds the drain lock");
        return EX_TEMPFAIL;

    case METER_DRAIN_STOPPED:
        meter_log(LOG_NOTICE, "stopped: %u records sent", sent);
        return EX_OK;

    default:
        meter_log(LOG_ERR, "drain failed: Redis error");
        return EX_TEMPFAIL;
    }

    meter_log(LOG_INFO, "drain: %u sent, %u dead-lettered, %u held (no "
              "customer), %u waiting", sent, dead, d.held, d.waiting);

    if (dead > 0) {
        meter_log(LOG_ERR, "%u records dead-lettered; see \"meterctl "
                  "status\"", dead);
        return EX_DATAERR;
    }

    if (d.next_due != 0) {
        meter_log(LOG_WARNING, "records wait for a retry; run again later");
        return EX_TEMPFAIL;
    }

    return EX_OK;
}


int
main(int argc, char **argv)
{
    static const struct option  options[] = {
        { "config", required_argument, NULL, 'c' },
        { "once", no_argument, NULL, 'o' },
        { "before", required_argument, NULL, 'b' },
        { "dry-run", no_argument, NULL, 'n' },
        { "sync-only", no_argument, NULL, 's' },
        { "test-config", no_argument, NULL, 't' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 }
    };

    char              err[1024];
    const char       *path;
    time_t            before;
    int               c, once, dry_run, test, rc, sync_only;
    struct sigaction  sa;
    meter_worker_t    w;

    path = NULL;
    before = 0;
    once = 0;
    dry_run = 0;
    test = 0;
    sync_only = 0;

    while ((c = getopt_long(argc, argv, "c:thV", options, NULL)) != -1) {
        switch (c) {

        case 'c':
            path = optarg;
            break;

        case 'o':
            once = 1;
            break;

        case 'b':
            before = meter_iso8601_parse(optarg);
            if (before == -1) {
                fprintf(stderr, "meter-worker: invalid --before \"%s\" "
                        "(expected ISO 8601 such as 2026-11-24T10:00:00Z)\n",
                        optarg);
                return EX_USAGE;
            }
            break;

        case 'n':
            dry_run = 1;
            break;

        case 's':
            sync_only = 1;
            break;

        case 't':
            test = 1;
            break;

        case 'h':
            meter_usage(stdout);
            return EX_OK;

        case 'V':
            printf("meter-worker %s\n", METER_VERSION);
            return EX_OK;

        default:
            meter_usage(stderr);
            return EX_USAGE;
        }
    }

    if (optind < argc) {
        fprintf(stderr, "meter-worker: unexpected argument \"%s\"\n",
                argv[optind]);
        return EX_USAGE;
    }

    if (path == NULL) {
        fprintf(stderr, "meter-worker: -c FILE is required\n");
        meter_usage(stderr);
        return EX_USAGE;
    }

    if ((before != 0 || dry_run || sync_only) && !once) {
        fprintf(stderr, "meter-worker: --before, --dry-run and --sync-only "
                "need --once\n");
        return EX_USAGE;
    }

    if (sync_only && (before != 0 || dry_run)) {
        fprintf(stderr, "meter-worker: --sync-only takes no --before or "
                "--dry-run\n");
        return EX_USAGE;
    }

    memset(&w, 0, sizeof(meter_worker_t));

    w.cf = meter_conf_load(path, err, sizeof(err));
    if (w.cf == NULL) {
        meter_log(LOG_ERR, "%s", err);
        return EX_CONFIG;
    }

    meter_log_level = w.cf->log_level;

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        meter_log(LOG_ERR, "curl_global_init failed");
        meter_conf_free(w.cf);
        return EX_OSERR;
    }

    /* a FIFO as file.path blocks in open until its reader comes */
    if (meter_worker_open(w.cf, &w.provider, &w.audit, &w.audit_ok,
                          dry_run, err, sizeof(err))
        != 0)
    {
        meter_log(LOG_ERR, "%s", err);
        meter_conf_free(w.cf);
        curl_global_cleanup();
        return EX_CONFIG;
    }

    w.provider_ok = !dry_run;

    if (meter_metrics_check(w.cf, err, sizeof(err)) != 0) {
        meter_log(LOG_ERR, "%s: %s", path, err);
        meter_worker_close(&w);
        meter_conf_free(w.cf);
        curl_global_cleanup();
        return EX_CONFIG;
    }

    if (meter_alerts_open(w.cf, &w.alerts, err, sizeof(err)) != 0) {
        meter_log(LOG_ERR, "%s", err);
        meter_worker_close(&w);
        meter_conf_free(w.cf);
        curl_global_cleanup();
        return EX_CONFIG;
    }

    if (test) {
        if (meter_webhook_check(w.cf, err, sizeof(err)) != 0
            || meter_lago_check(&w, err, sizeof(err)) != 0)
        {
            meter_log(LOG_ERR, "%s", err);
            meter_redis_close(&w.redis);
            meter_worker_close(&w);
            meter_alerts_free(w.alerts);
            meter_conf_free(w.cf);
            curl_global_cleanup();
            return EX_CONFIG;
        }

        if (w.alerts != NULL) {
            printf("%s: configuration is ok (provider %s, %zu alert "
                   "rules)\n", path, w.cf->provider, w.alerts->nrules);

        } else {
            printf("%s: configuration is ok (provider %s)\n", path,
                   w.cf->provider);
        }

        meter_redis_close(&w.redis);
        meter_worker_close(&w);
        meter_alerts_free(w.alerts);
        meter_conf_free(w.cf);
        curl_global_cleanup();
        return EX_OK;
    }

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = meter_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    signal(SIGPIPE, SIG_IGN);

    if (sd_watchdog_enabled(0, &w.watchdog_usec) <= 0) {
        w.watchdog_usec = 0;
    }

    if (w.watchdog_usec != 0
        && (uint64_t) w.cf->redis_timeout_ms * 1000 > w.watchdog_usec / 2)
    {
        meter_log(LOG_WARNING, "redis.timeout (%lldms) exceeds half of "
                  "WatchdogSec: a hung Redis may trip the watchdog",
                  (long long) w.cf->redis_timeout_ms);
    }

    clock_gettime(CLOCK_MONOTONIC, &w.petted);

    if (once && sync_only) {
        rc = meter_run_sync_once(&w);

    } else if (once) {
        rc = meter_run_once(&w, before, dry_run);

    } else if (meter_webhook_start(w.cf, &w.webhook, err, sizeof(err))
               != 0)
    {
        meter_log(LOG_ERR, "%s", err);
        rc = EX_CONFIG;

    } else {
        rc = meter_run_daemon(&w);
        meter_webhook_stop(w.webhook);
    }

    meter_redis_close(&w.redis);
    meter_worker_close(&w);
    meter_alerts_free(w.alerts);
    meter_conf_free(w.cf);
    curl_global_cleanup();

    return rc;
}
