
/*
 * Copyright (C) nginx-meter authors
 */


#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "gov.h"
#include "log.h"
#include "redis.h"
#include "util.h"


typedef enum {
    METER_KEY_STRING = 0,
    METER_KEY_ADDR,
    METER_KEY_INT,
    METER_KEY_DURATION,         /* seconds */
    METER_KEY_DURATION_MS,
    METER_KEY_PROVIDER,
    METER_KEY_PERIOD,
    METER_KEY_LOGLEVEL
} meter_key_type_e;


typedef struct {
    const char                 *name;
    meter_key_type_e            type;
    size_t                      offset;
} meter_key_t;


#define meter_off(f)  offsetof(meter_conf_t, f)

static const meter_key_t  meter_keys[] = {
    { "redis", METER_KEY_ADDR, meter_off(redis) },
    { "redis.password_file", METER_KEY_STRING,
      meter_off(redis_password_file) },
    { "redis.db", METER_KEY_INT, meter_off(redis_db) },
    { "redis.timeout", METER_KEY_DURATION_MS, meter_off(redis_timeout_ms) },
    { "redis.wait", METER_KEY_INT, meter_off(redis_wait) },
    { "provider", METER_KEY_PROVIDER, meter_off(provider) },
    { "report_period", METER_KEY_PERIOD, meter_off(report_period) },
    { "grace", METER_KEY_DURATION, meter_off(grace) },
    { "retention", METER_KEY_DURATION, meter_off(retention) },
    { "sync_interval", METER_KEY_DURATION, meter_off(sync_interval) },
    { "retry.base", METER_KEY_DURATION, meter_off(retry_base) },
    { "retry.max", METER_KEY_DURATION, meter_off(retry_max) },
    { "max_age", METER_KEY_DURATION, meter_off(max_age) },
    { "lock_ttl", METER_KEY_DURATION, meter_off(lock_ttl) },
    { "turn_time", METER_KEY_DURATION_MS, meter_off(turn_ms) },
    { "log_level", METER_KEY_LOGLEVEL, meter_off(log_level) },
    { "file.path", METER_KEY_STRING, meter_off(file_path) },
    { "audit.path", METER_KEY_STRING, meter_off(audit_path) },
    { NULL, 0, 0 }
};


/* keys read by the providers, the webhook listener and the delinquency
 * sync themselves (they validate them when they start) */
static const char  *meter_provider_prefixes[] = {
    "stripe.", "chargebee.", "recurly.", "http.", "plan.", "webhook.",
    "sync.", "metronome.", "metrics.",
    /* portal.*: daemon/portal.c (issue 14) */
    "portal.",
    NULL
};


/* alerts (daemon/alerts.c checks them at start and on reload): rules
 * "alert.NAME.*", settings "alert.*", the mail relay "smtp.*" */
static const char  *meter_alert_prefixes[] = {
    "alert.", "smtp.", NULL
};


static const char  *meter_provider_names[] = {
    "file", "stripe", "chargebee", "recurly", "http", "metronome", NULL
};


/* key starts with one of prefixes and goes on after it */
static int
meter_conf_prefixed(const char **prefixes, const char *key)
{
    size_t  i, n;

    for (i = 0; prefixes[i] != NULL; i++) {
        n = strlen(prefixes[i]);
        if (strncmp(key, prefixes[i], n) == 0 && key[n] != '\0') {
            return 1;
        }
    }

    return 0;
}


static char *
meter_trim(char *s)
{
    char  *e;

    while (isspace((unsigned char) *s)) {
        s++;
    }

    e = s + strlen(s);
    while (e > s && isspace((unsigned char) e[-1])) {
        *--e = '\0';
    }

    return s;
}


static int
meter_valid_name(const char *s, size_t max)
{
    size_t  n;

    for (n = 0; s[n] != '\0'; n++) {
        if (!isalnum((unsigned char) s[n]) && s[n] != '_' && s[n] != '.'
            && s[n] != '-')
        {
            return 0;
        }
    }

    return n > 0 && n <= max;
}


int
meter_conf_parse_addr(const char *s, char **host, int *port,
    char **unix_path)
{
    const char         *colon, *h;
    size_t              hlen;
    char               *end;
    long                p;
    meter_sentinels_t   sl;

    *host = NULL;
    *unix_path = NULL;
    *port = 0;

    if (strncmp(s, "sentinel://", 11) == 0) {
        /* resolved at each connect (redis.c): checked here, kept whole */
        if (meter_sentinel_parse(s, &sl) != 0) {
            return -1;
        }

        *host = strdup(s);
        return (*host == NULL) ? -1 : 0;
    }

    if (strncmp(s, "unix:", 5) == 0) {
        if (s[5] != '/') {
            return -1;
        }

        *unix_path = strdup(s + 5);
        return (*unix_path == NULL) ? -1 : 0;
    }

    if (s[0] == '[') {
        colon = strstr(s, "]:");
        if (colon == NULL) {
            return -1;
        }

        h = s + 1;
        hlen = (size_t) (colon - h);
        colon++;

    } else {
        colon = strrchr(s, ':');
        if (colon == NULL) {
            return -1;
        }

        h = s;
        hlen = (size_t) (colon - s);
    }

    if (hlen == 0 || colon[1] == '\0') {
        return -1;
    }

    errno = 0;
    p = strtol(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || p < 1 || p > 65535) {
        return -1;
    }

    *host = strndup(h, hlen);
    *port = (int) p;

    return (*host == NULL) ? -1 : 0;
}


