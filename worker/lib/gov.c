
/*
 * Copyright (C) nginx-meter authors
 *
 * Governance writes (gov.h, docs/redis-schema.md "Governance").
 *
 * A status change is one Lua script on the customer's hash, so the
 * ordering rules (status_at, a sync never clears a manual mark) hold
 * between concurrent writers.  The mtr:gov projection is then rebuilt from
 * what Redis holds, not from what this writer believes; it touches keys of
 * other hash slots, so it is a plain sequence of commands.  Two writers
 * projecting the same customer at once can leave an older projection for
 * a moment; the next change of that customer rewrites it.
 *
 * Every version is logged in mtr:gov:log with the fields it rewrote, so
 * that the module reads those, not all of mtr:gov.  The log is written
 * after the INCR (the version is its score): a crash between the two
 * leaves a version without entry, which the module reads as a gap and
 * answers with a full read.
 */


#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gov.h"
#include "meter_schema.h"
#include "scripts.h"
#include "util.h"


static int
meter_gov_failed(meter_redis_t *r, redisReply *rp, const char *what,
    char *err, size_t errlen)
{
    snprintf(err, errlen, "%s: %s", what,
             (rp != NULL && rp->type == REDIS_REPLY_ERROR) ? rp->str : r->err);
    freeReplyObject(rp);

    return -1;
}


static int
meter_gov_valid_id(const char *s)
{
    size_t  n;

    n = (s != NULL) ? strlen(s) : 0;

    return n >= 1 && n <= 64
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


static int
meter_gov_valid_meter(const char *s)
{
    size_t  n;

    n = (s != NULL) ? strlen(s) : 0;

    return n >= 1 && n <= 32
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


/*
 * INCR mtr:gov:version, then log what that version changed (keys: " KH"
 * each, NULL: only credit) and drop the entries past MTR_GOV_LOG_KEEP.
 */
static int
meter_gov_bump_log(meter_redis_t *r, const char *keys, size_t nkeys,
    char *err, size_t errlen)
{
    int          n;
    char         floor[24], *member;
    size_t       size;
    long long    v;
    redisReply  *rp;

    rp = meter_redis_cmd(r, "INCR " MTR_GOV_VERSION);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        return meter_gov_failed(r, rp, MTR_GOV_VERSION, err, errlen);
    }

    v = rp->integer;
    freeReplyObject(rp);

    if (nkeys > MTR_GOV_LOG_MAXKEYS) {
        keys = " " MTR_GOV_LOG_ALL;
    }

    size = 24 + (keys != NULL ? strlen(keys) : 0);

    member = malloc(size);
    if (member == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    n = snprintf(member, size, "%lld%s", v, keys != NULL ? keys : "");

    rp = meter_redis_cmd(r, "ZADD " MTR_GOV_LOG " %lld %b", v, member,
                         (size_t) n);
    free(member);

    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, MTR_GOV_LOG, err, errlen);
    }

    freeReplyObject(rp);

    snprintf(floor, sizeof(floor), "%lld", v - MTR_GOV_LOG_KEEP);

    rp = meter_redis_cmd(r, "ZREMRANGEBYSCORE " MTR_GOV_LOG " -inf %s",
                         floor);
    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, MTR_GOV_LOG, err, errlen);
    }

    freeReplyObject(rp);

    return 0;
}


