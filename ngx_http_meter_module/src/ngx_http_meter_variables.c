
/*
 * Copyright (C) nginx-meter authors
 *
 * The customer as nginx variables, for the rest of the configuration:
 * $meter_customer, $meter_plan, $meter_status (active, grace, delinquent,
 * unknown), $meter_credit_remaining and $meter_quota_remaining (the
 * smallest over the customer's credit or quota meters; empty: none).
 *
 * Read from the governance zone's published copy, with the key of the
 * location's meter_governance: no Redis.  The first one a request reads
 * evaluates all five, kept in the request's context (which outlives
 * internal redirects), so they agree with each other and cost one lookup
 * a request; a request that reads none costs nothing.  They may be read
 * before the access phase (limit_req, in preaccess) and then find the
 * customer themselves, as the gate would.
 */


#include "ngx_http_meter_module.h"


#define NGX_HTTP_METER_VAR_CUSTOMER     0
#define NGX_HTTP_METER_VAR_PLAN         1
#define NGX_HTTP_METER_VAR_STATUS       2
#define NGX_HTTP_METER_VAR_CREDIT       3
#define NGX_HTTP_METER_VAR_QUOTA        4
#define NGX_HTTP_METER_VAR_N            5


typedef struct {
    ngx_str_t                    v[NGX_HTTP_METER_VAR_N]; /* len 0: none */
} ngx_http_meter_vars_t;


static ngx_int_t ngx_http_meter_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_http_meter_vars_t *ngx_http_meter_vars(ngx_http_request_t *r);
static ngx_http_meter_gov_cust_t *ngx_http_meter_vars_cust(
    ngx_http_request_t *r, ngx_http_meter_req_ctx_t *rctx,
    ngx_http_meter_gov_conf_t *gcf);
static ngx_int_t ngx_http_meter_vars_str(ngx_http_request_t *r,
    ngx_str_t *s, u_char *p, size_t max);
static ngx_int_t ngx_http_meter_vars_num(ngx_http_request_t *r,
    ngx_str_t *s, int64_t n);


