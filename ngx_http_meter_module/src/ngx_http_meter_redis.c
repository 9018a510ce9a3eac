
/*
 * Copyright (C) nginx-meter authors
 *
 * The Redis connection of a worker: one long-lived hiredis async context
 * on nginx's event loop (ngx_http_meter_redis_adapter.c), connect and
 * reconnect with backoff, AUTH and SELECT.  The flush and the governance
 * refresh share it: they register hooks, called when it is ready, when a
 * setup command was refused and when it went down, and read its state; it
 * writes none of their fields.
 *
 * Ready means ROLE answered "master": nothing is written to a replica.
 * With Sentinel (meter_redis sentinel=... master=NAME) every connect first
 * asks the Sentinels, one after the other, "SENTINEL get-master-addr-by-
 * name NAME", on the same event loop (no blocking: a Sentinel that hangs
 * costs a timeout, never a stalled worker), then connects to the address
 * named.  A drop, a ROLE other than master or a -READONLY reply (a master
 * demoted under us, Redis 7 keeps its clients: replicationSetMaster() in
 * redis/redis src/replication.c) all reconnect, hence ask again.  This is
 * the order of Redis's "Sentinel clients" guidelines (steps 1-3).  After a
 * failover the new master has a new run_id: the flush then rewrites every
 * counter, which repairs writes lost to asynchronous replication.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_meter_module.h"
#include "ngx_http_meter_redis_adapter.h"


static void ngx_http_meter_redis_connected(const redisAsyncContext *ac,
    int status);
static void ngx_http_meter_redis_disconnected(const redisAsyncContext *ac,
    int status);
static void ngx_http_meter_redis_timeout_handler(ngx_event_t *ev);
static void ngx_http_meter_redis_connect_to(ngx_http_meter_redis_t *rd,
    const char *host, int port, const char *path);
static void ngx_http_meter_redis_role_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static void ngx_http_meter_sentinel_ask(ngx_http_meter_redis_t *rd);
static void ngx_http_meter_sentinel_next(ngx_http_meter_redis_t *rd,
    const char *err);
static void ngx_http_meter_sentinel_reply(redisAsyncContext *ac, void *r,
    void *privdata);
static const char *ngx_http_meter_sentinel_addr(redisReply *reply,
    char *host, int *port);
static const char *ngx_http_meter_role(redisReply *reply);
static const char *ngx_http_meter_redis_sync_ready(
    ngx_http_meter_main_conf_t *mcf, redisContext *rc, struct timeval tv,
    u_char *run_id);


void
ngx_http_meter_redis_init(ngx_http_meter_redis_t *rd,
    ngx_http_meter_main_conf_t *mcf, ngx_log_t *log)
{
    rd->mcf = mcf;
    rd->log = log;

    ngx_http_meter_init_event(&rd->timeout,
                              ngx_http_meter_redis_timeout_handler, rd, log);
}


/* hooks run in the order they were added: the flush's first */

void
ngx_http_meter_redis_hook(ngx_http_meter_redis_t *rd,
    ngx_http_meter_redis_hook_pt ready, ngx_http_meter_redis_hook_pt refused,
    ngx_http_meter_redis_hook_pt down, void *data)
{
    ngx_http_meter_redis_hooks_t  *hk;

    if (rd->nhooks == NGX_HTTP_METER_REDIS_HOOKS) {
        ngx_log_error(NGX_LOG_ALERT, rd->log, 0,
                      "meter: too many redis connection hooks");
        return;
    }

    hk = &rd->hooks[rd->nhooks++];

    hk->ready = ready;
    hk->refused = refused;
    hk->down = down;
    hk->data = data;
}


void
ngx_http_meter_redis_connect(ngx_http_meter_redis_t *rd)
{
    ngx_http_meter_main_conf_t  *mcf;

    mcf = rd->mcf;

    if (mcf->redis_sentinels != NULL) {
        rd->asked = 0;
        rd->state = NGX_HTTP_METER_REDIS_CONN;
        ngx_http_meter_sentinel_ask(rd);
        return;
    }

    if (mcf->redis_path.len) {
        ngx_http_meter_redis_connect_to(rd, NULL, 0,
                                        (char *) mcf->redis_path.data);

    } else {
        ngx_http_meter_redis_connect_to(rd, (char *) mcf->redis_host.data,
                                        (int) mcf->redis_port, NULL);
    }
}


