"""Many requests in flight (issue 13): the worker keeps up to
PREFIX.max_in_flight requests open on one thread, never two Stripe
meter-event calls for the same customer and meter at once, pauses the whole
provider after a 429, and a SIGKILL with 50 requests open at the fake still
leaves every record billed exactly once.  The fakes count concurrency
(max_open), per-pair conflicts and accepted events by identifier."""

import os
import signal
import subprocess
import time

import pytest

from test_providers import (STRIPE_KEY, WORKER, Seed, Worker, hours_ago, iso,
                            now_hour)
from fakes import FakeStripe

pytestmark = pytest.mark.skipif(not WORKER.exists(),
                                reason="worker/meter-worker not built")


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def many_customers(redis, n, hours=(2,), twin_every=0):
    """n customers with one key each; every twin_every-th Stripe customer
    is shared by a second customer of ours ("t..."): two records of one
    Stripe customer and meter in the same hour.  Returns the Seed."""
    seed = Seed(redis)
    for i in range(n):
        names = ["c%04d" % i]
        if twin_every and i % twin_every == 0:
            names.append("t%04d" % i)
        for c in names:
            seed.customer(c, "stripe", provider_customer="cus_%04d" % i)
            k = "mk_conc_" + c
            seed.key(k, c)
            for h in hours:
                seed.usage(k, c, "calls", hours_ago(h), [i + 1, 2])
    return seed


def totals(fake, seed):
    """(Stripe customer's total, expected) by Stripe customer."""
    want = {}
    for (c, m), v in seed.expected.items():
        cus = "cus_" + c[1:]
        want[cus] = want.get(cus, 0) + v
    got = {cus: fake.total(cus, "api_calls") for cus in want}
    return got, want


def stripe_worker(tmp_path, redis, fake, **extra):
    settings = {"stripe.base_url": fake.url,
                "stripe.api_key_file": "@KEY@",
                "_api_key": STRIPE_KEY,
                "stripe.backoff": "50ms",
                "stripe.timeout": "5s",
                "stripe.max_rps": 0,
                "meter.calls": "api_calls",
                "lock_ttl": "5s"}
    settings.update(extra)
    return Worker(tmp_path / "worker", redis, "stripe", settings)


def test_many_in_flight_one_call_per_customer_and_meter(redis, tmp_path):
    # 60 Stripe customers, every 4th shared by two of ours (two records of
    # one pair in an hour), two hours: 150 records
    with FakeStripe(api_key=STRIPE_KEY, delay=0.2) as fake:
        seed = many_customers(redis, 60, hours=(2, 3), twin_every=4)
        w = stripe_worker(tmp_path, redis, fake,
                          **{"stripe.max_in_flight": 30})
        t0 = time.monotonic()
        r = w.run(now_hour())
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert len(fake.events) == 150
        assert fake.duplicates == 0
        got, want = totals(fake, seed)
        assert got == want
        # concurrent: one at a time would take 150 x 0.2 s = 30 s
        assert fake.max_open >= 20
        assert fake.max_open <= 30
        assert took < 20, took
        # never two calls of one customer and meter at once
        assert fake.pair_conflicts == 0
        # a rerun sends nothing
        n = len(fake.requests)
        assert w.run(now_hour()).returncode == 0
        assert len(fake.requests) == n


def test_max_in_flight_1_is_one_at_a_time(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY, delay=0.02) as fake:
        seed = many_customers(redis, 20)
        w = stripe_worker(tmp_path, redis, fake,
                          **{"stripe.max_in_flight": 1})
        assert w.run(now_hour()).returncode == 0
        got, want = totals(fake, seed)
        assert got == want
        assert fake.max_open == 1


