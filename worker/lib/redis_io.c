
/*
 * Copyright (C) nginx-meter authors
 *
 * The seam: every non-pipelined Redis command goes through
 * meter_redis_exec(), alone in this file so that unit tests can replace it
 * with -Wl,--wrap=meter_redis_exec (a wrap only catches calls from other
 * object files).
 */


#include <stdio.h>

#include "redis.h"


redisReply *
meter_redis_exec(meter_redis_t *r, const char *cmd, size_t len)
{
    void  *reply;

    if (r->ctx == NULL) {
        snprintf(r->err, sizeof(r->err), "redis: not connected");
        return NULL;
    }

    if (redisAppendFormattedCommand(r->ctx, cmd, len) != REDIS_OK
        || redisGetReply(r->ctx, &reply) != REDIS_OK)
    {
        meter_redis_fail(r);
        return NULL;
    }

    meter_redis_readonly(r, reply);

    return reply;
}
