"""The provider request budget (issue 13): requests by path for a drain of
N customers x M hours, one pass per hour (the daemon's hourly turns, here
`meter-worker --once`), against the fakes, asserted exactly.  Chargebee's
per-pass subscription fetch is cached in Redis (mtr:{worker}:cb:sub:*):
its subscription GETs are N for the whole drain, not N x M.  Recurly and
Stripe make no lookup per record on a first send; Stripe's late-invoice
check reads a subscription once per pass for usage older than its grace.

bench/provider_budget.py prints the same counts for larger N and M.
"""

import re
import time

from fakes import FakeChargebee, FakeRecurly, FakeStripe
from test_providers import (CB_KEY, RK, STRIPE_KEY, Seed, Worker, hours_ago,
                            iso, pytestmark)  # noqa: F401

ITEM = "calls-USD-Monthly"

# a request's path, its ids folded, e.g. "GET /api/v2/subscriptions/*"
FOLD = [
    (r"^(/api/v2/subscriptions/)[^/?]+", r"\1*"),
    (r"^(/subscriptions/)[^/?]+(/add_ons/)[^/?]+", r"\1*\2*"),
    (r"^(/v1/subscriptions/)[^/?]+", r"\1*"),
]


def by_path(fake):
    counts = {}
    with fake.lock:
        reqs = list(fake.requests)
    for r in reqs:
        p = r.path.split("?")[0]
        for rx, rep in FOLD:
            p = re.sub(rx, rep, p)
        k = "%s %s" % (r.method, p)
        counts[k] = counts.get(k, 0) + 1
    return counts


def drain(provider, redis, tmp_path, n, m, extra=None, before_pass=None):
    """n customers, one key each, usage in m closed hours, one pass per
    hour; (fake, seed, counts by path, passes' results)."""
    fakes = {"chargebee": lambda: FakeChargebee(api_key=CB_KEY),
             "recurly": lambda: FakeRecurly(api_key=RK),
             "stripe": lambda: FakeStripe(api_key=STRIPE_KEY)}
    fake = fakes[provider]().start()
    seed = Seed(redis)
    hours = [hours_ago(m + 1 - i) for i in range(m)]
    names = ["c%03d" % i for i in range(n)]
    for c in names:
        if provider == "chargebee":
            fake.add_subscription("sub_" + c, customer_id="cust_" + c,
                                  item_prices=[ITEM])
            seed.customer(c, provider, provider_customer="cust_" + c,
                          subscription="sub_" + c)
        elif provider == "recurly":
            fake.add_subscription("sub_" + c, add_ons=["api_calls"])
            seed.customer(c, provider, provider_customer="acct_" + c,
                          subscription="sub_" + c)
        else:
            cus = fake.add_customer()
            sub = fake.add_subscription(cus["id"])
            seed.customer(c, provider, provider_customer=cus["id"],
                          subscription=sub["id"])
        seed.key("key_" + c, c)
        for j, h in enumerate(hours):
            seed.usage("key_" + c, c, "calls", h, [10 + j])
    if provider == "chargebee":
        settings = {"chargebee.base_url": fake.url,
                    "chargebee.api_key_file": "@KEY@", "_api_key": CB_KEY,
                    "chargebee.max_rps": 0, "chargebee.backoff": "50ms",
                    "report_period": "hour", "meter.calls": ITEM}
    elif provider == "recurly":
        settings = {"recurly.base_url": fake.url,
                    "recurly.api_key_file": "@KEY@", "_api_key": RK,
                    "recurly.max_rps": 0, "recurly.backoff": "50ms",
                    "meter.calls": "api_calls"}
    else:
        settings = {"stripe.base_url": fake.url,
                    "stripe.api_key_file": "@KEY@", "_api_key": STRIPE_KEY,
                    "stripe.max_rps": 0, "stripe.backoff": "50ms",
                    "meter.calls": "api_calls"}
    settings.update(extra or {})
    worker = Worker(tmp_path / "w", redis, provider, settings)
    runs = []
    for i, h in enumerate(hours):
        if before_pass is not None:
            before_pass(i, fake)
        # the pass after hour h closed (grace 5m)
        r = worker.run(h + 3600 + 600, timeout=600)
        assert r.returncode == 0, r.stderr
        runs.append(r)
    return fake, seed, by_path(fake), runs


