"""Shared core of the provider fakes.

Each fake is a small HTTP server on a free 127.0.0.1 port, running in a
thread (``with Fake() as f:`` or ``f.start()`` / ``f.stop()``).  It records
every request, checks auth and encoding like the real provider, and can be
scripted to fail: the next N requests answer 500, 429 with Retry-After, a
400 with the provider's error body, hang for T seconds, or are processed and
then hang (the answer is lost, the effect is not).
"""

import base64
import json
import re
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Request:
    """One recorded request."""

    def __init__(self, method, path, query, headers, body):
        self.method = method
        self.path = path            # without the query
        self.query = query          # {name: [values]}
        self.headers = headers      # case-insensitive (email.message)
        self.body = body            # raw bytes
        self.form = None            # {key: value} for form bodies
        self.json = None            # parsed JSON bodies
        self.time = time.time()
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip()
        self.content_type = ctype.lower()
        if self.content_type == "application/x-www-form-urlencoded":
            self.form = dict(urllib.parse.parse_qsl(
                body.decode("utf-8", "replace"), keep_blank_values=True))
        elif self.content_type.endswith("json") and body:
            try:
                self.json = json.loads(body)
            except ValueError:
                self.json = None

    def q(self, name, default=None):
        v = self.query.get(name)
        return v[0] if v else default

    def basic_auth(self):
        """(user, password) from Basic auth, or None."""
        h = self.headers.get("Authorization") or ""
        if not h.startswith("Basic "):
            return None
        try:
            user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user, pw

    def bearer(self):
        h = self.headers.get("Authorization") or ""
        return h[7:] if h.startswith("Bearer ") else None

    def __repr__(self):
        return "<%s %s>" % (self.method, self.path)


class Response:
    def __init__(self, status, body=None, headers=None, ctype=None):
        self.status = status
        self.headers = dict(headers or {})
        if body is None:
            self.body = b""
        elif isinstance(body, (bytes, bytearray)):
            self.body = bytes(body)
        elif isinstance(body, str):
            self.body = body.encode()
        else:
            self.body = json.dumps(body).encode()
            ctype = ctype or "application/json"
        if ctype:
            self.headers.setdefault("Content-Type", ctype)


class Action:
    """A scripted answer for one upcoming request."""

    def __init__(self, status=None, body=None, headers=None, hang=0.0,
                 after=False, match=None):
        self.status = status    # answer this instead of processing
        self.body = body
        self.headers = headers
        self.hang = hang        # seconds to wait first
        self.after = after      # process, then hang: the answer is lost
        self.match = match      # only requests whose path matches (a
                                # regex) or for which match(req) is true


class _Handler(BaseHTTPRequestHandler):
    # headers and body go out in two writes: without this, the client's
    # delayed ACK holds every response about 40 ms
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):      # quiet
        pass

    def _serve(self):
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        req = Request(self.command, url.path,
                      urllib.parse.parse_qs(url.query, keep_blank_values=True),
                      self.headers, body)
        resp = fake._handle(req)
        if resp is None:        # hung up: drop the connection
            self.close_connection = True
            return
        try:
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # many clients connect at once: with the default backlog of 5 the rest
    # of the SYNs are dropped and retried a second later
    request_queue_size = 256


