
/*
 * Copyright (C) nginx-meter authors
 *
 * gov.c against a mocked Redis (meter_redis_exec wrapped): the commands it
 * sends, in order, and what it makes of the replies.
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

#include "gov.h"
#include "meter_schema.h"


#include "mock_redis.h"


/* an array reply of n strings */
static redisReply *
array(size_t n, ...)
{
    va_list      ap;
    size_t       i;
    redisReply  *rp;

    rp = reply(REDIS_REPLY_ARRAY, NULL, 0);
    rp->elements = n;
    rp->element = calloc(n ? n : 1, sizeof(redisReply *));

    va_start(ap, n);
    for (i = 0; i < n; i++) {
        rp->element[i] = reply(REDIS_REPLY_STRING, va_arg(ap, const char *),
                               0);
    }
    va_end(ap);

    return rp;
}


static int
cmd_equal(const LargestIntegralType value,
    const LargestIntegralType check_value_data)
{
    (void) value;

    if (strcmp(last_cmd, (const char *) check_value_data) != 0) {
        print_error("command \"%s\" != \"%s\"\n", last_cmd,
                    (const char *) check_value_data);
        return 0;
    }

    return 1;
}


static int
cmd_starts(const LargestIntegralType value,
    const LargestIntegralType check_value_data)
{
    (void) value;

    if (strncmp(last_cmd, (const char *) check_value_data,
                strlen((const char *) check_value_data)) != 0)
    {
        print_error("command \"%.80s\" does not start with \"%s\"\n",
                    last_cmd, (const char *) check_value_data);
        return 0;
    }

    return 1;
}


/* the next command must be exactly cmd, and gets rp */
#define expect_cmd(c, rp)                                                    \
    expect_check(__wrap_meter_redis_exec, cmd, cmd_equal, (c));              \
    will_return(__wrap_meter_redis_exec, (rp))

#define expect_cmd_prefix(c, rp)                                             \
    expect_check(__wrap_meter_redis_exec, cmd, cmd_starts, (c));             \
    will_return(__wrap_meter_redis_exec, (rp))


static const char  kh1[] =
    "1111111111111111111111111111111111111111111111111111111111111111";
static const char  kh2[] =
    "2222222222222222222222222222222222222222222222222222222222222222";


static void
test_project_writes_every_key(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd("HGETALL mtr:cust:{acme}",
               array(8, "status", "delinquent", "reason", "invoice_overdue",
                     "since", "1700000000", "source", "manual"));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(2, kh1, kh2));
    expect_cmd_prefix("HGETALL mtr:key:{1111",
                      array(4, "customer", "acme", "prefix", "mk_live_abcd"));
    expect_cmd("HSET mtr:gov 1111111111111111111111111111111111111111111111"
               "111111111111111111 acme\td\tinvoice_overdue\t1700000000\t0",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd_prefix("HGETALL mtr:key:{2222",
                      array(4, "customer", "acme", "revoked", "1700000500"));
    expect_cmd("HSET mtr:gov 2222222222222222222222222222222222222222222222"
               "222222222222222222 acme\td\tinvoice_overdue\t1700000000\t"
               "1700000500", reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 7));
    /* the version logged with the two fields it rewrote */
    expect_cmd("ZADD mtr:gov:log 7 7 1111111111111111111111111111111111111111"
               "111111111111111111111111 22222222222222222222222222222222222"
               "22222222222222222222222222222",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9993",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    expect_cmd("HSET mtr:cust:{acme} projected 1",
               reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_project(&r, "acme", err, sizeof(err)), 0);
}


static void
test_project_active_drops_reason(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    /* a stale since of an active customer is not projected */
    expect_cmd("HGETALL mtr:cust:{acme}",
               array(4, "status", "active", "since", "1700000000"));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(1, kh1));
    expect_cmd_prefix("HGETALL mtr:key:{1111", array(2, "customer", "acme"));
    expect_cmd("HSET mtr:gov 1111111111111111111111111111111111111111111111"
               "111111111111111111 acme\ta\t\t0\t0",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 8));
    expect_cmd("ZADD mtr:gov:log 8 8 111111111111111111111111111111111111"
               "1111111111111111111111111111",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9992",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    expect_cmd("HSET mtr:cust:{acme} projected 1",
               reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_project(&r, "acme", err, sizeof(err)), 0);
}


