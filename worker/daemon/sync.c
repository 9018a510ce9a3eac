
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gov.h"
#include "log.h"
#include "meter_schema.h"
#include "sync.h"
#include "util.h"


#define METER_SYNC_SCAN     500


/* the fields meter_sync_clear() asks of each mtr:cust:{C}, in HMGET order */
typedef enum {
    METER_SYNC_STATUS = 0,
    METER_SYNC_REASON,
    METER_SYNC_SOURCE,
    METER_SYNC_PROVIDER,
    METER_SYNC_NFIELDS
} meter_sync_field_e;


typedef struct {
    meter_sync_t               *s;
    meter_map_t                 found;          /* our customer ids */
    int                         redis_failed;
} meter_sync_ctx_t;


int
meter_sync_enabled(const meter_conf_t *cf, const meter_provider_t *p)
{
    const char  *v;

    v = meter_conf_get(cf, "sync.delinquency");

    if (v != NULL && strcmp(v, "off") == 0) {
        return 0;
    }

    return p->overdue != NULL;
}


static int
meter_sync_found(void *data, const meter_overdue_t *o)
{
    int                 rc, created;
    char                customer[128], err[256];
    meter_sync_ctx_t   *ctx;

    ctx = data;
    ctx->s->listed++;

    if (ctx->s->stop != NULL && *ctx->s->stop) {
        return -1;
    }

    rc = meter_gov_find_customer(ctx->s->redis, o->provider_customer,
                                 o->subscription, customer, sizeof(customer),
                                 err, sizeof(err));
    if (rc == -1) {
        snprintf(ctx->s->error, sizeof(ctx->s->error), "%s", err);
        ctx->redis_failed = 1;
        return -1;
    }

    if (rc == 0) {
        ctx->s->unknown++;
        meter_log(LOG_DEBUG, "sync: overdue %s/%s is no customer of ours",
                  o->provider_customer ? o->provider_customer : "-",
                  o->subscription ? o->subscription : "-");
        return 0;
    }

    if (meter_map_put(&ctx->found, customer, &created) == NULL) {
        snprintf(ctx->s->error, sizeof(ctx->s->error), "out of memory");
        ctx->redis_failed = 1;
        return -1;
    }

    return 0;
}


/* a field of the HMGET reply rp, or dflt when the hash has none */
static const char *
meter_sync_field(const redisReply *rp, meter_sync_field_e f, const char *dflt)
{
    return rp->element[f]->type == REDIS_REPLY_STRING ? rp->element[f]->str
                                                      : dflt;
}


/* clears sync marks of customers the provider no longer lists */
static int
meter_sync_clear(meter_sync_ctx_t *ctx)
{
    int            rc;
    char           cursor[32], err[256];
    size_t         i, n;
    redisReply    *scan, *rp, *keys;
    const char    *status, *reason, *source, *prov, *c;
    meter_sync_t  *s;

    s = ctx->s;
    scan = NULL;
    rc = -1;

    snprintf(cursor, sizeof(cursor), "0");

    do {
        scan = meter_redis_cmd(s->redis, "SSCAN " MTR_CUSTOMERS " %s COUNT %d",
                               cursor, METER_SYNC_SCAN);
        if (!meter_reply_ok(scan) || scan->type != REDIS_REPLY_ARRAY
            || scan->elements != 2
            || scan->element[0]->type != REDIS_REPLY_STRING
            || scan->element[1]->type != REDIS_REPLY_ARRAY)
        {
            snprintf(s->error, sizeof(s->error), "SSCAN " MTR_CUSTOMERS ": %s",
                     scan != NULL && scan->type == REDIS_REPLY_ERROR
                     ? scan->str : s->redis->err);
            goto end;
        }

        snprintf(cursor, sizeof(cursor), "%s", scan->element[0]->str);
        keys = scan->element[1];
        n = keys->elements;

        for (i = 0; i < n; i++) {
            /* in meter_sync_field_e order */
            if (meter_redis_append(s->redis, "HMGET " MTR_CUST_FMT " status "
                                   "reason source provider",
                                   keys->element[i]->str) != 0)
            {
                snprintf(s->error, sizeof(s->error), "%s", s->redis->err);
                goto end;
            }
        }

        for (i = 0; i < n; i++) {
            rp = meter_redis_reply(s->redis);
            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
                || rp->elements != METER_SYNC_NFIELDS)
            {
                snprintf(s->error, sizeof(s->error),
                         "HMGET " MTR_CUST_FMT ": %s", keys->element[i]->str,
                         rp != NULL && rp->type == REDIS_REPLY_ERROR
                         ? rp->str : s->redis->err);
                if (rp != NULL) {
                    freeReplyObject(rp);
                }

                /* the rest of the pipeline is unread: reconnect */
                meter_redis_fail(s->redis);
                goto end;
            }

            status = meter_sync_field(rp, METER_SYNC_STATUS, "");
            reason = meter_sync_field(rp, METER_SYNC_REASON, "");
            source = meter_sync_field(rp, METER_SYNC_SOURCE, "");
            prov = meter_sync_field(rp, METER_SYNC_PROVIDER, NULL);
            c = keys->element[i]->str;

            if (strcmp(status, "delinquent") == 0
                && strcmp(reason, "invoice_overdue") == 0
                && strcmp(source, "sync") == 0
                && (prov == NULL || strcmp(prov, s->cf->provider) == 0)
                && meter_map_get(&ctx->found, c) == NULL)
            {
                /* the pipeline is fully read before any other command */
                if (meter_map_put(&ctx->found, c, NULL) == NULL) {
                    freeReplyObject(rp);
                    meter_redis_fail(s->redis);
                    snprintf(s->error, sizeof(s->error), "out of memory");
                    goto end;
                }

                *meter_map_get(&ctx->found, c) = (void *) 1;
            }

            freeReplyObject(rp);
        }

        /* now the marked ones of this batch */
        for (i = 0; i < n; i++) {
            c = keys->element[i]->str;

            if (meter_map_get(&ctx->found, c) == NULL
                || *meter_map_get(&ctx->found, c) != (void *) 1)
            {
                continue;
            }

            /* once only, even if SSCAN returns it again */
            *meter_map_get(&ctx->found, c) = (void *) 2;

            switch (meter_gov_set_status(s->redis, c, 0, NULL, "sync",
                                         s->started, err, sizeof(err)))
            {
            case 1:
                s->cleared++;
                meter_log(LOG_NOTICE, "sync: customer %s has nothing "
                          "overdue any more: active", c);
                break;

            case 0:
                break;

            default:
                snprintf(s->error, sizeof(s->error), "%s", err);
                goto end;
            }
        }

        freeReplyObject(scan);
        scan = NULL;

    } while (strcmp(cursor, "0") != 0);

    rc = 0;

