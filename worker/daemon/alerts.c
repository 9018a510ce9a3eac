
/*
 * Copyright (C) nginx-meter authors
 *
 * Alerts: evaluation and delivery (docs/redis-schema.md "Alerts").
 *
 * Fire: one script creates mtr:{alert}:e:ID, ID derived from (rule,
 * customer, period), only if it does not exist (and, for rules on a state
 * rather than a period, only if mtr:{alert}:last does not already hold
 * that state): a rule that stays true fires once, a restart fires nothing
 * again, and a condition that became true while the worker was down fires
 * at the next pass (the previous period is evaluated too).
 *
 * Deliver, per channel: claim (state "sending" with a lease) -> send ->
 * mark ("sent", or "pending" with a backoff, or "failed" after
 * alert.max_attempts).  A crash between claim and mark leaves "sending";
 * when the lease ends the channel is sent again with the same identity
 * (Meter-Alert-Id, Message-ID), the one point where a receiver may see a
 * message twice and can tell.
 */


#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "alerts.h"
#include "log.h"
#include "tmpl.h"
#include "util.h"


#define METER_ALERT_BATCH       100         /* open events per turn */
#define METER_ALERT_NFIELDS     64


static const char  *meter_alert_kinds[] = {
    "credit", "usage", "refused", "delinquent"
};


/* the open score: the earliest next attempt or lease end over the
 * channels; none left: out of "open", the event expires after keep */
#define METER_LUA_RESCORE                                                     \
    "local n = tonumber(redis.call('HGET', KEYS[1], 'nch') or '0')\n"        \
    "local due = nil\n"                                                       \
    "for i = 0, n - 1 do\n"                                                   \
    "  local c = 'c' .. i\n"                                                  \
    "  local s = redis.call('HGET', KEYS[1], c .. '.state')\n"               \
    "  local t = nil\n"                                                       \
    "  if s == 'pending' then\n"                                              \
    "    t = tonumber(redis.call('HGET', KEYS[1], c .. '.next'))\n"          \
    "  elseif s == 'sending' then\n"                                          \
    "    t = tonumber(redis.call('HGET', KEYS[1], c .. '.lease'))\n"         \
    "  end\n"                                                                 \
    "  if t and (due == nil or t < due) then due = t end\n"                  \
    "end\n"                                                                   \
    "if due == nil then\n"                                                    \
    "  redis.call('ZREM', KEYS[2], ARGV[1])\n"                                \
    "  redis.call('EXPIRE', KEYS[1], ARGV[2])\n"                              \
    "else\n"                                                                  \
    "  redis.call('ZADD', KEYS[2], due, ARGV[1])\n"                           \
    "end\n"

/* KEYS: e:ID, open, log, last; ARGV: id, keep, now, last field ('' for
 * period rules), state, then field, value pairs */
static const char  meter_lua_fire[] =
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\n"
    "if ARGV[4] ~= '' and redis.call('HGET', KEYS[4], ARGV[4]) == ARGV[5]"
    " then return 0 end\n"
    "for i = 6, #ARGV, 2 do\n"
    "  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])\n"
    "end\n"
    "redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])\n"
    "if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])"
    " end\n"
    METER_LUA_RESCORE
    "return 1\n";

/* KEYS: e:ID, open; ARGV: id, keep, channel, now, lease end.  The number
 * of the attempt, or 0 when not due or claimed by someone else */
static const char  meter_lua_claim[] =
    "local c = ARGV[3]\n"
    "local s = redis.call('HGET', KEYS[1], c .. '.state')\n"
    "local now = tonumber(ARGV[4])\n"
    "if s == 'pending' then\n"
    "  if tonumber(redis.call('HGET', KEYS[1], c .. '.next') or '0') > now"
    " then return 0 end\n"
    "elseif s == 'sending' then\n"
    "  if tonumber(redis.call('HGET', KEYS[1], c .. '.lease') or '0') > now"
    " then return 0 end\n"
    "else\n"
    "  return 0\n"
    "end\n"
    "redis.call('HSET', KEYS[1], c .. '.state', 'sending', c .. '.lease',"
    " ARGV[5])\n"
    "local a = redis.call('HINCRBY', KEYS[1], c .. '.attempts', 1)\n"
    METER_LUA_RESCORE
    "return a\n";

/* KEYS: e:ID, open; ARGV: id, keep, channel, outcome (sent, retry,
 * failed), now, next attempt, error */
static const char  meter_lua_mark[] =
    "local c = ARGV[3]\n"
    "if redis.call('HGET', KEYS[1], c .. '.state') ~= 'sending' then"
    " return 0 end\n"
    "if ARGV[4] == 'sent' then\n"
    "  redis.call('HSET', KEYS[1], c .. '.state', 'sent', c .. '.at',"
    " ARGV[5])\n"
    "elseif ARGV[4] == 'retry' then\n"
    "  redis.call('HSET', KEYS[1], c .. '.state', 'pending', c .. '.next',"
    " ARGV[6], c .. '.error', ARGV[7])\n"
    "else\n"
    "  redis.call('HSET', KEYS[1], c .. '.state', 'failed', c .. '.at',"
    " ARGV[5], c .. '.error', ARGV[7])\n"
    "end\n"
    "redis.call('HDEL', KEYS[1], c .. '.lease')\n"
    METER_LUA_RESCORE
    "return 1\n";

