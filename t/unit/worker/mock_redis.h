
/*
 * Copyright (C) nginx-meter authors
 *
 * A mocked meter_redis_exec for cmocka tests (link with
 * -Wl,--wrap=meter_redis_exec): it decodes each command into last_cmd,
 * checks it against the expectations, and returns the queued reply.
 */


#ifndef _MOCK_REDIS_H_INCLUDED_
#define _MOCK_REDIS_H_INCLUDED_


/* the last command, decoded from RESP into "ARG ARG ..." */
static char  last_cmd[8192];


redisReply *__wrap_meter_redis_exec(meter_redis_t *r, const char *cmd,
    size_t len);


redisReply *
__wrap_meter_redis_exec(meter_redis_t *r, const char *cmd, size_t len)
{
    const char  *p, *end;
    long         n, l;
    size_t       o;

    (void) r;

    end = cmd + len;
    assert_true(cmd[0] == '*');
    n = strtol(cmd + 1, (char **) &p, 10);
    p += 2;
    o = 0;

    while (n-- > 0) {
        assert_true(p < end && *p == '$');
        l = strtol(p + 1, (char **) &p, 10);
        p += 2;
        o += (size_t) snprintf(last_cmd + o, sizeof(last_cmd) - o, "%s%.*s",
                               o ? " " : "", (int) l, p);
        p += l + 2;
    }

    check_expected_ptr(cmd);

    return mock_ptr_type(redisReply *);
}


static redisReply *
reply(int type, const char *str, long long integer)
{
    redisReply  *rp;

    rp = calloc(1, sizeof(redisReply));
    rp->type = type;
    rp->integer = integer;

    if (str != NULL) {
        rp->str = strdup(str);
        rp->len = strlen(str);
    }

    return rp;
}


#endif /* _MOCK_REDIS_H_INCLUDED_ */
