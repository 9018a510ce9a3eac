"""The readers of figure meters (issue 15): meterctl usage (per customer,
--period day and month, and per key), meterctl reconcile and the portal's
GET /usage decode last= gauges ((ms into the hour) << 40 | reading), take
max= gauges as their largest and unique meters (mtr:uqidx:YYYYMM,
mtr:uq:/mtr:uh:) as the distinct count per key and per customer (the union
over its keys: SCARD's exact union under 1000 members, else
max(1000, PFCOUNT) of the merged HyperLogLogs), seeded in Redis as the
module writes them; exact numbers."""

import calendar
import json
import subprocess
import time

from conftest import ROOT, key_hash
from test_flush_layout import EPOCH2, put_writer
from test_meterctl import METERCTL, ok, okj

M = (1 << 40) - 1
# the figure biller of issue 15 (another branch): present, it removes the
# months it knows itself
BILLER = ROOT / "worker" / "daemon" / "figures.c"
OCT = calendar.timegm((2026, 10, 1, 0, 0, 0))
H1 = calendar.timegm((2026, 10, 5, 10, 0, 0))
H2 = calendar.timegm((2026, 10, 6, 3, 0, 0))


def enc(ms, v):
    return ms << 40 | v


def hour_name(t):
    return time.strftime("%Y%m%d%H", time.gmtime(t))


def put(redis, key, t, fields):
    kh = key_hash(key)
    h = hour_name(t)
    redis.cmd("SADD", "mtr:idx:%s" % h, kh)
    redis.cmd("ZADD", "mtr:hours", "NX", str(t), h)
    args = []
    for f, v in fields.items():
        args += [f, str(v)]
    redis.cmd("HSET", "mtr:u:{%s}:%s" % (kh, h), *args)


def unique(redis, key, name, uperiod, members, hll=None):
    """The module's unique= writes: the index first, then set and HLL."""
    kh = key_hash(key)
    redis.cmd("SADD", "mtr:uqidx:%s" % uperiod[:6],
              "%s|%s|%s" % (kh, name, uperiod))
    if members:
        redis.cmd("SADD", "mtr:uq:{%s}:%s:%s" % (kh, name, uperiod),
                  *members[:1000])
    redis.cmd("PFADD", "mtr:uh:{%s}:%s:%s" % (kh, name, uperiod),
              *(hll if hll is not None else members))


def customer(redis, cid, *keys):
    redis.cmd("HSET", "mtr:cust:{%s}" % cid, "provider", "file", "status",
              "active", "created", "1")
    redis.cmd("SADD", "mtr:customers", cid)
    for k in keys:
        kh = key_hash(k)
        redis.cmd("HSET", "mtr:key:{%s}" % kh, "customer", cid, "prefix",
                  k[:12], "created", "1")
        redis.cmd("SADD", "mtr:ckeys:{%s}" % cid, kh)


def members(prefix, n):
    return ["%s%013x" % (prefix, i) for i in range(n)]


def seed(redis, month=OCT, h1=H1, h2=H2, keys=("key_a", "key_b"),
         cust="acme"):
    """Two keys of acme (keys, of cust when given), one of globex; returns
    the PFCOUNT the union of acme's "big" HyperLogLogs must show."""
    ym = time.strftime("%Y%m", time.gmtime(month))
    d1 = time.strftime("%Y%m%d", time.gmtime(h1))
    d2 = time.strftime("%Y%m%d", time.gmtime(h2))
    if cust is not None:
        customer(redis, cust, *keys)
    customer(redis, "globex", "key_c")
    # hour 1: key_a's disk has two counters, the later (ms 2000) reads 30;
    # key_b's reads 70 at ms 1500: the customer's hour is 30
    put(redis, keys[0], h1, {"calls|%s.1" % ("a" * 16): 3,
                             "cpu:max|%s.2" % ("a" * 16): 5,
                             "disk:last|%s.3" % ("a" * 16): enc(1000, 50),
                             "disk:last|%s.4" % ("a" * 16): enc(2000, 30)})
    put(redis, keys[1], h1, {"calls|%s.1" % ("b" * 16): 4,
                             "cpu:max|%s.2" % ("b" * 16): 9})
    # key_b's disk in the writer layout (a new node)
    put_writer(redis, EPOCH2, 1, h1, {(keys[1], "disk:last", 9):
                                      enc(1500, 70)})
    # hour 2: the month's latest reading, 12 (smaller than before)
    put(redis, keys[0], h2, {"calls|%s.1" % ("a" * 16): 10,
                             "cpu:max|%s.2" % ("a" * 16): 7})
    put(redis, keys[1], h2, {"disk:last|%s.5" % ("b" * 16): enc(10, 12)})
    put(redis, "key_c", h2, {"disk:last|%s.6" % ("c" * 16): enc(9, 99),
                             "calls|%s.7" % ("c" * 16): 1000})
    # unique, period=month: u3 on both keys counts once -> 4
    unique(redis, keys[0], "users", ym, members("a", 3))
    unique(redis, keys[1], "users", ym, members("a", 3)[2:] + ["b" * 16])
    unique(redis, "key_c", "users", ym, members("c", 50))
    # period=day: 3 users on day 1 (x2 on both keys), 1 on day 2
    unique(redis, keys[0], "visitors", d1, members("d", 2))
    unique(redis, keys[0], "visitors", d2, members("d", 1))
    unique(redis, keys[1], "visitors", d1, members("d", 3)[1:])
    # over the limit: key_a's set is full (1000), its HLL has 1500; key_b
    # 20, 10 of them key_a's too
    big_a = members("e", 1500)
    unique(redis, keys[0], "big", ym, big_a[:1000], hll=big_a)
    unique(redis, keys[1], "big", ym, big_a[:10] + members("f", 10))
    kha, khb = key_hash(keys[0]), key_hash(keys[1])
    return int(redis.cmd("PFCOUNT", "mtr:uh:{%s}:big:%s" % (kha, ym),
                         "mtr:uh:{%s}:big:%s" % (khb, ym)))


