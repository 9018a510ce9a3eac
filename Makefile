# nginx-meter: build, test, demo.
#
#   make deps     install the Debian packages (apt) that are missing
#   make          build build/nginx/ngx_http_meter_module.so, smoke-test it
#   make worker   build worker/meter-worker and worker/meterctl
#   make unit     cmocka unit tests (module core, worker) under ASan/UBSan
#   make test     deps + everything above + pytest integration tests
#   make demo     deps + build + a short end-to-end demo
#   make bench    plain nginx vs nginx with metering (wrk); not a test
#   make bench-cost  CPU and instructions per request (bench/cost.py;
#                 BENCH_COST_ARGS=--quick); not a test, ~20 minutes
#   make deb      Debian packages into build/deb/ (dpkg-buildpackage, lintian)
#   make nginx-tests  nginx's own test suite, plain and with the module
#                 (slow; NGINX_TESTS=checkout, see t/nginx-tests.sh)

# bash: conf_flags defines a bash array
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

ROOT      := $(CURDIR)
NGX_SRC   := /usr/share/nginx/src
BUILD     := $(ROOT)/build
NGX_BUILD := $(BUILD)/nginx
MODULE_SO := $(NGX_BUILD)/ngx_http_meter_module.so
MOD_DIR   := $(ROOT)/ngx_http_meter_module
PYTHON    := /usr/bin/python3

PKGS := build-essential pkg-config nginx nginx-dev libhiredis-dev \
        libcurl4-openssl-dev libcjson-dev libcmocka-dev libsystemd-dev \
        libssl-dev redis-server python3-pytest python3-h2 wrk curl \
        ca-certificates time libfaketime libmicrohttpd-dev debhelper \
        dpkg-dev lintian systemd strace prometheus python3-aiosmtpd \
        redis-sentinel stunnel4 chromium chromium-driver git

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

UNIT_CFLAGS := -std=c11 -Wall -Wextra -Werror -g -fsanitize=address,undefined

# the steps of "test" and "demo" run in order, even under make -j
.NOTPARALLEL:

.PHONY: all module smoke deps worker unit integration test demo bench clean \
        install deb nginx-tests bench-cost

all: module


deps:
	@missing=$$(for p in $(PKGS); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null \
	        | grep -q '^ii' || echo $$p; \
	done); \
	if [ -z "$$missing" ]; then \
	    echo "deps: all Debian packages present"; \
	else \
	    echo "deps: installing" $$missing; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $(SUDO) apt-get update; \
	    $(SUDO) apt-get install -y --no-install-recommends $(PKGS); \
	    : "the packages start their services; free ports 80/6379"; \
	    $(SUDO) service nginx stop >/dev/null 2>&1 || true; \
	    $(SUDO) service redis-server stop >/dev/null 2>&1 || true; \
	    $(SUDO) service prometheus stop >/dev/null 2>&1 || true; \
	fi


# configure only when there is no build dir yet or the module's config
# (its list of sources and libraries) changed
$(NGX_BUILD)/Makefile: $(MOD_DIR)/config
	@mkdir -p $(BUILD)
	@echo "configure: $(NGX_SRC) -> $(NGX_BUILD) (log: build/configure.log)"
	@cd $(NGX_SRC) && . ./conf_flags && \
	./configure "$${NGX_CONF_FLAGS[@]}" \
	    --with-cc-opt=-fPIC --with-ld-opt=-fPIC \
	    --add-dynamic-module=$(MOD_DIR) \
	    --builddir=$(NGX_BUILD) > $(BUILD)/configure.log 2>&1 \
	|| { tail -n 30 $(BUILD)/configure.log; rm -f $@; exit 1; }
	@touch $@

# nginx's generated Makefile tracks the sources itself; its CFLAGS
# already hold -W (-Wextra) -Wall -Werror (auto/cc/gcc)
module: $(NGX_BUILD)/Makefile
	$(MAKE) -f $(NGX_BUILD)/Makefile -C $(NGX_SRC) modules
	@$(MAKE) --no-print-directory smoke

smoke:
	@tmp=$$(mktemp -d); \
	printf 'load_module %s;\nerror_log stderr;\nevents {}\n' \
	    '$(MODULE_SO)' > $$tmp/nginx.conf; \
	if nginx -t -q -p $$tmp/ -c $$tmp/nginx.conf -e stderr \
	       -g "pid $$tmp/nginx.pid;"; then \
	    rm -rf $$tmp; echo "smoke: nginx loads $(MODULE_SO)"; \
	else \
	    rm -rf $$tmp; echo "smoke: nginx -t failed"; exit 1; \
	fi


worker:
	@if [ -f worker/Makefile ]; then \
	    $(MAKE) -C worker; \
	else \
	    echo "worker: worker/Makefile missing, skipped"; \
	fi


unit:
	@mkdir -p $(BUILD)
	@if [ -f t/unit/test_meter_core.c ] \
	    && [ -f $(MOD_DIR)/src/meter_core.c ]; then \
	    cc $(UNIT_CFLAGS) -I $(MOD_DIR)/src -I $(ROOT)/include \
	        t/unit/test_meter_core.c \
	        $(MOD_DIR)/src/meter_core.c -lcmocka -lcrypto \
	        -o $(BUILD)/test_meter_core; \
	    $(BUILD)/test_meter_core; \
	else \
	    echo "unit: t/unit/test_meter_core.c or meter_core.c missing, skipped"; \
	fi
	@if [ -f worker/Makefile ]; then \
	    $(MAKE) -C worker test; \
	else \
	    echo "unit: worker/Makefile missing, worker tests skipped"; \
	fi


