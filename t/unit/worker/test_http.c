
/*
 * Copyright (C) nginx-meter authors
 *
 * http.c: form encoding, Retry-After and duration parsing, error message
 * extraction, classification, the bounded retry loop and the rate limit.
 * The transfer and the sleep are wrapped:
 *     -Wl,--wrap=meter_http_perform -Wl,--wrap=meter_http_sleep
 */


/* wrap: meter_http_perform meter_http_sleep */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "config.h"


typedef struct {
    long                        status;         /* 0: transport error */
    const char                 *body;
    double                      retry_after;    /* -1: none */
    int                         should_retry;   /* -1: none */
} fake_answer_t;


static double   slept[16];
static int      nslept;
static int      nperformed;


int __wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp);
void __wrap_meter_http_sleep(double seconds);


int
__wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp)
{
    const fake_answer_t  *a;

    (void) h;
    (void) req;

    nperformed++;
    a = mock_ptr_type(const fake_answer_t *);

    meter_buf_reset(&resp->body);
    resp->status = a->status;
    resp->retry_after = a->retry_after;
    resp->should_retry = a->should_retry;
    resp->replayed = 0;
    resp->error[0] = '\0';

    if (a->body != NULL) {
        meter_buf_append(&resp->body, a->body, strlen(a->body));
    }

    if (a->status == 0) {
        snprintf(resp->error, sizeof(resp->error), "Timeout was reached");
        return -1;
    }

    return 0;
}


void
__wrap_meter_http_sleep(double seconds)
{
    if (nslept < 16) {
        slept[nslept++] = seconds;
    }
}


static meter_conf_t *
load_conf(const char *text)
{
    int            fd;
    char           path[] = "/tmp/test_http_XXXXXX", err[512];
    meter_conf_t  *cf;

    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t) strlen(text));
    close(fd);

    cf = meter_conf_load(path, err, sizeof(err));
    unlink(path);

    if (cf == NULL) {
        print_error("config: %s\n", err);
    }

    assert_non_null(cf);

    return cf;
}


static int
setup(void **state)
{
    char           err[256];
    meter_http_t  *h;
    meter_conf_t  *cf;

    cf = load_conf("provider = http\n"
                   "http.url = http://127.0.0.1:1/\n"
                   "http.backoff = 1s\n"
                   "http.retry_cap = 30s\n"
                   "http.max_attempts = 3\n");

    h = calloc(1, sizeof(meter_http_t));
    assert_non_null(h);
    assert_int_equal(meter_http_init(h, "http", cf, 0, err, sizeof(err)), 0);
    meter_conf_free(cf);

    nslept = 0;
    nperformed = 0;
    *state = h;

    return 0;
}


static int
teardown(void **state)
{
    meter_http_t  *h = *state;

    meter_http_cleanup(h);
    free(h);

    return 0;
}


static void
test_form_encoding(void **state)
{
    meter_buf_t    b;
    meter_http_t  *h = *state;

    memset(&b, 0, sizeof(b));

    assert_int_equal(meter_form_add(&b, h->curl, "event_name", "api calls"),
                     0);
    assert_int_equal(meter_form_add(&b, h->curl,
                                    "payload[stripe_customer_id]",
                                    "cus_1&x=y"), 0);
    assert_int_equal(meter_form_add_u64(&b, h->curl, "payload[value]",
                                        18446744073709551615ULL), 0);
    assert_int_equal(meter_form_add(&b, h->curl, "a b[c d][]", "\xc3\xa9/+"),
                     0);

    assert_string_equal(b.data,
                        "event_name=api%20calls"
                        "&payload[stripe_customer_id]=cus_1%26x%3Dy"
                        "&payload[value]=18446744073709551615"
                        "&a%20b[c%20d][]=%C3%A9%2F%2B");

    meter_buf_reset(&b);
    assert_int_equal(meter_url_segment(&b, h->curl, "sub/1 x"), 0);
    assert_string_equal(b.data, "sub%2F1%20x");

    meter_buf_free(&b);
}


