
/*
 * Copyright (C) nginx-meter authors
 *
 * EVALSHA for the scripts the drain pipelines once per record (create,
 * b marks, done): loaded with SCRIPT LOAD when a connection is made, then
 * each "EVAL <body>" appended to a pipeline goes out as "EVALSHA <sha1>",
 * so Redis neither receives nor hashes the body again (redis.io: EVALSHA).
 * A NOSCRIPT reply (SCRIPT FLUSH) turns it off for that connection: the
 * command failed like any Redis error, the next ones are sent as EVAL.
 */


#include <stdio.h>
#include <string.h>

#include <openssl/sha.h>

#include "redis.h"
#include "scripts.h"


typedef struct {
    const char                 *body;
    size_t                      len;
    char                        sha[41];
} meter_script_t;


static meter_script_t  meter_scripts[] = {
    { meter_lua_create, 0, "" },
    { meter_lua_create_all, 0, "" },
    { meter_lua_maxset, 0, "" },
    { meter_lua_done, 0, "" },
    { meter_lua_done_all, 0, "" },
    { NULL, 0, "" }
};


static void
meter_scripts_init(void)
{
    unsigned char    md[SHA_DIGEST_LENGTH];
    size_t           i, k;
    meter_script_t  *s;

    for (s = meter_scripts; s->body != NULL; s++) {
        if (s->sha[0] != '\0') {
            continue;
        }

        s->len = strlen(s->body);
        SHA1((const unsigned char *) s->body, s->len, md);

        for (i = 0, k = 0; i < SHA_DIGEST_LENGTH; i++, k += 2) {
            snprintf(s->sha + k, 3, "%02x", md[i]);
        }
    }
}


void
meter_redis_scripts_load(meter_redis_t *r)
{
    redisReply      *rp;
    meter_script_t  *s;

    meter_scripts_init();
    r->evalsha = 0;

    for (s = meter_scripts; s->body != NULL; s++) {
        rp = meter_redis_cmd(r, "SCRIPT LOAD %b", s->body, s->len);

        if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_STRING
            || strcmp(rp->str, s->sha) != 0)
        {
            /* EVAL then, as before */
            freeReplyObject(rp);
            return;
        }

        freeReplyObject(rp);
    }

    r->evalsha = 1;
}


/* the SHA1 of a script body that was loaded, or NULL */
const char *
meter_redis_script_sha(meter_redis_t *r, const char *body, size_t len)
{
    meter_script_t  *s;

    if (!r->evalsha) {
        return NULL;
    }

    for (s = meter_scripts; s->body != NULL; s++) {
        if (s->len == len
            && (s->body == body || memcmp(s->body, body, len) == 0))
        {
            return s->sha;
        }
    }

    return NULL;
}
