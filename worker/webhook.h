
/*
 * Copyright (C) nginx-meter authors
 *
 * Provider webhooks in meter-worker, in two parts:
 *
 * webhook_http.c, the listener: libmicrohttpd in its own thread, with its
 * own Redis connection and its own instance of the configured provider,
 * on "webhook.listen" (host:port or unix:/path), meant to sit behind nginx
 * (proxy_pass).  One request per connection (Connection: close);
 * Content-Length bodies only (411 for Transfer-Encoding), at most 1 MB
 * (exactly 1 MB is served, 413 beyond), request heads up to 16 KB (431
 * beyond); a connection idle for "webhook.timeout" (default 10s, whole
 * seconds, rounded up) is closed without an answer.
 *
 * webhook.c, the logic: POST /webhooks/<provider>: the provider verifies
 * and parses the delivery (provider->webhook).  A change is answered 2xx
 * only once it is stored: Redis down gives 503 and the provider delivers
 * again.  Deliveries are deduplicated by event id (mtr:wh:<provider>:<event
 * id>, 30 days, set after the change is applied; applying again is
 * harmless because meter_gov_set_status orders changes by event time).  An
 * event time more than METER_WEBHOOK_SKEW_S ahead of the clock is replaced
 * by the time of receipt, so no signed body can date itself past every
 * later event.  The body and the secrets are never logged.
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
/* a provider's clock may run this far ahead of ours (Stripe's signature
 * tolerance is 300 s too) */
#define METER_WEBHOOK_SKEW_S        300


/*
 * Handles one complete request (req->method, path without the query, body,
 * header lookup, now) for provider p: the HTTP status to answer, with a
 * short JSON body in out.  r is the listener's Redis connection (connected
 * by the caller when it could).
 */
int meter_webhook_handle(meter_provider_t *p, meter_redis_t *r,
    const meter_webhook_req_t *req, char *out, size_t outlen);


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
