
/*
 * Copyright (C) nginx-meter authors
 *
 * webhook.c: the handling of one delivery (routing, dedupe,
 * customer lookup, status change, 503 when it cannot be stored), and the
 * providers' verification: Stripe-Signature, Chargebee Basic auth,
 * recurly-signature.  Governance and Redis are wrapped:
 *     -Wl,--wrap=meter_gov_find_customer,... -Wl,--wrap=meter_redis_argv
 */


/* wrap: meter_gov_find_customer meter_gov_set_status meter_gov_project meter_redis_argv meter_http_perform */


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
#include "gov.h"
#include "http.h"
#include "provider_util.h"
#include "webhook.h"


#define NOW  1764000000


static char  dir[] = "/tmp/test_webhook_XXXXXX";


int __wrap_meter_gov_find_customer(meter_redis_t *r,
    const char *provider_customer, const char *subscription, char *customer,
    size_t size, char *err, size_t errlen);
int __wrap_meter_gov_set_status(meter_redis_t *r, const char *customer,
    int delinquent, const char *reason, const char *source,
    time_t event_time, char *err, size_t errlen);
int __wrap_meter_gov_project(meter_redis_t *r, const char *customer,
    char *err, size_t errlen);
redisReply *__wrap_meter_redis_argv(meter_redis_t *r, int argc,
    const char **argv, const size_t *argvlen);


int
__wrap_meter_gov_find_customer(meter_redis_t *r,
    const char *provider_customer, const char *subscription, char *customer,
    size_t size, char *err, size_t errlen)
{
    int          rc;
    const char  *c;

    (void) r;

    check_expected_ptr(provider_customer);
    check_expected_ptr(subscription);

    rc = mock_type(int);
    c = mock_ptr_type(const char *);

    if (rc == 1) {
        snprintf(customer, size, "%s", c);
    }

    if (rc == -1) {
        snprintf(err, errlen, "redis down");
    }

    return rc;
}


int
__wrap_meter_gov_set_status(meter_redis_t *r, const char *customer,
    int delinquent, const char *reason, const char *source,
    time_t event_time, char *err, size_t errlen)
{
    int  rc;

    (void) r;

    check_expected_ptr(customer);
    check_expected(delinquent);
    check_expected(event_time);
    assert_string_equal(source, "sync");

    if (delinquent) {
        assert_string_equal(reason, "invoice_overdue");
    }

    rc = mock_type(int);
    if (rc == -1) {
        snprintf(err, errlen, "redis down");
    }

    return rc;
}


int
__wrap_meter_gov_project(meter_redis_t *r, const char *customer, char *err,
    size_t errlen)
{
    (void) r;
    (void) err;
    (void) errlen;

    check_expected_ptr(customer);

    return mock_type(int);
}


/* Stripe's owed-money check before a "paid" event clears a customer:
 * nothing listed as owed */
int __wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp);

int
__wrap_meter_http_perform(meter_http_t *h, const meter_http_req_t *req,
    meter_http_resp_t *resp)
{
    static const char  empty[] = "{\"object\":\"list\",\"data\":[],"
                                 "\"has_more\":false}";

    (void) h;
    (void) req;

    meter_buf_reset(&resp->body);
    resp->status = 200;
    resp->retry_after = -1;
    resp->should_retry = -1;
    resp->replayed = 0;
    resp->error[0] = '\0';

    return meter_buf_append(&resp->body, empty, sizeof(empty) - 1);
}


/* EXISTS and SET: the command line is checked, the reply queued */
redisReply *
__wrap_meter_redis_argv(meter_redis_t *r, int argc, const char **argv,
    const size_t *argvlen)
{
    int          i;
    char         line[512];
    redisReply  *rp;

    (void) r;
    (void) argvlen;

    line[0] = '\0';
    for (i = 0; i < argc; i++) {
        strncat(line, argv[i], sizeof(line) - strlen(line) - 2);
        if (i + 1 < argc) {
            strcat(line, " ");
        }
    }

    check_expected_ptr(line);

    rp = calloc(1, sizeof(redisReply));
    assert_non_null(rp);
    rp->type = mock_type(int);
    rp->integer = mock_type(long long);
    if (rp->type == REDIS_REPLY_ERROR) {
        rp->str = strdup("ERR scripted");
        rp->len = strlen(rp->str);
    }

    return rp;
}


