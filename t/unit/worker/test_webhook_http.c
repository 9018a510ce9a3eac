
/*
 * Copyright (C) nginx-meter authors
 *
 * webhook_http.c: the listener itself, started as meter-worker starts it
 * (meter_webhook_start) on a unix socket, and libcurl as the client.  Redis
 * is configured on a socket that does not exist, so a delivery that passes
 * verification ends in 503 "storage unavailable": that answer proves the
 * whole body reached the provider's signature check.  Bodies of 20 KB,
 * 200 KB and exactly 1 MB (the limit), and 1 MB + 1 (413), run under ASan.
 */


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

#include <curl/curl.h>

#include "config.h"
#include "provider_util.h"
#include "util.h"
#include "webhook.h"


static char  dir[] = "/tmp/test_webhook_http_XXXXXX";
static char  sock[300];


typedef struct {
    meter_conf_t               *cf;
    meter_webhook_srv_t        *srv;
} ctx_t;


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


static size_t
collect(char *ptr, size_t size, size_t n, void *data)
{
    meter_str_t  *s;

    s = data;
    assert_int_equal(meter_str_add(s, ptr, size * n), 0);

    return size * n;
}


/* POSTs body to path with a Stripe-Signature; the status, answer in out */
static long
post_expect(const char *path, const char *body, size_t len, const char *sig,
    int expect, meter_str_t *out)
{
    char                url[256], h[300];
    long                status;
    CURL               *c;
    CURLcode            rc;
    struct curl_slist  *hs;

    c = curl_easy_init();
    assert_non_null(c);

    snprintf(url, sizeof(url), "http://localhost%s", path);
    hs = curl_slist_append(NULL, "Content-Type: application/json");
    /* "100 Continue" only when asked for: providers do not wait for it */
    hs = curl_slist_append(hs, expect ? "Expect: 100-continue" : "Expect:");
    if (sig != NULL) {
        snprintf(h, sizeof(h), "Stripe-Signature: %s", sig);
        hs = curl_slist_append(hs, h);
    }

    curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, sock);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hs);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) len);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 20L);

    rc = curl_easy_perform(c);
    if (rc != CURLE_OK) {
        fail_msg("curl: %s", curl_easy_strerror(rc));
    }

    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hs);
    curl_easy_cleanup(c);

    return status;
}


static long
post(const char *path, const char *body, size_t len, const char *sig,
    meter_str_t *out)
{
    return post_expect(path, body, len, sig, 0, out);
}


/* a Stripe event padded to exactly size bytes */
static char *
event(size_t size)
{
    char    *b;
    size_t   n;

    static const char  head[] =
        "{\"id\":\"evt_big\",\"type\":\"invoice.payment_failed\","
        "\"created\":1,\"data\":{\"object\":{\"customer\":\"cus_1\","
        "\"subscription\":\"sub_1\"}},\"padding\":\"";

    b = malloc(size + 1);
    assert_non_null(b);
    n = strlen(head);
    assert_true(size > n + 2);
    memcpy(b, head, n);
    memset(b + n, 'x', size - n - 2);
    memcpy(b + size - 2, "\"}", 2);
    b[size] = '\0';

    return b;
}


static void
sign(const char *body, size_t len, char *out, size_t size)
{
    char  ts[24], mac[65];

    snprintf(ts, sizeof(ts), "%lld", (long long) time(NULL));
    assert_int_equal(meter_hmac_hex("whsec_abc", 9, ts, body, len, mac), 0);
    snprintf(out, size, "t=%s,v1=%s", ts, mac);
}


static int
setup(void **state)
{
    char    conf[1024], path[300], err[512];
    ctx_t  *x;

    if (mkdtemp(dir) == NULL) {
        return -1;
    }

    setenv("CREDENTIALS_DIRECTORY", dir, 1);
    write_file("key", "sk_test_x\n");
    write_file("whsec", "whsec_abc\n");

    snprintf(sock, sizeof(sock), "%s/wh.sock", dir);
    snprintf(conf, sizeof(conf),
             "redis = unix:%s/no-redis.sock\nredis.timeout = 200ms\n"
             "provider = stripe\nstripe.api_key_file = key\n"
             "stripe.webhook_secret_file = whsec\n"
             "webhook.listen = unix:%s\nwebhook.timeout = 5s\n", dir, sock);
    write_file("worker.conf", conf);

    x = calloc(1, sizeof(ctx_t));
    assert_non_null(x);

    snprintf(path, sizeof(path), "%s/worker.conf", dir);
    x->cf = meter_conf_load(path, err, sizeof(err));
    if (x->cf == NULL) {
        fail_msg("%s", err);
    }

    if (meter_webhook_start(x->cf, &x->srv, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }

    assert_non_null(x->srv);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    *state = x;

    return 0;
}


static int
teardown(void **state)
{
    char    cmd[300];
    ctx_t  *x;

    x = *state;
    meter_webhook_stop(x->srv);
    meter_conf_free(x->cf);
    free(x);
    curl_global_cleanup();

    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);

    return system(cmd) == 0 ? 0 : -1;
}


/* verified deliveries of every size up to the limit reach storage (503
 * here); a tampered one is refused by the signature check (400) */
static void
test_big_signed_deliveries(void **state)
{
    char         sig[200], *b;
    size_t       i;
    meter_str_t  out;

    static const size_t  sizes[] = {
        200, 16128, 16328, 20 * 1024, 200 * 1024, 1024 * 1024
    };

    (void) state;

    for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        b = event(sizes[i]);
        sign(b, sizes[i], sig, sizeof(sig));

        memset(&out, 0, sizeof(out));
        assert_int_equal(post("/webhooks/stripe", b, sizes[i], sig, &out),
                         503);
        assert_string_equal(out.data, "{\"error\":\"storage unavailable\"}");
        meter_str_free(&out);

        b[sizes[i] / 2] = 'y';
        memset(&out, 0, sizeof(out));
        assert_int_equal(post("/webhooks/stripe", b, sizes[i], sig, &out),
                         400);
        meter_str_free(&out);

        free(b);
    }
}


static void
test_over_the_limit(void **state)
{
    char         sig[200], *b;
    size_t       n;
    meter_str_t  out;

    (void) state;

    n = 1024 * 1024 + 1;
    b = event(n);
    sign(b, n, sig, sizeof(sig));

    memset(&out, 0, sizeof(out));
    assert_int_equal(post("/webhooks/stripe", b, n, sig, &out), 413);
    assert_string_equal(out.data, "{\"error\":\"body too large\"}");
    meter_str_free(&out);

    /* a client that waits for "100 Continue" is answered before it sends */
    memset(&out, 0, sizeof(out));
    assert_int_equal(post_expect("/webhooks/stripe", b, n, sig, 1, &out),
                     413);
    assert_string_equal(out.data, "{\"error\":\"body too large\"}");
    meter_str_free(&out);
    free(b);

    /* and it still serves */
    memset(&out, 0, sizeof(out));
    assert_int_equal(post("/webhooks/other", "{}", 2, NULL, &out), 404);
    meter_str_free(&out);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_big_signed_deliveries),
        cmocka_unit_test(test_over_the_limit),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
