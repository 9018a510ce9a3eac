"""The whole pipeline: real nginx with the module (2 workers) -> real
redis-server -> `meter-worker --once` -> fake Stripe.  Customers and keys are
set up with meterctl; what Stripe bills must equal, per customer and meter,
the responses the clients actually received."""

import subprocess
import time
from collections import Counter

import pytest

from conftest import ROOT, Traffic, expect_totals
from fakes import FakeStripe
from test_providers import WORKER, Worker, iso, now_hour

METERCTL = ROOT / "worker" / "meterctl"

pytestmark = pytest.mark.skipif(not METERCTL.exists(),
                                reason="worker/meterctl not built")

STRIPE_KEY = "sk_test_e2e_pipeline_42"

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;

    server {
        listen 127.0.0.1:@PORT2@;
        location = /s/200 { return 200 "{\"score\":712}\n"; }
        location = /s/404 { return 404; }
    }

    server {
        listen 127.0.0.1:@PORT@;
        location /getCreditScore {
            meter zone=api calls status=200;
            meter zone=api scores status=200 method=POST;
            proxy_pass http://127.0.0.1:@PORT2@/s/$arg_s;
        }
    }
"""

CUSTOMERS = {"acme": "cus_ACME", "globex": "cus_GLOBEX"}
KEYS = {"mk_live_e2e_acme_1": "acme", "mk_live_e2e_acme_2": "acme",
        "mk_live_e2e_globex": "globex"}


def meterctl(redis, *args):
    r = subprocess.run([str(METERCTL), "--redis", redis.address] + list(args),
                       capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_nginx_to_stripe_exact(redis, nginx_factory, tmp_path):
    for c, cus in CUSTOMERS.items():
        meterctl(redis, "customers", "add", c, "--provider", "stripe",
                 "--provider-customer", cus, "--subscription", "sub_" + c)
    for k, c in KEYS.items():
        meterctl(redis, "keys", "add", k, "--customer", c)

    hour0 = now_hour()
    n = nginx_factory(CONF, redis=redis.address)
    plan = []
    for k in KEYS:
        for method in ("GET", "POST"):
            for s in ("200", "200", "404"):
                plan.append((method, "/getCreditScore?s=" + s,
                             {"X-Api-Key": k}, (k, method)))
    t = Traffic(n.port, plan, threads=3, limit=len(plan) * 4).run()
    assert not t.failed

    want_keys = Counter()
    want = Counter()
    for ((k, method), status), count in t.ok.items():
        if status != 200:
            continue
        want_keys[(k, "calls")] += count
        want[(KEYS[k], "calls")] += count
        if method == "POST":
            want_keys[(k, "scores")] += count
            want[(KEYS[k], "scores")] += count
    expect_totals(redis, want_keys)
    if now_hour() != hour0:
        pytest.skip("crossed an hour boundary during the traffic")

    with FakeStripe(api_key=STRIPE_KEY) as fake:
        worker = Worker(tmp_path / "worker", redis, "stripe", {
            "stripe.base_url": fake.url,
            "stripe.api_key_file": "@KEY@",
            "_api_key": STRIPE_KEY,
            "meter.calls": "api_calls",
            "meter.scores": "credit_scores"})
        # the hour still running counts as closed for this run
        r = worker.run(hour0 + 3600)
        assert r.returncode == 0, r.stderr

        names = {"calls": "api_calls", "scores": "credit_scores"}
        got = {(c, m): fake.total(CUSTOMERS[c], names[m]) for (c, m) in want}
        assert got == dict(want)
        # one event per (customer, meter) of the hour, each timestamp
        # inside it and not in the future
        assert len(fake.events) == len(want)
        for ev in fake.events:
            assert hour0 <= int(ev["timestamp"]) <= time.time()

        # a second run bills nothing more
        sent = len(fake.events)
        r = worker.run(hour0 + 3600)
        assert r.returncode == 0, r.stderr
        assert len(fake.events) == sent

    out = meterctl(redis, "usage", "--hour", iso(hour0)[:13], "--json")
    assert STRIPE_KEY not in out
    for k in KEYS:
        assert k not in out
