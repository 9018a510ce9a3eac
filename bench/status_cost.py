#!/usr/bin/python3
"""What one meter_status request costs nginx's event loop with 1M keys.

nginx in one process (master_process off; daemon off;), a zone sized for
2 x KEYS counters (README "Sizing", as bench/cost.py), meter_redis at a port
nothing listens on (nothing flushes: every unit stays pending).  wrk fills
the zone with KEYS distinct keys (key i of 1..KEYS in turn), then R status
requests (json, then prometheus) go one after another over one keep-alive
connection; the time from sending a request to its last byte, on loopback,
is the event loop's time for it (one process: nothing else runs meanwhile).
Reports the median and p99 in ms, and checks keys == pending == KEYS.

    bench/status_cost.py [--keys 1000000] [--requests 200] [--module SO]

See bench/README.md ("meter_status")."""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "t"))

from conftest import MODULE_SO, NGINX, free_port, wait_for  # noqa: E402
from nginx_conf import head  # noqa: E402

CONF = """\
{head}
    keepalive_requests 10000000;
    default_type text/plain;
    meter_zone $http_x_api_key zone=api:{size}m;
    meter_redis 127.0.0.1:{dead};
    server {{
        listen 127.0.0.1:{port};
        location = /api {{ meter zone=api calls; return 200; }}
        location = /json {{ meter_status json; }}
        location = /prom {{ meter_status prometheus; }}
    }}
}}
"""

LUA = """\
-- key i of 1..N exactly once over all connections (wrk -t1)
local n, i = tonumber(os.getenv("BENCH_KEYS")), 0
request = function()
    i = i + 1
    if i > n then i = 1 end
    return wrk.format("GET", "/api",
        { ["X-Api-Key"] = string.format("mk_status_%07d_4f9c2a7e", i) })
end
"""


class KeepAlive:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, path):
        self.s.sendall(b"GET %s HTTP/1.1\r\nHost: b\r\n\r\n" % path.encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(1 << 20)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(self.buf) < n:
            self.buf += self.s.recv(1 << 20)
        body, self.buf = self.buf[:n], self.buf[n:]
        return body


def fill(port, keys):
    """Sends requests until the zone holds every key (wrk, then checks)."""
    lua = Path(tempfile.mkdtemp()) / "status.lua"
    lua.write_text(LUA)
    env = dict(os.environ, BENCH_KEYS=str(keys))
    c = KeepAlive(port)
    for _ in range(20):
        z = json.loads(c.get("/json"))["zones"][0]
        if z["keys"] >= keys:
            break
        secs = max(2, (keys - z["keys"]) // 15000 + 1)
        subprocess.run(["wrk", "-t1", "-c16", "-d%ds" % secs, "-s", str(lua),
                        "http://127.0.0.1:%d" % port],
                       capture_output=True, timeout=secs + 60, env=env,
                       check=True)
    shutil.rmtree(lua.parent)
    return json.loads(c.get("/json"))["zones"][0]


def measure(port, path, n):
    c = KeepAlive(port)
    for _ in range(5):
        c.get(path)
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.get(path)
        ms.append((time.perf_counter() - t0) * 1000)
    ms.sort()
    return statistics.median(ms), ms[int(len(ms) * 0.99) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1000000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--module", default=str(MODULE_SO))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="status-cost-"))
    port = free_port()
    conf = CONF.format(head=head(tmp, 256, module=a.module), port=port,
                       dead=free_port(),
                       size=max(8, a.keys * 2 * 110 // (1 << 20) + 1))
    (tmp / "nginx.conf").write_text(conf)
    p = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                          "-e", str(tmp / "error.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _open(port), 30)
        z = fill(port, a.keys)
        if z["keys"] != a.keys or z["pending"] < z["keys"] or z["dropped"]:
            raise SystemExit("zone not filled as expected: %r" % z)
        print("zone: %d slots, %d keys, %d pending" %
              (z["slots"], z["keys"], z["pending"]))
        for path in ("/json", "/prom"):
            med, p99 = measure(port, path, a.requests)
            print("%-5s median %.3f ms  p99 %.3f ms  (%d requests)"
                  % (path[1:], med, p99, a.requests))
    finally:
        p.terminate()
        p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def _open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
