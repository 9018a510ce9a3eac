
/*
 * Copyright (C) nginx-meter authors
 *
 * See meter_core.h for the lock-free table design.  Memory ordering:
 * a claimer fills a slot while it is CLAIM and publishes it with a release
 * compare-and-swap to LIVE; readers acquire-load the state before they look
 * at hour, key, meter or gen.  Evict and sweep write stamp before they
 * publish TOMB, so a reader that sees TOMB also sees its fresh stamp, and
 * an era at least one above it (the ticket was taken before).
 */


/* gmtime_r() under -std=c11; nginx's CFLAGS may already define it */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* SHA256_Init/Transform: deprecated in 3.0, present in every 3.x */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#include "meter_core.h"


#define meter_load(p)        __atomic_load_n(p, __ATOMIC_ACQUIRE)
#define meter_load_relaxed(p) __atomic_load_n(p, __ATOMIC_RELAXED)
#define meter_store(p, v)    __atomic_store_n(p, v, __ATOMIC_RELEASE)
#define meter_store_relaxed(p, v)                                             \
    __atomic_store_n(p, v, __ATOMIC_RELAXED)
#define meter_cas(p, expp, v)                                                 \
    __atomic_compare_exchange_n(p, expp, v, 0, __ATOMIC_ACQ_REL,              \
                                __ATOMIC_ACQUIRE)
#define meter_fetch_add(p, v) __atomic_fetch_add(p, v, __ATOMIC_RELAXED)
#define meter_fetch_sub(p, v) __atomic_fetch_sub(p, v, __ATOMIC_RELAXED)

/* big-endian, as SHA-256 writes its length and its digest */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define meter_be32(v)        __builtin_bswap32(v)
#define meter_be64(v)        __builtin_bswap64(v)
#else
#define meter_be32(v)        (v)
#define meter_be64(v)        (v)
#endif

/* last hour whose "YYYYMMDDHH" still has a 4-digit year: 9999-12-31 23h */
#define METER_HOUR_LAST      70389527


static uint32_t meter_slot_home(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen);
static int meter_entry_match(meter_entry_t *e, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen);
static void meter_digits(char *p, unsigned v, unsigned n);
static int meter_parse_status_item(const char *s, size_t len,
    meter_status_range_t *r, const char **err);
static unsigned meter_sweep_pass(meter_table_t *t, uint32_t from,
    uint32_t to, uint32_t current_hour, uint32_t now, int pressure);
static int meter_tomb_reusable(meter_table_t *t, meter_entry_t *e);
static void meter_publish_safe(meter_table_t *t);
/* inlined into each of its two callers, max a constant there: a sum
 * meter's add costs what it did before gauges */
static inline int meter_table_update(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint64_t value, uint32_t now, int max) __attribute__((always_inline));


static const char  *meter_methods[] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE",
    "OPTIONS", "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE",
    "CONNECT", NULL
};


/* verbatim from docs/redis-schema.md */
const char  meter_script_max[] =
    "-- KEYS[1] = mtr:u:{KH}:HOUR, KEYS[2] = mtr:used:{KH}\n"
    "-- ARGV = field, value, base [, field, value, base ...]\n"
    "-- base: the count Redis confirmed for this slot in the writer layout\n"
    "-- decimal strings throughout: 64-bit values never become doubles\n"
    "local function gt(a, b)\n"
    "  return #a > #b or (#a == #b and a > b)\n"
    "end\n"
    "local function sub(a, b)\n"
    "  local r, borrow = {}, 0\n"
    "  for i = 0, #a - 1 do\n"
    "    local d = a:byte(#a - i) - 48 - borrow\n"
    "    local e = i < #b and b:byte(#b - i) - 48 or 0\n"
    "    borrow = d < e and 1 or 0\n"
    "    r[#a - i] = d + 10 * borrow - e\n"
    "  end\n"
    "  return (table.concat(r):gsub('^0+(%d)', '%1'))\n"
    "end\n"
    "for i = 1, #ARGV, 3 do\n"
    "  local cur = redis.call('HGET', KEYS[1], ARGV[i]) or '0'\n"
    "  local v, from = ARGV[i + 1], ARGV[i + 2]\n"
    "  if gt(v, cur) then\n"
    "    if gt(cur, from) then from = cur end\n"
    "    if gt(v, from) then\n"
    "      -- first: if the total would overflow, nothing is written\n"
    "      local m = ARGV[i]:match('^[^|]+')\n"
    "      redis.call('HINCRBY', KEYS[2], m, sub(v, from))\n"
    "    end\n"
    "    redis.call('HSET', KEYS[1], ARGV[i], v)\n"
    "  end\n"
    "end\n"
    "return 1\n";


/*
 * SHA-256 through the low-level API, deprecated in OpenSSL 3 but in every
 * 3.x: EVP frees and allocates the provider's context in every
 * EVP_DigestInit_ex2() (issue 12: 937 of 2,975 instructions a key), and
 * SHA256_Final() cleanses its buffer byte by byte.  A key that fits one
 * block (55 bytes and the 9 of the padding, FIPS 180-4 5.1.1) is padded
 * here and compressed by one SHA256_Transform(), which reads only the
 * state h; a longer one goes through SHA256_Update().  t/unit/test_meter_core.c checks both against the
 * published vectors.
 */

/* FIPS 180-4 5.3.3, what SHA256_Init() sets */
static const uint32_t  meter_sha256_iv[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
};


void
meter_key_hash(const void *key, size_t len, uint8_t out[METER_HASH_LEN])
{
    uint8_t     block[SHA256_CBLOCK];
    uint32_t    w[8];
    uint64_t    bits;
    SHA256_CTX  c;

    if (key == NULL) {
        key = "";
        len = 0;
    }

    if (len > SHA256_CBLOCK - 9) {
        SHA256_Init(&c);
        SHA256_Update(&c, key, len);
        SHA256_Final(out, &c);
        return;
    }

    memcpy(c.h, meter_sha256_iv, sizeof(meter_sha256_iv));

    memset(block, 0, SHA256_CBLOCK);
    memcpy(block, key, len);
    block[len] = 0x80;

    bits = meter_be64((uint64_t) len * 8);
    memcpy(block + SHA256_CBLOCK - 8, &bits, 8);

    SHA256_Transform(&c, block);

    /* unrolled: the build's -O does not */
    w[0] = meter_be32(c.h[0]);
    w[1] = meter_be32(c.h[1]);
    w[2] = meter_be32(c.h[2]);
    w[3] = meter_be32(c.h[3]);
    w[4] = meter_be32(c.h[4]);
    w[5] = meter_be32(c.h[5]);
    w[6] = meter_be32(c.h[6]);
    w[7] = meter_be32(c.h[7]);

    memcpy(out, w, METER_HASH_LEN);
}


