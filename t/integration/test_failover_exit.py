"""The module's final flush (the blocking one at worker exit) after a
Sentinel failover (issue 16): it connects as the async path does (the
Sentinels asked, AUTH/SELECT, ROLE must say master) and, when the server
is not the one the zone last flushed to, rewrites every counter, not only
those that moved: what the old master acknowledged and never replicated is
repaired on the new one by the exit flush alone.

To get there with counters still in shared memory, the nginx worker is
stopped (kill -STOP) before the async path can follow the failover; the
graceful stop (SIGQUIT to the master) is read when it is continued, before
its next tick, so the only flush to the new master is the exit's."""

import os
import signal
import time
from collections import Counter

from conftest import Resp, Traffic, expect_totals, totals, wait_for
from test_failover import (pytestmark, sentinel_conf,  # noqa: F401
                           topo, topo_quick)
from test_metering import API, KEYS, api_plan, expected

KEYS5 = KEYS + ["mk_live_delta04", "mk_live_echo005"]


def run(n, keys, times=2):
    plan = api_plan(keys, methods=("GET",), statuses=(200, 404))
    return Traffic(n.port, plan, threads=1, limit=len(plan) * times).run()


def test_exit_flush_after_failover_rewrites_every_counter(topo,
                                                          nginx_factory):
    n = nginx_factory(sentinel_conf(topo), workers=1, redis="-")
    old = topo.primary
    want = Counter()

    # A: flushed and replicated
    want.update(expected(run(n, KEYS5[:2])))
    expect_totals(old, want)
    wait_for(lambda: totals(topo.replica) == totals(old), 10)

    # B: flushed to the primary only (the replica asleep, its link cut),
    # acknowledged, so no longer pending in shared memory
    sleeper = Resp("127.0.0.1", topo.replica.port, timeout=10)
    sleeper.sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n3\r\n")
    time.sleep(0.2)
    assert old.cmd("CLIENT", "KILL", "TYPE", "replica") == 1
    want.update(expected(run(n, KEYS5[2:4])))
    expect_totals(old, want, settle=0.3)
    old.stop("kill")

    # C: while Redis is gone, counted in shared memory only: KEYS5[0] and
    # KEYS5[4], so B's slots are not among those that moved
    want.update(expected(run(n, [KEYS5[0], KEYS5[4]])))
    (worker,) = n.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        sleeper._read()
        sleeper.close()
        lost = totals(topo.replica)
        new = topo.wait_failover(old)
        assert new is topo.replica
        assert totals(new) == lost
        assert sum(lost.values()) < sum(want.values())
        n.proc.send_signal(signal.SIGQUIT)
        time.sleep(0.3)
    finally:
        os.kill(worker, signal.SIGCONT)
    n.proc.wait(30)
    n.proc = None

    expect_totals(new, want)
    # the exit's flush did it, not a tick that got to the new master first
    assert "final flush: redis was restarted or replaced; rewriting every " \
        "counter of meter_zone \"api\"" in n.log()


def test_exit_flush_refuses_a_replica(topo_quick, nginx_factory):
    """meter_redis named straight at the replica: the exit flush checks
    ROLE as the async path does and writes nothing there."""
    conf = API.replace("meter_redis @REDIS@;",
                       "meter_redis 127.0.0.1:%d timeout=500ms;"
                       % topo_quick.replica.port)
    n = nginx_factory(conf, workers=1, redis="-")
    code, _ = n.get("/search?s=200", {"X-Api-Key": KEYS[0]})
    assert code == 200
    wait_for(lambda: "is slave, not the master" in n.log(), 10)
    n.stop()
    assert "meter: final flush: redis unreachable (is slave, not the " \
        "master); counters stay in shared memory" in n.log()
    assert totals(topo_quick.primary) == {}
    assert totals(topo_quick.replica) == {}