static ngx_http_variable_t  ngx_http_meter_vars_list[] = {

    { ngx_string("meter_customer"), NULL, ngx_http_meter_variable,
      NGX_HTTP_METER_VAR_CUSTOMER, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("meter_plan"), NULL, ngx_http_meter_variable,
      NGX_HTTP_METER_VAR_PLAN, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("meter_status"), NULL, ngx_http_meter_variable,
      NGX_HTTP_METER_VAR_STATUS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("meter_credit_remaining"), NULL, ngx_http_meter_variable,
      NGX_HTTP_METER_VAR_CREDIT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("meter_quota_remaining"), NULL, ngx_http_meter_variable,
      NGX_HTTP_METER_VAR_QUOTA, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_http_meter_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_meter_vars_list; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    ngx_http_meter_vars_t  *mv;

    mv = ngx_http_meter_vars(r);
    if (mv == NULL) {
        return NGX_ERROR;
    }

    if (mv->v[data].len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = mv->v[data].len;
    v->data = mv->v[data].data;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_http_meter_vars_t *
ngx_http_meter_vars(ngx_http_request_t *r)
{
    time_t                        now;
    int64_t                       left, credit, quota;
    uint32_t                      i;
    ngx_uint_t                    hc, hq;
    ngx_http_meter_vars_t        *mv;
    ngx_http_meter_req_ctx_t     *rctx;
    ngx_http_meter_gov_conf_t    *gcf;
    ngx_http_meter_gov_cust_t    *cust;
    ngx_http_meter_loc_conf_t    *mlcf;
    ngx_http_meter_main_conf_t   *mcf;
    ngx_http_meter_gov_credit_t  *c;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    rctx = ngx_http_meter_req_ctx_get(r->main, mcf);
    if (rctx == NULL) {
        return NULL;
    }

    if (rctx->vars != NULL) {
        return rctx->vars;
    }

    mv = ngx_pcalloc(r->main->pool, sizeof(ngx_http_meter_vars_t));
    if (mv == NULL) {
        return NULL;
    }

    rctx->vars = mv;

    ngx_str_set(&mv->v[NGX_HTTP_METER_VAR_STATUS], "unknown");

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);
    gcf = mlcf->gov;

    cust = (gcf != NULL) ? ngx_http_meter_vars_cust(r->main, rctx, gcf)
                         : NULL;

    if (cust == NULL) {
        return mv;
    }

    now = ngx_time();

    /* copies: the published copy may be recycled before the log phase */
    if (ngx_http_meter_vars_str(r, &mv->v[NGX_HTTP_METER_VAR_CUSTOMER],
                                cust->id, MTR_CUSTOMER_MAX)
        != NGX_OK
        || ngx_http_meter_vars_str(r, &mv->v[NGX_HTTP_METER_VAR_PLAN],
                                   cust->plan, MTR_PLAN_MAX)
           != NGX_OK)
    {
        return NULL;
    }

    if (cust->reason == 0) {
        ngx_str_set(&mv->v[NGX_HTTP_METER_VAR_STATUS], "active");

    } else if (gcf->grace
               && now - ngx_min((time_t) cust->since, now) < gcf->grace)
    {
        ngx_str_set(&mv->v[NGX_HTTP_METER_VAR_STATUS], "grace");

    } else {
        ngx_str_set(&mv->v[NGX_HTTP_METER_VAR_STATUS], "delinquent");
    }

    hc = 0;
    hq = 0;
    credit = 0;
    quota = 0;

    for (i = 0; i < cust->ncredits; i++) {
        c = &cust->credits[i];
        left = c->remaining - __atomic_load_n(&c->local, __ATOMIC_RELAXED);
        left = ngx_max(left, 0);

        if (c->q.window == 0) {
            credit = hc++ ? ngx_min(credit, left) : left;

        } else if (now < c->q.reset) {
            quota = hq++ ? ngx_min(quota, left) : left;
        }
    }

    if ((hc && ngx_http_meter_vars_num(r, &mv->v[NGX_HTTP_METER_VAR_CREDIT],
                                       credit)
               != NGX_OK)
        || (hq && ngx_http_meter_vars_num(r,
                                          &mv->v[NGX_HTTP_METER_VAR_QUOTA],
                                          quota)
                  != NGX_OK))
    {
        return NULL;
    }

    return mv;
}


/*
 * The customer of the call: the gate's, or found as the gate finds it.
 * Unknown (NULL) without a copy, for a missing, unknown or revoked key,
 * and for a key header sent twice (the gate refuses that call).
 */

static ngx_http_meter_gov_cust_t *
ngx_http_meter_vars_cust(ngx_http_request_t *r,
    ngx_http_meter_req_ctx_t *rctx, ngx_http_meter_gov_conf_t *gcf)
{
    ngx_str_t                    key;
    ngx_http_meter_gov_key_t    *k;
    ngx_http_meter_gov_snap_t   *snap;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_zone_ctx_t   *ctx;
    ngx_http_meter_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);
    gz = mcf->gov_zone->data;
    snap = __atomic_load_n(&gz->sh->snap, __ATOMIC_ACQUIRE);

    if (snap == NULL) {
        return NULL;
    }

    if (rctx->cust != NULL && rctx->snap == snap
        && rctx->zone == gcf->shm_zone)
    {
        return rctx->cust;
    }

    ctx = gcf->shm_zone->data;

    if (ctx->key_header.len) {
        if (ngx_http_meter_key_headers(r, ctx, &key, 1) > 1) {
            return NULL;
        }

        if (!ngx_http_meter_key_walks(r, ctx)
            && ngx_http_meter_key(r, ctx, &key) != NGX_OK)
        {
            return NULL;
        }

    } else if (ngx_http_meter_key(r, ctx, &key) != NGX_OK) {
        return NULL;
    }

    if (key.len == 0) {
        return NULL;
    }

    ngx_http_meter_req_ctx_hash(rctx, gcf->shm_zone, &key);

    k = ngx_http_meter_gov_find(snap, rctx->hash);

    if (k == NULL || k->revoked) {
        return NULL;
    }

    return &snap->custs[k->cust - 1];
}


static ngx_int_t
ngx_http_meter_vars_num(ngx_http_request_t *r, ngx_str_t *s, int64_t n)
{
    s->data = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (s->data == NULL) {
        return NGX_ERROR;
    }

    s->len = ngx_sprintf(s->data, "%L", n) - s->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_vars_str(ngx_http_request_t *r, ngx_str_t *s, u_char *p,
    size_t max)
{
    s->len = ngx_strnlen(p, max);

    if (s->len == 0) {
        return NGX_OK;
    }

    s->data = ngx_pnalloc(r->pool, s->len);
    if (s->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(s->data, p, s->len);

    return NGX_OK;
}
