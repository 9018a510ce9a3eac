
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

#include "notify.h"
#include "provider_util.h"


#define METER_MAIL_B64_LINE  57     /* bytes per 76-char base64 line */
#define METER_MAIL_WORD      45     /* bytes per RFC 2047 encoded word */


typedef struct {
    const char                 *p;
    size_t                      left;
} meter_upload_t;


int
meter_mail_addr(const char *from, char *out, size_t size)
{
    const char  *s, *e, *at;
    size_t       n, i;

    s = strchr(from, '<');
    if (s != NULL) {
        s++;
        e = strchr(s, '>');
        if (e == NULL || e[1] != '\0') {
            return -1;
        }

    } else {
        s = from;
        e = from + strlen(from);
    }

    n = (size_t) (e - s);
    at = memchr(s, '@', n);

    if (n == 0 || n >= size || at == NULL || at == s || at == e - 1
        || memchr(at + 1, '@', (size_t) (e - at - 1)) != NULL)
    {
        return -1;
    }

    for (i = 0; i < n; i++) {
        if ((unsigned char) s[i] <= ' ' || s[i] == '<' || s[i] == '>'
            || s[i] == ',' || s[i] == 0x7f)
        {
            return -1;
        }
    }

    memcpy(out, s, n);
    out[n] = '\0';

    return 0;
}


void
meter_mail_date(time_t t, char *buf, size_t size)
{
    struct tm  tm;

    /* English names whatever the locale: RFC 5322 3.3 */
    static const char  *days[] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri",
                                   "Sat" };
    static const char  *months[] = { "Jan", "Feb", "Mar", "Apr", "May",
                                     "Jun", "Jul", "Aug", "Sep", "Oct",
                                     "Nov", "Dec" };

    gmtime_r(&t, &tm);
    snprintf(buf, size, "%s, %02d %s %04d %02d:%02d:%02d +0000",
             days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon],
             tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}


static int
meter_mail_header_ok(const char *v)
{
    return v != NULL && strpbrk(v, "\r\n") == NULL;
}


/* Subject as is when printable ASCII, else RFC 2047 "B" encoded words cut
 * at UTF-8 character boundaries and folded */
static int
meter_mail_subject(meter_str_t *out, const char *s)
{
    unsigned char  enc[4 * METER_MAIL_WORD / 3 + 4];
    size_t         len, i, n;
    int            ascii;

    len = strlen(s);
    ascii = 1;

    for (i = 0; i < len; i++) {
        if ((unsigned char) s[i] < ' ' || (unsigned char) s[i] > '~') {
            ascii = 0;
            break;
        }
    }

    if (ascii) {
        return meter_str_printf(out, "Subject: %s\r\n", s);
    }

    if (meter_str_add(out, "Subject:", 8) != 0) {
        return -1;
    }

    for (i = 0; i < len; i += n) {
        n = (len - i < METER_MAIL_WORD) ? len - i : METER_MAIL_WORD;

        /* never split a character: back up over continuation bytes */
        while (i + n < len && n > 1
               && ((unsigned char) s[i + n] & 0xc0) == 0x80)
        {
            n--;
        }

        EVP_EncodeBlock(enc, (const unsigned char *) s + i, (int) n);

        if (meter_str_printf(out, "%s=?UTF-8?B?%s?=", i == 0 ? " " : "\r\n ",
                             enc)
            != 0)
        {
            return -1;
        }
    }

    return meter_str_add(out, "\r\n", 2);
}


