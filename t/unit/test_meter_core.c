
/*
 * Copyright (C) nginx-meter authors
 *
 * Unit tests of ngx_http_meter_module/src/meter_core.c.
 *
 * Build and run from the project root:
 *
 * cc -std=c11 -Wall -Wextra -Werror -g -fsanitize=address,undefined -I ngx_http_meter_module/src t/unit/test_meter_core.c ngx_http_meter_module/src/meter_core.c -lcmocka -lcrypto -o build/test_meter_core && ./build/test_meter_core
 */


/* fork(), waitpid(), mmap(MAP_ANONYMOUS) under -std=c11 */
#define _DEFAULT_SOURCE

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <openssl/evp.h>

#include "meter_core.h"


#define TEST_EPOCH         0x3f2a9c0d11b2e4f7ULL
#define TEST_HOUR          490000          /* 2025-11-24 16:00 UTC */
#define TEST_NOW           1764000000u
#define TEST_SLOTS         1024
#define TEST_SMALL         16

#define CONC_PROCS         4
#define CONC_ITERS         100000
#define CONC_KEYS          50
#define CONC_GENS          (1 << 20)
#define CONC_EVICT_MAX     1500


#define CONC_HOURS         16
#define CONC_RSLOTS        512


typedef struct {
    int                         done;       /* adders finished */
    int                         fail;       /* flusher's own check */
    uint64_t                    evicted;
    uint32_t                    hour[CONC_PROCS]; /* each adder's hour */
    uint64_t                    retries;    /* adds dropped, then redone */
    struct {
        uint64_t                value;      /* max value "in redis" */
        int32_t                 key;        /* -1: gen never flushed */
        uint32_t                hour;
    }                           redis[CONC_GENS];
} conc_shared_t;


static uint8_t  conc_keys[CONC_KEYS][METER_HASH_LEN];


static void
key_of(unsigned n, uint8_t key[METER_HASH_LEN])
{
    int   len;
    char  buf[32];

    len = snprintf(buf, sizeof(buf), "key-%u", n);
    meter_key_hash(buf, (size_t) len, key);
}


static meter_table_t *
table_new(uint32_t nslots)
{
    meter_table_t  *t;

    t = malloc(meter_table_size(nslots));
    assert_non_null(t);

    /* garbage first: init must not rely on zeroed memory */
    memset(t, 0xa5, meter_table_size(nslots));
    meter_table_init(t, nslots, TEST_EPOCH);

    return t;
}


static int
add(meter_table_t *t, uint32_t hour, const uint8_t *key, const char *meter,
    uint64_t value, uint32_t now)
{
    return meter_table_add(t, hour, key, meter, strlen(meter), value, now);
}


static meter_entry_t *
find(meter_table_t *t, uint32_t hour, const uint8_t *key, const char *meter)
{
    return meter_table_find(t, hour, key, meter, strlen(meter));
}


/* what the flusher does when Redis acknowledged the slot's whole count */
static void
flush_entry(meter_table_t *t, meter_entry_t *e)
{
    meter_batch_item_t  item;

    item.e = e;
    item.gen = e->gen;
    item.hour = e->hour;
    item.value = meter_entry_count(e);

    (void) meter_batch_confirm(t, &item);
}


static unsigned
count_state(meter_table_t *t, uint32_t state)
{
    uint32_t  i;
    unsigned  n;

    n = 0;

    for (i = 0; i < t->nslots; i++) {
        n += t->slots[i].state == state;
    }

    return n;
}


static int
setup_table(void **state)
{
    *state = table_new(TEST_SLOTS);
    return 0;
}


static int
setup_small(void **state)
{
    *state = table_new(TEST_SMALL);
    return 0;
}


static int
teardown_table(void **state)
{
    free(*state);
    return 0;
}


/* parsing */

static void
test_status_parse(void **state)
{
    const char             *err;
    meter_status_filter_t   f;

    (void) state;

    assert_int_equal(meter_parse_status("200", 3, &f, &err), 0);
    assert_int_equal(f.n, 1);
    assert_int_equal(f.r[0].lo, 200);
    assert_int_equal(f.r[0].hi, 200);

    assert_int_equal(meter_parse_status("2xx", 3, &f, &err), 0);
    assert_int_equal(f.n, 1);
    assert_int_equal(f.r[0].lo, 200);
    assert_int_equal(f.r[0].hi, 299);

    assert_int_equal(meter_parse_status("100-599", 7, &f, &err), 0);
    assert_int_equal(f.r[0].lo, 100);
    assert_int_equal(f.r[0].hi, 599);

    assert_int_equal(meter_parse_status("201,404-410,5xx", 15, &f, &err), 0);
    assert_int_equal(f.n, 3);
    assert_int_equal(f.r[0].lo, 201);
    assert_int_equal(f.r[0].hi, 201);
    assert_int_equal(f.r[1].lo, 404);
    assert_int_equal(f.r[1].hi, 410);
    assert_int_equal(f.r[2].lo, 500);
    assert_int_equal(f.r[2].hi, 599);

    /* only len bytes count, as with nginx's ngx_str_t */
    assert_int_equal(meter_parse_status("200,junk", 3, &f, &err), 0);
    assert_int_equal(f.n, 1);

    /* 16 items are allowed */
    assert_int_equal(meter_parse_status(
        "100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115",
        63, &f, &err), 0);
    assert_int_equal(f.n, 16);
    assert_int_equal(f.r[15].lo, 115);
}


static void
test_status_match(void **state)
{
    const char             *err;
    meter_status_filter_t   f;

    (void) state;

    f.n = 0;
    assert_true(meter_status_match(&f, 100));
    assert_true(meter_status_match(&f, 599));

    assert_int_equal(meter_parse_status("2xx,404", 7, &f, &err), 0);
    assert_false(meter_status_match(&f, 199));
    assert_true(meter_status_match(&f, 200));
    assert_true(meter_status_match(&f, 299));
    assert_false(meter_status_match(&f, 300));
    assert_false(meter_status_match(&f, 403));
    assert_true(meter_status_match(&f, 404));
    assert_false(meter_status_match(&f, 405));
}


static void
test_status_errors(void **state)
{
    size_t                  i;
    const char             *err;
    meter_status_filter_t   f;
    static const char      *bad[] = {
        "2x", "600", "99", "abc", "", ",", "200,", ",200", "200,,201",
        "6xx", "0xx", "2xX", "2XX", "x00", "2000", "020", " 200", "200 ",
        "200-", "-200", "200-2000", "099-200", "200-600", "2xx-3xx",
        "200_299", "+20", "2e2"
    };

    (void) state;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err = NULL;
        f.n = 7;
        assert_int_equal(meter_parse_status(bad[i], strlen(bad[i]), &f, &err),
                         -1);
        assert_string_equal(err,
            "status must be NNN, Nxx or NNN-NNN between 100 and 599");
        assert_int_equal(f.n, 0);
    }

    err = NULL;
    assert_int_equal(meter_parse_status("200-100", 7, &f, &err), -1);
    assert_string_equal(err, "status range must not end below its start");

    err = NULL;
    assert_int_equal(meter_parse_status(
        "100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115,116",
        67, &f, &err), -1);
    assert_string_equal(err, "too many status ranges");
    assert_int_equal(f.n, 0);
}


static void
test_methods(void **state)
{
    size_t              i;
    uint32_t            mask;
    const char         *err;
    static const char  *names[] = {
        "GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE",
        "OPTIONS", "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH",
        "TRACE", "CONNECT"
    };
    static const char  *bad[] = {
        "get", "GET,,POST", "", ",", "GET,", ",GET", "FOO", "GETS", "GE",
        "GET POST", " GET", "Post"
    };

    (void) state;

    /* the bits are nginx's NGX_HTTP_GET (0x2) ... NGX_HTTP_CONNECT */
    for (i = 0; i < 16; i++) {
        assert_int_equal(meter_method_bit(names[i], strlen(names[i])),
                         (uint32_t) 2 << i);
    }

    assert_int_equal(meter_method_bit("GETX", 4), 0);
    assert_int_equal(meter_method_bit("GET", 2), 0);
    assert_int_equal(meter_method_bit("", 0), 0);

    assert_int_equal(meter_parse_methods("GET", 3, &mask, &err), 0);
    assert_int_equal(mask, 0x2);

    assert_int_equal(meter_parse_methods("GET,POST,CONNECT", 16, &mask,
                                         &err), 0);
    assert_int_equal(mask, 0x2 | 0x8 | 0x10000);

    assert_int_equal(meter_parse_methods("PUT,PUT", 7, &mask, &err), 0);
    assert_int_equal(mask, 0x10);

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err = NULL;
        mask = 12345;
        assert_int_equal(meter_parse_methods(bad[i], strlen(bad[i]), &mask,
                                             &err), -1);
        assert_non_null(err);
        assert_int_equal(mask, 12345);
    }
}


static void
test_value(void **state)
{
    size_t              i;
    uint64_t            v;
    static const char  *bad[] = {
        "", "-", "-1", "+1", " 1", "1 ", "1.5", "0x10", "1e3", "abc",
        "9223372036854775808", "18446744073709551615",
        "18446744073709551616", "99999999999999999999999"
    };

    (void) state;

    assert_int_equal(meter_parse_value("0", 1, &v), 0);
    assert_int_equal(v, 0);

    assert_int_equal(meter_parse_value("1234", 4, &v), 0);
    assert_int_equal(v, 1234);

    assert_int_equal(meter_parse_value("007", 3, &v), 0);
    assert_int_equal(v, 7);

    assert_int_equal(meter_parse_value("9223372036854775807", 19, &v), 0);
    assert_true(v == METER_VALUE_MAX);

    /* only len bytes count */
    assert_int_equal(meter_parse_value("42abc", 2, &v), 0);
    assert_int_equal(v, 42);

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        v = 77;
        assert_int_equal(meter_parse_value(bad[i], strlen(bad[i]), &v), -1);
        assert_int_equal(v, 77);
    }
}


static void
test_name(void **state)
{
    (void) state;

    assert_true(meter_valid_name("calls", 5));
    assert_true(meter_valid_name("A-Z_a.z-09", 10));
    assert_true(meter_valid_name("x", 1));
    assert_true(meter_valid_name("abcdefghijklmnopqrstuvwxyz012345", 32));

    assert_false(meter_valid_name("abcdefghijklmnopqrstuvwxyz0123456", 33));
    assert_false(meter_valid_name("", 0));
    assert_false(meter_valid_name("a b", 3));
    assert_false(meter_valid_name("a|b", 3));
    assert_false(meter_valid_name("a:b", 3));
    assert_false(meter_valid_name("caf\xc3\xa9", 5));
    assert_false(meter_valid_name("a\0b", 3));
}


/* hours */

static void
test_hour(void **state)
{
    (void) state;

    assert_int_equal(meter_hour(0), 0);
    assert_int_equal(meter_hour(3599), 0);
    assert_int_equal(meter_hour(3600), 1);
    assert_int_equal(meter_hour(1764000000 - 1), 489999);
    assert_int_equal(meter_hour(1764000000), 490000);
    assert_int_equal(meter_hour(1764000000 + 3599), 490000);
    assert_int_equal(meter_hour(1764000000 + 3600), 490001);

    assert_true(meter_hour_start(0) == 0);
    assert_true(meter_hour_start(490000) == 1764000000);
    assert_true(meter_hour_start(490896) == 1767225600);
}


static void
test_hour_format(void **state)
{
    char  buf[METER_HOUR_LEN + 2];

    (void) state;

    memset(buf, 'Z', sizeof(buf));
    assert_int_equal(meter_hour_format(490000, buf), 10);
    assert_string_equal(buf, "2025112416");
    assert_int_equal(buf[11], 'Z');

    assert_int_equal(meter_hour_format(meter_hour(1764000000 + 3599), buf),
                     10);
    assert_string_equal(buf, "2025112416");

    assert_int_equal(meter_hour_format(meter_hour(1764000000 + 3600), buf),
                     10);
    assert_string_equal(buf, "2025112417");

    meter_hour_format(0, buf);
    assert_string_equal(buf, "1970010100");

    /* year and leap-day boundaries */
    meter_hour_format(490895, buf);
    assert_string_equal(buf, "2025123123");
    meter_hour_format(490896, buf);
    assert_string_equal(buf, "2026010100");
    meter_hour_format(474780, buf);
    assert_string_equal(buf, "2024022912");

    /* never longer than 10 characters */
    memset(buf, 'Z', sizeof(buf));
    assert_int_equal(meter_hour_format(UINT32_MAX, buf), 10);
    assert_string_equal(buf, "9999123123");
    assert_int_equal(buf[11], 'Z');
}


