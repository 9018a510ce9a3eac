
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
static int
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
