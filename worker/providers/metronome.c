
/*
 * Copyright (C) nginx-meter authors
 *
 * Metronome.  Usage events go to POST {metronome.base_url}/v1/ingest as a
 * JSON array of 1 to 100 events, Bearer token (metronome.api_key_file):
 *
 *   [{"transaction_id": the record's idempotency key,
 *     "customer_id": the customer's provider_customer,
 *     "event_type": meter.NAME (or our meter name),
 *     "timestamp": period_end - 1 in RFC 3339,
 *     "properties": {"value": "<quantity>", "meter": ..., ...}}]
 *
 * Facts relied on (Metronome-Industries/metronome-node
 * src/resources/v1/usage.ts, "ingest"; docs.metronome.com
 * api-reference/usage/ingest-events, guides/events/send-usage-events,
 * api-reference/idempotency, api-reference/status-codes):
 *   - 1 to 100 events per request; answers 200 with no body;
 *   - transaction_id is the idempotency key: an event with an id accepted
 *     in the last 34 days is ignored, so a resend inside that window is
 *     harmless; events can be backdated at most 34 days (max_age defaults
 *     to 34 days for this provider) and may not be more than 24 h ahead;
 *   - customer_id is a Metronome customer id or one of its ingest aliases;
 *     an event that matches no customer is still accepted (the events
 *     search reports "matched_customer (if any)") and bills nothing: the
 *     worker cannot see that, so provider_customer must be right;
 *   - property values as strings (Metronome keeps arbitrary precision),
 *     so a quantity is exact whatever its size;
 *   - every 4xx body is {"message": "..."}; 429 "wait and try again",
 *     5xx "retry"; the official clients retry 408, 409, 429 and 5xx and
 *     honour Retry-After (src/client.ts shouldRetry), as http.c does.
 *
 * Not documented, so defensive here:
 *   - whether one bad event fails the whole request: on a 400/413/422 for
 *     several events, each half is sent again, down to single events, so
 *     only the bad one is dead-lettered (resending the good ones is
 *     deduped);
 *   - the rate limits: metronome.max_rps (default 10 requests/s, up to
 *     1,000 events/s) and Retry-After when it comes, backoff otherwise.
 *
 * No Idempotency-Key header: Metronome caches a failed answer under it
 * and replays it, and a batch's composition changes between attempts
 * (409); transaction_id already makes every resend safe.
 *
 * Exactly once rests on the 34-day window: a record whose earlier send's
 * outcome is unknown (attempts > 1) and whose first send is older than
 * that is not resent but dead-lettered, since Metronome would count it
 * again; its events search covers the same 34 days only, so there is no
 * lookup past the window either.
 */


#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "provider.h"
#include "provider_util.h"
#include "util.h"


#define METER_METRONOME_MAX_BATCH  100
#define METER_METRONOME_WINDOW     (34 * 86400)


typedef struct {
    meter_http_t                http;
    char                        url[512];       /* .../v1/ingest */
    char                        token[512];
    char                        value_key[65];
    size_t                      batch;
    time_t                      window;
} meter_metronome_t;


static int meter_metronome_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_metronome_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static void meter_metronome_send_batch(meter_provider_t *p,
    const meter_record_t *recs, size_t n, meter_send_result_t *res);
static void meter_metronome_cleanup(meter_provider_t *p);


