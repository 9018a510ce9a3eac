
/*
 * Copyright (C) nginx-meter authors
 *
 * portal.c without Redis (a meter_redis_t never connected): the portal.*
 * settings, and every refusal made before Redis is asked, each an RFC
 * 9457 problem; a valid sign-up then gets 503 with Retry-After.
 */


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

#include <cjson/cJSON.h>

#include "config.h"
#include "portal.h"
#include "redis.h"


static char  dir[] = "/tmp/test_portal_XXXXXX";


typedef struct {
    const char                 *ctype;
    const char                 *secret;
} headers_t;


static const char *
header(void *data, const char *name)
{
    headers_t  *h;

    h = data;

    if (strcasecmp(name, "Content-Type") == 0) {
        return h->ctype;
    }

    if (strcasecmp(name, "X-Portal-Secret") == 0) {
        return h->secret;
    }

    return NULL;
}


/* loads a config of these portal lines: 0, or -1 with err */
static int
load(const char *lines, meter_conf_t **cf, meter_portal_t **p, char *err,
    size_t errlen)
{
    char   path[300];
    FILE  *f;

    snprintf(path, sizeof(path), "%s/worker.conf", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "redis = unix:%s/none.sock\nprovider = file\n"
            "file.path = %s/out.jsonl\n%s", dir, dir, lines);
    fclose(f);

    *cf = meter_conf_load(path, err, errlen);
    if (*cf == NULL) {
        fail_msg("%s", err);
    }

    return meter_portal_load(*cf, p, err, errlen);
}


/* the problem's "type" suffix, after checking its shape */
static void
expect_problem(const meter_portal_resp_t *resp, int status, const char *kind)
{
    char    type[96];
    cJSON  *j;

    assert_int_equal(resp->status, status);
    assert_string_equal(resp->ctype, "application/problem+json");
    assert_string_equal(resp->cache, "no-store");

    j = cJSON_Parse(resp->body);
    assert_non_null(j);
    snprintf(type, sizeof(type), "urn:nginx-meter:problem:%s", kind);
    assert_string_equal(cJSON_GetObjectItem(j, "type")->valuestring, type);
    assert_int_equal(cJSON_GetObjectItem(j, "status")->valueint, status);
    assert_true(cJSON_IsString(cJSON_GetObjectItem(j, "title")));
    assert_true(strlen(cJSON_GetObjectItem(j, "detail")->valuestring) > 0);
    cJSON_Delete(j);
}


static void
handle(meter_portal_t *p, meter_conf_t *cf, const char *method,
    const char *path, const char *body, headers_t *h,
    meter_portal_resp_t *resp)
{
    meter_redis_t        r;
    meter_webhook_req_t  req;

    memset(&r, 0, sizeof(r));
    memset(&req, 0, sizeof(req));
    req.method = method;
    req.path = path;
    req.body = body;
    req.body_len = strlen(body);
    req.header = header;
    req.data = h;
    req.now = time(NULL);

    meter_portal_handle(p, cf, &r, &req, resp);
}


static void
test_settings(void **state)
{
    char             err[512];
    meter_conf_t    *cf;
    meter_portal_t  *p;

    static const char  *bad[][2] = {
        { "portal.register = yes\n", "\"portal.register\" must be on" },
        { "portal.usage = 1\n", "\"portal.usage\" must be on" },
        { "portal.register = on\nportal.max_body = 63\n", "max_body" },
        { "portal.register = on\nportal.max_body = 4k\n", "max_body" },
        { "portal.register = on\nportal.email_domains = ,\n", "domains" },
        { "portal.register = on\nportal.email_domains = a@b.com\n",
          "domains" },
        { "portal.usage = on\nportal.grace = -\n", "portal.grace" },
        { "portal.usage = on\nportal.key_header = X:Key\n", "key_header" },
        { "portal.usage = on\nportal.usage_max_age = 3601\n", "max_age" },
    };
    size_t  i;

    (void) state;

    /* off by default: no portal at all */
    assert_int_equal(load("", &cf, &p, err, sizeof(err)), 0);
    assert_null(p);
    meter_conf_free(cf);

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_int_equal(load(bad[i][0], &cf, &p, err, sizeof(err)), -1);
        if (strstr(err, bad[i][1]) == NULL) {
            fail_msg("%s: \"%s\"", bad[i][0], err);
        }

        assert_null(p);
        meter_conf_free(cf);
    }

    assert_int_equal(load("portal.register = on\nportal.max_body = 64\n"
                          "portal.email_domains = A.example b.example,"
                          "c.example\n", &cf, &p, err, sizeof(err)), 0);
    assert_non_null(p);
    assert_int_equal(meter_portal_max_body(p), 64);
    meter_portal_free(p);
    meter_conf_free(cf);
}


