
/*
 * Copyright (C) nginx-meter authors
 *
 * Exactly once, in short (the full story is in docs/redis-schema.md):
 *
 *   - a record is stored in Redis (state "sending", with its quantity, the
 *     exact u values it covers and its idempotency key) before its first
 *     send, and never recomputed afterwards;
 *   - "sent" is set only after the provider accepted it; the b marks are
 *     then raised to the covered u values (max-only, so repeating it is
 *     harmless), the audit line written, and the record deleted;
 *   - a crash anywhere resends the stored record with the same key, which
 *     the provider (or the file provider's key set) dedupes;
 *   - no new record of a (period, subject, meter) is computed while an
 *     older one is open, so usage is never covered twice.
 */


#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "drain.h"
#include "due.h"
#include "figures.h"
#include "hours.h"
#include "http.h"
#include "log.h"
#include "meter_schema.h"
#include "scripts.h"
#include "wusage.h"


#define METER_BATCH       500     /* keys per SSCAN */
#define METER_CHUNK       100     /* records created, sent, finished together */


typedef struct {
    char                       *subject;
    char                       *customer;       /* NULL: key without one */
    char                        key_hash[65];   /* first contributing key */
    unsigned                    nkeys;
    char                        meter[MTR_METER_MAX + 1];
    uint64_t                    quantity;
    meter_str_t                 covers;         /* "HOUR KH FIELD VALUE\n" */
    int                         gauge;          /* meter_fig_kind_e: a
                                                 * figure, not a sum */
    uint64_t                    gu;             /* gauge: largest u, or
                                                 * last: latest reading */
    uint64_t                    gb;             /* gauge: largest b */
    time_t                      ghour;          /* gauge: latest hour */
    char                        fmeter[MTR_METER_MAX + 16]; /* NAME:kind */
    int                         figure;         /* a month's figure's
                                                 * record (figures.c) */
    time_t                      pend;           /* figure: month's end */
} meter_agg_t;


/* one record, as sending and finishing need it; the strings point into
 * the Redis reply it was read from, or into the aggregate it was made of */
typedef struct {
    const char                 *id;
    const char                 *customer;
    const char                 *key_hash;
    const char                 *meter;
    const char                 *covers;
    const char                 *pkey;
    const char                 *sm;
    const char                 *q;              /* quantity, decimal */
    time_t                      period_start;
    time_t                      period_end;
    uint64_t                    quantity;
    long                        attempts;
    time_t                      created;        /* first send; 0 unknown */
    unsigned long               seq;
    long                        http_status;    /* of the accepted send */
    int                         accepted;
} meter_rec_t;

/* a new record of a chunk */
typedef struct {
    meter_agg_t                *agg;            /* NULL: skipped */
    meter_rec_t                 rec;
    char                        id[METER_IDEM_LEN + 1];
    char                        pkey[64];
    char                        sm[160];
    char                        q[24];
    uint64_t                    seq;            /* the last one used */
    int                         created;
} meter_new_t;


static int meter_drain_check(meter_drain_t *d);
static meter_drain_rc_e meter_drain_resume(meter_drain_t *d);
static meter_drain_rc_e meter_drain_periods(meter_drain_t *d, time_t now);
static meter_drain_rc_e meter_drain_period(meter_drain_t *d, time_t pstart,
    char **hours, size_t nhours);
static meter_drain_rc_e meter_drain_emit(meter_drain_t *d, time_t pstart,
    meter_map_t *aggs);
static meter_drain_rc_e meter_drain_record(meter_drain_t *d, const char *id);
static meter_drain_rc_e meter_drain_resume_chunk(meter_drain_t *d,
    redisReply *ids);
static void meter_drain_retention(meter_drain_t *d, time_t now);
static meter_drain_rc_e meter_drain_replicated(meter_drain_t *d);
static meter_drain_rc_e meter_drain_follow(meter_drain_t *d, long every_ms);


static double
meter_random(void)
{
    uint32_t  v;

    if (RAND_bytes((unsigned char *) &v, sizeof(v)) != 1) {
        v = (uint32_t) rand();
    }

    return (double) v / 4294967296.0;
}


static int
meter_is_hex64(const char *s, size_t len)
{
    size_t  i;

    if (len != 64) {
        return 0;
    }

    for (i = 0; i < 64; i++) {
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) {
            return 0;
        }
    }

    return 1;
}


/* u > b as decimal strings; the difference into *delta */
static int
meter_delta(const char *u, const char *b, uint64_t *delta)
{
    uint64_t  uv, bv;

    if (meter_parse_u64(u, strlen(u), &uv) != 0) {
        return -1;
    }

    bv = 0;

    if (b != NULL && meter_parse_u64(b, strlen(b), &bv) != 0) {
        return -1;
    }

    *delta = (uv > bv) ? uv - bv : 0;

    return 0;
}


int
meter_usage_compute(const char *const *u, size_t nu, const char *const *b,
    size_t nb, const char *prefix, meter_usage_t **out, size_t *nout,
    unsigned *bad)
{
    int             gauge;
    size_t          i, j, mlen;
    uint64_t        delta, gu, gb;
    const char     *bar, *bv;
    meter_usage_t  *us, *m;

    *out = NULL;
    *nout = 0;
    us = NULL;

    for (i = 0; i + 1 < nu; i += 2) {
        bar = strchr(u[i], '|');
        mlen = (bar != NULL) ? (size_t) (bar - u[i]) : 0;

        if (mlen == 0 || mlen > MTR_METER_MAX) {
            (*bad)++;
            continue;
        }

        bv = NULL;
        for (j = 0; j + 1 < nb; j += 2) {
            if (strcmp(b[j], u[i]) == 0) {
                bv = b[j + 1];
                break;
            }
        }

        if (meter_delta(u[i + 1], bv, &delta) != 0) {
            (*bad)++;
            continue;
        }

        gauge = meter_gauge_name(u[i], mlen);
        gu = 0;
        gb = 0;

        if (gauge) {
            /* both parsed by meter_delta already */
            (void) meter_parse_u64(u[i + 1], strlen(u[i + 1]), &gu);
            if (bv != NULL) {
                (void) meter_parse_u64(bv, strlen(bv), &gb);
            }

        } else if (delta == 0) {
            continue;
        }

        m = NULL;
        for (j = 0; j < *nout; j++) {
            if (strlen(us[j].meter) == mlen
                && memcmp(us[j].meter, u[i], mlen) == 0)
            {
                m = &us[j];
                break;
            }
        }

        if (m == NULL) {
            m = realloc(us, (*nout + 1) * sizeof(meter_usage_t));
            if (m == NULL) {
                goto failed;
            }

            us = m;
            m = &us[(*nout)++];
            memset(m, 0, sizeof(meter_usage_t));
            memcpy(m->meter, u[i], mlen);
            m->meter[mlen] = '\0';
            m->gauge = gauge;
        }

        if (gauge) {
            /* the figure is the largest value, billed or not; only
             * counters above their mark need (new) marks */
            m->gu = (gu > m->gu) ? gu : m->gu;
            m->gb = (gb > m->gb) ? gb : m->gb;

            if (delta == 0) {
                continue;
            }

        } else if (m->quantity > UINT64_MAX - delta) {
            (*bad)++;
            continue;
        }

        if (!gauge) {
            m->quantity += delta;
        }

        if (meter_str_printf(&m->covers, "%s%s %s\n", prefix, u[i], u[i + 1])
            != 0)
        {
            goto failed;
        }
    }

    *out = us;

    return 0;

failed:

    meter_usage_free(us, *nout);
    *nout = 0;

    return -1;
}


void
meter_usage_free(meter_usage_t *us, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        meter_str_free(&us[i].covers);
    }

    free(us);
}


static void
meter_agg_free(void *p)
{
    meter_agg_t  *a;

    a = p;
    if (a == NULL) {
        return;
    }

    free(a->subject);
    free(a->customer);
    meter_str_free(&a->covers);
    free(a);
}


static void
meter_reply_free(void *p)
{
    freeReplyObject(p);
}


/* the lock */


