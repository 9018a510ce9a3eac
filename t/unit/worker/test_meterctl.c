
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl's pure parts: API key generation, the customer id of an email,
 * and the command line (which command runs with which arguments).  Linked
 * with worker/ctl's objects but main.c (meterctl.h).
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <sysexits.h>

#include "meterctl.h"


static void
test_base32_rfc4648(void **state)
{
    char  out[64];

    (void) state;

    /* RFC 4648 section 10 vectors, lowercase, no padding */
    meterctl_base32((const unsigned char *) "f", 1, out);
    assert_string_equal(out, "my");
    meterctl_base32((const unsigned char *) "foob", 4, out);
    assert_string_equal(out, "mzxw6yq");
    meterctl_base32((const unsigned char *) "foobar", 6, out);
    assert_string_equal(out, "mzxw6ytboi");
}


static void
test_key_format_and_entropy(void **state)
{
    char    a[METERCTL_KEY_LEN + 1], b[METERCTL_KEY_LEN + 1];
    size_t  i;
    int     seen[32];

    (void) state;

    assert_int_equal(meterctl_key_new(a), 0);
    assert_int_equal(meterctl_key_new(b), 0);

    /* 160 random bits: 32 base32 chars after the prefix */
    assert_int_equal(METERCTL_KEY_BYTES * 8, 160);
    assert_int_equal(strlen(a), 40);
    assert_memory_equal(a, "mk_live_", 8);
    assert_int_equal(strspn(a + 8, meterctl_b32), 32);
    assert_string_not_equal(a, b);

    /* the body uses the whole alphabet over a few keys (not a constant or
     * a narrow range) */
    memset(seen, 0, sizeof(seen));
    for (i = 0; i < 64; i++) {
        size_t  j;

        assert_int_equal(meterctl_key_new(a), 0);
        for (j = 8; j < 40; j++) {
            seen[strchr(meterctl_b32, a[j]) - meterctl_b32] = 1;
        }
    }

    for (i = 0; i < 32; i++) {
        assert_true(seen[i]);
    }
}


static void
test_customer_of_email(void **state)
{
    char  a[72], b[72];

    (void) state;

    meterctl_customer_of_email("Alice@Example.COM", a, sizeof(a));
    meterctl_customer_of_email("alice@example.com", b, sizeof(b));
    assert_string_equal(a, b);
    /* sha256("alice@example.com") starts ff8d9819fc0e12bf0d24 */
    assert_string_equal(a, "c_ff8d9819fc0e12bf0d24");
    assert_true(meterctl_valid_id(a));

    meterctl_customer_of_email("bob@example.com", b, sizeof(b));
    assert_string_not_equal(a, b);
}


static void
test_valid_email(void **state)
{
    (void) state;

    assert_true(meterctl_valid_email("a@b.c"));
    assert_false(meterctl_valid_email("nope"));
    assert_false(meterctl_valid_email("@b.c"));
    assert_false(meterctl_valid_email("a@"));
    assert_false(meterctl_valid_email("a@b@c"));
    assert_false(meterctl_valid_email("a b@c.d"));
    assert_false(meterctl_valid_email("a\t@c.d"));
}


/* runs meterctl_select on a NULL-terminated argv */
static int
select_args(meterctl_opts_t *o, const meterctl_cmd_t **cmd, ...)
{
    char        *argv[32];
    int          argc;
    va_list      ap;
    const char  *a;

    memset(o, 0, sizeof(meterctl_opts_t));
    *cmd = NULL;

    argc = 0;
    argv[argc++] = (char *) "meterctl";

    va_start(ap, cmd);
    while ((a = va_arg(ap, const char *)) != NULL) {
        argv[argc++] = (char *) a;
    }
    va_end(ap);

    argv[argc] = NULL;

    return meterctl_select(argc, argv, o, cmd);
}


static void
test_select(void **state)
{
    meterctl_opts_t        o;
    const meterctl_cmd_t  *cmd;

    (void) state;

    assert_int_equal(select_args(&o, &cmd, "--redis", "unix:/r.sock", "keys",
                                 "revoke", "mk_live_ab12", "--json", NULL),
                     -1);
    assert_string_equal(cmd->group, "keys");
    assert_string_equal(cmd->name, "revoke");
    assert_int_equal(o.nargs, 1);
    assert_string_equal(o.args[0], "mk_live_ab12");
    assert_int_equal(o.json, 1);
    assert_string_equal(o.redis, "unix:/r.sock");

    /* options before and after the positional ones */
    assert_int_equal(select_args(&o, &cmd, "credit", "set", "--meter",
                                 "calls", "acme", "10", "-c", "/etc/w.conf",
                                 NULL), -1);
    assert_string_equal(cmd->name, "set");
    assert_string_equal(o.meter, "calls");
    assert_int_equal(o.nargs, 2);
    assert_string_equal(o.args[0], "acme");
    assert_string_equal(o.args[1], "10");
    assert_string_equal(o.config, "/etc/w.conf");

    assert_int_equal(select_args(&o, &cmd, "register", "--email", "a@b.c",
                                 "--plan", "pro", NULL), -1);
    assert_null(cmd->name);
    assert_string_equal(o.email, "a@b.c");
    assert_string_equal(o.plan, "pro");
    assert_int_equal(o.nargs, 0);
}


static void
test_select_errors_and_help(void **state)
{
    meterctl_opts_t        o;
    const meterctl_cmd_t  *cmd;

    (void) state;

    /* an option of another command */
    assert_int_equal(select_args(&o, &cmd, "keys", "list", "acme",
                                 "--meter", "calls", NULL), EX_USAGE);
    assert_int_equal(select_args(&o, &cmd, "delinquent", "clear", "acme",
                                 "--reason", "invoice_overdue", NULL),
                     EX_USAGE);
    assert_int_equal(select_args(&o, &cmd, "keys", "frob", NULL), EX_USAGE);
    assert_int_equal(select_args(&o, &cmd, "keys", NULL), EX_USAGE);
    assert_int_equal(select_args(&o, &cmd, "nope", NULL), EX_USAGE);
    assert_int_equal(select_args(&o, &cmd, NULL), EX_USAGE);
    assert_int_equal(select_args(&o, &cmd, "status", "--bogus", NULL),
                     EX_USAGE);
    assert_null(cmd);

    assert_int_equal(select_args(&o, &cmd, "keys", "rotate", "--help", NULL),
                     EX_OK);
    assert_int_equal(select_args(&o, &cmd, "--help", NULL), EX_OK);
    assert_null(cmd);
}


static void
test_every_command_has_its_own_usage(void **state)
{
    size_t  i, j;
    char    head[96];

    (void) state;

    for (i = 0; i < METERCTL_NCMDS; i++) {
        snprintf(head, sizeof(head), "Usage: meterctl %s%s%s",
                 meterctl_cmds[i].group, meterctl_cmds[i].name ? " " : "",
                 meterctl_cmds[i].name ? meterctl_cmds[i].name : "");
        assert_memory_equal(meterctl_cmds[i].usage, head, strlen(head));

        for (j = 0; j < i; j++) {
            assert_string_not_equal(meterctl_cmds[i].usage,
                                    meterctl_cmds[j].usage);
        }
    }
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_base32_rfc4648),
        cmocka_unit_test(test_key_format_and_entropy),
        cmocka_unit_test(test_customer_of_email),
        cmocka_unit_test(test_valid_email),
        cmocka_unit_test(test_select),
        cmocka_unit_test(test_select_errors_and_help),
        cmocka_unit_test(test_every_command_has_its_own_usage),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
