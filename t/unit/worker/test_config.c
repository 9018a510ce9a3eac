
/*
 * Copyright (C) nginx-meter authors
 *
 * config.c: good files, defaults, bad lines, unknown keys, durations,
 * secrets.
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "redis.h"
#include "util.h"


typedef struct {
    char    dir[64];
    char    path[128];
    char    err[1024];
} test_ctx_t;


static int
setup(void **state)
{
    test_ctx_t  *t;

    t = calloc(1, sizeof(test_ctx_t));
    snprintf(t->dir, sizeof(t->dir), "/tmp/meter-test-config-XXXXXX");
    assert_non_null(mkdtemp(t->dir));
    snprintf(t->path, sizeof(t->path), "%s/worker.conf", t->dir);
    *state = t;

    return 0;
}


static int
teardown(void **state)
{
    test_ctx_t  *t;
    char         cmd[128];

    t = *state;
    snprintf(cmd, sizeof(cmd), "rm -rf %s", t->dir);
    assert_int_equal(system(cmd), 0);
    free(t);

    return 0;
}


static meter_conf_t *
load(test_ctx_t *t, const char *text)
{
    FILE  *f;

    f = fopen(t->path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);

    t->err[0] = '\0';

    return meter_conf_load(t->path, t->err, sizeof(t->err));
}


static void
test_good(void **state)
{
    test_ctx_t    *t;
    meter_conf_t  *cf;

    t = *state;

    cf = load(t,
        "# a comment\n"
        "\n"
        "redis = 10.0.0.5:6380\n"
        "redis.db = 3\n"
        "provider = stripe\n"
        "grace = 90s\n"
        "retention = 2d\n"
        "   stripe.api_key_file = stripe-key   \n"
        "stripe.base_url = http://127.0.0.1:1/\n"
        "meter.calls = api_calls\n"
        "log_level = debug\n");

    assert_non_null(cf);
    assert_string_equal(cf->redis_host, "10.0.0.5");
    assert_int_equal(cf->redis_port, 6380);
    assert_null(cf->redis_unix);
    assert_int_equal(cf->redis_db, 3);
    assert_string_equal(cf->provider, "stripe");
    assert_int_equal(cf->grace, 90);
    assert_int_equal(cf->retention, 2 * 86400);
    assert_int_equal(cf->report_period, 3600);
    /* Stripe refuses events older than 35 days */
    assert_int_equal(cf->max_age, 35 * 86400);
    assert_string_equal(meter_conf_get(cf, "stripe.api_key_file"),
                        "stripe-key");
    assert_string_equal(meter_conf_get(cf, "stripe.base_url"),
                        "http://127.0.0.1:1/");
    assert_null(meter_conf_get(cf, "stripe.mode"));
    assert_string_equal(meter_conf_meter(cf, "calls"), "api_calls");
    assert_null(meter_conf_meter(cf, "bytes"));

    meter_conf_free(cf);
}


static void
test_defaults(void **state)
{
    test_ctx_t    *t;
    meter_conf_t  *cf;

    t = *state;

    cf = load(t, "file.path = /tmp/x.jsonl\n");
    assert_non_null(cf);
    assert_string_equal(cf->provider, "file");
    assert_string_equal(cf->redis_host, "127.0.0.1");
    assert_int_equal(cf->redis_port, 6379);
    assert_int_equal(cf->grace, 300);
    assert_int_equal(cf->retention, 7 * 86400);
    assert_int_equal(cf->report_period, 3600);
    assert_int_equal(cf->max_age, 0);
    assert_int_equal(cf->redis_timeout_ms, 5000);
    meter_conf_free(cf);

    /* Chargebee keeps at most 5000 usages per subscription: days */
    cf = load(t, "provider = chargebee\n");
    assert_non_null(cf);
    assert_int_equal(cf->report_period, 86400);
    meter_conf_free(cf);

    cf = load(t, "provider = chargebee\nreport_period = hour\n");
    assert_non_null(cf);
    assert_int_equal(cf->report_period, 3600);
    meter_conf_free(cf);

    cf = load(t, "redis = unix:/run/redis/redis.sock\nprovider = http\n"
                 "redis.timeout = 250ms\n");
    assert_non_null(cf);
    assert_null(cf->redis_host);
    assert_string_equal(cf->redis_unix, "/run/redis/redis.sock");
    assert_int_equal(cf->redis_timeout_ms, 250);
    meter_conf_free(cf);
}


static void
expect_error(test_ctx_t *t, const char *text, const char *msg)
{
    char          want[512];
    meter_conf_t  *cf;

    cf = load(t, text);
    assert_null(cf);

    snprintf(want, sizeof(want), "%s%s", t->path, msg);
    assert_string_equal(t->err, want);
}


