
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl: the admin tool of nginx-meter.  Every command and subcommand
 * has its own --help.  Tables for people by default, --json for scripts.
 *
 * EXIT STATUS
 *   0   success
 *   64  usage: bad command line
 *   65  data: unknown record, customer or key; invalid id; a registration
 *       that already completed
 *   69  Redis or the billing provider unavailable, or the provider refused
 *   70  internal error
 *   75  temporary failure: run the same command again
 *   78  configuration error (-c FILE)
 */


#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/rand.h>

#include "config.h"
#include "drain.h"
#include "gov.h"
#include "log.h"
#include "provider.h"
#include "redis.h"
#include "util.h"


#define METERCTL_KEY_PREFIX     "mk_live_"
#define METERCTL_KEY_BYTES      20      /* 160 bits from the CSPRNG */
/* "mk_live_" + base32 of 20 bytes (32 chars) */
#define METERCTL_KEY_LEN        (sizeof(METERCTL_KEY_PREFIX) - 1 + 32)

/* the worker's last delinquency sync (written by meter-worker) */
#define METERCTL_SYNC_KEY       "mtr:w:sync"


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
    const char                 *reason;
    const char                 *meter;
    const char                 *from;
    const char                 *to;
    const char                 *period;
    const char                 *items[16];
    int                         nitems;
    int                         help;
    int                         nargs;
    char                      **args;
    char                        seen[128];  /* options given, by letter */
    meter_conf_t               *cf;         /* with -c */
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
    { "reason", required_argument, NULL, 'R' },
    { "meter", required_argument, NULL, 'M' },
    { "from", required_argument, NULL, 'F' },
    { "to", required_argument, NULL, 'T' },
    { "period", required_argument, NULL, 'D' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 }
};


static const char  meterctl_help[] =
    "Usage: meterctl [-c FILE | --redis ADDRESS] COMMAND [options]\n"
    "\n"
    "Connection (before or after COMMAND):\n"
    "  -c, --config FILE        meter-worker config (redis, redis.password_file,\n"
    "                           redis.db, provider)\n"
    "      --redis ADDRESS      host:port or unix:/path instead of -c\n"
    "                           (provider \"file\")\n"
    "      --password-file F    Redis password file (with --redis)\n"
    "      --db N               Redis database (with --redis)\n"
    "\n"
    "Commands (meterctl COMMAND --help for each):\n"
    "  register      create a customer with the provider and its first key\n"
    "  customers     list, show, add\n"
    "  keys          list, add, revoke, rotate API keys\n"
    "  delinquent    set, clear a manual delinquency mark (402)\n"
    "  credit        set, add, show prepaid credit\n"
    "  usage         metered usage per customer or per key, and its billing\n"
    "  status        hours pending, open and dead records, last drain/sync\n"
    "  retry         requeue dead-lettered records\n"
    "\n"
    "Exit status: 0 ok, 64 usage, 65 unknown customer/key/record or bad id,\n"
    "69 Redis or provider unavailable, 75 temporary failure (run again),\n"
    "78 config error.\n";


/* "--" options every command takes */
#define METERCTL_CONN  "crPdh"


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
        if (c > 0 && c < 128) {
            o->seen[c] = 1;
        }

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
            if (o->nitems == 16 || strchr(optarg, '=') == NULL
                || strchr(optarg, '=') == optarg
                || strchr(optarg, '=') - optarg > METER_METER_MAX)
            {
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
        case 'R': o->reason = optarg; break;
        case 'M': o->meter = optarg; break;
        case 'F': o->from = optarg; break;
        case 'T': o->to = optarg; break;
        case 'D': o->period = optarg; break;
        case 'h': o->help = 1; break;
        default:
            return -1;
        }
    }

    o->args = argv + optind;
    o->nargs = argc - optind;

    return 0;
}


/* the first option given that the command does not take, or 0 */
static int
meterctl_unexpected(const meterctl_opts_t *o, const char *allowed)
{
    int  c;

    for (c = 1; c < 128; c++) {
        if (o->seen[c] && strchr(allowed, c) == NULL
            && strchr(METERCTL_CONN, c) == NULL)
        {
            return c;
        }
    }

    return 0;
}


static const char *
meterctl_long_name(int c)
{
    const struct option  *opt;

    for (opt = meterctl_options; opt->name != NULL; opt++) {
        if (opt->val == c) {
            return opt->name;
        }
    }

    return "?";
}


