#!/usr/bin/python3
"""What a governance refresh costs the worker that runs it (issue 12).

Not a pass/fail test: it prints figures.  For each size (--keys, default
100k and 1M registered keys, 10 keys a customer), one nginx worker with a
gate, meter_governance_refresh 1s, a redis-server; mtr:gov seeded through
redis-cli --pipe, and --credit customers given prepaid credit.  Cases:

  nothing    nothing changes between refreshes
  gov        one customer of mtr:gov changes (its 10 keys: delinquent, then
             active again), mtr:gov:version moves and mtr:gov:log lists the
             10 fields, as meterctl writes it, once a second
  gov-nolog  the same without the log entry (a writer before the log):
             every change reads all of mtr:gov
  used       the usage of one credit customer's key moves (HINCRBY on
             mtr:used, as another node's flush would), once a second

Per case:
  cpu        the worker's CPU (utime + stime, /proc/PID/stat) per refresh,
             over --idle seconds with no client
  hold       the module's own account of the refresh, from its debug_core
             log lines (an nginx built --with-debug, as Debian's is): the
             longest stretch the refresh held the event loop, wall and CPU
             time (CPU leaves out the preemption of a shared machine), the
             CPU of all its slices, and the slices over 1 ms by phase
             (from>to phase:count:max CPU us; phases are
             numbered in ngx_http_meter_gov_refresh.c); absent before the sliced refresh
  client     the latency of a keep-alive client looping on the refreshing
             worker for --loop seconds: the max per refresh period (median
             and max over the periods) and the p50

The first load (start to the first published copy) is printed too.
MODULE_SO=path/to/ngx_http_meter_module.so runs another build of the
module.  Only 127.0.0.1, every server in a temp dir on free ports."""

import argparse
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "t"))

import conftest  # noqa: E402
from conftest import Nginx, RedisServer, wait_for  # noqa: E402

if os.environ.get("MODULE_SO"):
    # another build, e.g. the one before a change, for a before/after run
    conftest.MODULE_SO = Path(os.environ["MODULE_SO"]).resolve()

TICK = os.sysconf("SC_CLK_TCK")
REFRESH = 1.0

CONF = r"""
    keepalive_requests 10000000;
    meter_zone $http_x_api_key zone=api:8m;
    meter_redis @REDIS@;
    meter_governance_size @GOVSIZE@;
    meter_governance_refresh 1s;
    server {
        listen 127.0.0.1:@PORT@;
        access_log off;
        meter zone=api calls;
        meter_governance zone=api unknown_key=401;
        location / { return 200 "ok\n"; }
    }
    server {
        listen 127.0.0.1:@PORT2@;
        access_log off;
        location = /status { meter_status json; }
        location = /ping { return 200 "ok\n"; }
    }
"""

MAIN = "error_log @TMP@/debug.log debug_core;"


def key(i):
    return "mk_gov_%07d_8e1d" % i


def khash(i):
    return hashlib.sha256(key(i).encode()).hexdigest()


def cust(i):
    return "c%07d" % ((i - 1) // 10)


def gov_value(i, status="a", reason=""):
    """docs/redis-schema.md mtr:gov: CUSTOMER TAB STATUS TAB REASON TAB
    SINCE TAB REVOKED."""
    return "%s\t%s\t%s\t0\t0" % (cust(i), status, reason)


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def seed(redis, tmp, n, ncredit):
    """mtr:gov with keys 1..n; the first ncredit customers get 10^9 units
    of "calls" and 1 unit used on each of their keys."""
    path = tmp / "seed.resp"
    ncmd = 0
    with open(path, "wb") as f:
        for lo in range(1, n + 1, 1000):
            args = ["HSET", "mtr:gov"]
            for i in range(lo, min(lo + 1000, n + 1)):
                args += [khash(i), gov_value(i)]
            f.write(resp(*args))
            ncmd += 1
        for c in range(ncredit):
            f.write(resp("HSET", "mtr:gov:credit", "c%07d|calls" % c,
                         "1000000000"))
            ncmd += 1
            for i in range(c * 10 + 1, c * 10 + 11):
                f.write(resp("HSET", "mtr:used:{%s}" % khash(i), "calls",
                             "1"))
                ncmd += 1
        f.write(resp("INCR", "mtr:gov:version"))
        ncmd += 1
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-h", redis.host, "-p",
                            str(redis.port), "--pipe"], stdin=f,
                           capture_output=True, text=True, timeout=600)
    path.unlink()
    if r.returncode != 0 or "errors: 0, replies: %d" % ncmd not in r.stdout:
        raise SystemExit("seeding failed:\n" + r.stdout + r.stderr)
    assert int(redis.cmd("HLEN", "mtr:gov")) == n


