"""meterctl reconcile (issue 15 part 4): nginx's count (Redis), the
worker's billing (billed marks, records) and the provider's own figure
(the fakes answer from what they actually received), with each documented
divergence: pending, dead letter, late usage, rejected asynchronously,
unknown; exit 0 / 1 / 2; pagination of every provider's list; 429s."""

import json
import subprocess
import time

import pytest

from conftest import key_hash, wait_for
from fakes import stripe as stfake
from fakes import (FakeChargebee, FakeOpenMeter, FakeRecurly, FakeStripe)
from test_providers import (METERCTL, Seed, Worker, hour_name, hours_ago,
                            ingest_seed, iso, now_hour,
                            pytestmark)  # noqa: F401

SK = "sk_test_reconcile_0123"


class RSeed(Seed):
    """Seed, with the customer's key set as meterctl keys add writes it
    (usage per customer reads mtr:ckeys)."""

    def key(self, key, customer):
        kh = super().key(key, customer)
        if customer is not None:
            self.redis.cmd("SADD", "mtr:ckeys:{%s}" % customer, kh)
        return kh


def reconcile(worker, *args, json_out=True):
    cmd = [str(METERCTL), "-c", str(worker.conf), "reconcile"] + list(args)
    if json_out:
        cmd.append("--json")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print("---- meterctl reconcile %s rc=%d\n%s%s"
          % (" ".join(args), r.returncode, r.stdout, r.stderr))
    rows = None
    if json_out and r.stdout.strip():
        rows = {(o["customer"], o["meter"]): o for o in json.loads(r.stdout)}
    return r, rows


def kinds(row):
    return {d["kind"]: d["quantity"] for d in row["differences"]}


def window(back=30):
    """An hour-aligned range around the seeded hours, the current one
    included."""
    return ["--from", iso(hours_ago(back)), "--to", iso(now_hour() + 3600)]


# ---------------------------------------------------------------- stripe

def stripe_world(redis, tmp_path, fake, **extra):
    seed = RSeed(redis)
    fake.add_meter("api_calls")
    for c, cus in (("acme", "cus_A"), ("globex", "cus_B")):
        seed.customer(c, "stripe", provider_customer=cus,
                      subscription="sub_" + c)
        seed.key("key_" + c, c)
    seed.usage("key_acme", "acme", "calls", hours_ago(2), [100, 7])
    seed.usage("key_acme", "acme", "calls", hours_ago(5), [40])
    seed.usage("key_globex", "globex", "calls", hours_ago(3), [9])
    settings = {"stripe.base_url": fake.url, "stripe.api_key_file": "@KEY@",
                "_api_key": SK, "stripe.backoff": "50ms",
                "stripe.timeout": "2s", "stripe.max_rps": 0,
                "meter.calls": "api_calls"}
    settings.update(extra)
    return seed, Worker(tmp_path / "w", redis, "stripe", settings)


def test_stripe_equal_and_pending(redis, tmp_path):
    with FakeStripe(api_key=SK) as fake:
        seed, w = stripe_world(redis, tmp_path, fake)
        # the current hour is not closed: counted, not billed (pending)
        seed.usage("key_acme", "acme", "calls", now_hour(), [5],
                   billable=False)
        assert w.run(now_hour()).returncode == 0
        r, rows = reconcile(w, *window())
        assert r.returncode == 0, r.stderr
        acme = rows[("acme", "calls")]
        assert (acme["counted"], acme["billed"], acme["provider"]) == \
            (152, 147, 147)
        assert acme["result"] == "pending"
        assert kinds(acme) == {"pending": 5}
        assert "not closed" in acme["differences"][0]["cause"]
        g = rows[("globex", "calls")]
        assert (g["counted"], g["billed"], g["provider"], g["result"]) == \
            (9, 9, 9, "equal")
        # Stripe was asked per customer, hourly, on hour boundaries
        asks = fake.requests_to("GET", r"/event_summaries$")
        assert {q.q("customer") for q in asks} == {"cus_A", "cus_B"}
        assert all(q.q("value_grouping_window") == "hour" and
                   int(q.q("start_time")) == hours_ago(30) for q in asks)
        # the table form says the same
        r, _ = reconcile(w, *window(), json_out=False)
        assert r.returncode == 0
        assert "pending" in r.stdout and "acme" in r.stdout
        assert SK not in r.stdout + r.stderr


