"""A fake Chargebee API v2 (the parts nginx-meter uses), held to
chargebee/chargebee-node (types/resources/Usage.d.ts, src/RequestWrapper.ts)
and PROVIDERS.md.

Usage: POST /api/v2/subscriptions/{id}/usages (form: item_price_id,
quantity, usage_date, id, note), GET /api/v2/usages (filters id[is],
subscription_id[is], item_price_id[is]; limit / offset).  Usage ids are
unique, one usage per (subscription, item price, usage_date), at most 5000
usages per subscription.  chargebee-idempotency-key: the first answer
(2xx/4xx) is replayed with chargebee-idempotency-replayed: true for 30
minutes of the fake's clock (``self.now``; ``expire_idempotency()`` ends
the window at once).

Chargebee stores usage it will never bill with a 200: dated before the
subscription started, at or after its cancellation, or in a term already
invoiced (before ``current_term_start``), in a trial (before
``trial_end``) or while paused (from ``pause_date``): "Chargebee bills only
those usages whose usage_date falls within a time when the subscription
status was active or non_renewing" and "If usage_date corresponds to a time
already invoiced, then it is stored but never invoiced"
(apidocs.chargebee.com/docs/api/usages).  The fake stores such usage with
``billed: False`` (listed in ``unbillable()``), so a test can assert it is
never hit.  Subscriptions carry the fields of chargebee-node
types/resources/Subscription.d.ts that bound it: status, started_at,
activated_at, current_term_start / _end, cancelled_at, trial_end,
pause_date; ``invoice_term()`` closes the current term and starts the next,
``cancel()`` cancels, ``add_usage()`` stores usage made elsewhere (the
admin console; ``on_usage`` can do it just before a POST is handled).  ``next_offset`` is opaque (as Chargebee's, e.g.
'["1517505980000","230000000011"]'); an offset the fake did not hand out
is a 400.

Lists: customers, subscriptions (status[is], status[in], customer_id[is]),
invoices (status[in]).  ``remove_subscription()`` deletes one (404 from
then on).
``send_webhook`` posts an event with Basic auth.
"""

import base64
import collections
import itertools
import json
import random
import time
import urllib.request

from .base import FakeServer, Response


MAX_USAGES = 5000
ACTIVE = ("active", "non_renewing", "in_trial")
IDEMPOTENCY_WINDOW = 30 * 60
TERM = 30 * 86400


