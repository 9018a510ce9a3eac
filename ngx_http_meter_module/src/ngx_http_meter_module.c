
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
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "meter_core.h"


#define NGX_HTTP_METER_BATCH        64      /* items per pipelined slice */
#define NGX_HTTP_METER_SCAN         2048    /* slots scanned per slice */
#define NGX_HTTP_METER_SCAN_WORDS   4096    /* dirty bitmap words, same */
#define NGX_HTTP_METER_FULL_EVERY   60000   /* ms between full scans */
#define NGX_HTTP_METER_SLICE_PAUSE  1       /* ms between sent batches */
#define NGX_HTTP_METER_BACKOFF_MIN  100
#define NGX_HTTP_METER_BACKOFF_MAX  10000

#define NGX_HTTP_METER_REDIS_DOWN   0
#define NGX_HTTP_METER_REDIS_CONN   1
#define NGX_HTTP_METER_REDIS_READY  2

#define NGX_HTTP_METER_STATUS_JSON  0
#define NGX_HTTP_METER_STATUS_PROM  1

#define NGX_HTTP_METER_GOV_CREDITS  4       /* credit meters per customer */

/* why a request was refused; indexes the shm counters */
#define NGX_HTTP_METER_DENY_OVERDUE 0
#define NGX_HTTP_METER_DENY_CREDIT  1
#define NGX_HTTP_METER_DENY_UNKNOWN 2
#define NGX_HTTP_METER_DENY_DOWN    3
#define NGX_HTTP_METER_DENY_N       4

#define NGX_HTTP_METER_REASON_OVERDUE  1
#define NGX_HTTP_METER_REASON_CREDIT   2


/* governance: a compact copy of mtr:gov in shared memory */

typedef struct {
    uint8_t                      key[METER_HASH_LEN];
    uint32_t                     cust;      /* index + 1; 0: free slot */
    uint32_t                     revoked;
} ngx_http_meter_gov_key_t;

typedef struct {
    char                         meter[METER_NAME_MAX];
    int64_t                      remaining; /* when the copy was made */
    int64_t                      local;     /* atomic: counted here since */
} ngx_http_meter_gov_credit_t;

typedef struct {
    uint32_t                     reason;    /* 0: in good standing */
    uint32_t                     ncredits;
    int64_t                      since;
    ngx_http_meter_gov_credit_t  credits[NGX_HTTP_METER_GOV_CREDITS];
} ngx_http_meter_gov_cust_t;

typedef struct {
    uint64_t                     version;
    uint32_t                     mask;      /* key slots - 1 */
    uint32_t                     ncust;
    ngx_http_meter_gov_key_t    *keys;
    ngx_http_meter_gov_cust_t   *custs;
} ngx_http_meter_gov_snap_t;


typedef struct {
    uint64_t                     lease;     /* pid << 32 | expiry (s) */
    uint64_t                     flushed_total;
    uint64_t                     flushes;
    uint64_t                     flush_errors;
    uint64_t                     last_flush_ms;
    uint64_t                     value_errors;
    uint64_t                     dropped_logged; /* time of last log (s) */

    /*
     * The run_id of the Redis last flushed to.  A new one (restart,
     * failover) may have lost data: the next pass resends every counter.
     */
    ngx_atomic_t                 run_id_lock;
    u_char                       run_id[40];
    uint64_t                     resync;

    uint64_t                     gov_denied[NGX_HTTP_METER_DENY_N];

    meter_table_t                table;     /* last: slots follow */
} ngx_http_meter_shctx_t;


/*
 * Governance lives in a zone of its own, one per node ("meter:governance",
 * a name no meter_zone can take): the state of mtr:gov is the same for
 * every meter zone, and a gate added by a reload then only adds a zone,
 * never changes the layout of a meter zone that holds counters.
 *
 * Two buffers, one of them published in snap.  The refresher fills the
 * other and swaps; a request reads one pointer.
 */
typedef struct {
    uint64_t                     lease;     /* one refresher per node */
    ngx_http_meter_gov_snap_t   *snap;
    ngx_http_meter_gov_snap_t   *buf[2];
    size_t                       cap[2];
    uint64_t                     refreshed; /* Unix s, last refresh */
    uint64_t                     delinquent;
    uint64_t                     blocked;
} ngx_http_meter_gov_shctx_t;


typedef struct {
    ngx_http_meter_gov_shctx_t  *sh;
    ngx_slab_pool_t             *shpool;
} ngx_http_meter_gov_zone_t;


typedef struct {
    ngx_http_meter_shctx_t      *sh;
    ngx_slab_pool_t             *shpool;
    ngx_http_complex_value_t     key;
    ngx_str_t                    key_header; /* key is $http_NAME: NAME */
    ngx_shm_zone_t              *shm_zone;
    ngx_uint_t                   governance;
} ngx_http_meter_zone_ctx_t;


typedef struct {
    ngx_shm_zone_t              *shm_zone;
    ngx_uint_t                   closed;    /* on_redis_down=closed */
    ngx_uint_t                   unknown;   /* 0 allow, 401, 403 */
    time_t                       grace;
    ngx_str_t                    file;      /* where it was written */
    ngx_uint_t                   line;
    ngx_uint_t                   http;      /* at http level */
} ngx_http_meter_gov_conf_t;


/*
 * Per client call: the key's hash and customer, found once, and the one
 * billing decision.  It outlives internal redirects (which clear module
 * contexts): it is kept in a pool cleanup and found there again.
 */
typedef struct {
    ngx_http_request_t          *r;         /* owner: subrequests share
                                             * the pool */
    uint8_t                      hash[METER_HASH_LEN];
    ngx_shm_zone_t              *zone;      /* hash is of this zone's key */
    ngx_http_meter_gov_snap_t   *snap;      /* cust points into it */
    ngx_http_meter_gov_cust_t   *cust;
    ngx_array_t                 *meters;    /* of a location passed */
    ngx_uint_t                   gated;     /* a gate has decided */
    ngx_uint_t                   unbilled;  /* refused as no one's call */
} ngx_http_meter_req_ctx_t;


typedef struct {
    ngx_str_t                    name;
    ngx_shm_zone_t              *shm_zone;
    meter_status_filter_t        status;
    uint32_t                     methods;   /* 0: all */
    ngx_uint_t                   subrequests; /* subrequests=on */
    ngx_http_complex_value_t    *value;
    ngx_http_complex_value_t    *filter;    /* if= */
    ngx_array_t                 *vars;      /* indexes in value and if=,
                                             * read afresh at the log
                                             * phase */
    ngx_str_t                    file;      /* where it was defined */
    ngx_uint_t                   line;
} ngx_http_meter_t;


typedef struct {
    ngx_array_t                  zones;     /* ngx_shm_zone_t * */
    ngx_array_t                  meters;    /* ngx_http_meter_t *, all */

    ngx_str_t                    redis_host;    /* empty: unix socket */
    ngx_str_t                    redis_path;
    ngx_int_t                    redis_port;
    ngx_str_t                    redis_password;
    ngx_int_t                    redis_db;
    ngx_msec_t                   redis_timeout;
    ngx_uint_t                   redis_set;

    ngx_msec_t                   flush_interval;
    ngx_msec_t                   gov_refresh;
    ngx_array_t                  gov_confs; /* ngx_http_meter_gov_conf_t *,
                                             * every gate written */
    size_t                       gov_size;  /* meter_governance_size */
    ngx_shm_zone_t              *gov_zone;  /* NULL: no gate anywhere */
} ngx_http_meter_main_conf_t;


typedef struct {
    ngx_array_t                 *meters;    /* ngx_http_meter_t; NULL: none
                                             * configured; empty: off */
    ngx_uint_t                   status;    /* meter_status format */
    ngx_flag_t                   status_on;
    ngx_http_meter_gov_conf_t   *gov;
    ngx_flag_t                   gov_headers;
    ngx_uint_t                   bypass;    /* a "return" in the server's
                                             * rewrite phase */
} ngx_http_meter_loc_conf_t;


/* the refresher's own view of mtr:gov, kept between refreshes */
typedef struct {
    uint8_t                      key[METER_HASH_LEN];
    ngx_uint_t                   cust;
    uint32_t                     revoked;
} ngx_http_meter_gov_ckey_t;

typedef struct {
    ngx_str_t                    meter;
    int64_t                      granted;
    int64_t                      used;
} ngx_http_meter_gov_ccredit_t;

typedef struct {
    ngx_str_t                    id;
    uint32_t                     reason;
    int64_t                      since;
    ngx_uint_t                   ncredits;
    ngx_http_meter_gov_ccredit_t credits[NGX_HTTP_METER_GOV_CREDITS];
} ngx_http_meter_gov_ccust_t;

typedef struct {
    ngx_str_t                    cust;
    ngx_str_t                    meter;
    int64_t                      granted;
} ngx_http_meter_gov_grant_t;


typedef ngx_int_t (*ngx_http_meter_emit_pt)(void *data, int argc,
    const char **argv, const size_t *len, ngx_int_t item);


/* the blocking flush at exit: which reply belongs to which item */
typedef struct {
    redisContext                *rc;
    ngx_uint_t                   n;
    ngx_int_t                    items[3 * NGX_HTTP_METER_BATCH];
} ngx_http_meter_sync_t;


/* per worker process */
typedef struct {
    ngx_http_meter_main_conf_t  *mcf;
    ngx_log_t                   *log;

    redisAsyncContext           *ac;
    ngx_uint_t                   state;
    ngx_msec_t                   backoff;
    ngx_msec_t                   next_connect;
    ngx_uint_t                   down_logged;
    ngx_uint_t                   reload_script;
    char                         script_sha[41];

    ngx_event_t                  tick;      /* flush interval timer */
    ngx_event_t                  slice;     /* next slice, posted */
    ngx_event_t                  timeout;   /* connect/command timeout */

    ngx_uint_t                   pass;      /* a flush pass is running */
    ngx_uint_t                   passes;
    ngx_uint_t                   zone;      /* index into mcf->zones */
    ngx_uint_t                   zone_mode; /* 0 unset, 1 dirty, 2 full,
                                             * 3 full, flushed ones too */
    ngx_msec_t                   zone_start;
    uint32_t                     zone_hour; /* hour when the zone began */
    ngx_uint_t                   outstanding;
    ngx_uint_t                   failed;
    ngx_uint_t                   qs_logged;
    meter_batch_t                batch;
    meter_batch_item_t           items[NGX_HTTP_METER_BATCH];

    ngx_event_t                  gov_tick;  /* governance refresh timer */
    ngx_uint_t                   gov_busy;  /* replies outstanding */
    ngx_msec_t                   gov_started;
    ngx_uint_t                   gov_failed;
    ngx_uint_t                   gov_valid; /* gov_version/keys/custs */
    uint64_t                     gov_version;
    uint64_t                     gov_new_version;
    ngx_pool_t                  *gov_pool;  /* keys, custs */
    ngx_array_t                  gov_keys;  /* ngx_http_meter_gov_ckey_t */
    ngx_array_t                  gov_custs; /* ngx_http_meter_gov_ccust_t */
    ngx_pool_t                  *gov_tmp;   /* one refresh */
    ngx_array_t                  gov_grants; /* ngx_http_meter_gov_grant_t */
} ngx_http_meter_worker_t;


static ngx_int_t ngx_http_meter_log_handler(ngx_http_request_t *r);
static void ngx_http_meter_fresh_vars(ngx_http_request_t *r,
    ngx_array_t *vars);
static ngx_int_t ngx_http_meter_count(ngx_http_request_t *r,
    ngx_http_meter_t *m, ngx_http_meter_req_ctx_t *rctx, ngx_uint_t status,
    uint32_t method);
static ngx_int_t ngx_http_meter_status_handler(ngx_http_request_t *r);

static ngx_int_t ngx_http_meter_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_meter_lease(uint64_t *lease, ngx_msec_t interval);
static void ngx_http_meter_lease_release(uint64_t *lease);

static void ngx_http_meter_announce(ngx_http_meter_worker_t *w);
static void ngx_http_meter_tick(ngx_event_t *ev);
static void ngx_http_meter_slice_handler(ngx_event_t *ev);
static void ngx_http_meter_timeout_handler(ngx_event_t *ev);
static void ngx_http_meter_next_slice(ngx_http_meter_worker_t *w);
static ngx_int_t ngx_http_meter_send_batch(ngx_http_meter_worker_t *w,
    ngx_http_meter_zone_ctx_t *ctx);
static ngx_int_t ngx_http_meter_batch_cmds(meter_batch_t *b, uint64_t epoch,
    const char *sha, ngx_http_meter_emit_pt emit, void *data);
static ngx_int_t ngx_http_meter_emit_async(void *data, int argc,
    const char **argv, const size_t *len, ngx_int_t item);
static ngx_int_t ngx_http_meter_emit_sync(void *data, int argc,
    const char **argv, const size_t *len, ngx_int_t item);
static void ngx_http_meter_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_batch_done(ngx_http_meter_worker_t *w);
static void ngx_http_meter_zone_done(ngx_http_meter_worker_t *w,
    ngx_http_meter_zone_ctx_t *ctx);

static void ngx_http_meter_redis_connect(ngx_http_meter_worker_t *w);
static void ngx_http_meter_redis_fail(ngx_http_meter_worker_t *w,
    const char *why, const char *err);
static void ngx_http_meter_redis_connected(const redisAsyncContext *ac,
    int status);
static void ngx_http_meter_redis_disconnected(const redisAsyncContext *ac,
    int status);
static void ngx_http_meter_redis_setup_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_redis_info_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_watch(ngx_event_t *ev, ngx_int_t event,
    ngx_event_handler_pt handler);
static void ngx_http_meter_unwatch(ngx_event_t *ev, ngx_int_t event);
static void ngx_http_meter_redis_add_read(void *privdata);
static void ngx_http_meter_redis_del_read(void *privdata);
static void ngx_http_meter_redis_add_write(void *privdata);
static void ngx_http_meter_redis_del_write(void *privdata);
static void ngx_http_meter_redis_cleanup(void *privdata);
static void ngx_http_meter_redis_read(ngx_event_t *ev);
static void ngx_http_meter_redis_write(ngx_event_t *ev);

static ngx_int_t ngx_http_meter_rewrite_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_meter_access_handler(ngx_http_request_t *r);
static ngx_http_meter_req_ctx_t *ngx_http_meter_req_ctx_find(
    ngx_http_request_t *r);
static ngx_http_meter_req_ctx_t *ngx_http_meter_req_ctx_get(
    ngx_http_request_t *r);
static void ngx_http_meter_req_ctx_hash(ngx_http_meter_req_ctx_t *rctx,
    ngx_shm_zone_t *zone, ngx_str_t *key);