int
meter_lock_acquire(meter_drain_t *d)
{
    static char    token[33];

    unsigned char  raw[16];
    redisReply    *rp;
    size_t         i;
    int            rc;

    /* one token per process: after a lost connection the next pass can
     * still renew (reclaim) the lock it holds */
    if (token[0] == '\0') {
        if (RAND_bytes(raw, sizeof(raw)) != 1) {
            for (i = 0; i < sizeof(raw); i++) {
                raw[i] = (unsigned char) rand();
            }
        }

        for (i = 0; i < sizeof(raw); i++) {
            snprintf(token + 2 * i, 3, "%02x", raw[i]);
        }
    }

    memcpy(d->token, token, sizeof(token));

    rp = meter_redis_cmd(d->redis, "SET %s %s NX PX %lld", MTR_W_LOCK,
                         d->token, (long long) d->cf->lock_ttl * 1000);
    if (!meter_reply_ok(rp)) {
        meter_log(LOG_ERR, "lock: %s", rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return -1;
    }

    rc = (rp->type == REDIS_REPLY_STATUS);
    freeReplyObject(rp);

    if (rc == 0) {
        /* ours from a pass that did not release it (a Redis error)? */
        rc = meter_lock_renew(d);
        if (rc == 0) {
            /* a standby: how long until it may take over */
            rp = meter_redis_cmd(d->redis, "PTTL %s", MTR_W_LOCK);
            d->lock_pttl = meter_reply_ok(rp) ? meter_reply_int(rp, -1) : -1;
            freeReplyObject(rp);
        }

        if (rc != 1) {
            return rc;
        }
    }

    clock_gettime(CLOCK_MONOTONIC, &d->renewed);

    return 1;
}


int
meter_lock_renew(meter_drain_t *d)
{
    redisReply  *rp;
    int          rc;

    rp = meter_redis_cmd(d->redis, "EVAL %s 1 %s %s %lld", meter_lua_renew,
                         MTR_W_LOCK, d->token,
                         (long long) d->cf->lock_ttl * 1000);
    if (!meter_reply_ok(rp)) {
        meter_log(LOG_ERR, "lock: %s", rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return -1;
    }

    rc = (meter_reply_int(rp, 0) == 1);
    freeReplyObject(rp);

    if (rc) {
        clock_gettime(CLOCK_MONOTONIC, &d->renewed);
    }

    return rc;
}


void
meter_lock_release(meter_drain_t *d)
{
    redisReply  *rp;

    rp = meter_redis_cmd(d->redis, "EVAL %s 1 %s %s", meter_lua_release,
                         MTR_W_LOCK, d->token);
    freeReplyObject(rp);
}


/*
 * The bounds of a turn: its deadline, so that the loop gets to the
 * delinquency sync and the watchdog; and the breaker, so that a provider
 * that is down is not sent the whole backlog one timeout at a time (what
 * is not yet created stays computed from u - b, oldest hour first).
 */
static int
meter_drain_bound(meter_drain_t *d, const struct timespec *now)
{
    if (d->deadline.tv_sec != 0
        && (now->tv_sec > d->deadline.tv_sec
            || (now->tv_sec == d->deadline.tv_sec
                && now->tv_nsec >= d->deadline.tv_nsec)))
    {
        return METER_DRAIN_MORE;
    }

    if (d->sent != d->streak_sent) {
        d->streak_sent = d->sent;
        d->streak_retried = d->retried;

    } else if (d->retried - d->streak_retried >= METER_DRAIN_BREAKER) {
        if (!d->paused) {
            meter_log(LOG_WARNING, "%u attempts in a row failed; pausing the "
                      "drain (the rest stays due)", METER_DRAIN_BREAKER);
        }

        d->paused = 1;
        return METER_DRAIN_MORE;
    }

    return 0;
}


/* between records: stop flag, watchdog, lock renewal; 0 to go on */
static int
meter_drain_check(meter_drain_t *d)
{
    int              rc;
    struct timespec  now;

    if (d->stop != NULL && *d->stop) {
        return METER_DRAIN_STOPPED;
    }

    if (d->tick != NULL) {
        d->tick(d->tick_data);
    }

    if (d->dry_run) {
        return 0;
    }

    clock_gettime(CLOCK_MONOTONIC, &now);

    rc = meter_drain_bound(d, &now);
    if (rc != 0) {
        return rc;
    }

    rc = meter_drain_follow(d, 1000);
    if (rc != 0) {
        return rc;
    }

    if ((now.tv_sec - d->renewed.tv_sec) * 3 >= d->cf->lock_ttl) {
        switch (meter_lock_renew(d)) {
        case 1:
            break;
        case 0:
            meter_log(LOG_ERR, "lost the drain lock to another worker; "
                      "stopping this pass");
            return METER_DRAIN_LOCKED;
        default:
            return METER_DRAIN_REDIS;
        }
    }

    return 0;
}


meter_drain_rc_e
meter_drain_run(meter_drain_t *d)
{
    time_t            now;
    redisReply       *rp;
    meter_drain_rc_e  rc;

    d->created = d->sent = d->retried = d->dead = d->held = d->waiting = 0;
    d->malformed = 0;
    d->emitted = 0;
    d->next_due = 0;
    d->paused = 0;
    d->streak_sent = 0;
    d->streak_retried = 0;

    if (meter_map_init(&d->customers, 64) != 0) {
        meter_log(LOG_ERR, "out of memory");
        return METER_DRAIN_REDIS;
    }

    if (d->provider->pass != NULL) {
        d->provider->pass(d->provider);
    }

    if (!d->dry_run && meter_drain_follow(d, 0) != METER_DRAIN_OK) {
        meter_map_free(&d->customers, meter_reply_free);
        return METER_DRAIN_REDIS;
    }

    if (!d->dry_run) {
        switch (meter_lock_acquire(d)) {
        case 1:
            break;
        case 0:
            meter_map_free(&d->customers, meter_reply_free);
            return METER_DRAIN_LOCKED;
        default:
            meter_map_free(&d->customers, meter_reply_free);
            return METER_DRAIN_REDIS;
        }
    }

    now = time(NULL);

    rc = meter_drain_resume(d);

    if (rc == METER_DRAIN_OK) {
        rc = meter_drain_periods(d, now);
    }

    if (rc == METER_DRAIN_OK && !d->dry_run) {
        meter_drain_retention(d, time(NULL));

        rp = meter_redis_cmd(d->redis, "HSET %s last_drain %lld",
                             MTR_W_STATS, (long long) time(NULL));
        freeReplyObject(rp);
    }

    if (!d->dry_run && d->redis->ctx != NULL) {
        /* the earliest retry, so that the daemon wakes up for it */
        rp = meter_redis_cmd(d->redis, "ZRANGE %s 0 0 WITHSCORES",
                             MTR_W_OPEN);
        if (meter_reply_ok(rp) && rp->type == REDIS_REPLY_ARRAY
            && rp->elements == 2)
        {
            d->next_due = (time_t) strtoll(rp->element[1]->str, NULL, 10);
            if (d->next_due == 0) {
                d->next_due = 1;
            }
        }

        freeReplyObject(rp);

        meter_lock_release(d);
    }

    meter_map_free(&d->customers, meter_reply_free);

    return rc;
}


/* records left open by an earlier pass, a crash or a retry */
static meter_drain_rc_e
meter_drain_resume(meter_drain_t *d)
{
    size_t            i, chunk;
    redisReply       *rp;
    meter_drain_rc_e  rc;

    if (d->dry_run) {
        rp = meter_redis_cmd(d->redis, "ZCARD %s", MTR_W_OPEN);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rp);
            return METER_DRAIN_REDIS;
        }

        if (rp->integer > 0) {
            printf("{\"open_records\":%lld}\n", rp->integer);
        }

        freeReplyObject(rp);
        return METER_DRAIN_OK;
    }

    /* the same chunks as new records get (meter_drain_emit) */
    chunk = METER_BATCH;
    if (d->provider->send_batch != NULL) {
        chunk = METER_CHUNK;
        if (d->provider->batch_max > chunk) {
            chunk = d->provider->batch_max;
        }
    }

    for ( ;; ) {
        rp = meter_redis_cmd(d->redis,
                             "ZRANGEBYSCORE %s -inf %lld LIMIT 0 %lld",
                             MTR_W_OPEN, (long long) time(NULL),
                             (long long) chunk);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
            meter_log(LOG_ERR, "resume: %s",
                      rp != NULL ? rp->str : d->redis->err);
            freeReplyObject(rp);
            return METER_DRAIN_REDIS;
        }

        if (rp->elements == 0) {
            freeReplyObject(rp);
            return METER_DRAIN_OK;
        }

        if (d->provider->send_batch != NULL) {
            rc = meter_drain_check(d);
            if (rc == METER_DRAIN_OK) {
                rc = meter_drain_resume_chunk(d, rp);
            }

            if (rc != METER_DRAIN_OK) {
                freeReplyObject(rp);
                return rc;
            }
        }

        for (i = 0; d->provider->send_batch == NULL && i < rp->elements; i++)
        {
            rc = meter_drain_check(d);
            if (rc == METER_DRAIN_OK) {
                rc = meter_drain_record(d, rp->element[i]->str);
            }

            if (rc != METER_DRAIN_OK) {
                freeReplyObject(rp);
                return rc;
            }
        }

        i = rp->elements;
        freeReplyObject(rp);

        if (i < chunk) {
            return METER_DRAIN_OK;
        }
    }
}


/* counters that tell whether a period was read and billed completely */
typedef struct {
    unsigned long               emitted;
    unsigned                    sent;
    unsigned                    other;          /* held, waiting, ... */
} meter_drain_mark_t;


static void
meter_drain_mark(meter_drain_t *d, meter_drain_mark_t *m)
{
    m->emitted = d->emitted;
    m->sent = d->sent;
    m->other = d->held + d->waiting + d->retried + d->dead + d->malformed;
}


/*
 * One period of the due hours, then, when every record made from it was
 * finished and nothing was held or malformed, its hours are settled.
 */
static meter_drain_rc_e
meter_drain_due_period(meter_drain_t *d, time_t pstart,
    meter_due_hour_t *hs, size_t n)
{
    size_t              i;
    char              **hours;
    meter_drain_rc_e    rc;
    meter_drain_mark_t  m0, m1;

    hours = calloc(n + 1, sizeof(char *));
    if (hours == NULL) {
        return METER_DRAIN_REDIS;
    }

    for (i = 0; i < n; i++) {
        hours[i] = hs[i].hour;
    }

    meter_drain_mark(d, &m0);

    rc = meter_drain_period(d, pstart, hours, n);

    meter_drain_mark(d, &m1);

    if (rc == METER_DRAIN_OK && !d->dry_run
        && m1.emitted - m0.emitted == (unsigned long) (m1.sent - m0.sent)
        && m1.other == m0.other)
    {
        for (i = 0; i < n; i++) {
            if (meter_due_settle(d, &hs[i], time(NULL)) != 0) {
                rc = METER_DRAIN_REDIS;
                break;
            }
        }
    }

    free(hours);

    return rc;
}


static meter_drain_rc_e
meter_drain_periods(meter_drain_t *d, time_t now)
{
    time_t             closed_end, ps, pcur;
    size_t             i, first, n;
    redisReply        *rp;
    meter_drain_rc_e   rc;
    meter_due_hour_t  *hs;

    /* an hour (or day) is closed when its end is at or before closed_end */
    closed_end = (d->before != 0) ? d->before : now - d->cf->grace;

    /* only the hours that may hold unbilled usage (due.c) */
    if (meter_due_hours(d, closed_end, now, &hs, &n) != 0) {
        return METER_DRAIN_REDIS;
    }

    rc = METER_DRAIN_OK;
    first = 0;
    pcur = -1;

    if (!d->dry_run) {
        freeReplyObject(meter_redis_cmd(d->redis, "DEL %s",
                                        MTR_W_NOCUST_NEW));
    }

    /* oldest first, so periods come out in order */
    for (i = 0; i <= n && rc == METER_DRAIN_OK; i++) {
        ps = (i < n) ? meter_period_start(hs[i].start, d->cf->report_period)
                     : -1;

        if (ps == pcur) {
            continue;
        }

        if (pcur != -1 && pcur + d->cf->report_period <= closed_end) {
            rc = meter_drain_due_period(d, pcur, &hs[first], i - first);
        }

        pcur = ps;
        first = i;
    }

    free(hs);

    /* the month's figures (gauges, uniques), after their hours */
    if (rc == METER_DRAIN_OK) {
        rc = meter_figures_run(d, closed_end, time(NULL));
    }

    if (rc == METER_DRAIN_OK && !d->dry_run) {
        /* the keys found without customer in this complete pass */
        rp = meter_redis_cmd(d->redis, "EXISTS %s", MTR_W_NOCUST_NEW);
        if (meter_reply_int(rp, 0) == 1) {
            freeReplyObject(rp);
            rp = meter_redis_cmd(d->redis, "RENAME %s %s", MTR_W_NOCUST_NEW,
                                 MTR_W_NOCUST);

        } else {
            freeReplyObject(rp);
            rp = meter_redis_cmd(d->redis, "DEL %s", MTR_W_NOCUST);
        }

        freeReplyObject(rp);
    }

    return rc;
}


static meter_agg_t *
meter_agg_get(meter_map_t *aggs, const char *subject, const char *customer,
    const char *kh, const char *meter)
{
    char          key[160];
    void        **slot;
    int           created;
    meter_agg_t  *a;

    snprintf(key, sizeof(key), "%s|%s", subject, meter);

    slot = meter_map_put(aggs, key, &created);
    if (slot == NULL) {
        return NULL;
    }

    if (!created) {
        a = *slot;
        if (strcmp(a->key_hash, kh) != 0) {
            a->nkeys++;
        }

        return a;
    }

    a = calloc(1, sizeof(meter_agg_t));
    if (a == NULL) {
        return NULL;
    }

    a->subject = strdup(subject);
    a->customer = (customer != NULL) ? strdup(customer) : NULL;
    snprintf(a->key_hash, sizeof(a->key_hash), "%s", kh);
    a->nkeys = 1;
    snprintf(a->meter, sizeof(a->meter), "%s", meter);

    /* a gauge's figure is billed under its name (figures.c) */
    snprintf(a->fmeter, sizeof(a->fmeter), "%s", meter);
    a->gauge = meter_gauge_name(meter, strlen(meter));
    if (a->gauge == METER_FIG_MAX) {
        a->meter[strlen(meter) - MTR_GAUGE_SFX_LEN] = '\0';

    } else if (a->gauge == METER_FIG_LAST) {
        a->meter[strlen(meter) - (sizeof(MTR_GAUGE_LAST_SFX) - 1)] = '\0';
    }

    if (a->subject == NULL || (customer != NULL && a->customer == NULL)) {
        meter_agg_free(a);
        return NULL;
    }

    *slot = a;

    return a;
}


/*
 * One batch of key hashes of one hour: u (both layouts), b and customer of
 * every key.  With old, the keys come from mtr:idx:HOUR and their key
 * layout is read; wm holds the hour's writer layout.
 */
