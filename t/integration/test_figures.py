"""Billing figures (issue 15): gauges (max, last) and unique users are
billed as the month-to-date figure of (month, subject, meter), exactly once
(docs/redis-schema.md, "Billing a figure").  Real worker binary, real
Redis seeded the way the module writes (writer layout, mtr:uq/mtr:uh and
mtr:uqidx:YYYYMM), provider fakes.  Stripe gets the figure F itself (its
meter aggregates with "last"), additive providers the increase F - B."""

import calendar
import hashlib
import time

import pytest

from conftest import key_hash
from test_flush_layout import EPOCH2, put_writer
from test_worker import (NOW_HOUR, Worker, idem, iso, lock_expired,
                         sigkill_twice_mid_drain, stripe_customer,
                         stripe_worker)

NOW = int(time.time())


def month_start(ts):
    t = time.gmtime(ts)
    return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))


def month_end(ts):
    t = time.gmtime(ts)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0))


def yyyymm(ts):
    return time.strftime("%Y%m", time.gmtime(ts))


# a month with at least six closed hours: this one, or (early in a month)
# the one before
BASE = month_start(NOW) if NOW - month_start(NOW) > 6 * 3600 \
    else month_start(month_start(NOW) - 1)
# the month before this one: closed (its end is past), hours near its end
PREV_END = month_start(NOW)
PREV = month_start(PREV_END - 1)


def fig_line(kh, customer, meter, kind, ts, quantity, seq=1):
    """A file-provider line of a figure's record: the month's period, the
    key derived from NAME:kind."""
    ms = month_start(ts)
    return {"key_hash": kh, "customer": customer, "meter": meter,
            "period_start": iso(ms), "period_end": iso(month_end(ts)),
            "quantity": quantity,
            "idempotency_key": idem(ms, customer or kh, "%s:%s" % (meter,
                                                                   kind),
                                    seq)}


def customer(redis, cust, key, provider="file", **fields):
    args = ["provider", provider, "status", "active"]
    for k, v in fields.items():
        args += [k, v]
    redis.cmd("HSET", "mtr:cust:{%s}" % cust, *args)
    redis.cmd("SADD", "mtr:customers", cust)
    redis.cmd("HSET", "mtr:key:{%s}" % key_hash(key), "customer", cust)
    redis.cmd("SADD", "mtr:ckeys:{%s}" % cust, key_hash(key))


def last_raw(value, ms_into_hour):
    """The module's encoding of a last= reading (contract)."""
    return (ms_into_hour << 40) | value


def member(user):
    return hashlib.sha256(user.encode()).hexdigest()[:16]


def seed_unique(redis, key, name, uperiod, users):
    """What the module's flush writes for unique=: the index first, then
    the set (while small) and the HLL."""
    kh = key_hash(key)
    redis.cmd("SADD", "mtr:uqidx:%s" % uperiod[:6],
              "%s|%s|%s" % (kh, name, uperiod))
    ms = [member(u) for u in users]
    redis.cmd("PFADD", "mtr:uh:{%s}:%s:%s" % (kh, name, uperiod), *ms)
    for m in ms:
        if redis.cmd("SCARD", "mtr:uq:{%s}:%s:%s" % (kh, name, uperiod)) \
                < 1000:
            redis.cmd("SADD", "mtr:uq:{%s}:%s:%s" % (kh, name, uperiod), m)


def fig_hash(redis, ts):
    return redis.hgetall("mtr:{worker}:fig:%s" % yyyymm(ts))


# ------------------------------------------------------------- gauge max

