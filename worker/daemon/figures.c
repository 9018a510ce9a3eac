
/*
 * Copyright (C) nginx-meter authors
 *
 * Billing figures (docs/redis-schema.md, "Billing a figure"): a unique
 * count, a gauge's max or last is billed as the month-to-date figure F of
 * (month, subject, meter), not per hour.
 *
 *   - gauges: the hour drain raises F from the counters it reads (and
 *     marks them billed for retention, drain.c); max keeps the largest,
 *     last the reading of the latest hour;
 *   - uniques: counted from mtr:uqidx:YYYYMM, the sets and HyperLogLogs,
 *     once per newly closed hour (a pass that finds no new hour reads
 *     none of them);
 *   - a record carries F (Stripe, whose meter aggregates with "last") or
 *     F - B (additive providers), one at a time per (month, subject,
 *     meter); B is raised from its "#fig" covers line only after the
 *     provider confirmed it.
 */


#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "figures.h"
#include "unique_retention.h"
#include "log.h"
#include "meter_schema.h"


#define METER_FIG_BATCH   500       /* commands per pipeline */
#define METER_FIG_MONTHS  24        /* months of figmon looked at */


/*
 * KEYS: fig hash, figmon; ARGV: field SUBJECT|METER|f, kind ("last" or
 * "max"), F, HOUR, RAW, KH, YYYYMM.  The value "F HOUR RAW KH": max keeps
 * the largest F and the latest HOUR; last the (HOUR, RAW) that is latest.
 * Decimal strings compared by length then bytes (no Lua doubles).  A
 * change marks the month dirty, so that the next pass bills it.
 */
static const char  meter_lua_fig_raise[] =
    "local function gt(a, b)\n"
    "  return #a > #b or (#a == #b and a > b)\n"
    "end\n"
    "local cur = redis.call('HGET', KEYS[1], ARGV[1])\n"
    "local f, h, r, kh = ARGV[3], ARGV[4], ARGV[5], ARGV[6]\n"
    "if cur then\n"
    "  local cf, ch, cr, ck = cur:match('^(%d+) (%d+) (%d+) (%S+)$')\n"
    "  if cf then\n"
    "    if ck ~= kh then kh = '*' end\n"
    "    if ARGV[2] == 'last' then\n"
    "      if gt(ch, h) or (ch == h and not gt(r, cr)) then\n"
    "        f, h, r = cf, ch, cr\n"
    "      end\n"
    "    else\n"
    "      if gt(cf, f) then f = cf end\n"
    "      if gt(ch, h) then h = ch end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "local v = f .. ' ' .. h .. ' ' .. r .. ' ' .. kh\n"
    "if v == cur then return 0 end\n"
    "redis.call('HSET', KEYS[1], ARGV[1], v)\n"
    "redis.call('HSET', KEYS[2], ARGV[7] .. '|dirty', '1')\n"
    "return 1\n";

/*
 * KEYS: fig hash; ARGV: SUBJECT|METER, F billed, AT, HOUR.  Records of
 * one (month, subject, meter) are made one at a time with increasing AT:
 * a confirm repeated after a crash, or an older one, changes nothing.
 */
static const char  meter_lua_fig_billed[] =
    "local function gt(a, b)\n"
    "  return #a > #b or (#a == #b and a > b)\n"
    "end\n"
    "local cur = redis.call('HGET', KEYS[1], ARGV[1] .. '|b')\n"
    "local at = cur and cur:match('^(%d+)') or '0'\n"
    "if gt(ARGV[3], at) then\n"
    "  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2],\n"
    "             ARGV[1] .. '|b', ARGV[3] .. ' ' .. ARGV[4])\n"
    "end\n"
    "return 1\n";


uint64_t
meter_fig_last_value(uint64_t raw)
{
    return raw & MTR_GAUGE_LAST_MASK;
}


uint64_t
meter_fig_distinct(uint64_t scard, uint64_t pfcount)
{
    if (scard < MTR_UNIQUE_EXACT) {
        return scard;
    }

    return (pfcount > MTR_UNIQUE_EXACT) ? pfcount : MTR_UNIQUE_EXACT;
}


int
meter_fig_quantity(meter_fig_kind_e kind, int absolute, int closed,
    uint64_t f, uint64_t b, int billed, uint64_t *q)
{
    *q = 0;

    if (!billed) {
        b = 0;
    }

    if (absolute) {
        /* the figure itself; last may fall, even to 0 once billed */
        if ((kind == METER_FIG_LAST && billed) ? f != b : f > b) {
            *q = f;
            return 1;
        }

        return 0;
    }

    /* additive: the increase; last only at the month's close */
    if ((kind == METER_FIG_LAST && !closed) || f <= b) {
        return 0;
    }

    *q = f - b;

    return 1;
}


