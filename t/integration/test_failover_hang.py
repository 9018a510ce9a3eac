"""A Sentinel that hangs (issue 16; README, meter_redis: "a Sentinel that
hangs costs a timeout, never a stalled worker"): the first Sentinel listed
accepts the connection and reads the query but never answers.  nginx keeps
serving at full speed meanwhile, gives up on it after timeout= and asks
the next one; meter-worker's connect is bounded by redis.timeout."""

import socket
import threading
import time

import pytest

from conftest import Client, expect_totals
from test_failover import MASTER, pytestmark, topo_quick  # noqa: F401
from test_metering import API, KEYS
from test_worker import EPOCH, NOW_HOUR, Worker, line, put


class Mute:
    """A listener that takes connections and what is sent, and answers
    nothing."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.got = []               # (monotonic time, first bytes)
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(5)
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            self.got.append((time.monotonic(), data))
            self.conns.append(c)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def mute():
    m = Mute()
    yield m
    m.close()


def test_module_hung_sentinel_never_stalls_requests(topo_quick, mute,
                                                    nginx_factory):
    conf = API.replace(
        "meter_redis @REDIS@;",
        "meter_redis sentinel=127.0.0.1:%d,%s master=%s timeout=2s;"
        % (mute.port, topo_quick.sentinel_list, MASTER))
    n = nginx_factory(conf, workers=1, redis="-")
    c = Client(n.port)
    slowest, served = 0.0, 0
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        assert c.request("GET", "/search?s=200",
                         {"X-Api-Key": KEYS[0]}) == 200
        slowest = max(slowest, time.monotonic() - t0)
        served += 1
    c.close()
    print("%d requests while the Sentinel hung, slowest %.3f s"
          % (served, slowest))
    # the query was sent to the mute one and never answered
    assert mute.got and b"get-master-addr-by-name" in mute.got[0][1]
    # a stalled worker would hold a request for the whole 2 s timeout
    assert slowest < 1.0
    expect_totals(topo_quick.primary, {(KEYS[0], "search"): served})


def test_worker_hung_sentinel_costs_a_timeout(topo_quick, mute, tmp_path):
    w = Worker(tmp_path / "w", topo_quick.primary, redis__timeout="1s")
    w.conf.write_text(w.conf.read_text().replace(
        "redis = %s" % topo_quick.primary.address,
        "redis = sentinel://127.0.0.1:%d,%s/%s"
        % (mute.port, topo_quick.sentinel_list, MASTER)))
    h = NOW_HOUR - 2 * 3600
    kh = put(topo_quick.primary, "hang-1", h, {"calls|%s.1" % EPOCH: 5})
    t0 = time.monotonic()
    r = w.once(h + 3600, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert w.lines() == [line(kh, None, "calls", h, 5)]
    assert mute.got and b"get-master-addr-by-name" in mute.got[0][1]
    # at least the one timeout (the connect, then every pass's Sentinel
    # check, each asks the mute one first)
    assert took >= 1.0
    print("--once took %.2f s with a hung first Sentinel" % took)