def test_chargebee_subscription_fetched_once_per_ttl(redis, tmp_path):
    """100 customers x 3 hours: 300 usages, 100 subscription GETs (300
    without the cache), nothing else."""
    fake, seed, counts, _ = drain("chargebee", redis, tmp_path, 100, 3)
    try:
        print("chargebee 100x3 cached:", counts)
        assert counts == {"POST /api/v2/subscriptions/*/usages": 300,
                          "GET /api/v2/subscriptions/*": 100}
        for c in ("c000", "c042", "c099"):
            assert fake.total("sub_" + c, ITEM) == 10 + 11 + 12
        assert fake.unbillable() == []
        # the cache entries: bounded, no secret in them
        keys = redis.keys("mtr:{worker}:cb:sub:*")
        assert len(keys) == 100
        ttl = int(redis.cmd("TTL", "mtr:{worker}:cb:sub:sub_c007"))
        assert 0 < ttl <= 6 * 3600
        v = redis.cmd("GET", "mtr:{worker}:cb:sub:sub_c007").decode()
        assert re.match(r"^1\.[0-9a-f]{8} active \d+ \d+ \d+ 0 0 -$", v), v
        assert CB_KEY not in v
    finally:
        fake.stop()


def test_chargebee_without_cache_fetches_every_pass(redis, tmp_path):
    """chargebee.subscription_ttl = 0: the old cost, one GET per
    subscription and pass."""
    fake, seed, counts, _ = drain("chargebee", redis, tmp_path, 20, 3,
                                  {"chargebee.subscription_ttl": "0"})
    try:
        print("chargebee 20x3 uncached:", counts)
        assert counts == {"POST /api/v2/subscriptions/*/usages": 60,
                          "GET /api/v2/subscriptions/*": 60}
        assert redis.keys("mtr:{worker}:cb:sub:*") == []
    finally:
        fake.stop()


def test_recurly_one_request_per_record(redis, tmp_path):
    fake, seed, counts, _ = drain("recurly", redis, tmp_path, 20, 3)
    try:
        print("recurly 20x3:", counts)
        assert counts == {"POST /subscriptions/*/add_ons/*/usage": 60}
        assert fake.total("sub_c003", "api_calls") == 10 + 11 + 12
    finally:
        fake.stop()


def test_stripe_one_request_per_record_and_late_checks(redis, tmp_path):
    """Meter events need no lookup; the hours here are older than the
    invoice grace (1 h), so each pass checks every subscription's period
    once (bounded per chunk, cached in the process for 10 minutes)."""
    fake, seed, counts, _ = drain("stripe", redis, tmp_path, 20, 3)
    try:
        print("stripe 20x3 (late):", counts)
        assert counts == {"POST /v1/billing/meter_events": 60,
                          "GET /v1/subscriptions/*": 60}
    finally:
        fake.stop()


# ------------------------------------------- a subscription replaced


def cb_setup(redis, tmp_path, fake, names, **extra):
    from test_reconcile import RSeed
    seed = RSeed(redis)         # with mtr:ckeys, for meterctl reconcile
    for c in names:
        fake.add_subscription("sub_" + c, customer_id="cust_" + c,
                              item_prices=[ITEM])
        seed.customer(c, "chargebee", provider_customer="cust_" + c,
                      subscription="sub_" + c)
        seed.key("key_" + c, c)
    settings = {"chargebee.base_url": fake.url,
                "chargebee.api_key_file": "@KEY@", "_api_key": CB_KEY,
                "chargebee.max_rps": 0, "chargebee.backoff": "50ms",
                "report_period": "hour", "meter.calls": ITEM}
    settings.update(extra)
    return seed, Worker(tmp_path / "w", redis, "chargebee", settings)


def ours(fake, sid):
    """(usage id, quantity) of our usages on sid, sorted."""
    with fake.lock:
        return sorted((u["id"], int(u["quantity"])) for u in fake.usages
                      if u["subscription_id"] == sid)


