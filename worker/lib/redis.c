
/*
 * Copyright (C) nginx-meter authors
 *
 * With redis = sentinel://h:p,h:p/NAME each connect asks the Sentinels in
 * turn "SENTINEL get-master-addr-by-name NAME" (reply [ip, port], or a null
 * array for a name it does not monitor: redis/redis src/sentinel.c), then
 * connects there; every connect checks that ROLE says master (redis/redis
 * src/replication.c, roleCommand()), so nothing is written to a replica.
 * A -READONLY reply (a master demoted while we were connected) drops the
 * connection: the caller's reconnect asks the Sentinels again.  A master
 * that was stopped (kill -STOP, a hung VM) while Sentinel promoted its
 * replica still says "master" and takes writes when it wakes up, until
 * Sentinel demotes it (seconds later) and its data is replaced: only the
 * Sentinels know, so meter_redis_follow() asks them again.
 */


#include <errno.h>
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
meter_sentinel_parse(const char *url, meter_sentinels_t *sl)
{
    const char  *p, *slash, *comma, *colon, *q;
    char        *end;
    long         n;
    size_t       hlen;

    if (strncmp(url, "sentinel://", 11) != 0) {
        return -1;
    }

    p = url + 11;
    slash = strchr(p, '/');

    if (slash == NULL || slash[1] == '\0' || strchr(slash + 1, '/') != NULL
        || strlen(slash + 1) >= sizeof(sl->master))
    {
        return -1;
    }

    sl->n = 0;
    strcpy(sl->master, slash + 1);

    while (p < slash) {
        comma = memchr(p, ',', (size_t) (slash - p));
        if (comma == NULL) {
            comma = slash;
        }

        colon = NULL;

        for (q = p; q < comma; q++) {
            if (*q == ':') {
                colon = q;
            }
        }

        if (colon == NULL || colon == p || colon + 1 == comma
            || sl->n == METER_SENTINELS_MAX)
        {
            return -1;
        }

        hlen = (size_t) (colon - p);
        if (hlen >= sizeof(sl->host[0])) {
            return -1;
        }

        errno = 0;
        n = strtol(colon + 1, &end, 10);
        if (errno != 0 || end != comma || n < 1 || n > 65535) {
            return -1;
        }

        memcpy(sl->host[sl->n], p, hlen);
        sl->host[sl->n][hlen] = '\0';
        sl->port[sl->n] = (int) n;
        sl->n++;

        if (comma == slash) {
            break;
        }

        p = comma + 1;

        if (p == slash) {
            return -1;              /* "h:p,/NAME" */
        }
    }

    return sl->n > 0 ? 0 : -1;
}


/* the master's address from the first Sentinel that names it, from the
 * one that answered last (*first): a dead one costs a timeout once */
static int
meter_sentinel_resolve(const char *url, struct timeval tv, char *host,
    size_t hostlen, int *port, size_t *first, char *err, size_t errlen)
{
    size_t              i, k;
    long                n;
    redisReply         *rp;
    redisContext       *c;
    meter_sentinels_t   sl;

    if (meter_sentinel_parse(url, &sl) != 0) {
        snprintf(err, errlen, "redis: invalid sentinel:// address");
        return -1;
    }

    snprintf(err, errlen, "redis: no Sentinel named the master \"%s\"",
             sl.master);

    for (k = 0; k < sl.n; k++) {
        i = (*first + k) % sl.n;
        c = redisConnectWithTimeout(sl.host[i], sl.port[i], tv);

        if (c == NULL || c->err || redisSetTimeout(c, tv) != REDIS_OK) {
            snprintf(err, errlen, "redis: sentinel %s:%d: %s", sl.host[i],
                     sl.port[i], c != NULL ? c->errstr : "out of memory");
            redisFree(c);
            continue;
        }

        rp = redisCommand(c, "SENTINEL get-master-addr-by-name %s",
                          sl.master);

        if (rp != NULL && rp->type == REDIS_REPLY_ARRAY && rp->elements == 2
            && rp->element[0]->type == REDIS_REPLY_STRING
            && rp->element[1]->type == REDIS_REPLY_STRING
            && rp->element[0]->len > 0 && rp->element[0]->len < hostlen)
        {
            n = strtol(rp->element[1]->str, NULL, 10);

            if (n >= 1 && n <= 65535) {
                memcpy(host, rp->element[0]->str, rp->element[0]->len + 1);
                *port = (int) n;
                *first = i;
                freeReplyObject(rp);
                redisFree(c);
                return 0;
            }
        }

        snprintf(err, errlen, "redis: sentinel %s:%d: %s", sl.host[i],
                 sl.port[i],
                 rp == NULL ? c->errstr
                 : rp->type == REDIS_REPLY_ERROR ? rp->str
                 : rp->type == REDIS_REPLY_NIL ? "does not know this master"
                 : "unexpected reply");
        freeReplyObject(rp);
        redisFree(c);
    }

    return -1;
}


