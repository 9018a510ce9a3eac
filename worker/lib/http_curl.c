
/*
 * Copyright (C) nginx-meter authors
 *
 * The one libcurl transfer and the one sleep of the HTTP core, in their own
 * file so that unit tests can wrap them (-Wl,--wrap only replaces
 * references between object files).
 */


#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>

#include "http.h"


static size_t meter_http_write_cb(char *ptr, size_t size, size_t nmemb,
    void *data);
static size_t meter_http_header_cb(char *ptr, size_t size, size_t nmemb,
    void *data);


static size_t
meter_http_write_cb(char *ptr, size_t size, size_t nmemb, void *data)
{
    meter_http_resp_t  *resp = data;

    /* bounded: error bodies and lists are small */
    if (resp->body.len + size * nmemb > 4 * 1024 * 1024) {
        return 0;
    }

    if (meter_buf_append(&resp->body, ptr, size * nmemb) != 0) {
        return 0;
    }

    return size * nmemb;
}


static size_t
meter_http_header_cb(char *ptr, size_t size, size_t nmemb, void *data)
{
    char                v[64];
    size_t              n, len, vlen;
    const char         *p, *colon;
    meter_http_resp_t  *resp = data;

    len = size * nmemb;

    /* a new status line (100 Continue, ...) starts a new header set */
    if (len >= 5 && strncmp(ptr, "HTTP/", 5) == 0) {
        resp->retry_after = -1;
        resp->should_retry = -1;
        resp->replayed = 0;
        resp->rl_remaining = -1;
        resp->rl_reset = -1;
        return len;
    }

    colon = memchr(ptr, ':', len);
    if (colon == NULL) {
        return len;
    }

    n = colon - ptr;
    p = colon + 1;
    while (p < ptr + len && (*p == ' ' || *p == '\t')) {
        p++;
    }

    vlen = ptr + len - p;
    while (vlen > 0 && (p[vlen - 1] == '\r' || p[vlen - 1] == '\n'
                        || p[vlen - 1] == ' '))
    {
        vlen--;
    }

    if (vlen >= sizeof(v)) {
        vlen = sizeof(v) - 1;
    }

    memcpy(v, p, vlen);
    v[vlen] = '\0';

    if (n == sizeof("Retry-After") - 1
        && strncasecmp(ptr, "Retry-After", n) == 0)
    {
        resp->retry_after = meter_http_parse_retry_after(v, time(NULL));

    } else if (n == sizeof("Stripe-Should-Retry") - 1
               && strncasecmp(ptr, "Stripe-Should-Retry", n) == 0)
    {
        resp->should_retry = strcasecmp(v, "true") == 0 ? 1 : 0;

    } else if (n == sizeof("chargebee-idempotency-replayed") - 1
               && strncasecmp(ptr, "chargebee-idempotency-replayed", n)
                  == 0)
    {
        resp->replayed = strcasecmp(v, "true") == 0;

    } else if (n == sizeof("X-RateLimit-Remaining") - 1
               && strncasecmp(ptr, "X-RateLimit-Remaining", n) == 0
               && v[0] != '\0' && strspn(v, "0123456789") == strlen(v)
               && strlen(v) < 10)
    {
        resp->rl_remaining = strtol(v, NULL, 10);

    } else if (n == sizeof("X-RateLimit-Reset") - 1
               && strncasecmp(ptr, "X-RateLimit-Reset", n) == 0
               && v[0] != '\0' && strspn(v, "0123456789") == strlen(v)
               && strlen(v) < 12)
    {
        /* Unix seconds (recurly-client-ruby openapi/api.yaml, "Limits") */
        resp->rl_reset = (time_t) strtoll(v, NULL, 10);

    } else if (n == sizeof("Idempotent-Replayed") - 1
               && strncasecmp(ptr, "Idempotent-Replayed", n) == 0)
    {
        /* Stripe */
        resp->replayed = strcasecmp(v, "true") == 0;
    }

    return len;
}


/*
 * Sets up c for req (the answer goes into resp): the part of one request
 * that the single and the concurrent paths share (http_multi.c).  *hl is
 * the header list to pass to meter_http_easy_release(); 0 or -1 (out of
 * memory, resp->error set).
 */