static meter_conf_t *
load_conf(const char *provider, const char *extra)
{
    char           path[300], err[512];
    FILE          *f;
    meter_conf_t  *cf;

    snprintf(path, sizeof(path), "%s/worker.conf", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "provider = %s\n%s.api_key_file = %s/key\n%s", provider,
            provider, dir, extra);
    fclose(f);

    cf = meter_conf_load(path, err, sizeof(err));
    if (cf == NULL) {
        fail_msg("%s", err);
    }

    return cf;
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


static int
setup(void **state)
{
    (void) state;

    if (mkdtemp(dir) == NULL) {
        return -1;
    }

    /* secret file names below are relative to it */
    setenv("CREDENTIALS_DIRECTORY", dir, 1);

    write_file("key", "sk_test_x\n");
    write_file("whsec", "whsec_abc\n");
    write_file("cbpw", "pw1\n");
    write_file("rkey", "rk_hook\n");

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


/* a provider of name with extra config; cleaned up by the caller */
static meter_conf_t *
provider(meter_provider_t *p, const char *name, const char *extra)
{
    char           err[512], buf[512];
    meter_conf_t  *cf;

    snprintf(buf, sizeof(buf), "%s", extra);
    cf = load_conf(name, buf);
    assert_int_equal(meter_provider_by_name(name, p), 0);
    if (p->init(p, cf, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }

    return cf;
}


/* ---------------------------------------------------------------- Stripe */


typedef struct {
    const char                 *names[4];
    const char                 *values[4];
} hdrs_t;


static const char *
hdr(void *data, const char *name)
{
    int      i;
    hdrs_t  *h;

    h = data;
    for (i = 0; i < 4 && h->names[i] != NULL; i++) {
        if (strcasecmp(h->names[i], name) == 0) {
            return h->values[i];
        }
    }

    return NULL;
}


static void
stripe_event(meter_provider_t *p, const char *body, const char *sig,
    meter_webhook_event_t *ev)
{
    hdrs_t               h;
    meter_webhook_req_t  req;

    memset(&h, 0, sizeof(h));
    h.names[0] = "Stripe-Signature";
    h.values[0] = sig;

    memset(&req, 0, sizeof(req));
    req.method = "POST";
    req.path = "/webhooks/stripe";
    req.body = body;
    req.body_len = strlen(body);
    req.header = hdr;
    req.data = &h;
    req.now = NOW;

    p->webhook(p, &req, ev);
}


static void
sign(const char *secret, long t, const char *body, char *out, size_t size)
{
    char  ts[24], mac[65];

    snprintf(ts, sizeof(ts), "%ld", t);
    assert_int_equal(meter_hmac_hex(secret, strlen(secret), ts, body,
                                    strlen(body), mac), 0);
    snprintf(out, size, "t=%s,v1=%s", ts, mac);
}


static const char  failed[] =
    "{\"id\":\"evt_1\",\"type\":\"invoice.payment_failed\","
    "\"created\":1763999990,\"data\":{\"object\":{\"id\":\"in_1\","
    "\"customer\":\"cus_1\",\"subscription\":\"sub_1\"}}}";


static void
test_stripe_signature(void **state)
{
    char                   sig[200], two[300];
    meter_conf_t          *cf;
    meter_provider_t       p;
    meter_webhook_event_t  ev;

    (void) state;

    cf = provider(&p, "stripe", "stripe.webhook_secret_file = whsec\n");

    sign("whsec_abc", NOW, failed, sig, sizeof(sig));
    stripe_event(&p, failed, sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_DELINQUENT);
    assert_string_equal(ev.event_id, "evt_1");
    assert_int_equal(ev.event_time, 1763999990);
    assert_string_equal(ev.provider_customer, "cus_1");
    assert_string_equal(ev.subscription, "sub_1");

    /* several v1 (secret roll): one matching is enough */
    snprintf(two, sizeof(two), "t=%d,v1=%064d,%s", NOW, 0,
             strchr(sig, ',') + 1);
    stripe_event(&p, failed, two, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_DELINQUENT);

    /* wrong secret, old, future, tampered, missing */
    sign("whsec_other", NOW, failed, sig, sizeof(sig));
    stripe_event(&p, failed, sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);
    assert_int_equal(ev.http_status, 400);

    sign("whsec_abc", NOW - 301, failed, sig, sizeof(sig));
    stripe_event(&p, failed, sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);

    sign("whsec_abc", NOW - 299, failed, sig, sizeof(sig));
    stripe_event(&p, failed, sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_DELINQUENT);

    sign("whsec_abc", NOW + 301, failed, sig, sizeof(sig));
    stripe_event(&p, failed, sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);

    sign("whsec_abc", NOW, "{}", sig, sizeof(sig));
    stripe_event(&p, failed, sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);

    stripe_event(&p, failed, NULL, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);

    /* verified but not JSON */
    sign("whsec_abc", NOW, "{\"id\":", sig, sizeof(sig));
    stripe_event(&p, "{\"id\":", sig, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);
    assert_int_equal(ev.http_status, 400);

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_stripe_event_kinds(void **state)
{
    char                   sig[200];
    size_t                 i;
    meter_conf_t          *cf;
    meter_provider_t       p;
    meter_webhook_event_t  ev;

    static const struct {
        const char        *body;
        meter_webhook_e    kind;
        const char        *sub;
    } cases[] = {
        { "{\"id\":\"e\",\"type\":\"invoice.paid\",\"created\":1,\"data\":"
          "{\"object\":{\"customer\":{\"id\":\"cus_2\"},\"parent\":"
          "{\"subscription_details\":{\"subscription\":\"sub_2\"}}}}}",
          METER_WEBHOOK_PAID, "sub_2" },
        { "{\"id\":\"e\",\"type\":\"customer.subscription.updated\","
          "\"created\":1,\"data\":{\"object\":{\"id\":\"sub_3\","
          "\"customer\":\"cus_3\",\"status\":\"unpaid\"}}}",
          METER_WEBHOOK_DELINQUENT, "sub_3" },
        { "{\"id\":\"e\",\"type\":\"customer.subscription.updated\","
          "\"created\":1,\"data\":{\"object\":{\"id\":\"sub_3\","
          "\"customer\":\"cus_3\",\"status\":\"active\"}}}",
          METER_WEBHOOK_PAID, "sub_3" },
        { "{\"id\":\"e\",\"type\":\"customer.subscription.updated\","
          "\"created\":1,\"data\":{\"object\":{\"id\":\"sub_3\","
          "\"customer\":\"cus_3\",\"status\":\"canceled\"}}}",
          METER_WEBHOOK_IGNORE, "sub_3" },
        { "{\"id\":\"e\",\"type\":\"customer.subscription.deleted\","
          "\"created\":1,\"data\":{\"object\":{\"id\":\"sub_3\"}}}",
          METER_WEBHOOK_IGNORE, "" },
        { "{\"id\":\"e\",\"type\":\"charge.succeeded\",\"created\":1,"
          "\"data\":{\"object\":{}}}", METER_WEBHOOK_IGNORE, "" },
        { "{\"type\":\"invoice.paid\",\"created\":1,\"data\":{\"object\":"
          "{}}}", METER_WEBHOOK_INVALID, "" },
    };

    (void) state;

    cf = provider(&p, "stripe", "stripe.webhook_secret_file = whsec\n");

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        sign("whsec_abc", NOW, cases[i].body, sig, sizeof(sig));
        stripe_event(&p, cases[i].body, sig, &ev);
        assert_int_equal(ev.kind, cases[i].kind);
        assert_string_equal(ev.subscription, cases[i].sub);
    }

    p.cleanup(&p);
    meter_conf_free(cf);
}


/* ------------------------------------------------------ Chargebee, Recurly */


static void
test_chargebee_basic_auth(void **state)
{
    hdrs_t                 h;
    meter_conf_t          *cf;
    meter_provider_t       p;
    meter_webhook_req_t    req;
    meter_webhook_event_t  ev;

    static const char  body[] =
        "{\"id\":\"ev_1\",\"occurred_at\":100,\"event_type\":"
        "\"payment_succeeded\",\"content\":{\"subscription\":{\"id\":\"s1\","
        "\"customer_id\":\"c1\",\"due_invoices_count\":0}}}";

    (void) state;

    cf = provider(&p, "chargebee", "chargebee.site = x\n"
                  "chargebee.webhook_user = u\n"
                  "chargebee.webhook_password_file = cbpw\n");

    memset(&h, 0, sizeof(h));
    memset(&req, 0, sizeof(req));
    req.body = body;
    req.body_len = strlen(body);
    req.header = hdr;
    req.data = &h;
    req.now = NOW;

    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);
    assert_int_equal(ev.http_status, 401);

    h.names[0] = "Authorization";
    h.values[0] = "Basic dTpwdzI=";                 /* u:pw2 */
    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);
    assert_int_equal(ev.http_status, 401);

    h.values[0] = "Basic dTpwdzE=";                 /* u:pw1 */
    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_PAID);
    assert_string_equal(ev.event_id, "ev_1");
    assert_int_equal(ev.event_time, 100);
    assert_string_equal(ev.subscription, "s1");

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_recurly_signature(void **state)
{
    char                   mac[65], sig[200];
    hdrs_t                 h;
    meter_conf_t          *cf;
    meter_provider_t       p;
    meter_webhook_req_t    req;
    meter_webhook_event_t  ev;

    static const char  body[] =
        "{\"id\":\"n1\",\"object_type\":\"charge_invoice\",\"event_type\":"
        "\"past_due\",\"event_time\":\"2025-11-24T16:00:00.123Z\","
        "\"account_code\":\"acme\"}";

    (void) state;

    cf = provider(&p, "recurly", "recurly.webhook_key_file = rkey\n");

    assert_int_equal(meter_hmac_hex("rk_hook", 7, "1764000000000", body,
                                    strlen(body), mac), 0);
    snprintf(sig, sizeof(sig), "1764000000000,%s", mac);

    memset(&h, 0, sizeof(h));
    h.names[0] = "recurly-signature";
    h.values[0] = sig;
    memset(&req, 0, sizeof(req));
    req.body = body;
    req.body_len = strlen(body);
    req.header = hdr;
    req.data = &h;
    req.now = NOW;

    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_DELINQUENT);
    assert_string_equal(ev.provider_customer, "acme");
    assert_int_equal(ev.event_time, 1764000000);

    sig[20] = sig[20] == 'a' ? 'b' : 'a';
    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);

    /* 10 minutes old */
    req.now = NOW + 600;
    snprintf(sig, sizeof(sig), "1764000000000,%s", mac);
    p.webhook(&p, &req, &ev);
    assert_int_equal(ev.kind, METER_WEBHOOK_INVALID);

    p.cleanup(&p);
    meter_conf_free(cf);
}