static void
test_errors(void **state)
{
    test_ctx_t  *t;

    t = *state;

    expect_error(t, "file.path = /x\n\nfoo = 1\n",
                 ":3: unknown key \"foo\"");
    expect_error(t, "file.path = /x\nno equals sign\n",
                 ":2: expected \"key = value\"");
    expect_error(t, "file.path = /x\ngrace = 5 minutes\n",
                 ":2: invalid value \"5 minutes\" for \"grace\"");
    expect_error(t, "file.path = /x\ngrace = -5m\n",
                 ":2: invalid value \"-5m\" for \"grace\"");
    expect_error(t, "provider = paypal\n",
                 ":1: invalid value \"paypal\" for \"provider\"");
    expect_error(t, "redis = localhost\nfile.path = /x\n",
                 ":1: invalid value \"localhost\" for \"redis\"");
    expect_error(t, "redis = h:99999\nfile.path = /x\n",
                 ":1: invalid value \"h:99999\" for \"redis\"");
    expect_error(t, "file.path = /x\nreport_period = week\n",
                 ":2: invalid value \"week\" for \"report_period\"");
    expect_error(t, "file.path = /x\nmeter.bad|name = x\n",
                 ":2: invalid meter name in key \"meter.bad|name\"");
    expect_error(t, "file.path = /x\nfile.path = /y\n",
                 ":2: duplicate key \"file.path\" (first on line 1)");
    expect_error(t, "file.path = /x\nstripe. = x\n",
                 ":2: unknown key \"stripe.\"");
    expect_error(t, "file.path = /x\n = x\n",
                 ":2: missing key before \"=\"");
    expect_error(t, "grace = 1m\n",
                 ": \"file.path\" is required with \"provider = file\"");
}


static void
test_durations(void **state)
{
    int64_t  ms;

    (void) state;

    assert_int_equal(meter_parse_duration("30s", &ms), 0);
    assert_int_equal(ms, 30000);
    assert_int_equal(meter_parse_duration("5m", &ms), 0);
    assert_int_equal(ms, 300000);
    assert_int_equal(meter_parse_duration("1h", &ms), 0);
    assert_int_equal(ms, 3600000);
    assert_int_equal(meter_parse_duration("7d", &ms), 0);
    assert_int_equal(ms, 604800000);
    assert_int_equal(meter_parse_duration("500ms", &ms), 0);
    assert_int_equal(ms, 500);
    assert_int_equal(meter_parse_duration("12", &ms), 0);
    assert_int_equal(ms, 12000);
    assert_int_equal(meter_parse_duration("1.5s", &ms), 0);
    assert_int_equal(ms, 1500);

    assert_int_equal(meter_parse_duration("", &ms), -1);
    assert_int_equal(meter_parse_duration("5x", &ms), -1);
    assert_int_equal(meter_parse_duration("m", &ms), -1);
    assert_int_equal(meter_parse_duration("-1s", &ms), -1);
    assert_int_equal(meter_parse_duration(" 5s", &ms), -1);
    assert_int_equal(meter_parse_duration("5 s", &ms), -1);
}


static void
test_secret(void **state)
{
    test_ctx_t    *t;
    meter_conf_t  *cf;
    FILE          *f;
    char           path[192], buf[64], err[512], conf[512];

    t = *state;

    snprintf(path, sizeof(path), "%s/key", t->dir);
    f = fopen(path, "w");
    fputs("sk_test_123\n", f);
    fclose(f);

    snprintf(conf, sizeof(conf), "provider = stripe\n"
             "stripe.api_key_file = %s\nstripe.other_file = key\n"
             "stripe.missing_file = nope\n", path);
    cf = load(t, conf);
    assert_non_null(cf);

    /* absolute */
    unsetenv("CREDENTIALS_DIRECTORY");
    assert_int_equal(meter_conf_secret(cf, "stripe.api_key_file", buf,
                                       sizeof(buf), err, sizeof(err)), 0);
    assert_string_equal(buf, "sk_test_123");

    /* relative to $CREDENTIALS_DIRECTORY (systemd LoadCredential=) */
    setenv("CREDENTIALS_DIRECTORY", t->dir, 1);
    assert_int_equal(meter_conf_secret(cf, "stripe.other_file", buf,
                                       sizeof(buf), err, sizeof(err)), 0);
    assert_string_equal(buf, "sk_test_123");

    /* errors name the key and its line, never its value (it may be the
     * secret itself) nor the content */
    assert_int_equal(meter_conf_secret(cf, "stripe.missing_file", buf,
                                       sizeof(buf), err, sizeof(err)), -1);
    assert_non_null(strstr(err, ":4: \"stripe.missing_file\": cannot open "
                            "the file it names (in $CREDENTIALS_DIRECTORY): "
                            "No such file or directory"));
    assert_null(strstr(err, "nope"));
    assert_null(strstr(err, "sk_test"));

    assert_int_equal(meter_conf_secret(cf, "stripe.unset_file", buf,
                                       sizeof(buf), err, sizeof(err)), -1);
    assert_non_null(strstr(err, "\"stripe.unset_file\" is required"));

    unsetenv("CREDENTIALS_DIRECTORY");
    meter_conf_free(cf);
}


