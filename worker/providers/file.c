
/*
 * Copyright (C) nginx-meter authors
 *
 * The file provider: one JSON line per record,
 * {"key_hash","customer","meter","period_start","period_end","quantity",
 * "idempotency_key"}, fsync'ed before the record counts as accepted.  A
 * record resent after a crash is recognised by its idempotency key and not
 * written again.
 */


#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "jsonl.h"
#include "provider.h"
#include "util.h"


static int
meter_file_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    const char     *path;
    char            e[512];
    meter_jsonl_t  *j;

    path = meter_conf_get(cf, "file.path");
    if (path == NULL) {
        snprintf(err, errlen, "\"file.path\" is required with "
                 "\"provider = file\"");
        return -1;
    }

    j = malloc(sizeof(meter_jsonl_t));
    if (j == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    if (meter_jsonl_open(j, path, e, sizeof(e)) != 0) {
        snprintf(err, errlen, "\"file.path\": %s", e);
        free(j);
        return -1;
    }

    p->data = j;

    return 0;
}


static meter_send_e
meter_file_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    char            start[32], end[32];
    meter_str_t     line;
    meter_jsonl_t  *j;

    j = p->data;

    memset(res, 0, sizeof(meter_send_result_t));

    if (meter_jsonl_has(j, rec->idempotency_key)) {
        res->status = METER_SEND_OK;
        return METER_SEND_OK;
    }

    memset(&line, 0, sizeof(meter_str_t));

    meter_iso8601(rec->period_start, start, sizeof(start));
    meter_iso8601(rec->period_end, end, sizeof(end));

    if (meter_str_add(&line, "{\"key_hash\":", 12) != 0
        || meter_str_json(&line, rec->key_hash) != 0
        || meter_str_add(&line, ",\"customer\":", 12) != 0
        || meter_str_json(&line, rec->customer) != 0
        || meter_str_add(&line, ",\"meter\":", 9) != 0
        || meter_str_json(&line, rec->meter) != 0
        || meter_str_printf(&line, ",\"period_start\":\"%s\","
                            "\"period_end\":\"%s\",\"quantity\":%" PRIu64
                            ",\"idempotency_key\":", start, end,
                            rec->quantity) != 0
        || meter_str_json(&line, rec->idempotency_key) != 0
        || meter_str_add(&line, "}\n", 2) != 0)
    {
        meter_str_free(&line);
        snprintf(res->error, sizeof(res->error), "out of memory");
        res->status = METER_SEND_RETRY;
        return METER_SEND_RETRY;
    }

    if (meter_jsonl_write(j, rec->idempotency_key, line.data, line.len,
                          res->error, sizeof(res->error))
        != 0)
    {
        meter_str_free(&line);
        res->status = METER_SEND_RETRY;
        return METER_SEND_RETRY;
    }

    meter_str_free(&line);

    res->status = METER_SEND_OK;

    return METER_SEND_OK;
}


static void
meter_file_cleanup(meter_provider_t *p)
{
    if (p->data != NULL) {
        meter_jsonl_close(p->data);
        free(p->data);
        p->data = NULL;
    }
}


void
meter_provider_file(meter_provider_t *p)
{
    p->name = "file";
    p->init = meter_file_init;
    p->send = meter_file_send;
    p->lookup = NULL;
    p->cleanup = meter_file_cleanup;
    p->data = NULL;
}
