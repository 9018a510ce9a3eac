
/*
 * Copyright (C) nginx-meter authors
 *
 * POST /register and GET /usage (portal.h).  Runs in the listener's one
 * thread, on its Redis connection: one sign-up at a time, so two sign-ups
 * of one email cannot interleave their steps.
 */


#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sysexits.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <openssl/crypto.h>

#include "log.h"
#include "meter_schema.h"
#include "portal.h"
#include "register.h"
#include "usage.h"
#include "util.h"


#define METER_PORTAL_PROBLEM    "urn:nginx-meter:problem:"
#define METER_PORTAL_DOMAINS    32


struct meter_portal_s {
    int                         register_on;
    int                         usage_on;
    char                        secret[256];    /* "": none required */
    char                       *domains[METER_PORTAL_DOMAINS];
    int                         ndomains;
    char                       *plan;
    char                        key_header[64];
    size_t                      max_body;
    time_t                      grace;
    char                        cache[48];      /* Cache-Control of /usage */
};


/* on/off of key (dflt when absent): 0/1, or -1 */
static int
meter_portal_flag(const meter_conf_t *cf, const char *key, int dflt)
{
    const char  *v;

    v = meter_conf_get(cf, key);
    if (v == NULL) {
        return dflt;
    }

    if (strcmp(v, "on") == 0) {
        return 1;
    }

    return strcmp(v, "off") == 0 ? 0 : -1;
}


static int
meter_portal_number(const meter_conf_t *cf, const char *key, long dflt,
    long min, long max, long *out)
{
    char        *end;
    long         n;
    const char  *v;

    *out = dflt;

    v = meter_conf_get(cf, key);
    if (v == NULL) {
        return 0;
    }

    n = strtol(v, &end, 10);
    if (end == v || *end != '\0' || n < min || n > max) {
        return -1;
    }

    *out = n;

    return 0;
}


/* "a.example, b.example c.example": lowercase domains */
static int
meter_portal_domains(meter_portal_t *p, const char *list)
{
    char        *c;
    size_t       n;
    const char  *s;

    s = list;

    while (*s != '\0') {
        while (*s == ',' || isspace((unsigned char) *s)) {
            s++;
        }

        n = strcspn(s, ", \t");
        if (n == 0) {
            break;
        }

        if (p->ndomains == METER_PORTAL_DOMAINS || n > 253
            || strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                         "0123456789.-") < n)
        {
            return -1;
        }

        p->domains[p->ndomains] = strndup(s, n);
        if (p->domains[p->ndomains] == NULL) {
            return -1;
        }

        for (c = p->domains[p->ndomains]; *c != '\0'; c++) {
            *c = (char) tolower((unsigned char) *c);
        }

        p->ndomains++;
        s += n;
    }

    return p->ndomains > 0 ? 0 : -1;
}


