
/*
 * Copyright (C) nginx-meter authors
 *
 * The Metronome provider: the ingest request (batches of at most 100, the
 * event fields), the answers (400 isolates the bad event, 401 does not,
 * 429 and 5xx retried), and the 34-day transaction_id window.  The
 * transfer is wrapped:
 *     -Wl,--wrap=meter_http_perform -Wl,--wrap=meter_http_sleep
 */


/* wrap: meter_http_perform meter_http_sleep */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "config.h"


#define MAX_SEEN  16
#define TOKEN     "mt_secret_token_123"


typedef struct {
    long                        status;
    const char                 *body;
    double                      retry_after;    /* 0: absent */
} fake_answer_t;


typedef struct {
    char                        method[8];
    char                        url[256];
    char                        content_type[64];
    char                        secret[64];
    meter_http_auth_e           auth;
    int                         nheaders;
    cJSON                      *json;           /* the body, parsed */
} seen_t;


static seen_t   seen[MAX_SEEN];
static int      nseen;
static int      nrequests;
/* when set, a request answers 400 if it carries this customer, else 200
 * (instead of the queued answers) */
static const char  *refuse_customer;
static char     key_file[] = "/tmp/test_metronome_key_XXXXXX";


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

    nrequests++;

    if (refuse_customer != NULL) {
        meter_buf_reset(&resp->body);
        resp->status = memmem(req->body, req->body_len, refuse_customer,
                              strlen(refuse_customer)) != NULL ? 400 : 200;
        resp->retry_after = -1;
        resp->should_retry = -1;
        resp->replayed = 0;
        resp->error[0] = '\0';
        return 0;
    }

    assert_true(nseen < MAX_SEEN);
    s = &seen[nseen++];
    memset(s, 0, sizeof(*s));

    snprintf(s->method, sizeof(s->method), "%s", req->method);
    snprintf(s->url, sizeof(s->url), "%s", req->url);
    snprintf(s->content_type, sizeof(s->content_type), "%s",
             req->content_type != NULL ? req->content_type : "");
    snprintf(s->secret, sizeof(s->secret), "%s",
             req->secret != NULL ? req->secret : "");
    s->auth = req->auth;

    for (i = 0; req->headers[i] != NULL; i++) {
        s->nheaders++;
    }

    assert_non_null(req->body);
    s->json = cJSON_ParseWithLength(req->body, req->body_len);
    assert_non_null(s->json);

    a = mock_ptr_type(const fake_answer_t *);

    meter_buf_reset(&resp->body);
    resp->status = a->status;
    resp->retry_after = a->retry_after > 0 ? a->retry_after : -1;
    resp->should_retry = -1;
    resp->replayed = 0;
    resp->error[0] = '\0';
    if (a->body != NULL) {
        meter_buf_append(&resp->body, a->body, strlen(a->body));
    }

    return 0;
}


void
__wrap_meter_http_sleep(double seconds)
{
    (void) seconds;
}


static const fake_answer_t  ok = { 200, "", 0 };
static const fake_answer_t  bad = { 400, "{\"message\":\"timestamp is more "
                                    "than 34 days in the past\"}", 0 };
static const fake_answer_t  unauth = { 401, "{\"message\":\"Unauthorized\"}",
                                       0 };
static const fake_answer_t  limited = { 429, "{\"message\":\"Too many "
                                        "requests\"}", 7 };
static const fake_answer_t  oops = { 502, "<html>bad gateway</html>", 0 };


static int
setup(void **state)
{
    int  fd;

    (void) state;

    fd = mkstemp(key_file);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, TOKEN "\n", sizeof(TOKEN)),
                     (ssize_t) sizeof(TOKEN));
    close(fd);

    return 0;
}


static int
teardown(void **state)
{
    (void) state;

    unlink(key_file);

    return 0;
}


static void
forget(void)
{
    int  i;

    for (i = 0; i < nseen; i++) {
        cJSON_Delete(seen[i].json);
    }

    nseen = 0;
}


