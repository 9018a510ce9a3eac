
/*
 * Copyright (C) nginx-meter authors
 *
 * The hours that have usage: mtr:hours (not yet fully billed) and
 * mtr:{worker}:settled (fully billed, kept until retention).
 */


#ifndef _METER_HOURS_H_INCLUDED_
#define _METER_HOURS_H_INCLUDED_


#include "redis.h"


/*
 * The hours whose start is within min and max (ZRANGEBYSCORE syntax:
 * "-inf", "+inf", "N", "(N"), oldest first, each once, as one array reply
 * of hour names; NULL or an error reply as meter_redis_cmd() gives.
 */
redisReply *meter_hours_range(meter_redis_t *r, const char *min,
    const char *max);


#endif /* _METER_HOURS_H_INCLUDED_ */
