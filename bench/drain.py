#!/usr/bin/python3
"""How long meter-worker takes to drain N key-hours.  Not a pass/fail test,
but every run checks its result exactly.  See bench/README.md ("drain").

In a temp dir: a redis-server on a free port, seeded with N key-hours the
way the module writes them (docs/redis-schema.md: HSET mtr:u:{KH}:HOUR
"calls|EPOCH.GEN" VALUE, SADD mtr:idx:HOUR KH, ZADD mtr:hours), then
`meter-worker -c CONF --once --before <end of the last hour>`, timed.

  --mode file     provider = file, keys without customer: one record per
                  key-hour.  Checks: the JSONL has exactly N lines, N
                  distinct idempotency keys and the seeded total quantity.
  --mode stripe   each key belongs to its own customer (mtr:key:{KH},
                  mtr:cust:{C} with provider_customer, as meterctl writes
                  them), the fake Stripe (t/fakes/stripe.py) in this
                  process, stripe.max_rps (default 100).  Checks: the fake
                  accepted exactly N events, no duplicate, with the seeded
                  total per customer.  At 100 requests/s, 1M records take
                  about 2.8 h: run a small N, the rate extrapolates.

  --fail-first N  (stripe) the first N calls answer 503: a first run leaves
                  them open for a retry, they are made due, and the timed
                  "drain" row is their resume (same checks).

Then runs the worker three more times, nothing due: "rerun" right after
(the hours the drain settled are not read), "confirm" with grace 0 (the
one confirming read of every settled hour, docs/redis-schema.md "Settled
hours"), "idle" (every later pass).  The closed hours stay in Redis until
retention.  Prints seconds, records/s and the worker's max RSS
(/usr/bin/time).
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "t"))

from conftest import RedisServer  # noqa: E402

EPOCH = "3f2a9c0d11b2e4f7"
STRIPE_KEY = "sk_test_bench_0123456789"


def hour_name(ts):
    return time.strftime("%Y%m%d%H", time.gmtime(ts))


def iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def quantity(k, h):
    return 1 + (k * 31 + h * 7) % 997


def seed(redis, tmp, keys, hours, first, customers, provider="stripe"):
    """Writes the RESP of every command into a file and feeds it to
    redis-cli --pipe.  Returns (key hashes, expected total)."""
    khs = [hashlib.sha256(b"mk_bench_%08d" % k).hexdigest()
           for k in range(keys)]
    path = tmp / "seed.resp"
    total = 0
    ncmd = 0
    with open(path, "wb") as f:
        if customers:
            for k, kh in enumerate(khs):
                c = "c%08d" % k
                f.write(resp("HSET", "mtr:key:{%s}" % kh, "customer", c,
                             "prefix", "mk_bench_%04d" % (k % 10000),
                             "created", "1700000000"))
                f.write(resp("HSET", "mtr:cust:{%s}" % c, "provider",
                             provider, "provider_customer", "cus_%08d" % k,
                             "subscription", "sub_%08d" % k, "status",
                             "active", "created", "1700000000"))
                f.write(resp("SADD", "mtr:customers", c))
                ncmd += 3
        for h in range(hours):
            hs = first + h * 3600
            hn = hour_name(hs)
            f.write(resp("ZADD", "mtr:hours", "NX", str(hs), hn))
            ncmd += 1
            for i in range(0, keys, 1000):
                f.write(resp("SADD", "mtr:idx:" + hn, *khs[i:i + 1000]))
                ncmd += 1
            chunk = []
            for k, kh in enumerate(khs):
                q = quantity(k, h)
                total += q
                chunk.append(resp("HSET", "mtr:u:{%s}:%s" % (kh, hn),
                                  "calls|%s.%d" % (EPOCH, k + 1), str(q)))
            f.write(b"".join(chunk))
            ncmd += keys
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-h", redis.host, "-p",
                            str(redis.port), "--pipe"], stdin=f,
                           capture_output=True, text=True, timeout=3600)
    path.unlink()
    if r.returncode != 0 or "errors: 0, replies: %d" % ncmd not in r.stdout:
        raise SystemExit("seeding failed:\n" + r.stdout + r.stderr)
    return khs, total


def run_worker(worker, conf, before, timeout, name="drain"):
    """(exit status, seconds, max RSS in KiB, stderr) of one --once run.
    The RSS comes from /usr/bin/time: the ru_maxrss that wait4 gives this
    process would include the Python image the child was forked from."""
    rss = conf.parent / "worker.rss"
    err = open(conf.parent / ("worker-%s.err" % name), "w+")
    timer = ["/usr/bin/time", "-f", "%U %S %M", "-o", str(rss)] \
        if os.path.exists("/usr/bin/time") else []     # Debian: time
    t0 = time.monotonic()
    try:
        r = subprocess.run(timer + [str(worker), "-c", str(conf), "--once",
                                    "--before", iso(before)],
                           stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=err,
                           timeout=timeout)
    finally:
        secs = time.monotonic() - t0
        err.seek(0)
        text = err.read()
        err.close()
    kib = None
    if timer:
        f = rss.read_text().split()
        kib = int(f[-1])
        print("  worker CPU: user %ss, sys %ss" % (f[-3], f[-2]))
    return r.returncode, secs, kib, text


def check_jsonl(path, customer):
    """(lines, distinct idempotency keys, total quantity), streamed: 1M
    parsed lines held at once would take a GB of Python memory."""
    import json
    n, q, ids = 0, 0, set()
    if path.exists():
        with open(path) as f:
            for line in f:
                x = json.loads(line)
                n += 1
                q += x["quantity"]
                ids.add(x["idempotency_key"])
                if x["customer"] != customer:
                    raise SystemExit("unexpected customer: %s" % line)
    return n, len(ids), q


def provider_fake(a, keys, tmp, lines):
    """The fake Chargebee or Recurly with one subscription per key, its
    limit (--limit requests/s, counted per minute / 5 minutes as the
    provider does) and the worker's settings."""
    from fakes import FakeChargebee, FakeRecurly
    key = "bench_%s_key_0123456789" % a.mode
    if a.mode == "chargebee":
        fake = FakeChargebee(api_key=key, delay=a.latency)
        if a.limit:
            fake.rate_limit = int(a.limit * 60)
        for k in range(keys):
            fake.add_subscription("sub_%08d" % k,
                                  customer_id="cus_%08d" % k,
                                  item_prices=["calls-USD-Monthly"])
        meter = "calls-USD-Monthly"
        # hourly records, as the other modes (Chargebee's default: daily)
        lines.append("report_period = hour")
    else:
        fake = FakeRecurly(api_key=key, delay=a.latency,
                           rate_limit=int((a.limit or 1000) * 300),
                           rate_window=300)
        for k in range(keys):
            fake.add_subscription("sub_%08d" % k, add_ons=["api_calls"])
        meter = "api_calls"
    fake.start()
    (tmp / "api-key").write_text(key + "\n")
    (tmp / "api-key").chmod(0o600)
    lines += ["%s.base_url = %s" % (a.mode, fake.url),
              "%s.api_key_file = %s" % (a.mode, tmp / "api-key"),
              "%s.max_rps = %g" % (a.mode, a.rps),
              "%s.timeout = 10s" % a.mode,
              "meter.calls = %s" % meter]
    if a.in_flight:
        lines.append("%s.max_in_flight = %d" % (a.mode, a.in_flight))
    return fake