/* one body part: text with "\n" made CRLF, then base64 in 76-char lines */
static int
meter_mail_part(meter_str_t *out, const char *boundary, const char *type,
    const char *body)
{
    unsigned char  line[4 * METER_MAIL_B64_LINE / 3 + 4];
    meter_str_t    crlf;
    size_t         i, n;
    int            rc;

    memset(&crlf, 0, sizeof(meter_str_t));
    rc = meter_str_add(&crlf, "", 0);

    for (i = 0; body[i] != '\0' && rc == 0; i++) {
        if (body[i] == '\n' && (i == 0 || body[i - 1] != '\r')) {
            rc = meter_str_add(&crlf, "\r\n", 2);

        } else {
            rc = meter_str_add(&crlf, &body[i], 1);
        }
    }

    /* no boundary: the message's own headers came before */
    if (rc == 0 && boundary != NULL) {
        rc = meter_str_printf(out, "--%s\r\nContent-Type: %s; charset=utf-8"
                              "\r\nContent-Transfer-Encoding: base64\r\n\r\n",
                              boundary, type);
    }

    for (i = 0; i < crlf.len && rc == 0; i += n) {
        n = crlf.len - i;
        if (n > METER_MAIL_B64_LINE) {
            n = METER_MAIL_B64_LINE;
        }

        EVP_EncodeBlock(line, (unsigned char *) crlf.data + i, (int) n);
        rc = meter_str_printf(out, "%s\r\n", line);
    }

    meter_str_free(&crlf);

    return rc;
}


int
meter_mail_build(meter_str_t *out, const meter_mail_t *m)
{
    char  date[40], boundary[64], hash[65];

    if (!meter_mail_header_ok(m->from) || !meter_mail_header_ok(m->to)
        || !meter_mail_header_ok(m->subject)
        || !meter_mail_header_ok(m->message_id)
        || strlen(m->message_id) > 200)
    {
        return -1;
    }

    meter_mail_date(m->date, date, sizeof(date));

    /* base64 never contains "=_", so the boundary cannot occur in a
     * part; at most 70 characters (RFC 2046 5.1.1) */
    meter_sha256_hex(m->message_id, strlen(m->message_id), hash);
    snprintf(boundary, sizeof(boundary), "=_meter_%.32s", hash);

    if (meter_str_printf(out, "Date: %s\r\nFrom: %s\r\nTo: %s\r\n", date,
                         m->from, m->to)
        != 0
        || meter_mail_subject(out, m->subject) != 0
        || meter_str_printf(out, "Message-ID: <%s>\r\nMIME-Version: 1.0\r\n"
                            "Auto-Submitted: auto-generated\r\n",
                            m->message_id)
           != 0)
    {
        return -1;
    }

    if (m->html == NULL) {
        return meter_str_printf(out, "Content-Type: text/plain; "
                                "charset=utf-8\r\n"
                                "Content-Transfer-Encoding: base64\r\n\r\n")
               != 0
               || meter_mail_part(out, NULL, "text/plain", m->text) != 0
               ? -1 : 0;
    }

    if (meter_str_printf(out, "Content-Type: multipart/alternative;\r\n"
                         " boundary=\"%s\"\r\n\r\n", boundary)
        != 0
        || meter_mail_part(out, boundary, "text/plain", m->text) != 0
        || meter_mail_part(out, boundary, "text/html", m->html) != 0
        || meter_str_printf(out, "--%s--\r\n", boundary) != 0)
    {
        return -1;
    }

    return 0;
}


/* the same scheme the Stripe webhook check verifies (providers/stripe.c) */
void
meter_notify_sign(const char *secret, time_t t, const char *body,
    size_t len, char *out, size_t size)
{
    char  ts[24], hex[65];

    snprintf(ts, sizeof(ts), "%lld", (long long) t);

    if (meter_hmac_hex(secret, strlen(secret), ts, body, len, hex) != 0) {
        hex[0] = '\0';
    }

    snprintf(out, size, "t=%s,v1=%s", ts, hex);
}


static size_t
meter_upload_read(char *buf, size_t size, size_t nitems, void *data)
{
    meter_upload_t  *u;
    size_t           n;

    u = data;
    n = size * nitems;

    if (n > u->left) {
        n = u->left;
    }

    memcpy(buf, u->p, n);
    u->p += n;
    u->left -= n;

    return n;
}


