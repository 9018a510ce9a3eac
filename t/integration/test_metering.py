"""Metering core (issue 3): real nginx with the module, 2 workers, real
redis-server.  Every expected number comes from the responses the client
actually got; Redis must hold exactly that."""

import json
import os
import re
import subprocess
import time
from collections import Counter

import pytest

from conftest import (Client, Traffic, expect_totals, key_hash, line_of,
                      nginx_t, raw_request, raw_status, totals, usage,
                      usage_fields, utc_hour, wait_for)

KEYS = ["mk_live_alpha01", "mk_live_bravo02", "mk_live_charlie3"]

COMMON = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;

    # the "API": nginx itself, on the second port
    server {
        listen 127.0.0.1:@PORT2@;
        location = /s/200 { return 200 "ok\n"; }
        location = /s/404 { return 404; }
        location = /s/500 { return 500; }
    }
"""

API = COMMON + r"""
    server {
        listen 127.0.0.1:@PORT@;

        location /getCreditScore {
            meter zone=api credit status=200;
            meter zone=api credit_all;
            proxy_pass http://127.0.0.1:@PORT2@/s/$arg_s;
        }

        location /search {
            meter zone=api search status=2xx,404 method=GET,POST;
            proxy_pass http://127.0.0.1:@PORT2@/s/$arg_s;
        }

        location /free {
            proxy_pass http://127.0.0.1:@PORT2@/s/$arg_s;
        }

        location = /status { meter_status json; }
        location = /metrics { meter_status prometheus; }
    }
"""


def api_rule(route, method, status):
    """The meters API counts for one request."""
    meters = []
    if route == "/getCreditScore":
        if status == 200:
            meters.append("credit")
        meters.append("credit_all")
    if (route == "/search" and method in ("GET", "POST")
            and (200 <= status <= 299 or status == 404)):
        meters.append("search")
    return meters


def api_plan(keys, methods=("GET", "POST", "HEAD", "DELETE"),
             statuses=(200, 404, 500),
             routes=("/getCreditScore", "/search", "/free")):
    """Key i gets i+1 copies of every request, so totals differ per key;
    None: no key header, "": an empty one."""
    plan = []
    for i, key in enumerate(keys):
        for route in routes:
            for method in methods:
                for status in statuses:
                    headers = {} if key is None else {"X-Api-Key": key}
                    tag = (key, route, method, status)
                    plan += [(method, "%s?s=%d" % (route, status), headers,
                              tag)] * (i + 1)
    return plan


def expected(traffic, rule=api_rule):
    """Totals implied by the full responses the client got."""
    exp = Counter()
    for ((key, route, method, status), got), n in traffic.ok.items():
        assert got == status, "%s %s answered %d" % (method, route, got)
        if key:
            for m in rule(route, method, status):
                exp[(key, m)] += n
    return exp


def status_json(n, path="/status"):
    code, body = n.get(path)
    assert code == 200, body
    doc = json.loads(body)
    assert doc["version"] == 1
    return {z["name"]: z for z in doc["zones"]}


def epochs(redis):
    return {field.split("|", 1)[1].split(".")[0]
            for (_, _, field) in usage_fields(redis)}


# ------------------------------------------------------------ counting

def test_keys_routes_methods_statuses(redis, nginx_factory):
    n = nginx_factory(API, redis=redis.address)
    plan = api_plan(KEYS + [None, ""])
    t = Traffic(n.port, plan, threads=4, limit=len(plan)).run()
    assert not t.failed
    assert sum(t.ok.values()) == 4 * len(plan)
    exp = expected(t)
    # 3 keys x (GET, POST) x (200, 404), (i + 1) copies, 4 threads
    assert exp[(KEYS[2], "search")] == 2 * 2 * 3 * 4
    expect_totals(redis, exp)
    assert key_hash("") not in {kh for kh, _ in totals(redis)}
    assert usage(redis, KEYS[0], "credit") == 4 * 4


def test_value_bytes_sent_and_request_length(redis, nginx_factory):
    big = "y" * 3000                    # nginx: parameters up to 4 KB
    conf = COMMON + r"""
    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api bytes value=$bytes_sent;
        meter zone=api body value=$body_bytes_sent;
        meter zone=api reqlen value=$request_length;
        meter zone=api calls;
        location = /small { return 200 "abc"; }
        location = /big { return 200 "%s"; }
        location = /gone { return 404; }
        location = /proxied {
            proxy_pass http://127.0.0.1:@PORT2@/s/200;
        }
    }
