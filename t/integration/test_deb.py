"""Debian packages (issue 16): "make deb" builds libnginx-mod-http-meter and
nginx-meter-worker lintian-clean; apt-get installs both on this machine;
nginx -t loads the module through modules-enabled/, meter-worker -t accepts
the installed default config, the installed unit passes systemd-analyze
verify and security (<= 2.0); remove keeps the conffile and parks the
module link as Debian's libnginx-mod-* do, purge leaves no file behind.

Needs root and dpkg.  The packages are built once per run (module
fixture); METER_DEB_DIR=DIR uses the .deb files already in DIR instead.
The packages are purged at the end, also when a test fails, and a
policy-rc.d keeps the nginx service from being started or reloaded.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import NGINX

ROOT = Path(__file__).resolve().parent.parent.parent
PKGS = ["libnginx-mod-http-meter", "nginx-meter-worker"]
DBGSYM = [p + "-dbgsym" for p in PKGS]
UNIT = "/lib/systemd/system/meter-worker.service"
LINK = "/etc/nginx/modules-enabled/50-mod-http-meter.conf"
AVAIL = "/usr/share/nginx/modules-available/mod-http-meter.conf"
# made by systemd (StateDirectory=, LogsDirectory=) or by meter-worker -t,
# removed by the worker's postrm on purge
STATE = ["/var/lib/meter", "/var/log/meter", "/var/lib/private/meter",
         "/var/log/private/meter"]
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
LOCK = ["-o", "DPkg::Lock::Timeout=300"]


def run(*args, timeout=600, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    print("---- %s rc=%d\n%s%s" % (" ".join(args), r.returncode, r.stdout,
                                    r.stderr))
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.startswith("ii")


def known(pkg):
    """Installed or config-files: anything dpkg still has of it."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout[1:2] not in ("n", "")


def nginx_service_running():
    try:
        pid = int(Path("/run/nginx.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    return Path("/proc/%d" % pid).exists()


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="installs Debian packages: needs root"),
    pytest.mark.skipif(shutil.which("dpkg") is None,
                       reason="not a Debian system (no dpkg)"),
]


@pytest.fixture(scope="module")
def debs():
    """The .deb files: built by "make deb" (once), or METER_DEB_DIR."""
    d = os.environ.get("METER_DEB_DIR")
    if d:
        out = Path(d)
    else:
        run("make", "-s", "-C", str(ROOT), "deb", timeout=1200)
        out = ROOT / "build" / "deb"
    files = sorted(out.glob("*.deb"))
    names = sorted(f.name.split("_")[0] for f in files)
    assert set(PKGS) <= set(names), names
    return out, files


