"""One billing decision per client call (issue 9): internal redirects
(error_page, try_files, rewrite ... last, named locations), subrequests
(auth_request, mirror, SSI include, addition), HTTP/2 and keepalive, a
client that gives up (499) and an upstream timeout (504), value variables
read early, and duplicate key headers.  A real upstream (conftest.Backend)
behind proxy_pass; exact totals in Redis."""

import http.client
import json
import socket
import subprocess
import time

import pytest

from conftest import (NGINX, Client, H2Client, curl, expect_totals,
                      meterctl, raw_request, raw_status, wait_for)

REFRESH = 0.2

BASE = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_zone $http_x_other zone=other:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh 200ms;
    log_format one '$connection $status $request_uri $bytes_sent '
                   '$body_bytes_sent $request_length '
                   '"$upstream_response_length"';

    server {
        listen 127.0.0.1:@PORT@;
%(listen)s
        access_log @TMP@/one.log one;
        # a server gate that refuses nothing unknown: refreshes run
        meter_governance zone=api;
        location = /probe { proxy_pass http://127.0.0.1:@BACKEND@; }
%(locs)s
    }
"""

B = "http://127.0.0.1:@BACKEND@"


def start(nginx_factory, redis, backend, locs, listen="", workers=1):
    """Accounts (good, delinquent, unknown), nginx, and the first refresh
    seen (the delinquent key refused at /probe, which meters nothing)."""
    for cust, key in (("good", "mk_good"), ("bad", "mk_bad")):
        meterctl(redis, "customers", "add", cust)
        meterctl(redis, "keys", "add", key, "--customer", cust)
    meterctl(redis, "delinquent", "set", "bad")
    n = nginx_factory(BASE % {"locs": locs, "listen": listen},
                      workers=workers, redis=redis.address,
                      backend=backend.port)
    wait_for(lambda: get(n, "/probe", "mk_bad")[0] == 402, 30,
             msg="no governance refresh")
    return n


def get(n, path, key=None, other=None, port=None):
    """(status, body, headers) of one call on a fresh connection."""
    h = {}
    if key is not None:
        h["X-Api-Key"] = key
    if other is not None:
        h["X-Other"] = other
    c = http.client.HTTPConnection("127.0.0.1", port or n.port, timeout=10)
    try:
        c.request("GET", path, headers=h)
        r = c.getresponse()
        return r.status, r.read(), r.msg
    finally:
        c.close()


def reason(body):
    return json.loads(body)["reason"]


def log_lines(n, path_prefix):
    p = n.tmp / "one.log"
    if not p.exists():
        return []
    return [line.split() for line in p.read_text().splitlines()
            if line.split()[2].startswith(path_prefix)]


# ------------------------------------------------------------ redirects

REDIRECTS = r"""
        location /ep/ {
            meter zone=api ep_all;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 = /fallback;
        }
        location = /fallback {
            meter zone=api fb_all;
            meter zone=api fb_200 status=200;
            proxy_pass @B@/fallback;
        }

        location /ep-nometer/ {
            meter zone=api epn_all;
            meter zone=api epn_200 status=200;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 = /nometer;
        }
        location = /nometer { proxy_pass @B@/nometer; }

        location /ep-off/ {
            meter zone=api epo_all;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 = /meteroff;
        }
        location = /meteroff { meter off; proxy_pass @B@/meteroff; }

        location /ep-keep/ {
            meter zone=api epk_502 status=502;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 /nometer;
        }

        location /tf/ {
            meter zone=api tf_all;
            root @TMP@/www;
            try_files $uri @backend;
        }
        location @backend {
            meter zone=api be_all;
            proxy_pass @B@;
        }
        location /tfn/ {
            meter zone=api tfn_all;
            root @TMP@/www;
            try_files $uri @bare;
        }
        location @bare { proxy_pass @B@; }

        location /v1/ {
            meter zone=api v1_all;
            rewrite ^/v1/(.*)$ /api/$1 last;
        }
        location /api/ {
            meter zone=api api_all;
            proxy_pass @B@;
        }
        location /v2/ {
            meter zone=api v2_all;
            rewrite ^/v2/(.*)$ /bare/$1 last;
        }
        location /bare/ { proxy_pass @B@; }
""".replace("@B@", B)


def redirect_calls(n, cases):
    for d in ("tf", "tfn"):
        (n.tmp / "www" / d).mkdir(parents=True, exist_ok=True)
        (n.tmp / "www" / d / "here.txt").write_text("here\n")
    n.tmp.chmod(0o755)
    for path, times, status, body in cases:
        for _ in range(times):
            got = get(n, path, "mk_good")
            assert got[:2] == (status, body), (path, got[:2])


def test_redirect_counted_once_by_final_location(nginx_factory, redis,
                                                 backend):
    n = start(nginx_factory, redis, backend, REDIRECTS)
    redirect_calls(n, [
        # path, times, final status, body
        ("/ep/x", 3, 200, b"ok\n"),
        ("/ep-off/x", 2, 200, b"ok\n"),
        ("/tf/here.txt", 2, 200, b"here\n"),
        ("/tf/missing", 3, 200, b"ok\n"),
        ("/v1/thing", 4, 200, b"ok\n")])
    expect_totals(redis, {
        # the final location's meters, once, with the final status
        ("mk_good", "fb_all"): 3, ("mk_good", "fb_200"): 3,
        ("mk_good", "tf_all"): 2, ("mk_good", "be_all"): 3,
        ("mk_good", "api_all"): 4,
        # "meter off" at the final location is a configuration: nothing
    })
    assert sum(v for k, v in backend.hits.items()
               if k.startswith("/code/502")) == 3 + 2
    assert backend.hits["/fallback"] == 3 and backend.hits["/api/thing"] == 4


def test_redirect_to_unmetered_location_counts_origin(nginx_factory, redis,
                                                      backend):
    """The final location has no meter at all: the meters of the location
    the request came from, once, with the final status."""
    n = start(nginx_factory, redis, backend, REDIRECTS)
    redirect_calls(n, [
        ("/ep-nometer/x", 2, 200, b"ok\n"),
        # error_page without "=" keeps the 502
        ("/ep-keep/x", 2, 502, b"ok\n"),
        ("/tfn/missing", 2, 200, b"ok\n"),
        ("/tfn/here.txt", 1, 200, b"here\n"),
        ("/v2/thing", 2, 200, b"ok\n")])
    expect_totals(redis, {
        ("mk_good", "epn_all"): 2, ("mk_good", "epn_200"): 2,
        ("mk_good", "epk_502"): 2,
        ("mk_good", "tfn_all"): 3,
        ("mk_good", "v2_all"): 2})
    assert backend.hits["/nometer"] == 4 and backend.hits["/bare/thing"] == 2


GATES = r"""
        # gated first here (allow), then redirected to a stricter gate
        location /g1/ {
            meter zone=api g1_all;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 = /g2;
        }
        location = /g2 {
            meter_governance zone=api unknown_key=401;
            meter zone=api g2_all;
            proxy_pass @B@/g2;
        }
        # gated on zone api, redirected to a gate on zone other
        location /z1/ {
            meter zone=api z1_all;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 = /z2;
        }
        location = /z2 {
            meter_governance zone=other unknown_key=401;
            meter zone=api z2_all;
            proxy_pass @B@/z2;
        }

        # an error before any gate ran (rewrite phase), then a governed
        # location through error_page: gated there
        location /old/ {
            meter_governance off;
            return 404;
            error_page 404 = /paid/from-old;
        }
        location /older/ {
            meter_governance off;
            return 404;
            error_page 404 /paid/from-older;
        }
        location /paid/ {
            meter_governance zone=api unknown_key=401;
            meter zone=api paid_all;
            proxy_pass @B@;
        }

        # our own refusal through error_page 402: served once, no loop
        location /pw/ {
            meter_governance zone=api unknown_key=401;
            meter zone=api pw_all;
            error_page 402 /paywall;
            proxy_pass @B@;
        }
        location = /paywall {
            meter_governance zone=api unknown_key=401;
            meter zone=api paywall_all;
            proxy_pass @B@/paywall;
        }
""".replace("@B@", B)


def caller(n):
    def call(path, key, want, other=None, body=None, why=None):
        status, got, _ = get(n, path, key, other)
        assert status == want, (path, key, status, got)
        if body is not None:
            assert got == body, (path, got)
        if why is not None:
            assert reason(got) == why, (path, got)
    return call


def test_redirect_not_gated_again(nginx_factory, redis, backend):
    n = start(nginx_factory, redis, backend, GATES)
    call = caller(n)
    # unknown key: allowed by the server gate, not asked again at /g2
    for _ in range(2):
        call("/g1/x", "mk_nobody", 200, body=b"ok\n")
    # good key for api, delinquent one for zone other: not gated again
    for _ in range(2):
        call("/z1/x", "mk_good", 200, other="mk_bad", body=b"ok\n")
    assert backend.hits["/g2"] == 2 and backend.hits["/z2"] == 2
    expect_totals(redis, {("mk_nobody", "g2_all"): 2,
                          ("mk_good", "z2_all"): 2})


def test_error_before_gate_then_governed_location_is_gated(
        nginx_factory, redis, backend):
    """return 404 in an ungoverned location (rewrite phase, no gate ran),
    error_page into a governed location: gated there, 402 / 401."""
    n = start(nginx_factory, redis, backend, GATES)
    call = caller(n)
    call("/old/x", "mk_bad", 402, why="invoice_overdue")
    call("/old/x", "mk_nobody", 401, why="unknown_key")
    call("/old/x", None, 401, why="missing_key")
    call("/old/x", "mk_good", 200, body=b"ok\n")
    # without "=": the refusal still wins over the 404 it replaces
    call("/older/x", "mk_bad", 402, why="invoice_overdue")
    call("/older/x", "mk_good", 404, body=b"ok\n")
    assert backend.hits["/paid/from-old"] == 1
    assert backend.hits["/paid/from-older"] == 1
    expect_totals(redis, {("mk_bad", "paid_all"): 2,
                          ("mk_nobody", "paid_all"): 1,
                          ("mk_good", "paid_all"): 2})


def test_own_refusal_through_error_page_served_once(nginx_factory, redis,
                                                    backend):
    n = start(nginx_factory, redis, backend, GATES)
    call = caller(n)
    for _ in range(3):
        call("/pw/x", "mk_bad", 402, body=b"ok\n")
    call("/pw/x", "mk_good", 200, body=b"ok\n")
    assert backend.hits["/paywall"] == 3
    assert backend.hits["/pw/x"] == 1
    expect_totals(redis, {("mk_bad", "paywall_all"): 3,
                          ("mk_good", "pw_all"): 1})


# ------------------------------------------------------------ subrequests

def nginx_has(module):
    r = subprocess.run([NGINX, "-V"], capture_output=True, text=True)
    return module in r.stderr


SUBREQUESTS = r"""
        %(log_subrequest)s
        location /ar/ {
            auth_request /auth;
            meter zone=api ar_all;
            proxy_pass @B@;
        }
        location = /auth {
            internal;
            meter_governance zone=api unknown_key=401;
            meter zone=api auth_all %(sub)s;
            proxy_pass @B@/auth;
        }

        location /mi/ {
            mirror /mirror;
            meter zone=api mi_all;
            proxy_pass @B@;
        }
        location = /mirror {
            internal;
            meter_governance zone=api unknown_key=401;
            meter zone=api mirror_all %(sub)s;
            proxy_pass @B@/mirror;
        }

        location /ssi/ {
            ssi on;
            default_type text/html;
            meter zone=api ssi_all;
            root @TMP@/www;
        }
        location = /inc {
            meter_governance zone=api unknown_key=401;
            meter zone=api inc_all %(sub)s;
            proxy_pass @B@/inc;
        }

        location /add/ {
            add_before_body /before;
            addition_types text/plain;
            meter zone=api add_all;
            proxy_pass @B@;
        }
        location = /before {
            meter_governance zone=api unknown_key=401;
            meter zone=api before_all %(sub)s;
            proxy_pass @B@/before;
        }
""".replace("@B@", B)

SUB_CALLS = [
    # path, backend path of the subrequest, main meter, sub meter, body
    ("/ar/x", "/auth", "ar_all", "auth_all", b"ok\n"),
    ("/mi/x", "/mirror", "mi_all", "mirror_all", b"ok\n"),
    ("/ssi/page.html", "/inc", "ssi_all", "inc_all", b"<p>ok\n</p>\n"),
    ("/add/x", "/before", "add_all", "before_all", b"ok\nok\n"),
]


@pytest.mark.parametrize("log_subrequest,sub", [
    ("", ""), ("log_subrequest on;", ""),
    ("", "subrequests=on"), ("log_subrequest on;", "subrequests=on")],
    ids=["plain", "log_subrequest", "opt_in", "opt_in_log_subrequest"])
def test_subrequests_not_billed_nor_gated(nginx_factory, redis, backend,
                                          log_subrequest, sub):
    """3 client calls to each location that makes a subrequest: 3 counted.
    The subrequest's location (governed, unknown_key=401, the key unknown)
    is neither gated nor billed, unless its meter says subrequests=on."""
    for m in ("http_auth_request_module", "http_addition_module"):
        if not nginx_has(m):
            pytest.skip("nginx -V: no %s" % m)
    n = start(nginx_factory, redis, backend,
              SUBREQUESTS % {"log_subrequest": log_subrequest, "sub": sub})
    (n.tmp / "www" / "ssi").mkdir(parents=True)
    (n.tmp / "www" / "ssi" / "page.html").write_text(
        '<p><!--# include virtual="/inc" --></p>\n')
    n.tmp.chmod(0o755)
    exp = {}
    for path, sub_path, main_meter, sub_meter, body in SUB_CALLS:
        for _ in range(3):
            status, got, _ = get(n, path, "mk_nobody")
            assert (status, got) == (200, body), (path, status, got)
        wait_for(lambda: backend.hits[sub_path] == 3, 30,
                 msg=lambda: "%s: %r" % (sub_path, backend.hits))
        exp[("mk_nobody", main_meter)] = 3
        if sub:
            exp[("mk_nobody", sub_meter)] = 3
    expect_totals(redis, exp)
    assert backend.hits["/auth"] == backend.hits["/mirror"] == 3


# ------------------------------------------------------------ HTTP/2

PROTO = r"""
        location /api/ {
            meter zone=api calls status=200;
            meter zone=api all;
            proxy_pass @B@;
        }
        location /ret/ {
            meter zone=api rcalls;
            return 200 "ok\n";
        }
""".replace("@B@", B)


def test_http2_and_keepalive_same_totals(nginx_factory, redis, backend):
    """100 calls per key on one keep-alive HTTP/1.1 connection, the same on
    one HTTP/2 connection (100 streams), and a few curl
    --http2-prior-knowledge calls: every call counted once."""
    meterctl(redis, "customers", "add", "pre")
    meterctl(redis, "keys", "add", "mk_pre", "--customer", "pre")
    meterctl(redis, "credit", "set", "pre", "--meter", "calls", 10)
    n = start(nginx_factory, redis, backend, PROTO,
              listen="        listen 127.0.0.1:@PORT2@ http2;")
    exp = {}

    def add(key, meter, k):
        exp[(key, meter)] = exp.get((key, meter), 0) + k

    for key, want in (("mk_good", 200), ("mk_bad", 402)):
        c, h = Client(n.port), H2Client(n.port2)
        for i in range(100):
            hdr = {"X-Api-Key": key}
            assert c.request("GET", "/api/h1-%s-%d" % (key, i), hdr) == want
            assert h.request("/api/h2-%s-%d" % (key, i), hdr)[0] == want
            assert c.request("GET", "/ret/h1-%s-%d" % (key, i), hdr) == 200
            assert h.request("/ret/h2-%s-%d" % (key, i), hdr)[0] == 200
        c.close()
        h.close()
        got = curl(["http://127.0.0.1:%d/api/c%d" % (n.port2, i)
                    for i in range(5)], {"X-Api-Key": key}, http2=True)
        assert got == [("2", want)] * 5
        if want == 200:
            add(key, "calls", 205)
        add(key, "all", 205)
        add(key, "rcalls", 200)

    # prepaid over HTTP/2, sequential on one connection: 10, then 402
    h = H2Client(n.port2)
    got = [h.request("/api/p%d" % i, {"X-Api-Key": "mk_pre"})[0]
           for i in range(13)]
    h.close()
    assert got == [200] * 10 + [402] * 3, got
    add("mk_pre", "calls", 10)
    add("mk_pre", "all", 13)
    expect_totals(redis, exp)

    # each batch ran on one connection
    for prefix in ("/api/h1-mk_good", "/api/h2-mk_good", "/ret/h2-mk_bad",
                   "/ret/h1-mk_bad"):
        lines = log_lines(n, prefix)
        assert len(lines) == 100, prefix
        assert len({line[0] for line in lines}) == 1, prefix


# ------------------------------------------------------------ 499, 504

SLOW = r"""
        location /slow/ {
            meter_governance off;
            meter zone=api ok status=200;
            meter zone=api all;
            meter zone=api gone status=499;
            meter zone=api timeout status=504;
            proxy_read_timeout %s;
            proxy_pass @B@/slow;
        }
""".replace("@B@", B)


def test_client_gone_and_upstream_timeout(nginx_factory, redis, backend):
    n = start(nginx_factory, redis, backend,
              (SLOW % "300ms") + (SLOW % "10s").replace("/slow/", "/gone/"))
    # the client gives up long before the upstream answers: 499
    for i in range(3):
        with socket.create_connection(("127.0.0.1", n.port)) as s:
            s.sendall(b"GET /gone/a%d?ms=2000 HTTP/1.1\r\nHost: x\r\n"
                      b"X-Api-Key: mk_good\r\n\r\n" % i)
            time.sleep(0.1)
        wait_for(lambda: len(log_lines(n, "/gone/")) == i + 1, 30)
    assert [line[1] for line in log_lines(n, "/gone/")] == ["499"] * 3
    # the upstream does not answer in time: 504
    for i in range(2):
        status, _, _ = get(n, "/slow/t%d?ms=1000" % i, "mk_good")
        assert status == 504
    # in time: 200
    assert get(n, "/slow/o?ms=10", "mk_good")[:2] == (200, b"ok\n")
    expect_totals(redis, {("mk_good", "all"): 6, ("mk_good", "gone"): 3,
                          ("mk_good", "timeout"): 2, ("mk_good", "ok"): 1})
    assert [line[1] for line in log_lines(n, "/slow/")] == \
        ["504"] * 2 + ["200"]


# ------------------------------------------------------------ values

VALUES = r"""
        location /v/ {
            meter zone=api bytes value=$bytes_sent;
            meter zone=api body value=$body_bytes_sent;
            meter zone=api reqlen value=$request_length;
            meter zone=api uplen value=$upstream_response_length;
            meter zone=api calls;
            %(early)s
            proxy_pass @B@;
        }
""".replace("@B@", B)

EARLY = ("add_header X-B $bytes_sent always; "
         "add_header X-BB $body_bytes_sent always; "
         "add_header X-RL $request_length always; "
         "add_header X-U $upstream_response_length always;")


@pytest.mark.parametrize("early", ["", EARLY], ids=["plain", "read_early"])
def test_value_variables_match_access_log(nginx_factory, redis, backend,
                                          early):
    n = start(nginx_factory, redis, backend, VALUES % {"early": early})
    sent = {"bytes": 0, "body": 0, "reqlen": 0}
    for i in range(4):
        req = ("GET /v/%d HTTP/1.1\r\nHost: x\r\nX-Api-Key: mk_good\r\n"
               "X-Pad: %s\r\nConnection: close\r\n\r\n" % (i, "p" * i * 7)
               ).encode()
        resp = raw_request(n.port, req)
        assert raw_status(resp) == 200
        sent["bytes"] += len(resp)
        sent["body"] += len(resp.partition(b"\r\n\r\n")[2])
        sent["reqlen"] += len(req)
    wait_for(lambda: len(log_lines(n, "/v/")) == 4, 30)
    logged = {"bytes": 0, "body": 0, "reqlen": 0, "uplen": 0}
    for line in log_lines(n, "/v/"):
        logged["bytes"] += int(line[3])
        logged["body"] += int(line[4])
        logged["reqlen"] += int(line[5])
        logged["uplen"] += int(line[6].strip('"'))
    assert {k: logged[k] for k in sent} == sent
    assert logged["uplen"] == 4 * len(b"ok\n")
    expect_totals(redis, {("mk_good", m): v for m, v in logged.items()}
                  | {("mk_good", "calls"): 4})


# ------------------------------------------------------------ two keys

TWO_KEYS = r"""
        location /gov/ {
            meter_governance zone=api unknown_key=allow;
            meter zone=api gov_all;
            proxy_pass @B@;
        }
        location /open/ {
            meter_governance off;
            meter zone=api open_all;
            proxy_pass @B@;
        }
""".replace("@B@", B)


def test_two_key_headers(nginx_factory, redis, backend):
    n = start(nginx_factory, redis, backend, TWO_KEYS)

    def two(path, first, second):
        return raw_request(n.port, (
            "GET %s HTTP/1.1\r\nHost: x\r\nX-Api-Key: %s\r\n"
            "X-Api-Key: %s\r\nConnection: close\r\n\r\n"
            % (path, first, second)).encode())

    for first, second in (("mk_good", "mk_nobody"), ("mk_bad", "mk_good"),
                          ("mk_good", "mk_good")):
        resp = two("/gov/x", first, second)
        head, _, body = resp.partition(b"\r\n\r\n")
        assert raw_status(resp) == 400, resp
        assert b"content-type: application/problem+json" in head.lower()
        assert json.loads(body)["reason"] == "duplicate_key"
    assert backend.hits["/gov/x"] == 0
    # ungoverned, metered: nginx 1.22's $http_x_api_key is the first
    for _ in range(2):
        assert raw_status(two("/open/x", "mk_good", "mk_bad")) == 200
    assert backend.hits["/open/x"] == 2
    expect_totals(redis, {("mk_good", "open_all"): 2})
