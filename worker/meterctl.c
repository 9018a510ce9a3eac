
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl: the admin tool of nginx-meter.
 *
 * EXIT STATUS
 *   0   success
 *   64  usage: bad command line
 *   65  data: unknown record, customer or key; invalid id
 *   69  Redis unreachable
 *   78  configuration error (-c FILE)
 */


#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "drain.h"
#include "log.h"
#include "redis.h"
#include "util.h"


typedef struct {
    const char                 *config;
    const char                 *redis;
    const char                 *password_file;
    int                         db;
    int                         json;
    int                         all;
    const char                 *hour;
    const char                 *customer;
    const char                 *provider;
    const char                 *provider_customer;
    const char                 *subscription;
    const char                 *email;
    const char                 *name;
    const char                 *plan;
    const char                 *hash;
    const char                 *items[16];
    int                         nitems;
    int                         help;
    int                         nargs;
    char                      **args;
} meterctl_opts_t;


static const struct option  meterctl_options[] = {
    { "config", required_argument, NULL, 'c' },
    { "redis", required_argument, NULL, 'r' },
    { "password-file", required_argument, NULL, 'P' },
    { "db", required_argument, NULL, 'd' },
    { "json", no_argument, NULL, 'j' },
    { "all", no_argument, NULL, 'a' },
    { "hour", required_argument, NULL, 'H' },
    { "customer", required_argument, NULL, 'C' },
    { "provider", required_argument, NULL, 'p' },
    { "provider-customer", required_argument, NULL, 'x' },
    { "subscription", required_argument, NULL, 's' },
    { "item", required_argument, NULL, 'i' },
    { "email", required_argument, NULL, 'e' },
    { "name", required_argument, NULL, 'N' },
    { "plan", required_argument, NULL, 'L' },
    { "hash", required_argument, NULL, 'k' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 }
};


static const char  meterctl_help[] =
    "Usage: meterctl [-c FILE | --redis ADDRESS] COMMAND [options]\n"
    "\n"
    "Connection (before or after COMMAND):\n"
    "  -c, --config FILE        meter-worker config (redis, redis.password_file,\n"
    "                           redis.db)\n"
    "      --redis ADDRESS      host:port or unix:/path instead of -c\n"
    "      --password-file F    Redis password file (with --redis)\n"
    "      --db N               Redis database (with --redis)\n"
    "\n"
    "Commands:\n"
    "  usage [--hour YYYY-MM-DDTHH] [--json]\n"
    "        metered totals per key hash, hour and meter\n"
    "  status [--json]\n"
    "        hours in Redis, records open or waiting for a retry, dead\n"
    "        letters, keys without customer, last drain\n"
    "  retry ID... | --all\n"
    "        requeue dead-lettered records (same idempotency key)\n"
    "  customers add ID [--provider P] [--provider-customer X]\n"
    "        [--subscription Y] [--item METER=ID]... [--email E] [--name N]\n"
    "        [--plan P]\n"
    "  keys add KEY|- --customer ID     (- reads the key from stdin)\n"
    "  keys add --hash KEY_HASH --customer ID\n"
    "        map an API key to a customer; stores only its SHA-256\n"
    "\n"
    "Exit status: 0 ok, 64 usage, 65 unknown record/customer or bad id,\n"
    "69 Redis unavailable, 78 config error.\n";


static int
meterctl_parse(int argc, char **argv, meterctl_opts_t *o, int global)
{
    int    c;
    char  *end;
    long   n;

    optind = 0;

    while ((c = getopt_long(argc, argv, global ? "+c:h" : "c:hj",
                            meterctl_options, NULL))
           != -1)
    {
        switch (c) {
        case 'c': o->config = optarg; break;
        case 'r': o->redis = optarg; break;
        case 'P': o->password_file = optarg; break;
        case 'd':
            errno = 0;
            n = strtol(optarg, &end, 10);
            if (errno != 0 || *end != '\0' || n < 0 || n > 1000000) {
                fprintf(stderr, "meterctl: invalid --db \"%s\"\n", optarg);
                return -1;
            }
            o->db = (int) n;
            break;
        case 'j': o->json = 1; break;
        case 'a': o->all = 1; break;
        case 'H': o->hour = optarg; break;
        case 'C': o->customer = optarg; break;
        case 'p': o->provider = optarg; break;
        case 'x': o->provider_customer = optarg; break;
        case 's': o->subscription = optarg; break;
        case 'i':
            if (o->nitems == 16 || strchr(optarg, '=') == NULL) {
                fprintf(stderr, "meterctl: invalid --item \"%s\" (METER=ID, "
                        "at most 16)\n", optarg);
                return -1;
            }
            o->items[o->nitems++] = optarg;
            break;
        case 'e': o->email = optarg; break;
        case 'N': o->name = optarg; break;
        case 'L': o->plan = optarg; break;
        case 'k': o->hash = optarg; break;
        case 'h': o->help = 1; break;
        default:
            return -1;
        }
    }

    o->args = argv + optind;
    o->nargs = argc - optind;

    return 0;
}


