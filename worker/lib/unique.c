
/*
 * Copyright (C) nginx-meter authors
 *
 * Unique-user counts (unique.h).  A key's set is exact while under
 * MTR_UNIQUE_EXACT members (the module stops adding at the limit); its
 * HyperLogLog always has every member: Redis's standard error is 0.81 %
 * (redis/src/hyperloglog.c, "The standard error is 1.04/sqrt(m)" with
 * m = 16384 registers).
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unique.h"
#include "util.h"


#define METER_UQ_SCAN           1000    /* index members per SSCAN */
#define METER_UQ_TMP_TTL        60000   /* ms: copies of a crashed reader */


/* this process's two HyperLogLog copies: the worker's own use small N */
static unsigned
meter_unique_tmp(void)
{
    return 1000000u + 2u * (unsigned) getpid();
}


/* the exact union of the sets (each under the limit) */
static int
meter_unique_union(meter_redis_t *r, const char *const *khs, size_t n,
    const char *meter, const char *uperiod, uint64_t *count, char *err,
    size_t errlen)
{
    int           rc, created;
    size_t        i, k;
    redisReply   *rp;
    meter_map_t   seen;

    if (meter_map_init(&seen, 64) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    for (i = 0; i < n; i++) {
        if (meter_redis_append(r, "SMEMBERS " MTR_UQ_FMT, khs[i], meter,
                               uperiod)
            != 0)
        {
            meter_map_free(&seen, NULL);
            snprintf(err, errlen, "%s", r->err);
            return -1;
        }
    }

    rc = 0;

    for (i = 0; i < n; i++) {
        rp = meter_redis_reply(r);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
            if (rc == 0) {
                rc = meter_reply_failed(r, rp, err, errlen);
                rp = NULL;
            }

            freeReplyObject(rp);

            if (r->ctx == NULL) {
                break;
            }

            continue;
        }

        for (k = 0; k < rp->elements && rc == 0; k++) {
            if (rp->element[k]->type == REDIS_REPLY_STRING
                && meter_map_put(&seen, rp->element[k]->str, &created)
                   == NULL)
            {
                snprintf(err, errlen, "out of memory");
                rc = -1;
            }
        }

        freeReplyObject(rp);
    }

    *count = seen.n;
    meter_map_free(&seen, NULL);

    return rc;
}


/* PFCOUNT of the union of the keys' HyperLogLogs, copied into the
 * worker's slot (a cluster runs no command across slots) */
static int
meter_unique_hll(meter_redis_t *r, const char *const *khs, size_t n,
    const char *meter, const char *uperiod, uint64_t *count, char *err,
    size_t errlen)
{
    char          key[2][64], src[160], ttl[16];
    size_t        i, len[5];
    unsigned      tmp;
    const char   *argv[5];
    redisReply   *rp, *st;
    int           rc, have;

    if (n == 1) {
        rp = meter_redis_cmd(r, "PFCOUNT " MTR_UH_FMT, khs[0], meter,
                             uperiod);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
            return meter_reply_failed(r, rp, err, errlen);
        }

        *count = (uint64_t) rp->integer;
        freeReplyObject(rp);

        return 0;
    }

    tmp = meter_unique_tmp();
    snprintf(ttl, sizeof(ttl), "%d", METER_UQ_TMP_TTL);
    snprintf(key[0], sizeof(key[0]), MTR_W_UHTMP_FMT, tmp);
    snprintf(key[1], sizeof(key[1]), MTR_W_UHTMP_FMT, tmp + 1);

    rp = meter_redis_cmd(r, "DEL %s %s", key[0], key[1]);
    if (!meter_reply_ok(rp)) {
        return meter_reply_failed(r, rp, err, errlen);
    }

    freeReplyObject(rp);

    rc = 0;
    have = 0;

    /* each key's HyperLogLog is a string: GET, SET into the copy, merge */
    for (i = 0; i < n && rc == 0; i++) {
        snprintf(src, sizeof(src), MTR_UH_FMT, khs[i], meter, uperiod);

        rp = meter_redis_cmd(r, "GET %s", src);
        if (!meter_reply_ok(rp)) {
            rc = meter_reply_failed(r, rp, err, errlen);
            break;
        }

        if (rp->type != REDIS_REPLY_STRING) {
            freeReplyObject(rp);
            continue;
        }

        argv[0] = "SET";
        argv[1] = key[1];
        argv[2] = rp->str;
        argv[3] = "PX";
        argv[4] = ttl;
        len[0] = 3;
        len[1] = strlen(key[1]);
        len[2] = rp->len;
        len[3] = 2;
        len[4] = strlen(ttl);

        st = meter_redis_argv(r, 5, argv, len);
        freeReplyObject(rp);

        if (!meter_reply_ok(st)) {
            rc = meter_reply_failed(r, st, err, errlen);
            break;
        }

        freeReplyObject(st);

        st = meter_redis_cmd(r, "PFMERGE %s %s %s", key[0], key[0], key[1]);
        if (!meter_reply_ok(st)) {
            rc = meter_reply_failed(r, st, err, errlen);
            break;
        }

        freeReplyObject(st);
        have = 1;
    }

    if (rc == 0) {
        *count = 0;

        if (have) {
            rp = meter_redis_cmd(r, "PFCOUNT %s", key[0]);
            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
                rc = meter_reply_failed(r, rp, err, errlen);

            } else {
                *count = (uint64_t) rp->integer;
                freeReplyObject(rp);
            }
        }
    }

    rp = meter_redis_cmd(r, "DEL %s %s", key[0], key[1]);
    freeReplyObject(rp);

    return rc;
}


