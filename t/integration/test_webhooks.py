"""Provider webhooks (issue 6), served by meter-worker's listener behind a
real nginx (proxy_pass) with governance, against a real redis-server:
signed Stripe events turn a key's answers into 402 and back to 200 within
the refresh interval; forged or expired signatures, replays, out-of-order
events, oversized and malformed bodies change nothing; Redis down answers
503 so the provider delivers again; Chargebee Basic auth and Recurly
signatures.  The delinquency poll is off here (test_sync.py covers it).

Issue 10: the listener is libmicrohttpd; signed deliveries of 20 KB, 200 KB
and exactly 1 MB are served (the hand-written one answered 404 from 16,328
bytes on), idle clients do not block deliveries, an event dated years ahead
does not freeze a customer, and ids from bodies cannot forge log lines.
"""

import base64
import json
import re
import select
import socket
import time

import pytest

from conftest import free_port, wait_for
from fakes import chargebee as cbfake
from fakes import recurly as rcfake
from fakes import stripe as stfake
from fakes.chargebee import FakeChargebee
from fakes.recurly import FakeRecurly
from fakes.stripe import FakeStripe
from test_sync import Billing, pytestmark  # noqa: F401

SECRET = "whsec_test_0123456789abcdef"
REFRESH = 0.2

CONF = r"""
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

        # provider webhooks: not metered, not governed, to the worker
        location /webhooks/ {
            meter off;
            meter_governance off;
            client_max_body_size 2m;
            proxy_pass http://127.0.0.1:@WH@;
        }
    }
"""


def call(n, key):
    return n.get("/", headers={"X-API-Key": key})[0]


class Hooks:
    """nginx + the worker daemon with webhooks for one provider."""

    def __init__(self, nginx_factory, redis, tmp_path, provider, fake,
                 idle="2s", **settings):
        self.wh_port = free_port()
        self.b = Billing(tmp_path / "w", redis, provider, fake,
                         sync__delinquency="off",
                         webhook__listen="127.0.0.1:%d" % self.wh_port,
                         webhook__timeout=idle, **settings)
        self.b.start(port=self.wh_port)
        self.n = nginx_factory(CONF, redis=redis.address, wh=self.wh_port)
        self.url = "http://127.0.0.1:%d/webhooks/%s" % (self.n.port, provider)
        self.direct = "http://127.0.0.1:%d/webhooks/%s" % (self.wh_port,
                                                           provider)

    def stop(self):
        self.b.stop()


def stripe_hooks_with(nginx_factory, redis, tmp_path, idle):
    with FakeStripe() as f:
        secret = tmp_path / "whsec"
        secret.write_text(SECRET + "\n")
        h = Hooks(nginx_factory, redis, tmp_path, "stripe", f, idle=idle,
                  stripe__webhook_secret_file=secret)
        cus = f.add_customer()
        sub = f.add_subscription(cus["id"])
        h.b.customer("acme", "mk_test_hook_1", cus["id"], sub["id"])
        h.cus, h.sub = cus["id"], sub["id"]
        h.fake = f
        wait_for(lambda: call(h.n, "mk_test_hook_1") == 200, 30)
        yield h
        h.stop()


@pytest.fixture
def stripe_hooks(nginx_factory, redis, tmp_path):
    yield from stripe_hooks_with(nginx_factory, redis, tmp_path, "2s")


@pytest.fixture
def stripe_hooks_patient(nginx_factory, redis, tmp_path):
    """Idle clients closed after 30 s: what the listener does well before
    that is its own doing, however slow the machine."""
    yield from stripe_hooks_with(nginx_factory, redis, tmp_path, "30s")


def invoice(h):
    return {"id": "in_1", "object": "invoice", "customer": h.cus,
            "subscription": h.sub, "status": "open"}


def version(redis):
    return int(redis.cmd("GET", "mtr:gov:version") or 0)