static int
meterctl_connect(meterctl_opts_t *o, meter_redis_t *r)
{
    char           err[1024], password[1024], *host, *unix_path;
    int            port, db, rc;
    int64_t        timeout;
    meter_conf_t  *cf;
    const char    *pwfile;

    cf = NULL;
    host = NULL;
    unix_path = NULL;
    password[0] = '\0';
    pwfile = o->password_file;
    db = o->db;
    timeout = 5000;

    if (o->redis != NULL) {
        if (meter_conf_parse_addr(o->redis, &host, &port, &unix_path) != 0) {
            fprintf(stderr, "meterctl: invalid --redis \"%s\" (host:port or "
                    "unix:/path)\n", o->redis);
            return EX_USAGE;
        }

    } else if (o->config != NULL) {
        cf = meter_conf_load(o->config, err, sizeof(err));
        if (cf == NULL) {
            fprintf(stderr, "meterctl: %s\n", err);
            return EX_CONFIG;
        }

        host = cf->redis_host ? strdup(cf->redis_host) : NULL;
        unix_path = cf->redis_unix ? strdup(cf->redis_unix) : NULL;
        port = cf->redis_port;
        db = cf->redis_db;
        timeout = cf->redis_timeout_ms;
        if (pwfile == NULL) {
            pwfile = cf->redis_password_file;
        }

    } else {
        fprintf(stderr, "meterctl: -c FILE or --redis ADDRESS is required\n");
        return EX_USAGE;
    }

    rc = 0;

    if (pwfile != NULL
        && meter_read_secret(pwfile, password, sizeof(password), err,
                             sizeof(err))
           != 0)
    {
        fprintf(stderr, "meterctl: Redis password: %s\n", err);
        rc = (cf != NULL) ? EX_CONFIG : EX_USAGE;
    }

    if (rc == 0
        && meter_redis_connect(r, host, port, unix_path,
                               password[0] ? password : NULL, db, timeout,
                               err, sizeof(err))
           != 0)
    {
        fprintf(stderr, "meterctl: %s\n", err);
        rc = EX_UNAVAILABLE;
    }

    memset(password, 0, sizeof(password));
    free(host);
    free(unix_path);
    meter_conf_free(cf);

    return rc;
}


static int
meterctl_redis_failed(meter_redis_t *r, redisReply *rp)
{
    fprintf(stderr, "meterctl: %s\n",
            rp != NULL && rp->type == REDIS_REPLY_ERROR ? rp->str : r->err);
    freeReplyObject(rp);

    return EX_UNAVAILABLE;
}


/* usage */


typedef struct {
    time_t                      hour;
    char                        key_hash[65];
    char                        meter[METER_METER_MAX + 1];
    uint64_t                    value;
} meterctl_row_t;


static int
meterctl_row_cmp(const void *a, const void *b)
{
    const meterctl_row_t  *x, *y;
    int                    c;

    x = a;
    y = b;

    if (x->hour != y->hour) {
        return (x->hour < y->hour) ? -1 : 1;
    }

    c = strcmp(x->key_hash, y->key_hash);

    return (c != 0) ? c : strcmp(x->meter, y->meter);
}


