
/*
 * Copyright (C) nginx-meter authors
 *
 * The Redis contract of docs/redis-schema.md as C macros: every mtr:* key
 * name and every field format, for the module and the worker alike.  The
 * names follow the keys ("mtr:gov:version" is MTR_GOV_VERSION), so a grep
 * for either finds both.  Per parameterised key:
 *
 *   MTR_X_PRE   the literal part before the first parameter, for code that
 *               builds a key by copying (the module's request-free path);
 *   MTR_X_FMT   a printf format with the parameters in the order of the
 *               document.
 *
 * Change a name here and in docs/redis-schema.md together: a node and a
 * worker of different versions must still agree on every byte.
 */


#ifndef _METER_SCHEMA_H_INCLUDED_
#define _METER_SCHEMA_H_INCLUDED_


#define MTR_PREFIX              "mtr:"

/* METER: [A-Za-z0-9_.-]{1,32}; CUSTOMER: [A-Za-z0-9_.-]{1,64} */
#define MTR_METER_MAX           32
#define MTR_CUSTOMER_MAX        64
#define MTR_NAME_CHARS                                                        \
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


/* usage written by the module */

/* HASH mtr:u:{KH}:HOUR, field METER|WRITER -> absolute cumulative count */
#define MTR_U_PRE               "mtr:u:{"
#define MTR_U_MID               "}:"            /* between KH and HOUR */
#define MTR_U_FMT               MTR_U_PRE "%s" MTR_U_MID "%s"

/* HASH mtr:used:{KH}, field METER -> lifetime units flushed */
#define MTR_USED_PRE            "mtr:used:{"
#define MTR_USED_END            "}"
#define MTR_USED_FMT            MTR_USED_PRE "%s" MTR_USED_END

/* SET mtr:idx:HOUR of KH */
#define MTR_IDX_PRE             "mtr:idx:"
#define MTR_IDX_FMT             MTR_IDX_PRE "%s"

/* ZSET mtr:hours, member HOUR, score Unix start of HOUR */
#define MTR_HOURS               "mtr:hours"

/*
 * The writer layout (most usage): HASH mtr:wu:{EPOCH}:SID:HOUR:PART, field
 * KH|METER|GEN -> absolute cumulative count, written with plain HSET by
 * one session (one connection) of one zone instance; PART is the slot's
 * index in the zone / MTR_WPART_SLOTS, so each hash stays small (printf
 * arguments: epoch as 16 hex digits, sid, hour, part).
 */
#define MTR_WU_PRE              "mtr:wu:{"
#define MTR_WU_FMT              MTR_WU_PRE "%s}:%s:%s:%u"
#define MTR_WPART_SHIFT         12
#define MTR_WPART_SLOTS         (1u << MTR_WPART_SHIFT)

/* SET mtr:widx:HOUR of writers EPOCH:SID:NPARTS that wrote HOUR (NPARTS:
 * the zone's part count, the writer's hashes are parts 0..NPARTS-1) */
#define MTR_WIDX_PRE            "mtr:widx:"
#define MTR_WIDX_FMT            MTR_WIDX_PRE "%s"
#define MTR_WRITER_SEP          ':'     /* EPOCH:SID:NPARTS */

/* HASH mtr:b:{KH}:HOUR, field METER|WRITER -> billed u value (worker) */
#define MTR_B_PRE               "mtr:b:{"
#define MTR_B_FMT               MTR_B_PRE "%s" MTR_U_MID "%s"

/*
 * A usage field: METER "|" EPOCH "." GEN, EPOCH 16 lowercase hex digits,
 * GEN decimal (printf arguments: meter, epoch, gen).
 */
#define MTR_FIELD_SEP           '|'
#define MTR_WRITER_FMT          "|%016llx.%lu"  /* after the meter name */
#define MTR_FIELD_FMT           "%s" MTR_WRITER_FMT


/*
 * A gauge meter (meter ... max=$var): its METER in every usage field is the
 * name followed by this suffix, so the worker knows to take the largest
 * value over counters and keys instead of their sum (a gauge's name is
 * then at most MTR_METER_MAX - 4 characters).
 */
#define MTR_GAUGE_MAX_SFX       ":max"
#define MTR_GAUGE_SFX_LEN       4

/*
 * A gauge of the latest value (meter ... last=$var): METER is the name
 * followed by this suffix; the counter's absolute value encodes
 * (ms into the UTC hour) << MTR_GAUGE_LAST_SHIFT | value, so the largest
 * copy is the latest reading (value = v & MTR_GAUGE_LAST_MASK).
 */
