"""Metronome through the real worker binary: usage seeded in a real Redis
as the module writes it, `meter-worker --once --before ...`, and the fake
of POST /v1/ingest (t/fakes/metronome.py).  The totals of what the fake
matched to each Metronome customer must equal the seeded usage exactly,
through batches of 100, 500s, 429s, a lost answer, a refused event, and a
resend past the 34-day transaction_id window (dead-lettered, not sent)."""

import os
import re
import subprocess
import time

import pytest

from conftest import key_hash
from fakes import FakeMetronome
from test_providers import WORKER, Seed, Worker, hours_ago, now_hour

pytestmark = pytest.mark.skipif(not WORKER.exists(),
                                reason="worker/meter-worker not built")

TOKEN = "mt_test_token_0123456789"
OPEN = "mtr:{worker}:open"
DEAD = "mtr:{worker}:dead"


def seed_metronome(redis, tmp_path, ncust=3, fake_customers=None, **extra):
    """ncust customers, "c000".."cNNN": even ones mapped by their Metronome
    id, odd ones by an ingest alias; "calls" two hours ago (two writers),
    "bytes" three hours ago for the first three."""
    seed = Seed(redis)
    customers = {}              # ours -> Metronome customer id
    for i in range(ncust):
        c = "c%03d" % i
        mid = "8f0c%04d-0000-4000-8000-00000000%04d" % (i, i)
        customers[c] = mid
        fake_customers[mid] = {"acct-%s" % c}
        seed.customer(c, "metronome", provider_customer=mid if i % 2 == 0
                      else "acct-%s" % c)
        seed.key("mk_live_%s" % c, c)
        seed.usage("mk_live_%s" % c, c, "calls", hours_ago(2),
                   [100 + i, 7 * i + 1])
        if i < 3:
            seed.usage("mk_live_%s" % c, c, "bytes", hours_ago(3),
                       [10000 + i])
    seed.key("mk_orphan", None)
    seed.usage("mk_orphan", None, "calls", hours_ago(2), [999])
    settings = {"metronome.base_url": "@URL@",
                "metronome.api_key_file": "@KEY@",
                "_api_key": TOKEN,
                "metronome.backoff": "50ms",
                "metronome.timeout": "2s",
                "meter.calls": "api_calls",
                "meter.bytes": "api_bytes"}
    settings.update(extra)
    return seed, customers, settings


def totals(fake, seed, customers):
    names = {"calls": "api_calls", "bytes": "api_bytes"}
    return {(c, m): fake.total(customers[c], names[m])
            for (c, m) in seed.expected}


def worker(redis, tmp_path, fake, settings):
    s = {k: (v.replace("@URL@", fake.url) if isinstance(v, str) else v)
         for k, v in settings.items()}
    return Worker(tmp_path / "worker", redis, "metronome", s)


def ingests(fake):
    return fake.requests_to("POST", r"^/v1/ingest$")


def no_secret_in(runs):
    for r in runs:
        assert TOKEN not in r.stdout and TOKEN not in r.stderr


def test_metronome_batches_exact_totals_rerun_sends_nothing(redis, tmp_path):
    cust = {}
    with FakeMetronome(token=TOKEN, customers=cust) as fake:
        seed, customers, settings = seed_metronome(redis, tmp_path, ncust=130,
                                          fake_customers=cust)
        w = worker(redis, tmp_path, fake, settings)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert totals(fake, seed, customers) == seed.expected
        assert fake.unmatched == []
        assert fake.duplicates == 0
        # 130 "calls" records of one hour: a chunk of 100 and one of 30;
        # 3 "bytes" records of another hour
        posts = ingests(fake)
        assert sorted(len(p.json) for p in posts) == [3, 30, 100]
        assert len(fake.events) == 133
        for p in posts:
            assert p.headers["Authorization"] == "Bearer " + TOKEN
            assert p.headers["Content-Type"] == "application/json"
            assert "Idempotency-Key" not in p.headers
        ids = [e["transaction_id"] for e in fake.events]
        assert len(set(ids)) == 133
        assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in ids)
        # the audit log names the same keys: transaction_id = record key
        audit = (tmp_path / "worker" / "audit.jsonl").read_text()
        assert all(t in audit for t in ids)
        assert all(e["timestamp"].endswith(":59:59Z") for e in fake.events)
        assert all(set(e["properties"]) == {"value", "meter", "key_hash"}
                   and isinstance(e["properties"]["value"], str)
                   for e in fake.events)
        # the key without customer is held, not sent
        assert all(e["properties"]["value"] != "999" for e in fake.events)
        # a rerun sends nothing
        n = len(fake.requests)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert len(fake.requests) == n
        no_secret_in(w.runs)


