#!/bin/bash
# nginx's own test suite (nginx/nginx-tests) over its http tests, twice:
# plain, then with ngx_http_meter_module loaded and metering and governing
# every request. Prints the files that pass plain and fail with the module
# (that list must stay empty), the counts of both runs, and exits 1 if the
# list is not empty (2 on a setup error).
#
# The suite is not fetched here: there is no network at test time. Take the
# revision that matches Debian's nginx 1.22.1, 3356f91a (the last commit
# before 1.22.1), from a clone of github.com/nginx/nginx-tests:
#
#     git -C /path/to/nginx-tests archive 3356f91a | tar -x -C /tmp/nginx-tests
#     NGINX_TESTS=/tmp/nginx-tests t/nginx-tests.sh     # or: make nginx-tests
#
# Never copy the suite into this repository.
#
# Environment:
#   NGINX_TESTS  the checkout (default build/nginx-tests)
#   MODULE_SO    the module (default build/nginx/ngx_http_meter_module.so)
#   METERCTL     meterctl (default worker/meterctl): adds 127.0.0.1 as a
#                customer's key, and reads what the module run metered
#   RUNS         "plain module" (default), or "module" to rerun only the
#                module half against the plain results of the last run
#   JOBS         prove -j (default 2)
#   FILES        test files to run (default: every http test, see below)
#   OUT          logs (default build/nginx-tests-out)
#   EXTRA_HTTP   more directives for the module run's http level, e.g.
#                'meter zone=nginx_tests bytes value=$bytes_sent;'
#
# Which files: every *.t but mail_*, stream_* (other protocols), js.t and
# js_* (njs's tests, versioned with njs, not with nginx): 307 files at
# 3356f91a.
#
# Root: the suite's temp dirs are mode 0700 (File::Temp), and nginx run by
# root gives its workers to "nobody", who then cannot read them; so as root
# prove runs as nobody; otherwise as the user who starts the script.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NGINX_TESTS=${NGINX_TESTS:-$ROOT/build/nginx-tests}
MODULE_SO=${MODULE_SO:-$ROOT/build/nginx/ngx_http_meter_module.so}
METERCTL=${METERCTL:-$ROOT/worker/meterctl}
RUNS=${RUNS:-plain module}
JOBS=${JOBS:-2}
OUT=${OUT:-$ROOT/build/nginx-tests-out}
ZONE=nginx_tests

# the packaged nginx -V lists these as dynamic: the suite loads each of them
# from TEST_NGINX_MODULES in every test, so without them every test fails;
# then the Perl modules and daemons that tests skip themselves without
NGX_PKGS="nginx libnginx-mod-http-geoip libnginx-mod-http-image-filter
    libnginx-mod-http-perl libnginx-mod-http-xslt-filter libnginx-mod-mail
    libnginx-mod-stream libnginx-mod-stream-geoip"
PERL_PKGS="libio-socket-ssl-perl libnet-ssleay-perl libfcgi-perl
    libscgi-perl libcache-memcached-perl libcache-memcached-fast-perl
    libprotocol-websocket-perl libgd-perl"
DAEMON_PKGS="redis-server memcached uwsgi uwsgi-plugin-python3 openssl"

die() {
    echo "nginx-tests: $*" >&2
    exit 2
}

install_missing() {
    local p missing=""

    for p in $NGX_PKGS $PERL_PKGS $DAEMON_PKGS; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null \
            | grep -q '^ii' || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0

    echo "nginx-tests: installing$missing"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    # shellcheck disable=SC2086
    $sudo apt-get install -y -q --no-install-recommends $missing
    # the packages start their services; the suite wants none of them
    for p in nginx memcached uwsgi redis-server; do
        $sudo service "$p" stop >/dev/null 2>&1 || true
    done
}

install_missing

[ -f "$NGINX_TESTS/lib/Test/Nginx.pm" ] \
    || die "no nginx-tests checkout at $NGINX_TESTS (see the top of $0)"
