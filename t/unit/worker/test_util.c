
/*
 * Copyright (C) nginx-meter authors
 *
 * util.c: hashing, idempotency keys, hour/day period math, time formats,
 * backoff, the string map.
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"


/* 2026-11-24T09:00:00Z */
#define T0  1795510800


static void
test_sha256(void **state)
{
    char  hex[65];

    (void) state;

    /* FIPS 180-2 test vectors */
    meter_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223"
                             "b00361a396177a9cb410ff61f20015ad");
    meter_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb924"
                             "27ae41e4649b934ca495991b7852b855");
}


static void
test_idem_key(void **state)
{
    char  a[METER_IDEM_LEN + 1], b[METER_IDEM_LEN + 1];

    (void) state;

    /* sha256("1795510800|cust_a|calls|1"), from sha256sum(1) */
    meter_idem_key(T0, "cust_a", "calls", 1, a);
    assert_string_equal(a, "8350e4e14997b3e913f994f6b0e5c904");
    assert_int_equal(strlen(a), 32);

    /* deterministic */
    meter_idem_key(T0, "cust_a", "calls", 1, b);
    assert_string_equal(a, b);

    /* a later record of the same period gets a new key */
    meter_idem_key(T0, "cust_a", "calls", 2, b);
    assert_string_equal(b, "a949c41a0567a75cb7ffba9c82d436de");

    /* every part matters */
    meter_idem_key(T0 + 3600, "cust_a", "calls", 1, b);
    assert_string_not_equal(a, b);
    meter_idem_key(T0, "cust_b", "calls", 1, b);
    assert_string_not_equal(a, b);
    meter_idem_key(T0, "cust_a", "bytes", 1, b);
    assert_string_not_equal(a, b);
}


static void
test_periods(void **state)
{
    (void) state;

    assert_int_equal(meter_period_start(T0, 3600), T0);
    assert_int_equal(meter_period_start(T0 + 3599, 3600), T0);
    assert_int_equal(meter_period_start(T0 + 3600, 3600), T0 + 3600);
    assert_int_equal(meter_period_start(T0 - 1, 3600), T0 - 3600);

    /* 2026-11-24T00:00:00Z */
    assert_int_equal(meter_period_start(T0, 86400), T0 - 9 * 3600);
    assert_int_equal(meter_period_start(T0 + 15 * 3600 - 1, 86400),
                     T0 - 9 * 3600);
    assert_int_equal(meter_period_start(T0 + 15 * 3600, 86400),
                     T0 + 15 * 3600);
}


static void
test_hours(void **state)
{
    char  buf[32];

    (void) state;

    assert_int_equal(meter_hour_parse("2026112409"), T0);
    assert_int_equal(meter_hour_parse("2026112400"), T0 - 9 * 3600);
    assert_int_equal(meter_hour_parse("2026113009"), T0 + 6 * 86400);
    assert_int_equal(meter_hour_parse("2026112424"), -1);
    assert_int_equal(meter_hour_parse("2026022910"), -1);   /* no Feb 29 */
    assert_int_equal(meter_hour_parse("2028022910"), 1835431200);
    assert_int_equal(meter_hour_parse("202611240"), -1);
    assert_int_equal(meter_hour_parse("20261124x9"), -1);

    meter_hour_format(T0 + 1800, buf, sizeof(buf));
    assert_string_equal(buf, "2026112409");
    meter_hour_format_dashed(T0, buf, sizeof(buf));
    assert_string_equal(buf, "2026-11-24T09");
    assert_int_equal(meter_hour_parse_dashed("2026-11-24T09"), T0);
    assert_int_equal(meter_hour_parse_dashed("2026-11-24 09"), -1);

    meter_iso8601(T0, buf, sizeof(buf));
    assert_string_equal(buf, "2026-11-24T09:00:00Z");
}


static void
test_iso8601(void **state)
{
    (void) state;

    assert_int_equal(meter_iso8601_parse("2026-11-24T09:00:00Z"), T0);
    assert_int_equal(meter_iso8601_parse("2026-11-24T09:30:15Z"),
                     T0 + 1815);
    assert_int_equal(meter_iso8601_parse("2026-11-24T09:30Z"), T0 + 1800);
    assert_int_equal(meter_iso8601_parse("2026-11-24T09"), T0);
    assert_int_equal(meter_iso8601_parse("2026-11-24"), T0 - 9 * 3600);
    assert_int_equal(meter_iso8601_parse("2026-11-24T10:00:00+01:00"), T0);
    assert_int_equal(meter_iso8601_parse("2026-11-24T08:00:00-01:00"), T0);
    assert_int_equal(meter_iso8601_parse("2026-11-24T09:00:00+0100"), -1);
    assert_int_equal(meter_iso8601_parse("2026-13-01"), -1);
    assert_int_equal(meter_iso8601_parse("yesterday"), -1);
    assert_int_equal(meter_iso8601_parse("2026-11-24T09:00:00Zjunk"), -1);
}


