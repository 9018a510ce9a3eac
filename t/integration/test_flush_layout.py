"""The two usage layouts of docs/redis-schema.md and the rolling upgrade
between them: the writer layout (mtr:wu:{EPOCH}:SID:HOUR:PART, written with plain
HSET by one writer session) and the key layout (mtr:u:{KH}:HOUR, the
max-only script, mtr:used).  The worker bills a counter (KH, HOUR,
METER|EPOCH.GEN) once, with its largest value over every copy: sessions of
one zone, both layouts, old nodes and new ones at once."""

import json
import time

from conftest import key_hash, usage_fields, wait_for
from test_upgrade_rolling import CONF as ROLLING_CONF
from test_worker import EPOCH, NOW_HOUR, Worker, hour_name, line, put

EPOCH2 = "77aa00cc11dd22ee"


def put_writer(redis, epoch, sid, hour_ts, counters):
    """What a new node's flush sends: SADD mtr:widx:HOUR EPOCH:SID:NPARTS,
    ZADD mtr:hours NX, then one HSET of KH|METER|GEN fields (into part 1
    of 2 here: every part is read)."""
    h = hour_name(hour_ts)
    redis.cmd("SADD", "mtr:widx:%s" % h, "%s:%s:2" % (epoch, sid))
    redis.cmd("ZADD", "mtr:hours", "NX", str(hour_ts), h)
    args = []
    for (key, meter, gen), v in counters.items():
        args += ["%s|%s|%d" % (key_hash(key), meter, gen), str(v)]
    redis.cmd("HSET", "mtr:wu:{%s}:%s:%s:1" % (epoch, sid, h), *args)


def test_mixed_old_and_new_nodes_bill_each_counter_once(redis, tmp_path):
    w = Worker(tmp_path, redis, retention="1d", grace="5m")
    h = NOW_HOUR - 3 * 86400
    # an old node (key layout only): slot 1 of EPOCH, 5 calls
    a = put(redis, "key-a", h, {"calls|%s.1" % EPOCH: 5})
    # the same slot also in the writer layout, behind (4) and in a second
    # session ahead (6): the slot's count is 6, once
    put_writer(redis, EPOCH, 1, h, {("key-a", "calls", 1): 4})
    put_writer(redis, EPOCH, 2, h, {("key-a", "calls", 1): 6,
                                    ("key-a", "calls", 2): 10})
    # a new node (another zone instance): its own counters of key-a and a
    # key no old node saw
    put_writer(redis, EPOCH2, 1, h, {("key-a", "calls", 1): 100,
                                     ("key-b", "calls", 7): 3,
                                     ("key-b", "bytes", 8): 512})
    b = key_hash("key-b")
    f = usage_fields(redis)
    assert f[(a, hour_name(h), "calls|%s.1" % EPOCH)] == 6
    assert len(f) == 5

    r = w.once(h + 3600)
    assert r.returncode == 0
    want = [line(a, None, "calls", h, 6 + 10 + 100),
            line(b, None, "calls", h, 3), line(b, None, "bytes", h, 512)]
    got = w.lines()
    assert sorted(got, key=lambda d: (d["key_hash"], d["meter"])) == \
        sorted(want, key=lambda d: (d["key_hash"], d["meter"]))

    # billed and past retention: both layouts gone, marks too
    assert redis.keys("mtr:u:*") == [] and redis.keys("mtr:wu:*") == []
    assert redis.keys("mtr:b:*") == []
    assert redis.keys("mtr:idx:*") == [] and redis.keys("mtr:widx:*") == []
    assert redis.zrange_withscores("mtr:hours") == {}