def test_max_in_flight_config_errors(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        for bad in ("0", "1.5", "1001", "many"):
            w = stripe_worker(tmp_path / bad, redis, fake,
                              **{"stripe.max_in_flight": bad})
            r = w.run(now_hour())
            assert r.returncode != 0
            assert "stripe.max_in_flight" in r.stderr, r.stderr
        assert fake.requests == []


def test_429_pauses_every_request_then_all_billed(redis, tmp_path):
    """One 429 with Retry-After: 2 while 20 requests are open: the others
    finish, but no new request starts for the pause (no herd of retries),
    then everything is billed."""
    with FakeStripe(api_key=STRIPE_KEY, delay=0.05) as fake:
        seed = many_customers(redis, 200)
        w = stripe_worker(tmp_path, redis, fake,
                          **{"stripe.max_in_flight": 20})
        # the 30th request is refused (the first 29 pass)
        count = {"n": 0}

        def thirtieth(req):
            count["n"] += 1
            return count["n"] == 30
        fake.fail_next(1, 429, headers={"Retry-After": "2"},
                       match=thirtieth)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        got, want = totals(fake, seed)
        assert got == want
        assert len(fake.events) == 200
        times = sorted(q.time for q in fake.requests_to(
            "POST", r"/meter_events$"))
        assert len(times) == 201
        gaps = [b - a for a, b in zip(times, times[1:])]
        # the pause: one gap of about 2 s (less the 50 ms answers)
        assert max(gaps) >= 1.8, max(gaps)
        assert sum(g >= 1.0 for g in gaps) == 1


def test_absurd_retry_after_is_clamped(redis, tmp_path):
    """Retry-After of ~3 years: the record is not parked for it; it comes
    back after retry.max and is billed on the next pass."""
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed = many_customers(redis, 10)
        w = stripe_worker(tmp_path, redis, fake,
                          **{"stripe.max_in_flight": 5,
                             "stripe.retry_cap": "1s"})
        fake.fail_next(1, 429, headers={"Retry-After": "99999999"})
        t0 = time.monotonic()
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        # the provider paused retry_cap at most, and the record came back
        # after retry.max (2 s), not after the Retry-After
        assert time.monotonic() - t0 < 15
        assert "attempt 1, next in 2s" in r.stderr
        got, want = totals(fake, seed)
        assert got == want
        assert fake.duplicates == 0
        posts = fake.requests_to("POST", r"/meter_events$")
        assert len(posts) == 11


@pytest.mark.parametrize("processed", [False, True])
def test_sigkill_with_50_requests_open(redis, tmp_path, processed):
    """The fake holds every request (before processing it, or after: the
    event counted, the answer never sent); the worker is SIGKILLed with 50
    open, then run again: every record billed exactly once."""
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed = many_customers(redis, 120)
        w = stripe_worker(tmp_path, redis, fake,
                          **{"stripe.max_in_flight": 50,
                             "stripe.timeout": "60s"})
        fake.hold(after=processed)
        env = dict(os.environ)
        env.pop("CREDENTIALS_DIRECTORY", None)
        p = subprocess.Popen([str(WORKER), "-c", str(w.conf), "--once",
                              "--before", iso(now_hour())],
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
        try:
            assert wait_for(lambda: fake.held >= 50, timeout=30)
            time.sleep(0.2)
            assert fake.held == 50          # max_in_flight
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
        assert len(fake.events) == (50 if processed else 0)
        fake.release()
        # 50 records were open ("sending") when the worker died
        assert wait_for(lambda: fake.held == 0, timeout=10)
        assert wait_for(lambda: redis.cmd(
            "EXISTS", "mtr:{worker}:lock") == 0, timeout=15)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        got, want = totals(fake, seed)
        assert got == want
        idents = [e["identifier"] for e in fake.events]
        assert len(idents) == len(set(idents)) == 120
        if processed:
            # resent under their keys: Stripe replayed the saved answers
            replays = [q for q in fake.requests_to("POST", r"/meter_events$")
                       if q.headers["Idempotency-Key"] in
                       {e["identifier"] for e in fake.events[:50]}]
            assert len(replays) == 100
        assert redis.keys("mtr:{worker}:r:*") == []


def stream_worker(tmp_path, redis, fake, **extra):
    return stripe_worker(tmp_path, redis, fake,
                         **dict({"stripe.mode": "meter_event_stream",
                                 "stripe.stream_url": fake.url}, **extra))


def test_stream_100_events_per_request(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY, delay=0.05) as fake:
        seed = many_customers(redis, 250)
        w = stream_worker(tmp_path, redis, fake)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        got, want = totals(fake, seed)
        assert got == want
        assert sorted(fake.stream_requests) == [50, 100, 100]
        assert len(fake.requests_to("POST", r"/meter_event_session$")) == 1
        assert fake.max_open >= 3


def test_stream_one_bad_event_refused_alone(redis, tmp_path):
    """The stream answers for a request as a whole: a 400 for a request of
    many events is resent one event per request, so that only the bad
    one is dead-lettered."""
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed = many_customers(redis, 30)
        bad = "cus_0007"

        def has_bad(req):
            return any(e["payload"]["stripe_customer_id"] == bad
                       for e in (req.json or {}).get("events", []))
        fake.fail_next(2, 400, match=has_bad)
        w = stream_worker(tmp_path, redis, fake)
        r = w.run(now_hour())
        assert r.returncode == 65, r.stderr
        got, want = totals(fake, seed)
        want[bad] = 0
        assert got == want
        assert fake.stream_requests.count(1) == 29
        assert len(redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")) == 1


def test_stream_session_renewed_before_expiry(redis, tmp_path):
    """A session that expires in 60 s is renewed before use (a minute
    early), from expires_at, not an assumed 15 minutes."""
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        fake.session_ttl = 60
        seed = many_customers(redis, 10, hours=(2, 3))
        w = stream_worker(tmp_path, redis, fake)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        got, want = totals(fake, seed)
        assert got == want
        # two hours, two requests: each with a new session, and none
        # refused as expired
        assert len(fake.requests_to("POST", r"/meter_event_session$")) == 2
        assert len(fake.requests_to("POST", r"/meter_event_stream$")) == 2


def test_resumed_records_go_concurrently(redis, tmp_path):
    """200 records whose first send fails (503, stripe.max_attempts 1) go
    to retry; the resume pass sends them concurrently under their SAME
    identifiers (Stripe replays the saved 503 for the header key: resent
    together under fresh header keys), each billed once; records already
    "sent" are finished without a request."""
    with FakeStripe(api_key=STRIPE_KEY, delay=0.05) as fake:
        seed = many_customers(redis, 200)
        # retry.base past --once's wait: the run ends with them open
        w = stripe_worker(tmp_path, redis, fake,
                          **{"stripe.max_in_flight": 20,
                             "stripe.max_attempts": 1,
                             "retry.base": "10m", "retry.max": "1h"})
        w.conf.write_text("".join(
            l for l in w.conf.read_text().splitlines(True)
            if l not in ("retry.base = 1s\n", "retry.max = 2s\n")))
        fake.fail_next(200, 503)
        r = w.run(now_hour())
        assert r.returncode == 75, r.stderr     # EX_TEMPFAIL: retries wait
        assert "records wait for a retry" in r.stderr
        assert fake.events == []
        first = fake.requests_to("POST", r"/meter_events$")
        assert len(first) == 200
        keys = {p.form["identifier"] for p in first}
        assert len(keys) == 200
        assert int(redis.cmd("ZCARD", "mtr:{worker}:open")) == 200
        # ten as a crash right after the provider's OK leaves them
        done = sorted(keys)[:10]
        done_cus = set()
        for k in done:
            redis.cmd("HSET", "mtr:{worker}:r:" + k, "state", "sent")
            c = redis.cmd("HGET", "mtr:{worker}:r:" + k, "customer")
            done_cus.add("cus_" + (c.decode() if isinstance(c, bytes)
                                   else c)[1:])
        # the retries come due (as time passing would make them)
        for k in keys:
            redis.cmd("ZADD", "mtr:{worker}:open", "1", k)
        fake.max_open = 0
        t0 = time.monotonic()
        r = w.run(now_hour())
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        again = fake.requests_to("POST", r"/meter_events$")[200:]
        # the saved 503 replayed once per key, then a fresh header key
        assert len(again) == 2 * 190
        # the same identifiers, never a "sent" one
        assert {p.form["identifier"] for p in again} == keys - set(done)
        assert all(p.headers["Idempotency-Key"].startswith(
            p.form["identifier"]) for p in again)
        assert fake.max_open > 1
        assert fake.max_open <= 20
        assert fake.pair_conflicts == 0
        # one at a time: 380 x 50 ms = 19 s
        assert took < 12, took
        assert len(fake.events) == 190
        assert fake.duplicates == 0
        # the ten "sent" ones were finished, not billed again
        got, want = totals(fake, seed)
        assert {c for c in got if got[c] == 0} == done_cus
        assert all(got[c] == want[c] for c in got if c not in done_cus)
        assert int(redis.cmd("ZCARD", "mtr:{worker}:open")) == 0
        assert redis.cmd("KEYS", "mtr:{worker}:r:*") in (None, [])
        # nothing left: a rerun sends nothing
        n = len(fake.requests)
        assert w.run(now_hour()).returncode == 0
        assert len(fake.requests) == n
