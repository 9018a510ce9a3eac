
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "config.h"
#include <openssl/rand.h>

#include "log.h"
#include "provider_util.h"
#include "util.h"


int
meter_plans_copy(meter_plans_t *pl, const meter_conf_t *cf)
{
    size_t  i;

    memset(pl, 0, sizeof(meter_plans_t));

    for (i = 0; i < cf->nkv; i++) {
        if (strncmp(cf->kv[i].key, "plan.", 5) == 0) {
            pl->n++;
        }
    }

    if (pl->n == 0) {
        return 0;
    }

    pl->keys = calloc(pl->n, sizeof(char *));
    pl->values = calloc(pl->n, sizeof(char *));
    if (pl->keys == NULL || pl->values == NULL) {
        meter_plans_free(pl);
        return -1;
    }

    pl->n = 0;

    for (i = 0; i < cf->nkv; i++) {
        if (strncmp(cf->kv[i].key, "plan.", 5) != 0) {
            continue;
        }

        pl->keys[pl->n] = strdup(cf->kv[i].key + 5);
        pl->values[pl->n] = strdup(cf->kv[i].value);
        pl->n++;

        if (pl->keys[pl->n - 1] == NULL || pl->values[pl->n - 1] == NULL) {
            meter_plans_free(pl);
            return -1;
        }
    }

    return 0;
}


void
meter_plans_free(meter_plans_t *pl)
{
    size_t  i;

    for (i = 0; i < pl->n; i++) {
        if (pl->keys != NULL) {
            free(pl->keys[i]);
        }

        if (pl->values != NULL) {
            free(pl->values[i]);
        }
    }

    free(pl->keys);
    free(pl->values);
    memset(pl, 0, sizeof(meter_plans_t));
}


int
meter_plan_items(const meter_plans_t *pl, const char *plan,
    const char *kind, meter_plan_item_t *items, int max)
{
    int          n;
    char         prefix[128];
    size_t       i, plen;
    const char  *rest;

    if (plan == NULL) {
        plan = "default";
    }

    snprintf(prefix, sizeof(prefix), "%s.%s", plan, kind);
    plen = strlen(prefix);
    n = 0;

    for (i = 0; i < pl->n; i++) {
        if (strncmp(pl->keys[i], prefix, plen) != 0) {
            continue;
        }

        rest = pl->keys[i] + plen;
        if (*rest != '\0' && *rest != '.') {
            continue;
        }

        if (n == max) {
            return -1;
        }

        if (*rest == '.') {
            rest++;
        }

        if (meter_copy(items[n].meter, sizeof(items[n].meter), rest) != 0
            || meter_copy(items[n].value, sizeof(items[n].value),
                          pl->values[i]) != 0)
        {
            return -1;
        }

        n++;
    }

    return n;
}


const char *
meter_plan_get(const meter_plans_t *pl, const char *plan, const char *key)
{
    char    k[160];
    size_t  i;

    snprintf(k, sizeof(k), "%s.%s", plan != NULL ? plan : "default", key);

    for (i = 0; i < pl->n; i++) {
        if (strcmp(pl->keys[i], k) == 0) {
            return pl->values[i];
        }
    }

    return NULL;
}


int
meter_hmac_hex(const char *key, size_t keylen, const char *a, const char *b,
    size_t blen, char *out)
{
    int            rc;
    size_t         alen, i;
    unsigned int   mdlen;
    unsigned char  md[EVP_MAX_MD_SIZE], *msg;

    alen = (a != NULL) ? strlen(a) + 1 : 0;

    msg = malloc(alen + blen + 1);
    if (msg == NULL) {
        return -1;
    }

    if (a != NULL) {
        memcpy(msg, a, alen - 1);
        msg[alen - 1] = '.';
    }

    memcpy(msg + alen, b, blen);

    rc = -1;
    mdlen = 0;

    if (HMAC(EVP_sha256(), key, (int) keylen, msg, alen + blen, md, &mdlen)
        != NULL && mdlen == 32)
    {
        for (i = 0; i < mdlen; i++) {
            snprintf(out + 2 * i, 3, "%02x", md[i]);
        }

        rc = 0;
    }

    free(msg);

    return rc;
}


int
meter_secure_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    /* the length of a MAC is public; the content is compared in
     * constant time */
    if (alen != blen || alen == 0) {
        return 0;
    }

    return CRYPTO_memcmp(a, b, alen) == 0;
}


static const cJSON *
meter_json_path(const cJSON *json, va_list ap)
{
    const char   *k;
    const cJSON  *o;

    o = json;

    while ((k = va_arg(ap, const char *)) != NULL) {
        if (!cJSON_IsObject(o)) {
            return NULL;
        }

        o = cJSON_GetObjectItemCaseSensitive(o, k);
    }

    return o;
}


const char *
meter_json_str(const cJSON *json, ...)
{
    va_list       ap;
    const cJSON  *o;

    va_start(ap, json);
    o = meter_json_path(json, ap);
    va_end(ap);

    return cJSON_IsString(o) ? o->valuestring : NULL;
}


