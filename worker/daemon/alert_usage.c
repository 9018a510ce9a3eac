
/*
 * Copyright (C) nginx-meter authors
 *
 * Usage per customer, meter and period for the alert rules, from both
 * layouts of the module (docs/redis-schema.md "Usage written by the
 * module": the largest copy of each counter, summed).
 *
 * Hours are kept in Redis only for "retention", and the writer layout keeps
 * no lifetime total, so a month cannot be read back from Redis at its end.
 * Each closed hour (grace after its end, as the drain sees it) is therefore
 * summed once per key and meter, and one script stores that hour's sums and
 * adds them to its day's and month's (mtr:{alert}:h:, :d:, :m:), unless the
 * hour's hash exists already: every hour counts once, whoever sums it.  The
 * open hours (the current one, the previous one during grace) are summed
 * at every pass.  Usage that reaches Redis after its hour was summed is
 * not counted in alerts (the drain still bills it).
 *
 * A gauge's figure is not a sum: max= keeps its largest value over
 * counters, keys, hours, days and months, last= its latest reading (the
 * hour's largest counter decoded, field@ = its time in ms, the latest
 * wins).  A unique meter is read from mtr:uqidx (lib/unique.c): the
 * customer's distinct count of each unique period starting in the rule's
 * period, summed.  A rule names the meter; its figure is the sum if the
 * meter has one, else its max, else its last reading, else its unique
 * count.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alerts.h"
#include "figure_read.h"
#include "hours.h"
#include "log.h"
#include "unique.h"
#include "util.h"
#include "wusage.h"


#define METER_ALERT_SUM_FIELD   (64 + 1 + MTR_METER_MAX + 2)
#define METER_ALERT_LIVE        3       /* open hours: grace < 2 h */
#define METER_ALERT_SUM_TTL     (70 * 86400)    /* past the last pass that
                                                 * reads the month before */


/*
 * KEYS: h:HOUR, d:DAY, m:MONTH; ARGV: ttl, then field, units, how
 * triples: how "s" a sum (added), "m" a gauge's max (the larger kept),
 * else a last= reading's time in ms (the later kept, with field@ = it)
 */
static const char  meter_lua_account[] =
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\n"
    "redis.call('HSET', KEYS[1], '_', '1')\n"
    "for i = 2, #ARGV, 3 do\n"
    "  local f, v, how = ARGV[i], ARGV[i + 1], ARGV[i + 2]\n"
    "  redis.call('HSET', KEYS[1], f, v)\n"
    "  for k = 2, 3 do\n"
    "    if how == 's' then\n"
    "      redis.call('HINCRBY', KEYS[k], f, v)\n"
    "    elseif how == 'm' then\n"
    "      local c = redis.call('HGET', KEYS[k], f)\n"
    "      if not c or tonumber(v) > tonumber(c) then\n"
    "        redis.call('HSET', KEYS[k], f, v)\n"
    "      end\n"
    "    else\n"
    "      local c = redis.call('HGET', KEYS[k], f .. '@')\n"
    "      if not c or tonumber(how) > tonumber(c) then\n"
    "        redis.call('HSET', KEYS[k], f, v, f .. '@', how)\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  if how ~= 's' and how ~= 'm' then\n"
    "    redis.call('HSET', KEYS[1], f .. '@', how)\n"
    "  end\n"
    "end\n"
    "for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end\n"
    "return 1\n";


/* a customer's unique meters: "KH|NAME" -> its unique periods */
typedef struct {
    char                      (*p)[METER_UPERIOD_MAX + 1];
    size_t                      n;
    size_t                      cap;
} meter_alert_uq_t;


static void meter_alert_uq_free(void *p);


struct meter_alert_usage_s {
    meter_redis_t              *r;
    time_t                      now;
    time_t                      closed;     /* hours starting before are
                                             * closed */
    time_t                      live_start[METER_ALERT_LIVE];
    meter_map_t                 live[METER_ALERT_LIVE];
                                            /* "KH|METER" -> uint64_t * */
    size_t                      nlive;
    unsigned                    accounted;
    meter_map_t                 uq;         /* meter_alert_uq_t values */
    int                         uq_loaded;
};


