
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl keys list|add|revoke|rotate (the key itself: lib/register.c).
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


/*
 * Writes a new key of the customer: mtr:key:{KH} and mtr:ckeys, then
 * projects.  kh (65) and prefix (13) are filled.  0 or an exit code.
 */
int
meterctl_key_store(meter_redis_t *r, const char *cmd, const char *customer,
    const char *key, char *kh, char *prefix)
{
    char  err[512];

    if (meter_key_store(r, customer, key, kh, prefix, err, sizeof(err)) != 0)
    {
        return meterctl_gov_failed(cmd, err);
    }

    return EX_OK;
}


/* one API key (prefix and hash, never the key): into arr, or a table row */

void
meterctl_key_row(cJSON *arr, const char *indent, const char *kh,
    const redisReply *key)
{
    char         when[32], rev[32];
    cJSON       *k;
    const char  *created, *revoked, *prefix;

    created = meter_reply_hget(key, "created");
    revoked = meter_reply_hget(key, "revoked");
    prefix = meter_reply_hget(key, "prefix");

    if (arr != NULL) {
        k = cJSON_CreateObject();
        cJSON_AddStringToObject(k, "key_hash", kh);
        meterctl_json_str(k, "prefix", prefix);
        meterctl_json_int(k, "created",
                          created ? strtoll(created, NULL, 10) : 0);

        if (revoked != NULL) {
            meterctl_json_int(k, "revoked", strtoll(revoked, NULL, 10));

        } else {
            cJSON_AddNullToObject(k, "revoked");
        }

        cJSON_AddItemToArray(arr, k);
        return;
    }

    meterctl_time(created, when, sizeof(when));
    meterctl_time(revoked, rev, sizeof(rev));
    /* no prefix: an imported key (keys add), known by its hash only */
    printf("%s%-64s  %-12s  %-20s  %s\n", indent, kh,
           prefix ? prefix : "(imported)", when, rev);
}


int
meterctl_keys_list(meterctl_opts_t *o, meter_redis_t *r)
{
    char         ck[96];
    size_t       i;
    int          rc;
    cJSON       *arr;
    redisReply  *kh, *key;
    const char  *id;

    if (o->nargs != 1 && !(o->nargs == 0 && o->customer != NULL)) {
        fprintf(stderr, "meterctl keys list: expected one customer id\n");
        return EX_USAGE;
    }

    id = o->nargs == 1 ? o->args[0] : o->customer;

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl keys list: invalid customer id \"%s\"\n",
                id);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "keys list", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    snprintf(ck, sizeof(ck), MTR_CKEYS_FMT, id);
    kh = meterctl_sorted_set(r, ck, &rc);
    if (kh == NULL) {
        return rc;
    }

    arr = cJSON_CreateArray();

    if (!o->json) {
        printf("%-64s  %-12s  %-20s  %s\n", "KEY_HASH", "PREFIX", "CREATED",
               "REVOKED");
    }

    for (i = 0; i < kh->elements; i++) {
        key = meter_redis_cmd(r, "HGETALL " MTR_KEY_FMT, kh->element[i]->str);
        if (!meter_reply_ok(key)) {
            cJSON_Delete(arr);
            freeReplyObject(kh);
            return meterctl_redis_failed(r, key);
        }

        meterctl_key_row(o->json ? arr : NULL, "", kh->element[i]->str,
                         key);

        freeReplyObject(key);
    }

    if (o->json) {
        meterctl_json_print(arr);
    }

    cJSON_Delete(arr);
    freeReplyObject(kh);

    return EX_OK;
}


