
/*
 * Copyright (C) nginx-meter authors
 *
 * The customer portal's two endpoints, served by the webhook listener
 * (webhook_http.c) behind nginx:
 *
 * POST /register (portal.register = on; off by default): JSON
 * {"email", "first_name", "last_name"} runs meter_register(), the flow of
 * "meterctl register", and answers 201 {"api_key", "customer"} once; a
 * second sign-up of the same email answers 409 and never shows the key
 * again.  Optional: portal.secret_file (the X-Portal-Secret header must
 * match), portal.email_domains (the only domains accepted), portal.plan,
 * portal.max_body (default 4096 bytes).
 *
 * GET /usage (portal.usage = on): the caller's own key in portal.key_header
 * (default X-API-Key, the header of meter_zone's key); only its hash is
 * looked up.  This billing period (the UTC calendar month) per meter and
 * per day, as meter_usage_rows() gives "meterctl usage", prepaid credit
 * left, and the status (active, grace until since + portal.grace, or
 * delinquent with the reason).  401 for a key unknown or revoked.
 *
 * Every refusal is an RFC 9457 application/problem+json body.  Neither the
 * key nor the secret is logged.
 */


#ifndef _METER_PORTAL_H_INCLUDED_
#define _METER_PORTAL_H_INCLUDED_


#include <stddef.h>
#include <time.h>

#include "config.h"
#include "provider.h"
#include "redis.h"


#define METER_PORTAL_MAX_BODY       4096


typedef struct meter_portal_s  meter_portal_t;


/* an answer: body malloc'ed (meter_portal_resp_free) */
typedef struct {
    int                         status;
    const char                 *ctype;
    char                       *body;
    const char                 *cache;      /* Cache-Control */
    const char                 *allow;      /* 405 */
    const char                 *vary;
    int                         auth;       /* 401: WWW-Authenticate */
    int                         retry_after;
} meter_portal_resp_t;


/* the portal.* settings: 0 with *p (NULL when both endpoints are off), or
 * -1 with err */
int meter_portal_load(const meter_conf_t *cf, meter_portal_t **p, char *err,
    size_t errlen);
void meter_portal_free(meter_portal_t *p);

/* 1 when path is one of the portal's (served or refused by it) */
int meter_portal_path(const char *path);

/* the largest body taken for path */
size_t meter_portal_max_body(const meter_portal_t *p);

/* a refusal found in the request head (413, 411, 431, 400) */
void meter_portal_refuse(const meter_portal_t *p, int status,
    meter_portal_resp_t *resp);

/* one complete request to a portal path; r connected when it could be */
void meter_portal_handle(meter_portal_t *p, const meter_conf_t *cf,
    meter_redis_t *r, const meter_webhook_req_t *req,
    meter_portal_resp_t *resp);

void meter_portal_resp_free(meter_portal_resp_t *resp);


#endif /* _METER_PORTAL_H_INCLUDED_ */
