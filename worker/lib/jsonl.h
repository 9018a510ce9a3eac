
/*
 * Copyright (C) nginx-meter authors
 *
 * Append-only JSON Lines files with a dedupe set: the file provider's output
 * and the audit log.  A line is written with one write() on an O_APPEND
 * descriptor and fsync'ed before it counts as written; on open, the
 * idempotency keys already in the file are loaded so that a record resent
 * after a crash is not written twice, and a torn last line (a crash in the
 * middle of a write, never acknowledged) is cut off.
 *
 * Only recent keys matter: a resend is always of one of the last records
 * written (one worker at a time, and a restart resumes its open records
 * before it writes anything new).  So the scan reads the file's last
 * meter_jsonl_tail bytes, and the set keeps two generations of at most
 * meter_jsonl_keep keys: memory stays bounded however long the file grows.
 */


#ifndef _METER_JSONL_H_INCLUDED_
#define _METER_JSONL_H_INCLUDED_


#include <stddef.h>

#include "util.h"


typedef struct {
    int                         fd;
    int                         regular;        /* 0: FIFO, tty, ... */
    char                       *path;
    meter_map_t                 keys;           /* idempotency keys */
    meter_map_t                 old;            /* the generation before */
} meter_jsonl_t;


extern size_t  meter_jsonl_tail;        /* bytes scanned on open: 64 MiB */
extern size_t  meter_jsonl_keep;        /* keys per generation: 1M */


/* 0, or -1 with err */
int meter_jsonl_open(meter_jsonl_t *j, const char *path, char *err,
    size_t errlen);
/* 1 when a line with this idempotency key was written already */
int meter_jsonl_has(meter_jsonl_t *j, const char *key);
/* appends line (with its '\n') and fsyncs; 0, or -1 with err */
int meter_jsonl_write(meter_jsonl_t *j, const char *key, const char *line,
    size_t len, char *err, size_t errlen);
/* the same in two steps, so that one fsync covers many lines: append
 * writes a line (not durable yet, its key not in the set), commit fsyncs
 * and then adds the keys of the lines appended; 0, or -1 with err */
int meter_jsonl_append(meter_jsonl_t *j, const char *line, size_t len,
    char *err, size_t errlen);
int meter_jsonl_commit(meter_jsonl_t *j, const char *const *keys, size_t n,
    char *err, size_t errlen);
void meter_jsonl_close(meter_jsonl_t *j);


#endif /* _METER_JSONL_H_INCLUDED_ */
