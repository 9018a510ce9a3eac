
/*
 * Copyright (C) nginx-meter authors
 *
 * meter-worker's config file: "key = value" lines, "#" comments.  Every
 * key is checked at load time; an error names file:line and the key.
 * Provider keys ("stripe.*", "chargebee.*", "recurly.*", "http.*",
 * "metronome.*") are stored as they are and read by the providers
 * (meter_conf_get()).
 */


#ifndef _METER_CONFIG_H_INCLUDED_
#define _METER_CONFIG_H_INCLUDED_


#include <stdint.h>
#include <time.h>

#include "provider.h"


#define METER_CONF_DEFAULT_REDIS   "127.0.0.1:6379"


typedef struct {
    char                       *key;
    char                       *value;
    unsigned                    line;
} meter_kv_t;


struct meter_conf_s {
    char                       *path;

    char                       *redis;          /* as written */
    char                       *redis_host;     /* NULL for unix:; the
                                                 * whole sentinel://... */
    int                         redis_port;
    char                       *redis_unix;
    char                       *redis_password_file;
    int                         redis_db;
    int64_t                     redis_timeout_ms;
    int                         redis_wait;     /* replicas a record must
                                                 * reach before a send */

    char                       *provider;
    int                         report_period;  /* 3600 or 86400 */
    time_t                      grace;
    time_t                      retention;
    time_t                      sync_interval;
    time_t                      retry_base;
    time_t                      retry_max;
    time_t                      max_age;        /* 0: no limit */
    time_t                      lock_ttl;
    int64_t                     turn_ms;        /* drain work per turn */
    int                         log_level;

    char                       *file_path;
    char                       *audit_path;

    meter_kv_t                 *kv;             /* every key, in order */
    size_t                      nkv;
};


/* NULL with err "FILE:LINE: ..." (or "FILE: ...") on any error */
meter_conf_t *meter_conf_load(const char *path, char *err, size_t errlen);
void meter_conf_free(meter_conf_t *cf);

/* the provider id configured for our meter ("meter.calls"), or NULL */
const char *meter_conf_meter(const meter_conf_t *cf, const char *meter);

/*
 * "host:port", "[v6]:port", "unix:/path" into host/port or unix path
 * (malloc'ed); 0 or -1.
 */
int meter_conf_parse_addr(const char *s, char **host, int *port,
    char **unix_path);

/* reads a secret file: absolute, or relative to $CREDENTIALS_DIRECTORY */
int meter_read_secret(const char *name, char *buf, size_t size, char *err,
    size_t errlen);


#endif /* _METER_CONFIG_H_INCLUDED_ */