void
meter_hex(const uint8_t *in, size_t n, char *out)
{
    size_t             i;
    static const char  hex[] = "0123456789abcdef";

    for (i = 0; i < n; i++) {
        *out++ = hex[in[i] >> 4];
        *out++ = hex[in[i] & 0xf];
    }

    *out = '\0';
}


uint32_t
meter_hour(time_t t)
{
    if (t < 0) {
        return 0;
    }

    return (uint32_t) (t / 3600);
}


time_t
meter_hour_start(uint32_t hour)
{
    return (time_t) hour * 3600;
}


static void
meter_digits(char *p, unsigned v, unsigned n)
{
    while (n--) {
        p[n] = (char) ('0' + v % 10);
        v /= 10;
    }
}


size_t
meter_hour_format(uint32_t hour, char *buf)
{
    time_t     t;
    struct tm  tm;

    /* keeps the output at 10 characters whatever the argument */
    if (hour > METER_HOUR_LAST) {
        hour = METER_HOUR_LAST;
    }

    t = meter_hour_start(hour);

    if (gmtime_r(&t, &tm) == NULL) {
        memset(&tm, 0, sizeof(struct tm));
        tm.tm_year = 70;
        tm.tm_mday = 1;
    }

    meter_digits(buf, (unsigned) tm.tm_year + 1900, 4);
    meter_digits(buf + 4, (unsigned) tm.tm_mon + 1, 2);
    meter_digits(buf + 6, (unsigned) tm.tm_mday, 2);
    meter_digits(buf + 8, (unsigned) tm.tm_hour, 2);
    buf[METER_HOUR_LEN] = '\0';

    return METER_HOUR_LEN;
}


int
meter_parse_status(const char *s, size_t len, meter_status_filter_t *f,
    const char **err)
{
    size_t       i, start;
    unsigned     n;

    n = 0;
    start = 0;

    for (i = 0; i <= len; i++) {

        if (i < len && s[i] != ',') {
            continue;
        }

        if (n == METER_STATUS_RANGES_MAX) {
            *err = "too many status ranges";
            f->n = 0;
            return -1;
        }

        if (meter_parse_status_item(s + start, i - start, &f->r[n], err)
            != 0)
        {
            f->n = 0;
            return -1;
        }

        n++;
        start = i + 1;
    }

    f->n = n;

    return 0;
}


static int
meter_parse_status_item(const char *s, size_t len, meter_status_range_t *r,
    const char **err)
{
    size_t    i;
    unsigned  v[2];

    *err = "status must be NNN, Nxx or NNN-NNN between 100 and 599";

    if (len == 3 && s[0] >= '1' && s[0] <= '5'
        && s[1] == 'x' && s[2] == 'x')
    {
        r->lo = (uint16_t) ((s[0] - '0') * 100);
        r->hi = (uint16_t) (r->lo + 99);
        return 0;
    }

    if (len != 3 && !(len == 7 && s[3] == '-')) {
        return -1;
    }

    for (i = 0; i < len; i++) {
        if (i == 3) {
            continue;
        }

        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }
    }

    v[0] = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
    v[1] = v[0];

    if (len == 7) {
        v[1] = (s[4] - '0') * 100 + (s[5] - '0') * 10 + (s[6] - '0');
    }

    if (v[0] < 100 || v[0] > 599 || v[1] < 100 || v[1] > 599) {
        return -1;
    }

    if (v[0] > v[1]) {
        *err = "status range must not end below its start";
        return -1;
    }

    r->lo = (uint16_t) v[0];
    r->hi = (uint16_t) v[1];

    return 0;
}


int
meter_status_match(const meter_status_filter_t *f, unsigned status)
{
    unsigned  i;

    if (f->n == 0) {
        return 1;
    }

    for (i = 0; i < f->n; i++) {
        if (status >= f->r[i].lo && status <= f->r[i].hi) {
            return 1;
        }
    }

    return 0;
}


int
meter_parse_methods(const char *s, size_t len, uint32_t *mask,
    const char **err)
{
    size_t    i, start;
    uint32_t  m, bit;

    m = 0;
    start = 0;

    for (i = 0; i <= len; i++) {

        if (i < len && s[i] != ',') {
            continue;
        }

        bit = meter_method_bit(s + start, i - start);

        if (bit == 0) {
            *err = "unknown method (names are case sensitive: GET, POST, ...)";
            return -1;
        }

        m |= bit;
        start = i + 1;
    }

    *mask = m;

    return 0;
}


uint32_t
meter_method_bit(const char *name, size_t len)
{
    size_t  i;

    /* the bits are nginx's NGX_HTTP_GET (0x2) ... NGX_HTTP_CONNECT */
    for (i = 0; meter_methods[i] != NULL; i++) {
        if (strlen(meter_methods[i]) == len
            && memcmp(meter_methods[i], name, len) == 0)
        {
            return (uint32_t) 2 << i;
        }
    }

    return 0;
}


int
meter_parse_value(const char *s, size_t len, uint64_t *v)
{
    size_t    i;
    uint64_t  n, d;

    if (len == 0) {
        return -1;
    }

    n = 0;

    for (i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }

        d = (uint64_t) (s[i] - '0');

        if (n > (METER_VALUE_MAX - d) / 10) {
            return -1;
        }

        n = n * 10 + d;
    }

    *v = n;

    return 0;
}


int
meter_valid_name(const char *s, size_t len)
{
    size_t  i;
    char    c;

    if (len == 0 || len > METER_NAME_MAX) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        c = s[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-')
        {
            continue;
        }

        return 0;
    }

    return 1;
}


size_t
meter_table_size(uint32_t nslots)
{
    /* the slots, then the dirty bitmap: one bit per slot */
    return sizeof(meter_table_t) + (size_t) nslots * sizeof(meter_entry_t)
           + (((size_t) nslots + 63) / 64) * sizeof(uint64_t);
}


static uint64_t *
meter_dirty(meter_table_t *t)
{
    return (uint64_t *) (void *) &t->slots[t->nslots];
}


/*
 * An add marks its slot dirty after counting.  Both sides are sequentially
 * consistent: if the add sees the bit still set, the collector's exchange
 * comes later, and its read of the count then sees the add.
 */

static void
meter_bit_set(uint64_t *map, uint32_t i)
{
    uint64_t  *w, bit;

    w = &map[i >> 6];
    bit = (uint64_t) 1 << (i & 63);

    /* a set bit costs a load, not a locked write to a shared line */
    if ((__atomic_load_n(w, __ATOMIC_SEQ_CST) & bit) == 0) {
        (void) __atomic_fetch_or(w, bit, __ATOMIC_SEQ_CST);
    }
}