def test_stripe_dead_letter_late_usage_and_unknown(redis, tmp_path):
    with FakeStripe(api_key=SK) as fake:
        seed, w = stripe_world(redis, tmp_path, fake)
        bad = {"error": {"type": "invalid_request_error",
                         "code": "resource_missing",
                         "message": "No such customer: 'cus_B'"}}
        fake.fail_next(100, 400, body=bad, match=lambda q: (
            q.form or {}).get("payload[stripe_customer_id]") == "cus_B")
        assert w.run(now_hour()).returncode == 65
        # late: more usage of a drained hour reaches Redis
        seed.usage("key_acme", "acme", "calls", hours_ago(5), [3])
        # unknown: Stripe counts an event we never sent
        fake.add_event("api_calls", "cus_A", 11, hours_ago(2) + 60)
        r, rows = reconcile(w, *window())
        assert r.returncode == 1, r.stderr
        acme = rows[("acme", "calls")]
        assert (acme["counted"], acme["billed"], acme["provider"]) == \
            (150, 147, 158)
        assert kinds(acme) == {"late_usage": 3, "unknown": 11}
        g = rows[("globex", "calls")]
        assert (g["counted"], g["billed"], g["provider"]) == (9, 0, 0)
        assert kinds(g) == {"dead_letter": 9}
        dead = redis.cmd("ZRANGE", "mtr:{worker}:dead", "0", "-1")
        assert len(dead) == 1
        assert dead[0].decode() in g["differences"][0]["cause"]
        # --customer / --meter narrow it; globex alone still differs
        r, rows = reconcile(w, *window(), "--customer", "globex",
                            "--meter", "calls")
        assert r.returncode == 1 and set(rows) == {("globex", "calls")}


def test_stripe_pages_and_429_retry_after(redis, tmp_path):
    """A 10-day range not on day boundaries is 240 hourly summaries: three
    pages of 100 (starting_after); a 429 with Retry-After is waited out;
    a month is one page of daily summaries."""
    with FakeStripe(api_key=SK) as fake:
        seed, w = stripe_world(redis, tmp_path, fake)
        assert w.run(now_hour()).returncode == 0
        start = hours_ago(239)
        if (now_hour() + 3600) % 86400 == 0:
            start -= 3600           # day-aligned: days, one page
        fake.fail_next(1, 429, headers={"Retry-After": "1"},
                       match=lambda q: q.path.endswith("/event_summaries"))
        r, rows = reconcile(w, "--from", iso(start), "--to",
                            iso(now_hour() + 3600))
        assert r.returncode == 0, r.stderr
        assert rows[("acme", "calls")]["provider"] == 147
        asks = [q for q in fake.requests_to("GET", r"/event_summaries$")
                if q.q("customer") == "cus_A"]
        assert len(asks) == 4       # the 429, then three pages
        assert asks[1].time - asks[0].time >= 1.0
        assert [q.q("starting_after") is None for q in asks[1:]] == \
            [True, False, False]
        month = time.strftime("%Y-%m", time.gmtime(hours_ago(2)))
        n = len(fake.requests_to("GET", r"/event_summaries$"))
        r, rows = reconcile(w, "--period", month, "--customer", "acme")
        asks = fake.requests_to("GET", r"/event_summaries$")[n:]
        assert len(asks) == 1 and asks[0].q("value_grouping_window") == "day"
        assert int(asks[0].q("start_time")) % 86400 == 0


def test_provider_unreachable_is_an_error(redis, tmp_path):
    fake = FakeStripe(api_key=SK)
    fake.start()
    seed, w = stripe_world(redis, tmp_path, fake, **{
        "stripe.timeout": "1s"})
    assert w.run(now_hour()).returncode == 0
    fake.stop()
    r, rows = reconcile(w, *window())
    assert r.returncode == 2
    acme = rows[("acme", "calls")]
    assert acme["result"] == "error" and acme["provider"] is None
    assert acme["error"]
    # nothing guessed: ours is still shown
    assert (acme["counted"], acme["billed"]) == (147, 147)


def test_bad_command_lines(redis, tmp_path):
    with FakeStripe(api_key=SK) as fake:
        _, w = stripe_world(redis, tmp_path, fake)
        for args in (["--period", "2026-13"], ["--period", "nov"],
                     ["--from", iso(hours_ago(3))],
                     ["--from", iso(hours_ago(3) + 60), "--to",
                      iso(now_hour())],
                     ["--period", "2026-11", "--from", iso(hours_ago(3)),
                      "--to", iso(now_hour())],
                     ["--customer", "bad id!"]):
            r, _ = reconcile(w, *args)
            assert r.returncode == 64, args
        r, _ = reconcile(w, "--customer", "nobody", *window())
        assert r.returncode == 2


