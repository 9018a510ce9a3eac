
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
    char               idem[300], fresh[24];
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

    /*
     * The last second of the period; for a period still running (a drain
     * with --before in the future) the present, which is inside it too:
     * Stripe refuses timestamps more than 5 minutes ahead.
     */
    ts = rec->period_end - 1;
    now = time(NULL);

    if (ts > now && rec->period_start <= now) {
        ts = now;
    }

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
     * Stripe saves the first answer of a key, 500s and 400s included, and
     * replays it for 24 h.  A meter event is deduped by its identifier
     * anyway, so a replayed failure (a 500, or a 400 whose cause the admin
     * fixed before "meterctl retry") is tried once under a fresh header key.
     */
    if (rc != METER_SEND_OK && resp.replayed
        && st->mode == METER_STRIPE_METER_EVENTS)
    {
        meter_fresh_suffix(fresh, sizeof(fresh));
        snprintf(idem, sizeof(idem), "Idempotency-Key: %s%s",
                 rec->idempotency_key, fresh);
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


/* the id of a field that is an id or an expanded object */
static const char *
meter_stripe_ref(const cJSON *obj, const char *field)
{
    const cJSON  *f;

    f = cJSON_GetObjectItemCaseSensitive(obj, field);

    if (cJSON_IsString(f)) {
        return f->valuestring;
    }

    return meter_json_str(f, "id", (char *) NULL);
}


/* one v1 call; form NULL for a GET, idem NULL for none */
static meter_send_e
meter_stripe_call(meter_stripe_t *st, const char *url, const meter_buf_t *form,
    const char *idem, cJSON **json, int *replayed, meter_send_result_t *res)
{
    char              hdr[320];
    meter_http_req_t  req;

    memset(&req, 0, sizeof(req));

    req.method = (form != NULL) ? "POST" : "GET";
    req.url = url;
    req.auth = METER_HTTP_AUTH_BEARER;
    req.secret = st->api_key;

    if (form != NULL) {
        req.content_type = "application/x-www-form-urlencoded";
        req.body = form->data != NULL ? form->data : "";
        req.body_len = form->len;
    }

    if (idem != NULL) {
        snprintf(hdr, sizeof(hdr), "Idempotency-Key: %s", idem);
        req.headers[0] = hdr;
    }

    return meter_http_json(&st->http, &req, json, replayed, res);
}


/*
 * Lists url (which has a query) page by page and returns the first object
 * whose metadata[nginx_meter_customer] is customer and whose field
 * "status" is not one of skip: 1 with its id in id, 0 none, -1 error.
 */
static int
meter_stripe_find(meter_stripe_t *st, const char *url, const char *customer,
    const char *skip, char *id, size_t size, meter_send_result_t *res)
{
    int           rc, page;
    char          last[128];
    cJSON        *json;
    meter_buf_t   u;
    const char   *oid, *meta, *status;
    const cJSON  *data, *o;

    memset(&u, 0, sizeof(u));
    last[0] = '\0';
    json = NULL;
    rc = -1;

    for (page = 0; page < METER_STRIPE_PAGES; page++) {
        meter_buf_reset(&u);
        if (meter_buf_printf(&u, "%s&limit=100", url) != 0
            || (last[0] != '\0'
                && (meter_buf_printf(&u, "&starting_after=") != 0
                    || meter_url_segment(&u, st->http.curl, last) != 0)))
        {
            snprintf(res->error, sizeof(res->error), "stripe: out of memory");
            res->status = METER_SEND_RETRY;
            goto end;
        }

        cJSON_Delete(json);
        if (meter_stripe_call(st, u.data, NULL, NULL, &json, NULL, res)
            != METER_SEND_OK)
        {
            goto end;
        }

        data = cJSON_GetObjectItemCaseSensitive(json, "data");
        if (!cJSON_IsArray(data)) {
            snprintf(res->error, sizeof(res->error),
                     "stripe: list without \"data\"");
            res->status = METER_SEND_RETRY;
            goto end;
        }

        oid = NULL;

        cJSON_ArrayForEach(o, data) {
            oid = meter_json_str(o, "id", (char *) NULL);
            meta = meter_json_str(o, "metadata", METER_STRIPE_META,
                                  (char *) NULL);
            status = meter_json_str(o, "status", (char *) NULL);

            if (oid != NULL && meta != NULL && strcmp(meta, customer) == 0
                && (status == NULL || skip == NULL
                    || strstr(skip, status) == NULL))
            {
                rc = meter_copy(id, size, oid) == 0 ? 1 : -1;
                goto end;
            }
        }

        if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(json, "has_more"))
            || oid == NULL || meter_copy(last, sizeof(last), oid) != 0)
        {
            rc = 0;
            goto end;
        }
    }

    rc = 0;

