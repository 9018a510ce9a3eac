
/*
 * Copyright (C) nginx-meter authors
 */


#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "gov.h"
#include "log.h"
#include "util.h"
#include "webhook.h"


#define METER_WEBHOOK_CONNS     64
#define METER_WEBHOOK_DEDUPE_TTL_S  "2592000"   /* 30 days */


typedef struct {
    int                         fd;
    char                       *buf;
    size_t                      len;
    size_t                      cap;
    long                        head;           /* 0: not parsed yet */
    meter_http_head_t           h;
    int64_t                     deadline;       /* monotonic ms */
    int                         discard;        /* answered early: read
                                                 * and drop the rest */
} meter_wh_conn_t;


struct meter_webhook_srv_s {
    const meter_conf_t         *cf;
    pthread_t                   thread;
    int                         lfd;
    int                         wake[2];
    char                       *unix_path;
    int64_t                     timeout_ms;
    meter_provider_t            provider;
    meter_redis_t               redis;
    time_t                      redis_retry;
    meter_wh_conn_t             conns[METER_WEBHOOK_CONNS];
};


static int64_t
meter_wh_now_ms(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}


/* ---------------------------------------------------------------- parsing */


long
meter_webhook_parse_head(char *buf, size_t len, meter_http_head_t *h)
{
    char       *end, *p, *line, *next, *colon, *v, *e, *q;
    size_t      n;
    long long   cl;

    memset(h, 0, sizeof(meter_http_head_t));
    h->content_length = -1;

    end = memmem(buf, len, "\r\n\r\n", 4);
    if (end == NULL) {
        return (len > METER_WEBHOOK_MAX_HEAD) ? -2 : 0;
    }

    if ((size_t) (end - buf) + 4 > METER_WEBHOOK_MAX_HEAD) {
        return -2;
    }

    h->head_len = (size_t) (end - buf) + 4;
    end[2] = '\0';

    if (memchr(buf, '\0', (size_t) (end - buf)) != NULL) {
        return -1;
    }

    /* request line: METHOD SP target SP HTTP/1.x */
    line = buf;
    next = strstr(line, "\r\n");
    *next = '\0';
    next += 2;

    p = strchr(line, ' ');
    if (p == NULL || p == line) {
        return -1;
    }

    *p++ = '\0';
    h->method = line;

    v = strchr(p, ' ');
    if (v == NULL || v == p || *p != '/') {
        return -1;
    }

    *v++ = '\0';
    h->path = p;

    q = strchr(p, '?');
    if (q != NULL) {
        *q = '\0';
    }

    if (strncmp(v, "HTTP/1.", 7) != 0 || (v[7] != '0' && v[7] != '1')
        || v[8] != '\0')
    {
        return -1;
    }

    h->minor = v[7] - '0';

    for (n = 0; h->method[n] != '\0'; n++) {
        if (h->method[n] < 'A' || h->method[n] > 'Z') {
            return -1;
        }
    }

    /* header lines */
    for (line = next; *line != '\0'; line = next) {
        next = strstr(line, "\r\n");
        if (next == NULL) {
            return -1;
        }

        *next = '\0';
        next += 2;

        /* no obsolete line folding, no spaces before the colon */
        colon = strchr(line, ':');
        if (colon == NULL || colon == line || line[0] == ' '
            || line[0] == '\t' || colon[-1] == ' ' || colon[-1] == '\t')
        {
            return -1;
        }

        *colon = '\0';
        v = colon + 1;

        while (*v == ' ' || *v == '\t') {
            v++;
        }

        e = v + strlen(v);
        while (e > v && (e[-1] == ' ' || e[-1] == '\t')) {
            *--e = '\0';
        }

        if (h->nheaders == METER_WEBHOOK_MAX_HEADERS) {
            return -2;
        }

        h->names[h->nheaders] = line;
        h->values[h->nheaders] = v;
        h->nheaders++;

        if (strcasecmp(line, "Content-Length") == 0) {
            if (*v == '\0' || strspn(v, "0123456789") != strlen(v)
                || strlen(v) > 15)
            {
                return -1;
            }

            cl = strtoll(v, NULL, 10);

            /* two different lengths: request smuggling */
            if (h->content_length != -1 && h->content_length != cl) {
                return -1;
            }

            h->content_length = cl;

        } else if (strcasecmp(line, "Transfer-Encoding") == 0) {
            h->chunked = 1;
        }
    }

    return (long) h->head_len;
}


