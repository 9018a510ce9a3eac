
/*
 * Copyright (C) nginx-meter authors
 *
 * Chargebee (API v2): POST /api/v2/subscriptions/{id}/usages, form-encoded
 * item_price_id, quantity, usage_date, id; Basic auth with the API key as
 * user; chargebee-idempotency-key header.
 *
 * The usage id is the record's idempotency key, and Chargebee keeps usage
 * ids unique, so a resend after the 30-minute idempotency window fails
 * with a 400 instead of counting twice.  Any 400 is therefore checked by
 * listing usages with that id: when it exists, the record was accepted.
 *
 * usage_date: Chargebee bills only usage dated while the subscription was
 * active or non_renewing, and usage dated in a term already invoiced is
 * stored (200) but never invoiced (apidocs.chargebee.com/docs/api/usages,
 * "usage_date"); it keeps one usage per (subscription, item price,
 * usage_date).  So the subscription is fetched once per drain pass and a
 * record is dated in the last hour of its own usage (usage_start/_end)
 * that lies in the billable time: from activated_at (else started_at) and
 * current_term_start, to current_term_end, cancelled_at (pause_date while
 * paused) and now.  Usage wholly before that time (a term already
 * invoiced, hours before the start) is dated in the first hour of the
 * current term, with a note naming its hours: billed one term late rather
 * than never.  Usage wholly after a cancellation or pause, or of a
 * subscription in trial, future or transferred, is dead-lettered with the
 * reason.  Inside that hour the second is a hash of (period, customer,
 * meter) plus seq, so the records of one period get distinct dates; a
 * duplicate usage_date (another source, a hash collision) moves to the
 * next second, up to METER_CHARGEBEE_PROBES times.
 *
 * The request budget (150 a minute on a test site, PROVIDERS.md): the
 * subscription is kept in Redis (mtr:{worker}:cb:sub:SUBSCRIPTION, its
 * billable time, never a secret) for chargebee.subscription_ttl (6 h), at
 * most until its term ends (a renewal moves the term) or its trial
 * begins, so an hourly pass spends its requests on usage rather than on
 * one GET per subscription.  A webhook about the subscription drops it,
 * and so does a 404 to a usage POST.  A subscription Chargebee no longer
 * knows (404), or usage wholly after its cancellation, goes to the
 * customer's other active subscription carrying the item price when there
 * is exactly one (GET /api/v2/subscriptions, customer_id and status
 * filters: chargebee-node types/resources/Subscription.d.ts
 * ListInputParam); it is remembered in the old one's entry.  The usage id
 * stays the record's key, which Chargebee keeps unique, so a record billed
 * to either is never billed twice.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include <openssl/evp.h>

#include "http.h"
#include "log.h"
#include "meter_schema.h"
#include "provider.h"
#include "provider_util.h"
#include "redis.h"
#include "util.h"


#define METER_CHARGEBEE_PROBES  16
/* chargebee.subscription_ttl default, and its bound */
#define METER_CHARGEBEE_TTL     (6 * 3600)
#define METER_CHARGEBEE_TTL_MAX (7 * 86400)
/* the cache entry's format version (its first word) */
#define METER_CHARGEBEE_CACHE_V "1"


/* a subscription's billable time, fetched once per drain pass */
typedef struct {
    char                        status[24];
    time_t                      start;          /* activated_at, else
                                                 * started_at; 0 unknown */
    time_t                      term_start;     /* 0: unknown */
    time_t                      term_end;       /* 0: unknown */
    time_t                      end;            /* cancelled_at, or
                                                 * pause_date when paused;
                                                 * 0: none */
    time_t                      begins;         /* trial_end / start_date /
                                                 * resume_date */
    char                        next[128];      /* the customer's
                                                 * subscription replacing
                                                 * this one; "" none */
} meter_chargebee_sub_t;


typedef struct {
    meter_http_t                http;
    char                        base[256];
    char                        api_key[256];
    char                        webhook_auth[1024];  /* "Basic ..." */
    meter_plans_t               plans;
    meter_map_t                 subs;           /* id -> _sub_t, per pass */
    time_t                      ttl;            /* of the Redis copy; 0 off */
    char                        site[16];       /* FNV-1a of base, hex */
    meter_pcache_t              cache;
} meter_chargebee_t;


static int meter_chargebee_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_chargebee_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static int meter_chargebee_lookup(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static void meter_chargebee_cleanup(meter_provider_t *p);
static void meter_chargebee_pass(meter_provider_t *p);
static void meter_chargebee_send_batch(meter_provider_t *p,
    const meter_record_t *recs, size_t n, meter_send_result_t *res);
static meter_send_e meter_chargebee_sub_store(meter_chargebee_t *cb,
    const char *id, const cJSON *json, meter_chargebee_sub_t **out,
    meter_send_result_t *res);
static meter_send_e meter_chargebee_call(meter_chargebee_t *cb,
    const char *url, const meter_buf_t *form, const char *idem, cJSON **json,
    meter_send_result_t *res);
static meter_send_e meter_chargebee_onboard(meter_provider_t *p,
    const meter_onboard_t *in, meter_onboard_result_t *out,
    meter_send_result_t *res);
static int meter_chargebee_overdue(meter_provider_t *p, meter_overdue_pt cb,
    void *data, meter_send_result_t *res);
static void meter_chargebee_webhook(meter_provider_t *p,
    const meter_webhook_req_t *req, meter_webhook_event_t *ev);


/* FNV-1a, 32 bits: short tags of ids and URLs */
static uint32_t
meter_chargebee_fnv32(const char *s)
{
    uint32_t  h;

    for (h = 2166136261U; *s; s++) {
        h ^= (uint8_t) *s;
        h *= 16777619U;
    }

    return h;
}


/* the expected "Authorization: Basic base64(user:password)" */
static int
meter_chargebee_webhook_setup(meter_chargebee_t *cb, const meter_conf_t *cf,
    char *err, size_t errlen)
{
    int          n;
    char         pw[256], plain[520];
    const char  *user;

    user = meter_conf_get(cf, "chargebee.webhook_user");

    if (user == NULL
        && meter_conf_get(cf, "chargebee.webhook_password_file") == NULL)
    {
        return 0;
    }

    if (user == NULL || strchr(user, ':') != NULL || strlen(user) > 250) {
        snprintf(err, errlen, "chargebee.webhook_user: required with "
                 "chargebee.webhook_password_file, without \":\"");
        return -1;
    }

    if (meter_conf_secret(cf, "chargebee.webhook_password_file", pw,
                          sizeof(pw), err, errlen) != 0)
    {
        return -1;
    }

    n = snprintf(plain, sizeof(plain), "%s:%s", user, pw);
    explicit_bzero(pw, sizeof(pw));

    if (n < 0 || (size_t) n >= sizeof(plain)) {
        snprintf(err, errlen, "chargebee.webhook_password_file: too long");
        return -1;
    }

    memcpy(cb->webhook_auth, "Basic ", 6);
    EVP_EncodeBlock((unsigned char *) cb->webhook_auth + 6,
                    (unsigned char *) plain, n);
    explicit_bzero(plain, sizeof(plain));

    return 0;
}


static int
meter_chargebee_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    int                 n;
    size_t              len;
    int64_t             ms;
    const char         *base, *site, *ttl;
    meter_chargebee_t  *cb;

    cb = calloc(1, sizeof(meter_chargebee_t));
    if (cb == NULL) {
        snprintf(err, errlen, "chargebee: out of memory");
        return -1;
    }

    p->data = cb;

    base = meter_conf_get(cf, "chargebee.base_url");
    site = meter_conf_get(cf, "chargebee.site");

    if (base != NULL) {
        n = snprintf(cb->base, sizeof(cb->base), "%s", base);

    } else if (site != NULL) {
        n = snprintf(cb->base, sizeof(cb->base), "https://%s.chargebee.com",
                     site);

    } else {
        snprintf(err, errlen, "chargebee.site or chargebee.base_url: "
                 "required");
        return -1;
    }

    if (n <= 0 || (size_t) n >= sizeof(cb->base)) {
        snprintf(err, errlen, "chargebee.base_url: empty or too long");
        return -1;
    }

    len = strlen(cb->base);
    while (len > 0 && cb->base[len - 1] == '/') {
        cb->base[--len] = '\0';
    }

    if (meter_conf_secret(cf, "chargebee.api_key_file", cb->api_key,
                          sizeof(cb->api_key), err, errlen) != 0)
    {
        return -1;
    }

    if (cb->api_key[0] == '\0') {
        snprintf(err, errlen, "chargebee.api_key_file: the file is empty");
        return -1;
    }

    if (meter_chargebee_webhook_setup(cb, cf, err, errlen) != 0) {
        return -1;
    }

    if (meter_plans_copy(&cb->plans, cf) != 0
        || meter_map_init(&cb->subs, 16) != 0
        || meter_pcache_init(&cb->cache, cf, "chargebee") != 0)
    {
        snprintf(err, errlen, "chargebee: out of memory");
        return -1;
    }

    snprintf(cb->site, sizeof(cb->site), "%08x",
             meter_chargebee_fnv32(cb->base));

    cb->ttl = METER_CHARGEBEE_TTL;
    ttl = meter_conf_get(cf, "chargebee.subscription_ttl");
    if (ttl != NULL) {
        if (meter_parse_duration(ttl, &ms) != 0 || ms < 0
            || ms > METER_CHARGEBEE_TTL_MAX * 1000LL)
        {
            snprintf(err, errlen, "chargebee.subscription_ttl: \"%s\" is "
                     "not a duration of 0 to 7d", ttl);
            return -1;
        }

        cb->ttl = (time_t) (ms / 1000);
    }

    /* 2/s stays under the smallest plan's 150 requests a minute */
    /* a few at once: Chargebee has concurrency limits besides the per
     * minute ones (PROVIDERS.md) */
    return meter_http_init_many(&cb->http, "chargebee", cf, 2, 4, err,
                                errlen);
}


