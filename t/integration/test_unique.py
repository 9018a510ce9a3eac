"""Unique users (issue 15 part 1, the module): `meter zone=Z NAME
unique=$var [period=month|day|hour];` counts distinct values per key and
unique period.  Real nginx proxying to an upstream (nginx itself, second
port), real Redis: the members (first 64 bits of SHA-256 of each value)
land in mtr:uq:{KH}:NAME:UPERIOD (exact while under 1000) and
mtr:uh:{KH}:NAME:UPERIOD (HyperLogLog), indexed in mtr:uqidx:YYYYMM
(docs/redis-schema.md, "Unique users")."""

import hashlib
import json
import socket
import time

import pytest

from conftest import key_hash, line_of, nginx_t, wait_for

CONF = r"""
    meter_zone $http_x_api_key zone=api:@SIZE@;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;

    # the "API": the upstream, not metered
    server {
        listen 127.0.0.1:@PORT2@;
        meter off;
        location / { return 200 "ok\n"; }
    }

    server {
        listen 127.0.0.1:@PORT@;

        location /api {
            meter zone=api calls;
            meter zone=api users unique=$http_x_user;
            proxy_pass http://127.0.0.1:@PORT2@/;
        }

        location = /status {
            meter off;
            meter_status json;
        }

        location = /metrics {
            meter off;
            meter_status prometheus;
        }
    }
"""

KEY = "mk_live_uniq01"


def conf(size="1m", loc=None):
    text = CONF.replace("@SIZE@", size)
    if loc is not None:
        text = text.replace("meter zone=api users unique=$http_x_user;", loc)
    return text


def member(v):
    if isinstance(v, str):
        v = v.encode()
    return hashlib.sha256(v).hexdigest()[:16]


def month():
    return time.strftime("%Y%m", time.gmtime())


def status(n):
    return json.loads(n.get("/status")[1])["zones"][0]


def confirmed(n):
    z = status(n)
    return z["unique_dirty"] == 0 and z["pending"] == 0


def smembers(redis, k):
    return redis.smembers(k)