static int
meter_conf_set(meter_conf_t *cf, const meter_key_t *k, const char *v)
{
    int64_t   ms;
    char     *end, *s, **sp;
    long      n;
    size_t    i;

    switch (k->type) {

    case METER_KEY_STRING:
    case METER_KEY_ADDR:
    case METER_KEY_PROVIDER:
        if (*v == '\0') {
            return -1;
        }

        if (k->type == METER_KEY_PROVIDER) {
            for (i = 0; meter_provider_names[i] != NULL; i++) {
                if (strcmp(v, meter_provider_names[i]) == 0) {
                    break;
                }
            }

            if (meter_provider_names[i] == NULL) {
                return -1;
            }
        }

        if (k->type == METER_KEY_ADDR) {
            free(cf->redis_host);
            free(cf->redis_unix);
            if (meter_conf_parse_addr(v, &cf->redis_host, &cf->redis_port,
                                      &cf->redis_unix)
                != 0)
            {
                return -1;
            }
        }

        s = strdup(v);
        if (s == NULL) {
            return -1;
        }

        sp = (char **) ((char *) cf + k->offset);
        free(*sp);
        *sp = s;
        return 0;

    case METER_KEY_INT:
        errno = 0;
        n = strtol(v, &end, 10);
        if (errno != 0 || end == v || *end != '\0' || n < 0 || n > 1000000) {
            return -1;
        }

        *(int *) ((char *) cf + k->offset) = (int) n;
        return 0;

    case METER_KEY_DURATION:
        if (meter_parse_duration(v, &ms) != 0) {
            return -1;
        }

        *(time_t *) ((char *) cf + k->offset) = (time_t) (ms / 1000);
        return 0;

    case METER_KEY_DURATION_MS:
        if (meter_parse_duration(v, &ms) != 0 || ms == 0) {
            return -1;
        }

        *(int64_t *) ((char *) cf + k->offset) = ms;
        return 0;

    case METER_KEY_PERIOD:
        if (strcmp(v, "hour") == 0) {
            cf->report_period = METER_HOUR;

        } else if (strcmp(v, "day") == 0) {
            cf->report_period = METER_DAY;

        } else {
            return -1;
        }

        return 0;

    case METER_KEY_LOGLEVEL:
        n = meter_log_parse_level(v);
        if (n < 0) {
            return -1;
        }

        cf->log_level = (int) n;
        return 0;
    }

    return -1;
}


static int
meter_conf_kv_add(meter_conf_t *cf, const char *key, const char *value,
    unsigned line)
{
    meter_kv_t  *kv;

    kv = realloc(cf->kv, (cf->nkv + 1) * sizeof(meter_kv_t));
    if (kv == NULL) {
        return -1;
    }

    cf->kv = kv;
    kv = &cf->kv[cf->nkv];
    kv->key = strdup(key);
    kv->value = strdup(value);
    kv->line = line;

    if (kv->key == NULL || kv->value == NULL) {
        free(kv->key);
        free(kv->value);
        return -1;
    }

    cf->nkv++;

    return 0;
}


static const meter_kv_t *
meter_conf_find(const meter_conf_t *cf, const char *key)
{
    size_t  i;

    for (i = 0; i < cf->nkv; i++) {
        if (strcmp(cf->kv[i].key, key) == 0) {
            return &cf->kv[i];
        }
    }

    return NULL;
}


/* "plan.NAME.quota.METER = LIMIT/unit" (lib/gov.c reads them) */
static int
meter_conf_bad_quota(const char *key, const char *value)
{
    int          unit;
    int64_t      limit;
    const char  *q;

    if (strncmp(key, "plan.", 5) != 0) {
        return 0;
    }

    q = strstr(key + 5, ".quota.");
    if (q == NULL) {
        return 0;
    }

    return q == key + 5 || !meter_valid_name(q + 7, 32)
           || meter_quota_parse(value, &limit, &unit) != 0;
}