static meter_drain_rc_e
meter_drain_batch(meter_drain_t *d, const char *hour, const char **khs,
    size_t nkh, int old, meter_map_t *wm, meter_map_t *period_aggs,
    meter_map_t *batch_aggs)
{
    size_t            i, k, nu, nb, nus;
    unsigned          bad;
    char              prefix[128], *wbuf;
    void            **slot;
    const char       *kh, *customer, **uv, **bv;
    redisReply       *u, *b, *c;
    meter_agg_t      *a;
    meter_map_t      *aggs;
    meter_wkey_t     *wk;
    meter_usage_t    *us;
    time_t            th;
    meter_drain_rc_e  rc;

    rc = METER_DRAIN_OK;
    th = meter_hour_parse(hour);

    for (i = 0; i < nkh; i++) {
        kh = khs[i];

        if (!meter_is_hex64(kh, strlen(kh))) {
            continue;
        }

        if ((old
             && meter_redis_append(d->redis, "HGETALL " MTR_U_FMT, kh, hour)
                != 0)
            || meter_redis_append(d->redis, "HGETALL " MTR_B_FMT, kh, hour)
               != 0
            || meter_redis_append(d->redis, "HGET " MTR_KEY_FMT " customer", kh)
               != 0)
        {
            return METER_DRAIN_REDIS;
        }
    }

    for (i = 0; i < nkh; i++) {
        kh = khs[i];

        if (!meter_is_hex64(kh, strlen(kh))) {
            continue;
        }

        u = NULL;
        b = NULL;
        c = NULL;

        if (old) {
            u = meter_redis_reply(d->redis);
        }

        b = (!old || u != NULL) ? meter_redis_reply(d->redis) : NULL;
        c = (b != NULL) ? meter_redis_reply(d->redis) : NULL;

        if (c == NULL) {
            freeReplyObject(u);
            freeReplyObject(b);
            meter_log(LOG_ERR, "hour %s: %s", hour, d->redis->err);
            return METER_DRAIN_REDIS;
        }

        if (rc != METER_DRAIN_OK
            || (u != NULL && u->type != REDIS_REPLY_ARRAY)
            || b->type != REDIS_REPLY_ARRAY)
        {
            if (rc == METER_DRAIN_OK) {
                meter_log(LOG_ERR, "hour %s key %.12s: unexpected reply",
                          hour, kh);
                rc = METER_DRAIN_REDIS;
            }

            goto next;
        }

        customer = (c->type == REDIS_REPLY_STRING && c->len > 0)
                   ? c->str : NULL;

        slot = (wm != NULL) ? meter_map_get(wm, kh) : NULL;
        wk = (slot != NULL) ? *slot : NULL;

        if (wk != NULL) {
            wk->seen = 1;
        }

        if (meter_u_merge(u, wk, &uv, &nu, &wbuf) != 0) {
            rc = METER_DRAIN_REDIS;
            goto next;
        }

        nb = b->elements;
        bv = malloc((nb + 1) * sizeof(char *));
        if (bv == NULL) {
            free(uv);
            free(wbuf);
            rc = METER_DRAIN_REDIS;
            goto next;
        }

        for (k = 0; k < nb; k++) {
            bv[k] = (b->element[k]->type == REDIS_REPLY_STRING)
                    ? b->element[k]->str : "";
        }

        snprintf(prefix, sizeof(prefix), "%s %s ", hour, kh);
        bad = 0;

        if (meter_usage_compute(uv, nu, bv, nb, prefix, &us, &nus, &bad)
            != 0)
        {
            free(uv);
            free(bv);
            free(wbuf);
            rc = METER_DRAIN_REDIS;
            goto next;
        }

        free(uv);
        free(bv);
        free(wbuf);

        if (bad) {
            d->malformed++;
            meter_log(LOG_WARNING, "hour %s key %.12s: %u malformed usage "
                      "fields ignored", hour, kh, bad);
        }

        /* a key's records of one hour are final after this batch; a
         * customer's collect all its keys first */
        aggs = (customer == NULL && d->cf->report_period == METER_HOUR)
               ? batch_aggs : period_aggs;

        for (k = 0; k < nus; k++) {
            a = meter_agg_get(aggs, customer != NULL ? customer : kh,
                              customer, kh, us[k].meter);
            if (a == NULL
                || meter_str_add(&a->covers, us[k].covers.data,
                                 us[k].covers.len) != 0)
            {
                rc = METER_DRAIN_REDIS;
                break;
            }

            a->quantity += us[k].quantity;

            if (us[k].gauge) {
                /* max: the largest of the period; last: the latest
                 * hour's largest copy, the latest reading (its encoding
                 * starts with the time into the hour) */
                if (a->gauge != METER_FIG_LAST) {
                    a->gu = (us[k].gu > a->gu) ? us[k].gu : a->gu;
                    a->ghour = (th > a->ghour) ? th : a->ghour;

                } else if (th > a->ghour
                           || (th == a->ghour && us[k].gu > a->gu))
                {
                    a->gu = us[k].gu;
                    a->ghour = th;
                }

                a->gb = (us[k].gb > a->gb) ? us[k].gb : a->gb;
            }
        }

        meter_usage_free(us, nus);

    next:

        freeReplyObject(u);
        freeReplyObject(b);
        freeReplyObject(c);
    }

    return rc;
}


static meter_drain_rc_e
meter_drain_period(meter_drain_t *d, time_t pstart, char **hours,
    size_t nhours)
{
    char              cursor[32];
    size_t            h, i, n;
    redisReply       *rp;
    const char      **khs, *chunk[METER_BATCH];
    meter_map_t       period_aggs, batch_aggs, wm;
    meter_drain_rc_e  rc;

    rc = METER_DRAIN_OK;

    if (meter_map_init(&period_aggs, 64) != 0) {
        return METER_DRAIN_REDIS;
    }

    for (h = 0; h < nhours && rc == METER_DRAIN_OK; h++) {
        if (hours[h] == NULL) {
            continue;
        }

        /* the writer layout first, in memory: the key layout's keys are
         * then merged with it, the rest follow */
        if (meter_map_init(&wm, 64) != 0) {
            rc = METER_DRAIN_REDIS;
            break;
        }

        if (meter_wmap_load(d->redis, hours[h], &wm, NULL, NULL) != 0) {
            rc = METER_DRAIN_REDIS;
            meter_map_free(&wm, meter_wkey_free);
            break;
        }

        strcpy(cursor, "0");

        do {
            rc = meter_drain_check(d);
            if (rc != METER_DRAIN_OK) {
                break;
            }

            rp = meter_redis_cmd(d->redis, "SSCAN " MTR_IDX_FMT " %s COUNT %d",
                                 hours[h], cursor, METER_BATCH);
            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
                || rp->elements != 2)
            {
                meter_log(LOG_ERR, MTR_IDX_FMT ": %s", hours[h],
                          rp != NULL ? rp->str : d->redis->err);
                freeReplyObject(rp);
                rc = METER_DRAIN_REDIS;
                break;
            }

            snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);

            if (meter_map_init(&batch_aggs, METER_BATCH) != 0) {
                freeReplyObject(rp);
                rc = METER_DRAIN_REDIS;
                break;
            }

            khs = malloc((rp->element[1]->elements + 1) * sizeof(char *));
            if (khs == NULL) {
                freeReplyObject(rp);
                meter_map_free(&batch_aggs, meter_agg_free);
                rc = METER_DRAIN_REDIS;
                break;
            }

            for (i = 0; i < rp->element[1]->elements; i++) {
                khs[i] = (rp->element[1]->element[i]->type
                          == REDIS_REPLY_STRING)
                         ? rp->element[1]->element[i]->str : "";
            }

            rc = meter_drain_batch(d, hours[h], khs, i, 1, &wm, &period_aggs,
                                   &batch_aggs);
            free(khs);
            freeReplyObject(rp);

            if (rc == METER_DRAIN_OK) {
                rc = meter_drain_emit(d, pstart, &batch_aggs);
            }

            meter_map_free(&batch_aggs, meter_agg_free);

        } while (rc == METER_DRAIN_OK && strcmp(cursor, "0") != 0);

        /* the keys only the writer layout has */
        i = 0;

        while (rc == METER_DRAIN_OK && i < wm.cap) {
            rc = meter_drain_check(d);
            if (rc != METER_DRAIN_OK) {
                break;
            }

            for (n = 0; i < wm.cap && n < METER_BATCH; i++) {
                if (wm.keys[i] != NULL
                    && !((meter_wkey_t *) wm.vals[i])->seen)
                {
                    chunk[n++] = wm.keys[i];
                }
            }

            if (n == 0) {
                break;
            }

            if (meter_map_init(&batch_aggs, METER_BATCH) != 0) {
                rc = METER_DRAIN_REDIS;
                break;
            }

            rc = meter_drain_batch(d, hours[h], chunk, n, 0, &wm,
                                   &period_aggs, &batch_aggs);

            if (rc == METER_DRAIN_OK) {
                rc = meter_drain_emit(d, pstart, &batch_aggs);
            }

            meter_map_free(&batch_aggs, meter_agg_free);
        }

        meter_map_free(&wm, meter_wkey_free);
    }

    if (rc == METER_DRAIN_OK) {
        rc = meter_drain_emit(d, pstart, &period_aggs);
    }

    meter_map_free(&period_aggs, meter_agg_free);

    return rc;
}


static int
meter_agg_cmp(const void *a, const void *b)
{
    const meter_agg_t  *x, *y;
    int                 c;

    x = *(meter_agg_t *const *) a;
    y = *(meter_agg_t *const *) b;

    c = strcmp(x->subject, y->subject);

    return (c != 0) ? c : strcmp(x->meter, y->meter);
}


/* customer record (mtr:cust:{C}), cached for the pass */
static redisReply *
meter_drain_customer(meter_drain_t *d, const char *customer)
{
    void       **slot;
    int          created;
    redisReply  *rp;

    slot = meter_map_put(&d->customers, customer, &created);
    if (slot == NULL) {
        return NULL;
    }

    if (!created) {
        return *slot;
    }

    rp = meter_redis_cmd(d->redis, "HGETALL " MTR_CUST_FMT, customer);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(rp);
        return NULL;
    }

    *slot = rp;

    return rp;
}


