
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl register: the provider's customer and subscription, our
 * customer record, then the key, each step recorded in mtr:reg:{ID} so that
 * running the same command again continues where it stopped.
 */


#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "gov.h"
#include "meterctl.h"
#include "meter_schema.h"
#include "provider.h"
#include "util.h"


/* our customer id of an email: "c_" and 20 hex chars of its SHA-256, so
 * that running register again finds the same customer */
void
meterctl_customer_of_email(const char *email, char *out, size_t size)
{
    char    low[256], hex[65];
    size_t  i, n;

    n = strlen(email);
    if (n >= sizeof(low)) {
        n = sizeof(low) - 1;
    }

    for (i = 0; i < n; i++) {
        low[i] = (char) tolower((unsigned char) email[i]);
    }

    low[n] = '\0';
    meter_sha256_hex(low, n, hex);
    snprintf(out, size, "c_%.20s", hex);
}


static int
meterctl_reg_failed(meter_redis_t *r, redisReply *rp, const char *customer)
{
    meterctl_redis_failed(r, rp);
    fprintf(stderr, "meterctl register: the registration of customer %s is "
            "incomplete; run the same command again to complete it\n",
            customer);

    return EX_TEMPFAIL;
}


/* HSET of field/value pairs (NULL values skipped); a reply or NULL */
static redisReply *
meterctl_hset(meter_redis_t *r, const char *key, const char **fv, int n)
{
    const char  *argv[48];
    size_t       argl[48];
    int          argc, i;

    argc = 0;
    argv[argc] = "HSET";
    argl[argc++] = 4;
    argv[argc] = key;
    argl[argc++] = strlen(key);

    for (i = 0; i + 1 < n && argc + 2 <= 48; i += 2) {
        if (fv[i + 1] == NULL || fv[i + 1][0] == '\0') {
            continue;
        }

        argv[argc] = fv[i];
        argl[argc++] = strlen(fv[i]);
        argv[argc] = fv[i + 1];
        argl[argc++] = strlen(fv[i + 1]);
    }

    if (argc == 2) {
        return meter_redis_cmd(r, "EXISTS %s", key);
    }

    return meter_redis_argv(r, argc, argv, argl);
}


