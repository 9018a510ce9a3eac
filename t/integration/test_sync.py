"""Delinquency sync (issue 6) through polling only: meter-worker asks the
fake Stripe / Chargebee / Recurly (real pagination) which customers are
overdue, marks them delinquent in a real redis-server (mtr:cust, the
mtr:gov projection the module reads), clears them once paid, never clears
a manual mark, and clears nothing after a poll that failed part-way.  One
test runs the daemon behind a real nginx with governance: 402 while
overdue, 200 once paid.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, key_hash, wait_for
from fakes import recurly as rcfake
from fakes.chargebee import FakeChargebee
from fakes.recurly import FakeRecurly
from fakes.stripe import FakeStripe

ROOT = Path(__file__).resolve().parent.parent.parent
WORKER = Path(os.environ.get("METER_WORKER_BIN",
                             ROOT / "worker" / "meter-worker"))
METERCTL = Path(os.environ.get("METERCTL_BIN", ROOT / "worker" / "meterctl"))

pytestmark = pytest.mark.skipif(not WORKER.exists() or not METERCTL.exists(),
                                reason="worker/ not built (make -C worker)")


class Billing:
    """A worker config for one provider fake, and the commands around it:
    meter-worker --once --sync-only, the daemon, meterctl."""

    def __init__(self, tmp, redis, provider, fake, **settings):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.redis = redis
        self.provider = provider
        self.fake = fake
        self.proc = None
        self.log_path = self.tmp / "worker.log"
        (self.tmp / "api-key").write_text(fake.api_key + "\n")
        lines = ["# test_sync.py / test_webhooks.py",
                 "redis = %s" % redis.address,
                 "provider = %s" % provider,
                 "log_level = debug",
                 "%s.api_key_file = %s" % (provider, self.tmp / "api-key"),
                 "%s.base_url = %s" % (provider, fake.url),
                 "%s.backoff = 0.01" % provider,
                 "%s.max_rps = 0" % provider]
        for k, v in settings.items():
            lines.append("%s = %s" % (k.replace("__", "."), v))
        self.conf = self.tmp / "worker.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def write_secret(self, name, value):
        p = self.tmp / name
        p.write_text(value + "\n")
        return p

    def sync(self, expect=0):
        r = subprocess.run([str(WORKER), "-c", str(self.conf), "--once",
                            "--sync-only"], capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        print("---- meter-worker --sync-only rc=%d\n%s"
              % (r.returncode, r.stderr))
        assert r.returncode == expect, r.stderr
        return r

    def ctl(self, *args, stdin=None, expect=0):
        r = subprocess.run([str(METERCTL), "-c", str(self.conf)] + list(args),
                           capture_output=True, text=True, timeout=60,
                           input=stdin)
        print("---- meterctl %s rc=%d\n%s%s" % (" ".join(args), r.returncode,
                                               r.stdout, r.stderr))
        if expect is not None:
            assert r.returncode == expect, r.stdout + r.stderr
        return r

    def customer(self, cid, key=None, provider_customer=None,
                 subscription=None):
        """meterctl customers add + keys add (the register-like setup)."""
        args = ["customers", "add", cid, "--provider", self.provider]
        if provider_customer:
            args += ["--provider-customer", provider_customer]
        if subscription:
            args += ["--subscription", subscription]
        self.ctl(*args)
        if key is not None:
            self.ctl("keys", "add", "-", "--customer", cid, stdin=key)

    def start(self, port=None, timeout=15):
        """The daemon; waits for the webhook port (when given) and for the
        first sync's mtr:w:sync record."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(WORKER), "-c", str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()

        def up():
            assert self.proc.poll() is None, self.log()
            if port is not None:
                import socket
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                except OSError:
                    return False
            return True

        wait_for(up, timeout, msg=self.log)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("meter-worker ignored SIGTERM")
            assert rc == 0, self.log()
        self.proc = None

    def log(self):
        return self.log_path.read_text(errors="replace") \
            if self.log_path.exists() else ""

    # Redis views

    def cust(self, cid):
        return self.redis.hgetall("mtr:cust:{%s}" % cid)

    def status(self, cid):
        c = self.cust(cid)
        return (c.get("status"), c.get("reason"), c.get("source"))

    def gov(self, key):
        v = self.redis.cmd("HGET", "mtr:gov", key_hash(key))
        return v.decode().split("\t") if v else None

    def sync_record(self):
        return self.redis.hgetall("mtr:w:sync")