/* more fields than MTR_GOV_LOG_MAXKEYS: the log says "*", read all */
static void
test_project_many_keys_logs_all(void **state)
{
    char            err[256], kh[65];
    size_t          i, n;
    redisReply     *keys;
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    n = MTR_GOV_LOG_MAXKEYS + 1;
    keys = reply(REDIS_REPLY_ARRAY, NULL, 0);
    keys->elements = n;
    keys->element = calloc(n, sizeof(redisReply *));

    for (i = 0; i < n; i++) {
        snprintf(kh, sizeof(kh), "%064zx", i);
        keys->element[i] = reply(REDIS_REPLY_STRING, kh, 0);
    }

    expect_cmd("HGETALL mtr:cust:{acme}", array(2, "status", "active"));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", keys);

    for (i = 0; i < n; i++) {
        expect_cmd_prefix("HGETALL mtr:key:{", array(2, "customer", "acme"));
        expect_cmd_prefix("HSET mtr:gov ",
                          reply(REDIS_REPLY_INTEGER, NULL, 1));
    }

    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 12));
    expect_cmd("ZADD mtr:gov:log 12 12 *",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9988",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    expect_cmd("HSET mtr:cust:{acme} projected 1",
               reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_project(&r, "acme", err, sizeof(err)), 0);
}


static void
test_project_error(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd("HGETALL mtr:cust:{acme}",
               reply(REDIS_REPLY_ERROR, "LOADING Redis is loading", 0));

    assert_int_equal(meter_gov_project(&r, "acme", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "LOADING"));
}


static void
test_set_status_changed_projects(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd_prefix("EVAL ", reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("HGETALL mtr:cust:{acme}",
               array(4, "status", "delinquent", "reason", "credit_exhausted"));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(0));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 2));
    expect_cmd("ZADD mtr:gov:log 2 2",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9998",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    expect_cmd("HSET mtr:cust:{acme} projected 1",
               reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_set_status(&r, "acme", 1, "credit_exhausted",
                                          "manual", 1700000000, err,
                                          sizeof(err)), 1);
}


/* a change whose projection failed is projected by the next call, even
 * when that call changes nothing (the script answers 2) */
static void
test_set_status_repairs_projection(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd_prefix("EVAL ", reply(REDIS_REPLY_INTEGER, NULL, 2));
    expect_cmd("HGETALL mtr:cust:{acme}",
               array(4, "status", "delinquent", "reason", "invoice_overdue"));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(0));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 3));
    expect_cmd("ZADD mtr:gov:log 3 3",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9997",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    expect_cmd("HSET mtr:cust:{acme} projected 1",
               reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_set_status(&r, "acme", 1, "invoice_overdue",
                                          "sync", 1700000000, err,
                                          sizeof(err)), 0);
}


static void
test_set_status_arguments(void **state)
{
    char            err[256];
    const char     *tail;
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    /* ignored (older event, or a sync against a manual mark): no
     * projection, no version bump */
    expect_cmd_prefix("EVAL ", reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_set_status(&r, "acme", 0, "ignored", "sync",
                                          1700000123, err, sizeof(err)), 0);

    /* KEYS and ARGV after the script; a clear sends an empty reason */
    tail = strstr(last_cmd, " 1 mtr:cust:{acme} ");
    assert_non_null(tail);
    assert_string_equal(tail, " 1 mtr:cust:{acme} 0  sync 1700000123");
}


static void
test_set_status_unknown_and_invalid(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd_prefix("EVAL ", reply(REDIS_REPLY_INTEGER, NULL, -1));
    assert_int_equal(meter_gov_set_status(&r, "ghost", 1, "invoice_overdue",
                                          "sync", 0, err, sizeof(err)), -1);
    assert_string_equal(err, "unknown customer \"ghost\"");

    /* checked before any command */
    assert_int_equal(meter_gov_set_status(&r, "acme", 1, "late", "manual", 0,
                                          err, sizeof(err)), -1);
    assert_non_null(strstr(err, "invalid reason"));
    assert_int_equal(meter_gov_set_status(&r, "acme", 1, "invoice_overdue",
                                          "admin", 0, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "invalid source"));
    assert_int_equal(meter_gov_set_status(&r, "a b", 0, NULL, "manual", 0,
                                          err, sizeof(err)), -1);
    assert_non_null(strstr(err, "invalid customer"));
}


