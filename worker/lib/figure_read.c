
/*
 * Copyright (C) nginx-meter authors
 *
 * A meter's figure as the readers take it (figure_read.h).
 */


#include "figure_read.h"
#include "util.h"


int
meter_meter_kind(const char *m, size_t len)
{
    switch (meter_gauge_name(m, len)) {
    case 1:
        return METER_KIND_MAX;
    case 2:
        return METER_KIND_LAST;
    default:
        return METER_KIND_SUM;
    }
}


uint64_t
meter_last_value(uint64_t v)
{
    return v & MTR_GAUGE_LAST_MASK;
}


int64_t
meter_last_at(uint64_t v, int64_t hour)
{
    return hour * 1000 + (int64_t) (v >> MTR_GAUGE_LAST_SHIFT);
}


void
meter_fig_add(meter_fig_t *f, int kind, uint64_t v, int64_t at)
{
    switch (kind) {

    case METER_KIND_MAX:
        if (!f->set || v > f->value) {
            f->value = v;
        }
        break;

    case METER_KIND_LAST:
        if (!f->set || at > f->at || (at == f->at && v > f->value)) {
            f->value = v;
            f->at = at;
        }
        break;

    default:
        f->value += v;
    }

    f->set = 1;
}