static int
meter_chargebee_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    if (meter_chargebee_setup(p, cf, err, errlen) != 0) {
        meter_chargebee_cleanup(p);
        return -1;
    }

    return 0;
}


static void
meter_chargebee_pass(meter_provider_t *p)
{
    meter_chargebee_t  *cb;

    cb = p->data;
    if (cb != NULL) {
        /* terms renew and subscriptions are cancelled between passes */
        meter_map_free(&cb->subs, free);
    }
}


/* the Redis copy of a subscription: "1.SITE STATUS START TERM_START
 * TERM_END END BEGINS NEXT" (SITE the base URL's tag; Unix s, 0 unknown;
 * NEXT "-" none); status "gone" for a 404 */
static void
meter_chargebee_cache_key(char *buf, size_t size, const char *id)
{
    snprintf(buf, size, MTR_W_CB_SUB_FMT, id);
}


static int
meter_chargebee_cache_parse(const meter_chargebee_t *cb, const char *v,
    meter_chargebee_sub_t *s)
{
    char       st[24], next[128], site[16];
    long long  a, b, c, d, e;

    memset(s, 0, sizeof(meter_chargebee_sub_t));

    /* another site's (test and live share the Redis): not ours */
    if (sscanf(v, METER_CHARGEBEE_CACHE_V ".%15s %23s %lld %lld %lld %lld "
               "%lld %127s", site, st, &a, &b, &c, &d, &e, next) != 8
        || strcmp(site, cb->site) != 0)
    {
        return -1;
    }

    strcpy(s->status, st);
    s->start = (time_t) a;
    s->term_start = (time_t) b;
    s->term_end = (time_t) c;
    s->end = (time_t) d;
    s->begins = (time_t) e;

    if (strcmp(next, "-") != 0) {
        strcpy(s->next, next);
    }

    return 0;
}


/* how long the copy may live: the configured time, at most until the
 * term ends or the trial, a future start or a pause's resumption begins */
static time_t
meter_chargebee_cache_ttl(const meter_chargebee_t *cb,
    const meter_chargebee_sub_t *s, time_t now)
{
    time_t  ttl;

    ttl = cb->ttl;

    if (strcmp(s->status, "cancelled") == 0
        || strcmp(s->status, "gone") == 0)
    {
        return ttl;
    }

    if (s->term_end > 0 && s->term_end - now < ttl) {
        ttl = s->term_end - now;
    }

    if (s->begins > now && s->begins - now < ttl) {
        ttl = s->begins - now;
    }

    return ttl;
}


static void
meter_chargebee_cache_put(meter_chargebee_t *cb, const char *id,
    const meter_chargebee_sub_t *s)
{
    char            key[200], val[300], ex[24];
    time_t          ttl;
    const char     *argv[5];
    redisReply     *rp;
    meter_redis_t  *r;

    ttl = meter_chargebee_cache_ttl(cb, s, time(NULL));
    if (cb->ttl == 0 || ttl < 60 || strlen(id) > 150) {
        return;
    }

    r = meter_pcache_redis(&cb->cache);
    if (r == NULL) {
        return;
    }

    meter_chargebee_cache_key(key, sizeof(key), id);
    snprintf(val, sizeof(val), METER_CHARGEBEE_CACHE_V ".%s %s %lld %lld "
             "%lld %lld %lld %s", cb->site, s->status, (long long) s->start,
             (long long) s->term_start, (long long) s->term_end,
             (long long) s->end, (long long) s->begins,
             s->next[0] != '\0' ? s->next : "-");
    snprintf(ex, sizeof(ex), "%lld", (long long) ttl);

    argv[0] = "SET";
    argv[1] = key;
    argv[2] = val;
    argv[3] = "EX";
    argv[4] = ex;

    rp = meter_redis_argv(r, 5, argv, NULL);
    if (!meter_reply_ok(rp)) {
        meter_pcache_fail(&cb->cache);
    }

    freeReplyObject(rp);
}


/* forgets a subscription: its answer said it changed */
static void
meter_chargebee_cache_drop(meter_chargebee_t *cb, const char *id)
{
    char            key[200];
    void          **slot;
    const char     *argv[2];
    redisReply     *rp;
    meter_redis_t  *r;

    if (cb->subs.keys != NULL) {
        slot = meter_map_get(&cb->subs, id);
        if (slot != NULL) {
            free(*slot);
            *slot = NULL;
        }
    }

    if (cb->ttl == 0 || strlen(id) > 150) {
        return;
    }

    r = meter_pcache_redis(&cb->cache);
    if (r == NULL) {
        return;
    }

    meter_chargebee_cache_key(key, sizeof(key), id);
    argv[0] = "DEL";
    argv[1] = key;

    rp = meter_redis_argv(r, 2, argv, NULL);
    if (!meter_reply_ok(rp)) {
        meter_pcache_fail(&cb->cache);
    }

    freeReplyObject(rp);
}


/* s kept for the pass under id (a copy); the kept one, or NULL */
static meter_chargebee_sub_t *
meter_chargebee_keep(meter_chargebee_t *cb, const char *id,
    const meter_chargebee_sub_t *s)
{
    int                     created;
    void                  **slot;
    meter_chargebee_sub_t  *k;

    k = malloc(sizeof(meter_chargebee_sub_t));
    slot = (k != NULL) ? meter_map_put(&cb->subs, id, &created) : NULL;
    if (slot == NULL) {
        free(k);
        return NULL;
    }

    free(*slot);
    *k = *s;
    *slot = k;

    return k;
}


