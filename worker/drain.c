
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
#include "log.h"


#define METER_BATCH       500


/* the module's max-only update, reused for the b marks */
static const char  meter_lua_maxset[] =
    "for i = 1, #ARGV, 2 do\n"
    "  local cur = redis.call('HGET', KEYS[1], ARGV[i])\n"
    "  local v = ARGV[i + 1]\n"
    "  if not cur or #v > #cur or (#v == #cur and v > cur) then\n"
    "    redis.call('HSET', KEYS[1], ARGV[i], v)\n"
    "  end\n"
    "end\n"
    "return 1\n";

/* KEYS: period hash, record, open zset; ARGV: subject|meter, last seq,
 * new seq, id, score, expire, then the record's field/value pairs */
static const char  meter_lua_create[] =
    "if redis.call('HEXISTS', KEYS[1], ARGV[1] .. '|open') == 1 then\n"
    "  return 0\n"
    "end\n"
    "local s = redis.call('HGET', KEYS[1], ARGV[1]) or '0'\n"
    "if s ~= ARGV[2] then return 0 end\n"
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])\n"
    "redis.call('HSET', KEYS[1], ARGV[1] .. '|open', ARGV[4])\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[6])\n"
    "for i = 7, #ARGV, 2 do\n"
    "  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])\n"
    "end\n"
    "redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])\n"
    "return 1\n";

/* KEYS: record, period hash, open zset, stats; ARGV: id, subject|meter,
 * quantity */
static const char  meter_lua_done[] =
    "redis.call('DEL', KEYS[1])\n"
    "if redis.call('HGET', KEYS[2], ARGV[2] .. '|open') == ARGV[1] then\n"
    "  redis.call('HDEL', KEYS[2], ARGV[2] .. '|open')\n"
    "end\n"
    "redis.call('ZREM', KEYS[3], ARGV[1])\n"
    "redis.call('HINCRBY', KEYS[4], 'records_sent', 1)\n"
    "redis.call('HINCRBY', KEYS[4], 'quantity_sent', ARGV[3])\n"
    "return 1\n";

