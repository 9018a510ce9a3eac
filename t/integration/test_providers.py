"""End to end through the real worker binary: usage seeded in a real Redis
the way the module writes it, `meter-worker --once --before ...`, and a
provider fake.  The fake's deduped totals must equal the seeded usage
exactly, per customer and meter, through 500s, 429s, lost answers and
reruns; a 400 is dead-lettered, not dropped."""

import datetime
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, key_hash
from fakes import (FakeChargebee, FakeLago, FakeOpenMeter, FakeRecurly,
                   FakeStripe)

WORKER = Path(os.environ.get("METER_WORKER",
                           ROOT / "worker" / "meter-worker"))
METERCTL = ROOT / "worker" / "meterctl"
EPOCH = "3f2a9c0d11b2e4f7"

pytestmark = pytest.mark.skipif(not WORKER.exists(),
                                reason="worker/meter-worker not built")


def hour_name(ts):
    return datetime.datetime.fromtimestamp(
        ts, datetime.timezone.utc).strftime("%Y%m%d%H")


def iso(ts):
    return datetime.datetime.fromtimestamp(
        ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Seed:
    """Writes usage, keys and customers as the module and meterctl do, and
    keeps the expected totals."""

    def __init__(self, redis):
        self.redis = redis
        self.expected = {}          # (customer, meter) -> total
        self.gen = 0

    def customer(self, name, provider, **fields):
        args = ["provider", provider, "status", "active", "created",
                str(int(time.time()))]
        for k, v in fields.items():
            args += [k.replace("__", "."), v]
        self.redis.cmd("HSET", "mtr:cust:{%s}" % name, *args)
        self.redis.cmd("SADD", "mtr:customers", name)

    def key(self, key, customer):
        kh = key_hash(key)
        if customer is not None:
            self.redis.cmd("HSET", "mtr:key:{%s}" % kh, "customer", customer,
                           "prefix", key[:12], "created",
                           str(int(time.time())))
        return kh

    def usage(self, key, customer, meter, hour_ts, values, billable=True):
        """One key-hour of a meter, counted by len(values) writers."""
        kh = key_hash(key)
        h = hour_name(hour_ts)
        args = []
        for v in values:
            self.gen += 1
            args += ["%s|%s.%d" % (meter, EPOCH, self.gen), str(v)]
        self.redis.cmd("SADD", "mtr:idx:%s" % h, kh)
        self.redis.cmd("ZADD", "mtr:hours", "NX", str(hour_ts), h)
        self.redis.cmd("HSET", "mtr:u:{%s}:%s" % (kh, h), *args)
        if customer is not None and billable:
            k = (customer, meter)
            self.expected[k] = self.expected.get(k, 0) + sum(values)


class Worker:
    def __init__(self, tmp, redis, provider, settings):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        key = self.tmp / "api-key"
        key.write_text("%s\n" % settings.pop("_api_key", "unused"))
        key.chmod(0o600)
        lines = ["# written by test_providers.py",
                 "redis = %s" % redis.address,
                 "provider = %s" % provider,
                 "grace = 5m",
                 "retry.base = 1s",
                 "retry.max = 2s",
                 "log_level = debug",
                 "audit.path = %s" % (self.tmp / "audit.jsonl")]
        for k, v in settings.items():
            lines.append("%s = %s" % (k, str(v).replace("@KEY@", str(key))))
        self.conf = self.tmp / "worker.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.runs = []

    def run(self, before, timeout=120):
        env = dict(os.environ)
        env.pop("CREDENTIALS_DIRECTORY", None)
        r = subprocess.run([str(WORKER), "-c", str(self.conf), "--once",
                            "--before", iso(before)],
                           capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL)
        self.runs.append(r)
        print("---- meter-worker rc=%d\n%s" % (r.returncode, r.stderr))
        return r


def hours_ago(n):
    return (int(time.time()) // 3600 - n) * 3600


def now_hour():
    return (int(time.time()) // 3600) * 3600


def no_secret_in(runs, secret):
    for r in runs:
        assert secret not in r.stdout and secret not in r.stderr


# ---------------------------------------------------------------- stripe

STRIPE_KEY = "sk_test_e2e_0123456789"


def stripe_setup(redis, tmp_path, fake, **extra):
    seed = Seed(redis)
    customers = {"acme": "cus_A", "globex": "cus_B", "initech": "cus_C"}
    for c, cus in customers.items():
        seed.customer(c, "stripe", provider_customer=cus,
                      subscription="sub_" + c)
    # two keys for acme, one each for the others; two meters; three hours
    keys = {"mk_live_acme_1": "acme", "mk_live_acme_2": "acme",
            "mk_live_globex": "globex", "mk_live_initech": "initech"}
    for k, c in keys.items():
        seed.key(k, c)
    n = 0
    for h in (hours_ago(2), hours_ago(3), hours_ago(27)):
        for k, c in keys.items():
            n += 1
            seed.usage(k, c, "calls", h, [100 + n, 7 * n, 1])
            if c != "initech":
                seed.usage(k, c, "bytes", h, [10000 + n])
    # a key without customer: held, never sent to Stripe
    seed.key("mk_orphan", None)
    seed.usage("mk_orphan", None, "calls", hours_ago(2), [999])
    settings = {"stripe.base_url": fake.url,
                "stripe.api_key_file": "@KEY@",
                "_api_key": STRIPE_KEY,
                "stripe.backoff": "50ms",
                "stripe.timeout": "2s",
                "meter.calls": "api_calls",
                "meter.bytes": "api_bytes"}
    settings.update(extra)
    worker = Worker(tmp_path / "worker", redis, "stripe", settings)
    return seed, customers, worker


def stripe_totals(fake, seed, customers):
    names = {"calls": "api_calls", "bytes": "api_bytes"}
    return {(c, m): fake.total(customers[c], names[m])
            for (c, m) in seed.expected}


def test_stripe_totals_exact_and_rerun_sends_nothing(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed, customers, worker = stripe_setup(redis, tmp_path, fake)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert stripe_totals(fake, seed, customers) == seed.expected
        # one event per (customer, hour, meter): 3 x 3 calls + 2 x 3 bytes
        assert len(fake.events) == 15
        assert fake.duplicates == 0
        for ev in fake.events:
            req_ts = ev["timestamp"]
            assert req_ts % 3600 == 3599          # period_end - 1
        posts = fake.requests_to("POST", r"/v1/billing/meter_events")
        assert all(p.headers["Idempotency-Key"] == p.form["identifier"]
                   for p in posts)
        assert all(p.headers["Authorization"] == "Bearer " + STRIPE_KEY
                   for p in posts)
        # nothing is sent twice
        n = len(fake.requests)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert len(fake.requests) == n
        assert stripe_totals(fake, seed, customers) == seed.expected
        # the key without customer is held, not sent
        assert all(e["payload"]["value"] != "999" for e in fake.events)
        assert "held" in r.stderr
        no_secret_in(worker.runs, STRIPE_KEY)


def test_stripe_500_and_429_retried(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed, customers, worker = stripe_setup(redis, tmp_path, fake)
        # saved 500s (replayed under their key), then a 429 with
        # Retry-After, then a timeout
        fake.fail_next(2, 500)
        fake.rate_limit_next(1, retry_after=1)
        fake.fail_next(1, 503)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert stripe_totals(fake, seed, customers) == seed.expected
        assert len(fake.events) == 15
        # the saved 500s were replayed to the worker under their keys,
        # which then went on under fresh keys (the identifier dedupes)
        saved500 = {k for k, (_, _, resp) in fake.idem.items()
                    if resp.status == 500}
        assert len(saved500) == 2
        posts = fake.requests_to("POST", r"/v1/billing/meter_events")
        keys = [p.headers["Idempotency-Key"] for p in posts]
        assert sum(k in saved500 for k in keys) > 2
        fresh = [k for k in keys if "-r" in k]
        assert fresh and all(k.split("-r")[0] in
                             {p.form["identifier"] for p in posts}
                             for k in fresh)
        # the 429 was not saved: its key went through on the retry
        assert not any(resp.status == 429 for (_, _, resp)
                       in fake.idem.values())


def test_stripe_lost_answer_counts_once(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed, customers, worker = stripe_setup(
            redis, tmp_path, fake, **{"stripe.timeout": "1s"})
        # processed, then the answer never comes: twice
        fake.hang_next(2, seconds=3, after=True, match=r"/meter_events$")
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert stripe_totals(fake, seed, customers) == seed.expected
        assert len(fake.events) == 15
        # the two lost answers were resent under the same key and replayed
        keys = [p.headers["Idempotency-Key"]
                for p in fake.requests_to("POST", r"/meter_events$")]
        assert len(keys) == 17 and len(set(keys)) == 15


def test_stripe_400_dead_lettered_others_billed(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed, customers, worker = stripe_setup(redis, tmp_path, fake)
        bad = {"error": {"type": "invalid_request_error",
                         "code": "resource_missing",
                         "message": "No such customer: 'cus_B'"}}
        fake.fail_next(100, 400, body=bad, match=lambda q: q.form.get(
            "payload[stripe_customer_id]") == "cus_B")
        r = worker.run(now_hour())
        assert r.returncode == 65, r.stderr
        assert "No such customer" in r.stderr
        got = stripe_totals(fake, seed, customers)
        want = {k: (0 if k[0] == "globex" else v)
                for k, v in seed.expected.items()}
        assert got == want
        # globex's usage stays unbilled in Redis (nothing lost)
        kh = key_hash("mk_live_globex")
        billed = redis.hgetall("mtr:b:{%s}:%s" % (kh, hour_name(hours_ago(2))))
        assert all(not f.startswith("calls|") for f in billed)


def test_stripe_wrong_key_is_fatal_and_not_logged(redis, tmp_path):
    with FakeStripe(api_key="sk_test_other") as fake:
        seed, customers, worker = stripe_setup(redis, tmp_path, fake)
        r = worker.run(now_hour())
        assert r.returncode == 65, r.stderr
        assert "Invalid API Key" in r.stderr
        assert fake.events == []
        no_secret_in(worker.runs, STRIPE_KEY)


def test_stripe_meter_event_stream(redis, tmp_path):
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed, customers, worker = stripe_setup(
            redis, tmp_path, fake, **{"stripe.mode": "meter_event_stream",
                                      "stripe.stream_url": fake.url})
        # the session dies after the first request: renewed, nothing lost
        fake.expire_after = 1
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert stripe_totals(fake, seed, customers) == seed.expected
        assert len(fake.events) == 15
        sessions = fake.requests_to("POST", r"/meter_event_session$")
        assert len(sessions) == 2
        # one request per hour (its 5 events together), one resent after
        # the session expired
        streams = fake.requests_to("POST", r"/meter_event_stream$")
        assert len(streams) == 4
        assert sorted(len(q.json["events"]) for q in streams) == [5] * 4
        assert all(q.headers["Authorization"] != "Bearer " + STRIPE_KEY
                   for q in streams)
        assert all(e["timestamp"].endswith(":59:59Z")
                   for q in streams for e in q.json["events"])
        no_secret_in(worker.runs, STRIPE_KEY)
        for tok in fake.sessions:
            no_secret_in(worker.runs, tok)


@pytest.mark.parametrize("case", ["counted", "absent", "mismatch"])
def test_stripe_unknown_outcome_past_24h_read_back(redis, tmp_path, case):
    """A first send whose outcome is unknown, retried after Stripe forgot
    its identifier (Redis `created` 25 h back, the fake's clock 25 h on):
    Stripe's event summary decides.  It has the record: marked billed, not
    resent; nothing: resent once; another count: dead letter."""
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed = Seed(redis)
        seed.customer("acme", "stripe", provider_customer="cus_A",
                      subscription="sub_acme")
        kh = seed.key("mk_live_acme", "acme")
        h = hours_ago(2)
        seed.usage("mk_live_acme", "acme", "calls", h, [40, 2])
        fake.add_meter("api_calls")
        w = Worker(tmp_path / "w", redis, "stripe", {
            "stripe.base_url": fake.url, "stripe.api_key_file": "@KEY@",
            "_api_key": STRIPE_KEY, "stripe.backoff": "50ms",
            "stripe.timeout": "1s", "stripe.max_attempts": 1,
            "meter.calls": "api_calls"})
        # counted, mismatch: processed, the answer lost; absent: lost
        # before Stripe saw it
        fake.hang_next(1, seconds=3, after=(case != "absent"),
                       match=r"/meter_events$")
        if case == "mismatch":
            fake.add_event("api_calls", "cus_A", 5, h + 60)
        t = _age_first_send(redis, fake, 25 * 3600)
        r = w.run(now_hour())
        t.join()

        posts = fake.requests_to("POST", r"/v1/billing/meter_events$")
        summaries = fake.requests_to("GET", r"/event_summaries$")
        assert len(summaries) == 1
        assert summaries[0].q("customer") == "cus_A"
        assert (int(summaries[0].q("start_time")),
                int(summaries[0].q("end_time"))) == (h, h + 3600)
        billed = redis.hgetall("mtr:b:{%s}:%s" % (kh, hour_name(h)))
        if case == "mismatch":
            assert r.returncode == 65, r.stderr
            assert len(posts) == 1
            assert fake.total("cus_A", "api_calls") == 42 + 5
            assert billed == {}
            dead = redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")
            assert len(dead) == 1
            rec = redis.hgetall("mtr:{worker}:r:%s" % dead[0].decode())
            assert "Stripe counts 47 (sum)" in rec["last_error"]
            assert "this record 42" in rec["last_error"]
            assert "not resent" in rec["last_error"]
            return
        assert r.returncode == 0, r.stderr
        assert fake.total("cus_A", "api_calls") == 42
        assert len(fake.events) == 1
        assert len(posts) == (1 if case == "counted" else 2)
        assert "Stripe counts it already" in r.stderr \
            if case == "counted" else "resending" in r.stderr
        assert sorted(billed.values()) == ["2", "40"]
        assert redis.cmd("ZCARD", "mtr:{worker}:open") == 0
        # a rerun sends nothing
        n = len(fake.requests)
        assert w.run(now_hour()).returncode == 0
        assert len(fake.requests) == n


def test_stripe_late_invoice_warning_in_status(redis, tmp_path):
    """Usage of a billing period sent after that period's invoice was
    finalized (stripe.invoice_grace after the period ended) is listed by
    meterctl status; usage of the current period is not."""
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        seed = Seed(redis)
        # the subscription's current period began two hours ago
        fake.period_start = hours_ago(2)
        sub = fake.add_subscription("cus_A", prices=("price_1",))
        seed.customer("acme", "stripe", provider_customer="cus_A",
                      subscription=sub["id"])
        seed.key("mk_live_acme", "acme")
        seed.usage("mk_live_acme", "acme", "calls", hours_ago(3), [11])
        seed.usage("mk_live_acme", "acme", "calls", hours_ago(2), [13])
        w = Worker(tmp_path / "w", redis, "stripe", {
            "stripe.base_url": fake.url, "stripe.api_key_file": "@KEY@",
            "_api_key": STRIPE_KEY, "stripe.backoff": "50ms",
            "stripe.invoice_grace": "10m", "meter.calls": "api_calls"})
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert fake.total("cus_A", "api_calls") == 24
        assert "sent after the invoice of its period was finalized" in \
            r.stderr
        late = redis.cmd("ZRANGE", "mtr:{worker}:stripe:late", "0", "-1")
        assert len(late) == 1
        f = late[0].decode().split()
        assert f[1:] == ["acme", "calls", str(hours_ago(3)), "11",
                         str(hours_ago(2))]
        st = subprocess.run([str(METERCTL), "--redis", redis.address,
                             "status"], capture_output=True, text=True,
                            timeout=60)
        assert st.returncode == 0, st.stderr
        assert "warning: 1 record sent after the invoice of its period " \
            "was finalized (Stripe bills it on no invoice)" in st.stdout
        assert "  late %s" % late[0].decode() in st.stdout.splitlines()
        # --json too; and the count is of all of them, the list the latest 10
        for i in range(11):
            redis.cmd("ZADD", "mtr:{worker}:stripe:late", str(i), "x%d" % i)
        st = subprocess.run([str(METERCTL), "--redis", redis.address,
                             "status", "--json"], capture_output=True,
                            text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        js = json.loads(st.stdout)
        assert js["late_records"] == 12
        assert len(js["late_latest"]) == 10
        assert late[0].decode() in js["late_latest"]
        st = subprocess.run([str(METERCTL), "--redis", redis.address,
                             "status"], capture_output=True, text=True,
                            timeout=60)
        assert "warning: 12 records sent after" in st.stdout


# ---------------------------------------------------------------- chargebee

CB_KEY = "cb_test_key_42"


def test_chargebee_daily_totals(redis, tmp_path):
    with FakeChargebee(api_key=CB_KEY) as fake:
        seed = Seed(redis)
        day = (int(time.time()) // 86400) * 86400
        subs = {"acme": "sub_acme", "globex": "sub_globex"}
        for c, s in subs.items():
            seed.customer(c, "chargebee", provider_customer="cust_" + c,
                          subscription=s)
            fake.add_subscription(s, customer_id="cust_" + c,
                                  item_prices=["calls-USD-Monthly"])
            seed.key("key_" + c, c)
        n = 0
        # yesterday and the day before; today is not closed
        for h in (day - 3600, day - 5 * 3600, day - 30 * 3600):
            for c in subs:
                n += 1
                seed.usage("key_" + c, c, "calls", h, [50 * n, n])
        # today is not closed for a daily period: not billed yet
        seed.usage("key_acme", "acme", "calls", day, [12345],
                   billable=False)
        worker = Worker(tmp_path / "w", redis, "chargebee", {
            "chargebee.base_url": fake.url,
            "chargebee.api_key_file": "@KEY@", "_api_key": CB_KEY,
            "chargebee.max_rps": 0, "chargebee.backoff": "50ms",
            "meter.calls": "calls-USD-Monthly"})
        fake.fail_next(1, 500)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        for c, s in subs.items():
            assert fake.total(s, "calls-USD-Monthly") == \
                seed.expected[(c, "calls")]
        # nothing dated where Chargebee would store it unbilled
        assert fake.unbillable() == []
        # one usage per subscription and day: two closed days
        assert len(fake.usages) == 4
        for u in fake.usages:
            assert (u["usage_date"] // 86400) * 86400 in (day - 86400,
                                                         day - 2 * 86400)
        posts = fake.requests_to("POST", r"/usages$")
        assert all(p.headers["chargebee-idempotency-key"].startswith(
            p.form["id"]) for p in posts)
        # the 30-minute window passed: a resend is deduped by usage id
        fake.expire_idempotency()
        n = len(fake.usages)
        r = worker.run(now_hour())
        assert r.returncode == 0 and len(fake.usages) == n
        no_secret_in(worker.runs, CB_KEY)


def test_chargebee_dates_only_where_billed(redis, tmp_path):
    """Subscriptions started mid-hour, cancelled mid-period and invoiced
    and renewed between two drains: every usage is dated where Chargebee
    bills it (the fake flags the rest), totals exact, usage after the
    cancellation dead-lettered with the reason, a second taken by another
    writer skipped."""
    item = "calls-USD-Monthly"
    with FakeChargebee(api_key=CB_KEY) as fake:
        seed = Seed(redis)
        d1 = (int(time.time()) // 86400 - 1) * 86400    # yesterday
        d2 = d1 - 86400
        start = d1 + 10 * 3600 + 1234
        cancel = d2 + 12 * 3600 + 3
        subs = {"mid": "sub_mid", "gone": "sub_gone", "renew": "sub_renew"}
        for c, s in subs.items():
            seed.customer(c, "chargebee", provider_customer="cust_" + c,
                          subscription=s)
            seed.key("key_" + c, c)
        fake.add_subscription("sub_mid", customer_id="cust_mid",
                              item_prices=[item], started_at=start)
        fake.add_subscription("sub_gone", customer_id="cust_gone",
                              item_prices=[item])
        fake.add_subscription("sub_renew", customer_id="cust_renew",
                              item_prices=[item])
        fake.cancel("sub_gone", at=cancel)
        # the admin console records usage at the second the worker picks,
        # just before its POST
        taken = []

        def race(sid, form):
            if sid == "sub_gone" and not taken:
                taken.append(int(form["usage_date"]))
                fake.add_usage(sid, item, taken[0])
        fake.on_usage = race
        # mid: a day before its start, and the hours around it
        seed.usage("key_mid", "mid", "calls", d2 + 5 * 3600, [7])
        seed.usage("key_mid", "mid", "calls", d1 + 9 * 3600, [11, 2])
        seed.usage("key_mid", "mid", "calls", d1 + 10 * 3600, [13])
        # gone: the hour of its cancellation, then a day after it
        seed.usage("key_gone", "gone", "calls", d2 + 12 * 3600, [17, 19])
        seed.usage("key_gone", "gone", "calls", d1 + 3 * 3600, [23],
                   billable=False)
        # renew: the day before yesterday, sent before the renewal
        seed.usage("key_renew", "renew", "calls", d2 + 20 * 3600, [29])
        # no webhook tells of the renewal here: every pass fetches the
        # subscriptions (test_provider_budget.py covers the cache)
        worker = Worker(tmp_path / "w", redis, "chargebee", {
            "chargebee.base_url": fake.url,
            "chargebee.api_key_file": "@KEY@", "_api_key": CB_KEY,
            "chargebee.max_rps": 0, "chargebee.backoff": "50ms",
            "chargebee.subscription_ttl": "0", "meter.calls": item})

        # the day before yesterday closes
        r = worker.run(d1 + 600)
        assert r.returncode == 0, r.stderr
        assert len(fake.requests_to("GET", r"/subscriptions/[^/]+$")) == 3

        # the renew term is invoiced and renewed yesterday at 06:00; late
        # usage of the day before yesterday (in that invoiced term) arrives,
        # and yesterday's usage
        renewed = d1 + 6 * 3600
        fake.invoice_term("sub_renew", at=renewed)
        seed.usage("key_renew", "renew", "calls", d2 + 21 * 3600, [31])
        seed.usage("key_renew", "renew", "calls", d1 + 2 * 3600, [37])
        seed.usage("key_renew", "renew", "calls", d1 + 8 * 3600, [41])
        r = worker.run(now_hour())
        assert r.returncode == 65, r.stderr

        assert fake.unbillable() == []
        assert fake.total("sub_mid", item) == 7 + 13 + 13
        assert fake.total("sub_gone", item) == 17 + 19 + 1
        assert fake.total("sub_renew", item) == 29 + 31 + 37 + 41
        for c, s in subs.items():
            ours = sum(int(u["quantity"]) for u in fake.usages
                       if u["subscription_id"] == s and u["source"] == "api")
            assert ours == seed.expected[(c, "calls")]

        dates = {}
        for u in fake.usages:
            if u["source"] == "api":
                dates.setdefault(u["subscription_id"], []).append(
                    u["usage_date"])
        # mid: the day before its start in its first hour (with a note),
        # its own day in the hour it started, after the start
        mid = sorted(dates["sub_mid"])
        assert len(mid) == 2
        assert start <= mid[0] < start + 3600
        assert start <= mid[1] < d1 + 11 * 3600
        notes = [u["note"] for u in fake.usages
                 if u["subscription_id"] == "sub_mid" and u["note"]]
        assert notes == ["nginx-meter: usage of %s..%s, dated in the "
                         "current term" % (iso(d2 + 5 * 3600),
                                           iso(d2 + 6 * 3600))]
        # gone: in the three seconds before the cancellation, the one after
        # the second taken
        assert d2 + 12 * 3600 <= taken[0] < cancel
        assert dates["sub_gone"] == [taken[0] + 1 if taken[0] + 1 < cancel
                                     else d2 + 12 * 3600]
        assert any("-d" in p.headers["chargebee-idempotency-key"]
                   for p in fake.requests_to("POST",
                                             r"/sub_gone/usages$"))
        # renew: sent in its term; the late usage of the invoiced term in
        # the new term's first hour; yesterday in its last hour
        ren = sorted(dates["sub_renew"])
        assert len(ren) == 3
        assert d2 + 20 * 3600 <= ren[0] < d2 + 22 * 3600
        assert renewed <= ren[1] < renewed + 3600
        assert d1 + 8 * 3600 <= ren[2] < d1 + 9 * 3600

        # the usage after the cancellation waits in the dead letters
        dead = redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")
        assert len(dead) == 1
        rec = redis.hgetall("mtr:{worker}:r:%s" % dead[0].decode())
        assert rec["quantity"] == "23"
        assert "after subscription \"sub_gone\" was cancelled at %s" % \
            iso(cancel) in rec["last_error"]
        assert "never bill it" in rec["last_error"]
        no_secret_in(worker.runs, CB_KEY)


# ---------------------------------------------------------------- recurly

RK = "rk_test_e2e"


def test_recurly_lost_answer_looked_up_not_resent(redis, tmp_path):
    with FakeRecurly(api_key=RK) as fake:
        seed = Seed(redis)
        for c in ("acme", "globex"):
            fake.add_subscription("sub_" + c, add_ons=["api_calls"])
            seed.customer(c, "recurly", provider_customer="acct_" + c,
                          subscription="sub_" + c)
            seed.key("key_" + c, c)
            for i, h in enumerate((hours_ago(2), hours_ago(4))):
                seed.usage("key_" + c, c, "calls", h, [300 + i, 11])
        worker = Worker(tmp_path / "w", redis, "recurly", {
            "recurly.base_url": fake.url,
            "recurly.api_key_file": "@KEY@", "_api_key": RK,
            "recurly.timeout": "1s", "recurly.backoff": "50ms",
            "recurly.max_rps": 0, "meter.calls": "api_calls"})
        # the first usage is stored but its answer is lost; a 500 next
        fake.hang_next(1, seconds=3, after=True)
        fake.fail_next(1, 500)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        for c in ("acme", "globex"):
            assert fake.total("sub_" + c, "api_calls") == \
                seed.expected[(c, "calls")]
        assert len(fake.usages) == 4
        assert len(fake.requests_to("GET", r"/usage$")) >= 1
        tags = [u["merchant_tag"] for u in fake.usages]
        assert len(set(tags)) == 4


def recurly_setup(redis, tmp_path, fake, **extra):
    seed = Seed(redis)
    for c in ("acme", "globex"):
        fake.add_subscription("sub_" + c, add_ons=["api_calls"])
        seed.customer(c, "recurly", provider_customer="acct_" + c,
                      subscription="sub_" + c)
        seed.key("key_" + c, c)
        for i, h in enumerate((hours_ago(2), hours_ago(4))):
            seed.usage("key_" + c, c, "calls", h, [300 + i, 11])
    settings = {"recurly.base_url": fake.url,
                "recurly.api_key_file": "@KEY@", "_api_key": RK,
                "recurly.timeout": "1s", "recurly.backoff": "50ms",
                "recurly.max_rps": 0, "meter.calls": "api_calls"}
    settings.update(extra)
    return seed, Worker(tmp_path / "w", redis, "recurly", settings)


def recurly_exact(fake, seed):
    for c in ("acme", "globex"):
        assert fake.total("sub_" + c, "api_calls") == \
            seed.expected[(c, "calls")]
    assert len(fake.usages) == 4


def test_recurly_addon_code_prefix_and_idempotency_key(redis, tmp_path):
    with FakeRecurly(api_key=RK) as fake:
        seed, worker = recurly_setup(redis, tmp_path, fake)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        recurly_exact(fake, seed)
        posts = fake.requests_to("POST", r"/usage$")
        assert len(posts) == 4
        assert all("/add_ons/code-api_calls/" in p.path for p in posts)
        assert all(p.headers["Idempotency-Key"] == p.json["merchant_tag"]
                   for p in posts)


def test_recurly_invoiced_before_retry_not_resent(redis, tmp_path):
    """The first usage is stored, its answer lost, and invoiced before the
    retry: the lookup must see billed usage (billing_status=all)."""
    with FakeRecurly(api_key=RK) as fake:
        seed, worker = recurly_setup(redis, tmp_path, fake)
        fake.hang_next(1, seconds=3, after=True)
        done = threading.Event()

        def invoice():
            while not done.is_set():
                with fake.lock:
                    if fake.usages:
                        fake.invoice_usage(fake.usages[0]["subscription_id"])
                        return
                time.sleep(0.01)

        t = threading.Thread(target=invoice)
        t.start()
        try:
            r = worker.run(now_hour())
        finally:
            done.set()
            t.join()
        assert r.returncode == 0, r.stderr
        assert fake.usages[0]["billed_at"] is not None
        recurly_exact(fake, seed)
        gets = fake.requests_to("GET", r"/usage$")
        assert gets and all(g.q("billing_status") == "all"
                            and g.q("order") == "asc"
                            and g.q("sort") == "usage_timestamp"
                            and g.q("begin_time") for g in gets)


@pytest.mark.parametrize("style", ["url", "path"])
def test_recurly_lookup_follows_next(redis, tmp_path, style):
    with FakeRecurly(api_key=RK, next_style=style) as fake:
        seed, worker = recurly_setup(redis, tmp_path, fake)
        # other usage at the same instant: the lookup needs page 2
        for i in range(3):
            fake.usages.append({
                "id": "other%d" % i, "subscription_id": "sub_acme",
                "add_on_code": "api_calls", "amount": 0,
                "merchant_tag": "other%d" % i,
                "usage_timestamp": iso(hours_ago(4)),
                "recording_timestamp": iso(hours_ago(4)),
                "billed_at": None, "created_at": iso(hours_ago(5))})
        fake.max_limit = 2
        fake.hang_next(1, seconds=3, after=True,
                       match=lambda q: q.method == "POST"
                       and "sub_acme" in q.path
                       and q.json["usage_timestamp"] == iso(hours_ago(4)))
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert fake.total("sub_acme", "api_calls") == \
            seed.expected[("acme", "calls")]
        assert len(fake.usages) == 7
        cursors = [g.q("cursor") for g in fake.requests_to("GET", r"/usage$")]
        assert "2" in cursors


def test_recurly_rate_limit_reset_honoured(redis, tmp_path):
    """Recurly sends X-RateLimit-Remaining/Reset, no Retry-After: the
    worker waits for the reset instead of spending requests on 429s."""
    with FakeRecurly(api_key=RK, rate_limit=3, rate_window=2) as fake:
        seed, worker = recurly_setup(redis, tmp_path, fake)
        t0 = time.time()
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        recurly_exact(fake, seed)
        assert fake.limited == 0
        posts = fake.requests_to("POST", r"/usage$")
        assert posts[3].time - posts[0].time >= 1.0
        assert time.time() - t0 < 30


def test_recurly_429_waits_for_reset(redis, tmp_path):
    with FakeRecurly(api_key=RK) as fake:
        seed, worker = recurly_setup(redis, tmp_path, fake)
        fake.rate_limit_next(1, reset_in=2)
        r = worker.run(now_hour())
        assert r.returncode == 0, r.stderr
        recurly_exact(fake, seed)
        posts = fake.requests_to("POST", r"/usage$")
        assert len(posts) == 5
        assert posts[1].time - posts[0].time >= 1.0


# ---------------------------------------------------------------- http

def ingest_seed(redis):
    seed = Seed(redis)
    seed.customer("acme", "http", subscription="sub_acme",
                  provider_customer="acme")
    seed.key("key_acme", "acme")
    seed.usage("key_acme", "acme", "calls", hours_ago(2), [5, 6])
    seed.usage("key_acme", "acme", "calls", hours_ago(3), [7])
    return seed


def test_openmeter(redis, tmp_path):
    with FakeOpenMeter(token="om_tok") as om:
        seed = ingest_seed(redis)
        w = Worker(tmp_path / "om", redis, "http", {
            "http.url": om.url + "/api/v1/events", "http.format": "openmeter",
            "http.auth_file": "@KEY@", "_api_key": "om_tok",
            "http.backoff": "50ms", "meter.calls": "api-calls"})
        om.fail_next(1, 503)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert om.total("acme", "api-calls") == seed.expected[("acme",
                                                               "calls")]
        assert len(om.events) == 2
        assert {e["source"] for e in om.events} == {"nginx-meter"}
        assert {e["data"]["key_hash"] for e in om.events} == {
            key_hash("key_acme")}
        # a rerun sends nothing; a resend would be deduped by id + source
        n = len(om.requests)
        assert w.run(now_hour()).returncode == 0
        assert len(om.requests) == n


def test_lago_resend_after_lost_answer(redis, tmp_path):
    with FakeLago(token="lg_tok") as lg:
        seed = ingest_seed(redis)
        w = Worker(tmp_path / "lago", redis, "http", {
            "http.url": lg.url + "/api/v1/events", "http.format": "lago",
            "http.auth_file": "@KEY@", "_api_key": "lg_tok",
            "http.timeout": "1s", "http.backoff": "50ms"})
        # the first event is stored, its answer lost: the resend gets 422
        # value_already_exist, which counts as accepted
        lg.hang_next(1, seconds=3, after=True)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert lg.total("sub_acme", "calls") == seed.expected[("acme",
                                                               "calls")]
        assert len(lg.events) == 2
        posts = lg.requests_to("POST", r"/api/v1/events$")
        assert len(posts) == 3
        assert posts[0].json == posts[1].json


def _age_first_send(redis, fake, seconds):
    """Once the fake saw a request: every stored record's first send is
    made `seconds` older, and the fake's clock jumps as far ahead (its
    dedupe memory of that send expires)."""
    def run():
        deadline = time.time() + 20
        while time.time() < deadline and not fake.requests:
            time.sleep(0.01)
        for k in redis.cmd("KEYS", "mtr:{worker}:r:*") or []:
            redis.cmd("HSET", k, "created",
                      str(int(time.time()) - seconds))
        fake.now = lambda: time.time() + seconds
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("ttl,window", [(86400, "24h"), (None, "0")])
def test_openmeter_unknown_outcome_past_window_dead_lettered(
        redis, tmp_path, ttl, window):
    """A lost answer, and the retry only after OpenMeter's dedupe window
    (or with dedupe off): not resent blindly, dead-lettered with that
    reason; OpenMeter counted the usage once."""
    with FakeOpenMeter(token="om_tok", dedupe_ttl=ttl) as om:
        seed = ingest_seed(redis)
        w = Worker(tmp_path / "om", redis, "http", {
            "http.url": om.url + "/api/v1/events", "http.format": "openmeter",
            "http.auth_file": "@KEY@", "_api_key": "om_tok",
            "http.timeout": "1s", "http.backoff": "50ms",
            "http.max_attempts": 1,
            "http.dedupe_window": window, "meter.calls": "api-calls"})
        om.hang_next(1, seconds=3, after=True)
        t = _age_first_send(redis, om, 25 * 3600 if ttl else 5)
        r = w.run(now_hour())
        t.join()
        assert r.returncode == 65, r.stderr
        assert "dedupe window" in r.stderr
        assert om.total("acme", "api-calls") == seed.expected[("acme",
                                                               "calls")]
        assert len(om.events) == 2
        dead = redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")
        assert len(dead) == 1
        rec = redis.hgetall("mtr:{worker}:r:%s" % dead[0].decode())
        assert "dedupe window" in rec["last_error"]


def test_retry_resend_after_the_window(redis, tmp_path):
    """A first send that OpenMeter refused, retried only past the dedupe
    window: dead-lettered (the worker cannot tell a refusal from a lost
    answer), and a plain retry dead-letters it again; after a human checked OpenMeter has nothing, `meterctl retry
    --resend ID` sends it as a new record: counted once."""
    with FakeOpenMeter(token="om_tok", dedupe_ttl=86400) as om:
        seed = ingest_seed(redis)
        w = Worker(tmp_path / "om", redis, "http", {
            "http.url": om.url + "/api/v1/events", "http.format": "openmeter",
            "http.auth_file": "@KEY@", "_api_key": "om_tok",
            "http.timeout": "1s", "http.backoff": "50ms",
            "http.max_attempts": 1,
            "http.dedupe_window": "24h", "meter.calls": "api-calls"})
        want = seed.expected[("acme", "calls")]
        # refused, and the retry comes a day later: the worker cannot tell
        # a refusal from a lost answer, so it does not resend
        om.fail_next(1, status=503)
        t = _age_first_send(redis, om, 25 * 3600)
        r = w.run(now_hour())
        t.join()
        assert "dedupe window" in r.stderr, r.stderr
        dead = [d.decode() for d in
                redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")]
        before = om.total("acme", "api-calls")
        assert len(dead) == 1 and before < want

        def ctl(*args):
            return subprocess.run([str(METERCTL), "--redis", redis.address]
                                  + list(args), capture_output=True,
                                  text=True, timeout=20)

        # the same record again: dead-lettered again, nothing sent
        assert ctl("retry", dead[0]).returncode == 0
        w.run(now_hour())
        assert redis.cmd("ZSCORE", "mtr:{worker}:dead", dead[0]) is not None
        assert om.total("acme", "api-calls") == before
        # never for all at once
        assert ctl("retry", "--all", "--resend").returncode == 64
        # checked: OpenMeter has none of it; sent as new, counted once
        r = ctl("retry", "--resend", dead[0])
        assert r.returncode == 0, r.stderr
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert om.total("acme", "api-calls") == want
        assert redis.cmd("ZSCORE", "mtr:{worker}:dead", dead[0]) is None
        assert w.run(now_hour()).returncode == 0
        assert om.total("acme", "api-calls") == want


def test_openmeter_lost_answer_inside_window_deduped(redis, tmp_path):
    with FakeOpenMeter(token="om_tok") as om:
        seed = ingest_seed(redis)
        w = Worker(tmp_path / "om", redis, "http", {
            "http.url": om.url + "/api/v1/events",
            "http.auth_file": "@KEY@", "_api_key": "om_tok",
            "http.timeout": "1s", "http.backoff": "50ms",
            "meter.calls": "api-calls"})
        om.hang_next(1, seconds=3, after=True)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        assert om.total("acme", "api-calls") == seed.expected[("acme",
                                                               "calls")]
        assert om.duplicates == 1


def test_lago_clickhouse_overwrite_on_resend(redis, tmp_path):
    with FakeLago(token="lg_tok", pipeline="clickhouse") as lg:
        seed = ingest_seed(redis)
        w = Worker(tmp_path / "lago", redis, "http", {
            "http.url": lg.url + "/api/v1/events", "http.format": "lago",
            "http.auth_file": "@KEY@", "_api_key": "lg_tok",
            "http.timeout": "1s", "http.backoff": "50ms"})
        lg.hang_next(1, seconds=3, after=True)
        r = w.run(now_hour())
        assert r.returncode == 0, r.stderr
        # the resend carries the same timestamp: an overwrite, not a second
        # event
        assert lg.overwrites == 1 and len(lg.events) == 2
        assert lg.total("sub_acme", "calls") == seed.expected[("acme",
                                                               "calls")]


def test_lago_customer_without_subscription_is_an_error(redis, tmp_path):
    with FakeLago(token="lg_tok") as lg:
        seed = Seed(redis)
        seed.customer("nosub", "http", provider_customer="nosub")
        seed.key("key_nosub", "nosub")
        seed.usage("key_nosub", "nosub", "calls", hours_ago(2), [9])
        w = Worker(tmp_path / "lago", redis, "http", {
            "http.url": lg.url + "/api/v1/events", "http.format": "lago",
            "http.auth_file": "@KEY@", "_api_key": "lg_tok"})
        t = subprocess.run([str(WORKER), "-c", str(w.conf), "-t"],
                           capture_output=True, text=True, timeout=30)
        assert t.returncode == 78, t.stdout + t.stderr
        assert "external_subscription_id" in t.stderr
        assert "nosub" in t.stderr
        r = w.run(now_hour())
        assert r.returncode == 65, r.stderr
        assert "no subscription" in r.stderr
        assert lg.requests_to("POST", r"/api/v1/events") == []
        ctl = subprocess.run([str(WORKER.parent / "meterctl"), "-c",
                              str(w.conf), "customers", "add", "other",
                              "--provider", "http"],
                             capture_output=True, text=True, timeout=30)
        assert ctl.returncode == 64, ctl.stdout + ctl.stderr
        assert "subscription" in ctl.stderr
        assert redis.hgetall("mtr:cust:{other}") == {}
