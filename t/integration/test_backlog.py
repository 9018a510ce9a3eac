"""A provider outage and the catch-up after it (meter-worker as a daemon):
the drain pauses instead of sending the whole backlog into a dead provider,
catches up oldest hour first when the provider is back, keeps its loop
turns bounded (the delinquency sync runs during the catch-up), and
meterctl status and the worker's Prometheus metrics show the backlog.
"""

import json
import re
import subprocess
import time

import pytest

from conftest import key_hash, wait_for
from test_worker import EPOCH, NOW_HOUR, Worker, idem, put

HOURS = 5
KEYS = 20


def seed(redis, first):
    want = {}
    for k in range(KEYS):
        cust = "c%03d" % k
        redis.cmd("HSET", "mtr:cust:{%s}" % cust, "provider", "stripe",
                  "provider_customer", "cus_%03d" % k)
        redis.cmd("HSET", "mtr:key:{%s}" % key_hash("bk-%d" % k),
                  "customer", cust)
        for h in range(HOURS):
            put(redis, "bk-%d" % k, first + h * 3600,
                {"calls|%s.1" % EPOCH: k + 10 * h + 1})
            want[(first + h * 3600, cust)] = k + 10 * h + 1
    return want


def status(w):
    r = w.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def promtool(text):
    lint = subprocess.run(["promtool", "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


def sample(text, name):
    m = re.search(r"^%s(\{[^}]*\})? (\S+)$" % re.escape(name), text, re.M)
    assert m, (name, text)
    return float(m.group(2))


def test_outage_then_catch_up_oldest_first(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_bl", delay=0.03).start()
    p = None
    try:
        keyfile = tmp_path / "stripe-key"
        keyfile.write_text("sk_test_bl\n")
        keyfile.chmod(0o600)
        textfile = tmp_path / "worker.prom"
        # stripe.backoff: a chunk of 20 records goes out before the turn
        # ends and the metrics are written; at the default 0.5 s between a
        # request's 3 attempts that first turn took 20-30 s, past the wait
        w = Worker(tmp_path / "w", redis, provider="stripe",
                   stripe__base_url=stripe.url, stripe__backoff="50ms",
                   stripe__api_key_file=keyfile, meter__calls="api_calls",
                   retry__base="1s", retry__max="2s", lock_ttl="5s",
                   sync_interval="1s", turn_time="300ms",
                   metrics__textfile=textfile)
        first = NOW_HOUR - (HOURS + 2) * 3600
        want = seed(redis, first)

        # the provider is down: every meter event answers 503
        stripe.fail_next(100000, 503, match=r"/v1/billing/meter_events")
        p = w.spawn()
        wait_for(lambda: textfile.exists() and
                 sample(textfile.read_text(),
                        "meter_worker_records_failed_total") >= 5,
                 timeout=120, msg=lambda: (w.tmp / "worker.log").read_text())
        time.sleep(2)
        # paused after a few failures: not every record was made and sent
        # into the outage; the rest is still due, counted in the backlog
        st = status(w)
        assert st["backlog"] == HOURS * KEYS
        assert st["eta_seconds"] is None and st["rate"] == 0
        assert st["oldest_unbilled_hour"] == time.strftime(
            "%Y-%m-%dT%H", time.gmtime(first))
        # (sends are concurrent: a whole chunk may go out before the pause,
        # but not the whole backlog)
        assert redis.cmd("ZCARD", "mtr:{worker}:open") < HOURS * KEYS
        assert stripe.events == []
        text = textfile.read_text()
        promtool(text)
        assert sample(text, "meter_worker_backlog_records") == HOURS * KEYS
        assert sample(text, "meter_worker_records_sent_total") == 0
        assert sample(text, "meter_worker_last_drain_timestamp_seconds") == 0

        # back up: the whole backlog goes out, oldest hour first, while the
        # delinquency sync keeps running between turns
        syncs = []
        with stripe.lock:
            stripe.script.clear()
        t_up = time.time()

        def done():
            v = redis.cmd("HGET", "mtr:w:sync", "last")
            if v is not None:
                v = int(v)
                if not syncs or syncs[-1] != v:
                    syncs.append(v)
            return len(stripe.events) == HOURS * KEYS

        wait_for(done, timeout=120, interval=0.05)
        t_done = time.time()

        with stripe.lock:
            evs = list(stripe.events)
        # records made during the outage come back by their own retry
        # times (jittered); what was still due goes out oldest hour first
        made = {o["period_start"] for o in st["open"]}
        stamps = [int(e["timestamp"]) for e in evs
                  if time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(
                      int(e["timestamp"]) // 3600 * 3600)) not in made]
        assert stamps, "every hour was made during the outage"
        assert stamps == sorted(stamps), "not oldest hour first"
        got = {}
        for e in evs:
            got[(int(e["timestamp"]) // 3600 * 3600,
                 "c%03d" % int(e["payload"]["stripe_customer_id"][4:]))] = \
                int(e["payload"]["value"])
        assert got == want
        idents = sorted(e["identifier"] for e in evs)
        assert idents == sorted(idem(h, c, "calls") for h, c in want)
        assert stripe.duplicates == 0
        # the sync ran during the catch-up (the drain takes turns)
        assert t_done - t_up > 1.5
        assert any(t_up <= s <= t_done + 1 for s in syncs), (syncs, t_up,
                                                             t_done)

        def settled():
            st = status(w)
            return st["backlog"] == 0 and st["rate"] > 0
        wait_for(settled, timeout=30)
        st = status(w)
        assert st["eta_seconds"] == 0 and st["oldest_unbilled_hour"] is None
        wait_for(lambda: sample(textfile.read_text(),
                                "meter_worker_records_sent_total")
                 == HOURS * KEYS, timeout=30)
        text = textfile.read_text()
        promtool(text)
        assert sample(text, "meter_worker_backlog_records") == 0
        assert sample(text, "meter_worker_last_drain_timestamp_seconds") \
            >= t_up - 1
        assert sample(text, "meter_worker_sync_age_seconds") >= 0

        r = w.ctl("status")
        assert re.search(r"^backlog: 0 records due, [0-9.]+ records/s, "
                         r"ETA 0m00s", r.stdout, re.M), r.stdout
    finally:
        if p is not None:
            p.terminate()
            p.wait(timeout=20)
        stripe.stop()


def test_metrics_on_the_webhook_listener(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_m").start()
    p = None
    try:
        from conftest import free_port
        port = free_port()
        (tmp_path / "k").write_text("sk_test_m\n")
        (tmp_path / "k").chmod(0o600)
        (tmp_path / "wh").write_text("whsec_test_metrics\n")
        (tmp_path / "wh").chmod(0o600)
        w = Worker(tmp_path / "w", redis, provider="stripe",
                   stripe__base_url=stripe.url,
                   stripe__api_key_file=tmp_path / "k",
                   stripe__webhook_secret_file=tmp_path / "wh",
                   meter__calls="api_calls",
                   webhook__listen="127.0.0.1:%d" % port,
                   metrics__http="on", sync_interval="1h")
        h = NOW_HOUR - 3 * 3600
        redis.cmd("HSET", "mtr:cust:{m1}", "provider", "stripe",
                  "provider_customer", "cus_m1")
        redis.cmd("HSET", "mtr:key:{%s}" % key_hash("mk-1"), "customer",
                  "m1")
        put(redis, "mk-1", h, {"calls": 4})
        p = w.spawn()
        wait_for(lambda: len(stripe.events) == 1, timeout=30)

        import urllib.request

        def get():
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics"
                                        % port, timeout=5) as r:
                assert r.headers["Content-Type"].startswith(
                    "text/plain; version=0.0.4")
                return r.read().decode()

        wait_for(lambda: sample(get(), "meter_worker_records_sent_total")
                 == 1, timeout=30)
        text = get()
        promtool(text)
        assert 'meter_worker_records_sent_total{provider="stripe"} 1' in text
        assert sample(text, "meter_worker_records_dead_lettered_total") == 0
        assert sample(text, "meter_worker_requests_in_flight") == 0
    finally:
        if p is not None:
            p.terminate()
            p.wait(timeout=20)
        stripe.stop()


def test_metrics_settings_are_checked(redis, tmp_path):
    w = Worker(tmp_path, redis, metrics__http="on")
    r = subprocess.run([str(__import__("test_worker").WORKER), "-c",
                        str(w.conf), "-t"], capture_output=True, text=True)
    assert r.returncode == 78
    assert '"metrics.http" is on but "webhook.listen" is not set' in r.stderr
    w = Worker(tmp_path / "b", redis, metrics__textfile="relative.prom")
    r = subprocess.run([str(__import__("test_worker").WORKER), "-c",
                        str(w.conf), "-t"], capture_output=True, text=True)
    assert r.returncode == 78 and "absolute path" in r.stderr


def test_backlog_counts_both_layouts(redis, tmp_path):
    """Held usage (keys without customer, provider stripe) never settles:
    the backlog is its counters, key layout and writer layout (every part
    of every writer the hour's mtr:widx lists)."""
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_bc").start()
    p = None
    try:
        (tmp_path / "k").write_text("sk_test_bc\n")
        (tmp_path / "k").chmod(0o600)
        w = Worker(tmp_path / "w", redis, provider="stripe",
                   stripe__base_url=stripe.url,
                   stripe__api_key_file=tmp_path / "k", sync_interval="1h")
        h1 = NOW_HOUR - 5 * 3600
        h2 = h1 + 3600
        put(redis, "held-1", h2, {"calls": 1})
        put(redis, "held-2", h2, {"calls": 2})
        hn = time.strftime("%Y%m%d%H", time.gmtime(h1))
        redis.cmd("SADD", "mtr:widx:%s" % hn, "%s:4:2" % EPOCH)
        redis.cmd("ZADD", "mtr:hours", "NX", str(h1), hn)
        redis.cmd("HSET", "mtr:wu:{%s}:4:%s:0" % (EPOCH, hn),
                  "%s|calls|1" % ("a1" * 32), "3", "%s|bytes|1" % ("a1" * 32),
                  "9")
        redis.cmd("HSET", "mtr:wu:{%s}:4:%s:1" % (EPOCH, hn),
                  "%s|calls|4097" % ("b2" * 32), "5")
        p = w.spawn()
        wait_for(lambda: redis.cmd("HGET", "mtr:{worker}:stats",
                                   "backlog_at") is not None, timeout=30)
        st = status(w)
        assert st["backlog"] == 5
        assert st["oldest_unbilled_hour"] == time.strftime(
            "%Y-%m-%dT%H", time.gmtime(h1))
        assert stripe.events == []
    finally:
        if p is not None:
            p.terminate()
            p.wait(timeout=20)
        stripe.stop()
