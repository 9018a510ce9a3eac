
/*
 * Copyright (C) nginx-meter authors
 *
 * Small pure helpers of meter-worker and meterctl: hashing, UTC time
 * formats, periods, backoff, a string set/map.  No I/O, so they are unit
 * tested directly.
 */


#ifndef _METER_UTIL_H_INCLUDED_
#define _METER_UTIL_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>


#define METER_HOUR          3600
#define METER_DAY           86400
#define METER_IDEM_LEN      32      /* hex chars of the idempotency key */


/* lowercase hex SHA-256 of data; out >= 65 */
void meter_sha256_hex(const void *data, size_t len, char *out);

/*
 * The idempotency key of a record: the first 32 hex chars of
 * sha256("<period_start unix>|<subject>|<meter>|<seq>"); out >= 33.
 * subject is the customer id, or the key hash for a key without customer.
 */
void meter_idem_key(time_t period_start, const char *subject,
    const char *meter, uint64_t seq, char *out);

/* start of the UTC hour or day containing t (period 3600 or 86400) */
time_t meter_period_start(time_t t, int period);

/* "YYYYMMDDHH" <-> Unix seconds of the hour's start; -1 when malformed */
time_t meter_hour_parse(const char *s);
/* YYYYMM (7 bytes) of the month t is in */
void meter_month_label(time_t t, char *yyyymm);

/* the start of the month t is in, moved by delta months */
time_t meter_month_shift(time_t t, int delta);

void meter_hour_format(time_t t, char *buf, size_t size);

/* "YYYY-MM-DDTHH" (meterctl) */
time_t meter_hour_parse_dashed(const char *s);
void meter_hour_format_dashed(time_t t, char *buf, size_t size);

/* "2026-11-24T10:00:00Z"; buf >= 21 */
void meter_iso8601(time_t t, char *buf, size_t size);

/*
 * ISO 8601 UTC: "2026-11-24T10:00:00Z", "2026-11-24T10:00Z",
 * "2026-11-24T10", "2026-11-24", optional "+00:00"/"+HH:MM" offset;
 * -1 when malformed.
 */
time_t meter_iso8601_parse(const char *s);

/* a duration: "30s", "5m", "1h", "7d", "500ms", plain seconds; ms into *ms;
 * -1 when malformed or negative */
int meter_parse_duration(const char *s, int64_t *ms);

/* a decimal uint64; -1 when malformed or out of range */
int meter_parse_u64(const char *s, size_t len, uint64_t *v);

/* a gauge's METER (len bytes): 1 a name then MTR_GAUGE_MAX_SFX, 2 then
 * MTR_GAUGE_LAST_SFX; 0 not a gauge */
int meter_gauge_name(const char *m, size_t len);

/*
 * Delay before attempt number "attempt" (1 = the first retry):
 * min(max, base * 2^(attempt-1)) scaled by a jitter factor in [0.5, 1.0)
 * drawn from rnd (0 <= rnd < 1), and never below min(retry_after, max).
 */
double meter_backoff(unsigned attempt, double base, double max,
    double retry_after, double rnd);


/* 9999-12-31T23:59:59Z, the last second RFC 3339 can write */
#define METER_TIME_MAX      ((time_t) 253402300799LL)

/*
 * A provider's JSON number as Unix seconds: a cast of a double beyond
 * time_t is undefined, so 0 for NaN and v <= 0, METER_TIME_MAX at most.
 */
time_t meter_time_from_num(double v);


/* a string -> pointer hash map (open addressing, keys copied) */
typedef struct {
    char                      **keys;
    void                      **vals;
    size_t                      cap;    /* power of two */
    size_t                      n;
} meter_map_t;

int meter_map_init(meter_map_t *m, size_t hint);
void **meter_map_get(const meter_map_t *m, const char *key);
/* returns the value slot, inserting NULL when absent; NULL on ENOMEM */
void **meter_map_put(meter_map_t *m, const char *key, int *created);
void meter_map_free(meter_map_t *m, void (*free_val)(void *));


/* a growable, always NUL-terminated string */
typedef struct {
    char                       *data;
    size_t                      len;
    size_t                      cap;
} meter_str_t;

int meter_str_add(meter_str_t *s, const char *p, size_t n);
int meter_str_printf(meter_str_t *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* a JSON string literal, or null when p is NULL */
int meter_str_json(meter_str_t *s, const char *p);
void meter_str_free(meter_str_t *s);


#endif /* _METER_UTIL_H_INCLUDED_ */
