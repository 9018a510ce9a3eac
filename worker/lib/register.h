
/*
 * Copyright (C) nginx-meter authors
 *
 * Registering a customer, shared by "meterctl register" and the portal's
 * POST /register (daemon/portal.c): the provider's customer and
 * subscription, our customer record, then the key, each step recorded in
 * mtr:reg:{ID} so that running it again continues where it stopped.  The
 * API key is made last and only its hash is stored; it is never shown
 * again once it reached mtr:ckeys.  Nothing here prints: every outcome is
 * an exit code of <sysexits.h> with a message for the admin in err.
 */


#ifndef _METER_REGISTER_H_INCLUDED_
#define _METER_REGISTER_H_INCLUDED_


#include <stddef.h>

#include "config.h"
#include "redis.h"


#define METER_KEY_PREFIX        "mk_live_"
#define METER_KEY_BYTES         20      /* 160 bits from the CSPRNG */
/* "mk_live_" + base32 of 20 bytes (32 chars) */
#define METER_KEY_LEN           (sizeof(METER_KEY_PREFIX) - 1 + 32)


/* why a registration stopped, beyond its exit code */
typedef enum {
    METER_REG_DONE = 0,
    METER_REG_INVALID,          /* bad input (EX_USAGE) */
    METER_REG_EXISTS,           /* registered, its key issued (EX_DATAERR) */
    METER_REG_CONFLICT,         /* the id is someone else's (EX_DATAERR) */
    METER_REG_RETRY,            /* incomplete; the same call completes it */
    METER_REG_FAILED            /* provider or config; a human must look */
} meter_reg_e;


typedef struct {
    const char                 *email;
    const char                 *name;       /* may be NULL */
    const char                 *plan;       /* NULL: "default" */
    const char                 *customer;   /* NULL: from the email */
} meter_reg_in_t;


typedef struct {
    meter_reg_e                 kind;
    char                        id[72];
    char                        email[256];
    const char                 *provider;
    char                        provider_customer[128];
    char                        subscription[128];
    char                        key[METER_KEY_LEN + 1];
    char                        key_hash[65];
    char                        prefix[13];
    char                        err[1024];
} meter_reg_out_t;


/*
 * Registers in->email with cf's provider ("file" without cf) on the
 * connected r: EX_OK with out->key (the caller shows it once, then wipes
 * it: meter_reg_wipe), or another exit code with out->kind and out->err.
 */
int meter_register(meter_redis_t *r, const meter_conf_t *cf,
    const meter_reg_in_t *in, meter_reg_out_t *out);
void meter_reg_wipe(meter_reg_out_t *out);

/* the input alone (meter_register checks it first too): EX_OK, or
 * EX_USAGE with err */
int meter_reg_check(const meter_reg_in_t *in, char *err, size_t errlen);

/* our customer id of an email: "c_" and 20 hex chars of its SHA-256 */
void meter_customer_of_email(const char *email, char *out, size_t size);

/* input checks shared with meterctl */
int meter_valid_id(const char *s);
int meter_valid_meter(const char *s);
int meter_valid_email(const char *s);
int meter_valid_text(const char *s, size_t max);

/* API keys: a new one from the CSPRNG (out >= METER_KEY_LEN + 1), 0 or
 * -1; stored as mtr:key:{KH} and in mtr:ckeys, then projected: kh (65)
 * and prefix (13) filled, 0, or -1 with err */
extern const char  meter_b32[];
void meter_base32(const unsigned char *in, size_t n, char *out);
int meter_key_new(char *out);
int meter_key_store(meter_redis_t *r, const char *customer, const char *key,
    char *kh, char *prefix, char *err, size_t errlen);


#endif /* _METER_REGISTER_H_INCLUDED_ */
