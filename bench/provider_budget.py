#!/usr/bin/python3
"""Requests a provider spends per record: N customers x M closed hours, one
`meter-worker --once` pass per hour (the daemon's hourly turns), against the
fakes in t/fakes, counted by method and path (ids folded to *).  See
bench/README.md ("provider_budget").

    /usr/bin/python3 bench/provider_budget.py [--n 100] [--hours 3]
        [--provider chargebee,chargebee-nocache,recurly,stripe]

chargebee-nocache is chargebee with chargebee.subscription_ttl = 0 (every
pass fetches every subscription, as before the cache).  Uses the same
drain as t/integration/test_provider_budget.py, which asserts the counts
exactly; this prints them for any N and M.
"""

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "t"))
sys.path.insert(0, str(ROOT / "t" / "integration"))

from conftest import RedisServer  # noqa: E402
import test_provider_budget as budget  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--hours", type=int, default=3)
    ap.add_argument("--provider",
                    default="chargebee,chargebee-nocache,recurly,stripe")
    a = ap.parse_args()

    for name in a.provider.split(","):
        provider, extra = name, {}
        if name == "chargebee-nocache":
            provider, extra = "chargebee", {"chargebee.subscription_ttl": "0"}
        with tempfile.TemporaryDirectory() as tmp:
            r = RedisServer(Path(tmp) / "redis")
            r.start()
            try:
                # the worker's logs stay out of the table
                with contextlib.redirect_stdout(io.StringIO()):
                    fake, _, counts, _ = budget.drain(provider, r, Path(tmp),
                                                      a.n, a.hours, extra)
                fake.stop()
            finally:
                r.stop("kill")
        records = a.n * a.hours
        total = sum(counts.values())
        print("%s: %d customers x %d hours, %d records, %d requests "
              "(%.2f per record)" % (name, a.n, a.hours, records, total,
                                     total / records))
        for k in sorted(counts):
            print("    %6d  %s" % (counts[k], k))


if __name__ == "__main__":
    main()