int
meter_portal_load(const meter_conf_t *cf, meter_portal_t **out, char *err,
    size_t errlen)
{
    int              reg, use;
    long             n;
    char             e[256];
    int64_t          ms;
    const char      *v;
    meter_portal_t  *p;

    *out = NULL;

    reg = meter_portal_flag(cf, "portal.register", 0);
    use = meter_portal_flag(cf, "portal.usage", 0);

    if (reg == -1 || use == -1) {
        snprintf(err, errlen, "\"portal.%s\" must be on or off",
                 reg == -1 ? "register" : "usage");
        return -1;
    }

    if (!reg && !use) {
        return 0;
    }

    p = calloc(1, sizeof(meter_portal_t));
    if (p == NULL) {
        snprintf(err, errlen, "portal: out of memory");
        return -1;
    }

    p->register_on = reg;
    p->usage_on = use;

    if (meter_portal_number(cf, "portal.max_body", METER_PORTAL_MAX_BODY, 64,
                            65536, &n)
        != 0)
    {
        snprintf(err, errlen, "\"portal.max_body\" must be 64 to 65536 "
                 "bytes");
        goto failed;
    }

    p->max_body = (size_t) n;

    if (meter_portal_number(cf, "portal.usage_max_age", 10, 0, 3600, &n)
        != 0)
    {
        snprintf(err, errlen, "\"portal.usage_max_age\" must be 0 to 3600 "
                 "seconds");
        goto failed;
    }

    snprintf(p->cache, sizeof(p->cache), "private, max-age=%ld", n);

    v = meter_conf_get(cf, "portal.grace");
    if (v != NULL) {
        if (meter_parse_duration(v, &ms) != 0 || ms < 0) {
            snprintf(err, errlen, "\"portal.grace\": \"%s\" is not a "
                     "duration (the grace= of meter_governance)", v);
            goto failed;
        }

        p->grace = (time_t) (ms / 1000);
    }

    v = meter_conf_get(cf, "portal.key_header");
    if (v == NULL) {
        v = "X-API-Key";
    }

    if (strlen(v) >= sizeof(p->key_header) || v[0] == '\0'
        || strspn(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                     "0123456789-_") != strlen(v))
    {
        snprintf(err, errlen, "\"portal.key_header\": \"%s\" is not a "
                 "header name", v);
        goto failed;
    }

    snprintf(p->key_header, sizeof(p->key_header), "%s", v);

    v = meter_conf_get(cf, "portal.plan");
    if (v != NULL && !meter_valid_text(v, 64)) {
        snprintf(err, errlen, "\"portal.plan\": invalid plan name");
        goto failed;
    }

    if (v != NULL) {
        p->plan = strdup(v);
        if (p->plan == NULL) {
            snprintf(err, errlen, "portal: out of memory");
            goto failed;
        }
    }

    v = meter_conf_get(cf, "portal.email_domains");
    if (v != NULL && meter_portal_domains(p, v) != 0) {
        snprintf(err, errlen, "\"portal.email_domains\": \"%s\" is not a "
                 "list of up to %d domains", v, METER_PORTAL_DOMAINS);
        goto failed;
    }

    if (meter_conf_get(cf, "portal.secret_file") != NULL) {
        if (meter_conf_secret(cf, "portal.secret_file", p->secret,
                              sizeof(p->secret), e, sizeof(e))
            != 0)
        {
            snprintf(err, errlen, "%s", e);
            goto failed;
        }

        if (p->secret[0] == '\0') {
            snprintf(err, errlen, "\"portal.secret_file\" is empty");
            goto failed;
        }
    }

    *out = p;

    return 0;

failed:

    meter_portal_free(p);

    return -1;
}


void
meter_portal_free(meter_portal_t *p)
{
    int  i;

    if (p == NULL) {
        return;
    }

    explicit_bzero(p->secret, sizeof(p->secret));

    for (i = 0; i < p->ndomains; i++) {
        free(p->domains[i]);
    }

    free(p->plan);
    free(p);
}


int
meter_portal_path(const char *path)
{
    return strcmp(path, "/register") == 0 || strcmp(path, "/usage") == 0;
}


size_t
meter_portal_max_body(const meter_portal_t *p)
{
    return p != NULL ? p->max_body : METER_PORTAL_MAX_BODY;
}


static const char *
meter_portal_title(int status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    default:  return "Service Unavailable";
    }
}


/* resp->body from j (deleted here) */
static void
meter_portal_json(meter_portal_resp_t *resp, int status, const char *ctype,
    cJSON *j)
{
    resp->status = status;
    resp->ctype = ctype;
    resp->body = (j != NULL) ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);

    if (resp->body == NULL) {
        /* out of memory: a fixed answer, still a problem */
        resp->status = 500;
        resp->ctype = "application/problem+json";
        resp->body = strdup("{\"type\":\"" METER_PORTAL_PROBLEM "internal\","
                            "\"title\":\"Internal Server Error\","
                            "\"status\":500}");
    }
}


/* an RFC 9457 problem: type urn:nginx-meter:problem:<kind> */
static void
meter_portal_problem(meter_portal_resp_t *resp, int status, const char *kind,
    const char *detail)
{
    char    type[96];
    cJSON  *j;

    snprintf(type, sizeof(type), METER_PORTAL_PROBLEM "%s", kind);

    j = cJSON_CreateObject();
    if (j != NULL) {
        cJSON_AddStringToObject(j, "type", type);
        cJSON_AddStringToObject(j, "title", meter_portal_title(status));
        cJSON_AddNumberToObject(j, "status", status);
        cJSON_AddStringToObject(j, "detail", detail);
    }

    if (resp->cache == NULL) {
        resp->cache = "no-store";
    }

    meter_portal_json(resp, status, "application/problem+json", j);
}