/* hashing and names */

static void
test_key_hash(void **state)
{
    char     hex[METER_HEX_LEN + 1];
    uint8_t  h[METER_HASH_LEN];

    (void) state;

    meter_key_hash("", 0, h);
    meter_hex(h, METER_HASH_LEN, hex);
    assert_string_equal(hex,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    meter_key_hash("abc", 3, h);
    meter_hex(h, METER_HASH_LEN, hex);
    assert_string_equal(hex,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

    /* only len bytes are hashed */
    meter_key_hash("abcdef", 3, h);
    meter_hex(h, METER_HASH_LEN, hex);
    assert_string_equal(hex,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

    /* FIPS 180-2 appendix B.2 (56 bytes: two blocks, the length alone in
     * the second) and B.3 (one million "a") */
    meter_key_hash("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                   56, h);
    meter_hex(h, METER_HASH_LEN, hex);
    assert_string_equal(hex,
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

    meter_key_hash("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
                   "hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
                   112, h);
    meter_hex(h, METER_HASH_LEN, hex);
    assert_string_equal(hex,
        "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");

    {
        char  *a = malloc(1000000);

        assert_non_null(a);
        memset(a, 'a', 1000000);
        meter_key_hash(a, 1000000, h);
        free(a);
    }

    meter_hex(h, METER_HASH_LEN, hex);
    assert_string_equal(hex,
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");

    meter_hex((const uint8_t *) "\x00\xff\x0a\xa0", 4, hex);
    assert_string_equal(hex, "00ff0aa0");

    meter_hex(h, 0, hex);
    assert_string_equal(hex, "");
}


/*
 * Every length around the one-block path (a key of up to 55 bytes is
 * padded by meter_key_hash itself) against libcrypto's EVP digest, with
 * every byte value in the keys.
 */
static void
test_key_hash_lengths(void **state)
{
    size_t         len, i;
    uint8_t        key[200], h[METER_HASH_LEN], want[METER_HASH_LEN];
    unsigned int   n;

    (void) state;

    for (i = 0; i < sizeof(key); i++) {
        key[i] = (uint8_t) (i * 131 + 7);
    }

    for (len = 0; len <= sizeof(key); len++) {
        n = 0;
        assert_int_equal(EVP_Digest(key, len, want, &n, EVP_sha256(), NULL),
                         1);
        assert_int_equal(n, METER_HASH_LEN);

        memset(h, 0x5a, sizeof(h));
        meter_key_hash(key, len, h);
        assert_memory_equal(h, want, METER_HASH_LEN);
    }
}


/* the writer layout's names and its hand-built RESP, byte for byte */
static void
test_fmt_writer(void **state)
{
    char                 buf[2 * METER_RESP_WFIELD_MAX], *p;
    char                 key[METER_WKEY_SIZE], idx[METER_WIDX_KEY_SIZE];
    char                 w[METER_WRITER_SIZE], hour[METER_HOUR_LEN + 1];
    char                 want[256];
    meter_entry_t        e;
    meter_batch_item_t   it;

    (void) state;

    assert_int_equal(meter_hour_format(490000, hour), METER_HOUR_LEN);

    assert_int_equal(meter_fmt_writer(w, TEST_EPOCH, 3, 2), 20);
    assert_string_equal(w, "3f2a9c0d11b2e4f7:3:2");
    assert_int_equal(meter_fmt_writer(w, UINT64_MAX, UINT64_MAX, UINT32_MAX),
                     METER_WRITER_SIZE - 1);
    assert_string_equal(w, "ffffffffffffffff:18446744073709551615:"
                        "4294967295");

    assert_int_equal(meter_fmt_wkey(key, 1, 42, hour, 0), 41);
    assert_string_equal(key, "mtr:wu:{0000000000000001}:42:2025112416:0");
    assert_int_equal(meter_fmt_wkey(key, 1, 42, hour, 1048575), 47);
    assert_string_equal(key,
                        "mtr:wu:{0000000000000001}:42:2025112416:1048575");
    assert_true(meter_fmt_wkey(key, UINT64_MAX, UINT64_MAX, hour, UINT32_MAX)
                == METER_WKEY_SIZE - 1);

    /* parts of 4096 slots: a zone's count, rounded up */
    assert_int_equal(meter_wparts(1), 1);
    assert_int_equal(meter_wparts(4096), 1);
    assert_int_equal(meter_wparts(4097), 2);
    assert_int_equal(meter_wparts(UINT32_MAX), 1048576);

    assert_int_equal(meter_fmt_widx_key(idx, hour), METER_WIDX_KEY_SIZE - 1);
    assert_string_equal(idx, "mtr:widx:2025112416");

    p = meter_resp_array(buf, 4);
    p = meter_resp_bulk(p, "HSET", 4);
    *p = '\0';
    assert_string_equal(buf, "*4\r\n$4\r\nHSET\r\n");

    memset(&e, 0, sizeof(e));
    meter_key_hash("abc", 3, e.key);
    memcpy(e.meter, "calls", 5);
    it.e = &e;
    it.gen = 7;
    it.value = 1234567;

    p = meter_resp_wfield(buf, &it);
    *p = '\0';
    snprintf(want, sizeof(want), "$72\r\n%s|calls|7\r\n$7\r\n1234567\r\n",
             "ba7816bf8f01cfea414140de5dae2223"
             "b00361a396177a9cb410ff61f20015ad");
    assert_string_equal(buf, want);

    /* the longest: a 32-char meter (no NUL), GEN and value at their max */
    memset(e.meter, 'm', METER_NAME_MAX);
    it.gen = UINT32_MAX;
    it.value = UINT64_MAX;
    p = meter_resp_wfield(buf, &it);
    assert_int_equal(p - buf, METER_RESP_WFIELD_MAX);
    *p = '\0';
    assert_non_null(strstr(buf, "|mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm|4294967295"
                           "\r\n$20\r\n18446744073709551615\r\n"));

    it.value = 0;
    it.gen = 0;
    memcpy(e.meter, "b\0", 2);
    p = meter_resp_wfield(buf, &it);
    *p = '\0';
    assert_non_null(strstr(buf, "|b|0\r\n$1\r\n0\r\n"));
}


static void
test_fmt(void **state)
{
    char     meter[METER_NAME_MAX + 1];
    char     idx[METER_IDX_KEY_SIZE];
    char     field[METER_FIELD_SIZE];
    char     used[METER_USED_KEY_SIZE];
    char     data[METER_DATA_KEY_SIZE];
    char     num[sizeof("18446744073709551615")];
    uint8_t  h[METER_HASH_LEN];

    (void) state;

    meter_key_hash("abc", 3, h);

    assert_int_equal(meter_fmt_data_key(data, h, 490000),
                     METER_DATA_KEY_SIZE - 1);
    assert_string_equal(data, "mtr:u:{ba7816bf8f01cfea414140de5dae2223"
                        "b00361a396177a9cb410ff61f20015ad}:2025112416");

    memset(used, 'Z', sizeof(used));
    assert_int_equal(meter_fmt_used_key(used, h), METER_USED_KEY_SIZE - 1);
    assert_string_equal(used, "mtr:used:{ba7816bf8f01cfea414140de5dae2223"
                        "b00361a396177a9cb410ff61f20015ad}");

    assert_int_equal(meter_fmt_idx_key(idx, 490000), METER_IDX_KEY_SIZE - 1);
    assert_string_equal(idx, "mtr:idx:2025112416");

    assert_int_equal(meter_fmt_field(field, "calls", TEST_EPOCH, 42), 25);
    assert_string_equal(field, "calls|3f2a9c0d11b2e4f7.42");

    assert_int_equal(meter_fmt_field(field, "b", 1, 0), 20);
    assert_string_equal(field, "b|0000000000000001.0");

    /* an entry's 32-char meter has no NUL: the guard must not be read */
    memset(meter, 'm', METER_NAME_MAX);
    meter[METER_NAME_MAX] = 'X';
    assert_int_equal(meter_fmt_field(field, meter, UINT64_MAX, UINT32_MAX),
                     METER_FIELD_SIZE - 1);
    assert_string_equal(field, "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
                        "|ffffffffffffffff.4294967295");

    assert_int_equal(meter_fmt_u64(num, 0), 1);
    assert_string_equal(num, "0");
    assert_int_equal(meter_fmt_u64(num, UINT64_MAX), 20);
    assert_string_equal(num, "18446744073709551615");
    assert_int_equal(meter_fmt_u64(num, 1234567), 7);
    assert_string_equal(num, "1234567");
}


/* the script must be the one of the contract, byte for byte */
static void
test_script(void **state)
{
    char    *doc, *p, *q, path[4096];
    long     size;
    FILE    *fp;
    size_t   root;

    (void) state;

    /* docs/ relative to the project root, found from this file's path */
    root = strlen(__FILE__) - strlen("t/unit/test_meter_core.c");
    assert_true(root < 4000);
    snprintf(path, sizeof(path), "%.*sdocs/redis-schema.md", (int) root,
             __FILE__);

    fp = fopen(path, "rb");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, 0, SEEK_END), 0);
    size = ftell(fp);
    assert_true(size > 0);
    rewind(fp);

    doc = calloc(1, (size_t) size + 1);
    assert_non_null(doc);
    assert_int_equal(fread(doc, 1, (size_t) size, fp), (size_t) size);
    fclose(fp);

    p = strstr(doc, "```lua\n");
    assert_non_null(p);
    p += sizeof("```lua\n") - 1;
    q = strstr(p, "```");
    assert_non_null(q);
    *q = '\0';

    assert_string_equal(meter_script_max, p);

    free(doc);
}


/* the table */

static void
test_table_size(void **state)
{
    (void) state;

    /* the slots, then one dirty bit per slot in 64-bit words */
    assert_int_equal(meter_table_size(0), sizeof(meter_table_t));
    assert_int_equal(meter_table_size(10),
                     sizeof(meter_table_t) + 10 * sizeof(meter_entry_t) + 8);
    assert_int_equal(meter_table_size(64),
                     sizeof(meter_table_t) + 64 * sizeof(meter_entry_t) + 8);
    assert_int_equal(meter_table_size(65),
                     sizeof(meter_table_t) + 65 * sizeof(meter_entry_t)
                     + 16);

    assert_int_equal(meter_table_slots_for(0), 0);
    assert_int_equal(meter_table_slots_for(sizeof(meter_table_t) - 1), 0);
    assert_int_equal(meter_table_slots_for(meter_table_size(10)), 10);
    assert_int_equal(meter_table_slots_for(meter_table_size(11) - 1), 10);
}


static void
test_table_init(void **state)
{
    uint32_t        i;
    meter_table_t  *t;

    t = *state;

    assert_true(t->epoch == TEST_EPOCH);
    assert_int_equal(t->nslots, TEST_SLOTS);
    assert_int_equal(t->gen, 0);
    assert_int_equal(t->live, 0);
    assert_int_equal(t->dropped, 0);
    assert_int_equal(t->dropped_value, 0);

    for (i = 0; i < t->nslots; i++) {
        assert_int_equal(t->slots[i].state, METER_SLOT_EMPTY);
        assert_int_equal(t->slots[i].count, 0);
        assert_int_equal(t->slots[i].flushed, 0);
    }
}


static void
test_table_many(void **state)
{
    unsigned        i, j;
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e, *seen[600];
    meter_table_t  *t;

    t = *state;

    for (i = 0; i < 600; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR, key, "calls", i + 1, TEST_NOW),
                         0);
    }

    assert_int_equal(t->live, 600);
    assert_int_equal(t->gen, 600);
    assert_int_equal(t->dropped, 0);
    assert_int_equal(count_state(t, METER_SLOT_LIVE), 600);

    for (i = 0; i < 600; i++) {
        key_of(i, key);
        e = find(t, TEST_HOUR, key, "calls");
        assert_non_null(e);

        assert_int_equal(meter_entry_count(e), i + 1);
        assert_int_equal(meter_entry_pending(e), i + 1);
        assert_int_equal(e->flushed, 0);
        assert_int_equal(e->hour, TEST_HOUR);
        assert_int_equal(e->stamp, TEST_NOW);
        assert_memory_equal(e->key, key, METER_HASH_LEN);
        assert_string_equal(e->meter, "calls");
        assert_true(e->gen < 600);

        for (j = 0; j < i; j++) {
            assert_ptr_not_equal(seen[j], e);
            assert_int_not_equal(seen[j]->gen, e->gen);
        }

        seen[i] = e;
    }

    key_of(600, key);
    assert_null(find(t, TEST_HOUR, key, "calls"));
}


static void
test_table_accumulate(void **state)
{
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    t = *state;
    key_of(1, key);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, "calls");
    assert_non_null(e);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 2, TEST_NOW + 5), 0);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 0, TEST_NOW + 6), 0);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1000, TEST_NOW + 7), 0);

    assert_ptr_equal(find(t, TEST_HOUR, key, "calls"), e);
    assert_int_equal(meter_entry_count(e), 1003);
    assert_int_equal(e->gen, 0);
    assert_int_equal(e->stamp, TEST_NOW);     /* claim time, not touched */
    assert_int_equal(t->live, 1);
    assert_int_equal(t->gen, 1);
    assert_int_equal(count_state(t, METER_SLOT_LIVE), 1);
}


