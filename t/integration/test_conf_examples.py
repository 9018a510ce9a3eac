"""The example configuration files stay valid."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import MODULE_SO, NGINX, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["nginx-meter.conf", "nginx-portal.conf"])
def test_example_nginx_conf_passes_nginx_t(name):
    text = (ROOT / "conf" / name).read_text()
    text = text.replace("/usr/lib/nginx/modules/ngx_http_meter_module.so",
                        str(MODULE_SO))
    # no privileged port or system paths in a test
    text = re.sub(r"listen 80;", "listen 127.0.0.1:%d;" % free_port(), text)
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(text)
        r = subprocess.run(
            [NGINX, "-t", "-p", tmp + "/", "-c", str(conf), "-e", "stderr",
             "-g", "pid %s/nginx.pid;" % tmp],
            capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_make_install_debian_layout(tmp_path):
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "install",
                        "DESTDIR=%s" % tmp_path],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("usr/lib/nginx/modules/ngx_http_meter_module.so",
              "usr/share/nginx/modules-available/mod-http-meter.conf",
              "usr/bin/meter-worker", "usr/bin/meterctl",
              "lib/systemd/system/meter-worker.service",
              "etc/meter/worker.conf",
              "usr/share/doc/nginx-meter/redis-schema.md",
              "usr/share/doc/nginx-meter/examples/nginx-portal.conf",
              "usr/share/nginx-meter/portal/index.html",
              "usr/share/nginx-meter/portal/usage.html",
              "usr/share/nginx-meter/portal/portal.css",
              "usr/share/nginx-meter/portal/portal.js"):
        assert (tmp_path / f).exists(), f
    link = tmp_path / "etc/nginx/modules-enabled/50-mod-http-meter.conf"
    assert link.is_symlink()
    assert "load_module modules/ngx_http_meter_module.so;" in (
        tmp_path / "usr/share/nginx/modules-available/mod-http-meter.conf"
    ).read_text()
    # an operator's config survives a reinstall
    (tmp_path / "etc/meter/worker.conf").write_text("# mine\n")
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "install",
                        "DESTDIR=%s" % tmp_path],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    assert (tmp_path / "etc/meter/worker.conf").read_text() == "# mine\n"