end:

    cJSON_Delete(json);
    meter_buf_free(&u);

    return rc;
}


/*
 * A create call with an idempotency key.  Stripe saves the first answer of
 * a key, 500s included, and replays it for 24 h: the caller has just
 * listed the objects and found none, so a replayed failure created
 * nothing, and the call is made once more under a fresh key.
 */
static meter_send_e
meter_stripe_create(meter_stripe_t *st, const char *url,
    const meter_buf_t *form, const char *idem, cJSON **json,
    meter_send_result_t *res)
{
    int           replayed;
    char          fresh[200], suffix[24];
    meter_send_e  rc;

    rc = meter_stripe_call(st, url, form, idem, json, &replayed, res);

    if (rc == METER_SEND_RETRY && replayed) {
        cJSON_Delete(*json);
        meter_fresh_suffix(suffix, sizeof(suffix));
        snprintf(fresh, sizeof(fresh), "%s%s", idem, suffix);
        rc = meter_stripe_call(st, url, form, fresh, json, NULL, res);
    }

    return rc;
}


static meter_send_e
meter_stripe_onboard(meter_provider_t *p, const meter_onboard_t *in,
    meter_onboard_result_t *out, meter_send_result_t *res)
{
    int                 n, i, found;
    char                idem[128], key[64];
    cJSON              *json;
    meter_buf_t         url, form;
    const char         *id, *price;
    meter_send_e        rc;
    const cJSON        *items, *it;
    meter_stripe_t     *st;
    meter_plan_item_t   plan[METER_PLAN_ITEMS];

    st = p->data;
    json = NULL;

    memset(&url, 0, sizeof(url));
    memset(&form, 0, sizeof(form));
    memset(out, 0, sizeof(*out));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;
    res->status = rc;

    n = meter_plan_items(&st->plans, in->plan, "stripe_price", plan,
                         METER_PLAN_ITEMS);
    if (n <= 0) {
        snprintf(res->error, sizeof(res->error), "stripe: %s \"plan.%s."
                 "stripe_price\" (or \"plan.%s.stripe_price.METER\") in the "
                 "config", n == 0 ? "no" : "too many or too long",
                 in->plan ? in->plan : "default",
                 in->plan ? in->plan : "default");
        goto end;
    }

    /* the customer: look for ours first (a retry after 24 h, when Stripe
     * forgot the idempotency key), else create it */

    if (meter_buf_printf(&url, "%s/v1/customers?email=", st->base) != 0
        || meter_url_segment(&url, st->http.curl, in->email) != 0)
    {
        goto nomem;
    }

    found = meter_stripe_find(st, url.data, in->customer, NULL,
                              out->provider_customer,
                              sizeof(out->provider_customer), res);
    if (found == -1) {
        rc = res->status;
        goto end;
    }

    if (found == 0) {
        meter_buf_reset(&url);
        if (meter_buf_printf(&url, "%s/v1/customers", st->base) != 0
            || meter_form_add(&form, st->http.curl, "email", in->email) != 0
            || (in->name != NULL
                && meter_form_add(&form, st->http.curl, "name", in->name)
                   != 0)
            || meter_form_add(&form, st->http.curl,
                              "metadata[" METER_STRIPE_META "]",
                              in->customer) != 0)
        {
            goto nomem;
        }

        snprintf(idem, sizeof(idem), "nginx-meter-%s-customer", in->customer);

        rc = meter_stripe_create(st, url.data, &form, idem, &json, res);
        if (rc != METER_SEND_OK) {
            goto end;
        }

        id = meter_json_str(json, "id", (char *) NULL);
        if (id == NULL
            || meter_copy(out->provider_customer,
                          sizeof(out->provider_customer), id) != 0)
        {
            snprintf(res->error, sizeof(res->error),
                     "stripe: customer created without a usable id");
            rc = METER_SEND_RETRY;
            goto end;
        }

        cJSON_Delete(json);
        json = NULL;
    }

    /* the subscription, the same way */

    meter_buf_reset(&url);
    if (meter_buf_printf(&url, "%s/v1/subscriptions?status=all&customer=",
                         st->base) != 0
        || meter_url_segment(&url, st->http.curl, out->provider_customer)
           != 0)
    {
        goto nomem;
    }

    found = meter_stripe_find(st, url.data, in->customer,
                              "canceled incomplete_expired",
                              out->subscription, sizeof(out->subscription),
                              res);
    if (found == -1) {
        rc = res->status;
        goto end;
    }

    meter_buf_reset(&url);

    if (found == 1) {
        /* its items */
        if (meter_buf_printf(&url, "%s/v1/subscriptions/", st->base) != 0
            || meter_url_segment(&url, st->http.curl, out->subscription) != 0)
        {
            goto nomem;
        }

        rc = meter_stripe_call(st, url.data, NULL, NULL, &json, NULL, res);

    } else {
        meter_buf_reset(&form);
        if (meter_buf_printf(&url, "%s/v1/subscriptions", st->base) != 0
            || meter_form_add(&form, st->http.curl, "customer",
                              out->provider_customer) != 0
            || meter_form_add(&form, st->http.curl,
                              "metadata[" METER_STRIPE_META "]",
                              in->customer) != 0)
        {
            goto nomem;
        }

        for (i = 0; i < n; i++) {
            snprintf(key, sizeof(key), "items[%d][price]", i);
            if (meter_form_add(&form, st->http.curl, key, plan[i].value)
                != 0)
            {
                goto nomem;
            }
        }

        snprintf(idem, sizeof(idem), "nginx-meter-%s-subscription",
                 in->customer);

        rc = meter_stripe_create(st, url.data, &form, idem, &json, res);
    }

    if (rc != METER_SEND_OK) {
        goto end;
    }

    id = meter_json_str(json, "id", (char *) NULL);
    if (id == NULL
        || meter_copy(out->subscription, sizeof(out->subscription), id) != 0)
    {
        snprintf(res->error, sizeof(res->error),
                 "stripe: subscription without a usable id");
        rc = METER_SEND_RETRY;
        goto end;
    }

    /* subscription item per meter, for usage_records mode; the plain key
     * stands for the meter "calls" */
    items = cJSON_GetObjectItemCaseSensitive(
                cJSON_GetObjectItemCaseSensitive(json, "items"), "data");

    cJSON_ArrayForEach(it, items) {
        id = meter_json_str(it, "id", (char *) NULL);
        price = meter_json_str(it, "price", "id", (char *) NULL);

        for (i = 0; id != NULL && price != NULL && i < n; i++) {
            if (strcmp(plan[i].value, price) != 0 || out->nitems == 8) {
                continue;
            }

            if (meter_copy(out->item_meter[out->nitems],
                           sizeof(out->item_meter[0]),
                           plan[i].meter[0] ? plan[i].meter : "calls") == 0
                && meter_copy(out->item_id[out->nitems],
                              sizeof(out->item_id[0]), id) == 0)
            {
                out->nitems++;
            }

            break;
        }
    }

    res->status = METER_SEND_OK;
    res->error[0] = '\0';
    rc = METER_SEND_OK;

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "stripe: out of memory");
    rc = METER_SEND_RETRY;