static int
meterctl_usage(meterctl_opts_t *o, meter_redis_t *r)
{
    char             hbuf[16], dashed[16];
    size_t           h, i, k, j, nrows, cap, mlen;
    time_t           t;
    uint64_t         v;
    redisReply      *hours, *keys, *u;
    const char      *f, *bar;
    meterctl_row_t  *rows, *row, *nr;

    rows = NULL;
    nrows = 0;
    cap = 0;

    if (o->hour != NULL) {
        t = meter_hour_parse_dashed(o->hour);
        if (t == -1) {
            fprintf(stderr, "meterctl: invalid --hour \"%s\" (expected "
                    "YYYY-MM-DDTHH)\n", o->hour);
            return EX_USAGE;
        }

        meter_hour_format(t, hbuf, sizeof(hbuf));
        hours = meter_redis_cmd(r, "ZRANGEBYSCORE mtr:hours %lld %lld",
                                (long long) t, (long long) t);
        /* the index may know the hour even when the zset does not */
        if (meter_reply_ok(hours) && hours->elements == 0) {
            freeReplyObject(hours);
            hours = meter_redis_cmd(r, "EVAL %s 0 %s",
                                    "return {ARGV[1]}", hbuf);
        }

    } else {
        hours = meter_redis_cmd(r, "ZRANGE mtr:hours 0 -1");
    }

    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, hours);
    }

    for (h = 0; h < hours->elements; h++) {
        t = meter_hour_parse(hours->element[h]->str);
        if (t == -1) {
            continue;
        }

        keys = meter_redis_cmd(r, "SMEMBERS mtr:idx:%s",
                               hours->element[h]->str);
        if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(hours);
            free(rows);
            return meterctl_redis_failed(r, keys);
        }

        for (k = 0; k < keys->elements; k++) {
            if (keys->element[k]->len != 64) {
                continue;
            }

            u = meter_redis_cmd(r, "HGETALL mtr:u:{%s}:%s",
                                keys->element[k]->str,
                                hours->element[h]->str);
            if (!meter_reply_ok(u) || u->type != REDIS_REPLY_ARRAY) {
                freeReplyObject(keys);
                freeReplyObject(hours);
                free(rows);
                return meterctl_redis_failed(r, u);
            }

            for (i = 0; i + 1 < u->elements; i += 2) {
                f = u->element[i]->str;
                bar = strchr(f, '|');
                mlen = (bar != NULL) ? (size_t) (bar - f) : 0;

                if (mlen == 0 || mlen > METER_METER_MAX
                    || meter_parse_u64(u->element[i + 1]->str,
                                       u->element[i + 1]->len, &v)
                       != 0)
                {
                    continue;
                }

                /* the rows of one key-hour are the last ones */
                row = NULL;
                for (j = nrows; j > 0; j--) {
                    if (rows[j - 1].hour != t
                        || strcmp(rows[j - 1].key_hash,
                                  keys->element[k]->str) != 0)
                    {
                        break;
                    }

                    if (strlen(rows[j - 1].meter) == mlen
                        && memcmp(rows[j - 1].meter, f, mlen) == 0)
                    {
                        row = &rows[j - 1];
                        break;
                    }
                }

                if (row == NULL) {
                    if (nrows == cap) {
                        cap = cap ? cap * 2 : 64;
                        nr = realloc(rows, cap * sizeof(meterctl_row_t));
                        if (nr == NULL) {
                            fprintf(stderr, "meterctl: out of memory\n");
                            exit(EX_OSERR);
                        }

                        rows = nr;
                    }

                    row = &rows[nrows++];
                    row->hour = t;
                    snprintf(row->key_hash, sizeof(row->key_hash), "%s",
                             keys->element[k]->str);
                    memcpy(row->meter, f, mlen);
                    row->meter[mlen] = '\0';
                    row->value = 0;
                }

                row->value += v;
            }

            freeReplyObject(u);
        }

        freeReplyObject(keys);
    }

    freeReplyObject(hours);

    if (nrows > 0) {
        qsort(rows, nrows, sizeof(meterctl_row_t), meterctl_row_cmp);
    }

    if (o->json) {
        printf("[");

        for (i = 0; i < nrows; i++) {
            meter_hour_format_dashed(rows[i].hour, dashed, sizeof(dashed));
            printf("%s\n{\"key_hash\":\"%s\",\"hour\":\"%s\",\"meter\":\"%s\","
                   "\"value\":%" PRIu64 "}", i ? "," : "", rows[i].key_hash,
                   dashed, rows[i].meter, rows[i].value);
        }

        printf("%s]\n", nrows ? "\n" : "");

    } else {
        printf("%-13s  %-64s  %-16s  %s\n", "HOUR", "KEY_HASH", "METER",
               "VALUE");

        for (i = 0; i < nrows; i++) {
            meter_hour_format_dashed(rows[i].hour, dashed, sizeof(dashed));
            printf("%-13s  %-64s  %-16s  %" PRIu64 "\n", dashed,
                   rows[i].key_hash, rows[i].meter, rows[i].value);
        }
    }

    free(rows);

    return EX_OK;
}


