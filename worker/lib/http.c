
/*
 * Copyright (C) nginx-meter authors
 *
 * The HTTP core shared by the providers: buffers, form encoding, config of
 * timeouts and retries, the bounded retry loop and the classification of
 * answers.  The transfer itself is meter_http_perform() (http_curl.c).
 */


#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "http.h"


static int meter_http_conf_num(const meter_conf_t *cf, const char *prefix,
    const char *name, int duration, double def, double min, double max,
    double *out, char *err, size_t errlen);
static void meter_http_throttle(meter_http_t *h);
static double meter_http_reset_delay(time_t reset);
static int meter_buf_grow(meter_buf_t *b, size_t n);


static int  meter_http_global_done;

meter_send_stats_t  meter_send_stats;


static int
meter_buf_grow(meter_buf_t *b, size_t n)
{
    char    *p;
    size_t   cap;

    if (b->len + n + 1 <= b->cap) {
        return 0;
    }

    cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) {
        cap *= 2;
    }

    p = realloc(b->data, cap);
    if (p == NULL) {
        return -1;
    }

    b->data = p;
    b->cap = cap;

    return 0;
}


int
meter_buf_append(meter_buf_t *b, const char *s, size_t n)
{
    if (meter_buf_grow(b, n) != 0) {
        return -1;
    }

    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';

    return 0;
}


int
meter_buf_printf(meter_buf_t *b, const char *fmt, ...)
{
    int      n;
    va_list  ap;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);

    if (n < 0 || meter_buf_grow(b, (size_t) n) != 0) {
        return -1;
    }

    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t) n + 1, fmt, ap);
    va_end(ap);

    b->len += n;

    return 0;
}


void
meter_buf_reset(meter_buf_t *b)
{
    b->len = 0;
    if (b->data != NULL) {
        b->data[0] = '\0';
    }
}


void
meter_buf_free(meter_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}


static int
meter_escape_append(meter_buf_t *b, CURL *curl, const char *s, size_t n)
{
    int    rc;
    char  *e;

    if (n == 0) {
        return 0;
    }

    e = curl_easy_escape(curl, s, (int) n);
    if (e == NULL) {
        return -1;
    }

    rc = meter_buf_append(b, e, strlen(e));
    curl_free(e);

    return rc;
}


int
meter_form_add(meter_buf_t *b, CURL *curl, const char *key,
    const char *value)
{
    const char  *p, *s;

    if (b->len > 0 && meter_buf_append(b, "&", 1) != 0) {
        return -1;
    }

    /* escape the runs between brackets; the brackets stay literal */
    for (p = s = key; ; p++) {
        if (*p == '[' || *p == ']' || *p == '\0') {
            if (meter_escape_append(b, curl, s, p - s) != 0) {
                return -1;
            }

            if (*p == '\0') {
                break;
            }

            if (meter_buf_append(b, p, 1) != 0) {
                return -1;
            }

            s = p + 1;
        }
    }

    if (meter_buf_append(b, "=", 1) != 0) {
        return -1;
    }

    return meter_escape_append(b, curl, value, strlen(value));
}


int
meter_form_add_u64(meter_buf_t *b, CURL *curl, const char *key,
    unsigned long long value)
{
    char  num[24];

    snprintf(num, sizeof(num), "%llu", value);

    return meter_form_add(b, curl, key, num);
}


int
meter_url_segment(meter_buf_t *b, CURL *curl, const char *seg)
{
    return meter_escape_append(b, curl, seg, strlen(seg));
}


void
meter_rfc3339(time_t t, char *buf, size_t size)
{
    struct tm  tm;

    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}


double
meter_http_parse_duration(const char *s)
{
    char    *end;
    double   v;

    if (s == NULL || *s == '\0') {
        return -1;
    }

    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || end == s || v < 0 || !isfinite(v)) {
        return -1;
    }

    if (*end == '\0' || strcmp(end, "s") == 0) {
        return v;
    }

    if (strcmp(end, "ms") == 0) {
        return v / 1000;
    }

    if (strcmp(end, "m") == 0) {
        return v * 60;
    }

    return -1;
}


