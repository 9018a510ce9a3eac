
/*
 * Copyright (C) nginx-meter authors
 *
 * The due index: a pass reads only the closed hours that can hold
 * unbilled usage, not every hour kept until retention.
 *
 * An hour whose read found everything billed (every record made from it
 * finished) leaves mtr:hours and is listed in mtr:{worker}:settled.  It is
 * read again when
 *
 *   - the module writes to it in the key layout: every flush batch sends
 *     ZADD mtr:hours NX before its data, which puts the hour back;
 *   - its writer layout changed: one SHA1 per writer hash (a script), the
 *     writers from mtr:widx:HOUR, compared with the digest taken before
 *     the read that settled it (a session sends its ZADD only once per
 *     hour, so the digest is what sees its late writes);
 *   - once, grace after it left mtr:hours: a batch whose ZADD ran before
 *     the ZREM may have had its data written after the read (other
 *     clients' commands run between a pipeline's commands).  Any later
 *     ZADD puts the hour back.
 *
 * Redis data loss takes mtr:{worker}:settled with it; the module's resend
 * (a new run_id: every live counter rewritten, index entries first) puts
 * the hours back into mtr:hours.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "due.h"
#include "log.h"
#include "meter_schema.h"
#include "scripts.h"


static int
meter_due_cmp(const void *a, const void *b)
{
    return strcmp(((const meter_due_hour_t *) a)->hour,
                  ((const meter_due_hour_t *) b)->hour);
}


static int
meter_due_str_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}


/*
 * Queues the digest script over the parts of one writer "EPOCH:SID:NPARTS"
 * (mtr:widx) of an hour; a malformed member gets a script over no keys,
 * so that every member has one reply.
 */
static int
meter_due_writer(meter_drain_t *d, const char *w, const char *hour)
{
    char          epoch[17], sid[24], nk[16], *e;
    char        (*keys)[160];
    const char  **argv;
    size_t       *argl;
    unsigned long parts, p;
    const char   *s1, *s2;
    int           rc, argc;

    parts = 0;
    s1 = strchr(w, MTR_WRITER_SEP);
    s2 = (s1 != NULL) ? strchr(s1 + 1, MTR_WRITER_SEP) : NULL;

    if (s1 != NULL && s2 != NULL && s1 - w == 16
        && (size_t) (s2 - s1 - 1) < sizeof(sid) && s2 > s1 + 1)
    {
        parts = strtoul(s2 + 1, &e, 10);
        if (*e != '\0' || parts > 65536) {
            parts = 0;
        }

        memcpy(epoch, w, 16);
        epoch[16] = '\0';
        memcpy(sid, s1 + 1, (size_t) (s2 - s1 - 1));
        sid[s2 - s1 - 1] = '\0';
    }

    keys = calloc(parts + 1, sizeof(*keys));
    argv = calloc(parts + 4, sizeof(char *));
    argl = calloc(parts + 4, sizeof(size_t));
    if (keys == NULL || argv == NULL || argl == NULL) {
        free(keys);
        free(argv);
        free(argl);
        return -1;
    }

    snprintf(nk, sizeof(nk), "%lu", parts);
    argc = 0;
    argv[argc++] = "EVAL";
    argv[argc++] = meter_lua_digest;
    argv[argc++] = nk;

    for (p = 0; p < parts; p++) {
        snprintf(keys[p], sizeof(keys[p]), MTR_WU_FMT, epoch, sid, hour,
                 (unsigned) p);
        argv[argc++] = keys[p];
    }

    for (p = 0; p < (unsigned long) argc; p++) {
        argl[p] = strlen(argv[p]);
    }

    rc = meter_redis_append_argv(d->redis, argc, argv, argl);

    free(keys);
    free(argv);
    free(argl);

    return rc;
}


/*
 * The writer-layout digest of every hour in hs, two round trips: the
 * writers of each hour, then one digest script per writer hash.
 */
