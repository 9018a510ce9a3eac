
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl usage: usage per key hash and hour, or per customer with its
 * billing state.
 */


#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "figure_read.h"
#include "hours.h"
#include "meterctl.h"
#include "usage.h"
#include "meter_schema.h"
#include "unique.h"
#include "util.h"
#include "wusage.h"


typedef struct {
    time_t                      hour;
    char                        key_hash[65];
    char                        meter[MTR_METER_MAX + 1 + 8];
    uint64_t                    value;
    char                        uperiod[METER_UPERIOD_MAX + 1];
} meterctl_row_t;


typedef struct {
    meter_redis_t              *r;
    meterctl_row_t            **rows;
    size_t                     *nrows;
    size_t                     *cap;
    time_t                      hour;       /* --hour, or -1 */
    meter_map_t                 seen;       /* KH|NAME|UPERIOD */
    int                         failed;
} meterctl_uq_walk_t;


static meterctl_row_t *
meterctl_row_push(meterctl_row_t **rows, size_t *nrows, size_t *cap)
{
    meterctl_row_t  *nr;

    if (*nrows == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        nr = realloc(*rows, *cap * sizeof(meterctl_row_t));
        if (nr == NULL) {
            fprintf(stderr, "meterctl: out of memory\n");
            exit(EX_OSERR);
        }

        *rows = nr;
    }

    memset(&(*rows)[*nrows], 0, sizeof(meterctl_row_t));

    return &(*rows)[(*nrows)++];
}


static int meterctl_usage_keys_unique_walk(meter_redis_t *r,
    meterctl_uq_walk_t *w);


/* one index entry: its key's distinct count as a row NAME:unique */
static int
meterctl_usage_uq(const char *kh, const char *meter, const char *uperiod,
    void *arg)
{
    char                 err[512], id[160];
    int                  created;
    time_t               s, e;
    uint64_t             count;
    meterctl_row_t      *row;
    meterctl_uq_walk_t  *w;

    w = arg;

    if (meter_uperiod_range(uperiod, &s, &e) != 0
        || (w->hour != -1 && (w->hour < s || w->hour >= e)))
    {
        return 0;
    }

    /* SSCAN may return a member twice */
    snprintf(id, sizeof(id), "%s|%s|%s", kh, meter, uperiod);
    if (meter_map_put(&w->seen, id, &created) == NULL) {
        fprintf(stderr, "meterctl: out of memory\n");
        exit(EX_OSERR);
    }

    if (!created) {
        return 0;
    }

    if (meter_unique_count(w->r, &kh, 1, meter, uperiod, &count, err,
                           sizeof(err))
        != 0)
    {
        fprintf(stderr, "meterctl: unique count of %s: %s\n", meter, err);
        w->failed = 1;
        return -1;
    }

    row = meterctl_row_push(w->rows, w->nrows, w->cap);
    row->hour = s;
    snprintf(row->key_hash, sizeof(row->key_hash), "%s", kh);
    snprintf(row->meter, sizeof(row->meter), "%s" MTR_FIG_UNIQUE_SFX, meter);
    snprintf(row->uperiod, sizeof(row->uperiod), "%s", uperiod);
    row->value = count;

    return 0;
}


/* the unique meters of every key: of the month of --hour (the unique
 * periods that hold it), else of every month with an index */
static int
meterctl_usage_keys_unique(meter_redis_t *r, time_t hour,
    meterctl_row_t **rows, size_t *nrows, size_t *cap)
{
    int                  rc;
    meterctl_uq_walk_t   w;

    w.r = r;
    w.rows = rows;
    w.nrows = nrows;
    w.cap = cap;
    w.hour = hour;
    w.failed = 0;

    if (meter_map_init(&w.seen, 64) != 0) {
        fprintf(stderr, "meterctl: out of memory\n");
        exit(EX_OSERR);
    }

    rc = meterctl_usage_keys_unique_walk(r, &w);
    meter_map_free(&w.seen, NULL);

    return rc;
}


static int
meterctl_usage_keys_unique_walk(meter_redis_t *r, meterctl_uq_walk_t *w)
{
    char                 m[8], cursor[32], err[512];
    size_t               i;
    time_t               hour;
    redisReply          *rp;

    hour = w->hour;

    if (hour != -1) {
        meter_month_label(hour, m);

        if (meter_unique_month(r, m, meterctl_usage_uq, w, err, sizeof(err))
            != 0)
        {
            if (!w->failed) {
                fprintf(stderr, "meterctl: the unique index: %s\n", err);
            }

            return EX_UNAVAILABLE;
        }

        return EX_OK;
    }

    strcpy(cursor, "0");

    do {
        rp = meter_redis_cmd(r, "SCAN %s MATCH " MTR_UQIDX_PRE "* COUNT 1000",
                             cursor);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != 2)
        {
            return meterctl_redis_failed(r, rp);
        }

        snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);

        for (i = 0; i < rp->element[1]->elements; i++) {
            if (meter_unique_month(r, rp->element[1]->element[i]->str
                                      + strlen(MTR_UQIDX_PRE),
                                   meterctl_usage_uq, w, err, sizeof(err))
                != 0)
            {
                if (!w->failed) {
                    fprintf(stderr, "meterctl: the unique index: %s\n",
                            err);
                }

                freeReplyObject(rp);
                return EX_UNAVAILABLE;
            }
        }

        freeReplyObject(rp);

    } while (strcmp(cursor, "0") != 0);

    return EX_OK;
}