integration:
	$(PYTHON) -m pytest -q t/

test: deps module worker unit integration


demo: deps module worker
	$(PYTHON) t/demo.py

bench: deps module
	$(PYTHON) bench/run.py

nginx-tests: module worker
	t/nginx-tests.sh

# valgrind is the bench's alone, not in PKGS: installed here when missing
BENCH_COST_ARGS ?=

bench-cost: deps module
	@command -v valgrind >/dev/null || { \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $(SUDO) apt-get install -y --no-install-recommends valgrind \
	    || { $(SUDO) apt-get update \
	         && $(SUDO) apt-get install -y --no-install-recommends \
	            valgrind; }; }
	$(PYTHON) bench/cost.py $(BENCH_COST_ARGS)


# the Debian layout: the module next to the packaged ones, enabled through
# modules-enabled/ as nginx's own module packages do; a config that exists is
# never overwritten
DESTDIR ?=
NGX_MODULES := /usr/lib/nginx/modules
PORTAL_DIR := /usr/share/nginx-meter/portal
PORTAL_FILES := docs/portal/index.html docs/portal/usage.html \
                docs/portal/portal.css docs/portal/portal.js

install: module worker
	install -D -m 0644 $(MODULE_SO) \
	    $(DESTDIR)$(NGX_MODULES)/ngx_http_meter_module.so
	install -D -m 0644 conf/mod-http-meter.conf \
	    $(DESTDIR)/usr/share/nginx/modules-available/mod-http-meter.conf
	install -d $(DESTDIR)/etc/nginx/modules-enabled
	ln -sf /usr/share/nginx/modules-available/mod-http-meter.conf \
	    $(DESTDIR)/etc/nginx/modules-enabled/50-mod-http-meter.conf
	install -D -m 0755 worker/meter-worker $(DESTDIR)/usr/bin/meter-worker
	install -D -m 0755 worker/meterctl $(DESTDIR)/usr/bin/meterctl
	install -D -m 0644 conf/meter-worker.service \
	    $(DESTDIR)/lib/systemd/system/meter-worker.service
	: "readable by the unit's DynamicUser; secrets go in credentials"
	install -d -m 0755 $(DESTDIR)/etc/meter
	[ -e $(DESTDIR)/etc/meter/worker.conf ] || \
	    install -m 0644 conf/meter-worker.conf $(DESTDIR)/etc/meter/worker.conf
	install -D -m 0644 conf/nginx-meter.conf conf/nginx-portal.conf \
	    -t $(DESTDIR)/usr/share/doc/nginx-meter/examples/
	: "the portal's static pages, served by nginx (conf/nginx-portal.conf)"
	install -D -m 0644 $(PORTAL_FILES) -t $(DESTDIR)$(PORTAL_DIR)/
	install -D -m 0644 README.md docs/redis-schema.md \
	    -t $(DESTDIR)/usr/share/doc/nginx-meter/
	install -D -m 0644 conf/alerts/* \
	    -t $(DESTDIR)/usr/share/doc/nginx-meter/examples/alerts/
	install -D -m 0644 man/meterctl.1 -t $(DESTDIR)/usr/share/man/man1/
	install -D -m 0644 man/ngx_http_meter_module.5 \
	    -t $(DESTDIR)/usr/share/man/man5/
	install -D -m 0644 man/meter-worker.8 -t $(DESTDIR)/usr/share/man/man8/

# dpkg-buildpackage in a copy of the tree under build/deb/src, so that its
# ../*.deb and its clean step stay out of the source tree; lintian must find
# nothing but the tags debian/*lintian-overrides justify
DEB_DIR := $(BUILD)/deb

deb:
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_DIR)/src/nginx-meter
	tar -C $(ROOT) --exclude=./build --exclude=./.git \
	    --exclude=__pycache__ --exclude=.pytest_cache \
	    --exclude=./worker/build --exclude=./worker/meter-worker \
	    --exclude=./worker/meterctl -cf - . \
	| tar -C $(DEB_DIR)/src/nginx-meter -xf -
	@echo "deb: dpkg-buildpackage (log: build/deb/build.log)"
	@cd $(DEB_DIR)/src/nginx-meter \
	&& dpkg-buildpackage -us -uc > $(DEB_DIR)/build.log 2>&1 \
	|| { tail -n 40 $(DEB_DIR)/build.log; exit 1; }
	mv $(DEB_DIR)/src/*.deb $(DEB_DIR)/src/*.dsc $(DEB_DIR)/src/*.tar.* \
	    $(DEB_DIR)/src/*.changes $(DEB_DIR)/src/*.buildinfo $(DEB_DIR)/
	rm -rf $(DEB_DIR)/src
	lintian --fail-on error,warning --info --tag-display-limit 0 \
	    $(DEB_DIR)/*.changes 2>&1 | tee $(DEB_DIR)/lintian.log
	@ls $(DEB_DIR)/*.deb

clean:
	rm -rf $(BUILD) t/__pycache__ t/integration/__pycache__ .pytest_cache
	@if [ -f worker/Makefile ]; then $(MAKE) -C worker clean; fi
