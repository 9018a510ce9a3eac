
/*
 * Copyright (C) nginx-meter authors
 *
 * Recurly (v3): POST /subscriptions/{id}/add_ons/{add_on}/usage, JSON
 * amount, merchant_tag, usage_timestamp, recording_timestamp;
 * Accept: application/vnd.recurly.v2021-02-25; Basic auth with the API key
 * as user.
 *
 * {add_on_id} is Recurly's add-on ID unless prefixed: our meter.NAME is
 * the add-on code, so it goes as "code-<code>" (recurly/recurly-client-ruby
 * openapi/api.yaml, components/parameters/add_on_id: "For code use prefix
 * `code-`").
 *
 * Exactly once: the official client sends an Idempotency-Key on every POST
 * (lib/recurly/client.rb, set_headers) but the spec does not document it,
 * so the record's key also goes into merchant_tag, and lookup() lists the
 * add-on's usage before the drain loop resends a record whose outcome is
 * unknown.  The list defaults to billing_status=unbilled and descending
 * order (api.yaml, BillingStatusEnum, usage_sort_dates: records "move
 * behind the cursor"): a usage stored and invoiced before the retry would
 * be invisible, so the lookup asks billing_status=all, sort=usage_timestamp,
 * order=asc, begin_time=the record's usage_timestamp.  Inside one call only
 * answers that prove the usage was not stored (429, 409) are retried; after
 * a timeout or a 5xx the call returns RETRY and the next attempt starts
 * with lookup().
 *
 * usage_timestamp is period_start (when the usage happened);
 * recording_timestamp is period_end (when we had it complete): both fixed
 * for a record, so a resend is byte-identical.
 *
 * Rate limits (api.yaml, info "Limits"): sandbox 400 requests/min, all
 * requests count; production 1,000 GETs/min; a sliding 5-minute window;
 * 429 carries X-RateLimit-Limit/Remaining/Reset (Unix s), no Retry-After.
 * http.c waits for X-RateLimit-Reset; the default max_rps (5/s = 300/min)
 * fits the sandbox with room for meterctl and the delinquency poll.
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


#define METER_RECURLY_ACCEPT  "application/vnd.recurly.v2021-02-25"
#define METER_RECURLY_PAGES   1000
#define METER_RECURLY_RPS     5


typedef struct {
    meter_http_t                http;
    char                        base[256];
    char                        api_key[256];
    char                        webhook_key[256];
    char                        currency[8];
    time_t                      webhook_tolerance;
    meter_plans_t               plans;
} meter_recurly_t;


static int meter_recurly_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_recurly_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static int meter_recurly_lookup(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static void meter_recurly_cleanup(meter_provider_t *p);
static meter_send_e meter_recurly_onboard(meter_provider_t *p,
    const meter_onboard_t *in, meter_onboard_result_t *out,
    meter_send_result_t *res);
static int meter_recurly_overdue(meter_provider_t *p, meter_overdue_pt cb,
    void *data, meter_send_result_t *res);
static void meter_recurly_webhook(meter_provider_t *p,
    const meter_webhook_req_t *req, meter_webhook_event_t *ev);


static int
meter_recurly_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    size_t            n;
    int64_t           ms;
    const char       *base, *v;
    meter_recurly_t  *rc;

    rc = calloc(1, sizeof(meter_recurly_t));
    if (rc == NULL) {
        snprintf(err, errlen, "recurly: out of memory");
        return -1;
    }

    p->data = rc;

    base = meter_conf_get(cf, "recurly.base_url");
    if (base == NULL) {
        base = "https://v3.recurly.com";
    }

    n = strlen(base);
    if (n == 0 || n >= sizeof(rc->base)) {
        snprintf(err, errlen, "recurly.base_url: empty or too long");
        return -1;
    }

    memcpy(rc->base, base, n + 1);
    while (n > 0 && rc->base[n - 1] == '/') {
        rc->base[--n] = '\0';
    }

    if (meter_conf_secret(cf, "recurly.api_key_file", rc->api_key,
                          sizeof(rc->api_key), err, errlen) != 0)
    {
        return -1;
    }

    if (rc->api_key[0] == '\0') {
        snprintf(err, errlen, "recurly.api_key_file: the file is empty");
        return -1;
    }

    if (meter_conf_get(cf, "recurly.webhook_key_file") != NULL
        && meter_conf_secret(cf, "recurly.webhook_key_file", rc->webhook_key,
                             sizeof(rc->webhook_key), err, errlen) != 0)
    {
        return -1;
    }

    rc->webhook_tolerance = 300;
    v = meter_conf_get(cf, "recurly.webhook_tolerance");
    if (v != NULL) {
        if (meter_parse_duration(v, &ms) != 0 || ms < 1000) {
            snprintf(err, errlen, "recurly.webhook_tolerance: \"%s\" is not "
                     "a duration of at least 1s", v);
            return -1;
        }

        rc->webhook_tolerance = (time_t) (ms / 1000);
    }

    v = meter_conf_get(cf, "recurly.currency");
    if (meter_copy(rc->currency, sizeof(rc->currency),
                   v != NULL ? v : "USD") != 0)
    {
        snprintf(err, errlen, "recurly.currency: too long");
        return -1;
    }

    if (meter_plans_copy(&rc->plans, cf) != 0) {
        snprintf(err, errlen, "recurly: out of memory");
        return -1;
    }

    if (meter_http_init(&rc->http, "recurly", cf, METER_RECURLY_RPS, err,
                        errlen) != 0)
    {
        return -1;
    }

    /* no idempotency: an answer lost to a timeout or a 5xx may hide an
     * accepted usage, so the drain loop looks it up before resending */
    rc->http.resend_unknown = 0;

    return 0;
}


