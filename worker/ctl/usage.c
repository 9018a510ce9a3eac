
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

#include "hours.h"
#include "meterctl.h"
#include "meter_schema.h"
#include "util.h"
#include "wusage.h"


typedef struct {
    time_t                      hour;
    char                        key_hash[65];
    char                        meter[MTR_METER_MAX + 1];
    uint64_t                    value;
} meterctl_row_t;


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
    size_t           h, i, k, j, nrows, cap, mlen;
    time_t           t;
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

    if (o->hour != NULL) {
        t = meter_hour_parse_dashed(o->hour);
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
                }

                row->value += v;
            }

            free(uv);
            free(ubuf);
            freeReplyObject(u);
        }

        meter_map_free(&wm, meter_wkey_free);
        freeReplyObject(keys);
    }

    freeReplyObject(hours);

    if (nrows > 0) {
        qsort(rows, nrows, sizeof(meterctl_row_t), meterctl_row_cmp);
    }

    if (o->json) {
        printf("[");

        for (i = 0; i < nrows; i++) {
            meter_hour_format_dashed(rows[i].hour, dashed, sizeof(dashed));
            printf("%s\n{\"key_hash\":\"%s\",\"hour\":\"%s\",\"meter\":\"%s\","
                   "\"value\":%" PRIu64 "}", i ? "," : "", rows[i].key_hash,
                   dashed, rows[i].meter, rows[i].value);
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


static int
meterctl_urow_cmp(const void *a, const void *b)
{
    const meterctl_urow_t  *x, *y;

    x = a;
    y = b;

    if (x->start != y->start) {
        return (x->start < y->start) ? -1 : 1;
    }

    return strcmp(x->meter, y->meter);
}


static meterctl_urow_t *
meterctl_urow(meterctl_urow_t **rows, size_t *n, size_t *cap, time_t start,
    const char *meter, size_t mlen)
{
    size_t            i;
    meterctl_urow_t  *nr, *row;

    for (i = *n; i > 0; i--) {
        row = &(*rows)[i - 1];

        if (row->start == start && strlen(row->meter) == mlen
            && memcmp(row->meter, meter, mlen) == 0)
        {
            return row;
        }
    }

    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        nr = realloc(*rows, *cap * sizeof(meterctl_urow_t));
        if (nr == NULL) {
            fprintf(stderr, "meterctl: out of memory\n");
            exit(EX_OSERR);
        }

        *rows = nr;
    }

    row = &(*rows)[(*n)++];
    memset(row, 0, sizeof(meterctl_urow_t));
    row->start = start;
    memcpy(row->meter, meter, mlen);
    row->meter[mlen] = '\0';

    return row;
}


static const char *
meterctl_urow_state(const meterctl_urow_t *row)
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


/*
 * A customer's usage per period (hour or day) and meter in [from, to) (0:
 * unbounded), over all its keys: the quantity, the part billed and the
 * worker's record still open for it (wperiod: the worker's report period).
 * Sorted by period and meter; free(*out).  Shared by usage and reconcile.
 */
int
meterctl_usage_rows(meter_redis_t *r, const char *id, time_t from, time_t to,
    int period, int wperiod, meterctl_urow_t **out, size_t *nout)
{
    char              ck[96], from_s[24], to_s[24], field[160];
    char             *ubuf;
    void            **slot;
    size_t            i, h, k, f, nrows, cap, mlen, nhour, nhourcap, nu;
    time_t            t, start;
    int               rc, created;
    uint64_t          u, b;
    redisReply       *hours, *keys, *ur, *br, *rp, *st;
    const char       *fn, *bar, *bv, **uv;
    meter_map_t       wm, mine;
    meterctl_urow_t  *rows, *hrows, *row;

    *out = NULL;
    *nout = 0;

    snprintf(ck, sizeof(ck), MTR_CKEYS_FMT, id);
    keys = meterctl_sorted_set(r, ck, &rc);
    if (keys == NULL) {
        return rc;
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

    /* the customer's keys: the writer layout's other counters are skipped
     * while it is read (an hour may hold a million) */
    if (meter_map_init(&mine, keys->elements + 1) != 0) {
        fprintf(stderr, "meterctl: out of memory\n");
        exit(EX_OSERR);
    }

    for (k = 0; k < keys->elements; k++) {
        if (meter_map_put(&mine, keys->element[k]->str, &created) == NULL) {
            fprintf(stderr, "meterctl: out of memory\n");
            exit(EX_OSERR);
        }
    }

    hours = meter_hours_range(r, from_s, to_s);
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        meter_map_free(&mine, NULL);
        freeReplyObject(keys);
        return meterctl_redis_failed(r, hours);
    }

    rows = NULL;
    nrows = 0;
    cap = 0;
    hrows = NULL;
    nhourcap = 0;
    rc = EX_OK;

    for (h = 0; h < hours->elements && rc == EX_OK; h++) {
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
            rc = EX_UNAVAILABLE;
            break;
        }

        for (k = 0; k < keys->elements; k++) {
            ur = meter_redis_cmd(r, "HGETALL " MTR_U_FMT,
                                 keys->element[k]->str,
                                 hours->element[h]->str);
            br = meter_redis_cmd(r, "HGETALL " MTR_B_FMT,
                                 keys->element[k]->str,
                                 hours->element[h]->str);
            if (!meter_reply_ok(ur) || !meter_reply_ok(br)
                || ur->type != REDIS_REPLY_ARRAY
                || br->type != REDIS_REPLY_ARRAY)
            {
                freeReplyObject(br);
                rc = meterctl_redis_failed(r, ur);
                break;
            }

            slot = meter_map_get(&wm, keys->element[k]->str);

            if (meter_u_merge(ur, (slot != NULL) ? *slot : NULL, &uv, &nu,
                              &ubuf)
                != 0)
            {
                fprintf(stderr, "meterctl: out of memory\n");
                exit(EX_OSERR);
            }

            for (f = 0; f + 1 < nu; f += 2) {
                fn = uv[f];
                bar = strchr(fn, '|');
                mlen = (bar != NULL) ? (size_t) (bar - fn) : 0;

                if (mlen == 0 || mlen > MTR_METER_MAX
                    || meter_parse_u64(uv[f + 1], strlen(uv[f + 1]), &u)
                       != 0)
                {
                    continue;
                }

                bv = meter_reply_hget(br, fn);
                if (bv == NULL || meter_parse_u64(bv, strlen(bv), &b) != 0) {
                    b = 0;
                }

                row = meterctl_urow(&hrows, &nhour, &nhourcap, t, fn, mlen);
                row->quantity += u;
                row->billed += (b < u) ? b : u;
            }

            free(uv);
            free(ubuf);
            freeReplyObject(ur);
            freeReplyObject(br);
        }

        meter_map_free(&wm, meter_wkey_free);

        /* the worker's record still open for (period, customer, meter) */
        for (i = 0; i < nhour && rc == EX_OK; i++) {
            row = &hrows[i];

            if (row->billed == row->quantity) {
                continue;
            }

            snprintf(field, sizeof(field), MTR_PERIOD_OPEN_FMT, id, row->meter);
            rp = meter_redis_cmd(r, "HGET " MTR_W_PERIOD_PRE "%lld %s",
                                 (long long) meter_period_start(t, wperiod),
                                 field);
            if (!meter_reply_ok(rp)) {
                rc = meterctl_redis_failed(r, rp);
                break;
            }

            if (rp->type == REDIS_REPLY_STRING
                && rp->len == METER_IDEM_LEN)
            {
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

        for (i = 0; i < nhour && rc == EX_OK; i++) {
            start = meter_period_start(hrows[i].start, period);
            row = meterctl_urow(&rows, &nrows, &cap, start, hrows[i].meter,
                                strlen(hrows[i].meter));
            row->quantity += hrows[i].quantity;
            row->billed += hrows[i].billed;
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

    if (rc != EX_OK) {
        free(rows);
        return rc;
    }

    if (nrows > 0) {
        qsort(rows, nrows, sizeof(meterctl_urow_t), meterctl_urow_cmp);
    }

    *out = rows;
    *nout = nrows;

    return EX_OK;
}


static int
meterctl_usage_customer(meterctl_opts_t *o, meter_redis_t *r)
{
    char              when[32], field[160];
    size_t            i, nrows;
    time_t            from, to;
    int               rc, period, wperiod;
    cJSON            *arr, *j;
    const char       *id;
    meterctl_urow_t  *rows;

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

        } else {
            fprintf(stderr, "meterctl usage: invalid --period \"%s\" (hour or "
                    "day)\n", o->period);
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

    rc = meterctl_usage_rows(r, id, o->from != NULL ? from : 0,
                             o->to != NULL ? to : 0, period, wperiod, &rows,
                             &nrows);
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
            meter_iso8601(rows[i].start + period, when, sizeof(when));
            cJSON_AddStringToObject(j, "period_end", when);
            cJSON_AddStringToObject(j, "meter", rows[i].meter);
            snprintf(field, sizeof(field), "%" PRIu64, rows[i].quantity);
            cJSON_AddRawToObject(j, "quantity", field);
            snprintf(field, sizeof(field), "%" PRIu64, rows[i].billed);
            cJSON_AddRawToObject(j, "billed", field);
            cJSON_AddStringToObject(j, "state",
                                    meterctl_urow_state(&rows[i]));
            meterctl_json_str(j, "record",
                              rows[i].record[0] ? rows[i].record : NULL);
            cJSON_AddItemToArray(arr, j);
        }

        meterctl_json_print(arr);
        cJSON_Delete(arr);

    } else {
        printf("%-20s  %-16s  %14s  %14s  %-13s  %s\n",
               period == METER_DAY ? "DAY" : "HOUR", "METER", "QUANTITY",
               "BILLED", "STATE", "RECORD");

        for (i = 0; i < nrows; i++) {
            meter_iso8601(rows[i].start, when, sizeof(when));
            printf("%-20s  %-16s  %14" PRIu64 "  %14" PRIu64 "  %-13s  %s\n",
                   when, rows[i].meter, rows[i].quantity, rows[i].billed,
                   meterctl_urow_state(&rows[i]),
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
