
/*
 * Copyright (C) nginx-meter authors
 *
 * Generic HTTP ingest: one JSON POST per record to http.url, in the shape
 * of OpenMeter (http.format = openmeter, the default) or Lago
 * (http.format = lago).  Bearer auth from http.auth_file when set.
 *
 * OpenMeter: a CloudEvent, application/cloudevents+json; id = the record's
 * idempotency key and source = http.source; answers 204.  OpenMeter dedupes
 * on (id, source) only when dedupe is enabled, for a TTL (openmeterio/
 * openmeter app/config/dedupe.go: dedupe.enabled defaults to false;
 * app/config/sink.go: expiration 24h): http.dedupe_window (default 24h,
 * "0" = the server does not dedupe).  A
 * record whose earlier attempt may have reached OpenMeter and is older
 * than that window is not resent blindly: it is dead-lettered with that
 * reason for a human to check OpenMeter's own count.
 *
 * Lago: {"event":{"transaction_id",...}}; a resent transaction_id answers
 * 422 with error_details.transaction_id ["value_already_exist"] on the
 * older Postgres pipeline (the event was accepted before: success); the
 * ClickHouse pipeline answers 200 and overwrites the event of the same
 * (transaction_id, timestamp), so timestamp stays fixed per record.
 * external_subscription_id is required (getlago/lago-openapi,
 * src/schemas/EventInputObject.yaml): without a subscription the event attaches
 * to nothing, so a customer without one is an error, never a fallback to
 * its id or key hash.
 *
 * Both carry the hour as its start (RFC 3339 for OpenMeter, Unix seconds
 * for Lago).
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "http.h"
#include "provider.h"
#include "provider_util.h"
#include "util.h"


typedef enum {
    METER_INGEST_OPENMETER = 0,
    METER_INGEST_LAGO
} meter_ingest_format_e;


typedef struct {
    meter_http_t                http;
    meter_ingest_format_e       format;
    char                        url[512];
    char                        source[128];
    char                        token[512];     /* "" when no auth */
    time_t                      dedupe_window;  /* OpenMeter's, s */
    char                        query[512];     /* OpenMeter's API base */
} meter_ingest_t;


static int meter_ingest_init(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen);
static meter_send_e meter_ingest_send(meter_provider_t *p,
    const meter_record_t *rec, meter_send_result_t *res);
static int meter_ingest_lago_duplicate(const meter_http_resp_t *resp);
static void meter_ingest_cleanup(meter_provider_t *p);
static int meter_ingest_query_setup(meter_provider_t *p,
    const meter_conf_t *cf, char *err, size_t errlen);


static int
meter_ingest_setup(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    int64_t          ms;
    const char      *v;
    meter_ingest_t  *in;

    in = calloc(1, sizeof(meter_ingest_t));
    if (in == NULL) {
        snprintf(err, errlen, "http: out of memory");
        return -1;
    }

    p->data = in;

    v = meter_conf_get(cf, "http.url");
    if (v == NULL || v[0] == '\0' || strlen(v) >= sizeof(in->url)) {
        snprintf(err, errlen, "http.url: required (the ingest endpoint, "
                 "e.g. https://openmeter.cloud/api/v1/events)");
        return -1;
    }

    memcpy(in->url, v, strlen(v) + 1);

    v = meter_conf_get(cf, "http.format");
    if (v == NULL || strcmp(v, "openmeter") == 0) {
        in->format = METER_INGEST_OPENMETER;

    } else if (strcmp(v, "lago") == 0) {
        in->format = METER_INGEST_LAGO;

    } else {
        snprintf(err, errlen, "http.format: \"%s\" is not openmeter or lago",
                 v);
        return -1;
    }

    v = meter_conf_get(cf, "http.source");
    if (v == NULL) {
        v = "nginx-meter";
    }

    if (v[0] == '\0' || strlen(v) >= sizeof(in->source)) {
        snprintf(err, errlen, "http.source: empty or too long");
        return -1;
    }

    memcpy(in->source, v, strlen(v) + 1);

    in->dedupe_window = 86400;
    v = meter_conf_get(cf, "http.dedupe_window");
    if (v != NULL) {
        if (meter_parse_duration(v, &ms) != 0) {
            snprintf(err, errlen, "http.dedupe_window: \"%s\" is not a "
                     "duration (24h; 0 when the server does not dedupe)", v);
            return -1;
        }

        in->dedupe_window = (time_t) (ms / 1000);
    }

    if (meter_conf_get(cf, "http.auth_file") != NULL
        && meter_conf_secret(cf, "http.auth_file", in->token,
                             sizeof(in->token), err, errlen) != 0)
    {
        return -1;
    }

    if (meter_http_init(&in->http, "http", cf, 0, err, errlen) != 0) {
        return -1;
    }

    /* without dedupe, a timeout or a 5xx may hide a counted event: no
     * resend inside the call; the drain loop's next attempt dead-letters */
    if (in->format == METER_INGEST_OPENMETER && in->dedupe_window == 0) {
        in->http.resend_unknown = 0;
    }

    return 0;
}