void
meter_portal_refuse(const meter_portal_t *p, int status,
    meter_portal_resp_t *resp)
{
    char  detail[128];

    memset(resp, 0, sizeof(meter_portal_resp_t));

    switch (status) {

    case 413:
        snprintf(detail, sizeof(detail), "the body is larger than %zu bytes",
                 meter_portal_max_body(p));
        meter_portal_problem(resp, 413, "body_too_large", detail);
        break;

    case 411:
        meter_portal_problem(resp, 411, "length_required", "send the body "
                             "with a Content-Length");
        break;

    case 431:
        meter_portal_problem(resp, 431, "head_too_large", "the request "
                             "headers are too large");
        break;

    default:
        meter_portal_problem(resp, 400, "malformed_request", "malformed "
                             "request");
        break;
    }
}


void
meter_portal_resp_free(meter_portal_resp_t *resp)
{
    if (resp->body != NULL) {
        /* a sign-up's answer holds the key */
        explicit_bzero(resp->body, strlen(resp->body));
        free(resp->body);
        resp->body = NULL;
    }
}


static int
meter_portal_media_json(const meter_webhook_req_t *req)
{
    size_t       n;
    const char  *ct;

    ct = req->header(req->data, "Content-Type");
    if (ct == NULL) {
        return 0;
    }

    n = sizeof("application/json") - 1;

    return strncasecmp(ct, "application/json", n) == 0
           && (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' ');
}


/* an optional string member: 0 (absent or a string), -1 another type */
static int
meter_portal_member(const cJSON *body, const char *name, const char **out)
{
    const cJSON  *v;

    *out = NULL;
    v = cJSON_GetObjectItemCaseSensitive(body, name);

    if (v == NULL || cJSON_IsNull(v)) {
        return 0;
    }

    if (!cJSON_IsString(v) || v->valuestring == NULL) {
        return -1;
    }

    *out = v->valuestring;

    return 0;
}


static int
meter_portal_domain_ok(const meter_portal_t *p, const char *email)
{
    int          i;
    const char  *at;

    if (p->ndomains == 0) {
        return 1;
    }

    at = strrchr(email, '@');
    if (at == NULL) {
        return 0;
    }

    for (i = 0; i < p->ndomains; i++) {
        if (strcasecmp(at + 1, p->domains[i]) == 0) {
            return 1;
        }
    }

    return 0;
}


static int
meter_portal_secret_ok(const meter_portal_t *p, const meter_webhook_req_t *req)
{
    size_t       n;
    const char  *got;

    if (p->secret[0] == '\0') {
        return 1;
    }

    got = req->header(req->data, "X-Portal-Secret");
    n = strlen(p->secret);

    return got != NULL && strlen(got) == n
           && CRYPTO_memcmp(got, p->secret, n) == 0;
}