/* an HTTP-date in any of its three forms (RFC 9110, 5.6.7); -1 when not */
static time_t
meter_http_date(const char *v)
{
    size_t      i;
    struct tm   tm;
    const char *end;

    static const char *const  fmts[] = {
        "%a, %d %b %Y %H:%M:%S GMT",    /* IMF-fixdate */
        "%A, %d-%b-%y %H:%M:%S GMT",    /* obsolete RFC 850 */
        "%a %b %e %H:%M:%S %Y",         /* obsolete asctime() */
    };

    for (i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
        memset(&tm, 0, sizeof(tm));
        end = strptime(v, fmts[i], &tm);

        if (end != NULL && *end == '\0') {
            return timegm(&tm);
        }
    }

    return -1;
}


/*
 * RFC 9110, 10.2.3: Retry-After = HTTP-date / delay-seconds, and
 * delay-seconds is 1*DIGIT.  No sign, fraction or exponent ("1e300",
 * "-5", "0.5" are malformed: -1, so the caller's backoff applies);
 * anything longer than METER_HTTP_RETRY_AFTER_MAX is that much (the drain
 * caps it further at retry.max).
 */
double
meter_http_parse_retry_after(const char *v, time_t now)
{
    time_t  t;
    double  d;

    if (v == NULL || *v == '\0') {
        return -1;
    }

    if (strspn(v, "0123456789") == strlen(v)) {
        /* digit by digit: "99999999999..." saturates, never overflows */
        for (d = 0; *v != '\0' && d <= METER_HTTP_RETRY_AFTER_MAX; v++) {
            d = d * 10 + (*v - '0');
        }

        return d < METER_HTTP_RETRY_AFTER_MAX ? d
                                              : METER_HTTP_RETRY_AFTER_MAX;
    }

    t = meter_http_date(v);
    if (t == -1) {
        return -1;
    }

    if (t <= now) {
        return 0;
    }

    d = (double) (t - now);

    return d < METER_HTTP_RETRY_AFTER_MAX ? d : METER_HTTP_RETRY_AFTER_MAX;
}


static int
meter_http_conf_num(const meter_conf_t *cf, const char *prefix,
    const char *name, int duration, double def, double min, double max,
    double *out, char *err, size_t errlen)
{
    char         key[128], *end;
    double       v;
    const char  *s;

    snprintf(key, sizeof(key), "%s.%s", prefix, name);

    s = meter_conf_get(cf, key);
    if (s == NULL) {
        *out = def;
        return 0;
    }

    if (duration) {
        v = meter_http_parse_duration(s);

    } else {
        errno = 0;
        v = strtod(s, &end);
        if (errno != 0 || end == s || *end != '\0' || !isfinite(v)) {
            v = -1;
        }
    }

    if (v < min || v > max) {
        snprintf(err, errlen, "%s: invalid value \"%s\" (%g..%g%s)", key, s,
                 min, max, duration ? " s" : "");
        return -1;
    }

    *out = v;

    return 0;
}


int
meter_http_init(meter_http_t *h, const char *prefix, const meter_conf_t *cf,
    double default_rps, char *err, size_t errlen)
{
    return meter_http_init_many(h, prefix, cf, default_rps, 1, err, errlen);
}