static int
meter_ingest_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    if (meter_ingest_setup(p, cf, err, errlen) != 0
        || meter_ingest_query_setup(p, cf, err, errlen) != 0)
    {
        meter_ingest_cleanup(p);
        return -1;
    }

    return 0;
}


static cJSON *
meter_ingest_openmeter(const meter_ingest_t *in, const meter_record_t *rec)
{
    char    ts[32];
    cJSON  *ev, *data;

    ev = cJSON_CreateObject();
    data = cJSON_AddObjectToObject(ev, "data");

    meter_rfc3339(rec->period_start, ts, sizeof(ts));

    if (data == NULL
        || cJSON_AddStringToObject(ev, "specversion", "1.0") == NULL
        || cJSON_AddStringToObject(ev, "id", rec->idempotency_key) == NULL
        || cJSON_AddStringToObject(ev, "source", in->source) == NULL
        || cJSON_AddStringToObject(ev, "type",
                                   rec->provider_meter != NULL
                                   ? rec->provider_meter : rec->meter)
           == NULL
        || cJSON_AddStringToObject(ev, "subject",
                                   rec->customer != NULL
                                   ? rec->customer : rec->key_hash) == NULL
        || cJSON_AddStringToObject(ev, "time", ts) == NULL
        || cJSON_AddNumberToObject(data, "value", (double) rec->quantity)
           == NULL
        || cJSON_AddStringToObject(data, "key_hash", rec->key_hash) == NULL
        || cJSON_AddStringToObject(data, "meter", rec->meter) == NULL)
    {
        cJSON_Delete(ev);
        return NULL;
    }

    return ev;
}


static cJSON *
meter_ingest_lago(const meter_record_t *rec)
{
    cJSON       *root, *ev, *props;
    const char  *sub;

    root = cJSON_CreateObject();
    ev = cJSON_AddObjectToObject(root, "event");
    props = cJSON_AddObjectToObject(ev, "properties");

    sub = rec->subscription;

    if (props == NULL
        || cJSON_AddStringToObject(ev, "transaction_id",
                                   rec->idempotency_key) == NULL
        || cJSON_AddStringToObject(ev, "external_subscription_id", sub)
           == NULL
        || cJSON_AddStringToObject(ev, "code",
                                   rec->provider_meter != NULL
                                   ? rec->provider_meter : rec->meter)
           == NULL
        || cJSON_AddNumberToObject(ev, "timestamp",
                                   (double) rec->period_start) == NULL
        || cJSON_AddNumberToObject(props, "value", (double) rec->quantity)
           == NULL)
    {
        cJSON_Delete(root);
        return NULL;
    }

    return root;
}


/* 422 {"error_details":{"transaction_id":["value_already_exist"]}} */
static int
meter_ingest_lago_duplicate(const meter_http_resp_t *resp)
{
    int           dup;
    cJSON        *json;
    const cJSON  *det, *tid, *v;

    if (resp->status != 422 || resp->body.data == NULL) {
        return 0;
    }

    dup = 0;

    json = cJSON_ParseWithLength(resp->body.data, resp->body.len);
    det = cJSON_GetObjectItemCaseSensitive(json, "error_details");
    tid = cJSON_GetObjectItemCaseSensitive(det, "transaction_id");

    cJSON_ArrayForEach(v, tid) {
        if (cJSON_IsString(v)
            && strcmp(v->valuestring, "value_already_exist") == 0)
        {
            dup = 1;
        }
    }

    cJSON_Delete(json);

    return dup;
}