static int
meter_alert_sum_add(meter_map_t *sums, const char *kh, const char *field,
    uint64_t v)
{
    char         key[METER_ALERT_SUM_FIELD];
    const char  *bar;
    size_t       mlen;
    void       **slot;

    bar = strchr(field, '|');
    mlen = (bar != NULL) ? (size_t) (bar - field) : 0;

    if (mlen == 0 || mlen > MTR_METER_MAX) {
        return 0;
    }

    snprintf(key, sizeof(key), "%s|%.*s", kh, (int) mlen, field);

    slot = meter_map_put(sums, key, NULL);
    if (slot == NULL) {
        return -1;
    }

    if (*slot == NULL) {
        *slot = calloc(1, sizeof(uint64_t));
        if (*slot == NULL) {
            return -1;
        }
    }

    /* a gauge's hour: its largest counter (last=: the latest reading) */
    if (meter_meter_kind(field, mlen) != METER_KIND_SUM) {
        if (v > *(uint64_t *) *slot) {
            *(uint64_t *) *slot = v;
        }

    } else {
        *(uint64_t *) *slot += v;
    }

    return 0;
}


/* one key-hour's counters (both layouts, the larger copy) into sums */
static int
meter_alert_sum_key(meter_map_t *sums, const char *kh, redisReply *u,
    meter_wkey_t *wk)
{
    char         *buf;
    size_t        i, n;
    uint64_t      v;
    const char  **uv;
    int           rc;

    if (meter_u_merge(u, wk, &uv, &n, &buf) != 0) {
        return -1;
    }

    rc = 0;

    for (i = 0; i + 1 < n && rc == 0; i += 2) {
        if (meter_parse_u64(uv[i + 1], strlen(uv[i + 1]), &v) == 0) {
            rc = meter_alert_sum_add(sums, kh, uv[i], v);
        }
    }

    free(uv);
    free(buf);

    return rc;
}


/* every key's usage of one hour, per meter: "KH|METER" -> units */
static int
meter_alert_hour_sums(meter_redis_t *r, const char *hour, meter_map_t *sums)
{
    int            rc;
    size_t         i, n;
    void         **slot;
    redisReply    *keys, *u;
    meter_map_t    wm;
    meter_wkey_t  *wk;

    if (meter_map_init(sums, 64) != 0 || meter_map_init(&wm, 64) != 0) {
        return -1;
    }

    if (meter_wmap_load(r, hour, &wm, NULL, NULL) != 0) {
        meter_map_free(&wm, meter_wkey_free);
        return -1;
    }

    keys = meter_redis_cmd(r, "SMEMBERS " MTR_IDX_FMT, hour);
    if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(keys);
        meter_map_free(&wm, meter_wkey_free);
        return -1;
    }

    /* the key layout, pipelined, then what only the writer layout has */
    rc = 0;
    n = 0;

    for (i = 0; i < keys->elements; i++) {
        if (keys->element[i]->len == 64) {
            if (meter_redis_append(r, "HGETALL " MTR_U_FMT,
                                   keys->element[i]->str, hour)
                != 0)
            {
                rc = -1;
                break;
            }

            n++;
        }
    }

    for (i = 0; i < keys->elements && n > 0; i++) {
        if (keys->element[i]->len != 64) {
            continue;
        }

        n--;
        u = meter_redis_reply(r);
        if (u == NULL) {
            rc = -1;
            break;
        }

        if (rc == 0 && u->type == REDIS_REPLY_ARRAY) {
            slot = meter_map_get(&wm, keys->element[i]->str);
            wk = (slot != NULL) ? *slot : NULL;
            if (wk != NULL) {
                wk->seen = 1;
            }

            rc = meter_alert_sum_key(sums, keys->element[i]->str, u, wk);

        } else {
            rc = -1;
        }

        freeReplyObject(u);
    }

    for (i = 0; i < wm.cap && rc == 0; i++) {
        wk = (wm.keys[i] != NULL) ? wm.vals[i] : NULL;
        if (wk != NULL && !wk->seen) {
            rc = meter_alert_sum_key(sums, wm.keys[i], NULL, wk);
        }
    }

    freeReplyObject(keys);
    meter_map_free(&wm, meter_wkey_free);

    return rc;
}