static int
meter_recurly_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    if (meter_recurly_setup(p, cf, err, errlen) != 0) {
        meter_recurly_cleanup(p);
        return -1;
    }

    return 0;
}


/* {base}/subscriptions/{sub}/add_ons/code-{add-on code}/usage */
static int
meter_recurly_url(meter_recurly_t *rc, const meter_record_t *rec,
    meter_buf_t *url)
{
    const char  *code;

    code = rec->provider_meter;
    if (strncmp(code, "code-", 5) == 0) {
        code += 5;
    }

    if (meter_buf_printf(url, "%s/subscriptions/", rc->base) != 0
        || meter_url_segment(url, rc->http.curl, rec->subscription) != 0
        || meter_buf_printf(url, "/add_ons/code-") != 0
        || meter_url_segment(url, rc->http.curl, code) != 0
        || meter_buf_printf(url, "/usage") != 0)
    {
        return -1;
    }

    return 0;
}


/* one GET of a list page (meter_list_walk) */
static meter_send_e
meter_recurly_list_get(void *ctx, const char *url, cJSON **json,
    meter_send_result_t *res)
{
    meter_recurly_t   *rc;
    meter_http_req_t   req;

    rc = ((void **) ctx)[0];

    memset(&req, 0, sizeof(req));

    req.method = "GET";
    req.url = url;
    req.accept = METER_RECURLY_ACCEPT;
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = rc->api_key;

    return meter_http_json(&rc->http, &req, json, NULL, res);
}


/* a list's "next" (api.yaml: "Path to subsequent page of results"; seen as
 * a full URL too) is followed on the base URL's origin only */
static void
meter_recurly_list(meter_recurly_t *rc, meter_list_t *l, const char *what,
    meter_list_item_pt item, void **ctx)
{
    memset(l, 0, sizeof(meter_list_t));

    ctx[0] = rc;

    l->style = METER_LIST_NEXT;
    l->what = what;
    l->base = rc->base;
    l->curl = rc->http.curl;
    l->max_pages = METER_RECURLY_PAGES;
    l->get = meter_recurly_list_get;
    l->item = item;
    l->ctx = ctx;
}


/* lookup: 1 its merchant_tag, 2 sorted past its usage_timestamp */
static int
meter_recurly_lookup_item(void *ctx, const cJSON *item,
    meter_send_result_t *res)
{
    time_t                 t;
    const cJSON           *tag;
    const meter_record_t  *rec;

    (void) res;

    rec = ((void **) ctx)[1];

    tag = cJSON_GetObjectItemCaseSensitive(item, "merchant_tag");

    if (cJSON_IsString(tag)
        && strcmp(tag->valuestring, rec->idempotency_key) == 0)
    {
        return 1;
    }

    /* sorted ascending: past our usage_timestamp, it is absent */
    t = meter_rfc3339_parse(meter_json_str(item, "usage_timestamp",
                                           (char *) NULL));

    return (t > rec->period_start) ? 2 : 0;
}


