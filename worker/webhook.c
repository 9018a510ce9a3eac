
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "gov.h"
#include "log.h"
#include "util.h"
#include "webhook.h"


#define METER_WEBHOOK_DEDUPE_TTL_S  "2592000"   /* 30 days */


/* ---------------------------------------------------------------- handling */


static int
meter_wh_answer(char *out, size_t outlen, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int
meter_wh_answer(char *out, size_t outlen, int status, const char *fmt, ...)
{
    va_list  ap;

    va_start(ap, fmt);
    vsnprintf(out, outlen, fmt, ap);
    va_end(ap);

    return status;
}


/* a JSON-safe copy of s (ids, error texts: no quotes or controls) */
static const char *
meter_wh_safe(const char *s, char *buf, size_t size)
{
    size_t  i;

    for (i = 0; s[i] != '\0' && i + 1 < size; i++) {
        buf[i] = (s[i] < 0x20 || s[i] == '"' || s[i] == '\\'
                  || (unsigned char) s[i] >= 0x7f) ? '_' : s[i];
    }

    buf[i] = '\0';

    return buf;
}


int
meter_webhook_handle(meter_provider_t *p, meter_redis_t *r,
    const meter_webhook_req_t *req, char *out, size_t outlen)
{
    int                    rc, delinquent;
    char                   path[64], customer[128], err[256], key[256];
    char                   id[160];
    time_t                 at;
    const char            *argv[6];
    redisReply            *rp;
    meter_webhook_event_t  ev;

    snprintf(path, sizeof(path), "/webhooks/%s", p->name);

    if (strcmp(req->path, path) != 0 || p->webhook == NULL) {
        return meter_wh_answer(out, outlen, 404,
                               "{\"error\":\"no webhooks here\"}");
    }

    if (strcmp(req->method, "POST") != 0) {
        return meter_wh_answer(out, outlen, 405,
                               "{\"error\":\"POST only\"}");
    }

    memset(&ev, 0, sizeof(ev));
    p->webhook(p, req, &ev);

    if (ev.kind == METER_WEBHOOK_INVALID) {
        meter_log(LOG_WARNING, "webhook %s: refused (%d): %s", p->name,
                  ev.http_status, ev.error);
        return meter_wh_answer(out, outlen,
                               ev.http_status >= 400 ? ev.http_status : 400,
                               "{\"error\":\"%s\"}",
                               meter_wh_safe(ev.error, err, sizeof(err)));
    }

    meter_wh_safe(ev.event_id, id, sizeof(id));

    if (ev.kind == METER_WEBHOOK_IGNORE) {
        meter_log(LOG_DEBUG, "webhook %s %s: nothing to track", p->name, id);
        return meter_wh_answer(out, outlen, 200,
                               "{\"ok\":true,\"ignored\":true}");
    }

    if (r->ctx == NULL) {
        meter_log(LOG_ERR, "webhook %s %s: Redis unavailable: 503",
                  p->name, id);
        return meter_wh_answer(out, outlen, 503,
                               "{\"error\":\"storage unavailable\"}");
    }

    snprintf(key, sizeof(key), "mtr:wh:%s:%s", p->name, ev.event_id);

    argv[0] = "EXISTS";
    argv[1] = key;
    rp = meter_redis_argv(r, 2, argv, NULL);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        snprintf(err, sizeof(err), "EXISTS: %.200s", rp != NULL
                 && rp->type == REDIS_REPLY_ERROR ? rp->str : r->err);
        if (rp != NULL) {
            freeReplyObject(rp);
        }
        goto failed;
    }

    rc = (int) rp->integer;
    freeReplyObject(rp);

    if (rc == 1) {
        meter_log(LOG_INFO, "webhook %s %s: delivered before, nothing to do",
                  p->name, id);
        return meter_wh_answer(out, outlen, 200,
                               "{\"ok\":true,\"duplicate\":true}");
    }

    rc = meter_gov_find_customer(r, ev.provider_customer[0]
                                    ? ev.provider_customer : NULL,
                                 ev.subscription[0] ? ev.subscription : NULL,
                                 customer, sizeof(customer), err,
                                 sizeof(err));
    if (rc == -1) {
        goto failed;
    }

    if (rc == 0) {
        /* not ours (or not yet registered): the poll catches up later */
        meter_log(LOG_NOTICE, "webhook %s %s: no customer for %s/%s",
                  p->name, id, ev.provider_customer[0]
                  ? ev.provider_customer : "-",
                  ev.subscription[0] ? ev.subscription : "-");
        return meter_wh_answer(out, outlen, 200,
                               "{\"ok\":true,\"ignored\":\"unknown "
                               "customer\"}");
    }

    delinquent = (ev.kind == METER_WEBHOOK_DELINQUENT);

    /* changes are ordered by event time: one dated far ahead would make
     * every later event a no-op, so beyond the skew it counts as now */
    at = ev.event_time > 0 ? ev.event_time : req->now;

    if (at > req->now + METER_WEBHOOK_SKEW_S) {
        meter_log(LOG_WARNING, "webhook %s %s: event time %lld is %llds "
                  "ahead of the clock; ordered as received", p->name, id,
                  (long long) at, (long long) (at - req->now));
        at = req->now;
    }

    rc = meter_gov_set_status(r, customer, delinquent,
                              delinquent ? "invoice_overdue" : NULL, "sync",
                              at, err, sizeof(err));
    if (rc == -1) {
        goto failed;
    }

    /* unchanged: maybe an earlier delivery stored the status and failed
     * before the projection; projecting again is harmless */
    if (rc == 0 && meter_gov_project(r, customer, err, sizeof(err)) != 0) {
        goto failed;
    }

    argv[0] = "SET";
    argv[1] = key;
    argv[2] = "1";
    argv[3] = "NX";
    argv[4] = "EX";
    argv[5] = METER_WEBHOOK_DEDUPE_TTL_S;
    rp = meter_redis_argv(r, 6, argv, NULL);
    if (!meter_reply_ok(rp)) {
        snprintf(err, sizeof(err), "SET: %.200s", rp != NULL
                 && rp->type == REDIS_REPLY_ERROR ? rp->str : r->err);
        if (rp != NULL) {
            freeReplyObject(rp);
        }
        goto failed;
    }

    freeReplyObject(rp);

    meter_log(LOG_NOTICE, "webhook %s %s: customer %s %s%s", p->name, id,
              customer, delinquent ? "delinquent (invoice_overdue)"
                                   : "paid: active",
              rc == 1 ? "" : " (no change)");

    return meter_wh_answer(out, outlen, 200, "{\"ok\":true,\"changed\":%s}",
                           rc == 1 ? "true" : "false");

failed:

    meter_log(LOG_ERR, "webhook %s %s: not stored, answering 503: %s",
              p->name, id, err);

    return meter_wh_answer(out, outlen, 503,
                           "{\"error\":\"storage unavailable\"}");
}
