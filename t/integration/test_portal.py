"""The customer portal's endpoints (issue 14 parts 1-2): POST /register and
GET /usage, served by meter-worker's listener behind a real nginx (the
conf/nginx-portal.conf example, ports substituted) against a real
redis-server.  Sign-up runs the flow of meterctl register and shows a key
once (409 after); every refusal is problem+json; /usage gives the numbers
of meterctl usage exactly, for the caller's own key only (401 otherwise).
"""

import calendar
import hashlib
import http.client
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, key_hash, raw_request, wait_for
# WORKER honours METER_WORKER_BIN (e.g. a build with -fsanitize=address)
from test_sync import METERCTL, WORKER, Billing

PORTAL_DIR = ROOT / "docs" / "portal"
KEY_RE = re.compile(r"^mk_live_[a-z2-7]{32}$")
PROBLEM = "application/problem+json"

pytestmark = pytest.mark.skipif(not WORKER.exists() or not METERCTL.exists(),
                                reason="run make worker")


class PortalWorker(Billing):
    """meter-worker (provider file) with the portal on its listener; the
    daemon's start, stop (exit 0 on SIGTERM), log and ctl of test_sync's
    Billing."""

    def __init__(self, tmp, redis, **settings):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.redis = redis
        self.provider = "file"
        self.port = free_port()
        self.proc = None
        self.log_path = self.tmp / "worker.log"
        opts = {"portal.register": "on", "portal.usage": "on",
                "sync_interval": "1h"}
        opts.update({k.replace("__", "."): v for k, v in settings.items()})
        lines = ["redis = %s" % redis.address, "provider = file",
                 "file.path = %s" % (self.tmp / "billed.jsonl"),
                 "log_level = debug",
                 "webhook.listen = 127.0.0.1:%d" % self.port]
        lines += ["%s = %s" % kv for kv in opts.items() if kv[1] is not None]
        self.conf = self.tmp / "worker.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout=15):
        return super().start(port=self.port, timeout=timeout)


def portal_conf(worker_port, upstream_port, portal_dir=PORTAL_DIR):
    """conf/nginx-portal.conf's http block, made runnable on free ports:
    what the example says is what the tests run."""
    text = (ROOT / "conf" / "nginx-portal.conf").read_text()
    body = text[text.index("\nhttp {\n") + 8:text.rindex("}")]
    body = body.replace("127.0.0.1:8091", "127.0.0.1:%d" % worker_port)
    body = body.replace("127.0.0.1:8000", "127.0.0.1:%d" % upstream_port)
    body = body.replace("127.0.0.1:6379", "@REDIS@")
    body = body.replace("/usr/share/nginx-meter/portal/", "%s/" % portal_dir)
    body = body.replace("listen 80;", "listen 127.0.0.1:@PORT@;")
    # fast enough for a test; limits high enough for one
    body = body.replace("meter_flush_interval 1s", "meter_flush_interval 100ms")
    body = body.replace("meter_governance_refresh 5s",
                        "meter_governance_refresh 200ms")
    body = body.replace("rate=10r/m", "rate=6000r/m")
    body = body.replace("rate=2r/s", "rate=100r/s")
    return body