DELINQUENT = ("delinquent", "invoice_overdue", "sync")


def put_customers(redis, provider, ids):
    """Customers written the way meterctl customers add writes them
    (docs/redis-schema.md, Governance), for tests with many customers:
    {our id: (provider customer, subscription)}."""
    now = str(int(time.time()))
    for cid, (pc, sub) in ids.items():
        redis.cmd("HSET", "mtr:cust:{%s}" % cid, "provider", provider,
                  "provider_customer", pc, "subscription", sub,
                  "status", "active", "created", now)
        redis.cmd("SADD", "mtr:customers", cid)
        redis.cmd("HSET", "mtr:bypc", pc, cid)
        redis.cmd("HSET", "mtr:bysub", sub, cid)


def delinquent_set(redis):
    out = set()
    for cid in redis.smembers("mtr:customers"):
        if redis.hgetall("mtr:cust:{%s}" % cid).get("status") \
                == "delinquent":
            out.add(cid)
    return out


# ------------------------------------------------------------------ Stripe

@pytest.fixture
def stripe():
    with FakeStripe() as f:
        yield f


def test_stripe_past_due_marks_and_paid_clears(redis, stripe, tmp_path):
    b = Billing(tmp_path, redis, "stripe", stripe)
    cus = stripe.add_customer(email="a@example.com")
    sub = stripe.add_subscription(cus["id"], status="active")
    b.customer("acme", "mk_test_acme_1", cus["id"], sub["id"])

    b.sync()
    assert b.status("acme") == ("active", None, None)
    rec = b.sync_record()
    assert rec["ok"] == "1" and rec["delinquent"] == "0"
    assert abs(int(rec["last"]) - time.time()) < 30

    stripe.set_subscription_status(sub["id"], "past_due")
    b.sync()
    assert b.status("acme") == DELINQUENT
    assert b.gov("mk_test_acme_1")[:3] == ["acme", "d", "invoice_overdue"]
    assert b.sync_record()["delinquent"] == "1"
    since = int(b.cust("acme")["since"])

    # listed again: stays, since unchanged
    b.sync()
    assert b.status("acme") == DELINQUENT
    assert int(b.cust("acme")["since"]) == since

    stripe.set_subscription_status(sub["id"], "unpaid")
    b.sync()
    assert b.status("acme") == DELINQUENT

    stripe.set_subscription_status(sub["id"], "active")
    b.sync()
    assert b.cust("acme")["status"] == "active"
    assert "reason" not in b.cust("acme")
    assert b.gov("mk_test_acme_1")[:3] == ["acme", "a", ""]

    # five polls, each one page of past_due and one of unpaid
    qs = sorted(r.q("status") for r in
                stripe.requests_to("GET", r"^/v1/subscriptions$"))
    assert qs == ["past_due"] * 5 + ["unpaid"] * 5


def test_manual_mark_is_not_cleared(redis, stripe, tmp_path):
    b = Billing(tmp_path, redis, "stripe", stripe)
    cus = stripe.add_customer()
    sub = stripe.add_subscription(cus["id"], status="active")
    b.customer("manual1", "mk_test_manual", cus["id"], sub["id"])
    b.ctl("delinquent", "set", "manual1")
    assert b.cust("manual1")["source"] == "manual"

    b.sync()
    assert b.cust("manual1")["status"] == "delinquent"
    assert b.cust("manual1")["source"] == "manual"

    # overdue at the provider too: still the manual mark
    stripe.set_subscription_status(sub["id"], "past_due")
    b.sync()
    stripe.set_subscription_status(sub["id"], "active")
    b.sync()
    assert b.cust("manual1")["status"] == "delinquent"
    assert b.cust("manual1")["source"] == "manual"