static void
test_parse_retry_after(void **state)
{
    time_t  now;

    (void) state;

    now = 1700000000;
    assert_true(meter_http_parse_retry_after("5", now) == 5);
    assert_true(meter_http_parse_retry_after("0", now) == 0);
    assert_true(meter_http_parse_retry_after("007", now) == 7);
    assert_true(meter_http_parse_retry_after("", now) == -1);
    assert_true(meter_http_parse_retry_after("5s", now) == -1);
    assert_true(meter_http_parse_retry_after(NULL, now) == -1);
    assert_true(meter_http_parse_retry_after("soon", now) == -1);

    /* RFC 9110, 10.2.3: delay-seconds = 1*DIGIT; no sign, fraction or
     * exponent (strtod took "1e300" and "0.5") */
    assert_true(meter_http_parse_retry_after("0.5", now) == -1);
    assert_true(meter_http_parse_retry_after("1e300", now) == -1);
    assert_true(meter_http_parse_retry_after("-5", now) == -1);
    assert_true(meter_http_parse_retry_after("+5", now) == -1);
    assert_true(meter_http_parse_retry_after(" 5", now) == -1);
    assert_true(meter_http_parse_retry_after("inf", now) == -1);
    assert_true(meter_http_parse_retry_after("nan", now) == -1);

    /* capped: a day at most (the drain caps it at retry.max) */
    assert_true(meter_http_parse_retry_after("86400", now) == 86400);
    assert_true(meter_http_parse_retry_after("86401", now) == 86400);
    assert_true(meter_http_parse_retry_after("99999999999", now) == 86400);
    assert_true(meter_http_parse_retry_after(
                    "9999999999999999999999999999999999999999", now)
                == METER_HTTP_RETRY_AFTER_MAX);

    /* HTTP-date, all three forms; Tue, 14 Nov 2023 22:13:20 GMT is
     * 1700000000 */
    assert_true(meter_http_parse_retry_after(
                    "Tue, 14 Nov 2023 22:13:50 GMT", now) == 30);
    assert_true(meter_http_parse_retry_after(
                    "Tuesday, 14-Nov-23 22:13:50 GMT", now) == 30);
    assert_true(meter_http_parse_retry_after(
                    "Tue Nov 14 22:13:50 2023", now) == 30);
    assert_true(meter_http_parse_retry_after(
                    "Tue, 14 Nov 2023 22:00:00 GMT", now) == 0);
    assert_true(meter_http_parse_retry_after(
                    "Fri, 31 Dec 9999 23:59:59 GMT", now) == 86400);
    assert_true(meter_http_parse_retry_after(
                    "Tue, 14 Nov 2023 22:13:50 PST", now) == -1);
    assert_true(meter_http_parse_retry_after(
                    "Tue, 14 Nov 2023 22:13:50 GMT trailing", now) == -1);
}


static void
test_parse_duration(void **state)
{
    (void) state;

    assert_true(meter_http_parse_duration("30") == 30);
    assert_true(meter_http_parse_duration("1.5s") == 1.5);
    assert_true(meter_http_parse_duration("250ms") == 0.25);
    assert_true(meter_http_parse_duration("2m") == 120);
    assert_true(meter_http_parse_duration("2h") == -1);
    assert_true(meter_http_parse_duration("-1") == -1);
    assert_true(meter_http_parse_duration("") == -1);
}


