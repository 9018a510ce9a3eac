
/*
 * Copyright (C) nginx-meter authors
 *
 * The parts of ngx_http_meter_module that do not need nginx: key hashing,
 * hour bucketing, directive argument parsing, the shared-memory counter
 * table and flush batching.  Kept free of nginx types so that cmocka tests
 * link them directly.
 *
 * The counter table is a fixed-size open-addressing hash table placed in
 * the shared-memory zone.  Requests update it without any lock:
 *
 *   - a slot is claimed with a compare-and-swap of its state
 *     (EMPTY or reusable TOMB -> CLAIM), filled, then published as LIVE;
 *   - a LIVE slot's count grows with a compare-and-swap that fails when the
 *     slot's DEAD bit is set (it is being evicted);
 *   - eviction (flusher only) sets the DEAD bit with a compare-and-swap that
 *     succeeds only when count == flushed, so no increment is ever lost;
 *   - a tombstone is reused only when no request that matched the old key
 *     can still be between its lookup and its compare-and-swap (below).
 *
 * Why a tombstone needs a grace: an adder that matched a LIVE slot and then
 * lost the CPU retries its compare-and-swap on whatever count it finds.  If
 * the slot was evicted and claimed for another key meanwhile, the count has
 * no DEAD bit again and the old key's call would be billed to the new key.
 *
 * Reclamation by quiescent states (QSBR) instead of a fixed 60 s:
 *
 *   - every eviction takes a ticket from the table's era counter with an
 *     atomic fetch-and-add after its DEAD compare-and-swap, and stores it in
 *     the tombstone's stamp;
 *   - every process that adds registers a record (its pid) before its first
 *     add and, from its flush timer (every meter_flush_interval, never
 *     inside an add: nginx workers are single-threaded), announces the era
 *     it reads there;
 *   - a record that announces a > s read a value written by ticket s's
 *     fetch-and-add or a later one (a release sequence: every write of the
 *     era is a read-modify-write), so that announce happens after eviction
 *     s, and every add of that process in flight at eviction s has ended;
 *   - reuse_below is the lowest era announced by the records (capped by the
 *     era read before looking at them, so a process that registers meanwhile
 *     only registers after those evictions); a tombstone whose ticket is
 *     below it is reusable.  Records of dead pids are dropped.
 *
 * A tombstone thus comes back about one flush interval after its eviction.
 * A process that stops announcing (stopped, stuck) keeps reuse_below where
 * it is; then tombstones evicted more than METER_TOMB_GRACE seconds ago are
 * reused anyway, the rule this table always had (era_old: the era sampled
 * one grace earlier).  If a process cannot register (records full), only
 * that rule applies.
 *
 * Two slots for the same (hour, key, meter) may exist (two workers claiming
 * at once, a slot skipped while CLAIM).  That is harmless by design: every
 * slot has its own GEN, hence its own Redis field, and totals are sums over
 * fields (docs/redis-schema.md).  A worker killed in the middle of a claim
 * leaves a CLAIM slot that the flusher turns into a tombstone later; nothing
 * a killed process leaves behind is a lock.
 */


#ifndef _METER_CORE_H_INCLUDED_
#define _METER_CORE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "meter_schema.h"


#define METER_HASH_LEN          32      /* binary SHA-256 */
#define METER_HEX_LEN           64
#define METER_NAME_MAX          32
#define METER_HOUR_LEN          10      /* "YYYYMMDDHH" */
#define METER_STATUS_RANGES_MAX 16

#define METER_DEAD              ((uint64_t) 1 << 63)
#define METER_VALUE_MAX         (METER_DEAD - 1)

#define METER_SLOT_EMPTY        0
#define METER_SLOT_CLAIM        1
#define METER_SLOT_LIVE         2
#define METER_SLOT_TOMB         3

#define METER_TOMB_GRACE        60      /* s: tombstone reused even if some
                                         * process never announced */
#define METER_CLAIM_STUCK       60      /* seconds before a CLAIM is abandoned */
#define METER_PROBE_MAX         256     /* probe length limit: table "full" */
#define METER_QS_MAX            256     /* processes that may add at once */

