"""Fixtures for the integration tests: a real redis-server and the real nginx
with ngx_http_meter_module, each in the foreground on free loopback ports in
a temp dir (models: nginx/unit test/conftest.py, nginx-tests Test::Nginx).

Helpers that tests import (``from conftest import ...``): free_port,
wait_for, key_hash, usage, totals, nginx_t, line_of, Resp, Client,
raw_request, Traffic, utc_hour, Backend (fixture backend), curl, H2Client,
meterctl.
"""

import datetime
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_SO = ROOT / "build" / "nginx" / "ngx_http_meter_module.so"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


# ---------------------------------------------------------------- basics

def free_port():
    """A port the kernel just handed out; tiny race, so callers retry."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout=10.0, interval=0.05, msg=None):
    """Polls predicate until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            detail = msg() if callable(msg) else msg
            raise AssertionError("timed out after %.1fs: %s (last: %r)"
                                 % (timeout, detail or predicate, last))
        time.sleep(interval)


def key_hash(key):
    if isinstance(key, str):
        key = key.encode()
    return hashlib.sha256(key).hexdigest()


def utc_hour(t=None):
    t = time.time() if t is None else t
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).strftime("%Y%m%d%H")


# ---------------------------------------------------------------- redis

class RespError(Exception):
    pass


