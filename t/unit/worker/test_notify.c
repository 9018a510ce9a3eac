
/*
 * Copyright (C) nginx-meter authors
 *
 * notify.c: addresses, RFC 5322 dates, the MIME message (headers, base64
 * parts, RFC 2047 subjects), the webhook signature.
 */


#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "notify.h"


static void
test_addr(void **state)
{
    char  a[64];

    (void) state;

    assert_int_equal(meter_mail_addr("a@b.example", a, sizeof(a)), 0);
    assert_string_equal(a, "a@b.example");
    assert_int_equal(meter_mail_addr("Meter Alerts <al@m.example>", a,
                                     sizeof(a)), 0);
    assert_string_equal(a, "al@m.example");

    assert_int_equal(meter_mail_addr("no-at", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("a@b@c", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("@b", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("a@", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("a b@c", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("a@b\r\nBcc: x@y", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("N <a@b> x", a, sizeof(a)), -1);
    assert_int_equal(meter_mail_addr("a,b@c", a, sizeof(a)), -1);
}


static void
test_date(void **state)
{
    char  d[40];

    (void) state;

    meter_mail_date(1796172067, d, sizeof(d));
    assert_string_equal(d, "Wed, 02 Dec 2026 00:41:07 +0000");
    meter_mail_date(0, d, sizeof(d));
    assert_string_equal(d, "Thu, 01 Jan 1970 00:00:00 +0000");
}


/* the decoded body of the part of type "type" in msg */
static char *
part(const char *msg, const char *type)
{
    const char  *p, *e;
    char        *b64, *out, *w;
    size_t       n;
    int          len;

    p = strstr(msg, type);
    assert_non_null(p);
    p = strstr(p, "\r\n\r\n");
    assert_non_null(p);
    p += 4;
    e = strstr(p, "\r\n--");
    assert_non_null(e);

    b64 = calloc(1, (size_t) (e - p) + 1);
    for (w = b64; p < e; p++) {
        if (*p != '\r' && *p != '\n') {
            *w++ = *p;
        }
    }

    n = strlen(b64);
    out = calloc(1, n + 1);
    len = EVP_DecodeBlock((unsigned char *) out, (unsigned char *) b64,
                          (int) n);
    assert_true(len >= 0);
    /* EVP_DecodeBlock counts the padding bytes as zeros */
    while (n > 0 && b64[n - 1] == '=') {
        n--;
        len--;
    }
    out[len] = '\0';
    free(b64);

    return out;
}


static void
test_build(void **state)
{
    meter_str_t   out;
    meter_mail_t  m;
    char         *text, *html, *line, dec[256], got[512];
    size_t        col;
    int           n;
    const char   *p, *want, *e, *subject;

    (void) state;

    memset(&m, 0, sizeof(m));
    m.from = "Meter <al@m.example>";
    m.to = "dev@acme.example";
    m.subject = "calls usage 10001 in 2026-12 (above 10000)";
    m.text = "Hello,\n\nline two\n";
    m.html = "<p>Hello</p>\n";
    m.message_id = "alert.0123abcd.c0@m.example";
    m.date = 1796172067;

    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_mail_build(&out, &m), 0);

    want = "Date: Wed, 02 Dec 2026 00:41:07 +0000\r\n"
           "From: Meter <al@m.example>\r\n"
           "To: dev@acme.example\r\n"
           "Subject: calls usage 10001 in 2026-12 (above 10000)\r\n"
           "Message-ID: <alert.0123abcd.c0@m.example>\r\n"
           "MIME-Version: 1.0\r\n"
           "Auto-Submitted: auto-generated\r\n"
           "Content-Type: multipart/alternative;\r\n"
           " boundary=\"=_meter_164c7ab5c8fd1e3b7a2b0e17f0472c9a\"\r\n\r\n"
           "--=_meter_164c7ab5c8fd1e3b7a2b0e17f0472c9a\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n";
    assert_memory_equal(out.data, want, strlen(want));

    text = part(out.data, "text/plain");
    html = part(out.data, "text/html");
    /* canonical CRLF line ends inside the parts */
    assert_string_equal(text, "Hello,\r\n\r\nline two\r\n");
    assert_string_equal(html, "<p>Hello</p>\r\n");
    free(text);
    free(html);

    assert_non_null(strstr(out.data, "\r\n--=_meter_164c7ab5c8fd1e3b7a2b0e17f0472c9a--\r\n"));

    /* every line CRLF-terminated and at most 78 characters */
    for (p = out.data, col = 0; *p != '\0'; p++) {
        if (*p == '\n') {
            assert_true(p > out.data && p[-1] == '\r');
            col = 0;
            continue;
        }

        assert_true(++col <= 78);
    }

    meter_str_free(&out);

    /* header injection is refused */
    m.subject = "hi\r\nBcc: victim@example.com";
    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_mail_build(&out, &m), -1);
    meter_str_free(&out);

    /* text only: one part, no multipart */
    m.subject = "x";
    m.html = NULL;
    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_mail_build(&out, &m), 0);
    assert_null(strstr(out.data, "multipart"));
    assert_null(strstr(out.data, "--=_meter_"));
    p = strstr(out.data, "Content-Type: text/plain; charset=utf-8\r\n"
               "Content-Transfer-Encoding: base64\r\n\r\n");
    assert_non_null(p);
    /* "Hello,\r\n\r\nline two\r\n" */
    assert_string_equal(strstr(p, "\r\n\r\n") + 4,
                        "SGVsbG8sDQoNCmxpbmUgdHdvDQo=\r\n");
    meter_str_free(&out);

    /* a UTF-8 subject: encoded words, never a character cut in two */
    subject = "Crédit presque épuisé — il reste 150 unités sur 1 000 "
              "(alerte « low »)";
    m.subject = subject;
    memset(&out, 0, sizeof(out));
    assert_int_equal(meter_mail_build(&out, &m), 0);
    line = strstr(out.data, "Subject: =?UTF-8?B?");
    assert_non_null(line);
    assert_non_null(strstr(line, "?=\r\n =?UTF-8?B?"));

    /* each word decodes to whole characters; together the subject */
    got[0] = '\0';
    for (p = line; (p = strstr(p, "=?UTF-8?B?")) != NULL; p = e + 2) {
        p += 10;
        e = strstr(p, "?=");
        assert_non_null(e);
        assert_true(e - p <= 75);
        n = EVP_DecodeBlock((unsigned char *) dec, (const unsigned char *) p,
                            (int) (e - p));
        assert_true(n > 0);
        n -= (e[-1] == '=') + (e[-2] == '=');
        dec[n] = '\0';
        /* no word starts with a continuation byte */
        assert_true(((unsigned char) dec[0] & 0xc0) != 0x80);
        strcat(got, dec);
        if (strncmp(e + 2, "\r\n ", 3) != 0) {
            break;
        }
    }
    assert_string_equal(got, subject);
    meter_str_free(&out);
}


static void
test_sign(void **state)
{
    char  sig[160];

    (void) state;

    /* printf '1796172067.{"id":"x"}' | openssl dgst -sha256 -hmac whsec_t */
    meter_notify_sign("whsec_t", 1796172067, "{\"id\":\"x\"}", 10, sig,
                      sizeof(sig));
    assert_string_equal(sig, "t=1796172067,v1="
                        "8783b4c4f17ae4dcad05ddafb5891bfdb70aab6f0cc5c40460cfcf4245aa5532");
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_addr),
        cmocka_unit_test(test_date),
        cmocka_unit_test(test_build),
        cmocka_unit_test(test_sign),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
