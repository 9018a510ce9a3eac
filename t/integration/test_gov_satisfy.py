"""A gate's refusal is final under "satisfy any": with an error_page for
the refusal's status, the access phase used to take the gate's 401 or 403
as one check failed, and "allow" admitted an unknown or revoked key to the
upstream (nginx 1.22.1 src/http/ngx_http_core_module.c
ngx_http_core_access_phase())."""

import http.client

from conftest import expect_totals, key_hash, meterctl, wait_for

B = "http://127.0.0.1:@BACKEND@"

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;
    meter_governance_refresh 200ms;

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api ok status=200;
        meter_governance zone=api unknown_key=401;

        location = /probe { proxy_pass @B@/probe; }

        location /any/ {
            satisfy any;
            allow 127.0.0.1;
            deny all;
            error_page 401 /e401;
            error_page 402 /e402;
            proxy_pass @B@;
        }
        location /any403/ {
            satisfy any;
            allow 127.0.0.1;
            deny all;
            meter_governance zone=api unknown_key=403;
            error_page 403 /e403;
            proxy_pass @B@;
        }
        location = /e401 { return 401 "refused\n"; }
        location = /e402 { return 402 "pay\n"; }
        location = /e403 { return 403 "refused\n"; }
    }
""".replace("@B@", B)

N = 3


def get(n, path, key):
    c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=10)
    try:
        c.request("GET", path, headers={"X-Api-Key": key})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_refusal_final_under_satisfy_any(nginx_factory, redis, backend):
    """N calls each: the good key reaches the upstream and is billed; the
    unknown, revoked and delinquent keys get the error_page's answer, the
    upstream never sees them, and nothing of theirs is billed (status=200
    meter)."""
    for cust, key in (("good", "mk_good"), ("bad", "mk_bad")):
        meterctl(redis, "customers", "add", cust)
        meterctl(redis, "keys", "add", key, "--customer", cust)
    meterctl(redis, "keys", "add", "mk_rev", "--customer", "good")
    meterctl(redis, "keys", "revoke", key_hash("mk_rev"))
    meterctl(redis, "delinquent", "set", "bad")
    n = nginx_factory(CONF, workers=1, redis=redis.address,
                      backend=backend.port)
    wait_for(lambda: get(n, "/probe", "mk_nobody")[0] == 401, 30,
             msg="no governance refresh")

    for path, key, want in (
            ("/any/g", "mk_good", (200, b"ok\n")),
            ("/any/u", "mk_nobody", (401, b"refused\n")),
            ("/any/r", "mk_rev", (401, b"refused\n")),
            ("/any/d", "mk_bad", (402, b"pay\n")),
            ("/any403/g", "mk_good", (200, b"ok\n")),
            ("/any403/u", "mk_nobody", (403, b"refused\n"))):
        for _ in range(N):
            assert get(n, path, key) == want, (path, key)

    assert backend.hits["/any/g"] == backend.hits["/any403/g"] == N
    for p in ("/any/u", "/any/r", "/any/d", "/any403/u"):
        assert backend.hits[p] == 0, (p, backend.hits)
    expect_totals(redis, {("mk_good", "ok"): 2 * N})