static meter_drain_rc_e
meter_drain_dead(meter_drain_t *d, const char *id, const char *error,
    long http_status)
{
    char         rkey[64], status[24];
    redisReply  *rp;

    snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, id);
    snprintf(status, sizeof(status), "%ld", http_status);

    rp = meter_redis_cmd(d->redis, "EVAL %s 3 %s %s %s %s %lld %s %s",
                         meter_lua_dead, rkey, MTR_W_OPEN, MTR_W_DEAD, id,
                         (long long) time(NULL), error, status);
    if (!meter_reply_ok(rp)) {
        meter_log(LOG_ERR, "record %s: %s", id,
                  rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    freeReplyObject(rp);

    d->dead++;
    meter_send_stats.dead++;
    meter_log(LOG_ERR, "record %s dead-lettered: %s (meterctl retry %s "
              "requeues it)", id, error, id);

    return METER_DRAIN_OK;
}


/* the first and last hour of a record's covers lines ("HOUR KH ...") */
static void
meter_drain_hours(const char *covers, time_t *start, time_t *end)
{
    char         hour[11];
    time_t       t;
    const char  *line;

    *start = 0;
    *end = 0;

    for (line = covers; line != NULL && *line != '\0'; line++) {
        if (strnlen(line, 11) == 11 && line[10] == ' ') {
            memcpy(hour, line, 10);
            hour[10] = '\0';
            t = meter_hour_parse(hour);

            if (t > 0 && (*start == 0 || t < *start)) {
                *start = t;
            }

            if (t > 0 && t + 3600 > *end) {
                *end = t + 3600;
            }
        }

        line = strchr(line, '\n');
        if (line == NULL) {
            break;
        }
    }
}


/*
 * Everything before a delivery attempt: the checks (a failing one
 * dead-letters the record), the customer's provider ids, and with count
 * HINCRBY attempts first (a record resumed from Redis; a new record is
 * created with its first attempt counted).  *ready: out may be sent.
 */
static meter_drain_rc_e
meter_drain_prepare(meter_drain_t *d, meter_rec_t *r, int count,
    meter_record_t *out, int *ready)
{
    char                  rkey[64], field[64], err[600];
    time_t                now, age;
    redisReply           *cust, *rp;
    meter_record_t        pr;

    r->accepted = 0;
    *ready = 0;

    if (r->meter == NULL || r->period_start == 0
        || (r->quantity == 0
            && !meter_fig_covers(r->covers, &pr.usage_start, &pr.usage_end)))
    {
        return meter_drain_dead(d, r->id, "malformed record in Redis", 0);
    }

    memset(&pr, 0, sizeof(meter_record_t));

    pr.idempotency_key = r->id;
    pr.key_hash = r->key_hash;
    pr.customer = r->customer;
    pr.meter = r->meter;
    pr.period_start = r->period_start;
    pr.period_end = r->period_end;
    pr.quantity = r->quantity;
    pr.created = r->created;
    pr.seq = r->seq;
    pr.figure = meter_fig_covers(r->covers, &pr.usage_start, &pr.usage_end);
    if (!pr.figure) {
        meter_drain_hours(r->covers, &pr.usage_start, &pr.usage_end);
    }

    pr.provider_meter = meter_conf_meter(d->cf, r->meter);
    if (pr.provider_meter == NULL) {
        pr.provider_meter = r->meter;
    }

    now = time(NULL);

    /* a figure's age is its event time's: its period is the month */
    age = pr.figure ? pr.usage_end - 1 : r->period_start;

    if (d->cf->max_age > 0 && now - age > d->cf->max_age) {
        snprintf(err, sizeof(err), "period starts %llds ago, older than the "
                 "%llds \"%s\" accepts (max_age)",
                 (long long) (now - age),
                 (long long) d->cf->max_age, d->provider->name);
        return meter_drain_dead(d, r->id, err, 0);
    }

    if (r->customer != NULL) {
        cust = meter_drain_customer(d, r->customer);
        if (cust == NULL) {
            return METER_DRAIN_REDIS;
        }

        pr.provider_customer = meter_reply_hget(cust, "provider_customer");
        pr.subscription = meter_reply_hget(cust, "subscription");
        snprintf(field, sizeof(field), MTR_CUST_ITEM_FMT, r->meter);
        pr.subscription_item = meter_reply_hget(cust, field);

        if (strcmp(d->cf->provider, "file") != 0
            && pr.provider_customer == NULL && pr.subscription == NULL)
        {
            snprintf(err, sizeof(err), "customer \"%s\" has neither "
                     "provider_customer nor subscription", r->customer);
            return meter_drain_dead(d, r->id, err, 0);
        }
    }

    snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, r->id);

    if (count) {
        /* count the attempt before making it: after a crash, attempts > 0
         * tells that the provider may have the record already */
        rp = meter_redis_cmd(d->redis, "HINCRBY %s attempts 1", rkey);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rp);
            return METER_DRAIN_REDIS;
        }

        r->attempts = (long) meter_reply_int(rp, 1);
        freeReplyObject(rp);
    }

    pr.attempts = r->attempts;

    *out = pr;
    *ready = 1;

    return METER_DRAIN_OK;
}


/* the provider's answer: r->accepted, or a retry or dead letter recorded */
static meter_drain_rc_e
meter_drain_outcome(meter_drain_t *d, meter_rec_t *r, meter_send_e st,
    const meter_send_result_t *answer)
{
    char                  rkey[64];
    double                delay;
    time_t                now, next;
    redisReply           *rp;
    meter_send_result_t   res;

    res = *answer;
    now = time(NULL);
    snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, r->id);

    switch (st) {

    case METER_SEND_OK:
        r->accepted = 1;
        r->http_status = res.http_status;

        meter_log(LOG_DEBUG, "record %s: %s %s %" PRIu64 " accepted", r->id,
                  r->customer != NULL ? r->customer : "-", r->meter,
                  r->quantity);

        return METER_DRAIN_OK;

    case METER_SEND_RETRY:
        delay = meter_backoff((unsigned) r->attempts,
                              (double) d->cf->retry_base,
                              (double) d->cf->retry_max, res.retry_after,
                              meter_random());
        next = now + (time_t) (delay + 0.999);

        rp = meter_redis_cmd(d->redis, "HSET %s next_attempt %lld "
                             "last_error %s http_status %ld", rkey,
                             (long long) next, res.error, res.http_status);
        freeReplyObject(rp);

        rp = meter_redis_cmd(d->redis, "ZADD %s %lld %s", MTR_W_OPEN,
                             (long long) next, r->id);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rp);
            return METER_DRAIN_REDIS;
        }

        freeReplyObject(rp);

        d->retried++;
        meter_send_stats.failed++;
        meter_log(LOG_WARNING, "record %s: %s; attempt %ld, next in %.0fs",
                  r->id, res.error[0] ? res.error : "temporary failure",
                  r->attempts, delay);

        return METER_DRAIN_OK;

    default:
        return meter_drain_dead(d, r->id,
                                res.error[0] ? res.error : "rejected",
                                res.http_status);
    }
}


/*
 * redis.wait (on by default behind Sentinel): before the provider sees a
 * record, WAIT until that many replicas have everything this connection
 * wrote, the record and its attempt count among it.  Replication is
 * asynchronous: without this a failover could promote a replica that
 * never had the record, and the usage it covers would be computed afresh
 * into a record of other numbers under the same key (which the provider's
 * dedupe would then drop or, after a later record, bill twice).  Fewer
 * replicas than asked: nothing is sent, the record waits.
 */
static meter_drain_rc_e
meter_drain_replicated(meter_drain_t *d)
{
    long long    got;
    redisReply  *rp;

    if (d->cf->redis_wait <= 0) {
        return METER_DRAIN_OK;
    }

    rp = meter_redis_cmd(d->redis, "WAIT %d %lld", d->cf->redis_wait,
                         (long long) (d->cf->redis_timeout_ms / 2));
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        meter_log(LOG_ERR, "WAIT: %s", rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    got = rp->integer;
    freeReplyObject(rp);

    if (got < d->cf->redis_wait) {
        meter_log(LOG_ERR, "only %lld of the %d replicas of redis.wait "
                  "acknowledged the records; nothing sent until they do",
                  got, d->cf->redis_wait);
        return METER_DRAIN_REDIS;
    }

    return METER_DRAIN_OK;
}


/*
 * redis = sentinel://: is the connection still to the master the Sentinels
 * name?  Asked at most every every_ms.  A master stopped while its replica
 * was promoted wakes up a master still and takes writes until Sentinel
 * demotes it, seconds later; they are lost then (t/integration/
 * test_failover_daemon.py).  Another master named: the connection is
 * dropped, the caller's reconnect goes to the new one.
 */
static meter_drain_rc_e
meter_drain_follow(meter_drain_t *d, long every_ms)
{
    struct timespec  now;

    if (d->dry_run || d->cf->redis_host == NULL
        || strncmp(d->cf->redis_host, "sentinel://", 11) != 0)
    {
        return METER_DRAIN_OK;
    }

    clock_gettime(CLOCK_MONOTONIC, &now);

    if (every_ms > 0 && d->followed.tv_sec != 0
        && (now.tv_sec - d->followed.tv_sec) * 1000
           + (now.tv_nsec - d->followed.tv_nsec) / 1000000 < every_ms)
    {
        return METER_DRAIN_OK;
    }

    d->followed = now;

    if (meter_redis_follow(d->redis, d->cf->redis_host,
                           d->cf->redis_timeout_ms)
        != 0)
    {
        meter_log(LOG_WARNING, "%s", d->redis->err);
        return METER_DRAIN_REDIS;
    }

    return METER_DRAIN_OK;
}


/*
 * One delivery attempt (the lookup first for a record whose earlier send
 * may have reached the provider).  Sets r->accepted when the provider has
 * the record; a retry or a dead letter is recorded here.
 */
static meter_drain_rc_e
meter_drain_send(meter_drain_t *d, meter_rec_t *r, int count)
{
    int                   found, ready;
    meter_send_e          st;
    meter_record_t        pr;
    meter_drain_rc_e      rc;
    meter_send_result_t   res;

    rc = meter_drain_prepare(d, r, count, &pr, &ready);
    if (rc != METER_DRAIN_OK || !ready) {
        return rc;
    }

    rc = meter_drain_replicated(d);
    if (rc != METER_DRAIN_OK) {
        return rc;
    }

    memset(&res, 0, sizeof(meter_send_result_t));
    st = METER_SEND_RETRY;
    found = 0;

    if (r->attempts > 1 && d->provider->lookup != NULL) {
        found = d->provider->lookup(d->provider, &pr, &res);

        if (found == -1) {
            st = METER_SEND_RETRY;
            if (res.error[0] == '\0') {
                snprintf(res.error, sizeof(res.error), "lookup failed");
            }
        }
    }

    if (found == -2) {
        return meter_drain_dead(d, r->id, res.error[0] ? res.error
                                : "outcome unknown", res.http_status);
    }

    if (found == 1) {
        st = METER_SEND_OK;
        meter_log(LOG_INFO, "record %s: the provider has it already", r->id);

    } else if (found == 0) {
        memset(&res, 0, sizeof(meter_send_result_t));
        st = d->provider->send(d->provider, &pr, &res);
    }

    return meter_drain_outcome(d, r, st, &res);
}


/*
 * Records of a chunk through the provider's send_batch: each checked,
 * counted (count: resumed from Redis) and looked up as meter_drain_send
 * does, delivered together, and each answer recorded.
 */
static meter_drain_rc_e
meter_drain_send_batch(meter_drain_t *d, meter_rec_t **recs, size_t n,
    int count)
{
    int                   ready, found;
    size_t                i, k, m, *idx;
    meter_record_t       *prs;
    meter_drain_rc_e      rc;
    meter_send_result_t  *res;

    prs = calloc(n, sizeof(meter_record_t));
    res = calloc(n, sizeof(meter_send_result_t));
    idx = calloc(n, sizeof(size_t));
    if (prs == NULL || res == NULL || idx == NULL) {
        rc = METER_DRAIN_REDIS;
        goto done;
    }

    rc = METER_DRAIN_OK;
    m = 0;

    for (i = 0; i < n; i++) {
        rc = meter_drain_prepare(d, recs[i], count, &prs[m], &ready);
        if (rc != METER_DRAIN_OK) {
            /* the rest stay "sending": the next pass sends them */
            goto done;
        }

        if (ready) {
            idx[m++] = i;
        }
    }

    if (m > 0) {
        rc = meter_drain_replicated(d);
        if (rc != METER_DRAIN_OK) {
            goto done;
        }

    }

    /* an earlier send may have reached the provider: its lookup decides,
     * as in meter_drain_send; only what it did not find is sent */
    for (i = 0, k = 0; i < m && rc == METER_DRAIN_OK; i++) {
        found = 0;

        if (recs[idx[i]]->attempts > 1 && d->provider->lookup != NULL) {
            memset(&res[i], 0, sizeof(meter_send_result_t));
            found = d->provider->lookup(d->provider, &prs[i], &res[i]);
        }

        if (found == 0) {
            prs[k] = prs[i];
            idx[k++] = idx[i];
            continue;
        }

        if (found == -2) {
            rc = meter_drain_dead(d, recs[idx[i]]->id, res[i].error[0]
                                  ? res[i].error : "outcome unknown",
                                  res[i].http_status);
            continue;
        }

        if (found == 1) {
            meter_log(LOG_INFO, "record %s: the provider has it already",
                      recs[idx[i]]->id);
            rc = meter_drain_outcome(d, recs[idx[i]], METER_SEND_OK,
                                     &res[i]);
            continue;
        }

        if (res[i].error[0] == '\0') {
            snprintf(res[i].error, sizeof(res[i].error), "lookup failed");
        }

        rc = meter_drain_outcome(d, recs[idx[i]], METER_SEND_RETRY, &res[i]);
    }

    if (rc != METER_DRAIN_OK) {
        /* those not looked up yet stay due: the next pass sends them */
        goto done;
    }

    m = k;

    if (m > 0) {
        memset(res, 0, m * sizeof(meter_send_result_t));
        d->provider->send_batch(d->provider, prs, m, res);
    }

    for (i = 0; i < m; i++) {
        rc = meter_drain_outcome(d, recs[idx[i]], res[i].status, &res[i]);
        if (rc != METER_DRAIN_OK) {
            break;
        }
    }

done:

    free(prs);
    free(res);
    free(idx);

    return rc;
}


/* state = sent for the accepted records, one round trip */
static meter_drain_rc_e
meter_drain_mark_sent(meter_drain_t *d, meter_rec_t **recs, size_t n)
{
    char              rkey[64];
    size_t            i, queued;
    redisReply       *rp;
    meter_drain_rc_e  rc;

    /* the provider has them: their marks must not go to a master that
     * Sentinel replaced while they were out (they would be lost, and the
     * records resent); still "sending" on the new one, resent (deduped) */
    rc = meter_drain_follow(d, 100);
    if (rc != METER_DRAIN_OK) {
        return rc;
    }

    queued = 0;

    for (i = 0; i < n; i++) {
        snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, recs[i]->id);

        if (meter_redis_append(d->redis, "HSET %s state sent accepted %lld "
                               "http_status %ld", rkey,
                               (long long) time(NULL), recs[i]->http_status)
            != 0)
        {
            rc = METER_DRAIN_REDIS;
            break;
        }

        queued++;
    }

    for (i = 0; i < queued; i++) {
        rp = meter_redis_reply(d->redis);
        if (!meter_reply_ok(rp)) {
            /* still "sending": resent (and deduped) next pass */
            meter_log(LOG_ERR, "record %s: accepted, but %s", recs[i]->id,
                      rp != NULL ? rp->str : d->redis->err);
            rc = METER_DRAIN_REDIS;
        }

        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            break;
        }
    }

    return rc;
}


