
/*
 * Copyright (C) nginx-meter authors
 *
 * Recurly (v3): POST /subscriptions/{id}/add_ons/{add_on}/usage, JSON
 * amount, merchant_tag, usage_timestamp, recording_timestamp;
 * Accept: application/vnd.recurly.v2021-02-25; Basic auth with the API key
 * as user.
 *
 * Recurly has no idempotency header.  The record's idempotency key goes
 * into merchant_tag, and lookup() lists the add-on's usage (following
 * "next" pages) to find it before the drain loop resends a record whose
 * outcome is unknown.  Inside one call only answers that prove the usage
 * was not stored (429, 409) are retried; after a timeout or a 5xx the
 * call returns RETRY and the next attempt starts with lookup().
 *
 * usage_timestamp is period_start (when the usage happened);
 * recording_timestamp is period_end (when we had it complete): both fixed
 * for a record, so a resend is byte-identical.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "provider.h"


#define METER_RECURLY_ACCEPT  "application/vnd.recurly.v2021-02-25"
#define METER_RECURLY_PAGES   1000


typedef struct {
    meter_http_t                http;
    char                        base[256];
    char                        api_key[256];
} meter_recurly_t;


static int meter_recurly_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_recurly_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static int meter_recurly_lookup(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static void meter_recurly_cleanup(meter_provider_t *p);


static int
meter_recurly_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    size_t            n;
    const char       *base;
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

    if (meter_http_init(&rc->http, "recurly", cf, 10, err, errlen) != 0) {
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


/* {base}/subscriptions/{sub}/add_ons/{add_on}/usage */
static int
meter_recurly_url(meter_recurly_t *rc, const meter_record_t *rec,
    meter_buf_t *url)
{
    if (meter_buf_printf(url, "%s/subscriptions/", rc->base) != 0
        || meter_url_segment(url, rc->http.curl, rec->subscription) != 0
        || meter_buf_printf(url, "/add_ons/") != 0
        || meter_url_segment(url, rc->http.curl, rec->provider_meter) != 0
        || meter_buf_printf(url, "/usage") != 0)
    {
        return -1;
    }

    return 0;
}


static meter_send_e
meter_recurly_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    char               *js, ts[32];
    cJSON              *json;
    meter_buf_t         url;
    meter_send_e        rc;
    meter_recurly_t    *rp;
    meter_http_req_t    req;
    meter_http_resp_t   resp;

    rp = p->data;
    js = NULL;

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

    meter_rfc3339(rec->period_end, ts, sizeof(ts));
    if (cJSON_AddStringToObject(json, "recording_timestamp", ts) == NULL) {
        goto nomem;
    }

    js = cJSON_PrintUnformatted(json);
    if (js == NULL || meter_recurly_url(rp, rec, &url) != 0) {
        goto nomem;
    }

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/json";
    req.accept = METER_RECURLY_ACCEPT;
    req.body = js;
    req.body_len = strlen(js);
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


/* 1: a usage with merchant_tag == idempotency key exists; 0: none; -1 */
static int
meter_recurly_lookup(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int                 found, page;
    cJSON              *json;
    meter_buf_t         url;
    meter_recurly_t    *rp;
    meter_http_req_t    req;
    meter_http_resp_t   resp;
    const cJSON        *data, *item, *tag, *more, *next;

    rp = p->data;
    found = -1;
    json = NULL;

    memset(&url, 0, sizeof(url));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(res, 0, sizeof(*res));

    if (rec->subscription == NULL || rec->provider_meter == NULL) {
        snprintf(res->error, sizeof(res->error),
                 "recurly: record without a subscription or add-on");
        goto end;
    }

    if (meter_recurly_url(rp, rec, &url) != 0
        || meter_buf_printf(&url, "?limit=200") != 0)
    {
        goto end;
    }

    req.method = "GET";
    req.accept = METER_RECURLY_ACCEPT;
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = rp->api_key;

    for (page = 0; page < METER_RECURLY_PAGES; page++) {
        req.url = url.data;

        if (meter_http_request(&rp->http, &req, &resp, res)
            != METER_SEND_OK)
        {
            goto end;
        }

        cJSON_Delete(json);
        json = cJSON_ParseWithLength(resp.body.data, resp.body.len);

        data = cJSON_GetObjectItemCaseSensitive(json, "data");
        if (!cJSON_IsArray(data)) {
            snprintf(res->error, sizeof(res->error),
                     "recurly: usage list without \"data\"");
            goto end;
        }

        cJSON_ArrayForEach(item, data) {
            tag = cJSON_GetObjectItemCaseSensitive(item, "merchant_tag");

            if (cJSON_IsString(tag)
                && strcmp(tag->valuestring, rec->idempotency_key) == 0)
            {
                found = 1;
                goto end;
            }
        }

        more = cJSON_GetObjectItemCaseSensitive(json, "has_more");
        next = cJSON_GetObjectItemCaseSensitive(json, "next");

        if (!cJSON_IsTrue(more)) {
            found = 0;
            goto end;
        }

        if (!cJSON_IsString(next) || next->valuestring[0] != '/') {
            snprintf(res->error, sizeof(res->error),
                     "recurly: usage list with has_more but no next path");
            goto end;
        }

        /* "next" is a path with its query, relative to the base URL */
        meter_buf_reset(&url);
        if (meter_buf_printf(&url, "%s%s", rp->base, next->valuestring)
            != 0)
        {
            goto end;
        }
    }

    snprintf(res->error, sizeof(res->error),
             "recurly: usage list longer than %d pages", METER_RECURLY_PAGES);

end:

    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&resp.body);

    return found;
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
    p->cleanup = meter_recurly_cleanup;
    p->data = NULL;
}
