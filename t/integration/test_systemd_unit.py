"""conf/meter-worker.service (issue 16): systemd-analyze security <= 2.0 and
verify clean, offline (no systemd needed as PID 1); and the real worker
inside what the unit allows.  There is no systemd to run the unit here, so
its sandbox is stood in for: setpriv runs the worker as nobody with no
capabilities and no_new_privs (DynamicUser=, CapabilityBoundingSet=,
NoNewPrivileges=), umask 0077, credentials in $CREDENTIALS_DIRECTORY, and
strace records what it does, which is checked against the unit:
every system call in @system-service and none in @privileged @resources
(SystemCallFilter=), writes only in the state, logs and runtime
directories (ProtectSystem=strict), no other /proc than its own
(ProcSubset=pid), no W+X memory (MemoryDenyWriteExecute=), only AF_UNIX,
AF_INET, AF_INET6 sockets.  Two runs: a drain with the file provider, and
the daemon draining into the fake Stripe while its webhook listener, on a
unix socket in the runtime directory, takes a signed delivery.
KEEP_SANDBOX=1 keeps /tmp/meter-unit-*/ (traces, logs) for a look.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import key_hash, wait_for
from fakes import stripe as stfake
from fakes.stripe import FakeStripe

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "conf" / "meter-worker.service"
WORKER = Path(os.environ.get("METER_WORKER_BIN",
                             ROOT / "worker" / "meter-worker"))
METERCTL = Path(os.environ.get("METERCTL_BIN", ROOT / "worker" / "meterctl"))
ANALYZE = shutil.which("systemd-analyze")
STRACE = shutil.which("strace")
SETPRIV = shutil.which("setpriv")
NOBODY = 65534
EPOCH = "3f2a9c0d11b2e4f7"
REDIS_PW = "pw-unit-0123456789"
STRIPE_KEY = "sk_test_unit_0123456789"
WHSEC = "whsec_unit_0123456789abcdef"

needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (package systemd)")
needs_worker = pytest.mark.skipif(
    not WORKER.exists() or not METERCTL.exists(),
    reason="worker/ not built (make -C worker)")


def analyze(*args):
    r = subprocess.run([ANALYZE, "--no-pager"] + list(args),
                       capture_output=True, text=True, timeout=60)
    print("---- systemd-analyze %s rc=%d\n%s%s"
          % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r


def unit_values(key):
    return [ln.split("=", 1)[1] for ln in UNIT.read_text().splitlines()
            if ln.startswith(key + "=")]


# ------------------------------------------------------------- offline

@needs_analyze
def test_security_exposure_at_most_2_0():
    r = analyze("security", "--offline=yes", "--threshold=20", str(UNIT))
    m = re.search(r"Overall exposure level for meter-worker.service: "
                  r"(\d+\.\d)", r.stdout)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0
    assert r.returncode == 0
    # what is left open is what the worker needs: the network
    left = {ln.split()[1] for ln in r.stdout.splitlines()
            if ln.startswith("\u2717")}
    assert left <= {"RootDirectory=/RootImage=", "PrivateNetwork=",
                    "IPAddressDeny=", "DeviceAllow=",
                    "RestrictAddressFamilies=~AF_UNIX",
                    "RestrictAddressFamilies=~AF_(INET|INET6)"}, left


@needs_analyze
@needs_worker
def test_verify_clean(tmp_path):
    # verify checks that ExecStart= binaries exist: point them at the
    # build; and that Documentation=man: pages exist: test_deb.py checks
    # that on the installed unit
    text = UNIT.read_text().replace("/usr/bin/meter-worker", str(WORKER))
    unit = tmp_path / "meter-worker.service"
    unit.write_text(text)
    r = analyze("verify", "--man=no", str(unit))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # and it does catch a bad unit
    unit.write_text(text.replace("ProtectClock=yes", "ProtectClock=maybe"))
    r = analyze("verify", "--man=no", str(unit))
    assert "Failed to parse boolean value, ignoring: maybe" in r.stderr


# ------------------------------------------------------------- sandbox

def expand(group, seen=None):
    """A systemd syscall group, nested groups expanded."""
    seen = set() if seen is None else seen
    r = analyze("syscall-filter", group)
    names = set()
    for ln in r.stdout.splitlines()[1:]:
        w = ln.strip()
        if not w or w.startswith("#"):
            continue
        if w.startswith("@"):
            if w not in seen:
                seen.add(w)
                names |= expand(w, seen)
        else:
            names.add(w)
    assert names, group
    return names


SYSCALL = re.compile(r"^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def parse_trace(path):
    calls, writes, procs, wx, families = set(), [], [], [], set()
    for ln in Path(path).read_text(errors="replace").splitlines():
        m = SYSCALL.match(ln)
        if m is None:
            continue
        name = m.group(1) or m.group(2)
        calls.add(name)
        if name in ("open", "openat", "creat"):
            p = re.search(r'"([^"]*)"', ln)
            if p is None:
                continue
            if p.group(1).startswith("/proc/"):
                procs.append(p.group(1))
            flags = ln.split(", ")[2] if name == "openat" else ln
            if name == "creat" or any(f in flags for f in WRITE_FLAGS):
                writes.append(p.group(1))
        elif name in ("mkdir", "mkdirat", "unlink", "unlinkat", "rename",
                      "renameat", "renameat2", "link", "linkat", "symlink",
                      "symlinkat", "truncate", "chmod", "fchmodat",
                      "utimensat", "mknod", "mknodat"):
            writes += re.findall(r'"([^"]*)"', ln)
        elif name == "bind":
            writes += re.findall(r'sun_path="([^"]*)"', ln)
        elif name in ("mmap", "mprotect", "pkey_mprotect"):
            if "PROT_WRITE" in ln and "PROT_EXEC" in ln:
                wx.append(ln)
        elif name in ("socket", "socketpair") and "resumed>" not in ln:
            # a call another thread interrupted resumes on a line of its own
            # that has no arguments; its family is on the first line
            f = re.search(r"\((AF_\w+|\d+)", ln)
            families.add(f.group(1))
    return calls, writes, procs, wx, families


class Sandbox:
    """The directories systemd would make for the unit, owned by the user
    the worker runs as, outside pytest's 0700 tmp (nobody must reach
    them); the worker run under setpriv + strace."""

    def __init__(self, base):
        self.base = Path(base)
        self.base.chmod(0o755)
        self.as_root = os.geteuid() == 0
        self.dirs = {}
        for d, mode in (("state", 0o750), ("logs", 0o750), ("run", 0o755),
                        ("creds", 0o500), ("etc", 0o755),
                        ("trace", 0o755)):
            p = self.base / d
            p.mkdir(mode=mode)
            p.chmod(mode)
            self.dirs[d] = p
        self.traces = []

    def credential(self, name, value):
        p = self.dirs["creds"] / name
        p.write_text(value + "\n")
        p.chmod(0o400)

    def seal(self):
        """systemd hands StateDirectory= etc. and the credentials to the
        service's user."""
        if self.as_root:
            for d in ("state", "logs", "run", "creds", "trace"):
                for p in [self.dirs[d]] + list(self.dirs[d].iterdir()):
                    os.chown(p, NOBODY, NOBODY)

    def config(self, lines):
        conf = self.dirs["etc"] / "worker.conf"
        conf.write_text("\n".join(["# test_systemd_unit.py"] + lines) + "\n")
        conf.chmod(0o644)
        return conf

    def env(self):
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "LANG", "LC_ALL")}
        env["CREDENTIALS_DIRECTORY"] = str(self.dirs["creds"])
        return env

    def argv(self, *args):
        trace = self.dirs["trace"] / ("%d" % len(self.traces))
        self.traces.append(trace)
        cmd = [STRACE, "-f", "-qq", "-s", "256", "-o", str(trace),
               str(WORKER)] + list(args)
        if self.as_root:
            # DynamicUser=, CapabilityBoundingSet=, NoNewPrivileges=
            cmd = [SETPRIV, "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                   "--clear-groups", "--no-new-privs", "--inh-caps=-all",
                   "--bounding-set=-all"] + cmd
        return cmd

    def check(self, trace):
        calls, writes, procs, wx, families = parse_trace(trace)
        assert calls, trace
        allowed = expand("@system-service")
        denied = expand("@privileged") | expand("@resources")
        assert calls - allowed == set()
        assert calls & denied == set()
        ok = [str(self.dirs[d]) + "/" for d in ("state", "logs", "run")]
        stray = [p for p in writes
                 if not p.startswith(tuple(ok)) and p != "/dev/null"]
        assert stray == []
        # ProcSubset=pid, ProtectProc=invisible: only its own process
        assert [p for p in procs
                if not re.match(r"/proc/(self|thread-self|\d+)/", p)] == []
        assert wx == []
        assert families <= {"AF_UNIX", "AF_INET", "AF_INET6"}, families
        return calls