static int
meter_due_digests(meter_drain_t *d, meter_due_hour_t *hs, size_t n)
{
    char           line[256];
    unsigned char  md[SHA_DIGEST_LENGTH];
    size_t         i, k, j, nw;
    const char    *w;
    redisReply   **members, *rp;
    meter_str_t    buf;
    int            rc;

    if (n == 0) {
        return 0;
    }

    members = calloc(n, sizeof(redisReply *));
    if (members == NULL) {
        return -1;
    }

    rc = -1;

    for (i = 0; i < n; i++) {
        if (meter_redis_append(d->redis, "SMEMBERS " MTR_WIDX_FMT,
                               hs[i].hour)
            != 0)
        {
            goto done;
        }
    }

    for (i = 0; i < n; i++) {
        members[i] = meter_redis_reply(d->redis);

        if (!meter_reply_ok(members[i])
            || members[i]->type != REDIS_REPLY_ARRAY)
        {
            goto done;
        }
    }

    nw = 0;

    for (i = 0; i < n; i++) {
        /* sorted: SMEMBERS has no order (an empty one has no array:
         * qsort must not get NULL) */
        if (members[i]->elements > 1) {
            qsort(members[i]->element, members[i]->elements,
                  sizeof(redisReply *), meter_due_str_cmp);
        }

        for (k = 0; k < members[i]->elements; k++) {
            if (meter_due_writer(d, members[i]->element[k]->str, hs[i].hour)
                != 0)
            {
                goto done;
            }

            nw++;
        }
    }

    for (i = 0; i < n; i++) {
        if (members[i]->elements == 0) {
            snprintf(hs[i].digest, sizeof(hs[i].digest), "-");
            continue;
        }

        memset(&buf, 0, sizeof(meter_str_t));

        for (k = 0; k < members[i]->elements; k++) {
            w = members[i]->element[k]->str;
            rp = meter_redis_reply(d->redis);
            nw--;

            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_STRING) {
                freeReplyObject(rp);
                meter_str_free(&buf);
                goto drain;
            }

            snprintf(line, sizeof(line), "%s %s\n", w, rp->str);
            freeReplyObject(rp);

            if (meter_str_add(&buf, line, strlen(line)) != 0) {
                meter_str_free(&buf);
                goto drain;
            }
        }

        SHA1((const unsigned char *) (buf.data != NULL ? buf.data : ""),
             buf.len, md);
        meter_str_free(&buf);

        for (j = 0; j < SHA_DIGEST_LENGTH; j++) {
            snprintf(hs[i].digest + 2 * j, 3, "%02x", md[j]);
        }
    }

    rc = 0;

drain:

    /* the replies left after an error, so the pipeline stays in step */
    while (nw > 0 && d->redis->ctx != NULL) {
        freeReplyObject(meter_redis_reply(d->redis));
        nw--;
    }

done:

    for (i = 0; i < n; i++) {
        freeReplyObject(members[i]);
    }

    free(members);

    return rc;
}