time_t
meter_fig_time(time_t hour, time_t prev, time_t now, time_t mstart,
    time_t mend)
{
    time_t  t;

    t = hour + 3600 - 1;

    if (t > now) {
        t = now;
    }

    /* after the last one billed, so that Stripe's "last" is the newest */
    if (prev != 0 && t <= prev) {
        t = prev + 1;
    }

    if (t >= mend) {
        t = mend - 1;
    }

    if (t < mstart) {
        t = mstart;
    }

    return t;
}


time_t
meter_month_start(time_t t)
{
    return meter_month_shift(t, 0);
}


time_t
meter_month_end(time_t t)
{
    return meter_month_shift(t, 1);
}


void
meter_month_name(time_t t, char *buf, size_t size)
{
    if (size >= 7) {
        meter_month_label(t, buf);
    }
}


int
meter_uperiod_parse(const char *s, size_t len, time_t *start, time_t *end)
{
    size_t     i;
    struct tm  tm;
    int        v[4];

    if (len != 6 && len != 8 && len != 10) {
        return -1;
    }

    for (i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }
    }

    v[0] = (s[0] - '0') * 1000 + (s[1] - '0') * 100 + (s[2] - '0') * 10
           + (s[3] - '0');
    v[1] = (s[4] - '0') * 10 + (s[5] - '0');
    v[2] = (len >= 8) ? (s[6] - '0') * 10 + (s[7] - '0') : 1;
    v[3] = (len == 10) ? (s[8] - '0') * 10 + (s[9] - '0') : 0;

    if (v[0] < 1970 || v[1] < 1 || v[1] > 12 || v[2] < 1 || v[2] > 31
        || v[3] > 23)
    {
        return -1;
    }

    memset(&tm, 0, sizeof(tm));
    tm.tm_year = v[0] - 1900;
    tm.tm_mon = v[1] - 1;
    tm.tm_mday = v[2];
    tm.tm_hour = v[3];

    *start = timegm(&tm);

    /* a day past the month's end (20261131) normalizes into the next */
    gmtime_r(start, &tm);
    if (tm.tm_mday != v[2] || tm.tm_mon != v[1] - 1) {
        return -1;
    }

    if (len == 6) {
        *end = meter_month_end(*start);

    } else {
        *end = *start + ((len == 8) ? 86400 : 3600);
    }

    return 0;
}


static int
meter_fig_raise_append(meter_drain_t *d, const char *subject,
    const char *fmeter, meter_fig_kind_e kind, time_t hour, uint64_t value,
    uint64_t raw, const char *kh)
{
    char  month[8], key[64], field[160], f[24], h[16], r[24];

    meter_month_name(hour, month, sizeof(month));
    meter_hour_format(hour, h, sizeof(h));
    snprintf(key, sizeof(key), MTR_W_FIG_FMT, month);
    snprintf(field, sizeof(field), "%s|%s|f", subject, fmeter);
    snprintf(f, sizeof(f), "%" PRIu64, value);
    snprintf(r, sizeof(r), "%" PRIu64, (kind == METER_FIG_LAST) ? raw : 0);

    return meter_redis_append(d->redis, "EVAL %s 2 %s %s %s %s %s %s %s %s %s",
                              meter_lua_fig_raise, key, MTR_W_FIGMON, field,
                              (kind == METER_FIG_LAST) ? "last" : "max", f, h,
                              r, kh, month);
}


/* n replies of queued commands; -1 when one failed */
static int
meter_fig_replies(meter_drain_t *d, size_t n)
{
    size_t       i;
    int          failed;
    redisReply  *rp;

    failed = 0;

    for (i = 0; i < n; i++) {
        rp = meter_redis_reply(d->redis);
        if (!meter_reply_ok(rp)) {
            meter_log(LOG_ERR, "figures: %s",
                      rp != NULL ? rp->str : d->redis->err);
            failed = 1;
        }

        freeReplyObject(rp);

        if (d->redis->ctx == NULL) {
            return -1;
        }
    }

    return failed ? -1 : 0;
}


int
meter_fig_raise(meter_drain_t *d, const char *subject, const char *fmeter,
    meter_fig_kind_e kind, time_t hour, uint64_t value, uint64_t raw,
    const char *kh)
{
    if (meter_fig_raise_append(d, subject, fmeter, kind, hour, value, raw,
                               kh) != 0)
    {
        return -1;
    }

    return meter_fig_replies(d, 1);
}


/* "#fig YYYYMM SUBJECT|METER F AT HOUR" */
int
meter_fig_covers(const char *covers, time_t *start, time_t *end)
{
    char       month[8];
    long long  at;
    time_t     s, e;

    if (covers == NULL
        || strncmp(covers, METER_FIG_COVERS, sizeof(METER_FIG_COVERS) - 1)
           != 0
        || sscanf(covers, "#fig %6s %*s %*s %lld", month, &at) != 2
        || meter_uperiod_parse(month, 6, &s, &e) != 0)
    {
        return 0;
    }

    *start = s;
    *end = (time_t) at + 1;

    return 1;
}


