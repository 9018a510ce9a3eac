
/*
 * Copyright (C) nginx-meter authors
 *
 * What the files of ngx_http_meter_module share: the shared-memory layout,
 * the configuration, the per-worker state (the Redis connection, the flush
 * and the governance refresh, each a struct of its own), the prototypes
 * that cross files, and the request-path lookups, inlined where they run.
 * docs/architecture.md shows which file owns which step.
 */


#ifndef _NGX_HTTP_METER_MODULE_H_INCLUDED_
#define _NGX_HTTP_METER_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "meter_core.h"
#include "meter_schema.h"


#define NGX_HTTP_METER_BATCH        512     /* items per pipelined slice */
#define NGX_HTTP_METER_UBATCH       256     /* unique users per slice */
#define NGX_HTTP_METER_SCAN         2048    /* slots scanned per slice */
#define NGX_HTTP_METER_SCAN_WORDS   4096    /* dirty bitmap words, same */
/*
 * ms between full scans when nothing else asks for one.  A takeover of the
 * lease and a new hour each start one, and they carry exactness (a mark
 * lost with a killed flusher; the last hour's slots before it closes); this
 * one is insurance (a respawned worker with the dead one's pid).  At 2M
 * slots a scan costs the worker ~40 ms: every 60 s that was 0.15 us per
 * request at 4,300 rps (bench/README.md, "cost").
 */
#define NGX_HTTP_METER_FULL_EVERY   600000
#define NGX_HTTP_METER_SLICE_PAUSE  1       /* ms between sent batches */
#define NGX_HTTP_METER_BACKOFF_MIN  100
#define NGX_HTTP_METER_BACKOFF_MAX  10000

#define NGX_HTTP_METER_STATUS_JSON  0
#define NGX_HTTP_METER_STATUS_PROM  1

#define NGX_HTTP_METER_GOV_CREDITS  4       /* credit meters per customer */
#define NGX_HTTP_METER_GOV_NIL      0xffffffff
#define NGX_HTTP_METER_GOV_COUNT    "1000"  /* HSCAN COUNT */
#define NGX_HTTP_METER_GOV_BUDGET   300     /* us of work per slice */

/* why a request was refused; indexes the shm counters */
#define NGX_HTTP_METER_DENY_OVERDUE 0
#define NGX_HTTP_METER_DENY_CREDIT  1
#define NGX_HTTP_METER_DENY_UNKNOWN 2
#define NGX_HTTP_METER_DENY_DOWN    3
#define NGX_HTTP_METER_DENY_N       4

#define NGX_HTTP_METER_REASON_OVERDUE  1
#define NGX_HTTP_METER_REASON_CREDIT   2

#define NGX_HTTP_METER_REDIS_HOOKS  2       /* the flush, the refresh */
#define NGX_HTTP_METER_HOST_LEN     256     /* a master named by Sentinel */


typedef enum {
    NGX_HTTP_METER_REDIS_DOWN = 0,
    NGX_HTTP_METER_REDIS_CONN,              /* connect under way */
    NGX_HTTP_METER_REDIS_READY
} ngx_http_meter_redis_state_e;


/* what a flush pass scans of its current zone; ordered: >= FULL is full */
typedef enum {
    NGX_HTTP_METER_MODE_UNSET = 0,          /* the zone is not begun */
    NGX_HTTP_METER_MODE_DIRTY,              /* the slots marked dirty */
    NGX_HTTP_METER_MODE_FULL,               /* every slot */
    NGX_HTTP_METER_MODE_RESYNC              /* every slot, flushed ones too */
} ngx_http_meter_zone_mode_e;


