
/*
 * Copyright (C) nginx-meter authors
 *
 * hiredis on nginx's event loop: see ngx_http_meter_redis_adapter.h.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include "ngx_http_meter_redis_adapter.h"


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


ngx_int_t
ngx_http_meter_redis_attach(redisAsyncContext *ac, ngx_log_t *log)
{
    ngx_connection_t  *c;

    c = ngx_get_connection(ac->c.fd, log);
    if (c == NULL) {
        return NGX_ERROR;
    }

    c->data = ac;
    c->read->log = log;
    c->write->log = log;

    ac->ev.data = c;
    ac->ev.addRead = ngx_http_meter_redis_add_read;
    ac->ev.delRead = ngx_http_meter_redis_del_read;
    ac->ev.addWrite = ngx_http_meter_redis_add_write;
    ac->ev.delWrite = ngx_http_meter_redis_del_write;
    ac->ev.cleanup = ngx_http_meter_redis_cleanup;

    /* the non-blocking connect completes on the first write event */
    ngx_http_meter_redis_add_write(c);

    return NGX_OK;
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