#define MTR_GAUGE_LAST_SFX      ":last"
#define MTR_GAUGE_LAST_SHIFT    40
#define MTR_GAUGE_LAST_MASK     ((1ULL << MTR_GAUGE_LAST_SHIFT) - 1)


/*
 * Unique users (meter ... unique=$var), written by the module: per key,
 * meter and unique period UPERIOD (YYYYMM, YYYYMMDD or YYYYMMDDHH) a SET
 * of members while it has fewer than MTR_UNIQUE_EXACT, and a HyperLogLog
 * of all; mtr:uqidx:YYYYMM lists "KH|NAME|UPERIOD" of the month
 * (printf arguments: KH, NAME, UPERIOD; YYYYMM).
 */
#define MTR_UQ_PRE              "mtr:uq:{"
#define MTR_UQ_MID              "}:"            /* between KH and NAME */
#define MTR_UQ_FMT              MTR_UQ_PRE "%s}:%s:%s"
#define MTR_UH_PRE              "mtr:uh:{"
#define MTR_UH_FMT              MTR_UH_PRE "%s}:%s:%s"
#define MTR_UQIDX_PRE           "mtr:uqidx:"
#define MTR_UQIDX_FMT           MTR_UQIDX_PRE "%s"
#define MTR_UNIQUE_EXACT        1000


/* worker state: every key carries the hash tag {worker} */

#define MTR_W_LOCK              "mtr:{worker}:lock"
#define MTR_W_REC_PRE           "mtr:{worker}:r:"       /* + ID */
#define MTR_W_REC_FMT           MTR_W_REC_PRE "%s"
#define MTR_W_OPEN              "mtr:{worker}:open"
#define MTR_W_DEAD              "mtr:{worker}:dead"
#define MTR_W_PERIOD_PRE        "mtr:{worker}:p:"       /* + PSTART */
#define MTR_W_PERIOD_FMT        MTR_W_PERIOD_PRE "%lld"
#define MTR_W_NOCUST            "mtr:{worker}:nocust"
#define MTR_W_NOCUST_NEW        "mtr:{worker}:nocust:new" /* being built */
#define MTR_W_STATS             "mtr:{worker}:stats"
#define MTR_W_STRIPE_LATE       "mtr:{worker}:stripe:late"
/* Chargebee: a subscription's billable time, cached (chargebee.c) */
#define MTR_W_CB_SUB_PRE        "mtr:{worker}:cb:sub:"  /* + SUBSCRIPTION */
#define MTR_W_CB_SUB_FMT        MTR_W_CB_SUB_PRE "%s"

/*
 * Billing a figure (a unique count, a gauge's max or last: the month to
 * date).  HASH mtr:{worker}:fig:YYYYMM, fields SUBJECT|METER -> the figure
 * billed B, SUBJECT|METER|b -> "AT HOUR" of that record, SUBJECT|METER|f
 * -> "F HOUR RAW KH" the figure computed.  METER is NAME:max, NAME:last or
 * NAME:unique.  HASH mtr:{worker}:figmon, fields YYYYMM (Unix start of
 * the last closed hour the month's uniques were counted for),
 * YYYYMM|dirty, YYYYMM|closed.  mtr:{worker}:uh:tmp:N: HyperLogLogs of a
 * customer's keys copied into the worker's slot for PFMERGE.
 */
#define MTR_W_FIG_PRE           "mtr:{worker}:fig:"     /* + YYYYMM */
#define MTR_W_FIG_FMT           MTR_W_FIG_PRE "%s"
#define MTR_W_FIGMON            "mtr:{worker}:figmon"
#define MTR_W_UHTMP_PRE         "mtr:{worker}:uh:tmp:"  /* + N */
#define MTR_W_UHTMP_FMT         MTR_W_UHTMP_PRE "%u"
#define MTR_FIG_UNIQUE_SFX      ":unique"

/*
 * Billing a figure (a unique count, a gauge's max or last: the month to
 * date).  HASH mtr:{worker}:fig:YYYYMM, fields SUBJECT|METER -> the figure
 * billed B, SUBJECT|METER|b -> "AT HOUR" of that record, SUBJECT|METER|f
 * -> "F HOUR RAW KH" the figure computed.  METER is NAME:max, NAME:last or
 * NAME:unique.  HASH mtr:{worker}:figmon, fields YYYYMM (Unix start of
 * the last closed hour the month's uniques were counted for),
 * YYYYMM|dirty, YYYYMM|closed.  mtr:{worker}:uh:tmp:N: HyperLogLogs of a
 * customer's keys copied into the worker's slot for PFMERGE.
 */
