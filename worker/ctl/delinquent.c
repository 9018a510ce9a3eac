
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl delinquent set|clear: a manual delinquency mark (402).
 */


#include <stdio.h>
#include <string.h>
#include <sysexits.h>

#include "gov.h"
#include "meterctl.h"
#include "meter_schema.h"


static int
meterctl_delinquent_run(meterctl_opts_t *o, meter_redis_t *r, int set)
{
    char         err[512];
    const char  *cmd, *reason;
    int          rc;

    cmd = set ? "delinquent set" : "delinquent clear";

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl %s: expected one customer id\n", cmd);
        return EX_USAGE;
    }

    reason = o->reason != NULL ? o->reason : "invoice_overdue";

    if (set && strcmp(reason, "invoice_overdue") != 0
        && strcmp(reason, "credit_exhausted") != 0)
    {
        fprintf(stderr, "meterctl %s: invalid --reason \"%s\" "
                "(invoice_overdue or credit_exhausted)\n", cmd, reason);
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->args[0])) {
        fprintf(stderr, "meterctl %s: invalid customer id \"%s\"\n", cmd,
                o->args[0]);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meter_gov_set_status(r, o->args[0], set, set ? reason : NULL,
                              "manual", 0, err, sizeof(err));
    if (rc == -1) {
        return meterctl_gov_failed(cmd, err);
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"status\":\"%s\",\"changed\":%s}\n",
               o->args[0], set ? "delinquent" : "active",
               rc == 1 ? "true" : "false");

    } else if (rc == 1) {
        printf("customer %s is now %s%s%s; its keys %s after nginx's next "
               "governance refresh\n", o->args[0],
               set ? "delinquent (" : "active", set ? reason : "",
               set ? ")" : "", set ? "get 402" : "are served again");

    } else {
        printf("customer %s: nothing changed (already %s: see "
               "\"meterctl customers show %s\")\n",
               o->args[0], set ? "delinquent" : "active", o->args[0]);
    }

    return EX_OK;
}


int
meterctl_delinquent_set(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_delinquent_run(o, r, 1);
}


int
meterctl_delinquent_clear(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_delinquent_run(o, r, 0);
}
