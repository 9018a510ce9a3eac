
/*
 * Copyright (C) nginx-meter authors
 *
 * The alert rules and settings of the worker config, checked at start,
 * by "meter-worker -t" and on reload (a bad rule keeps the old set).
 */


#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alerts.h"
#include "log.h"
#include "tmpl.h"
#include "util.h"


#define METER_ALERT_FILE_MAX  (64 * 1024)


const char *const  meter_alert_vars[] = {
    "rule", "condition", "customer", "email", "name", "meter", "value",
    "threshold", "period", "period_start", "period_end", "granted",
    "remaining", "reason", "since", "fired_at", "alert_id", NULL
};


/* built-in templates, per kind: subject, text, html */
static const char  *meter_alert_defaults[][3] = {

    /* METER_ALERT_CREDIT */
    { "Your {{meter}} credit is running low: {{remaining}} left",
      "Hello {{name}},\n\n"
      "your prepaid {{meter}} credit is down to {{remaining}} of "
      "{{granted}} units.\nTop up to keep your API calls going.\n\n"
      "(alert {{rule}}: {{condition}}, account {{customer}})\n",
      "<p>Hello {{name}},</p>\n"
      "<p>your prepaid <b>{{meter}}</b> credit is down to "
      "<b>{{remaining}}</b> of {{granted}} units.<br>\n"
      "Top up to keep your API calls going.</p>\n"
      "<p><small>alert {{rule}}: {{condition}}, account {{customer}}"
      "</small></p>\n" },

    /* METER_ALERT_USAGE */
    { "{{meter}} usage {{value}} in {{period}} (above {{threshold}})",
      "Hello {{name}},\n\n"
      "account {{customer}} used {{value}} {{meter}} in {{period}} "
      "({{period_start}} to {{period_end}}), above {{threshold}}.\n\n"
      "(alert {{rule}}: {{condition}})\n",
      "<p>Hello {{name}},</p>\n"
      "<p>account {{customer}} used <b>{{value}}</b> {{meter}} in "
      "{{period}} ({{period_start}} to {{period_end}}), above "
      "{{threshold}}.</p>\n"
      "<p><small>alert {{rule}}: {{condition}}</small></p>\n" },

    /* METER_ALERT_REFUSED */
    { "{{customer}}: {{value}} refused calls in {{period}}",
      "Account {{customer}} ({{email}}) made {{value}} calls that were "
      "refused (402) in {{period}} ({{period_start}} to {{period_end}}), "
      "above {{threshold}}.\nStatus reason: {{reason}}\n\n"
      "(alert {{rule}}: {{condition}})\n",
      "<p>Account <b>{{customer}}</b> ({{email}}) made <b>{{value}}</b> "
      "calls that were refused (402) in {{period}} ({{period_start}} to "
      "{{period_end}}), above {{threshold}}.<br>\n"
      "Status reason: {{reason}}</p>\n"
      "<p><small>alert {{rule}}: {{condition}}</small></p>\n" },

    /* METER_ALERT_DELINQUENT */
    { "Payment needed for account {{customer}}",
      "Hello {{name}},\n\n"
      "account {{customer}} is delinquent since {{since}} ({{reason}}): "
      "API calls are refused until it is settled.\n\n"
      "(alert {{rule}})\n",
      "<p>Hello {{name}},</p>\n"
      "<p>account <b>{{customer}}</b> is delinquent since {{since}} "
      "({{reason}}): API calls are refused until it is settled.</p>\n"
      "<p><small>alert {{rule}}</small></p>\n" }
};


/* up to max whitespace-separated words of s; the count, max + 1 when
 * there are more, -1 when one is too long */
static int
meter_words(const char *s, char w[][64], int max)
{
    size_t  n;
    int     count;

    for (count = 0; ; count++) {
        while (*s == ' ' || *s == '\t') {
            s++;
        }

        if (*s == '\0') {
            return count;
        }

        if (count == max) {
            return max + 1;
        }

        n = strcspn(s, " \t");
        if (n >= 64) {
            return -1;
        }

        memcpy(w[count], s, n);
        w[count][n] = '\0';
        s += n;
    }
}