int
meter_due_hours(meter_drain_t *d, time_t closed_end, time_t now,
    meter_due_hour_t **out, size_t *n)
{
    char              *sp, *v;
    size_t             i, m, cap, ncheck;
    time_t             t, at;
    redisReply        *dirty, *settled;
    meter_due_hour_t  *hs, *check;
    const char        *hour;
    int                verified;

    *out = NULL;
    *n = 0;

    dirty = meter_redis_cmd(d->redis, "ZRANGEBYSCORE %s -inf %lld",
                            MTR_HOURS,
                            (long long) (closed_end - METER_HOUR));
    if (!meter_reply_ok(dirty) || dirty->type != REDIS_REPLY_ARRAY) {
        meter_log(LOG_ERR, MTR_HOURS ": %s",
                  dirty != NULL ? dirty->str : d->redis->err);
        freeReplyObject(dirty);
        return -1;
    }

    settled = meter_redis_cmd(d->redis, "HGETALL " MTR_W_SETTLED);
    if (!meter_reply_ok(settled) || settled->type != REDIS_REPLY_ARRAY) {
        meter_log(LOG_ERR, MTR_W_SETTLED ": %s",
                  settled != NULL ? settled->str : d->redis->err);
        freeReplyObject(dirty);
        freeReplyObject(settled);
        return -1;
    }

    cap = dirty->elements + settled->elements / 2 + 1;
    hs = calloc(cap, sizeof(meter_due_hour_t));
    check = calloc(cap, sizeof(meter_due_hour_t));
    if (hs == NULL || check == NULL) {
        goto failed;
    }

    m = 0;

    for (i = 0; i < dirty->elements; i++) {
        t = meter_hour_parse(dirty->element[i]->str);
        if (t == -1) {
            meter_log(LOG_WARNING, MTR_HOURS ": ignoring malformed hour "
                      "\"%.16s\"", dirty->element[i]->str);
            continue;
        }

        snprintf(hs[m].hour, sizeof(hs[m].hour), "%s",
                 dirty->element[i]->str);
        hs[m].start = t;
        hs[m].dirty = 1;
        m++;
    }

    qsort(hs, m, sizeof(meter_due_hour_t), meter_due_cmp);

    /* settled hours: read again once grace after they settled, and
     * whenever their writer layout changed */
    ncheck = 0;

    for (i = 0; i + 1 < settled->elements; i += 2) {
        hour = settled->element[i]->str;
        t = meter_hour_parse(hour);

        if (t == -1 || t + METER_HOUR > closed_end) {
            continue;
        }

        v = settled->element[i + 1]->str;
        at = (time_t) strtoll(v, &sp, 10);
        verified = (sp[0] == ' ' && sp[1] == '1');

        snprintf(check[ncheck].hour, sizeof(check[ncheck].hour), "%s", hour);
        check[ncheck].start = t;
        /* the digest it was settled with, for the comparison below */
        sp = strrchr(v, ' ');
        snprintf(check[ncheck].digest, sizeof(check[ncheck].digest), "%s",
                 sp != NULL ? sp + 1 : "");

        if (!verified) {
            if (now >= at + d->cf->grace) {
                /* a confirming read; digest taken again below */
                check[ncheck].dirty = -1;
                ncheck++;
            }

            continue;
        }

        ncheck++;
    }

    /* in mtr:hours too: read as a dirty hour */
    for (i = 0; i < ncheck; i++) {
        if (bsearch(&check[i], hs, m, sizeof(meter_due_hour_t),
                    meter_due_cmp)
            != NULL)
        {
            check[i].hour[0] = '\0';
        }
    }

    for (i = 0; i < ncheck; i++) {
        if (check[i].hour[0] == '\0') {
            continue;
        }

        if (check[i].dirty == -1) {
            check[i].dirty = 0;
            hs[m++] = check[i];
            continue;
        }

        /* verified: compared below */
        check[i].dirty = -2;
    }

    /* digests: of every hour to read (taken before the read) and of the
     * verified settled ones (to compare) */
    {
        meter_due_hour_t  *all;
        size_t             na, k;

        all = calloc(m + ncheck + 1, sizeof(meter_due_hour_t));
        if (all == NULL) {
            goto failed;
        }

        na = 0;

        for (i = 0; i < m; i++) {
            all[na++] = hs[i];
        }

        for (i = 0; i < ncheck; i++) {
            if (check[i].hour[0] != '\0' && check[i].dirty == -2) {
                all[na++] = check[i];
            }
        }

        if (meter_due_digests(d, all, na) != 0) {
            free(all);
            goto failed;
        }

        for (i = 0; i < m; i++) {
            memcpy(hs[i].digest, all[i].digest, sizeof(hs[i].digest));
        }

        for (i = 0, k = m; i < ncheck; i++) {
            if (check[i].hour[0] == '\0' || check[i].dirty != -2) {
                continue;
            }

            if (strcmp(all[k].digest, check[i].digest) != 0) {
                meter_log(LOG_DEBUG, "hour %s: its writer layout changed "
                          "since it was settled", check[i].hour);
                hs[m] = all[k];
                hs[m].dirty = 0;
                m++;
            }

            k++;
        }

        free(all);
    }

    qsort(hs, m, sizeof(meter_due_hour_t), meter_due_cmp);

    freeReplyObject(dirty);
    freeReplyObject(settled);
    free(check);

    *out = hs;
    *n = m;

    return 0;

failed:

    freeReplyObject(dirty);
    freeReplyObject(settled);
    free(hs);
    free(check);

    return -1;
}


int
meter_due_settle(meter_drain_t *d, const meter_due_hour_t *h, time_t now)
{
    char         v[80];
    redisReply  *rp;

    /* settled first, then out of mtr:hours: a crash in between leaves it
     * in both, read again */
    snprintf(v, sizeof(v), "%lld %d %s", (long long) now, h->dirty ? 0 : 1,
             h->digest[0] != '\0' ? h->digest : "-");

    rp = meter_redis_cmd(d->redis, "HSET " MTR_W_SETTLED " %s %s", h->hour,
                         v);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rp);
        return -1;
    }

    freeReplyObject(rp);

    if (!h->dirty) {
        return 0;
    }

    rp = meter_redis_cmd(d->redis, "ZREM " MTR_HOURS " %s", h->hour);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rp);
        return -1;
    }

    freeReplyObject(rp);

    meter_log(LOG_DEBUG, "hour %s settled", h->hour);

    return 0;
}


void
meter_due_forget(meter_drain_t *d, const char *hour)
{
    freeReplyObject(meter_redis_cmd(d->redis, "HDEL " MTR_W_SETTLED " %s",
                                    hour));
}


