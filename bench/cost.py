#!/usr/bin/python3
"""What metering costs, as CPU per request and instructions per request.
Not a pass/fail test: it prints figures (and checks that each run did what
it claims: every response 200, every request flushed, the gate holding the
whole state).  See bench/README.md ("cost").

Three parts (--parts, default all):

  load       wrk against plain nginx, metered, metered + governance (gate at
             server level) and metered + governance (gate at location
             level), each proxying to a keepalive upstream (another nginx,
             `return 200`, whose CPU is not counted), 1 nginx worker, key
             sets of 10k hot and 200k / 1M long-tail keys picked at random
             per request.  CPU of nginx (master + worker) and redis-server
             from /proc/PID/stat over the window (the requests and the flush
             of what they counted; no status request inside it), rps, p99,
             counters flushed (meter_status flushed_counters, both
             layouts), Redis CPU and INFO commandstats usec per flushed
             counter.  R rounds, configurations interleaved.
  callgrind  nginx in one process under valgrind --tool=callgrind: a fixed
             sequence of keep-alive requests after a warm-up, the window
             between `callgrind_control --zero` and `--dump`: instructions
             per request (plain, metered with Redis unreachable, metered with
             Redis, metered + governance), per flushed counter, and the top
             module functions.  Each configuration runs twice.
  stall      the governance refresh: a tight-loop client's latency on the
             refreshing worker while mtr:gov holds 100k / 1M keys, with
             nothing changed and with one change per refresh.

Only 127.0.0.1; every server in a temp dir on free ports."""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "t"))

from conftest import (MODULE_SO, NGINX, Nginx, RedisServer,  # noqa: E402
                      free_port, usage_fields, wait_for)
from nginx_conf import head  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 50


def key(i):
    """The i-th bench key (1-based), as cost.lua builds it."""
    return "mk_cost_%07d_4f9c2a7e" % i


def khash(i):
    return hashlib.sha256(key(i).encode()).hexdigest()


def gov_value(i, status="a", reason=""):
    """mtr:gov's value for key i (docs/redis-schema.md, as meterctl and
    t/integration/test_governance.py's Gov._project write it): 10 keys
    per customer."""
    return "c%07d\t%s\t%s\t0\t0" % ((i - 1) // 10, status, reason)


def gov_change(redis, i, status, reason):
    """Key i's governance state changed, as every writer does it
    (docs/redis-schema.md, mtr:gov:log): the field, the version, the log
    entry naming the field.  Without the entry the module reads all of
    mtr:gov, as after an old writer."""
    redis.cmd("HSET", "mtr:gov", khash(i), gov_value(i, status, reason))
    v = int(redis.cmd("INCR", "mtr:gov:version"))
    redis.cmd("ZADD", "mtr:gov:log", v, "%d %s" % (v, khash(i)))


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def seed_gov(redis, tmp, n):
    """mtr:gov holding keys 1..n, all active, and its version; fed through
    redis-cli --pipe (1M HSETs one by one would take minutes)."""
    path = tmp / "gov.resp"
    ncmd = 0
    with open(path, "wb") as f:
        f.write(resp("DEL", "mtr:gov"))
        ncmd += 1
        for lo in range(1, n + 1, 1000):
            args = ["HSET", "mtr:gov"]
            for i in range(lo, min(lo + 1000, n + 1)):
                args += [khash(i), gov_value(i)]
            f.write(resp(*args))
            ncmd += 1
        f.write(resp("INCR", "mtr:gov:version"))
        ncmd += 1
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-h", redis.host, "-p",
                            str(redis.port), "--pipe"], stdin=f,
                           capture_output=True, text=True, timeout=600)
    path.unlink()
    if r.returncode != 0 or "errors: 0, replies: %d" % ncmd not in r.stdout:
        raise SystemExit("seeding mtr:gov failed:\n" + r.stdout + r.stderr)
    if int(redis.cmd("HLEN", "mtr:gov")) != n:
        raise SystemExit("mtr:gov does not hold %d keys" % n)


# ---------------------------------------------------------------- /proc

def cpu_ticks(pids):
    """utime + stime of the processes (proc(5): fields 14 and 15; the
    thread group leader's line sums its threads)."""
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
        total += int(rest[11]) + int(rest[12])
    return total


def commandstats(redis):
    """{command: (calls, usec)} from INFO commandstats."""
    info = redis.cmd("INFO", "commandstats")
    info = info.decode() if isinstance(info, bytes) else info
    out = {}
    for line in info.splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def stats_delta(a, b):
    return {k: (v[0] - a.get(k, (0, 0))[0], v[1] - a.get(k, (0, 0))[1])
            for k, v in b.items() if v != a.get(k)}


# commands the flush sends: the writer layout's HSET (many fields) per
# hour and part and its index (SADD, ZADD) once per session and hour; the
# key layout's (credit) EVALSHA per counter.  The script's own HGET/HINCRBY/
# HSET are in EVALSHA's usec and counted again under their names (Redis 7),
# one HSET per script call: flush_usec takes that share out.
FLUSH_CMDS = ("hset", "evalsha", "sadd", "zadd")