int
meter_http_easy_prepare(meter_http_t *h, CURL *c, const meter_http_req_t *req,
    meter_http_resp_t *resp, struct curl_slist **hl_out)
{
    int                 i;
    char                line[600];
    struct curl_slist  *hl, *tmp;

    hl = NULL;
    *hl_out = NULL;

    meter_buf_reset(&resp->body);
    resp->status = 0;
    resp->retry_after = -1;
    resp->should_retry = -1;
    resp->replayed = 0;
    resp->rl_remaining = -1;
    resp->rl_reset = -1;
    resp->error[0] = '\0';

    /* reset keeps the connection cache: connections stay persistent */
    curl_easy_reset(c);

    curl_easy_setopt(c, CURLOPT_URL, req->url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, h->connect_timeout_ms);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, h->timeout_ms);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "nginx-meter-worker/1");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, meter_http_write_cb);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, resp);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, meter_http_header_cb);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, resp);
    /* HTTP/2 where TLS negotiates it (ALPN); plain http stays 1.1 */
    curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_2TLS);

    if (strcmp(req->method, "GET") == 0) {
        curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);

    } else {
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS,
                         req->body != NULL ? req->body : "");
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t) (req->body != NULL ? req->body_len : 0));
        if (strcmp(req->method, "POST") != 0) {
            curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, req->method);
        }
    }

    /* no "Expect: 100-continue" round trip */
    tmp = curl_slist_append(hl, "Expect:");
    if (tmp == NULL) {
        goto nomem;
    }
    hl = tmp;

    if (req->content_type != NULL) {
        snprintf(line, sizeof(line), "Content-Type: %s", req->content_type);
        tmp = curl_slist_append(hl, line);
        if (tmp == NULL) {
            goto nomem;
        }
        hl = tmp;
    }

    if (req->accept != NULL) {
        snprintf(line, sizeof(line), "Accept: %s", req->accept);
        tmp = curl_slist_append(hl, line);
        if (tmp == NULL) {
            goto nomem;
        }
        hl = tmp;
    }

    for (i = 0; i < METER_HTTP_MAX_HEADERS && req->headers[i] != NULL; i++) {
        tmp = curl_slist_append(hl, req->headers[i]);
        if (tmp == NULL) {
            goto nomem;
        }
        hl = tmp;
    }

    if (req->auth == METER_HTTP_AUTH_BEARER) {
        snprintf(line, sizeof(line), "Authorization: Bearer %s",
                 req->secret != NULL ? req->secret : "");
        tmp = curl_slist_append(hl, line);
        explicit_bzero(line, sizeof(line));
        if (tmp == NULL) {
            goto nomem;
        }
        hl = tmp;

    } else if (req->auth == METER_HTTP_AUTH_BASIC) {
        curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long) CURLAUTH_BASIC);
        curl_easy_setopt(c, CURLOPT_USERNAME,
                         req->secret != NULL ? req->secret : "");
        curl_easy_setopt(c, CURLOPT_PASSWORD, "");
    }

    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    *hl_out = hl;

    return 0;

nomem:

    meter_http_easy_release(c, hl);
    snprintf(resp->error, sizeof(resp->error), "out of memory");

    return -1;
}


/* after a transfer: the header list wiped and freed, and c's references
 * to the request's memory and the token dropped */
void
meter_http_easy_release(CURL *c, struct curl_slist *hl)
{
    struct curl_slist  *tmp;

    /* the header list may hold the bearer token: wipe it */
    for (tmp = hl; tmp != NULL; tmp = tmp->next) {
        explicit_bzero(tmp->data, strlen(tmp->data));
    }

    curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hl);

    curl_easy_setopt(c, CURLOPT_POSTFIELDS, NULL);
    curl_easy_setopt(c, CURLOPT_USERNAME, NULL);
    curl_easy_setopt(c, CURLOPT_PASSWORD, NULL);
}


int
meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp)
{
    int                 rc;
    CURLcode            cc;
    struct curl_slist  *hl;

    if (meter_http_easy_prepare(h, h->curl, req, resp, &hl) != 0) {
        return -1;
    }

    rc = -1;
    cc = curl_easy_perform(h->curl);

    if (cc != CURLE_OK) {
        /* curl's messages name the host, never the credentials */
        snprintf(resp->error, sizeof(resp->error), "%s",
                 curl_easy_strerror(cc));

    } else {
        curl_easy_getinfo(h->curl, CURLINFO_RESPONSE_CODE, &resp->status);
        rc = 0;
    }

    meter_http_easy_release(h->curl, hl);

    return rc;
}


void
meter_http_sleep(double seconds)
{
    struct timespec  ts;

    if (seconds <= 0) {
        return;
    }

    ts.tv_sec = (time_t) seconds;
    ts.tv_nsec = (long) ((seconds - (double) ts.tv_sec) * 1e9);

    /* a signal cuts the wait short; the caller re-checks its flags */
    (void) nanosleep(&ts, NULL);
}