def test_stripe_failed_then_paid(stripe_hooks, redis):
    h = stripe_hooks
    st, body = stfake.send_webhook(h.url, "invoice.payment_failed",
                                   invoice(h), SECRET)
    assert st == 200, body
    assert json.loads(body)["changed"] is True
    # stored before the answer
    assert h.b.status("acme") == ("delinquent", "invoice_overdue", "sync")
    # sync is off: only the webhook's write can refuse the key, by the
    # next governance refresh; no wall-clock bound (a loaded machine)
    wait_for(lambda: call(h.n, "mk_test_hook_1") == 402, 30)

    st, body = stfake.send_webhook(h.url, "invoice.paid", invoice(h), SECRET,
                                   created=time.time() + 1)
    assert st == 200, body
    assert h.b.cust("acme")["status"] == "active"
    wait_for(lambda: call(h.n, "mk_test_hook_1") == 200, 5)


def test_subscription_updated_and_deleted(stripe_hooks):
    h = stripe_hooks
    sub = {"id": h.sub, "object": "subscription", "customer": h.cus,
           "status": "past_due"}
    now = time.time()
    st, _ = stfake.send_webhook(h.url, "customer.subscription.updated", sub,
                                SECRET, created=now)
    assert st == 200
    assert h.b.cust("acme")["status"] == "delinquent"
    # deleting the subscription settles nothing: still delinquent
    st, body = stfake.send_webhook(h.url, "customer.subscription.deleted",
                                   dict(sub, status="canceled"), SECRET,
                                   created=now + 1)
    assert st == 200 and json.loads(body)["ignored"] is True
    assert h.b.cust("acme")["status"] == "delinquent"
    st, _ = stfake.send_webhook(h.url, "customer.subscription.updated",
                                dict(sub, status="active"), SECRET,
                                created=now + 2)
    assert st == 200
    assert h.b.cust("acme")["status"] == "active"


def test_forged_expired_and_unsigned_change_nothing(stripe_hooks, redis):
    h = stripe_hooks
    v0 = version(redis)
    payload = json.dumps(stfake.event("invoice.payment_failed",
                                      invoice(h))).encode()
    cases = [
        ("wrong secret", stfake.send_payload(h.url, payload, "whsec_wrong")),
        ("expired", stfake.send_payload(h.url, payload, SECRET,
                                        t=time.time() - 301)),
        ("future", stfake.send_payload(h.url, payload, SECRET,
                                       t=time.time() + 400)),
        ("no header", stfake.post(h.url, payload,
                                  {"Content-Type": "application/json"})),
        ("tampered", stfake.post(h.url, payload.replace(b"in_1", b"in_2"), {
            "Stripe-Signature": stfake.sign(payload, SECRET)})),
        ("bad t", stfake.post(h.url, payload, {
            "Stripe-Signature": "t=abc,v1=" + "0" * 64})),
    ]
    for name, (st, body) in cases:
        assert st == 400, (name, body)
    assert h.b.cust("acme")["status"] == "active"
    assert version(redis) == v0
    assert redis.keys("mtr:wh:*") == []
    assert call(h.n, "mk_test_hook_1") == 200
    # the secret and the body never reach the log
    log = h.b.log()
    assert SECRET not in log and "in_1" not in log


def test_replayed_event_has_no_second_effect(stripe_hooks, redis):
    h = stripe_hooks
    now = int(time.time())
    failed = json.dumps(stfake.event("invoice.payment_failed", invoice(h),
                                     "evt_failed_1", now - 10)).encode()
    st, _ = stfake.send_payload(h.url, failed, SECRET)
    assert st == 200
    assert redis.keys("mtr:wh:*") == ["mtr:wh:stripe:evt_failed_1"]
    ttl = redis.cmd("TTL", "mtr:wh:stripe:evt_failed_1")
    assert 2592000 - 60 < ttl <= 2592000

    # an admin clears it by hand; the provider redelivers the old event
    h.b.ctl("delinquent", "clear", "acme")
    assert h.b.cust("acme")["status"] == "active"
    v = version(redis)
    st, body = stfake.send_payload(h.url, failed, SECRET)
    assert st == 200 and json.loads(body)["duplicate"] is True
    assert h.b.cust("acme")["status"] == "active"
    assert version(redis) == v