static meter_conf_t *
load_conf(const char *extra)
{
    int            fd;
    char           path[] = "/tmp/test_metronome_XXXXXX", err[512];
    char           text[2048];
    meter_conf_t  *cf;

    snprintf(text, sizeof(text), "provider = metronome\n"
             "metronome.base_url = http://127.0.0.1:9/\n"
             "metronome.api_key_file = %s\n"
             "metronome.backoff = 0\n"
             "metronome.max_rps = 0\n%s", key_file, extra);

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


static void
provider_open(meter_provider_t *p, const char *extra)
{
    char           err[512];
    meter_conf_t  *cf;

    forget();       /* what a failed test left */

    cf = load_conf(extra);
    assert_int_equal(meter_provider_by_name("metronome", p), 0);
    if (p->init(p, cf, err, sizeof(err)) != 0) {
        print_error("init: %s\n", err);
        fail();
    }

    assert_non_null(p->send_batch);
    assert_null(p->lookup);
    meter_conf_free(cf);
}


/* n records, customers "cus_<i>", quantity 1000 + i, the hour 2026-11-24
 * 10:00 UTC made recent by the caller (now - 2 h) */
static void
make_records(meter_record_t *recs, size_t n, char (*keys)[40],
    char (*custs)[32], time_t hour)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        snprintf(keys[i], 40, "%032zx", i + 1);
        snprintf(custs[i], 32, "cus_%zu", i);

        memset(&recs[i], 0, sizeof(meter_record_t));
        recs[i].idempotency_key = keys[i];
        recs[i].key_hash = NULL;
        recs[i].customer = "acme";
        recs[i].provider_customer = custs[i];
        recs[i].meter = "calls";
        recs[i].provider_meter = "api_calls";
        recs[i].period_start = hour;
        recs[i].period_end = hour + 3600;
        recs[i].quantity = 1000 + i;
        recs[i].attempts = 1;
        recs[i].created = time(NULL);
    }
}


static time_t
recent_hour(void)
{
    return (time(NULL) / 3600 - 2) * 3600;
}


static const char *
jstr(const cJSON *o, const char *k)
{
    const cJSON  *v;

    v = cJSON_GetObjectItemCaseSensitive(o, k);
    assert_true(cJSON_IsString(v));

    return v->valuestring;
}


static void
test_metronome_event_shape(void **state)
{
    char                  keys[2][40], custs[2][32], ts[32];
    time_t                hour;
    cJSON                *ev, *props;
    meter_record_t        recs[2];
    meter_provider_t      p;
    meter_send_result_t   res[2];

    (void) state;

    provider_open(&p, "");
    hour = recent_hour();
    make_records(recs, 2, keys, custs, hour);
    recs[0].key_hash = "ab12";
    recs[1].quantity = 18446744073709551615ULL;     /* exact as a string */

    will_return(__wrap_meter_http_perform, &ok);
    p.send_batch(&p, recs, 2, res);

    assert_int_equal(nseen, 1);
    assert_string_equal(seen[0].method, "POST");
    assert_string_equal(seen[0].url, "http://127.0.0.1:9/v1/ingest");
    assert_string_equal(seen[0].content_type, "application/json");
    assert_int_equal(seen[0].auth, METER_HTTP_AUTH_BEARER);
    assert_string_equal(seen[0].secret, TOKEN);
    /* no Idempotency-Key: Metronome would replay a saved failure */
    assert_int_equal(seen[0].nheaders, 0);

    assert_true(cJSON_IsArray(seen[0].json));
    assert_int_equal(cJSON_GetArraySize(seen[0].json), 2);

    meter_rfc3339(hour + 3599, ts, sizeof(ts));

    ev = cJSON_GetArrayItem(seen[0].json, 0);
    assert_string_equal(jstr(ev, "transaction_id"),
                        "00000000000000000000000000000001");
    assert_string_equal(jstr(ev, "customer_id"), "cus_0");
    assert_string_equal(jstr(ev, "event_type"), "api_calls");
    assert_string_equal(jstr(ev, "timestamp"), ts);
    props = cJSON_GetObjectItemCaseSensitive(ev, "properties");
    assert_string_equal(jstr(props, "value"), "1000");
    assert_string_equal(jstr(props, "meter"), "calls");
    assert_string_equal(jstr(props, "key_hash"), "ab12");
    assert_int_equal(cJSON_GetArraySize(props), 3);

    ev = cJSON_GetArrayItem(seen[0].json, 1);
    props = cJSON_GetObjectItemCaseSensitive(ev, "properties");
    assert_string_equal(jstr(props, "value"), "18446744073709551615");
    assert_null(cJSON_GetObjectItemCaseSensitive(props, "key_hash"));

    assert_int_equal(res[0].status, METER_SEND_OK);
    assert_int_equal(res[1].status, METER_SEND_OK);
    assert_int_equal(res[1].http_status, 200);

    forget();
    p.cleanup(&p);
}