/* the writer-layout counters of hour i (parts of each writer "EPOCH:SID:
 * NPARTS"): their HLENs queued, their number into *queued */
static int
meter_due_count_writers(meter_redis_t *r, const char *hour,
    const redisReply *members, size_t *queued)
{
    char           epoch[17], sid[24], *e;
    size_t         k;
    unsigned long  parts, p;
    const char    *w, *s1, *s2;

    for (k = 0; k < members->elements; k++) {
        w = members->element[k]->str;
        s1 = strchr(w, MTR_WRITER_SEP);
        s2 = (s1 != NULL) ? strchr(s1 + 1, MTR_WRITER_SEP) : NULL;

        if (s1 == NULL || s2 == NULL || s1 - w != 16 || s2 == s1 + 1
            || (size_t) (s2 - s1 - 1) >= sizeof(sid))
        {
            continue;
        }

        parts = strtoul(s2 + 1, &e, 10);
        if (*e != '\0' || parts > 65536) {
            continue;
        }

        memcpy(epoch, w, 16);
        epoch[16] = '\0';
        memcpy(sid, s1 + 1, (size_t) (s2 - s1 - 1));
        sid[s2 - s1 - 1] = '\0';

        for (p = 0; p < parts; p++) {
            if (meter_redis_append(r, "HLEN " MTR_WU_FMT, epoch, sid, hour,
                                   (unsigned) p)
                != 0)
            {
                return -1;
            }

            (*queued)++;
        }
    }

    return 0;
}


int
meter_due_backlog(meter_redis_t *r, time_t closed_end, time_t now,
    unsigned long long *backlog, time_t *oldest)
{
    size_t               i, k, n, q;
    redisReply          *hours, *rp, **members;
    unsigned long long  *count;
    int                  rc;

    *backlog = 0;
    *oldest = 0;

    (void) now;

    /* the closed hours not yet settled: their counters (key-hours of the
     * key layout, fields of the writer layout), an estimate of the records
     * still to send (one per key, hour and meter without customers, fewer
     * with); open records belong to such hours (an hour with a record
     * retrying or dead does not settle), so they are in */
    hours = meter_redis_cmd(r, "ZRANGEBYSCORE " MTR_HOURS " -inf %lld "
                            "WITHSCORES", (long long) (closed_end - 3600));
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(hours);
        return -1;
    }

    n = hours->elements / 2;
    members = calloc(n + 1, sizeof(redisReply *));
    count = calloc(n + 1, sizeof(unsigned long long));
    if (members == NULL || count == NULL) {
        free(members);
        free(count);
        freeReplyObject(hours);
        return -1;
    }

    rc = -1;

    for (i = 0; i < n; i++) {
        if (meter_redis_append(r, "SCARD " MTR_IDX_FMT,
                               hours->element[2 * i]->str)
            != 0
            || meter_redis_append(r, "SMEMBERS " MTR_WIDX_FMT,
                                  hours->element[2 * i]->str)
               != 0)
        {
            goto done;
        }
    }

    for (i = 0; i < n; i++) {
        rp = meter_redis_reply(r);
        members[i] = meter_redis_reply(r);

        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER
            || !meter_reply_ok(members[i])
            || members[i]->type != REDIS_REPLY_ARRAY)
        {
            freeReplyObject(rp);
            goto done;
        }

        count[i] = (unsigned long long) rp->integer;
        freeReplyObject(rp);
    }

    for (i = 0; i < n; i++) {
        q = 0;

        if (meter_due_count_writers(r, hours->element[2 * i]->str,
                                    members[i], &q)
            != 0)
        {
            goto done;
        }

        for (k = 0; k < q; k++) {
            rp = meter_redis_reply(r);

            if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
                freeReplyObject(rp);
                goto done;
            }

            count[i] += (unsigned long long) rp->integer;
            freeReplyObject(rp);
        }
    }

    for (i = 0; i < n; i++) {
        *backlog += count[i];

        if (count[i] > 0 && *oldest == 0) {
            *oldest = (time_t) strtoll(hours->element[2 * i + 1]->str, NULL,
                                       10);
        }
    }

    rc = 0;

done:

    if (rc != 0) {
        /* replies may be left in the pipeline: start afresh */
        meter_redis_close(r);
    }

    for (i = 0; i < n; i++) {
        freeReplyObject(members[i]);
    }

    free(members);
    free(count);
    freeReplyObject(hours);

    return rc;
}