int
meter_fig_billed_append(meter_drain_t *d, const char *line, size_t len)
{
    char  month[8], sm[192], f[24], at[24], hour[16], key[64], buf[320];

    if (len >= sizeof(buf)) {
        return -1;
    }

    memcpy(buf, line, len);
    buf[len] = '\0';

    if (sscanf(buf, "#fig %7s %191s %23s %23s %15s", month, sm, f, at, hour)
        != 5)
    {
        return -1;
    }

    snprintf(key, sizeof(key), MTR_W_FIG_FMT, month);

    return meter_redis_append(d->redis, "EVAL %s 1 %s %s %s %s %s",
                              meter_lua_fig_billed, key, sm, f, at, hour);
}


/* unique counting of one month */

typedef struct {
    char                       *customer;       /* NULL: none */
} meter_ukey_t;

typedef struct {
    char                       *subject;
    char                       *fmeter;         /* NAME:unique */
    const char                **khs;            /* into the key map */
    size_t                      n;
    size_t                      cap;
    uint64_t                   *scard;
    uint64_t                    count;
    int                         big;            /* a set at the limit */
} meter_ugroup_t;

typedef struct {
    uint64_t                    f;
    char                        kh[65];         /* "*": several */
} meter_usum_t;


static void
meter_ukey_free(void *p)
{
    meter_ukey_t  *k = p;

    if (k != NULL) {
        free(k->customer);
        free(k);
    }
}


static void
meter_ugroup_free(void *p)
{
    meter_ugroup_t  *g = p;

    if (g != NULL) {
        free(g->subject);
        free(g->fmeter);
        free(g->khs);
        free(g->scard);
        free(g);
    }
}


/* the union of several keys' HLLs (one set at the limit), merged in the
 * worker's slot: PFMERGE needs its keys in one */
static int
meter_fig_union(meter_drain_t *d, meter_ugroup_t *g, const char *name,
    const char *up, uint64_t *count)
{
    size_t       i, n;
    redisReply  *rp;

    /* PFMERGE needs one slot: copies of the HLLs into the worker's */
    n = 0;

    for (i = 0; i < g->n; i++) {
        rp = meter_redis_cmd(d->redis, "GET " MTR_UH_FMT, g->khs[i], name, up);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rp);
            return -1;
        }

        if (rp->type == REDIS_REPLY_STRING) {
            freeReplyObject(meter_redis_cmd(d->redis,
                                            "SET " MTR_W_UHTMP_FMT " %b",
                                            (unsigned) n, rp->str,
                                            (size_t) rp->len));
            n++;
        }

        freeReplyObject(rp);
    }

    *count = MTR_UNIQUE_EXACT;

    for (i = 1; i < n; i++) {
        freeReplyObject(meter_redis_cmd(d->redis, "PFMERGE " MTR_W_UHTMP_FMT
                                        " " MTR_W_UHTMP_FMT, 0u,
                                        (unsigned) i));
    }

    if (n > 0) {
        rp = meter_redis_cmd(d->redis, "PFCOUNT " MTR_W_UHTMP_FMT, 0u);
        *count = meter_fig_distinct(MTR_UNIQUE_EXACT,
                                    (uint64_t) meter_reply_int(rp, 0));
        freeReplyObject(rp);
    }

    for (i = 0; i < n; i++) {
        freeReplyObject(meter_redis_cmd(d->redis, "DEL " MTR_W_UHTMP_FMT,
                                        (unsigned) i));
    }

    return (d->redis->ctx != NULL) ? 0 : -1;
}


/* the name and period of a group ("NAME|UPERIOD") */
static const char *
meter_fig_group_name(const meter_ugroup_t *g, char *name, size_t size)
{
    const char  *up;

    up = strrchr(g->fmeter, '|') + 1;
    snprintf(name, size, "%.*s", (int) (up - 1 - g->fmeter), g->fmeter);

    return up;
}


/*
 * The distinct counts of groups [from, to) of list, pipelined: every
 * SCARD, then a PFCOUNT per large single key and the SMEMBERS of the keys
 * of each small union; a union with a large set merges HLLs (rare).
 */