def flush_usec(d):
    """Redis usec of the flush's commands (INFO commandstats delta d)."""
    total = sum(d.get(c, (0, 0))[1] for c in FLUSH_CMDS)
    hset, scripts = d.get("hset", (0, 0)), d.get("evalsha", (0, 0))[0]
    if scripts and hset[0]:
        total -= hset[1] * min(scripts, hset[0]) / hset[0]
    return total


def status(port):
    """The first zone of meter_status json."""
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        c.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
    finally:
        c.close()
    body = data.split(b"\r\n\r\n", 1)[1]
    return json.loads(body)["zones"][0]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- load

UPSTREAM = r"""
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:@PORT@;
        access_log off;
        location / { return 200 "{\"score\": 712}\n"; }
    }
"""

FRONT = r"""
    keepalive_requests 1000000;
    %(http)s
    upstream backend {
        server 127.0.0.1:@BACKEND@;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:@PORT@;
        access_log off;
        %(server)s
        location /api {
            %(loc)s
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    %(status)s
"""

STATUS = r"""
    server {
        listen 127.0.0.1:@PORT2@;
        access_log off;
        location = /status { meter_status json; }
    }
"""

GATE = "meter_governance zone=api unknown_key=401;"

CONFIGS = ("plain", "metered", "gov-server", "gov-location")