def test_gauge_max_three_hours_file_sums_to_the_month_max(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cm", "km-1")
    kh = key_hash("km-1")
    hs = [BASE, BASE + 3600, BASE + 2 * 3600]
    for h, v in zip(hs, (30, 70, 50)):
        put_writer(redis, EPOCH2, 1, h, {("km-1", "disk:max", 1): v})
        assert w.once(h + 3600 + 300).returncode == 0
    got = w.lines()
    # 30, then +40 (70); the third hour (50) raises nothing
    assert got == [fig_line(kh, "cm", "disk", "max", BASE, 30),
                   fig_line(kh, "cm", "disk", "max", BASE, 40, seq=2)]
    assert sum(x["quantity"] for x in got) == 70
    f = fig_hash(redis, BASE)
    assert f["cm|disk:max"] == "70"
    assert f["cm|disk:max|f"].split()[:2] == [
        "70", time.strftime("%Y%m%d%H", time.gmtime(hs[2]))]
    # every counter marked billed (retention), no hour left to drain
    for h in hs:
        assert redis.cmd("ZSCORE", "mtr:hours",
                         time.strftime("%Y%m%d%H", time.gmtime(h))) is None
    # a rerun sends nothing
    assert w.once(hs[2] + 3600 + 300).returncode == 0
    assert len(w.lines()) == 2


def test_gauge_max_late_usage_one_more_record(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cl", "kl-1")
    kh = key_hash("kl-1")
    put_writer(redis, EPOCH2, 1, BASE, {("kl-1", "disk:max", 1): 20})
    put_writer(redis, EPOCH2, 1, BASE + 3600, {("kl-1", "disk:max", 1): 12})
    assert w.once(BASE + 2 * 3600 + 300).returncode == 0
    assert w.lines() == [fig_line(kh, "cl", "disk", "max", BASE, 20)]
    # late, into the first hour (another session): 26 -> +6
    put_writer(redis, EPOCH2, 2, BASE, {("kl-1", "disk:max", 1): 26})
    assert w.once(BASE + 2 * 3600 + 300).returncode == 0
    assert w.lines()[1:] == [fig_line(kh, "cl", "disk", "max", BASE, 6,
                                      seq=2)]
    # late and smaller: nothing more
    put_writer(redis, EPOCH2, 3, BASE + 3600, {("kl-1", "disk:max", 1): 25})
    assert w.once(BASE + 2 * 3600 + 300).returncode == 0
    assert len(w.lines()) == 2


def gauge_hours(redis, key, meter, values, start=None):
    start = BASE if start is None else start
    for i, v in enumerate(values):
        put_writer(redis, EPOCH2, 1, start + i * 3600,
                   {(key, meter, 1): v})


def additive_days(redis, key, run):
    """Chargebee and Recurly bill days (report_period = day): two hours of
    the second-last day of last month (30, 70), a pass after that day; a
    larger value (90) the day after, a pass after the month."""
    d1 = PREV_END - 2 * 86400
    gauge_hours(redis, key, "disk:max", [30, 70], d1 + 5 * 3600)
    assert run(d1 + 86400 + 300).returncode == 0
    gauge_hours(redis, key, "disk:max", [90, 12], d1 + 86400 + 3600)
    assert run(PREV_END + 300).returncode == 0
    assert run(PREV_END + 300).returncode == 0


def test_gauge_max_chargebee_sums_to_the_month_max(redis, tmp_path):
    from fakes import FakeChargebee
    from test_providers import Worker as PWorker
    with FakeChargebee(api_key="cb_test_fig") as cb:
        customer(redis, "cc", "kc-1", "chargebee",
                 provider_customer="cust_cc", subscription="sub_cc")
        cb.add_subscription("sub_cc", customer_id="cust_cc",
                            item_prices=["disk-USD"])
        w = PWorker(tmp_path / "cb", redis, "chargebee", {
            "chargebee.base_url": cb.url, "chargebee.api_key_file": "@KEY@",
            "_api_key": "cb_test_fig", "chargebee.max_rps": 0,
            "chargebee.backoff": "50ms", "meter.disk": "disk-USD"})
        additive_days(redis, "kc-1", w.run)
        assert cb.total("sub_cc", "disk-USD") == 90
        assert [int(u["quantity"]) for u in cb.usages] == [70, 20]
        # dated inside the month
        for u in cb.usages:
            assert PREV <= u["usage_date"] < PREV_END, u


def test_gauge_max_recurly_sums_to_the_month_max(redis, tmp_path):
    from fakes import FakeRecurly
    from test_providers import Worker as PWorker
    with FakeRecurly(api_key="rk_test_fig") as rk:
        rk.add_subscription("sub_rr", add_ons=["disk"])
        customer(redis, "rr", "kr-1", "recurly", provider_customer="acct_rr",
                 subscription="sub_rr")
        w = PWorker(tmp_path / "rk", redis, "recurly", {
            "recurly.base_url": rk.url, "recurly.api_key_file": "@KEY@",
            "_api_key": "rk_test_fig", "recurly.max_rps": 0,
            "recurly.backoff": "50ms", "meter.disk": "disk"})
        additive_days(redis, "kr-1", w.run)
        assert rk.total("sub_rr", "disk") == 90
        assert [u["amount"] for u in rk.usages] == [70, 20]


# --------------------------------------------------------------- stripe

@pytest.mark.parametrize("mode", ["meter_events", "meter_event_stream",
                                  "usage_records"])
def test_stripe_gets_the_month_to_date_figure(redis, tmp_path, mode):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_f1").start()
    try:
        extra = {"stripe__api_version": "2025-02-24.acacia"} \
            if mode == "usage_records" else {}
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_f1",
                          meter__disk="storage_gb", grace="5m",
                          stripe__mode=mode, stripe__stream_url=stripe.url,
                          **extra)
        stripe_customer(redis, "s1", "cus_s1", "ks-1")
        redis.cmd("HSET", "mtr:cust:{s1}", "item.disk", "si_disk")
        for i, v in enumerate((30, 70, 50)):
            gauge_hours(redis, "ks-1", "disk:max", [v], BASE + i * 3600)
            assert w.once(BASE + (i + 1) * 3600 + 300).returncode == 0
        if mode == "usage_records":
            # each the figure, action=set: the item's usage is the last
            recs = stripe.usage_records
            assert [(r["quantity"], r["action"]) for r in recs] == [
                (30, "set"), (70, "set")]
            assert stripe.usage_total("si_disk") == 70
            return
        # each event carries the figure so far; the third hour raised
        # nothing, so no third event
        vals = [int(e["payload"]["value"]) for e in stripe.events]
        assert vals == [30, 70]
        assert stripe.last("cus_s1", "storage_gb") == 70
        ts = [e["timestamp"] for e in stripe.events]
        # the end of the latest hour included, inside the month
        assert ts == [BASE + 3600 - 1, BASE + 2 * 3600 - 1]
        assert [e["identifier"] for e in stripe.events] == [
            idem(BASE, "s1", "disk:max", 1), idem(BASE, "s1", "disk:max", 2)]
    finally:
        stripe.stop()


def test_stripe_lost_answer_resent_same_key(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_f2").start()
    try:
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_f2",
                          meter__disk="storage_gb", grace="5m",
                          stripe__timeout="1s", stripe__backoff="50ms")
        stripe_customer(redis, "s2", "cus_s2", "ks-2")
        gauge_hours(redis, "ks-2", "disk:max", [41])
        stripe.hang_next(1, seconds=3, after=True, match=r"/meter_events$")
        assert w.once(BASE + 3600 + 300).returncode == 0
        posts = stripe.requests_to("POST", r"/meter_events$")
        keys = [p.headers["Idempotency-Key"] for p in posts]
        assert len(keys) == 2 and len(set(keys)) == 1
        assert keys[0] == idem(BASE, "s2", "disk:max", 1)
        assert len(stripe.events) == 1
        assert stripe.last("cus_s2", "storage_gb") == 41
        assert fig_hash(redis, BASE)["s2|disk:max"] == "41"
    finally:
        stripe.stop()


def test_sigkill_mid_send_each_figure_once(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_f3", delay=0.02).start()
    try:
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_f3",
                          meter__disk="storage_gb", meter__users="mau",
                          grace="5m")
        up = yyyymm(BASE)
        for i in range(40):
            stripe_customer(redis, "k%03d" % i, "cus_k%03d" % i, "kk-%d" % i)
            put_writer(redis, EPOCH2, 1, BASE, {("kk-%d" % i, "disk:max", 1):
                                                i + 3})
            seed_unique(redis, "kk-%d" % i, "users", up,
                        ["u%d" % j for j in range(i + 1)])
        sigkill_twice_mid_drain(redis, w, BASE + 3600 + 300,
                                lambda: len(stripe.events))
        assert 0 < len(stripe.events) < 80, "the kills did not land mid-send"
        lock_expired(redis)
        assert w.once(BASE + 3600 + 300).returncode == 0
        idents = [e["identifier"] for e in stripe.events]
        assert len(idents) == len(set(idents)) == 80
        for i in range(40):
            assert stripe.last("cus_k%03d" % i, "storage_gb") == i + 3
            assert stripe.last("cus_k%03d" % i, "mau") == i + 1
        assert redis.keys("mtr:{worker}:r:*") == []
        assert w.once(BASE + 3600 + 300).returncode == 0
        assert len(stripe.events) == 80
    finally:
        stripe.stop()


# ------------------------------------------------------------ gauge last

def last_scenario(redis, key, once):
    """Three hours near the end of the month before this one: 50, 20,
    35, each hour with a later and an earlier reading; a pass after each
    hour, the last one after the month's close."""
    hs = [PREV_END - 3 * 3600, PREV_END - 2 * 3600, PREV_END - 3600]
    vals = [(50, 9000), (20, 100), (35, 3599000)]
    for h, (v, ms) in zip(hs, vals):
        # the later reading (larger ms) wins over a larger value
        put_writer(redis, EPOCH2, 1, h,
                   {(key, "seats:last", 1): last_raw(v, ms)})
        put_writer(redis, EPOCH2, 2, h,
                   {(key, "seats:last", 2): last_raw(v + 1000, 1)})
        assert once(h + 3600 + 300 if h != hs[-1] else h + 3600 - 1
                    ).returncode == 0
    yield hs
    # the month closes
    assert once(PREV_END + 300).returncode == 0
    yield hs
    assert once(PREV_END + 300).returncode == 0
    yield hs


def test_gauge_last_falls_then_rises_stripe_gets_each(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_f4").start()
    try:
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_f4",
                          meter__seats="seats", grace="5m")
        stripe_customer(redis, "l1", "cus_l1", "kl-s")
        steps = last_scenario(redis, "kl-s", w.once)
        next(steps)
        assert [int(e["payload"]["value"]) for e in stripe.events] == \
            [50, 20]
        hs = next(steps)
        assert [int(e["payload"]["value"]) for e in stripe.events] == \
            [50, 20, 35]
        assert stripe.last("cus_l1", "seats") == 35
        assert [e["timestamp"] for e in stripe.events] == [
            h + 3600 - 1 for h in hs]
        assert fig_hash(redis, PREV)["l1|seats:last"] == "35"
        next(steps)
        assert len(stripe.events) == 3
    finally:
        stripe.stop()


def test_gauge_last_falls_then_rises_additive_once_at_close(redis,
                                                            tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "l2", "kl-f")
    steps = last_scenario(redis, "kl-f", w.once)
    next(steps)
    assert w.lines() == []
    next(steps)
    assert w.lines() == [fig_line(key_hash("kl-f"), "l2", "seats", "last",
                                  PREV, 35)]
    assert fig_hash(redis, PREV)["l2|seats:last"] == "35"
    next(steps)
    assert len(w.lines()) == 1


# --------------------------------------------------------------- uniques

def test_unique_union_over_a_customers_keys(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cu", "ku-1")
    customer(redis, "cu", "ku-2")
    up = yyyymm(BASE)
    # u2 and u3 on both keys: counted once; 5 distinct
    seed_unique(redis, "ku-1", "users", up, ["u1", "u2", "u3"])
    seed_unique(redis, "ku-2", "users", up, ["u2", "u3", "u4", "u5"])
    # a key without customer: its own subject
    seed_unique(redis, "ku-x", "users", up, ["u1", "u9"])
    assert w.once(BASE + 3600 + 300).returncode == 0
    got = sorted(w.lines(), key=lambda x: x["customer"] or "")
    assert got == [fig_line(key_hash("ku-x"), None, "users", "unique",
                            BASE, 2),
                   fig_line(None, "cu", "users", "unique", BASE, 5)]
    # a new user in the next hour: +1; no new hour: not even read
    seed_unique(redis, "ku-2", "users", up, ["u6", "u1"])
    redis.cmd("CONFIG", "RESETSTAT")
    assert w.once(BASE + 3600 + 300).returncode == 0
    assert len(w.lines()) == 2
    stats = redis.cmd("INFO", "commandstats")
    stats = stats.decode() if isinstance(stats, bytes) else stats
    for cmd in ("sscan", "scard", "smembers", "pfcount"):
        assert "cmdstat_%s:" % cmd not in stats, stats
    assert w.once(BASE + 2 * 3600 + 300).returncode == 0
    assert w.lines()[2:] == [fig_line(None, "cu", "users", "unique",
                                      BASE, 1, seq=2)]


def test_unique_over_the_exact_limit_uses_the_hll(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cb", "kb-1")
    customer(redis, "cb", "kb-2")
    up = yyyymm(BASE)
    seed_unique(redis, "kb-1", "users", up, ["a%d" % i for i in range(1500)])
    seed_unique(redis, "kb-2", "users", up, ["a%d" % i for i in range(1000,
                                                                      2000)])
    assert w.once(BASE + 3600 + 300).returncode == 0
    q = w.lines()[0]["quantity"]
    # the union is 2000 users; Redis' HLL: 0.81 % standard error, 3 sigma
    assert abs(q - 2000) <= 2000 * 0.0243, q
    # the merge left no copy behind
    assert redis.keys("mtr:{worker}:uh:tmp:*") == []


def test_unique_period_day_sums_user_days(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cd", "kd-1")
    d1 = time.strftime("%Y%m%d", time.gmtime(BASE))
    d2 = time.strftime("%Y%m%d", time.gmtime(BASE + 86400))
    seed_unique(redis, "kd-1", "dau", d1, ["u1", "u2", "u3"])
    seed_unique(redis, "kd-1", "dau", d2, ["u1", "u4"])
    # the second day has not begun by this pass: not counted yet
    assert w.once(BASE + 3600 + 300).returncode == 0
    assert [x["quantity"] for x in w.lines()] == [3]
    assert w.once(BASE + 86400 + 3600 + 300).returncode == 0
    # 3 + 2 user-days
    assert [x["quantity"] for x in w.lines()] == [3, 2]


# ------------------------------------------------------- months and time

def test_month_boundary_two_figures(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cx", "kx-1")
    kh = key_hash("kx-1")
    put_writer(redis, EPOCH2, 1, PREV_END - 3600, {("kx-1", "disk:max", 1):
                                                   80})
    put_writer(redis, EPOCH2, 1, PREV_END, {("kx-1", "disk:max", 1): 15})
    seed_unique(redis, "kx-1", "users", yyyymm(PREV), ["a", "b"])
    seed_unique(redis, "kx-1", "users", yyyymm(PREV_END), ["a"])
    assert w.once(PREV_END + 3600 + 300).returncode == 0
    got = sorted(w.lines(), key=lambda x: (x["period_start"], x["meter"]))
    assert got == [fig_line(kh, "cx", "disk", "max", PREV, 80),
                   fig_line(kh, "cx", "users", "unique", PREV, 2),
                   fig_line(kh, "cx", "disk", "max", PREV_END, 15),
                   fig_line(kh, "cx", "users", "unique", PREV_END, 1)]


def test_future_hours_are_not_billed_early(redis, tmp_path):
    """A clock that lies writes a gauge hour and a unique day ahead: not
    billed before they close."""
    w = Worker(tmp_path, redis, grace="5m")
    customer(redis, "cf", "kf-1")
    future = NOW_HOUR + 5 * 3600
    put_writer(redis, EPOCH2, 1, future, {("kf-1", "disk:max", 1): 99})
    day = NOW_HOUR // 86400 * 86400 + 2 * 86400
    if month_start(day) == month_start(NOW):
        seed_unique(redis, "kf-1", "dau",
                    time.strftime("%Y%m%d", time.gmtime(day)), ["z"])
    assert w.once(NOW - 300).returncode == 0
    assert w.lines() == []
    assert "cf|disk:max|f" not in fig_hash(redis, future)


def test_month_removed_after_retention(redis, tmp_path):
    """A closed, billed month past retention: its sets, HLLs, index and
    figures are deleted; a month still inside retention keeps them."""
    if NOW - PREV_END < 3 * 3600:
        pytest.skip("the month before ended less than 3 h ago")
    w = Worker(tmp_path, redis, grace="5m", retention="1h")
    customer(redis, "cr", "kr-1")
    kh = key_hash("kr-1")
    seed_unique(redis, "kr-1", "users", yyyymm(PREV), ["a", "b", "c"])
    put_writer(redis, EPOCH2, 1, PREV_END - 3600, {("kr-1", "disk:max", 1):
                                                   7})
    seed_unique(redis, "kr-1", "users", yyyymm(NOW), ["a"])
    assert w.once(NOW - 300).returncode == 0
    got = sorted((x["period_start"], x["meter"], x["quantity"])
                 for x in w.lines())
    assert (iso(PREV), "disk", 7) in got and (iso(PREV), "users", 3) in got
    prev = yyyymm(PREV)
    assert redis.keys("mtr:uq:{%s}:users:%s" % (kh, prev)) == []
    assert redis.keys("mtr:uh:{%s}:users:%s" % (kh, prev)) == []
    assert redis.cmd("EXISTS", "mtr:uqidx:%s" % prev) == 0
    assert redis.cmd("EXISTS", "mtr:{worker}:fig:%s" % prev) == 0
    assert not any(f.startswith(prev)
                   for f in redis.hgetall("mtr:{worker}:figmon"))
    # this month is not closed: kept
    cur = yyyymm(NOW)
    assert redis.cmd("EXISTS", "mtr:uqidx:%s" % cur) == 1
    assert redis.cmd("EXISTS", "mtr:uq:{%s}:users:%s" % (kh, cur)) == 1
    assert fig_hash(redis, NOW)["cr|users:unique"] == "1"



def test_key_without_customer_is_held_from_stripe(redis, tmp_path):
    """Stripe needs a customer: a key without one is held (not sent, not
    lost), listed in mtr:{worker}:nocust like held usage."""
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_f5").start()
    try:
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_f5",
                          meter__disk="storage_gb", grace="5m")
        gauge_hours(redis, "kn-1", "disk:max", [9])
        assert w.once(BASE + 3600 + 300).returncode == 0
        assert stripe.events == []
        kh = key_hash("kn-1")
        assert redis.cmd("SMEMBERS", "mtr:{worker}:nocust") == [kh.encode()]
        assert fig_hash(redis, BASE)["%s|disk:max|f" % kh].split()[0] == "9"
    finally:
        stripe.stop()