meter_conf_t *
meter_conf_load(const char *path, char *err, size_t errlen)
{
    FILE              *f;
    char              *line, *p, *key, *value, *eq;
    size_t             cap;
    ssize_t            n;
    unsigned           lineno;
    meter_conf_t      *cf;
    const meter_kv_t  *dup;
    const meter_key_t *k;

    line = NULL;
    cap = 0;
    lineno = 0;

    cf = calloc(1, sizeof(meter_conf_t));
    if (cf == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }

    cf->redis_db = 0;
    cf->redis_timeout_ms = 5000;
    cf->redis_wait = -1;
    cf->report_period = 0;
    cf->grace = 300;
    cf->retention = 7 * 86400;
    cf->sync_interval = 300;
    cf->retry_base = 10;
    cf->retry_max = 3600;
    cf->max_age = -1;
    cf->lock_ttl = 60;
    cf->turn_ms = 10000;
    cf->log_level = LOG_INFO;

    cf->path = strdup(path);
    if (cf->path == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        goto failed;
    }

    f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        goto failed;
    }

    while ((n = getline(&line, &cap, f)) != -1) {
        lineno++;

        p = meter_trim(line);
        if (*p == '\0' || *p == '#') {
            continue;
        }

        eq = strchr(p, '=');
        if (eq == NULL) {
            snprintf(err, errlen, "%s:%u: expected \"key = value\"", path,
                     lineno);
            goto failed_file;
        }

        *eq = '\0';
        key = meter_trim(p);
        value = meter_trim(eq + 1);

        if (*key == '\0') {
            snprintf(err, errlen, "%s:%u: missing key before \"=\"", path,
                     lineno);
            goto failed_file;
        }

        dup = meter_conf_find(cf, key);
        if (dup != NULL) {
            snprintf(err, errlen, "%s:%u: duplicate key \"%s\" (first on line "
                     "%u)", path, lineno, key, dup->line);
            goto failed_file;
        }

        for (k = meter_keys; k->name != NULL; k++) {
            if (strcmp(k->name, key) == 0) {
                break;
            }
        }

        if (k->name != NULL) {
            if (meter_conf_set(cf, k, value) != 0) {
                snprintf(err, errlen, "%s:%u: invalid value \"%s\" for "
                         "\"%s\"", path, lineno, value, key);
                goto failed_file;
            }

        } else if (strncmp(key, "meter.", 6) == 0) {
            if (!meter_valid_name(key + 6, 32)) {
                snprintf(err, errlen, "%s:%u: invalid meter name in key "
                         "\"%s\"", path, lineno, key);
                goto failed_file;
            }

            if (*value == '\0') {
                snprintf(err, errlen, "%s:%u: empty value for \"%s\"", path,
                         lineno, key);
                goto failed_file;
            }

        } else {
            if (!meter_conf_prefixed(meter_provider_prefixes, key)
                && !meter_conf_prefixed(meter_alert_prefixes, key))
            {
                snprintf(err, errlen, "%s:%u: unknown key \"%s\"", path,
                         lineno, key);
                goto failed_file;
            }

            if (meter_conf_bad_quota(key, value)) {
                snprintf(err, errlen, "%s:%u: invalid quota \"%s\" for "
                         "\"%s\" (LIMIT/day|week|month, a meter name "
                         "[A-Za-z0-9_.-]{1,32})", path, lineno, value, key);
                goto failed_file;
            }
        }

        if (meter_conf_kv_add(cf, key, value, lineno) != 0) {
            snprintf(err, errlen, "%s:%u: out of memory", path, lineno);
            goto failed_file;
        }
    }

    if (ferror(f)) {
        snprintf(err, errlen, "%s: read error: %s", path, strerror(errno));
        goto failed_file;
    }

    fclose(f);
    free(line);
    line = NULL;

    /* defaults that depend on other keys */

    if (cf->redis == NULL) {
        k = &meter_keys[0];
        if (meter_conf_set(cf, k, METER_CONF_DEFAULT_REDIS) != 0) {
            snprintf(err, errlen, "%s: out of memory", path);
            goto failed;
        }
    }

    /* behind Sentinel a record reaches the replica before it is sent:
     * a failover cannot lose it and bill its usage again */
    if (cf->redis_wait < 0) {
        cf->redis_wait = (strncmp(cf->redis, "sentinel://", 11) == 0);
    }

    if (cf->provider == NULL) {
        cf->provider = strdup("file");
        if (cf->provider == NULL) {
            snprintf(err, errlen, "%s: out of memory", path);
            goto failed;
        }
    }

    if (cf->report_period == 0) {
        /* Chargebee keeps at most 5000 usages per subscription */
        cf->report_period = (strcmp(cf->provider, "chargebee") == 0)
                            ? METER_DAY : METER_HOUR;
    }

    if (cf->max_age == -1) {
        /* Stripe refuses meter events older than 35 days */
        cf->max_age = (strcmp(cf->provider, "stripe") == 0) ? 35 * 86400 : 0;

        /* Metronome takes events backdated at most 34 days
         * (metronome-node src/resources/v1/usage.ts, "ingest") */
        if (strcmp(cf->provider, "metronome") == 0) {
            cf->max_age = 34 * 86400;
        }
    }

    if (strcmp(cf->provider, "file") == 0 && cf->file_path == NULL) {
        snprintf(err, errlen, "%s: \"file.path\" is required with "
                 "\"provider = file\"", path);
        goto failed;
    }

    if (cf->retry_base < 1 || cf->retry_max < cf->retry_base) {
        snprintf(err, errlen, "%s:%u: \"retry.base\" must be at least 1s and "
                 "at most \"retry.max\"", path,
                 meter_conf_find(cf, "retry.base") != NULL
                 ? meter_conf_find(cf, "retry.base")->line : 0);
        goto failed;
    }

    if (cf->turn_ms < 100) {
        snprintf(err, errlen, "%s:%u: \"turn_time\" must be at least "
                 "100ms", path, meter_conf_find(cf, "turn_time")->line);
        goto failed;
    }

    if (cf->lock_ttl < 5) {
        snprintf(err, errlen, "%s:%u: \"lock_ttl\" must be at least 5s", path,
                 meter_conf_find(cf, "lock_ttl")->line);
        goto failed;
    }

    if (cf->sync_interval < 1) {
        snprintf(err, errlen, "%s:%u: \"sync_interval\" must be at least 1s",
                 path, meter_conf_find(cf, "sync_interval")->line);
        goto failed;
    }

    return cf;

