
/*
 * Copyright (C) nginx-meter authors
 *
 * Stripe.  Default mode "meter_events": one Billing Meter Event per record,
 * POST /v1/billing/meter_events, form-encoded, with the record's
 * idempotency key both as the event "identifier" (Stripe's dedupe for at
 * least 24 h) and as the Idempotency-Key header (replay of the saved first
 * answer).  Mode "usage_records": the legacy
 * POST /v1/subscription_items/{id}/usage_records, action=increment, for
 * accounts pinned to an API version before 2025-03-31.  Mode
 * "meter_event_stream": the v2 high-volume stream; a session token from
 * POST /v2/billing/meter_event_session (valid 15 minutes, renewed after 14
 * or when the stream answers billing_meter_event_session_expired), then
 * POST {stripe.stream_url}/v2/billing/meter_event_stream with JSON events;
 * the identifier dedupes there too.
 *
 * The event timestamp is period_end - 1: the last second inside the
 * period, so a record stays inside Stripe's 35-day window as long as
 * possible and an hour's usage lands in the billing period of that hour.
 *
 * Stripe allows one concurrent call per customer and meter: the worker
 * sends one record at a time, so this holds.  stripe.max_rps (default 100)
 * keeps well under the account's rate limit.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "provider.h"
#include "provider_util.h"
#include "util.h"


#define METER_STRIPE_MAX_AGE     (35 * 86400)
#define METER_STRIPE_MAX_AHEAD   300
#define METER_STRIPE_PAGES       10000
#define METER_STRIPE_META        "nginx_meter_customer"


typedef enum {
    METER_STRIPE_METER_EVENTS = 0,
    METER_STRIPE_USAGE_RECORDS,
    METER_STRIPE_STREAM
} meter_stripe_mode_e;


typedef struct {
    meter_http_t                http;
    meter_stripe_mode_e         mode;
    char                        base[256];
    char                        stream[256];
    char                        token[512];     /* stream session */
    time_t                      token_until;
    char                        customer_key[64];
    char                        value_key[64];
    char                        api_key[256];
    char                        webhook_secret[256];
    time_t                      webhook_tolerance;
    meter_plans_t               plans;
} meter_stripe_t;


static int meter_stripe_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_stripe_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static int meter_stripe_duplicate(const meter_http_resp_t *resp);
static void meter_stripe_cleanup(meter_provider_t *p);
static meter_send_e meter_stripe_onboard(meter_provider_t *p,
    const meter_onboard_t *in, meter_onboard_result_t *out,
    meter_send_result_t *res);
static int meter_stripe_overdue(meter_provider_t *p, meter_overdue_pt cb,
    void *data, meter_send_result_t *res);
static void meter_stripe_webhook(meter_provider_t *p,
    const meter_webhook_req_t *req, meter_webhook_event_t *ev);


static int
meter_stripe_copy(char *dst, size_t size, const meter_conf_t *cf,
    const char *key, const char *def, char *err, size_t errlen)
{
    const char  *v;

    v = meter_conf_get(cf, key);
    if (v == NULL) {
        v = def;
    }

    if (strlen(v) == 0 || strlen(v) >= size) {
        snprintf(err, errlen, "%s: empty or too long", key);
        return -1;
    }

    memcpy(dst, v, strlen(v) + 1);

    return 0;
}


