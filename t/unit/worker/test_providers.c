
/*
 * Copyright (C) nginx-meter authors
 *
 * Request building and answer handling of the Stripe, Chargebee, Recurly
 * and HTTP (OpenMeter, Lago) providers.  The transfer is wrapped:
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

#include "config.h"
#include "util.h"


/* requests one test makes at the most */
#define MAX_SEEN  8

#include "mock_http.h"


static char     key_file[] = "/tmp/test_providers_key_XXXXXX";


static meter_conf_t *
load_conf(const char *fmt)
{
    int            fd;
    char           path[] = "/tmp/test_providers_XXXXXX", err[512];
    char           text[2048];
    meter_conf_t  *cf;

    /* %s in fmt: the API key file */
    snprintf(text, sizeof(text), fmt, key_file);

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
start(meter_provider_t *p, void (*fill)(meter_provider_t *),
    const char *conf)
{
    char           err[512];
    meter_conf_t  *cf;

    cf = load_conf(conf);
    fill(p);

    if (p->init(p, cf, err, sizeof(err)) != 0) {
        fail_msg("init: %s", err);
    }

    meter_conf_free(cf);
    nseen = 0;
    nslept = 0;
    memset(rl_reset, 0, sizeof(rl_reset));
}


static void
record(meter_record_t *rec, time_t period_start)
{
    memset(rec, 0, sizeof(*rec));
    rec->idempotency_key = "0123456789abcdef0123456789abcdef";
    rec->key_hash = "9f86d081884c7d659a2feaa0c55ad015"
                    "a3bf4f1b2b0b822cd15d6c15b0f00a08";
    rec->customer = "acme";
    rec->provider_customer = "cus_123";
    rec->subscription = "sub_9";
    rec->subscription_item = "si_7";
    rec->meter = "calls";
    rec->provider_meter = "api_calls";
    rec->period_start = period_start;
    rec->period_end = period_start + 3600;
    rec->quantity = 25;
}


static time_t
recent_hour(void)
{
    return (time(NULL) / 3600 - 2) * 3600;
}


static int
group_setup(void **state)
{
    int  fd;

    (void) state;

    fd = mkstemp(key_file);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "sk_test_secret\n", 15), 15);
    close(fd);

    return 0;
}


static int
group_teardown(void **state)
{
    (void) state;

    unlink(key_file);

    return 0;
}


#define STRIPE_CONF                                                          \
    "provider = stripe\n"                                                    \
    "stripe.api_key_file = %s\n"                                             \
    "stripe.base_url = http://127.0.0.1:9/\n"                                \
    "stripe.max_rps = 0\n"                                                   \
    "stripe.max_attempts = 2\n"                                              \
    "stripe.invoice_grace = 72h\n"  /* records of 2 h ago are not late */   \



/* ---------------------------------------------------------------- stripe */

static void
test_stripe_meter_event(void **state)
{
    char                 want[512];
    time_t               hour;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = {
        200, "{\"object\":\"billing.meter_event\"}", 0
    };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF);
    hour = recent_hour();
    record(&rec, hour);

    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(res.status, METER_SEND_OK);
    assert_int_equal(res.http_status, 200);

    assert_int_equal(nseen, 1);
    assert_string_equal(seen[0].method, "POST");
    assert_string_equal(seen[0].url,
                        "http://127.0.0.1:9/v1/billing/meter_events");
    snprintf(want, sizeof(want),
             "event_name=api_calls&payload[stripe_customer_id]=cus_123"
             "&payload[value]=25&identifier=%s&timestamp=%lld",
             rec.idempotency_key, (long long) hour + 3599);
    assert_string_equal(seen[0].body, want);
    assert_string_equal(seen[0].header,
                        "Idempotency-Key: 0123456789abcdef0123456789abcdef");
    /* stripe-node src/apiVersion.ts: the default version */
    assert_string_equal(seen[0].headers,
                        "Idempotency-Key: 0123456789abcdef0123456789abcdef\n"
                        "Stripe-Version: 2026-07-29.dahlia\n");
    assert_string_equal(seen[0].content_type,
                        "application/x-www-form-urlencoded");
    assert_int_equal(seen[0].auth, METER_HTTP_AUTH_BEARER);
    assert_string_equal(seen[0].secret, "sk_test_secret");

    p.cleanup(&p);
}


static void
test_stripe_payload_keys(void **state)
{
    char                 want[512];
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, "{}", 0 };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF
          "stripe.customer_key = cust\n"
          "stripe.value_key = n\n");
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    snprintf(want, sizeof(want),
             "event_name=api_calls&payload[cust]=cus_123&payload[n]=25"
             "&identifier=%s&timestamp=%lld", rec.idempotency_key,
             (long long) rec.period_end - 1);
    assert_string_equal(seen[0].body, want);

    p.cleanup(&p);
}


static void
test_stripe_duplicate_is_ok(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  dup = {
        400, "{\"error\":{\"type\":\"invalid_request_error\","
        "\"code\":\"resource_already_exists\",\"message\":\"An event with "
        "identifier 'x' already exists.\"}}", 0
    };
    static const fake_answer_t  other = {
        400, "{\"error\":{\"type\":\"invalid_request_error\","
        "\"code\":\"parameter_missing\",\"message\":\"Missing required "
        "param: payload[stripe_customer_id].\"}}", 0
    };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF);
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform, &dup);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(res.error, "");
    assert_int_equal(nseen, 1);

    will_return(__wrap_meter_http_perform, &other);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "HTTP 400: Missing required param: "
                        "payload[stripe_customer_id].");
    assert_int_equal(nseen, 2);

    p.cleanup(&p);
}


