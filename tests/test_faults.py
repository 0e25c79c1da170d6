"""Faults at the relay's edges, injected for real over loopback: the relay killed with SIGKILL while it takes in
and delivers mail, its only nameserver gone, an MX that accepts the connection and never speaks, an MX that drops
the connection part-way through the message or right after its 250, and a spool whose disk fills up and later
has room again.

Each message carries a unique token (Subject and Message-ID); the receiving peers count tokens, so "lost" and
"duplicate" are counted per message. The rule throughout: a message answered 250 is delivered at least once,
nothing is bounced for a temporary fault, and a message whose 250 the relay got is never sent again.

Every test prints one `FAULT-FIGURES {json}` line (faults injected, messages acknowledged, delivered,
duplicates, lost, and what is particular to the fault); run pytest with `-rP` or `-s` to see them, or set
`HERALD_FAULT_FIGURES=<file>` to have them appended to that file as JSON lines.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import threading
import time
import uuid

import pytest

from harness.outbound import (
    FOREIGN, delivery_events, dsns, flush, start_outbound, states, wait_until,
)
from harness.relay import reassign_ports
from harness.smtp import ConnectionClosed, SmtpConn, dot_stuff, make_message

pytestmark = pytest.mark.slow

SPARE = "127.0.0.4"  # a second MX host of the same domain (peers bind 127.0.0.2-11)
TOKEN_RE = re.compile(rb"^Subject: (\S+)\r?$", re.M)


def token(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


def figures(test: str, **counts) -> None:
    """The figures a fault test reports: printed, and appended to $HERALD_FAULT_FIGURES when it is set."""
    line = json.dumps({"test": test, **counts}, sort_keys=False)
    print(f"FAULT-FIGURES {line}")
    path = os.environ.get("HERALD_FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def received(*peers) -> collections.Counter:
    """How many accepted transactions carried each token, over all the given peers (DSNs left out)."""
    got: collections.Counter = collections.Counter()
    for p in peers:
        for t in p.accepted():
            if t.mail_from == "":
                continue
            m = TOKEN_RE.search(t.data)
            got[m.group(1).decode() if m else "<no token>"] += 1
    return got


def tally(acked: set[str], got: collections.Counter) -> dict:
    """delivered / duplicates / lost of the acknowledged tokens, and how many copies of anything else came."""
    return {
        "acknowledged": len(acked),
        "delivered": sum(1 for t in acked if got[t] > 0),
        "duplicates": sum(got[t] - 1 for t in acked if got[t] > 1),
        "lost": sum(1 for t in acked if got[t] == 0),
        "unacknowledged_delivered": sum(1 for t in got if t not in acked),
    }


def submit_tokens(relay, n: int, tag: str, body: bytes = b"hello\r\n", rcpt: str = "x@foreign.test",
                  threads: int = 1) -> dict[str, str]:
    """n messages with fresh tokens, each to `rcpt`; every one must get its 250. Returns token -> queue id."""
    out: dict[str, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    host, port = relay.listener("trusted")

    def worker(k: int) -> None:
        try:
            with SmtpConn(host, port) as c:
                c.greeting()
                c.ehlo()
                for _ in range(k, n, threads):
                    t = token(tag)
                    end = c.transaction("a@example.test", [rcpt], make_message(t, body=body, to=rcpt))
                    if not end.queue_id:
                        raise AssertionError(f"{t}: {end}")
                    with lock:
                        out[t] = end.queue_id
                c.cmd("QUIT")
        except Exception as e:  # reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors and len(out) == n, f"submitted {len(out)} of {n}: {errors[:3]}"
    return out


def queue_empty(relay) -> bool:
    return not relay.queue()


def no_final_failure(relay, mailbox) -> None:
    """Nothing bounced or expired: no such delivery event, no DSN at the sender's mailbox."""
    final = [e for e in delivery_events(relay) if e.get("result") in ("bounced", "expired")]
    assert not final, f"a temporary fault ended in a bounce: {final[:3]}"
    assert not dsns(mailbox), f"DSNs sent for a temporary fault: {[t.data[:300] for t in dsns(mailbox)]}"