typedef struct {
    meter_alerts_t             *a;
    meter_redis_t              *r;
    time_t                      now;
    redisReply                 *credit;     /* HGETALL mtr:gov:credit */
    meter_alert_usage_t        *usage;
    unsigned                    fired;
    size_t                      customers;
    int                         failed;     /* Redis */
    void                      (*tick)(void *data);
    void                       *tick_data;
} meter_alert_pass_t;


typedef struct {
    const char                 *id;
    const char                 *status;
    const char                 *reason;
    const char                 *since;
    const char                 *email;
    const char                 *name;
    redisReply                 *keys;       /* SMEMBERS mtr:ckeys */
} meter_alert_cust_t;


typedef struct {
    const char                 *f[METER_ALERT_NFIELDS];
    char                        buf[METER_ALERT_NFIELDS][96];
    size_t                      n;
} meter_alert_fields_t;


static void
meter_alert_field(meter_alert_fields_t *fl, const char *name,
    const char *value)
{
    if (fl->n + 2 > METER_ALERT_NFIELDS || value == NULL) {
        return;
    }

    fl->f[fl->n++] = name;
    fl->f[fl->n++] = value;
}


static void
meter_alert_fieldf(meter_alert_fields_t *fl, const char *name,
    const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void
meter_alert_fieldf(meter_alert_fields_t *fl, const char *name,
    const char *fmt, ...)
{
    va_list  ap;
    char    *b;

    if (fl->n + 2 > METER_ALERT_NFIELDS) {
        return;
    }

    b = fl->buf[fl->n + 1];

    va_start(ap, fmt);
    vsnprintf(b, sizeof(fl->buf[0]), fmt, ap);
    va_end(ap);

    meter_alert_field(fl, name, b);
}


time_t
meter_alert_month_start(time_t t, int delta)
{
    return meter_month_shift(t, delta);
}


/* the period containing t, delta periods away: start, end, label */
static void
meter_alert_period_at(int period, time_t t, int delta, time_t *start,
    time_t *end, char *label, size_t size)
{
    struct tm  tm;

    if (period == METER_ALERT_MONTH) {
        *start = meter_alert_month_start(t, delta);
        *end = meter_alert_month_start(*start, 1);
        gmtime_r(start, &tm);
        snprintf(label, size, "%04d-%02d", tm.tm_year + 1900, tm.tm_mon + 1);
        return;
    }

    *start = meter_period_start(t, period) + (time_t) delta * period;
    *end = *start + period;
    gmtime_r(start, &tm);

    if (period == METER_DAY) {
        snprintf(label, size, "%04d-%02d-%02d", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday);

    } else {
        snprintf(label, size, "%04d-%02d-%02dT%02d", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour);
    }
}


static int
meter_alert_redis_failed(meter_alert_pass_t *p, redisReply *rp)
{
    if (rp == NULL) {
        p->failed = 1;

    } else if (rp->type == REDIS_REPLY_ERROR) {
        meter_log(LOG_ERR, "alerts: Redis: %s", rp->str);
        p->failed = 1;
    }

    freeReplyObject(rp);

    return -1;
}


/* "email:customer", "email:ADDRESS", "webhook:https://host/..." (a hook's
 * path and query are its secret: never stored, logged or shown) */
static void
meter_alert_channel_name(const meter_channel_t *ch, char *buf, size_t size)
{
    const char  *host, *end;

    if (ch->kind == METER_CH_EMAIL) {
        snprintf(buf, size, "email:%s", ch->target);
        return;
    }

    host = strstr(ch->target, "://");
    host = (host != NULL) ? host + 3 : ch->target;
    end = host + strcspn(host, "/?#");

    snprintf(buf, size, "%s:%.*s%s",
             ch->kind == METER_CH_WEBHOOK ? "webhook" : "slack",
             (int) (end - ch->target), ch->target, *end != '\0' ? "/..." : "");
}


/* fires one alert; 0 also when it had fired already */
static int
meter_alert_fire(meter_alert_pass_t *p, const meter_alert_rule_t *rule,
    const meter_alert_cust_t *c, const char *period, const char *last,
    meter_alert_fields_t *fl)
{
    char          seed[512], hash[65], id[METER_IDEM_LEN + 1], ekey[128],
                  keep[24], now[24], when[32], lastf[256];
    char          chf[METER_ALERT_MAX_CH][5][32], spec[METER_ALERT_MAX_CH][300];
    const char   *argv[12 + METER_ALERT_NFIELDS + 10 * METER_ALERT_MAX_CH];
    const char   *to;
    size_t        i, n;
    redisReply   *rp;

    snprintf(seed, sizeof(seed), "alert|%s|%s|%s", rule->name, c->id, period);
    meter_sha256_hex(seed, strlen(seed), hash);
    snprintf(id, sizeof(id), "%.*s", METER_IDEM_LEN, hash);
    snprintf(ekey, sizeof(ekey), MTR_A_EVENT_FMT, id);
    snprintf(keep, sizeof(keep), "%lld", (long long) p->a->keep);
    snprintf(now, sizeof(now), "%lld", (long long) p->now);
    meter_iso8601(p->now, when, sizeof(when));

    lastf[0] = '\0';
    if (last != NULL) {
        snprintf(lastf, sizeof(lastf), MTR_A_LAST_FMT, rule->name, last);
    }

    meter_alert_field(fl, "rule", rule->name);
    meter_alert_field(fl, "kind", meter_alert_kinds[rule->kind]);
    meter_alert_field(fl, "condition", rule->when);
    meter_alert_field(fl, "customer", c->id);
    meter_alert_field(fl, "email", c->email);
    meter_alert_field(fl, "name", c->name);
    meter_alert_field(fl, "period", period);
    meter_alert_field(fl, "fired", now);
    meter_alert_field(fl, "fired_at", when);
    meter_alert_fieldf(fl, "nch", "%zu", rule->nch);

    argv[0] = "EVAL";
    argv[1] = meter_lua_fire;
    argv[2] = "4";
    argv[3] = ekey;
    argv[4] = MTR_A_OPEN;
    argv[5] = MTR_A_LOG;
    argv[6] = MTR_A_LAST;
    argv[7] = id;
    argv[8] = keep;
    argv[9] = now;
    argv[10] = lastf;
    argv[11] = period;
    n = 12;

    for (i = 0; i < fl->n; i++) {
        argv[n++] = fl->f[i];
    }

    for (i = 0; i < rule->nch; i++) {
        to = rule->ch[i].target;
        if (rule->ch[i].kind == METER_CH_EMAIL
            && strcmp(to, "customer") == 0)
        {
            to = (c->email != NULL) ? c->email : "";

        } else if (rule->ch[i].kind != METER_CH_EMAIL) {
            /* the URL stays in the config: it is the credential of a
             * Slack-style hook */
            to = "";
        }

        meter_alert_channel_name(&rule->ch[i], spec[i], sizeof(spec[i]));
        snprintf(chf[i][0], 32, "c%zu", i);
        snprintf(chf[i][1], 32, "c%zu.to", i);
        snprintf(chf[i][2], 32, "c%zu.state", i);
        snprintf(chf[i][3], 32, "c%zu.attempts", i);
        snprintf(chf[i][4], 32, "c%zu.next", i);

        argv[n++] = chf[i][0];
        argv[n++] = spec[i];
        argv[n++] = chf[i][1];
        argv[n++] = to;
        argv[n++] = chf[i][2];
        argv[n++] = "pending";
        argv[n++] = chf[i][3];
        argv[n++] = "0";
        argv[n++] = chf[i][4];
        argv[n++] = now;
    }

    rp = meter_redis_argv(p->r, (int) n, argv, NULL);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        return meter_alert_redis_failed(p, rp);
    }

    if (rp->integer == 1) {
        p->fired++;
        meter_log(LOG_NOTICE, "alert %s fired for customer %s, period %s "
                  "(%s)", rule->name, c->id, period, id);
    }

    freeReplyObject(rp);

    return 0;
}