""" % big
    n = nginx_factory(conf, redis=redis.address)
    exp = Counter()
    for i, key in enumerate(KEYS):
        for path in ("/small", "/big", "/gone", "/proxied"):
            for j in range(i + 2):
                req = ("GET %s HTTP/1.1\r\nHost: localhost\r\n"
                       "X-Api-Key: %s\r\nX-Pad: %s\r\n"
                       "Connection: close\r\n\r\n"
                       % (path, key, "p" * j)).encode()
                resp = raw_request(n.port, req)
                head, _, body = resp.partition(b"\r\n\r\n")
                assert raw_status(resp) == (404 if path == "/gone" else 200)
                exp[(key, "bytes")] += len(resp)
                exp[(key, "body")] += len(body)
                exp[(key, "reqlen")] += len(req)
                exp[(key, "calls")] += 1
    assert exp[(KEYS[0], "body")] > 2 * 3000
    expect_totals(redis, exp)


def test_inheritance_in_nested_locations(redis, nginx_factory):
    conf = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter zone=api http_level;

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api srv;

        location /outer {
            meter zone=api outer;
            location /outer/own {
                meter zone=api inner;
                meter zone=api inner_404 status=404;
                return 200 "own\n";
            }
            location /outer/inherit { return 200 "inherit\n"; }
            return 200 "outer\n";
        }
        location /plain { return 200 "plain\n"; }
    }

    server {
        listen 127.0.0.1:@PORT2@;
        location / { return 200 "second\n"; }
    }
"""
    n = nginx_factory(conf, redis=redis.address)
    hits = {("/outer", n.port): ["outer"],
            ("/outer/own", n.port): ["inner"],
            ("/outer/inherit", n.port): ["outer"],
            ("/plain", n.port): ["srv"],
            ("/x", n.port2): ["http_level"]}
    exp = Counter()
    for i, key in enumerate(KEYS):
        for (path, port), meters in hits.items():
            c = Client(port)
            for _ in range(i + 1):
                assert c.request("GET", path, {"X-Api-Key": key}) == 200
                for m in meters:
                    exp[(key, m)] += 1
            c.close()
    expect_totals(redis, exp)


def test_if_parameter(redis, nginx_factory):
    conf = COMMON + r"""
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            meter zone=api premium if=$http_x_premium;
            meter zone=api calls;
            return 200 "ok\n";
        }
    }
"""
    n = nginx_factory(conf, redis=redis.address)
    c = Client(n.port)
    cases = [("1", 1), ("0", 0), ("", 0), (None, 0), ("yes", 1)]
    exp = Counter()
    for flag, counted in cases:
        h = {"X-Api-Key": KEYS[0]}
        if flag is not None:
            h["X-Premium"] = flag
        assert c.request("GET", "/", h) == 200
        exp[(KEYS[0], "premium")] += counted
        exp[(KEYS[0], "calls")] += 1
    expect_totals(redis, exp)


def test_non_integer_value_is_an_error_not_a_crash(redis, nginx_factory):
    conf = COMMON + r"""
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            meter zone=api units value=$http_x_units;
            return 200 "ok\n";
        }
        location = /status { meter_status json; }
    }
"""
    n = nginx_factory(conf, redis=redis.address)
    c = Client(n.port)
    for units in ("5", "12", "abc", "-3", "1.5", "0"):
        assert c.request("GET", "/", {"X-Api-Key": KEYS[1],
                                      "X-Units": units}) == 200
    expect_totals(redis, {(KEYS[1], "units"): 17})
    assert status_json(n)["api"]["value_errors"] == 3


# ------------------------------------------------------------ keys

def test_long_and_binary_keys(redis, nginx_factory):
    conf = r"""
    meter_zone $http_x_api_key zone=hdr:1m;
    meter_zone $arg_api_key zone=arg:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    large_client_header_buffers 4 32k;

    server {
        listen 127.0.0.1:@PORT@;
        location /h { meter zone=hdr h; return 200 "h\n"; }
        location /a { meter zone=arg a; return 200 "a\n"; }
    }
"""
    n = nginx_factory(conf, redis=redis.address)
    long_key = bytes((0x41 + i % 26) for i in range(8192))
    # every byte nginx takes in a header value: not NUL/CR/LF, and no
    # leading/trailing blanks (nginx trims those)
    bin_key = b"\xff" + bytes(b for b in range(1, 256)
                              if b not in (0, 10, 13)) + b"\x80"
    exp = Counter()

    def send(path, header_key=None, times=1):
        for _ in range(times):
            req = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
            if header_key is not None:
                req += b"X-Api-Key: " + header_key + b"\r\n"
            req += b"Connection: close\r\n\r\n"
            assert raw_status(raw_request(n.port, req)) == 200

    send(b"/h", long_key, 3)
    exp[(long_key, "h")] += 3
    send(b"/h", bin_key, 2)
    exp[(bin_key, "h")] += 2
    send(b"/h", b"", 4)                       # empty header: not metered
    send(b"/h", None, 4)                      # no header: not metered
    # $arg_ is not decoded: the key is the percent-encoded text nginx saw
    enc = b"%00%ff%0D%0A%20%e2%82%ac"
    send(b"/a?api_key=" + enc, None, 2)
    exp[(enc, "a")] += 2
    send(b"/a?api_key=" + long_key, None, 1)
    exp[(long_key, "a")] += 1
    send(b"/a?api_key=", None, 3)              # empty: not metered
    send(b"/a?other=1", None, 3)

    expect_totals(redis, exp)
    assert key_hash(b"") not in {kh for kh, _ in totals(redis)}


