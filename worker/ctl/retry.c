
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl retry: dead-lettered records back into the queue.
 */


#include <stdio.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include "meterctl.h"
#include "meter_schema.h"
#include "scripts.h"
#include "util.h"


static int
meterctl_retry(meterctl_opts_t *o, meter_redis_t *r)
{
    int          i, n, missing;
    size_t       k;
    redisReply  *ids, *rp;

    if ((o->all && o->nargs > 0) || (!o->all && o->nargs == 0)) {
        fprintf(stderr, "meterctl retry: give record ids or --all\n");
        return EX_USAGE;
    }

    n = 0;
    missing = 0;

    if (o->all) {
        ids = meter_redis_cmd(r, "ZRANGE %s 0 -1", MTR_W_DEAD);
        if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
            return meterctl_redis_failed(r, ids);
        }

        for (k = 0; k < ids->elements; k++) {
            rp = meter_redis_cmd(r, "EVAL %s 3 " MTR_W_REC_PRE "%s %s %s %s "
                                 "%lld 0", meter_lua_retry,
                                 ids->element[k]->str, MTR_W_OPEN,
                                 MTR_W_DEAD, ids->element[k]->str,
                                 (long long) time(NULL));
            if (!meter_reply_ok(rp)) {
                freeReplyObject(ids);
                return meterctl_redis_failed(r, rp);
            }

            n += (int) meter_reply_int(rp, 0);
            freeReplyObject(rp);
        }

        freeReplyObject(ids);

    } else {
        for (i = 0; i < o->nargs; i++) {
            if (strlen(o->args[i]) != METER_IDEM_LEN
                || strspn(o->args[i], "0123456789abcdef") != METER_IDEM_LEN)
            {
                fprintf(stderr, "meterctl retry: invalid record id \"%s\"\n",
                        o->args[i]);
                missing++;
                continue;
            }

            rp = meter_redis_cmd(r, "EVAL %s 3 " MTR_W_REC_PRE "%s %s %s %s "
                                 "%lld %d", meter_lua_retry, o->args[i],
                                 MTR_W_OPEN, MTR_W_DEAD, o->args[i],
                                 (long long) time(NULL), o->resend);
            if (!meter_reply_ok(rp)) {
                return meterctl_redis_failed(r, rp);
            }

            if (meter_reply_int(rp, 0) == 1) {
                n++;

            } else {
                fprintf(stderr, "meterctl retry: no dead letter \"%s\"\n",
                        o->args[i]);
                missing++;
            }

            freeReplyObject(rp);
        }
    }

    printf("requeued %d record%s; the worker sends %s on its next pass\n", n,
           n == 1 ? "" : "s", n == 1 ? "it" : "them");

    return missing ? EX_DATAERR : EX_OK;
}


int
meterctl_retry_cmd(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    if ((o->all && o->nargs > 0) || (!o->all && o->nargs == 0)) {
        fprintf(stderr, "meterctl retry: give record ids or --all\n");
        return EX_USAGE;
    }

    /* each one is a human's decision, made after looking at the provider */
    if (o->all && o->resend) {
        fprintf(stderr, "meterctl retry: --resend takes record ids, not "
                "--all\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);

    return rc != EX_OK ? rc : meterctl_retry(o, r);
}
