#!/usr/bin/python3
"""Instructions per request of the metering request path, under callgrind.

nginx in one process (master_process off; daemon off;) under
valgrind --tool=callgrind, one keep-alive connection, W warm-up requests,
`callgrind_control --zero`, N measured requests, `callgrind_control --dump`:
the dump holds the measured window only.  Keys are deterministic: request i
sends mk_cost_%07d_4f9c2a7e of (i mod K) + 1, K = 10,000 keys.

Configurations (each run R times; callgrind counts, so repeats agree):

  plain           location /api { return 200; }, no module
  metered         + meter_zone $http_x_api_key, meter zone=api calls;
                  meter_redis at a port nothing listens on: the request
                  path only, nothing flushed
  static          location /api serves a file (return skips the access
                  phase, so the gate needs a real content phase), no module
  metered-static  static + metering, Redis unreachable
  gov             metered-static + meter_governance at server level, the
                  state of K keys (10 per customer) loaded from a
                  redis-server before the window; flush and refresh every
                  hour, so neither runs inside the window
  unique          metered + meter zone=api users unique=$http_x_user, the
                  user of key i "u-<i>": every (key, user) is seen in the
                  warm-up (at least K requests then), so each request of
                  the window finds its member in the dedupe table
  unique-new      the same, a new user every request: each one claims an
                  entry (64m zones for both: the table is 1/16 of it,
                  40,280 entries, less than half full at the end)

Reports instructions per request, the differences (metered - plain, gov -
static, gov - metered-static) and the functions whose own (exclusive)
instructions grow most, plus the module's functions inclusive.  KEEP=1
keeps the temp dir (the dumps, for callgrind_annotate).  See
bench/README.md ("Request path")."""

import argparse
import hashlib
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
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "t"))

from conftest import (MODULE_SO, NGINX, RedisServer,  # noqa: E402
                      free_port, wait_for)
from nginx_conf import head  # noqa: E402

CONFIGS = ("plain", "metered", "static", "metered-static", "gov", "unique",
           "unique-new")

CONF = """\
{head}
    keepalive_requests 1000000;
    default_type text/plain;
    {http}
    server {{
        listen 127.0.0.1:{port};
        {server}
        location = /api {{
            {loc}
            {content}
        }}
    }}
}}
"""


def key(i):
    """The i-th bench key (1-based), as bench/cost.py builds it."""
    return "mk_cost_%07d_4f9c2a7e" % i


def user(name, i, a):
    """The X-User of request i: none, the key's own user, or a new one."""
    if name == "unique":
        return "u-%d" % (i % a.keys + 1)
    if name == "unique-new":
        return "n-%d" % i
    return None