def test_key_header_spellings(redis, nginx_factory):
    """A key $http_NAME is read from the headers by the module itself (issue
    12): it must bill exactly what nginx 1.22's variable reads: the name in
    any case, '-' or '_' (underscores_in_headers), ${...} and upper-case
    spellings of the variable, the first of two headers, no prefix match;
    and a "set $http_NAME" stands in for the header."""
    conf = r"""
    meter_zone $http_x_api_key zone=hdr:1m;
    meter_zone ${HTTP_X_API_KEY} zone=up:1m;
    meter_zone $http_x_shadow zone=sh:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;

    server {
        listen 127.0.0.1:@PORT@;
        underscores_in_headers on;
        location /h { meter zone=hdr h; meter zone=up u; return 200 "h\n"; }
        location /s {
            set $http_x_shadow "fixed";
            meter zone=sh s;
            return 200 "s\n";
        }
    }
"""
    n = nginx_factory(conf, redis=redis.address)
    exp = Counter()

    def send(path, *headers):
        req = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
        for h in headers:
            req += h + b"\r\n"
        req += b"Connection: close\r\n\r\n"
        assert raw_status(raw_request(n.port, req)) == 200

    for header, key in ((b"X-Api-Key: k1", b"k1"), (b"x-API-kEY: k2", b"k2"),
                        (b"X_Api_Key: k3", b"k3"), (b"x_api-KEY: k4", b"k4")):
        send(b"/h", header)
        exp[(key, "h")] += 1
        exp[(key, "u")] += 1
    # two of them: nginx 1.22's variable reads the first
    send(b"/h", b"X-Api-Key: k5", b"User-Agent: t", b"x-api-key: k6")
    exp[(b"k5", "h")] += 1
    exp[(b"k5", "u")] += 1
    # other names, a prefix or an extension of it: no key
    send(b"/h", b"X-Api-Keys: k7", b"X-Api-Ke: k8", b"X-Api-Kez: k9")
    send(b"/s", b"X-Shadow: h1")
    send(b"/s")
    exp[(b"fixed", "s")] += 2

    expect_totals(redis, exp)


def test_redis_schema_and_no_raw_key_anywhere(redis, nginx_factory):
    secret = "mk_live_SECRET_do_not_leak_9f3a"
    n = nginx_factory(API, redis=redis.address)
    hour0 = utc_hour()
    c = Client(n.port)
    for _ in range(5):
        assert c.request("GET", "/getCreditScore?s=200",
                         {"X-Api-Key": secret}) == 200
    expect_totals(redis, {(secret, "credit"): 5, (secret, "credit_all"): 5})
    hours = {hour0, utc_hour()}
    kh = key_hash(secret)

    # no governance, so no credit: every counter is in the writer layout
    names = redis.keys()
    for k in names:
        assert (k == "mtr:hours" or re.fullmatch(r"mtr:widx:\d{10}", k)
                or re.fullmatch(r"mtr:wu:\{[0-9a-f]{16}\}:\d+:\d{10}:\d+",
                                k)), k
    zs = redis.zrange_withscores("mtr:hours")
    assert zs and set(zs) <= hours
    for h, score in zs.items():
        assert time.strftime("%Y%m%d%H", time.gmtime(score)) == h
        assert score % 3600 == 0
        writers = redis.smembers("mtr:widx:" + h)
        assert writers
        for w in writers:
            epoch, sid, nparts = w.split(":")
            assert re.fullmatch(r"[0-9a-f]{16}", epoch) and int(sid) >= 1
            assert int(nparts) >= 1
            for part in range(int(nparts)):
                for field in redis.hgetall("mtr:wu:{%s}:%s:%s:%d"
                                           % (epoch, sid, h, part)):
                    assert re.fullmatch(r"%s\|(credit|credit_all)\|\d+"
                                        % kh, field), field

    dump = []
    for k in names:
        kind = redis.cmd("TYPE", k)
        if kind == "hash":
            dump += redis.cmd("HGETALL", k)
        elif kind == "set":
            dump += redis.cmd("SMEMBERS", k)
        elif kind == "zset":
            dump += redis.cmd("ZRANGE", k, 0, -1)
        dump.append(k.encode())
    blob = b"\n".join(dump)
    assert secret.encode() not in blob
    assert secret not in n.error_log
    assert secret.encode() not in n.get("/status")[1]
    assert secret.encode() not in n.get("/metrics")[1]