def test_chargebee_deleted_subscription_followed_to_the_new_one(
        redis, tmp_path):
    """The cached subscription is deleted at Chargebee and the customer
    given a new one: the usage POST's 404 drops the cache, the old one is
    asked (404), the customer's active subscription found and billed; the
    next pass goes there at once.  Every record billed once, none lost."""
    with FakeChargebee(api_key=CB_KEY) as fake:
        names = ["c0", "c1", "c2"]
        seed, worker = cb_setup(redis, tmp_path, fake, names)
        hours = [hours_ago(4), hours_ago(3), hours_ago(2)]
        for c in names:
            for j, h in enumerate(hours):
                seed.usage("key_" + c, c, "calls", h, [100 + j])

        r = worker.run(hours[0] + 3600 + 600)
        assert r.returncode == 0, r.stderr
        assert by_path(fake) == {
            "POST /api/v2/subscriptions/*/usages": 3,
            "GET /api/v2/subscriptions/*": 3}

        # replaced at Chargebee: the old one deleted, a new one started
        fake.remove_subscription("sub_c0")
        fake.add_subscription("sub_c0_new", customer_id="cust_c0",
                              item_prices=[ITEM], started_at=hours[1])
        # another customer's subscription, and one without the item price:
        # never taken
        fake.add_subscription("sub_other", customer_id="cust_c1",
                              item_prices=[ITEM])
        fake.add_subscription("sub_c0_misc", customer_id="cust_c0",
                              item_prices=["seats-USD-Monthly"],
                              started_at=hours[1])
        fake.requests.clear()
        r = worker.run(hours[1] + 3600 + 600)
        assert r.returncode == 0, r.stderr
        assert "usage of customer \"cust_c0\" goes to its subscription " \
            "\"sub_c0_new\"" in r.stderr
        counts = by_path(fake)
        print("pass 2:", counts)
        # 3 usages + the one answered 404; the deleted one asked once; the
        # list gives the new one whole (no GET of it)
        assert counts == {"POST /api/v2/subscriptions/*/usages": 4,
                          "GET /api/v2/subscriptions/*": 1,
                          "GET /api/v2/subscriptions": 1}
        assert [r.path for r in fake.requests_to("GET", r"^/api/v2/sub")] \
            == ["/api/v2/subscriptions/sub_c0",
                "/api/v2/subscriptions"]

        fake.requests.clear()
        r = worker.run(hours[2] + 3600 + 600)
        assert r.returncode == 0, r.stderr
        assert by_path(fake) == {"POST /api/v2/subscriptions/*/usages": 3}
        assert [p.path for p in fake.requests_to("POST", "sub_c0")] == \
            ["/api/v2/subscriptions/sub_c0_new/usages"]

        # billed once each, where Chargebee bills them
        assert [q for _, q in ours(fake, "sub_c0")] == [100]
        assert sorted(q for _, q in ours(fake, "sub_c0_new")) == [101, 102]
        for c in ("c1", "c2"):
            assert sorted(q for _, q in ours(fake, "sub_" + c)) == \
                [100, 101, 102]
        assert ours(fake, "sub_other") == [] == ours(fake, "sub_c0_misc")
        # 3 x 3 usage ids, each once
        assert len({u["id"] for u in fake.usages}) == len(fake.usages) == 9
        assert fake.unbillable() == []
        assert redis.cmd("ZCARD", "mtr:{worker}:dead") == 0
        v = redis.cmd("GET", "mtr:{worker}:cb:sub:sub_c0").decode()
        assert re.match(r"^1\.[0-9a-f]{8} gone 0 0 0 0 0 sub_c0_new$", v), v

        # meterctl reconcile counts what went to the successor too
        from test_reconcile import reconcile
        r, rows = reconcile(worker, "--from", iso(hours[0]), "--to",
                            iso(hours[2] + 3600))
        assert r.returncode == 0, r.stderr
        a = rows[("c0", "calls")]
        assert (a["counted"], a["billed"], a["provider"]) == (303, 303, 303)


