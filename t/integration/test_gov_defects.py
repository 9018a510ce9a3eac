"""Module defects of issue 9, each against the real nginx and Redis: the
credit header with a 32-character meter name, a delinquency dated in the
future, and meter_redis password_file=.  (log_subrequest: see
test_one_call.py::test_subrequests_not_billed_nor_gated.)"""

import email.utils
import http.client
import re
import subprocess
import time

import pytest

from conftest import (NGINX, expect_totals, key_hash, meterctl, nginx_t,
                      wait_for)

REFRESH = 0.2
NAME32 = "abcdefghijklmnopqrstuvwxyz_0.1-9"      # meter names: 1..32 chars
assert len(NAME32) == 32

CONF = r"""
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
        meter_governance zone=api unknown_key=401 %(grace)s;
        meter_governance_headers on;
        meter zone=api %(meter)s status=200;
        location / { proxy_pass http://127.0.0.1:@PORT2@; }
        location /probe { meter off; proxy_pass http://127.0.0.1:@PORT2@; }
        location /strict {
            meter_governance zone=api unknown_key=401;
            meter off;
            proxy_pass http://127.0.0.1:@PORT2@;
        }
    }
"""


def call(n, key, path="/"):
    c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=10)
    try:
        c.request("GET", path, headers={"X-Api-Key": key})
        r = c.getresponse()
        return r.status, r.msg, r.read()
    finally:
        c.close()


def add(redis, cust, key):
    meterctl(redis, "customers", "add", cust)
    meterctl(redis, "keys", "add", key, "--customer", cust)


def test_credit_header_with_32_character_meter_name(nginx_factory, redis):
    add(redis, "pre", "mk_pre")
    add(redis, "bad", "mk_bad")
    meterctl(redis, "delinquent", "set", "bad")
    meterctl(redis, "credit", "set", "pre", "--meter", NAME32, 5)
    n = nginx_factory(CONF % {"grace": "", "meter": NAME32}, workers=1,
                      redis=redis.address)
    wait_for(lambda: call(n, "mk_bad", "/probe")[0] == 402, 30)
    seen = []
    for _ in range(7):
        status, hdrs, _ = call(n, "mk_pre")
        seen.append((status, hdrs.get_all("X-Credit-Remaining")))
    assert seen == [(200, ["%s=%d" % (NAME32, 5 - i)]) for i in range(5)] \
        + [(402, None)] * 2, seen
    expect_totals(redis, {("mk_pre", NAME32): 5})


def set_since(redis, cust, key, since):
    """The mtr:gov projection of a delinquent key (docs/redis-schema.md):
    CUSTOMER \\t d \\t REASON \\t SINCE \\t REVOKED, then a new version."""
    redis.cmd("HSET", "mtr:gov", key_hash(key), "\t".join(
        [cust, "d", "invoice_overdue", str(since), "0"]))
    redis.cmd("INCR", "mtr:gov:version")


@pytest.mark.parametrize("ahead", [86400, 10 ** 9, None],
                         ids=["tomorrow", "in_30_years", "int64_max"])
def test_future_since_is_now(nginx_factory, redis, ahead):
    """A delinquency dated in the future counts from now: with grace=1h the
    call is served with a Warning that names now + 1h; without grace 402."""
    add(redis, "late", "mk_late")
    add(redis, "bad", "mk_bad")
    meterctl(redis, "delinquent", "set", "bad", "--reason",
             "invoice_overdue")
    meterctl(redis, "delinquent", "set", "late")
    since = 2 ** 63 - 1 if ahead is None else int(time.time()) + ahead
    set_since(redis, "late", "mk_late", since)
    n = nginx_factory(CONF % {"grace": "grace=1h", "meter": "calls"},
                      workers=1, redis=redis.address)
    # mk_bad's since is now: in grace; /strict has none
    wait_for(lambda: call(n, "mk_bad", "/strict")[0] == 402, 30)
    wait_for(lambda: call(n, "mk_late", "/strict")[0] == 402, 30)
    t0 = time.time()
    status, hdrs, body = call(n, "mk_late")
    assert (status, body) == (200, b"ok\n")
    warn = hdrs["Warning"]
    m = re.fullmatch(r'299 - "Payment overdue; service stops at (.+)"', warn)
    assert m, warn
    stops = email.utils.parsedate_to_datetime(m.group(1)).timestamp()
    assert abs(stops - (t0 + 3600)) < 60, (warn, t0)
    status, _, body = call(n, "mk_late", "/strict")
    assert status == 402
    expect_totals(redis, {("mk_late", "calls"): 1})


# ------------------------------------------------------------ password_file

PW_CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@ password_file=@PWFILE@;
    meter_flush_interval 100ms;

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls;
        location / { return 200 "ok\n"; }
        location = /status { meter off; meter_status json; }
    }
"""

SECRET = "pw-Only_in_the_file-7f3a"


def test_password_file(nginx_factory, redis, tmp_path):
    redis.cmd("CONFIG", "SET", "requirepass", SECRET)
    redis.use(password=SECRET)
    pw = tmp_path / "redis-password"
    pw.write_text(SECRET + "\n")           # as `echo pw > file` writes it
    n = nginx_factory(PW_CONF, workers=1, redis=redis.address, pwfile=pw)
    c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=10)
    for _ in range(4):
        c.request("GET", "/", headers={"X-Api-Key": "mk_pw"})
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"ok\n")
    c.close()
    expect_totals(redis, {("mk_pw", "calls"): 4})
    r = subprocess.run([NGINX, "-T"] + n._args(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "password_file=%s" % pw in r.stdout
    assert SECRET not in r.stdout + r.stderr
    assert SECRET not in n.log()


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_password_file_unreadable_is_an_error(tmp_path, what):
    pw = tmp_path / "nope"
    if what == "directory":
        pw.mkdir()
    conf = PW_CONF.replace("@REDIS@", "127.0.0.1:6379")
    rc, out, text, path = nginx_t(conf, pwfile=pw)
    assert rc != 0, out
    m = re.search(r"\[emerg\] (?:\d+#\d+: )?(.*) in (\S+):(\d+)", out)
    assert m, out
    assert "meter_redis" in m.group(1) and str(pw) in m.group(1), out
    assert m.group(2) == path
    line = [i + 1 for i, s in enumerate(text.splitlines())
            if "password_file" in s]
    assert int(m.group(3)) == line[0], out