static void ngx_http_meter_req_ctx_cleanup(void *data);
static ngx_uint_t ngx_http_meter_key_headers(ngx_http_request_t *r,
    ngx_str_t *name);
static ngx_http_meter_req_ctx_t *ngx_http_meter_req_ctx(
    ngx_http_request_t *r, ngx_shm_zone_t *zone, ngx_str_t *key);
static ngx_http_meter_gov_key_t *ngx_http_meter_gov_find(
    ngx_http_meter_gov_snap_t *snap, uint8_t *hash);
static ngx_int_t ngx_http_meter_deny(ngx_http_request_t *r,
    ngx_http_meter_shctx_t *sh, ngx_uint_t status, ngx_uint_t why,
    const char *reason, const char *detail);
static ngx_int_t ngx_http_meter_warn(ngx_http_request_t *r, time_t until);
static ngx_int_t ngx_http_meter_header(ngx_http_request_t *r,
    const char *name, const char *meter, int64_t value);
static void ngx_http_meter_gov_tick(ngx_event_t *ev);
static ngx_int_t ngx_http_meter_gov_reply_ok(ngx_http_meter_worker_t *w,
    redisReply *reply, int type);
static void ngx_http_meter_gov_version_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_credit_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_stage2(ngx_http_meter_worker_t *w);
static void ngx_http_meter_gov_map_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static ngx_int_t ngx_http_meter_hex_decode(uint8_t *dst, u_char *hex);
static void ngx_http_meter_gov_stage3(ngx_http_meter_worker_t *w);
static void ngx_http_meter_gov_used_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_gov_done(ngx_http_meter_worker_t *w);
static void ngx_http_meter_gov_seed(ngx_http_meter_shctx_t *sh,
    ngx_http_meter_gov_snap_t *snap);
static void ngx_http_meter_gov_publish(ngx_http_meter_worker_t *w);

static void ngx_http_meter_final_flush(ngx_http_meter_main_conf_t *mcf,
    ngx_log_t *log);

static void *ngx_http_meter_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_meter_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_meter_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_meter_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_meter_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_meter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_meter_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_meter_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_meter_set_msec(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_meter_governance(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_meter_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_meter_gov_init(ngx_conf_t *cf,
    ngx_http_meter_main_conf_t *mcf);
static ngx_int_t ngx_http_meter_gov_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_uint_t ngx_http_meter_has_return(ngx_conf_t *cf);
static void ngx_http_meter_key_header(ngx_str_t *key, ngx_str_t *name);
static ngx_str_t ngx_http_meter_printable(ngx_pool_t *pool, ngx_str_t *name);
static ngx_int_t ngx_http_meter_add_vars(ngx_conf_t *cf, ngx_http_meter_t *m,
    ngx_str_t *s);
static char *ngx_http_meter_read_secret(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_str_t *file, ngx_str_t *secret);
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
    NULL,                                  /* preconfiguration */
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


static ngx_http_meter_worker_t  *ngx_http_meter_worker;

/* "meter off": no meter, and no fall back to another location's */
static ngx_array_t  ngx_http_meter_off;

/* ngx_http_rewrite_module's ctx_index, to find "return" (or unset) */
static ngx_uint_t  ngx_http_meter_rewrite_index = NGX_CONF_UNSET_UINT;


/* the request path */

/*
 * One billing decision per client call.  The log phase runs once for a
 * call, after its internal redirects, in the location that answered it;
 * when that location has no meter at all, the meters of the location the
 * call came from apply (an error_page target is rarely metered).  A
 * subrequest (auth_request, mirror, SSI, addition) is not a call: nginx
 * runs its log phase only with log_subrequest on, and even then only
 * meters with subrequests=on count it.
 */

static ngx_int_t
ngx_http_meter_log_handler(ngx_http_request_t *r)
{
    uint32_t                    method;
    ngx_str_t                   key;
    ngx_uint_t                  i, status, sub;
    ngx_array_t                *meters;
    ngx_shm_zone_t             *keyed;
    ngx_http_meter_t           *m;
    ngx_http_meter_req_ctx_t   *rctx;
    ngx_http_meter_zone_ctx_t  *ctx;
    ngx_http_meter_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);
    meters = mlcf->meters;

    rctx = ngx_http_meter_req_ctx_find(r);

    if (rctx != NULL && rctx->unbilled) {
        return NGX_OK;
    }

    if (meters == NULL) {
        if (rctx == NULL || rctx->meters == NULL) {
            return NGX_OK;
        }

        meters = rctx->meters;
    }

    /* "meter off" */
    if (meters->nelts == 0) {
        return NGX_OK;
    }

    sub = (r != r->main);

    /* the status the access log shows */
    if (r->err_status) {
        status = r->err_status;

    } else if (r->headers_out.status) {
        status = r->headers_out.status;

    } else if (r->http_version == NGX_HTTP_VERSION_9) {
        status = 9;

    } else {
        status = 0;
    }

    /* meter_core's method bits are nginx's own (checked at start) */
    method = (uint32_t) r->method;

    /* the key is evaluated and hashed once per zone, not once per meter */
    keyed = NULL;
    rctx = NULL;

    m = meters->elts;

    for (i = 0; i < meters->nelts; i++) {

        if (sub && !m[i].subrequests) {
            continue;
        }

        if (m[i].shm_zone != keyed) {
            keyed = m[i].shm_zone;
            ctx = keyed->data;
            rctx = NULL;

            if (ngx_http_complex_value(r, &ctx->key, &key) != NGX_OK) {
                return NGX_OK;
            }

            if (key.len) {
                rctx = ngx_http_meter_req_ctx(r, keyed, &key);
                if (rctx == NULL) {
                    return NGX_OK;
                }
            }
        }

        if (rctx == NULL) {
            continue;
        }

        if (ngx_http_meter_count(r, &m[i], rctx, status, method) != NGX_OK) {
            return NGX_OK;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_count(ngx_http_request_t *r, ngx_http_meter_t *m,
    ngx_http_meter_req_ctx_t *rctx, ngx_uint_t status, uint32_t method)
{
    time_t                      now;
    uint32_t                    j;
    uint64_t                    value, last;
    ngx_str_t                   v;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_gov_key_t   *k;
    ngx_http_meter_gov_cust_t  *cust;
    ngx_http_meter_gov_snap_t  *snap;
    ngx_http_meter_zone_ctx_t  *ctx;
    ngx_http_meter_gov_zone_t  *gz;
    ngx_http_meter_main_conf_t *mcf;

    if (!meter_status_match(&m->status, status)) {
        return NGX_OK;
    }

    if (m->methods && (m->methods & method) == 0) {
        return NGX_OK;
    }

    ctx = m->shm_zone->data;
    sh = ctx->sh;

    if (m->vars) {
        ngx_http_meter_fresh_vars(r, m->vars);
    }

    if (m->filter) {
        if (ngx_http_complex_value(r, m->filter, &v) != NGX_OK) {
            return NGX_ERROR;
        }

        if (v.len == 0 || (v.len == 1 && v.data[0] == '0')) {
            return NGX_OK;
        }
    }

    value = 1;

    if (m->value) {
        if (ngx_http_complex_value(r, m->value, &v) != NGX_OK) {
            return NGX_ERROR;
        }

        if (meter_parse_value((const char *) v.data, v.len, &value) != 0) {
            (void) __atomic_fetch_add(&sh->value_errors, 1,
                                      __ATOMIC_RELAXED);
            return NGX_OK;
        }
    }

    now = ngx_time();

    /*
     * Prepaid credit: what this node counts draws the balance down now.
     * A request that outlived a refresh must not write into a copy that
     * may be recycled: find its customer again in the current one.
     */
    cust = NULL;

    if (rctx->cust != NULL) {
        mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);
        gz = mcf->gov_zone->data;
        snap = __atomic_load_n(&gz->sh->snap, __ATOMIC_ACQUIRE);

        if (snap == rctx->snap) {
            cust = rctx->cust;

        } else if (snap != NULL) {
            k = ngx_http_meter_gov_find(snap, rctx->hash);
            cust = (k != NULL) ? &snap->custs[k->cust - 1] : NULL;
        }
    }

    if (cust != NULL) {
        for (j = 0; j < cust->ncredits; j++) {
            if (ngx_strncmp(cust->credits[j].meter, m->name.data,
                            m->name.len) == 0
                && (m->name.len == METER_NAME_MAX
                    || cust->credits[j].meter[m->name.len] == '\0'))
            {
                (void) __atomic_fetch_add(&cust->credits[j].local,
                                          (int64_t) value, __ATOMIC_RELAXED);
            }
        }
    }

    if (meter_table_add(&sh->table, meter_hour(r->start_sec), rctx->hash,
                        (const char *) m->name.data, m->name.len, value,
                        (uint32_t) now)
        == 0)
    {
        return NGX_OK;
    }

    /* zone full: counted in "dropped" by the table, logged once a period */

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    last = __atomic_load_n(&sh->dropped_logged, __ATOMIC_RELAXED);

    if ((ngx_msec_t) ((uint64_t) now - last) * 1000
        >= ngx_max(mcf->flush_interval, 1000)
        && __atomic_compare_exchange_n(&sh->dropped_logged, &last,
                                       (uint64_t) now,
                                       0, __ATOMIC_RELAXED,
                                       __ATOMIC_RELAXED))
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "meter_zone \"%V\" is full, %uL calls not counted "
                      "so far; increase its size",
                      &m->shm_zone->shm.name,
                      (uint64_t) __atomic_load_n(&sh->table.dropped,
                                                 __ATOMIC_RELAXED));
    }

    return NGX_OK;
}


/*
 * A variable read before the log phase (add_header $bytes_sent, a
 * subrequest, an earlier meter) keeps the value it had then: nginx caches
 * it in r->variables.  Bill what the log module would log: read them
 * afresh.  Variables that "set" and other directives write are left alone,
 * their value is what was written.
 */

static void
ngx_http_meter_fresh_vars(ngx_http_request_t *r, ngx_array_t *vars)
{
    ngx_uint_t                  i, *index;
    ngx_http_variable_t        *v;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_core_module);
    v = cmcf->variables.elts;
    index = vars->elts;

    for (i = 0; i < vars->nelts; i++) {
        if (v[index[i]].flags & NGX_HTTP_VAR_CHANGEABLE) {
            continue;
        }

        r->variables[index[i]].valid = 0;
        r->variables[index[i]].not_found = 0;
    }
}


/* status */

typedef struct {
    const char                  *name;
    const char                  *help;
    const char                  *type;
} ngx_http_meter_stat_t;


static ngx_http_meter_stat_t  ngx_http_meter_stats[] = {
    { "keys", "Counters in use.", "gauge" },
    { "slots", "Counter slots in the zone.", "gauge" },
    { "shm_bytes", "Zone size in bytes.", "gauge" },
    { "shm_used", "Zone bytes in use.", "gauge" },
    { "shm_free", "Zone bytes free.", "gauge" },
    { "pending", "Units counted and not yet confirmed by Redis.", "gauge" },
    { "flushed_total", "Units confirmed by Redis.", "counter" },
    { "flushes", "Completed flush passes.", "counter" },
    { "flush_errors", "Failed flush batches.", "counter" },
    { "last_flush_ms", "Duration of the last flush pass.", "gauge" },
    { "redis_connected", "This worker's Redis connection is up.", "gauge" },
    { "dropped", "Calls not counted because the zone was full.", "counter" },
    { "dropped_value", "Units not counted because the zone was full.",
      "counter" },
    { "value_errors", "Meter values that were not an integer.", "counter" },
    { "gov_customers_delinquent", "Customers marked delinquent.", "gauge" },
    { "gov_keys_blocked", "Keys refused at the last refresh.", "gauge" },
    { "gov_refreshed", "Unix time of the last governance refresh.",
      "gauge" },
    { "gov_refresh_age", "Seconds since the last governance refresh.",
      "gauge" },
    { "gov_denied_invoice_overdue", "Requests refused: invoice overdue.",
      "counter" },
    { "gov_denied_credit_exhausted", "Requests refused: credit used up.",
      "counter" },
    { "gov_denied_unknown_key", "Requests refused: missing, unknown or "
      "revoked key.", "counter" },
    { "gov_denied_redis_down", "Requests refused: state unavailable.",
      "counter" }
};

#define NGX_HTTP_METER_NSTATS                                                 \
    (sizeof(ngx_http_meter_stats) / sizeof(ngx_http_meter_stat_t))
#define NGX_HTTP_METER_STAT_CONNECTED  10


static void
ngx_http_meter_collect_stats(ngx_shm_zone_t *zone, ngx_shm_zone_t *gov_zone,
    ngx_uint_t connected, uint64_t *v)
{
    uint32_t                     i;
    uint64_t                     pending, nfree;
    meter_table_t               *t;
    ngx_http_meter_shctx_t      *sh;
    ngx_http_meter_zone_ctx_t   *ctx;
    ngx_http_meter_gov_shctx_t  *gsh;

    ctx = zone->data;
    sh = ctx->sh;
    t = &sh->table;

    pending = 0;

    for (i = 0; i < t->nslots; i++) {
        if (__atomic_load_n(&t->slots[i].state, __ATOMIC_ACQUIRE)
            == METER_SLOT_LIVE)
        {
            pending += meter_entry_pending(&t->slots[i]);
        }
    }

    nfree = (uint64_t) ctx->shpool->pfree * ngx_pagesize;

    v[0] = __atomic_load_n(&t->live, __ATOMIC_RELAXED);
    v[1] = t->nslots;
    v[2] = zone->shm.size;
    v[3] = zone->shm.size - nfree;
    v[4] = nfree;
    v[5] = pending;
    v[6] = __atomic_load_n(&sh->flushed_total, __ATOMIC_RELAXED);
    v[7] = __atomic_load_n(&sh->flushes, __ATOMIC_RELAXED);
    v[8] = __atomic_load_n(&sh->flush_errors, __ATOMIC_RELAXED);
    v[9] = __atomic_load_n(&sh->last_flush_ms, __ATOMIC_RELAXED);
    v[10] = connected;
    v[11] = __atomic_load_n(&t->dropped, __ATOMIC_RELAXED);
    v[12] = __atomic_load_n(&t->dropped_value, __ATOMIC_RELAXED);
    v[13] = __atomic_load_n(&sh->value_errors, __ATOMIC_RELAXED);
    /* the node's governance state, shown with each zone it gates */
    gsh = (ctx->governance && gov_zone != NULL)
          ? ((ngx_http_meter_gov_zone_t *) gov_zone->data)->sh : NULL;

    v[14] = gsh ? __atomic_load_n(&gsh->delinquent, __ATOMIC_RELAXED) : 0;
    v[15] = gsh ? __atomic_load_n(&gsh->blocked, __ATOMIC_RELAXED) : 0;
    v[16] = gsh ? __atomic_load_n(&gsh->refreshed, __ATOMIC_RELAXED) : 0;
    v[17] = v[16] ? (uint64_t) ngx_time() - v[16] : 0;
    v[18] = __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_OVERDUE],
                            __ATOMIC_RELAXED);
    v[19] = __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_CREDIT],
                            __ATOMIC_RELAXED);
    v[20] = __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_UNKNOWN],
                            __ATOMIC_RELAXED);
    v[21] = __atomic_load_n(&sh->gov_denied[NGX_HTTP_METER_DENY_DOWN],
                            __ATOMIC_RELAXED);
}