static void
ngx_http_meter_redis_connect_to(ngx_http_meter_redis_t *rd,
    const char *host, int port, const char *path)
{
    redisAsyncContext  *ac;

    if (path != NULL) {
        ac = redisAsyncConnectUnix(path);
        (void) ngx_cpystrn((u_char *) rd->host, (u_char *) path,
                           sizeof(rd->host));

    } else {
        ac = redisAsyncConnect(host, port);
        (void) ngx_cpystrn((u_char *) rd->host, (u_char *) host,
                           sizeof(rd->host));
    }

    rd->port = port;

    if (ac == NULL) {
        ngx_http_meter_redis_fail(rd, "connect", "out of memory");
        return;
    }

    if (ac->err) {
        ngx_http_meter_redis_fail(rd, "connect", ac->errstr);
        redisAsyncFree(ac);
        return;
    }

    if (ngx_http_meter_redis_attach(ac, rd->log) != NGX_OK) {
        redisAsyncFree(ac);
        ngx_http_meter_redis_fail(rd, "connect", "no free connection");
        return;
    }

    ac->data = rd;

    rd->ac = ac;
    rd->state = NGX_HTTP_METER_REDIS_CONN;

    redisAsyncSetConnectCallback(ac, ngx_http_meter_redis_connected);
    redisAsyncSetDisconnectCallback(ac, ngx_http_meter_redis_disconnected);

    ngx_add_timer(&rd->timeout, rd->mcf->redis_timeout);
}


/*
 * One Sentinel, asked on its own async context.  Its reply callback is the
 * only place that moves on: hiredis calls it once, with the reply or, when
 * the context dies (refused, reset), with NULL.  No connect callback: a
 * failed connect frees the context, which runs it with NULL.
 */

static void
ngx_http_meter_sentinel_ask(ngx_http_meter_redis_t *rd)
{
    size_t                       len[3];
    const char                  *argv[3];
    redisAsyncContext           *ac;
    ngx_http_meter_addr_t       *sn;
    ngx_http_meter_main_conf_t  *mcf;

    mcf = rd->mcf;
    sn = mcf->redis_sentinels->elts;
    sn = &sn[rd->sentinel];

    ac = redisAsyncConnect((char *) sn->host.data, (int) sn->port);

    if (ac == NULL) {
        ngx_http_meter_redis_fail(rd, "sentinel query", "out of memory");
        return;
    }

    if (ac->err) {
        ngx_log_error(NGX_LOG_INFO, rd->log, 0,
                      "meter: sentinel %V:%i: %s", &sn->host, sn->port,
                      ac->errstr);
        redisAsyncFree(ac);
        ngx_http_meter_sentinel_next(rd, "connect failed");
        return;
    }

    if (ngx_http_meter_redis_attach(ac, rd->log) != NGX_OK) {
        redisAsyncFree(ac);
        ngx_http_meter_redis_fail(rd, "sentinel query", "no free connection");
        return;
    }

    ac->data = rd;
    rd->sac = ac;

    /* queued now, sent once the connect completes */
    argv[0] = "SENTINEL"; len[0] = 8;
    argv[1] = "get-master-addr-by-name"; len[1] = 23;
    argv[2] = (char *) mcf->redis_master.data; len[2] = mcf->redis_master.len;

    if (redisAsyncCommandArgv(ac, ngx_http_meter_sentinel_reply, rd, 3, argv,
                              len)
        != REDIS_OK)
    {
        rd->sac = NULL;
        redisAsyncFree(ac);
        ngx_http_meter_sentinel_next(rd, "cannot send");
        return;
    }

    ngx_add_timer(&rd->timeout, mcf->redis_timeout);
}


static void
ngx_http_meter_sentinel_next(ngx_http_meter_redis_t *rd, const char *err)
{
    u_char  buf[NGX_HTTP_METER_HOST_LEN], *p;

    if (++rd->asked < rd->mcf->redis_sentinels->nelts) {
        rd->sentinel = (rd->sentinel + 1) % rd->mcf->redis_sentinels->nelts;
        ngx_http_meter_sentinel_ask(rd);
        return;
    }

    p = ngx_snprintf(buf, sizeof(buf) - 1, "no Sentinel named the master "
                     "\"%V\" (last: %s)", &rd->mcf->redis_master, err);
    *p = '\0';

    ngx_http_meter_redis_fail(rd, "sentinel query", (char *) buf);
}