static int
meterctl_row_cmp(const void *a, const void *b)
{
    const meterctl_row_t  *x, *y;
    int                    c;

    x = a;
    y = b;

    if (x->hour != y->hour) {
        return (x->hour < y->hour) ? -1 : 1;
    }

    c = strcmp(x->key_hash, y->key_hash);

    return (c != 0) ? c : strcmp(x->meter, y->meter);
}


static int
meterctl_usage_keys(meterctl_opts_t *o, meter_redis_t *r)
{
    char             hbuf[16], dashed[16], tbuf[24];
    int              rc;
    size_t           h, i, k, j, nrows, cap, mlen;
    time_t           t, only;
    uint64_t         v;
    char            *ubuf;
    void           **slot;
    size_t           nu;
    redisReply      *hours, *keys, *u;
    const char      *kh, **uv;
    meter_map_t      wm;
    meter_wkey_t    *wk;
    const char      *f, *bar;
    meterctl_row_t  *rows, *row, *nr;

    rows = NULL;
    nrows = 0;
    cap = 0;
    only = -1;

    if (o->hour != NULL) {
        t = meter_hour_parse_dashed(o->hour);
        only = t;
        if (t == -1) {
            fprintf(stderr, "meterctl: invalid --hour \"%s\" (expected "
                    "YYYY-MM-DDTHH)\n", o->hour);
            return EX_USAGE;
        }

        meter_hour_format(t, hbuf, sizeof(hbuf));
        snprintf(tbuf, sizeof(tbuf), "%lld", (long long) t);
        hours = meter_hours_range(r, tbuf, tbuf);
        /* the index may know the hour even when the zset does not */
        if (meter_reply_ok(hours) && hours->elements == 0) {
            freeReplyObject(hours);
            hours = meter_redis_cmd(r, "EVAL %s 0 %s",
                                    "return {ARGV[1]}", hbuf);
        }

    } else {
        hours = meter_hours_range(r, "-inf", "+inf");
    }

    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, hours);
    }

    for (h = 0; h < hours->elements; h++) {
        t = meter_hour_parse(hours->element[h]->str);
        if (t == -1) {
            continue;
        }

        keys = meter_redis_cmd(r, "SMEMBERS " MTR_IDX_FMT,
                               hours->element[h]->str);
        if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(hours);
            free(rows);
            return meterctl_redis_failed(r, keys);
        }

        /* both layouts: the key layout's keys, then the writer layout's */
        if (meter_map_init(&wm, 64) != 0
            || meter_wmap_load(r, hours->element[h]->str, &wm, NULL, NULL)
               != 0)
        {
            meter_map_free(&wm, meter_wkey_free);
            freeReplyObject(keys);
            freeReplyObject(hours);
            free(rows);
            return EX_UNAVAILABLE;
        }

        for (k = 0; k < keys->elements + wm.cap; k++) {
            if (k < keys->elements) {
                kh = keys->element[k]->str;

                if (keys->element[k]->len != 64) {
                    continue;
                }

                u = meter_redis_cmd(r, "HGETALL " MTR_U_FMT, kh,
                                    hours->element[h]->str);
                if (!meter_reply_ok(u) || u->type != REDIS_REPLY_ARRAY) {
                    meter_map_free(&wm, meter_wkey_free);
                    freeReplyObject(keys);
                    freeReplyObject(hours);
                    free(rows);
                    return meterctl_redis_failed(r, u);
                }

                slot = meter_map_get(&wm, kh);
                wk = (slot != NULL) ? *slot : NULL;

                if (wk != NULL) {
                    wk->seen = 1;
                }

            } else {
                kh = wm.keys[k - keys->elements];
                wk = (kh != NULL) ? wm.vals[k - keys->elements] : NULL;

                if (wk == NULL || wk->seen) {
                    continue;
                }

                u = NULL;
            }

            if (meter_u_merge(u, wk, &uv, &nu, &ubuf) != 0) {
                fprintf(stderr, "meterctl: out of memory\n");
                exit(EX_OSERR);
            }

            for (i = 0; i + 1 < nu; i += 2) {
                f = uv[i];
                bar = strchr(f, '|');
                mlen = (bar != NULL) ? (size_t) (bar - f) : 0;

                if (mlen == 0 || mlen > MTR_METER_MAX
                    || meter_parse_u64(uv[i + 1], strlen(uv[i + 1]), &v)
                       != 0)
                {
                    continue;
                }

                /* the rows of one key-hour are the last ones */
                row = NULL;
                for (j = nrows; j > 0; j--) {
                    if (rows[j - 1].hour != t
                        || strcmp(rows[j - 1].key_hash, kh) != 0)
                    {
                        break;
                    }

                    if (strlen(rows[j - 1].meter) == mlen
                        && memcmp(rows[j - 1].meter, f, mlen) == 0)
                    {
                        row = &rows[j - 1];
                        break;
                    }
                }

                if (row == NULL) {
                    if (nrows == cap) {
                        cap = cap ? cap * 2 : 64;
                        nr = realloc(rows, cap * sizeof(meterctl_row_t));
                        if (nr == NULL) {
                            fprintf(stderr, "meterctl: out of memory\n");
                            exit(EX_OSERR);
                        }

                        rows = nr;
                    }

                    row = &rows[nrows++];
                    row->hour = t;
                    snprintf(row->key_hash, sizeof(row->key_hash), "%s",
                             kh);
                    memcpy(row->meter, f, mlen);
                    row->meter[mlen] = '\0';
                    row->value = 0;
                    row->uperiod[0] = '\0';
                }

                /* a gauge's figure is its largest counter, not the sum */
                if (meter_gauge_name(f, mlen)) {
                    row->value = (v > row->value) ? v : row->value;

                } else {
                    row->value += v;
                }
            }

            free(uv);
            free(ubuf);
            freeReplyObject(u);
        }

        meter_map_free(&wm, meter_wkey_free);
        freeReplyObject(keys);
    }

    freeReplyObject(hours);

    /* a last= gauge's largest counter is its latest reading: decoded */
    for (i = 0; i < nrows; i++) {
        if (meter_meter_kind(rows[i].meter, strlen(rows[i].meter))
            == METER_KIND_LAST)
        {
            rows[i].value = meter_last_value(rows[i].value);
        }
    }

    rc = meterctl_usage_keys_unique(r, only, &rows, &nrows, &cap);
    if (rc != EX_OK) {
        free(rows);
        return rc;
    }

    if (nrows > 0) {
        qsort(rows, nrows, sizeof(meterctl_row_t), meterctl_row_cmp);
    }

    if (o->json) {
        printf("[");

        for (i = 0; i < nrows; i++) {
            meter_hour_format_dashed(rows[i].hour, dashed, sizeof(dashed));
            printf("%s\n{\"key_hash\":\"%s\",\"hour\":\"%s\",\"meter\":\"%s\","
                   "\"value\":%" PRIu64, i ? "," : "", rows[i].key_hash,
                   dashed, rows[i].meter, rows[i].value);

            /* a unique meter's row: the distinct count of this period */
            if (rows[i].uperiod[0] != '\0') {
                printf(",\"unique_period\":\"%s\"", rows[i].uperiod);
            }

            printf("}");
        }

        printf("%s]\n", nrows ? "\n" : "");

    } else {
        printf("%-13s  %-64s  %-16s  %s\n", "HOUR", "KEY_HASH", "METER",
               "VALUE");

        for (i = 0; i < nrows; i++) {
            meter_hour_format_dashed(rows[i].hour, dashed, sizeof(dashed));
            printf("%-13s  %-64s  %-16s  %" PRIu64 "\n", dashed,
                   rows[i].key_hash, rows[i].meter, rows[i].value);
        }
    }

    free(rows);

    return EX_OK;
}


