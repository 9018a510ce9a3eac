
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl reconcile: per customer and meter over a range of hours, what
 * nginx counted (mtr:u, read by usage.c), what the worker billed (mtr:b
 * and its records) and what the provider itself holds (the provider's
 * usage_total), and every difference with its likely cause:
 *
 *   pending      not due yet: the hour (or day) has not closed, a record is
 *                being sent or retried, or the drain has not run since;
 *                the provider holding more than billed by at most what
 *                records in flight carry (sent, not yet marked billed)
 *   dead_letter  a record the worker gave up on (meterctl retry)
 *   late_usage   usage that reached Redis after its hour was drained; the
 *                next pass bills it, possibly past the invoice
 *   rejected     accepted, then rejected by the provider (Stripe's meter
 *                error reports: e.g. meter_event_customer_not_found, the
 *                customer mapping missing)
 *   unknown      anything else: the provider holds more or less than billed
 *
 * A figure meter (a gauge's max or last, a unique count) is compared as
 * its month's figure: counted is the month's figure, billed the worker's
 * figure record (mtr:{worker}:fig:YYYYMM), months of the range added.
 *
 * Exit status 0: equal or only pending; 1: differences beyond pending;
 * 2: an error (Redis or a provider unreachable or refusing: said so, no
 * figure guessed); 64: bad command line.
 */


#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "meterctl.h"
#include "meter_schema.h"
#include "provider.h"
#include "usage.h"
#include "util.h"


#define METERCTL_RC_EQUAL       0
#define METERCTL_RC_DIFFERS     1
#define METERCTL_RC_ERROR       2

#define METERCTL_RECON_METERS   64
#define METERCTL_RECON_DIFFS    8
#define METERCTL_RECON_TRIES    4       /* provider calls, on 429 */
#define METERCTL_RECON_WAIT_MAX 300     /* s: a longer Retry-After is an
                                         * error, not a wait */


typedef struct {
    const char                 *kind;
    uint64_t                    quantity;
    char                        cause[384];
} meterctl_diff_t;


typedef struct {
    char                        meter[MTR_METER_MAX + 1];
    uint64_t                    counted;
    uint64_t                    billed;
    uint64_t                    pending;    /* unbilled, not due yet */
    uint64_t                    dead;       /* unbilled, dead-lettered */
    uint64_t                    late;       /* unbilled, after the drain */
    uint64_t                    inflight;   /* carried by open records */
    char                        pending_why[160];
    char                        dead_ids[3 * (METER_IDEM_LEN + 1)];
    char                        late_at[32];    /* first late hour */
    int                         nrejected;
    char                        rejected[256];  /* codes and ids */
    int                         asked;      /* provider figure known */
    double                      provider;
    char                        error[512];     /* the provider's */
    meterctl_diff_t             diffs[METERCTL_RECON_DIFFS];
    int                         ndiffs;
} meterctl_recon_t;


typedef struct {
    meterctl_opts_t            *o;
    meter_redis_t              *r;
    meter_provider_t            p;
    int                         have_p;
    time_t                      from;
    time_t                      to;
    time_t                      now;
    time_t                      last_drain;
    int                         wperiod;
    time_t                      grace;
    int                         rc;
} meterctl_rctx_t;


static void
meterctl_recon_append(char *buf, size_t size, const char *s)
{
    size_t  n;

    n = strlen(buf);
    if (n + strlen(s) + 2 < size) {
        snprintf(buf + n, size - n, "%s%s", n ? " " : "", s);
    }
}


static meterctl_recon_t *
meterctl_recon_meter(meterctl_recon_t *m, int *n, const char *meter)
{
    int  i;

    for (i = 0; i < *n; i++) {
        if (strcmp(m[i].meter, meter) == 0) {
            return &m[i];
        }
    }

    if (*n == METERCTL_RECON_METERS) {
        return NULL;
    }

    memset(&m[*n], 0, sizeof(meterctl_recon_t));
    snprintf(m[*n].meter, sizeof(m[*n].meter), "%s", meter);

    return &m[(*n)++];
}


static void
meterctl_recon_diff(meterctl_recon_t *m, const char *kind, uint64_t q,
    const char *cause)
{
    meterctl_diff_t  *d;

    if (q == 0 || m->ndiffs == METERCTL_RECON_DIFFS) {
        return;
    }

    d = &m->diffs[m->ndiffs++];
    d->kind = kind;
    d->quantity = q;
    snprintf(d->cause, sizeof(d->cause), "%s", cause);
}


/* the quantity of an open record, counted once per record per meter */
static int
meterctl_recon_inflight(meterctl_rctx_t *x, meterctl_recon_t *m,
    const char *id, char *seen, size_t seen_size)
{
    uint64_t     q;
    redisReply  *rp;

    if (strstr(seen, id) != NULL) {
        return 0;
    }

    meterctl_recon_append(seen, seen_size, id);

    rp = meter_redis_cmd(x->r, "HMGET " MTR_W_REC_FMT " state quantity", id);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
        || rp->elements != 2)
    {
        meterctl_redis_failed(x->r, rp);
        return -1;
    }

    if (rp->element[0]->type == REDIS_REPLY_STRING
        && strcmp(rp->element[0]->str, "dead") != 0
        && rp->element[1]->type == REDIS_REPLY_STRING
        && meter_parse_u64(rp->element[1]->str, rp->element[1]->len, &q) == 0)
    {
        m->inflight += q;
    }

    freeReplyObject(rp);

    return 0;
}