static void
ngx_http_meter_sentinel_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    int                      port;
    char                     host[NGX_HTTP_METER_HOST_LEN];
    redisReply              *reply = r;
    const char              *err;
    ngx_http_meter_addr_t   *sn;
    ngx_http_meter_redis_t  *rd = privdata;

    if (rd->sac != ac) {
        return;                 /* given up on: timed out, or closing */
    }

    rd->sac = NULL;

    if (rd->timeout.timer_set) {
        ngx_del_timer(&rd->timeout);
    }

    sn = rd->mcf->redis_sentinels->elts;
    sn = &sn[rd->sentinel];

    if (reply == NULL) {
        err = ac->errstr[0] ? ac->errstr : "connection lost";

    } else {
        err = ngx_http_meter_sentinel_addr(reply, host, &port);

        /* a clean close, once this callback returned */
        redisAsyncDisconnect(ac);
    }

    if (err != NULL) {
        ngx_log_error(NGX_LOG_INFO, rd->log, 0,
                      "meter: sentinel %V:%i: %s", &sn->host, sn->port, err);
        ngx_http_meter_sentinel_next(rd, err);
        return;
    }

    if (rd->port != port || ngx_strcmp(rd->host, host) != 0) {
        ngx_log_error(NGX_LOG_NOTICE, rd->log, 0,
                      "meter: sentinel %V:%i: master \"%V\" is %s:%d",
                      &sn->host, sn->port, &rd->mcf->redis_master, host,
                      port);
    }

    ngx_http_meter_redis_connect_to(rd, host, port, NULL);
}


/*
 * The reply of SENTINEL get-master-addr-by-name: a null array for a master
 * it does not monitor, else [ip, port] as two bulk strings (redis/redis
 * src/sentinel.c, sentinelCommand(): addReplyNullArray, or
 * addReplyBulkCString + addReplyBulkLongLong).  NULL, or what is wrong.
 */

static const char *
ngx_http_meter_sentinel_addr(redisReply *reply, char *host, int *port)
{
    ngx_int_t  n;

    if (reply->type == REDIS_REPLY_ERROR) {
        return reply->str;
    }

    if (reply->type == REDIS_REPLY_NIL) {
        return "does not know this master";
    }

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[1]->type != REDIS_REPLY_STRING
        || reply->element[0]->len == 0
        || reply->element[0]->len >= NGX_HTTP_METER_HOST_LEN)
    {
        return "unexpected reply";
    }

    n = ngx_atoi((u_char *) reply->element[1]->str, reply->element[1]->len);

    if (n < 1 || n > 65535) {
        return "unexpected port";
    }

    ngx_memcpy(host, reply->element[0]->str, reply->element[0]->len);
    host[reply->element[0]->len] = '\0';
    *port = (int) n;

    return NULL;
}


/* NULL for a master, else the role it has ("slave", "sentinel") */

static const char *
ngx_http_meter_role(redisReply *reply)
{
    if (reply->type == REDIS_REPLY_ERROR) {
        return reply->str;
    }

    /* ["master", offset, replicas] (redis/redis src/replication.c,
     * roleCommand()) */
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements == 0
        || reply->element[0]->type != REDIS_REPLY_STRING)
    {
        return "unexpected reply to ROLE";
    }

    if (ngx_strcmp(reply->element[0]->str, "master") == 0) {
        return NULL;
    }

    return reply->element[0]->str;
}


static void
ngx_http_meter_redis_connected(const redisAsyncContext *cac, int status)
{
    char                     db[24];
    size_t                   len[2][2], rlen;
    ngx_uint_t               i, n;
    const char              *argv[2][2], *role;
    redisAsyncContext       *ac = (redisAsyncContext *) cac;
    ngx_http_meter_redis_t  *rd = ac->data;

    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback */
        rd->ac = NULL;
        ngx_http_meter_redis_fail(rd, "connect", ac->errstr);
        return;
    }

    n = ngx_http_meter_redis_setup_cmds(rd->mcf, argv, len, db);

    for (i = 0; i < n; i++) {
        (void) redisAsyncCommandArgv(ac, ngx_http_meter_redis_setup_reply, rd,
                                     2, argv[i], len[i]);
    }

    /* ready only once ROLE said master; the timeout runs on */
    role = "ROLE";
    rlen = 4;
    (void) redisAsyncCommandArgv(ac, ngx_http_meter_redis_role_reply, rd, 1,
                                 &role, &rlen);
}


