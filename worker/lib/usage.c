
/*
 * Copyright (C) nginx-meter authors
 *
 * The usage and credit of one customer (usage.h), moved here from
 * meterctl's usage.c and credit.c.
 */


#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gov.h"
#include "hours.h"
#include "register.h"
#include "usage.h"
#include "wusage.h"


static int
meter_usage_cmp(const void *a, const void *b)
{
    const meter_usage_row_t  *x, *y;

    x = a;
    y = b;

    if (x->start != y->start) {
        return (x->start < y->start) ? -1 : 1;
    }

    return strcmp(x->meter, y->meter);
}


/* the row of (start, meter), appended when new; NULL: out of memory */
static meter_usage_row_t *
meter_usage_row(meter_usage_row_t **rows, size_t *n, size_t *cap,
    time_t start, const char *meter, size_t mlen)
{
    size_t              i;
    meter_usage_row_t  *nr, *row;

    for (i = *n; i > 0; i--) {
        row = &(*rows)[i - 1];

        if (row->start == start && strlen(row->meter) == mlen
            && memcmp(row->meter, meter, mlen) == 0)
        {
            return row;
        }
    }

    if (*n == *cap) {
        nr = realloc(*rows, (*cap ? *cap * 2 : 64) * sizeof(*nr));
        if (nr == NULL) {
            return NULL;
        }

        *cap = *cap ? *cap * 2 : 64;
        *rows = nr;
    }

    row = &(*rows)[(*n)++];
    memset(row, 0, sizeof(meter_usage_row_t));
    row->start = start;
    memcpy(row->meter, meter, mlen);
    row->meter[mlen] = '\0';

    return row;
}


const char *
meter_usage_state(const meter_usage_row_t *row)
{
    if (row->quantity == row->billed) {
        return "billed";
    }

    if (row->dead) {
        return "dead";
    }

    if (row->sending) {
        return "sending";
    }

    return row->billed == 0 ? "unbilled" : "partly billed";
}


/* one key-hour, from both layouts (wk: the writer layout's counters of
 * the key, or NULL): its quantities and billed parts into hrows */
static int
meter_usage_key_hour(meter_redis_t *r, const char *kh, const char *hour,
    meter_wkey_t *wk, time_t t, meter_usage_row_t **hrows, size_t *nhour,
    size_t *cap, char *err, size_t errlen)
{
    int                 rc, gauge;
    char               *ubuf;
    size_t              f, mlen, nu;
    uint64_t            u, b;
    redisReply         *ur, *br;
    const char         *fn, *bar, *bv, **uv;
    meter_usage_row_t  *row;

    ur = meter_redis_cmd(r, "HGETALL " MTR_U_FMT, kh, hour);
    br = meter_redis_cmd(r, "HGETALL " MTR_B_FMT, kh, hour);

    if (!meter_reply_ok(ur) || !meter_reply_ok(br)
        || ur->type != REDIS_REPLY_ARRAY || br->type != REDIS_REPLY_ARRAY)
    {
        freeReplyObject(br);
        return meter_reply_failed(r, ur, err, errlen);
    }

    if (meter_u_merge(ur, wk, &uv, &nu, &ubuf) != 0) {
        freeReplyObject(ur);
        freeReplyObject(br);
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    rc = 0;

    for (f = 0; f + 1 < nu; f += 2) {
        fn = uv[f];
        bar = strchr(fn, '|');
        mlen = (bar != NULL) ? (size_t) (bar - fn) : 0;

        if (mlen == 0 || mlen > MTR_METER_MAX
            || meter_parse_u64(uv[f + 1], strlen(uv[f + 1]), &u) != 0)
        {
            continue;
        }

        bv = meter_reply_hget(br, fn);
        if (bv == NULL || meter_parse_u64(bv, strlen(bv), &b) != 0) {
            b = 0;
        }

        /* a gauge's row is under the name its records are billed
         * under; its figure is its largest counter */
        gauge = meter_gauge_name(fn, mlen);
        row = meter_usage_row(hrows, nhour, cap, t, fn,
                              gauge ? mlen - MTR_GAUGE_SFX_LEN : mlen);
        if (row == NULL) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
            break;
        }

        row->gauge = gauge;
        b = (b < u) ? b : u;

        if (gauge) {
            row->quantity = (u > row->quantity) ? u : row->quantity;
            row->billed = (b > row->billed) ? b : row->billed;

        } else {
            row->quantity += u;
            row->billed += b;
        }
    }

    free(uv);
    free(ubuf);
    freeReplyObject(ur);
    freeReplyObject(br);

    return rc;
}


