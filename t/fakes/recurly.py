"""A fake Recurly v3 API (the parts nginx-meter uses), held to
recurly/recurly-client-ruby ``openapi/api.yaml`` (v2021-02-25).

Ids: a plain path id is Recurly's ID (``e28zov4fw0v2``-like); a code needs
the prefix ``code-`` (components/parameters/add_on_id, account_id), a
subscription UUID ``uuid-``.  A bare add-on code is a 404.

Usage: POST /subscriptions/{id}/add_ons/{add_on_id}/usage (JSON amount,
merchant_tag, usage_timestamp, recording_timestamp) -> 201.  GET of the
same path lists usage with ``billing_status`` (BillingStatusEnum: default
``unbilled``; ``billed``, ``all``), ``sort`` (usage_timestamp,
recorded_timestamp), ``order`` (default ``desc``), ``begin_time`` /
``end_time`` (inclusive, on the sort field); ``invoice_usage()`` bills what
is unbilled, as an invoice would.  Lists are {"object":"list","has_more",
"next","data"} with ``next`` a full URL (``next_style="path"``: a path).

No documented idempotency: every POST adds a usage.  The official client
sends Idempotency-Key (lib/recurly/client.rb); ``idempotency_window=S``
makes the fake replay a key's first answer for S seconds of its clock
(``self.now``), default None: ignored.

Rate limit (info "Limits"): ``rate_limit`` requests in a sliding
``rate_window`` (300 s); sandbox counts every request, production
(``production=True``) only GETs.  Every answer carries X-RateLimit-Limit,
-Remaining and -Reset (Unix s, when the oldest counted request leaves the
window); a 429 has no Retry-After.

Accept must name application/vnd.recurly.v2021-02-25 (406
invalid_api_version otherwise); Basic auth with the API key as user.
Errors: {"error":{"type","message","params"}} (components/schemas/Error).
Invoices: state filter InvoiceStateQueryParamEnum (pending, past_due,
paid, failed).
"""

import collections
import datetime
import hashlib
import hmac
import itertools
import json
import math
import random
import string
import time
import urllib.parse
import urllib.request

from .base import FakeServer, Response


ACCEPT = "application/vnd.recurly.v2021-02-25"
INVOICE_STATES = ("pending", "past_due", "paid", "failed")


def sign(payload, key, t_ms=None):
    """The recurly-signature header value: "<ms>,<hex HMAC-SHA256 of
    '<ms>.<body>'>"."""
    t_ms = int(time.time() * 1000) if t_ms is None else int(t_ms)
    mac = hmac.new(key.encode(), b"%d." % t_ms + payload, hashlib.sha256)
    return "%d,%s" % (t_ms, mac.hexdigest())


