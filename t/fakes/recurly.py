"""A fake Recurly v3 API (the parts nginx-meter uses).

Usage: POST /subscriptions/{id}/add_ons/{add_on}/usage (JSON amount,
merchant_tag, usage_timestamp, recording_timestamp) -> 201, and GET of the
same path, a list {"object":"list","has_more","next","data"} with ``next``
a path (cursor).  Recurly has no idempotency: every POST adds a usage.
Ids plain or prefixed (``uuid-``, ``code-``).  Accept must name
application/vnd.recurly.v2021-02-25 (406 invalid_api_version otherwise);
Basic auth with the API key as user.

Lists: accounts, subscriptions (state), invoices (state).
"""

import datetime
import hashlib
import hmac
import itertools
import json
import time
import urllib.parse
import urllib.request

from .base import FakeServer, Response


ACCEPT = "application/vnd.recurly.v2021-02-25"


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

    def __init__(self, api_key="rk_fake", **kw):
        super().__init__(**kw)
        self.api_key = api_key
        self.subscriptions = {}     # id -> {"id","uuid","add_ons":[codes]}
        self.accounts = []
        self.invoices = []
        self.usages = []
        self._ids = itertools.count(1)

    def error(self, status, kind, message, **extra):
        kind = {"api_error": "internal_server_error",
                "rate_limit": "rate_limited",
                "invalid_request": "validation"}.get(kind, kind)
        h = {}
        if status == 429:
            h = {"X-RateLimit-Limit": "2000", "X-RateLimit-Remaining": "0",
                 "X-RateLimit-Reset": str(int(time.time()) + 60)}
        err = {"type": kind, "message": message}
        if extra.get("params"):
            err["params"] = extra["params"]
        return Response(status, {"error": err}, h)

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
        return None

    # setup

    def add_subscription(self, sid=None, add_ons=("api_calls",),
                         state="active", account=None, plan=None,
                         currency="USD"):
        s = {"id": sid or "sub%d" % next(self._ids), "object": "subscription",
             "uuid": "%032x" % next(self._ids), "state": state,
             "account": {"code": account}, "add_ons": list(add_ons),
             "plan": {"code": plan}, "currency": currency}
        with self.lock:
            self.subscriptions[s["id"]] = s
        return s

    def add_account(self, code, **fields):
        a = {"id": "acct%d" % next(self._ids), "object": "account",
             "code": code, "state": "active"}
        a.update(fields)
        with self.lock:
            self.accounts.append(a)
        return a

    def add_invoice(self, account, state="past_due", total=10.0,
                    subscription=None):
        inv = {"id": "inv%d" % next(self._ids), "object": "invoice",
               "account": {"code": account}, "state": state, "total": total,
               "subscription_ids": [subscription] if subscription else [],
               "due_at": iso(time.time())}
        with self.lock:
            self.invoices.append(inv)
        return inv

    def _sub(self, sid):
        for s in self.subscriptions.values():
            if sid in (s["id"], "uuid-" + s["uuid"]):
                return s
        return None

    def _addon(self, sub, aid):
        code = aid[5:] if aid.startswith("code-") else aid
        return code if code in sub["add_ons"] else None

    def set_invoice_state(self, inv_id, state):
        with self.lock:
            for i in self.invoices:
                if i["id"] == inv_id:
                    i["state"] = state
                    return i
        raise KeyError(inv_id)

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
        now = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        u = {"id": "u%08d" % next(self._ids), "object": "usage",
             "subscription_id": sub["id"], "add_on_code": code,
             "amount": amount, "merchant_tag": tag,
             "usage_timestamp": b.get("usage_timestamp"),
             "recording_timestamp": b.get("recording_timestamp") or now,
             "usage_type": "price", "created_at": now, "updated_at": now}
        self.usages.append(u)
        return Response(201, u)

    def _page(self, req, items):
        try:
            limit = max(1, min(200, int(req.q("limit", "20"))))
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
            "next": "%s?%s" % (req.path, urllib.parse.urlencode(q))
            if more else None})

    def list_usage(self, req, sid, aid):
        sub = self._sub(sid)
        if sub is None:
            return self.error(404, "not_found",
                              "Couldn't find Subscription with id = %s" % sid)
        code = self._addon(sub, aid)
        if code is None:
            return self.error(404, "not_found",
                              "Couldn't find AddOn with id = %s" % aid)
        return self._page(req, [u for u in self.usages
                                if u["subscription_id"] == sub["id"]
                                and u["add_on_code"] == code])

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
        if req.q("state"):
            items = [i for i in items if i["state"] == req.q("state")]
        return self._page(req, items)

    # totals (tests)

    def total(self, subscription, add_on):
        with self.lock:
            return sum(u["amount"] for u in self.usages
                       if u["subscription_id"] == subscription
                       and u["add_on_code"] == add_on)