/* the subscription kept for the pass, else its Redis copy; NULL */
static meter_chargebee_sub_t *
meter_chargebee_cached(meter_chargebee_t *cb, const char *id)
{
    char                    key[200];
    void                  **slot;
    const char             *argv[2];
    redisReply             *rp;
    meter_redis_t          *r;
    meter_chargebee_sub_t   s, *k;

    slot = meter_map_get(&cb->subs, id);
    if (slot != NULL && *slot != NULL) {
        return *slot;
    }

    if (cb->ttl == 0 || strlen(id) > 150) {
        return NULL;
    }

    r = meter_pcache_redis(&cb->cache);
    if (r == NULL) {
        return NULL;
    }

    meter_chargebee_cache_key(key, sizeof(key), id);
    argv[0] = "GET";
    argv[1] = key;

    rp = meter_redis_argv(r, 2, argv, NULL);
    if (!meter_reply_ok(rp)) {
        meter_pcache_fail(&cb->cache);
        freeReplyObject(rp);
        return NULL;
    }

    k = NULL;
    if (rp->type == REDIS_REPLY_STRING
        && meter_chargebee_cache_parse(cb, rp->str, &s) == 0)
    {
        k = meter_chargebee_keep(cb, id, &s);
    }

    freeReplyObject(rp);

    return k;
}


/* GET /api/v2/subscriptions/{id}: the fields of types/resources/
 * Subscription.d.ts (chargebee-node) that bound billable usage; a 404
 * is kept as status "gone" (OK) */
static meter_send_e
meter_chargebee_subscription(meter_chargebee_t *cb, const char *id,
    meter_chargebee_sub_t **out, meter_send_result_t *res)
{
    cJSON                  *json;
    meter_buf_t             url;
    meter_send_e            rc;
    meter_chargebee_sub_t   gone;

    *out = meter_chargebee_cached(cb, id);
    if (*out != NULL) {
        return METER_SEND_OK;
    }

    json = NULL;
    memset(&url, 0, sizeof(url));

    if (meter_buf_printf(&url, "%s/api/v2/subscriptions/", cb->base) != 0
        || meter_url_segment(&url, cb->http.curl, id) != 0)
    {
        snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
        rc = METER_SEND_RETRY;
        goto end;
    }

    rc = meter_chargebee_call(cb, url.data, NULL, NULL, &json, res);
    if (rc == METER_SEND_FATAL && res->http_status == 404) {
        memset(&gone, 0, sizeof(gone));
        strcpy(gone.status, "gone");
        meter_chargebee_cache_put(cb, id, &gone);
        *out = meter_chargebee_keep(cb, id, &gone);
        rc = (*out != NULL) ? METER_SEND_OK : METER_SEND_RETRY;
        goto end;
    }

    if (rc != METER_SEND_OK) {
        goto end;
    }

    rc = meter_chargebee_sub_store(cb, id, json, out, res);

end:

    cJSON_Delete(json);
    meter_buf_free(&url);

    return rc;
}


/* an answer {"subscription": {...}} (GET, or an item of the list), kept
 * for the pass and in Redis */
static meter_send_e
meter_chargebee_sub_store(meter_chargebee_t *cb, const char *id,
    const cJSON *json, meter_chargebee_sub_t **out, meter_send_result_t *res)
{
    double                  v;
    const char             *st;
    const cJSON            *sub;
    meter_chargebee_sub_t   s;

    sub = cJSON_GetObjectItemCaseSensitive(json, "subscription");
    st = meter_json_str(sub, "status", (char *) NULL);
    if (st == NULL || strlen(st) >= sizeof(s.status)
        || strcmp(st, "gone") == 0 || strchr(st, ' ') != NULL)
    {
        snprintf(res->error, sizeof(res->error), "chargebee: subscription "
                 "\"%s\" without a status", id);
        return METER_SEND_RETRY;
    }

    memset(&s, 0, sizeof(s));
    strcpy(s.status, st);

    v = meter_json_num(sub, "activated_at", (char *) NULL);
    if (v <= 0) {
        v = meter_json_num(sub, "started_at", (char *) NULL);
    }

    s.start = meter_time_from_num(v);
    s.term_start = meter_time_from_num(meter_json_num(sub,
                                       "current_term_start", (char *) NULL));
    s.term_end = meter_time_from_num(meter_json_num(sub,
                                     "current_term_end", (char *) NULL));
    s.end = meter_time_from_num(meter_json_num(sub, strcmp(st, "paused") == 0
                                               ? "pause_date"
                                               : "cancelled_at",
                                               (char *) NULL));
    /* when it changes by itself: a trial ends, a future start, a pause
     * resumes (the cache lives until then at most) */
    s.begins = meter_time_from_num(meter_json_num(sub,
                                   strcmp(st, "in_trial") == 0
                                   ? "trial_end"
                                   : strcmp(st, "paused") == 0
                                   ? "resume_date" : "start_date",
                                   (char *) NULL));

    *out = meter_chargebee_keep(cb, id, &s);
    if (*out == NULL) {
        snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
        return METER_SEND_RETRY;
    }

    meter_chargebee_cache_put(cb, id, &s);

    return METER_SEND_OK;
}


/*
 * The customer's subscription that takes over from old (gone, or
 * cancelled before the usage): one active or non_renewing subscription of
 * rec->provider_customer other than old, with the record's item price
 * among its items.  OK with *out, or FATAL with res->error.
 */
static meter_send_e
meter_chargebee_successor(meter_chargebee_t *cb, const meter_record_t *rec,
    const char *old, meter_chargebee_sub_t *olds,
    meter_chargebee_sub_t **out, meter_send_result_t *res)
{
    int                     n, has;
    char                    what[160];
    cJSON                  *json;
    const char             *id, *price;
    meter_buf_t             url, q;
    meter_send_e            rc;
    const cJSON            *list, *item, *found, *its, *it;

    json = NULL;
    found = NULL;
    memset(&url, 0, sizeof(url));
    memset(&q, 0, sizeof(q));

    snprintf(what, sizeof(what), "%s", strcmp(olds->status, "gone") == 0
             ? "not found" : "cancelled before the usage");

    if (olds->next[0] != '\0') {
        /* one step only: a successor replaced in turn is looked up anew */
        rc = meter_chargebee_subscription(cb, olds->next, out, res);
        if (rc != METER_SEND_OK
            || (strcmp((*out)->status, "active") == 0
                || strcmp((*out)->status, "non_renewing") == 0))
        {
            return rc;
        }

        olds->next[0] = '\0';
    }

    if (rec->provider_customer == NULL) {
        snprintf(res->error, sizeof(res->error), "chargebee: subscription "
                 "\"%s\" %s", old, what);
        return METER_SEND_FATAL;
    }

    if (meter_form_add(&q, cb->http.curl, "customer_id[is]",
                       rec->provider_customer) != 0
        || meter_form_add(&q, cb->http.curl, "status[in]",
                          "[\"active\",\"non_renewing\"]") != 0
        || meter_buf_printf(&url, "%s/api/v2/subscriptions?limit=100&%s",
                            cb->base, q.data) != 0)
    {
        snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
        rc = METER_SEND_RETRY;
        goto end;
    }

    rc = meter_chargebee_call(cb, url.data, NULL, NULL, &json, res);
    if (rc != METER_SEND_OK) {
        goto end;
    }

    list = cJSON_GetObjectItemCaseSensitive(json, "list");
    n = 0;

    cJSON_ArrayForEach(item, list) {
        id = meter_json_str(item, "subscription", "id", (char *) NULL);
        if (id == NULL || strcmp(id, old) == 0 || strlen(id) >= 128) {
            continue;
        }

        /* without items listed, any; else the one billing the price */
        its = meter_json_obj(item, "subscription", "subscription_items",
                             (char *) NULL);
        has = !cJSON_IsArray(its) || cJSON_GetArraySize(its) == 0;

        cJSON_ArrayForEach(it, its) {
            price = meter_json_str(it, "item_price_id", (char *) NULL);
            if (price != NULL && strcmp(price, rec->provider_meter) == 0) {
                has = 1;
            }
        }

        if (has) {
            found = item;
            n++;
        }
    }

    if (n != 1) {
        snprintf(res->error, sizeof(res->error), "chargebee: subscription "
                 "\"%s\" %s, and customer \"%s\" has %s active "
                 "subscription with item price \"%s\"", old, what,
                 rec->provider_customer, n == 0 ? "no other" : "more than "
                 "one", rec->provider_meter);
        rc = METER_SEND_FATAL;
        goto end;
    }

    id = meter_json_str(found, "subscription", "id", (char *) NULL);
    rc = meter_chargebee_sub_store(cb, id, found, out, res);
    if (rc != METER_SEND_OK) {
        goto end;
    }

    /* remembered with the old one: later records go there at once */
    strcpy(olds->next, id);
    meter_chargebee_cache_put(cb, old, olds);

    meter_log(LOG_NOTICE, "chargebee: subscription \"%s\" %s: usage of "
              "customer \"%s\" goes to its subscription \"%s\"", old, what,
              rec->provider_customer, id);

end:

    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&q);

    return rc;
}