static void
test_stripe_window(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF);

    /* older than 35 days: refused here, nothing sent */
    record(&rec, (time(NULL) / 3600) * 3600 - 35 * 86400 - 3600);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_non_null(strstr(res.error, "older than the 35 days"));

    /* an hour that has not ended yet */
    record(&rec, (time(NULL) / 3600 + 1) * 3600);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_non_null(strstr(res.error, "future"));

    /* 34 days old is fine */
    record(&rec, (time(NULL) / 3600) * 3600 - 34 * 86400);
    rec.provider_customer = NULL;
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "stripe: record without a Stripe "
                        "customer");

    assert_int_equal(nseen, 0);

    p.cleanup(&p);
}


static void
test_stripe_replayed_failure(void **state)
{
    size_t               n;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  e500 = { 500, "{}", 0 };
    static const fake_answer_t  replay = { 500, "{}", 1 };
    static const fake_answer_t  ok = { 200, "{}", 0 };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF);
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform, &e500);
    will_return(__wrap_meter_http_perform, &replay);
    will_return(__wrap_meter_http_perform, &ok);

    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(nseen, 3);

    /* same key twice, then a fresh one: the identifier still dedupes */
    n = strlen("Idempotency-Key: 0123456789abcdef0123456789abcdef");
    assert_string_equal(seen[0].header, seen[1].header);
    assert_int_equal(strncmp(seen[2].header, seen[0].header, n), 0);
    assert_true(strlen(seen[2].header) > n);
    assert_int_equal(seen[2].header[n], '-');
    assert_string_equal(seen[2].body, seen[0].body);

    p.cleanup(&p);
}


static void
test_stripe_retry_gives_up(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  e429 = {
        429, "{\"error\":{\"message\":\"Too many requests\"}}", 0
    };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF);
    record(&rec, recent_hour());

    will_return_count(__wrap_meter_http_perform, &e429, 2);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_RETRY);
    assert_int_equal(res.http_status, 429);
    assert_true(res.retry_after > 0);
    assert_string_equal(res.error,
                        "HTTP 429: Too many requests (stripe, 2 attempts)");

    p.cleanup(&p);
}


static void
test_stripe_usage_records(void **state)
{
    char                 want[256];
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, "{}", 0 };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF
          "stripe.mode = usage_records\n"
          "stripe.api_version = 2025-02-24.acacia\n");
    record(&rec, recent_hour());
    rec.subscription_item = "si_7/x";

    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[0].url, "http://127.0.0.1:9/v1/"
                        "subscription_items/si_7%2Fx/usage_records");
    snprintf(want, sizeof(want), "quantity=25&timestamp=%lld"
             "&action=increment", (long long) rec.period_end - 1);
    assert_string_equal(seen[0].body, want);
    assert_string_equal(seen[0].header,
                        "Idempotency-Key: 0123456789abcdef0123456789abcdef");

    rec.subscription_item = NULL;
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_int_equal(nseen, 1);

    p.cleanup(&p);
}


static void
test_stripe_stream(void **state)
{
    char                 want[512], ts[32];
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  session = {
        200, "{\"object\":\"v2.billing.meter_event_session\","
        "\"authentication_token\":\"mes_tok1\"}", 0
    };
    static const fake_answer_t  session2 = {
        200, "{\"authentication_token\":\"mes_tok2\"}", 0
    };
    static const fake_answer_t  ok = { 200, "{}", 0 };
    static const fake_answer_t  expired = {
        401, "{\"error\":{\"type\":\"invalid_request_error\",\"code\":"
        "\"billing_meter_event_session_expired\",\"message\":\"expired\"}}",
        0
    };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF
          "stripe.mode = meter_event_stream\n"
          "stripe.stream_url = http://127.0.0.1:8/\n");
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform, &session);
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(nseen, 2);
    assert_string_equal(seen[0].url, "http://127.0.0.1:9/v2/billing/"
                        "meter_event_session");
    assert_string_equal(seen[0].secret, "sk_test_secret");
    assert_string_equal(seen[1].url, "http://127.0.0.1:8/v2/billing/"
                        "meter_event_stream");
    assert_string_equal(seen[1].secret, "mes_tok1");
    assert_string_equal(seen[1].content_type, "application/json");
    /* v2 calls carry the version too */
    assert_string_equal(seen[0].headers, "Stripe-Version: 2026-07-29.dahlia\n");
    assert_string_equal(seen[1].headers, "Stripe-Version: 2026-07-29.dahlia\n");
    meter_rfc3339(rec.period_end - 1, ts, sizeof(ts));
    snprintf(want, sizeof(want), "{\"events\":[{\"payload\":"
             "{\"stripe_customer_id\":\"cus_123\",\"value\":\"25\"},"
             "\"identifier\":\"%s\",\"event_name\":\"api_calls\","
             "\"timestamp\":\"%s\"}]}", rec.idempotency_key, ts);
    assert_string_equal(seen[1].body, want);

    /* the token is reused; when it expires, one new session */
    will_return(__wrap_meter_http_perform, &expired);
    will_return(__wrap_meter_http_perform, &session2);
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(nseen, 5);
    assert_string_equal(seen[2].secret, "mes_tok1");
    assert_string_equal(seen[4].secret, "mes_tok2");

    p.cleanup(&p);
}


static void
test_stripe_version(void **state)
{
    char                  err[512];
    meter_conf_t         *cf;
    meter_record_t        rec;
    meter_provider_t      p;
    meter_send_result_t   res;

    static const fake_answer_t  ok = { 200, "{}", 0 };

    static const char  *bad[] = {
        STRIPE_CONF "stripe.api_version = 2025-3-31\n",
        STRIPE_CONF "stripe.api_version = 2025-03-31.Basil\n",
        STRIPE_CONF "stripe.api_version = 2025-03-31.\n",
        /* usage records were removed in basil: the default is too new */
        STRIPE_CONF "stripe.mode = usage_records\n",
        STRIPE_CONF "stripe.mode = usage_records\n"
                    "stripe.api_version = 2025-03-31.basil\n",
        NULL
    };
    int  i;

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF
          "stripe.api_version = 2025-02-24.acacia\n");
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[0].headers,
                        "Idempotency-Key: 0123456789abcdef0123456789abcdef\n"
                        "Stripe-Version: 2025-02-24.acacia\n");
    p.cleanup(&p);

    for (i = 0; bad[i] != NULL; i++) {
        cf = load_conf(bad[i]);
        meter_provider_stripe(&p);
        err[0] = '\0';
        assert_int_equal(p.init(&p, cf, err, sizeof(err)), -1);
        if (i < 3) {
            assert_non_null(strstr(err, "stripe.api_version: "));

        } else {
            assert_non_null(strstr(err, "stripe.mode = usage_records needs "
                                        "stripe.api_version before "
                                        "2025-03-31.basil"));
        }

        meter_conf_free(cf);
    }
}