static void
test_metronome_batches_of_100(void **state)
{
    char                  keys[250][40], custs[250][32];
    size_t                i;
    meter_record_t        recs[250];
    meter_provider_t      p;
    meter_send_result_t   res[250];

    (void) state;

    provider_open(&p, "");
    make_records(recs, 250, keys, custs, recent_hour());

    will_return_count(__wrap_meter_http_perform, &ok, 3);
    p.send_batch(&p, recs, 250, res);

    assert_int_equal(nseen, 3);
    assert_int_equal(cJSON_GetArraySize(seen[0].json), 100);
    assert_int_equal(cJSON_GetArraySize(seen[1].json), 100);
    assert_int_equal(cJSON_GetArraySize(seen[2].json), 50);
    /* in order, each once */
    assert_string_equal(jstr(cJSON_GetArrayItem(seen[1].json, 0),
                             "customer_id"), "cus_100");
    assert_string_equal(jstr(cJSON_GetArrayItem(seen[2].json, 49),
                             "customer_id"), "cus_249");

    for (i = 0; i < 250; i++) {
        assert_int_equal(res[i].status, METER_SEND_OK);
    }

    forget();
    p.cleanup(&p);

    /* a smaller configured batch */
    provider_open(&p, "metronome.batch_size = 2\n"
                  "metronome.value_property = requests\n");
    will_return_count(__wrap_meter_http_perform, &ok, 3);
    p.send_batch(&p, recs, 5, res);
    assert_int_equal(nseen, 3);
    assert_int_equal(cJSON_GetArraySize(seen[2].json), 1);
    assert_string_equal(jstr(cJSON_GetObjectItemCaseSensitive(
                        cJSON_GetArrayItem(seen[2].json, 0), "properties"),
                        "requests"), "1004");

    forget();
    p.cleanup(&p);
}


static void
test_metronome_400_isolates_the_bad_event(void **state)
{
    char                  keys[3][40], custs[3][32];
    meter_record_t        recs[3];
    meter_provider_t      p;
    meter_send_result_t   res[3];

    (void) state;

    provider_open(&p, "");
    make_records(recs, 3, keys, custs, recent_hour());

    /* the batch is refused; then halves, down to the bad second one:
     * [0 1 2] 400, [0] ok, [1 2] 400, [1] 400, [2] ok */
    will_return(__wrap_meter_http_perform, &bad);
    will_return(__wrap_meter_http_perform, &ok);
    will_return(__wrap_meter_http_perform, &bad);
    will_return(__wrap_meter_http_perform, &bad);
    will_return(__wrap_meter_http_perform, &ok);
    p.send_batch(&p, recs, 3, res);

    assert_int_equal(nseen, 5);
    assert_int_equal(cJSON_GetArraySize(seen[0].json), 3);
    assert_int_equal(cJSON_GetArraySize(seen[1].json), 1);
    assert_int_equal(cJSON_GetArraySize(seen[2].json), 2);
    assert_int_equal(cJSON_GetArraySize(seen[3].json), 1);
    assert_string_equal(jstr(cJSON_GetArrayItem(seen[3].json, 0),
                             "customer_id"), "cus_1");

    assert_int_equal(res[0].status, METER_SEND_OK);
    assert_int_equal(res[1].status, METER_SEND_FATAL);
    assert_int_equal(res[1].http_status, 400);
    assert_string_equal(res[1].error, "HTTP 400: timestamp is more than 34 "
                        "days in the past");
    assert_int_equal(res[2].status, METER_SEND_OK);

    forget();
    p.cleanup(&p);
}