# ---------------------------------------------------------------------------------------------------------
# 1. kill -9 while mail comes in and goes out


class Submitter:
    """Client threads that submit one-recipient messages as fast as the relay takes them, following the relay
    to its new port after each restart. `attempted`: every token whose message was sent (end of data
    included); `acked`: every token answered 250 (token -> queue id)."""

    # In all, a bound on top of the stop event. Ten rounds of a kill every few seconds must not use it up at
    # the relay's full intake rate (over 1,000 messages a second even in a debug build), or a round waits
    # for acknowledgements that never come.
    MAX_MESSAGES = 40000
    MAX_SECONDS = 150.0

    def __init__(self, relay, threads: int, tag: str):
        self.relay, self.tag = relay, tag
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.attempted: set[str] = set()
        self.acked: dict[str, str] = {}
        self.refused: list[str] = []  # replies other than 250 to the end of data
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "submitter thread did not stop"

    def _more(self, deadline: float) -> bool:
        with self.lock:
            full = len(self.attempted) >= self.MAX_MESSAGES
        return not (self.stop.is_set() or full or time.monotonic() > deadline)

    def _run(self, n: int) -> None:
        rcpt = f"k{n}@foreign.test"
        body = b"kill -9 payload line\r\n" * 20
        deadline = time.monotonic() + self.MAX_SECONDS
        while self._more(deadline):
            try:
                host, port = self.relay.listener("trusted")  # changes with each restart
                with SmtpConn(host, port, timeout=10) as c:
                    c.greeting()
                    c.ehlo()
                    for _ in range(50):
                        if not self._more(deadline):
                            return
                        t = token(self.tag)
                        c.expect("MAIL FROM:<a@example.test>", "250")
                        c.expect(f"RCPT TO:<{rcpt}>", "250")
                        c.expect("DATA", "354")
                        with self.lock:
                            self.attempted.add(t)
                        c.send(dot_stuff(make_message(t, body=body, to=rcpt)) + b".\r\n")
                        r = c.read_reply()
                        with self.lock:
                            if r.queue_id:
                                self.acked[t] = r.queue_id
                            else:
                                self.refused.append(str(r))
            except (ConnectionClosed, OSError, AssertionError):
                time.sleep(0.02)  # killed or restarting: connect again


KILL_ROUNDS = 10
ACKS_PER_ROUND = 40
KILL_CONNECTIONS = 4


def test_kill_9_under_load_delivers_every_acknowledged_message_at_least_once_and_at_most_twice(
        relays, dns, peers, mailbox):
    sink = peers.aio(FOREIGN, "sink")
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, "kill9", delivery={
        "retry": {"first": "1s", "max": "2s", "factor": 2.0},
        "per_domain": {"max_connections": KILL_CONNECTIONS, "messages_per_connection": 50}})
    sub = Submitter(r, threads=3, tag="k9")
    kills, in_sink_at_kill = 0, []
    sub.start()
    try:
        for rnd in range(KILL_ROUNDS):
            want = sub.count() + ACKS_PER_ROUND
            delivered_before = len(sink.accepted())
            assert wait_until(lambda: sub.count() >= want, 120, 0.02), (  # a restart replays a growing spool
                f"round {rnd}: {sub.count()} of {want} acknowledgements; refusals {sub.refused[:3]}")
            # The kill should land while deliveries are going too, not only intake.
            assert wait_until(lambda: len(sink.accepted()) > delivered_before, 30, 0.02), (
                f"round {rnd}: nothing delivered since the last restart")
            time.sleep(random.uniform(0.5, 2.5))  # a kill every few seconds, at no particular moment
            r.kill()
            kills += 1
            in_sink_at_kill.append(len(sink.accepted()))
            reassign_ports(r.config)
            r.start()
    finally:
        sub.finish()
    assert not sub.refused, f"the relay refused messages under load: {sub.refused[:5]}"
    flush(r)  # anything deferred waits for no timer
    assert wait_until(lambda: queue_empty(r), 120, 0.2), f"{len(r.queue())} messages still queued after the drain"
    got = received(sink)
    acked = set(sub.acked)
    t = tally(acked, got)
    stray = [k for k in got if k not in sub.attempted]
    more_than_twice = {k: c for k, c in got.items() if k in acked and c > 2}
    figures("kill_9_under_load", faults_injected=kills, attempted=len(sub.attempted), **t,
            delivered_transactions=sum(got.values()), in_sink_at_each_kill=in_sink_at_kill)
    assert not stray, f"the sink got messages nobody sent: {stray[:5]}"
    assert t["lost"] == 0, (
        f"{t['lost']} of {len(acked)} acknowledged messages never delivered after {kills} kills, e.g. "
        f"{[k for k in acked if got[k] == 0][:5]}")
    assert not more_than_twice, f"delivered more than twice: {list(more_than_twice.items())[:5]}"
    no_final_failure(r, mailbox)


