"""The meter-worker daemon (not --once) through a Sentinel failover (issue
16): a real primary, replica and three redis-sentinel (test_failover.py's
Topology), `redis = sentinel://.../NAME`, the fake Stripe slowed down so
that the drain is still running when the master changes, sync_interval 1s
(the daemon drains at least every second).  The master is put to sleep
(kill -STOP) or handed over (SENTINEL FAILOVER) mid-drain; the daemon
must follow Sentinel to the new master, finish the records that were in
flight (stored in Redis before their send, resent with their identifier),
and bill what reaches the new master afterwards: every record exactly
once, nothing left open, nothing written to the demoted master."""

import signal

from conftest import free_port, wait_for
from fakes import stripe as stfake
from fakes.stripe import FakeStripe
from test_failover import MASTER, pytestmark as failover_mark, topo  # noqa
from test_sync import Billing, pytestmark as worker_mark
from test_worker import NOW_HOUR, idem, stripe_usage

pytestmark = [failover_mark, worker_mark]

N = 120             # records: 2 chunks of 100 (drain.c METER_CHUNK)


SECRET = "whsec_test_failover_0123456789"


def daemon(tmp_path, topo, fake, webhooks=False):
    extra = {}
    if webhooks:
        extra = {"webhook__listen": "127.0.0.1:%d" % free_port(),
                 "webhook__timeout": "2s"}
    b = Billing(tmp_path / "w", topo.primary, "stripe", fake,
                sync__delinquency="off", meter__calls="api_calls",
                lock_ttl="5s", grace="0s", sync_interval="1s",
                redis__timeout="1s", retry__base="1s", **extra)
    text = b.conf.read_text().replace(
        "redis = %s" % topo.primary.address,
        "redis = sentinel://%s/%s" % (topo.sentinel_list, MASTER))
    # one request at a time (50 ms each): the drain takes ~6 s
    text += "stripe.max_in_flight = 1\n"
    if webhooks:
        text += "stripe.webhook_secret_file = %s\n" % b.write_secret(
            "whsec", SECRET)
        b.wh_port = int(extra["webhook__listen"].rsplit(":", 1)[1])
    b.conf.write_text(text)
    return b


def delinquent(b, fake, cid):
    """meterctl adds the customer (through the Sentinels), a Stripe
    invoice.payment_failed delivery marks it delinquent; b.redis is where
    the test looks (the master)."""
    cus = fake.add_customer()
    sub = fake.add_subscription(cus["id"])
    b.customer(cid, None, cus["id"], sub["id"])
    inv = {"id": "in_" + cid, "object": "invoice", "customer": cus["id"],
           "subscription": sub["id"], "status": "open"}
    st, body = stfake.send_webhook(
        "http://127.0.0.1:%d/webhooks/stripe" % b.wh_port,
        "invoice.payment_failed", inv, SECRET)
    assert st == 200, body
    assert b.status(cid)[0] == "delinquent"


def scripts_run(node):
    """EVAL/EVALSHA/WAIT calls a node ran (INFO commandstats): only a
    client sends them; what a replica applies comes as the scripts'
    effects (Redis 7 replicates effects), so a demoted master's count moves
    only with what the worker wrote to it."""
    info = node.cmd("INFO", "commandstats").decode()
    n = 0
    for line in info.splitlines():
        name, _, rest = line.partition(":")
        if name in ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_wait"):
            n += int(rest.split(",")[0].split("=")[1])
    return n


def usage(topo):
    h = NOW_HOUR - 2 * 3600
    want = stripe_usage(topo.primary, "fo", N, h, 2)
    wait_for(lambda: topo.replica.cmd("DBSIZE")
             == topo.primary.cmd("DBSIZE"), 10, msg="replicated")
    return h, want


def billed_once(fake, want, h, extra=()):
    idents = [e["identifier"] for e in fake.events]
    assert len(idents) == len(set(idents)), "an identifier billed twice"
    assert sorted(idents) == sorted(
        [idem(h, "c%03d" % i, "calls") for i in range(N)] + list(extra))
    for c, v in want.items():
        assert fake.total(c, "api_calls") == v, c


