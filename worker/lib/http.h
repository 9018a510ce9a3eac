
/*
 * Copyright (C) nginx-meter authors
 *
 * The HTTP core shared by the billing providers: one reused libcurl easy
 * handle per provider (persistent connections), timeouts always set, a
 * bounded retry inside one call, classification of the answer into
 * OK / RETRY / FATAL, and form encoding with bracket nesting.
 *
 * Seams for unit tests (cmocka, -Wl,--wrap=...): meter_http_perform() (one
 * request, the only libcurl transfer) and meter_http_sleep() live in
 * http_curl.c, so calls to them from http.c can be wrapped.
 */


#ifndef _METER_HTTP_H_INCLUDED_
#define _METER_HTTP_H_INCLUDED_


#include <stddef.h>
#include <time.h>

#include <curl/curl.h>

#include "provider.h"


#define METER_HTTP_MAX_HEADERS  8


typedef struct {
    char                       *data;   /* always NUL-terminated */
    size_t                      len;
    size_t                      cap;
} meter_buf_t;


typedef enum {
    METER_HTTP_AUTH_NONE = 0,
    METER_HTTP_AUTH_BEARER,             /* Authorization: Bearer secret */
    METER_HTTP_AUTH_BASIC               /* secret as user, empty password */
} meter_http_auth_e;


typedef struct {
    CURL                       *curl;
    const char                 *name;           /* "stripe", for errors */
    long                        connect_timeout_ms;
    long                        timeout_ms;
    int                         max_attempts;   /* >= 1 */
    double                      backoff;        /* s, first retry delay */
    double                      retry_cap;      /* s, longest wait inside
                                                 * one call */
    double                      max_rps;        /* 0: no limit */
    int                         max_in_flight;  /* >= 1: requests open at
                                                 * once (http_multi.c) */
    CURLM                      *multi;          /* made when first needed */
    CURL                      **pool;           /* max_in_flight easy
                                                 * handles, npool free */
    int                         npool;
    int                         nmade;
    double                      pause_until;    /* monotonic s: a 429
                                                 * pauses the provider,
                                                 * not just one request */
    int                         resend_unknown; /* 0: no resend inside the
                                                 * call when the request
                                                 * may have been processed
                                                 * (timeout, 5xx): for a
                                                 * provider without dedupe
                                                 * the drain loop looks it
                                                 * up first */
    double                      tokens;         /* token bucket */
    struct timespec             last;
    long                        rl_remaining;   /* X-RateLimit-Remaining
                                                 * of the last answer;
                                                 * -1 unknown */
    time_t                      rl_reset;       /* X-RateLimit-Reset */
} meter_http_t;


typedef struct {
    const char                 *method;         /* "GET", "POST" */
    const char                 *url;
    const char                 *content_type;   /* NULL: none */
    const char                 *accept;         /* NULL: none */
    const char                 *body;           /* NULL: no body */
    size_t                      body_len;
    const char                 *headers[METER_HTTP_MAX_HEADERS + 1];
                                                /* "Name: value", NULL
                                                 * ends; no secrets */
    meter_http_auth_e           auth;
    const char                 *secret;         /* never logged */
} meter_http_req_t;


typedef struct {
    long                        status;         /* 0: no HTTP answer */
    meter_buf_t                 body;
    double                      retry_after;    /* s; -1 absent */
    int                         should_retry;   /* Stripe-Should-Retry:
                                                 * -1 absent, 0, 1 */
    int                         replayed;       /* a replayed answer:
                                                 * Idempotent-Replayed,
                                                 * chargebee-idempotency-
                                                 * replayed */
    int                         attempts;       /* made by the last call */
    long                        rl_remaining;   /* X-RateLimit-Remaining:
                                                 * -1 absent (Recurly) */
    time_t                      rl_reset;       /* X-RateLimit-Reset, Unix
                                                 * s: -1 absent */
    char                        error[256];     /* transport error */
} meter_http_resp_t;


/*
 * Counters of the sending side, for the worker's metrics (one provider per
 * worker): records finished by the drain loop, and the requests open now.
 */
typedef struct {
    const char                 *provider;
    unsigned long long          sent;           /* accepted */
    unsigned long long          failed;         /* attempts to retry later */
    unsigned long long          dead;           /* dead-lettered */
    unsigned long long          requests;       /* HTTP requests made */
    unsigned long long          throttled;      /* 429 answers */
    unsigned                    in_flight;      /* open right now */
    unsigned                    in_flight_max;  /* the most at once */
} meter_send_stats_t;

extern meter_send_stats_t  meter_send_stats;


/* one request of meter_http_request_many() */
typedef struct {
    const meter_http_req_t     *req;            /* the caller's, unchanged
                                                 * until the call returns */
    const char                 *serial;         /* jobs with equal serial
                                                 * keys are never in flight
                                                 * together (Stripe: one
                                                 * call per customer and
                                                 * meter); NULL: none */
    meter_http_resp_t           resp;           /* the last answer; the
                                                 * caller frees resp.body */
    meter_send_result_t         res;
    meter_send_e                st;

    /* the engine's */
    int                         state;
    int                         attempts;
    double                      not_before;     /* monotonic s */
    CURL                       *easy;
    struct curl_slist          *hl;
} meter_http_job_t;


