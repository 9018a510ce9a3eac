"""TLS to Redis (issue 16): bookworm's hiredis 0.14 has no TLS, so the
supported way is stunnel4 on both ends (conf/stunnel-redis-*.conf): nginx
and meter-worker talk plain RESP to a local stunnel client end, which
carries it over TLS (certificate verified) to the stunnel server end in
front of redis-server.  Tested once, end to end, with exact totals."""

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import (Resp, Traffic, expect_totals, free_port, port_open,
                      wait_for)
from test_metering import API, KEYS, api_plan, expected
from test_worker import NOW_HOUR, Worker, line, put

ROOT = Path(__file__).resolve().parent.parent.parent
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(STUNNEL is None or OPENSSL is None,
                                reason="stunnel4/openssl not installed")


def shipped(name, **values):
    """conf/stunnel-redis-NAME.conf as shipped, with this test's ports and
    files: the example itself is what runs.  Run as the test user (no
    setuid), in the foreground, logging to a file."""
    out = []
    for ln in (ROOT / "conf" / ("stunnel-redis-%s.conf" % name)) \
            .read_text().splitlines():
        k = ln.split("=", 1)[0].strip()
        if k in ("setuid", "setgid", "output", "debug"):
            continue
        if k in values:
            ln = "%s = %s" % (k, values.pop(k))
        out.append(ln)
    assert not values, "not in the shipped conf: %s" % values
    return "\n".join(out) + "\n"


def stunnel(tmp, name, conf):
    p = tmp / ("%s.conf" % name)
    # global options first: before the [redis] section
    p.write_text("output = %s/%s.log\ndebug = info\n%s" % (tmp, name, conf))
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
    server = stunnel(tmp, "server", shipped(
        "server", accept="127.0.0.1:%d" % tls_port, connect=redis.address,
        cert=cert, key=key))
    client = stunnel(tmp, "client", shipped(
        "client", accept="127.0.0.1:%d" % local_port,
        connect="127.0.0.1:%d" % tls_port, CAfile=cert,
        checkHost="redis.test"))
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

    # the client end verifies the server's name: another name, no Redis
    wrong_port = free_port()
    wrong = stunnel(tmp, "wrong", shipped(
        "client", accept="127.0.0.1:%d" % wrong_port,
        connect="127.0.0.1:%d" % tls_port, CAfile=tmp / "redis.crt",
        checkHost="other.test"))
    try:
        wait_for(lambda: port_open(wrong_port), 10)
        c = Resp("127.0.0.1", wrong_port, timeout=5)
        with pytest.raises((ConnectionError, OSError)):
            c("PING")
        c.close()
    finally:
        wrong.terminate()
        wrong.wait(10)

    log = (tmp / "server.log").read_text(errors="replace")
    assert "Service [redis] accepted connection" in log
    assert "TLS accepted" in log or "SSL accepted" in log, log[-2000:]