class Resp:
    """Just enough RESP2 to talk to redis-server (no redis-py here)."""

    def __init__(self, host, port, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if not isinstance(a, bytes):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise RespError("bad reply %r" % line)


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


class RedisServer:
    """redis-server in the foreground; stop()/start() keep port and dir."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = None
        self.proc = None
        self._conn = None
        self.socket = str(self.tmp / "redis.sock")
        self.password = None        # set after CONFIG SET requirepass
        self.db = 0                 # what cmd() SELECTs

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def start(self, timeout=10.0):
        self.password = None        # a restart forgets CONFIG SET
        fresh = self.port is None
        for _ in range(5 if fresh else 1):
            if fresh:
                self.port = free_port()
            log = open(self.tmp / "redis.log", "ab")
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port),
                 "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.tmp), "--dbfilename", "dump.rdb",
                 "--unixsocket", self.socket, "--unixsocketperm", "777",
                 "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.cmd("PING") == "PONG":
                        return self
                except (OSError, RespError, ConnectionError):
                    self._drop()
                time.sleep(0.02)
            self._kill()
        raise RuntimeError("redis-server did not start:\n" + self.log())

    def stop(self, how="term", timeout=10.0):
        """how: "save" (SHUTDOWN SAVE: the restart loads the data back),
        "term" (SIGTERM) or "kill" (SIGKILL): the data is gone (--save ''
        and any older dump is removed)."""
        if self.proc is None:
            return
        if how == "save":
            try:
                self.cmd("SHUTDOWN", "SAVE")
            except (OSError, RespError, ConnectionError):
                pass
        elif how == "kill":
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drop()
        self.proc = None
        if how != "save":
            (self.tmp / "dump.rdb").unlink(missing_ok=True)

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._drop()

    def _drop(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def use(self, db=0, password=None):
        """Later commands go to db, authenticating with password."""
        self.db, self.password = db, password
        self._drop()

    def log(self):
        p = self.tmp / "redis.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def client(self):
        return Resp(self.host, self.port)

    def cmd(self, *args):
        """One command on a kept connection, reconnecting when needed."""
        if self._conn is None:
            conn = Resp(self.host, self.port)
            try:
                if self.password is not None:
                    conn("AUTH", self.password)
                if self.db:
                    conn("SELECT", self.db)
            except Exception:
                conn.close()
                raise
            self._conn = conn
        try:
            return self._conn(*args)
        except (OSError, ConnectionError):
            self._drop()
            raise

    # conveniences; names and values come back as str

    def hgetall(self, key):
        r = self.cmd("HGETALL", key) or []
        return {_s(r[i]): _s(r[i + 1]) for i in range(0, len(r), 2)}

    def smembers(self, key):
        return {_s(m) for m in self.cmd("SMEMBERS", key) or []}

    def zrange_withscores(self, key):
        r = self.cmd("ZRANGE", key, 0, -1, "WITHSCORES") or []
        return {_s(r[i]): int(float(_s(r[i + 1])))
                for i in range(0, len(r), 2)}

    def keys(self, pattern="*"):
        return sorted(_s(k) for k in self.cmd("KEYS", pattern) or [])


@pytest.fixture
def redis(tmp_path):
    """A fresh redis-server per test (outage tests stop and restart it)."""
    r = RedisServer(tmp_path / "redis")
    r.start()
    yield r
    r.stop("kill")


_DATA_KEY = re.compile(r"^mtr:u:\{([0-9a-f]{64})\}:(\d{10})$")
_WRITER_KEY = re.compile(r"^mtr:wu:\{([0-9a-f]{16})\}:(\d+):(\d{10}):(\d+)$")
# METER: a name, or a gauge's name and ":max" (MTR_GAUGE_MAX_SFX) or
# ":last" (MTR_GAUGE_LAST_SFX)
_WRITER_FIELD = re.compile(r"^([0-9a-f]{64})\|([A-Za-z0-9_.-]{1,28}:max"
                           r"|[A-Za-z0-9_.-]{1,27}:last"
                           r"|[A-Za-z0-9_.-]{1,32})\|(\d+)$")


def usage_fields(redis, writers=True, keyed=True):
    """Every counter in Redis, both layouts of docs/redis-schema.md:
    {(key_hash, hour, "METER|EPOCH.GEN"): value}.  A counter written to
    several places (writer sessions, the key layout) counts once, with its
    largest value: each copy is the same slot's absolute count."""
    out = {}

    def put(k, v):
        out[k] = max(out.get(k, 0), int(v))

    for k in redis.keys("mtr:u:*") if keyed else []:
        m = _DATA_KEY.match(k)
        assert m, "bad usage key name %r" % k
        for field, value in redis.hgetall(k).items():
            put((m.group(1), m.group(2), field), value)
    for k in redis.keys("mtr:wu:*") if writers else []:
        m = _WRITER_KEY.match(k)
        assert m, "bad writer usage key name %r" % k
        writer = "%s:%s:" % (m.group(1), m.group(2))
        idx = [w for w in redis.smembers("mtr:widx:" + m.group(3))
               if w.startswith(writer)]
        assert len(idx) == 1 and int(m.group(4)) < int(idx[0].split(":")[2]), \
            "%s (part %s) not in mtr:widx:%s" % (writer, m.group(4),
                                                 m.group(3))
        for field, value in redis.hgetall(k).items():
            f = _WRITER_FIELD.match(field)
            assert f, "bad writer usage field %r" % field
            put((f.group(1), m.group(3),
                 "%s|%s.%s" % (f.group(2), m.group(1), f.group(3))), value)
    return out


def usage(redis, key, meter, hour=None):
    """Total of (key, meter): the sum of its counters (usage_fields) over
    the given hour, or over every hour."""
    kh = key_hash(key)
    total = 0
    for (k, h, field), v in usage_fields(redis).items():
        if (k == kh and field.split("|", 1)[0] == meter
                and (hour is None or h == hour)):
            total += v
    return total


def totals(redis):
    """Every metered total in Redis: {(key_hash, meter): value}, summed over
    writers and hours; zero totals are left out."""
    out = Counter()
    for (kh, _, field), v in usage_fields(redis).items():
        out[(kh, field.split("|", 1)[0])] += v
    return {k: v for k, v in out.items() if v}


_USED_KEY = re.compile(r"^mtr:used:\{([0-9a-f]{64})\}$")


def used_totals(redis):
    """Lifetime usage: {(key_hash, meter): value} from mtr:used:{KH}."""
    out = {}
    for k in redis.keys("mtr:used:*"):
        m = _USED_KEY.match(k)
        assert m, "bad lifetime usage key name %r" % k
        for meter, value in redis.hgetall(k).items():
            if int(value):
                out[(m.group(1), meter)] = int(value)
    return out


def expect_totals(redis, expected, timeout=15.0, settle=0.5, used=None):
    """Waits until totals(redis) == expected (keys given as raw keys or
    hashes), then checks again after `settle` seconds so a late double
    count cannot slip through.  mtr:used (what was flushed while a key had
    prepaid credit) must equal `used` when given; otherwise, for a key
    whose counters are all in the key layout it equals their total (every
    unit the max-only script raised a field by, added once), and no key's
    is above its key layout total."""
    want = {}
    for (key, meter), v in expected.items():
        kh = key if (isinstance(key, str) and re.fullmatch(
            r"[0-9a-f]{64}", key)) else key_hash(key)
        if v:
            want[(kh, meter)] = want.get((kh, meter), 0) + v
    got = {}

    def same():
        nonlocal got
        got = totals(redis)
        return got == want

    try:
        wait_for(same, timeout, 0.1)
    except AssertionError:
        pass
    assert got == want, _diff(got, want)
    time.sleep(settle)
    got = totals(redis)
    assert got == want, "changed after settling: " + _diff(got, want)
    got_used = used_totals(redis)
    if used is not None:
        want_used = {(key_hash(k), m): v for (k, m), v in used.items() if v}
        assert got_used == want_used, "mtr:used:{KH} " + _diff(got_used,
                                                               want_used)
        return
    keyed = key_layout_totals(redis)
    both = {(kh, f.split("|", 1)[0])
            for (kh, _, f) in usage_fields(redis, keyed=False)}
    assert all(got_used.get(k, 0) <= v for k, v in keyed.items()), \
        "mtr:used:{KH} " + _diff(got_used, keyed)
    only = {k: v for k, v in keyed.items() if k not in both}
    assert {k: v for k, v in got_used.items() if k not in both} == only, \
        "mtr:used:{KH} " + _diff(got_used, only)


def key_layout_totals(redis):
    """{(key_hash, meter): value} over the key layout (mtr:u) alone."""
    out = Counter()
    for (kh, h, field), v in usage_fields(redis, writers=False).items():
        out[(kh, field.split("|", 1)[0])] += v
    return {k: v for k, v in out.items() if v}


def _diff(got, want):
    lines = []
    for k in sorted(set(got) | set(want)):
        if got.get(k) != want.get(k):
            lines.append("  %s.. %s: redis %s, expected %s"
                         % (k[0][:12], k[1], got.get(k), want.get(k)))
    return "totals differ:\n" + "\n".join(lines)


# ---------------------------------------------------------------- nginx

CONF_TEMPLATE = """\
{load_module}
{user}
daemon off;
master_process on;
worker_processes {workers};
worker_shutdown_timeout 10s;
error_log {tmp}/error.log info;
{main_conf}
events {{
    worker_connections 1024;
}}

http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body_temp;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;

{http_conf}
}}
"""


def render_conf(tmp, http_conf, workers=2, main_conf="", module=True,
                **subst):
    """The full nginx.conf.  @TMP@, @PORT@, @PORT2@, @REDIS@ ... in
    http_conf/main_conf are replaced from subst (keys upper-cased)."""
    text = CONF_TEMPLATE.format(
        # module: True for this tree's build, or the path of another one
        load_module=("load_module %s;" % (MODULE_SO if module is True
                                           else module)) if module else "",
        # as root the workers would run as nobody and could not write the
        # 0700 pytest tmp dirs; the tests need no privilege separation
        user="user root root;" if os.geteuid() == 0 else "",
        workers=workers, tmp=tmp, main_conf=main_conf,
        http_conf=http_conf)
    subst = dict(subst, tmp=tmp)
    for k, v in subst.items():
        text = text.replace("@%s@" % k.upper(), str(v))
    left = re.findall(r"@[A-Z0-9_]+@", text)
    assert not left, "unreplaced %s in nginx.conf" % left
    return text


def line_of(text, needle, last=False):
    """1-based line number of the first (or last) line containing needle."""
    found = [i + 1 for i, line in enumerate(text.splitlines())
             if needle in line]
    assert found, "%r not in conf" % needle
    return found[-1] if last else found[0]


def _ppid(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


class Nginx:
    ALERT = re.compile(r"\[(alert|emerg)\]")

    def __init__(self, tmp, http_conf, workers=2, main_conf="", module=True,
                 expect_alerts=(), **subst):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.main_conf = main_conf
        self.module = module
        self.expect_alerts = [re.compile(p) for p in expect_alerts]
        self.port = free_port()
        self.port2 = free_port()
        self.subst = dict(subst, port=self.port, port2=self.port2)
        self.proc = None
        self.write_conf(http_conf)

    def write_conf(self, http_conf):
        self.http_conf = http_conf
        self.conf_text = render_conf(self.tmp, http_conf, self.workers,
                                     self.main_conf, self.module,
                                     **self.subst)
        (self.tmp / "nginx.conf").write_text(self.conf_text)

    def _args(self):
        return ["-p", "%s/" % self.tmp, "-c", "nginx.conf",
                "-e", str(self.tmp / "error.log"),
                "-g", "pid %s/nginx.pid;" % self.tmp]

    def start(self, timeout=10.0):
        """Starts nginx; a port taken meanwhile by someone else (free_port
        races with parallel test runs) means new ports and another try."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError:
                if ("Address already in use" not in self.log()
                        or attempt == 2):
                    raise
            for name in ("error.log", "stderr.log"):
                (self.tmp / name).unlink(missing_ok=True)
            self.port = free_port()
            self.port2 = free_port()
            self.subst.update(port=self.port, port2=self.port2)
            self.write_conf(self.http_conf)

    def _start(self, timeout):
        out = open(self.tmp / "stderr.log", "ab")
        self.proc = subprocess.Popen([NGINX] + self._args(), stdout=out,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        out.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited with %s:\n%s"
                                   % (self.proc.returncode, self.log()))
            return (port_open(self.port)
                    and len(self.worker_pids()) == self.workers)

        wait_for(up, timeout, msg=self.log)
        return self

    @property
    def master_pid(self):
        return self.proc.pid

    def worker_pids(self):
        """Live workers of the master that are not shutting down."""
        pids = set()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if (_ppid(int(d)) == self.master_pid
                        and _cmdline(int(d)) == "nginx: worker process"):
                    pids.add(int(d))
            except (OSError, IndexError, ValueError):
                pass
        return pids

    def all_children(self):
        pids = set()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if _ppid(int(d)) == self.master_pid:
                        pids.add(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        return pids

    def reload(self, http_conf=None, timeout=15.0):
        """nginx -s reload; returns once a full set of new workers runs."""
        if http_conf is not None:
            self.write_conf(http_conf)
        old = self.worker_pids()
        r = subprocess.run([NGINX, "-s", "reload"] + self._args(),
                           capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, "nginx -s reload: %s%s" % (r.stdout,
                                                             r.stderr)

        def new_workers():
            cur = self.worker_pids()
            return len(cur) == self.workers and not (cur & old)

        wait_for(new_workers, timeout, msg=self.log)

    def kill_worker(self, pid=None, timeout=10.0):
        """SIGKILLs one worker; returns once the master replaced it."""
        pid = pid or sorted(self.worker_pids())[0]
        os.kill(pid, signal.SIGKILL)
        self.expect_alerts.append(
            re.compile(r"worker process %d exited on signal 9" % pid))

        def replaced():
            cur = self.worker_pids()
            return len(cur) == self.workers and pid not in cur

        wait_for(replaced, timeout, msg=self.log)
        return pid

    def stop(self, timeout=15.0):
        """SIGQUIT (graceful, workers flush on exit), then SIGTERM."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, t in ((signal.SIGQUIT, timeout), (signal.SIGTERM, 5),
                       (signal.SIGKILL, 5)):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(t)
                return
            except subprocess.TimeoutExpired:
                pass

    def log(self):
        text = ""
        for name in ("error.log", "stderr.log"):
            p = self.tmp / name
            if p.exists():
                text += p.read_text(errors="replace")
        return text

    @property
    def error_log(self):
        return self.log()

    def unexpected_alerts(self):
        return [line for line in self.log().splitlines()
                if self.ALERT.search(line)
                and not any(p.search(line) for p in self.expect_alerts)]

    # traffic helpers

    def get(self, path, headers=None, method="GET", body=None, port=None):
        c = http.client.HTTPConnection("127.0.0.1", port or self.port,
                                       timeout=10)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def nginx_factory(tmp_path, request):
    """nginx_factory(http_conf, workers=2, main_conf="", module=True,
    expect_alerts=(), **subst) -> a started Nginx.  Stopped at teardown;
    unexpected [alert]/[emerg] lines fail the test."""
    instances = []

    def make(http_conf, workers=2, **kw):
        if kw.get("module", True) and not MODULE_SO.exists():
            pytest.fail("%s missing: run make" % MODULE_SO)
        n = Nginx(tmp_path / ("nginx%d" % len(instances)), http_conf,
                  workers, **kw)
        instances.append(n)
        return n.start()

    yield make

    for n in instances:
        n.stop()
    failed = getattr(request.node, "rep_call", None)
    failed = failed is not None and failed.failed
    bad = []
    for n in instances:
        if failed or n.unexpected_alerts():
            print("---- %s/error.log ----" % n.tmp)
            print(n.log()[-20000:])
        bad += n.unexpected_alerts()
    if bad:
        pytest.fail("unexpected alerts in error.log:\n" + "\n".join(bad))


def nginx_t(http_conf, main_conf="", module=True, **subst):
    """nginx -t on a config built like the fixture's; returns
    (rc, output, conf_text, conf_path).  Its own temp dir, whose name holds
    no directive names (tests search the output for them)."""
    tmp = Path(tempfile.mkdtemp(prefix="ngxt"))
    try:
        subst.setdefault("port", free_port())
        subst.setdefault("port2", free_port())
        text = render_conf(tmp, http_conf, 1, main_conf, module, **subst)
        conf = tmp / "nginx.conf"
        conf.write_text(text)
        r = subprocess.run(
            [NGINX, "-t", "-p", "%s/" % tmp, "-c", "nginx.conf",
             "-e", "stderr", "-g", "pid %s/nginx.pid;" % tmp],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=30)
        out = r.stdout + r.stderr
        log = tmp / "error.log"
        if log.exists():
            out += log.read_text(errors="replace")
        return r.returncode, out, text, str(conf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- traffic

def raw_request(port, data, timeout=10.0):
    """Sends raw request bytes (one request, Connection: close) and returns
    the raw response bytes: their length is nginx's $bytes_sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def raw_status(resp):
    return int(resp.split(b" ", 2)[1])


class Client:
    """One keep-alive connection.  request() returns the status of a full
    response, or None when the exchange failed (then reconnects)."""

    def __init__(self, port, timeout=10.0):
        self.port = port
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, headers=None, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                   timeout=self.timeout)
        try:
            self.conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                self.conn.putheader(k, v)
            if body is not None:
                self.conn.putheader("Content-Length", str(len(body)))
            self.conn.endheaders(body)
            r = self.conn.getresponse()
            r.read()
            if r.will_close:
                self.close()
            return r.status
        except (OSError, http.client.HTTPException):
            self.close()
            return None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Traffic:
    """Threads, each with a keep-alive Client, cycling through `plan`
    (a list of (method, path, headers, tag)); counts full responses as
    ok[(tag, status)] and failed exchanges as failed[tag]."""

    def __init__(self, port, plan, threads=4, limit=None):
        self.port = port
        self.plan = plan
        self.limit = limit          # requests per thread, None: until stop
        self.pace = 0.0             # seconds to sleep after each request
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = Counter()
        self.failed = Counter()
        self.threads = [threading.Thread(target=self._run, args=(i,),
                                         daemon=True)
                        for i in range(threads)]

    def _run(self, i):
        c = Client(self.port)
        n = 0
        j = i
        ok, failed = Counter(), Counter()
        while not self.stop_event.is_set():
            if self.limit is not None and n >= self.limit:
                break
            method, path, headers, tag = self.plan[j % len(self.plan)]
            body = b"x" * 10 if method in ("POST", "PUT") else None
            status = c.request(method, path, headers, body)
            if status is None:
                failed[tag] += 1
                time.sleep(0.01)
            else:
                ok[(tag, status)] += 1
            n += 1
            j += 1
            if self.pace:
                time.sleep(self.pace)
            if n % 50 == 0:
                with self.lock:
                    self.ok.update(ok)
                    self.failed.update(failed)
                ok, failed = Counter(), Counter()
        c.close()
        with self.lock:
            self.ok.update(ok)
            self.failed.update(failed)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def total(self):
        with self.lock:
            return sum(self.ok.values())

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        return self

    def run(self):
        """start() and wait until every thread has done `limit` requests."""
        assert self.limit is not None
        self.start()
        for t in self.threads:
            t.join(300)
        return self


# ---------------------------------------------------------------- upstream

class Backend:
    """A real upstream for proxy_pass: a threaded HTTP server on a free
    loopback port.  /slow?ms=N waits N ms before answering (an upstream
    timeout, a client that gives up); /code/NNN... answers NNN; anything else
    200 "ok\\n".  hits counts the requests per path (without query)."""

    def __init__(self):
        import http.server
        import urllib.parse

        backend = self
        self.hits = Counter()
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query)
                with backend.lock:
                    backend.hits[u.path] += 1
                code, body = 200, b"ok\n"
                if u.path.startswith("/slow"):
                    time.sleep(int(q.get("ms", ["1000"])[0]) / 1000.0)
                m = re.match(r"^/code/(\d{3})", u.path)
                if m:
                    code, body = int(m.group(1)), b"code\n"
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass            # nginx gave up (timeout, client gone)

            do_POST = do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.stop()


def curl(urls, headers=None, http2=False, timeout=30):
    """One curl run per url: [(http_version, status), ...].  (curl 7.88.1
    loses the second request it sends on a reused prior-knowledge HTTP/2
    connection, so one connection per url; H2Client reuses one.)"""
    out = []
    for u in urls:
        args = ["curl", "-s", "--max-time", str(timeout), "-o", "/dev/null",
                "-w", "%{http_version} %{http_code}"]
        if http2:
            args.append("--http2-prior-knowledge")
        for k, v in (headers or {}).items():
            args += ["-H", "%s: %s" % (k, v)]
        r = subprocess.run(args + [u], capture_output=True, text=True,
                           timeout=timeout + 10)
        v, c = r.stdout.split()
        out.append((v, int(c)))
    return out


class H2Client:
    """HTTP/2 with prior knowledge (python3-h2), one connection, one
    stream after another: request() returns (status, headers, body)."""

    def __init__(self, port, timeout=10.0):
        import h2.config
        import h2.connection
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True,
                                      header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.authority = "127.0.0.1:%d" % port

    def request(self, path, headers=None, method="GET"):
        import h2.events
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":path", path),
                                     (":scheme", "http"),
                                     (":authority", self.authority)]
                               + list((headers or {}).items()),
                               end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        hdrs, body = {}, b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("nginx closed the HTTP/2 connection")
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) \
                        and ev.stream_id == sid:
                    hdrs = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived) \
                        and ev.stream_id == sid:
                    body += ev.data
                    self.conn.acknowledge_received_data(
                        ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded,
                                     h2.events.StreamReset)) \
                        and ev.stream_id == sid:
                    self.sock.sendall(self.conn.data_to_send())
                    return int(hdrs.get(":status", 0)), hdrs, body
            self.sock.sendall(self.conn.data_to_send())

    def close(self):
        try:
            self.conn.close_connection()
            self.sock.sendall(self.conn.data_to_send())
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- meterctl

METERCTL = ROOT / "worker" / "meterctl"


def meterctl(redis, *args):
    """Runs meterctl against this Redis; returns stdout, fails on exit != 0."""
    if not METERCTL.exists():
        pytest.fail("%s missing: run make worker" % METERCTL)
    r = subprocess.run([str(METERCTL), "--redis", redis.address]
                       + [str(a) for a in args],
                       capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, ("meterctl", args, r.returncode, r.stdout,
                               r.stderr)
    return r.stdout