const cJSON *
meter_json_obj(const cJSON *json, ...)
{
    va_list       ap;
    const cJSON  *o;

    va_start(ap, json);
    o = meter_json_path(json, ap);
    va_end(ap);

    return o;
}


double
meter_json_num(const cJSON *json, ...)
{
    char         *end;
    double        v;
    va_list       ap;
    const cJSON  *o;

    va_start(ap, json);
    o = meter_json_path(json, ap);
    va_end(ap);

    if (cJSON_IsNumber(o)) {
        return o->valuedouble;
    }

    if (cJSON_IsString(o) && o->valuestring[0] != '\0') {
        v = strtod(o->valuestring, &end);
        if (*end == '\0') {
            return v;
        }
    }

    return -1;
}


time_t
meter_rfc3339_parse(const char *s)
{
    char    buf[64];
    size_t  i, j;

    if (s == NULL || strlen(s) >= sizeof(buf)) {
        return -1;
    }

    /* drop fractional seconds: "2026-11-24T10:00:00.123Z" */
    for (i = 0, j = 0; s[i] != '\0'; i++) {
        if (s[i] == '.') {
            while (s[i + 1] >= '0' && s[i + 1] <= '9') {
                i++;
            }

            continue;
        }

        buf[j++] = s[i];
    }

    buf[j] = '\0';

    return meter_iso8601_parse(buf);
}


meter_send_e
meter_http_json(meter_http_t *h, const meter_http_req_t *req, cJSON **json,
    int *replayed, meter_send_result_t *res)
{
    meter_send_e       rc;
    meter_http_resp_t  resp;

    memset(&resp, 0, sizeof(resp));
    *json = NULL;

    rc = meter_http_request(h, req, &resp, res);

    if (replayed != NULL) {
        *replayed = resp.replayed;
    }

    if (resp.body.data != NULL && resp.body.len > 0) {
        *json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    }

    if (rc == METER_SEND_OK && *json == NULL) {
        snprintf(res->error, sizeof(res->error), "%s: answer to %s is not "
                 "JSON", h->name, req->method);
        res->status = METER_SEND_RETRY;
        rc = METER_SEND_RETRY;
    }

    meter_buf_free(&resp.body);

    return rc;
}


void
meter_webhook_invalid(meter_webhook_event_t *ev, int status, const char *msg)
{
    ev->kind = METER_WEBHOOK_INVALID;
    ev->http_status = status;
    snprintf(ev->error, sizeof(ev->error), "%s", msg);
}


int
meter_copy(char *dst, size_t size, const char *s)
{
    size_t  n;

    n = strlen(s);
    if (n >= size) {
        return -1;
    }

    memcpy(dst, s, n + 1);

    return 0;
}


