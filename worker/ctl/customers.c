
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl customers list|show|add.
 */


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


int
meterctl_customers_list(meterctl_opts_t *o, meter_redis_t *r)
{
    char         key[96];
    size_t       i;
    int          rc;
    long long    nkeys;
    cJSON       *arr, *c;
    redisReply  *ids, *cust, *rp;
    const char  *id, *status, *reason;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl customers list: unexpected argument "
                "\"%s\"\n", o->args[0]);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    ids = meterctl_sorted_set(r, MTR_CUSTOMERS, &rc);
    if (ids == NULL) {
        return rc;
    }

    arr = cJSON_CreateArray();

    if (!o->json) {
        printf("%-24s  %-10s  %-16s  %-9s  %-12s  %4s  %s\n", "CUSTOMER",
               "STATUS", "REASON", "PROVIDER", "PLAN", "KEYS", "EMAIL");
    }

    for (i = 0; i < ids->elements; i++) {
        id = ids->element[i]->str;

        cust = meter_redis_cmd(r, "HGETALL " MTR_CUST_FMT, id);
        if (!meter_reply_ok(cust)) {
            cJSON_Delete(arr);
            freeReplyObject(ids);
            return meterctl_redis_failed(r, cust);
        }

        snprintf(key, sizeof(key), MTR_CKEYS_FMT, id);
        rp = meter_redis_cmd(r, "SCARD %s", key);
        nkeys = meter_reply_int(rp, 0);
        freeReplyObject(rp);

        status = meter_reply_hget(cust, "status");
        reason = meter_reply_hget(cust, "reason");
        if (status == NULL) {
            status = "active";
        }

        if (strcmp(status, "delinquent") != 0) {
            reason = NULL;
        }

        if (o->json) {
            c = cJSON_CreateObject();
            cJSON_AddStringToObject(c, "customer", id);
            cJSON_AddStringToObject(c, "status", status);
            meterctl_json_str(c, "reason", reason);
            meterctl_json_str(c, "source", meter_reply_hget(cust, "source"));
            meterctl_json_str(c, "provider",
                              meter_reply_hget(cust, "provider"));
            meterctl_json_str(c, "email", meter_reply_hget(cust, "email"));
            meterctl_json_str(c, "plan", meter_reply_hget(cust, "plan"));
            meterctl_json_int(c, "keys", nkeys);
            cJSON_AddItemToArray(arr, c);

        } else {
            printf("%-24s  %-10s  %-16s  %-9s  %-12s  %4lld  %s\n", id,
                   status, reason ? reason : "-",
                   meter_reply_hget(cust, "provider")
                   ? meter_reply_hget(cust, "provider") : "-",
                   meter_reply_hget(cust, MTR_CUST_PLAN)
                   ? meter_reply_hget(cust, MTR_CUST_PLAN) : "-",
                   nkeys,
                   meter_reply_hget(cust, "email")
                   ? meter_reply_hget(cust, "email") : "-");
        }

        freeReplyObject(cust);
    }

    if (o->json) {
        meterctl_json_print(arr);
    }

    cJSON_Delete(arr);
    freeReplyObject(ids);

    return EX_OK;
}