static void
test_table_separate(void **state)
{
    uint8_t         k1[METER_HASH_LEN], k2[METER_HASH_LEN];
    meter_entry_t  *e[6];
    meter_table_t  *t;
    unsigned        i, j;

    t = *state;
    key_of(1, k1);
    key_of(2, k2);

    assert_int_equal(add(t, TEST_HOUR, k1, "calls", 1, TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR + 1, k1, "calls", 2, TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR, k1, "bytes", 3, TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR, k1, "call", 4, TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR, k1, "calls2", 5, TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR, k2, "calls", 6, TEST_NOW), 0);

    e[0] = find(t, TEST_HOUR, k1, "calls");
    e[1] = find(t, TEST_HOUR + 1, k1, "calls");
    e[2] = find(t, TEST_HOUR, k1, "bytes");
    e[3] = find(t, TEST_HOUR, k1, "call");
    e[4] = find(t, TEST_HOUR, k1, "calls2");
    e[5] = find(t, TEST_HOUR, k2, "calls");

    for (i = 0; i < 6; i++) {
        assert_non_null(e[i]);
        assert_int_equal(meter_entry_count(e[i]), i + 1);

        for (j = 0; j < i; j++) {
            assert_ptr_not_equal(e[i], e[j]);
        }
    }

    assert_null(find(t, TEST_HOUR + 2, k1, "calls"));
    assert_null(find(t, TEST_HOUR, k1, "cal"));
    assert_int_equal(t->live, 6);
}


/* a meter name of exactly 32 chars has no NUL in the slot */
static void
test_table_long_meter(void **state)
{
    uint8_t         key[METER_HASH_LEN];
    const char     *m32 = "abcdefghijklmnopqrstuvwxyz012345";
    const char     *m33 = "abcdefghijklmnopqrstuvwxyz0123456";
    meter_entry_t  *e;
    meter_table_t  *t;

    t = *state;
    key_of(1, key);

    assert_int_equal(add(t, TEST_HOUR, key, m32, 7, TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, m32);
    assert_non_null(e);
    assert_memory_equal(e->meter, m32, METER_NAME_MAX);
    assert_null(meter_table_find(t, TEST_HOUR, key, m32, 31));

    /* bad arguments are dropped calls */
    assert_int_equal(add(t, TEST_HOUR, key, m33, 5, TEST_NOW), -1);
    assert_int_equal(add(t, TEST_HOUR, key, "", 6, TEST_NOW), -1);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", METER_VALUE_MAX + 1,
                         TEST_NOW), -1);
    assert_int_equal(t->dropped, 3);
    assert_true(t->dropped_value == 5 + 6 + METER_VALUE_MAX + 1);
    assert_int_equal(t->live, 1);
}


static void
test_table_full(void **state)
{
    unsigned        i;
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    t = *state;

    for (i = 0; i < TEST_SMALL; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    }

    assert_int_equal(count_state(t, METER_SLOT_LIVE), TEST_SMALL);

    key_of(100, key);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 9, TEST_NOW), -1);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 0, TEST_NOW), -1);
    assert_int_equal(add(t, TEST_HOUR + 1, key, "calls", 5, TEST_NOW), -1);
    assert_int_equal(t->dropped, 3);
    assert_int_equal(t->dropped_value, 14);
    assert_null(find(t, TEST_HOUR, key, "calls"));

    /* the keys already in still count */
    key_of(3, key);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 4, TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, "calls");
    assert_non_null(e);
    assert_int_equal(meter_entry_count(e), 5);
    assert_int_equal(t->dropped, 3);
    assert_int_equal(t->live, TEST_SMALL);
}


/* the chain is at most METER_PROBE_MAX slots long */
static void
test_table_probe_max(void **state)
{
    uint32_t        i, home, n;
    uint8_t         key[METER_HASH_LEN];
    meter_table_t  *t;

    (void) state;

    n = 512;
    t = table_new(n);
    key_of(1, key);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    home = (uint32_t) (find(t, TEST_HOUR, key, "calls") - t->slots);

    /* every slot busy being claimed by others, one free beyond the limit */
    meter_table_init(t, n, TEST_EPOCH);

    for (i = 0; i < n; i++) {
        t->slots[i].state = METER_SLOT_CLAIM;
        t->slots[i].stamp = TEST_NOW;
    }

    t->slots[(home + METER_PROBE_MAX) % n].state = METER_SLOT_EMPTY;

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 3, TEST_NOW), -1);
    assert_int_equal(t->dropped, 1);
    assert_int_equal(t->dropped_value, 3);

    t->slots[(home + METER_PROBE_MAX - 1) % n].state = METER_SLOT_EMPTY;

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 4, TEST_NOW), 0);
    assert_ptr_equal(find(t, TEST_HOUR, key, "calls"),
                     &t->slots[(home + METER_PROBE_MAX - 1) % n]);
    assert_int_equal(t->dropped, 1);

    free(t);
}


static void
test_evict_only_flushed(void **state)
{
    uint8_t              key[METER_HASH_LEN];
    meter_entry_t       *e;
    meter_table_t       *t;
    meter_batch_item_t   item;

    t = *state;
    key_of(1, key);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 5, TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, "calls");
    assert_non_null(e);

    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 0);

    item.e = e;
    item.gen = e->gen;
    item.hour = TEST_HOUR;
    item.value = 3;
    (void) meter_batch_confirm(t, &item);
    assert_int_equal(e->flushed, 3);
    assert_int_equal(meter_entry_pending(e), 2);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 0);

    item.value = 5;
    (void) meter_batch_confirm(t, &item);
    assert_int_equal(meter_entry_pending(e), 0);

    /* a request came in after the flush */
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 0);
    assert_int_equal(e->state, METER_SLOT_LIVE);

    item.value = 6;
    (void) meter_batch_confirm(t, &item);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW + 10), 1);

    /* the tombstone holds the eviction's era ticket, not a time */
    assert_int_equal(e->state, METER_SLOT_TOMB);
    assert_int_equal(e->stamp, 0);
    assert_int_equal(t->era, 1);
    assert_true(e->count == (6 | METER_DEAD));
    assert_int_equal(meter_entry_count(e), 6);
    assert_int_equal(t->live, 0);
    assert_null(find(t, TEST_HOUR, key, "calls"));

    /* only LIVE slots */
    assert_int_equal(meter_table_evict(t, e, TEST_NOW + 11), 0);
    assert_int_equal(e->stamp, 0);
    assert_int_equal(t->era, 1);
    assert_int_equal(t->live, 0);
}


static void
test_dead_blocks_add(void **state)
{
    uint32_t        gen;
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e, *e2;
    meter_table_t  *t;

    t = *state;
    key_of(1, key);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 5, TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, "calls");
    gen = e->gen;
    flush_entry(t, e);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 1);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 2, TEST_NOW), 0);
    e2 = find(t, TEST_HOUR, key, "calls");
    assert_non_null(e2);
    assert_ptr_not_equal(e2, e);
    assert_int_not_equal(e2->gen, gen);
    assert_int_equal(meter_entry_count(e2), 2);
    assert_int_equal(e2->flushed, 0);
    assert_true(e->count == (5 | METER_DEAD));
    assert_int_equal(t->live, 1);

    /*
     * the evictor won the race between a request's lookup and its
     * compare-and-swap: the slot is still LIVE but DEAD
     */
    flush_entry(t, e2);
    e2->count |= METER_DEAD;

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 3, TEST_NOW), 0);
    assert_true(e2->count == (2 | METER_DEAD));
    assert_int_equal(t->live, 2);
    assert_int_equal(count_state(t, METER_SLOT_LIVE), 2);
    assert_int_equal(count_state(t, METER_SLOT_TOMB), 1);
}


/* a tombstone comes back once every process that adds has announced */
static void
test_tomb_grace(void **state)
{
    uint32_t        gen, me;
    uint8_t         a[METER_HASH_LEN], b[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    (void) state;

    t = table_new(1);
    key_of(1, a);
    key_of(2, b);
    me = (uint32_t) getpid();

    /* a worker registers before its first add */
    assert_int_equal(meter_table_announce(t, me), 0);
    assert_int_equal(t->qs[0].pid, me);
    assert_int_equal(t->qs[0].era, 0);

    assert_int_equal(add(t, TEST_HOUR, a, "calls", 5, TEST_NOW), 0);
    e = &t->slots[0];
    gen = e->gen;
    flush_entry(t, e);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW + 100), 1);
    assert_int_equal(e->stamp, 0);
    assert_int_equal(t->era, 1);

    /* the worker may still be between its lookup and its add: not reused,
     * however late it is, until it announces */
    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7, TEST_NOW + 100), -1);
    assert_int_equal(add(t, TEST_HOUR, a, "calls", 1, TEST_NOW + 100), -1);
    meter_table_quiesce(t, TEST_NOW + 100);
    assert_int_equal(t->reuse_below, 0);
    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7,
                         TEST_NOW + 100 + METER_TOMB_GRACE - 1), -1);
    assert_int_equal(t->dropped, 3);
    assert_int_equal(e->state, METER_SLOT_TOMB);

    /* its flush timer ran: no add of it is in flight any more */
    assert_int_equal(meter_table_announce(t, me), 0);
    assert_int_equal(t->qs[0].era, 1);
    assert_int_equal(t->reuse_below, 1);

    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7, TEST_NOW + 101), 0);
    assert_int_equal(e->state, METER_SLOT_LIVE);
    assert_int_not_equal(e->gen, gen);
    assert_true(e->count == 7);
    assert_int_equal(e->flushed, 0);
    assert_int_equal(e->stamp, TEST_NOW + 101);
    assert_memory_equal(e->key, b, METER_HASH_LEN);
    assert_ptr_equal(find(t, TEST_HOUR, b, "calls"), e);
    assert_null(find(t, TEST_HOUR, a, "calls"));
    assert_int_equal(t->live, 1);
    assert_int_equal(t->dropped, 3);

    free(t);
}