static void
meter_mark(meter_table_t *t, uint32_t i)
{
    meter_bit_set(meter_dirty(t), i);
}


uint32_t
meter_table_slots_for(size_t size)
{
    size_t  n;

    if (size < sizeof(meter_table_t)) {
        return 0;
    }

    n = (size - sizeof(meter_table_t)) / sizeof(meter_entry_t);

    if (n > UINT32_MAX) {
        n = UINT32_MAX;
    }

    while (n > 0 && meter_table_size((uint32_t) n) > size) {
        n--;
    }

    return (uint32_t) n;
}


void
meter_table_init(meter_table_t *t, uint32_t nslots, uint64_t epoch)
{
    memset(t, 0, meter_table_size(nslots));

    t->epoch = epoch;
    t->nslots = nslots;
}


/* this process's stripe of counted[], set when it registers (an nginx
 * worker is one thread; before any announce: stripe 0) */
static uint32_t  meter_stripe;


static uint32_t
meter_slot_home(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen)
{
    size_t    i;
    uint64_t  h, k, fnv;

    fnv = 0xcbf29ce484222325ULL;

    for (i = 0; i < mlen; i++) {
        fnv ^= (uint8_t) meter[i];
        fnv *= 0x100000001b3ULL;
    }

    memcpy(&k, key, sizeof(uint64_t));

    h = k ^ ((uint64_t) hour * 0x9e3779b97f4a7c15ULL)
        ^ (fnv * 0xc2b2ae3d27d4eb4fULL);

    /* splitmix64 finalizer */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;

    return (uint32_t) (h % t->nslots);
}


static int
meter_entry_match(meter_entry_t *e, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen)
{
    return e->hour == hour
           && memcmp(e->key, key, METER_HASH_LEN) == 0
           && memcmp(e->meter, meter, mlen) == 0
           && (mlen == METER_NAME_MAX || e->meter[mlen] == '\0');
}


int
meter_table_add(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint64_t value, uint32_t now)
{
    return meter_table_update(t, hour, key, meter, mlen, value, now, 0);
}


int
meter_table_max(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint64_t value, uint32_t now)
{
    return meter_table_update(t, hour, key, meter, mlen, value, now, 1);
}


/* with max, the count becomes the largest value instead of the sum: it
 * still only grows, so flushing and eviction are the same */
static inline int
meter_table_update(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint64_t value, uint32_t now, int max)
{
    uint32_t        home, nprobe, i, tomb, st, expect;
    uint64_t        c;
    meter_entry_t  *e;

    if (t->nslots == 0 || mlen == 0 || mlen > METER_NAME_MAX
        || value > METER_VALUE_MAX)
    {
        goto dropped;
    }

    home = meter_slot_home(t, hour, key, meter, mlen);
    nprobe = t->nslots < METER_PROBE_MAX ? t->nslots : METER_PROBE_MAX;

again:

    tomb = UINT32_MAX;
    i = 0;

    for ( ;; ) {

        if (i == nprobe) {
            if (tomb == UINT32_MAX) {
                goto dropped;
            }

            e = &t->slots[(home + tomb) % t->nslots];
            expect = METER_SLOT_TOMB;

        } else {
            e = &t->slots[(home + i) % t->nslots];
            st = meter_load(&e->state);

            if (st == METER_SLOT_LIVE) {

                if (meter_entry_match(e, hour, key, meter, mlen)) {
                    c = meter_load_relaxed(&e->count);

                    /* a dead slot is being evicted, an almost full one
                     * would overflow into the DEAD bit: look further,
                     * a new slot is a new Redis field */

                    while (max && (c & METER_DEAD) == 0) {
                        if (value <= c) {
                            return 0;
                        }

                        if (meter_cas(&e->count, &c, value)) {
                            meter_mark(t, (uint32_t) (e - t->slots));
                            meter_fetch_add(&t->counted[meter_stripe].v,
                                            value - c);
                            return 0;
                        }
                    }

                    while (!max && (c & METER_DEAD) == 0
                           && value <= METER_VALUE_MAX - c)
                    {
                        if (meter_cas(&e->count, &c, c + value)) {
                            meter_mark(t, (uint32_t) (e - t->slots));
                            meter_fetch_add(&t->counted[meter_stripe].v,
                                            value);
                            return 0;
                        }
                    }
                }

                i++;
                continue;
            }

            if (st == METER_SLOT_CLAIM) {
                i++;
                continue;
            }

            if (st == METER_SLOT_TOMB) {

                if (tomb == UINT32_MAX && meter_tomb_reusable(t, e)) {
                    tomb = i;
                }

                i++;
                continue;
            }

            /* EMPTY: the key is not further down the chain */

            if (tomb != UINT32_MAX) {
                e = &t->slots[(home + tomb) % t->nslots];
                expect = METER_SLOT_TOMB;

            } else {
                expect = METER_SLOT_EMPTY;
            }
        }

        st = expect;

        if (meter_cas(&e->state, &st, METER_SLOT_CLAIM)) {
            break;
        }

        /* lost the race for that slot: look at it again */

        if (expect == METER_SLOT_TOMB) {
            i = tomb;
            tomb = UINT32_MAX;
        }
    }

    /* first the stamp, so that a sweep does not take the claim as stuck */
    meter_store_relaxed(&e->stamp, now);

    e->hour = hour;
    memcpy(e->key, key, METER_HASH_LEN);
    memset(e->meter, 0, METER_NAME_MAX);
    memcpy(e->meter, meter, mlen);
    meter_store_relaxed(&e->flushed, 0);
    meter_store_relaxed(&e->count, value);
    e->gen = meter_fetch_add(&t->gen, 1);

    meter_fetch_add(&t->live, 1);

    st = METER_SLOT_CLAIM;

    if (!meter_cas(&e->state, &st, METER_SLOT_LIVE)) {
        /* a sweep took this claim for stuck: start over */
        meter_fetch_sub(&t->live, 1);
        goto again;
    }

    meter_mark(t, (uint32_t) (e - t->slots));
    meter_fetch_add(&t->counted[meter_stripe].v, value);

    return 0;

dropped:

    meter_fetch_add(&t->dropped, 1);
    meter_fetch_add(&t->dropped_value, value);

    return -1;
}


meter_entry_t *
meter_table_find(meter_table_t *t, uint32_t hour,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen)
{
    uint32_t        home, nprobe, i, st;
    meter_entry_t  *e;

    if (t->nslots == 0 || mlen == 0 || mlen > METER_NAME_MAX) {
        return NULL;
    }

    home = meter_slot_home(t, hour, key, meter, mlen);
    nprobe = t->nslots < METER_PROBE_MAX ? t->nslots : METER_PROBE_MAX;

    for (i = 0; i < nprobe; i++) {
        e = &t->slots[(home + i) % t->nslots];
        st = meter_load(&e->state);

        if (st == METER_SLOT_EMPTY) {
            break;
        }

        if (st == METER_SLOT_LIVE
            && meter_entry_match(e, hour, key, meter, mlen))
        {
            return e;
        }
    }

    return NULL;
}


