
/*
 * Copyright (C) nginx-meter authors
 *
 * providers/file.c (and lib/jsonl.c): exact lines, fsync'ed appends, no
 * duplicate after a "crash" (a new provider on the same file), a torn last
 * line cut off.
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "jsonl.h"
#include "provider.h"


typedef struct {
    char            dir[64];
    char            out[128];
    char            conf[128];
    meter_conf_t   *cf;
} test_ctx_t;


static int
setup(void **state)
{
    test_ctx_t  *t;
    FILE        *f;
    char         err[512];

    t = calloc(1, sizeof(test_ctx_t));
    snprintf(t->dir, sizeof(t->dir), "/tmp/meter-test-file-XXXXXX");
    assert_non_null(mkdtemp(t->dir));
    snprintf(t->out, sizeof(t->out), "%s/out.jsonl", t->dir);
    snprintf(t->conf, sizeof(t->conf), "%s/w.conf", t->dir);

    f = fopen(t->conf, "w");
    fprintf(f, "provider = file\nfile.path = %s\n", t->out);
    fclose(f);

    t->cf = meter_conf_load(t->conf, err, sizeof(err));
    assert_non_null(t->cf);

    *state = t;

    return 0;
}


static int
teardown(void **state)
{
    test_ctx_t  *t;
    char         cmd[128];

    t = *state;
    meter_conf_free(t->cf);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", t->dir);
    assert_int_equal(system(cmd), 0);
    free(t);

    return 0;
}


static char *
slurp(const char *path)
{
    FILE    *f;
    char    *buf;
    size_t   n;

    buf = calloc(1, 65536);
    f = fopen(path, "r");
    assert_non_null(f);
    n = fread(buf, 1, 65535, f);
    buf[n] = '\0';
    fclose(f);

    return buf;
}


static const char  kh[] =
    "8174099687a26621f4e2cdd7cc03b3dacedb3fb962255b1aafd033cabe831530";


static void
record(meter_record_t *r, const char *key, const char *customer,
    uint64_t q)
{
    memset(r, 0, sizeof(meter_record_t));
    r->idempotency_key = key;
    r->key_hash = kh;
    r->customer = customer;
    r->meter = "calls";
    r->period_start = 1795510800;
    r->period_end = 1795510800 + 3600;
    r->quantity = q;
}


static void
test_lines(void **state)
{
    test_ctx_t           *t;
    meter_provider_t      p;
    meter_record_t        r;
    meter_send_result_t   res;
    char                  err[512], *text;

    t = *state;

    assert_int_equal(meter_provider_by_name("file", &p), 0);
    assert_string_equal(p.name, "file");
    assert_null(p.lookup);
    assert_int_equal(p.init(&p, t->cf, err, sizeof(err)), 0);

    record(&r, "k1", NULL, 15);
    assert_int_equal(p.send(&p, &r, &res), METER_SEND_OK);
    record(&r, "k2", "acme\"inc", 18446744073709551615ULL);
    assert_int_equal(p.send(&p, &r, &res), METER_SEND_OK);
    /* the same key again: written once */
    assert_int_equal(p.send(&p, &r, &res), METER_SEND_OK);

    p.cleanup(&p);

    text = slurp(t->out);
    assert_string_equal(text,
        "{\"key_hash\":\"8174099687a26621f4e2cdd7cc03b3dacedb3fb962255b1aafd0"
        "33cabe831530\",\"customer\":null,\"meter\":\"calls\",\"period_start\""
        ":\"2026-11-24T09:00:00Z\",\"period_end\":\"2026-11-24T10:00:00Z\","
        "\"quantity\":15,\"idempotency_key\":\"k1\"}\n"
        "{\"key_hash\":\"8174099687a26621f4e2cdd7cc03b3dacedb3fb962255b1aafd0"
        "33cabe831530\",\"customer\":\"acme\\\"inc\",\"meter\":\"calls\","
        "\"period_start\":\"2026-11-24T09:00:00Z\",\"period_end\":"
        "\"2026-11-24T10:00:00Z\",\"quantity\":18446744073709551615,"
        "\"idempotency_key\":\"k2\"}\n");
    free(text);
}


