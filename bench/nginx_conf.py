"""The start of every bench nginx.conf, shared by bench/cost.py,
bench/callgrind_reqpath.py and bench/status_cost.py.

nginx in one foreground process (daemon off; master_process off;), its
error log and every *_temp_path in the run's own directory: Debian compiles
in /var/lib/nginx, which a bench run must not need (t/conftest.py's
template does the same).  As root the worker stays root, so that it can
read the run's files.

    CONF = '''\\
    {head}
        keepalive_requests 1000000;
        server {{ ... }}
    }}
    '''
    CONF.format(head=head(tmp, 256, module=so), ...)

head() ends inside ``http {``: the template goes on there and closes it.
"""

import os


def head(tmp, connections, module=None):
    """Everything up to the first line of the caller's http block; module:
    the .so to load, None for plain nginx."""
    lines = []
    if module is not None:
        lines.append("load_module %s;" % module)
    if os.geteuid() == 0:
        lines.append("user root root;")
    lines += ["daemon off;",
              "master_process off;",
              "error_log %s/error.log notice;" % tmp,
              "events { worker_connections %d; }" % connections,
              "http {",
              "    access_log off;"]
    lines += ["    %s_temp_path %s/%s_temp;" % (t, tmp, t)
              for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    return "\n".join(lines)
