#!/usr/bin/python3
"""make demo: redis-server and nginx with ngx_http_meter_module on free
loopback ports in a temp dir, traffic for three API keys, the metered
totals read back from Redis, then (when built) meter-worker drains them
into a JSONL file.  Everything is cleaned up at the end."""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import (MODULE_SO, ROOT, Client, Nginx,  # noqa: E402
                      RedisServer, key_hash, totals, wait_for)

WORKER = ROOT / "worker" / "meter-worker"
METERCTL = ROOT / "worker" / "meterctl"

CONF = r"""
    meter_zone $http_x_api_key zone=api:1m;
    meter_redis @REDIS@;
    meter_flush_interval 200ms;

    # the "API" behind the gateway: nginx itself on a second port
    server {
        listen 127.0.0.1:@PORT2@;
        location = /s/200 { return 200 "{\"score\": 712}\n"; }
        location = /s/404 { return 404; }
        location = /s/500 { return 500; }
    }

    server {
        listen 127.0.0.1:@PORT@;

        location /getCreditScore {
            meter zone=api calls status=200;
            meter zone=api bytes status=200 value=$bytes_sent;
            proxy_pass http://127.0.0.1:@PORT2@/s/$arg_s;
        }
        location /search {
            meter zone=api searches status=2xx method=GET,POST;
            proxy_pass http://127.0.0.1:@PORT2@/s/$arg_s;
        }
        location = /status { meter_status json; }
    }
"""

# key -> [(method, route, status, how many)]
TRAFFIC = {
    "mk_live_acme_7Hq2xR9d": [("GET", "/getCreditScore", 200, 40),
                              ("GET", "/getCreditScore", 404, 5),
                              ("GET", "/getCreditScore", 500, 3),
                              ("POST", "/search", 200, 12)],
    "mk_live_globex_P3kW8m": [("GET", "/getCreditScore", 200, 7),
                              ("GET", "/search", 200, 25),
                              ("DELETE", "/search", 200, 4)],
    "mk_live_initech_Zz01b": [("GET", "/getCreditScore", 200, 1),
                              ("GET", "/search", 500, 9)],
}


def title(s):
    print("\n\033[1m== %s\033[0m" % s if sys.stdout.isatty() else
          "\n== %s" % s)


def table(rows, header):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  " + "  ".join("%%-%ds" % w for w in widths)
    print(fmt % tuple(header))
    print(fmt % tuple("-" * w for w in widths))
    for r in rows:
        print(fmt % tuple(r))


def send_traffic(n):
    sent = []
    for key, reqs in TRAFFIC.items():
        c = Client(n.port)
        for method, route, status, count in reqs:
            got = Counter()
            for _ in range(count):
                body = b"{}" if method == "POST" else None
                got[c.request(method, "%s?s=%d" % (route, status),
                              {"X-Api-Key": key}, body)] += 1
            sent.append((key[:12], method, route, status, count,
                         ", ".join("%s x%d" % kv for kv in got.items())))
        c.close()
    return sent


def main():
    if not MODULE_SO.exists():
        print("demo: %s missing, run make first" % MODULE_SO)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="meter-demo-"))
    redis = RedisServer(tmp / "redis")
    nginx = None
    try:
        redis.start()
        nginx = Nginx(tmp / "nginx", CONF, workers=2, redis=redis.address)
        nginx.start()
        title("nginx-meter demo (work dir %s)" % tmp)
        print("  redis-server  %s" % redis.address)
        print("  nginx         127.0.0.1:%d (2 workers, module %s)"
              % (nginx.port, MODULE_SO.name))
        print("  upstream API  127.0.0.1:%d" % nginx.port2)

        title("traffic")
        table(send_traffic(nginx),
              ["key", "method", "route", "status", "sent", "answers"])

        # what should be metered: calls/bytes for 200s of /getCreditScore,
        # searches for 2xx GET/POST of /search
        want = {}
        for key, reqs in TRAFFIC.items():
            for method, route, status, count in reqs:
                m = None
                if route == "/getCreditScore" and status == 200:
                    m = "calls"
                elif (route == "/search" and status // 100 == 2
                      and method in ("GET", "POST")):
                    m = "searches"
                if m:
                    k = (key_hash(key), m)
                    want[k] = want.get(k, 0) + count

        title("waiting for the flush to Redis")
        t0 = time.monotonic()
        wait_for(lambda: {k: v for k, v in totals(redis).items()
                          if k[1] != "bytes"} == want, 15)
        print("  flushed in %.2fs" % (time.monotonic() - t0))

        title("metered totals in Redis (raw keys never leave nginx)")
        prefix = {key_hash(k): k[:12] for k in TRAFFIC}
        rows = []
        for (kh, meter), v in sorted(totals(redis).items(),
                                     key=lambda kv: (prefix[kv[0][0]],
                                                     kv[0][1])):
            rows.append((kh[:16] + "...", prefix[kh], meter, v))
        table(rows, ["key_hash", "key prefix", "meter", "value"])
        print("\n  Redis keys:")
        for k in redis.keys():
            print("    " + re.sub(r"\{([0-9a-f]{12})[0-9a-f]{52}\}",
                                r"{\1...}", k))

        title("meter_status")
        code, body = nginx.get("/status")
        for z in json.loads(body)["zones"]:
            print("  zone %(name)s: keys=%(keys)s pending=%(pending)s "
                  "flushed_total=%(flushed_total)s flushes=%(flushes)s "
                  "redis_connected=%(redis_connected)s dropped=%(dropped)s"
                  % z)

        if METERCTL.exists():
            title("meterctl usage --json")
            r = subprocess.run([str(METERCTL), "usage", "--redis",
                                redis.address, "--json"],
                               capture_output=True, text=True, timeout=30)
            print(r.stdout.rstrip() or r.stderr.rstrip())
            if r.returncode != 0:
                print("demo: meterctl failed (%d)" % r.returncode)
                return 1

        if WORKER.exists():
            run_worker(tmp, redis)
        else:
            print("\n(worker/meter-worker not built: billing step skipped)")

        title("done")
        return 0
    finally:
        if nginx is not None:
            nginx.stop()
        redis.stop("kill")
        shutil.rmtree(tmp, ignore_errors=True)


def run_worker(tmp, redis):
    out = tmp / "usage.jsonl"
    conf = tmp / "worker.conf"
    conf.write_text("redis = %s\nprovider = file\nfile.path = %s\n"
                    "grace = 0\n" % (redis.address, out))
    # an hour boundary two hours ahead: the current hour counts as closed
    now = datetime.datetime.now(datetime.timezone.utc)
    before = (now + datetime.timedelta(hours=2)).replace(
        minute=0, second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    cmd = [str(WORKER), "-c", str(conf), "--once", "--before", before]
    title("meter-worker --once --before %s (provider = file)" % before)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, NO_COLOR="1"))
    for line in r.stderr.splitlines():
        print("  worker: " + line)
    if r.returncode != 0:
        raise SystemExit("demo: meter-worker exited with %d" % r.returncode)
    title("usage records sent to the provider (%s)" % out.name)
    records = out.read_text().splitlines() if out.exists() else []
    for line in records:
        print("  " + line)
    if not records:
        raise SystemExit("demo: meter-worker wrote no usage records")
    billed = {}
    for line in records:
        rec = json.loads(line)
        k = (rec["key_hash"], rec["meter"])
        billed[k] = billed.get(k, 0) + rec["quantity"]
    if billed != totals(redis):
        raise SystemExit("demo: billed quantities differ from Redis totals")
    print("\n  billed quantities = metered totals (%d records)" % len(records))


if __name__ == "__main__":
    sys.exit(main())