static int
meterctl_connect(meterctl_opts_t *o, meter_redis_t *r)
{
    char           err[1024], password[1024], *host, *unix_path;
    int            port, db, rc;
    int64_t        timeout;
    const char    *pwfile;

    host = NULL;
    unix_path = NULL;
    password[0] = '\0';
    pwfile = o->password_file;
    db = o->db;
    timeout = 5000;
    port = 0;

    if (o->redis != NULL) {
        if (meter_conf_parse_addr(o->redis, &host, &port, &unix_path) != 0) {
            fprintf(stderr, "meterctl: invalid --redis \"%s\" (host:port or "
                    "unix:/path)\n", o->redis);
            return EX_USAGE;
        }

    } else if (o->cf != NULL) {
        host = o->cf->redis_host ? strdup(o->cf->redis_host) : NULL;
        unix_path = o->cf->redis_unix ? strdup(o->cf->redis_unix) : NULL;
        port = o->cf->redis_port;
        db = o->cf->redis_db;
        timeout = o->cf->redis_timeout_ms;
        if (pwfile == NULL) {
            pwfile = o->cf->redis_password_file;
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
        rc = (o->cf != NULL) ? EX_CONFIG : EX_USAGE;
    }

    if (rc == 0
        && meter_redis_connect(r, host, port, unix_path,
                               password[0] ? password : NULL, db, timeout,
                               err, sizeof(err))
           != 0)
    {
        fprintf(stderr, "meterctl: %s (is redis-server running and is the "
                "address right?)\n", err);
        rc = EX_UNAVAILABLE;
    }

    memset(password, 0, sizeof(password));
    free(host);
    free(unix_path);

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


/* an error of gov.c: invalid input is the admin's, the rest Redis' */
static int
meterctl_gov_failed(const char *cmd, const char *err)
{
    fprintf(stderr, "meterctl %s: %s\n", cmd, err);

    if (strncmp(err, "invalid ", 8) == 0 || strncmp(err, "unknown ", 8) == 0
        || strstr(err, "negative") != NULL || strstr(err, "too large") != NULL)
    {
        return EX_DATAERR;
    }

    return EX_UNAVAILABLE;
}


static int
meterctl_valid_id(const char *s)
{
    size_t  n;

    n = strlen(s);

    return n >= 1 && n <= 64
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


static int
meterctl_valid_meter(const char *s)
{
    size_t  n;

    n = strlen(s);

    return n >= 1 && n <= METER_METER_MAX
           && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_.-") == n;
}


/* 1 when the customer exists; 0 with a message; -1 Redis failed */
static int
meterctl_customer_exists(meter_redis_t *r, const char *cmd, const char *id)
{
    redisReply  *rp;
    long long    n;

    rp = meter_redis_cmd(r, "EXISTS mtr:cust:{%s}", id);
    if (!meter_reply_ok(rp)) {
        meterctl_redis_failed(r, rp);
        return -1;
    }

    n = meter_reply_int(rp, 0);
    freeReplyObject(rp);

    if (n != 1) {
        fprintf(stderr, "meterctl %s: unknown customer \"%s\" (see "
                "\"meterctl customers list\")\n", cmd, id);
        return 0;
    }

    return 1;
}


static void
meterctl_time(const char *unix_s, char *buf, size_t size)
{
    if (unix_s == NULL || unix_s[0] == '\0' || strcmp(unix_s, "0") == 0) {
        snprintf(buf, size, "-");
        return;
    }

    meter_iso8601((time_t) strtoll(unix_s, NULL, 10), buf, size);
}


static void
meterctl_json_print(cJSON *j)
{
    char  *s;

    s = cJSON_PrintUnformatted(j);
    if (s == NULL) {
        fprintf(stderr, "meterctl: out of memory\n");
        exit(EX_OSERR);
    }

    printf("%s\n", s);
    free(s);
}


/* exact 64-bit numbers in JSON (cJSON's numbers are doubles) */
static void
meterctl_json_int(cJSON *o, const char *name, long long v)
{
    char  buf[24];

    snprintf(buf, sizeof(buf), "%lld", v);
    cJSON_AddRawToObject(o, name, buf);
}


static void
meterctl_json_str(cJSON *o, const char *name, const char *v)
{
    if (v != NULL) {
        cJSON_AddStringToObject(o, name, v);

    } else {
        cJSON_AddNullToObject(o, name);
    }
}


/* API keys */


static const char  meterctl_b32[] = "abcdefghijklmnopqrstuvwxyz234567";


/* base32 (RFC 4648 alphabet, lowercase, no padding) of n bytes; out holds
 * (n * 8 + 4) / 5 + 1 */
static void
meterctl_base32(const unsigned char *in, size_t n, char *out)
{
    size_t    i, o;
    unsigned  bits, acc;

    o = 0;
    bits = 0;
    acc = 0;

    for (i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;

        while (bits >= 5) {
            out[o++] = meterctl_b32[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }

    if (bits > 0) {
        out[o++] = meterctl_b32[(acc << (5 - bits)) & 31];
    }

    out[o] = '\0';
}


/* a new API key from the CSPRNG; out >= METERCTL_KEY_LEN + 1; 0 or -1 */
static int
meterctl_key_new(char *out)
{
    unsigned char  rnd[METERCTL_KEY_BYTES];
    size_t         n;

    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        return -1;
    }

    n = sizeof(METERCTL_KEY_PREFIX) - 1;
    memcpy(out, METERCTL_KEY_PREFIX, n);
    meterctl_base32(rnd, sizeof(rnd), out + n);
    memset(rnd, 0, sizeof(rnd));

    return 0;
}


/* our customer id of an email: "c_" and 20 hex chars of its SHA-256, so
 * that running register again finds the same customer */
static void
meterctl_customer_of_email(const char *email, char *out, size_t size)
{
    char    low[256], hex[65];
    size_t  i, n;

    n = strlen(email);
    if (n >= sizeof(low)) {
        n = sizeof(low) - 1;
    }

    for (i = 0; i < n; i++) {
        low[i] = (char) tolower((unsigned char) email[i]);
    }

    low[n] = '\0';
    meter_sha256_hex(low, n, hex);
    snprintf(out, size, "c_%.20s", hex);
}


static int
meterctl_valid_email(const char *s)
{
    size_t       n, i;
    const char  *at;

    n = strlen(s);
    at = strchr(s, '@');

    if (n < 3 || n > 254 || at == NULL || at == s || at[1] == '\0'
        || strchr(at + 1, '@') != NULL)
    {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if ((unsigned char) s[i] <= ' ' || s[i] == 0x7f) {
            return 0;
        }
    }

    return 1;
}


/* free text stored in Redis and shown in tables: no control characters */
static int
meterctl_valid_text(const char *s, size_t max)
{
    size_t  i, n;

    n = strlen(s);

    if (n == 0 || n > max) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if ((unsigned char) s[i] < ' ' || s[i] == 0x7f) {
            return 0;
        }
    }

    return 1;
}


/*
 * Writes a new key of the customer: mtr:key:{KH} and mtr:ckeys, then
 * projects.  kh (65) and prefix (13) are filled.  0 or an exit code.
 */
static int
meterctl_key_store(meter_redis_t *r, const char *cmd, const char *customer,
    const char *key, char *kh, char *prefix)
{
    char         err[512];
    redisReply  *rp;

    meter_sha256_hex(key, strlen(key), kh);
    snprintf(prefix, 13, "%.12s", key);

    rp = meter_redis_cmd(r, "HSET mtr:key:{%s} customer %s prefix %s "
                         "created %lld", kh, customer, prefix,
                         (long long) time(NULL));
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "SADD mtr:ckeys:{%s} %s", customer, kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (meter_gov_project(r, customer, err, sizeof(err)) != 0) {
        return meterctl_gov_failed(cmd, err);
    }

    return EX_OK;
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
meterctl_usage_keys(meterctl_opts_t *o, meter_redis_t *r)
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
    char         last[32], oldest[16], newest[16], sync_last[32];
    char         sync_ok[32];
    size_t       i;
    long long    nhours, lock;
    redisReply  *rp, *stats, *nocust, *sync;
    const char  *v, *sync_err;
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

    sync = meter_redis_cmd(r, "HGETALL %s", METERCTL_SYNC_KEY);
    if (!meter_reply_ok(sync)) {
        freeReplyObject(stats);
        return meterctl_redis_failed(r, sync);
    }

    v = meter_reply_hget(sync, "last");
    sync_last[0] = '\0';
    if (v != NULL) {
        meterctl_time(v, sync_last, sizeof(sync_last));
    }

    v = meter_reply_hget(sync, "ok");
    sync_ok[0] = '\0';
    if (v != NULL) {
        meterctl_time(v, sync_ok, sizeof(sync_ok));
    }

    sync_err = meter_reply_hget(sync, "error");
    if (sync_err != NULL && sync_err[0] == '\0') {
        sync_err = NULL;
    }

    nocust = meter_redis_cmd(r, "SMEMBERS %s", METER_W_NOCUST);
    if (!meter_reply_ok(nocust) || nocust->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(stats);
        freeReplyObject(sync);
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
        meterctl_json_field("last_sync", sync_last[0] ? sync_last : NULL, 0);
        meterctl_json_field("last_sync_ok", sync_ok[0] ? sync_ok : NULL, 0);
        meterctl_json_field("sync_error", sync_err, 0);

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
        printf("last delinquency sync: %s%s%s\n",
               sync_last[0] ? sync_last : "never",
               sync_err != NULL ? ", failed: " : "",
               sync_err != NULL ? sync_err : "");
        if (sync_ok[0] != '\0' && strcmp(sync_ok, sync_last) != 0) {
            printf("last successful sync: %s\n", sync_ok);
        }
    }

    freeReplyObject(stats);
    freeReplyObject(sync);

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

    /* Stripe: usage sent after its period's invoice was finalized
     * (provider_stripe.c, stripe.invoice_grace) */
    rp = meter_redis_cmd(r, "ZREVRANGE mtr:{worker}:stripe:late 0 9");
    if (meter_reply_ok(rp) && rp->type == REDIS_REPLY_ARRAY
        && rp->elements > 0 && !o->json)
    {
        printf("warning: %zu record%s sent after the invoice of %s period "
               "was finalized (Stripe bills %s on no invoice); latest:\n",
               rp->elements, rp->elements == 1 ? "" : "s",
               rp->elements == 1 ? "its" : "their",
               rp->elements == 1 ? "it" : "them");
        for (i = 0; i < rp->elements; i++) {
            printf("  late %s\n", rp->element[i]->str);
        }
    }

    freeReplyObject(rp);

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


/* customers */


static int
meterctl_open(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_connect(o, r);
}


static int
meterctl_strcmp(const void *a, const void *b)
{
    return strcmp(*(char * const *) a, *(char * const *) b);
}


/* the members of a set, sorted; NULL with an exit code in *rc */
static redisReply *
meterctl_sorted_set(meter_redis_t *r, const char *key, int *rc)
{
    redisReply  *rp;
    size_t       i;

    rp = meter_redis_cmd(r, "SMEMBERS %s", key);
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        *rc = meterctl_redis_failed(r, rp);
        return NULL;
    }

    for (i = 0; i < rp->elements; i++) {
        if (rp->element[i]->type != REDIS_REPLY_STRING) {
            fprintf(stderr, "meterctl: unexpected member type in %s\n", key);
            freeReplyObject(rp);
            *rc = EX_SOFTWARE;
            return NULL;
        }
    }

    /* the reply's strings are sorted by pointer to their elements */
    if (rp->elements > 1) {
        char  **s;

        s = malloc(rp->elements * sizeof(char *));
        if (s == NULL) {
            fprintf(stderr, "meterctl: out of memory\n");
            exit(EX_OSERR);
        }

        for (i = 0; i < rp->elements; i++) {
            s[i] = rp->element[i]->str;
        }

        qsort(s, rp->elements, sizeof(char *), meterctl_strcmp);

        for (i = 0; i < rp->elements; i++) {
            rp->element[i]->str = s[i];
            rp->element[i]->len = strlen(s[i]);
        }

        free(s);
    }

    return rp;
}


static int
meterctl_customers_list(meterctl_opts_t *o, meter_redis_t *r)
{
    char         key[96];
    size_t       i;
    int          rc;
    long long    nkeys;
    cJSON       *arr, *c;
    redisReply  *ids, *cust, *rp;
    const char  *id, *status, *reason;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl customers list: unexpected argument "
                "\"%s\"\n", o->args[0]);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    ids = meterctl_sorted_set(r, "mtr:customers", &rc);
    if (ids == NULL) {
        return rc;
    }

    arr = cJSON_CreateArray();

    if (!o->json) {
        printf("%-24s  %-10s  %-16s  %-9s  %4s  %s\n", "CUSTOMER", "STATUS",
               "REASON", "PROVIDER", "KEYS", "EMAIL");
    }

    for (i = 0; i < ids->elements; i++) {
        id = ids->element[i]->str;

        cust = meter_redis_cmd(r, "HGETALL mtr:cust:{%s}", id);
        if (!meter_reply_ok(cust)) {
            cJSON_Delete(arr);
            freeReplyObject(ids);
            return meterctl_redis_failed(r, cust);
        }

        snprintf(key, sizeof(key), "mtr:ckeys:{%s}", id);
        rp = meter_redis_cmd(r, "SCARD %s", key);
        nkeys = meter_reply_int(rp, 0);
        freeReplyObject(rp);

        status = meter_reply_hget(cust, "status");
        reason = meter_reply_hget(cust, "reason");
        if (status == NULL) {
            status = "active";
        }

        if (strcmp(status, "delinquent") != 0) {
            reason = NULL;
        }

        if (o->json) {
            c = cJSON_CreateObject();
            cJSON_AddStringToObject(c, "customer", id);
            cJSON_AddStringToObject(c, "status", status);
            meterctl_json_str(c, "reason", reason);
            meterctl_json_str(c, "source", meter_reply_hget(cust, "source"));
            meterctl_json_str(c, "provider",
                              meter_reply_hget(cust, "provider"));
            meterctl_json_str(c, "email", meter_reply_hget(cust, "email"));
            meterctl_json_str(c, "plan", meter_reply_hget(cust, "plan"));
            meterctl_json_int(c, "keys", nkeys);
            cJSON_AddItemToArray(arr, c);

        } else {
            printf("%-24s  %-10s  %-16s  %-9s  %4lld  %s\n", id, status,
                   reason ? reason : "-",
                   meter_reply_hget(cust, "provider")
                   ? meter_reply_hget(cust, "provider") : "-",
                   nkeys,
                   meter_reply_hget(cust, "email")
                   ? meter_reply_hget(cust, "email") : "-");
        }

        freeReplyObject(cust);
    }

    if (o->json) {
        meterctl_json_print(arr);
    }

    cJSON_Delete(arr);
    freeReplyObject(ids);

    return EX_OK;
}


/* the credit meters of a customer, from mtr:gov:credit fields "C|M" */
static redisReply *
meterctl_credit_fields(meter_redis_t *r, int *rc)
{
    redisReply  *rp;

    rp = meter_redis_cmd(r, "HKEYS mtr:gov:credit");
    if (!meter_reply_ok(rp) || rp->type != REDIS_REPLY_ARRAY) {
        *rc = meterctl_redis_failed(r, rp);
        return NULL;
    }

    return rp;
}


/* "C|M" field of this customer: the meter, or NULL */
static const char *
meterctl_credit_meter(const char *field, const char *customer)
{
    size_t  n;

    n = strlen(customer);

    if (strncmp(field, customer, n) == 0 && field[n] == '|'
        && meterctl_valid_meter(field + n + 1))
    {
        return field + n + 1;
    }

    return NULL;
}


/* credit rows of a customer: table or JSON array; an exit code */
static int
meterctl_credit_rows(meter_redis_t *r, const char *cmd, const char *customer,
    const char *only, cJSON *arr, int table)
{
    char         err[512];
    size_t       i;
    int          rc, n;
    int64_t      granted, left;
    cJSON       *c;
    redisReply  *fields;
    const char  *m;

    rc = EX_OK;
    fields = meterctl_credit_fields(r, &rc);
    if (fields == NULL) {
        return rc;
    }

    n = 0;

    for (i = 0; i < fields->elements; i++) {
        m = meterctl_credit_meter(fields->element[i]->str, customer);
        if (m == NULL || (only != NULL && strcmp(m, only) != 0)) {
            continue;
        }

        if (meter_gov_credit_left(r, customer, m, &granted, &left, err,
                                  sizeof(err))
            != 0)
        {
            freeReplyObject(fields);
            return meterctl_gov_failed(cmd, err);
        }

        if (granted < 0) {
            continue;
        }

        if (arr != NULL) {
            c = cJSON_CreateObject();
            cJSON_AddStringToObject(c, "meter", m);
            meterctl_json_int(c, "granted", granted);
            meterctl_json_int(c, "used", granted - left);
            meterctl_json_int(c, "left", left);
            cJSON_AddItemToArray(arr, c);

        } else if (table) {
            if (n == 0) {
                printf("  %-16s  %14s  %14s  %14s\n", "METER", "GRANTED",
                       "USED", "LEFT");
            }

            printf("  %-16s  %14" PRId64 "  %14" PRId64 "  %14" PRId64 "%s\n",
                   m, granted, granted - left, left,
                   left <= 0 ? "  (exhausted: 402)" : "");
        }

        n++;
    }

    freeReplyObject(fields);

    if (table && arr == NULL && n == 0) {
        printf("  none%s%s%s (usage not limited)\n",
               only ? " for meter \"" : "", only ? only : "",
               only ? "\"" : "");
    }

    return EX_OK;
}


/* one API key (prefix and hash, never the key): into arr, or a table row */

static void
meterctl_key_row(cJSON *arr, const char *indent, const char *kh,
    const redisReply *key)
{
    char         when[32], rev[32];
    cJSON       *k;
    const char  *created, *revoked, *prefix;

    created = meter_reply_hget(key, "created");
    revoked = meter_reply_hget(key, "revoked");
    prefix = meter_reply_hget(key, "prefix");

    if (arr != NULL) {
        k = cJSON_CreateObject();
        cJSON_AddStringToObject(k, "key_hash", kh);
        meterctl_json_str(k, "prefix", prefix);
        meterctl_json_int(k, "created",
                          created ? strtoll(created, NULL, 10) : 0);

        if (revoked != NULL) {
            meterctl_json_int(k, "revoked", strtoll(revoked, NULL, 10));

        } else {
            cJSON_AddNullToObject(k, "revoked");
        }

        cJSON_AddItemToArray(arr, k);
        return;
    }

    meterctl_time(created, when, sizeof(when));
    meterctl_time(revoked, rev, sizeof(rev));
    /* no prefix: an imported key (keys add), known by its hash only */
    printf("%s%-64s  %-12s  %-20s  %s\n", indent, kh,
           prefix ? prefix : "(imported)", when, rev);
}


static int
meterctl_customers_show(meterctl_opts_t *o, meter_redis_t *r)
{
    char          when[32], label[96];
    size_t        i, j;
    int           rc;
    cJSON        *out, *keys, *credit;
    redisReply   *cust, *kh, *key;
    const char   *id, *f, *status;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl customers show: expected one customer "
                "id\n");
        return EX_USAGE;
    }

    id = o->args[0];

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl customers show: invalid customer id "
                "\"%s\" ([A-Za-z0-9_.-]{1,64})\n", id);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "customers show", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    cust = meter_redis_cmd(r, "HGETALL mtr:cust:{%s}", id);
    if (!meter_reply_ok(cust) || cust->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, cust);
    }

    snprintf(label, sizeof(label), "mtr:ckeys:{%s}", id);
    kh = meterctl_sorted_set(r, label, &rc);

    if (kh == NULL) {
        freeReplyObject(cust);
        return rc;
    }

    status = meter_reply_hget(cust, "status");
    if (status == NULL) {
        status = "active";
    }

    out = cJSON_CreateObject();
    keys = cJSON_CreateArray();
    credit = cJSON_CreateArray();

    if (o->json) {
        cJSON_AddStringToObject(out, "customer", id);

        for (j = 0; j + 1 < cust->elements; j += 2) {
            f = cust->element[j]->str;

            if (strcmp(f, "created") == 0 || strcmp(f, "since") == 0
                || strcmp(f, "status_at") == 0)
            {
                meterctl_json_int(out, f,
                                  strtoll(cust->element[j + 1]->str, NULL,
                                          10));

            } else if (cJSON_GetObjectItemCaseSensitive(out, f) == NULL) {
                cJSON_AddStringToObject(out, f, cust->element[j + 1]->str);
            }
        }

        if (cJSON_GetObjectItemCaseSensitive(out, "status") == NULL) {
            cJSON_AddStringToObject(out, "status", "active");
        }

    } else {
        printf("%-18s %s\n", "customer:", id);
        printf("%-18s %s", "status:", status);
        if (strcmp(status, "delinquent") == 0) {
            meterctl_time(meter_reply_hget(cust, "since"), when,
                          sizeof(when));
            printf(" (%s, since %s, set by %s)",
                   meter_reply_hget(cust, "reason")
                   ? meter_reply_hget(cust, "reason") : "?", when,
                   meter_reply_hget(cust, "source")
                   ? meter_reply_hget(cust, "source") : "?");
        }
        printf("\n");

        for (j = 0; j + 1 < cust->elements; j += 2) {
            f = cust->element[j]->str;

            if (strcmp(f, "status") == 0 || strcmp(f, "reason") == 0
                || strcmp(f, "since") == 0 || strcmp(f, "source") == 0)
            {
                continue;
            }

            if (strcmp(f, "created") == 0 || strcmp(f, "status_at") == 0) {
                meterctl_time(cust->element[j + 1]->str, when, sizeof(when));
                snprintf(label, sizeof(label), "%s:", f);
                printf("%-18s %s\n", label, when);
                continue;
            }

            snprintf(label, sizeof(label), "%s:", f);
            printf("%-18s %s\n", label, cust->element[j + 1]->str);
        }

        printf("keys: %zu\n", kh->elements);
        if (kh->elements > 0) {
            printf("  %-64s  %-12s  %-20s  %s\n", "KEY_HASH", "PREFIX",
                   "CREATED", "REVOKED");
        }
    }

    for (i = 0; i < kh->elements; i++) {
        key = meter_redis_cmd(r, "HGETALL mtr:key:{%s}", kh->element[i]->str);
        if (!meter_reply_ok(key)) {
            cJSON_Delete(out);
            cJSON_Delete(keys);
            cJSON_Delete(credit);
            freeReplyObject(kh);
            freeReplyObject(cust);
            return meterctl_redis_failed(r, key);
        }

        meterctl_key_row(o->json ? keys : NULL, "  ", kh->element[i]->str,
                         key);

        freeReplyObject(key);
    }

    freeReplyObject(kh);
    freeReplyObject(cust);

    if (!o->json) {
        printf("credit:\n");
    }

    rc = meterctl_credit_rows(r, "customers show", id, NULL,
                              o->json ? credit : NULL, !o->json);

    if (rc == EX_OK && o->json) {
        cJSON_AddItemToObject(out, "keys", keys);
        cJSON_AddItemToObject(out, "credit", credit);
        keys = NULL;
        credit = NULL;
        meterctl_json_print(out);
    }

    cJSON_Delete(keys);
    cJSON_Delete(credit);
    cJSON_Delete(out);

    return rc;
}