static int
meter_alert_eval_usage(meter_alert_pass_t *p, const meter_alert_rule_t *rule,
    const meter_alert_cust_t *c)
{
    char                  label[32], s[32], e[32];
    time_t                start, end;
    uint64_t              sum;
    int                   delta;
    meter_alert_fields_t  fl;

    /* the period before too: its last minutes may have been flushed after
     * it ended, or the worker was down then */
    for (delta = -1; delta <= 0; delta++) {
        meter_alert_period_at(rule->period, p->now, delta, &start, &end,
                              label, sizeof(label));

        if (meter_alert_usage_get(p->usage, c->keys, rule->meter,
                                  rule->period, start, end, &sum)
            != 0)
        {
            p->failed = 1;
            return -1;
        }

        if (sum <= rule->threshold) {
            continue;
        }

        memset(&fl, 0, sizeof(fl));
        meter_iso8601(start, s, sizeof(s));
        meter_iso8601(end, e, sizeof(e));
        meter_alert_field(&fl, "meter", rule->meter);
        meter_alert_fieldf(&fl, "value", "%" PRIu64, sum);
        meter_alert_fieldf(&fl, "threshold", "%" PRIu64, rule->threshold);
        meter_alert_field(&fl, "period_start", s);
        meter_alert_field(&fl, "period_end", e);
        meter_alert_field(&fl, "reason", c->reason);

        if (meter_alert_fire(p, rule, c, label, NULL, &fl) != 0) {
            return -1;
        }
    }

    return 0;
}