def request(port, method, path, body=None, headers=None, timeout=30):
    """(status, headers dict with lowercase names, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = dict({"Content-Type": "application/json"},
                           **(headers or {}))
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return (r.status, {k.lower(): v for k, v in r.getheaders()},
                r.read())
    finally:
        c.close()


def problem(resp, status, kind=None):
    """Asserts an RFC 9457 refusal; returns its JSON."""
    st, h, b = resp
    assert st == status, (st, b)
    assert h["content-type"] == PROBLEM, h
    p = json.loads(b)
    assert p["status"] == status and p["title"] and p["detail"], p
    assert p["type"].startswith("urn:nginx-meter:problem:"), p
    if kind is not None:
        assert p["type"] == "urn:nginx-meter:problem:" + kind, p
    return p


@pytest.fixture
def portal(tmp_path, redis, nginx_factory, backend, request):
    """(worker, nginx) started; worker settings from an indirect
    parametrization: with_settings(portal__grace="3d")."""
    w = PortalWorker(tmp_path / "w", redis,
                     **getattr(request, "param", {}))
    w.start()
    n = nginx_factory(portal_conf(w.port, backend.port), redis=redis.address)
    yield w, n
    w.stop()


def with_settings(**settings):
    return pytest.mark.parametrize("portal", [settings], indirect=True,
                                   ids=["settings"])


def signup(n, email, **extra):
    body = dict({"email": email}, **extra)
    return request(n.port, "POST", "/register", body)


def call_api(n, key, path="/"):
    return request(n.port, "GET", path, headers={"X-API-Key": key})[0]


# ---------------------------------------------------------------- register

def test_signup_once_then_409_and_the_key_works(portal, redis):
    w, n = portal
    st, h, b = signup(n, "Ada@Example.com", first_name="Ada",
                      last_name="Lovelace")
    assert st == 201, b
    assert h["content-type"] == "application/json"
    assert h["cache-control"] == "no-store"
    r = json.loads(b)
    assert KEY_RE.match(r["api_key"]), r
    cid = "c_" + hashlib.sha256(b"ada@example.com").hexdigest()[:20]
    assert r["customer"] == cid
    kh = key_hash(r["api_key"])
    # the same records as meterctl register: customer, key hash only
    cust = redis.hgetall("mtr:cust:{%s}" % cid)
    assert (cust["email"], cust["name"], cust["plan"], cust["status"],
            cust["provider"]) == ("ada@example.com", "Ada Lovelace",
                                  "default", "active", "file")
    assert redis.smembers("mtr:ckeys:{%s}" % cid) == {kh}
    assert redis.hgetall("mtr:reg:{%s}" % cid)["state"] == "done"
    assert redis.smembers("mtr:customers") == {cid}
    assert r["api_key"] not in w.log()
    assert "ada@example.com" not in w.log().lower()

    # governance sees the key within the refresh: the API answers 200
    wait_for(lambda: call_api(n, r["api_key"]) == 200, 30)
    assert call_api(n, "mk_live_" + "a" * 32) == 401

    # a rerun (any case) makes nothing and shows nothing
    for email in ("ada@example.com", "ADA@EXAMPLE.COM"):
        resp = signup(n, email, first_name="Other")
        p = problem(resp, 409, "already_registered")
        assert r["api_key"] not in resp[2].decode()
        assert r["api_key"][:12] not in resp[2].decode()
        assert "never shown again" in p["detail"]
        assert "rotate" in p["detail"]
    assert redis.smembers("mtr:customers") == {cid}
    assert redis.smembers("mtr:ckeys:{%s}" % cid) == {kh}
    assert redis.keys("mtr:key:*") == ["mtr:key:{%s}" % kh]
    assert redis.hgetall("mtr:cust:{%s}" % cid)["name"] == "Ada Lovelace"


def test_signup_matches_meterctl_register(portal, redis):
    """The shared flow: a customer meterctl registered is a 409 for the
    portal, and a portal sign-up is refused by meterctl the same way."""
    w, n = portal
    r = w.ctl("register", "--email", "cli@example.com", "--json")
    made = json.loads(r.stdout)
    p = problem(signup(n, "cli@example.com"), 409, "already_registered")
    assert made["key"] not in json.dumps(p)

    assert signup(n, "web@example.com")[0] == 201
    r = w.ctl("register", "--email", "web@example.com", expect=65)
    assert "keys rotate" in r.stderr and "mk_live_" not in r.stdout
    assert len(redis.smembers("mtr:customers")) == 2


def test_signup_conflict_with_a_customer_made_otherwise(portal, redis):
    w, n = portal
    cid = "c_" + hashlib.sha256(b"old@example.com").hexdigest()[:20]
    w.ctl("customers", "add", cid, "--provider", "file")
    problem(signup(n, "old@example.com"), 409, "account_conflict")
    assert redis.smembers("mtr:ckeys:{%s}" % cid) == set()
    assert redis.keys("mtr:key:*") == []


@pytest.mark.parametrize("body,status,kind", [
    (b"{not json", 400, "malformed_json"),
    (b"[1, 2]", 400, "malformed_json"),
    (b'"x@example.com"', 400, "malformed_json"),
    (b"{}", 422, "invalid_email"),
    (b'{"email": "no-at-sign"}', 422, "invalid_email"),
    (b'{"email": "a@b@c"}', 422, "invalid_email"),
    (b'{"email": "a b@example.com"}', 422, "invalid_email"),
    (b'{"email": 42}', 422, "invalid_field"),
    (b'{"email": "x@example.com", "first_name": ["x"]}', 422,
     "invalid_field"),
    (b'{"email": "x@example.com", "first_name": "a\\u0007b"}', 422,
     "invalid_name"),
    (("{\"email\": \"x@example.com\", \"last_name\": \"%s\"}"
      % ("n" * 101)).encode(), 422, "invalid_name"),
])
def test_signup_refusals_store_nothing(portal, redis, body, status, kind):
    w, n = portal
    resp = request(n.port, "POST", "/register", body,
                   {"Content-Type": "application/json"})
    problem(resp, status, kind)
    assert redis.keys("mtr:*") == [] or \
        not [k for k in redis.keys("mtr:*") if k.startswith(
            ("mtr:reg:", "mtr:cust:", "mtr:key:", "mtr:customers"))]


def test_signup_method_media_type_and_size(portal, redis):
    w, n = portal
    resp = request(n.port, "GET", "/register")
    problem(resp, 405, "method")
    assert resp[1]["allow"] == "POST"
    problem(request(n.port, "POST", "/register", b"email=x%40example.com",
                    {"Content-Type": "application/x-www-form-urlencoded"}),
            415, "media_type")
    problem(request(n.port, "POST", "/register", b'{"email":"x@e.com"}'),
            415, "media_type")
    # portal.max_body (4096) through nginx (which allows 16k) and direct
    big = json.dumps({"email": "big@example.com", "first_name": "x" * 5000})
    for port in (n.port, w.port):
        p = problem(request(port, "POST", "/register", big.encode(),
                            {"Content-Type": "application/json"}),
                    413, "body_too_large")
        assert "4096" in p["detail"]
    # exactly the limit is read (and then judged on its content)
    pad = 4096 - len(json.dumps({"email": "lim@example.com",
                                 "first_name": ""}))
    exact = json.dumps({"email": "lim@example.com", "first_name": "y" * pad})
    assert len(exact) == 4096
    problem(request(w.port, "POST", "/register", exact.encode(),
                    {"Content-Type": "application/json"}), 422,
            "invalid_name")
    # chunked straight to the worker: 411, as problem+json
    raw = raw_request(w.port, b"POST /register HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n"
                      b"2\r\n{}\r\n0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411"), raw
    assert b"application/problem+json" in head
    assert json.loads(body)["status"] == 411
    assert not [k for k in redis.keys("mtr:*") if k.startswith("mtr:cust:")]


@with_settings(portal__register=None)
def test_register_is_off_by_default(portal, redis):
    w, n = portal
    p = problem(signup(n, "x@example.com"), 404, "not_enabled")
    assert "portal.register" in p["detail"]
    assert redis.keys("mtr:*") == [] or not redis.keys("mtr:cust:*")


def test_worker_refuses_bad_portal_settings(tmp_path, redis):
    cases = [({"portal.register": "yes"}, '"portal.register" must be on'),
             ({"portal.max_body": "10"}, '"portal.max_body"'),
             ({"portal.email_domains": "a.com,b_c.com"},
              '"portal.email_domains"'),
             ({"portal.grace": "soon"}, '"portal.grace"'),
             ({"portal.key_header": "X Key"}, '"portal.key_header"'),
             ({"portal.secret_file": str(tmp_path / "missing")},
              "cannot open the file")]
    for i, (settings, msg) in enumerate(cases):
        w = PortalWorker(tmp_path / ("w%d" % i), redis,
                         **{k.replace(".", "__"): v
                            for k, v in settings.items()})
        r = subprocess.run([str(WORKER), "-t", "-c", str(w.conf)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 78, (settings, r.stderr)
        assert msg in r.stderr, (settings, r.stderr)
    # without the portal, the file provider still takes no webhooks
    w = PortalWorker(tmp_path / "off", redis, portal__register="off",
                     portal__usage="off")
    r = subprocess.run([str(WORKER), "-t", "-c", str(w.conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "takes no webhooks" in r.stderr


@pytest.fixture
def secret_file(tmp_path):
    p = tmp_path / "portal-secret"
    p.write_text("open sesame\n")
    return p


def test_shared_secret_and_domain_allow_list(tmp_path, redis, nginx_factory,
                                             backend, secret_file):
    w = PortalWorker(tmp_path / "w", redis, portal__secret_file=secret_file,
                     portal__email_domains="example.com, Example.ORG")
    w.start()
    try:
        n = nginx_factory(portal_conf(w.port, backend.port),
                          redis=redis.address)
        body = {"email": "a@example.com"}
        problem(request(n.port, "POST", "/register", body), 403,
                "portal_secret")
        problem(request(n.port, "POST", "/register", body,
                        {"X-Portal-Secret": "open sesam"}), 403,
                "portal_secret")
        problem(request(n.port, "POST", "/register", body,
                        {"X-Portal-Secret": "open sesame!"}), 403,
                "portal_secret")
        ok = {"X-Portal-Secret": "open sesame"}
        p = problem(request(n.port, "POST", "/register",
                            {"email": "a@evil.example.com"}, ok), 403,
                    "email_domain")
        assert "evil" not in p["detail"]
        problem(request(n.port, "POST", "/register",
                        {"email": "a@example.com.evil.net"}, ok), 403,
                "email_domain")
        assert not redis.keys("mtr:cust:*")
        assert request(n.port, "POST", "/register", body, ok)[0] == 201
        assert request(n.port, "POST", "/register",
                       {"email": "b@EXAMPLE.org"}, ok)[0] == 201
        assert len(redis.smembers("mtr:customers")) == 2
        assert "open sesame" not in w.log()
    finally:
        w.stop()


def test_redis_down_is_503_and_a_retry_completes(portal, redis):
    w, n = portal
    redis.stop()
    try:
        resp = signup(n, "late@example.com")
        problem(resp, 503)
        assert int(resp[1]["retry-after"]) > 0
        resp = request(n.port, "GET", "/usage",
                       headers={"X-API-Key": "mk_live_" + "b" * 32})
        problem(resp, 503, "unavailable")
    finally:
        redis.start()
    st, _, b = wait_for(lambda: (lambda r: r if r[0] == 201 else None)(
        signup(n, "late@example.com")), 10)
    assert KEY_RE.match(json.loads(b)["api_key"])


def test_limit_req_in_front_of_register(tmp_path, redis, nginx_factory,
                                        backend):
    """The example's limit_req as written (10 a minute, burst 5): the 7th
    sign-up at once is 429 from nginx, and never reaches the worker."""
    w = PortalWorker(tmp_path / "w", redis).start()
    try:
        conf = portal_conf(w.port, backend.port).replace("rate=6000r/m",
                                                         "rate=10r/m")
        conf = conf.replace("limit_req zone=portal_signup burst=5;",
                            "limit_req zone=portal_signup burst=5 nodelay;")
        n = nginx_factory(conf, redis=redis.address)
        codes = [signup(n, "r%d@example.com" % i)[0] for i in range(8)]
        assert codes[:6] == [201] * 6 and codes[6:] == [429, 429], codes
        assert len(redis.smembers("mtr:customers")) == 6
    finally:
        w.stop()


# ---------------------------------------------------------------- usage

def month_start(t):
    g = time.gmtime(t)
    return calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0))


def hour_str(t):
    return time.strftime("%Y%m%d%H", time.gmtime(t))


def put_usage(redis, kh, t, field, value):
    """What the module's flush writes for (KH, hour of t)."""
    h = hour_str(t)
    redis.cmd("SADD", "mtr:idx:%s" % h, kh)
    redis.cmd("ZADD", "mtr:hours", "NX", str(t - t % 3600), h)
    redis.cmd("HSET", "mtr:u:{%s}:%s" % (kh, h), field, str(value))


