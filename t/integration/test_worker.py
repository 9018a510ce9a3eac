"""meter-worker and meterctl against a real redis-server: usage written into
Redis exactly as ngx_http_meter_module writes it (HSET of mtr:u:{KH}:HOUR
fields, SADD mtr:idx:HOUR, ZADD mtr:hours), drained with the file provider
(and the fake Stripe where a provider must answer), exactly once through
reruns, late usage, SIGKILL, dead letters, the lock and reloads.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import key_hash, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
# METER_WORKER_BIN / METERCTL_BIN: run the suite against other builds
# (an ASan build, an installed package)
WORKER = Path(os.environ.get("METER_WORKER_BIN",
                             ROOT / "worker" / "meter-worker"))
METERCTL = Path(os.environ.get("METERCTL_BIN", ROOT / "worker" / "meterctl"))

pytestmark = pytest.mark.skipif(not WORKER.exists() or not METERCTL.exists(),
                                reason="worker/ not built (make -C worker)")

EPOCH = "3f2a9c0d11b2e4f7"
NOW_HOUR = int(time.time()) // 3600 * 3600


def hour_name(ts):
    return time.strftime("%Y%m%d%H", time.gmtime(ts))


def iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def idem(period_start, subject, meter, seq=1):
    """The documented derivation (docs/redis-schema.md, Worker state)."""
    s = "%d|%s|%s|%d" % (period_start, subject, meter, seq)
    return hashlib.sha256(s.encode()).hexdigest()[:32]


def stripe_usage(redis, prefix, n, h, second):
    """n Stripe customers cNNN (cus_NNN), each with key PREFIX-i and
    i + 1 + second calls in hour h over two writers; {cus_NNN: total}."""
    want = {}
    for i in range(n):
        stripe_customer(redis, "c%03d" % i, "cus_%03d" % i,
                        "%s-%d" % (prefix, i))
        put(redis, "%s-%d" % (prefix, i), h, {"calls|%s.1" % EPOCH: i + 1,
                                              "calls|%s.2" % EPOCH: second})
        want["cus_%03d" % i] = i + 1 + second
    return want


def put(redis, key, hour_ts, fields):
    """What the module's flush does: SADD, ZADD NX, then the counters
    (absolute values per METER|WRITER field)."""
    kh = key_hash(key)
    h = hour_name(hour_ts)
    redis.cmd("SADD", "mtr:idx:%s" % h, kh)
    redis.cmd("ZADD", "mtr:hours", "NX", str(hour_ts), h)
    args = []
    for f, v in fields.items():
        args += [f if "|" in f else "%s|%s.1" % (f, EPOCH), str(v)]
    redis.cmd("HSET", "mtr:u:{%s}:%s" % (kh, h), *args)
    return kh


def read_jsonl(path):
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines()]


class Worker:
    bin = WORKER    # another build's meter-worker in a subclass

    def __init__(self, tmp, redis, provider="file", **settings):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.out = self.tmp / "out.jsonl"
        self.audit = self.tmp / "audit.jsonl"
        self.redis = redis
        lines = ["# test_worker.py",
                 "redis = %s" % redis.address,
                 "provider = %s" % provider,
                 "audit.path = %s" % self.audit,
                 "log_level = debug"]
        if provider == "file":
            lines.append("file.path = %s" % self.out)
        for k, v in settings.items():
            lines.append("%s = %s" % (k.replace("__", "."), v))
        self.conf = self.tmp / "worker.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def once(self, before, *extra, timeout=120):
        r = subprocess.run([str(self.bin), "-c", str(self.conf), "--once",
                            "--before", iso(before)] + list(extra),
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        print("---- meter-worker rc=%d\n%s" % (r.returncode, r.stderr))
        return r

    def spawn(self, *args, env=None):
        self.log = open(self.tmp / "worker.log", "ab")
        return subprocess.Popen([str(self.bin), "-c", str(self.conf)]
                                + list(args), stdout=self.log,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)

    def ctl(self, *args, stdin=None):
        r = subprocess.run([str(METERCTL), "-c", str(self.conf)] + list(args),
                           capture_output=True, text=True, timeout=60,
                           input=stdin)
        print("---- meterctl %s rc=%d\n%s%s" % (" ".join(args), r.returncode,
                                               r.stdout, r.stderr))
        return r

    def lines(self):
        return read_jsonl(self.out)


def line(kh, customer, meter, start, quantity, seq=1, period=3600):
    return {"key_hash": kh, "customer": customer, "meter": meter,
            "period_start": iso(start), "period_end": iso(start + period),
            "quantity": quantity,
            "idempotency_key": idem(start, customer or kh, meter, seq)}


def by_key(lines):
    return sorted(lines, key=lambda d: d["idempotency_key"])


# ------------------------------------------------------------ file provider

def test_file_exact_lines_and_rerun_sends_nothing(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h1 = NOW_HOUR - 5 * 3600
    h2 = h1 + 3600
    # two writers (two nginx nodes) for key-a, a zero meter, a key with a
    # customer, and an hour that is not closed yet
    a = put(redis, "key-a", h1, {"calls|%s.1" % EPOCH: 10,
                                 "calls|%s.2" % EPOCH: 5,
                                 "bytes|%s.1" % EPOCH: 1000,
                                 "errors|%s.1" % EPOCH: 0})
    b = put(redis, "key-b", h1, {"calls": 7})
    put(redis, "key-b", h2, {"calls": 3})
    put(redis, "key-a", h2 + 3600, {"calls": 99})
    assert w.ctl("customers", "add", "acme").returncode == 0
    r = w.ctl("keys", "add", "-", "--customer", "acme", stdin="key-b\n")
    assert r.returncode == 0 and r.stdout.strip() == b

    r = w.once(h2 + 3600)
    assert r.returncode == 0
    want = [line(a, None, "calls", h1, 15), line(a, None, "bytes", h1, 1000),
            line(b, "acme", "calls", h1, 7), line(b, "acme", "calls", h2, 3)]
    assert by_key(w.lines()) == by_key(want)

    # the audit log has every accepted record once
    audit = read_jsonl(w.audit)
    assert sorted(x["idempotency_key"] for x in audit) == \
        sorted(x["idempotency_key"] for x in want)
    assert all(x["provider"] == "file" for x in audit)

    # billed marks equal the usage billed; the open hour is untouched
    assert redis.hgetall("mtr:b:{%s}:%s" % (a, hour_name(h1))) == {
        "calls|%s.1" % EPOCH: "10", "calls|%s.2" % EPOCH: "5",
        "bytes|%s.1" % EPOCH: "1000"}
    assert redis.keys("mtr:b:{%s}:%s" % (a, hour_name(h2 + 3600))) == []
    assert redis.keys("mtr:{worker}:r:*") == []

    r = w.once(h2 + 3600)
    assert r.returncode == 0
    assert len(w.lines()) == 4

    # the later hour closes: only it is sent
    r = w.once(h2 + 7200)
    assert r.returncode == 0
    assert w.lines()[4:] == [line(a, None, "calls", h2 + 3600, 99)]


def test_late_usage_is_billed_as_the_difference(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 3 * 3600
    a = put(redis, "key-late", h, {"calls|%s.1" % EPOCH: 10})
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(a, None, "calls", h, 10)]

    # the same writer counted 4 more, and a second node flushed late
    put(redis, "key-late", h, {"calls|%s.1" % EPOCH: 14,
                               "calls|%s.7" % EPOCH: 2})
    assert w.once(h + 3600).returncode == 0
    assert w.lines() == [line(a, None, "calls", h, 10),
                         line(a, None, "calls", h, 6, seq=2)]

    assert w.once(h + 3600).returncode == 0
    assert len(w.lines()) == 2
    total = sum(x["quantity"] for x in w.lines())
    assert total == 16


def test_day_period_waits_for_the_whole_day(redis, tmp_path):
    w = Worker(tmp_path, redis, report_period="day")
    day = NOW_HOUR // 86400 * 86400 - 2 * 86400
    k = put(redis, "key-day", day + 3 * 3600, {"calls": 4})
    put(redis, "key-day", day + 23 * 3600, {"calls": 6})
    put(redis, "key-day", day + 86400 + 3600, {"calls": 8})

    # half of the second day is closed: only the first day goes
    assert w.once(day + 86400 + 12 * 3600).returncode == 0
    assert w.lines() == [line(k, None, "calls", day, 10, period=86400)]

    assert w.once(day + 2 * 86400).returncode == 0
    assert w.lines()[1:] == [line(k, None, "calls", day + 86400, 8,
                                  period=86400)]


def test_customer_aggregates_its_keys(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 4 * 3600
    assert w.ctl("customers", "add", "globex").returncode == 0
    raw = "mk_live_gk1_0123456789secret"
    k1 = w.ctl("keys", "add", raw, "--customer", "globex").stdout.strip()
    assert k1 == key_hash(raw)
    k2 = key_hash("gk-2")
    assert w.ctl("keys", "add", "--hash", k2, "--customer",
                 "globex").returncode == 0
    put(redis, raw, h, {"calls": 5})
    put(redis, "gk-2", h, {"calls": 6, "bytes": 10})
    assert w.once(h + 3600).returncode == 0
    want = [{"key_hash": None, "customer": "globex", "meter": "calls",
             "period_start": iso(h), "period_end": iso(h + 3600),
             "quantity": 11,
             "idempotency_key": idem(h, "globex", "calls")},
            line(k2, "globex", "bytes", h, 10)]
    assert by_key(w.lines()) == by_key(want)
    # only the hash of an imported key is stored, no prefix (issue 10)
    rec = redis.hgetall("mtr:key:{%s}" % k1)
    assert "prefix" not in rec and rec["customer"] == "globex"
    # governance projection kept current (docs/redis-schema.md)
    assert redis.smembers("mtr:ckeys:{globex}") == {k1, k2}
    assert redis.hgetall("mtr:gov") == {k1: "globex\ta\t\t0\t0",
                                        k2: "globex\ta\t\t0\t0"}
    v = int(redis.cmd("GET", "mtr:gov:version"))
    redis.cmd("HSET", "mtr:cust:{globex}", "status", "delinquent", "reason",
              "invoice_overdue", "since", "1795500000")
    assert w.ctl("customers", "add", "globex", "--email",
                 "ops@globex.example").returncode == 0
    assert redis.hgetall("mtr:cust:{globex}")["status"] == "delinquent"
    assert redis.hgetall("mtr:gov")[k1] == \
        "globex\td\tinvoice_overdue\t1795500000\t0"
    assert int(redis.cmd("GET", "mtr:gov:version")) > v
    for k in redis.keys("*"):
        assert raw not in k
        if redis.cmd("TYPE", k) == "hash":
            assert raw not in json.dumps(redis.hgetall(k))


def test_many_keys_in_batches(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 6 * 3600
    want = []
    for i in range(1300):           # more than one SSCAN batch
        kh = put(redis, "bk-%d" % i, h, {"calls": i + 1})
        want.append(line(kh, None, "calls", h, i + 1))
    assert w.once(h + 3600).returncode == 0
    assert by_key(w.lines()) == by_key(want)


def test_retention_removes_billed_hours_only(redis, tmp_path):
    w = Worker(tmp_path, redis, retention="1d", grace="5m")
    old = NOW_HOUR - 3 * 86400
    a = put(redis, "key-old", old, {"calls": 3})
    # one pass bills it; retention then deletes the billed key-hour
    assert w.once(old + 3600).returncode == 0
    assert w.lines() == [line(a, None, "calls", old, 3)]
    assert redis.keys("mtr:u:*") == [] and redis.keys("mtr:b:*") == []
    assert redis.keys("mtr:idx:*") == []
    assert redis.zrange_withscores("mtr:hours") == {}
    assert redis.hgetall("mtr:{worker}:settled") == {}


def test_meterctl_usage(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 3600
    a = put(redis, "u-a", h, {"calls|%s.1" % EPOCH: 3,
                              "calls|%s.2" % EPOCH: 4, "bytes": 9})
    b = put(redis, "u-b", h - 3600, {"calls": 1})
    r = w.ctl("usage", "--json")
    assert r.returncode == 0
    got = json.loads(r.stdout)
    want = [{"key_hash": b, "hour": time.strftime("%Y-%m-%dT%H",
                                                   time.gmtime(h - 3600)),
             "meter": "calls", "value": 1}]
    want += sorted([{"key_hash": a, "hour": time.strftime(
        "%Y-%m-%dT%H", time.gmtime(h)), "meter": m, "value": v}
        for m, v in (("calls", 7), ("bytes", 9))], key=lambda d: d["meter"])
    assert got == want

    r = subprocess.run([str(METERCTL), "usage", "--redis", redis.address,
                        "--hour", want[0]["hour"], "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == want[:1]

    r = subprocess.run([str(METERCTL), "usage", "--redis", redis.address],
                       capture_output=True, text=True)
    assert r.returncode == 0
    rows = [ln.split() for ln in r.stdout.splitlines()]
    assert rows[0] == ["HOUR", "KEY_HASH", "METER", "VALUE"]
    assert rows[1:] == [[d["hour"], d["key_hash"], d["meter"], str(d["value"])]
                        for d in want]


# ------------------------------------------------------------ crashes

def lock_expired(redis):
    """A SIGKILLed worker leaves its lock; it expires after lock_ttl."""
    wait_for(lambda: redis.cmd("EXISTS", "mtr:{worker}:lock") == 0,
             timeout=15)


def test_sigkill_mid_drain_file_each_record_once(redis, tmp_path):
    w = Worker(tmp_path, redis, lock_ttl="5s")
    h = NOW_HOUR - 7 * 3600
    want = []
    # several chunks (the drain writes up to 500 lines with one fsync)
    n = 3000
    for i in range(n):
        kh = put(redis, "ck-%d" % i, h, {"calls": 2 * i + 1})
        want.append(line(kh, None, "calls", h, 2 * i + 1))

    for kills in range(2):
        lock_expired(redis)
        p = w.spawn("--once", "--before", iso(h + 3600))
        n0 = len(w.lines())
        wait_for(lambda: len(w.lines()) > n0 + 20 or p.poll() is not None,
                 timeout=60)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert 0 < len(w.lines()) < n, "the kills did not land mid-drain"

    lock_expired(redis)
    assert w.once(h + 3600).returncode == 0
    assert by_key(w.lines()) == by_key(want)
    audit = read_jsonl(w.audit)
    assert len(audit) == len({x["idempotency_key"] for x in audit}) == n
    assert redis.keys("mtr:{worker}:r:*") == []


def stripe_worker(tmp_path, redis, stripe, key, **settings):
    """A worker billing the Stripe fake (api key key), retrying fast."""
    keyfile = tmp_path / "stripe-key"
    keyfile.write_text(key + "\n")
    return Worker(tmp_path, redis, provider="stripe",
                  stripe__base_url=stripe.url, stripe__api_key_file=keyfile,
                  retry__base="1s", retry__max="2s", lock_ttl="5s",
                  **settings)


def stripe_customer(redis, cust, provider_customer, key):
    redis.cmd("HSET", "mtr:cust:{%s}" % cust, "provider", "stripe",
              "provider_customer", provider_customer)
    redis.cmd("HSET", "mtr:key:{%s}" % key_hash(key), "customer", cust)


def sigkill_twice_mid_drain(redis, w, before, sent):
    """Two --once passes, each SIGKILLed once sent() grew by 5."""
    for kills in range(2):
        lock_expired(redis)
        p = w.spawn("--once", "--before", iso(before))
        n0 = sent()
        wait_for(lambda: sent() > n0 + 5 or p.poll() is not None,
                 timeout=60)
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_sigkill_mid_drain_stripe_each_record_once(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_w1", delay=0.02).start()
    try:
        w = stripe_worker(tmp_path, redis, stripe, "sk_test_w1",
                          meter__calls="api_calls")
        h = NOW_HOUR - 2 * 3600
        want = stripe_usage(redis, "sk", 80, h, 3)

        sigkill_twice_mid_drain(redis, w, h + 3600,
                                lambda: len(stripe.events))
        assert 0 < len(stripe.events) < 80

        lock_expired(redis)
        assert w.once(h + 3600).returncode == 0
        for cus, total in want.items():
            assert stripe.total(cus, "api_calls") == total, cus
        # every record went out under one identifier only
        idents = [e["identifier"] for e in stripe.events]
        assert len(idents) == len(set(idents)) == 80
        assert sorted(idents) == sorted(idem(h, "c%03d" % i, "calls")
                                        for i in range(80))
    finally:
        stripe.stop()


# ------------------------------------------------------------ errors

def test_dead_letter_then_meterctl_retry(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_w1").start()
    try:
        keyfile = tmp_path / "stripe-key"
        keyfile.write_text("sk_test_w1\n")
        w = Worker(tmp_path, redis, provider="stripe",
                   stripe__base_url=stripe.url,
                   stripe__api_key_file=keyfile, meter__calls="api_calls")
        h = NOW_HOUR - 2 * 3600
        for c in ("alpha", "beta"):
            w.ctl("customers", "add", c, "--provider", "stripe",
                  "--provider-customer", "cus_" + c)
            w.ctl("keys", "add", "dk-" + c, "--customer", c)
        put(redis, "dk-alpha", h, {"calls": 5})
        put(redis, "dk-beta", h, {"calls": 8})
        put(redis, "dk-nobody", h, {"calls": 2})

        # alpha's record is refused; beta's goes through
        stripe.fail_next(1, 400, match=lambda req:
                         "cus_alpha" in req.body.decode())
        r = w.once(h + 3600)
        assert r.returncode == 65
        assert stripe.total("cus_alpha", "api_calls") == 0
        assert stripe.total("cus_beta", "api_calls") == 8

        st = json.loads(w.ctl("status", "--json").stdout)
        assert [d["customer"] for d in st["dead"]] == ["alpha"]
        assert st["dead"][0]["quantity"] == 5
        assert st["dead"][0]["http_status"] == 400
        assert "Scripted error 400" in st["dead"][0]["last_error"]
        assert st["open"] == []
        # a key without customer is held, not sent, not dropped
        assert st["keys_without_customer"] == [key_hash("dk-nobody")]

        # more usage of alpha waits behind its dead letter, never lost
        put(redis, "dk-alpha", h, {"calls|%s.9" % EPOCH: 1})
        assert w.once(h + 3600).returncode == 0
        assert stripe.total("cus_alpha", "api_calls") == 0

        dead = st["dead"][0]["id"]
        # the cause is fixed (Stripe does not keep the answers of requests
        # that failed validation under their Idempotency-Key)
        stripe.idem.clear()
        assert w.ctl("retry", "0" * 32).returncode == 65
        r = w.ctl("retry", dead)
        assert r.returncode == 0 and "requeued 1 record" in r.stdout
        assert w.once(h + 3600).returncode == 0
        assert stripe.total("cus_alpha", "api_calls") == 6
        assert stripe.total("cus_beta", "api_calls") == 8

        # the held key gets a customer: billed on the next pass
        w.ctl("customers", "add", "gamma", "--provider", "stripe",
              "--provider-customer", "cus_gamma")
        w.ctl("keys", "add", "dk-nobody", "--customer", "gamma")
        assert w.once(h + 3600).returncode == 0
        assert stripe.total("cus_gamma", "api_calls") == 2
        st = json.loads(w.ctl("status", "--json").stdout)
        assert st["dead"] == [] and st["keys_without_customer"] == []
        assert st["records_sent"] == 4 and st["quantity_sent"] == 16
    finally:
        stripe.stop()


def test_500_is_retried_in_the_same_run(redis, tmp_path):
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_w1").start()
    try:
        keyfile = tmp_path / "stripe-key"
        keyfile.write_text("sk_test_w1\n")
        w = Worker(tmp_path, redis, provider="stripe",
                   stripe__base_url=stripe.url, stripe__max_attempts=1,
                   stripe__api_key_file=keyfile, retry__base="1s",
                   retry__max="1s")
        h = NOW_HOUR - 2 * 3600
        w.ctl("customers", "add", "r1", "--provider-customer", "cus_r1")
        w.ctl("keys", "add", "rk-1", "--customer", "r1")
        put(redis, "rk-1", h, {"calls": 12})
        stripe.fail_next(2, 500)
        r = w.once(h + 3600)
        assert r.returncode == 0
        assert stripe.total("cus_r1", "calls") == 12
        assert len(stripe.requests_to("POST", "meter_events")) >= 3
    finally:
        stripe.stop()


def test_record_older_than_stripe_accepts_is_dead_lettered(redis, tmp_path):
    keyfile = tmp_path / "stripe-key"
    keyfile.write_text("sk_test_w1\n")
    w = Worker(tmp_path, redis, provider="stripe",
               stripe__base_url="http://127.0.0.1:9",
               stripe__api_key_file=keyfile)
    h = NOW_HOUR - 40 * 86400
    w.ctl("customers", "add", "old", "--provider-customer", "cus_old")
    w.ctl("keys", "add", "ok-1", "--customer", "old")
    put(redis, "ok-1", h, {"calls": 3})
    assert w.once(h + 3600).returncode == 65
    st = json.loads(w.ctl("status", "--json").stdout)
    assert len(st["dead"]) == 1
    assert "max_age" in st["dead"][0]["last_error"]


def test_config_errors_name_file_and_line(redis, tmp_path):
    conf = tmp_path / "bad.conf"
    cases = [
        ("file.path = /tmp/x\n# ok\nfoo = 1\n", ':3: unknown key "foo"'),
        ("file.path = /tmp/x\ngrace = soon\n",
         ':2: invalid value "soon" for "grace"'),
        ("provider = nope\n", ':1: invalid value "nope" for "provider"'),
        ("redis = %s\nprovider = file\n" % redis.address,
         '"file.path" is required'),
    ]
    for text, msg in cases:
        conf.write_text(text)
        r = subprocess.run([str(WORKER), "-c", str(conf), "--once"],
                           capture_output=True, text=True)
        assert r.returncode == 78, text
        assert str(conf) + msg in r.stderr or msg in r.stderr, r.stderr
        assert r.stderr.startswith("<3>")

    conf.write_text("redis = %s\nfile.path = %s\n" % (redis.address,
                                                    tmp_path / "o.jsonl"))
    r = subprocess.run([str(WORKER), "-c", str(conf), "-t"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout

    for args in ([], ["-c"], ["-c", str(conf), "--once", "--before", "x"],
                 ["-c", str(conf), "--bogus"]):
        r = subprocess.run([str(WORKER)] + args, capture_output=True)
        assert r.returncode == 64, args

    # Redis down at start: 69
    conf.write_text("redis = 127.0.0.1:1\nfile.path = %s\n"
                    % (tmp_path / "o.jsonl"))
    r = subprocess.run([str(WORKER), "-c", str(conf), "--once"],
                       capture_output=True, text=True)
    assert r.returncode == 69


def test_lock_held_by_another_worker(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 3600 * 3
    put(redis, "lk", h, {"calls": 1})
    redis.cmd("SET", "mtr:{worker}:lock", "someone-else", "PX", "60000")
    r = w.once(h + 3600)
    assert r.returncode == 75
    assert w.lines() == []
    assert redis.cmd("GET", "mtr:{worker}:lock") in ("someone-else",
                                                     b"someone-else")
    redis.cmd("DEL", "mtr:{worker}:lock")
    assert w.once(h + 3600).returncode == 0
    assert len(w.lines()) == 1
    assert redis.cmd("EXISTS", "mtr:{worker}:lock") == 0


def test_dry_run_changes_nothing(redis, tmp_path):
    w = Worker(tmp_path, redis)
    h = NOW_HOUR - 3600 * 3
    kh = put(redis, "dry", h, {"calls": 4})
    r = w.once(h + 3600, "--dry-run")
    assert r.returncode == 0
    assert json.loads(r.stdout.splitlines()[0]) == {
        "would_send": True, "period_start": iso(h), "customer": None,
        "key_hash": kh, "meter": "calls", "quantity": 4}
    assert not w.out.exists()
    assert redis.keys("mtr:b:*") == [] and redis.keys("mtr:{worker}*") == []


# ------------------------------------------------------------ daemon

def test_daemon_notify_reload_and_sigterm(redis, tmp_path):
    w = Worker(tmp_path, redis, grace="1s")
    h = NOW_HOUR - 3 * 3600
    kh = put(redis, "dk", h, {"calls": 21})

    sock_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    p = w.spawn(env=env)
    try:
        msgs = []

        def got(text):
            def f():
                try:
                    msgs.append(ns.recv(4096).decode())
                except socket.timeout:
                    pass
                return any(text in m for m in msgs)
            return f

        wait_for(got("READY=1"), timeout=15)
        # catches up at start
        wait_for(lambda: w.lines(), timeout=15)
        assert w.lines() == [line(kh, None, "calls", h, 21)]

        # a broken config is refused, the old one stays
        good = w.conf.read_text()
        w.conf.write_text(good + "nonsense\n")
        msgs.clear()
        p.send_signal(signal.SIGHUP)
        wait_for(got("READY=1"), timeout=15)
        assert any("RELOADING=1" in m for m in msgs)
        assert p.poll() is None
        w.conf.write_text(good)

        # usage that arrives later is drained on the next pass (a good
        # reload triggers one)
        put(redis, "dk", h, {"calls|%s.5" % EPOCH: 2})
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: len(w.lines()) == 2, timeout=15)
        assert w.lines()[1] == line(kh, None, "calls", h, 2, seq=2)

        msgs.clear()
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        wait_for(got("STOPPING=1"), timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()
    log = (tmp_path / "worker.log").read_text()
    assert "reload failed, keeping the old config" in log
    assert ":%d: expected" % (len(good.splitlines()) + 1) in log
    for ln in log.splitlines():
        assert ln[:1] == "<" and ln[2:3] == ">", ln


def test_sigkill_after_provider_accepted_resends_same_key(redis, tmp_path):
    """The worst moment: the provider has the record, the worker dies before
    it heard so.  The restart resends the stored record under the same
    identifier and it counts once."""
    fakes = pytest.importorskip("fakes.stripe")
    stripe = fakes.FakeStripe(api_key="sk_test_w1").start()
    try:
        keyfile = tmp_path / "stripe-key"
        keyfile.write_text("sk_test_w1\n")
        w = Worker(tmp_path, redis, provider="stripe",
                   stripe__base_url=stripe.url, stripe__timeout="60s",
                   stripe__api_key_file=keyfile, lock_ttl="5s")
        h = NOW_HOUR - 2 * 3600
        w.ctl("customers", "add", "k1", "--provider-customer", "cus_k1")
        w.ctl("keys", "add", "kk-1", "--customer", "k1")
        put(redis, "kk-1", h, {"calls": 9})

        stripe.hang_next(1, seconds=30, after=True)
        p = w.spawn("--once", "--before", iso(h + 3600))
        wait_for(lambda: len(stripe.events) == 1, timeout=15)
        p.send_signal(signal.SIGKILL)
        p.wait()
        rec = redis.keys("mtr:{worker}:r:*")
        assert len(rec) == 1 and redis.hgetall(rec[0])["state"] == "sending"

        lock_expired(redis)
        assert w.once(h + 3600).returncode == 0
        assert stripe.total("cus_k1", "calls") == 9
        assert len(stripe.events) == 1
        idents = {r.form["identifier"]
                  for r in stripe.requests_to("POST", "meter_events")}
        assert idents == {idem(h, "k1", "calls")}
        assert redis.keys("mtr:{worker}:r:*") == []
    finally:
        stripe.stop()


# ------------------------------------------------------------ Redis AUTH, db

def test_redis_password_file_and_db(redis, tmp_path):
    """redis.password_file (AUTH) and redis.db (SELECT) for meter-worker and
    meterctl -c; a wrong password and an unreadable file are clear errors
    that never print the secret."""
    secret = "pw-worker-Only_in_the_file-51c2"
    redis.cmd("CONFIG", "SET", "requirepass", secret)
    redis.use(db=3, password=secret)
    pw = tmp_path / "redis-password"
    pw.write_text(secret + "\n")
    h = NOW_HOUR - 3 * 3600
    kh = put(redis, "key-pw", h, {"calls": 12})
    w = Worker(tmp_path / "w", redis, redis__password_file=pw,
               redis__db=3)
    r = w.once(NOW_HOUR)
    assert r.returncode == 0, r.stderr
    assert w.lines() == [line(kh, None, "calls", h, 12)]
    r = w.ctl("usage", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        {"key_hash": kh, "hour": time.strftime("%Y-%m-%dT%H",
                                               time.gmtime(h)),
         "meter": "calls", "value": 12}]
    # db 0 holds nothing: the worker and meterctl SELECTed 3
    redis.use(db=0, password=secret)
    assert redis.keys() == []

    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    bad = Worker(tmp_path / "bad", redis, redis__password_file=wrong)
    r = bad.once(NOW_HOUR)
    outs = [r]
    assert r.returncode == 69, r.stderr
    assert "redis: AUTH failed: WRONGPASS" in r.stderr, r.stderr
    r = bad.ctl("status")
    outs.append(r)
    assert r.returncode == 69, r.stderr
    assert "meterctl: redis: AUTH failed: WRONGPASS" in r.stderr, r.stderr

    gone = Worker(tmp_path / "gone", redis,
                  redis__password_file=tmp_path / "missing")
    r = gone.once(NOW_HOUR)
    outs.append(r)
    assert r.returncode == 69, r.stderr
    assert '/worker.conf: "redis.password_file": cannot open the file it ' \
        'names' in r.stderr, r.stderr
    r = gone.ctl("status")
    outs.append(r)
    assert r.returncode == 78, r.stderr
    assert "meterctl: Redis password: cannot open the file it names" \
        in r.stderr, r.stderr
    for r in outs:
        assert secret not in r.stdout + r.stderr
        assert "not-the-password" not in r.stdout + r.stderr
