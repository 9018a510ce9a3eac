
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
#include "unique.h"
#include "usage.h"
#include "wusage.h"


static int
meter_usage_cmp(const void *a, const void *b)
{
    int                       c;
    const meter_usage_row_t  *x, *y;

    x = a;
    y = b;

    if (x->start != y->start) {
        return (x->start < y->start) ? -1 : 1;
    }

    c = strcmp(x->meter, y->meter);

    return (c != 0) ? c : x->kind - y->kind;
}


/* the row of (start, meter, kind), appended when new; NULL: out of
 * memory */
static meter_usage_row_t *
meter_usage_row(meter_usage_row_t **rows, size_t *n, size_t *cap,
    time_t start, const char *meter, size_t mlen, int kind)
{
    size_t              i;
    meter_usage_row_t  *nr, *row;

    for (i = *n; i > 0; i--) {
        row = &(*rows)[i - 1];

        if (row->start == start && row->kind == kind
            && strlen(row->meter) == mlen
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
    row->kind = kind;
    memcpy(row->meter, meter, mlen);
    row->meter[mlen] = '\0';

    return row;
}


void
meter_usage_fold(meter_usage_row_t *dst, const meter_usage_row_t *src)
{
    switch (dst->kind) {

    case METER_KIND_MAX:
        dst->quantity = (src->quantity > dst->quantity) ? src->quantity
                                                        : dst->quantity;
        dst->billed = (src->billed > dst->billed) ? src->billed
                                                  : dst->billed;
        break;

    case METER_KIND_LAST:
        if (!dst->set || src->at > dst->at
            || (src->at == dst->at && src->quantity > dst->quantity))
        {
            dst->quantity = src->quantity;
            dst->billed = src->billed;
            dst->at = src->at;
        }
        break;

    default:
        dst->quantity += src->quantity;
        dst->billed += src->billed;
    }

    dst->set = 1;
}


time_t
meter_usage_pstart(time_t t, int period)
{
    return (period == METER_USAGE_MONTH) ? meter_month_shift(t, 0)
                                         : meter_period_start(t, period);
}


time_t
meter_usage_pend(time_t start, int period)
{
    return (period == METER_USAGE_MONTH) ? meter_month_shift(start, 1)
                                         : start + period;
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
    int                 rc, kind;
    char               *ubuf;
    size_t              f, mlen, nlen, nu;
    uint64_t            u, b;
    redisReply         *ur, *br;
    const char         *fn, *bar, *bv, **uv;
    meter_usage_row_t  *row, one;

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
         * under; its figure is its largest counter, or its latest */
        kind = meter_meter_kind(fn, mlen);
        nlen = (kind == METER_KIND_MAX) ? mlen - MTR_GAUGE_SFX_LEN
               : (kind == METER_KIND_LAST)
                 ? mlen - (sizeof(MTR_GAUGE_LAST_SFX) - 1) : mlen;

        row = meter_usage_row(hrows, nhour, cap, t, fn, nlen, kind);
        if (row == NULL) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
            break;
        }

        memset(&one, 0, sizeof(one));

        if (kind == METER_KIND_LAST) {
            one.quantity = meter_last_value(u);
            one.billed = (b >= u) ? one.quantity : 0;
            one.at = meter_last_at(u, t);

        } else {
            one.quantity = u;
            one.billed = (b < u) ? b : u;
        }

        meter_usage_fold(row, &one);
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


/* one month's unique index, the customer's entries grouped: "NAME|UPERIOD"
 * -> the key hashes (meter_strs_t) */
typedef struct {
    char                      **v;
    size_t                      n;
    size_t                      cap;
} meter_strs_t;


typedef struct {
    const meter_map_t          *mine;
    meter_map_t                 groups;
    int                         oom;
} meter_usage_uq_t;


static void
meter_strs_free(void *p)
{
    size_t         i;
    meter_strs_t  *s;

    s = p;

    for (i = 0; i < s->n; i++) {
        free(s->v[i]);
    }

    free(s->v);
    free(s);
}


static int
meter_usage_uq_oom(meter_usage_uq_t *u)
{
    u->oom = 1;

    return -1;
}


static int
meter_usage_uq_entry(const char *kh, const char *meter, const char *uperiod,
    void *arg)
{
    char               g[MTR_METER_MAX + 1 + METER_UPERIOD_MAX + 1];
    char             **nv;
    void             **slot;
    size_t             i;
    meter_strs_t      *s;
    meter_usage_uq_t  *u;

    u = arg;

    if (meter_map_get(u->mine, kh) == NULL) {
        return 0;
    }

    snprintf(g, sizeof(g), "%s|%s", meter, uperiod);

    slot = meter_map_put(&u->groups, g, NULL);
    if (slot == NULL) {
        return meter_usage_uq_oom(u);
    }

    if (*slot == NULL) {
        *slot = calloc(1, sizeof(meter_strs_t));
        if (*slot == NULL) {
            return meter_usage_uq_oom(u);
        }
    }

    s = *slot;

    /* SSCAN may return a member twice */
    for (i = 0; i < s->n; i++) {
        if (strcmp(s->v[i], kh) == 0) {
            return 0;
        }
    }

    if (s->n == s->cap) {
        nv = realloc(s->v, (s->cap ? s->cap * 2 : 4) * sizeof(char *));
        if (nv == NULL) {
            return meter_usage_uq_oom(u);
        }

        s->v = nv;
        s->cap = s->cap ? s->cap * 2 : 4;
    }

    s->v[s->n] = strdup(kh);
    if (s->v[s->n] == NULL) {
        return meter_usage_uq_oom(u);
    }

    s->n++;

    return 0;
}


/* the months with a unique index: those of [from, to), or when the range
 * is open every mtr:uqidx:* (SCAN; meterctl without --from) */
static redisReply *
meter_usage_uq_months(meter_redis_t *r, time_t from, time_t to)
{
    char         m[8], cursor[32];
    size_t       i, n;
    time_t       t;
    redisReply  *out, *rp, **el;

    out = calloc(1, sizeof(redisReply));
    if (out == NULL) {
        return NULL;
    }

    out->type = REDIS_REPLY_ARRAY;

    if (from != 0 && to != 0) {
        n = 0;
        for (t = meter_month_shift(from, 0); t < to; t = meter_month_shift(t, 1)) {
            n++;
        }

        out->element = calloc(n + 1, sizeof(redisReply *));
        if (out->element == NULL) {
            freeReplyObject(out);
            return NULL;
        }

        for (t = meter_month_shift(from, 0); t < to; t = meter_month_shift(t, 1)) {
            meter_month_label(t, m);
            rp = calloc(1, sizeof(redisReply));
            if (rp == NULL || (rp->str = strdup(m)) == NULL) {
                free(rp);
                freeReplyObject(out);
                return NULL;
            }

            rp->type = REDIS_REPLY_STRING;
            rp->len = strlen(m);
            out->element[out->elements++] = rp;
        }

        return out;
    }

    strcpy(cursor, "0");

    do {
        rp = meter_redis_cmd(r, "SCAN %s MATCH " MTR_UQIDX_PRE "* COUNT 1000",
                             cursor);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != 2)
        {
            freeReplyObject(rp);
            freeReplyObject(out);
            return NULL;
        }

        snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);

        for (i = 0; i < rp->element[1]->elements; i++) {
            el = realloc(out->element,
                         (out->elements + 1) * sizeof(redisReply *));
            if (el == NULL) {
                freeReplyObject(rp);
                freeReplyObject(out);
                return NULL;
            }

            out->element = el;
            out->element[out->elements] = rp->element[1]->element[i];
            rp->element[1]->element[i] = NULL;
            out->elements++;
        }

        rp->element[1]->elements = 0;
        freeReplyObject(rp);

    } while (strcmp(cursor, "0") != 0);

    /* the names without their prefix */
    for (i = 0; i < out->elements; i++) {
        n = strlen(MTR_UQIDX_PRE);
        memmove(out->element[i]->str, out->element[i]->str + n,
                out->element[i]->len - n + 1);
        out->element[i]->len -= n;
    }

    return out;
}


