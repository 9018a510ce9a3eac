"""Redis failover with nothing lost (issue 16): a real redis-server primary,
a replica and three redis-sentinel processes on loopback (free ports), nginx
with `meter_redis sentinel=... master=...` and meter-worker with
`redis = sentinel://.../NAME`.  The primary is SIGKILLed (or put to sleep
with DEBUG SLEEP) mid-flush and mid-drain; Sentinel promotes the replica;
the totals on the new master are then exactly what the clients got, and
every record is billed exactly once.

Sentinel's timing is kept short (down-after-milliseconds 1000,
failover-timeout 3000: redis/redis sentinel.conf documents both)."""

import os
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (REDIS_SERVER, Resp, RespError, RedisServer, Traffic,
                      expect_totals, free_port, totals, wait_for)
from test_metering import API, KEYS, api_plan, expected, status_json
from test_worker import (EPOCH, NOW_HOUR, WORKER, Worker, by_key, iso,
                         line, put, read_jsonl)

REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
MASTER = "mm"

pytestmark = pytest.mark.skipif(not os.path.exists(REDIS_SENTINEL),
                                reason="redis-sentinel not installed "
                                       "(make deps)")


class Node(RedisServer):
    """redis-server as RedisServer starts it, plus arguments (--replicaof)."""

    def __init__(self, tmp, extra=()):
        super().__init__(tmp)
        self.extra = list(extra)

    def start(self, timeout=10.0):
        if self.port is None:
            self.port = free_port()
        log = open(self.tmp / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.tmp),
             "--daemonize", "no", "--enable-debug-command", "local",
             # a replica's full sync at once, not after the default 5 s
             # wait for more replicas (redis.conf, repl-diskless-sync-delay)
             "--repl-diskless-sync-delay", "0"]
            + self.extra,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: self._ping(), timeout, msg="redis-server started")
        return self

    def _ping(self):
        try:
            return self.cmd("PING") == "PONG"
        except (OSError, RespError, ConnectionError):
            self._drop()
            return False

    def role(self):
        """Sentinel's reconfiguration ends with CLIENT KILL TYPE normal
        (redis/redis src/sentinel.c, sentinelSendSlaveOf()): one retry."""
        try:
            return self.cmd("ROLE")[0].decode()
        except (OSError, ConnectionError):
            return self.cmd("ROLE")[0].decode()