# ---------------------------------------------------------------------------------------------------------
# 2. The nameserver goes away


def test_when_the_nameserver_goes_away_mail_is_deferred_not_bounced_and_delivered_once_it_is_back(
        relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN, data_delay=0.2)  # slow: deliveries are under way when the DNS stops
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, "dnsdown", delivery={
        "retry": {"first": "1s", "max": "2s", "factor": 2.0},
        # short connections: new ones (each a look-up) keep being needed while the DNS is away
        "per_domain": {"max_connections": 2, "messages_per_connection": 2}})
    before = submit_tokens(r, 10, "dns-before", threads=2)
    assert wait_until(lambda: len(peer.accepted()) >= 2, 30, 0.02), "delivery did not get going"
    dns.stop()
    at_stop = len(peer.accepted())
    during = submit_tokens(r, 4, "dns-during")  # intake needs no DNS

    def dns_deferrals() -> list[dict]:
        return [e for e in delivery_events(r) if e.get("result") == "deferred" and "4.4.3" in str(e.get("reply"))]

    # The resolver's time-out (5 s, two attempts) is what this waits for.
    assert wait_until(lambda: len(dns_deferrals()) >= 2, 60, 0.2), (
        f"no deferral for the DNS outage: {delivery_events(r)[-5:]}\n{r.log_tail(30)}")
    waiting = r.queue()
    assert waiting, "everything was delivered before the outage mattered: the test proved nothing"
    for m in waiting:
        for s in m["status"]:
            assert s["state"] in ("queued", "deferred"), f"{m['id']}: {s}"
            assert not s["last_reply"] or s["last_reply"].startswith("4"), f"{m['id']}: {s}"
    no_final_failure(r, mailbox)
    outage_deferrals = len(dns_deferrals())
    in_outage = len(peer.accepted()) - at_stop

    dns.start()  # back on the same port, with the same records
    assert wait_until(lambda: queue_empty(r), 90, 0.2), f"still queued after the DNS came back: {r.queue()[:3]}"
    got = received(peer)
    acked = set(before) | set(during)
    t = tally(acked, got)
    figures("dns_outage", faults_injected=1, deferrals_for_dns=outage_deferrals,
            queued_during_outage=len(waiting), delivered_during_outage=in_outage, **t)
    assert t["lost"] == 0, f"never delivered: {[k for k in acked if got[k] == 0]}"
    assert t["duplicates"] == 0, f"delivered twice: {[k for k in acked if got[k] > 1]}"
    assert t["unacknowledged_delivered"] == 0, got
    no_final_failure(r, mailbox)


# ---------------------------------------------------------------------------------------------------------
# 3. An MX that accepts the connection and never says a word


