
/*
 * Copyright (C) nginx-meter authors
 *
 * The alert channels' transports: an RFC 5322 / MIME multipart/alternative
 * message sent through libcurl's SMTP (smtp://, smtps://, STARTTLS), and a
 * JSON POST for webhooks, signed like Stripe-Signature
 * ("t=UNIX,v1=HEX(HMAC-SHA256(secret, "UNIX.BODY"))").  Building a message
 * and signing are pure, for the unit tests; the sends are the only I/O.
 */


#ifndef _METER_NOTIFY_H_INCLUDED_
#define _METER_NOTIFY_H_INCLUDED_


#include <stddef.h>
#include <time.h>

#include <curl/curl.h>

#include "util.h"


#define METER_NOTIFY_SIG_HEADER    "Meter-Signature"
#define METER_NOTIFY_ID_HEADER     "Meter-Alert-Id"


typedef enum {
    METER_STARTTLS_OFF = 0,     /* smtp:// in the clear (a local relay) */
    METER_STARTTLS_TRY,
    METER_STARTTLS_REQUIRED     /* refuse to send without TLS */
} meter_starttls_e;


typedef struct {
    const char                 *url;        /* smtp://host:port */
    const char                 *user;       /* NULL: no AUTH */
    const char                 *password;   /* never logged */
    const char                 *ca_file;    /* NULL: the system's */
    meter_starttls_e            starttls;
    long                        timeout_ms;
} meter_smtp_t;


typedef struct {
    const char                 *from;       /* header, "Name <a@b>" */
    const char                 *to;         /* one address */
    const char                 *subject;    /* UTF-8, one line */
    const char                 *text;       /* UTF-8, "\n" lines */
    const char                 *html;       /* NULL: text only */
    const char                 *message_id; /* without <> */
    time_t                      date;
} meter_mail_t;


/* the address of "Name <a@b.c>" or "a@b.c" into out; -1 when it is not
 * one plain address (no CR/LF, one "@", no spaces) */
int meter_mail_addr(const char *from, char *out, size_t size);

/* "Wed, 02 Dec 2026 00:41:07 +0000" (RFC 5322 3.3); buf >= 32 */
void meter_mail_date(time_t t, char *buf, size_t size);

/* the whole message, CRLF lines, bodies base64; 0 or -1 (bad header
 * value: CR/LF in subject, from or to; or out of memory) */
int meter_mail_build(meter_str_t *out, const meter_mail_t *m);

/* Meter-Signature value for body at t; out >= 80 */
void meter_notify_sign(const char *secret, time_t t, const char *body,
    size_t len, char *out, size_t size);

/* one SMTP transaction; 0, or -1 with err (curl's reason and the server's
 * last reply code; never the credentials) and *code the last SMTP reply
 * code (0: none) */
int meter_smtp_send(CURL *curl, const meter_smtp_t *smtp,
    const char *from_addr, const char *to, const meter_str_t *msg,
    long *code, char *err, size_t errlen);

/* POST body as application/json with headers ("Name: value", NULL ends);
 * 0 on 2xx, else -1 with err ("HTTP 500", or the transport error) and
 * *status the HTTP status (0: no answer) */
int meter_notify_post(CURL *curl, const char *url,
    const char *const *headers, const char *body, size_t len,
    long timeout_ms, long *status, char *err, size_t errlen);


#endif /* _METER_NOTIFY_H_INCLUDED_ */