# ------------------------------------------- stripe: rejected after 200

@pytest.fixture
def stripe_daemon(redis, tmp_path):
    from test_sync import Billing
    from conftest import free_port
    with FakeStripe(api_key=SK) as fake:
        secret = tmp_path / "whsec"
        secret.write_text("whsec_reconcile\n")
        port = free_port()
        fake.api_key = SK
        b = Billing(tmp_path / "d", redis, "stripe", fake,
                    sync__delinquency="off",
                    webhook__listen="127.0.0.1:%d" % port,
                    stripe__webhook_secret_file=secret,
                    meter__calls="api_calls")
        yield fake, b, port
        b.stop()


def test_stripe_rejected_asynchronously(redis, tmp_path, stripe_daemon):
    """Stripe accepted the event (200), validated it later and reported it
    (v1.billing.meter.error_report_triggered): the worker dead-letters the
    record, Stripe's figure lacks it, reconcile names the cause."""
    fake, b, port = stripe_daemon
    seed, w = stripe_world(redis, tmp_path, fake)
    assert w.run(now_hour()).returncode == 0
    idents = [e["identifier"] for e in fake.events
              if e["payload"]["stripe_customer_id"] == "cus_B"]
    assert len(idents) == 1
    fake.reject_event(idents[0])
    b.start(port=port)
    thin = fake.error_report(idents)
    st, body = stfake.send_payload("http://127.0.0.1:%d/webhooks/stripe"
                                   % port, json.dumps(thin).encode(),
                                   "whsec_reconcile")
    assert st == 200, body
    wait_for(lambda: redis.hgetall("mtr:{worker}:r:" + idents[0]).get(
        "rejected_by") == thin["id"], 5)
    r, rows = reconcile(w, *window())
    assert r.returncode == 1, r.stderr
    g = rows[("globex", "calls")]
    assert (g["counted"], g["billed"], g["provider"]) == (9, 9, 0)
    assert kinds(g) == {"rejected": 9}
    cause = g["differences"][0]["cause"]
    assert idents[0] in cause and "customer mapping" in cause
    assert rows[("acme", "calls")]["result"] == "equal"


# -------------------------------------------------------------- chargebee