static int
meter_fig_count(meter_drain_t *d, meter_ugroup_t **list, size_t from,
    size_t to, meter_map_t *sums)
{
    char            sk[192], name[MTR_METER_MAX + 1];
    const char     *up;
    size_t          i, k, j;
    uint64_t        c;
    redisReply     *rp;
    void          **slot;
    int             created, big;
    meter_usum_t   *s;
    meter_map_t     seen;
    meter_ugroup_t *g;

    for (i = from; i < to; i++) {
        g = list[i];
        up = meter_fig_group_name(g, name, sizeof(name));

        for (k = 0; k < g->n; k++) {
            if (meter_redis_append(d->redis, "SCARD " MTR_UQ_FMT, g->khs[k],
                                   name, up) != 0)
            {
                return -1;
            }
        }
    }

    for (i = from; i < to; i++) {
        g = list[i];

        for (k = 0; k < g->n; k++) {
            rp = meter_redis_reply(d->redis);
            if (rp == NULL) {
                return -1;
            }

            g->scard[k] = (rp->type == REDIS_REPLY_INTEGER && rp->integer > 0)
                          ? (uint64_t) rp->integer : 0;
            freeReplyObject(rp);
        }
    }

    /* second round trip: what a count needs beyond SCARD */
    for (i = from; i < to; i++) {
        g = list[i];
        up = meter_fig_group_name(g, name, sizeof(name));

        big = 0;
        for (k = 0; k < g->n; k++) {
            big |= (g->scard[k] >= MTR_UNIQUE_EXACT);
        }

        g->big = big;

        if (g->n == 1 && big) {
            if (meter_redis_append(d->redis, "PFCOUNT " MTR_UH_FMT,
                                   g->khs[0], name, up) != 0)
            {
                return -1;
            }

        } else if (g->n > 1 && !big) {
            for (k = 0; k < g->n; k++) {
                if (meter_redis_append(d->redis, "SMEMBERS " MTR_UQ_FMT,
                                       g->khs[k], name, up) != 0)
                {
                    return -1;
                }
            }
        }
    }

    for (i = from; i < to; i++) {
        g = list[i];
        up = meter_fig_group_name(g, name, sizeof(name));
        c = 0;

        if (g->n == 1 && !g->big) {
            c = g->scard[0];

        } else if (g->n == 1) {
            rp = meter_redis_reply(d->redis);
            if (rp == NULL) {
                return -1;
            }

            c = meter_fig_distinct(g->scard[0],
                                   (uint64_t) meter_reply_int(rp, 0));
            freeReplyObject(rp);

        } else if (!g->big) {
            /* exact: the union of the members (each set under the limit) */
            if (meter_map_init(&seen, 64) != 0) {
                return -1;
            }

            for (k = 0; k < g->n; k++) {
                rp = meter_redis_reply(d->redis);
                if (rp == NULL) {
                    meter_map_free(&seen, NULL);
                    return -1;
                }

                for (j = 0; rp->type == REDIS_REPLY_ARRAY
                            && j < rp->elements; j++)
                {
                    if (rp->element[j]->type == REDIS_REPLY_STRING
                        && meter_map_put(&seen, rp->element[j]->str,
                                         &created) == NULL)
                    {
                        freeReplyObject(rp);
                        meter_map_free(&seen, NULL);
                        return -1;
                    }
                }

                freeReplyObject(rp);
            }

            c = seen.n;
            meter_map_free(&seen, NULL);
        }

        g->count = c;
    }

    /* the rare unions over a large set, one by one */
    for (i = from; i < to; i++) {
        g = list[i];
        up = meter_fig_group_name(g, name, sizeof(name));

        if (g->n > 1 && g->big
            && meter_fig_union(d, g, name, up, &g->count) != 0)
        {
            return -1;
        }

        /* the month's figure: the sum over its unique periods */
        snprintf(sk, sizeof(sk), "%s|%s" MTR_FIG_UNIQUE_SFX, g->subject,
                 name);
        slot = meter_map_put(sums, sk, &created);
        if (slot == NULL) {
            return -1;
        }

        if (created) {
            s = calloc(1, sizeof(meter_usum_t));
            if (s == NULL) {
                return -1;
            }

            snprintf(s->kh, sizeof(s->kh), "%s",
                     (g->n == 1) ? g->khs[0] : "*");
            *slot = s;
        }

        s = *slot;
        s->f += g->count;

        if (g->n != 1 || strcmp(s->kh, g->khs[0]) != 0) {
            strcpy(s->kh, "*");
        }
    }

    return 0;
}


/*
 * Every unique meter of the month whose periods started before
 * closed_end (a period in the future is not counted: a clock that lies
 * does not bill early), as of the closed hour `hour`.
 */
