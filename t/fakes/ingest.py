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

import time

from .base import FakeServer, Response

DAY = 86400


class FakeOpenMeter(FakeServer):

    routes = [("POST", r"/api/v1/events", "ingest")]

    def __init__(self, token="om_fake", dedupe_ttl=DAY, **kw):
        super().__init__(**kw)
        self.token = token
        self.events = []
        self.seen = {}              # (id, source) -> time first seen
        self.duplicates = 0
        self.dedupe_ttl = dedupe_ttl
        self.now = time.time

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