static ngx_int_t
ngx_http_meter_status_handler(ngx_http_request_t *r)
{
    size_t                       size;
    uint64_t                    *v;
    ngx_int_t                    rc;
    ngx_buf_t                   *b;
    ngx_uint_t                   z, i, n, connected;
    ngx_chain_t                  out;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_loc_conf_t   *mlcf;
    ngx_http_meter_main_conf_t  *mcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);
    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);

    zones = mcf->zones.elts;
    n = NGX_HTTP_METER_NSTATS;

    connected = (ngx_http_meter_worker
                 && ngx_http_meter_worker->state
                    == NGX_HTTP_METER_REDIS_READY);

    v = ngx_palloc(r->pool, sizeof(uint64_t) * n * (mcf->zones.nelts + 1));
    if (v == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    for (z = 0; z < mcf->zones.nelts; z++) {
        ngx_http_meter_collect_stats(zones[z], mcf->gov_zone, connected,
                                     &v[z * n]);
    }

    size = sizeof("{\"version\":1,\"zones\":[]}\n");

    for (i = 0; i < n; i++) {
        size += 2 * ngx_strlen(ngx_http_meter_stats[i].name)
                + ngx_strlen(ngx_http_meter_stats[i].help)
                + sizeof("# HELP nginx_meter_ \n# TYPE nginx_meter_ counter\n");

        for (z = 0; z < mcf->zones.nelts; z++) {
            size += sizeof("nginx_meter_{zone=\"\"} \n") + NGX_INT64_LEN
                    + ngx_strlen(ngx_http_meter_stats[i].name)
                    + zones[z]->shm.name.len;
        }
    }

    for (z = 0; z < mcf->zones.nelts; z++) {
        size += sizeof(",{\"name\":\"\"}") + zones[z]->shm.name.len;
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (mlcf->status == NGX_HTTP_METER_STATUS_JSON) {
        b->last = ngx_cpymem(b->last, "{\"version\":1,\"zones\":[",
                             sizeof("{\"version\":1,\"zones\":[") - 1);

        for (z = 0; z < mcf->zones.nelts; z++) {
            b->last = ngx_sprintf(b->last, "%s{\"name\":\"%V\"",
                                  z ? "," : "", &zones[z]->shm.name);

            for (i = 0; i < n; i++) {
                if (i == NGX_HTTP_METER_STAT_CONNECTED) {
                    b->last = ngx_sprintf(b->last, ",\"%s\":%s",
                                          ngx_http_meter_stats[i].name,
                                          v[z * n + i] ? "true" : "false");
                    continue;
                }

                b->last = ngx_sprintf(b->last, ",\"%s\":%uL",
                                      ngx_http_meter_stats[i].name,
                                      v[z * n + i]);
            }

            *b->last++ = '}';
        }

        b->last = ngx_cpymem(b->last, "]}\n", 3);
        ngx_str_set(&r->headers_out.content_type, "application/json");

    } else {
        /* one group per metric family, as the text format requires */
        for (i = 0; i < n; i++) {
            b->last = ngx_sprintf(b->last,
                                  "# HELP nginx_meter_%s %s\n"
                                  "# TYPE nginx_meter_%s %s\n",
                                  ngx_http_meter_stats[i].name,
                                  ngx_http_meter_stats[i].help,
                                  ngx_http_meter_stats[i].name,
                                  ngx_http_meter_stats[i].type);

            for (z = 0; z < mcf->zones.nelts; z++) {
                b->last = ngx_sprintf(b->last,
                                      "nginx_meter_%s{zone=\"%V\"} %uL\n",
                                      ngx_http_meter_stats[i].name,
                                      &zones[z]->shm.name, v[z * n + i]);
            }
        }

        ngx_str_set(&r->headers_out.content_type,
                    "text/plain; version=0.0.4");
    }

    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* shared memory */

static ngx_int_t
ngx_http_meter_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_meter_zone_ctx_t  *octx = data;

    size_t                      size;
    uint32_t                    nslots;
    uint64_t                    epoch;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_zone_ctx_t  *ctx;

    ctx = shm_zone->data;

    if (octx) {
        if (ctx->key.value.len != octx->key.value.len
            || ngx_strncmp(ctx->key.value.data, octx->key.value.data,
                           ctx->key.value.len)
               != 0)
        {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "meter_zone \"%V\" uses the \"%V\" key "
                          "while previously it used the \"%V\" key",
                          &shm_zone->shm.name, &ctx->key.value,
                          &octx->key.value);
            return NGX_ERROR;
        }

        /* reload: counters and unflushed values carry over */
        ctx->sh = octx->sh;
        ctx->shpool = octx->shpool;

        return NGX_OK;
    }

    ctx->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        ctx->sh = ctx->shpool->data;
        return NGX_OK;
    }

    /* small allocations first: the table then takes what is left */
    size = sizeof(" in meter_zone \"\"") + shm_zone->shm.name.len;

    ctx->shpool->log_ctx = ngx_slab_alloc(ctx->shpool, size);
    if (ctx->shpool->log_ctx == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "meter_zone \"%V\" is too small",
                      &shm_zone->shm.name);
        return NGX_ERROR;
    }

    ngx_sprintf(ctx->shpool->log_ctx, " in meter_zone \"%V\"%Z",
                &shm_zone->shm.name);

    /* the largest table the slab allocator can place; failed tries are
     * expected, so keep them out of the log */
    ctx->shpool->log_nomem = 0;

    size = shm_zone->shm.size;

    nslots = meter_table_slots_for(size - sizeof(ngx_http_meter_shctx_t));

    for ( ;; ) {
        if (nslots < 64) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "meter_zone \"%V\" is too small",
                          &shm_zone->shm.name);
            return NGX_ERROR;
        }

        sh = ngx_slab_alloc(ctx->shpool, sizeof(ngx_http_meter_shctx_t)
                                         + meter_table_size(nslots));
        if (sh != NULL) {
            break;
        }

        nslots -= nslots / 16 + 1;
    }

    ngx_memzero(sh, sizeof(ngx_http_meter_shctx_t));

    if (RAND_bytes((unsigned char *) &epoch, sizeof(epoch)) != 1) {
        epoch = ((uint64_t) ngx_random() << 32) ^ (uint64_t) ngx_random()
                ^ (uint64_t) ngx_time();
    }

    meter_table_init(&sh->table, nslots, epoch);

    ctx->sh = sh;
    ctx->shpool->data = sh;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_gov_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_meter_gov_zone_t  *ogz = data;

    ngx_http_meter_gov_zone_t  *gz;

    gz = shm_zone->data;

    if (ogz) {
        /* reload: the published state stays in force */
        gz->sh = ogz->sh;
        gz->shpool = ogz->shpool;
        return NGX_OK;
    }

    gz->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        gz->sh = gz->shpool->data;
        return NGX_OK;
    }

    gz->shpool->log_ctx = (u_char *) " in meter_governance zone";

    /* a full zone is reported by the refresh itself */
    gz->shpool->log_nomem = 0;

    gz->sh = ngx_slab_calloc(gz->shpool, sizeof(ngx_http_meter_gov_shctx_t));
    if (gz->sh == NULL) {
        return NGX_ERROR;
    }

    gz->shpool->data = gz->sh;

    return NGX_OK;
}


/*
 * One flusher per zone at a time.  The lease is a pid and an expiry in one
 * word, taken with a compare-and-swap; a dead holder's lease just expires.
 */