int
meter_gov_project(meter_redis_t *r, const char *customer, char *err,
    size_t errlen)
{
    char         line[512], *logged, *p;
    size_t       i, nlogged;
    int          delinquent, known;
    redisReply  *keys, *cust, *key, *rp;
    const char  *status, *reason, *since, *revoked, *owner;

    if (!meter_gov_valid_id(customer)) {
        snprintf(err, errlen, "invalid customer id \"%s\"",
                 customer != NULL ? customer : "");
        return -1;
    }

    cust = meter_redis_cmd(r, "HGETALL " MTR_CUST_FMT, customer);
    if (!meter_reply_ok(cust)) {
        return meter_gov_failed(r, cust, "customer", err, errlen);
    }

    keys = meter_redis_cmd(r, "SMEMBERS " MTR_CKEYS_FMT, customer);
    if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(cust);
        return meter_gov_failed(r, keys, "customer keys", err, errlen);
    }

    status = meter_reply_hget(cust, "status");
    reason = meter_reply_hget(cust, "reason");
    since = meter_reply_hget(cust, "since");
    delinquent = (status != NULL && strcmp(status, "delinquent") == 0);
    known = (cust->type == REDIS_REPLY_ARRAY && cust->elements > 0);

    /* " KH" per field rewritten, for mtr:gov:log */
    logged = malloc(keys->elements * 65 + 1);
    if (logged == NULL) {
        freeReplyObject(keys);
        freeReplyObject(cust);
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    p = logged;
    *p = '\0';
    nlogged = 0;

    for (i = 0; i < keys->elements; i++) {
        if (keys->element[i]->type != REDIS_REPLY_STRING) {
            continue;
        }

        key = meter_redis_cmd(r, "HGETALL " MTR_KEY_FMT,
                              keys->element[i]->str);
        if (!meter_reply_ok(key)) {
            free(logged);
            freeReplyObject(keys);
            freeReplyObject(cust);
            return meter_gov_failed(r, key, "key", err, errlen);
        }

        /* a key that moved to another customer is projected by that one */
        owner = meter_reply_hget(key, "customer");
        if (owner != NULL && strcmp(owner, customer) != 0) {
            freeReplyObject(key);
            continue;
        }

        revoked = meter_reply_hget(key, "revoked");

        snprintf(line, sizeof(line), MTR_GOV_FMT, customer,
                 delinquent ? MTR_GOV_DELINQUENT : MTR_GOV_ACTIVE,
                 (delinquent && reason != NULL) ? reason : "",
                 (delinquent && since != NULL) ? since : "0",
                 revoked != NULL ? revoked : "0");

        freeReplyObject(key);

        rp = meter_redis_cmd(r, "HSET " MTR_GOV " %s %s", keys->element[i]->str,
                             line);
        if (!meter_reply_ok(rp)) {
            free(logged);
            freeReplyObject(keys);
            freeReplyObject(cust);
            return meter_gov_failed(r, rp, MTR_GOV, err, errlen);
        }

        freeReplyObject(rp);

        /* a field of another length is not a KH: the module reads all */
        if (keys->element[i]->len == 64) {
            *p++ = ' ';
            memcpy(p, keys->element[i]->str, 64);
            p += 64;
            *p = '\0';
            nlogged++;

        } else {
            nlogged = MTR_GOV_LOG_MAXKEYS + 1;
        }
    }

    freeReplyObject(keys);
    freeReplyObject(cust);

    if (meter_gov_bump_log(r, logged, nlogged, err, errlen) != 0) {
        free(logged);
        return -1;
    }

    free(logged);

    if (!known) {
        return 0;
    }

    /* done: meter_gov_set_status() need not project this change again */
    rp = meter_redis_cmd(r, "HSET " MTR_CUST_FMT " projected 1", customer);
    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, "projected", err, errlen);
    }

    freeReplyObject(rp);

    return 0;
}


