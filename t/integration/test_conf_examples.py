"""The example configuration files stay valid."""

import re
import subprocess
import tempfile
from pathlib import Path

from conftest import MODULE_SO, NGINX, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_example_nginx_conf_passes_nginx_t():
    text = (ROOT / "conf" / "nginx-meter.conf").read_text()
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
