
/*
 * Copyright (C) nginx-meter authors
 */


#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "meter_schema.h"
#include "util.h"


void
meter_sha256_hex(const void *data, size_t len, char *out)
{
    static const char  hex[] = "0123456789abcdef";

    unsigned char  md[SHA256_DIGEST_LENGTH];
    size_t         i;

    SHA256(data, len, md);

    for (i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 0xf];
    }

    out[2 * SHA256_DIGEST_LENGTH] = '\0';
}


void
meter_idem_key(time_t period_start, const char *subject, const char *meter,
    uint64_t seq, char *out)
{
    char    buf[512];
    char    hex[65];
    int     n;

    n = snprintf(buf, sizeof(buf), "%lld|%s|%s|%" PRIu64,
                 (long long) period_start, subject, meter, seq);
    if (n < 0 || (size_t) n >= sizeof(buf)) {
        n = (n < 0) ? 0 : (int) sizeof(buf) - 1;
    }

    meter_sha256_hex(buf, (size_t) n, hex);
    memcpy(out, hex, METER_IDEM_LEN);
    out[METER_IDEM_LEN] = '\0';
}


time_t
meter_period_start(time_t t, int period)
{
    time_t  r;

    r = t % period;
    if (r < 0) {
        r += period;
    }

    return t - r;
}


static int
meter_digits(const char *s, size_t n, int *v)
{
    size_t  i;

    *v = 0;

    for (i = 0; i < n; i++) {
        if (!isdigit((unsigned char) s[i])) {
            return -1;
        }

        *v = *v * 10 + (s[i] - '0');
    }

    return 0;
}


static time_t
meter_utc(int y, int mo, int d, int h, int mi, int s)
{
    struct tm  tm;
    time_t     t;

    if (y < 1970 || y > 9999 || mo < 1 || mo > 12 || d < 1 || d > 31
        || h > 23 || mi > 59 || s > 60)
    {
        return -1;
    }

    memset(&tm, 0, sizeof(tm));
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;

    t = timegm(&tm);

    /* timegm normalizes Feb 30 into March: reject such dates */
    if (t == -1 || tm.tm_mday != d || tm.tm_mon != mo - 1) {
        return -1;
    }

    return t;
}


time_t
meter_hour_parse(const char *s)
{
    int  y, mo, d, h;

    if (strlen(s) != 10
        || meter_digits(s, 4, &y) != 0
        || meter_digits(s + 4, 2, &mo) != 0
        || meter_digits(s + 6, 2, &d) != 0
        || meter_digits(s + 8, 2, &h) != 0)
    {
        return -1;
    }

    return meter_utc(y, mo, d, h, 0, 0);
}


void
meter_month_label(time_t t, char *yyyymm)
{
    struct tm  tm;

    gmtime_r(&t, &tm);
    (void) strftime(yyyymm, 7, "%Y%m", &tm);
}


time_t
meter_month_shift(time_t t, int delta)
{
    struct tm  tm;

    gmtime_r(&t, &tm);
    tm.tm_mon += delta;
    tm.tm_mday = 1;
    tm.tm_hour = 0;
    tm.tm_min = 0;
    tm.tm_sec = 0;

    return timegm(&tm);
}


void
meter_hour_format(time_t t, char *buf, size_t size)
{
    struct tm  tm;

    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y%m%d%H", &tm);
}


time_t
meter_hour_parse_dashed(const char *s)
{
    int  y, mo, d, h;

    if (strlen(s) != 13 || s[4] != '-' || s[7] != '-' || s[10] != 'T'
        || meter_digits(s, 4, &y) != 0
        || meter_digits(s + 5, 2, &mo) != 0
        || meter_digits(s + 8, 2, &d) != 0
        || meter_digits(s + 11, 2, &h) != 0)
    {
        return -1;
    }

    return meter_utc(y, mo, d, h, 0, 0);
}


void
meter_hour_format_dashed(time_t t, char *buf, size_t size)
{
    struct tm  tm;

    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%dT%H", &tm);
}


void
meter_iso8601(time_t t, char *buf, size_t size)
{
    struct tm  tm;

    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}