/* the unique meters of the customer's keys mine: a row per unique
 * period starting in [from, to), its distinct count (unique.c) */
static int
meter_usage_unique(meter_redis_t *r, const meter_map_t *mine, time_t from,
    time_t to, int period, meter_usage_row_t **rows, size_t *nrows,
    size_t *cap, char *err, size_t errlen)
{
    int                 rc;
    char               *bar;
    size_t              i, k;
    time_t              s, e;
    uint64_t            count;
    redisReply         *months;
    meter_strs_t       *g;
    meter_usage_uq_t    u;
    meter_usage_row_t  *row, one;

    months = meter_usage_uq_months(r, from, to);
    if (months == NULL) {
        snprintf(err, errlen, "the unique index: %s",
                 r->err[0] ? r->err : "out of memory");
        return -1;
    }

    rc = 0;
    u.mine = mine;

    for (i = 0; i < months->elements && rc == 0; i++) {
        if (meter_map_init(&u.groups, 16) != 0) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
            break;
        }

        u.oom = 0;

        if (meter_unique_month(r, months->element[i]->str,
                               meter_usage_uq_entry, &u, err, errlen)
            != 0)
        {
            if (u.oom) {
                snprintf(err, errlen, "out of memory");
            }

            rc = -1;
        }

        for (k = 0; k < u.groups.cap && rc == 0; k++) {
            if (u.groups.keys[k] == NULL) {
                continue;
            }

            g = u.groups.vals[k];
            bar = strchr(u.groups.keys[k], MTR_FIELD_SEP);

            if (bar == NULL || meter_uperiod_range(bar + 1, &s, &e) != 0
                || (from != 0 && s < from) || (to != 0 && s >= to))
            {
                continue;
            }

            *bar = '\0';

            rc = meter_unique_count(r, (const char *const *) g->v, g->n,
                                    u.groups.keys[k], bar + 1, &count, err,
                                    errlen);
            if (rc != 0) {
                break;
            }

            row = meter_usage_row(rows, nrows, cap,
                                  meter_usage_pstart(s, period),
                                  u.groups.keys[k],
                                  strlen(u.groups.keys[k]),
                                  METER_KIND_UNIQUE);
            if (row == NULL) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
                break;
            }

            memset(&one, 0, sizeof(one));
            one.quantity = count;
            meter_usage_fold(row, &one);
        }

        meter_map_free(&u.groups, meter_strs_free);
    }

    freeReplyObject(months);

    return rc;
}