static int
meterctl_customers_add(meterctl_opts_t *o, meter_redis_t *r)
{
    const char  *argv[64];
    size_t       argl[64];
    char         now[24], item[16][64], key[96], err[512];
    const char  *id, *eq;
    int          argc, i, rc;
    redisReply  *rp;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl customers add: expected one customer id\n");
        return EX_USAGE;
    }

    id = o->args[0];

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl customers add: invalid customer id \"%s\" "
                "([A-Za-z0-9_.-]{1,64})\n", id);
        return EX_DATAERR;
    }

    if (o->provider != NULL
        && strcmp(o->provider, "file") != 0
        && strcmp(o->provider, "stripe") != 0
        && strcmp(o->provider, "chargebee") != 0
        && strcmp(o->provider, "recurly") != 0
        && strcmp(o->provider, "http") != 0
        && strcmp(o->provider, "metronome") != 0)
    {
        fprintf(stderr, "meterctl customers add: unknown --provider \"%s\" "
                "(file, stripe, chargebee, recurly, http, metronome)\n",
                o->provider);
        return EX_USAGE;
    }

    if ((o->email != NULL && !meterctl_valid_email(o->email))
        || (o->name != NULL && !meterctl_valid_text(o->name, 200))
        || (o->plan != NULL && !meterctl_valid_text(o->plan, 64))
        || (o->provider_customer != NULL
            && !meterctl_valid_text(o->provider_customer, 127))
        || (o->subscription != NULL
            && !meterctl_valid_text(o->subscription, 127)))
    {
        fprintf(stderr, "meterctl customers add: invalid --email, --name, "
                "--plan, --provider-customer or --subscription (empty, too "
                "long or control characters)\n");
        return EX_USAGE;
    }

    for (i = 0; i < o->nitems; i++) {
        eq = strchr(o->items[i], '=');
        snprintf(item[i], sizeof(item[i]), "%.*s", (int) (eq - o->items[i]),
                 o->items[i]);
        if (!meterctl_valid_meter(item[i])) {
            fprintf(stderr, "meterctl customers add: invalid meter in "
                    "--item \"%s\"\n", o->items[i]);
            return EX_USAGE;
        }
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    snprintf(key, sizeof(key), "mtr:cust:{%s}", id);

    /* Lago requires external_subscription_id (getlago/lago-openapi
     * src/schemas/EventInputObject.yaml): no fallback to another id */
    if (o->subscription == NULL && o->cf != NULL
        && strcmp(o->cf->provider, "http") == 0
        && (o->provider == NULL || strcmp(o->provider, "http") == 0)
        && meter_conf_get(o->cf, "http.format") != NULL
        && strcmp(meter_conf_get(o->cf, "http.format"), "lago") == 0)
    {
        rp = meter_redis_cmd(r, "HEXISTS %s subscription", key);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        if (meter_reply_int(rp, 0) == 0) {
            freeReplyObject(rp);
            fprintf(stderr, "meterctl customers add: Lago requires a "
                    "subscription (external_subscription_id): give "
                    "--subscription ID\n");
            return EX_USAGE;
        }

        freeReplyObject(rp);
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

    if (o->provider_customer != NULL) {
        rp = meter_redis_cmd(r, "HSET mtr:bypc %s %s", o->provider_customer,
                             id);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    if (o->subscription != NULL) {
        rp = meter_redis_cmd(r, "HSET mtr:bysub %s %s", o->subscription, id);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    if (meter_gov_project(r, id, err, sizeof(err)) != 0) {
        return meterctl_gov_failed("customers add", err);
    }

    printf("customer %s saved\n", id);

    return EX_OK;
}


/* keys */


static int
meterctl_keys_list(meterctl_opts_t *o, meter_redis_t *r)
{
    char         ck[96];
    size_t       i;
    int          rc;
    cJSON       *arr;
    redisReply  *kh, *key;
    const char  *id;

    if (o->nargs != 1 && !(o->nargs == 0 && o->customer != NULL)) {
        fprintf(stderr, "meterctl keys list: expected one customer id\n");
        return EX_USAGE;
    }

    id = o->nargs == 1 ? o->args[0] : o->customer;

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl keys list: invalid customer id \"%s\"\n",
                id);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "keys list", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    snprintf(ck, sizeof(ck), "mtr:ckeys:{%s}", id);
    kh = meterctl_sorted_set(r, ck, &rc);
    if (kh == NULL) {
        return rc;
    }

    arr = cJSON_CreateArray();

    if (!o->json) {
        printf("%-64s  %-12s  %-20s  %s\n", "KEY_HASH", "PREFIX", "CREATED",
               "REVOKED");
    }

    for (i = 0; i < kh->elements; i++) {
        key = meter_redis_cmd(r, "HGETALL mtr:key:{%s}", kh->element[i]->str);
        if (!meter_reply_ok(key)) {
            cJSON_Delete(arr);
            freeReplyObject(kh);
            return meterctl_redis_failed(r, key);
        }

        meterctl_key_row(o->json ? arr : NULL, "", kh->element[i]->str,
                         key);

        freeReplyObject(key);
    }

    if (o->json) {
        meterctl_json_print(arr);
    }

    cJSON_Delete(arr);
    freeReplyObject(kh);

    return EX_OK;
}


static int
meterctl_keys_add(meterctl_opts_t *o, meter_redis_t *r)
{
    char         kh[65], line[8192], old[72], err[512];
    const char  *key;
    size_t       n;
    int          rc;
    redisReply  *rp;

    if ((o->hash == NULL && o->nargs != 1)
        || (o->hash != NULL && o->nargs != 0)
        || o->customer == NULL)
    {
        fprintf(stderr, "meterctl keys add: expected \"KEY|- --customer ID\" "
                "or \"--hash KEY_HASH --customer ID\"\n");
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->customer)) {
        fprintf(stderr, "meterctl keys add: invalid customer id \"%s\"\n",
                o->customer);
        return EX_DATAERR;
    }

    if (o->hash != NULL
        && (strlen(o->hash) != 64
            || strspn(o->hash, "0123456789abcdef") != 64))
    {
        fprintf(stderr, "meterctl keys add: --hash must be 64 lowercase hex "
                "chars\n");
        return EX_DATAERR;
    }

    line[0] = '\0';

    if (o->hash != NULL) {
        memcpy(kh, o->hash, 65);

    } else {
        key = o->args[0];

        if (strcmp(key, "-") == 0) {
            if (fgets(line, sizeof(line), stdin) == NULL) {
                fprintf(stderr, "meterctl keys add: no key on stdin\n");
                return EX_DATAERR;
            }

            line[strcspn(line, "\r\n")] = '\0';
            key = line;
        }

        n = strlen(key);
        if (n == 0) {
            fprintf(stderr, "meterctl keys add: empty key\n");
            return EX_DATAERR;
        }

        /*
         * No prefix of an imported key is stored: next to its unsalted
         * SHA-256 it shrinks the search (a 16-character key was recovered
         * from Redis in 21 s).  Only generated keys, 160 random bits after
         * "mk_live_", get a display prefix.
         */
        meter_sha256_hex(key, n, kh);
        explicit_bzero(line, sizeof(line));
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "keys add", o->customer);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
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

    /* a prefix left by an earlier meterctl that stored one goes too */
    rp = meter_redis_cmd(r, "HDEL mtr:key:{%s} prefix", kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "HSET mtr:key:{%s} customer %s created %lld",
                         kh, o->customer, (long long) time(NULL));

    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (old[0] != '\0' && strcmp(old, o->customer) != 0) {
        /* the key moves to another customer */
        rp = meter_redis_cmd(r, "SREM mtr:ckeys:{%s} %s", old, kh);
        freeReplyObject(rp);
        if (meter_gov_project(r, old, err, sizeof(err)) != 0) {
            return meterctl_gov_failed("keys add", err);
        }
    }

    rp = meter_redis_cmd(r, "SADD mtr:ckeys:{%s} %s", o->customer, kh);
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (meter_gov_project(r, o->customer, err, sizeof(err)) != 0) {
        return meterctl_gov_failed("keys add", err);
    }

    printf("%s\n", kh);

    return EX_OK;
}


/*
 * A key named by its hash (64 hex), its display prefix ("mk_live_ab12") or
 * the start of its hash (8+ hex chars): kh and customer filled, or an exit
 * code after a message.
 */
static int
meterctl_key_resolve(meter_redis_t *r, const char *cmd, const char *arg,
    char *kh, char *customer, size_t size)
{
    char         ck[96];
    size_t       i, j, n, alen;
    int          rc, hex;
    redisReply  *ids, *keys, *rp;

    alen = strlen(arg);
    hex = (alen >= 8 && alen <= 64
           && strspn(arg, "0123456789abcdef") == alen);

    if (alen == 64 && hex) {
        rp = meter_redis_cmd(r, "HGET mtr:key:{%s} customer", arg);
        if (!meter_reply_ok(rp)) {
            return meterctl_redis_failed(r, rp);
        }

        if (rp->type != REDIS_REPLY_STRING) {
            freeReplyObject(rp);
            fprintf(stderr, "meterctl %s: no key with hash %s\n", cmd, arg);
            return EX_DATAERR;
        }

        memcpy(kh, arg, 65);
        snprintf(customer, size, "%s", rp->str);
        freeReplyObject(rp);

        return EX_OK;
    }

    if (alen == 0 || alen > 64) {
        fprintf(stderr, "meterctl %s: \"%s\" is neither a key hash nor a key "
                "prefix\n", cmd, arg);
        return EX_DATAERR;
    }

    /* no index by prefix: walk the customers' keys (an admin command) */
    ids = meterctl_sorted_set(r, "mtr:customers", &rc);
    if (ids == NULL) {
        return rc;
    }

    n = 0;

    for (i = 0; i < ids->elements; i++) {
        snprintf(ck, sizeof(ck), "mtr:ckeys:{%s}", ids->element[i]->str);
        keys = meterctl_sorted_set(r, ck, &rc);
        if (keys == NULL) {
            freeReplyObject(ids);
            return rc;
        }

        for (j = 0; j < keys->elements; j++) {
            if (hex && strncmp(keys->element[j]->str, arg, alen) == 0) {
                goto found;
            }

            rp = meter_redis_cmd(r, "HGET mtr:key:{%s} prefix",
                                 keys->element[j]->str);
            if (!meter_reply_ok(rp)) {
                freeReplyObject(keys);
                freeReplyObject(ids);
                return meterctl_redis_failed(r, rp);
            }

            if (rp->type != REDIS_REPLY_STRING || strcmp(rp->str, arg) != 0) {
                freeReplyObject(rp);
                continue;
            }

            freeReplyObject(rp);

        found:

            if (n++ == 0) {
                snprintf(kh, 65, "%s", keys->element[j]->str);
                snprintf(customer, size, "%s", ids->element[i]->str);

            } else {
                if (n == 2) {
                    fprintf(stderr, "meterctl %s: \"%s\" matches several "
                            "keys; give the key hash:\n  %s (%s)\n", cmd, arg,
                            kh, customer);
                }

                fprintf(stderr, "  %s (%s)\n", keys->element[j]->str,
                        ids->element[i]->str);
            }
        }

        freeReplyObject(keys);
    }

    freeReplyObject(ids);

    if (n == 0) {
        fprintf(stderr, "meterctl %s: no key with prefix or hash \"%s\" (see "
                "\"meterctl keys list CUSTOMER\")\n", cmd, arg);
        return EX_DATAERR;
    }

    return n == 1 ? EX_OK : EX_DATAERR;
}


static int
meterctl_revoke(meter_redis_t *r, const char *cmd, const char *kh,
    const char *customer)
{
    char         err[512];
    redisReply  *rp;

    /* the first revocation time stays */
    rp = meter_redis_cmd(r, "HSETNX mtr:key:{%s} revoked %lld", kh,
                         (long long) time(NULL));
    if (!meter_reply_ok(rp)) {
        return meterctl_redis_failed(r, rp);
    }

    freeReplyObject(rp);

    if (meter_gov_project(r, customer, err, sizeof(err)) != 0) {
        return meterctl_gov_failed(cmd, err);
    }

    return EX_OK;
}


static int
meterctl_keys_revoke(meterctl_opts_t *o, meter_redis_t *r)
{
    char  kh[65], customer[72];
    int   rc;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl keys revoke: expected one KEY_HASH or "
                "PREFIX\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_key_resolve(r, "keys revoke", o->args[0], kh, customer,
                              sizeof(customer));
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_revoke(r, "keys revoke", kh, customer);
    if (rc != EX_OK) {
        return rc;
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"key_hash\":\"%s\",\"revoked\":true}\n",
               customer, kh);

    } else {
        printf("key %s of customer %s revoked; nginx answers it like an "
               "unknown key after its next governance refresh\n", kh,
               customer);
    }

    return EX_OK;
}


