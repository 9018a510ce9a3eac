
/*
 * Copyright (C) nginx-meter authors
 *
 * Alerts and behavioural emails: rules from the worker config
 * ("alert.NAME.when", "alert.NAME.notify", templates), evaluated on the
 * daemon's loop from what Redis already holds (usage per key and hour,
 * lifetime usage, credit grants, delinquency), each fired once per
 * (rule, customer, period) and delivered to every channel once
 * (docs/redis-schema.md "Alerts").
 */


#ifndef _METER_ALERTS_H_INCLUDED_
#define _METER_ALERTS_H_INCLUDED_


#include <signal.h>
#include <stdint.h>
#include <time.h>

#include <curl/curl.h>

#include "config.h"
#include "meter_schema.h"
#include "notify.h"
#include "redis.h"


#define METER_ALERT_MAX_CH      8
#define METER_ALERT_MONTH       (-1)        /* a calendar month (UTC) */


typedef enum {
    METER_ALERT_CREDIT = 0,     /* credit_below 20% | credit_below 500 */
    METER_ALERT_USAGE,          /* usage_above N METER per PERIOD */
    METER_ALERT_REFUSED,        /* refused_above N per PERIOD */
    METER_ALERT_DELINQUENT      /* delinquent */
} meter_alert_kind_e;


typedef enum {
    METER_CH_EMAIL = 0,         /* email:customer, email:ADDRESS */
    METER_CH_WEBHOOK,           /* webhook:URL, signed JSON */
    METER_CH_SLACK              /* slack:URL, {"text": ...} */
} meter_channel_kind_e;


typedef struct {
    meter_channel_kind_e        kind;
    char                       *target;     /* "customer", address, URL */
} meter_channel_t;


typedef struct {
    char                       *name;
    char                       *when;       /* as written */
    meter_alert_kind_e          kind;
    uint64_t                    threshold;
    int                         percent;    /* credit: threshold in % */
    int                         period;     /* 3600, 86400, MONTH */
    char                        meter[MTR_METER_MAX + 1];  /* "": any */
    meter_channel_t             ch[METER_ALERT_MAX_CH];
    size_t                      nch;
    char                       *subject;    /* templates */
    char                       *text;
    char                       *html;       /* NULL: a text-only mail */
} meter_alert_rule_t;


typedef struct {
    meter_alert_rule_t         *rules;
    size_t                      nrules;

    time_t                      interval;
    time_t                      grace;          /* the config's */
    time_t                      retry_base;
    time_t                      retry_max;
    time_t                      claim_ttl;
    time_t                      keep;
    unsigned                    max_attempts;
    long                        timeout_ms;

    char                       *from;           /* smtp.from */
    char                        from_addr[256];
    char                       *smtp_url;
    char                       *smtp_ca;
    char                       *smtp_user;
    char                       *smtp_password;  /* wiped on free */
    meter_starttls_e            starttls;
    char                       *webhook_secret; /* wiped on free */

    CURL                       *curl;
    time_t                      next_eval;
    time_t                      next_due;       /* 0: nothing open */
} meter_alerts_t;


/* the placeholders templates may use, NULL-terminated */
extern const char *const  meter_alert_vars[];

/* "credit_below 20%" ... into r (kind, threshold, percent, period,
 * meter); 0, or -1 with err saying what is expected */
int meter_alert_parse_when(const char *s, meter_alert_rule_t *r, char *err,
    size_t errlen);

/* "email:customer, webhook:https://..." into r->ch; 0 or -1 with err */
int meter_alert_parse_notify(const char *s, meter_alert_rule_t *r,
    char *err, size_t errlen);

/* the start of the UTC month containing t, delta months away */
time_t meter_alert_month_start(time_t t, int delta);

/* alert_usage.c: usage per customer for one pass; begin sums the hours
 * that closed since the last pass (once, in Redis) and reads the open ones;
 * get: a customer's usage of meter in [start, end) over keys (a SMEMBERS
 * reply), period METER_HOUR, METER_DAY or METER_ALERT_MONTH */
typedef struct meter_alert_usage_s  meter_alert_usage_t;

int meter_alert_usage_begin(meter_alert_usage_t **au, meter_redis_t *r,
    time_t now, time_t grace);
int meter_alert_usage_get(meter_alert_usage_t *au, const redisReply *keys,
    const char *meter, int period, time_t start, time_t end, uint64_t *sum);
void meter_alert_usage_end(meter_alert_usage_t *au);

/* the built-in subject, text and HTML of r->kind where r has none;
 * 0 or -1 */
int meter_alert_rule_defaults(meter_alert_rule_t *r);

/* the rules and settings of cf (templates read, secrets read); *out NULL
 * when cf has no rule.  0, or -1 with err "FILE:LINE: ..." */
int meter_alerts_open(const meter_conf_t *cf, meter_alerts_t **out,
    char *err, size_t errlen);
void meter_alerts_free(meter_alerts_t *a);

/* something to evaluate or deliver at now */
int meter_alerts_due(const meter_alerts_t *a, time_t now);

/* one turn of the daemon's loop: evaluates the rules when due and
 * delivers what is due, calling tick (the watchdog) between customers and
 * sends; 0, or -1 when Redis failed (reconnect) */
int meter_alerts_run(meter_alerts_t *a, meter_redis_t *r, time_t now,
    volatile sig_atomic_t *stop, void (*tick)(void *data), void *tick_data);


#endif /* _METER_ALERTS_H_INCLUDED_ */