int
meter_http_init_many(meter_http_t *h, const char *prefix,
    const meter_conf_t *cf, double default_rps, int default_in_flight,
    char *err, size_t errlen)
{
    double  connect, total, attempts, in_flight;

    memset(h, 0, sizeof(*h));
    h->name = prefix;

    if (meter_http_conf_num(cf, prefix, "connect_timeout", 1, 5, 0.001, 600,
                            &connect, err, errlen) != 0
        || meter_http_conf_num(cf, prefix, "timeout", 1, 30, 0.001, 3600,
                               &total, err, errlen) != 0
        || meter_http_conf_num(cf, prefix, "max_attempts", 0, 3, 1, 20,
                               &attempts, err, errlen) != 0
        || meter_http_conf_num(cf, prefix, "backoff", 1, 0.5, 0, 60,
                               &h->backoff, err, errlen) != 0
        || meter_http_conf_num(cf, prefix, "retry_cap", 1, 30, 0, 3600,
                               &h->retry_cap, err, errlen) != 0
        || meter_http_conf_num(cf, prefix, "max_rps", 0, default_rps, 0, 1e6,
                               &h->max_rps, err, errlen) != 0
        || meter_http_conf_num(cf, prefix, "max_in_flight", 0,
                               default_in_flight, 1, 1000, &in_flight, err,
                               errlen) != 0)
    {
        return -1;
    }

    if (attempts != floor(attempts)) {
        snprintf(err, errlen, "%s.max_attempts: not a whole number", prefix);
        return -1;
    }

    if (in_flight != floor(in_flight)) {
        snprintf(err, errlen, "%s.max_in_flight: not a whole number",
                 prefix);
        return -1;
    }

    h->max_in_flight = (int) in_flight;
    meter_send_stats.provider = prefix;

    h->connect_timeout_ms = (long) ceil(connect * 1000);
    h->timeout_ms = (long) ceil(total * 1000);
    h->max_attempts = (int) attempts;
    h->resend_unknown = 1;
    h->rl_remaining = -1;
    h->tokens = h->max_rps >= 1 ? h->max_rps : 1;

    if (!meter_http_global_done) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            snprintf(err, errlen, "%s: curl_global_init() failed", prefix);
            return -1;
        }

        meter_http_global_done = 1;
    }

    h->curl = curl_easy_init();
    if (h->curl == NULL) {
        snprintf(err, errlen, "%s: curl_easy_init() failed", prefix);
        return -1;
    }

    return 0;
}


void
meter_http_cleanup(meter_http_t *h)
{
    int  i;

    for (i = 0; i < h->npool; i++) {
        curl_easy_cleanup(h->pool[i]);
    }

    free(h->pool);
    h->pool = NULL;
    h->npool = 0;
    h->nmade = 0;

    if (h->multi != NULL) {
        curl_multi_cleanup(h->multi);
        h->multi = NULL;
    }

    if (h->curl != NULL) {
        curl_easy_cleanup(h->curl);
        h->curl = NULL;
    }
}


double
meter_http_now(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return ts.tv_sec + ts.tv_nsec / 1e9;
}


/* token bucket: at most max_rps requests per second, bursts of max_rps */
double
meter_http_token(meter_http_t *h)
{
    double  now, burst;

    if (h->max_rps <= 0) {
        return 0;
    }

    burst = h->max_rps >= 1 ? h->max_rps : 1;
    now = meter_http_now();

    if (h->last.tv_sec != 0 || h->last.tv_nsec != 0) {
        h->tokens += (now - (h->last.tv_sec + h->last.tv_nsec / 1e9))
                     * h->max_rps;
        if (h->tokens > burst) {
            h->tokens = burst;
        }
    }

    h->last.tv_sec = (time_t) now;
    h->last.tv_nsec = (long) ((now - (double) h->last.tv_sec) * 1e9);

    if (h->tokens < 1) {
        return (1 - h->tokens) / h->max_rps;
    }

    h->tokens -= 1;

    return 0;
}


static void
meter_http_throttle(meter_http_t *h)
{
    double  wait, now;

    wait = meter_http_token(h);
    if (wait <= 0) {
        return;
    }

    /* the wait pays for the token: it is spent once slept */
    meter_http_sleep(wait);
    now = meter_http_now();
    h->tokens = 0;
    h->last.tv_sec = (time_t) now;
    h->last.tv_nsec = (long) ((now - (double) h->last.tv_sec) * 1e9);
}


/* seconds until an X-RateLimit-Reset time; bounded by Recurly's 5-minute
 * window (and some slack), so a bogus header cannot park a record */
static double
meter_http_reset_delay(time_t reset)
{
    time_t  now;

    now = time(NULL);

    if (reset <= now) {
        return 0;
    }

    return reset - now > 600 ? 600 : (double) (reset - now);
}