/* sums a closed hour and stores it once (meter_lua_account) */
static int
meter_alert_account(meter_alert_usage_t *au, const char *hour, time_t t)
{
    char          keys[3][64], ttl[24], (*vals)[24];
    int           kind;
    size_t        i, k, n;
    uint64_t      v;
    const char  **argv, *bar;
    redisReply   *rp;
    meter_map_t   sums;
    int           rc;

    snprintf(keys[0], sizeof(keys[0]), MTR_A_HOUR_FMT, (long long) t);

    rp = meter_redis_cmd(au->r, "EXISTS %s", keys[0]);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        freeReplyObject(rp);
        return -1;
    }

    n = (size_t) rp->integer;
    freeReplyObject(rp);

    if (n == 1) {
        return 0;
    }

    if (meter_alert_hour_sums(au->r, hour, &sums) != 0) {
        meter_map_free(&sums, free);
        return -1;
    }

    snprintf(keys[1], sizeof(keys[1]), MTR_A_DAY_FMT,
             (long long) meter_period_start(t, METER_DAY));
    snprintf(keys[2], sizeof(keys[2]), MTR_A_MONTH_FMT,
             (long long) meter_alert_month_start(t, 0));
    snprintf(ttl, sizeof(ttl), "%d", METER_ALERT_SUM_TTL);

    argv = malloc((7 + 3 * sums.n) * sizeof(char *));
    vals = malloc((2 * sums.n + 1) * sizeof(*vals));
    if (argv == NULL || vals == NULL) {
        free(argv);
        free(vals);
        meter_map_free(&sums, free);
        return -1;
    }

    argv[0] = "EVAL";
    argv[1] = meter_lua_account;
    argv[2] = "3";
    argv[3] = keys[0];
    argv[4] = keys[1];
    argv[5] = keys[2];
    argv[6] = ttl;
    n = 7;

    for (i = 0, k = 0; i < sums.cap; i++) {
        if (sums.keys[i] == NULL) {
            continue;
        }

        v = *(uint64_t *) sums.vals[i];
        bar = strchr(sums.keys[i] + 65, '\0');
        kind = meter_meter_kind(sums.keys[i] + 65,
                                (size_t) (bar - sums.keys[i] - 65));

        if (kind == METER_KIND_LAST) {
            snprintf(vals[k + 1], sizeof(vals[0]), "%lld",
                     (long long) meter_last_at(v, t));
            v = meter_last_value(v);
        }

        snprintf(vals[k], sizeof(vals[0]), "%llu", (unsigned long long) v);
        argv[n] = sums.keys[i];
        argv[n + 1] = vals[k];
        argv[n + 2] = (kind == METER_KIND_SUM) ? "s"
                      : (kind == METER_KIND_MAX) ? "m" : vals[k + 1];
        n += 3;
        k += 2;
    }

    rp = meter_redis_argv(au->r, (int) n, argv, NULL);
    rc = (meter_reply_ok(rp) && rp->type == REDIS_REPLY_INTEGER) ? 0 : -1;

    if (rc != 0 && rp != NULL && rp->type == REDIS_REPLY_ERROR) {
        meter_log(LOG_ERR, "alerts: summing hour %s: %s", hour, rp->str);

    } else if (rc == 0 && rp->integer == 1) {
        au->accounted++;
    }

    freeReplyObject(rp);
    free(argv);
    free(vals);
    meter_map_free(&sums, free);

    return rc;
}


int
meter_alert_usage_begin(meter_alert_usage_t **out, meter_redis_t *r,
    time_t now, time_t grace)
{
    char                  hour[16], min[24], max[24];
    size_t                i;
    time_t                t, from;
    redisReply           *hours;
    meter_alert_usage_t  *au;

    au = calloc(1, sizeof(meter_alert_usage_t));
    if (au == NULL) {
        return -1;
    }

    *out = au;
    au->r = r;
    au->now = now;
    au->closed = now - METER_HOUR - grace + 1;

    /* the closed hours the rules read: from the month before on */
    from = meter_alert_month_start(now, -1);

    /* settled hours have left mtr:hours (daemon/due.c): both lists */
    snprintf(min, sizeof(min), "%lld", (long long) from);
    snprintf(max, sizeof(max), "%lld", (long long) au->closed - 1);
    hours = meter_hours_range(r, min, max);
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(hours);
        return -1;
    }

    for (i = 0; i < hours->elements; i++) {
        t = meter_hour_parse(hours->element[i]->str);
        if (t == -1) {
            continue;
        }

        if (meter_alert_account(au, hours->element[i]->str, t) != 0) {
            freeReplyObject(hours);
            return -1;
        }
    }

    freeReplyObject(hours);

    if (au->accounted > 0) {
        meter_log(LOG_DEBUG, "alerts: %u closed hours summed",
                  au->accounted);
    }

    /* the open hours: the current one, and the one before during grace */
    for (t = meter_period_start(au->closed + METER_HOUR - 1, METER_HOUR);
         t <= now && au->nlive < METER_ALERT_LIVE; t += METER_HOUR)
    {
        meter_hour_format(t, hour, sizeof(hour));
        au->live_start[au->nlive] = t;

        if (meter_alert_hour_sums(r, hour, &au->live[au->nlive++]) != 0) {
            return -1;
        }
    }

    return 0;
}


