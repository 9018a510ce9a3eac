
/*
 * Copyright (C) nginx-meter authors
 */


#ifndef _METER_WUSAGE_H_INCLUDED_
#define _METER_WUSAGE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include "meter_schema.h"
#include "redis.h"
#include "util.h"


/* "METER|EPOCH.GEN": the key layout's name of a counter */
#define METER_VFIELD_SIZE  (MTR_METER_MAX + 1 + 16 + 1 + 10 + 1)


/*
 * The writer layout of one hour, in memory: key hash -> its counters as
 * the key layout names them, each with the largest value any writer
 * session holds for it (each copy is the same slot's absolute count).
 */
typedef struct {
    char                        field[METER_VFIELD_SIZE];
    uint64_t                    value;
} meter_wfield_t;

typedef struct {
    meter_wfield_t             *f;
    size_t                      n;
    size_t                      cap;
    int                         seen;   /* listed in mtr:idx:HOUR too */
} meter_wkey_t;


void meter_wkey_free(void *p);

/*
 * One field of a writer hash mtr:wu:{EPOCH}:SID:HOUR:PART ("KH|METER|GEN") as
 * the counter it is: kh gets the key hash (65 bytes), vfield the key
 * layout's name of the same slot (METER_VFIELD_SIZE bytes).  0, or -1
 * when malformed.
 */
int meter_wfield_parse(const char *field, size_t len, const char *epoch,
    char *kh, char *vfield);
/* "EPOCH:SID:NPARTS" of mtr:widx:HOUR: epoch (17 bytes), sid (21 bytes),
 * the writer's hashes are parts 0..nparts-1.  0, or -1 when malformed. */
int meter_writer_parse(const char *w, char *epoch, char *sid,
    unsigned *nparts);

/*
 * Reads every writer hash of the hour into wm (meter_wkey_t values); with
 * only != NULL, just the key hashes that map has; with writers != NULL,
 * also hands back the SMEMBERS reply of the index.  0, or -1 on a Redis
 * error (logged).
 */
int meter_wmap_load(meter_redis_t *r, const char *hour, meter_map_t *wm,
    const meter_map_t *only, redisReply **writers);

/*
 * The u fields of one key-hour from both layouts: the key layout's (its
 * HGETALL reply u, or NULL) and the writer layout's (wk, or NULL), one
 * pair per counter with the larger value.  Pairs into *out, pointing into
 * u, wk and *buf; free(*out) and free(*buf).
 */
int meter_u_merge(redisReply *u, meter_wkey_t *wk, const char ***out,
    size_t *nout, char **buf);


#endif /* _METER_WUSAGE_H_INCLUDED_ */