/* a process that never announces: the grace of old, from the flusher */
static void
test_tomb_fallback(void **state)
{
    uint8_t         a[METER_HASH_LEN], b[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    (void) state;

    t = table_new(1);
    key_of(1, a);
    key_of(2, b);
    e = &t->slots[0];

    /* a live process (our parent) registered and then stopped */
    assert_int_equal(meter_table_announce(t, (uint32_t) getppid()), 0);

    assert_int_equal(add(t, TEST_HOUR, a, "calls", 5, TEST_NOW), 0);
    flush_entry(t, e);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 1);

    meter_table_quiesce(t, TEST_NOW);
    meter_table_quiesce(t, TEST_NOW + METER_TOMB_GRACE - 1);
    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7,
                         TEST_NOW + METER_TOMB_GRACE - 1), -1);

    /* a clock that went back starts the grace over from there */
    meter_table_quiesce(t, TEST_NOW - 10);
    meter_table_quiesce(t, TEST_NOW - 11 + METER_TOMB_GRACE);
    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7,
                         TEST_NOW + METER_TOMB_GRACE), -1);
    assert_int_equal(t->reuse_below, 0);

    meter_table_quiesce(t, TEST_NOW - 10 + METER_TOMB_GRACE);
    assert_int_equal(t->era_old, 1);
    assert_int_equal(t->reuse_below, 1);
    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7,
                         TEST_NOW + METER_TOMB_GRACE), 0);
    assert_memory_equal(e->key, b, METER_HASH_LEN);
    assert_int_equal(t->dropped, 2);

    /* no record left for a process: only the grace is safe */
    memset(t->qs, 0, sizeof(t->qs));
    flush_entry(t, e);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW + 100), 1);

    for (unsigned i = 0; i < METER_QS_MAX; i++) {
        t->qs[i].pid = (uint32_t) getppid();
    }

    assert_int_equal(meter_table_announce(t, (uint32_t) getpid()), -1);
    assert_int_equal(t->qs_full, 1);
    memset(t->qs, 0, sizeof(t->qs));
    meter_table_quiesce(t, TEST_NOW + 100);
    assert_int_equal(add(t, TEST_HOUR, a, "calls", 1, TEST_NOW + 100), -1);
    /* evicted after the last mark: the next mark, then one grace more */
    meter_table_quiesce(t, TEST_NOW + 100 + METER_TOMB_GRACE);
    assert_int_equal(add(t, TEST_HOUR, a, "calls", 1, TEST_NOW + 200), -1);
    meter_table_quiesce(t, TEST_NOW + 100 + 2 * METER_TOMB_GRACE);
    assert_int_equal(add(t, TEST_HOUR, a, "calls", 1, TEST_NOW + 200), 0);
    assert_int_equal(t->dropped, 4);

    free(t);
}


/* a worker that died cannot be in an add: its record goes */
static void
test_tomb_dead_process(void **state)
{
    int             status;
    pid_t           pid;
    size_t          size;
    uint8_t         a[METER_HASH_LEN], b[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    (void) state;

    size = meter_table_size(1);
    t = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    assert_true(t != MAP_FAILED);
    meter_table_init(t, 1, TEST_EPOCH);
    key_of(1, a);
    key_of(2, b);
    e = &t->slots[0];

    pid = fork();
    assert_true(pid >= 0);

    if (pid == 0) {
        _exit(meter_table_announce(t, (uint32_t) getpid()) == 0
              && add(t, TEST_HOUR, a, "calls", 5, TEST_NOW) == 0 ? 0 : 1);
    }

    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(t->qs[0].pid, (uint32_t) pid);

    flush_entry(t, e);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 1);
    meter_table_quiesce(t, TEST_NOW);
    assert_int_equal(t->qs[0].pid, 0);
    assert_int_equal(add(t, TEST_HOUR, b, "calls", 7, TEST_NOW + 1), 0);
    assert_int_equal(t->dropped, 0);

    assert_int_equal(munmap(t, size), 0);
}


/* a reusable tombstone in the chain is taken before the EMPTY after it */
static void
test_tomb_preferred(void **state)
{
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e, *e2;
    meter_table_t  *t;

    t = *state;
    key_of(1, key);

    assert_int_equal(meter_table_announce(t, (uint32_t) getpid()), 0);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 5, TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, "calls");
    flush_entry(t, e);
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 1);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    e2 = find(t, TEST_HOUR, key, "calls");
    assert_ptr_not_equal(e2, e);
    assert_int_equal(e->state, METER_SLOT_TOMB);

    assert_int_equal(meter_table_announce(t, (uint32_t) getpid()), 0);
    flush_entry(t, e2);
    assert_int_equal(meter_table_evict(t, e2, TEST_NOW), 1);

    /* both are tombstones now, e is reusable and first in the chain (e2
     * is not: evicted after the last announce) */
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 2, TEST_NOW), 0);
    assert_ptr_equal(find(t, TEST_HOUR, key, "calls"), e);
    assert_int_equal(e2->state, METER_SLOT_TOMB);
    assert_int_equal(count_state(t, METER_SLOT_TOMB), 1);
    assert_int_equal(count_state(t, METER_SLOT_LIVE), 1);
    assert_int_equal(t->gen, 3);
}



/*
 * Issue 9: a zone full of last hour's counters, all in Redis.  The first
 * pass of the new hour frees them, and they are reused as soon as the
 * workers announced (one flush interval), not 60-120 s later.
 */
static void
test_rollover_reclaim(void **state)
{
    unsigned             i, n, total;
    uint8_t              key[METER_HASH_LEN], fresh[METER_HASH_LEN];
    uint32_t             me;
    meter_table_t       *t;
    meter_batch_t        b;
    meter_batch_item_t   items[16];

    (void) state;

    t = table_new(64);
    me = (uint32_t) getpid();
    assert_int_equal(meter_table_announce(t, me), 0);

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 16;

    /* hour H - 1: 64 counters fill the zone */
    for (i = 0; i < 64; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR - 1, key, "calls", i + 1,
                             TEST_NOW - 10), 0);
    }

    key_of(1000, fresh);
    assert_int_equal(add(t, TEST_HOUR - 1, fresh, "calls", 1, TEST_NOW - 10),
                     -1);

    /* dirty passes of that hour flush them all and free nothing */
    total = 0;

    do {
        meter_batch_collect_dirty(t, &b, UINT32_MAX);

        for (i = 0; i < b.n; i++) {
            total += (unsigned) b.items[i].value;
            (void) meter_batch_confirm(t, &b.items[i]);
        }

        assert_int_equal(meter_batch_reclaim(t, &b, TEST_HOUR - 1,
                                             TEST_NOW - 5), 0);

    } while (!b.wrapped || b.n == b.cap);

    assert_int_equal(total, 64 * 65 / 2);
    assert_int_equal(t->live, 64);

    /* hour H: full until the first pass */
    assert_int_equal(add(t, TEST_HOUR, fresh, "calls", 1, TEST_NOW), -1);

    meter_table_quiesce(t, TEST_NOW);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 0);
    n = meter_table_sweep_range(t, 0, 32, TEST_HOUR, TEST_NOW);
    n += meter_table_sweep_range(t, 32, 64, TEST_HOUR, TEST_NOW);
    assert_int_equal(n, 64);
    assert_int_equal(t->live, 0);
    assert_int_equal(t->era, 64);

    /* this worker may still be inside an add of a freed slot */
    assert_int_equal(add(t, TEST_HOUR, fresh, "calls", 1, TEST_NOW), -1);

    /* its flush timer: every slot is back */
    assert_int_equal(meter_table_announce(t, me), 0);
    assert_int_equal(t->reuse_below, 64);

    for (i = 0; i < 64; i++) {
        key_of(2000 + i, key);
        assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW + 1),
                         0);
    }

    assert_int_equal(t->live, 64);
    assert_int_equal(t->dropped, 3);
    free(t);
}


/* a counter of a past hour goes as soon as Redis holds it, late adds too */
static void
test_reclaim_after_confirm(void **state)
{
    uint8_t              k0[METER_HASH_LEN], k1[METER_HASH_LEN];
    meter_entry_t       *e0, *e1, *late;
    meter_table_t       *t;
    meter_batch_t        b;
    meter_batch_item_t   items[4];

    t = *state;
    key_of(0, k0);
    key_of(1, k1);

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 4;

    assert_int_equal(add(t, TEST_HOUR - 1, k0, "calls", 3, TEST_NOW - 1), 0);
    assert_int_equal(add(t, TEST_HOUR, k1, "calls", 4, TEST_NOW), 0);
    e0 = find(t, TEST_HOUR - 1, k0, "calls");
    e1 = find(t, TEST_HOUR, k1, "calls");

    /* a late add between collect and reply: not evicted, dirty again */
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 2);
    assert_int_equal(add(t, TEST_HOUR - 1, k0, "calls", 2, TEST_NOW), 0);
    (void) meter_batch_confirm(t, &items[0]);
    (void) meter_batch_confirm(t, &items[1]);
    assert_int_equal(meter_batch_reclaim(t, &b, TEST_HOUR, TEST_NOW), 0);
    assert_int_equal(e0->state, METER_SLOT_LIVE);
    assert_int_equal(meter_entry_pending(e0), 2);

    /* the next dirty pass sends it and frees it; this hour's stays */
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 1);
    assert_ptr_equal(items[0].e, e0);
    assert_true(items[0].value == 5);
    (void) meter_batch_confirm(t, &items[0]);
    assert_int_equal(meter_batch_reclaim(t, &b, TEST_HOUR, TEST_NOW), 1);
    assert_int_equal(e0->state, METER_SLOT_TOMB);
    assert_int_equal(e1->state, METER_SLOT_LIVE);
    assert_int_equal(t->live, 1);

    /* a request of the past hour logged after that: a new slot, sent and
     * freed the same way, so nothing is lost */
    assert_int_equal(add(t, TEST_HOUR - 1, k0, "calls", 1, TEST_NOW + 1), 0);
    late = find(t, TEST_HOUR - 1, k0, "calls");
    assert_non_null(late);
    assert_ptr_not_equal(late, e0);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 1);
    assert_true(items[0].value == 1);
    assert_int_not_equal(items[0].gen, e0->gen);

    /* not confirmed (Redis failed): kept */
    assert_int_equal(meter_batch_reclaim(t, &b, TEST_HOUR, TEST_NOW + 1), 0);
    (void) meter_batch_confirm(t, &items[0]);

    /* a stale item (slot reused since) is not evicted */
    items[0].gen++;
    assert_int_equal(meter_batch_reclaim(t, &b, TEST_HOUR, TEST_NOW + 1), 0);
    items[0].gen--;
    assert_int_equal(meter_batch_reclaim(t, &b, TEST_HOUR, TEST_NOW + 1), 1);
    assert_int_equal(t->live, 1);
    assert_null(find(t, TEST_HOUR - 1, k0, "calls"));
}


static void
test_sweep_old_hours(void **state)
{
    unsigned        i;
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    t = *state;

    /* keys 0-2: last hour, flushed; 3: last hour, not flushed */
    for (i = 0; i < 4; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR - 1, key, "calls", 10, TEST_NOW),
                         0);

        if (i < 3) {
            flush_entry(t, find(t, TEST_HOUR - 1, key, "calls"));
        }
    }

    /* keys 4-5: this hour, flushed */
    for (i = 4; i < 6; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR, key, "calls", 10, TEST_NOW), 0);
        flush_entry(t, find(t, TEST_HOUR, key, "calls"));
    }

    assert_int_equal(meter_table_sweep(t, TEST_HOUR, TEST_NOW + 1), 3);
    assert_int_equal(t->live, 3);
    assert_int_equal(count_state(t, METER_SLOT_TOMB), 3);

    for (i = 0; i < 3; i++) {
        key_of(i, key);
        assert_null(find(t, TEST_HOUR - 1, key, "calls"));
    }

    key_of(3, key);
    e = find(t, TEST_HOUR - 1, key, "calls");
    assert_non_null(e);
    assert_int_equal(meter_entry_pending(e), 10);

    for (i = 4; i < 6; i++) {
        key_of(i, key);
        assert_non_null(find(t, TEST_HOUR, key, "calls"));
    }

    assert_int_equal(meter_table_sweep(t, TEST_HOUR, TEST_NOW + 2), 0);

    flush_entry(t, e);
    assert_int_equal(meter_table_sweep(t, TEST_HOUR, TEST_NOW + 3), 1);
    assert_int_equal(t->live, 2);
}


