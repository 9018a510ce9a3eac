
/*
 * Copyright (C) nginx-meter authors
 *
 * The interface between meter-worker's drain loop and the billing
 * providers.  One file per provider in providers/ (file.c, stripe.c,
 * chargebee.c, recurly.c, http.c, metronome.c), all sharing the
 * HTTP/retry core in lib/http.c.
 *
 * The drain loop owns scheduling: which record is due, its idempotency key,
 * its state in Redis, dead letters, and when to try a record again.  A
 * provider owns one attempt to deliver one record: encoding, auth, headers,
 * a short bounded retry inside the call (http.c), and the classification of
 * the answer.
 */


#ifndef _METER_PROVIDER_H_INCLUDED_
#define _METER_PROVIDER_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>


typedef struct meter_conf_s  meter_conf_t;     /* config.h */


typedef struct {
    /* deterministic, <= 64 chars of [a-z0-9_-]: the same record always
     * gets the same key, before its first send and after any crash */
    const char                 *idempotency_key;
    const char                 *key_hash;       /* 64 hex chars */
    const char                 *customer;       /* our customer id or NULL */
    const char                 *provider_customer;  /* cus_..., or NULL */
    const char                 *subscription;   /* provider's, or NULL */
    const char                 *subscription_item;  /* stripe legacy */
    const char                 *meter;          /* our meter name */
    const char                 *provider_meter; /* event name, item price,
                                                 * add-on code (config) */
    time_t                      period_start;   /* UTC, inclusive */
    time_t                      period_end;     /* UTC, exclusive */
    uint64_t                    quantity;       /* > 0 */
    time_t                      created;        /* stored, just before its
                                                 * first send (Redis
                                                 * "created"); 0 unknown */
    unsigned long               seq;            /* 1: the first record of
                                                 * its (period, subject,
                                                 * meter); 0 unknown */
    long                        attempts;       /* this one included: > 1,
                                                 * an earlier send's outcome
                                                 * may be unknown */
    time_t                      usage_start;    /* the first hour it covers
                                                 * (start); 0 unknown */
    time_t                      usage_end;      /* the last hour it covers
                                                 * (end, exclusive) */
    int                         figure;         /* a month's figure
                                                 * (figures.c): usage_end
                                                 * - 1 is its event time;
                                                 * absolute providers get
                                                 * F (may be 0), others
                                                 * the increase */
} meter_record_t;


typedef enum {
    METER_SEND_OK = 0,      /* accepted now, or the provider already had it */
    METER_SEND_RETRY,       /* transient: 5xx, 429, timeout, network error */
    METER_SEND_FATAL        /* rejected; retrying the same cannot help */
} meter_send_e;


typedef struct {
    meter_send_e                status;
    long                        http_status;    /* 0: no HTTP answer */
    double                      retry_after;    /* s; 0 when not given */
    char                        error[512];     /* for logs and dead
                                                 * letters; no secrets */
} meter_send_result_t;


/* registering a customer (meterctl register) */
typedef struct {
    const char                 *customer;   /* our id; seeds idempotency keys */
    const char                 *email;
    const char                 *name;       /* may be NULL */
    const char                 *plan;       /* plan name from the config */
} meter_onboard_t;

typedef struct {
    char                        provider_customer[128];
    char                        subscription[128];
    /* Stripe: subscription item per meter, for usage_records mode */
    char                        item_meter[8][33];
    char                        item_id[8][128];
    int                         nitems;
} meter_onboard_result_t;


/* one customer the provider says is overdue (delinquency sync) */
typedef struct {
    const char                 *provider_customer;  /* or NULL */
    const char                 *subscription;       /* or NULL */
    time_t                      since;  /* when it became overdue; 0 unknown */
} meter_overdue_t;

typedef int (*meter_overdue_pt)(void *data, const meter_overdue_t *o);


/* a webhook request as received, and what it means */
typedef struct {
    const char                 *method;
    const char                 *path;
    const char                 *body;
    size_t                      body_len;
    /* header lookup, case-insensitive; NULL when absent */
    const char               *(*header)(void *data, const char *name);
    void                       *data;
    time_t                      now;
} meter_webhook_req_t;

typedef enum {
    METER_WEBHOOK_IGNORE = 0,   /* verified, but says nothing we track */
    METER_WEBHOOK_DELINQUENT,   /* the customer has an overdue invoice */
    METER_WEBHOOK_PAID,         /* nothing overdue any more */
    METER_WEBHOOK_INVALID       /* not verified or malformed: 400/401 */
} meter_webhook_e;

typedef struct {
    meter_webhook_e             kind;
    char                        event_id[128];  /* dedupe */
    time_t                      event_time;     /* ordering */
    char                        provider_customer[128];
    char                        subscription[128];
    int                         http_status;    /* for INVALID: 400 or 401 */
    char                        error[256];
} meter_webhook_event_t;


