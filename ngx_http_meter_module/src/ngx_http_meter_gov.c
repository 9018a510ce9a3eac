
/*
 * Copyright (C) nginx-meter authors
 *
 * Governance, the request side: the access phase gates a call with the
 * copy of mtr:gov that the refresh (ngx_http_meter_gov_refresh.c) keeps in
 * the governance zone.  Nothing here waits for Redis.
 */


#include "ngx_http_meter_module.h"


static ngx_int_t ngx_http_meter_warn(ngx_http_request_t *r, time_t until);
static ngx_int_t ngx_http_meter_header(ngx_http_request_t *r,
    const char *name, const char *meter, int64_t value);


/*
 * The access phase of every location a call passes (nginx skips it for
 * subrequests): gates the call at the first governed location.  A call
 * is gated once: an internal redirect after the decision (error_page of
 * the refusal itself, try_files, rewrite ... last) is not gated again,
 * while a call that reaches a governed location through error_page
 * before any gate ran (an error of the rewrite phase) is gated there.
 */

ngx_int_t
ngx_http_meter_access_handler(ngx_http_request_t *r)
{
    time_t                      now, since;
    int64_t                     left;
    uint32_t                    i;
    ngx_str_t                   key;
    ngx_uint_t                  j, walked;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_req_ctx_t   *rctx;
    ngx_http_meter_gov_key_t   *k;
    ngx_http_meter_gov_conf_t  *gcf;
    ngx_http_meter_gov_cust_t  *cust;
    ngx_http_meter_gov_snap_t  *snap;
    ngx_http_meter_gov_zone_t  *gz;
    ngx_http_meter_zone_ctx_t  *ctx;
    ngx_http_meter_loc_conf_t  *mlcf;
    ngx_http_meter_main_conf_t *mcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);
    gcf = mlcf->gov;

    if (gcf == NULL) {
        return NGX_DECLINED;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    rctx = ngx_http_meter_req_ctx_get(r, mcf);
    if (rctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rctx->gated) {
        return NGX_DECLINED;
    }

    rctx->gated = 1;

    ctx = gcf->shm_zone->data;
    sh = ctx->sh;

    /* a key read from the headers is always $http_NAME */
    walked = ngx_http_meter_key_walks(r, ctx);

    if (ctx->key_header.len
        && ngx_http_meter_key_headers(r, ctx, &key, 1) > 1)
    {
        /* nginx 1.22 reads the first, a backend may read the last: it is
         * neither key's call */
        rctx->unbilled = 1;

        return ngx_http_meter_deny(r, sh, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_METER_DENY_UNKNOWN,
                                   "duplicate_key",
                                   "The API key header appears more than "
                                   "once; send it once.");
    }

    /* the headers just counted hold the key, unless the variable does */
    if (!walked && ngx_http_meter_key(r, ctx, &key) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (key.len == 0) {
        if (gcf->unknown == 0) {
            return NGX_DECLINED;
        }

        return ngx_http_meter_deny(r, sh, gcf->unknown,
                                   NGX_HTTP_METER_DENY_UNKNOWN,
                                   "missing_key",
                                   "This API needs an API key.");
    }

    ngx_http_meter_req_ctx_hash(rctx, gcf->shm_zone, &key);

    gz = mcf->gov_zone->data;

    snap = __atomic_load_n(&gz->sh->snap, __ATOMIC_ACQUIRE);

    k = (snap != NULL) ? ngx_http_meter_gov_find(snap, rctx->hash) : NULL;

    if (k == NULL) {
        /* never seen: without Redis nobody can say who this is */
        if (snap == NULL || !ngx_http_meter_redis_ready()) {
            if (!gcf->closed) {
                return NGX_DECLINED;
            }

            return ngx_http_meter_deny(r, sh, NGX_HTTP_SERVICE_UNAVAILABLE,
                                       NGX_HTTP_METER_DENY_DOWN,
                                       "state_unavailable",
                                       "The billing state cannot be read "
                                       "right now; try again later.");
        }

        if (gcf->unknown == 0) {
            return NGX_DECLINED;
        }

        return ngx_http_meter_deny(r, sh, gcf->unknown,
                                   NGX_HTTP_METER_DENY_UNKNOWN,
                                   "unknown_key",
                                   "This API key is not known.");
    }

    if (k->revoked) {
        return ngx_http_meter_deny(r, sh,
                                   gcf->unknown == NGX_HTTP_FORBIDDEN
                                   ? NGX_HTTP_FORBIDDEN
                                   : NGX_HTTP_UNAUTHORIZED,
                                   NGX_HTTP_METER_DENY_UNKNOWN,
                                   "revoked_key",
                                   "This API key has been revoked.");
    }

    cust = &snap->custs[k->cust - 1];
    rctx->snap = snap;
    rctx->cust = cust;

    now = ngx_time();

    /* an event dated ahead (a provider's clock, bad data) counts from now */
    since = (cust->since > now) ? now : (time_t) cust->since;

    if (cust->reason) {
        if (gcf->grace && now - since < gcf->grace) {
            if (ngx_http_meter_warn(r, since + gcf->grace) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

        } else if (cust->reason == NGX_HTTP_METER_REASON_CREDIT) {
            return ngx_http_meter_deny(r, sh, 402,
                                       NGX_HTTP_METER_DENY_CREDIT,
                                       "credit_exhausted",
                                       "The prepaid credit of this account "
                                       "is used up; top it up to go on.");

        } else {
            return ngx_http_meter_deny(r, sh, 402,
                                       NGX_HTTP_METER_DENY_OVERDUE,
                                       "invoice_overdue",
                                       "An invoice of this account is "
                                       "overdue; pay it to go on.");
        }
    }

    for (i = 0; i < cust->ncredits; i++) {
        if (cust->credits[i].q.window) {
            continue;                           /* a quota: below */
        }

        left = cust->credits[i].remaining
               - __atomic_load_n(&cust->credits[i].local, __ATOMIC_RELAXED);

        if (left <= 0) {
            return ngx_http_meter_deny(r, sh, 402,
                                       NGX_HTTP_METER_DENY_CREDIT,
                                       "credit_exhausted",
                                       "The prepaid credit of this account "
                                       "is used up; top it up to go on.");
        }

        if (mlcf->gov_headers) {
            j = ngx_http_meter_header(r, "X-Credit-Remaining",
                                      cust->credits[i].meter, left);
            if (j != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }
    }

    /* a 402 wins over a 429: the quota is checked last */
    if (cust->ncredits == 0) {
        return NGX_DECLINED;
    }

    return ngx_http_meter_quota_check(r, mlcf, sh, cust);
}


/*
 * The refusal: an RFC 9457 problem body, unless the configuration has an
 * error_page for the status, which nginx then serves as usual.
 */

ngx_int_t
ngx_http_meter_deny(ngx_http_request_t *r, ngx_http_meter_shctx_t *sh,
    ngx_uint_t status, ngx_uint_t why, const char *reason,
    const char *detail)
{
    u_char                    *p;
    ngx_str_t                  type;
    ngx_int_t                  rc;
    ngx_uint_t                 i;
    ngx_table_elt_t           *h;
    ngx_http_err_page_t       *err_page;
    ngx_http_complex_value_t   cv;
    ngx_http_core_loc_conf_t  *clcf;

    if (why < NGX_HTTP_METER_DENY_N) {
        (void) __atomic_fetch_add(&sh->gov_denied[why], 1,
                                  __ATOMIC_RELAXED);
    }

    /* reached through "error_page 404 /paid/x;" (no "="), nginx would keep
     * the 404: the refusal is the answer */
    r->err_status = 0;

    if (status == NGX_HTTP_UNAUTHORIZED) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "WWW-Authenticate");
        ngx_str_set(&h->value, "ApiKey realm=\"api\"");
        r->headers_out.www_authenticate = h;
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    /*
     * Finalized here, not returned: under "satisfy any" the access phase
     * takes a returned 401 or 403 as one check failed and lets "allow" or
     * auth_basic admit the call (src/http/ngx_http_core_module.c
     * ngx_http_core_access_phase()).  A refusal is final.
     */
    if (clcf->error_pages) {
        err_page = clcf->error_pages->elts;

        for (i = 0; i < clcf->error_pages->nelts; i++) {
            if ((ngx_uint_t) err_page[i].status == status) {
                ngx_http_finalize_request(r, status);
                return NGX_DONE;
            }
        }
    }

    ngx_memzero(&cv, sizeof(ngx_http_complex_value_t));

    cv.value.data = ngx_pnalloc(r->pool, 512);
    if (cv.value.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_snprintf(cv.value.data, 512,
                     "{\"type\":\"urn:nginx-meter:problem:%s\","
                     "\"title\":\"%s\",\"status\":%ui,"
                     "\"detail\":\"%s\",\"reason\":\"%s\"}\n",
                     reason,
                     status == 402 ? "Payment Required"
                     : status == NGX_HTTP_TOO_MANY_REQUESTS
                     ? "Too Many Requests"
                     : status == NGX_HTTP_UNAUTHORIZED ? "Unauthorized"
                     : status == NGX_HTTP_FORBIDDEN ? "Forbidden"
                     : status == NGX_HTTP_BAD_REQUEST ? "Bad Request"
                     : "Service Unavailable",
                     status, detail, reason);

    cv.value.len = p - cv.value.data;

    ngx_str_set(&type, "application/problem+json");

    rc = ngx_http_send_response(r, status, &type, &cv);

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


static ngx_int_t
ngx_http_meter_warn(ngx_http_request_t *r, time_t until)
{
    u_char           *p;
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(r->pool, sizeof("299 - \"Payment overdue; service stops"
                                    " at \"") + sizeof("Mon, 28 Sep 1970 "
                                    "06:00:00 GMT"));
    if (p == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Warning");
    h->value.data = p;

    p = ngx_cpymem(p, "299 - \"Payment overdue; service stops at ",
                   sizeof("299 - \"Payment overdue; service stops at ") - 1);
    p = ngx_http_time(p, until);
    *p++ = '"';

    h->value.len = p - h->value.data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_header(ngx_http_request_t *r, const char *name,
    const char *meter, int64_t value)
{
    u_char           *p;
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(r->pool, METER_NAME_MAX + 1 + NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value.data = p;

    /* a name of METER_NAME_MAX characters has no terminator */
    h->value.len = ngx_sprintf(p, "%*s=%L",
                               ngx_strnlen((u_char *) meter, METER_NAME_MAX),
                               meter, value)
                   - p;

    return NGX_OK;
}