/* more than 3/4 LIVE: current-hour slots go too, down to 3/4 */
static void
test_sweep_pressure(void **state)
{
    unsigned        i;
    uint8_t         key[METER_HASH_LEN];
    meter_table_t  *t;

    t = *state;

    /* 13 of 16 slots of this hour, 12 flushed */
    for (i = 0; i < 13; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR, key, "calls", i + 1, TEST_NOW),
                         0);

        if (i != 5) {
            flush_entry(t, find(t, TEST_HOUR, key, "calls"));
        }
    }

    assert_int_equal(meter_table_sweep(t, TEST_HOUR, TEST_NOW), 1);
    assert_int_equal(t->live, 12);
    assert_int_equal(count_state(t, METER_SLOT_LIVE), 12);

    key_of(5, key);
    assert_non_null(find(t, TEST_HOUR, key, "calls"));

    /* 3/4 exactly is no pressure */
    assert_int_equal(meter_table_sweep(t, TEST_HOUR, TEST_NOW), 0);
    assert_int_equal(t->live, 12);
}


/* old hours go first; if that relieves the pressure the current stay */
static void
test_sweep_pressure_old_first(void **state)
{
    unsigned        i;
    uint8_t         key[METER_HASH_LEN];
    meter_table_t  *t;

    t = *state;

    for (i = 0; i < 13; i++) {
        key_of(i, key);
        assert_int_equal(add(t, i < 2 ? TEST_HOUR - 1 : TEST_HOUR, key,
                             "calls", 1, TEST_NOW), 0);
    }

    for (i = 0; i < t->nslots; i++) {
        if (t->slots[i].state == METER_SLOT_LIVE) {
            flush_entry(t, &t->slots[i]);
        }
    }

    assert_int_equal(meter_table_sweep(t, TEST_HOUR, TEST_NOW), 2);
    assert_int_equal(t->live, 11);

    for (i = 2; i < 13; i++) {
        key_of(i, key);
        assert_non_null(find(t, TEST_HOUR, key, "calls"));
    }
}


static void
test_sweep_stuck_claim(void **state)
{
    meter_entry_t  *a, *b;
    meter_table_t  *t;

    t = *state;

    /* what a worker killed in the middle of a claim leaves */
    a = &t->slots[3];
    a->state = METER_SLOT_CLAIM;
    a->stamp = TEST_NOW;

    /* stamped by a worker whose clock is ahead */
    b = &t->slots[9];
    b->state = METER_SLOT_CLAIM;
    b->stamp = TEST_NOW + 1000;

    assert_int_equal(meter_table_sweep(t, TEST_HOUR,
                                       TEST_NOW + METER_CLAIM_STUCK), 0);
    assert_int_equal(a->state, METER_SLOT_CLAIM);

    assert_int_equal(meter_table_sweep(t, TEST_HOUR,
                                       TEST_NOW + METER_CLAIM_STUCK + 1), 0);
    assert_int_equal(a->state, METER_SLOT_TOMB);
    assert_int_equal(a->stamp, 0);
    assert_int_equal(t->era, 1);
    assert_int_equal(b->state, METER_SLOT_CLAIM);
    assert_int_equal(t->live, 0);
}


static void
test_batch_collect(void **state)
{
    unsigned             i, k, calls, seen[TEST_SLOTS];
    uint8_t              key[METER_HASH_LEN];
    uint32_t             idx, expect;
    meter_entry_t       *e;
    meter_table_t       *t;
    meter_batch_t        b;
    meter_batch_item_t   items[3];

    t = *state;

    for (i = 0; i < 10; i++) {
        key_of(i, key);
        assert_int_equal(add(t, TEST_HOUR + (i & 1), key, "calls", i + 1,
                             TEST_NOW), 0);
    }

    /* two more that must not be collected: flushed and zero */
    key_of(10, key);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 4, TEST_NOW), 0);
    flush_entry(t, find(t, TEST_HOUR, key, "calls"));
    key_of(11, key);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 0, TEST_NOW), 0);

    memset(seen, 0, sizeof(seen));
    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 3;
    b.cursor = 0;
    calls = 0;
    k = 0;

    do {
        assert_true(++calls <= 10);
        b.n = 99;
        meter_batch_collect(t, &b, TEST_SLOTS);
        assert_true(b.n <= 3);

        for (i = 0; i < b.n; i++) {
            e = items[i].e;
            idx = (uint32_t) (e - t->slots);
            seen[idx]++;
            k++;

            assert_int_equal(items[i].gen, e->gen);
            assert_int_equal(items[i].hour, e->hour);
            assert_int_equal(items[i].value, meter_entry_count(e));
            assert_true(e->flushed != items[i].value);
        }

        if (!b.wrapped) {
            /* a full batch stops right after its last slot */
            assert_int_equal(b.n, 3);
            assert_int_equal(b.cursor,
                             (uint32_t) (items[2].e - t->slots) + 1);

        } else {
            assert_int_equal(b.cursor, 0);
        }

    } while (!b.wrapped);

    assert_int_equal(calls, 4);
    assert_int_equal(k, 10);

    for (i = 0; i < 10; i++) {
        key_of(i, key);
        e = find(t, TEST_HOUR + (i & 1), key, "calls");
        assert_int_equal(seen[e - t->slots], 1);
        flush_entry(t, e);
    }

    /* all flushed: one pass finds nothing */
    b.cursor = 0;
    assert_int_equal(meter_batch_collect(t, &b, TEST_SLOTS), 0);
    assert_int_equal(b.wrapped, 1);
    assert_int_equal(b.cursor, 0);

    /* max_scan bounds the scan */
    key_of(0, key);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    idx = (uint32_t) (find(t, TEST_HOUR, key, "calls") - t->slots);

    b.cursor = (idx + 1) % TEST_SLOTS;
    expect = b.cursor + 5 >= TEST_SLOTS ? 0 : b.cursor + 5;
    assert_int_equal(meter_batch_collect(t, &b, 5), 0);
    assert_int_equal(b.cursor, expect);

    b.cursor = idx;
    assert_int_equal(meter_batch_collect(t, &b, 5), 1);
    assert_int_equal(items[0].value, 2);
    expect = idx + 5 >= TEST_SLOTS ? 0 : idx + 5;
    assert_int_equal(b.cursor, expect);

    /* the scan stops at the end of the table */
    b.cursor = TEST_SLOTS - 2;
    b.wrapped = 0;
    meter_batch_collect(t, &b, 100);
    assert_int_equal(b.wrapped, 1);
    assert_int_equal(b.cursor, 0);

    b.cursor = 0;
    meter_batch_collect(t, &b, 2);
    assert_int_equal(b.wrapped, 0);
    assert_int_equal(b.cursor, 2);
}


/* the dirty bitmap: a pass sees what changed, and only that */
static void
test_batch_collect_dirty(void **state)
{
    uint8_t              key[METER_HASH_LEN];
    unsigned             i, n, total;
    meter_batch_t        b;
    meter_table_t       *t;
    meter_batch_item_t   items[7];

    t = *state;

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 7;

    /* nothing counted: nothing collected, one call reaches the end */
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 0);
    assert_true(b.wrapped);

    for (i = 0; i < 20; i++) {
        key_of(i, key);
        assert_int_equal(add(t, 5, key, "calls", i + 1, 100), 0);
    }

    /* in batches of 7, each slot exactly once */
    total = 0;
    n = 0;

    do {
        meter_batch_collect_dirty(t, &b, UINT32_MAX);

        for (i = 0; i < b.n; i++) {
            total += (unsigned) b.items[i].value;
            (void) meter_batch_confirm(t, &b.items[i]);
        }

        n += b.n;

    } while (!b.wrapped || b.n == b.cap);

    assert_int_equal(n, 20);
    assert_int_equal(total, 20 * 21 / 2);

    /* all taken and confirmed: the next pass finds nothing */
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 0);

    /* one more add marks just that slot */
    key_of(3, key);
    assert_int_equal(add(t, 5, key, "calls", 10, 100), 0);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 1);
    assert_true(b.items[0].value == 14);

    /* not confirmed (Redis failed): put back, seen again */
    meter_batch_remark(t, &b);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 1);
    assert_true(b.items[0].value == 14);
    (void) meter_batch_confirm(t, &b.items[0]);

    /* a mark lost with a killed flusher: the full scan still finds it */
    assert_int_equal(add(t, 5, key, "calls", 1, 100), 0);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 1);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect_dirty(t, &b, UINT32_MAX), 0);
    b.cursor = 0;
    assert_int_equal(meter_batch_collect(t, &b, t->nslots), 1);
    assert_true(b.items[0].value == 15);
}


static void
test_batch_confirm(void **state)
{
    uint8_t              a[METER_HASH_LEN], c[METER_HASH_LEN];
    meter_entry_t       *e;
    meter_table_t       *t;
    meter_batch_t        b;
    meter_batch_item_t   items[4], old, older;

    (void) state;

    t = table_new(1);
    e = &t->slots[0];
    key_of(1, a);
    key_of(2, c);

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 4;

    assert_int_equal(add(t, TEST_HOUR, a, "calls", 3, TEST_NOW), 0);
    assert_int_equal(meter_batch_collect(t, &b, 1), 1);
    older = items[0];
    assert_int_equal(older.value, 3);

    assert_int_equal(add(t, TEST_HOUR, a, "calls", 5, TEST_NOW), 0);
    assert_int_equal(meter_batch_collect(t, &b, 1), 1);
    old = items[0];
    assert_int_equal(old.value, 8);

    /* acknowledgements may arrive out of order: flushed never drops */
    (void) meter_batch_confirm(t, &old);
    assert_int_equal(e->flushed, 8);
    (void) meter_batch_confirm(t, &older);
    assert_int_equal(e->flushed, 8);
    assert_int_equal(meter_entry_pending(e), 0);
    assert_int_equal(meter_batch_collect(t, &b, 1), 0);

    /* the slot is evicted and reused for another key */
    assert_int_equal(meter_table_evict(t, e, TEST_NOW), 1);

    (void) meter_batch_confirm(t, &old);
    assert_true(e->flushed == 8);

    /* no process registered: reusable at the flusher's next pass */
    meter_table_quiesce(t, TEST_NOW);
    assert_int_equal(add(t, TEST_HOUR, c, "calls", 2,
                         TEST_NOW + METER_TOMB_GRACE), 0);
    assert_int_not_equal(e->gen, old.gen);
    assert_int_equal(e->flushed, 0);

    /* a late acknowledgement of the old slot must not touch the new */
    (void) meter_batch_confirm(t, &old);
    (void) meter_batch_confirm(t, &older);
    assert_int_equal(e->flushed, 0);
    assert_int_equal(meter_entry_pending(e), 2);

    assert_int_equal(meter_batch_collect(t, &b, 1), 1);
    assert_int_equal(items[0].gen, e->gen);
    (void) meter_batch_confirm(t, &items[0]);
    assert_int_equal(e->flushed, 2);

    free(t);
}


static void
test_entry_count(void **state)
{
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e;
    meter_table_t  *t;

    t = *state;
    key_of(1, key);

    assert_int_equal(add(t, TEST_HOUR, key, "calls", METER_VALUE_MAX - 1,
                         TEST_NOW), 0);
    e = find(t, TEST_HOUR, key, "calls");
    assert_true(meter_entry_count(e) == METER_VALUE_MAX - 1);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 1, TEST_NOW), 0);
    assert_true(meter_entry_count(e) == METER_VALUE_MAX);
    assert_true((e->count & METER_DEAD) == 0);

    /* one more would reach the DEAD bit: a new slot (new field) takes it */
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 2, TEST_NOW), 0);
    assert_true(e->count == METER_VALUE_MAX);
    assert_int_equal(t->live, 2);
    assert_int_equal(t->dropped, 0);

    e->flushed = 10;
    assert_true(meter_entry_pending(e) == METER_VALUE_MAX - 10);
    e->flushed = METER_VALUE_MAX;
    assert_int_equal(meter_entry_pending(e), 0);
}


/* concurrency: real processes on one shared mapping, as nginx workers */

