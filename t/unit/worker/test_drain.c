
/*
 * Copyright (C) nginx-meter authors
 *
 * drain.c: the quantity of a key-hour from its u and b fields, and the
 * drain lock against a mocked Redis (meter_redis_exec wrapped).
 */

/* wrap: meter_redis_exec */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drain.h"
#include "wusage.h"


#include "mock_redis.h"


static int
cmd_starts(const LargestIntegralType value,
    const LargestIntegralType check_value_data)
{
    (void) value;

    return strncmp(last_cmd, (const char *) check_value_data,
                   strlen((const char *) check_value_data)) == 0;
}


/* a writer-layout field as the counter it is, and the merge of layouts */
static void
test_writer_fields(void **state)
{
    char           kh[65], vf[METER_VFIELD_SIZE], sid[21], *buf;
    size_t         n;
    unsigned       np;
    const char   **uv;
    redisReply     u, *ue[4], e[4];
    meter_wkey_t   wk;
    meter_wfield_t fs[3] = { { "calls|E.1", 6 }, { "calls|E.2", 3 },
                             { "bytes|F.1", 7 } };
    const char    *hex = "ba7816bf8f01cfea414140de5dae2223"
                         "b00361a396177a9cb410ff61f20015ad";
    char           field[128];

    (void) state;

    snprintf(field, sizeof(field), "%s|calls|42", hex);
    assert_int_equal(meter_wfield_parse(field, strlen(field),
                                        "3f2a9c0d11b2e4f7", kh, vf), 0);
    assert_string_equal(kh, hex);
    assert_string_equal(vf, "calls|3f2a9c0d11b2e4f7.42");

    /* malformed: no GEN, a bad meter, upper-case hex, a short epoch */
    snprintf(field, sizeof(field), "%s|calls|", hex);
    assert_int_equal(meter_wfield_parse(field, strlen(field),
                                        "3f2a9c0d11b2e4f7", kh, vf), -1);
    snprintf(field, sizeof(field), "%s|ca ls|1", hex);
    assert_int_equal(meter_wfield_parse(field, strlen(field),
                                        "3f2a9c0d11b2e4f7", kh, vf), -1);
    snprintf(field, sizeof(field), "BA%s|calls|1", hex + 2);
    assert_int_equal(meter_wfield_parse(field, strlen(field),
                                        "3f2a9c0d11b2e4f7", kh, vf), -1);
    snprintf(field, sizeof(field), "%s|calls|1", hex);
    assert_int_equal(meter_wfield_parse(field, strlen(field), "3f2a", kh,
                                        vf), -1);

    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7:12:3", kh, sid,
                                        &np), 0);
    assert_string_equal(kh, "3f2a9c0d11b2e4f7");
    assert_string_equal(sid, "12");
    assert_int_equal(np, 3);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7:12:1048576", kh,
                                        sid, &np), 0);
    assert_int_equal(np, 1048576);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7:12:1048577", kh,
                                        sid, &np), -1);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7:12:0", kh, sid,
                                        &np), -1);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7:12", kh, sid,
                                        &np), -1);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7:12:3x", kh, sid,
                                        &np), -1);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7::3", kh, sid,
                                        &np), -1);
    assert_int_equal(meter_writer_parse("3f2a9c0d11b2e4f7.1:3", kh, sid,
                                        &np), -1);

    /* key layout: calls|E.1 = 5, calls|E.2 = 9; writer layout: calls|E.1
     * = 6 (ahead), calls|E.2 = 3 (behind), bytes|F.1 = 7 (its own) */
    memset(&u, 0, sizeof(u));
    memset(e, 0, sizeof(e));
    e[0].str = "calls|E.1"; e[1].str = "5";
    e[2].str = "calls|E.2"; e[3].str = "9";
    for (n = 0; n < 4; n++) {
        e[n].type = REDIS_REPLY_STRING;
        ue[n] = &e[n];
    }
    u.type = REDIS_REPLY_ARRAY;
    u.elements = 4;
    u.element = ue;

    memset(&wk, 0, sizeof(wk));
    wk.f = fs;
    wk.n = 3;

    assert_int_equal(meter_u_merge(&u, &wk, &uv, &n, &buf), 0);
    assert_int_equal(n, 6);
    assert_string_equal(uv[0], "calls|E.1");
    assert_string_equal(uv[1], "6");
    assert_string_equal(uv[2], "calls|E.2");
    assert_string_equal(uv[3], "9");
    assert_string_equal(uv[4], "bytes|F.1");
    assert_string_equal(uv[5], "7");
    free(uv);
    free(buf);

    /* either layout alone */
    assert_int_equal(meter_u_merge(NULL, &wk, &uv, &n, &buf), 0);
    assert_int_equal(n, 6);
    assert_string_equal(uv[3], "3");
    free(uv);
    free(buf);
    assert_int_equal(meter_u_merge(&u, NULL, &uv, &n, &buf), 0);
    assert_int_equal(n, 4);
    free(uv);
    free(buf);
}


