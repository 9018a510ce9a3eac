
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


/* the line of one record into line */
static int
meter_file_line(const meter_record_t *rec, meter_str_t *line)
{
    char  start[32], end[32];

    meter_iso8601(rec->period_start, start, sizeof(start));
    meter_iso8601(rec->period_end, end, sizeof(end));

    if (meter_str_add(line, "{\"key_hash\":", 12) != 0
        || meter_str_json(line, rec->key_hash) != 0
        || meter_str_add(line, ",\"customer\":", 12) != 0
        || meter_str_json(line, rec->customer) != 0
        || meter_str_add(line, ",\"meter\":", 9) != 0
        || meter_str_json(line, rec->meter) != 0
        || meter_str_printf(line, ",\"period_start\":\"%s\","
                            "\"period_end\":\"%s\",\"quantity\":%" PRIu64
                            ",\"idempotency_key\":", start, end,
                            rec->quantity) != 0
        || meter_str_json(line, rec->idempotency_key) != 0
        || meter_str_add(line, "}\n", 2) != 0)
    {
        return -1;
    }

    return 0;
}


/*
 * A chunk of records: their lines in one write and one fsync, then every
 * one is accepted; a failed write or fsync fails them all (RETRY), so no
 * record counts as accepted before its line is on disk.  A line written
 * but not synced when the worker dies is found by the key scan on start
 * (meter_jsonl_open) and not written twice.
 */
static void
meter_file_send_batch(meter_provider_t *p, const meter_record_t *recs,
    size_t n, meter_send_result_t *res)
{
    char            err[256];
    size_t          i, j, nkeys;
    meter_str_t     lines;
    meter_jsonl_t  *j1;
    const char    **keys;
    int             failed;

    j1 = p->data;
    failed = 0;
    nkeys = 0;

    memset(&lines, 0, sizeof(meter_str_t));
    err[0] = '\0';

    keys = malloc((n + 1) * sizeof(char *));
    if (keys == NULL) {
        snprintf(err, sizeof(err), "out of memory");
        failed = 1;
    }

    for (i = 0; i < n && !failed; i++) {
        if (meter_jsonl_has(j1, recs[i].idempotency_key)) {
            continue;
        }

        for (j = 0; j < nkeys; j++) {
            if (strcmp(keys[j], recs[i].idempotency_key) == 0) {
                break;
            }
        }

        if (j < nkeys) {
            continue;
        }

        if (meter_file_line(&recs[i], &lines) != 0) {
            snprintf(err, sizeof(err), "out of memory");
            failed = 1;
            break;
        }

        keys[nkeys++] = recs[i].idempotency_key;
    }

    if (!failed && nkeys > 0
        && (meter_jsonl_append(j1, lines.data, lines.len, err, sizeof(err))
            != 0
            || meter_jsonl_commit(j1, keys, nkeys, err, sizeof(err)) != 0))
    {
        failed = 1;
    }

    for (i = 0; i < n; i++) {
        memset(&res[i], 0, sizeof(meter_send_result_t));
        res[i].status = failed ? METER_SEND_RETRY : METER_SEND_OK;

        if (failed) {
            snprintf(res[i].error, sizeof(res[i].error), "%s", err);
        }
    }

    meter_str_free(&lines);
    free(keys);
}


static meter_send_e
meter_file_send(meter_provider_t *p, const meter_record_t *rec,
    meter_send_result_t *res)
{
    meter_file_send_batch(p, rec, 1, res);

    return res->status;
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
    p->send_batch = meter_file_send_batch;
    /* one write and one fsync per chunk: the bigger, the fewer */
    p->batch_max = 500;
    p->lookup = NULL;
    p->cleanup = meter_file_cleanup;
    p->data = NULL;
}