static void
test_error_message(void **state)
{
    char         buf[128];
    const char  *s;

    (void) state;

    s = "{\"error\":{\"type\":\"invalid_request_error\","
        "\"message\":\"No such customer: 'cus_x'\"}}";
    meter_http_error_message(s, strlen(s), buf, sizeof(buf));
    assert_string_equal(buf, "No such customer: 'cus_x'");

    s = "{\"message\":\"item_price_id : cannot be blank\","
        "\"type\":\"invalid_request\",\"api_error_code\":\"x\"}";
    meter_http_error_message(s, strlen(s), buf, sizeof(buf));
    assert_string_equal(buf, "item_price_id : cannot be blank");

    s = "{\"type\":\"about:blank\",\"title\":\"Bad Request\","
        "\"detail\":\"subject: required\"}";
    meter_http_error_message(s, strlen(s), buf, sizeof(buf));
    assert_string_equal(buf, "subject: required");

    s = "{\"status\":422,\"error\":\"Unprocessable Entity\","
        "\"code\":\"validation_errors\",\"error_details\":"
        "{\"code\":[\"value_is_mandatory\"]}}";
    meter_http_error_message(s, strlen(s), buf, sizeof(buf));
    assert_string_equal(buf, "Unprocessable Entity: "
                        "{\"code\":[\"value_is_mandatory\"]}");

    s = "<html>\n<b>Bad Gateway</b>";
    meter_http_error_message(s, strlen(s), buf, sizeof(buf));
    assert_string_equal(buf, "<html> <b>Bad Gateway</b>");

    /* a message with a newline and a terminal escape: one plain line */
    s = "{\"error\":{\"message\":"
        "\"bad\\n<0>forged \\u001b[2J\\r\\tx \\u00e9\"}}";
    meter_http_error_message(s, strlen(s), buf, sizeof(buf));
    assert_string_equal(buf, "bad <0>forged  [2J  x \xc3\xa9");

    meter_http_error_message(NULL, 0, buf, sizeof(buf));
    assert_string_equal(buf, "");
}


static meter_send_e
classify(long status, int should_retry, const char *body,
    meter_send_result_t *res)
{
    meter_send_e       st;
    meter_http_resp_t  resp;

    memset(&resp, 0, sizeof(resp));
    resp.status = status;
    resp.should_retry = should_retry;
    resp.retry_after = -1;

    if (body != NULL) {
        meter_buf_append(&resp.body, body, strlen(body));
    }

    if (status == 0) {
        snprintf(resp.error, sizeof(resp.error), "Could not connect");
    }

    st = meter_http_classify(&resp, res);
    meter_buf_free(&resp.body);

    return st;
}


static void
test_classify(void **state)
{
    size_t               i;
    meter_send_result_t  res;

    static const struct {
        long          status;
        int           should_retry;
        meter_send_e  want;
    } cases[] = {
        { 200, -1, METER_SEND_OK },
        { 201, -1, METER_SEND_OK },
        { 204, -1, METER_SEND_OK },
        { 301, -1, METER_SEND_FATAL },
        { 400, -1, METER_SEND_FATAL },
        { 401, -1, METER_SEND_FATAL },
        { 404, -1, METER_SEND_FATAL },
        { 406, -1, METER_SEND_FATAL },
        { 408, -1, METER_SEND_RETRY },
        { 409, -1, METER_SEND_RETRY },
        { 422, -1, METER_SEND_FATAL },
        { 429, -1, METER_SEND_RETRY },
        { 500, -1, METER_SEND_RETRY },
        { 503, -1, METER_SEND_RETRY },
        { 0, -1, METER_SEND_RETRY },
        /* Stripe-Should-Retry overrides everything */
        { 400, 1, METER_SEND_RETRY },
        { 409, 0, METER_SEND_FATAL },
        { 500, 0, METER_SEND_FATAL },
        { 429, 0, METER_SEND_FATAL },
    };

    (void) state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        if (classify(cases[i].status, cases[i].should_retry, NULL, &res)
            != cases[i].want)
        {
            fail_msg("status %ld should_retry %d: got %d, want %d",
                     cases[i].status, cases[i].should_retry, res.status,
                     cases[i].want);
        }

        assert_int_equal(res.status, cases[i].want);
        assert_int_equal(res.http_status, cases[i].status);
    }

    classify(402, -1, "{\"error\":{\"type\":\"card_error\","
             "\"message\":\"Your card was declined.\"}}", &res);
    assert_string_equal(res.error, "HTTP 402: Your card was declined.");

    classify(0, -1, NULL, &res);
    assert_string_equal(res.error, "Could not connect");
    assert_int_equal(res.http_status, 0);
}


