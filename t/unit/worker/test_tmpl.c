
/*
 * Copyright (C) nginx-meter authors
 *
 * tmpl.c: placeholder checks and expansion (plain and HTML-escaped).
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "tmpl.h"


static const char *const  names[] = { "customer", "value", "meter", NULL };


static void
test_check(void **state)
{
    char  err[256];

    (void) state;

    assert_int_equal(meter_tmpl_check("no placeholders", names, err,
                                      sizeof(err)), 0);
    assert_int_equal(meter_tmpl_check("{{customer}} used {{ value }} "
                                      "{{meter}}", names, err, sizeof(err)),
                     0);
    /* single braces are text */
    assert_int_equal(meter_tmpl_check("{json: {\"a\": 1}}", names, err,
                                      sizeof(err)), 0);

    assert_int_equal(meter_tmpl_check("ok\n\nhi {{valu}}", names, err,
                                      sizeof(err)), -1);
    assert_string_equal(err, "line 3: unknown placeholder {{valu}}");

    assert_int_equal(meter_tmpl_check("a {{customer", names, err,
                                      sizeof(err)), -1);
    assert_string_equal(err, "line 1: unterminated or empty placeholder "
                        "(expected {{name}})");

    assert_int_equal(meter_tmpl_check("{{ }}", names, err, sizeof(err)), -1);
    assert_int_equal(meter_tmpl_check("{{a\nb}}", names, err, sizeof(err)),
                     -1);
}


static void
test_expand(void **state)
{
    meter_str_t       out;
    meter_tmpl_var_t  vars[] = {
        { "customer", "acme <&> \"co\" 'x'" },
        { "value", "10000" },
        { "meter", NULL },
    };

    (void) state;

    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_tmpl_expand(&out, "{{customer}} used {{ value }}"
                                       " [{{meter}}] {{other}}.", vars, 3, 0),
                     0);
    assert_string_equal(out.data, "acme <&> \"co\" 'x' used 10000 [] .");
    meter_str_free(&out);

    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_tmpl_expand(&out, "<b>{{customer}}</b>", vars, 3,
                                       1), 0);
    assert_string_equal(out.data,
                        "<b>acme &lt;&amp;&gt; &quot;co&quot; &#39;x&#39;"
                        "</b>");
    meter_str_free(&out);

    /* an unterminated placeholder stays as written */
    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_tmpl_expand(&out, "{{value}} {{val", vars, 3, 0),
                     0);
    assert_string_equal(out.data, "10000 {{val");
    meter_str_free(&out);

    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_tmpl_expand(&out, "", vars, 3, 0), 0);
    assert_string_equal(out.data, "");
    meter_str_free(&out);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_check),
        cmocka_unit_test(test_expand),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