[ -f "$MODULE_SO" ] || die "no $MODULE_SO: run make module"
[ -x "$METERCTL" ] || die "no $METERCTL: run make worker"

# as root the suite runs as nobody, who must reach the module and the suite
AS=()
if [ "$(id -u)" = 0 ]; then
    AS=(runuser -u nobody --)
fi
"${AS[@]}" test -r "$MODULE_SO" -a -r "$NGINX_TESTS/lib/Test/Nginx.pm" \
    || die "${AS[*]:-you} cannot read $MODULE_SO or $NGINX_TESTS"

if [ -n "${FILES:-}" ]; then
    read -r -a TESTS <<< "$FILES"
    for f in "${TESTS[@]}"; do
        [ -f "$NGINX_TESTS/$f" ] || die "FILES: no $NGINX_TESTS/$f"
    done
else
    TESTS=()
    for f in "$NGINX_TESTS"/*.t; do
        f=${f##*/}
        [[ $f =~ ^(mail|stream|js)[_.] ]] || TESTS+=("$f")
    done
fi

mkdir -p "$OUT"
RUN=$(mktemp -d /tmp/nginx-tests-run.XXXXXX)
chmod 0755 "$RUN"
mkdir -m 1777 "$RUN/tmp"
REDIS_PID=""

cleanup() {
    if [ -n "$REDIS_PID" ]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT

# prove over TESTS; $1 = plain|module; the output goes to $OUT/$1.log
run_suite() {
    local name=$1 start end
    local -a env=(TEST_NGINX_BINARY=/usr/sbin/nginx
                  TEST_NGINX_MODULES=/usr/lib/nginx/modules
                  TMPDIR="$RUN/tmp" PATH="$PATH")

    if [ "$name" = module ]; then
        # the test dirs are kept for their logs, scanned below
        env+=(TEST_NGINX_GLOBALS="$GLOBALS"
              TEST_NGINX_GLOBALS_HTTP="$GLOBALS_HTTP"
              TEST_NGINX_LEAVE=1)
    fi

    echo "nginx-tests: $name run, ${#TESTS[@]} files, prove -j$JOBS" \
         "(log: $OUT/$name.log)"
    start=$(date +%s)
    (cd "$NGINX_TESTS" && "${AS[@]}" env -i "${env[@]}" \
        prove -j"$JOBS" "${TESTS[@]}") > "$OUT/$name.log" 2>&1 || true
    end=$(date +%s)
    echo "$((end - start))" > "$OUT/$name.seconds"

    if [ "$name" = module ]; then
        # what the module logged at warn and above, without time, pid and
        # client: the suite itself fails a test only on [alert]
        grep -arhE --include='*.log' '\[(emerg|alert|crit|error|warn)\].*meter' \
            "$RUN/tmp" \
            | sed -E 's/^[0-9\/]+ [0-9:]+ //; s/[0-9]+#[0-9]+: (\*[0-9]+ )?//;
                      s/, client: .*//; s/ in \/[^ ]*:[0-9]+$//;
                      s#[^ (]*/nginx-test-[^/]*/#TESTDIR/#g;
                      s/(nginx.conf|location "[^"]*"|:)[0-9]+/\1N/g;
                      s/(location|server) "[^"]*"/\1 "..."/g' \
            | sort | uniq -c | sort -rn > "$OUT/module.messages" || true
        rm -rf "${RUN:?}/tmp/"*
    fi
}