def send_webhook(url, event_type, content, user, password, event_id=None,
                 occurred_at=None):
    """POST a Chargebee event to url with Basic auth; (status, body)."""
    ev = {"id": event_id or "ev_%d" % int(time.time() * 1e6),
          "occurred_at": int(time.time()) if occurred_at is None
          else int(occurred_at), "object": "event",
          "event_type": event_type, "api_version": "v2",
          "content": content}
    auth = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
    req = urllib.request.Request(
        url, data=json.dumps(ev).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + auth})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class FakeChargebee(FakeServer):

    routes = [
        ("POST", r"/api/v2/subscriptions/([^/]+)/usages", "create_usage"),
        ("GET", r"/api/v2/usages", "list_usages"),
        ("GET", r"/api/v2/customers", "list_customers"),
        ("POST", r"/api/v2/customers", "create_customer"),
        ("GET", r"/api/v2/customers/([^/]+)", "get_customer"),
        ("POST", r"/api/v2/customers/([^/]+)/subscription_for_items",
         "create_subscription_for_items"),
        ("GET", r"/api/v2/subscriptions", "list_subscriptions"),
        ("GET", r"/api/v2/subscriptions/([^/]+)", "get_subscription"),
        ("GET", r"/api/v2/invoices", "list_invoices"),
    ]

    def __init__(self, api_key="test_cb_fake", **kw):
        super().__init__(**kw)
        self.api_key = api_key
        self.subscriptions = {}     # id -> subscription
        self.customers = []
        self.invoices = []
        self.usages = []            # accepted
        self.idem = {}              # key -> (time, Response)
        self.now = time.time
        self.offsets = {}           # opaque next_offset -> index
        # called with (subscription id, form) before a usage is checked:
        # a test's concurrent writer (add_usage)
        self.on_usage = None
        self._ids = itertools.count(1)
        # rate limit: ``rate_limit`` requests a minute (PROVIDERS.md: 150
        # test, 1,000 / 3,500 live), a sliding window; None: none
        self.rate_limit = None
        self.rate_window = 60
        self.counted = collections.deque()
        self.limited = 0

    def error(self, status, kind, message, code=None, param=None, **extra):
        body = {"message": message, "type": kind,
                "api_error_code": code or {
                    400: "invalid_request", 401: "api_authentication_failed",
                    404: "resource_not_found",
                    429: "api_request_limit_exceeded",
                }.get(status, "internal_error"),
                "http_status_code": status}
        if kind in ("api_error", "rate_limit"):
            body["type"] = "operation_failed" if status >= 500 \
                else "invalid_request"
        if param:
            body["param"] = param
        body["error_code"] = body["api_error_code"]
        body["error_msg"] = message
        return Response(status, body)

    def begin(self, req):
        if self.rate_limit is None:
            return None
        with self.lock:
            now = time.monotonic()
            while self.counted and self.counted[0] <= now - self.rate_window:
                self.counted.popleft()
            if len(self.counted) >= self.rate_limit:
                self.limited += 1
                return self.error(429, "rate_limit", "Sorry, the request "
                                  "limit was exceeded. Please retry later.")
            self.counted.append(now)
        return None

    def check_auth(self, req):
        ba = req.basic_auth()
        if ba is None or ba[0] != self.api_key or ba[1] != "":
            return self.error(401, "invalid_request",
                              "Sorry, authentication failed. Invalid api key",
                              code="api_authentication_failed")
        return None

    def check_request(self, req):
        if req.method == "POST":
            if req.form is None:
                return self.error(400, "invalid_request",
                                  "Content-Type must be "
                                  "application/x-www-form-urlencoded",
                                  code="invalid_request")
            key = req.headers.get("chargebee-idempotency-key")
            if key is not None:
                if len(key) > 100:
                    return self.error(400, "invalid_request",
                                      "idempotency key too long")
                with self.lock:
                    saved = self._saved(key)
                if saved is not None:
                    return Response(saved.status, saved.body, dict(
                        saved.headers,
                        **{"chargebee-idempotency-replayed": "true"}))
        return None

    def _saved(self, key):
        t = self.idem.get(key)
        if t is None or self.now() - t[0] >= IDEMPOTENCY_WINDOW:
            self.idem.pop(key, None)
            return None
        return t[1]

    def _route(self, req):
        resp = super()._route(req)
        key = req.headers.get("chargebee-idempotency-key")
        if req.method == "POST" and key is not None and resp.status < 500 \
                and resp.status != 429 and self._saved(key) is None:
            self.idem[key] = (self.now(), resp)
        return resp

    def expire_idempotency(self):
        """The 30-minute window passed: keys are forgotten."""
        with self.lock:
            self.idem.clear()

    def unbillable(self):
        """Usage Chargebee would store with a 200 and never invoice."""
        with self.lock:
            return [u for u in self.usages if not u["billed"]]

    def invoice_term(self, sid, at=None):
        """The current term is invoiced at ``at`` (default now): usage dated
        before it is never billed any more."""
        with self.lock:
            s = self.subscriptions[sid]
            s["current_term_start"] = int(self.now() if at is None else at)
            s["current_term_end"] = s["current_term_start"] + TERM

    def cancel(self, sid, at=None):
        with self.lock:
            s = self.subscriptions[sid]
            s["status"] = "cancelled"
            s["cancelled_at"] = int(self.now() if at is None else at)

    def remove_subscription(self, sid):
        with self.lock:
            del self.subscriptions[sid]

    def add_usage(self, sid, item_price_id, usage_date, quantity=1,
                  source="admin_console"):
        """Usage recorded by someone else (it holds its usage_date)."""
        with self.lock:
            u = {"id": "usage_%d" % next(self._ids), "object": "usage",
                 "subscription_id": sid, "item_price_id": item_price_id,
                 "quantity": str(quantity), "usage_date": int(usage_date),
                 "source": source, "created_at": int(self.now()),
                 "billed": self._billable(self.subscriptions[sid],
                                          int(usage_date))}
            self.usages.append(u)
        return u

    # setup

    def add_customer(self, cid=None, **fields):
        c = {"id": cid or "cust_%d" % next(self._ids), "object": "customer"}
        c.update(fields)
        with self.lock:
            self.customers.append(c)
        return c

    def add_subscription(self, sid=None, customer_id=None, status="active",
                         item_prices=None, started_at=None, **fields):
        now = int(self.now())
        started = now - 40 * 86400 if started_at is None else int(started_at)
        term = max(started, now - 10 * 86400)
        s = {"id": sid or "sub_%d" % next(self._ids), "object": "subscription",
             "customer_id": customer_id, "status": status,
             "started_at": started, "activated_at": started,
             "current_term_start": term, "current_term_end": term + TERM,
             "due_invoices_count": 0, "total_dues": 0,
             "subscription_items": [{"item_price_id": p, "item_type": "addon"}
                                    for p in (item_prices or [])]}
        s.update(fields)
        with self.lock:
            self.subscriptions[s["id"]] = s
        return s

    def add_invoice(self, customer_id, subscription_id=None,
                    status="payment_due", amount_due=1000):
        inv = {"id": "inv_%d" % next(self._ids), "object": "invoice",
               "customer_id": customer_id, "subscription_id": subscription_id,
               "status": status, "amount_due": amount_due,
               "date": int(self.now())}
        with self.lock:
            self.invoices.append(inv)
        return inv

    # onboarding

    def _dup(self, what, value):
        return self.error(400, "invalid_request",
                          "The value %s is already present." % value,
                          code="duplicate_entry", param="id")

    def create_customer(self, req):
        f = req.form
        cid = f.get("id")
        if cid is not None and any(c["id"] == cid for c in self.customers):
            return self._dup("customer", cid)
        if cid is not None and len(cid) > 50:
            return self.error(400, "invalid_request",
                              "id : length exceeds 50", param="id")
        c = self.add_customer(cid, email=f.get("email"),
                              first_name=f.get("first_name"),
                              created_at=int(self.now()))
        return Response(200, {"customer": c})

    def get_customer(self, req, cid):
        c = next((c for c in self.customers if c["id"] == cid), None)
        if c is None:
            return self.error(404, "invalid_request",
                              "Sorry, we couldn't find that resource",
                              code="resource_not_found")
        return Response(200, {"customer": c})

    def create_subscription_for_items(self, req, cid):
        f = req.form
        c = next((c for c in self.customers if c["id"] == cid), None)
        if c is None:
            return self.error(404, "invalid_request",
                              "Sorry, we couldn't find that resource",
                              code="resource_not_found")
        sid = f.get("id")
        if sid is not None and sid in self.subscriptions:
            return self._dup("subscription", sid)
        prices, i = [], 0
        while "subscription_items[item_price_id][%d]" % i in f:
            prices.append(f["subscription_items[item_price_id][%d]" % i])
            i += 1
        if not prices:
            return self.error(400, "invalid_request",
                              "subscription_items[item_price_id][0] : "
                              "cannot be blank",
                              code="param_wrong_value",
                              param="subscription_items[item_price_id][0]")
        s = self.add_subscription(sid, customer_id=cid, item_prices=prices)
        return Response(200, {"subscription": s, "customer": c})

    # usage

    def create_usage(self, req, sid):
        f = req.form
        if self.on_usage is not None:
            self.on_usage(sid, f)
        sub = self.subscriptions.get(sid)
        if sub is None:
            return self.error(404, "invalid_request",
                              "Sorry, we couldn't find that resource",
                              code="resource_not_found")
        item = f.get("item_price_id")
        if not item:
            return self.error(400, "invalid_request",
                              "item_price_id : cannot be blank",
                              code="param_wrong_value", param="item_price_id")
        if sub["subscription_items"] and item not in [
                i["item_price_id"] for i in sub["subscription_items"]]:
            return self.error(400, "invalid_request",
                              "item_price_id : %s is not part of the "
                              "subscription" % item,
                              code="param_wrong_value", param="item_price_id")
        q = f.get("quantity", "")
        if not q or len(q) > 40 or not q.replace(".", "", 1).isdigit():
            return self.error(400, "invalid_request",
                              "quantity : invalid value",
                              code="param_wrong_value", param="quantity")
        d = f.get("usage_date", "")
        if not d.isdigit():
            return self.error(400, "invalid_request",
                              "usage_date : cannot be blank",
                              code="param_wrong_value", param="usage_date")
        d = int(d)
        if len(f.get("note") or "") > 500:
            return self.error(400, "invalid_request",
                              "note : length exceeds 500", param="note",
                              code="param_wrong_value")
        uid = f.get("id") or "usage_%d" % next(self._ids)
        if len(uid) > 100:
            return self.error(400, "invalid_request",
                              "id : length exceeds 100", param="id")
        if any(u["id"] == uid for u in self.usages):
            return self.error(400, "invalid_request",
                              "The value %s is already present." % uid,
                              code="duplicate_entry", param="id")
        if any(u["subscription_id"] == sid and u["item_price_id"] == item
               and u["usage_date"] == d for u in self.usages):
            return self.error(400, "invalid_request",
                              "usage_date : A usage record already exists "
                              "for this item price and usage date",
                              code="duplicate_entry", param="usage_date")
        if sum(u["subscription_id"] == sid for u in self.usages) \
                >= MAX_USAGES:
            return self.error(400, "invalid_request",
                              "Usage limit of %d reached for the "
                              "subscription" % MAX_USAGES,
                              code="usage_limit_exceeded")
        u = {"id": uid, "object": "usage", "subscription_id": sid,
             "item_price_id": item, "quantity": q, "usage_date": d,
             "source": "api", "note": f.get("note"),
             "created_at": int(self.now()), "updated_at": int(self.now()),
             "billed": self._billable(sub, d)}
        self.usages.append(u)
        return Response(200, {"usage": u})

    @staticmethod
    def _billable(sub, d):
        """Whether Chargebee would ever invoice usage dated d."""
        start = sub.get("activated_at") or sub.get("started_at")
        if start is not None and d < start:
            return False
        if sub.get("cancelled_at") is not None and d >= sub["cancelled_at"]:
            return False
        if sub.get("trial_end") is not None and d < sub["trial_end"]:
            return False            # a trial is never billed
        if sub.get("pause_date") is not None and d >= sub["pause_date"] \
                and (sub.get("resume_date") is None
                     or d < sub["resume_date"]):
            return False
        if sub.get("current_term_start") is not None \
                and d < sub["current_term_start"]:
            return False            # a term already invoiced
        return True

    def _list(self, req, items, wrap):
        try:
            limit = max(1, min(100, int(req.q("limit", "10"))))
        except ValueError:
            return self.error(400, "invalid_request", "invalid limit")
        off = req.q("offset")
        if off is None:
            offset = 0
        elif off in self.offsets:
            offset = self.offsets[off]
        else:
            return self.error(400, "invalid_request",
                              "offset : invalid value", param="offset",
                              code="param_wrong_value")
        page = items[offset:offset + limit]
        body = {"list": [{wrap: o} for o in page]}
        if offset + limit < len(items):
            tok = json.dumps([str(int(self.now() * 1000)),
                              str(random.randrange(10 ** 11, 10 ** 12))],
                             separators=(",", ":"))
            self.offsets[tok] = offset + limit
            body["next_offset"] = tok
        return Response(200, body)

    def list_usages(self, req):
        items = self.usages
        for param, field in (("id[is]", "id"),
                             ("subscription_id[is]", "subscription_id"),
                             ("item_price_id[is]", "item_price_id")):
            v = req.q(param)
            if v is not None:
                items = [u for u in items if u[field] == v]
        # filter.d.ts Timestamp: on, before, after, between [a, b] (both
        # ends included), Unix seconds
        for op, keep in (("after", lambda d, a: d > a[0]),
                         ("before", lambda d, a: d < a[0]),
                         ("on", lambda d, a: d == a[0]),
                         ("between", lambda d, a: a[0] <= d <= a[1])):
            v = req.q("usage_date[%s]" % op)
            if v is None:
                continue
            try:
                arg = json.loads(v) if op == "between" else [int(v)]
                if op == "between" and (not isinstance(arg, list)
                                        or len(arg) != 2):
                    raise ValueError(v)
                arg = [int(a) for a in arg]
            except ValueError:
                return self.error(400, "invalid_request",
                                  "usage_date[%s] : invalid value" % op,
                                  param="usage_date[%s]" % op,
                                  code="param_wrong_value")
            items = [u for u in items if keep(u["usage_date"], arg)]
        return self._list(req, items, "usage")

    def list_customers(self, req):
        return self._list(req, self.customers, "customer")

    def list_subscriptions(self, req):
        items = list(self.subscriptions.values())
        if req.q("status[is]"):
            items = [s for s in items if s["status"] == req.q("status[is]")]
        if req.q("status[in]"):
            # filter.d.ts Enum "in": a JSON array of statuses
            try:
                wanted = json.loads(req.q("status[in]"))
            except ValueError:
                return self.error(400, "invalid_request",
                                  "status[in] : invalid value")
            items = [s for s in items if s["status"] in wanted]
        if req.q("customer_id[is]"):
            items = [s for s in items
                     if s["customer_id"] == req.q("customer_id[is]")]
        return self._list(req, items, "subscription")

    def get_subscription(self, req, sid):
        s = self.subscriptions.get(sid)
        if s is None:
            return self.error(404, "invalid_request",
                              "Sorry, we couldn't find that resource",
                              code="resource_not_found")
        return Response(200, {"subscription": s})

    def list_invoices(self, req):
        items = self.invoices
        v = req.q("status[in]")
        if v is not None:
            try:
                wanted = json.loads(v)
            except ValueError:
                return self.error(400, "invalid_request",
                                  "status[in] : invalid value")
            items = [i for i in items if i["status"] in wanted]
        return self._list(req, items, "invoice")

    # totals (tests)

    def total(self, subscription, item_price):
        with self.lock:
            return sum(int(u["quantity"]) for u in self.usages
                       if u["subscription_id"] == subscription
                       and u["item_price_id"] == item_price)
