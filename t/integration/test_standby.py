"""Two meter-workers on one Redis (issue 16, part 3; two hosts simulated as
two processes with their own state dirs): one drains, the other waits on
the drain lock (mtr:{worker}:lock, lock_ttl); the active one is SIGKILLed
mid-drain and the standby takes over within lock_ttl (plus its one-second
poll), billing every record exactly once into the fake Stripe (which
dedupes by identifier, as Stripe does).  The webhook listener runs on both:
a delivery to either one applies."""

import re
import signal
import time

import pytest

from conftest import free_port, wait_for
from fakes import stripe as stfake
from fakes.stripe import FakeStripe
from test_sync import Billing, pytestmark  # noqa: F401
from test_worker import NOW_HOUR, idem, stripe_usage

SECRET = "whsec_test_standby_0123456789"
LOCK_TTL = 5


def workers(tmp_path, redis, fake):
    out = []
    for name in ("a", "b"):
        port = free_port()
        b = Billing(tmp_path / name, redis, "stripe", fake,
                    sync__delinquency="off", meter__calls="api_calls",
                    lock_ttl="%ds" % LOCK_TTL, grace="0s",
                    webhook__listen="127.0.0.1:%d" % port,
                    webhook__timeout="2s")
        secret = b.write_secret("whsec", SECRET)
        with open(b.conf, "a") as f:
            f.write("stripe.webhook_secret_file = %s\n" % secret)
            # one request at a time: the drain must still be running when
            # the standby starts and when the active worker is killed
            f.write("stripe.max_in_flight = 1\n")
        b.wh_port = port
        out.append(b)
    return out


def test_standby_takes_over_and_bills_each_record_once(redis, tmp_path):
    with FakeStripe(api_key="sk_test_standby", delay=0.05) as fake:
        a, b = workers(tmp_path, redis, fake)
        h = NOW_HOUR - 2 * 3600
        want = stripe_usage(redis, "sb", 60, h, 2)

        a.start(port=a.wh_port)
        wait_for(lambda: len(fake.events) >= 5, 30)
        b.start(port=b.wh_port)
        wait_for(lambda: "another worker holds the drain lock" in b.log(),
                 10, msg=b.log)

        # a delivery to each listener applies (the lock is the drain's)
        for w, cid in ((a, "hook-a"), (b, "hook-b")):
            cus = fake.add_customer()
            sub = fake.add_subscription(cus["id"])
            w.customer(cid, None, cus["id"], sub["id"])
            inv = {"id": "in_" + cid, "object": "invoice",
                   "customer": cus["id"], "subscription": sub["id"],
                   "status": "open"}
            st, body = stfake.send_webhook(
                "http://127.0.0.1:%d/webhooks/stripe" % w.wh_port,
                "invoice.payment_failed", inv, SECRET)
            assert st == 200, body
            assert w.status(cid)[0] == "delinquent"

        wait_for(lambda: len(fake.events) >= 15, 30)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        killed = time.monotonic()
        n_kill = len(fake.events)
        assert n_kill < 60, "the kill did not land mid-drain"
        a.proc = None

        # b's own first event at the fake: a's one request in flight at the
        # kill (max_in_flight 1) may land after it, so one more than that
        # (b logs its records only when their chunk is finished)
        wait_for(lambda: len(fake.events) >= n_kill + 2, LOCK_TTL + 10, 0.02)
        takeover = time.monotonic() - killed
        print("standby took over %.2f s after the SIGKILL" % takeover)
        # the lock runs out at most lock_ttl after its last renewal; the
        # standby comes back when its PTTL has passed (a 1 s sleep loop)
        assert takeover <= LOCK_TTL + 2.0

        wait_for(lambda: all(fake.total(c, "api_calls") == v
                             for c, v in want.items()), 60, 0.2)
        # the totals are in before the pass ends: it still marks the last
        # records billed and resumes what the dead one left open
        t0 = time.monotonic()
        wait_for(lambda: redis.keys("mtr:{worker}:r:*") == []
                 and "the drain lock is free: this worker drains now"
                 in b.log(), 60, 0.1, msg=lambda: (
                     [redis.cmd("HGETALL", k)
                      for k in redis.keys("mtr:{worker}:r:*")],
                     b.log()[-2000:]))
        print("the standby's pass ended %.2f s after the totals"
              % (time.monotonic() - t0))
        b.stop()
        idents = [e["identifier"] for e in fake.events]
        assert len(idents) == len(set(idents)) == 60
        assert sorted(idents) == sorted(idem(h, "c%03d" % i, "calls")
                                        for i in range(60))
        assert redis.keys("mtr:{worker}:r:*") == []
        assert "standby: another worker holds the drain lock" in b.log()
        assert "the drain lock is free: this worker drains now" in b.log()
        assert b.log().count("standby:") == 1, "logged once, not per poll"


SUMMARY = re.compile(r"sync: (\d+) listed, (\d+) of our customers overdue "
                     r"\((\d+) newly\), (\d+) cleared")


def summaries(w):
    return [tuple(int(x) for x in m.groups())
            for m in SUMMARY.finditer(w.log())]


def test_both_sync_delinquency_and_agree(redis, tmp_path):
    """README: "The delinquency sync runs on both (it only reads the
    provider and writes the same statuses)": two daemons polling every
    second; a past_due subscription is marked once (by whichever polls
    first), kept by both (since unchanged), and cleared once when paid."""
    with FakeStripe(api_key="sk_test_standby") as fake:
        ws = [Billing(tmp_path / name, redis, "stripe", fake,
                      sync_interval="1s", meter__calls="api_calls",
                      lock_ttl="%ds" % LOCK_TTL)
              for name in ("a", "b")]
        a, b = ws
        cus = fake.add_customer()
        sub = fake.add_subscription(cus["id"], status="active")
        a.customer("both", "mk_test_both", cus["id"], sub["id"])
        for w in ws:
            w.start()
        try:
            wait_for(lambda: all(len(summaries(w)) >= 2 for w in ws), 20)
            fake.set_subscription_status(sub["id"], "past_due")
            wait_for(lambda: a.status("both")[0] == "delinquent", 10)
            since = a.cust("both")["since"]
            n0 = [len(summaries(w)) for w in ws]
            # each polls at least twice more with it listed
            wait_for(lambda: all(
                len([s for s in summaries(w)[n0[i]:] if s[1] == 1]) >= 2
                for i, w in enumerate(ws)), 20)
            assert a.cust("both")["since"] == since
            fake.set_subscription_status(sub["id"], "active")
            wait_for(lambda: a.status("both")[0] == "active", 10)
            n1 = [len(summaries(w)) for w in ws]
            wait_for(lambda: all(len(summaries(w)) >= n1[i] + 2
                                 for i, w in enumerate(ws)), 20)
        finally:
            for w in ws:
                w.stop()
        every = summaries(a) + summaries(b)
        assert sum(s[2] for s in every) == 1, every     # marked once
        assert sum(s[3] for s in every) == 1, every     # cleared once
        assert all(summaries(w) for w in ws)
        assert a.status("both")[:2] == ("active", None)
