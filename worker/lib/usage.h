
/*
 * Copyright (C) nginx-meter authors
 *
 * A customer's usage as "meterctl usage CUSTOMER" shows it, shared with
 * the portal's GET /usage (daemon/portal.c) so that both give the same
 * numbers: per period (hour or UTC day) and meter, the quantity metered
 * (Σ over the customer's keys and writers, both layouts: mtr:u and the
 * writer hashes, lib/wusage.c), the part billed
 * (Σ min(b, u)) and the worker's record still open for it; and the
 * customer's prepaid credit per meter (mtr:gov:credit).
 */


#ifndef _METER_USAGE_H_INCLUDED_
#define _METER_USAGE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "meter_schema.h"
#include "redis.h"
#include "util.h"


typedef struct {
    time_t                      start;      /* hour, or day */
    char                        meter[MTR_METER_MAX + 1];
    uint64_t                    quantity;
    uint64_t                    billed;
    int                         sending;    /* records open or dead */
    int                         dead;
    char                        record[METER_IDEM_LEN + 1];
    int                         gauge;      /* meter: the name billed,
                                             * quantity: the largest */
} meter_usage_row_t;


typedef struct {
    char                        meter[MTR_METER_MAX + 1];
    int64_t                     granted;
    int64_t                     left;
} meter_credit_row_t;


/*
 * The usage of customer id in the hours [from, to) (0: unbounded), summed
 * per period (METER_HOUR or METER_DAY) and meter, sorted by start, then
 * meter; wperiod is the worker's report_period (whose records are looked
 * up).  0 with *rows (free()) and *n, or -1 with err (Redis, memory).
 */
int meter_usage_rows(meter_redis_t *r, const char *id, time_t from,
    time_t to, int period, int wperiod, meter_usage_row_t **rows, size_t *n,
    char *err, size_t errlen);

/* "billed", "dead", "sending", "unbilled" or "partly billed" */
const char *meter_usage_state(const meter_usage_row_t *row);

/*
 * The credit meters of customer id (only: just that meter, or NULL),
 * in mtr:gov:credit's order: 0 with *rows (free()) and *n, or -1 with err.
 */
int meter_usage_credit(meter_redis_t *r, const char *id, const char *only,
    meter_credit_row_t **rows, size_t *n, char *err, size_t errlen);


#endif /* _METER_USAGE_H_INCLUDED_ */