/* the figures of meter_status, per zone; ngx_http_meter_stats[] by these */
typedef enum {
    NGX_HTTP_METER_STAT_KEYS = 0,
    NGX_HTTP_METER_STAT_SLOTS,
    NGX_HTTP_METER_STAT_SHM_BYTES,
    NGX_HTTP_METER_STAT_SHM_USED,
    NGX_HTTP_METER_STAT_SHM_FREE,
    NGX_HTTP_METER_STAT_PENDING,
    NGX_HTTP_METER_STAT_FLUSHED_TOTAL,
    NGX_HTTP_METER_STAT_FLUSHED_COUNTERS,
    NGX_HTTP_METER_STAT_FLUSHES,
    NGX_HTTP_METER_STAT_FLUSH_ERRORS,
    NGX_HTTP_METER_STAT_LAST_FLUSH_MS,
    NGX_HTTP_METER_STAT_REDIS_CONNECTED,
    NGX_HTTP_METER_STAT_DROPPED,
    NGX_HTTP_METER_STAT_DROPPED_VALUE,
    NGX_HTTP_METER_STAT_VALUE_ERRORS,
    NGX_HTTP_METER_STAT_GOV_DELINQUENT,
    NGX_HTTP_METER_STAT_GOV_BLOCKED,
    NGX_HTTP_METER_STAT_GOV_REFRESHED,
    NGX_HTTP_METER_STAT_GOV_REFRESH_AGE,
    NGX_HTTP_METER_STAT_GOV_DENIED_OVERDUE,
    NGX_HTTP_METER_STAT_GOV_DENIED_CREDIT,
    NGX_HTTP_METER_STAT_GOV_DENIED_UNKNOWN,
    NGX_HTTP_METER_STAT_GOV_DENIED_DOWN,
    NGX_HTTP_METER_STAT_UNIQUE_ENTRIES,
    NGX_HTTP_METER_STAT_UNIQUE_SLOTS,
    NGX_HTTP_METER_STAT_UNIQUE_DIRTY,
    NGX_HTTP_METER_STAT_UNIQUE_EVICTED,
    NGX_HTTP_METER_STAT_UNIQUE_DROPPED,
    NGX_HTTP_METER_NSTATS
} ngx_http_meter_stat_e;


/* governance: a compact copy of mtr:gov in shared memory */

typedef struct {
    uint8_t                      key[METER_HASH_LEN];
    uint32_t                     cust;      /* index + 1; 0: free slot */
    uint32_t                     revoked;
} ngx_http_meter_gov_key_t;

/* a quota of the customer's plan (mtr:gov:quota); window 0: credit */
typedef struct {
    int64_t                      limit;
    int64_t                      window;    /* s */
    int64_t                      reset;     /* Unix s, the period's end */
} ngx_http_meter_gov_quota_t;

typedef struct {
    char                         meter[METER_NAME_MAX];
    int64_t                      remaining; /* when the copy was made */
    int64_t                      local;     /* atomic: counted here since */
    ngx_http_meter_gov_quota_t   q;
} ngx_http_meter_gov_credit_t;

typedef struct {
    uint32_t                     reason;    /* 0: in good standing */
    uint32_t                     ncredits;  /* credits and quotas */
    int64_t                      since;
    ngx_http_meter_gov_credit_t  credits[NGX_HTTP_METER_GOV_CREDITS];
    u_char                       plan[MTR_PLAN_MAX]; /* NUL padded */
    u_char                       id[MTR_CUSTOMER_MAX]; /* same */
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
    uint64_t                     flushed_counters; /* values confirmed */
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

    /* atomic: the last writer session id (SID) taken in this zone */
    uint64_t                     writers;

    uint64_t                     gov_denied[NGX_HTTP_METER_DENY_N];

    meter_uniq_t                *uniq;      /* unique users, in the zone */
    uint64_t                     uniq_logged; /* time of last log (s) */

    meter_table_t                table;     /* last: slots follow */
} ngx_http_meter_shctx_t;


/*
 * Governance lives in a zone of its own, one per node ("meter:governance",
 * a name no meter_zone can take): the state of mtr:gov is the same for
 * every meter zone, and a gate added by a reload then only adds a zone,
 * never changes the layout of a meter zone that holds counters.
 *
 * Two copies, one of them published in snap.  The refresher fills the
 * other and swaps; a request reads one pointer.  A copy's key table and
 * customer table are buffers of their own: when only credit moved, the
 * new copy shares the published key table.
 */