@pytest.fixture(scope="module")
def machine(debs):
    """Both packages installed with apt-get; purged afterwards whatever
    happened, and the machine checked to be as it was."""
    for p in PKGS + DBGSYM:
        if known(p):
            pytest.skip("%s is already on this machine; not touching it" % p)
    for p in STATE + ["/etc/meter", LINK, LINK + ".removed"]:
        if os.path.lexists(p):
            pytest.skip("%s exists already; not touching it" % p)
    nginx_was_running = nginx_service_running()
    own_policy = not POLICY_RC_D.exists()
    if own_policy:
        # no service starts or reloads while we install (invoke-rc.d)
        POLICY_RC_D.write_text("#!/bin/sh\n# test_deb.py\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    out, files = debs
    state = {"files": {}}
    try:
        run("apt-get", "install", "-y", "--no-install-recommends", *LOCK,
            *["./" + f.name for f in files], cwd=str(out), env=APT_ENV)
        for p in PKGS:
            r = run("dpkg", "-L", p)
            state["files"][p] = [f for f in r.stdout.splitlines()
                                 if f not in ("/.", "")]
        yield state
    finally:
        present = [p for p in PKGS + DBGSYM if known(p)]
        if present:
            run("apt-get", "purge", "-y", *LOCK, *present, env=APT_ENV,
                check=False)
        for p in STATE:
            if os.path.lexists(p):
                subprocess.run(["rm", "-rf", p])
        if own_policy:
            POLICY_RC_D.unlink()
        if not nginx_was_running and nginx_service_running():
            run(NGINX, "-s", "quit", check=False)
        assert not nginx_service_running() or nginx_was_running


def test_lintian_clean(debs):
    out, _ = debs
    if os.environ.get("METER_DEB_DIR"):
        pytest.skip("METER_DEB_DIR: lintian ran where they were built")
    log = (out / "lintian.log").read_text()
    # make deb fails on E: and W:; an override that no longer matches is
    # reported as I: and must go too
    tags = [ln for ln in log.splitlines() if re.match(r"^[EWIP]: ", ln)]
    assert tags == [], tags


def test_package_metadata(debs):
    out, files = debs
    deb = {f.name.split("_")[0]: f for f in files}

    def field(pkg, name):
        return run("dpkg-deb", "-f", str(deb[pkg]), name).stdout.strip()

    # the ABI the module was built for, as dh_nginx reads it
    abis = (Path("/usr/share/nginx/src/debian/libnginx-mod.abisubstvars")
            .read_text())
    abi = re.search(r"^nginx:abi=(\S+)$", abis, re.M).group(1)
    assert re.fullmatch(r"nginx-abi-\d+\.\d+\.\d+-\d+", abi)
    depends = [d.strip() for d in
               field("libnginx-mod-http-meter", "Depends").split(",")]
    assert abi in depends
    provides = run("dpkg-query", "-W", "-f=${Provides}", "nginx").stdout
    assert abi in [p.strip() for p in provides.split(",")]

    conffiles = run("dpkg-deb", "--info", str(deb["nginx-meter-worker"]),
                    "conffiles").stdout.split()
    assert conffiles == ["/etc/meter/worker.conf"]

    contents = {}
    for p in PKGS:
        listing = run("dpkg-deb", "-c", str(deb[p])).stdout
        contents[p] = {ln.split()[5].lstrip(".") for ln in
                       listing.splitlines()}
    assert {"/usr/lib/nginx/modules/ngx_http_meter_module.so", AVAIL,
            "/usr/share/man/man5/ngx_http_meter_module.5.gz",
            "/usr/share/doc/libnginx-mod-http-meter/examples/"
            "nginx-meter.conf"} <= contents["libnginx-mod-http-meter"]
    assert {"/usr/bin/meter-worker", "/usr/bin/meterctl", UNIT,
            "/etc/meter/worker.conf",
            "/usr/share/man/man8/meter-worker.8.gz",
            "/usr/share/man/man1/meterctl.1.gz",
            "/usr/share/nginx-meter/portal/index.html",
            "/usr/share/nginx-meter/portal/usage.html",
            "/usr/share/nginx-meter/portal/portal.css",
            "/usr/share/nginx-meter/portal/portal.js"} \
        <= contents["nginx-meter-worker"]
    # TLS to Redis through stunnel4 (README, "TLS to Redis"): examples only
    ex = "/usr/share/doc/nginx-meter-worker/examples/"
    assert {ex + "stunnel-redis-client.conf", ex + "stunnel-redis-server.conf",
            ex + "stunnel-redis-client.service"} \
        <= contents["nginx-meter-worker"]
    assert "/usr/share/doc/libnginx-mod-http-meter/examples/" \
        "nginx-portal.conf" in contents["libnginx-mod-http-meter"]
    # systemd creates these for the DynamicUser; a package-owned one would
    # be moved away under dpkg's feet
    for p in PKGS:
        assert not any(f.startswith(("/var/lib/meter", "/var/log/meter"))
                       for f in contents[p])


def test_nginx_t_loads_the_installed_module(machine, tmp_path):
    assert os.readlink(LINK) == AVAIL
    assert Path(AVAIL).read_text() == \
        (ROOT / "conf" / "mod-http-meter.conf").read_text()
    # the system's own nginx.conf includes modules-enabled/*.conf
    r = run(NGINX, "-T", "-q")
    assert "load_module modules/ngx_http_meter_module.so;" in r.stdout
    # and the module's directives work through that include alone
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "include /etc/nginx/modules-enabled/*.conf;\n"
        "error_log stderr;\nevents {}\n"
        "http {\n"
        "    access_log off;\n"
        "    meter_zone $http_x_api_key zone=api:1m;\n"
        "    meter_redis 127.0.0.1:6379;\n"
        "    server { listen 127.0.0.1:1; meter zone=api calls; }\n"
        "}\n")
    # (the default prefix: load_module paths are relative to it)
    r = run(NGINX, "-t", "-c", str(conf), "-e", "stderr",
            "-g", "pid %s/nginx.pid;" % tmp_path)
    assert "test is successful" in r.stderr
    # without the link the same file fails: the directive comes from it
    os.rename(LINK, LINK + ".off")
    try:
        r = run(NGINX, "-t", "-c", str(conf), "-e", "stderr",
                "-g", "pid %s/nginx.pid;" % tmp_path, check=False)
    finally:
        os.rename(LINK + ".off", LINK)
    assert r.returncode != 0
    assert 'unknown directive "meter_zone"' in r.stderr


