"""Alerts (issue 14 part 3): rules in the worker config evaluated by the
meter-worker daemon from Redis, delivered to a real SMTP server (aiosmtpd,
Debian's python3-aiosmtpd) and to local webhook / Slack sinks.  Every
message arrives once with the right numbers, across a restart, a failing
channel that recovers, and a SIGKILL between claim and send."""

import base64
import email
import email.policy
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import (Client, expect_totals, free_port, key_hash, meterctl,
                      utc_hour, wait_for)

aiosmtpd = pytest.importorskip("aiosmtpd")
from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import AuthResult  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
WORKER = ROOT / "worker" / "meter-worker"
METERCTL = ROOT / "worker" / "meterctl"
SECRET = "whsec_test_alerts_0123456789"

pytestmark = pytest.mark.skipif(not WORKER.exists() or not METERCTL.exists(),
                                reason="worker/ not built (make -C worker)")


# ------------------------------------------------------------------ sinks

class SmtpSink:
    """aiosmtpd on a free port; keeps every message (parsed) and the
    envelope; optional AUTH LOGIN/PLAIN (without TLS: a test relay)."""

    def __init__(self, port=None, auth=None, delay=0.0, tls=None):
        self.messages = []
        self.logins = []
        self.delay = delay
        self.port = port or free_port()
        self.auth = auth
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                if sink.delay:
                    time.sleep(sink.delay)
                msg = email.message_from_bytes(envelope.original_content,
                                               policy=email.policy.default)
                sink.messages.append({"from": envelope.mail_from,
                                      "to": list(envelope.rcpt_tos),
                                      "raw": envelope.original_content,
                                      "msg": msg})
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, data):
            ok = (self.auth is not None and data.login.decode() == auth[0]
                  and data.password.decode() == auth[1])
            self.logins.append((data.login.decode(), ok))
            return AuthResult(success=ok)

        kw = {}
        if auth is not None:
            kw = {"authenticator": authenticator, "auth_required": True,
                  "auth_require_tls": tls is not None}
        if tls is not None:
            kw.update(tls_context=tls, require_starttls=True)
        self.ctl = Controller(Handler(), hostname="127.0.0.1",
                              port=self.port, **kw)

    def start(self):
        self.ctl.start()
        return self

    def stop(self):
        self.ctl.stop()

    def bodies(self, m):
        """(text, html) of a parsed message."""
        text = m["msg"].get_body(("plain",))
        html = m["msg"].get_body(("html",))
        return (text.get_content() if text is not None else None,
                html.get_content() if html is not None else None)


class HttpSink:
    """POST sink: fails the first `fail` requests with 500, can hold a
    request (`hold` event) before answering."""

    def __init__(self, fail=0, fail_status=500):
        self.requests = []      # every request received
        self.accepted = []      # the ones answered 2xx
        self.fail = fail
        self.fail_status = fail_status
        self.hold = None
        self.port = free_port()
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n)
                req = {"path": self.path, "headers": dict(self.headers),
                       "body": body}
                sink.requests.append(req)
                if sink.hold is not None:
                    sink.hold.wait(30)
                if sink.fail > 0:
                    sink.fail -= 1
                    self.send_response(sink.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sink.accepted.append(req)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def at(self, path, accepted=True):
        return [r for r in (self.accepted if accepted else self.requests)
                if r["path"] == path]

    def stop(self):
        if self.hold is not None:
            self.hold.set()
        self.srv.shutdown()
        self.srv.server_close()


class HoldProxy:
    """A TCP port in front of the SMTP sink.  Holding, it accepts and says
    nothing (no 220 greeting: the client has claimed and waits, nothing is
    delivered); passing, it relays to the sink."""

    def __init__(self, target):
        self.target = target
        self.holding = True
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.connections = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.holding:
                continue            # kept open, silent
            u = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(c, u),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c),
                             daemon=True).start()


# ----------------------------------------------------------------- worker