int
meter_gov_set_status(meter_redis_t *r, const char *customer,
    int delinquent, const char *reason, const char *source,
    time_t event_time, char *err, size_t errlen)
{
    char         t[24];
    long long    rc;
    redisReply  *rp;

    if (!meter_gov_valid_id(customer)) {
        snprintf(err, errlen, "invalid customer id \"%s\"",
                 customer != NULL ? customer : "");
        return -1;
    }

    if (source == NULL
        || (strcmp(source, "manual") != 0 && strcmp(source, "sync") != 0))
    {
        snprintf(err, errlen, "invalid source \"%s\" (manual or sync)",
                 source != NULL ? source : "");
        return -1;
    }

    if (delinquent) {
        if (reason == NULL
            || (strcmp(reason, "invoice_overdue") != 0
                && strcmp(reason, "credit_exhausted") != 0))
        {
            snprintf(err, errlen, "invalid reason \"%s\" (invoice_overdue "
                     "or credit_exhausted)", reason != NULL ? reason : "");
            return -1;
        }

    } else {
        reason = "";
    }

    snprintf(t, sizeof(t), "%lld",
             (long long) (event_time > 0 ? event_time : time(NULL)));

    rp = meter_redis_cmd(r, "EVAL %s 1 " MTR_CUST_FMT " %s %s %s %s",
                         meter_lua_gov_status, customer,
                         delinquent ? "1" : "0", reason, source, t);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        return meter_gov_failed(r, rp, "status", err, errlen);
    }

    rc = rp->integer;
    freeReplyObject(rp);

    if (rc == -1) {
        snprintf(err, errlen, "unknown customer \"%s\"", customer);
        return -1;
    }

    if (rc == 0) {
        return 0;
    }

    if (meter_gov_project(r, customer, err, errlen) != 0) {
        return -1;
    }

    return rc == 1 ? 1 : 0;
}


int
meter_gov_find_customer(meter_redis_t *r, const char *provider_customer,
    const char *subscription, char *customer, size_t size, char *err,
    size_t errlen)
{
    int          i;
    redisReply  *rp;
    const char  *id, *hash;

    for (i = 0; i < 2; i++) {
        id = (i == 0) ? provider_customer : subscription;
        hash = (i == 0) ? MTR_BYPC : MTR_BYSUB;

        if (id == NULL || id[0] == '\0') {
            continue;
        }

        rp = meter_redis_cmd(r, "HGET %s %s", hash, id);
        if (!meter_reply_ok(rp)) {
            return meter_gov_failed(r, rp, hash, err, errlen);
        }

        if (rp->type == REDIS_REPLY_STRING && rp->len > 0
            && rp->len < size)
        {
            memcpy(customer, rp->str, rp->len + 1);
            freeReplyObject(rp);
            return 1;
        }

        freeReplyObject(rp);
    }

    return 0;
}


/* Σ over the customer's keys of mtr:used:{KH}[meter] */
int
meter_gov_used(meter_redis_t *r, const char *customer, const char *meter,
    int64_t *used, char *err, size_t errlen)
{
    char         key[96];
    size_t       i;
    int64_t      sum;
    uint64_t     v;
    redisReply  *keys, *rp;

    keys = meter_redis_cmd(r, "SMEMBERS " MTR_CKEYS_FMT, customer);
    if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
        return meter_gov_failed(r, keys, "customer keys", err, errlen);
    }

    sum = 0;

    for (i = 0; i < keys->elements; i++) {
        rp = meter_redis_cmd(r, "HGET " MTR_USED_FMT " %s",
                             keys->element[i]->str, meter);
        if (!meter_reply_ok(rp)) {
            snprintf(key, sizeof(key), MTR_USED_FMT, keys->element[i]->str);
            freeReplyObject(keys);
            return meter_gov_failed(r, rp, key, err, errlen);
        }

        if (rp->type == REDIS_REPLY_STRING) {
            errno = 0;
            v = strtoull(rp->str, NULL, 10);
            if (errno != 0 || v > INT64_MAX
                || __builtin_add_overflow(sum, (int64_t) v, &sum))
            {
                snprintf(err, errlen, "usage of customer \"%s\" meter \"%s\" "
                         "overflows", customer, meter);
                freeReplyObject(rp);
                freeReplyObject(keys);
                return -1;
            }
        }

        freeReplyObject(rp);
    }

    freeReplyObject(keys);
    *used = sum;

    return 0;
}