static ngx_int_t
ngx_http_meter_lease(uint64_t *lease, ngx_msec_t interval)
{
    time_t    now;
    uint64_t  cur, mine, ttl;

    now = ngx_time();
    ttl = ngx_max(interval * 3 / 1000, 5);

    cur = __atomic_load_n(lease, __ATOMIC_ACQUIRE);
    mine = ((uint64_t) ngx_pid << 32) | (uint32_t) (now + ttl);

    if ((cur >> 32) != (uint64_t) ngx_pid
        && (cur & 0xffffffff) >= (uint64_t) now)
    {
        return NGX_DECLINED;
    }

    if (!__atomic_compare_exchange_n(lease, &cur, mine, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    {
        return NGX_DECLINED;
    }

    /* taken over: the last holder may have died with marks in hand */
    return ((cur >> 32) == (uint64_t) ngx_pid) ? NGX_OK : NGX_DONE;
}


static void
ngx_http_meter_lease_release(uint64_t *lease)
{
    uint64_t  cur;

    cur = __atomic_load_n(lease, __ATOMIC_ACQUIRE);

    if ((cur >> 32) == (uint64_t) ngx_pid) {
        (void) __atomic_compare_exchange_n(lease, &cur, 0, 0,
                                           __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
}


/* the flush */

static void
ngx_http_meter_announce(ngx_http_meter_worker_t *w)
{
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    zones = w->mcf->zones.elts;

    for (z = 0; z < w->mcf->zones.nelts; z++) {
        ctx = zones[z]->data;

        if (meter_table_announce(&ctx->sh->table, (uint32_t) ngx_pid) != 0
            && !w->qs_logged)
        {
            w->qs_logged = 1;
            ngx_log_error(NGX_LOG_WARN, w->log, 0,
                          "meter_zone \"%V\": more than %d processes, "
                          "freed slots are reused after %d s only",
                          &zones[z]->shm.name, METER_QS_MAX,
                          METER_TOMB_GRACE);
        }
    }
}


static void
ngx_http_meter_tick(ngx_event_t *ev)
{
    ngx_http_meter_worker_t  *w = ev->data;

    /* outside any add: the slots this worker saw evicted may be reused */
    ngx_http_meter_announce(w);

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        if (!ngx_terminate) {
            /* still serving its last requests: keep announcing */
            ngx_add_timer(&w->tick, w->mcf->flush_interval);
        }

        return;
    }

    if (w->state == NGX_HTTP_METER_REDIS_DOWN) {
        if ((ngx_msec_int_t) (ngx_current_msec - w->next_connect) >= 0) {
            ngx_http_meter_redis_connect(w);
        }

    } else if (w->state == NGX_HTTP_METER_REDIS_READY && !w->pass) {
        w->pass = 1;
        w->zone = 0;
        w->zone_start = ngx_current_msec;
        w->batch.cursor = 0;
        w->batch.wrapped = 0;

        w->zone_mode = 0;
        w->passes++;

        ngx_http_meter_next_slice(w);
    }

    ngx_add_timer(&w->tick, w->mcf->flush_interval);
}


static void
ngx_http_meter_slice_handler(ngx_event_t *ev)
{
    ngx_http_meter_worker_t  *w = ev->data;

    if (w->pass && w->outstanding == 0) {
        ngx_http_meter_next_slice(w);
    }
}


/*
 * Sends the next slice of dirty counters, or moves on to the next zone.
 * A slice scans a bounded number of slots, so a large zone never stalls
 * the event loop: the scan goes on from a posted event.
 */

static void
ngx_http_meter_next_slice(ngx_http_meter_worker_t *w)
{
    time_t                       now;
    uint32_t                     from;
    ngx_int_t                    rc;
    ngx_uint_t                   n;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    zones = w->mcf->zones.elts;

    while (w->zone < w->mcf->zones.nelts) {

        if (w->state != NGX_HTTP_METER_REDIS_READY) {
            w->pass = 0;
            return;
        }

        ctx = zones[w->zone]->data;

        rc = ngx_http_meter_lease(&ctx->sh->lease, w->mcf->flush_interval);

        if (rc == NGX_DECLINED) {
            w->zone++;
            w->zone_mode = 0;
            w->zone_start = ngx_current_msec;
            w->batch.cursor = 0;
            w->batch.wrapped = 0;
            continue;
        }

        if (w->zone_mode == 0) {
            now = ngx_time();
            w->zone_hour = meter_hour(now);
            meter_table_quiesce(&ctx->sh->table, (uint32_t) now);

            /* now and then, after a takeover, and when the hour changed
             * (to free the last hour's slots), look at every slot */
            w->zone_mode = (rc == NGX_DONE
                            || (w->passes - 1)
                               % ngx_max(NGX_HTTP_METER_FULL_EVERY
                                         / w->mcf->flush_interval, 1)
                               == 0
                            || __atomic_load_n(&ctx->sh->table.swept_hour,
                                               __ATOMIC_ACQUIRE)
                               < w->zone_hour)
                           ? 2 : 1;

            if (__atomic_load_n(&ctx->sh->resync, __ATOMIC_ACQUIRE)) {
                w->zone_mode = 3;
            }

            w->batch.all = (w->zone_mode == 3);
        }

        if (w->zone_mode == 1) {
            n = meter_batch_collect_dirty(&ctx->sh->table, &w->batch,
                                          NGX_HTTP_METER_SCAN_WORDS);

        } else {
            from = w->batch.cursor;

            n = meter_batch_collect(&ctx->sh->table, &w->batch,
                                    NGX_HTTP_METER_SCAN);

            /* evict what this slice saw flushed: no stall on a big zone */
            now = ngx_time();
            (void) meter_table_sweep_range(&ctx->sh->table, from,
                                           w->batch.wrapped
                                           ? ctx->sh->table.nslots
                                           : w->batch.cursor,
                                           meter_hour(now), (uint32_t) now);
        }

        if (n > 0) {
            if (ngx_http_meter_send_batch(w, ctx) == NGX_OK) {
                return;
            }

            w->pass = 0;
            return;
        }

        if (w->batch.wrapped) {
            ngx_http_meter_zone_done(w, ctx);
            continue;
        }

        ngx_post_event(&w->slice, &ngx_posted_events);
        return;
    }

    w->pass = 0;
}


/*
 * The commands of one batch (docs/redis-schema.md), for the async flush and
 * the blocking one at exit alike: per hour, the hour and key indexes first
 * (one SADD with every key of the batch), then one max-only script call per
 * counter.  emit() gets the item index for a script call, -1 otherwise.
 */

static ngx_int_t
ngx_http_meter_batch_cmds(meter_batch_t *b, uint64_t epoch, const char *sha,
    ngx_http_meter_emit_pt emit, void *data)
{
    static char          hex[NGX_HTTP_METER_BATCH][METER_HEX_LEN + 1];
    static size_t        slen[2 + NGX_HTTP_METER_BATCH];
    static const char   *sargv[2 + NGX_HTTP_METER_BATCH];

    char                 key[METER_DATA_KEY_SIZE], idx[METER_IDX_KEY_SIZE];
    char                 field[METER_FIELD_SIZE], value[24];
    char                 hour[METER_HOUR_LEN + 1], start[24];
    char                 used[METER_USED_KEY_SIZE];
    size_t               len[7];
    ngx_uint_t           i, j, n;
    const char          *argv[7];
    meter_batch_item_t  *it;

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        for (j = 0; j < i; j++) {
            if (b->items[j].hour == it->hour) {
                break;
            }
        }

        if (j < i) {
            continue;           /* this hour's indexes are sent already */
        }

        argv[0] = "ZADD"; len[0] = 4;
        argv[1] = "mtr:hours"; len[1] = 9;
        argv[2] = "NX"; len[2] = 2;
        argv[3] = start;
        len[3] = meter_fmt_u64(start, meter_hour_start(it->hour));
        argv[4] = hour; len[4] = meter_hour_format(it->hour, hour);

        if (emit(data, 5, argv, len, -1) != NGX_OK) {
            return NGX_ERROR;
        }

        sargv[0] = "SADD"; slen[0] = 4;
        sargv[1] = idx; slen[1] = meter_fmt_idx_key(idx, it->hour);
        n = 2;

        for (j = i; j < b->n; j++) {
            if (b->items[j].hour == it->hour) {
                meter_hex(b->items[j].e->key, METER_HASH_LEN, hex[j]);
                sargv[n] = hex[j];
                slen[n++] = METER_HEX_LEN;
            }
        }

        if (emit(data, (int) n, sargv, slen, -1) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];

        if (sha != NULL) {
            argv[0] = "EVALSHA"; len[0] = 7;
            argv[1] = sha; len[1] = 40;

        } else {
            /* a connection that loaded no script */
            argv[0] = "EVAL"; len[0] = 4;
            argv[1] = meter_script_max; len[1] = ngx_strlen(meter_script_max);
        }

        argv[2] = "2"; len[2] = 1;
        argv[3] = key; len[3] = meter_fmt_data_key(key, it->e->key, it->hour);
        argv[4] = used; len[4] = meter_fmt_used_key(used, it->e->key);
        argv[5] = field;
        len[5] = meter_fmt_field(field, it->e->meter, epoch, it->gen);
        argv[6] = value; len[6] = meter_fmt_u64(value, it->value);

        if (emit(data, 7, argv, len, (ngx_int_t) i) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_emit_async(void *data, int argc, const char **argv,
    const size_t *len, ngx_int_t item)
{
    ngx_http_meter_worker_t  *w = data;

    if (redisAsyncCommandArgv(w->ac, item >= 0 ? ngx_http_meter_reply : NULL,
                              (void *) (uintptr_t) item, argc, argv, len)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    if (item >= 0) {
        w->outstanding++;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_emit_sync(void *data, int argc, const char **argv,
    const size_t *len, ngx_int_t item)
{
    ngx_http_meter_sync_t  *sc = data;

    if (redisAppendCommandArgv(sc->rc, argc, argv, len) != REDIS_OK) {
        return NGX_ERROR;
    }

    sc->items[sc->n++] = item;

    return NGX_OK;
}


static ngx_int_t
ngx_http_meter_send_batch(ngx_http_meter_worker_t *w,
    ngx_http_meter_zone_ctx_t *ctx)
{
    size_t       len[3];
    const char  *argv[3];

    w->outstanding = 0;
    w->failed = 0;

    if (w->reload_script) {
        argv[0] = "SCRIPT"; len[0] = 6;
        argv[1] = "LOAD"; len[1] = 4;
        argv[2] = meter_script_max; len[2] = ngx_strlen(meter_script_max);

        if (redisAsyncCommandArgv(w->ac, ngx_http_meter_redis_setup_reply,
                                  w, 3, argv, len)
            != REDIS_OK)
        {
            ngx_http_meter_redis_fail(w, "send", w->ac->errstr);
            return NGX_ERROR;
        }

        w->reload_script = 0;
    }

    if (ngx_http_meter_batch_cmds(&w->batch, ctx->sh->table.epoch,
                                w->script_sha, ngx_http_meter_emit_async, w)
        != NGX_OK)
    {
        goto failed;
    }

    ngx_add_timer(&w->timeout, w->mcf->redis_timeout);

    return NGX_OK;

failed:

    /* callbacks already queued will be called with no reply */
    meter_batch_remark(&ctx->sh->table, &w->batch);
    w->failed = 1;
    ngx_http_meter_redis_fail(w, "send", w->ac ? w->ac->errstr : "");

    return NGX_ERROR;
}


static void
ngx_http_meter_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    redisReply               *reply = r;
    ngx_http_meter_worker_t  *w = ngx_http_meter_worker;

    if (w == NULL || w->outstanding == 0) {
        return;
    }

    if (reply == NULL) {
        w->failed = 1;

    } else if (reply->type == REDIS_REPLY_ERROR) {
        if (!w->failed) {
            ngx_log_error(NGX_LOG_ERR, w->log, 0,
                          "meter: redis refused a flush: %*s",
                          (int) ngx_min(reply->len, 256), reply->str);
        }

        if (ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            w->reload_script = 1;
        }

        w->failed = 1;

    } else {
        /* acknowledged: only this item's value is known to be in Redis */
        meter_batch_item_t  *it = &w->batch.items[(uintptr_t) privdata];
        ngx_http_meter_shctx_t  *sh;
        ngx_shm_zone_t     **zones = w->mcf->zones.elts;
        uint64_t             before;

        sh = ((ngx_http_meter_zone_ctx_t *) zones[w->zone]->data)->sh;
        before = __atomic_load_n(&it->e->flushed, __ATOMIC_ACQUIRE);

        meter_batch_confirm(it);

        if (it->value > before && it->e->gen == it->gen) {
            (void) __atomic_fetch_add(&sh->flushed_total,
                                      it->value - before, __ATOMIC_RELAXED);
        }
    }

    if (--w->outstanding == 0) {
        ngx_http_meter_batch_done(w);
    }
}


static void
ngx_http_meter_batch_done(ngx_http_meter_worker_t *w)
{
    time_t                       now;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_zone_ctx_t   *ctx;

    if (w->timeout.timer_set) {
        ngx_del_timer(&w->timeout);
    }

    zones = w->mcf->zones.elts;
    ctx = zones[w->zone]->data;

    /* what Redis now holds of past hours frees its slot, in every pass */
    now = ngx_time();
    (void) meter_batch_reclaim(&ctx->sh->table, &w->batch, meter_hour(now),
                               (uint32_t) now);

    if (w->failed) {
        /* unconfirmed values stay pending and go with the next pass */
        meter_batch_remark(&ctx->sh->table, &w->batch);
        (void) __atomic_fetch_add(&ctx->sh->flush_errors, 1,
                                  __ATOMIC_RELAXED);
        w->pass = 0;
        return;
    }

    if (w->batch.wrapped) {
        ngx_http_meter_zone_done(w, ctx);
    }

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        w->pass = 0;
        return;
    }

    /*
     * A pause between sent batches spreads a pass over the interval, so
     * that Redis's work (on the same machine, often) does not come as one
     * burst that competes with the requests.
     */
    ngx_add_timer(&w->slice, NGX_HTTP_METER_SLICE_PAUSE);
}


static void
ngx_http_meter_zone_done(ngx_http_meter_worker_t *w,
    ngx_http_meter_zone_ctx_t *ctx)
{
    if (w->zone_mode == 3) {
        /* every counter reached this Redis */
        __atomic_store_n(&ctx->sh->resync, 0, __ATOMIC_RELEASE);
        w->batch.all = 0;
    }

    if (w->zone_mode >= 2) {
        /* every slot of an hour before zone_hour was looked at */
        __atomic_store_n(&ctx->sh->table.swept_hour, w->zone_hour,
                         __ATOMIC_RELEASE);
    }

    (void) __atomic_fetch_add(&ctx->sh->flushes, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&ctx->sh->last_flush_ms,
                     (uint64_t) (ngx_current_msec - w->zone_start),
                     __ATOMIC_RELAXED);

    w->zone++;
    w->zone_mode = 0;
    w->zone_start = ngx_current_msec;
    w->batch.cursor = 0;
    w->batch.wrapped = 0;
}


static void
ngx_http_meter_timeout_handler(ngx_event_t *ev)
{
    ngx_http_meter_worker_t  *w = ev->data;

    ngx_http_meter_redis_fail(w, w->state == NGX_HTTP_METER_REDIS_CONN
                                 ? "connect" : "command",
                              "timed out");
}


/* redis connection: hiredis' async API on nginx's event loop */

static void
ngx_http_meter_redis_connect(ngx_http_meter_worker_t *w)
{
    char                        *host, *path;
    ngx_connection_t            *c;
    redisAsyncContext           *ac;
    ngx_http_meter_main_conf_t  *mcf;

    mcf = w->mcf;

    if (mcf->redis_path.len) {
        path = (char *) mcf->redis_path.data;
        ac = redisAsyncConnectUnix(path);

    } else {
        host = (char *) mcf->redis_host.data;
        ac = redisAsyncConnect(host, (int) mcf->redis_port);
    }

    if (ac == NULL) {
        ngx_http_meter_redis_fail(w, "connect", "out of memory");
        return;
    }

    if (ac->err) {
        ngx_http_meter_redis_fail(w, "connect", ac->errstr);
        redisAsyncFree(ac);
        return;
    }

    c = ngx_get_connection(ac->c.fd, w->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        ngx_http_meter_redis_fail(w, "connect", "no free connection");
        return;
    }

    c->data = ac;
    c->read->log = w->log;
    c->write->log = w->log;

    ac->data = w;
    ac->ev.data = c;
    ac->ev.addRead = ngx_http_meter_redis_add_read;
    ac->ev.delRead = ngx_http_meter_redis_del_read;
    ac->ev.addWrite = ngx_http_meter_redis_add_write;
    ac->ev.delWrite = ngx_http_meter_redis_del_write;
    ac->ev.cleanup = ngx_http_meter_redis_cleanup;

    w->ac = ac;
    w->state = NGX_HTTP_METER_REDIS_CONN;

    redisAsyncSetConnectCallback(ac, ngx_http_meter_redis_connected);
    redisAsyncSetDisconnectCallback(ac, ngx_http_meter_redis_disconnected);

    /* the non-blocking connect completes on the first write event */
    ngx_http_meter_redis_add_write(c);

    ngx_add_timer(&w->timeout, mcf->redis_timeout);
}


static void
ngx_http_meter_redis_connected(const redisAsyncContext *cac, int status)
{
    char                        db[24];
    size_t                      len[3];
    const char                 *argv[3];
    redisAsyncContext          *ac = (redisAsyncContext *) cac;
    ngx_http_meter_worker_t    *w = ac->data;
    ngx_http_meter_main_conf_t *mcf;

    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback */
        w->ac = NULL;
        ngx_http_meter_redis_fail(w, "connect", ac->errstr);
        return;
    }

    mcf = w->mcf;

    if (mcf->redis_password.len) {
        argv[0] = "AUTH"; len[0] = 4;
        argv[1] = (char *) mcf->redis_password.data;
        len[1] = mcf->redis_password.len;
        (void) redisAsyncCommandArgv(ac, ngx_http_meter_redis_setup_reply, w,
                                     2, argv, len);
    }

    if (mcf->redis_db) {
        argv[0] = "SELECT"; len[0] = 6;
        argv[1] = db; len[1] = meter_fmt_u64(db, (uint64_t) mcf->redis_db);
        (void) redisAsyncCommandArgv(ac, ngx_http_meter_redis_setup_reply, w,
                                     2, argv, len);
    }

    /* queued before any EVALSHA, so the script exists when they run */
    w->reload_script = 1;

    argv[0] = "INFO"; len[0] = 4;
    argv[1] = "server"; len[1] = 6;
    (void) redisAsyncCommandArgv(ac, ngx_http_meter_redis_info_reply, w, 2,
                                 argv, len);

    if (w->timeout.timer_set) {
        ngx_del_timer(&w->timeout);
    }

    w->state = NGX_HTTP_METER_REDIS_READY;
    w->backoff = 0;

    /* a new connection may see a new state: refresh now */
    if (w->gov_tick.timer_set) {
        ngx_del_timer(&w->gov_tick);
        ngx_add_timer(&w->gov_tick, 1);
    }

    if (w->down_logged) {
        ngx_log_error(NGX_LOG_NOTICE, w->log, 0,
                      "meter: redis connection restored");
        w->down_logged = 0;
    }
}


/* compares the server's run_id with the one each zone last flushed to */

static void
ngx_http_meter_redis_info_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                  *reply = r;
    u_char                      *p, *end;
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_shctx_t      *sh;
    ngx_http_meter_worker_t     *w = privdata;

    if (reply == NULL || reply->type != REDIS_REPLY_STRING) {
        return;
    }

    p = (u_char *) ngx_strnstr((u_char *) reply->str, "run_id:",
                               reply->len);
    if (p == NULL) {
        return;
    }

    p += sizeof("run_id:") - 1;
    end = (u_char *) reply->str + reply->len;

    if (end - p < 40) {
        return;
    }

    zones = w->mcf->zones.elts;

    for (z = 0; z < w->mcf->zones.nelts; z++) {
        sh = ((ngx_http_meter_zone_ctx_t *) zones[z]->data)->sh;

        if (!ngx_trylock(&sh->run_id_lock)) {
            continue;               /* another worker is at it */
        }

        if (ngx_memcmp(sh->run_id, p, 40) != 0) {
            if (sh->run_id[0] != '\0') {
                ngx_log_error(NGX_LOG_NOTICE, w->log, 0,
                              "meter: redis was restarted or replaced; "
                              "rewriting every counter of meter_zone "
                              "\"%V\"", &zones[z]->shm.name);
                __atomic_store_n(&sh->resync, 1, __ATOMIC_RELEASE);
            }

            ngx_memcpy(sh->run_id, p, 40);
        }

        ngx_unlock(&sh->run_id_lock);
    }
}


static void
ngx_http_meter_redis_setup_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply               *reply = r;
    ngx_http_meter_worker_t  *w = privdata;

    if (reply == NULL) {
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, w->log, 0,
                      "meter: redis setup failed: %*s",
                      (int) ngx_min(reply->len, 256), reply->str);

        /* AUTH/SELECT/SCRIPT LOAD refused: the flushes would fail too */
        w->failed = 1;
        redisAsyncDisconnect(ac);
        return;
    }
}


static void
ngx_http_meter_redis_disconnected(const redisAsyncContext *ac, int status)
{
    ngx_http_meter_worker_t  *w = ac->data;

    /* hiredis frees the context after this callback */
    w->ac = NULL;

    if (status == REDIS_OK && (ngx_exiting || ngx_quit || ngx_terminate)) {
        w->state = NGX_HTTP_METER_REDIS_DOWN;
        return;
    }

    ngx_http_meter_redis_fail(w, "connection",
                              ac->errstr[0] ? ac->errstr : "closed");
}


/*
 * Marks the connection down, drops it, and schedules a reconnect with
 * exponential backoff.  Logged once per outage, not per attempt.
 */

static void
ngx_http_meter_redis_fail(ngx_http_meter_worker_t *w, const char *why,
    const char *err)
{
    redisAsyncContext  *ac;

    if (!w->down_logged) {
        ngx_log_error(NGX_LOG_ERR, w->log, 0,
                      "meter: redis %s failed: %s; counters are kept in "
                      "shared memory and retried",
                      why, err ? err : "");
        w->down_logged = 1;
    }

    if (w->timeout.timer_set) {
        ngx_del_timer(&w->timeout);
    }

    w->state = NGX_HTTP_METER_REDIS_DOWN;
    w->pass = 0;

    w->backoff = w->backoff ? ngx_min(w->backoff * 2,
                                      NGX_HTTP_METER_BACKOFF_MAX)
                            : NGX_HTTP_METER_BACKOFF_MIN;
    w->next_connect = ngx_current_msec + w->backoff;

    ac = w->ac;

    if (ac != NULL) {
        w->ac = NULL;
        ac->data = w;

        /* pending callbacks run now, with no reply: the batch fails */
        redisAsyncSetDisconnectCallback(ac, NULL);
        redisAsyncFree(ac);
    }

    if (w->outstanding) {
        w->outstanding = 0;
        w->failed = 1;
    }

    w->gov_busy = 0;
}


static void
ngx_http_meter_redis_read(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;

    redisAsyncHandleRead(c->data);
}


static void
ngx_http_meter_redis_write(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;

    redisAsyncHandleWrite(c->data);
}


/* level-triggered: hiredis reads at most 16k a call; the rest waits */

static void
ngx_http_meter_watch(ngx_event_t *ev, ngx_int_t event,
    ngx_event_handler_pt handler)
{
    ev->handler = handler;

    if (!ev->active && ngx_add_event(ev, event, NGX_LEVEL_EVENT) != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0,
                      "meter: cannot watch the redis socket");
    }
}


static void
ngx_http_meter_unwatch(ngx_event_t *ev, ngx_int_t event)
{
    if (ev->active) {
        (void) ngx_del_event(ev, event, 0);
    }
}


static void
ngx_http_meter_redis_add_read(void *privdata)
{
    ngx_connection_t  *c = privdata;

    ngx_http_meter_watch(c->read, NGX_READ_EVENT, ngx_http_meter_redis_read);
}


static void
ngx_http_meter_redis_del_read(void *privdata)
{
    ngx_connection_t  *c = privdata;

    ngx_http_meter_unwatch(c->read, NGX_READ_EVENT);
}


static void
ngx_http_meter_redis_add_write(void *privdata)
{
    ngx_connection_t  *c = privdata;

    ngx_http_meter_watch(c->write, NGX_WRITE_EVENT,
                         ngx_http_meter_redis_write);
}


static void
ngx_http_meter_redis_del_write(void *privdata)
{
    ngx_connection_t  *c = privdata;

    ngx_http_meter_unwatch(c->write, NGX_WRITE_EVENT);
}


/* hiredis closes the socket itself: release the connection, not the fd */

static void
ngx_http_meter_redis_cleanup(void *privdata)
{
    ngx_connection_t  *c = privdata;

    if (c == NULL) {
        return;
    }

    ngx_http_meter_redis_del_read(c);
    ngx_http_meter_redis_del_write(c);

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    c->read->closed = 1;
    c->write->closed = 1;

    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;
}


/*
 * On exit nothing drives the event loop any more: one last blocking
 * pipeline with the same commands and the same max-only script.  What it
 * cannot send stays in the zone, which outlives a reload.
 */

static void
ngx_http_meter_final_flush(ngx_http_meter_main_conf_t *mcf, ngx_log_t *log)
{
    char                        db[24];
    size_t                      len[2];
    uint64_t                    before;
    ngx_uint_t                  z, i, n, sent, ok;
    const char                 *argv[2];
    redisReply                 *reply;
    struct timeval              tv;
    redisContext               *rc;
    meter_batch_t               batch;
    meter_batch_item_t         *items, *it;
    ngx_http_meter_sync_t       sc;
    ngx_shm_zone_t            **zones;
    ngx_http_meter_shctx_t     *sh;
    ngx_http_meter_zone_ctx_t  *ctx;

    tv.tv_sec = mcf->redis_timeout / 1000;
    tv.tv_usec = (mcf->redis_timeout % 1000) * 1000;

    if (mcf->redis_path.len) {
        rc = redisConnectUnixWithTimeout((char *) mcf->redis_path.data, tv);

    } else {
        rc = redisConnectWithTimeout((char *) mcf->redis_host.data,
                                     (int) mcf->redis_port, tv);
    }

    if (rc == NULL || rc->err) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "meter: final flush: redis unreachable (%s); counters "
                      "stay in shared memory",
                      rc ? rc->errstr : "out of memory");
        goto done;
    }

    (void) redisSetTimeout(rc, tv);

    if (mcf->redis_password.len) {
        argv[0] = "AUTH"; len[0] = 4;
        argv[1] = (char *) mcf->redis_password.data;
        len[1] = mcf->redis_password.len;
        redisAppendCommandArgv(rc, 2, argv, len);
    }

    if (mcf->redis_db) {
        argv[0] = "SELECT"; len[0] = 6;
        argv[1] = db; len[1] = meter_fmt_u64(db, (uint64_t) mcf->redis_db);
        redisAppendCommandArgv(rc, 2, argv, len);
    }

    n = (mcf->redis_password.len ? 1 : 0) + (mcf->redis_db ? 1 : 0);

    for (i = 0; i < n; i++) {
        if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
            goto done;
        }

        ok = (reply->type != REDIS_REPLY_ERROR);
        freeReplyObject(reply);

        if (!ok) {
            ngx_log_error(NGX_LOG_WARN, log, 0,
                          "meter: final flush: redis refused AUTH/SELECT");
            goto done;
        }
    }

    items = ngx_alloc(sizeof(meter_batch_item_t) * NGX_HTTP_METER_BATCH,
                      log);
    if (items == NULL) {
        goto done;
    }

    zones = mcf->zones.elts;

    for (z = 0; z < mcf->zones.nelts; z++) {
        ctx = zones[z]->data;
        sh = ctx->sh;

        ngx_memzero(&batch, sizeof(meter_batch_t));
        batch.items = items;
        batch.cap = NGX_HTTP_METER_BATCH;

        while (!batch.wrapped) {
            if (meter_batch_collect(&sh->table, &batch, sh->table.nslots)
                == 0)
            {
                continue;
            }

            sc.rc = rc;
            sc.n = 0;

            if (ngx_http_meter_batch_cmds(&batch, sh->table.epoch, NULL,
                                        ngx_http_meter_emit_sync, &sc)
                != NGX_OK)
            {
                ngx_free(items);
                goto done;
            }

            sent = 0;

            for (i = 0; i < sc.n; i++) {
                if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
                    ngx_log_error(NGX_LOG_WARN, log, 0,
                                  "meter: final flush: %s; counters stay "
                                  "in shared memory", rc->errstr);
                    ngx_free(items);
                    goto done;
                }

                ok = (reply->type != REDIS_REPLY_ERROR);
                freeReplyObject(reply);

                if (sc.items[i] < 0 || !ok) {
                    continue;
                }

                it = &batch.items[sc.items[i]];
                before = __atomic_load_n(&it->e->flushed, __ATOMIC_ACQUIRE);

                meter_batch_confirm(it);

                if (it->value > before && it->e->gen == it->gen) {
                    (void) __atomic_fetch_add(&sh->flushed_total,
                                              it->value - before,
                                              __ATOMIC_RELAXED);
                }

                sent++;
            }

            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, log, 0,
                           "meter: final flush sent %ui of %ui",
                           sent, batch.n);
        }
    }

    ngx_free(items);

