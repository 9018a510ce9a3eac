
/*
 * Copyright (C) nginx-meter authors
 *
 * The writer layout of docs/redis-schema.md as the worker and meterctl
 * read it: mtr:widx:HOUR lists the writer sessions, each one's
 * mtr:wu:{EPOCH}:SID:HOUR:PART (parts 0..NPARTS-1) hold its counters.
 */


#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "meter_schema.h"
#include "wusage.h"


#define METER_WSCAN       5000    /* fields per HSCAN */
#define METER_WPIPE       256     /* parts per pipeline */


static int
meter_is_hex64(const char *s, size_t len)
{
    size_t  i;

    if (len != 64) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) {
            return 0;
        }
    }

    return 1;
}


void
meter_wkey_free(void *p)
{
    meter_wkey_t  *wk;

    wk = p;
    if (wk != NULL) {
        free(wk->f);
        free(wk);
    }
}


int
meter_wfield_parse(const char *field, size_t len, const char *epoch,
    char *kh, char *vfield)
{
    size_t       mlen, glen;
    const char  *m, *bar, *g, *end;

    end = field + len;

    if (len < 64 + 4 || field[64] != MTR_FIELD_SEP
        || !meter_is_hex64(field, 64))
    {
        return -1;
    }

    m = field + 65;
    bar = memchr(m, MTR_FIELD_SEP, (size_t) (end - m));
    if (bar == NULL) {
        return -1;
    }

    mlen = (size_t) (bar - m);
    g = bar + 1;
    glen = (size_t) (end - g);

    if (mlen == 0 || mlen > MTR_METER_MAX
        || (strspn(m, MTR_NAME_CHARS) < mlen
            && !meter_gauge_name(m, mlen))
        || glen == 0 || glen > 10 || strspn(g, "0123456789") != glen
        || strlen(epoch) != 16)
    {
        return -1;
    }

    memcpy(kh, field, 64);
    kh[64] = '\0';

    snprintf(vfield, METER_VFIELD_SIZE, "%.*s%c%s.%.*s", (int) mlen, m,
             MTR_FIELD_SEP, epoch, (int) glen, g);

    return 0;
}


static int
meter_wmap_add(meter_map_t *wm, const char *kh, const char *vfield,
    uint64_t value)
{
    int              created;
    void           **slot;
    size_t           i;
    meter_wkey_t    *wk;
    meter_wfield_t  *f;

    slot = meter_map_put(wm, kh, &created);
    if (slot == NULL) {
        return -1;
    }

    if (*slot == NULL) {
        *slot = calloc(1, sizeof(meter_wkey_t));
        if (*slot == NULL) {
            return -1;
        }
    }

    wk = *slot;

    for (i = 0; i < wk->n; i++) {
        if (strcmp(wk->f[i].field, vfield) == 0) {
            if (value > wk->f[i].value) {
                wk->f[i].value = value;
            }

            return 0;
        }
    }

    if (wk->n == wk->cap) {
        f = realloc(wk->f, (wk->cap ? 2 * wk->cap : 2)
                           * sizeof(meter_wfield_t));
        if (f == NULL) {
            return -1;
        }

        wk->f = f;
        wk->cap = wk->cap ? 2 * wk->cap : 2;
    }

    snprintf(wk->f[wk->n].field, METER_VFIELD_SIZE, "%s", vfield);
    wk->f[wk->n++].value = value;

    return 0;
}