/*
 * Records of (period, customer, meter) the provider rejected after it had
 * accepted them: their keys are derived (seq 1 .. the period's last), so
 * a record whose hash was deleted when it was sent is found too.
 */
static int
meterctl_recon_rejected(meterctl_rctx_t *x, const char *id,
    meterctl_recon_t *m, time_t pstart)
{
    char          field[160], rid[METER_IDEM_LEN + 1], one[160];
    uint64_t      n, s;
    redisReply   *rp, *rec;

    snprintf(field, sizeof(field), MTR_PERIOD_SEQ_FMT, id, m->meter);

    rp = meter_redis_cmd(x->r, "HGET " MTR_W_PERIOD_FMT " %s",
                         (long long) pstart, field);
    if (!meter_reply_ok(rp)) {
        meterctl_redis_failed(x->r, rp);
        return -1;
    }

    n = 0;
    if (rp->type == REDIS_REPLY_STRING
        && meter_parse_u64(rp->str, rp->len, &n) != 0)
    {
        n = 0;
    }

    freeReplyObject(rp);

    for (s = 1; s <= n && s <= 1000; s++) {
        meter_idem_key(pstart, id, m->meter, s, rid);

        rec = meter_redis_cmd(x->r, "HMGET " MTR_W_REC_FMT " state "
                              "error_code rejected_by", rid);
        if (!meter_reply_ok(rec) || rec->type != REDIS_REPLY_ARRAY
            || rec->elements != 3)
        {
            meterctl_redis_failed(x->r, rec);
            return -1;
        }

        if (rec->element[0]->type == REDIS_REPLY_STRING
            && strcmp(rec->element[0]->str, "dead") == 0
            && rec->element[2]->type == REDIS_REPLY_STRING)
        {
            m->nrejected++;
            snprintf(one, sizeof(one), "%s (%s)", rid,
                     rec->element[1]->type == REDIS_REPLY_STRING
                     ? rec->element[1]->str : "no code");
            meterctl_recon_append(m->rejected, sizeof(m->rejected), one);
        }

        freeReplyObject(rec);
    }

    return 0;
}


/* our side: counted, billed, and why the unbilled part is unbilled */
/*
 * A figure meter (gauge max or last, unique): what nginx counted is its
 * month's figure, not a sum of hours, and what the worker billed is its
 * figure record (mtr:{worker}:fig:YYYYMM); the months of the range add.
 */
