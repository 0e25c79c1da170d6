"""Delivery across restarts: per-recipient state is on disk, so a restart neither forgets a recipient nor sends
a delivered one again.

The backlog tests queue N messages (one recipient each, a unique marker in Subject) while the resolver fails,
heal it and flush, so that the relay works through the backlog towards a slow peer (each DATA takes 20 ms,
two connections at most); the relay is stopped in the middle, restarted, and left to finish.
"""

from __future__ import annotations

import collections
import threading

import pytest

from harness.outbound import (
    FOREIGN, flush, get_message, send, start_outbound, states, unique, wait_gone, wait_state, wait_until,
)
from harness.relay import reassign_ports
from harness.smtp import SmtpConn, make_message

pytestmark = pytest.mark.slow

N = 300
MAX_CONNECTIONS = 2


def submit_many(r, n: int, tag: str, threads: int = 4) -> dict[str, str]:
    """n messages to r<i>-<tag>@foreign.test over `threads` sessions; returns marker -> recipient."""
    sent: dict[str, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    host, port = r.listener("trusted")

    def worker(k: int) -> None:
        try:
            with SmtpConn(host, port) as c:
                c.greeting()
                c.ehlo()
                for i in range(k, n, threads):
                    rcpt, marker = f"r{i}-{tag}@foreign.test", unique(f"{tag}{i}")
                    end = c.transaction("a@example.test", [rcpt], make_message(marker, to=rcpt))
                    if not end.queue_id:
                        raise AssertionError(f"{rcpt}: {end}")
                    with lock:
                        sent[marker] = rcpt
        except Exception as e:  # reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors and len(sent) == n, f"submitted {len(sent)} of {n}: {errors[:3]}"
    return sent


def deliveries(peer) -> collections.Counter:
    """How many times each marker was accepted by the peer."""
    return collections.Counter(t.message["Subject"] for t in peer.accepted())


def backlog_relay(relays, dns, peers, tag: str):
    peer = peers.aio(FOREIGN, data_delay=0.02)
    dns.route("foreign.test", FOREIGN).servfail("foreign.test")
    r = start_outbound(relays, dns, peers, delivery={
        "per_domain": {"max_connections": MAX_CONNECTIONS, "messages_per_connection": 50}})
    sent = submit_many(r, N, tag)

    def all_deferred():
        q = r.queue()
        return len(q) == N and all(s["state"] == "deferred" for m in q for s in m["status"])

    assert wait_until(all_deferred, 60, 0.2), "the backlog did not settle as deferred"
    dns.heal("foreign.test")
    return r, peer, sent


def finish(r, peer, sent) -> collections.Counter:
    flush(r)  # recipients deferred before the stop are due in an hour: now
    assert wait_until(lambda: not r.queue(), 120, 0.2), f"{len(r.queue())} messages still queued"
    got = deliveries(peer)
    missing = [m for m in sent if got[m] == 0]
    assert not missing, f"{len(missing)} of {len(sent)} recipients never delivered, e.g. {missing[:3]}"
    assert set(got) <= set(sent), "the peer got messages nobody sent"
    return got


def test_sigterm_in_the_middle_of_a_backlog_delivers_every_recipient_exactly_once(relays, dns, peers):
    r, peer, sent = backlog_relay(relays, dns, peers, "term")
    flush(r)
    assert wait_until(lambda: len(peer.accepted()) >= N // 5, 60, 0.02), "delivery did not get going"
    assert r.stop() == 0, "SIGTERM: exit 0"
    at_stop = len(peer.accepted())
    print(f"delivered before SIGTERM: {at_stop} of {N}")
    assert at_stop < N, "the whole backlog was through before the stop: the test proved nothing"
    reassign_ports(r.config)
    r.start()
    got = finish(r, peer, sent)
    dup = {m: c for m, c in got.items() if c > 1}
    assert not dup, f"{len(dup)} recipients delivered more than once after SIGTERM (at stop: {at_stop}): {list(dup)[:5]}"


def test_kill_9_in_the_middle_of_a_backlog_loses_no_recipient(relays, dns, peers):
    """kill -9 may cut the relay off between the peer's 250 and the relay writing 'delivered' down: those
    transactions are sent again. That is at most one transaction per open connection, so duplicates are
    bounded by per_domain.max_connections (one recipient per message here); nothing may be lost."""
    r, peer, sent = backlog_relay(relays, dns, peers, "kill")
    flush(r)
    assert wait_until(lambda: len(peer.accepted()) >= N // 5, 60, 0.02), "delivery did not get going"
    r.kill()
    at_kill = len(peer.accepted())
    print(f"delivered before kill -9: {at_kill} of {N}")
    assert at_kill < N, "the whole backlog was through before the kill: the test proved nothing"
    reassign_ports(r.config)
    r.start()
    got = finish(r, peer, sent)
    extra = sum(c - 1 for c in got.values())
    print(f"duplicates after kill -9: {extra}")
    assert extra <= MAX_CONNECTIONS, (
        f"{extra} duplicate deliveries after kill -9, more than the {MAX_CONNECTIONS} connections in flight: "
        f"{[(m, c) for m, c in got.items() if c > 1][:5]}")


def test_after_a_restart_delivered_recipients_are_not_sent_again_and_deferred_ones_are(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    peer.on_rcpt("later@foreign.test", "451 4.3.0 not yet")  # until the rules are cleared
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["now@foreign.test", "later@foreign.test"], "partial")
    wait_state(r, qid, {"now@foreign.test": "delivered", "later@foreign.test": "deferred"})
    assert r.stop() == 0
    peer.clear_rules()
    reassign_ports(r.config)
    r.start()
    s = states(r, qid)
    assert s and s["now@foreign.test"]["state"] == "delivered", f"state after restart: {s}"
    assert s["later@foreign.test"]["state"] == "deferred" and s["later@foreign.test"]["attempts"] >= 1, s
    flush(r)
    wait_gone(r, qid)
    assert len(peer.delivered_to("now@foreign.test")) == 1, "a delivered recipient was sent again"
    assert len(peer.delivered_to("later@foreign.test")) == 1
    assert get_message(r, qid) is None
