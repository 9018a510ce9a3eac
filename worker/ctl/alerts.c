
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl alerts: what fired, when, and where each delivery stands
 * (sent, pending, failing with its last error, failed for good).
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include <cjson/cJSON.h>

#include "meterctl.h"
#include "meter_schema.h"
#include "util.h"


#define METERCTL_ALERTS_MAX  1000


/* "pending" with an error is a channel that failed and waits to retry */
static const char *
meterctl_alert_state(const char *state, const char *error)
{
    if (state == NULL) {
        return "?";
    }

    if (strcmp(state, "pending") == 0 && error != NULL && *error != '\0') {
        return "failing";
    }

    return state;
}


static int
meterctl_alerts(meterctl_opts_t *o, meter_redis_t *r)
{
    char          f[32], fired[32], at[32];
    size_t        i, n, nch, c;
    long          shown;
    unsigned      count[4];
    cJSON        *root, *arr, *j, *chs, *ch;
    const char   *id, *state, *err, *v, *cust, *spec;
    redisReply   *ids, *ev;

    static const char  *states[] = { "sent", "pending", "failing", "failed" };

    ids = meter_redis_cmd(r, "ZRANGE " MTR_A_LOG " 0 -1 WITHSCORES");
    if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, ids);
    }

    root = cJSON_CreateObject();
    arr = cJSON_AddArrayToObject(root, "alerts");
    memset(count, 0, sizeof(count));
    shown = 0;

    if (!o->json) {
        printf("%-20s  %-12s  %-16s  %-16s  %10s  %-34s  %-8s  %3s  %s\n",
               "FIRED", "RULE", "CUSTOMER", "PERIOD", "VALUE", "CHANNEL",
               "STATE", "TRY", "SENT / NEXT / ERROR");
    }

    /* the newest first */
    for (n = ids->elements; n >= 2; n -= 2) {
        id = ids->element[n - 2]->str;

        ev = meter_redis_cmd(r, "HGETALL " MTR_A_EVENT_FMT, id);
        if (!meter_reply_ok(ev) || ev->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(ids);
            cJSON_Delete(root);
            return meterctl_redis_failed(r, ev);
        }

        cust = meter_reply_hget(ev, "customer");

        if (ev->elements == 0
            || (o->customer != NULL
                && (cust == NULL || strcmp(cust, o->customer) != 0))
            || shown >= METERCTL_ALERTS_MAX)
        {
            freeReplyObject(ev);
            continue;
        }

        shown++;
        meterctl_time(meter_reply_hget(ev, "fired"), fired, sizeof(fired));

        j = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, j);
        meterctl_json_str(j, "id", id);
        meterctl_json_str(j, "rule", meter_reply_hget(ev, "rule"));
        meterctl_json_str(j, "condition", meter_reply_hget(ev, "condition"));
        meterctl_json_str(j, "customer", cust);
        meterctl_json_str(j, "period", meter_reply_hget(ev, "period"));
        meterctl_json_str(j, "meter", meter_reply_hget(ev, "meter"));
        meterctl_json_str(j, "value", meter_reply_hget(ev, "value"));
        meterctl_json_str(j, "threshold", meter_reply_hget(ev, "threshold"));
        meterctl_json_str(j, "fired_at", fired);
        chs = cJSON_AddArrayToObject(j, "channels");

        v = meter_reply_hget(ev, "nch");
        nch = (v != NULL) ? (size_t) strtoul(v, NULL, 10) : 0;

        for (c = 0; c < nch; c++) {
            snprintf(f, sizeof(f), "c%zu.state", c);
            state = meter_reply_hget(ev, f);
            snprintf(f, sizeof(f), "c%zu.error", c);
            err = meter_reply_hget(ev, f);
            state = meterctl_alert_state(state, err);

            for (i = 0; i < 4; i++) {
                if (strcmp(state, states[i]) == 0) {
                    count[i]++;
                }
            }

            ch = cJSON_CreateObject();
            cJSON_AddItemToArray(chs, ch);
            snprintf(f, sizeof(f), "c%zu", c);
            spec = meter_reply_hget(ev, f);
            meterctl_json_str(ch, "channel", spec);
            meterctl_json_str(ch, "state", state);
            snprintf(f, sizeof(f), "c%zu.attempts", c);
            v = meter_reply_hget(ev, f);
            meterctl_json_int(ch, "attempts",
                              v != NULL ? strtoll(v, NULL, 10) : 0);

            if (strcmp(state, "sent") == 0 || strcmp(state, "failed") == 0) {
                snprintf(f, sizeof(f), "c%zu.at", c);

            } else if (strcmp(state, "sending") == 0) {
                snprintf(f, sizeof(f), "c%zu.lease", c);

            } else {
                snprintf(f, sizeof(f), "c%zu.next", c);
            }

            meterctl_time(meter_reply_hget(ev, f), at, sizeof(at));
            meterctl_json_str(ch, strcmp(state, "sent") == 0 ? "sent_at"
                                  : strcmp(state, "failed") == 0 ? "failed_at"
                                  : strcmp(state, "sending") == 0
                                    ? "lease_until" : "next_attempt", at);

            if (err != NULL && *err != '\0') {
                meterctl_json_str(ch, "error", err);
            }

            if (!o->json) {
                printf("%-20s  %-12.12s  %-16.16s  %-16.16s  %10s  %-34.34s  "
                       "%-8s  %3s  %s%s%s\n",
                       c == 0 ? fired : "",
                       c == 0 ? meter_reply_hget(ev, "rule") : "",
                       c == 0 && cust != NULL ? cust : "",
                       c == 0 && meter_reply_hget(ev, "period") != NULL
                       ? meter_reply_hget(ev, "period") : "",
                       c == 0 && meter_reply_hget(ev, "value") != NULL
                       ? meter_reply_hget(ev, "value") : "",
                       spec != NULL ? spec : "?",
                       state,
                       v != NULL ? v : "0",
                       at,
                       err != NULL && *err != '\0' ? "  " : "",
                       err != NULL ? err : "");
            }
        }

        freeReplyObject(ev);
    }

    freeReplyObject(ids);

    for (i = 0; i < 4; i++) {
        meterctl_json_int(root, states[i], count[i]);
    }

    if (o->json) {
        meterctl_json_print(root);

    } else {
        printf("%ld alerts; deliveries: %u sent, %u pending, %u failing "
               "(retrying), %u failed\n", shown, count[0], count[1],
               count[2], count[3]);
    }

    cJSON_Delete(root);

    return EX_OK;
}


int
meterctl_alerts_cmd(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    rc = meterctl_open(o, r);

    return rc != EX_OK ? rc : meterctl_alerts(o, r);
}
