
/*
 * Copyright (C) nginx-meter authors
 *
 * The providers' onboarding (customer, then subscription, idempotent on
 * retry) and overdue lists (pagination), with the transfer wrapped:
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


#define MAX_SEEN  16

#include "mock_http.h"


static char     dir[] = "/tmp/test_onboard_XXXXXX";


static int
setup(void **state)
{
    char   path[300];
    FILE  *f;

    (void) state;

    if (mkdtemp(dir) == NULL) {
        return -1;
    }

    setenv("CREDENTIALS_DIRECTORY", dir, 1);
    snprintf(path, sizeof(path), "%s/key", dir);
    f = fopen(path, "w");
    if (f == NULL) {
        return -1;
    }

    fputs("sk_test_x\n", f);
    fclose(f);

    return 0;
}


static int
teardown(void **state)
{
    char  cmd[300];

    (void) state;

    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);

    return system(cmd) == 0 ? 0 : -1;
}


static meter_conf_t *
provider(meter_provider_t *p, const char *name, const char *extra)
{
    char           path[300], err[512];
    FILE          *f;
    meter_conf_t  *cf;

    snprintf(path, sizeof(path), "%s/worker.conf", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "provider = %s\n%s.api_key_file = key\n%s.base_url = "
            "http://fake\n%s.max_attempts = 1\n%s", name, name, name, name,
            extra);
    fclose(f);

    cf = meter_conf_load(path, err, sizeof(err));
    if (cf == NULL) {
        fail_msg("%s", err);
    }

    assert_int_equal(meter_provider_by_name(name, p), 0);
    if (p->init(p, cf, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }

    nseen = 0;

    return cf;
}


static int
count_cb(void *data, const meter_overdue_t *o)
{
    assert_non_null(o->provider_customer);
    assert_non_null(o->subscription);
    (*(int *) data)++;

    return 0;
}


static const fake_answer_t  empty = { 200, "{\"object\":\"list\",\"data\":[],"
                                 "\"has_more\":false}", 0 };


static void
test_stripe_onboard(void **state)
{
    meter_conf_t            *cf;
    meter_provider_t         p;
    meter_onboard_t          in = { "acme", "a@x.io", "Acme Inc", "pro" };
    meter_send_result_t      res;
    meter_onboard_result_t   out;

    static const fake_answer_t  cus = { 200, "{\"id\":\"cus_1\"}", 0 };
    static const fake_answer_t  sub = { 200,
        "{\"id\":\"sub_1\",\"items\":{\"data\":["
        "{\"id\":\"si_1\",\"price\":{\"id\":\"price_c\"}},"
        "{\"id\":\"si_2\",\"price\":{\"id\":\"price_b\"}}]}}", 0 };

    (void) state;

    cf = provider(&p, "stripe", "plan.pro.stripe_price = price_c\n"
                  "plan.pro.stripe_price.bytes = price_b\n");

    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &cus);
    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &sub);

    assert_int_equal(p.onboard(&p, &in, &out, &res), METER_SEND_OK);
    assert_string_equal(out.provider_customer, "cus_1");
    assert_string_equal(out.subscription, "sub_1");
    assert_int_equal(out.nitems, 2);
    assert_string_equal(out.item_meter[0], "calls");
    assert_string_equal(out.item_id[0], "si_1");
    assert_string_equal(out.item_meter[1], "bytes");
    assert_string_equal(out.item_id[1], "si_2");

    assert_int_equal(nseen, 4);
    assert_string_equal(seen[0].url, "http://fake/v1/customers?email="
                        "a%40x.io&limit=100");
    assert_string_equal(seen[1].method, "POST");
    assert_string_equal(seen[1].url, "http://fake/v1/customers");
    assert_string_equal(seen[1].body, "email=a%40x.io&name=Acme%20Inc&"
                        "metadata[nginx_meter_customer]=acme");
    assert_string_equal(seen[1].header,
                        "Idempotency-Key: nginx-meter-acme-customer");
    assert_string_equal(seen[2].url, "http://fake/v1/subscriptions?"
                        "status=all&customer=cus_1&limit=100");
    assert_string_equal(seen[3].body, "customer=cus_1&"
                        "metadata[nginx_meter_customer]=acme&"
                        "items[0][price]=price_c&items[1][price]=price_b");
    assert_string_equal(seen[3].header,
                        "Idempotency-Key: nginx-meter-acme-subscription");

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_stripe_onboard_retry(void **state)
{
    meter_conf_t            *cf;
    meter_provider_t         p;
    meter_onboard_t          in = { "acme", "a@x.io", NULL, NULL };
    meter_send_result_t      res;
    meter_onboard_result_t   out;

    static const fake_answer_t  found = { 200, "{\"data\":[{\"id\":\"cus_9\","
        "\"metadata\":{\"nginx_meter_customer\":\"other\"}},{\"id\":"
        "\"cus_1\",\"metadata\":{\"nginx_meter_customer\":\"acme\"}}],"
        "\"has_more\":false}", 0 };
    static const fake_answer_t  replay = { 500, "{\"error\":{\"type\":"
        "\"api_error\",\"message\":\"boom\"}}", 1 };
    static const fake_answer_t  sub = { 200, "{\"id\":\"sub_1\",\"items\":"
        "{\"data\":[]}}", 0 };

    (void) state;

    cf = provider(&p, "stripe", "plan.default.stripe_price = price_c\n");

    /* the customer exists (found, not created); the subscription's key
     * replays a saved 500: a fresh key, once */
    will_return(__wrap_meter_http_perform, &found);
    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &replay);
    will_return(__wrap_meter_http_perform, &sub);

    assert_int_equal(p.onboard(&p, &in, &out, &res), METER_SEND_OK);
    assert_string_equal(out.provider_customer, "cus_1");
    assert_string_equal(out.subscription, "sub_1");
    assert_int_equal(nseen, 4);
    assert_string_equal(seen[2].header,
                        "Idempotency-Key: nginx-meter-acme-subscription");
    assert_memory_equal(seen[3].header,
                        "Idempotency-Key: nginx-meter-acme-subscription-r",
                        47);

    /* no plan price: refused before any call */
    nseen = 0;
    in.plan = "gold";
    assert_int_equal(p.onboard(&p, &in, &out, &res), METER_SEND_FATAL);
    assert_non_null(strstr(res.error, "plan.gold.stripe_price"));
    assert_int_equal(nseen, 0);

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_stripe_overdue_pages(void **state)
{
    int                   n;
    meter_conf_t         *cf;
    meter_provider_t      p;
    meter_send_result_t   res;

    static const fake_answer_t  page1 = { 200, "{\"data\":[{\"id\":\"sub_1\","
        "\"customer\":\"cus_1\"},{\"id\":\"sub_2\",\"customer\":{\"id\":"
        "\"cus_2\"}}],\"has_more\":true}", 0 };
    static const fake_answer_t  page2 = { 200, "{\"data\":[{\"id\":\"sub_3\","
        "\"customer\":\"cus_3\"}],\"has_more\":false}", 0 };
    static const fake_answer_t  e500 = { 500, "{}", 0 };

    (void) state;

    cf = provider(&p, "stripe", "");

    will_return(__wrap_meter_http_perform, &page1);
    will_return(__wrap_meter_http_perform, &page2);
    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &empty);

    n = 0;
    assert_int_equal(p.overdue(&p, count_cb, &n, &res), 0);
    assert_int_equal(n, 3);
    assert_int_equal(nseen, 5);
    assert_string_equal(seen[0].url, "http://fake/v1/subscriptions?"
                        "status=past_due&limit=100");
    assert_string_equal(seen[1].url, "http://fake/v1/subscriptions?"
                        "status=past_due&limit=100&starting_after=sub_2");
    assert_string_equal(seen[2].url, "http://fake/v1/subscriptions?"
                        "status=unpaid&limit=100");

    /* a failing page fails the whole list */
    nseen = 0;
    will_return(__wrap_meter_http_perform, &page1);
    will_return(__wrap_meter_http_perform, &e500);
    assert_int_equal(p.overdue(&p, count_cb, &n, &res), -1);

    p.cleanup(&p);
    meter_conf_free(cf);
}