const char *
meter_usage_kind(int kind)
{
    switch (kind) {
    case METER_KIND_MAX:
        return "max";
    case METER_KIND_LAST:
        return "last";
    case METER_KIND_UNIQUE:
        return "unique";
    default:
        return "sum";
    }
}


/* a figure meter's month: billed is what the worker billed of its figure
 * (mtr:{worker}:fig:YYYYMM, SUBJECT|NAME:max, :last or :unique) */
int
meter_usage_fig_billed(meter_redis_t *r, const char *id,
    meter_usage_row_t *rows, size_t n, char *err, size_t errlen)
{
    char          m[8], field[160];
    size_t        i;
    uint64_t      b;
    redisReply   *rp;
    const char   *sfx;

    for (i = 0; i < n; i++) {
        switch (rows[i].kind) {
        case METER_KIND_MAX:
            sfx = MTR_GAUGE_MAX_SFX;
            break;
        case METER_KIND_LAST:
            sfx = MTR_GAUGE_LAST_SFX;
            break;
        case METER_KIND_UNIQUE:
            sfx = MTR_FIG_UNIQUE_SFX;
            break;
        default:
            continue;
        }

        meter_month_label(rows[i].start, m);
        snprintf(field, sizeof(field), "%s%c%s%s", id, MTR_FIELD_SEP,
                 rows[i].meter, sfx);

        rp = meter_redis_cmd(r, "HGET " MTR_W_FIG_FMT " %s", m, field);
        if (!meter_reply_ok(rp)) {
            return meter_reply_failed(r, rp, err, errlen);
        }

        /* the value may carry more after the figure ("B HOUR") */
        b = 0;
        if (rp->type == REDIS_REPLY_STRING) {
            (void) meter_parse_u64(rp->str, strspn(rp->str, "0123456789"),
                                   &b);
        }

        rows[i].billed = b;
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
                                  meter_usage_pstart(hrows[i].start, period),
                                  hrows[i].meter, strlen(hrows[i].meter),
                                  hrows[i].kind);
            if (row == NULL) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
                break;
            }

            meter_usage_fold(row, &hrows[i]);

            row->sending |= hrows[i].sending;
            row->dead |= hrows[i].dead;
            if (row->record[0] == '\0') {
                memcpy(row->record, hrows[i].record, sizeof(row->record));
            }
        }
    }

    free(hrows);
    freeReplyObject(hours);

    if (rc == 0) {
        rc = meter_usage_unique(r, &mine, from, to, period, &rows, &nrows,
                                &cap, err, errlen);
    }

    if (rc == 0 && period == METER_USAGE_MONTH) {
        rc = meter_usage_fig_billed(r, id, rows, nrows, err, errlen);
    }

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