static int
meterctl_keys_rotate(meterctl_opts_t *o, meter_redis_t *r)
{
    char  kh[65], customer[72], key[METERCTL_KEY_LEN + 1], nkh[65];
    char  prefix[13];
    int   rc;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl keys rotate: expected one KEY_HASH or "
                "PREFIX\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_key_resolve(r, "keys rotate", o->args[0], kh, customer,
                              sizeof(customer));
    if (rc != EX_OK) {
        return rc;
    }

    if (meterctl_key_new(key) != 0) {
        fprintf(stderr, "meterctl keys rotate: the OpenSSL random generator "
                "failed; nothing changed\n");
        return EX_OSERR;
    }

    /* the new key works before the old one stops */
    rc = meterctl_key_store(r, "keys rotate", customer, key, nkh, prefix);
    if (rc == EX_OK) {
        rc = meterctl_revoke(r, "keys rotate", kh, customer);
    }

    if (rc != EX_OK) {
        memset(key, 0, sizeof(key));
        return rc;
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"key\":\"%s\",\"key_hash\":\"%s\","
               "\"prefix\":\"%s\",\"revoked\":\"%s\"}\n", customer, key, nkh,
               prefix, kh);

    } else {
        printf("customer %s: key %s revoked\n", customer, kh);
        printf("new API key (shown once, store it now):\n%s\n", key);
    }

    memset(key, 0, sizeof(key));

    return EX_OK;
}


/* delinquent */


static int
meterctl_delinquent_run(meterctl_opts_t *o, meter_redis_t *r, int set)
{
    char         err[512];
    const char  *cmd, *reason;
    int          rc;

    cmd = set ? "delinquent set" : "delinquent clear";

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl %s: expected one customer id\n", cmd);
        return EX_USAGE;
    }

    reason = o->reason != NULL ? o->reason : "invoice_overdue";

    if (set && strcmp(reason, "invoice_overdue") != 0
        && strcmp(reason, "credit_exhausted") != 0)
    {
        fprintf(stderr, "meterctl %s: invalid --reason \"%s\" "
                "(invoice_overdue or credit_exhausted)\n", cmd, reason);
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->args[0])) {
        fprintf(stderr, "meterctl %s: invalid customer id \"%s\"\n", cmd,
                o->args[0]);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meter_gov_set_status(r, o->args[0], set, set ? reason : NULL,
                              "manual", 0, err, sizeof(err));
    if (rc == -1) {
        return meterctl_gov_failed(cmd, err);
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"status\":\"%s\",\"changed\":%s}\n",
               o->args[0], set ? "delinquent" : "active",
               rc == 1 ? "true" : "false");

    } else if (rc == 1) {
        printf("customer %s is now %s%s%s; its keys %s after nginx's next "
               "governance refresh\n", o->args[0],
               set ? "delinquent (" : "active", set ? reason : "",
               set ? ")" : "", set ? "get 402" : "are served again");

    } else {
        printf("customer %s: nothing changed (already %s: see "
               "\"meterctl customers show %s\")\n",
               o->args[0], set ? "delinquent" : "active", o->args[0]);
    }

    return EX_OK;
}


static int
meterctl_delinquent_set(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_delinquent_run(o, r, 1);
}


static int
meterctl_delinquent_clear(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_delinquent_run(o, r, 0);
}