static void
ngx_http_meter_redis_role_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    u_char                   buf[NGX_HTTP_METER_HOST_LEN + 64], *p;
    redisReply              *reply = r;
    ngx_uint_t               i;
    const char              *role;
    ngx_http_meter_redis_t  *rd = privdata;

    if (reply == NULL || rd->ac != ac
        || (ac->c.flags & REDIS_DISCONNECTING))
    {
        return;                 /* dropped, or AUTH/SELECT refused */
    }

    role = ngx_http_meter_role(reply);

    if (role != NULL) {
        p = ngx_snprintf(buf, sizeof(buf) - 1, "%s:%d is %s, not the master",
                         rd->host, rd->port, role);
        *p = '\0';

        rd->backoff = 0;        /* Sentinel may be mid-failover: soon */
        ngx_http_meter_redis_fail(rd, "role check", (char *) buf);
        return;
    }

    if (rd->timeout.timer_set) {
        ngx_del_timer(&rd->timeout);
    }

    rd->state = NGX_HTTP_METER_REDIS_READY;
    rd->backoff = 0;

    /* the flush queues INFO and reloads its script, the refresh restarts */
    for (i = 0; i < rd->nhooks; i++) {
        if (rd->hooks[i].ready != NULL) {
            rd->hooks[i].ready(rd->hooks[i].data);
        }
    }

    if (rd->down_logged) {
        ngx_log_error(NGX_LOG_NOTICE, rd->log, 0,
                      "meter: redis connection restored (%s:%d)", rd->host,
                      rd->port);
        rd->down_logged = 0;
    }
}


/*
 * An error reply to a command of the flush or the refresh.  -READONLY: the
 * master was demoted (a failover while it was away, Redis keeps the
 * connection): close cleanly, the replies still pending fail, and the
 * reconnect asks the Sentinels again.
 */

void
ngx_http_meter_redis_error(ngx_http_meter_redis_t *rd, redisReply *reply)
{
    if (reply == NULL || reply->type != REDIS_REPLY_ERROR
        || ngx_strncmp(reply->str, "READONLY", 8) != 0
        || rd->ac == NULL || (rd->ac->c.flags & REDIS_DISCONNECTING))
    {
        return;
    }

    ngx_log_error(NGX_LOG_WARN, rd->log, 0,
                  "meter: redis %s:%d is a replica now (READONLY); "
                  "reconnecting", rd->host, rd->port);

    redisAsyncDisconnect(rd->ac);
}


void
ngx_http_meter_redis_setup_reply(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply              *reply = r;
    ngx_uint_t               i;
    ngx_http_meter_redis_t  *rd = privdata;

    if (reply == NULL) {
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "meter: redis setup failed: %*s",
                      (int) ngx_min(reply->len, 256), reply->str);

        /* AUTH/SELECT/SCRIPT LOAD refused: the flushes would fail too */
        for (i = 0; i < rd->nhooks; i++) {
            if (rd->hooks[i].refused != NULL) {
                rd->hooks[i].refused(rd->hooks[i].data);
            }
        }

        redisAsyncDisconnect(ac);
        return;
    }
}


static void
ngx_http_meter_redis_disconnected(const redisAsyncContext *ac, int status)
{
    ngx_http_meter_redis_t  *rd = ac->data;

    /* hiredis frees the context after this callback */
    rd->ac = NULL;

    if (status == REDIS_OK && (ngx_exiting || ngx_quit || ngx_terminate)) {
        rd->state = NGX_HTTP_METER_REDIS_DOWN;
        return;
    }

    ngx_http_meter_redis_fail(rd, "connection",
                              ac->errstr[0] ? ac->errstr : "closed");
}


/*
 * Marks the connection down, drops it, and schedules a reconnect with
 * exponential backoff.  Logged once per outage, not per attempt.
 */

void
ngx_http_meter_redis_fail(ngx_http_meter_redis_t *rd, const char *why,
    const char *err)
{
    ngx_uint_t          i;
    redisAsyncContext  *ac;

    if (!rd->down_logged) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "meter: redis %s failed: %s; counters are kept in "
                      "shared memory and retried",
                      why, err ? err : "");
        rd->down_logged = 1;
    }

    if (rd->timeout.timer_set) {
        ngx_del_timer(&rd->timeout);
    }

    rd->state = NGX_HTTP_METER_REDIS_DOWN;

    rd->backoff = rd->backoff ? ngx_min(rd->backoff * 2,
                                        NGX_HTTP_METER_BACKOFF_MAX)
                              : NGX_HTTP_METER_BACKOFF_MIN;
    rd->next_connect = ngx_current_msec + rd->backoff;

    ac = rd->sac;

    if (ac != NULL) {
        rd->sac = NULL;
        redisAsyncFree(ac);
    }

    ac = rd->ac;

    if (ac != NULL) {
        rd->ac = NULL;
        ac->data = rd;

        /* pending callbacks run now, with no reply: the batch fails */
        redisAsyncSetDisconnectCallback(ac, NULL);
        redisAsyncFree(ac);
    }

    /* the flush's pass ends, what was in flight will not be answered */
    for (i = 0; i < rd->nhooks; i++) {
        if (rd->hooks[i].down != NULL) {
            rd->hooks[i].down(rd->hooks[i].data);
        }
    }
}