/* queues the max-only scripts that raise the b marks of one record: one
 * per key-hour, the covers lines of a key-hour being adjacent ("HOUR KH
 * FIELD VALUE"); the number queued goes into *queued */
static int
meter_drain_bmarks(meter_drain_t *d, const meter_rec_t *r, size_t *queued)
{
    char          bkey[128], key[128];
    const char   *line, *nl, *sp1, *sp2, *sp3;
    const char  **argv, **nargv;
    size_t       *argl, *nargl, cap, argc;
    int           failed;

    cap = 64;
    argv = malloc(cap * sizeof(char *));
    argl = malloc(cap * sizeof(size_t));
    if (argv == NULL || argl == NULL) {
        free(argv);
        free(argl);
        return -1;
    }

    argc = 0;
    bkey[0] = '\0';
    failed = 0;

    for (line = r->covers; *line != '\0'; line = nl + 1) {
        nl = strchr(line, '\n');

        if (nl != NULL && strncmp(line, METER_FIG_COVERS,
                                  sizeof(METER_FIG_COVERS) - 1) == 0)
        {
            /* a figure's: B raised (figures.c) */
            if (meter_fig_billed_append(d, line, (size_t) (nl - line)) != 0)
            {
                meter_log(LOG_ERR, "record %s: malformed covers", r->id);
                failed = 1;
                break;
            }

            (*queued)++;
            continue;
        }

        sp1 = strchr(line, ' ');
        sp2 = (sp1 != NULL) ? strchr(sp1 + 1, ' ') : NULL;
        sp3 = (sp2 != NULL) ? strchr(sp2 + 1, ' ') : NULL;

        if (nl == NULL || sp3 == NULL || sp3 > nl) {
            meter_log(LOG_ERR, "record %s: malformed covers", r->id);
            failed = 1;
            break;
        }

        snprintf(key, sizeof(key), MTR_B_PRE "%.*s" MTR_U_MID "%.*s",
                 (int) (sp2 - sp1 - 1), sp1 + 1, (int) (sp1 - line), line);

        if (strcmp(key, bkey) != 0) {
            if (argc > 0) {
                if (meter_redis_append_argv(d->redis, (int) argc, argv, argl)
                    != 0)
                {
                    failed = 1;
                    break;
                }

                (*queued)++;
            }

            snprintf(bkey, sizeof(bkey), "%s", key);

            /* argv keeps pointers into covers and bkey until appended */
            argc = 0;
            argv[argc] = "EVAL";
            argl[argc++] = 4;
            argv[argc] = meter_lua_maxset;
            argl[argc++] = strlen(meter_lua_maxset);
            argv[argc] = "1";
            argl[argc++] = 1;
            argv[argc] = bkey;
            argl[argc++] = strlen(bkey);
        }

        if (argc + 2 > cap) {
            cap *= 2;
            nargv = realloc(argv, cap * sizeof(char *));
            if (nargv != NULL) {
                argv = nargv;
            }

            nargl = realloc(argl, cap * sizeof(size_t));
            if (nargl != NULL) {
                argl = nargl;
            }

            if (nargv == NULL || nargl == NULL) {
                failed = 1;
                break;
            }
        }

        argv[argc] = sp2 + 1;
        argl[argc++] = (size_t) (sp3 - sp2 - 1);
        argv[argc] = sp3 + 1;
        argl[argc++] = (size_t) (nl - sp3 - 1);
    }

    if (!failed && argc > 0) {
        if (meter_redis_append_argv(d->redis, (int) argc, argv, argl) != 0) {
            failed = 1;

        } else {
            (*queued)++;
        }
    }

    free(argv);
    free(argl);

    return failed ? -1 : 0;
}


static int
meter_drain_audit_line(meter_drain_t *d, const meter_rec_t *r,
    meter_str_t *audit)
{
    char  ps[32], pe[32], now[32];

    meter_iso8601(r->period_start, ps, sizeof(ps));
    meter_iso8601(r->period_end, pe, sizeof(pe));
    meter_iso8601(time(NULL), now, sizeof(now));

    if (meter_str_add(audit, "{\"idempotency_key\":", 19) != 0
        || meter_str_json(audit, r->id) != 0
        || meter_str_add(audit, ",\"provider\":", 12) != 0
        || meter_str_json(audit, d->provider->name) != 0
        || meter_str_add(audit, ",\"customer\":", 12) != 0
        || meter_str_json(audit, r->customer) != 0
        || meter_str_add(audit, ",\"key_hash\":", 12) != 0
        || meter_str_json(audit, r->key_hash) != 0
        || meter_str_add(audit, ",\"meter\":", 9) != 0
        || meter_str_json(audit, r->meter) != 0
        || meter_str_printf(audit, ",\"period_start\":\"%s\","
                            "\"period_end\":\"%s\",\"quantity\":%s,"
                            "\"accepted_at\":\"%s\"}\n", ps, pe, r->q, now)
           != 0)
    {
        return -1;
    }

    return 0;
}


/* deletes finished records, clears their open marks (meter_lua_done_all);
 * 0, or -1 when Redis failed (they stay "sent": finished next pass) */
static int
meter_drain_done_all(meter_drain_t *d, meter_rec_t **recs, size_t n)
{
    char          nk[24], (*rkeys)[64];
    size_t        i, argc, *argl;
    const char  **argv;
    redisReply   *rp;
    int           rc;

    rkeys = malloc((n + 1) * sizeof(*rkeys));
    argv = malloc((5 * n + 8) * sizeof(char *));
    argl = malloc((5 * n + 8) * sizeof(size_t));
    if (rkeys == NULL || argv == NULL || argl == NULL) {
        free(rkeys);
        free(argv);
        free(argl);
        return -1;
    }

    snprintf(nk, sizeof(nk), "%zu", 2 + 2 * n);

    argc = 0;
    argv[argc++] = "EVAL";
    argv[argc++] = meter_lua_done_all;
    argv[argc++] = nk;
    argv[argc++] = MTR_W_OPEN;
    argv[argc++] = MTR_W_STATS;

    for (i = 0; i < n; i++) {
        snprintf(rkeys[i], sizeof(rkeys[i]), MTR_W_REC_FMT, recs[i]->id);
        argv[argc++] = rkeys[i];
        argv[argc++] = recs[i]->pkey;
    }

    for (i = 0; i < n; i++) {
        argv[argc++] = recs[i]->id;
        argv[argc++] = recs[i]->sm;
        argv[argc++] = recs[i]->q;
    }

    for (i = 0; i < argc; i++) {
        argl[i] = strlen(argv[i]);
    }

    rc = -1;

    /* appended, so that it goes as EVALSHA (lib/redis_script.c) */
    if (meter_redis_append_argv(d->redis, (int) argc, argv, argl) == 0) {
        rp = meter_redis_reply(d->redis);

        if (meter_reply_ok(rp)) {
            rc = 0;

        } else {
            meter_log(LOG_ERR, "finishing %zu records: %s", n,
                      rp != NULL ? rp->str : d->redis->err);
        }

        freeReplyObject(rp);
    }

    free(rkeys);
    free(argv);
    free(argl);

    return rc;
}


/*
 * Records in state "sent": b marks, audit, delete.  Each step is done for
 * all of them before the next starts (one round trip or one fsync each);
 * a failure leaves them "sent" and the next pass finishes them.
 */
static meter_drain_rc_e
meter_drain_finish(meter_drain_t *d, meter_rec_t **recs, size_t n)
{
    char          err[512];
    const char  **keys;
    size_t        i, queued, nkeys;
    meter_str_t   audit;
    redisReply   *rp;
    int           failed;

    queued = 0;
    failed = 0;

    for (i = 0; i < n && !failed; i++) {
        if (meter_drain_bmarks(d, recs[i], &queued) != 0) {
            failed = 1;
        }
    }

    for (i = 0; i < queued; i++) {
        rp = meter_redis_reply(d->redis);
        if (!meter_reply_ok(rp)) {
            meter_log(LOG_ERR, "setting billed marks: %s",
                      rp != NULL ? rp->str : d->redis->err);
            failed = 1;
        }

        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            break;
        }
    }

    if (failed) {
        /* still "sent": the next pass finishes them */
        return METER_DRAIN_REDIS;
    }

    if (d->audit != NULL) {
        keys = malloc(n * sizeof(char *));
        if (keys == NULL) {
            return METER_DRAIN_REDIS;
        }

        memset(&audit, 0, sizeof(meter_str_t));
        nkeys = 0;

        for (i = 0; i < n; i++) {
            if (meter_jsonl_has(d->audit, recs[i]->id)) {
                continue;
            }

            if (meter_drain_audit_line(d, recs[i], &audit) != 0) {
                failed = 1;
                break;
            }

            keys[nkeys++] = recs[i]->id;
        }

        /* one write and one fsync for the lines of all of them */
        if (!failed && nkeys > 0
            && (meter_jsonl_append(d->audit, audit.data, audit.len, err,
                                   sizeof(err)) != 0
                || meter_jsonl_commit(d->audit, keys, nkeys, err,
                                      sizeof(err)) != 0))
        {
            meter_log(LOG_ERR, "audit: %s", err);
            failed = 1;
        }

        meter_str_free(&audit);
        free(keys);

        if (failed) {
            return METER_DRAIN_REDIS;
        }
    }

    /* the last step of all of them in one script */
    if (meter_drain_done_all(d, recs, n) != 0) {
        return METER_DRAIN_REDIS;
    }

    d->sent += (unsigned) n;
    meter_send_stats.sent += (unsigned) n;

    return failed ? METER_DRAIN_REDIS : METER_DRAIN_OK;
}


