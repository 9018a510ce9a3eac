"""A fake Stripe API (the parts nginx-meter uses).

Usage: POST /v1/billing/meter_events (identifier dedupe, 35-day / 5-minute
timestamp window, whole values), the legacy
POST /v1/subscription_items/{id}/usage_records, and
GET /v1/billing/meters/{id}/event_summaries.  Idempotency-Key: the first
answer (500s included) is saved and replayed with Idempotent-Replayed: true;
the same key with other parameters answers 400 idempotency_error.

Onboarding and lists: customers, meters, prices, subscriptions (with
status), invoices; lists paginate with limit / starting_after / has_more.
``send_webhook`` posts a signed event (Stripe-Signature) to a URL.

v2 meter event stream: POST /v2/billing/meter_event_session (secret key)
gives a token valid 15 minutes; POST /v2/billing/meter_event_stream with
that token and JSON {"events":[...]} (<= 100), deduped by identifier;
``expire_sessions()`` makes every token answer 401
billing_meter_event_session_expired (``expire_after = n``: after the next n
accepted stream requests).

Held to stripe-node (src/RequestSender.ts, src/apiVersion.ts,
src/resources/Billing/*.ts, V2/Core/Events.ts): Stripe-Version is recorded
per request (``versions``); without it the account's default
(``account_version``) applies, and usage records are refused from
2025-03-31.basil on.  Identifiers and Idempotency-Keys are forgotten after
``window`` seconds (24 h) of the fake's clock (``now``).  A duplicate
identifier answers 400 invalid_request_error with Stripe-Should-Retry:
false.  429s carry no Retry-After (Stripe documents none; stripe-node's
_shouldRetry does not retry a 429 unless Stripe-Should-Retry says so).
Invoices have the basil shape (parent.subscription_details), attempted,
due_date.  ``error_report(ids, code)`` stores a
v1.billing.meter.error_report_triggered v2 event (GET /v2/core/events/{id})
and returns its thin payload.
"""

import collections
import hashlib
import hmac
import datetime
import itertools
import json
import secrets
import time
import urllib.request

from .base import FakeServer, Response, paginate_cursor


# stripe-node src/apiVersion.ts
API_VERSION = "2026-07-29.dahlia"
BASIL = "2025-03-31"
WINDOW = 86400
MAX_AGE = 35 * 86400
MAX_AHEAD = 300
SUB_STATUSES = ("incomplete", "incomplete_expired", "trialing", "active",
                "past_due", "canceled", "unpaid", "paused")


def sign(payload, secret, t=None):
    """The Stripe-Signature header value for payload (bytes)."""
    t = int(time.time()) if t is None else int(t)
    mac = hmac.new(secret.encode(), b"%d." % t + payload, hashlib.sha256)
    return "t=%d,v1=%s" % (t, mac.hexdigest())


def event(event_type, obj, event_id=None, created=None):
    """A Stripe event object (what a webhook delivers)."""
    return {"id": event_id or "evt_%d" % int(time.time() * 1e6),
            "object": "event", "api_version": "2024-06-20",
            "type": event_type,
            "created": int(time.time()) if created is None else int(created),
            "data": {"object": obj}, "livemode": False,
            "pending_webhooks": 1, "request": {"id": None}}