static void
test_usage_compute(void **state)
{
    static const char  *u[] = {
        "calls|a.1", "10",
        "calls|b.2", "5",
        "bytes|a.1", "1000",
        "calls|c.3", "7",
        "nobar", "3",
        "calls|d.4", "abc",
        "calls|e.5", "2",
    };

    static const char  *b[] = {
        "calls|a.1", "4",
        "calls|c.3", "7",
        "calls|e.5", "9",       /* b above u (a Redis that lost data) */
        "bytes|z.9", "50",      /* a b field without u */
    };

    size_t          n;
    unsigned        bad;
    meter_usage_t  *us;

    (void) state;

    bad = 0;
    assert_int_equal(meter_usage_compute(u, 14, b, 8, "2026112409 KH ", &us,
                                         &n, &bad), 0);

    assert_int_equal(bad, 2);
    assert_int_equal(n, 2);

    assert_string_equal(us[0].meter, "calls");
    assert_true(us[0].quantity == 11);
    assert_string_equal(us[0].covers.data,
                        "2026112409 KH calls|a.1 10\n"
                        "2026112409 KH calls|b.2 5\n");

    assert_string_equal(us[1].meter, "bytes");
    assert_true(us[1].quantity == 1000);
    assert_string_equal(us[1].covers.data, "2026112409 KH bytes|a.1 1000\n");

    meter_usage_free(us, n);

    /* everything billed: nothing */
    bad = 0;
    assert_int_equal(meter_usage_compute(u, 2, u, 2, "", &us, &n, &bad), 0);
    assert_int_equal(n, 0);
    assert_int_equal(bad, 0);
    meter_usage_free(us, n);
}


static void
test_usage_big(void **state)
{
    static const char  *u[] = {
        "calls|a.1", "18446744073709551615",
        "calls|b.1", "1",
    };

    static const char  *b[] = {
        "calls|a.1", "18446744073709551610",
    };

    size_t          n;
    unsigned        bad;
    meter_usage_t  *us;

    (void) state;

    bad = 0;
    assert_int_equal(meter_usage_compute(u, 4, b, 2, "", &us, &n, &bad), 0);
    assert_int_equal(n, 1);
    assert_true(us[0].quantity == 6);
    meter_usage_free(us, n);
}


/* a gauge: the largest u and b over its counters, no sum; only counters
 * above their mark in covers; a sum meter of the same key beside it */