/* the fields of a stored record (HGETALL reply); r points into it */
static void
meter_drain_rec_read(redisReply *rec, const char *id, meter_rec_t *r)
{
    const char  *v;

    memset(r, 0, sizeof(meter_rec_t));

    r->id = id;
    r->key_hash = meter_reply_hget(rec, "key_hash");
    r->customer = meter_reply_hget(rec, "customer");
    r->meter = meter_reply_hget(rec, "meter");
    r->covers = meter_reply_hget(rec, "covers");
    r->pkey = meter_reply_hget(rec, "pkey");
    r->sm = meter_reply_hget(rec, "sm");
    r->q = meter_reply_hget(rec, "quantity");

    v = meter_reply_hget(rec, "period_start");
    r->period_start = (time_t) strtoll(v != NULL ? v : "0", NULL, 10);
    v = meter_reply_hget(rec, "period_end");
    r->period_end = (time_t) strtoll(v != NULL ? v : "0", NULL, 10);
    r->quantity = strtoull(r->q != NULL ? r->q : "0", NULL, 10);
    v = meter_reply_hget(rec, "created");
    r->created = (time_t) strtoll(v != NULL ? v : "0", NULL, 10);
    v = meter_reply_hget(rec, "seq");
    r->seq = strtoul(v != NULL ? v : "0", NULL, 10);
}


/* oldest period first, then the record's own order */
static int
meter_rec_cmp(const void *a, const void *b)
{
    const meter_rec_t  *x, *y;

    x = *(meter_rec_t *const *) a;
    y = *(meter_rec_t *const *) b;

    if (x->period_start != y->period_start) {
        return x->period_start < y->period_start ? -1 : 1;
    }

    return strcmp(x->id, y->id);
}


/*
 * A chunk of due records (ids: the ZRANGEBYSCORE reply) as a chunk of new
 * ones goes: read in one round trip, the "sending" ones sent together
 * through send_batch under their own keys (attempts counted, the lookup
 * first where the provider has one), the "sent" ones only finished.
 */
static meter_drain_rc_e
meter_drain_resume_chunk(meter_drain_t *d, redisReply *ids)
{
    char               rkey[64];
    size_t             i, k, n, nsend, nacc, nstale, nrec;
    const char        *state;
    redisReply       **recs, *rp;
    meter_rec_t       *rs, **send, **acc;
    meter_drain_rc_e   rc, rc2;

    n = ids->elements;
    recs = calloc(n, sizeof(redisReply *));
    rs = calloc(n, sizeof(meter_rec_t));
    send = calloc(n, sizeof(meter_rec_t *));
    acc = calloc(n, sizeof(meter_rec_t *));
    rc = METER_DRAIN_OK;
    nrec = 0;

    if (recs == NULL || rs == NULL || send == NULL || acc == NULL) {
        rc = METER_DRAIN_REDIS;
        goto done;
    }

    for (i = 0; i < n; i++) {
        snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, ids->element[i]->str);

        if (meter_redis_append(d->redis, "HGETALL %s", rkey) != 0) {
            rc = METER_DRAIN_REDIS;
            break;
        }

        nrec++;
    }

    for (i = 0; i < nrec; i++) {
        recs[i] = meter_redis_reply(d->redis);

        if (!meter_reply_ok(recs[i]) || recs[i]->type != REDIS_REPLY_ARRAY) {
            meter_log(LOG_ERR, "record %s: %s", ids->element[i]->str,
                      recs[i] != NULL ? recs[i]->str : d->redis->err);
            rc = METER_DRAIN_REDIS;

            if (d->redis->ctx == NULL) {
                break;
            }
        }
    }

    if (rc != METER_DRAIN_OK) {
        goto done;
    }

    nsend = 0;
    nacc = 0;
    nstale = 0;

    for (i = 0; i < n; i++) {
        state = meter_reply_hget(recs[i], "state");

        if (state == NULL
            || (strcmp(state, "sent") != 0 && strcmp(state, "sending") != 0))
        {
            /* gone (meterctl, a finished pass) or dead: drop the entry */
            if (meter_redis_append(d->redis, "ZREM %s %s", MTR_W_OPEN,
                                   ids->element[i]->str)
                != 0)
            {
                rc = METER_DRAIN_REDIS;
                break;
            }

            nstale++;
            continue;
        }

        meter_drain_rec_read(recs[i], ids->element[i]->str, &rs[i]);

        if (strcmp(state, "sent") == 0) {
            /* accepted before: finished, never sent again */
            rs[i].accepted = 1;
            acc[nacc++] = &rs[i];

        } else {
            send[nsend++] = &rs[i];
        }
    }

    for (i = 0; i < nstale; i++) {
        rp = meter_redis_reply(d->redis);
        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            rc = METER_DRAIN_REDIS;
            break;
        }
    }

    if (rc != METER_DRAIN_OK) {
        goto done;
    }

    qsort(send, nsend, sizeof(meter_rec_t *), meter_rec_cmp);

    if (nsend > 0) {
        rc = meter_drain_send_batch(d, send, nsend, 1);

        for (i = 0, k = 0; i < nsend; i++) {
            if (send[i]->accepted) {
                send[k++] = send[i];
            }
        }

        nsend = k;
    }

    if (d->redis->ctx == NULL) {
        goto done;
    }

    /* what the provider accepted is finished even when stopping */
    if (nsend > 0) {
        rc2 = meter_drain_mark_sent(d, send, nsend);
        if (rc2 != METER_DRAIN_OK) {
            /* still "sending": resent (and deduped) next pass */
            rc = rc2;
            nsend = 0;
        }
    }

    for (i = 0; i < nsend; i++) {
        acc[nacc++] = send[i];
    }

    for (i = 0, k = 0; i < nacc; i++) {
        if (acc[i]->covers == NULL || acc[i]->q == NULL
            || acc[i]->pkey == NULL || acc[i]->sm == NULL)
        {
            meter_log(LOG_ERR, "record %s is malformed", acc[i]->id);
            rc2 = meter_drain_dead(d, acc[i]->id,
                                   "malformed record in Redis", 0);
            if (rc2 != METER_DRAIN_OK) {
                rc = rc2;
            }

            continue;
        }

        acc[k++] = acc[i];
    }

    if (k > 0) {
        rc2 = meter_drain_finish(d, acc, k);
        if (rc2 != METER_DRAIN_OK) {
            rc = rc2;
        }
    }

done:

    for (i = 0; i < nrec; i++) {
        freeReplyObject(recs[i]);
    }

    free(recs);
    free(rs);
    free(send);
    free(acc);

    return rc;
}


/* a record stored in Redis (open, retried, resumed after a crash) */
static meter_drain_rc_e
meter_drain_record(meter_drain_t *d, const char *id)
{
    char              rkey[64];
    const char       *state;
    redisReply       *rec, *rp;
    meter_rec_t       r, *rs;
    meter_drain_rc_e  rc;

    snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, id);

    rec = meter_redis_cmd(d->redis, "HGETALL %s", rkey);
    if (!meter_reply_ok(rec) || rec->type != REDIS_REPLY_ARRAY) {
        meter_log(LOG_ERR, "record %s: %s", id,
                  rec != NULL ? rec->str : d->redis->err);
        freeReplyObject(rec);
        return METER_DRAIN_REDIS;
    }

    state = meter_reply_hget(rec, "state");

    if (state == NULL
        || (strcmp(state, "sent") != 0 && strcmp(state, "sending") != 0))
    {
        /* gone (meterctl, a finished pass) or dead: drop the stale entry */
        freeReplyObject(rec);
        rp = meter_redis_cmd(d->redis, "ZREM %s %s", MTR_W_OPEN, id);
        freeReplyObject(rp);
        return METER_DRAIN_OK;
    }

    meter_drain_rec_read(rec, id, &r);

    rs = &r;

    if (strcmp(state, "sent") == 0) {
        r.accepted = 1;

    } else {
        rc = meter_drain_send(d, &r, 1);
        if (rc != METER_DRAIN_OK || !r.accepted) {
            freeReplyObject(rec);
            return rc;
        }

        rc = meter_drain_mark_sent(d, &rs, 1);
        if (rc != METER_DRAIN_OK) {
            freeReplyObject(rec);
            return rc;
        }
    }

    if (r.covers == NULL || r.q == NULL || r.pkey == NULL || r.sm == NULL) {
        meter_log(LOG_ERR, "record %s is malformed", id);
        rc = meter_drain_dead(d, id, "malformed record in Redis", 0);
        freeReplyObject(rec);
        return rc;
    }

    rc = meter_drain_finish(d, &rs, 1);
    freeReplyObject(rec);

    return rc;
}


/* the strings of one record for meter_lua_create_all */
typedef struct {
    char                        last[24];
    char                        next[24];
    char                        rkey[64];
    char                        nf[8];
    char                        pe[24];
    char                        ex[24];
} meter_new_args_t;


/*
 * Stores the new records of a chunk (those with agg) in one script, as
 * meter_lua_create does one: each is created only if its sequence number
 * is still the one read and no older record of it is open.  Sets created;
 * 0, or -1 when Redis failed (nothing is sent then).
 */
static int
meter_drain_create_all(meter_drain_t *d, time_t pstart, meter_new_t *nw,
    size_t m)
{
    char               ps[24], pe[24], now[24], expire[24], nk[24];
    size_t             i, k, n, argc, cap, nf0;
    size_t            *argl;
    const char       **argv;
    redisReply        *rp;
    meter_agg_t       *a;
    meter_new_args_t  *sa;
    int                rc;

    n = 0;
    for (i = 0; i < m; i++) {
        n += (nw[i].agg != NULL);
    }

    if (n == 0) {
        return 0;
    }

    snprintf(ps, sizeof(ps), "%lld", (long long) pstart);
    snprintf(pe, sizeof(pe), "%lld",
             (long long) (pstart + d->cf->report_period));
    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));
    /* sequence numbers must outlive the usage they number */
    snprintf(expire, sizeof(expire), "%lld",
             (long long) (2 * d->cf->retention + 2 * METER_DAY));
    snprintf(nk, sizeof(nk), "%zu", 1 + 2 * n);

    cap = 4 + 2 * n + 40 * n;
    sa = calloc(m, sizeof(meter_new_args_t));
    argv = malloc(cap * sizeof(char *));
    argl = malloc(cap * sizeof(size_t));
    if (sa == NULL || argv == NULL || argl == NULL) {
        free(sa);
        free(argv);
        free(argl);
        return -1;
    }

    argc = 0;