/* status */


static void
meterctl_json_field(const char *name, const char *v, int first)
{
    meter_str_t  s;

    memset(&s, 0, sizeof(meter_str_t));
    meter_str_json(&s, v);
    printf("%s\"%s\":%s", first ? "" : ",", name, s.data ? s.data : "null");
    meter_str_free(&s);
}


static int
meterctl_records(meter_redis_t *r, const char *zset, const char *title,
    int json)
{
    static const char  *fields[] = {
        "state", "customer", "key_hash", "meter", "period_start",
        "quantity", "attempts", "next_attempt", "http_status", "last_error",
        NULL
    };

    char         when[32];
    size_t       i, k;
    redisReply  *ids, *rec;
    const char  *v;

    ids = meter_redis_cmd(r, "ZRANGE %s 0 -1", zset);
    if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, ids);
    }

    if (json) {
        printf(",\"%s\":[", title);

    } else {
        printf("%s: %zu\n", title, ids->elements);
    }

    for (i = 0; i < ids->elements; i++) {
        rec = meter_redis_cmd(r, "HGETALL " METER_W_REC "%s",
                              ids->element[i]->str);
        if (!meter_reply_ok(rec)) {
            freeReplyObject(ids);
            return meterctl_redis_failed(r, rec);
        }

        if (json) {
            printf("%s{", i ? "," : "");
            meterctl_json_field("id", ids->element[i]->str, 1);

            for (k = 0; fields[k] != NULL; k++) {
                v = meter_reply_hget(rec, fields[k]);

                if (v != NULL && (strcmp(fields[k], "period_start") == 0
                                  || strcmp(fields[k], "next_attempt") == 0))
                {
                    meter_iso8601((time_t) strtoll(v, NULL, 10), when,
                                  sizeof(when));
                    v = when;
                }

                if (v != NULL && (strcmp(fields[k], "quantity") == 0
                                  || strcmp(fields[k], "attempts") == 0
                                  || strcmp(fields[k], "http_status") == 0))
                {
                    printf(",\"%s\":%s", fields[k], v);

                } else {
                    meterctl_json_field(fields[k], v, 0);
                }
            }

            printf("}");

        } else {
            v = meter_reply_hget(rec, "period_start");
            meter_iso8601(v ? (time_t) strtoll(v, NULL, 10) : 0, when,
                          sizeof(when));
            printf("  %s  %s  %s  %s  qty %s  attempts %s  %s\n",
                   ids->element[i]->str, when,
                   meter_reply_hget(rec, "customer")
                   ? meter_reply_hget(rec, "customer") : "(no customer)",
                   meter_reply_hget(rec, "meter")
                   ? meter_reply_hget(rec, "meter") : "?",
                   meter_reply_hget(rec, "quantity")
                   ? meter_reply_hget(rec, "quantity") : "?",
                   meter_reply_hget(rec, "attempts")
                   ? meter_reply_hget(rec, "attempts") : "0",
                   meter_reply_hget(rec, "last_error")
                   ? meter_reply_hget(rec, "last_error") : "");
        }

        freeReplyObject(rec);
    }

    if (json) {
        printf("]");
    }

    freeReplyObject(ids);

    return EX_OK;
}