# ------------------------------------------------------------ status

def test_meter_status_json_and_prometheus(redis, nginx_factory):
    conf = COMMON + r"""
    server {
        listen 127.0.0.1:@PORT@;
        location /api { meter zone=api calls; return 200 "ok\n"; }
        location = /status { meter_status json; }
        location = /metrics { meter_status prometheus; }
        location = /default { meter_status; }
    }
"""
    n = nginx_factory(conf, redis=redis.address)
    t = Traffic(n.port, [("GET", "/api", {"X-Api-Key": k}, (k,))
                         for k in KEYS], threads=3, limit=40).run()
    assert not t.failed
    total = sum(t.ok.values())
    expect_totals(redis, {(k, "calls"): n_ for ((k,), _), n_ in t.ok.items()})

    wait_for(lambda: status_json(n)["api"]["pending"] == 0, 30)
    z = status_json(n)["api"]
    for f in ("keys", "slots", "shm_bytes", "shm_used", "shm_free",
              "pending", "flushed_total", "flushes", "flush_errors",
              "last_flush_ms", "dropped", "value_errors"):
        assert isinstance(z[f], int) and z[f] >= 0, f
    assert z["flushed_total"] == total
    assert z["redis_connected"] is True
    assert z["dropped"] == 0
    assert z["keys"] >= 1 and z["slots"] >= z["keys"]
    assert z["flushes"] >= 1
    assert 0 < z["shm_used"] <= z["shm_bytes"]
    assert status_json(n, "/default")["api"]["flushed_total"] == total
    # counter values: at least one per counter Redis holds, and one more
    # for each counter a single new request makes dirty
    assert z["flushed_counters"] >= len(usage_fields(redis)) > 0
    c = Client(n.port)
    for k in ("mk_status_a", "mk_status_b"):
        assert c.request("GET", "/api", {"X-Api-Key": k}) == 200
    wait_for(lambda: status_json(n)["api"]["pending"] == 0, 30)
    z2 = status_json(n)["api"]
    assert z2["flushed_counters"] == z["flushed_counters"] + 2
    assert z2["flushed_total"] == total + 2
    total += 2

    code, body = n.get("/metrics")
    assert code == 200
    text = body.decode()
    samples = dict(re.findall(
        r'^nginx_meter_(\w+)\{zone="api"\} ([\d.]+)$', text, re.M))
    assert int(samples["flushed_total"]) == total
    assert int(samples["flushed_counters_total"]) == z2["flushed_counters"]
    assert int(samples["pending_units"]) == 0
    assert int(samples["redis_connected"]) == 1
    assert int(samples["dropped_total"]) == 0
    assert int(samples["flushes_total"]) >= 1
    # milliseconds in JSON, seconds with three decimals here
    assert re.fullmatch(r"\d+\.\d{3}", samples["last_flush_seconds"])
    assert len(samples) == len(z) - 1       # every figure but the name
    for name in samples:
        assert re.search(r"^# HELP nginx_meter_%s " % name, text, re.M), name
        m = re.search(r"^# TYPE nginx_meter_%s (gauge|counter)$" % name,
                      text, re.M)
        assert m, name
        # the naming rules promtool checks: counters end in _total
        assert (m.group(1) == "counter") == name.endswith("_total"), name
    # and promtool itself (Debian's prometheus package)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout + lint.stderr == "", lint.stdout + lint.stderr

    # Redis down: the status says so, requests still succeed
    redis.stop("save")
    wait_for(lambda: status_json(n)["api"]["redis_connected"] is False, 10)
    c = Client(n.port)
    for _ in range(10):
        assert c.request("GET", "/api", {"X-Api-Key": KEYS[0]}) == 200
    wait_for(lambda: re.search(r'^nginx_meter_redis_connected\{zone="api"\} 0$',
                               n.get("/metrics")[1].decode(), re.M), 5)
    z = status_json(n)["api"]
    assert z["pending"] == 10               # the 10 calls, no more
    assert z["flushed_total"] == total
    redis.start()
    wait_for(lambda: status_json(n)["api"]["redis_connected"] is True, 15)
    wait_for(lambda: status_json(n)["api"]["pending"] == 0, 15)
    assert status_json(n)["api"]["flushed_total"] == total + 10
    assert usage(redis, KEYS[0], "calls") == t.ok[((KEYS[0],), 200)] + 10