done:

    if (rc) {
        redisFree(rc);
    }
}


/* governance: the request side */

/*
 * The rewrite phase of every location a call passes, before the rewrite
 * module's script ("rewrite ... last" leaves in it): remembers the
 * location's meters for the log phase, in case the call ends where
 * nothing meters.
 */

static ngx_int_t
ngx_http_meter_rewrite_handler(ngx_http_request_t *r)
{
    ngx_http_meter_req_ctx_t   *rctx;
    ngx_http_meter_loc_conf_t  *mlcf;

    mlcf = ngx_http_get_module_loc_conf(r, ngx_http_meter_module);

    if (mlcf->meters == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    rctx = ngx_http_meter_req_ctx_get(r);
    if (rctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rctx->meters = mlcf->meters;

    return NGX_DECLINED;
}


/*
 * The access phase of every location a call passes (nginx skips it for
 * subrequests): gates the call at the first governed location.  A call is gated once:
 * an internal redirect after the decision (error_page of the refusal
 * itself, try_files, rewrite ... last) is not gated again, while a call
 * that reaches a governed location through error_page before any gate
 * ran (an error of the rewrite phase) is gated there.
 */

static ngx_int_t
ngx_http_meter_access_handler(ngx_http_request_t *r)
{
    time_t                      now, since;
    int64_t                     left;
    uint32_t                    i;
    ngx_str_t                   key;
    ngx_uint_t                  j;
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

    rctx = ngx_http_meter_req_ctx_get(r);
    if (rctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rctx->gated) {
        return NGX_DECLINED;
    }

    rctx->gated = 1;

    ctx = gcf->shm_zone->data;
    sh = ctx->sh;

    if (ctx->key_header.len
        && ngx_http_meter_key_headers(r, &ctx->key_header) > 1)
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

    if (ngx_http_complex_value(r, &ctx->key, &key) != NGX_OK) {
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

    mcf = ngx_http_get_module_main_conf(r, ngx_http_meter_module);
    gz = mcf->gov_zone->data;

    snap = __atomic_load_n(&gz->sh->snap, __ATOMIC_ACQUIRE);

    k = (snap != NULL) ? ngx_http_meter_gov_find(snap, rctx->hash) : NULL;

    if (k == NULL) {
        /* never seen: without Redis nobody can say who this is */
        if (snap == NULL
            || ngx_http_meter_worker == NULL
            || ngx_http_meter_worker->state != NGX_HTTP_METER_REDIS_READY)
        {
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

    return NGX_DECLINED;
}


static ngx_http_meter_req_ctx_t *
ngx_http_meter_req_ctx(ngx_http_request_t *r, ngx_shm_zone_t *zone,
    ngx_str_t *key)
{
    ngx_http_meter_req_ctx_t  *rctx;

    rctx = ngx_http_meter_req_ctx_get(r);

    if (rctx != NULL) {
        ngx_http_meter_req_ctx_hash(rctx, zone, key);
    }

    return rctx;
}


static void
ngx_http_meter_req_ctx_hash(ngx_http_meter_req_ctx_t *rctx,
    ngx_shm_zone_t *zone, ngx_str_t *key)
{
    if (rctx->zone != zone) {
        meter_key_hash(key->data, key->len, rctx->hash);
        rctx->zone = zone;
        rctx->cust = NULL;
    }
}


/* marks our context among the request pool's cleanups; it does nothing */

static void
ngx_http_meter_req_ctx_cleanup(void *data)
{
}


/* the context, after an internal redirect cleared r->ctx too */

static ngx_http_meter_req_ctx_t *
ngx_http_meter_req_ctx_find(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t        *cln;
    ngx_http_meter_req_ctx_t  *rctx;

    rctx = ngx_http_get_module_ctx(r, ngx_http_meter_module);

    if (rctx != NULL) {
        return rctx;
    }

    for (cln = r->pool->cleanup; cln != NULL; cln = cln->next) {
        if (cln->handler == ngx_http_meter_req_ctx_cleanup) {
            rctx = cln->data;

            if (rctx->r == r) {
                ngx_http_set_ctx(r, rctx, ngx_http_meter_module);
                return rctx;
            }
        }
    }

    return NULL;
}


static ngx_http_meter_req_ctx_t *
ngx_http_meter_req_ctx_get(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t        *cln;
    ngx_http_meter_req_ctx_t  *rctx;

    rctx = ngx_http_meter_req_ctx_find(r);

    if (rctx != NULL) {
        return rctx;
    }

    cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_meter_req_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    rctx = cln->data;
    ngx_memzero(rctx, sizeof(ngx_http_meter_req_ctx_t));
    rctx->r = r;

    cln->handler = ngx_http_meter_req_ctx_cleanup;

    ngx_http_set_ctx(r, rctx, ngx_http_meter_module);

    return rctx;
}


/* how many request headers the key variable $http_NAME reads from */

static ngx_uint_t
ngx_http_meter_key_headers(ngx_http_request_t *r, ngx_str_t *name)
{
    u_char            ch, nc;
    ngx_uint_t        i, n, count;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    count = 0;
    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len != name->len) {
            continue;
        }

        /* as ngx_http_variable_unknown_header() compares names */
        for (n = 0; n < name->len; n++) {
            ch = h[i].key.data[n];

            if (ch >= 'A' && ch <= 'Z') {
                ch |= 0x20;

            } else if (ch == '-') {
                ch = '_';
            }

            /* variable names are not case sensitive */
            nc = name->data[n];

            if (nc >= 'A' && nc <= 'Z') {
                nc |= 0x20;
            }

            if (nc != ch) {
                break;
            }
        }

        if (n == name->len) {
            count++;
        }
    }

    return count;
}


static ngx_http_meter_gov_key_t *
ngx_http_meter_gov_find(ngx_http_meter_gov_snap_t *snap, uint8_t *hash)
{
    uint32_t                   i, n;
    ngx_http_meter_gov_key_t  *k;

    ngx_memcpy(&i, hash, sizeof(uint32_t));

    for (n = 0; n <= snap->mask; n++) {
        k = &snap->keys[(i + n) & snap->mask];

        if (k->cust == 0) {
            return NULL;
        }

        if (ngx_memcmp(k->key, hash, METER_HASH_LEN) == 0) {
            return k;
        }
    }

    return NULL;
}


/*
 * The refusal: an RFC 9457 problem body, unless the configuration has an
 * error_page for the status, which nginx then serves as usual.
 */

static ngx_int_t
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

    (void) __atomic_fetch_add(&sh->gov_denied[why], 1, __ATOMIC_RELAXED);

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

    if (clcf->error_pages) {
        err_page = clcf->error_pages->elts;

        for (i = 0; i < clcf->error_pages->nelts; i++) {
            if ((ngx_uint_t) err_page[i].status == status) {
                return status;
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


/* governance: the refresh, through the flush's Redis connection */

static void
ngx_http_meter_gov_tick(ngx_event_t *ev)
{
    size_t                      len[2];
    const char                 *argv[2];
    ngx_http_meter_worker_t    *w = ev->data;
    ngx_http_meter_gov_zone_t  *gz;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    ngx_add_timer(&w->gov_tick, w->mcf->gov_refresh);

    if (w->state == NGX_HTTP_METER_REDIS_READY && w->gov_busy
        && ngx_current_msec - w->gov_started > w->mcf->redis_timeout)
    {
        /* a Redis that stopped answering: drop the connection */
        ngx_http_meter_redis_fail(w, "governance refresh", "timed out");
        return;
    }

    if (w->state != NGX_HTTP_METER_REDIS_READY || w->gov_busy) {
        return;
    }

    /* one refresher per node */
    gz = w->mcf->gov_zone->data;

    if (ngx_http_meter_lease(&gz->sh->lease, w->mcf->gov_refresh)
        == NGX_DECLINED)
    {
        return;
    }

    if (w->gov_tmp) {
        ngx_destroy_pool(w->gov_tmp);
    }

    w->gov_tmp = ngx_create_pool(4096, w->log);
    if (w->gov_tmp == NULL) {
        return;
    }

    if (ngx_array_init(&w->gov_grants, w->gov_tmp, 8,
                       sizeof(ngx_http_meter_gov_grant_t))
        != NGX_OK)
    {
        return;
    }

    w->gov_failed = 0;
    w->gov_busy = 2;
    w->gov_started = ngx_current_msec;

    argv[0] = "GET"; len[0] = 3;
    argv[1] = "mtr:gov:version"; len[1] = sizeof("mtr:gov:version") - 1;
    (void) redisAsyncCommandArgv(w->ac, ngx_http_meter_gov_version_reply, w,
                                 2, argv, len);

    argv[0] = "HGETALL"; len[0] = 7;
    argv[1] = "mtr:gov:credit"; len[1] = sizeof("mtr:gov:credit") - 1;
    (void) redisAsyncCommandArgv(w->ac, ngx_http_meter_gov_credit_reply, w,
                                 2, argv, len);
}


/* a reply ends a stage when it is the stage's last one */

static ngx_int_t
ngx_http_meter_gov_reply_ok(ngx_http_meter_worker_t *w, redisReply *reply,
    int type)
{
    if (reply == NULL) {
        w->gov_failed = 1;
        return NGX_ERROR;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        if (!w->gov_failed) {
            ngx_log_error(NGX_LOG_ERR, w->log, 0,
                          "meter: governance refresh refused: %*s",
                          (int) ngx_min(reply->len, 256), reply->str);
        }

        w->gov_failed = 1;
        return NGX_ERROR;
    }

    if (type != REDIS_REPLY_NIL && reply->type != type
        && reply->type != REDIS_REPLY_NIL)
    {
        w->gov_failed = 1;
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_meter_gov_version_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply               *reply = r;
    ngx_int_t                 n;
    ngx_http_meter_worker_t  *w = privdata;

    if (ngx_http_meter_gov_reply_ok(w, reply, REDIS_REPLY_STRING) == NGX_OK)
    {
        n = 0;

        if (reply->type == REDIS_REPLY_STRING) {
            n = ngx_atoi((u_char *) reply->str, reply->len);
        }

        w->gov_new_version = (n == NGX_ERROR) ? 0 : (uint64_t) n;
    }

    if (--w->gov_busy == 0) {
        ngx_http_meter_gov_stage2(w);
    }
}


static void
ngx_http_meter_gov_credit_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                  *reply = r;
    u_char                      *bar, *f;
    size_t                       i, flen;
    ngx_int_t                    n;
    ngx_http_meter_worker_t     *w = privdata;
    ngx_http_meter_gov_grant_t  *g;

    if (ngx_http_meter_gov_reply_ok(w, reply, REDIS_REPLY_ARRAY) == NGX_OK
        && reply->type == REDIS_REPLY_ARRAY)
    {
        for (i = 0; i + 1 < reply->elements; i += 2) {
            f = (u_char *) reply->element[i]->str;
            flen = reply->element[i]->len;

            bar = ngx_strlchr(f, f + flen, '|');
            n = ngx_atoi((u_char *) reply->element[i + 1]->str,
                         reply->element[i + 1]->len);

            if (bar == NULL || bar == f || n == NGX_ERROR
                || !meter_valid_name((char *) bar + 1, f + flen - bar - 1))
            {
                continue;
            }

            g = ngx_array_push(&w->gov_grants);
            if (g == NULL) {
                w->gov_failed = 1;
                break;
            }

            g->cust.len = bar - f;
            g->cust.data = ngx_pnalloc(w->gov_tmp, g->cust.len);
            g->meter.len = f + flen - bar - 1;
            g->meter.data = ngx_pnalloc(w->gov_tmp, g->meter.len + 1);

            if (g->cust.data == NULL || g->meter.data == NULL) {
                w->gov_failed = 1;
                break;
            }

            ngx_memcpy(g->cust.data, f, g->cust.len);
            (void) ngx_cpystrn(g->meter.data, bar + 1, g->meter.len + 1);
            g->granted = n;
        }
    }

    if (--w->gov_busy == 0) {
        ngx_http_meter_gov_stage2(w);
    }
}


/* stage 2: the key map, only when its version moved */

static void
ngx_http_meter_gov_stage2(ngx_http_meter_worker_t *w)
{
    size_t       len[2];
    const char  *argv[2];

    if (w->gov_failed || w->ac == NULL) {
        w->gov_failed = 1;
        ngx_http_meter_gov_done(w);
        return;
    }

    if (w->gov_valid && w->gov_version == w->gov_new_version) {
        ngx_http_meter_gov_stage3(w);
        return;
    }

    w->gov_busy = 1;

    argv[0] = "HGETALL"; len[0] = 7;
    argv[1] = "mtr:gov"; len[1] = sizeof("mtr:gov") - 1;

    if (redisAsyncCommandArgv(w->ac, ngx_http_meter_gov_map_reply, w, 2,
                              argv, len)
        != REDIS_OK)
    {
        w->gov_busy = 0;
        w->gov_failed = 1;
        ngx_http_meter_gov_done(w);
    }
}


typedef struct {
    ngx_str_t                    id;
    uint8_t                      key[METER_HASH_LEN];
    uint32_t                     reason;
    uint32_t                     revoked;
    int64_t                      since;
} ngx_http_meter_gov_rec_t;


static int ngx_libc_cdecl
ngx_http_meter_gov_cmp(const void *a, const void *b)
{
    const ngx_http_meter_gov_rec_t  *x = a;
    const ngx_http_meter_gov_rec_t  *y = b;
    ngx_int_t                        rc;

    rc = ngx_memn2cmp(x->id.data, y->id.data, x->id.len, y->id.len);

    return (rc > 0) - (rc < 0);
}


static void
ngx_http_meter_gov_map_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                  *reply = r;
    u_char                      *v, *end, *tab[4];
    size_t                       i, n, t, nrec;
    ngx_int_t                    since, revoked;
    ngx_pool_t                  *pool;
    redisReply                  *f, *val;
    ngx_http_meter_worker_t     *w = privdata;
    ngx_http_meter_gov_rec_t    *recs, *rec;
    ngx_http_meter_gov_ckey_t   *k;
    ngx_http_meter_gov_ccust_t  *c;

    w->gov_busy = 0;
    pool = NULL;

    if (ngx_http_meter_gov_reply_ok(w, reply, REDIS_REPLY_ARRAY) != NGX_OK) {
        goto failed;
    }

    pool = ngx_create_pool(16384, w->log);
    if (pool == NULL) {
        goto failed;
    }

    n = (reply->type == REDIS_REPLY_ARRAY) ? reply->elements / 2 : 0;

    recs = ngx_palloc(pool, sizeof(ngx_http_meter_gov_rec_t) * (n + 1));
    if (recs == NULL) {
        goto failed;
    }

    /* KH -> "CUSTOMER\tSTATUS\tREASON\tSINCE\tREVOKED" */
    nrec = 0;

    for (i = 0; i < n; i++) {
        f = reply->element[2 * i];
        val = reply->element[2 * i + 1];

        if (f->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING
            || f->len != METER_HEX_LEN)
        {
            continue;
        }

        v = (u_char *) val->str;
        end = v + val->len;

        for (t = 0; t < 4; t++) {
            tab[t] = ngx_strlchr(t ? tab[t - 1] + 1 : v, end, '\t');
            if (tab[t] == NULL) {
                break;
            }
        }

        if (t < 4 || tab[0] == v) {
            continue;
        }

        rec = &recs[nrec];

        if (ngx_http_meter_hex_decode(rec->key, (u_char *) f->str)
            != NGX_OK)
        {
            continue;
        }

        since = ngx_atoi(tab[2] + 1, tab[3] - tab[2] - 1);
        revoked = ngx_atoi(tab[3] + 1, end - tab[3] - 1);

        rec->id.len = tab[0] - v;
        rec->id.data = ngx_pnalloc(pool, rec->id.len);
        if (rec->id.data == NULL) {
            goto failed;
        }

        ngx_memcpy(rec->id.data, v, rec->id.len);

        rec->reason = 0;

        if (tab[1] - tab[0] - 1 == 1 && tab[0][1] == 'd') {
            rec->reason = (tab[2] - tab[1] - 1
                           == sizeof("credit_exhausted") - 1
                           && ngx_strncmp(tab[1] + 1, "credit_exhausted",
                                          sizeof("credit_exhausted") - 1)
                              == 0)
                          ? NGX_HTTP_METER_REASON_CREDIT
                          : NGX_HTTP_METER_REASON_OVERDUE;
        }

        rec->since = (since == NGX_ERROR) ? 0 : since;
        rec->revoked = (revoked != NGX_ERROR && revoked > 0);

        nrec++;
    }

    /* keys of one customer side by side: one customer entry each */
    ngx_qsort(recs, nrec, sizeof(ngx_http_meter_gov_rec_t),
              ngx_http_meter_gov_cmp);

    if (ngx_array_init(&w->gov_keys, pool, nrec ? nrec : 1,
                       sizeof(ngx_http_meter_gov_ckey_t))
        != NGX_OK
        || ngx_array_init(&w->gov_custs, pool, 16,
                          sizeof(ngx_http_meter_gov_ccust_t))
           != NGX_OK)
    {
        goto failed;
    }

    c = NULL;

    for (i = 0; i < nrec; i++) {
        if (i == 0 || ngx_http_meter_gov_cmp(&recs[i - 1], &recs[i]) != 0) {
            c = ngx_array_push(&w->gov_custs);
            if (c == NULL) {
                goto failed;
            }

            ngx_memzero(c, sizeof(ngx_http_meter_gov_ccust_t));

            c->id = recs[i].id;
            c->reason = recs[i].reason;
            c->since = recs[i].since;
        }

        k = ngx_array_push(&w->gov_keys);
        if (k == NULL) {
            goto failed;
        }

        ngx_memcpy(k->key, recs[i].key, METER_HASH_LEN);
        k->cust = w->gov_custs.nelts - 1;
        k->revoked = recs[i].revoked;
    }

    if (w->gov_pool) {
        ngx_destroy_pool(w->gov_pool);
    }

    w->gov_pool = pool;
    w->gov_version = w->gov_new_version;
    w->gov_valid = 1;

    ngx_http_meter_gov_stage3(w);
    return;

failed:

    w->gov_failed = 1;
    w->gov_valid = 0;

    if (pool) {
        ngx_destroy_pool(pool);
    }

    ngx_http_meter_gov_done(w);
}


static ngx_int_t
ngx_http_meter_hex_decode(uint8_t *dst, u_char *hex)
{
    u_char      ch;
    ngx_uint_t  i, nib, v;

    for (i = 0; i < METER_HEX_LEN; i++) {
        ch = hex[i];

        if (ch >= '0' && ch <= '9') {
            nib = ch - '0';

        } else if (ch >= 'a' && ch <= 'f') {
            nib = ch - 'a' + 10;

        } else {
            return NGX_ERROR;
        }

        v = (i & 1) ? (dst[i / 2] | nib) : (nib << 4);
        dst[i / 2] = (uint8_t) v;
    }

    return NGX_OK;
}


/*
 * Stage 3: credit.  Grants go onto their customers; then, for the keys of
 * customers with credit, their lifetime usage, because usage moves even
 * when the version does not.
 */

static void
ngx_http_meter_gov_stage3(ngx_http_meter_worker_t *w)
{
    char                          data[sizeof("mtr:used:{}")
                                       + METER_HEX_LEN];
    size_t                        i, j, lo, hi, mid, len[2 + NGX_HTTP_METER_GOV_CREDITS];
    ngx_int_t                     rc;
    ngx_str_t                     id;
    const char                   *argv[2 + NGX_HTTP_METER_GOV_CREDITS];
    ngx_http_meter_gov_ckey_t    *keys;
    ngx_http_meter_gov_ccust_t   *custs, *c;
    ngx_http_meter_gov_grant_t   *g;

    custs = w->gov_custs.elts;
    keys = w->gov_keys.elts;
    g = w->gov_grants.elts;

    for (i = 0; i < w->gov_custs.nelts; i++) {
        custs[i].ncredits = 0;
    }

    for (i = 0; i < w->gov_grants.nelts; i++) {
        id = g[i].cust;

        /* customers are sorted by id */
        lo = 0;
        hi = w->gov_custs.nelts;
        c = NULL;

        while (lo < hi) {
            mid = (lo + hi) / 2;
            rc = ngx_memn2cmp(custs[mid].id.data, id.data, custs[mid].id.len,
                              id.len);
            if (rc == 0) {
                c = &custs[mid];
                break;
            }

            if (rc < 0) {
                lo = mid + 1;

            } else {
                hi = mid;
            }
        }

        if (c == NULL || c->ncredits == NGX_HTTP_METER_GOV_CREDITS) {
            continue;
        }

        c->credits[c->ncredits].meter = g[i].meter;
        c->credits[c->ncredits].granted = g[i].granted;
        c->credits[c->ncredits].used = 0;
        c->ncredits++;
    }

    w->gov_busy = 0;

    for (i = 0; i < w->gov_keys.nelts && w->ac != NULL; i++) {
        c = &custs[keys[i].cust];

        if (c->ncredits == 0) {
            continue;
        }

        argv[0] = "HMGET"; len[0] = 5;
        argv[1] = data;
        len[1] = ngx_sprintf((u_char *) data, "mtr:used:{") - (u_char *) data;
        meter_hex(keys[i].key, METER_HASH_LEN, data + len[1]);
        len[1] += METER_HEX_LEN;
        data[len[1]++] = '}';

        for (j = 0; j < c->ncredits; j++) {
            argv[2 + j] = (char *) c->credits[j].meter.data;
            len[2 + j] = c->credits[j].meter.len;
        }

        if (redisAsyncCommandArgv(w->ac, ngx_http_meter_gov_used_reply,
                                  (void *) (uintptr_t) i, 2 + c->ncredits,
                                  argv, len)
            != REDIS_OK)
        {
            w->gov_failed = 1;
            break;
        }

        w->gov_busy++;
    }

    if (w->gov_busy == 0) {
        ngx_http_meter_gov_done(w);
    }
}


static void
ngx_http_meter_gov_used_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                  *reply = r;
    size_t                       j;
    ngx_int_t                    n;
    ngx_http_meter_worker_t     *w = ngx_http_meter_worker;
    ngx_http_meter_gov_ckey_t   *k;
    ngx_http_meter_gov_ccust_t  *c;

    if (w == NULL) {
        return;
    }

    if (ngx_http_meter_gov_reply_ok(w, reply, REDIS_REPLY_ARRAY) == NGX_OK
        && reply->type == REDIS_REPLY_ARRAY && w->gov_valid)
    {
        k = &((ngx_http_meter_gov_ckey_t *) w->gov_keys.elts)
                                                    [(uintptr_t) privdata];
        c = &((ngx_http_meter_gov_ccust_t *) w->gov_custs.elts)[k->cust];

        for (j = 0; j < reply->elements && j < c->ncredits; j++) {
            if (reply->element[j]->type != REDIS_REPLY_STRING) {
                continue;
            }

            n = ngx_atoi((u_char *) reply->element[j]->str,
                         reply->element[j]->len);

            if (n != NGX_ERROR) {
                c->credits[j].used += n;
            }
        }
    }

    if (--w->gov_busy == 0) {
        ngx_http_meter_gov_done(w);
    }
}


/* the end of a refresh: publish a new copy */

static void
ngx_http_meter_gov_done(ngx_http_meter_worker_t *w)
{
    w->gov_busy = 0;

    if (w->gov_failed || !w->gov_valid) {
        /* the last known state stays in force */
        return;
    }

    ngx_http_meter_gov_publish(w);
}


/*
 * The balance read from Redis lacks what this node counted and has not
 * flushed yet: start the local count with it.  What is left out is only
 * what Redis confirmed between the read and now.
 */

static void
ngx_http_meter_gov_seed(ngx_http_meter_shctx_t *sh,
    ngx_http_meter_gov_snap_t *snap)
{
    uint32_t                    i, j;
    meter_entry_t              *e;
    meter_table_t              *t;
    ngx_http_meter_gov_key_t   *k;
    ngx_http_meter_gov_cust_t  *c;

    t = &sh->table;

    for (i = 0; i < t->nslots; i++) {
        e = &t->slots[i];

        if (__atomic_load_n(&e->state, __ATOMIC_ACQUIRE) != METER_SLOT_LIVE)
        {
            continue;
        }

        k = ngx_http_meter_gov_find(snap, e->key);
        if (k == NULL) {
            continue;
        }

        c = &snap->custs[k->cust - 1];

        for (j = 0; j < c->ncredits; j++) {
            if (ngx_strncmp(c->credits[j].meter, e->meter, METER_NAME_MAX)
                == 0)
            {
                c->credits[j].local += (int64_t) meter_entry_pending(e);
            }
        }
    }
}


static void
ngx_http_meter_gov_publish(ngx_http_meter_worker_t *w)
{
    time_t                        now;
    size_t                        size, nslots;
    uint32_t                      h, n;
    ngx_uint_t                    i, j, b, z, blocked, delinquent, credits;
    ngx_shm_zone_t              **zones;
    ngx_http_meter_gov_key_t     *slot;
    ngx_http_meter_gov_snap_t    *snap;
    ngx_http_meter_gov_ckey_t    *keys;
    ngx_http_meter_gov_ccust_t   *custs;
    ngx_http_meter_gov_cust_t    *c;
    ngx_http_meter_gov_zone_t    *gz;
    ngx_http_meter_gov_shctx_t   *sh;
    ngx_http_meter_zone_ctx_t    *ctx;

    gz = w->mcf->gov_zone->data;
    sh = gz->sh;
    now = ngx_time();
    keys = w->gov_keys.elts;
    custs = w->gov_custs.elts;

    for (nslots = 16; nslots < w->gov_keys.nelts * 2; nslots *= 2) {
        /* load factor at most 1/2 */
    }

    size = sizeof(ngx_http_meter_gov_snap_t)
           + nslots * sizeof(ngx_http_meter_gov_key_t)
           + (w->gov_custs.nelts + 1) * sizeof(ngx_http_meter_gov_cust_t);

    /* the buffer that is not published */
    b = (sh->snap == sh->buf[0]) ? 1 : 0;

    if (sh->cap[b] < size) {
        ngx_shmtx_lock(&gz->shpool->mutex);

        if (sh->buf[b]) {
            ngx_slab_free_locked(gz->shpool, sh->buf[b]);
            sh->buf[b] = NULL;
            sh->cap[b] = 0;
        }

        snap = ngx_slab_alloc_locked(gz->shpool, size);

        ngx_shmtx_unlock(&gz->shpool->mutex);

        if (snap == NULL) {
            ngx_log_error(NGX_LOG_ALERT, w->log, 0,
                          "meter_governance_size is too small for the "
                          "governance state of %ui keys and %ui customers "
                          "(%uz bytes a copy, two copies); the last one "
                          "stays in force: raise it",
                          w->gov_keys.nelts, w->gov_custs.nelts, size);
            return;
        }

        sh->buf[b] = snap;
        sh->cap[b] = size;
    }

    snap = sh->buf[b];
    ngx_memzero(snap, size);

    snap->version = w->gov_version;
    snap->mask = nslots - 1;
    snap->ncust = w->gov_custs.nelts;
    snap->keys = (ngx_http_meter_gov_key_t *) (snap + 1);
    snap->custs = (ngx_http_meter_gov_cust_t *) (snap->keys + nslots);

    delinquent = 0;
    credits = 0;

    for (i = 0; i < w->gov_custs.nelts; i++) {
        c = &snap->custs[i];

        c->reason = custs[i].reason;

        /* dated ahead: from now on (and since + grace cannot overflow) */
        c->since = ngx_min(custs[i].since, (int64_t) now);
        c->ncredits = custs[i].ncredits;

        for (j = 0; j < custs[i].ncredits; j++) {
            /* NUL padded like a table entry's name (snap is zeroed) */
            ngx_memcpy(c->credits[j].meter, custs[i].credits[j].meter.data,
                       ngx_min(custs[i].credits[j].meter.len,
                               METER_NAME_MAX));
            c->credits[j].remaining = custs[i].credits[j].granted
                                      - custs[i].credits[j].used;
            c->credits[j].local = 0;
            credits = 1;
        }

        if (c->reason) {
            delinquent++;
        }
    }

    blocked = 0;

    for (i = 0; i < w->gov_keys.nelts; i++) {
        ngx_memcpy(&h, keys[i].key, sizeof(uint32_t));

        /* at most half full: a free slot is always found */
        slot = &snap->keys[h & snap->mask];

        for (n = 0; n < nslots; n++) {
            slot = &snap->keys[(h + n) & snap->mask];

            if (slot->cust == 0) {
                break;
            }
        }

        ngx_memcpy(slot->key, keys[i].key, METER_HASH_LEN);
        slot->cust = keys[i].cust + 1;
        slot->revoked = keys[i].revoked;

        c = &snap->custs[keys[i].cust];

        if (slot->revoked || c->reason) {
            blocked++;
            continue;
        }

        for (j = 0; j < c->ncredits; j++) {
            if (c->credits[j].remaining <= 0) {
                blocked++;
                break;
            }
        }
    }

    if (credits) {
        zones = w->mcf->zones.elts;

        for (z = 0; z < w->mcf->zones.nelts; z++) {
            ctx = zones[z]->data;

            if (ctx->governance) {
                ngx_http_meter_gov_seed(ctx->sh, snap);
            }
        }
    }

    __atomic_store_n(&sh->snap, snap, __ATOMIC_RELEASE);
    __atomic_store_n(&sh->refreshed, (uint64_t) now, __ATOMIC_RELAXED);
    __atomic_store_n(&sh->delinquent, (uint64_t) delinquent,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&sh->blocked, (uint64_t) blocked, __ATOMIC_RELAXED);
}


/* configuration */

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


static char *
ngx_http_meter_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_main_conf_t  *mcf = conf;

    u_char                            *p;
    size_t                             size;
    ngx_str_t                         *value, name, s;
    ngx_uint_t                         i;
    ngx_shm_zone_t                    *shm_zone, **zp;
    ngx_http_meter_zone_ctx_t         *ctx;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    ctx = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_zone_ctx_t));
    if (ctx == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = &ctx->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    size = 0;
    name.len = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {

            name.data = value[i].data + 5;

            p = (u_char *) ngx_strchr(name.data, ':');

            if (p == NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\" in \"%V\" "
                                   "directive, expected zone=NAME:SIZE",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            name.len = p - name.data;

            /* the name goes into JSON, Prometheus labels and Redis keys */
            if (!meter_valid_name((const char *) name.data, name.len)) {
                s = ngx_http_meter_printable(cf->pool, &name);

                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone name \"%V\" in \"%V\" "
                                   "directive: use 1 to %d of "
                                   "A-Z a-z 0-9 _ . -",
                                   &s, &cmd->name, METER_NAME_MAX);
                return NGX_CONF_ERROR;
            }

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);

            if (size == (size_t) NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\" in \"%V\" "
                                   "directive", &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            if (size < (size_t) (8 * ngx_pagesize)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small in \"%V\" "
                                   "directive, the minimum is %uz bytes",
                                   &value[i], &cmd->name,
                                   (size_t) (8 * ngx_pagesize));
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\" in \"%V\" directive",
                           &value[i], &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    shm_zone = ngx_shared_memory_add(cf, &name, size,
                                     &ngx_http_meter_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ctx = shm_zone->data;

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%V \"%V\" is already bound to key \"%V\"",
                           &cmd->name, &name, &ctx->key.value);
        return NGX_CONF_ERROR;
    }

    shm_zone->init = ngx_http_meter_init_zone;
    shm_zone->data = ctx;
    ctx->shm_zone = shm_zone;

    ngx_http_meter_key_header(&value[1], &ctx->key_header);

    zp = ngx_array_push(&mcf->zones);
    if (zp == NULL) {
        return NGX_CONF_ERROR;
    }

    *zp = shm_zone;

    return NGX_CONF_OK;
}


/* a name to show in an error: bytes outside printable ASCII as \xHH */

static ngx_str_t
ngx_http_meter_printable(ngx_pool_t *pool, ngx_str_t *name)
{
    u_char     *p;
    ngx_str_t   out;
    ngx_uint_t  i;

    out.len = 0;
    out.data = ngx_pnalloc(pool, name->len * 4 + 1);

    if (out.data == NULL) {
        return out;
    }

    p = out.data;

    for (i = 0; i < name->len; i++) {
        if (name->data[i] < 0x20 || name->data[i] > 0x7e
            || name->data[i] == '"' || name->data[i] == '\\')
        {
            p = ngx_sprintf(p, "\\x%02xd", name->data[i]);
            continue;
        }

        *p++ = name->data[i];
    }

    out.len = p - out.data;

    return out;
}


/*
 * A key that is one request header, $http_NAME: governance refuses a call
 * that sends it twice (nginx 1.22 reads the first, a backend may read the
 * last; nginx 1.23 joins them).
 */

static void
ngx_http_meter_key_header(ngx_str_t *key, ngx_str_t *name)
{
    u_char  *p, *last;

    p = key->data;
    last = key->data + key->len;

    if (key->len > 3 && p[1] == '{' && last[-1] == '}') {
        p += 2;
        last--;

    } else {
        p++;
    }

    if (key->data[0] != '$' || last - p <= 5
        || ngx_strncasecmp(p, (u_char *) "http_", 5) != 0)
    {
        return;
    }

    p += 5;
    name->data = p;
    name->len = last - p;

    for ( /* void */ ; p < last; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9') || *p == '_'))
        {
            /* anything else: not a single header variable */
            name->len = 0;
            return;
        }
    }
}


static char *
ngx_http_meter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_loc_conf_t  *mlcf = conf;

    ngx_str_t                         *value, s, zone;
    ngx_uint_t                         i;
    const char                        *err;
    ngx_http_meter_t                  *m, **mp;
    ngx_http_meter_main_conf_t        *mcf;
    ngx_http_complex_value_t         **cvp;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    if (cf->args->nelts == 2 && ngx_strcmp(value[1].data, "off") == 0) {
        if (mlcf->meters != NGX_CONF_UNSET_PTR) {
            return "is duplicate";
        }

        mlcf->meters = &ngx_http_meter_off;
        return NGX_CONF_OK;
    }

    if (mlcf->meters == &ngx_http_meter_off) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter off\" cannot be mixed with meters at "
                           "the same level");
        return NGX_CONF_ERROR;
    }

    if (mlcf->meters == NGX_CONF_UNSET_PTR) {
        mlcf->meters = ngx_array_create(cf->pool, 2,
                                        sizeof(ngx_http_meter_t));
        if (mlcf->meters == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    m = ngx_array_push(mlcf->meters);
    if (m == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(m, sizeof(ngx_http_meter_t));

    m->file = cf->conf_file->file.name;
    m->line = cf->conf_file->line;

    ngx_str_null(&zone);

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            zone.data = value[i].data + 5;
            zone.len = value[i].len - 5;

            if (zone.len == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "status=", 7) == 0) {
            if (meter_parse_status((const char *) value[i].data + 7,
                                   value[i].len - 7, &m->status, &err)
                != 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: %s",
                                   &value[i], &cmd->name, err);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "subrequests=on") == 0) {
            m->subrequests = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "subrequests=off") == 0) {
            m->subrequests = 0;
            continue;
        }

        if (ngx_strncmp(value[i].data, "method=", 7) == 0) {
            if (meter_parse_methods((const char *) value[i].data + 7,
                                    value[i].len - 7, &m->methods, &err)
                != 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: %s",
                                   &value[i], &cmd->name, err);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        cvp = NULL;

        if (ngx_strncmp(value[i].data, "value=", 6) == 0) {
            cvp = &m->value;
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

        } else if (ngx_strncmp(value[i].data, "if=", 3) == 0) {
            cvp = &m->filter;
            s.data = value[i].data + 3;
            s.len = value[i].len - 3;
        }

        if (cvp != NULL) {
            if (s.len == 0 || ngx_http_script_variables_count(&s) == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a variable is expected, such as "
                                   "$bytes_sent", &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            *cvp = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
            if (*cvp == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

            ccv.cf = cf;
            ccv.value = &s;
            ccv.complex_value = *cvp;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            if (ngx_http_meter_add_vars(cf, m, &s) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (m->name.len == 0 && ngx_strchr(value[i].data, '=') == NULL) {
            if (!meter_valid_name((const char *) value[i].data,
                                  value[i].len))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid meter name \"%V\" in \"%V\" "
                                   "directive: use 1 to %d of "
                                   "A-Z a-z 0-9 _ . -",
                                   &value[i], &cmd->name, METER_NAME_MAX);
                return NGX_CONF_ERROR;
            }

            m->name = value[i];
            continue;
        }

        goto invalid;
    }

    if (zone.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter\" must have \"zone\" parameter");
        return NGX_CONF_ERROR;
    }

    if (m->name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"meter\" must have a meter name");
        return NGX_CONF_ERROR;
    }

    m->shm_zone = ngx_shared_memory_add(cf, &zone, 0,
                                        &ngx_http_meter_module);
    if (m->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_meter_module);

    mp = ngx_array_push(&mcf->meters);
    if (mp == NULL) {
        return NGX_CONF_ERROR;
    }

    *mp = m;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" in \"%V\" directive",
                       &value[i], &cmd->name);
    return NGX_CONF_ERROR;
}


