#!/usr/bin/python3
"""What one flushed counter (key, hour, meter) costs Redis and nginx.
Not a pass/fail test: it prints figures.  See bench/README.md ("flush").

  redis      1 nginx worker (`return 200`, meter_flush_interval 1s), keys
             sent over pipelined keep-alive connections:
               hot   10k keys, each once per round, R rounds, every round
                     flushed before the next (so each round flushes exactly
                     10k counters that Redis already holds);
               tail  N distinct keys, each once (N new counters).
             Redis CPU from /proc/PID/stat over the window (idle rate
             subtracted) and INFO commandstats, divided by the counters.
  callgrind  nginx in one process under valgrind --tool=callgrind, the
             same sequence of K distinct keys with Redis up and with Redis
             unreachable: (up - down) / K is what the flush costs nginx per
             counter (formatting, sending, replies, confirming).

--module picks the .so (e.g. one built from an older commit) so that
before and after run the same script.  Only 127.0.0.1, temp dirs, free
ports."""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "t"))

import conftest  # noqa: E402
from conftest import NGINX, Nginx, RedisServer, free_port, wait_for  # noqa

TICK = os.sysconf("SC_CLK_TCK")

CONF = r"""
    access_log off;
    meter_zone $http_x_api_key zone=api:%(zone)s;
    meter_redis @REDIS@;
    meter_flush_interval 1s;
    server {
        listen 127.0.0.1:@PORT@;
        keepalive_requests 1000000;
        location / { meter zone=api calls; return 200 "ok\n"; }
    }
    server {
        listen 127.0.0.1:@PORT2@;
        location = /status { meter_status json; }
    }
"""


def zone_size(nkeys):
    return "%dm" % max(8, nkeys * 2 * 110 // (1 << 20) + 1)


def request(i, tag):
    return (b"GET / HTTP/1.1\r\nHost: b\r\nX-Api-Key: mk_%s_%08d\r\n\r\n"
            % (tag.encode(), i))


def send(port, lo, hi, tag, conns=4, depth=200):
    """Requests lo..hi-1 over `conns` pipelined keep-alive connections."""
    socks = [socket.create_connection(("127.0.0.1", port))
             for _ in range(conns)]
    i = lo
    while i < hi:
        batch = []
        for s in socks:
            n = min(depth, hi - i)
            if n <= 0:
                break
            s.sendall(b"".join(request(j, tag) for j in range(i, i + n)))
            batch.append((s, n))
            i += n
        for s, n in batch:
            got, buf = 0, b""
            while got < n:
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise SystemExit("nginx closed the connection")
                buf += chunk
                got = buf.count(b"HTTP/1.1 ")
            if buf.count(b"HTTP/1.1 200") != n:
                raise SystemExit("not every response was 200")
    for s in socks:
        s.close()


def status(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
    buf = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        buf += c
    s.close()
    return json.loads(buf.split(b"\r\n\r\n", 1)[1])["zones"][0]


def ticks(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def commandstats(redis):
    out = {}
    for line in redis.cmd("INFO", "commandstats").decode().splitlines():
        m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def settle(n):
    wait_for(lambda: status(n.port2)["pending"] == 0, 600, 0.2)


def redis_part(a, tmp):
    rows = []
    for name, nkeys, rounds in (("hot", a.hot, a.rounds),
                                ("tail", a.tail, 1)):
        if nkeys == 0:
            continue
        redis = RedisServer(tmp / ("redis-" + name))
        redis.start()
        n = Nginx(tmp / ("nginx-" + name), CONF % {"zone": zone_size(nkeys)},
                  workers=1, redis=redis.address).start()
        rpid = redis.proc.pid
        try:
            # warm-up: the connection, the script, the hour's index
            send(n.port, 0, 100, "warm")
            settle(n)
            time.sleep(2)
            t0, i0 = ticks(rpid), time.monotonic()
            time.sleep(3)
            idle = (ticks(rpid) - t0) / (time.monotonic() - i0)

            c0, t0, w0 = commandstats(redis), ticks(rpid), time.monotonic()
            for r in range(rounds):
                send(n.port, 0, nkeys, name)
                settle(n)
            wall = time.monotonic() - w0
            c1, t1 = commandstats(redis), ticks(rpid)
        finally:
            n.stop()
            redis.stop("kill")
        counters = nkeys * rounds
        cpu_us = ((t1 - t0) - idle * wall) / TICK * 1e6
        cs = {k: (c1[k][0] - c0.get(k, (0, 0))[0],
                  c1[k][1] - c0.get(k, (0, 0))[1]) for k in c1}
        cs = {k: v for k, v in cs.items() if v[0] and k not in ("info",)}
        usec = sum(v[1] for v in cs.values())
        rows.append((name, counters, cpu_us / counters, usec / counters, cs))
        print("%-4s %8d counters  redis CPU %.2f us/counter  "
              "commandstats %.2f us/counter  %s" % (
                  name, counters, cpu_us / counters, usec / counters,
                  " ".join("%s=%d/%dus" % (k, v[0], v[1])
                           for k, v in sorted(cs.items()))), flush=True)
    return rows


def callgrind_run(tmp, k, redis_up):
    redis = RedisServer(tmp / "redis")
    redis.start()
    addr = redis.address if redis_up else "127.0.0.1:%d" % free_port()
    n = Nginx(tmp, CONF % {"zone": zone_size(k)}, workers=1, redis=addr)
    conf = tmp / "nginx.conf"
    conf.write_text(conf.read_text().replace("master_process on;",
                                             "master_process off;"))
    out = tmp / "callgrind.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s" % out,
         NGINX] + n._args(), stdout=subprocess.DEVNULL,
        stderr=open(tmp / "valgrind.log", "wb"))
    try:
        wait_for(lambda: conftest.port_open(n.port), 600, 0.2)
        send(n.port, 0, k, "cg", conns=1, depth=100)
        if redis_up:
            wait_for(lambda: status(n.port2)["pending"] == 0, 300, 0.5)
        else:
            time.sleep(3)
        status(n.port2)
    finally:
        proc.send_signal(15)
        proc.wait(300)
        redis.stop("kill")
    total = 0
    for line in out.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            total = int(line.split()[1])
    return total


def callgrind_part(a, tmp):
    up = callgrind_run(tmp / "up", a.k, True)
    down = callgrind_run(tmp / "down", a.k, False)
    print("callgrind: %d counters, redis up %d Ir, unreachable %d Ir: "
          "%.0f instructions per flushed counter"
          % (a.k, up, down, (up - down) / a.k), flush=True)
    return (up - down) / a.k


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="redis,callgrind")
    p.add_argument("--module", help="the .so to load (default: build/)")
    p.add_argument("--hot", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tail", type=int, default=1000000)
    p.add_argument("--k", type=int, default=20000)
    a = p.parse_args()
    if a.module:
        conftest.MODULE_SO = Path(a.module).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="bench-flush-"))
    os.chmod(tmp, 0o755)
    try:
        print("module %s" % conftest.MODULE_SO, flush=True)
        if "redis" in a.parts:
            redis_part(a, tmp)
        if "callgrind" in a.parts:
            callgrind_part(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