static int
meterctl_recon_figures(meterctl_rctx_t *x, const char *id,
    meterctl_recon_t *ms, int *nms)
{
    int               rc;
    char              when[32];
    size_t            i, nrows;
    time_t            closes;
    uint64_t          unbilled;
    meterctl_recon_t  *m;
    meterctl_urow_t   *rows;

    rc = meterctl_usage_rows(x->r, id, x->from, x->to, METER_USAGE_MONTH,
                             x->wperiod, &rows, &nrows);
    if (rc != EX_OK) {
        return -1;
    }

    for (i = 0; i < nrows; i++) {
        if ((x->o->meter != NULL && strcmp(rows[i].meter, x->o->meter) != 0)
            || rows[i].kind == METER_KIND_SUM)
        {
            continue;
        }

        m = meterctl_recon_meter(ms, nms, rows[i].meter);
        if (m == NULL) {
            continue;
        }

        m->counted += rows[i].quantity;
        m->billed += rows[i].billed;

        if (rows[i].billed >= rows[i].quantity) {
            continue;
        }

        unbilled = rows[i].quantity - rows[i].billed;
        closes = meter_usage_pend(rows[i].start, METER_USAGE_MONTH)
                 + x->grace;
        meter_iso8601(rows[i].start, when, sizeof(when));

        if (x->now < closes) {
            m->pending += unbilled;
            snprintf(m->pending_why, sizeof(m->pending_why), "the figure of "
                     "the month from %s is billed as it grows (the month "
                     "closes grace after its end)", when);

        } else {
            m->late += unbilled;
            if (m->late_at[0] == '\0') {
                snprintf(m->late_at, sizeof(m->late_at), "%s", when);
            }
        }
    }

    free(rows);

    return 0;
}


static int
meterctl_recon_ours(meterctl_rctx_t *x, const char *id, meterctl_recon_t *ms,
    int *nms)
{
    int               rc;
    char              seen[2048], when[32];
    size_t            i, j, nrows;
    time_t            closes, pstart;
    uint64_t          unbilled;
    meterctl_recon_t  *m;
    meterctl_urow_t   *rows;

    rc = meterctl_usage_rows(x->r, id, x->from, x->to, METER_HOUR, x->wperiod,
                             &rows, &nrows);
    if (rc != EX_OK) {
        return -1;
    }

    seen[0] = '\0';

    for (i = 0; i < nrows; i++) {
        if ((x->o->meter != NULL && strcmp(rows[i].meter, x->o->meter) != 0)
            || rows[i].kind != METER_KIND_SUM)
        {
            continue;
        }

        m = meterctl_recon_meter(ms, nms, rows[i].meter);
        if (m == NULL) {
            continue;
        }

        m->counted += rows[i].quantity;
        m->billed += rows[i].billed;

        unbilled = rows[i].quantity - rows[i].billed;
        pstart = meter_period_start(rows[i].start, x->wperiod);
        closes = pstart + x->wperiod + x->grace;

        meter_iso8601(rows[i].start, when, sizeof(when));

        if (rows[i].record[0] != '\0'
            && meterctl_recon_inflight(x, m, rows[i].record, seen,
                                       sizeof(seen)) != 0)
        {
            free(rows);
            return -1;
        }

        /* the period's records the provider rejected later, once each */
        if (rows[i].billed > 0) {
            for (j = 0; j < i; j++) {
                if (strcmp(rows[j].meter, rows[i].meter) == 0
                    && rows[j].billed > 0
                    && meter_period_start(rows[j].start, x->wperiod)
                       == pstart)
                {
                    break;
                }
            }

            if (j == i && meterctl_recon_rejected(x, id, m, pstart) != 0) {
                free(rows);
                return -1;
            }
        }

        if (unbilled == 0) {
            continue;
        }

        if (x->now < closes) {
            m->pending += unbilled;
            snprintf(m->pending_why, sizeof(m->pending_why), "%s not closed "
                     "yet (closes %s after its end)", when,
                     x->wperiod == METER_DAY ? "with its day, grace" : "grace");

        } else if (rows[i].dead) {
            m->dead += unbilled;
            meterctl_recon_append(m->dead_ids, sizeof(m->dead_ids),
                                  rows[i].record);

        } else if (rows[i].sending) {
            m->pending += unbilled;
            snprintf(m->pending_why, sizeof(m->pending_why), "record %s is "
                     "being sent or retried", rows[i].record);

        } else if (rows[i].billed > 0 || x->last_drain >= closes) {
            /* the drain ran after the period closed and did not take it */
            m->late += unbilled;
            if (m->late_at[0] == '\0') {
                snprintf(m->late_at, sizeof(m->late_at), "%s", when);
            }

        } else {
            m->pending += unbilled;
            snprintf(m->pending_why, sizeof(m->pending_why), "%s closed, "
                     "not drained yet (the worker's next pass)", when);
        }
    }

    free(rows);

    return meterctl_recon_figures(x, id, ms, nms);
}