def test_older_event_never_overrides_newer(stripe_hooks, redis):
    h = stripe_hooks
    now = int(time.time())
    st, _ = stfake.send_webhook(h.url, "invoice.payment_failed", invoice(h),
                                SECRET, event_id="evt_new", created=now)
    assert st == 200
    # an older "paid" arrives late (Stripe does not order deliveries)
    st, body = stfake.send_webhook(h.url, "invoice.paid", invoice(h), SECRET,
                                   event_id="evt_old", created=now - 60)
    assert st == 200 and json.loads(body)["changed"] is False
    assert h.b.status("acme") == ("delinquent", "invoice_overdue", "sync")
    assert int(h.b.cust("acme")["status_at"]) == now
    time.sleep(REFRESH * 3)
    assert call(h.n, "mk_test_hook_1") == 402


def test_big_and_malformed_bodies(stripe_hooks, redis):
    h = stripe_hooks
    v0 = version(redis)
    ev = stfake.event("invoice.payment_failed", invoice(h))
    ev["padding"] = "x" * (1024 * 1024)
    big = json.dumps(ev).encode()
    assert len(big) > 1024 * 1024
    for url in (h.url, h.direct):
        st, _ = stfake.send_payload(url, big, SECRET)
        assert st == 413, url
    # signed, but not JSON
    st, body = stfake.send_payload(h.url, b'{"id": "evt_x", "type": ',
                                   SECRET)
    assert st == 400, body
    # JSON, signed, but no event
    st, body = stfake.send_payload(h.url, b'{"hello": 1}', SECRET)
    assert st == 400, body
    assert h.b.cust("acme")["status"] == "active"
    assert version(redis) == v0