# ------------------------------------------------------------ disruptions

def run_with(n, action, threads=4, before=0.7, after=0.7, pace=0.0):
    """API traffic from `threads` keep-alive clients; action() runs in the
    middle of it: `before` seconds and RUN_WITH answers into the traffic,
    which goes on `after` seconds and RUN_WITH answers more (counted, not
    only timed: a loaded machine answers fewer in the same time)."""
    plan = api_plan(KEYS, methods=("GET", "POST"), statuses=(200, 404))
    t = Traffic(n.port, plan, threads=threads)
    if pace:
        t.pace = pace
    t.start()
    time.sleep(before)
    wait_for(lambda: t.total() >= RUN_WITH, 60)
    action(t)
    k = t.total()
    time.sleep(after)
    wait_for(lambda: t.total() >= k + RUN_WITH, 60)
    t.stop()
    return t


RUN_WITH = 260


def test_reload_during_traffic(redis, nginx_factory):
    n = nginx_factory(API, redis=redis.address)

    def reloads(t):
        n.reload()
        time.sleep(0.3)
        # a changed config (one more location); same zone
        n.reload(API.replace("location /free {",
                             "location /new { return 204; }\n"
                             "        location /free {"))

    t = run_with(n, reloads)
    assert sum(t.ok.values()) >= 2 * RUN_WITH
    expect_totals(redis, expected(t))
    assert len(epochs(redis)) == 1, "zone not kept across reload"


def test_redis_restart_during_traffic(redis, nginx_factory):
    """Redis stops (saving), stays down a while, comes back with its data."""
    n = nginx_factory(API, redis=redis.address)
    during = {}

    def outage(t):
        redis.stop("save")
        wait_for(lambda: status_json(n)["api"]["redis_connected"] is False,
                 10)
        before = t.total()
        time.sleep(1.0)
        # answers go on while Redis is down (a loaded machine: waited for)
        wait_for(lambda: t.total() - before > 50, 30)
        during["n"] = t.total() - before
        redis.start()

    t = run_with(n, outage)
    assert not t.failed, "requests failed while Redis was down"
    assert during["n"] > 50, "no traffic while Redis was down"
    expect_totals(redis, expected(t))
    assert status_json(n)["api"]["redis_connected"] is True


def test_redis_lost_data_is_rewritten(redis, nginx_factory):
    """Redis is SIGKILLed and comes back empty: the cumulative counters
    still in shared memory rewrite every total."""
    n = nginx_factory(API, redis=redis.address)
    hour0 = utc_hour()

    def crash(t):
        wait_for(lambda: totals(redis), 30)
        redis.stop("kill")
        time.sleep(0.5)
        redis.start()

    t = run_with(n, crash)
    assert not t.failed
    if utc_hour() != hour0:
        pytest.skip("crossed an hour boundary: older slots may be evicted")
    expect_totals(redis, expected(t))


def test_redis_lost_data_idle_counters_rewritten(redis, nginx_factory):
    """Every counter flushed, then Redis comes back empty and no request
    follows: the counters that did not move are rewritten too (the module
    sees Redis's new run_id)."""
    n = nginx_factory(API, redis=redis.address)
    hour0 = utc_hour()
    plan = api_plan(KEYS, methods=("GET",), statuses=(200,))
    t = Traffic(n.port, plan, threads=2, limit=len(plan) * 3).run()
    expect_totals(redis, expected(t))
    redis.stop("kill")
    redis.start()
    assert totals(redis) == {}
    if utc_hour() != hour0:
        pytest.skip("crossed an hour boundary: older slots may be evicted")
    expect_totals(redis, expected(t))
    assert "restarted or replaced" in n.log()


def test_sigkill_worker_during_traffic(redis, nginx_factory, backend):
    # the API in its own process: nginx's second server would have the
    # killed worker serve the upstream side of some requests too, and the
    # other worker answer them 502 (seen on a loaded machine)
    conf = API.replace("http://127.0.0.1:@PORT2@/s/",
                       "http://127.0.0.1:%d/code/" % backend.port)
    assert conf.count("/code/") == 3
    n = nginx_factory(conf, redis=redis.address)
    # paced: a kill between a response's last byte and the log phase would
    # be a response the client got but nobody counted; keep that rare
    t = run_with(n, lambda t: n.kill_worker(), threads=3, pace=0.002)
    # only full responses count; an exchange cut by the kill is not billed
    expect_totals(redis, expected(t))