/* the secret itself put into a *_file key: no error shows any of it */
static void
test_secret_in_file_key(void **state)
{
    size_t         i, k;
    test_ctx_t    *t;
    meter_conf_t  *cf;
    char           buf[64], err[512], conf[512], part[9];

    static const char  secret[] = "sk_live_51HtQ7xSecretValue0123456789";

    t = *state;

    snprintf(conf, sizeof(conf), "provider = stripe\n"
             "stripe.api_key_file = %s\nredis.password_file = %s\n",
             secret, secret);
    cf = load(t, conf);
    assert_non_null(cf);

    for (i = 0; i < 2; i++) {
        if (i == 0) {
            setenv("CREDENTIALS_DIRECTORY", t->dir, 1);
        } else {
            unsetenv("CREDENTIALS_DIRECTORY");
        }

        assert_int_equal(meter_conf_secret(cf, "stripe.api_key_file", buf,
                                           sizeof(buf), err, sizeof(err)),
                         -1);
        assert_non_null(strstr(err, ":2: \"stripe.api_key_file\": cannot "
                                "open the file it names"));
        assert_non_null(strstr(err, "not the secret itself"));

        /* no 8 characters of it in a row */
        for (k = 0; k + 8 <= strlen(secret); k++) {
            memcpy(part, secret + k, 8);
            part[8] = '\0';
            assert_null(strstr(err, part));
        }

        assert_int_equal(meter_read_secret(cf->redis_password_file, buf,
                                           sizeof(buf), err, sizeof(err)),
                         -1);
        assert_null(strstr(err, "sk_live_"));
        assert_null(strstr(err, "Secret"));
    }

    /* an empty or too long file: named by the key only */
    assert_int_equal(meter_read_secret("/dev/null", buf, sizeof(buf), err,
                                       sizeof(err)), -1);
    assert_string_equal(err, "the file it names is empty");

    meter_conf_free(cf);
}


/* redis = sentinel://h:p,h:p/NAME: kept whole, WAIT 1 by default */
static void
test_sentinel(void **state)
{
    test_ctx_t         *t;
    meter_conf_t       *cf;
    meter_sentinels_t   sl;

    t = *state;

    cf = load(t, "redis = sentinel://10.0.0.1:26379,sen.example:26380/mm\n"
                 "file.path = /x\n");
    assert_non_null(cf);
    assert_string_equal(cf->redis_host,
                        "sentinel://10.0.0.1:26379,sen.example:26380/mm");
    assert_null(cf->redis_unix);
    assert_int_equal(cf->redis_wait, 1);
    assert_int_equal(meter_sentinel_parse(cf->redis_host, &sl), 0);
    assert_int_equal(sl.n, 2);
    assert_string_equal(sl.host[0], "10.0.0.1");
    assert_int_equal(sl.port[0], 26379);
    assert_string_equal(sl.host[1], "sen.example");
    assert_int_equal(sl.port[1], 26380);
    assert_string_equal(sl.master, "mm");
    meter_conf_free(cf);

    cf = load(t, "redis = sentinel://10.0.0.1:26379/mm\nredis.wait = 0\n"
                 "file.path = /x\n");
    assert_non_null(cf);
    assert_int_equal(cf->redis_wait, 0);
    meter_conf_free(cf);

    cf = load(t, "redis = 127.0.0.1:6379\nfile.path = /x\n");
    assert_non_null(cf);
    assert_int_equal(cf->redis_wait, 0);
    meter_conf_free(cf);

    assert_int_equal(meter_sentinel_parse("sentinel://h:1/", &sl), -1);
    assert_int_equal(meter_sentinel_parse("sentinel:///mm", &sl), -1);
    assert_int_equal(meter_sentinel_parse("sentinel://h/mm", &sl), -1);
    assert_int_equal(meter_sentinel_parse("sentinel://h:0/mm", &sl), -1);
    assert_int_equal(meter_sentinel_parse("sentinel://h:1,/mm", &sl), -1);
    assert_int_equal(meter_sentinel_parse("sentinel://h:1/m/x", &sl), -1);
    assert_int_equal(meter_sentinel_parse("sentinel://:1/mm", &sl), -1);
    assert_int_equal(meter_sentinel_parse(
        "sentinel://a:1,a:2,a:3,a:4,a:5,a:6,a:7,a:8,a:9/mm", &sl), -1);
    assert_int_equal(meter_sentinel_parse("h:1/mm", &sl), -1);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test_setup_teardown(test_good, setup, teardown),
        cmocka_unit_test_setup_teardown(test_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sentinel, setup, teardown),
        cmocka_unit_test(test_durations),
        cmocka_unit_test_setup_teardown(test_secret, setup, teardown),
        cmocka_unit_test_setup_teardown(test_secret_in_file_key, setup,
                                        teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