static void
test_retry_then_ok(void **state)
{
    meter_send_e         st;
    meter_http_t        *h = *state;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  res;

    static const fake_answer_t  e500 = { 500, "{}", -1, -1 };
    static const fake_answer_t  e0 = { 0, NULL, -1, -1 };
    static const fake_answer_t  ok = { 200, "{\"id\":1}", -1, -1 };

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    req.method = "POST";
    req.url = "http://127.0.0.1:1/x";

    will_return(__wrap_meter_http_perform, &e500);
    will_return(__wrap_meter_http_perform, &e0);
    will_return(__wrap_meter_http_perform, &ok);

    st = meter_http_request(h, &req, &resp, &res);

    assert_int_equal(st, METER_SEND_OK);
    assert_int_equal(res.http_status, 200);
    assert_int_equal(resp.attempts, 3);
    assert_string_equal(resp.body.data, "{\"id\":1}");

    /* backoff 1 s then 2 s, each with jitter into [d/2, d] */
    assert_int_equal(nslept, 2);
    assert_true(slept[0] >= 0.5 && slept[0] <= 1.0);
    assert_true(slept[1] >= 1.0 && slept[1] <= 2.0);

    meter_buf_free(&resp.body);
}


static void
test_retry_after_honoured(void **state)
{
    meter_send_e         st;
    meter_http_t        *h = *state;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  res;

    static const fake_answer_t  e429 = { 429, NULL, 7, -1 };
    static const fake_answer_t  ok = { 201, NULL, -1, -1 };

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    req.method = "POST";
    req.url = "http://127.0.0.1:1/x";

    will_return(__wrap_meter_http_perform, &e429);
    will_return(__wrap_meter_http_perform, &ok);

    st = meter_http_request(h, &req, &resp, &res);

    assert_int_equal(st, METER_SEND_OK);
    assert_int_equal(nslept, 1);
    assert_true(slept[0] == 7);

    meter_buf_free(&resp.body);
}


static void
test_retry_after_over_cap_gives_up(void **state)
{
    meter_send_e         st;
    meter_http_t        *h = *state;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  res;

    static const fake_answer_t  e503 = {
        503, "{\"error\":{\"message\":\"maintenance\"}}", 120, -1
    };

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    req.method = "POST";
    req.url = "http://127.0.0.1:1/x";

    will_return(__wrap_meter_http_perform, &e503);

    st = meter_http_request(h, &req, &resp, &res);

    /* no waiting inside the call: the drain loop schedules it */
    assert_int_equal(st, METER_SEND_RETRY);
    assert_int_equal(nperformed, 1);
    assert_int_equal(nslept, 0);
    assert_true(res.retry_after == 120);
    assert_string_equal(res.error, "HTTP 503: maintenance (http, 1 attempt)");

    meter_buf_free(&resp.body);
}


static void
test_attempts_run_out(void **state)
{
    meter_send_e         st;
    meter_http_t        *h = *state;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  res;

    static const fake_answer_t  e502 = { 502, "bad gateway", -1, -1 };

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    req.method = "GET";
    req.url = "http://127.0.0.1:1/x";

    will_return_count(__wrap_meter_http_perform, &e502, 3);

    st = meter_http_request(h, &req, &resp, &res);

    assert_int_equal(st, METER_SEND_RETRY);
    assert_int_equal(nperformed, 3);
    assert_int_equal(nslept, 2);
    assert_true(res.retry_after > 0);
    assert_string_equal(res.error,
                        "HTTP 502: bad gateway (http, 3 attempts)");

    meter_buf_free(&resp.body);
}