def test_listener_http_edges(stripe_hooks):
    h = stripe_hooks

    def raw(data, timeout=5):
        with socket.create_connection(("127.0.0.1", h.wh_port),
                                      timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while True:
                b = s.recv(65536)
                if not b:
                    return out
                out += b

    def status(resp):
        return int(resp.split(b" ", 2)[1])

    assert status(raw(b"GET /webhooks/stripe HTTP/1.1\r\nHost: x\r\n\r\n")) \
        == 405
    assert status(raw(b"POST /webhooks/recurly HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 2\r\n\r\n{}")) == 404
    assert status(raw(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")) == 411
    assert status(raw(b"POST /webhooks/stripe HTTP/1.1\r\n"
                      b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
                      b"hello!")) == 400
    assert status(raw(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 5\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n0\r\n\r\n")) == 411
    # not a request line at all: libmicrohttpd 0.9.75 closes without an
    # answer (src/microhttpd/connection.c, parse_initial_message_line)
    assert raw(b"garbage\r\n\r\n") == b""
    assert status(raw(b"POST /webhooks/stripe HTTP/1.1\r\nX: "
                      + b"a" * 20000 + b"\r\n\r\n")) == 431
    # far beyond MHD's per-connection memory: MHD's own 431
    assert status(raw(b"POST /webhooks/stripe HTTP/1.1\r\nX: "
                      + b"a" * 100000 + b"\r\n\r\n")) == 431
    # a body that never comes: closed after webhook.timeout (2s) of
    # silence, without an answer (MHD has no 408)
    t0 = time.monotonic()
    assert raw(b"POST /webhooks/stripe HTTP/1.1\r\n"
               b"Content-Length: 10\r\n\r\nabc") == b""
    assert 1.5 < time.monotonic() - t0 < 5
    # the listener still serves
    st, _ = stfake.send_webhook(h.direct, "invoice.paid", invoice(h), SECRET)
    assert st == 200


def padded(h, event_type, size, event_id, created):
    """A signed-to-be Stripe event of exactly size bytes."""
    ev = stfake.event(event_type, invoice(h), event_id, created)
    ev["padding"] = ""
    n = len(json.dumps(ev).encode())
    ev["padding"] = "x" * (size - n)
    payload = json.dumps(ev).encode()
    assert len(payload) == size
    return payload


@pytest.mark.parametrize("size", [16328, 20 * 1024, 200 * 1024, 1024 * 1024])
def test_big_signed_deliveries_apply(stripe_hooks, redis, size):
    """Real invoice events are often over 16 KB; exactly 1 MB is the
    limit and is served, through nginx and directly."""
    h = stripe_hooks
    now = int(time.time())
    failed = padded(h, "invoice.payment_failed", size, "evt_big_f", now)
    st, body = stfake.send_payload(h.url, failed, SECRET)
    assert st == 200, body
    assert json.loads(body)["changed"] is True
    assert h.b.status("acme") == ("delinquent", "invoice_overdue", "sync")

    paid = padded(h, "invoice.paid", size, "evt_big_p", now + 1)
    st, body = stfake.send_payload(h.direct, paid, SECRET)
    assert st == 200, body
    assert h.b.cust("acme")["status"] == "active"
    assert sorted(redis.keys("mtr:wh:*")) == ["mtr:wh:stripe:evt_big_f",
                                              "mtr:wh:stripe:evt_big_p"]


def test_one_byte_over_the_limit_is_413(stripe_hooks, redis):
    h = stripe_hooks
    v0 = version(redis)
    big = padded(h, "invoice.payment_failed", 1024 * 1024 + 1, "evt_over",
                 time.time())
    for url in (h.url, h.direct):
        st, body = stfake.send_payload(url, big, SECRET)
        assert st == 413, (url, body)
    assert h.b.cust("acme")["status"] == "active"
    assert version(redis) == v0


def idle_clients(port, n, source="127.0.0.1"):
    """n connections that sent half a request head and wait."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def refused(s):
    """closed by the server without an answer (reset: it had unread data)"""
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def test_idle_clients_do_not_block_deliveries(stripe_hooks_patient):
    """64 idle clients: the listener keeps 32 of one address (the rest are
    closed at once) and serves another; through nginx, which buffers the
    request before it connects upstream, they never reach the listener.
    Idle clients time out after 30 s here: the bounds below have room for
    a loaded machine and still tell "at once" from "at the timeout"."""
    h = stripe_hooks_patient
    socks = idle_clients(h.wh_port, 64, source="127.0.0.2")
    try:
        closed = set()

        def closing():
            closed.update(select.select([s for s in socks
                                         if s not in closed], [], [],
                                        0.2)[0])
            return len(closed) >= 64 - 32
        wait_for(closing, 15)
        # and no more than those
        assert not select.select([s for s in socks if s not in closed],
                                 [], [], 0.5)[0]
        assert all(refused(s) for s in closed)
        assert len(closed) == 64 - 32
        t0 = time.monotonic()
        st, body = stfake.send_webhook(h.direct, "invoice.payment_failed",
                                       invoice(h), SECRET,
                                       event_id="evt_idle_1")
        assert st == 200, body
        assert time.monotonic() - t0 < 10
        assert h.b.cust("acme")["status"] == "delinquent"
    finally:
        for s in socks:
            s.close()

    socks = idle_clients(h.n.port, 64)
    try:
        st, body = stfake.send_webhook(h.url, "invoice.paid", invoice(h),
                                       SECRET, event_id="evt_idle_2",
                                       created=time.time() + 1)
        assert st == 200, body
        assert h.b.cust("acme")["status"] == "active"
    finally:
        for s in socks:
            s.close()


def test_future_dated_event_does_not_freeze(stripe_hooks, redis):
    """A signed event dated ten years ahead is ordered as received: a real
    event after it applies, and manual actions always apply."""
    h = stripe_hooks
    now = int(time.time())
    ahead = now + 10 * 365 * 86400
    st, body = stfake.send_webhook(h.url, "invoice.payment_failed",
                                   invoice(h), SECRET, event_id="evt_10y",
                                   created=ahead)
    assert st == 200, body
    assert h.b.cust("acme")["status"] == "delinquent"
    at = int(h.b.cust("acme")["status_at"])
    assert now <= at <= int(time.time())
    assert "ordered as received" in h.b.log()

    st, body = stfake.send_webhook(h.url, "invoice.paid", invoice(h), SECRET,
                                   event_id="evt_real", created=at)
    assert st == 200 and json.loads(body)["changed"] is True, body
    assert h.b.cust("acme")["status"] == "active"

    r = h.b.ctl("delinquent", "set", "acme")
    assert "is now delinquent" in r.stdout
    assert h.b.status("acme") == ("delinquent", "invoice_overdue", "manual")

    # a time recorded ahead before this fix: manual still applies
    redis.cmd("HSET", "mtr:cust:{acme}", "status_at", str(ahead))
    r = h.b.ctl("delinquent", "clear", "acme")
    assert "is now active" in r.stdout
    assert h.b.cust("acme")["status"] == "active"
    assert int(h.b.cust("acme")["status_at"]) <= int(time.time())
    wait_for(lambda: call(h.n, "mk_test_hook_1") == 200, 30)


def test_ids_from_bodies_cannot_forge_log_lines(stripe_hooks):
    h = stripe_hooks
    forged = "<0>forged: customer acme paid"
    obj = {"id": "in_x", "customer": "cus_evil\n" + forged,
           "subscription": "sub_evil\r\n" + forged}
    st, body = stfake.send_webhook(h.url, "invoice.payment_failed", obj,
                                   SECRET, event_id="evt_\n" + forged)
    assert st == 200 and json.loads(body)["ignored"] == "unknown customer"
    log = h.b.log()
    assert not re.search(r"^<0>", log, re.M)
    assert "cus_evil\\x0a<0>forged" in log
    assert "sub_evil\\x0d\\x0a<0>forged" in log


def test_reload_and_sigterm_with_the_listener(nginx_factory, redis, tmp_path,
                                              monkeypatch):
    """main.c's signals with libmicrohttpd's thread: SIGHUP stops and
    restarts the listener (RELOADING=1, READY=1), deliveries work after
    it; SIGTERM exits at once although clients are connected."""
    import signal
    sock_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    msgs = []

    def got(text):
        def f():
            try:
                msgs.append(ns.recv(4096).decode())
            except socket.timeout:
                pass
            return any(text in m for m in msgs)
        return f

    with FakeStripe() as f:
        secret = tmp_path / "whsec"
        secret.write_text(SECRET + "\n")
        # idle clients time out after 30 s: the exit below is far sooner
        h = Hooks(nginx_factory, redis, tmp_path, "stripe", f, idle="30s",
                  stripe__webhook_secret_file=secret)
        try:
            cus = f.add_customer()
            sub = f.add_subscription(cus["id"])
            h.b.customer("acme", "mk_test_hook_1", cus["id"], sub["id"])
            h.cus, h.sub = cus["id"], sub["id"]
            wait_for(got("READY=1"), 15)

            idle = idle_clients(h.wh_port, 3)
            msgs.clear()
            h.b.proc.send_signal(signal.SIGHUP)
            wait_for(got("READY=1"), 15)
            assert any("RELOADING=1" in m for m in msgs)
            assert h.b.log().count("webhook: listening on") == 2
            st, body = stfake.send_webhook(h.direct, "invoice.payment_failed",
                                           invoice(h), SECRET,
                                           event_id="evt_after_hup")
            assert st == 200, body
            assert h.b.cust("acme")["status"] == "delinquent"
            for c in idle:
                c.close()

            idle = idle_clients(h.wh_port, 3)
            t0 = time.monotonic()
            h.b.proc.send_signal(signal.SIGTERM)
            assert h.b.proc.wait(30) == 0
            assert time.monotonic() - t0 < 15
            assert all(refused(c) for c in idle)
            for c in idle:
                c.close()
        finally:
            h.stop()
            ns.close()


def test_unknown_customer_is_acknowledged(stripe_hooks, redis):
    h = stripe_hooks
    v0 = version(redis)
    st, body = stfake.send_webhook(h.url, "invoice.payment_failed", {
        "id": "in_9", "customer": "cus_other", "subscription": "sub_other"},
        SECRET)
    assert st == 200 and json.loads(body)["ignored"] == "unknown customer"
    assert version(redis) == v0


def test_redis_down_answers_503_then_retry_applies(stripe_hooks, redis):
    h = stripe_hooks
    payload = json.dumps(stfake.event("invoice.payment_failed", invoice(h),
                                      "evt_retry")).encode()
    redis.stop("save")
    try:
        st, _ = stfake.send_payload(h.url, payload, SECRET)
        assert st == 503
    finally:
        redis.start()
    # the listener reconnects (at most once a second); the redelivery
    # applies the change
    wait_for(lambda: stfake.send_payload(h.url, payload, SECRET)[0] == 200,
             10)
    assert h.b.status("acme") == ("delinquent", "invoice_overdue", "sync")
    assert redis.keys("mtr:wh:*") == ["mtr:wh:stripe:evt_retry"]


# ------------------------------------------------------------- Chargebee

def test_chargebee_basic_auth(nginx_factory, redis, tmp_path):
    with FakeChargebee() as f:
        pw = (tmp_path / "cbpw")
        pw.write_text("s3cret-pw\n")
        h = Hooks(nginx_factory, redis, tmp_path, "chargebee", f,
                  chargebee__site="x", chargebee__webhook_user="hooks",
                  chargebee__webhook_password_file=pw)
        try:
            c = f.add_customer("cbc1")
            s = f.add_subscription("cbs1", customer_id=c["id"])
            h.b.customer("cbacme", "mk_test_cb", c["id"], s["id"])
            content = {"customer": {"id": "cbc1"},
                       "subscription": {"id": "cbs1",
                                        "customer_id": "cbc1"},
                       "invoice": {"customer_id": "cbc1",
                                   "subscription_id": "cbs1"}}
            now = int(time.time())
            st, _ = cbfake.send_webhook(h.url, "payment_failed", content,
                                        "hooks", "wrong", occurred_at=now)
            assert st == 401
            st, _ = cbfake.send_webhook(h.url, "payment_failed", content,
                                        "other", "s3cret-pw",
                                        occurred_at=now)
            assert st == 401
            assert h.b.cust("cbacme")["status"] == "active"

            st, _ = cbfake.send_webhook(h.url, "payment_failed", content,
                                        "hooks", "s3cret-pw",
                                        event_id="ev_cb_1", occurred_at=now)
            assert st == 200
            assert h.b.status("cbacme") == ("delinquent", "invoice_overdue",
                                            "sync")
            wait_for(lambda: call(h.n, "mk_test_cb") == 402, 30)

            # paid, but the subscription still owes another invoice
            owing = dict(content, subscription=dict(
                content["subscription"], due_invoices_count=1))
            st, _ = cbfake.send_webhook(h.url, "payment_succeeded", owing,
                                        "hooks", "s3cret-pw",
                                        occurred_at=now + 1)
            assert st == 200
            assert h.b.cust("cbacme")["status"] == "delinquent"

            st, _ = cbfake.send_webhook(h.url, "payment_succeeded", content,
                                        "hooks", "s3cret-pw",
                                        occurred_at=now + 2)
            assert st == 200
            assert h.b.cust("cbacme")["status"] == "active"
            wait_for(lambda: call(h.n, "mk_test_cb") == 200, 30)
            assert "s3cret-pw" not in h.b.log()
            assert base64.b64encode(b"hooks:s3cret-pw").decode() \
                not in h.b.log()
        finally:
            h.stop()


# --------------------------------------------------------------- Recurly

def test_recurly_signature(nginx_factory, redis, tmp_path):
    with FakeRecurly() as f:
        key = tmp_path / "rkey"
        key.write_text("recurly-hook-key\n")
        h = Hooks(nginx_factory, redis, tmp_path, "recurly", f,
                  recurly__webhook_key_file=key)
        try:
            f.add_account("racme")
            s = f.add_subscription(account="racme", plan="api")
            h.b.customer("racme", "mk_test_rc", "racme", s["id"])
            now = time.time()

            st, _ = rcfake.send_webhook(h.url, "charge_invoice", "past_due",
                                        "racme", "wrong-key")
            assert st == 400
            st, _ = rcfake.send_webhook(h.url, "charge_invoice", "past_due",
                                        "racme", "recurly-hook-key",
                                        t_ms=(now - 600) * 1000)
            assert st == 400
            assert h.b.cust("racme")["status"] == "active"

            st, _ = rcfake.send_webhook(h.url, "charge_invoice", "past_due",
                                        "racme", "recurly-hook-key",
                                        notification_id="n1",
                                        event_time=now)
            assert st == 200
            assert h.b.cust("racme")["status"] == "delinquent"
            wait_for(lambda: call(h.n, "mk_test_rc") == 402, 30)

            # a second signature (key rotation) in the header is accepted
            body = json.dumps({"id": "n2", "object_type": "charge_invoice",
                               "event_type": "paid",
                               "event_time": rcfake.iso(now + 1),
                               "account_code": "racme"}).encode()
            sig = rcfake.sign(body, "recurly-hook-key")
            t_ms, good = sig.split(",")
            st, _ = stfake.post(h.url, body, {
                "Content-Type": "application/json",
                "recurly-signature": "%s,%s,%s" % (t_ms, "0" * 64, good)})
            assert st == 200
            assert h.b.cust("racme")["status"] == "active"
            wait_for(lambda: call(h.n, "mk_test_rc") == 200, 30)
        finally:
            h.stop()


# ------------------------------------------------- register to 402 and back

def test_register_then_webhooks(nginx_factory, redis, tmp_path):
    """The seeds' flow: meterctl register -> the key works through nginx ->
    the provider's invoice fails -> webhook -> 402 -> paid -> 200."""
    with FakeStripe() as f:
        secret = tmp_path / "whsec"
        secret.write_text(SECRET + "\n")
        h = Hooks(nginx_factory, redis, tmp_path, "stripe", f,
                  stripe__webhook_secret_file=secret,
                  plan__default__stripe_price="price_calls")
        try:
            r = h.b.ctl("register", "--email", "flow@example.com", "--json")
            out = json.loads(r.stdout)
            key, cid = out["key"], out["customer"]
            wait_for(lambda: call(h.n, key) == 200, 30)
            cus, sub = f.customers[0]["id"], f.subscriptions[0]["id"]
            inv = {"id": "in_f", "object": "invoice", "customer": cus,
                   "subscription": sub}
            now = int(time.time())
            st, _ = stfake.send_webhook(h.url, "invoice.payment_failed", inv,
                                        SECRET, created=now)
            assert st == 200
            assert h.b.cust(cid)["status"] == "delinquent"
            wait_for(lambda: call(h.n, key) == 402, 30)
            st, _ = stfake.send_webhook(h.url, "invoice.paid", inv, SECRET,
                                        created=now + 1)
            assert st == 200
            wait_for(lambda: call(h.n, key) == 200, 30)
        finally:
            h.stop()


def test_test_config_checks_webhook_settings(redis, tmp_path):
    """meter-worker -t refuses webhooks it could not verify."""
    import subprocess
    from test_providers import WORKER
    secret = tmp_path / "whsec"
    secret.write_text("whsec_test_secret\n")
    key = tmp_path / "sk"
    key.write_text("sk_test_x\n")
    base = ["redis = %s" % redis.address, "provider = stripe",
            "stripe.api_key_file = %s" % key,
            "webhook.listen = 127.0.0.1:1"]

    def check(*extra):
        conf = tmp_path / "w.conf"
        conf.write_text("\n".join(base + list(extra)) + "\n")
        return subprocess.run([str(WORKER), "-c", str(conf), "-t"],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)

    r = check()
    assert r.returncode == 78
    assert "stripe.webhook_secret_file" in r.stderr
    r = check("stripe.webhook_secret_file = %s" % (tmp_path / "missing"))
    assert r.returncode == 78
    r = check("stripe.webhook_secret_file = %s" % secret,
              "webhook.timeout = soon")
    assert r.returncode == 78 and "webhook.timeout" in r.stderr
    r = check("stripe.webhook_secret_file = %s" % secret)
    assert r.returncode == 0, r.stderr
    assert "whsec_test_secret" not in r.stdout + r.stderr
    # the secret itself put where its file name belongs: refused, and no
    # part of it is printed
    r = check("stripe.webhook_secret_file = whsec_live_0123456789abcdef")
    assert r.returncode == 78
    assert "stripe.webhook_secret_file" in r.stderr
    assert "not the secret itself" in r.stderr
    assert "whsec_live" not in r.stdout + r.stderr
    assert "0123456789" not in r.stdout + r.stderr
    base[2] = "stripe.api_key_file = sk_live_51HtQ7xSecretValue0123"
    r = check("stripe.webhook_secret_file = %s" % secret)
    assert r.returncode == 78
    assert "stripe.api_key_file" in r.stderr
    assert "sk_live" not in r.stdout + r.stderr
    assert "SecretValue" not in r.stdout + r.stderr


def test_stripe_dunning_end_does_not_flip_flop(stripe_hooks, redis, tmp_path):
    """Owed money (PROVIDERS.md): a subscription cancelled at the end of
    dunning leaves an uncollectible invoice; neither a later webhook nor
    the poll clears the customer until it is paid."""
    h = stripe_hooks
    inv = h.fake.add_invoice(h.cus, "open", subscription=h.sub)
    st, body = stfake.send_webhook(h.url, "invoice.payment_failed", inv,
                                   SECRET)
    assert st == 200, body
    assert h.b.status("acme") == ("delinquent", "invoice_overdue", "sync")
    # dunning gives up: the invoice is uncollectible, the subscription ends
    h.fake.set_invoice_status(inv["id"], "uncollectible")
    sub = h.fake.set_subscription_status(h.sub, "canceled")
    st, body = stfake.send_webhook(h.url, "customer.subscription.deleted",
                                   sub, SECRET, created=time.time() + 1)
    assert st == 200, body
    assert h.b.status("acme")[0] == "delinquent"
    # another invoice paid: the uncollectible one is still owed
    paid = h.fake.add_invoice(h.cus, "paid", subscription=h.sub)
    st, body = stfake.send_webhook(h.url, "invoice.paid", paid, SECRET,
                                   created=time.time() + 2)
    assert st == 200, body
    assert h.b.status("acme")[0] == "delinquent"
    wait_for(lambda: call(h.n, "mk_test_hook_1") == 402, 30)
    # the poll agrees
    poll = Billing(tmp_path / "poll", redis, "stripe", h.fake)
    poll.sync()
    assert h.b.status("acme")[0] == "delinquent"
    # paid at last: the webhook clears, and the poll keeps it cleared
    h.fake.set_invoice_status(inv["id"], "paid")
    st, body = stfake.send_webhook(h.url, "invoice.paid", inv, SECRET,
                                   created=time.time() + 3)
    assert st == 200, body
    assert h.b.cust("acme")["status"] == "active"
    poll.sync()
    assert h.b.cust("acme")["status"] == "active"
    wait_for(lambda: call(h.n, "mk_test_hook_1") == 200, 30)


def test_stripe_thin_error_report_dead_letters(stripe_hooks, redis):
    """v1.billing.meter.error_report_triggered: a thin v2 event (created a
    string, no data) signed like the others; the event is fetched and the
    records it names are dead-lettered with the error code."""
    h = stripe_hooks
    rid = "0123456789abcdef0123456789abcdef"
    thin = h.fake.error_report([rid, "not-ours"], code="archived_meter")
    st, body = stfake.send_payload(h.url, json.dumps(thin).encode(), SECRET)
    assert st == 200, body
    assert h.fake.requests_to("GET", "/v2/core/events/" + thin["id"])
    rec = redis.hgetall("mtr:{worker}:r:" + rid)
    assert rec["state"] == "dead" and rec["error_code"] == "archived_meter"
    assert rec["rejected_by"] == thin["id"]
    assert redis.cmd("ZSCORE", "mtr:{worker}:dead", rid) is not None
    out = h.b.ctl("status").stdout
    assert rid in out and "archived_meter" in out
    # unsigned: refused, nothing fetched
    n = len(h.fake.requests)
    st, _ = stfake.post(h.url, json.dumps(thin).encode(),
                        {"Content-Type": "application/json"})
    assert st == 400 and len(h.fake.requests) == n