/* the worker's record still open for (period, customer, meter) */
static int
meter_usage_records(meter_redis_t *r, const char *id, time_t t, int wperiod,
    meter_usage_row_t *hrows, size_t nhour, char *err, size_t errlen)
{
    char                field[160];
    size_t              i;
    redisReply         *rp, *st;
    meter_usage_row_t  *row;

    for (i = 0; i < nhour; i++) {
        row = &hrows[i];

        if (row->billed == row->quantity) {
            continue;
        }

        snprintf(field, sizeof(field), MTR_PERIOD_OPEN_FMT, id, row->meter);
        rp = meter_redis_cmd(r, "HGET " MTR_W_PERIOD_PRE "%lld %s",
                             (long long) meter_period_start(t, wperiod),
                             field);
        if (!meter_reply_ok(rp)) {
            return meter_reply_failed(r, rp, err, errlen);
        }

        if (rp->type == REDIS_REPLY_STRING && rp->len == METER_IDEM_LEN) {
            snprintf(row->record, sizeof(row->record), "%s", rp->str);

            st = meter_redis_cmd(r, "HGET " MTR_W_REC_PRE "%s state",
                                 rp->str);
            if (meter_reply_ok(st) && st->type == REDIS_REPLY_STRING
                && strcmp(st->str, "dead") == 0)
            {
                row->dead = 1;

            } else {
                row->sending = 1;
            }

            freeReplyObject(st);
        }

        freeReplyObject(rp);
    }

    return 0;
}


int
meter_usage_rows(meter_redis_t *r, const char *id, time_t from, time_t to,
    int period, int wperiod, meter_usage_row_t **out, size_t *nout,
    char *err, size_t errlen)
{
    char                ck[96], from_s[24], to_s[24];
    void              **slot;
    size_t              i, h, k, nrows, cap, nhour, nhourcap;
    time_t              t;
    int                 rc, created;
    redisReply         *hours, *keys;
    meter_map_t         wm, mine;
    meter_usage_row_t  *rows, *hrows, *row;

    *out = NULL;
    *nout = 0;

    snprintf(ck, sizeof(ck), MTR_CKEYS_FMT, id);
    keys = meter_redis_cmd(r, "SMEMBERS %s", ck);
    if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
        return meter_reply_failed(r, keys, err, errlen);
    }

    /* the customer's keys: the writer layout's other counters are skipped
     * while an hour of it is read (it may hold a million) */
    if (meter_map_init(&mine, keys->elements + 1) != 0) {
        freeReplyObject(keys);
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    for (k = 0; k < keys->elements; k++) {
        if (meter_map_put(&mine, keys->element[k]->str, &created) == NULL) {
            meter_map_free(&mine, NULL);
            freeReplyObject(keys);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }

    if (from != 0) {
        snprintf(from_s, sizeof(from_s), "%lld",
                 (long long) meter_period_start(from, METER_HOUR));

    } else {
        snprintf(from_s, sizeof(from_s), "-inf");
    }

    if (to != 0) {
        snprintf(to_s, sizeof(to_s), "(%lld", (long long) to);

    } else {
        snprintf(to_s, sizeof(to_s), "+inf");
    }

    /* settled hours have left mtr:hours (daemon/due.c) */
    hours = meter_hours_range(r, from_s, to_s);
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        meter_map_free(&mine, NULL);
        freeReplyObject(keys);
        return meter_reply_failed(r, hours, err, errlen);
    }

    rows = NULL;
    nrows = 0;
    cap = 0;
    hrows = NULL;
    nhourcap = 0;
    rc = 0;

    for (h = 0; h < hours->elements && rc == 0; h++) {
        t = meter_hour_parse(hours->element[h]->str);
        if (t == -1) {
            continue;
        }

        /* this hour's rows first, then their records, then the period */
        nhour = 0;

        if (meter_map_init(&wm, 64) != 0
            || meter_wmap_load(r, hours->element[h]->str, &wm, &mine, NULL)
               != 0)
        {
            meter_map_free(&wm, meter_wkey_free);
            snprintf(err, errlen, "the writer layout of hour %s: %s",
                     hours->element[h]->str, r->err);
            rc = -1;
            break;
        }

        for (k = 0; k < keys->elements && rc == 0; k++) {
            slot = meter_map_get(&wm, keys->element[k]->str);
            rc = meter_usage_key_hour(r, keys->element[k]->str,
                                      hours->element[h]->str,
                                      (slot != NULL) ? *slot : NULL, t,
                                      &hrows, &nhour, &nhourcap, err,
                                      errlen);
        }

        meter_map_free(&wm, meter_wkey_free);

        if (rc == 0) {
            rc = meter_usage_records(r, id, t, wperiod, hrows, nhour, err,
                                     errlen);
        }

        for (i = 0; i < nhour && rc == 0; i++) {
            row = meter_usage_row(&rows, &nrows, &cap,
                                  meter_period_start(hrows[i].start, period),
                                  hrows[i].meter, strlen(hrows[i].meter));
            if (row == NULL) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
                break;
            }

            row->gauge = hrows[i].gauge;

            if (row->gauge) {
                row->quantity = (hrows[i].quantity > row->quantity)
                                ? hrows[i].quantity : row->quantity;
                row->billed = (hrows[i].billed > row->billed)
                              ? hrows[i].billed : row->billed;

            } else {
                row->quantity += hrows[i].quantity;
                row->billed += hrows[i].billed;
            }

            row->sending |= hrows[i].sending;
            row->dead |= hrows[i].dead;
            if (row->record[0] == '\0') {
                memcpy(row->record, hrows[i].record, sizeof(row->record));
            }
        }
    }

    free(hrows);
    freeReplyObject(hours);
    meter_map_free(&mine, NULL);
    freeReplyObject(keys);

    if (rc != 0) {
        free(rows);
        return -1;
    }

    if (nrows > 0) {
        qsort(rows, nrows, sizeof(meter_usage_row_t), meter_usage_cmp);
    }

    *out = rows;
    *nout = nrows;

    return 0;
}