static void
conc_adder(meter_table_t *t, unsigned p)
{
    unsigned  i;

    for (i = 0; i < CONC_ITERS; i++) {
        if (meter_table_add(t, TEST_HOUR, conc_keys[(i * 7 + p * 13)
                                                    % CONC_KEYS],
                            "calls", 5, i % 5 + 1, TEST_NOW) != 0)
        {
            _exit(1);
        }
    }

    _exit(0);
}


static uint64_t
conc_expected(unsigned k)
{
    unsigned  p, i;
    uint64_t  sum;

    sum = 0;

    for (p = 0; p < CONC_PROCS; p++) {
        for (i = 0; i < CONC_ITERS; i++) {
            if ((i * 7 + p * 13) % CONC_KEYS == k) {
                sum += i % 5 + 1;
            }
        }
    }

    return sum;
}


static int
conc_key_index(const uint8_t *key)
{
    int  k;

    for (k = 0; k < CONC_KEYS; k++) {
        if (memcmp(conc_keys[k], key, METER_HASH_LEN) == 0) {
            return k;
        }
    }

    return -1;
}


static void
conc_spawn(pid_t *pids, meter_table_t *t)
{
    unsigned  p;

    for (p = 0; p < CONC_PROCS; p++) {
        pids[p] = fork();
        assert_true(pids[p] >= 0);

        if (pids[p] == 0) {
            conc_adder(t, p);
        }
    }
}


static void
conc_wait(pid_t pid)
{
    int  status;

    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}


static void
test_concurrent_add(void **state)
{
    int             k;
    pid_t           pids[CONC_PROCS];
    size_t          size;
    uint32_t        i;
    unsigned        p;
    uint64_t        sums[CONC_KEYS], total;
    meter_entry_t  *e;
    meter_table_t  *t;

    (void) state;

    for (k = 0; k < CONC_KEYS; k++) {
        key_of((unsigned) k, conc_keys[k]);
    }

    size = meter_table_size(TEST_SLOTS);
    t = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    assert_true(t != MAP_FAILED);
    meter_table_init(t, TEST_SLOTS, TEST_EPOCH);

    conc_spawn(pids, t);

    for (p = 0; p < CONC_PROCS; p++) {
        conc_wait(pids[p]);
    }

    memset(sums, 0, sizeof(sums));

    for (i = 0; i < t->nslots; i++) {
        e = &t->slots[i];

        /* nothing evicts here: every claim ends LIVE */
        assert_true(e->state == METER_SLOT_EMPTY
                    || e->state == METER_SLOT_LIVE);

        if (e->state == METER_SLOT_LIVE) {
            k = conc_key_index(e->key);
            assert_true(k >= 0);
            assert_int_equal(e->hour, TEST_HOUR);
            assert_string_equal(e->meter, "calls");
            sums[k] += meter_entry_count(e);
        }
    }

    total = 0;

    for (k = 0; k < CONC_KEYS; k++) {
        assert_true(sums[k] == conc_expected((unsigned) k));
        total += sums[k];
    }

    assert_true(total == (uint64_t) CONC_PROCS * (CONC_ITERS / 5) * 15);
    assert_int_equal(t->dropped, 0);
    assert_int_equal(t->live, count_state(t, METER_SLOT_LIVE));
    assert_true(t->live >= CONC_KEYS && t->live <= CONC_KEYS * CONC_PROCS);
    assert_int_equal(t->gen, t->live);

    assert_int_equal(munmap(t, size), 0);
}


/*
 * The flusher's side of the promise: a fifth process collects (through the
 * dirty bitmap, as normal passes do), "writes to Redis" (max per GEN, as the
 * script does), confirms and evicts while the adders run.  Afterwards the
 * sum of the fields must be exact.
 */
static void
conc_flusher(meter_table_t *t, conc_shared_t *sh)
{
    int                  k, done, clean;
    unsigned             i;
    uint64_t             evicted;
    meter_batch_t        b;
    meter_batch_item_t   items[32], *it;

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 32;
    evicted = 0;
    clean = 0;

    for ( ;; ) {
        done = __atomic_load_n(&sh->done, __ATOMIC_ACQUIRE);

        /* a pass that begins after the adders ended may be the last */
        if (b.cursor == 0) {
            clean = done;
        }

        /* the dirty bitmap alone: a lost mark would show as a short sum */
        meter_batch_collect_dirty(t, &b, 64);

        for (i = 0; i < b.n; i++) {
            it = &items[i];
            k = conc_key_index(it->e->key);

            if (k < 0 || it->gen >= CONC_GENS
                || (sh->redis[it->gen].key != -1
                    && sh->redis[it->gen].key != k))
            {
                sh->fail = 1;
                _exit(1);
            }

            sh->redis[it->gen].key = k;

            if (it->value > sh->redis[it->gen].value) {
                sh->redis[it->gen].value = it->value;
            }

            (void) meter_batch_confirm(t, it);

            if (evicted < CONC_EVICT_MAX
                && meter_table_evict(t, it->e, TEST_NOW))
            {
                evicted++;
            }
        }

        if (b.n != 0) {
            clean = 0;
        }

        /* a whole pass found nothing left to flush */
        if (b.wrapped && clean) {
            break;
        }
    }

    sh->evicted = evicted;

    _exit(0);
}


static void
test_concurrent_flush(void **state)
{
    int             k;
    pid_t           pids[CONC_PROCS], flusher;
    size_t          size, shsize;
    uint32_t        i, g;
    unsigned        p;
    uint64_t        sums[CONC_KEYS];
    conc_shared_t  *sh;
    meter_entry_t  *e;
    meter_table_t  *t;

    (void) state;

    for (k = 0; k < CONC_KEYS; k++) {
        key_of((unsigned) k, conc_keys[k]);
    }

    /* tombstones are not reused (fixed now): room for every eviction */
    size = meter_table_size(16384);
    t = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    assert_true(t != MAP_FAILED);
    meter_table_init(t, 16384, TEST_EPOCH);

    shsize = sizeof(conc_shared_t);
    sh = mmap(NULL, shsize, PROT_READ | PROT_WRITE,
              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);

    for (g = 0; g < CONC_GENS; g++) {
        sh->redis[g].key = -1;
    }

    flusher = fork();
    assert_true(flusher >= 0);

    if (flusher == 0) {
        conc_flusher(t, sh);
    }

    conc_spawn(pids, t);

    for (p = 0; p < CONC_PROCS; p++) {
        conc_wait(pids[p]);
    }

    __atomic_store_n(&sh->done, 1, __ATOMIC_RELEASE);
    conc_wait(flusher);
    assert_int_equal(sh->fail, 0);

    memset(sums, 0, sizeof(sums));

    for (g = 0; g < CONC_GENS; g++) {
        if (sh->redis[g].key != -1) {
            sums[sh->redis[g].key] += sh->redis[g].value;
        }
    }

    for (k = 0; k < CONC_KEYS; k++) {
        assert_true(sums[k] == conc_expected((unsigned) k));
    }

    /* everything counted was flushed and every GEN is one slot */
    for (i = 0; i < t->nslots; i++) {
        e = &t->slots[i];

        if (e->state == METER_SLOT_LIVE || e->state == METER_SLOT_TOMB) {
            assert_int_equal(meter_entry_pending(e), 0);
            assert_true(sh->redis[e->gen].value == meter_entry_count(e));
        }
    }

    /* the last passes evict every slot unless the limit was reached */
    assert_true(sh->evicted > 0);
    assert_true(t->live == 0 || sh->evicted == CONC_EVICT_MAX);
    assert_int_equal(count_state(t, METER_SLOT_TOMB), sh->evicted);
    assert_int_equal(t->live, count_state(t, METER_SLOT_LIVE));
    assert_int_equal(t->gen, t->live + sh->evicted);
    assert_int_equal(t->dropped, 0);

    assert_int_equal(munmap(sh, shsize), 0);
    assert_int_equal(munmap(t, size), 0);
}


/*
 * Reclaim during adds: the adders walk through CONC_HOURS hours, each at
 * its own pace (so late adds to past hours are common), announcing every
 * 64 adds as a flush timer would; a dropped add is redone after an
 * announce, as the next request would be counted.  The flusher frees the
 * past hours' slots after each confirm, sweeps, and publishes.  More
 * counters than slots pass through the table, so tombstones are reused
 * under load; the totals per (key, hour) must still be exact.
 */
static void
conc_reclaim_adder(meter_table_t *t, conc_shared_t *sh, unsigned p)
{
    unsigned  i, k;
    uint32_t  hour, me;

    me = (uint32_t) getpid();

    if (meter_table_announce(t, me) != 0) {
        _exit(1);
    }

    for (i = 0; i < CONC_ITERS; i++) {
        k = (i * 7 + p * 13) % CONC_KEYS;
        hour = TEST_HOUR + i / (CONC_ITERS / CONC_HOURS);
        __atomic_store_n(&sh->hour[p], hour, __ATOMIC_RELAXED);

        while (meter_table_add(t, hour, conc_keys[k], "calls", 5, i % 5 + 1,
                               TEST_NOW)
               != 0)
        {
            __atomic_fetch_add(&sh->retries, 1, __ATOMIC_RELAXED);
            (void) meter_table_announce(t, me);
            sched_yield();
        }

        if (i % 64 == 0) {
            (void) meter_table_announce(t, me);
        }
    }

    meter_table_leave(t, me);

    _exit(0);
}


static void
conc_reclaim_flusher(meter_table_t *t, conc_shared_t *sh)
{
    int                  k, done, clean;
    unsigned             i, p, loops;
    uint32_t             hour, h;
    uint64_t             evicted;
    meter_batch_t        b;
    meter_batch_item_t   items[32], *it;

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 32;
    evicted = 0;
    clean = 0;

    for (loops = 0; ; loops++) {
        done = __atomic_load_n(&sh->done, __ATOMIC_ACQUIRE);

        hour = TEST_HOUR;

        for (p = 0; p < CONC_PROCS; p++) {
            h = __atomic_load_n(&sh->hour[p], __ATOMIC_RELAXED);
            hour = h > hour ? h : hour;
        }

        if (done) {
            /* the adders ended: every hour is past, all can go */
            hour = TEST_HOUR + CONC_HOURS;
        }

        if (b.cursor == 0) {
            clean = done;
            meter_table_quiesce(t, TEST_NOW);
        }

        meter_batch_collect_dirty(t, &b, 2);

        for (i = 0; i < b.n; i++) {
            it = &items[i];
            k = conc_key_index(it->e->key);

            if (k < 0 || it->gen >= CONC_GENS
                || (sh->redis[it->gen].key != -1
                    && (sh->redis[it->gen].key != k
                        || sh->redis[it->gen].hour != it->hour)))
            {
                sh->fail = 1;
                _exit(1);
            }

            sh->redis[it->gen].key = k;
            sh->redis[it->gen].hour = it->hour;

            if (it->value > sh->redis[it->gen].value) {
                sh->redis[it->gen].value = it->value;
            }

            (void) meter_batch_confirm(t, it);
        }

        evicted += meter_batch_reclaim(t, &b, hour, TEST_NOW);

        /* now 0: no claim looks stuck (that rule has its own test, and a
         * sweep can take a claim whose stamp is not written yet for stuck:
         * the claimer then starts over, a wasted GEN) */
        if (loops % 16 == 0) {
            evicted += meter_table_sweep_range(t, 0, t->nslots, hour, 0);
        }

        if (b.n != 0) {
            clean = 0;
        }

        if (b.wrapped && clean) {
            break;
        }
    }

    evicted += meter_table_sweep(t, TEST_HOUR + CONC_HOURS, 0);
    sh->evicted = evicted;

    _exit(0);
}


