
/*
 * Copyright (C) nginx-meter authors
 *
 * The webhook listener on libmicrohttpd (Debian libmicrohttpd-dev 0.9.75),
 * which replaced a hand-written HTTP/1.1 server (its buffer handling read
 * freed memory on any request over 16 KB; issue 10, item 12).
 *
 * Threading: MHD_USE_INTERNAL_POLLING_THREAD with neither a thread pool
 * nor a thread per connection, so every callback below runs in the one
 * thread MHD starts.  The listener's hiredis context and its provider
 * instance (neither is thread-safe) are used by that thread only; the
 * drain in the main thread has its own of both.  All signals are blocked
 * while MHD creates the thread, so SIGTERM/SIGHUP stay with main.c's
 * loop, which stops (MHD_stop_daemon joins the thread) and restarts the
 * listener on a reload.  One thread also means one delivery at a time,
 * each bounded by redis.timeout.
 *
 * Connections: at most METER_WEBHOOK_PER_CLIENT per client address and
 * METER_WEBHOOK_CONNS in all; an idle one is closed after webhook.timeout.
 * Behind nginx every connection comes from nginx's address, and what
 * protects the listener from slow or idle clients is nginx itself: it
 * buffers the whole request body (proxy_request_buffering, on by default)
 * before it connects here.  Exposed directly, the per-client bound keeps
 * one client from taking every connection.
 *
 * The portal's paths (/register, /usage) go to portal.c, with the body
 * bound by portal.max_body and every refusal as problem+json; the rest to
 * the provider's webhook logic (webhook.c), when the provider takes
 * webhooks.
 *
 * Errors found in the request head (411, 431, 400, 413) are answered
 * after the body was read and dropped: answering and closing while the
 * client still sends would reset the connection before it reads the
 * answer.  Only a client that waits for "100 Continue" is answered at once.
 */


#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "log.h"
#include "portal.h"
#include "util.h"
#include "metrics.h"
#include "webhook.h"


#define METER_WEBHOOK_CONNS         256
#define METER_WEBHOOK_PER_CLIENT    32
#define METER_WEBHOOK_LOG_RATE      10
/* MHD's per-connection memory: the head and its read buffer */
#define METER_WEBHOOK_POOL          (2 * METER_WEBHOOK_MAX_HEAD + 4096)


struct meter_webhook_srv_s {
    const meter_conf_t         *cf;
    struct MHD_Daemon          *mhd;
    char                       *unix_path;
    meter_provider_t            provider;
    int                         webhooks;       /* provider's served */
    meter_portal_t             *portal;         /* NULL: off */
    meter_redis_t               redis;
    time_t                      redis_retry;
    time_t                      log_second;
    unsigned                    log_count;
    unsigned                    log_dropped;
};


/* one request: its body, or the refusal to answer once it is read */
typedef struct {
    char                       *body;
    size_t                      len;
    size_t                      cap;
    int                         status;         /* 0: not refused */
    const char                 *answer;
    size_t                      dropped;
    int                         portal;         /* a portal path */
} meter_wh_req_t;


/* what the head check adds up */
typedef struct {
    size_t                      size;
    int                         lengths;        /* Content-Length headers */
    int                         differ;         /* with different values */
    const char                 *length;
} meter_wh_head_t;


/*
 * libmicrohttpd's own messages: mostly about single connections (a client
 * gone mid-request, the connection limit), so at info, and at most
 * METER_WEBHOOK_LOG_RATE a second: clients cannot flood the journal.  MHD
 * logs from its thread, and from the main thread only while it starts or
 * stops that thread, so the counters are never shared at once.
 */
static void
meter_wh_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char                  line[512];
    size_t                n;
    time_t                now;
    meter_webhook_srv_t  *s;

    s = cls;
    now = time(NULL);

    if (now != s->log_second) {
        if (s->log_dropped > 0) {
            meter_log(LOG_INFO, "webhook: %u libmicrohttpd messages "
                      "suppressed", s->log_dropped);
        }

        s->log_second = now;
        s->log_count = 0;
        s->log_dropped = 0;
    }

    if (s->log_count++ >= METER_WEBHOOK_LOG_RATE) {
        s->log_dropped++;
        return;
    }

    vsnprintf(line, sizeof(line), fmt, ap);

    n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
        line[--n] = '\0';
    }

    meter_log(LOG_INFO, "webhook: %s", line);
}


