
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl status: hours in Redis, the last drain and sync, open and dead
 * records, keys without customer.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include "hours.h"
#include "meterctl.h"
#include "meter_schema.h"
#include "util.h"


static void
meterctl_json_field(const char *name, const char *v, int first)
{
    meter_str_t  s;

    memset(&s, 0, sizeof(meter_str_t));
    meter_str_json(&s, v);
    printf("%s\"%s\":%s", first ? "" : ",", name, s.data ? s.data : "null");
    meter_str_free(&s);
}


static int
meterctl_records(meter_redis_t *r, const char *zset, const char *title,
    int json)
{
    static const char  *fields[] = {
        "state", "customer", "key_hash", "meter", "period_start",
        "quantity", "attempts", "next_attempt", "http_status", "last_error",
        NULL
    };

    char         when[32];
    size_t       i, k;
    redisReply  *ids, *rec;
    const char  *v;

    ids = meter_redis_cmd(r, "ZRANGE %s 0 -1", zset);
    if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, ids);
    }

    if (json) {
        printf(",\"%s\":[", title);

    } else {
        printf("%s: %zu\n", title, ids->elements);
    }

    for (i = 0; i < ids->elements; i++) {
        rec = meter_redis_cmd(r, "HGETALL " MTR_W_REC_PRE "%s",
                              ids->element[i]->str);
        if (!meter_reply_ok(rec)) {
            freeReplyObject(ids);
            return meterctl_redis_failed(r, rec);
        }

        if (json) {
            printf("%s{", i ? "," : "");
            meterctl_json_field("id", ids->element[i]->str, 1);

            for (k = 0; fields[k] != NULL; k++) {
                v = meter_reply_hget(rec, fields[k]);

                if (v != NULL && (strcmp(fields[k], "period_start") == 0
                                  || strcmp(fields[k], "next_attempt") == 0))
                {
                    meter_iso8601((time_t) strtoll(v, NULL, 10), when,
                                  sizeof(when));
                    v = when;
                }

                if (v != NULL && (strcmp(fields[k], "quantity") == 0
                                  || strcmp(fields[k], "attempts") == 0
                                  || strcmp(fields[k], "http_status") == 0))
                {
                    printf(",\"%s\":%s", fields[k], v);

                } else {
                    meterctl_json_field(fields[k], v, 0);
                }
            }

            printf("}");

        } else {
            v = meter_reply_hget(rec, "period_start");
            meter_iso8601(v ? (time_t) strtoll(v, NULL, 10) : 0, when,
                          sizeof(when));
            printf("  %s  %s  %s  %s  qty %s  attempts %s  %s\n",
                   ids->element[i]->str, when,
                   meter_reply_hget(rec, "customer")
                   ? meter_reply_hget(rec, "customer") : "(no customer)",
                   meter_reply_hget(rec, "meter")
                   ? meter_reply_hget(rec, "meter") : "?",
                   meter_reply_hget(rec, "quantity")
                   ? meter_reply_hget(rec, "quantity") : "?",
                   meter_reply_hget(rec, "attempts")
                   ? meter_reply_hget(rec, "attempts") : "0",
                   meter_reply_hget(rec, "last_error")
                   ? meter_reply_hget(rec, "last_error") : "");
        }

        freeReplyObject(rec);
    }

    if (json) {
        printf("]");
    }

    freeReplyObject(ids);

    return EX_OK;
}


/*
 * The backlog as the worker measured it after its last turn (mtr:{worker}:
 * stats backlog, rate, oldest_unbilled, backlog_at), and the ETA it gives
 */