static int
meterctl_status(meterctl_opts_t *o, meter_redis_t *r)
{
    char         last[32], oldest[16], newest[16];
    size_t       i;
    long long    nhours, lock;
    redisReply  *rp, *stats, *nocust;
    const char  *v;
    int          rc;

    rp = meter_redis_cmd(r, "ZRANGE mtr:hours 0 -1");
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, rp);
    }

    nhours = (long long) rp->elements;
    oldest[0] = '\0';
    newest[0] = '\0';

    if (rp->elements > 0) {
        meter_hour_format_dashed(meter_hour_parse(rp->element[0]->str),
                                 oldest, sizeof(oldest));
        meter_hour_format_dashed(
            meter_hour_parse(rp->element[rp->elements - 1]->str),
            newest, sizeof(newest));
    }

    freeReplyObject(rp);

    stats = meter_redis_cmd(r, "HGETALL %s", METER_W_STATS);
    if (!meter_reply_ok(stats)) {
        return meterctl_redis_failed(r, stats);
    }

    v = meter_reply_hget(stats, "last_drain");
    last[0] = '\0';
    if (v != NULL) {
        meter_iso8601((time_t) strtoll(v, NULL, 10), last, sizeof(last));
    }

    rp = meter_redis_cmd(r, "PTTL %s", METER_W_LOCK);
    lock = meter_reply_int(rp, -2);
    freeReplyObject(rp);

    nocust = meter_redis_cmd(r, "SMEMBERS %s", METER_W_NOCUST);
    if (!meter_reply_ok(nocust) || nocust->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(stats);
        return meterctl_redis_failed(r, nocust);
    }

    if (o->json) {
        printf("{\"hours\":%lld", nhours);
        meterctl_json_field("oldest_hour", oldest[0] ? oldest : NULL, 0);
        meterctl_json_field("newest_hour", newest[0] ? newest : NULL, 0);
        meterctl_json_field("last_drain", last[0] ? last : NULL, 0);
        printf(",\"records_sent\":%s",
               meter_reply_hget(stats, "records_sent")
               ? meter_reply_hget(stats, "records_sent") : "0");
        printf(",\"quantity_sent\":%s",
               meter_reply_hget(stats, "quantity_sent")
               ? meter_reply_hget(stats, "quantity_sent") : "0");
        printf(",\"locked\":%s", lock > 0 ? "true" : "false");

    } else {
        if (nhours > 0) {
            printf("hours in Redis: %lld (%s .. %s)\n", nhours, oldest,
                   newest);

        } else {
            printf("hours in Redis: 0\n");
        }

        printf("last drain: %s\n", last[0] ? last : "never");
        printf("records sent: %s, quantity sent: %s\n",
               meter_reply_hget(stats, "records_sent")
               ? meter_reply_hget(stats, "records_sent") : "0",
               meter_reply_hget(stats, "quantity_sent")
               ? meter_reply_hget(stats, "quantity_sent") : "0");
        printf("drain lock: %s\n", lock > 0 ? "held" : "free");
    }

    freeReplyObject(stats);

    rc = meterctl_records(r, METER_W_OPEN, o->json ? "open" : "open records",
                          o->json);
    if (rc == EX_OK) {
        rc = meterctl_records(r, METER_W_DEAD,
                              o->json ? "dead" : "dead letters", o->json);
    }

    if (rc != EX_OK) {
        freeReplyObject(nocust);
        return rc;
    }

    if (o->json) {
        printf(",\"keys_without_customer\":[");
        for (i = 0; i < nocust->elements; i++) {
            printf("%s\"%s\"", i ? "," : "", nocust->element[i]->str);
        }
        printf("]}\n");

    } else {
        printf("keys without customer (usage held): %zu\n",
               nocust->elements);
        for (i = 0; i < nocust->elements; i++) {
            printf("  %s\n", nocust->element[i]->str);
        }
    }

    freeReplyObject(nocust);

    return EX_OK;
}


/* retry */


static const char  meterctl_lua_retry[] =
    "if redis.call('HGET', KEYS[1], 'state') ~= 'dead' then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'state', 'sending', 'next_attempt',\n"
    "           ARGV[2])\n"
    "redis.call('ZREM', KEYS[3], ARGV[1])\n"
    "redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])\n"
    "return 1\n";