/* the provider's figure, waiting out 429s that say how long */
static void
meterctl_recon_ask(meterctl_rctx_t *x, const meter_usage_query_t *q,
    meterctl_recon_t *m)
{
    int                  t;
    double               total;
    meter_send_result_t  res;

    for (t = 0; t < METERCTL_RECON_TRIES; t++) {
        memset(&res, 0, sizeof(res));

        if (x->p.usage_total(&x->p, q, &total, &res) == 0) {
            m->asked = 1;
            m->provider = total;
            return;
        }

        if (res.status != METER_SEND_RETRY || res.http_status != 429
            || res.retry_after <= 0
            || res.retry_after > METERCTL_RECON_WAIT_MAX
            || t + 1 == METERCTL_RECON_TRIES)
        {
            break;
        }

        fprintf(stderr, "meterctl reconcile: %s rate limited, waiting %.0fs "
                "as it asked\n", x->p.name, ceil(res.retry_after));
        usleep((useconds_t) (ceil(res.retry_after) * 1e6));
    }

    snprintf(m->error, sizeof(m->error), "%.500s",
             res.error[0] ? res.error : "no answer from the provider");
    x->rc = METERCTL_RC_ERROR;
}


static void
meterctl_recon_classify(meterctl_recon_t *m)
{
    char      cause[384];
    uint64_t  prov, excess, pend;
    int64_t   diff;

    if (m->pending > 0) {
        meterctl_recon_diff(m, "pending", m->pending, m->pending_why);
    }

    if (m->dead > 0) {
        snprintf(cause, sizeof(cause), "dead-lettered record %s (meterctl "
                 "status; meterctl retry)", m->dead_ids);
        meterctl_recon_diff(m, "dead_letter", m->dead, cause);
    }

    if (m->late > 0) {
        snprintf(cause, sizeof(cause), "reached Redis after its hour (from "
                 "%s) was drained; the next pass bills it, the period's "
                 "invoice may be final already", m->late_at);
        meterctl_recon_diff(m, "late_usage", m->late, cause);
    }

    if (!m->asked) {
        return;
    }

    prov = (uint64_t) llround(m->provider > 0 ? m->provider : 0);
    diff = (int64_t) prov - (int64_t) m->billed;

    if (diff > 0) {
        excess = (uint64_t) diff;
        pend = excess < m->inflight ? excess : m->inflight;

        meterctl_recon_diff(m, "pending", pend, "sent, the provider has it, "
                            "not yet marked billed (the worker's next pass)");

        if (excess > pend) {
            meterctl_recon_diff(m, "unknown", excess - pend, "the provider "
                                "holds more than the worker billed: counted "
                                "twice (a resend past its dedupe window) or "
                                "usage sent from elsewhere");
        }

    } else if (diff < 0) {
        if (m->nrejected > 0) {
            snprintf(cause, sizeof(cause), "rejected asynchronously by the "
                     "provider after it accepted: %d record(s) %s%s",
                     m->nrejected, m->rejected,
                     strstr(m->rejected, "customer_not_found") != NULL
                     ? "; the provider customer mapping is missing" : "");
            meterctl_recon_diff(m, "rejected", (uint64_t) -diff, cause);

        } else {
            meterctl_recon_diff(m, "unknown", (uint64_t) -diff, "the worker "
                                "billed more than the provider holds: "
                                "dropped or deleted on the provider's side, "
                                "or dated outside this range");
        }
    }
}


static const char *
meterctl_recon_result(const meterctl_recon_t *m)
{
    int  i, pending;

    if (m->error[0] != '\0') {
        return "error";
    }

    pending = 0;

    for (i = 0; i < m->ndiffs; i++) {
        if (strcmp(m->diffs[i].kind, "pending") != 0) {
            return "differs";
        }

        pending = 1;
    }

    return pending ? "pending" : "equal";
}


