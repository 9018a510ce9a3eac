
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
 * A figure's record (a gauge or unique count, month to date: figures.c)
 * carries the figure itself at the end of its latest hour, for a meter
 * created with default_aggregation[formula]=last (the formulas are count,
 * sum and last: stripe/stripe-dotnet src/Stripe.net/Services/Billing/
 * Meters/MeterDefaultAggregationOptions.cs), and usage_records action=set.
 *
 * Stripe allows one concurrent call per customer and meter: the worker
 * sends one record at a time, so this holds.  stripe.max_rps defaults to
 * 25 for test keys (sk_test_, rk_test_: sandbox calls count against the
 * basic 25/s) and to the meter-event limit of 1,000/s live (100/s, the
 * global limit, for usage_records).
 *
 * Every v1 and v2 call carries Stripe-Version (stripe.api_version, default
 * the version stripe-node pins in src/apiVersion.ts; its RequestSender.ts
 * _makeHeaders sends it on every request), so request and webhook shapes
 * do not follow the account's dashboard default.
 *
 * An identifier is unique "within a rolling period of at least 24 hours":
 * a record resent after that whose first outcome is unknown is not sent
 * blindly; lookup() reads Stripe's own count for the record's period
 * (GET /v1/billing/meters/{id}/event_summaries, stripe-node
 * src/resources/Billing/Meters.ts listEventSummaries) and decides.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "config.h"
#include "http.h"
#include "log.h"
#include "meter_schema.h"
#include "scripts.h"
#include "provider.h"
#include "provider_util.h"
#include "redis.h"
#include "util.h"


#define METER_STRIPE_MAX_AGE     (35 * 86400)
#define METER_STRIPE_MAX_AHEAD   300
#define METER_STRIPE_PAGES       10000
#define METER_STRIPE_META        "nginx_meter_customer"
/* stripe-node src/apiVersion.ts ApiVersion */
#define METER_STRIPE_VERSION     "2026-07-29.dahlia"
/* usage records were removed in this version */
#define METER_STRIPE_BASIL       "2025-03-31"
/* identifier and Idempotency-Key memory: at least 24 h */
#define METER_STRIPE_WINDOW      86400
#define METER_STRIPE_METERS      16
#define METER_STRIPE_LATE_KEEP   (35 * 86400)
/* subscription periods fetched per chunk for the late check */
#define METER_STRIPE_PREFETCH    100


typedef enum {
    METER_STRIPE_METER_EVENTS = 0,
    METER_STRIPE_USAGE_RECORDS,
    METER_STRIPE_STREAM
} meter_stripe_mode_e;


/* a meter looked up by event name (event_summaries needs its id) */
typedef struct {
    char                        event_name[101];
    char                        id[128];
    char                        formula[16];    /* sum, count, last */
} meter_stripe_meter_t;


/* the subscription's current period start, cached for the grace check */
typedef struct {
    char                        id[128];
    time_t                      start;
    time_t                      fetched;
} meter_stripe_period_t;


