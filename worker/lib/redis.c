
/*
 * Copyright (C) nginx-meter authors
 */


#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "redis.h"


void
meter_redis_fail(meter_redis_t *r)
{
    snprintf(r->err, sizeof(r->err), "redis: %s",
             (r->ctx != NULL && r->ctx->errstr[0] != '\0')
             ? r->ctx->errstr : "connection lost");

    /* a context with an error cannot be used again: reconnect later */
    if (r->ctx != NULL) {
        redisFree(r->ctx);
        r->ctx = NULL;
    }
}


/* 1, or 0 with r->err set */
static int
meter_redis_connected(meter_redis_t *r)
{
    if (r->ctx == NULL) {
        snprintf(r->err, sizeof(r->err), "redis: not connected");
        return 0;
    }

    return 1;
}


/* a reply of the handshake: 0, or -1 with err and the connection closed */
static int
meter_redis_handshake(meter_redis_t *r, redisReply *rp, const char *what,
    char *err, size_t errlen)
{
    if (!meter_reply_ok(rp)) {
        snprintf(err, errlen, "redis: %s failed: %s", what,
                 rp != NULL ? rp->str : r->err);
        freeReplyObject(rp);
        meter_redis_close(r);
        return -1;
    }

    freeReplyObject(rp);

    return 0;
}


int
meter_redis_connect(meter_redis_t *r, const char *host, int port,
    const char *unix_path, const char *password, int db, int64_t timeout_ms,
    char *err, size_t errlen)
{
    char             what[32];
    struct timeval   tv;

    meter_redis_close(r);

    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;

    if (unix_path != NULL) {
        r->ctx = redisConnectUnixWithTimeout(unix_path, tv);

    } else {
        r->ctx = redisConnectWithTimeout(host, port, tv);
    }

    if (r->ctx == NULL || r->ctx->err) {
        if (unix_path != NULL) {
            snprintf(err, errlen, "redis unix:%s: %s", unix_path,
                     r->ctx != NULL ? r->ctx->errstr : "out of memory");

        } else {
            snprintf(err, errlen, "redis %s:%d: %s", host, port,
                     r->ctx != NULL ? r->ctx->errstr : "out of memory");
        }

        meter_redis_close(r);
        return -1;
    }

    if (redisSetTimeout(r->ctx, tv) != REDIS_OK) {
        snprintf(err, errlen, "redis: cannot set timeout");
        meter_redis_close(r);
        return -1;
    }

    if (password != NULL
        && meter_redis_handshake(r, meter_redis_cmd(r, "AUTH %s", password),
                                 "AUTH", err, errlen)
           != 0)
    {
        return -1;
    }

    if (db != 0) {
        snprintf(what, sizeof(what), "SELECT %d", db);

        if (meter_redis_handshake(r, meter_redis_cmd(r, "SELECT %d", db),
                                  what, err, errlen)
            != 0)
        {
            return -1;
        }
    }

    return meter_redis_handshake(r, meter_redis_cmd(r, "PING"), "PING", err,
                                 errlen);
}


int
meter_redis_open(meter_redis_t *r, const char *host, int port,
    const char *unix_path, const char *password_file, int db,
    int64_t timeout_ms, char *err, size_t errlen)
{
    char  password[1024];
    int   rc;

    password[0] = '\0';

    if (password_file != NULL
        && meter_read_secret(password_file, password, sizeof(password), err,
                             errlen)
           != 0)
    {
        explicit_bzero(password, sizeof(password));
        return -2;
    }

    rc = meter_redis_connect(r, host, port, unix_path,
                             password[0] ? password : NULL, db, timeout_ms,
                             err, errlen);
    explicit_bzero(password, sizeof(password));

    return rc;
}


void
meter_redis_close(meter_redis_t *r)
{
    if (r->ctx != NULL) {
        redisFree(r->ctx);
        r->ctx = NULL;
    }
}


redisReply *
meter_redis_cmd(meter_redis_t *r, const char *fmt, ...)
{
    char        *cmd;
    va_list      ap;
    int          len;
    redisReply  *rp;

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);

    if (len < 0) {
        snprintf(r->err, sizeof(r->err), "redis: cannot format command");
        return NULL;
    }

    rp = meter_redis_exec(r, cmd, (size_t) len);
    free(cmd);

    return rp;
}


redisReply *
meter_redis_argv(meter_redis_t *r, int argc, const char **argv,
    const size_t *argvlen)
{
    char        *cmd;
    int          len;
    redisReply  *rp;

    len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    if (len < 0) {
        snprintf(r->err, sizeof(r->err), "redis: cannot format command");
        return NULL;
    }

    rp = meter_redis_exec(r, cmd, (size_t) len);
    free(cmd);

    return rp;
}


int
meter_redis_append(meter_redis_t *r, const char *fmt, ...)
{
    va_list  ap;
    int      rc;

    if (!meter_redis_connected(r)) {
        return -1;
    }

    va_start(ap, fmt);
    rc = redisvAppendCommand(r->ctx, fmt, ap);
    va_end(ap);

    if (rc != REDIS_OK) {
        meter_redis_fail(r);
        return -1;
    }

    return 0;
}


int
meter_redis_append_argv(meter_redis_t *r, int argc, const char **argv,
    const size_t *argvlen)
{
    if (!meter_redis_connected(r)) {
        return -1;
    }

    if (redisAppendCommandArgv(r->ctx, argc, argv, argvlen) != REDIS_OK) {
        meter_redis_fail(r);
        return -1;
    }

    return 0;
}


redisReply *
meter_redis_reply(meter_redis_t *r)
{
    void  *reply;

    if (!meter_redis_connected(r)) {
        return NULL;
    }

    if (redisGetReply(r->ctx, &reply) != REDIS_OK) {
        meter_redis_fail(r);
        return NULL;
    }

    return reply;
}


int
meter_reply_ok(const redisReply *rp)
{
    return rp != NULL && rp->type != REDIS_REPLY_ERROR;
}


long long
meter_reply_int(const redisReply *rp, long long dflt)
{
    if (rp == NULL) {
        return dflt;
    }

    if (rp->type == REDIS_REPLY_INTEGER) {
        return rp->integer;
    }

    if (rp->type == REDIS_REPLY_STRING) {
        return strtoll(rp->str, NULL, 10);
    }

    return dflt;
}


const char *
meter_reply_hget(const redisReply *rp, const char *field)
{
    size_t  i;

    if (rp == NULL || rp->type != REDIS_REPLY_ARRAY) {
        return NULL;
    }

    for (i = 0; i + 1 < rp->elements; i += 2) {
        if (rp->element[i]->type == REDIS_REPLY_STRING
            && strcmp(rp->element[i]->str, field) == 0
            && rp->element[i + 1]->type == REDIS_REPLY_STRING)
        {
            return rp->element[i + 1]->str;
        }
    }

    return NULL;
}