static void
meter_wh_redis(meter_webhook_srv_t *s)
{
    int                  rc;
    char                 err[512];
    time_t               now;
    const meter_conf_t  *cf;

    cf = s->cf;

    /* still the master the Sentinels name (one question per delivery):
     * after a failover the old one would take the delivery and lose it */
    if (s->redis.ctx != NULL) {
        if (meter_redis_follow(&s->redis, cf->redis_host,
                               cf->redis_timeout_ms)
            == 0)
        {
            return;
        }

        meter_log(LOG_WARNING, "webhook: %s", s->redis.err);
        s->redis_retry = 0;
    }

    /* a Redis that is down is tried again at most once a second */
    now = time(NULL);
    if (now < s->redis_retry) {
        return;
    }

    s->redis_retry = now + 1;

    rc = meter_redis_open(&s->redis, cf->redis_host, cf->redis_port,
                          cf->redis_unix, cf->redis_password_file,
                          cf->redis_db, cf->redis_timeout_ms, err,
                          sizeof(err));

    if (rc == -2) {
        meter_log(LOG_ERR, "webhook: \"redis.password_file\": %s", err);

    } else if (rc != 0) {
        meter_log(LOG_ERR, "webhook: %s", err);
    }
}


static enum MHD_Result
meter_wh_send(struct MHD_Connection *c, const meter_portal_resp_t *pr)
{
    char                  ra[16];
    enum MHD_Result       rc;
    struct MHD_Response  *resp;

    resp = MHD_create_response_from_buffer(strlen(pr->body),
                                           (void *) pr->body,
                                           MHD_RESPMEM_MUST_COPY);
    if (resp == NULL) {
        return MHD_NO;
    }

    snprintf(ra, sizeof(ra), "%d", pr->retry_after);

    /* one request per connection, as before: nothing to keep alive for */
    if (MHD_add_response_header(resp, "Content-Type", pr->ctype) != MHD_YES
        || MHD_add_response_header(resp, "Connection", "close") != MHD_YES
        || (pr->cache != NULL
            && MHD_add_response_header(resp, "Cache-Control", pr->cache)
               != MHD_YES)
        || (pr->allow != NULL
            && MHD_add_response_header(resp, "Allow", pr->allow) != MHD_YES)
        || (pr->vary != NULL
            && MHD_add_response_header(resp, "Vary", pr->vary) != MHD_YES)
        || (pr->auth
            && MHD_add_response_header(resp, "WWW-Authenticate",
                                       "ApiKey realm=\"usage\"") != MHD_YES)
        || (pr->retry_after > 0
            && MHD_add_response_header(resp, "Retry-After", ra) != MHD_YES))
    {
        MHD_destroy_response(resp);
        return MHD_NO;
    }

    rc = MHD_queue_response(c, (unsigned int) pr->status, resp);
    MHD_destroy_response(resp);

    return rc;
}


static enum MHD_Result
meter_wh_respond(struct MHD_Connection *c, int status, const char *json)
{
    meter_portal_resp_t  pr;

    memset(&pr, 0, sizeof(pr));
    pr.status = status;
    pr.ctype = "application/json";
    pr.body = (char *) json;

    return meter_wh_send(c, &pr);
}


/* GET /metrics with metrics.http = on (metrics.c renders the text) */
static enum MHD_Result
meter_wh_metrics(struct MHD_Connection *c)
{
    char                 *text;
    size_t                len;
    enum MHD_Result       rc;
    struct MHD_Response  *resp;

    text = meter_metrics_text(&len);
    if (text == NULL) {
        return meter_wh_respond(c, 503, "{\"error\":\"no metrics yet\"}");
    }

    resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        free(text);
        return MHD_NO;
    }

    /* the exposition format's media type (prometheus.io, "Exposition
     * formats": text/plain; version=0.0.4) */
    if (MHD_add_response_header(resp, "Content-Type",
                                "text/plain; version=0.0.4; charset=utf-8")
        != MHD_YES
        || MHD_add_response_header(resp, "Connection", "close") != MHD_YES)
    {
        MHD_destroy_response(resp);
        return MHD_NO;
    }

    rc = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);

    return rc;
}