/* redis key/field buffer sizes, including the terminating NUL */
#define METER_DATA_KEY_SIZE     (sizeof(MTR_U_PRE MTR_U_MID) - 1            \
                                 + METER_HEX_LEN + METER_HOUR_LEN + 1)
#define METER_IDX_KEY_SIZE      (sizeof(MTR_IDX_PRE) - 1 + METER_HOUR_LEN + 1)
#define METER_FIELD_SIZE        (METER_NAME_MAX + 1 + 16 + 1 + 10 + 1)
#define METER_USED_KEY_SIZE     (sizeof(MTR_USED_PRE MTR_USED_END) - 1      \
                                 + METER_HEX_LEN + 1)


/* key hashing: out gets the binary SHA-256 of the key */
void meter_key_hash(const void *key, size_t len,
    uint8_t out[METER_HASH_LEN]);
/* lowercase hex of n bytes; out must have room for 2 * n + 1 chars */
void meter_hex(const uint8_t *in, size_t n, char *out);


/* hour bucketing: hours since the Unix epoch, UTC */
uint32_t meter_hour(time_t t);
time_t meter_hour_start(uint32_t hour);
/* writes "YYYYMMDDHH" + NUL into buf (METER_HOUR_LEN + 1 bytes), returns 10 */
size_t meter_hour_format(uint32_t hour, char *buf);


/*
 * Directive argument parsing.  All return 0 on success and -1 on error,
 * with *err set to a static message naming the bad part.
 */

typedef struct {
    uint16_t                    lo;
    uint16_t                    hi;
} meter_status_range_t;

typedef struct {
    meter_status_range_t        r[METER_STATUS_RANGES_MAX];
    unsigned                    n;          /* 0: every status matches */
} meter_status_filter_t;

/* "200", "2xx", "200-299", comma separated lists thereof; 100..599 */
int meter_parse_status(const char *s, size_t len, meter_status_filter_t *f,
    const char **err);
int meter_status_match(const meter_status_filter_t *f, unsigned status);

/*
 * "GET,POST,..." (case sensitive, as HTTP methods are) -> bit mask.
 * Known: GET HEAD POST PUT DELETE MKCOL COPY MOVE OPTIONS PROPFIND
 * PROPPATCH LOCK UNLOCK PATCH TRACE CONNECT.
 */
int meter_parse_methods(const char *s, size_t len, uint32_t *mask,
    const char **err);
/* bit of one method name, 0 when unknown */
uint32_t meter_method_bit(const char *name, size_t len);

/*
 * A variable's value as a count: decimal digits only, no sign, no spaces,
 * at most METER_VALUE_MAX.  Empty and "-" (nginx's "no value") are errors.
 */
int meter_parse_value(const char *s, size_t len, uint64_t *v);

/* meter names: [A-Za-z0-9_.-]{1,32} */
int meter_valid_name(const char *s, size_t len);


/* the shared-memory counter table */

typedef struct {
    uint64_t                    count;      /* atomic; METER_DEAD bit */
    uint64_t                    flushed;    /* atomic max, flusher only */
    uint32_t                    state;      /* atomic METER_SLOT_* */
    uint32_t                    hour;
    uint32_t                    gen;
    uint32_t                    stamp;      /* claim/tombstone time, s */
    uint8_t                     key[METER_HASH_LEN];
    char                        meter[METER_NAME_MAX]; /* NUL padded */
} meter_entry_t;

/* units counted, striped by process (its record's index) so that workers
 * adding at once do not share a cache line; one stripe is 64 bytes */
#define METER_COUNT_STRIPES     16

typedef struct {
    uint64_t                    v;          /* atomic */
    uint64_t                    pad[7];
} meter_stripe_t;

/* a process that adds: its quiescent-state record */
typedef struct {
    uint32_t                    pid;        /* atomic, 0: free */
    uint32_t                    pad;
    uint64_t                    era;        /* atomic, last announced */
} meter_qs_t;

