"""Sentinel through stunnel (issue 16; README, "TLS to Redis": "With
Sentinel, each Sentinel and each redis-server needs its own tunnel, and the
Sentinels must announce the addresses the clients reach").  On one host:
every redis-server and redis-sentinel behind a TLS server end, each with a
local client end (the port every host would map it to); the nodes announce
their client-end address (replica-announce-ip/-port, sentinel announce-ip/
-port) and the Sentinels monitor the master through its client end, so the
address a Sentinel names is one that goes through TLS, before and after a
failover.  nginx and the worker reach nothing in plain text: only the
client ends."""

import subprocess

import pytest

from conftest import Traffic, expect_totals, free_port, port_open, wait_for
from test_failover import MASTER, REDIS_SENTINEL, Node, Sentinel
from test_failover import pytestmark as failover_mark
from test_metering import API, KEYS, api_plan, expected
from test_redis_tls import OPENSSL, shipped, stunnel
from test_redis_tls import pytestmark as tls_mark
from test_worker import EPOCH, NOW_HOUR, Worker, line, put

pytestmark = [failover_mark, tls_mark]


class Tunnel:
    """A TLS server end in front of port, and its local client end."""

    def __init__(self, tmp, name, port, cert, key):
        self.tls, self.local = free_port(), free_port()
        self.procs = [
            stunnel(tmp, name + "-server", shipped(
                "server", accept="127.0.0.1:%d" % self.tls,
                connect="127.0.0.1:%d" % port, cert=cert, key=key)),
            stunnel(tmp, name + "-client", shipped(
                "client", accept="127.0.0.1:%d" % self.local,
                connect="127.0.0.1:%d" % self.tls, CAfile=cert,
                checkHost="redis.test"))]
        self.log = tmp / (name + "-server.log")
        wait_for(lambda: port_open(self.tls) and port_open(self.local), 10)

    def accepted(self):
        text = self.log.read_text(errors="replace") \
            if self.log.exists() else ""
        return text.count("accepted connection")

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait(10)


class TlsSentinel(Sentinel):
    """redis-sentinel whose conf monitors the master through its client
    end and announces its own."""

    def __init__(self, tmp, master_local, port, announce):
        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.conf = self.tmp / "sentinel.conf"
        self.conf.write_text(
            "port %d\nbind 127.0.0.1\ndaemonize no\ndir %s\n"
            "sentinel announce-ip 127.0.0.1\nsentinel announce-port %d\n"
            "sentinel monitor %s 127.0.0.1 %d 2\n"
            "sentinel down-after-milliseconds %s 1000\n"
            "sentinel failover-timeout %s 3000\n"
            % (port, self.tmp, announce, MASTER, master_local, MASTER,
               MASTER))
        log = open(self.tmp / "sentinel.log", "ab")
        self.proc = subprocess.Popen([REDIS_SENTINEL, str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()


@pytest.fixture
def tls_topo(tmp_path):
    tmp = tmp_path / "tls"
    tmp.mkdir()
    cert, key = tmp / "redis.crt", tmp / "redis.key"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048",
                    "-nodes", "-days", "2", "-subj", "/CN=redis.test",
                    "-addext", "subjectAltName=DNS:redis.test",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    made = []
    try:
        pport, rport = free_port(), free_port()
        tp = Tunnel(tmp, "primary", pport, cert, key)
        tr = Tunnel(tmp, "replica", rport, cert, key)
        made += [tp, tr]
        primary = Node(tmp_path / "primary", [
            "--replica-announce-ip", "127.0.0.1",
            "--replica-announce-port", str(tp.local)])
        primary.port = pport
        primary.start()
        made.append(primary)
        replica = Node(tmp_path / "replica", [
            "--replicaof", "127.0.0.1", str(tp.local),
            "--replica-announce-ip", "127.0.0.1",
            "--replica-announce-port", str(tr.local)])
        replica.port = rport
        replica.start()
        made.append(replica)
        wait_for(lambda: b"master_link_status:up"
                 in replica.cmd("INFO", "replication"), 15)
        sentinels = []
        for i in range(3):
            sport = free_port()
            ts = Tunnel(tmp, "sentinel%d" % i, sport, cert, key)
            made.append(ts)
            s = TlsSentinel(tmp_path / ("sentinel%d" % i), tp.local, sport,
                            ts.local)
            s.tunnel = ts
            sentinels.append(s)
            made.append(s)

        def ready():
            try:
                s = sentinels[0]
                return (len(s.cmd("SENTINEL", "replicas", MASTER)) == 1
                        and len(s.cmd("SENTINEL", "sentinels", MASTER)) == 2)
            except (OSError, ConnectionError):
                return False

        wait_for(ready, 30, 0.1, msg="sentinels see the replica and "
                                     "each other")
        yield primary, replica, tp, tr, sentinels
    finally:
        for m in reversed(made):
            if isinstance(m, Node):
                m.stop("kill")
            else:
                m.stop()


def test_sentinel_through_stunnel_failover(tls_topo, nginx_factory,
                                           tmp_path):
    primary, replica, tp, tr, sentinels = tls_topo
    slist = ",".join("127.0.0.1:%d" % s.tunnel.local for s in sentinels)
    # the Sentinels name the master by its client end
    assert sentinels[0].cmd("SENTINEL", "get-master-addr-by-name",
                            MASTER)[1] == str(tp.local).encode()

    conf = API.replace("meter_redis @REDIS@;",
                       "meter_redis sentinel=%s master=%s timeout=1s;"
                       % (slist, MASTER))
    n = nginx_factory(conf, workers=1, redis="-")
    plan = api_plan(KEYS, methods=("GET",), statuses=(200, 404))
    t1 = Traffic(n.port, plan, threads=1, limit=len(plan) * 2).run()
    expect_totals(primary, expected(t1))
    assert "master \"%s\" is 127.0.0.1:%d" % (MASTER, tp.local) in n.log()

    assert sentinels[0].cmd("SENTINEL", "FAILOVER", MASTER) == "OK"
    wait_for(lambda: all(s.master_port() == tr.local for s in sentinels),
             30, 0.1, msg="Sentinel promoted the replica")
    wait_for(lambda: replica.role() == "master", 10)
    t2 = Traffic(n.port, plan, threads=1, limit=len(plan) * 2).run()
    want = expected(t1)
    want.update(expected(t2))
    expect_totals(replica, want, timeout=20)
    assert "master \"%s\" is 127.0.0.1:%d" % (MASTER, tr.local) in n.log()

    # the worker, through the same client ends, on the new master
    w = Worker(tmp_path / "w", replica, redis__timeout="2s")
    w.conf.write_text(w.conf.read_text().replace(
        "redis = %s" % replica.address,
        "redis = sentinel://%s/%s" % (slist, MASTER)))
    h = NOW_HOUR - 2 * 3600
    wait_for(lambda: primary.role() == "slave"
             and b"master_link_status:up"
             in primary.cmd("INFO", "replication"), 30, 0.2,
             msg="the old primary follows the new master (redis.wait 1)")
    kh = put(replica, "tls-sentinel", h, {"calls|%s.1" % EPOCH: 11})
    before = tr.accepted()
    r = w.once(h + 3600, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [x for x in w.lines() if x["key_hash"] == kh] == \
        [line(kh, None, "calls", h, 11)]
    # the worker's connection went through the replica's TLS end
    assert tr.accepted() > before