int
meter_usage_credit(meter_redis_t *r, const char *id, const char *only,
    meter_credit_row_t **out, size_t *nout, char *err, size_t errlen)
{
    size_t               i, n, cap, len;
    int64_t              granted, left;
    redisReply          *fields;
    const char          *f, *m;
    meter_credit_row_t  *rows, *nr;

    *out = NULL;
    *nout = 0;

    fields = meter_redis_cmd(r, "HKEYS " MTR_GOV_CREDIT);
    if (!meter_reply_ok(fields) || fields->type != REDIS_REPLY_ARRAY) {
        return meter_reply_failed(r, fields, err, errlen);
    }

    rows = NULL;
    n = 0;
    cap = 0;
    len = strlen(id);

    for (i = 0; i < fields->elements; i++) {
        /* fields "C|M" of this customer */
        f = fields->element[i]->str;
        if (strncmp(f, id, len) != 0 || f[len] != MTR_GOV_CREDIT_SEP
            || !meter_valid_meter(f + len + 1))
        {
            continue;
        }

        m = f + len + 1;
        if (only != NULL && strcmp(m, only) != 0) {
            continue;
        }

        if (meter_gov_credit_left(r, id, m, &granted, &left, err, errlen)
            != 0)
        {
            goto failed;
        }

        if (granted < 0) {
            continue;
        }

        if (n == cap) {
            nr = realloc(rows, (cap ? cap * 2 : 8) * sizeof(*nr));
            if (nr == NULL) {
                snprintf(err, errlen, "out of memory");
                goto failed;
            }

            cap = cap ? cap * 2 : 8;
            rows = nr;
        }

        snprintf(rows[n].meter, sizeof(rows[n].meter), "%s", m);
        rows[n].granted = granted;
        rows[n].left = left;
        n++;
    }

    freeReplyObject(fields);
    *out = rows;
    *nout = n;

    return 0;

failed:

    freeReplyObject(fields);
    free(rows);

    return -1;
}