def test_graceful_stop_flushes(redis, nginx_factory):
    conf = API.replace("meter_flush_interval 100ms;",
                       "meter_flush_interval 1h;")
    n = nginx_factory(conf, redis=redis.address)
    plan = api_plan(KEYS, methods=("GET",), statuses=(200,))
    t = Traffic(n.port, plan, threads=2, limit=len(plan)).run()
    n.stop()
    assert n.proc.returncode == 0
    expect_totals(redis, expected(t), timeout=1, settle=0)


# ------------------------------------------------------------ nginx -t

def in_location(directive):
    return r"""
    meter_zone $http_x_api_key zone=api:1m;
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            %s
            return 200;
        }
    }
""" % directive


SERVER = r"""
    server {
        listen 127.0.0.1:@PORT@;
        location / { meter zone=api calls; return 200; }
    }
"""

BAD = [
    # id, http conf, directive, regex for the bad part, line marker, last
    ("unknown_zone", in_location("meter zone=nope calls;"),
     "meter", r"nope", "zone=nope", False),
    ("status_2x", in_location("meter zone=api calls status=2x;"),
     "meter", r"2x", "status=2x", False),
    ("status_700", in_location("meter zone=api calls status=700;"),
     "meter", r"700", "status=700", False),
    ("method_lower", in_location("meter zone=api calls method=get;"),
     "meter", r"\bget\b", "method=get", False),
    ("unknown_param", in_location("meter zone=api calls foo=bar;"),
     "meter", r"foo", "foo=bar", False),
    ("name_chars", in_location('meter zone=api "cal/ls";'),
     "meter", r"cal/ls", "cal/ls", False),
    ("name_long", in_location("meter zone=api %s;" % ("a" * 33)),
     "meter", "a" * 33, "a" * 33, False),
    ("no_name", in_location("meter zone=api;"),
     "meter", None, "meter zone=api;", False),
    ("zone_small", "    meter_zone $http_x_api_key zone=api:1k;\n" + SERVER,
     "meter_zone", r"1k", "zone=api:1k", False),
    ("zone_no_size", "    meter_zone $http_x_api_key zone=api;\n" + SERVER,
     "meter_zone", r"zone=api|\"api\"", "zone=api;", False),
    ("zone_dup", "    meter_zone $http_x_api_key zone=api:1m;\n"
     "    meter_zone $http_x_api_key zone=api:1m;\n" + SERVER,
     "meter_zone", r"api", "meter_zone", True),
    ("flush_interval", "    meter_zone $http_x_api_key zone=api:1m;\n"
     "    meter_flush_interval abc;\n" + SERVER,
     "meter_flush_interval", r"abc", "meter_flush_interval", False),
    ("redis_address", "    meter_zone $http_x_api_key zone=api:1m;\n"
     "    meter_redis localhost:abc;\n" + SERVER,
     "meter_redis", r"localhost:abc", "meter_redis", False),
    ("redis_db", "    meter_zone $http_x_api_key zone=api:1m;\n"
     "    meter_redis 127.0.0.1:6379 db=x;\n" + SERVER,
     "meter_redis", r"db=x|db.*\"x\"", "meter_redis", False),
    ("redis_timeout", "    meter_zone $http_x_api_key zone=api:1m;\n"
     "    meter_redis 127.0.0.1:6379 timeout=abc;\n" + SERVER,
     "meter_redis", r"abc", "meter_redis", False),
    ("redis_param", "    meter_zone $http_x_api_key zone=api:1m;\n"
     "    meter_redis 127.0.0.1:6379 tls=on;\n" + SERVER,
     "meter_redis", r"tls", "meter_redis", False),
    ("status_format", in_location("meter_status xml;"),
     "meter_status", r"xml", "meter_status", False),
]

EMERG = re.compile(r"\[emerg\] (?:\d+#\d+: )?(?P<msg>.*) in (?P<file>\S+):"
                   r"(?P<line>\d+)\s*$", re.M)


@pytest.mark.parametrize("conf,directive,bad,marker,last",
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_directive(conf, directive, bad, marker, last):
    rc, out, text, path = nginx_t(conf)
    assert rc != 0, "nginx -t accepted:\n" + text
    m = EMERG.search(out)
    assert m, "no [emerg] with file:line in:\n" + out
    msg = m.group("msg")
    assert m.group("file") == path, out
    assert int(m.group("line")) == line_of(text, marker, last), out
    assert re.search(r"(?<![\w])%s(?![\w])" % directive, msg), \
        "message does not name %s: %s" % (directive, msg)
    if bad is not None:
        assert re.search(bad, msg), "message does not name %r: %s" % (bad,
                                                                      msg)


def test_good_config_passes_nginx_t():
    conf = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_zone "$arg_api_key$http_x_tenant" zone=other:1m;
    meter_redis unix:/tmp/nonexistent-redis.sock password=secret db=3
                timeout=250ms;
    meter_flush_interval 2s;
    meter zone=api http_calls;

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=other calls status=200,2xx,300-399 method=GET,POST,HEAD;
        meter zone=api bytes value=$bytes_sent if=$http_x_billable;
        location / { return 200; }
        location /a {
            meter zone=api calls_a.v1 status=404;
            meter zone=api calls-a_2 method=PATCH,DELETE,OPTIONS;
            return 200;
        }
        location = /s1 { meter_status; }
        location = /s2 { meter_status json; }
        location = /s3 { meter_status prometheus; }
    }
