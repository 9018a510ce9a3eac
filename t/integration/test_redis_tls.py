"""TLS to Redis (issue 16): bookworm's hiredis 0.14 has no TLS, so the
supported way is stunnel4 on both ends (conf/stunnel-redis-*.conf): nginx
and meter-worker talk plain RESP to a local stunnel client end, which
carries it over TLS (certificate verified) to the stunnel server end in
front of redis-server.  Tested once, end to end, with exact totals."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (Resp, Traffic, expect_totals, free_port, port_open,
                      wait_for)
from test_metering import API, KEYS, api_plan, expected
from test_worker import NOW_HOUR, Worker, by_key, iso, line, put

ROOT = Path(__file__).resolve().parent.parent.parent
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(STUNNEL is None or OPENSSL is None,
                                reason="stunnel4/openssl not installed")


def stunnel(tmp, name, conf):
    p = tmp / ("%s.conf" % name)
    p.write_text("foreground = yes\npid =\noutput = %s/%s.log\n"
                 "debug = info\n%s" % (tmp, name, conf))
    proc = subprocess.Popen([STUNNEL, str(p)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    return proc


@pytest.fixture
def tunnel(tmp_path, redis):
    tmp = tmp_path / "tls"
    tmp.mkdir()
    cert, key = tmp / "redis.crt", tmp / "redis.key"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048",
                    "-nodes", "-days", "2", "-subj", "/CN=redis.test",
                    "-addext", "subjectAltName=DNS:redis.test",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    tls_port, local_port = free_port(), free_port()
    # the shape of conf/stunnel-redis-server.conf and -client.conf
    server = stunnel(tmp, "server",
                     "[redis]\naccept = 127.0.0.1:%d\nconnect = %s\n"
                     "cert = %s\nkey = %s\n"
                     % (tls_port, redis.address, cert, key))
    client = stunnel(tmp, "client",
                     "[redis]\nclient = yes\naccept = 127.0.0.1:%d\n"
                     "connect = 127.0.0.1:%d\nverifyPeer = yes\n"
                     "CAfile = %s\ncheckHost = redis.test\n"
                     % (local_port, tls_port, cert))
    wait_for(lambda: port_open(tls_port) and port_open(local_port), 10)
    yield tmp, tls_port, local_port
    for p in (client, server):
        p.terminate()
        p.wait(10)


def test_nginx_and_worker_through_stunnel(tunnel, redis, nginx_factory,
                                          tmp_path):
    tmp, tls_port, local_port = tunnel
    # the TLS end speaks no plain RESP
    c = Resp("127.0.0.1", tls_port, timeout=2)
    with pytest.raises((ConnectionError, OSError)):
        c("PING")
    c.close()
    assert Resp("127.0.0.1", local_port)("PING") == "PONG"

    n = nginx_factory(API, redis="127.0.0.1:%d" % local_port)
    plan = api_plan(KEYS, methods=("GET", "POST"), statuses=(200, 404))
    t = Traffic(n.port, plan, threads=2, limit=len(plan)).run()
    assert not t.failed
    expect_totals(redis, expected(t))

    # the worker through the same client end
    w = Worker(tmp_path / "w", redis)
    w.conf.write_text(w.conf.read_text().replace(
        "redis = %s" % redis.address, "redis = 127.0.0.1:%d" % local_port))
    h = NOW_HOUR - 2 * 3600
    kh = put(redis, "tls-key", h, {"calls": 42})
    r = w.once(h + 3600)
    assert r.returncode == 0, r.stderr
    assert [x for x in w.lines() if x["key_hash"] == kh] == \
        [line(kh, None, "calls", h, 42)]

    log = (tmp / "server.log").read_text(errors="replace")
    assert "Service [redis] accepted connection" in log
    assert "TLS accepted" in log or "SSL accepted" in log, log[-2000:]