/* "incomplete" is a prefix of "incomplete_expired": whole words only, so
 * a rerun finds the incomplete subscription instead of making a second */
static void
test_stripe_onboard_incomplete_found(void **state)
{
    meter_conf_t            *cf;
    meter_provider_t         p;
    meter_onboard_t          in = { "acme", "a@x.io", NULL, NULL };
    meter_send_result_t      res;
    meter_onboard_result_t   out;

    static const fake_answer_t  found = { 200, "{\"data\":[{\"id\":\"cus_1\","
        "\"metadata\":{\"nginx_meter_customer\":\"acme\"}}],"
        "\"has_more\":false}", 0 };
    static const fake_answer_t  subs = { 200, "{\"data\":["
        "{\"id\":\"sub_0\",\"status\":\"incomplete_expired\",\"metadata\":"
        "{\"nginx_meter_customer\":\"acme\"}},"
        "{\"id\":\"sub_1\",\"status\":\"incomplete\",\"metadata\":"
        "{\"nginx_meter_customer\":\"acme\"}}],\"has_more\":false}", 0 };
    static const fake_answer_t  sub = { 200, "{\"id\":\"sub_1\",\"status\":"
        "\"incomplete\",\"items\":{\"data\":[]}}", 0 };

    (void) state;

    cf = provider(&p, "stripe", "plan.default.stripe_price = price_c\n");

    will_return(__wrap_meter_http_perform, &found);
    will_return(__wrap_meter_http_perform, &subs);
    will_return(__wrap_meter_http_perform, &sub);

    assert_int_equal(p.onboard(&p, &in, &out, &res), METER_SEND_OK);
    assert_string_equal(out.subscription, "sub_1");
    assert_int_equal(nseen, 3);
    assert_string_equal(seen[2].method, "GET");
    assert_string_equal(seen[2].url, "http://fake/v1/subscriptions/sub_1");

    p.cleanup(&p);
    meter_conf_free(cf);
}