static size_t
meter_discard(char *buf, size_t size, size_t nitems, void *data)
{
    (void) buf;
    (void) data;

    return size * nitems;
}


int
meter_smtp_send(CURL *curl, const meter_smtp_t *smtp, const char *from_addr,
    const char *to, const meter_str_t *msg, long *code, char *err,
    size_t errlen)
{
    char               rcpt[320], from[320];
    CURLcode           rc;
    meter_upload_t     up;
    struct curl_slist *rcpts;

    snprintf(from, sizeof(from), "<%s>", from_addr);
    snprintf(rcpt, sizeof(rcpt), "<%s>", to);

    rcpts = curl_slist_append(NULL, rcpt);
    if (rcpts == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    up.p = msg->data;
    up.left = msg->len;

    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
    curl_easy_setopt(curl, CURLOPT_URL, smtp->url);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                     smtp->timeout_ms < 10000 ? smtp->timeout_ms : 10000L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, smtp->timeout_ms);
    curl_easy_setopt(curl, CURLOPT_MAIL_FROM, from);
    curl_easy_setopt(curl, CURLOPT_MAIL_RCPT, rcpts);
    curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t) msg->len);
    curl_easy_setopt(curl, CURLOPT_READFUNCTION, meter_upload_read);
    curl_easy_setopt(curl, CURLOPT_READDATA, &up);

    /* smtps:// is TLS from the first byte; for smtp:// STARTTLS */
    if (smtp->starttls == METER_STARTTLS_REQUIRED) {
        curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);

    } else if (smtp->starttls == METER_STARTTLS_TRY) {
        curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_TRY);
    }

    if (smtp->ca_file != NULL) {
        curl_easy_setopt(curl, CURLOPT_CAINFO, smtp->ca_file);
    }

    if (smtp->user != NULL) {
        curl_easy_setopt(curl, CURLOPT_USERNAME, smtp->user);
        curl_easy_setopt(curl, CURLOPT_PASSWORD, smtp->password);
    }

    rc = curl_easy_perform(curl);

    *code = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, code);

    /* the handle keeps no credentials once reset */
    curl_easy_reset(curl);
    curl_slist_free_all(rcpts);

    if (rc != CURLE_OK) {
        if (*code != 0) {
            snprintf(err, errlen, "SMTP %ld: %s", *code,
                     curl_easy_strerror(rc));

        } else {
            snprintf(err, errlen, "SMTP: %s", curl_easy_strerror(rc));
        }

        return -1;
    }

    return 0;
}


int
meter_notify_post(CURL *curl, const char *url, const char *const *headers,
    const char *body, size_t len, long timeout_ms, long *status, char *err,
    size_t errlen)
{
    size_t             i;
    CURLcode           rc;
    struct curl_slist *hl, *n;

    hl = curl_slist_append(NULL, "Content-Type: application/json");
    /* no "Expect: 100-continue" round trip */
    hl = (hl != NULL) ? curl_slist_append(hl, "Expect:") : NULL;

    for (i = 0; hl != NULL && headers != NULL && headers[i] != NULL; i++) {
        n = curl_slist_append(hl, headers[i]);
        if (n == NULL) {
            curl_slist_free_all(hl);
            hl = NULL;
            break;
        }

        hl = n;
    }

    if (hl == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                     timeout_ms < 10000 ? timeout_ms : 10000L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) len);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "meter-worker");
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, meter_discard);

    rc = curl_easy_perform(curl);

    *status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, status);
    curl_easy_reset(curl);
    curl_slist_free_all(hl);

    if (rc != CURLE_OK) {
        snprintf(err, errlen, "%s", curl_easy_strerror(rc));
        return -1;
    }

    if (*status < 200 || *status > 299) {
        snprintf(err, errlen, "HTTP %ld", *status);
        return -1;
    }

    return 0;
}
