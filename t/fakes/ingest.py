"""Fake generic ingest endpoints: OpenMeter and Lago.

OpenMeter (openmeterio/openmeter api/openapi.yaml, ingestEvents): POST
/api/v1/events, application/cloudevents+json (one event) or
application/cloudevents-batch+json (array); 204; errors as
application/problem+json; Bearer auth.  Dedupe by (id, source) only when
enabled (``dedupe_ttl=None``: off, as self-hosted by default; seconds: the
TTL, 24 h when on) on the fake's clock ``self.now``.

Lago (getlago/lago-openapi src/schemas/EventInputObject.yaml): POST
/api/v1/events {"event":{...}} and /api/v1/events/batch {"events":[...]}
(<= 100); transaction_id, external_subscription_id and code required.
``pipeline="postgres"``: a resent transaction_id answers 422
{"code":"validation_errors","error_details":{"transaction_id":
["value_already_exist"]}} (a batch with one is rejected whole);
``pipeline="clickhouse"``: the same (transaction_id, timestamp) answers 200
and overwrites the stored event, another timestamp is a new event.
Bearer auth.
"""

import datetime
import re
import time

from .base import FakeServer, Response

DAY = 86400


class FakeOpenMeter(FakeServer):

    routes = [("POST", r"/api/v1/events", "ingest"),
              ("GET", r"/api/v1/meters/([^/]+)/query", "query_meter")]

    def __init__(self, token="om_fake", dedupe_ttl=DAY, meters=None, **kw):
        super().__init__(**kw)
        self.token = token
        self.events = []
        self.seen = {}              # (id, source) -> time first seen
        self.duplicates = 0
        self.dedupe_ttl = dedupe_ttl
        self.now = time.time
        # meter slug -> event type it sums (default: the slug, "_" as "-")
        self.meters = meters

    def error(self, status, kind, message, **extra):
        return Response(status, {"type": "about:blank", "title": kind,
                                 "status": status, "detail": message},
                        ctype="application/problem+json")

    def check_auth(self, req):
        if self.token is not None and req.bearer() != self.token:
            return self.error(401, "Unauthorized", "invalid token")
        return None

    def ingest(self, req):
        if req.content_type == "application/cloudevents+json":
            events = [req.json]
        elif req.content_type == "application/cloudevents-batch+json":
            events = req.json
        else:
            return self.error(415, "Unsupported Media Type",
                              "use application/cloudevents+json")
        if not isinstance(events, list) or not events:
            return self.error(400, "Bad Request", "invalid JSON body")
        for ev in events:
            if not isinstance(ev, dict) or ev.get("specversion") != "1.0":
                return self.error(400, "Bad Request", "specversion must be "
                                  "1.0")
            for f in ("id", "source", "type", "subject"):
                if not isinstance(ev.get(f), str) or not ev[f]:
                    return self.error(400, "Bad Request",
                                      "%s: required" % f)
        for ev in events:
            k = (ev["id"], ev["source"])
            t = self.seen.get(k)
            if self.dedupe_ttl is not None and t is not None \
                    and self.now() - t < self.dedupe_ttl:
                self.duplicates += 1
                continue
            self.seen[k] = self.now()
            self.events.append(ev)
        return Response(204)

    def total(self, subject, type_):
        with self.lock:
            return sum(e.get("data", {}).get("value", 0) for e in self.events
                       if e["subject"] == subject and e["type"] == type_)

    def query_meter(self, req, slug):
        """api/openapi.yaml queryMeter: subject (repeatable), from and to
        (RFC 3339, both inclusive), windowSize MINUTE|HOUR|DAY|MONTH (none:
        one row for the whole range); MeterQueryResult {from, to,
        windowSize, data: [{value, windowStart, windowEnd, subject,
        groupBy}]}.  A sum meter of data.value."""
        if not re.match(r"^[a-z0-9]+(?:_[a-z0-9]+)*$", slug):
            return self.error(400, "Bad Request", "invalid meter id or slug")
        type_ = (self.meters or {}).get(slug, slug.replace("_", "-"))
        if self.meters is not None and slug not in self.meters:
            return self.error(404, "Not Found", "meter not found: " + slug)
        bounds = {}
        for name in ("from", "to"):
            v = req.q(name)
            bounds[name] = _rfc3339(v) if v is not None else None
            if v is not None and bounds[name] is None:
                return self.error(400, "Bad Request", "invalid " + name)
        size = {None: None, "MINUTE": 60, "HOUR": 3600,
                "DAY": 86400}.get(req.q("windowSize"), -1)
        if size == -1:
            return self.error(400, "Bad Request", "invalid windowSize")
        subjects = req.query.get("subject")
        with self.lock:
            evs = [(e["subject"], _rfc3339(e["time"]),
                    e.get("data", {}).get("value", 0)) for e in self.events
                   if e["type"] == type_]
        evs = [x for x in evs
               if (subjects is None or x[0] in subjects)
               and (bounds["from"] is None or x[1] >= bounds["from"])
               and (bounds["to"] is None or x[1] <= bounds["to"])]
        rows = {}
        for subj, t, v in evs:
            if size is None:
                ws, we = bounds["from"] or 0, bounds["to"] or t
            else:
                ws = t - t % size
                we = ws + size
            k = (subj, ws, we)
            rows[k] = rows.get(k, 0) + v
        data = [{"value": v, "windowStart": _iso(ws), "windowEnd": _iso(we),
                 "subject": subj, "groupBy": {}}
                for (subj, ws, we), v in sorted(rows.items())]
        out = {"data": data}
        for name in ("from", "to"):
            if bounds[name] is not None:
                out[name] = _iso(bounds[name])
        if size is not None:
            out["windowSize"] = req.q("windowSize")
        return Response(200, out)