static void
test_restart(void **state)
{
    test_ctx_t           *t;
    meter_provider_t      p;
    meter_record_t        r;
    meter_send_result_t   res;
    char                  err[512], *text;
    FILE                 *f;

    t = *state;

    /* an earlier run wrote k1, then crashed in the middle of k2 */
    f = fopen(t->out, "w");
    fputs("{\"idempotency_key\":\"k1\",\"quantity\":5}\n"
          "{\"key_hash\":\"81740996", f);
    fclose(f);

    assert_int_equal(meter_provider_by_name("file", &p), 0);
    assert_int_equal(p.init(&p, t->cf, err, sizeof(err)), 0);

    /* k1 is resent after the crash: not written again */
    record(&r, "k1", NULL, 5);
    assert_int_equal(p.send(&p, &r, &res), METER_SEND_OK);
    record(&r, "k2", NULL, 7);
    assert_int_equal(p.send(&p, &r, &res), METER_SEND_OK);

    p.cleanup(&p);

    text = slurp(t->out);
    assert_string_equal(text,
        "{\"idempotency_key\":\"k1\",\"quantity\":5}\n"
        "{\"key_hash\":\"8174099687a26621f4e2cdd7cc03b3dacedb3fb962255b1aafd0"
        "33cabe831530\",\"customer\":null,\"meter\":\"calls\",\"period_start\""
        ":\"2026-11-24T09:00:00Z\",\"period_end\":\"2026-11-24T10:00:00Z\","
        "\"quantity\":7,\"idempotency_key\":\"k2\"}\n");
    free(text);
}


/* the dedupe set is bounded: two generations of keys, the file's tail */
static void
test_jsonl_bounded(void **state)
{
    int            i;
    char           key[32], line[96], err[256];
    size_t         tail, keep;
    test_ctx_t    *t;
    meter_jsonl_t  j;

    t = *state;
    tail = meter_jsonl_tail;
    keep = meter_jsonl_keep;
    meter_jsonl_keep = 4;

    assert_int_equal(meter_jsonl_open(&j, t->out, err, sizeof(err)), 0);

    for (i = 0; i < 10; i++) {
        snprintf(key, sizeof(key), "k%02d", i);
        snprintf(line, sizeof(line), "{\"idempotency_key\":\"%s\"}\n", key);
        assert_int_equal(meter_jsonl_write(&j, key, line, strlen(line), err,
                                           sizeof(err)), 0);
    }

    /* generations of 4: the newest 4 to 8 keys are known, k00-k01 gone */
    for (i = 6; i < 10; i++) {
        snprintf(key, sizeof(key), "k%02d", i);
        assert_true(meter_jsonl_has(&j, key));
    }

    assert_false(meter_jsonl_has(&j, "k00"));
    assert_false(meter_jsonl_has(&j, "k01"));
    assert_true(j.keys.n + j.old.n <= 8);

    meter_jsonl_close(&j);

    /* reopened with a 50-byte tail (each line is 25): only the last one or
     * two lines are scanned, the first of the tail being cut */
    meter_jsonl_keep = keep;
    meter_jsonl_tail = 50;

    assert_int_equal(meter_jsonl_open(&j, t->out, err, sizeof(err)), 0);
    assert_true(meter_jsonl_has(&j, "k09"));
    assert_false(meter_jsonl_has(&j, "k05"));
    meter_jsonl_close(&j);

    meter_jsonl_tail = tail;
}


static void
test_bad_path(void **state)
{
    test_ctx_t        *t;
    meter_provider_t   p;
    meter_conf_t      *cf;
    FILE              *f;
    char               err[512];

    t = *state;

    f = fopen(t->conf, "w");
    fprintf(f, "file.path = %s/missing/dir/out.jsonl\n", t->dir);
    fclose(f);

    cf = meter_conf_load(t->conf, err, sizeof(err));
    assert_non_null(cf);

    assert_int_equal(meter_provider_by_name("file", &p), 0);
    assert_int_equal(p.init(&p, cf, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "\"file.path\": cannot open"));

    meter_conf_free(cf);

    assert_int_equal(meter_provider_by_name("paypal", &p), -1);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test_setup_teardown(test_lines, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_jsonl_bounded, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_bad_path, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