static void
meter_portal_register(meter_portal_t *p, const meter_conf_t *cf,
    meter_redis_t *r, const meter_webhook_req_t *req,
    meter_portal_resp_t *resp)
{
    int               rc;
    char              name[256], detail[512];
    cJSON            *body, *j;
    const char       *email, *first, *last;
    meter_reg_in_t    in;
    meter_reg_out_t   g;

    if (!meter_portal_secret_ok(p, req)) {
        meter_portal_problem(resp, 403, "portal_secret", "sign-up needs the "
                             "right invite code (header X-Portal-Secret)");
        return;
    }

    if (!meter_portal_media_json(req)) {
        meter_portal_problem(resp, 415, "media_type", "send the sign-up as "
                             "Content-Type: application/json");
        return;
    }

    body = cJSON_ParseWithLength(req->body, req->body_len);
    if (body == NULL || !cJSON_IsObject(body)) {
        cJSON_Delete(body);
        meter_portal_problem(resp, 400, "malformed_json", "the body must be "
                             "a JSON object {\"email\", \"first_name\", "
                             "\"last_name\"}");
        return;
    }

    if (meter_portal_member(body, "email", &email) != 0
        || meter_portal_member(body, "first_name", &first) != 0
        || meter_portal_member(body, "last_name", &last) != 0)
    {
        cJSON_Delete(body);
        meter_portal_problem(resp, 422, "invalid_field", "\"email\", "
                             "\"first_name\" and \"last_name\" must be "
                             "strings");
        return;
    }

    if (email == NULL || !meter_valid_email(email)) {
        cJSON_Delete(body);
        meter_portal_problem(resp, 422, "invalid_email", "\"email\" must be "
                             "an email address (up to 254 characters)");
        return;
    }

    if (!meter_portal_domain_ok(p, email)) {
        cJSON_Delete(body);
        meter_portal_problem(resp, 403, "email_domain", "sign-up is open to "
                             "email addresses of the provider's allowed "
                             "domains only");
        return;
    }

    /* "First Last", either part optional */
    snprintf(name, sizeof(name), "%s%s%s", first ? first : "",
             first && first[0] && last && last[0] ? " " : "",
             last ? last : "");

    if ((first != NULL && strlen(first) > 100)
        || (last != NULL && strlen(last) > 100)
        || (name[0] != '\0' && !meter_valid_text(name, 200)))
    {
        cJSON_Delete(body);
        meter_portal_problem(resp, 422, "invalid_name", "\"first_name\" and "
                             "\"last_name\": up to 100 characters each, no "
                             "control characters");
        return;
    }

    memset(&in, 0, sizeof(in));
    in.email = email;
    in.name = name[0] != '\0' ? name : NULL;
    in.plan = p->plan;

    if (r->ctx == NULL) {
        cJSON_Delete(body);
        resp->retry_after = 5;
        meter_portal_problem(resp, 503, "unavailable", "sign-up is "
                             "unavailable right now; try again in a minute");
        return;
    }

    rc = meter_register(r, cf, &in, &g);
    cJSON_Delete(body);

    if (rc == EX_OK) {
        meter_log(LOG_NOTICE, "portal: customer %s registered", g.id);

        j = cJSON_CreateObject();
        if (j != NULL) {
            cJSON_AddStringToObject(j, "api_key", g.key);
            cJSON_AddStringToObject(j, "customer", g.id);
            cJSON_AddStringToObject(j, "prefix", g.prefix);
        }

        meter_reg_wipe(&g);
        resp->cache = "no-store";
        meter_portal_json(resp, 201, "application/json", j);
        return;
    }

    switch (g.kind) {

    case METER_REG_EXISTS:
        /* nothing about the key: the caller may not be its owner */
        snprintf(detail, sizeof(detail), "%s is already registered; its API "
                 "key was shown once, when it was issued, and is never shown "
                 "again.  Use that key; if it is lost, ask support to rotate "
                 "it (the lost key then stops working)", g.email);
        meter_portal_problem(resp, 409, "already_registered", detail);
        break;

    case METER_REG_CONFLICT:
        meter_log(LOG_WARNING, "portal: sign-up for customer %s refused: %s",
                  g.id, g.err);
        meter_portal_problem(resp, 409, "account_conflict", "an account for "
                             "this email exists but was not made by sign-up; "
                             "ask support for a key");
        break;

    case METER_REG_INVALID:
        meter_portal_problem(resp, 422, "invalid_field", g.err);
        break;

    case METER_REG_RETRY:
        meter_log(LOG_WARNING, "portal: sign-up for customer %s incomplete: "
                  "%s", g.id, g.err);
        resp->retry_after = 30;
        meter_portal_problem(resp, 503, "try_again", "sign-up could not "
                             "complete right now; send the same sign-up again "
                             "in a minute (nothing is created twice)");
        break;

    default:
        meter_log(LOG_ERR, "portal: sign-up for customer %s failed: %s",
                  g.id, g.err);
        meter_portal_problem(resp, 503, "signup_failed", "sign-up failed on "
                             "the provider's side; the provider's team has "
                             "the details in its log");
        break;
    }

    meter_reg_wipe(&g);
}


/* the first day of t's UTC month, and of the next one */
static void
meter_portal_month(time_t t, time_t *start, time_t *end)
{
    *start = meter_month_shift(t, 0);
    *end = meter_month_shift(t, 1);
}


static void
meter_portal_u64(cJSON *o, const char *name, uint64_t v)
{
    char  num[24];

    /* raw: 64-bit counts never become doubles */
    snprintf(num, sizeof(num), "%" PRIu64, v);
    cJSON_AddRawToObject(o, name, num);
}


static void
meter_portal_i64(cJSON *o, const char *name, int64_t v)
{
    char  num[24];

    snprintf(num, sizeof(num), "%" PRId64, v);
    cJSON_AddRawToObject(o, name, num);
}


static void
meter_portal_time(cJSON *o, const char *name, time_t t)
{
    char  buf[32];

    meter_iso8601(t, buf, sizeof(buf));
    cJSON_AddStringToObject(o, name, buf);
}