"""
    rc, out, text, _ = nginx_t(conf)
    assert rc == 0, out + text
    assert "[emerg]" not in out and "[alert]" not in out


@pytest.mark.parametrize("size", ["32k", "64k", "100k", "128k"])
def test_small_zone_never_fails_silently(size):
    """A size meter_zone accepts must work; one it rejects must say so."""
    conf = "    meter_zone $http_x_api_key zone=api:%s;\n" % size + SERVER
    rc, out, text, path = nginx_t(conf)
    if rc != 0:
        m = EMERG.search(out)
        assert m, "nginx -t failed without an [emerg] line:\n" + out
        assert m.group("file") == path
        assert int(m.group("line")) == line_of(text, "meter_zone"), out
        assert size in m.group("msg"), out


# ------------------------------------------------------------ shm survives

def test_unflushed_counts_survive_reload_and_kill_while_redis_down(
        redis, nginx_factory):
    """Redis down: nothing can be flushed, so the counts of a reloaded and
    of a SIGKILLed worker live only in shared memory until Redis returns."""
    n = nginx_factory(API, redis=redis.address)
    redis.stop("save")
    wait_for(lambda: status_json(n)["api"]["redis_connected"] is False, 10)
    plan = api_plan(KEYS, methods=("GET",), statuses=(200,))
    runs = []
    for disrupt in (n.reload, n.kill_worker, lambda: None):
        runs.append(Traffic(n.port, plan, threads=2, limit=len(plan)).run())
        disrupt()
    for t in runs:
        assert not t.failed
    assert status_json(n)["api"]["pending"] > 0
    redis.start()
    exp = Counter()
    for t in runs:
        exp.update(expected(t))
    expect_totals(redis, exp)


def test_zone_full_drops_are_counted(redis, nginx_factory):
    """More keys than slots while Redis is down (nothing can be evicted):
    requests still succeed, and every call is either in Redis or in
    "dropped"."""
    conf = API.replace("zone=api:1m", "zone=api:128k")
    address = redis.address
    redis.stop("save")
    n = nginx_factory(conf, redis=address)      # starts while Redis is down
    z = status_json(n)["api"]
    nkeys = z["slots"] * 2
    c = Client(n.port)
    for i in range(nkeys):
        assert c.request("GET", "/getCreditScore?s=200",
                         {"X-Api-Key": "mk_full_%06d" % i}) == 200
    c.close()
    z = status_json(n)["api"]
    assert z["dropped"] > 0
    assert z["keys"] <= z["slots"]
    redis.start()
    wait_for(lambda: status_json(n)["api"]["pending"] == 0, 20)
    z = status_json(n)["api"]
    got = totals(redis)
    for meter in ("credit", "credit_all"):
        counted = sum(v for (_, m), v in got.items() if m == meter)
        assert counted > 0
    counted = sum(got.values())
    # two meters per call: calls in Redis + calls dropped = 2 x sent
    assert counted + z["dropped"] == 2 * nkeys, (counted, z)
    assert "mk_full_" not in n.error_log


def test_redis_unix_socket_password_and_db(redis, nginx_factory):
    redis.cmd("CONFIG", "SET", "requirepass", "s3cret pass")
    conf = API.replace("meter_redis @REDIS@;",
                       'meter_redis unix:@SOCK@ "password=s3cret pass" db=5'
                       ' timeout=2s;')
    n = nginx_factory(conf, sock=redis.socket)
    plan = api_plan(KEYS, methods=("GET",), statuses=(200, 404))
    t = Traffic(n.port, plan, threads=2, limit=len(plan)).run()
    redis.use(db=5, password="s3cret pass")
    expect_totals(redis, expected(t))
    redis.use(db=0, password="s3cret pass")
    assert redis.keys() == []
    assert "s3cret" not in n.error_log


# ------------------------------------------------------------ hour rollover

FAKETIME_SO = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
ROLL_LEAD = 25          # fake seconds from nginx start to the next hour
ROLL_LIMIT = 10         # a new key must be counted this soon after it


def hour_usage(redis):
    """{(key_hash, hour): calls} from the credit_all fields."""
    out = Counter()
    for (kh, h, field), v in usage_fields(redis).items():
        if field.split("|", 1)[0] == "credit_all":
            out[(kh, h)] += v
    return out


def test_full_zone_takes_new_keys_right_after_the_hour(redis, nginx_factory,
                                                       monkeypatch):
    """Issue 9: a zone full of hour H's counters, every one of them in
    Redis, must count new keys of hour H+1 within seconds of the rollover
    (it dropped them for 80-120 s: eviction only by the 60 s full scan,
    reuse only after a 60 s grace).  nginx runs on libfaketime's clock,
    started ROLL_LEAD seconds before an hour; Redis on the real one."""
    assert os.path.exists(FAKETIME_SO), "libfaketime missing: make deps"
    real0 = time.time()
    fake0 = (int(real0) // 3600 + 1000) * 3600 - ROLL_LEAD
    rollover = fake0 + ROLL_LEAD
    monkeypatch.setenv("LD_PRELOAD", FAKETIME_SO)
    monkeypatch.setenv("FAKETIME", time.strftime("@%Y-%m-%d %H:%M:%S",
                                                 time.gmtime(fake0)))
    monkeypatch.setenv("FAKETIME_DONT_RESET", "1")
    monkeypatch.setenv("TZ", "UTC")
    env = "".join("env %s;\n" % v for v in ("LD_PRELOAD", "FAKETIME",
                                            "FAKETIME_DONT_RESET", "TZ"))
    conf = API.replace("zone=api:1m", "zone=api:64k").replace(
        "location = /status {",
        "location = /msec { return 200 $msec; }\n        location = /status {")
    n = nginx_factory(conf, redis=redis.address, main_conf=env)
    monkeypatch.delenv("LD_PRELOAD")
    # nginx's clock, not ours: it started a little after real0
    code, body = n.get("/msec")
    assert code == 200, body
    offset = float(body) - time.time()
    assert abs(offset - (fake0 - real0)) < 5, (offset, fake0 - real0)

    def fake_now():
        return time.time() + offset

    c = Client(n.port)
    sent = Counter()                # (key, fake hour) -> calls answered

    def call(key):
        hour = utc_hour(fake_now())
        assert c.request("GET", "/getCreditScore?s=200",
                         {"X-Api-Key": key}) == 200
        sent[(key, hour)] += 1
        # nginx logs (meters) a request before it reads the next one from
        # the same connection: after this one, status shows the call
        assert c.request("GET", "/free?s=200") == 200

    # fill the zone with hour H's counters (two per call) until a batch of
    # new keys is dropped whole: then no key of H+1 finds a slot either
    i = 0
    while True:
        before = status_json(n)["api"]["dropped"]
        for _ in range(20):
            call("mk_roll_old_%05d" % i)
            i += 1
        if status_json(n)["api"]["dropped"] == before + 40:
            break
        assert fake_now() < rollover - 5, "zone not full before the hour"
    wait_for(lambda: status_json(n)["api"]["pending"] == 0, 10)
    full = status_json(n)["api"]
    assert full["keys"] == full["slots"], full
    assert fake_now() < rollover - 1, "flush too slow for this test"
    time.sleep(rollover + 0.2 - fake_now())

    # hour H+1: one new key every 100 ms until one is counted
    j = 0
    took = None
    while fake_now() < rollover + 3 * ROLL_LIMIT:
        before = status_json(n)["api"]["dropped"]
        call("mk_roll_new_%05d" % j)
        j += 1
        if status_json(n)["api"]["dropped"] == before:
            took = fake_now() - rollover
            break
        time.sleep(0.1)
    c.close()
    print("new keys dropped for %.1f s after the hour (%d calls), %r"
          % (took if took is not None else -1, j, status_json(n)["api"]))
    assert took is not None and took < ROLL_LIMIT, \
        "new keys still dropped %.0f s after the hour" % (fake_now() - rollover)

    # nothing lost: every call is in Redis under its own hour, or dropped
    wait_for(lambda: status_json(n)["api"]["pending"] == 0, 10)
    z = status_json(n)["api"]
    got = hour_usage(redis)
    want = Counter()
    for (key, hour), calls in sent.items():
        want[(key_hash(key), hour)] += calls
    assert set(got) <= set(want)
    assert all(got[k] <= want[k] for k in got)
    assert 2 * sum(want.values()) == sum(totals(redis).values()) + z["dropped"]
    # and the last key, counted, is under the new hour
    assert got[(key_hash("mk_roll_new_%05d" % (j - 1)),
                utc_hour(rollover + 1))] == 1