/* credit */


static int
meterctl_amount(const char *cmd, const char *s, int64_t *v)
{
    char       *end;
    long long   n;

    errno = 0;
    n = strtoll(s, &end, 10);

    if (errno != 0 || end == s || *end != '\0') {
        fprintf(stderr, "meterctl %s: invalid AMOUNT \"%s\" (an integer)\n",
                cmd, s);
        return -1;
    }

    *v = n;

    return 0;
}


static int
meterctl_credit_change(meterctl_opts_t *o, meter_redis_t *r, int set)
{
    char         err[512];
    const char  *cmd;
    int64_t      amount, granted, left;
    int          rc;

    cmd = set ? "credit set" : "credit add";

    if (o->nargs != 2 || o->meter == NULL) {
        fprintf(stderr, "meterctl %s: expected \"CUSTOMER --meter NAME "
                "AMOUNT\"\n", cmd);
        return EX_USAGE;
    }

    if (meterctl_amount(cmd, o->args[1], &amount) != 0) {
        return EX_USAGE;
    }

    if (set && amount < 0) {
        fprintf(stderr, "meterctl %s: AMOUNT must not be negative\n", cmd);
        return EX_USAGE;
    }

    if (!meterctl_valid_meter(o->meter)) {
        fprintf(stderr, "meterctl %s: invalid --meter \"%s\" "
                "([A-Za-z0-9_.-]{1,32})\n", cmd, o->meter);
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->args[0])) {
        fprintf(stderr, "meterctl %s: invalid customer id \"%s\"\n", cmd,
                o->args[0]);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, cmd, o->args[0]);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    rc = set ? meter_gov_credit_set(r, o->args[0], o->meter, amount, err,
                                    sizeof(err))
             : meter_gov_credit_add(r, o->args[0], o->meter, amount, err,
                                    sizeof(err));
    if (rc != 0
        || meter_gov_credit_left(r, o->args[0], o->meter, &granted, &left,
                                 err, sizeof(err))
           != 0)
    {
        return meterctl_gov_failed(cmd, err);
    }

    if (o->json) {
        printf("{\"customer\":\"%s\",\"meter\":\"%s\",\"granted\":%" PRId64
               ",\"used\":%" PRId64 ",\"left\":%" PRId64 "}\n", o->args[0],
               o->meter, granted, granted - left, left);

    } else {
        printf("customer %s, meter %s: %" PRId64 " left (granted %" PRId64
               ", used %" PRId64 ")\n", o->args[0], o->meter, left, granted,
               granted - left);
    }

    return EX_OK;
}


static int
meterctl_credit_set(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_credit_change(o, r, 1);
}


static int
meterctl_credit_add(meterctl_opts_t *o, meter_redis_t *r)
{
    return meterctl_credit_change(o, r, 0);
}


static int
meterctl_credit_show(meterctl_opts_t *o, meter_redis_t *r)
{
    int     rc;
    cJSON  *arr;

    if (o->nargs != 1) {
        fprintf(stderr, "meterctl credit show: expected one customer id\n");
        return EX_USAGE;
    }

    if (o->meter != NULL && !meterctl_valid_meter(o->meter)) {
        fprintf(stderr, "meterctl credit show: invalid --meter \"%s\"\n",
                o->meter);
        return EX_USAGE;
    }

    if (!meterctl_valid_id(o->args[0])) {
        fprintf(stderr, "meterctl credit show: invalid customer id \"%s\"\n",
                o->args[0]);
        return EX_DATAERR;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "credit show", o->args[0]);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    arr = o->json ? cJSON_CreateArray() : NULL;

    if (!o->json) {
        printf("customer %s, prepaid credit:\n", o->args[0]);
    }

    rc = meterctl_credit_rows(r, "credit show", o->args[0], o->meter, arr,
                              !o->json);

    if (rc == EX_OK && arr != NULL) {
        meterctl_json_print(arr);
    }

    cJSON_Delete(arr);

    return rc;
}


/* register */


static int
meterctl_reg_failed(meter_redis_t *r, redisReply *rp, const char *customer)
{
    meterctl_redis_failed(r, rp);
    fprintf(stderr, "meterctl register: the registration of customer %s is "
            "incomplete; run the same command again to complete it\n",
            customer);

    return EX_TEMPFAIL;
}


/* HSET of field/value pairs (NULL values skipped); a reply or NULL */
static redisReply *
meterctl_hset(meter_redis_t *r, const char *key, const char **fv, int n)
{
    const char  *argv[48];
    size_t       argl[48];
    int          argc, i;

    argc = 0;
    argv[argc] = "HSET";
    argl[argc++] = 4;
    argv[argc] = key;
    argl[argc++] = strlen(key);

    for (i = 0; i + 1 < n && argc + 2 <= 48; i += 2) {
        if (fv[i + 1] == NULL || fv[i + 1][0] == '\0') {
            continue;
        }

        argv[argc] = fv[i];
        argl[argc++] = strlen(fv[i]);
        argv[argc] = fv[i + 1];
        argl[argc++] = strlen(fv[i + 1]);
    }

    if (argc == 2) {
        return meter_redis_cmd(r, "EXISTS %s", key);
    }

    return meter_redis_argv(r, argc, argv, argl);
}


