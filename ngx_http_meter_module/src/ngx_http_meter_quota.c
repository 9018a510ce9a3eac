
/*
 * Copyright (C) nginx-meter authors
 *
 * Plans with quotas.  The refresh side: mtr:gov:quota (HSCAN pages, read
 * with mtr:gov:credit at every refresh) becomes grants the refresh puts
 * on customers like credit, with the quota's limit, window and reset.
 * The request side: over quota, 429 with Retry-After until the reset,
 * and the RateLimit-Policy / RateLimit fields of
 * draft-ietf-httpapi-ratelimit-headers-10 (section 3 and 4: a List of
 * policy names with the q, w and r, t parameters) when
 * meter_governance_headers is on.
 *
 * Usage toward a quota is what the prepaid-credit check uses: the flushed
 * lifetime usage of the customer's keys read at the refresh (mtr:used)
 * less the usage before the period (ALLOWANCE = LIMIT + that), and what
 * this node counted since (local, seeded with its unflushed counts).
 */


#include "ngx_http_meter_module.h"


/* NGX_HTTP_METER_GOV_READ of ngx_http_meter_gov_refresh.c */
#define NGX_HTTP_METER_QUOTA_READ   1


static void ngx_http_meter_quota_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static ngx_int_t ngx_http_meter_quota_send(ngx_http_meter_gov_refresh_t *gr);
static ngx_int_t ngx_http_meter_quota_field(ngx_http_meter_gov_refresh_t *gr,
    redisReply *f, redisReply *v);
static ngx_int_t ngx_http_meter_quota_headers(ngx_http_request_t *r,
    ngx_http_meter_gov_cust_t *cust, time_t now);


ngx_int_t
ngx_http_meter_quota_read(ngx_http_meter_gov_refresh_t *gr)
{
    ngx_memcpy(gr->gov_qcursor, "0", 2);

    return ngx_http_meter_quota_send(gr);
}


static ngx_int_t
ngx_http_meter_quota_send(ngx_http_meter_gov_refresh_t *gr)
{
    return ngx_http_meter_gov_hscan(gr, MTR_GOV_QUOTA,
                                    sizeof(MTR_GOV_QUOTA) - 1,
                                    gr->gov_qcursor,
                                    ngx_http_meter_quota_reply);
}


/* a page of mtr:gov:quota, in the READ phase beside the credit pages */

static void
ngx_http_meter_quota_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    redisReply                    *reply = r;
    size_t                         i;
    ngx_uint_t                     last;
    redisReply                    *cur, *items;
    ngx_http_meter_gov_refresh_t  *gr = privdata;

    gr->gov_started = ngx_current_msec;

    if (gr->gov_phase != NGX_HTTP_METER_QUOTA_READ) {
        gr->gov_busy--;
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[0]->len >= sizeof(gr->gov_qcursor)
        || reply->element[1]->type != REDIS_REPLY_ARRAY)
    {
        if (reply != NULL && reply->type == REDIS_REPLY_ERROR
            && !gr->gov_failed)
        {
            ngx_log_error(NGX_LOG_ERR, gr->log, 0,
                          "meter: governance refresh refused: %*s",
                          (int) ngx_min(reply->len, 256), reply->str);
        }

        gr->gov_failed = 1;
        goto done;
    }

    cur = reply->element[0];
    ngx_memcpy(gr->gov_qcursor, cur->str, cur->len);
    gr->gov_qcursor[cur->len] = '\0';
    last = (cur->len == 1 && cur->str[0] == '0');

    items = reply->element[1];

    for (i = 0; i + 1 < items->elements; i += 2) {
        if (ngx_http_meter_quota_field(gr, items->element[i],
                                       items->element[i + 1])
            != NGX_OK)
        {
            gr->gov_failed = 1;
            break;
        }
    }

    if (!last && !gr->gov_failed) {
        (void) ngx_http_meter_quota_send(gr);
    }

done:

    if (--gr->gov_busy == 0) {
        ngx_http_meter_gov_read_done(gr);
    }
}


/*
 * CUSTOMER -> PLAN, or CUSTOMER|METER -> LIMIT \t WINDOW \t RESET \t
 * ALLOWANCE; a malformed field is skipped (an older or newer writer)
 */

