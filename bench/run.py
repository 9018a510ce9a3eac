#!/usr/bin/python3
"""Plain nginx vs the same nginx config with metering, under wrk with 10k
random API keys.  Not a pass/fail test: prints rps and p99 of both and the
ratios (metered / plain).  See bench/README.md.

MODE=governance compares metering alone ("off") with metering plus
meter_governance ("on"), the 10k keys registered to 1,000 customers in
mtr:gov, all in good standing.  Governance runs in the access phase, which
`return` skips, so this mode serves a static file in both configurations.

Environment: DURATION (s, default 10), CONNECTIONS (50), THREADS (wrk, 1),
WORKERS (nginx worker_processes, 1), ROUNDS (3; each runs plain, then
metered; the ratios compare the best round of each), MODE (metering or
governance)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "t"))

from conftest import MODULE_SO, Nginx, RedisServer, totals  # noqa: E402

DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
THREADS = int(os.environ.get("THREADS", "1"))
WORKERS = int(os.environ.get("WORKERS", "1"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
MODE = os.environ.get("MODE", "metering")

METERING = r"""
    meter_zone $http_x_api_key zone=api:32m;
    meter_redis @REDIS@;
"""

SERVER = r"""
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:@PORT@;
        access_log off;
        location /getCreditScore {
            %s
            return 200 "{\"score\": 712}\n";
        }
    }
"""


STATIC = r"""
    keepalive_requests 1000000;
    meter_governance_refresh 5s;
    server {
        listen 127.0.0.1:@PORT@;
        access_log off;
        location /getCreditScore {
            %s
            default_type application/json;
            alias @TMP@/score.json;
        }
    }
"""


def seed_governance(redis):
    """The bench's 10k keys (keys.lua), 10 per customer, all active."""
    import hashlib
    args = ["HSET", "mtr:gov"]
    for i in range(1, 10001):
        key = "mk_bench_%05d_4f9c2a7e" % i
        kh = hashlib.sha256(key.encode()).hexdigest()
        args += [kh, "c%04d\ta\t\t0\t0" % (i // 10)]
    redis.cmd(*args)
    redis.cmd("SET", "mtr:gov:version", "1")


def wrk(port, duration):
    r = subprocess.run(
        ["wrk", "-t%d" % THREADS, "-c%d" % CONNECTIONS, "-d%ds" % duration,
         "-s", str(HERE / "keys.lua"), "http://127.0.0.1:%d" % port],
        capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise SystemExit("wrk failed:\n" + r.stdout + r.stderr)
    res = {k: float(v) for k, v in
           (kv.split("=") for kv in m.group(1).split())}
    if res["errors"] or res["non2xx"]:
        print("  warning: %d socket errors, %d non-2xx"
              % (res["errors"], res["non2xx"]))
    return res


def main():
    if not MODULE_SO.exists():
        raise SystemExit("%s missing: run make" % MODULE_SO)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk missing: run make deps")
    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-"))
    redis = RedisServer(tmp / "redis")
    servers = []
    try:
        redis.start()
        if MODE == "governance":
            seed_governance(redis)
            plain = Nginx(tmp / "off",
                          METERING + STATIC % "meter zone=api calls;",
                          workers=WORKERS, redis=redis.address)
            metered = Nginx(tmp / "on", METERING + STATIC % (
                "meter zone=api calls; "
                "meter_governance zone=api unknown_key=401;"),
                workers=WORKERS, redis=redis.address)
            for n in (plain, metered):
                (n.tmp / "score.json").write_text('{"score": 712}\n')
            labels = ("gov off", "gov on")
        else:
            plain = Nginx(tmp / "plain", SERVER % "", workers=WORKERS,
                          module=False)
            metered = Nginx(tmp / "metered",
                            METERING + SERVER % "meter zone=api calls;",
                            workers=WORKERS, redis=redis.address)
            labels = ("plain", "metered")
        for n in (plain, metered):
            servers.append(n)
            n.start()
        time.sleep(1)                   # the first governance refresh
        print("%s: nginx %d worker(s), wrk -t%d -c%d -d%ds, 10k random keys"
              % (MODE, WORKERS, THREADS, CONNECTIONS, DURATION))
        results = {"plain": [], "metered": []}

        def counts(n):
            # in governance mode both sides meter
            return n is metered or MODE == "governance"

        sent = 0
        for name, n in (("plain", plain), ("metered", metered)):
            res = wrk(n.port, 2)                    # warm-up
            sent += res["requests"] if counts(n) else 0
        for _ in range(ROUNDS):
            for name, n in (("plain", plain), ("metered", metered)):
                res = wrk(n.port, DURATION)
                results[name].append(res)
                sent += res["requests"] if counts(n) else 0
                print("  %-8s %10.0f rps   p50 %6.0f us   p99 %6.0f us"
                      % (labels[name == "metered"], res["rps"],
                         res["p50_us"], res["p99_us"]))

        def best(name, f, pick):
            return pick(r[f] for r in results[name])

        rps = best("metered", "rps", max) / best("plain", "rps", max)
        p99 = best("metered", "p99_us", min) / best("plain", "p99_us", min)
        if MODE == "governance":
            print("ratio on/off: rps %.3f (target >= 0.98), "
                  "p99 %.3f (target <= 1.02)" % (rps, p99))
        else:
            print("ratio metered/plain: rps %.3f (target >= 0.97), "
                  "p99 %.3f (target <= 1.10)" % (rps, p99))
        time.sleep(2)                               # one flush interval+
        t = totals(redis)
        counted = sum(v for (_, m), v in t.items() if m == "calls")
        print("Redis: %d calls over %d keys; wrk saw %d responses (requests"
              " in flight when wrk stops are counted but not seen by wrk)"
              % (counted, len(t), sent))
        return 0
    finally:
        for n in servers:
            n.stop()
        redis.stop("kill")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