/* open invoices count once Stripe tried to collect them or they are past
 * due; uncollectible ones always (dunning gave up, still owed) */
static void
test_stripe_overdue_invoices(void **state)
{
    int                   n;
    char                  body[1024];
    meter_conf_t         *cf;
    meter_provider_t      p;
    meter_send_result_t   res;
    fake_answer_t              open;

    static const fake_answer_t  unc = { 200, "{\"data\":[{\"id\":\"in_4\","
        "\"status\":\"uncollectible\",\"customer\":\"cus_4\",\"parent\":"
        "{\"subscription_details\":{\"subscription\":\"sub_4\"}}}],"
        "\"has_more\":false}", 0 };

    (void) state;

    snprintf(body, sizeof(body), "{\"data\":["
             "{\"id\":\"in_1\",\"status\":\"open\",\"customer\":\"cus_1\","
             "\"attempted\":false,\"due_date\":null,\"subscription\":\"s1\"},"
             "{\"id\":\"in_2\",\"status\":\"open\",\"customer\":\"cus_2\","
             "\"attempted\":true,\"subscription\":\"s2\"},"
             "{\"id\":\"in_3\",\"status\":\"open\",\"customer\":\"cus_3\","
             "\"attempted\":false,\"due_date\":%lld,\"subscription\":\"s3\"},"
             "{\"id\":\"in_5\",\"status\":\"open\",\"customer\":\"cus_5\","
             "\"attempted\":false,\"due_date\":%lld,\"subscription\":\"s5\"}"
             "],\"has_more\":false}", (long long) time(NULL) - 60,
             (long long) time(NULL) + 86400);
    open.status = 200;
    open.body = body;
    open.replayed = 0;

    cf = provider(&p, "stripe", "");

    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &empty);
    will_return(__wrap_meter_http_perform, &open);
    will_return(__wrap_meter_http_perform, &unc);

    n = 0;
    assert_int_equal(p.overdue(&p, count_cb, &n, &res), 0);
    /* in_2 (attempted), in_3 (past due), in_4 (uncollectible) */
    assert_int_equal(n, 3);
    assert_int_equal(nseen, 4);
    assert_string_equal(seen[2].url, "http://fake/v1/invoices?"
                        "status=open&limit=100");
    assert_string_equal(seen[3].url, "http://fake/v1/invoices?"
                        "status=uncollectible&limit=100");

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_chargebee_onboard_duplicate(void **state)
{
    meter_conf_t            *cf;
    meter_provider_t         p;
    meter_onboard_t          in = { "acme", "a@x.io", NULL, NULL };
    meter_send_result_t      res;
    meter_onboard_result_t   out;

    static const fake_answer_t  dup = { 400, "{\"message\":\"The value acme is "
        "already present.\",\"type\":\"invalid_request\",\"api_error_code\":"
        "\"duplicate_entry\",\"param\":\"id\"}", 0 };
    static const fake_answer_t  sub = { 200, "{\"subscription\":{\"id\":"
        "\"acme\"}}", 0 };

    (void) state;

    cf = provider(&p, "chargebee",
                  "plan.default.chargebee_item_price = calls-USD\n");

    will_return(__wrap_meter_http_perform, &dup);
    will_return(__wrap_meter_http_perform, &sub);

    assert_int_equal(p.onboard(&p, &in, &out, &res), METER_SEND_OK);
    assert_string_equal(out.provider_customer, "acme");
    assert_string_equal(out.subscription, "acme");
    assert_string_equal(seen[0].url, "http://fake/api/v2/customers");
    assert_string_equal(seen[0].body, "id=acme&email=a%40x.io");
    assert_string_equal(seen[0].header, "chargebee-idempotency-key: "
                        "nginx-meter-acme-customer");
    assert_string_equal(seen[1].url, "http://fake/api/v2/customers/acme/"
                        "subscription_for_items");
    assert_string_equal(seen[1].body, "id=acme&"
                        "subscription_items[item_price_id][0]=calls-USD");

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_recurly_onboard_get_first(void **state)
{
    meter_conf_t            *cf;
    meter_provider_t         p;
    meter_onboard_t          in = { "acme", "a@x.io", NULL, NULL };
    meter_send_result_t      res;
    meter_onboard_result_t   out;

    static const fake_answer_t  none = { 404, "{\"error\":{\"type\":"
        "\"not_found\",\"message\":\"Couldn't find Account\"}}", 0 };
    static const fake_answer_t  acct = { 201, "{\"id\":\"a1\","
        "\"code\":\"acme\"}", 0 };
    static const fake_answer_t  live = { 200, "{\"data\":[{\"id\":\"s9\","
        "\"plan\":{\"code\":\"api\"}}],\"has_more\":false}", 0 };

    (void) state;

    cf = provider(&p, "recurly", "plan.default.recurly_plan = api\n");

    /* first run: no account yet; the subscription exists already */
    will_return(__wrap_meter_http_perform, &none);
    will_return(__wrap_meter_http_perform, &acct);
    will_return(__wrap_meter_http_perform, &live);

    assert_int_equal(p.onboard(&p, &in, &out, &res), METER_SEND_OK);
    assert_string_equal(out.provider_customer, "acme");
    assert_string_equal(out.subscription, "s9");
    assert_int_equal(nseen, 3);
    assert_string_equal(seen[0].url, "http://fake/accounts/code-acme");
    assert_string_equal(seen[1].body,
                        "{\"code\":\"acme\",\"email\":\"a@x.io\"}");
    assert_string_equal(seen[2].url, "http://fake/accounts/code-acme/"
                        "subscriptions?state=live&limit=200");

    p.cleanup(&p);
    meter_conf_free(cf);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_stripe_onboard),
        cmocka_unit_test(test_stripe_onboard_retry),
        cmocka_unit_test(test_stripe_overdue_pages),
        cmocka_unit_test(test_stripe_onboard_incomplete_found),
        cmocka_unit_test(test_stripe_overdue_invoices),
        cmocka_unit_test(test_chargebee_onboard_duplicate),
        cmocka_unit_test(test_recurly_onboard_get_first),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