def test_stripe_pagination_250(redis, stripe, tmp_path):
    b = Billing(tmp_path, redis, "stripe", stripe)
    ids = {}
    subs = {}
    for i in range(260):
        cus = stripe.add_customer()
        status = "past_due" if i < 250 else "active"
        sub = stripe.add_subscription(cus["id"], status=status)
        ids["c%03d" % i] = (cus["id"], sub["id"])
        subs["c%03d" % i] = sub["id"]
    # a past_due subscription of someone who is not our customer
    stripe.add_subscription(stripe.add_customer()["id"], status="past_due")
    put_customers(redis, "stripe", ids)

    b.sync()
    assert delinquent_set(redis) == {"c%03d" % i for i in range(250)}
    rec = b.sync_record()
    assert (rec["ok"], rec["delinquent"], rec["unknown"]) == ("1", "250",
                                                              "1")
    pages = [r for r in stripe.requests_to("GET", r"^/v1/subscriptions$")
             if r.q("status") == "past_due"]
    assert len(pages) == 3          # 100 + 100 + 51, limit=100
    assert [p.q("limit") for p in pages] == ["100"] * 3
    assert pages[0].q("starting_after") is None
    assert pages[1].q("starting_after") is not None

    # 240 paid; the other 10 stay
    for i in range(10, 250):
        stripe.set_subscription_status(subs["c%03d" % i], "active")
    b.sync()
    assert delinquent_set(redis) == {"c%03d" % i for i in range(10)}


def test_failed_poll_clears_nothing(redis, stripe, tmp_path):
    b = Billing(tmp_path, redis, "stripe", stripe, stripe__max_attempts=1)
    ids, subs = {}, {}
    for i in range(150):
        cus = stripe.add_customer()
        sub = stripe.add_subscription(cus["id"], status="past_due")
        ids["c%03d" % i] = (cus["id"], sub["id"])
        subs["c%03d" % i] = sub["id"]
    put_customers(redis, "stripe", ids)
    b.sync()
    assert len(delinquent_set(redis)) == 150

    # all paid, but the second page of the poll fails
    for s in subs.values():
        stripe.set_subscription_status(s, "active")
    stripe.set_subscription_status(subs["c000"], "past_due")
    stripe.set_subscription_status(subs["c149"], "past_due")
    stripe.fail_next(1, 500, match=lambda r: r.q("status") == "unpaid")
    b.sync(expect=75)
    rec = b.sync_record()
    assert rec["ok"] == "0" and rec["error"]
    assert len(delinquent_set(redis)) == 150

    b.sync()
    assert delinquent_set(redis) == {"c000", "c149"}
    assert b.sync_record()["ok"] == "1"


def test_sync_off_and_unsupported(redis, stripe, tmp_path):
    b = Billing(tmp_path, redis, "stripe", stripe,
                sync__delinquency="off")
    r = b.sync(expect=78)
    assert "sync" in r.stderr
    assert stripe.requests == []


def test_redis_down_sync_fails(redis, stripe, tmp_path):
    b = Billing(tmp_path, redis, "stripe", stripe)
    redis.stop("kill")
    b.sync(expect=69)


# ------------------------------------------------------- Chargebee, Recurly

def test_chargebee_overdue_invoices_paginated(redis, tmp_path):
    with FakeChargebee() as cb:
        b = Billing(tmp_path, redis, "chargebee", cb, chargebee__site="x")
        ids = {}
        for i in range(160):
            c = cb.add_customer()
            s = cb.add_subscription(customer_id=c["id"])
            ids["cb%03d" % i] = (c["id"], s["id"])
            # one payment_due, one not_paid, one paid invoice per 3
            st = ("payment_due", "not_paid", "paid")[i % 3]
            cb.add_invoice(c["id"], s["id"], status=st)
        put_customers(redis, "chargebee", ids)

        b.sync()
        want = {"cb%03d" % i for i in range(160) if i % 3 != 2}
        assert len(want) == 107
        assert delinquent_set(redis) == want
        pages = cb.requests_to("GET", r"^/api/v2/invoices$")
        # the opaque next_offset of page 1, passed back as it came
        assert [p.q("offset") for p in pages][0] is None
        assert pages[1].q("offset") in cb.offsets
        assert {p.q("status[in]") for p in pages} == {
            '["payment_due","not_paid"]'}

        for inv in cb.invoices:
            inv["status"] = "paid"
        b.sync()
        assert delinquent_set(redis) == set()