class Worker:
    """meter-worker (provider file) with alert settings; meterctl."""

    def __init__(self, tmp, redis, settings):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.redis = redis
        self.proc = None
        self.log_path = self.tmp / "worker.log"
        (self.tmp / "whsec").write_text(SECRET + "\n")
        base = {"redis": redis.address, "provider": "file",
                "file.path": str(self.tmp / "usage.jsonl"),
                "log_level": "debug", "alert.interval": "1s",
                "alert.retry_base": "1s", "alert.retry_max": "2s",
                "alert.timeout": "3s", "alert.claim_ttl": "4s",
                "alert.webhook_secret_file": str(self.tmp / "whsec")}
        base.update(settings)
        self.conf = self.tmp / "worker.conf"
        self.conf.write_text("".join("%s = %s\n" % kv for kv in base.items()))

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(WORKER), "-c", str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            rc = self.proc.wait(20)
            if sig == signal.SIGTERM:
                assert rc == 0, self.log()
        self.proc = None

    def log(self):
        return self.log_path.read_text(errors="replace") \
            if self.log_path.exists() else ""

    def ctl(self, *args, expect=0):
        r = subprocess.run([str(METERCTL), "-c", str(self.conf)] + list(args),
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        if expect is not None:
            assert r.returncode == expect, r.stdout + r.stderr
        return r

    def alerts(self):
        return json.loads(self.ctl("alerts", "--json").stdout)

    def test_config(self):
        return subprocess.run([str(WORKER), "-c", str(self.conf), "-t"],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)


@pytest.fixture
def worker(tmp_path, redis):
    made = []

    def make(**settings):
        w = Worker(tmp_path / ("worker%d" % len(made)), redis,
                   {k.replace("__", "."): v for k, v in settings.items()})
        made.append(w)
        return w

    yield make
    for w in made:
        try:
            w.stop(signal.SIGKILL if w.proc is not None else signal.SIGTERM)
        finally:
            print("---- %s\n%s" % (w.log_path, w.log()[-8000:]))


@pytest.fixture
def smtp():
    sinks = []

    def make(**kw):
        s = SmtpSink(**kw).start()
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        s.stop()


@pytest.fixture
def http_sink():
    sinks = []

    def make(**kw):
        s = HttpSink(**kw)
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        s.stop()


def customer(redis, cid, key, email_addr=None, name=None):
    args = ["customers", "add", cid]
    if email_addr:
        args += ["--email", email_addr]
    if name:
        args += ["--name", name]
    meterctl(redis, *args)
    r = subprocess.run([str(METERCTL), "--redis", redis.address, "keys",
                        "add", "-", "--customer", cid], input=key,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return key_hash(key)


def put_usage(redis, key, meter, hour, value, writer="00000000000000aa.1"):
    """Usage as the module writes it (docs/redis-schema.md): index first,
    then the absolute counter and the lifetime total it raised."""
    kh = key_hash(key)
    ukey = "mtr:u:{%s}:%s" % (kh, hour)
    field = "%s|%s" % (meter, writer)
    old = int(redis.hgetall(ukey).get(field, 0))
    redis.cmd("SADD", "mtr:idx:%s" % hour, kh)
    t = time.strptime(hour, "%Y%m%d%H")
    redis.cmd("ZADD", "mtr:hours", "NX", str(int(time.mktime(t)
                                                 - time.timezone)), hour)
    redis.cmd("HINCRBY", "mtr:used:{%s}" % kh, meter, str(value - old))
    redis.cmd("HSET", ukey, field, str(value))


def verify_signature(req, secret=SECRET):
    """The receiver's check, as docs describe it (Stripe-Signature style):
    HMAC-SHA256 of "<t>.<raw body>", constant-time compare, bounded age."""
    parts = dict(p.split("=", 1)
                 for p in req["headers"]["Meter-Signature"].split(","))
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + req["body"],
                   hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, parts["v1"])
    assert abs(time.time() - int(parts["t"])) < 300


def hour_label(t=None):
    return time.strftime("%Y-%m-%dT%H", time.gmtime(t or time.time()))


def month_label(t=None):
    return time.strftime("%Y-%m", time.gmtime(t or time.time()))


def settle(seconds=3.0):
    time.sleep(seconds)


# ------------------------------------------------------------------ tests

NGINX_CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh 200ms;

    server {
        listen 127.0.0.1:@PORT2@;
        location / { return 200 "ok\n"; }
    }

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls status=200;
        meter zone=api refused status=402;
        meter_governance zone=api;

        location / { proxy_pass http://127.0.0.1:@PORT2@; }
    }
"""


def test_alerts_from_real_traffic_reach_smtp_webhook_and_slack(
        redis, nginx_factory, worker, smtp, http_sink):
    """Usage, refused calls and delinquency counted by nginx fire one alert
    each per period, with the numbers nginx counted; nothing fires twice
    while the rule stays true."""
    n = nginx_factory(NGINX_CONF, redis=redis.address)
    mail = smtp()
    hooks = http_sink()
    kq = customer(redis, "acme", "mk_test_acme", "dev@acme.example", "Ada")
    kd = customer(redis, "late", "mk_test_late", "ap@late.example", "Lee")
    meterctl(redis, "delinquent", "set", "late", "--reason",
             "invoice_overdue")

    c = Client(n.port)
    for _ in range(7):
        assert c.request("GET", "/", {"X-Api-Key": "mk_test_acme"}) == 200
    # until nginx's copy of the governance shows the delinquency
    late = []
    wait_for(lambda: late.append(c.request(
        "GET", "/", {"X-Api-Key": "mk_test_late"})) or late[-1] == 402, 10)
    for _ in range(4):
        assert c.request("GET", "/", {"X-Api-Key": "mk_test_late"}) == 402
    hour = utc_hour()
    ok = late.count(200)
    assert late.count(402) == 1 and ok == len(late) - 1
    expect_totals(redis, {(kq, "calls"): 7, (kd, "refused"): 5,
                          (kd, "calls"): ok})

    w = worker(**{
        "smtp.url": "smtp://127.0.0.1:%d" % mail.port,
        "smtp.from": "Meter Alerts <alerts@meter.example>",
        "smtp.starttls": "off",
        "alert.quota.when": "usage_above 5 calls per hour",
        "alert.quota.notify": "email:customer, webhook:%s"
                              % hooks.url("/hook"),
        "alert.knocking.when": "refused_above 3 per hour",
        "alert.knocking.notify": "email:ops@example.com, slack:%s"
                                 % hooks.url("/slack"),
        "alert.overdue.when": "delinquent",
        "alert.overdue.notify": "email:customer"}).start()

    wait_for(lambda: len(mail.messages) == 3 and len(hooks.accepted) == 2,
             30, msg=w.log)
    if hour != utc_hour():
        pytest.skip("the test ran across an hour boundary")

    by_to = {m["to"][0]: m for m in mail.messages}
    assert sorted(by_to) == ["ap@late.example", "dev@acme.example",
                             "ops@example.com"]

    quota = by_to["dev@acme.example"]
    assert quota["from"] == "alerts@meter.example"
    msg = quota["msg"]
    assert msg["From"] == "Meter Alerts <alerts@meter.example>"
    assert msg["To"] == "dev@acme.example"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() \
        == pytest.approx(time.time(), abs=60)
    assert msg["Subject"] == "calls usage 7 in %s (above 5)" % hour_label()
    text, html = mail.bodies(quota)
    assert "Hello Ada," in text
    assert "account acme used 7 calls in %s" % hour_label() in text
    assert "<b>7</b> calls" in html

    # the Message-ID is derived from (rule, customer, period)
    ev = [a for a in w.alerts()["alerts"] if a["rule"] == "quota"][0]
    assert msg["Message-ID"] == "<alert.%s.c0@meter.example>" % ev["id"]
    seed = "alert|quota|acme|%s" % hour_label()
    assert ev["id"] == hashlib.sha256(seed.encode()).hexdigest()[:32]

    knock = by_to["ops@example.com"]["msg"]
    assert knock["Subject"] == "late: 5 refused calls in %s" % hour_label()
    text, _ = mail.bodies(by_to["ops@example.com"])
    assert "Status reason: invoice_overdue" in text

    overdue = by_to["ap@late.example"]["msg"]
    assert overdue["Subject"] == "Payment needed for account late"

    hook = hooks.at("/hook")[0]
    verify_signature(hook)
    body = json.loads(hook["body"])
    assert hook["headers"]["Meter-Alert-Id"] == body["id"] == ev["id"]
    assert body["type"] == "alert.fired"
    assert (body["rule"], body["customer"], body["meter"], body["value"],
            body["threshold"], body["period"]) \
        == ("quota", "acme", "calls", 7, 5, hour_label())
    assert body["period_start"] == time.strftime(
        "%Y-%m-%dT%H:00:00Z", time.gmtime())

    slack = json.loads(hooks.at("/slack")[0]["body"])
    assert list(slack) == ["text"]
    assert slack["text"].startswith("late: 5 refused calls in ")
    assert "Meter-Signature" not in hooks.at("/slack")[0]["headers"]

    # the rules stay true and usage grows: still once per period
    for _ in range(3):
        assert c.request("GET", "/", {"X-Api-Key": "mk_test_acme"}) == 200
    expect_totals(redis, {(kq, "calls"): 10, (kd, "refused"): 5,
                          (kd, "calls"): ok})
    settle(3)
    assert len(mail.messages) == 3 and len(hooks.requests) == 2

    st = w.alerts()
    assert (st["sent"], st["pending"], st["failing"], st["failed"]) \
        == (5, 0, 0, 0)
    table = w.ctl("alerts").stdout
    assert "3 alerts; deliveries: 5 sent, 0 pending" in table

    # a hook's path is its credential: in the config only
    assert "slack:http://127.0.0.1:%d/..." % hooks.port in table
    dump = "".join(str(redis.hgetall(k)) for k in redis.keys("mtr:{alert}:*")
                   if k.startswith("mtr:{alert}:e:"))
    for where in (table, w.log(), dump):
        assert "/slack" not in where and "/hook" not in where


def test_restart_midway_delivers_each_message_once(redis, worker, smtp):
    """20 customers over quota, a slow SMTP server, SIGTERM part-way, a
    restart: every customer gets exactly one mail, with its own number."""
    mail = smtp(delay=0.15)
    hour = utc_hour()
    for i in range(20):
        customer(redis, "c%02d" % i, "mk_test_%02d" % i,
                 "u%02d@example.com" % i)
        put_usage(redis, "mk_test_%02d" % i, "calls", hour, 100 + i)

    settings = {"smtp.url": "smtp://127.0.0.1:%d" % mail.port,
                "smtp.from": "alerts@meter.example", "smtp.starttls": "off",
                "alert.quota.when": "usage_above 50 calls per day",
                "alert.quota.notify": "email:customer"}
    w = worker(**settings).start()
    wait_for(lambda: len(mail.messages) >= 5, 30, msg=w.log)
    w.stop()
    got = len(mail.messages)
    assert got < 20

    w.start()
    wait_for(lambda: len(mail.messages) >= 20, 60, msg=w.log)
    settle(3)
    if hour[:8] != utc_hour()[:8]:
        pytest.skip("the test ran across a day boundary")

    assert len(mail.messages) == 20
    seen = {}
    for m in mail.messages:
        to = m["to"][0]
        assert to not in seen
        i = int(to[1:3])
        seen[to] = m
        assert m["msg"]["Subject"].startswith("calls usage %d in " % (100 + i))
    assert len({m["msg"]["Message-ID"] for m in mail.messages}) == 20
    st = w.alerts()
    assert (st["sent"], st["pending"]) == (20, 0)
    assert all(ch["attempts"] == 1 for a in st["alerts"]
               for ch in a["channels"])


def test_failing_channels_retry_with_backoff_and_recover(
        redis, worker, smtp, http_sink):
    """The webhook answers 500 three times, the SMTP server is down at
    first: meterctl alerts shows them failing with the error; once they
    recover each message is accepted exactly once."""
    hooks = http_sink(fail=3)
    port = free_port()
    customer(redis, "pre", "mk_test_pre", "p@pre.example")
    meterctl(redis, "credit", "set", "pre", "--meter", "calls", 1000)
    put_usage(redis, "mk_test_pre", "calls", utc_hour(), 850)

    w = worker(**{"smtp.url": "smtp://127.0.0.1:%d" % port,
                  "smtp.from": "alerts@meter.example",
                  "smtp.starttls": "off",
                  "alert.low.when": "credit_below 20%",
                  "alert.low.notify": "webhook:%s, email:customer"
                                      % hooks.url("/h")}).start()

    def failing():
        a = w.alerts()["alerts"]
        return a and all(ch["state"] == "failing" for ch in a[0]["channels"])

    wait_for(failing, 20, msg=w.log)
    ev = w.alerts()["alerts"][0]
    assert (ev["rule"], ev["customer"], ev["period"], ev["value"]) \
        == ("low", "pre", "calls@1000", "150")
    web, mailch = ev["channels"]
    assert web["error"] == "HTTP 500"
    assert mailch["error"].startswith("SMTP: ")
    assert "next_attempt" in web

    wait_for(lambda: len(hooks.accepted) == 1, 30, msg=w.log)
    assert len(hooks.requests) == 4
    verify_signature(hooks.accepted[0])
    body = json.loads(hooks.accepted[0]["body"])
    assert (body["remaining"], body["granted"], body["threshold"]) \
        == (150, 1000, "20%")
    # one id across the retries: the receiver can dedupe
    assert {r["headers"]["Meter-Alert-Id"] for r in hooks.requests} \
        == {ev["id"]}

    mail = smtp(port=port)
    wait_for(lambda: len(mail.messages) == 1, 30, msg=w.log)
    settle(3)
    assert len(mail.messages) == 1 and len(hooks.accepted) == 1
    assert mail.messages[0]["msg"]["Subject"] \
        == "Your calls credit is running low: 150 left"
    chans = w.alerts()["alerts"][0]["channels"]
    assert [c["state"] for c in chans] == ["sent", "sent"]
    assert chans[0]["attempts"] == 4 and chans[1]["attempts"] >= 2

    # a top-up and a new drop below 20% is a new state: one more alert
    meterctl(redis, "credit", "add", "pre", "--meter", "calls", 1000)
    settle(3)
    assert len(hooks.accepted) == 1
    put_usage(redis, "mk_test_pre", "calls", utc_hour(), 1700)
    wait_for(lambda: len(hooks.accepted) == 2, 30, msg=w.log)
    assert json.loads(hooks.accepted[1]["body"])["remaining"] == 300


def test_permanent_failures_give_up_at_once(redis, worker, smtp, http_sink):
    """A 410 from a Slack-style hook and a customer without an email
    address cannot be fixed by retrying: failed after one attempt, shown as
    such, and the other channel still delivered once."""
    mail = smtp()
    gone = http_sink(fail=100, fail_status=410)
    ok = http_sink()
    customer(redis, "noemail", "mk_test_ne")
    put_usage(redis, "mk_test_ne", "calls", utc_hour(), 30)
    w = worker(**{"smtp.url": "smtp://127.0.0.1:%d" % mail.port,
                  "smtp.from": "alerts@meter.example",
                  "smtp.starttls": "off",
                  "alert.q.when": "usage_above 20 calls per hour",
                  "alert.q.notify": "email:customer, slack:%s, webhook:%s"
                                    % (gone.url("/s"), ok.url("/w"))}).start()
    wait_for(lambda: w.alerts()["failed"] == 2 and w.alerts()["sent"] == 1,
             20, msg=w.log)
    chans = w.alerts()["alerts"][0]["channels"]
    assert [(c["state"], c["attempts"]) for c in chans] \
        == [("failed", 1), ("failed", 1), ("sent", 1)]
    assert chans[0]["error"].startswith("no valid email address")
    assert chans[1]["error"] == "HTTP 410"
    settle(3)
    assert len(gone.requests) == 1 and len(ok.accepted) == 1
    assert mail.messages == []
    assert "1 alerts; deliveries: 1 sent, 0 pending, 0 failing (retrying), " \
        "2 failed" in w.ctl("alerts").stdout


def test_sigkill_between_claim_and_send_sends_once(redis, worker, smtp):
    """The worker claimed the email and waits for the server's greeting
    when it is killed: nothing was delivered.  After the claim's lease the
    restarted worker sends it, once, with the same Message-ID."""
    mail = smtp()
    proxy = HoldProxy(mail.port)
    customer(redis, "k", "mk_test_k", "k@k.example")
    put_usage(redis, "mk_test_k", "calls", utc_hour(), 70)
    w = worker(**{"smtp.url": "smtp://127.0.0.1:%d" % proxy.port,
                  "smtp.from": "alerts@meter.example",
                  "smtp.starttls": "off", "alert.timeout": "20s",
                  "alert.claim_ttl": "25s",
                  "alert.q.when": "usage_above 60 calls per hour",
                  "alert.q.notify": "email:customer"}).start()

    def claimed():
        a = w.alerts()["alerts"]
        return a and a[0]["channels"][0]["state"] == "sending"

    wait_for(claimed, 20, msg=w.log)
    wait_for(lambda: proxy.connections == 1, 10)
    w.stop(signal.SIGKILL)
    assert mail.messages == []

    proxy.holding = False
    w2 = worker(**{"smtp.url": "smtp://127.0.0.1:%d" % proxy.port,
                   "smtp.from": "alerts@meter.example",
                   "smtp.starttls": "off",
                   "alert.q.when": "usage_above 60 calls per hour",
                   "alert.q.notify": "email:customer"})
    # the lease (25s) is the old worker's: wait for it, not longer
    w2.start()
    settle(2)
    assert mail.messages == []
    wait_for(lambda: len(mail.messages) == 1, 40, msg=w2.log)
    settle(3)
    assert len(mail.messages) == 1
    ev = w2.alerts()["alerts"][0]
    assert mail.messages[0]["msg"]["Message-ID"] \
        == "<alert.%s.c0@meter.example>" % ev["id"]
    assert ev["channels"][0]["state"] == "sent"
    assert ev["channels"][0]["attempts"] == 2


def test_sigkill_after_send_resends_with_the_same_alert_id(
        redis, worker, http_sink):
    """Killed after the webhook received the request but before the worker
    marked it: the resend carries the same Meter-Alert-Id (documented: the
    receiver dedupes by it)."""
    hooks = http_sink()
    hooks.hold = threading.Event()
    customer(redis, "h", "mk_test_h", "h@h.example")
    put_usage(redis, "mk_test_h", "calls", utc_hour(), 9)
    conf = {"alert.q.when": "usage_above 5 calls per hour",
            "alert.q.notify": "webhook:%s" % hooks.url("/h")}
    w = worker(**conf).start()
    wait_for(lambda: len(hooks.requests) == 1, 20, msg=w.log)
    w.stop(signal.SIGKILL)
    hooks.hold.set()
    hooks.hold = None
    w.start()
    wait_for(lambda: len(hooks.accepted) == 2, 30, msg=w.log)
    ids = [r["headers"]["Meter-Alert-Id"] for r in hooks.accepted]
    assert ids[0] == ids[1]
    settle(2)
    assert len(hooks.accepted) == 2
    assert w.alerts()["alerts"][0]["channels"][0]["state"] == "sent"


def test_month_usage_counts_this_month_only(redis, worker, http_sink):
    """usage_above ... per month: usage of the previous month (still in
    Redis) counts for that month, not this one; each month fires once."""
    hooks = http_sink()
    customer(redis, "m", "mk_test_m", "m@m.example")
    now = time.time()
    first = time.strptime(month_label(now) + "-01", "%Y-%m-%d")
    month_start = int(time.mktime(first) - time.timezone)
    prev_hour = time.strftime("%Y%m%d%H", time.gmtime(month_start - 3600))
    put_usage(redis, "mk_test_m", "calls", prev_hour, 40)
    put_usage(redis, "mk_test_m", "calls", utc_hour(), 25)
    put_usage(redis, "mk_test_m", "calls", utc_hour(), 30,
              writer="00000000000000bb.7")
    w = worker(**{"alert.big.when": "usage_above 20 calls per month",
                  "alert.big.notify": "webhook:%s" % hooks.url("/m")}).start()
    wait_for(lambda: len(hooks.accepted) == 2, 20, msg=w.log)
    got = sorted((json.loads(r["body"])["period"],
                  json.loads(r["body"])["value"]) for r in hooks.accepted)
    prev_label = time.strftime("%Y-%m", time.gmtime(month_start - 3600))
    assert got == sorted([(prev_label, 40), (month_label(now), 55)])
    # more usage: no second alert; the base stays
    put_usage(redis, "mk_test_m", "calls", utc_hour(), 90)
    settle(3)
    assert len(hooks.accepted) == 2


def self_signed(tmp):
    """A certificate for 127.0.0.1 and its key (openssl CLI)."""
    cert, key = tmp / "smtp.crt", tmp / "smtp.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx, cert


def test_starttls_then_auth_with_the_credential_file(redis, worker, smtp,
                                                     tmp_path):
    """A relay that insists on STARTTLS before AUTH: the worker upgrades,
    checks the relay's certificate against smtp.ca_file, logs in with the
    credential file, and the mail arrives once."""
    ctx, cert = self_signed(tmp_path)
    mail = smtp(auth=("relay-user", "s3cret-relay-pw"), tls=ctx)
    cred = tmp_path / "smtp-cred"
    cred.write_text("relay-user\ns3cret-relay-pw\n")
    customer(redis, "t", "mk_test_t", "t@t.example")
    put_usage(redis, "mk_test_t", "calls", utc_hour(), 12)
    w = worker(**{"smtp.url": "smtp://127.0.0.1:%d" % mail.port,
                  "smtp.from": "alerts@meter.example",
                  "smtp.starttls": "required",
                  "smtp.ca_file": str(cert),
                  "smtp.credentials_file": str(cred),
                  "alert.q.when": "usage_above 10 calls per hour",
                  "alert.q.notify": "email:customer"}).start()
    wait_for(lambda: len(mail.messages) == 1, 30, msg=w.log)
    assert mail.logins == [("relay-user", True)]
    assert mail.messages[0]["to"] == ["t@t.example"]
    assert "s3cret-relay-pw" not in w.log()
    w.stop()

    # without the CA the certificate is refused: nothing is sent in clear
    other = worker(**{"smtp.url": "smtp://127.0.0.1:%d" % mail.port,
                      "smtp.from": "alerts@meter.example",
                      "smtp.credentials_file": str(cred),
                      "alert.r.when": "usage_above 11 calls per hour",
                      "alert.r.notify": "email:customer"}).start()
    wait_for(lambda: other.alerts()["failing"] == 1, 20, msg=other.log)
    assert len(mail.messages) == 1 and len(mail.logins) == 1


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_auth_from_credential_file_and_starttls_required(
        redis, worker, smtp, tmp_path):
    """AUTH with the credential file's user and password (never in the
    log); smtp.starttls = required refuses a server without STARTTLS."""
    mail = smtp(auth=("relay-user", "s3cret-relay-pw"))
    cred = tmp_path / "smtp-cred"
    cred.write_text("relay-user\ns3cret-relay-pw\n")
    customer(redis, "a", "mk_test_a", "a@a.example")
    put_usage(redis, "mk_test_a", "calls", utc_hour(), 3)
    rules = {"alert.q.when": "usage_above 2 calls per hour",
             "alert.q.notify": "email:customer",
             "smtp.from": "alerts@meter.example",
             "smtp.credentials_file": str(cred)}

    tls = worker(**dict(rules, **{"smtp.url": "smtp://127.0.0.1:%d"
                                  % mail.port})).start()
    wait_for(lambda: tls.alerts()["failing"] == 1, 20, msg=tls.log)
    err = tls.alerts()["alerts"][0]["channels"][0]["error"]
    assert err.startswith("SMTP") and ("SSL" in err or "TLS" in err), err
    tls.stop()
    assert mail.messages == []

    plain = worker(**dict(rules, **{"smtp.url": "smtp://127.0.0.1:%d"
                                    % mail.port,
                                    "smtp.starttls": "off"})).start()
    wait_for(lambda: len(mail.messages) == 1, 30, msg=plain.log)
    assert mail.logins[-1] == ("relay-user", True)
    for w in (tls, plain):
        assert "s3cret-relay-pw" not in w.log()


def test_config_errors_name_the_line(redis, worker, tmp_path):
    (tmp_path / "t.txt").write_text("Subject: {{customer}} is at {{valu}}\n"
                                    "\nhi\n")
    cases = [
        ({"alert.x.when": "usage_above 10 calls"},
         "expected \"usage_above N METER per hour|day|month\""),
        ({"alert.x.when": "credit_below 120%", "alert.x.notify": "email:a@b.c"},
         "credit_below"),
        ({"alert.x.when": "delinquent", "alert.x.notify": "sms:123"},
         "expected email:, webhook: or slack:"),
        ({"alert.x.when": "delinquent", "alert.x.notify": "email:customer"},
         "smtp.url"),
        ({"alert.x.when": "delinquent",
          "alert.x.notify": "webhook:https://h.example/x",
          "alert.x.template": str(tmp_path / "t")},
         "unknown placeholder {{valu}}"),
        ({"alert.x.colour": "red", "alert.x.when": "delinquent"},
         "unknown key \"alert.x.colour\""),
    ]
    for settings, want in cases:
        w = worker(**settings)
        r = w.test_config()
        assert r.returncode == 78, (settings, r.stdout, r.stderr)
        assert want in r.stderr, (settings, r.stderr)

    ok = worker(**{"alert.x.when": "refused_above 50 per hour",
                   "alert.x.notify": "slack:https://hooks.example/T/B/X"})
    r = ok.test_config()
    assert r.returncode == 0, r.stderr
    assert "1 alert rules" in r.stdout


def test_reload_takes_new_rules_and_keeps_old_ones_on_error(
        redis, worker, http_sink):
    """SIGHUP: a new rule fires; a rule that does not parse is refused and
    the rules in use stay."""
    hooks = http_sink()
    customer(redis, "r", "mk_test_r", "r@r.example")
    put_usage(redis, "mk_test_r", "calls", utc_hour(), 40)
    w = worker(**{"alert.a.when": "usage_above 30 calls per hour",
                  "alert.a.notify": "webhook:%s" % hooks.url("/a")}).start()
    wait_for(lambda: len(hooks.at("/a")) == 1, 20, msg=w.log)

    text = w.conf.read_text()
    w.conf.write_text(text + "alert.b.when = usage_above 35 calls per hour\n"
                      "alert.b.notify = webhook:%s\n" % hooks.url("/b"))
    w.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(hooks.at("/b")) == 1, 20, msg=w.log)

    w.conf.write_text(w.conf.read_text()
                      + "alert.c.when = usage_above lots\n")
    w.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "alerts: keeping the old rules" in w.log(), 10)
    assert "usage_above N METER per hour|day|month" in w.log()
    # the old rules still run: a new customer over both thresholds
    customer(redis, "r2", "mk_test_r2", "r2@r.example")
    put_usage(redis, "mk_test_r2", "calls", utc_hour(), 50)
    wait_for(lambda: len(hooks.accepted) == 4, 20, msg=w.log)
    assert sorted((r["path"], json.loads(r["body"])["customer"])
                  for r in hooks.accepted) \
        == [("/a", "r"), ("/a", "r2"), ("/b", "r"), ("/b", "r2")]
    assert w.proc.poll() is None


def test_month_stays_exact_after_retention_removed_its_hours(
        redis, worker, http_sink):
    """A closed hour is summed once into the month (mtr:{alert}:m:), however
    often the worker restarts; once retention deleted the hour, the month's
    usage still counts it."""
    hooks = http_sink()
    now = time.time()
    month_start = int(time.mktime(time.strptime(month_label(now) + "-01",
                                                "%Y-%m-%d")) - time.timezone)
    closed = int(now // 3600 * 3600) - 2 * 3600
    if closed < month_start:
        pytest.skip("no closed hour in this month yet")
    old_hour = time.strftime("%Y%m%d%H", time.gmtime(closed))
    kh = customer(redis, "y", "mk_test_y", "y@y.example")
    put_usage(redis, "mk_test_y", "calls", old_hour, 60)
    conf = {"alert.m.when": "usage_above 100 calls per month",
            "alert.m.notify": "webhook:%s" % hooks.url("/m")}

    w = worker(**conf)
    for _ in range(3):
        w.start()
        wait_for(lambda: redis.hgetall("mtr:{alert}:h:%d" % closed), 10,
                 msg=w.log)
        settle(1.5)
        w.stop()
    month = redis.hgetall("mtr:{alert}:m:%d" % month_start)
    assert month == {"%s|calls" % kh: "60"}
    assert hooks.accepted == []

    # retention: the hour's keys are gone, its sum stays
    for k in ("mtr:u:{%s}:%s" % (kh, old_hour), "mtr:idx:%s" % old_hour):
        redis.cmd("DEL", k)
    redis.cmd("ZREM", "mtr:hours", old_hour)
    put_usage(redis, "mk_test_y", "calls", utc_hour(), 41)
    w.start()
    wait_for(lambda: len(hooks.accepted) == 1, 20, msg=w.log)
    body = json.loads(hooks.accepted[0]["body"])
    assert (body["period"], body["value"]) == (month_label(now), 101)