int
meterctl_keys_add(meterctl_opts_t *o, meter_redis_t *r)
{
    char         kh[65], line[8192], old[72], err[512];
    const char  *key;
    size_t       n;
    int          rc;
    redisReply  *rp;

    if ((o->hash == NULL && o->nargs != 1)
        || (o->hash != NULL && o->nargs != 0)
        || o->customer == NULL)
    {
        fprintf(stderr, "meterctl keys add: expected \"KEY|- --customer ID\" "
                "or \"--hash KEY_HASH --customer ID\"\n");
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->customer)) {
        fprintf(stderr, "meterctl keys add: invalid customer id \"%s\"\n",
                o->customer);
        return EX_DATAERR;
    }

    if (o->hash != NULL
        && (strlen(o->hash) != 64
            || strspn(o->hash, "0123456789abcdef") != 64))
    {
        fprintf(stderr, "meterctl keys add: --hash must be 64 lowercase hex "
                "chars\n");
        return EX_DATAERR;
    }

    line[0] = '\0';

    if (o->hash != NULL) {
        memcpy(kh, o->hash, 65);

    } else {
        key = o->args[0];

        if (strcmp(key, "-") == 0) {
            if (fgets(line, sizeof(line), stdin) == NULL) {
                fprintf(stderr, "meterctl keys add: no key on stdin\n");
                return EX_DATAERR;
            }

            line[strcspn(line, "\r\n")] = '\0';
            key = line;
        }

        n = strlen(key);
        if (n == 0) {
            fprintf(stderr, "meterctl keys add: empty key\n");
            return EX_DATAERR;
        }

        /*
         * No prefix of an imported key is stored: next to its unsalted
         * SHA-256 it shrinks the search (a 16-character key was recovered
         * from Redis in 21 s).  Only generated keys, 160 random bits after
         * "mk_live_", get a display prefix.
         */
        meter_sha256_hex(key, n, kh);
        explicit_bzero(line, sizeof(line));
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "keys add", o->customer);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    old[0] = '\0';
    rp = meter_redis_cmd(r, "HGET " MTR_KEY_FMT " customer", kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    if (rp->type == REDIS_REPLY_STRING) {
        snprintf(old, sizeof(old), "%s", rp->str);
    }

    freeReplyObject(rp);

    /* a prefix left by an earlier meterctl that stored one goes too */
    rp = meter_redis_cmd(r, "HDEL " MTR_KEY_FMT " prefix", kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "HSET " MTR_KEY_FMT " customer %s created %lld",
                         kh, o->customer, (long long) time(NULL));

    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (old[0] != '\0' && strcmp(old, o->customer) != 0) {
        /* the key moves to another customer */
        rp = meter_redis_cmd(r, "SREM " MTR_CKEYS_FMT " %s", old, kh);
        freeReplyObject(rp);
        if (meter_gov_project(r, old, err, sizeof(err)) != 0) {
            return meterctl_gov_failed("keys add", err);
        }
    }

    rp = meter_redis_cmd(r, "SADD " MTR_CKEYS_FMT " %s", o->customer, kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (meter_gov_project(r, o->customer, err, sizeof(err)) != 0) {
        return meterctl_gov_failed("keys add", err);
    }

    printf("%s\n", kh);

    return EX_OK;
}


/*
 * A key named by its hash (64 hex), its display prefix ("mk_live_ab12") or
 * the start of its hash (8+ hex chars): kh and customer filled, or an exit
 * code after a message.
 */
static int
meterctl_key_resolve(meter_redis_t *r, const char *cmd, const char *arg,
    char *kh, char *customer, size_t size)
{
    char         ck[96];
    size_t       i, j, n, alen;
    int          rc, hex;
    redisReply  *ids, *keys, *rp;

    alen = strlen(arg);
    hex = (alen >= 8 && alen <= 64
           && strspn(arg, "0123456789abcdef") == alen);

    if (alen == 64 && hex) {
        rp = meter_redis_cmd(r, "HGET " MTR_KEY_FMT " customer", arg);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        if (rp->type != REDIS_REPLY_STRING) {
            freeReplyObject(rp);
            fprintf(stderr, "meterctl %s: no key with hash %s\n", cmd, arg);
            return EX_DATAERR;
        }

        memcpy(kh, arg, 65);
        snprintf(customer, size, "%s", rp->str);
        freeReplyObject(rp);

        return EX_OK;
    }

    if (alen == 0 || alen > 64) {
        fprintf(stderr, "meterctl %s: \"%s\" is neither a key hash nor a key "
                "prefix\n", cmd, arg);
        return EX_DATAERR;
    }

    /* no index by prefix: walk the customers' keys (an admin command) */
    ids = meterctl_sorted_set(r, MTR_CUSTOMERS, &rc);
    if (ids == NULL) {
        return rc;
    }

    n = 0;

    for (i = 0; i < ids->elements; i++) {
        snprintf(ck, sizeof(ck), MTR_CKEYS_FMT, ids->element[i]->str);
        keys = meterctl_sorted_set(r, ck, &rc);
        if (keys == NULL) {
            freeReplyObject(ids);
            return rc;
        }

        for (j = 0; j < keys->elements; j++) {
            if (hex && strncmp(keys->element[j]->str, arg, alen) == 0) {
                goto found;
            }

            rp = meter_redis_cmd(r, "HGET " MTR_KEY_FMT " prefix",
                                 keys->element[j]->str);
            if (!meter_reply_ok(rp)) {
                freeReplyObject(keys);
                freeReplyObject(ids);
                return meterctl_redis_failed(r, rp);
            }

            if (rp->type != REDIS_REPLY_STRING || strcmp(rp->str, arg) != 0) {
                freeReplyObject(rp);
                continue;
            }

            freeReplyObject(rp);

        found:

            if (n++ == 0) {
                snprintf(kh, 65, "%s", keys->element[j]->str);
                snprintf(customer, size, "%s", ids->element[i]->str);

            } else {
                if (n == 2) {
                    fprintf(stderr, "meterctl %s: \"%s\" matches several "
                            "keys; give the key hash:\n  %s (%s)\n", cmd, arg,
                            kh, customer);
                }

                fprintf(stderr, "  %s (%s)\n", keys->element[j]->str,
                        ids->element[i]->str);
            }
        }

        freeReplyObject(keys);
    }

    freeReplyObject(ids);

    if (n == 0) {
        fprintf(stderr, "meterctl %s: no key with prefix or hash \"%s\" (see "
                "\"meterctl keys list CUSTOMER\")\n", cmd, arg);
        return EX_DATAERR;
    }

    return n == 1 ? EX_OK : EX_DATAERR;
}


static int
meterctl_revoke(meter_redis_t *r, const char *cmd, const char *kh,
    const char *customer)
{
    char         err[512];
    redisReply  *rp;

    /* the first revocation time stays */
    rp = meter_redis_cmd(r, "HSETNX " MTR_KEY_FMT " revoked %lld", kh,
                         (long long) time(NULL));
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (meter_gov_project(r, customer, err, sizeof(err)) != 0) {
        return meterctl_gov_failed(cmd, err);
    }

    return EX_OK;
}


int
meterctl_keys_revoke(meterctl_opts_t *o, meter_redis_t *r)
{
    char  kh[65], customer[72];
    int   rc;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl keys revoke: expected one KEY_HASH or "
                "PREFIX\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_key_resolve(r, "keys revoke", o->args[0], kh, customer,
                              sizeof(customer));
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_revoke(r, "keys revoke", kh, customer);
    if (rc != EX_OK) {
        return rc;
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"key_hash\":\"%s\",\"revoked\":true}\n",
               customer, kh);

    } else {
        printf("key %s of customer %s revoked; nginx answers it like an "
               "unknown key after its next governance refresh\n", kh,
               customer);
    }

    return EX_OK;
}