static int
meter_alert_period(const char *w, int *period)
{
    if (strcmp(w, "hour") == 0) {
        *period = METER_HOUR;

    } else if (strcmp(w, "day") == 0) {
        *period = METER_DAY;

    } else if (strcmp(w, "month") == 0) {
        *period = METER_ALERT_MONTH;

    } else {
        return -1;
    }

    return 0;
}


static int
meter_alert_meter_ok(const char *s)
{
    size_t  n;

    n = strlen(s);

    return n > 0 && n <= MTR_METER_MAX && strspn(s, MTR_NAME_CHARS) == n;
}


int
meter_alert_parse_when(const char *s, meter_alert_rule_t *r, char *err,
    size_t errlen)
{
    char    w[5][64];
    size_t  len;
    int     n;

    memset(w, 0, sizeof(w));
    r->percent = 0;
    r->threshold = 0;
    r->period = 0;

    n = meter_words(s, w, 5);

    if (strcmp(w[0], "delinquent") == 0 && n == 1) {
        r->kind = METER_ALERT_DELINQUENT;
        return 0;
    }

    if (strcmp(w[0], "credit_below") == 0) {
        r->kind = METER_ALERT_CREDIT;
        len = strlen(w[1]);

        if (len > 1 && w[1][len - 1] == '%') {
            w[1][--len] = '\0';
            r->percent = 1;
        }

        if (n != 2 || meter_parse_u64(w[1], len, &r->threshold) != 0
            || (r->percent && (r->threshold < 1 || r->threshold > 100))
            || (!r->percent && r->threshold == 0))
        {
            snprintf(err, errlen, "expected \"credit_below P%%\" (1-100, of "
                     "the credit granted) or \"credit_below N\" (units "
                     "left, N > 0)");
            return -1;
        }

        return 0;
    }

    if (strcmp(w[0], "usage_above") == 0) {
        r->kind = METER_ALERT_USAGE;

        if (n != 5
            || meter_parse_u64(w[1], strlen(w[1]), &r->threshold) != 0
            || !meter_alert_meter_ok(w[2]) || strcmp(w[3], "per") != 0
            || meter_alert_period(w[4], &r->period) != 0)
        {
            snprintf(err, errlen, "expected \"usage_above N METER per "
                     "hour|day|month\"");
            return -1;
        }

        memcpy(r->meter, w[2], strlen(w[2]) + 1);    /* <= 32, checked */
        return 0;
    }

    /* the meter counting 402s is "alert.NAME.meter" */
    if (strcmp(w[0], "refused_above") == 0) {
        r->kind = METER_ALERT_REFUSED;

        if (n != 4
            || meter_parse_u64(w[1], strlen(w[1]), &r->threshold) != 0
            || strcmp(w[2], "per") != 0
            || meter_alert_period(w[3], &r->period) != 0)
        {
            snprintf(err, errlen, "expected \"refused_above N per "
                     "hour|day|month\"");
            return -1;
        }

        return 0;
    }

    snprintf(err, errlen, "expected \"credit_below P%%\", \"credit_below "
             "N\", \"usage_above N METER per PERIOD\", \"refused_above N per "
             "PERIOD\" or \"delinquent\"");
    return -1;
}


static int
meter_alert_url_ok(const char *u)
{
    return (strncmp(u, "https://", 8) == 0 && u[8] != '\0')
           || (strncmp(u, "http://", 7) == 0 && u[7] != '\0');
}


