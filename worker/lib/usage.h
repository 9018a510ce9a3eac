
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
#include "figure_read.h"
#include "util.h"


typedef struct {
    time_t                      start;      /* hour, or day */
    char                        meter[MTR_METER_MAX + 1];
    uint64_t                    quantity;
    uint64_t                    billed;
    int                         sending;    /* records open or dead */
    int                         dead;
    char                        record[METER_IDEM_LEN + 1];
    int                         kind;       /* METER_KIND_* (figure_read.h):
                                             * meter is the name billed,
                                             * quantity the figure */
    int64_t                     at;         /* last=: ms since the epoch
                                             * of the reading shown */
    int                         set;
} meter_usage_row_t;

/* the period of meter_usage_rows() that is the UTC calendar month: a
 * figure meter's row is then its month's figure (max: the largest hour,
 * last: the latest reading, unique: Σ over its unique periods) and its
 * billed part the worker's mtr:{worker}:fig:YYYYMM */
#define METER_USAGE_MONTH       1


typedef struct {
    char                        meter[MTR_METER_MAX + 1];
    int64_t                     granted;
    int64_t                     left;
} meter_credit_row_t;


/*
 * The usage of customer id in the hours [from, to) (0: unbounded), per
 * period (METER_HOUR, METER_DAY or METER_USAGE_MONTH) and meter, sorted
 * by start, then meter; wperiod is the worker's report_period (whose
 * records are looked up).  Each meter's figure by its kind: sums summed,
 * gauges' max the largest, last the latest reading; unique meters (from
 * mtr:uqidx) the customer's distinct count of each unique period starting
 * in [from, to), in the row of the period it starts in.  0 with *rows
 * (free()) and *n, or -1 with err (Redis, memory).
 */
int meter_usage_rows(meter_redis_t *r, const char *id, time_t from,
    time_t to, int period, int wperiod, meter_usage_row_t **rows, size_t *n,
    char *err, size_t errlen);

/* folds row src (a smaller period's) into dst by dst->kind */
void meter_usage_fold(meter_usage_row_t *dst, const meter_usage_row_t *src);

/* the start of the period (METER_HOUR, METER_DAY, METER_USAGE_MONTH)
 * that t is in, and its end */
time_t meter_usage_pstart(time_t t, int period);
time_t meter_usage_pend(time_t start, int period);

/*
 * The billed part of figure rows (kind max, last or unique) of whole
 * months (start: the month's): what the worker billed of the figure,
 * mtr:{worker}:fig:YYYYMM field SUBJECT|NAME:max, :last or :unique, 0
 * when absent.  0, or -1 with err (Redis).
 */
int meter_usage_fig_billed(meter_redis_t *r, const char *id,
    meter_usage_row_t *rows, size_t n, char *err, size_t errlen);

/* "sum", "max", "last" or "unique" */
const char *meter_usage_kind(int kind);

/* "billed", "dead", "sending", "unbilled" or "partly billed" */
const char *meter_usage_state(const meter_usage_row_t *row);

/*
 * The credit meters of customer id (only: just that meter, or NULL),
 * in mtr:gov:credit's order: 0 with *rows (free()) and *n, or -1 with err.
 */
int meter_usage_credit(meter_redis_t *r, const char *id, const char *only,
    meter_credit_row_t **rows, size_t *n, char *err, size_t errlen);


#endif /* _METER_USAGE_H_INCLUDED_ */