typedef struct {
    meter_http_t                http;
    meter_stripe_mode_e         mode;
    char                        version[64];
    char                        version_hdr[96];    /* Stripe-Version: */
    time_t                      invoice_grace;
    meter_stripe_meter_t        meters[METER_STRIPE_METERS];
    int                         nmeters;
    meter_map_t                 periods;        /* subscription id ->
                                                 * meter_stripe_period_t */
    char                      **meter_ids;      /* "meter", "id" pairs */
    size_t                      nmeter_ids;
    /* Redis, for marks made outside the drain (async rejections, late
     * usage); connected when first needed */
    meter_redis_t               redis;
    char                       *redis_host;
    char                       *redis_unix;
    char                       *redis_password_file;
    int                         redis_port;
    int                         redis_db;
    int64_t                     redis_timeout_ms;
    char                        base[256];
    char                        stream[256];
    int                         defer_late;     /* send_batch checks
                                                 * lateness afterwards */
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
static meter_stripe_period_t *meter_stripe_period_get(meter_stripe_t *st,
    const char *sub, time_t now);
static meter_stripe_period_t *meter_stripe_period_put(meter_stripe_t *st,
    const char *sub, time_t start, time_t now);
static time_t meter_stripe_period_start(const cJSON *json);
static void meter_stripe_late_prefetch(meter_stripe_t *st,
    const meter_record_t *recs, size_t n);
static meter_send_e meter_stripe_check(meter_stripe_t *st,
    const meter_record_t *rec, time_t *ts_out, time_t *now_out,
    meter_send_result_t *res);
static void meter_stripe_stream_many(meter_stripe_t *st,
    const meter_record_t *recs, size_t n, meter_send_result_t *res);
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
static int meter_stripe_lookup(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static void meter_stripe_late(meter_stripe_t *st, const meter_record_t *rec,
    time_t ts, time_t now);
static int meter_stripe_redis(meter_stripe_t *st);


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


/*
 * stripe.api_version: "YYYY-MM-DD" or "YYYY-MM-DD.name"; usage_records
 * needs one before basil, where Stripe removed them.
 */
static int
meter_stripe_setup_version(meter_stripe_t *st, const meter_conf_t *cf,
    char *err, size_t errlen)
{
    size_t       i, n;
    const char  *v;

    v = meter_conf_get(cf, "stripe.api_version");
    if (v == NULL) {
        v = METER_STRIPE_VERSION;
    }

    n = strlen(v);

    for (i = 0; i < n && i < 10; i++) {
        if ((i == 4 || i == 7) ? v[i] != '-' : (v[i] < '0' || v[i] > '9')) {
            break;
        }
    }

    if (i != 10 || n >= sizeof(st->version)
        || (n > 10 && (v[10] != '.' || n == 11
                       || strspn(v + 11, "abcdefghijklmnopqrstuvwxyz")
                          != n - 11)))
    {
        snprintf(err, errlen, "stripe.api_version: \"%.40s\" is not a Stripe "
                 "API version (YYYY-MM-DD or YYYY-MM-DD.name, e.g. %s)", v,
                 METER_STRIPE_VERSION);
        return -1;
    }

    memcpy(st->version, v, n + 1);
    snprintf(st->version_hdr, sizeof(st->version_hdr), "Stripe-Version: %s",
             st->version);

    if (st->mode == METER_STRIPE_USAGE_RECORDS
        && strncmp(st->version, METER_STRIPE_BASIL, 10) >= 0)
    {
        snprintf(err, errlen, "stripe.mode = usage_records needs "
                 "stripe.api_version before 2025-03-31.basil, which removed "
                 "usage records (now %s%s); set the version the account "
                 "is pinned to, e.g. 2025-02-24.acacia, or use meter_events",
                 st->version, meter_conf_get(cf, "stripe.api_version") == NULL
                 ? ", the default" : "");
        return -1;
    }

    return 0;
}


/* stripe.invoice_grace, stripe.meter_id.METER, Redis settings */
static int
meter_stripe_setup_more(meter_stripe_t *st, const meter_conf_t *cf,
    char *err, size_t errlen)
{
    size_t       i, k;
    int64_t      ms;
    const char  *v;

    /* invoices finalize 1 h after the period by default (up to 72 h) */
    st->invoice_grace = 3600;
    v = meter_conf_get(cf, "stripe.invoice_grace");
    if (v != NULL) {
        if (meter_parse_duration(v, &ms) != 0 || ms < 0
            || ms > 72 * 3600 * 1000LL)
        {
            snprintf(err, errlen, "stripe.invoice_grace: \"%s\" is not a "
                     "duration of 0 to 72h", v);
            return -1;
        }

        st->invoice_grace = (time_t) (ms / 1000);
    }

    for (i = 0; i < cf->nkv; i++) {
        if (strncmp(cf->kv[i].key, "stripe.meter_id.", 16) == 0) {
            st->nmeter_ids += 2;
        }
    }

    if (st->nmeter_ids > 0) {
        st->meter_ids = calloc(st->nmeter_ids, sizeof(char *));
        if (st->meter_ids == NULL) {
            goto nomem;
        }

        k = 0;

        for (i = 0; i < cf->nkv; i++) {
            if (strncmp(cf->kv[i].key, "stripe.meter_id.", 16) != 0) {
                continue;
            }

            st->meter_ids[k] = strdup(cf->kv[i].key + 16);
            st->meter_ids[k + 1] = strdup(cf->kv[i].value);
            if (st->meter_ids[k] == NULL || st->meter_ids[k + 1] == NULL) {
                goto nomem;
            }

            k += 2;
        }
    }

    st->redis_port = cf->redis_port;
    st->redis_db = cf->redis_db;
    st->redis_timeout_ms = cf->redis_timeout_ms;

    if ((cf->redis_host != NULL
         && (st->redis_host = strdup(cf->redis_host)) == NULL)
        || (cf->redis_unix != NULL
            && (st->redis_unix = strdup(cf->redis_unix)) == NULL)
        || (cf->redis_password_file != NULL
            && (st->redis_password_file = strdup(cf->redis_password_file))
               == NULL))
    {
        goto nomem;
    }

    return 0;

nomem:

    snprintf(err, errlen, "stripe: out of memory");
    return -1;
}


static int
meter_stripe_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    size_t           n;
    double           rps;
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

    if (meter_stripe_setup_version(st, cf, err, errlen) != 0
        || meter_stripe_setup_more(st, cf, err, errlen) != 0)
    {
        return -1;
    }

    /* Stripe's rate limits: sandbox (test keys) 25/s for everything; live
     * 1,000/s for meter events, 100/s for the rest */
    if (strncmp(st->api_key, "sk_test_", 8) == 0
        || strncmp(st->api_key, "rk_test_", 8) == 0)
    {
        rps = 25;

    } else {
        rps = (st->mode == METER_STRIPE_USAGE_RECORDS) ? 100 : 1000;
    }

    /* enough open requests to reach the rate at a 50 ms round trip; the
     * stream carries 100 events per request */
    if (meter_http_init_many(&st->http, "stripe", cf, rps,
                             st->mode == METER_STRIPE_STREAM ? 50 : 100,
                             err, errlen) != 0)
    {
        return -1;
    }

    /* a chunk lasts about 2 s at max_rps (a SIGTERM waits for the chunk
     * in flight): 2,000 v1 calls at 1,000/s, 100 at the sandbox's 25/s */
    rps = (st->http.max_rps > 0) ? st->http.max_rps : 1e6;
    rps *= (st->mode == METER_STRIPE_STREAM) ? 200 : 2;
    p->batch_max = rps < 100 ? 100 : rps > 5000 ? 5000 : (size_t) rps;
    if (st->mode != METER_STRIPE_STREAM && p->batch_max > 2000) {
        p->batch_max = 2000;
    }

    return 0;
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


/* Idempotency-Key (idem, a whole header line, or NULL) and Stripe-Version
 * on every request, as stripe-node's RequestSender.ts _makeHeaders does */
static void
meter_stripe_headers(meter_stripe_t *st, meter_http_req_t *req,
    const char *idem)
{
    int  n;

    n = 0;

    if (idem != NULL) {
        req->headers[n++] = idem;
    }

    req->headers[n] = st->version_hdr;
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
    time_t              until;
    const cJSON        *tok, *exp;

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
    meter_stripe_headers(st, &req, NULL);

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

    /* renewed a minute before expires_at (an RFC 3339 string: stripe-node
     * src/resources/V2/Billing/MeterEventSession.ts); valid 15 minutes
     * when it is missing */
    exp = cJSON_GetObjectItemCaseSensitive(json, "expires_at");
    until = cJSON_IsString(exp) ? meter_rfc3339_parse(exp->valuestring) : -1;
    if (until <= 0) {
        until = time(NULL) + 15 * 60;
    }

    st->token_until = until - 60;
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


/* v2 errors: type temporary_session_expired (stripe-node src/Error.ts
 * generateV2Error), code billing_meter_event_session_expired */
static int
meter_stripe_session_expired(const meter_http_resp_t *resp)
{
    return resp->status == 401 && resp->body.data != NULL
           && (strstr(resp->body.data, "billing_meter_event_session_expired")
               != NULL
               || strstr(resp->body.data, "temporary_session_expired")
                  != NULL);
}


/* the request body of up to 100 events; NULL when out of memory */
static char *
meter_stripe_stream_body(meter_stripe_t *st, const meter_record_t *recs,
    size_t n)
{
    char          *js, tbuf[32], num[24];
    size_t         i;
    time_t         ts, now;
    cJSON         *json, *events, *ev, *payload;
    meter_send_result_t  chk;

    js = NULL;
    json = cJSON_CreateObject();
    events = cJSON_AddArrayToObject(json, "events");
    if (events == NULL) {
        goto end;
    }

    for (i = 0; i < n; i++) {
        (void) meter_stripe_check(st, &recs[i], &ts, &now, &chk);
        meter_rfc3339(ts, tbuf, sizeof(tbuf));
        snprintf(num, sizeof(num), "%llu",
                 (unsigned long long) recs[i].quantity);

        ev = cJSON_CreateObject();
        if (ev == NULL) {
            goto end;
        }

        cJSON_AddItemToArray(events, ev);
        payload = cJSON_AddObjectToObject(ev, "payload");

        if (payload == NULL
            || cJSON_AddStringToObject(ev, "identifier",
                                       recs[i].idempotency_key) == NULL
            || cJSON_AddStringToObject(ev, "event_name",
                                       recs[i].provider_meter) == NULL
            || cJSON_AddStringToObject(ev, "timestamp", tbuf) == NULL
            || cJSON_AddStringToObject(payload, st->customer_key,
                                       recs[i].provider_customer) == NULL
            || cJSON_AddStringToObject(payload, st->value_key, num) == NULL)
        {
            goto end;
        }
    }

    js = cJSON_PrintUnformatted(json);

end:

    cJSON_Delete(json);

    return js;
}


/*
 * Records (checked already) through the v2 stream: requests of up to per
 * events, concurrently.  The stream answers for a request as a whole
 * (validation is asynchronous: error reports come as webhooks), so a
 * request refused with several events in it is split into one request per
 * event, and only the event at fault is refused; identifiers dedupe what
 * an earlier request may have delivered.  An expired session is renewed
 * once (renew).
 */
static void
meter_stripe_stream_run(meter_stripe_t *st, const meter_record_t *recs,
    size_t n, meter_send_result_t *res, size_t per, int renew)
{
    char                *url;
    size_t               i, j, g, ng, cnt;
    time_t               ts, now;
    meter_http_job_t    *jobs;
    meter_http_req_t    *reqs;
    char               **bodies;
    meter_send_result_t  sr;

    if (n == 0) {
        return;
    }

    memset(&sr, 0, sizeof(sr));

    if (st->token[0] == '\0' || time(NULL) >= st->token_until) {
        if (meter_stripe_session(st, &sr) != 0) {
            for (i = 0; i < n; i++) {
                res[i] = sr;
            }

            return;
        }
    }

    ng = (n + per - 1) / per;
    jobs = calloc(ng, sizeof(meter_http_job_t));
    reqs = calloc(ng, sizeof(meter_http_req_t));
    bodies = calloc(ng, sizeof(char *));
    url = NULL;

    if (jobs == NULL || reqs == NULL || bodies == NULL
        || asprintf(&url, "%s/v2/billing/meter_event_stream", st->stream) < 0)
    {
        url = NULL;
        goto nomem;
    }

    for (g = 0; g < ng; g++) {
        cnt = (g == ng - 1) ? n - g * per : per;

        bodies[g] = meter_stripe_stream_body(st, &recs[g * per], cnt);
        if (bodies[g] == NULL) {
            goto nomem;
        }

        reqs[g].method = "POST";
        reqs[g].url = url;
        reqs[g].content_type = "application/json";
        reqs[g].body = bodies[g];
        reqs[g].body_len = strlen(bodies[g]);
        reqs[g].auth = METER_HTTP_AUTH_BEARER;
        reqs[g].secret = st->token;
        meter_stripe_headers(st, &reqs[g], NULL);
        jobs[g].req = &reqs[g];
    }

    meter_http_request_many(&st->http, jobs, ng);

    for (g = 0; g < ng; g++) {
        i = g * per;
        cnt = (g == ng - 1) ? n - i : per;

        if (jobs[g].st == METER_SEND_FATAL && renew
            && meter_stripe_session_expired(&jobs[g].resp))
        {
            /* a new session, once */
            st->token[0] = '\0';
            meter_stripe_stream_run(st, &recs[i], cnt, &res[i], per, 0);
            continue;
        }

        if (jobs[g].st == METER_SEND_FATAL && cnt > 1
            && jobs[g].resp.status >= 400 && jobs[g].resp.status < 500
            && jobs[g].resp.status != 401 && jobs[g].resp.status != 403)
        {
            meter_log(LOG_WARNING, "stripe: the meter event stream refused "
                      "%zu events together (%s); sending them one by one",
                      cnt, jobs[g].res.error);
            meter_stripe_stream_run(st, &recs[i], cnt, &res[i], 1, renew);
            continue;
        }

        for (j = i; j < i + cnt; j++) {
            res[j] = jobs[g].res;
            res[j].status = jobs[g].st;

            if (jobs[g].st == METER_SEND_OK && !st->defer_late) {
                (void) meter_stripe_check(st, &recs[j], &ts, &now, &sr);
                meter_stripe_late(st, &recs[j], ts, now);
            }
        }
    }

    goto end;

nomem:

    for (i = 0; i < n; i++) {
        memset(&res[i], 0, sizeof(res[i]));
        res[i].status = METER_SEND_RETRY;
        snprintf(res[i].error, sizeof(res[i].error), "stripe: out of memory");
    }

end:

    if (jobs != NULL) {
        for (g = 0; g < ng; g++) {
            if (jobs[g].resp.body.data != NULL) {
                explicit_bzero(jobs[g].resp.body.data, jobs[g].resp.body.len);
            }

            meter_buf_free(&jobs[g].resp.body);
        }
    }

    if (bodies != NULL) {
        for (g = 0; g < ng; g++) {
            cJSON_free(bodies[g]);
        }
    }

    free(url);
    free(bodies);
    free(reqs);
    free(jobs);
}


static void
meter_stripe_stream_many(meter_stripe_t *st, const meter_record_t *recs,
    size_t n, meter_send_result_t *res)
{
    meter_stripe_stream_run(st, recs, n, res, 100, 1);
}


/* one record's request, built before it is sent (alone or with others) */
typedef struct {
    meter_buf_t                 url;
    meter_buf_t                 body;
    char                        idem[300];
    char                        serial[300];
    time_t                      ts;
    time_t                      now;
    meter_http_req_t            req;
} meter_stripe_out_t;


/*
 * The event's timestamp: the last second of the period; for a period still
 * running (a drain with --before in the future) the present, which is
 * inside it too: Stripe refuses timestamps more than 5 minutes ahead.
 * METER_SEND_OK, or FATAL with res filled for what Stripe refuses anyway.
 */
static meter_send_e
meter_stripe_check(meter_stripe_t *st, const meter_record_t *rec,
    time_t *ts_out, time_t *now_out, meter_send_result_t *res)
{
    time_t  ts, now;

    memset(res, 0, sizeof(*res));
    res->status = METER_SEND_FATAL;

    /* a figure's: the end of its latest hour, increasing per customer
     * and meter (figures.c), so that the meter's "last" is the newest */
    ts = (rec->figure && rec->usage_end > 0) ? rec->usage_end - 1
                                             : rec->period_end - 1;
    now = time(NULL);

    if (ts > now && rec->period_start <= now) {
        ts = now;
    }

    *ts_out = ts;
    *now_out = now;

    /* Stripe refuses these anyway: say why instead of a 400 later */
    if (ts < now - METER_STRIPE_MAX_AGE) {
        snprintf(res->error, sizeof(res->error),
                 "stripe: record of %lld is older than the 35 days Stripe "
                 "accepts", (long long) rec->period_start);
        return METER_SEND_FATAL;
    }

    if (ts > now + METER_STRIPE_MAX_AHEAD) {
        snprintf(res->error, sizeof(res->error),
                 "stripe: record of %lld is more than 5 minutes in the "
                 "future", (long long) rec->period_start);
        return METER_SEND_FATAL;
    }

    if (st->mode != METER_STRIPE_USAGE_RECORDS
        && (rec->provider_customer == NULL || rec->provider_meter == NULL))
    {
        snprintf(res->error, sizeof(res->error), "stripe: record without %s",
                 rec->provider_customer == NULL
                 ? "a Stripe customer" : "a meter event name");
        return METER_SEND_FATAL;
    }

    res->status = METER_SEND_OK;

    return METER_SEND_OK;
}


/* a v1 request (meter event or usage record); OK, or res filled */
static meter_send_e
meter_stripe_build(meter_stripe_t *st, const meter_record_t *rec,
    meter_stripe_out_t *o, meter_send_result_t *res)
{
    char  pk[96];

    memset(o, 0, sizeof(*o));

    if (meter_stripe_check(st, rec, &o->ts, &o->now, res) != METER_SEND_OK) {
        return res->status;
    }

    if (st->mode == METER_STRIPE_METER_EVENTS) {
        if (meter_buf_printf(&o->url, "%s/v1/billing/meter_events", st->base)
            != 0
            || meter_form_add(&o->body, st->http.curl, "event_name",
                              rec->provider_meter) != 0)
        {
            goto nomem;
        }

        snprintf(pk, sizeof(pk), "payload[%s]", st->customer_key);
        if (meter_form_add(&o->body, st->http.curl, pk,
                           rec->provider_customer) != 0)
        {
            goto nomem;
        }

        snprintf(pk, sizeof(pk), "payload[%s]", st->value_key);
        if (meter_form_add_u64(&o->body, st->http.curl, pk,
                               (unsigned long long) rec->quantity) != 0
            || meter_form_add(&o->body, st->http.curl, "identifier",
                              rec->idempotency_key) != 0
            || meter_form_add_u64(&o->body, st->http.curl, "timestamp",
                                  (unsigned long long) o->ts) != 0)
        {
            goto nomem;
        }

        /* one concurrent call per customer and meter (PROVIDERS.md) */
        snprintf(o->serial, sizeof(o->serial), "%s\n%s",
                 rec->provider_customer, rec->provider_meter);

    } else {
        if (rec->subscription_item == NULL) {
            snprintf(res->error, sizeof(res->error),
                     "stripe: record without a subscription item "
                     "(usage_records mode)");
            res->status = METER_SEND_FATAL;
            return METER_SEND_FATAL;
        }

        if (meter_buf_printf(&o->url, "%s/v1/subscription_items/", st->base)
            != 0
            || meter_url_segment(&o->url, st->http.curl,
                                 rec->subscription_item) != 0
            || meter_buf_printf(&o->url, "/usage_records") != 0
            || meter_form_add_u64(&o->body, st->http.curl, "quantity",
                                  (unsigned long long) rec->quantity) != 0
            || meter_form_add_u64(&o->body, st->http.curl, "timestamp",
                                  (unsigned long long) o->ts) != 0
            || meter_form_add(&o->body, st->http.curl, "action",
                              rec->figure ? "set" : "increment") != 0)
        {
            goto nomem;
        }

        snprintf(o->serial, sizeof(o->serial), "%s", rec->subscription_item);
    }

    snprintf(o->idem, sizeof(o->idem), "Idempotency-Key: %s",
             rec->idempotency_key);

    o->req.method = "POST";
    o->req.url = o->url.data;
    o->req.content_type = "application/x-www-form-urlencoded";
    o->req.body = o->body.data;
    o->req.body_len = o->body.len;
    meter_stripe_headers(st, &o->req, o->idem);
    o->req.auth = METER_HTTP_AUTH_BEARER;
    o->req.secret = st->api_key;

    return METER_SEND_OK;

nomem:

    snprintf(res->error, sizeof(res->error), "stripe: out of memory");
    res->status = METER_SEND_RETRY;

    return METER_SEND_RETRY;
}


static void
meter_stripe_out_free(meter_stripe_out_t *o)
{
    meter_buf_free(&o->url);
    meter_buf_free(&o->body);
}


/* what a v1 answer means for the record */
static meter_send_e
meter_stripe_answer(meter_stripe_t *st, const meter_record_t *rec,
    meter_stripe_out_t *o, meter_http_resp_t *resp, meter_send_e rc,
    meter_send_result_t *res, int late)
{
    char  fresh[24];

    /*
     * Stripe saves the first answer of a key, 500s and 400s included, and
     * replays it for 24 h.  A meter event is deduped by its identifier
     * anyway, so a replayed failure (a 500, or a 400 whose cause the admin
     * fixed before "meterctl retry") is tried once under a fresh header key.
     */
    if (rc != METER_SEND_OK && resp->replayed
        && st->mode == METER_STRIPE_METER_EVENTS)
    {
        meter_fresh_suffix(fresh, sizeof(fresh));
        snprintf(o->idem, sizeof(o->idem), "Idempotency-Key: %s%s",
                 rec->idempotency_key, fresh);
        rc = meter_http_request(&st->http, &o->req, resp, res);
    }

    if (rc == METER_SEND_FATAL && meter_stripe_duplicate(resp)) {
        res->status = METER_SEND_OK;
        res->error[0] = '\0';
        rc = METER_SEND_OK;
    }

    if (rc == METER_SEND_OK && late) {
        meter_stripe_late(st, rec, o->ts, o->now);
    }

    return rc;
}


static meter_send_e
meter_stripe_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    time_t              ts, now;
    meter_send_e        rc;
    meter_stripe_t     *st;
    meter_http_resp_t   resp;
    meter_stripe_out_t  o;

    st = p->data;

    if (st->mode == METER_STRIPE_STREAM) {
        if (meter_stripe_check(st, rec, &ts, &now, res) != METER_SEND_OK) {
            return res->status;
        }

        meter_stripe_stream_many(st, rec, 1, res);
        return res->status;
    }

    memset(&resp, 0, sizeof(resp));

    rc = meter_stripe_build(st, rec, &o, res);
    if (rc == METER_SEND_OK) {
        rc = meter_http_request(&st->http, &o.req, &resp, res);
        rc = meter_stripe_answer(st, rec, &o, &resp, rc, res, 1);
    }

    meter_stripe_out_free(&o);
    meter_buf_free(&resp.body);

    return rc;
}


/*
 * A chunk of new records: v1 calls concurrently (never two for one
 * customer and meter at once), the stream in requests of up to 100 events.
 */
static void
meter_stripe_send_batch(meter_provider_t *p, const meter_record_t *recs,
    size_t n, meter_send_result_t *res)
{
    char                 fresh[24];
    size_t               i, k, m, *idx;
    time_t               ts, now;
    meter_stripe_t      *st;
    meter_http_job_t    *jobs, *again;
    meter_stripe_out_t  *outs;
    meter_record_t      *ok;

    st = p->data;

    if (st->mode == METER_STRIPE_STREAM) {
        ok = calloc(n, sizeof(meter_record_t));
        idx = calloc(n, sizeof(size_t));
        meter_send_result_t  *r2 = calloc(n, sizeof(meter_send_result_t));

        if (ok == NULL || idx == NULL || r2 == NULL) {
            free(ok);
            free(idx);
            free(r2);
            goto nomem;
        }

        for (i = 0, m = 0; i < n; i++) {
            if (meter_stripe_check(st, &recs[i], &ts, &now, &res[i])
                == METER_SEND_OK)
            {
                ok[m] = recs[i];
                idx[m++] = i;
            }
        }

        st->defer_late = 1;
        meter_stripe_stream_many(st, ok, m, r2);
        st->defer_late = 0;
        meter_stripe_late_prefetch(st, ok, m);
        st->defer_late = 1;

        for (i = 0; i < m; i++) {
            if (r2[i].status == METER_SEND_OK) {
                (void) meter_stripe_check(st, &ok[i], &ts, &now, &r2[i]);
                r2[i].status = METER_SEND_OK;
                r2[i].error[0] = '\0';
                meter_stripe_late(st, &ok[i], ts, now);
            }
        }

        st->defer_late = 0;

        for (i = 0; i < m; i++) {
            res[idx[i]] = r2[i];
        }

        free(ok);
        free(idx);
        free(r2);
        return;
    }

    jobs = calloc(n, sizeof(meter_http_job_t));
    again = calloc(n, sizeof(meter_http_job_t));
    outs = calloc(n, sizeof(meter_stripe_out_t));
    idx = calloc(n, sizeof(size_t));

    if (jobs == NULL || again == NULL || outs == NULL || idx == NULL) {
        free(jobs);
        free(again);
        free(outs);
        free(idx);
        goto nomem;
    }

    for (i = 0, m = 0; i < n; i++) {
        if (meter_stripe_build(st, &recs[i], &outs[i], &res[i])
            == METER_SEND_OK)
        {
            jobs[m].req = &outs[i].req;
            jobs[m].serial = outs[i].serial;
            idx[m++] = i;
        }
    }

    meter_http_request_many(&st->http, jobs, m);

    /* replayed failures (a resumed record's key, Stripe saved its 5xx):
     * resent together under fresh header keys, as meter_stripe_answer
     * does one; the identifier still dedupes */
    for (i = 0, k = 0; i < m; i++) {
        if (jobs[i].st != METER_SEND_OK && jobs[i].resp.replayed) {
            meter_fresh_suffix(fresh, sizeof(fresh));
            snprintf(outs[idx[i]].idem, sizeof(outs[idx[i]].idem),
                     "Idempotency-Key: %s%s", recs[idx[i]].idempotency_key,
                     fresh);
            meter_buf_free(&jobs[i].resp.body);
            again[k++] = jobs[i];
        }
    }

    meter_http_request_many(&st->http, again, k);

    for (i = 0, k = 0; i < m; i++) {
        if (jobs[i].st != METER_SEND_OK && jobs[i].resp.replayed) {
            jobs[i] = again[k++];
        }

        res[idx[i]] = jobs[i].res;
        res[idx[i]].status = meter_stripe_answer(st, &recs[idx[i]],
                                                 &outs[idx[i]],
                                                 &jobs[i].resp, jobs[i].st,
                                                 &res[idx[i]], 0);
        meter_buf_free(&jobs[i].resp.body);
    }

    /* after the sends, as send() does: the late checks, their periods
     * fetched together */
    meter_stripe_late_prefetch(st, recs, n);
    st->defer_late = 1;

    for (i = 0; i < n; i++) {
        if (res[i].status == METER_SEND_OK) {
            meter_stripe_late(st, &recs[i], outs[i].ts, outs[i].now);
        }
    }

    st->defer_late = 0;

    for (i = 0; i < n; i++) {
        meter_stripe_out_free(&outs[i]);
    }

    free(jobs);
    free(again);
    free(outs);
    free(idx);

    return;

nomem:

    for (i = 0; i < n; i++) {
        memset(&res[i], 0, sizeof(res[i]));
        res[i].status = METER_SEND_RETRY;
        snprintf(res[i].error, sizeof(res[i].error), "stripe: out of memory");
    }
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
    }

    meter_stripe_headers(st, &req, idem != NULL ? hdr : NULL);

    return meter_http_json(&st->http, &req, json, replayed, res);
}


/* 1 when w is one of the space-separated words of list: whole words, as
 * "incomplete" is a prefix of "incomplete_expired" */
static int
meter_stripe_word_in(const char *list, const char *w)
{
    size_t       n;
    const char  *p;

    n = strlen(w);
    if (n == 0) {
        return 0;
    }

    for (p = list; (p = strstr(p, w)) != NULL; p++) {
        if ((p == list || p[-1] == ' ') && (p[n] == '\0' || p[n] == ' ')) {
            return 1;
        }
    }

    return 0;
}


/* one object of a list; 0 go on, 1 stop: found, -1 stop with res filled */
typedef int (*meter_stripe_item_pt)(meter_stripe_t *st, const cJSON *o,
    void *data, meter_send_result_t *res);


typedef struct {
    meter_stripe_t             *st;
    meter_stripe_item_pt        item;
    void                       *data;
} meter_stripe_walk_t;


static meter_send_e
meter_stripe_list_get(void *ctx, const char *url, cJSON **json,
    meter_send_result_t *res)
{
    meter_stripe_walk_t  *w;

    w = ctx;

    return meter_stripe_call(w->st, url, NULL, NULL, json, NULL, res);
}


static int
meter_stripe_list_item(void *ctx, const cJSON *o, meter_send_result_t *res)
{
    meter_stripe_walk_t  *w;

    w = ctx;

    return w->item(w->st, o, w->data, res);
}


/* every page of a v1 list (url has a query) until an item stops it: what
 * the item returned, 0 at the end of the list, -1 with res filled */
static int
meter_stripe_list(meter_stripe_t *st, const char *url,
    meter_stripe_item_pt item, void *data, meter_send_result_t *res)
{
    int                   rc;
    meter_buf_t           u;
    meter_list_t          l;
    meter_stripe_walk_t   w;

    memset(&u, 0, sizeof(u));

    if (meter_buf_printf(&u, "%s&limit=100", url) != 0) {
        snprintf(res->error, sizeof(res->error), "stripe: out of memory");
        res->status = METER_SEND_RETRY;
        return -1;
    }

    w.st = st;
    w.item = item;
    w.data = data;

    memset(&l, 0, sizeof(l));
    l.style = METER_LIST_AFTER;
    l.what = "stripe: list";
    l.curl = st->http.curl;
    l.max_pages = METER_STRIPE_PAGES;
    l.get = meter_stripe_list_get;
    l.item = meter_stripe_list_item;
    l.ctx = &w;

    rc = meter_list_walk(&l, u.data, res);

    meter_buf_free(&u);

    return rc;
}


typedef struct {
    const char                 *customer;
    const char                 *skip;
    char                       *id;
    size_t                      size;
} meter_stripe_find_t;


static int
meter_stripe_find_item(meter_stripe_t *st, const cJSON *o, void *data,
    meter_send_result_t *res)
{
    meter_stripe_find_t  *f = data;

    const char  *oid, *meta, *status;

    (void) st;

    oid = meter_json_str(o, "id", (char *) NULL);
    meta = meter_json_str(o, "metadata", METER_STRIPE_META, (char *) NULL);
    status = meter_json_str(o, "status", (char *) NULL);

    if (oid == NULL || meta == NULL || strcmp(meta, f->customer) != 0
        || (status != NULL && f->skip != NULL
            && meter_stripe_word_in(f->skip, status)))
    {
        return 0;
    }

    if (meter_copy(f->id, f->size, oid) != 0) {
        snprintf(res->error, sizeof(res->error), "stripe: id too long");
        res->status = METER_SEND_RETRY;
        return -1;
    }

    return 1;
}


/*
 * Lists url (which has a query) page by page and returns the first object
 * whose metadata[nginx_meter_customer] is customer and whose field
 * "status" is not one of skip: 1 with its id in id, 0 none, -1 error (a
 * list longer than it reads is an error, not "none": that would create a
 * second object).
 */
static int
meter_stripe_find(meter_stripe_t *st, const char *url, const char *customer,
    const char *skip, char *id, size_t size, meter_send_result_t *res)
{
    meter_stripe_find_t  f;

    f.customer = customer;
    f.skip = skip;
    f.id = id;
    f.size = size;

    return meter_stripe_list(st, url, meter_stripe_find_item, &f, res);
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


/*
 * The meter of rec's event name: its id from "stripe.meter_id.METER", else
 * looked up in GET /v1/billing/meters; its formula from the meter object
 * (stripe-node src/resources/Billing/Meters.ts).  NULL with res filled
 * (status RETRY: try later, FATAL: none).
 */
static const meter_stripe_meter_t *
meter_stripe_meter(meter_stripe_t *st, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int                    i;
    size_t                 k;
    cJSON                 *json;
    meter_buf_t            url;
    const char            *id, *name, *formula, *conf_id;
    const cJSON           *o;
    meter_stripe_meter_t  *m;

    for (i = 0; i < st->nmeters; i++) {
        if (strcmp(st->meters[i].event_name, rec->provider_meter) == 0) {
            return &st->meters[i];
        }
    }

    memset(&url, 0, sizeof(url));
    json = NULL;
    m = NULL;
    conf_id = NULL;

    for (k = 0; k + 1 < st->nmeter_ids; k += 2) {
        if (strcmp(st->meter_ids[k], rec->meter) == 0) {
            conf_id = st->meter_ids[k + 1];
        }
    }

    if (conf_id != NULL) {
        if (meter_buf_printf(&url, "%s/v1/billing/meters/", st->base) != 0
            || meter_url_segment(&url, st->http.curl, conf_id) != 0)
        {
            goto nomem;
        }

    } else if (meter_buf_printf(&url, "%s/v1/billing/meters?limit=100",
                                st->base) != 0)
    {
        goto nomem;
    }

    if (meter_stripe_call(st, url.data, NULL, NULL, &json, NULL, res)
        != METER_SEND_OK)
    {
        res->status = METER_SEND_RETRY;
        goto end;
    }

    o = (conf_id != NULL) ? json : meter_json_obj(json, "data", (char *) NULL);
    if (o != NULL && conf_id == NULL) {
        o = o->child;
    }

    for ( /* void */ ; o != NULL; o = (conf_id != NULL) ? NULL : o->next) {
        id = meter_json_str(o, "id", (char *) NULL);
        name = meter_json_str(o, "event_name", (char *) NULL);
        formula = meter_json_str(o, "default_aggregation", "formula",
                                 (char *) NULL);

        if (id == NULL || name == NULL
            || strcmp(name, rec->provider_meter) != 0)
        {
            continue;
        }

        if (st->nmeters == METER_STRIPE_METERS) {
            st->nmeters = 0;
        }

        m = &st->meters[st->nmeters];
        if (meter_copy(m->event_name, sizeof(m->event_name), name) != 0
            || meter_copy(m->id, sizeof(m->id), id) != 0
            || meter_copy(m->formula, sizeof(m->formula),
                          formula ? formula : "sum") != 0)
        {
            m = NULL;
            continue;
        }

        st->nmeters++;
        goto end;
    }

    snprintf(res->error, sizeof(res->error), "stripe: no billing meter for "
             "event \"%s\"%s%s%s", rec->provider_meter,
             conf_id ? " (stripe.meter_id." : "", conf_id ? rec->meter : "",
             conf_id ? " names another)" : " among the first 100 meters; set "
             "stripe.meter_id.METER");
    res->status = METER_SEND_FATAL;

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "stripe: out of memory");
    res->status = METER_SEND_RETRY;

end:

    cJSON_Delete(json);
    meter_buf_free(&url);

    return m;
}


/*
 * A resend whose first send may lie beyond the identifier's 24 h: Stripe
 * would count it again.  Reads Stripe's count of the record's customer
 * and event in its period (event_summaries, start and end on the period's
 * hour boundaries, as the API requires minute alignment) and decides:
 * nothing there: absent, resend (0); exactly this record (the period's
 * first record, the meter's formula applied): present (1); anything else
 * cannot be told apart: dead-lettered with the numbers (-2).
 */
static int
meter_stripe_lookup(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int                          rc;
    char                         a[32], b[32];
    double                       v, want, x;
    cJSON                       *json;
    time_t                       now;
    meter_buf_t                  url;
    const cJSON                 *o;
    meter_stripe_t              *st;
    const meter_stripe_meter_t  *m;

    st = p->data;
    now = time(NULL);

    memset(res, 0, sizeof(*res));

    /* a figure is the month-to-date value itself at its own timestamp, for
     * a meter whose formula is "last" (or action=set): counted twice it is
     * still the same last value, so it is resent */
    if (rec->figure || !meter_past_window(rec, now, METER_STRIPE_WINDOW)) {
        return 0;
    }

    if (st->mode == METER_STRIPE_USAGE_RECORDS) {
        snprintf(res->error, sizeof(res->error), "stripe: outcome unknown "
                 "and first sent more than 24 h ago: Stripe may have "
                 "forgotten its Idempotency-Key and usage records carry no "
                 "identifier; not resent, check the subscription item's "
                 "usage");
        return -2;
    }

    if (rec->provider_customer == NULL || rec->provider_meter == NULL) {
        return 0;       /* send() refuses it */
    }

    m = meter_stripe_meter(st, rec, res);
    if (m == NULL) {
        return res->status == METER_SEND_FATAL ? -2 : -1;
    }

    memset(&url, 0, sizeof(url));
    json = NULL;
    rc = -1;

    if (meter_buf_printf(&url, "%s/v1/billing/meters/", st->base) != 0
        || meter_url_segment(&url, st->http.curl, m->id) != 0
        || meter_buf_printf(&url, "/event_summaries?customer=") != 0
        || meter_url_segment(&url, st->http.curl, rec->provider_customer)
           != 0
        || meter_buf_printf(&url, "&start_time=%lld&end_time=%lld",
                            (long long) rec->period_start,
                            (long long) rec->period_end) != 0)
    {
        snprintf(res->error, sizeof(res->error), "stripe: out of memory");
        goto end;
    }

    if (meter_stripe_call(st, url.data, NULL, NULL, &json, NULL, res)
        != METER_SEND_OK)
    {
        goto end;
    }

    o = cJSON_GetObjectItemCaseSensitive(json, "data");
    if (!cJSON_IsArray(o)) {
        snprintf(res->error, sizeof(res->error),
                 "stripe: event summaries without \"data\"");
        goto end;
    }

    v = 0;

    cJSON_ArrayForEach(o, o) {
        x = meter_json_num(o, "aggregated_value", (char *) NULL);
        v += (x > 0) ? x : 0;
    }

    want = (strcmp(m->formula, "count") == 0) ? 1 : (double) rec->quantity;

    if (v == 0) {
        meter_log(LOG_NOTICE, "stripe: %s past the 24 h identifier window, "
                  "Stripe has nothing in its period: resending",
                  rec->idempotency_key);
        rc = 0;

    } else if (rec->seq == 1 && v == want) {
        meter_log(LOG_NOTICE, "stripe: %s past the 24 h identifier window, "
                  "Stripe counts it already", rec->idempotency_key);
        rc = 1;

    } else {
        meter_rfc3339(rec->period_start, a, sizeof(a));
        meter_rfc3339(rec->period_end, b, sizeof(b));
        snprintf(res->error, sizeof(res->error), "stripe: outcome unknown "
                 "past the 24 h identifier window: Stripe counts %.0f (%s) "
                 "for %s, %s in [%s, %s), this record %llu (record %lu of "
                 "the period): cannot tell whether it is there; not resent",
                 v, m->formula, rec->provider_customer, rec->provider_meter,
                 a, b, (unsigned long long) rec->quantity, rec->seq);
        rc = -2;
    }

end:

    cJSON_Delete(json);
    meter_buf_free(&url);

    return rc;
}


/* a subscription's current period start (on its items since basil); 0
 * unknown */
static time_t
meter_stripe_period_start(const cJSON *json)
{
    double        v;
    const cJSON  *it;

    v = meter_json_num(json, "current_period_start", (char *) NULL);

    it = meter_json_obj(json, "items", "data", (char *) NULL);
    for (it = (it != NULL) ? it->child : NULL; v < 0 && it != NULL;
         it = it->next)
    {
        v = meter_json_num(it, "current_period_start", (char *) NULL);
    }

    return (v > 0 && v < 4e9) ? (time_t) v : 0;
}


/* the cached period of a subscription, or NULL */
static meter_stripe_period_t *
meter_stripe_period_get(meter_stripe_t *st, const char *sub, time_t now)
{
    void  **v;

    (void) now;

    if (st->periods.cap == 0) {
        return NULL;
    }

    v = meter_map_get(&st->periods, sub);

    return (v != NULL) ? *v : NULL;
}


/* caches start (0: not known: no check for 10 minutes, rather than a
 * failing request per record); NULL when out of memory */
static meter_stripe_period_t *
meter_stripe_period_put(meter_stripe_t *st, const char *sub, time_t start,
    time_t now)
{
    int                     created;
    void                  **v;
    meter_stripe_period_t  *pd;

    if (st->periods.cap == 0 && meter_map_init(&st->periods, 64) != 0) {
        return NULL;
    }

    if (st->periods.n >= 100000) {
        /* bounded: start again rather than grow without end */
        meter_map_free(&st->periods, free);
        if (meter_map_init(&st->periods, 64) != 0) {
            return NULL;
        }
    }

    v = meter_map_put(&st->periods, sub, &created);
    if (v == NULL) {
        return NULL;
    }

    if (*v == NULL) {
        *v = calloc(1, sizeof(meter_stripe_period_t));
        if (*v == NULL) {
            return NULL;
        }
    }

    pd = *v;
    (void) meter_copy(pd->id, sizeof(pd->id), sub);
    pd->start = start;
    pd->fetched = now;

    return pd;
}


/*
 * Before the late checks of a chunk: the periods of its subscriptions that
 * are not cached fetched concurrently, not one round trip per record, and
 * at most METER_STRIPE_PREFETCH of them: these GETs count against Stripe's
 * global limit (100/s live), the check is a warning, and later chunks and
 * passes find the rest cached.
 */
static void
meter_stripe_late_prefetch(meter_stripe_t *st, const meter_record_t *recs,
    size_t n)
{
    int                     created;
    char                  **urls;
    size_t                  i, m;
    time_t                  now;
    cJSON                  *json;
    meter_map_t             seen;
    meter_http_req_t       *reqs;
    meter_http_job_t       *jobs;
    const char            **subs;
    meter_stripe_period_t  *pd;

    now = time(NULL);

    if (meter_map_init(&seen, n) != 0) {
        return;
    }

    jobs = calloc(n, sizeof(meter_http_job_t));
    reqs = calloc(n, sizeof(meter_http_req_t));
    urls = calloc(n, sizeof(char *));
    subs = calloc(n, sizeof(char *));
    m = 0;

    if (jobs == NULL || reqs == NULL || urls == NULL || subs == NULL) {
        goto end;
    }

    for (i = 0; i < n; i++) {
        if (recs[i].subscription == NULL
            || recs[i].period_end - 1 >= now - st->invoice_grace)
        {
            continue;
        }

        pd = meter_stripe_period_get(st, recs[i].subscription, now);
        if (pd != NULL && now - pd->fetched <= 600) {
            continue;
        }

        if (m == METER_STRIPE_PREFETCH) {
            break;
        }

        if (meter_map_put(&seen, recs[i].subscription, &created) == NULL
            || !created)
        {
            continue;
        }

        /* ids are [A-Za-z0-9_]: no escaping needed, checked anyway */
        if (strspn(recs[i].subscription, "abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
            != strlen(recs[i].subscription)
            || asprintf(&urls[m], "%s/v1/subscriptions/%s", st->base,
                        recs[i].subscription) < 0)
        {
            urls[m] = NULL;
            continue;
        }

        reqs[m].method = "GET";
        reqs[m].url = urls[m];
        reqs[m].auth = METER_HTTP_AUTH_BEARER;
        reqs[m].secret = st->api_key;
        meter_stripe_headers(st, &reqs[m], NULL);
        jobs[m].req = &reqs[m];
        subs[m] = recs[i].subscription;
        m++;
    }

    meter_http_request_many(&st->http, jobs, m);

    for (i = 0; i < m; i++) {
        json = NULL;
        if (jobs[i].st == METER_SEND_OK) {
            json = cJSON_ParseWithLength(jobs[i].resp.body.data,
                                         jobs[i].resp.body.len);
        }

        (void) meter_stripe_period_put(st, subs[i],
                                       meter_stripe_period_start(json), now);
        cJSON_Delete(json);

        meter_buf_free(&jobs[i].resp.body);
        free(urls[i]);
    }

end:

    meter_map_free(&seen, NULL);
    free(jobs);
    free(reqs);
    free(urls);
    free(subs);
}


/*
 * Stripe finalizes a period's invoice stripe.invoice_grace after the
 * period ends (1 h by default): usage of that period sent later misses
 * it.  After an accepted send whose timestamp is older than the grace,
 * the subscription's current period start (on its items since basil) is
 * compared; a record of an earlier period sent after start + grace is
 * kept in mtr:{worker}:stripe:late for meterctl status.
 */
static void
meter_stripe_late(meter_stripe_t *st, const meter_record_t *rec, time_t ts,
    time_t now)
{
    char                    line[512], score[24], old[24];
    cJSON                  *json;
    time_t                  start;
    meter_buf_t             url;
    const char             *argv[5];
    redisReply             *rp;
    meter_send_result_t     res;
    meter_stripe_period_t  *pd;

    if (ts >= now - st->invoice_grace || rec->subscription == NULL) {
        return;
    }

    pd = meter_stripe_period_get(st, rec->subscription, now);

    if (st->defer_late && (pd == NULL || now - pd->fetched > 600)) {
        /* a chunk: only what its bounded prefetch found is checked */
        return;
    }

    if (pd == NULL || now - pd->fetched > 600) {
        memset(&url, 0, sizeof(url));
        memset(&res, 0, sizeof(res));
        json = NULL;
        start = 0;

        if (meter_buf_printf(&url, "%s/v1/subscriptions/", st->base) == 0
            && meter_url_segment(&url, st->http.curl, rec->subscription) == 0
            && meter_stripe_call(st, url.data, NULL, NULL, &json, NULL, &res)
               == METER_SEND_OK)
        {
            start = meter_stripe_period_start(json);
        }

        cJSON_Delete(json);
        meter_buf_free(&url);

        pd = meter_stripe_period_put(st, rec->subscription, start, now);
        if (pd == NULL) {
            return;
        }
    }

    if (pd->start == 0) {
        return;
    }

    if (ts >= pd->start || now <= pd->start + st->invoice_grace) {
        return;
    }

    meter_log(LOG_WARNING, "stripe: record %s of %lld sent after the "
              "invoice of its period was finalized (period ended %lld, "
              "grace %llds): Stripe will not bill it on that invoice",
              rec->idempotency_key, (long long) rec->period_start,
              (long long) pd->start, (long long) st->invoice_grace);

    if (meter_stripe_redis(st) != 0) {
        return;
    }

    snprintf(line, sizeof(line), "%s %s %s %lld %llu %lld",
             rec->idempotency_key, rec->customer ? rec->customer : "-",
             rec->meter ? rec->meter : "-", (long long) rec->period_start,
             (unsigned long long) rec->quantity, (long long) pd->start);
    snprintf(score, sizeof(score), "%lld", (long long) now);
    snprintf(old, sizeof(old), "%lld",
             (long long) (now - METER_STRIPE_LATE_KEEP));

    argv[0] = "ZADD";
    argv[1] = MTR_W_STRIPE_LATE;
    argv[2] = score;
    argv[3] = line;
    rp = meter_redis_argv(&st->redis, 4, argv, NULL);
    if (rp != NULL) {
        freeReplyObject(rp);
    }

    argv[0] = "ZREMRANGEBYSCORE";
    argv[2] = "-inf";
    argv[3] = old;
    rp = meter_redis_argv(&st->redis, 4, argv, NULL);
    if (rp != NULL) {
        freeReplyObject(rp);
    }
}


/* an invoice's subscription: "parent.subscription_details.subscription"
 * since 2025-03-31.basil, "subscription" before */
static const char *
meter_stripe_invoice_sub(const cJSON *inv)
{
    const char  *sub;

    sub = meter_stripe_ref(inv, "subscription");
    if (sub == NULL) {
        sub = meter_json_str(inv, "parent", "subscription_details",
                             "subscription", (char *) NULL);
    }

    return sub;
}


/*
 * What "owes money" means for Stripe (stripe-node
 * src/resources/Invoices.ts, Subscriptions.ts): a subscription past_due or
 * unpaid, or an invoice "uncollectible", or "open" and already due: a
 * payment attempt failed (attempted) or its due_date passed.  An open
 * invoice that Stripe has not tried to collect yet (finalized an hour
 * before the automatic charge) is not overdue.  A subscription cancelled
 * at the end of dunning leaves its invoice open or uncollectible: still
 * owed.
 */
static int
meter_stripe_owed_invoice(const cJSON *inv, time_t now)
{
    double       due;
    const char  *status;

    status = meter_json_str(inv, "status", (char *) NULL);
    if (status == NULL) {
        return 0;
    }

    if (strcmp(status, "uncollectible") == 0) {
        return 1;
    }

    if (strcmp(status, "open") != 0) {
        return 0;
    }

    due = meter_json_num(inv, "due_date", (char *) NULL);

    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(inv, "attempted"))
           || (due > 0 && due < (double) now);
}


typedef struct {
    meter_overdue_pt            cb;
    void                       *data;
    int                         invoices;
    time_t                      now;
    unsigned                    owed;           /* for meter_stripe_owes */
} meter_stripe_od_t;


static int
meter_stripe_od_item(meter_stripe_t *st, const cJSON *o, void *data,
    meter_send_result_t *res)
{
    meter_overdue_t     od;
    meter_stripe_od_t  *ctx;

    (void) st;
    ctx = data;

    if (ctx->invoices && !meter_stripe_owed_invoice(o, ctx->now)) {
        return 0;
    }

    ctx->owed++;

    if (ctx->cb == NULL) {
        return 0;
    }

    od.provider_customer = meter_stripe_ref(o, "customer");
    od.subscription = ctx->invoices ? meter_stripe_invoice_sub(o)
                                    : meter_json_str(o, "id", (char *) NULL);
    od.since = 0;

    if (ctx->cb(ctx->data, &od) != 0) {
        snprintf(res->error, sizeof(res->error), "stripe: the sync stopped");
        res->status = METER_SEND_FATAL;
        return -1;
    }

    return 0;
}


/*
 * The overdue lists: subscriptions past_due and unpaid, invoices open and
 * uncollectible (filtered by meter_stripe_owed_invoice), every page;
 * customer NULL for all, else only that customer's.  0, or -1 with res.
 */
static int
meter_stripe_owed(meter_stripe_t *st, const char *customer,
    meter_stripe_od_t *ctx, meter_send_result_t *res)
{
    int           i, rc;
    meter_buf_t   url;

    static const char  *lists[][2] = {
        { "subscriptions", "past_due" },
        { "subscriptions", "unpaid" },
        { "invoices", "open" },
        { "invoices", "uncollectible" }
    };

    memset(&url, 0, sizeof(url));
    rc = -1;

    for (i = 0; i < 4; i++) {
        meter_buf_reset(&url);
        if (meter_buf_printf(&url, "%s/v1/%s?status=%s", st->base,
                             lists[i][0], lists[i][1]) != 0
            || (customer != NULL
                && (meter_buf_printf(&url, "&customer=") != 0
                    || meter_url_segment(&url, st->http.curl, customer)
                       != 0)))
        {
            snprintf(res->error, sizeof(res->error), "stripe: out of memory");
            res->status = METER_SEND_RETRY;
            goto end;
        }

        ctx->invoices = (i >= 2);

        if (meter_stripe_list(st, url.data, meter_stripe_od_item, ctx, res)
            != 0)
        {
            goto end;
        }
    }

    rc = 0;

end:

    meter_buf_free(&url);

    return rc;
}


static int
meter_stripe_overdue(meter_provider_t *p, meter_overdue_pt cb, void *data,
    meter_send_result_t *res)
{
    meter_stripe_od_t  ctx;

    memset(res, 0, sizeof(*res));
    memset(&ctx, 0, sizeof(ctx));

    ctx.cb = cb;
    ctx.data = data;
    ctx.now = time(NULL);

    return meter_stripe_owed(p->data, NULL, &ctx, res);
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


/* the provider's own Redis connection (the webhook listener's thread or
 * the drain's process), for marks made by Stripe's later answers; 0 or -1 */
static int
meter_stripe_redis(meter_stripe_t *st)
{
    int   rc;
    char  err[256];

    /* still the master the Sentinels name: these marks are rare */
    if (st->redis.ctx != NULL
        && meter_redis_follow(&st->redis, st->redis_host,
                              st->redis_timeout_ms)
           == 0)
    {
        return 0;
    }

    rc = meter_redis_open(&st->redis, st->redis_host, st->redis_port,
                          st->redis_unix, st->redis_password_file,
                          st->redis_db, st->redis_timeout_ms, err,
                          sizeof(err));

    if (rc == -2) {
        meter_log(LOG_ERR, "stripe: redis.password_file: %s", err);
        return -1;
    }

    if (rc != 0) {
        meter_log(LOG_ERR, "stripe: Redis: %s", err);
        return -1;
    }

    return 0;
}


/* our record ids are 32 lowercase hex (drain.c); other identifiers are
 * not ours */
static int
meter_stripe_our_id(const char *id)
{
    return strlen(id) == 32 && strspn(id, "0123456789abcdef") == 32;
}


/*
 * v1.billing.meter.error_report_triggered (and no_meter_found), a v2 thin
 * event (stripe-node src/resources/V2/Core/Events.ts: "created" a string,
 * no data): GET /v2/core/events/{id} gives data.reason.error_types[] with
 * a code and sample_errors[].request.identifier, our record id.  Each is
 * dead-lettered with its code.  0 done, -1 failed (answered 503: Stripe
 * delivers again; marking twice is harmless).
 */
static int
meter_stripe_error_report(meter_stripe_t *st, const char *evid,
    meter_webhook_event_t *ev)
{
    int                  rc, marked;
    char                 err[512], rkey[64], now[24];
    cJSON               *json;
    meter_buf_t          url;
    const char          *code, *ident, *msg, *argv[11];
    redisReply          *rp;
    const cJSON         *types, *t, *samples, *e;
    meter_send_result_t  res;

    memset(&url, 0, sizeof(url));
    memset(&res, 0, sizeof(res));
    json = NULL;
    rc = -1;
    marked = 0;

    if (meter_buf_printf(&url, "%s/v2/core/events/", st->base) != 0
        || meter_url_segment(&url, st->http.curl, evid) != 0)
    {
        meter_webhook_invalid(ev, 503, "out of memory");
        goto end;
    }

    if (meter_stripe_call(st, url.data, NULL, NULL, &json, NULL, &res)
        != METER_SEND_OK)
    {
        meter_log(LOG_ERR, "stripe: fetching event %s: %s", evid, res.error);
        meter_webhook_invalid(ev, 503, "cannot fetch the event from Stripe");
        goto end;
    }

    types = meter_json_obj(json, "data", "reason", "error_types",
                           (char *) NULL);

    if (meter_stripe_redis(st) != 0) {
        meter_webhook_invalid(ev, 503, "storage unavailable");
        goto end;
    }

    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));

    cJSON_ArrayForEach(t, types) {
        code = meter_json_str(t, "code", (char *) NULL);
        samples = cJSON_GetObjectItemCaseSensitive(t, "sample_errors");

        cJSON_ArrayForEach(e, samples) {
            ident = meter_json_str(e, "request", "identifier", (char *) NULL);
            msg = meter_json_str(e, "error_message", (char *) NULL);

            if (ident == NULL || !meter_stripe_our_id(ident)) {
                continue;
            }

            snprintf(rkey, sizeof(rkey), MTR_W_REC_FMT, ident);
            snprintf(err, sizeof(err), "rejected by Stripe after it was "
                     "accepted: %.64s: %.300s", code ? code : "unknown",
                     msg ? msg : "");

            argv[0] = "EVAL";
            argv[1] = meter_lua_stripe_rejected;
            argv[2] = "3";
            argv[3] = rkey;
            argv[4] = MTR_W_OPEN;
            argv[5] = MTR_W_DEAD;
            argv[6] = ident;
            argv[7] = now;
            argv[8] = err;
            argv[9] = code ? code : "unknown";
            argv[10] = evid;

            rp = meter_redis_argv(&st->redis, 11, argv, NULL);

            if (!meter_reply_ok(rp)) {
                meter_log(LOG_ERR, "stripe: marking %s: %s", ident,
                          rp != NULL ? rp->str : st->redis.err);
                if (rp != NULL) {
                    freeReplyObject(rp);
                }

                meter_webhook_invalid(ev, 503, "storage unavailable");
                goto end;
            }

            freeReplyObject(rp);
            marked++;

            meter_log(LOG_ERR, "record %s dead-lettered: %s", ident, err);
        }
    }

    meter_log(LOG_NOTICE, "stripe: event %s: %d record%s rejected after "
              "acceptance", evid, marked, marked == 1 ? "" : "s");
    rc = 0;

end:

    cJSON_Delete(json);
    meter_buf_free(&url);

    return rc;
}