#define meter_arg(s)                                                         \
    do {                                                                     \
        argv[argc] = (s);                                                    \
        argl[argc] = strlen(s);                                              \
        argc++;                                                              \
    } while (0)

    meter_arg("EVAL");
    meter_arg(meter_lua_create_all);
    meter_arg(nk);
    meter_arg(MTR_W_OPEN);

    for (i = 0; i < m; i++) {
        if (nw[i].agg == NULL) {
            continue;
        }

        snprintf(sa[i].rkey, sizeof(sa[i].rkey), MTR_W_REC_FMT, nw[i].id);
        meter_arg(nw[i].pkey);
        meter_arg(sa[i].rkey);
    }

    for (i = 0; i < m; i++) {
        a = nw[i].agg;
        if (a == NULL) {
            continue;
        }

        snprintf(sa[i].last, sizeof(sa[i].last), "%" PRIu64, nw[i].seq);
        snprintf(sa[i].next, sizeof(sa[i].next), "%" PRIu64, nw[i].seq + 1);

        meter_arg(nw[i].sm);
        meter_arg(sa[i].last);
        meter_arg(sa[i].next);
        meter_arg(nw[i].id);
        meter_arg(now);

        if (a->figure) {
            /* a month's sequence numbers outlive the month too */
            snprintf(sa[i].ex, sizeof(sa[i].ex), "%lld",
                     (long long) (a->pend - time(NULL) + 2 * d->cf->retention
                                  + 2 * METER_DAY));
            meter_arg(sa[i].ex);

        } else {
            meter_arg(expire);
        }
        k = argc;
        meter_arg("");          /* the count, set below */
        nf0 = argc;

        meter_arg("state");
        meter_arg("sending");
        meter_arg("pkey");
        meter_arg(nw[i].pkey);
        meter_arg("sm");
        meter_arg(nw[i].sm);
        meter_arg("subject");
        meter_arg(a->subject);
        meter_arg("meter");
        meter_arg(a->meter);
        meter_arg("seq");
        meter_arg(sa[i].next);
        meter_arg("period_start");
        meter_arg(ps);
        meter_arg("period_end");
        if (a->figure) {
            snprintf(sa[i].pe, sizeof(sa[i].pe), "%lld", (long long) a->pend);
            meter_arg(sa[i].pe);

        } else {
            meter_arg(pe);
        }
        meter_arg("quantity");
        meter_arg(nw[i].q);
        meter_arg("created");
        meter_arg(now);
        /* the first attempt is counted with the record, as HINCRBY would
         * before the send: after a crash, attempts > 0 tells that the
         * provider may have it */
        meter_arg("attempts");
        meter_arg("1");

        if (a->customer != NULL) {
            meter_arg("customer");
            meter_arg(a->customer);
        }

        if (a->nkeys == 1) {
            meter_arg("key_hash");
            meter_arg(a->key_hash);
        }

        meter_arg("covers");
        argv[argc] = a->covers.data != NULL ? a->covers.data : "";
        argl[argc] = a->covers.len;
        argc++;

        snprintf(sa[i].nf, sizeof(sa[i].nf), "%zu", argc - nf0);
        argv[k] = sa[i].nf;
        argl[k] = strlen(sa[i].nf);
    }

#undef meter_arg

    rc = -1;

    /* appended, so that it goes as EVALSHA (lib/redis_script.c) */
    if (meter_redis_append_argv(d->redis, (int) argc, argv, argl) == 0) {
        rp = meter_redis_reply(d->redis);

        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != n)
        {
            meter_log(LOG_ERR, "creating %zu records: %s", n,
                      rp != NULL && rp->str != NULL ? rp->str
                      : d->redis->err);

        } else {
            rc = 0;

            for (i = 0, k = 0; i < m; i++) {
                if (nw[i].agg == NULL) {
                    continue;
                }

                /* 0: someone changed the sequence under us, recomputed
                 * next pass */
                if (rp->element[k++]->integer == 1) {
                    nw[i].created = 1;
                    d->created++;
                }
            }
        }

        freeReplyObject(rp);
    }

    free(sa);
    free(argv);
    free(argl);

    return rc;
}


/*
 * A gauge is billed as the month's figure (figures.c): the period's
 * largest value (max) or latest reading (last) raises it, and the
 * counters above their marks get their marks here, so that retention
 * finds them billed.  The figure first: a crash before the marks reads
 * the hour again and raises it to the same value.
 */
static meter_drain_rc_e
meter_drain_gauge(meter_drain_t *d, meter_agg_t *a)
{
    size_t        i, queued;
    redisReply   *rp;
    meter_rec_t   r;
    meter_drain_rc_e  rc;

    a->quantity = 0;

    if (d->dry_run) {
        return METER_DRAIN_OK;
    }

    if (meter_fig_raise(d, a->subject, a->fmeter, a->gauge, a->ghour,
                        (a->gauge == METER_FIG_LAST)
                        ? meter_fig_last_value(a->gu) : a->gu, a->gu,
                        (a->nkeys == 1) ? a->key_hash : "*")
        != 0)
    {
        return METER_DRAIN_REDIS;
    }

    memset(&r, 0, sizeof(meter_rec_t));
    r.id = "(gauge)";
    r.covers = a->covers.data;
    queued = 0;

    if (meter_drain_bmarks(d, &r, &queued) != 0) {
        return METER_DRAIN_REDIS;
    }

    rc = METER_DRAIN_OK;

    for (i = 0; i < queued; i++) {
        rp = meter_redis_reply(d->redis);
        if (!meter_reply_ok(rp)) {
            rc = METER_DRAIN_REDIS;
        }

        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            return METER_DRAIN_REDIS;
        }
    }

    return rc;
}


/*
 * Up to METER_CHUNK aggregates of one period: each step is pipelined for
 * all of them (sequence numbers, create, state sent, b marks, delete) and
 * the audit lines share one fsync; the provider gets one record at a time
 * (or the chunk in one send_batch), each created in Redis before it is
 * sent.
 */
static meter_drain_rc_e
meter_drain_chunk(meter_drain_t *d, time_t pstart, meter_agg_t **list,
    size_t n)
{
    char              ps[32];
    size_t            i, m, nheld, nacc, nbatch;
    uint64_t          seq;
    redisReply       *rp;
    meter_agg_t      *a;
    meter_new_t      *nw;
    meter_rec_t     **acc;
    meter_drain_rc_e  rc, rc2;

    rc = METER_DRAIN_OK;

    nw = calloc(n, sizeof(meter_new_t));
    acc = calloc(n, sizeof(meter_rec_t *));
    if (nw == NULL || acc == NULL) {
        free(nw);
        free(acc);
        return METER_DRAIN_REDIS;
    }

    m = 0;
    nheld = 0;

    for (i = 0; i < n; i++) {
        a = list[i];

        if (a->gauge && !a->figure) {
            if (a->covers.len > 0) {
                rc = meter_drain_gauge(d, a);
                if (rc != METER_DRAIN_OK) {
                    break;
                }
            }

            continue;
        }

        /* a figure's record may carry 0 (Stripe's last falling to 0) */
        if (a->quantity == 0 && !a->figure) {
            continue;
        }

        if (a->customer == NULL && strcmp(d->cf->provider, "file") != 0) {
            /* held, not dropped: billed once the key gets a customer */
            d->held++;

            if (!d->dry_run) {
                if (meter_redis_append(d->redis, "SADD %s %s",
                                       MTR_W_NOCUST_NEW, a->subject)
                    != 0)
                {
                    rc = METER_DRAIN_REDIS;
                    break;
                }

                nheld++;
            }

            continue;
        }

        if (d->dry_run) {
            meter_iso8601(pstart, ps, sizeof(ps));
            printf("{\"would_send\":true,\"period_start\":\"%s\","
                   "\"customer\":%s%s%s,\"key_hash\":%s%s%s,\"meter\":\"%s\","
                   "\"quantity\":%" PRIu64 "}\n", ps,
                   a->customer ? "\"" : "",
                   a->customer ? a->customer : "null",
                   a->customer ? "\"" : "",
                   a->nkeys == 1 ? "\"" : "",
                   a->nkeys == 1 ? a->key_hash : "null",
                   a->nkeys == 1 ? "\"" : "", a->meter, a->quantity);
            continue;
        }

        nw[m++].agg = a;
    }

    for (i = 0; i < nheld; i++) {
        rp = meter_redis_reply(d->redis);
        if (!meter_reply_ok(rp)) {
            rc = METER_DRAIN_REDIS;
        }

        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            break;
        }
    }

    if (rc == METER_DRAIN_OK && m > 0) {
        rc = meter_drain_check(d);
    }

    if (rc != METER_DRAIN_OK || m == 0) {
        goto done;
    }

    /* the last sequence number and the open record of each, one trip */
    for (i = 0; i < m; i++) {
        snprintf(nw[i].pkey, sizeof(nw[i].pkey), MTR_W_PERIOD_FMT,
                 (long long) pstart);
        snprintf(nw[i].sm, sizeof(nw[i].sm), MTR_PERIOD_SEQ_FMT,
                 nw[i].agg->subject, nw[i].agg->figure ? nw[i].agg->fmeter
                                                       : nw[i].agg->meter);

        if (meter_redis_append(d->redis, "HMGET %s %s %s" MTR_PERIOD_OPEN_SFX,
                               nw[i].pkey, nw[i].sm, nw[i].sm)
            != 0)
        {
            rc = METER_DRAIN_REDIS;
            goto done;
        }
    }

    for (i = 0; i < m; i++) {
        rp = meter_redis_reply(d->redis);

        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != 2)
        {
            meter_log(LOG_ERR, "%s: %s", nw[i].pkey,
                      rp != NULL ? rp->str : d->redis->err);
            freeReplyObject(rp);
            rc = METER_DRAIN_REDIS;

            if (d->redis->ctx == NULL) {
                goto done;
            }

            continue;
        }

        if (rp->element[1]->type == REDIS_REPLY_STRING) {
            /* an older record of this period, subject and meter is still
             * open (retrying or dead-lettered): its usage is not marked
             * billed yet */
            meter_log(LOG_DEBUG, "record %s still open; waiting",
                      rp->element[1]->str);
            d->waiting++;
            nw[i].agg = NULL;
            freeReplyObject(rp);
            continue;
        }

        seq = 0;
        if (rp->element[0]->type == REDIS_REPLY_STRING
            && meter_parse_u64(rp->element[0]->str, rp->element[0]->len,
                               &seq)
               != 0)
        {
            seq = 0;
        }

        freeReplyObject(rp);

        nw[i].seq = seq;
        /* a figure's under NAME:kind: never the key of a sum meter's
         * record of the hour that starts the month */
        meter_idem_key(pstart, nw[i].agg->subject,
                       nw[i].agg->figure ? nw[i].agg->fmeter
                                         : nw[i].agg->meter,
                       seq + 1, nw[i].id);
        snprintf(nw[i].q, sizeof(nw[i].q), "%" PRIu64, nw[i].agg->quantity);
    }

    if (rc != METER_DRAIN_OK) {
        goto done;
    }

    /* store them all (state "sending") before any is sent, one script */
    if (meter_drain_create_all(d, pstart, nw, m) != 0) {
        rc = METER_DRAIN_REDIS;
    }

    if (rc != METER_DRAIN_OK) {
        goto done;
    }

    nacc = 0;
    nbatch = 0;

    for (i = 0; i < m; i++) {
        if (!nw[i].created) {
            continue;
        }

        rc = meter_drain_check(d);
        if (rc != METER_DRAIN_OK) {
            /* the rest are stored: the next pass sends them */
            break;
        }

        a = nw[i].agg;

        nw[i].rec.id = nw[i].id;
        nw[i].rec.customer = a->customer;
        nw[i].rec.key_hash = (a->nkeys == 1) ? a->key_hash : NULL;
        nw[i].rec.meter = a->meter;
        nw[i].rec.covers = a->covers.data;
        nw[i].rec.pkey = nw[i].pkey;
        nw[i].rec.sm = nw[i].sm;
        nw[i].rec.q = nw[i].q;
        nw[i].rec.period_start = pstart;
        nw[i].rec.period_end = a->figure ? a->pend
                                         : pstart + d->cf->report_period;
        nw[i].rec.quantity = a->quantity;
        nw[i].rec.attempts = 1;
        nw[i].rec.created = time(NULL);
        nw[i].rec.seq = (unsigned long) (nw[i].seq + 1);

        if (d->provider->send_batch != NULL) {
            /* sent together below; acc collects them meanwhile */
            acc[nbatch++] = &nw[i].rec;
            continue;
        }

        rc = meter_drain_send(d, &nw[i].rec, 0);
        if (rc != METER_DRAIN_OK) {
            break;
        }

        if (nw[i].rec.accepted) {
            acc[nacc++] = &nw[i].rec;
        }
    }

    if (nbatch > 0 && rc == METER_DRAIN_OK) {
        rc2 = meter_drain_send_batch(d, acc, nbatch, 0);
        if (rc2 != METER_DRAIN_OK && rc == METER_DRAIN_OK) {
            rc = rc2;
        }

        for (i = 0; i < nbatch; i++) {
            if (acc[i]->accepted) {
                acc[nacc++] = acc[i];
            }
        }
    }

    /* what the provider accepted is finished even when stopping */
    if (nacc > 0 && d->redis->ctx != NULL) {
        rc2 = meter_drain_mark_sent(d, acc, nacc);
        if (rc2 == METER_DRAIN_OK) {
            rc2 = meter_drain_finish(d, acc, nacc);
        }

        if (rc2 != METER_DRAIN_OK && rc == METER_DRAIN_OK) {
            rc = rc2;
        }
    }