typedef struct {
    uint64_t                    epoch;      /* random, set at creation */
    uint32_t                    nslots;
    uint32_t                    gen;        /* atomic, next GEN */
    uint64_t                    live;       /* atomic, LIVE slots */
    uint64_t                    dropped;    /* atomic, calls not counted */
    uint64_t                    dropped_value; /* atomic, their values */

    /* tombstone reuse (see the top of this file) */
    uint64_t                    era;        /* atomic, eviction tickets */
    uint64_t                    reuse_below; /* atomic, max only */
    uint64_t                    era_mark;   /* flusher: era at mark_time */
    uint64_t                    era_old;    /* flusher: era one grace ago */
    uint32_t                    mark_time;
    uint32_t                    qs_full;    /* a process found no record */
    uint32_t                    swept_hour; /* atomic, last hour whose past
                                             * hours a full pass swept */
    uint32_t                    pad;
    meter_qs_t                  qs[METER_QS_MAX];

    /* pending = counted - confirmed, so meter_status costs O(1), not a
     * walk of every slot */
    meter_stripe_t              counted[METER_COUNT_STRIPES];
    uint64_t                    confirmed;  /* atomic, flushed raised by */
    uint64_t                    pad2[7];

    meter_entry_t               slots[];
} meter_table_t;

/* bytes needed for n slots; how many slots fit into size bytes */
size_t meter_table_size(uint32_t nslots);
uint32_t meter_table_slots_for(size_t size);
void meter_table_init(meter_table_t *t, uint32_t nslots, uint64_t epoch);

/*
 * Adds value to the counter of (hour, key, meter), claiming a slot when
 * there is none.  Lock-free, safe from many processes at once.
 * Returns 0, or -1 when no slot could be found within METER_PROBE_MAX
 * probes (the call is then added to dropped/dropped_value).
 */
int meter_table_add(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint64_t value, uint32_t now);

/* the same for a gauge: the counter keeps the largest value added */
int meter_table_max(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint64_t value, uint32_t now);

/*
 * A quiescent point of process pid (its flush timer, never inside an add):
 * registers it on first call, which must come before its first add.
 * Returns -1 when every record is taken (reuse then waits for the grace).
 */
int meter_table_announce(meter_table_t *t, uint32_t pid);
/* pid adds no more (it exits) */
void meter_table_leave(meter_table_t *t, uint32_t pid);
/*
 * Flusher only, once a pass: advances the METER_TOMB_GRACE fallback and
 * publishes which tombstones are reusable.
 */
void meter_table_quiesce(meter_table_t *t, uint32_t now);

/* the first LIVE slot of (hour, key, meter), or NULL */
meter_entry_t *meter_table_find(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen);

/*
 * Flusher only.  Evicts one LIVE slot if everything it counted is flushed:
 * returns 1 if evicted, 0 if not.  (now is unused: a tombstone carries an
 * era ticket, not a time.)
 */
int meter_table_evict(meter_table_t *t, meter_entry_t *e, uint32_t now);

/*
 * Flusher only.  Evicts flushed slots of hours before current_hour; when
 * more than 3/4 of the slots are LIVE, flushed slots of the current hour
 * too.  Turns CLAIM slots older than METER_CLAIM_STUCK into tombstones.
 * Returns the number of slots evicted.
 */
unsigned meter_table_sweep(meter_table_t *t, uint32_t current_hour,
    uint32_t now);
/* the same over slots [from, to): a flusher sweeps slice by slice, so a
 * large zone never stalls its event loop */
unsigned meter_table_sweep_range(meter_table_t *t, uint32_t from,
    uint32_t to, uint32_t current_hour, uint32_t now);

/* units counted in LIVE slots and not confirmed yet (every slot's
 * count - flushed, summed), in O(METER_COUNT_STRIPES) */
uint64_t meter_table_pending(meter_table_t *t);

/* slot's current count without the DEAD bit; its unflushed part */
uint64_t meter_entry_count(meter_entry_t *e);
uint64_t meter_entry_pending(meter_entry_t *e);


/* flush batching */