static int
meter_fig_uniques(meter_drain_t *d, time_t mstart, time_t closed_end,
    time_t hour)
{
    char             cursor[32], month[8], gk[256], *p1, *p2;
    const char      *m, *kh;
    size_t           i, n, len;
    time_t           ps, pe;
    redisReply      *rp, *c;
    void           **slot;
    int              created, rc;
    meter_map_t      keys, groups, sums;
    meter_ukey_t    *uk;
    meter_usum_t    *s;
    meter_ugroup_t  *g, **list;

    meter_month_name(mstart, month, sizeof(month));

    if (meter_map_init(&keys, 64) != 0) {
        return -1;
    }

    if (meter_map_init(&groups, 64) != 0) {
        meter_map_free(&keys, NULL);
        return -1;
    }

    if (meter_map_init(&sums, 64) != 0) {
        meter_map_free(&keys, NULL);
        meter_map_free(&groups, NULL);
        return -1;
    }

    rc = -1;
    list = NULL;
    strcpy(cursor, "0");

    /* the index: "KH|NAME|UPERIOD", grouped by (subject, NAME, UPERIOD) */
    do {
        rp = meter_redis_cmd(d->redis, "SSCAN " MTR_UQIDX_FMT " %s COUNT %d",
                             month, cursor, METER_FIG_BATCH);
        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY
            || rp->elements != 2)
        {
            freeReplyObject(rp);
            goto done;
        }

        snprintf(cursor, sizeof(cursor), "%s", rp->element[0]->str);

        n = 0;

        /* customers of the keys not seen yet, one pipeline */
        for (i = 0; i < rp->element[1]->elements; i++) {
            m = rp->element[1]->element[i]->str;
            if (m == NULL || strlen(m) < 66 || m[64] != '|') {
                continue;
            }

            memcpy(gk, m, 64);
            gk[64] = '\0';

            if (meter_map_get(&keys, gk) != NULL) {
                continue;
            }

            slot = meter_map_put(&keys, gk, &created);
            if (slot == NULL) {
                freeReplyObject(rp);
                goto done;
            }

            *slot = NULL;

            if (meter_redis_append(d->redis, "HGET " MTR_KEY_FMT " "
                                   MTR_KEY_CUSTOMER, gk) != 0)
            {
                freeReplyObject(rp);
                goto done;
            }

            n++;
        }

        for (i = 0; i < rp->element[1]->elements && n > 0; i++) {
            m = rp->element[1]->element[i]->str;
            if (m == NULL || strlen(m) < 66 || m[64] != '|') {
                continue;
            }

            memcpy(gk, m, 64);
            gk[64] = '\0';

            slot = meter_map_get(&keys, gk);
            if (slot == NULL || *slot != NULL) {
                continue;
            }

            c = meter_redis_reply(d->redis);
            n--;

            if (c == NULL) {
                freeReplyObject(rp);
                goto done;
            }

            uk = calloc(1, sizeof(meter_ukey_t));
            if (uk == NULL) {
                freeReplyObject(c);
                freeReplyObject(rp);
                goto done;
            }

            if (c->type == REDIS_REPLY_STRING && c->len > 0) {
                uk->customer = strdup(c->str);
            }

            freeReplyObject(c);
            *slot = uk;
        }

        for (i = 0; i < rp->element[1]->elements; i++) {
            m = rp->element[1]->element[i]->str;
            len = (m != NULL) ? strlen(m) : 0;

            p1 = (len > 66 && m[64] == '|') ? strchr(m + 65, '|') : NULL;
            p2 = (p1 != NULL) ? p1 + 1 : NULL;

            if (p1 == NULL || p1 == m + 65
                || (size_t) (p1 - m - 65) > MTR_METER_MAX
                || strspn(m + 65, MTR_NAME_CHARS) != (size_t) (p1 - m - 65)
                || meter_uperiod_parse(p2, len - (size_t) (p2 - m), &ps, &pe)
                   != 0
                || strncmp(p2, month, 6) != 0 || ps >= closed_end)
            {
                continue;
            }

            memcpy(gk, m, 64);
            gk[64] = '\0';

            slot = meter_map_get(&keys, gk);
            uk = (slot != NULL) ? *slot : NULL;
            if (uk == NULL) {
                continue;
            }

            kh = keys.keys[slot - keys.vals];

            snprintf(gk, sizeof(gk), "%s|%s", uk->customer != NULL
                     ? uk->customer : kh, m + 65);

            slot = meter_map_put(&groups, gk, &created);
            if (slot == NULL) {
                freeReplyObject(rp);
                goto done;
            }

            if (created) {
                g = calloc(1, sizeof(meter_ugroup_t));
                if (g == NULL) {
                    freeReplyObject(rp);
                    goto done;
                }

                *slot = g;
                g->subject = strdup(uk->customer != NULL ? uk->customer
                                                         : kh);
                g->fmeter = strdup(m + 65);     /* NAME|UPERIOD */
                if (g->subject == NULL || g->fmeter == NULL) {
                    freeReplyObject(rp);
                    goto done;
                }
            }

            g = *slot;

            if (g->n == g->cap) {
                const char  **nk;
                uint64_t     *ns;

                g->cap = g->cap ? 2 * g->cap : 2;
                nk = realloc(g->khs, g->cap * sizeof(char *));
                if (nk != NULL) {
                    g->khs = nk;
                }

                ns = realloc(g->scard, g->cap * sizeof(uint64_t));
                if (ns != NULL) {
                    g->scard = ns;
                }

                if (nk == NULL || ns == NULL) {
                    freeReplyObject(rp);
                    goto done;
                }
            }

            g->khs[g->n++] = kh;
        }

        freeReplyObject(rp);

    } while (strcmp(cursor, "0") != 0);

    list = malloc((groups.n + 1) * sizeof(meter_ugroup_t *));
    if (list == NULL) {
        goto done;
    }

    for (i = 0, n = 0; i < groups.cap; i++) {
        if (groups.keys[i] != NULL && groups.vals[i] != NULL) {
            list[n++] = groups.vals[i];
        }
    }

    for (i = 0; i < n; i += METER_FIG_BATCH) {
        if (meter_fig_count(d, list, i, (n - i < METER_FIG_BATCH)
                            ? n : i + METER_FIG_BATCH, &sums) != 0)
        {
            goto done;
        }
    }

    /* raise each figure: it only grows (max-only, a recount that read
     * fewer members changes nothing) */
    n = 0;

    for (i = 0; i < sums.cap; i++) {
        if (sums.keys[i] == NULL || sums.vals[i] == NULL) {
            continue;
        }

        s = sums.vals[i];
        p1 = strrchr(sums.keys[i], '|');
        *p1 = '\0';

        if (meter_fig_raise_append(d, sums.keys[i], p1 + 1, METER_FIG_UNIQUE,
                                   hour, s->f, 0, s->kh) != 0)
        {
            *p1 = '|';
            goto done;
        }

        *p1 = '|';

        if (++n == METER_FIG_BATCH) {
            if (meter_fig_replies(d, n) != 0) {
                goto done;
            }

            n = 0;
        }
    }

    if (meter_fig_replies(d, n) != 0) {
        goto done;
    }

    rc = 0;