/* meter_http_t is the first member of the provider's state */
static double
stripe_rps(const char *key, const char *extra)
{
    int               fd;
    char              path[] = "/tmp/test_providers_live_XXXXXX";
    char              text[1024], err[512];
    double            rps;
    FILE             *f;
    meter_conf_t     *cf;
    meter_provider_t  p;
    char              conf[] = "/tmp/test_providers_c_XXXXXX";

    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, key, strlen(key)), (ssize_t) strlen(key));
    close(fd);

    snprintf(text, sizeof(text), "provider = stripe\nstripe.api_key_file = "
             "%s\n%s", path, extra);
    fd = mkstemp(conf);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);

    cf = meter_conf_load(conf, err, sizeof(err));
    assert_non_null(cf);
    meter_provider_stripe(&p);
    assert_int_equal(p.init(&p, cf, err, sizeof(err)), 0);
    rps = ((meter_http_t *) p.data)->max_rps;

    p.cleanup(&p);
    meter_conf_free(cf);
    unlink(conf);
    unlink(path);

    return rps;
}


static void
test_stripe_rps_defaults(void **state)
{
    (void) state;

    /* sandbox calls count against the basic 25/s */
    assert_true(stripe_rps("sk_test_abc\n", "") == 25);
    assert_true(stripe_rps("rk_test_abc\n", "") == 25);
    /* live: the meter-event limit; usage records: the global 100/s */
    assert_true(stripe_rps("sk_live_abc\n", "") == 1000);
    assert_true(stripe_rps("sk_live_abc\n", "stripe.mode = "
                           "meter_event_stream\n") == 1000);
    assert_true(stripe_rps("sk_live_abc\n", "stripe.mode = usage_records\n"
                           "stripe.api_version = 2025-02-24.acacia\n")
                == 100);
    assert_true(stripe_rps("sk_test_abc\n", "stripe.max_rps = 7\n") == 7);
}


static void
test_stripe_lookup_past_window(void **state)
{
    char                 want[512];
    time_t               hour;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  meters = { 200, "{\"object\":\"list\","
        "\"data\":[{\"id\":\"mtr_0\",\"event_name\":\"other\"},"
        "{\"id\":\"mtr_1\",\"event_name\":\"api_calls\","
        "\"default_aggregation\":{\"formula\":\"sum\"}}],"
        "\"has_more\":false}", 0 };
    static const fake_answer_t  s25 = { 200, "{\"object\":\"list\","
        "\"data\":[{\"object\":\"billing.meter_event_summary\","
        "\"aggregated_value\":25}],\"has_more\":false}", 0 };
    static const fake_answer_t  s0 = { 200, "{\"object\":\"list\","
        "\"data\":[{\"aggregated_value\":0}],\"has_more\":false}", 0 };
    static const fake_answer_t  s30 = { 200, "{\"object\":\"list\","
        "\"data\":[{\"aggregated_value\":30}],\"has_more\":false}", 0 };
    static const fake_answer_t  one = { 200, "{\"id\":\"mtr_9\","
        "\"event_name\":\"api_calls\",\"default_aggregation\":"
        "{\"formula\":\"count\"}}", 0 };
    static const fake_answer_t  s1 = { 200, "{\"data\":"
        "[{\"aggregated_value\":1}],\"has_more\":false}", 0 };

    (void) state;

    start(&p, meter_provider_stripe, STRIPE_CONF);
    hour = (time(NULL) / 3600 - 30) * 3600;
    record(&rec, hour);
    rec.seq = 1;
    rec.attempts = 2;           /* a resend: the first outcome unknown */

    /* first sent within the 24 h: the identifier dedupes, no lookup */
    rec.created = time(NULL) - 3600;
    assert_int_equal(p.lookup(&p, &rec, &res), 0);
    assert_int_equal(nseen, 0);

    /* 25 h ago: Stripe's count of the period decides */
    rec.created = time(NULL) - 25 * 3600;
    will_return(__wrap_meter_http_perform, &meters);
    will_return(__wrap_meter_http_perform, &s25);
    assert_int_equal(p.lookup(&p, &rec, &res), 1);
    assert_int_equal(nseen, 2);
    assert_string_equal(seen[0].url,
                        "http://127.0.0.1:9/v1/billing/meters?limit=100");
    snprintf(want, sizeof(want), "http://127.0.0.1:9/v1/billing/meters/mtr_1"
             "/event_summaries?customer=cus_123&start_time=%lld"
             "&end_time=%lld", (long long) hour, (long long) hour + 3600);
    assert_string_equal(seen[1].url, want);
    assert_string_equal(seen[1].method, "GET");
    assert_non_null(strstr(seen[1].headers, "Stripe-Version: "));

    /* nothing there: resend (the meter is cached) */
    nseen = 0;
    will_return(__wrap_meter_http_perform, &s0);
    assert_int_equal(p.lookup(&p, &rec, &res), 0);
    assert_int_equal(nseen, 1);

    /* another amount: cannot tell, dead letter with the numbers */
    nseen = 0;
    will_return(__wrap_meter_http_perform, &s30);
    assert_int_equal(p.lookup(&p, &rec, &res), -2);
    assert_non_null(strstr(res.error, "Stripe counts 30 (sum) for cus_123, "
                                      "api_calls"));
    assert_non_null(strstr(res.error, "this record 25 (record 1"));

    /* a later record of the period: its share cannot be told apart */
    rec.seq = 2;
    will_return(__wrap_meter_http_perform, &s25);
    assert_int_equal(p.lookup(&p, &rec, &res), -2);

    /* without a created time the period's end bounds the first send */
    rec.seq = 1;
    rec.created = 0;
    will_return(__wrap_meter_http_perform, &s25);
    assert_int_equal(p.lookup(&p, &rec, &res), 1);

    p.cleanup(&p);

    /* the meter id from the config; a "count" meter counts one event */
    start(&p, meter_provider_stripe, STRIPE_CONF
          "stripe.meter_id.calls = mtr_9\n");
    rec.created = time(NULL) - 25 * 3600;
    will_return(__wrap_meter_http_perform, &one);
    will_return(__wrap_meter_http_perform, &s1);
    assert_int_equal(p.lookup(&p, &rec, &res), 1);
    assert_string_equal(seen[0].url,
                        "http://127.0.0.1:9/v1/billing/meters/mtr_9");
    p.cleanup(&p);

    /* usage records carry no identifier: nothing to read back */
    start(&p, meter_provider_stripe, STRIPE_CONF
          "stripe.mode = usage_records\n"
          "stripe.api_version = 2025-02-24.acacia\n");
    assert_int_equal(p.lookup(&p, &rec, &res), -2);
    assert_int_equal(nseen, 0);
    assert_non_null(strstr(res.error, "more than 24 h ago"));
    p.cleanup(&p);
}


