
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl's parts: the command line and its table (meterctl.c), the
 * helpers every command shares (connection, errors, validation, output:
 * meterctl.c), and one file per command group: register.c, customers.c,
 * keys.c, delinquent.c, credit.c, usage.c, status.c, retry.c.  main.c
 * holds only main(), so that unit tests link everything else.
 */


#ifndef _METERCTL_H_INCLUDED_
#define _METERCTL_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "config.h"
#include "meter_schema.h"
#include "redis.h"
#include "register.h"
#include "usage.h"
#include "util.h"


/* the key and the input checks live in lib/register.c (the portal's too) */
#define METERCTL_KEY_PREFIX     METER_KEY_PREFIX
#define METERCTL_KEY_BYTES      METER_KEY_BYTES
#define METERCTL_KEY_LEN        METER_KEY_LEN
#define meterctl_b32            meter_b32
#define meterctl_base32         meter_base32
#define meterctl_key_new        meter_key_new
#define meterctl_valid_id       meter_valid_id
#define meterctl_valid_meter    meter_valid_meter
#define meterctl_valid_email    meter_valid_email
#define meterctl_valid_text     meter_valid_text
#define meterctl_customer_of_email  meter_customer_of_email


typedef struct {
    const char                 *config;
    const char                 *redis;
    const char                 *password_file;
    int                         db;
    int                         json;
    int                         all;
    int                         resend;     /* retry: as a first send */
    const char                 *hour;
    const char                 *customer;
    const char                 *provider;
    const char                 *provider_customer;
    const char                 *subscription;
    const char                 *email;
    const char                 *name;
    const char                 *plan;
    const char                 *hash;
    const char                 *reason;
    const char                 *meter;
    const char                 *from;
    const char                 *to;
    const char                 *period;
    const char                 *anchor;
    const char                 *items[16];
    int                         nitems;
    int                         help;
    int                         nargs;
    char                      **args;
    char                        seen[128];  /* options given, by letter */
    meter_conf_t               *cf;         /* with -c */
} meterctl_opts_t;


typedef struct {
    const char                 *group;  /* "keys" */
    const char                 *name;   /* "revoke"; NULL: no subcommands */
    const char                 *opts;   /* option letters besides METERCTL_CONN */
    int                       (*run)(meterctl_opts_t *o, meter_redis_t *r);
    const char                 *usage;
} meterctl_cmd_t;


/* meterctl.c: the command table and the command line */
extern const meterctl_cmd_t  meterctl_cmds[];
extern const size_t          meterctl_ncmds;
#define METERCTL_NCMDS  meterctl_ncmds

/* -1 to run *cmd, or an exit code (help printed, or a usage error) */
int meterctl_select(int argc, char **argv, meterctl_opts_t *o,
    const meterctl_cmd_t **cmd);

/* meterctl.c: shared by the commands */
int meterctl_open(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_redis_failed(meter_redis_t *r, redisReply *rp);
int meterctl_gov_failed(const char *cmd, const char *err);
int meterctl_customer_exists(meter_redis_t *r, const char *cmd,
    const char *id);
redisReply *meterctl_sorted_set(meter_redis_t *r, const char *key, int *rc);
void meterctl_time(const char *unix_s, char *buf, size_t size);
void meterctl_json_print(cJSON *j);
void meterctl_json_int(cJSON *o, const char *name, long long v);
void meterctl_json_str(cJSON *o, const char *name, const char *v);

/* keys.c */
int meterctl_key_store(meter_redis_t *r, const char *cmd,
    const char *customer, const char *key, char *kh, char *prefix);
void meterctl_key_row(cJSON *arr, const char *indent, const char *kh,
    const redisReply *key);

/* credit.c */
int meterctl_credit_rows(meter_redis_t *r, const char *cmd,
    const char *customer, const char *only, cJSON *arr, int table);

/* usage.c: a customer's usage per period and meter (lib/usage.c), with
 * a message on failure; an exit code */
typedef meter_usage_row_t  meterctl_urow_t;

int meterctl_usage_rows(meter_redis_t *r, const char *id, time_t from,
    time_t to, int period, int wperiod, meterctl_urow_t **out, size_t *nout);

/* the commands of meterctl_cmds[]: an exit code of <sysexits.h> */
int meterctl_register(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_customers_list(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_customers_show(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_customers_add(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_keys_list(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_keys_add(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_keys_revoke(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_keys_rotate(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_delinquent_set(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_delinquent_clear(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_credit_set(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_plan_set(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_plan_clear(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_plan_show(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_plan_publish(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_quota_rows(meter_redis_t *r, const char *customer, cJSON *arr,
    int table);
int meterctl_credit_add(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_credit_show(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_usage(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_status_cmd(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_retry_cmd(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_reconcile(meterctl_opts_t *o, meter_redis_t *r);
int meterctl_alerts_cmd(meterctl_opts_t *o, meter_redis_t *r);


#endif /* _METERCTL_H_INCLUDED_ */