void
meter_fresh_suffix(char *buf, size_t size)
{
    unsigned char  r[8];

    if (RAND_bytes(r, sizeof(r)) != 1) {
        /* no entropy: the clock still differs from the saved key's */
        memset(r, 0, sizeof(r));
        memcpy(r, &(time_t) { time(NULL) }, sizeof(time_t) < 8
                                             ? sizeof(time_t) : 8);
    }

    snprintf(buf, size, "-r%02x%02x%02x%02x%02x%02x%02x%02x",
             r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
}


void
meter_webhook_ids(meter_webhook_event_t *ev, const char *customer,
    const char *subscription)
{
    if (customer != NULL) {
        (void) meter_copy(ev->provider_customer,
                          sizeof(ev->provider_customer), customer);
    }

    if (subscription != NULL) {
        (void) meter_copy(ev->subscription, sizeof(ev->subscription),
                          subscription);
    }
}


int
meter_past_window(const meter_record_t *rec, time_t now, time_t window)
{
    time_t  first;

    if (rec->attempts <= 1) {
        return 0;
    }

    first = (rec->created > 0) ? rec->created : rec->period_end;

    return now - first > window;
}


/* the next page's URL of a "next" (path or URL) on base's origin */
static int
meter_list_next_url(const meter_list_t *l, const char *next, meter_buf_t *url,
    meter_send_result_t *res)
{
    size_t       n;
    const char  *origin_end;

    meter_buf_reset(url);

    if (next[0] == '/') {
        /* the base's origin: "https://v3.recurly.com" of any base */
        origin_end = strstr(l->base, "://");
        origin_end = origin_end != NULL ? strchr(origin_end + 3, '/') : NULL;
        n = origin_end != NULL ? (size_t) (origin_end - l->base)
                               : strlen(l->base);

        return meter_buf_printf(url, "%.*s%s", (int) n, l->base, next);
    }

    n = strlen(l->base);

    if (strncmp(next, l->base, n) == 0 && next[n] == '/') {
        return meter_buf_printf(url, "%s", next);
    }

    snprintf(res->error, sizeof(res->error), "%s: \"next\" is neither a "
             "path nor a URL on %s", l->what, l->base);

    return -2;
}


int
meter_list_walk(const meter_list_t *l, const char *url,
    meter_send_result_t *res)
{
    int           page, rc, stop;
    char          cursor[256];
    cJSON        *json;
    meter_buf_t   u;
    const char   *id, *next;
    const cJSON  *items, *o, *nx;

    memset(&u, 0, sizeof(u));
    json = NULL;
    cursor[0] = '\0';
    rc = -1;

    if (meter_buf_printf(&u, "%s", url) != 0) {
        goto nomem;
    }

    for (page = 0; page < l->max_pages; page++) {
        cJSON_Delete(json);
        json = NULL;

        if (l->get(l->ctx, u.data, &json, res) != METER_SEND_OK) {
            goto end;
        }

        items = cJSON_GetObjectItemCaseSensitive(json,
                                                 l->style == METER_LIST_OFFSET
                                                 ? "list" : "data");
        if (!cJSON_IsArray(items)) {
            snprintf(res->error, sizeof(res->error), "%s: without \"%s\"",
                     l->what, l->style == METER_LIST_OFFSET ? "list" : "data");
            res->status = METER_SEND_RETRY;
            goto end;
        }

        id = NULL;

        cJSON_ArrayForEach(o, items) {
            id = meter_json_str(o, "id", (char *) NULL);

            stop = l->item(l->ctx, o, res);
            if (stop != 0) {
                rc = stop;
                goto end;
            }
        }

        if (l->style == METER_LIST_OFFSET) {
            next = meter_json_str(json, "next_offset", (char *) NULL);

        } else if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(json,
                                                                  "has_more")))
        {
            next = NULL;

        } else if (l->style == METER_LIST_AFTER) {
            next = id;
            if (next == NULL) {
                snprintf(res->error, sizeof(res->error), "%s: has_more "
                         "without a last id", l->what);
                res->status = METER_SEND_RETRY;
                goto end;
            }

        } else {
            nx = cJSON_GetObjectItemCaseSensitive(json, "next");
            if (!cJSON_IsString(nx)) {
                snprintf(res->error, sizeof(res->error), "%s: has_more but "
                         "no next", l->what);
                res->status = METER_SEND_RETRY;
                goto end;
            }

            next = nx->valuestring;
        }

        if (next == NULL) {
            rc = 0;
            goto end;
        }

        if (l->style == METER_LIST_NEXT) {
            stop = meter_list_next_url(l, next, &u, res);
            if (stop == -2) {
                res->status = METER_SEND_FATAL;
                goto end;
            }

            if (stop != 0) {
                goto nomem;
            }

            continue;
        }

        if (meter_copy(cursor, sizeof(cursor), next) != 0) {
            snprintf(res->error, sizeof(res->error), "%s: cursor too long",
                     l->what);
            res->status = METER_SEND_RETRY;
            goto end;
        }

        meter_buf_reset(&u);
        if (meter_buf_printf(&u, "%s&%s=", url,
                             l->style == METER_LIST_AFTER
                             ? "starting_after" : "offset") != 0
            || meter_url_segment(&u, l->curl, cursor) != 0)
        {
            goto nomem;
        }
    }

    snprintf(res->error, sizeof(res->error), "%s: more than %d pages",
             l->what, l->max_pages);
    res->status = METER_SEND_RETRY;
    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "%s: out of memory", l->what);
    res->status = METER_SEND_RETRY;

end:

    cJSON_Delete(json);
    meter_buf_free(&u);

    return rc;
}


int
meter_pcache_init(meter_pcache_t *c, const meter_conf_t *cf, const char *who)
{
    memset(c, 0, sizeof(meter_pcache_t));

    c->who = who;
    c->port = cf->redis_port;
    c->db = cf->redis_db;
    c->timeout_ms = cf->redis_timeout_ms;

    if ((cf->redis_host != NULL
         && (c->host = strdup(cf->redis_host)) == NULL)
        || (cf->redis_unix != NULL
            && (c->unix_path = strdup(cf->redis_unix)) == NULL)
        || (cf->redis_password_file != NULL
            && (c->password_file = strdup(cf->redis_password_file)) == NULL))
    {
        meter_pcache_free(c);
        return -1;
    }

    return 0;
}


meter_redis_t *
meter_pcache_redis(meter_pcache_t *c)
{
    int     rc;
    char    err[256];
    time_t  now;

    if (c->redis.ctx != NULL) {
        return &c->redis;
    }

    now = time(NULL);
    if (c->failed != 0 && now - c->failed < 60) {
        return NULL;
    }

    rc = meter_redis_open(&c->redis, c->host, c->port, c->unix_path,
                          c->password_file, c->db, c->timeout_ms, err,
                          sizeof(err));
    if (rc != 0) {
        c->failed = now;
        meter_log(LOG_WARNING, "%s: cache in Redis unavailable (%s): asking "
                  "the provider instead", c->who, err);
        return NULL;
    }

    c->failed = 0;

    return &c->redis;
}


void
meter_pcache_fail(meter_pcache_t *c)
{
    meter_redis_close(&c->redis);
    c->failed = time(NULL);
}


void
meter_pcache_free(meter_pcache_t *c)
{
    meter_redis_close(&c->redis);
    free(c->host);
    free(c->unix_path);
    free(c->password_file);
    c->host = c->unix_path = c->password_file = NULL;
}
