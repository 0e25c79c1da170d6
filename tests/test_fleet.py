"""Relays of one fleet share their suppression list through a store (Debian's redis-server, wire-compatible
with Valkey): an address suppressed on one relay is refused by the others, through the change feed (the
periodic resync is set to hours here); the store going away stops no mail and loses no suppression; a store
that comes back empty is written back from the relays; a relay joining with a list of its own brings it in;
a store that cannot be reached at start leaves the relay on its own list, loudly, or stops it with
`required: true`."""

from __future__ import annotations

import json
import threading
import time

import pytest

from harness.outbound import send, start_outbound, unique, wait_gone, wait_until
from harness.smtp import SmtpConn
from harness.store import Store

FEED = 10.0  # the bound for a change to reach another relay through the feed
REJOIN = 30.0  # the bound for a relay to find the store again after it restarted (retries back off to 10 s)


def fleet_relay(relays, dns, peers, store: Store, name: str, **store_over):
    section = store.section(**{"resync_interval": "6h", **store_over})
    return start_outbound(relays, dns, peers, name=name, config=lambda cfg: cfg.update(store=section))


def rcpt(r, address: str):
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        reply = c.cmd(f"RCPT TO:<{address}>")
        c.cmd("RSET")
        return reply


def refused(r, address: str) -> bool:
    reply = rcpt(r, address)
    return reply.starts("550 5.1.1") and "suppressed" in reply.last


def stored(store: Store, address: str) -> dict | None:
    raw = store.cmd("HGET", "herald:{supp}:state", f"e:{address.lower()}")
    return json.loads(raw) if raw else None


