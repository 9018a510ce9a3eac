
/*
 * Copyright (C) nginx-meter authors
 *
 * The registration steps (register.h), moved here from meterctl so that
 * the portal's POST /register runs exactly the same ones, and the API key
 * itself: 160 bits from OpenSSL's CSPRNG, base32, stored only as its
 * SHA-256.
 */


#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <openssl/rand.h>

#include "gov.h"
#include "meter_schema.h"
#include "provider.h"
#include "register.h"
#include "util.h"


const char  meter_b32[] = "abcdefghijklmnopqrstuvwxyz234567";


/* base32 (RFC 4648 alphabet, lowercase, no padding) of n bytes; out holds
 * (n * 8 + 4) / 5 + 1 */
void
meter_base32(const unsigned char *in, size_t n, char *out)
{
    size_t    i, o;
    unsigned  bits, acc;

    o = 0;
    bits = 0;
    acc = 0;

    for (i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;

        while (bits >= 5) {
            out[o++] = meter_b32[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }

    if (bits > 0) {
        out[o++] = meter_b32[(acc << (5 - bits)) & 31];
    }

    out[o] = '\0';
}


int
meter_key_new(char *out)
{
    unsigned char  rnd[METER_KEY_BYTES];
    size_t         n;

    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        return -1;
    }

    n = sizeof(METER_KEY_PREFIX) - 1;
    memcpy(out, METER_KEY_PREFIX, n);
    meter_base32(rnd, sizeof(rnd), out + n);
    memset(rnd, 0, sizeof(rnd));

    return 0;
}


int
meter_key_store(meter_redis_t *r, const char *customer, const char *key,
    char *kh, char *prefix, char *err, size_t errlen)
{
    redisReply  *rp;

    meter_sha256_hex(key, strlen(key), kh);
    snprintf(prefix, 13, "%.12s", key);

    rp = meter_redis_cmd(r, "HSET " MTR_KEY_FMT " customer %s prefix %s "
                         "created %lld", kh, customer, prefix,
                         (long long) time(NULL));
    if (!meter_reply_ok(rp)) {
        return meter_reply_failed(r, rp, err, errlen);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "SADD " MTR_CKEYS_FMT " %s", customer, kh);
    if (!meter_reply_ok(rp)) {
        return meter_reply_failed(r, rp, err, errlen);
    }

    freeReplyObject(rp);

    return meter_gov_project(r, customer, err, errlen) != 0 ? -1 : 0;
}


void
meter_customer_of_email(const char *email, char *out, size_t size)
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


int
meter_valid_id(const char *s)
{
    size_t  n;

    n = strlen(s);

    return n >= 1 && n <= 64
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


int
meter_valid_meter(const char *s)
{
    size_t  n;

    n = strlen(s);

    return n >= 1 && n <= MTR_METER_MAX
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


int
meter_valid_email(const char *s)
{
    size_t       n, i;
    const char  *at;

    n = strlen(s);
    at = strchr(s, '@');

    if (n < 3 || n > 254 || at == NULL || at == s || at[1] == '\0'
        || strchr(at + 1, '@') != NULL)
    {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if ((unsigned char) s[i] <= ' ' || s[i] == 0x7f) {
            return 0;
        }
    }

    return 1;
}


/* free text stored in Redis and shown in tables: no control characters */
int
meter_valid_text(const char *s, size_t max)
{
    size_t  i, n;

    n = strlen(s);

    if (n == 0 || n > max) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if ((unsigned char) s[i] < ' ' || s[i] == 0x7f) {
            return 0;
        }
    }

    return 1;
}


/* HSET of field/value pairs (NULL values skipped); a reply or NULL */
static redisReply *
meter_reg_hset(meter_redis_t *r, const char *key, const char **fv, int n)
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
    const meter_conf_t      *cf;
    const meter_reg_in_t    *in;
    meter_reg_out_t         *out;
    char                     now[24];
    char                     reg[96];       /* mtr:reg:{ID} */
    char                     cust[96];      /* mtr:cust:{ID} */
    char                     item[8][48];   /* "item.METER" of ob */
    const char              *plan;
    const char              *pc;            /* provider customer, or NULL */
    const char              *sub;           /* subscription, or NULL */
    redisReply              *rg;            /* HGETALL mtr:reg:{ID} */
    meter_provider_t         p;
    meter_onboard_result_t   ob;
} meter_reg_t;


static int
meter_reg_stop(meter_reg_t *g, meter_reg_e kind, int rc, const char *fmt,
    ...) __attribute__((format(printf, 4, 5)));

static int
meter_reg_stop(meter_reg_t *g, meter_reg_e kind, int rc, const char *fmt,
    ...)
{
    va_list  ap;

    va_start(ap, fmt);
    vsnprintf(g->out->err, sizeof(g->out->err), fmt, ap);
    va_end(ap);

    g->out->kind = kind;

    return rc;
}


/*
 * A Redis failure of a step: before the provider was called (done 0) it
 * is plain, after it the registration is incomplete.
 */
static int
meter_reg_redis_failed(meter_reg_t *g, meter_redis_t *r, redisReply *rp,
    int done)
{
    char  e[512];

    meter_reply_failed(r, rp, e, sizeof(e));

    if (!done) {
        return meter_reg_stop(g, METER_REG_RETRY, EX_UNAVAILABLE, "%s", e);
    }

    return meter_reg_stop(g, METER_REG_RETRY, EX_TEMPFAIL, "%s; the "
                          "registration of customer %s is incomplete; run "
                          "the same command again to complete it", e,
                          g->out->id);
}


static int
meter_reg_reply(meter_reg_t *g, meter_redis_t *r, redisReply *rp, int done)
{
    if (!meter_reply_ok(rp)) {
        return meter_reg_redis_failed(g, r, rp, done);
    }

    freeReplyObject(rp);

    return EX_OK;
}


int
meter_reg_check(const meter_reg_in_t *in, char *err, size_t errlen)
{
    if (in->email == NULL || !meter_valid_email(in->email)) {
        snprintf(err, errlen, "invalid --email \"%s\"",
                 in->email ? in->email : "");
        return EX_USAGE;
    }

    if ((in->name != NULL && !meter_valid_text(in->name, 200))
        || (in->plan != NULL && !meter_valid_text(in->plan, 64)))
    {
        snprintf(err, errlen, "invalid --name or --plan (empty, too long or "
                 "control characters)");
        return EX_USAGE;
    }

    if (in->customer != NULL && !meter_valid_id(in->customer)) {
        snprintf(err, errlen, "invalid --customer \"%s\" "
                 "([A-Za-z0-9_.-]{1,64})", in->customer);
        return EX_USAGE;
    }

    return EX_OK;
}


/* the input: customer id, email, plan, provider; no Redis yet */
static int
meter_reg_args(meter_reg_t *g)
{
    size_t                 i;
    const meter_reg_in_t  *in;
    meter_reg_out_t       *out;

    in = g->in;
    out = g->out;

    if (meter_reg_check(in, out->err, sizeof(out->err)) != EX_OK) {
        out->kind = METER_REG_INVALID;
        return EX_USAGE;
    }

    for (i = 0; i < sizeof(out->email) - 1 && in->email[i] != '\0'; i++) {
        out->email[i] = (char) tolower((unsigned char) in->email[i]);
    }

    out->email[i] = '\0';

    if (in->customer != NULL) {
        snprintf(out->id, sizeof(out->id), "%s", in->customer);

    } else {
        meter_customer_of_email(out->email, out->id, sizeof(out->id));
    }

    g->plan = in->plan != NULL ? in->plan : "default";
    out->provider = (g->cf != NULL) ? g->cf->provider : "file";

    if (meter_provider_by_name(out->provider, &g->p) != 0) {
        return meter_reg_stop(g, METER_REG_FAILED, EX_CONFIG,
                              "unknown provider \"%s\" in %s", out->provider,
                              g->cf != NULL ? g->cf->path : "the config");
    }

    if (strcmp(out->provider, "file") != 0 && g->p.onboard == NULL) {
        return meter_reg_stop(g, METER_REG_FAILED, EX_UNAVAILABLE,
                              "provider \"%s\" does not support "
                              "registration yet.  Create the customer and "
                              "its subscription in %s, then run \"meterctl "
                              "customers add ID --provider %s "
                              "--provider-customer ID --subscription ID\" "
                              "and \"meterctl keys add\".", out->provider,
                              out->provider, out->provider);
    }

    snprintf(g->reg, sizeof(g->reg), MTR_REG_FMT, out->id);
    snprintf(g->cust, sizeof(g->cust), MTR_CUST_FMT, out->id);
    snprintf(g->now, sizeof(g->now), "%lld", (long long) time(NULL));

    return EX_OK;
}


/*
 * The registration so far (g->rg) and whether it may go on: not a customer
 * made by other means, the same email and provider, no key issued yet.
 */
static int
meter_reg_load(meter_redis_t *r, meter_reg_t *g)
{
    char         when[32], err[1024];
    int          n, exists;
    time_t       t;
    redisReply  *rp;
    const char  *v, *id;

    id = g->out->id;

    g->rg = meter_redis_cmd(r, "HGETALL %s", g->reg);
    if (!meter_reply_ok(g->rg) || g->rg->type != REDIS_REPLY_ARRAY) {
        rp = g->rg;
        g->rg = NULL;
        return meter_reg_redis_failed(g, r, rp, 0);
    }

    rp = meter_redis_cmd(r, "EXISTS %s", g->cust);
    if (!meter_reply_ok(rp)) {
        return meter_reg_redis_failed(g, r, rp, 0);
    }

    exists = (meter_reply_int(rp, 0) == 1);
    freeReplyObject(rp);

    if (g->rg->elements == 0 && exists) {
        return meter_reg_stop(g, METER_REG_CONFLICT, EX_DATAERR,
                              "customer %s already exists and was not "
                              "created by \"register\"; give it a key with "
                              "\"meterctl keys add KEY --customer %s\"", id,
                              id);
    }

    v = meter_reply_hget(g->rg, "email");
    if (v != NULL && strcmp(v, g->out->email) != 0) {
        return meter_reg_stop(g, METER_REG_CONFLICT, EX_DATAERR,
                              "customer id %s is already being registered "
                              "for another email; choose another --customer",
                              id);
    }

    v = meter_reply_hget(g->rg, "provider");
    if (v != NULL && strcmp(v, g->out->provider) != 0) {
        return meter_reg_stop(g, METER_REG_CONFLICT, EX_DATAERR,
                              "customer %s was started with provider "
                              "\"%s\", the config now says \"%s\"; finish it "
                              "with the old config or choose another "
                              "--customer", id, v, g->out->provider);
    }

    /*
     * A key hash in the registration: if the key reached mtr:ckeys, it may
     * have been shown and is never shown again; if not, the earlier run
     * stopped before showing it, and it is replaced below.
     */
    v = meter_reply_hget(g->rg, "key_hash");
    if (v == NULL) {
        return EX_OK;
    }

    rp = meter_redis_cmd(r, "SISMEMBER " MTR_CKEYS_FMT " %s", id, v);
    if (!meter_reply_ok(rp)) {
        return meter_reg_redis_failed(g, r, rp, 0);
    }

    n = (int) meter_reply_int(rp, 0);
    freeReplyObject(rp);

    rp = meter_redis_cmd(r, n == 1 ? "HGETALL " MTR_KEY_FMT
                                   : "DEL " MTR_KEY_FMT, v);
    if (!meter_reply_ok(rp)) {
        return meter_reg_redis_failed(g, r, rp, 0);
    }

    if (n != 1) {
        freeReplyObject(rp);
        return EX_OK;
    }

    t = meter_reply_hget(rp, "created") != NULL
        ? (time_t) strtoll(meter_reply_hget(rp, "created"), NULL, 10) : 0;
    meter_iso8601(t, when, sizeof(when));
    snprintf(g->out->prefix, sizeof(g->out->prefix), "%s",
             meter_reply_hget(rp, "prefix") ? meter_reply_hget(rp, "prefix")
                                            : "?");
    snprintf(g->out->key_hash, sizeof(g->out->key_hash), "%s", v);
    freeReplyObject(rp);

    meter_reg_stop(g, METER_REG_EXISTS, EX_DATAERR,
                   "%s is already registered as customer %s; its key %s... "
                   "was issued at %s and is never shown again.  If it was "
                   "lost (an earlier run stopped before printing it), issue "
                   "a new one with \"meterctl keys rotate %s\"",
                   g->out->email, id, g->out->prefix, when, v);

    /* finish what the earlier run may have left */
    freeReplyObject(meter_redis_cmd(r, "HSET %s state done", g->reg));

    if (meter_gov_project(r, id, err, sizeof(err)) != 0) {
        return meter_reg_stop(g, METER_REG_RETRY, EX_UNAVAILABLE, "%s", err);
    }

    return EX_DATAERR;
}


/* 1. the pending registration: what a retry continues from */
static int
meter_reg_pending(meter_redis_t *r, meter_reg_t *g)
{
    int          n;
    const char  *fv[12];

    if (g->rg->elements != 0) {
        return EX_OK;
    }

    n = 0;
    fv[n++] = "state"; fv[n++] = "pending";
    fv[n++] = "email"; fv[n++] = g->out->email;
    fv[n++] = "name"; fv[n++] = g->in->name;
    fv[n++] = "plan"; fv[n++] = g->plan;
    fv[n++] = "provider"; fv[n++] = g->out->provider;
    fv[n++] = "created"; fv[n++] = g->now;

    return meter_reg_reply(g, r, meter_reg_hset(r, g->reg, fv, n), 0);
}


/* 2. the provider's customer and subscription, unless made before */
static int
meter_reg_onboard(meter_redis_t *r, meter_reg_t *g)
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

    if (g->sub != NULL || strcmp(g->out->provider, "file") == 0) {
        return EX_OK;
    }

    if (g->p.init != NULL
        && g->p.init(&g->p, g->cf, err, sizeof(err)) != 0)
    {
        return meter_reg_stop(g, METER_REG_FAILED, EX_CONFIG,
                              "provider %s: %s", g->out->provider, err);
    }

    in.customer = g->out->id;
    in.email = g->out->email;
    in.name = g->in->name;
    in.plan = g->plan;

    memset(&res, 0, sizeof(meter_send_result_t));
    st = g->p.onboard(&g->p, &in, &g->ob, &res);

    if (g->p.cleanup != NULL) {
        g->p.cleanup(&g->p);
    }

    if (st != METER_SEND_OK || g->ob.provider_customer[0] == '\0'
        || g->ob.subscription[0] == '\0')
    {
        return meter_reg_stop(g, st == METER_SEND_FATAL ? METER_REG_FAILED
                                                        : METER_REG_RETRY,
                              st == METER_SEND_FATAL ? EX_UNAVAILABLE
                                                     : EX_TEMPFAIL,
                              "provider %s: %s; customer %s is not "
                              "registered yet; %s", g->out->provider,
                              st == METER_SEND_OK ? "no customer or "
                              "subscription id in the answer" : res.error,
                              g->out->id,
                              st == METER_SEND_FATAL
                              ? "fix the cause above, then run the same "
                                "command again (it continues where it "
                                "stopped)"
                              : "run the same command again to complete it "
                                "(nothing is created twice)");
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

    return meter_reg_reply(g, r, meter_reg_hset(r, g->reg, fv, n), 1);
}


/* 3. our customer record, from the registration */
static int
meter_reg_customer(meter_redis_t *r, meter_reg_t *g)
{
    const char  *fv[48];
    size_t       i;
    int          n, rc;

    rc = meter_reg_reply(g, r, meter_redis_cmd(r, "HSETNX %s status active",
                                               g->cust), 1);
    if (rc == EX_OK) {
        rc = meter_reg_reply(g, r, meter_redis_cmd(r, "HSETNX %s created %s",
                                                   g->cust, g->now), 1);
    }

    if (rc != EX_OK) {
        return rc;
    }

    n = 0;
    fv[n++] = "email"; fv[n++] = g->out->email;
    fv[n++] = "name"; fv[n++] = g->in->name;
    fv[n++] = "plan"; fv[n++] = g->plan;
    fv[n++] = "provider"; fv[n++] = g->out->provider;
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

    rc = meter_reg_reply(g, r, meter_reg_hset(r, g->cust, fv, n), 1);

    if (rc == EX_OK) {
        rc = meter_reg_reply(g, r, meter_redis_cmd(r, "SADD " MTR_CUSTOMERS
                                                   " %s", g->out->id), 1);
    }

    if (rc == EX_OK && g->pc != NULL) {
        rc = meter_reg_reply(g, r, meter_redis_cmd(r, "HSET " MTR_BYPC
                                                   " %s %s", g->pc,
                                                   g->out->id), 1);
    }

    if (rc == EX_OK && g->sub != NULL) {
        rc = meter_reg_reply(g, r, meter_redis_cmd(r, "HSET " MTR_BYSUB
                                                   " %s %s", g->sub,
                                                   g->out->id), 1);
    }

    return rc;
}


/* 4. the key, last: made only now, stored as its hash, shown once */
static int
meter_reg_key(meter_redis_t *r, meter_reg_t *g)
{
    int               rc;
    char              e[512];
    meter_reg_out_t  *out;

    out = g->out;

    if (meter_key_new(out->key) != 0) {
        return meter_reg_stop(g, METER_REG_RETRY, EX_OSERR,
                              "the OpenSSL random generator failed; run the "
                              "same command again");
    }

    meter_sha256_hex(out->key, strlen(out->key), out->key_hash);

    rc = meter_reg_reply(g, r, meter_redis_cmd(r, "HSET %s key_hash %s "
                                               "state keyed", g->reg,
                                               out->key_hash), 1);
    if (rc != EX_OK) {
        return rc;
    }

    if (meter_key_store(r, out->id, out->key, out->key_hash, out->prefix, e,
                        sizeof(e))
        != 0)
    {
        /* the key hash in mtr:reg without mtr:key: a retry makes a new key */
        return meter_reg_stop(g, METER_REG_RETRY, EX_TEMPFAIL,
                              "%s; run the same command again to complete "
                              "the registration of customer %s", e, out->id);
    }

    freeReplyObject(meter_redis_cmd(r, "HSET %s state done", g->reg));

    return EX_OK;
}


int
meter_register(meter_redis_t *r, const meter_conf_t *cf,
    const meter_reg_in_t *in, meter_reg_out_t *out)
{
    int          rc;
    meter_reg_t  g;

    memset(&g, 0, sizeof(meter_reg_t));
    memset(out, 0, sizeof(meter_reg_out_t));
    g.cf = cf;
    g.in = in;
    g.out = out;

    rc = meter_reg_args(&g);

    if (rc == EX_OK) {
        rc = meter_reg_load(r, &g);
    }

    if (rc == EX_OK) {
        rc = meter_reg_pending(r, &g);
    }

    if (rc == EX_OK) {
        rc = meter_reg_onboard(r, &g);
    }

    if (rc == EX_OK) {
        rc = meter_reg_customer(r, &g);
    }

    if (rc == EX_OK) {
        rc = meter_reg_key(r, &g);
    }

    if (rc == EX_OK) {
        /* copied: rg (where they may point) is freed below */
        snprintf(out->provider_customer, sizeof(out->provider_customer),
                 "%s", g.pc != NULL ? g.pc : "");
        snprintf(out->subscription, sizeof(out->subscription), "%s",
                 g.sub != NULL ? g.sub : "");
        out->kind = METER_REG_DONE;

    } else {
        explicit_bzero(out->key, sizeof(out->key));
    }

    freeReplyObject(g.rg);

    return rc;
}


void
meter_reg_wipe(meter_reg_out_t *out)
{
    explicit_bzero(out->key, sizeof(out->key));
}