static meter_send_e
meter_recurly_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    char               *js, ts[32], idem[160], fresh[24];
    cJSON              *json;
    meter_buf_t         url;
    meter_send_e        rc;
    meter_recurly_t    *rp;
    meter_http_req_t    req;
    meter_http_resp_t   resp;

    rp = p->data;
    js = NULL;
    fresh[0] = '\0';

    memset(&url, 0, sizeof(url));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;
    res->status = rc;

    json = cJSON_CreateObject();

    if (rec->subscription == NULL || rec->provider_meter == NULL) {
        snprintf(res->error, sizeof(res->error), "recurly: record without "
                 "%s", rec->subscription == NULL
                       ? "a subscription" : "an add-on");
        goto end;
    }

    /* amounts travel as JSON numbers: exact up to 2^53 */
    if (rec->quantity > (1ULL << 53)) {
        snprintf(res->error, sizeof(res->error), "recurly: quantity %llu "
                 "too large for a JSON number",
                 (unsigned long long) rec->quantity);
        goto end;
    }

    if (json == NULL
        || cJSON_AddNumberToObject(json, "amount", (double) rec->quantity)
           == NULL
        || cJSON_AddStringToObject(json, "merchant_tag",
                                   rec->idempotency_key) == NULL)
    {
        goto nomem;
    }

    meter_rfc3339(rec->period_start, ts, sizeof(ts));
    if (cJSON_AddStringToObject(json, "usage_timestamp", ts) == NULL) {
        goto nomem;
    }

    /* a month's figure is complete at its event time, not the month's end */
    meter_rfc3339((rec->figure && rec->usage_end > 0) ? rec->usage_end
                  : rec->period_end, ts, sizeof(ts));
    if (cJSON_AddStringToObject(json, "recording_timestamp", ts) == NULL) {
        goto nomem;
    }

    js = cJSON_PrintUnformatted(json);
    if (js == NULL || meter_recurly_url(rp, rec, &url) != 0) {
        goto nomem;
    }

    /*
     * As the official client does (lib/recurly/client.rb, set_headers).
     * A later attempt comes after lookup() found nothing: a fresh key
     * then, so that a failure Recurly may have saved under the first one
     * is not replayed for ever (merchant_tag and the lookup still dedupe).
     */
    if (rec->attempts > 1) {
        meter_fresh_suffix(fresh, sizeof(fresh));
    }

    snprintf(idem, sizeof(idem), "Idempotency-Key: %s%s",
             rec->idempotency_key, fresh);

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/json";
    req.accept = METER_RECURLY_ACCEPT;
    req.body = js;
    req.body_len = strlen(js);
    req.headers[0] = idem;
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = rp->api_key;

    rc = meter_http_request(&rp->http, &req, &resp, res);

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "recurly: out of memory");
    res->status = METER_SEND_RETRY;
    rc = METER_SEND_RETRY;

end:

    cJSON_free(js);
    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&resp.body);

    return rc;
}


/*
 * 1: a usage with merchant_tag == idempotency key exists; 0: none; -1.
 * Billed usage counts too (billing_status=all); ascending from the
 * record's own usage_timestamp, so the search ends at the first later one.
 */
static int
meter_recurly_lookup(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int               found;
    char              ts[32];
    void             *ctx[2];
    meter_buf_t       url;
    meter_list_t      l;
    meter_recurly_t  *rp;

    rp = p->data;
    found = -1;

    memset(&url, 0, sizeof(url));
    memset(res, 0, sizeof(*res));

    if (rec->subscription == NULL || rec->provider_meter == NULL) {
        snprintf(res->error, sizeof(res->error),
                 "recurly: record without a subscription or add-on");
        goto end;
    }

    meter_rfc3339(rec->period_start, ts, sizeof(ts));

    if (meter_recurly_url(rp, rec, &url) != 0
        || meter_buf_printf(&url, "?limit=200&billing_status=all"
                            "&sort=usage_timestamp&order=asc&begin_time=")
           != 0
        || meter_url_segment(&url, rp->http.curl, ts) != 0)
    {
        goto end;
    }

    meter_recurly_list(rp, &l, "recurly: usage list",
                       meter_recurly_lookup_item, ctx);
    ctx[1] = (void *) rec;

    found = meter_list_walk(&l, url.data, res);
    if (found == 2) {
        found = 0;
    }

end:

    meter_buf_free(&url);

    return found;
}