static void
test_stripe_init_errors(void **state)
{
    char               err[512];
    meter_conf_t      *cf;
    meter_provider_t   p;

    (void) state;

    cf = load_conf("provider = stripe\n"
                   "stripe.base_url = http://127.0.0.1:9\n");
    meter_provider_stripe(&p);
    assert_int_equal(p.init(&p, cf, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "stripe.api_key_file"));
    assert_null(p.data);
    meter_conf_free(cf);

    cf = load_conf("provider = stripe\n"
                   "stripe.api_key_file = %s\n"
                   "stripe.mode = stream\n");
    meter_provider_stripe(&p);
    assert_int_equal(p.init(&p, cf, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "stripe.mode"));
    assert_null(strstr(err, "sk_test_secret"));
    meter_conf_free(cf);
}


/* ---------------------------------------------------------------- chargebee */

#define CHARGEBEE_CONF                                                       \
    "provider = chargebee\n"                                                 \
    "chargebee.api_key_file = %s\n"                                          \
    "chargebee.base_url = http://127.0.0.1:9\n"                              \
    "chargebee.max_rps = 0\n"                                                \
    "chargebee.max_attempts = 1\n"                                           \
    "chargebee.subscription_ttl = 0\n"


/* GET /api/v2/subscriptions/{id}'s answer; extra: more fields */
static fake_answer_t *
cb_sub(char *buf, size_t size, fake_answer_t *a, const char *status,
    long long start, long long term_start, const char *extra)
{
    snprintf(buf, size, "{\"subscription\":{\"id\":\"sub_9\",\"status\":"
             "\"%s\",\"started_at\":%lld,\"activated_at\":%lld,"
             "\"current_term_start\":%lld,\"current_term_end\":%lld%s},"
             "\"customer\":{\"id\":\"cust_1\"}}", status, start, start,
             term_start, term_start + 30 * 86400, extra);
    a->status = 200;
    a->body = buf;
    a->replayed = 0;

    return a;
}


static long long
cb_date(int i)
{
    const char  *d;

    d = strstr(seen[i].body, "&usage_date=");
    assert_non_null(d);

    return atoll(d + strlen("&usage_date="));
}


static void
test_chargebee_usage(void **state)
{
    char                 want[512], sbody[512];
    time_t               day;
    long long            date;
    fake_answer_t        sub;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, "{\"usage\":{}}", 0 };

    (void) state;

    start(&p, meter_provider_chargebee, CHARGEBEE_CONF);
    day = (time(NULL) / 86400 - 2) * 86400;
    record(&rec, day);
    rec.period_end = day + 86400;
    rec.provider_meter = "calls-USD-Monthly";
    rec.seq = 1;
    /* usage in hours 10 and 14 only */
    rec.usage_start = day + 10 * 3600;
    rec.usage_end = day + 15 * 3600;

    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "active",
                       day - 40 * 86400, day - 10 * 86400, ""));
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);

    assert_string_equal(seen[0].method, "GET");
    assert_string_equal(seen[0].url, "http://127.0.0.1:9/api/v2/"
                        "subscriptions/sub_9");
    assert_int_equal(seen[0].auth, METER_HTTP_AUTH_BASIC);
    assert_string_equal(seen[1].url, "http://127.0.0.1:9/api/v2/"
                        "subscriptions/sub_9/usages");

    /* in the last hour that carries usage */
    date = cb_date(1);
    assert_true(date >= day + 14 * 3600 && date < day + 15 * 3600);
    snprintf(want, sizeof(want), "item_price_id=calls-USD-Monthly"
             "&quantity=25&usage_date=%lld&id=%s", date,
             rec.idempotency_key);
    assert_string_equal(seen[1].body, want);
    assert_string_equal(seen[1].header, "chargebee-idempotency-key: "
                        "0123456789abcdef0123456789abcdef");
    assert_int_equal(seen[1].auth, METER_HTTP_AUTH_BASIC);
    assert_string_equal(seen[1].secret, "sk_test_secret");

    /* the subscription is kept for the pass; the same record gets the same
     * date, the next record of the period (seq 2) the next second */
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[2].body, seen[1].body);

    rec.seq = 2;
    rec.idempotency_key = "fedcba9876543210fedcba9876543210";
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(cb_date(3), date + 1 < day + 15 * 3600
                                 ? date + 1 : day + 14 * 3600);

    /* a new pass fetches the subscription again */
    p.pass(&p);
    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "active",
                       day - 40 * 86400, day - 10 * 86400, ""));
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[4].method, "GET");
    assert_int_equal(nseen, 6);

    rec.subscription = NULL;
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "chargebee: record without a "
                        "subscription");
    assert_int_equal(nseen, 6);

    p.cleanup(&p);
}