static void
test_metronome_400_bisects(void **state)
{
    char                  keys[100][40], custs[100][32];
    size_t                i;
    meter_record_t        recs[100];
    meter_provider_t      p;
    meter_send_result_t   res[100];

    (void) state;

    provider_open(&p, "");
    make_records(recs, 100, keys, custs, recent_hour());

    /* one bad event among 100: 13 requests (the bad one in 100, then in
     * halves of 50 25 13 6 3 1, each with its sibling), not 101 */
    refuse_customer = "\"cus_37\"";
    nrequests = 0;
    p.send_batch(&p, recs, 100, res);
    refuse_customer = NULL;

    assert_int_equal(nrequests, 13);
    for (i = 0; i < 100; i++) {
        assert_int_equal(res[i].status,
                         i == 37 ? METER_SEND_FATAL : METER_SEND_OK);
    }

    p.cleanup(&p);
}


static void
test_metronome_401_is_not_split(void **state)
{
    char                  keys[3][40], custs[3][32];
    meter_record_t        recs[3];
    meter_provider_t      p;
    meter_send_result_t   res[3];

    (void) state;

    provider_open(&p, "");
    make_records(recs, 3, keys, custs, recent_hour());

    will_return(__wrap_meter_http_perform, &unauth);
    p.send_batch(&p, recs, 3, res);

    assert_int_equal(nseen, 1);
    assert_int_equal(res[0].status, METER_SEND_FATAL);
    assert_int_equal(res[2].status, METER_SEND_FATAL);
    assert_string_equal(res[2].error, "HTTP 401: Unauthorized");
    assert_null(strstr(res[2].error, TOKEN));

    forget();
    p.cleanup(&p);
}


static void
test_metronome_429_and_5xx_retried(void **state)
{
    char                  keys[2][40], custs[2][32];
    meter_record_t        recs[2];
    meter_provider_t      p;
    meter_send_result_t   res[2];

    (void) state;

    /* inside the call: 429, 502, then accepted, same body each time */
    provider_open(&p, "");
    make_records(recs, 2, keys, custs, recent_hour());

    will_return(__wrap_meter_http_perform, &limited);
    will_return(__wrap_meter_http_perform, &oops);
    will_return(__wrap_meter_http_perform, &ok);
    p.send_batch(&p, recs, 2, res);

    assert_int_equal(nseen, 3);
    assert_int_equal(cJSON_Compare(seen[0].json, seen[2].json, 1), 1);
    assert_int_equal(res[0].status, METER_SEND_OK);
    assert_int_equal(res[1].status, METER_SEND_OK);

    forget();
    p.cleanup(&p);

    /* attempts used up on 429s: RETRY for both, with the server's wait */
    provider_open(&p, "metronome.max_attempts = 2\n");
    will_return_count(__wrap_meter_http_perform, &limited, 2);
    p.send_batch(&p, recs, 2, res);

    assert_int_equal(nseen, 2);
    assert_int_equal(res[0].status, METER_SEND_RETRY);
    assert_int_equal(res[1].status, METER_SEND_RETRY);
    assert_int_equal(res[1].http_status, 429);
    assert_true(res[1].retry_after >= 7);

    forget();
    p.cleanup(&p);
}


static void
test_metronome_window(void **state)
{
    char                  keys[4][40], custs[4][32];
    time_t                now;
    meter_record_t        recs[4];
    meter_provider_t      p;
    meter_send_result_t   res[4];

    (void) state;

    provider_open(&p, "");
    make_records(recs, 4, keys, custs, recent_hour());
    now = time(NULL);

    /* 0: first attempt; 1: a resend 33 days after the first send;
     * 2: a resend 35 days after it; 3: first send unknown, period ended
     * 36 days ago */
    recs[1].attempts = 2;
    recs[1].created = now - 33 * 86400;
    recs[2].attempts = 5;
    recs[2].created = now - 35 * 86400;
    recs[3].attempts = 2;
    recs[3].created = 0;
    recs[3].period_start = now - 36 * 86400 - 3600;
    recs[3].period_end = now - 36 * 86400;

    will_return(__wrap_meter_http_perform, &ok);
    p.send_batch(&p, recs, 4, res);

    assert_int_equal(nseen, 1);
    assert_int_equal(cJSON_GetArraySize(seen[0].json), 2);
    assert_string_equal(jstr(cJSON_GetArrayItem(seen[0].json, 1),
                             "customer_id"), "cus_1");

    assert_int_equal(res[0].status, METER_SEND_OK);
    assert_int_equal(res[1].status, METER_SEND_OK);
    assert_int_equal(res[2].status, METER_SEND_FATAL);
    assert_int_equal(res[2].http_status, 0);
    assert_non_null(strstr(res[2].error, "35 days ago, past Metronome's "
                           "34-day transaction_id window"));
    assert_int_equal(res[3].status, METER_SEND_FATAL);
    assert_non_null(strstr(res[3].error, "36 days ago"));

    forget();

    /* send() of one: the same check, no request */
    assert_int_equal(p.send(&p, &recs[2], &res[0]), METER_SEND_FATAL);
    assert_int_equal(nseen, 0);

    p.cleanup(&p);
}