int
meterctl_keys_rotate(meterctl_opts_t *o, meter_redis_t *r)
{
    char  kh[65], customer[72], key[METERCTL_KEY_LEN + 1], nkh[65];
    char  prefix[13];
    int   rc;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl keys rotate: expected one KEY_HASH or "
                "PREFIX\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_key_resolve(r, "keys rotate", o->args[0], kh, customer,
                              sizeof(customer));
    if (rc != EX_OK) {
        return rc;
    }

    if (meterctl_key_new(key) != 0) {
        fprintf(stderr, "meterctl keys rotate: the OpenSSL random generator "
                "failed; nothing changed\n");
        return EX_OSERR;
    }

    /* the new key works before the old one stops */
    rc = meterctl_key_store(r, "keys rotate", customer, key, nkh, prefix);
    if (rc == EX_OK) {
        rc = meterctl_revoke(r, "keys rotate", kh, customer);
    }

    if (rc != EX_OK) {
        memset(key, 0, sizeof(key));
        return rc;
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"key\":\"%s\",\"key_hash\":\"%s\","
               "\"prefix\":\"%s\",\"revoked\":\"%s\"}\n", customer, key, nkh,
               prefix, kh);

    } else {
        printf("customer %s: key %s revoked\n", customer, kh);
        printf("new API key (shown once, store it now):\n%s\n", key);
    }

    memset(key, 0, sizeof(key));

    return EX_OK;
}