int
meter_alert_parse_notify(const char *s, meter_alert_rule_t *r, char *err,
    size_t errlen)
{
    char             *copy, *item, *save, *t, *e, addr[256];
    meter_channel_t  *ch;
    int               rc;

    copy = strdup(s);
    if (copy == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    rc = 0;

    for (item = strtok_r(copy, ",", &save); item != NULL && rc == 0;
         item = strtok_r(NULL, ",", &save))
    {
        while (isspace((unsigned char) *item)) {
            item++;
        }

        e = item + strlen(item);
        while (e > item && isspace((unsigned char) e[-1])) {
            *--e = '\0';
        }

        if (*item == '\0') {
            continue;
        }

        if (r->nch == METER_ALERT_MAX_CH) {
            snprintf(err, errlen, "at most %d channels", METER_ALERT_MAX_CH);
            rc = -1;
            break;
        }

        ch = &r->ch[r->nch];

        if (strncmp(item, "email:", 6) == 0) {
            ch->kind = METER_CH_EMAIL;
            t = item + 6;

            if (strcmp(t, "customer") != 0
                && (meter_mail_addr(t, addr, sizeof(addr)) != 0
                    || strcmp(addr, t) != 0))
            {
                snprintf(err, errlen, "\"%s\": expected email:customer or "
                         "email:ADDRESS", item);
                rc = -1;
                break;
            }

        } else if (strncmp(item, "webhook:", 8) == 0
                   || strncmp(item, "slack:", 6) == 0)
        {
            ch->kind = (item[0] == 'w') ? METER_CH_WEBHOOK : METER_CH_SLACK;
            t = strchr(item, ':') + 1;

            if (!meter_alert_url_ok(t) || strpbrk(t, " \t\r\n") != NULL) {
                snprintf(err, errlen, "\"%s\": expected an http:// or "
                         "https:// URL", item);
                rc = -1;
                break;
            }

        } else {
            snprintf(err, errlen, "\"%s\": expected email:, webhook: or "
                     "slack:", item);
            rc = -1;
            break;
        }

        ch->target = strdup(t);
        if (ch->target == NULL) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
            break;
        }

        r->nch++;
    }

    free(copy);

    if (rc == 0 && r->nch == 0) {
        snprintf(err, errlen, "no channel (email:customer, email:ADDRESS, "
                 "webhook:URL, slack:URL)");
        rc = -1;
    }

    return rc;
}


static void
meter_alert_rule_free(meter_alert_rule_t *r)
{
    size_t  i;

    for (i = 0; i < r->nch; i++) {
        free(r->ch[i].target);
    }

    free(r->name);
    free(r->when);
    free(r->subject);
    free(r->text);
    free(r->html);
}


void
meter_alerts_free(meter_alerts_t *a)
{
    size_t  i;

    if (a == NULL) {
        return;
    }

    for (i = 0; i < a->nrules; i++) {
        meter_alert_rule_free(&a->rules[i]);
    }

    if (a->smtp_password != NULL) {
        explicit_bzero(a->smtp_password, strlen(a->smtp_password));
    }

    if (a->webhook_secret != NULL) {
        explicit_bzero(a->webhook_secret, strlen(a->webhook_secret));
    }

    if (a->curl != NULL) {
        curl_easy_cleanup(a->curl);
    }

    free(a->rules);
    free(a->from);
    free(a->smtp_url);
    free(a->smtp_ca);
    free(a->smtp_user);
    free(a->smtp_password);
    free(a->webhook_secret);
    free(a);
}


/* a whole file into *out (malloc'ed); 0, or -1 with err */
static int
meter_alert_read_file(const char *path, char **out, char *err, size_t errlen)
{
    FILE    *f;
    char    *buf;
    size_t   n;

    f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "cannot open \"%s\": %s", path,
                 strerror(errno));
        return -1;
    }

    buf = malloc(METER_ALERT_FILE_MAX + 1);
    if (buf == NULL) {
        fclose(f);
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    n = fread(buf, 1, METER_ALERT_FILE_MAX + 1, f);
    fclose(f);

    if (n > METER_ALERT_FILE_MAX) {
        free(buf);
        snprintf(err, errlen, "\"%s\" is longer than %d bytes", path,
                 METER_ALERT_FILE_MAX);
        return -1;
    }

    buf[n] = '\0';

    if (strlen(buf) != n) {
        free(buf);
        snprintf(err, errlen, "\"%s\" holds a NUL byte", path);
        return -1;
    }

    *out = buf;

    return 0;
}