const char *
meter_webhook_header(void *head, const char *name)
{
    int                 i;
    meter_http_head_t  *h;

    h = head;

    for (i = 0; i < h->nheaders; i++) {
        if (strcasecmp(h->names[i], name) == 0) {
            return h->values[i];
        }
    }

    return NULL;
}


/* ---------------------------------------------------------------- handling */


static int
meter_wh_answer(char *out, size_t outlen, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int
meter_wh_answer(char *out, size_t outlen, int status, const char *fmt, ...)
{
    va_list  ap;

    va_start(ap, fmt);
    vsnprintf(out, outlen, fmt, ap);
    va_end(ap);

    return status;
}


/* a JSON-safe copy of s (ids, error texts: no quotes or controls) */
static const char *
meter_wh_safe(const char *s, char *buf, size_t size)
{
    size_t  i;

    for (i = 0; s[i] != '\0' && i + 1 < size; i++) {
        buf[i] = (s[i] < 0x20 || s[i] == '"' || s[i] == '\\'
                  || (unsigned char) s[i] >= 0x7f) ? '_' : s[i];
    }

    buf[i] = '\0';

    return buf;
}


int
meter_webhook_handle(meter_provider_t *p, meter_redis_t *r,
    meter_http_head_t *h, const char *body, size_t len, time_t now,
    char *out, size_t outlen)
{
    int                    rc, delinquent;
    char                   path[64], customer[128], err[256], key[256];
    char                   id[160];
    const char            *argv[6];
    redisReply            *rp;
    meter_webhook_req_t    req;
    meter_webhook_event_t  ev;

    snprintf(path, sizeof(path), "/webhooks/%s", p->name);

    if (strcmp(h->path, path) != 0 || p->webhook == NULL) {
        return meter_wh_answer(out, outlen, 404,
                               "{\"error\":\"no webhooks here\"}");
    }

    if (strcmp(h->method, "POST") != 0) {
        return meter_wh_answer(out, outlen, 405,
                               "{\"error\":\"POST only\"}");
    }

    memset(&req, 0, sizeof(req));
    req.method = h->method;
    req.path = h->path;
    req.body = body;
    req.body_len = len;
    req.header = meter_webhook_header;
    req.data = h;
    req.now = now;

    p->webhook(p, &req, &ev);

    if (ev.kind == METER_WEBHOOK_INVALID) {
        meter_log(LOG_WARNING, "webhook %s: refused (%d): %s", p->name,
                  ev.http_status, ev.error);
        return meter_wh_answer(out, outlen,
                               ev.http_status >= 400 ? ev.http_status : 400,
                               "{\"error\":\"%s\"}",
                               meter_wh_safe(ev.error, err, sizeof(err)));
    }

    meter_wh_safe(ev.event_id, id, sizeof(id));

    if (ev.kind == METER_WEBHOOK_IGNORE) {
        meter_log(LOG_DEBUG, "webhook %s %s: nothing to track", p->name, id);
        return meter_wh_answer(out, outlen, 200,
                               "{\"ok\":true,\"ignored\":true}");
    }

    if (r->ctx == NULL) {
        meter_log(LOG_ERR, "webhook %s %s: Redis unavailable: 503",
                  p->name, id);
        return meter_wh_answer(out, outlen, 503,
                               "{\"error\":\"storage unavailable\"}");
    }

    snprintf(key, sizeof(key), "mtr:wh:%s:%s", p->name, ev.event_id);

    argv[0] = "EXISTS";
    argv[1] = key;
    rp = meter_redis_argv(r, 2, argv, NULL);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_INTEGER) {
        snprintf(err, sizeof(err), "EXISTS: %.200s", rp != NULL
                 && rp->type == REDIS_REPLY_ERROR ? rp->str : r->err);
        if (rp != NULL) {
            freeReplyObject(rp);
        }
        goto failed;
    }

    rc = (int) rp->integer;
    freeReplyObject(rp);

    if (rc == 1) {
        meter_log(LOG_INFO, "webhook %s %s: delivered before, nothing to do",
                  p->name, id);
        return meter_wh_answer(out, outlen, 200,
                               "{\"ok\":true,\"duplicate\":true}");
    }

    rc = meter_gov_find_customer(r, ev.provider_customer[0]
                                    ? ev.provider_customer : NULL,
                                 ev.subscription[0] ? ev.subscription : NULL,
                                 customer, sizeof(customer), err,
                                 sizeof(err));
    if (rc == -1) {
        goto failed;
    }

    if (rc == 0) {
        /* not ours (or not yet registered): the poll catches up later */
        meter_log(LOG_NOTICE, "webhook %s %s: no customer for %s/%s",
                  p->name, id, ev.provider_customer[0]
                  ? ev.provider_customer : "-",
                  ev.subscription[0] ? ev.subscription : "-");
        return meter_wh_answer(out, outlen, 200,
                               "{\"ok\":true,\"ignored\":\"unknown "
                               "customer\"}");
    }

    delinquent = (ev.kind == METER_WEBHOOK_DELINQUENT);

    rc = meter_gov_set_status(r, customer, delinquent,
                              delinquent ? "invoice_overdue" : NULL, "sync",
                              ev.event_time > 0 ? ev.event_time : now, err,
                              sizeof(err));
    if (rc == -1) {
        goto failed;
    }

    /* unchanged: maybe an earlier delivery stored the status and failed
     * before the projection; projecting again is harmless */
    if (rc == 0 && meter_gov_project(r, customer, err, sizeof(err)) != 0) {
        goto failed;
    }

    argv[0] = "SET";
    argv[1] = key;
    argv[2] = "1";
    argv[3] = "NX";
    argv[4] = "EX";
    argv[5] = METER_WEBHOOK_DEDUPE_TTL_S;
    rp = meter_redis_argv(r, 6, argv, NULL);
    if (!meter_reply_ok(rp)) {
        snprintf(err, sizeof(err), "SET: %.200s", rp != NULL
                 && rp->type == REDIS_REPLY_ERROR ? rp->str : r->err);
        if (rp != NULL) {
            freeReplyObject(rp);
        }
        goto failed;
    }

    freeReplyObject(rp);

    meter_log(LOG_NOTICE, "webhook %s %s: customer %s %s%s", p->name, id,
              customer, delinquent ? "delinquent (invoice_overdue)"
                                   : "paid: active",
              rc == 1 ? "" : " (no change)");

    return meter_wh_answer(out, outlen, 200, "{\"ok\":true,\"changed\":%s}",
                           rc == 1 ? "true" : "false");

failed:

    meter_log(LOG_ERR, "webhook %s %s: not stored, answering 503: %s",
              p->name, id, err);

    return meter_wh_answer(out, outlen, 503,
                           "{\"error\":\"storage unavailable\"}");
}


