
/*
 * Copyright (C) nginx-meter authors
 *
 * An hour that the drain found fully billed leaves mtr:hours (so that the
 * module's next ZADD NX of a late write puts it back) and is listed in
 * mtr:{worker}:settled until retention; readers of "every hour with
 * usage" (meterctl usage and status, retention) merge the two.
 */


#include <stdlib.h>
#include <string.h>

#include "hours.h"
#include "meter_schema.h"
#include "util.h"


/* "-inf", "+inf", "N", "(N" against t */
static int
meter_hours_bound(const char *b, long long t, int lower)
{
    long long  v;
    int        open;

    if (strcmp(b, lower ? "-inf" : "+inf") == 0) {
        return 1;
    }

    open = (b[0] == '(');
    v = strtoll(b + open, NULL, 10);

    if (lower) {
        return open ? t > v : t >= v;
    }

    return open ? t < v : t <= v;
}


static int
meter_hours_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}


redisReply *
meter_hours_range(meter_redis_t *r, const char *min, const char *max)
{
    size_t        i, n, m, argc;
    time_t        t;
    const char  **all, **argv;
    size_t       *argl;
    redisReply   *dirty, *settled, *rp;

    dirty = meter_redis_cmd(r, "ZRANGEBYSCORE " MTR_HOURS " %s %s", min,
                            max);
    if (!meter_reply_ok(dirty) || dirty->type != REDIS_REPLY_ARRAY) {
        return dirty;
    }

    settled = meter_redis_cmd(r, "HKEYS " MTR_W_SETTLED);
    if (!meter_reply_ok(settled) || settled->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(dirty);
        return settled;
    }

    if (settled->elements == 0) {
        freeReplyObject(settled);
        return dirty;
    }

    n = dirty->elements + settled->elements;
    all = malloc((n + 3) * sizeof(char *));
    argl = malloc((n + 3) * sizeof(size_t));
    if (all == NULL || argl == NULL) {
        free(all);
        free(argl);
        freeReplyObject(settled);
        return dirty;
    }

    m = 0;

    for (i = 0; i < dirty->elements; i++) {
        all[m++] = dirty->element[i]->str;
    }

    for (i = 0; i < settled->elements; i++) {
        t = meter_hour_parse(settled->element[i]->str);

        if (t != -1 && meter_hours_bound(min, (long long) t, 1)
            && meter_hours_bound(max, (long long) t, 0))
        {
            all[m++] = settled->element[i]->str;
        }
    }

    qsort(all, m, sizeof(char *), meter_hours_cmp);

    /* one array reply of the same shape as ZRANGEBYSCORE's */
    argv = all + 0;
    argc = 0;
    memmove(all + 3, all, m * sizeof(char *));
    argv[argc++] = "EVAL";
    argv[argc++] = "return ARGV";
    argv[argc++] = "0";

    for (i = 0; i < m; i++) {
        if (argc > 3 && strcmp(all[3 + i], argv[argc - 1]) == 0) {
            continue;
        }

        argv[argc++] = all[3 + i];
    }

    for (i = 0; i < argc; i++) {
        argl[i] = strlen(argv[i]);
    }

    rp = meter_redis_argv(r, (int) argc, argv, argl);

    free(all);
    free(argl);
    freeReplyObject(dirty);
    freeReplyObject(settled);

    return rp;
}