def test_meter_worker_t_on_the_installed_config(machine):
    # systemd makes StateDirectory= and LogsDirectory= before ExecStartPre
    # (meter-worker -t); here we stand in for it
    os.makedirs("/var/lib/meter")
    os.makedirs("/var/log/meter")
    r = run("/usr/bin/meter-worker", "-c", "/etc/meter/worker.conf", "-t",
            timeout=60)
    assert r.stdout.strip() == \
        "/etc/meter/worker.conf: configuration is ok (provider file)"
    assert Path("/etc/meter/worker.conf").read_text() == \
        (ROOT / "conf" / "meter-worker.conf").read_text()
    assert oct(os.stat("/etc/meter/worker.conf").st_mode & 0o777) == "0o644"
    r = run("/usr/bin/meter-worker", "--version")
    assert re.fullmatch(r"meter-worker \d+\.\d+\.\d+\n", r.stdout)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (package systemd)")
def test_installed_unit_verify_and_security(machine):
    assert Path(UNIT).read_text() == \
        (ROOT / "conf" / "meter-worker.service").read_text()
    r = run("systemd-analyze", "verify", UNIT, check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    r = run("systemd-analyze", "security", "--offline=yes",
            "--threshold=20", "--no-pager", UNIT, check=False)
    level = float(re.search(r"Overall exposure level for "
                            r"meter-worker.service: (\d+\.\d)",
                            r.stdout).group(1))
    assert level <= 2.0
    assert r.returncode == 0


def test_remove_then_purge_leaves_nothing(machine):
    files = machine["files"]
    run("apt-get", "remove", "-y", *LOCK, *PKGS, *DBGSYM, env=APT_ENV)
    # remove: the link parked (prerm-nginx), the conffile kept
    assert not os.path.lexists(LINK)
    assert os.readlink(LINK + ".removed") == AVAIL
    assert Path("/etc/meter/worker.conf").exists()
    assert not Path("/usr/bin/meter-worker").exists()

    run("apt-get", "purge", "-y", *LOCK, *PKGS, env=APT_ENV)
    for p in PKGS + DBGSYM:
        assert not known(p), p
    assert not os.path.lexists(LINK + ".removed")
    for p in STATE + ["/etc/meter"]:
        assert not os.path.lexists(p), p
    # nothing the packages shipped is left, and dpkg owns none of it now
    # (directories shared with other packages stay, owned by those)
    for pkg, paths in files.items():
        for f in paths:
            r = subprocess.run(["dpkg", "-S", f], capture_output=True,
                               text=True)
            # /lib is a link to usr/lib here (merged /usr)
            if os.path.isdir(f):
                assert pkg not in r.stdout, (f, r.stdout)
                continue
            assert not os.path.lexists(f), (pkg, f)
            assert r.returncode == 1, (f, r.stdout)