static void
test_find_customer(void **state)
{
    char            err[256], c[65];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    /* unknown customer id, known subscription */
    expect_cmd("HGET mtr:bypc cus_X", reply(REDIS_REPLY_NIL, NULL, 0));
    expect_cmd("HGET mtr:bysub sub_Y", reply(REDIS_REPLY_STRING, "acme", 0));
    assert_int_equal(meter_gov_find_customer(&r, "cus_X", "sub_Y", c,
                                             sizeof(c), err, sizeof(err)), 1);
    assert_string_equal(c, "acme");

    expect_cmd("HGET mtr:bypc cus_A", reply(REDIS_REPLY_STRING, "bolt", 0));
    assert_int_equal(meter_gov_find_customer(&r, "cus_A", "sub_Y", c,
                                             sizeof(c), err, sizeof(err)), 1);
    assert_string_equal(c, "bolt");

    expect_cmd("HGET mtr:bysub sub_Z", reply(REDIS_REPLY_NIL, NULL, 0));
    assert_int_equal(meter_gov_find_customer(&r, NULL, "sub_Z", c, sizeof(c),
                                             err, sizeof(err)), 0);

    assert_int_equal(meter_gov_find_customer(&r, NULL, NULL, c, sizeof(c),
                                             err, sizeof(err)), 0);
}


static void
test_credit_set_adds_usage(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(2, kh1, kh2));
    expect_cmd_prefix("HGET mtr:used:{1111",
                      reply(REDIS_REPLY_STRING, "40", 0));
    expect_cmd_prefix("HGET mtr:used:{2222", reply(REDIS_REPLY_NIL, NULL, 0));
    expect_cmd("HSET mtr:gov:credit acme|calls 140",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 3));
    expect_cmd("ZADD mtr:gov:log 3 3",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9997",
               reply(REDIS_REPLY_INTEGER, NULL, 0));

    assert_int_equal(meter_gov_credit_set(&r, "acme", "calls", 100, err,
                                          sizeof(err)), 0);
    assert_int_equal(meter_gov_credit_set(&r, "acme", "calls", -1, err,
                                          sizeof(err)), -1);
    assert_int_equal(meter_gov_credit_set(&r, "acme", "bad|meter", 1, err,
                                          sizeof(err)), -1);
}


static void
test_credit_add(void **state)
{
    char            err[256];
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd("HEXISTS mtr:gov:credit acme|calls",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("HINCRBY mtr:gov:credit acme|calls 25",
               reply(REDIS_REPLY_INTEGER, NULL, 165));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 4));
    expect_cmd("ZADD mtr:gov:log 4 4",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9996",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    assert_int_equal(meter_gov_credit_add(&r, "acme", "calls", 25, err,
                                          sizeof(err)), 0);

    /* no credit yet: the amount is granted on top of the usage so far */
    expect_cmd("HEXISTS mtr:gov:credit acme|calls",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(1, kh1));
    expect_cmd_prefix("HGET mtr:used:{1111",
                      reply(REDIS_REPLY_STRING, "7", 0));
    expect_cmd("HSET mtr:gov:credit acme|calls 32",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("INCR mtr:gov:version", reply(REDIS_REPLY_INTEGER, NULL, 5));
    expect_cmd("ZADD mtr:gov:log 5 5",
               reply(REDIS_REPLY_INTEGER, NULL, 1));
    expect_cmd("ZREMRANGEBYSCORE mtr:gov:log -inf -9995",
               reply(REDIS_REPLY_INTEGER, NULL, 0));
    assert_int_equal(meter_gov_credit_add(&r, "acme", "calls", 25, err,
                                          sizeof(err)), 0);
}