/* a v2 thin event: {"id","object":"v2.core.event","type","created":
 * RFC 3339,"related_object"}; signed like every webhook (stripe-node
 * stripe.core.ts parseEventNotification uses the same verifyHeader) */
static void
meter_stripe_thin(meter_stripe_t *st, const cJSON *json,
    meter_webhook_event_t *ev)
{
    time_t       created;
    const char  *id, *type;

    id = meter_json_str(json, "id", (char *) NULL);
    type = meter_json_str(json, "type", (char *) NULL);
    created = meter_rfc3339_parse(meter_json_str(json, "created",
                                                 (char *) NULL));

    if (id == NULL || type == NULL || created < 0
        || meter_copy(ev->event_id, sizeof(ev->event_id), id) != 0)
    {
        meter_webhook_invalid(ev, 400, "not a Stripe thin event (id, type, "
                              "created)");
        return;
    }

    ev->event_time = created;
    ev->kind = METER_WEBHOOK_IGNORE;

    if (strcmp(type, "v1.billing.meter.error_report_triggered") == 0
        || strcmp(type, "v1.billing.meter.no_meter_found") == 0)
    {
        (void) meter_stripe_error_report(st, id, ev);
    }
}


/*
 * Before a webhook clears a customer: whether Stripe still lists money
 * owed by it (the poll's definition, meter_stripe_owed), so a webhook and
 * the next poll agree.  1 owes, 0 not, -1 unknown.
 */