static int
meter_gov_credit_check(const char *customer, const char *meter, char *err,
    size_t errlen)
{
    if (!meter_gov_valid_id(customer)) {
        snprintf(err, errlen, "invalid customer id \"%s\"",
                 customer != NULL ? customer : "");
        return -1;
    }

    if (!meter_gov_valid_meter(meter)) {
        snprintf(err, errlen, "invalid meter \"%s\" ([A-Za-z0-9_.-]{1,32})",
                 meter != NULL ? meter : "");
        return -1;
    }

    return 0;
}


/* a grant moved: a version that rewrote no field of mtr:gov */
static int
meter_gov_bump(meter_redis_t *r, char *err, size_t errlen)
{
    return meter_gov_bump_log(r, NULL, 0, err, errlen);
}


int
meter_gov_credit_set(meter_redis_t *r, const char *customer,
    const char *meter, int64_t amount, char *err, size_t errlen)
{
    int64_t      used, granted;
    redisReply  *rp;

    if (meter_gov_credit_check(customer, meter, err, errlen) != 0) {
        return -1;
    }

    if (amount < 0) {
        snprintf(err, errlen, "credit must not be negative");
        return -1;
    }

    if (meter_gov_used(r, customer, meter, &used, err, errlen) != 0) {
        return -1;
    }

    if (__builtin_add_overflow(used, amount, &granted)) {
        snprintf(err, errlen, "credit too large");
        return -1;
    }

    rp = meter_redis_cmd(r, "HSET " MTR_GOV_CREDIT " " MTR_GOV_CREDIT_FMT
                         " %lld", customer, meter, (long long) granted);
    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, MTR_GOV_CREDIT, err, errlen);
    }

    freeReplyObject(rp);

    return meter_gov_bump(r, err, errlen);
}


/* a first "add" without any credit yet grants amount on top of the usage
 * so far, like "set": the customer gets what was paid for */
int
meter_gov_credit_add(meter_redis_t *r, const char *customer,
    const char *meter, int64_t amount, char *err, size_t errlen)
{
    redisReply  *rp;
    int          exists;

    if (meter_gov_credit_check(customer, meter, err, errlen) != 0) {
        return -1;
    }

    rp = meter_redis_cmd(r, "HEXISTS " MTR_GOV_CREDIT " " MTR_GOV_CREDIT_FMT,
                         customer, meter);
    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, MTR_GOV_CREDIT, err, errlen);
    }

    exists = (meter_reply_int(rp, 0) == 1);
    freeReplyObject(rp);

    if (!exists) {
        return meter_gov_credit_set(r, customer, meter, amount, err, errlen);
    }

    rp = meter_redis_cmd(r, "HINCRBY " MTR_GOV_CREDIT " " MTR_GOV_CREDIT_FMT
                         " %lld", customer, meter, (long long) amount);
    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, MTR_GOV_CREDIT, err, errlen);
    }

    freeReplyObject(rp);

    return meter_gov_bump(r, err, errlen);
}


/* *granted = -1 (and *left = 0) when the customer has no credit for the
 * meter: its usage is not limited */
int
meter_gov_credit_left(meter_redis_t *r, const char *customer,
    const char *meter, int64_t *granted, int64_t *left, char *err,
    size_t errlen)
{
    char        *end;
    int64_t      used;
    long long    g;
    redisReply  *rp;

    if (meter_gov_credit_check(customer, meter, err, errlen) != 0) {
        return -1;
    }

    rp = meter_redis_cmd(r, "HGET " MTR_GOV_CREDIT " " MTR_GOV_CREDIT_FMT,
                         customer, meter);
    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, MTR_GOV_CREDIT, err, errlen);
    }

    if (rp->type != REDIS_REPLY_STRING) {
        freeReplyObject(rp);
        *granted = -1;
        *left = 0;
        return 0;
    }

    errno = 0;
    g = strtoll(rp->str, &end, 10);
    if (errno != 0 || *end != '\0' || end == rp->str) {
        snprintf(err, errlen, MTR_GOV_CREDIT " " MTR_GOV_CREDIT_FMT
                 ": not an integer: \"%s\"", customer, meter, rp->str);
        freeReplyObject(rp);
        return -1;
    }

    freeReplyObject(rp);

    if (meter_gov_used(r, customer, meter, &used, err, errlen) != 0) {
        return -1;
    }

    *granted = g;

    if (__builtin_sub_overflow((int64_t) g, used, left)) {
        *left = INT64_MIN;
    }

    return 0;
}