/* usage wholly after old's end, or old unknown to Chargebee: another
 * subscription must take it */
static int
meter_chargebee_replaced(const meter_chargebee_sub_t *s,
    const meter_record_t *rec)
{
    time_t  ustart;

    if (strcmp(s->status, "gone") == 0) {
        return 1;
    }

    ustart = rec->usage_start > 0 ? rec->usage_start : rec->period_start;

    return strcmp(s->status, "cancelled") == 0 && s->end > 0
           && ustart >= s->end;
}


/*
 * The seconds [*lo, *hi) a record may be dated at so that Chargebee bills
 * it (see the top of the file); *moved: outside its own hours.  OK, or
 * FATAL with res->error.
 */
static meter_send_e
meter_chargebee_window(const meter_chargebee_sub_t *s,
    const meter_record_t *rec, time_t now, time_t *lo, time_t *hi,
    int *moved, meter_send_result_t *res)
{
    char    a[24], b[24], t[24];
    time_t  ustart, uend, wlo, whi;

    ustart = rec->usage_start > 0 ? rec->usage_start : rec->period_start;
    uend = rec->usage_end > ustart ? rec->usage_end : rec->period_end;

    meter_iso8601(ustart, a, sizeof(a));
    meter_iso8601(uend, b, sizeof(b));
    *moved = 0;

    if (strcmp(s->status, "active") != 0
        && strcmp(s->status, "non_renewing") != 0
        && strcmp(s->status, "cancelled") != 0
        && strcmp(s->status, "paused") != 0)
    {
        meter_iso8601(s->begins, t, sizeof(t));
        snprintf(res->error, sizeof(res->error), "chargebee: subscription "
                 "\"%s\" is %s%s%s: Chargebee bills only usage dated while "
                 "active or non_renewing (usage %s..%s; meterctl retry once "
                 "it is active dates it then)", rec->subscription, s->status,
                 s->begins > 0 ? " until " : "", s->begins > 0 ? t : "", a,
                 b);
        return METER_SEND_FATAL;
    }

    if (strcmp(s->status, "cancelled") == 0 && s->end == 0) {
        snprintf(res->error, sizeof(res->error), "chargebee: subscription "
                 "\"%s\" is cancelled without cancelled_at (usage %s..%s)",
                 rec->subscription, a, b);
        return METER_SEND_FATAL;
    }

    if (s->end > 0 && ustart >= s->end) {
        meter_iso8601(s->end, t, sizeof(t));
        snprintf(res->error, sizeof(res->error), "chargebee: usage %s..%s "
                 "is after subscription \"%s\" was %s at %s: Chargebee would "
                 "store it and never bill it", a, b, rec->subscription,
                 strcmp(s->status, "paused") == 0 ? "paused" : "cancelled",
                 t);
        return METER_SEND_FATAL;
    }

    wlo = s->start > s->term_start ? s->start : s->term_start;

    whi = now + 1;
    if (s->term_end > 0 && s->term_end < whi) {
        whi = s->term_end;
    }

    if (s->end > 0 && s->end < whi) {
        whi = s->end;
    }

    if (uend <= wlo) {
        /* a term already invoiced, or before the start: the current
         * term's first hour bills it, one term late */
        *lo = wlo;
        *hi = wlo + 3600;
        *moved = 1;

    } else if (ustart >= whi) {
        /* the term ended and has not renewed yet: its last hour */
        *lo = whi - 3600;
        *hi = whi;
        *moved = 1;

    } else {
        /* the last hour of the usage inside the billable time */
        *hi = uend < whi ? uend : whi;
        *lo = *hi - 3600;
        if (*lo < ustart) {
            *lo = ustart;
        }
    }

    if (*lo < wlo) {
        *lo = wlo;
    }

    if (*hi > whi) {
        *hi = whi;
    }

    if (*hi <= *lo) {
        meter_iso8601(wlo, t, sizeof(t));
        snprintf(res->error, sizeof(res->error), "chargebee: subscription "
                 "\"%s\" has no billable time for usage %s..%s (from %s)",
                 rec->subscription, a, b, t);
        return METER_SEND_FATAL;
    }

    return METER_SEND_OK;
}


/* FNV-1a of (period, customer, meter), plus seq: the records of one
 * period and meter get consecutive seconds */
static uint64_t
meter_chargebee_spread(const meter_record_t *rec)
{
    char            buf[256];
    uint64_t        h;
    const uint8_t  *s;

    snprintf(buf, sizeof(buf), "%lld|%s|%s", (long long) rec->period_start,
             rec->customer != NULL ? rec->customer : rec->subscription,
             rec->meter != NULL ? rec->meter : rec->provider_meter);

    h = 14695981039346656037ULL;
    for (s = (const uint8_t *) buf; *s; s++) {
        h ^= *s;
        h *= 1099511628211ULL;
    }

    return h + (rec->seq > 0 ? rec->seq - 1 : 0);
}


/* a 400 about usage_date: the code is not published (chargebee-node has
 * none), so the param or the message naming it is taken */
static int
meter_chargebee_date_taken(const meter_http_resp_t *resp)
{
    int          taken;
    cJSON       *json;
    const char  *param, *msg;

    json = cJSON_ParseWithLength(resp->body.data, resp->body.len);
    param = meter_json_str(json, "param", (char *) NULL);
    msg = meter_json_str(json, "message", (char *) NULL);

    taken = (param != NULL && strcmp(param, "usage_date") == 0)
            || (param == NULL && msg != NULL
                && strstr(msg, "usage_date") != NULL
                && strstr(msg, "exist") != NULL);

    cJSON_Delete(json);

    return taken;
}