end:

    res->status = rc;
    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&form);

    return rc;
}


/* subscriptions with status past_due, then unpaid, every page */
static int
meter_stripe_overdue(meter_provider_t *p, meter_overdue_pt cb, void *data,
    meter_send_result_t *res)
{
    int               s, page, rc;
    char              last[128];
    cJSON            *json;
    meter_buf_t       url;
    const char       *id;
    const cJSON      *list, *o;
    meter_stripe_t   *st;
    meter_overdue_t   od;

    static const char  *statuses[] = { "past_due", "unpaid" };

    st = p->data;
    json = NULL;
    rc = -1;

    memset(&url, 0, sizeof(url));
    memset(res, 0, sizeof(*res));

    for (s = 0; s < 2; s++) {
        last[0] = '\0';

        for (page = 0; page < METER_STRIPE_PAGES; page++) {
            meter_buf_reset(&url);
            if (meter_buf_printf(&url, "%s/v1/subscriptions?status=%s"
                                 "&limit=100", st->base, statuses[s]) != 0
                || (last[0] != '\0'
                    && (meter_buf_printf(&url, "&starting_after=") != 0
                        || meter_url_segment(&url, st->http.curl, last)
                           != 0)))
            {
                snprintf(res->error, sizeof(res->error),
                         "stripe: out of memory");
                goto end;
            }

            cJSON_Delete(json);
            if (meter_stripe_call(st, url.data, NULL, NULL, &json, NULL, res)
                != METER_SEND_OK)
            {
                goto end;
            }

            list = cJSON_GetObjectItemCaseSensitive(json, "data");
            if (!cJSON_IsArray(list)) {
                snprintf(res->error, sizeof(res->error),
                         "stripe: subscription list without \"data\"");
                goto end;
            }

            id = NULL;

            cJSON_ArrayForEach(o, list) {
                id = meter_json_str(o, "id", (char *) NULL);

                od.subscription = id;
                od.provider_customer = meter_stripe_ref(o, "customer");
                od.since = 0;

                if (cb(data, &od) != 0) {
                    snprintf(res->error, sizeof(res->error),
                             "stripe: the sync stopped");
                    goto end;
                }
            }

            if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(json,
                                                               "has_more")))
            {
                break;
            }

            if (id == NULL || meter_copy(last, sizeof(last), id) != 0) {
                snprintf(res->error, sizeof(res->error),
                         "stripe: has_more without a last id");
                goto end;
            }
        }

        if (page == METER_STRIPE_PAGES) {
            snprintf(res->error, sizeof(res->error),
                     "stripe: more than %d pages of subscriptions",
                     METER_STRIPE_PAGES);
            goto end;
        }
    }

    rc = 0;