/* --------------------------------------------------------------- handling */


static int
handle_at(meter_provider_t *p, const char *path, const char *body,
    time_t now, char *out, size_t outlen)
{
    char                 sig[200];
    hdrs_t               h;
    meter_redis_t        r;
    meter_webhook_req_t  req;

    sign("whsec_abc", now, body, sig, sizeof(sig));
    memset(&h, 0, sizeof(h));
    h.names[0] = "Stripe-Signature";
    h.values[0] = sig;

    memset(&req, 0, sizeof(req));
    req.method = "POST";
    req.path = path;
    req.body = body;
    req.body_len = strlen(body);
    req.header = hdr;
    req.data = &h;
    req.now = now;

    memset(&r, 0, sizeof(r));
    r.ctx = (redisContext *) &r;        /* "connected"; never used */

    return meter_webhook_handle(p, &r, &req, out, outlen);
}


static int
handle(meter_provider_t *p, const char *body, char *out, size_t outlen)
{
    return handle_at(p, "/webhooks/stripe", body, NOW, out, outlen);
}


static void
expect_lookup(int rc, const char *customer)
{
    expect_string(__wrap_meter_redis_argv, line, "EXISTS mtr:wh:stripe:evt_1");
    will_return(__wrap_meter_redis_argv, REDIS_REPLY_INTEGER);
    will_return(__wrap_meter_redis_argv, 0);
    expect_string(__wrap_meter_gov_find_customer, provider_customer, "cus_1");
    expect_string(__wrap_meter_gov_find_customer, subscription, "sub_1");
    will_return(__wrap_meter_gov_find_customer, rc);
    will_return(__wrap_meter_gov_find_customer, customer);
}