failed_file:

    fclose(f);

failed:

    free(line);
    meter_conf_free(cf);

    return NULL;
}


void
meter_conf_free(meter_conf_t *cf)
{
    size_t  i;

    if (cf == NULL) {
        return;
    }

    for (i = 0; i < cf->nkv; i++) {
        free(cf->kv[i].key);
        free(cf->kv[i].value);
    }

    free(cf->kv);
    free(cf->path);
    free(cf->redis);
    free(cf->redis_host);
    free(cf->redis_unix);
    free(cf->redis_password_file);
    free(cf->provider);
    free(cf->file_path);
    free(cf->audit_path);
    free(cf);
}


const char *
meter_conf_get(const meter_conf_t *cf, const char *key)
{
    const meter_kv_t  *kv;

    kv = meter_conf_find(cf, key);

    return (kv != NULL) ? kv->value : NULL;
}


const char *
meter_conf_meter(const meter_conf_t *cf, const char *meter)
{
    char  key[64];

    snprintf(key, sizeof(key), "meter.%s", meter);

    return meter_conf_get(cf, key);
}


/*
 * The errors never name the file: the value of a *_file key is printed
 * nowhere, because the secret itself is sometimes put there by mistake.
 */
int
meter_read_secret(const char *name, char *buf, size_t size, char *err,
    size_t errlen)
{
    int          relative;
    char         path[4096];
    const char  *dir;
    FILE        *f;
    size_t       n;

    dir = getenv("CREDENTIALS_DIRECTORY");
    relative = (name[0] != '/' && dir != NULL && *dir != '\0');

    if (relative) {
        snprintf(path, sizeof(path), "%s/%s", dir, name);

    } else {
        snprintf(path, sizeof(path), "%s", name);
    }

    f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "cannot open the file it names%s: %s (the "
                 "value is a file name, not the secret itself)",
                 relative ? " (in $CREDENTIALS_DIRECTORY)" : "",
                 strerror(errno));
        explicit_bzero(path, sizeof(path));
        return -1;
    }

    explicit_bzero(path, sizeof(path));

    n = fread(buf, 1, size - 1, f);

    if (ferror(f)) {
        snprintf(err, errlen, "cannot read the file it names");
        fclose(f);
        return -1;
    }

    if (n == size - 1 && fgetc(f) != EOF) {
        snprintf(err, errlen, "the file it names is longer than %zu bytes",
                 size - 2);
        explicit_bzero(buf, size);
        fclose(f);
        return -1;
    }

    fclose(f);

    buf[n] = '\0';

    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) {
        buf[--n] = '\0';
    }

    if (n == 0) {
        snprintf(err, errlen, "the file it names is empty");
        return -1;
    }

    return 0;
}


int
meter_conf_secret(const meter_conf_t *cf, const char *key, char *buf,
    size_t size, char *err, size_t errlen)
{
    const meter_kv_t  *kv;
    char               e[512];

    kv = meter_conf_find(cf, key);
    if (kv == NULL) {
        snprintf(err, errlen, "%s: \"%s\" is required", cf->path, key);
        return -1;
    }

    if (meter_read_secret(kv->value, buf, size, e, sizeof(e)) != 0) {
        snprintf(err, errlen, "%s:%u: \"%s\": %s", cf->path, kv->line, key, e);
        return -1;
    }

    return 0;
}