static int
meter_metronome_setup(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen)
{
    size_t              n;
    uint64_t            b;
    const char         *v;
    meter_metronome_t  *mt;

    mt = calloc(1, sizeof(meter_metronome_t));
    if (mt == NULL) {
        snprintf(err, errlen, "metronome: out of memory");
        return -1;
    }

    p->data = mt;
    mt->window = METER_METRONOME_WINDOW;

    v = meter_conf_get(cf, "metronome.base_url");
    if (v == NULL) {
        v = "https://api.metronome.com";
    }

    n = strlen(v);
    while (n > 0 && v[n - 1] == '/') {
        n--;
    }

    if (n == 0 || (strncmp(v, "https://", 8) != 0
                   && strncmp(v, "http://", 7) != 0))
    {
        snprintf(err, errlen, "metronome.base_url: \"%s\" is not an http(s) "
                 "URL", v);
        return -1;
    }

    if (n + sizeof("/v1/ingest") > sizeof(mt->url)) {
        snprintf(err, errlen, "metronome.base_url: too long");
        return -1;
    }

    snprintf(mt->url, sizeof(mt->url), "%.*s/v1/ingest", (int) n, v);

    if (meter_conf_get(cf, "metronome.api_key_file") == NULL) {
        snprintf(err, errlen, "metronome.api_key_file: required (a file "
                 "holding the Metronome API token)");
        return -1;
    }

    if (meter_conf_secret(cf, "metronome.api_key_file", mt->token,
                          sizeof(mt->token), err, errlen) != 0)
    {
        return -1;
    }

    if (mt->token[0] == '\0') {
        snprintf(err, errlen, "metronome.api_key_file: the file is empty");
        return -1;
    }

    mt->batch = METER_METRONOME_MAX_BATCH;

    v = meter_conf_get(cf, "metronome.batch_size");
    if (v != NULL) {
        if (meter_parse_u64(v, strlen(v), &b) != 0 || b < 1
            || b > METER_METRONOME_MAX_BATCH)
        {
            snprintf(err, errlen, "metronome.batch_size: \"%s\" is not a "
                     "number from 1 to %d (Metronome takes at most %d "
                     "events per request)", v, METER_METRONOME_MAX_BATCH,
                     METER_METRONOME_MAX_BATCH);
            return -1;
        }

        mt->batch = (size_t) b;
    }

    v = meter_conf_get(cf, "metronome.value_property");
    if (v == NULL) {
        v = "value";
    }

    for (n = 0; v[n] != '\0'; n++) {
        if (!isalnum((unsigned char) v[n]) && v[n] != '_' && v[n] != '-'
            && v[n] != '.')
        {
            break;
        }
    }

    if (n == 0 || v[n] != '\0' || n >= sizeof(mt->value_key)) {
        snprintf(err, errlen, "metronome.value_property: \"%s\" is not a "
                 "property name ([A-Za-z0-9_.-]{1,64})", v);
        return -1;
    }

    memcpy(mt->value_key, v, n + 1);

    return meter_http_init(&mt->http, "metronome", cf, 10, err, errlen);
}


static int
meter_metronome_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    if (meter_metronome_setup(p, cf, err, errlen) != 0) {
        meter_metronome_cleanup(p);
        return -1;
    }

    return 0;
}


static void
meter_metronome_fail(meter_send_result_t *res, meter_send_e st,
    long status, const char *msg)
{
    memset(res, 0, sizeof(meter_send_result_t));
    res->status = st;
    res->http_status = status;
    snprintf(res->error, sizeof(res->error), "%s", msg);
}


/*
 * 0 when rec may be sent; else -1 with res FATAL: no Metronome customer,
 * or an unknown outcome past the transaction_id window.
 */
static int
meter_metronome_check(const meter_metronome_t *mt, const meter_record_t *rec,
    time_t now, meter_send_result_t *res)
{
    char    msg[300];
    time_t  first;

    if (rec->provider_customer == NULL || rec->provider_customer[0] == '\0')
    {
        snprintf(msg, sizeof(msg), "metronome: customer \"%s\" has no "
                 "provider_customer (a Metronome customer id or ingest "
                 "alias)", rec->customer != NULL ? rec->customer : "-");
        meter_metronome_fail(res, METER_SEND_FATAL, 0, msg);
        return -1;
    }

    if (rec->attempts <= 1) {
        return 0;
    }

    if (meter_past_window(rec, now, mt->window)) {
        /* as meter_past_window() counts: without a known first send,
         * period_end errs on the side of not resending */
        first = rec->created > 0 ? rec->created : rec->period_end;

        snprintf(msg, sizeof(msg), "metronome: outcome of the first send "
                 "unknown and it was %lld days ago, past Metronome's "
                 "34-day transaction_id window: a resend could count twice "
                 "(check the customer's usage in Metronome first)",
                 (long long) ((now - first) / 86400));
        meter_metronome_fail(res, METER_SEND_FATAL, 0, msg);
        return -1;
    }

    return 0;
}


static cJSON *
meter_metronome_event(const meter_metronome_t *mt, const meter_record_t *rec)
{
    char    ts[32], q[24];
    cJSON  *ev, *props;

    ev = cJSON_CreateObject();
    props = cJSON_AddObjectToObject(ev, "properties");

    /* the last second inside the period: the event stays in the 34-day
     * backdating window as long as possible, in the period's own hour; a
     * month's figure at its event time (the month may still run) */
    meter_rfc3339((rec->figure && rec->usage_end > 0) ? rec->usage_end - 1
                  : rec->period_end - 1, ts, sizeof(ts));
    snprintf(q, sizeof(q), "%llu", (unsigned long long) rec->quantity);

    if (props == NULL
        || cJSON_AddStringToObject(ev, "transaction_id",
                                   rec->idempotency_key) == NULL
        || cJSON_AddStringToObject(ev, "customer_id",
                                   rec->provider_customer) == NULL
        || cJSON_AddStringToObject(ev, "event_type",
                                   rec->provider_meter != NULL
                                   ? rec->provider_meter : rec->meter)
           == NULL
        || cJSON_AddStringToObject(ev, "timestamp", ts) == NULL
        || cJSON_AddStringToObject(props, mt->value_key, q) == NULL
        || (strcmp(mt->value_key, "meter") != 0
            && cJSON_AddStringToObject(props, "meter", rec->meter) == NULL)
        || (rec->key_hash != NULL && strcmp(mt->value_key, "key_hash") != 0
            && cJSON_AddStringToObject(props, "key_hash", rec->key_hash)
               == NULL))
    {
        cJSON_Delete(ev);
        return NULL;
    }

    return ev;
}