/* ---------------------------------------------------------------- server */


static const char *
meter_wh_reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}


/* writes the whole answer (small), waiting at most a second */
static void
meter_wh_respond(int fd, int status, const char *body)
{
    char           buf[1024];
    int            n;
    size_t         off;
    ssize_t        w;
    struct pollfd  pfd;

    n = snprintf(buf, sizeof(buf), "HTTP/1.1 %d %s\r\n"
                 "Content-Type: application/json\r\n"
                 "Content-Length: %zu\r\n"
                 "Connection: close\r\n"
                 "\r\n%s", status, meter_wh_reason(status), strlen(body),
                 body);
    if (n < 0 || (size_t) n >= sizeof(buf)) {
        return;
    }

    for (off = 0; off < (size_t) n; ) {
        w = send(fd, buf + off, (size_t) n - off, MSG_NOSIGNAL);

        if (w > 0) {
            off += (size_t) w;
            continue;
        }

        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            pfd.fd = fd;
            pfd.events = POLLOUT;
            if (poll(&pfd, 1, 1000) > 0) {
                continue;
            }
        }

        if (w < 0 && errno == EINTR) {
            continue;
        }

        return;
    }
}


static void
meter_wh_close(meter_wh_conn_t *c)
{
    if (c->fd != -1) {
        close(c->fd);
    }

    free(c->buf);
    memset(c, 0, sizeof(meter_wh_conn_t));
    c->fd = -1;
}