def test_late_writer_usage_is_billed_as_the_difference(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    h = NOW_HOUR - 5 * 3600
    put_writer(redis, EPOCH2, 1, h, {("key-l", "calls", 1): 7})
    kh = key_hash("key-l")
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(kh, None, "calls", h, 7)]
    assert redis.hgetall("mtr:b:{%s}:%s" % (kh, hour_name(h))) == {
        "calls|%s.1" % EPOCH2: "7"}

    # a rerun sends nothing; a resend of the same absolute value (a lost
    # reply, in another session) adds nothing
    put_writer(redis, EPOCH2, 2, h, {("key-l", "calls", 1): 7})
    assert w.once(h + 3600).returncode == 0
    assert len(w.lines()) == 1

    # late usage reaches the slot: the difference, as seq 2
    put_writer(redis, EPOCH2, 3, h, {("key-l", "calls", 1): 9})
    assert w.once(h + 3600).returncode == 0
    assert w.lines()[1:] == [line(kh, None, "calls", h, 2, seq=2)]


def test_retention_keeps_an_hour_with_unbilled_writer_usage(redis,
                                                            tmp_path):
    w = Worker(tmp_path, redis, retention="1d", grace="5m")
    old = NOW_HOUR - 3 * 86400
    put(redis, "key-o", old, {"calls": 1})
    put_writer(redis, EPOCH2, 1, old, {("key-r", "calls", 1): 2})
    kh = key_hash("key-r")
    # drained as of before the hour closed: nothing billed, and retention
    # (past it by the clock) must keep both layouts
    assert w.once(old).returncode == 0
    assert w.lines() == []
    assert redis.hgetall("mtr:wu:{%s}:1:%s:1" % (EPOCH2, hour_name(old))) == {
        "%s|calls|1" % kh: "2"}
    assert redis.keys("mtr:u:*") != []
    assert redis.smembers("mtr:widx:" + hour_name(old)) == {EPOCH2 + ":1:2"}

    assert w.once(old + 3600).returncode == 0
    assert sorted(d["quantity"] for d in w.lines()) == [1, 2]
    assert redis.keys("mtr:wu:*") == [] and redis.keys("mtr:b:*") == []
    assert redis.zrange_withscores("mtr:hours") == {}