static int
meterctl_retry(meterctl_opts_t *o, meter_redis_t *r)
{
    int          i, n, missing;
    size_t       k;
    redisReply  *ids, *rp;

    if ((o->all && o->nargs > 0) || (!o->all && o->nargs == 0)) {
        fprintf(stderr, "meterctl retry: give record ids or --all\n");
        return EX_USAGE;
    }

    n = 0;
    missing = 0;

    if (o->all) {
        ids = meter_redis_cmd(r, "ZRANGE %s 0 -1", METER_W_DEAD);
        if (!meter_reply_ok(ids) || ids->type != REDIS_REPLY_ARRAY) {
            return meterctl_redis_failed(r, ids);
        }

        for (k = 0; k < ids->elements; k++) {
            rp = meter_redis_cmd(r, "EVAL %s 3 " METER_W_REC "%s %s %s %s "
                                 "%lld", meterctl_lua_retry,
                                 ids->element[k]->str, METER_W_OPEN,
                                 METER_W_DEAD, ids->element[k]->str,
                                 (long long) time(NULL));
            if (!meter_reply_ok(rp)) {
                freeReplyObject(ids);
                return meterctl_redis_failed(r, rp);
            }

            n += (int) meter_reply_int(rp, 0);
            freeReplyObject(rp);
        }

        freeReplyObject(ids);

    } else {
        for (i = 0; i < o->nargs; i++) {
            if (strlen(o->args[i]) != METER_IDEM_LEN
                || strspn(o->args[i], "0123456789abcdef") != METER_IDEM_LEN)
            {
                fprintf(stderr, "meterctl retry: invalid record id \"%s\"\n",
                        o->args[i]);
                missing++;
                continue;
            }

            rp = meter_redis_cmd(r, "EVAL %s 3 " METER_W_REC "%s %s %s %s "
                                 "%lld", meterctl_lua_retry, o->args[i],
                                 METER_W_OPEN, METER_W_DEAD, o->args[i],
                                 (long long) time(NULL));
            if (!meter_reply_ok(rp)) {
                return meterctl_redis_failed(r, rp);
            }

            if (meter_reply_int(rp, 0) == 1) {
                n++;

            } else {
                fprintf(stderr, "meterctl retry: no dead letter \"%s\"\n",
                        o->args[i]);
                missing++;
            }

            freeReplyObject(rp);
        }
    }

    printf("requeued %d record%s; the worker sends %s on its next pass\n", n,
           n == 1 ? "" : "s", n == 1 ? "it" : "them");

    return missing ? EX_DATAERR : EX_OK;
}


/* customers, keys */


static int
meterctl_valid_id(const char *s)
{
    size_t  n;

    n = strlen(s);

    return n >= 1 && n <= 64
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


/*
 * Rewrites the mtr:gov fields of every key of a customer from mtr:key and
 * mtr:cust, then bumps mtr:gov:version, as docs/redis-schema.md asks of
 * every writer of keys or customer status.
 */
static int
meterctl_gov_customer(meter_redis_t *r, const char *customer)
{
    char         line[512];
    size_t       i;
    redisReply  *keys, *cust, *key, *rp;
    const char  *status, *reason, *since, *revoked;

    cust = meter_redis_cmd(r, "HGETALL mtr:cust:{%s}", customer);
    if (!meter_reply_ok(cust)) {
        return meterctl_redis_failed(r, cust);
    }

    keys = meter_redis_cmd(r, "SMEMBERS mtr:ckeys:{%s}", customer);
    if (!meter_reply_ok(keys) || keys->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(cust);
        return meterctl_redis_failed(r, keys);
    }

    status = meter_reply_hget(cust, "status");
    reason = meter_reply_hget(cust, "reason");
    since = meter_reply_hget(cust, "since");

    for (i = 0; i < keys->elements; i++) {
        key = meter_redis_cmd(r, "HGETALL mtr:key:{%s}",
                              keys->element[i]->str);
        if (!meter_reply_ok(key)) {
            freeReplyObject(keys);
            freeReplyObject(cust);
            return meterctl_redis_failed(r, key);
        }

        revoked = meter_reply_hget(key, "revoked");

        snprintf(line, sizeof(line), "%s\t%s\t%s\t%s\t%s", customer,
                 (status != NULL && strcmp(status, "delinquent") == 0)
                 ? "d" : "a",
                 (status != NULL && strcmp(status, "delinquent") == 0
                  && reason != NULL) ? reason : "",
                 since != NULL ? since : "0",
                 revoked != NULL ? revoked : "0");

        freeReplyObject(key);

        rp = meter_redis_cmd(r, "HSET mtr:gov %s %s", keys->element[i]->str,
                             line);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(keys);
            freeReplyObject(cust);
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    freeReplyObject(keys);
    freeReplyObject(cust);

    rp = meter_redis_cmd(r, "INCR mtr:gov:version");
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    return EX_OK;
}


static int
meterctl_customers(meterctl_opts_t *o, meter_redis_t *r)
{
    const char  *argv[64];
    size_t       argl[64];
    char         now[24], item[16][64], key[96];
    const char  *id, *eq;
    int          argc, i, rc;
    redisReply  *rp;

    if (o->nargs != 2 || strcmp(o->args[0], "add") != 0) {
        fprintf(stderr, "meterctl customers: expected \"add ID\"\n");
        return EX_USAGE;
    }

    id = o->args[1];

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl customers: invalid customer id \"%s\" "
                "([A-Za-z0-9_.-]{1,64})\n", id);
        return EX_DATAERR;
    }

    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));

    argc = 0;