static int
meterctl_register(meterctl_opts_t *o, meter_redis_t *r)
{
    char                     id[72], email[256], now[24], reg[96];
    char                     cust[96], kh[65], prefix[13], when[32];
    char                     key[METERCTL_KEY_LEN + 1], err[1024];
    char                     item[8][48];
    const char              *pname, *plan, *v, *fv[48];
    const char              *pc, *sub;
    size_t                   i;
    int                      rc, n, exists, onboarded;
    cJSON                   *out;
    redisReply              *rg, *rp;
    meter_provider_t         p;
    meter_onboard_t          in;
    meter_send_e             st;
    meter_send_result_t      res;
    meter_onboard_result_t   ob;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl register: unexpected argument \"%s\"\n",
                o->args[0]);
        return EX_USAGE;
    }

    if (o->email == NULL) {
        fprintf(stderr, "meterctl register: --email is required\n");
        return EX_USAGE;
    }

    if (!meterctl_valid_email(o->email)) {
        fprintf(stderr, "meterctl register: invalid --email \"%s\"\n",
                o->email);
        return EX_USAGE;
    }

    if ((o->name != NULL && !meterctl_valid_text(o->name, 200))
        || (o->plan != NULL && !meterctl_valid_text(o->plan, 64)))
    {
        fprintf(stderr, "meterctl register: invalid --name or --plan (empty, "
                "too long or control characters)\n");
        return EX_USAGE;
    }

    if (o->customer != NULL && !meterctl_valid_id(o->customer)) {
        fprintf(stderr, "meterctl register: invalid --customer \"%s\" "
                "([A-Za-z0-9_.-]{1,64})\n", o->customer);
        return EX_USAGE;
    }

    for (i = 0; i < sizeof(email) - 1 && o->email[i] != '\0'; i++) {
        email[i] = (char) tolower((unsigned char) o->email[i]);
    }

    email[i] = '\0';

    if (o->customer != NULL) {
        snprintf(id, sizeof(id), "%s", o->customer);

    } else {
        meterctl_customer_of_email(email, id, sizeof(id));
    }

    plan = o->plan != NULL ? o->plan : "default";
    pname = (o->cf != NULL) ? o->cf->provider : "file";

    memset(&p, 0, sizeof(meter_provider_t));

    if (meter_provider_by_name(pname, &p) != 0) {
        fprintf(stderr, "meterctl register: unknown provider \"%s\" in %s\n",
                pname, o->cf != NULL ? o->cf->path : "the config");
        return EX_CONFIG;
    }

    if (strcmp(pname, "file") != 0 && p.onboard == NULL) {
        fprintf(stderr, "meterctl register: provider \"%s\" does not support "
                "registration yet.  Create the customer and its subscription "
                "in %s, then run \"meterctl customers add ID --provider %s "
                "--provider-customer ID --subscription ID\" and \"meterctl "
                "keys add\".\n", pname, pname, pname);
        return EX_UNAVAILABLE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    snprintf(reg, sizeof(reg), "mtr:reg:{%s}", id);
    snprintf(cust, sizeof(cust), "mtr:cust:{%s}", id);
    snprintf(now, sizeof(now), "%lld", (long long) time(NULL));

    rg = meter_redis_cmd(r, "HGETALL %s", reg);
    if (!meter_reply_ok(rg) || rg->type != REDIS_REPLY_ARRAY) {
        return meterctl_redis_failed(r, rg);
    }

    rp = meter_redis_cmd(r, "EXISTS %s", cust);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_redis_failed(r, rp);
    }

    exists = (meter_reply_int(rp, 0) == 1);
    freeReplyObject(rp);

    if (rg->elements == 0 && exists) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: customer %s already exists and "
                "was not created by \"register\"; give it a key with "
                "\"meterctl keys add KEY --customer %s\"\n", id, id);
        return EX_DATAERR;
    }

    v = meter_reply_hget(rg, "email");
    if (v != NULL && strcmp(v, email) != 0) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: customer id %s is already being "
                "registered for another email; choose another --customer\n",
                id);
        return EX_DATAERR;
    }

    v = meter_reply_hget(rg, "provider");
    if (v != NULL && strcmp(v, pname) != 0) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: customer %s was started with "
                "provider \"%s\", the config now says \"%s\"; finish it with "
                "the old config or choose another --customer\n", id, v,
                pname);
        return EX_DATAERR;
    }

    /*
     * A key hash in the registration: if the key reached mtr:ckeys, it may
     * have been printed and is never shown again; if not, the earlier run
     * stopped before printing it, and it is replaced below.
     */
    v = meter_reply_hget(rg, "key_hash");
    if (v != NULL) {
        rp = meter_redis_cmd(r, "SISMEMBER mtr:ckeys:{%s} %s", id, v);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_redis_failed(r, rp);
        }

        n = (int) meter_reply_int(rp, 0);
        freeReplyObject(rp);

        rp = meter_redis_cmd(r, n == 1 ? "HGETALL mtr:key:{%s}"
                                       : "DEL mtr:key:{%s}", v);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_redis_failed(r, rp);
        }

        if (n == 1) {
            meterctl_time(meter_reply_hget(rp, "created"), when,
                          sizeof(when));
            fprintf(stderr, "meterctl register: %s is already registered as "
                    "customer %s; its key %s... was issued at %s and is "
                    "never shown again.  If it was lost (an earlier run "
                    "stopped before printing it), issue a new one with "
                    "\"meterctl keys rotate %s\"\n", email, id,
                    meter_reply_hget(rp, "prefix")
                    ? meter_reply_hget(rp, "prefix") : "?", when, v);
            freeReplyObject(rp);

            /* finish what the earlier run may have left */
            rp = meter_redis_cmd(r, "HSET %s state done", reg);
            freeReplyObject(rp);
            freeReplyObject(rg);

            if (meter_gov_project(r, id, err, sizeof(err)) != 0) {
                return meterctl_gov_failed("register", err);
            }

            return EX_DATAERR;
        }

        freeReplyObject(rp);
    }

    /* 1. the pending registration: what a retry continues from */
    if (rg->elements == 0) {
        n = 0;
        fv[n++] = "state"; fv[n++] = "pending";
        fv[n++] = "email"; fv[n++] = email;
        fv[n++] = "name"; fv[n++] = o->name;
        fv[n++] = "plan"; fv[n++] = plan;
        fv[n++] = "provider"; fv[n++] = pname;
        fv[n++] = "created"; fv[n++] = now;

        rp = meterctl_hset(r, reg, fv, n);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_redis_failed(r, rp);
        }

        freeReplyObject(rp);
    }

    /* 2. the provider's customer and subscription */
    memset(&ob, 0, sizeof(meter_onboard_result_t));
    pc = meter_reply_hget(rg, "provider_customer");
    sub = meter_reply_hget(rg, "subscription");
    onboarded = (sub != NULL || strcmp(pname, "file") == 0);

    if (!onboarded) {
        if (p.init != NULL && p.init(&p, o->cf, err, sizeof(err)) != 0) {
            freeReplyObject(rg);
            fprintf(stderr, "meterctl register: provider %s: %s\n", pname,
                    err);
            return EX_CONFIG;
        }

        in.customer = id;
        in.email = email;
        in.name = o->name;
        in.plan = plan;

        memset(&res, 0, sizeof(meter_send_result_t));
        st = p.onboard(&p, &in, &ob, &res);

        if (p.cleanup != NULL) {
            p.cleanup(&p);
        }

        if (st != METER_SEND_OK || ob.provider_customer[0] == '\0'
            || ob.subscription[0] == '\0')
        {
            freeReplyObject(rg);
            fprintf(stderr, "meterctl register: provider %s: %s\n", pname,
                    st == METER_SEND_OK ? "no customer or subscription id "
                    "in the answer" : res.error);
            fprintf(stderr, "meterctl register: customer %s is not "
                    "registered yet; %s\n", id,
                    st == METER_SEND_FATAL
                    ? "fix the cause above, then run the same command again "
                      "(it continues where it stopped)"
                    : "run the same command again to complete it (nothing is "
                      "created twice)");
            return st == METER_SEND_FATAL ? EX_UNAVAILABLE : EX_TEMPFAIL;
        }

        n = 0;
        fv[n++] = "provider_customer"; fv[n++] = ob.provider_customer;
        fv[n++] = "subscription"; fv[n++] = ob.subscription;

        for (i = 0; i < (size_t) ob.nitems && i < 8; i++) {
            snprintf(item[i], sizeof(item[i]), "item.%s", ob.item_meter[i]);
            fv[n++] = item[i];
            fv[n++] = ob.item_id[i];
        }

        fv[n++] = "state"; fv[n++] = "provisioned";

        rp = meterctl_hset(r, reg, fv, n);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_reg_failed(r, rp, id);
        }

        freeReplyObject(rp);

        pc = ob.provider_customer;
        sub = ob.subscription;
    }

    /* 3. our customer record, from the registration */
    rp = meter_redis_cmd(r, "HSETNX %s status active", cust);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "HSETNX %s created %s", cust, now);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    n = 0;
    fv[n++] = "email"; fv[n++] = email;
    fv[n++] = "name"; fv[n++] = o->name;
    fv[n++] = "plan"; fv[n++] = plan;
    fv[n++] = "provider"; fv[n++] = pname;
    fv[n++] = "provider_customer"; fv[n++] = pc;
    fv[n++] = "subscription"; fv[n++] = sub;

    for (i = 0; i + 1 < rg->elements && n + 2 <= 46; i += 2) {
        if (strncmp(rg->element[i]->str, "item.", 5) == 0) {
            fv[n++] = rg->element[i]->str;
            fv[n++] = rg->element[i + 1]->str;
        }
    }

    for (i = 0; i < (size_t) ob.nitems && i < 8 && n + 2 <= 46; i++) {
        fv[n++] = item[i];
        fv[n++] = ob.item_id[i];
    }

    rp = meterctl_hset(r, cust, fv, n);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    rp = meter_redis_cmd(r, "SADD mtr:customers %s", id);
    if (!meter_reply_ok(rp)) {
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    if (pc != NULL) {
        rp = meter_redis_cmd(r, "HSET mtr:bypc %s %s", pc, id);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_reg_failed(r, rp, id);
        }

        freeReplyObject(rp);
    }

    if (sub != NULL) {
        rp = meter_redis_cmd(r, "HSET mtr:bysub %s %s", sub, id);
        if (!meter_reply_ok(rp)) {
            freeReplyObject(rg);
            return meterctl_reg_failed(r, rp, id);
        }

        freeReplyObject(rp);
    }

    /* 4. the key, last: made only now, stored as its hash, shown once */
    if (meterctl_key_new(key) != 0) {
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: the OpenSSL random generator "
                "failed; run the same command again\n");
        return EX_OSERR;
    }

    meter_sha256_hex(key, strlen(key), kh);

    rp = meter_redis_cmd(r, "HSET %s key_hash %s state keyed", reg, kh);
    if (!meter_reply_ok(rp)) {
        memset(key, 0, sizeof(key));
        freeReplyObject(rg);
        return meterctl_reg_failed(r, rp, id);
    }

    freeReplyObject(rp);

    rc = meterctl_key_store(r, "register", id, key, kh, prefix);
    if (rc != EX_OK) {
        /* the key hash in mtr:reg without mtr:key: a retry makes a new key */
        memset(key, 0, sizeof(key));
        freeReplyObject(rg);
        fprintf(stderr, "meterctl register: run the same command again to "
                "complete the registration of customer %s\n", id);
        return rc == EX_UNAVAILABLE ? EX_TEMPFAIL : rc;
    }

    rp = meter_redis_cmd(r, "HSET %s state done", reg);
    freeReplyObject(rp);

    if (o->json) {
        out = cJSON_CreateObject();
        cJSON_AddStringToObject(out, "customer", id);
        cJSON_AddStringToObject(out, "email", email);
        cJSON_AddStringToObject(out, "provider", pname);
        meterctl_json_str(out, "provider_customer", pc);
        meterctl_json_str(out, "subscription", sub);
        cJSON_AddStringToObject(out, "key", key);
        cJSON_AddStringToObject(out, "key_hash", kh);
        cJSON_AddStringToObject(out, "prefix", prefix);
        meterctl_json_print(out);
        cJSON_Delete(out);

    } else {
        printf("customer %s registered (%s, provider %s%s%s%s%s)\n", id,
               email, pname, pc ? ", " : "", pc ? pc : "",
               sub ? ", " : "", sub ? sub : "");
        printf("API key (shown once, store it now):\n%s\n", key);
    }

    memset(key, 0, sizeof(key));
    freeReplyObject(rg);

    return EX_OK;
}


/* usage of a customer */


typedef struct {
    time_t                      start;      /* hour, or day */
    char                        meter[METER_METER_MAX + 1];
    uint64_t                    quantity;
    uint64_t                    billed;
    int                         sending;    /* records open or dead */
    int                         dead;
    char                        record[METER_IDEM_LEN + 1];
} meterctl_urow_t;


static int
meterctl_urow_cmp(const void *a, const void *b)
{
    const meterctl_urow_t  *x, *y;

    x = a;
    y = b;

    if (x->start != y->start) {
        return (x->start < y->start) ? -1 : 1;
    }

    return strcmp(x->meter, y->meter);
}


static meterctl_urow_t *
meterctl_urow(meterctl_urow_t **rows, size_t *n, size_t *cap, time_t start,
    const char *meter, size_t mlen)
{
    size_t            i;
    meterctl_urow_t  *nr, *row;

    for (i = *n; i > 0; i--) {
        row = &(*rows)[i - 1];

        if (row->start == start && strlen(row->meter) == mlen
            && memcmp(row->meter, meter, mlen) == 0)
        {
            return row;
        }
    }

    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        nr = realloc(*rows, *cap * sizeof(meterctl_urow_t));
        if (nr == NULL) {
            fprintf(stderr, "meterctl: out of memory\n");
            exit(EX_OSERR);
        }

        *rows = nr;
    }

    row = &(*rows)[(*n)++];
    memset(row, 0, sizeof(meterctl_urow_t));
    row->start = start;
    memcpy(row->meter, meter, mlen);
    row->meter[mlen] = '\0';

    return row;
}


static const char *
meterctl_urow_state(const meterctl_urow_t *row)
{
    if (row->quantity == row->billed) {
        return "billed";
    }

    if (row->dead) {
        return "dead";
    }

    if (row->sending) {
        return "sending";
    }

    return row->billed == 0 ? "unbilled" : "partly billed";
}