# reads a prove log; prints "files tests passed" on the first line, then
# the files that failed: a failed test, a non-zero exit or wait status, or
# a parse error (a bad plan); "TODO passed" alone is no failure
summarize() {
    perl -e '
        my ($files, $tests, $failed_tests, %failed, $cur, $result)
            = (0, 0, 0);
        while (<STDIN>) {
            # "(Wstat: 512 (exited 2) Tests: 5 Failed: 2)" in Test::Harness
            # 3.44, without "(exited 2)" before
            if (/^(\S+\.t)\s+\(Wstat: (\d+).*?Tests: (\d+)\s+Failed: (\d+)\)/) {
                $cur = $1;
                $failed_tests += $4;
                $failed{$cur} = 1 if $2 != 0 || $4 != 0;
            } elsif (defined $cur
                     && /^\s+(Failed tests?|Non-zero exit status|Non-zero wait status|Parse errors):/)
            {
                $failed{$cur} = 1;
            } elsif (/^Files=(\d+), Tests=(\d+)/) {
                ($files, $tests) = ($1, $2);
                undef $cur;
            } elsif (/^Result: (\w+)/) {
                $result = $1;
            }
        }
        die "no prove summary\n" unless $files && defined $result;
        die "prove says $result, but no failed file was found\n"
            if ($result ne "PASS") != (keys %failed > 0);
        print "$files $tests ", $tests - $failed_tests, "\n";
        print "$_\n" for sort keys %failed;
    ' < "$1"
}

start_redis() {
    redis-server --port 0 --unixsocket "$RUN/redis.sock" \
        --unixsocketperm 777 --save '' --appendonly no --dir "$RUN" \
        --logfile "$OUT/redis.log" &
    REDIS_PID=$!

    local _
    for _ in $(seq 50); do
        redis-cli -s "$RUN/redis.sock" ping 2>/dev/null | grep -q PONG \
            && return 0
        sleep 0.1
    done
    die "redis-server did not start (log: $OUT/redis.log)"
}

# the key is $remote_addr: a key every request has, so every request is
# counted and looked up (an empty key is neither); 127.0.0.1 belongs to a
# customer in good standing when meterctl is built, so the gate finds it
GLOBALS="load_module $MODULE_SO;"
GLOBALS_HTTP="meter_zone \$remote_addr zone=$ZONE:1m;
meter_redis unix:$RUN/redis.sock;
meter zone=$ZONE calls;
meter_governance zone=$ZONE unknown_key=allow;
${EXTRA_HTTP:-}"

case " $RUNS " in
*" module "*) ;;
*) die "RUNS must include module (\"plain module\" or \"module\")" ;;
esac
for r in $RUNS; do
    case $r in
    plain)
        run_suite plain
        ;;
    module)
        [ -f "$OUT/plain.log" ] || die "no plain run in $OUT: RUNS=\"plain module\""
        start_redis
        "$METERCTL" --redis "unix:$RUN/redis.sock" \
            customers add nginx-tests > /dev/null
        "$METERCTL" --redis "unix:$RUN/redis.sock" \
            keys add 127.0.0.1 --customer nginx-tests > /dev/null
        run_suite module
        ;;
    *)
        die "RUNS: unknown run \"$r\" (plain, module)"
        ;;
    esac
done

read -r p_files p_tests p_passed < <(summarize "$OUT/plain.log" | sed -n 1p)
read -r m_files m_tests m_passed < <(summarize "$OUT/module.log" | sed -n 1p)
# a prove that died half way still prints a summary of what it ran
for r in plain module; do
    n=$([ $r = plain ] && echo "$p_files" || echo "$m_files")
    [ "$n" = "${#TESTS[@]}" ] \
        || die "the $r run ran $n of ${#TESTS[@]} files ($OUT/$r.log)"
done
summarize "$OUT/plain.log" | tail -n +2 > "$OUT/plain.failed"
summarize "$OUT/module.log" | tail -n +2 > "$OUT/module.failed"

printf '%-7s %6s %6s %7s %6s %s\n' run files tests passed failed seconds
printf '%-7s %6s %6s %7s %6s %s\n' \
    plain "$p_files" "$p_tests" "$p_passed" "$(wc -l < "$OUT/plain.failed")" \
    "$(cat "$OUT/plain.seconds")" \
    module "$m_files" "$m_tests" "$m_passed" "$(wc -l < "$OUT/module.failed")" \
    "$(cat "$OUT/module.seconds")"

