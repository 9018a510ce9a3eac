
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl plan set|clear|show|publish: a customer's plan and its quotas
 * ("plan.NAME.quota.METER = LIMIT/day|week|month" in the config of -c),
 * published into mtr:gov:quota through gov.c.
 */


#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "gov.h"
#include "meterctl.h"
#include "meter_schema.h"
#include "util.h"


static int
meterctl_plan_needs_config(meterctl_opts_t *o, const char *cmd)
{
    if (o->cf == NULL) {
        fprintf(stderr, "meterctl %s: the plans are in the worker config: "
                "give it with -c FILE\n", cmd);
        return 0;
    }

    return 1;
}


/* the quota rows of a customer (mtr:gov:quota): table or JSON; exit code */
int
meterctl_quota_rows(meter_redis_t *r, const char *customer, cJSON *arr,
    int table)
{
    char         reset[32], rs[32], err[512];
    size_t       i, cl;
    int          n;
    int64_t      used, left;
    long long    limit, window, until, allowance;
    cJSON       *c;
    redisReply  *rp;
    const char  *f, *m;

    rp = meter_redis_cmd(r, "HGETALL " MTR_GOV_QUOTA);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, rp);
    }

    cl = strlen(customer);
    n = 0;

    for (i = 0; i + 1 < rp->elements; i += 2) {
        f = rp->element[i]->str;

        if (strncmp(f, customer, cl) != 0 || f[cl] != MTR_GOV_CREDIT_SEP
            || sscanf(rp->element[i + 1]->str, "%lld\t%lld\t%lld\t%lld",
                      &limit, &window, &until, &allowance)
               != MTR_GOV_QUOTA_NFIELDS)
        {
            continue;
        }

        m = f + cl + 1;

        if (meter_gov_used(r, customer, m, &used, err, sizeof(err)) != 0) {
            freeReplyObject(rp);
            return meterctl_gov_failed("plan", err);
        }

        left = allowance - used;
        if (left < 0) {
            left = 0;
        }

        snprintf(rs, sizeof(rs), "%lld", until);
        meterctl_time(rs, reset, sizeof(reset));

        if (arr != NULL) {
            c = cJSON_CreateObject();
            cJSON_AddStringToObject(c, "meter", m);
            meterctl_json_int(c, "limit", limit);
            meterctl_json_int(c, "window", window);
            meterctl_json_int(c, "used", limit - left);
            meterctl_json_int(c, "remaining", left);
            meterctl_json_int(c, "reset", until);
            cJSON_AddItemToArray(arr, c);

        } else if (table) {
            if (n == 0) {
                printf("  %-16s  %12s  %12s  %12s  %s\n", "METER", "LIMIT",
                       "USED", "REMAINING", "RESET");
            }

            printf("  %-16s  %12lld  %12" PRId64 "  %12" PRId64 "  %s%s\n",
                   m, limit, (int64_t) (limit - left), left, reset,
                   left == 0 ? "  (over quota: 429)" : "");
        }

        n++;
    }

    freeReplyObject(rp);

    if (table && arr == NULL && n == 0) {
        printf("  none (no quota)\n");
    }

    return EX_OK;
}


int
meterctl_plan_set(meterctl_opts_t *o, meter_redis_t *r)
{
    char         err[1024];
    time_t       anchor;
    int          rc;
    const char  *id, *plan;

    if (o->nargs != 2) {
        fprintf(stderr, "meterctl plan set: expected CUSTOMER PLAN\n");
        return EX_USAGE;
    }

    id = o->args[0];
    plan = o->args[1];

    if (!meterctl_plan_needs_config(o, "plan set")) {
        return EX_USAGE;
    }

    if (!meter_quota_plan_known(o->cf, plan)) {
        fprintf(stderr, "meterctl plan set: no plan \"%s\" in %s (no "
                "\"plan.%s.*\" key)\n", plan, o->cf->path, plan);
        return EX_DATAERR;
    }

    anchor = -1;

    if (o->anchor != NULL) {
        anchor = (strcmp(o->anchor, "utc") == 0)
                 ? 0 : meter_iso8601_parse(o->anchor);

        if (anchor < 0) {
            fprintf(stderr, "meterctl plan set: invalid --anchor \"%s\" "
                    "(YYYY-MM-DDTHH:MM:SSZ, or utc)\n", o->anchor);
            return EX_USAGE;
        }
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "plan set", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    if (meter_gov_plan_set(r, o->cf, id, plan, anchor, err, sizeof(err))
        != 0)
    {
        return meterctl_gov_failed("plan set", err);
    }

    if (!o->json) {
        printf("customer %s: plan %s\n", id, plan);
        return meterctl_quota_rows(r, id, NULL, 1);
    }

    return EX_OK;
}


int
meterctl_plan_clear(meterctl_opts_t *o, meter_redis_t *r)
{
    char  err[1024];
    int   rc;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl plan clear: expected CUSTOMER\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "plan clear", o->args[0]);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    if (meter_gov_plan_set(r, o->cf, o->args[0], NULL, 0, err, sizeof(err))
        != 0)
    {
        return meterctl_gov_failed("plan clear", err);
    }

    if (!o->json) {
        printf("customer %s: no plan, no quota\n", o->args[0]);
    }

    return EX_OK;
}


int
meterctl_plan_show(meterctl_opts_t *o, meter_redis_t *r)
{
    int          rc;
    cJSON       *out, *arr;
    redisReply  *rp;
    const char  *plan, *anchor;
    char         at[32];

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl plan show: expected CUSTOMER\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "plan show", o->args[0]);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    rp = meter_redis_cmd(r, "HGETALL " MTR_CUST_FMT, o->args[0]);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    plan = meter_reply_hget(rp, MTR_CUST_PLAN);
    anchor = meter_reply_hget(rp, MTR_CUST_ANCHOR);

    if (o->json) {
        out = cJSON_CreateObject();
        arr = cJSON_CreateArray();
        cJSON_AddStringToObject(out, "customer", o->args[0]);
        meterctl_json_str(out, "plan", plan);

        if (anchor != NULL) {
            meterctl_json_int(out, "anchor", strtoll(anchor, NULL, 10));
        }

        freeReplyObject(rp);

        rc = meterctl_quota_rows(r, o->args[0], arr, 0);
        cJSON_AddItemToObject(out, "quota", arr);

        if (rc == EX_OK) {
            meterctl_json_print(out);
        }

        cJSON_Delete(out);

        return rc;
    }

    printf("%-18s %s\n", "customer:", o->args[0]);
    printf("%-18s %s\n", "plan:", plan ? plan : "-");

    if (anchor != NULL) {
        meterctl_time(anchor, at, sizeof(at));
    }

    printf("%-18s %s\n", "anchor:", anchor ? at : "utc");
    printf("quota:\n");

    freeReplyObject(rp);

    return meterctl_quota_rows(r, o->args[0], NULL, 1);
}


int
meterctl_plan_publish(meterctl_opts_t *o, meter_redis_t *r)
{
    char  err[1024];
    int   rc;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl plan publish: unexpected argument "
                "\"%s\"\n", o->args[0]);
        return EX_USAGE;
    }

    if (!meterctl_plan_needs_config(o, "plan publish")) {
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    if (meter_gov_quota_all(r, o->cf, time(NULL), NULL, err, sizeof(err))
        != 0)
    {
        return meterctl_gov_failed("plan publish", err);
    }

    return EX_OK;
}