/* valid "EPOCH:SID:NPARTS" of mtr:widx:HOUR */
int
meter_writer_parse(const char *w, char *epoch, char *sid, unsigned *nparts)
{
    size_t              n, m;
    unsigned long long  v;

    if (strlen(w) < 20 || w[16] != MTR_WRITER_SEP
        || strspn(w, "0123456789abcdef") != 16)
    {
        return -1;
    }

    n = strspn(w + 17, "0123456789");

    if (n == 0 || n > 20 || w[17 + n] != MTR_WRITER_SEP) {
        return -1;
    }

    m = strspn(w + 18 + n, "0123456789");

    if (m == 0 || m > 7 || w[18 + n + m] != '\0') {
        return -1;
    }

    v = strtoull(w + 18 + n, NULL, 10);

    /* a zone of 2^32 slots at most */
    if (v == 0 || v > (1ull << (32 - MTR_WPART_SHIFT))) {
        return -1;
    }

    memcpy(epoch, w, 16);
    epoch[16] = '\0';
    memcpy(sid, w + 17, n);
    sid[n] = '\0';
    *nparts = (unsigned) v;

    return 0;
}


/* the fields of one HSCAN page into wm; -1 when out of memory */
static int
meter_wmap_page(meter_map_t *wm, const meter_map_t *only, const redisReply *f,
    const char *epoch, unsigned *bad)
{
    char      kh[65], vf[METER_VFIELD_SIZE];
    size_t    i;
    uint64_t  v;

    for (i = 0; i + 1 < f->elements; i += 2) {
        if (meter_wfield_parse(f->element[i]->str, f->element[i]->len, epoch,
                               kh, vf)
            != 0
            || meter_parse_u64(f->element[i + 1]->str,
                               f->element[i + 1]->len, &v)
               != 0)
        {
            (*bad)++;
            continue;
        }

        if (only != NULL && meter_map_get(only, kh) == NULL) {
            continue;
        }

        if (meter_wmap_add(wm, kh, vf, v) != 0) {
            return -1;
        }
    }

    return 0;
}


static int
meter_hscan_ok(const redisReply *rp)
{
    return meter_reply_ok(rp) && rp->type == REDIS_REPLY_ARRAY
           && rp->elements == 2 && rp->element[0]->type == REDIS_REPLY_STRING
           && rp->element[1]->type == REDIS_REPLY_ARRAY;
}


/*
 * Reads every writer hash of the hour (mtr:widx:HOUR) into wm; with
 * writers != NULL, also hands back the index (for retention); with only
 * != NULL, keeps the key hashes only has (a customer's).  The first
 * page of a writer's parts goes in one pipeline (most parts are one page,
 * many of a small writer empty), the rest page by page.
 */
