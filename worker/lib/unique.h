
/*
 * Copyright (C) nginx-meter authors
 *
 * Reading unique-user counts (docs/redis-schema.md "Unique users"): the
 * distinct count of a set of keys for one meter and unique period, and
 * the walk over a month's index mtr:uqidx:YYYYMM.  Shared by meterctl
 * usage and reconcile, the portal, the alerts and the worker's billing.
 */


#ifndef _METER_UNIQUE_H_INCLUDED_
#define _METER_UNIQUE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "meter_schema.h"
#include "redis.h"


#define METER_UPERIOD_MAX       10      /* "YYYYMMDDHH" */


/*
 * The distinct count of keys khs[0 .. n-1] (key hashes) for (meter,
 * uperiod): the exact union of their sets while every set is under
 * MTR_UNIQUE_EXACT, else max(MTR_UNIQUE_EXACT, PFCOUNT of the union of
 * their HyperLogLogs), merged in two mtr:{worker}:uh:tmp:N copies (the
 * worker's slot; this process's own N, deleted after, 60 s expiry).
 * 0 with *count, or -1 with err (Redis).
 */
int meter_unique_count(meter_redis_t *r, const char *const *khs, size_t n,
    const char *meter, const char *uperiod, uint64_t *count, char *err,
    size_t errlen);

/*
 * Calls cb for every member "KH|NAME|UPERIOD" of mtr:uqidx:YYYYMM
 * (SSCAN: a member may come twice, malformed ones are skipped).  cb
 * returns 0 to go on, -1 to stop (then -1, err untouched).  0, or -1
 * with err (Redis).
 */
typedef int (*meter_unique_cb_t)(const char *kh, const char *meter,
    const char *uperiod, void *arg);

int meter_unique_month(meter_redis_t *r, const char *yyyymm,
    meter_unique_cb_t cb, void *arg, char *err, size_t errlen);

/* the start and end (Unix s) of UPERIOD YYYYMM, YYYYMMDD or YYYYMMDDHH;
 * 0, or -1 when malformed */
int meter_uperiod_range(const char *uperiod, time_t *start, time_t *end);



#endif /* _METER_UNIQUE_H_INCLUDED_ */
