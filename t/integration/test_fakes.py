"""The provider fakes themselves: auth, encoding, dedupe, scripted failures,
lists.  Plain urllib, no worker."""

import base64
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import wait_for
from fakes import (FakeChargebee, FakeLago, FakeOpenMeter, FakeRecurly,
                   FakeStripe)
from fakes.recurly import ACCEPT
from fakes.stripe import send_webhook, sign


def call(url, method="GET", data=None, headers=None, timeout=10):
    """(status, headers, parsed body or raw bytes)."""
    if isinstance(data, dict):
        data = urllib.parse.urlencode(data).encode()
        headers = dict({"Content-Type":
                        "application/x-www-form-urlencoded"},
                       **(headers or {}))
    req = urllib.request.Request(url, data=data, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, h, body = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, h, body = e.code, e.headers, e.read()
    try:
        body = json.loads(body) if body else None
    except ValueError:
        pass
    return status, h, body


def basic(user, pw=""):
    return "Basic " + base64.b64encode(
        ("%s:%s" % (user, pw)).encode()).decode()


# ---------------------------------------------------------------- stripe

@pytest.fixture
def stripe():
    with FakeStripe(api_key="sk_test_abc") as f:
        yield f


def meter_event(stripe, ident, value, customer="cus_1", key=None,
                auth="Bearer sk_test_abc", ts=None, name="api_calls"):
    h = {"Authorization": auth}
    if key:
        h["Idempotency-Key"] = key
    return call(stripe.url + "/v1/billing/meter_events", "POST", {
        "event_name": name, "payload[stripe_customer_id]": customer,
        "payload[value]": str(value), "identifier": ident,
        "timestamp": str(int(time.time()) - 60 if ts is None else ts)}, h)


def test_stripe_auth(stripe):
    s, _, b = meter_event(stripe, "e1", 5, auth="Bearer sk_test_wrong")
    assert s == 401
    assert b["error"]["type"] == "invalid_request_error"
    assert "sk_test_wrong" not in b["error"]["message"]
    s, _, b = call(stripe.url + "/v1/billing/meter_events", "POST",
                   {"event_name": "x"})
    assert s == 401 and "API key" in b["error"]["message"]
    # Basic with the key as user is accepted too
    s, _, _ = meter_event(stripe, "e2", 5, auth=basic("sk_test_abc"))
    assert s == 200
    assert stripe.total("cus_1", "api_calls") == 5


def test_stripe_form_only(stripe):
    s, _, b = call(stripe.url + "/v1/billing/meter_events", "POST",
                   json.dumps({"event_name": "x"}).encode(),
                   {"Authorization": "Bearer sk_test_abc",
                    "Content-Type": "application/json"})
    assert s == 400
    assert stripe.events == []


def test_stripe_identifier_dedupe(stripe):
    assert meter_event(stripe, "id-1", 7)[0] == 200
    s, h, b = meter_event(stripe, "id-1", 7)
    # as reported by users (PROVIDERS.md): no code, Should-Retry false
    assert s == 400 and h["Stripe-Should-Retry"] == "false"
    assert b["error"]["type"] == "invalid_request_error"
    assert b["error"]["message"].startswith(
        "An event already exists with identifier id-1")
    assert meter_event(stripe, "id-2", 3)[0] == 200
    assert meter_event(stripe, "id-3", 4, customer="cus_2")[0] == 200
    assert stripe.total("cus_1", "api_calls") == 10
    assert stripe.total("cus_2", "api_calls") == 4
    assert stripe.duplicates == 1


def test_stripe_idempotency_replay_and_mismatch(stripe):
    s1, h1, b1 = meter_event(stripe, "id-1", 7, key="k1")
    s2, h2, b2 = meter_event(stripe, "id-1", 7, key="k1")
    assert (s1, s2) == (200, 200) and b1 == b2
    assert h1.get("Idempotent-Replayed") is None
    assert h2["Idempotent-Replayed"] == "true"
    s, _, b = meter_event(stripe, "id-1", 8, key="k1")
    assert s == 400 and b["error"]["type"] == "idempotency_error"
    assert stripe.total("cus_1", "api_calls") == 7


def test_stripe_saved_500_is_replayed(stripe):
    stripe.fail_next(1, 500)
    s, _, b = meter_event(stripe, "id-9", 2, key="k9")
    assert s == 500 and b["error"]["type"] == "api_error"
    s, h, _ = meter_event(stripe, "id-9", 2, key="k9")
    assert s == 500 and h["Idempotent-Replayed"] == "true"
    # a fresh key runs the request; the identifier still dedupes
    assert meter_event(stripe, "id-9", 2, key="k9b")[0] == 200
    assert meter_event(stripe, "id-9", 2, key="k9c")[0] == 400
    assert stripe.total("cus_1", "api_calls") == 2


def test_stripe_memory_expires_after_24h(stripe):
    clock = [time.time()]
    ts = int(clock[0]) - 60
    stripe.now = lambda: clock[0]
    assert meter_event(stripe, "w1", 5, key="wk", ts=ts)[0] == 200
    clock[0] += 23 * 3600
    s, h, _ = meter_event(stripe, "w1", 5, key="wk", ts=ts)
    assert s == 200 and h["Idempotent-Replayed"] == "true"
    assert meter_event(stripe, "w1", 5, ts=ts)[0] == 400
    # past the window both are forgotten: the same event counts again
    clock[0] += 2 * 3600
    s, h, _ = meter_event(stripe, "w1", 5, key="wk", ts=ts)
    assert s == 200 and h.get("Idempotent-Replayed") is None
    assert stripe.total("cus_1", "api_calls") == 10


def test_stripe_version_and_usage_records_removed(stripe):
    s, _, b = call(stripe.url + "/v1/subscription_items/si_1/usage_records",
                   "POST", {"quantity": "3"},
                   {"Authorization": "Bearer sk_test_abc",
                    "Stripe-Version": "2025-03-31.basil"})
    assert s == 400 and "not supported" in b["error"]["message"]
    s, _, _ = call(stripe.url + "/v1/subscription_items/si_1/usage_records",
                   "POST", {"quantity": "3"},
                   {"Authorization": "Bearer sk_test_abc",
                    "Stripe-Version": "2025-02-24.acacia"})
    assert s == 200
    assert stripe.versions[-2:] == ["2025-03-31.basil", "2025-02-24.acacia"]


def test_stripe_v2_event_fetch(stripe):
    thin = stripe.error_report(["a" * 32])
    assert isinstance(thin["created"], str) and "data" not in thin
    s, _, b = call(stripe.url + "/v2/core/events/" + thin["id"],
                   headers={"Authorization": "Bearer sk_test_abc"})
    assert s == 200
    sample = b["data"]["reason"]["error_types"][0]["sample_errors"][0]
    assert sample["request"]["identifier"] == "a" * 32


def test_stripe_timestamp_window_and_values(stripe):
    now = int(time.time())
    s, _, b = meter_event(stripe, "old", 1, ts=now - 35 * 86400 - 10)
    assert s == 400 and b["error"]["param"] == "timestamp"
    s, _, b = meter_event(stripe, "future", 1, ts=now + 600)
    assert s == 400
    assert meter_event(stripe, "frac", "1.5")[0] == 400
    assert meter_event(stripe, "ok", 1, ts=now - 34 * 86400)[0] == 200
    assert stripe.total("cus_1", "api_calls") == 1


def test_stripe_429_retry_after(stripe):
    stripe.rate_limit_next(1, retry_after=3)
    s, h, b = meter_event(stripe, "r1", 1, key="rk")
    # Stripe documents no Retry-After for 429 (stripe-node's
    # _getSleepTimeInMS backs off on its own)
    assert s == 429 and h.get("Retry-After") is None
    assert b["error"]["code"] == "rate_limit"
    # 429s are not saved under the key
    assert meter_event(stripe, "r1", 1, key="rk")[0] == 200
    assert stripe.total("cus_1", "api_calls") == 1


def test_stripe_scripted_400_and_hang(stripe):
    stripe.fail_next(1, 400)
    assert meter_event(stripe, "a", 1)[0] == 400
    # a hang far longer than the client's timeout: the bound tells one
    # from the other on a loaded machine (the handler is a daemon thread)
    stripe.hang_next(1, seconds=10)
    t = time.monotonic()
    with pytest.raises((urllib.error.URLError, socket.timeout,
                        ConnectionError)):
        meter_event_timeout(stripe, "b", 1, timeout=0.5)
    assert time.monotonic() - t < 5
    assert stripe.total("cus_1", "api_calls") == 0
    # processed, then the answer is lost; the client may give up before
    # the handler thread ran, so the count is waited for
    stripe.hang_next(1, seconds=1, after=True)
    with pytest.raises((urllib.error.URLError, socket.timeout,
                        ConnectionError)):
        meter_event_timeout(stripe, "c", 4, timeout=0.3)
    wait_for(lambda: stripe.total("cus_1", "api_calls") == 4, 30)


def meter_event_timeout(stripe, ident, value, timeout):
    data = urllib.parse.urlencode({
        "event_name": "api_calls", "payload[stripe_customer_id]": "cus_1",
        "payload[value]": str(value), "identifier": ident}).encode()
    req = urllib.request.Request(
        stripe.url + "/v1/billing/meter_events", data=data, method="POST",
        headers={"Authorization": "Bearer sk_test_abc",
                 "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status


def test_stripe_v2_stream(stripe):
    h = {"Authorization": "Bearer sk_test_abc",
         "Content-Type": "application/json"}
    s, _, sess = call(stripe.url + "/v2/billing/meter_event_session", "POST",
                      b"{}", h)
    assert s == 200 and sess["authentication_token"].startswith("mes_")
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))

    def stream(tok, ident, value):
        body = {"events": [{"identifier": ident, "event_name": "api_calls",
                            "timestamp": ts,
                            "payload": {"stripe_customer_id": "cus_1",
                                        "value": str(value)}}]}
        return call(stripe.url + "/v2/billing/meter_event_stream", "POST",
                    json.dumps(body).encode(),
                    {"Authorization": "Bearer " + tok,
                     "Content-Type": "application/json"})

    tok = sess["authentication_token"]
    assert stream("sk_test_abc", "s1", 5)[0] == 401
    assert stream(tok, "s1", 5)[0] == 200
    assert stream(tok, "s1", 5)[0] == 200           # deduped, silently
    assert stream(tok, "s2", 2)[0] == 200
    assert stripe.total("cus_1", "api_calls") == 7
    stripe.expire_sessions()
    s, _, b = stream(tok, "s3", 1)
    assert s == 401
    assert b["error"]["code"] == "billing_meter_event_session_expired"
    assert stripe.total("cus_1", "api_calls") == 7


def test_stripe_usage_records(stripe):
    h = {"Authorization": "Bearer sk_test_abc"}
    for q in (3, 4):
        s, _, b = call(stripe.url + "/v1/subscription_items/si_1/"
                       "usage_records", "POST",
                       {"quantity": str(q), "timestamp": "1700000000",
                        "action": "increment"}, h)
        assert s == 200 and b["object"] == "usage_record"
    assert stripe.usage_total("si_1") == 7
    assert stripe.usage_total("si_2") == 0


def test_stripe_onboarding_lists(stripe):
    h = {"Authorization": "Bearer sk_test_abc"}
    ids = []
    for i in range(5):
        s, _, c = call(stripe.url + "/v1/customers", "POST",
                       {"name": "c%d" % i, "email": "c%d@x" % i,
                        "metadata[plan]": "pro"}, h)
        assert s == 200 and c["metadata"] == {"plan": "pro"}
        ids.append(c["id"])
    s, _, page = call(stripe.url + "/v1/customers?limit=2", headers=h)
    assert [c["id"] for c in page["data"]] == ids[:2] and page["has_more"]
    s, _, page = call(stripe.url + "/v1/customers?limit=3&starting_after="
                      + ids[2], headers=h)
    assert [c["id"] for c in page["data"]] == ids[3:]
    assert page["has_more"] is False
    s, _, sub = call(stripe.url + "/v1/subscriptions", "POST",
                     {"customer": ids[0], "items[0][price]": "price_1"}, h)
    assert sub["status"] == "active"
    assert sub["items"]["data"][0]["price"]["id"] == "price_1"
    stripe.set_subscription_status(sub["id"], "past_due")
    s, _, page = call(stripe.url + "/v1/subscriptions?status=past_due",
                      headers=h)
    assert [x["id"] for x in page["data"]] == [sub["id"]]
    stripe.add_invoice(ids[0], status="open")
    stripe.add_invoice(ids[1], status="paid")
    s, _, page = call(stripe.url + "/v1/invoices?status=open", headers=h)
    assert [i["customer"] for i in page["data"]] == [ids[0]]


def test_stripe_webhook_signature():
    import hashlib
    import hmac
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    got = {}

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            got["sig"] = self.headers["Stripe-Signature"]
            got["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.handle_request, daemon=True)
    th.start()
    status, _ = send_webhook("http://127.0.0.1:%d/hook" % srv.server_port,
                             "invoice.payment_failed", {"id": "in_1"},
                             "whsec_x", t=1700000000)
    th.join(5)
    srv.server_close()
    assert status == 200
    t, v1 = [p.split("=", 1)[1] for p in got["sig"].split(",")]
    assert t == "1700000000"
    want = hmac.new(b"whsec_x", b"1700000000." + got["body"],
                    hashlib.sha256).hexdigest()
    assert v1 == want
    assert sign(got["body"], "whsec_x", 1700000000) == got["sig"]
    assert json.loads(got["body"])["type"] == "invoice.payment_failed"


# ---------------------------------------------------------------- chargebee

@pytest.fixture
def chargebee():
    with FakeChargebee(api_key="cb_key") as f:
        f.add_subscription("sub_A", customer_id="cust_A",
                           item_prices=["calls-USD-Monthly"])
        yield f


def usage(cb, uid, q, date, key=None, auth=None, sub="sub_A",
          item="calls-USD-Monthly"):
    h = {"Authorization": auth or basic("cb_key")}
    if key:
        h["chargebee-idempotency-key"] = key
    return call(cb.url + "/api/v2/subscriptions/%s/usages" % sub, "POST",
                {"item_price_id": item, "quantity": str(q),
                 "usage_date": str(date), "id": uid}, h)


def test_chargebee_auth(chargebee):
    s, _, b = usage(chargebee, "u1", 1, 1700000000, auth=basic("nope"))
    assert s == 401 and b["api_error_code"] == "api_authentication_failed"
    s, _, b = usage(chargebee, "u1", 1, 1700000000,
                    auth=basic("cb_key", "pw"))
    assert s == 401
    assert chargebee.usages == []


def test_chargebee_usage_rules(chargebee):
    s, _, b = usage(chargebee, "u1", 5, 1700000000)
    assert s == 200 and b["usage"]["quantity"] == "5"
    # usage id unique
    s, _, b = usage(chargebee, "u1", 5, 1700000001)
    assert s == 400 and b["param"] == "id"
    # one usage per (subscription, item price, usage_date)
    s, _, b = usage(chargebee, "u2", 5, 1700000000)
    assert s == 400 and b["param"] == "usage_date"
    s, _, b = usage(chargebee, "u3", 5, 1700000000, sub="sub_missing")
    assert s == 404 and b["api_error_code"] == "resource_not_found"
    s, _, b = usage(chargebee, "u4", 5, 1700000002, item="other")
    assert s == 400 and b["param"] == "item_price_id"
    assert usage(chargebee, "u5", 2, 1700000003)[0] == 200
    assert chargebee.total("sub_A", "calls-USD-Monthly") == 7
    # form only
    s, _, _ = call(chargebee.url + "/api/v2/subscriptions/sub_A/usages",
                   "POST", b'{"quantity": 1}',
                   {"Authorization": basic("cb_key"),
                    "Content-Type": "application/json"})
    assert s == 400


def test_chargebee_idempotency(chargebee):
    s1, h1, b1 = usage(chargebee, "u1", 5, 1700000000, key="k1")
    s2, h2, b2 = usage(chargebee, "u1", 5, 1700000000, key="k1")
    assert (s1, s2) == (200, 200) and b1 == b2
    assert h1.get("chargebee-idempotency-replayed") is None
    assert h2["chargebee-idempotency-replayed"] == "true"
    chargebee.expire_idempotency()
    s, _, b = usage(chargebee, "u1", 5, 1700000000, key="k1")
    assert s == 400 and b["param"] == "id"
    assert chargebee.total("sub_A", "calls-USD-Monthly") == 5
    # a 5xx is not saved: the retry runs
    chargebee.fail_next(1, 503)
    assert usage(chargebee, "u2", 1, 1700000009, key="k2")[0] == 503
    assert usage(chargebee, "u2", 1, 1700000009, key="k2")[0] == 200
    assert chargebee.total("sub_A", "calls-USD-Monthly") == 6


def test_chargebee_unbillable_usage_flagged(chargebee):
    """Chargebee answers 200 and never bills usage dated before the start,
    after the cancellation or in an invoiced term: the fake flags it."""
    sub = chargebee.subscriptions["sub_A"]
    start, term = sub["started_at"], sub["current_term_start"]
    assert usage(chargebee, "early", 1, start - 60)[0] == 200
    assert usage(chargebee, "old_term", 1, term - 60)[0] == 200
    assert usage(chargebee, "ok", 1, term + 60)[0] == 200
    chargebee.cancel("sub_A", at=term + 3600)
    assert usage(chargebee, "late", 1, term + 7200)[0] == 200
    assert sorted(u["id"] for u in chargebee.unbillable()) == [
        "early", "late", "old_term"]
    # once the term is invoiced, usage dated in it is not billed any more
    chargebee.invoice_term("sub_A", at=term + 120)
    assert usage(chargebee, "in_closed", 1, term + 100)[0] == 200
    assert "in_closed" in [u["id"] for u in chargebee.unbillable()]
    # idempotency keys live 30 minutes of the fake's clock
    clock = [time.time()]
    chargebee.now = lambda: clock[0]
    s1, h1, _ = usage(chargebee, "k1", 1, term + 61, key="idem-k1")
    s2, h2, _ = usage(chargebee, "k1", 1, term + 61, key="idem-k1")
    assert h2.get("chargebee-idempotency-replayed") == "true"
    clock[0] += 1800
    s3, h3, b3 = usage(chargebee, "k1", 1, term + 61, key="idem-k1")
    assert h3.get("chargebee-idempotency-replayed") is None
    assert s3 == 400 and b3["api_error_code"] == "duplicate_entry"


def test_chargebee_lists(chargebee):
    h = {"Authorization": basic("cb_key")}
    for i in range(3):
        assert usage(chargebee, "u%d" % i, 1, 1700000000 + i)[0] == 200
    s, _, b = call(chargebee.url + "/api/v2/usages?id%5Bis%5D=u1&"
                   "subscription_id%5Bis%5D=sub_A", headers=h)
    assert [u["usage"]["id"] for u in b["list"]] == ["u1"]
    s, _, b = call(chargebee.url + "/api/v2/usages?limit=2", headers=h)
    # next_offset is opaque (Usage.d.ts ListResponse: next_offset?: string)
    tok = b["next_offset"]
    assert len(b["list"]) == 2 and not tok.isdigit()
    s, _, b = call(chargebee.url + "/api/v2/usages?limit=2&offset="
                   + urllib.parse.quote(tok), headers=h)
    assert [u["usage"]["id"] for u in b["list"]] == ["u2"]
    assert "next_offset" not in b
    s, _, b = call(chargebee.url + "/api/v2/usages?offset=2", headers=h)
    assert s == 400 and b["api_error_code"] == "param_wrong_value"
    chargebee.add_invoice("cust_A", "sub_A", status="payment_due")
    chargebee.add_invoice("cust_A", "sub_A", status="paid")
    q = urllib.parse.quote('["payment_due","not_paid"]')
    s, _, b = call(chargebee.url + "/api/v2/invoices?status%5Bin%5D=" + q,
                   headers=h)
    assert [i["invoice"]["status"] for i in b["list"]] == ["payment_due"]


# ---------------------------------------------------------------- recurly

@pytest.fixture
def recurly():
    with FakeRecurly(api_key="rk_1") as f:
        f.add_subscription("sub1", add_ons=["api_calls"])
        yield f


def rusage(rc, amount, tag, accept=ACCEPT, auth=None, addon="code-api_calls",
           sub="sub1", ts="2026-11-24T10:00:00Z", key=None):
    body = json.dumps({"amount": amount, "merchant_tag": tag,
                       "usage_timestamp": ts,
                       "recording_timestamp": "2026-11-24T11:00:00Z"})
    h = {"Authorization": auth or basic("rk_1"), "Accept": accept,
         "Content-Type": "application/json"}
    if key is not None:
        h["Idempotency-Key"] = key
    return call(rc.url + "/subscriptions/%s/add_ons/%s/usage" % (sub, addon),
                "POST", body.encode(), h)


def rlist(rc, query, addon="code-api_calls"):
    """Every page of the usage list; (tags, the pages' "next" values)."""
    h = {"Authorization": basic("rk_1"), "Accept": ACCEPT}
    url = rc.url + "/subscriptions/sub1/add_ons/%s/usage?%s" % (addon, query)
    tags, nexts = [], []
    while url:
        s, _, b = call(url, headers=h)
        assert s == 200, b
        tags += [u["merchant_tag"] for u in b["data"]]
        nexts.append(b["next"])
        url = b["next"] if b["has_more"] else None
        if url is not None and url.startswith("/"):
            url = rc.url + url
    return tags, nexts


def test_recurly_headers(recurly):
    s, _, b = rusage(recurly, 1, "t", accept="application/json")
    assert s == 406 and b["error"]["type"] == "invalid_api_version"
    s, _, b = rusage(recurly, 1, "t", auth=basic("bad"))
    assert s == 401 and b["error"]["type"] == "unauthorized"
    assert recurly.usages == []


def test_recurly_addon_code_needs_prefix(recurly):
    # openapi/api.yaml add_on_id: a plain id is Recurly's ID; a code needs
    # "code-"
    s, _, b = rusage(recurly, 1, "x", addon="api_calls")
    assert s == 404 and b["error"]["type"] == "not_found"
    addon_id = recurly.subscriptions["sub1"]["add_ons"][0]["id"]
    assert rusage(recurly, 1, "x", addon=addon_id)[0] == 201
    assert rusage(recurly, 2, "y", addon="code-api_calls")[0] == 201
    assert rusage(recurly, 1, "z", addon="code-other")[0] == 404
    assert recurly.total("sub1", "api_calls") == 3


def test_recurly_usage_no_dedupe_and_list(recurly):
    for i in range(5):
        s, _, b = rusage(recurly, 10 + i, "tag%d" % i,
                         ts="2026-11-24T1%d:00:00Z" % i)
        assert s == 201 and b["merchant_tag"] == "tag%d" % i
    # no idempotency: a resend adds again
    assert rusage(recurly, 10, "tag0")[0] == 201
    assert recurly.total("sub1", "api_calls") == 70
    # default: unbilled, descending; "next" is a full URL
    tags, nexts = rlist(recurly, "limit=4")
    assert tags == ["tag4", "tag3", "tag2", "tag1", "tag0", "tag0"]
    assert nexts[0].startswith(recurly.url + "/subscriptions/sub1/")
    tags, _ = rlist(recurly, "limit=2&order=asc&sort=usage_timestamp"
                    "&begin_time=2026-11-24T12:00:00Z")
    assert tags == ["tag2", "tag3", "tag4"]
    # invoiced usage leaves the default list, stays in billing_status=all
    assert recurly.invoice_usage("sub1") == 6
    assert rlist(recurly, "limit=3")[0] == []
    tags, _ = rlist(recurly, "limit=3&billing_status=all&order=asc")
    assert tags == ["tag0", "tag0", "tag1", "tag2", "tag3", "tag4"]
    assert rlist(recurly, "billing_status=billed")[0] != []
    recurly.next_style = "path"
    _, nexts = rlist(recurly, "limit=2&billing_status=all")
    assert nexts[0].startswith("/subscriptions/sub1/")
    s, _, b = call(recurly.url + "/subscriptions/sub1/add_ons/code-api_calls"
                   "/usage?billing_status=maybe",
                   headers={"Authorization": basic("rk_1"),
                            "Accept": ACCEPT})
    assert s == 400 and b["error"]["type"] == "bad_request"


def test_recurly_rate_limit_headers_sliding_window():
    with FakeRecurly(api_key="rk_1", rate_limit=3, rate_window=300) as rc:
        rc.add_subscription("sub1")
        clock = [1_800_000_000.0]
        rc.now = lambda: clock[0]
        got = []
        for i in range(4):
            s, h, b = rusage(rc, 1, "t%d" % i)
            got.append((s, h["X-RateLimit-Remaining"],
                        h["X-RateLimit-Reset"], h.get("Retry-After")))
            clock[0] += 10
        reset = str(1_800_000_000 + 300)
        assert got == [(201, "2", reset, None), (201, "1", reset, None),
                       (201, "0", reset, None), (429, "0", reset, None)]
        assert len(rc.usages) == 3 and rc.limited == 1
        # sliding: the first request leaves the window at its reset
        clock[0] = 1_800_000_000 + 300
        s, h, _ = rusage(rc, 1, "t4")
        assert s == 201 and h["X-RateLimit-Reset"] == str(
            1_800_000_010 + 300)
    # production: only GETs count
    with FakeRecurly(api_key="rk_1", rate_limit=1, production=True) as rc:
        rc.add_subscription("sub1")
        assert [rusage(rc, 1, "p%d" % i)[0] for i in range(3)] == [201] * 3
        assert sorted(rlist(rc, "")[0]) == ["p0", "p1", "p2"]
        h = {"Authorization": basic("rk_1"), "Accept": ACCEPT}
        assert call(rc.url + "/invoices", headers=h)[0] == 429


def test_recurly_idempotency_key_window():
    with FakeRecurly(api_key="rk_1", idempotency_window=3600) as rc:
        rc.add_subscription("sub1")
        clock = [1_800_000_000.0]
        rc.now = lambda: clock[0]
        s1, _, b1 = rusage(rc, 5, "k", key="idem-1")
        s2, _, b2 = rusage(rc, 5, "k", key="idem-1")
        assert (s1, s2) == (201, 201) and b1["id"] == b2["id"]
        assert len(rc.usages) == 1
        clock[0] += 3600
        assert rusage(rc, 5, "k", key="idem-1")[0] == 201
        assert len(rc.usages) == 2
    # by default (the spec documents none) the key changes nothing
    with FakeRecurly(api_key="rk_1") as rc:
        rc.add_subscription("sub1")
        rusage(rc, 5, "k", key="idem-1")
        rusage(rc, 5, "k", key="idem-1")
        assert len(rc.usages) == 2


def test_recurly_invoice_states(recurly):
    for st in ("past_due", "failed", "paid", "pending"):
        recurly.add_invoice("acct_" + st, state=st)
    h = {"Authorization": basic("rk_1"), "Accept": ACCEPT}
    s, _, b = call(recurly.url + "/invoices?state=failed", headers=h)
    assert s == 200 and [i["account"]["code"] for i in b["data"]] == [
        "acct_failed"]
    s, _, b = call(recurly.url + "/invoices?state=closed", headers=h)
    assert s == 400


# ---------------------------------------------------------------- ingest

def test_openmeter_dedupe():
    with FakeOpenMeter(token="om") as om:
        ev = {"specversion": "1.0", "id": "e1", "source": "nginx-meter",
              "type": "calls", "subject": "acme", "time":
              "2026-11-24T10:00:00Z", "data": {"value": 5}}
        h = {"Authorization": "Bearer om",
             "Content-Type": "application/cloudevents+json"}
        url = om.url + "/api/v1/events"
        assert call(url, "POST", json.dumps(ev).encode(), h)[0] == 204
        assert call(url, "POST", json.dumps(ev).encode(), h)[0] == 204
        ev2 = dict(ev, source="other")
        assert call(url, "POST", json.dumps(ev2).encode(), h)[0] == 204
        assert om.total("acme", "calls") == 10 and om.duplicates == 1
        s, hh, b = call(url, "POST", json.dumps(ev).encode(),
                        dict(h, Authorization="Bearer x"))
        assert s == 401
        assert hh["Content-Type"] == "application/problem+json"
        s, _, b = call(url, "POST", b"{}", h)
        assert s == 400 and "detail" in b


def test_lago_dedupe():
    with FakeLago(token="lg") as lago:
        h = {"Authorization": "Bearer lg",
             "Content-Type": "application/json"}
        url = lago.url + "/api/v1/events"
        ev = {"event": {"transaction_id": "t1", "code": "calls",
                        "external_subscription_id": "sub_1",
                        "timestamp": 1700000000,
                        "properties": {"value": 4}}}
        assert call(url, "POST", json.dumps(ev).encode(), h)[0] == 200
        s, _, b = call(url, "POST", json.dumps(ev).encode(), h)
        assert s == 422
        assert b["error_details"] == {"transaction_id":
                                      ["value_already_exist"]}
        # a batch with one known transaction_id is rejected whole
        batch = {"events": [dict(ev["event"], transaction_id="t2"),
                            ev["event"]]}
        s, _, b = call(url + "/batch", "POST", json.dumps(batch).encode(), h)
        assert s == 422 and lago.total("sub_1", "calls") == 4