int
meter_wmap_load(meter_redis_t *r, const char *hour, meter_map_t *wm,
    const meter_map_t *only, redisReply **writers)
{
    char         epoch[17], sid[21];
    char         (*cursor)[32];
    size_t       w;
    unsigned     bad, part, p0, k, np, nparts;
    redisReply  *ws, *rp;
    int          rc;

    ws = meter_redis_cmd(r, "SMEMBERS " MTR_WIDX_FMT, hour);
    if (!meter_reply_ok(ws) || ws->type != REDIS_REPLY_ARRAY) {
        meter_log(LOG_ERR, MTR_WIDX_FMT ": %s", hour,
                  ws != NULL ? ws->str : r->err);
        freeReplyObject(ws);
        return -1;
    }

    cursor = malloc(METER_WPIPE * sizeof(*cursor));
    if (cursor == NULL) {
        freeReplyObject(ws);
        return -1;
    }

    bad = 0;
    rc = 0;

    for (w = 0; w < ws->elements && rc == 0; w++) {
        if (ws->element[w]->type != REDIS_REPLY_STRING
            || meter_writer_parse(ws->element[w]->str, epoch, sid, &nparts)
               != 0)
        {
            bad++;
            continue;
        }

        for (p0 = 0; p0 < nparts && rc == 0; p0 += np) {
            np = nparts - p0 < METER_WPIPE ? nparts - p0 : METER_WPIPE;

            for (k = 0; k < np; k++) {
                if (meter_redis_append(r, "HSCAN " MTR_WU_FMT " 0 COUNT %d",
                                       epoch, sid, hour, p0 + k, METER_WSCAN)
                    != 0)
                {
                    np = k;
                    rc = -1;
                    break;
                }
            }

            /* every queued reply is read, whatever failed */
            for (k = 0; k < np; k++) {
                cursor[k][0] = '\0';
                rp = meter_redis_reply(r);

                if (rc == 0 && !meter_hscan_ok(rp)) {
                    meter_log(LOG_ERR, "hour %s writer %s: %s", hour,
                              ws->element[w]->str,
                              meter_reply_ok(rp) ? "unexpected HSCAN reply"
                              : rp != NULL ? rp->str : r->err);
                    rc = -1;
                }

                if (rc == 0) {
                    snprintf(cursor[k], sizeof(cursor[k]), "%s",
                             rp->element[0]->str);
                    rc = meter_wmap_page(wm, only, rp->element[1], epoch, &bad);
                }

                freeReplyObject(rp);
            }

            /* the parts with more than a page */
            for (k = 0; k < np && rc == 0; k++) {
                part = p0 + k;

                while (rc == 0 && cursor[k][0] != '\0'
                       && strcmp(cursor[k], "0") != 0)
                {
                    rp = meter_redis_cmd(r, "HSCAN " MTR_WU_FMT " %s COUNT %d",
                                         epoch, sid, hour, part, cursor[k],
                                         METER_WSCAN);
                    if (!meter_hscan_ok(rp)) {
                        meter_log(LOG_ERR, "hour %s writer %s: %s", hour,
                                  ws->element[w]->str,
                                  rp != NULL && rp->type == REDIS_REPLY_ERROR
                                  ? rp->str : r->err);
                        rc = -1;

                    } else {
                        snprintf(cursor[k], sizeof(cursor[k]), "%s",
                                 rp->element[0]->str);
                        rc = meter_wmap_page(wm, only, rp->element[1],
                                             epoch, &bad);
                    }

                    freeReplyObject(rp);
                }
            }
        }
    }

    free(cursor);

    if (bad) {
        meter_log(LOG_WARNING, "hour %s: %u malformed writer entries "
                  "ignored", hour, bad);
    }

    if (rc != 0) {
        freeReplyObject(ws);
        return -1;
    }

    if (writers != NULL) {
        *writers = ws;

    } else {
        freeReplyObject(ws);
    }

    return 0;
}


/*
 * The u fields of one key-hour from both layouts: the key layout's (from
 * its HGETALL reply u, or none) and the writer layout's (wk, or none), one
 * entry per counter with the larger value.  Pairs into *out, pointing into
 * u, wk and *buf; free(*out) and free(*buf).
 */
int
meter_u_merge(redisReply *u, meter_wkey_t *wk, const char ***out,
    size_t *nout, char **buf)
{
    size_t        i, j, n, nu, nw;
    uint64_t      v;
    const char  **uv;

    nu = (u != NULL) ? u->elements : 0;
    nw = (wk != NULL) ? wk->n : 0;

    uv = malloc((nu + 2 * nw + 1) * sizeof(char *));
    *buf = malloc(nw * 24 + 1);

    if (uv == NULL || *buf == NULL) {
        free(uv);
        free(*buf);
        *buf = NULL;
        return -1;
    }

    for (i = 0; i < nu; i++) {
        uv[i] = (u->element[i]->type == REDIS_REPLY_STRING)
                ? u->element[i]->str : "";
    }

    n = nu;

    for (j = 0; j < nw; j++) {
        snprintf(*buf + 24 * j, 24, "%" PRIu64, wk->f[j].value);

        for (i = 0; i + 1 < nu; i += 2) {
            if (strcmp(uv[i], wk->f[j].field) == 0) {
                break;
            }
        }

        if (i + 1 < nu) {
            /* the same slot in both layouts: its larger count */
            if (meter_parse_u64(uv[i + 1], strlen(uv[i + 1]), &v) != 0
                || v < wk->f[j].value)
            {
                uv[i + 1] = *buf + 24 * j;
            }

            continue;
        }

        uv[n++] = wk->f[j].field;
        uv[n++] = *buf + 24 * j;
    }

    *out = uv;
    *nout = n;

    return 0;
}