static void
test_refusals_before_redis(void **state)
{
    char                  err[512], line[600];
    size_t                i;
    headers_t             h;
    meter_conf_t         *cf;
    meter_portal_t       *p;
    meter_portal_resp_t   resp;

    static const struct {
        const char  *method, *path, *ctype, *secret, *body, *kind;
        int          status;
    } cases[] = {
        { "GET", "/register", NULL, NULL, "", "method", 405 },
        { "POST", "/usage", NULL, NULL, "", "method", 405 },
        { "POST", "/register", "application/json", NULL,
          "{\"email\":\"a@x.example\"}", "portal_secret", 403 },
        { "POST", "/register", "application/json", "s3cre",
          "{\"email\":\"a@x.example\"}", "portal_secret", 403 },
        { "POST", "/register", "text/plain", "s3cret",
          "{\"email\":\"a@x.example\"}", "media_type", 415 },
        { "POST", "/register", "application/jsonx", "s3cret",
          "{\"email\":\"a@x.example\"}", "media_type", 415 },
        { "POST", "/register", "application/json", "s3cret", "{",
          "malformed_json", 400 },
        { "POST", "/register", "application/json", "s3cret", "null",
          "malformed_json", 400 },
        { "POST", "/register", "application/json; charset=utf-8", "s3cret",
          "{\"email\":true}", "invalid_field", 422 },
        { "POST", "/register", "application/json", "s3cret",
          "{\"email\":\"@x.example\"}", "invalid_email", 422 },
        { "POST", "/register", "application/json", "s3cret",
          "{\"email\":\"a@y.example\"}", "email_domain", 403 },
        { "POST", "/register", "application/json", "s3cret",
          "{\"email\":\"a@x.example\",\"last_name\":\"\\u001b[2J\"}",
          "invalid_name", 422 },
        /* valid: Redis is what is missing */
        { "POST", "/register", "application/json", "s3cret",
          "{\"email\":\"a@X.example\",\"first_name\":\"A\"}",
          "unavailable", 503 },
        { "GET", "/usage", NULL, NULL, "", "unavailable", 503 },
    };

    (void) state;

    snprintf(line, sizeof(line), "portal.register = on\nportal.usage = on\n"
             "portal.secret_file = %s/secret\n"
             "portal.email_domains = x.example\n", dir);
    assert_int_equal(load(line, &cf, &p, err, sizeof(err)), 0);

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        h.ctype = cases[i].ctype;
        h.secret = cases[i].secret;
        handle(p, cf, cases[i].method, cases[i].path, cases[i].body, &h,
               &resp);
        expect_problem(&resp, cases[i].status, cases[i].kind);

        if (cases[i].status == 405) {
            assert_non_null(resp.allow);
        }

        if (cases[i].status == 503) {
            assert_true(resp.retry_after > 0);
        }

        meter_portal_resp_free(&resp);
    }

    /* a portal path while the portal is off */
    memset(&h, 0, sizeof(h));
    handle(NULL, cf, "POST", "/register", "{}", &h, &resp);
    expect_problem(&resp, 404, "not_enabled");
    meter_portal_resp_free(&resp);

    /* refusals of the head */
    meter_portal_refuse(p, 413, &resp);
    expect_problem(&resp, 413, "body_too_large");
    assert_non_null(strstr(resp.body, "4096 bytes"));
    meter_portal_resp_free(&resp);
    meter_portal_refuse(p, 411, &resp);
    expect_problem(&resp, 411, "length_required");
    meter_portal_resp_free(&resp);

    assert_true(meter_portal_path("/register"));
    assert_true(meter_portal_path("/usage"));
    assert_false(meter_portal_path("/register/"));
    assert_false(meter_portal_path("/webhooks/stripe"));

    meter_portal_free(p);
    meter_conf_free(cf);
}


static int
setup(void **state)
{
    char   path[300];
    FILE  *f;

    (void) state;

    if (mkdtemp(dir) == NULL) {
        return -1;
    }

    snprintf(path, sizeof(path), "%s/secret", dir);
    f = fopen(path, "w");
    if (f == NULL) {
        return -1;
    }

    fputs("s3cret\n", f);
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


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_settings),
        cmocka_unit_test(test_refusals_before_redis),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