void
meter_http_error_message(const char *body, size_t len, char *buf,
    size_t size)
{
    char         *details;
    size_t        i, n;
    cJSON        *json, *e, *m;
    const cJSON  *msg;

    buf[0] = '\0';
    msg = NULL;
    details = NULL;

    if (body == NULL || len == 0) {
        return;
    }

    json = cJSON_ParseWithLength(body, len);
    if (json == NULL) {
        goto raw;
    }

    /* Stripe, Recurly: {"error":{"message"}}; Chargebee: {"message"};
     * problem+json: {"detail"} or {"title"}; Lago: {"error_details"} */
    e = cJSON_GetObjectItemCaseSensitive(json, "error");
    m = cJSON_GetObjectItemCaseSensitive(e, "message");
    if (cJSON_IsString(m)) {
        msg = m;
        goto end;
    }

    if (cJSON_IsString(e)) {
        msg = e;
    }

    m = cJSON_GetObjectItemCaseSensitive(json, "message");
    if (cJSON_IsString(m)) {
        msg = m;
        goto end;
    }

    m = cJSON_GetObjectItemCaseSensitive(json, "detail");
    if (!cJSON_IsString(m)) {
        m = cJSON_GetObjectItemCaseSensitive(json, "title");
    }

    if (cJSON_IsString(m)) {
        msg = m;
        goto end;
    }

    m = cJSON_GetObjectItemCaseSensitive(json, "error_details");
    if (m != NULL) {
        details = cJSON_PrintUnformatted(m);
    }

end:

    if (details != NULL) {
        snprintf(buf, size, "%s%s%s", msg != NULL ? msg->valuestring : "",
                 msg != NULL ? ": " : "", details);
        cJSON_free(details);

    } else if (msg != NULL) {
        snprintf(buf, size, "%s", msg->valuestring);
    }

    cJSON_Delete(json);

    if (buf[0] != '\0') {
        /* the provider's text is stored (last_error), logged and shown by
         * meterctl: on one line, no terminal controls */
        for (i = 0; buf[i] != '\0'; i++) {
            if ((unsigned char) buf[i] < 0x20 || buf[i] == 0x7f) {
                buf[i] = ' ';
            }
        }

        return;
    }

raw:

    /* the start of a non-JSON body, on one printable line */
    n = len < size - 1 ? len : size - 1;
    if (n > 200) {
        n = 200;
    }

    for (i = 0; i < n; i++) {
        buf[i] = (body[i] >= 0x20 && body[i] < 0x7f) ? body[i] : ' ';
    }

    buf[n] = '\0';
}


meter_send_e
meter_http_classify(const meter_http_resp_t *resp, meter_send_result_t *res)
{
    long  s;
    char  msg[400];

    s = resp->status;

    res->http_status = s;
    res->retry_after = resp->retry_after > 0 ? resp->retry_after : 0;
    res->error[0] = '\0';

    if (s == 0) {
        snprintf(res->error, sizeof(res->error), "%s",
                 resp->error[0] ? resp->error : "no answer");
        res->status = METER_SEND_RETRY;
        return res->status;
    }

    if (s >= 200 && s < 300 && resp->should_retry != 1) {
        res->status = METER_SEND_OK;
        return res->status;
    }

    meter_http_error_message(resp->body.data, resp->body.len, msg,
                             sizeof(msg));

    snprintf(res->error, sizeof(res->error), "HTTP %ld%s%s", s,
             msg[0] ? ": " : "", msg);

    if (resp->should_retry == 1) {
        res->status = METER_SEND_RETRY;

    } else if (resp->should_retry == 0) {
        res->status = METER_SEND_FATAL;

    } else if (s == 408 || s == 409 || s == 429 || s >= 500) {
        res->status = METER_SEND_RETRY;

    } else {
        res->status = METER_SEND_FATAL;
    }

    return res->status;
}


/*
 * After one answer: 1 with *delay when the request is to be made again,
 * 0 when done (res classified).  A 429 pauses the whole provider for the
 * delay: the other requests open at the same time would only get 429s too.
 */
