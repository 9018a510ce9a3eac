"""The harness itself, with plain nginx (no module): if these fail, the
metering tests' verdicts mean nothing."""

import hashlib
import socket

from conftest import (Nginx, Traffic, key_hash, line_of, nginx_t, raw_request,
                      raw_status, usage, wait_for)

PLAIN = """
    server {
        listen 127.0.0.1:@PORT@;
        location / { return 200 "ok\\n"; }
        location /missing { return 404; }
    }
"""


def test_redis_fixture_restart_keeps_port_and_saved_data(redis):
    port = redis.port
    assert redis.cmd("SET", "a", "1") == "OK"
    redis.stop("save")
    redis.start()
    assert redis.port == port
    assert redis.cmd("GET", "a") == b"1"
    redis.stop("term")                    # --save '': data gone
    redis.start()
    assert redis.cmd("GET", "a") is None


def test_usage_sums_writer_fields_over_hours(redis):
    kh = key_hash("k")
    assert kh == hashlib.sha256(b"k").hexdigest()
    redis.cmd("ZADD", "mtr:hours", 0, "1970010100")
    redis.cmd("HSET", "mtr:u:{%s}:1970010100" % kh,
              "calls|00000000000000aa.1", "5",
              "calls|00000000000000bb.7", "2", "bytes|00000000000000aa.1", "9")
    assert usage(redis, "k", "calls") == 7
    assert usage(redis, "k", "bytes") == 9
    assert usage(redis, "k", "calls", hour="1970010101") == 0


def test_nginx_fixture_reload_and_kill(nginx_factory):
    n = nginx_factory(PLAIN, module=False)
    assert n.get("/")[0] == 200
    resp = raw_request(n.port, b"GET /missing HTTP/1.0\r\n\r\n")
    assert raw_status(resp) == 404
    old = n.worker_pids()
    assert len(old) == 2
    n.reload()
    assert not (n.worker_pids() & old)
    killed = n.kill_worker()
    assert killed not in n.worker_pids()
    t = Traffic(n.port, [("GET", "/", {}, "a"), ("GET", "/missing", {}, "b")],
                threads=2, limit=50).run()
    assert t.ok == {("a", 200): 50, ("b", 404): 50}
    wait_for(lambda: n.get("/")[0] == 200, 30)


def test_nginx_t_reports_file_and_line():
    conf = PLAIN + "    bogus_directive 1;\n"
    rc, out, text, path = nginx_t(conf, module=False)
    assert rc != 0
    assert 'unknown directive "bogus_directive"' in out
    assert "%s:%d" % (path, line_of(text, "bogus_directive")) in out
    rc, out, _, _ = nginx_t(PLAIN, module=False)
    assert rc == 0, out



def test_nginx_start_retries_a_taken_port(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    try:
        n = Nginx(tmp_path / "n", PLAIN, module=False)
        n.port = n.subst["port"] = taken
        n.write_conf(PLAIN)
        n.start()                   # nginx retries bind() for 2.5 s first
        try:
            assert n.port != taken
            assert n.get("/")[0] == 200
            assert not n.unexpected_alerts()
        finally:
            n.stop()
    finally:
        blocker.close()