static int
meter_stripe_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    size_t           n;
    int64_t          ms;
    const char      *mode, *tol;
    meter_stripe_t  *st;

    st = calloc(1, sizeof(meter_stripe_t));
    if (st == NULL) {
        snprintf(err, errlen, "stripe: out of memory");
        return -1;
    }

    p->data = st;

    mode = meter_conf_get(cf, "stripe.mode");
    if (mode == NULL || strcmp(mode, "meter_events") == 0) {
        st->mode = METER_STRIPE_METER_EVENTS;

    } else if (strcmp(mode, "usage_records") == 0) {
        st->mode = METER_STRIPE_USAGE_RECORDS;

    } else if (strcmp(mode, "meter_event_stream") == 0) {
        st->mode = METER_STRIPE_STREAM;

    } else {
        snprintf(err, errlen, "stripe.mode: \"%s\" is not meter_events, "
                 "usage_records or meter_event_stream", mode);
        return -1;
    }

    if (meter_stripe_copy(st->base, sizeof(st->base), cf, "stripe.base_url",
                          "https://api.stripe.com", err, errlen) != 0
        || meter_stripe_copy(st->customer_key, sizeof(st->customer_key), cf,
                             "stripe.customer_key", "stripe_customer_id",
                             err, errlen) != 0
        || meter_stripe_copy(st->value_key, sizeof(st->value_key), cf,
                             "stripe.value_key", "value", err, errlen) != 0
        || meter_stripe_copy(st->stream, sizeof(st->stream), cf,
                             "stripe.stream_url",
                             "https://meter-events.stripe.com", err, errlen)
           != 0)
    {
        return -1;
    }

    n = strlen(st->base);
    while (n > 0 && st->base[n - 1] == '/') {
        st->base[--n] = '\0';
    }

    n = strlen(st->stream);
    while (n > 0 && st->stream[n - 1] == '/') {
        st->stream[--n] = '\0';
    }

    if (meter_conf_secret(cf, "stripe.api_key_file", st->api_key,
                          sizeof(st->api_key), err, errlen) != 0)
    {
        return -1;
    }

    if (st->api_key[0] == '\0') {
        snprintf(err, errlen, "stripe.api_key_file: the file is empty");
        return -1;
    }

    /* webhooks are optional: without a secret every delivery is refused */
    if (meter_conf_get(cf, "stripe.webhook_secret_file") != NULL
        && meter_conf_secret(cf, "stripe.webhook_secret_file",
                             st->webhook_secret, sizeof(st->webhook_secret),
                             err, errlen) != 0)
    {
        return -1;
    }

    st->webhook_tolerance = 300;
    tol = meter_conf_get(cf, "stripe.webhook_tolerance");
    if (tol != NULL) {
        if (meter_parse_duration(tol, &ms) != 0 || ms < 1000) {
            snprintf(err, errlen, "stripe.webhook_tolerance: \"%s\" is not a "
                     "duration of at least 1s", tol);
            return -1;
        }

        st->webhook_tolerance = (time_t) (ms / 1000);
    }

    if (meter_plans_copy(&st->plans, cf) != 0) {
        snprintf(err, errlen, "stripe: out of memory");
        return -1;
    }

    return meter_http_init(&st->http, "stripe", cf, 100, err, errlen);
}


static int
meter_stripe_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    if (meter_stripe_setup(p, cf, err, errlen) != 0) {
        meter_stripe_cleanup(p);
        return -1;
    }

    return 0;
}


/* a meter event whose identifier Stripe already has: accepted before */
static int
meter_stripe_duplicate(const meter_http_resp_t *resp)
{
    int           dup;
    cJSON        *json;
    const cJSON  *e, *code, *msg;

    if (resp->status != 400 || resp->body.data == NULL) {
        return 0;
    }

    dup = 0;

    json = cJSON_ParseWithLength(resp->body.data, resp->body.len);
    if (json == NULL) {
        goto end;
    }

    e = cJSON_GetObjectItemCaseSensitive(json, "error");
    code = cJSON_GetObjectItemCaseSensitive(e, "code");
    msg = cJSON_GetObjectItemCaseSensitive(e, "message");

    if (cJSON_IsString(code)
        && strcmp(code->valuestring, "resource_already_exists") == 0)
    {
        dup = 1;

    } else if (cJSON_IsString(msg)
               && strstr(msg->valuestring, "identifier") != NULL
               && strstr(msg->valuestring, "already exist") != NULL)
    {
        dup = 1;
    }

end:

    cJSON_Delete(json);

    return dup;
}


/* a new v2 session token; 0 or -1 with res filled */
static int
meter_stripe_session(meter_stripe_t *st, meter_send_result_t *res)
{
    int                 rc;
    cJSON              *json;
    meter_buf_t         url;
    meter_http_req_t    req;
    meter_http_resp_t   resp;
    const cJSON        *tok;

    rc = -1;
    json = NULL;
    tok = NULL;

    memset(&url, 0, sizeof(url));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));

    explicit_bzero(st->token, sizeof(st->token));
    st->token_until = 0;

    if (meter_buf_printf(&url, "%s/v2/billing/meter_event_session", st->base)
        != 0)
    {
        snprintf(res->error, sizeof(res->error), "stripe: out of memory");
        res->status = METER_SEND_RETRY;
        goto end;
    }

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/json";
    req.body = "{}";
    req.body_len = 2;
    req.auth = METER_HTTP_AUTH_BEARER;
    req.secret = st->api_key;

    if (meter_http_request(&st->http, &req, &resp, res) != METER_SEND_OK) {
        goto end;
    }

    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    tok = cJSON_GetObjectItemCaseSensitive(json, "authentication_token");

    if (!cJSON_IsString(tok) || tok->valuestring[0] == '\0'
        || strlen(tok->valuestring) >= sizeof(st->token))
    {
        snprintf(res->error, sizeof(res->error), "stripe: meter event "
                 "session without a usable authentication_token");
        res->status = METER_SEND_RETRY;
        goto end;
    }

    memcpy(st->token, tok->valuestring, strlen(tok->valuestring) + 1);

    /* valid 15 minutes: renew a minute early */
    st->token_until = time(NULL) + 14 * 60;
    rc = 0;