/* the variables of a value= or if=, to read afresh at the log phase */

static ngx_int_t
ngx_http_meter_add_vars(ngx_conf_t *cf, ngx_http_meter_t *m, ngx_str_t *s)
{
    u_char      *p, *last, *start;
    ngx_int_t    index;
    ngx_str_t    name;
    ngx_uint_t  *ip, brace;

    p = s->data;
    last = s->data + s->len;

    while (p < last) {
        if (*p++ != '$' || p == last) {
            continue;
        }

        brace = (*p == '{');
        if (brace) {
            p++;
        }

        start = p;

        while (p < last
               && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                   || (*p >= '0' && *p <= '9') || *p == '_'))
        {
            p++;
        }

        name.data = start;
        name.len = p - start;

        if (brace && p < last && *p == '}') {
            p++;
        }

        /* $1: a capture, not a variable */
        if (name.len == 0 || (*start >= '0' && *start <= '9')) {
            continue;
        }

        index = ngx_http_get_variable_index(cf, &name);
        if (index == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (m->vars == NULL) {
            m->vars = ngx_array_create(cf->pool, 2, sizeof(ngx_uint_t));
            if (m->vars == NULL) {
                return NGX_ERROR;
            }
        }

        ip = ngx_array_push(m->vars);
        if (ip == NULL) {
            return NGX_ERROR;
        }

        *ip = (ngx_uint_t) index;
    }

    return NGX_OK;
}