static void
test_chargebee_dates_billable(void **state)
{
    char                 sbody[512], extra[128], at[24];
    time_t               h;
    long long            date;
    fake_answer_t        sub;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, "{\"usage\":{}}", 0 };
    static const fake_answer_t  none = { 200, "{\"list\":[]}", 0 };

    (void) state;

    start(&p, meter_provider_chargebee, CHARGEBEE_CONF);
    h = recent_hour() - 3600;
    record(&rec, h);
    rec.usage_start = h;
    rec.usage_end = h + 3600;

    /* started in the hour's last second: dated at it */
    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "active", h + 3599,
                       h + 3599, ""));
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(cb_date(1), h + 3599);
    assert_null(strstr(seen[1].body, "note="));

    /* cancelled mid-hour: dated before the cancellation */
    p.pass(&p);
    snprintf(extra, sizeof(extra), ",\"cancelled_at\":%lld",
             (long long) h + 1);
    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "cancelled",
                       h - 86400, h - 86400, extra));
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(cb_date(3), h);

    /* the next hour is wholly after it: the customer has no other
     * subscription, so dead-lettered, no usage sent */
    rec.period_start = rec.usage_start = h + 3600;
    rec.period_end = rec.usage_end = h + 7200;
    will_return(__wrap_meter_http_perform, &none);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(seen[4].method, "GET");
    assert_non_null(strstr(seen[4].url, "/api/v2/subscriptions?"));
    meter_iso8601(h + 1, at, sizeof(at));
    assert_non_null(strstr(res.error, "was cancelled at "));
    assert_non_null(strstr(res.error, at));
    assert_non_null(strstr(res.error, "never bill it"));
    assert_int_equal(nseen, 5);

    /* a term invoiced since: dated in the current term's first hour, with
     * a note naming the hours */
    p.pass(&p);
    nseen = 0;
    rec.period_start = rec.usage_start = h;
    rec.period_end = rec.usage_end = h + 3600;
    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "active", h - 86400,
                       h + 3600, ""));
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    date = cb_date(1);
    assert_true(date >= h + 3600 && date <= time(NULL));
    assert_non_null(strstr(seen[1].body, "&note=nginx-meter"));

    /* in trial: never billed there, dead-lettered with the reason */
    p.pass(&p);
    snprintf(extra, sizeof(extra), ",\"trial_end\":%lld",
             (long long) time(NULL) + 86400);
    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "in_trial", h - 86400,
                       h - 86400, extra));
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_non_null(strstr(res.error, "is in_trial until "));
    assert_int_equal(nseen, 3);

    p.cleanup(&p);
}


/* chargebee.subscription_ttl: a duration of 0 to 7 days */
static void
test_chargebee_subscription_ttl(void **state)
{
    int                 i;
    char                err[512], conf[512];
    meter_conf_t       *cf;
    meter_provider_t    p;

    static const char  *bad[] = { "soon", "-1s", "8d", NULL };
    static const char  *good[] = { "0", "30m", "7d", NULL };

    (void) state;

    for (i = 0; bad[i] != NULL; i++) {
        snprintf(conf, sizeof(conf), "provider = chargebee\n"
                 "chargebee.api_key_file = %%s\n"
                 "chargebee.base_url = http://127.0.0.1:9\n"
                 "chargebee.subscription_ttl = %s\n", bad[i]);
        cf = load_conf(conf);
        meter_provider_chargebee(&p);
        err[0] = '\0';
        assert_int_equal(p.init(&p, cf, err, sizeof(err)), -1);
        assert_non_null(strstr(err, "chargebee.subscription_ttl: \""));
        assert_non_null(strstr(err, "0 to 7d"));
        assert_null(strstr(err, "sk_test_secret"));
        assert_null(p.data);
        meter_conf_free(cf);
    }

    for (i = 0; good[i] != NULL; i++) {
        snprintf(conf, sizeof(conf), "provider = chargebee\n"
                 "chargebee.api_key_file = %%s\n"
                 "chargebee.base_url = http://127.0.0.1:9\n"
                 "chargebee.subscription_ttl = %s\n", good[i]);
        cf = load_conf(conf);
        meter_provider_chargebee(&p);
        assert_int_equal(p.init(&p, cf, err, sizeof(err)), 0);
        p.cleanup(&p);
        meter_conf_free(cf);
    }
}


static void
test_chargebee_date_taken_next_second(void **state)
{
    char                 sbody[512], want[160];
    long long            date;
    fake_answer_t        sub;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, "{\"usage\":{}}", 0 };
    static const fake_answer_t  none = { 200, "{\"list\":[]}", 0 };
    static const fake_answer_t  taken = {
        400, "{\"message\":\"usage_date : A usage record already exists "
        "for this item price and usage date\",\"type\":\"invalid_request\","
        "\"api_error_code\":\"duplicate_entry\",\"param\":\"usage_date\"}",
        0
    };
    static const fake_answer_t  bad = {
        400, "{\"message\":\"quantity : invalid value\",\"type\":"
        "\"invalid_request\",\"api_error_code\":\"param_wrong_value\","
        "\"param\":\"quantity\"}", 0
    };

    (void) state;

    start(&p, meter_provider_chargebee, CHARGEBEE_CONF);
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "active",
                       recent_hour() - 86400, recent_hour() - 86400, ""));
    will_return(__wrap_meter_http_perform, &taken);
    will_return(__wrap_meter_http_perform, &none);
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);

    date = cb_date(1);
    assert_string_equal(seen[2].method, "GET");
    assert_int_equal(cb_date(3), date + 1 < recent_hour() + 3600
                                 ? date + 1 : recent_hour());
    snprintf(want, sizeof(want), "chargebee-idempotency-key: %s-d%lld",
             rec.idempotency_key, cb_date(3));
    assert_string_equal(seen[3].header, want);

    /* another 400 is not retried at another date */
    nseen = 0;
    will_return(__wrap_meter_http_perform, &bad);
    will_return(__wrap_meter_http_perform, &none);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_int_equal(nseen, 2);

    p.cleanup(&p);
}