static void
meter_wh_redis(meter_webhook_srv_t *s)
{
    char                 password[1024], err[512];
    time_t               now;
    const meter_conf_t  *cf;

    if (s->redis.ctx != NULL) {
        return;
    }

    /* a Redis that is down is tried again at most once a second */
    now = time(NULL);
    if (now < s->redis_retry) {
        return;
    }

    s->redis_retry = now + 1;
    cf = s->cf;
    password[0] = '\0';

    if (cf->redis_password_file != NULL
        && meter_read_secret(cf->redis_password_file, password,
                             sizeof(password), err, sizeof(err)) != 0)
    {
        meter_log(LOG_ERR, "webhook: \"redis.password_file\": %s", err);
        return;
    }

    if (meter_redis_connect(&s->redis, cf->redis_host, cf->redis_port,
                            cf->redis_unix, password[0] ? password : NULL,
                            cf->redis_db, cf->redis_timeout_ms, err,
                            sizeof(err)) != 0)
    {
        meter_log(LOG_ERR, "webhook: %s", err);
    }

    explicit_bzero(password, sizeof(password));
}


/* the request of c is complete: handle it and answer */
static void
meter_wh_serve(meter_webhook_srv_t *s, meter_wh_conn_t *c)
{
    int   status;
    char  out[512];

    meter_wh_redis(s);

    status = meter_webhook_handle(&s->provider, &s->redis, &c->h,
                                  c->buf + c->head,
                                  (size_t) c->h.content_length, time(NULL),
                                  out, sizeof(out));

    meter_wh_respond(c->fd, status, out);
    meter_wh_close(c);
}


/*
 * After an early answer (413) the client is still sending: closing now
 * would reset the connection before it reads the answer.  Stop writing
 * and drop what arrives until it stops sending (or the timeout).
 */
static void
meter_wh_linger(meter_webhook_srv_t *s, meter_wh_conn_t *c)
{
    (void) shutdown(c->fd, SHUT_WR);
    free(c->buf);
    c->buf = NULL;
    c->len = 0;
    c->cap = 0;
    c->discard = 1;
    c->deadline = meter_wh_now_ms() + s->timeout_ms;
}


static void
meter_wh_discard(meter_wh_conn_t *c)
{
    char     buf[16384];
    ssize_t  n;

    for ( ;; ) {
        n = recv(c->fd, buf, sizeof(buf), 0);

        if (n > 0) {
            continue;
        }

        if (n < 0 && errno == EINTR) {
            continue;
        }

        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        }

        meter_wh_close(c);
        return;
    }
}