static void
meterctl_backlog(const redisReply *stats, int json)
{
    char         oldest[32], at[32], eta[32];
    double       rate;
    long long    backlog, o, secs;
    const char  *v;

    v = meter_reply_hget(stats, "backlog");
    backlog = (v != NULL) ? strtoll(v, NULL, 10) : -1;
    v = meter_reply_hget(stats, "rate");
    rate = (v != NULL) ? strtod(v, NULL) : 0.0;
    v = meter_reply_hget(stats, "oldest_unbilled");
    o = (v != NULL) ? strtoll(v, NULL, 10) : 0;
    v = meter_reply_hget(stats, "backlog_at");

    oldest[0] = '\0';
    if (o > 0) {
        meter_hour_format_dashed((time_t) o, oldest, sizeof(oldest));
    }

    at[0] = '\0';
    if (v != NULL) {
        meter_iso8601((time_t) strtoll(v, NULL, 10), at, sizeof(at));
    }

    secs = (backlog > 0 && rate > 0.0) ? (long long) (backlog / rate + 0.5)
                                       : (backlog == 0 ? 0 : -1);

    if (json) {
        if (backlog >= 0) {
            printf(",\"backlog\":%lld", backlog);

        } else {
            printf(",\"backlog\":null");
        }

        printf(",\"rate\":%.3f", rate);
        if (secs >= 0 && backlog >= 0) {
            printf(",\"eta_seconds\":%lld", secs);

        } else {
            printf(",\"eta_seconds\":null");
        }

        meterctl_json_field("oldest_unbilled_hour", oldest[0] ? oldest : NULL,
                            0);
        meterctl_json_field("backlog_at", at[0] ? at : NULL, 0);
        return;
    }

    if (backlog < 0) {
        printf("backlog: unknown (no daemon turn yet)\n");
        return;
    }

    if (secs >= 3600) {
        snprintf(eta, sizeof(eta), "%lldh%02lldm", secs / 3600,
                 secs % 3600 / 60);

    } else if (secs >= 0) {
        snprintf(eta, sizeof(eta), "%lldm%02llds", secs / 60, secs % 60);

    } else {
        snprintf(eta, sizeof(eta), "unknown (nothing sent yet)");
    }

    printf("backlog: %lld records due%s%s%s, %.1f records/s, ETA %s "
           "(as of %s)\n", backlog, oldest[0] ? " (oldest hour " : "",
           oldest, oldest[0] ? ")" : "", rate, eta, at);
}