/* quotas of plans */

int
meter_quota_parse(const char *s, int64_t *limit, int *unit)
{
    char               *end;
    long long           n;
    const char         *u;

    if (s == NULL || *s < '0' || *s > '9') {
        return -1;
    }

    errno = 0;
    n = strtoll(s, &end, 10);

    /* room for allowance = limit + usage before the period */
    if (errno != 0 || n <= 0 || n > INT64_MAX / 2 || *end != '/') {
        return -1;
    }

    u = end + 1;

    if (strcmp(u, "day") == 0) {
        *unit = METER_QUOTA_DAY;

    } else if (strcmp(u, "week") == 0) {
        *unit = METER_QUOTA_WEEK;

    } else if (strcmp(u, "month") == 0) {
        *unit = METER_QUOTA_MONTH;

    } else {
        return -1;
    }

    *limit = n;

    return 0;
}


/* the start of month m (0-based, may be out of range) of year y at day d
 * (clamped to the month's last day, as Stripe clamps its anchors) */
static time_t
meter_quota_month(int y, int m, const struct tm *at)
{
    int        last;
    time_t     t;
    struct tm  tm;

    y += (m < 0) ? -1 : m / 12;
    m = (m % 12 + 12) % 12;

    memset(&tm, 0, sizeof(tm));
    tm.tm_year = y;
    tm.tm_mon = m + 1;
    tm.tm_mday = 0;                         /* the last day of m */
    t = timegm(&tm);
    gmtime_r(&t, &tm);
    last = tm.tm_mday;

    memset(&tm, 0, sizeof(tm));
    tm.tm_year = y;
    tm.tm_mon = m;
    tm.tm_mday = (at->tm_mday < last) ? at->tm_mday : last;
    tm.tm_hour = at->tm_hour;
    tm.tm_min = at->tm_min;
    tm.tm_sec = at->tm_sec;

    return timegm(&tm);
}


void
meter_quota_period(int unit, time_t anchor, time_t now, time_t *start,
    time_t *end)
{
    time_t     len, base, d, k;
    struct tm  at, tn;

    if (unit != METER_QUOTA_MONTH) {
        len = (unit == METER_QUOTA_DAY) ? 86400 : 7 * 86400;

        /* 1970-01-05 was a Monday (ISO weeks) */
        base = anchor ? anchor : (unit == METER_QUOTA_DAY ? 0 : 4 * 86400);

        d = now - base;
        k = d / len - (d % len < 0);

        *start = base + k * len;
        *end = *start + len;
        return;
    }

    if (anchor == 0) {
        memset(&at, 0, sizeof(at));
        at.tm_mday = 1;

    } else {
        gmtime_r(&anchor, &at);
    }

    gmtime_r(&now, &tn);

    *start = meter_quota_month(tn.tm_year, tn.tm_mon, &at);
    k = 0;

    if (*start > now) {
        k = -1;
        *start = meter_quota_month(tn.tm_year, tn.tm_mon - 1, &at);
    }

    *end = meter_quota_month(tn.tm_year, tn.tm_mon + k + 1, &at);
}


int
meter_quota_plan_known(const meter_conf_t *cf, const char *plan)
{
    size_t  i, n;

    n = strlen(plan);

    for (i = 0; cf != NULL && i < cf->nkv; i++) {
        if (strncmp(cf->kv[i].key, "plan.", 5) == 0
            && strncmp(cf->kv[i].key + 5, plan, n) == 0
            && cf->kv[i].key[5 + n] == '.')
        {
            return 1;
        }
    }

    return 0;
}