int
meter_unique_count(meter_redis_t *r, const char *const *khs, size_t n,
    const char *meter, const char *uperiod, uint64_t *count, char *err,
    size_t errlen)
{
    int          rc, full;
    size_t       i;
    uint64_t     one;
    redisReply  *rp;

    *count = 0;

    if (n == 0) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if (meter_redis_append(r, "SCARD " MTR_UQ_FMT, khs[i], meter, uperiod)
            != 0)
        {
            snprintf(err, errlen, "%s", r->err);
            return -1;
        }
    }

    rc = 0;
    full = 0;
    one = 0;

    for (i = 0; i < n; i++) {
        rp = meter_redis_reply(r);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
            if (rc == 0) {
                rc = meter_reply_failed(r, rp, err, errlen);
                rp = NULL;
            }

            freeReplyObject(rp);

            if (r->ctx == NULL) {
                return -1;
            }

            continue;
        }

        if (rp->integer >= MTR_UNIQUE_EXACT) {
            full = 1;
        }

        one = (uint64_t) rp->integer;
        freeReplyObject(rp);
    }

    if (rc != 0) {
        return -1;
    }

    if (!full) {
        if (n == 1) {
            *count = one;
            return 0;
        }

        return meter_unique_union(r, khs, n, meter, uperiod, count, err,
                                  errlen);
    }

    if (meter_unique_hll(r, khs, n, meter, uperiod, count, err, errlen)
        != 0)
    {
        return -1;
    }

    if (*count < MTR_UNIQUE_EXACT) {
        *count = MTR_UNIQUE_EXACT;
    }

    return 0;
}


int
meter_uperiod_range(const char *uperiod, time_t *start, time_t *end)
{
    int        y, mo, d, h;
    size_t     len;
    struct tm  tm;

    len = strlen(uperiod);

    if ((len != 6 && len != 8 && len != 10)
        || strspn(uperiod, "0123456789") != len)
    {
        return -1;
    }

    d = 1;
    h = 0;

    if (sscanf(uperiod, "%4d%2d", &y, &mo) != 2
        || (len >= 8 && sscanf(uperiod + 6, "%2d", &d) != 1)
        || (len == 10 && sscanf(uperiod + 8, "%2d", &h) != 1)
        || y < 1970 || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23)
    {
        return -1;
    }

    memset(&tm, 0, sizeof(tm));
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    *start = timegm(&tm);

    /* a day past the month's end (20261131) normalizes away: refused */
    gmtime_r(start, &tm);
    if (tm.tm_mday != d) {
        return -1;
    }

    if (len == 6) {
        *end = meter_month_shift(*start, 1);

    } else {
        *end = *start + (len == 8 ? METER_DAY : METER_HOUR);
    }

    return 0;
}


int
meter_unique_month(meter_redis_t *r, const char *yyyymm,
    meter_unique_cb_t cb, void *arg, char *err, size_t errlen)
{
    char          cursor[32], kh[65], meter[MTR_METER_MAX + 1];
    char          uperiod[METER_UPERIOD_MAX + 1];
    size_t        i, len, mlen, plen;
    redisReply   *rp, *m;
    const char   *s, *b1, *b2;

    strcpy(cursor, "0");

    do {
        rp = meter_redis_cmd(r, "SSCAN " MTR_UQIDX_FMT " %s COUNT %d", yyyymm,
                             cursor, METER_UQ_SCAN);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != 2
            || rp->element[0]->type != REDIS_REPLY_STRING
            || rp->element[1]->type != REDIS_REPLY_ARRAY)
        {
            if (meter_reply_ok(rp)) {
                snprintf(err, errlen, "unexpected SSCAN reply");
                freeReplyObject(rp);
                return -1;
            }

            return meter_reply_failed(r, rp, err, errlen);
        }

        snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);

        for (i = 0; i < rp->element[1]->elements; i++) {
            m = rp->element[1]->element[i];
            if (m->type != REDIS_REPLY_STRING) {
                continue;
            }

            /* KH|NAME|UPERIOD */
            s = m->str;
            len = m->len;
            b1 = (len > 65) ? s + 64 : NULL;
            b2 = (b1 != NULL && *b1 == MTR_FIELD_SEP)
                 ? memchr(b1 + 1, MTR_FIELD_SEP, len - 65) : NULL;

            if (b2 == NULL || strspn(s, "0123456789abcdef") != 64) {
                continue;
            }

            mlen = (size_t) (b2 - b1 - 1);
            plen = len - (size_t) (b2 + 1 - s);

            if (mlen == 0 || mlen > MTR_METER_MAX
                || strspn(b1 + 1, MTR_NAME_CHARS) < mlen
                || plen == 0 || plen > METER_UPERIOD_MAX
                || strncmp(b2 + 1, yyyymm, 6) != 0)
            {
                continue;
            }

            memcpy(kh, s, 64);
            kh[64] = '\0';
            memcpy(meter, b1 + 1, mlen);
            meter[mlen] = '\0';
            memcpy(uperiod, b2 + 1, plen);
            uperiod[plen] = '\0';

            if (cb(kh, meter, uperiod, arg) != 0) {
                freeReplyObject(rp);
                return -1;
            }
        }

        freeReplyObject(rp);

    } while (strcmp(cursor, "0") != 0);

    return 0;
}