#define meterctl_arg(s)                                                      \
    do {                                                                     \
        argv[argc] = (s);                                                    \
        argl[argc] = strlen(s);                                              \
        argc++;                                                              \
    } while (0)

    snprintf(key, sizeof(key), "mtr:cust:{%s}", id);

    /* status (delinquency) and created of an existing customer stay */
    rp = meter_redis_cmd(r, "HSETNX %s status active", key);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "HSETNX %s created %s", key, now);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    meterctl_arg("HSET");
    meterctl_arg(key);
    meterctl_arg("provider");
    meterctl_arg(o->provider != NULL ? o->provider : "file");

    if (o->provider_customer != NULL) {
        meterctl_arg("provider_customer");
        meterctl_arg(o->provider_customer);
    }

    if (o->subscription != NULL) {
        meterctl_arg("subscription");
        meterctl_arg(o->subscription);
    }

    if (o->email != NULL) {
        meterctl_arg("email");
        meterctl_arg(o->email);
    }

    if (o->name != NULL) {
        meterctl_arg("name");
        meterctl_arg(o->name);
    }

    if (o->plan != NULL) {
        meterctl_arg("plan");
        meterctl_arg(o->plan);
    }

    for (i = 0; i < o->nitems; i++) {
        eq = strchr(o->items[i], '=');
        snprintf(item[i], sizeof(item[i]), "item.%.*s",
                 (int) (eq - o->items[i]), o->items[i]);
        meterctl_arg(item[i]);
        meterctl_arg(eq + 1);
    }

#undef meterctl_arg

    rp = meter_redis_argv(r, argc, argv, argl);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "SADD mtr:customers %s", id);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rc = meterctl_gov_customer(r, id);
    if (rc != EX_OK) {
        return rc;
    }

    printf("customer %s saved\n", id);

    return EX_OK;
}