/* a refusal of the head: a problem+json on a portal path */
static enum MHD_Result
meter_wh_refuse(meter_webhook_srv_t *s, struct MHD_Connection *c,
    const meter_wh_req_t *q)
{
    enum MHD_Result      rc;
    meter_portal_resp_t  pr;

    if (!q->portal) {
        return meter_wh_respond(c, q->status, q->answer);
    }

    meter_portal_refuse(s->portal, q->status, &pr);
    rc = meter_wh_send(c, &pr);
    meter_portal_resp_free(&pr);

    return rc;
}


static enum MHD_Result
meter_wh_head_item(void *cls, enum MHD_ValueKind kind, const char *key,
    const char *value)
{
    meter_wh_head_t  *hd;

    (void) kind;

    hd = cls;
    hd->size += strlen(key) + (value != NULL ? strlen(value) : 0) + 4;

    if (value != NULL && strcasecmp(key, "Content-Length") == 0) {
        if (hd->lengths++ > 0 && strcmp(hd->length, value) != 0) {
            hd->differ = 1;
        }

        hd->length = value;
    }

    return MHD_YES;
}


/* what is wrong with the request head: a status and answer, or 0 */
static int
meter_wh_check_head(struct MHD_Connection *c, const char *url,
    size_t max_body, const char **answer, size_t *length)
{
    char                *end;
    meter_wh_head_t      hd;
    unsigned long long   n;

    memset(&hd, 0, sizeof(hd));
    hd.size = strlen(url) + 16;
    *length = 0;

    (void) MHD_get_connection_values(c, MHD_HEADER_KIND, meter_wh_head_item,
                                     &hd);

    if (hd.size > METER_WEBHOOK_MAX_HEAD) {
        *answer = "{\"error\":\"request head too large\"}";
        return 431;
    }

    /* nginx sends Content-Length; a chunked body has no size up front */
    if (MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding")
        != NULL)
    {
        *answer = "{\"error\":\"Content-Length bodies only\"}";
        return 411;
    }

    /* two different lengths: request smuggling */
    if (hd.differ) {
        *answer = "{\"error\":\"malformed request\"}";
        return 400;
    }

    if (hd.length != NULL) {
        /* MHD has checked the digits already */
        errno = 0;
        n = strtoull(hd.length, &end, 10);

        if (errno != 0 || *end != '\0' || n > max_body) {
            *answer = "{\"error\":\"body too large\"}";
            return 413;
        }

        *length = (size_t) n;
    }

    return 0;
}


/* the providers' header lookup (MHD compares names case-insensitively) */
static const char *
meter_wh_header(void *data, const char *name)
{
    return MHD_lookup_connection_value(data, MHD_HEADER_KIND, name);
}


