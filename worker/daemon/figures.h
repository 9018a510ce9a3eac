
/*
 * Copyright (C) nginx-meter authors
 *
 * Billing figures: a value that is not a sum of hours (a unique count, a
 * gauge's max or last), billed as the month-to-date figure F of (month,
 * subject, meter) (docs/redis-schema.md, "Billing a figure").  F is kept
 * in mtr:{worker}:fig:YYYYMM beside the figure billed B; records go
 * through the drain's state machine (drain.c) with a "#fig" covers line
 * that raises B after the provider confirmed.
 */


#ifndef _METER_FIGURES_H_INCLUDED_
#define _METER_FIGURES_H_INCLUDED_


#include <stdint.h>
#include <time.h>

#include "drain.h"


typedef enum {
    METER_FIG_NONE = 0,
    METER_FIG_MAX = 1,              /* meter_gauge_name() values */
    METER_FIG_LAST = 2,
    METER_FIG_UNIQUE = 3
} meter_fig_kind_e;


/* the arithmetic (pure; t/unit/worker/test_figures.c) */

/* a :last counter's value: the low MTR_GAUGE_LAST_SHIFT bits */
uint64_t meter_fig_last_value(uint64_t raw);

/* one key's distinct count: exact below MTR_UNIQUE_EXACT, else the HLL's,
 * never below the exact set's limit */
uint64_t meter_fig_distinct(uint64_t scard, uint64_t pfcount);

/*
 * What one record of a figure carries.  absolute (Stripe): F itself when
 * it differs from what was billed; additive: F - B when F > B, and for
 * last only once the month is closed.  billed: a record was confirmed
 * before (B is meaningful).  1 with *q, or 0: nothing to send.
 */
int meter_fig_quantity(meter_fig_kind_e kind, int absolute, int closed,
    uint64_t f, uint64_t b, int billed, uint64_t *q);

/*
 * The event time of a figure's record: the end of the latest hour
 * included, capped at now, after the last one billed (prev, 0 none) and
 * inside the month [mstart, mend).
 */
time_t meter_fig_time(time_t hour, time_t prev, time_t now, time_t mstart,
    time_t mend);

/* UTC month of t: start, end, "YYYYMM" */
time_t meter_month_start(time_t t);
time_t meter_month_end(time_t t);
void meter_month_name(time_t t, char *buf, size_t size);

/* a unique period YYYYMM, YYYYMMDD or YYYYMMDDHH: [*start, *end); -1 bad */
int meter_uperiod_parse(const char *s, size_t len, time_t *start,
    time_t *end);


/* the drain */

/*
 * The hour drain read a gauge: raise F of (month of hour, subject, meter)
 * to value (max) or to the reading of the latest hour (last: raw is the
 * counter's encoded value).  0, or -1 on a Redis error.
 */
int meter_fig_raise(meter_drain_t *d, const char *subject,
    const char *fmeter, meter_fig_kind_e kind, time_t hour, uint64_t value,
    uint64_t raw, const char *kh);

/* a pass after the hours: count uniques when an hour closed, bill the
 * figures that moved, retention of old months */
meter_drain_rc_e meter_figures_run(meter_drain_t *d, time_t closed_end,
    time_t now);

/* a record's "#fig" covers line: queue the script that raises B (one
 * reply to read), 0; or -1 */
int meter_fig_billed_append(meter_drain_t *d, const char *line, size_t len);

/* 1 when covers is a figure's, with its month start and event time + 1 */
int meter_fig_covers(const char *covers, time_t *start, time_t *end);

#define METER_FIG_COVERS     "#fig "


#endif /* _METER_FIGURES_H_INCLUDED_ */
