#!/usr/bin/python3
"""What adding a field costs Redis by the size of the hash it goes into
(bench/README.md, "The writer hash in parts").  A fresh redis-server on a
free loopback port, N new fields KH|calls|GEN (hex, 72 bytes; or base64 of
the hash, 51) in hashes of PART fields each (0: one hash), HSETs of at most
512 fields, 8 pipelined.  Prints commandstats and CPU per field, memory.

  bench/hash_parts.py [hex|b64] [PART] [N]"""

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "t"))
from conftest import free_port  # noqa: E402


def main():
    enc = sys.argv[1] if len(sys.argv) > 1 else "hex"
    part = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    n_fields = int(sys.argv[3]) if len(sys.argv) > 3 else 1000000
    port = free_port()
    d = tempfile.mkdtemp(prefix="bench-hash-")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind",
                          "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", d], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        f = s.makefile("rb")

        def bulk(x):
            x = x.encode() if isinstance(x, str) else x
            return b"$%d\r\n%s\r\n" % (len(x), x)

        def cmd(*a):
            return b"*%d\r\n" % len(a) + b"".join(bulk(x) for x in a)

        def rd():
            line = f.readline()
            if line[:1] == b"$":
                k = int(line[1:])
                return None if k < 0 else f.read(k + 2)[:-2]
            if line[:1] == b"*":
                return [rd() for _ in range(int(line[1:]))]
            return line

        def call(*a):
            s.sendall(cmd(*a))
            return rd()

        def cpu():
            st = open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1]
            st = st.split()
            return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")

        def field(i):
            kh = hashlib.sha256(b"k%d" % i).digest()
            k = (kh.hex() if enc == "hex"
                 else base64.urlsafe_b64encode(kh).rstrip(b"=").decode())
            return "%s|calls|%d" % (k, i + 1)

        call("CONFIG", "RESETSTAT")
        c0 = cpu()
        i, out = 0, []
        while i < n_fields:
            if part:
                k = min(part - i % part, n_fields - i, 512)
                key = "h:%d" % (i // part)
            else:
                k = min(512, n_fields - i)
                key = "h"
            a = ["HSET", key]
            for j in range(i, i + k):
                a += [field(j), str(j % 1000 + 1)]
            out.append(cmd(*a))
            i += k
            if len(out) == 8 or i >= n_fields:
                s.sendall(b"".join(out))
                for _ in out:
                    rd()
                out = []
        c1 = cpu()
        usec = 0
        for line in call("INFO", "commandstats").decode().split("\r\n"):
            if line.startswith("cmdstat_hset:"):
                kv = dict(x.split("=") for x in line.split(":")[1].split(","))
                usec = int(kv["usec"])
        mem = [int(line.split(":")[1]) for line in
               call("INFO", "memory").decode().split("\r\n")
               if line.startswith("used_memory:")][0]
        print("%s part=%d fields=%d len=%d: commandstats %.3f us/field, "
              "cpu %.3f us/field, %.0f bytes/field, %s"
              % (enc, part, n_fields, len(field(1)), usec / n_fields,
                 (c1 - c0) * 1e6 / n_fields, mem / n_fields,
                 call("OBJECT", "ENCODING", "h:0" if part else "h")
                 .decode()))
    finally:
        p.terminate()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