int
meterctl_register(meterctl_opts_t *o, meter_redis_t *r)
{
    char                     id[72], email[256], now[24], reg[96];
    char                     cust[96], kh[65], prefix[13], when[32];
    char                     key[METERCTL_KEY_LEN + 1], err[1024];
    char                     item[8][48];
    const char              *pname, *plan, *v, *fv[48];
    const char              *pc, *sub;
    size_t                   i;
    int                      rc, n, exists, onboarded;
    cJSON                   *out;
    redisReply              *rg, *rp;
    meter_provider_t         p;
    meter_onboard_t          in;
    meter_send_e             st;
    meter_send_result_t      res;
    meter_onboard_result_t   ob;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl register: unexpected argument \"%s\"\n",
                o->args[0]);
        return EX_USAGE;
    }

    if (o->email == NULL) {
        fprintf(stderr, "meterctl register: --email is required\n");
        return EX_USAGE;
    }

    if (!meterctl_valid_email(o->email)) {
        fprintf(stderr, "meterctl register: invalid --email \"%s\"\n",
                o->email);
        return EX_USAGE;
    }

    if ((o->name != NULL && !meterctl_valid_text(o->name, 200))
        || (o->plan != NULL && !meterctl_valid_text(o->plan, 64)))
    {
        fprintf(stderr, "meterctl register: invalid --name or --plan (empty, "
                "too long or control characters)\n");
        return EX_USAGE;
    }

    if (o->customer != NULL && !meterctl_valid_id(o->customer)) {
        fprintf(stderr, "meterctl register: invalid --customer \"%s\" "
                "([A-Za-z0-9_.-]{1,64})\n", o->customer);
        return EX_USAGE;
    }

    for (i = 0; i < sizeof(email) - 1 && o->email[i] != '\0'; i++) {
        email[i] = (char) tolower((unsigned char) o->email[i]);
    }

    email[i] = '\0';

    if (o->customer != NULL) {
        snprintf(id, sizeof(id), "%s", o->customer);

    } else {
        meterctl_customer_of_email(email, id, sizeof(id));
    }

    plan = o->plan != NULL ? o->plan : "default";
    pname = (o->cf != NULL) ? o->cf->provider : "file";

    memset(&p, 0, sizeof(meter_provider_t));

    if (meter_provider_by_name(pname, &p) != 0) {
        fprintf(stderr, "meterctl register: unknown provider \"%s\" in %s\n",
                pname, o->cf != NULL ? o->cf->path : "the config");
        return EX_CONFIG;
    }

    if (strcmp(pname, "file") != 0 && p.onboard == NULL) {
        fprintf(stderr, "meterctl register: provider \"%s\" does not support "
                "registration yet.  Create the customer and its subscription "
                "in %s, then run \"meterctl customers add ID --provider %s "
                "--provider-customer ID --subscription ID\" and \"meterctl "
                "keys add\".\n", pname, pname, pname);
        return EX_UNAVAILABLE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    snprintf(reg, sizeof(reg), "mtr:reg:{%s}", id);
    snprintf(cust, sizeof(cust), "mtr:cust:{%s}", id);
    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));

    rg = meter_redis_cmd(r, "HGETALL %s", reg);
    if (!meter_reply_ok(rg) || rg->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, rg);
    }

    rp = meter_redis_cmd(r, "EXISTS %s", cust);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_redis_failed(r, rp);
    }

    exists = (meter_reply_int(rp, 0) == 1);
    freeReplyObject(rp);

    if (rg->elements == 0 && exists) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: customer %s already exists and "
                "was not created by \"register\"; give it a key with "
                "\"meterctl keys add KEY --customer %s\"\n", id, id);
        return EX_DATAERR;
    }

    v = meter_reply_hget(rg, "email");
    if (v != NULL && strcmp(v, email) != 0) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: customer id %s is already being "
                "registered for another email; choose another --customer\n",
                id);
        return EX_DATAERR;
    }

    v = meter_reply_hget(rg, "provider");
    if (v != NULL && strcmp(v, pname) != 0) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: customer %s was started with "
                "provider \"%s\", the config now says \"%s\"; finish it with "
                "the old config or choose another --customer\n", id, v,
                pname);
        return EX_DATAERR;
    }

    /*
     * A key hash in the registration: if the key reached mtr:ckeys, it may
     * have been printed and is never shown again; if not, the earlier run
     * stopped before printing it, and it is replaced below.
     */
    v = meter_reply_hget(rg, "key_hash");
    if (v != NULL) {
        rp = meter_redis_cmd(r, "SISMEMBER mtr:ckeys:{%s} %s", id, v);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_redis_failed(r, rp);
        }

        n = (int) meter_reply_int(rp, 0);
        freeReplyObject(rp);

        rp = meter_redis_cmd(r, n == 1 ? "HGETALL mtr:key:{%s}"
                                       : "DEL mtr:key:{%s}", v);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_redis_failed(r, rp);
        }

        if (n == 1) {
            meterctl_time(meter_reply_hget(rp, "created"), when,
                          sizeof(when));
            fprintf(stderr, "meterctl register: %s is already registered as "
                    "customer %s; its key %s... was issued at %s and is "
                    "never shown again.  If it was lost (an earlier run "
                    "stopped before printing it), issue a new one with "
                    "\"meterctl keys rotate %s\"\n", email, id,
                    meter_reply_hget(rp, "prefix")
                    ? meter_reply_hget(rp, "prefix") : "?", when, v);
            freeReplyObject(rp);

            /* finish what the earlier run may have left */
            rp = meter_redis_cmd(r, "HSET %s state done", reg);
            freeReplyObject(rp);
            freeReplyObject(rg);

            if (meter_gov_project(r, id, err, sizeof(err)) != 0) {
                return meterctl_gov_failed("register", err);
            }

            return EX_DATAERR;
        }

        freeReplyObject(rp);
    }

    /* 1. the pending registration: what a retry continues from */
    if (rg->elements == 0) {
        n = 0;
        fv[n++] = "state"; fv[n++] = "pending";
        fv[n++] = "email"; fv[n++] = email;
        fv[n++] = "name"; fv[n++] = o->name;
        fv[n++] = "plan"; fv[n++] = plan;
        fv[n++] = "provider"; fv[n++] = pname;
        fv[n++] = "created"; fv[n++] = now;

        rp = meterctl_hset(r, reg, fv, n);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    /* 2. the provider's customer and subscription */
    memset(&ob, 0, sizeof(meter_onboard_result_t));
    pc = meter_reply_hget(rg, "provider_customer");
    sub = meter_reply_hget(rg, "subscription");
    onboarded = (sub != NULL || strcmp(pname, "file") == 0);

    if (!onboarded) {
        if (p.init != NULL && p.init(&p, o->cf, err, sizeof(err)) != 0) {
            freeReplyObject(rg);
            fprintf(stderr, "meterctl register: provider %s: %s\n", pname,
                    err);
            return EX_CONFIG;
        }

        in.customer = id;
        in.email = email;
        in.name = o->name;
        in.plan = plan;

        memset(&res, 0, sizeof(meter_send_result_t));
        st = p.onboard(&p, &in, &ob, &res);

        if (p.cleanup != NULL) {
            p.cleanup(&p);
        }

        if (st != METER_SEND_OK || ob.provider_customer[0] == '\0'
            || ob.subscription[0] == '\0')
        {
            freeReplyObject(rg);
            fprintf(stderr, "meterctl register: provider %s: %s\n", pname,
                    st == METER_SEND_OK ? "no customer or subscription id "
                    "in the answer" : res.error);
            fprintf(stderr, "meterctl register: customer %s is not "
                    "registered yet; %s\n", id,
                    st == METER_SEND_FATAL
                    ? "fix the cause above, then run the same command again "
                      "(it continues where it stopped)"
                    : "run the same command again to complete it (nothing is "
                      "created twice)");
            return st == METER_SEND_FATAL ? EX_UNAVAILABLE : EX_TEMPFAIL;
        }

        n = 0;
        fv[n++] = "provider_customer"; fv[n++] = ob.provider_customer;
        fv[n++] = "subscription"; fv[n++] = ob.subscription;

        for (i = 0; i < (size_t) ob.nitems && i < 8; i++) {
            snprintf(item[i], sizeof(item[i]), "item.%s", ob.item_meter[i]);
            fv[n++] = item[i];
            fv[n++] = ob.item_id[i];
        }

        fv[n++] = "state"; fv[n++] = "provisioned";

        rp = meterctl_hset(r, reg, fv, n);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_reg_failed(r, rp, id);
        }

        freeReplyObject(rp);

        pc = ob.provider_customer;
        sub = ob.subscription;
    }

    /* 3. our customer record, from the registration */
    rp = meter_redis_cmd(r, "HSETNX %s status active", cust);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "HSETNX %s created %s", cust, now);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    n = 0;
    fv[n++] = "email"; fv[n++] = email;
    fv[n++] = "name"; fv[n++] = o->name;
    fv[n++] = "plan"; fv[n++] = plan;
    fv[n++] = "provider"; fv[n++] = pname;
    fv[n++] = "provider_customer"; fv[n++] = pc;
    fv[n++] = "subscription"; fv[n++] = sub;

    for (i = 0; i + 1 < rg->elements && n + 2 <= 46; i += 2) {
        if (strncmp(rg->element[i]->str, "item.", 5) == 0) {
            fv[n++] = rg->element[i]->str;
            fv[n++] = rg->element[i + 1]->str;
        }
    }

    for (i = 0; i < (size_t) ob.nitems && i < 8 && n + 2 <= 46; i++) {
        fv[n++] = item[i];
        fv[n++] = ob.item_id[i];
    }

    rp = meterctl_hset(r, cust, fv, n);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "SADD mtr:customers %s", id);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    if (pc != NULL) {
        rp = meter_redis_cmd(r, "HSET mtr:bypc %s %s", pc, id);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_reg_failed(r, rp, id);
        }

        freeReplyObject(rp);
    }

    if (sub != NULL) {
        rp = meter_redis_cmd(r, "HSET mtr:bysub %s %s", sub, id);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_reg_failed(r, rp, id);
        }

        freeReplyObject(rp);
    }

    /* 4. the key, last: made only now, stored as its hash, shown once */
    if (meterctl_key_new(key) != 0) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: the OpenSSL random generator "
                "failed; run the same command again\n");
        return EX_OSERR;
    }

    meter_sha256_hex(key, strlen(key), kh);

    rp = meter_redis_cmd(r, "HSET %s key_hash %s state keyed", reg, kh);
    if (!meter_reply_ok(rp)) {
        memset(key, 0, sizeof(key));
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    rc = meterctl_key_store(r, "register", id, key, kh, prefix);
    if (rc != EX_OK) {
        /* the key hash in mtr:reg without mtr:key: a retry makes a new key */
        memset(key, 0, sizeof(key));
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: run the same command again to "
                "complete the registration of customer %s\n", id);
        return rc == EX_UNAVAILABLE ? EX_TEMPFAIL : rc;
    }

    rp = meter_redis_cmd(r, "HSET %s state done", reg);
    freeReplyObject(rp);

    if (o->json) {
        out = cJSON_CreateObject();
        cJSON_AddStringToObject(out, "customer", id);
        cJSON_AddStringToObject(out, "email", email);
        cJSON_AddStringToObject(out, "provider", pname);
        meterctl_json_str(out, "provider_customer", pc);
        meterctl_json_str(out, "subscription", sub);
        cJSON_AddStringToObject(out, "key", key);
        cJSON_AddStringToObject(out, "key_hash", kh);
        cJSON_AddStringToObject(out, "prefix", prefix);
        meterctl_json_print(out);
        cJSON_Delete(out);

    } else {
        printf("customer %s registered (%s, provider %s%s%s%s%s)\n", id,
               email, pname, pc ? ", " : "", pc ? pc : "",
               sub ? ", " : "", sub ? sub : "");
        printf("API key (shown once, store it now):\n%s\n", key);
    }

    memset(key, 0, sizeof(key));
    freeReplyObject(rg);

    return EX_OK;
}