/* KEYS: record, open zset, dead zset; ARGV: id, now, error, http status */
static const char  meter_lua_dead[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'state', 'dead', 'last_error', ARGV[3],\n"
    "           'http_status', ARGV[4], 'dead_at', ARGV[2])\n"
    "redis.call('ZREM', KEYS[2], ARGV[1])\n"
    "redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])\n"
    "return 1\n";

static const char  meter_lua_renew[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  return redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
    "end\n"
    "return 0\n";

static const char  meter_lua_release[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  return redis.call('DEL', KEYS[1])\n"
    "end\n"
    "return 0\n";

/* KEYS: u, b of one key-hour; deletes both when everything is billed */
static const char  meter_lua_expire[] =
    "local u = redis.call('HGETALL', KEYS[1])\n"
    "for i = 1, #u, 2 do\n"
    "  if redis.call('HGET', KEYS[2], u[i]) ~= u[i + 1] then return 0 end\n"
    "end\n"
    "redis.call('DEL', KEYS[1], KEYS[2])\n"
    "return 1\n";


typedef struct {
    char                       *subject;
    char                       *customer;       /* NULL: key without one */
    char                        key_hash[65];   /* first contributing key */
    unsigned                    nkeys;
    char                        meter[METER_METER_MAX + 1];
    uint64_t                    quantity;
    meter_str_t                 covers;         /* "HOUR KH FIELD VALUE\n" */
} meter_agg_t;


static int meter_drain_check(meter_drain_t *d);
static meter_drain_rc_e meter_drain_resume(meter_drain_t *d);
static meter_drain_rc_e meter_drain_periods(meter_drain_t *d, time_t now);
static meter_drain_rc_e meter_drain_period(meter_drain_t *d, time_t pstart,
    char **hours, size_t nhours);
static meter_drain_rc_e meter_drain_emit(meter_drain_t *d, time_t pstart,
    meter_map_t *aggs);
static meter_drain_rc_e meter_drain_record(meter_drain_t *d, const char *id);
static void meter_drain_retention(meter_drain_t *d, time_t now);


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
    size_t          i, j, mlen;
    uint64_t        delta;
    const char     *bar, *bv;
    meter_usage_t  *us, *m;

    *out = NULL;
    *nout = 0;
    us = NULL;

    for (i = 0; i + 1 < nu; i += 2) {
        bar = strchr(u[i], '|');
        mlen = (bar != NULL) ? (size_t) (bar - u[i]) : 0;

        if (mlen == 0 || mlen > METER_METER_MAX) {
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

        if (delta == 0) {
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
        }

        if (m->quantity > UINT64_MAX - delta) {
            (*bad)++;
            continue;
        }

        m->quantity += delta;

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

    rp = meter_redis_cmd(d->redis, "SET %s %s NX PX %lld", METER_W_LOCK,
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
                         METER_W_LOCK, d->token,
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
                         METER_W_LOCK, d->token);
    freeReplyObject(rp);
}


/* between records: stop flag, watchdog, lock renewal; 0 to go on */
static int
meter_drain_check(meter_drain_t *d)
{
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
    d->next_due = 0;

    if (meter_map_init(&d->customers, 64) != 0) {
        meter_log(LOG_ERR, "out of memory");
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
                             METER_W_STATS, (long long) time(NULL));
        freeReplyObject(rp);
    }

    if (!d->dry_run && d->redis->ctx != NULL) {
        /* the earliest retry, so that the daemon wakes up for it */
        rp = meter_redis_cmd(d->redis, "ZRANGE %s 0 0 WITHSCORES",
                             METER_W_OPEN);
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
    size_t            i;
    redisReply       *rp;
    meter_drain_rc_e  rc;

    if (d->dry_run) {
        rp = meter_redis_cmd(d->redis, "ZCARD %s", METER_W_OPEN);
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

    for ( ;; ) {
        rp = meter_redis_cmd(d->redis, "ZRANGEBYSCORE %s -inf %lld LIMIT 0 %d",
                             METER_W_OPEN, (long long) time(NULL),
                             METER_BATCH);
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

        for (i = 0; i < rp->elements; i++) {
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

        if (i < METER_BATCH) {
            return METER_DRAIN_OK;
        }
    }
}


static meter_drain_rc_e
meter_drain_periods(meter_drain_t *d, time_t now)
{
    time_t            closed_end, hs, ps, pcur;
    size_t            i, first;
    char            **hours;
    redisReply       *rp;
    meter_drain_rc_e  rc;

    /* an hour (or day) is closed when its end is at or before closed_end */
    closed_end = (d->before != 0) ? d->before : now - d->cf->grace;

    rp = meter_redis_cmd(d->redis, "ZRANGEBYSCORE %s -inf %lld",
                         "mtr:hours",
                         (long long) (closed_end - METER_HOUR));
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        meter_log(LOG_ERR, "mtr:hours: %s",
                  rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    hours = calloc(rp->elements + 1, sizeof(char *));
    if (hours == NULL) {
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    rc = METER_DRAIN_OK;
    first = 0;
    pcur = -1;

    if (!d->dry_run) {
        freeReplyObject(meter_redis_cmd(d->redis, "DEL %s",
                                        METER_W_NOCUST_NEW));
    }

    /* the zset is ordered by hour start, so periods come out in order */
    for (i = 0; i <= rp->elements && rc == METER_DRAIN_OK; i++) {
        hs = -1;
        ps = -1;

        if (i < rp->elements) {
            hs = meter_hour_parse(rp->element[i]->str);
            if (hs == -1) {
                meter_log(LOG_WARNING, "mtr:hours: ignoring malformed hour "
                          "\"%.16s\"", rp->element[i]->str);
                hours[i] = NULL;
                continue;
            }

            ps = meter_period_start(hs, d->cf->report_period);
            hours[i] = rp->element[i]->str;
        }

        if (ps == pcur) {
            continue;
        }

        if (pcur != -1 && pcur + d->cf->report_period <= closed_end) {
            rc = meter_drain_period(d, pcur, &hours[first], i - first);
        }

        pcur = ps;
        first = i;
    }

    free(hours);
    freeReplyObject(rp);

    if (rc == METER_DRAIN_OK && !d->dry_run) {
        /* the keys found without customer in this complete pass */
        rp = meter_redis_cmd(d->redis, "EXISTS %s", METER_W_NOCUST_NEW);
        if (meter_reply_int(rp, 0) == 1) {
            freeReplyObject(rp);
            rp = meter_redis_cmd(d->redis, "RENAME %s %s", METER_W_NOCUST_NEW,
                                 METER_W_NOCUST);

        } else {
            freeReplyObject(rp);
            rp = meter_redis_cmd(d->redis, "DEL %s", METER_W_NOCUST);
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

    if (a->subject == NULL || (customer != NULL && a->customer == NULL)) {
        meter_agg_free(a);
        return NULL;
    }

    *slot = a;

    return a;
}


/* one SSCAN batch of one hour: u, b and customer of every key */
static meter_drain_rc_e
meter_drain_batch(meter_drain_t *d, const char *hour, redisReply *keys,
    meter_map_t *period_aggs, meter_map_t *batch_aggs)
{
    size_t            i, k, nu, nb, nus;
    unsigned          bad;
    char              prefix[128];
    const char       *kh, *customer, **uv, **bv;
    redisReply       *u, *b, *c;
    meter_agg_t      *a;
    meter_map_t      *aggs;
    meter_usage_t    *us;
    meter_drain_rc_e  rc;

    rc = METER_DRAIN_OK;

    for (i = 0; i < keys->elements; i++) {
        kh = keys->element[i]->str;

        if (!meter_is_hex64(kh, keys->element[i]->len)) {
            continue;
        }

        if (meter_redis_append(d->redis, "HGETALL mtr:u:{%s}:%s", kh, hour)
            != 0
            || meter_redis_append(d->redis, "HGETALL mtr:b:{%s}:%s", kh, hour)
               != 0
            || meter_redis_append(d->redis, "HGET mtr:key:{%s} customer", kh)
               != 0)
        {
            return METER_DRAIN_REDIS;
        }
    }

    for (i = 0; i < keys->elements; i++) {
        kh = keys->element[i]->str;

        if (!meter_is_hex64(kh, keys->element[i]->len)) {
            continue;
        }

        u = meter_redis_reply(d->redis);
        b = (u != NULL) ? meter_redis_reply(d->redis) : NULL;
        c = (b != NULL) ? meter_redis_reply(d->redis) : NULL;

        if (c == NULL) {
            freeReplyObject(u);
            freeReplyObject(b);
            meter_log(LOG_ERR, "hour %s: %s", hour, d->redis->err);
            return METER_DRAIN_REDIS;
        }

        if (rc != METER_DRAIN_OK || u->type != REDIS_REPLY_ARRAY
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

        nu = u->elements;
        nb = b->elements;
        uv = malloc((nu + nb + 1) * sizeof(char *));
        if (uv == NULL) {
            rc = METER_DRAIN_REDIS;
            goto next;
        }

        bv = uv + nu;

        for (k = 0; k < nu; k++) {
            uv[k] = (u->element[k]->type == REDIS_REPLY_STRING)
                    ? u->element[k]->str : "";
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
            rc = METER_DRAIN_REDIS;
            goto next;
        }

        free(uv);

        if (bad) {
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
    size_t            h;
    redisReply       *rp;
    meter_map_t       period_aggs, batch_aggs;
    meter_drain_rc_e  rc;

    rc = METER_DRAIN_OK;

    if (meter_map_init(&period_aggs, 64) != 0) {
        return METER_DRAIN_REDIS;
    }

    for (h = 0; h < nhours && rc == METER_DRAIN_OK; h++) {
        if (hours[h] == NULL) {
            continue;
        }

        strcpy(cursor, "0");

        do {
            rc = meter_drain_check(d);
            if (rc != METER_DRAIN_OK) {
                break;
            }

            rp = meter_redis_cmd(d->redis, "SSCAN mtr:idx:%s %s COUNT %d",
                                 hours[h], cursor, METER_BATCH);
            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
                || rp->elements != 2)
            {
                meter_log(LOG_ERR, "mtr:idx:%s: %s", hours[h],
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

            rc = meter_drain_batch(d, hours[h], rp->element[1], &period_aggs,
                                   &batch_aggs);
            freeReplyObject(rp);

            if (rc == METER_DRAIN_OK) {
                rc = meter_drain_emit(d, pstart, &batch_aggs);
            }

            meter_map_free(&batch_aggs, meter_agg_free);

        } while (rc == METER_DRAIN_OK && strcmp(cursor, "0") != 0);
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


static meter_drain_rc_e
meter_drain_create(meter_drain_t *d, time_t pstart, meter_agg_t *a,
    char *id)
{
    char         pkey[64], sm[160], last[24], next[24], q[24], ps[24], pe[24];
    char         now[24], expire[24], seqs[24], rkey[64];
    const char  *argv[48];
    size_t       argl[48];
    int          argc, i;
    uint64_t     seq;
    redisReply  *rp;

    snprintf(pkey, sizeof(pkey), METER_W_PERIOD "%lld", (long long) pstart);
    snprintf(sm, sizeof(sm), "%s|%s", a->subject, a->meter);

    rp = meter_redis_cmd(d->redis, "HMGET %s %s %s|open", pkey, sm, sm);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
        || rp->elements != 2)
    {
        meter_log(LOG_ERR, "%s: %s", pkey,
                  rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    if (rp->element[1]->type == REDIS_REPLY_STRING) {
        /* an older record of this period, subject and meter is still open
         * (retrying or dead-lettered): its usage is not marked billed yet */
        meter_log(LOG_DEBUG, "record %s still open; waiting",
                  rp->element[1]->str);
        d->waiting++;
        freeReplyObject(rp);
        id[0] = '\0';
        return METER_DRAIN_OK;
    }

    seq = 0;
    if (rp->element[0]->type == REDIS_REPLY_STRING
        && meter_parse_u64(rp->element[0]->str, rp->element[0]->len, &seq)
           != 0)
    {
        seq = 0;
    }

    freeReplyObject(rp);

    snprintf(last, sizeof(last), "%" PRIu64, seq);
    snprintf(next, sizeof(next), "%" PRIu64, seq + 1);
    snprintf(seqs, sizeof(seqs), "%" PRIu64, seq + 1);
    snprintf(q, sizeof(q), "%" PRIu64, a->quantity);
    snprintf(ps, sizeof(ps), "%lld", (long long) pstart);
    snprintf(pe, sizeof(pe), "%lld",
             (long long) (pstart + d->cf->report_period));
    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));
    /* sequence numbers must outlive the usage they number */
    snprintf(expire, sizeof(expire), "%lld",
             (long long) (2 * d->cf->retention + 2 * METER_DAY));

    meter_idem_key(pstart, a->subject, a->meter, seq + 1, id);

    snprintf(rkey, sizeof(rkey), METER_W_REC "%s", id);

    argc = 0;

#define meter_arg(s)                                                         \
    do {                                                                     \
        argv[argc] = (s);                                                    \
        argl[argc] = strlen(s);                                              \
        argc++;                                                              \
    } while (0)

    meter_arg("EVAL");
    meter_arg(meter_lua_create);
    meter_arg("3");
    meter_arg(pkey);
    meter_arg(rkey);
    meter_arg(METER_W_OPEN);
    meter_arg(sm);
    meter_arg(last);
    meter_arg(next);
    meter_arg(id);
    meter_arg(now);
    meter_arg(expire);
    meter_arg("state");
    meter_arg("sending");
    meter_arg("pkey");
    meter_arg(pkey);
    meter_arg("sm");
    meter_arg(sm);
    meter_arg("subject");
    meter_arg(a->subject);
    meter_arg("meter");
    meter_arg(a->meter);
    meter_arg("seq");
    meter_arg(seqs);
    meter_arg("period_start");
    meter_arg(ps);
    meter_arg("period_end");
    meter_arg(pe);
    meter_arg("quantity");
    meter_arg(q);
    meter_arg("created");
    meter_arg(now);
    meter_arg("attempts");
    meter_arg("0");

    if (a->customer != NULL) {
        meter_arg("customer");
        meter_arg(a->customer);
    }

    if (a->nkeys == 1) {
        meter_arg("key_hash");
        meter_arg(a->key_hash);
    }

    meter_arg("covers");
    argv[argc] = a->covers.data;
    argl[argc] = a->covers.len;
    argc++;

#undef meter_arg

    rp = meter_redis_argv(d->redis, argc, argv, argl);
    if (!meter_reply_ok(rp)) {
        meter_log(LOG_ERR, "creating record %s: %s", id,
                  rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    i = (int) meter_reply_int(rp, 0);
    freeReplyObject(rp);

    if (i != 1) {
        /* someone changed the sequence under us: recompute next pass */
        id[0] = '\0';
        return METER_DRAIN_OK;
    }

    d->created++;

    return METER_DRAIN_OK;
}


static meter_drain_rc_e
meter_drain_emit(meter_drain_t *d, time_t pstart, meter_map_t *aggs)
{
    char              id[METER_IDEM_LEN + 1], ps[32];
    size_t            i, n;
    redisReply       *rp;
    meter_agg_t     **list, *a;
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

    rc = METER_DRAIN_OK;

    for (i = 0; i < n && rc == METER_DRAIN_OK; i++) {
        a = list[i];

        if (a->quantity == 0) {
            continue;
        }

        if (a->customer == NULL && strcmp(d->cf->provider, "file") != 0) {
            /* held, not dropped: billed once the key gets a customer */
            d->held++;

            if (!d->dry_run) {
                rp = meter_redis_cmd(d->redis, "SADD %s %s",
                                     METER_W_NOCUST_NEW, a->subject);
                if (!meter_reply_ok(rp)) {
                    rc = METER_DRAIN_REDIS;
                }

                freeReplyObject(rp);
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

        rc = meter_drain_check(d);
        if (rc != METER_DRAIN_OK) {
            break;
        }

        rc = meter_drain_create(d, pstart, a, id);

        if (rc == METER_DRAIN_OK && id[0] != '\0') {
            rc = meter_drain_record(d, id);
        }
    }

    free(list);

    return rc;
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

    rp = meter_redis_cmd(d->redis, "HGETALL mtr:cust:{%s}", customer);
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

    snprintf(rkey, sizeof(rkey), METER_W_REC "%s", id);
    snprintf(status, sizeof(status), "%ld", http_status);

    rp = meter_redis_cmd(d->redis, "EVAL %s 3 %s %s %s %s %lld %s %s",
                         meter_lua_dead, rkey, METER_W_OPEN, METER_W_DEAD, id,
                         (long long) time(NULL), error, status);
    if (!meter_reply_ok(rp)) {
        meter_log(LOG_ERR, "record %s: %s", id,
                  rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    freeReplyObject(rp);

    d->dead++;
    meter_log(LOG_ERR, "record %s dead-lettered: %s (meterctl retry %s "
              "requeues it)", id, error, id);

    return METER_DRAIN_OK;
}


/* after the provider accepted a record: b marks, audit, delete */
static meter_drain_rc_e
meter_drain_finish(meter_drain_t *d, const char *id, redisReply *rec)
{
    char          bkey[128], key[128], rkey[64], ps[32], pe[32], now[32];
    char          err[512];
    const char   *covers, *line, *nl, *sp1, *sp2, *sp3, *q, *pkey, *sm;
    const char  **argv;
    size_t       *argl, cap, n, argc, i;
    meter_str_t   audit;
    redisReply   *rp;
    int           failed;

    covers = meter_reply_hget(rec, "covers");
    q = meter_reply_hget(rec, "quantity");
    pkey = meter_reply_hget(rec, "pkey");
    sm = meter_reply_hget(rec, "sm");

    if (covers == NULL || q == NULL || pkey == NULL || sm == NULL) {
        meter_log(LOG_ERR, "record %s is malformed", id);
        return meter_drain_dead(d, id, "malformed record in Redis", 0);
    }

    /* one max-only script per key-hour; covers lines of one key-hour are
     * adjacent, "HOUR KH FIELD VALUE" */
    cap = 64;
    argv = malloc(cap * sizeof(char *));
    argl = malloc(cap * sizeof(size_t));
    if (argv == NULL || argl == NULL) {
        free(argv);
        free(argl);
        return METER_DRAIN_REDIS;
    }

    n = 0;
    argc = 0;
    bkey[0] = '\0';
    failed = 0;

    for (line = covers; *line != '\0' && !failed; line = nl + 1) {
        nl = strchr(line, '\n');
        sp1 = strchr(line, ' ');
        sp2 = (sp1 != NULL) ? strchr(sp1 + 1, ' ') : NULL;
        sp3 = (sp2 != NULL) ? strchr(sp2 + 1, ' ') : NULL;

        if (nl == NULL || sp3 == NULL || sp3 > nl) {
            meter_log(LOG_ERR, "record %s: malformed covers", id);
            failed = 1;
            break;
        }

        snprintf(key, sizeof(key), "mtr:b:{%.*s}:%.*s", (int) (sp2 - sp1 - 1),
                 sp1 + 1, (int) (sp1 - line), line);

        if (strcmp(key, bkey) != 0) {
            if (argc > 0) {
                if (meter_redis_append_argv(d->redis, (int) argc, argv, argl)
                    != 0)
                {
                    failed = 1;
                    break;
                }

                n++;
            }

            snprintf(bkey, sizeof(bkey), "%s", key);

            /* argv keeps pointers into covers and bkey until appended */
            argc = 0;
            argv[argc] = "EVAL";
            argl[argc++] = 4;
            argv[argc] = meter_lua_maxset;
            argl[argc++] = sizeof(meter_lua_maxset) - 1;
            argv[argc] = "1";
            argl[argc++] = 1;
            argv[argc] = bkey;
            argl[argc++] = strlen(bkey);
        }

        if (argc + 2 > cap) {
            cap *= 2;
            argv = realloc(argv, cap * sizeof(char *));
            argl = realloc(argl, cap * sizeof(size_t));
            if (argv == NULL || argl == NULL) {
                free(argv);
                free(argl);
                return METER_DRAIN_REDIS;
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
            n++;
        }
    }

    free(argv);
    free(argl);

    for (i = 0; i < n; i++) {
        rp = meter_redis_reply(d->redis);
        if (!meter_reply_ok(rp)) {
            meter_log(LOG_ERR, "record %s: setting billed marks: %s", id,
                      rp != NULL ? rp->str : d->redis->err);
            failed = 1;
        }

        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            break;
        }
    }

    if (failed) {
        /* still "sent": the next pass finishes it */
        return METER_DRAIN_REDIS;
    }

    if (d->audit != NULL && !meter_jsonl_has(d->audit, id)) {
        memset(&audit, 0, sizeof(meter_str_t));

        meter_iso8601((time_t) strtoll(meter_reply_hget(rec, "period_start"),
                                       NULL, 10), ps, sizeof(ps));
        meter_iso8601((time_t) strtoll(meter_reply_hget(rec, "period_end"),
                                       NULL, 10), pe, sizeof(pe));
        meter_iso8601(time(NULL), now, sizeof(now));

        if (meter_str_add(&audit, "{\"idempotency_key\":", 19) != 0
            || meter_str_json(&audit, id) != 0
            || meter_str_add(&audit, ",\"provider\":", 12) != 0
            || meter_str_json(&audit, d->provider->name) != 0
            || meter_str_add(&audit, ",\"customer\":", 12) != 0
            || meter_str_json(&audit, meter_reply_hget(rec, "customer")) != 0
            || meter_str_add(&audit, ",\"key_hash\":", 12) != 0
            || meter_str_json(&audit, meter_reply_hget(rec, "key_hash")) != 0
            || meter_str_add(&audit, ",\"meter\":", 9) != 0
            || meter_str_json(&audit, meter_reply_hget(rec, "meter")) != 0
            || meter_str_printf(&audit, ",\"period_start\":\"%s\","
                                "\"period_end\":\"%s\",\"quantity\":%s,"
                                "\"accepted_at\":\"%s\"}\n", ps, pe, q, now)
               != 0)
        {
            meter_str_free(&audit);
            return METER_DRAIN_REDIS;
        }

        if (meter_jsonl_write(d->audit, id, audit.data, audit.len, err,
                              sizeof(err))
            != 0)
        {
            meter_log(LOG_ERR, "audit: %s", err);
            meter_str_free(&audit);
            return METER_DRAIN_REDIS;
        }

        meter_str_free(&audit);
    }

    snprintf(rkey, sizeof(rkey), METER_W_REC "%s", id);

    rp = meter_redis_cmd(d->redis, "EVAL %s 4 %s %s %s %s %s %s %s",
                         meter_lua_done, rkey, pkey, METER_W_OPEN,
                         METER_W_STATS, id, sm, q);
    if (!meter_reply_ok(rp)) {
        meter_log(LOG_ERR, "record %s: %s", id,
                  rp != NULL ? rp->str : d->redis->err);
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    freeReplyObject(rp);

    d->sent++;

    return METER_DRAIN_OK;
}


static meter_drain_rc_e
meter_drain_record(meter_drain_t *d, const char *id)
{
    char                  rkey[64], field[64], err[600];
    long                  attempts;
    double                delay;
    time_t                now, next;
    const char           *state, *customer;
    redisReply           *rec, *cust, *rp;
    meter_record_t        r;
    meter_send_e          st;
    meter_drain_rc_e      rc;
    meter_send_result_t   res;
    int                   found;

    st = METER_SEND_RETRY;

    snprintf(rkey, sizeof(rkey), METER_W_REC "%s", id);

    rec = meter_redis_cmd(d->redis, "HGETALL %s", rkey);
    if (!meter_reply_ok(rec) || rec->type != REDIS_REPLY_ARRAY) {
        meter_log(LOG_ERR, "record %s: %s", id,
                  rec != NULL ? rec->str : d->redis->err);
        freeReplyObject(rec);
        return METER_DRAIN_REDIS;
    }

    state = meter_reply_hget(rec, "state");

    if (state == NULL) {
        /* gone (meterctl, a finished pass): drop the stale entry */
        freeReplyObject(rec);
        rp = meter_redis_cmd(d->redis, "ZREM %s %s", METER_W_OPEN, id);
        freeReplyObject(rp);
        return METER_DRAIN_OK;
    }

    if (strcmp(state, "sent") == 0) {
        rc = meter_drain_finish(d, id, rec);
        freeReplyObject(rec);
        return rc;
    }

    if (strcmp(state, "sending") != 0) {
        freeReplyObject(rec);
        rp = meter_redis_cmd(d->redis, "ZREM %s %s", METER_W_OPEN, id);
        freeReplyObject(rp);
        return METER_DRAIN_OK;
    }

    memset(&r, 0, sizeof(meter_record_t));
    memset(&res, 0, sizeof(meter_send_result_t));

    r.idempotency_key = id;
    r.key_hash = meter_reply_hget(rec, "key_hash");
    r.customer = meter_reply_hget(rec, "customer");
    r.meter = meter_reply_hget(rec, "meter");
    r.period_start = (time_t) strtoll(meter_reply_hget(rec, "period_start")
                                      ? meter_reply_hget(rec, "period_start")
                                      : "0", NULL, 10);
    r.period_end = (time_t) strtoll(meter_reply_hget(rec, "period_end")
                                    ? meter_reply_hget(rec, "period_end")
                                    : "0", NULL, 10);
    r.quantity = strtoull(meter_reply_hget(rec, "quantity")
                          ? meter_reply_hget(rec, "quantity") : "0", NULL, 10);

    if (r.meter == NULL || r.period_start == 0 || r.quantity == 0) {
        rc = meter_drain_dead(d, id, "malformed record in Redis", 0);
        freeReplyObject(rec);
        return rc;
    }

    r.provider_meter = meter_conf_meter(d->cf, r.meter);
    if (r.provider_meter == NULL) {
        r.provider_meter = r.meter;
    }

    now = time(NULL);

    if (d->cf->max_age > 0 && now - r.period_start > d->cf->max_age) {
        snprintf(err, sizeof(err), "period starts %llds ago, older than the "
                 "%llds \"%s\" accepts (max_age)",
                 (long long) (now - r.period_start),
                 (long long) d->cf->max_age, d->provider->name);
        rc = meter_drain_dead(d, id, err, 0);
        freeReplyObject(rec);
        return rc;
    }

    customer = r.customer;

    if (customer != NULL) {
        cust = meter_drain_customer(d, customer);
        if (cust == NULL) {
            freeReplyObject(rec);
            return METER_DRAIN_REDIS;
        }

        r.provider_customer = meter_reply_hget(cust, "provider_customer");
        r.subscription = meter_reply_hget(cust, "subscription");
        snprintf(field, sizeof(field), "item.%s", r.meter);
        r.subscription_item = meter_reply_hget(cust, field);

        if (strcmp(d->cf->provider, "file") != 0
            && r.provider_customer == NULL && r.subscription == NULL)
        {
            snprintf(err, sizeof(err), "customer \"%s\" has neither "
                     "provider_customer nor subscription", customer);
            rc = meter_drain_dead(d, id, err, 0);
            freeReplyObject(rec);
            return rc;
        }
    }

    /* count the attempt before making it: after a crash, attempts > 0
     * tells that the provider may have the record already */
    rp = meter_redis_cmd(d->redis, "HINCRBY %s attempts 1", rkey);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rp);
        freeReplyObject(rec);
        return METER_DRAIN_REDIS;
    }

    attempts = (long) meter_reply_int(rp, 1);
    freeReplyObject(rp);

    found = 0;

    if (attempts > 1 && d->provider->lookup != NULL) {
        found = d->provider->lookup(d->provider, &r, &res);

        if (found == -1) {
            st = METER_SEND_RETRY;
            if (res.error[0] == '\0') {
                snprintf(res.error, sizeof(res.error), "lookup failed");
            }
        }
    }

    if (found == 1) {
        st = METER_SEND_OK;
        meter_log(LOG_INFO, "record %s: the provider has it already", id);

    } else if (found == 0) {
        memset(&res, 0, sizeof(meter_send_result_t));
        st = d->provider->send(d->provider, &r, &res);
    }

    switch (st) {

    case METER_SEND_OK:
        rp = meter_redis_cmd(d->redis, "HSET %s state sent accepted %lld "
                             "http_status %ld", rkey, (long long) time(NULL),
                             res.http_status);
        if (!meter_reply_ok(rp)) {
            /* still "sending": resent (and deduped) next pass */
            meter_log(LOG_ERR, "record %s: accepted, but %s", id,
                      rp != NULL ? rp->str : d->redis->err);
            freeReplyObject(rp);
            freeReplyObject(rec);
            return METER_DRAIN_REDIS;
        }

        freeReplyObject(rp);

        meter_log(LOG_DEBUG, "record %s: %s %s %" PRIu64 " accepted", id,
                  customer != NULL ? customer : "-", r.meter, r.quantity);

        rc = meter_drain_finish(d, id, rec);
        freeReplyObject(rec);
        return rc;

    case METER_SEND_RETRY:
        delay = meter_backoff((unsigned) attempts, (double) d->cf->retry_base,
                              (double) d->cf->retry_max, res.retry_after,
                              meter_random());
        next = now + (time_t) (delay + 0.999);

        rp = meter_redis_cmd(d->redis, "HSET %s next_attempt %lld "
                             "last_error %s http_status %ld", rkey,
                             (long long) next, res.error, res.http_status);
        freeReplyObject(rp);

        rp = meter_redis_cmd(d->redis, "ZADD %s %lld %s", METER_W_OPEN,
                             (long long) next, id);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rp);
            freeReplyObject(rec);
            return METER_DRAIN_REDIS;
        }

        freeReplyObject(rp);

        d->retried++;
        meter_log(LOG_WARNING, "record %s: %s; attempt %ld, next in %.0fs",
                  id, res.error[0] ? res.error : "temporary failure",
                  attempts, delay);

        freeReplyObject(rec);
        return METER_DRAIN_OK;

    default:
        rc = meter_drain_dead(d, id, res.error[0] ? res.error : "rejected",
                              res.http_status);
        freeReplyObject(rec);
        return rc;
    }
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

    hours = meter_redis_cmd(d->redis, "ZRANGEBYSCORE mtr:hours -inf %lld",
                            (long long) (now - METER_HOUR - d->cf->grace
                                         - d->cf->retention));
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(hours);
        return;
    }

    for (h = 0; h < hours->elements; h++) {
        if (meter_drain_check(d) != METER_DRAIN_OK) {
            break;
        }

        strcpy(cursor, "0");
        kept = 0;

        do {
            rp = meter_redis_cmd(d->redis, "SSCAN mtr:idx:%s %s COUNT %d",
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
                                    "EVAL %s 2 mtr:u:{%s}:%s mtr:b:{%s}:%s",
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

        rp = meter_redis_cmd(d->redis, "DEL mtr:idx:%s",
                             hours->element[h]->str);
        freeReplyObject(rp);
        rp = meter_redis_cmd(d->redis, "ZREM mtr:hours %s",
                             hours->element[h]->str);
        freeReplyObject(rp);

        meter_log(LOG_INFO, "hour %s removed after retention",
                  hours->element[h]->str);
    }

    freeReplyObject(hours);
}