/* a secret from a file (password_file=): nginx -T shows no password */

static char *
ngx_http_meter_read_secret(ngx_conf_t *cf, ngx_command_t *cmd,
    ngx_str_t *file, ngx_str_t *secret)
{
    u_char           buf[1024];
    ssize_t          n;
    ngx_fd_t         fd;
    ngx_str_t        path;
    ngx_file_info_t  fi;

    path = *file;

    if (path.len == 0 || ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK)
    {
        return "has an empty or invalid \"password_file=\"";
    }

    fd = ngx_open_file(path.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);

    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "\"%V\" cannot read password_file \"%V\"",
                           &cmd->name, &path);
        return NGX_CONF_ERROR;
    }

    n = NGX_ERROR;

    if (ngx_fd_info(fd, &fi) != NGX_FILE_ERROR
        && ngx_file_size(&fi) < (off_t) sizeof(buf))
    {
        n = ngx_read_fd(fd, buf, sizeof(buf));
    }

    (void) ngx_close_file(fd);

    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) {
        n--;
    }

    if (n <= 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" password_file \"%V\" is empty, "
                           "unreadable or larger than %uz bytes",
                           &cmd->name, &path, sizeof(buf) - 1);
        return NGX_CONF_ERROR;
    }

    secret->data = ngx_pnalloc(cf->pool, n);
    if (secret->data == NULL) {
        return NGX_CONF_ERROR;
    }

    secret->len = n;
    ngx_memcpy(secret->data, buf, n);
    ngx_explicit_memzero(buf, sizeof(buf));

    return NGX_CONF_OK;
}