typedef struct {
    meter_entry_t              *e;
    uint32_t                    gen;        /* e->gen when collected */
    uint32_t                    hour;
    uint64_t                    value;      /* absolute count sent */
    uint32_t                    keyed;      /* the key layout (credit) */
    uint32_t                    part;       /* writer hash: slot index
                                             * >> MTR_WPART_SHIFT */
} meter_batch_item_t;

typedef struct {
    meter_batch_item_t         *items;      /* caller-owned array */
    unsigned                    cap;
    unsigned                    n;
    uint32_t                    cursor;     /* next slot to scan */
    unsigned                    wrapped;    /* cursor passed the end */
    unsigned                    all;        /* take flushed slots too */
} meter_batch_t;

/*
 * Collects up to b->cap LIVE slots whose count differs from flushed (with
 * b->all: every LIVE slot with a count, to rewrite a Redis that lost data),
 * scanning at most max_scan slots from b->cursor and advancing it; sets
 * b->wrapped when the scan reached the end of the table (cursor is then 0).
 * Resets b->n first.  Returns b->n.
 */
unsigned meter_batch_collect(meter_table_t *t, meter_batch_t *b,
    uint32_t max_scan);

/*
 * The same, driven by the dirty bitmap (one bit per slot, set by every
 * add): visits at most max_words bitmap words (64 slots each) from
 * b->cursor, clearing the bits it takes, so a pass costs what changed, not
 * the size of the zone.  A batch that Redis did not confirm must be put
 * back with meter_batch_remark().  Bits can be lost with a process killed
 * between collect and confirm: a flusher runs meter_batch_collect() over the
 * whole table from time to time, and when it takes over from another.
 */
unsigned meter_batch_collect_dirty(meter_table_t *t, meter_batch_t *b,
    uint32_t max_words);
void meter_batch_remark(meter_table_t *t, const meter_batch_t *b);

/*
 * Redis acknowledged item->value: raises the slot's flushed to it (atomic
 * max) unless the slot was reused since (gen differs), and t->confirmed
 * by as much.  Returns by how much flushed rose.
 */
uint64_t meter_batch_confirm(meter_table_t *t, const meter_batch_item_t *item);

/*
 * Flusher only, after the batch's replies: evicts the items of hours
 * before current_hour that Redis now holds entirely, so that every pass,
 * not only a full scan, frees the slots of past hours.  Returns how many.
 */
unsigned meter_batch_reclaim(meter_table_t *t, const meter_batch_t *b,
    uint32_t current_hour, uint32_t now);


/* redis names (docs/redis-schema.md); each returns the length written */

/* "mtr:u:{KH}:HOUR" */
size_t meter_fmt_data_key(char *buf, const uint8_t key[METER_HASH_LEN],
    uint32_t hour);
/* "mtr:used:{KH}" */
size_t meter_fmt_used_key(char *buf, const uint8_t key[METER_HASH_LEN]);
/* "mtr:idx:HOUR" */
size_t meter_fmt_idx_key(char *buf, uint32_t hour);
/* "METER|EPOCH.GEN" with EPOCH as 16 lowercase hex digits */
size_t meter_fmt_field(char *buf, const char *meter, uint64_t epoch,
    uint32_t gen);
/* decimal */
size_t meter_fmt_u64(char *buf, uint64_t v);

/* the writer layout: "mtr:wu:{EPOCH}:SID:HOUR:PART", "mtr:widx:HOUR",
 * "EPOCH:SID:NPARTS" */
#define METER_WRITER_SIZE       (16 + 1 + 20 + 1 + 10 + 1)
#define METER_WKEY_SIZE         (sizeof(MTR_WU_PRE) - 1 + 16 + 2 + 20 + 1  \
                                 + METER_HOUR_LEN + 1 + 10 + 1)
#define METER_WIDX_KEY_SIZE     (sizeof(MTR_WIDX_PRE) - 1 + METER_HOUR_LEN + 1)
#define meter_wparts(nslots)                                                 \
    ((uint32_t) (((uint64_t) (nslots) + MTR_WPART_SLOTS - 1)                 \
                 >> MTR_WPART_SHIFT))