static void
test_concurrent_reclaim(void **state)
{
    int             k;
    pid_t           pids[CONC_PROCS], flusher;
    size_t          size, shsize;
    uint32_t        g, hour;
    unsigned        p, i, stripes;
    uint64_t       *want, *got, total, counted;
    conc_shared_t  *sh;
    meter_table_t  *t;

    (void) state;

    for (k = 0; k < CONC_KEYS; k++) {
        key_of((unsigned) k, conc_keys[k]);
    }

    size = meter_table_size(CONC_RSLOTS);
    t = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    assert_true(t != MAP_FAILED);
    meter_table_init(t, CONC_RSLOTS, TEST_EPOCH);

    shsize = sizeof(conc_shared_t);
    sh = mmap(NULL, shsize, PROT_READ | PROT_WRITE,
              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);

    for (g = 0; g < CONC_GENS; g++) {
        sh->redis[g].key = -1;
    }

    for (p = 0; p < CONC_PROCS; p++) {
        sh->hour[p] = TEST_HOUR;
    }

    /* the adders register before the flusher can free anything */
    for (p = 0; p < CONC_PROCS; p++) {
        pids[p] = fork();
        assert_true(pids[p] >= 0);

        if (pids[p] == 0) {
            conc_reclaim_adder(t, sh, p);
        }
    }

    flusher = fork();
    assert_true(flusher >= 0);

    if (flusher == 0) {
        conc_reclaim_flusher(t, sh);
    }

    for (p = 0; p < CONC_PROCS; p++) {
        conc_wait(pids[p]);
    }

    __atomic_store_n(&sh->done, 1, __ATOMIC_RELEASE);
    conc_wait(flusher);
    assert_int_equal(sh->fail, 0);

    want = calloc(CONC_KEYS * CONC_HOURS, sizeof(uint64_t));
    got = calloc(CONC_KEYS * CONC_HOURS, sizeof(uint64_t));
    assert_non_null(want);
    assert_non_null(got);

    for (p = 0; p < CONC_PROCS; p++) {
        for (i = 0; i < CONC_ITERS; i++) {
            hour = i / (CONC_ITERS / CONC_HOURS);
            want[hour * CONC_KEYS + (i * 7 + p * 13) % CONC_KEYS] += i % 5 + 1;
        }
    }

    for (g = 0; g < CONC_GENS; g++) {
        if (sh->redis[g].key != -1) {
            hour = sh->redis[g].hour - TEST_HOUR;
            assert_true(hour < CONC_HOURS);
            got[hour * CONC_KEYS + sh->redis[g].key] += sh->redis[g].value;
        }
    }

    total = 0;

    for (i = 0; i < CONC_KEYS * CONC_HOURS; i++) {
        assert_true(got[i] == want[i]);
        total += want[i];
    }

    /* meter_status's pending: each process added to its own stripe, the
     * stripes hold every unit, the confirms every unit once */
    counted = 0;
    stripes = 0;

    for (p = 0; p < METER_COUNT_STRIPES; p++) {
        counted += t->counted[p].v;
        stripes += t->counted[p].v != 0;
    }

    assert_true(counted == total);
    assert_true(t->confirmed == total);
    assert_true(meter_table_pending(t) == 0);
    assert_true(stripes > 1);

    /* far more counters than slots went through: tombstones were reused */
    print_message("reclaim: %u claims, %llu evictions, %llu retried adds "
                  "in %u slots\n", t->gen, (unsigned long long) sh->evicted,
                  (unsigned long long) sh->retries, t->nslots);
    assert_true(t->gen > 2 * CONC_RSLOTS);
    assert_int_equal(t->live, 0);
    assert_int_equal(sh->evicted, t->gen);
    assert_true(t->dropped == sh->retries);

    for (p = 0; p < METER_QS_MAX; p++) {
        assert_int_equal(t->qs[p].pid, 0);
    }

    free(want);
    free(got);
    assert_int_equal(munmap(sh, shsize), 0);
    assert_int_equal(munmap(t, size), 0);
}


/* the pending figure of meter_status, kept by adds and confirms, equals
 * the walk over every LIVE slot it replaced, through claims, sums, gauges,
 * partial and stale confirms, evictions and reuse */
static uint64_t
pending_walk(meter_table_t *t)
{
    uint32_t  i;
    uint64_t  n;

    n = 0;

    for (i = 0; i < t->nslots; i++) {
        if (t->slots[i].state == METER_SLOT_LIVE) {
            n += meter_entry_pending(&t->slots[i]);
        }
    }

    return n;
}


static void
test_table_pending(void **state)
{
    uint8_t              key[METER_HASH_LEN];
    unsigned             i, r, n, stale, checks;
    uint32_t             hour, now;
    meter_table_t       *t;
    meter_batch_t        b;
    meter_batch_item_t   items[64], old;

    (void) state;

    t = table_new(128);
    srand(12);
    stale = 0;
    checks = 0;
    memset(&old, 0, sizeof(old));

    assert_int_equal(meter_table_pending(t), 0);

    for (i = 0; i < 20000; i++) {
        r = (unsigned) rand();
        key_of(r % 40, key);
        hour = TEST_HOUR + i / 5000;
        now = TEST_NOW + i / 10;

        if (r % 3 == 0) {
            (void) meter_table_max(t, hour, key, "g:max", 5,
                                   (uint64_t) (r % 1000), now);

        } else {
            (void) add(t, hour, key, "calls", r % 7, now);
        }

        if (i % 97 == 0) {
            /* a pass: most items confirmed at what was sent, one kept to
             * be confirmed late (its slot may be reused meanwhile) */
            memset(&b, 0, sizeof(b));
            b.items = items;
            b.cap = 64;
            (void) meter_batch_collect(t, &b, t->nslots);

            for (n = 0; n < b.n; n++) {
                if (n == 0 && !stale) {
                    old = b.items[0];
                    stale = 1;

                } else if ((r >> 8) % 4 != 0) {
                    (void) meter_batch_confirm(t, &b.items[n]);
                }
            }

            if (stale && i % 3 == 0) {
                (void) meter_batch_confirm(t, &old);
                stale = 0;
            }

            (void) meter_table_sweep(t, hour, now);
            meter_table_quiesce(t, now);
        }

        if (i % 89 == 0) {
            assert_true(meter_table_pending(t) == pending_walk(t));
            checks += pending_walk(t) != 0;
        }
    }

    assert_true(meter_table_pending(t) == pending_walk(t));
    assert_true(checks > 10);               /* not all zero */
    assert_true(t->gen > t->nslots);        /* slots were reused */

    free(t);
}


/* a gauge keeps the largest value; it only grows, so it flushes and
 * evicts like a sum; a sum meter beside it is unaffected */
static void
test_gauge_max(void **state)
{
    uint8_t         key[METER_HASH_LEN];
    meter_entry_t  *e, *c;
    meter_table_t  *t;
    meter_batch_t   b;
    meter_batch_item_t  items[8];

    (void) state;

    memset(key, 7, sizeof(key));
    t = table_new(64);

    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6, 5,
                                     TEST_NOW), 0);
    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6, 17,
                                     TEST_NOW), 0);
    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6, 3,
                                     TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 5, TEST_NOW), 0);
    assert_int_equal(add(t, TEST_HOUR, key, "calls", 5, TEST_NOW), 0);

    e = find(t, TEST_HOUR, key, "gb:max");
    c = find(t, TEST_HOUR, key, "calls");
    assert_non_null(e);
    assert_non_null(c);
    assert_int_equal(meter_entry_count(e), 17);
    assert_int_equal(meter_entry_count(c), 10);

    /* flushed at 17: a smaller or equal reading leaves nothing pending */
    flush_entry(t, e);
    assert_int_equal(meter_entry_pending(e), 0);
    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6, 17,
                                     TEST_NOW), 0);
    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6, 0,
                                     TEST_NOW), 0);
    assert_int_equal(meter_entry_pending(e), 0);

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 8;
    assert_int_equal(meter_batch_collect(t, &b, 64), 1);
    assert_ptr_equal(b.items[0].e, c);

    /* a larger one is pending again, sent as the absolute value */
    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6,
                                     METER_VALUE_MAX, TEST_NOW), 0);
    assert_int_equal(meter_entry_count(e), METER_VALUE_MAX);
    assert_int_equal(meter_entry_pending(e), METER_VALUE_MAX - 17);

    /* above the largest count: dropped, counted */
    assert_int_equal(meter_table_max(t, TEST_HOUR, key, "gb:max", 6,
                                     METER_VALUE_MAX + 1, TEST_NOW), -1);
    assert_int_equal(t->dropped, 1);

    free(t);
}


/* unique users: the dedupe table */

static meter_uniq_t *
uniq_new(uint32_t n)
{
    meter_uniq_t  *u;

    u = malloc(meter_uniq_size(n));
    assert_non_null(u);
    meter_uniq_init(u, n, TEST_EPOCH);

    return u;
}


/* value n is "v<n>" */
static int
uadd(meter_uniq_t *u, const uint8_t key[METER_HASH_LEN], const char *meter,
    size_t mlen, uint32_t period, unsigned long long n, uint32_t now)
{
    int   len;
    char  buf[32];

    len = snprintf(buf, sizeof(buf), "v%llu", n);

    return meter_uniq_add(u, key, meter, mlen, period, buf, (size_t) len,
                          now);
}


static void
test_uperiod(void **state)
{
    char  buf[16];

    (void) state;

    /* 2026-11-24 10:30:00 UTC */
    assert_int_equal(meter_uperiod(1795516200, METER_UPERIOD_MONTH), 202611);
    assert_int_equal(meter_uperiod(1795516200, METER_UPERIOD_DAY), 20261124);
    assert_int_equal(meter_uperiod(1795516200, METER_UPERIOD_HOUR),
                     2026112410);
    /* the next hour: the cache follows */
    assert_int_equal(meter_uperiod(1795516200 + 3600, METER_UPERIOD_HOUR),
                     2026112411);
    /* 2026-12-31 23:59:59 and the second after */
    assert_int_equal(meter_uperiod(1798761599, METER_UPERIOD_HOUR),
                     2026123123);
    assert_int_equal(meter_uperiod(1798761600, METER_UPERIOD_MONTH), 202701);

    assert_int_equal(meter_uperiod_month(202611), 202611);
    assert_int_equal(meter_uperiod_month(20261124), 202611);
    assert_int_equal(meter_uperiod_month(2026112410), 202611);

    assert_int_equal(meter_uperiod_format(202611, buf), 6);
    assert_memory_equal(buf, "202611", 6);
    assert_int_equal(meter_uperiod_format(20261104, buf), 8);
    assert_memory_equal(buf, "20261104", 8);
    assert_int_equal(meter_uperiod_format(2026110409, buf), 10);
    assert_memory_equal(buf, "2026110409", 10);
}


static void
test_member(void **state)
{
    char      buf[METER_MEMBER_LEN + 1];
    char      big[2000];
    uint64_t  a, b;

    (void) state;

    /* SHA-256("abc") = ba7816bf 8f01cfea ... (FIPS 180-2 B.1) */
    assert_true(meter_member("abc", 3) == 0xba7816bf8f01cfeaULL);

    meter_member_format(meter_member("abc", 3), buf);
    buf[METER_MEMBER_LEN] = '\0';
    assert_string_equal(buf, "ba7816bf8f01cfea");

    /* long values are hashed whole: one byte at the end differs */
    memset(big, 'x', sizeof(big));
    a = meter_member(big, sizeof(big));
    big[sizeof(big) - 1] = 'y';
    b = meter_member(big, sizeof(big));
    assert_true(a != b);
}


static void
test_value_hash(void **state)
{
    char      big[3000];
    uint64_t  a, b;

    (void) state;

    /* deterministic per seed, another seed another hash */
    assert_true(meter_value_hash("user-1", 6, 1)
                == meter_value_hash("user-1", 6, 1));
    assert_true(meter_value_hash("user-1", 6, 1)
                != meter_value_hash("user-1", 6, 2));
    assert_true(meter_value_hash("user-1", 6, 1)
                != meter_value_hash("user-2", 6, 1));
    /* the length counts: a trailing NUL is another value */
    assert_true(meter_value_hash("ab", 2, 1)
                != meter_value_hash("ab\0", 3, 1));
    assert_true(meter_value_hash("", 0, 1) != meter_value_hash("\0", 1, 1));

    /* every byte of a long value counts, the tail's too */
    memset(big, 'x', sizeof(big));
    a = meter_value_hash(big, sizeof(big), 7);
    big[sizeof(big) - 1] = 'y';
    b = meter_value_hash(big, sizeof(big), 7);
    assert_true(a != b);
    big[1500] = 'z';
    assert_true(meter_value_hash(big, sizeof(big), 7) != b);
}