end:

    if (json != NULL) {
        /* the token is a credential too */
        if (cJSON_IsString(tok)) {
            explicit_bzero(tok->valuestring, strlen(tok->valuestring));
        }

        cJSON_Delete(json);
    }

    if (resp.body.data != NULL) {
        explicit_bzero(resp.body.data, resp.body.len);
    }

    meter_buf_free(&url);
    meter_buf_free(&resp.body);

    return rc;
}


static int
meter_stripe_session_expired(const meter_http_resp_t *resp)
{
    return resp->status == 401 && resp->body.data != NULL
           && strstr(resp->body.data, "billing_meter_event_session_expired")
              != NULL;
}


static meter_send_e
meter_stripe_stream(meter_stripe_t *st, const meter_record_t *rec,
    time_t ts, meter_send_result_t *res)
{
    int                 again;
    char               *js, tbuf[32], num[24];
    cJSON              *json, *events, *ev, *payload;
    meter_buf_t         url;
    meter_send_e        rc;
    meter_http_req_t    req;
    meter_http_resp_t   resp;

    js = NULL;
    rc = METER_SEND_RETRY;

    memset(&url, 0, sizeof(url));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));

    meter_rfc3339(ts, tbuf, sizeof(tbuf));
    snprintf(num, sizeof(num), "%llu", (unsigned long long) rec->quantity);

    json = cJSON_CreateObject();
    events = cJSON_AddArrayToObject(json, "events");
    ev = cJSON_CreateObject();

    if (events == NULL || ev == NULL) {
        cJSON_Delete(ev);
        goto nomem;
    }

    cJSON_AddItemToArray(events, ev);
    payload = cJSON_AddObjectToObject(ev, "payload");

    if (payload == NULL
        || cJSON_AddStringToObject(ev, "identifier", rec->idempotency_key)
           == NULL
        || cJSON_AddStringToObject(ev, "event_name", rec->provider_meter)
           == NULL
        || cJSON_AddStringToObject(ev, "timestamp", tbuf) == NULL
        || cJSON_AddStringToObject(payload, st->customer_key,
                                   rec->provider_customer) == NULL
        || cJSON_AddStringToObject(payload, st->value_key, num) == NULL)
    {
        goto nomem;
    }

    js = cJSON_PrintUnformatted(json);
    if (js == NULL
        || meter_buf_printf(&url, "%s/v2/billing/meter_event_stream",
                            st->stream) != 0)
    {
        goto nomem;
    }

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/json";
    req.body = js;
    req.body_len = strlen(js);
    req.auth = METER_HTTP_AUTH_BEARER;

    for (again = 1; again >= 0; again--) {
        if (st->token[0] == '\0' || time(NULL) >= st->token_until) {
            if (meter_stripe_session(st, res) != 0) {
                rc = res->status;
                goto end;
            }
        }

        req.secret = st->token;
        rc = meter_http_request(&st->http, &req, &resp, res);

        if (rc != METER_SEND_FATAL || !meter_stripe_session_expired(&resp)) {
            break;
        }

        /* a new session, once */
        st->token[0] = '\0';
    }

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "stripe: out of memory");
    res->status = METER_SEND_RETRY;
    rc = METER_SEND_RETRY;

end:

    cJSON_free(js);
    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&resp.body);

    return rc;
}