def test_an_mx_that_never_greets_times_out_then_the_next_mx_or_a_later_retry_delivers(relays, dns, peers, mailbox):
    silent = peers.silent(SPARE)
    good = peers.aio(FOREIGN, "good")
    dns.route("backup.test", SPARE, FOREIGN)  # mx1 silent, mx2 good
    dns.route("silent.test", SPARE)  # its only MX is silent
    r = start_outbound(relays, dns, peers, "silent", delivery={
        "timeouts": {"connect": "1s", "command": "1s", "data": "5s"},
        "retry": {"first": "1s", "max": "2s", "factor": 2.0}})
    backed = submit_tokens(r, 3, "backup", rcpt="x@backup.test")
    stuck = submit_tokens(r, 2, "silent", rcpt="y@silent.test")

    # backup.test: the silent MX costs one greeting time-out, then mx2 takes the mail.
    assert wait_until(lambda: all(k in received(good) for k in backed), 30, 0.1), (
        f"backup.test not delivered through mx2: {received(good)}\n{r.log_tail(30)}")
    for qid in backed.values():
        # The peer has the message before the relay has logged the 250 it answered: wait for the line.
        ev = wait_until(lambda: [e for e in delivery_events(r, qid) if e.get("result") == "delivered"], 10, 0.05)
        assert ev and "mx2.backup.test" in str(ev[0].get("mx")), delivery_events(r, qid)

    # silent.test: deferred (4.4.2, the greeting timed out), retried later, never bounced.
    def retried() -> bool:
        for qid in stuck.values():
            s = states(r, qid)
            e = s and s.get("y@silent.test")
            if not e or e["state"] != "deferred" or e["attempts"] < 2:
                return False
        return True

    assert wait_until(retried, 30, 0.1), f"silent.test: {[states(r, q) for q in stuck.values()]}"
    for qid in stuck.values():
        last = states(r, qid)["y@silent.test"]["last_reply"]
        assert last.startswith("451 4.4.2") and "greeting" in last, last
    no_final_failure(r, mailbox)
    attempts_while_silent = sum(states(r, q)["y@silent.test"]["attempts"] for q in stuck.values())
    # The relay gives up on a connection that stays silent: none is left hanging.
    assert wait_until(lambda: silent.closed_by_client == silent.connections, 10, 0.1), (
        f"{silent.connections - silent.closed_by_client} connections to the silent MX still open")

    dns.remove("mx1.silent.test", "A").a("mx1.silent.test", FOREIGN)  # the MX host is fixed
    assert wait_until(lambda: queue_empty(r), 30, 0.1), f"still queued: {r.queue()}"
    got = received(good)
    acked = set(backed) | set(stuck)
    t = tally(acked, got)
    figures("silent_mx", faults_injected=silent.connections, attempts_while_silent=attempts_while_silent, **t)
    assert t["lost"] == 0 and t["duplicates"] == 0 and t["unacknowledged_delivered"] == 0, (t, got)
    no_final_failure(r, mailbox)


# ---------------------------------------------------------------------------------------------------------
# 4. An MX that drops the connection in the middle of the message, or right after its 250

BIG_BODY = (b"x" * 78 + b"\r\n") * 800  # 64 KB: the drop comes well before the end of data


def test_a_connection_dropped_mid_data_is_deferred_and_delivered_later_exactly_once(relays, dns, peers, mailbox):
    flaky = peers.aio(FOREIGN, "flaky").drop_mid_data(times=3, after=16 * 1024)  # then it recovers
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, "middata", delivery={
        "retry": {"first": "1s", "max": "2s", "factor": 2.0},
        "per_domain": {"max_connections": 1, "messages_per_connection": 10}})
    sent = submit_tokens(r, 4, "middata", body=BIG_BODY)
    assert wait_until(lambda: queue_empty(r), 60, 0.1), f"still queued: {r.queue()}\n{r.log_tail(30)}"
    got = received(flaky)
    t = tally(set(sent), got)
    cut = [e for e in delivery_events(r) if e.get("result") == "deferred" and "4.4.2" in str(e.get("reply"))]
    figures("drop_mid_data_then_recover", faults_injected=flaky.faults["mid_data"], deferrals=len(cut), **t)
    assert flaky.faults["mid_data"] == 3, flaky.faults
    assert len(cut) == 3, f"each cut transaction is one deferral (451 4.4.2): {delivery_events(r)}"
    assert t["lost"] == 0 and t["duplicates"] == 0 and t["unacknowledged_delivered"] == 0, (t, got)
    no_final_failure(r, mailbox)


