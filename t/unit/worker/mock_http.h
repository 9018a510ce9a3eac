
/*
 * Copyright (C) nginx-meter authors
 *
 * A mocked HTTP transfer for cmocka tests of the providers (link with
 * -Wl,--wrap=meter_http_perform -Wl,--wrap=meter_http_sleep): each request
 * is recorded in seen[] and answered with the next fake_answer_t queued by
 * will_return(__wrap_meter_http_perform, &answer); rl_remaining[n] and
 * rl_reset[n] give the n-th answer X-RateLimit-* headers (reset 0: none,
 * then both are -1, as libcurl's header callback leaves them).  Sleeps are
 * recorded in slept[], not slept.
 * Define MAX_SEEN before including it to bound the requests a test makes.
 */


#ifndef _MOCK_HTTP_H_INCLUDED_
#define _MOCK_HTTP_H_INCLUDED_


#include "http.h"


#ifndef MAX_SEEN
#define MAX_SEEN  16
#endif


typedef struct {
    long                        status;
    const char                 *body;
    int                         replayed;
} fake_answer_t;


typedef struct {
    char                        method[8];
    char                        url[512];
    char                        body[1024];
    char                        header[300];    /* headers[0] */
    char                        headers[600];   /* all, "\n"-separated */
    char                        content_type[64];
    char                        accept[64];
    char                        secret[64];
    meter_http_auth_e           auth;
} seen_t;


static seen_t   seen[MAX_SEEN];
static int      nseen;
static double   slept[MAX_SEEN];
static int      nslept;
/* X-RateLimit-Remaining / -Reset of the n-th answer; reset 0: none */
static long     rl_remaining[MAX_SEEN];
static time_t   rl_reset[MAX_SEEN];


int __wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp);
void __wrap_meter_http_sleep(double seconds);


int
__wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp)
{
    int                   i;
    seen_t               *s;
    const fake_answer_t  *a;

    (void) h;

    assert_true(nseen < MAX_SEEN);
    s = &seen[nseen++];
    memset(s, 0, sizeof(*s));

    snprintf(s->method, sizeof(s->method), "%s", req->method);
    snprintf(s->url, sizeof(s->url), "%s", req->url);
    if (req->body != NULL) {
        assert_true(req->body_len < sizeof(s->body));
        memcpy(s->body, req->body, req->body_len);
    }
    snprintf(s->header, sizeof(s->header), "%s",
             req->headers[0] != NULL ? req->headers[0] : "");
    for (i = 0; req->headers[i] != NULL; i++) {
        snprintf(s->headers + strlen(s->headers),
                 sizeof(s->headers) - strlen(s->headers), "%s\n",
                 req->headers[i]);
    }
    snprintf(s->content_type, sizeof(s->content_type), "%s",
             req->content_type != NULL ? req->content_type : "");
    snprintf(s->accept, sizeof(s->accept), "%s",
             req->accept != NULL ? req->accept : "");
    snprintf(s->secret, sizeof(s->secret), "%s",
             req->secret != NULL ? req->secret : "");
    s->auth = req->auth;

    a = mock_ptr_type(const fake_answer_t *);

    meter_buf_reset(&resp->body);
    resp->status = a->status;
    resp->retry_after = -1;
    resp->should_retry = -1;
    resp->replayed = a->replayed;
    resp->rl_remaining = rl_reset[nseen - 1] > 0 ? rl_remaining[nseen - 1]
                                                 : -1;
    resp->rl_reset = rl_reset[nseen - 1] > 0 ? rl_reset[nseen - 1] : -1;
    resp->error[0] = '\0';
    if (a->body != NULL) {
        meter_buf_append(&resp->body, a->body, strlen(a->body));
    }

    return 0;
}


void
__wrap_meter_http_sleep(double seconds)
{
    if (nslept < MAX_SEEN) {
        slept[nslept++] = seconds;
    }
}


#endif /* _MOCK_HTTP_H_INCLUDED_ */