/* the meters named in the config ("meter.NAME"): asked even when nginx
 * counted nothing, so a provider figure of our making shows */
static void
meterctl_recon_conf_meters(meterctl_rctx_t *x, meterctl_recon_t *ms, int *n)
{
    size_t       i;
    const char  *name;

    if (x->o->cf == NULL) {
        return;
    }

    for (i = 0; i < x->o->cf->nkv; i++) {
        if (strncmp(x->o->cf->kv[i].key, "meter.", 6) != 0) {
            continue;
        }

        name = x->o->cf->kv[i].key + 6;

        if (!meterctl_valid_meter(name)
            || (x->o->meter != NULL && strcmp(name, x->o->meter) != 0))
        {
            continue;
        }

        (void) meterctl_recon_meter(ms, n, name);
    }
}


static int
meterctl_recon_customer(meterctl_rctx_t *x, const char *id, cJSON *arr)
{
    int                   i, k, n;
    char                  when[32], num[32];
    cJSON                *j, *d, *ds;
    redisReply           *cust;
    const char           *res;
    meterctl_recon_t     *ms, *m;
    meter_usage_query_t   q;

    ms = calloc(METERCTL_RECON_METERS, sizeof(meterctl_recon_t));
    if (ms == NULL) {
        fprintf(stderr, "meterctl: out of memory\n");
        exit(EX_OSERR);
    }

    n = 0;

    if (x->o->meter != NULL) {
        (void) meterctl_recon_meter(ms, &n, x->o->meter);
    }

    meterctl_recon_conf_meters(x, ms, &n);

    if (meterctl_recon_ours(x, id, ms, &n) != 0) {
        free(ms);
        return -1;
    }

    cust = meter_redis_cmd(x->r, "HGETALL " MTR_CUST_FMT, id);
    if (!meter_reply_ok(cust) || cust->type != REDIS_REPLY_ARRAY) {
        free(ms);
        meterctl_redis_failed(x->r, cust);
        return -1;
    }

    for (i = 0; i < n; i++) {
        m = &ms[i];

        if (x->have_p) {
            memset(&q, 0, sizeof(q));
            q.customer = id;
            q.provider_customer = meter_reply_hget(cust, "provider_customer");
            q.subscription = meter_reply_hget(cust, "subscription");
            q.meter = m->meter;
            q.provider_meter = meter_conf_meter(x->o->cf, m->meter);
            if (q.provider_meter == NULL) {
                q.provider_meter = m->meter;
            }
            q.from = x->from;
            q.to = x->to;

            meterctl_recon_ask(x, &q, m);
        }

        meterctl_recon_classify(m);

        res = meterctl_recon_result(m);

        /* nothing anywhere: no row */
        if (m->counted == 0 && m->billed == 0 && (!m->asked || m->provider == 0)
            && strcmp(res, "equal") == 0)
        {
            continue;
        }

        if (strcmp(res, "differs") == 0 && x->rc == METERCTL_RC_EQUAL) {
            x->rc = METERCTL_RC_DIFFERS;
        }

        if (arr != NULL) {
            j = cJSON_CreateObject();
            cJSON_AddStringToObject(j, "customer", id);
            cJSON_AddStringToObject(j, "meter", m->meter);
            meter_iso8601(x->from, when, sizeof(when));
            cJSON_AddStringToObject(j, "from", when);
            meter_iso8601(x->to, when, sizeof(when));
            cJSON_AddStringToObject(j, "to", when);
            snprintf(num, sizeof(num), "%" PRIu64, m->counted);
            cJSON_AddRawToObject(j, "counted", num);
            snprintf(num, sizeof(num), "%" PRIu64, m->billed);
            cJSON_AddRawToObject(j, "billed", num);

            if (m->asked) {
                snprintf(num, sizeof(num), "%.0f", m->provider);
                cJSON_AddRawToObject(j, "provider", num);

            } else {
                cJSON_AddNullToObject(j, "provider");
            }

            cJSON_AddStringToObject(j, "result", res);
            meterctl_json_str(j, "error", m->error[0] ? m->error : NULL);

            ds = cJSON_AddArrayToObject(j, "differences");

            for (k = 0; k < m->ndiffs; k++) {
                d = cJSON_CreateObject();
                cJSON_AddStringToObject(d, "kind", m->diffs[k].kind);
                snprintf(num, sizeof(num), "%" PRIu64, m->diffs[k].quantity);
                cJSON_AddRawToObject(d, "quantity", num);
                cJSON_AddStringToObject(d, "cause", m->diffs[k].cause);
                cJSON_AddItemToArray(ds, d);
            }

            cJSON_AddItemToArray(arr, j);
            continue;
        }

        if (m->asked) {
            snprintf(num, sizeof(num), "%.0f", m->provider);

        } else {
            snprintf(num, sizeof(num), "-");
        }

        printf("%-24s  %-16s  %14" PRIu64 "  %14" PRIu64 "  %14s  %s\n", id,
               m->meter, m->counted, m->billed, num, res);

        if (m->error[0] != '\0') {
            printf("    error: %s\n", m->error);
        }

        for (k = 0; k < m->ndiffs; k++) {
            printf("    %-12s %14" PRIu64 "  %s\n", m->diffs[k].kind,
                   m->diffs[k].quantity, m->diffs[k].cause);
        }
    }

    freeReplyObject(cust);
    free(ms);

    return 0;
}