done:

    free(list);
    meter_map_free(&sums, free);
    meter_map_free(&groups, meter_ugroup_free);
    meter_map_free(&keys, meter_ukey_free);

    return rc;
}


/* billing the figures of one month */

typedef struct {
    uint64_t                    f;
    uint64_t                    raw;
    uint64_t                    b;
    time_t                      hour;
    time_t                      at;             /* of B; 0 none */
    char                        kh[65];
    int                         has_f;
    int                         has_b;
} meter_figval_t;


static meter_figval_t *
meter_figval(meter_map_t *m, const char *sm)
{
    void           **slot;
    int              created;
    meter_figval_t  *v;

    slot = meter_map_put(m, sm, &created);
    if (slot == NULL) {
        return NULL;
    }

    if (created) {
        *slot = calloc(1, sizeof(meter_figval_t));
    }

    v = *slot;

    return v;
}


static meter_fig_kind_e
meter_fig_kind(const char *fmeter, size_t *namelen)
{
    size_t  len, n;
    int     g;

    *namelen = 0;
    len = strlen(fmeter);
    n = sizeof(MTR_FIG_UNIQUE_SFX) - 1;

    if (len > n && strcmp(fmeter + len - n, MTR_FIG_UNIQUE_SFX) == 0) {
        *namelen = len - n;
        return METER_FIG_UNIQUE;
    }

    g = meter_gauge_name(fmeter, len);
    if (g == METER_FIG_MAX) {
        *namelen = len - MTR_GAUGE_SFX_LEN;

    } else if (g == METER_FIG_LAST) {
        *namelen = len - (sizeof(MTR_GAUGE_LAST_SFX) - 1);
    }

    return (meter_fig_kind_e) g;
}


