
/*
 * Copyright (C) nginx-meter authors
 *
 * The delinquency sync: every sync_interval meter-worker asks the provider
 * which customers are overdue now (provider->overdue, all pages), marks
 * them delinquent ("invoice_overdue", source "sync"), and, when the whole
 * poll succeeded, clears the customers a sync (poll or webhook) marked
 * earlier that the provider no longer lists.  A manual mark (meterctl) is
 * never cleared.  Changes are ordered by the poll's start time (status_at):
 * a webhook newer than the poll wins.  The outcome goes to mtr:w:sync.
 */


#ifndef _METER_SYNC_H_INCLUDED_
#define _METER_SYNC_H_INCLUDED_


#include <signal.h>
#include <time.h>

#include "config.h"
#include "provider.h"
#include "redis.h"


typedef struct {
    const meter_conf_t         *cf;
    meter_provider_t           *provider;
    meter_redis_t              *redis;
    volatile sig_atomic_t      *stop;

    /* outcome */
    time_t                      started;
    unsigned                    listed;         /* entries from the provider */
    unsigned                    unknown;        /* ... without a customer */
    unsigned                    delinquent;     /* our customers listed */
    unsigned                    marked;         /* newly marked */
    unsigned                    cleared;
    int                         provider_ok;
    char                        error[512];
} meter_sync_t;


/* on with "sync.delinquency = on" (default) and a provider with overdue() */
int meter_sync_enabled(const meter_conf_t *cf, const meter_provider_t *p);

/* one poll: 0 done (s->provider_ok says whether the provider answered
 * fully), -1 Redis failed (s->error) */
int meter_sync_run(meter_sync_t *s);


#endif /* _METER_SYNC_H_INCLUDED_ */
