
/*
 * Copyright (C) nginx-meter authors
 *
 * The worker's Lua scripts (scripts.c), sent with EVAL.
 */


#ifndef _METER_SCRIPTS_H_INCLUDED_
#define _METER_SCRIPTS_H_INCLUDED_


/* the drain (daemon/drain.c): records, the lock, retention */
extern const char  meter_lua_maxset[];
extern const char  meter_lua_create[];
extern const char  meter_lua_create_all[];
extern const char  meter_lua_done[];
extern const char  meter_lua_done_all[];
extern const char  meter_lua_dead[];
extern const char  meter_lua_renew[];
extern const char  meter_lua_release[];
extern const char  meter_lua_expire[];

/* the due index (daemon/due.c) */
extern const char  meter_lua_digest[];

/* governance (lib/gov.c) */
extern const char  meter_lua_gov_status[];
extern const char  meter_lua_quota_base[];

/* Stripe (providers/stripe.c) */
extern const char  meter_lua_stripe_rejected[];

/* meterctl retry (ctl/retry.c) */
extern const char  meter_lua_retry[];


#endif /* _METER_SCRIPTS_H_INCLUDED_ */