def iso(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def send_webhook(url, object_type, event_type, account_code, key,
                 notification_id=None, event_time=None, t_ms=None,
                 signature=None, **fields):
    """POST a Recurly JSON notification (v3) signed with key; returns
    (status, body)."""
    body = {"id": notification_id or "n%d" % int(time.time() * 1e6),
            "object_type": object_type, "site_id": "fake-site",
            "event_type": event_type,
            "event_time": iso(time.time() if event_time is None
                              else event_time),
            "account_code": account_code}
    body.update(fields)
    payload = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=payload, method="POST",
        headers={"Content-Type": "application/json",
                 "recurly-signature": signature or sign(payload, key, t_ms)})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def parse_time(s):
    try:
        return datetime.datetime.fromisoformat(
            s.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def recurly_id():
    return "".join(random.choice(string.ascii_lowercase + string.digits)
                   for _ in range(12))


class FakeRecurly(FakeServer):

    routes = [
        ("POST", r"/subscriptions/([^/]+)/add_ons/([^/]+)/usage", "add_usage"),
        ("GET", r"/subscriptions/([^/]+)/add_ons/([^/]+)/usage",
         "list_usage"),
        ("GET", r"/accounts", "list_accounts"),
        ("POST", r"/accounts", "create_account"),
        ("GET", r"/accounts/([^/]+)", "get_account"),
        ("GET", r"/accounts/([^/]+)/subscriptions", "account_subscriptions"),
        ("POST", r"/subscriptions", "create_subscription"),
        ("GET", r"/subscriptions", "list_subscriptions"),
        ("GET", r"/subscriptions/([^/]+)", "get_subscription"),
        ("GET", r"/invoices", "list_invoices"),
    ]

    def __init__(self, api_key="rk_fake", next_style="url", rate_limit=2000,
                 rate_window=300, production=False, idempotency_window=None,
                 **kw):
        super().__init__(**kw)
        self.api_key = api_key
        self.subscriptions = {}     # id -> subscription
        self.accounts = []
        self.invoices = []
        self.usages = []
        self.next_style = next_style
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.production = production
        self.counted = collections.deque()      # times of counted requests
        self.limited = 0                        # 429s answered
        self.idempotency_window = idempotency_window
        self.idem = {}              # key -> (time, Response)
        self.now = time.time
        self.max_limit = 200        # page size cap (Recurly: 200)
        self._ids = itertools.count(1)

    def error(self, status, kind, message, **extra):
        kind = {"api_error": "internal_server_error",
                "rate_limit": "rate_limited",
                "invalid_request": "validation"}.get(kind, kind)
        err = {"type": kind, "message": message}
        if extra.get("params"):
            err["params"] = extra["params"]
        return Response(status, {"error": err})

    # rate limit: a sliding window, headers on every answer

    def _rate_headers(self, now):
        while self.counted and self.counted[0] <= now - self.rate_window:
            self.counted.popleft()
        reset = (self.counted[0] + self.rate_window) if self.counted \
            else now + self.rate_window
        return {"X-RateLimit-Limit": str(self.rate_limit),
                "X-RateLimit-Remaining":
                    str(max(0, self.rate_limit - len(self.counted))),
                "X-RateLimit-Reset": str(int(math.ceil(reset)))}

    def _handle(self, req):
        counts = not self.production or req.method == "GET"
        with self.lock:
            now = self.now()
            self._rate_headers(now)
            if counts and len(self.counted) >= self.rate_limit:
                self.requests.append(req)
                self.limited += 1
                resp = self.error(429, "rate_limited",
                                  "You have made too many API requests in "
                                  "the last 5 minutes. Please retry later.")
                resp.headers.update(self._rate_headers(now))
                return resp
            if counts:
                self.counted.append(now)
        resp = super()._handle(req)
        if resp is not None:
            with self.lock:
                for k, v in self._rate_headers(self.now()).items():
                    resp.headers.setdefault(k, v)
        return resp

    def _scripted(self, req, a):
        resp = super()._scripted(req, a)
        if a.status == 429:
            # Recurly's 429 names the reset, never Retry-After
            resp.headers.pop("Retry-After", None)
        return resp

    def rate_limit_next(self, n=1, reset_in=2, match=None):
        """The next n requests answer 429 with X-RateLimit-Remaining: 0 and
        a Reset reset_in seconds ahead (no Retry-After, as Recurly)."""
        self.fail_next(n, 429, headers={
            "X-RateLimit-Limit": str(self.rate_limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(self.now()) + reset_in)},
            match=match)

    def check_auth(self, req):
        ba = req.basic_auth()
        if ba is None or ba[0] != self.api_key:
            return self.error(401, "unauthorized",
                              "Invalid API key. Please check your API key "
                              "and try again.")
        return None

    def check_request(self, req):
        accept = req.headers.get("Accept") or ""
        if not any(a.strip().split(";")[0] in (ACCEPT, ACCEPT + "+json")
                   for a in accept.split(",")):
            return self.error(406, "invalid_api_version",
                              "Please specify a valid API version in the "
                              "Accept header: %s" % ACCEPT)
        if req.method == "POST":
            if req.content_type != "application/json":
                return self.error(415, "invalid_content_type",
                                  "Content-Type must be application/json")
            if req.json is None:
                return self.error(400, "bad_request", "Invalid JSON body")
            key = req.headers.get("Idempotency-Key")
            if key is not None and self.idempotency_window is not None:
                with self.lock:
                    saved = self.idem.get(key)
                    if saved and self.now() - saved[0] \
                            < self.idempotency_window:
                        return saved[1]
        return None

    def _route(self, req):
        resp = super()._route(req)
        key = req.headers.get("Idempotency-Key")
        if req.method == "POST" and key is not None \
                and self.idempotency_window is not None:
            old = self.idem.get(key)
            if old is None or self.now() - old[0] >= self.idempotency_window:
                self.idem[key] = (self.now(), resp)
        return resp

    # setup

    def add_subscription(self, sid=None, add_ons=("api_calls",),
                         state="active", account=None, plan=None,
                         currency="USD"):
        s = {"id": sid or recurly_id(), "object": "subscription",
             "uuid": "%032x" % random.getrandbits(128), "state": state,
             "account": {"code": account},
             "add_ons": [{"id": recurly_id(), "code": c} for c in add_ons],
             "plan": {"code": plan}, "currency": currency}
        with self.lock:
            self.subscriptions[s["id"]] = s
        return s

    def add_account(self, code, **fields):
        a = {"id": recurly_id(), "object": "account",
             "code": code, "state": "active"}
        a.update(fields)
        with self.lock:
            self.accounts.append(a)
        return a

    def add_invoice(self, account, state="past_due", total=10.0,
                    subscription=None):
        inv = {"id": recurly_id(), "object": "invoice",
               "account": {"code": account}, "state": state, "total": total,
               "subscription_ids": [subscription] if subscription else [],
               "due_at": iso(self.now())}
        with self.lock:
            self.invoices.append(inv)
        return inv

    def _sub(self, sid):
        for s in self.subscriptions.values():
            if sid in (s["id"], "uuid-" + s["uuid"]):
                return s
        return None

    def _addon(self, sub, aid):
        """The add-on's code for a path id: Recurly's ID, or code-CODE."""
        for a in sub["add_ons"]:
            if aid in (a["id"], "code-" + a["code"]):
                return a["code"]
        return None

    def set_invoice_state(self, inv_id, state):
        with self.lock:
            for i in self.invoices:
                if i["id"] == inv_id:
                    i["state"] = state
                    return i
        raise KeyError(inv_id)

    def invoice_usage(self, subscription):
        """Bills the subscription's unbilled usage (an invoice closed)."""
        with self.lock:
            n = 0
            for u in self.usages:
                if u["subscription_id"] == subscription \
                        and u["billed_at"] is None:
                    u["billed_at"] = iso(self.now())
                    n += 1
            return n

    # onboarding

    def _account(self, aid):
        for a in self.accounts:
            if aid in (a["id"], "code-" + a["code"]):
                return a
        return None

    def create_account(self, req):
        b = req.json
        code = b.get("code") if isinstance(b, dict) else None
        if not isinstance(code, str) or not code:
            return self.error(422, "validation", "Code can't be blank",
                              params=[{"param": "code",
                                       "message": "can't be blank"}])
        if any(a["code"] == code for a in self.accounts):
            return self.error(422, "validation", "Code has already been "
                              "taken", params=[{"param": "code",
                                                "message": "has already "
                                                "been taken"}])
        a = self.add_account(code, email=b.get("email"),
                             first_name=b.get("first_name"))
        return Response(201, a)

    def get_account(self, req, aid):
        a = self._account(aid)
        return Response(200, a) if a else self.error(
            404, "not_found", "Couldn't find Account with id = %s" % aid)

    def account_subscriptions(self, req, aid):
        a = self._account(aid)
        if a is None:
            return self.error(404, "not_found",
                              "Couldn't find Account with id = %s" % aid)
        items = [s for s in self.subscriptions.values()
                 if s["account"]["code"] == a["code"]]
        st = req.q("state")
        if st == "live":
            items = [s for s in items
                     if s["state"] in ("active", "in_trial", "future")]
        elif st:
            items = [s for s in items if s["state"] == st]
        return self._page(req, items)

    def create_subscription(self, req):
        b = req.json if isinstance(req.json, dict) else {}
        acct = (b.get("account") or {}).get("code")
        if not b.get("plan_code") or not b.get("currency") or not acct:
            return self.error(422, "validation",
                              "plan_code, currency and account are "
                              "required")
        if self._account("code-" + acct) is None:
            self.add_account(acct)
        s = self.add_subscription(account=acct, plan=b["plan_code"],
                                  currency=b["currency"])
        return Response(201, s)

    # usage

    def add_usage(self, req, sid, aid):
        sub = self._sub(sid)
        if sub is None:
            return self.error(404, "not_found",
                              "Couldn't find Subscription with id = %s" % sid)
        code = self._addon(sub, aid)
        if code is None:
            return self.error(404, "not_found",
                              "Couldn't find AddOn with id = %s" % aid)
        b = req.json
        amount = b.get("amount")
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) \
                or amount < 0:
            return self.error(422, "validation", "Amount is invalid",
                              params=[{"param": "amount",
                                       "message": "is invalid"}])
        ut = parse_time(b.get("usage_timestamp"))
        if ut is None:
            return self.error(422, "validation",
                              "Usage timestamp can't be blank",
                              params=[{"param": "usage_timestamp",
                                       "message": "can't be blank"}])
        tag = b.get("merchant_tag")
        if tag is not None and (not isinstance(tag, str) or len(tag) > 255):
            return self.error(422, "validation", "Merchant tag is invalid")
        now = iso(self.now())
        u = {"id": recurly_id(), "object": "usage",
             "subscription_id": sub["id"], "add_on_code": code,
             "amount": amount, "merchant_tag": tag,
             "usage_timestamp": b.get("usage_timestamp"),
             "recording_timestamp": b.get("recording_timestamp") or now,
             "usage_type": "price", "billed_at": None,
             "created_at": now, "updated_at": now}
        self.usages.append(u)
        return Response(201, u)

    def _next(self, req, q):
        path = "%s?%s" % (req.path, urllib.parse.urlencode(q))
        return self.url + path if self.next_style == "url" else path

    def _page(self, req, items):
        try:
            limit = max(1, min(self.max_limit, int(req.q("limit", "20"))))
            cursor = int(req.q("cursor", "0"))
        except ValueError:
            return self.error(400, "bad_request", "invalid limit or cursor")
        page = items[cursor:cursor + limit]
        more = cursor + limit < len(items)
        # like Recurly, "next" keeps the request's filters
        q = [(k, v) for k, vs in req.query.items() if k not in
             ("cursor", "limit") for v in vs]
        q += [("cursor", str(cursor + limit)), ("limit", str(limit))]
        return Response(200, {
            "object": "list", "has_more": more, "data": page,
            "next": self._next(req, q) if more else None})

    def list_usage(self, req, sid, aid):
        sub = self._sub(sid)
        if sub is None:
            return self.error(404, "not_found",
                              "Couldn't find Subscription with id = %s" % sid)
        code = self._addon(sub, aid)
        if code is None:
            return self.error(404, "not_found",
                              "Couldn't find AddOn with id = %s" % aid)
        status = req.q("billing_status", "unbilled")
        sort = req.q("sort", "usage_timestamp")
        order = req.q("order", "desc")
        if status not in ("unbilled", "billed", "all") \
                or sort not in ("usage_timestamp", "recorded_timestamp") \
                or order not in ("asc", "desc"):
            return self.error(400, "bad_request", "Invalid billing_status, "
                              "sort or order")
        field = "usage_timestamp" if sort == "usage_timestamp" \
            else "recording_timestamp"
        items = [u for u in self.usages if u["subscription_id"] == sub["id"]
                 and u["add_on_code"] == code
                 and (status == "all"
                      or (u["billed_at"] is None) == (status == "unbilled"))]
        for name, keep in (("begin_time", lambda t, b: t >= b),
                           ("end_time", lambda t, b: t <= b)):
            if req.q(name) is not None:
                bound = parse_time(req.q(name))
                if bound is None:
                    return self.error(400, "bad_request",
                                      "Invalid %s" % name)
                items = [u for u in items
                         if keep(parse_time(u[field]), bound)]
        items.sort(key=lambda u: (parse_time(u[field]), u["created_at"]),
                   reverse=(order == "desc"))
        return self._page(req, items)

    def list_accounts(self, req):
        return self._page(req, self.accounts)

    def list_subscriptions(self, req):
        items = list(self.subscriptions.values())
        if req.q("state"):
            items = [s for s in items if s["state"] == req.q("state")]
        return self._page(req, items)

    def get_subscription(self, req, sid):
        s = self._sub(sid)
        return Response(200, s) if s else self.error(
            404, "not_found", "Couldn't find Subscription with id = %s" % sid)

    def list_invoices(self, req):
        items = self.invoices
        st = req.q("state")
        if st is not None:
            if st not in INVOICE_STATES:
                return self.error(400, "bad_request",
                                  "Invalid state: %s" % st)
            items = [i for i in items if i["state"] == st]
        return self._page(req, items)

    # totals (tests)

    def total(self, subscription, add_on):
        with self.lock:
            return sum(u["amount"] for u in self.usages
                       if u["subscription_id"] == subscription
                       and u["add_on_code"] == add_on)