static void
ngx_http_meter_redis_timeout_handler(ngx_event_t *ev)
{
    redisAsyncContext       *ac;
    ngx_http_meter_redis_t  *rd = ev->data;

    if (rd->sac != NULL) {
        /* its callback sees it is no longer ours */
        ac = rd->sac;
        rd->sac = NULL;
        redisAsyncFree(ac);
        ngx_http_meter_sentinel_next(rd, "timed out");
        return;
    }

    ngx_http_meter_redis_fail(rd, rd->state == NGX_HTTP_METER_REDIS_CONN
                                  ? "connect" : "command",
                              "timed out");
}


/* a command to wait for: a Redis that does not answer is dropped */

void
ngx_http_meter_redis_wait(ngx_http_meter_redis_t *rd)
{
    ngx_add_timer(&rd->timeout, rd->mcf->redis_timeout);
}


void
ngx_http_meter_redis_answered(ngx_http_meter_redis_t *rd)
{
    if (rd->timeout.timer_set) {
        ngx_del_timer(&rd->timeout);
    }
}


/*
 * AUTH and SELECT as configured, for this connection and the blocking one
 * of the final flush alike; db has room for 24 bytes.  Returns how many.
 */

ngx_uint_t
ngx_http_meter_redis_setup_cmds(ngx_http_meter_main_conf_t *mcf,
    const char *argv[2][2], size_t len[2][2], char *db)
{
    ngx_uint_t  n;

    n = 0;

    if (mcf->redis_password.len) {
        argv[n][0] = "AUTH"; len[n][0] = 4;
        argv[n][1] = (char *) mcf->redis_password.data;
        len[n][1] = mcf->redis_password.len;
        n++;
    }

    if (mcf->redis_db) {
        argv[n][0] = "SELECT"; len[n][0] = 6;
        argv[n][1] = db;
        len[n][1] = meter_fmt_u64(db, (uint64_t) mcf->redis_db);
        n++;
    }

    return n;
}


/* exit: nothing drives the event loop any more */

void
ngx_http_meter_redis_close(ngx_http_meter_redis_t *rd)
{
    redisAsyncContext  *ac;

    if (rd->sac) {
        ac = rd->sac;
        rd->sac = NULL;
        redisAsyncFree(ac);
    }

    if (rd->ac) {
        redisAsyncSetDisconnectCallback(rd->ac, NULL);
        redisAsyncFree(rd->ac);
        rd->ac = NULL;
    }

    rd->state = NGX_HTTP_METER_REDIS_DOWN;
}


/*
 * The blocking connection of the final flush, at exit, ready as the async
 * one is: AUTH and SELECT, then ROLE must say master, so that the last
 * counts never go to a replica (-READONLY: they would stay in a zone about
 * to go) nor, with sentinel=, to a master the Sentinels no longer name (a
 * demoted one that took them would lose them at its resync).  The
 * Sentinels are asked in turn (from the one the async connection used
 * last) until one names a master that says so; each step bounded by the
 * timeout.  run_id gets the server's (INFO server; "" if none) for the
 * caller's resync.  NULL: logged.
 */

redisContext *
ngx_http_meter_redis_connect_sync(ngx_http_meter_main_conf_t *mcf,
    struct timeval tv, ngx_log_t *log, u_char *run_id)
{
    int                     port;
    char                    host[NGX_HTTP_METER_HOST_LEN];
    size_t                  len[3];
    ngx_uint_t              i, n, first;
    const char             *argv[3], *err;
    redisReply             *reply;
    redisContext           *rc, *sc;
    ngx_http_meter_addr_t  *sn;

    err = "no Sentinel named the master";
    rc = NULL;