def test_recurly_past_due_invoices_paginated(redis, tmp_path):
    with FakeRecurly() as rc:
        b = Billing(tmp_path, redis, "recurly", rc)
        ids, invs = {}, {}
        for i in range(450):
            code = "rc%03d" % i
            rc.add_account(code)
            s = rc.add_subscription(account=code, plan="api")
            ids[code] = (code, s["id"])
            invs[code] = rc.add_invoice(code, subscription=s["id"],
                                        state="past_due" if i % 2 else
                                        "paid")
        put_customers(redis, "recurly", ids)

        b.sync()
        want = {"rc%03d" % i for i in range(450) if i % 2}
        assert delinquent_set(redis) == want
        pages = rc.requests_to("GET", r"^/invoices$")
        # 225 past due (limit=200), then the failed ones (none)
        assert [(p.q("state"), p.q("cursor")) for p in pages] == [
            ("past_due", None), ("past_due", "200"), ("failed", None)]

        paid = sorted(want)[:5]
        for code in paid:
            rc.set_invoice_state(invs[code]["id"], "paid")
        b.sync()
        assert delinquent_set(redis) == want - set(paid)


def test_recurly_failed_invoice_still_owes(redis, tmp_path):
    """api.yaml InvoiceStateQueryParamEnum: pending, past_due, paid, failed;
    "failed" is dunning exhausted, still unpaid.  Webhook blocks, the
    invoice fails, the poll keeps the block; paid: cleared."""
    with FakeRecurly() as rc:
        rc.add_account("racme")
        s = rc.add_subscription(account="racme", plan="api")
        inv = rc.add_invoice("racme", subscription=s["id"], state="past_due")
        key = tmp_path / "rkey"
        key.write_text("recurly-hook-key\n")
        port = free_port()
        hooks = Billing(tmp_path / "hooks", redis, "recurly", rc,
                        sync__delinquency="off",
                        webhook__listen="127.0.0.1:%d" % port,
                        recurly__webhook_key_file=key)
        poll = Billing(tmp_path / "poll", redis, "recurly", rc)
        poll.customer("racme", "mk_test_rc_ff", "racme", s["id"])
        hooks.start(port=port)
        try:
            url = "http://127.0.0.1:%d/webhooks/recurly" % port
            st, _ = rcfake.send_webhook(url, "charge_invoice", "past_due",
                                        "racme", "recurly-hook-key",
                                        event_time=time.time() - 5)
            assert st == 200
            assert poll.status("racme") == DELINQUENT
            rc.set_invoice_state(inv["id"], "failed")
            poll.sync()
            assert poll.status("racme") == DELINQUENT
            assert {p.q("state") for p in rc.requests_to(
                "GET", r"^/invoices$")} == {"past_due", "failed"}
            poll.sync()
            assert poll.status("racme") == DELINQUENT
            rc.set_invoice_state(inv["id"], "paid")
            poll.sync()
            assert poll.status("racme")[0] == "active"
        finally:
            hooks.stop()


# ------------------------------------------------- daemon, nginx, 402 / 200

GOV_CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh 200ms;

    server {
        listen 127.0.0.1:@PORT2@;
        location / { return 200 "ok\n"; }
    }

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls status=200;
        meter_governance zone=api unknown_key=401;
        location / { proxy_pass http://127.0.0.1:@PORT2@; }
    }