typedef struct {
    uint64_t                     lease;     /* one refresher per node */
    ngx_http_meter_gov_snap_t   *snap;      /* &hdr[0], &hdr[1] or NULL */
    ngx_http_meter_gov_snap_t    hdr[2];
    ngx_http_meter_gov_key_t    *kbuf[2];
    size_t                       kcap[2];
    ngx_http_meter_gov_cust_t   *cbuf[2];
    size_t                       ccap[2];
    uint64_t                     pubgen;    /* copies published so far */
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
    ngx_int_t                    key_index; /* key is one variable: its
                                             * index; else NGX_ERROR */
    ngx_str_t                    key_header; /* key is $http_NAME: NAME */
    ngx_str_t                    key_var;   /* name, lowercase */
    ngx_str_t                    key_lc;    /* name as a header's
                                             * lowcase_key spells it */
    ngx_uint_t                   key_direct; /* $http_NAME is nginx's own:
                                              * read the headers here */
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
 * Per client call that a gate decided: the key's hash and customer,
 * found once, and the billing decision.  It outlives internal redirects
 * (which clear module contexts) in a variable slot of the main request
 * (r->variables survives ngx_http_internal_redirect(), src/http/
 * ngx_http_core_module.c); a subrequest shares the slots, so only the
 * main request uses them.  The hash of a zone's key is taken once a
 * call: the log phase bills the key the gate read.
 */
typedef struct {
    ngx_shm_zone_t              *zone;      /* hash is of this zone's key */
    ngx_http_meter_gov_snap_t   *snap;      /* cust points into it */
    ngx_http_meter_gov_cust_t   *cust;
    ngx_uint_t                   gated;     /* a gate has decided */
    ngx_uint_t                   unbilled;  /* refused as no one's call */
    void                        *vars;      /* ngx_http_meter_variables.c */
    uint8_t                      hash[METER_HASH_LEN]; /* last: not zeroed,
                                             * valid once zone is set */
} ngx_http_meter_req_ctx_t;


typedef struct {
    ngx_str_t                    name;
    ngx_shm_zone_t              *shm_zone;
    meter_status_filter_t        status;
    uint32_t                     methods;   /* 0: all */
    ngx_uint_t                   subrequests; /* subrequests=on */
    ngx_http_complex_value_t    *value;
    ngx_http_complex_value_t    *filter;    /* if= */
    ngx_uint_t                   gauge;     /* NGX_HTTP_METER_GAUGE_*:
                                             * the name carries its
                                             * suffix */
    ngx_uint_t                   unique;    /* unique=: value is the
                                             * variable counted */
    ngx_uint_t                   uperiod;   /* period=: METER_UPERIOD_*
                                             * + 1; 0: unset (month) */
    ngx_int_t                    vindex;    /* unique= is one variable:
                                             * its index; else NGX_ERROR */
    ngx_array_t                 *vars;      /* indexes in value and if=,
                                             * read afresh at the log
                                             * phase */
    ngx_str_t                    file;      /* where it was defined */
    ngx_uint_t                   line;
} ngx_http_meter_t;


/* a Sentinel of meter_redis sentinel= */
typedef struct {
    ngx_str_t                    host;      /* NUL-terminated */
    ngx_int_t                    port;
} ngx_http_meter_addr_t;


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
    ngx_array_t                 *redis_sentinels; /* ngx_http_meter_addr_t;
                                                   * NULL: no Sentinel */
    ngx_str_t                    redis_master;  /* NUL-terminated */

    ngx_msec_t                   flush_interval;
    ngx_msec_t                   gov_refresh;
    ngx_array_t                  gov_confs; /* ngx_http_meter_gov_conf_t *,
                                             * every gate written */
    size_t                       gov_size;  /* meter_governance_size */
    ngx_shm_zone_t              *gov_zone;  /* NULL: no gate anywhere */

    /* r->variables slots of the main request, no variable of nginx's:
     * the gate's context, and the meters of a location passed */
    ngx_int_t                    call_var;
    ngx_int_t                    meters_var;
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
    uint32_t                     cust;      /* index into custs */
    uint32_t                     next;      /* the customer's next key */
    uint8_t                      revoked;
    uint8_t                      dup;       /* HSCAN gave it twice */
} ngx_http_meter_gov_ckey_t;

typedef struct {
    u_char                       meter[METER_NAME_MAX];
    size_t                       len;
    int64_t                      granted;
    int64_t                      used;
    ngx_http_meter_gov_quota_t   q;
} ngx_http_meter_gov_ccredit_t;

/* a customer that had credit once: now and in the published copy */
typedef struct {
    uint32_t                     cust;
    uint32_t                     n;
    uint32_t                     npub;
    ngx_http_meter_gov_ccredit_t c[NGX_HTTP_METER_GOV_CREDITS];
    ngx_http_meter_gov_ccredit_t pub[NGX_HTTP_METER_GOV_CREDITS];
    u_char                       plan[MTR_PLAN_MAX];
    u_char                       pubplan[MTR_PLAN_MAX];
} ngx_http_meter_gov_ccredits_t;

typedef struct {
    ngx_str_t                    id;
    uint32_t                     reason;
    uint32_t                     khead;     /* first key; NGX_HTTP_METER_
                                             * GOV_NIL: none */
    uint32_t                     nlive;     /* keys neither revoked nor dup */
    uint32_t                     credit;    /* into credits, or _GOV_NIL */
    int64_t                      since;
} ngx_http_meter_gov_ccust_t;

/* an array in pages of its own (mmap): it grows with mremap, without a
 * copy, and is unmapped slice by slice, not in one hold */
typedef struct {
    void                        *elts;
    ngx_uint_t                   nelts;
    ngx_uint_t                   nalloc;
    size_t                       size;
} ngx_http_meter_gov_vec_t;