class Sentinel:
    def __init__(self, tmp, master_port):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.tmp / "sentinel.conf"
        # sentinel rewrites its config file: it must be its own, writable
        self.conf.write_text(
            "port %d\nbind 127.0.0.1\ndaemonize no\ndir %s\n"
            "sentinel monitor %s 127.0.0.1 %d 2\n"
            "sentinel down-after-milliseconds %s 1000\n"
            "sentinel failover-timeout %s 3000\n"
            "sentinel parallel-syncs %s 1\n"
            % (self.port, self.tmp, MASTER, master_port, MASTER, MASTER,
               MASTER))
        log = open(self.tmp / "sentinel.log", "ab")
        self.proc = subprocess.Popen([REDIS_SENTINEL, str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()

    def cmd(self, *args):
        c = Resp("127.0.0.1", self.port, timeout=2.0)
        try:
            return c(*args)
        finally:
            c.close()

    def master_port(self):
        try:
            r = self.cmd("SENTINEL", "get-master-addr-by-name", MASTER)
        except (OSError, RespError, ConnectionError):
            return None
        return int(r[1]) if r else None

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Topology:
    """primary + replica + 3 sentinels; master() is the node Sentinel names
    (the fixture's view, as a client's)."""

    def __init__(self, tmp, failover=True):
        self.primary = Node(tmp / "primary").start()
        self.replica = Node(tmp / "replica", ["--replicaof", "127.0.0.1",
                                              str(self.primary.port)]).start()
        self.nodes = [self.primary, self.replica]
        wait_for(lambda: b"master_link_status:up"
                 in self.replica.cmd("INFO", "replication"), 10,
                 msg="replica in sync")
        self.sentinels = [Sentinel(tmp / ("sentinel%d" % i),
                                   self.primary.port) for i in range(3)]

        def ready():
            try:
                s = self.sentinels[0]
                return (len(s.cmd("SENTINEL", "replicas", MASTER)) == 1
                        and len(s.cmd("SENTINEL", "sentinels", MASTER)) == 2)
            except (OSError, RespError, ConnectionError):
                return False

        # a failover needs the Sentinels to know each other (hello
        # messages every 2 s, ~7 s here); naming the master does not
        if failover:
            wait_for(ready, 20, 0.1, msg="sentinels see the replica and "
                                         "each other")
        else:
            wait_for(lambda: all(s.master_port() == self.primary.port
                                 for s in self.sentinels), 10, 0.05,
                     msg="sentinels name the master")

    @property
    def sentinel_list(self):
        return ",".join("127.0.0.1:%d" % s.port for s in self.sentinels)

    def master(self):
        port = self.sentinels[0].master_port()
        return next(n for n in self.nodes if n.port == port)

    def wait_failover(self, old, timeout=20):
        wait_for(lambda: all(s.master_port() not in (None, old.port)
                             for s in self.sentinels), timeout, 0.1,
                 msg="Sentinel promoted the replica")
        new = self.master()
        wait_for(lambda: new.role() == "master", 10)
        return new

    def rejoin(self, node):
        """A node that died comes back (empty); Sentinel makes it a
        replica of the current master."""
        node.start()
        wait_for(lambda: node.role() == "slave"
                 and b"master_link_status:up"
                 in node.cmd("INFO", "replication"), 30, 0.2,
                 msg="the old primary rejoined as a replica")

    def stop(self):
        for s in self.sentinels:
            s.stop()
        for n in self.nodes:
            n.stop("kill")


@pytest.fixture
def topo(tmp_path):
    t = Topology(tmp_path)
    yield t
    t.stop()


@pytest.fixture
def topo_quick(tmp_path):
    """for the tests without a failover: the Sentinels answer at once"""
    t = Topology(tmp_path, failover=False)
    yield t
    t.stop()


def sentinel_conf(topo, extra=""):
    return API.replace(
        "meter_redis @REDIS@;",
        "meter_redis sentinel=%s master=%s timeout=500ms%s;"
        % (topo.sentinel_list, MASTER, extra))


def traffic(n):
    plan = api_plan(KEYS, methods=("GET", "POST"), statuses=(200, 404))
    t = Traffic(n.port, plan, threads=3)
    t.start()
    wait_for(lambda: t.total() > 100, 10)
    return t


# ------------------------------------------------------------ the module

def test_module_sigkill_primary_mid_flush_writes_lost_then_repaired(
        topo, nginx_factory):
    """The replica sleeps (DEBUG SLEEP) and its link is cut, so what the
    primary acknowledges meanwhile never reaches it; the primary is
    SIGKILLed mid-flush; the
    replica is promoted with less than nginx was told was written, and the
    resend on the new run_id makes it exact."""
    n = nginx_factory(sentinel_conf(topo), redis="-")
    old = topo.primary
    t = traffic(n)
    wait_for(lambda: totals(old), 30)

    sleeper = Resp("127.0.0.1", topo.replica.port, timeout=10)
    sleeper.sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n2\r\n")
    time.sleep(0.2)
    # the link drops while the replica cannot reconnect: what the primary
    # acknowledges from now on exists nowhere else (asynchronous
    # replication), as with a lagging replica
    assert old.cmd("CLIENT", "KILL", "TYPE", "replica") == 1
    time.sleep(1.0)                 # flushes every 100 ms, unreplicated
    acked = totals(old)
    old.stop("kill")
    sleeper._read()                 # the replica is awake again
    sleeper.close()
    at_promotion = totals(topo.replica)
    assert sum(at_promotion.values()) < sum(acked.values()), \
        "no write was lost: the test proves nothing"

    new = topo.wait_failover(old)
    assert new is topo.replica
    time.sleep(1.0)
    t.stop()
    assert not t.failed, "requests failed during the failover"
    expect_totals(new, expected(t))
    log = n.log()
    assert "restarted or replaced" in log
    assert "master \"%s\" is 127.0.0.1:%d" % (MASTER, new.port) in log
    assert status_json(n)["api"]["redis_connected"] is True


def test_module_debug_sleep_primary_failover_exact(topo, nginx_factory):
    """The primary hangs (DEBUG SLEEP 4, longer than down-after): the flush
    times out, Sentinel fails over, the module follows; the old primary
    wakes up as a replica and gets nothing written (it answers -READONLY,
    or the ROLE check refuses it)."""
    n = nginx_factory(sentinel_conf(topo), redis="-")
    old = topo.primary
    t = traffic(n)
    wait_for(lambda: totals(old), 30)

    sleeper = Resp("127.0.0.1", old.port, timeout=10)
    sleeper.sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n4\r\n")
    new = topo.wait_failover(old)
    sleeper._read()
    sleeper.close()
    # Sentinel turns the woken primary into a replica of the new master
    wait_for(lambda: old.role() == "slave", 20, 0.2)
    time.sleep(1.0)
    t.stop()
    assert not t.failed
    expect_totals(new, expected(t))
    # what the replica copies from the master: the same, nothing of its own
    wait_for(lambda: totals(old) == totals(new), 10)


def test_module_refuses_a_replica(topo_quick, nginx_factory):
    """meter_redis pointed straight at the replica: ROLE says slave, nothing
    is written there, and the error says so."""
    conf = API.replace("meter_redis @REDIS@;",
                       "meter_redis 127.0.0.1:%d timeout=500ms;"
                       % topo_quick.replica.port)
    n = nginx_factory(conf, redis="-")
    code, _ = n.get("/search?s=200", {"X-Api-Key": KEYS[0]})
    assert code == 200
    wait_for(lambda: "is slave, not the master" in n.log(), 10)
    assert status_json(n)["api"]["redis_connected"] is False
    assert totals(topo_quick.primary) == {}


def test_module_sentinel_directive_errors():
    from conftest import nginx_t
    base = "    meter_zone $http_x_api_key zone=api:1m;\n    %s\n"
    for arg, msg in [
            ("meter_redis sentinel=127.0.0.1:26379;", "needs \"master=\""),
            ("meter_redis sentinel=127.0.0.1 master=mm;",
             "expected sentinel=host:port"),
            ("meter_redis sentinel=127.0.0.1:1,:2 master=mm;",
             "expected sentinel=host:port"),
            ("meter_redis 127.0.0.1:6379 master=mm;",
             "invalid parameter \"master=mm\"")]:
        rc, out, _, _ = nginx_t(base % arg)
        assert rc != 0 and msg in out, (arg, out)
    rc, out, _, _ = nginx_t(
        base % "meter_redis sentinel=127.0.0.1:1,10.0.0.2:26379 master=mm "
        "db=2 timeout=300ms;")
    assert rc == 0, out


def test_module_no_sentinel_answers_then_one_does(topo_quick, nginx_factory):
    """The first Sentinel listed is down: the next one is asked."""
    dead = free_port()
    conf = API.replace(
        "meter_redis @REDIS@;",
        "meter_redis sentinel=127.0.0.1:%d,%s master=%s timeout=500ms;"
        % (dead, topo_quick.sentinel_list, MASTER))
    n = nginx_factory(conf, redis="-")
    plan = api_plan(KEYS[:1], methods=("GET",), statuses=(200,))
    t = Traffic(n.port, plan, threads=1, limit=len(plan) * 3).run()
    expect_totals(topo_quick.primary, expected(t))


# ------------------------------------------------------------ the worker

N_DRAIN = 3000


def test_worker_sigkill_primary_mid_drain_each_record_once(topo, tmp_path):
    """3,000 records (file chunks are 500 lines: the kill must land between
    chunks) drained into the file provider through Sentinel; the
    primary is SIGKILLed mid-drain; the worker reconnects to the promoted
    replica and finishes: each record exactly once, nothing left open."""
    w = Worker(tmp_path / "w", topo.primary,
               redis__timeout="1s", retry__base="1s", lock_ttl="5s")
    w.conf.write_text(w.conf.read_text().replace(
        "redis = %s" % topo.primary.address,
        "redis = sentinel://%s/%s" % (topo.sentinel_list, MASTER)))
    h = NOW_HOUR - 2 * 3600
    want = []
    for i in range(N_DRAIN):
        kh = put(topo.primary, "fk-%d" % i, h,
                 {"calls|%s.1" % EPOCH: i + 1})
        want.append(line(kh, None, "calls", h, i + 1))
    wait_for(lambda: topo.replica.cmd("DBSIZE")
             == topo.primary.cmd("DBSIZE"), 10)

    old = topo.primary
    p = w.spawn("--once", "--before", iso(h + 3600))
    wait_for(lambda: len(w.lines()) > 20 or p.poll() is not None, 60)
    old.stop("kill")
    p.wait(60)
    assert 20 < len(w.lines()) < N_DRAIN, "the kill did not land mid-drain"
    assert p.returncode != 0

    new = topo.wait_failover(old)
    # the killed worker's lock was replicated: it expires after lock_ttl
    wait_for(lambda: new.cmd("EXISTS", "mtr:{worker}:lock") == 0, 15)
    # redis.wait 1: a master without a replica gets nothing sent
    r = w.once(h + 3600)
    assert r.returncode != 0
    assert "only 0 of the 1 replicas" in r.stderr
    topo.rejoin(old)
    wait_for(lambda: new.cmd("EXISTS", "mtr:{worker}:lock") == 0, 15)
    r = w.once(h + 3600)
    assert r.returncode == 0, r.stderr
    assert by_key(w.lines()) == by_key(want)
    assert new.keys("mtr:{worker}:r:*") == []
    audit = read_jsonl(w.audit)
    assert len({a["idempotency_key"] for a in audit}) == N_DRAIN


def test_worker_waits_for_the_replica_before_sending(topo_quick, tmp_path):
    """redis.wait (1 behind Sentinel): with the replica asleep a new record
    is created but not sent; once the replica has it, it is."""
    w = Worker(tmp_path / "w", topo_quick.primary, redis__timeout="1s")
    w.conf.write_text(w.conf.read_text().replace(
        "redis = %s" % topo_quick.primary.address,
        "redis = sentinel://%s/%s" % (topo_quick.sentinel_list, MASTER)))
    h = NOW_HOUR - 2 * 3600
    kh = put(topo_quick.primary, "wk-1", h, {"calls|%s.1" % EPOCH: 7})
    # the replica hangs (stopped, not a timed DEBUG SLEEP: a slow start of
    # the worker on a loaded machine could outlast the sleep): WAIT 1 gets
    # no acknowledgement
    os.kill(topo_quick.replica.proc.pid, signal.SIGSTOP)
    try:
        r = w.once(h + 3600)
    finally:
        os.kill(topo_quick.replica.proc.pid, signal.SIGCONT)
    assert r.returncode != 0
    assert "only 0 of the 1 replicas" in r.stderr
    assert w.lines() == []
    # continued, the replica acknowledges what it missed (REPLCONF ACK, once
    # a second): on a loaded machine later than WAIT's 500 ms
    wait_for(lambda: acked(topo_quick.primary), 10, 0.05)
    r = w.once(h + 3600)
    assert r.returncode == 0, r.stderr
    assert w.lines() == [line(kh, None, "calls", h, 7)]


def acked(primary):
    """The replica's acknowledged offset is the master's (INFO
    replication: master_repl_offset, slave0:...,offset=N)."""
    info = primary.cmd("INFO", "replication").decode()
    master = re.search(r"master_repl_offset:(\d+)", info)
    replica = re.search(r"slave0:.*offset=(\d+)", info)
    return master and replica and master.group(1) == replica.group(1)


def test_worker_refuses_a_replica(topo_quick, tmp_path):
    w = Worker(tmp_path / "w", topo_quick.replica)
    r = w.once(NOW_HOUR)
    assert r.returncode != 0
    assert "is a slave, not the master: not writing to it" in r.stderr


def test_worker_sentinel_url_errors(tmp_path):
    for bad in ("sentinel://127.0.0.1:1", "sentinel:///mm",
                "sentinel://127.0.0.1/mm", "sentinel://h:1,h:x/mm",
                "sentinel://h:1/mm/x"):
        conf = tmp_path / "w.conf"
        conf.write_text("redis = %s\nprovider = file\nfile.path = %s\n"
                        % (bad, tmp_path / "out"))
        r = subprocess.run([str(WORKER), "-c", str(conf), "-t"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 78, (bad, r.stderr)
        assert "redis" in r.stderr, r.stderr