def seed_gov(redis, n):
    """mtr:gov holding keys 1..n, active, 10 keys per customer
    (docs/redis-schema.md: CUSTOMER \\t STATUS \\t REASON \\t SINCE \\t
    REVOKED), and its version."""
    redis.cmd("DEL", "mtr:gov")
    for lo in range(1, n + 1, 1000):
        args = []
        for i in range(lo, min(lo + 1000, n + 1)):
            args += [hashlib.sha256(key(i).encode()).hexdigest(),
                     "c%07d\ta\t\t0\t0" % ((i - 1) // 10)]
        redis.cmd("HSET", "mtr:gov", *args)
    redis.cmd("INCR", "mtr:gov:version")
    if int(redis.cmd("HLEN", "mtr:gov")) != n:
        raise SystemExit("mtr:gov does not hold %d keys" % n)


class KeepAlive:
    """One HTTP/1.1 keep-alive connection, one request after another."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.req = b"GET /api HTTP/1.1\r\nHost: bench\r\nX-Api-Key: %s\r\n\r\n"
        self.ureq = (b"GET /api HTTP/1.1\r\nHost: bench\r\nX-Api-Key: %s"
                     b"\r\nX-User: %s\r\n\r\n")

    def get(self, k, user=None):
        if user is None:
            self.s.sendall(self.req % k.encode())
        else:
            self.s.sendall(self.ureq % (k.encode(), user.encode()))
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(self.buf) < n:
            self._more()
        self.buf = self.buf[n:]
        return int(head.split(b" ", 2)[1])

    def _more(self):
        b = self.s.recv(65536)
        if not b:
            raise ConnectionError("nginx closed the connection")
        self.buf += b

    def close(self):
        self.s.close()


LINE = re.compile(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+(\S+?):(\S+)"
                  r"(?: \[(.*)\])?\s*$")
TOTAL = re.compile(r"^\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?PROGRAM TOTALS")


def annotate(path, inclusive):
    """{function [object]: Ir} and the total, from callgrind_annotate's
    function table (no source annotation)."""
    r = subprocess.run(["callgrind_annotate", "--threshold=100",
                        "--auto=no",
                        "--inclusive=%s" % ("yes" if inclusive else "no"),
                        str(path)],
                       capture_output=True, text=True, timeout=600)
    total = None
    funcs = {}
    table = False
    for line in r.stdout.splitlines():
        m = TOTAL.match(line)
        if m:
            total = int(m.group(1).replace(",", ""))
            continue
        if line.rstrip().endswith("file:function"):
            table = True
            continue
        m = LINE.match(line)
        if table and m:
            obj = (m.group(4) or "").rsplit("/", 1)[-1]
            fn = "%s [%s]" % (m.group(3), obj) if m.group(3).startswith(
                "0x") else m.group(3)
            ir = int(m.group(1).replace(",", ""))
            # a function inlined elsewhere is listed once per file: its own
            # costs add up, its inclusive ones overlap
            funcs[fn] = (max(funcs.get(fn, 0), ir) if inclusive
                         else funcs.get(fn, 0) + ir)
    if total is None:
        raise SystemExit("callgrind_annotate %s:\n%s" % (path, r.stderr))
    return total, funcs


def run(a, tmp, name, redis):
    """One nginx under callgrind; returns (Ir, exclusive, inclusive) of
    the measured window."""
    d = tmp / ("cg-%s" % name)
    shutil.rmtree(d, ignore_errors=True)
    (d / "www").mkdir(parents=True)
    (d / "www" / "api").write_text("ok\n")
    port = free_port()
    metered = name not in ("plain", "static")
    http = server = loc = ""
    if name in ("plain", "metered", "unique", "unique-new"):
        content = 'return 200 "ok\\n";'
    else:
        content = "root %s/www;" % d
    if metered:
        gov = name == "gov"
        # the window holds the request path only; reconnects wait for a
        # flush tick (ngx_http_meter_flush.c), so the one connect must
        # outlast valgrind's slow start on a loaded machine
        http = ("meter_zone $http_x_api_key zone=api:%s;\n"
                % ("64m" if name.startswith("unique") else "16m")
                + "    meter_redis 127.0.0.1:%d timeout=30s;\n"
                "    meter_flush_interval 1h;\n"
                % (redis.port if gov else free_port()))
        loc = "meter zone=api calls;"
        if name.startswith("unique"):
            loc += "\n            meter zone=api users unique=$http_x_user;"
        if gov:
            http += ("    meter_governance_size 16m;\n"
                     "    meter_governance_refresh 1h;\n")
            server = "meter_governance zone=api unknown_key=401;"
    (d / "nginx.conf").write_text(CONF.format(
        head=head(d, 64, module=a.module if metered else None),
        http=http, server=server, loc=loc, content=content,
        port=port))
    out = d / "callgrind.out"
    log = open(d / "valgrind.log", "wb")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s" % out,
         NGINX, "-p", "%s/" % d, "-c", "nginx.conf", "-e",
         str(d / "error.log"), "-g", "pid %s/nginx.pid;" % d],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        def up():
            if proc.poll() is not None:
                raise SystemExit("nginx under valgrind exited:\n"
                                 + (d / "valgrind.log").read_text()
                                 + (d / "error.log").read_text())
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return True
            except OSError:
                return False
        wait_for(up, 120, 0.2, "nginx under callgrind")
        c = KeepAlive(port)
        if name == "gov":
            # 401 for a key not in the state: the state is loaded
            wait_for(lambda: c.get("mk_cost_unknown") == 401, 120, 0.5,
                     "governance state under callgrind")
        # unique: every (key, user) of the window is seen in the warm-up
        warmup = max(a.warmup, a.keys) if name == "unique" else a.warmup
        for i in range(warmup):
            if c.get(key(i % a.keys + 1), user(name, i, a)) != 200:
                raise SystemExit("%s: warm-up request %d refused"
                                 % (name, i))
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)],
                       check=True, capture_output=True, timeout=120)
        for i in range(warmup, warmup + a.requests):
            if c.get(key(i % a.keys + 1), user(name, i, a)) != 200:
                raise SystemExit("%s: request %d refused" % (name, i))
        subprocess.run(["callgrind_control", "--dump=window",
                        str(proc.pid)], check=True, capture_output=True,
                       timeout=120)
        c.close()
        dumps = wait_for(lambda: sorted(d.glob("callgrind.out.*")), 60,
                         0.2, "the callgrind dump")
        total, excl = annotate(dumps[-1], False)
        _, incl = annotate(dumps[-1], True)
        return total, excl, incl
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def grown(base, other, n, top):
    """The functions whose own instructions per request grow most."""
    # callgrind_annotate lists the program's entry points with everything
    fns = {f for f in set(base) | set(other)
           if f not in ("(below main)", "main", "__libc_start_main@@GLIBC_2.34")
           and "ld-linux" not in f}
    d = sorted(((other.get(f, 0) - base.get(f, 0)) / n, f) for f in fns)
    return [(round(x, 1), f) for x, f in reversed(d) if abs(x) >= 0.5][:top]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--module", default=str(MODULE_SO),
                    help="the module to load (another build: before/after)")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind missing: apt-get install valgrind")
    names = a.configs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="cg-reqpath-"))
    redis = RedisServer(tmp / "redis").start()
    n = a.requests
    runs = {}
    try:
        seed_gov(redis, a.keys)
        print("callgrind: %d warm-up + %d measured keep-alive requests, "
              "%d keys" % (a.warmup, n, a.keys), flush=True)
        for rep in range(a.rounds):
            for name in names:
                t0 = time.monotonic()
                r = run(a, tmp, name, redis)
                runs.setdefault(name, []).append(r)
                print("  round %d %-15s %11d Ir %9.1f / request  (%.0fs)"
                      % (rep + 1, name, r[0], r[0] / n,
                         time.monotonic() - t0), flush=True)
    finally:
        redis.stop()
        if not os.environ.get("KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)

    per = {k: [t / n for t, _, _ in v] for k, v in runs.items()}
    out = {"requests": n, "warmup": a.warmup, "keys": a.keys,
           "per_request": per, "diff": {}, "grown": {}, "module": {}}
    print("\ninstructions per request (rounds; spread)")
    for k, v in per.items():
        print("  %-15s %s  %.3f %%" % (k, "  ".join("%9.1f" % x for x in v),
                                       (max(v) - min(v)) / min(v) * 100))
    pairs = (("metered", "plain"), ("metered-static", "static"),
             ("gov", "static"), ("gov", "metered-static"),
             ("unique", "metered"), ("unique-new", "metered"))
    for hi, lo in pairs:
        if hi in per and lo in per:
            x = min(per[hi]) - min(per[lo])
            out["diff"]["%s - %s" % (hi, lo)] = round(x, 1)
            print("  %-30s %+9.1f / request" % ("%s - %s" % (hi, lo), x))
    for hi, lo in pairs[:1] + pairs[2:3] + pairs[4:]:
        if hi in runs and lo in runs:
            g = grown(runs[lo][0][1], runs[hi][0][1], n, a.top)
            out["grown"]["%s - %s" % (hi, lo)] = g
            print("\n  own instructions per request, %s - %s" % (hi, lo))
            for x, f in g:
                print("    %+9.1f  %s" % (x, f))
    for k in names:
        if k in ("plain", "static"):
            continue
        incl = runs[k][0][2]
        mod = sorted(((v / n, f) for f, v in incl.items()
                      if re.match(r"(ngx_http_meter_|meter_)", f)),
                     reverse=True)
        out["module"][k] = [(round(x, 1), f) for x, f in mod[:a.top]]
        print("\n  module functions, %s (inclusive, per request)" % k)
        for x, f in mod[:a.top]:
            print("    %9.1f  %s" % (x, f))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