def put(redis, key, hour_ts, value):
    """Usage as the module's flush writes it (docs/redis-schema.md)."""
    kh = key_hash(key)
    h = time.strftime("%Y%m%d%H", time.gmtime(hour_ts))
    redis.cmd("SADD", "mtr:idx:%s" % h, kh)
    redis.cmd("ZADD", "mtr:hours", "NX", str(hour_ts), h)
    redis.cmd("HSET", "mtr:u:{%s}:%s" % (kh, h), "calls|%s.1" % EPOCH,
              str(value))
    return kh


def iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@pytest.fixture
def sandbox(redis):
    if STRACE is None:
        pytest.skip("strace not installed")
    if os.geteuid() == 0 and SETPRIV is None:
        pytest.skip("setpriv (util-linux) not installed")
    # the worker authenticates with a credential, as the unit makes it
    redis.cmd("CONFIG", "SET", "requirepass", REDIS_PW)
    redis.use(password=REDIS_PW)
    base = tempfile.mkdtemp(prefix="meter-unit-", dir="/tmp")
    try:
        s = Sandbox(base)
        s.credential("redis-password", REDIS_PW)
        yield s
    finally:
        if not os.environ.get("KEEP_SANDBOX"):
            shutil.rmtree(base, ignore_errors=True)