def zone_size(nkeys):
    """README "Sizing": 103 bytes a counter, keys x 2 hours (the bench's
    rounds touch at most the whole set within the hour)."""
    return "%dm" % max(8, (nkeys * 2 * 110) // (1 << 20) + 1)


def gov_size(nkeys):
    """README meter_governance_size: 40 bytes a key slot (a power of two,
    at least 2 slots a key), 400 a customer, two copies, slab slack."""
    slots = 16
    while slots < 2 * nkeys:
        slots *= 2
    copy = slots * 40 + (nkeys // 10 + 1) * 400 + 4096
    return "%dm" % max(8, (2 * copy * 11 // 10) // (1 << 20) + 2)


def front_conf(name, nkeys, flush_s=1.0):
    if name == "plain":
        return FRONT % {"http": "", "server": "", "loc": "", "status": ""}
    http = ("meter_zone $http_x_api_key zone=api:%s;\n"
            "    meter_redis @REDIS@;\n"
            "    meter_flush_interval %dms;\n"
            % (zone_size(nkeys), flush_s * 1000))
    if name.startswith("gov"):
        http += "    meter_governance_size %s;\n" % gov_size(nkeys)
    return FRONT % {
        "http": http,
        "server": GATE if name == "gov-server" else "",
        "loc": "meter zone=api calls;"
               + (" " + GATE if name == "gov-location" else ""),
        "status": STATUS}


def wrk(port, seconds, nkeys, seed, pace_ms=0):
    env = dict(os.environ, BENCH_KEYS=str(nkeys), BENCH_SEED=str(seed),
               BENCH_DELAY_MS=str(pace_ms))
    r = subprocess.run(
        ["wrk", "-t1", "-c%d" % CONNECTIONS, "-d%ds" % seconds,
         "--latency", "-s", str(HERE / "cost.lua"),
         "http://127.0.0.1:%d" % port],
        capture_output=True, text=True, timeout=seconds + 120, env=env)
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise SystemExit("wrk failed:\n" + r.stdout + r.stderr)
    return {k: float(v) for k, v in
            (kv.split("=") for kv in m.group(1).split())}


class Front:
    """One frontend nginx; paused (SIGSTOP) while the others run, so an
    idle one's timers (a governance refresh of 1M keys) take no CPU from
    the measured one."""

    def __init__(self, tmp, name, nkeys, redis, backend, flush_s=1.0):
        self.name = name
        self.metered = name != "plain"
        self.flush_s = flush_s
        self.n = Nginx(tmp / name, front_conf(name, nkeys, flush_s),
                       workers=1,
                       module=self.metered, redis=redis.address,
                       backend=backend.port)
        self.paused = False

    def pids(self):
        return [self.n.master_pid] + sorted(self.n.worker_pids())

    def pause(self):
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)
        self.paused = True

    def resume(self):
        for pid in self.pids():
            os.kill(pid, signal.SIGCONT)
        self.paused = False

    def stop(self):
        if self.paused:
            self.resume()
        self.n.stop()


def drain(front, timeout=120.0):
    """Until the zone holds nothing unconfirmed: the window then includes
    the flush of every request it counted."""
    if not front.metered:
        return None
    deadline = time.monotonic() + timeout
    while True:
        s = status(front.n.port2)
        if s["pending"] == 0:
            return s
        if time.monotonic() > deadline:
            raise SystemExit("%s: %d units still pending after %.0fs"
                             % (front.name, s["pending"], timeout))
        time.sleep(0.2)


def check_gate(front, nkeys):
    """The gate holds the whole state: a registered key passes, an unknown
    one is refused (a gate without state would pass or refuse both)."""
    import http.client

    def code(k):
        c = http.client.HTTPConnection("127.0.0.1", front.n.port, timeout=10)
        try:
            c.request("GET", "/api", headers={"X-Api-Key": k})
            return c.getresponse().status
        finally:
            c.close()

    got = (code(key(1)), code(key(nkeys)), code("mk_cost_unknown"))
    if got != (200, 200, 401):
        raise SystemExit("%s: gate answered %s for the first, last and an "
                         "unknown key; expected 200, 200, 401"
                         % (front.name, got))


def settle(front, interval_s=1.0):
    """After wrk: long enough for the flush of what it counted (the pass
    that starts within one interval, its replies), without asking nginx.
    A status request walks every slot of the zone (17 ms of the worker at
    1M keys, 2M slots): polled inside the window it was most of what the
    first runs charged to metering at 1M keys (bench/README.md, "cost")."""
    time.sleep(2 * interval_s + 0.5)


def measure(front, redis, seconds, nkeys, seed, pace_ms=0):
    redis_pid = redis.proc.pid
    pids = front.pids()
    s0 = drain(front)
    c0 = commandstats(redis)
    n0, r0 = cpu_ticks(pids), cpu_ticks([redis_pid])
    t0 = time.monotonic()
    res = wrk(front.n.port, seconds, nkeys, seed, pace_ms)
    settle(front, front.flush_s)
    wall = time.monotonic() - t0
    n1, r1 = cpu_ticks(pids), cpu_ticks([redis_pid])
    c1 = commandstats(redis)
    # outside the window: the check that the window held the whole flush
    late = status(front.n.port2)["pending"] if front.metered else 0
    s1 = drain(front)
    req = res["requests"]
    d = stats_delta(c0, c1)
    out = {
        "requests": req, "rps": res["rps"], "p50_us": res["p50_us"],
        "p99_us": res["p99_us"], "max_us": res["max_us"], "wall_s": wall,
        "errors": res["errors"], "non2xx": res["non2xx"],
        "nginx_us": (n1 - n0) * 1e6 / TICK / req,
        "redis_us": (r1 - r0) * 1e6 / TICK / req,
        "redis_cpu_us": (r1 - r0) * 1e6 / TICK,
        "flush_usec": flush_usec(d),
        # the key layout: one EVALSHA per credited counter
        "keyed_counters": d.get("evalsha", (0, 0))[0],
        "flushed_counters": 0,
        "cmds": d,
    }
    out["total_us"] = out["nginx_us"] + out["redis_us"]
    if s0 is not None:
        # every response wrk saw was counted and flushed; at most the
        # requests in flight when wrk stopped come on top
        units = s1["flushed_total"] - s0["flushed_total"]
        out["flushed_units"] = units
        # both layouts: every counter value Redis confirmed (an HSET
        # field or a script call); an older module without the figure
        # had only the key layout
        out["flushed_counters"] = (
            s1["flushed_counters"] - s0["flushed_counters"]
            if "flushed_counters" in s1 else out["keyed_counters"])
        if late:
            print("  warning: %s: %d units not yet flushed when the window "
                  "closed (its CPU is short of their flush)"
                  % (front.name, late))
        if not req <= units <= req + CONNECTIONS:
            print("  warning: %s flushed %d units for %d responses"
                  % (front.name, units, req))
        if s1["dropped"]:
            print("  warning: %s dropped %d calls (zone full)"
                  % (front.name, s1["dropped"]))
    if res["errors"] or res["non2xx"]:
        print("  warning: %s: %d socket errors, %d non-2xx"
              % (front.name, res["errors"], res["non2xx"]))
    return out


def load_part(a, tmp, redis, results):
    backend = Nginx(tmp / "upstream", UPSTREAM, workers=1, module=False)
    backend.start()
    try:
        for label, nkeys in a.keysets:
            redis.cmd("FLUSHALL")
            t0 = time.monotonic()
            seed_gov(redis, tmp, nkeys)
            print("\n== %s keys (%s): mtr:gov seeded in %.1fs"
                  % (label, nkeys, time.monotonic() - t0), flush=True)
            fronts = [Front(tmp / label, name, nkeys, redis, backend,
                            a.flush_interval)
                      for name in a.configs]
            try:
                for f in fronts:
                    t0 = time.monotonic()
                    f.n.start()
                    if f.name.startswith("gov"):
                        wait_for(lambda: status(f.n.port2)["gov_refreshed"],
                                 600, 0.2, "first governance load")
                        check_gate(f, nkeys)
                        print("  %s: first governance load %.2fs"
                              % (f.name, time.monotonic() - t0))
                    f.pause()
                rows = {f.name: [] for f in fronts}
                seed = 1
                for rnd in range(a.rounds):
                    for f in fronts:
                        f.resume()
                        wrk(f.n.port, a.warmup, nkeys, 10000 + seed)
                        run = {"sat": measure(f, redis, a.seconds, nkeys,
                                              seed)}
                        if a.pace_ms:
                            run["paced"] = measure(
                                f, redis, a.paced_seconds, nkeys,
                                20000 + seed, a.pace_ms)
                        f.pause()
                        seed += 1
                        rows[f.name].append(run)
                        for kind, m in run.items():
                            print("  r%d %-12s %-5s %7.0f rps  p99 %6.0f us"
                                  "  nginx %5.1f us/req  redis %5.2f us/req"
                                  "  flushed %7d counters%s"
                                  % (rnd + 1, f.name, kind, m["rps"],
                                     m["p99_us"], m["nginx_us"],
                                     m["redis_us"], m["flushed_counters"],
                                     "  redis %.2f us/counter" % (
                                         m["redis_cpu_us"]
                                         / m["flushed_counters"])
                                     if m["flushed_counters"] else ""),
                                  flush=True)
                mem = redis.cmd("INFO", "memory").decode()
                used = re.search(r"used_memory_human:(\S+)", mem).group(1)
                results["load"][label] = {"keys": nkeys, "rows": rows,
                                          "redis_memory": used}
                for kind in rows["plain"][0]:
                    report_load(label, kind, {k: [r[kind] for r in v]
                                              for k, v in rows.items()})
            finally:
                for f in fronts:
                    f.stop()
    finally:
        backend.stop()


def spread(xs, fmt):
    if len(xs) == 1:
        return fmt % xs[0]
    return (fmt + " (" + fmt + "–" + fmt + ")") % (median(xs), min(xs),
                                                     max(xs))


def report_load(label, kind, rows):
    """Median (min–max) over rounds; ratios per round against plain's
    round of the same index, then their median."""
    plain = rows["plain"]
    print("\n  %s keys, %s: median (min-max) of %d rounds"
          % (label, {"sat": "saturated (wrk closed loop)",
                     "paced": "paced (each connection waits after each "
                              "response)"}[kind], len(plain)))
    print("  %-12s %-22s %-22s %-22s %-20s %-20s %-34s %-18s"
          % ("config", "nginx us/req", "redis us/req", "CPU vs plain",
             "rps vs plain", "p99 vs plain", "redis us/flushed counter",
             "flushed counters/req"))
    for name, rs in rows.items():
        ratio = [r["total_us"] / p["total_us"] for r, p in zip(rs, plain)]
        rps = [r["rps"] / p["rps"] for r, p in zip(rs, plain)]
        p99 = [r["p99_us"] / p["p99_us"] for r, p in zip(rs, plain)]
        # Redis CPU over the window / counters flushed in it (Redis' own
        # idle cron included: plain's redis us/req); [cmdstat] the usec
        # INFO commandstats gives the flush's commands
        per_key = [r["redis_cpu_us"] / r["flushed_counters"]
                   for r in rs if r["flushed_counters"]]
        cs_key = [r["flush_usec"] / r["flushed_counters"]
                  for r in rs if r["flushed_counters"]]
        fpr = [r["flushed_counters"] / r["requests"] for r in rs]
        print("  %-12s %-22s %-22s %-22s %-20s %-20s %-34s %-18s"
              % (name, spread([r["nginx_us"] for r in rs], "%.2f"),
                 spread([r["redis_us"] for r in rs], "%.2f"),
                 spread(ratio, "%.3f"), spread(rps, "%.3f"),
                 spread(p99, "%.2f"),
                 (spread(per_key, "%.2f") + " [cmdstat %.2f]"
                  % median(cs_key)) if per_key else "-",
                 spread(fpr, "%.3f")))


# ---------------------------------------------------------------- callgrind

CG_CONF = """\
{head}
    keepalive_requests 1000000;
    {http}
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        {server}
        location /api {{
            {loc}
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class KeepAlive:
    """One HTTP/1.1 keep-alive connection, one request after another."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, k, path="/api"):
        self.s.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\nX-Api-Key: %s"
                       b"\r\n\r\n" % (path.encode(), k.encode()))
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


def annotate(path, n):
    """Inclusive Ir per request of the module's functions and of what they
    call in hiredis and libcrypto, from callgrind_annotate."""
    r = subprocess.run(["callgrind_annotate", "--inclusive=yes",
                        "--threshold=100", str(path)],
                       capture_output=True, text=True, timeout=600)
    total = None
    funcs = []
    for line in r.stdout.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?PROGRAM TOTALS",
                     line)
        if m:
            total = int(m.group(1).replace(",", ""))
            continue
        m = re.match(r"^\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?(\S+)\s*(.*)$",
                     line)
        if m and total is not None:
            ir = int(m.group(1).replace(",", ""))
            fn = m.group(2).rsplit(":", 1)[-1]
            lib = m.group(3)
            if re.match(r"(ngx_http_meter_|meter_|redis|sds|EVP_|SHA256|"
                        r"sha256|ossl_)", fn) \
                    or "hiredis" in lib or "libcrypto" in lib:
                funcs.append((ir / n, fn, lib.strip("[] ").rsplit("/")[-1]))
    if total is None:
        raise SystemExit("callgrind_annotate %s:\n%s" % (path, r.stderr))
    return total, funcs


def callgrind_run(a, tmp, name, redis, backend, gov_keys):
    """One nginx under callgrind: W warm-up requests (keys 1..W), zero,
    N requests each with a new key (W+1..W+N), for the metered ones with
    Redis the wait until every counter is flushed, dump.  Returns
    (instructions in the window, flushed counters, functions)."""
    d = tmp / ("cg-%s" % name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    port = free_port()
    metered = name != "plain"
    http = server = loc = ""
    if metered:
        dead = free_port()              # nothing listens there
        http = ("meter_zone $http_x_api_key zone=api:16m;\n"
                "    meter_redis 127.0.0.1:%d;\n"
                % (dead if name == "no-redis" else redis.port))
        if name == "no-redis":
            # no flush tick (a reconnect attempt each) in the window: what
            # is left is the request path, the same in every run
            http += "    meter_flush_interval 1h;\n"
        loc = "meter zone=api calls;"
    if name == "gov":
        # no refresh inside the window: the request path only
        http += ("    meter_governance_size 16m;\n"
                 "    meter_governance_refresh 1h;\n")
        server = GATE
    (d / "nginx.conf").write_text(CG_CONF.format(
        head=head(d, 256, module=MODULE_SO if metered else None),
        http=http, server=server, loc=loc, backend=backend.port,
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
            # the first refresh loads the state; a known key then passes
            wait_for(lambda: c.get("mk_cost_unknown") == 401, 120, 0.5,
                     "governance state under callgrind")
        for i in range(1, a.cg_warmup + 1):
            if c.get(key(i)) != 200:
                raise SystemExit("%s: warm-up request refused" % name)
        flushing = metered and name != "no-redis"
        if flushing:
            # the warm-up's counters leave before the window starts
            wait_for(lambda: counters_in_redis(redis)
                     >= base_counters[0] + a.cg_warmup, 120, 0.2,
                     "warm-up flushed")
            time.sleep(1.5)
        e0 = counters_in_redis(redis)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)],
                       check=True, capture_output=True, timeout=60)
        for i in range(a.cg_warmup + 1, a.cg_warmup + a.cg_requests + 1):
            if c.get(key(i)) != 200:
                raise SystemExit("%s: request %d refused" % (name, i))
        flushed = 0
        if flushing:
            # asked of Redis, not of nginx: no status request in the window
            want = e0 + a.cg_requests
            wait_for(lambda: counters_in_redis(redis) >= want, 300, 0.2,
                     "window flushed")
            flushed = counters_in_redis(redis) - e0
        subprocess.run(["callgrind_control", "--dump=window",
                        str(proc.pid)], check=True, capture_output=True,
                       timeout=60)
        if flushing:
            base_counters[0] = counters_in_redis(redis)
        c.close()
        dumps = wait_for(lambda: sorted(d.glob("callgrind.out.*")), 60,
                         0.2, "the callgrind dump")
        total, funcs = annotate(dumps[-1], a.cg_requests)
        return total, flushed, funcs
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


base_counters = [0]


def counters_in_redis(redis):
    """Distinct counters Redis holds, both layouts (each measured request
    is a new key, so one counter each)."""
    return len(usage_fields(redis))


def callgrind_part(a, tmp, redis, results):
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind missing: apt-get install valgrind "
                         "(make bench-cost installs it)")
    backend = Nginx(tmp / "cg-upstream", UPSTREAM, workers=1, module=False)
    backend.start()
    nall = a.cg_warmup + a.cg_requests
    try:
        redis.cmd("FLUSHALL")
        seed_gov(redis, tmp, nall)
        base_counters[0] = counters_in_redis(redis)
        print("\n== callgrind: %d warm-up + %d measured keep-alive requests,"
              " each measured one a new key" % (a.cg_warmup, a.cg_requests),
              flush=True)
        runs = {}
        for rep in (1, 2):
            for name in ("plain", "no-redis", "redis", "gov"):
                t0 = time.monotonic()
                total, flushed, funcs = callgrind_run(a, tmp, name, redis,
                                                      backend, nall)
                runs.setdefault(name, []).append((total, flushed, funcs))
                print("  run %d %-9s %12d Ir  %8.0f / request  flushed %d"
                      "  (%.0fs)" % (rep, name, total,
                                     total / a.cg_requests, flushed,
                                     time.monotonic() - t0), flush=True)
        results["callgrind"] = report_callgrind(a, runs)
    finally:
        backend.stop()