def test_credit_mid_hour_moves_a_counter_between_layouts(nginx_factory,
                                                         redis, tmp_path):
    """Real nodes: a key's counter is in the writer layout until its
    customer gets credit, then the same slot goes on in the key layout.
    The worker bills it once; mtr:used holds only what came after."""
    from test_meterctl import call, ok, okj, refreshed_since, register, start

    c = register(redis, "switch@example.com")
    n = start(nginx_factory, redis, workers=1)
    for _ in range(4):
        assert call(n, c["key"])[0] == 200
    wait_for(lambda: redis.keys("mtr:wu:*") != []
             and json.loads(n.get("/status")[1])["zones"][0]["pending"] == 0,
             10)
    assert redis.keys("mtr:u:*") == []

    t = time.time()
    ok(redis, "credit", "set", c["customer"], "--meter", "calls", 100)
    refreshed_since(n, t)
    for _ in range(6):
        assert call(n, c["key"])[0] == 200
    wait_for(lambda: int(redis.cmd("HGET", "mtr:used:{%s}" % c["key_hash"],
                                   "calls") or 0) == 6, 10)
    # the same slot in both layouts: 4 in the writer layout, 10 in mtr:u
    f = usage_fields(redis)
    assert sum(f.values()) == 10
    assert okj(redis, "credit", "show", c["customer"])[0]["left"] == 94

    w = Worker(tmp_path / "w", redis, grace="5m")
    end = (int(time.time()) // 3600 + 2) * 3600
    assert w.once(end).returncode == 0
    lines = w.lines()
    assert sum(d["quantity"] for d in lines) == 10, lines
    assert {d["customer"] for d in lines} == {c["customer"]}
    assert w.once(end).returncode == 0
    assert len(w.lines()) == len(lines)


# one node, a Redis timeout short enough for the test
LOST_CONF = ROLLING_CONF.replace("meter_redis @REDIS@;",
                                 "meter_redis @REDIS@ timeout=300ms;")
assert LOST_CONF != ROLLING_CONF


def test_lost_replies_resent_in_a_new_session_bill_once(nginx_factory,
                                                        redis, tmp_path):
    """Redis stops (SIGSTOP) with HSETs in its socket: the node times out,
    drops the connection and keeps the counters pending.  When Redis goes
    on it runs the old session's HSETs anyway (their replies are lost), and
    the node resends the same counters in a new session: two copies of each
    counter, which the worker bills once."""
    import os
    import signal

    n = nginx_factory(LOST_CONF, workers=1, redis=redis.address)
    keys = ["key-lost-%d" % i for i in range(20)]

    def calls(k):
        for key in keys:
            for _ in range(k):
                assert n.get("/", headers={"X-Api-Key": key})[0] == 200

    def status():
        return json.loads(n.get("/status")[1])["zones"][0]

    calls(2)
    wait_for(lambda: status()["pending"] == 0, 10)

    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        calls(3)
        # the flush of these is in Redis' socket; the node gives up on it
        wait_for(lambda: status()["redis_connected"] is False, 10)
        assert status()["pending"] > 0
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    wait_for(lambda: status()["redis_connected"] is True
             and status()["pending"] == 0, 10)

    # the node's one zone wrote in two sessions at least, and the counters
    # of the lost replies have a copy in both
    wu = redis.keys("mtr:wu:*")
    sessions = {k.split(":")[3] for k in wu}
    assert len(sessions) >= 2, wu
    copies = {}
    for k in wu:
        for f, v in redis.hgetall(k).items():
            copies.setdefault(f, []).append(int(v))
    assert len(copies) == len(keys)
    assert any(len(c) > 1 for c in copies.values()), copies
    assert all(max(c) == 5 for c in copies.values()), copies

    w = Worker(tmp_path / "w", redis, grace="5m")
    end = (int(time.time()) // 3600 + 2) * 3600
    assert w.once(end).returncode == 0
    got = {}
    for d in w.lines():
        got[d["key_hash"]] = got.get(d["key_hash"], 0) + d["quantity"]
    assert got == {key_hash(k): 5 for k in keys}
    assert w.once(end).returncode == 0
    assert sum(d["quantity"] for d in w.lines()) == 5 * len(keys)


def test_every_part_and_page_of_a_writer_is_read(redis, tmp_path):
    """A writer's parts 0..NPARTS-1 (its index entry says how many), the
    first page of each in one pipeline, a big part page by page."""
    w = Worker(tmp_path, redis, grace="5m")
    h = NOW_HOUR - 5 * 3600
    hn = hour_name(h)
    kh = key_hash("key-pages")
    redis.cmd("SADD", "mtr:widx:%s" % hn, "%s:1:300" % EPOCH2)
    redis.cmd("ZADD", "mtr:hours", "NX", str(h), hn)
    # part 0 and part 299: one counter each; part 7: 12,000 counters (the
    # same key, one slot lifetime each), more than one HSCAN page
    redis.cmd("HSET", "mtr:wu:{%s}:1:%s:0" % (EPOCH2, hn),
              "%s|calls|1" % kh, "5")
    redis.cmd("HSET", "mtr:wu:{%s}:1:%s:299" % (EPOCH2, hn),
              "%s|calls|2" % kh, "7")
    args = []
    for g in range(100, 12100):
        args += ["%s|calls|%d" % (kh, g), "2"]
    redis.cmd("HSET", "mtr:wu:{%s}:1:%s:7" % (EPOCH2, hn), *args)
    # not listed (part 300 of 300 parts): not read
    redis.cmd("HSET", "mtr:wu:{%s}:1:%s:300" % (EPOCH2, hn),
              "%s|calls|3" % kh, "1000")

    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(kh, None, "calls", h, 5 + 7 + 2 * 12000)]