/* one attempt; *gone: the usage POST answered 404 */
static meter_send_e
meter_chargebee_send_one(meter_provider_t *p, const meter_record_t *rec0,
    meter_send_result_t *res, int *gone)
{
    int                     found, moved, probe;
    char                    idem[200], note[120], a[24], b[24], sid[128];
    char                    ikey[96];
    time_t                  lo, hi, date;
    meter_buf_t             url, body;
    meter_send_e            rc;
    meter_record_t          r2;
    meter_http_req_t        req;
    meter_chargebee_t      *cb;
    meter_http_resp_t       resp;
    meter_send_result_t     lres;
    const meter_record_t   *rec;
    meter_chargebee_sub_t  *sub, *next;

    cb = p->data;
    rec = rec0;
    *gone = 0;
    snprintf(ikey, sizeof(ikey), "%s", rec->idempotency_key);

    memset(&url, 0, sizeof(url));
    memset(&body, 0, sizeof(body));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;
    res->status = rc;

    if (rec->subscription == NULL || rec->provider_meter == NULL) {
        snprintf(res->error, sizeof(res->error), "chargebee: record without "
                 "%s", rec->subscription == NULL
                       ? "a subscription" : "an item price");
        goto end;
    }

    rc = meter_chargebee_subscription(cb, rec->subscription, &sub, res);

    if (rc == METER_SEND_OK && meter_chargebee_replaced(sub, rec)) {
        rc = meter_chargebee_successor(cb, rec, rec->subscription, sub,
                                       &next, res);
        if (rc == METER_SEND_OK) {
            /* the record as it goes to the successor; same usage id */
            snprintf(sid, sizeof(sid), "%s", sub->next);
            r2 = *rec;
            r2.subscription = sid;
            rec = &r2;
            sub = next;

            /* Chargebee replays a key's first answer (the old one's 404):
             * the successor's POSTs have their own key; the usage id
             * still dedupes */
            snprintf(ikey, sizeof(ikey), "%s-s%08x", rec->idempotency_key,
                     meter_chargebee_fnv32(sid));

        } else if (rc == METER_SEND_FATAL
                   && strcmp(sub->status, "cancelled") == 0)
        {
            /* none: the window says why the usage is not billable */
            rc = METER_SEND_OK;
        }
    }

    if (rc == METER_SEND_OK) {
        rc = meter_chargebee_window(sub, rec, time(NULL), &lo, &hi, &moved,
                                    res);
    }

    if (rc != METER_SEND_OK) {
        goto end;
    }

    date = lo + (time_t) (meter_chargebee_spread(rec) % (uint64_t) (hi - lo));

    meter_iso8601(rec->usage_start > 0 ? rec->usage_start : rec->period_start,
                  a, sizeof(a));
    meter_iso8601(rec->usage_end > 0 ? rec->usage_end : rec->period_end,
                  b, sizeof(b));
    snprintf(note, sizeof(note), "nginx-meter: usage of %s..%s, dated in "
             "the current term", a, b);

    if (meter_buf_printf(&url, "%s/api/v2/subscriptions/", cb->base) != 0
        || meter_url_segment(&url, cb->http.curl, rec->subscription) != 0
        || meter_buf_printf(&url, "/usages") != 0)
    {
        goto nomem;
    }

    req.method = "POST";
    req.url = url.data;
    req.content_type = "application/x-www-form-urlencoded";
    req.accept = "application/json";
    req.headers[0] = idem;
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = cb->api_key;

    for (probe = 0; probe < METER_CHARGEBEE_PROBES; probe++) {
        meter_buf_reset(&body);

        if (meter_form_add(&body, cb->http.curl, "item_price_id",
                           rec->provider_meter) != 0
            || meter_form_add_u64(&body, cb->http.curl, "quantity",
                                  (unsigned long long) rec->quantity) != 0
            || meter_form_add_u64(&body, cb->http.curl, "usage_date",
                                  (unsigned long long) date) != 0
            || meter_form_add(&body, cb->http.curl, "id",
                              rec->idempotency_key) != 0
            || (moved && meter_form_add(&body, cb->http.curl, "note", note)
                         != 0))
        {
            goto nomem;
        }

        /* each date its own key: a saved answer is for its parameters */
        if (probe == 0) {
            snprintf(idem, sizeof(idem), "chargebee-idempotency-key: %s",
                     ikey);

        } else {
            snprintf(idem, sizeof(idem), "chargebee-idempotency-key: %s-d%lld",
                     ikey, (long long) date);
        }

        req.body = body.data;
        req.body_len = body.len;

        rc = meter_http_request(&cb->http, &req, &resp, res);

        /* a replayed failure: the usage id dedupes, so try a fresh key */
        if (rc == METER_SEND_RETRY && resp.replayed) {
            snprintf(idem, sizeof(idem), "chargebee-idempotency-key: "
                     "%s-r%lx%04lx", ikey,
                     (unsigned long) time(NULL),
                     (unsigned long) (random() & 0xffff));
            rc = meter_http_request(&cb->http, &req, &resp, res);
        }

        if (rc == METER_SEND_FATAL && res->http_status == 404) {
            /* gone since it was cached: forgotten, asked again */
            meter_chargebee_cache_drop(cb, rec->subscription);
            *gone = 1;
            break;
        }

        if (rc != METER_SEND_FATAL || res->http_status != 400) {
            break;
        }

        /* the usage id may exist from an earlier attempt */
        memset(&lres, 0, sizeof(lres));
        found = meter_chargebee_lookup(p, rec, &lres);
        if (found == 0 && rec != rec0) {
            /* accepted by the old subscription before it was replaced */
            found = meter_chargebee_lookup(p, rec0, &lres);
        }

        if (found == 1) {
            res->status = METER_SEND_OK;
            res->error[0] = '\0';
            rc = METER_SEND_OK;
            break;
        }

        if (found != 0 || !meter_chargebee_date_taken(&resp)
            || hi - lo <= probe + 1)
        {
            break;
        }

        /* another usage has this second: the next one */
        date = (date + 1 < hi) ? date + 1 : lo;
    }

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
    rc = METER_SEND_RETRY;

end:

    res->status = rc;
    meter_buf_free(&url);
    meter_buf_free(&body);
    meter_buf_free(&resp.body);

    return rc;
}


static meter_send_e
meter_chargebee_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int           gone;
    meter_send_e  rc;

    rc = meter_chargebee_send_one(p, rec, res, &gone);

    if (gone) {
        /* the cached subscription (or its successor) is gone: the usage
         * follows Chargebee's fresh answer */
        rc = meter_chargebee_send_one(p, rec, res, &gone);
    }

    return rc;
}


/* the subscriptions of a chunk not cached yet, fetched concurrently */
static void
meter_chargebee_prefetch(meter_chargebee_t *cb, const meter_record_t *recs,
    size_t n)
{
    int                     created;
    size_t                  i, m;
    cJSON                  *json;
    meter_map_t             seen;
    meter_buf_t            *urls;
    meter_http_req_t       *reqs;
    meter_http_job_t       *jobs;
    const char            **ids;
    meter_send_result_t     res;
    meter_chargebee_sub_t  *sub;

    if (meter_map_init(&seen, n) != 0) {
        return;
    }

    jobs = calloc(n, sizeof(meter_http_job_t));
    reqs = calloc(n, sizeof(meter_http_req_t));
    urls = calloc(n, sizeof(meter_buf_t));
    ids = calloc(n, sizeof(char *));
    m = 0;

    if (jobs == NULL || reqs == NULL || urls == NULL || ids == NULL) {
        goto end;
    }

    for (i = 0; i < n; i++) {
        /* kept for the pass or in Redis: no request */
        if (recs[i].subscription == NULL
            || meter_map_put(&seen, recs[i].subscription, &created) == NULL
            || !created
            || meter_chargebee_cached(cb, recs[i].subscription) != NULL)
        {
            continue;
        }

        if (meter_buf_printf(&urls[m], "%s/api/v2/subscriptions/", cb->base)
            != 0
            || meter_url_segment(&urls[m], cb->http.curl,
                                 recs[i].subscription) != 0)
        {
            break;
        }

        reqs[m].method = "GET";
        reqs[m].url = urls[m].data;
        reqs[m].accept = "application/json";
        reqs[m].auth = METER_HTTP_AUTH_BASIC;
        reqs[m].secret = cb->api_key;
        jobs[m].req = &reqs[m];
        ids[m] = recs[i].subscription;
        m++;
    }

    meter_http_request_many(&cb->http, jobs, m);

    for (i = 0; i < m; i++) {
        /* a failure is not cached: send() fetches it again and says why */
        if (jobs[i].st == METER_SEND_OK) {
            json = cJSON_ParseWithLength(jobs[i].resp.body.data,
                                         jobs[i].resp.body.len);
            if (json != NULL) {
                memset(&res, 0, sizeof(res));
                (void) meter_chargebee_sub_store(cb, ids[i], json, &sub,
                                                 &res);
                cJSON_Delete(json);
            }
        }

        meter_buf_free(&jobs[i].resp.body);
    }

end:

    if (urls != NULL) {
        for (i = 0; i < n; i++) {
            meter_buf_free(&urls[i]);
        }
    }

    meter_map_free(&seen, NULL);
    free(jobs);
    free(reqs);
    free(urls);
    free(ids);
}