typedef struct {
    double                      total;
    time_t                      to;
} meter_recurly_sum_t;


static int
meter_recurly_usage_item(void *ctx, const cJSON *item,
    meter_send_result_t *res)
{
    time_t                t;
    double                x;
    meter_recurly_sum_t  *sum;

    (void) res;

    sum = ((void **) ctx)[1];

    /* end_time is inclusive: the next period's first second is not ours */
    t = meter_rfc3339_parse(meter_json_str(item, "usage_timestamp",
                                           (char *) NULL));
    if (t >= sum->to) {
        return 2;
    }

    x = meter_json_num(item, "amount", (char *) NULL);
    sum->total += (x > 0) ? x : 0;

    return 0;
}


/*
 * reconcile: Recurly's own usage of the add-on in [from, to), billed or
 * not: GET /subscriptions/{id}/add_ons/{add_on_id}/usage with
 * billing_status=all, sort=usage_timestamp, order=asc, begin_time and
 * end_time (both inclusive), pages by "next" (recurly-client-ruby
 * openapi/api.yaml list_usage, UsageList); amount is a number.
 */
static int
meter_recurly_usage_total(meter_provider_t *p, const meter_usage_query_t *q,
    double *total, meter_send_result_t *res)
{
    int                   rc;
    char                  a[32], b[32];
    void                 *ctx[2];
    meter_buf_t           url;
    meter_list_t          l;
    meter_record_t        rec;
    meter_recurly_t      *rp;
    meter_recurly_sum_t   sum;

    rp = p->data;
    *total = 0;
    rc = -1;

    memset(res, 0, sizeof(*res));
    memset(&url, 0, sizeof(url));
    memset(&rec, 0, sizeof(rec));

    if (q->subscription == NULL) {
        snprintf(res->error, sizeof(res->error), "recurly: customer %s has "
                 "no subscription", q->customer);
        res->status = METER_SEND_FATAL;
        return -1;
    }

    rec.subscription = q->subscription;
    rec.provider_meter = q->provider_meter;

    meter_rfc3339(q->from, a, sizeof(a));
    meter_rfc3339(q->to, b, sizeof(b));

    if (meter_recurly_url(rp, &rec, &url) != 0
        || meter_buf_printf(&url, "?limit=200&billing_status=all"
                            "&sort=usage_timestamp&order=asc&begin_time=")
           != 0
        || meter_url_segment(&url, rp->http.curl, a) != 0
        || meter_buf_printf(&url, "&end_time=") != 0
        || meter_url_segment(&url, rp->http.curl, b) != 0)
    {
        snprintf(res->error, sizeof(res->error), "recurly: out of memory");
        res->status = METER_SEND_RETRY;
        goto end;
    }

    sum.total = 0;
    sum.to = q->to;

    meter_recurly_list(rp, &l, "recurly: usage list",
                       meter_recurly_usage_item, ctx);
    ctx[1] = &sum;

    rc = meter_list_walk(&l, url.data, res);
    if (rc >= 0) {
        *total = sum.total;
        rc = 0;
    }

end:

    meter_buf_free(&url);

    return rc;
}


/* one call; body NULL for a GET */
static meter_send_e
meter_recurly_call(meter_recurly_t *rc, const char *url, const char *body,
    cJSON **json, meter_send_result_t *res)
{
    meter_http_req_t  req;

    memset(&req, 0, sizeof(req));

    req.method = (body != NULL) ? "POST" : "GET";
    req.url = url;
    req.accept = METER_RECURLY_ACCEPT;
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = rc->api_key;

    if (body != NULL) {
        req.content_type = "application/json";
        req.body = body;
        req.body_len = strlen(body);
    }

    return meter_http_json(&rc->http, &req, json, NULL, res);
}


/*
 * The account code is our customer id, so a retry finds the account (GET
 * before POST), and the account's live subscription to the plan, instead
 * of making a second one.  Recurly has no idempotency header.
 */