typedef struct {
    u_char                      *p;
    size_t                       len;
} ngx_http_meter_gov_junk_t;

typedef struct {
    ngx_pool_t                  *pool;
    uint64_t                     version;   /* read before the scan */
    ngx_http_meter_gov_vec_t     keys;      /* ngx_http_meter_gov_ckey_t */
    ngx_http_meter_gov_vec_t     custs;     /* ngx_http_meter_gov_ccust_t */
    ngx_array_t                  credits;   /* ngx_http_meter_gov_ccredits_t */
    uint64_t                    *map;       /* customer id -> gen << 32
                                             * | index + 1 */
    uint32_t                     map_mask;
    uint32_t                     gen;       /* map entries of other gens
                                             * are free */
    ngx_uint_t                   nrevoked;
} ngx_http_meter_gov_view_t;

/* a grant of credit, a quota, or (plan set) the customer's plan */
typedef struct {
    ngx_str_t                    cust;
    ngx_str_t                    meter;
    int64_t                      granted;
    ngx_http_meter_gov_quota_t   q;
    ngx_str_t                    plan;
} ngx_http_meter_gov_grant_t;

/* a field of mtr:gov that mtr:gov:log says a version rewrote */
typedef struct {
    uint64_t                     version;
    u_char                       hex[METER_HEX_LEN];
} ngx_http_meter_gov_delta_t;


typedef struct {
    const char                  *name;      /* in JSON */
    const char                  *help;
    const char                  *type;
    const char                  *prom;      /* in Prometheus, when the
                                             * naming rules want another:
                                             * counters end in _total,
                                             * units are base units */
    ngx_uint_t                   ms;        /* milliseconds, shown as
                                             * seconds in Prometheus */
} ngx_http_meter_stat_t;


/*
 * Per worker process, three parts.  The connection knows nothing of the
 * other two: it tells them what happens through the hooks they register
 * (as nginx's balancers hook peer.init_upstream), and they read its state.
 */

typedef void (*ngx_http_meter_redis_hook_pt)(void *data);

typedef struct {
    ngx_http_meter_redis_hook_pt  ready;    /* connected, AUTH/SELECT sent */
    ngx_http_meter_redis_hook_pt  refused;  /* AUTH/SELECT/SCRIPT LOAD
                                             * refused: being dropped */
    ngx_http_meter_redis_hook_pt  down;     /* dropped; pending callbacks
                                             * have run with no reply */
    void                         *data;
} ngx_http_meter_redis_hooks_t;


/* the Redis connection */
typedef struct {
    ngx_http_meter_main_conf_t   *mcf;
    ngx_log_t                    *log;

    redisAsyncContext            *ac;
    ngx_http_meter_redis_state_e  state;
    ngx_msec_t                    backoff;
    ngx_msec_t                    next_connect;
    ngx_uint_t                    down_logged;

    ngx_event_t                   timeout;  /* connect/command timeout */

    redisAsyncContext            *sac;      /* a Sentinel being asked */
    ngx_uint_t                    sentinel; /* the one to ask first */
    ngx_uint_t                    asked;    /* Sentinels asked this round */
    char                          host[NGX_HTTP_METER_HOST_LEN];
    int                           port;     /* where ac is connected */

    ngx_uint_t                    nhooks;
    ngx_http_meter_redis_hooks_t  hooks[NGX_HTTP_METER_REDIS_HOOKS];
} ngx_http_meter_redis_t;


/*
 * One writer session: what this worker writes into one zone's writer
 * hashes over one Redis connection (docs/redis-schema.md).  A connection
 * runs its commands in order, so within a session a field only grows;
 * a new connection takes a new SID.
 */
typedef struct {
    uint64_t                      sid;      /* 0: none yet */
    uint32_t                      hours[2]; /* indexed in this session */
} ngx_http_meter_wsess_t;


/*
 * A reply's tag: an item of the key layout (< BATCH), the writer HSET of
 * group tag - BATCH (an hour and part), an index command, or the unique
 * users script of group tag - TAG_UGROUP (a key, meter and period).
 */
#define NGX_HTTP_METER_TAG_GROUP    NGX_HTTP_METER_BATCH
#define NGX_HTTP_METER_TAG_INDEX    (2 * NGX_HTTP_METER_BATCH)
#define NGX_HTTP_METER_TAG_UGROUP   (4 * NGX_HTTP_METER_BATCH)

/* sends one command built in cmd, whose reply gets tag */
typedef ngx_int_t (*ngx_http_meter_emit_pt)(void *data, u_char *cmd,
    size_t len, ngx_uint_t tag);


