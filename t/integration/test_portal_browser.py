"""The portal pages in a real browser (issue 14): Debian's chromium, driven
headless through chromedriver's W3C WebDriver HTTP protocol from the stdlib
(urllib), against nginx (conf/nginx-portal.conf) + Redis + meter-worker
started here.  Sign up on the page, take the key it shows once, call the
API through nginx with it, and find those calls on the usage page: table,
chart and credit, with the numbers of meterctl usage.  Screenshots go to
build/artifacts/.
"""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, key_hash, wait_for
from test_portal import (KEY_RE, PortalWorker, call_api, month_start,
                         portal_conf)

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# the real binary: /usr/bin/chromium is a wrapper script
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
                 if os.path.exists(p)), None)
ARTIFACTS = ROOT / "build" / "artifacts"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not os.path.exists(CHROMEDRIVER),
    reason="chromium and chromium-driver (make deps)")


class WebDriverError(Exception):
    pass


class Browser:
    """One chromedriver and one headless session, W3C WebDriver over HTTP
    (https://www.w3.org/TR/webdriver2/)."""

    def __init__(self, tmp, javascript=True):
        self.port = free_port()
        self.log = open(Path(tmp) / ("chromedriver-%d.log" % self.port), "ab")
        self.proc = subprocess.Popen([CHROMEDRIVER, "--port=%d" % self.port],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.url = "http://127.0.0.1:%d" % self.port
        wait_for(self._ready, 20, msg="chromedriver did not start")
        args = ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=412,915",        # a phone's viewport
                "--user-data-dir=%s" % (Path(tmp) / ("profile%d"
                                                     % self.port))]
        opts = {"binary": CHROMIUM, "args": args}
        if not javascript:
            opts["prefs"] = {
                "profile.managed_default_content_settings.javascript": 2}
        r = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": opts}}})
        self.sid = r["sessionId"]

    def _ready(self):
        try:
            with urllib.request.urlopen(self.url + "/status", timeout=1) as r:
                return json.load(r)["value"]["ready"]
        except (OSError, ValueError, KeyError):
            return False

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data,
                                     method=method,
                                     headers={"Content-Type":
                                              "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise WebDriverError("%s %s: %s" % (method, path,
                                                e.read().decode()[:500]))

    def s(self, method, path, body=None):
        return self._call(method, "/session/%s%s" % (self.sid, path), body)

    def go(self, url):
        self.s("POST", "/url", {"url": url})

    def find(self, css):
        return self.s("POST", "/element", {"using": "css selector",
                                           "value": css})[ELEMENT]

    def type(self, css, text):
        self.s("POST", "/element/%s/value" % self.find(css), {"text": text})

    def click(self, css):
        self.s("POST", "/element/%s/click" % self.find(css), {})

    def text(self, css):
        return self.s("GET", "/element/%s/text" % self.find(css))

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script,
                                                "args": list(args)})

    def visible(self, css):
        return self.js("var e = document.querySelector(arguments[0]);"
                       "return !!e && e.offsetParent !== null;", css)

    def screenshot(self, name):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        p = ARTIFACTS / name
        p.write_bytes(base64.b64decode(self.s("GET", "/screenshot")))
        return p

    def close(self):
        try:
            self.s("DELETE", "")
        except (WebDriverError, OSError):
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def stack(tmp_path, redis, nginx_factory, backend):
    w = PortalWorker(tmp_path / "w", redis).start()
    n = nginx_factory(portal_conf(w.port, backend.port), redis=redis.address)
    yield w, n
    w.stop()


