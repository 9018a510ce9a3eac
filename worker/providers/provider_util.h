
/*
 * Copyright (C) nginx-meter authors
 *
 * Helpers shared by the providers' onboarding, delinquency sync and
 * webhook code: plan settings copied from the config, HMAC-SHA256 and
 * constant-time comparisons, JSON field access, provider timestamps.
 */


#ifndef _METER_PROVIDER_UTIL_H_INCLUDED_
#define _METER_PROVIDER_UTIL_H_INCLUDED_


#include <stddef.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "provider.h"
#include "redis.h"


#define METER_PLAN_ITEMS    8


/* the config's "plan.*" keys, copied at init (the config may be freed
 * before the provider in meterctl) */
typedef struct {
    char                      **keys;
    char                      **values;
    size_t                      n;
} meter_plans_t;


typedef struct {
    char                        meter[33];      /* "" for the plain key */
    char                        value[128];
} meter_plan_item_t;


int meter_plans_copy(meter_plans_t *pl, const meter_conf_t *cf);
void meter_plans_free(meter_plans_t *pl);

/*
 * The items of "plan.<plan>.<kind>" (meter "") and
 * "plan.<plan>.<kind>.<METER>" (meter METER), in config order; plan NULL
 * means "default".  Returns their number (0: none), or -1 when more than
 * METER_PLAN_ITEMS or a value is too long.
 */
int meter_plan_items(const meter_plans_t *pl, const char *plan,
    const char *kind, meter_plan_item_t *items, int max);
/* one value "plan.<plan>.<key>", or NULL */
const char *meter_plan_get(const meter_plans_t *pl, const char *plan,
    const char *key);


/* lowercase hex HMAC-SHA256 of a "." b (a NULL: just b); out >= 65;
 * 0 or -1 */
int meter_hmac_hex(const char *key, size_t keylen, const char *a,
    const char *b, size_t blen, char *out);

/* constant-time equality of two strings of the same length (case-
 * insensitive for hex is not needed: both sides are lowercase) */
int meter_secure_equal(const char *a, size_t alen, const char *b,
    size_t blen);


/* a string at a path of object keys (NULL-terminated), or NULL */
const char *meter_json_str(const cJSON *json, ...);
/* the item at a path (objects, arrays, anything), or NULL */
const cJSON *meter_json_obj(const cJSON *json, ...);
/* a number or a numeric string at a path; -1 when absent */
double meter_json_num(const cJSON *json, ...);

/* RFC 3339 with optional fractional seconds and offset; -1 malformed */
time_t meter_rfc3339_parse(const char *s);

/* "-r" and 16 random hex digits (OpenSSL's CSPRNG): a fresh idempotency
 * key for a call whose saved failure a provider keeps replaying */
void meter_fresh_suffix(char *buf, size_t size);

/* the provider ids a webhook event is about (either may be NULL) */
void meter_webhook_ids(meter_webhook_event_t *ev, const char *customer,
    const char *subscription);

/*
 * One request (meter_http_request, with its bounded retries); the answer's
 * body, when it is JSON, goes into *json (also for errors: the caller may
 * read the provider's error code), the caller cJSON_Delete()s it.
 * *replayed: the answer was an idempotent replay.  An OK answer that is not
 * JSON becomes RETRY.
 */
meter_send_e meter_http_json(meter_http_t *h, const meter_http_req_t *req,
    cJSON **json, int *replayed, meter_send_result_t *res);

/* marks ev as not verified or malformed: answered with status */
void meter_webhook_invalid(meter_webhook_event_t *ev, int status,
    const char *msg);

/*
 * 1 when an earlier attempt of rec (attempts > 1) may have been made more
 * than window seconds before now: a provider whose dedupe forgets ids after
 * window would count a resend twice, so it must read its own count back or
 * dead-letter the record; 0 otherwise (first attempt, or inside the
 * window).  Without a "created" time the period's end bounds the first
 * send from below.
 */
int meter_past_window(const meter_record_t *rec, time_t now, time_t window);

/*
 * The providers' paginated lists, walked page by page:
 *   METER_LIST_AFTER   Stripe: items in "data", "has_more", the next page
 *                      is the first URL + &starting_after=<last item's id>
 *   METER_LIST_NEXT    Recurly: items in "data", "has_more", "next" is a
 *                      path or a full URL, followed only on base's origin
 *                      (the API key goes nowhere else)
 *   METER_LIST_OFFSET  Chargebee: items in "list", the first URL +
 *                      &offset=<"next_offset"> while there is one
 */
typedef enum {
    METER_LIST_AFTER = 0,
    METER_LIST_NEXT,
    METER_LIST_OFFSET
} meter_list_e;

/* GET url into *json (the caller's auth and headers) */
typedef meter_send_e (*meter_list_get_pt)(void *ctx, const char *url,
    cJSON **json, meter_send_result_t *res);
/* one item: 0 go on, > 0 stop (walk returns it), -1 stop, res filled */
typedef int (*meter_list_item_pt)(void *ctx, const cJSON *o,
    meter_send_result_t *res);

typedef struct {
    meter_list_e                style;
    const char                 *what;       /* "stripe: invoice list" */
    const char                 *base;       /* METER_LIST_NEXT */
    CURL                       *curl;       /* for escaping */
    int                         max_pages;
    meter_list_get_pt           get;
    meter_list_item_pt          item;
    void                       *ctx;
} meter_list_t;

/* every page from url (which has a query): what an item stopped it
 * with, 0 at the end, -1 with res filled (malformed answers: RETRY) */
int meter_list_walk(const meter_list_t *l, const char *url,
    meter_send_result_t *res);

/*
 * A provider's own Redis connection for its caches of provider objects
 * (never a secret), opened from the config's redis settings when first
 * needed.  A cache is an optimisation: when Redis fails, the provider asks
 * the provider instead, and tries Redis again after a minute (not once per
 * record).
 */
typedef struct {
    meter_redis_t               redis;
    char                       *host;
    char                       *unix_path;
    char                       *password_file;
    int                         port;
    int                         db;
    int64_t                     timeout_ms;
    time_t                      failed;     /* last failure; 0 none */
    const char                 *who;        /* "chargebee", for logs */
} meter_pcache_t;

/* 0, or -1 out of memory */
int meter_pcache_init(meter_pcache_t *c, const meter_conf_t *cf,
    const char *who);
/* the connection, or NULL (Redis unavailable: go without the cache) */
meter_redis_t *meter_pcache_redis(meter_pcache_t *c);
/* a command failed on it: drop the connection, wait a minute */
void meter_pcache_fail(meter_pcache_t *c);
void meter_pcache_free(meter_pcache_t *c);

/* copies s into dst (size) when it fits; 0 or -1 */
int meter_copy(char *dst, size_t size, const char *s);


#endif /* _METER_PROVIDER_UTIL_H_INCLUDED_ */