static meter_send_e
meter_recurly_onboard(meter_provider_t *p, const meter_onboard_t *in,
    meter_onboard_result_t *out, meter_send_result_t *res)
{
    char              *js;
    cJSON             *json, *body, *acct;
    meter_buf_t        url;
    const char        *plan, *currency, *id, *code;
    meter_send_e       rc;
    const cJSON       *data, *s;
    meter_recurly_t   *rp;

    rp = p->data;
    json = NULL;
    body = NULL;
    js = NULL;

    memset(&url, 0, sizeof(url));
    memset(out, 0, sizeof(*out));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;

    plan = meter_plan_get(&rp->plans, in->plan, "recurly_plan");
    if (plan == NULL) {
        snprintf(res->error, sizeof(res->error), "recurly: no \"plan.%s."
                 "recurly_plan\" in the config",
                 in->plan ? in->plan : "default");
        goto end;
    }

    currency = meter_plan_get(&rp->plans, in->plan, "currency");
    if (currency == NULL) {
        currency = rp->currency;
    }

    if (meter_copy(out->provider_customer, sizeof(out->provider_customer),
                   in->customer) != 0)
    {
        snprintf(res->error, sizeof(res->error), "recurly: customer id too "
                 "long");
        goto end;
    }

    /* the account */

    if (meter_buf_printf(&url, "%s/accounts/code-", rp->base) != 0
        || meter_url_segment(&url, rp->http.curl, in->customer) != 0)
    {
        goto nomem;
    }

    rc = meter_recurly_call(rp, url.data, NULL, &json, res);

    if (rc == METER_SEND_FATAL && res->http_status == 404) {
        cJSON_Delete(json);
        json = NULL;

        body = cJSON_CreateObject();
        if (body == NULL
            || cJSON_AddStringToObject(body, "code", in->customer) == NULL
            || cJSON_AddStringToObject(body, "email", in->email) == NULL
            || (in->name != NULL
                && cJSON_AddStringToObject(body, "first_name", in->name)
                   == NULL)
            || (js = cJSON_PrintUnformatted(body)) == NULL)
        {
            goto nomem;
        }

        meter_buf_reset(&url);
        if (meter_buf_printf(&url, "%s/accounts", rp->base) != 0) {
            goto nomem;
        }

        rc = meter_recurly_call(rp, url.data, js, &json, res);
    }

    if (rc != METER_SEND_OK) {
        goto end;
    }

    cJSON_Delete(json);
    json = NULL;
    cJSON_Delete(body);
    body = NULL;
    cJSON_free(js);
    js = NULL;

    /* a live subscription of the account to the plan */

    meter_buf_reset(&url);
    if (meter_buf_printf(&url, "%s/accounts/code-", rp->base) != 0
        || meter_url_segment(&url, rp->http.curl, in->customer) != 0
        || meter_buf_printf(&url, "/subscriptions?state=live&limit=200")
           != 0)
    {
        goto nomem;
    }

    rc = meter_recurly_call(rp, url.data, NULL, &json, res);
    if (rc != METER_SEND_OK) {
        goto end;
    }

    data = cJSON_GetObjectItemCaseSensitive(json, "data");
    id = NULL;

    cJSON_ArrayForEach(s, data) {
        code = meter_json_str(s, "plan", "code", (char *) NULL);
        if (code != NULL && strcmp(code, plan) == 0) {
            id = meter_json_str(s, "id", (char *) NULL);
            break;
        }
    }

    if (id == NULL) {
        cJSON_Delete(json);
        json = NULL;

        body = cJSON_CreateObject();
        acct = cJSON_AddObjectToObject(body, "account");
        if (body == NULL || acct == NULL
            || cJSON_AddStringToObject(body, "plan_code", plan) == NULL
            || cJSON_AddStringToObject(body, "currency", currency) == NULL
            || cJSON_AddStringToObject(acct, "code", in->customer) == NULL
            || (js = cJSON_PrintUnformatted(body)) == NULL)
        {
            goto nomem;
        }

        meter_buf_reset(&url);
        if (meter_buf_printf(&url, "%s/subscriptions", rp->base) != 0) {
            goto nomem;
        }

        rc = meter_recurly_call(rp, url.data, js, &json, res);
        if (rc != METER_SEND_OK) {
            goto end;
        }

        id = meter_json_str(json, "id", (char *) NULL);
    }

    if (id == NULL
        || meter_copy(out->subscription, sizeof(out->subscription), id) != 0)
    {
        snprintf(res->error, sizeof(res->error),
                 "recurly: subscription without a usable id");
        rc = METER_SEND_RETRY;
        goto end;
    }

    res->error[0] = '\0';
    rc = METER_SEND_OK;

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "recurly: out of memory");
    rc = METER_SEND_RETRY;