def report_callgrind(a, runs):
    n = a.cg_requests
    per = {k: [t / n for t, _, _ in v] for k, v in runs.items()}
    out = {"requests": n, "warmup": a.cg_warmup,
           "per_request": per}
    print("\n  instructions per request (two runs; difference)")
    for k, v in per.items():
        print("  %-9s %9.0f %9.0f   %.3f %%"
              % (k, v[0], v[1], abs(v[0] - v[1]) / min(v) * 100))
    plain = median(per["plain"])
    path = median(per["no-redis"]) - plain
    flushed = [f for _, f, _ in runs["redis"]]
    flush = [(t - tn) / f for (t, f, _), (tn, _, _)
             in zip(runs["redis"], runs["no-redis"]) if f]
    gov = median(per["gov"]) - median(per["redis"])
    out.update(plain=plain, request_path=path, flushed=flushed,
               per_flushed_counter=flush, gov_request=gov)
    print("  metering, request path only: +%.0f / request" % path)
    print("  flush, per flushed counter (in nginx): %s  (flushed %s)"
          % (", ".join("%.0f" % x for x in flush), flushed))
    print("  governance lookup (gov - redis): %+.0f / request" % gov)
    for k in ("no-redis", "redis", "gov"):
        funcs = runs[k][0][2]
        print("\n  top module functions, %s (inclusive Ir per measured "
              "request)" % k)
        seen = set()
        top = []
        for ir, fn, lib in sorted(funcs, reverse=True):
            if fn in seen:
                continue
            seen.add(fn)
            top.append((round(ir, 1), fn, lib))
        for ir, fn, lib in top[:a.cg_top]:
            print("    %10.1f  %s  [%s]" % (ir, fn, lib))
        out.setdefault("top", {})[k] = top[:a.cg_top]
    return out