int
meter_redis_connect(meter_redis_t *r, const char *host, int port,
    const char *unix_path, const char *password, int db, int64_t timeout_ms,
    char *err, size_t errlen)
{
    int              master;
    char             what[32], mhost[256];
    redisReply      *rp;
    struct timeval   tv;

    meter_redis_close(r);

    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;

    if (host != NULL && strncmp(host, "sentinel://", 11) == 0) {
        if (meter_sentinel_resolve(host, tv, mhost, sizeof(mhost), &port,
                                   &r->sentinel, err, errlen)
            != 0)
        {
            return -1;
        }

        host = mhost;
    }

    r->master[0] = '\0';

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

    rp = meter_redis_cmd(r, "ROLE");

    master = (rp != NULL && rp->type == REDIS_REPLY_ARRAY && rp->elements > 0
              && rp->element[0]->type == REDIS_REPLY_STRING
              && strcmp(rp->element[0]->str, "master") == 0);

    if (meter_reply_ok(rp) && !master) {
        snprintf(err, errlen, "redis %s:%d is a %s, not the master: not "
                 "writing to it", host != NULL ? host : unix_path, port,
                 rp->type == REDIS_REPLY_ARRAY && rp->elements > 0
                 && rp->element[0]->type == REDIS_REPLY_STRING
                 ? rp->element[0]->str : "replica");
        freeReplyObject(rp);
        meter_redis_close(r);
        return -1;
    }

    if (meter_redis_handshake(r, rp, "ROLE", err, errlen) != 0) {
        return -1;
    }

    meter_redis_scripts_load(r);

    if (host != NULL && host == mhost) {
        memcpy(r->master, mhost, sizeof(r->master));
        r->master_port = port;
    }

    return 0;
}


