
/*
 * Copyright (C) nginx-meter authors
 */


#ifndef _METER_UNIQUE_RETENTION_H_INCLUDED_
#define _METER_UNIQUE_RETENTION_H_INCLUDED_


#include <time.h>

#include "config.h"
#include "redis.h"


/* months looked back on for unique data past retention */
#define METER_UQ_RETAIN_MONTHS  36


/*
 * Deletes the unique sets and HyperLogLogs of every month past retention
 * (its end + grace + retention before now), then its index
 * mtr:uqidx:YYYYMM; a month the figure biller knows (mtr:{worker}:figmon
 * has it) only once it closed there.  Returns the months removed.
 */
/*
 * Deletes every set and HyperLogLog listed in mtr:uqidx:M (M = YYYYMM),
 * then the index, adding the keys deleted to *nkeys; -1 on Redis errors
 * (the index is kept to list what is left).  Also the figure biller's.
 */
int meter_unique_remove(meter_redis_t *r, const char *m,
    unsigned long *nkeys);

unsigned meter_unique_retention(meter_redis_t *r, const meter_conf_t *cf,
    time_t now);


#endif /* _METER_UNIQUE_RETENTION_H_INCLUDED_ */