static ngx_int_t
ngx_http_meter_quota_field(ngx_http_meter_gov_refresh_t *gr, redisReply *f,
    redisReply *v)
{
    u_char                      *p, *end, *bar, *tab;
    int64_t                      n[MTR_GOV_QUOTA_NFIELDS];
    ngx_uint_t                   i;
    ngx_http_meter_gov_grant_t  *g;

    if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING
        || f->len == 0 || v->len == 0)
    {
        return NGX_OK;
    }

    p = (u_char *) f->str;
    bar = ngx_strlchr(p, p + f->len, MTR_GOV_CREDIT_SEP);

    if (bar == p
        || (bar != NULL
            && !meter_valid_name((char *) bar + 1, p + f->len - bar - 1))
        || (bar == NULL && !meter_valid_name(v->str, ngx_min(v->len, 32))))
    {
        return NGX_OK;
    }

    if (bar != NULL) {
        p = (u_char *) v->str;
        end = p + v->len;

        for (i = 0; i < MTR_GOV_QUOTA_NFIELDS; i++) {
            tab = ngx_strlchr(p, end, MTR_GOV_QUOTA_SEP);
            if (tab == NULL) {
                tab = end;
            }

            n[i] = ngx_atoof(p, tab - p);
            if (n[i] == NGX_ERROR || (i < MTR_GOV_QUOTA_NFIELDS - 1
                                      && tab == end))
            {
                return NGX_OK;
            }

            p = tab + 1;
        }

        if (n[0] <= 0 || n[1] <= 0) {
            return NGX_OK;
        }
    }

    g = ngx_array_push(&gr->gov_grants);
    if (g == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(g, sizeof(ngx_http_meter_gov_grant_t));

    p = (u_char *) f->str;
    g->cust.len = (bar != NULL) ? (size_t) (bar - p) : f->len;
    g->cust.data = ngx_pnalloc(gr->gov_tmp, f->len);
    if (g->cust.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(g->cust.data, p, f->len);

    if (bar == NULL) {
        g->plan.len = ngx_min(v->len, MTR_PLAN_MAX);
        g->plan.data = ngx_pnalloc(gr->gov_tmp, g->plan.len);
        if (g->plan.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(g->plan.data, v->str, g->plan.len);
        return NGX_OK;
    }

    g->meter.data = g->cust.data + g->cust.len + 1;
    g->meter.len = f->len - g->cust.len - 1;
    g->granted = n[3];
    g->q.limit = n[0];
    g->q.window = n[1];
    g->q.reset = n[2];

    return NGX_OK;
}


/*
 * The access phase, after the 402 checks: a quota whose period ended
 * (the worker has not published the next one yet) is not enforced.
 */

ngx_int_t
ngx_http_meter_quota_check(ngx_http_request_t *r,
    ngx_http_meter_loc_conf_t *mlcf, ngx_http_meter_shctx_t *sh,
    ngx_http_meter_gov_cust_t *cust)
{
    u_char                       *p;
    time_t                        now, until;
    int64_t                       left;
    uint32_t                      i;
    ngx_table_elt_t              *h;
    ngx_http_meter_gov_credit_t  *c;

    now = ngx_time();
    until = 0;

    for (i = 0; i < cust->ncredits; i++) {
        c = &cust->credits[i];

        if (c->q.window == 0 || now >= c->q.reset) {
            continue;
        }

        left = c->remaining - __atomic_load_n(&c->local, __ATOMIC_RELAXED);

        if (left <= 0 && c->q.reset > until) {
            /* allowed again when every exhausted quota has reset */
            until = (time_t) c->q.reset;
        }
    }

    if (mlcf->gov_headers
        && ngx_http_meter_quota_headers(r, cust, now) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (until == 0) {
        return NGX_DECLINED;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value.data = p;
    h->value.len = ngx_sprintf(p, "%T", until - now) - p;

    return ngx_http_meter_deny(r, sh, NGX_HTTP_TOO_MANY_REQUESTS,
                               NGX_HTTP_METER_DENY_N, "quota_exceeded",
                               "The quota of this account's plan is used "
                               "up for this period; see Retry-After.");
}


/* one list member per active quota: "METER";q=LIMIT;w=WINDOW and
 * "METER";r=REMAINING;t=SECONDS (Structured Field strings: meter names
 * are [A-Za-z0-9_.-], nothing to escape) */

static ngx_int_t
ngx_http_meter_quota_headers(ngx_http_request_t *r,
    ngx_http_meter_gov_cust_t *cust, time_t now)
{
    u_char                       *pp, *pr, *sp, *sr;
    size_t                        size;
    int64_t                       left;
    uint32_t                      i;
    ngx_table_elt_t              *hp, *hr;
    ngx_http_meter_gov_credit_t  *c;

    size = NGX_HTTP_METER_GOV_CREDITS
           * (METER_NAME_MAX + sizeof("\"\";q=;w=, ") + 2 * NGX_INT64_LEN);

    pp = ngx_pnalloc(r->pool, 2 * size);
    if (pp == NULL) {
        return NGX_ERROR;
    }

    pr = pp + size;
    sp = pp;
    sr = pr;

    for (i = 0; i < cust->ncredits; i++) {
        c = &cust->credits[i];

        if (c->q.window == 0 || now >= c->q.reset) {
            continue;
        }

        left = c->remaining - __atomic_load_n(&c->local, __ATOMIC_RELAXED);

        if (pp != sp) {
            pp = ngx_cpymem(pp, ", ", 2);
            pr = ngx_cpymem(pr, ", ", 2);
        }

        pp = ngx_sprintf(pp, "\"%*s\";q=%L;w=%L",
                         ngx_strnlen((u_char *) c->meter, METER_NAME_MAX),
                         c->meter, c->q.limit, c->q.window);
        pr = ngx_sprintf(pr, "\"%*s\";r=%L;t=%L",
                         ngx_strnlen((u_char *) c->meter, METER_NAME_MAX),
                         c->meter, left > 0 ? left : 0,
                         (int64_t) (c->q.reset - now));
    }

    if (pp == sp) {
        return NGX_OK;
    }

    hp = ngx_list_push(&r->headers_out.headers);
    hr = (hp != NULL) ? ngx_list_push(&r->headers_out.headers) : NULL;
    if (hr == NULL) {
        return NGX_ERROR;
    }

    hp->hash = 1;
    ngx_str_set(&hp->key, "RateLimit-Policy");
    hp->value.data = sp;
    hp->value.len = pp - sp;

    hr->hash = 1;
    ngx_str_set(&hr->key, "RateLimit");
    hr->value.data = sr;
    hr->value.len = pr - sr;

    return NGX_OK;
}