void
meter_alert_usage_end(meter_alert_usage_t *au)
{
    size_t  i;

    if (au == NULL) {
        return;
    }

    for (i = 0; i < METER_ALERT_LIVE; i++) {
        meter_map_free(&au->live[i], free);
    }

    if (au->uq_loaded) {
        meter_map_free(&au->uq, meter_alert_uq_free);
    }

    free(au);
}


/* the figure of one meter, folded over keys, hours and the stored sums */
typedef struct {
    meter_fig_t                 sum;
    meter_fig_t                 max;
    meter_fig_t                 last;
} meter_alert_fig_t;


static void
meter_alert_uq_free(void *p)
{
    meter_alert_uq_t  *u;

    u = p;
    free(u->p);
    free(u);
}


static int
meter_alert_uq_entry(const char *kh, const char *meter, const char *uperiod,
    void *arg)
{
    char                key[METER_ALERT_SUM_FIELD];
    void              **slot, *np;
    size_t              i;
    meter_alert_uq_t   *u;

    snprintf(key, sizeof(key), "%s|%s", kh, meter);

    slot = meter_map_put(arg, key, NULL);
    if (slot == NULL) {
        return -1;
    }

    if (*slot == NULL) {
        *slot = calloc(1, sizeof(meter_alert_uq_t));
        if (*slot == NULL) {
            return -1;
        }
    }

    u = *slot;

    for (i = 0; i < u->n; i++) {
        if (strcmp(u->p[i], uperiod) == 0) {
            return 0;
        }
    }

    if (u->n == u->cap) {
        np = realloc(u->p, (u->cap ? u->cap * 2 : 4) * sizeof(*u->p));
        if (np == NULL) {
            return -1;
        }

        u->p = np;
        u->cap = u->cap ? u->cap * 2 : 4;
    }

    snprintf(u->p[u->n++], sizeof(u->p[0]), "%s", uperiod);

    return 0;
}


static int
meter_alert_uq_has(const meter_alert_uq_t *u, const char *uperiod)
{
    size_t  i;

    for (i = 0; i < u->n; i++) {
        if (strcmp(u->p[i], uperiod) == 0) {
            return 1;
        }
    }

    return 0;
}


/* the unique index of the months the rules read (this one, the one
 * before), once per pass */
static int
meter_alert_uq_load(meter_alert_usage_t *au)
{
    int   d;
    char  m[8], err[512];

    if (au->uq_loaded) {
        return 0;
    }

    if (meter_map_init(&au->uq, 64) != 0) {
        return -1;
    }

    au->uq_loaded = 1;

    for (d = -1; d <= 0; d++) {
        meter_month_label(meter_month_shift(au->now, d), m);

        if (meter_unique_month(au->r, m, meter_alert_uq_entry, &au->uq, err,
                               sizeof(err))
            != 0)
        {
            meter_log(LOG_ERR, "alerts: the unique index of %s: %s", m,
                      err);
            return -1;
        }
    }

    return 0;
}


/* Σ over the unique periods starting in [start, end) of the distinct
 * count over the keys that have them */
static int
meter_alert_unique(meter_alert_usage_t *au, const redisReply *keys,
    const char *meter, time_t start, time_t end, uint64_t *sum)
{
    char               key[METER_ALERT_SUM_FIELD], err[512];
    void             **slot;
    size_t             k, j, i, n;
    time_t             s, e;
    uint64_t           count;
    const char       **khs;
    meter_alert_uq_t  *u, *v;

    if (meter_alert_uq_load(au) != 0) {
        return -1;
    }

    khs = malloc((keys->elements + 1) * sizeof(char *));
    if (khs == NULL) {
        return -1;
    }

    for (k = 0; k < keys->elements; k++) {
        snprintf(key, sizeof(key), "%s|%s", keys->element[k]->str, meter);
        slot = meter_map_get(&au->uq, key);
        u = (slot != NULL) ? *slot : NULL;

        for (j = 0; u != NULL && j < u->n; j++) {
            if (meter_uperiod_range(u->p[j], &s, &e) != 0 || s < start
                || s >= end)
            {
                continue;
            }

            /* counted at its first key: the keys that have it */
            n = 0;

            for (i = 0; i < keys->elements; i++) {
                snprintf(key, sizeof(key), "%s|%s", keys->element[i]->str,
                         meter);
                slot = meter_map_get(&au->uq, key);
                v = (slot != NULL) ? *slot : NULL;

                if (v != NULL && meter_alert_uq_has(v, u->p[j])) {
                    if (i < k) {
                        break;
                    }

                    khs[n++] = keys->element[i]->str;
                }
            }

            if (i < keys->elements && n == 0) {
                continue;
            }

            if (meter_unique_count(au->r, khs, n, meter, u->p[j], &count,
                                   err, sizeof(err))
                != 0)
            {
                meter_log(LOG_ERR, "alerts: unique count of %s: %s", meter,
                          err);
                free(khs);
                return -1;
            }

            *sum += count;
        }
    }

    free(khs);

    return 0;
}


