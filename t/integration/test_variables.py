"""The customer as nginx variables (issue 15 part 3): $meter_customer,
$meter_plan, $meter_status, $meter_credit_remaining, $meter_quota_remaining
from the module's shared-memory copy, for the rest of nginx: a header to a
real upstream behind proxy_pass, an access log per customer, and per-plan
rate limits with nginx's own limit_req keyed by a map of $meter_plan.  And
meter_governance_headers in http, server and location."""

import json
import subprocess
import time

import pytest

from conftest import free_port, wait_for
from test_quota import METERCTL, ok, register, status, worker_conf, get

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh 200ms;

    # per-plan rate limits: a customer's key in its plan's zone only
    map $meter_plan $limit_free { free $meter_customer; default ""; }
    map $meter_plan $limit_pro  { pro  $meter_customer; default ""; }
    limit_req_zone $limit_free zone=free:1m rate=1r/m;
    limit_req_zone $limit_pro  zone=pro:1m  rate=1r/m;

    map $meter_customer $log_name { "" anonymous; default $meter_customer; }
    log_format cust '$meter_customer|$meter_plan|$meter_status|'
                    '$meter_credit_remaining|$meter_quota_remaining|$status';

    # the upstream: tells what nginx told it
    server {
        listen 127.0.0.1:@PORT2@;
        location / {
            return 200 "customer=$http_x_customer_id plan=$http_x_plan\n";
        }
    }

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls status=200;
        meter_governance zone=api unknown_key=401;
        # a log path with variables needs the root to exist (nginx checks)
        root @TMP@;
        access_log @TMP@/cust-$log_name.log cust;

        location / {
            proxy_set_header X-Customer-Id $meter_customer;
            proxy_set_header X-Plan $meter_plan;
            proxy_pass http://127.0.0.1:@PORT2@;
        }

        location /limited {
            limit_req zone=free burst=2 nodelay;
            limit_req zone=pro burst=5 nodelay;
            proxy_pass http://127.0.0.1:@PORT2@;
        }

        location /limited429 {
            limit_req zone=free burst=1 nodelay;
            limit_req_status 429;
            proxy_pass http://127.0.0.1:@PORT2@;
        }

        location /open {
            meter_governance off;
            proxy_set_header X-Customer-Id $meter_customer;
            proxy_pass http://127.0.0.1:@PORT2@;
        }

        location = /status {
            meter off;
            meter_governance off;
            access_log off;
            meter_status json;
        }
    }