/* buffers */
int meter_buf_append(meter_buf_t *b, const char *s, size_t n);
int meter_buf_printf(meter_buf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void meter_buf_reset(meter_buf_t *b);
void meter_buf_free(meter_buf_t *b);

/*
 * Appends "&key=value" (no "&" when b is empty), percent-encoded with
 * curl_easy_escape; '[' and ']' in key stay literal so that nested keys
 * ("payload[value]") read as Stripe's clients send them.
 */
int meter_form_add(meter_buf_t *b, CURL *curl, const char *key,
    const char *value);
int meter_form_add_u64(meter_buf_t *b, CURL *curl, const char *key,
    unsigned long long value);

/* appends one URL path segment, percent-encoded */
int meter_url_segment(meter_buf_t *b, CURL *curl, const char *seg);

/* RFC 3339 UTC, "2026-11-24T10:00:00Z"; buf >= 21 */
void meter_rfc3339(time_t t, char *buf, size_t size);


/*
 * Reads "<prefix>.timeout" (default 30s), "<prefix>.connect_timeout" (5s),
 * "<prefix>.max_attempts" (3), "<prefix>.backoff" (0.5s),
 * "<prefix>.retry_cap" (30s), "<prefix>.max_rps" (default_rps; 0 = no
 * limit), "<prefix>.max_in_flight" (1; meter_http_init_many: its
 * default_in_flight), creates the easy handle.  0, or -1 with err naming
 * the key.
 */
int meter_http_init(meter_http_t *h, const char *prefix,
    const meter_conf_t *cf, double default_rps, char *err, size_t errlen);
int meter_http_init_many(meter_http_t *h, const char *prefix,
    const meter_conf_t *cf, double default_rps, int default_in_flight,
    char *err, size_t errlen);
void meter_http_cleanup(meter_http_t *h);

/*
 * Many requests at once on one thread (libcurl's multi interface, see
 * docs/worker-concurrency.md): at most max_in_flight open, at most max_rps
 * started per second, each with the retries and classification of
 * meter_http_request(); a 429 pauses every request of the provider (with
 * jitter), not only the one that got it.  jobs[i].st and .res answer
 * jobs[i].req.
 */
void meter_http_request_many(meter_http_t *h, meter_http_job_t *jobs,
    size_t n);

/* the job's retry or end after one answer (http.c, shared by both paths);
 * 1: try again after *delay seconds, 0: done with res filled */
int meter_http_next(meter_http_t *h, meter_http_resp_t *resp,
    meter_send_result_t *res, int attempt, double *delay);
void meter_http_give_up(meter_http_t *h, const meter_http_resp_t *resp,
    meter_send_result_t *res, meter_send_e st);

/* 0 when a request may start now (a token taken), else the seconds to
 * wait for one (token bucket of max_rps, bursts of max_rps) */
double meter_http_token(meter_http_t *h);

/* seconds the provider asked everyone to wait (a 429, X-RateLimit-
 * Remaining: 0): 0 none; -1 longer than retry_cap, res filled */
double meter_http_paused(meter_http_t *h, meter_send_result_t *res);

/* a duration "1.5", "500ms", "30s", "5m"; -1 when malformed */
double meter_http_parse_duration(const char *s);

/* the longest Retry-After taken as given (s) */
#define METER_HTTP_RETRY_AFTER_MAX  86400.0

/* delay-seconds or HTTP-date (RFC 9110); in [0, METER_HTTP_RETRY_AFTER_MAX],
 * -1 when malformed */
double meter_http_parse_retry_after(const char *v, time_t now);

/*
 * One call: up to max_attempts requests, exponential backoff with jitter
 * between them, honouring Retry-After (and Stripe-Should-Retry) up to
 * retry_cap.  When the server asks to wait longer than retry_cap, or the
 * attempts run out, it gives up with METER_SEND_RETRY and res->retry_after
 * set, so the drain loop schedules the record later.  resp keeps the last
 * answer (the caller frees resp->body).
 */
meter_send_e meter_http_request(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp, meter_send_result_t *res);

/* fills res from one answer: 2xx OK; 408/409/429/5xx/network RETRY;
 * Stripe-Should-Retry overrides; other FATAL with the provider's message */
meter_send_e meter_http_classify(const meter_http_resp_t *resp,
    meter_send_result_t *res);

/* the provider's error message from a JSON error body (Stripe, Recurly,
 * Chargebee, problem+json, Lago), else the body's start; into buf */
void meter_http_error_message(const char *body, size_t len, char *buf,
    size_t size);


/* seams (http_curl.c) */

/* one request; 0 with resp->status set, -1 with resp->error on a
 * transport failure (timeout, refused, ...) */
int meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp);
void meter_http_sleep(double seconds);

/* the setup and teardown around one transfer, shared with http_multi.c */
int meter_http_easy_prepare(meter_http_t *h, CURL *c,
    const meter_http_req_t *req, meter_http_resp_t *resp,
    struct curl_slist **hl);
void meter_http_easy_release(CURL *c, struct curl_slist *hl);
double meter_http_now(void);


#endif /* _METER_HTTP_H_INCLUDED_ */