/*
 * A chunk of new records: their subscriptions fetched together, then the
 * first attempt of each usage concurrently (one per subscription at a
 * time: Chargebee keeps one usage per subscription, item price and date,
 * and has concurrency limits).  Whatever is not a plain success (a taken
 * date, a replayed failure, a retry) goes through send(), which sends it
 * again under the same key (Chargebee replays its first answer) and takes
 * it from there.
 */
static void
meter_chargebee_send_batch(meter_provider_t *p, const meter_record_t *recs,
    size_t n, meter_send_result_t *res)
{
    int                     moved;
    char                  (*idem)[200];
    size_t                  i, m, *idx;
    time_t                  lo, hi, date;
    meter_buf_t            *urls, *bodies;
    meter_http_req_t       *reqs;
    meter_http_job_t       *jobs;
    meter_chargebee_t      *cb;
    meter_send_result_t     r;
    meter_chargebee_sub_t  *sub;

    cb = p->data;

    /* nothing counts as accepted until an answer says so */
    for (i = 0; i < n; i++) {
        memset(&res[i], 0, sizeof(res[i]));
        res[i].status = METER_SEND_RETRY;
    }

    meter_chargebee_prefetch(cb, recs, n);

    jobs = calloc(n, sizeof(meter_http_job_t));
    reqs = calloc(n, sizeof(meter_http_req_t));
    urls = calloc(n, sizeof(meter_buf_t));
    bodies = calloc(n, sizeof(meter_buf_t));
    idem = calloc(n, sizeof(*idem));
    idx = calloc(n, sizeof(size_t));
    m = 0;

    if (jobs == NULL || reqs == NULL || urls == NULL || bodies == NULL
        || idem == NULL || idx == NULL)
    {
        goto rest;
    }

    for (i = 0; i < n; i++) {
        memset(&r, 0, sizeof(r));

        /* records the fast path cannot date (no subscription cached, a
         * moved date needing a note): send() handles them */
        if (recs[i].subscription == NULL || recs[i].provider_meter == NULL
            || (sub = meter_chargebee_cached(cb, recs[i].subscription))
               == NULL
            || meter_chargebee_window(sub, &recs[i], time(NULL), &lo, &hi,
                                      &moved, &r) != METER_SEND_OK
            || moved)
        {
            continue;
        }

        date = lo + (time_t) (meter_chargebee_spread(&recs[i])
                              % (uint64_t) (hi - lo));

        if (meter_buf_printf(&urls[m], "%s/api/v2/subscriptions/", cb->base)
            != 0
            || meter_url_segment(&urls[m], cb->http.curl,
                                 recs[i].subscription) != 0
            || meter_buf_printf(&urls[m], "/usages") != 0
            || meter_form_add(&bodies[m], cb->http.curl, "item_price_id",
                              recs[i].provider_meter) != 0
            || meter_form_add_u64(&bodies[m], cb->http.curl, "quantity",
                                  (unsigned long long) recs[i].quantity)
               != 0
            || meter_form_add_u64(&bodies[m], cb->http.curl, "usage_date",
                                  (unsigned long long) date) != 0
            || meter_form_add(&bodies[m], cb->http.curl, "id",
                              recs[i].idempotency_key) != 0)
        {
            continue;
        }

        /* the key send() uses for its first probe */
        snprintf(idem[m], sizeof(idem[m]), "chargebee-idempotency-key: %s",
                 recs[i].idempotency_key);

        reqs[m].method = "POST";
        reqs[m].url = urls[m].data;
        reqs[m].content_type = "application/x-www-form-urlencoded";
        reqs[m].accept = "application/json";
        reqs[m].headers[0] = idem[m];
        reqs[m].body = bodies[m].data;
        reqs[m].body_len = bodies[m].len;
        reqs[m].auth = METER_HTTP_AUTH_BASIC;
        reqs[m].secret = cb->api_key;
        jobs[m].req = &reqs[m];
        jobs[m].serial = recs[i].subscription;
        idx[m++] = i;
    }

    meter_http_request_many(&cb->http, jobs, m);

    for (i = 0; i < m; i++) {
        if (jobs[i].st == METER_SEND_OK && !jobs[i].resp.replayed) {
            res[idx[i]] = jobs[i].res;
            res[idx[i]].status = METER_SEND_OK;

        } else if (jobs[i].resp.status == 404) {
            /* gone since it was cached: send() asks again */
            meter_chargebee_cache_drop(cb, jobs[i].serial);
        }

        meter_buf_free(&jobs[i].resp.body);
    }

rest:

    for (i = 0; i < n; i++) {
        if (res[i].status != METER_SEND_OK) {
            (void) meter_chargebee_send(p, &recs[i], &res[i]);
        }
    }

    if (urls != NULL && bodies != NULL) {
        for (i = 0; i < n; i++) {
            meter_buf_free(&urls[i]);
            meter_buf_free(&bodies[i]);
        }
    }

    free(jobs);
    free(reqs);
    free(urls);
    free(bodies);
    free(idem);
    free(idx);
}


/* GET /api/v2/usages?id[is]=KEY&subscription_id[is]=SUB */
static int
meter_chargebee_lookup(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    int                 found;
    cJSON              *json;
    meter_buf_t         url, q;
    meter_http_req_t    req;
    meter_chargebee_t  *cb;
    meter_http_resp_t   resp;
    const cJSON        *list, *item, *usage, *id;

    cb = p->data;
    found = -1;
    json = NULL;

    memset(&url, 0, sizeof(url));
    memset(&q, 0, sizeof(q));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));

    if (rec->subscription == NULL) {
        goto end;
    }

    if (meter_form_add(&q, cb->http.curl, "id[is]", rec->idempotency_key)
        != 0
        || meter_form_add(&q, cb->http.curl, "subscription_id[is]",
                          rec->subscription) != 0
        || meter_buf_printf(&url, "%s/api/v2/usages?%s", cb->base, q.data)
           != 0)
    {
        goto end;
    }

    req.method = "GET";
    req.url = url.data;
    req.accept = "application/json";
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = cb->api_key;

    if (meter_http_request(&cb->http, &req, &resp, res) != METER_SEND_OK) {
        goto end;
    }

    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    list = cJSON_GetObjectItemCaseSensitive(json, "list");
    if (!cJSON_IsArray(list)) {
        snprintf(res->error, sizeof(res->error),
                 "chargebee: usage list without \"list\"");
        goto end;
    }

    found = 0;

    cJSON_ArrayForEach(item, list) {
        usage = cJSON_GetObjectItemCaseSensitive(item, "usage");
        id = cJSON_GetObjectItemCaseSensitive(usage, "id");

        if (cJSON_IsString(id)
            && strcmp(id->valuestring, rec->idempotency_key) == 0)
        {
            found = 1;
            break;
        }
    }

end:

    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&q);
    meter_buf_free(&resp.body);

    return found;
}


/* one call; form NULL for a GET, idem NULL for none */
static meter_send_e
meter_chargebee_call(meter_chargebee_t *cb, const char *url,
    const meter_buf_t *form, const char *idem, cJSON **json,
    meter_send_result_t *res)
{
    char              hdr[200];
    meter_http_req_t  req;

    memset(&req, 0, sizeof(req));

    req.method = (form != NULL) ? "POST" : "GET";
    req.url = url;
    req.accept = "application/json";
    req.auth = METER_HTTP_AUTH_BASIC;
    req.secret = cb->api_key;

    if (form != NULL) {
        req.content_type = "application/x-www-form-urlencoded";
        req.body = form->data != NULL ? form->data : "";
        req.body_len = form->len;
    }

    if (idem != NULL) {
        snprintf(hdr, sizeof(hdr), "chargebee-idempotency-key: %s", idem);
        req.headers[0] = hdr;
    }

    return meter_http_json(&cb->http, &req, json, NULL, res);
}