end:

    res->status = rc;
    cJSON_free(js);
    cJSON_Delete(body);
    cJSON_Delete(json);
    meter_buf_free(&url);

    return rc;
}


/*
 * "Owes money": invoices in state past_due (in dunning) or failed (dunning
 * exhausted, still unpaid); api.yaml InvoiceStateQueryParamEnum: pending,
 * past_due, paid, failed, one state per request.  Listing only past_due
 * would clear a customer whose invoice failed.  Every page ("next").
 */
typedef struct {
    meter_overdue_pt            cb;
    void                       *data;
} meter_recurly_od_t;


static int
meter_recurly_od_item(void *ctx, const cJSON *item, meter_send_result_t *res)
{
    time_t               due;
    const char          *sub;
    const cJSON         *subs;
    meter_overdue_t      od;
    meter_recurly_od_t  *w;

    w = ((void **) ctx)[1];

    subs = cJSON_GetObjectItemCaseSensitive(item, "subscription_ids");
    sub = cJSON_IsArray(subs) && cJSON_IsString(cJSON_GetArrayItem(subs, 0))
          ? cJSON_GetArrayItem(subs, 0)->valuestring : NULL;

    due = meter_rfc3339_parse(meter_json_str(item, "due_at", (char *) NULL));

    od.provider_customer = meter_json_str(item, "account", "code",
                                          (char *) NULL);
    od.subscription = sub;
    od.since = due > 0 ? due : 0;

    if (w->cb(w->data, &od) != 0) {
        snprintf(res->error, sizeof(res->error), "recurly: the sync stopped");
        return -1;
    }

    return 0;
}


static int
meter_recurly_overdue(meter_provider_t *p, meter_overdue_pt cb, void *data,
    meter_send_result_t *res)
{
    int                  rc, st;
    void                *ctx[2];
    meter_buf_t          url;
    meter_list_t         l;
    meter_recurly_t     *rp;
    meter_recurly_od_t   w;
    static const char   *states[] = { "past_due", "failed" };

    rp = p->data;
    rc = -1;
    w.cb = cb;
    w.data = data;

    memset(&url, 0, sizeof(url));
    memset(res, 0, sizeof(*res));

    meter_recurly_list(rp, &l, "recurly: invoice list", meter_recurly_od_item,
                       ctx);
    l.max_pages = METER_RECURLY_PAGES * 100;
    ctx[1] = &w;

    for (st = 0; st < 2; st++) {
        meter_buf_reset(&url);
        if (meter_buf_printf(&url, "%s/invoices?state=%s&limit=200",
                             rp->base, states[st]) != 0)
        {
            snprintf(res->error, sizeof(res->error), "recurly: out of "
                     "memory");
            goto end;
        }

        if (meter_list_walk(&l, url.data, res) != 0) {
            goto end;
        }
    }

    rc = 0;

end:

    meter_buf_free(&url);

    return rc;
}


/*
 * recurly-signature: "<timestamp>,<signature>[,<signature>...]", the
 * timestamp in milliseconds (seconds accepted too), each signature the hex
 * HMAC-SHA256 of "<timestamp>.<body>" with the endpoint's key (several
 * while a key is rotated).  1 verified, 0 not (ev filled).
 */
