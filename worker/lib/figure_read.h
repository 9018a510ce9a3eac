
/*
 * Copyright (C) nginx-meter authors
 *
 * How a reader of usage (meterctl usage and reconcile, the portal, the
 * alerts) takes a meter's figure over counters, keys and periods, by the
 * kind its name says (docs/redis-schema.md "Gauges", "Unique users"):
 * a sum; a gauge max= ("NAME:max", the largest); a gauge last=
 * ("NAME:last", the latest reading: v & 2^40-1, the time v >> 40 ms into
 * the hour); a unique count ("NAME:unique", a sum of the unique periods'
 * distinct counts).
 */


#ifndef _METER_FIGURE_READ_H_INCLUDED_
#define _METER_FIGURE_READ_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include "meter_schema.h"


#define METER_KIND_SUM          0
#define METER_KIND_MAX          1
#define METER_KIND_LAST         2
#define METER_KIND_UNIQUE       3


typedef struct {
    uint64_t                    value;
    int64_t                     at;         /* last: ms since the epoch */
    int                         set;
} meter_fig_t;


/* the kind of a usage field's METER (len bytes): sum, max or last */
int meter_meter_kind(const char *m, size_t len);

/* a last= counter's reading, and its time: hour (Unix s) + v >> 40 ms */
uint64_t meter_last_value(uint64_t v);
int64_t meter_last_at(uint64_t v, int64_t hour);

/*
 * Folds one figure v of the given kind into f: sums add, max keeps the
 * largest, last the one with the latest at (the larger value on a tie).
 * A last= counter is folded as meter_last_value(), meter_last_at().
 */
void meter_fig_add(meter_fig_t *f, int kind, uint64_t v, int64_t at);


#endif /* _METER_FIGURE_READ_H_INCLUDED_ */
