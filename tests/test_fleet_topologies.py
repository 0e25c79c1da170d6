"""The fleet's store as a Redis Cluster and behind Sentinel (Debian's redis-server in both roles, on loopback).

A cluster: three shards, so the suppression list (hash tag `{supp}`), the per-day counters (`{src}`, `{dom}`)
and each destination's leases sit on different shards; two relays share suppressions through the feed,
count into the store, and hold a fleet-wide connection limit.

Sentinel: a primary, a replica and a Sentinel; the relays are given the Sentinel and the primary's name. A
change crosses the fleet before a fail-over and after it, and what is written after it lands on the new
primary."""

from __future__ import annotations

import json
import threading

import pytest

from harness.outbound import send, start_outbound, unique, wait_gone, wait_until
from harness.store import ClusterStore, SentinelStore
from test_fleet import FEED, counters, flood, rcpt, refused

# A relay that loses its primary in a fail-over finds the new one at its next join: retries back off to 10 s.
FAILOVER = 30.0


@pytest.fixture
def cluster(tmp_path):
    c = ClusterStore(tmp_path / "cluster").start()
    yield c
    c.stop()


@pytest.fixture
def sentinel(tmp_path):
    s = SentinelStore(tmp_path / "sentinel").start()
    yield s
    s.stop()


def relay_on(relays, dns, peers, section: dict, name: str, **over):
    return start_outbound(relays, dns, peers, name=name, **over, config=lambda cfg: cfg.update(store=section))


def test_a_cluster_shares_suppressions_counters_and_leases_across_its_shards(
        relays, dns, peers, foreign, mailbox, cluster):
    keys = ("herald:{supp}:state", "herald:count:{src}:0", "herald:count:{dom}:0", "herald:lease:{limited.test}")
    shards = {cluster.shard_of(k) for k in keys}
    assert len(shards) >= 2, f"the test's keys should spread over the shards, not sit on {shards}"
    section = cluster.section(resync_interval="6h", fleet_size=2)
    delivery = {"per_domain": {"max_connections": 3, "messages_per_connection": 2}}
    a = relay_on(relays, dns, peers, section, "a", delivery=delivery)
    b = relay_on(relays, dns, peers, section, "b", delivery=delivery)
    assert wait_until(lambda: a.metric("herald_store_up") == 1 and b.metric("herald_store_up") == 1, FEED), \
        a.log_tail(40)

    # A hard bounce through a is refused by b: the write script and the feed on the {supp} shard.
    gone = f"{unique('gone')}@foreign.test"
    foreign.on_rcpt(gone, f"550 5.1.1 <{gone}>: Recipient address rejected: User unknown")
    qid, _, _ = send(a, [gone], "cluster-bounce")
    wait_gone(a, qid)
    assert wait_until(lambda: refused(b, gone), FEED), b.log_tail(40)
    change = json.loads(cluster.cmd("HGET", "herald:{supp}:state", f"e:{gone.lower()}"))
    assert change["op"] == "add", change

    # Counters land on their own shards, both relays' increments summed there.
    for r in (a, b):
        qid, _, _ = send(r, [f"{unique('c')}@foreign.test"], "cluster-count")
        wait_gone(r, qid)
    day = counters(a)["day"]

    def counted():
        delivered = cluster.cmd("HGET", f"herald:count:{{dom}}:{day}", "example.test/delivered")
        bounced = cluster.cmd("HGET", f"herald:count:{{dom}}:{day}", "example.test/bounced")
        # Two messages and the bounce's DSN left the source (a message refused at RCPT left nothing).
        sent = cluster.cmd("HGET", f"herald:count:{{src}}:{day}", "127.0.0.1")
        return (delivered, bounced, sent) == ("2", "1", "3")

    assert wait_until(counted, FEED), (counters(a), counters(b))
    assert counters(b)["domains"]["example.test"] == {"delivered": 2, "bounced": 1}

    # max_connections: 3 holds for both relays together, through the lease script on each destination's
    # shard; two destinations at once, slow enough that the leases are renewed (every 10 s) while held, in
    # one pipeline per destination.
    mxs = {}
    for domain, ip in (("limited.test", "127.0.0.4"), ("limited2.test", "127.0.0.5")):
        dns.route(domain, ip)
        mxs[domain] = peers.aio(ip, domain.split(".")[0], data_delay=1.5)
    floods = [threading.Thread(target=flood, args=((a, b), d, 10, "cluster-lease")) for d in mxs]
    for t in floods:
        t.start()
    for t in floods:
        t.join(timeout=300)
    for domain, mx in mxs.items():
        assert len(mx.accepted()) == 20, (domain, len(mx.accepted()))
        assert mx.max_concurrent <= 3, f"{domain}: {mx.max_concurrent} connections at once from a fleet limited to 3"
        assert mx.max_concurrent == 3, f"{domain}: only {mx.max_concurrent} of the 3 connections used under load"
    for r in (a, b):
        status, body = r.http_get("/metrics")
        errors = [l for l in body.decode().splitlines() if l.startswith("herald_store_errors_total{")]
        assert all(l.endswith(" 0") for l in errors), errors


def test_sentinel_finds_the_primary_and_a_fail_over_loses_no_change(relays, dns, peers, sentinel):
    section = sentinel.section(resync_interval="6h")
    a = relay_on(relays, dns, peers, section, "a")
    b = relay_on(relays, dns, peers, section, "b")
    assert wait_until(lambda: a.metric("herald_store_up") == 1 and b.metric("herald_store_up") == 1, FEED), \
        a.log_tail(40)

    before = f"{unique('before')}@foreign.test"
    status, body = a.http("PUT", f"/suppressions/{before}", {"reason": "asked before the fail-over"})
    assert status == 200, body
    assert wait_until(lambda: refused(b, before), FEED), b.log_tail(40)
    assert sentinel.primary.cmd("HGET", "herald:{supp}:state", f"e:{before}")

    old = sentinel.primary.port
    sentinel.failover()
    assert sentinel.primary.port != old

    # The Sentinel drops the old primary's clients as it makes it a replica: b finds the new primary
    # through the Sentinel when it joins again.
    after = f"{unique('after')}@foreign.test"
    status, body = b.http("PUT", f"/suppressions/{after}", {"reason": "asked after the fail-over"})
    assert status == 200, body

    def written():
        return bool(sentinel.primary.cmd("HGET", "herald:{supp}:state", f"e:{after}"))

    assert wait_until(written, FAILOVER), b.log_tail(60)
    assert b.log_text().count("joined the fleet's store") >= 2, "b wrote to the new primary without joining again"
    assert wait_until(lambda: refused(a, after), FAILOVER), a.log_tail(60)
    assert refused(a, before) and refused(b, before)
    status, body = a.http("DELETE", f"/suppressions/{before}")
    assert status == 200, body
    assert wait_until(lambda: rcpt(b, before).starts("250 2.1.5"), FAILOVER), b.log_tail(60)
    for r in (a, b):
        assert wait_until(lambda: r.metric("herald_store_pending_changes") == 0, FAILOVER)
