
/*
 * Copyright (C) nginx-meter authors
 *
 * Usage metering for nginx: counts requests per key (usually an API key)
 * in shared memory at the log phase and flushes the cumulative counters
 * to Redis from a timer, through hiredis attached to nginx's event loop.
 *
 * The request path touches shared memory only (meter_core.c: a lock-free
 * table).  One worker at a time flushes a zone, under a lease kept in the
 * zone that expires on its own, so a killed worker leaves nothing locked.
 * The flush writes absolute values with a max-only script, so a lost reply
 * is retried without double counting (docs/redis-schema.md).
 *
 * This file: the command table, the module, the configuration's create,
 * init and merge, postconfiguration, and the worker's init and exit.  The
 * other files, one concern each, are listed in docs/architecture.md.
 */


#include "ngx_http_meter_module.h"


static void *ngx_http_meter_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_meter_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_meter_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_meter_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_uint_t ngx_http_meter_has_return(ngx_conf_t *cf);
static ngx_int_t ngx_http_meter_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_meter_gov_init(ngx_conf_t *cf,
    ngx_http_meter_main_conf_t *mcf);
static ngx_int_t ngx_http_meter_slot(ngx_conf_t *cf, char *name);
static ngx_int_t ngx_http_meter_slot_get(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_meter_init_process(ngx_cycle_t *cycle);
static void ngx_http_meter_exit_process(ngx_cycle_t *cycle);


static ngx_command_t  ngx_http_meter_commands[] = {

    { ngx_string("meter_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE2,
      ngx_http_meter_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("meter"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_meter,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("meter_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_meter_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("meter_flush_interval"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_meter_set_msec,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_meter_main_conf_t, flush_interval),
      NULL },

    { ngx_string("meter_governance"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_meter_governance,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("meter_governance_refresh"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_meter_set_msec,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_meter_main_conf_t, gov_refresh),
      NULL },

    { ngx_string("meter_governance_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_meter_main_conf_t, gov_size),
      NULL },

    { ngx_string("meter_governance_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_meter_loc_conf_t, gov_headers),
      NULL },

    { ngx_string("meter_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS|NGX_CONF_TAKE1,
      ngx_http_meter_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_meter_module_ctx = {
    ngx_http_meter_add_variables,          /* preconfiguration */
    ngx_http_meter_init,                   /* postconfiguration */

    ngx_http_meter_create_main_conf,       /* create main configuration */
    ngx_http_meter_init_main_conf,         /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_meter_create_loc_conf,        /* create location configuration */
    ngx_http_meter_merge_loc_conf          /* merge location configuration */
};


ngx_module_t  ngx_http_meter_module = {
    NGX_MODULE_V1,
    &ngx_http_meter_module_ctx,            /* module context */
    ngx_http_meter_commands,               /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_meter_init_process,           /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_meter_exit_process,           /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


ngx_http_meter_worker_t  *ngx_http_meter_worker;

/* ngx_http_rewrite_module's ctx_index, to find "return" (or unset) */
static ngx_uint_t  ngx_http_meter_rewrite_index = NGX_CONF_UNSET_UINT;


static void *
ngx_http_meter_create_main_conf(ngx_conf_t *cf)
{
    ngx_uint_t                   i;
    ngx_http_meter_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&mcf->zones, cf->pool, 2, sizeof(ngx_shm_zone_t *))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&mcf->meters, cf->pool, 4,
                       sizeof(ngx_http_meter_t *))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&mcf->gov_confs, cf->pool, 4,
                       sizeof(ngx_http_meter_gov_conf_t *))
        != NGX_OK)
    {
        return NULL;
    }

    mcf->gov_size = NGX_CONF_UNSET_SIZE;

    for (i = 0; cf->cycle->modules[i] != NULL; i++) {
        if (ngx_strcmp(cf->cycle->modules[i]->name,
                       "ngx_http_rewrite_module")
            == 0)
        {
            ngx_http_meter_rewrite_index = cf->cycle->modules[i]->ctx_index;
        }
    }

    mcf->redis_port = NGX_CONF_UNSET;
    mcf->redis_db = NGX_CONF_UNSET;
    mcf->redis_timeout = NGX_CONF_UNSET_MSEC;
    mcf->flush_interval = NGX_CONF_UNSET_MSEC;
    mcf->gov_refresh = NGX_CONF_UNSET_MSEC;

    return mcf;
}


static char *
ngx_http_meter_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_meter_main_conf_t  *mcf = conf;

    ngx_conf_init_value(mcf->redis_port, 6379);
    ngx_conf_init_value(mcf->redis_db, 0);
    ngx_conf_init_msec_value(mcf->redis_timeout, 1000);
    ngx_conf_init_msec_value(mcf->flush_interval, 1000);
    ngx_conf_init_msec_value(mcf->gov_refresh, 5000);

    if (mcf->gov_refresh < 10) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter_governance_refresh\" must be at least "
                           "10ms");
        return NGX_CONF_ERROR;
    }

    if (mcf->flush_interval < 10) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter_flush_interval\" must be at least 10ms");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_meter_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_meter_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->meters = NGX_CONF_UNSET_PTR;
    conf->status = NGX_CONF_UNSET_UINT;
    conf->gov = NGX_CONF_UNSET_PTR;
    conf->gov_headers = NGX_CONF_UNSET;

    return conf;
}


static char *
ngx_http_meter_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_meter_loc_conf_t  *prev = parent;
    ngx_http_meter_loc_conf_t  *conf = child;

    ngx_uint_t                 server, ret, own, i;
    ngx_http_meter_t          *m;
    ngx_http_conf_ctx_t       *ctx;
    ngx_http_core_srv_conf_t  *cscf;
    ngx_http_core_loc_conf_t  *clcf;

    /* like access_log: a level that defines no meter inherits them all */
    ngx_conf_merge_ptr_value(conf->meters, prev->meters, NULL);
    ngx_conf_merge_uint_value(conf->status, prev->status,
                              NGX_HTTP_METER_STATUS_JSON);

    own = (conf->gov != NGX_CONF_UNSET_PTR);
    ngx_conf_merge_ptr_value(conf->gov, prev->gov, NULL);
    ngx_conf_merge_value(conf->gov_headers, prev->gov_headers, 0);

    /*
     * "return" answers in the rewrite phase, before the access phase that
     * gates: say so where a gate would be bypassed.  cf->ctx holds the
     * confs of the level being merged (ngx_http_merge_servers() and
     * ngx_http_merge_locations() in src/http/ngx_http.c).
     */
    ctx = cf->ctx;
    cscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_core_module);
    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    /*
     * nginx runs a subrequest's log phase only with log_subrequest on
     * (ngx_http_finalize_request()): a meter with subrequests=on turns it
     * on where it applies (the core module has merged already).
     */
    if (conf->meters != NULL) {
        m = conf->meters->elts;

        for (i = 0; i < conf->meters->nelts; i++) {
            if (m[i].subrequests) {
                clcf->log_subrequest = 1;
            }
        }
    }

    server = (cscf->ctx->loc_conf == ctx->loc_conf);
    ret = ngx_http_meter_has_return(cf);

    conf->bypass = server ? ret : prev->bypass;

    /*
     * A gate written at http level covers every health check and redirect
     * that answers with "return": warning for each would be noise.
     */
    if (conf->gov == NULL || conf->gov->http) {
        return NGX_CONF_OK;
    }

    if (ret && !server) {
        ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                           "meter_governance (%V:%ui) does not gate "
                           "location \"%V\": its \"return\" answers in the "
                           "rewrite phase, before the access phase",
                           &conf->gov->file, conf->gov->line, &clcf->name);

    } else if (conf->bypass && (server || own)) {
        ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                           "meter_governance (%V:%ui) does not gate %s%V%s: "
                           "a \"return\" in its server block answers in the "
                           "rewrite phase, before the access phase",
                           &conf->gov->file, conf->gov->line,
                           server ? "server \"" : "location \"",
                           server ? &cscf->server_name : &clcf->name, "\"");
    }

    return NGX_CONF_OK;
}


