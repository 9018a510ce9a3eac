
/*
 * Copyright (C) nginx-meter authors
 *
 * hiredis's async API on nginx's event loop, behind one call, as
 * slact/nchan's src/store/redis/redis_nginx_adapter.c and the adapters
 * of hiredis (adapters/libevent.h) do it.  Where we differ from nchan:
 * level-triggered events (hiredis reads at most 16k a call, the rest
 * waits for the next event), and the fd is left to hiredis, which closes
 * it itself (hiredis 0.14's redisFree()): the cleanup releases the nginx
 * connection only.
 */


#ifndef _NGX_HTTP_METER_REDIS_ADAPTER_H_INCLUDED_
#define _NGX_HTTP_METER_REDIS_ADAPTER_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>


/*
 * Wraps the socket of a context fresh from redisAsyncConnect*() in an
 * nginx connection and points hiredis's event hooks at it; the connect
 * completes on the first write event.  NGX_ERROR: no free connection (the
 * context is untouched, the caller frees it).
 */
ngx_int_t ngx_http_meter_redis_attach(redisAsyncContext *ac, ngx_log_t *log);


#endif /* _NGX_HTTP_METER_REDIS_ADAPTER_H_INCLUDED_ */