static void
test_handle(void **state)
{
    char               out[512];
    meter_conf_t      *cf;
    meter_provider_t   p;

    (void) state;

    cf = provider(&p, "stripe", "stripe.webhook_secret_file = whsec\n");

    /* applied, then marked */
    expect_lookup(1, "acme");
    expect_string(__wrap_meter_gov_set_status, customer, "acme");
    expect_value(__wrap_meter_gov_set_status, delinquent, 1);
    expect_value(__wrap_meter_gov_set_status, event_time, 1763999990);
    will_return(__wrap_meter_gov_set_status, 1);
    expect_string(__wrap_meter_redis_argv, line,
                  "SET mtr:wh:stripe:evt_1 1 NX EX 2592000");
    will_return(__wrap_meter_redis_argv, REDIS_REPLY_STATUS);
    will_return(__wrap_meter_redis_argv, 0);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 200);
    assert_string_equal(out, "{\"ok\":true,\"changed\":true}");

    /* delivered before */
    expect_string(__wrap_meter_redis_argv, line, "EXISTS mtr:wh:stripe:evt_1");
    will_return(__wrap_meter_redis_argv, REDIS_REPLY_INTEGER);
    will_return(__wrap_meter_redis_argv, 1);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 200);
    assert_string_equal(out, "{\"ok\":true,\"duplicate\":true}");

    /* the status could not be stored: 503, not marked */
    expect_lookup(1, "acme");
    expect_string(__wrap_meter_gov_set_status, customer, "acme");
    expect_value(__wrap_meter_gov_set_status, delinquent, 1);
    expect_value(__wrap_meter_gov_set_status, event_time, 1763999990);
    will_return(__wrap_meter_gov_set_status, -1);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 503);

    /* unchanged (older or a retry): projected again, then marked */
    expect_lookup(1, "acme");
    expect_string(__wrap_meter_gov_set_status, customer, "acme");
    expect_value(__wrap_meter_gov_set_status, delinquent, 1);
    expect_value(__wrap_meter_gov_set_status, event_time, 1763999990);
    will_return(__wrap_meter_gov_set_status, 0);
    expect_string(__wrap_meter_gov_project, customer, "acme");
    will_return(__wrap_meter_gov_project, 0);
    expect_string(__wrap_meter_redis_argv, line,
                  "SET mtr:wh:stripe:evt_1 1 NX EX 2592000");
    will_return(__wrap_meter_redis_argv, REDIS_REPLY_STATUS);
    will_return(__wrap_meter_redis_argv, 0);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 200);
    assert_string_equal(out, "{\"ok\":true,\"changed\":false}");

    /* marking failed after applying: 503, the redelivery re-applies */
    expect_lookup(1, "acme");
    expect_string(__wrap_meter_gov_set_status, customer, "acme");
    expect_value(__wrap_meter_gov_set_status, delinquent, 1);
    expect_value(__wrap_meter_gov_set_status, event_time, 1763999990);
    will_return(__wrap_meter_gov_set_status, 1);
    expect_string(__wrap_meter_redis_argv, line,
                  "SET mtr:wh:stripe:evt_1 1 NX EX 2592000");
    will_return(__wrap_meter_redis_argv, REDIS_REPLY_ERROR);
    will_return(__wrap_meter_redis_argv, 0);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 503);

    /* unknown customer: acknowledged, nothing changed */
    expect_lookup(0, NULL);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 200);

    /* lookup failed */
    expect_lookup(-1, NULL);
    assert_int_equal(handle(&p, failed, out, sizeof(out)), 503);

    p.cleanup(&p);
    meter_conf_free(cf);
}