/* Σ over keys of their usage before start (meter_lua_quota_base) */
static int
meter_gov_quota_base(meter_redis_t *r, redisReply *keys, const char *meter,
    time_t start, time_t end, time_t now, int64_t *sum, char *err,
    size_t errlen)
{
    char         **argv, *buf, field[64], ttl[32], nk[24];
    size_t         i, h, nh, n, *len;
    time_t         first, t;
    redisReply    *rp;
    long long      v;

    /* an hour belongs to the period its start falls in */
    first = (start + 3599) / 3600 * 3600;
    nh = (now >= first) ? (size_t) ((now - first) / 3600 + 1) : 0;

    argv = calloc(nh + 8, sizeof(char *));
    len = calloc(nh + 8, sizeof(size_t));
    buf = malloc((nh + 2) * 128);

    if (argv == NULL || len == NULL || buf == NULL) {
        free(argv);
        free(len);
        free(buf);
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    snprintf(field, sizeof(field), MTR_QBASE_FIELD_FMT, meter,
             (long long) start);
    snprintf(ttl, sizeof(ttl), "%lld", (long long) (2 * (end - start)
                                                    + 86400));
    snprintf(nk, sizeof(nk), "%zu", nh + 2);

    *sum = 0;

    for (i = 0; i < keys->elements; i++) {
        n = 0;
        argv[n++] = "EVAL";
        argv[n++] = (char *) meter_lua_quota_base;
        argv[n++] = nk;

        argv[n] = buf;
        snprintf(argv[n++], 128, MTR_QBASE_FMT, keys->element[i]->str);
        argv[n] = buf + 128;
        snprintf(argv[n++], 128, MTR_USED_FMT, keys->element[i]->str);

        for (h = 0; h < nh; h++) {
            char  hour[16];

            t = first + (time_t) h * 3600;
            meter_hour_format(t, hour, sizeof(hour));
            argv[n] = buf + 128 * (h + 2);
            snprintf(argv[n++], 128, MTR_U_FMT, keys->element[i]->str, hour);
        }

        argv[n++] = field;
        argv[n++] = (char *) meter;
        argv[n++] = ttl;

        for (h = 0; h < n; h++) {
            len[h] = strlen(argv[h]);
        }

        rp = meter_redis_argv(r, (int) n, (const char **) argv, len);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_STRING) {
            free(argv);
            free(len);
            free(buf);
            return meter_gov_failed(r, rp, MTR_QBASE_PRE "...}", err, errlen);
        }

        v = strtoll(rp->str, NULL, 10);
        freeReplyObject(rp);

        if (v < 0 || __builtin_add_overflow(*sum, (int64_t) v, sum)) {
            *sum = INT64_MAX / 2;
        }
    }

    free(argv);
    free(len);
    free(buf);

    return 0;
}


/* every field of mtr:gov:quota (the customer's are picked by the caller) */
static redisReply *
meter_gov_quota_fields(meter_redis_t *r, char *err, size_t errlen)
{
    redisReply  *rp;

    rp = meter_redis_cmd(r, "HKEYS " MTR_GOV_QUOTA);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        (void) meter_gov_failed(r, rp, MTR_GOV_QUOTA, err, errlen);
        return NULL;
    }

    return rp;
}


