"""Fake Metronome usage ingest, as published.

Sources: Metronome-Industries/metronome-node src/resources/v1/usage.ts
(``ingest``, ``search``: UsageIngestParams.Usage), docs.metronome.com
api-reference/usage/ingest-events, guides/events/send-usage-events,
api-reference/idempotency and api-reference/status-codes.

- ``POST /v1/ingest``, ``Authorization: Bearer <token>``, a JSON array of
  1 to 100 events ``{transaction_id, customer_id, event_type, timestamp,
  properties?}`` (strings; timestamp RFC 3339 with a 4-digit year) -> 200
  with an empty body.
- ``transaction_id`` dedupes: an event whose id was accepted in the last 34
  days is ignored (still 200).  The fake forgets ids after that window, on
  its own clock (``clock``: seconds added to the real time).
- Timestamps more than 24 h ahead are rejected; events backdate at most 34
  days (older ones are rejected here: the docs say only that backdating is
  supported up to 34 days).
- ``customer_id`` matches a customer by its Metronome id or any of its
  ingest aliases; an event that matches none is accepted and bills
  nothing (``unmatched``), as the events search's "matched_customer (if
  any)" shows.
- Every 4xx body is ``{"message": "..."}``; 429 for rate limits (scripted).
  The docs do not say whether one invalid event fails the whole request:
  this fake rejects the whole request (400), the stricter reading.
- The events search (``POST /v1/events/search``) is not faked: it is
  "heavily rate limited", for sampling only, and covers the same 34 days,
  so the worker does not use it.
"""

import datetime
import re
import time

from .base import FakeServer, Response

WINDOW = 34 * 86400
AHEAD = 24 * 3600
MAX_EVENTS = 100
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?"
                     r"(Z|[+-]\d\d:\d\d)$")


def parse_ts(s):
    if not isinstance(s, str) or not RFC3339.match(s):
        return None
    try:
        return datetime.datetime.fromisoformat(
            s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class FakeMetronome(FakeServer):

    routes = [("POST", r"/v1/ingest", "ingest")]

    def __init__(self, token="mt_fake", customers=None, **kw):
        super().__init__(**kw)
        self.token = token
        # Metronome customer id -> set of ingest aliases (the caller's
        # dict: a test may add customers after start)
        self.customers = customers if customers is not None else {}
        self.clock = 0.0
        self.events = []            # accepted, matched or not
        self.seen = {}              # transaction_id -> accepted at (clock)
        self.duplicates = 0
        self.batches = []           # events per accepted request

    def now(self):
        return time.time() + self.clock

    def error(self, status, kind, message, **extra):
        return Response(status, {"message": message})

    def check_auth(self, req):
        if req.bearer() != self.token:
            return self.error(401, "unauthorized", "Unauthorized")
        return None

    def match(self, customer_id):
        for cid, aliases in self.customers.items():
            if customer_id == cid or customer_id in aliases:
                return cid
        return None

    def _invalid(self, ev, now):
        if not isinstance(ev, dict):
            return "each event must be an object"
        for f in ("transaction_id", "customer_id", "event_type",
                  "timestamp"):
            if not isinstance(ev.get(f), str) or not ev[f]:
                return "%s is required and must be a string" % f
        props = ev.get("properties", {})
        if not isinstance(props, dict):
            return "properties must be an object"
        ts = parse_ts(ev["timestamp"])
        if ts is None:
            return "timestamp must be an RFC 3339 string"
        if ts > now + AHEAD:
            return "timestamp is more than 24 hours in the future"
        if ts < now - WINDOW:
            return "timestamp is more than 34 days in the past"
        return None

    def ingest(self, req):
        evs = req.json
        if not isinstance(evs, list) or not 1 <= len(evs) <= MAX_EVENTS:
            return self.error(400, "bad_request", "body must be a JSON "
                              "array of between 1 and 100 usage events")
        now = self.now()
        for i, ev in enumerate(evs):
            bad = self._invalid(ev, now)
            if bad:
                return self.error(400, "bad_request",
                                  "event %d: %s" % (i, bad))
        # forget ids past the window
        self.seen = {t: at for t, at in self.seen.items()
                     if at > now - WINDOW}
        for ev in evs:
            t = ev["transaction_id"]
            if t in self.seen:
                self.duplicates += 1
                continue
            self.seen[t] = now
            e = dict(ev, matched=self.match(ev["customer_id"]),
                     processed_at=now)
            self.events.append(e)
        self.batches.append(len(evs))
        return Response(200)

    @property
    def unmatched(self):
        with self.lock:
            return [e for e in self.events if e["matched"] is None]

    def total(self, customer, event_type, key="value"):
        """The sum a SUM billable metric on properties[key] would bill."""
        with self.lock:
            return sum(int(e["properties"][key]) for e in self.events
                       if e["matched"] == customer
                       and e["event_type"] == event_type)