def by_meter(rows):
    return {(r["period_start"][:10], r["meter"]): (r["quantity"], r["billed"])
            for r in rows}


def test_usage_month_figures_per_customer(redis):
    big = seed(redis)
    assert 1500 < big < 1560       # 1510 distinct, 0.81 % standard error
    redis.cmd("HSET", "mtr:{worker}:fig:202610", "acme|disk:last",
              "12 2026100603", "acme|users:unique", "3")

    rows = okj(redis, "usage", "acme", "--period", "month")
    assert by_meter(rows) == {
        ("2026-10-01", "calls"): (17, 0),
        ("2026-10-01", "cpu"): (9, 0),
        ("2026-10-01", "disk"): (12, 12),
        ("2026-10-01", "users"): (4, 3),
        ("2026-10-01", "visitors"): (4, 0),
        ("2026-10-01", "big"): (big, 0)}
    assert {r["period_end"] for r in rows} == {"2026-11-01T00:00:00Z"}
    st = {r["meter"]: r["state"] for r in rows}
    assert st["disk"] == "billed" and st["users"] == "partly billed"

    days = okj(redis, "usage", "acme", "--period", "day", "--from",
               "2026-10-01", "--to", "2026-11-01")
    assert {k: q for k, (q, _) in by_meter(days).items()} == {
        ("2026-10-01", "users"): 4, ("2026-10-01", "big"): big,
        ("2026-10-05", "calls"): 7, ("2026-10-05", "cpu"): 9,
        ("2026-10-05", "disk"): 30, ("2026-10-05", "visitors"): 3,
        ("2026-10-06", "calls"): 10, ("2026-10-06", "cpu"): 7,
        ("2026-10-06", "disk"): 12, ("2026-10-06", "visitors"): 1}

    # globex: its own key only
    g = by_meter(okj(redis, "usage", "globex", "--period", "month"))
    assert g == {("2026-10-01", "calls"): (1000, 0),
                 ("2026-10-01", "disk"): (99, 0),
                 ("2026-10-01", "users"): (50, 0)}

    table = ok(redis, "usage", "acme", "--period", "month")
    assert table.splitlines()[0].startswith("MONTH ")


def test_usage_per_key_decodes_last_and_counts_unique(redis):
    seed(redis)
    rows = okj(redis, "usage")
    kha, khb = key_hash("key_a"), key_hash("key_b")
    got = {(r["key_hash"], r["hour"], r["meter"]): r["value"] for r in rows}
    assert got[(kha, "2026-10-05T10", "disk:last")] == 30
    assert got[(khb, "2026-10-05T10", "disk:last")] == 70
    assert got[(khb, "2026-10-06T03", "disk:last")] == 12
    assert got[(kha, "2026-10-05T10", "cpu:max")] == 5
    assert got[(kha, "2026-10-01T00", "users:unique")] == 3
    assert got[(khb, "2026-10-01T00", "users:unique")] == 2
    assert got[(kha, "2026-10-05T00", "visitors:unique")] == 2
    assert got[(kha, "2026-10-01T00", "big:unique")] == max(
        1000, int(redis.cmd("PFCOUNT", "mtr:uh:{%s}:big:202610" % kha)))
    uq = {(r["key_hash"], r["meter"], r["unique_period"]) for r in rows
          if "unique_period" in r}
    assert len(uq) == 8 and (kha, "visitors:unique", "20261006") in uq
    # --hour: only the unique periods holding that hour
    one = okj(redis, "usage", "--hour", "2026-10-06T03")
    assert {(r["key_hash"], r["meter"]) for r in one
            if "unique_period" in r} == {
        (kha, "users:unique"), (khb, "users:unique"),
        (key_hash("key_c"), "users:unique"), (kha, "big:unique"),
        (khb, "big:unique"), (kha, "visitors:unique")}


