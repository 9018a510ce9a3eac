#!/usr/bin/python3
"""How long one alert evaluation pass of meter-worker takes for N customers.
Not a pass/fail test, but every run checks its result exactly.  See
bench/README.md ("alerts").

In a temp dir: a redis-server on a free port, seeded with N customers (one
key each, as meterctl writes them: mtr:customers, mtr:cust:{C}, mtr:ckeys)
and usage in the current hour the way the module writes it (mtr:u,
mtr:used, mtr:idx, mtr:hours), every 10th customer above the threshold.
Then meter-worker (provider file) with three rules on every customer:
usage_above per hour and per day, and per month, each notifying a local
webhook sink.  Prints the pass times the worker logs at debug level
("alerts: ... evaluated in X ms") for the first pass (fires N/10 x 3
alerts) and the following passes (nothing new), and checks that the sink
got exactly N/10 x 3 webhooks, none twice.
"""

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "t"))
sys.path.insert(0, str(HERE))

from conftest import RedisServer, free_port  # noqa: E402
from drain import resp  # noqa: E402

WORKER = ROOT / "worker" / "meter-worker"


def seed(redis, tmp, n, hour, hour_start):
    path = tmp / "seed.resp"
    with open(path, "wb") as f:
        for i in range(n):
            c = "c%06d" % i
            kh = hashlib.sha256(("mk_bench_%06d" % i).encode()).hexdigest()
            v = 150 if i % 10 == 0 else 50
            f.write(resp("SADD", "mtr:customers", c))
            f.write(resp("HSET", "mtr:cust:{%s}" % c, "status", "active",
                         "email", "%s@example.com" % c))
            f.write(resp("SADD", "mtr:ckeys:{%s}" % c, kh))
            f.write(resp("HSET", "mtr:key:{%s}" % kh, "customer", c))
            f.write(resp("SADD", "mtr:idx:%s" % hour, kh))
            f.write(resp("ZADD", "mtr:hours", "NX", str(hour_start), hour))
            f.write(resp("HINCRBY", "mtr:used:{%s}" % kh, "calls", str(v)))
            f.write(resp("HSET", "mtr:u:{%s}:%s" % (kh, hour),
                         "calls|3f2a9c0d11b2e4f7.1", str(v)))
    with open(path, "rb") as f:
        subprocess.run(["redis-cli", "-h", redis.host, "-p",
                        str(redis.port), "--pipe"], stdin=f, check=True,
                       capture_output=True)


class Sink:
    def __init__(self):
        self.ids = []
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.ids.append(json.loads(body)["id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000, help="customers")
    ap.add_argument("--passes", type=int, default=5)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    redis = RedisServer(tmp / "redis")
    redis.start()
    sink = Sink()
    now = time.time()
    hour_start = int(now // 3600 * 3600)
    if now - hour_start > 3300:
        sys.exit("too close to the end of the hour; run again in 5 minutes")
    hour = time.strftime("%Y%m%d%H", time.gmtime(hour_start))
    seed(redis, tmp, a.n, hour, hour_start)

    (tmp / "secret").write_text("bench-secret\n")
    url = "http://127.0.0.1:%d/h" % sink.port
    conf = tmp / "worker.conf"
    conf.write_text("\n".join([
        "redis = %s" % redis.address, "provider = file",
        "file.path = %s" % (tmp / "out.jsonl"), "log_level = debug",
        "alert.interval = 1s",
        "alert.webhook_secret_file = %s" % (tmp / "secret"),
        "alert.h.when = usage_above 100 calls per hour",
        "alert.h.notify = webhook:%s" % url,
        "alert.d.when = usage_above 100 calls per day",
        "alert.d.notify = webhook:%s" % url,
        "alert.m.when = usage_above 100 calls per month",
        "alert.m.notify = webhook:%s" % url]) + "\n")

    log = tmp / "worker.log"
    with open(log, "wb") as lf:
        w = subprocess.Popen([str(WORKER), "-c", str(conf)], stdout=lf,
                             stderr=subprocess.STDOUT)
    pat = re.compile(r"alerts: 3 rules x (\d+) customers evaluated in "
                     r"([\d.]+) ms, (\d+) fired")
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            passes = pat.findall(log.read_text())
            if len(passes) >= a.passes + 1:
                break
            time.sleep(0.2)
    finally:
        w.terminate()
        w.wait(30)
        redis.stop("kill")

    want = (a.n + 9) // 10 * 3
    assert len(sink.ids) == want, (len(sink.ids), want)
    assert len(set(sink.ids)) == want
    first = passes[0]
    assert int(first[0]) == a.n and int(first[2]) == want, first
    rest = [float(p[1]) for p in passes[1:a.passes + 1]]
    assert all(int(p[2]) == 0 for p in passes[1:])
    print("%d customers x 3 rules (hour, day, month)" % a.n)
    print("  first pass   %8.1f ms  (%d alerts fired, then %d webhooks "
          "delivered once each)" % (float(first[1]), want, len(sink.ids)))
    print("  later passes %8.1f ms  median of %d (nothing new)"
          % (sorted(rest)[len(rest) // 2], len(rest)))


if __name__ == "__main__":
    main()
