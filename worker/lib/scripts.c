
/*
 * Copyright (C) nginx-meter authors
 *
 * Every Lua script the worker and meterctl send to Redis (EVAL), in one
 * place: each is atomic, so these are the only places where two keys
 * change together.  Keys and fields as in docs/redis-schema.md.
 */


#include "scripts.h"


/* the drain (daemon/drain.c): records, the lock, retention */


/* the module's max-only update, reused for the b marks */
const char  meter_lua_maxset[] =
    "for i = 1, #ARGV, 2 do\n"
    "  local cur = redis.call('HGET', KEYS[1], ARGV[i])\n"
    "  local v = ARGV[i + 1]\n"
    "  if not cur or #v > #cur or (#v == #cur and v > cur) then\n"
    "    redis.call('HSET', KEYS[1], ARGV[i], v)\n"
    "  end\n"
    "end\n"
    "return 1\n";


/* KEYS: period hash, record, open zset; ARGV: subject|meter, last seq,
 * new seq, id, score, expire, then the record's field/value pairs */
const char  meter_lua_create[] =
    "if redis.call('HEXISTS', KEYS[1], ARGV[1] .. '|open') == 1 then\n"
    "  return 0\n"
    "end\n"
    "local s = redis.call('HGET', KEYS[1], ARGV[1]) or '0'\n"
    "if s ~= ARGV[2] then return 0 end\n"
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])\n"
    "redis.call('HSET', KEYS[1], ARGV[1] .. '|open', ARGV[4])\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[6])\n"
    /* one HSET of every field: a record has about 20 */
    "redis.call('HSET', KEYS[2], unpack(ARGV, 7))\n"
    "redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])\n"
    "return 1\n";


/* meter_lua_create for a chunk in one call: KEYS open zset, then period
 * hash and record of each; ARGV per record subject|meter, last seq, new
 * seq, id, score, expire, the number of field/value strings, those; the
 * reply has 1 (stored) or 0 per record */
const char  meter_lua_create_all[] =
    "local res, a, expired = {}, 1, {}\n"
    "for i = 1, (#KEYS - 1) / 2 do\n"
    "  local per, rec = KEYS[2 * i], KEYS[2 * i + 1]\n"
    "  local sm, id = ARGV[a], ARGV[a + 3]\n"
    "  local f, e = a + 7, a + 6 + tonumber(ARGV[a + 6])\n"
    "  res[i] = 0\n"
    "  if redis.call('HEXISTS', per, sm .. '|open') == 0\n"
    "     and (redis.call('HGET', per, sm) or '0') == ARGV[a + 1] then\n"
    "    redis.call('HSET', per, sm, ARGV[a + 2], sm .. '|open', id)\n"
    /* never lowered: a month's figures share the hash of its first hour */
    "    if not expired[per]\n"
    "       and redis.call('TTL', per) < tonumber(ARGV[a + 5]) then\n"
    "      redis.call('EXPIRE', per, ARGV[a + 5])\n"
    "      expired[per] = true\n"
    "    end\n"
    "    redis.call('HSET', rec, unpack(ARGV, f, e))\n"
    "    redis.call('ZADD', KEYS[1], ARGV[a + 4], id)\n"
    "    res[i] = 1\n"
    "  end\n"
    "  a = e + 1\n"
    "end\n"
    "return res\n";


/* KEYS: record, period hash, open zset, stats; ARGV: id, subject|meter,
 * quantity */
const char  meter_lua_done[] =
    "redis.call('DEL', KEYS[1])\n"
    "if redis.call('HGET', KEYS[2], ARGV[2] .. '|open') == ARGV[1] then\n"
    "  redis.call('HDEL', KEYS[2], ARGV[2] .. '|open')\n"
    "end\n"
    "redis.call('ZREM', KEYS[3], ARGV[1])\n"
    "redis.call('HINCRBY', KEYS[4], 'records_sent', 1)\n"
    "redis.call('HINCRBY', KEYS[4], 'quantity_sent', ARGV[3])\n"
    "return 1\n";