/* --period YYYY-MM, or --from/--to on hour boundaries; default: this
 * UTC month */
static int
meterctl_recon_range(meterctl_opts_t *o, meterctl_rctx_t *x)
{
    int        y, mo;
    char       tail;
    struct tm  tm;

    if (o->period != NULL && (o->from != NULL || o->to != NULL)) {
        fprintf(stderr, "meterctl reconcile: --period or --from/--to, not "
                "both\n");
        return EX_USAGE;
    }

    if (o->period != NULL || (o->from == NULL && o->to == NULL)) {
        if (o->period != NULL) {
            if (sscanf(o->period, "%4d-%2d%c", &y, &mo, &tail) != 2
                || strlen(o->period) != 7 || y < 1970 || mo < 1 || mo > 12)
            {
                fprintf(stderr, "meterctl reconcile: invalid --period \"%s\" "
                        "(a UTC month, YYYY-MM)\n", o->period);
                return EX_USAGE;
            }

        } else {
            gmtime_r(&x->now, &tm);
            y = tm.tm_year + 1900;
            mo = tm.tm_mon + 1;
        }

        memset(&tm, 0, sizeof(tm));
        tm.tm_year = y - 1900;
        tm.tm_mon = mo - 1;
        tm.tm_mday = 1;
        x->from = timegm(&tm);
        tm.tm_mon++;
        x->to = timegm(&tm);

        return EX_OK;
    }

    if (o->from == NULL || o->to == NULL) {
        fprintf(stderr, "meterctl reconcile: --from and --to go together\n");
        return EX_USAGE;
    }

    x->from = meter_iso8601_parse(o->from);
    x->to = meter_iso8601_parse(o->to);

    if (x->from == -1 || x->to == -1) {
        fprintf(stderr, "meterctl reconcile: invalid --from or --to (ISO "
                "8601 UTC, e.g. 2026-11-24T10:00Z)\n");
        return EX_USAGE;
    }

    /* providers count per hour (Stripe's hourly summaries need it) */
    if (x->from % METER_HOUR != 0 || x->to % METER_HOUR != 0
        || x->to <= x->from)
    {
        fprintf(stderr, "meterctl reconcile: --from and --to must be on "
                "hour boundaries, --to after --from\n");
        return EX_USAGE;
    }

    return EX_OK;
}