"""


def call(n, key):
    return n.get("/", headers={"X-API-Key": key})[0]


def test_daemon_polls_and_nginx_answers_402(nginx_factory, redis, stripe,
                                            tmp_path):
    b = Billing(tmp_path / "w", redis, "stripe", stripe, sync_interval="1s")
    cus = stripe.add_customer()
    sub = stripe.add_subscription(cus["id"], status="active")
    b.customer("dacme", "mk_test_daemon", cus["id"], sub["id"])
    n = nginx_factory(GOV_CONF, redis=redis.address)
    b.start()
    try:
        assert wait_for(lambda: call(n, "mk_test_daemon") == 200, 30)
        t0 = time.monotonic()
        stripe.set_subscription_status(sub["id"], "past_due")
        wait_for(lambda: call(n, "mk_test_daemon") == 402, 10,
                 msg=b.log)
        # interval 1s + refresh 200ms, with slack for a loaded machine
        assert time.monotonic() - t0 < 8
        stripe.set_subscription_status(sub["id"], "active")
        wait_for(lambda: call(n, "mk_test_daemon") == 200, 10,
                 msg=b.log)
        assert b.cust("dacme")["status"] == "active"
    finally:
        b.stop()


# ------------------------------------------------------------- onboarding

def test_register_retry_after_subscription_500(redis, stripe, tmp_path):
    """meterctl register (helper A) calls the provider's onboarding: the
    subscription call fails with a 500 (which Stripe saves under the
    idempotency key); the retry completes: one customer, one subscription,
    one key."""
    import json as _json
    b = Billing(tmp_path, redis, "stripe", stripe, stripe__max_attempts=1,
                plan__pro__stripe_price="price_calls",
                plan__pro__stripe_price__bytes="price_bytes")
    stripe.fail_next(1, 500, match=lambda r: r.method == "POST"
                     and r.path == "/v1/subscriptions")
    r = b.ctl("register", "--email", "new@example.com", "--customer", "regc",
              "--plan", "pro", "--json", expect=None)
    assert r.returncode != 0
    assert len(stripe.customers) == 1 and stripe.subscriptions == []

    r = b.ctl("register", "--email", "new@example.com", "--customer", "regc",
              "--plan", "pro", "--json")
    out = _json.loads(r.stdout)
    assert out["customer"] == "regc" and out["key"].startswith("mk_")

    assert len(stripe.customers) == 1
    assert len(stripe.subscriptions) == 1
    cus, sub = stripe.customers[0], stripe.subscriptions[0]
    assert cus["email"] == "new@example.com"
    assert cus["metadata"] == {"nginx_meter_customer": "regc"}
    assert sub["customer"] == cus["id"]
    assert sub["metadata"] == {"nginx_meter_customer": "regc"}
    assert [i["price"]["id"] for i in sub["items"]["data"]] == [
        "price_calls", "price_bytes"]
    assert len(stripe.requests_to("POST", r"^/v1/customers$")) == 1
    keys = [r.headers["Idempotency-Key"] for r in
            stripe.requests_to("POST", r"^/v1/subscriptions$")]
    # first try, the retry replayed the saved 500, then a fresh key
    assert keys[:2] == ["nginx-meter-regc-subscription"] * 2
    assert len(keys) == 3 and keys[2].startswith(keys[0] + "-r")

    c = b.cust("regc")
    assert c["provider_customer"] == cus["id"]
    assert c["subscription"] == sub["id"]
    items = {i["price"]["id"]: i["id"] for i in sub["items"]["data"]}
    assert c["item.calls"] == items["price_calls"]
    assert c["item.bytes"] == items["price_bytes"]
    assert redis.hgetall("mtr:bypc") == {cus["id"]: "regc"}
    assert redis.hgetall("mtr:bysub") == {sub["id"]: "regc"}
    assert len(redis.smembers("mtr:ckeys:{regc}")) == 1

    # once more: nothing new anywhere
    b.ctl("register", "--email", "new@example.com", "--customer", "regc",
          "--plan", "pro", "--json", expect=None)
    assert len(stripe.customers) == 1 and len(stripe.subscriptions) == 1
    assert len(redis.smembers("mtr:ckeys:{regc}")) == 1