static char *
ngx_http_meter_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_main_conf_t  *mcf = conf;

    char        *rv;
    u_char      *p;
    ngx_int_t    n;
    ngx_str_t   *value, s;
    ngx_uint_t   i;

    if (mcf->redis_set) {
        return "is duplicate";
    }

    mcf->redis_set = 1;

    value = cf->args->elts;

    if (ngx_strncmp(value[1].data, "unix:", 5) == 0) {
        if (value[1].len == 5 || value[1].data[5] != '/') {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid address \"%V\" in \"%V\" "
                               "directive: expected unix:/absolute/path",
                               &value[1], &cmd->name);
            return NGX_CONF_ERROR;
        }

        mcf->redis_path.data = value[1].data + 5;
        mcf->redis_path.len = value[1].len - 5;

    } else {
        p = (u_char *) ngx_strlchr(value[1].data,
                                   value[1].data + value[1].len, ':');

        n = (p == NULL) ? NGX_ERROR
                        : ngx_atoi(p + 1, value[1].data + value[1].len - p
                                          - 1);

        if (p == NULL || p == value[1].data || n < 1 || n > 65535) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid address \"%V\" in \"%V\" "
                               "directive: expected host:port or "
                               "unix:/path", &value[1], &cmd->name);
            return NGX_CONF_ERROR;
        }

        mcf->redis_host.len = p - value[1].data;
        mcf->redis_host.data = ngx_pnalloc(cf->pool,
                                           mcf->redis_host.len + 1);
        if (mcf->redis_host.data == NULL) {
            return NGX_CONF_ERROR;
        }

        (void) ngx_cpystrn(mcf->redis_host.data, value[1].data,
                           mcf->redis_host.len + 1);
        mcf->redis_port = n;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "password=", 9) == 0
            || ngx_strncmp(value[i].data, "password_file=", 14) == 0)
        {
            if (mcf->redis_password.data != NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\" takes one of \"password=\" "
                                   "and \"password_file=\"", &cmd->name);
                return NGX_CONF_ERROR;
            }

            if (value[i].data[8] == '=') {
                mcf->redis_password.data = value[i].data + 9;
                mcf->redis_password.len = value[i].len - 9;
                continue;
            }

            s.data = value[i].data + 14;
            s.len = value[i].len - 14;

            rv = ngx_http_meter_read_secret(cf, cmd, &s,
                                            &mcf->redis_password);
            if (rv != NGX_CONF_OK) {
                return rv;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            mcf->redis_db = ngx_atoi(value[i].data + 3, value[i].len - 3);

            if (mcf->redis_db == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a database number is expected",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            mcf->redis_timeout = ngx_parse_time(&s, 0);

            if (mcf->redis_timeout == (ngx_msec_t) NGX_ERROR
                || mcf->redis_timeout == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a time such as 500ms or 2s is expected",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\" in \"%V\" directive",
                           &value[i], &cmd->name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_meter_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_loc_conf_t  *mlcf = conf;

    ngx_str_t                 *value;
    ngx_http_core_loc_conf_t  *clcf;

    if (mlcf->status_on) {
        return "is duplicate";
    }

    mlcf->status_on = 1;
    mlcf->status = NGX_HTTP_METER_STATUS_JSON;

    value = cf->args->elts;

    if (cf->args->nelts == 2) {
        if (ngx_strcmp(value[1].data, "prometheus") == 0) {
            mlcf->status = NGX_HTTP_METER_STATUS_PROM;

        } else if (ngx_strcmp(value[1].data, "json") != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid format \"%V\" in \"%V\" "
                               "directive: use json or prometheus",
                               &value[1], &cmd->name);
            return NGX_CONF_ERROR;
        }
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_meter_status_handler;

    return NGX_CONF_OK;
}


/* ngx_conf_set_msec_slot, with a message that shows the bad value */

static char *
ngx_http_meter_set_msec(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char       *rv;
    ngx_str_t  *value;

    rv = ngx_conf_set_msec_slot(cf, cmd, conf);

    if (rv == NGX_CONF_OK || rv == NGX_CONF_ERROR) {
        return rv;
    }

    value = cf->args->elts;

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"%V\" directive (%s): a "
                       "time such as 500ms or 2s is expected",
                       &value[1], &cmd->name, rv);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_meter_governance(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_meter_loc_conf_t  *mlcf = conf;

    ngx_str_t                   *value, s;
    ngx_int_t                    t;
    ngx_uint_t                   i;
    ngx_http_meter_gov_conf_t   *gcf, **gcfp;
    ngx_http_meter_main_conf_t  *mcf;

    if (mlcf->gov != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        if (cf->args->nelts != 2) {
            return "takes no parameters after \"off\"";
        }

        mlcf->gov = NULL;
        return NGX_CONF_OK;
    }

    gcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_meter_gov_conf_t));
    if (gcf == NULL) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;

            if (s.len == 0) {
                goto invalid;
            }

            gcf->shm_zone = ngx_shared_memory_add(cf, &s, 0,
                                                  &ngx_http_meter_module);
            if (gcf->shm_zone == NULL) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "on_redis_down=open") == 0) {
            gcf->closed = 0;
            continue;
        }

        if (ngx_strcmp(value[i].data, "on_redis_down=closed") == 0) {
            gcf->closed = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "unknown_key=allow") == 0) {
            gcf->unknown = 0;
            continue;
        }

        if (ngx_strcmp(value[i].data, "unknown_key=401") == 0) {
            gcf->unknown = NGX_HTTP_UNAUTHORIZED;
            continue;
        }

        if (ngx_strcmp(value[i].data, "unknown_key=403") == 0) {
            gcf->unknown = NGX_HTTP_FORBIDDEN;
            continue;
        }

        if (ngx_strncmp(value[i].data, "grace=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

            t = ngx_parse_time(&s, 1);

            if (t == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\" in \"%V\" directive: "
                                   "a time such as 3d or 12h is expected",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }

            gcf->grace = (time_t) t;
            continue;
        }

        goto invalid;
    }

    if (gcf->shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    gcf->file = cf->conf_file->file.name;
    gcf->line = cf->conf_file->line;
    gcf->http = (cf->cmd_type == NGX_HTTP_MAIN_CONF);

    mlcf->gov = gcf;

    /* every gate, wherever written: postconfiguration checks them all */
    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_meter_module);

    gcfp = ngx_array_push(&mcf->gov_confs);
    if (gcfp == NULL) {
        return NGX_CONF_ERROR;
    }

    *gcfp = gcf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" in \"%V\" directive "
                       "(expected zone=, on_redis_down=open|closed, "
                       "unknown_key=allow|401|403 or grace=)",
                       &value[i], &cmd->name);
    return NGX_CONF_ERROR;
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
    uint8_t                      sha[20];
    ngx_http_meter_worker_t     *w;
    ngx_http_meter_main_conf_t  *mcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_meter_module);

    if (mcf == NULL || mcf->zones.nelts == 0 || !mcf->redis_set) {
        return NGX_OK;
    }

    w = ngx_pcalloc(cycle->pool, sizeof(ngx_http_meter_worker_t));
    if (w == NULL) {
        return NGX_ERROR;
    }

    w->mcf = mcf;
    w->log = cycle->log;
    w->batch.items = w->items;
    w->batch.cap = NGX_HTTP_METER_BATCH;

    w->tick.handler = ngx_http_meter_tick;
    w->tick.data = w;
    w->tick.log = cycle->log;
    w->tick.cancelable = 1;

    w->slice.handler = ngx_http_meter_slice_handler;
    w->slice.data = w;
    w->slice.log = cycle->log;
    w->slice.cancelable = 1;

    w->gov_tick.handler = ngx_http_meter_gov_tick;
    w->gov_tick.data = w;
    w->gov_tick.log = cycle->log;
    w->gov_tick.cancelable = 1;

    w->timeout.handler = ngx_http_meter_timeout_handler;
    w->timeout.data = w;
    w->timeout.log = cycle->log;
    w->timeout.cancelable = 1;

    /* the script's SHA-1 is its name in Redis: known before SCRIPT LOAD
     * answers, so EVALSHA can follow it in the same pipeline */
    if (EVP_Digest(meter_script_max, ngx_strlen(meter_script_max), sha,
                   NULL, EVP_sha1(), NULL)
        != 1)
    {
        return NGX_ERROR;
    }

    meter_hex(sha, 20, w->script_sha);

    ngx_http_meter_worker = w;

    /* registered before the first add: see meter_core.h */
    ngx_http_meter_announce(w);

    ngx_http_meter_redis_connect(w);

    ngx_add_timer(&w->tick, mcf->flush_interval);

    if (mcf->gov_zone != NULL) {
        ngx_add_timer(&w->gov_tick, 1);
    }

    return NGX_OK;
}


static void
ngx_http_meter_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                   z;
    ngx_shm_zone_t             **zones;
    ngx_http_meter_worker_t     *w;
    ngx_http_meter_gov_zone_t   *gz;
    ngx_http_meter_zone_ctx_t   *ctx;

    w = ngx_http_meter_worker;

    if (w == NULL) {
        return;
    }

    if (w->ac) {
        redisAsyncSetDisconnectCallback(w->ac, NULL);
        redisAsyncFree(w->ac);
        w->ac = NULL;
    }

    w->state = NGX_HTTP_METER_REDIS_DOWN;

    ngx_http_meter_final_flush(w->mcf, cycle->log);

    zones = w->mcf->zones.elts;

    for (z = 0; z < w->mcf->zones.nelts; z++) {
        ctx = zones[z]->data;
        ngx_http_meter_lease_release(&ctx->sh->lease);
    }

    if (w->mcf->gov_zone != NULL) {
        gz = w->mcf->gov_zone->data;
        ngx_http_meter_lease_release(&gz->sh->lease);
    }

    if (w->gov_pool) {
        ngx_destroy_pool(w->gov_pool);
        w->gov_pool = NULL;
    }

    if (w->gov_tmp) {
        ngx_destroy_pool(w->gov_tmp);
        w->gov_tmp = NULL;
    }

    ngx_http_meter_worker = NULL;
}