static void
test_metronome_needs_provider_customer(void **state)
{
    char                  keys[1][40], custs[1][32];
    meter_record_t        rec;
    meter_provider_t      p;
    meter_send_result_t   res;

    (void) state;

    provider_open(&p, "");
    make_records(&rec, 1, keys, custs, recent_hour());
    rec.provider_customer = NULL;
    rec.subscription = "sub_1";

    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_int_equal(nseen, 0);
    assert_string_equal(res.error, "metronome: customer \"acme\" has no "
                        "provider_customer (a Metronome customer id or "
                        "ingest alias)");

    p.cleanup(&p);
}


static void
init_fails(const char *text, const char *want)
{
    int                fd;
    char               path[] = "/tmp/test_metronome_XXXXXX", err[512];
    char               conf[1024];
    meter_conf_t      *cf;
    meter_provider_t   p;

    snprintf(conf, sizeof(conf), text, key_file);

    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, conf, strlen(conf)), (ssize_t) strlen(conf));
    close(fd);

    cf = meter_conf_load(path, err, sizeof(err));
    unlink(path);
    assert_non_null(cf);

    assert_int_equal(meter_provider_by_name("metronome", &p), 0);
    err[0] = '\0';
    assert_int_equal(p.init(&p, cf, err, sizeof(err)), -1);
    if (strstr(err, want) == NULL) {
        print_error("got \"%s\", want \"%s\"\n", err, want);
        fail();
    }

    assert_null(strstr(err, TOKEN));
    assert_null(p.data);
    meter_conf_free(cf);
}


static void
test_metronome_init_errors(void **state)
{
    meter_conf_t  *cf;

    (void) state;

    init_fails("provider = metronome\n",
               "metronome.api_key_file: required");
    init_fails("provider = metronome\nmetronome.api_key_file = %s\n"
               "metronome.batch_size = 101\n",
               "metronome.batch_size: \"101\" is not a number from 1 to 100");
    init_fails("provider = metronome\nmetronome.api_key_file = %s\n"
               "metronome.batch_size = 0\n", "metronome.batch_size");
    init_fails("provider = metronome\nmetronome.api_key_file = %s\n"
               "metronome.value_property = a b\n",
               "metronome.value_property: \"a b\" is not a property name");
    init_fails("provider = metronome\nmetronome.api_key_file = %s\n"
               "metronome.base_url = ftp://x\n",
               "metronome.base_url: \"ftp://x\" is not an http(s) URL");
    init_fails("provider = metronome\nmetronome.api_key_file = %s\n"
               "metronome.max_rps = -1\n", "metronome.max_rps");
    init_fails("provider = metronome\n"
               "metronome.api_key_file = /nonexistent/mt%s\n",
               "metronome.api_key_file");

    /* Metronome backdates 34 days: the default max_age */
    cf = load_conf("");
    assert_int_equal(cf->max_age, 34 * 86400);
    meter_conf_free(cf);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_metronome_event_shape),
        cmocka_unit_test(test_metronome_batches_of_100),
        cmocka_unit_test(test_metronome_400_isolates_the_bad_event),
        cmocka_unit_test(test_metronome_400_bisects),
        cmocka_unit_test(test_metronome_401_is_not_split),
        cmocka_unit_test(test_metronome_429_and_5xx_retried),
        cmocka_unit_test(test_metronome_window),
        cmocka_unit_test(test_metronome_needs_provider_customer),
        cmocka_unit_test(test_metronome_init_errors),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