def test_chargebee_usages_paged_and_foreign_usage(redis, tmp_path):
    with FakeChargebee(api_key="cb_reconcile") as fake:
        seed = RSeed(redis)
        day = (int(time.time()) // 86400) * 86400
        seed.customer("acme", "chargebee", provider_customer="cust_acme",
                      subscription="sub_acme")
        fake.add_subscription("sub_acme", customer_id="cust_acme",
                              item_prices=["calls-USD-Monthly"])
        seed.key("key_acme", "acme")
        for d in range(1, 4):
            seed.usage("key_acme", "acme", "calls", day - d * 86400 + 7200,
                       [10 * d, 1])
        w = Worker(tmp_path / "w", redis, "chargebee", {
            "chargebee.base_url": fake.url,
            "chargebee.api_key_file": "@KEY@", "_api_key": "cb_reconcile",
            "chargebee.max_rps": 0, "chargebee.backoff": "50ms",
            "meter.calls": "calls-USD-Monthly"})
        assert w.run(now_hour()).returncode == 0
        # someone else's usage, outside and inside the range
        fake.add_usage("sub_acme", "calls-USD-Monthly", day - 10 * 86400, 99)
        rng = ["--from", iso(day - 4 * 86400), "--to", iso(day)]
        r, rows = reconcile(w, *rng)
        assert r.returncode == 0, r.stderr
        a = rows[("acme", "calls")]
        assert (a["counted"], a["billed"], a["provider"]) == (63, 63, 63)
        q = fake.requests_to("GET", r"/api/v2/usages$")[-1]
        assert q.q("subscription_id[is]") == "sub_acme"
        assert q.q("item_price_id[is]") == "calls-USD-Monthly"
        assert json.loads(q.q("usage_date[between]")) == \
            [day - 4 * 86400, day - 1]
        fake.add_usage("sub_acme", "calls-USD-Monthly", day - 86400 + 5, 4)
        r, rows = reconcile(w, *rng)
        assert r.returncode == 1
        assert kinds(rows[("acme", "calls")]) == {"unknown": 4}


# ---------------------------------------------------------------- recurly

def test_recurly_usage_all_states_paged_by_next(redis, tmp_path):
    with FakeRecurly(api_key="rk_reconcile", next_style="path") as fake:
        seed = RSeed(redis)
        fake.add_subscription("sub_acme", add_ons=["api_calls"])
        seed.customer("acme", "recurly", provider_customer="acct_acme",
                      subscription="sub_acme")
        seed.key("key_acme", "acme")
        for i in range(5):
            seed.usage("key_acme", "acme", "calls", hours_ago(2 + i),
                       [100 + i])
        w = Worker(tmp_path / "w", redis, "recurly", {
            "recurly.base_url": fake.url,
            "recurly.api_key_file": "@KEY@", "_api_key": "rk_reconcile",
            "recurly.backoff": "50ms", "recurly.max_rps": 0,
            "meter.calls": "api_calls"})
        assert w.run(now_hour()).returncode == 0
        # invoiced usage still counts (billing_status=all)
        fake.invoice_usage("sub_acme")
        fake.max_limit = 2
        r, rows = reconcile(w, *window())
        assert r.returncode == 0, r.stderr
        a = rows[("acme", "calls")]
        assert (a["counted"], a["billed"], a["provider"]) == (510, 510, 510)
        gets = fake.requests_to("GET", r"/add_ons/code-api_calls/usage$")
        assert len(gets) == 3
        assert all(g.q("billing_status") == "all" and
                   g.q("sort") == "usage_timestamp" and g.q("order") == "asc"
                   for g in gets)
        # Recurly holds less than billed, no error report: unknown
        fake.usages.pop()
        r, rows = reconcile(w, *window())
        assert r.returncode == 1
        assert list(kinds(rows[("acme", "calls")])) == ["unknown"]


# -------------------------------------------------------------- openmeter

def test_openmeter_query_meter(redis, tmp_path):
    with FakeOpenMeter(token="om_reconcile",
                       meters={"api_calls": "api-calls"}) as om:
        ingest_seed(redis)
        redis.cmd("SADD", "mtr:ckeys:{acme}", key_hash("key_acme"))
        w = Worker(tmp_path / "om", redis, "http", {
            "http.url": om.url + "/api/v1/events",
            "http.format": "openmeter", "http.auth_file": "@KEY@",
            "_api_key": "om_reconcile", "http.backoff": "50ms",
            "meter.calls": "api-calls"})
        assert w.run(now_hour()).returncode == 0
        r, rows = reconcile(w, *window())
        assert r.returncode == 0, r.stderr
        a = rows[("acme", "calls")]
        assert (a["counted"], a["billed"], a["provider"]) == (18, 18, 18)
        q = om.requests_to("GET", r"/api/v1/meters/api_calls/query$")[-1]
        assert q.q("subject") == "acme" and q.q("windowSize") == "HOUR"
        assert q.bearer() == "om_reconcile"
        # an event in the next period's first instant is not ours
        om.events.append({"specversion": "1.0", "id": "x1", "source": "o",
                          "type": "api-calls", "subject": "acme",
                          "time": iso(now_hour() + 3600),
                          "data": {"value": 1000}})
        om.events.append({"specversion": "1.0", "id": "x2", "source": "o",
                          "type": "api-calls", "subject": "acme",
                          "time": iso(hours_ago(2)), "data": {"value": 2}})
        r, rows = reconcile(w, *window())
        assert r.returncode == 1
        assert kinds(rows[("acme", "calls")]) == {"unknown": 2}


# ------------------------------------------------------------ file / none

def test_file_provider_ours_only(redis, tmp_path):
    seed = RSeed(redis)
    seed.customer("acme", "file")
    seed.key("key_acme", "acme")
    seed.usage("key_acme", "acme", "calls", hours_ago(2), [21])
    w = Worker(tmp_path / "f", redis, "file",
               {"file.path": tmp_path / "f" / "usage.jsonl"})
    assert w.run(now_hour()).returncode == 0
    r, rows = reconcile(w, *window())
    assert r.returncode == 0, r.stderr
    a = rows[("acme", "calls")]
    assert (a["counted"], a["billed"], a["provider"]) == (21, 21, None)
    kh = key_hash("key_acme")
    assert redis.hgetall("mtr:b:{%s}:%s" % (kh, hour_name(hours_ago(2))))