/* meter_lua_done for a chunk in one call: KEYS open zset, stats, then
 * record and period hash of each; ARGV id, subject|meter, quantity of each */
const char  meter_lua_done_all[] =
    "local ids = {}\n"
    "for i = 1, #ARGV / 3 do\n"
    "  local rec, per = KEYS[1 + 2 * i], KEYS[2 + 2 * i]\n"
    "  local id, sm = ARGV[3 * i - 2], ARGV[3 * i - 1]\n"
    "  redis.call('DEL', rec)\n"
    "  if redis.call('HGET', per, sm .. '|open') == id then\n"
    "    redis.call('HDEL', per, sm .. '|open')\n"
    "  end\n"
    "  redis.call('HINCRBY', KEYS[2], 'quantity_sent', ARGV[3 * i])\n"
    "  ids[i] = id\n"
    "end\n"
    "if #ids > 0 then\n"
    "  redis.call('ZREM', KEYS[1], unpack(ids))\n"
    "  redis.call('HINCRBY', KEYS[2], 'records_sent', #ids)\n"
    "end\n"
    "return #ids\n";


/* KEYS: record, open zset, dead zset; ARGV: id, now, error, http status */
const char  meter_lua_dead[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'state', 'dead', 'last_error', ARGV[3],\n"
    "           'http_status', ARGV[4], 'dead_at', ARGV[2])\n"
    "redis.call('ZREM', KEYS[2], ARGV[1])\n"
    "redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])\n"
    "return 1\n";


const char  meter_lua_renew[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  return redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
    "end\n"
    "return 0\n";


const char  meter_lua_release[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  return redis.call('DEL', KEYS[1])\n"
    "end\n"
    "return 0\n";


/* KEYS: u, b of one key-hour; deletes both when everything is billed */
const char  meter_lua_expire[] =
    "local u = redis.call('HGETALL', KEYS[1])\n"
    "for i = 1, #u, 2 do\n"
    "  local b = redis.call('HGET', KEYS[2], u[i])\n"
    "  local v = u[i + 1]\n"
    "  -- billed when b >= u (b may be a writer copy's larger count)\n"
    "  if not b or #b < #v or (#b == #v and b < v) then return 0 end\n"
    "end\n"
    "redis.call('DEL', KEYS[1], KEYS[2])\n"
    "return 1\n";


/* governance (lib/gov.c) */


/*
 * KEYS[1] = mtr:cust:{C}
 * ARGV = delinquent (0/1), reason, source, event time
 * A manual change (meterctl) always applies, whatever time is recorded
 * (an event dated ahead must not lock an admin out).
 * -1 unknown customer, 0 nothing changed, 1 changed, 2 nothing changed but
 * the last change never reached mtr:gov ("projected" is 0 until
 * meter_gov_project() completes), so project it now
 */
const char  meter_lua_gov_status[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end\n"
    "local h = redis.call('HMGET', KEYS[1], 'status', 'reason', 'source',\n"
    "                     'status_at', 'projected')\n"
    "local status, reason, source = h[1] or 'active', h[2] or '', h[3] or ''\n"
    "local z = h[5] == '0' and 2 or 0\n"
    "local t = tonumber(ARGV[4])\n"
    "if ARGV[3] ~= 'manual' and t < (tonumber(h[4] or '0') or 0) then\n"
    "  return z\n"
    "end\n"
    "local manual = status == 'delinquent' and source == 'manual'\n"
    "if ARGV[3] == 'sync' and manual then return z end\n"
    "if ARGV[1] == '1' then\n"
    "  if status == 'delinquent' then\n"
    "    redis.call('HSET', KEYS[1], 'status_at', ARGV[4])\n"
    "    if reason == ARGV[2] and source == ARGV[3] then return z end\n"
    "    redis.call('HSET', KEYS[1], 'reason', ARGV[2], 'source', ARGV[3],\n"
    "               'projected', '0')\n"
    "    return 1\n"
    "  end\n"
    "  redis.call('HSET', KEYS[1], 'status', 'delinquent', 'reason',\n"
    "             ARGV[2], 'source', ARGV[3], 'since', ARGV[4],\n"
    "             'status_at', ARGV[4], 'projected', '0')\n"
    "  return 1\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'status_at', ARGV[4])\n"
    "if status ~= 'delinquent' then return z end\n"
    "redis.call('HSET', KEYS[1], 'status', 'active', 'source', ARGV[3],\n"
    "           'projected', '0')\n"
    "redis.call('HDEL', KEYS[1], 'reason', 'since')\n"
    "return 1\n";


/* Stripe (providers/stripe.c) */


/*
 * KEYS: record, open, dead; ARGV: id, now, error, code, event.  A record
 * Stripe accepted (200) and rejected later: dead with the error code.
 * Its hash is usually gone (sent records are deleted); then a dead letter
 * with what Stripe tells is made, so meterctl status shows it.
 */
const char  meter_lua_stripe_rejected[] =
    "local st = redis.call('HGET', KEYS[1], 'state')\n"
    "if st == false then\n"
    "  redis.call('HSET', KEYS[1], 'http_status', '200')\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'state', 'dead', 'last_error', ARGV[3],\n"
    "           'error_code', ARGV[4], 'rejected_by', ARGV[5],\n"
    "           'dead_at', ARGV[2])\n"
    "redis.call('ZREM', KEYS[2], ARGV[1])\n"
    "redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])\n"
    "return 1\n";


/* meterctl retry (ctl/retry.c) */


const char  meter_lua_retry[] =
    "if redis.call('HGET', KEYS[1], 'state') ~= 'dead' then return 0 end\n"
    "if ARGV[3] == '1' then\n"
    "  redis.call('HSET', KEYS[1], 'attempts', 0, 'created', ARGV[2])\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'state', 'sending', 'next_attempt',\n"
    "           ARGV[2])\n"
    "redis.call('ZREM', KEYS[3], ARGV[1])\n"
    "redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])\n"
    "return 1\n";


/*
 * The usage of one key and meter before a quota period, once per period
 * (docs/redis-schema.md, mtr:qbase): the lifetime total less what the
 * period's hours hold, all in the key's slot.  Kept once computed, so
 * retention deleting the period's early hours cannot move it.
 * KEYS[1] mtr:qbase:{KH}, KEYS[2] mtr:used:{KH}, KEYS[3..] mtr:u:{KH}:HOUR
 * of the period so far; ARGV[1] METER|PSTART, ARGV[2] METER, ARGV[3] TTL.
 * Totals are doubles in Lua: exact below 2^53 units.
 */
const char  meter_lua_quota_base[] =
    "local b = redis.call('HGET', KEYS[1], ARGV[1])\n"
    "if b then return b end\n"
    "local used = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')\n"
    "local p = ARGV[2] .. '|'\n"
    "for i = 3, #KEYS do\n"
    "  local f = redis.call('HGETALL', KEYS[i])\n"
    "  for j = 1, #f, 2 do\n"
    "    if f[j]:sub(1, #p) == p then used = used - tonumber(f[j + 1]) end\n"
    "  end\n"
    "end\n"
    "if used < 0 then used = 0 end\n"
    "for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do\n"
    "  if k:sub(1, #p) == p then redis.call('HDEL', KEYS[1], k) end\n"
    "end\n"
    "b = string.format('%.0f', used)\n"
    "redis.call('HSET', KEYS[1], ARGV[1], b)\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[3])\n"
    "return b\n";


/* the due index (daemon/due.c): KEYS the writer hashes (parts) of one
 * writer and hour, one slot ({EPOCH}); the SHA1 of their content (the
 * order of HGETALL only changes with a write: a false "changed" costs one
 * read, never a missed one) */
const char  meter_lua_digest[] =
    "local t = {}\n"
    "for i = 1, #KEYS do\n"
    "  t[i] = redis.sha1hex(table.concat(redis.call('HGETALL', KEYS[i]),"
    " '\\n'))\n"
    "end\n"
    "return redis.sha1hex(table.concat(t, ' '))\n";