def umask077():
    os.umask(0o077)


@needs_analyze
@needs_worker
def test_drain_inside_the_sandbox(redis, sandbox):
    s = sandbox
    hour = (int(time.time()) // 3600 - 2) * 3600
    kh = put(redis, "mk_unit_file", hour, 41)
    out = s.dirs["state"] / "usage.jsonl"
    audit = s.dirs["logs"] / "audit.jsonl"
    conf = s.config(["redis = %s" % redis.address,
                     "redis.password_file = redis-password",
                     "provider = file",
                     "file.path = %s" % out,
                     "audit.path = %s" % audit])
    s.seal()
    r = subprocess.run(s.argv("-c", str(conf), "--once", "--before",
                              iso(hour + 3600)),
                       capture_output=True, text=True, timeout=120,
                       env=s.env(), preexec_fn=umask077,
                       stdin=subprocess.DEVNULL)
    print(r.stderr)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["key_hash"], x["meter"], x["quantity"]) for x in lines] == \
        [(kh, "calls", 41)]
    assert len(audit.read_text().splitlines()) == 1
    # UMask=0077: nothing it writes is readable by others
    for p in (out, audit):
        assert os.stat(p).st_mode & 0o077 == 0, p
    s.check(s.traces[0])


def unix_post(path, target, body, headers):
    head = "".join("%s: %s\r\n" % kv for kv in headers.items())
    req = ("POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
           "Connection: close\r\n%s\r\n" % (target, len(body), head))
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(req.encode() + body)
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@needs_analyze
@needs_worker
def test_daemon_and_webhook_inside_the_sandbox(redis, sandbox):
    s = sandbox
    with FakeStripe(api_key=STRIPE_KEY) as fake:
        cus = fake.add_customer()
        sub = fake.add_subscription(cus["id"])
        s.credential("stripe-api-key", STRIPE_KEY)
        s.credential("stripe-webhook-secret", WHSEC)
        sock = s.dirs["run"] / "webhook.sock"
        conf = s.config(["redis = %s" % redis.address,
                         "redis.password_file = redis-password",
                         "provider = stripe",
                         "stripe.api_key_file = stripe-api-key",
                         "stripe.base_url = %s" % fake.url,
                         "stripe.max_rps = 0",
                         "stripe.webhook_secret_file = stripe-webhook-secret",
                         "webhook.listen = unix:%s" % sock,
                         "sync.delinquency = off",
                         "audit.path = %s" % (s.dirs["logs"] / "audit.jsonl"),
                         "log_level = debug"])
        ctl_env = dict(os.environ,
                       CREDENTIALS_DIRECTORY=str(s.dirs["creds"]))
        for args, stdin in ((["customers", "add", "acme", "--provider",
                              "stripe", "--provider-customer", cus["id"],
                              "--subscription", sub["id"]], None),
                            (["keys", "add", "-", "--customer", "acme"],
                             "mk_unit_stripe\n")):
            r = subprocess.run([str(METERCTL), "-c", str(conf)] + args,
                               input=stdin, capture_output=True, text=True,
                               timeout=60, env=ctl_env)
            assert r.returncode == 0, r.stdout + r.stderr
        hour = (int(time.time()) // 3600 - 2) * 3600
        put(redis, "mk_unit_stripe", hour, 17)
        s.seal()
        log = open(s.base / "worker.log", "wb")
        p = subprocess.Popen(s.argv("-c", str(conf)), stdout=log,
                             stderr=subprocess.STDOUT, env=s.env(),
                             preexec_fn=umask077, stdin=subprocess.DEVNULL)
        log.close()

        def worker_log():
            return (s.base / "worker.log").read_text(errors="replace")

        try:
            # the closed hour is drained at start
            wait_for(lambda: fake.total(cus["id"], "calls") == 17, 30,
                     msg=worker_log)
            wait_for(sock.exists, 10, msg=worker_log)
            assert os.stat(sock).st_mode & 0o777 == 0o666
            inv = {"id": "in_unit", "object": "invoice",
                   "customer": cus["id"], "subscription": sub["id"],
                   "status": "open"}
            body = json.dumps(stfake.event("invoice.payment_failed",
                                           inv)).encode()
            st, answer = unix_post(str(sock), "/webhooks/stripe", body, {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": stfake.sign(body, WHSEC)})
            assert st == 200, answer
            assert redis.hgetall("mtr:cust:{acme}").get("status") == \
                "delinquent"
        finally:
            # the worker itself, strace's child (strace would pass it on
            # only as a SIGKILL)
            kids = Path("/proc/%d/task/%d/children" % (p.pid, p.pid))
            for pid in kids.read_text().split():
                os.kill(int(pid), signal.SIGTERM)
            rc = p.wait(30)
        print(worker_log())
        assert rc == 0
        assert fake.total(cus["id"], "calls") == 17
    audit = s.dirs["logs"] / "audit.jsonl"
    assert os.stat(audit).st_mode & 0o077 == 0
    calls = s.check(s.traces[0])
    # the listener thread ran inside the same filter
    assert {"bind", "listen", "accept4"} & calls >= {"bind", "listen"}
