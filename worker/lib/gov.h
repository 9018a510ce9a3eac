
/*
 * Copyright (C) nginx-meter authors
 *
 * Writes of the governance state (docs/redis-schema.md, "Governance"),
 * shared by meterctl and meter-worker's delinquency sync and webhooks.
 * Every function keeps the mtr:gov projection and mtr:gov:version in step
 * with what it changed, so the module sees it within one refresh.
 */


#ifndef _METER_GOV_H_INCLUDED_
#define _METER_GOV_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "config.h"
#include "redis.h"


/* rewrites the mtr:gov fields of every key of the customer, bumps the
 * version; 0, or -1 with err */
int meter_gov_project(meter_redis_t *r, const char *customer, char *err,
    size_t errlen);

/*
 * Marks a customer delinquent (reason "invoice_overdue" or
 * "credit_exhausted") or active.  source is "manual" (meterctl) or "sync"
 * (provider poll or webhook): a sync never clears a manual mark.
 * event_time orders changes: one older than the last applied
 * (mtr:cust:{C} status_at) is ignored; 0 means now.
 * Returns 1 changed, 0 nothing to change (or ignored), -1 error (err).
 */
int meter_gov_set_status(meter_redis_t *r, const char *customer,
    int delinquent, const char *reason, const char *source,
    time_t event_time, char *err, size_t errlen);

/* our customer id from a provider's customer or subscription id
 * (mtr:bypc, mtr:bysub); 1 found, 0 unknown, -1 error */
int meter_gov_find_customer(meter_redis_t *r, const char *provider_customer,
    const char *subscription, char *customer, size_t size, char *err,
    size_t errlen);

/* prepaid credit of (customer, meter): set the balance left to amount, or
 * add amount to it; 0 or -1 (err) */
int meter_gov_credit_set(meter_redis_t *r, const char *customer,
    const char *meter, int64_t amount, char *err, size_t errlen);
int meter_gov_credit_add(meter_redis_t *r, const char *customer,
    const char *meter, int64_t amount, char *err, size_t errlen);
/* Σ over the customer's keys of mtr:used:{KH}[meter]; 0 or -1 (err) */
int meter_gov_used(meter_redis_t *r, const char *customer, const char *meter,
    int64_t *used, char *err, size_t errlen);
/* balance left: granted - used over all the customer's keys; 0 or -1 */
int meter_gov_credit_left(meter_redis_t *r, const char *customer,
    const char *meter, int64_t *granted, int64_t *left, char *err,
    size_t errlen);


/*
 * Plans with quotas: "plan.NAME.quota.METER = LIMIT/day|week|month" in the
 * worker config; a customer's plan is mtr:cust:{C} "plan", its optional
 * "anchor" (Unix s, the subscription's billing anchor) moves the period
 * boundaries from UTC midnight / Monday / the 1st to the anchor's time,
 * weekday or day of month.  Published into mtr:gov:quota.
 */
#define METER_QUOTA_DAY     1
#define METER_QUOTA_WEEK    2
#define METER_QUOTA_MONTH   3

/* "10000/month": 0, or -1 */
int meter_quota_parse(const char *s, int64_t *limit, int *unit);
/* the period [start, end) of unit containing now; anchor 0: UTC */
void meter_quota_period(int unit, time_t anchor, time_t now, time_t *start,
    time_t *end);
/* the plan has a key in the config ("plan.NAME.*") */
int meter_quota_plan_known(const meter_conf_t *cf, const char *plan);

/* rewrites the customer's mtr:gov:quota fields from its plan and cf;
 * *next (if not NULL) lowered to the earliest reset; 0 or -1 (err) */
int meter_gov_quota_publish(meter_redis_t *r, const meter_conf_t *cf,
    const char *customer, time_t now, time_t *next, char *err,
    size_t errlen);
/* the same for every customer; 0, or -1 after the first error */
int meter_gov_quota_all(meter_redis_t *r, const meter_conf_t *cf,
    time_t now, time_t *next, char *err, size_t errlen);
/* plan NULL clears it; anchor -1 keeps it, 0 removes it; then publishes */
int meter_gov_plan_set(meter_redis_t *r, const meter_conf_t *cf,
    const char *customer, const char *plan, time_t anchor, char *err,
    size_t errlen);


#endif /* _METER_GOV_H_INCLUDED_ */