static void
test_credit_left(void **state)
{
    char            err[256];
    int64_t         granted, left;
    meter_redis_t   r;

    (void) state;
    memset(&r, 0, sizeof(r));

    expect_cmd("HGET mtr:gov:credit acme|calls",
               reply(REDIS_REPLY_STRING, "100", 0));
    expect_cmd("SMEMBERS mtr:ckeys:{acme}", array(2, kh1, kh2));
    expect_cmd_prefix("HGET mtr:used:{1111",
                      reply(REDIS_REPLY_STRING, "70", 0));
    expect_cmd_prefix("HGET mtr:used:{2222",
                      reply(REDIS_REPLY_STRING, "45", 0));
    assert_int_equal(meter_gov_credit_left(&r, "acme", "calls", &granted,
                                           &left, err, sizeof(err)), 0);
    assert_int_equal(granted, 100);
    assert_int_equal(left, -15);     /* overshoot shows as negative */

    expect_cmd("HGET mtr:gov:credit acme|bytes",
               reply(REDIS_REPLY_NIL, NULL, 0));
    assert_int_equal(meter_gov_credit_left(&r, "acme", "bytes", &granted,
                                           &left, err, sizeof(err)), 0);
    assert_int_equal(granted, -1);

    expect_cmd("HGET mtr:gov:credit acme|calls",
               reply(REDIS_REPLY_STRING, "12x", 0));
    assert_int_equal(meter_gov_credit_left(&r, "acme", "calls", &granted,
                                           &left, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not an integer"));
}


/* plans: "LIMIT/unit" and the periods (UTC, or at an anchor) */

static void
test_quota_parse(void **state)
{
    int      unit;
    int64_t  limit;

    (void) state;

    assert_int_equal(meter_quota_parse("10000/month", &limit, &unit), 0);
    assert_int_equal(limit, 10000);
    assert_int_equal(unit, METER_QUOTA_MONTH);
    assert_int_equal(meter_quota_parse("1/day", &limit, &unit), 0);
    assert_int_equal(unit, METER_QUOTA_DAY);
    assert_int_equal(meter_quota_parse("7/week", &limit, &unit), 0);
    assert_int_equal(unit, METER_QUOTA_WEEK);

    assert_int_equal(meter_quota_parse("10/year", &limit, &unit), -1);
    assert_int_equal(meter_quota_parse("0/day", &limit, &unit), -1);
    assert_int_equal(meter_quota_parse("-5/day", &limit, &unit), -1);
    assert_int_equal(meter_quota_parse("5", &limit, &unit), -1);
    assert_int_equal(meter_quota_parse("5/day ", &limit, &unit), -1);
    assert_int_equal(meter_quota_parse("9223372036854775807/day", &limit,
                                       &unit), -1);
    assert_int_equal(meter_quota_parse(NULL, &limit, &unit), -1);
}


static void
test_quota_period_utc(void **state)
{
    time_t  s, e;

    (void) state;

    /* Wed 2026-11-25 13:14:15Z */
    meter_quota_period(METER_QUOTA_DAY, 0, 1795612455, &s, &e);
    assert_int_equal(s, 1795564800);
    assert_int_equal(e, 1795651200);

    /* ISO week: Monday 2026-11-23 */
    meter_quota_period(METER_QUOTA_WEEK, 0, 1795612455, &s, &e);
    assert_int_equal(s, 1795392000);
    assert_int_equal(e, 1795996800);

    meter_quota_period(METER_QUOTA_MONTH, 0, 1795612455, &s, &e);
    assert_int_equal(s, 1793491200);
    assert_int_equal(e, 1796083200);

    /* December rolls into the next year; the boundary itself starts one */
    meter_quota_period(METER_QUOTA_MONTH, 0, 1796083200, &s, &e);
    assert_int_equal(s, 1796083200);
    assert_int_equal(e, 1798761600);
}


static void
test_quota_period_anchor(void **state)
{
    time_t  s, e;

    (void) state;

    /* anchored on the 31st at 09:30: February clamps to its last day */
    meter_quota_period(METER_QUOTA_MONTH, 1761903000, 1802260800, &s, &e);
    assert_int_equal(s, 1801387800);
    assert_int_equal(e, 1803807000);
    meter_quota_period(METER_QUOTA_MONTH, 1761903000, 1803859200, &s, &e);
    assert_int_equal(s, 1803807000);
    assert_int_equal(e, 1806485400);

    /* before the day's anchor time: the period began the day before */
    meter_quota_period(METER_QUOTA_DAY, 1761903000, 1795612455, &s, &e);
    assert_int_equal(s, 1795599000);
    assert_int_equal(e, 1795599000 + 86400);

    /* a week anchored on a Friday */
    meter_quota_period(METER_QUOTA_WEEK, 1790964000, 1795612455, &s, &e);
    assert_int_equal(s, 1795197600);
    assert_int_equal(e, 1795197600 + 7 * 86400);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_project_writes_every_key),
        cmocka_unit_test(test_project_active_drops_reason),
        cmocka_unit_test(test_project_many_keys_logs_all),
        cmocka_unit_test(test_project_error),
        cmocka_unit_test(test_set_status_changed_projects),
        cmocka_unit_test(test_set_status_repairs_projection),
        cmocka_unit_test(test_set_status_arguments),
        cmocka_unit_test(test_set_status_unknown_and_invalid),
        cmocka_unit_test(test_find_customer),
        cmocka_unit_test(test_credit_set_adds_usage),
        cmocka_unit_test(test_credit_add),
        cmocka_unit_test(test_credit_left),
        cmocka_unit_test(test_quota_parse),
        cmocka_unit_test(test_quota_period_utc),
        cmocka_unit_test(test_quota_period_anchor),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