int
meterctl_reconcile(meterctl_opts_t *o, meter_redis_t *r)
{
    int               rc;
    char              err[512], a[32], b[32];
    size_t            i;
    cJSON            *arr;
    redisReply       *custs, *st;
    const char       *pname;
    meterctl_rctx_t   x;

    memset(&x, 0, sizeof(x));
    x.o = o;
    x.r = r;
    x.now = time(NULL);
    x.rc = METERCTL_RC_EQUAL;

    if (o->nargs > 0) {
        fprintf(stderr, "meterctl reconcile: unexpected argument \"%s\" (use "
                "--customer)\n", o->args[0]);
        return EX_USAGE;
    }

    if (o->customer != NULL && !meterctl_valid_id(o->customer)) {
        fprintf(stderr, "meterctl reconcile: invalid customer id \"%s\"\n",
                o->customer);
        return EX_USAGE;
    }

    if (o->meter != NULL && !meterctl_valid_meter(o->meter)) {
        fprintf(stderr, "meterctl reconcile: invalid meter \"%s\"\n",
                o->meter);
        return EX_USAGE;
    }

    rc = meterctl_recon_range(o, &x);
    if (rc != EX_OK) {
        return rc;
    }

    x.wperiod = (o->cf != NULL && o->cf->report_period == METER_DAY)
                ? METER_DAY : METER_HOUR;
    x.grace = (o->cf != NULL) ? o->cf->grace : 300;
    pname = (o->cf != NULL) ? o->cf->provider : "file";

    if (meter_provider_by_name(pname, &x.p) != 0) {
        fprintf(stderr, "meterctl reconcile: unknown provider \"%s\"\n",
                pname);
        return METERCTL_RC_ERROR;
    }

    if (x.p.usage_total != NULL) {
        err[0] = '\0';
        if (x.p.init(&x.p, o->cf, err, sizeof(err)) != 0) {
            fprintf(stderr, "meterctl reconcile: %s: %s\n", pname, err);
            if (x.p.cleanup != NULL) {
                x.p.cleanup(&x.p);
            }
            return METERCTL_RC_ERROR;
        }

        /* init may find it has nothing to ask (Lago) */
        x.have_p = (x.p.usage_total != NULL);
    }

    custs = NULL;
    arr = NULL;

    if (meterctl_open(o, r) != EX_OK) {
        x.rc = METERCTL_RC_ERROR;
        goto end;
    }

    st = meter_redis_cmd(r, "HGET " MTR_W_STATS " last_drain");
    if (!meter_reply_ok(st)) {
        meterctl_redis_failed(r, st);
        x.rc = METERCTL_RC_ERROR;
        goto end;
    }

    if (st->type == REDIS_REPLY_STRING) {
        x.last_drain = (time_t) strtoll(st->str, NULL, 10);
    }

    freeReplyObject(st);

    if (o->customer != NULL) {
        rc = meterctl_customer_exists(r, "reconcile", o->customer);
        if (rc != 1) {
            x.rc = METERCTL_RC_ERROR;
            goto end;
        }

    } else {
        custs = meterctl_sorted_set(r, MTR_CUSTOMERS, &rc);
        if (custs == NULL) {
            x.rc = METERCTL_RC_ERROR;
            goto end;
        }
    }

    meter_iso8601(x.from, a, sizeof(a));
    meter_iso8601(x.to, b, sizeof(b));

    if (o->json) {
        arr = cJSON_CreateArray();

    } else {
        printf("reconcile [%s, %s), provider %s%s\n", a, b, pname,
               x.have_p ? "" : " (its own figures cannot be read: nginx and "
               "the worker only)");
        printf("%-24s  %-16s  %14s  %14s  %14s  %s\n", "CUSTOMER", "METER",
               "COUNTED", "BILLED", "PROVIDER", "RESULT");
    }

    if (o->customer != NULL) {
        if (meterctl_recon_customer(&x, o->customer, arr) != 0) {
            x.rc = METERCTL_RC_ERROR;
        }

    } else {
        for (i = 0; i < custs->elements; i++) {
            if (meterctl_recon_customer(&x, custs->element[i]->str, arr)
                != 0)
            {
                x.rc = METERCTL_RC_ERROR;
                break;
            }
        }
    }

    if (arr != NULL) {
        meterctl_json_print(arr);
    }

end:

    cJSON_Delete(arr);
    freeReplyObject(custs);

    if (x.p.cleanup != NULL && x.p.data != NULL) {
        x.p.cleanup(&x.p);
    }

    return x.rc;
}
