
/*
 * Copyright (C) nginx-meter authors
 *
 * Chargebee (API v2): POST /api/v2/subscriptions/{id}/usages, form-encoded
 * item_price_id, quantity, usage_date, id; Basic auth with the API key as
 * user; chargebee-idempotency-key header.
 *
 * The usage id is the record's idempotency key, and Chargebee keeps usage
 * ids unique, so a resend after the 30-minute idempotency window fails
 * with a 400 instead of counting twice.  Any 400 is therefore checked by
 * listing usages with that id: when it exists, the record was accepted.
 *
 * usage_date: Chargebee keeps one usage per (subscription, item price,
 * usage_date).  A period can have a second, late record (usage that
 * reached Redis after the period was drained), so the date is
 * period_start plus a hash of the idempotency key modulo the period's
 * length: inside the period, the same on every resend, and different for
 * a late record of the same period (unless the hashes collide: 1 in 86400
 * for daily periods; such a record is dead-lettered, not lost).
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "provider.h"


typedef struct {
    meter_http_t                http;
    char                        base[256];
    char                        api_key[256];
} meter_chargebee_t;


static int meter_chargebee_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_chargebee_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static int meter_chargebee_lookup(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static void meter_chargebee_cleanup(meter_provider_t *p);


static int
meter_chargebee_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    int                 n;
    size_t              len;
    const char         *base, *site;
    meter_chargebee_t  *cb;

    cb = calloc(1, sizeof(meter_chargebee_t));
    if (cb == NULL) {
        snprintf(err, errlen, "chargebee: out of memory");
        return -1;
    }

    p->data = cb;

    base = meter_conf_get(cf, "chargebee.base_url");
    site = meter_conf_get(cf, "chargebee.site");

    if (base != NULL) {
        n = snprintf(cb->base, sizeof(cb->base), "%s", base);

    } else if (site != NULL) {
        n = snprintf(cb->base, sizeof(cb->base), "https://%s.chargebee.com",
                     site);

    } else {
        snprintf(err, errlen, "chargebee.site or chargebee.base_url: "
                 "required");
        return -1;
    }

    if (n <= 0 || (size_t) n >= sizeof(cb->base)) {
        snprintf(err, errlen, "chargebee.base_url: empty or too long");
        return -1;
    }

    len = strlen(cb->base);
    while (len > 0 && cb->base[len - 1] == '/') {
        cb->base[--len] = '\0';
    }

    if (meter_conf_secret(cf, "chargebee.api_key_file", cb->api_key,
                          sizeof(cb->api_key), err, errlen) != 0)
    {
        return -1;
    }

    if (cb->api_key[0] == '\0') {
        snprintf(err, errlen, "chargebee.api_key_file: the file is empty");
        return -1;
    }

    /* 2/s stays under the smallest plan's 150 requests a minute */
    return meter_http_init(&cb->http, "chargebee", cf, 2, err, errlen);
}


static int
meter_chargebee_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    if (meter_chargebee_setup(p, cf, err, errlen) != 0) {
        meter_chargebee_cleanup(p);
        return -1;
    }

    return 0;
}


static time_t
meter_chargebee_usage_date(const meter_record_t *rec)
{
    time_t          span;
    uint64_t        h;
    const uint8_t  *s;

    span = rec->period_end - rec->period_start;
    if (span <= 1) {
        return rec->period_start;
    }

    /* FNV-1a */
    h = 14695981039346656037ULL;
    for (s = (const uint8_t *) rec->idempotency_key; *s; s++) {
        h ^= *s;
        h *= 1099511628211ULL;
    }

    return rec->period_start + (time_t) (h % (uint64_t) span);
}