static int
meter_recurly_verify(meter_recurly_t *rp, const meter_webhook_req_t *req,
    meter_webhook_event_t *ev)
{
    int          ok;
    char         buf[2048], mac[65], *ts, *tok, *save;
    time_t       t;
    long long    v;

    if (rp->webhook_key[0] == '\0') {
        meter_webhook_invalid(ev, 401, "recurly.webhook_key_file is not "
                              "set");
        return 0;
    }

    if (req->header(req->data, "recurly-signature") == NULL
        || strlen(req->header(req->data, "recurly-signature")) >= sizeof(buf))
    {
        meter_webhook_invalid(ev, 400, "no usable recurly-signature header");
        return 0;
    }

    snprintf(buf, sizeof(buf), "%s", req->header(req->data,
                                                 "recurly-signature"));

    ts = strtok_r(buf, ",", &save);
    while (ts != NULL && *ts == ' ') {
        ts++;
    }

    if (ts == NULL || *ts == '\0' || strlen(ts) > 16
        || strspn(ts, "0123456789") != strlen(ts))
    {
        meter_webhook_invalid(ev, 400, "recurly-signature without a "
                              "timestamp");
        return 0;
    }

    v = strtoll(ts, NULL, 10);
    t = (time_t) (v > 100000000000LL ? v / 1000 : v);

    if (t < req->now - rp->webhook_tolerance
        || t > req->now + rp->webhook_tolerance)
    {
        meter_webhook_invalid(ev, 400, "recurly-signature timestamp outside "
                              "the tolerance");
        return 0;
    }

    if (meter_hmac_hex(rp->webhook_key, strlen(rp->webhook_key), ts,
                       req->body, req->body_len, mac) != 0)
    {
        meter_webhook_invalid(ev, 500, "HMAC failed");
        return 0;
    }

    ok = 0;

    for (tok = strtok_r(NULL, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save))
    {
        while (*tok == ' ') {
            tok++;
        }

        ok |= meter_secure_equal(mac, 64, tok, strlen(tok));
    }

    explicit_bzero(mac, sizeof(mac));

    if (!ok) {
        meter_webhook_invalid(ev, 400, "recurly-signature does not match");
        return 0;
    }

    return 1;
}


/* JSON notifications (v3): object_type, event_type, event_time,
 * account_code */
static void
meter_recurly_webhook(meter_provider_t *p, const meter_webhook_req_t *req,
    meter_webhook_event_t *ev)
{
    time_t            t;
    cJSON            *json;
    const char       *id, *obj, *type, *when, *acct;
    meter_recurly_t  *rp;

    rp = p->data;
    json = NULL;

    memset(ev, 0, sizeof(*ev));

    if (!meter_recurly_verify(rp, req, ev)) {
        return;
    }

    json = cJSON_ParseWithLength(req->body, req->body_len);
    if (json == NULL) {
        meter_webhook_invalid(ev, 400, "the body is not JSON");
        goto end;
    }

    id = meter_json_str(json, "id", (char *) NULL);
    obj = meter_json_str(json, "object_type", (char *) NULL);
    type = meter_json_str(json, "event_type", (char *) NULL);
    when = meter_json_str(json, "event_time", (char *) NULL);
    acct = meter_json_str(json, "account_code", (char *) NULL);
    t = meter_rfc3339_parse(when);

    if (id == NULL || obj == NULL || type == NULL || t == -1) {
        meter_webhook_invalid(ev, 400, "not a Recurly notification (id, "
                              "object_type, event_type, event_time)");
        goto end;
    }

    /* whether "id" names the notification or its object is not
     * documented clearly: the triple identifies one delivery either way */
    snprintf(ev->event_id, sizeof(ev->event_id), "%.60s:%.24s:%lld", id,
             type, (long long) t);
    ev->event_time = t;
    ev->kind = METER_WEBHOOK_IGNORE;

    if (strcmp(obj, "charge_invoice") == 0 || strcmp(obj, "invoice") == 0) {
        if (strcmp(type, "past_due") == 0 || strcmp(type, "failed") == 0) {
            ev->kind = METER_WEBHOOK_DELINQUENT;

        } else if (strcmp(type, "paid") == 0) {
            ev->kind = METER_WEBHOOK_PAID;
        }
    }

    meter_webhook_ids(ev, acct, NULL);

end:

    cJSON_Delete(json);
}


static void
meter_recurly_cleanup(meter_provider_t *p)
{
    meter_recurly_t  *rp;

    rp = p->data;
    if (rp == NULL) {
        return;
    }

    meter_http_cleanup(&rp->http);
    explicit_bzero(rp->api_key, sizeof(rp->api_key));
    explicit_bzero(rp->webhook_key, sizeof(rp->webhook_key));
    meter_plans_free(&rp->plans);
    free(rp);
    p->data = NULL;
}


void
meter_provider_recurly(meter_provider_t *p)
{
    p->name = "recurly";
    p->init = meter_recurly_init;
    p->send = meter_recurly_send;
    p->lookup = meter_recurly_lookup;
    p->usage_total = meter_recurly_usage_total;
    p->onboard = meter_recurly_onboard;
    p->overdue = meter_recurly_overdue;
    p->webhook = meter_recurly_webhook;
    p->cleanup = meter_recurly_cleanup;
    p->data = NULL;
}