# ---------------------------------------------------------------- stall

STALL = r"""
    keepalive_requests 1000000;
    meter_zone $http_x_api_key zone=api:@ZONE@;
    meter_redis @REDIS@;
    meter_governance_size @GOVSIZE@;
    meter_governance_refresh @REFRESH@;
    server {
        listen 127.0.0.1:@PORT@;
        access_log off;
        meter zone=api calls;
        %s
        location / { return 200 "ok\n"; }
    }
    server {
        listen 127.0.0.1:@PORT2@;
        access_log off;
        location = /status { meter_status json; }
        location = /ping { return 200 "ok\n"; }
    }
"""


def tight_loop(port, seconds, change=None):
    """Requests back to back on one keep-alive connection to the worker
    that refreshes (1 worker): [(start, latency in s)].  change(), when
    given, runs in a thread once a second."""
    c = KeepAlive(port)
    out = []
    stop = threading.Event()

    def changer():
        j = 0
        while not stop.wait(1.0):
            change(j)
            j += 1

    t = threading.Thread(target=changer, daemon=True) if change else None
    if t:
        t.start()
    end = time.monotonic() + seconds
    try:
        while True:
            t0 = time.monotonic()
            if t0 > end:
                break
            c.get("x", "/ping")
            out.append((t0, time.monotonic() - t0))
    finally:
        stop.set()
        c.close()
    return out