def test_an_mx_that_always_drops_mid_data_does_not_keep_the_mail_from_the_next_mx(relays, dns, peers, mailbox):
    # RFC 5321 section 5.1: the MX hosts are tried in order until an attempt succeeds. A retry starts at the
    # most preferred host again, so the next one must be tried in the same attempt, or a primary that always
    # drops the connection (a crashing content filter) holds the mail until it expires.
    broken = peers.aio(FOREIGN, "broken").drop_mid_data(times=1000, after=16 * 1024)
    backup = peers.aio(SPARE, "backup")
    dns.route("foreign.test", FOREIGN, SPARE)
    r = start_outbound(relays, dns, peers, "alwaysdrops", delivery={
        "retry": {"first": "1s", "max": "2s", "factor": 2.0},
        "per_domain": {"max_connections": 2, "messages_per_connection": 10}})
    sent = submit_tokens(r, 4, "alwaysdrops", body=BIG_BODY)
    done = wait_until(lambda: queue_empty(r), 20, 0.1)
    got = received(broken, backup)
    t = tally(set(sent), got)
    figures("drop_mid_data_always", faults_injected=broken.faults["mid_data"],
            via_mx2=sum(received(backup).values()), **t)
    assert broken.faults["mid_data"] >= 1, "the primary MX never cut a transaction: the test proved nothing"
    assert done, (f"{len(r.queue())} messages still queued while mx2 is healthy; mx1 cut "
                  f"{broken.faults['mid_data']} transactions: {delivery_events(r)[-3:]}")
    assert t["lost"] == 0 and t["duplicates"] == 0 and t["unacknowledged_delivered"] == 0, (t, got)
    assert sum(received(backup).values()) == len(sent), got
    no_final_failure(r, mailbox)


def test_a_250_followed_by_a_dropped_connection_counts_as_delivered_and_the_next_goes_on_a_new_connection(
        relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN).close_after_data(times=3)
    dns.route("foreign.test", FOREIGN).servfail("foreign.test")  # hold delivery until all are queued
    r = start_outbound(relays, dns, peers, "after250", delivery={
        "retry": {"first": "1s", "max": "2s", "factor": 2.0},
        "per_domain": {"max_connections": 1, "messages_per_connection": 10}})
    sent = submit_tokens(r, 6, "after250")
    assert wait_until(lambda: len([e for e in delivery_events(r) if e.get("result") == "deferred"]) >= 1, 30, 0.1)
    dns.heal("foreign.test")
    flush(r)  # now all of them ride one connection until the peer drops it after a 250
    assert wait_until(lambda: queue_empty(r), 60, 0.1), f"still queued: {r.queue()}\n{r.log_tail(30)}"
    got = received(peer)
    t = tally(set(sent), got)
    delivered_events = collections.Counter(
        str(e.get("queue_id")).lower() for e in delivery_events(r) if e.get("result") == "delivered")
    lost_connection = [e for e in delivery_events(r) if e.get("result") == "deferred"
                       and "4.4.2" in str(e.get("reply"))]
    figures("250_then_drop", faults_injected=peer.faults["after_data"],
            deferred_on_the_dead_connection=len(lost_connection), connections=peer.connections, **t)
    assert peer.faults["after_data"] == 3, peer.faults
    assert t["lost"] == 0 and t["duplicates"] == 0 and t["unacknowledged_delivered"] == 0, (t, got)
    twice = {q: n for q, n in delivered_events.items() if n > 1}
    assert not twice and len(delivered_events) == len(sent), delivered_events
    # The message after each drop met the dead connection (the server said nothing about it) and went out
    # at once on a new one: no deferral, a connection per drop.
    assert peer.connections >= 4, f"{peer.connections} connections for 3 drops: the test proved nothing"
    assert not lost_connection, f"deferred on a kept connection that was already closed: {lost_connection}"
    no_final_failure(r, mailbox)