def after_failover(topo, b, fake, new, old, h, want):
    """The totals exact on the provider, nothing open on the new master,
    then usage written to the new master is billed too (the daemon is
    connected there, not to the demoted one)."""
    wait_for(lambda: all(fake.total(c, "api_calls") == v
                         for c, v in want.items()), 90, 0.2,
             msg=lambda: b.log()[-3000:])
    wait_for(lambda: new.keys("mtr:{worker}:r:*") == [], 30, 0.2,
             msg=lambda: [new.hgetall(k)
                          for k in new.keys("mtr:{worker}:r:*")])
    billed_once(fake, want, h)

    stripe_usage(new, "late", 1, h, 40)      # c000 = cus_000 again
    late_total = want["cus_000"] + 41
    wait_for(lambda: fake.total("cus_000", "api_calls") == late_total,
             30, 0.2, msg=lambda: b.log()[-3000:])
    # the difference, as a second record of the period (seq 2)
    billed_once(fake, dict(want, cus_000=late_total), h,
                extra=[idem(h, "c000", "calls", 2)])
    wait_for(lambda: new.keys("mtr:{worker}:r:*") == [], 30, 0.2)
    assert old.role() == "slave"
    assert b.proc.poll() is None, b.log()
    b.stop()


def test_daemon_follows_sigstop_failover_each_record_once(topo, tmp_path):
    """kill -STOP of the master mid-drain: the daemon's commands time out
    (redis.timeout 1s); Sentinel promotes the replica; the daemon asks the
    Sentinels again, finds the new master (the old one, still asleep,
    answers nothing), and resumes; the old master wakes up (kill -CONT) and
    Sentinel turns it into a replica, which redis.wait 1 needs before
    anything is sent again."""
    with FakeStripe(api_key="sk_test_failover", delay=0.05) as fake:
        b = daemon(tmp_path, topo, fake)
        h, want = usage(topo)
        old = topo.primary
        b.start()
        wait_for(lambda: len(fake.events) >= 10, 30, 0.02, msg=b.log)
        before = scripts_run(old)
        old.proc.send_signal(signal.SIGSTOP)
        stopped = len(fake.events)
        try:
            new = topo.wait_failover(old, timeout=30)
        finally:
            old.proc.send_signal(signal.SIGCONT)
        assert new is topo.replica
        assert stopped < N, "the drain was over before the failover"
        wait_for(lambda: old.role() == "slave", 20, 0.2)
        # Sentinel demotes a woken master seconds later (here ~10 s):
        # meanwhile it took writes, which its resync then dropped; the
        # daemon asked the Sentinels before writing and went to the new
        # one (one command sent before the stop may still run on waking)
        woken = scripts_run(old) - before
        print("scripts run by the old master from its stop to its "
              "demotion: %d" % woken)
        assert woken <= 1

        after_failover(topo, b, fake, new, old, h, want)
        log = b.log()
        assert "the Sentinels name 127.0.0.1:%d the master now, not " \
            "127.0.0.1:%d: reconnecting" % (new.port, old.port) in log
        print("events at SIGSTOP %d; duplicates refused by the fake %d"
              % (stopped, fake.duplicates))


def test_daemon_follows_sentinel_failover_each_record_once(topo, tmp_path):
    """SENTINEL FAILOVER mid-drain: the replica is promoted, then the old
    master is made a replica (its clients killed, -READONLY to writes in
    between); the daemon follows without a double bill.  meterctl and the
    webhook listener (README: they "follow the same address") write to
    the new master after it."""
    with FakeStripe(api_key="sk_test_failover", delay=0.05) as fake:
        b = daemon(tmp_path, topo, fake, webhooks=True)
        h, want = usage(topo)
        old = topo.primary
        b.start(port=b.wh_port)
        # the listener holds a connection to the old master
        delinquent(b, fake, "hook-1")
        wait_for(lambda: len(fake.events) >= 10, 30, 0.02, msg=b.log)
        assert topo.sentinels[0].cmd("SENTINEL", "FAILOVER", MASTER) == "OK"
        at = len(fake.events)
        new = topo.wait_failover(old, timeout=30)
        assert new is topo.replica
        assert at < N, "the drain was over before the failover"
        wait_for(lambda: old.role() == "slave"
                 and b"master_link_status:up"
                 in old.cmd("INFO", "replication"), 20, 0.2)

        b.redis = new
        assert b.status("hook-1")[0] == "delinquent"
        delinquent(b, fake, "hook-2")
        after_failover(topo, b, fake, new, old, h, want)
        print("events at the failover %d; duplicates refused by the fake %d"
              % (at, fake.duplicates))