/* one request for n records (n <= mt->batch); res[i] for recs[i] */
static void
meter_metronome_post(meter_metronome_t *mt, const meter_record_t **recs,
    size_t n, meter_send_result_t *res)
{
    char                *js;
    long                 s;
    cJSON               *arr, *ev;
    size_t               i;
    meter_send_e         st;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  one;

    js = NULL;

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(&one, 0, sizeof(one));

    arr = cJSON_CreateArray();

    for (i = 0; arr != NULL && i < n; i++) {
        ev = meter_metronome_event(mt, recs[i]);
        if (ev == NULL || !cJSON_AddItemToArray(arr, ev)) {
            cJSON_Delete(ev);
            cJSON_Delete(arr);
            arr = NULL;
        }
    }

    if (arr != NULL) {
        js = cJSON_PrintUnformatted(arr);
    }

    if (js == NULL) {
        for (i = 0; i < n; i++) {
            meter_metronome_fail(&res[i], METER_SEND_RETRY, 0,
                                 "metronome: out of memory");
        }

        goto end;
    }

    req.method = "POST";
    req.url = mt->url;
    req.content_type = "application/json";
    req.accept = "*/*";                 /* as the official client asks */
    req.body = js;
    req.body_len = strlen(js);
    req.auth = METER_HTTP_AUTH_BEARER;
    req.secret = mt->token;

    st = meter_http_request(&mt->http, &req, &resp, &one);
    s = resp.status;

    if (st == METER_SEND_FATAL && n > 1 && (s == 400 || s == 413 || s == 422))
    {
        /* which event is bad is not said: halves, down to the bad one, so
         * the others go through (a resend of one Metronome has is deduped)
         * in about 2 log2(n) requests */
        meter_metronome_post(mt, recs, n / 2, res);
        meter_metronome_post(mt, &recs[n / 2], n - n / 2, &res[n / 2]);

        goto end;
    }

    for (i = 0; i < n; i++) {
        res[i] = one;
        res[i].status = st;
    }

end:

    cJSON_free(js);
    cJSON_Delete(arr);
    meter_buf_free(&resp.body);
}


static void
meter_metronome_send_batch(meter_provider_t *p, const meter_record_t *recs,
    size_t n, meter_send_result_t *res)
{
    size_t                 i, j, m, *idx;
    time_t                 now;
    meter_metronome_t     *mt;
    meter_send_result_t   *out;
    const meter_record_t **go;

    mt = p->data;
    now = time(NULL);

    go = calloc(n, sizeof(meter_record_t *));
    idx = calloc(n, sizeof(size_t));
    out = calloc(mt->batch, sizeof(meter_send_result_t));

    if (go == NULL || idx == NULL || out == NULL) {
        for (i = 0; i < n; i++) {
            meter_metronome_fail(&res[i], METER_SEND_RETRY, 0,
                                 "metronome: out of memory");
        }

        goto end;
    }

    m = 0;

    for (i = 0; i < n; i++) {
        if (meter_metronome_check(mt, &recs[i], now, &res[i]) == 0) {
            go[m] = &recs[i];
            idx[m++] = i;
        }
    }

    for (i = 0; i < m; i += mt->batch) {
        j = (m - i < mt->batch) ? m - i : mt->batch;

        meter_metronome_post(mt, &go[i], j, out);

        for (j = 0; i + j < m && j < mt->batch; j++) {
            res[idx[i + j]] = out[j];
        }
    }

end:

    free(go);
    free(idx);
    free(out);
}


static meter_send_e
meter_metronome_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    meter_metronome_send_batch(p, rec, 1, res);

    return res->status;
}


static void
meter_metronome_cleanup(meter_provider_t *p)
{
    meter_metronome_t  *mt;

    mt = p->data;
    if (mt == NULL) {
        return;
    }

    meter_http_cleanup(&mt->http);
    explicit_bzero(mt->token, sizeof(mt->token));
    free(mt);
    p->data = NULL;
}


void
meter_provider_metronome(meter_provider_t *p)
{
    p->name = "metronome";
    p->init = meter_metronome_init;
    p->send = meter_metronome_send;
    p->send_batch = meter_metronome_send_batch;
    p->lookup = NULL;
    p->cleanup = meter_metronome_cleanup;
    p->data = NULL;
}