size_t meter_fmt_writer(char *buf, uint64_t epoch, uint64_t sid,
    uint32_t nparts);
size_t meter_fmt_wkey(char *buf, uint64_t epoch, uint64_t sid,
    const char *hour, uint32_t part);
size_t meter_fmt_widx_key(char *buf, const char *hour);

/*
 * RESP, built by hand into the caller's buffer (no allocation, no printf):
 * each returns the end of what it wrote.  meter_resp_wfield() writes one
 * field and value of a writer-layout HSET: "KH|METER|GEN" and the item's
 * absolute value, at most METER_RESP_WFIELD_MAX bytes.
 */
#define METER_RESP_WFIELD_MAX   (6 + METER_HEX_LEN + 1 + METER_NAME_MAX + 1 \
                                 + 10 + 2 + 5 + 20 + 2)
char *meter_resp_array(char *p, unsigned n);
char *meter_resp_bulk(char *p, const char *s, size_t len);
char *meter_resp_wfield(char *p, const meter_batch_item_t *it);

/* the max-only script of docs/redis-schema.md */
extern const char meter_script_max[];


/*
 * Unique users (meter ... unique=$var): a dedupe table in the zone.  A
 * member is the first 64 bits of SHA-256(value); an entry is (key hash,
 * meter, unique period, value hash) and holds the member.  The value hash
 * is a fast 64-bit hash seeded at random per table: a value seen before
 * for the same key, meter and period costs the request path that hash and
 * one probe, no SHA-256 (two thirds of the cost, bench/README.md) and no
 * Redis work; a new one computes its member, is claimed DIRTY and marked
 * in a dirty bitmap (a bit an entry) that the flush walks, which marks it
 * SENT, then CLEAN once Redis answered (or DIRTY again when it did not).
 *
 * Lock-free as the counter table: a slot is claimed with a compare-and-
 * swap of its state word (gen << 8 | METER_U_*), filled, then published.
 * The tags (one 64-bit fingerprint per slot, contiguous, 0: never used)
 * keep the probe to one or two cache lines.  Slots never become empty
 * again, so a member's entry is always before the first empty slot of its
 * probe window, where a lookup stops.  When the window has no empty slot,
 * a CLEAN entry is overwritten (preferably one of another period): that
 * only costs a resend if it comes back (SADD and PFADD are idempotent).
 * A reader checks an entry like a seqlock: state, fields, state again; an
 * overwrite changes the gen, so a torn read is never taken as seen.  When
 * every slot of the window is unconfirmed (Redis down long enough to fill
 * it) the member is not recorded and counts in "dropped".
 */

#define METER_U_EMPTY           0
#define METER_U_CLAIM           1
#define METER_U_DIRTY           2       /* new, to be sent */
#define METER_U_SENT            3       /* in a batch not answered yet */
#define METER_U_CLEAN           4       /* Redis holds it */
#define METER_U_STATE(s)        ((uint32_t) ((s) & 0xff))

#define METER_UPROBE            32      /* probe window */
#define METER_UNIQ_MIN          METER_UPROBE /* entries, at least */
#define METER_UNIQ_SHARE        16      /* 1/16 of a zone is the table */
#define METER_MEMBER_LEN        16      /* hex chars of a member */
#define METER_UPERIOD_LEN       10      /* "YYYYMMDDHH", the longest */

#define METER_UPERIOD_MONTH     0
#define METER_UPERIOD_DAY       1
#define METER_UPERIOD_HOUR      2

typedef struct {
    uint64_t                    state;      /* atomic: gen << 8 | METER_U_ */
    uint64_t                    vhash;      /* the value's fast hash */
    uint64_t                    member;
    uint32_t                    period;     /* YYYYMM, YYYYMMDD, YYYYMMDDHH */
    uint32_t                    stamp;      /* claimed, Unix s */
    uint8_t                     key[METER_HASH_LEN];
    char                        meter[METER_NAME_MAX]; /* NUL padded */
} meter_uentry_t;