static int
meter_stripe_owes(meter_stripe_t *st, const char *customer)
{
    meter_stripe_od_t    ctx;
    meter_send_result_t  res;

    memset(&ctx, 0, sizeof(ctx));
    memset(&res, 0, sizeof(res));
    ctx.now = time(NULL);

    if (meter_stripe_owed(st, customer, &ctx, &res) != 0) {
        meter_log(LOG_ERR, "stripe: checking what %s owes: %s", customer,
                  res.error);
        return -1;
    }

    return ctx.owed > 0;
}


static void
meter_stripe_webhook(meter_provider_t *p, const meter_webhook_req_t *req,
    meter_webhook_event_t *ev)
{
    int              owes;
    double           created;
    cJSON           *json;
    const char      *id, *type, *status, *cus, *sub;
    const cJSON     *obj;
    meter_stripe_t  *st;

    st = p->data;
    json = NULL;
    status = NULL;

    memset(ev, 0, sizeof(*ev));

    if (!meter_stripe_verify(st, req, ev)) {
        return;
    }

    json = cJSON_ParseWithLength(req->body, req->body_len);
    if (json == NULL) {
        meter_webhook_invalid(ev, 400, "the body is not JSON");
        goto end;
    }

    if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(json, "created"))) {
        meter_stripe_thin(st, json, ev);
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

    if (strcmp(type, "invoice.payment_failed") == 0
        || strcmp(type, "invoice.marked_uncollectible") == 0)
    {
        /* uncollectible: dunning gave up, the money is still owed */
        ev->kind = METER_WEBHOOK_DELINQUENT;
        cus = meter_stripe_ref(obj, "customer");
        sub = meter_stripe_invoice_sub(obj);

    } else if (strcmp(type, "invoice.paid") == 0) {
        ev->kind = METER_WEBHOOK_PAID;
        cus = meter_stripe_ref(obj, "customer");
        sub = meter_stripe_invoice_sub(obj);

    } else if (strcmp(type, "customer.subscription.updated") == 0
               || strcmp(type, "customer.subscription.deleted") == 0)
    {
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

        } else if (status != NULL && strcmp(status, "canceled") == 0) {
            /* cancelled at the end of dunning: owed if an invoice is
             * left open or uncollectible (checked below) */
            ev->kind = METER_WEBHOOK_PAID;
        }

    } else {
        cus = NULL;
        sub = NULL;
    }

    /* clear only what Stripe no longer lists as owed: the poll would
     * mark it again otherwise */
    if (ev->kind == METER_WEBHOOK_PAID) {
        owes = (cus != NULL) ? meter_stripe_owes(st, cus) : 0;

        if (owes == -1) {
            meter_webhook_invalid(ev, 503, "cannot check the customer's "
                                  "invoices at Stripe");
            goto end;
        }

        if (owes == 1) {
            ev->kind = METER_WEBHOOK_DELINQUENT;

        } else if (strcmp(type, "customer.subscription.deleted") == 0
                   || (status != NULL && strcmp(status, "canceled") == 0))
        {
            /* ending a subscription settles nothing: the poll clears */
            ev->kind = METER_WEBHOOK_IGNORE;
        }
    }

    if (ev->kind == METER_WEBHOOK_IGNORE
        && strcmp(type, "customer.subscription.deleted") == 0)
    {
        cus = NULL;
        sub = NULL;
    }

    meter_webhook_ids(ev, cus, sub);