int
meter_redis_follow(meter_redis_t *r, const char *url, int64_t timeout_ms)
{
    int             port;
    char            host[256], err[256];
    struct timeval  tv;

    if (url == NULL || strncmp(url, "sentinel://", 11) != 0
        || r->ctx == NULL || r->master[0] == '\0')
    {
        return 0;
    }

    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;

    if (meter_sentinel_resolve(url, tv, host, sizeof(host), &port,
                               &r->sentinel, err, sizeof(err))
        != 0)
    {
        return 0;
    }

    if (port == r->master_port && strcmp(host, r->master) == 0) {
        return 0;
    }

    snprintf(r->err, sizeof(r->err), "redis: the Sentinels name %.64s:%d the "
             "master now, not %.64s:%d: reconnecting", host, port, r->master,
             r->master_port);
    meter_redis_close(r);

    return 1;
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


/*
 * "EVAL body ..." as RESP becomes "EVALSHA sha ..." when the body is a
 * loaded script; 0 with *out (to free) or -1 to send it as it is
 */
static int
meter_redis_evalsha(meter_redis_t *r, const char *cmd, size_t len,
    char **out, size_t *outlen)
{
    char        *p, *e, *nc;
    size_t       blen, hlen, rest;
    const char  *sha, *body;

    /* "*N\r\n$4\r\nEVAL\r\n$L\r\nBODY\r\n..." */
    p = memchr(cmd, '\n', len);
    if (p == NULL || len - (size_t) (p + 1 - cmd) < 16
        || memcmp(p + 1, "$4\r\nEVAL\r\n$", 11) != 0)
    {
        return -1;
    }

    hlen = (size_t) (p + 1 - cmd);
    blen = strtoul(p + 12, &e, 10);

    if (e[0] != '\r' || (size_t) (e + 2 - cmd) + blen + 2 > len) {
        return -1;
    }

    body = e + 2;
    sha = meter_redis_script_sha(r, body, blen);
    if (sha == NULL) {
        return -1;
    }

    rest = len - (size_t) (body + blen + 2 - cmd);

#define METER_SHA_HEAD  "$7\r\nEVALSHA\r\n$40\r\n"
#define METER_SHA_LEN   (sizeof(METER_SHA_HEAD) - 1 + 40 + 2)

    nc = malloc(hlen + METER_SHA_LEN + rest);
    if (nc == NULL) {
        return -1;
    }

    memcpy(nc, cmd, hlen);
    memcpy(nc + hlen, METER_SHA_HEAD, sizeof(METER_SHA_HEAD) - 1);
    memcpy(nc + hlen + sizeof(METER_SHA_HEAD) - 1, sha, 40);
    memcpy(nc + hlen + METER_SHA_LEN - 2, "\r\n", 2);
    memcpy(nc + hlen + METER_SHA_LEN, body + blen + 2, rest);

    *out = nc;
    *outlen = hlen + METER_SHA_LEN + rest;

    return 0;
}


/* appends a formatted command, as EVALSHA where it can */
static int
meter_redis_append_formatted(meter_redis_t *r, char *cmd, size_t len)
{
    char    *sc;
    size_t   sl;
    int      rc;

    if (r->evalsha && meter_redis_evalsha(r, cmd, len, &sc, &sl) == 0) {
        rc = redisAppendFormattedCommand(r->ctx, sc, sl);
        free(sc);

    } else {
        rc = redisAppendFormattedCommand(r->ctx, cmd, len);
    }

    free(cmd);

    if (rc != REDIS_OK) {
        meter_redis_fail(r);
        return -1;
    }

    return 0;
}


int
meter_redis_append(meter_redis_t *r, const char *fmt, ...)
{
    char     *cmd;
    va_list   ap;
    int       len;

    if (!meter_redis_connected(r)) {
        return -1;
    }

    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);

    if (len < 0) {
        snprintf(r->err, sizeof(r->err), "redis: cannot format command");
        return -1;
    }

    return meter_redis_append_formatted(r, cmd, (size_t) len);
}


int
meter_redis_append_argv(meter_redis_t *r, int argc, const char **argv,
    const size_t *argvlen)
{
    char  *cmd;
    int    len;

    if (!meter_redis_connected(r)) {
        return -1;
    }

    len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    if (len < 0) {
        snprintf(r->err, sizeof(r->err), "redis: cannot format command");
        return -1;
    }

    return meter_redis_append_formatted(r, cmd, (size_t) len);
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

    meter_redis_readonly(r, reply);

    if (((redisReply *) reply)->type == REDIS_REPLY_ERROR
        && strncmp(((redisReply *) reply)->str, "NOSCRIPT", 8) == 0)
    {
        /* the script cache was flushed: EVAL from now on */
        r->evalsha = 0;
    }

    return reply;
}


/* -READONLY: the master was demoted; drop it, the reconnect finds the new
 * one (the reply is still the caller's to read and free) */
void
meter_redis_readonly(meter_redis_t *r, const redisReply *rp)
{
    if (rp != NULL && rp->type == REDIS_REPLY_ERROR
        && strncmp(rp->str, "READONLY", 8) == 0 && r->ctx != NULL)
    {
        snprintf(r->err, sizeof(r->err), "redis: %s", rp->str);
        redisFree(r->ctx);
        r->ctx = NULL;
    }
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


int
meter_reply_failed(meter_redis_t *r, redisReply *rp, char *err,
    size_t errlen)
{
    snprintf(err, errlen, "%s", rp != NULL && rp->type == REDIS_REPLY_ERROR
                                ? rp->str : r->err);
    freeReplyObject(rp);

    return -1;
}
