
/*
 * Copyright (C) nginx-meter authors
 *
 * Removal of unique-user data (docs/redis-schema.md "Unique users",
 * "Passes, lock, retention"): the module writes no EXPIRE on mtr:uq:/mtr:uh:
 * (a month's count must outlive its hours), so the worker deletes a
 * month's sets, HyperLogLogs and index once retention has passed since the
 * month's end and grace.  Unbilled data is never deleted: a month the
 * figure biller (daemon/figures.c) has state for (a field YYYYMM... of
 * mtr:{worker}:figmon) goes only once that state says it closed
 * (YYYYMM|closed) with nothing left to bill (no YYYYMM|dirty 1); a month
 * it never saw has no biller to wait for, and goes on the time rule
 * alone.  The biller removes the months it billed itself; this covers
 * the rest (a worker without it, months older than it looks back).
 * The index goes last, so a crash midway leaves it to list what is left.
 */


#include <stdio.h>
#include <string.h>

#include "log.h"
#include "unique.h"
#include "unique_retention.h"
#include "util.h"


#define METER_UQ_DEL_BATCH      500


/* 1 when the month may go: the biller does not know it, or closed it
 * with nothing left to bill (no "|dirty" 1) */
static int
meter_unique_billed(meter_redis_t *r, const char *m)
{
    int          ok;
    redisReply  *rp;

    rp = meter_redis_cmd(r, "HMGET " MTR_W_FIGMON " %s %s|closed %s|dirty",
                         m, m, m);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
        || rp->elements != 3)
    {
        freeReplyObject(rp);
        return 0;
    }

    ok = (rp->element[0]->type != REDIS_REPLY_STRING
          && rp->element[1]->type != REDIS_REPLY_STRING
          && rp->element[2]->type != REDIS_REPLY_STRING)
         || (rp->element[1]->type == REDIS_REPLY_STRING
             && (rp->element[2]->type != REDIS_REPLY_STRING
                 || strcmp(rp->element[2]->str, "1") != 0));

    freeReplyObject(rp);

    return ok;
}


int
meter_unique_remove(meter_redis_t *r, const char *m, unsigned long *nkeys)
{
    char          cursor[32], kh[65], name[MTR_METER_MAX + 1];
    size_t        i, k, n;
    redisReply   *rp, *d, *e;
    const char   *s, *b1, *b2;

    strcpy(cursor, "0");

    do {
        rp = meter_redis_cmd(r, "SSCAN " MTR_UQIDX_FMT " %s COUNT %d", m,
                             cursor, METER_UQ_DEL_BATCH);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != 2)
        {
            freeReplyObject(rp);
            return -1;
        }

        snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);
        n = 0;

        for (i = 0; i < rp->element[1]->elements; i++) {
            e = rp->element[1]->element[i];
            s = e->str;

            /* KH|NAME|UPERIOD: both keys carry {KH}, one slot */
            b1 = (e->len > 65 && s[64] == MTR_FIELD_SEP) ? s + 65 : NULL;
            b2 = (b1 != NULL) ? strchr(b1, MTR_FIELD_SEP) : NULL;
            if (b2 == NULL || e->len >= sizeof(kh) + MTR_METER_MAX + 16) {
                continue;
            }

            memcpy(kh, s, 64);
            kh[64] = '\0';
            snprintf(name, sizeof(name), "%.*s", (int) (b2 - b1), b1);

            if (meter_redis_append(r, "DEL " MTR_UQ_FMT " " MTR_UH_FMT, kh,
                                   name, b2 + 1, kh, name, b2 + 1)
                != 0)
            {
                freeReplyObject(rp);
                return -1;
            }

            n++;
        }

        for (k = 0; k < n; k++) {
            d = meter_redis_reply(r);
            if (d == NULL) {
                freeReplyObject(rp);
                return -1;
            }

            if (d->type == REDIS_REPLY_INTEGER) {
                *nkeys += (unsigned long) d->integer;
            }

            freeReplyObject(d);
        }

        freeReplyObject(rp);

    } while (strcmp(cursor, "0") != 0);

    rp = meter_redis_cmd(r, "DEL " MTR_UQIDX_FMT, m);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rp);
        return -1;
    }

    freeReplyObject(rp);

    return 0;
}


unsigned
meter_unique_retention(meter_redis_t *r, const meter_conf_t *cf, time_t now)
{
    int            i;
    char           m[METER_UQ_RETAIN_MONTHS][8];
    time_t         t, last;
    unsigned       removed;
    redisReply    *rp;
    unsigned long  nkeys;

    if (cf->retention == 0 || r->ctx == NULL) {
        return 0;
    }

    /* the latest month past retention: its end before this */
    last = now - cf->grace - cf->retention;
    t = meter_month_shift(last, -1);

    if (meter_month_shift(t, 1) > last) {
        return 0;
    }

    /* which of the months up to it still have an index: one round trip */
    for (i = 0; i < METER_UQ_RETAIN_MONTHS; i++) {
        meter_month_label(meter_month_shift(t, -i), m[i]);

        if (meter_redis_append(r, "EXISTS " MTR_UQIDX_FMT, m[i]) != 0) {
            return 0;
        }
    }

    removed = 0;

    for (i = 0; i < METER_UQ_RETAIN_MONTHS; i++) {
        rp = meter_redis_reply(r);
        if (rp == NULL) {
            return removed;
        }

        if (rp->type != REDIS_REPLY_INTEGER || rp->integer != 1) {
            m[i][0] = '\0';
        }

        freeReplyObject(rp);
    }

    for (i = 0; i < METER_UQ_RETAIN_MONTHS; i++) {
        if (m[i][0] == '\0') {
            continue;
        }

        if (!meter_unique_billed(r, m[i])) {
            meter_log(LOG_WARNING, "unique users of month %s are past "
                      "retention but not billed yet; kept", m[i]);
            continue;
        }

        nkeys = 0;

        if (meter_unique_remove(r, m[i], &nkeys) != 0) {
            meter_log(LOG_ERR, "unique users of month %s: removal stopped: "
                      "%s", m[i], r->err);
            break;
        }

        meter_log(LOG_INFO, "unique users of month %s removed after "
                  "retention (%lu keys)", m[i], nkeys);
        removed++;
    }

    return removed;
}