static meter_send_e
meter_chargebee_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int                 found;
    char                idem[200];
    meter_buf_t         url, body;
    meter_send_e        rc;
    meter_http_req_t    req;
    meter_chargebee_t  *cb;
    meter_http_resp_t   resp;
    meter_send_result_t lres;

    cb = p->data;

    memset(&url, 0, sizeof(url));
    memset(&body, 0, sizeof(body));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;
    res->status = rc;

    if (rec->subscription == NULL || rec->provider_meter == NULL) {
        snprintf(res->error, sizeof(res->error), "chargebee: record without "
                 "%s", rec->subscription == NULL
                       ? "a subscription" : "an item price");
        goto end;
    }

    if (meter_buf_printf(&url, "%s/api/v2/subscriptions/", cb->base) != 0
        || meter_url_segment(&url, cb->http.curl, rec->subscription) != 0
        || meter_buf_printf(&url, "/usages") != 0
        || meter_form_add(&body, cb->http.curl, "item_price_id",
                          rec->provider_meter) != 0
        || meter_form_add_u64(&body, cb->http.curl, "quantity",
                              (unsigned long long) rec->quantity) != 0
        || meter_form_add_u64(&body, cb->http.curl, "usage_date",
                              (unsigned long long)
                              meter_chargebee_usage_date(rec)) != 0
        || meter_form_add(&body, cb->http.curl, "id", rec->idempotency_key)
           != 0)
    {
        snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
        res->status = METER_SEND_RETRY;
        rc = METER_SEND_RETRY;
        goto end;
    }

    snprintf(idem, sizeof(idem), "chargebee-idempotency-key: %s",
             rec->idempotency_key);

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/x-www-form-urlencoded";
    req.accept = "application/json";
    req.body = body.data;
    req.body_len = body.len;
    req.headers[0] = idem;
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = cb->api_key;

    rc = meter_http_request(&cb->http, &req, &resp, res);

    /* a replayed failure: the usage id dedupes, so try a fresh key once */
    if (rc == METER_SEND_RETRY && resp.replayed) {
        snprintf(idem, sizeof(idem), "chargebee-idempotency-key: %s-r%lx%04lx",
                 rec->idempotency_key, (unsigned long) time(NULL),
                 (unsigned long) (random() & 0xffff));
        rc = meter_http_request(&cb->http, &req, &resp, res);
    }

    if (rc == METER_SEND_FATAL && res->http_status == 400) {
        /* the usage id may exist from an earlier attempt */
        memset(&lres, 0, sizeof(lres));
        found = meter_chargebee_lookup(p, rec, &lres);

        if (found == 1) {
            res->status = METER_SEND_OK;
            res->error[0] = '\0';
            rc = METER_SEND_OK;
        }
    }

end:

    meter_buf_free(&url);
    meter_buf_free(&body);
    meter_buf_free(&resp.body);

    return rc;
}


/* GET /api/v2/usages?id[is]=KEY&subscription_id[is]=SUB */
static int
meter_chargebee_lookup(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int                 found;
    cJSON              *json;
    meter_buf_t         url, q;
    meter_http_req_t    req;
    meter_chargebee_t  *cb;
    meter_http_resp_t   resp;
    const cJSON        *list, *item, *usage, *id;

    cb = p->data;
    found = -1;
    json = NULL;

    memset(&url, 0, sizeof(url));
    memset(&q, 0, sizeof(q));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));

    if (rec->subscription == NULL) {
        goto end;
    }

    if (meter_form_add(&q, cb->http.curl, "id[is]", rec->idempotency_key)
        != 0
        || meter_form_add(&q, cb->http.curl, "subscription_id[is]",
                          rec->subscription) != 0
        || meter_buf_printf(&url, "%s/api/v2/usages?%s", cb->base, q.data)
           != 0)
    {
        goto end;
    }

    req.method = "GET";
    req.url = url.data;
    req.accept = "application/json";
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = cb->api_key;

    if (meter_http_request(&cb->http, &req, &resp, res) != METER_SEND_OK) {
        goto end;
    }

    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    list = cJSON_GetObjectItemCaseSensitive(json, "list");
    if (!cJSON_IsArray(list)) {
        snprintf(res->error, sizeof(res->error),
                 "chargebee: usage list without \"list\"");
        goto end;
    }

    found = 0;

    cJSON_ArrayForEach(item, list) {
        usage = cJSON_GetObjectItemCaseSensitive(item, "usage");
        id = cJSON_GetObjectItemCaseSensitive(usage, "id");

        if (cJSON_IsString(id)
            && strcmp(id->valuestring, rec->idempotency_key) == 0)
        {
            found = 1;
            break;
        }
    }

end:

    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&q);
    meter_buf_free(&resp.body);

    return found;
}


static void
meter_chargebee_cleanup(meter_provider_t *p)
{
    meter_chargebee_t  *cb;

    cb = p->data;
    if (cb == NULL) {
        return;
    }

    meter_http_cleanup(&cb->http);
    explicit_bzero(cb->api_key, sizeof(cb->api_key));
    free(cb);
    p->data = NULL;
}


void
meter_provider_chargebee(meter_provider_t *p)
{
    p->name = "chargebee";
    p->init = meter_chargebee_init;
    p->send = meter_chargebee_send;
    /* usage ids are unique for good: the id dedupes every resend */
    p->lookup = NULL;
    p->cleanup = meter_chargebee_cleanup;
    p->data = NULL;
}
