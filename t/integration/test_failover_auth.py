"""Sentinel with a password and a database (issue 16; README, meter_redis:
"password= and db= apply to the master; the Sentinels are asked without a
password"): the primary and the replica require a password (the replica
authenticates to its master with masterauth, the Sentinels to both with
auth-pass), the Sentinels themselves none.  The module's async flush and
its final flush at exit, and the worker, write to db 2 of the master."""

import pytest

from conftest import Traffic, expect_totals, totals, wait_for
from test_failover import (MASTER, acked, pytestmark,  # noqa: F401
                           sentinel_conf, Topology)
from test_metering import KEYS, api_plan, expected
from test_worker import EPOCH, NOW_HOUR, Worker, line, put

PW = "s3cret-sentinel-test"


@pytest.fixture
def topo_auth(tmp_path):
    t = Topology(tmp_path, failover=False)
    # at run time, in the order that keeps the replica's link up
    t.replica.cmd("CONFIG", "SET", "masterauth", PW)
    for node in (t.primary, t.replica):
        node.cmd("CONFIG", "SET", "requirepass", PW)
        node.use(2, PW)
    for s in t.sentinels:
        assert s.cmd("SENTINEL", "SET", MASTER, "auth-pass", PW) == "OK"
    yield t
    t.stop()


def test_module_flushes_to_db2_of_the_master(topo_auth, nginx_factory):
    conf = sentinel_conf(topo_auth, " password=%s db=2" % PW)
    n = nginx_factory(conf, workers=1, redis="-")
    plan = api_plan(KEYS, methods=("GET",), statuses=(200, 404))
    t = Traffic(n.port, plan, threads=1, limit=len(plan) * 2).run()
    expect_totals(topo_auth.primary, expected(t))
    topo_auth.primary.use(0, PW)
    assert totals(topo_auth.primary) == {}


def test_exit_flush_authenticates_and_selects(topo_auth, nginx_factory):
    """The async flush never runs (an hour's interval): what reaches Redis
    is the exit flush's alone, through the Sentinels, AUTH and SELECT."""
    conf = sentinel_conf(topo_auth, " password=%s db=2" % PW).replace(
        "meter_flush_interval 100ms;", "meter_flush_interval 1h;")
    assert "meter_flush_interval 1h;" in conf
    n = nginx_factory(conf, workers=1, redis="-")
    plan = api_plan(KEYS, methods=("GET",), statuses=(200, 404))
    t = Traffic(n.port, plan, threads=1, limit=len(plan) * 2).run()
    assert totals(topo_auth.primary) == {}
    n.stop()
    expect_totals(topo_auth.primary, expected(t), timeout=1)
    assert "final flush" not in n.log()


def test_worker_authenticates_and_selects(topo_auth, tmp_path):
    pwfile = tmp_path / "redis-password"
    pwfile.write_text(PW + "\n")
    w = Worker(tmp_path / "w", topo_auth.primary,
               redis__password_file=pwfile, redis__db=2,
               redis__timeout="1s")
    w.conf.write_text(w.conf.read_text().replace(
        "redis = %s" % topo_auth.primary.address,
        "redis = sentinel://%s/%s" % (topo_auth.sentinel_list, MASTER)))
    h = NOW_HOUR - 2 * 3600
    kh = put(topo_auth.primary, "auth-1", h, {"calls|%s.1" % EPOCH: 9})
    # redis.wait 1: the replica must be in sync first (a fresh topology may
    # still be in its first full sync on a loaded machine)
    wait_for(lambda: acked(topo_auth.primary), 30, 0.05)
    r = w.once(h + 3600)
    assert r.returncode == 0, r.stderr
    assert w.lines() == [line(kh, None, "calls", h, 9)]
    assert topo_auth.primary.keys("mtr:{worker}:r:*") == []
    topo_auth.primary.use(0, PW)
    assert topo_auth.primary.keys("mtr:*") == []