static int
meterctl_keys(meterctl_opts_t *o, meter_redis_t *r)
{
    char         kh[65], prefix[13], line[8192], old[72];
    const char  *key;
    size_t       n;
    int          rc;
    redisReply  *rp;

    if (o->nargs < 1 || strcmp(o->args[0], "add") != 0
        || (o->hash == NULL && o->nargs != 2)
        || (o->hash != NULL && o->nargs != 1)
        || o->customer == NULL)
    {
        fprintf(stderr, "meterctl keys: expected \"add KEY --customer ID\" or "
                "\"add --hash KEY_HASH --customer ID\"\n");
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->customer)) {
        fprintf(stderr, "meterctl keys: invalid customer id \"%s\"\n",
                o->customer);
        return EX_DATAERR;
    }

    rp = meter_redis_cmd(r, "EXISTS mtr:cust:{%s}", o->customer);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    if (meter_reply_int(rp, 0) != 1) {
        freeReplyObject(rp);
        fprintf(stderr, "meterctl keys: unknown customer \"%s\" (add it with "
                "\"meterctl customers add\")\n", o->customer);
        return EX_DATAERR;
    }

    freeReplyObject(rp);

    prefix[0] = '\0';

    if (o->hash != NULL) {
        if (strlen(o->hash) != 64
            || strspn(o->hash, "0123456789abcdef") != 64)
        {
            fprintf(stderr, "meterctl keys: --hash must be 64 lowercase hex "
                    "chars\n");
            return EX_DATAERR;
        }

        memcpy(kh, o->hash, 65);

    } else {
        key = o->args[1];

        if (strcmp(key, "-") == 0) {
            if (fgets(line, sizeof(line), stdin) == NULL) {
                fprintf(stderr, "meterctl keys: no key on stdin\n");
                return EX_DATAERR;
            }

            line[strcspn(line, "\r\n")] = '\0';
            key = line;
        }

        n = strlen(key);
        if (n == 0) {
            fprintf(stderr, "meterctl keys: empty key\n");
            return EX_DATAERR;
        }

        meter_sha256_hex(key, n, kh);
        snprintf(prefix, sizeof(prefix), "%.12s", key);
    }

    old[0] = '\0';
    rp = meter_redis_cmd(r, "HGET mtr:key:{%s} customer", kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    if (rp->type == REDIS_REPLY_STRING) {
        snprintf(old, sizeof(old), "%s", rp->str);
    }

    freeReplyObject(rp);

    if (prefix[0] != '\0') {
        rp = meter_redis_cmd(r, "HSET mtr:key:{%s} customer %s prefix %s "
                             "created %lld", kh, o->customer, prefix,
                             (long long) time(NULL));

    } else {
        rp = meter_redis_cmd(r, "HSET mtr:key:{%s} customer %s created %lld",
                             kh, o->customer, (long long) time(NULL));
    }

    memset(line, 0, sizeof(line));

    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (old[0] != '\0' && strcmp(old, o->customer) != 0) {
        /* the key moves to another customer */
        rp = meter_redis_cmd(r, "SREM mtr:ckeys:{%s} %s", old, kh);
        freeReplyObject(rp);
        rc = meterctl_gov_customer(r, old);
        if (rc != EX_OK) {
            return rc;
        }
    }

    rp = meter_redis_cmd(r, "SADD mtr:ckeys:{%s} %s", o->customer, kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rc = meterctl_gov_customer(r, o->customer);
    if (rc != EX_OK) {
        return rc;
    }

    printf("%s\n", kh);

    return EX_OK;
}


int
main(int argc, char **argv)
{
    static const struct {
        const char  *name;
        int        (*run)(meterctl_opts_t *o, meter_redis_t *r);
    } commands[] = {
        { "usage", meterctl_usage },
        { "status", meterctl_status },
        { "retry", meterctl_retry },
        { "customers", meterctl_customers },
        { "keys", meterctl_keys },
    };

    size_t           i;
    int              rc;
    meter_redis_t    r;
    meterctl_opts_t  o;

    meter_log_prefix = 0;

    memset(&o, 0, sizeof(meterctl_opts_t));
    memset(&r, 0, sizeof(meter_redis_t));

    if (meterctl_parse(argc, argv, &o, 1) != 0) {
        fputs(meterctl_help, stderr);
        return EX_USAGE;
    }

    if (o.nargs == 0 || strcmp(o.args[0], "help") == 0) {
        fputs(meterctl_help, o.help || o.nargs ? stdout : stderr);
        return (o.help || o.nargs) ? EX_OK : EX_USAGE;
    }

    for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(o.args[0], commands[i].name) == 0) {
            break;
        }
    }

    if (i == sizeof(commands) / sizeof(commands[0])) {
        fprintf(stderr, "meterctl: unknown command \"%s\"\n", o.args[0]);
        fputs(meterctl_help, stderr);
        return EX_USAGE;
    }

    if (meterctl_parse(o.nargs, o.args, &o, 0) != 0) {
        fputs(meterctl_help, stderr);
        return EX_USAGE;
    }

    if (o.help) {
        fputs(meterctl_help, stdout);
        return EX_OK;
    }

    rc = meterctl_connect(&o, &r);
    if (rc != 0) {
        return rc;
    }

    rc = commands[i].run(&o, &r);

    meter_redis_close(&r);

    return rc;
}