/* the flush */
typedef struct {
    ngx_http_meter_main_conf_t   *mcf;
    ngx_log_t                    *log;
    ngx_http_meter_redis_t       *redis;

    ngx_uint_t                    reload_script;
    char                          script_sha[41];
    char                          uscript_sha[41]; /* unique users' */

    ngx_event_t                   tick;     /* flush interval timer */
    ngx_event_t                   slice;    /* next slice, posted */

    ngx_uint_t                    pass;     /* a flush pass is running */
    ngx_uint_t                    passes;
    ngx_uint_t                    zone;     /* index into mcf->zones */
    ngx_http_meter_zone_mode_e    zone_mode;
    ngx_msec_t                    zone_start;
    uint32_t                      zone_hour; /* hour when the zone began */
    ngx_uint_t                    outstanding;
    ngx_uint_t                    failed;
    ngx_uint_t                    qs_logged;
    ngx_uint_t                    index_failed;
    meter_batch_t                 batch;
    meter_batch_item_t            items[NGX_HTTP_METER_BATCH];

    /* unique users: sent first in each zone of a pass */
    ngx_uint_t                    usent;    /* the zone's are done */
    ngx_uint_t                    ubusy;    /* the batch in flight is ubatch */
    ngx_uint_t                    ngroups_u;
    meter_ubatch_t                ubatch;
    meter_uitem_t                 uitems[NGX_HTTP_METER_UBATCH];

    ngx_http_meter_wsess_t       *sess;     /* one per zone */
    u_char                       *out;      /* the batch's RESP, reused */
    /* the batch's writer HSETs: one group per (hour, part), its items
     * chained from gfirst through inext */
    ngx_uint_t                    ngroups;
    uint32_t                      ghour[NGX_HTTP_METER_BATCH];
    uint32_t                      gpart[NGX_HTTP_METER_BATCH];
    uint16_t                      gfirst[NGX_HTTP_METER_BATCH];
    uint16_t                      glast[NGX_HTTP_METER_BATCH];
    uint16_t                      gn[NGX_HTTP_METER_BATCH];
    uint16_t                      inext[NGX_HTTP_METER_BATCH];
} ngx_http_meter_flush_t;


/* the governance refresh: phases of ngx_http_meter_gov_refresh.c */
typedef struct {
    ngx_http_meter_main_conf_t   *mcf;
    ngx_log_t                    *log;
    ngx_http_meter_redis_t       *redis;

    ngx_event_t                   gov_tick; /* governance refresh timer */
    ngx_event_t                   gov_slice; /* the next slice, posted */
    ngx_uint_t                    gov_phase; /* 0: no refresh running */
    ngx_uint_t                    gov_busy; /* replies outstanding */
    ngx_uint_t                    gov_sent; /* every command of the phase
                                             * is sent */
    ngx_msec_t                    gov_started; /* last reply or start */
    ngx_uint_t                    gov_failed;
    ngx_uint_t                    gov_valid; /* gov_view is complete */
    uint64_t                      gov_new_version;
    ngx_uint_t                    gov_hlen; /* HLEN mtr:gov */
    ngx_http_meter_gov_view_t     gov_view; /* the last complete scan */
    ngx_http_meter_gov_view_t     gov_scan; /* a scan under way */
    ngx_int_t                     gov_kbuf; /* shm key table of gov_view;
                                             * -1: none built */
    uint32_t                      gov_mask; /* its slots - 1 */
    ngx_uint_t                    gov_spare; /* the key table being built */
    ngx_uint_t                    gov_cspare; /* the customer table, same */
    uint64_t                      gov_pubgen; /* pubgen of our publish */
    ngx_uint_t                    gov_rebuilt; /* 0, 1 customers, 2 keys */
    char                          gov_cursor[24]; /* HSCAN cursor */
    char                          gov_qcursor[24]; /* of mtr:gov:quota */
    redisReply                  **gov_page; /* a page taken from hiredis */
    size_t                        gov_page_n;
    ngx_uint_t                    gov_last_page;

    /* where the current phase is */
    ngx_uint_t                    gov_i;
    uint32_t                      gov_k;
    ngx_uint_t                    gov_z;    /* zone being seeded */
    ngx_uint_t                    gov_credit; /* some customer has credit */
    ngx_uint_t                    gov_delinquent;
    ngx_uint_t                    gov_blocked;

    /* what this refresh cost: slices, their longest hold (wall, CPU) and
     * their CPU in all, microseconds */
    ngx_uint_t                    gov_slices;
    uint64_t                      gov_longest;
    uint64_t                      gov_total;
    uint64_t                      gov_slice_start;
    uint64_t                      gov_slice_cpu;
    uint64_t                      gov_longest_cpu;
    ngx_msec_t                    gov_begun; /* the refresh's start */
    ngx_uint_t                    gov_depth; /* a slice is being timed */
    ngx_uint_t                    gov_slice_phase;
    ngx_uint_t                    gov_budget_n;

    ngx_http_meter_gov_view_t     gov_spare_view; /* the arrays of the
                                             * view before, for the next
                                             * scan: its pages are
                                             * faulted in already */
    uint32_t                      gov_gen;
    ngx_http_meter_gov_junk_t     gov_junk[8]; /* pages to unmap */
    ngx_uint_t                    gov_njunk;

    ngx_pool_t                   *gov_tmp;  /* one refresh */
    ngx_array_t                   gov_grants; /* ngx_http_meter_gov_grant_t */

    /* mtr:gov:log: the fields the versions since gov_view's rewrote */
    ngx_array_t                   gov_delta; /* ngx_http_meter_gov_delta_t */
    uint64_t                      gov_log_upto; /* logged without a gap up
                                             * to this version */
    ngx_uint_t                    gov_log_all; /* no use: read all */
    ngx_uint_t                    gov_inplace; /* the delta writes the
                                             * published copy */
    ngx_uint_t                    gov_tkeys; /* keys in gov_kbuf's table */
} ngx_http_meter_gov_refresh_t;