    if (mcf->redis_sentinels != NULL) {
        sn = mcf->redis_sentinels->elts;
        n = mcf->redis_sentinels->nelts;
        first = (ngx_http_meter_worker != NULL)
                ? ngx_http_meter_worker->redis.sentinel : 0;

        argv[0] = "SENTINEL"; len[0] = 8;
        argv[1] = "get-master-addr-by-name"; len[1] = 23;
        argv[2] = (char *) mcf->redis_master.data;
        len[2] = mcf->redis_master.len;

        for (i = 0; i < n && rc == NULL; i++) {
            sc = redisConnectWithTimeout((char *) sn[(first + i) % n].host.data,
                                         (int) sn[(first + i) % n].port, tv);

            if (sc == NULL || sc->err
                || redisSetTimeout(sc, tv) != REDIS_OK)
            {
                if (sc != NULL) {
                    redisFree(sc);
                }

                continue;
            }

            reply = redisCommandArgv(sc, 3, argv, len);

            if (reply != NULL
                && ngx_http_meter_sentinel_addr(reply, host, &port) == NULL)
            {
                rc = redisConnectWithTimeout(host, port, tv);
                err = ngx_http_meter_redis_sync_ready(mcf, rc, tv, run_id);

                if (err != NULL) {
                    ngx_log_error(NGX_LOG_WARN, log, 0,
                                  "meter: final flush: %s:%d: %s", host,
                                  port, err);
                    if (rc != NULL) {
                        redisFree(rc);
                        rc = NULL;
                    }

                    err = "no master the Sentinels named";
                }
            }

            freeReplyObject(reply);
            redisFree(sc);
        }

        if (rc == NULL) {
            goto failed;
        }

        return rc;
    }

    if (mcf->redis_path.len) {
        rc = redisConnectUnixWithTimeout((char *) mcf->redis_path.data, tv);

    } else {
        rc = redisConnectWithTimeout((char *) mcf->redis_host.data,
                                     (int) mcf->redis_port, tv);
    }

    err = ngx_http_meter_redis_sync_ready(mcf, rc, tv, run_id);

    if (err == NULL) {
        return rc;
    }

failed:

    ngx_log_error(NGX_LOG_WARN, log, 0,
                  "meter: final flush: redis unreachable (%s); counters "
                  "stay in shared memory", err);

    if (rc != NULL) {
        redisFree(rc);
    }

    return NULL;
}


/* AUTH, SELECT, ROLE and INFO server, one round trip; NULL: a master */

static const char *
ngx_http_meter_redis_sync_ready(ngx_http_meter_main_conf_t *mcf,
    redisContext *rc, struct timeval tv, u_char *run_id)
{
    char               db[24];
    u_char            *p, *end;
    size_t             len[2][2];
    ngx_uint_t         i, n;
    const char        *argv[2][2], *err, *role;
    redisReply        *reply;

    static u_char      buf[64];

    run_id[0] = '\0';

    if (rc == NULL) {
        return "out of memory";
    }

    if (rc->err) {
        return rc->errstr;
    }

    if (redisSetTimeout(rc, tv) != REDIS_OK) {
        return "cannot set the timeout";
    }

    n = ngx_http_meter_redis_setup_cmds(mcf, argv, len, db);

    for (i = 0; i < n; i++) {
        (void) redisAppendCommandArgv(rc, 2, argv[i], len[i]);
    }

    (void) redisAppendCommand(rc, "ROLE");
    (void) redisAppendCommand(rc, "INFO server");

    err = NULL;

    for (i = 0; i < n + 2; i++) {
        if (redisGetReply(rc, (void **) &reply) != REDIS_OK) {
            return rc->errstr;
        }

        if (err != NULL) {
            /* read on: the replies are in order */

        } else if (i < n) {
            if (reply->type == REDIS_REPLY_ERROR) {
                err = "AUTH/SELECT refused";
            }

        } else if (i == n) {
            role = ngx_http_meter_role(reply);

            if (role != NULL) {
                p = ngx_snprintf(buf, sizeof(buf) - 1,
                                 "is %s, not the master", role);
                *p = '\0';
                err = (char *) buf;
            }

        } else if (reply->type == REDIS_REPLY_STRING) {
            p = (u_char *) ngx_strnstr((u_char *) reply->str, "run_id:",
                                       reply->len);
            end = (u_char *) reply->str + reply->len;

            if (p != NULL && end - p >= (ssize_t) sizeof("run_id:") - 1 + 40)
            {
                ngx_memcpy(run_id, p + sizeof("run_id:") - 1, 40);
            }
        }

        freeReplyObject(reply);
    }

    return err;
}