static int
meter_alert_eval_credit(meter_alert_pass_t *p, const meter_alert_rule_t *rule,
    const meter_alert_cust_t *c)
{
    char                  period[160], last[160];
    size_t                i, k, clen;
    int64_t               remaining;
    uint64_t              granted, used, v;
    long double           limit;
    const char           *f, *meter;
    redisReply           *rp;
    meter_alert_fields_t  fl;

    clen = strlen(c->id);

    for (i = 0; i + 1 < p->credit->elements; i += 2) {
        f = p->credit->element[i]->str;

        if (strncmp(f, c->id, clen) != 0 || f[clen] != MTR_GOV_CREDIT_SEP) {
            continue;
        }

        meter = f + clen + 1;

        if ((rule->meter[0] != '\0' && strcmp(rule->meter, meter) != 0)
            || meter_parse_u64(p->credit->element[i + 1]->str,
                               p->credit->element[i + 1]->len, &granted)
               != 0
            || granted == 0)
        {
            continue;
        }

        used = 0;

        for (k = 0; k < c->keys->elements; k++) {
            rp = meter_redis_cmd(p->r, "HGET " MTR_USED_FMT " %s",
                                 c->keys->element[k]->str, meter);
            if (!meter_reply_ok(rp)) {
                return meter_alert_redis_failed(p, rp);
            }

            if (rp->type == REDIS_REPLY_STRING
                && meter_parse_u64(rp->str, rp->len, &v) == 0)
            {
                used += v;
            }

            freeReplyObject(rp);
        }

        remaining = (used >= granted) ? -(int64_t) (used - granted)
                                      : (int64_t) (granted - used);

        limit = rule->percent ? (long double) granted * rule->threshold / 100
                              : (long double) rule->threshold;

        if ((long double) remaining >= limit) {
            continue;
        }

        /* a top-up raises the grant: a new state that may fire again */
        snprintf(period, sizeof(period), "%s@%" PRIu64, meter, granted);
        snprintf(last, sizeof(last), "%s|%s", c->id, meter);

        memset(&fl, 0, sizeof(fl));
        meter_alert_field(&fl, "meter", meter);
        meter_alert_fieldf(&fl, "value", "%lld", (long long) remaining);
        meter_alert_fieldf(&fl, "remaining", "%lld",
                           (long long) (remaining > 0 ? remaining : 0));
        meter_alert_fieldf(&fl, "granted", "%" PRIu64, granted);
        meter_alert_fieldf(&fl, "threshold", "%" PRIu64 "%s",
                           rule->threshold, rule->percent ? "%" : "");

        if (meter_alert_fire(p, rule, c, period, last, &fl) != 0) {
            return -1;
        }
    }

    return 0;
}


static int
meter_alert_eval_delinquent(meter_alert_pass_t *p,
    const meter_alert_rule_t *rule, const meter_alert_cust_t *c)
{
    char                  period[64], since[32];
    time_t                t;
    meter_alert_fields_t  fl;

    if (c->status == NULL || strcmp(c->status, MTR_STATUS_DELINQUENT) != 0) {
        return 0;
    }

    /* one alert per delinquency: "since" names it */
    snprintf(period, sizeof(period), "since:%s",
             c->since != NULL ? c->since : "0");

    t = (c->since != NULL) ? (time_t) strtoll(c->since, NULL, 10) : 0;
    meter_iso8601(t, since, sizeof(since));

    memset(&fl, 0, sizeof(fl));
    meter_alert_field(&fl, "reason", c->reason);
    meter_alert_field(&fl, "since", since);

    return meter_alert_fire(p, rule, c, period, c->id, &fl);
}