int
meter_table_evict(meter_table_t *t, meter_entry_t *e, uint32_t now)
{
    uint64_t  c;

    if (meter_load(&e->state) != METER_SLOT_LIVE) {
        return 0;
    }

    c = meter_load(&e->count);

    if ((c & METER_DEAD) || c != meter_load(&e->flushed)) {
        return 0;
    }

    (void) now;

    /* fails if a request added to the slot since it was read */
    if (!meter_cas(&e->count, &c, c | METER_DEAD)) {
        return 0;
    }

    /* the ticket comes after the DEAD bit: see meter_core.h */
    meter_store_relaxed(&e->stamp, (uint32_t)
                        __atomic_fetch_add(&t->era, 1, __ATOMIC_SEQ_CST));
    meter_store(&e->state, METER_SLOT_TOMB);
    meter_fetch_sub(&t->live, 1);

    return 1;
}


unsigned
meter_table_sweep(meter_table_t *t, uint32_t current_hour, uint32_t now)
{
    return meter_table_sweep_range(t, 0, t->nslots, current_hour, now);
}


unsigned
meter_table_sweep_range(meter_table_t *t, uint32_t from, uint32_t to,
    uint32_t current_hour, uint32_t now)
{
    unsigned  n;

    if (to > t->nslots) {
        to = t->nslots;
    }

    n = meter_sweep_pass(t, from, to, current_hour, now, 0);

    /* evicting current-hour slots costs new Redis fields: only as needed */
    if (meter_load_relaxed(&t->live) * 4 > (uint64_t) t->nslots * 3) {
        n += meter_sweep_pass(t, from, to, current_hour, now, 1);
    }

    return n;
}


static unsigned
meter_sweep_pass(meter_table_t *t, uint32_t from, uint32_t to,
    uint32_t current_hour, uint32_t now, int pressure)
{
    uint32_t        i, st, stamp;
    unsigned        n;
    meter_entry_t  *e;

    n = 0;

    for (i = from; i < to; i++) {
        e = &t->slots[i];
        st = meter_load(&e->state);

        if (st == METER_SLOT_LIVE) {

            if (pressure) {
                if (meter_load_relaxed(&t->live) * 4
                    <= (uint64_t) t->nslots * 3)
                {
                    break;
                }

            } else if (e->hour >= current_hour) {
                continue;
            }

            n += meter_table_evict(t, e, now);
            continue;
        }

        if (st == METER_SLOT_CLAIM && !pressure) {
            stamp = meter_load_relaxed(&e->stamp);

            if (now > stamp && now - stamp > METER_CLAIM_STUCK) {
                /* a ticket first: the tombstone then waits for every
                 * process, the stuck one included, or for the grace */
                meter_store_relaxed(&e->stamp, (uint32_t)
                                    __atomic_fetch_add(&t->era, 1,
                                                       __ATOMIC_SEQ_CST));
                meter_cas(&e->state, &st, METER_SLOT_TOMB);
            }
        }
    }

    return n;
}


/*
 * The era ticket of a tombstone: its stamp holds the low 32 bits; the era
 * read after the state is above it, so the full value is the largest one
 * not above the era with those bits (an older one only waits longer).
 */

static int
meter_tomb_reusable(meter_table_t *t, meter_entry_t *e)
{
    uint32_t  stamp;
    uint64_t  era, ticket;

    stamp = meter_load_relaxed(&e->stamp);
    era = __atomic_load_n(&t->era, __ATOMIC_SEQ_CST);
    ticket = era - (uint32_t) ((uint32_t) era - stamp);

    return ticket < meter_load(&t->reuse_below);
}


/* a process that the kernel does not know cannot be inside an add */

static int
meter_pid_gone(uint32_t pid)
{
    return kill((pid_t) pid, 0) == -1 && errno == ESRCH;
}


/*
 * Raises reuse_below to the lowest era that the live records announced, or
 * to era_old: any process may compute it, every result is safe and the
 * published value only grows.
 */

static void
meter_publish_safe(meter_table_t *t)
{
    uint32_t     i, pid;
    uint64_t     low, a, cur;
    meter_qs_t  *q;

    low = __atomic_load_n(&t->era, __ATOMIC_SEQ_CST);

    for (i = 0; i < METER_QS_MAX; i++) {
        q = &t->qs[i];
        pid = __atomic_load_n(&q->pid, __ATOMIC_SEQ_CST);

        if (pid == 0) {
            continue;
        }

        if (meter_pid_gone(pid)) {
            (void) meter_cas(&q->pid, &pid, 0);
            continue;
        }

        a = __atomic_load_n(&q->era, __ATOMIC_SEQ_CST);

        if (a < low) {
            low = a;
        }
    }

    if (meter_load(&t->qs_full)) {
        /* some process adds without a record: only the grace is safe */
        low = 0;
    }

    a = meter_load(&t->era_old);

    if (a > low) {
        low = a;
    }

    cur = meter_load(&t->reuse_below);

    while (cur < low) {
        if (meter_cas(&t->reuse_below, &cur, low)) {
            break;
        }
    }
}


int
meter_table_announce(meter_table_t *t, uint32_t pid)
{
    uint32_t     i, free;
    meter_qs_t  *q;

    q = NULL;

    for (i = 0; i < METER_QS_MAX; i++) {
        if (__atomic_load_n(&t->qs[i].pid, __ATOMIC_SEQ_CST) == pid) {
            q = &t->qs[i];
            break;
        }
    }

    for (i = 0; q == NULL && i < METER_QS_MAX; i++) {
        free = 0;

        if (meter_cas(&t->qs[i].pid, &free, pid)) {
            q = &t->qs[i];
        }
    }

    if (q == NULL) {
        meter_store(&t->qs_full, 1);
        return -1;
    }

    meter_stripe = (uint32_t) (q - t->qs) % METER_COUNT_STRIPES;

    __atomic_store_n(&q->era, __atomic_load_n(&t->era, __ATOMIC_SEQ_CST),
                     __ATOMIC_SEQ_CST);

    meter_publish_safe(t);

    return 0;
}


void
meter_table_leave(meter_table_t *t, uint32_t pid)
{
    uint32_t  i, cur;

    for (i = 0; i < METER_QS_MAX; i++) {
        cur = pid;

        if (meter_cas(&t->qs[i].pid, &cur, 0)) {
            return;
        }
    }
}