static void
test_chargebee_400_checks_usage_id(void **state)
{
    char                 sbody[512];
    fake_answer_t        sub;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  dup = {
        400, "{\"message\":\"The value is already present.\","
        "\"type\":\"invalid_request\",\"api_error_code\":"
        "\"duplicate_entry\",\"param\":\"id\"}", 0
    };
    static const fake_answer_t  found = {
        200, "{\"list\":[{\"usage\":{\"id\":"
        "\"0123456789abcdef0123456789abcdef\"}}]}", 0
    };
    static const fake_answer_t  none = { 200, "{\"list\":[]}", 0 };
    static const fake_answer_t  e404 = {
        404, "{\"message\":\"Sorry, we couldn't find that resource\","
        "\"type\":\"invalid_request\",\"api_error_code\":"
        "\"resource_not_found\"}", 0
    };

    (void) state;

    start(&p, meter_provider_chargebee, CHARGEBEE_CONF);
    record(&rec, recent_hour());

    will_return(__wrap_meter_http_perform,
                cb_sub(sbody, sizeof(sbody), &sub, "active",
                       recent_hour() - 86400, recent_hour() - 86400, ""));
    will_return(__wrap_meter_http_perform, &dup);
    will_return(__wrap_meter_http_perform, &found);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[2].method, "GET");
    assert_string_equal(seen[2].url, "http://127.0.0.1:9/api/v2/usages?"
                        "id[is]=0123456789abcdef0123456789abcdef"
                        "&subscription_id[is]=sub_9");

    /* a 400 whose usage id does not exist is the record's own fault */
    will_return(__wrap_meter_http_perform, &dup);
    will_return(__wrap_meter_http_perform, &none);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "HTTP 400: The value is already present.");
    assert_int_equal(res.http_status, 400);

    /* a subscription Chargebee does not know, and the customer has no
     * other one */
    p.pass(&p);
    will_return(__wrap_meter_http_perform, &e404);
    will_return(__wrap_meter_http_perform, &none);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "chargebee: subscription \"sub_9\" not "
                        "found, and customer \"cus_123\" has no other "
                        "active subscription with item price \"api_calls\"");
    assert_int_equal(nseen, 7);
    assert_string_equal(seen[6].url, "http://127.0.0.1:9/api/v2/"
                        "subscriptions?limit=100&customer_id[is]=cus_123"
                        "&status[in]=%5B%22active%22%2C%22non_renewing"
                        "%22%5D");

    /* without a customer id nothing else is asked */
    p.pass(&p);
    rec.provider_customer = NULL;
    will_return(__wrap_meter_http_perform, &e404);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "chargebee: subscription \"sub_9\" not "
                        "found");
    assert_int_equal(nseen, 8);

    p.cleanup(&p);
}


/* ---------------------------------------------------------------- recurly */

#define RECURLY_CONF                                                         \
    "provider = recurly\n"                                                   \
    "recurly.api_key_file = %s\n"                                            \
    "recurly.base_url = http://127.0.0.1:9/\n"                               \
    "recurly.max_rps = 0\n"                                                  \
    "recurly.max_attempts = 1\n"


static void
test_recurly_usage(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  created = { 201, "{\"id\":\"u1\"}", 0 };

    (void) state;

    start(&p, meter_provider_recurly, RECURLY_CONF);
    record(&rec, 1700000000 / 3600 * 3600);

    will_return(__wrap_meter_http_perform, &created);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(res.http_status, 201);

    /* the add-on code needs "code-" (openapi/api.yaml, add_on_id) */
    assert_string_equal(seen[0].url, "http://127.0.0.1:9/subscriptions/"
                        "sub_9/add_ons/code-api_calls/usage");
    assert_string_equal(seen[0].header, "Idempotency-Key: "
                        "0123456789abcdef0123456789abcdef");
    assert_string_equal(seen[0].body,
                        "{\"amount\":25,\"merchant_tag\":"
                        "\"0123456789abcdef0123456789abcdef\","
                        "\"usage_timestamp\":\"2023-11-14T22:00:00Z\","
                        "\"recording_timestamp\":\"2023-11-14T23:00:00Z\"}");
    assert_string_equal(seen[0].accept,
                        "application/vnd.recurly.v2021-02-25");
    assert_string_equal(seen[0].content_type, "application/json");
    assert_int_equal(seen[0].auth, METER_HTTP_AUTH_BASIC);
    assert_string_equal(seen[0].secret, "sk_test_secret");
    assert_non_null(p.lookup);

    /* a configured "code-" is not doubled; a later attempt (after a
     * lookup found nothing) gets a fresh Idempotency-Key */
    rec.provider_meter = "code-api_calls";
    rec.attempts = 2;
    rec.created = 1700000000;
    will_return(__wrap_meter_http_perform, &created);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[1].url, "http://127.0.0.1:9/subscriptions/"
                        "sub_9/add_ons/code-api_calls/usage");
    assert_int_equal(strncmp(seen[1].header, "Idempotency-Key: "
                             "0123456789abcdef0123456789abcdef-r", 51), 0);
    assert_int_equal(strlen(seen[1].header), 51 + 16);

    p.cleanup(&p);
}