def test_reconcile_counts_a_figure_as_the_months(redis):
    seed(redis)
    redis.cmd("HSET", "mtr:{worker}:fig:202610", "acme|disk:last", "12",
              "acme|cpu:max", "9", "acme|users:unique", "3")
    r = subprocess.run([str(METERCTL), "--redis", redis.address,
                        "reconcile", "--customer", "acme", "--period",
                        "2026-10", "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode in (0, 1), r.stderr
    rows = {o["meter"]: o for o in json.loads(r.stdout)}
    assert {m: (o["counted"], o["billed"]) for m, o in rows.items()} == {
        "calls": (17, 0), "cpu": (9, 9), "disk": (12, 12), "users": (4, 3),
        "visitors": (4, 0), "big": (rows["big"]["counted"], 0)}
    assert rows["disk"]["result"] == "equal"
    assert rows["cpu"]["result"] == "equal"
    # the month has closed: the figure's unbilled part is late, not pending
    assert [(d["kind"], d["quantity"]) for d in rows["users"]["differences"]
            ] == [("late_usage", 1)]


# ---------------------------------------------------------------- portal

def test_portal_usage_shows_the_months_figures(tmp_path, redis,
                                               nginx_factory, backend):
    from test_portal import PortalWorker, get_usage, month_start, portal_conf
    from test_portal import signup
    w = PortalWorker(tmp_path / "w", redis)
    w.start()
    try:
        n = nginx_factory(portal_conf(w.port, backend.port),
                          redis=redis.address)
        r = json.loads(signup(n, "fig@example.com")[2])
        key, cid = r["api_key"], r["customer"]
        w.ctl("keys", "add", "mk_test_second_fig", "--customer", cid)
        start = month_start(int(time.time()))
        ym = time.strftime("%Y%m", time.gmtime(start))
        big = seed(redis, start, start, start + 86400 + 3 * 3600,
                   keys=(key, "mk_test_second_fig"), cust=None)
        redis.cmd("HSET", "mtr:{worker}:fig:" + ym, cid + "|disk:last", "12",
                  cid + "|users:unique", "3")
        u = get_usage(n, key)
        got = {m["meter"]: (m["figure"], m["metered"]) for m in u["meters"]}
        assert got == {"calls": ("sum", 17), "cpu": ("max", 9),
                       "disk": ("last", 12), "users": ("unique", 4),
                       "visitors": ("unique", 4), "big": ("unique", big)}
        billed = {m["meter"]: (m["billed"], m["pending"])
                  for m in u["meters"] if m["figure"] in ("last", "unique")}
        assert billed["disk"] == (12, 0) and billed["users"] == (3, 1)
        days = {(d["day"][8:], d["meter"]): d["metered"] for d in u["days"]}
        assert days[("01", "disk")] == 30 and days[("02", "disk")] == 12
        assert days[("01", "visitors")] == 3 and days[("02", "visitors")] == 1
        assert days[("01", "cpu")] == 9 and days[("01", "users")] == 4
    finally:
        w.stop()


# ---------------------------------------------------------------- retention

def month_back(n):
    g = time.gmtime()
    y, m = g.tm_year, g.tm_mon - n
    while m < 1:
        y, m = y - 1, m + 12
    return calendar.timegm((y, m, 1, 0, 0, 0))


def test_worker_removes_unique_months_past_retention_once_billed(redis,
                                                                 tmp_path):
    from test_worker import Worker
    w = Worker(tmp_path, redis, retention="1d", grace="5m")
    ms = {n: time.strftime("%Y%m", time.gmtime(month_back(n)))
          for n in (0, 3, 4, 5)}
    for n, ym in ms.items():
        unique(redis, "key_a", "users", ym, members("a", 3))
        unique(redis, "key_b", "users", ym + "02", members("b", 2))
        # a full set's month: the HyperLogLog goes as well
        unique(redis, "key_a", "big", ym, members("c", 1000),
               hll=members("c", 1200))
    # the figure biller knows month -4 but has not closed it; -5 it closed;
    # -6 it closed with records still to make (dirty)
    ms[6] = time.strftime("%Y%m", time.gmtime(month_back(6)))
    unique(redis, "key_a", "users", ms[6], members("a", 3))
    redis.cmd("HSET", "mtr:{worker}:figmon", ms[4], "1", ms[5], "1",
              ms[5] + "|closed", "1", ms[6] + "|closed", "1",
              ms[6] + "|dirty", "1")

    r = w.once(int(time.time()))
    assert r.returncode == 0, r.stderr

    def left(ym):
        return sorted(k for k in redis.keys("mtr:u[qh]*")
                      if k.endswith(":" + ym) or k.endswith(":" + ym + "02")
                      or k == "mtr:uqidx:" + ym)

    # month -3 is unknown to the figure biller: removed on time alone
    assert left(ms[3]) == []
    assert "unique users of month %s removed after retention (6 keys)" \
        % ms[3] in r.stderr
    assert len(left(ms[0])) == 7 and \
        int(redis.cmd("SCARD", "mtr:uqidx:" + ms[0])) == 3
    assert left(ms[5]) == []
    if BILLER.exists():
        # the biller (daemon/figures.c) bills the months it knows in the
        # same pass, closes them (no hour of theirs waits) and removes
        # them itself: nothing of -4 and -6 is left for this rule
        assert left(ms[4]) == [] and left(ms[6]) == []
        assert [f for f in redis.hgetall("mtr:{worker}:figmon")
                if f[:6] in (ms[4], ms[5], ms[6])] == []
    else:
        # without it, its state keeps them: -4 not closed, -6 dirty
        assert len(left(ms[4])) == 7, left(ms[4])
        assert "unique users of month %s are past retention but not " \
            "billed" % ms[4] in r.stderr
        assert sorted(left(ms[6])) == sorted(
            ["mtr:uqidx:" + ms[6],
             "mtr:uq:{%s}:users:%s" % (key_hash("key_a"), ms[6]),
             "mtr:uh:{%s}:users:%s" % (key_hash("key_a"), ms[6])])
    # nothing more the next time
    r = w.once(int(time.time()))
    assert "removed after retention" not in r.stderr


# ---------------------------------------------------------------- alerts

def test_alerts_take_gauges_and_unique_meters_as_figures(redis, tmp_path):
    from conftest import wait_for
    from test_alerts import HttpSink, Worker as AlertWorker
    from test_alerts import customer as alert_customer
    hooks = HttpSink()
    try:
        prev = month_back(1)
        ym = time.strftime("%Y%m", time.gmtime(prev))
        p1, p2 = prev + 86400 + 10 * 3600, prev + 2 * 86400 + 10 * 3600
        kh1 = alert_customer(redis, "g", "mk_test_fig1", "g@g.example")
        kh2 = key_hash("mk_test_fig2")
        r = subprocess.run([str(METERCTL), "--redis", redis.address, "keys",
                            "add", "-", "--customer", "g"],
                           input="mk_test_fig2", capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        put(redis, "mk_test_fig1", p1, {"disk:last|%s.1" % ("a" * 16):
                                        enc(100, 80),
                                        "cpu:max|%s.2" % ("a" * 16): 40})
        put(redis, "mk_test_fig2", p1, {"cpu:max|%s.3" % ("b" * 16): 55})
        put(redis, "mk_test_fig1", p2, {"disk:last|%s.1" % ("a" * 16):
                                        enc(5, 20)})
        put(redis, "mk_test_fig2", p2, {"cpu:max|%s.3" % ("b" * 16): 30})
        unique(redis, "mk_test_fig1", "users", ym, ["a" * 16, "b" * 16,
                                                    "c" * 16])
        unique(redis, "mk_test_fig2", "users", ym, ["c" * 16, "d" * 16,
                                                    "e" * 16])
        rules = {}
        for name, cond in (("c", "usage_above 50 cpu"),
                           ("c2", "usage_above 55 cpu"),
                           ("d", "usage_above 15 disk"),
                           ("d2", "usage_above 25 disk"),
                           ("u", "usage_above 4 users"),
                           ("u2", "usage_above 5 users")):
            rules["alert.%s.when" % name] = cond + " per month"
            rules["alert.%s.notify" % name] = "webhook:%s" % hooks.url(
                "/" + name)
        w = AlertWorker(tmp_path / "aw", redis, rules).start()
        try:
            wait_for(lambda: len(hooks.accepted) >= 3, 20, msg=w.log)
            time.sleep(3)
            got = sorted((json.loads(x["body"])["rule"],
                          json.loads(x["body"])["period"],
                          json.loads(x["body"])["value"])
                         for x in hooks.accepted)
            label = time.strftime("%Y-%m", time.gmtime(prev))
            # a sum would be 125 cpu and 100 disk; the figures: 55, 20, 5
            assert got == [("c", label, 55), ("d", label, 20),
                           ("u", label, 5)], got
            m = redis.hgetall("mtr:{alert}:m:%d" % prev)
            assert m["%s|disk:last" % kh1] == "20"
            assert m["%s|disk:last@" % kh1] == str(p2 * 1000 + 5)
            assert m["%s|cpu:max" % kh2] == "55"
        finally:
            w.stop()
    finally:
        hooks.stop()