static enum MHD_Result
meter_wh_access(void *cls, struct MHD_Connection *c, const char *url,
    const char *method, const char *version, const char *upload_data,
    size_t *upload_data_size, void **con_cls)
{
    int                   status;
    char                  out[512];
    size_t                length;
    const char           *expect;
    enum MHD_Result       rc;
    meter_wh_req_t       *q;
    meter_portal_resp_t   pr;
    meter_webhook_srv_t  *s;
    meter_webhook_req_t   req;

    (void) version;

    s = cls;
    q = *con_cls;

    if (q == NULL && strcmp(method, "GET") == 0
        && strcmp(url, "/metrics") == 0 && meter_metrics_http(s->cf))
    {
        return meter_wh_metrics(c);
    }

    /* the head is in */
    if (q == NULL) {
        q = calloc(1, sizeof(meter_wh_req_t));
        if (q == NULL) {
            return MHD_NO;
        }

        *con_cls = q;
        q->portal = meter_portal_path(url);

        status = meter_wh_check_head(c, url, q->portal
                                     ? meter_portal_max_body(s->portal)
                                     : METER_WEBHOOK_MAX_BODY,
                                     &q->answer, &length);

        if (status != 0) {
            if (status == 413) {
                meter_log(LOG_WARNING, "webhook: body of %s bytes refused "
                          "(413)", MHD_lookup_connection_value(c,
                              MHD_HEADER_KIND, "Content-Length"));
            }

            expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                 "Expect");
            q->status = status;

            if (expect != NULL && strcasecmp(expect, "100-continue") == 0) {
                return meter_wh_refuse(s, c, q);
            }

            return MHD_YES;
        }

        /* exactly 1 MB fits: + 1 for the NUL the providers' parsers use */
        q->cap = length + 1;
        q->body = malloc(q->cap);
        if (q->body == NULL) {
            return MHD_NO;
        }

        return MHD_YES;
    }

    if (*upload_data_size > 0) {
        if (q->status != 0) {
            /* refused: read and drop, up to a bound */
            q->dropped += *upload_data_size;
            *upload_data_size = 0;

            return q->dropped > 4 * METER_WEBHOOK_MAX_BODY ? MHD_NO : MHD_YES;
        }

        /* MHD stops at Content-Length; this is a guard only */
        if (*upload_data_size > q->cap - 1 - q->len) {
            return MHD_NO;
        }

        memcpy(q->body + q->len, upload_data, *upload_data_size);
        q->len += *upload_data_size;
        *upload_data_size = 0;

        return MHD_YES;
    }

    /* the whole request is in */
    if (q->status != 0) {
        return meter_wh_refuse(s, c, q);
    }

    q->body[q->len] = '\0';

    if (!q->portal && !s->webhooks) {
        return meter_wh_respond(c, 404, "{\"error\":\"not found\"}");
    }

    meter_wh_redis(s);

    memset(&req, 0, sizeof(req));
    req.method = method;
    req.path = url;
    req.body = q->body;
    req.body_len = q->len;
    req.header = meter_wh_header;
    req.data = c;
    req.now = time(NULL);

    if (q->portal) {
        meter_portal_handle(s->portal, s->cf, &s->redis, &req, &pr);
        rc = meter_wh_send(c, &pr);
        meter_portal_resp_free(&pr);

        return rc;
    }

    status = meter_webhook_handle(&s->provider, &s->redis, &req, out,
                                  sizeof(out));

    return meter_wh_respond(c, status, out);
}


static void
meter_wh_completed(void *cls, struct MHD_Connection *c, void **con_cls,
    enum MHD_RequestTerminationCode toe)
{
    meter_wh_req_t  *q;

    (void) cls;
    (void) c;

    q = *con_cls;

    if (toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED) {
        meter_log(LOG_WARNING, "webhook: a request idle for webhook.timeout "
                  "was closed");
    }

    if (q != NULL) {
        free(q->body);
        free(q);
        *con_cls = NULL;
    }
}


static int
meter_wh_listen(meter_webhook_srv_t *s, const char *addr, int *lfd,
    char *err, size_t errlen)
{
    int                  fd, one, rc, port;
    char                *host, *path, ports[8];
    struct addrinfo      hints, *ai;
    struct sockaddr_un   sun;

    if (meter_conf_parse_addr(addr, &host, &port, &path) != 0) {
        snprintf(err, errlen, "\"webhook.listen\": \"%s\" is not host:port "
                 "or unix:/path", addr);
        return -1;
    }

    fd = -1;

    if (path != NULL) {
        memset(&sun, 0, sizeof(sun));
        sun.sun_family = AF_UNIX;

        if (strlen(path) >= sizeof(sun.sun_path)) {
            snprintf(err, errlen, "\"webhook.listen\": path too long");
            goto failed;
        }

        memcpy(sun.sun_path, path, strlen(path) + 1);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd == -1) {
            snprintf(err, errlen, "webhook: socket: %s", strerror(errno));
            goto failed;
        }

        /* a socket file left by an earlier run */
        (void) unlink(path);

        if (bind(fd, (struct sockaddr *) &sun, sizeof(sun)) != 0) {
            snprintf(err, errlen, "\"webhook.listen\": bind %s: %s", path,
                     strerror(errno));
            goto failed;
        }

        /* nginx runs as another user; every delivery is verified anyway */
        (void) chmod(path, 0666);
        s->unix_path = path;
        path = NULL;

    } else {
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
        snprintf(ports, sizeof(ports), "%d", port);

        rc = getaddrinfo(host, ports, &hints, &ai);
        if (rc != 0) {
            snprintf(err, errlen, "\"webhook.listen\": %s: %s", host,
                     gai_strerror(rc));
            goto failed;
        }

        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    0);
        one = 1;

        if (fd == -1
            || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one))
               != 0
            || bind(fd, ai->ai_addr, ai->ai_addrlen) != 0)
        {
            snprintf(err, errlen, "\"webhook.listen\": bind %s: %s", addr,
                     strerror(errno));
            freeaddrinfo(ai);
            goto failed;
        }

        freeaddrinfo(ai);
    }

    if (listen(fd, 64) != 0) {
        snprintf(err, errlen, "\"webhook.listen\": listen %s: %s", addr,
                 strerror(errno));
        goto failed;
    }

    *lfd = fd;
    free(host);
    free(path);

    return 0;