time_t
meter_iso8601_parse(const char *s)
{
    int          y, mo, d, h, mi, sec, oh, om, sign;
    time_t       t;
    const char  *p;

    h = mi = sec = 0;

    if (strlen(s) < 10 || s[4] != '-' || s[7] != '-'
        || meter_digits(s, 4, &y) != 0
        || meter_digits(s + 5, 2, &mo) != 0
        || meter_digits(s + 8, 2, &d) != 0)
    {
        return -1;
    }

    p = s + 10;

    if (*p == 'T' || *p == ' ') {
        if (meter_digits(p + 1, 2, &h) != 0) {
            return -1;
        }

        p += 3;

        if (*p == ':') {
            if (meter_digits(p + 1, 2, &mi) != 0) {
                return -1;
            }

            p += 3;

            if (*p == ':') {
                if (meter_digits(p + 1, 2, &sec) != 0) {
                    return -1;
                }

                p += 3;
            }
        }
    }

    t = meter_utc(y, mo, d, h, mi, sec);
    if (t == -1) {
        return -1;
    }

    if (*p == '\0' || ((*p == 'Z' || *p == 'z') && p[1] == '\0')) {
        return t;
    }

    if ((*p == '+' || *p == '-') && strlen(p) == 6 && p[3] == ':'
        && meter_digits(p + 1, 2, &oh) == 0
        && meter_digits(p + 4, 2, &om) == 0
        && oh < 24 && om < 60)
    {
        sign = (*p == '+') ? 1 : -1;
        return t - sign * (oh * 3600 + om * 60);
    }

    return -1;
}


int
meter_parse_duration(const char *s, int64_t *ms)
{
    char    *end;
    double   v, mul;

    if (s == NULL || *s == '\0' || isspace((unsigned char) *s) || *s == '-') {
        return -1;
    }

    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || end == s || !isfinite(v) || v < 0) {
        return -1;
    }

    if (strcmp(end, "") == 0 || strcmp(end, "s") == 0) {
        mul = 1000;

    } else if (strcmp(end, "ms") == 0) {
        mul = 1;

    } else if (strcmp(end, "m") == 0) {
        mul = 60000;

    } else if (strcmp(end, "h") == 0) {
        mul = 3600000;

    } else if (strcmp(end, "d") == 0) {
        mul = 86400000;

    } else {
        return -1;
    }

    if (v * mul > 9e15) {
        return -1;
    }

    *ms = (int64_t) llround(v * mul);

    return 0;
}


int
meter_parse_u64(const char *s, size_t len, uint64_t *v)
{
    size_t    i;
    uint64_t  r, d;

    if (len == 0 || len > 20) {
        return -1;
    }

    r = 0;

    for (i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }

        d = (uint64_t) (s[i] - '0');

        if (r > (UINT64_MAX - d) / 10) {
            return -1;
        }

        r = r * 10 + d;
    }

    *v = r;

    return 0;
}


double
meter_backoff(unsigned attempt, double base, double max, double retry_after,
    double rnd)
{
    double  d;

    if (attempt < 1) {
        attempt = 1;
    }

    d = base;

    while (--attempt > 0 && d < max) {
        d *= 2;
    }

    if (d > max) {
        d = max;
    }

    /* "equal jitter": spread retries of many records over [d/2, d) */
    d = d * (0.5 + rnd / 2);

    /* a server asking for longer than max (or for anything absurd) would
     * leave the record unbilled that long: max at most */
    if (retry_after > max) {
        retry_after = max;
    }

    if (retry_after > d) {
        d = retry_after;
    }

    return d;
}


static uint64_t
meter_map_hash(const char *s)
{
    uint64_t  h;

    /* FNV-1a */
    h = 14695981039346656037ULL;

    while (*s) {
        h ^= (unsigned char) *s++;
        h *= 1099511628211ULL;
    }

    return h;
}


int
meter_map_init(meter_map_t *m, size_t hint)
{
    size_t  cap;

    cap = 16;
    while (cap < hint * 2) {
        cap *= 2;
    }

    m->keys = calloc(cap, sizeof(char *));
    m->vals = calloc(cap, sizeof(void *));
    m->cap = cap;
    m->n = 0;

    if (m->keys == NULL || m->vals == NULL) {
        free(m->keys);
        free(m->vals);
        m->keys = NULL;
        m->vals = NULL;
        return -1;
    }

    return 0;
}


void **
meter_map_get(const meter_map_t *m, const char *key)
{
    size_t  i;

    if (m->cap == 0) {
        return NULL;
    }

    i = meter_map_hash(key) & (m->cap - 1);

    while (m->keys[i] != NULL) {
        if (strcmp(m->keys[i], key) == 0) {
            return &m->vals[i];
        }

        i = (i + 1) & (m->cap - 1);
    }

    return NULL;
}


static int
meter_map_grow(meter_map_t *m)
{
    size_t        i, j, cap;
    char        **keys;
    void        **vals;

    cap = m->cap * 2;
    keys = calloc(cap, sizeof(char *));
    vals = calloc(cap, sizeof(void *));

    if (keys == NULL || vals == NULL) {
        free(keys);
        free(vals);
        return -1;
    }

    for (i = 0; i < m->cap; i++) {
        if (m->keys[i] == NULL) {
            continue;
        }

        j = meter_map_hash(m->keys[i]) & (cap - 1);
        while (keys[j] != NULL) {
            j = (j + 1) & (cap - 1);
        }

        keys[j] = m->keys[i];
        vals[j] = m->vals[i];
    }

    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = cap;

    return 0;
}