/* fields: every field of mtr:gov:quota, read once per pass */
static int
meter_gov_quota_one(meter_redis_t *r, const meter_conf_t *cf,
    const char *customer, time_t now, time_t *next, redisReply *fields,
    char *err, size_t errlen)
{
    char         prefix[128], value[128];
    size_t       i, j, n, pl, cl;
    int          unit, rc;
    time_t       anchor, start, end;
    int64_t      limit, base, allowance;
    redisReply  *cust, *keys, *rp;
    const char  *plan, *meter, *kept[64];
    size_t       nkept;

    if (!meter_gov_valid_id(customer)) {
        snprintf(err, errlen, "invalid customer id \"%s\"", customer);
        return -1;
    }

    cust = meter_redis_cmd(r, "HMGET " MTR_CUST_FMT " " MTR_CUST_PLAN " "
                           MTR_CUST_ANCHOR, customer);
    if (!meter_reply_ok(cust) || cust->type != REDIS_REPLY_ARRAY
        || cust->elements != 2)
    {
        return meter_gov_failed(r, cust, "customer", err, errlen);
    }

    plan = (cust->element[0]->type == REDIS_REPLY_STRING)
           ? cust->element[0]->str : NULL;
    anchor = (cust->element[1]->type == REDIS_REPLY_STRING)
             ? (time_t) strtoll(cust->element[1]->str, NULL, 10) : 0;

    if (plan != NULL && (strlen(plan) > MTR_PLAN_MAX
                         || !meter_gov_valid_id(plan)))
    {
        plan = NULL;
    }

    keys = meter_redis_cmd(r, "SMEMBERS " MTR_CKEYS_FMT, customer);
    if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(cust);
        return meter_gov_failed(r, keys, "customer keys", err, errlen);
    }

    rc = -1;
    nkept = 0;

    if (plan != NULL) {
        rp = meter_redis_cmd(r, "HSET " MTR_GOV_QUOTA " %s %s", customer,
                             plan);
        if (!meter_reply_ok(rp)) {
            (void) meter_gov_failed(r, rp, MTR_GOV_QUOTA, err, errlen);
            goto done;
        }

        freeReplyObject(rp);

        pl = (size_t) snprintf(prefix, sizeof(prefix), "plan.%s.quota.",
                               plan);

        for (i = 0; cf != NULL && i < cf->nkv; i++) {
            if (strncmp(cf->kv[i].key, prefix, pl) != 0) {
                continue;
            }

            meter = cf->kv[i].key + pl;

            if (!meter_gov_valid_meter(meter)
                || meter_quota_parse(cf->kv[i].value, &limit, &unit) != 0)
            {
                snprintf(err, errlen, "%s:%u: \"%s\": expected "
                         "LIMIT/day|week|month for a meter "
                         "[A-Za-z0-9_.-]{1,32}", cf->path, cf->kv[i].line,
                         cf->kv[i].key);
                goto done;
            }

            meter_quota_period(unit, anchor, now, &start, &end);

            if (meter_gov_quota_base(r, keys, meter, start, end, now, &base,
                                     err, errlen)
                != 0)
            {
                goto done;
            }

            allowance = limit + base;

            snprintf(value, sizeof(value), MTR_GOV_QUOTA_FMT,
                     (long long) limit, (long long) (end - start),
                     (long long) end, (long long) allowance);

            rp = meter_redis_cmd(r, "HSET " MTR_GOV_QUOTA " "
                                 MTR_GOV_CREDIT_FMT " %s", customer, meter,
                                 value);
            if (!meter_reply_ok(rp)) {
                (void) meter_gov_failed(r, rp, MTR_GOV_QUOTA, err, errlen);
                goto done;
            }

            freeReplyObject(rp);

            if (nkept < sizeof(kept) / sizeof(kept[0])) {
                kept[nkept++] = meter;
            }

            if (next != NULL && (*next == 0 || end < *next)) {
                *next = end;
            }
        }
    }

    /* what the plan no longer has (another plan, a meter taken out) */
    cl = strlen(customer);

    for (i = 0; i < fields->elements; i++) {
        const char  *f = fields->element[i]->str;

        if (strncmp(f, customer, cl) != 0
            || (f[cl] != '\0' && f[cl] != MTR_GOV_CREDIT_SEP))
        {
            continue;
        }

        if (f[cl] == '\0') {
            n = (plan == NULL);

        } else {
            n = 1;

            for (j = 0; j < nkept; j++) {
                if (strcmp(kept[j], f + cl + 1) == 0) {
                    n = 0;
                }
            }
        }

        if (!n) {
            continue;
        }

        rp = meter_redis_cmd(r, "HDEL " MTR_GOV_QUOTA " %s", f);
        if (!meter_reply_ok(rp)) {
            (void) meter_gov_failed(r, rp, MTR_GOV_QUOTA, err, errlen);
            goto done;
        }

        freeReplyObject(rp);
    }

    rc = 0;