#define MTR_W_FIG_PRE           "mtr:{worker}:fig:"     /* + YYYYMM */
#define MTR_W_FIG_FMT           MTR_W_FIG_PRE "%s"
#define MTR_W_FIGMON            "mtr:{worker}:figmon"
#define MTR_W_UHTMP_PRE         "mtr:{worker}:uh:tmp:"  /* + N */
#define MTR_W_UHTMP_FMT         MTR_W_UHTMP_PRE "%u"
#define MTR_FIG_UNIQUE_SFX      ":unique"

/*
 * HASH mtr:{worker}:settled, field HOUR -> "T V DIGEST": a closed hour the
 * worker found fully billed and took out of mtr:hours at T (Unix s); V 0
 * until one more read at least grace after T confirmed it, then 1; DIGEST
 * the SHA1 of its writer layout before that read ("-" when it has none)
 */
#define MTR_W_SETTLED           "mtr:{worker}:settled"

/* mtr:{worker}:p:PSTART fields: SUBJECT|METER and SUBJECT|METER|open */
#define MTR_PERIOD_SEQ_FMT      "%s|%s"
#define MTR_PERIOD_OPEN_SFX     "|open"
#define MTR_PERIOD_OPEN_FMT     MTR_PERIOD_SEQ_FMT MTR_PERIOD_OPEN_SFX

/* mtr:{worker}:stats fields */
#define MTR_STATS_LAST_DRAIN    "last_drain"
#define MTR_STATS_RECORDS_SENT  "records_sent"
#define MTR_STATS_QUANTITY_SENT "quantity_sent"

/*
 * A record's "covers" field: one line "HOUR KH FIELD VALUE" per mtr:u field
 * it bills.  A mtr:{worker}:stripe:late member: "ID CUSTOMER METER
 * PERIOD_START QUANTITY PERIOD_END".
 */
#define MTR_COVERS_SEP          ' '


/* governance: written by meterctl and the worker's sync */

/* HASH mtr:key:{KH} */
#define MTR_KEY_PRE             "mtr:key:{"
#define MTR_KEY_FMT             MTR_KEY_PRE "%s}"
#define MTR_KEY_CUSTOMER        "customer"
#define MTR_KEY_PREFIX          "prefix"
#define MTR_KEY_CREATED         "created"
#define MTR_KEY_REVOKED         "revoked"

/* HASH mtr:cust:{CUSTOMER} */
#define MTR_CUST_PRE            "mtr:cust:{"
#define MTR_CUST_FMT            MTR_CUST_PRE "%s}"
#define MTR_CUST_STATUS         "status"
#define MTR_CUST_REASON         "reason"
#define MTR_CUST_SINCE          "since"
#define MTR_CUST_SOURCE         "source"
#define MTR_CUST_STATUS_AT      "status_at"
#define MTR_CUST_PROJECTED      "projected"
#define MTR_CUST_ITEM           "item."         /* + METER */
#define MTR_CUST_ITEM_FMT       MTR_CUST_ITEM "%s"

#define MTR_STATUS_ACTIVE       "active"
#define MTR_STATUS_DELINQUENT   "delinquent"
#define MTR_REASON_OVERDUE      "invoice_overdue"
#define MTR_REASON_CREDIT       "credit_exhausted"
#define MTR_SOURCE_MANUAL       "manual"
#define MTR_SOURCE_SYNC         "sync"

#define MTR_CUSTOMERS           "mtr:customers"
#define MTR_BYPC                "mtr:bypc"
#define MTR_BYSUB               "mtr:bysub"

/* SET mtr:ckeys:{CUSTOMER} of KH */
#define MTR_CKEYS_PRE           "mtr:ckeys:{"
#define MTR_CKEYS_FMT           MTR_CKEYS_PRE "%s}"

/* HASH mtr:reg:{CUSTOMER}, a registration in progress */
#define MTR_REG_PRE             "mtr:reg:{"
#define MTR_REG_FMT             MTR_REG_PRE "%s}"

/* HASH mtr:w:sync, the delinquency sync */
#define MTR_W_SYNC              "mtr:w:sync"

/* STRING mtr:wh:PROVIDER:EVENT_ID, a webhook delivery applied */
#define MTR_WH_PRE              "mtr:wh:"
#define MTR_WH_FMT              MTR_WH_PRE "%s:%s"


/* alerts: meter-worker's alert state, hash tag {alert} */

