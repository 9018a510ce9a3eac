
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl: the admin tool of nginx-meter.  Every command and subcommand
 * has its own --help.  Tables for people by default, --json for scripts.
 * This file: the command line, the command table and the helpers the
 * commands share; the commands are in one file per group (meterctl.h).
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
 * except reconcile (reconcile.c): 0 equal or only pending, 1 differences
 * beyond pending, 2 an error, 64 usage.
 */


#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "gov.h"
#include "meterctl.h"
#include "meter_schema.h"
#include "util.h"


static const struct option  meterctl_options[] = {
    { "config", required_argument, NULL, 'c' },
    { "redis", required_argument, NULL, 'r' },
    { "password-file", required_argument, NULL, 'P' },
    { "db", required_argument, NULL, 'd' },
    { "json", no_argument, NULL, 'j' },
    { "all", no_argument, NULL, 'a' },
    { "resend", no_argument, NULL, 'n' },
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
    { "anchor", required_argument, NULL, 'A' },
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
    "  plan          set, clear, show a customer's plan and quotas\n"
    "  usage         metered usage per customer or per key, and its billing\n"
    "  status        hours pending, open and dead records, last drain/sync\n"
    "  retry         requeue dead-lettered records\n"
    "  reconcile     nginx's count, the worker's billing and the provider's\n"
    "                own figure side by side, every difference explained\n"
    "  alerts        alerts fired; deliveries sent, pending, failing\n"
    "\n"
    "Exit status: 0 ok, 64 usage, 65 unknown customer/key/record or bad id,\n"
    "69 Redis or provider unavailable, 75 temporary failure (run again),\n"
    "78 config error.  reconcile: 0 equal or pending, 1 differs, 2 error.\n";


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
        case 'n': o->resend = 1; break;
        case 'H': o->hour = optarg; break;
        case 'C': o->customer = optarg; break;
        case 'p': o->provider = optarg; break;
        case 'x': o->provider_customer = optarg; break;
        case 's': o->subscription = optarg; break;
        case 'i':
            if (o->nitems == 16 || strchr(optarg, '=') == NULL
                || strchr(optarg, '=') == optarg
                || strchr(optarg, '=') - optarg > MTR_METER_MAX)
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
        case 'A': o->anchor = optarg; break;
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
    char           err[1024], *host, *unix_path;
    int            port, db, rc;
    int64_t        timeout;
    const char    *pwfile;

    host = NULL;
    unix_path = NULL;
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

    rc = meter_redis_open(r, host, port, unix_path, pwfile, db, timeout, err,
                          sizeof(err));

    if (rc == -2) {
        fprintf(stderr, "meterctl: Redis password: %s\n", err);
        rc = (o->cf != NULL) ? EX_CONFIG : EX_USAGE;

    } else if (rc != 0) {
        fprintf(stderr, "meterctl: %s (is redis-server running and is the "
                "address right?)\n", err);
        rc = EX_UNAVAILABLE;
    }

    free(host);
    free(unix_path);

    return rc;
}


int
meterctl_redis_failed(meter_redis_t *r, redisReply *rp)
{
    fprintf(stderr, "meterctl: %s\n",
            rp != NULL && rp->type == REDIS_REPLY_ERROR ? rp->str : r->err);
    freeReplyObject(rp);

    return EX_UNAVAILABLE;
}


/* an error of gov.c: invalid input is the admin's, the rest Redis' */
int
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