/* one stored field set of a key: KH|M, KH|M:max, KH|M:last and its @ */
static void
meter_alert_fig_fold(meter_alert_fig_t *fig, redisReply *rp)
{
    uint64_t  v, at;

    if (rp->type != REDIS_REPLY_ARRAY || rp->elements != 4) {
        return;
    }

    if (rp->element[0]->type == REDIS_REPLY_STRING
        && meter_parse_u64(rp->element[0]->str, rp->element[0]->len, &v) == 0)
    {
        meter_fig_add(&fig->sum, METER_KIND_SUM, v, 0);
    }

    if (rp->element[1]->type == REDIS_REPLY_STRING
        && meter_parse_u64(rp->element[1]->str, rp->element[1]->len, &v) == 0)
    {
        meter_fig_add(&fig->max, METER_KIND_MAX, v, 0);
    }

    if (rp->element[2]->type == REDIS_REPLY_STRING
        && rp->element[3]->type == REDIS_REPLY_STRING
        && meter_parse_u64(rp->element[2]->str, rp->element[2]->len, &v) == 0
        && meter_parse_u64(rp->element[3]->str, rp->element[3]->len, &at)
           == 0)
    {
        meter_fig_add(&fig->last, METER_KIND_LAST, v, (int64_t) at);
    }
}


int
meter_alert_usage_get(meter_alert_usage_t *au, const redisReply *keys,
    const char *meter, int period, time_t start, time_t end, uint64_t *sum)
{
    char                field[METER_ALERT_SUM_FIELD], key[64];
    size_t              i, k, g;
    uint64_t            v;
    void              **slot;
    redisReply         *rp;
    const char         *sfx[3] = { "", MTR_GAUGE_MAX_SFX, MTR_GAUGE_LAST_SFX };
    meter_alert_fig_t   fig;

    *sum = 0;

    if (keys->elements == 0) {
        return 0;
    }

    memset(&fig, 0, sizeof(fig));

    /* the closed hours of the period, summed once */
    if (period == METER_ALERT_MONTH) {
        snprintf(key, sizeof(key), MTR_A_MONTH_FMT, (long long) start);

    } else if (period == METER_DAY) {
        snprintf(key, sizeof(key), MTR_A_DAY_FMT, (long long) start);

    } else {
        snprintf(key, sizeof(key), MTR_A_HOUR_FMT, (long long) start);
    }

    if (start < au->closed) {
        for (k = 0; k < keys->elements; k++) {
            if (meter_redis_append(au->r, "HMGET %s %s|%s %s|%s%s %s|%s%s "
                                   "%s|%s%s@", key,
                                   keys->element[k]->str, meter,
                                   keys->element[k]->str, meter, sfx[1],
                                   keys->element[k]->str, meter, sfx[2],
                                   keys->element[k]->str, meter, sfx[2])
                != 0)
            {
                return -1;
            }
        }

        for (k = 0; k < keys->elements; k++) {
            rp = meter_redis_reply(au->r);
            if (rp == NULL) {
                return -1;
            }

            meter_alert_fig_fold(&fig, rp);
            freeReplyObject(rp);
        }
    }

    /* and its open hours */
    for (i = 0; i < au->nlive; i++) {
        if (au->live_start[i] < start || au->live_start[i] >= end) {
            continue;
        }

        for (k = 0; k < keys->elements; k++) {
            for (g = 0; g < 3; g++) {
                snprintf(field, sizeof(field), "%s|%s%s",
                         keys->element[k]->str, meter, sfx[g]);
                slot = meter_map_get(&au->live[i], field);
                if (slot == NULL || *slot == NULL) {
                    continue;
                }

                v = *(uint64_t *) *slot;

                if (g == 0) {
                    meter_fig_add(&fig.sum, METER_KIND_SUM, v, 0);

                } else if (g == 1) {
                    meter_fig_add(&fig.max, METER_KIND_MAX, v, 0);

                } else {
                    meter_fig_add(&fig.last, METER_KIND_LAST,
                                  meter_last_value(v),
                                  meter_last_at(v, au->live_start[i]));
                }
            }
        }
    }

    if (fig.sum.set) {
        *sum = fig.sum.value;
        return 0;
    }

    if (fig.max.set || fig.last.set) {
        *sum = fig.max.set ? fig.max.value : fig.last.value;
        return 0;
    }

    return meter_alert_unique(au, keys, meter, start, end, sum);
}