int
meterctl_customers_show(meterctl_opts_t *o, meter_redis_t *r)
{
    char          when[32], label[96];
    size_t        i, j;
    int           rc;
    cJSON        *out, *keys, *credit, *quota;
    redisReply   *cust, *kh, *key;
    const char   *id, *f, *status;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl customers show: expected one customer "
                "id\n");
        return EX_USAGE;
    }

    id = o->args[0];

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl customers show: invalid customer id "
                "\"%s\" ([A-Za-z0-9_.-]{1,64})\n", id);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "customers show", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    cust = meter_redis_cmd(r, "HGETALL " MTR_CUST_FMT, id);
    if (!meter_reply_ok(cust) || cust->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, cust);
    }

    snprintf(label, sizeof(label), MTR_CKEYS_FMT, id);
    kh = meterctl_sorted_set(r, label, &rc);

    if (kh == NULL) {
        freeReplyObject(cust);
        return rc;
    }

    status = meter_reply_hget(cust, "status");
    if (status == NULL) {
        status = "active";
    }

    out = cJSON_CreateObject();
    keys = cJSON_CreateArray();
    credit = cJSON_CreateArray();
    quota = NULL;

    if (o->json) {
        cJSON_AddStringToObject(out, "customer", id);

        for (j = 0; j + 1 < cust->elements; j += 2) {
            f = cust->element[j]->str;

            if (strcmp(f, "created") == 0 || strcmp(f, "since") == 0
                || strcmp(f, "status_at") == 0)
            {
                meterctl_json_int(out, f,
                                  strtoll(cust->element[j + 1]->str, NULL,
                                          10));

            } else if (cJSON_GetObjectItemCaseSensitive(out, f) == NULL) {
                cJSON_AddStringToObject(out, f, cust->element[j + 1]->str);
            }
        }

        if (cJSON_GetObjectItemCaseSensitive(out, "status") == NULL) {
            cJSON_AddStringToObject(out, "status", "active");
        }

    } else {
        printf("%-18s %s\n", "customer:", id);
        printf("%-18s %s", "status:", status);
        if (strcmp(status, "delinquent") == 0) {
            meterctl_time(meter_reply_hget(cust, "since"), when,
                          sizeof(when));
            printf(" (%s, since %s, set by %s)",
                   meter_reply_hget(cust, "reason")
                   ? meter_reply_hget(cust, "reason") : "?", when,
                   meter_reply_hget(cust, "source")
                   ? meter_reply_hget(cust, "source") : "?");
        }
        printf("\n");

        for (j = 0; j + 1 < cust->elements; j += 2) {
            f = cust->element[j]->str;

            if (strcmp(f, "status") == 0 || strcmp(f, "reason") == 0
                || strcmp(f, "since") == 0 || strcmp(f, "source") == 0)
            {
                continue;
            }

            if (strcmp(f, "created") == 0 || strcmp(f, "status_at") == 0) {
                meterctl_time(cust->element[j + 1]->str, when, sizeof(when));
                snprintf(label, sizeof(label), "%s:", f);
                printf("%-18s %s\n", label, when);
                continue;
            }

            snprintf(label, sizeof(label), "%s:", f);
            printf("%-18s %s\n", label, cust->element[j + 1]->str);
        }

        printf("keys: %zu\n", kh->elements);
        if (kh->elements > 0) {
            printf("  %-64s  %-12s  %-20s  %s\n", "KEY_HASH", "PREFIX",
                   "CREATED", "REVOKED");
        }
    }

    for (i = 0; i < kh->elements; i++) {
        key = meter_redis_cmd(r, "HGETALL " MTR_KEY_FMT, kh->element[i]->str);
        if (!meter_reply_ok(key)) {
            cJSON_Delete(out);
            cJSON_Delete(keys);
            cJSON_Delete(credit);
            freeReplyObject(kh);
            freeReplyObject(cust);
            return meterctl_redis_failed(r, key);
        }

        meterctl_key_row(o->json ? keys : NULL, "  ", kh->element[i]->str,
                         key);

        freeReplyObject(key);
    }

    freeReplyObject(kh);
    freeReplyObject(cust);

    if (!o->json) {
        printf("credit:\n");
    }

    rc = meterctl_credit_rows(r, "customers show", id, NULL,
                              o->json ? credit : NULL, !o->json);

    if (rc == EX_OK) {
        if (!o->json) {
            printf("quota:\n");
        }

        quota = cJSON_CreateArray();
        rc = meterctl_quota_rows(r, id, o->json ? quota : NULL, !o->json);
    }

    if (rc == EX_OK && o->json) {
        cJSON_AddItemToObject(out, "keys", keys);
        cJSON_AddItemToObject(out, "credit", credit);
        cJSON_AddItemToObject(out, "quota", quota);
        keys = NULL;
        credit = NULL;
        quota = NULL;
        meterctl_json_print(out);
    }

    cJSON_Delete(keys);
    cJSON_Delete(credit);
    cJSON_Delete(quota);
    cJSON_Delete(out);

    return rc;
}