static int
meter_chargebee_duplicate(const cJSON *json, const meter_send_result_t *res)
{
    const char  *code;

    code = meter_json_str(json, "api_error_code", (char *) NULL);

    return res->http_status == 400 && code != NULL
           && strcmp(code, "duplicate_entry") == 0;
}


/*
 * Customer and subscription get our customer id as their Chargebee id
 * (when it fits Chargebee's 50 characters), so a retry after the 30-minute
 * idempotency window finds them ("duplicate_entry") instead of making a
 * second one.
 */
static meter_send_e
meter_chargebee_onboard(meter_provider_t *p, const meter_onboard_t *in,
    meter_onboard_result_t *out, meter_send_result_t *res)
{
    int                 n, i, own_id;
    char                idem[128], key[64];
    cJSON              *json;
    meter_buf_t         url, form;
    const char         *id;
    meter_send_e        rc;
    meter_chargebee_t  *cb;
    meter_plan_item_t   plan[METER_PLAN_ITEMS];

    cb = p->data;
    json = NULL;

    memset(&url, 0, sizeof(url));
    memset(&form, 0, sizeof(form));
    memset(out, 0, sizeof(*out));
    memset(res, 0, sizeof(*res));

    rc = METER_SEND_FATAL;

    n = meter_plan_items(&cb->plans, in->plan, "chargebee_item_price", plan,
                         METER_PLAN_ITEMS);
    if (n <= 0) {
        snprintf(res->error, sizeof(res->error), "chargebee: %s \"plan.%s."
                 "chargebee_item_price\" in the config",
                 n == 0 ? "no" : "too many or too long",
                 in->plan ? in->plan : "default");
        goto end;
    }

    own_id = strlen(in->customer) <= 50;

    if (meter_buf_printf(&url, "%s/api/v2/customers", cb->base) != 0
        || (own_id
            && meter_form_add(&form, cb->http.curl, "id", in->customer) != 0)
        || meter_form_add(&form, cb->http.curl, "email", in->email) != 0
        || (in->name != NULL
            && meter_form_add(&form, cb->http.curl, "first_name", in->name)
               != 0))
    {
        goto nomem;
    }

    snprintf(idem, sizeof(idem), "nginx-meter-%s-customer", in->customer);

    rc = meter_chargebee_call(cb, url.data, &form, idem, &json, res);

    if (rc == METER_SEND_FATAL && own_id
        && meter_chargebee_duplicate(json, res))
    {
        id = in->customer;
        rc = METER_SEND_OK;

    } else {
        id = meter_json_str(json, "customer", "id", (char *) NULL);
    }

    if (rc != METER_SEND_OK) {
        goto end;
    }

    if (id == NULL
        || meter_copy(out->provider_customer, sizeof(out->provider_customer),
                      id) != 0)
    {
        snprintf(res->error, sizeof(res->error),
                 "chargebee: customer without a usable id");
        rc = METER_SEND_RETRY;
        goto end;
    }

    cJSON_Delete(json);
    json = NULL;

    meter_buf_reset(&url);
    meter_buf_reset(&form);

    if (meter_buf_printf(&url, "%s/api/v2/customers/", cb->base) != 0
        || meter_url_segment(&url, cb->http.curl, out->provider_customer)
           != 0
        || meter_buf_printf(&url, "/subscription_for_items") != 0
        || (own_id
            && meter_form_add(&form, cb->http.curl, "id", in->customer) != 0))
    {
        goto nomem;
    }

    for (i = 0; i < n; i++) {
        snprintf(key, sizeof(key), "subscription_items[item_price_id][%d]",
                 i);
        if (meter_form_add(&form, cb->http.curl, key, plan[i].value) != 0) {
            goto nomem;
        }
    }

    snprintf(idem, sizeof(idem), "nginx-meter-%s-subscription",
             in->customer);

    rc = meter_chargebee_call(cb, url.data, &form, idem, &json, res);

    if (rc == METER_SEND_FATAL && own_id
        && meter_chargebee_duplicate(json, res))
    {
        id = in->customer;
        rc = METER_SEND_OK;

    } else {
        id = meter_json_str(json, "subscription", "id", (char *) NULL);
    }

    if (rc != METER_SEND_OK) {
        goto end;
    }

    if (id == NULL
        || meter_copy(out->subscription, sizeof(out->subscription), id) != 0)
    {
        snprintf(res->error, sizeof(res->error),
                 "chargebee: subscription without a usable id");
        rc = METER_SEND_RETRY;
        goto end;
    }

    res->error[0] = '\0';
    rc = METER_SEND_OK;

    goto end;

nomem:

    snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
    rc = METER_SEND_RETRY;

end:

    res->status = rc;
    cJSON_Delete(json);
    meter_buf_free(&url);
    meter_buf_free(&form);

    return rc;
}


/* one GET of a list page (meter_list_walk); ctx[0] the provider */
static meter_send_e
meter_chargebee_list_get(void *ctx, const char *url, cJSON **json,
    meter_send_result_t *res)
{
    return meter_chargebee_call(((void **) ctx)[0], url, NULL, NULL, json,
                                res);
}


static void
meter_chargebee_list(meter_chargebee_t *cb, meter_list_t *l,
    const char *what, meter_list_item_pt item, void **ctx)
{
    memset(l, 0, sizeof(meter_list_t));

    ctx[0] = cb;

    l->style = METER_LIST_OFFSET;
    l->what = what;
    l->curl = cb->http.curl;
    l->max_pages = 100000;
    l->get = meter_chargebee_list_get;
    l->item = item;
    l->ctx = ctx;
}


typedef struct {
    meter_overdue_pt            cb;
    void                       *data;
} meter_chargebee_od_t;


static int
meter_chargebee_od_item(void *ctx, const cJSON *item,
    meter_send_result_t *res)
{
    double                 due;
    meter_overdue_t        od;
    meter_chargebee_od_t  *w;

    w = ((void **) ctx)[1];

    od.provider_customer = meter_json_str(item, "invoice", "customer_id",
                                          (char *) NULL);
    od.subscription = meter_json_str(item, "invoice", "subscription_id",
                                     (char *) NULL);
    due = meter_json_num(item, "invoice", "due_date", (char *) NULL);
    od.since = meter_time_from_num(due);

    if (w->cb(w->data, &od) != 0) {
        snprintf(res->error, sizeof(res->error),
                 "chargebee: the sync stopped");
        return -1;
    }

    return 0;
}


/* invoices with status payment_due or not_paid, every page (offset) */
static int
meter_chargebee_overdue(meter_provider_t *p, meter_overdue_pt cb_fn,
    void *data, meter_send_result_t *res)
{
    int                    rc;
    void                  *ctx[2];
    meter_buf_t            url;
    meter_list_t           l;
    meter_chargebee_t     *cb;
    meter_chargebee_od_t   w;

    cb = p->data;
    rc = -1;
    w.cb = cb_fn;
    w.data = data;

    memset(&url, 0, sizeof(url));
    memset(res, 0, sizeof(*res));

    /* status[in]=["payment_due","not_paid"], percent-encoded */
    if (meter_buf_printf(&url, "%s/api/v2/invoices?limit=100&"
                         "status%%5Bin%%5D=%%5B%%22payment_due%%22%%2C"
                         "%%22not_paid%%22%%5D", cb->base) != 0)
    {
        snprintf(res->error, sizeof(res->error), "chargebee: out of memory");
        goto end;
    }

    meter_chargebee_list(cb, &l, "chargebee: invoice list",
                         meter_chargebee_od_item, ctx);
    ctx[1] = &w;

    rc = meter_list_walk(&l, url.data, res) == 0 ? 0 : -1;

end:

    meter_buf_free(&url);

    return rc;
}