"""


@pytest.fixture
def setup(nginx_factory, redis, tmp_path):
    conf = worker_conf(tmp_path, redis, [
        "plan.free.quota.calls = 100/month",
        "plan.pro.stripe_price = price_pro",
    ])
    keys = {}
    for cust, plan in (("acme", "free"), ("bolt", "pro")):
        keys[cust] = register(conf, cust, plan)
        ok(conf, "plan", "set", cust, plan)
    ok(conf, "credit", "set", "bolt", "--meter", "calls", "7")
    n = nginx_factory(CONF, workers=2, redis=redis.address)
    wait_for(lambda: status(n)["gov_refreshed"] > 0, 10)
    # the credit and the plans are in the first copy already; settle
    wait_for(lambda: get(n, keys["bolt"])[2]
             == b"customer=bolt plan=pro\n", 10)
    return n, keys, conf


def test_header_to_the_upstream(setup, redis):
    n, keys, conf = setup
    assert get(n, keys["acme"])[2] == b"customer=acme plan=free\n"
    # a customer added while nginx runs (mtr:gov:log, applied in place)
    key = register(conf, "cato", "pro")
    wait_for(lambda: get(n, key)[2] == b"customer=cato plan=pro\n", 10)
    # one without plan (no -c: nothing in mtr:gov:quota), in place only
    r = subprocess.run([str(METERCTL), "--redis", redis.address, "register",
                        "--email", "dan@example.com", "--customer", "dan",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["key"]
    wait_for(lambda: get(n, key)[2] == b"customer=dan plan=\n", 10)
    assert get(n, keys["bolt"])[2] == b"customer=bolt plan=pro\n"
    # unknown key: refused by the gate before any upstream sees it
    assert get(n, "mk_nobody")[0] == 401
    # no gate here: the variables have no key to read (empty)
    assert get(n, keys["acme"], "/open")[2] == b"customer= plan=\n"


def test_access_log_per_customer(setup):
    n, keys, _ = setup

    def counted():
        z = status(n)
        return z["pending"] + z["flushed_total"]

    # each call counted (its log phase ran) before the next: on a loaded
    # machine the next call, on the other worker, read the quota first
    for _ in range(3):
        c = counted()
        get(n, keys["acme"])
        wait_for(lambda: counted() == c + 1, 30)
    for _ in range(2):
        get(n, keys["bolt"])
    get(n, "mk_nobody")
    logs = n.tmp

    def lines(name):
        p = logs / ("cust-%s.log" % name)
        return p.read_text().splitlines() if p.exists() else []
    wait_for(lambda: len(lines("acme")) >= 3 and len(lines("anonymous")) >= 1)
    acme = lines("acme")
    assert [l.split("|")[:3] for l in acme] == [["acme", "free", "active"]] * 3
    # quota remaining: 100 less what was counted before each call
    assert [int(l.split("|")[4]) for l in acme[-3:]] == [100, 99, 98]
    assert acme[0].split("|")[3] == "-"         # no credit: not found
    bolt = lines("bolt")
    assert [l.split("|")[:3] + [l.split("|")[4]] for l in bolt] == \
        [["bolt", "pro", "active", "-"]] * len(bolt)
    assert [int(l.split("|")[3]) for l in bolt][-2:] == [6, 5]
    assert lines("anonymous") == ["-|-|unknown|-|-|401"]


def test_per_plan_rate_limits(setup):
    """limit_req runs in preaccess, before the gate: the variables find
    the customer themselves.  rate=1r/m: burst + 1 pass at once."""
    n, keys, _ = setup
    free = [get(n, keys["acme"], "/limited")[0] for _ in range(8)]
    pro = [get(n, keys["bolt"], "/limited")[0] for _ in range(8)]
    assert free == [200] * 3 + [503] * 5, free
    # pro: 5 + 1; limit_req (preaccess) refuses before the gate would
    # see the credit (7, one used by the fixture) run out
    assert pro == [200] * 6 + [503] * 2, pro
    # the other location, the same free zone (already used up): 429
    assert [get(n, keys["acme"], "/limited429")[0] for _ in range(2)] == \
        [429, 429]
    # an unknown key is not limited (empty key) and refused by the gate
    assert [get(n, "mk_nobody", "/limited")[0] for _ in range(5)] == [401] * 5


def test_status_grace_and_delinquent(setup):
    n, keys, conf = setup
    ok(conf, "delinquent", "set", "acme", "--reason", "invoice_overdue")
    wait_for(lambda: get(n, keys["acme"])[0] == 402, 10)
    logs = n.tmp / "cust-acme.log"
    wait_for(lambda: logs.read_text().splitlines()[-1].endswith("|402"))
    assert logs.read_text().splitlines()[-1].split("|")[2] == "delinquent"


HEADERS_CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_governance_refresh 200ms;
    meter_governance_headers on;

    server {
        listen 127.0.0.1:@PORT2@;
        location / { return 200 "ok\n"; }
    }

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls;
        meter_governance zone=api;

        location / { proxy_pass http://127.0.0.1:@PORT2@; }
        location /off {
            meter_governance_headers off;
            proxy_pass http://127.0.0.1:@PORT2@;
        }
        location = /status {
            meter off;
            meter_governance off;
            meter_status json;
        }
    }

    server {
        listen 127.0.0.1:@PORT3@;
        meter zone=api calls;
        meter_governance zone=api;
        meter_governance_headers off;

        location / { proxy_pass http://127.0.0.1:@PORT2@; }
        location /on {
            meter_governance_headers on;
            proxy_pass http://127.0.0.1:@PORT2@;
        }
    }
"""


def test_governance_headers_contexts(nginx_factory, redis, tmp_path):
    """http on (inherited by server 1), off in a location below; server 2
    off, on again in a location below."""
    conf = worker_conf(tmp_path, redis, ["plan.free.quota.calls = 9/week"])
    key = register(conf, "acme", "free")
    ok(conf, "plan", "set", "acme", "free")
    port3 = free_port()
    n = nginx_factory(HEADERS_CONF, workers=1, redis=redis.address,
                      port3=port3)
    wait_for(lambda: status(n)["gov_refreshed"] > 0, 10)
    wait_for(lambda: "RateLimit" in get(n, key)[1], 10)

    def has(port, path):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path, headers={"X-Api-Key": key})
        r = c.getresponse()
        r.read()
        return r.getheader("RateLimit-Policy")
    w = 7 * 86400
    assert has(n.port, "/") == '"calls";q=9;w=%d' % w
    assert has(n.port, "/off") is None
    assert has(port3, "/") is None
    assert has(port3, "/on") == '"calls";q=9;w=%d' % w