/* active, grace (until since + portal.grace) or delinquent */
static cJSON *
meter_portal_status(const meter_portal_t *p, const redisReply *cust,
    time_t now)
{
    cJSON       *st;
    time_t       since;
    const char  *v, *reason;

    st = cJSON_CreateObject();
    v = meter_reply_hget(cust, MTR_CUST_STATUS);

    if (v == NULL || strcmp(v, MTR_STATUS_DELINQUENT) != 0) {
        cJSON_AddStringToObject(st, "state", "active");
        return st;
    }

    reason = meter_reply_hget(cust, MTR_CUST_REASON);
    v = meter_reply_hget(cust, MTR_CUST_SINCE);
    since = v != NULL ? (time_t) strtoll(v, NULL, 10) : 0;

    if (p->grace > 0 && since > 0 && now < since + p->grace) {
        cJSON_AddStringToObject(st, "state", "grace");
        meter_portal_time(st, "until", since + p->grace);

    } else {
        cJSON_AddStringToObject(st, "state", "delinquent");
    }

    cJSON_AddStringToObject(st, "reason", reason ? reason : "");

    if (since > 0) {
        meter_portal_time(st, "since", since);
    }

    return st;
}


/* the customer of the caller's key: 0 with id, or a refusal made */
static int
meter_portal_caller(meter_portal_t *p, meter_redis_t *r,
    const meter_webhook_req_t *req, char *id, size_t idlen,
    meter_portal_resp_t *resp)
{
    char         kh[65], detail[128];
    size_t       n;
    redisReply  *rp;
    const char  *key, *c;

    key = req->header(req->data, p->key_header);
    n = key != NULL ? strlen(key) : 0;

    if (n == 0 || n > 512) {
        snprintf(detail, sizeof(detail), "send your API key in the %s "
                 "header", p->key_header);
        resp->auth = 1;
        meter_portal_problem(resp, 401, "missing_key", detail);
        return -1;
    }

    meter_sha256_hex(key, n, kh);

    rp = meter_redis_cmd(r, "HGETALL " MTR_KEY_FMT, kh);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(rp);
        resp->retry_after = 5;
        meter_portal_problem(resp, 503, "unavailable", "usage is unavailable "
                             "right now; try again in a minute");
        return -1;
    }

    c = meter_reply_hget(rp, "customer");

    if (rp->elements == 0 || meter_reply_hget(rp, "revoked") != NULL
        || c == NULL || !meter_valid_id(c))
    {
        freeReplyObject(rp);
        resp->auth = 1;
        meter_portal_problem(resp, 401, "unknown_key", "this API key is "
                             "unknown or revoked");
        return -1;
    }

    snprintf(id, idlen, "%s", c);
    freeReplyObject(rp);

    return 0;
}


