"""Last-value gauges (issue 15): `meter zone=Z NAME last=$var;` keeps the
latest reading of the hour.  The counter's absolute value is
(ms into the UTC hour) << 40 | reading (docs/redis-schema.md "Gauges"), so
the module's max-only update keeps the latest.  Real nginx proxying to a
backend that sends the reading in a response header, real Redis."""

import time

import pytest

from conftest import key_hash, line_of, nginx_t, usage_fields, wait_for
from test_gauge import CONF as MAX_CONF, flushed
from test_meterctl import okj

MASK = (1 << 40) - 1

CONF = MAX_CONF.replace(
    "meter zone=api storage_gb max=$upstream_http_x_storage_gb;",
    "meter zone=api storage_gb last=$upstream_http_x_storage_gb;")


def last_fields(redis, kh):
    """{hour: [encoded counters]} of the key's storage_gb:last"""
    out = {}
    for (k, h, f), v in usage_fields(redis).items():
        if k == kh and f.startswith("storage_gb:last|"):
            out.setdefault(h, []).append(v)
    return out


def ms_into_hour(t):
    return int(t * 1000) % 3600000


def test_gauge_last_keeps_the_later_reading(nginx_factory, redis):
    n = nginx_factory(CONF, workers=2, redis=redis.address)
    key = "mk_live_last01"
    kh = key_hash(key)
    # 17 then 5: the later (smaller) one is the hour's figure; bad
    # readings after it are ignored as max= ignores them
    assert n.get("/files?gb=17", headers={"X-Api-Key": key})[0] == 200
    time.sleep(0.01)
    before = time.time()
    assert n.get("/files?gb=5", headers={"X-Api-Key": key})[0] == 200
    after = time.time()
    for bad in ["", "abc", "-4", "1.5", "0x10"]:
        assert n.get("/files?gb=%s" % bad,
                     headers={"X-Api-Key": key})[0] == 200
    wait_for(lambda: flushed(n) and last_fields(redis, kh), 10)

    hour = time.strftime("%Y%m%d%H", time.gmtime(before))
    g = last_fields(redis, kh)
    v = max(g[hour])
    assert v & MASK == 5, g
    # the time part is the request's start, in ms into its hour
    if int(before) // 3600 == int(after) // 3600:
        assert ms_into_hour(before) - 1 <= v >> 40 <= ms_into_hour(after) + 1
    # meterctl decodes it: the key's hour shows the reading, 5
    rows = okj(redis, "usage", "--hour", time.strftime(
        "%Y-%m-%dT%H", time.gmtime(before)))
    assert [r["value"] for r in rows if r["key_hash"] == kh
            and r["meter"] == "storage_gb:last"] == [5]
    # every request was a call, bad readings included
    calls = {f: c for (k, h, f), c in usage_fields(redis).items()
             if k == kh and f.startswith("calls|")}
    assert sum(calls.values()) == 7


def test_gauge_last_clamps_large_readings(nginx_factory, redis):
    n = nginx_factory(CONF, workers=1, redis=redis.address)
    cases = {"mk_live_last02": ("1099511627776", MASK),        # 2^40
             "mk_live_last03": ("99999999999999999999999", MASK),
             "mk_live_last04": ("1099511627775", MASK),
             "mk_live_last05": ("0", 0)}
    for key, (gb, _) in cases.items():
        assert n.get("/files?gb=" + gb, headers={"X-Api-Key": key})[0] == 200
    wait_for(lambda: flushed(n) and all(last_fields(redis, key_hash(k))
                                        for k in cases), 10)
    for key, (_, want) in cases.items():
        g = last_fields(redis, key_hash(key))
        vals = [v for vs in g.values() for v in vs]
        assert len(vals) == 1 and vals[0] & MASK == want, (key, g)
        assert vals[0] >> 40 < 3600000


def test_gauge_last_off_counts_nothing(nginx_factory, redis):
    conf = CONF.replace("""        location = /status {""", """        location /off {
            meter off;
            proxy_pass http://127.0.0.1:@PORT2@/s/?gb=$arg_gb;
        }

        location = /status {""")
    n = nginx_factory(conf, workers=1, redis=redis.address)
    key = "mk_live_last06"
    assert n.get("/off?gb=8", headers={"X-Api-Key": key})[0] == 200
    assert n.get("/files?gb=3", headers={"X-Api-Key": key})[0] == 200
    wait_for(lambda: flushed(n) and last_fields(redis, key_hash(key)), 10)
    g = last_fields(redis, key_hash(key))
    assert [v & MASK for vs in g.values() for v in vs] == [3]


@pytest.mark.parametrize("conf, err", [
    ("meter zone=api g last=$arg_g max=$arg_m;",
     'only one of "value=", "max=", "last=" and "unique=" is allowed'),
    ("meter zone=api g value=$arg_v last=$arg_g;",
     'only one of "value=", "max=", "last=" and "unique=" is allowed'),
    ("meter zone=api g last=;", "a variable is expected"),
    ("meter zone=api g last=5;", "a variable is expected"),
    ("meter zone=api abcdefghijklmnopqrstuvwxyz01 last=$arg_g;",
     'is too long: at most 27 characters with "last="'),
])
def test_gauge_last_directive_errors(conf, err):
    rc, out, text, path = nginx_t(CONF.replace("meter zone=api calls;", conf),
                                  redis="127.0.0.1:1")
    assert rc != 0, text
    assert err in out and "[emerg]" in out, out
    assert "%s:%d" % (path, line_of(text, conf)) in out, out


@pytest.mark.parametrize("where", ["http", "server", "location"])
def test_gauge_last_directive_contexts(where):
    # 27 characters: the longest name last= allows
    g = "meter zone=api abcdefghijklmnopqrstuvwxyz0 last=$arg_g;"
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