def post(url, payload, headers):
    """POST bytes; (status, body) also for error statuses."""
    req = urllib.request.Request(url, data=payload, headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def send_payload(url, payload, secret, t=None, headers=None):
    """POST raw bytes signed like Stripe does; (status, body)."""
    h = {"Content-Type": "application/json; charset=utf-8",
         "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
         "Stripe-Signature": sign(payload, secret, t)}
    h.update(headers or {})
    return post(url, payload, h)


def send_webhook(url, event_type, obj, secret, t=None, headers=None,
                 event_id=None, created=None):
    """POST a signed Stripe event to url; returns (status, body)."""
    payload = json.dumps(event(event_type, obj, event_id, created)).encode()
    return send_payload(url, payload, secret, t, headers)


class FakeStripe(FakeServer):

    routes = [
        ("POST", r"/v1/billing/meter_events", "meter_event"),
        ("POST", r"/v2/billing/meter_event_session", "stream_session"),
        ("POST", r"/v2/billing/meter_event_stream", "stream_events"),
        ("POST", r"/v1/subscription_items/([^/]+)/usage_records",
         "usage_record"),
        ("GET", r"/v1/billing/meters/([^/]+)/event_summaries",
         "event_summaries"),
        ("POST", r"/v1/billing/meters", "create_meter"),
        ("GET", r"/v1/billing/meters", "list_meters"),
        ("POST", r"/v1/customers", "create_customer"),
        ("GET", r"/v1/customers", "list_customers"),
        ("GET", r"/v1/customers/([^/]+)", "get_customer"),
        ("POST", r"/v1/prices", "create_price"),
        ("POST", r"/v1/subscriptions", "create_subscription"),
        ("GET", r"/v1/subscriptions", "list_subscriptions"),
        ("GET", r"/v1/subscriptions/([^/]+)", "get_subscription"),
        ("GET", r"/v1/invoices", "list_invoices"),
        ("GET", r"/v2/core/events/([^/]+)", "get_v2_event"),
    ]

    def __init__(self, api_key="sk_test_fake", customer_key=None,
                 value_key=None, **kw):
        super().__init__(**kw)
        self.api_key = api_key
        # payload key names; meters created here may rename them
        self.customer_key = customer_key or "stripe_customer_id"
        self.value_key = value_key or "value"
        self.idem = {}              # key -> (path, params, Response)
        self.identifiers = {}       # identifier -> event
        self.events = []            # accepted meter events
        self.duplicates = 0         # meter events refused as duplicates
        self.usage_records = []
        self.customers = []
        self.meters = []
        self.prices = []
        self.subscriptions = []
        self.invoices = []
        self.sessions = {}          # token -> expiry (unix)
        self.expire_after = None    # stream requests until tokens expire
        self.now = time.time        # override to move the clock
        self.window = WINDOW        # identifier and idempotency memory
        self.period_start = None    # new subscriptions' current period
        self.account_version = "2024-06-20"     # the dashboard default
        self.versions = []          # Stripe-Version of each request
        self.v2_events = {}
        self._ids = itertools.count(1)
        self._order = collections.deque()   # (created, identifier)
        # meter events: a token bucket of ``rate`` requests/s (bursts of
        # rate), as Stripe's limiters work; None: no limit
        self.rate = None
        self._tokens = 0.0
        self._tick = None
        self.limited = 0            # 429s for the rate
        # one concurrent call per customer and meter (PROVIDERS.md)
        self._pairs = set()
        self.pair_conflicts = 0
        self.session_ttl = 900      # v2 session lifetime, s
        self.stream_requests = []   # events per stream request

    def _id(self, prefix):
        return "%s_%06d" % (prefix, next(self._ids))

    # errors, auth, encoding

    def error(self, status, kind, message, code=None, param=None, **extra):
        err = {"type": kind, "message": message}
        if code:
            err["code"] = code
        if param:
            err["param"] = param
        if kind == "rate_limit":
            err["type"] = "invalid_request_error"
            err["code"] = "rate_limit"
        elif kind == "invalid_request":
            err["type"] = "invalid_request_error"
        elif kind == "not_found":
            err["type"] = "invalid_request_error"
            err["code"] = "resource_missing"
        return Response(status, {"error": err},
                        headers={"Request-Id": "req_%d" % next(self._ids)})

    def _take_token(self):
        with self.lock:
            now = time.monotonic()
            if self._tick is None:
                self._tokens = self.rate
            else:
                self._tokens = min(self.rate, self._tokens
                                   + (now - self._tick) * self.rate)
            self._tick = now
            if self._tokens < 1:
                self.limited += 1
                return False
            self._tokens -= 1
            return True

    def _pair(self, req):
        if req.path == "/v1/billing/meter_events" and req.form:
            return (req.form.get("payload[%s]" % self.customer_key),
                    req.form.get("event_name"))
        return None

    def begin(self, req):
        if self.rate is not None and req.path in (
                "/v1/billing/meter_events", "/v2/billing/meter_event_stream"):
            if not self._take_token():
                return self.error(429, "rate_limit", "Too many requests")
        pair = self._pair(req)
        if pair is not None:
            with self.lock:
                if pair in self._pairs:
                    self.pair_conflicts += 1
                    req.conflict = True
                    return self.error(429, "rate_limit",
                                      "Too many concurrent requests for "
                                      "this customer and meter")
                self._pairs.add(pair)
        return None

    def end(self, req):
        pair = self._pair(req)
        if pair is not None and not getattr(req, "conflict", False):
            with self.lock:
                self._pairs.discard(pair)

    def check_auth(self, req):
        if req.path == "/v2/billing/meter_event_stream":
            exp = self.sessions.get(req.bearer())
            if exp is None or exp <= self.now():
                return self.error(
                    401, "invalid_request_error",
                    "The meter event session has expired.",
                    code="billing_meter_event_session_expired")
            return None
        token = req.bearer()
        if token is None:
            ba = req.basic_auth()
            token = ba[0] if ba else None
        if token is None:
            return self.error(401, "invalid_request_error",
                              "You did not provide an API key.")
        if token != self.api_key:
            return self.error(401, "invalid_request_error",
                              "Invalid API Key provided: %s****%s"
                              % (token[:7], token[-4:]))
        return None

    def version(self, req):
        return req.headers.get("Stripe-Version") or self.account_version

    def check_request(self, req):
        with self.lock:
            self.versions.append(req.headers.get("Stripe-Version"))
        if req.path.startswith("/v2/"):
            if req.method == "POST" and req.content_type != \
                    "application/json":
                return self.error(400, "invalid_request_error",
                                  "v2 requests take application/json")
            return None
        if req.method == "POST":
            if req.form is None and req.body:
                return self.error(400, "invalid_request_error",
                                  "Invalid request: expected "
                                  "application/x-www-form-urlencoded")
            if req.form is None:
                req.form = {}
            key = req.headers.get("Idempotency-Key")
            if key is not None:
                if len(key) > 255:
                    return self.error(400, "invalid_request_error",
                                      "Idempotency-Key too long")
                with self.lock:
                    saved = self.idem.get(key)
                    # "keys are pruned after they are at least 24 hours old"
                    if saved is not None and \
                            saved[2].saved_at <= self.now() - self.window:
                        del self.idem[key]
                        saved = None
                if saved is not None:
                    path, params, resp = saved
                    if path != req.path or params != req.form:
                        return self.error(
                            400, "idempotency_error",
                            "Keys for idempotent requests can only be used "
                            "with the same parameters they were first used "
                            "with. Try using a key other than '%s' if you "
                            "meant to execute a different request." % key)
                    r = Response(resp.status, resp.body,
                                 dict(resp.headers, **{
                                     "Idempotent-Replayed": "true"}))
                    return r
        return None

    def saved_failure(self, req, resp):
        # a rate-limited request never ran: nothing saved
        if resp.status != 429:
            self._save(req, resp)

    def _save(self, req, resp):
        key = req.headers.get("Idempotency-Key")
        if req.method == "POST" and key is not None:
            resp.saved_at = self.now()
            with self.lock:
                self.idem.setdefault(key, (req.path, dict(req.form or {}),
                                           resp))

    def _route(self, req):
        resp = super()._route(req)
        # results are saved once the endpoint ran (not for 401s, 429s)
        if resp.status != 429 and not req.path.startswith("/v2/"):
            self._save(req, resp)
        return resp

    # usage

    def meter_event(self, req):
        f = req.form
        name = f.get("event_name")
        if not name:
            return self.error(400, "invalid_request_error",
                              "Missing required param: event_name.",
                              code="parameter_missing", param="event_name")
        if len(name) > 100:
            return self.error(400, "invalid_request_error",
                              "event_name is too long", param="event_name")
        ck = "payload[%s]" % self.customer_key
        vk = "payload[%s]" % self.value_key
        if not f.get(ck):
            return self.error(400, "invalid_request_error",
                              "Missing required param: %s." % ck,
                              code="parameter_missing", param=ck)
        value = f.get(vk, "1")
        if not value.isdigit():
            return self.error(400, "invalid_request_error",
                              "Invalid %s: must be a whole number" % vk,
                              code="parameter_invalid_integer", param=vk)
        now = int(self.now())
        ts = f.get("timestamp", str(now))
        if not ts.isdigit():
            return self.error(400, "invalid_request_error",
                              "Invalid timestamp", param="timestamp")
        ts = int(ts)
        if ts < now - MAX_AGE or ts > now + MAX_AHEAD:
            return self.error(
                400, "invalid_request_error",
                "Timestamp must be within the past 35 calendar days and "
                "no more than 5 minutes in the future.",
                code="timestamp_too_far_in_past" if ts < now
                else "timestamp_in_future", param="timestamp")
        ident = f.get("identifier") or self._id("ev")
        if len(ident) > 100:
            return self.error(400, "invalid_request_error",
                              "identifier is too long", param="identifier")
        self._forget(now)
        if ident in self.identifiers:
            self.duplicates += 1
            r = self.error(
                400, "invalid_request_error",
                "An event already exists with identifier %s." % ident)
            r.headers["Stripe-Should-Retry"] = "false"
            return r
        ev = {"object": "billing.meter_event", "created": now,
              "event_name": name, "identifier": ident, "livemode": False,
              "payload": {k[8:-1]: v for k, v in f.items()
                          if k.startswith("payload[")},
              "timestamp": ts}
        self._remember(ident, ev)
        self.events.append(ev)
        return Response(200, ev)

    def _remember(self, ident, ev):
        self.identifiers[ident] = ev
        self._order.append((ev["created"], ident))

    def _forget(self, now):
        """Identifiers are unique within a rolling ~24 h, then forgotten
        (oldest first: O(1) a request however many are kept)."""
        while self._order and self._order[0][0] <= now - self.window:
            created, i = self._order.popleft()
            e = self.identifiers.get(i)
            if e is not None and e["created"] == created:
                del self.identifiers[i]
        # a test may move the clock back or set created by hand
        if self._order and self._order[0][0] > now:
            for i in [i for i, e in self.identifiers.items()
                      if e["created"] <= now - self.window]:
                del self.identifiers[i]

    def stream_session(self, req):
        tok = "mes_" + secrets.token_hex(16)
        exp = int(self.now()) + self.session_ttl
        self.sessions[tok] = exp
        iso = datetime.datetime.fromtimestamp(
            exp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return Response(200, {"id": self._id("bmes"),
                              "object": "v2.billing.meter_event_session",
                              "authentication_token": tok,
                              "expires_at": iso, "livemode": False})

    def expire_sessions(self):
        with self.lock:
            self.sessions = {t: 0 for t in self.sessions}

    def stream_events(self, req):
        evs = req.json.get("events") if isinstance(req.json, dict) else None
        if not isinstance(evs, list) or not 0 < len(evs) <= 100:
            return self.error(400, "invalid_request_error",
                              "events: 1 to 100 events")
        now = int(self.now())
        with self.lock:
            self.stream_requests.append(len(evs))
        for ev in evs:
            p = ev.get("payload") or {}
            t = ev.get("timestamp")
            try:
                ts = datetime.datetime.fromisoformat(
                    t.replace("Z", "+00:00")).timestamp()
            except (AttributeError, ValueError):
                ts = None
            if not ev.get("event_name") or not p.get(self.customer_key) \
                    or not str(p.get(self.value_key, "1")).isdigit() \
                    or ts is None \
                    or not now - MAX_AGE <= ts <= now + MAX_AHEAD:
                return self.error(400, "invalid_request_error",
                                  "invalid meter event", param="events")
        self._forget(now)
        for ev in evs:
            ident = ev.get("identifier") or self._id("ev")
            if ident in self.identifiers:
                self.duplicates += 1
                continue
            e = {"object": "billing.meter_event", "created": now,
                 "event_name": ev["event_name"], "identifier": ident,
                 "payload": dict(ev["payload"]),
                 "timestamp": int(datetime.datetime.fromisoformat(
                     ev["timestamp"].replace("Z", "+00:00")).timestamp())}
            self._remember(ident, e)
            self.events.append(e)
        if self.expire_after is not None:
            self.expire_after -= 1
            if self.expire_after <= 0:
                self.expire_after = None
                self.expire_sessions()
        return Response(200, {})

    def usage_record(self, req, si):
        if self.version(req)[:10] >= BASIL:
            return self.error(
                400, "invalid_request_error",
                "Legacy usage-based billing is not supported in API "
                "version %s; use billing meters." % self.version(req))
        f = req.form
        q = f.get("quantity", "")
        if not q.isdigit():
            return self.error(400, "invalid_request_error",
                              "Invalid integer: quantity", param="quantity")
        action = f.get("action", "increment")
        if action not in ("increment", "set"):
            return self.error(400, "invalid_request_error",
                              "Invalid action", param="action")
        rec = {"id": self._id("mbur"), "object": "usage_record",
               "livemode": False, "quantity": int(q),
               "subscription_item": si,
               "timestamp": int(f.get("timestamp") or self.now()),
               "action": action}
        self.usage_records.append(rec)
        return Response(200, rec)

    def event_summaries(self, req, meter_id):
        """stripe-node Billing/Meters.ts listEventSummaries: customer,
        start_time (inclusive), end_time (exclusive), both required and on
        minute boundaries (hour boundaries with value_grouping_window=hour,
        UTC days with day); one summary per window, every window of the
        range; a list paginated with limit / starting_after / has_more."""
        meter = next((m for m in self.meters if m["id"] == meter_id), None)
        if meter is None:
            return self.not_found(req)
        cust = req.q("customer")
        for p in ("customer", "start_time", "end_time"):
            if not req.q(p):
                return self.error(400, "invalid_request_error",
                                  "Missing required param: %s." % p,
                                  code="parameter_missing", param=p)
        try:
            start, end = int(req.q("start_time")), int(req.q("end_time"))
        except ValueError:
            return self.error(400, "invalid_request_error",
                              "Invalid integer", param="start_time")
        window = req.q("value_grouping_window")
        step = {None: None, "hour": 3600, "day": 86400}.get(window, -1)
        if step == -1:
            return self.error(400, "invalid_request_error",
                              "Invalid value_grouping_window",
                              param="value_grouping_window")
        align = step or 60
        if start % align or end % align or end <= start:
            return self.error(400, "invalid_request_error",
                              "start_time and end_time must be aligned",
                              param="start_time")
        windows = [(start, end)] if step is None else [
            (t, t + step) for t in range(start, end, step)]
        with self.lock:
            evs = [e for e in self.events
                   if e["event_name"] == meter["event_name"]
                   and e["payload"].get(self.customer_key) == cust]
        out = []
        for a, b in windows:
            v = sum(int(e["payload"].get(self.value_key, 1)) for e in evs
                    if a <= e["timestamp"] < b)
            out.append({"id": "mtrusg_%s_%s_%d" % (meter_id, cust, a),
                        "object": "billing.meter_event_summary",
                        "aggregated_value": v, "start_time": a,
                        "end_time": b, "livemode": False, "meter": meter_id})
        return Response(200, paginate_cursor(out, req))

    def reject_event(self, identifier):
        """Stripe's asynchronous validation: an accepted event found
        invalid later is not counted (an error report tells of it)."""
        with self.lock:
            self.events = [e for e in self.events
                           if e["identifier"] != identifier]

    # totals (tests)

    def total(self, customer, event_name):
        """Sum of accepted (deduped) meter event values."""
        with self.lock:
            return sum(int(e["payload"].get(self.value_key, 1))
                       for e in self.events
                       if e["event_name"] == event_name
                       and e["payload"].get(self.customer_key) == customer)

    def last(self, customer, event_name):
        """A meter with formula "last": the value of the newest event
        (by timestamp, then arrival); None without events."""
        with self.lock:
            evs = [(e["timestamp"], i, e) for i, e in enumerate(self.events)
                   if e["event_name"] == event_name
                   and e["payload"].get(self.customer_key) == customer]
            if not evs:
                return None
            return int(max(evs)[2]["payload"].get(self.value_key, 1))

    def usage_total(self, subscription_item):
        with self.lock:
            t = 0
            for r in self.usage_records:
                if r["subscription_item"] == subscription_item:
                    t = r["quantity"] if r["action"] == "set" \
                        else t + r["quantity"]
            return t

    # onboarding and lists

    def _nested(self, form, prefix):
        return {k[len(prefix) + 1:-1]: v for k, v in form.items()
                if k.startswith(prefix + "[") and k.count("[") == 1}

    def add_customer(self, **fields):
        c = {"id": fields.pop("id", None) or self._id("cus"),
             "object": "customer", "created": int(self.now()),
             "metadata": {}, "delinquent": False}
        c.update(fields)
        with self.lock:
            self.customers.append(c)
        return c

    def create_customer(self, req):
        c = self.add_customer(name=req.form.get("name"),
                              email=req.form.get("email"))
        c["metadata"] = self._nested(req.form, "metadata")
        return Response(200, c)

    def list_customers(self, req):
        items = self.customers
        if req.q("email"):
            items = [c for c in items if c.get("email") == req.q("email")]
        return Response(200, paginate_cursor(items, req))

    def get_customer(self, req, cid):
        c = next((c for c in self.customers if c["id"] == cid), None)
        return Response(200, c) if c else self.error(
            404, "not_found", "No such customer: '%s'" % cid)

    def create_meter(self, req):
        f = req.form
        if not f.get("event_name") or not f.get("display_name"):
            return self.error(400, "invalid_request_error",
                              "Missing required param: event_name.")
        m = {"id": self._id("mtr"), "object": "billing.meter",
             "display_name": f["display_name"], "event_name": f["event_name"],
             "default_aggregation": {
                 "formula": f.get("default_aggregation[formula]", "sum")},
             "status": "active"}
        self.meters.append(m)
        return Response(200, m)

    def add_meter(self, event_name, formula="sum"):
        m = {"id": self._id("mtr"), "object": "billing.meter",
             "display_name": event_name, "event_name": event_name,
             "default_aggregation": {"formula": formula}, "status": "active"}
        with self.lock:
            self.meters.append(m)
        return m

    def add_event(self, event_name, customer, value, timestamp):
        """A meter event sent by someone else (another identifier)."""
        ev = {"object": "billing.meter_event", "created": int(self.now()),
              "event_name": event_name, "identifier": self._id("other"),
              "livemode": False,
              "payload": {self.customer_key: customer,
                          self.value_key: str(value)},
              "timestamp": int(timestamp)}
        with self.lock:
            self._remember(ev["identifier"], ev)
            self.events.append(ev)
        return ev

    def list_meters(self, req):
        return Response(200, paginate_cursor(self.meters, req))

    def create_price(self, req):
        f = req.form
        p = {"id": self._id("price"), "object": "price",
             "currency": f.get("currency"),
             "unit_amount": int(f.get("unit_amount") or 0),
             "recurring": self._nested(f, "recurring")}
        self.prices.append(p)
        return Response(200, p)

    def add_subscription(self, customer, status="active", prices=()):
        s = {"id": self._id("sub"), "object": "subscription",
             "customer": customer, "status": status,
             "created": int(self.now()), "metadata": {},
             "items": {"object": "list", "has_more": False, "data": [
                 {"id": self._id("si"), "object": "subscription_item",
                  "price": {"id": p},
                  # basil: the billing period lives on the items
                  "current_period_start": self.period_start
                  or int(self.now()),
                  "current_period_end": (self.period_start
                                         or int(self.now())) + 30 * 86400}
                 for p in prices]}}
        with self.lock:
            self.subscriptions.append(s)
        return s

    def create_subscription(self, req):
        f = req.form
        if not f.get("customer"):
            return self.error(400, "invalid_request_error",
                              "Missing required param: customer.")
        prices, i = [], 0
        while "items[%d][price]" % i in f:
            prices.append(f["items[%d][price]" % i])
            i += 1
        s = self.add_subscription(f["customer"], prices=prices)
        s["metadata"] = self._nested(f, "metadata")
        return Response(200, s)

    def set_invoice_status(self, inv_id, status):
        with self.lock:
            for i in self.invoices:
                if i["id"] == inv_id:
                    i["status"] = status
                    return i
        raise KeyError(inv_id)

    def set_subscription_status(self, sub_id, status):
        assert status in SUB_STATUSES
        with self.lock:
            for s in self.subscriptions:
                if s["id"] == sub_id:
                    s["status"] = status
                    return s
        raise KeyError(sub_id)

    def list_subscriptions(self, req):
        items = self.subscriptions
        if req.q("customer"):
            items = [s for s in items if s["customer"] == req.q("customer")]
        st = req.q("status")
        if st and st != "all":
            items = [s for s in items if s["status"] == st]
        elif st is None:
            items = [s for s in items if s["status"] != "canceled"]
        return Response(200, paginate_cursor(items, req))

    def get_subscription(self, req, sid):
        s = next((s for s in self.subscriptions if s["id"] == sid), None)
        return Response(200, s) if s else self.error(
            404, "not_found", "No such subscription: '%s'" % sid)

    def rate_limit_next(self, n=1, retry_after=None, match=None):
        """429 as Stripe sends it: no Retry-After (retry_after is kept for
        callers; Stripe documents no such header)."""
        self.fail_next(n, 429, match=match)

    def error_report(self, identifiers, code="meter_event_customer_not_found",
                     meter="mtr_1"):
        """Stores a v1.billing.meter.error_report_triggered event and
        returns its thin payload (what the event destination delivers)."""
        now = self.now()
        iso = datetime.datetime.fromtimestamp(
            now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        eid = "evt_test_%s" % secrets.token_hex(8)
        thin = {"id": eid, "object": "v2.core.event",
                "type": "v1.billing.meter.error_report_triggered",
                "livemode": False, "created": iso + "Z",
                "related_object": {"id": meter, "type": "billing.meter",
                                   "url": "/v1/billing/meters/" + meter}}
        full = dict(thin, data={
            "developer_message_summary": "%d invalid events" %
            len(identifiers),
            "validation_start": iso + "Z", "validation_end": iso + "Z",
            "reason": {"error_count": len(identifiers), "error_types": [{
                "code": code, "error_count": len(identifiers),
                "sample_errors": [{"error_message": "No customer %s" % i,
                                   "request": {"identifier": i}}
                                  for i in identifiers]}]}})
        with self.lock:
            self.v2_events[eid] = full
        return thin

    def get_v2_event(self, req, eid):
        ev = self.v2_events.get(eid)
        return Response(200, ev) if ev else self.error(
            404, "not_found", "No such event: '%s'" % eid)

    def add_invoice(self, customer, status="open", amount_due=1000,
                    subscription=None, attempted=True, due_date=None):
        inv = {"id": self._id("in"), "object": "invoice",
               "customer": customer,
               "parent": {"type": "subscription_details",
                          "subscription_details": {
                              "subscription": subscription}},
               "status": status, "amount_due": amount_due,
               "attempted": attempted, "due_date": due_date,
               "created": int(self.now())}
        with self.lock:
            self.invoices.append(inv)
        return inv

    def list_invoices(self, req):
        items = self.invoices
        if req.q("customer"):
            items = [i for i in items if i["customer"] == req.q("customer")]
        if req.q("status"):
            items = [i for i in items if i["status"] == req.q("status")]
        if req.q("subscription"):
            items = [i for i in items
                     if i["parent"]["subscription_details"]["subscription"]
                     == req.q("subscription")]
        return Response(200, paginate_cursor(items, req))
