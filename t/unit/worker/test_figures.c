
/*
 * Copyright (C) nginx-meter authors
 *
 * figures.c: the arithmetic of billing a figure (decoding last, the
 * distinct count, what a record carries, its event time, months and
 * unique periods, the covers line).
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "figures.h"
#include "meter_schema.h"


#define NOV      1793491200     /* 2026-11-01T00:00:00Z */
#define DEC      1796083200     /* 2026-12-01T00:00:00Z */
#define JAN27    1798761600     /* 2027-01-01T00:00:00Z */
#define FEB24    1706745600     /* 2024-02-01T00:00:00Z */
#define MAR24    1709251200     /* 2024-03-01T00:00:00Z */


static void
test_last_value(void **state)
{
    (void) state;

    /* (ms into the hour) << 40 | value */
    assert_int_equal(meter_fig_last_value((3599999ULL << 40) | 35), 35);
    assert_int_equal(meter_fig_last_value(35), 35);
    assert_int_equal(meter_fig_last_value((1ULL << 40) - 1),
                     (1ULL << 40) - 1);
    assert_int_equal(meter_fig_last_value(1ULL << 40), 0);
    /* a later reading of a smaller value encodes larger: the max keeps it */
    assert_true(((9000ULL << 40) | 20) > ((100ULL << 40) | 1050));
}


static void
test_distinct(void **state)
{
    (void) state;

    assert_int_equal(meter_fig_distinct(0, 0), 0);
    assert_int_equal(meter_fig_distinct(999, 1012), 999);   /* exact */
    assert_int_equal(meter_fig_distinct(1000, 1500), 1500); /* the HLL */
    assert_int_equal(meter_fig_distinct(1000, 990), 1000);  /* never below */
}


static void
test_quantity(void **state)
{
    uint64_t  q;

    (void) state;

    /* additive: the increase, none when not above */
    assert_int_equal(meter_fig_quantity(METER_FIG_MAX, 0, 0, 70, 30, 1, &q),
                     1);
    assert_int_equal(q, 40);
    assert_int_equal(meter_fig_quantity(METER_FIG_MAX, 0, 0, 30, 0, 0, &q),
                     1);
    assert_int_equal(q, 30);
    assert_int_equal(meter_fig_quantity(METER_FIG_UNIQUE, 0, 1, 5, 5, 1, &q),
                     0);
    assert_int_equal(q, 0);
    assert_int_equal(meter_fig_quantity(METER_FIG_MAX, 0, 0, 0, 0, 0, &q), 0);

    /* additive last: only at the close, the increase over the billed */
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 0, 0, 35, 0, 0, &q),
                     0);
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 0, 1, 35, 0, 0, &q),
                     1);
    assert_int_equal(q, 35);
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 0, 1, 20, 35, 1, &q),
                     0);

    /* absolute: F itself; last also when it falls, to 0 too */
    assert_int_equal(meter_fig_quantity(METER_FIG_MAX, 1, 0, 70, 30, 1, &q),
                     1);
    assert_int_equal(q, 70);
    assert_int_equal(meter_fig_quantity(METER_FIG_MAX, 1, 0, 70, 70, 1, &q),
                     0);
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 1, 0, 20, 50, 1, &q),
                     1);
    assert_int_equal(q, 20);
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 1, 0, 0, 50, 1, &q),
                     1);
    assert_int_equal(q, 0);
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 1, 0, 50, 50, 1, &q),
                     0);
    /* nothing billed yet, figure 0: nothing to say */
    assert_int_equal(meter_fig_quantity(METER_FIG_LAST, 1, 0, 0, 0, 0, &q),
                     0);
}


static void
test_time(void **state)
{
    (void) state;

    /* the end of the latest hour */
    assert_int_equal(meter_fig_time(NOV + 3600, 0, DEC + 99, NOV, DEC),
                     NOV + 7200 - 1);
    /* capped at now */
    assert_int_equal(meter_fig_time(NOV + 3600, 0, NOV + 4000, NOV, DEC),
                     NOV + 4000);
    /* after the one billed before (late usage of an older hour) */
    assert_int_equal(meter_fig_time(NOV, NOV + 7199, DEC + 99, NOV, DEC),
                     NOV + 7200);
    /* inside the month */
    assert_int_equal(meter_fig_time(DEC - 3600, DEC - 1, JAN27, NOV, DEC),
                     DEC - 1);
}


static void
test_months(void **state)
{
    char  buf[8];

    (void) state;

    assert_int_equal(meter_month_start(DEC - 1), NOV);
    assert_int_equal(meter_month_start(DEC), DEC);
    assert_int_equal(meter_month_end(NOV), DEC);
    assert_int_equal(meter_month_end(DEC + 86400 * 30), JAN27);
    assert_int_equal(meter_month_end(FEB24 + 86400 * 28), MAR24);  /* leap */
    meter_month_name(DEC - 1, buf, sizeof(buf));
    assert_string_equal(buf, "202611");
}


static void
test_uperiod(void **state)
{
    time_t  s, e;

    (void) state;

    assert_int_equal(meter_uperiod_parse("202611", 6, &s, &e), 0);
    assert_int_equal(s, NOV);
    assert_int_equal(e, DEC);
    assert_int_equal(meter_uperiod_parse("20261130", 8, &s, &e), 0);
    assert_int_equal(s, 1795996800);
    assert_int_equal(e, 1795996800 + 86400);
    assert_int_equal(meter_uperiod_parse("2026113023", 10, &s, &e), 0);
    assert_int_equal(s, 1796079600);
    assert_int_equal(e, DEC);
    assert_int_equal(meter_uperiod_parse("20261131", 8, &s, &e), -1);
    assert_int_equal(meter_uperiod_parse("202613", 6, &s, &e), -1);
    assert_int_equal(meter_uperiod_parse("2026112", 7, &s, &e), -1);
    assert_int_equal(meter_uperiod_parse("2026112x", 8, &s, &e), -1);
    assert_int_equal(meter_uperiod_parse("2026113024", 10, &s, &e), -1);
}


static void
test_covers(void **state)
{
    time_t  s, e;

    (void) state;

    assert_int_equal(meter_fig_covers("#fig 202611 acme|disk:max 70 "
                                      "1793498399 2026110101\n", &s, &e), 1);
    assert_int_equal(s, NOV);
    assert_int_equal(e, 1793498400);
    assert_int_equal(meter_fig_covers("2026110101 ab calls|x 3\n", &s, &e),
                     0);
    assert_int_equal(meter_fig_covers(NULL, &s, &e), 0);
}


int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_last_value),
        cmocka_unit_test(test_distinct),
        cmocka_unit_test(test_quantity),
        cmocka_unit_test(test_time),
        cmocka_unit_test(test_months),
        cmocka_unit_test(test_uperiod),
        cmocka_unit_test(test_covers),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