def get_usage(n, key):
    st, h, b = request(n.port, "GET", "/usage", headers={"X-API-Key": key})
    assert st == 200, b
    assert h["content-type"] == "application/json"
    assert h["cache-control"] == "private, max-age=10"
    assert "x-api-key" in h["vary"].lower()
    return json.loads(b)


def test_usage_numbers_match_meterctl_exactly(portal, redis):
    w, n = portal
    r = json.loads(signup(n, "use@example.com")[2])
    key, cid = r["api_key"], r["customer"]
    kh = key_hash(key)
    now = int(time.time())
    start = month_start(now)

    # closed hours of this month (and one of the last month, left out)
    closed = [h for h in range(start, now, 3600) if h + 3600 + 300 < now]
    closed = sorted(set(closed[:1] + closed[len(closed) // 2:][:1]
                        + closed[-1:]))
    expect = {}
    for i, h in enumerate(closed):
        put_usage(redis, kh, h, "calls|w1.1", 100 + i)
        put_usage(redis, kh, h, "bytes|w1.1", 7000 + i)
    put_usage(redis, kh, start - 7200, "calls|w1.1", 999)

    # the drain bills the closed hours (file provider): b marks
    d = subprocess.run([str(WORKER), "-c", str(w.conf), "--once"],
                       capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stderr
    # late usage of a billed hour: pending
    if closed:
        put_usage(redis, kh, closed[-1], "calls|w2.1", 5)

    late = 5 if closed else 0
    before = sum(100 + i for i in range(len(closed))) + late

    def metered_calls():
        return {m["meter"]: m["metered"]
                for m in get_usage(n, key)["meters"]}.get("calls", 0)

    # and real calls through nginx, in the current hour (flushed in the
    # writer layout: no credit yet)
    wait_for(lambda: call_api(n, key) == 200, 30)
    for _ in range(6):
        assert call_api(n, key) == 200
    wait_for(lambda: metered_calls() == before + 7, 30, msg=metered_calls)

    # with credit, calls are flushed in the key layout and charged
    # (mtr:used) once governance shows the grant
    used = "mtr:used:{%s}" % kh
    used0 = int(redis.hgetall(used).get("calls", 0))
    w.ctl("credit", "set", cid, "--meter", "calls", "50")
    extra = []

    def charged():
        assert call_api(n, key) == 200
        extra.append(1)
        time.sleep(0.2)
        return int(redis.hgetall(used).get("calls", 0)) > used0

    wait_for(charged, 30)
    wait_for(lambda: metered_calls() == before + 7 + len(extra), 30,
             msg=metered_calls)
    used1 = int(redis.hgetall(used)["calls"])

    u = get_usage(n, key)
    cli = json.loads(w.ctl("usage", cid, "--period", "day", "--json",
                           "--from", time.strftime("%Y-%m-%d",
                                                   time.gmtime(start))
                           ).stdout)
    assert cli, "meterctl shows no usage"
    assert [(d["day"], d["meter"], d["metered"], d["billed"], d["state"])
            for d in u["days"]] == \
        [(c["period_start"][:10], c["meter"], c["quantity"], c["billed"],
          c["state"]) for c in cli]
    assert all(d["pending"] == d["metered"] - d["billed"] for d in u["days"])

    # exact totals, computed here from what was written
    calls = before + 7 + len(extra)
    nbytes = sum(7000 + i for i in range(len(closed)))
    billed_calls = sum(100 + i for i in range(len(closed)))
    got = {m["meter"]: (m["metered"], m["billed"], m["pending"])
           for m in u["meters"]}
    want = {"calls": (calls, billed_calls, calls - billed_calls)}
    if closed:
        want["bytes"] = (nbytes, nbytes, 0)
    assert got == want, (got, want)
    assert u["period"]["start"] == time.strftime("%Y-%m-01T00:00:00Z",
                                                 time.gmtime(now))
    assert u["customer"] == cid
    # credit: 50 granted on top of what was charged then
    assert 1 <= used1 - used0 <= len(extra)
    assert u["credit"] == [{"meter": "calls", "granted": used0 + 50,
                            "used": used1, "left": 50 - (used1 - used0)}]
    assert json.loads(w.ctl("credit", "show", cid, "--json").stdout) == \
        u["credit"]
    assert u["status"] == {"state": "active"}


@with_settings(portal__grace="3d")
def test_usage_status_grace_then_delinquent(portal, redis):
    w, n = portal
    r = json.loads(signup(n, "late-payer@example.com")[2])
    key, cid = r["api_key"], r["customer"]
    w.ctl("delinquent", "set", cid, "--reason", "invoice_overdue")
    since = int(redis.hgetall("mtr:cust:{%s}" % cid)["since"])
    s = get_usage(n, key)["status"]
    assert s == {"state": "grace", "reason": "invoice_overdue",
                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                        time.gmtime(since)),
                 "until": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                        time.gmtime(since + 3 * 86400))}
    # past the grace (since moved back 4 days)
    redis.cmd("HSET", "mtr:cust:{%s}" % cid, "since", str(since - 4 * 86400))
    s = get_usage(n, key)["status"]
    assert s["state"] == "delinquent" and s["reason"] == "invoice_overdue"
    assert "until" not in s
    w.ctl("delinquent", "clear", cid)
    assert get_usage(n, key)["status"] == {"state": "active"}