/* reads what is there; answers and closes when it can */
static void
meter_wh_read(meter_webhook_srv_t *s, meter_wh_conn_t *c)
{
    char     *nb;
    size_t    want, ncap;
    ssize_t   n;

    if (c->discard) {
        meter_wh_discard(c);
        return;
    }

    for ( ;; ) {
        want = (c->head == 0)
               ? METER_WEBHOOK_MAX_HEAD + 1
               : (size_t) c->head + (size_t) c->h.content_length;

        if (c->len >= want) {
            break;
        }

        if (c->cap < want + 1) {
            ncap = (c->cap == 0) ? 4096 : c->cap;
            while (ncap < want + 1 && ncap < c->len + 65536) {
                ncap *= 2;
            }

            if (ncap > want + 1) {
                ncap = want + 1;
            }

            nb = realloc(c->buf, ncap);
            if (nb == NULL) {
                meter_wh_respond(c->fd, 503, "{\"error\":\"out of memory\"}");
                meter_wh_close(c);
                return;
            }

            c->buf = nb;
            c->cap = ncap;
        }

        n = recv(c->fd, c->buf + c->len, c->cap - 1 - c->len, 0);

        if (n == 0) {
            meter_wh_close(c);
            return;
        }

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }

            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                meter_wh_close(c);
                return;
            }

            break;
        }

        c->len += (size_t) n;
        c->buf[c->len] = '\0';

        if (c->head == 0) {
            c->head = meter_webhook_parse_head(c->buf, c->len, &c->h);

            if (c->head == -1) {
                meter_wh_respond(c->fd, 400,
                                 "{\"error\":\"malformed request\"}");
                meter_wh_linger(s, c);
                return;
            }

            if (c->head == -2) {
                meter_wh_respond(c->fd, 431,
                                 "{\"error\":\"request head too large\"}");
                meter_wh_linger(s, c);
                return;
            }

            if (c->head > 0) {
                if (c->h.chunked) {
                    meter_wh_respond(c->fd, 411, "{\"error\":\"Content-"
                                     "Length bodies only\"}");
                    meter_wh_linger(s, c);
                    return;
                }

                if (c->h.content_length > METER_WEBHOOK_MAX_BODY) {
                    meter_log(LOG_WARNING, "webhook: body of %lld bytes "
                              "refused (413)", c->h.content_length);
                    meter_wh_respond(c->fd, 413,
                                     "{\"error\":\"body too large\"}");
                    meter_wh_linger(s, c);
                    return;
                }

                if (c->h.content_length < 0) {
                    c->h.content_length = 0;
                }
            }
        }
    }

    if (c->head > 0
        && c->len >= (size_t) c->head + (size_t) c->h.content_length)
    {
        meter_wh_serve(s, c);
    }
}


static void
meter_wh_accept(meter_webhook_srv_t *s)
{
    int  fd, i;

    for ( ;; ) {
        fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd == -1) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                meter_log(LOG_WARNING, "webhook: accept: %s",
                          strerror(errno));
            }

            return;
        }

        for (i = 0; i < METER_WEBHOOK_CONNS; i++) {
            if (s->conns[i].fd == -1) {
                break;
            }
        }

        if (i == METER_WEBHOOK_CONNS) {
            meter_wh_respond(fd, 503, "{\"error\":\"too many connections\"}");
            close(fd);
            continue;
        }

        s->conns[i].fd = fd;
        s->conns[i].deadline = meter_wh_now_ms() + s->timeout_ms;
    }
}


static void *
meter_wh_loop(void *arg)
{
    int                   i, n, idx[METER_WEBHOOK_CONNS];
    char                  drain[16];
    int64_t               now, wait;
    meter_wh_conn_t      *c;
    meter_webhook_srv_t  *s;
    struct pollfd         pfd[METER_WEBHOOK_CONNS + 2];

    s = arg;

    for ( ;; ) {
        pfd[0].fd = s->wake[0];
        pfd[0].events = POLLIN;
        pfd[1].fd = s->lfd;
        pfd[1].events = POLLIN;
        n = 2;

        now = meter_wh_now_ms();
        wait = 1000;

        for (i = 0; i < METER_WEBHOOK_CONNS; i++) {
            c = &s->conns[i];
            if (c->fd == -1) {
                continue;
            }

            if (c->deadline <= now) {
                if (!c->discard) {
                    meter_wh_respond(c->fd, 408,
                                     "{\"error\":\"timeout\"}");
                }

                meter_wh_close(c);
                continue;
            }

            if (c->deadline - now < wait) {
                wait = c->deadline - now;
            }

            pfd[n].fd = c->fd;
            pfd[n].events = POLLIN;
            idx[n - 2] = i;
            n++;
        }

        if (poll(pfd, (nfds_t) n, (int) wait) == -1) {
            if (errno == EINTR) {
                continue;
            }

            meter_log(LOG_ERR, "webhook: poll: %s", strerror(errno));
            sleep(1);
            continue;
        }

        if (pfd[0].revents) {
            if (read(s->wake[0], drain, sizeof(drain)) >= 0) {
                break;
            }
        }

        for (i = 2; i < n; i++) {
            if (pfd[i].revents) {
                meter_wh_read(s, &s->conns[idx[i - 2]]);
            }
        }

        if (pfd[1].revents & POLLIN) {
            meter_wh_accept(s);
        }
    }

    for (i = 0; i < METER_WEBHOOK_CONNS; i++) {
        if (s->conns[i].fd != -1) {
            meter_wh_close(&s->conns[i]);
        }
    }

    return NULL;
}