def test_metronome_500_and_429_retried(redis, tmp_path):
    cust = {}
    with FakeMetronome(token=TOKEN, customers=cust) as fake:
        seed, customers, settings = seed_metronome(redis, tmp_path,
                                          fake_customers=cust)
        w = worker(redis, tmp_path, fake, settings)
        # a 500, a 429 with Retry-After, a 429 without it, a 503
        fake.fail_next(1, 500)
        fake.rate_limit_next(1, retry_after=1)
        fake.fail_next(1, 429)
        fake.fail_next(1, 503)
        t0 = time.time()
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert totals(fake, seed, customers) == seed.expected
        assert len(fake.events) == 6 and fake.duplicates == 0
        assert time.time() - t0 >= 1          # Retry-After honoured
        # retried as they were: the same batch body each time
        posts = ingests(fake)
        assert posts[0].json == posts[1].json == posts[2].json


def test_metronome_lost_answer_counts_once(redis, tmp_path):
    cust = {}
    with FakeMetronome(token=TOKEN, customers=cust) as fake:
        seed, customers, settings = seed_metronome(
            redis, tmp_path, fake_customers=cust,
            **{"metronome.timeout": "1s"})
        w = worker(redis, tmp_path, fake, settings)
        # the first batch is stored, its answer lost: resent, deduped
        fake.hang_next(1, seconds=3, after=True)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert totals(fake, seed, customers) == seed.expected
        posts = ingests(fake)
        assert posts[0].json == posts[1].json
        assert fake.duplicates == len(posts[0].json)
        assert len(fake.events) == 6


def test_metronome_refused_event_dead_lettered_others_billed(redis,
                                                             tmp_path):
    cust = {}
    with FakeMetronome(token=TOKEN, customers=cust) as fake:
        seed, customers, settings = seed_metronome(redis, tmp_path, ncust=5,
                                          fake_customers=cust)
        w = worker(redis, tmp_path, fake, settings)
        bad = customers["c002"]
        fake.fail_next(10, 400, body={"message": "customer_id %s is not "
                                      "allowed" % bad},
                       match=lambda q: any(e.get("customer_id") == bad
                                           for e in q.json or []))
        r = w.run(now_hour())
        assert r.returncode == 65, r.stderr
        assert "is not allowed" in r.stderr
        got = totals(fake, seed, customers)
        want = {k: (0 if k[0] == "c002" else v)
                for k, v in seed.expected.items()}
        assert got == want
        # each refused batch (the older hour's 3, then 5) was sent again
        # in halves, down to the refused event
        posts = ingests(fake)
        assert [len(p.json) for p in posts] == [3, 1, 2, 1, 1, 5, 2, 3, 1, 2]
        dead = redis.zrange_withscores(DEAD)
        assert len(dead) == 2                 # c002's calls and bytes
        for rid in dead:
            rec = redis.hgetall("mtr:{worker}:r:%s" % rid)
            assert rec["customer"] == "c002"
            assert rec["http_status"] == "400"
        # c002's usage stays unbilled in Redis (nothing lost)
        kh = key_hash("mk_live_c002")
        assert redis.keys("mtr:b:{%s}:*" % kh) == []


def test_metronome_too_old_for_metronome(redis, tmp_path):
    """An hour 34 days back passes max_age by the worker's clock, but
    Metronome's clock is 3 h ahead: its 400 dead-letters the record."""
    cust = {}
    with FakeMetronome(token=TOKEN, customers=cust) as fake:
        seed, customers, settings = seed_metronome(redis, tmp_path, ncust=1,
                                          fake_customers=cust)
        old = hours_ago(0) - 34 * 86400 + 3600
        seed.usage("mk_live_c000", "c000", "calls", old, [5])
        fake.clock = 3 * 3600
        w = worker(redis, tmp_path, fake, settings)
        r = w.run(now_hour())
        assert r.returncode == 65, r.stderr
        assert "more than 34 days in the past" in r.stderr
        assert len(fake.events) == 2
        assert len(redis.zrange_withscores(DEAD)) == 1


