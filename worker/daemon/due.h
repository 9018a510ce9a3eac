
/*
 * Copyright (C) nginx-meter authors
 *
 * What a drain pass reads: the closed hours that may hold unbilled usage
 * (docs/redis-schema.md, "Settled hours").
 */


#ifndef _METER_DUE_H_INCLUDED_
#define _METER_DUE_H_INCLUDED_


#include <time.h>

#include "drain.h"


typedef struct {
    char                        hour[16];
    time_t                      start;
    int                         dirty;          /* in mtr:hours */
    char                        digest[41];     /* writer layout, before */
} meter_due_hour_t;


/*
 * The closed hours (start + 1h <= closed_end) to read, oldest first: every
 * one in mtr:hours, and the settled ones whose confirming read is due
 * (grace after they left mtr:hours) or whose writer layout changed.
 * 0 with *out (free()) and *n, or -1 on a Redis error.
 */
int meter_due_hours(meter_drain_t *d, time_t closed_end, time_t now,
    meter_due_hour_t **out, size_t *n);

/* the hour was read and everything in it is billed: settled; 0 or -1 */
int meter_due_settle(meter_drain_t *d, const meter_due_hour_t *h,
    time_t now);

/*
 * What is due now, for meterctl status and the metrics: the key-hours of
 * closed hours not settled, and the start of the oldest such hour (0:
 * none); 0 or -1 on a Redis error
 */
int meter_due_backlog(meter_redis_t *r, time_t closed_end, time_t now,
    unsigned long long *backlog, time_t *oldest);

/* retention removed the hour */
void meter_due_forget(meter_drain_t *d, const char *hour);


#endif /* _METER_DUE_H_INCLUDED_ */
