
/*
 * Copyright (C) nginx-meter authors
 *
 * Blocking hiredis access for meter-worker and meterctl.  Every read and
 * write has a timeout (redis.timeout), so a hung Redis never stops the main
 * loop from checking its signal flags and petting the watchdog.
 *
 * meter_redis_exec() is the one seam every command goes through (unit
 * tests wrap it with -Wl,--wrap=meter_redis_exec).
 */


#ifndef _METER_REDIS_H_INCLUDED_
#define _METER_REDIS_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>


typedef struct {
    redisContext               *ctx;
    char                        err[256];
    int                         evalsha;        /* scripts loaded */
    char                        master[256];    /* Sentinel's answer, the */
    int                         master_port;    /* address connected to */
    size_t                      sentinel;       /* asked first: the last
                                                 * one that answered */
} meter_redis_t;


/* redis = sentinel://host:port[,host:port...]/MASTER */
#define METER_SENTINELS_MAX  8

typedef struct {
    char                        host[METER_SENTINELS_MAX][256];
    int                         port[METER_SENTINELS_MAX];
    size_t                      n;
    char                        master[256];
} meter_sentinels_t;


/* 0, or -1: not of that form */
int meter_sentinel_parse(const char *url, meter_sentinels_t *sl);


/* connects, AUTH, SELECT, and checks ROLE is master (never a replica);
 * host may be a whole sentinel:// URL (port unused): the Sentinels are
 * asked for the master first.  0 or -1 with err (no secrets in it) */
int meter_redis_connect(meter_redis_t *r, const char *host, int port,
    const char *unix_path, const char *password, int db, int64_t timeout_ms,
    char *err, size_t errlen);
/* the same with the password read from password_file (NULL: none), wiped
 * after use; 0, -1 connect failed, -2 the file unreadable (err says why) */
int meter_redis_open(meter_redis_t *r, const char *host, int port,
    const char *unix_path, const char *password_file, int db,
    int64_t timeout_ms, char *err, size_t errlen);
void meter_redis_close(meter_redis_t *r);
/* with a sentinel:// url: 1 when the Sentinels now name another master
 * than the one connected (the connection is closed, r->err says so), 0
 * when the same or no Sentinel answered (nothing to go by) */
int meter_redis_follow(meter_redis_t *r, const char *url,
    int64_t timeout_ms);
/* records the error and drops the context (reconnect later) */
void meter_redis_fail(meter_redis_t *r);
/* the same for a -READONLY reply (a demoted master); else nothing */
void meter_redis_readonly(meter_redis_t *r, const redisReply *rp);

/* one formatted command (redisFormatCommand's output); NULL on a transport
 * error (r->err set, connection closed); the caller frees the reply */
redisReply *meter_redis_exec(meter_redis_t *r, const char *cmd, size_t len);

/* printf-like front end of meter_redis_exec() */
redisReply *meter_redis_cmd(meter_redis_t *r, const char *fmt, ...);
redisReply *meter_redis_argv(meter_redis_t *r, int argc, const char **argv,
    const size_t *argvlen);

/* pipelining: queue, then read the replies in order */
int meter_redis_append(meter_redis_t *r, const char *fmt, ...);
int meter_redis_append_argv(meter_redis_t *r, int argc, const char **argv,
    const size_t *argvlen);
redisReply *meter_redis_reply(meter_redis_t *r);

/* redis_script.c: the hot scripts loaded for EVALSHA on this connection */
void meter_redis_scripts_load(meter_redis_t *r);
const char *meter_redis_script_sha(meter_redis_t *r, const char *body,
    size_t len);

/* reply helpers */
int meter_reply_ok(const redisReply *rp);       /* not NULL, not error */
long long meter_reply_int(const redisReply *rp, long long dflt);
/* field value of a HGETALL reply, or NULL */
const char *meter_reply_hget(const redisReply *rp, const char *field);
/* a failed command's message (the error reply, or r->err) into err; frees
 * rp; returns -1 */
int meter_reply_failed(meter_redis_t *r, redisReply *rp, char *err,
    size_t errlen);


#endif /* _METER_REDIS_H_INCLUDED_ */