/*
 * Whether the rewrite module's script at the level being merged has a
 * "return".  ngx_http_rewrite_loc_conf_t starts with "ngx_array_t *codes"
 * (src/http/modules/ngx_http_rewrite_module.c), the codes of the level and
 * of its "if" blocks, each a struct that starts with its handler and is
 * pointer-aligned (ngx_http_script_start_code()).
 */

static ngx_uint_t
ngx_http_meter_has_return(ngx_conf_t *cf)
{
    void          *rlcf;
    uintptr_t     *code;
    ngx_uint_t     i, n;
    ngx_array_t   *codes;

    if (ngx_http_meter_rewrite_index == NGX_CONF_UNSET_UINT) {
        return 0;
    }

    rlcf = ((ngx_http_conf_ctx_t *) cf->ctx)
               ->loc_conf[ngx_http_meter_rewrite_index];

    if (rlcf == NULL) {
        return 0;
    }

    codes = *(ngx_array_t **) rlcf;

    if (codes == NULL) {
        return 0;
    }

    code = codes->elts;
    n = codes->nelts * codes->size / sizeof(uintptr_t);

    for (i = 0; i < n; i++) {
        if (code[i] == (uintptr_t) ngx_http_script_return_code) {
            return 1;
        }
    }

    return 0;
}


