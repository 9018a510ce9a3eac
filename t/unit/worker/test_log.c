
/*
 * Copyright (C) nginx-meter authors
 *
 * log.c: a value from outside with a newline cannot start a forged
 * journald line; the escape itself, and what meter_log() writes to stderr
 * (captured in a file).
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

#include "log.h"


static void
test_escape(void **state)
{
    char    out[64];
    size_t  n;

    (void) state;

    n = meter_log_escape("cus_1\n<0>forged\r\t\x1b[31m\x7f", out,
                         sizeof(out));
    assert_string_equal(out,
                        "cus_1\\x0a<0>forged\\x0d\\x09\\x1b[31m\\x7f");
    assert_int_equal(n, strlen(out));

    /* UTF-8 passes */
    meter_log_escape("M\xc3\xbcller", out, sizeof(out));
    assert_string_equal(out, "M\xc3\xbcller");

    /* truncated, never inside an escape */
    meter_log_escape("abc\ndef", out, 6);
    assert_string_equal(out, "abc");
    meter_log_escape("abcdef", out, 4);
    assert_string_equal(out, "abc");
    meter_log_escape("\n", out, 5);
    assert_string_equal(out, "\\x0a");
}


static void
test_log_line(void **state)
{
    int    fd, saved;
    char   path[] = "/tmp/test_log_XXXXXX", buf[512];
    FILE  *f;

    (void) state;

    fd = mkstemp(path);
    assert_true(fd >= 0);

    fflush(stderr);
    saved = dup(2);
    assert_true(saved >= 0);
    assert_int_equal(dup2(fd, 2), 2);

    meter_log_prefix = 1;
    meter_log(LOG_NOTICE, "webhook stripe: no customer for %s/%s",
              "cus_x\n<0>forged line", "-");

    fflush(stderr);
    assert_int_equal(dup2(saved, 2), 2);
    close(saved);
    close(fd);

    f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(buf, sizeof(buf), f));
    assert_string_equal(buf, "<5>webhook stripe: no customer for "
                        "cus_x\\x0a<0>forged line/-\n");
    /* one line only */
    assert_null(fgets(buf, sizeof(buf), f));
    fclose(f);
    unlink(path);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_escape),
        cmocka_unit_test(test_log_line),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