end:

    cJSON_Delete(json);
    meter_buf_free(&url);

    return rc;
}


/*
 * Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]: HMAC-SHA256 of
 * "<t>.<raw body>" with the endpoint's secret, compared in constant time
 * with every v1 (several during a secret roll); t within the tolerance.
 * 1 verified, 0 not (ev filled).
 */
static int
meter_stripe_verify(meter_stripe_t *st, const meter_webhook_req_t *req,
    meter_webhook_event_t *ev)
{
    int          ok;
    char         buf[2048], mac[65], t[24], *tok, *save, *eq;
    time_t       ts;
    const char  *h;

    if (st->webhook_secret[0] == '\0') {
        meter_webhook_invalid(ev, 401, "stripe.webhook_secret_file is not "
                              "set");
        return 0;
    }

    h = req->header(req->data, "Stripe-Signature");
    if (h == NULL || strlen(h) >= sizeof(buf)) {
        meter_webhook_invalid(ev, 400, "no usable Stripe-Signature header");
        return 0;
    }

    memcpy(buf, h, strlen(h) + 1);
    t[0] = '\0';

    for (tok = strtok_r(buf, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save))
    {
        while (*tok == ' ') {
            tok++;
        }

        if (strncmp(tok, "t=", 2) == 0 && strlen(tok + 2) < sizeof(t)) {
            memcpy(t, tok + 2, strlen(tok + 2) + 1);
        }
    }

    if (t[0] == '\0' || strspn(t, "0123456789") != strlen(t)) {
        meter_webhook_invalid(ev, 400, "Stripe-Signature without a valid t=");
        return 0;
    }

    ts = (time_t) strtoll(t, NULL, 10);

    if (ts < req->now - st->webhook_tolerance
        || ts > req->now + st->webhook_tolerance)
    {
        meter_webhook_invalid(ev, 400, "Stripe-Signature timestamp outside "
                              "the tolerance");
        return 0;
    }

    if (meter_hmac_hex(st->webhook_secret, strlen(st->webhook_secret), t,
                       req->body, req->body_len, mac) != 0)
    {
        meter_webhook_invalid(ev, 500, "HMAC failed");
        ev->kind = METER_WEBHOOK_INVALID;
        return 0;
    }

    memcpy(buf, h, strlen(h) + 1);
    ok = 0;

    for (tok = strtok_r(buf, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save))
    {
        while (*tok == ' ') {
            tok++;
        }

        eq = strchr(tok, '=');
        if (eq == NULL || (size_t) (eq - tok) != 2
            || strncmp(tok, "v1", 2) != 0)
        {
            continue;
        }

        /* no early exit: every candidate is compared */
        ok |= meter_secure_equal(mac, 64, eq + 1, strlen(eq + 1));
    }

    explicit_bzero(mac, sizeof(mac));

    if (!ok) {
        meter_webhook_invalid(ev, 400, "Stripe-Signature does not match");
        return 0;
    }

    return 1;
}