/* HASH mtr:{alert}:e:ID, one fired alert and its deliveries */
#define MTR_A_EVENT_PRE         "mtr:{alert}:e:"        /* + ID */
#define MTR_A_EVENT_FMT         MTR_A_EVENT_PRE "%s"
/* ZSET of IDs with a delivery not done, score = next attempt */
#define MTR_A_OPEN              "mtr:{alert}:open"
/* ZSET of every ID kept, score = when fired */
#define MTR_A_LOG               "mtr:{alert}:log"
/* HASH, field RULE|CUSTOMER -> last period fired (state rules) */
#define MTR_A_LAST              "mtr:{alert}:last"
#define MTR_A_LAST_FMT          "%s|%s"
/* HASH mtr:{alert}:h:PSTART, :d:PSTART, :m:PSTART: usage of the closed
 * hours of that hour, UTC day and UTC month, field KH|METER -> units; the
 * hour's hash is written once, with "_" = 1, and adds to the other two */
#define MTR_A_HOUR_PRE          "mtr:{alert}:h:"        /* + PSTART */
#define MTR_A_HOUR_FMT          MTR_A_HOUR_PRE "%lld"
#define MTR_A_DAY_PRE           "mtr:{alert}:d:"        /* + PSTART */
#define MTR_A_DAY_FMT           MTR_A_DAY_PRE "%lld"
#define MTR_A_MONTH_PRE         "mtr:{alert}:m:"        /* + PSTART */
#define MTR_A_MONTH_FMT         MTR_A_MONTH_PRE "%lld"
#define MTR_A_SUM_FIELD_FMT     "%s|%s"


/* the projection the module reads */

/*
 * HASH mtr:gov, field KH ->
 * CUSTOMER \t STATUS \t REASON \t SINCE \t REVOKED, STATUS 'a' or 'd'
 */
#define MTR_GOV                 "mtr:gov"
#define MTR_GOV_SEP             '\t'
#define MTR_GOV_NFIELDS         5
#define MTR_GOV_ACTIVE          'a'
#define MTR_GOV_DELINQUENT      'd'
/* printf arguments: customer, status char, reason, since, revoked */
#define MTR_GOV_FMT             "%s\t%c\t%s\t%s\t%s"

/* STRING mtr:gov:version, integer */
#define MTR_GOV_VERSION         "mtr:gov:version"

/*
 * ZSET mtr:gov:log, what each version changed in mtr:gov: score VERSION,
 * member "VERSION KH KH ..." (the fields rewritten; none: only
 * mtr:gov:credit moved; MTR_GOV_LOG_ALL: too many to list).  A version
 * missing from it (an older writer, a crash) means: read all of mtr:gov.
 */
#define MTR_GOV_LOG             "mtr:gov:log"
#define MTR_GOV_LOG_ALL         "*"
#define MTR_GOV_LOG_KEEP        10000   /* versions kept */
#define MTR_GOV_LOG_MAXKEYS     1000    /* more in one version: ALL */

/* HASH mtr:gov:credit, field CUSTOMER|METER -> units granted in total */
#define MTR_GOV_CREDIT          "mtr:gov:credit"
#define MTR_GOV_CREDIT_SEP      '|'
#define MTR_GOV_CREDIT_FMT      "%s|%s"


/*
 * HASH mtr:gov:quota, plans and their quotas (the worker and meterctl
 * write it, the module reads it at every refresh):
 *   field CUSTOMER        -> PLAN
 *   field CUSTOMER|METER  -> LIMIT \t WINDOW \t RESET \t ALLOWANCE
 * WINDOW the period's length (s), RESET its end (Unix s), ALLOWANCE =
 * LIMIT + the lifetime usage of the customer's keys before the period.
 */
#define MTR_GOV_QUOTA           "mtr:gov:quota"
#define MTR_GOV_QUOTA_SEP       '\t'
#define MTR_GOV_QUOTA_NFIELDS   4
/* printf arguments: limit, window, reset, allowance */
#define MTR_GOV_QUOTA_FMT       "%lld\t%lld\t%lld\t%lld"
#define MTR_PLAN_MAX            32

/* mtr:cust:{CUSTOMER} fields of the plan */
#define MTR_CUST_PLAN           "plan"
#define MTR_CUST_ANCHOR         "anchor"        /* Unix s; absent: UTC */

/* HASH mtr:qbase:{KH}, field METER|PSTART -> units flushed before PSTART */
#define MTR_QBASE_PRE           "mtr:qbase:{"
#define MTR_QBASE_FMT           MTR_QBASE_PRE "%s}"
#define MTR_QBASE_FIELD_FMT     "%s|%lld"


#endif /* _METER_SCHEMA_H_INCLUDED_ */