done:

    free(nw);
    free(acc);

    return rc;
}


meter_drain_rc_e
meter_drain_figures(meter_drain_t *d, time_t mstart, time_t mend,
    meter_fig_rec_t *recs, size_t n)
{
    size_t            i;
    void            **slot;
    int               created;
    meter_agg_t      *a;
    meter_map_t       aggs;
    meter_drain_rc_e  rc;

    if (meter_map_init(&aggs, n) != 0) {
        return METER_DRAIN_REDIS;
    }

    rc = METER_DRAIN_OK;

    for (i = 0; i < n; i++) {
        slot = meter_map_put(&aggs, recs[i].covers, &created);
        a = (slot != NULL) ? calloc(1, sizeof(meter_agg_t)) : NULL;
        if (a == NULL) {
            rc = METER_DRAIN_REDIS;
            break;
        }

        *slot = a;
        a->subject = strdup(recs[i].subject);
        a->customer = (recs[i].customer != NULL) ? strdup(recs[i].customer)
                                                 : NULL;
        if (a->subject == NULL
            || (recs[i].customer != NULL && a->customer == NULL)
            || meter_str_add(&a->covers, recs[i].covers,
                             strlen(recs[i].covers)) != 0)
        {
            rc = METER_DRAIN_REDIS;
            break;
        }

        a->nkeys = (strcmp(recs[i].key_hash, "*") == 0) ? 2 : 1;
        snprintf(a->key_hash, sizeof(a->key_hash), "%s", recs[i].key_hash);
        snprintf(a->meter, sizeof(a->meter), "%s", recs[i].meter);
        snprintf(a->fmeter, sizeof(a->fmeter), "%s", recs[i].smeter);
        a->quantity = recs[i].quantity;
        a->figure = 1;
        a->pend = mend;
    }

    if (rc == METER_DRAIN_OK) {
        rc = meter_drain_emit(d, mstart, &aggs);
    }

    meter_map_free(&aggs, meter_agg_free);

    return rc;
}


static meter_drain_rc_e
meter_drain_emit(meter_drain_t *d, time_t pstart, meter_map_t *aggs)
{
    size_t            i, n, chunk;
    meter_agg_t     **list;
    meter_drain_rc_e  rc;

    if (aggs->n == 0) {
        return METER_DRAIN_OK;
    }

    list = malloc(aggs->n * sizeof(meter_agg_t *));
    if (list == NULL) {
        return METER_DRAIN_REDIS;
    }

    n = 0;
    for (i = 0; i < aggs->cap; i++) {
        if (aggs->keys[i] != NULL && aggs->vals[i] != NULL) {
            list[n++] = aggs->vals[i];
        }
    }

    /* a stable order makes runs and logs comparable */
    qsort(list, n, sizeof(meter_agg_t *), meter_agg_cmp);

    for (i = 0; i < n; i++) {
        d->emitted += (list[i]->quantity > 0 || list[i]->figure);
    }

    rc = METER_DRAIN_OK;

    /* a provider that keeps many requests open takes bigger chunks, so
     * that the chunk's Redis round trips do not leave it idle */
    chunk = METER_CHUNK;
    if (d->provider->send_batch != NULL && d->provider->batch_max > chunk) {
        chunk = d->provider->batch_max;
    }

    for (i = 0; i < n && rc == METER_DRAIN_OK; i += chunk) {
        rc = meter_drain_chunk(d, pstart, &list[i],
                               (n - i < chunk) ? n - i : chunk);
    }

    free(list);

    return rc;
}


/*
 * Retention of the writer layout of one hour: when every counter in it is
 * billed (b >= u), its writer hashes are deleted, then the b marks of the
 * keys only it had (the key layout's expire script deletes the others'
 * along with their mtr:u).  Data first, marks after: a crash in between
 * leaves only marks, never unmarked data.  1 when gone, 0 when kept.
 */
static int
meter_drain_retire_writers(meter_drain_t *d, const char *hour)
{
    char          epoch[17], sid[21];
    size_t        i, j, k, m, n;
    uint64_t      bv;
    unsigned      unbilled, part, nparts;
    redisReply   *ws, *b, *rp;
    const char   *kh[METER_BATCH];
    meter_map_t   wm;
    meter_wkey_t *wk[METER_BATCH];

    if (meter_map_init(&wm, 64) != 0) {
        return 0;
    }

    ws = NULL;

    if (meter_wmap_load(d->redis, hour, &wm, NULL, &ws) != 0) {
        meter_map_free(&wm, meter_wkey_free);
        return 0;
    }

    unbilled = 0;
    i = 0;

    /* every counter billed? */
    while (i < wm.cap && unbilled == 0) {
        for (n = 0; i < wm.cap && n < METER_BATCH; i++) {
            if (wm.keys[i] != NULL) {
                kh[n] = wm.keys[i];
                wk[n++] = wm.vals[i];
            }
        }

        for (j = 0; j < n; j++) {
            if (meter_redis_append(d->redis, "HGETALL " MTR_B_FMT, kh[j],
                                   hour)
                != 0)
            {
                unbilled++;
            }
        }

        for (j = 0; j < n; j++) {
            b = meter_redis_reply(d->redis);
            if (b == NULL || b->type != REDIS_REPLY_ARRAY) {
                freeReplyObject(b);
                unbilled++;
                continue;
            }

            for (k = 0; k < wk[j]->n; k++) {
                bv = 0;

                for (m = 0; m + 1 < b->elements; m += 2) {
                    if (strcmp(b->element[m]->str, wk[j]->f[k].field) == 0) {
                        if (meter_parse_u64(b->element[m + 1]->str,
                                            b->element[m + 1]->len, &bv)
                            != 0)
                        {
                            bv = 0;
                        }

                        break;
                    }
                }

                if (bv < wk[j]->f[k].value) {
                    unbilled++;
                }
            }

            freeReplyObject(b);
        }
    }

    if (unbilled) {
        meter_log(LOG_WARNING, "hour %s is past retention but %u writer "
                  "counters are not billed; kept", hour, unbilled);
        goto kept;
    }

    /* UNLINK: a writer hash may hold a million fields, freed off Redis'
     * main thread */
    for (i = 0; i < ws->elements; i++) {
        if (ws->element[i]->type != REDIS_REPLY_STRING
            || meter_writer_parse(ws->element[i]->str, epoch, sid, &nparts)
               != 0)
        {
            continue;
        }

        for (part = 0; part < nparts; part++) {
            rp = meter_redis_cmd(d->redis, "UNLINK " MTR_WU_FMT, epoch, sid,
                                 hour, part);
            if (!meter_reply_ok(rp)) {
                freeReplyObject(rp);
                goto kept;
            }

            freeReplyObject(rp);
        }
    }

    for (i = 0; i < wm.cap; i++) {
        if (wm.keys[i] == NULL) {
            continue;
        }

        rp = meter_redis_cmd(d->redis, "SISMEMBER " MTR_IDX_FMT " %s", hour,
                             wm.keys[i]);

        if (meter_reply_int(rp, 1) == 0) {
            freeReplyObject(rp);
            rp = meter_redis_cmd(d->redis, "DEL " MTR_B_FMT, wm.keys[i],
                                 hour);
        }

        freeReplyObject(rp);
    }

    /* only the writers read above: one that indexed itself since (a node
     * back after an outage) keeps its entry, and so the hour */
    for (i = 0; i < ws->elements; i++) {
        if (ws->element[i]->type == REDIS_REPLY_STRING) {
            rp = meter_redis_cmd(d->redis, "SREM " MTR_WIDX_FMT " %s", hour,
                                 ws->element[i]->str);
            freeReplyObject(rp);
        }
    }

    freeReplyObject(ws);
    meter_map_free(&wm, meter_wkey_free);

    return 1;

kept:

    freeReplyObject(ws);
    meter_map_free(&wm, meter_wkey_free);

    return 0;
}


/* deletes key-hours past retention once everything in them is billed */
static void
meter_drain_retention(meter_drain_t *d, time_t now)
{
    char         cursor[32];
    size_t       h, i;
    unsigned     kept;
    redisReply  *hours, *rp, *k;
    const char  *kh;

    if (d->cf->retention == 0) {
        return;
    }

    /* settled hours too (hours.c) */
    snprintf(cursor, sizeof(cursor), "%lld",
             (long long) (now - METER_HOUR - d->cf->grace
                          - d->cf->retention));
    hours = meter_hours_range(d->redis, "-inf", cursor);
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(hours);
        return;
    }

    for (h = 0; h < hours->elements; h++) {
        if (meter_drain_check(d) != METER_DRAIN_OK) {
            break;
        }

        if (!meter_drain_retire_writers(d, hours->element[h]->str)) {
            continue;
        }

        strcpy(cursor, "0");
        kept = 0;

        do {
            rp = meter_redis_cmd(d->redis, "SSCAN " MTR_IDX_FMT " %s COUNT %d",
                                 hours->element[h]->str, cursor,
                                 METER_BATCH);
            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
                || rp->elements != 2)
            {
                freeReplyObject(rp);
                freeReplyObject(hours);
                return;
            }

            snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);

            for (i = 0; i < rp->element[1]->elements; i++) {
                kh = rp->element[1]->element[i]->str;

                k = meter_redis_cmd(d->redis,
                                    "EVAL %s 2 " MTR_U_FMT " " MTR_B_FMT,
                                    meter_lua_expire, kh,
                                    hours->element[h]->str, kh,
                                    hours->element[h]->str);
                if (meter_reply_int(k, 0) != 1) {
                    kept++;
                }

                freeReplyObject(k);
            }

            freeReplyObject(rp);

        } while (strcmp(cursor, "0") != 0);

        if (kept > 0) {
            meter_log(LOG_WARNING, "hour %s is past retention but %u keys "
                      "still have unbilled usage; kept",
                      hours->element[h]->str, kept);
            continue;
        }

        rp = meter_redis_cmd(d->redis, "DEL " MTR_IDX_FMT,
                             hours->element[h]->str);
        freeReplyObject(rp);
        rp = meter_redis_cmd(d->redis, "ZREM " MTR_HOURS " %s",
                             hours->element[h]->str);
        freeReplyObject(rp);
        meter_due_forget(d, hours->element[h]->str);

        /* a writer indexed after the check: the hour stays listed (its
         * SADD came before its ZADD NX, this check after the ZREM) */
        rp = meter_redis_cmd(d->redis, "SCARD " MTR_WIDX_FMT,
                             hours->element[h]->str);

        if (meter_reply_int(rp, 0) != 0) {
            freeReplyObject(rp);
            rp = meter_redis_cmd(d->redis, "ZADD " MTR_HOURS " NX %lld %s",
                                 (long long) meter_hour_parse(
                                     hours->element[h]->str),
                                 hours->element[h]->str);
            freeReplyObject(rp);
            continue;
        }

        freeReplyObject(rp);

        meter_log(LOG_INFO, "hour %s removed after retention",
                  hours->element[h]->str);
    }

    freeReplyObject(hours);
}