static void
test_uniq_dedupe(void **state)
{
    uint8_t          k1[METER_HASH_LEN], k2[METER_HASH_LEN];
    meter_uniq_t    *u;
    meter_uitem_t    items[16];
    meter_ubatch_t   b;

    (void) state;

    u = uniq_new(1024);
    key_of(1, k1);
    key_of(2, k2);

    assert_int_equal(uadd(u, k1, "users", 5, 202611, 42, 1), 1);
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 42, 1), 0);
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 42, 1), 0);

    /* another member, key, meter, period: new entries */
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 43, 1), 1);
    assert_int_equal(uadd(u, k2, "users", 5, 202611, 42, 1), 1);
    assert_int_equal(uadd(u, k1, "user", 4, 202611, 42, 1), 1);
    assert_int_equal(uadd(u, k1, "users", 5, 20261124, 42, 1), 1);
    assert_int_equal(u->live, 5);
    assert_int_equal(u->dirty, 5);

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 16;

    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 5);
    assert_true(b.wrapped);

    /* the entries hold the members: SHA-256 prefixes of the values */
    {
        unsigned         i, n42, n43;
        meter_uentry_t  *e;

        n42 = n43 = 0;

        for (i = 0; i < b.n; i++) {
            e = meter_uniq_entry(u, b.items[i].slot);
            n42 += (e->member == meter_member("v42", 3));
            n43 += (e->member == meter_member("v43", 3));
        }

        assert_int_equal(n42, 4);
        assert_int_equal(n43, 1);
    }
    /* SENT still dedupes, and is still unconfirmed */
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 42, 1), 0);
    assert_int_equal(u->dirty, 5);

    /* Redis did not answer: DIRTY again, taken by the next collect */
    meter_uniq_remark(u, &b);
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 5);

    for (unsigned i = 0; i < b.n; i++) {
        meter_uniq_confirm(u, &b.items[i]);
    }

    assert_int_equal(u->dirty, 0);
    assert_int_equal(u->live, 5);

    /* nothing dirty: no scan, nothing collected */
    b.cursor = 7;
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 0);
    assert_true(b.wrapped);
    assert_int_equal(b.cursor, 0);

    /* a confirmed member costs nothing again */
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 42, 1), 0);
    assert_int_equal(u->dirty, 0);

    /* a restarted Redis: every entry again (all), confirmed again */
    b.all = 1;
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 5);
    assert_int_equal(u->dirty, 5);

    for (unsigned i = 0; i < b.n; i++) {
        meter_uniq_confirm(u, &b.items[i]);
    }

    assert_int_equal(u->dirty, 0);

    /* a stale confirm (the entry was sent again since) changes nothing */
    b.all = 0;
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 44, 1), 1);
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 1);
    items[1] = items[0];
    meter_uniq_remark(u, &b);
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 1);
    meter_uniq_confirm(u, &items[0]);
    assert_int_equal(u->dirty, 0);
    assert_int_equal(u->evicted, 0);
    assert_int_equal(u->dropped, 0);

    /* a flusher killed with a batch in hand: its bits are gone, the
     * entries SENT; the bitmap finds nothing, a full scan finds them */
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 45, 1), 1);
    assert_int_equal(uadd(u, k1, "users", 5, 202611, 46, 1), 1);
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 2);
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 0);
    assert_true(b.wrapped);
    assert_int_equal(u->dirty, 2);
    b.full = 1;
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 2);
    assert_true(b.wrapped);

    for (unsigned i = 0; i < b.n; i++) {
        meter_uniq_confirm(u, &b.items[i]);
    }

    assert_int_equal(u->dirty, 0);
    b.full = 0;

    /* the bitmap: a batch that fills up leaves the rest marked */
    for (unsigned i = 0; i < 40; i++) {
        assert_int_equal(uadd(u, k2, "many", 4, 202611, i, 1), 1);
    }

    b.cap = 16;
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 16);
    assert_false(b.wrapped);
    meter_uniq_remark(u, &b);

    /* every one of the 40 comes back, the 16 put back too, none twice */
    {
        unsigned  k, n;

        n = 0;

        for (k = 0; k < 8 && u->dirty > 0; k++) {
            n += meter_uniq_collect(u, &b, u->nslots);

            for (unsigned i = 0; i < b.n; i++) {
                meter_uniq_confirm(u, &b.items[i]);
            }
        }

        assert_int_equal(n, 40);
        assert_int_equal(u->dirty, 0);
    }

    free(u);
}


static void
test_uniq_full(void **state)
{
    uint8_t          key[METER_HASH_LEN];
    unsigned         i, n;
    meter_uniq_t    *u;
    meter_uitem_t    items[64];
    meter_ubatch_t   b;

    (void) state;

    u = uniq_new(METER_UPROBE);
    key_of(1, key);

    /* a window's worth of members fills the table exactly */
    for (i = 0; i < METER_UPROBE; i++) {
        assert_int_equal(uadd(u, key, "u", 1, 202611, i, 1), 1);
    }

    assert_int_equal(u->live, METER_UPROBE);

    /* nothing confirmed (Redis down): a new member is dropped, counted;
     * the recorded ones still dedupe */
    assert_int_equal(uadd(u, key, "u", 1, 202611, 1000, 1), -1);
    assert_int_equal(u->dropped, 1);
    assert_int_equal(uadd(u, key, "u", 1, 202611, 5, 1), 0);

    /* confirmed: a new member overwrites one, preferably of another
     * period (none here), and the one overwritten is new again */
    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 64;
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), METER_UPROBE);

    for (i = 0; i < b.n; i++) {
        meter_uniq_confirm(u, &b.items[i]);
    }

    assert_int_equal(uadd(u, key, "u", 1, 202611, 1000, 1), 1);
    assert_int_equal(u->evicted, 1);
    assert_int_equal(u->live, METER_UPROBE);
    assert_int_equal(u->dirty, 1);

    n = 0;
    for (i = 0; i < METER_UPROBE; i++) {
        n += (uadd(u, key, "u", 1, 202611, i, 1) == 1);
    }

    /* the one overwritten came back as new, taking the place of another
     * confirmed one (which may come back later in the loop): each new
     * one is one overwrite, nothing is dropped */
    assert_true(n >= 1);
    assert_int_equal(u->evicted, 1 + n);
    assert_int_equal(u->dirty, 1 + n);
    assert_int_equal(u->live, METER_UPROBE);
    assert_int_equal(u->dropped, 1);

    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), 1 + n);

    for (i = 0; i < b.n; i++) {
        meter_uniq_confirm(u, &b.items[i]);
    }

    free(u);

    u = uniq_new(METER_UPROBE);

    for (i = 0; i < METER_UPROBE; i++) {
        assert_int_equal(uadd(u, key, "u", 1, i ? 202612 : 202611,
                                        i, 1), 1);
    }

    memset(&b, 0, sizeof(b));
    b.items = items;
    b.cap = 64;
    assert_int_equal(meter_uniq_collect(u, &b, u->nslots), METER_UPROBE);

    for (i = 0; i < b.n; i++) {
        meter_uniq_confirm(u, &b.items[i]);
    }

    assert_int_equal(uadd(u, key, "u", 1, 202612, 999, 1), 1);
    /* the November one was overwritten, every December one is kept */
    assert_int_equal(uadd(u, key, "u", 1, 202611, 0, 1), 1);
    assert_int_equal(u->evicted, 2);
    n = 0;
    for (i = 1; i < METER_UPROBE; i++) {
        n += (uadd(u, key, "u", 1, 202612, i, 1) == 1);
    }
    /* ... the second overwrite had only December ones to take */
    assert_true(n >= 1);
    assert_int_equal(u->evicted, 2 + n);

    free(u);
}


#define UCONC_PROCS    4
#define UCONC_MEMBERS  2000

static void
test_uniq_concurrent(void **state)
{
    int            st;
    pid_t          pids[UCONC_PROCS];
    uint8_t        key[METER_HASH_LEN];
    unsigned       p, i, n;
    meter_uniq_t  *u;
    size_t         size;

    (void) state;

    /* processes add the same members at once into a shared table */
    size = meter_uniq_size(8192);
    u = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    assert_true(u != MAP_FAILED);
    meter_uniq_init(u, 8192, TEST_EPOCH);
    key_of(7, key);

    for (p = 0; p < UCONC_PROCS; p++) {
        pids[p] = fork();
        assert_true(pids[p] >= 0);

        if (pids[p] == 0) {
            for (i = 0; i < UCONC_MEMBERS * 5; i++) {
                if (uadd(u, key, "users", 5, 202611,
                                   (i * 7919 + p) % UCONC_MEMBERS, 1)
                    < 0)
                {
                    _exit(1);
                }
            }

            _exit(0);
        }
    }

    for (p = 0; p < UCONC_PROCS; p++) {
        assert_int_equal(waitpid(pids[p], &st, 0), pids[p]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }

    /* every member is recorded (duplicates of a race are allowed) */
    n = 0;
    for (i = 0; i < UCONC_MEMBERS; i++) {
        n += (uadd(u, key, "users", 5, 202611, i, 1) == 0);
    }

    assert_int_equal(n, UCONC_MEMBERS);
    assert_true(u->live >= UCONC_MEMBERS);
    assert_true(u->live <= UCONC_MEMBERS + UCONC_MEMBERS / 10);
    assert_int_equal(u->dirty, u->live);
    assert_int_equal(u->dropped, 0);

    munmap(u, size);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_status_parse),
        cmocka_unit_test(test_status_match),
        cmocka_unit_test(test_status_errors),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_value),
        cmocka_unit_test(test_gauge_max),
        cmocka_unit_test(test_table_pending),
        cmocka_unit_test(test_name),
        cmocka_unit_test(test_hour),
        cmocka_unit_test(test_hour_format),
        cmocka_unit_test(test_key_hash),
        cmocka_unit_test(test_key_hash_lengths),
        cmocka_unit_test(test_fmt),
        cmocka_unit_test(test_fmt_writer),
        cmocka_unit_test(test_script),
        cmocka_unit_test(test_table_size),
        cmocka_unit_test_setup_teardown(test_table_init, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_table_many, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_table_accumulate, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_table_separate, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_table_long_meter, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_table_full, setup_small,
                                        teardown_table),
        cmocka_unit_test(test_table_probe_max),
        cmocka_unit_test_setup_teardown(test_evict_only_flushed, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_dead_blocks_add, setup_table,
                                        teardown_table),
        cmocka_unit_test(test_tomb_grace),
        cmocka_unit_test(test_tomb_fallback),
        cmocka_unit_test(test_tomb_dead_process),
        cmocka_unit_test_setup_teardown(test_tomb_preferred, setup_table,
                                        teardown_table),
        cmocka_unit_test(test_rollover_reclaim),
        cmocka_unit_test_setup_teardown(test_reclaim_after_confirm,
                                        setup_table, teardown_table),
        cmocka_unit_test_setup_teardown(test_sweep_old_hours, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_sweep_pressure, setup_small,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_sweep_pressure_old_first,
                                        setup_small, teardown_table),
        cmocka_unit_test_setup_teardown(test_sweep_stuck_claim, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_batch_collect, setup_table,
                                        teardown_table),
        cmocka_unit_test_setup_teardown(test_batch_collect_dirty,
                                        setup_table, teardown_table),
        cmocka_unit_test(test_batch_confirm),
        cmocka_unit_test_setup_teardown(test_entry_count, setup_table,
                                        teardown_table),
        cmocka_unit_test(test_concurrent_add),
        cmocka_unit_test(test_concurrent_flush),
        cmocka_unit_test(test_concurrent_reclaim),
        cmocka_unit_test(test_uperiod),
        cmocka_unit_test(test_member),
        cmocka_unit_test(test_value_hash),
        cmocka_unit_test(test_uniq_dedupe),
        cmocka_unit_test(test_uniq_full),
        cmocka_unit_test(test_uniq_concurrent),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
