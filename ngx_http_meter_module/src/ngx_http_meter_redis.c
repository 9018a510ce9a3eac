
/*
 * Copyright (C) nginx-meter authors
 *
 * The Redis connection of a worker: one long-lived hiredis async context
 * on nginx's event loop (ngx_http_meter_redis_adapter.c), connect and
 * reconnect with backoff, AUTH and SELECT.  The flush and the governance
 * refresh share it: they register hooks, called when it is ready, when a
 * setup command was refused and when it went down, and read its state; it
 * writes none of their fields.
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
    char                        *host, *path;
    redisAsyncContext           *ac;
    ngx_http_meter_main_conf_t  *mcf;

    mcf = rd->mcf;

    if (mcf->redis_path.len) {
        path = (char *) mcf->redis_path.data;
        ac = redisAsyncConnectUnix(path);

    } else {
        host = (char *) mcf->redis_host.data;
        ac = redisAsyncConnect(host, (int) mcf->redis_port);
    }

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

    ngx_add_timer(&rd->timeout, mcf->redis_timeout);
}


static void
ngx_http_meter_redis_connected(const redisAsyncContext *cac, int status)
{
    char                     db[24];
    size_t                   len[2][2];
    ngx_uint_t               i, n;
    const char              *argv[2][2];
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
                      "meter: redis connection restored");
        rd->down_logged = 0;
    }
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
    ngx_http_meter_redis_t  *rd = ev->data;

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
    if (rd->ac) {
        redisAsyncSetDisconnectCallback(rd->ac, NULL);
        redisAsyncFree(rd->ac);
        rd->ac = NULL;
    }

    rd->state = NGX_HTTP_METER_REDIS_DOWN;
}