static meter_send_e
meter_ingest_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    char               *js;
    cJSON              *json;
    meter_send_e        rc;
    meter_ingest_t     *in;
    meter_http_req_t    req;
    meter_http_resp_t   resp;

    in = p->data;
    js = NULL;

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    memset(res, 0, sizeof(*res));

    if (rec->quantity > (1ULL << 53)) {
        snprintf(res->error, sizeof(res->error), "http: quantity %llu too "
                 "large for a JSON number",
                 (unsigned long long) rec->quantity);
        res->status = METER_SEND_FATAL;
        return METER_SEND_FATAL;
    }

    if (in->format == METER_INGEST_LAGO && rec->subscription == NULL) {
        snprintf(res->error, sizeof(res->error), "lago: customer \"%s\" "
                 "has no subscription; Lago requires "
                 "external_subscription_id (meterctl customers add %s "
                 "--subscription ID, then meterctl retry)",
                 rec->customer != NULL ? rec->customer : "-",
                 rec->customer != NULL ? rec->customer : "CUSTOMER");
        res->status = METER_SEND_FATAL;
        return METER_SEND_FATAL;
    }

    if (in->format == METER_INGEST_OPENMETER
        && meter_past_window(rec, time(NULL), in->dedupe_window))
    {
        snprintf(res->error, sizeof(res->error), "openmeter: an earlier "
                 "send (%llds ago) may have been counted and OpenMeter's "
                 "dedupe window (%llds, http.dedupe_window) has passed: not "
                 "resent blindly; check OpenMeter's count for event id %s",
                 (long long) (time(NULL) - (rec->created > 0 ? rec->created
                                             : rec->period_end)),
                 (long long) in->dedupe_window, rec->idempotency_key);
        res->status = METER_SEND_FATAL;
        return METER_SEND_FATAL;
    }

    json = in->format == METER_INGEST_OPENMETER
           ? meter_ingest_openmeter(in, rec) : meter_ingest_lago(rec);

    if (json != NULL) {
        js = cJSON_PrintUnformatted(json);
    }

    if (js == NULL) {
        snprintf(res->error, sizeof(res->error), "http: out of memory");
        res->status = METER_SEND_RETRY;
        rc = METER_SEND_RETRY;
        goto end;
    }

    req.method = "POST";
    req.url = in->url;
    req.content_type = in->format == METER_INGEST_OPENMETER
                       ? "application/cloudevents+json"
                       : "application/json";
    req.accept = "application/json";
    req.body = js;
    req.body_len = strlen(js);

    if (in->token[0] != '\0') {
        req.auth = METER_HTTP_AUTH_BEARER;
        req.secret = in->token;
    }

    rc = meter_http_request(&in->http, &req, &resp, res);

    if (rc == METER_SEND_FATAL && in->format == METER_INGEST_LAGO
        && meter_ingest_lago_duplicate(&resp))
    {
        res->status = METER_SEND_OK;
        res->error[0] = '\0';
        rc = METER_SEND_OK;
    }

end:

    cJSON_free(js);
    cJSON_Delete(json);
    meter_buf_free(&resp.body);

    return rc;
}


/*
 * reconcile: OpenMeter's API base for queries, "http.query_url", else
 * http.url without its "/api/v1/events"; Lago has nothing to ask.
 */
static int
meter_ingest_query_setup(meter_provider_t *p, const meter_conf_t *cf,
    char *err, size_t errlen)
{
    size_t           n;
    const char      *v;
    meter_ingest_t  *in;

    in = p->data;

    if (in->format != METER_INGEST_OPENMETER) {
        p->usage_total = NULL;
        return 0;
    }

    v = meter_conf_get(cf, "http.query_url");
    if (v != NULL) {
        if (meter_copy(in->query, sizeof(in->query), v) != 0) {
            snprintf(err, errlen, "http.query_url: too long");
            return -1;
        }

    } else {
        n = strlen(in->url);
        if (n >= sizeof("/api/v1/events") - 1
            && strcmp(in->url + n - (sizeof("/api/v1/events") - 1),
                      "/api/v1/events") == 0)
        {
            n -= sizeof("/api/v1/events") - 1;
        }

        memcpy(in->query, in->url, n);
        in->query[n] = '\0';
    }

    n = strlen(in->query);
    while (n > 0 && in->query[n - 1] == '/') {
        in->query[--n] = '\0';
    }

    return 0;
}