class FakeServer:
    """Base class: routes, recording, scripting, start/stop.

    Subclasses set ``routes`` (list of (method, regex, method name)),
    implement ``check_auth(req)`` (None when fine, else a Response) and
    ``error(status, kind, message)`` (the provider's error shape).
    """

    routes = []

    def __init__(self, delay=0.0):
        self.lock = threading.RLock()
        self.requests = []
        self.script = deque()
        self.delay = delay          # per request, for slow drains
        self.hangs = threading.Event()
        # concurrency: requests being handled now, and the most at once
        self.open = 0
        self.max_open = 0
        # hold(): every request waits (before or after it is processed)
        # until release(), so that a test can kill the client meanwhile
        self.holding = None
        self.held = 0
        self._release = threading.Event()
        self._server = None
        self._thread = None
        self._routes = [(m, re.compile("^" + r + "$"), getattr(self, f))
                        for m, r, f in self.routes]

    # lifecycle

    def start(self):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self.hangs.set()        # release hanging handlers
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    # scripting

    def fail_next(self, n=1, status=500, body=None, headers=None,
                  match=None):
        """The next n requests answer status with the provider's error
        body (or body) instead of being processed."""
        with self.lock:
            for _ in range(n):
                self.script.append(Action(status, body, headers,
                                          match=match))

    def rate_limit_next(self, n=1, retry_after=1, match=None):
        self.fail_next(n, 429, headers={"Retry-After": str(retry_after)},
                       match=match)

    def hang_next(self, n=1, seconds=5.0, after=False, match=None):
        """The next n requests wait seconds and then drop the connection;
        after=True processes the request first (its answer is lost)."""
        with self.lock:
            for _ in range(n):
                self.script.append(Action(hang=seconds, after=after,
                                          match=match))

    def _take(self, req):
        with self.lock:
            for i, a in enumerate(self.script):
                if a.match is None or (a.match(req) if callable(a.match)
                                       else re.search(a.match, req.path)):
                    del self.script[i]
                    return a
        return None

    # hooks for subclasses

    def check_auth(self, req):
        return None

    def error(self, status, kind, message, **extra):
        return Response(status, {"error": {"type": kind, "message": message}})

    def check_request(self, req):
        """Encoding checks before routing; None or a Response."""
        return None

    def saved_failure(self, req, resp):
        """Called with a scripted failure's answer (Stripe saves it)."""

    def not_found(self, req):
        return self.error(404, "not_found",
                          "Unrecognized request URL (%s: %s)"
                          % (req.method, req.path))

    # core

    def requests_to(self, method, pattern):
        with self.lock:
            return [r for r in self.requests if r.method == method
                    and re.search(pattern, r.path)]

    def _route(self, req):
        for m, rx, f in self._routes:
            mo = rx.match(req.path)
            if mo and m == req.method:
                return f(req, *[urllib.parse.unquote(g)
                                for g in mo.groups()])
        return self.not_found(req)

    def hold(self, after=False):
        """From now on requests wait until release(); after=True
        processes each one first (its effect is kept, its answer held)."""
        with self.lock:
            self._release.clear()
            self.holding = "after" if after else "before"

    def release(self):
        with self.lock:
            self.holding = None
            self._release.set()

    def _hold(self, when):
        """True when the request was held (and is released now)."""
        if self.holding != when:
            return False
        with self.lock:
            self.held += 1
        try:
            self._release.wait(60)
        finally:
            with self.lock:
                self.held -= 1
        return True

    def _handle(self, req):
        with self.lock:
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        try:
            if self._hold("before"):
                # lost before the provider saw it: never processed
                return None
            resp = self._handle_one(req)
            if resp is not None:
                self._hold("after")
            return resp
        finally:
            with self.lock:
                self.open -= 1

    def begin(self, req):
        """Before a request is processed: None, or the Response that
        refuses it (a provider's concurrency rule); end(req) follows."""
        return None

    def end(self, req):
        pass

    def _handle_one(self, req):
        with self.lock:
            self.requests.append(req)
        r = self.begin(req)
        if r is not None:
            return r
        action = None
        ended = False
        try:
            if self.delay:
                time.sleep(self.delay)
            r = self.check_auth(req)
            if r is not None:
                return r
            r = self.check_request(req)
            if r is not None:
                return r
            action = self._take(req)
            if action is not None and not action.after:
                if action.hang:
                    # a scripted hang is not processing: the client gave
                    # up on it long before
                    self.end(req)
                    ended = True
                    self.hangs.wait(action.hang)
                    if action.status is None:
                        return None
                if action.status is not None:
                    resp = self._scripted(req, action)
                    self.saved_failure(req, resp)
                    return resp
            with self.lock:
                resp = self._route(req)
        finally:
            if not ended:
                self.end(req)
        if action is not None and action.after:
            self.hangs.wait(action.hang)
            return None
        return resp

    def _scripted(self, req, a):
        if a.body is not None:
            resp = Response(a.status, a.body)
        elif a.status == 429:
            resp = self.error(429, "rate_limit", "Too many requests")
        elif a.status >= 500:
            resp = self.error(a.status, "api_error",
                              "Something went wrong (scripted)")
        else:
            resp = self.error(a.status, "invalid_request",
                              "Scripted error %d" % a.status)
        resp.headers.update(a.headers or {})
        return resp


def paginate_cursor(items, req, key=lambda o: o["id"], max_limit=100):
    """Stripe-style list: limit, starting_after, has_more."""
    try:
        limit = int(req.q("limit", "10"))
    except ValueError:
        limit = 10
    limit = max(1, min(limit, max_limit))
    after = req.q("starting_after")
    start = 0
    if after is not None:
        for i, o in enumerate(items):
            if key(o) == after:
                start = i + 1
                break
    page = items[start:start + limit]
    return {"object": "list", "url": req.path, "data": page,
            "has_more": start + limit < len(items)}