/* meterctl reconcile: one customer and meter over [from, to) */
typedef struct {
    const char                 *customer;           /* ours */
    const char                 *provider_customer;  /* cus_..., or NULL */
    const char                 *subscription;       /* or NULL */
    const char                 *meter;              /* ours */
    const char                 *provider_meter;     /* config meter.M */
    time_t                      from;               /* UTC, hour aligned */
    time_t                      to;                 /* exclusive */
} meter_usage_query_t;


typedef struct meter_provider_s  meter_provider_t;

struct meter_provider_s {
    const char                 *name;   /* "file", "stripe", ... */

    /* reads its settings ("stripe.base_url", ...) and secrets; 0 or -1 with
     * a message naming the config key in err */
    int                       (*init)(meter_provider_t *p,
                                      const meter_conf_t *cf,
                                      char *err, size_t errlen);

    /* one delivery attempt (with http.c's bounded retries inside) */
    meter_send_e              (*send)(meter_provider_t *p,
                                      const meter_record_t *rec,
                                      meter_send_result_t *res);

    /* optional: one delivery attempt of n new records together (n <=
     * batch_max, a chunk of the drain); res[i] answers recs[i]; NULL:
     * send() each */
    void                      (*send_batch)(meter_provider_t *p,
                                            const meter_record_t *recs,
                                            size_t n,
                                            meter_send_result_t *res);

    /* for providers without a dedupe window that covers the resend (Recurly):
     * 1 the provider already has this record, 0 it has not, -1 unknown
     * (retried later), -2 unknown for good (dead-lettered with
     * res->error, for a human to check); NULL when the provider's own
     * idempotency handles resends */
    int                       (*lookup)(meter_provider_t *p,
                                        const meter_record_t *rec,
                                        meter_send_result_t *res);

    /* creates the customer, then its subscription, with idempotency keys
     * derived from in->customer, so that a retry after a failure part-way
     * completes the same objects; NULL for "file" (local record only) */
    meter_send_e              (*onboard)(meter_provider_t *p,
                                         const meter_onboard_t *in,
                                         meter_onboard_result_t *out,
                                         meter_send_result_t *res);

    /* delinquency sync: calls cb for every customer the provider lists as
     * overdue now (all pages); 0, or -1 with res filled; NULL: no sync */
    int                       (*overdue)(meter_provider_t *p,
                                         meter_overdue_pt cb, void *data,
                                         meter_send_result_t *res);

    /* verifies and parses one webhook delivery; NULL: no webhooks */
    void                      (*webhook)(meter_provider_t *p,
                                         const meter_webhook_req_t *req,
                                         meter_webhook_event_t *ev);

    /* reconcile: the total the provider itself holds for q (every page
     * of its own list or query); 0 with *total, or -1 with res filled
     * (RETRY: unreachable or rate limited, FATAL: refused); NULL: the
     * provider cannot be asked */
    int                       (*usage_total)(meter_provider_t *p,
                                             const meter_usage_query_t *q,
                                             double *total,
                                             meter_send_result_t *res);

    void                      (*cleanup)(meter_provider_t *p);

    /* optional: a drain pass begins (per-pass caches are dropped) */
    void                      (*pass)(meter_provider_t *p);

    /* records per send_batch call (0: 100), set by init: enough for the
     * requests it keeps in flight */
    size_t                      batch_max;

    /* 1: figures (unique counts, gauges) are sent as the month-to-date
     * value itself (Stripe, its meter aggregating with "last"); 0: as
     * the increase over what was billed */
    int                         absolute;

    void                       *data;   /* provider's own state */
};


/* providers; each fills *p (name and functions) */
void meter_provider_file(meter_provider_t *p);
void meter_provider_stripe(meter_provider_t *p);
void meter_provider_chargebee(meter_provider_t *p);
void meter_provider_recurly(meter_provider_t *p);
void meter_provider_http(meter_provider_t *p);
void meter_provider_metronome(meter_provider_t *p);

/* by config name; -1 when unknown */
int meter_provider_by_name(const char *name, meter_provider_t *p);


/*
 * Config access used by providers (implemented in config.c).
 *
 * meter_conf_get: the value of "key" ("stripe.base_url"), or NULL when unset.
 *
 * meter_conf_secret: a secret named by the config key "key" (for example
 * "stripe.api_key_file"): the value is a file name, absolute or relative to
 * $CREDENTIALS_DIRECTORY when that is set; the file's content with the
 * trailing newline removed goes into buf.  0, or -1 with err naming the
 * key and the file (never the secret).
 */
const char *meter_conf_get(const meter_conf_t *cf, const char *key);
int meter_conf_secret(const meter_conf_t *cf, const char *key, char *buf,
    size_t size, char *err, size_t errlen);


#endif /* _METER_PROVIDER_H_INCLUDED_ */