static int
meter_wh_listen(meter_webhook_srv_t *s, const char *addr, char *err,
    size_t errlen)
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

    s->lfd = fd;
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
    if (s->lfd != -1) {
        close(s->lfd);
    }

    if (s->unix_path != NULL) {
        (void) unlink(s->unix_path);
        free(s->unix_path);
    }

    if (s->wake[0] != -1) {
        close(s->wake[0]);
        close(s->wake[1]);
    }

    if (s->provider.data != NULL && s->provider.cleanup != NULL) {
        s->provider.cleanup(&s->provider);
    }

    meter_redis_close(&s->redis);
    free(s);
}


int
meter_webhook_start(const meter_conf_t *cf, meter_webhook_srv_t **srv,
    char *err, size_t errlen)
{
    int                   i;
    char                  e[512];
    int64_t               ms;
    sigset_t              all, old;
    const char           *listen_at, *t;
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
    s->lfd = -1;
    s->wake[0] = -1;
    s->wake[1] = -1;
    s->timeout_ms = 10000;

    for (i = 0; i < METER_WEBHOOK_CONNS; i++) {
        s->conns[i].fd = -1;
    }

    t = meter_conf_get(cf, "webhook.timeout");
    if (t != NULL) {
        if (meter_parse_duration(t, &ms) != 0 || ms < 100) {
            snprintf(err, errlen, "\"webhook.timeout\": \"%s\" is not a "
                     "duration of at least 100ms", t);
            goto failed;
        }

        s->timeout_ms = ms;
    }

    /* its own provider instance: nothing shared with the drain but cf */
    if (meter_provider_by_name(cf->provider, &s->provider) != 0
        || s->provider.init(&s->provider, cf, e, sizeof(e)) != 0)
    {
        snprintf(err, errlen, "webhook: provider %s: %s", cf->provider,
                 s->provider.init != NULL ? e : "unknown");
        goto failed;
    }

    if (s->provider.webhook == NULL) {
        snprintf(err, errlen, "\"webhook.listen\": provider %s takes no "
                 "webhooks", cf->provider);
        goto failed;
    }

    if (pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) != 0) {
        snprintf(err, errlen, "webhook: pipe: %s", strerror(errno));
        goto failed;
    }

    if (meter_wh_listen(s, listen_at, err, errlen) != 0) {
        goto failed;
    }

    /* signals stay with the main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    i = pthread_create(&s->thread, NULL, meter_wh_loop, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    if (i != 0) {
        snprintf(err, errlen, "webhook: pthread_create: %s", strerror(i));
        goto failed;
    }

    meter_log(LOG_NOTICE, "webhook: listening on %s for /webhooks/%s",
              listen_at, cf->provider);

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

    if (write(s->wake[1], "x", 1) != 1) {
        meter_log(LOG_ERR, "webhook: cannot wake the listener");
    }

    pthread_join(s->thread, NULL);
    meter_wh_free(s);
}


int
meter_webhook_check(const meter_conf_t *cf, char *err, size_t errlen)
{
    int                 port;
    char               *host, *path, secret[512], e[256];
    int64_t             ms;
    const char         *listen_at, *t, *key;
    meter_provider_t    p;

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

    t = meter_conf_get(cf, "webhook.timeout");
    if (t != NULL && (meter_parse_duration(t, &ms) != 0 || ms < 100)) {
        snprintf(err, errlen, "\"webhook.timeout\": \"%s\" is not a "
                 "duration of at least 100ms", t);
        return -1;
    }

    memset(&p, 0, sizeof(p));

    if (meter_provider_by_name(cf->provider, &p) != 0 || p.webhook == NULL) {
        snprintf(err, errlen, "\"webhook.listen\": provider %s takes no "
                 "webhooks", cf->provider);
        return -1;
    }

    /* without its secret every delivery would be refused */
    key = strcmp(cf->provider, "stripe") == 0 ? "stripe.webhook_secret_file"
          : strcmp(cf->provider, "chargebee") == 0
            ? "chargebee.webhook_password_file"
            : "recurly.webhook_key_file";

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