static int
meter_alerts_eval(meter_alert_pass_t *p, volatile sig_atomic_t *stop)
{
    size_t               i, j;
    int                  rc;
    redisReply          *ids, *cust;
    meter_alert_cust_t   c;
    meter_alert_rule_t  *rule;

    ids = meter_redis_cmd(p->r, "SMEMBERS " MTR_CUSTOMERS);
    if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
        return meter_alert_redis_failed(p, ids);
    }

    p->credit = meter_redis_cmd(p->r, "HGETALL " MTR_GOV_CREDIT);
    if (!meter_reply_ok(p->credit) || p->credit->type != REDIS_REPLY_ARRAY) {
        meter_alert_redis_failed(p, p->credit);
        p->credit = NULL;
        freeReplyObject(ids);
        return -1;
    }

    rc = 0;

    for (i = 0; i < ids->elements && rc == 0 && !*stop; i++) {
        if (p->tick != NULL) {
            p->tick(p->tick_data);
        }

        memset(&c, 0, sizeof(c));
        c.id = ids->element[i]->str;

        cust = meter_redis_cmd(p->r, "HMGET " MTR_CUST_FMT " " MTR_CUST_STATUS
                               " " MTR_CUST_REASON " " MTR_CUST_SINCE
                               " email name", c.id);
        if (!meter_reply_ok(cust) || cust->type != REDIS_REPLY_ARRAY
            || cust->elements != 5)
        {
            rc = meter_alert_redis_failed(p, cust);
            break;
        }

#define meter_alert_str(n)                                                    \
        (cust->element[n]->type == REDIS_REPLY_STRING                         \
         ? cust->element[n]->str : NULL)

        c.status = meter_alert_str(0);
        c.reason = meter_alert_str(1);
        c.since = meter_alert_str(2);
        c.email = meter_alert_str(3);
        c.name = meter_alert_str(4);

#undef meter_alert_str

        c.keys = meter_redis_cmd(p->r, "SMEMBERS " MTR_CKEYS_FMT, c.id);
        if (!meter_reply_ok(c.keys) || c.keys->type != REDIS_REPLY_ARRAY) {
            meter_alert_redis_failed(p, c.keys);
            freeReplyObject(cust);
            rc = -1;
            break;
        }

        for (j = 0; j < p->a->nrules && rc == 0; j++) {
            rule = &p->a->rules[j];

            switch (rule->kind) {

            case METER_ALERT_CREDIT:
                rc = meter_alert_eval_credit(p, rule, &c);
                break;

            case METER_ALERT_USAGE:
            case METER_ALERT_REFUSED:
                rc = meter_alert_eval_usage(p, rule, &c);
                break;

            case METER_ALERT_DELINQUENT:
                rc = meter_alert_eval_delinquent(p, rule, &c);
                break;
            }
        }

        freeReplyObject(c.keys);
        freeReplyObject(cust);
    }

    if (rc == 0) {
        p->customers = ids->elements;
    }

    freeReplyObject(ids);
    freeReplyObject(p->credit);
    p->credit = NULL;

    return rc;
}


static const meter_alert_rule_t *
meter_alert_rule_named(const meter_alerts_t *a, const char *name)
{
    size_t  i;

    for (i = 0; name != NULL && i < a->nrules; i++) {
        if (strcmp(a->rules[i].name, name) == 0) {
            return &a->rules[i];
        }
    }

    return NULL;
}


/* the placeholders' values from the event's fields */
static size_t
meter_alert_vars_of(const redisReply *ev, const char *id,
    meter_tmpl_var_t *vars)
{
    size_t  i;

    for (i = 0; meter_alert_vars[i] != NULL; i++) {
        vars[i].name = meter_alert_vars[i];
        vars[i].value = (strcmp(meter_alert_vars[i], "alert_id") == 0)
                        ? id : meter_reply_hget(ev, meter_alert_vars[i]);
    }

    return i;
}


/* subject, text and HTML of an event: its rule's templates, or the
 * built-in ones of its kind when the rule is gone from the config */
static int
meter_alert_render(const meter_alert_rule_t *rule, const redisReply *ev,
    const char *id, meter_str_t *subject, meter_str_t *text,
    meter_str_t *html)
{
    size_t             n;
    char              *p;
    meter_tmpl_var_t   vars[32];

    n = meter_alert_vars_of(ev, id, vars);

    if (meter_tmpl_expand(subject, rule->subject, vars, n, 0) != 0
        || meter_tmpl_expand(text, rule->text, vars, n, 0) != 0
        || (rule->html != NULL
            && meter_tmpl_expand(html, rule->html, vars, n, 1) != 0))
    {
        return -1;
    }

    /* a value may not break the header it lands in */
    for (p = subject->data; *p != '\0'; p++) {
        if (*p == '\r' || *p == '\n') {
            *p = ' ';
        }
    }

    return 0;
}


static int
meter_alert_send_email(meter_alerts_t *a, const meter_alert_rule_t *rule,
    const redisReply *ev, const char *id, size_t ch, const char *to,
    int *permanent, char *err, size_t errlen)
{
    char          mid[256], addr[256];
    long          code;
    const char   *domain;
    int           rc;
    meter_str_t   subject, text, html, msg;
    meter_mail_t  m;
    meter_smtp_t  smtp;

    if (a->smtp_url == NULL) {
        snprintf(err, errlen, "no \"smtp.url\" in the config");
        return -1;
    }

    if (to == NULL || *to == '\0'
        || meter_mail_addr(to, addr, sizeof(addr)) != 0
        || strcmp(addr, to) != 0)
    {
        snprintf(err, errlen, "no valid email address (the customer's "
                 "\"email\")");
        *permanent = 1;
        return -1;
    }

    memset(&subject, 0, sizeof(meter_str_t));
    memset(&text, 0, sizeof(meter_str_t));
    memset(&html, 0, sizeof(meter_str_t));
    memset(&msg, 0, sizeof(meter_str_t));

    /* the same message on a resend: receivers dedupe by Message-ID */
    domain = strchr(a->from_addr, '@') + 1;
    snprintf(mid, sizeof(mid), "alert.%s.c%zu@%s", id, ch, domain);

    rc = -1;

    if (meter_alert_render(rule, ev, id, &subject, &text, &html) != 0) {
        snprintf(err, errlen, "out of memory");
        goto end;
    }

    memset(&m, 0, sizeof(meter_mail_t));
    m.from = a->from;
    m.to = to;
    m.subject = subject.data;
    m.text = text.data;
    m.html = (rule->html != NULL) ? html.data : NULL;
    m.message_id = mid;
    m.date = time(NULL);

    if (meter_mail_build(&msg, &m) != 0) {
        snprintf(err, errlen, "cannot build the message");
        goto end;
    }

    memset(&smtp, 0, sizeof(meter_smtp_t));
    smtp.url = a->smtp_url;
    smtp.user = a->smtp_user;
    smtp.password = a->smtp_password;
    smtp.ca_file = a->smtp_ca;
    smtp.starttls = a->starttls;
    smtp.timeout_ms = a->timeout_ms;

    rc = meter_smtp_send(a->curl, &smtp, a->from_addr, to, &msg, &code,
                         err, errlen);

    /* 550-553: mailbox or address refused; retrying cannot help */
    if (rc != 0 && code >= 550 && code <= 553) {
        *permanent = 1;
    }

end:

    meter_str_free(&subject);
    meter_str_free(&text);
    meter_str_free(&html);
    meter_str_free(&msg);

    return rc;
}