int
meterctl_customers_add(meterctl_opts_t *o, meter_redis_t *r)
{
    const char  *argv[64];
    size_t       argl[64];
    char         now[24], item[16][64], key[96], err[512];
    const char  *id, *eq;
    int          argc, i, rc;
    redisReply  *rp;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl customers add: expected one customer id\n");
        return EX_USAGE;
    }

    id = o->args[0];

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl customers add: invalid customer id \"%s\" "
                "([A-Za-z0-9_.-]{1,64})\n", id);
        return EX_DATAERR;
    }

    if (o->provider != NULL
        && strcmp(o->provider, "file") != 0
        && strcmp(o->provider, "stripe") != 0
        && strcmp(o->provider, "chargebee") != 0
        && strcmp(o->provider, "recurly") != 0
        && strcmp(o->provider, "http") != 0
        && strcmp(o->provider, "metronome") != 0)
    {
        fprintf(stderr, "meterctl customers add: unknown --provider \"%s\" "
                "(file, stripe, chargebee, recurly, http, metronome)\n",
                o->provider);
        return EX_USAGE;
    }

    if ((o->email != NULL && !meterctl_valid_email(o->email))
        || (o->name != NULL && !meterctl_valid_text(o->name, 200))
        || (o->plan != NULL && !meterctl_valid_text(o->plan, 64))
        || (o->provider_customer != NULL
            && !meterctl_valid_text(o->provider_customer, 127))
        || (o->subscription != NULL
            && !meterctl_valid_text(o->subscription, 127)))
    {
        fprintf(stderr, "meterctl customers add: invalid --email, --name, "
                "--plan, --provider-customer or --subscription (empty, too "
                "long or control characters)\n");
        return EX_USAGE;
    }

    for (i = 0; i < o->nitems; i++) {
        eq = strchr(o->items[i], '=');
        snprintf(item[i], sizeof(item[i]), "%.*s", (int) (eq - o->items[i]),
                 o->items[i]);
        if (!meterctl_valid_meter(item[i])) {
            fprintf(stderr, "meterctl customers add: invalid meter in "
                    "--item \"%s\"\n", o->items[i]);
            return EX_USAGE;
        }
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    snprintf(key, sizeof(key), MTR_CUST_FMT, id);

    /* Lago requires external_subscription_id (getlago/lago-openapi
     * src/schemas/EventInputObject.yaml): no fallback to another id */
    if (o->subscription == NULL && o->cf != NULL
        && strcmp(o->cf->provider, "http") == 0
        && (o->provider == NULL || strcmp(o->provider, "http") == 0)
        && meter_conf_get(o->cf, "http.format") != NULL
        && strcmp(meter_conf_get(o->cf, "http.format"), "lago") == 0)
    {
        rp = meter_redis_cmd(r, "HEXISTS %s subscription", key);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        if (meter_reply_int(rp, 0) == 0) {
            freeReplyObject(rp);
            fprintf(stderr, "meterctl customers add: Lago requires a "
                    "subscription (external_subscription_id): give "
                    "--subscription ID\n");
            return EX_USAGE;
        }

        freeReplyObject(rp);
    }

    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));

    argc = 0;

#define meterctl_arg(s)                                                      \
    do {                                                                     \
        argv[argc] = (s);                                                    \
        argl[argc] = strlen(s);                                              \
        argc++;                                                              \
    } while (0)

    snprintf(key, sizeof(key), MTR_CUST_FMT, id);

    /* status (delinquency) and created of an existing customer stay */
    rp = meter_redis_cmd(r, "HSETNX %s status active", key);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "HSETNX %s created %s", key, now);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    meterctl_arg("HSET");
    meterctl_arg(key);
    meterctl_arg("provider");
    meterctl_arg(o->provider != NULL ? o->provider : "file");

    if (o->provider_customer != NULL) {
        meterctl_arg("provider_customer");
        meterctl_arg(o->provider_customer);
    }

    if (o->subscription != NULL) {
        meterctl_arg("subscription");
        meterctl_arg(o->subscription);
    }

    if (o->email != NULL) {
        meterctl_arg("email");
        meterctl_arg(o->email);
    }

    if (o->name != NULL) {
        meterctl_arg("name");
        meterctl_arg(o->name);
    }

    if (o->plan != NULL) {
        meterctl_arg("plan");
        meterctl_arg(o->plan);
    }

    for (i = 0; i < o->nitems; i++) {
        eq = strchr(o->items[i], '=');
        snprintf(item[i], sizeof(item[i]), MTR_CUST_ITEM "%.*s",
                 (int) (eq - o->items[i]), o->items[i]);
        meterctl_arg(item[i]);
        meterctl_arg(eq + 1);
    }

#undef meterctl_arg

    rp = meter_redis_argv(r, argc, argv, argl);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "SADD " MTR_CUSTOMERS " %s", id);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (o->provider_customer != NULL) {
        rp = meter_redis_cmd(r, "HSET " MTR_BYPC " %s %s", o->provider_customer,
                             id);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    if (o->subscription != NULL) {
        rp = meter_redis_cmd(r, "HSET " MTR_BYSUB " %s %s", o->subscription,
                             id);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    if (meter_gov_project(r, id, err, sizeof(err)) != 0) {
        return meterctl_gov_failed("customers add", err);
    }

    printf("customer %s saved\n", id);

    return EX_OK;
}
