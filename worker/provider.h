
/*
 * Copyright (C) nginx-meter authors
 *
 * The interface between meter-worker's drain loop and the billing
 * providers.  One file per provider (provider_file.c, provider_stripe.c,
 * provider_chargebee.c, provider_recurly.c, provider_http.c), all sharing the
 * HTTP/retry core in http.c.
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

    /* for providers without a dedupe window that covers the resend (Recurly):
     * 1 the provider already has this record, 0 it has not, -1 unknown;
     * NULL when the provider's own idempotency handles resends */
    int                       (*lookup)(meter_provider_t *p,
                                        const meter_record_t *rec,
                                        meter_send_result_t *res);

    void                      (*cleanup)(meter_provider_t *p);

    void                       *data;   /* provider's own state */
};


/* providers; each fills *p (name and functions) */
void meter_provider_file(meter_provider_t *p);
void meter_provider_stripe(meter_provider_t *p);
void meter_provider_chargebee(meter_provider_t *p);
void meter_provider_recurly(meter_provider_t *p);
void meter_provider_http(meter_provider_t *p);

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