void
meter_table_quiesce(meter_table_t *t, uint32_t now)
{
    if (now < t->mark_time) {
        /* the clock went back: the grace starts over */
        t->mark_time = now;

    } else if (now - t->mark_time >= METER_TOMB_GRACE) {
        /* every ticket below era_mark is one grace old now */
        meter_store(&t->era_old, t->era_mark);
        t->era_mark = __atomic_load_n(&t->era, __ATOMIC_SEQ_CST);
        t->mark_time = now;
    }

    meter_publish_safe(t);
}


uint64_t
meter_entry_count(meter_entry_t *e)
{
    return meter_load(&e->count) & ~METER_DEAD;
}


uint64_t
meter_table_pending(meter_table_t *t)
{
    uint32_t  i;
    uint64_t  c, f;

    /* confirmed first: a confirmed value was counted before, so a reader
     * only sees counted < confirmed while an add is between its count's
     * compare-and-swap and its fetch-and-add */
    f = __atomic_load_n(&t->confirmed, __ATOMIC_ACQUIRE);
    c = 0;

    for (i = 0; i < METER_COUNT_STRIPES; i++) {
        c += __atomic_load_n(&t->counted[i].v, __ATOMIC_RELAXED);
    }

    return c > f ? c - f : 0;
}


uint64_t
meter_entry_pending(meter_entry_t *e)
{
    uint64_t  c, f;

    c = meter_entry_count(e);
    f = meter_load(&e->flushed);

    return c > f ? c - f : 0;
}


/* adds a LIVE slot whose count moved past what Redis has to the batch */

static void
meter_batch_take(meter_batch_t *b, meter_entry_t *e)
{
    uint64_t             c;
    meter_batch_item_t  *item;

    if (meter_load(&e->state) != METER_SLOT_LIVE) {
        return;
    }

    c = meter_load(&e->count);

    if ((c & METER_DEAD) == 0
        && (b->all ? c != 0 : c != meter_load(&e->flushed)))
    {
        item = &b->items[b->n++];
        item->e = e;
        item->gen = e->gen;
        item->hour = e->hour;
        item->value = c;
    }
}


unsigned
meter_batch_collect(meter_table_t *t, meter_batch_t *b, uint32_t max_scan)
{
    uint32_t        scanned;
    meter_entry_t  *e;

    b->n = 0;
    b->wrapped = 0;

    if (t->nslots == 0) {
        b->cursor = 0;
        b->wrapped = 1;
        return 0;
    }

    if (b->cursor >= t->nslots) {
        b->cursor = 0;
    }

    for (scanned = 0; scanned < max_scan && b->n < b->cap; scanned++) {
        e = &t->slots[b->cursor];

        meter_batch_take(b, e);

        if (++b->cursor == t->nslots) {
            b->cursor = 0;
            b->wrapped = 1;
            break;
        }
    }

    return b->n;
}


unsigned
meter_batch_collect_dirty(meter_table_t *t, meter_batch_t *b,
    uint32_t max_words)
{
    uint32_t   nwords, words, bit, i;
    uint64_t   bits, *w;

    b->n = 0;
    b->wrapped = 0;

    nwords = (t->nslots + 63) / 64;

    for (words = 0; words < max_words; words++) {

        if (b->cursor >= nwords) {
            break;
        }

        w = &meter_dirty(t)[b->cursor];

        if (__atomic_load_n(w, __ATOMIC_RELAXED) == 0) {
            b->cursor++;
            continue;
        }

        bits = __atomic_exchange_n(w, 0, __ATOMIC_SEQ_CST);

        while (bits) {
            bit = (uint32_t) __builtin_ctzll(bits);
            i = b->cursor * 64 + bit;

            if (b->n == b->cap) {
                /* full: what is not taken stays marked for the next call */
                (void) __atomic_fetch_or(w, bits, __ATOMIC_SEQ_CST);
                return b->n;
            }

            bits &= bits - 1;

            if (i >= t->nslots) {
                continue;
            }

            meter_batch_take(b, &t->slots[i]);
        }

        b->cursor++;
    }

    if (b->cursor >= nwords) {
        b->cursor = 0;
        b->wrapped = 1;
    }

    return b->n;
}


void
meter_batch_remark(meter_table_t *t, const meter_batch_t *b)
{
    unsigned  i;

    for (i = 0; i < b->n; i++) {
        meter_mark(t, (uint32_t) (b->items[i].e - t->slots));
    }
}


uint64_t
meter_batch_confirm(meter_table_t *t, const meter_batch_item_t *item)
{
    uint64_t        f;
    meter_entry_t  *e;

    e = item->e;

    if (meter_load(&e->state) != METER_SLOT_LIVE || e->gen != item->gen) {
        return 0;
    }

    f = meter_load(&e->flushed);

    while (f < item->value) {
        if (meter_cas(&e->flushed, &f, item->value)) {
            (void) __atomic_fetch_add(&t->confirmed, item->value - f,
                                      __ATOMIC_RELEASE);
            return item->value - f;
        }
    }

    return 0;
}


unsigned
meter_batch_reclaim(meter_table_t *t, const meter_batch_t *b,
    uint32_t current_hour, uint32_t now)
{
    unsigned             i, n;
    meter_entry_t       *e;
    meter_batch_item_t  *it;

    n = 0;

    for (i = 0; i < b->n; i++) {
        it = &b->items[i];
        e = it->e;

        /* a late add since the collect makes evict refuse: the slot is
         * dirty again and goes with the next pass */
        if (it->hour < current_hour
            && meter_load(&e->state) == METER_SLOT_LIVE
            && e->gen == it->gen)
        {
            n += meter_table_evict(t, e, now);
        }
    }

    return n;
}


size_t
meter_fmt_data_key(char *buf, const uint8_t key[METER_HASH_LEN],
    uint32_t hour)
{
    char  *p;

    p = buf;

    memcpy(p, MTR_U_PRE, sizeof(MTR_U_PRE) - 1);
    p += sizeof(MTR_U_PRE) - 1;

    meter_hex(key, METER_HASH_LEN, p);
    p += METER_HEX_LEN;

    memcpy(p, MTR_U_MID, sizeof(MTR_U_MID) - 1);
    p += sizeof(MTR_U_MID) - 1;

    p += meter_hour_format(hour, p);

    return (size_t) (p - buf);
}


size_t
meter_fmt_idx_key(char *buf, uint32_t hour)
{
    memcpy(buf, MTR_IDX_PRE, sizeof(MTR_IDX_PRE) - 1);

    return sizeof(MTR_IDX_PRE) - 1
           + meter_hour_format(hour, buf + sizeof(MTR_IDX_PRE) - 1);
}