static ngx_int_t
ngx_http_meter_init(ngx_conf_t *cf)
{
    ngx_uint_t                   i;
    ngx_http_handler_pt         *h;
    ngx_http_meter_t           **m;
    ngx_http_core_main_conf_t   *cmcf;
    ngx_http_meter_main_conf_t  *mcf;

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_meter_module);

    if (meter_method_bit("GET", 3) != NGX_HTTP_GET
        || meter_method_bit("PATCH", 5) != NGX_HTTP_PATCH
        || meter_method_bit("CONNECT", 7) != NGX_HTTP_CONNECT)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "meter: method bits differ from this nginx's");
        return NGX_ERROR;
    }

    /* a meter may name a zone defined further down: check them now */
    m = mcf->meters.elts;

    for (i = 0; i < mcf->meters.nelts; i++) {
        if (m[i]->shm_zone->data == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "meter \"%V\" uses unknown meter_zone \"%V\" "
                          "in %V:%ui", &m[i]->name,
                          &m[i]->shm_zone->shm.name, &m[i]->file,
                          m[i]->line);
            return NGX_ERROR;
        }
    }

    if (mcf->zones.nelts == 0) {
        if (mcf->gov_confs.nelts) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "meter_governance without any meter_zone in "
                          "%V:%ui", &((ngx_http_meter_gov_conf_t **)
                                      mcf->gov_confs.elts)[0]->file,
                          ((ngx_http_meter_gov_conf_t **)
                           mcf->gov_confs.elts)[0]->line);
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (!mcf->redis_set) {
        ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                      "meter_zone is defined without meter_redis: usage "
                      "is counted but never flushed");
    }

    mcf->call_var = ngx_http_meter_slot(cf, "meter call");
    mcf->meters_var = ngx_http_meter_slot(cf, "meter meters");

    if (mcf->call_var == NGX_ERROR || mcf->meters_var == NGX_ERROR) {
        return NGX_ERROR;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_meter_log_handler;

    if (mcf->gov_confs.nelts && ngx_http_meter_gov_init(cf, mcf) != NGX_OK) {
        return NGX_ERROR;
    }

    /*
     * The meters of each location a call passes.  Registered after the
     * rewrite module (a dynamic module's postconfiguration runs later), so
     * it runs before its script: ngx_http_init_phase_handlers() runs a
     * phase's handlers last registered first.
     */
    h = ngx_array_push(&cmcf->phases[NGX_HTTP_REWRITE_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_meter_rewrite_handler;

    /* the gates */
    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_meter_access_handler;

    return NGX_OK;
}


/*
 * A slot of r->variables the request path keeps a pointer in: nginx
 * zeroes them for each request and keeps them over internal redirects.
 * The name has a space, which no configuration can spell ("$meter call"
 * reads $meter), so nothing else reads or "set"s it.
 */

static ngx_int_t
ngx_http_meter_slot(ngx_conf_t *cf, char *name)
{
    ngx_str_t             s;
    ngx_http_variable_t  *v;

    s.data = (u_char *) name;
    s.len = ngx_strlen(name);

    v = ngx_http_add_variable(cf, &s, NGX_HTTP_VAR_NOHASH
                                      |NGX_HTTP_VAR_NOCACHEABLE);
    if (v == NULL) {
        return NGX_ERROR;
    }

    v->get_handler = ngx_http_meter_slot_get;

    return ngx_http_get_variable_index(cf, &s);
}


/* never called by nginx's config: a slot is not a variable */

static ngx_int_t
ngx_http_meter_slot_get(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    v->not_found = 1;

    return NGX_OK;
}


/*
 * The gates written anywhere (http, server, location: the location tree
 * is already built here, so they were collected as they were parsed):
 * mark their zones and add the node's governance zone.
 */

static ngx_int_t
ngx_http_meter_gov_init(ngx_conf_t *cf, ngx_http_meter_main_conf_t *mcf)
{
    size_t                        size;
    ngx_str_t                     name;
    ngx_uint_t                    i;
    ngx_http_meter_gov_zone_t    *gz;
    ngx_http_meter_zone_ctx_t    *ctx;
    ngx_http_meter_gov_conf_t   **gcfp;

    gcfp = mcf->gov_confs.elts;
    size = 0;

    for (i = 0; i < mcf->gov_confs.nelts; i++) {
        ctx = gcfp[i]->shm_zone->data;

        if (ctx == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "meter_governance uses unknown meter_zone \"%V\" "
                          "in %V:%ui", &gcfp[i]->shm_zone->shm.name,
                          &gcfp[i]->file, gcfp[i]->line);
            return NGX_ERROR;
        }

        if (!mcf->redis_set) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "meter_governance needs meter_redis, where the "
                          "billing state is read from, in %V:%ui",
                          &gcfp[i]->file, gcfp[i]->line);
            return NGX_ERROR;
        }

        ctx->governance = 1;

        /* by default what a governed zone gave it before: half its size */
        size = ngx_max(size, gcfp[i]->shm_zone->shm.size / 2);
    }

    if (mcf->gov_size != NGX_CONF_UNSET_SIZE) {
        size = mcf->gov_size;
    }

    if (size < (size_t) (8 * ngx_pagesize)) {
        if (mcf->gov_size != NGX_CONF_UNSET_SIZE) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"meter_governance_size\" must be at least %uz "
                          "bytes", (size_t) (8 * ngx_pagesize));
            return NGX_ERROR;
        }

        size = 8 * ngx_pagesize;
    }

    ngx_str_set(&name, "meter:governance");

    mcf->gov_zone = ngx_shared_memory_add(cf, &name, size,
                                          &ngx_http_meter_module);
    if (mcf->gov_zone == NULL) {
        return NGX_ERROR;
    }

    gz = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_gov_zone_t));
    if (gz == NULL) {
        return NGX_ERROR;
    }

    mcf->gov_zone->init = ngx_http_meter_gov_init_zone;
    mcf->gov_zone->data = gz;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_init_process(ngx_cycle_t *cycle)
{
    ngx_http_meter_worker_t     *w;
    ngx_http_meter_main_conf_t  *mcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_meter_module);

    if (mcf != NULL) {
        ngx_http_meter_key_init(cycle, mcf);
    }

    if (mcf == NULL || mcf->zones.nelts == 0 || !mcf->redis_set) {
        return NGX_OK;
    }

    w = ngx_pcalloc(cycle->pool, sizeof(ngx_http_meter_worker_t));
    if (w == NULL) {
        return NGX_ERROR;
    }

    /* the connection first: the flush and the refresh hook into it */
    ngx_http_meter_redis_init(&w->redis, mcf, cycle->log);

    if (ngx_http_meter_flush_init(&w->flush, &w->redis) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_meter_gov_refresh_init(&w->gov, &w->redis);

    ngx_http_meter_worker = w;

    /* registered before the first add: see meter_core.h */
    ngx_http_meter_announce(&w->flush);

    ngx_http_meter_redis_connect(&w->redis);

    ngx_add_timer(&w->flush.tick, mcf->flush_interval);

    if (mcf->gov_zone != NULL) {
        ngx_add_timer(&w->gov.gov_tick, 1);
    }

    return NGX_OK;
}


static void
ngx_http_meter_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_meter_worker_t  *w;

    w = ngx_http_meter_worker;

    if (w == NULL) {
        return;
    }

    ngx_http_meter_redis_close(&w->redis);

    ngx_http_meter_flush_exit(&w->flush, cycle->log);

    ngx_http_meter_gov_refresh_exit(&w->gov);

    ngx_http_meter_worker = NULL;
}


/* the timers and posted events of a worker: cancelable, so that a timer
 * left armed does not hold up a graceful exit */

void
ngx_http_meter_init_event(ngx_event_t *ev, ngx_event_handler_pt handler,
    void *data, ngx_log_t *log)
{
    ev->handler = handler;
    ev->data = data;
    ev->log = log;
    ev->cancelable = 1;
}
