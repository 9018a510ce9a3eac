
/*
 * Copyright (C) nginx-meter authors
 *
 * alert_rules.c: "alert.NAME.when" and ".notify" parsing, a whole config
 * with templates from files, and the errors that name the line.
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

#include "alerts.h"
#include "config.h"
#include "util.h"


typedef struct {
    char    dir[64];
    char    path[128];
    char    err[1024];
} test_ctx_t;


static int
setup(void **state)
{
    test_ctx_t  *t;

    t = calloc(1, sizeof(test_ctx_t));
    snprintf(t->dir, sizeof(t->dir), "/tmp/meter-test-alerts-XXXXXX");
    assert_non_null(mkdtemp(t->dir));
    snprintf(t->path, sizeof(t->path), "%s/worker.conf", t->dir);
    *state = t;

    return 0;
}


static int
teardown(void **state)
{
    test_ctx_t  *t;
    char         cmd[128];

    t = *state;
    snprintf(cmd, sizeof(cmd), "rm -rf %s", t->dir);
    assert_int_equal(system(cmd), 0);
    free(t);

    return 0;
}


static void
write_file(const char *path, const char *text)
{
    FILE  *f;

    f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}


static void
test_when(void **state)
{
    char                err[256];
    meter_alert_rule_t  r;

    (void) state;

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_when("credit_below 20%", &r, err,
                                            sizeof(err)), 0);
    assert_int_equal(r.kind, METER_ALERT_CREDIT);
    assert_int_equal(r.threshold, 20);
    assert_int_equal(r.percent, 1);

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_when("  credit_below\t500 ", &r, err,
                                            sizeof(err)), 0);
    assert_int_equal(r.threshold, 500);
    assert_int_equal(r.percent, 0);

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_when("usage_above 10000 calls per "
                                            "month", &r, err, sizeof(err)),
                     0);
    assert_int_equal(r.kind, METER_ALERT_USAGE);
    assert_int_equal(r.threshold, 10000);
    assert_string_equal(r.meter, "calls");
    assert_int_equal(r.period, METER_ALERT_MONTH);

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_when("usage_above 1000000 calls per "
                                            "day", &r, err, sizeof(err)), 0);
    assert_int_equal(r.threshold, 1000000);
    assert_int_equal(r.period, METER_DAY);

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_when("refused_above 50 per hour", &r,
                                            err, sizeof(err)), 0);
    assert_int_equal(r.kind, METER_ALERT_REFUSED);
    assert_int_equal(r.threshold, 50);
    assert_int_equal(r.period, METER_HOUR);

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_when("delinquent", &r, err,
                                            sizeof(err)), 0);
    assert_int_equal(r.kind, METER_ALERT_DELINQUENT);

    /* what each kind refuses */
    assert_int_equal(meter_alert_parse_when("credit_below 0%", &r, err,
                                            sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("credit_below 101%", &r, err,
                                            sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("credit_below 0", &r, err,
                                            sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("credit_below %", &r, err,
                                            sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("credit_below 20% calls", &r, err,
                                            sizeof(err)), -1);
    assert_non_null(strstr(err, "credit_below P%"));
    assert_int_equal(meter_alert_parse_when("usage_above 10 calls", &r, err,
                                            sizeof(err)), -1);
    assert_string_equal(err, "expected \"usage_above N METER per "
                        "hour|day|month\"");
    assert_int_equal(meter_alert_parse_when("usage_above -1 calls per day",
                                            &r, err, sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("usage_above 1 calls per week",
                                            &r, err, sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("usage_above 1 ca/lls per day",
                                            &r, err, sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("usage_above 1 calls per day x",
                                            &r, err, sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("usage_above "
                                            "99999999999999999999 calls per "
                                            "day", &r, err, sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("refused_above 50 per", &r, err,
                                            sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("delinquent now", &r, err,
                                            sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("", &r, err, sizeof(err)), -1);
    assert_int_equal(meter_alert_parse_when("sometimes", &r, err,
                                            sizeof(err)), -1);
    assert_non_null(strstr(err, "\"delinquent\""));
}


static void
test_notify(void **state)
{
    char                err[256];
    size_t              i;
    meter_alert_rule_t  r;

    (void) state;

    memset(&r, 0, sizeof(r));
    assert_int_equal(meter_alert_parse_notify(
                         "email:customer, email:ops@example.com,"
                         "webhook:https://h.example/a?b=1 ,  "
                         "slack:https://hooks.slack.com/services/T/B/X",
                         &r, err, sizeof(err)), 0);
    assert_int_equal(r.nch, 4);
    assert_int_equal(r.ch[0].kind, METER_CH_EMAIL);
    assert_string_equal(r.ch[0].target, "customer");
    assert_int_equal(r.ch[1].kind, METER_CH_EMAIL);
    assert_string_equal(r.ch[1].target, "ops@example.com");
    assert_int_equal(r.ch[2].kind, METER_CH_WEBHOOK);
    assert_string_equal(r.ch[2].target, "https://h.example/a?b=1");
    assert_int_equal(r.ch[3].kind, METER_CH_SLACK);
    assert_string_equal(r.ch[3].target,
                        "https://hooks.slack.com/services/T/B/X");

    for (i = 0; i < r.nch; i++) {
        free(r.ch[i].target);
    }

    static const char  *bad[] = {
        "", " , ", "sms:+100", "email:", "email:not-an-address",
        "email:Ops <ops@example.com>", "webhook:ftp://x", "webhook:",
        "slack:https://", "email:a@b.c, webhook:https://x y", NULL
    };

    for (i = 0; bad[i] != NULL; i++) {
        memset(&r, 0, sizeof(r));
        assert_int_equal(meter_alert_parse_notify(bad[i], &r, err,
                                                  sizeof(err)), -1);
        while (r.nch > 0) {
            free(r.ch[--r.nch].target);
        }
    }
}


static void
test_open(void **state)
{
    char             conf[2048], tpath[128], secret[128];
    test_ctx_t      *t;
    meter_conf_t    *cf;
    meter_alerts_t  *a;

    t = *state;

    snprintf(tpath, sizeof(tpath), "%s/low.txt", t->dir);
    write_file(tpath, "Subject: {{customer}}: {{remaining}} {{meter}} left\n"
               "\n"
               "Hi {{name}}, {{remaining}} of {{granted}} left.\n");
    snprintf(tpath, sizeof(tpath), "%s/low.html", t->dir);
    write_file(tpath, "<p>{{remaining}}</p>\n");
    snprintf(secret, sizeof(secret), "%s/cred", t->dir);
    write_file(secret, "relay\npw-not-logged\n");
    snprintf(tpath, sizeof(tpath), "%s/whsec", t->dir);
    write_file(tpath, "whsec_x\n");

    snprintf(conf, sizeof(conf),
             "file.path = %s/out.jsonl\n"
             "alert.low.when = credit_below 20%%\n"
             "alert.low.notify = email:customer, webhook:https://h.example/\n"
             "alert.low.template = %s/low\n"
             "alert.low.meter = calls\n"
             "alert.knocking.when = refused_above 50 per hour\n"
             "alert.knocking.notify = slack:https://hooks.example/T\n"
             "alert.interval = 30s\n"
             "alert.webhook_secret_file = %s/whsec\n"
             "smtp.url = smtps://mail.example:465\n"
             "smtp.from = Billing <billing@api.example>\n"
             "smtp.credentials_file = %s\n",
             t->dir, t->dir, t->dir, secret);
    write_file(t->path, conf);

    cf = meter_conf_load(t->path, t->err, sizeof(t->err));
    assert_non_null(cf);
    assert_int_equal(meter_alerts_open(cf, &a, t->err, sizeof(t->err)), 0);
    assert_non_null(a);

    assert_int_equal(a->nrules, 2);
    assert_string_equal(a->rules[0].name, "low");
    assert_string_equal(a->rules[0].meter, "calls");
    assert_string_equal(a->rules[0].subject,
                        "{{customer}}: {{remaining}} {{meter}} left");
    assert_string_equal(a->rules[0].text,
                        "Hi {{name}}, {{remaining}} of {{granted}} left.\n");
    assert_string_equal(a->rules[0].html, "<p>{{remaining}}</p>\n");
    assert_string_equal(a->rules[1].name, "knocking");
    assert_string_equal(a->rules[1].meter, "refused");
    /* built-in templates for a rule without its own */
    assert_non_null(strstr(a->rules[1].text, "{{value}}"));

    assert_int_equal(a->interval, 30);
    assert_int_equal(a->retry_base, 30);
    assert_int_equal(a->retry_max, 3600);
    assert_int_equal(a->max_attempts, 20);
    assert_int_equal(a->starttls, METER_STARTTLS_REQUIRED);
    assert_string_equal(a->from_addr, "billing@api.example");
    assert_string_equal(a->smtp_user, "relay");
    assert_string_equal(a->smtp_password, "pw-not-logged");
    assert_string_equal(a->webhook_secret, "whsec_x");

    meter_alerts_free(a);
    meter_conf_free(cf);

    /* no rule: no alerts, no error */
    snprintf(conf, sizeof(conf), "file.path = %s/out.jsonl\n"
             "alert.interval = 30s\n", t->dir);
    write_file(t->path, conf);
    cf = meter_conf_load(t->path, t->err, sizeof(t->err));
    assert_non_null(cf);
    assert_int_equal(meter_alerts_open(cf, &a, t->err, sizeof(t->err)), 0);
    assert_null(a);
    meter_conf_free(cf);
}


static void
test_open_errors(void **state)
{
    size_t           i;
    char             conf[1024];
    test_ctx_t      *t;
    meter_conf_t    *cf;
    meter_alerts_t  *a;

    static const char  *cases[][2] = {
        { "alert.a.when = delinquent\n",
          "worker.conf:2: \"alert.a.notify\" is required" },
        { "alert.a.notify = email:customer\n",
          "worker.conf:2: \"alert.a.when\" is required" },
        { "alert.a.when = delinquent\nalert.a.notify = email:customer\n",
          "email channels need \"smtp.url\"" },
        { "alert.a.when = delinquent\nalert.a.notify = webhook:http://x/\n",
          "webhook channels sign with a secret" },
        { "alert.a.when = delinquent\nalert.a.notify = slack:http://x/\n"
          "alert.a.subject = {{nope}}\n",
          "alert \"a\": subject: line 1: unknown placeholder {{nope}}" },
        { "alert.a.when = delinquent\nalert.a.notify = slack:http://x/\n"
          "alert.a.meter = calls\n",
          "\"alert.a.meter\": a meter name, for credit_below" },
        { "alert.a.when = delinquent\nalert.a.notify = slack:http://x/\n"
          "alert.a.template = /nonexistent/t\n",
          "cannot open \"/nonexistent/t.txt\"" },
        { "alert.a.when = delinquent\nalert.a.notify = slack:http://x/\n"
          "alert.keep = 1d\n",
          "\"alert.keep\"" },
        { "alert.a.when = delinquent\nalert.a.notify = slack:http://x/\n"
          "alert.timeout = 60s\nalert.claim_ttl = 30s\n",
          "\"alert.claim_ttl\" must exceed \"alert.timeout\"" },
        { "alert.a.when = delinquent\nalert.a.notify = email:customer\n"
          "smtp.url = smtp://127.0.0.1:25\nsmtp.from = nobody\n",
          "\"smtp.from\"" },
        { "alert.a.when = delinquent\nalert.a.notify = email:customer\n"
          "smtp.url = smtp://127.0.0.1:25\nsmtp.from = a@b.c\n"
          "smtp.starttls = maybe\n",
          "\"smtp.starttls\" (required, try or off)" },
        { "alert.a.b.when = delinquent\n",
          "unknown key \"alert.a.b.when\"" },
        { "alert.a.colour = red\n", "unknown key \"alert.a.colour\"" },
        { "alert.a/b.when = delinquent\n", "unknown key" },
        { "smtp.pasword_file = x\n", "unknown key \"smtp.pasword_file\"" },
        { "alert.intervall = 5s\n", "unknown key \"alert.intervall\"" },
    };

    t = *state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(conf, sizeof(conf), "file.path = /dev/null\n%s",
                 cases[i][0]);
        write_file(t->path, conf);

        cf = meter_conf_load(t->path, t->err, sizeof(t->err));
        assert_non_null(cf);

        t->err[0] = '\0';
        assert_int_equal(meter_alerts_open(cf, &a, t->err, sizeof(t->err)),
                         -1);
        assert_null(a);

        if (strstr(t->err, cases[i][1]) == NULL) {
            fail_msg("case %zu: \"%s\" not in \"%s\"", i, cases[i][1],
                     t->err);
        }

        meter_conf_free(cf);
    }

    /* "alerts." is no prefix of ours: the loader refuses it */
    snprintf(conf, sizeof(conf), "file.path = /dev/null\nalerts.x = 1\n");
    write_file(t->path, conf);
    assert_null(meter_conf_load(t->path, t->err, sizeof(t->err)));
    assert_non_null(strstr(t->err, "unknown key \"alerts.x\""));
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_when),
        cmocka_unit_test(test_notify),
        cmocka_unit_test_setup_teardown(test_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_errors, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