typedef struct {
    uint32_t                    nslots;
    uint32_t                    pad;
    uint64_t                    live;       /* atomic: entries in use */
    uint64_t                    dirty;      /* atomic: DIRTY or SENT */
    uint64_t                    evicted;    /* atomic: CLEAN overwritten */
    uint64_t                    dropped;    /* atomic: not recorded */
    uint64_t                    seed;       /* random, of the value hash */
    uint64_t                    pad2[2];
    uint64_t                    tags[];     /* nslots, then the entries */
} meter_uniq_t;

/* bytes per entry: its tag and the entry */
#define METER_UNIQ_ENTRY_SIZE   (sizeof(uint64_t) + sizeof(meter_uentry_t))
                                /* + 1 bit of the dirty bitmap */

size_t meter_uniq_size(uint32_t nslots);
uint32_t meter_uniq_slots_for(size_t size);
void meter_uniq_init(meter_uniq_t *u, uint32_t nslots, uint64_t seed);
meter_uentry_t *meter_uniq_entry(meter_uniq_t *u, uint32_t i);

/* the unique period of t as a number: YYYYMM, YYYYMMDD or YYYYMMDDHH */
uint32_t meter_uperiod(time_t t, unsigned period);
/* its month, YYYYMM */
uint32_t meter_uperiod_month(uint32_t up);
/* decimal, no NUL: the length (6, 8 or 10) */
size_t meter_uperiod_format(uint32_t up, char *buf);
/* the member of a value: the first 64 bits of its SHA-256 */
uint64_t meter_member(const void *value, size_t len);
/* 16 lowercase hex digits, no NUL */
void meter_member_format(uint64_t member, char *buf);
/* the dedupe table's hash of a value: fast, 64 bits, seeded */
uint64_t meter_value_hash(const void *value, size_t len, uint64_t seed);

/*
 * Records (key, meter, period, value).  Returns 0 when it was there
 * already, 1 when it is new (DIRTY, its member computed: the flush sends
 * it), -1 when it could not be recorded (counted in dropped).  Lock-free,
 * any process.
 */
int meter_uniq_add(meter_uniq_t *u, const uint8_t key[METER_HASH_LEN],
    const char *meter, size_t mlen, uint32_t period, const void *value,
    size_t vlen, uint32_t now);

/* the flush of the table: a batch of entries marked SENT */

typedef struct {
    uint32_t                    slot;
    uint32_t                    group;      /* the flush's (KH, NAME, UP) */
    uint64_t                    state;      /* as marked SENT */
} meter_uitem_t;

typedef struct {
    meter_uitem_t              *items;      /* caller-owned array */
    unsigned                    cap;
    unsigned                    n;
    uint32_t                    cursor;     /* next slot to scan */
    unsigned                    wrapped;    /* cursor passed the end */
    unsigned                    all;        /* CLEAN ones too (resync) */
    unsigned                    full;       /* every slot, not the bitmap */
} meter_ubatch_t;

/*
 * Flusher only: marks up to b->cap DIRTY entries SENT into the batch and
 * sets b->wrapped at the end; resets b->n first, returns b->n.  By the
 * dirty bitmap (a bit per entry, set when it becomes DIRTY), at most
 * max_scan / 64 words from b->cursor, so a pass costs what is new, not
 * the table; with b->full or b->all, every slot instead, at most max_scan
 * from b->cursor, taking SENT ones too (a dead flusher's, whose bits it
 * took) and with b->all CLEAN ones (resync).
 */
unsigned meter_uniq_collect(meter_uniq_t *u, meter_ubatch_t *b,
    uint32_t max_scan);
/* Redis holds the item: SENT -> CLEAN, unless it changed since */
void meter_uniq_confirm(meter_uniq_t *u, const meter_uitem_t *it);
/* not confirmed: SENT -> DIRTY, resent by the next pass */
void meter_uniq_remark(meter_uniq_t *u, const meter_ubatch_t *b);

/* the unique users script of docs/redis-schema.md */
extern const char meter_script_uniq[];


#endif /* _METER_CORE_H_INCLUDED_ */