static meter_send_e
meter_stripe_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    char               idem[300];
    time_t             ts, now;
    meter_buf_t        url, body;
    meter_send_e       rc;
    meter_stripe_t    *st;
    meter_http_req_t   req;
    meter_http_resp_t  resp;

    st = p->data;

    memset(&url, 0, sizeof(url));
    memset(&body, 0, sizeof(body));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;
    res->status = rc;

    ts = rec->period_end - 1;
    now = time(NULL);

    /* Stripe refuses these anyway: say why instead of a 400 later */
    if (ts < now - METER_STRIPE_MAX_AGE) {
        snprintf(res->error, sizeof(res->error),
                 "stripe: record of %lld is older than the 35 days Stripe "
                 "accepts", (long long) rec->period_start);
        goto end;
    }

    if (ts > now + METER_STRIPE_MAX_AHEAD) {
        snprintf(res->error, sizeof(res->error),
                 "stripe: record of %lld is more than 5 minutes in the "
                 "future", (long long) rec->period_start);
        goto end;
    }

    if (st->mode != METER_STRIPE_USAGE_RECORDS
        && (rec->provider_customer == NULL || rec->provider_meter == NULL))
    {
        snprintf(res->error, sizeof(res->error), "stripe: record without %s",
                 rec->provider_customer == NULL
                 ? "a Stripe customer" : "a meter event name");
        goto end;
    }

    if (st->mode == METER_STRIPE_STREAM) {
        rc = meter_stripe_stream(st, rec, ts, res);
        goto end;
    }

    if (st->mode == METER_STRIPE_METER_EVENTS) {
        char  pk[96];

        if (meter_buf_printf(&url, "%s/v1/billing/meter_events", st->base)
            != 0
            || meter_form_add(&body, st->http.curl, "event_name",
                              rec->provider_meter) != 0)
        {
            goto nomem;
        }

        snprintf(pk, sizeof(pk), "payload[%s]", st->customer_key);
        if (meter_form_add(&body, st->http.curl, pk, rec->provider_customer)
            != 0)
        {
            goto nomem;
        }

        snprintf(pk, sizeof(pk), "payload[%s]", st->value_key);
        if (meter_form_add_u64(&body, st->http.curl, pk,
                               (unsigned long long) rec->quantity) != 0
            || meter_form_add(&body, st->http.curl, "identifier",
                              rec->idempotency_key) != 0
            || meter_form_add_u64(&body, st->http.curl, "timestamp",
                                  (unsigned long long) ts) != 0)
        {
            goto nomem;
        }

    } else {
        if (rec->subscription_item == NULL) {
            snprintf(res->error, sizeof(res->error),
                     "stripe: record without a subscription item "
                     "(usage_records mode)");
            goto end;
        }

        if (meter_buf_printf(&url, "%s/v1/subscription_items/", st->base)
            != 0
            || meter_url_segment(&url, st->http.curl,
                                 rec->subscription_item) != 0
            || meter_buf_printf(&url, "/usage_records") != 0
            || meter_form_add_u64(&body, st->http.curl, "quantity",
                                  (unsigned long long) rec->quantity) != 0
            || meter_form_add_u64(&body, st->http.curl, "timestamp",
                                  (unsigned long long) ts) != 0
            || meter_form_add(&body, st->http.curl, "action", "increment")
               != 0)
        {
            goto nomem;
        }
    }

    snprintf(idem, sizeof(idem), "Idempotency-Key: %s",
             rec->idempotency_key);

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/x-www-form-urlencoded";
    req.body = body.data;
    req.body_len = body.len;
    req.headers[0] = idem;
    req.auth = METER_HTTP_AUTH_BEARER;
    req.secret = st->api_key;

    rc = meter_http_request(&st->http, &req, &resp, res);

    /*
     * Stripe saves the first answer of a key, 500s included, and replays
     * it for 24 h.  A meter event is deduped by its identifier anyway, so
     * a replayed failure is retried once under a fresh header key.
     */
    if (rc == METER_SEND_RETRY && resp.replayed
        && st->mode == METER_STRIPE_METER_EVENTS)
    {
        snprintf(idem, sizeof(idem), "Idempotency-Key: %s-r%lx%04lx",
                 rec->idempotency_key, (unsigned long) time(NULL),
                 (unsigned long) (random() & 0xffff));
        rc = meter_http_request(&st->http, &req, &resp, res);
    }

    if (rc == METER_SEND_FATAL && meter_stripe_duplicate(&resp)) {
        res->status = METER_SEND_OK;
        res->error[0] = '\0';
        rc = METER_SEND_OK;
    }

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "stripe: out of memory");
    res->status = METER_SEND_RETRY;
    rc = METER_SEND_RETRY;

end:

    meter_buf_free(&url);
    meter_buf_free(&body);
    meter_buf_free(&resp.body);

    return rc;
}


static void
meter_stripe_cleanup(meter_provider_t *p)
{
    meter_stripe_t  *st;

    st = p->data;
    if (st == NULL) {
        return;
    }

    meter_http_cleanup(&st->http);
    explicit_bzero(st->api_key, sizeof(st->api_key));
    explicit_bzero(st->token, sizeof(st->token));
    explicit_bzero(st->webhook_secret, sizeof(st->webhook_secret));
    meter_plans_free(&st->plans);
    free(st);
    p->data = NULL;
}


void
meter_provider_stripe(meter_provider_t *p)
{
    p->name = "stripe";
    p->init = meter_stripe_init;
    p->send = meter_stripe_send;
    p->lookup = NULL;
    p->onboard = meter_stripe_onboard;
    p->overdue = meter_stripe_overdue;
    p->webhook = meter_stripe_webhook;
    p->cleanup = meter_stripe_cleanup;
    p->data = NULL;
}