static void
meter_portal_usage(meter_portal_t *p, const meter_conf_t *cf,
    meter_redis_t *r, const meter_webhook_req_t *req,
    meter_portal_resp_t *resp)
{
    char                 id[72], err[512], day[16];
    size_t               i, k, nrows, ncredit, nmeters;
    time_t               start, end;
    cJSON               *j, *arr, *o, *met;
    meter_usage_row_t    tot[64];
    redisReply          *cust;
    meter_usage_row_t   *rows;
    meter_credit_row_t  *credit;

    resp->vary = p->key_header;

    if (r->ctx == NULL) {
        resp->retry_after = 5;
        meter_portal_problem(resp, 503, "unavailable", "usage is unavailable "
                             "right now; try again in a minute");
        return;
    }

    if (meter_portal_caller(p, r, req, id, sizeof(id), resp) != 0) {
        return;
    }

    meter_portal_month(req->now, &start, &end);

    cust = meter_redis_cmd(r, "HGETALL " MTR_CUST_FMT, id);
    if (!meter_reply_ok(cust) || cust->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(cust);
        snprintf(err, sizeof(err), "%s", r->err);
        goto failed;
    }

    /* the numbers of "meterctl usage ID --period day --from START" */
    if (meter_usage_rows(r, id, start, end, METER_DAY,
                         cf->report_period == METER_DAY ? METER_DAY
                                                        : METER_HOUR,
                         &rows, &nrows, err, sizeof(err))
        != 0)
    {
        freeReplyObject(cust);
        goto failed;
    }

    if (meter_usage_credit(r, id, NULL, &credit, &ncredit, err, sizeof(err))
        != 0)
    {
        free(rows);
        freeReplyObject(cust);
        goto failed;
    }

    j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "customer", id);
    meter_portal_time(j, "as_of", req->now);

    o = cJSON_AddObjectToObject(j, "period");
    meter_portal_time(o, "start", start);
    meter_portal_time(o, "end", end);

    /* per meter over the period, in the order of first use: a figure
     * meter's month is its figure (max, last reading, Σ of its unique
     * periods), not a sum of days, and billed its figure record */
    nmeters = 0;

    for (i = 0; i < nrows; i++) {
        for (k = 0; k < nmeters
                    && (strcmp(tot[k].meter, rows[i].meter) != 0
                        || tot[k].kind != rows[i].kind);
             k++)
        {
            /* void */
        }

        if (k == nmeters) {
            if (nmeters == 64) {
                continue;
            }

            memset(&tot[k], 0, sizeof(tot[k]));
            memcpy(tot[k].meter, rows[i].meter, sizeof(tot[k].meter));
            tot[k].kind = rows[i].kind;
            tot[k].start = start;
            nmeters++;
        }

        meter_usage_fold(&tot[k], &rows[i]);
    }

    if (meter_usage_fig_billed(r, id, tot, nmeters, err, sizeof(err)) != 0) {
        free(rows);
        free(credit);
        freeReplyObject(cust);
        goto failed;
    }

    arr = cJSON_AddArrayToObject(j, "meters");

    for (k = 0; k < nmeters; k++) {
        met = cJSON_CreateObject();
        cJSON_AddStringToObject(met, "meter", tot[k].meter);
        cJSON_AddStringToObject(met, "figure", meter_usage_kind(tot[k].kind));
        meter_portal_u64(met, "metered", tot[k].quantity);
        meter_portal_u64(met, "billed", tot[k].billed);
        meter_portal_u64(met, "pending", tot[k].quantity > tot[k].billed
                                         ? tot[k].quantity - tot[k].billed
                                         : 0);
        cJSON_AddItemToArray(arr, met);
    }

    arr = cJSON_AddArrayToObject(j, "days");

    for (i = 0; i < nrows; i++) {
        met = cJSON_CreateObject();
        meter_iso8601(rows[i].start, day, sizeof(day));
        day[10] = '\0';
        cJSON_AddStringToObject(met, "day", day);
        cJSON_AddStringToObject(met, "meter", rows[i].meter);
        meter_portal_u64(met, "metered", rows[i].quantity);
        meter_portal_u64(met, "billed", rows[i].billed);
        meter_portal_u64(met, "pending", rows[i].quantity > rows[i].billed
                                         ? rows[i].quantity - rows[i].billed
                                         : 0);
        cJSON_AddStringToObject(met, "state", meter_usage_state(&rows[i]));
        cJSON_AddItemToArray(arr, met);
    }

    arr = cJSON_AddArrayToObject(j, "credit");

    for (i = 0; i < ncredit; i++) {
        met = cJSON_CreateObject();
        cJSON_AddStringToObject(met, "meter", credit[i].meter);
        meter_portal_i64(met, "granted", credit[i].granted);
        meter_portal_i64(met, "used", credit[i].granted - credit[i].left);
        meter_portal_i64(met, "left", credit[i].left);
        cJSON_AddItemToArray(arr, met);
    }

    cJSON_AddItemToObject(j, "status", meter_portal_status(p, cust,
                                                           req->now));

    free(rows);
    free(credit);
    freeReplyObject(cust);

    resp->cache = p->cache;
    meter_portal_json(resp, 200, "application/json", j);

    return;

failed:

    meter_log(LOG_ERR, "portal: usage of customer %s: %s", id, err);
    resp->retry_after = 5;
    meter_portal_problem(resp, 503, "unavailable", "usage is unavailable "
                         "right now; try again in a minute");
}


void
meter_portal_handle(meter_portal_t *p, const meter_conf_t *cf,
    meter_redis_t *r, const meter_webhook_req_t *req,
    meter_portal_resp_t *resp)
{
    int  reg;

    memset(resp, 0, sizeof(meter_portal_resp_t));

    reg = (strcmp(req->path, "/register") == 0);

    if (p == NULL || (reg && !p->register_on) || (!reg && !p->usage_on)) {
        meter_portal_problem(resp, 404, "not_enabled", reg
                             ? "self-serve sign-up is off (portal.register)"
                             : "the usage API is off (portal.usage)");
        return;
    }

    if (reg && strcmp(req->method, "POST") != 0) {
        resp->allow = "POST";
        meter_portal_problem(resp, 405, "method", "sign up with POST");
        return;
    }

    if (!reg && strcmp(req->method, "GET") != 0
        && strcmp(req->method, "HEAD") != 0)
    {
        resp->allow = "GET, HEAD";
        meter_portal_problem(resp, 405, "method", "read usage with GET");
        return;
    }

    if (reg) {
        meter_portal_register(p, cf, r, req, resp);

    } else {
        meter_portal_usage(p, cf, r, req, resp);
    }
}
