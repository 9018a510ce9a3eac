
/*
 * Copyright (C) nginx-meter authors
 *
 * Numbers from providers turned into times: a JSON number beyond time_t
 * (1e300) cast to time_t is undefined (UBSan float-cast-overflow, which
 * worker/Makefile enables): Chargebee's invoice due_date (delinquency
 * poll) and occurred_at (webhook), Stripe's event created.  The transfer
 * is wrapped:
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
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "http.h"
#include "provider.h"
#include "provider_util.h"
#include "util.h"


#define NOW  1764000000


static char  dir[] = "/tmp/test_provider_numbers_XXXXXX";


int __wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp);
void __wrap_meter_http_sleep(double seconds);


int
__wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp)
{
    const char  *body;

    (void) h;
    (void) req;

    body = mock_ptr_type(const char *);

    meter_buf_reset(&resp->body);
    resp->status = 200;
    resp->retry_after = -1;
    resp->should_retry = -1;
    resp->replayed = 0;
    resp->error[0] = '\0';
    meter_buf_append(&resp->body, body, strlen(body));

    return 0;
}


void
__wrap_meter_http_sleep(double seconds)
{
    (void) seconds;
}


static void
write_file(const char *name, const char *content)
{
    char   path[300];
    FILE  *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
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
    fprintf(f, "provider = %s\n%s.api_key_file = key\n%s", name, name,
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

    return cf;
}


static int
setup(void **state)
{
    (void) state;

    if (mkdtemp(dir) == NULL) {
        return -1;
    }

    setenv("CREDENTIALS_DIRECTORY", dir, 1);
    write_file("key", "sk_test_x\n");
    write_file("whsec", "whsec_abc\n");
    write_file("cbpw", "pw1\n");

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


static const char *
hdr(void *data, const char *name)
{
    const char  **h;

    h = data;

    return strcasecmp(h[0], name) == 0 ? h[1] : NULL;
}


static time_t   since[4];
static int      nsince;


static int
overdue(void *data, const meter_overdue_t *o)
{
    (void) data;

    assert_true(nsince < 4);
    since[nsince++] = o->since;

    return 0;
}


static void
test_chargebee_due_date(void **state)
{
    meter_conf_t         *cf;
    meter_provider_t      p;
    meter_send_result_t   res;

    (void) state;

    cf = provider(&p, "chargebee", "chargebee.site = x\n"
                  "chargebee.base_url = http://127.0.0.1:9\n"
                  "chargebee.max_rps = 0\n");

    will_return(__wrap_meter_http_perform,
                "{\"list\":["
                "{\"invoice\":{\"customer_id\":\"c1\",\"due_date\":1e300}},"
                "{\"invoice\":{\"customer_id\":\"c2\",\"due_date\":-1e300}},"
                "{\"invoice\":{\"customer_id\":\"c3\","
                "\"due_date\":1700000000}}]}");

    nsince = 0;
    assert_int_equal(p.overdue(&p, overdue, NULL, &res), 0);
    assert_int_equal(nsince, 3);
    assert_int_equal(since[0], METER_TIME_MAX);
    assert_int_equal(since[1], 0);
    assert_int_equal(since[2], 1700000000);

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_chargebee_occurred_at(void **state)
{
    const char             *h[2];
    meter_conf_t           *cf;
    meter_provider_t        p;
    meter_webhook_req_t     req;
    meter_webhook_event_t   ev;

    static const char  body[] =
        "{\"id\":\"ev_1\",\"occurred_at\":1e300,\"event_type\":"
        "\"payment_failed\",\"content\":{\"subscription\":{\"id\":\"s1\","
        "\"customer_id\":\"c1\"}}}";

    (void) state;

    cf = provider(&p, "chargebee", "chargebee.site = x\n"
                  "chargebee.webhook_user = u\n"
                  "chargebee.webhook_password_file = cbpw\n");

    h[0] = "Authorization";
    h[1] = "Basic dTpwdzE=";                        /* u:pw1 */
    memset(&req, 0, sizeof(req));
    req.method = "POST";
    req.path = "/webhooks/chargebee";
    req.body = body;
    req.body_len = strlen(body);
    req.header = hdr;
    req.data = h;
    req.now = NOW;

    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_DELINQUENT);
    assert_int_equal(ev.event_time, METER_TIME_MAX);

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_stripe_created(void **state)
{
    char                    ts[24], mac[65], sig[200];
    const char             *h[2];
    meter_conf_t           *cf;
    meter_provider_t        p;
    meter_webhook_req_t     req;
    meter_webhook_event_t   ev;

    static const char  body[] =
        "{\"id\":\"evt_1\",\"type\":\"invoice.payment_failed\","
        "\"created\":1e300,\"data\":{\"object\":{\"id\":\"in_1\","
        "\"customer\":\"cus_1\",\"subscription\":\"sub_1\"}}}";

    (void) state;

    cf = provider(&p, "stripe", "stripe.webhook_secret_file = whsec\n");

    snprintf(ts, sizeof(ts), "%d", NOW);
    assert_int_equal(meter_hmac_hex("whsec_abc", 9, ts, body, strlen(body),
                                    mac), 0);
    snprintf(sig, sizeof(sig), "t=%s,v1=%s", ts, mac);

    h[0] = "Stripe-Signature";
    h[1] = sig;
    memset(&req, 0, sizeof(req));
    req.method = "POST";
    req.path = "/webhooks/stripe";
    req.body = body;
    req.body_len = strlen(body);
    req.header = hdr;
    req.data = h;
    req.now = NOW;

    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_DELINQUENT);
    assert_int_equal(ev.event_time, METER_TIME_MAX);

    p.cleanup(&p);
    meter_conf_free(cf);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_chargebee_due_date),
        cmocka_unit_test(test_chargebee_occurred_at),
        cmocka_unit_test(test_stripe_created),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