static void
test_usage_gauge(void **state)
{
    static const char  *u[] = {
        "gb:max|a.1", "30",
        "gb:max|b.2", "50",
        "gb:max|c.3", "12",
        "calls|a.1", "4",
        "bad:min|a.1", "3",
    };

    static const char  *b[] = {
        "gb:max|a.1", "30",
        "gb:max|b.2", "40",
    };

    size_t          n;
    unsigned        bad;
    meter_usage_t  *us;

    (void) state;

    bad = 0;
    assert_int_equal(meter_usage_compute(u, 10, b, 4, "H KH ", &us, &n,
                                         &bad), 0);
    assert_int_equal(n, 3);

    assert_string_equal(us[0].meter, "gb:max");
    assert_true(us[0].gauge);
    assert_true(us[0].quantity == 0);
    assert_true(us[0].gu == 50);
    assert_true(us[0].gb == 40);
    assert_string_equal(us[0].covers.data,
                        "H KH gb:max|b.2 50\n"
                        "H KH gb:max|c.3 12\n");

    assert_string_equal(us[1].meter, "calls");
    assert_false(us[1].gauge);
    assert_true(us[1].quantity == 4);

    /* not a gauge suffix: an ordinary (if odd) meter, summed */
    assert_string_equal(us[2].meter, "bad:min");
    assert_false(us[2].gauge);
    assert_true(us[2].quantity == 3);

    meter_usage_free(us, n);

    /* all billed: the figure is still known, nothing to cover */
    assert_int_equal(meter_usage_compute(u, 2, u, 2, "", &us, &n, &bad), 0);
    assert_int_equal(n, 1);
    assert_true(us[0].gu == 30 && us[0].gb == 30);
    assert_int_equal(us[0].covers.len, 0);
    meter_usage_free(us, n);
}


static void
test_lock(void **state)
{
    meter_conf_t   cf;
    meter_redis_t  r;
    meter_drain_t  d;

    (void) state;

    memset(&cf, 0, sizeof(cf));
    memset(&r, 0, sizeof(r));
    memset(&d, 0, sizeof(d));
    cf.lock_ttl = 60;
    d.cf = &cf;
    d.redis = &r;

    /* free: SET NX PX answers OK */
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts,
                 "SET mtr:{worker}:lock ");
    will_return(__wrap_meter_redis_exec, reply(REDIS_REPLY_STATUS, "OK", 0));
    assert_int_equal(meter_lock_acquire(&d), 1);
    assert_int_equal(strlen(d.token), 32);
    assert_non_null(strstr(last_cmd, " NX PX 60000"));
    assert_non_null(strstr(last_cmd, d.token));

    /* held by another worker: SET answers nil, the renewal script 0 */
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts,
                 "SET mtr:{worker}:lock ");
    will_return(__wrap_meter_redis_exec, reply(REDIS_REPLY_NIL, NULL, 0));
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts, "EVAL ");
    will_return(__wrap_meter_redis_exec,
                reply(REDIS_REPLY_INTEGER, NULL, 0));
    /* a standby reads how long the other's lock has left */
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts,
                 "PTTL mtr:{worker}:lock");
    will_return(__wrap_meter_redis_exec,
                reply(REDIS_REPLY_INTEGER, NULL, 41234));
    assert_int_equal(meter_lock_acquire(&d), 0);
    assert_int_equal(d.lock_pttl, 41234);

    /* Redis error */
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts,
                 "SET mtr:{worker}:lock ");
    will_return(__wrap_meter_redis_exec,
                reply(REDIS_REPLY_ERROR, "LOADING", 0));
    assert_int_equal(meter_lock_acquire(&d), -1);

    /* release compares the token */
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts, "EVAL ");
    will_return(__wrap_meter_redis_exec,
                reply(REDIS_REPLY_INTEGER, NULL, 1));
    meter_lock_release(&d);
    assert_non_null(strstr(last_cmd, "redis.call('DEL', KEYS[1])"));
    assert_non_null(strstr(last_cmd, d.token));
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_usage_compute),
        cmocka_unit_test(test_writer_fields),
        cmocka_unit_test(test_usage_big),
        cmocka_unit_test(test_usage_gauge),
        cmocka_unit_test(test_lock),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