static void
test_u64(void **state)
{
    uint64_t  v;

    (void) state;

    assert_int_equal(meter_parse_u64("0", 1, &v), 0);
    assert_true(v == 0);
    assert_int_equal(meter_parse_u64("18446744073709551615", 20, &v), 0);
    assert_true(v == UINT64_MAX);
    assert_int_equal(meter_parse_u64("18446744073709551616", 20, &v), -1);
    assert_int_equal(meter_parse_u64("-1", 2, &v), -1);
    assert_int_equal(meter_parse_u64("1.5", 3, &v), -1);
    assert_int_equal(meter_parse_u64("", 0, &v), -1);
}


static void
test_backoff(void **state)
{
    (void) state;

    /* rnd 0 -> half the step, rnd -> 1 -> the full step */
    assert_float_equal(meter_backoff(1, 10, 3600, 0, 0), 5, 1e-9);
    assert_float_equal(meter_backoff(1, 10, 3600, 0, 0.999999), 10, 1e-4);
    assert_float_equal(meter_backoff(2, 10, 3600, 0, 0), 10, 1e-9);
    assert_float_equal(meter_backoff(3, 10, 3600, 0, 0), 20, 1e-9);
    assert_float_equal(meter_backoff(4, 10, 3600, 0, 0.5), 60, 1e-9);

    /* capped at max */
    assert_float_equal(meter_backoff(20, 10, 3600, 0, 0), 1800, 1e-9);
    assert_float_equal(meter_backoff(1000, 10, 3600, 0, 0.999999), 3600,
                       1e-2);

    /* Retry-After wins when longer, not when shorter */
    assert_float_equal(meter_backoff(1, 10, 3600, 120, 0), 120, 1e-9);
    assert_float_equal(meter_backoff(3, 10, 3600, 1, 0), 20, 1e-9);

    /* ... but never beyond max: 99999999999 would park the record for
     * 3,000 years, its usage never billed */
    assert_float_equal(meter_backoff(1, 10, 3600, 86400, 0), 3600, 1e-9);
    assert_float_equal(meter_backoff(1, 10, 3600, 1e300, 0), 3600, 1e-9);
    assert_float_equal(meter_backoff(1, 10, 3600, -5, 0), 5, 1e-9);

    /* attempt 0 behaves as the first retry */
    assert_float_equal(meter_backoff(0, 10, 3600, 0, 0), 5, 1e-9);
}


static void
test_map(void **state)
{
    meter_map_t   m;
    char          key[32];
    void        **v;
    int           i, created;

    (void) state;

    memset(&m, 0, sizeof(meter_map_t));
    assert_null(meter_map_get(&m, "x"));

    for (i = 0; i < 1000; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        v = meter_map_put(&m, key, &created);
        assert_non_null(v);
        assert_int_equal(created, 1);
        *v = (void *) (intptr_t) (i + 1);
    }

    assert_int_equal(m.n, 1000);

    v = meter_map_put(&m, "k7", &created);
    assert_int_equal(created, 0);
    assert_int_equal((intptr_t) *v, 8);

    for (i = 0; i < 1000; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        v = meter_map_get(&m, key);
        assert_non_null(v);
        assert_int_equal((intptr_t) *v, i + 1);
    }

    assert_null(meter_map_get(&m, "k1000"));

    meter_map_free(&m, NULL);
}


static void
test_json_str(void **state)
{
    meter_str_t  s;

    (void) state;

    memset(&s, 0, sizeof(meter_str_t));

    assert_int_equal(meter_str_json(&s, "a\"b\\c\n\x01"), 0);
    assert_int_equal(meter_str_json(&s, NULL), 0);
    assert_string_equal(s.data, "\"a\\\"b\\\\c\\u000a\\u0001\"null");

    meter_str_free(&s);
}


static void
test_time_from_num(void **state)
{
    (void) state;

    assert_int_equal(meter_time_from_num(1700000000), 1700000000);
    assert_int_equal(meter_time_from_num(1700000000.9), 1700000000);
    assert_int_equal(meter_time_from_num(0), 0);
    assert_int_equal(meter_time_from_num(-1), 0);
    assert_int_equal(meter_time_from_num(-1e300), 0);
    assert_int_equal(meter_time_from_num(1e300), METER_TIME_MAX);
    assert_int_equal(meter_time_from_num(253402300799.0), METER_TIME_MAX);
    assert_int_equal(meter_time_from_num(9.3e18), METER_TIME_MAX);
    assert_int_equal(meter_time_from_num(0.0 / 0.0), 0);
    assert_int_equal(meter_time_from_num(1.0 / 0.0), METER_TIME_MAX);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_sha256),
        cmocka_unit_test(test_idem_key),
        cmocka_unit_test(test_periods),
        cmocka_unit_test(test_hours),
        cmocka_unit_test(test_iso8601),
        cmocka_unit_test(test_u64),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_time_from_num),
        cmocka_unit_test(test_map),
        cmocka_unit_test(test_json_str),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