# the comparison proves nothing unless the module really counted: Redis must
# hold the calls of 127.0.0.1, and have seen flushes and governance reads.
# Read through meterctl, the schema's reader: nodes write most usage in the
# writer layout (mtr:wu), not per key (docs/redis-schema.md)
kh=$(printf '%s' 127.0.0.1 | sha256sum | cut -d' ' -f1)
"$METERCTL" --redis "unix:$RUN/redis.sock" usage --json > "$OUT/usage.json" \
    || die "meterctl usage failed"
read -r calls hours used < <(perl -MJSON::PP -e '
    my ($kh, %hours, %meters) = shift;
    local $/;
    for (@{decode_json(<STDIN>)}) {
        next unless $_->{key_hash} eq $kh;
        $hours{$_->{hour}} = 1;
        $meters{$_->{meter}} += $_->{value};
    }
    print $meters{calls} // 0, " ", scalar(keys %hours), " ",
          join(",", map { "$_=$meters{$_}" } sort keys %meters) || "-", "\n";
    ' "$kh" < "$OUT/usage.json")
redis-cli -s "$RUN/redis.sock" info commandstats \
    | grep -E '^cmdstat_(evalsha|get|hgetall):' > "$OUT/redis.stats" || true
echo "module: Redis holds ${calls:-0} calls of 127.0.0.1 in $hours key-hours;" \
     "$(tr '\r\n' '  ' < "$OUT/redis.stats")"
echo "module: usage of 127.0.0.1 by meter: $used"
echo "module: its messages at warn and above ($OUT/module.messages):"
head -n 20 "$OUT/module.messages" | sed 's/^/  /'
if [ "${calls:-0}" -lt 1 ] || [ "$hours" -lt 1 ]; then
    echo "nginx-tests: FAIL: the module run metered ${calls:-0} calls;" \
         "was the module loaded? (log: $OUT/module.log)" >&2
    exit 2
fi

# files that pass plain and fail with the module; each is run once more
# with the module, alone and verbose, for its output (and to tell a flaky
# file from a broken one: under load some tests are timing-sensitive)
mapfile -t regressed < <(comm -13 "$OUT/plain.failed" "$OUT/module.failed")
broken=()
flaky=()
for f in "${regressed[@]}"; do
    log="$OUT/module-rerun-$f.log"
    if (cd "$NGINX_TESTS" && "${AS[@]}" env -i \
            TEST_NGINX_BINARY=/usr/sbin/nginx \
            TEST_NGINX_MODULES=/usr/lib/nginx/modules \
            TEST_NGINX_GLOBALS="$GLOBALS" \
            TEST_NGINX_GLOBALS_HTTP="$GLOBALS_HTTP" \
            TEST_NGINX_CATLOG=1 TMPDIR="$RUN/tmp" PATH="$PATH" \
            prove -v "$f") > "$log" 2>&1
    then
        flaky+=("$f")
    else
        broken+=("$f")
    fi
done

echo "fail plain (the suite or this machine, not the module):" \
     "$(tr '\n' ' ' < "$OUT/plain.failed")"
echo "pass plain, fail with the module: ${#regressed[@]} file(s)"
for f in "${flaky[@]}"; do
    echo "  $f (passed when run again alone: flaky;" \
         "$OUT/module-rerun-$f.log)"
done
for f in "${broken[@]}"; do
    echo "  $f (fails again alone; $OUT/module-rerun-$f.log):"
    # sed, not head: head would leave grep a SIGPIPE, fatal with pipefail
    grep -E '^(not ok|#)' "$OUT/module-rerun-$f.log" \
        | sed -n '1,40s/^/    /p'
done

[ ${#broken[@]} -eq 0 ]
