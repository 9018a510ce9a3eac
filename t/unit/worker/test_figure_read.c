
/*
 * Copyright (C) nginx-meter authors
 *
 * figure_read.c: a meter's kind by its name, the last= decoding and the
 * folds; unique.c's unique-period and month arithmetic.
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>
#include <time.h>

#include "figure_read.h"
#include "unique.h"
#include "util.h"


/* 2026-10-05T10:00:00Z */
#define H1  1791194400


static void
test_kind(void **state)
{
    (void) state;

    assert_int_equal(meter_meter_kind("calls", 5), METER_KIND_SUM);
    assert_int_equal(meter_meter_kind("cpu:max", 7), METER_KIND_MAX);
    assert_int_equal(meter_meter_kind("disk:last", 9), METER_KIND_LAST);
    /* the suffix alone, or after a bad name, is no gauge */
    assert_int_equal(meter_meter_kind(":last", 5), METER_KIND_SUM);
    assert_int_equal(meter_meter_kind("a b:last", 8), METER_KIND_SUM);
    assert_int_equal(meter_meter_kind("disk:lastx", 10), METER_KIND_SUM);
    /* a length: the field "disk:last|EPOCH.GEN" */
    assert_int_equal(meter_meter_kind("disk:last|0123.4", 9),
                     METER_KIND_LAST);
    /* 27 + 5 characters is the longest */
    assert_int_equal(meter_meter_kind("abcdefghijklmnopqrstuvwxyz0:last",
                                      32), METER_KIND_LAST);
}


static void
test_last_decode(void **state)
{
    uint64_t  v;

    (void) state;

    v = (uint64_t) 3599999 << 40 | ((1ULL << 40) - 1);
    assert_true(v < (1ULL << 62));
    assert_int_equal(meter_last_value(v), (1ULL << 40) - 1);
    assert_int_equal(meter_last_at(v, H1), (int64_t) H1 * 1000 + 3599999);

    v = (uint64_t) 2000 << 40 | 30;
    assert_int_equal(meter_last_value(v), 30);
    assert_int_equal(meter_last_at(v, H1), (int64_t) H1 * 1000 + 2000);
    assert_int_equal(meter_last_value(0), 0);
}


static void
test_fold(void **state)
{
    meter_fig_t  f;

    (void) state;

    memset(&f, 0, sizeof(f));
    meter_fig_add(&f, METER_KIND_SUM, 3, 0);
    meter_fig_add(&f, METER_KIND_SUM, 4, 0);
    assert_int_equal(f.value, 7);

    memset(&f, 0, sizeof(f));
    meter_fig_add(&f, METER_KIND_MAX, 5, 0);
    meter_fig_add(&f, METER_KIND_MAX, 9, 0);
    meter_fig_add(&f, METER_KIND_MAX, 7, 0);
    assert_int_equal(f.value, 9);

    /* max of nothing but zero is zero, and set */
    memset(&f, 0, sizeof(f));
    meter_fig_add(&f, METER_KIND_MAX, 0, 0);
    assert_true(f.set);
    assert_int_equal(f.value, 0);

    /* last: the latest wins even when smaller; a tie keeps the larger */
    memset(&f, 0, sizeof(f));
    meter_fig_add(&f, METER_KIND_LAST, 80, 1000);
    meter_fig_add(&f, METER_KIND_LAST, 20, 3000);
    meter_fig_add(&f, METER_KIND_LAST, 70, 2000);
    assert_int_equal(f.value, 20);
    assert_int_equal(f.at, 3000);
    meter_fig_add(&f, METER_KIND_LAST, 21, 3000);
    meter_fig_add(&f, METER_KIND_LAST, 19, 3000);
    assert_int_equal(f.value, 21);

    /* a reading at ms 0 of the epoch hour is still a reading */
    memset(&f, 0, sizeof(f));
    meter_fig_add(&f, METER_KIND_LAST, 5, 0);
    meter_fig_add(&f, METER_KIND_LAST, 4, 0);
    assert_int_equal(f.value, 5);

    memset(&f, 0, sizeof(f));
    meter_fig_add(&f, METER_KIND_UNIQUE, 3, 0);
    meter_fig_add(&f, METER_KIND_UNIQUE, 1, 0);
    assert_int_equal(f.value, 4);
}


static void
test_uperiod(void **state)
{
    char    m[8];
    time_t  s, e;

    (void) state;

    assert_int_equal(meter_uperiod_range("202610", &s, &e), 0);
    assert_int_equal(s, 1790812800);            /* 2026-10-01 */
    assert_int_equal(e, 1793491200);            /* 2026-11-01 */
    assert_int_equal(meter_uperiod_range("20261005", &s, &e), 0);
    assert_int_equal(s, 1791158400);
    assert_int_equal(e, 1791158400 + 86400);
    assert_int_equal(meter_uperiod_range("2026100510", &s, &e), 0);
    assert_int_equal(s, H1);
    assert_int_equal(e, H1 + 3600);
    /* December's next month is January */
    assert_int_equal(meter_uperiod_range("202612", &s, &e), 0);
    assert_int_equal(e, 1798761600);            /* 2027-01-01 */

    assert_int_equal(meter_uperiod_range("20261131", &s, &e), -1);
    assert_int_equal(meter_uperiod_range("202613", &s, &e), -1);
    assert_int_equal(meter_uperiod_range("2026100524", &s, &e), -1);
    assert_int_equal(meter_uperiod_range("2026", &s, &e), -1);
    assert_int_equal(meter_uperiod_range("2026-10", &s, &e), -1);
    assert_int_equal(meter_uperiod_range("", &s, &e), -1);

    meter_month_label(H1, m);
    assert_string_equal(m, "202610");
    assert_int_equal(meter_month_shift(H1, 0), 1790812800);
    assert_int_equal(meter_month_shift(H1, 1), 1793491200);
    assert_int_equal(meter_month_shift(H1, -10), 1764547200); /* 2025-12 */
}


int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kind),
        cmocka_unit_test(test_last_decode),
        cmocka_unit_test(test_fold),
        cmocka_unit_test(test_uperiod),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
