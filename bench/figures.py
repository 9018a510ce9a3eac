#!/usr/bin/python3
"""What counting and billing unique users costs meter-worker at N index
members of mtr:uqidx:YYYYMM.  Not a pass/fail test, but every run checks
its result exactly.  See bench/README.md ("figures").

In a temp dir: a redis-server on a free port, seeded the way the module
writes unique=$var (docs/redis-schema.md, "Unique users"): N keys, each
with one member KH|users|YYYYMM in the index, a set of 3 members and the
HLL; keys 2i and 2i+1 belong to customer ci (the union of two keys' sets),
a user shared by both.  Then `meter-worker --once --before` three times
with the file provider:

  count   an hour closed: every index member read, figures computed and
          billed (N / 2 records of 5 users each)
  same    the same hour again: nothing new closed, nothing read
  next    the next hour closed: counted again, nothing changed, no record

Prints seconds, the worker's CPU, Redis' CPU (INFO cpu) and the commands
Redis ran (INFO stats total_commands_processed) per run.
"""

import argparse
import hashlib
import json
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
from drain import resp, run_worker  # noqa: E402


def member(s):
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def seed(redis, tmp, n, month):
    path = tmp / "seed.resp"
    ncmd = 0
    with open(path, "wb") as f:
        for k in range(n):
            kh = hashlib.sha256(b"mk_uq_%08d" % k).hexdigest()
            c = "c%08d" % (k // 2)
            users = [member("u%d-%d" % (k // 2, j)) for j in
                     ((0, 1, 2) if k % 2 == 0 else (2, 3, 4))]
            f.write(resp("HSET", "mtr:key:{%s}" % kh, "customer", c))
            f.write(resp("SADD", "mtr:uqidx:" + month,
                         "%s|users|%s" % (kh, month)))
            f.write(resp("SADD", "mtr:uq:{%s}:users:%s" % (kh, month),
                         *users))
            f.write(resp("PFADD", "mtr:uh:{%s}:users:%s" % (kh, month),
                         *users))
            ncmd += 4
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-h", redis.host, "-p",
                            str(redis.port), "--pipe"], stdin=f,
                           capture_output=True, text=True, timeout=3600)
    path.unlink()
    if r.returncode != 0 or "errors: 0, replies: %d" % ncmd not in r.stdout:
        raise SystemExit("seeding failed:\n" + r.stdout + r.stderr)


def redis_load(redis):
    info = redis.cmd("INFO", "all")
    if isinstance(info, bytes):
        info = info.decode()
    v = dict(line.split(":", 1) for line in info.splitlines()
             if ":" in line and not line.startswith("#"))
    return (float(v["used_cpu_user"]) + float(v["used_cpu_sys"]),
            int(v["total_commands_processed"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200000,
                    help="index members (keys), default 200000")
    args = ap.parse_args()
    worker = ROOT / "worker" / "meter-worker"

    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-fig-"))
    redis = RedisServer(tmp / "redis")
    try:
        redis.start()
        now = int(time.time())
        hc = now // 3600 * 3600 - 3600       # closed, in this month
        month = time.strftime("%Y%m", time.gmtime(hc))
        if time.strftime("%Y%m", time.gmtime(hc - 3600)) != month:
            raise SystemExit("the first hour of a month: run it later")
        t0 = time.monotonic()
        seed(redis, tmp, args.n, month)
        print("seeded %d index members in %.1f s" % (args.n,
                                                     time.monotonic() - t0))
        out = tmp / "out.jsonl"
        conf = tmp / "worker.conf"
        conf.write_text("redis = %s\nprovider = file\nfile.path = %s\n"
                        "log_level = info\n" % (redis.address, out))
        rows = []
        for name, before in (("count", hc), ("same", hc),
                             ("next", hc + 3600)):
            cpu0, cmd0 = redis_load(redis)
            rc, secs, rss, err = run_worker(worker, conf, before, 3600, name)
            cpu1, cmd1 = redis_load(redis)
            if rc != 0:
                raise SystemExit("%s: rc %d\n%s" % (name, rc, err))
            rows.append((name, secs, cpu1 - cpu0, cmd1 - cmd0, rss))
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        want = args.n // 2
        ok = (len(lines) == want
              and len({x["idempotency_key"] for x in lines}) == want
              and all(x["quantity"] == 5 for x in lines))
        print("| run | s | Redis CPU s | Redis commands | worker max RSS |")
        print("|---|---|---|---|---|")
        for name, secs, cpu, cmds, rss in rows:
            print("| %s | %.2f | %.2f | %d | %s |" % (
                name, secs, cpu, cmds,
                "%.1f MiB" % (rss / 1024) if rss else "?"))
        print("records %d (want %d), each 5 users: %s" % (
            len(lines), want, "ok" if ok else "WRONG"))
        return 0 if ok else 1
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