end:

    cJSON_Delete(json);
}


static int
meter_stripe_summary_item(meter_stripe_t *st, const cJSON *o, void *data,
    meter_send_result_t *res)
{
    double  x;

    (void) st;
    (void) res;

    x = meter_json_num(o, "aggregated_value", (char *) NULL);
    *(double *) data += (x > 0) ? x : 0;

    return 0;
}


/*
 * reconcile: Stripe's own figure for a customer and meter, the sum of
 * GET /v1/billing/meters/{id}/event_summaries (stripe-node
 * src/resources/Billing/Meters.ts listEventSummaries: customer, start_time,
 * end_time, value_grouping_window day|hour; start and end on hour
 * boundaries for hourly windows, UTC days for daily ones: a month is one
 * page of days; a list paginated with starting_after).  Only a sum meter
 * adds up to our quantities.
 */
static int
meter_stripe_usage_total(meter_provider_t *p, const meter_usage_query_t *q,
    double *total, meter_send_result_t *res)
{
    int                          rc;
    meter_buf_t                  url;
    meter_record_t               rec;
    meter_stripe_t              *st;
    const meter_stripe_meter_t  *m;

    st = p->data;
    *total = 0;

    memset(res, 0, sizeof(*res));
    memset(&rec, 0, sizeof(rec));

    if (q->provider_customer == NULL) {
        snprintf(res->error, sizeof(res->error), "stripe: customer %s has "
                 "no provider_customer", q->customer);
        res->status = METER_SEND_FATAL;
        return -1;
    }

    rec.meter = q->meter;
    rec.provider_meter = q->provider_meter;

    m = meter_stripe_meter(st, &rec, res);
    if (m == NULL) {
        return -1;
    }

    if (strcmp(m->formula, "sum") != 0) {
        snprintf(res->error, sizeof(res->error), "stripe: meter %s "
                 "aggregates with \"%s\": its figure is not a sum of our "
                 "quantities", m->id, m->formula);
        res->status = METER_SEND_FATAL;
        return -1;
    }

    memset(&url, 0, sizeof(url));

    if (meter_buf_printf(&url, "%s/v1/billing/meters/", st->base) != 0
        || meter_url_segment(&url, st->http.curl, m->id) != 0
        || meter_buf_printf(&url, "/event_summaries?customer=") != 0
        || meter_url_segment(&url, st->http.curl, q->provider_customer) != 0
        || meter_buf_printf(&url, "&start_time=%lld&end_time=%lld"
                            "&value_grouping_window=%s",
                            (long long) q->from, (long long) q->to,
                            (q->from % 86400 == 0 && q->to % 86400 == 0)
                            ? "day" : "hour") != 0)
    {
        meter_buf_free(&url);
        snprintf(res->error, sizeof(res->error), "stripe: out of memory");
        res->status = METER_SEND_RETRY;
        return -1;
    }

    rc = meter_stripe_list(st, url.data, meter_stripe_summary_item, total,
                           res);

    meter_buf_free(&url);

    return rc == 0 ? 0 : -1;
}


static void
meter_stripe_cleanup(meter_provider_t *p)
{
    size_t           i;
    meter_stripe_t  *st;

    st = p->data;
    if (st == NULL) {
        return;
    }

    meter_http_cleanup(&st->http);
    meter_redis_close(&st->redis);

    if (st->periods.cap != 0) {
        meter_map_free(&st->periods, free);
    }

    for (i = 0; i < st->nmeter_ids; i++) {
        free(st->meter_ids[i]);
    }

    free(st->meter_ids);
    free(st->redis_host);
    free(st->redis_unix);
    free(st->redis_password_file);
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
    p->send_batch = meter_stripe_send_batch;
    p->lookup = meter_stripe_lookup;
    p->usage_total = meter_stripe_usage_total;
    p->onboard = meter_stripe_onboard;
    p->overdue = meter_stripe_overdue;
    p->webhook = meter_stripe_webhook;
    p->cleanup = meter_stripe_cleanup;
    p->absolute = 1;
    p->data = NULL;
}
