
/*
 * Copyright (C) nginx-meter authors
 *
 * The webhook listener of meter-worker: a small HTTP/1.1 server in its own
 * thread, with its own Redis connection and its own instance of the
 * configured provider, on "webhook.listen" (host:port or unix:/path),
 * meant to sit behind nginx (proxy_pass).  One poll() loop; one request
 * per connection (answered with Connection: close); Content-Length bodies
 * only, at most 1 MB (413 beyond); the whole request must arrive within
 * "webhook.timeout" (default 10s, 408 otherwise).
 *
 * POST /webhooks/<provider>: the provider verifies and parses the delivery
 * (provider->webhook).  A change is answered 2xx only once it is stored:
 * Redis down gives 503 and the provider delivers again.  Deliveries are
 * deduplicated by event id (mtr:wh:<provider>:<event id>, 30 days, set
 * after the change is applied; applying again is harmless because
 * meter_gov_set_status orders changes by event time).  The body and the
 * secrets are never logged.
 */


#ifndef _METER_WEBHOOK_H_INCLUDED_
#define _METER_WEBHOOK_H_INCLUDED_


#include <stddef.h>
#include <time.h>

#include "config.h"
#include "provider.h"
#include "redis.h"


#define METER_WEBHOOK_MAX_BODY      (1024 * 1024)
#define METER_WEBHOOK_MAX_HEAD      16384
#define METER_WEBHOOK_MAX_HEADERS   64


typedef struct {
    char                       *method;
    char                       *path;           /* without the query */
    int                         minor;          /* HTTP/1.x */
    size_t                      head_len;       /* up to the blank line */
    long long                   content_length; /* -1: none */
    int                         chunked;
    int                         nheaders;
    char                       *names[METER_WEBHOOK_MAX_HEADERS];
    char                       *values[METER_WEBHOOK_MAX_HEADERS];
} meter_http_head_t;


/*
 * Parses a request head in buf (in place: it is NUL-split).  Returns the
 * head's length once the blank line is there, 0 when more is needed, -1
 * malformed (400), -2 too large (431).
 */
long meter_webhook_parse_head(char *buf, size_t len, meter_http_head_t *h);

/* a header value, case-insensitive name; NULL when absent */
const char *meter_webhook_header(void *head, const char *name);

/*
 * Handles one complete request for provider p: the HTTP status to answer,
 * with a short JSON body in out.  r is the listener's Redis connection
 * (connected by the caller when it could).
 */
int meter_webhook_handle(meter_provider_t *p, meter_redis_t *r,
    meter_http_head_t *h, const char *body, size_t len, time_t now,
    char *out, size_t outlen);


typedef struct meter_webhook_srv_s  meter_webhook_srv_t;

/*
 * Starts the listener when "webhook.listen" is set: 0 with *srv (NULL when
 * not configured), or -1 with err (cannot listen, provider without
 * webhooks).  cf must outlive the listener (stop it before freeing cf).
 */
int meter_webhook_start(const meter_conf_t *cf, meter_webhook_srv_t **srv,
    char *err, size_t errlen);
void meter_webhook_stop(meter_webhook_srv_t *srv);

/* meter-worker -t: with "webhook.listen" set, its address, webhook.timeout,
 * and the provider's webhook secret must be usable; 0, or -1 with err */
int meter_webhook_check(const meter_conf_t *cf, char *err, size_t errlen);


#endif /* _METER_WEBHOOK_H_INCLUDED_ */
