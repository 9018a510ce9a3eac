
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl register: the command line around meter_register() (lib/
 * register.c, shared with the portal's POST /register): what it prints.
 */


#include <stdio.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "gov.h"
#include "meterctl.h"
#include "register.h"


static void
meterctl_reg_print(meterctl_opts_t *o, meter_reg_out_t *g)
{
    cJSON       *out;
    const char  *pc, *sub;

    pc = g->provider_customer[0] ? g->provider_customer : NULL;
    sub = g->subscription[0] ? g->subscription : NULL;

    if (o->json) {
        out = cJSON_CreateObject();
        cJSON_AddStringToObject(out, "customer", g->id);
        cJSON_AddStringToObject(out, "email", g->email);
        cJSON_AddStringToObject(out, "provider", g->provider);
        meterctl_json_str(out, "provider_customer", pc);
        meterctl_json_str(out, "subscription", sub);
        cJSON_AddStringToObject(out, "key", g->key);
        cJSON_AddStringToObject(out, "key_hash", g->key_hash);
        cJSON_AddStringToObject(out, "prefix", g->prefix);
        meterctl_json_print(out);
        cJSON_Delete(out);

    } else {
        printf("customer %s registered (%s, provider %s%s%s%s%s)\n", g->id,
               g->email, g->provider, pc ? ", " : "", pc ? pc : "",
               sub ? ", " : "", sub ? sub : "");
        printf("API key (shown once, store it now):\n%s\n", g->key);
    }
}


int
meterctl_register(meterctl_opts_t *o, meter_redis_t *r)
{
    int              rc;
    meter_reg_in_t   in;
    meter_reg_out_t  g;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl register: unexpected argument \"%s\"\n",
                o->args[0]);
        return EX_USAGE;
    }

    if (o->email == NULL) {
        fprintf(stderr, "meterctl register: --email is required\n");
        return EX_USAGE;
    }

    memset(&in, 0, sizeof(in));
    in.email = o->email;
    in.name = o->name;
    in.plan = o->plan;
    in.customer = o->customer;

    /* the input is checked before connecting, as before */
    if (meter_reg_check(&in, g.err, sizeof(g.err)) != EX_OK) {
        fprintf(stderr, "meterctl register: %s\n", g.err);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meter_register(r, o->cf, &in, &g);

    if (rc == EX_OK) {
        meterctl_reg_print(o, &g);

        /* the plan's quotas for nginx now, not at the worker's next pass;
         * the customer is made either way (the worker publishes them) */
        if (o->cf != NULL
            && meter_gov_quota_publish(r, o->cf, g.id, time(NULL), NULL,
                                       g.err, sizeof(g.err))
               != 0)
        {
            fprintf(stderr, "meterctl register: warning: quotas not "
                    "published (meter-worker does at its next pass): %s\n",
                    g.err);
        }

    } else {
        fprintf(stderr, "meterctl register: %s\n", g.err);
    }

    /* the one way out: the key never outlives the command */
    meter_reg_wipe(&g);

    return rc;
}