def _rfc3339(s):
    try:
        d = datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if d.tzinfo is None:
        return None
    return int(d.timestamp())


def _iso(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeLago(FakeServer):

    routes = [("POST", r"/api/v1/events", "ingest"),
              ("POST", r"/api/v1/events/batch", "batch")]

    def __init__(self, token="lago_fake", pipeline="postgres", **kw):
        super().__init__(**kw)
        self.token = token
        self.events = []
        self.ids = set()
        self.pipeline = pipeline
        self.overwrites = 0

    def error(self, status, kind, message, **extra):
        body = {"status": status, "error": kind}
        if status == 422:
            body["code"] = "validation_errors"
            body["error_details"] = extra.get("details", {})
        else:
            body["code"] = message
        return Response(status, body)

    def check_auth(self, req):
        if req.bearer() != self.token:
            return Response(401, {"status": 401, "error": "Unauthorized"})
        return None

    def check_request(self, req):
        if req.method == "POST" and req.json is None:
            return self.error(400, "Bad Request", "invalid_json")
        return None

    def _check(self, ev):
        if not isinstance(ev, dict):
            return {"event": ["invalid"]}
        missing = {f: ["value_is_mandatory"]
                   for f in ("transaction_id", "code",
                             "external_subscription_id")
                   if not isinstance(ev.get(f), str) or not ev[f]}
        if missing:
            return missing
        if self.pipeline == "postgres" and ev["transaction_id"] in self.ids:
            return {"transaction_id": ["value_already_exist"]}
        return None

    def _accept(self, ev):
        self.ids.add(ev["transaction_id"])
        for i, old in enumerate(self.events):
            if self.pipeline == "clickhouse" \
                    and old["transaction_id"] == ev["transaction_id"] \
                    and old.get("timestamp") == ev.get("timestamp"):
                self.overwrites += 1
                self.events[i] = dict(ev, lago_id=old["lago_id"])
                return self.events[i]
        e = dict(ev, lago_id="%08d" % len(self.events))
        self.events.append(e)
        return e

    def ingest(self, req):
        ev = req.json.get("event") if isinstance(req.json, dict) else None
        bad = self._check(ev)
        if bad:
            return self.error(422, "Unprocessable Entity", "", details=bad)
        return Response(200, {"event": self._accept(ev)})

    def batch(self, req):
        evs = req.json.get("events") if isinstance(req.json, dict) else None
        if not isinstance(evs, list) or not 0 < len(evs) <= 100:
            return self.error(422, "Unprocessable Entity", "",
                              details={"events": ["invalid_size"]})
        details = {}
        for i, ev in enumerate(evs):
            bad = self._check(ev)
            if bad:
                details[str(i)] = bad
        if details:
            return self.error(422, "Unprocessable Entity", "",
                              details=details)
        return Response(200, {"events": [self._accept(e) for e in evs]})

    def total(self, external_subscription_id, code):
        with self.lock:
            return sum(e.get("properties", {}).get("value", 0)
                       for e in self.events
                       if e.get("external_subscription_id")
                       == external_subscription_id and e["code"] == code)