def test_a_hard_bounce_on_one_relay_is_refused_at_rcpt_by_the_other(relays, dns, peers, foreign, mailbox, store):
    a = fleet_relay(relays, dns, peers, store, "a")
    b = fleet_relay(relays, dns, peers, store, "b")
    assert wait_until(lambda: a.metric("herald_store_up") == 1 and b.metric("herald_store_up") == 1, FEED)
    addr = f"{unique('gone')}@foreign.test"
    foreign.on_rcpt(addr, f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown")
    assert rcpt(b, addr).starts("250 2.1.5")
    qid, _, _ = send(a, [addr], "fleet-bounce")
    wait_gone(a, qid)
    assert wait_until(lambda: refused(a, addr), FEED), "relay a did not suppress its own bounce"
    assert wait_until(lambda: refused(b, addr), FEED), f"relay b still takes {addr}:\n{b.log_tail(40)}"
    change = stored(store, addr)
    assert change and change["op"] == "add" and change["entry"]["category"] == "invalid-recipient", change
    # b holds the whole entry, the reply behind it included, as a recorded it.
    status, body = b.http("GET", f"/suppressions/{addr}")
    assert status == 200 and json.loads(body)["suppression"]["reply"]["enhanced"] == "5.1.1", body
    assert a.metric("herald_store_pending_changes") == 0


def streak(r, address: str) -> dict | None:
    status, body = r.http("GET", f"/suppressions/{address}")
    assert status == 200, (status, body)
    return json.loads(body)["streak"]


def test_a_mailbox_full_streak_counts_across_relays_and_a_delivery_anywhere_ends_it(
        relays, dns, peers, foreign, mailbox, store):
    """Two full-mailbox failures on relay a and one on relay b make one streak of three: with
    `replies: 3` the address is suppressed on both, though neither relay saw three on its own."""
    policy = {"mailbox_full": {"replies": 3, "over": "1s", "forget_after": "30d"}}

    def relay(name):
        section = store.section(resync_interval="6h")
        return start_outbound(relays, dns, peers, name=name,
                              config=lambda cfg: cfg.update(store=section, suppression=policy))

    a, b = relay("a"), relay("b")
    addr = f"{unique('full')}@foreign.test"
    foreign.on_rcpt(addr, f"552 5.2.2 <{addr}>: Mailbox full")
    for r, n in ((a, 1), (a, 2)):
        qid, _, _ = send(r, [addr], f"full{n}")
        wait_gone(r, qid)
    assert wait_until(lambda: (streak(b, addr) or {}).get("replies") == 2, FEED), streak(b, addr)
    time.sleep(1.1)  # the streak must span `over`
    qid, _, _ = send(b, [addr], "full3")
    wait_gone(b, qid)
    assert wait_until(lambda: refused(b, addr), FEED), (streak(b, addr), b.log_tail(30))
    assert wait_until(lambda: refused(a, addr), FEED), "the suppression b made did not reach a"
    change = stored(store, addr)
    assert change["entry"]["category"] == "mailbox-full", change


def test_an_admin_edit_on_one_relay_reaches_the_other_both_ways(relays, dns, peers, store):
    a = fleet_relay(relays, dns, peers, store, "a")
    b = fleet_relay(relays, dns, peers, store, "b")
    addr = f"{unique('complainer')}@foreign.test"
    status, body = b.http("PUT", f"/suppressions/{addr}", {"reason": "asked to be left alone"})
    assert status == 200, body
    assert wait_until(lambda: refused(a, addr), FEED), a.log_tail(40)
    status, body = a.http("DELETE", f"/suppressions/{addr}")
    assert status == 200, body
    assert wait_until(lambda: rcpt(b, addr).starts("250 2.1.5"), FEED), "the removal did not reach relay b"
    assert stored(store, addr)["op"] == "remove"


def test_the_store_going_away_stops_no_mail_and_loses_no_suppression(relays, dns, peers, foreign, mailbox, store):
    a = fleet_relay(relays, dns, peers, store, "a")
    b = fleet_relay(relays, dns, peers, store, "b")
    before = f"{unique('before')}@foreign.test"
    assert a.http("PUT", f"/suppressions/{before}", {"reason": "before the outage"})[0] == 200
    assert wait_until(lambda: refused(b, before), FEED)
    store.stop()
    assert wait_until(lambda: a.metric("herald_store_up") == 0 and b.metric("herald_store_up") == 0, FEED)
    # Mail flows through both relays meanwhile, and the list still refuses what it held.
    for r in (a, b):
        ok = f"{unique('ok')}@foreign.test"
        qid, _, _ = send(r, [ok], "outage")
        wait_gone(r, qid)
        assert foreign.delivered_to(ok), f"{r.label} did not deliver while the store was away"
        assert refused(r, before)
    during = f"{unique('during')}@foreign.test"
    assert a.http("PUT", f"/suppressions/{during}", {"reason": "during the outage"})[0] == 200
    assert refused(a, during)
    assert a.metric("herald_store_pending_changes") == 1
    assert rcpt(b, during).starts("250 2.1.5")  # nothing carries it there while the store is away
    # The store comes back empty (no persistence): the relays write their lists back into it.
    store.start()
    assert wait_until(lambda: refused(b, during), REJOIN), f"the change made during the outage did not reach b:\n{b.log_tail(40)}"
    assert wait_until(lambda: stored(store, before) is not None, REJOIN), "the store was not written back"
    assert stored(store, during)["entry"]["reason"] == "during the outage"
    assert store.cmd("GET", "herald:epoch"), "the epoch was not restored"
    assert a.metric("herald_store_pending_changes") == 0
    assert a.metric("herald_store_up") == 1 and b.metric("herald_store_up") == 1
    assert "lost its suppression list" in a.log_text() + b.log_text()


def test_a_relay_joining_with_a_list_of_its_own_brings_it_in(relays, dns, peers, store):
    solo = start_outbound(relays, dns, peers, name="solo")
    addr = f"{unique('local')}@foreign.test"
    assert solo.http("PUT", f"/suppressions/{addr}", {"reason": "from the single-relay days"})[0] == 200
    solo.stop()
    solo.config["store"] = store.section(resync_interval="6h")
    solo.write_config()
    solo.start()
    other = fleet_relay(relays, dns, peers, store, "other")
    assert wait_until(lambda: refused(other, addr), FEED), other.log_tail(40)
    assert stored(store, addr)["entry"]["reason"] == "from the single-relay days"


def test_a_deliberate_reset_empties_every_copy(relays, dns, peers, store):
    """Deleting the keys and setting a new epoch is how an operator clears the fleet's list on purpose; the
    relays' next resync follows it rather than writing their copies back."""
    a = fleet_relay(relays, dns, peers, store, "a", resync_interval="2s")
    addr = f"{unique('reset')}@foreign.test"
    assert a.http("PUT", f"/suppressions/{addr}", {"reason": "to be reset"})[0] == 200
    assert wait_until(lambda: stored(store, addr) is not None, FEED)
    store.cmd("DEL", "herald:{supp}:state", "herald:{supp}:feed")
    store.cmd("SET", "herald:epoch", "reset-" + unique("epoch"))
    assert wait_until(lambda: rcpt(a, addr).starts("250 2.1.5"), FEED), a.log_tail(40)
    assert stored(store, addr) is None
    assert "reset on purpose" in a.log_text()


def limited_relay(relays, dns, peers, store, name: str, fleet_size: int = 2):
    section = store.section(resync_interval="6h", fleet_size=fleet_size)
    delivery = {"per_domain": {"max_connections": 3, "messages_per_connection": 2}}
    return start_outbound(relays, dns, peers, name=name, delivery=delivery,
                          config=lambda cfg: cfg.update(store=section))


def flood(rs, domain: str, per_relay: int, tag: str) -> None:
    """per_relay messages to `domain` through each relay at once (each recipient names its relay); returns
    once every relay has delivered them."""
    ids: list[tuple] = []
    lock = threading.Lock()

    def feed(r):
        for n in range(per_relay):
            qid, _, _ = send(r, [f"{r.label}-{n}@{domain}"], tag)
            with lock:
                ids.append((r, qid))

    threads = [threading.Thread(target=feed, args=(r,)) for r in rs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r, qid in ids:
        wait_gone(r, qid, 120)


def test_max_connections_holds_for_the_fleet_and_is_used_in_full(relays, dns, peers, mailbox, store):
    """`per_domain.max_connections: 3` on two relays: the destination sees at most 3 connections from both
    together (without the store it would see 6), and under load it sees all 3."""
    dns.route("limited.test", "127.0.0.4")
    mx = peers.aio("127.0.0.4", "limited", data_delay=0.3)
    a = limited_relay(relays, dns, peers, store, "a")
    b = limited_relay(relays, dns, peers, store, "b")
    flood((a, b), "limited.test", 15, "lease")
    assert len(mx.accepted()) == 30, len(mx.accepted())
    assert mx.max_concurrent <= 3, f"{mx.max_concurrent} connections at once from a fleet limited to 3"
    assert mx.max_concurrent == 3, f"only {mx.max_concurrent} of the 3 connections used under load"
    # Waiting for a lease is not a delivery attempt.
    for r in (a, b):
        status, body = r.http_get("/metrics")
        line = next(l for l in body.decode().splitlines() if l.startswith('herald_deliveries_total{result="deferred"}'))
        assert line.endswith(" 0"), line


def test_without_the_store_each_relay_keeps_to_its_share_and_mail_flows(relays, dns, peers, mailbox, store):
    dns.route("shared.test", "127.0.0.5")
    mx = peers.aio("127.0.0.5", "shared", data_delay=0.3)
    a = limited_relay(relays, dns, peers, store, "a")
    b = limited_relay(relays, dns, peers, store, "b")
    store.stop()
    flood((a, b), "shared.test", 8, "share")
    assert len(mx.accepted()) == 16
    # 3 // fleet_size 2 = 1 connection per relay while cut off.
    assert mx.max_concurrent <= 2, f"{mx.max_concurrent} connections at once with the store away"
    assert "share" in a.log_text() and "until the store answers" in a.log_text(), a.log_tail(30)


def test_a_wrong_password_starts_on_the_local_list_and_says_so(relays, dns, peers, store):
    section = store.section()
    (store.workdir / "wrong").write_text("not-the-password\n")
    section["password_file"] = str(store.workdir / "wrong")
    r = start_outbound(relays, dns, peers, name="wrongpw", config=lambda cfg: cfg.update(store=section))
    assert r.metric("herald_store_up") == 0
    said = wait_until(lambda: [l for l in r.log_text().splitlines() if "cannot use the fleet's store" in l], FEED)
    assert said and '"level":"ERROR"' in said[0] and "authentication failed" in said[0].lower(), r.log_tail(40)
    assert store.password not in r.log_text()
    addr = f"{unique('local')}@foreign.test"
    assert r.http("PUT", f"/suppressions/{addr}", {"reason": "kept locally"})[0] == 200
    assert refused(r, addr)


def test_required_refuses_to_start_without_the_store(relays, dns, peers, store):
    section = store.section(required=True)
    section["url"] = f"redis://127.0.0.1:{store.port}/0"
    store.stop()
    cfg = relays.config("required")
    cfg["store"] = section
    r = relays.start("required", config=cfg, wait=False)
    deadline = time.monotonic() + 30
    while r.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not r.running, "the relay started without its required store"
    log = r.log_text()
    assert f"127.0.0.1:{store.port}" in log and "fleet-secret" not in log, log[-2000:]


# Rates. A rate of COUNT/PERIOD is a bucket of COUNT turns refilled one every PERIOD/COUNT: any stretch of
# arrivals at the destination holds at most COUNT plus one per interval it spans. SLACK covers the time
# between the relay's decision and the peer's timestamp (loopback, a loaded CI machine); without the limit
# (or with it per relay where it should be per fleet) the stretches below exceed it many times over.
SLACK = 1.5


def excess(times: list[float], interval: float) -> float:
    """The most arrivals of any stretch beyond one per `interval` it spans."""
    t = sorted(times)
    return max((j - i + 1) - (t[j] - t[i]) / interval for i in range(len(t)) for j in range(i, len(t)))


def rated_relay(relays, dns, peers, name: str, rate: str, store: Store | None = None, fleet_size: int = 2):
    delivery = {"per_domain": {"max_connections": 10, "messages_per_connection": 100, "max_message_rate": rate}}
    config = None
    if store is not None:
        section = store.section(resync_interval="6h", fleet_size=fleet_size)
        config = lambda cfg: cfg.update(store=section)  # noqa: E731
    return start_outbound(relays, dns, peers, name=name, delivery=delivery, config=config)


def deferred(r) -> float | None:
    return r.metric('herald_deliveries_total{result="deferred"}')


def test_a_message_rate_holds_on_a_relay_without_a_store(relays, dns, peers, mailbox):
    """`max_message_rate: 4/2s`: a burst of 4, then one message every half second; the waits are not
    delivery attempts."""
    dns.route("rated.test", "127.0.0.6")
    mx = peers.aio("127.0.0.6", "rated")
    r = rated_relay(relays, dns, peers, "solo", "4/2s")
    flood((r,), "rated.test", 14, "rate")
    got = mx.accepted()
    assert len(got) == 14, len(got)
    over = excess([t.at for t in got], 0.5)
    assert over <= 4 + SLACK, f"{over:.1f} messages beyond the rate's interval (a burst may be 4)"
    assert r.metric('herald_delivery_waits_total{reason="rate"}') > 0
    assert deferred(r) == 0


def test_a_message_rate_holds_for_the_fleet_through_the_store(relays, dns, peers, mailbox, store):
    """`8/4s` on two relays sharing a store: the destination sees the rate of one relay, not of two."""
    dns.route("fleetrate.test", "127.0.0.7")
    mx = peers.aio("127.0.0.7", "fleetrate")
    a = rated_relay(relays, dns, peers, "a", "8/4s", store)
    b = rated_relay(relays, dns, peers, "b", "8/4s", store)
    assert wait_until(lambda: a.metric("herald_store_up") == 1 and b.metric("herald_store_up") == 1, FEED)
    flood((a, b), "fleetrate.test", 10, "rate")
    got = mx.accepted()
    assert len(got) == 20, len(got)
    over = excess([t.at for t in got], 0.5)
    assert over <= 8 + SLACK, f"{over:.1f} messages beyond the fleet's rate (a burst may be 8)"
    # Both relays sent, and both asked the store.
    for r in (a, b):
        assert any(t.rcpt_tos[0].startswith(f"{r.label}-") for t in got)
        assert r.metric('herald_store_latency_seconds_count{op="rate"}') > 0
        assert deferred(r) == 0


def test_without_the_store_each_relay_keeps_to_its_share_of_the_rate(relays, dns, peers, mailbox, store):
    """`8/4s` for a fleet of 2 with the store away: each relay sends 4 per 4 s, so the fleet stays at 8."""
    dns.route("sharerate.test", "127.0.0.8")
    mx = peers.aio("127.0.0.8", "sharerate")
    a = rated_relay(relays, dns, peers, "a", "8/4s", store)
    b = rated_relay(relays, dns, peers, "b", "8/4s", store)
    store.stop()
    flood((a, b), "sharerate.test", 7, "rate")
    got = mx.accepted()
    assert len(got) == 14, len(got)
    for r in (a, b):
        mine = [t.at for t in got if t.rcpt_tos[0].startswith(f"{r.label}-")]
        assert len(mine) == 7
        over = excess(mine, 1.0)
        assert over <= 4 + SLACK, f"{r.label}: {over:.1f} beyond its share (4 per 4 s)"
    assert excess([t.at for t in got], 0.5) <= 8 + SLACK
    assert "message rates are kept by this relay" in a.log_text(), a.log_tail(30)


# Counters per day: messages per source address, recipients per sending domain; summed in the store.


def counters(r) -> dict:
    status, body = r.http("GET", "/counters")
    assert status == 200, body
    return json.loads(body)


def test_counters_add_up_for_the_fleet_in_the_store(relays, dns, peers, foreign, mailbox, store):
    """Messages through two relays: the store holds the fleet's counts for the day, per source address
    (messages with a recipient accepted) and per sending domain (recipients delivered and bounced), and
    each relay's admin API shows the fleet's."""
    a = fleet_relay(relays, dns, peers, store, "a")
    b = fleet_relay(relays, dns, peers, store, "b")
    gone = f"{unique('gone')}@foreign.test"
    foreign.on_rcpt(gone, f"550 5.1.1 <{gone}>: Recipient address rejected: User unknown")
    for r, n in ((a, 3), (b, 2)):
        for i in range(n):
            qid, _, _ = send(r, [f"{unique('c')}@foreign.test"], "count")
            wait_gone(r, qid)
    qid, _, _ = send(a, [gone], "count")
    wait_gone(a, qid)
    day = counters(a)["day"]

    def in_store():
        src = store.cmd("HGET", f"herald:count:{{src}}:{day}", "127.0.0.1")
        delivered = store.cmd("HGET", f"herald:count:{{dom}}:{day}", "example.test/delivered")
        bounced = store.cmd("HGET", f"herald:count:{{dom}}:{day}", "example.test/bounced")
        # Six messages left the source address: five delivered, and the bounce's DSN to the sender (the
        # null sender's recipients count for no sending domain).
        return (src, delivered, bounced) == ("6", "5", "1")

    assert wait_until(in_store, FEED), (counters(a), counters(b))
    ttl = int(store.cmd("TTL", f"herald:count:{{src}}:{day}"))
    assert 7 * 86400 < ttl <= 8 * 86400, ttl
    for r in (a, b):
        c = counters(r)
        assert c["sources"] == {"127.0.0.1": 6}, c
        assert c["domains"]["example.test"] == {"delivered": 5, "bounced": 1}, c


def test_a_relay_without_a_store_counts_for_itself(relays, dns, peers, foreign, mailbox):
    r = start_outbound(relays, dns, peers, name="solo")
    for _ in range(2):
        qid, _, _ = send(r, [f"{unique('c')}@foreign.test"], "count")
        wait_gone(r, qid)
    c = counters(r)
    assert c["sources"] == {"127.0.0.1": 2} and c["domains"]["example.test"] == {"delivered": 2}, c
    assert counters(r) == c
    status, body = r.http("GET", f"/counters?day={c['day'] - 1}")
    assert status == 200 and json.loads(body) == {"day": c["day"] - 1, "sources": {}, "domains": {}}, body
    # A restart keeps them: they are saved on the relay's volume at shutdown.
    r.stop()
    r.start()
    assert counters(r) == c, r.log_tail(20)