static int
meterctl_status(meterctl_opts_t *o, meter_redis_t *r)
{
    char         last[32], oldest[16], newest[16], sync_last[32];
    char         sync_ok[32];
    size_t       i, nplans, nquotas;
    long long    nhours, lock, late;
    redisReply  *rp, *stats, *nocust, *sync, *plans;
    const char  *v, *sync_err;
    int          rc;

    /* settled hours too (lib/hours.c) */
    rp = meter_hours_range(r, "-inf", "+inf");
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, rp);
    }

    nhours = (long long) rp->elements;
    oldest[0] = '\0';
    newest[0] = '\0';

    if (rp->elements > 0) {
        meter_hour_format_dashed(meter_hour_parse(rp->element[0]->str),
                                 oldest, sizeof(oldest));
        meter_hour_format_dashed(
            meter_hour_parse(rp->element[rp->elements - 1]->str),
            newest, sizeof(newest));
    }

    freeReplyObject(rp);

    stats = meter_redis_cmd(r, "HGETALL %s", MTR_W_STATS);
    if (!meter_reply_ok(stats)) {
        return meterctl_redis_failed(r, stats);
    }

    v = meter_reply_hget(stats, "last_drain");
    last[0] = '\0';
    if (v != NULL) {
        meter_iso8601((time_t) strtoll(v, NULL, 10), last, sizeof(last));
    }

    rp = meter_redis_cmd(r, "PTTL %s", MTR_W_LOCK);
    lock = meter_reply_int(rp, -2);
    freeReplyObject(rp);

    sync = meter_redis_cmd(r, "HGETALL %s", MTR_W_SYNC);
    if (!meter_reply_ok(sync)) {
        freeReplyObject(stats);
        return meterctl_redis_failed(r, sync);
    }

    v = meter_reply_hget(sync, "last");
    sync_last[0] = '\0';
    if (v != NULL) {
        meterctl_time(v, sync_last, sizeof(sync_last));
    }

    v = meter_reply_hget(sync, "ok");
    sync_ok[0] = '\0';
    if (v != NULL) {
        meterctl_time(v, sync_ok, sizeof(sync_ok));
    }

    sync_err = meter_reply_hget(sync, "error");
    if (sync_err != NULL && sync_err[0] == '\0') {
        sync_err = NULL;
    }

    nocust = meter_redis_cmd(r, "SMEMBERS %s", MTR_W_NOCUST);
    if (!meter_reply_ok(nocust) || nocust->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(stats);
        freeReplyObject(sync);
        return meterctl_redis_failed(r, nocust);
    }

    if (o->json) {
        printf("{\"hours\":%lld", nhours);
        meterctl_json_field("oldest_hour", oldest[0] ? oldest : NULL, 0);
        meterctl_json_field("newest_hour", newest[0] ? newest : NULL, 0);
        meterctl_json_field("last_drain", last[0] ? last : NULL, 0);
        printf(",\"records_sent\":%s",
               meter_reply_hget(stats, "records_sent")
               ? meter_reply_hget(stats, "records_sent") : "0");
        printf(",\"quantity_sent\":%s",
               meter_reply_hget(stats, "quantity_sent")
               ? meter_reply_hget(stats, "quantity_sent") : "0");
        printf(",\"locked\":%s", lock > 0 ? "true" : "false");
        meterctl_json_field("last_sync", sync_last[0] ? sync_last : NULL, 0);
        meterctl_json_field("last_sync_ok", sync_ok[0] ? sync_ok : NULL, 0);
        meterctl_json_field("sync_error", sync_err, 0);
        meterctl_backlog(stats, 1);

    } else {
        if (nhours > 0) {
            printf("hours in Redis: %lld (%s .. %s)\n", nhours, oldest,
                   newest);

        } else {
            printf("hours in Redis: 0\n");
        }

        printf("last drain: %s\n", last[0] ? last : "never");
        printf("records sent: %s, quantity sent: %s\n",
               meter_reply_hget(stats, "records_sent")
               ? meter_reply_hget(stats, "records_sent") : "0",
               meter_reply_hget(stats, "quantity_sent")
               ? meter_reply_hget(stats, "quantity_sent") : "0");
        meterctl_backlog(stats, 0);
        printf("drain lock: %s\n", lock > 0 ? "held" : "free");
        printf("last delinquency sync: %s%s%s\n",
               sync_last[0] ? sync_last : "never",
               sync_err != NULL ? ", failed: " : "",
               sync_err != NULL ? sync_err : "");
        if (sync_ok[0] != '\0' && strcmp(sync_ok, sync_last) != 0) {
            printf("last successful sync: %s\n", sync_ok);
        }
    }

    freeReplyObject(stats);
    freeReplyObject(sync);

    /* plans published for nginx (mtr:gov:quota): CUSTOMER and C|METER */
    plans = meter_redis_cmd(r, "HKEYS " MTR_GOV_QUOTA);
    if (!meter_reply_ok(plans) || plans->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(nocust);
        return meterctl_redis_failed(r, plans);
    }

    nplans = 0;
    nquotas = 0;

    for (i = 0; i < plans->elements; i++) {
        if (strchr(plans->element[i]->str, MTR_GOV_CREDIT_SEP) != NULL) {
            nquotas++;

        } else {
            nplans++;
        }
    }

    freeReplyObject(plans);

    if (o->json) {
        printf(",\"customers_with_plan\":%zu,\"quotas\":%zu", nplans,
               nquotas);

    } else {
        printf("plans published: %zu customer%s, %zu quota%s\n", nplans,
               nplans == 1 ? "" : "s", nquotas, nquotas == 1 ? "" : "s");
    }

    rc = meterctl_records(r, MTR_W_OPEN, o->json ? "open" : "open records",
                          o->json);
    if (rc == EX_OK) {
        rc = meterctl_records(r, MTR_W_DEAD,
                              o->json ? "dead" : "dead letters", o->json);
    }

    if (rc != EX_OK) {
        freeReplyObject(nocust);
        return rc;
    }

    /* Stripe: usage sent after its period's invoice was finalized
     * (providers/stripe.c, stripe.invoice_grace): how many, the latest 10 */
    late = 0;
    rp = meter_redis_cmd(r, "ZCARD " MTR_W_STRIPE_LATE);
    if (meter_reply_ok(rp)) {
        late = meter_reply_int(rp, 0);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "ZREVRANGE " MTR_W_STRIPE_LATE " 0 9");
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(nocust);
        return meterctl_redis_failed(r, rp);
    }

    if (o->json) {
        printf(",\"late_records\":%lld,\"late_latest\":[", late);
        for (i = 0; i < rp->elements; i++) {
            printf("%s\"%s\"", i ? "," : "", rp->element[i]->str);
        }
        printf("]");

    } else if (late > 0) {
        printf("warning: %lld record%s sent after the invoice of %s period "
               "was finalized (Stripe bills %s on no invoice); latest:\n",
               late, late == 1 ? "" : "s", late == 1 ? "its" : "their",
               late == 1 ? "it" : "them");
        for (i = 0; i < rp->elements; i++) {
            printf("  late %s\n", rp->element[i]->str);
        }
    }

    freeReplyObject(rp);

    if (o->json) {
        printf(",\"keys_without_customer\":[");
        for (i = 0; i < nocust->elements; i++) {
            printf("%s\"%s\"", i ? "," : "", nocust->element[i]->str);
        }
        printf("]}\n");

    } else {
        printf("keys without customer (usage held): %zu\n",
               nocust->elements);
        for (i = 0; i < nocust->elements; i++) {
            printf("  %s\n", nocust->element[i]->str);
        }
    }

    freeReplyObject(nocust);

    return EX_OK;
}


int
meterctl_status_cmd(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl status: unexpected argument \"%s\"\n",
                o->args[0]);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);

    return rc != EX_OK ? rc : meterctl_status(o, r);
}