failed:

    if (fd != -1) {
        close(fd);
    }

    free(host);
    free(path);

    return -1;
}


static void
meter_wh_free(meter_webhook_srv_t *s)
{
    if (s->mhd != NULL) {
        /* joins MHD's thread, closes the connections and the socket */
        MHD_stop_daemon(s->mhd);
    }

    if (s->unix_path != NULL) {
        (void) unlink(s->unix_path);
        free(s->unix_path);
    }

    if (s->provider.data != NULL && s->provider.cleanup != NULL) {
        s->provider.cleanup(&s->provider);
    }

    meter_redis_close(&s->redis);
    meter_portal_free(s->portal);
    free(s);
}


/* webhook.timeout in whole seconds (MHD's unit), rounded up; -1 bad */
static int
meter_wh_timeout(const meter_conf_t *cf, unsigned *sec)
{
    int64_t      ms;
    const char  *t;

    *sec = 10;

    t = meter_conf_get(cf, "webhook.timeout");
    if (t == NULL) {
        return 0;
    }

    if (meter_parse_duration(t, &ms) != 0 || ms < 100 || ms > 86400000) {
        return -1;
    }

    *sec = (unsigned) ((ms + 999) / 1000);

    return 0;
}


/* the config key of the provider's webhook secret */
static const char *
meter_wh_secret_key(const meter_conf_t *cf)
{
    return strcmp(cf->provider, "stripe") == 0 ? "stripe.webhook_secret_file"
           : strcmp(cf->provider, "chargebee") == 0
             ? "chargebee.webhook_password_file"
             : "recurly.webhook_key_file";
}


/*
 * Whether /webhooks/<provider> is served: the provider takes webhooks and,
 * when the listener is there for the portal too, its secret is set (a
 * portal-only listener needs none; without the portal it is required and
 * meter_webhook_check says so).
 */
static int
meter_wh_serves_webhooks(const meter_conf_t *cf, int portal)
{
    meter_provider_t  p;

    memset(&p, 0, sizeof(p));

    if (meter_provider_by_name(cf->provider, &p) != 0 || p.webhook == NULL) {
        return 0;
    }

    return !portal || meter_conf_get(cf, meter_wh_secret_key(cf)) != NULL;
}