static void
test_recurly_lookup_paginates(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;
    char                 q[600];

    static const fake_answer_t  page1 = {
        200, "{\"object\":\"list\",\"has_more\":true,\"next\":"
        "\"/subscriptions/sub_9/add_ons/code-api_calls/usage?cursor=2\","
        "\"data\":[{\"merchant_tag\":\"a\"},{\"merchant_tag\":null}]}", 0
    };
    static const fake_answer_t  page1url = {
        200, "{\"object\":\"list\",\"has_more\":true,\"next\":"
        "\"http://127.0.0.1:9/subscriptions/sub_9/add_ons/code-api_calls/"
        "usage?cursor=3\",\"data\":[{\"merchant_tag\":\"a\"}]}", 0
    };
    static const fake_answer_t  page1evil = {
        200, "{\"object\":\"list\",\"has_more\":true,\"next\":"
        "\"http://127.0.0.1:9.evil.example/usage?cursor=3\","
        "\"data\":[]}", 0
    };
    static const fake_answer_t  page2 = {
        200, "{\"object\":\"list\",\"has_more\":false,\"next\":null,"
        "\"data\":[{\"merchant_tag\":\"0123456789abcdef0123456789abcdef\"}]}",
        0
    };
    static const fake_answer_t  last = {
        200, "{\"object\":\"list\",\"has_more\":false,\"next\":null,"
        "\"data\":[{\"merchant_tag\":\"b\"}]}", 0
    };
    static const fake_answer_t  e404 = {
        404, "{\"error\":{\"type\":\"not_found\",\"message\":\"Couldn't find "
        "Subscription\"}}", 0
    };

    (void) state;

    start(&p, meter_provider_recurly, RECURLY_CONF);
    record(&rec, 1700000000 / 3600 * 3600);

    will_return(__wrap_meter_http_perform, &page1);
    will_return(__wrap_meter_http_perform, &page2);
    assert_int_equal(p.lookup(&p, &rec, &res), 1);
    assert_int_equal(nseen, 2);
    assert_string_equal(seen[0].method, "GET");
    /* billed usage too, ascending from the record's usage_timestamp
     * (openapi/api.yaml: BillingStatusEnum default unbilled,
     * usage_sort_dates) */
    snprintf(q, sizeof(q), "http://127.0.0.1:9/subscriptions/sub_9/add_ons/"
             "code-api_calls/usage?limit=200&billing_status=all"
             "&sort=usage_timestamp&order=asc&begin_time=%s",
             "2023-11-14T22%3A00%3A00Z");
    assert_string_equal(seen[0].url, q);
    assert_string_equal(seen[1].url, "http://127.0.0.1:9/subscriptions/"
                        "sub_9/add_ons/code-api_calls/usage?cursor=2");
    assert_string_equal(seen[1].accept,
                        "application/vnd.recurly.v2021-02-25");

    /* "next" as a full URL on the base's origin */
    will_return(__wrap_meter_http_perform, &page1url);
    will_return(__wrap_meter_http_perform, &last);
    assert_int_equal(p.lookup(&p, &rec, &res), 0);
    assert_string_equal(seen[3].url, "http://127.0.0.1:9/subscriptions/"
                        "sub_9/add_ons/code-api_calls/usage?cursor=3");

    /* anywhere else: the API key is not sent there */
    will_return(__wrap_meter_http_perform, &page1evil);
    assert_int_equal(p.lookup(&p, &rec, &res), -1);
    assert_int_equal(nseen, 5);
    assert_non_null(strstr(res.error, "neither a path nor a URL"));

    will_return(__wrap_meter_http_perform, &e404);
    assert_int_equal(p.lookup(&p, &rec, &res), -1);
    assert_string_equal(res.error, "HTTP 404: Couldn't find Subscription");

    p.cleanup(&p);
}


static void
test_recurly_lookup_stops_past_its_time(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    /* ascending: a later usage_timestamp ends the search, no next page */
    static const fake_answer_t  page = {
        200, "{\"object\":\"list\",\"has_more\":true,\"next\":\"/x\","
        "\"data\":[{\"merchant_tag\":\"a\",\"usage_timestamp\":"
        "\"2023-11-14T22:00:00Z\"},{\"merchant_tag\":\"b\","
        "\"usage_timestamp\":\"2023-11-14T23:00:00.000Z\"}]}", 0
    };

    (void) state;

    start(&p, meter_provider_recurly, RECURLY_CONF);
    record(&rec, 1700000000 / 3600 * 3600);

    will_return(__wrap_meter_http_perform, &page);
    assert_int_equal(p.lookup(&p, &rec, &res), 0);
    assert_int_equal(nseen, 1);

    p.cleanup(&p);
}


static void
test_recurly_rate_limit(void **state)
{
    int                  i;
    time_t               now;
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  e429 = {
        429, "{\"error\":{\"type\":\"rate_limited\",\"message\":\"slow "
        "down\"}}", 0
    };
    static const fake_answer_t  ok = { 201, "{}", 0 };

    (void) state;

    start(&p, meter_provider_recurly,
          "provider = recurly\n"
          "recurly.api_key_file = %s\n"
          "recurly.base_url = http://127.0.0.1:9\n"
          "recurly.max_rps = 0\n");
    record(&rec, recent_hour());
    now = time(NULL);

    /* 429 without Retry-After: wait for X-RateLimit-Reset */
    rl_remaining[0] = 0;
    rl_reset[0] = now + 5;
    rl_remaining[1] = 10;
    rl_reset[1] = now + 5;
    will_return(__wrap_meter_http_perform, &e429);
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(nseen, 2);
    assert_int_equal(nslept, 1);
    assert_true(slept[0] >= 4 && slept[0] <= 5);

    /* Remaining 0, reset beyond retry_cap: no request that can only 429;
     * the drain loop schedules the record after the reset */
    rl_remaining[2] = 0;
    rl_reset[2] = now + 200;
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_RETRY);
    assert_int_equal(nseen, 3);
    assert_int_equal(res.http_status, 429);
    assert_true(res.retry_after >= 199 && res.retry_after <= 200);

    p.cleanup(&p);

    /* the default max_rps fits the sandbox's 400 requests a minute
     * (openapi/api.yaml, "Limits"): a burst of 5, then paced */
    start(&p, meter_provider_recurly,
          "provider = recurly\n"
          "recurly.api_key_file = %s\n"
          "recurly.base_url = http://127.0.0.1:9\n");
    record(&rec, recent_hour());

    for (i = 0; i < 6; i++) {
        will_return(__wrap_meter_http_perform, &ok);
        assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
        assert_int_equal(nslept, i < 5 ? 0 : 1);
    }

    assert_true(slept[0] > 0.1 && slept[0] <= 0.2);

    p.cleanup(&p);
}