def lose_answers(redis, tmp_path, created_ago):
    """Every send's answer is lost once; then the open records' first send
    is moved created_ago seconds back and the worker runs again."""
    cust = {}
    fake = FakeMetronome(token=TOKEN, customers=cust).start()
    seed, customers, settings = seed_metronome(
        redis, tmp_path, ncust=2, fake_customers=cust,
        **{"metronome.timeout": "1s", "metronome.max_attempts": "1"})
    w = worker(redis, tmp_path, fake, settings)
    # retries far enough out that --once leaves them open (exit 75): the
    # jitter spreads a retry over [base/2, base], and --once waits for
    # retries due within 60 s, so base/2 must be well past a minute
    text = w.conf.read_text().replace("retry.base = 1s", "retry.base = 10m")
    w.conf.write_text(text.replace("retry.max = 2s", "retry.max = 20m"))
    fake.hang_next(2, seconds=3, after=True)
    r = w.run(now_hour())
    assert r.returncode == 75, r.stderr
    # processed by Metronome, unknown to the worker: still open
    opened = redis.zrange_withscores(OPEN)
    assert len(opened) == 4
    assert totals(fake, seed, customers) == seed.expected
    now = int(time.time())
    for rid in opened:
        redis.cmd("HSET", "mtr:{worker}:r:%s" % rid, "created",
                  str(now - created_ago), "next_attempt", str(now))
        redis.cmd("ZADD", OPEN, str(now), rid)
    n = len(ingests(fake))
    r = w.run(now_hour())
    return fake, seed, customers, w, r, n, opened


def test_metronome_resend_inside_window_is_deduped(redis, tmp_path):
    fake, seed, customers, w, r, n, opened = lose_answers(
        redis, tmp_path, 33 * 86400)
    try:
        assert r.returncode == 0, r.stderr
        assert len(ingests(fake)) > n                 # resent
        assert fake.duplicates == 4                   # and ignored
        assert totals(fake, seed, customers) == seed.expected
        assert redis.zrange_withscores(OPEN) == {}
        assert redis.zrange_withscores(DEAD) == {}
    finally:
        fake.stop()


def test_metronome_past_window_dead_lettered_not_resent(redis, tmp_path):
    fake, seed, customers, w, r, n, opened = lose_answers(
        redis, tmp_path, 35 * 86400)
    try:
        assert r.returncode == 65, r.stderr
        assert len(ingests(fake)) == n                # nothing resent
        assert fake.duplicates == 0
        assert totals(fake, seed, customers) == seed.expected
        dead = redis.zrange_withscores(DEAD)
        assert set(dead) == set(opened)
        for rid in dead:
            err = redis.hgetall("mtr:{worker}:r:%s" % rid)["last_error"]
            assert "past Metronome's 34-day transaction_id window" in err
    finally:
        fake.stop()


def check(tmp_path, lines):
    conf = tmp_path / "t.conf"
    conf.write_text("\n".join(["provider = metronome",
                               "audit.path = %s" % (tmp_path / "a.jsonl")]
                              + lines) + "\n")
    env = dict(os.environ)
    env.pop("CREDENTIALS_DIRECTORY", None)
    return subprocess.run([str(WORKER), "-c", str(conf), "-t"],
                          capture_output=True, text=True, timeout=30,
                          env=env)


def test_metronome_test_config(tmp_path):
    key = tmp_path / "key"
    key.write_text(TOKEN + "\n")
    r = check(tmp_path, [])
    assert r.returncode == 78
    assert "metronome.api_key_file: required" in r.stderr
    r = check(tmp_path, ["metronome.api_key_file = %s" % key,
                         "metronome.batch_size = 500"])
    assert r.returncode == 78
    assert "metronome.batch_size" in r.stderr and "at most 100" in r.stderr
    r = check(tmp_path, ["metronome.api_key_file = %s" % key,
                         "webhook.listen = 127.0.0.1:1"])
    assert r.returncode == 78
    assert "takes no webhooks" in r.stderr
    r = check(tmp_path, ["metronome.api_key_file = %s" % key,
                         "metronome.batch_size = 50",
                         "metronome.value_property = requests"])
    assert r.returncode == 0, r.stderr
    for r in (check(tmp_path, ["metronome.api_key_file = %s" % key]),):
        assert TOKEN not in r.stdout + r.stderr


def test_metronome_customer_added_by_meterctl(redis, tmp_path):
    """meterctl customers add --provider metronome: the ingest alias in
    --provider-customer is what the events carry."""
    meterctl = WORKER.parent / "meterctl"
    r = subprocess.run([str(meterctl), "--redis", redis.address, "customers",
                        "add", "acme", "--provider", "metronome",
                        "--provider-customer", "acct-acme"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cust = {"8f0c0000-0000-4000-8000-00000000aaaa": {"acct-acme"}}
    with FakeMetronome(token=TOKEN, customers=cust) as fake:
        seed = Seed(redis)
        seed.key("mk_live_acme", "acme")
        seed.usage("mk_live_acme", "acme", "calls", hours_ago(2), [41, 1])
        w = Worker(tmp_path / "worker", redis, "metronome", {
            "metronome.base_url": fake.url,
            "metronome.api_key_file": "@KEY@", "_api_key": TOKEN})
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert [e["customer_id"] for e in fake.events] == ["acct-acme"]
        assert fake.total("8f0c0000-0000-4000-8000-00000000aaaa",
                          "calls") == 42