/* 1 when the customer exists; 0 with a message; -1 Redis failed */
int
meterctl_customer_exists(meter_redis_t *r, const char *cmd, const char *id)
{
    redisReply  *rp;
    long long    n;

    rp = meter_redis_cmd(r, "EXISTS " MTR_CUST_FMT, id);
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


void
meterctl_time(const char *unix_s, char *buf, size_t size)
{
    if (unix_s == NULL || unix_s[0] == '\0' || strcmp(unix_s, "0") == 0) {
        snprintf(buf, size, "-");
        return;
    }

    meter_iso8601((time_t) strtoll(unix_s, NULL, 10), buf, size);
}


void
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
void
meterctl_json_int(cJSON *o, const char *name, long long v)
{
    char  buf[24];

    snprintf(buf, sizeof(buf), "%lld", v);
    cJSON_AddRawToObject(o, name, buf);
}


void
meterctl_json_str(cJSON *o, const char *name, const char *v)
{
    if (v != NULL) {
        cJSON_AddStringToObject(o, name, v);

    } else {
        cJSON_AddNullToObject(o, name);
    }
}


int
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
redisReply *
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


const meterctl_cmd_t  meterctl_cmds[] = {

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

    { "plan", NULL, NULL, NULL,
      "Usage: meterctl plan set CUSTOMER PLAN [--anchor ISO|utc]\n"
      "       meterctl plan clear CUSTOMER\n"
      "       meterctl plan show CUSTOMER [--json]\n"
      "       meterctl plan publish\n"
      "\n"
      "(set and publish need the worker config: -c FILE)\n"
      "meterctl plan SUBCOMMAND --help for each.\n" },

    { "plan", "set", "Aj", meterctl_plan_set,
      "Usage: meterctl plan set CUSTOMER PLAN [--anchor ISO|utc]\n"
      "\n"
      "(with -c FILE: the plans are in the worker config)\n"
      "Assigns the plan (\"plan.PLAN.*\" keys of the worker config) and\n"
      "publishes its quotas (\"plan.PLAN.quota.METER = LIMIT/day|week|month\")\n"
      "for nginx: over quota, calls get 429 until the period resets.\n"
      "Periods start at UTC midnight, on Monday, on the 1st; --anchor (the\n"
      "subscription's billing anchor, e.g. Stripe's billing_cycle_anchor)\n"
      "moves them to its time of day, weekday or day of month; \"utc\"\n"
      "removes it.  The worker republishes at each reset.\n" },

    { "plan", "clear", "j", meterctl_plan_clear,
      "Usage: meterctl plan clear CUSTOMER\n"
      "\n"
      "Removes the customer's plan and its quotas.\n" },

    { "plan", "show", "j", meterctl_plan_show,
      "Usage: meterctl plan show CUSTOMER [--json]\n"
      "\n"
      "Plan, anchor, and per quota meter: limit, used and remaining this\n"
      "period (flushed usage), reset.\n" },

    { "plan", "publish", "", meterctl_plan_publish,
      "Usage: meterctl plan publish\n"
      "\n"
      "(with -c FILE)\n"
      "Republishes every customer's quotas (what meter-worker does every\n"
      "sync_interval and at each reset), e.g. after editing the plans.\n" },

    { "usage", NULL, "jHFTD", meterctl_usage,
      "Usage: meterctl usage CUSTOMER [--from ISO] [--to ISO]\n"
      "                      [--period hour|day|month] [--json]\n"
      "       meterctl usage [--hour YYYY-MM-DDTHH] [--json]\n"
      "\n"
      "With CUSTOMER: usage per hour (or UTC day) and meter over all the\n"
      "customer's keys, the part already billed and the billing state:\n"
      "billed, unbilled (not drained yet), partly billed, sending (a record\n"
      "is being sent or retried) or dead (a dead-lettered record: see\n"
      "\"meterctl retry\").  --from is inclusive, --to exclusive (UTC).\n"
      "Gauges show their figure (max: the largest, last: the latest\n"
      "reading), unique meters the customer's distinct count of each unique\n"
      "period; --period month: the month's figure, billed as the worker's\n"
      "figure record.\n"
      "\n"
      "Without CUSTOMER: totals per key hash, hour and meter; --json gives\n"
      "[{\"key_hash\",\"hour\",\"meter\",\"value\"}]; a unique meter's row\n"
      "(meter NAME:unique) is the key's distinct count of its unique period\n"
      "(\"unique_period\", \"hour\" its start).\n" },

    { "status", NULL, "j", meterctl_status_cmd,
      "Usage: meterctl status [--json]\n"
      "\n"
      "Hours in Redis, the last drain and delinquency sync, records open or\n"
      "waiting for a retry, dead letters, keys without customer.\n" },

    { "alerts", NULL, "jC", meterctl_alerts_cmd,
      "Usage: meterctl alerts [--customer ID] [--json]\n"
      "\n"
      "The alerts meter-worker fired (newest first, up to 1000): rule,\n"
      "customer, period, value, and per channel its state: sent (when),\n"
      "pending (next attempt), failing (retrying; the last error), sending\n"
      "(claimed; resent with the same Message-ID or Meter-Alert-Id if the\n"
      "worker died) or failed (gave up after alert.max_attempts).\n" },

    { "retry", NULL, "an", meterctl_retry_cmd,
      "Usage: meterctl retry ID... | --all\n"
      "       meterctl retry --resend ID...\n"
      "\n"
      "Puts dead-lettered records back in the queue, with the same\n"
      "idempotency key; the worker sends them on its next pass.\n"
      "\n"
      "A record whose earlier send's outcome is unknown and older than the\n"
      "provider's dedupe window is dead-lettered again: a resend could be\n"
      "counted twice.  Once you have checked that the provider does NOT\n"
      "have it, --resend sends it as a new record (its window starts\n"
      "again).  If the provider has it, --resend bills it twice.\n" },

    { "reconcile", NULL, "jCMFTD", meterctl_reconcile,
      "Usage: meterctl reconcile [--period YYYY-MM | --from ISO --to ISO]\n"
      "                          [--customer C] [--meter M] [--json]\n"
      "\n"
      "(with -c FILE: the provider of the worker's config)\n"
      "Per customer and meter over a UTC month (default: this one) or an\n"
      "hour-aligned range: what nginx counted (Redis), what the worker\n"
      "billed (billed marks, its records) and what the provider itself\n"
      "holds (Stripe meter event summaries, Chargebee usages, Recurly usage\n"
      "with billing_status=all, OpenMeter's meter query), and every\n"
      "difference with its likely cause: pending (not due yet or in\n"
      "flight), dead_letter, late_usage, rejected (asynchronously by the\n"
      "provider), unknown.  A 429 with Retry-After is waited out.\n"
      "\n"
      "Exit status: 0 all equal or only pending, 1 differences beyond\n"
      "pending, 2 an error (Redis or the provider unreachable or refusing:\n"
      "no figure is guessed), 64 bad command line.\n" }
};

const size_t  meterctl_ncmds = sizeof(meterctl_cmds) / sizeof(meterctl_cmds[0]);


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


/* -1 to run *cmd, or an exit code (help printed, or a usage error) */
int
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
