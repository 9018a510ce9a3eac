"""The request path keeps its per-call state in two r->variables slots of
the main request ("meter call", "meter meters").  A subrequest shares
r->variables with its main request (nginx 1.22.1 src/http/
ngx_http_core_module.c ngx_http_subrequest(): sr->variables =
r->variables); an internal redirect and a named location keep them.  So
auth_request and mirror, each with a metered location and a proxied
upstream: a meter inherited from the server level (as most configurations
write it) bills a subrequest only with subrequests=on, a subrequest's own
meters never leak into its main request's slot, and an auth_request refusal
that error_page sends to a named location is still one call."""

import http.client

import pytest

from conftest import expect_totals, meterctl, wait_for

B = "http://127.0.0.1:@BACKEND@"

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh 200ms;

    # the meter every location inherits; a gate that refuses nothing
    # unknown, so the call slot is in use on every call
    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls %(sub)s;
        meter_governance zone=api;

        location = /probe { meter off; proxy_pass @B@/probe; }

        location /ar/ { auth_request /auth; proxy_pass @B@; }
        location = /auth { internal; proxy_pass @B@/auth; }

        location /ard/ { auth_request /authdeny; proxy_pass @B@; }
        location = /authdeny { internal; proxy_pass @B@/code/403; }

        location /arl/ {
            auth_request /auth401;
            error_page 401 = @login;
            proxy_pass @B@;
        }
        location = /auth401 { internal; proxy_pass @B@/code/401; }
        location @login { proxy_pass @B@; }

        location /mi/ { mirror /mirror; proxy_pass @B@; }
        location = /mirror { internal; proxy_pass @B@/mirror; }

        location /mie/ {
            mirror /mirror;
            proxy_pass @B@/code/502;
            proxy_intercept_errors on;
            error_page 502 = @fb;
        }
        location @fb { proxy_pass @B@; }
    }

    # no meter at the server level: the main request meters nothing, only
    # the subrequest's location does
    server {
        listen 127.0.0.1:@PORT2@;

        location /nar/ { auth_request /nauth; proxy_pass @B@; }
        location = /nauth {
            internal;
            meter zone=api sub_auth %(sub)s;
            proxy_pass @B@/nauth;
        }

        location /nmi/ { mirror /nmirror; proxy_pass @B@; }
        location = /nmirror {
            internal;
            meter zone=api sub_mirror %(sub)s;
            proxy_pass @B@/nmirror;
        }
    }
""".replace("@B@", B)

N = 3

# path, server (0: PORT, 1: PORT2), status, body
CALLS = [
    ("/ar/x", 0, 200, b"ok\n"),
    ("/ard/x", 0, 403, None),
    ("/arl/x", 0, 200, b"ok\n"),
    ("/mi/x", 0, 200, b"ok\n"),
    ("/mie/x", 0, 200, b"ok\n"),
    ("/nar/x", 1, 200, b"ok\n"),
    ("/nmi/x", 1, 200, b"ok\n"),
]

# what the upstream sees for N calls of each (the subrequests run either
# way); a named location passes the call's own URI
HITS = {"/auth": N, "/ar/x": N, "/code/403": N, "/ard/x": 0,
        "/code/401": N, "/arl/x": N,
        "/mirror": 2 * N, "/mi/x": N, "/code/502x": N, "/mie/x": N,
        "/nauth": N, "/nar/x": N, "/nmirror": N, "/nmi/x": N}


def get(port, path, key):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers={"X-Api-Key": key})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def key_of(path):
    return "mk" + path.replace("/", "_")


@pytest.mark.parametrize("sub", ["", "subrequests=on"],
                         ids=["plain", "opt_in"])
def test_auth_request_and_mirror_bill_once(nginx_factory, redis, backend,
                                           sub):
    """N calls to each location, each with its own key: the inherited
    meter counts N calls (2N with subrequests=on: the auth or mirror
    subrequest too); where only the subrequest's location meters, nothing
    is billed (N with subrequests=on, under the subrequest's meter)."""
    meterctl(redis, "customers", "add", "good")
    meterctl(redis, "keys", "add", "mk_good", "--customer", "good")
    n = nginx_factory(CONF % {"sub": sub}, workers=1, redis=redis.address,
                      backend=backend.port)
    # the first refresh: the gate knows mk_good (and the slots are used)
    wait_for(lambda: get(n.port, "/probe", "mk_good")[0] == 200, 30,
             msg="no governance refresh")
    backend.hits.clear()

    for path, srv, status, body in CALLS:
        for _ in range(N):
            got = get(n.port2 if srv else n.port, path, key_of(path))
            assert got[0] == status, (path, got)
            if body is not None:
                assert got[1] == body, (path, got)

    def hits_done():
        return all(backend.hits[p] == v for p, v in HITS.items())

    wait_for(hits_done, 30, msg=lambda: "backend hits %r" % backend.hits)

    per_call = 2 if sub else 1
    exp = {}
    for path, srv, _, _ in CALLS:
        if srv == 0:
            exp[(key_of(path), "calls")] = per_call * N
    if sub:
        exp[(key_of("/nar/x"), "sub_auth")] = N
        exp[(key_of("/nmi/x"), "sub_mirror")] = N
    expect_totals(redis, exp)
    assert hits_done(), backend.hits