end:

    if (scan != NULL) {
        freeReplyObject(scan);
    }

    return rc;
}


static int
meter_sync_record(meter_sync_t *s)
{
    char         last[24], ok[4], del[24], unk[24];
    redisReply  *rp;

    snprintf(last, sizeof(last), "%lld", (long long) s->started);
    snprintf(ok, sizeof(ok), "%d", s->provider_ok);
    snprintf(del, sizeof(del), "%u", s->delinquent);
    snprintf(unk, sizeof(unk), "%u", s->unknown);

    rp = meter_redis_cmd(s->redis, "HSET " MTR_W_SYNC " last %s ok %s "
                         "error %s delinquent %s unknown %s", last, ok,
                         s->provider_ok ? "" : s->error, del, unk);
    if (!meter_reply_ok(rp)) {
        if (rp != NULL) {
            freeReplyObject(rp);
        }

        return -1;
    }

    freeReplyObject(rp);

    return 0;
}


int
meter_sync_run(meter_sync_t *s)
{
    int                   rc, i;
    char                  err[256];
    size_t                k;
    meter_sync_ctx_t      ctx;
    meter_send_result_t   res;

    memset(&ctx, 0, sizeof(ctx));
    memset(&res, 0, sizeof(res));

    s->started = time(NULL);
    s->listed = 0;
    s->unknown = 0;
    s->delinquent = 0;
    s->marked = 0;
    s->cleared = 0;
    s->provider_ok = 0;
    s->error[0] = '\0';

    ctx.s = s;

    if (meter_map_init(&ctx.found, 64) != 0) {
        snprintf(s->error, sizeof(s->error), "out of memory");
        return -1;
    }

    rc = s->provider->overdue(s->provider, meter_sync_found, &ctx, &res);

    if (ctx.redis_failed) {
        rc = -1;
        goto end;
    }

    if (rc != 0) {
        snprintf(s->error, sizeof(s->error), "%s", res.error[0] ? res.error
                 : "the provider's overdue list failed");
        meter_log(LOG_WARNING, "sync: %s; marking what was listed, "
                  "clearing nothing", s->error);

    } else {
        s->provider_ok = 1;
    }

    /* mark: the poll's start orders it against webhooks */
    for (k = 0; k < ctx.found.cap; k++) {
        if (ctx.found.keys[k] == NULL) {
            continue;
        }

        s->delinquent++;

        i = meter_gov_set_status(s->redis, ctx.found.keys[k], 1,
                                 "invoice_overdue", "sync", s->started, err,
                                 sizeof(err));
        if (i == -1) {
            if (s->redis->ctx == NULL) {
                snprintf(s->error, sizeof(s->error), "%s", err);
                rc = -1;
                goto end;
            }

            /* e.g. a customer deleted meanwhile */
            meter_log(LOG_WARNING, "sync: %s", err);
            continue;
        }

        if (i == 1) {
            s->marked++;
            meter_log(LOG_NOTICE, "sync: customer %s has an overdue "
                      "invoice: delinquent", ctx.found.keys[k]);
        }
    }

    if (s->provider_ok && (s->stop == NULL || !*s->stop)) {
        if (meter_sync_clear(&ctx) != 0) {
            rc = -1;
            goto end;
        }
    }

    if (meter_sync_record(s) != 0) {
        snprintf(s->error, sizeof(s->error), "HSET " MTR_W_SYNC ": %s",
                 s->redis->err);
        rc = -1;
        goto end;
    }

    rc = 0;

    meter_log(s->marked || s->cleared || !s->provider_ok ? LOG_INFO
              : LOG_DEBUG, "sync: %u listed, %u of our customers overdue "
              "(%u newly), %u cleared, %u unknown%s", s->listed,
              s->delinquent, s->marked, s->cleared, s->unknown,
              s->provider_ok ? "" : ", provider failed");

end:

    meter_map_free(&ctx.found, NULL);

    if (rc == -1) {
        /* best effort: say so in mtr:w:sync too */
        s->provider_ok = 0;
        (void) meter_sync_record(s);
    }

    return rc;
}