def test_chargebee_cancelled_subscription_webhook_then_new_one(
        redis, tmp_path):
    """A subscription_cancelled webhook drops the cached subscription; the
    next pass finds it cancelled before the usage and bills the customer's
    new subscription.  Without a successor the usage is dead-lettered with
    the reason, never sent to where Chargebee would not bill it."""
    from conftest import free_port, wait_for
    from fakes import chargebee as cbfake
    from test_sync import Billing

    with FakeChargebee(api_key=CB_KEY) as fake:
        names = ["c0", "c1"]
        seed, worker = cb_setup(redis, tmp_path, fake, names)
        h1, h2 = hours_ago(3), hours_ago(2)
        for c in names:
            seed.usage("key_" + c, c, "calls", h1, [7])
        r = worker.run(h1 + 3600 + 600)
        assert r.returncode == 0, r.stderr
        assert redis.cmd("GET", "mtr:{worker}:cb:sub:sub_c0") \
            .decode().split()[1] == "active"

        # c0 moves to a new subscription from h2 on; c1's is cancelled
        # with nothing after it
        fake.cancel("sub_c0", at=h2)
        fake.add_subscription("sub_c0_new", customer_id="cust_c0",
                              item_prices=[ITEM], started_at=h2)
        fake.cancel("sub_c1", at=h2)

        # the listener (nothing to drain yet) gets the webhooks
        pw = tmp_path / "cbpw"
        pw.write_text("hook-pw\n")
        wh = free_port()
        b = Billing(tmp_path / "d", redis, "chargebee", fake,
                    sync__delinquency="off",
                    webhook__listen="127.0.0.1:%d" % wh,
                    chargebee__webhook_user="hooks",
                    chargebee__webhook_password_file=pw,
                    report_period="hour", meter__calls=ITEM)
        b.start(port=wh)
        try:
            url = "http://127.0.0.1:%d/webhooks/chargebee" % wh
            for c in names:
                st, _ = cbfake.send_webhook(
                    url, "subscription_cancelled",
                    {"subscription": dict(fake.subscriptions["sub_" + c]),
                     "customer": {"id": "cust_" + c}}, "hooks", "hook-pw")
                assert st == 200
            wait_for(lambda: redis.cmd("EXISTS", "mtr:{worker}:cb:sub:sub_c0",
                                       "mtr:{worker}:cb:sub:sub_c1") == 0, 5)
        finally:
            b.stop()
        assert "hook-pw" not in b.log()

        for c in names:
            seed.usage("key_" + c, c, "calls", h2, [11])
        fake.requests.clear()
        r = worker.run(h2 + 3600 + 600)
        assert r.returncode == 65, r.stderr
        assert [q for _, q in ours(fake, "sub_c0")] == [7]
        assert [q for _, q in ours(fake, "sub_c0_new")] == [11]
        assert [q for _, q in ours(fake, "sub_c1")] == [7]
        assert fake.unbillable() == []
        dead = redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")
        assert len(dead) == 1
        rec = redis.hgetall("mtr:{worker}:r:%s" % dead[0].decode())
        assert rec["quantity"] == "11" and rec["customer"] == "c1"
        assert "after subscription \"sub_c1\" was cancelled" in \
            rec["last_error"]
        # the cancelled one with its successor, the new one: cached again
        assert redis.cmd("GET", "mtr:{worker}:cb:sub:sub_c0").decode() \
            .endswith(" sub_c0_new")
        assert redis.cmd("GET", "mtr:{worker}:cb:sub:sub_c0_new") \
            .decode().split()[1] == "active"


def test_chargebee_cache_bounded_by_term_trial_and_site(redis, tmp_path):
    """An entry lives at most until its term ends, its trial ends or its
    pause resumes; one written for another Chargebee site (same Redis) is
    not used."""
    with FakeChargebee(api_key=CB_KEY) as fake:
        now = int(time.time())
        seed, worker = cb_setup(redis, tmp_path, fake, ["a", "b"])
        fake.subscriptions["sub_a"]["current_term_end"] = now + 7200
        fake.add_subscription("sub_t", customer_id="cust_t", status="in_trial",
                              item_prices=[ITEM], trial_end=now + 3000)
        seed.customer("t", "chargebee", provider_customer="cust_t",
                      subscription="sub_t")
        seed.key("key_t", "t")
        fake.add_subscription("sub_p", customer_id="cust_p", status="paused",
                              item_prices=[ITEM], pause_date=now - 86400,
                              resume_date=now + 4000)
        seed.customer("p", "chargebee", provider_customer="cust_p",
                      subscription="sub_p")
        seed.key("key_p", "p")
        # another site's word on sub_b: cancelled long ago
        redis.cmd("SET", "mtr:{worker}:cb:sub:sub_b",
                  "1.0badc0de cancelled 1 1 2 3 0 -", "EX", "3600")
        h = hours_ago(2)
        for c in ("a", "b", "t", "p"):
            seed.usage("key_" + c, c, "calls", h, [5])
        r = worker.run(h + 3600 + 600)
        assert r.returncode == 65, r.stderr     # in trial, paused
        assert sorted(p.path for p in fake.requests_to(
            "GET", r"^/api/v2/subscriptions/")) == [
            "/api/v2/subscriptions/sub_a", "/api/v2/subscriptions/sub_b",
            "/api/v2/subscriptions/sub_p", "/api/v2/subscriptions/sub_t"]
        assert fake.total("sub_a", ITEM) == fake.total("sub_b", ITEM) == 5
        assert fake.total("sub_t", ITEM) == fake.total("sub_p", ITEM) == 0
        assert redis.cmd("ZCARD", "mtr:{worker}:dead") == 2
        ttl = {s: int(redis.cmd("TTL", "mtr:{worker}:cb:sub:" + s))
               for s in ("sub_a", "sub_b", "sub_t", "sub_p")}
        assert 7000 < ttl["sub_a"] <= 7200
        assert 6 * 3600 - 100 < ttl["sub_b"] <= 6 * 3600
        assert 2800 < ttl["sub_t"] <= 3000
        assert 3800 < ttl["sub_p"] <= 4000
        ours_b = redis.cmd("GET", "mtr:{worker}:cb:sub:sub_b").decode()
        assert ours_b.split()[1] == "active"
        assert not ours_b.startswith("1.0badc0de ")