def test_usage_401_for_missing_unknown_and_revoked_keys(portal, redis):
    w, n = portal
    r = json.loads(signup(n, "gone@example.com")[2])
    key = r["api_key"]
    assert get_usage(n, key)["customer"] == r["customer"]

    resp = request(n.port, "GET", "/usage")
    problem(resp, 401, "missing_key")
    assert "www-authenticate" in resp[1]
    problem(request(n.port, "GET", "/usage",
                    headers={"X-API-Key": "mk_live_" + "c" * 32}),
            401, "unknown_key")
    # a key hash is not a key
    problem(request(n.port, "GET", "/usage",
                    headers={"X-API-Key": key_hash(key)}), 401,
            "unknown_key")
    # another header than the meter_zone's is not read
    problem(request(n.port, "GET", "/usage",
                    headers={"Authorization": "Bearer " + key}), 401,
            "missing_key")
    w.ctl("keys", "revoke", key_hash(key))
    p = problem(request(n.port, "GET", "/usage",
                        headers={"X-API-Key": key}), 401, "unknown_key")
    assert "revoked" in p["detail"]
    resp = request(n.port, "POST", "/usage", {"x": 1})
    problem(resp, 405, "method")
    assert resp[1]["allow"] == "GET, HEAD"


@with_settings(portal__usage="off")
def test_usage_can_be_off(portal):
    w, n = portal
    r = json.loads(signup(n, "nousage@example.com")[2])
    p = problem(request(n.port, "GET", "/usage",
                        headers={"X-API-Key": r["api_key"]}), 404,
                "not_enabled")
    assert "portal.usage" in p["detail"]


def test_pages_are_served_by_nginx(portal):
    w, n = portal
    for page, needle in (("/portal/", b'id="signup"'),
                         ("/portal/usage.html", b'id="lookup"')):
        st, h, b = request(n.port, "GET", page)
        assert st == 200 and needle in b, (page, st)
        assert h["content-type"].startswith("text/html")
        assert b"<noscript>" in b and b"curl" in b
        # every input has a label
        for i in re.findall(rb'<input id="([^"]+)"', b):
            assert b'for="' + i + b'"' in b, i
        # nothing from elsewhere
        assert not re.search(rb'(src|href)="(https?:)?//', b)
    st, h, _ = request(n.port, "GET", "/portal/portal.js")
    assert st == 200 and "javascript" in h["content-type"]