static void
meter_stripe_webhook(meter_provider_t *p, const meter_webhook_req_t *req,
    meter_webhook_event_t *ev)
{
    double           created;
    cJSON           *json;
    const char      *id, *type, *status, *cus, *sub;
    const cJSON     *obj;
    meter_stripe_t  *st;

    st = p->data;
    json = NULL;

    memset(ev, 0, sizeof(*ev));

    if (!meter_stripe_verify(st, req, ev)) {
        return;
    }

    json = cJSON_ParseWithLength(req->body, req->body_len);
    if (json == NULL) {
        meter_webhook_invalid(ev, 400, "the body is not JSON");
        goto end;
    }

    id = meter_json_str(json, "id", (char *) NULL);
    type = meter_json_str(json, "type", (char *) NULL);
    created = meter_json_num(json, "created", (char *) NULL);
    obj = meter_json_obj(json, "data", "object");

    if (id == NULL || type == NULL || created < 0 || !cJSON_IsObject(obj)
        || meter_copy(ev->event_id, sizeof(ev->event_id), id) != 0)
    {
        meter_webhook_invalid(ev, 400, "not a Stripe event (id, type, "
                              "created, data.object)");
        goto end;
    }

    ev->event_time = meter_time_from_num(created);
    ev->kind = METER_WEBHOOK_IGNORE;

    if (strcmp(type, "invoice.payment_failed") == 0) {
        ev->kind = METER_WEBHOOK_DELINQUENT;
        cus = meter_stripe_ref(obj, "customer");
        sub = meter_stripe_ref(obj, "subscription");
        if (sub == NULL) {
            /* API versions since 2025-03-31 move it under parent */
            sub = meter_json_str(obj, "parent", "subscription_details",
                                 "subscription", (char *) NULL);
        }

    } else if (strcmp(type, "invoice.paid") == 0) {
        /* the poll repairs this if another invoice is still overdue */
        ev->kind = METER_WEBHOOK_PAID;
        cus = meter_stripe_ref(obj, "customer");
        sub = meter_stripe_ref(obj, "subscription");
        if (sub == NULL) {
            sub = meter_json_str(obj, "parent", "subscription_details",
                                 "subscription", (char *) NULL);
        }

    } else if (strcmp(type, "customer.subscription.updated") == 0) {
        status = meter_json_str(obj, "status", (char *) NULL);
        cus = meter_stripe_ref(obj, "customer");
        sub = meter_json_str(obj, "id", (char *) NULL);

        if (status != NULL
            && (strcmp(status, "past_due") == 0
                || strcmp(status, "unpaid") == 0))
        {
            ev->kind = METER_WEBHOOK_DELINQUENT;

        } else if (status != NULL
                   && (strcmp(status, "active") == 0
                       || strcmp(status, "trialing") == 0))
        {
            ev->kind = METER_WEBHOOK_PAID;
        }

    } else {
        /* customer.subscription.deleted and the rest: ending a
         * subscription settles no invoice; the poll clears a mark once
         * Stripe lists nothing overdue */
        cus = NULL;
        sub = NULL;
    }

    meter_webhook_ids(ev, cus, sub);

end:

    cJSON_Delete(json);
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