static int
meterctl_usage_customer(meterctl_opts_t *o, meter_redis_t *r)
{
    char              ck[96], from_s[24], to_s[24], when[32], field[160];
    size_t            i, h, k, f, nrows, cap, mlen, nhour, nhourcap;
    time_t            from, to, t, start;
    int               rc, period, wperiod;
    uint64_t          u, b;
    cJSON            *arr, *j;
    redisReply       *hours, *keys, *ur, *br, *rp, *st;
    const char       *id, *fn, *bar, *bv;
    meterctl_urow_t  *rows, *hrows, *row;

    id = o->args[0];
    from = 0;
    to = 0;
    period = METER_HOUR;

    if (!meterctl_valid_id(id)) {
        fprintf(stderr, "meterctl usage: invalid customer id \"%s\"\n", id);
        return EX_DATAERR;
    }

    if (o->from != NULL) {
        from = meter_iso8601_parse(o->from);
        if (from == -1) {
            fprintf(stderr, "meterctl usage: invalid --from \"%s\" (ISO 8601 "
                    "UTC, e.g. 2026-11-24 or 2026-11-24T10:00Z)\n", o->from);
            return EX_USAGE;
        }
    }

    if (o->to != NULL) {
        to = meter_iso8601_parse(o->to);
        if (to == -1) {
            fprintf(stderr, "meterctl usage: invalid --to \"%s\" (ISO 8601 "
                    "UTC, e.g. 2026-11-25)\n", o->to);
            return EX_USAGE;
        }
    }

    if (o->from != NULL && o->to != NULL && to <= from) {
        fprintf(stderr, "meterctl usage: --to must be after --from\n");
        return EX_USAGE;
    }

    if (o->period != NULL) {
        if (strcmp(o->period, "hour") == 0) {
            period = METER_HOUR;

        } else if (strcmp(o->period, "day") == 0) {
            period = METER_DAY;

        } else {
            fprintf(stderr, "meterctl usage: invalid --period \"%s\" (hour or "
                    "day)\n", o->period);
            return EX_USAGE;
        }
    }

    wperiod = (o->cf != NULL && o->cf->report_period == METER_DAY)
              ? METER_DAY : METER_HOUR;

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    rc = meterctl_customer_exists(r, "usage", id);
    if (rc != 1) {
        return rc == 0 ? EX_DATAERR : EX_UNAVAILABLE;
    }

    snprintf(ck, sizeof(ck), "mtr:ckeys:{%s}", id);
    keys = meterctl_sorted_set(r, ck, &rc);
    if (keys == NULL) {
        return rc;
    }

    if (o->from != NULL) {
        snprintf(from_s, sizeof(from_s), "%lld",
                 (long long) meter_period_start(from, METER_HOUR));

    } else {
        snprintf(from_s, sizeof(from_s), "-inf");
    }

    if (o->to != NULL) {
        snprintf(to_s, sizeof(to_s), "(%lld", (long long) to);

    } else {
        snprintf(to_s, sizeof(to_s), "+inf");
    }

    hours = meter_redis_cmd(r, "ZRANGEBYSCORE mtr:hours %s %s", from_s, to_s);
    if (!meter_reply_ok(hours) || hours->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(keys);
        return meterctl_redis_failed(r, hours);
    }

    rows = NULL;
    nrows = 0;
    cap = 0;
    hrows = NULL;
    nhourcap = 0;
    rc = EX_OK;

    for (h = 0; h < hours->elements && rc == EX_OK; h++) {
        t = meter_hour_parse(hours->element[h]->str);
        if (t == -1) {
            continue;
        }

        /* this hour's rows first, then their records, then the period */
        nhour = 0;

        for (k = 0; k < keys->elements; k++) {
            ur = meter_redis_cmd(r, "HGETALL mtr:u:{%s}:%s",
                                 keys->element[k]->str,
                                 hours->element[h]->str);
            br = meter_redis_cmd(r, "HGETALL mtr:b:{%s}:%s",
                                 keys->element[k]->str,
                                 hours->element[h]->str);
            if (!meter_reply_ok(ur) || !meter_reply_ok(br)
                || ur->type != REDIS_REPLY_ARRAY
                || br->type != REDIS_REPLY_ARRAY)
            {
                freeReplyObject(br);
                rc = meterctl_redis_failed(r, ur);
                break;
            }

            for (f = 0; f + 1 < ur->elements; f += 2) {
                fn = ur->element[f]->str;
                bar = strchr(fn, '|');
                mlen = (bar != NULL) ? (size_t) (bar - fn) : 0;

                if (mlen == 0 || mlen > METER_METER_MAX
                    || meter_parse_u64(ur->element[f + 1]->str,
                                       ur->element[f + 1]->len, &u)
                       != 0)
                {
                    continue;
                }

                bv = meter_reply_hget(br, fn);
                if (bv == NULL || meter_parse_u64(bv, strlen(bv), &b) != 0) {
                    b = 0;
                }

                row = meterctl_urow(&hrows, &nhour, &nhourcap, t, fn, mlen);
                row->quantity += u;
                row->billed += (b < u) ? b : u;
            }

            freeReplyObject(ur);
            freeReplyObject(br);
        }

        /* the worker's record still open for (period, customer, meter) */
        for (i = 0; i < nhour && rc == EX_OK; i++) {
            row = &hrows[i];

            if (row->billed == row->quantity) {
                continue;
            }

            snprintf(field, sizeof(field), "%s|%s|open", id, row->meter);
            rp = meter_redis_cmd(r, "HGET " METER_W_PERIOD "%lld %s",
                                 (long long) meter_period_start(t, wperiod),
                                 field);
            if (!meter_reply_ok(rp)) {
                rc = meterctl_redis_failed(r, rp);
                break;
            }

            if (rp->type == REDIS_REPLY_STRING
                && rp->len == METER_IDEM_LEN)
            {
                snprintf(row->record, sizeof(row->record), "%s", rp->str);

                st = meter_redis_cmd(r, "HGET " METER_W_REC "%s state",
                                     rp->str);
                if (meter_reply_ok(st) && st->type == REDIS_REPLY_STRING
                    && strcmp(st->str, "dead") == 0)
                {
                    row->dead = 1;

                } else {
                    row->sending = 1;
                }

                freeReplyObject(st);
            }

            freeReplyObject(rp);
        }

        for (i = 0; i < nhour && rc == EX_OK; i++) {
            start = meter_period_start(hrows[i].start, period);
            row = meterctl_urow(&rows, &nrows, &cap, start, hrows[i].meter,
                                strlen(hrows[i].meter));
            row->quantity += hrows[i].quantity;
            row->billed += hrows[i].billed;
            row->sending |= hrows[i].sending;
            row->dead |= hrows[i].dead;
            if (row->record[0] == '\0') {
                memcpy(row->record, hrows[i].record, sizeof(row->record));
            }
        }
    }

    free(hrows);
    freeReplyObject(hours);
    freeReplyObject(keys);

    if (rc != EX_OK) {
        free(rows);
        return rc;
    }

    if (nrows > 0) {
        qsort(rows, nrows, sizeof(meterctl_urow_t), meterctl_urow_cmp);
    }

    if (o->json) {
        arr = cJSON_CreateArray();

        for (i = 0; i < nrows; i++) {
            j = cJSON_CreateObject();
            meter_iso8601(rows[i].start, when, sizeof(when));
            cJSON_AddStringToObject(j, "customer", id);
            cJSON_AddStringToObject(j, "period_start", when);
            meter_iso8601(rows[i].start + period, when, sizeof(when));
            cJSON_AddStringToObject(j, "period_end", when);
            cJSON_AddStringToObject(j, "meter", rows[i].meter);
            snprintf(field, sizeof(field), "%" PRIu64, rows[i].quantity);
            cJSON_AddRawToObject(j, "quantity", field);
            snprintf(field, sizeof(field), "%" PRIu64, rows[i].billed);
            cJSON_AddRawToObject(j, "billed", field);
            cJSON_AddStringToObject(j, "state",
                                    meterctl_urow_state(&rows[i]));
            meterctl_json_str(j, "record",
                              rows[i].record[0] ? rows[i].record : NULL);
            cJSON_AddItemToArray(arr, j);
        }

        meterctl_json_print(arr);
        cJSON_Delete(arr);

    } else {
        printf("%-20s  %-16s  %14s  %14s  %-13s  %s\n",
               period == METER_DAY ? "DAY" : "HOUR", "METER", "QUANTITY",
               "BILLED", "STATE", "RECORD");

        for (i = 0; i < nrows; i++) {
            meter_iso8601(rows[i].start, when, sizeof(when));
            printf("%-20s  %-16s  %14" PRIu64 "  %14" PRIu64 "  %-13s  %s\n",
                   when, rows[i].meter, rows[i].quantity, rows[i].billed,
                   meterctl_urow_state(&rows[i]),
                   rows[i].record[0] ? rows[i].record : "-");
        }

        if (nrows == 0) {
            printf("(no usage in Redis for customer %s%s)\n", id,
                   (o->from || o->to) ? " in this range" : "");
        }
    }

    free(rows);

    return EX_OK;
}


static int
meterctl_usage(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    if (o->nargs > 1) {
        fprintf(stderr, "meterctl usage: expected at most one customer id\n");
        return EX_USAGE;
    }

    if (o->nargs == 1) {
        if (o->hour != NULL) {
            fprintf(stderr, "meterctl usage: --hour is for the per-key form; "
                    "with CUSTOMER use --from and --to\n");
            return EX_USAGE;
        }

        return meterctl_usage_customer(o, r);
    }

    if (o->from != NULL || o->to != NULL || o->period != NULL) {
        fprintf(stderr, "meterctl usage: --from, --to and --period need a "
                "CUSTOMER\n");
        return EX_USAGE;
    }

    if (o->hour != NULL && meter_hour_parse_dashed(o->hour) == -1) {
        fprintf(stderr, "meterctl usage: invalid --hour \"%s\" (expected "
                "YYYY-MM-DDTHH)\n", o->hour);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);
    if (rc != EX_OK) {
        return rc;
    }

    return meterctl_usage_keys(o, r);
}


static int
meterctl_status_cmd(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    if (o->nargs != 0) {
        fprintf(stderr, "meterctl status: unexpected argument \"%s\"\n",
                o->args[0]);
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);

    return rc != EX_OK ? rc : meterctl_status(o, r);
}


static int
meterctl_retry_cmd(meterctl_opts_t *o, meter_redis_t *r)
{
    int  rc;

    if ((o->all && o->nargs > 0) || (!o->all && o->nargs == 0)) {
        fprintf(stderr, "meterctl retry: give record ids or --all\n");
        return EX_USAGE;
    }

    rc = meterctl_open(o, r);

    return rc != EX_OK ? rc : meterctl_retry(o, r);
}


/* commands */


typedef struct {
    const char                 *group;  /* "keys" */
    const char                 *name;   /* "revoke"; NULL: no subcommands */
    const char                 *opts;   /* option letters besides METERCTL_CONN */
    int                       (*run)(meterctl_opts_t *o, meter_redis_t *r);
    const char                 *usage;
} meterctl_cmd_t;


