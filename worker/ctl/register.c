
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


/* a registration in the making: what each step reads and leaves */
typedef struct {
    char                     id[72];
    char                     email[256];
    char                     now[24];
    char                     reg[96];       /* mtr:reg:{ID} */
    char                     cust[96];      /* mtr:cust:{ID} */
    char                     kh[65];
    char                     prefix[13];
    char                     key[METERCTL_KEY_LEN + 1];
    char                     item[8][48];   /* "item.METER" of ob */
    const char              *pname;
    const char              *plan;
    const char              *pc;            /* provider customer, or NULL */
    const char              *sub;           /* subscription, or NULL */
    redisReply              *rg;            /* HGETALL mtr:reg:{ID} */
    meter_provider_t         p;
    meter_onboard_result_t   ob;
} meterctl_reg_t;


/*
 * Checks and frees a reply of a register step: EX_OK, or the exit code
 * after a message.  Before the provider was called (customer NULL) a Redis
 * failure is plain; after it, the registration is incomplete.
 */
static int
meterctl_reg_reply(meter_redis_t *r, redisReply *rp, const char *customer)
{
    if (!meter_reply_ok(rp)) {
        return customer != NULL ? meterctl_reg_failed(r, rp, customer)
                                : meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    return EX_OK;
}


/* the command line: customer id, email, plan, provider; no Redis yet */
static int
meterctl_reg_args(meterctl_opts_t *o, meterctl_reg_t *g)
{
    size_t  i;

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

    for (i = 0; i < sizeof(g->email) - 1 && o->email[i] != '\0'; i++) {
        g->email[i] = (char) tolower((unsigned char) o->email[i]);
    }

    g->email[i] = '\0';

    if (o->customer != NULL) {
        snprintf(g->id, sizeof(g->id), "%s", o->customer);

    } else {
        meterctl_customer_of_email(g->email, g->id, sizeof(g->id));
    }

    g->plan = o->plan != NULL ? o->plan : "default";
    g->pname = (o->cf != NULL) ? o->cf->provider : "file";

    if (meter_provider_by_name(g->pname, &g->p) != 0) {
        fprintf(stderr, "meterctl register: unknown provider \"%s\" in %s\n",
                g->pname, o->cf != NULL ? o->cf->path : "the config");
        return EX_CONFIG;
    }

    if (strcmp(g->pname, "file") != 0 && g->p.onboard == NULL) {
        fprintf(stderr, "meterctl register: provider \"%s\" does not support "
                "registration yet.  Create the customer and its subscription "
                "in %s, then run \"meterctl customers add ID --provider %s "
                "--provider-customer ID --subscription ID\" and \"meterctl "
                "keys add\".\n", g->pname, g->pname, g->pname);
        return EX_UNAVAILABLE;
    }

    snprintf(g->reg, sizeof(g->reg), MTR_REG_FMT, g->id);
    snprintf(g->cust, sizeof(g->cust), MTR_CUST_FMT, g->id);
    snprintf(g->now, sizeof(g->now), "%lld", (long long) time(NULL));

    return EX_OK;
}


/*
 * The registration so far (g->rg) and whether it may go on: not a customer
 * made by other means, the same email and provider, no key issued yet.
 */
static int
meterctl_reg_load(meter_redis_t *r, meterctl_reg_t *g)
{
    char         when[32], err[1024];
    int          n, exists;
    redisReply  *rp;
    const char  *v;

    g->rg = meter_redis_cmd(r, "HGETALL %s", g->reg);
    if (!meter_reply_ok(g->rg) || g->rg->type != REDIS_REPLY_ARRAY) {
        rp = g->rg;
        g->rg = NULL;
        return meterctl_redis_failed(r, rp);
    }

    rp = meter_redis_cmd(r, "EXISTS %s", g->cust);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    exists = (meter_reply_int(rp, 0) == 1);
    freeReplyObject(rp);

    if (g->rg->elements == 0 && exists) {
        fprintf(stderr, "meterctl register: customer %s already exists and "
                "was not created by \"register\"; give it a key with "
                "\"meterctl keys add KEY --customer %s\"\n", g->id, g->id);
        return EX_DATAERR;
    }

    v = meter_reply_hget(g->rg, "email");
    if (v != NULL && strcmp(v, g->email) != 0) {
        fprintf(stderr, "meterctl register: customer id %s is already being "
                "registered for another email; choose another --customer\n",
                g->id);
        return EX_DATAERR;
    }

    v = meter_reply_hget(g->rg, "provider");
    if (v != NULL && strcmp(v, g->pname) != 0) {
        fprintf(stderr, "meterctl register: customer %s was started with "
                "provider \"%s\", the config now says \"%s\"; finish it with "
                "the old config or choose another --customer\n", g->id, v,
                g->pname);
        return EX_DATAERR;
    }

    /*
     * A key hash in the registration: if the key reached mtr:ckeys, it may
     * have been printed and is never shown again; if not, the earlier run
     * stopped before printing it, and it is replaced below.
     */
    v = meter_reply_hget(g->rg, "key_hash");
    if (v == NULL) {
        return EX_OK;
    }

    rp = meter_redis_cmd(r, "SISMEMBER " MTR_CKEYS_FMT " %s", g->id, v);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    n = (int) meter_reply_int(rp, 0);
    freeReplyObject(rp);

    rp = meter_redis_cmd(r, n == 1 ? "HGETALL " MTR_KEY_FMT
                                   : "DEL " MTR_KEY_FMT, v);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    if (n != 1) {
        freeReplyObject(rp);
        return EX_OK;
    }

    meterctl_time(meter_reply_hget(rp, "created"), when, sizeof(when));
    fprintf(stderr, "meterctl register: %s is already registered as "
            "customer %s; its key %s... was issued at %s and is "
            "never shown again.  If it was lost (an earlier run "
            "stopped before printing it), issue a new one with "
            "\"meterctl keys rotate %s\"\n", g->email, g->id,
            meter_reply_hget(rp, "prefix")
            ? meter_reply_hget(rp, "prefix") : "?", when, v);
    freeReplyObject(rp);

    /* finish what the earlier run may have left */
    freeReplyObject(meter_redis_cmd(r, "HSET %s state done", g->reg));

    if (meter_gov_project(r, g->id, err, sizeof(err)) != 0) {
        return meterctl_gov_failed("register", err);
    }

    return EX_DATAERR;
}


/* 1. the pending registration: what a retry continues from */
static int
meterctl_reg_pending(meterctl_opts_t *o, meter_redis_t *r, meterctl_reg_t *g)
{
    int          n;
    const char  *fv[12];

    if (g->rg->elements != 0) {
        return EX_OK;
    }

    n = 0;
    fv[n++] = "state"; fv[n++] = "pending";
    fv[n++] = "email"; fv[n++] = g->email;
    fv[n++] = "name"; fv[n++] = o->name;
    fv[n++] = "plan"; fv[n++] = g->plan;
    fv[n++] = "provider"; fv[n++] = g->pname;
    fv[n++] = "created"; fv[n++] = g->now;

    return meterctl_reg_reply(r, meterctl_hset(r, g->reg, fv, n), NULL);
}


/* 2. the provider's customer and subscription, unless made before */
static int
meterctl_reg_onboard(meterctl_opts_t *o, meter_redis_t *r, meterctl_reg_t *g)
{
    char                  err[1024];
    const char           *fv[24];
    size_t                i;
    int                   n;
    meter_onboard_t       in;
    meter_send_e          st;
    meter_send_result_t   res;

    g->pc = meter_reply_hget(g->rg, "provider_customer");
    g->sub = meter_reply_hget(g->rg, "subscription");

    if (g->sub != NULL || strcmp(g->pname, "file") == 0) {
        return EX_OK;
    }

    if (g->p.init != NULL && g->p.init(&g->p, o->cf, err, sizeof(err)) != 0)
    {
        fprintf(stderr, "meterctl register: provider %s: %s\n", g->pname,
                err);
        return EX_CONFIG;
    }

    in.customer = g->id;
    in.email = g->email;
    in.name = o->name;
    in.plan = g->plan;

    memset(&res, 0, sizeof(meter_send_result_t));
    st = g->p.onboard(&g->p, &in, &g->ob, &res);

    if (g->p.cleanup != NULL) {
        g->p.cleanup(&g->p);
    }

    if (st != METER_SEND_OK || g->ob.provider_customer[0] == '\0'
        || g->ob.subscription[0] == '\0')
    {
        fprintf(stderr, "meterctl register: provider %s: %s\n", g->pname,
                st == METER_SEND_OK ? "no customer or subscription id "
                "in the answer" : res.error);
        fprintf(stderr, "meterctl register: customer %s is not "
                "registered yet; %s\n", g->id,
                st == METER_SEND_FATAL
                ? "fix the cause above, then run the same command again "
                  "(it continues where it stopped)"
                : "run the same command again to complete it (nothing is "
                  "created twice)");
        return st == METER_SEND_FATAL ? EX_UNAVAILABLE : EX_TEMPFAIL;
    }

    n = 0;
    fv[n++] = "provider_customer"; fv[n++] = g->ob.provider_customer;
    fv[n++] = "subscription"; fv[n++] = g->ob.subscription;

    for (i = 0; i < (size_t) g->ob.nitems && i < 8; i++) {
        snprintf(g->item[i], sizeof(g->item[i]), MTR_CUST_ITEM_FMT,
                 g->ob.item_meter[i]);
        fv[n++] = g->item[i];
        fv[n++] = g->ob.item_id[i];
    }

    fv[n++] = "state"; fv[n++] = "provisioned";

    g->pc = g->ob.provider_customer;
    g->sub = g->ob.subscription;

    return meterctl_reg_reply(r, meterctl_hset(r, g->reg, fv, n), g->id);
}


/* 3. our customer record, from the registration */
static int
meterctl_reg_customer(meterctl_opts_t *o, meter_redis_t *r, meterctl_reg_t *g)
{
    const char  *fv[48];
    size_t       i;
    int          n, rc;

    rc = meterctl_reg_reply(r, meter_redis_cmd(r, "HSETNX %s status active",
                                               g->cust), g->id);
    if (rc == EX_OK) {
        rc = meterctl_reg_reply(r, meter_redis_cmd(r, "HSETNX %s created %s",
                                                   g->cust, g->now), g->id);
    }

    if (rc != EX_OK) {
        return rc;
    }

    n = 0;
    fv[n++] = "email"; fv[n++] = g->email;
    fv[n++] = "name"; fv[n++] = o->name;
    fv[n++] = "plan"; fv[n++] = g->plan;
    fv[n++] = "provider"; fv[n++] = g->pname;
    fv[n++] = "provider_customer"; fv[n++] = g->pc;
    fv[n++] = "subscription"; fv[n++] = g->sub;

    for (i = 0; i + 1 < g->rg->elements && n + 2 <= 46; i += 2) {
        if (strncmp(g->rg->element[i]->str, MTR_CUST_ITEM,
                    sizeof(MTR_CUST_ITEM) - 1)
            == 0)
        {
            fv[n++] = g->rg->element[i]->str;
            fv[n++] = g->rg->element[i + 1]->str;
        }
    }

    for (i = 0; i < (size_t) g->ob.nitems && i < 8 && n + 2 <= 46; i++) {
        fv[n++] = g->item[i];
        fv[n++] = g->ob.item_id[i];
    }

    rc = meterctl_reg_reply(r, meterctl_hset(r, g->cust, fv, n), g->id);

    if (rc == EX_OK) {
        rc = meterctl_reg_reply(r, meter_redis_cmd(r, "SADD " MTR_CUSTOMERS
                                                   " %s", g->id), g->id);
    }

    if (rc == EX_OK && g->pc != NULL) {
        rc = meterctl_reg_reply(r, meter_redis_cmd(r, "HSET " MTR_BYPC
                                                   " %s %s", g->pc, g->id),
                                g->id);
    }

    if (rc == EX_OK && g->sub != NULL) {
        rc = meterctl_reg_reply(r, meter_redis_cmd(r, "HSET " MTR_BYSUB
                                                   " %s %s", g->sub, g->id),
                                g->id);
    }

    return rc;
}


/* 4. the key, last: made only now, stored as its hash, shown once */
static int
meterctl_reg_key(meter_redis_t *r, meterctl_reg_t *g)
{
    int  rc;

    if (meterctl_key_new(g->key) != 0) {
        fprintf(stderr, "meterctl register: the OpenSSL random generator "
                "failed; run the same command again\n");
        return EX_OSERR;
    }

    meter_sha256_hex(g->key, strlen(g->key), g->kh);

    rc = meterctl_reg_reply(r, meter_redis_cmd(r, "HSET %s key_hash %s "
                                               "state keyed", g->reg, g->kh),
                            g->id);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_key_store(r, "register", g->id, g->key, g->kh, g->prefix);
    if (rc != EX_OK) {
        /* the key hash in mtr:reg without mtr:key: a retry makes a new key */
        fprintf(stderr, "meterctl register: run the same command again to "
                "complete the registration of customer %s\n", g->id);
        return rc == EX_UNAVAILABLE ? EX_TEMPFAIL : rc;
    }

    freeReplyObject(meter_redis_cmd(r, "HSET %s state done", g->reg));

    return EX_OK;
}


static void
meterctl_reg_print(meterctl_opts_t *o, meterctl_reg_t *g)
{
    cJSON  *out;

    if (o->json) {
        out = cJSON_CreateObject();
        cJSON_AddStringToObject(out, "customer", g->id);
        cJSON_AddStringToObject(out, "email", g->email);
        cJSON_AddStringToObject(out, "provider", g->pname);
        meterctl_json_str(out, "provider_customer", g->pc);
        meterctl_json_str(out, "subscription", g->sub);
        cJSON_AddStringToObject(out, "key", g->key);
        cJSON_AddStringToObject(out, "key_hash", g->kh);
        cJSON_AddStringToObject(out, "prefix", g->prefix);
        meterctl_json_print(out);
        cJSON_Delete(out);

    } else {
        printf("customer %s registered (%s, provider %s%s%s%s%s)\n", g->id,
               g->email, g->pname, g->pc ? ", " : "", g->pc ? g->pc : "",
               g->sub ? ", " : "", g->sub ? g->sub : "");
        printf("API key (shown once, store it now):\n%s\n", g->key);
    }
}


int
meterctl_register(meterctl_opts_t *o, meter_redis_t *r)
{
    int             rc;
    meterctl_reg_t  g;

    memset(&g, 0, sizeof(meterctl_reg_t));

    rc = meterctl_reg_args(o, &g);

    if (rc == EX_OK) {
        rc = meterctl_open(o, r);
    }

    if (rc == EX_OK) {
        rc = meterctl_reg_load(r, &g);
    }

    if (rc == EX_OK) {
        rc = meterctl_reg_pending(o, r, &g);
    }

    if (rc == EX_OK) {
        rc = meterctl_reg_onboard(o, r, &g);
    }

    if (rc == EX_OK) {
        rc = meterctl_reg_customer(o, r, &g);
    }

    if (rc == EX_OK) {
        rc = meterctl_reg_key(r, &g);
    }

    if (rc == EX_OK) {
        meterctl_reg_print(o, &g);
    }

    /* the one way out: the key never outlives the command */
    explicit_bzero(g.key, sizeof(g.key));
    freeReplyObject(g.rg);

    return rc;
}