static void
test_fatal_not_retried(void **state)
{
    meter_send_e         st;
    meter_http_t        *h = *state;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  res;

    static const fake_answer_t  e400 = {
        400, "{\"error\":{\"message\":\"Missing event_name\"}}", -1, -1
    };

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    req.method = "POST";
    req.url = "http://127.0.0.1:1/x";

    will_return(__wrap_meter_http_perform, &e400);

    st = meter_http_request(h, &req, &resp, &res);

    assert_int_equal(st, METER_SEND_FATAL);
    assert_int_equal(nperformed, 1);
    assert_int_equal(nslept, 0);
    assert_string_equal(res.error, "HTTP 400: Missing event_name");

    meter_buf_free(&resp.body);
}


static void
test_rate_limit(void **state)
{
    char                 err[256];
    meter_http_t         h;
    meter_conf_t        *cf;
    meter_http_req_t     req;
    meter_http_resp_t    resp;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, NULL, -1, -1 };

    (void) state;

    cf = load_conf("provider = http\n"
                   "http.url = http://127.0.0.1:1/\n"
                   "http.max_rps = 2\n");
    assert_int_equal(meter_http_init(&h, "http", cf, 0, err, sizeof(err)),
                     0);
    meter_conf_free(cf);

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    req.method = "GET";
    req.url = "http://127.0.0.1:1/x";

    /* a burst of 2, then one request per 0.5 s (the sleep is wrapped,
     * so the third waits its whole half second) */
    will_return_count(__wrap_meter_http_perform, &ok, 3);

    assert_int_equal(meter_http_request(&h, &req, &resp, &res),
                     METER_SEND_OK);
    assert_int_equal(meter_http_request(&h, &req, &resp, &res),
                     METER_SEND_OK);
    assert_int_equal(nslept, 0);
    assert_int_equal(meter_http_request(&h, &req, &resp, &res),
                     METER_SEND_OK);
    assert_int_equal(nslept, 1);
    assert_true(slept[0] > 0.45 && slept[0] <= 0.5);

    meter_buf_free(&resp.body);
    meter_http_cleanup(&h);
}


static void
test_conf_errors(void **state)
{
    char           err[256];
    meter_http_t   h;
    meter_conf_t  *cf;

    (void) state;

    cf = load_conf("provider = http\n"
                   "http.url = http://127.0.0.1:1/\n"
                   "http.timeout = soon\n");
    assert_int_equal(meter_http_init(&h, "http", cf, 0, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "http.timeout"));
    meter_http_cleanup(&h);
    meter_conf_free(cf);

    cf = load_conf("provider = http\n"
                   "http.url = http://127.0.0.1:1/\n"
                   "http.max_attempts = 2.5\n");
    assert_int_equal(meter_http_init(&h, "http", cf, 0, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "http.max_attempts"));
    meter_http_cleanup(&h);
    meter_conf_free(cf);

    cf = load_conf("provider = http\n"
                   "http.url = http://127.0.0.1:1/\n"
                   "http.timeout = 2500ms\n"
                   "http.connect_timeout = 1\n");
    assert_int_equal(meter_http_init(&h, "http", cf, 0, err, sizeof(err)),
                     0);
    assert_int_equal(h.timeout_ms, 2500);
    assert_int_equal(h.connect_timeout_ms, 1000);
    assert_int_equal(h.max_attempts, 3);
    meter_http_cleanup(&h);
    meter_conf_free(cf);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test_setup_teardown(test_form_encoding, setup, teardown),
        cmocka_unit_test(test_parse_retry_after),
        cmocka_unit_test(test_parse_duration),
        cmocka_unit_test(test_error_message),
        cmocka_unit_test(test_classify),
        cmocka_unit_test_setup_teardown(test_retry_then_ok, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retry_after_honoured, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_retry_after_over_cap_gives_up,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_attempts_run_out, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_fatal_not_retried, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_rate_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conf_errors, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
