"""The rolling upgrade of docs/redis-schema.md ("Upgrade from the key layout
only") with the real previous version: its module and meter-worker are built
from commit OLD (main before the writer layout), and run against the same
Redis as this tree's.  Old nodes write the key layout (mtr:u, the
two-argument script, mtr:used for all usage), new nodes the writer layout;
every counter is billed once, whichever worker saw it first."""

import json
import subprocess
import time

import pytest

from conftest import ROOT, key_hash, wait_for
from test_worker import Worker

OLD = "651e08e"     # main before the writer layout

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 100ms;

    server {
        listen 127.0.0.1:@PORT@;
        meter zone=api calls;

        location / { return 200 "ok\n"; }

        location = /status {
            meter off;
            meter_status json;
        }
    }
"""


@pytest.fixture(scope="module")
def old_build(tmp_path_factory):
    """(module .so, meter-worker) of commit OLD, built from git archive."""
    d = tmp_path_factory.mktemp("old")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", OLD],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=tar, check=True)
    r = subprocess.run(["make", "module", "worker"], cwd=d,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    so = d / "build" / "nginx" / "ngx_http_meter_module.so"
    bin_ = d / "worker" / "meter-worker"
    assert so.exists() and bin_.exists()
    return so, bin_


def node(nginx_factory, redis, module=True):
    return nginx_factory(CONF, workers=1, redis=redis.address, module=module)


def calls(n, key, k):
    for _ in range(k):
        assert n.get("/", headers={"X-Api-Key": key})[0] == 200


def flushed(*nodes):
    for n in nodes:
        wait_for(lambda: json.loads(n.get("/status")[1])["zones"][0]
                 ["pending"] == 0, 10, msg="not flushed")


def billed(lines):
    """quantity billed per key hash; every idempotency key once"""
    ids = [d["idempotency_key"] for d in lines]
    assert len(ids) == len(set(ids)), lines
    out = {}
    for d in lines:
        out[d["key_hash"]] = out.get(d["key_hash"], 0) + d["quantity"]
    return out


def end_of_hour():
    # --before past the current hour's end and grace: it is closed
    return (int(time.time()) // 3600 + 2) * 3600


def test_old_and_new_nodes_one_new_worker(nginx_factory, redis, tmp_path,
                                          old_build):
    """Worker first, then the nodes one at a time: for a while an old and
    a new node write the same key and hour, each in its layout."""
    so, _ = old_build
    old = node(nginx_factory, redis, module=str(so))
    new = node(nginx_factory, redis)
    k, l, m = key_hash("key-k"), key_hash("key-l"), key_hash("key-m")

    calls(old, "key-k", 5)
    calls(old, "key-l", 4)
    calls(new, "key-k", 7)
    calls(new, "key-m", 3)
    flushed(old, new)

    # the old node: key layout only, mtr:used of all its usage; the new
    # one (no governance, so no credit): its writer hash only
    assert sorted(x.split(":")[2][1:-1] for x in redis.keys("mtr:u:*")) == \
        sorted([k, l])
    assert int(redis.cmd("HGET", "mtr:used:{%s}" % k, "calls")) == 5
    assert redis.cmd("EXISTS", "mtr:used:{%s}" % m) == 0
    wu = redis.keys("mtr:wu:*")
    assert len({x.split(":")[3] for x in wu}) == 1      # one session
    assert sorted(f.split("|")[0] for x in wu for f in redis.hgetall(x)) \
        == sorted([k, m])

    w = Worker(tmp_path / "w", redis, grace="5m")
    end = end_of_hour()
    assert w.once(end).returncode == 0
    assert billed(w.lines()) == {k: 12, l: 4, m: 3}
    assert w.once(end).returncode == 0
    assert billed(w.lines()) == {k: 12, l: 4, m: 3}

    # late usage on both nodes after the drain: the differences, once
    calls(old, "key-k", 2)
    calls(new, "key-k", 1)
    calls(new, "key-m", 1)
    flushed(old, new)
    assert w.once(end).returncode == 0
    assert billed(w.lines()) == {k: 15, l: 4, m: 4}
    assert w.once(end).returncode == 0
    assert len(w.lines()) == 5, w.lines()


class OldWorker(Worker):
    pass


def test_old_worker_then_new_worker(nginx_factory, redis, tmp_path,
                                    old_build):
    """The wrong order (a new node while the old worker still drains): the
    old worker bills the key layout only, the new one the rest when it
    takes over; nothing lost, nothing twice."""
    so, old_bin = old_build
    OldWorker.bin = old_bin
    old = node(nginx_factory, redis, module=str(so))
    new = node(nginx_factory, redis)
    k, m = key_hash("key-k"), key_hash("key-m")

    calls(old, "key-k", 5)
    calls(new, "key-k", 7)
    calls(new, "key-m", 3)
    flushed(old, new)

    end = end_of_hour()
    ow = OldWorker(tmp_path / "w", redis, grace="5m")
    assert ow.once(end).returncode == 0
    assert billed(ow.lines()) == {k: 5}
    assert all(d["idempotency_key"] for d in ow.lines())

    # the same config and state, the new binary
    w = Worker(tmp_path / "w", redis, grace="5m")
    assert w.once(end).returncode == 0
    assert billed(w.lines()) == {k: 12, m: 3}
    assert len(w.lines()) == 3
    assert w.once(end).returncode == 0
    assert len(w.lines()) == 3

    # and back (a rollback of the worker): the old one bills nothing again
    calls(old, "key-k", 1)
    flushed(old)
    assert ow.once(end).returncode == 0
    assert billed(ow.lines()) == {k: 13, m: 3}
    assert w.once(end).returncode == 0
    assert billed(w.lines()) == {k: 13, m: 3}
    assert len(w.lines()) == 4
