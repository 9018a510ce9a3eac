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

import pytest

from fakes import FakeChargebee, FakeRecurly, FakeStripe
from test_providers import (CB_KEY, RK, STRIPE_KEY, WORKER, Seed, Worker,
                            hours_ago, pytestmark)  # noqa: F401

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
        assert v.startswith("1 active ")
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