def test_sign_up_call_and_see_usage_in_chromium(stack, redis, tmp_path):
    w, n = stack
    base = "http://127.0.0.1:%d/portal/" % n.port
    b = Browser(tmp_path)
    try:
        # ---- sign up
        b.go(base)
        assert b.js("return document.title") == "Sign up for an API key"
        # every input has a label the browser associates with it
        assert b.js("return Array.from(document.querySelectorAll('input'))"
                    ".every(function (i) { return i.labels.length > 0; })")
        b.type("#email", "Grace@Example.com")
        b.type("#first_name", "Grace")
        b.type("#last_name", "Hopper")
        b.click("#submit")
        wait_for(lambda: b.visible("#result"), 15,
                 msg=lambda: b.text("#error") if b.visible("#error") else "")
        key = b.js("return document.getElementById('api-key').value")
        assert KEY_RE.match(key), key
        cid = b.text("#customer")
        assert redis.hgetall("mtr:key:{%s}" % key_hash(key))["customer"] \
            == cid
        # the phone viewport needs no sideways scrolling
        assert b.js("return document.documentElement.scrollWidth "
                    "<= window.innerWidth")
        b.screenshot("portal-signup.png")

        # a second sign-up of the address: the page says why, no key
        b.go(base)
        b.type("#email", "grace@example.com")
        b.click("#submit")
        wait_for(lambda: b.visible("#error"), 15)
        assert "already registered" in b.text("#error")
        assert not b.visible("#result")
        assert key not in b.js("return document.body.innerHTML")

        # ---- calls through nginx to the upstream, with that key
        wait_for(lambda: call_api(n, key) == 200, 30)
        for _ in range(6):
            assert call_api(n, key, "/api/thing") == 200
        start = time.strftime("%Y-%m-%d", time.gmtime(month_start(
            time.time())))

        def cli_rows():
            return json.loads(w.ctl("usage", cid, "--period", "day",
                                    "--json", "--from", start).stdout)

        # flushed (writer layout) and read back by meterctl
        wait_for(lambda: sum(c["quantity"] for c in cli_rows()) == 7, 30,
                 msg=cli_rows)
        w.ctl("credit", "set", cid, "--meter", "calls", "100")
        used0 = int(redis.hgetall("mtr:used:{%s}" % key_hash(key))
                    .get("calls", 0))

        # ---- the usage page
        b.go(base + "usage.html")
        b.type("#key", key)
        b.click("#show")
        wait_for(lambda: b.visible("#report"), 15,
                 msg=lambda: b.text("#error") if b.visible("#error") else "")
        rows = b.js("return Array.from(document.querySelectorAll("
                    "'#meters tbody tr')).map(function (r) { return "
                    "Array.from(r.cells).map(function (c) { return "
                    "c.textContent; }); })")
        assert rows == [["calls", "7", "0", "7"]], rows
        days = b.js("return Array.from(document.querySelectorAll("
                    "'#days tbody tr')).map(function (r) { return "
                    "Array.from(r.cells).map(function (c) { return "
                    "c.textContent; }); })")
        cli = cli_rows()
        assert days == [[c["period_start"][:10], c["meter"],
                         str(c["quantity"]), str(c["billed"]),
                         str(c["quantity"] - c["billed"])] for c in cli]
        # the chart: one bar per day of the month, today's holds the 7
        bars = b.js("return Array.from(document.querySelectorAll("
                    "'svg[data-meter=\"calls\"] rect')).map(function (r) {"
                    " return Number(r.getAttribute('data-value')); })")
        ndays = (month_start(month_start(time.time()) + 32 * 86400)
                 - month_start(time.time())) // 86400
        assert len(bars) == ndays and sum(bars) == 7
        assert bars[time.gmtime().tm_mday - 1] == 7
        assert b.js("return document.querySelector('svg[data-meter=\"calls\"]')"
                    ".getAttribute('aria-label')").startswith(
                        "Daily usage of calls")
        assert b.text("#credit") == "calls: 100 left of %d (%d used)" \
            % (used0 + 100, used0)
        assert b.text("#status") == "Active."
        # the key stays in the page: not in storage, not in the address
        assert b.js("return localStorage.length + sessionStorage.length") == 0
        assert key not in b.js("return location.href")
        assert b.js("return document.documentElement.scrollWidth "
                    "<= window.innerWidth")
        shot = b.screenshot("portal-usage.png")
        assert shot.stat().st_size > 5000
        b.js("document.getElementById('charts').scrollIntoView()")
        b.screenshot("portal-usage-chart.png")

        # a revoked key: the page shows the refusal
        w.ctl("keys", "revoke", key_hash(key))
        b.click("#show")
        wait_for(lambda: b.visible("#error"), 15)
        assert "unknown or revoked" in b.text("#error")
        assert not b.visible("#report")
    finally:
        b.close()


def test_pages_without_javascript_say_what_to_do(stack, tmp_path):
    w, n = stack
    b = Browser(tmp_path, javascript=False)
    try:
        for page, needle in (("", "POST"), ("usage.html", "X-API-Key")):
            b.go("http://127.0.0.1:%d/portal/%s" % (n.port, page))
            note = b.text("noscript .note, .note")
            assert "needs JavaScript" in note and "curl" in note, note
            assert needle in note
            # the form that could not work is not shown
            assert not b.visible("form")
        b.screenshot("portal-usage-nojs.png")
    finally:
        b.close()