def gov_size(nkeys):
    """README meter_governance_size: two copies of 40 bytes a key slot
    (a power of two, at least twice the keys) and 400 a customer."""
    slots = 16
    while slots < 2 * nkeys:
        slots *= 2
    copy = slots * 40 + (nkeys // 10 + 1) * 400
    return "%dm" % (2 * copy // (1 << 20) + 16)


def status(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["zones"][0]


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


class KeepAlive:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, path="/ping"):
        self.s.sendall(b"GET %s HTTP/1.1\r\nHost: b\r\n\r\n" % path.encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(self.buf) < n:
            self.buf += self.s.recv(65536)
        self.buf = self.buf[n:]

    def close(self):
        self.s.close()


class Changer:
    """Makes the case's change once a second, in a thread."""

    def __init__(self, redis, case, ncredit):
        self.redis, self.case, self.ncredit = redis, case, ncredit
        self.stop = threading.Event()
        self.t = None

    def _one(self, j):
        if self.case == "gov":
            # customer 0's ten keys, as meterctl rewrites a customer's keys
            st = ("d", "invoice_overdue") if j % 2 == 0 else ("a", "")
            args = ["HSET", "mtr:gov"]
            for i in range(1, 11):
                args += [khash(i), gov_value(i, *st)]
            self.redis.cmd(*args)
            v = int(self.redis.cmd("INCR", "mtr:gov:version"))
            self.redis.cmd("ZADD", "mtr:gov:log", str(v), " ".join(
                [str(v)] + [khash(i) for i in range(1, 11)]))
        elif self.case == "gov-nolog":
            st = ("d", "invoice_overdue") if j % 2 == 0 else ("a", "")
            args = ["HSET", "mtr:gov"]
            for i in range(1, 11):
                args += [khash(i), gov_value(i, *st)]
            self.redis.cmd(*args)
            self.redis.cmd("INCR", "mtr:gov:version")
        elif self.case == "used":
            self.redis.cmd("HINCRBY", "mtr:used:{%s}" % khash(1), "calls", 1)

    def __enter__(self):
        if self.case != "nothing":
            def run():
                j = 0
                while not self.stop.wait(REFRESH):
                    self._one(j)
                    j += 1
            self.t = threading.Thread(target=run, daemon=True)
            self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.t:
            self.t.join()


HOLD = re.compile(r"governance refresh: (keys=.*)$")


def holds(log, since):
    """The refreshes the module logged after offset since: their fields."""
    out = []
    with open(log, "rb") as f:
        f.seek(since)
        for line in f.read().decode(errors="replace").splitlines():
            m = HOLD.search(line)
            if m:
                out.append(dict(kv.split("=", 1) for kv in m.group(1).split()
                                if "=" in kv))
    return out


SLOW = re.compile(r"a slice of phase (\d+) held (\d+) us \((\d+) us CPU\), "
                  r"from phase (\d+)")


def slow_slices(log, since):
    """Slices over 1 ms of wall time, by phases (the one a slice began in
    and the one it ended in): "from>to:count:max CPU us"."""
    per = {}
    cpu_over = 0
    with open(log, "rb") as f:
        f.seek(since)
        for m in SLOW.finditer(f.read().decode(errors="replace")):
            k = "%s>%s" % (m.group(4), m.group(1))
            n, cpu = per.get(k, (0, 0))
            per[k] = (n + 1, max(cpu, int(m.group(3))))
            cpu_over += int(m.group(3)) > 1000
    return (",".join("%s:%d:%d" % (k, n, c)
                     for k, (n, c) in sorted(per.items())), cpu_over)


def run_case(a, n, redis, case, worker):
    log = n.tmp / "debug.log"
    res = {}
    with Changer(redis, case, a.credit):
        # two refreshes under the case's change: the one running when it
        # began (a rebuild of 1M keys takes seconds) is not measured
        off = log.stat().st_size if log.exists() else 0
        if off and holds(log, 0):
            wait_for(lambda: len(holds(log, off)) >= 2, 120, 0.1,
                     "two refreshes")
        else:
            time.sleep(REFRESH * 3)
        off = log.stat().st_size if log.exists() else 0
        t0, c0 = time.monotonic(), cpu_ticks(worker)
        time.sleep(a.idle)
        t1, c1 = time.monotonic(), cpu_ticks(worker)
        refreshes = (t1 - t0) / REFRESH
        res["cpu_ms_per_refresh"] = (c1 - c0) * 1000.0 / TICK / refreshes
        h = holds(log, off) if log.exists() else []
        if h:
            res["logged"] = len(h)
            res["rebuilt"] = sum(1 for x in h if x.get("rebuilt") != "none")
            res["hold_us_max"] = max(int(x["longest_us"]) for x in h)
            if "longest_cpu_us" in h[0]:
                res["hold_cpu_us_max"] = max(int(x["longest_cpu_us"])
                                             for x in h)
            res["slices_cpu_us_median"] = statistics.median(
                int(x["total_us"]) for x in h)
            res["slices_max"] = max(int(x["slices"]) for x in h)
            slow, cpu_over = slow_slices(log, off)
            res["slices_over_1ms_cpu"] = cpu_over
            if slow:
                res["slow_slices"] = slow
        samples = []
        c = KeepAlive(n.port2)
        end = time.monotonic() + a.loop
        while True:
            s = time.monotonic()
            if s > end:
                break
            c.get()
            samples.append((s, time.monotonic() - s))
        c.close()
    per = {}
    for s, lat in samples:
        b = int((s - samples[0][0]) / REFRESH)
        per[b] = max(per.get(b, 0), lat)
    maxima = [per[b] for b in sorted(per)[:-1]] or list(per.values())
    lats = sorted(x for _, x in samples)
    res["client_period_max_ms_median"] = statistics.median(maxima) * 1e3
    res["client_max_ms"] = lats[-1] * 1e3
    res["client_p50_us"] = lats[len(lats) // 2] * 1e6
    res["requests"] = len(lats)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, nargs="+", default=[100000, 1000000])
    p.add_argument("--credit", type=int, default=1000,
                   help="customers with prepaid credit (10 keys each)")
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--loop", type=float, default=10.0)
    p.add_argument("--cases", nargs="+",
                   default=["nothing", "gov", "gov-nolog", "used"])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--keep", help="run in this directory and keep it")
    a = p.parse_args()

    out = {}
    with tempfile.TemporaryDirectory(prefix="gov-refresh-") as d:
        # --keep DIR: the logs stay there for a look
        tmp = Path(a.keep or d)
        redis = RedisServer(tmp / "redis")
        redis.start()
        try:
            for nkeys in a.keys:
                redis.cmd("FLUSHALL")
                seed(redis, tmp, nkeys, min(a.credit, nkeys // 10))
                n = Nginx(tmp / ("n%d" % nkeys), CONF, workers=1,
                          main_conf=MAIN, redis=redis.address,
                          govsize=gov_size(nkeys))
                t0 = time.monotonic()
                n.start()
                try:
                    wait_for(lambda: status(n.port2)["gov_refreshed"] > 0,
                             600, 0.02, "first governance load")
                    first = time.monotonic() - t0
                    worker = sorted(n.worker_pids())[0]
                    r = {"first_load_s": first, "gov_size": gov_size(nkeys)}
                    # the first load's own account: its longest slice
                    h = holds(n.tmp / "debug.log", 0)
                    if h and "longest_cpu_us" in h[0]:
                        r["first_load_longest_cpu_us"] = int(
                            h[0]["longest_cpu_us"])
                        r["first_load_slices"] = int(h[0]["slices"])
                        r["first_load_cpu_us"] = int(h[0]["total_us"])
                    print("\n== %d keys, %d customers (%d with credit), "
                          "meter_governance_size %s: first load %.2f s %s"
                          % (nkeys, nkeys // 10, min(a.credit, nkeys // 10),
                             r["gov_size"], first, " ".join(
                                 "%s=%s" % (k[11:], v) for k, v in r.items()
                                 if k.startswith("first_load_") and
                                 k != "first_load_s")), flush=True)
                    for case in a.cases:
                        r[case] = run_case(a, n, redis, case, worker)
                        print("  %-8s %s" % (case, " ".join(
                            "%s=%s" % (k, round(v, 2)
                                       if isinstance(v, float) else v)
                            for k, v in r[case].items())), flush=True)
                    out[nkeys] = r
                finally:
                    n.stop(timeout=120)
        finally:
            redis.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