static const char  *meter_alert_json_nums[] = {
    "value", "threshold", "granted", "remaining", NULL
};

static const char  *meter_alert_json_strs[] = {
    "rule", "kind", "condition", "customer", "email", "name", "meter",
    "period", "period_start", "period_end", "reason", "since", "fired_at",
    NULL
};


/* webhook: the event as JSON, signed; slack: {"text": ...} */
static int
meter_alert_send_http(meter_alerts_t *a, const meter_alert_rule_t *rule,
    const redisReply *ev, const char *id, const char *url, int slack,
    int *permanent, char *err, size_t errlen)
{
    char          sig[160], hid[96], hsig[200], *body;
    long          status;
    size_t        i;
    int           rc;
    cJSON        *j;
    uint64_t      u;
    const char   *v, *headers[3];
    meter_str_t   subject, text, html;

    memset(&subject, 0, sizeof(meter_str_t));
    memset(&text, 0, sizeof(meter_str_t));
    memset(&html, 0, sizeof(meter_str_t));
    body = NULL;
    rc = -1;

    j = cJSON_CreateObject();
    if (j == NULL) {
        snprintf(err, errlen, "out of memory");
        goto end;
    }

    if (slack) {
        if (meter_alert_render(rule, ev, id, &subject, &text, &html) != 0) {
            snprintf(err, errlen, "out of memory");
            goto end;
        }

        if (meter_str_printf(&subject, "\n\n%s", text.data) != 0
            || cJSON_AddStringToObject(j, "text", subject.data) == NULL)
        {
            snprintf(err, errlen, "out of memory");
            goto end;
        }

    } else {
        if (a->webhook_secret == NULL) {
            snprintf(err, errlen, "no \"alert.webhook_secret_file\" to sign "
                     "with");
            goto end;
        }

        cJSON_AddStringToObject(j, "id", id);
        cJSON_AddStringToObject(j, "type", "alert.fired");

        for (i = 0; meter_alert_json_strs[i] != NULL; i++) {
            v = meter_reply_hget(ev, meter_alert_json_strs[i]);
            if (v != NULL) {
                cJSON_AddStringToObject(j, meter_alert_json_strs[i], v);
            }
        }

        /* numbers as numbers when they are plain integers ("20%" stays
         * a string) */
        for (i = 0; meter_alert_json_nums[i] != NULL; i++) {
            v = meter_reply_hget(ev, meter_alert_json_nums[i]);
            if (v == NULL) {
                continue;
            }

            if ((v[0] == '-' && meter_parse_u64(v + 1, strlen(v + 1), &u)
                                == 0)
                || meter_parse_u64(v, strlen(v), &u) == 0)
            {
                cJSON_AddNumberToObject(j, meter_alert_json_nums[i],
                                        strtod(v, NULL));

            } else {
                cJSON_AddStringToObject(j, meter_alert_json_nums[i], v);
            }
        }
    }

    body = cJSON_PrintUnformatted(j);
    if (body == NULL) {
        snprintf(err, errlen, "out of memory");
        goto end;
    }

    i = 0;

    if (!slack) {
        meter_notify_sign(a->webhook_secret, time(NULL), body, strlen(body),
                          sig, sizeof(sig));
        snprintf(hid, sizeof(hid), METER_NOTIFY_ID_HEADER ": %s", id);
        snprintf(hsig, sizeof(hsig), METER_NOTIFY_SIG_HEADER ": %s", sig);
        headers[i++] = hid;
        headers[i++] = hsig;
    }

    headers[i] = NULL;

    rc = meter_notify_post(a->curl, url, headers, body, strlen(body),
                           a->timeout_ms, &status, err, errlen);

    /* a 4xx but 408 and 429 will not change on a resend (Slack: 404
     * no_service, 410 channel_is_archived) */
    if (rc != 0 && status >= 400 && status <= 499 && status != 408
        && status != 429)
    {
        *permanent = 1;
    }

end:

    cJSON_Delete(j);
    free(body);
    meter_str_free(&subject);
    meter_str_free(&text);
    meter_str_free(&html);

    return rc;
}