static const meterctl_cmd_t  meterctl_cmds[] = {

    { "register", NULL, "eNLCj", meterctl_register,
      "Usage: meterctl register --email EMAIL [--name NAME] [--plan PLAN]\n"
      "                         [--customer ID] [--json]\n"
      "\n"
      "Creates a customer with the provider of the config (-c): Stripe\n"
      "customer then subscription, Chargebee customer then subscription,\n"
      "Recurly account then subscription; provider \"file\" (or --redis\n"
      "without a config) makes a local record only.  Then it generates an\n"
      "API key (mk_live_ + 160 random bits from OpenSSL's CSPRNG, base32),\n"
      "stores only its SHA-256 and prints the key ONCE.\n"
      "\n"
      "  --email EMAIL    required; the customer id is derived from it\n"
      "                   (c_ + 20 hex chars of its SHA-256) unless --customer\n"
      "  --customer ID    our customer id instead ([A-Za-z0-9_.-]{1,64})\n"
      "  --name NAME      the customer's name at the provider\n"
      "  --plan PLAN      plan name of the config (default \"default\")\n"
      "  --json           {\"customer\",\"key\",\"key_hash\",\"prefix\",...}\n"
      "\n"
      "Retrying: a registration is recorded in Redis (mtr:reg:{ID}) before\n"
      "the provider is called; the provider calls use idempotency keys\n"
      "derived from the customer id.  If the provider or Redis fails\n"
      "part-way (exit 75 or 69), run the SAME command again (same --email,\n"
      "same --customer): it continues where it stopped and leaves one\n"
      "customer, one subscription and one key.  The key is generated only\n"
      "after everything else succeeded and is never stored; if a run died\n"
      "after storing its hash but before printing it, a retry says so (exit\n"
      "65) and \"meterctl keys rotate KEY_HASH\" issues a new key.\n" },

    { "customers", NULL, NULL, NULL,
      "Usage: meterctl customers list [--json]\n"
      "       meterctl customers show ID [--json]\n"
      "       meterctl customers add ID [options]\n"
      "\n"
      "meterctl customers SUBCOMMAND --help for each.\n" },

    { "customers", "list", "j", meterctl_customers_list,
      "Usage: meterctl customers list [--json]\n"
      "\n"
      "Lists every customer: id, status (active or delinquent), reason,\n"
      "provider, number of keys, email.\n" },

    { "customers", "show", "j", meterctl_customers_show,
      "Usage: meterctl customers show ID [--json]\n"
      "\n"
      "One customer: provider ids, status with reason, since and source,\n"
      "keys (prefix and hash, never the key), prepaid credit.\n" },

    { "customers", "add", "pxsieNL", meterctl_customers_add,
      "Usage: meterctl customers add ID [--provider P] [--provider-customer X]\n"
      "           [--subscription Y] [--item METER=ID]... [--email E]\n"
      "           [--name N] [--plan P]\n"
      "\n"
      "Creates or updates a customer record without calling the provider\n"
      "(for customers created at the provider by other means).  Its status\n"
      "and creation time are kept.\n" },

    { "keys", NULL, NULL, NULL,
      "Usage: meterctl keys list CUSTOMER [--json]\n"
      "       meterctl keys add KEY|- --customer ID\n"
      "       meterctl keys add --hash KEY_HASH --customer ID\n"
      "       meterctl keys revoke KEY_HASH|PREFIX\n"
      "       meterctl keys rotate KEY_HASH|PREFIX [--json]\n"
      "\n"
      "meterctl keys SUBCOMMAND --help for each.\n" },

    { "keys", "list", "jC", meterctl_keys_list,
      "Usage: meterctl keys list CUSTOMER [--json]\n"
      "\n"
      "The customer's keys: hash, display prefix, created, revoked.  The\n"
      "keys themselves are never stored.  Imported keys (keys add) show\n"
      "\"(imported)\" for the prefix: none is stored for them.\n" },

    { "keys", "add", "Ck", meterctl_keys_add,
      "Usage: meterctl keys add KEY|- --customer ID\n"
      "       meterctl keys add --hash KEY_HASH --customer ID\n"
      "\n"
      "Maps an existing API key to a customer; stores only its SHA-256,\n"
      "no prefix (next to an unsalted hash, a prefix of a short key gives\n"
      "it away): name it by its hash in keys revoke/rotate.  \"-\" reads\n"
      "the key from stdin (keeps it out of the process list and shell\n"
      "history).  Prints the key hash.\n" },

    { "keys", "revoke", "j", meterctl_keys_revoke,
      "Usage: meterctl keys revoke KEY_HASH|PREFIX [--json]\n"
      "\n"
      "Revokes a key, named by its hash, its 12-character prefix\n"
      "(mk_live_ab12) or at least 8 leading hex chars of its hash.  nginx\n"
      "answers it like an unknown key after its next governance refresh.\n"
      "The key stays listed, with its revocation time.\n" },

    { "keys", "rotate", "j", meterctl_keys_rotate,
      "Usage: meterctl keys rotate KEY_HASH|PREFIX [--json]\n"
      "\n"
      "Issues a new key for the key's customer, prints it ONCE, then\n"
      "revokes the old key.  Also the way to replace a key that was lost.\n" },

    { "delinquent", NULL, NULL, NULL,
      "Usage: meterctl delinquent set CUSTOMER [--reason REASON]\n"
      "       meterctl delinquent clear CUSTOMER\n"
      "\n"
      "meterctl delinquent SUBCOMMAND --help for each.\n" },

    { "delinquent", "set", "Rj", meterctl_delinquent_set,
      "Usage: meterctl delinquent set CUSTOMER [--reason REASON] [--json]\n"
      "\n"
      "Marks the customer delinquent by hand: all its keys get 402 after\n"
      "nginx's next governance refresh.  REASON: invoice_overdue (default)\n"
      "or credit_exhausted.  The provider sync never clears a manual mark.\n" },

    { "delinquent", "clear", "j", meterctl_delinquent_clear,
      "Usage: meterctl delinquent clear CUSTOMER [--json]\n"
      "\n"
      "Marks the customer active again (a manual or a synced mark).  If the\n"
      "provider still lists an overdue invoice, the next sync sets it\n"
      "again.\n" },

    { "credit", NULL, NULL, NULL,
      "Usage: meterctl credit set CUSTOMER --meter NAME AMOUNT\n"
      "       meterctl credit add CUSTOMER --meter NAME AMOUNT\n"
      "       meterctl credit show CUSTOMER [--meter NAME] [--json]\n"
      "\n"
      "meterctl credit SUBCOMMAND --help for each.\n" },

    { "credit", "set", "Mj", meterctl_credit_set,
      "Usage: meterctl credit set CUSTOMER --meter NAME AMOUNT [--json]\n"
      "\n"
      "Sets the prepaid balance left for the meter to AMOUNT units (from\n"
      "now, on top of the usage so far).  At zero, calls counted by the\n"
      "meter get 402 credit_exhausted.\n" },

    { "credit", "add", "Mj", meterctl_credit_add,
      "Usage: meterctl credit add CUSTOMER --meter NAME AMOUNT [--json]\n"
      "\n"
      "Tops the balance up by AMOUNT units (a negative AMOUNT, after \"--\",\n"
      "corrects it down); unblocks after nginx's next governance refresh.\n"
      "Without any credit yet, the same as \"credit set\".\n" },

    { "credit", "show", "Mj", meterctl_credit_show,
      "Usage: meterctl credit show CUSTOMER [--meter NAME] [--json]\n"
      "\n"
      "Granted, used and left per meter with credit.\n" },

    { "usage", NULL, "jHFTD", meterctl_usage,
      "Usage: meterctl usage CUSTOMER [--from ISO] [--to ISO]\n"
      "                      [--period hour|day] [--json]\n"
      "       meterctl usage [--hour YYYY-MM-DDTHH] [--json]\n"
      "\n"
      "With CUSTOMER: usage per hour (or UTC day) and meter over all the\n"
      "customer's keys, the part already billed and the billing state:\n"
      "billed, unbilled (not drained yet), partly billed, sending (a record\n"
      "is being sent or retried) or dead (a dead-lettered record: see\n"
      "\"meterctl retry\").  --from is inclusive, --to exclusive (UTC).\n"
      "\n"
      "Without CUSTOMER: totals per key hash, hour and meter; --json gives\n"
      "[{\"key_hash\",\"hour\",\"meter\",\"value\"}].\n" },

    { "status", NULL, "j", meterctl_status_cmd,
      "Usage: meterctl status [--json]\n"
      "\n"
      "Hours in Redis, the last drain and delinquency sync, records open or\n"
      "waiting for a retry, dead letters, keys without customer.\n" },

    { "retry", NULL, "a", meterctl_retry_cmd,
      "Usage: meterctl retry ID... | --all\n"
      "\n"
      "Puts dead-lettered records back in the queue, with the same\n"
      "idempotency key; the worker sends them on its next pass.\n" },
};

#define METERCTL_NCMDS  (sizeof(meterctl_cmds) / sizeof(meterctl_cmds[0]))


static const meterctl_cmd_t *
meterctl_find(const char *group, const char *name)
{
    size_t  i;

    for (i = 0; i < METERCTL_NCMDS; i++) {
        if (strcmp(meterctl_cmds[i].group, group) != 0) {
            continue;
        }

        if ((name == NULL && meterctl_cmds[i].name == NULL)
            || (name != NULL && meterctl_cmds[i].name != NULL
                && strcmp(meterctl_cmds[i].name, name) == 0))
        {
            return &meterctl_cmds[i];
        }
    }

    return NULL;
}


/* 0 to run *cmd, or an exit code (help printed, or a usage error) */
static int
meterctl_select(int argc, char **argv, meterctl_opts_t *o,
    const meterctl_cmd_t **cmd)
{
    int                    c;
    const meterctl_cmd_t  *top, *sub;

    if (meterctl_parse(argc, argv, o, 1) != 0) {
        fprintf(stderr, "Run \"meterctl --help\" for usage.\n");
        return EX_USAGE;
    }

    if (o->nargs == 0) {
        fputs(meterctl_help, o->help ? stdout : stderr);
        return o->help ? EX_OK : EX_USAGE;
    }

    if (strcmp(o->args[0], "help") == 0) {
        top = (o->nargs > 1) ? meterctl_find(o->args[1], NULL) : NULL;
        sub = (top != NULL && o->nargs > 2)
              ? meterctl_find(o->args[1], o->args[2]) : NULL;
        fputs(sub ? sub->usage : top ? top->usage : meterctl_help, stdout);
        return EX_OK;
    }

    top = meterctl_find(o->args[0], NULL);
    if (top == NULL) {
        fprintf(stderr, "meterctl: unknown command \"%s\"\n", o->args[0]);
        fputs(meterctl_help, stderr);
        return EX_USAGE;
    }

    if (meterctl_parse(o->nargs, o->args, o, 0) != 0) {
        fprintf(stderr, "Run \"meterctl %s --help\" for usage.\n", top->group);
        return EX_USAGE;
    }

    sub = top;

    if (top->run == NULL) {
        if (o->nargs == 0) {
            fputs(top->usage, o->help ? stdout : stderr);
            return o->help ? EX_OK : EX_USAGE;
        }

        sub = meterctl_find(top->group, o->args[0]);
        if (sub == NULL) {
            fprintf(stderr, "meterctl %s: unknown subcommand \"%s\"\n",
                    top->group, o->args[0]);
            fputs(top->usage, stderr);
            return EX_USAGE;
        }

        o->args++;
        o->nargs--;
    }

    if (o->help) {
        fputs(sub->usage, stdout);
        return EX_OK;
    }

    c = meterctl_unexpected(o, sub->opts);
    if (c != 0) {
        fprintf(stderr, "meterctl %s%s%s: --%s is not an option of this "
                "command\n", sub->group, sub->name ? " " : "",
                sub->name ? sub->name : "", meterctl_long_name(c));
        fputs(sub->usage, stderr);
        return EX_USAGE;
    }

    *cmd = sub;

    return -1;
}


int
main(int argc, char **argv)
{
    char                   err[1024];
    int                    rc;
    meter_redis_t          r;
    meterctl_opts_t        o;
    const meterctl_cmd_t  *cmd;

    meter_log_prefix = 0;

    memset(&o, 0, sizeof(meterctl_opts_t));
    memset(&r, 0, sizeof(meter_redis_t));
    cmd = NULL;

    rc = meterctl_select(argc, argv, &o, &cmd);
    if (rc != -1) {
        return rc;
    }

    if (o.config != NULL) {
        o.cf = meter_conf_load(o.config, err, sizeof(err));
        if (o.cf == NULL) {
            fprintf(stderr, "meterctl: %s\n", err);
            return EX_CONFIG;
        }
    }

    rc = cmd->run(&o, &r);

    if (rc == EX_USAGE) {
        fprintf(stderr, "Run \"meterctl %s%s%s --help\" for usage.\n",
                cmd->group, cmd->name ? " " : "",
                cmd->name ? cmd->name : "");
    }

    meter_redis_close(&r);
    meter_conf_free(o.cf);

    return rc;
}