/*
 * "alert.NAME.template = PATH": PATH.txt (the text part; a first line
 * "Subject: ..." is the subject) and, when it exists, PATH.html.
 */
static int
meter_alert_templates(meter_alert_rule_t *r, const char *path, char *err,
    size_t errlen)
{
    char   file[4096], *text, *body, *nl;
    FILE  *f;

    snprintf(file, sizeof(file), "%s.txt", path);
    if (meter_alert_read_file(file, &text, err, errlen) != 0) {
        return -1;
    }

    body = text;

    if (strncmp(text, "Subject:", 8) == 0) {
        nl = strchr(text, '\n');
        body = (nl != NULL) ? nl + 1 : text + strlen(text);
        if (nl != NULL) {
            *nl = '\0';
            if (nl > text && nl[-1] == '\r') {
                nl[-1] = '\0';
            }
        }

        if (r->subject == NULL) {
            r->subject = strdup(text + 8 + strspn(text + 8, " "));
        }

        /* the blank line after the subject, as in a mail */
        if (body[0] == '\n') {
            body++;

        } else if (body[0] == '\r' && body[1] == '\n') {
            body += 2;
        }
    }

    r->text = strdup(body);
    free(text);

    if (r->text == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    snprintf(file, sizeof(file), "%s.html", path);
    f = fopen(file, "r");
    if (f == NULL) {
        return 0;
    }

    fclose(f);

    return meter_alert_read_file(file, &r->html, err, errlen);
}


static int
meter_alert_dup(char **dst, const char *src)
{
    *dst = (src != NULL) ? strdup(src) : NULL;

    return (src != NULL && *dst == NULL) ? -1 : 0;
}


int
meter_alert_rule_defaults(meter_alert_rule_t *r)
{
    if ((r->subject == NULL
         && meter_alert_dup(&r->subject, meter_alert_defaults[r->kind][0])
            != 0)
        || (r->text == NULL
            && (meter_alert_dup(&r->text, meter_alert_defaults[r->kind][1])
                != 0
                || meter_alert_dup(&r->html,
                                   meter_alert_defaults[r->kind][2])
                   != 0)))
    {
        return -1;
    }

    return 0;
}


/* one rule "alert.NAME.*" */
static int
meter_alert_rule(const meter_conf_t *cf, meter_alert_rule_t *r, char *err,
    size_t errlen)
{
    char         key[128], e[512];
    const char  *v, *bad;
    size_t       i;

    snprintf(key, sizeof(key), "alert.%s.when", r->name);
    v = meter_conf_get(cf, key);
    if (v == NULL) {
        snprintf(err, errlen, "\"%s\" is required", key);
        return -1;
    }

    if (meter_alert_parse_when(v, r, e, sizeof(e)) != 0) {
        snprintf(err, errlen, "\"%s\": %s", key, e);
        return -1;
    }

    r->when = strdup(v);

    snprintf(key, sizeof(key), "alert.%s.notify", r->name);
    v = meter_conf_get(cf, key);
    if (v == NULL) {
        snprintf(err, errlen, "\"%s\" is required", key);
        return -1;
    }

    if (meter_alert_parse_notify(v, r, e, sizeof(e)) != 0) {
        snprintf(err, errlen, "\"%s\": %s", key, e);
        return -1;
    }

    snprintf(key, sizeof(key), "alert.%s.meter", r->name);
    v = meter_conf_get(cf, key);
    if (v != NULL) {
        if (r->kind == METER_ALERT_USAGE || r->kind == METER_ALERT_DELINQUENT
            || !meter_alert_meter_ok(v))
        {
            snprintf(err, errlen, "\"%s\": a meter name, for credit_below "
                     "and refused_above rules", key);
            return -1;
        }

        memcpy(r->meter, v, strlen(v) + 1);  /* <= 32, checked */

    } else if (r->kind == METER_ALERT_REFUSED) {
        /* the meter that counts 402s: meter zone=api refused status=402 */
        snprintf(r->meter, sizeof(r->meter), "refused");
    }

    snprintf(key, sizeof(key), "alert.%s.subject", r->name);
    if (meter_alert_dup(&r->subject, meter_conf_get(cf, key)) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    snprintf(key, sizeof(key), "alert.%s.template", r->name);
    v = meter_conf_get(cf, key);
    if (v != NULL) {
        if (meter_alert_templates(r, v, e, sizeof(e)) != 0) {
            snprintf(err, errlen, "\"%s\": %s", key, e);
            return -1;
        }

    }

    if (meter_alert_rule_defaults(r) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    if (r->when == NULL || r->text == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    /* every placeholder must be known now, not in a customer's mail */
    for (i = 0; i < 3; i++) {
        v = (i == 0) ? r->subject : (i == 1) ? r->text : r->html;
        bad = (i == 0) ? "subject" : (i == 1) ? "text template"
                                              : "HTML template";

        if (v != NULL
            && meter_tmpl_check(v, meter_alert_vars, e, sizeof(e)) != 0)
        {
            snprintf(err, errlen, "alert \"%s\": %s: %s", r->name, bad, e);
            return -1;
        }
    }

    if (strpbrk(r->subject, "\r\n") != NULL) {
        snprintf(err, errlen, "alert \"%s\": the subject is one line",
                 r->name);
        return -1;
    }

    return 0;
}


static int
meter_alert_duration(const meter_conf_t *cf, const char *key, time_t dflt,
    time_t min, time_t *out, char *err, size_t errlen)
{
    int64_t      ms;
    const char  *v;

    v = meter_conf_get(cf, key);
    if (v == NULL) {
        *out = dflt;
        return 0;
    }

    if (meter_parse_duration(v, &ms) != 0 || ms / 1000 < min) {
        snprintf(err, errlen, "invalid value \"%s\" for \"%s\" (a duration "
                 "of at least %llds)", v, key, (long long) min);
        return -1;
    }

    *out = (time_t) (ms / 1000);

    return 0;
}


/* settings "alert.*" and "smtp.*" */
static int
meter_alert_settings(const meter_conf_t *cf, meter_alerts_t *a, int email,
    int webhook, char *err, size_t errlen)
{
    char         secret[1024], e[512], *nl;
    time_t       t;
    uint64_t     n;
    const char  *v;

    if (meter_alert_duration(cf, "alert.interval", 60, 1, &a->interval, err,
                             errlen) != 0
        || meter_alert_duration(cf, "alert.retry_base", 30, 1,
                                &a->retry_base, err, errlen) != 0
        || meter_alert_duration(cf, "alert.retry_max", 3600, 1,
                                &a->retry_max, err, errlen) != 0
        || meter_alert_duration(cf, "alert.timeout", 10, 1, &t, err, errlen)
           != 0
        || meter_alert_duration(cf, "alert.claim_ttl", 2 * t + 30, 1,
                                &a->claim_ttl, err, errlen) != 0
        || meter_alert_duration(cf, "alert.keep", 90 * 86400, 63 * 86400,
                                &a->keep, err, errlen) != 0)
    {
        return -1;
    }

    a->timeout_ms = (long) t * 1000;
    a->grace = cf->grace;

    if (a->retry_max < a->retry_base) {
        snprintf(err, errlen, "\"alert.retry_max\" is below "
                 "\"alert.retry_base\"");
        return -1;
    }

    /* a claim must outlive the send it covers, or two could overlap */
    if (a->claim_ttl <= t) {
        snprintf(err, errlen, "\"alert.claim_ttl\" must exceed "
                 "\"alert.timeout\"");
        return -1;
    }

    a->max_attempts = 20;
    v = meter_conf_get(cf, "alert.max_attempts");
    if (v != NULL) {
        if (meter_parse_u64(v, strlen(v), &n) != 0 || n < 1 || n > 1000) {
            snprintf(err, errlen, "invalid value \"%s\" for "
                     "\"alert.max_attempts\" (1-1000)", v);
            return -1;
        }

        a->max_attempts = (unsigned) n;
    }

    if (webhook) {
        if (meter_conf_secret(cf, "alert.webhook_secret_file", secret,
                              sizeof(secret), e, sizeof(e))
            != 0)
        {
            snprintf(err, errlen, "webhook channels sign with a secret: %s",
                     e);
            return -1;
        }

        a->webhook_secret = strdup(secret);
        explicit_bzero(secret, sizeof(secret));
    }

    if (!email) {
        return 0;
    }

    v = meter_conf_get(cf, "smtp.url");
    if (v == NULL || (strncmp(v, "smtp://", 7) != 0
                      && strncmp(v, "smtps://", 8) != 0))
    {
        snprintf(err, errlen, "email channels need \"smtp.url\" "
                 "(smtp://HOST:PORT or smtps://HOST:PORT)");
        return -1;
    }

    a->smtp_url = strdup(v);

    v = meter_conf_get(cf, "smtp.from");
    if (v == NULL || meter_mail_addr(v, a->from_addr, sizeof(a->from_addr))
                     != 0
        || strpbrk(v, "\r\n") != NULL)
    {
        snprintf(err, errlen, "email channels need \"smtp.from\" (an "
                 "address, or \"Name <address>\")");
        return -1;
    }

    a->from = strdup(v);

    v = meter_conf_get(cf, "smtp.starttls");
    a->starttls = METER_STARTTLS_REQUIRED;
    if (v != NULL) {
        if (strcmp(v, "required") == 0) {
            a->starttls = METER_STARTTLS_REQUIRED;

        } else if (strcmp(v, "try") == 0) {
            a->starttls = METER_STARTTLS_TRY;

        } else if (strcmp(v, "off") == 0) {
            a->starttls = METER_STARTTLS_OFF;

        } else {
            snprintf(err, errlen, "invalid value \"%s\" for "
                     "\"smtp.starttls\" (required, try or off)", v);
            return -1;
        }
    }

    if (meter_alert_dup(&a->smtp_ca, meter_conf_get(cf, "smtp.ca_file"))
        != 0)
    {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    /* "USER\nPASSWORD" */
    if (meter_conf_get(cf, "smtp.credentials_file") != NULL) {
        if (meter_conf_secret(cf, "smtp.credentials_file", secret,
                              sizeof(secret), e, sizeof(e))
            != 0)
        {
            snprintf(err, errlen, "%s", e);
            return -1;
        }

        nl = strchr(secret, '\n');
        if (nl == NULL || nl == secret || nl[1] == '\0') {
            explicit_bzero(secret, sizeof(secret));
            snprintf(err, errlen, "\"smtp.credentials_file\": expected the "
                     "user on the first line and the password on the "
                     "second");
            return -1;
        }

        *nl = '\0';
        if (nl > secret && nl[-1] == '\r') {
            nl[-1] = '\0';
        }

        a->smtp_user = strdup(secret);
        a->smtp_password = strdup(nl + 1);
        explicit_bzero(secret, sizeof(secret));
    }

    if (a->smtp_url == NULL || a->from == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    return 0;
}


static const char  *meter_alert_settings_keys[] = {
    "alert.interval", "alert.retry_base", "alert.retry_max", "alert.timeout",
    "alert.claim_ttl", "alert.keep", "alert.max_attempts",
    "alert.webhook_secret_file", "smtp.url", "smtp.from", "smtp.starttls",
    "smtp.ca_file", "smtp.credentials_file", NULL
};


/* a misspelt setting is an error, not a default silently kept */
static int
meter_alert_known(const meter_conf_t *cf, char *err, size_t errlen)
{
    size_t       i, j;
    const char  *k;

    for (i = 0; i < cf->nkv; i++) {
        k = cf->kv[i].key;

        if (strncmp(k, "smtp.", 5) != 0
            && (strncmp(k, "alert.", 6) != 0 || strchr(k + 6, '.') != NULL))
        {
            continue;
        }

        for (j = 0; meter_alert_settings_keys[j] != NULL; j++) {
            if (strcmp(k, meter_alert_settings_keys[j]) == 0) {
                break;
            }
        }

        if (meter_alert_settings_keys[j] == NULL) {
            snprintf(err, errlen, "%s:%u: unknown key \"%s\"", cf->path,
                     cf->kv[i].line, k);
            return -1;
        }
    }

    return 0;
}


int
meter_alerts_open(const meter_conf_t *cf, meter_alerts_t **out, char *err,
    size_t errlen)
{
    char                 name[64], e[1024];
    const char          *k, *dot;
    size_t               i, j, n;
    unsigned             line;
    int                  email, webhook;
    meter_alerts_t      *a;
    meter_alert_rule_t  *r;

    *out = NULL;

    if (meter_alert_known(cf, err, errlen) != 0) {
        return -1;
    }

    a = calloc(1, sizeof(meter_alerts_t));
    if (a == NULL) {
        snprintf(err, errlen, "%s: out of memory", cf->path);
        return -1;
    }

    email = 0;
    webhook = 0;
    line = 0;

    for (i = 0; i < cf->nkv; i++) {
        k = cf->kv[i].key;
        if (strncmp(k, "alert.", 6) != 0) {
            continue;
        }

        dot = strchr(k + 6, '.');
        if (dot == NULL) {
            continue;           /* a setting */
        }

        n = (size_t) (dot - (k + 6));
        if (n == 0 || n >= sizeof(name) || n > 32
            || strspn(k + 6, MTR_NAME_CHARS) < n
            || memchr(k + 6, '.', n) != NULL
            || (strcmp(dot, ".when") != 0 && strcmp(dot, ".notify") != 0
                && strcmp(dot, ".meter") != 0
                && strcmp(dot, ".subject") != 0
                && strcmp(dot, ".template") != 0))
        {
            snprintf(err, errlen, "%s:%u: unknown key \"%s\" (alert.NAME."
                     "when, .notify, .meter, .subject, .template)", cf->path,
                     cf->kv[i].line, k);
            meter_alerts_free(a);
            return -1;
        }

        memcpy(name, k + 6, n);
        name[n] = '\0';

        for (j = 0; j < a->nrules; j++) {
            if (strcmp(a->rules[j].name, name) == 0) {
                break;
            }
        }

        if (j < a->nrules) {
            continue;
        }

        r = realloc(a->rules, (a->nrules + 1) * sizeof(meter_alert_rule_t));
        if (r == NULL) {
            snprintf(err, errlen, "%s: out of memory", cf->path);
            meter_alerts_free(a);
            return -1;
        }

        a->rules = r;
        r = &a->rules[a->nrules];
        memset(r, 0, sizeof(meter_alert_rule_t));
        r->name = strdup(name);
        a->nrules++;

        line = cf->kv[i].line;

        if (r->name == NULL
            || meter_alert_rule(cf, r, e, sizeof(e)) != 0)
        {
            snprintf(err, errlen, "%s:%u: %s", cf->path, line,
                     r->name == NULL ? "out of memory" : e);
            meter_alerts_free(a);
            return -1;
        }

        for (j = 0; j < r->nch; j++) {
            email |= (r->ch[j].kind == METER_CH_EMAIL);
            webhook |= (r->ch[j].kind == METER_CH_WEBHOOK);
        }
    }

    if (a->nrules == 0) {
        meter_alerts_free(a);
        return 0;
    }

    if (meter_alert_settings(cf, a, email, webhook, e, sizeof(e)) != 0) {
        snprintf(err, errlen, "%s: %s", cf->path, e);
        meter_alerts_free(a);
        return -1;
    }

    a->curl = curl_easy_init();
    if (a->curl == NULL) {
        snprintf(err, errlen, "%s: curl_easy_init failed", cf->path);
        meter_alerts_free(a);
        return -1;
    }

    *out = a;

    return 0;
}