int
meterctl_usage_rows(meter_redis_t *r, const char *id, time_t from, time_t to,
    int period, int wperiod, meterctl_urow_t **out, size_t *nout)
{
    char  err[512];

    if (meter_usage_rows(r, id, from, to, period, wperiod, out, nout, err,
                         sizeof(err))
        != 0)
    {
        fprintf(stderr, "meterctl: %s\n", err);
        return EX_UNAVAILABLE;
    }

    return EX_OK;
}


static int
meterctl_usage_customer(meterctl_opts_t *o, meter_redis_t *r)
{
    char                when[32], num[24];
    size_t              i, nrows;
    time_t              from, to;
    int                 rc, period, wperiod;
    cJSON              *arr, *j;
    const char         *id;
    meter_usage_row_t  *rows;

    id = o->args[0];
    from = 0;
    to = 0;
    period = METER_HOUR;

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl usage: invalid customer id \"%s\"\n", id);
        return EX_DATAERR;
    }

    if (o->from != NULL) {
        from = meter_iso8601_parse(o->from);
        if (from == -1) {
            fprintf(stderr, "meterctl usage: invalid --from \"%s\" (ISO 8601 "
                    "UTC, e.g. 2026-11-24 or 2026-11-24T10:00Z)\n", o->from);
            return EX_USAGE;
        }
    }

    if (o->to != NULL) {
        to = meter_iso8601_parse(o->to);
        if (to == -1) {
            fprintf(stderr, "meterctl usage: invalid --to \"%s\" (ISO 8601 "
                    "UTC, e.g. 2026-11-25)\n", o->to);
            return EX_USAGE;
        }
    }

    if (o->from != NULL && o->to != NULL && to <= from) {
        fprintf(stderr, "meterctl usage: --to must be after --from\n");
        return EX_USAGE;
    }

    if (o->period != NULL) {
        if (strcmp(o->period, "hour") == 0) {
            period = METER_HOUR;

        } else if (strcmp(o->period, "day") == 0) {
            period = METER_DAY;

        } else if (strcmp(o->period, "month") == 0) {
            /* a figure meter's row is then its month's figure */
            period = METER_USAGE_MONTH;

        } else {
            fprintf(stderr, "meterctl usage: invalid --period \"%s\" (hour, "
                    "day or month)\n", o->period);
            return EX_USAGE;
        }
    }

    wperiod = (o->cf != NULL && o->cf->report_period == METER_DAY)
              ? METER_DAY : METER_HOUR;

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "usage", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    /* shared with reconcile and the portal's GET /usage: the same numbers */
    rc = meterctl_usage_rows(r, id, from, to, period, wperiod, &rows, &nrows);
    if (rc != EX_OK) {
        return rc;
    }

    if (o->json) {
        arr = cJSON_CreateArray();

        for (i = 0; i < nrows; i++) {
            j = cJSON_CreateObject();
            meter_iso8601(rows[i].start, when, sizeof(when));
            cJSON_AddStringToObject(j, "customer", id);
            cJSON_AddStringToObject(j, "period_start", when);
            meter_iso8601(meter_usage_pend(rows[i].start, period), when,
                          sizeof(when));
            cJSON_AddStringToObject(j, "period_end", when);
            cJSON_AddStringToObject(j, "meter", rows[i].meter);
            snprintf(num, sizeof(num), "%" PRIu64, rows[i].quantity);
            cJSON_AddRawToObject(j, "quantity", num);
            snprintf(num, sizeof(num), "%" PRIu64, rows[i].billed);
            cJSON_AddRawToObject(j, "billed", num);
            cJSON_AddStringToObject(j, "state",
                                    meter_usage_state(&rows[i]));
            meterctl_json_str(j, "record",
                              rows[i].record[0] ? rows[i].record : NULL);
            cJSON_AddItemToArray(arr, j);
        }

        meterctl_json_print(arr);
        cJSON_Delete(arr);

    } else {
        printf("%-20s  %-16s  %14s  %14s  %-13s  %s\n",
               period == METER_DAY ? "DAY"
               : period == METER_USAGE_MONTH ? "MONTH" : "HOUR",
               "METER", "QUANTITY",
               "BILLED", "STATE", "RECORD");

        for (i = 0; i < nrows; i++) {
            meter_iso8601(rows[i].start, when, sizeof(when));
            printf("%-20s  %-16s  %14" PRIu64 "  %14" PRIu64 "  %-13s  %s\n",
                   when, rows[i].meter, rows[i].quantity, rows[i].billed,
                   meter_usage_state(&rows[i]),
                   rows[i].record[0] ? rows[i].record : "-");
        }

        if (nrows == 0) {
            printf("(no usage in Redis for customer %s%s)\n", id,
                   (o->from || o->to) ? " in this range" : "");
        }
    }

    free(rows);

    return EX_OK;
}


int
meterctl_usage(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    if (o->nargs > 1) {
        fprintf(stderr, "meterctl usage: expected at most one customer id\n");
        return EX_USAGE;
    }

    if (o->nargs == 1) {
        if (o->hour != NULL) {
            fprintf(stderr, "meterctl usage: --hour is for the per-key form; "
                    "with CUSTOMER use --from and --to\n");
            return EX_USAGE;
        }

        return meterctl_usage_customer(o, r);
    }

    if (o->from != NULL || o->to != NULL || o->period != NULL) {
        fprintf(stderr, "meterctl usage: --from, --to and --period need a "
                "CUSTOMER\n");
        return EX_USAGE;
    }

    if (o->hour != NULL && meter_hour_parse_dashed(o->hour) == -1) {
        fprintf(stderr, "meterctl usage: invalid --hour \"%s\" (expected "
                "YYYY-MM-DDTHH)\n", o->hour);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    return meterctl_usage_keys(o, r);
}
