"""The due index (worker/daemon/due.c, docs/redis-schema.md "Settled
hours"): a pass reads only the closed hours that may hold unbilled usage,
and stays exact with late usage, a write whose ZADD ran before the hour
was settled, the writer layout, and the resend after Redis lost its data.
"""

import json
import time

from test_worker import EPOCH, NOW_HOUR, Worker, hour_name, line, put


def stat_calls(redis, cmd):
    info = redis.cmd("INFO", "commandstats")
    info = info.decode() if isinstance(info, bytes) else info
    for row in info.splitlines():
        if row.startswith("cmdstat_%s:" % cmd):
            return int(row.split("calls=")[1].split(",")[0])
    return 0


def settled(redis):
    return {h: v.split() for h, v in
            redis.hgetall("mtr:{worker}:settled").items()}


def test_billed_hours_settle_and_a_rerun_reads_nothing(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h1 = NOW_HOUR - 6 * 3600
    khs = [put(redis, "key-%d" % k, h1 + (k % 3) * 3600, {"calls": k + 1})
           for k in range(30)]
    assert w.once(NOW_HOUR).returncode == 0
    assert len(w.lines()) == 30

    # every hour left mtr:hours, settled at most now, confirming read due
    assert redis.zrange_withscores("mtr:hours") == {}
    s = settled(redis)
    assert sorted(s) == [hour_name(h1 + i * 3600) for i in range(3)]
    assert all(v[1] == "0" and v[2] == "-" and
               int(v[0]) <= time.time() for v in s.values())

    # nothing due: the key-hours are not read at all (the two HGETALLs
    # are of mtr:{worker}:settled and mtr:{worker}:figmon)
    redis.cmd("CONFIG", "RESETSTAT")
    assert w.once(NOW_HOUR).returncode == 0
    assert stat_calls(redis, "hgetall") == 2
    assert stat_calls(redis, "sscan") == 0
    assert len(w.lines()) == 30

    # meterctl usage still lists the settled hours
    r = w.ctl("usage", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 30
    assert sum(x["value"] for x in rows) == sum(range(1, 31))
    assert len(khs) == 30


def test_late_usage_puts_the_hour_back(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 4 * 3600
    a = put(redis, "key-late", h, {"calls": 10})
    assert w.once(h + 3600).returncode == 0
    assert redis.zrange_withscores("mtr:hours") == {}

    # the module's next flush: ZADD NX brings the hour back
    put(redis, "key-late", h, {"calls": 13})
    assert hour_name(h) in redis.zrange_withscores("mtr:hours")
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(a, None, "calls", h, 10),
                         line(a, None, "calls", h, 3, seq=2)]
    assert redis.zrange_withscores("mtr:hours") == {}


def test_write_racing_the_settle_is_billed_by_the_confirming_read(
        redis, tmp_path):
    """A batch whose ZADD ran before the worker's ZREM but whose data came
    after the worker read the key: no ZADD follows, only the confirming
    read (grace after the settle) finds it."""
    # grace: the second run below must start before it has passed since
    # the settle (whole seconds: 4-5 s later), however loaded the machine
    w = Worker(tmp_path, redis, grace="5s")
    h = NOW_HOUR - 4 * 3600
    a = put(redis, "key-race", h, {"calls": 5})
    assert w.once(h + 3600).returncode == 0
    hn = hour_name(h)
    assert settled(redis)[hn][1] == "0"

    # the data of that batch, without its (earlier) ZADD
    redis.cmd("HSET", "mtr:u:{%s}:%s" % (a, hn), "calls|%s.1" % EPOCH, "9")

    # before grace has passed the hour is not read again ...
    assert w.once(h + 3600).returncode == 0
    assert len(w.lines()) == 1
    # ... after it, once, and then it is confirmed
    time.sleep(5.2)
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(a, None, "calls", h, 5),
                         line(a, None, "calls", h, 4, seq=2)]
    assert settled(redis)[hn][1] == "1"

    redis.cmd("CONFIG", "RESETSTAT")
    time.sleep(5.2)
    assert w.once(h + 3600).returncode == 0
    assert stat_calls(redis, "sscan") == 0
    assert len(w.lines()) == 2


def test_writer_layout_change_is_seen_by_its_digest(redis, tmp_path):
    """The writer layout (mtr:wu, mtr:widx) sends ZADD once per session
    and hour: a settled hour is read again when a writer hash changed."""
    w = Worker(tmp_path, redis, grace="1s")
    h = NOW_HOUR - 4 * 3600
    hn = hour_name(h)
    put(redis, "key-w", h, {"calls": 2})
    # one session (7) of a zone of two parts
    wkey = "mtr:wu:{%s}:7:%s:1" % (EPOCH, hn)
    redis.cmd("SADD", "mtr:widx:%s" % hn, "%s:7:2" % EPOCH)
    redis.cmd("HSET", "mtr:wu:{%s}:7:%s:0" % (EPOCH, hn),
              "%s|calls|2" % ("cd" * 32), "1")
    redis.cmd("HSET", wkey, "%s|calls|1" % ("ab" * 32), "4")
    assert w.once(h + 3600).returncode == 0
    time.sleep(1.2)
    assert w.once(h + 3600).returncode == 0     # the confirming read
    s = settled(redis)[hn]
    assert s[1] == "1" and len(s[2]) == 40
    digest = s[2]

    # unchanged: not read
    redis.cmd("CONFIG", "RESETSTAT")
    r = w.once(h + 3600)
    assert r.returncode == 0
    assert stat_calls(redis, "sscan") == 0
    assert settled(redis)[hn][2] == digest

    # the same session counts on, no ZADD: the digest differs, it is read
    redis.cmd("HSET", wkey, "%s|calls|1" % ("ab" * 32), "6")
    redis.cmd("CONFIG", "RESETSTAT")
    r = w.once(h + 3600)
    assert r.returncode == 0
    assert "writer layout changed" in r.stderr
    assert stat_calls(redis, "sscan") >= 1
    assert settled(redis)[hn][2] != digest


def test_resend_after_redis_lost_its_data(redis, tmp_path):
    """Redis restarted empty: the module rewrites every live counter (index
    entries first), the settled list is gone with the rest, and the file
    provider's key set keeps the resent record from being written twice."""
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 4 * 3600
    a = put(redis, "key-lost", h, {"calls": 8})
    assert w.once(h + 3600).returncode == 0
    assert settled(redis) != {}

    redis.cmd("FLUSHALL")
    put(redis, "key-lost", h, {"calls": 8})
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(a, None, "calls", h, 8)]
    assert redis.zrange_withscores("mtr:hours") == {}
    assert hour_name(h) in settled(redis)

    # counted on after the loss: the difference is billed once
    put(redis, "key-lost", h, {"calls": 11})
    assert w.once(h + 3600).returncode == 0
    assert sum(x["quantity"] for x in w.lines()) == 11


def test_unfinished_hours_stay_due(redis, tmp_path):
    """A key without customer is held for a provider other than file: its
    hour must stay in mtr:hours (and in mtr:{worker}:nocust)."""
    from fakes import FakeStripe
    fake = FakeStripe(api_key="sk_test_due_0123456789").start()
    try:
        (tmp_path / "k").write_text("sk_test_due_0123456789\n")
        (tmp_path / "k").chmod(0o600)
        w = Worker(tmp_path / "w", redis, provider="stripe",
                   stripe__base_url=fake.url,
                   stripe__api_key_file=tmp_path / "k")
        h = NOW_HOUR - 4 * 3600
        kh = put(redis, "key-nocust", h, {"calls": 3})
        w.once(h + 3600)
        assert hour_name(h) in redis.zrange_withscores("mtr:hours")
        assert settled(redis) == {}
        assert [x.decode() if isinstance(x, bytes) else x for x in
            redis.cmd("SMEMBERS", "mtr:{worker}:nocust")] == [kh]
    finally:
        fake.stop()