def stall_stats(samples, refresh_s):
    """Max latency per refresh period, over the periods."""
    t0 = samples[0][0]
    per = {}
    for t, lat in samples:
        b = int((t - t0) / refresh_s)
        per[b] = max(per.get(b, 0), lat)
    # the last period is cut short by the end of the run
    maxima = [per[b] for b in sorted(per)[:-1]] or list(per.values())
    lats = sorted(lat for _, lat in samples)
    return {"max_ms": max(lats) * 1e3,
            "top3_ms": [x * 1e3 for x in lats[-3:][::-1]],
            "p999_ms": lats[int(len(lats) * 0.999)] * 1e3,
            "period_max_ms_median": median(maxima) * 1e3,
            "period_max_ms_min": min(maxima) * 1e3,
            "p50_us": lats[len(lats) // 2] * 1e6,
            "requests": len(lats)}


def stall_part(a, tmp, redis, results):
    refresh = 1.0
    print("\n== governance refresh stall: 1 worker, refresh %.0fs, %ds of "
          "a tight-loop client per case" % (refresh, a.stall_seconds),
          flush=True)
    out = {}
    for nkeys in a.stall_keys:
        redis.cmd("FLUSHALL")
        seed_gov(redis, tmp, nkeys)
        cases = {}
        for gate in ("", GATE):
            conf = STALL % gate
            n = Nginx(tmp / ("stall-%d-%d" % (nkeys, bool(gate))), conf,
                      workers=1, redis=redis.address,
                      govsize=gov_size(nkeys), zone=zone_size(nkeys),
                      refresh="%dms"
                      % (refresh * 1000))
            t0 = time.monotonic()
            n.start()
            try:
                if gate:
                    wait_for(lambda: status(n.port2)["gov_refreshed"], 600,
                             0.05, "first governance load")
                    first = time.monotonic() - t0
                    time.sleep(refresh)
                    cases["first_load_s"] = first
                    cases["nothing_changed"] = stall_stats(
                        tight_loop(n.port2, a.stall_seconds), refresh)

                    def change(j):
                        # one key delinquent, then active again
                        gov_change(redis, 1, *(
                            ("d", "invoice_overdue") if j % 2 == 0
                            else ("a", "")))
                    cases["one_change"] = stall_stats(
                        tight_loop(n.port2, a.stall_seconds, change),
                        refresh)
                else:
                    cases["no_gate"] = stall_stats(
                        tight_loop(n.port2, a.stall_seconds), refresh)
            finally:
                n.stop()
        out[nkeys] = cases
        print("  %d keys: first load %.2fs (start to first refresh)"
              % (nkeys, cases["first_load_s"]))
        for k in ("no_gate", "nothing_changed", "one_change"):
            s = cases[k]
            print("    %-16s max latency per %.0fs period: median %.1f ms "
                  "(min %.1f), largest %s ms, p99.9 %.1f ms, p50 %.0f us, "
                  "%d requests"
                  % (k, refresh, s["period_max_ms_median"],
                     s["period_max_ms_min"],
                     "/".join("%.1f" % x for x in s["top3_ms"]),
                     s["p999_ms"], s["p50_us"], s["requests"]), flush=True)
    results["stall"] = out


def cg_stall_part(a, tmp, redis, results):
    """Instructions of the refresh itself, under callgrind: collected only
    inside the two event handlers that run it (the refresh timer and the
    Redis read handler, which parses replies and calls the refresh's
    callbacks; neither nests in the other), so the HTTP requests that poll
    gov_refreshed cost nothing in the count.  A dump right after a refresh
    published holds whole refreshes: the next one starts a refresh
    interval later."""
    out = {}
    print("\n== governance refresh under callgrind (instructions in the "
          "refresh timer and the Redis read handler)", flush=True)
    for nkeys in a.cg_stall_keys:
        redis.cmd("FLUSHALL")
        seed_gov(redis, tmp, nkeys)
        d = tmp / ("cg-stall-%d" % nkeys)
        d.mkdir(parents=True)
        port, sport = free_port(), free_port()
        # a refresh under valgrind (~85M Ir/s; one change: ~5,400 Ir a
        # key) must end well before the next tick, or the dump after it
        # would hold part of the next one
        refresh = max(10, nkeys * 15 // 100000)
        http = ("meter_zone $http_x_api_key zone=api:%s;\n"
                "    meter_redis 127.0.0.1:%d;\n"
                "    meter_governance_size %s;\n"
                "    meter_governance_refresh %ds;\n"
                "    server { listen 127.0.0.1:%d; location = /status "
                "{ meter_status json; } }\n"
                % (zone_size(nkeys), redis.port, gov_size(nkeys), refresh,
                   sport))
        (d / "nginx.conf").write_text(CG_CONF.format(
            head=head(d, 256, module=MODULE_SO), http=http,
            server="meter zone=api calls; " + GATE,
            loc="", backend=free_port(), port=port))
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             "--toggle-collect=ngx_http_meter_gov_tick",
             "--toggle-collect=ngx_http_meter_redis_read",
             "--callgrind-out-file=%s" % (d / "callgrind.out"),
             NGINX, "-p", "%s/" % d, "-c", "nginx.conf", "-e",
             str(d / "error.log"), "-g", "pid %s/nginx.pid;" % d],
            stdout=open(d / "valgrind.log", "wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        try:
            def refreshed(after):
                try:
                    v = status(sport)["gov_refreshed"]
                except (OSError, ValueError, KeyError, IndexError):
                    return None
                return v if v and v != after else None

            def dump(label):
                subprocess.run(["callgrind_control", "--dump=" + label,
                                str(proc.pid)], check=True,
                               capture_output=True, timeout=120)

            n_dumps = [0]

            def ir_of_dump():
                n_dumps[0] += 1
                f = wait_for(lambda: (d / ("callgrind.out.%d" % n_dumps[0]))
                             if (d / ("callgrind.out.%d" % n_dumps[0]))
                             .exists() else None, 120, 0.2, "dump")
                time.sleep(0.5)
                return annotate(f, 1)[0]

            t0 = time.monotonic()
            last = wait_for(lambda: refreshed(0), 1200, 0.1,
                            "first governance load under callgrind")
            dump("first")
            first = ir_of_dump()
            print("  %d keys: first load %.0f Ir (%.0f / key; %.0fs under "
                  "valgrind)" % (nkeys, first, first / nkeys,
                                 time.monotonic() - t0), flush=True)
            same = []
            for _ in range(2):
                last = wait_for(lambda: refreshed(last), 1200, 0.1,
                                "a refresh")
                dump("same")
                same.append(ir_of_dump())
            changed = []
            for j in range(2):
                gov_change(redis, 1, *(("d", "invoice_overdue") if j == 0
                                       else ("a", "")))
                last = wait_for(lambda: refreshed(last), 1200, 0.1,
                                "a refresh")
                dump("changed")
                changed.append(ir_of_dump())
            for xs in (same, changed):
                if abs(xs[0] - xs[1]) > 0.01 * min(xs):
                    print("  warning: the two refreshes differ by more than"
                          " 1%: a dump held part of another refresh")
            out[nkeys] = {"first": first, "nothing_changed": same,
                          "one_change": changed}
            print("    nothing changed: %s Ir per refresh (%.0f / key)"
                  % (", ".join("%.0f" % x for x in same),
                     median(same) / nkeys))
            print("    one change:      %s Ir per refresh (%.0f / key)"
                  % (", ".join("%.0f" % x for x in changed),
                     median(changed) / nkeys), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    results["cg_stall"] = out


# ---------------------------------------------------------------- main

def parse_keys(s):
    out = []
    for k in s.split(","):
        k = k.strip().lower()
        n = int(float(k[:-1]) * (1000 if k[-1] == "k" else 1000000)) \
            if k[-1] in "km" else int(k)
        out.append((k, n))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="load,callgrind,stall,cg-stall")
    ap.add_argument("--seconds", type=int, default=10,
                    help="measured seconds of each wrk run (10)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="wrk seconds before each measured run (1)")
    ap.add_argument("--pace-ms", type=int, default=10,
                    help="paced runs: each of the %d connections waits this"
                         " long after each response, for CPU per request "
                         "at the same rate in every configuration (0: no "
                         "paced runs; 10)" % CONNECTIONS)
    ap.add_argument("--paced-seconds", type=int, default=5,
                    help="seconds of each paced run (5)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, configurations interleaved (3)")
    ap.add_argument("--keys", default="10k,200k,1m",
                    help="key sets of the load part (10k,200k,1m)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="load part: configurations (plain first; %s)"
                         % ",".join(CONFIGS))
    ap.add_argument("--flush-interval", type=float, default=1.0,
                    help="load part: meter_flush_interval of the metered "
                         "configurations, seconds (1; a longer one shows "
                         "what flushing less often would save)")
    ap.add_argument("--cg-requests", type=int, default=20000)
    ap.add_argument("--cg-warmup", type=int, default=2000)
    ap.add_argument("--cg-top", type=int, default=20)
    ap.add_argument("--stall-keys", default="100k,1m")
    ap.add_argument("--stall-seconds", type=int, default=8)
    ap.add_argument("--cg-stall-keys", default="100k")
    ap.add_argument("--quick", action="store_true",
                    help="3 s runs, 2 rounds, 10k and 200k keys, 5,000 "
                         "callgrind requests, stall at 100k only")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds, a.keys = 3, 2, "10k,200k"
        a.paced_seconds = 3
        a.cg_requests, a.cg_warmup = 5000, 1000
        a.stall_keys, a.stall_seconds = "100k", 5
        a.cg_stall_keys = "20k"
    a.keysets = parse_keys(a.keys)
    a.configs = a.configs.split(",")
    if a.configs[0] != "plain" or not set(a.configs) <= set(CONFIGS):
        raise SystemExit("--configs: plain first, then some of %s"
                         % ",".join(CONFIGS))
    a.stall_keys = [n for _, n in parse_keys(a.stall_keys)]
    a.cg_stall_keys = [n for _, n in parse_keys(a.cg_stall_keys)]
    parts = set(a.parts.split(","))
    if not MODULE_SO.exists():
        raise SystemExit("%s missing: run make" % MODULE_SO)
    for tool in ("wrk", "redis-cli"):
        if shutil.which(tool) is None:
            raise SystemExit("%s missing: run make deps" % tool)

    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-cost-"))
    redis = RedisServer(tmp / "redis")
    results = {"load": {}, "machine": {
        "nproc": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    t0 = time.monotonic()
    try:
        redis.start()
        print("cost: nginx 1 worker, wrk -t1 -c%d, %ds runs (+%ds warm-up)"
              ", %d rounds; load average %.2f %.2f %.2f"
              % ((CONNECTIONS, a.seconds, a.warmup, a.rounds)
                 + os.getloadavg()), flush=True)
        if "load" in parts:
            load_part(a, tmp, redis, results)
        if "callgrind" in parts:
            callgrind_part(a, tmp, redis, results)
        if "stall" in parts:
            stall_part(a, tmp, redis, results)
        if "cg-stall" in parts:
            cg_stall_part(a, tmp, redis, results)
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["seconds"] = time.monotonic() - t0
        print("\ndone in %.0fs; load average %.2f %.2f %.2f"
              % ((results["seconds"],) + os.getloadavg()))
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1,
                                               default=str))
        return 0
    finally:
        redis.stop("kill")
        if a.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