void **
meter_map_put(meter_map_t *m, const char *key, int *created)
{
    size_t   i;
    void   **v;

    if (created != NULL) {
        *created = 0;
    }

    if (m->cap == 0 && meter_map_init(m, 16) != 0) {
        return NULL;
    }

    v = meter_map_get(m, key);
    if (v != NULL) {
        return v;
    }

    if ((m->n + 1) * 2 > m->cap && meter_map_grow(m) != 0) {
        return NULL;
    }

    i = meter_map_hash(key) & (m->cap - 1);
    while (m->keys[i] != NULL) {
        i = (i + 1) & (m->cap - 1);
    }

    m->keys[i] = strdup(key);
    if (m->keys[i] == NULL) {
        return NULL;
    }

    m->vals[i] = NULL;
    m->n++;

    if (created != NULL) {
        *created = 1;
    }

    return &m->vals[i];
}


void
meter_map_free(meter_map_t *m, void (*free_val)(void *))
{
    size_t  i;

    for (i = 0; i < m->cap; i++) {
        if (m->keys[i] != NULL) {
            free(m->keys[i]);
            if (free_val != NULL) {
                free_val(m->vals[i]);
            }
        }
    }

    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = 0;
    m->n = 0;
}


int
meter_str_add(meter_str_t *s, const char *p, size_t n)
{
    size_t   cap;
    char    *d;

    if (s->len + n + 1 > s->cap) {
        cap = (s->cap == 0) ? 256 : s->cap;
        while (cap < s->len + n + 1) {
            cap *= 2;
        }

        d = realloc(s->data, cap);
        if (d == NULL) {
            return -1;
        }

        s->data = d;
        s->cap = cap;
    }

    memcpy(s->data + s->len, p, n);
    s->len += n;
    s->data[s->len] = '\0';

    return 0;
}


int
meter_str_printf(meter_str_t *s, const char *fmt, ...)
{
    char     buf[512], *big;
    va_list  ap;
    int      n, rc;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);

    if (n < 0) {
        return -1;
    }

    if ((size_t) n < sizeof(buf)) {
        return meter_str_add(s, buf, (size_t) n);
    }

    big = malloc((size_t) n + 1);
    if (big == NULL) {
        return -1;
    }

    va_start(ap, fmt);
    vsnprintf(big, (size_t) n + 1, fmt, ap);
    va_end(ap);

    rc = meter_str_add(s, big, (size_t) n);
    free(big);

    return rc;
}


int
meter_str_json(meter_str_t *s, const char *p)
{
    char  esc[8];

    if (p == NULL) {
        return meter_str_add(s, "null", 4);
    }

    if (meter_str_add(s, "\"", 1) != 0) {
        return -1;
    }

    for ( /* void */ ; *p; p++) {
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = *p;
            if (meter_str_add(s, esc, 2) != 0) {
                return -1;
            }

        } else if ((unsigned char) *p < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", (unsigned char) *p);
            if (meter_str_add(s, esc, 6) != 0) {
                return -1;
            }

        } else if (meter_str_add(s, p, 1) != 0) {
            return -1;
        }
    }

    return meter_str_add(s, "\"", 1);
}


void
meter_str_free(meter_str_t *s)
{
    free(s->data);
    s->data = NULL;
    s->len = 0;
    s->cap = 0;
}


time_t
meter_time_from_num(double v)
{
    /* NaN fails every comparison: 0 */
    if (!(v > 0)) {
        return 0;
    }

    if (v >= (double) METER_TIME_MAX) {
        return METER_TIME_MAX;
    }

    return (time_t) v;
}


int
meter_gauge_name(const char *m, size_t len)
{
    size_t  n, k;

    /* 1: NAME:max, 2: NAME:last */
    for (k = 1; k <= 2; k++) {
        n = (k == 1) ? MTR_GAUGE_SFX_LEN : sizeof(MTR_GAUGE_LAST_SFX) - 1;

        if (len <= n || len > MTR_METER_MAX) {
            continue;
        }

        if (memcmp(m + len - n, (k == 1) ? MTR_GAUGE_MAX_SFX
                                         : MTR_GAUGE_LAST_SFX, n) == 0
            && strspn(m, MTR_NAME_CHARS) == len - n)
        {
            return (int) k;
        }
    }

    return 0;
}
