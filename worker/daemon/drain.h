
/*
 * Copyright (C) nginx-meter authors
 *
 * The drain: turns closed hours of usage in Redis into records, and drives
 * each record through due -> sending -> sent -> done exactly once (the
 * state machine is documented in docs/redis-schema.md, "Worker state").
 */


#ifndef _METER_DRAIN_H_INCLUDED_
#define _METER_DRAIN_H_INCLUDED_


#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "config.h"
#include "jsonl.h"
#include "meter_schema.h"
#include "provider.h"
#include "redis.h"
#include "util.h"


typedef enum {
    METER_DRAIN_OK = 0,
    METER_DRAIN_REDIS = -1,         /* Redis failed: reconnect, try again */
    METER_DRAIN_LOCKED = -2,        /* another worker holds the lock */
    METER_DRAIN_STOPPED = -3,       /* stop flag seen */
    METER_DRAIN_MORE = -4           /* the turn ended early (its time was
                                     * up, or the provider kept failing:
                                     * paused); the rest stays due */
} meter_drain_rc_e;


/* a pass stops after this many failed attempts in a row (no record
 * accepted in between): the provider is down, the rest waits in order */
#define METER_DRAIN_BREAKER  5


typedef struct {
    meter_conf_t               *cf;
    meter_provider_t           *provider;
    meter_redis_t              *redis;
    meter_jsonl_t              *audit;          /* NULL: no audit log */
    time_t                      before;         /* 0: now - grace */
    int                         dry_run;
    volatile sig_atomic_t      *stop;
    void                      (*tick)(void *data);
    void                       *tick_data;

    char                        token[33];      /* lock token */
    struct timespec             renewed;
    struct timespec             followed;       /* Sentinels last asked */
    long long                   lock_pttl;      /* LOCKED: ms the other
                                                 * worker's lock has left */

    /* counters of the last pass */
    unsigned                    created;
    unsigned                    sent;
    unsigned                    retried;
    unsigned                    dead;
    unsigned                    held;
    unsigned                    waiting;        /* older record open */
    unsigned                    malformed;      /* key-hours with bad fields */
    unsigned long               emitted;        /* aggregates to bill */
    time_t                      next_due;       /* 0: nothing open */

    meter_map_t                 customers;      /* per pass cache */

    /* bounded work per loop turn (main.c): 0 = none */
    struct timespec             deadline;       /* CLOCK_MONOTONIC */
    int                         paused;         /* the breaker tripped */
    unsigned                    streak_sent;
    unsigned                    streak_retried;
} meter_drain_t;


/* one pass: resume open records, drain closed periods, retention */
meter_drain_rc_e meter_drain_run(meter_drain_t *d);

/* the lock; 1 held, 0 someone else has it, -1 Redis error */
int meter_lock_acquire(meter_drain_t *d);
int meter_lock_renew(meter_drain_t *d);
void meter_lock_release(meter_drain_t *d);


/* usage of one key-hour, per meter, from its mtr:u and mtr:b hashes */
typedef struct {
    char                        meter[MTR_METER_MAX + 1];
    uint64_t                    quantity;
    meter_str_t                 covers;         /* "PREFIXFIELD VALUE\n" */
    /* a gauge (METER ends in MTR_GAUGE_MAX_SFX or MTR_GAUGE_LAST_SFX:
     * meter_gauge_name()): quantity stays 0, the largest u and b over its
     * counters instead */
    int                         gauge;
    uint64_t                    gu;
    uint64_t                    gb;
} meter_usage_t;

/*
 * u and b are HGETALL-style arrays (field, value, field, value, ...) of nu
 * and nb strings.  For every u field above its b field, adds the difference
 * to its meter's quantity and a covers line "<prefix><field> <u value>\n".
 * Meters without such fields are left out.  0, or -1 on ENOMEM.
 */
int meter_usage_compute(const char *const *u, size_t nu,
    const char *const *b, size_t nb, const char *prefix,
    meter_usage_t **out, size_t *nout, unsigned *bad);
void meter_usage_free(meter_usage_t *us, size_t n);


/* one record of a figure (figures.c) for the month [mstart, mend) */
typedef struct {
    const char                 *subject;
    const char                 *customer;       /* NULL: key without one */
    char                        key_hash[65];   /* "*": several keys */
    char                        meter[MTR_METER_MAX + 1];   /* billed as */
    char                        smeter[MTR_METER_MAX + 16]; /* NAME:kind */
    uint64_t                    quantity;
    time_t                      at;             /* event time */
    char                        covers[320];    /* the "#fig" line */
} meter_fig_rec_t;

/* the records of figures through the state machine, as a period's */
meter_drain_rc_e meter_drain_figures(meter_drain_t *d, time_t mstart,
    time_t mend, meter_fig_rec_t *recs, size_t n);



#endif /* _METER_DRAIN_H_INCLUDED_ */
