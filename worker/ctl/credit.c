
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl credit set|add|show: prepaid credit per customer and meter
 * (mtr:gov:credit, through gov.c).
 */


#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include <cjson/cJSON.h>

#include "gov.h"
#include "meterctl.h"
#include "usage.h"
#include "meter_schema.h"
#include "util.h"


/* credit rows of a customer (lib/usage.c): table or JSON array; an exit
 * code */
int
meterctl_credit_rows(meter_redis_t *r, const char *cmd, const char *customer,
    const char *only, cJSON *arr, int table)
{
    char                 err[512];
    size_t               i, n;
    cJSON               *c;
    meter_credit_row_t  *rows;

    if (meter_usage_credit(r, customer, only, &rows, &n, err, sizeof(err))
        != 0)
    {
        return meterctl_gov_failed(cmd, err);
    }

    for (i = 0; i < n; i++) {
        if (arr != NULL) {
            c = cJSON_CreateObject();
            cJSON_AddStringToObject(c, "meter", rows[i].meter);
            meterctl_json_int(c, "granted", rows[i].granted);
            meterctl_json_int(c, "used", rows[i].granted - rows[i].left);
            meterctl_json_int(c, "left", rows[i].left);
            cJSON_AddItemToArray(arr, c);

        } else if (table) {
            if (i == 0) {
                printf("  %-16s  %14s  %14s  %14s\n", "METER", "GRANTED",
                       "USED", "LEFT");
            }

            printf("  %-16s  %14" PRId64 "  %14" PRId64 "  %14" PRId64 "%s\n",
                   rows[i].meter, rows[i].granted,
                   rows[i].granted - rows[i].left, rows[i].left,
                   rows[i].left <= 0 ? "  (exhausted: 402)" : "");
        }
    }

    free(rows);

    if (table && arr == NULL && n == 0) {
        printf("  none%s%s%s (usage not limited)\n",
               only ? " for meter \"" : "", only ? only : "",
               only ? "\"" : "");
    }

    return EX_OK;
}


static int
meterctl_amount(const char *cmd, const char *s, int64_t *v)
{
    char       *end;
    long long   n;

    errno = 0;
    n = strtoll(s, &end, 10);

    if (errno != 0 || end == s || *end != '\0') {
        fprintf(stderr, "meterctl %s: invalid AMOUNT \"%s\" (an integer)\n",
                cmd, s);
        return -1;
    }

    *v = n;

    return 0;
}


static int
meterctl_credit_change(meterctl_opts_t *o, meter_redis_t *r, int set)
{
    char         err[512];
    const char  *cmd;
    int64_t      amount, granted, left;
    int          rc;

    cmd = set ? "credit set" : "credit add";

    if (o->nargs != 2 || o->meter == NULL) {
        fprintf(stderr, "meterctl %s: expected \"CUSTOMER --meter NAME "
                "AMOUNT\"\n", cmd);
        return EX_USAGE;
    }

    if (meterctl_amount(cmd, o->args[1], &amount) != 0) {
        return EX_USAGE;
    }

    if (set && amount < 0) {
        fprintf(stderr, "meterctl %s: AMOUNT must not be negative\n", cmd);
        return EX_USAGE;
    }

    if (!meterctl_valid_meter(o->meter)) {
        fprintf(stderr, "meterctl %s: invalid --meter \"%s\" "
                "([A-Za-z0-9_.-]{1,32})\n", cmd, o->meter);
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

    rc = meterctl_customer_exists(r, cmd, o->args[0]);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    rc = set ? meter_gov_credit_set(r, o->args[0], o->meter, amount, err,
                                    sizeof(err))
             : meter_gov_credit_add(r, o->args[0], o->meter, amount, err,
                                    sizeof(err));
    if (rc != 0
        || meter_gov_credit_left(r, o->args[0], o->meter, &granted, &left,
                                 err, sizeof(err))
           != 0)
    {
        return meterctl_gov_failed(cmd, err);
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"meter\":\"%s\",\"granted\":%" PRId64
               ",\"used\":%" PRId64 ",\"left\":%" PRId64 "}\n", o->args[0],
               o->meter, granted, granted - left, left);

    } else {
        printf("customer %s, meter %s: %" PRId64 " left (granted %" PRId64
               ", used %" PRId64 ")\n", o->args[0], o->meter, left, granted,
               granted - left);
    }

    return EX_OK;
}


int
meterctl_credit_set(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_credit_change(o, r, 1);
}


int
meterctl_credit_add(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_credit_change(o, r, 0);
}


int
meterctl_credit_show(meterctl_opts_t *o, meter_redis_t *r)
{
    int     rc;
    cJSON  *arr;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl credit show: expected one customer id\n");
        return EX_USAGE;
    }

    if (o->meter != NULL && !meterctl_valid_meter(o->meter)) {
        fprintf(stderr, "meterctl credit show: invalid --meter \"%s\"\n",
                o->meter);
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->args[0])) {
        fprintf(stderr, "meterctl credit show: invalid customer id \"%s\"\n",
                o->args[0]);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "credit show", o->args[0]);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    arr = o->json ? cJSON_CreateArray() : NULL;

    if (!o->json) {
        printf("customer %s, prepaid credit:\n", o->args[0]);
    }

    rc = meterctl_credit_rows(r, "credit show", o->args[0], o->meter, arr,
                              !o->json);

    if (rc == EX_OK && arr != NULL) {
        meterctl_json_print(arr);
    }

    cJSON_Delete(arr);

    return rc;
}