size_t
meter_fmt_field(char *buf, const char *meter, uint64_t epoch, uint32_t gen)
{
    char    *p;
    size_t   len;

    /* an entry's meter is NUL padded, not terminated when 32 long */
    for (len = 0; len < METER_NAME_MAX && meter[len] != '\0'; len++) {
        /* void */
    }

    p = buf;

    memcpy(p, meter, len);
    p += len;

    p += snprintf(p, METER_FIELD_SIZE - len, MTR_WRITER_FMT,
                  (unsigned long long) epoch, (unsigned long) gen);

    return (size_t) (p - buf);
}


size_t
meter_fmt_u64(char *buf, uint64_t v)
{
    return (size_t) snprintf(buf, sizeof("18446744073709551615"), "%llu",
                             (unsigned long long) v);
}


size_t
meter_fmt_used_key(char *buf, const uint8_t key[METER_HASH_LEN])
{
    memcpy(buf, MTR_USED_PRE, sizeof(MTR_USED_PRE) - 1);
    meter_hex(key, METER_HASH_LEN, buf + sizeof(MTR_USED_PRE) - 1);
    buf[METER_USED_KEY_SIZE - 2] = MTR_USED_END[0];
    buf[METER_USED_KEY_SIZE - 1] = '\0';

    return METER_USED_KEY_SIZE - 1;
}


/* "0123456789abcdef" per byte, two characters each */
static const char  meter_hex2[] =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
    "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
    "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
    "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
    "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";


/* decimal without a NUL: the length */
static size_t
meter_dec(char *buf, uint64_t v)
{
    char    tmp[20], *p;
    size_t  n;

    p = tmp + sizeof(tmp);

    do {
        *--p = (char) ('0' + v % 10);
        v /= 10;
    } while (v);

    n = (size_t) (tmp + sizeof(tmp) - p);
    memcpy(buf, p, n);

    return n;
}


static char *
meter_hex16(char *p, uint64_t v)
{
    int  i;

    for (i = 7; i >= 0; i--) {
        memcpy(p, &meter_hex2[2 * ((v >> (8 * i)) & 0xff)], 2);
        p += 2;
    }

    return p;
}


size_t
meter_fmt_writer(char *buf, uint64_t epoch, uint64_t sid, uint32_t nparts)
{
    char  *p;

    p = meter_hex16(buf, epoch);
    *p++ = MTR_WRITER_SEP;
    p += meter_dec(p, sid);
    *p++ = MTR_WRITER_SEP;
    p += meter_dec(p, nparts);
    *p = '\0';

    return (size_t) (p - buf);
}


size_t
meter_fmt_wkey(char *buf, uint64_t epoch, uint64_t sid, const char *hour,
    uint32_t part)
{
    char  *p;

    p = buf;
    memcpy(p, MTR_WU_PRE, sizeof(MTR_WU_PRE) - 1);
    p += sizeof(MTR_WU_PRE) - 1;
    p = meter_hex16(p, epoch);
    *p++ = '}';
    *p++ = ':';
    p += meter_dec(p, sid);
    *p++ = ':';
    memcpy(p, hour, METER_HOUR_LEN);
    p += METER_HOUR_LEN;
    *p++ = ':';
    p += meter_dec(p, part);
    *p = '\0';

    return (size_t) (p - buf);
}


size_t
meter_fmt_widx_key(char *buf, const char *hour)
{
    memcpy(buf, MTR_WIDX_PRE, sizeof(MTR_WIDX_PRE) - 1);
    memcpy(buf + sizeof(MTR_WIDX_PRE) - 1, hour, METER_HOUR_LEN);
    buf[sizeof(MTR_WIDX_PRE) - 1 + METER_HOUR_LEN] = '\0';

    return sizeof(MTR_WIDX_PRE) - 1 + METER_HOUR_LEN;
}