typedef struct {
    ngx_http_meter_redis_t        redis;
    ngx_http_meter_flush_t        flush;
    ngx_http_meter_gov_refresh_t  gov;
} ngx_http_meter_worker_t;


extern ngx_module_t              ngx_http_meter_module;

/* NULL outside a worker, and in one that neither counts nor flushes */
extern ngx_http_meter_worker_t  *ngx_http_meter_worker;
extern ngx_http_meter_stat_t     ngx_http_meter_stats[];


/* ngx_http_meter_module.c */
void ngx_http_meter_init_event(ngx_event_t *ev, ngx_event_handler_pt handler,
    void *data, ngx_log_t *log);

/* ngx_http_meter_directive.c */
char *ngx_http_meter_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_meter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_meter_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_meter_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_meter_set_msec(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_meter_governance(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/* ngx_http_meter_log.c */
void ngx_http_meter_key_init(ngx_cycle_t *cycle,
    ngx_http_meter_main_conf_t *mcf);
ngx_int_t ngx_http_meter_rewrite_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_meter_log_handler(ngx_http_request_t *r);

/* gauges (ngx_http_meter_gauge.c): max= keeps the largest, last= the
 * latest reading of the hour */
#define NGX_HTTP_METER_GAUGE_MAX    1
#define NGX_HTTP_METER_GAUGE_LAST   2
#define NGX_HTTP_METER_LAST_SFX_LEN (sizeof(MTR_GAUGE_LAST_SFX) - 1)

ngx_int_t ngx_http_meter_gauge_name(ngx_conf_t *cf, ngx_http_meter_t *m);
ngx_int_t ngx_http_meter_gauge_digits(ngx_str_t *v);
uint64_t ngx_http_meter_gauge_last(ngx_http_request_t *r, uint64_t value);
void ngx_http_meter_gauge_bad(ngx_http_request_t *r, ngx_http_meter_t *m,
    ngx_str_t *v);

/* unique users (ngx_http_meter_unique.c) */
ngx_int_t ngx_http_meter_unique_period(ngx_conf_t *cf, ngx_http_meter_t *m,
    ngx_str_t *arg);
ngx_int_t ngx_http_meter_unique_var(ngx_conf_t *cf, ngx_str_t *arg,
    ngx_str_t *var);
ngx_int_t ngx_http_meter_unique_count(ngx_http_request_t *r,
    ngx_http_meter_t *m, uint8_t *hash);
ngx_int_t ngx_http_meter_unique_cmds(ngx_http_meter_flush_t *fl,
    ngx_http_meter_shctx_t *sh, meter_ubatch_t *b,
    ngx_http_meter_emit_pt emit, void *data);

/* ngx_http_meter_status.c, _status_json.c, _status_prometheus.c */
ngx_int_t ngx_http_meter_status_handler(ngx_http_request_t *r);
void ngx_http_meter_status_json(ngx_http_request_t *r, ngx_buf_t *b,
    ngx_shm_zone_t **zones, ngx_uint_t nzones, uint64_t *v);
void ngx_http_meter_status_prometheus(ngx_http_request_t *r, ngx_buf_t *b,
    ngx_shm_zone_t **zones, ngx_uint_t nzones, uint64_t *v);

/* ngx_http_meter_shm.c */
ngx_int_t ngx_http_meter_init_zone(ngx_shm_zone_t *shm_zone, void *data);
ngx_int_t ngx_http_meter_gov_init_zone(ngx_shm_zone_t *shm_zone, void *data);
ngx_int_t ngx_http_meter_lease(uint64_t *lease, ngx_msec_t interval);
void ngx_http_meter_lease_release(uint64_t *lease);

/* ngx_http_meter_redis.c */
void ngx_http_meter_redis_init(ngx_http_meter_redis_t *rd,
    ngx_http_meter_main_conf_t *mcf, ngx_log_t *log);
void ngx_http_meter_redis_hook(ngx_http_meter_redis_t *rd,
    ngx_http_meter_redis_hook_pt ready, ngx_http_meter_redis_hook_pt refused,
    ngx_http_meter_redis_hook_pt down, void *data);
void ngx_http_meter_redis_connect(ngx_http_meter_redis_t *rd);
void ngx_http_meter_redis_fail(ngx_http_meter_redis_t *rd, const char *why,
    const char *err);
void ngx_http_meter_redis_close(ngx_http_meter_redis_t *rd);
void ngx_http_meter_redis_setup_reply(redisAsyncContext *ac, void *r,
    void *privdata);
ngx_uint_t ngx_http_meter_redis_setup_cmds(ngx_http_meter_main_conf_t *mcf,
    const char *argv[2][2], size_t len[2][2], char *db);
void ngx_http_meter_redis_error(ngx_http_meter_redis_t *rd,
    redisReply *reply);
/* run_id: 40 bytes, or "" */
redisContext *ngx_http_meter_redis_connect_sync(
    ngx_http_meter_main_conf_t *mcf, struct timeval tv, ngx_log_t *log,
    u_char *run_id);
void ngx_http_meter_redis_wait(ngx_http_meter_redis_t *rd);
void ngx_http_meter_redis_answered(ngx_http_meter_redis_t *rd);

/* ngx_http_meter_flush.c */
ngx_int_t ngx_http_meter_flush_init(ngx_http_meter_flush_t *fl,
    ngx_http_meter_redis_t *rd);
void ngx_http_meter_announce(ngx_http_meter_flush_t *fl);
void ngx_http_meter_flush_exit(ngx_http_meter_flush_t *fl, ngx_log_t *log);

/* ngx_http_meter_gov.c */
ngx_int_t ngx_http_meter_access_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_meter_deny(ngx_http_request_t *r,
    ngx_http_meter_shctx_t *sh, ngx_uint_t status, ngx_uint_t why,
    const char *reason, const char *detail);

/* ngx_http_meter_gov_refresh.c: one HSCAN page of KEY from CURSOR */
ngx_int_t ngx_http_meter_gov_hscan(ngx_http_meter_gov_refresh_t *gr,
    const char *key, size_t klen, const char *cursor, redisCallbackFn *fn);

/* ngx_http_meter_quota.c */
ngx_int_t ngx_http_meter_quota_read(ngx_http_meter_gov_refresh_t *gr);
ngx_int_t ngx_http_meter_quota_check(ngx_http_request_t *r,
    ngx_http_meter_loc_conf_t *mlcf, ngx_http_meter_shctx_t *sh,
    ngx_http_meter_gov_cust_t *cust);

/* ngx_http_meter_variables.c */
ngx_int_t ngx_http_meter_add_variables(ngx_conf_t *cf);

/* ngx_http_meter_gov_refresh.c */
void ngx_http_meter_gov_refresh_init(ngx_http_meter_gov_refresh_t *gr,
    ngx_http_meter_redis_t *rd);
void ngx_http_meter_gov_read_done(ngx_http_meter_gov_refresh_t *gr);
void ngx_http_meter_gov_refresh_exit(ngx_http_meter_gov_refresh_t *gr);


/*
 * The request path's lookups, inlined into the log and the access phase
 * (and the refresh's seeding) as they were when this was one file.
 */


static ngx_inline ngx_http_meter_gov_key_t *
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


static ngx_inline void
ngx_http_meter_req_ctx_hash(ngx_http_meter_req_ctx_t *rctx,
    ngx_shm_zone_t *zone, ngx_str_t *key)
{
    if (rctx->zone != zone) {
        meter_key_hash(key->data, key->len, rctx->hash);
        rctx->zone = zone;
        rctx->cust = NULL;
    }
}


/* the gate's context of a main request, after internal redirects too */

static ngx_inline ngx_http_meter_req_ctx_t *
ngx_http_meter_req_ctx_find(ngx_http_request_t *r,
    ngx_http_meter_main_conf_t *mcf)
{
    return (ngx_http_meter_req_ctx_t *) r->variables[mcf->call_var].data;
}


/* the gate's context, made once a main request */

static ngx_inline ngx_http_meter_req_ctx_t *
ngx_http_meter_req_ctx_get(ngx_http_request_t *r,
    ngx_http_meter_main_conf_t *mcf)
{
    ngx_http_meter_req_ctx_t  *rctx;

    rctx = ngx_http_meter_req_ctx_find(r, mcf);

    if (rctx != NULL) {
        return rctx;
    }

    rctx = ngx_palloc(r->pool, sizeof(ngx_http_meter_req_ctx_t));
    if (rctx == NULL) {
        return NULL;
    }

    ngx_memzero(rctx, offsetof(ngx_http_meter_req_ctx_t, hash));

    r->variables[mcf->call_var].data = (u_char *) rctx;

    return rctx;
}


/*
 * The request headers a key $http_NAME reads: the first one's value in
 * key, and how many there are (with all unset: 1 once one is found).
 * Matched as nginx 1.22's ngx_http_variable_unknown_header() matches
 * them (src/http/ngx_http_variables.c: case ignored, '-' read as '_',
 * headers with hash 0 skipped), first by the lowercase name.
 */

static ngx_inline ngx_uint_t
ngx_http_meter_key_headers(ngx_http_request_t *r,
    ngx_http_meter_zone_ctx_t *ctx, ngx_str_t *key, ngx_uint_t all)
{
    u_char            ch;
    ngx_uint_t        i, n, count;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    count = 0;
    key->len = 0;
    key->data = NULL;

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

        if (h[i].hash == 0 || h[i].key.len != ctx->key_lc.len) {
            continue;
        }

        if (ngx_memcmp(h[i].lowcase_key, ctx->key_lc.data, ctx->key_lc.len)
            != 0)
        {
            /* "X_Api_Key" with underscores_in_headers, or another name */
            for (n = 0; n < ctx->key_var.len; n++) {
                ch = h[i].key.data[n];

                if (ch >= 'A' && ch <= 'Z') {
                    ch |= 0x20;

                } else if (ch == '-') {
                    ch = '_';
                }

                if (ch != ctx->key_var.data[n]) {
                    break;
                }
            }

            if (n != ctx->key_var.len) {
                continue;
            }
        }

        if (count++ == 0) {
            *key = h[i].value;

            if (!all) {
                break;
            }
        }
    }

    return count;
}


/*
 * The headers give the key, unless the variable already holds a value:
 * one "set" wrote (nginx keeps a set $http_NAME in the prefix variable,
 * src/http/ngx_http_variables.c ngx_http_variables_init_vars()), or one
 * read before, which is the headers' anyway.
 */

static ngx_inline ngx_uint_t
ngx_http_meter_key_walks(ngx_http_request_t *r,
    ngx_http_meter_zone_ctx_t *ctx)
{
    return ctx->key_direct
           && !r->variables[ctx->key_index].valid
           && !r->variables[ctx->key_index].not_found;
}


/*
 * A zone's key, as ngx_http_complex_value() gives it (src/http/
 * ngx_http_script.c: a non-cacheable variable is read afresh, a cacheable
 * one keeps its value), but for a key that is one variable without the
 * script engine and the copy into the pool.
 */

static ngx_inline ngx_int_t
ngx_http_meter_key(ngx_http_request_t *r, ngx_http_meter_zone_ctx_t *ctx,
    ngx_str_t *key)
{
    ngx_http_variable_value_t  *vv;

    if (ngx_http_meter_key_walks(r, ctx)) {
        (void) ngx_http_meter_key_headers(r, ctx, key, 0);
        return NGX_OK;
    }

    if (ctx->key_index == NGX_ERROR) {
        return ngx_http_complex_value(r, &ctx->key, key);
    }

    vv = &r->variables[ctx->key_index];

    if (vv->no_cacheable) {
        vv->valid = 0;
        vv->not_found = 0;
    }

    vv = ngx_http_get_indexed_variable(r, ctx->key_index);

    if (vv == NULL || vv->not_found) {
        key->len = 0;
        key->data = NULL;
        return NGX_OK;
    }

    key->len = vv->len;
    key->data = vv->data;

    return NGX_OK;
}


/* this worker's Redis connection is up */

static ngx_inline ngx_uint_t
ngx_http_meter_redis_ready(void)
{
    return (ngx_http_meter_worker != NULL
            && ngx_http_meter_worker->redis.state
               == NGX_HTTP_METER_REDIS_READY);
}


#endif /* _NGX_HTTP_METER_MODULE_H_INCLUDED_ */