int
meter_http_next(meter_http_t *h, meter_http_resp_t *resp,
    meter_send_result_t *res, int attempt, double *delay)
{
    double        d, wait;
    meter_send_e  st;

    meter_send_stats.requests++;

    h->rl_remaining = resp->rl_remaining;
    h->rl_reset = resp->rl_reset;

    /* Recurly's 429 has no Retry-After, only X-RateLimit-Reset */
    if (resp->status == 429 && resp->retry_after < 0 && resp->rl_reset > 0) {
        resp->retry_after = meter_http_reset_delay(resp->rl_reset);
        h->rl_remaining = -1;   /* the wait below covers it */
    }

    st = meter_http_classify(resp, res);
    if (st != METER_SEND_RETRY) {
        return 0;
    }

    if (!h->resend_unknown && (resp->status == 0 || resp->status >= 500)) {
        return 0;
    }

    /* exponential backoff with full jitter in [d/2, d] */
    d = h->backoff * pow(2, attempt - 1);
    d = d / 2 + d / 2 * ((double) random() / RAND_MAX);

    if (resp->status == 429) {
        meter_send_stats.throttled++;

        /* the whole provider waits (an absurd Retry-After: retry_cap at
         * most); no burst right after: the bucket refills from empty */
        wait = resp->retry_after >= 0 ? resp->retry_after : d;
        if (wait > h->retry_cap) {
            wait = h->retry_cap;
        }

        if (meter_http_now() + wait > h->pause_until) {
            h->pause_until = meter_http_now() + wait;
        }

        h->tokens = 0;
    }

    if (resp->retry_after >= 0) {
        if (resp->retry_after > h->retry_cap) {
            /* too long to wait inside a call: let the drain loop
             * schedule it and go on with other customers */
            return 0;
        }

        if (resp->retry_after > d) {
            d = resp->retry_after;
        }
    }

    if (attempt >= h->max_attempts) {
        return 0;
    }

    *delay = d;

    return 1;
}


void
meter_http_give_up(meter_http_t *h, const meter_http_resp_t *resp,
    meter_send_result_t *res, meter_send_e st)
{
    if (st != METER_SEND_RETRY) {
        return;
    }

    if (res->retry_after <= 0) {
        res->retry_after = h->backoff * pow(2, h->max_attempts);
    }

    snprintf(res->error + strlen(res->error),
             sizeof(res->error) - strlen(res->error),
             " (%s, %d attempt%s)", h->name, resp->attempts,
             resp->attempts == 1 ? "" : "s");
}


double
meter_http_paused(meter_http_t *h, meter_send_result_t *res)
{
    double  wait, now;

    now = meter_http_now();

    if (h->rl_remaining == 0 && h->rl_reset > 0) {
        /* the window is spent: no request that can only 429 */
        wait = meter_http_reset_delay(h->rl_reset);
        h->rl_remaining = -1;

        if (wait > 0 && now + wait > h->pause_until) {
            h->pause_until = now + wait;
        }
    }

    wait = h->pause_until - now;
    if (wait <= 0) {
        return 0;
    }

    if (wait > h->retry_cap) {
        res->status = METER_SEND_RETRY;
        res->http_status = 429;
        res->retry_after = wait;
        snprintf(res->error, sizeof(res->error), "%s: rate limited, "
                 "paused for %.0fs more", h->name, wait);
        return -1;
    }

    return wait;
}


meter_send_e
meter_http_request(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp, meter_send_result_t *res)
{
    int           attempt;
    double        delay, wait;
    meter_send_e  st;

    delay = 0;

    for (attempt = 1; attempt <= h->max_attempts; attempt++) {
        wait = meter_http_paused(h, res);
        if (wait < 0) {
            resp->attempts = attempt - 1;
            return METER_SEND_RETRY;
        }

        /* one wait covers both the backoff and a pause it caused */
        if (wait > delay) {
            delay = wait;
        }

        if (delay > 0) {
            meter_http_sleep(delay);
        }

        meter_http_throttle(h);

        resp->attempts = attempt;
        (void) meter_http_perform(h, req, resp);

        delay = 0;
        if (!meter_http_next(h, resp, res, attempt, &delay)) {
            break;
        }
    }

    st = res->status;
    meter_http_give_up(h, resp, res, st);

    return st;
}