def check_usages(a, fake, name, n, keys, hours, total):
    """Exactly N usages, with the seeded quantity per subscription."""
    with fake.lock:
        us = list(fake.usages)
    got = {}
    for u in us:
        sid = u.get("subscription_id")
        got[sid] = got.get(sid, 0) + int(u.get("quantity", u.get("amount",
                                                                  0)))
    want = {"sub_%08d" % k: sum(quantity(k, h) for h in range(hours))
            for k in range(keys)}
    if len(us) != n or got != want:
        raise SystemExit("%s: %d usages, quantity %d; expected %d, %d"
                         % (name, len(us), sum(got.values()), n, total))



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("file", "stripe", "chargebee",
                                       "recurly"), default="file")
    ap.add_argument("--n", type=int, default=None,
                    help="key-hours (file: 1000000, stripe: 3000)")
    ap.add_argument("--hours", type=int, default=None,
                    help="hours the key-hours spread over (file: 100, "
                         "stripe: 10); keys = n / hours")
    ap.add_argument("--rps", type=float, default=100,
                    help="stripe.max_rps (stripe mode)")
    ap.add_argument("--latency", type=float, default=0.0,
                    help="the fake answers after this many seconds "
                         "(stripe mode; issue 13 measures at 0.05)")
    ap.add_argument("--limit", type=float, default=None,
                    help="the fake's own rate limit, requests/s (a token "
                         "bucket, 429 beyond it)")
    ap.add_argument("--in-flight", type=int, default=None,
                    help="stripe.max_in_flight (default: the worker's)")
    ap.add_argument("--stream", action="store_true",
                    help="stripe.mode = meter_event_stream (v2, 100 "
                         "events per request)")
    ap.add_argument("--fail-first", type=int, default=0,
                    help="stripe: the first N meter-event calls answer 503 "
                    "(stripe.max_attempts 1, retry.base 10m): a first run "
                    "leaves them open, they are made due, and the timed "
                    "drain run is their resume")
    ap.add_argument("--no-audit", action="store_true",
                    help="no audit.path (one fsync less per record)")
    ap.add_argument("--worker", default=os.environ.get(
        "METER_WORKER_BIN", str(ROOT / "worker" / "meter-worker")))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    a = ap.parse_args()

    n = a.n or (1000000 if a.mode == "file" else 3000)
    hours = a.hours or (100 if a.mode == "file" else 10)
    if n % hours:
        raise SystemExit("--n must be a multiple of --hours")
    keys = n // hours
    if hours > 24 * 30:
        raise SystemExit("--hours: at most 720 (Stripe's 35 days, "
                         "retention)")
    worker = Path(a.worker)
    if not worker.exists():
        raise SystemExit("%s missing: make -C worker" % worker)

    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-drain-"))
    redis = RedisServer(tmp / "redis")
    fake = None
    try:
        redis.start()
        # the last hour ended an hour ago: closed for any grace
        last = (int(time.time()) // 3600 - 2) * 3600
        first = last - (hours - 1) * 3600
        before = last + 3600

        t0 = time.monotonic()
        khs, total = seed(redis, tmp, keys, hours, first,
                          customers=(a.mode != "file"), provider=a.mode)
        seeded = time.monotonic() - t0
        mem = redis.cmd("INFO", "memory")
        mem = mem.decode() if isinstance(mem, bytes) else mem
        used = next(l.split(":")[1] for l in mem.splitlines()
                    if l.startswith("used_memory_human:"))
        print("seeded %d key-hours (%d keys x %d hours, 1 meter, 1 writer)"
              " in %.1fs; Redis used_memory %s"
              % (n, keys, hours, seeded, used))

        out = tmp / "out.jsonl"
        lines = ["redis = %s" % redis.address,
                 "provider = %s" % a.mode,
                 "grace = 5m",
                 "log_level = info"]
        if not a.no_audit:
            lines.append("audit.path = %s" % (tmp / "audit.jsonl"))
        if a.mode == "file":
            lines.append("file.path = %s" % out)
        elif a.mode in ("chargebee", "recurly"):
            fake = provider_fake(a, keys, tmp, lines)
        else:
            from fakes import FakeStripe
            from fakes import base
            # the fake writes headers and body in two send()s: without
            # TCP_NODELAY each answer waits for curl's delayed ACK (40 ms)
            base._Handler.disable_nagle_algorithm = True
            fake = FakeStripe(api_key=STRIPE_KEY, delay=a.latency)
            fake.rate = a.limit
            fake.start()
            (tmp / "api-key").write_text(STRIPE_KEY + "\n")
            (tmp / "api-key").chmod(0o600)
            lines += ["stripe.base_url = %s" % fake.url,
                      "stripe.api_key_file = %s" % (tmp / "api-key"),
                      "stripe.max_rps = %g" % a.rps,
                      "stripe.timeout = 10s",
                      "meter.calls = api_calls"]
            if a.in_flight:
                lines.append("stripe.max_in_flight = %d" % a.in_flight)
            if a.stream:
                lines += ["stripe.mode = meter_event_stream",
                          "stripe.stream_url = %s" % fake.url]
            if a.fail_first:
                # past --once's 60 s wait: the first run ends with them open
                lines += ["stripe.max_attempts = 1", "retry.base = 10m",
                          "retry.max = 1h"]
                fake.fail_next(a.fail_first, 503,
                               match=r"/(meter_events|meter_event_stream)$")
        conf = tmp / "worker.conf"
        conf.write_text("\n".join(lines) + "\n")
        # grace 0: the confirming read of the settled hours is due at once
        conf0 = tmp / "worker0.conf"
        conf0.write_text("\n".join(lines).replace("grace = 5m", "grace = 0s")
                         + "\n")

        if a.fail_first:
            rc, secs, rss, err = run_worker(worker, conf, before, a.timeout,
                                            "fail")
            got = int(redis.cmd("ZCARD", "mtr:{worker}:open"))
            if rc != 75 or got != a.fail_first:
                raise SystemExit("fail: meter-worker exited %d with %d open "
                                 "records; expected 75 and %d:\n%s"
                                 % (rc, got, a.fail_first, err[-4000:]))
            print("first run: %d records failed (503) and wait for a retry "
                  "(%.1fs); made due now" % (got, secs))
            # as time passing makes them due (the score is next_attempt)
            for rid in redis.cmd("ZRANGE", "mtr:{worker}:open", "0", "-1"):
                redis.cmd("ZADD", "mtr:{worker}:open", "1", rid)

        rows = []
        for name, cf in (("drain", conf), ("rerun", conf),
                         ("confirm", conf0), ("idle", conf0)):
            rc, secs, rss, err = run_worker(worker, cf, before, a.timeout,
                                            name)
            if rc != 0:
                raise SystemExit("%s: meter-worker exited %d:\n%s"
                                 % (name, rc, err[-4000:]))
            rows.append((name, secs, rss))

            # exact checks after each run: the rerun must add nothing
            if a.mode == "file":
                lines, ids, q = check_jsonl(out, None)
                if (lines, ids, q) != (n, n, total):
                    raise SystemExit("%s: %d lines, %d keys, quantity %d; "
                                     "expected %d, %d, %d"
                                     % (name, lines, ids, q, n, n, total))
            elif a.mode in ("chargebee", "recurly"):
                check_usages(a, fake, name, n, keys, hours, total)
            else:
                with fake.lock:
                    evs = list(fake.events)
                    dups = fake.duplicates
                q = sum(int(e["payload"]["value"]) for e in evs)
                per = {}
                for e in evs:
                    c = e["payload"]["stripe_customer_id"]
                    per[c] = per.get(c, 0) + int(e["payload"]["value"])
                want = {"cus_%08d" % k: sum(quantity(k, h)
                                            for h in range(hours))
                        for k in range(keys)}
                if len(evs) != n or dups or q != total or per != want:
                    raise SystemExit("%s: %d events, %d duplicates, "
                                     "quantity %d; expected %d, 0, %d"
                                     % (name, len(evs), dups, q, n, total))

        print("%-6s %-7s %10s %10s %9s %11s %10s"
              % ("mode", "run", "records", "quantity", "seconds",
                 "records/s", "max RSS"))
        for name, secs, rss in rows:
            recs = n if name == "drain" else 0
            print("%-6s %-7s %10d %10d %9.1f %11s %10s"
                  % (a.mode, name, recs, total if recs else 0, secs,
                     "%.0f" % (n / secs) if recs else
                     "(%.0f kh/s)" % (n / secs),
                     "%.1f MiB" % (rss / 1024.0) if rss else "n/a"))
        if a.mode in ("chargebee", "recurly"):
            secs = rows[0][1]
            print("%s: limit %g requests/min, max_rps %g: %.0f records/min "
                  "(%.0f %% of the limit), %d requests, 429s %d"
                  % (a.mode, a.limit * 60 if a.limit else 0, a.rps,
                     n / secs * 60,
                     100.0 * n / secs * 60 / (a.limit * 60)
                     if a.limit else 0, len(fake.requests), fake.limited))
        if a.mode == "stripe":
            print("fake: latency %.3fs, limit %s/s, 429s %d, most open at "
                  "once %d, stream requests %d"
                  % (a.latency, a.limit, fake.limited, fake.max_open,
                     len(fake.stream_requests)))
            rate = n / rows[0][1]
            print("stripe.max_rps %g: measured %.1f records/s; 1,000,000 "
                  "records would take about %.1f h (extrapolated, not "
                  "measured)" % (a.rps, rate, 1e6 / rate / 3600))
            if n < 10 * a.rps:
                print("  (n < 10 x max_rps: the token bucket's initial burst "
                      "of max_rps requests inflates this rate)")
        print("all checks passed: %d records, total quantity %d, exactly "
              "once" % (n, total))
        return 0
    finally:
        if fake is not None:
            fake.stop()
        redis.stop("kill")
        if a.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