def commandstats(redis):
    """INFO commandstats: command -> calls."""
    out = {}
    info = redis.cmd("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[8:].split(":", 1)
            out[name] = int(rest.split("calls=")[1].split(",")[0])
    return out


def call(n, user, key=KEY, path="/api"):
    h = {"X-Api-Key": key}
    if user is not None:
        h["X-User"] = user
    st, _ = n.get(path, headers=h)
    assert st == 200


def test_exact_distinct_users_through_proxy(nginx_factory, redis):
    n = nginx_factory(conf(), workers=2, redis=redis.address)
    users = ["user-%d" % i for i in range(37)]
    calls = 0
    for rnd in range(5):
        for u in users[: 37 if rnd % 2 == 0 else 20]:
            call(n, u)
            calls += 1
    # no header: an empty value is not counted (the call still is)
    call(n, None)
    calls += 1
    # another key, the same users: counted apart
    for u in users[:3]:
        call(n, u, key="mk_live_uniq02")
    wait_for(lambda: confirmed(n)
             and redis.cmd("EXISTS", "mtr:uq:{%s}:users:%s"
                           % (key_hash("mk_live_uniq02"), month())), 10)

    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    uh = "mtr:uh:{%s}:users:%s" % (kh, month())
    assert int(redis.cmd("SCARD", uq)) == 37
    assert smembers(redis, uq) == {member(u) for u in users}
    # a HyperLogLog of 37 is exact in its sparse form
    assert int(redis.cmd("PFCOUNT", uh)) == 37
    assert int(redis.cmd("SCARD", "mtr:uq:{%s}:users:%s"
                         % (key_hash("mk_live_uniq02"), month()))) == 3
    assert smembers(redis, "mtr:uqidx:" + month()) == {
        "%s|users|%s" % (kh, month()),
        "%s|users|%s" % (key_hash("mk_live_uniq02"), month())}

    # the raw values never reach Redis
    for k in redis.keys():
        assert "user-" not in k
    assert not any("user-" in m for m in smembers(redis, uq))

    # no TTL: the worker deletes them
    assert int(redis.cmd("TTL", uq)) == -1
    assert int(redis.cmd("TTL", uh)) == -1

    z = status(n)
    assert z["unique_entries"] >= 40
    assert z["unique_dropped"] == 0 and z["unique_evicted"] == 0
    # 1/16 of the 1 MB zone: a 64-byte header, 104 bytes an entry (tag and
    # meter_uentry_t) and a bit of the dirty bitmap
    assert z["unique_slots"] == 628
    assert 64 + 628 * 104 + 10 * 8 <= 1048576 // 16 < 64 + 629 * 104 + 10 * 8
    prom = n.get("/metrics")[1].decode()
    for name in ("unique_entries", "unique_slots", "unique_dirty",
                 "unique_evicted_total", "unique_dropped_total"):
        assert 'nginx_meter_%s{zone="api"} ' % name in prom, name


def test_repeated_values_cost_no_redis_writes(nginx_factory, redis):
    # no counter: every Redis write is the unique meter's
    text = conf().replace("meter zone=api calls;", "")
    n = nginx_factory(text, workers=2, redis=redis.address)
    users = ["u%d" % i for i in range(50)]
    for u in users:
        call(n, u)
    wait_for(lambda: confirmed(n), 10)
    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    assert int(redis.cmd("SCARD", uq)) == 50

    redis.cmd("CONFIG", "RESETSTAT")
    for _ in range(3):
        for u in users:
            call(n, u)
    wait_for(lambda: confirmed(n), 10)
    time.sleep(0.5)             # a few flush passes
    st = commandstats(redis)
    # 150 calls of known users: nothing sent
    assert "evalsha" not in st and "sadd" not in st, st
    assert "hset" not in st and "pfadd" not in st, st

    # one new user: the index SADD and one script call (commandstats
    # counts the script's own SADD and PFADD too)
    call(n, "u-new")
    wait_for(lambda: confirmed(n)
             and commandstats(redis).get("evalsha", 0) >= 1, 10)
    time.sleep(0.3)
    st = commandstats(redis)
    assert (st["evalsha"], st["sadd"], st["pfadd"]) == (1, 2, 1), st
    assert int(redis.cmd("SCARD", uq)) == 51


def test_over_the_exact_limit(nginx_factory, redis):
    # 4 MB: 1/16 is 2,520 entries, more than the 1,500 users
    n = nginx_factory(conf("4m"), workers=1, redis=redis.address)
    users = ["big-%d" % i for i in range(1500)]
    for u in users:
        call(n, u)
    wait_for(lambda: confirmed(n), 20)
    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    uh = "mtr:uh:{%s}:users:%s" % (kh, month())
    # the exact set stops at MTR_UNIQUE_EXACT
    assert int(redis.cmd("SCARD", uq)) == 1000
    assert smembers(redis, uq) <= {member(u) for u in users}
    # HLL: 0.81 % standard error (redis/src/hyperloglog.c); 2 % is about
    # 2.5 of it, and the members are fixed, so the count is too
    pf = int(redis.cmd("PFCOUNT", uh))
    assert abs(pf - 1500) <= 30, pf
    assert status(n)["unique_dropped"] == 0


def test_periods_day_and_hour(nginx_factory, redis):
    loc = ("meter zone=api users unique=$http_x_user;\n"
           "meter zone=api d_users unique=$http_x_user period=day;\n"
           "meter zone=api h_users unique=$http_x_user period=hour;")
    n = nginx_factory(conf(loc=loc), workers=2, redis=redis.address)
    before = time.gmtime()
    for u in ("a", "b", "a", "c"):
        call(n, u)
    after = time.gmtime()
    if before.tm_hour != after.tm_hour:
        pytest.skip("crossed an hour boundary")
    wait_for(lambda: confirmed(n), 10)
    kh = key_hash(KEY)
    day = time.strftime("%Y%m%d", before)
    hour = time.strftime("%Y%m%d%H", before)
    m = time.strftime("%Y%m", before)
    want = {member(u) for u in "abc"}
    assert smembers(redis, "mtr:uq:{%s}:users:%s" % (kh, m)) == want
    assert smembers(redis, "mtr:uq:{%s}:d_users:%s" % (kh, day)) == want
    assert smembers(redis, "mtr:uq:{%s}:h_users:%s" % (kh, hour)) == want
    assert int(redis.cmd("PFCOUNT", "mtr:uh:{%s}:h_users:%s"
                         % (kh, hour))) == 3
    # the index of the month the period is in
    assert smembers(redis, "mtr:uqidx:" + m) == {
        "%s|users|%s" % (kh, m), "%s|d_users|%s" % (kh, day),
        "%s|h_users|%s" % (kh, hour)}
    assert sorted(redis.keys("mtr:uq*")) == sorted([
        "mtr:uq:{%s}:users:%s" % (kh, m),
        "mtr:uq:{%s}:d_users:%s" % (kh, day),
        "mtr:uq:{%s}:h_users:%s" % (kh, hour),
        "mtr:uqidx:" + m])


CONTEXTS = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter zone=api u_http unique=$http_x_user;

    # the upstream inherits the http level: it counts what it is sent
    server {
        listen 127.0.0.1:@PORT2@;
        location / { return 200 "ok\n"; }
    }

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api u_srv unique=$http_x_user;

        location /a { proxy_pass http://127.0.0.1:@PORT2@/; }
        location /c {
            meter zone=api u_loc unique=$http_x_user period=day;
            proxy_pass http://127.0.0.1:@PORT2@/;
        }
        location /d {
            meter off;
            proxy_pass http://127.0.0.1:@PORT2@/;
        }
        location = /status {
            meter off;
            meter_status json;
        }
    }
"""


def test_directive_contexts(nginx_factory, redis):
    n = nginx_factory(CONTEXTS, workers=2, redis=redis.address)
    for u in ("x1", "x2"):
        call(n, u, path="/a")
    for u in ("x2", "x3", "x4"):
        call(n, u, path="/c")
    for u in ("x5",):
        call(n, u, path="/d")
    wait_for(lambda: status(n)["unique_dirty"] == 0
             and len(redis.keys("mtr:uq:*")) == 3, 10)
    kh = key_hash(KEY)
    m = month()
    day = time.strftime("%Y%m%d", time.gmtime())

    def got(name, up):
        return smembers(redis, "mtr:uq:{%s}:%s:%s" % (kh, name, up))

    # /a: the server's meter; /c: its own only; /d: none
    assert got("u_srv", m) == {member("x1"), member("x2")}
    assert got("u_loc", day) == {member(u) for u in ("x2", "x3", "x4")}
    # the upstream got every proxied call, /d's too
    assert got("u_http", m) == {member("x%d" % i) for i in range(1, 6)}
    assert len(redis.keys("mtr:uq:*")) == 3


def test_redis_down_then_up_and_restarted(nginx_factory, redis):
    n = nginx_factory(conf(), workers=2, redis=redis.address)
    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    for i in range(5):
        call(n, "r%d" % i)
    wait_for(lambda: confirmed(n), 10)
    assert int(redis.cmd("SCARD", uq)) == 5

    redis.stop("save")
    for rnd in range(2):
        for i in range(12):
            call(n, "r%d" % i)
    # 7 new ones wait, the 5 known cost nothing
    wait_for(lambda: status(n)["unique_dirty"] == 7, 10)
    time.sleep(0.5)
    assert status(n)["unique_dirty"] == 7
    redis.start()
    wait_for(lambda: confirmed(n)
             and int(redis.cmd("SCARD", uq) or 0) == 12, 20)
    assert smembers(redis, uq) == {member("r%d" % i) for i in range(12)}

    # a Redis that lost everything (new run_id): every entry is resent,
    # with its index, without a new request
    redis.stop("kill")
    redis.start()
    wait_for(lambda: int(redis.cmd("SCARD", uq) or 0) == 12, 20)
    assert smembers(redis, uq) == {member("r%d" % i) for i in range(12)}
    assert int(redis.cmd("PFCOUNT", uq.replace("mtr:uq:", "mtr:uh:"))) == 12
    assert smembers(redis, "mtr:uqidx:" + month()) == {
        "%s|users|%s" % (kh, month())}


def test_reload_keeps_the_table(nginx_factory, redis):
    n = nginx_factory(conf(), workers=2, redis=redis.address)
    users = ["rl%d" % i for i in range(20)]
    for u in users:
        call(n, u)
    wait_for(lambda: confirmed(n), 10)
    entries = status(n)["unique_entries"]

    n.reload()
    assert status(n)["unique_entries"] == entries
    redis.cmd("CONFIG", "RESETSTAT")
    for u in users:
        call(n, u)
    wait_for(lambda: confirmed(n), 10)
    time.sleep(0.5)
    st = commandstats(redis)
    assert "evalsha" not in st, st

    # a reload that adds a unique meter to the zone: it counts at once
    loc = ("meter zone=api users unique=$http_x_user;\n"
           "meter zone=api users2 unique=$http_x_user;")
    n.reload(conf(loc=loc))
    call(n, "rl0")
    kh = key_hash(KEY)
    wait_for(lambda: confirmed(n) and smembers(
        redis, "mtr:uq:{%s}:users2:%s" % (kh, month())) == {member("rl0")},
        10)
    assert int(redis.cmd("SCARD", "mtr:uq:{%s}:users:%s"
                         % (kh, month()))) == 20


def raw_get(port, user):
    """One request whose X-User header carries these bytes as they are."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET /api HTTP/1.1\r\nHost: t\r\nX-Api-Key: " +
                  KEY.encode() + b"\r\nX-User: " + user +
                  b"\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        return int(data.split(b" ", 2)[1])
    finally:
        s.close()


def test_long_and_binary_values(nginx_factory, redis):
    n = nginx_factory(conf(), workers=1, redis=redis.address)
    long1 = b"L" * 5000
    long2 = b"L" * 4999 + b"M"          # differs in its last byte only
    at55 = b"x" * 55                    # one SHA-256 block and two
    at56 = b"x" * 56
    binary = bytes([1, 2, 0x7f, 0x80, 0xfe, 0xff, 0x09]) + b"\xc3\x28"
    values = [long1, long2, at55, at56, binary, long1, binary]
    for v in values:
        assert raw_get(n.port, v) == 200
    wait_for(lambda: confirmed(n), 10)
    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    assert smembers(redis, uq) == {member(v) for v in
                                   (long1, long2, at55, at56, binary)}


@pytest.mark.parametrize("loc,err", [
    ("meter zone=api u unique=$http_x_user period=week;",
     'invalid "period=week" in "meter" directive: the unique period is '
     '"month", "day" or "hour"'),
    ("meter zone=api u unique=$http_x_user max=$arg_a;",
     '"max=$arg_a" in "meter" directive: only one of "value=", "max=", '
     '"last=" and "unique=" is allowed'),
    ("meter zone=api u value=$arg_a unique=$http_x_user;",
     '"unique=$http_x_user" in "meter" directive: only one of'),
    ("meter zone=api u unique=;",
     'invalid "unique=" in "meter" directive: a variable name is expected'),
    ("meter zone=api u unique=$;",
     'invalid "unique=$" in "meter" directive: a variable name is expected'),
    ("meter zone=api u unique=user;",
     'invalid "unique=user" in "meter" directive: a variable name is '
     'expected'),
    ("meter zone=api u period=day;",
     '"period=" in "meter" directive is only for a "unique=" meter'),
    ("meter zone=api u unique=$http_x_user period=day period=hour;",
     'duplicate "period=hour" in "meter" directive'),
    ("meter zone=api unique=$http_x_user;",
     '"meter" must have a meter name'),
])
def test_directive_errors(loc, err):
    text = conf(loc=loc)
    rc, out, text, path = nginx_t(text, redis="127.0.0.1:1")
    assert rc != 0, text
    assert err in out and "[emerg]" in out, out
    assert "%s:%d" % (path, line_of(text, loc)) in out, out


def test_directive_ok():
    loc = ("meter zone=api u unique=${http_x_user}-$arg_app period=hour "
           "status=2xx method=GET,POST if=$http_x_user;")
    rc, out, text, _ = nginx_t(conf(loc=loc), redis="127.0.0.1:1")
    assert rc == 0, out


def test_noscript_reloads_the_script(nginx_factory, redis):
    n = nginx_factory(conf(), workers=1, redis=redis.address)
    call(n, "s1")
    wait_for(lambda: confirmed(n), 10)
    # a Redis that forgot its scripts (SCRIPT FLUSH, a failover): NOSCRIPT,
    # the script is loaded again, the user still arrives
    redis.cmd("SCRIPT", "FLUSH")
    call(n, "s2")
    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    wait_for(lambda: confirmed(n) and smembers(redis, uq) == {
        member("s1"), member("s2")}, 10)
    assert status(n)["flush_errors"] >= 1
    assert "NOSCRIPT" in n.log()


def test_graceful_stop_sends_the_last_users(nginx_factory, redis):
    # no pass runs before the stop: only the exit's blocking flush
    text = conf().replace("meter_flush_interval 100ms;",
                          "meter_flush_interval 1h;")
    n = nginx_factory(text, workers=2, redis=redis.address)
    for u in ("g1", "g2", "g3", "g1"):
        call(n, u)
    assert status(n)["unique_dirty"] == 3
    assert redis.keys("mtr:uq*") == []
    n.stop()
    kh = key_hash(KEY)
    assert smembers(redis, "mtr:uq:{%s}:users:%s" % (kh, month())) == {
        member(u) for u in ("g1", "g2", "g3")}
    assert smembers(redis, "mtr:uqidx:" + month()) == {
        "%s|users|%s" % (kh, month())}


def test_composite_and_set_values(nginx_factory, redis):
    # text with variables (the script engine) and a variable "set" wrote
    loc = ("meter zone=api users unique=${http_x_user}@$arg_app;\n"
           "set $uid \"id-$http_x_user\";\n"
           "meter zone=api sets unique=$uid;")
    n = nginx_factory(conf(loc=loc), workers=1, redis=redis.address)
    for u, app in (("a", "1"), ("a", "2"), ("b", "1"), ("a", "1")):
        call(n, u, path="/api?app=" + app)
    wait_for(lambda: confirmed(n) and len(redis.keys("mtr:uq:*")) == 2, 10)
    kh = key_hash(KEY)
    assert smembers(redis, "mtr:uq:{%s}:users:%s" % (kh, month())) == {
        member(v) for v in ("a@1", "a@2", "b@1")}
    assert smembers(redis, "mtr:uq:{%s}:sets:%s" % (kh, month())) == {
        member(v) for v in ("id-a", "id-b")}


def test_a_full_table_evicts_and_only_resends(nginx_factory, redis):
    """More users than the table holds (1 MB zone: 628 entries): confirmed
    entries are overwritten, nothing is lost, a user who comes back after
    being evicted is sent again, which changes nothing in Redis."""
    text = conf().replace("meter zone=api calls;", "")
    n = nginx_factory(text, workers=1, redis=redis.address)
    assert status(n)["unique_slots"] == 628
    users = ["f%d" % i for i in range(900)]
    for lo in range(0, 900, 100):
        for u in users[lo:lo + 100]:
            call(n, u)
        # paced: at most 100 unconfirmed at a time, so none is dropped
        wait_for(lambda: confirmed(n), 10)
    kh = key_hash(KEY)
    uq = "mtr:uq:{%s}:users:%s" % (kh, month())
    assert int(redis.cmd("SCARD", uq)) == 900
    z = status(n)
    assert z["unique_dropped"] == 0
    # the value hash is seeded per zone: a slot no user's probe window
    # reached may stay empty; one worker, one request at a time, so each
    # new user either filled an empty slot or overwrote exactly one
    assert 628 - 8 <= z["unique_entries"] <= 628, z
    assert z["unique_evicted"] == 900 - z["unique_entries"], z

    # the first ones again: the evicted ones are new to the table, resent
    redis.cmd("CONFIG", "RESETSTAT")
    for u in users[:100]:
        call(n, u)
    wait_for(lambda: confirmed(n), 10)
    assert commandstats(redis).get("evalsha", 0) >= 1
    assert int(redis.cmd("SCARD", uq)) == 900
    assert smembers(redis, uq) == {member(u) for u in users}


def test_billed_by_the_worker(nginx_factory, redis, tmp_path):
    """End to end with the real worker (file provider): what this module
    writes is the month's figure of distinct users, per customer over its
    keys (a user on two keys counts once), and the calls as usual."""
    from test_figures import customer, fig_line
    from test_worker import Worker
    n = nginx_factory(conf(), workers=2, redis=redis.address)
    customer(redis, "cu", KEY)
    customer(redis, "cu", "mk_live_uniq02")
    start = int(time.time()) // 3600 * 3600
    for u in ("a", "b", "c", "a"):
        call(n, u)
    for u in ("c", "d"):
        call(n, u, key="mk_live_uniq02")
    wait_for(lambda: confirmed(n) and len(redis.keys("mtr:uq:*")) == 2, 10)
    if int(time.time()) // 3600 * 3600 != start:
        pytest.skip("crossed an hour boundary")
    w = Worker(tmp_path / "w", redis, grace="5m")
    assert w.once(start + 3600 + 600).returncode == 0
    got = w.lines()
    figs = [x for x in got if x["meter"] == "users"]
    # the customer's figure (no one key's): a, b, c, d
    assert figs == [fig_line(None, "cu", "users", "unique", start, 4)], got
    assert sum(x["quantity"] for x in got if x["meter"] == "calls") == 6