char *
meter_resp_array(char *p, unsigned n)
{
    *p++ = '*';
    p += meter_dec(p, n);
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


char *
meter_resp_bulk(char *p, const char *s, size_t len)
{
    *p++ = '$';
    p += meter_dec(p, len);
    *p++ = '\r';
    *p++ = '\n';
    memcpy(p, s, len);
    p += len;
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


char *
meter_resp_wfield(char *p, const meter_batch_item_t *it)
{
    char            gen[10], val[20];
    size_t          mlen, glen, vlen, i;
    const uint8_t  *k;

    for (mlen = 0; mlen < METER_NAME_MAX && it->e->meter[mlen] != '\0';
         mlen++)
    {
        /* void */
    }

    glen = meter_dec(gen, it->gen);
    vlen = meter_dec(val, it->value);

    *p++ = '$';
    p += meter_dec(p, METER_HEX_LEN + 1 + mlen + 1 + glen);
    *p++ = '\r';
    *p++ = '\n';

    k = it->e->key;

    for (i = 0; i < METER_HASH_LEN; i++) {
        memcpy(p, &meter_hex2[2 * k[i]], 2);
        p += 2;
    }

    *p++ = MTR_FIELD_SEP;
    memcpy(p, it->e->meter, mlen);
    p += mlen;
    *p++ = MTR_FIELD_SEP;
    memcpy(p, gen, glen);
    p += glen;
    *p++ = '\r';
    *p++ = '\n';

    *p++ = '$';
    p += meter_dec(p, vlen);
    *p++ = '\r';
    *p++ = '\n';
    memcpy(p, val, vlen);
    p += vlen;
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


/* verbatim from docs/redis-schema.md ("Unique users") */
const char  meter_script_uniq[] =
    "-- KEYS[1] = the exact set, KEYS[2] = the HyperLogLog\n"
    "-- ARGV = limit, member [, member ...]\n"
    "-- idempotent: a resent call adds nothing twice\n"
    "redis.call('PFADD', KEYS[2], unpack(ARGV, 2))\n"
    "local n = redis.call('SCARD', KEYS[1])\n"
    "local limit = tonumber(ARGV[1])\n"
    "for i = 2, #ARGV do\n"
    "  if n >= limit then break end\n"
    "  n = n + redis.call('SADD', KEYS[1], ARGV[i])\n"
    "end\n"
    "return n\n";


size_t
meter_uniq_size(uint32_t nslots)
{
    /* the tags, the entries, the dirty bitmap */
    return sizeof(meter_uniq_t) + (size_t) nslots * METER_UNIQ_ENTRY_SIZE
           + (((size_t) nslots + 63) / 64) * sizeof(uint64_t);
}


static uint64_t *
meter_uniq_dirty(meter_uniq_t *u)
{
    return (uint64_t *) (void *) (meter_uniq_entry(u, 0) + u->nslots);
}


/* as meter_mark(): the bit after the state, both sequentially consistent */

static void
meter_uniq_mark(meter_uniq_t *u, uint32_t i)
{
    meter_bit_set(meter_uniq_dirty(u), i);
}


uint32_t
meter_uniq_slots_for(size_t size)
{
    size_t  n;

    if (size < sizeof(meter_uniq_t)) {
        return 0;
    }

    n = (size - sizeof(meter_uniq_t)) / METER_UNIQ_ENTRY_SIZE;

    if (n > UINT32_MAX) {
        n = UINT32_MAX;
    }

    while (n > 0 && meter_uniq_size((uint32_t) n) > size) {
        n--;
    }

    return (uint32_t) n;
}


void
meter_uniq_init(meter_uniq_t *u, uint32_t nslots, uint64_t seed)
{
    memset(u, 0, meter_uniq_size(nslots));

    u->nslots = nslots;
    u->seed = seed;
}


#define meter_rotl(x, r)     (((x) << (r)) | ((x) >> (64 - (r))))

uint64_t
meter_value_hash(const void *value, size_t len, uint64_t seed)
{
    uint64_t        h, w;
    const uint8_t  *p;

    p = value;
    h = seed ^ ((uint64_t) len * 0x9e3779b97f4a7c15ULL);

    /* 8 bytes a step: each word multiplied (injective), folded in */
    for ( /* void */ ; len >= 8; len -= 8, p += 8) {
        memcpy(&w, p, 8);
        h ^= w * 0xbf58476d1ce4e5b9ULL;
        h = meter_rotl(h, 29) * 0x94d049bb133111ebULL;
    }

    if (len) {
        w = 0;
        memcpy(&w, p, len);
        h ^= w * 0xbf58476d1ce4e5b9ULL;
        h = meter_rotl(h, 29) * 0x94d049bb133111ebULL;
    }

    /* splitmix64 finalizer */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;

    return h;
}


meter_uentry_t *
meter_uniq_entry(meter_uniq_t *u, uint32_t i)
{
    return (meter_uentry_t *) (void *) &u->tags[u->nslots] + i;
}


/*
 * One gmtime_r() an hour per process, not one a request (an nginx worker
 * is one thread).
 */

static time_t    meter_up_hour = -1;
static uint32_t  meter_up_cache[3];

uint32_t
meter_uperiod(time_t t, unsigned period)
{
    time_t     h;
    struct tm  tm;

    if (t < 0) {
        t = 0;
    }

    h = t / 3600;

    if (h != meter_up_hour) {
        if (gmtime_r(&t, &tm) == NULL || tm.tm_year + 1900 > 9999) {
            memset(&tm, 0, sizeof(struct tm));
            tm.tm_year = 70;
            tm.tm_mday = 1;
        }

        meter_up_cache[0] = (uint32_t) (tm.tm_year + 1900) * 100
                            + (uint32_t) tm.tm_mon + 1;
        meter_up_cache[1] = meter_up_cache[0] * 100 + (uint32_t) tm.tm_mday;
        meter_up_cache[2] = meter_up_cache[1] * 100 + (uint32_t) tm.tm_hour;
        meter_up_hour = h;
    }

    return meter_up_cache[period > METER_UPERIOD_HOUR ? METER_UPERIOD_HOUR
                                                      : period];
}


uint32_t
meter_uperiod_month(uint32_t up)
{
    while (up >= 1000000) {
        up /= 100;
    }

    return up;
}


size_t
meter_uperiod_format(uint32_t up, char *buf)
{
    size_t  n;

    n = up >= 100000000 ? 10 : up >= 1000000 ? 8 : 6;
    meter_digits(buf, up, (unsigned) n);

    return n;
}


uint64_t
meter_member(const void *value, size_t len)
{
    uint8_t   h[METER_HASH_LEN];
    uint64_t  m;

    meter_key_hash(value, len, h);
    memcpy(&m, h, sizeof(uint64_t));

    return meter_be64(m);
}


static uint64_t
meter_uniq_fp(const uint8_t key[METER_HASH_LEN], const char *meter,
    size_t mlen, uint32_t period, uint64_t vhash)
{
    size_t    i;
    uint64_t  h, k, fnv;

    fnv = 0xcbf29ce484222325ULL;

    for (i = 0; i < mlen; i++) {
        fnv ^= (uint8_t) meter[i];
        fnv *= 0x100000001b3ULL;
    }

    memcpy(&k, key, sizeof(uint64_t));

    /* vhash is a hash already; key and name mixed in, then splitmix64 */
    h = vhash ^ (k * 0x9e3779b97f4a7c15ULL) ^ (fnv * 0xc2b2ae3d27d4eb4fULL)
        ^ ((uint64_t) period << 17);

    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;

    return h ? h : 1;
}


static int
meter_uentry_match(meter_uentry_t *e, const uint8_t key[METER_HASH_LEN],
    const char *meter, size_t mlen, uint32_t period, uint64_t vhash)
{
    return e->vhash == vhash && e->period == period
           && memcmp(e->key, key, METER_HASH_LEN) == 0
           && memcmp(e->meter, meter, mlen) == 0
           && (mlen == METER_NAME_MAX || e->meter[mlen] == '\0');
}


/* fills a claimed slot and publishes it DIRTY with gen */

static void
meter_uniq_fill(meter_uniq_t *u, uint32_t j, uint64_t gen,
    const uint8_t key[METER_HASH_LEN], const char *meter, size_t mlen,
    uint32_t period, uint64_t vhash, const void *value, size_t vlen,
    uint64_t fp, uint32_t now)
{
    meter_uentry_t  *e;

    e = meter_uniq_entry(u, j);

    /* SHA-256 only for a value new here */
    e->vhash = vhash;
    e->member = meter_member(value, vlen);
    e->period = period;
    e->stamp = now;
    memcpy(e->key, key, METER_HASH_LEN);
    memset(e->meter, 0, METER_NAME_MAX);
    memcpy(e->meter, meter, mlen);

    meter_store(&u->tags[j], fp);
    meter_fetch_add(&u->dirty, 1);
    __atomic_store_n(&e->state, gen << 8 | METER_U_DIRTY, __ATOMIC_SEQ_CST);
    meter_uniq_mark(u, j);
}


int
meter_uniq_add(meter_uniq_t *u, const uint8_t key[METER_HASH_LEN],
    const char *meter, size_t mlen, uint32_t period, const void *value,
    size_t vlen, uint32_t now)
{
    uint32_t         home, nprobe, i, j, victim, tries;
    uint64_t         fp, tag, s1, s2, st, vhash;
    meter_uentry_t  *e;

    if (u == NULL || u->nslots == 0 || mlen == 0 || mlen > METER_NAME_MAX) {
        goto dropped;
    }

    vhash = meter_value_hash(value, vlen, u->seed);
    fp = meter_uniq_fp(key, meter, mlen, period, vhash);
    home = (uint32_t) (fp % u->nslots);
    nprobe = u->nslots < METER_UPROBE ? u->nslots : METER_UPROBE;

    for (tries = 0; tries < 4; tries++) {

        victim = UINT32_MAX;

        for (i = 0; i < nprobe; i++) {
            j = home + i;
            j = (j >= u->nslots) ? j - u->nslots : j;
            e = meter_uniq_entry(u, j);

            tag = meter_load(&u->tags[j]);

            if (tag == 0) {
                /* never used: the member is not further down */
                st = 0;

                if (meter_cas(&e->state, &st, (uint64_t) 1 << 8
                                              | METER_U_CLAIM))
                {
                    meter_fetch_add(&u->live, 1);
                    meter_uniq_fill(u, j, 1, key, meter, mlen, period,
                                    vhash, value, vlen, fp, now);
                    return 1;
                }

                /* another claimed it meanwhile: maybe for this member,
                 * a duplicate entry is harmless */
                continue;
            }

            s1 = meter_load(&e->state);

            if (tag == fp && METER_U_STATE(s1) >= METER_U_DIRTY
                && meter_uentry_match(e, key, meter, mlen, period, vhash))
            {
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                s2 = meter_load_relaxed(&e->state);

                /* the same gen: not overwritten while compared */
                if ((s2 >> 8) == (s1 >> 8)
                    && METER_U_STATE(s2) >= METER_U_DIRTY)
                {
                    return 0;
                }
            }

            if (METER_U_STATE(s1) == METER_U_CLEAN
                && (victim == UINT32_MAX
                    || (e->period != period
                        && meter_uniq_entry(u, victim)->period == period)))
            {
                victim = j;
            }
        }

        if (victim == UINT32_MAX) {
            break;
        }

        /* every slot of the window is used: overwrite a confirmed one */
        e = meter_uniq_entry(u, victim);
        st = meter_load(&e->state);

        if (METER_U_STATE(st) == METER_U_CLEAN
            && meter_cas(&e->state, &st,
                         ((st >> 8) + 1) << 8 | METER_U_CLAIM))
        {
            meter_fetch_add(&u->evicted, 1);
            meter_uniq_fill(u, victim, (st >> 8) + 1, key, meter, mlen,
                            period, vhash, value, vlen, fp, now);
            return 1;
        }

        /* lost the victim to another request or the flusher: again */
    }

dropped:

    if (u != NULL) {
        meter_fetch_add(&u->dropped, 1);
    }

    return -1;
}


void
meter_member_format(uint64_t member, char *buf)
{
    (void) meter_hex16(buf, member);
}


/* takes entry i into the batch if it is to be sent: SENT now */

static void
meter_uniq_take(meter_uniq_t *u, meter_ubatch_t *b, uint32_t i, int sent)
{
    uint32_t         st;
    uint64_t         s, ns;
    meter_uentry_t  *e;

    e = meter_uniq_entry(u, i);
    s = __atomic_load_n(&e->state, __ATOMIC_SEQ_CST);
    st = METER_U_STATE(s);

    if (st == METER_U_DIRTY || (sent && st == METER_U_SENT)
        || (b->all && st == METER_U_CLEAN))
    {
        ns = (s & ~(uint64_t) 0xff) | METER_U_SENT;

        if (s == ns || meter_cas(&e->state, &s, ns)) {
            if (st == METER_U_CLEAN) {
                meter_fetch_add(&u->dirty, 1);
            }

            b->items[b->n].slot = i;
            b->items[b->n].group = 0;
            b->items[b->n].state = ns;
            b->n++;
        }
    }
}


unsigned
meter_uniq_collect(meter_uniq_t *u, meter_ubatch_t *b, uint32_t max_scan)
{
    uint32_t   scanned, nwords, words, bit, i;
    uint64_t   bits, *w;

    b->n = 0;
    b->wrapped = 0;

    if (u == NULL || u->nslots == 0
        || (!b->all && meter_load(&u->dirty) == 0))
    {
        /* nothing to send: no scan at all */
        b->cursor = 0;
        b->wrapped = 1;
        return 0;
    }

    if (!b->all && !b->full) {
        nwords = (u->nslots + 63) / 64;

        for (words = 0; words < max_scan / 64 + 1; words++) {

            if (b->cursor >= nwords) {
                break;
            }

            w = &meter_uniq_dirty(u)[b->cursor];

            if (__atomic_load_n(w, __ATOMIC_RELAXED) == 0) {
                b->cursor++;
                continue;
            }

            bits = __atomic_exchange_n(w, 0, __ATOMIC_SEQ_CST);

            while (bits) {
                if (b->n == b->cap) {
                    /* full: what is not taken stays marked */
                    (void) __atomic_fetch_or(w, bits, __ATOMIC_SEQ_CST);
                    return b->n;
                }

                bit = (uint32_t) __builtin_ctzll(bits);
                bits &= bits - 1;
                i = b->cursor * 64 + bit;

                if (i < u->nslots) {
                    meter_uniq_take(u, b, i, 0);
                }
            }

            b->cursor++;
        }

        if (b->cursor >= nwords) {
            b->cursor = 0;
            b->wrapped = 1;
        }

        return b->n;
    }

    if (b->cursor >= u->nslots) {
        b->cursor = 0;
    }

    for (scanned = 0; scanned < max_scan && b->n < b->cap; scanned++) {
        meter_uniq_take(u, b, b->cursor, 1);

        if (++b->cursor == u->nslots) {
            b->cursor = 0;
            b->wrapped = 1;
            break;
        }
    }

    return b->n;
}


void
meter_uniq_confirm(meter_uniq_t *u, const meter_uitem_t *it)
{
    uint64_t         s;
    meter_uentry_t  *e;

    e = meter_uniq_entry(u, it->slot);
    s = it->state;

    if (meter_cas(&e->state, &s, (s & ~(uint64_t) 0xff) | METER_U_CLEAN)) {
        meter_fetch_sub(&u->dirty, 1);
    }
}


void
meter_uniq_remark(meter_uniq_t *u, const meter_ubatch_t *b)
{
    unsigned         i;
    uint64_t         s;
    meter_uentry_t  *e;

    for (i = 0; i < b->n; i++) {
        e = meter_uniq_entry(u, b->items[i].slot);
        s = b->items[i].state;

        if (meter_cas(&e->state, &s, (s & ~(uint64_t) 0xff) | METER_U_DIRTY))
        {
            meter_uniq_mark(u, b->items[i].slot);
        }
    }
}
