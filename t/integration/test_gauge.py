"""Gauges (issue 15 part 2): `meter zone=Z NAME max=$var;` keeps the largest
value per key and hour, e.g. a figure the upstream reports in a header.
Real nginx proxying to a backend (nginx itself, second port), real Redis,
the worker's file provider: the period's largest value is billed, a later
larger value as the increase, never a sum of readings or of counters."""

import json
import time

import pytest

from conftest import key_hash, line_of, nginx_t, usage_fields, wait_for
from test_flush_layout import EPOCH2, put_writer
from test_figures import fig_line, month_start
from test_worker import NOW_HOUR, Worker, hour_name, line

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;

    # the "API": reports the caller's storage in a response header
    server {
        listen 127.0.0.1:@PORT2@;
        location /s/ {
            add_header X-Storage-Gb $arg_gb;
            return 200 "ok\n";
        }
    }

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls;

        location /files {
            meter zone=api calls;
            meter zone=api storage_gb max=$upstream_http_x_storage_gb;
            proxy_pass http://127.0.0.1:@PORT2@/s/?gb=$arg_gb;
        }

        location = /status {
            meter off;
            meter_status json;
        }
    }
"""


def flushed(n):
    z = json.loads(n.get("/status")[1])["zones"][0]
    return z["pending"] == 0


def gauge_fields(redis):
    return {k: v for k, v in usage_fields(redis).items()
            if k[2].startswith("storage_gb:max|")}


def test_gauge_max_through_proxy_billed_once(nginx_factory, redis, tmp_path):
    n = nginx_factory(CONF, workers=2, redis=redis.address)
    key = "mk_live_gauge01"
    readings = [3, 17, 5, "", "abc", "-4", "1.5", "99999999999999999999999",
                12, 17, 9]
    for gb in readings:
        st, _ = n.get("/files?gb=%s" % gb, headers={"X-Api-Key": key})
        assert st == 200
    # another key, one reading
    assert n.get("/files?gb=40", headers={"X-Api-Key": "mk_live_gauge02"}
                 )[0] == 200
    wait_for(lambda: flushed(n) and len(gauge_fields(redis)) >= 2, 10)

    kh = key_hash(key)
    h = hour_name(int(time.time()) // 3600 * 3600)
    g = gauge_fields(redis)
    mine = [v for (k, hh, f), v in g.items() if k == kh and hh == h]
    # two nginx workers may hold a slot each: the largest is 17 either way
    assert mine and max(mine) == 17, g
    calls = {f: v for (k, hh, f), v in usage_fields(redis).items()
             if k == kh and f.startswith("calls|")}
    assert sum(calls.values()) == len(readings)

    # bad values: a clear line each, nothing else lost
    log = n.log()
    for bad in ('"abc"', '"-4"', '"1.5"', '"9999999999999999999999'):
        assert 'meter "storage_gb": gauge value %s' % bad in log, bad
    assert "is not an integer from 0 to 9223372036854775807" in log
    st = json.loads(n.get("/status")[1])
    # no header (empty) is no reading: neither an error nor logged
    assert st["zones"][0]["value_errors"] == 4
    assert 'gauge value ""' not in log

    w = Worker(tmp_path / "w", redis, grace="5m")
    start = int(time.time()) // 3600 * 3600
    assert w.once(start + 3600 + 600).returncode == 0
    got = {(d["key_hash"], d["meter"]): d["quantity"] for d in w.lines()}
    assert got[(kh, "storage_gb")] == 17
    assert got[(key_hash("mk_live_gauge02"), "storage_gb")] == 40
    assert got[(kh, "calls")] == len(readings)
    assert len(got) == 4

    # a rerun bills nothing again
    assert w.once(start + 3600 + 600).returncode == 0
    assert len(w.lines()) == 4


def test_gauge_counters_across_nodes_take_the_largest(redis, tmp_path):
    """Two nodes and two sessions hold the key's gauge: the largest value
    is billed, not the sum; a late larger value is billed as the increase,
    a late smaller one adds nothing and still gets its mark (retention)."""
    w = Worker(tmp_path, redis, retention="1d", grace="5m")
    h = NOW_HOUR - 3 * 86400
    kh = key_hash("key-g")
    put_writer(redis, EPOCH2, 1, h, {("key-g", "disk:max", 1): 30,
                                     ("key-g", "calls", 2): 4})
    put_writer(redis, EPOCH2, 2, h, {("key-g", "disk:max", 1): 50})
    put_writer(redis, "00112233aabbccdd", 1, h,
               {("key-g", "disk:max", 9): 45})
    assert w.once(h + 3600 - 1).returncode == 0
    assert w.lines() == []

    # meterctl shows the figure (per key and per customer), not a sum
    from test_meterctl import ok, okj
    hn = hour_name(h)
    keys = json.loads(ok(redis, "usage", "--hour", "%s-%s-%sT%s" % (
        hn[:4], hn[4:6], hn[6:8], hn[8:]), "--json"))
    rows = {r["meter"]: r["value"] for r in keys}
    assert rows == {"disk:max": 50, "calls": 4}, keys
    ok(redis, "customers", "add", "cust-g", "--email", "g@example.com")
    ok(redis, "keys", "add", "key-g", "--customer", "cust-g")
    cr = {r["meter"]: r for r in okj(redis, "usage", "cust-g")}
    # per customer under the name billed (as reconcile compares it)
    assert (cr["disk"]["quantity"], cr["disk"]["billed"]) == (50, 0)
    assert cr["calls"]["quantity"] == 4
    # drained before retention applies (the hour is 3 days old, retention
    # 1d: every counter billed is then deleted)
    assert w.once(h + 3600).returncode == 0
    got = sorted(w.lines(), key=lambda d: d["meter"])
    # the gauge as the month's figure (test_figures.py)
    assert got == [line(kh, "cust-g", "calls", h, 4),
                   fig_line(kh, "cust-g", "disk", "max", h, 50)]
    assert redis.keys("mtr:wu:*") == [] and redis.keys("mtr:b:*") == []
    assert redis.zrange_withscores("mtr:hours") == {}


def test_gauge_late_values(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    h = NOW_HOUR - 5 * 3600
    from test_meterctl import ok, okj
    kh = key_hash("key-l")
    ok(redis, "customers", "add", "cust-l", "--email", "l@example.com")
    ok(redis, "keys", "add", "key-l", "--customer", "cust-l")
    put_writer(redis, EPOCH2, 1, h, {("key-l", "disk:max", 1): 20})
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [fig_line(kh, "cust-l", "disk", "max", h, 20)]

    def shown():
        return {(r["meter"], r["quantity"], r["billed"])
                for r in okj(redis, "usage", "cust-l")}
    assert shown() == {("disk", 20, 20)}

    # a late, smaller value of another counter: nothing billed, marked
    put_writer(redis, EPOCH2, 2, h, {("key-l", "disk:max", 2): 8})
    assert w.once(h + 3600).returncode == 0
    assert len(w.lines()) == 1
    assert redis.hgetall("mtr:b:{%s}:%s" % (kh, hour_name(h))) == {
        "disk:max|%s.1" % EPOCH2: "20", "disk:max|%s.2" % EPOCH2: "8"}

    # a late larger one: the increase, as seq 2
    put_writer(redis, EPOCH2, 3, h, {("key-l", "disk:max", 2): 26})
    assert shown() == {("disk", 26, 20)}
    assert w.once(h + 3600).returncode == 0
    assert shown() == {("disk", 26, 26)}
    assert w.lines()[1:] == [fig_line(kh, "cust-l", "disk", "max", h, 6,
                                      seq=2)]
    assert w.once(h + 3600).returncode == 0
    assert len(w.lines()) == 2


@pytest.mark.parametrize("conf, err", [
    ("meter zone=api g max=$arg_g value=$arg_v;",
     'only one of "value=", "max=", "last=" and "unique=" is allowed'),
    ("meter zone=api g value=$arg_v max=$arg_g;",
     'only one of "value=", "max=", "last=" and "unique=" is allowed'),
    ("meter zone=api g max=;", "a variable is expected"),
    ("meter zone=api g max=5;", "a variable is expected"),
    ("meter zone=api abcdefghijklmnopqrstuvwxyz0123 max=$arg_g;",
     "is too long: at most 28 characters"),
])
def test_gauge_directive_errors(conf, err):
    rc, out, text, path = nginx_t(CONF.replace("meter zone=api calls;", conf),
                                  redis="127.0.0.1:1")
    assert rc != 0, text
    assert err in out and "[emerg]" in out, out
    assert "%s:%d" % (path, line_of(text, conf)) in out, out


@pytest.mark.parametrize("where", ["http", "server", "location"])
def test_gauge_directive_contexts(where):
    g = "meter zone=api g max=$arg_g;"
    text = CONF
    if where == "http":
        text = text.replace("meter_flush_interval 100ms;",
                            "meter_flush_interval 100ms;\n    " + g)
    elif where == "server":
        text = text.replace("meter zone=api calls;",
                            "meter zone=api calls;\n        " + g)
    else:
        text = text.replace("location = /status {",
                            "location /g { %s return 200; }\n"
                            "        location = /status {" % g)
    rc, out, _, _ = nginx_t(text, redis="127.0.0.1:1")
    assert rc == 0, out


def test_sigkill_mid_drain_stripe_gauge_billed_once(redis, tmp_path):
    """The gauge's records go through the same claim/send/confirm state
    machine: a worker SIGKILLed twice mid-drain, then a full pass, sends
    each customer's largest value once; a later larger value is sent as
    the new month-to-date figure (the Stripe meter's formula is last)."""
    from test_worker import (idem, lock_expired, sigkill_twice_mid_drain,
                             stripe_customer, stripe_worker)
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_g1", delay=0.02).start()
    try:
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_g1",
                          meter__disk="storage_gb")
        h = NOW_HOUR - 2 * 3600
        want = {}
        for i in range(60):
            stripe_customer(redis, "g%03d" % i, "cus_g%03d" % i, "gk-%d" % i)
            # two nodes; the largest, i + 10, is on the second
            put_writer(redis, EPOCH2, 1, h, {("gk-%d" % i, "disk:max", 1):
                                             i + 3})
            put_writer(redis, "00112233aabbccdd", 1, h,
                       {("gk-%d" % i, "disk:max", 2): i + 10})
            want["cus_g%03d" % i] = i + 10

        sigkill_twice_mid_drain(redis, w, h + 3600,
                                lambda: len(stripe.events))
        assert 0 < len(stripe.events) < 60, "the kills did not land mid-drain"

        lock_expired(redis)
        assert w.once(h + 3600).returncode == 0
        for cus, total in want.items():
            assert stripe.last(cus, "storage_gb") == total, cus
        idents = [e["identifier"] for e in stripe.events]
        assert len(idents) == len(set(idents)) == 60
        ms = month_start(h)
        assert sorted(idents) == sorted(idem(ms, "g%03d" % i, "disk:max")
                                        for i in range(60))

        # late: customer 0's first node reports 25 (> 10): 25 as seq 2;
        # customer 1's reports 5 (< 11): nothing
        put_writer(redis, EPOCH2, 2, h, {("gk-0", "disk:max", 1): 25,
                                         ("gk-1", "disk:max", 1): 5})
        assert w.once(h + 3600).returncode == 0
        assert stripe.last("cus_g000", "storage_gb") == 25
        assert stripe.last("cus_g001", "storage_gb") == 11
        assert len(stripe.events) == 61
        assert stripe.events[-1]["identifier"] == idem(ms, "g000",
                                                       "disk:max", 2)
        assert w.once(h + 3600).returncode == 0
        assert len(stripe.events) == 61
    finally:
        stripe.stop()