static int
meter_alert_script(meter_alert_pass_t *p, const char *lua, const char *ekey,
    const char *id, const char **args, int nargs, long long *out)
{
    char          keep[24];
    const char   *argv[16];
    int           i;
    redisReply   *rp;

    snprintf(keep, sizeof(keep), "%lld", (long long) p->a->keep);

    argv[0] = "EVAL";
    argv[1] = lua;
    argv[2] = "2";
    argv[3] = ekey;
    argv[4] = MTR_A_OPEN;
    argv[5] = id;
    argv[6] = keep;

    for (i = 0; i < nargs; i++) {
        argv[7 + i] = args[i];
    }

    rp = meter_redis_argv(p->r, 7 + nargs, argv, NULL);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        return meter_alert_redis_failed(p, rp);
    }

    *out = rp->integer;
    freeReplyObject(rp);

    return 0;
}


/* every channel of one event that is due */
static int
meter_alert_deliver(meter_alert_pass_t *p, const char *id,
    volatile sig_atomic_t *stop)
{
    char                       ekey[128], ch[16], f[32], now[24], lease[24],
                               next[24], err[512];
    const char                *spec, *to, *args[5];
    size_t                     i, nch;
    long long                  attempt, done;
    int                        rc, permanent;
    time_t                     t;
    redisReply                *ev;
    meter_alert_rule_t         dflt;
    const meter_alert_rule_t  *rule;

    snprintf(ekey, sizeof(ekey), MTR_A_EVENT_FMT, id);

    ev = meter_redis_cmd(p->r, "HGETALL %s", ekey);
    if (!meter_reply_ok(ev) || ev->type != REDIS_REPLY_ARRAY) {
        return meter_alert_redis_failed(p, ev);
    }

    if (ev->elements == 0) {
        /* expired or deleted: nothing to deliver */
        freeReplyObject(ev);
        ev = meter_redis_cmd(p->r, "ZREM " MTR_A_OPEN " %s", id);
        freeReplyObject(ev);
        return 0;
    }

    rule = meter_alert_rule_named(p->a, meter_reply_hget(ev, "rule"));

    if (rule == NULL) {
        /* the rule left the config: its kind's built-in templates */
        memset(&dflt, 0, sizeof(dflt));
        spec = meter_reply_hget(ev, "kind");
        for (i = 0; i < 4; i++) {
            if (spec != NULL && strcmp(spec, meter_alert_kinds[i]) == 0) {
                dflt.kind = (meter_alert_kind_e) i;
            }
        }

        dflt.name = (char *) "";
        if (meter_alert_rule_defaults(&dflt) != 0) {
            freeReplyObject(ev);
            return -1;
        }

        rule = &dflt;

    } else {
        dflt.name = NULL;
    }

    nch = (size_t) strtoul(meter_reply_hget(ev, "nch") != NULL
                           ? meter_reply_hget(ev, "nch") : "0", NULL, 10);
    rc = 0;

    for (i = 0; i < nch && i < METER_ALERT_MAX_CH && !*stop; i++) {
        snprintf(ch, sizeof(ch), "c%zu", i);
        spec = meter_reply_hget(ev, ch);
        snprintf(f, sizeof(f), "c%zu.to", i);
        to = meter_reply_hget(ev, f);

        if (spec == NULL) {
            continue;
        }

        if (p->tick != NULL) {
            p->tick(p->tick_data);
        }

        t = time(NULL);
        snprintf(now, sizeof(now), "%lld", (long long) t);
        snprintf(lease, sizeof(lease), "%lld",
                 (long long) (t + p->a->claim_ttl));

        args[0] = ch;
        args[1] = now;
        args[2] = lease;

        if (meter_alert_script(p, meter_lua_claim, ekey, id, args, 3,
                               &attempt) != 0)
        {
            rc = -1;
            break;
        }

        if (attempt == 0) {
            continue;           /* not due, or another worker has it */
        }

        err[0] = '\0';
        permanent = 0;

        if (strncmp(spec, "email:", 6) == 0) {
            rc = meter_alert_send_email(p->a, rule, ev, id, i, to,
                                        &permanent, err, sizeof(err));

        } else if (rule == &dflt || i >= rule->nch
                   || rule->ch[i].kind
                      != (spec[0] == 's' ? METER_CH_SLACK : METER_CH_WEBHOOK))
        {
            snprintf(err, sizeof(err), "the channel is no longer in the "
                     "rule's alert.%s.notify", meter_reply_hget(ev, "rule"));
            permanent = 1;
            rc = -1;

        } else {
            rc = meter_alert_send_http(p->a, rule, ev, id, rule->ch[i].target,
                                       spec[0] == 's', &permanent, err,
                                       sizeof(err));
        }

        t = time(NULL);
        snprintf(now, sizeof(now), "%lld", (long long) t);

        if (rc == 0) {
            args[1] = "sent";
            meter_log(LOG_INFO, "alert %s (%s) for customer %s: %s sent",
                      meter_reply_hget(ev, "rule"), id,
                      meter_reply_hget(ev, "customer"), spec);

        } else if (permanent
                   || (unsigned long long) attempt >= p->a->max_attempts)
        {
            args[1] = "failed";
            meter_log(LOG_ERR, "alert %s (%s): %s gave up after %lld "
                      "attempts: %s", meter_reply_hget(ev, "rule"), id, spec,
                      attempt, err);

        } else {
            args[1] = "retry";
            t += (time_t) meter_backoff((unsigned) attempt,
                                        (double) p->a->retry_base,
                                        (double) p->a->retry_max, 0,
                                        (double) rand()
                                        / ((double) RAND_MAX + 1));
            meter_log(LOG_WARNING, "alert %s (%s): %s failed (attempt "
                      "%lld, next in %llds): %s",
                      meter_reply_hget(ev, "rule"), id, spec, attempt,
                      (long long) (t - time(NULL)), err);
        }

        snprintf(next, sizeof(next), "%lld", (long long) t);
        args[0] = ch;
        args[2] = now;
        args[3] = next;
        args[4] = err;

        rc = meter_alert_script(p, meter_lua_mark, ekey, id, args, 5, &done);
        if (rc != 0) {
            break;
        }
    }

    if (dflt.name != NULL) {
        free(dflt.subject);
        free(dflt.text);
        free(dflt.html);
    }

    freeReplyObject(ev);

    return rc;
}