static void
test_recurly_no_blind_resend(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  e500 = { 500, "{}", 0 };
    static const fake_answer_t  e429 = { 429, "{}", 0 };
    static const fake_answer_t  ok = { 201, "{}", 0 };

    (void) state;

    start(&p, meter_provider_recurly,
          "provider = recurly\n"
          "recurly.api_key_file = %s\n"
          "recurly.base_url = http://127.0.0.1:9\n"
          "recurly.max_attempts = 3\n");
    record(&rec, recent_hour());

    /* a 500 may hide a stored usage: no resend inside the call */
    will_return(__wrap_meter_http_perform, &e500);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_RETRY);
    assert_int_equal(nseen, 1);

    /* a 429 proves nothing was stored: retried at once */
    will_return(__wrap_meter_http_perform, &e429);
    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_int_equal(nseen, 3);

    p.cleanup(&p);
}


/* ---------------------------------------------------------------- http */

static void
test_openmeter_event(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  nocontent = { 204, NULL, 0 };

    (void) state;

    start(&p, meter_provider_http,
          "provider = http\n"
          "http.url = http://127.0.0.1:9/api/v1/events\n"
          "http.auth_file = %s\n"
          "http.max_attempts = 1\n");
    record(&rec, 1700000000 / 3600 * 3600);

    will_return(__wrap_meter_http_perform, &nocontent);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[0].url, "http://127.0.0.1:9/api/v1/events");
    assert_string_equal(seen[0].content_type,
                        "application/cloudevents+json");
    assert_string_equal(seen[0].body,
                        "{\"data\":{\"value\":25,\"key_hash\":"
                        "\"9f86d081884c7d659a2feaa0c55ad015"
                        "a3bf4f1b2b0b822cd15d6c15b0f00a08\","
                        "\"meter\":\"calls\"},\"specversion\":\"1.0\","
                        "\"id\":\"0123456789abcdef0123456789abcdef\","
                        "\"source\":\"nginx-meter\",\"type\":\"api_calls\","
                        "\"subject\":\"acme\","
                        "\"time\":\"2023-11-14T22:00:00Z\"}");
    assert_int_equal(seen[0].auth, METER_HTTP_AUTH_BEARER);
    assert_string_equal(seen[0].secret, "sk_test_secret");

    p.cleanup(&p);
}


static void
test_lago_event(void **state)
{
    meter_record_t       rec;
    meter_provider_t     p;
    meter_send_result_t  res;

    static const fake_answer_t  ok = { 200, "{\"event\":{}}", 0 };
    static const fake_answer_t  dup = {
        422, "{\"status\":422,\"error\":\"Unprocessable Entity\","
        "\"code\":\"validation_errors\",\"error_details\":"
        "{\"transaction_id\":[\"value_already_exist\"]}}", 0
    };
    static const fake_answer_t  bad = {
        422, "{\"status\":422,\"error\":\"Unprocessable Entity\","
        "\"code\":\"validation_errors\",\"error_details\":"
        "{\"code\":[\"metric_not_found\"]}}", 0
    };

    (void) state;

    start(&p, meter_provider_http,
          "provider = http\n"
          "http.url = http://127.0.0.1:9/api/v1/events\n"
          "http.format = lago\n"
          "http.max_attempts = 1\n");
    record(&rec, 1700000000 / 3600 * 3600);
    rec.provider_meter = NULL;

    will_return(__wrap_meter_http_perform, &ok);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);
    assert_string_equal(seen[0].content_type, "application/json");
    assert_string_equal(seen[0].body,
                        "{\"event\":{\"properties\":{\"value\":25},"
                        "\"transaction_id\":"
                        "\"0123456789abcdef0123456789abcdef\","
                        "\"external_subscription_id\":\"sub_9\","
                        "\"code\":\"calls\",\"timestamp\":1699999200}}");
    assert_int_equal(seen[0].auth, METER_HTTP_AUTH_NONE);

    will_return(__wrap_meter_http_perform, &dup);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_OK);

    will_return(__wrap_meter_http_perform, &bad);
    assert_int_equal(p.send(&p, &rec, &res), METER_SEND_FATAL);
    assert_string_equal(res.error, "HTTP 422: Unprocessable Entity: "
                        "{\"code\":[\"metric_not_found\"]}");

    p.cleanup(&p);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_stripe_meter_event),
        cmocka_unit_test(test_stripe_payload_keys),
        cmocka_unit_test(test_stripe_duplicate_is_ok),
        cmocka_unit_test(test_stripe_window),
        cmocka_unit_test(test_stripe_replayed_failure),
        cmocka_unit_test(test_stripe_retry_gives_up),
        cmocka_unit_test(test_stripe_usage_records),
        cmocka_unit_test(test_stripe_stream),
        cmocka_unit_test(test_stripe_init_errors),
        cmocka_unit_test(test_stripe_version),
        cmocka_unit_test(test_stripe_rps_defaults),
        cmocka_unit_test(test_stripe_lookup_past_window),
        cmocka_unit_test(test_chargebee_usage),
        cmocka_unit_test(test_chargebee_dates_billable),
        cmocka_unit_test(test_chargebee_subscription_ttl),
        cmocka_unit_test(test_chargebee_date_taken_next_second),
        cmocka_unit_test(test_chargebee_400_checks_usage_id),
        cmocka_unit_test(test_recurly_usage),
        cmocka_unit_test(test_recurly_lookup_paginates),
        cmocka_unit_test(test_recurly_lookup_stops_past_its_time),
        cmocka_unit_test(test_recurly_rate_limit),
        cmocka_unit_test(test_recurly_no_blind_resend),
        cmocka_unit_test(test_openmeter_event),
        cmocka_unit_test(test_lago_event),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