int
meter_webhook_start(const meter_conf_t *cf, meter_webhook_srv_t **srv,
    char *err, size_t errlen)
{
    int                   lfd;
    char                  e[512];
    unsigned              timeout;
    sigset_t              all, old;
    const char           *listen_at;
    meter_webhook_srv_t  *s;

    *srv = NULL;

    listen_at = meter_conf_get(cf, "webhook.listen");
    if (listen_at == NULL) {
        return 0;
    }

    s = calloc(1, sizeof(meter_webhook_srv_t));
    if (s == NULL) {
        snprintf(err, errlen, "webhook: out of memory");
        return -1;
    }

    s->cf = cf;

    if (meter_wh_timeout(cf, &timeout) != 0) {
        snprintf(err, errlen, "\"webhook.timeout\": \"%s\" is not a "
                 "duration from 100ms to 1d", meter_conf_get(cf,
                                                   "webhook.timeout"));
        goto failed;
    }

    if (meter_portal_load(cf, &s->portal, err, errlen) != 0) {
        goto failed;
    }

    /* its own provider instance: nothing shared with the drain but cf */
    if (meter_provider_by_name(cf->provider, &s->provider) != 0
        || s->provider.init(&s->provider, cf, e, sizeof(e)) != 0)
    {
        snprintf(err, errlen, "webhook: provider %s: %s", cf->provider,
                 s->provider.init != NULL ? e : "unknown");
        goto failed;
    }

    s->webhooks = meter_wh_serves_webhooks(cf, s->portal != NULL);

    if (!s->webhooks && s->portal == NULL) {
        snprintf(err, errlen, "\"webhook.listen\": provider %s takes no "
                 "webhooks", cf->provider);
        goto failed;
    }

    if (meter_wh_listen(s, listen_at, &lfd, err, errlen) != 0) {
        goto failed;
    }

    /* signals stay with the main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);

    s->mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD
                              | MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0,
                              NULL, NULL, meter_wh_access, s,
                              MHD_OPTION_EXTERNAL_LOGGER,
                              meter_wh_mhd_log, s,
                              MHD_OPTION_LISTEN_SOCKET, lfd,
                              MHD_OPTION_CONNECTION_TIMEOUT, timeout,
                              MHD_OPTION_CONNECTION_LIMIT,
                              (unsigned) METER_WEBHOOK_CONNS,
                              MHD_OPTION_PER_IP_CONNECTION_LIMIT,
                              (unsigned) METER_WEBHOOK_PER_CLIENT,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT,
                              (size_t) METER_WEBHOOK_POOL,
                              MHD_OPTION_NOTIFY_COMPLETED,
                              meter_wh_completed, s,
                              MHD_OPTION_END);

    pthread_sigmask(SIG_SETMASK, &old, NULL);

    if (s->mhd == NULL) {
        close(lfd);
        snprintf(err, errlen, "webhook: libmicrohttpd could not start on "
                 "%s", listen_at);
        goto failed;
    }

    meter_log(LOG_NOTICE, "webhook: listening on %s for %s%s%s%s",
              listen_at, s->webhooks ? "/webhooks/" : "",
              s->webhooks ? cf->provider : "",
              s->portal != NULL && s->webhooks ? " and " : "",
              s->portal != NULL ? "the portal (/register, /usage)" : "");

    *srv = s;

    return 0;

failed:

    meter_wh_free(s);

    return -1;
}


void
meter_webhook_stop(meter_webhook_srv_t *s)
{
    if (s == NULL) {
        return;
    }

    meter_wh_free(s);
}


int
meter_webhook_check(const meter_conf_t *cf, char *err, size_t errlen)
{
    int                 port;
    char               *host, *path, secret[512], e[256];
    unsigned            timeout;
    const char         *listen_at, *key;
    meter_portal_t     *portal;

    listen_at = meter_conf_get(cf, "webhook.listen");
    if (listen_at == NULL) {
        return 0;
    }

    if (meter_conf_parse_addr(listen_at, &host, &port, &path) != 0) {
        snprintf(err, errlen, "\"webhook.listen\": \"%s\" is not host:port "
                 "or unix:/path", listen_at);
        return -1;
    }

    free(host);
    free(path);

    if (meter_wh_timeout(cf, &timeout) != 0) {
        snprintf(err, errlen, "\"webhook.timeout\": \"%s\" is not a "
                 "duration from 100ms to 1d", meter_conf_get(cf,
                                                   "webhook.timeout"));
        return -1;
    }

    if (meter_portal_load(cf, &portal, err, errlen) != 0) {
        return -1;
    }

    meter_portal_free(portal);

    if (!meter_wh_serves_webhooks(cf, portal != NULL)) {
        if (portal != NULL) {
            return 0;
        }

        snprintf(err, errlen, "\"webhook.listen\": provider %s takes no "
                 "webhooks", cf->provider);
        return -1;
    }

    key = meter_wh_secret_key(cf);

    if (meter_conf_get(cf, key) == NULL) {
        snprintf(err, errlen, "\"webhook.listen\" is set but \"%s\" is not",
                 key);
        return -1;
    }

    if (meter_conf_secret(cf, key, secret, sizeof(secret), e, sizeof(e))
        != 0)
    {
        snprintf(err, errlen, "%s", e);
        return -1;
    }

    explicit_bzero(secret, sizeof(secret));

    return 0;
}