done:

    freeReplyObject(keys);
    freeReplyObject(cust);

    return rc;
}


int
meter_gov_quota_publish(meter_redis_t *r, const meter_conf_t *cf,
    const char *customer, time_t now, time_t *next, char *err,
    size_t errlen)
{
    int          rc;
    redisReply  *fields;

    fields = meter_gov_quota_fields(r, err, errlen);
    if (fields == NULL) {
        return -1;
    }

    rc = meter_gov_quota_one(r, cf, customer, now, next, fields, err,
                             errlen);
    freeReplyObject(fields);

    return rc;
}


int
meter_gov_quota_all(meter_redis_t *r, const meter_conf_t *cf, time_t now,
    time_t *next, char *err, size_t errlen)
{
    size_t       i;
    redisReply  *rp, *fields;

    rp = meter_redis_cmd(r, "SMEMBERS " MTR_CUSTOMERS);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        return meter_gov_failed(r, rp, MTR_CUSTOMERS, err, errlen);
    }

    fields = meter_gov_quota_fields(r, err, errlen);
    if (fields == NULL) {
        freeReplyObject(rp);
        return -1;
    }

    for (i = 0; i < rp->elements; i++) {
        if (rp->element[i]->type == REDIS_REPLY_STRING
            && meter_gov_valid_id(rp->element[i]->str)
            && meter_gov_quota_one(r, cf, rp->element[i]->str, now, next,
                                   fields, err, errlen)
               != 0)
        {
            freeReplyObject(fields);
            freeReplyObject(rp);
            return -1;
        }
    }

    freeReplyObject(fields);
    freeReplyObject(rp);

    return 0;
}


int
meter_gov_plan_set(meter_redis_t *r, const meter_conf_t *cf,
    const char *customer, const char *plan, time_t anchor, char *err,
    size_t errlen)
{
    char         a[32];
    redisReply  *rp;

    if (!meter_gov_valid_id(customer)) {
        snprintf(err, errlen, "invalid customer id \"%s\"",
                 customer != NULL ? customer : "");
        return -1;
    }

    if (plan != NULL
        && (strlen(plan) > MTR_PLAN_MAX || !meter_gov_valid_id(plan)))
    {
        snprintf(err, errlen, "invalid plan \"%s\" ([A-Za-z0-9_.-]{1,32})",
                 plan);
        return -1;
    }

    if (plan != NULL) {
        rp = meter_redis_cmd(r, "HSET " MTR_CUST_FMT " " MTR_CUST_PLAN " %s",
                             customer, plan);

    } else {
        rp = meter_redis_cmd(r, "HDEL " MTR_CUST_FMT " " MTR_CUST_PLAN,
                             customer);
    }

    if (!meter_reply_ok(rp)) {
        return meter_gov_failed(r, rp, "customer", err, errlen);
    }

    freeReplyObject(rp);

    if (anchor > 0) {
        snprintf(a, sizeof(a), "%lld", (long long) anchor);
        rp = meter_redis_cmd(r, "HSET " MTR_CUST_FMT " " MTR_CUST_ANCHOR
                             " %s", customer, a);

    } else if (anchor == 0) {
        rp = meter_redis_cmd(r, "HDEL " MTR_CUST_FMT " " MTR_CUST_ANCHOR,
                             customer);

    } else {
        rp = NULL;
    }

    if (anchor >= 0) {
        if (!meter_reply_ok(rp)) {
            return meter_gov_failed(r, rp, "customer", err, errlen);
        }

        freeReplyObject(rp);
    }

    return meter_gov_quota_publish(r, cf, customer, time(NULL), NULL, err,
                                   errlen);
}