# ---------------------------------------------------------------------------------------------------------
# 5. The spool's disk fills up, and then has room again


def test_a_full_spool_refuses_with_452_and_takes_mail_again_once_space_returns(
        relays, dns, peers, mailbox, tmpfs):
    mnt = tmpfs.mount("2m")
    # Something else fills the disk, leaving the relay room for about ten messages.
    st = os.statvfs(mnt)
    ballast = mnt / "ballast"
    ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 192 * 1024))
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN).servfail("foreign.test")  # keep the mail queued until the end
    # Short retries: deferrals (state records) keep being written while the disk is full, and a look-up that
    # was answered SERVFAIL just before the fix cannot leave a message waiting for an hour.
    r = tmpfs.uses(start_outbound(relays, dns, peers, "full", spool_dir=mnt / "spool", delivery={
        "retry": {"first": "1s", "max": "2s", "factor": 2.0}}))
    host, port = r.listener("trusted")
    body = b"spool filler line of text\r\n" * 600  # ~16 KB
    acked: dict[str, str] = {}
    refusals: list[str] = []
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        for _ in range(60):
            t = token("full")
            c.expect("MAIL FROM:<a@example.test>", "250")
            c.expect("RCPT TO:<x@foreign.test>", "250")
            end = c.data(make_message(t, body=body))
            if not end.queue_id:
                refusals.append(str(end))
                break
            acked[t] = end.queue_id
        assert refusals, f"{len(acked)} messages of 16 KB fit into 192 KB: the disk never filled"
        assert refusals[0].startswith("452 4.3.1"), refusals
        assert acked, "not a single message fit"
        c.expect("RSET", "250")
        # Still full: refused again, and the session goes on.
        c.expect("MAIL FROM:<a@example.test>", "250")
        c.expect("RCPT TO:<x@foreign.test>", "250")
        again = c.data(make_message(token("full"), body=body))
        assert again.starts("452 4.3.1"), again
        refusals.append(str(again))
        c.expect("RSET", "250")

        ballast.unlink()  # space returns; the relay is not restarted
        after: dict[str, str] = {}
        for _ in range(10):
            t = token("room")
            c.expect("MAIL FROM:<a@example.test>", "250")
            c.expect("RCPT TO:<x@foreign.test>", "250")
            end = c.data(make_message(t, body=body))
            assert end.queue_id, f"space is back but the relay still says {end}\n{r.log_tail(30)}"
            after[t] = end.queue_id
    q = r.queue_by_id()
    missing = [t for t, qid in {**acked, **after}.items() if qid not in q]
    assert not missing, f"acknowledged messages missing from the queue: {missing}"

    dns.heal("foreign.test")
    flush(r)
    assert wait_until(lambda: queue_empty(r), 60, 0.1), f"still queued: {r.queue()[:3]}"
    got = received(peer)
    everything = set(acked) | set(after)
    t = tally(everything, got)
    # A restart replays the spool that was written through the full disk: nothing comes back to be sent.
    assert r.stop() == 0
    reassign_ports(r.config)
    r.start()
    requeued = r.queue()
    figures("spool_full", faults_injected=1, refused_452=len(refusals), acknowledged_before_full=len(acked),
            acknowledged_after_space_returned=len(after), requeued_after_restart=len(requeued), **t)
    assert t["lost"] == 0 and t["duplicates"] == 0 and t["unacknowledged_delivered"] == 0, (t, got)
    assert not requeued, f"delivered messages came back after a restart: {requeued[:3]}"
    no_final_failure(r, mailbox)
