"""The governance refresh costs what changed (issue 12): nothing changed, no
new copy; only usage moved, a new customer table over the published key
table; mtr:gov changed, a rebuild read in HSCAN pages and built in slices
that leave the event loop to the requests.  What a refresh did is read from
the module's debug_core line ("governance refresh: ... rebuilt=none|
customers|keys ..."; Debian's nginx is built --with-debug)."""

import http.client
import json
import re
import subprocess
import threading
import time

from conftest import key_hash, wait_for

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh @REFRESH@;
    meter_governance_size @GOVSIZE@;

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls;
        meter_governance zone=api unknown_key=401;
        meter_governance_headers on;
        location / { return 200 "ok\n"; }
        location /api { try_files /nonexistent @ok; }
        location @ok { return 200 "ok\n"; }
    }

    server {
        listen 127.0.0.1:@PORT2@;
        location = /status { meter_status json; }
        location = /ping { return 200 "ok\n"; }
    }
"""

MAIN = "error_log @TMP@/debug.log debug_core;"

LINE = re.compile(r"governance refresh: (keys=.*)$", re.M)


def gov_value(cust, status="a", reason="", revoked=0):
    """docs/redis-schema.md mtr:gov: CUSTOMER TAB STATUS TAB REASON TAB
    SINCE TAB REVOKED."""
    return "%s\t%s\t%s\t0\t%d" % (cust, status, reason, revoked)


def start(nginx_factory, redis, refresh="200ms", govsize="8m"):
    n = nginx_factory(CONF, workers=1, main_conf=MAIN, redis=redis.address,
                      refresh=refresh, govsize=govsize)
    wait_for(lambda: status(n)["gov_refreshed"] > 0, 60,
             msg="no governance refresh")
    return n


def status(n):
    c = http.client.HTTPConnection("127.0.0.1", n.port2, timeout=10)
    c.request("GET", "/status")
    body = c.getresponse().read()
    c.close()
    return json.loads(body)["zones"][0]


def call(n, key, path="/api"):
    c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=10)
    try:
        c.request("GET", path, headers={"X-Api-Key": key})
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("X-Credit-Remaining")
    finally:
        c.close()


def refreshes(n, since=0):
    """The refreshes logged after byte offset since: a dict each."""
    path = n.tmp / "debug.log"
    text = path.read_bytes()[since:].decode(errors="replace")
    return [dict(kv.split("=", 1) for kv in m.group(1).split())
            for m in LINE.finditer(text)]


def log_size(n):
    return (n.tmp / "debug.log").stat().st_size


def wait_refreshes(n, since, count, timeout=30):
    wait_for(lambda: len(refreshes(n, since)) >= count, timeout,
             msg="%d refreshes" % count)
    return refreshes(n, since)


def seed(redis, tmp, fields):
    """HSET mtr:gov FIELD VALUE ... through redis-cli --pipe, then INCR
    mtr:gov:version."""
    def resp(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    data = []
    items = list(fields.items())
    for i in range(0, len(items), 1000):
        args = ["HSET", "mtr:gov"]
        for f, v in items[i:i + 1000]:
            args += [f, v]
        data.append(resp(*args))
    data.append(resp("INCR", "mtr:gov:version"))
    path = tmp / "seed.resp"
    path.write_bytes(b"".join(data))
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-h", redis.host, "-p",
                            str(redis.port), "--pipe"], stdin=f,
                           capture_output=True, text=True, timeout=300)
    assert "errors: 0, replies: %d" % len(data) in r.stdout, r.stdout


def test_refresh_rebuilds_only_what_changed(nginx_factory, redis):
    redis.cmd("HSET", "mtr:gov", key_hash("mk_a1"), gov_value("acme"))
    redis.cmd("HSET", "mtr:gov", key_hash("mk_a2"), gov_value("acme"))
    redis.cmd("HSET", "mtr:gov", key_hash("mk_b1"),
              gov_value("bolt", "d", "invoice_overdue"))
    redis.cmd("HSET", "mtr:gov", key_hash("mk_c1"),
              gov_value("core", revoked=1700000000))
    redis.cmd("HSET", "mtr:gov:credit", "acme|calls", "100")
    redis.cmd("HSET", "mtr:used:{%s}" % key_hash("mk_a1"), "calls", "30")
    redis.cmd("HSET", "mtr:used:{%s}" % key_hash("mk_a2"), "calls", "20")
    redis.cmd("INCR", "mtr:gov:version")
    n = start(nginx_factory, redis)

    first = refreshes(n)
    assert first and first[0]["rebuilt"] == "keys", first
    assert (first[0]["keys"], first[0]["customers"]) == ("4", "3")

    # nothing changes: no copy is made, and the one in force is exact
    off = log_size(n)
    assert all(r["rebuilt"] == "none"
               for r in wait_refreshes(n, off, 5)), refreshes(n, off)
    assert call(n, "mk_a1") == (200, "calls=50")
    assert call(n, "mk_b1") == (402, None)
    assert call(n, "mk_c1") == (401, None)
    assert call(n, "mk_x1") == (401, None)
    s = status(n)
    assert (s["gov_customers_delinquent"], s["gov_keys_blocked"]) == (1, 2)

    # another node's usage moved: a customer table, not a key table
    wait_for(lambda: int(redis.cmd("HGET", "mtr:used:{%s}"
                                   % key_hash("mk_a1"), "calls")) >= 31,
             10, msg="the call counted above reaching mtr:used")
    off = log_size(n)
    redis.cmd("HINCRBY", "mtr:used:{%s}" % key_hash("mk_a2"), "calls", "40")
    rs = wait_refreshes(n, off, 3)
    assert "keys" not in [r["rebuilt"] for r in rs], rs
    assert "customers" in [r["rebuilt"] for r in rs], rs
    # 100 granted - (31 + 60) used
    assert call(n, "mk_a2") == (200, "calls=9")
    assert call(n, "mk_b1") == (402, None)
    assert call(n, "mk_c1") == (401, None)
    assert call(n, "mk_x1") == (401, None)

    # mtr:gov changed: a new key table
    off = log_size(n)
    redis.cmd("HSET", "mtr:gov", key_hash("mk_b1"), gov_value("bolt"))
    redis.cmd("HSET", "mtr:gov", key_hash("mk_b2"), gov_value("bolt"))
    redis.cmd("INCR", "mtr:gov:version")
    rs = wait_refreshes(n, off, 2)
    assert "keys" in [r["rebuilt"] for r in rs], rs
    assert call(n, "mk_b1") == (200, None)
    assert call(n, "mk_b2") == (200, None)
    # the call of mk_a2 above, once flushed and read: 100 - (31 + 61)
    wait_for(lambda: int(redis.cmd("HGET", "mtr:used:{%s}"
                                   % key_hash("mk_a2"), "calls")) == 61,
             10, msg="mk_a2's call reaching mtr:used")
    wait_refreshes(n, log_size(n), 2)
    assert call(n, "mk_a1") == (200, "calls=8")
    s = status(n)
    assert (s["gov_customers_delinquent"], s["gov_keys_blocked"]) == (0, 1)


def test_hscan_pages_cover_every_key(nginx_factory, redis, tmp_path):
    """2,500 keys: three pages and more of HSCAN ... COUNT 1000."""
    fields = {}
    for i in range(2500):
        c = i // 5
        fields[key_hash("mk_p%d" % i)] = gov_value(
            "c%d" % c, *(("d", "invoice_overdue") if c % 2 else ("a", "")))
    seed(redis, tmp_path, fields)
    n = start(nginx_factory, redis)

    s = status(n)
    assert (s["gov_customers_delinquent"], s["gov_keys_blocked"]) == (250, 1250)
    for i in range(0, 2500, 37):
        assert call(n, "mk_p%d" % i)[0] == (402 if (i // 5) % 2 else 200), i
    r = refreshes(n)[0]
    assert (r["keys"], r["customers"]) == ("2500", "500")


def test_rebuild_of_many_keys_leaves_the_loop_to_requests(nginx_factory,
                                                          redis, tmp_path):
    """300k keys, mtr:gov changing every refresh: a client on the same
    worker never waits long.  A refresh of them built in one go held the
    loop ~0.25 s (bench/README.md)."""
    nkeys = 300000
    fields = {key_hash("mk_l%d" % i): gov_value("c%d" % (i // 10))
              for i in range(nkeys - 1)}
    # the customer that changes: one key (a customer's keys share a state)
    fields[key_hash("mk_solo")] = gov_value("solo")
    seed(redis, tmp_path, fields)
    # README: two copies of 2^20 key slots x 40 bytes + 30k x 400 bytes
    n = start(nginx_factory, redis, refresh="500ms", govsize="112m")

    stop = threading.Event()

    def change():
        j = 0
        while not stop.wait(0.5):
            redis.cmd("HSET", "mtr:gov", key_hash("mk_solo"), gov_value(
                "solo", *(("d", "invoice_overdue") if j % 2 == 0
                          else ("a", ""))))
            redis.cmd("INCR", "mtr:gov:version")
            j += 1

    off = log_size(n)
    t = threading.Thread(target=change, daemon=True)
    t.start()
    worst = 0.0
    slow = 0
    try:
        c = http.client.HTTPConnection("127.0.0.1", n.port2, timeout=10)
        end = time.monotonic() + 8
        while time.monotonic() < end:
            t0 = time.monotonic()
            c.request("GET", "/ping")
            c.getresponse().read()
            took = time.monotonic() - t0
            worst = max(worst, took)
            slow += took >= 0.15
        c.close()
    finally:
        stop.set()
        t.join()

    rebuilt = [r for r in refreshes(n, off) if r["rebuilt"] == "keys"]
    print("worst latency %.1f ms, %d at 150 ms or more; rebuilds: %s"
          % (worst * 1e3, slow, rebuilt))
    # the rebuild in one go held it ~0.25 s at every refresh (16 requests
    # in 8 s); slices, a few ms at most.  A shared machine may preempt
    # nginx once or twice that long, hence a count, not the worst
    assert slow <= 2, (slow, worst)
    assert rebuilt, refreshes(n, off)
    for r in rebuilt:
        assert r["keys"] == str(nkeys)
        assert int(r["slices"]) > 100, r
        # CPU, not wall time: a shared machine preempts
        assert int(r["longest_cpu_us"]) < 5000, r

    # the last copy is whole: a sample of keys, and the one that changed
    for i in range(2, nkeys - 1, 9973):
        assert call(n, "mk_l%d" % i)[0] == 200, i
    want = 402 if redis.cmd("HGET", "mtr:gov", key_hash("mk_solo")).split(
        b"\t")[1] == b"d" else 200
    wait_for(lambda: call(n, "mk_solo")[0] == want, 30)


def logged(redis, fields):
    """A writer of this version (meterctl, the worker's sync): the fields,
    the version, then mtr:gov:log "VERSION KH ..." of what it rewrote."""
    if fields:
        args = ["HSET", "mtr:gov"]
        for f, v in fields.items():
            args += [f, v]
        redis.cmd(*args)
    v = int(redis.cmd("INCR", "mtr:gov:version"))
    redis.cmd("ZADD", "mtr:gov:log", str(v), " ".join([str(v)] + list(fields)))
    return v


def after(n, redis, change):
    """Makes the change, waits until a refresh has read it: those
    refreshes' logged lines."""
    off = log_size(n)
    v = change()
    wait_for(lambda: any(r["rebuilt"] != "none" for r in refreshes(n, off))
             and status(n)["gov_refreshed"] > 0, 20,
             msg="a refresh of version %s" % v)
    # one more: the copy of that version is the one in force
    return wait_refreshes(n, log_size(n), 1) and refreshes(n, off)


def test_logged_change_costs_what_changed(nginx_factory, redis):
    """mtr:gov:log lists what a version rewrote: the refresh reads those
    fields and applies them in place (rebuilt=delta), for a status, a new
    key, a new customer, a key moved and revoked, a grant; a version the
    log lacks (an older writer) reads all of mtr:gov, and both give the
    same answers and figures."""
    kh = key_hash
    redis.cmd("HSET", "mtr:gov", kh("mk_a1"), gov_value("acme"),
              kh("mk_a2"), gov_value("acme"), kh("mk_b1"), gov_value("bolt"))
    redis.cmd("HSET", "mtr:gov:credit", "acme|calls", "100")
    redis.cmd("INCR", "mtr:gov:version")
    n = start(nginx_factory, redis)
    assert refreshes(n)[0]["rebuilt"] == "keys"
    assert call(n, "mk_b1") == (200, None)

    def only_delta(rs):
        # delta, or delta+customers when usage moved too
        assert any(r["rebuilt"].startswith("delta") for r in rs), rs
        assert "keys" not in [r["rebuilt"] for r in rs], rs

    # a status: bolt overdue
    only_delta(after(n, redis, lambda: logged(redis, {
        kh("mk_b1"): gov_value("bolt", "d", "invoice_overdue")})))
    assert call(n, "mk_b1") == (402, None)
    s = status(n)
    assert (s["gov_customers_delinquent"], s["gov_keys_blocked"]) == (1, 1)

    # a new key of bolt, and bolt in good standing again
    only_delta(after(n, redis, lambda: logged(redis, {
        kh("mk_b1"): gov_value("bolt"), kh("mk_b2"): gov_value("bolt")})))
    assert call(n, "mk_b1") == (200, None)
    assert call(n, "mk_b2") == (200, None)
    s = status(n)
    assert (s["gov_customers_delinquent"], s["gov_keys_blocked"]) == (0, 0)

    # a new customer, overdue from the start
    assert call(n, "mk_c1") == (401, None)
    only_delta(after(n, redis, lambda: logged(redis, {
        kh("mk_c1"): gov_value("core", "d", "invoice_overdue")})))
    assert call(n, "mk_c1") == (402, None)

    # acme's mk_a2 moves to core, mk_a1 is revoked; core is cleared
    only_delta(after(n, redis, lambda: logged(redis, {
        kh("mk_a1"): gov_value("acme", revoked=1700000000),
        kh("mk_a2"): gov_value("core"), kh("mk_c1"): gov_value("core")})))
    assert call(n, "mk_a1") == (401, None)
    # core has no credit: no header, and its calls do not draw acme's
    assert call(n, "mk_a2") == (200, None)
    assert call(n, "mk_c1") == (200, None)
    s = status(n)
    assert (s["gov_customers_delinquent"], s["gov_keys_blocked"]) == (0, 1)

    # a grant only: a version that rewrote no field, no key table
    redis.cmd("HSET", "mtr:gov:credit", "core|calls", "1000")
    rs = after(n, redis, lambda: logged(redis, {}))
    assert "keys" not in [r["rebuilt"] for r in rs], rs
    st, left = call(n, "mk_c1")
    assert st == 200 and left.startswith("calls="), (st, left)

    # versions logged several at a time are applied together
    # (a writer rewrites all keys of the customer it changed)
    def two():
        d = gov_value("bolt", "d", "credit_exhausted")
        logged(redis, {kh("mk_b1"): d, kh("mk_b2"): d})
        return logged(redis, {kh("mk_b1"): d, kh("mk_b2"): d, kh("mk_b3"): d})
    only_delta(after(n, redis, two))
    assert call(n, "mk_b3") == (402, None)
    delta = status(n)

    # a version without an entry: all of mtr:gov is read, same answers
    def gap():
        redis.cmd("INCR", "mtr:gov:version")
        return logged(redis, {})
    rs = after(n, redis, gap)
    assert "keys" in [r["rebuilt"] for r in rs], rs
    full = status(n)
    for f in ("gov_customers_delinquent", "gov_keys_blocked"):
        assert delta[f] == full[f], (f, delta[f], full[f])
    assert (full["gov_customers_delinquent"], full["gov_keys_blocked"]) \
        == (1, 4)
    for k, want in (("mk_a1", 401), ("mk_a2", 200), ("mk_b1", 402),
                    ("mk_b2", 402), ("mk_b3", 402), ("mk_c1", 200),
                    ("mk_x", 401)):
        assert call(n, k)[0] == want, k

    # the log says "*" (too many keys to list): all of mtr:gov too
    def star():
        redis.cmd("HSET", "mtr:gov", kh("mk_b1"), gov_value("bolt"))
        v = int(redis.cmd("INCR", "mtr:gov:version"))
        redis.cmd("ZADD", "mtr:gov:log", str(v), "%d *" % v)
        return v
    rs = after(n, redis, star)
    assert "keys" in [r["rebuilt"] for r in rs], rs
    assert call(n, "mk_b1") == (200, None)


def test_meterctl_writes_the_log(nginx_factory, redis):
    """meterctl's changes are logged in mtr:gov:log and applied in place."""
    from conftest import meterctl
    meterctl(redis, "customers", "add", "acme", "--email", "a@example.com",
             "--provider", "file")
    n = start(nginx_factory, redis)
    meterctl(redis, "keys", "add", "mk_live_t1", "--customer", "acme")
    log = redis.cmd("ZRANGE", "mtr:gov:log", "0", "-1")
    assert any(key_hash("mk_live_t1").encode() in m for m in log), log
    wait_for(lambda: call(n, "mk_live_t1")[0] == 200, 20,
             msg="the key through the log")
    rs = after(n, redis, lambda: meterctl(redis, "delinquent", "set", "acme"))
    assert "keys" not in [r["rebuilt"] for r in rs], rs
    assert call(n, "mk_live_t1") == (402, None)