static meter_drain_rc_e
meter_fig_bill(meter_drain_t *d, time_t mstart, int closed, time_t now,
    int *left)
{
    char              key[64], month[8], sm[192], *bar, *p;
    const char       *fld, *val;
    size_t            i, n, namelen;
    uint64_t          q;
    redisReply       *rp;
    meter_map_t       vals;
    meter_figval_t   *v;
    meter_fig_rec_t  *recs;
    meter_fig_kind_e  kind;
    meter_drain_rc_e  rc;
    unsigned          sent0, held0;
    long long         at;
    char              hbuf[16];

    *left = 0;

    meter_month_name(mstart, month, sizeof(month));
    snprintf(key, sizeof(key), MTR_W_FIG_FMT, month);

    rp = meter_redis_cmd(d->redis, "HGETALL %s", key);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    if (meter_map_init(&vals, rp->elements / 4 + 8) != 0) {
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    rc = METER_DRAIN_OK;

    for (i = 0; i + 1 < rp->elements; i += 2) {
        fld = rp->element[i]->str;
        val = rp->element[i + 1]->str;
        if (fld == NULL || val == NULL) {
            continue;
        }

        n = strlen(fld);
        snprintf(sm, sizeof(sm), "%s", fld);

        if (n > 2 && strcmp(fld + n - 2, "|f") == 0) {
            sm[n - 2] = '\0';
            v = meter_figval(&vals, sm);
            if (v == NULL) {
                rc = METER_DRAIN_REDIS;
                break;
            }

            hbuf[0] = '\0';
            if (sscanf(val, "%" SCNu64 " %15s %" SCNu64 " %64s", &v->f, hbuf,
                       &v->raw, v->kh) == 4)
            {
                v->hour = meter_hour_parse(hbuf);
                v->has_f = (v->hour > 0);
            }

        } else if (n > 2 && strcmp(fld + n - 2, "|b") == 0) {
            sm[n - 2] = '\0';
            v = meter_figval(&vals, sm);
            if (v == NULL) {
                rc = METER_DRAIN_REDIS;
                break;
            }

            at = 0;
            (void) sscanf(val, "%lld", &at);
            v->at = (time_t) at;

        } else {
            v = meter_figval(&vals, sm);
            if (v == NULL) {
                rc = METER_DRAIN_REDIS;
                break;
            }

            v->has_b = (meter_parse_u64(val, strlen(val), &v->b) == 0);
        }
    }

    freeReplyObject(rp);

    recs = (rc == METER_DRAIN_OK)
           ? calloc(vals.n + 1, sizeof(meter_fig_rec_t)) : NULL;
    if (recs == NULL) {
        meter_map_free(&vals, free);
        return METER_DRAIN_REDIS;
    }

    n = 0;

    for (i = 0; i < vals.cap; i++) {
        if (vals.keys[i] == NULL || vals.vals[i] == NULL) {
            continue;
        }

        v = vals.vals[i];
        bar = strrchr(vals.keys[i], '|');
        if (!v->has_f || bar == NULL) {
            continue;
        }

        kind = meter_fig_kind(bar + 1, &namelen);
        if (kind == METER_FIG_NONE
            || !meter_fig_quantity(kind, d->provider->absolute, closed, v->f,
                                   v->b, v->has_b, &q))
        {
            continue;
        }

        recs[n].quantity = q;
        recs[n].subject = vals.keys[i];
        snprintf(recs[n].meter, sizeof(recs[n].meter), "%.*s",
                 (int) namelen, bar + 1);
        snprintf(recs[n].smeter, sizeof(recs[n].smeter), "%s", bar + 1);
        snprintf(recs[n].key_hash, sizeof(recs[n].key_hash), "%s", v->kh);
        recs[n].at = meter_fig_time(v->hour, v->at, now, mstart,
                                    meter_month_end(mstart));
        meter_hour_format(v->hour, hbuf, sizeof(hbuf));
        snprintf(recs[n].covers, sizeof(recs[n].covers),
                 METER_FIG_COVERS "%s %s %" PRIu64 " %lld %s\n", month,
                 vals.keys[i], v->f, (long long) recs[n].at, hbuf);
        n++;
    }

    /* subject and meter: the map's key "SUBJECT|METER" split in place */
    for (i = 0; i < n; i++) {
        p = strrchr((char *) recs[i].subject, '|');
        *p = '\0';
        /* a key without customer is its own subject */
        recs[i].customer = (strcmp(recs[i].key_hash, recs[i].subject) == 0)
                           ? NULL : recs[i].subject;
    }

    sent0 = d->sent;
    held0 = d->held;

    if (n > 0) {
        rc = meter_drain_figures(d, mstart, meter_month_end(mstart), recs, n);
    }

    /* what was not finished (waiting, retrying, dead) is looked at again
     * next pass; held figures (no customer) when they move */
    if (rc == METER_DRAIN_OK
        && (size_t) (d->sent - sent0) + (d->held - held0) < n)
    {
        *left = 1;
    }

    if (rc != METER_DRAIN_OK) {
        *left = 1;
    }

    free(recs);
    meter_map_free(&vals, free);

    return rc;
}


meter_drain_rc_e
meter_figures_run(meter_drain_t *d, time_t closed_end, time_t now)
{
    char              month[8], f[32];
    const char       *fld;
    size_t            i, k, nm;
    time_t            hc, upto, ms[METER_FIG_MONTHS + 2], at[METER_FIG_MONTHS
                                                             + 2];
    int               dirty[METER_FIG_MONTHS + 2], done[METER_FIG_MONTHS + 2];
    int               known[METER_FIG_MONTHS + 2];
    int               closed, scan, left;
    redisReply       *rp;
    unsigned long     nkeys;
    meter_drain_rc_e  rc;

    if (d->dry_run) {
        return METER_DRAIN_OK;
    }

    /* the latest closed hour */
    hc = closed_end / 3600 * 3600 - 3600;

    rp = meter_redis_cmd(d->redis, "HGETALL %s", MTR_W_FIGMON);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(rp);
        return METER_DRAIN_REDIS;
    }

    nm = 0;
    ms[nm] = meter_month_start(hc);
    ms[nm + 1] = meter_month_start(ms[nm] - 1);
    nm = 2;

    for (i = 0; i + 1 < rp->elements && nm < METER_FIG_MONTHS; i += 2) {
        time_t  s, e;

        fld = rp->element[i]->str;
        if (fld == NULL || meter_uperiod_parse(fld, 6, &s, &e) != 0) {
            continue;
        }

        for (k = 0; k < nm && ms[k] != s; k++) { /* void */ }

        if (k == nm) {
            ms[nm++] = s;
        }
    }

    for (k = 0; k < nm; k++) {
        meter_month_name(ms[k], month, sizeof(month));
        at[k] = 0;
        dirty[k] = 0;
        done[k] = 0;
        known[k] = 0;

        for (i = 0; i + 1 < rp->elements; i += 2) {
            fld = rp->element[i]->str;
            if (fld == NULL || strncmp(fld, month, 6) != 0) {
                continue;
            }

            known[k] = 1;

            if (fld[6] == '\0') {
                at[k] = (time_t) strtoll(rp->element[i + 1]->str, NULL, 10);

            } else if (strcmp(fld + 6, "|dirty") == 0) {
                dirty[k] = (strcmp(rp->element[i + 1]->str, "1") == 0);

            } else if (strcmp(fld + 6, "|closed") == 0) {
                done[k] = 1;
            }
        }
    }

    freeReplyObject(rp);

    rc = METER_DRAIN_OK;

    for (k = 0; k < nm && rc == METER_DRAIN_OK; k++) {
        meter_month_name(ms[k], month, sizeof(month));
        upto = meter_month_end(ms[k]) - 3600;
        if (upto > hc) {
            upto = hc;
        }

        scan = dirty[k];

        /* uniques: once per hour closed since the last count */
        if (ms[k] <= hc && at[k] < upto) {
            rp = meter_redis_cmd(d->redis, "EXISTS " MTR_UQIDX_FMT, month);
            if (!meter_reply_ok(rp)) {
                freeReplyObject(rp);
                return METER_DRAIN_REDIS;
            }

            if (rp->integer == 1) {
                if (meter_fig_uniques(d, ms[k], closed_end, upto) != 0) {
                    freeReplyObject(rp);
                    return METER_DRAIN_REDIS;
                }

                snprintf(f, sizeof(f), "%lld", (long long) upto);
                freeReplyObject(meter_redis_cmd(d->redis, "HSET %s %s %s",
                                                MTR_W_FIGMON, month, f));
                scan = 1;
            }

            freeReplyObject(rp);
        }

        /* closed: the month ended and none of its hours waits */
        closed = 0;

        if (closed_end >= meter_month_end(ms[k])) {
            rp = meter_redis_cmd(d->redis, "ZCOUNT %s %lld (%lld", MTR_HOURS,
                                 (long long) ms[k],
                                 (long long) meter_month_end(ms[k]));
            closed = (meter_reply_int(rp, -1) == 0);
            freeReplyObject(rp);
        }

        /* the close bills what waited for it (additive last) */
        if (closed && !done[k] && known[k]) {
            scan = 1;
        }

        if (scan) {
            /* dirty is cleared only after a complete scan (a pass killed
             * or cut short scans again); raises come from this worker's
             * own pass, under the lock, before it */
            rc = meter_fig_bill(d, ms[k], closed, now, &left);

            if (left) {
                freeReplyObject(meter_redis_cmd(d->redis,
                                                "HSET %s %s|dirty 1",
                                                MTR_W_FIGMON, month));

            } else {
                freeReplyObject(meter_redis_cmd(d->redis, "HDEL %s %s|dirty",
                                                MTR_W_FIGMON, month));

                if (closed) {
                    freeReplyObject(meter_redis_cmd(d->redis,
                                                    "HSET %s %s|closed 1",
                                                    MTR_W_FIGMON, month));
                    done[k] = 1;
                }
            }

            dirty[k] = left;
        }

        /* retention: billed, closed and old */
        if (rc == METER_DRAIN_OK && closed && done[k] && !dirty[k]
            && meter_month_end(ms[k]) + d->cf->retention <= now)
        {
            nkeys = 0;

            /* data, then its index, then the billing state (own slots) */
            if (meter_unique_remove(d->redis, month, &nkeys) != 0) {
                return METER_DRAIN_REDIS;
            }

            freeReplyObject(meter_redis_cmd(d->redis, "DEL " MTR_W_FIG_FMT,
                                            month));
            rp = meter_redis_cmd(d->redis, "HDEL %s %s %s|dirty %s|closed",
                                 MTR_W_FIGMON, month, month, month);
            freeReplyObject(rp);
        }
    }

    return rc;
}