static int
meter_alerts_deliver(meter_alert_pass_t *p, volatile sig_atomic_t *stop)
{
    size_t       i;
    int          rc;
    redisReply  *ids, *first;

    ids = meter_redis_cmd(p->r, "ZRANGEBYSCORE " MTR_A_OPEN " -inf %lld "
                          "LIMIT 0 %d", (long long) p->now,
                          METER_ALERT_BATCH);
    if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
        return meter_alert_redis_failed(p, ids);
    }

    rc = 0;

    for (i = 0; i < ids->elements && rc == 0 && !*stop; i++) {
        rc = meter_alert_deliver(p, ids->element[i]->str, stop);
    }

    freeReplyObject(ids);

    if (rc != 0) {
        return -1;
    }

    first = meter_redis_cmd(p->r, "ZRANGE " MTR_A_OPEN " 0 0 WITHSCORES");
    if (!meter_reply_ok(first) || first->type != REDIS_REPLY_ARRAY) {
        return meter_alert_redis_failed(p, first);
    }

    p->a->next_due = (first->elements == 2)
                     ? (time_t) strtoll(first->element[1]->str, NULL, 10) : 0;

    /* never spin on a score in the past */
    if (p->a->next_due != 0 && p->a->next_due <= p->now) {
        p->a->next_due = p->now + 1;
    }

    freeReplyObject(first);

    return 0;
}


int
meter_alerts_due(const meter_alerts_t *a, time_t now)
{
    return a != NULL
           && (now >= a->next_eval || (a->next_due != 0 && now >= a->next_due));
}


int
meter_alerts_run(meter_alerts_t *a, meter_redis_t *r, time_t now,
    volatile sig_atomic_t *stop, void (*tick)(void *data), void *tick_data)
{
    int                  rc;
    redisReply          *rp;
    struct timespec      t0, t1;
    meter_alert_pass_t   p;

    if (!meter_alerts_due(a, now) || r->ctx == NULL) {
        return 0;
    }

    memset(&p, 0, sizeof(p));
    p.a = a;
    p.r = r;
    p.now = now;
    p.tick = tick;
    p.tick_data = tick_data;

    if (now >= a->next_eval) {
        a->next_eval = now + a->interval;

        clock_gettime(CLOCK_MONOTONIC, &t0);

        rc = meter_alert_usage_begin(&p.usage, r, now, a->grace);
        if (rc != 0) {
            p.failed = 1;

        } else {
            rc = meter_alerts_eval(&p, stop);
        }

        meter_alert_usage_end(p.usage);
        clock_gettime(CLOCK_MONOTONIC, &t1);

        if (rc != 0) {
            a->next_eval = now + 5;
            return p.failed ? -1 : 0;
        }

        meter_log(LOG_DEBUG, "alerts: %zu rules x %zu customers evaluated "
                  "in %.1f ms, %u fired", a->nrules, p.customers,
                  (double) (t1.tv_sec - t0.tv_sec) * 1e3
                  + (double) (t1.tv_nsec - t0.tv_nsec) / 1e6, p.fired);

        rp = meter_redis_cmd(r, "ZREMRANGEBYSCORE " MTR_A_LOG " -inf %lld",
                             (long long) (now - a->keep));
        freeReplyObject(rp);
    }

    if (meter_alerts_deliver(&p, stop) != 0) {
        a->next_due = now + 5;
        return p.failed ? -1 : 0;
    }

    return 0;
}