static int
meter_chargebee_usage_item(void *ctx, const cJSON *item,
    meter_send_result_t *res)
{
    double  x;

    (void) res;

    x = meter_json_num(item, "usage", "quantity", (char *) NULL);
    *(double *) ((void **) ctx)[1] += (x > 0) ? x : 0;

    return 0;
}


/*
 * reconcile: Chargebee's own usages of a subscription and item price dated
 * in [from, to): GET /api/v2/usages (chargebee-node types/resources/
 * Usage.d.ts ListInputParam: subscription_id, item_price_id and usage_date
 * filters, filter.d.ts Timestamp "between" [a, b], both ends included;
 * ListResponse {list: [{usage}], next_offset}); quantity is a string.
 */
static int
meter_chargebee_usage_total(meter_provider_t *p, const meter_usage_query_t *q,
    double *total, meter_send_result_t *res)
{
    int                     rc, i;
    char                    between[64], next[128];
    void                   *ctx[2];
    const char             *subs[2];
    meter_buf_t             url, qs;
    meter_list_t            l;
    meter_chargebee_t      *cb;
    meter_chargebee_sub_t  *s;

    cb = p->data;
    *total = 0;
    rc = -1;

    memset(res, 0, sizeof(*res));
    memset(&url, 0, sizeof(url));
    memset(&qs, 0, sizeof(qs));

    if (q->subscription == NULL) {
        snprintf(res->error, sizeof(res->error), "chargebee: customer %s "
                 "has no subscription", q->customer);
        res->status = METER_SEND_FATAL;
        return -1;
    }

    /* and the successor the drain sent the usage to, while it is cached
     * (usage ids are unique: nothing is counted twice) */
    subs[0] = q->subscription;
    subs[1] = NULL;

    s = meter_chargebee_cached(cb, q->subscription);
    if (s != NULL && s->next[0] != '\0') {
        snprintf(next, sizeof(next), "%s", s->next);
        subs[1] = next;
    }

    snprintf(between, sizeof(between), "[%lld,%lld]", (long long) q->from,
             (long long) q->to - 1);

    for (i = 0; i < 2 && subs[i] != NULL; i++) {
        meter_buf_reset(&url);
        meter_buf_reset(&qs);

        if (meter_form_add(&qs, cb->http.curl, "subscription_id[is]",
                           subs[i]) != 0
            || meter_form_add(&qs, cb->http.curl, "item_price_id[is]",
                              q->provider_meter) != 0
            || meter_form_add(&qs, cb->http.curl, "usage_date[between]",
                              between) != 0
            || meter_buf_printf(&url, "%s/api/v2/usages?limit=100&%s",
                                cb->base, qs.data) != 0)
        {
            snprintf(res->error, sizeof(res->error),
                     "chargebee: out of memory");
            res->status = METER_SEND_RETRY;
            rc = -1;
            goto end;
        }

        meter_chargebee_list(cb, &l, "chargebee: usage list",
                             meter_chargebee_usage_item, ctx);
        ctx[1] = total;

        rc = meter_list_walk(&l, url.data, res) == 0 ? 0 : -1;
        if (rc != 0) {
            goto end;
        }
    }

end:

    meter_buf_free(&url);
    meter_buf_free(&qs);

    return rc;
}


/*
 * Chargebee authenticates webhooks with Basic auth only: the whole
 * Authorization header is compared in constant time with the configured
 * user and password.
 */
static void
meter_chargebee_webhook(meter_provider_t *p, const meter_webhook_req_t *req,
    meter_webhook_event_t *ev)
{
    double              t, dues;
    cJSON              *json;
    const char         *h, *id, *type, *cus, *sub;
    const cJSON        *c;
    meter_chargebee_t  *cb;

    cb = p->data;
    json = NULL;

    memset(ev, 0, sizeof(*ev));

    if (cb->webhook_auth[0] == '\0') {
        meter_webhook_invalid(ev, 401, "chargebee.webhook_user and "
                              "chargebee.webhook_password_file are not set");
        return;
    }

    h = req->header(req->data, "Authorization");
    if (h == NULL
        || !meter_secure_equal(h, strlen(h), cb->webhook_auth,
                               strlen(cb->webhook_auth)))
    {
        meter_webhook_invalid(ev, 401, "wrong or missing Basic auth");
        return;
    }

    json = cJSON_ParseWithLength(req->body, req->body_len);
    if (json == NULL) {
        meter_webhook_invalid(ev, 400, "the body is not JSON");
        goto end;
    }

    id = meter_json_str(json, "id", (char *) NULL);
    type = meter_json_str(json, "event_type", (char *) NULL);
    t = meter_json_num(json, "occurred_at", (char *) NULL);
    c = cJSON_GetObjectItemCaseSensitive(json, "content");

    if (id == NULL || type == NULL || t < 0 || !cJSON_IsObject(c)
        || meter_copy(ev->event_id, sizeof(ev->event_id), id) != 0)
    {
        meter_webhook_invalid(ev, 400, "not a Chargebee event (id, "
                              "event_type, occurred_at, content)");
        goto end;
    }

    ev->event_time = meter_time_from_num(t);
    ev->kind = METER_WEBHOOK_IGNORE;

    /* the subscription still owing invoices stays delinquent */
    dues = meter_json_num(c, "subscription", "due_invoices_count",
                          (char *) NULL);

    if (strcmp(type, "payment_failed") == 0) {
        ev->kind = METER_WEBHOOK_DELINQUENT;

    } else if (strcmp(type, "payment_succeeded") == 0) {
        ev->kind = dues > 0 ? METER_WEBHOOK_DELINQUENT : METER_WEBHOOK_PAID;

    } else if (strcmp(type, "subscription_cancelled") == 0) {
        /* cancelling settles nothing; only dues still owed matter */
        ev->kind = dues > 0 ? METER_WEBHOOK_DELINQUENT : METER_WEBHOOK_IGNORE;
    }

    cus = meter_json_str(c, "customer", "id", (char *) NULL);
    if (cus == NULL) {
        cus = meter_json_str(c, "invoice", "customer_id", (char *) NULL);
    }

    if (cus == NULL) {
        cus = meter_json_str(c, "transaction", "customer_id", (char *) NULL);
    }

    sub = meter_json_str(c, "subscription", "id", (char *) NULL);
    if (sub == NULL) {
        sub = meter_json_str(c, "invoice", "subscription_id", (char *) NULL);
    }

    if (sub == NULL) {
        sub = meter_json_str(c, "transaction", "subscription_id",
                             (char *) NULL);
    }

    meter_webhook_ids(ev, cus, sub);

    /* whatever the event says about the subscription, the cached copy
     * may be out of date now */
    if (sub != NULL) {
        meter_chargebee_cache_drop(cb, sub);
    }

end:

    cJSON_Delete(json);
}


static void
meter_chargebee_cleanup(meter_provider_t *p)
{
    meter_chargebee_t  *cb;

    cb = p->data;
    if (cb == NULL) {
        return;
    }

    meter_http_cleanup(&cb->http);
    if (cb->subs.keys != NULL) {
        meter_map_free(&cb->subs, free);
    }

    meter_pcache_free(&cb->cache);

    explicit_bzero(cb->api_key, sizeof(cb->api_key));
    explicit_bzero(cb->webhook_auth, sizeof(cb->webhook_auth));
    meter_plans_free(&cb->plans);
    free(cb);
    p->data = NULL;
}


void
meter_provider_chargebee(meter_provider_t *p)
{
    p->name = "chargebee";
    p->init = meter_chargebee_init;
    p->send = meter_chargebee_send;
    p->send_batch = meter_chargebee_send_batch;
    /* usage ids are unique for good: the id dedupes every resend */
    p->lookup = NULL;
    p->usage_total = meter_chargebee_usage_total;
    p->onboard = meter_chargebee_onboard;
    p->overdue = meter_chargebee_overdue;
    p->webhook = meter_chargebee_webhook;
    p->cleanup = meter_chargebee_cleanup;
    p->pass = meter_chargebee_pass;
    p->data = NULL;
}