/*
 * reconcile: OpenMeter's own figure, GET /api/v1/meters/{meterIdOrSlug}/
 * query with subject, from, to (RFC 3339, both inclusive) and windowSize
 * (openmeter api/openapi.yaml queryMeter; MeterQueryResult {data:
 * [{value, windowStart, windowEnd, subject}]}, one answer, no pages).  The
 * meter's slug is the event type with "-" as "_" (slugs are
 * [a-z0-9]+(_[a-z0-9]+)*); a window starting at "to" is the next period's.
 */
static int
meter_ingest_usage_total(meter_provider_t *p, const meter_usage_query_t *q,
    double *total, meter_send_result_t *res)
{
    int                 rc;
    char                slug[65], a[32], b[32];
    size_t              i;
    cJSON              *json;
    time_t              ws;
    double              x;
    meter_buf_t         url;
    const cJSON        *rows, *row;
    meter_ingest_t     *in;
    meter_http_req_t    req;

    in = p->data;
    *total = 0;
    rc = -1;
    json = NULL;

    memset(res, 0, sizeof(*res));
    memset(&url, 0, sizeof(url));
    memset(&req, 0, sizeof(req));

    for (i = 0; q->provider_meter[i] != '\0' && i < sizeof(slug) - 1; i++) {
        slug[i] = (q->provider_meter[i] == '-') ? '_' : q->provider_meter[i];
    }

    slug[i] = '\0';

    meter_rfc3339(q->from, a, sizeof(a));
    meter_rfc3339(q->to, b, sizeof(b));

    if (meter_buf_printf(&url, "%s/api/v1/meters/", in->query) != 0
        || meter_url_segment(&url, in->http.curl, slug) != 0
        || meter_buf_printf(&url, "/query?windowSize=HOUR&subject=") != 0
        || meter_url_segment(&url, in->http.curl, q->customer) != 0
        || meter_buf_printf(&url, "&from=") != 0
        || meter_url_segment(&url, in->http.curl, a) != 0
        || meter_buf_printf(&url, "&to=") != 0
        || meter_url_segment(&url, in->http.curl, b) != 0)
    {
        snprintf(res->error, sizeof(res->error), "openmeter: out of memory");
        res->status = METER_SEND_RETRY;
        goto end;
    }

    req.method = "GET";
    req.url = url.data;
    req.accept = "application/json";

    if (in->token[0] != '\0') {
        req.auth = METER_HTTP_AUTH_BEARER;
        req.secret = in->token;
    }

    if (meter_http_json(&in->http, &req, &json, NULL, res) != METER_SEND_OK) {
        goto end;
    }

    rows = cJSON_GetObjectItemCaseSensitive(json, "data");
    if (!cJSON_IsArray(rows)) {
        snprintf(res->error, sizeof(res->error),
                 "openmeter: meter query without \"data\"");
        res->status = METER_SEND_RETRY;
        goto end;
    }

    cJSON_ArrayForEach(row, rows) {
        ws = meter_rfc3339_parse(meter_json_str(row, "windowStart",
                                                (char *) NULL));
        if (ws != -1 && ws >= q->to) {
            continue;
        }

        x = meter_json_num(row, "value", (char *) NULL);
        *total += (x > 0) ? x : 0;
    }

    rc = 0;

end:

    cJSON_Delete(json);
    meter_buf_free(&url);

    return rc;
}


static void
meter_ingest_cleanup(meter_provider_t *p)
{
    meter_ingest_t  *in;

    in = p->data;
    if (in == NULL) {
        return;
    }

    meter_http_cleanup(&in->http);
    explicit_bzero(in->token, sizeof(in->token));
    free(in);
    p->data = NULL;
}


void
meter_provider_http(meter_provider_t *p)
{
    p->name = "http";
    p->init = meter_ingest_init;
    p->send = meter_ingest_send;
    p->lookup = NULL;
    p->usage_total = meter_ingest_usage_total;
    p->cleanup = meter_ingest_cleanup;
    p->data = NULL;
}