/* a body dated ten years ahead is ordered as received; one within the
 * skew keeps its time */
static void
test_future_event_time(void **state)
{
    char               out[512], body[512];
    size_t             i;
    meter_conf_t      *cf;
    meter_provider_t   p;

    static const struct {
        long long      created;
        long long      ordered;
    } cases[] = {
        { NOW + 10LL * 365 * 86400, NOW },
        { NOW + METER_WEBHOOK_SKEW_S + 1, NOW },
        { NOW + METER_WEBHOOK_SKEW_S, NOW + METER_WEBHOOK_SKEW_S },
        { NOW - 5, NOW - 5 },
        { 0, NOW },
    };

    (void) state;

    cf = provider(&p, "stripe", "stripe.webhook_secret_file = whsec\n");

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(body, sizeof(body), "{\"id\":\"evt_1\",\"type\":"
                 "\"invoice.payment_failed\",\"created\":%lld,\"data\":"
                 "{\"object\":{\"id\":\"in_1\",\"customer\":\"cus_1\","
                 "\"subscription\":\"sub_1\"}}}", cases[i].created);

        expect_lookup(1, "acme");
        expect_string(__wrap_meter_gov_set_status, customer, "acme");
        expect_value(__wrap_meter_gov_set_status, delinquent, 1);
        expect_value(__wrap_meter_gov_set_status, event_time,
                     cases[i].ordered);
        will_return(__wrap_meter_gov_set_status, 1);
        expect_string(__wrap_meter_redis_argv, line,
                      "SET mtr:wh:stripe:evt_1 1 NX EX 2592000");
        will_return(__wrap_meter_redis_argv, REDIS_REPLY_STATUS);
        will_return(__wrap_meter_redis_argv, 0);
        assert_int_equal(handle(&p, body, out, sizeof(out)), 200);
    }

    p.cleanup(&p);
    meter_conf_free(cf);
}


static void
test_routes(void **state)
{
    char               out[512];
    meter_conf_t      *cf;
    meter_provider_t   p;

    (void) state;

    cf = provider(&p, "stripe", "stripe.webhook_secret_file = whsec\n");

    assert_int_equal(handle_at(&p, "/webhooks/recurly", failed, NOW, out,
                               sizeof(out)), 404);
    assert_string_equal(out, "{\"error\":\"no webhooks here\"}");
    assert_int_equal(handle_at(&p, "/webhooks/stripe/x", failed, NOW, out,
                               sizeof(out)), 404);

    p.cleanup(&p);
    meter_conf_free(cf);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_stripe_signature),
        cmocka_unit_test(test_stripe_event_kinds),
        cmocka_unit_test(test_chargebee_basic_auth),
        cmocka_unit_test(test_recurly_signature),
        cmocka_unit_test(test_handle),
        cmocka_unit_test(test_future_event_time),
        cmocka_unit_test(test_routes),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
