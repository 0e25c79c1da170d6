"""Delivery: routing by MX, outcomes per recipient, retries, and the queue API (delivery spec).

Each test runs its own relay whose resolver is the test DNS server (`dns` fixture, authoritative for *.test)
and whose `delivery.port` is the port of the test's peers (`peers` fixture: 127.0.0.2-11, one port). Unless a
test says otherwise the first retry is an hour away, so a deferred recipient stays deferred until a flush.
"""

from __future__ import annotations

import datetime
import json
import re
import time

import pytest

from harness.outbound import (
    FOREIGN, MAILBOX, SENDER, delivery_events, dsn_about, flush, get_message, parse_dsn, rfc3339, send, start_outbound, states,
    status_field, unique, wait_dsn, wait_event, wait_gone, wait_state, wait_until,
)
from harness.relay import HOSTNAME
from harness.reports import token
from harness.smtp import SmtpConn, make_message

SPARE = "127.0.0.4"  # nothing listens here unless a test puts a peer there
SPARE2 = "127.0.0.5"


def unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value)


def first_header(data: bytes) -> str:
    """The first header field of a message, unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    m = re.match(r"([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    return unfold(m.group(1)) if m else ""


# ---------------------------------------------------------------------------------------------------------
# The mail arrives


def test_message_is_delivered_through_mx_to_smtp_sink_and_leaves_the_queue(relays, dns, peers):
    sink = peers.sink(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "sink")
    wait_gone(r, qid)
    got = [m for m in sink.messages() if marker.encode() in m.raw]
    assert len(got) == 1, f"smtp-sink holds {len(got)} copies of {marker}"
    m = got[0]
    # example.test has a return path: the envelope sender is a token naming this message and recipient
    assert m.mail_from == token(qid, "bob@foreign.test").address and m.rcpt_tos == ["bob@foreign.test"], (
        m.mail_from, m.rcpt_tos)
    received = [unfold(h) for h in m.message.get_all("Received", []) if "(smtp-sink)" not in h]
    assert any(HOSTNAME in h and qid.lower() in h.lower() for h in received), received
    assert r.queue_by_id().get(qid) is None


def test_message_is_delivered_byte_for_byte_behind_the_relays_received_header(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    # lines that need dot-stuffing on the way out, and one that looks like the end of data
    body = "first line\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
    qid, marker, msg = send(r, ["bob@foreign.test"], "exact", body=body)
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)
    assert t.mail_from == token(qid, "bob@foreign.test").address and t.rcpt_tos == ["bob@foreign.test"]
    hdr = first_header(t.data)
    assert hdr.startswith("Received:") and HOSTNAME in hdr and qid.lower() in hdr.lower(), hdr
    assert msg in t.data, f"original message not intact in what the peer received:\n{t.data[:600]!r}"
    assert t.helo == HOSTNAME, f"EHLO without an ip_pool should be the hostname, was {t.helo!r}"


def test_each_delivery_attempt_is_logged_with_its_fields(relays, dns, peers):
    peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, ["bob@foreign.test", "carol@Foreign.Test"], "log")
    wait_gone(r, qid)
    ev = wait_event(r, qid, "delivered")
    assert ev["domain"] == "foreign.test", ev
    assert "mx1.foreign.test" in str(ev["mx"]), ev
    assert str(ev["tls"]).lower() == "none", ev  # the peer offers no STARTTLS
    assert "250" in str(ev["reply"]), ev
    assert float(ev["delay"]) >= 0, ev
    assert int(ev["recipients"]) == 2, ev
    assert len(delivery_events(r, qid)) == 1, "one attempt, one destination: one line"


# ---------------------------------------------------------------------------------------------------------
# Routing


def test_the_most_preferred_mx_gets_the_mail(relays, dns, peers):
    primary = peers.aio(FOREIGN, "primary")
    secondary = peers.aio(SPARE, "secondary")
    # listed worst first: the relay must sort by preference itself
    dns.mx("foreign.test", (20, "mx-b.foreign.test"), (10, "mx-a.foreign.test"))
    dns.a("mx-a.foreign.test", FOREIGN).a("mx-b.foreign.test", SPARE)
    r = start_outbound(relays, dns, peers)
    ids = [send(r, [f"r{i}@foreign.test"], f"pref{i}") for i in range(3)]
    for qid, _, _ in ids:
        wait_gone(r, qid)
    for _, marker, _ in ids:
        assert len(primary.with_marker(marker)) == 1
    assert secondary.connections == 0, f"the less preferred MX was used: {secondary.transactions}"


def test_when_the_preferred_mx_refuses_connections_the_next_one_gets_the_mail(relays, dns, peers):
    backup = peers.aio(FOREIGN, "backup")
    dns.mx("foreign.test", (10, "mx-dead.foreign.test"), (20, "mx-backup.foreign.test"))
    dns.a("mx-dead.foreign.test", SPARE).a("mx-backup.foreign.test", FOREIGN)  # nothing listens on SPARE
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "fallback")
    wait_gone(r, qid)
    assert len(backup.with_marker(marker)) == 1


def test_a_421_greeting_sends_the_mail_on_to_the_next_mx(relays, dns, peers):
    busy = peers.greeter(SPARE, "421 4.3.2 too busy, try later")
    backup = peers.aio(FOREIGN, "backup")
    dns.mx("foreign.test", (10, "mx-busy.foreign.test"), (20, "mx-backup.foreign.test"))
    dns.a("mx-busy.foreign.test", SPARE).a("mx-backup.foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "greet421")
    wait_gone(r, qid)
    assert busy.connections >= 1, "the preferred MX was never tried"
    assert len(backup.with_marker(marker)) == 1


def test_the_addresses_of_an_mx_host_are_tried_in_order(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.mx("foreign.test", (10, "mx.foreign.test")).a("mx.foreign.test", SPARE, FOREIGN)  # SPARE: refused
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "addrs")
    wait_gone(r, qid)
    assert len(peer.with_marker(marker)) == 1


def test_a_domain_without_mx_records_is_delivered_to_its_own_address(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.a("foreign.test", FOREIGN)  # no MX: implicit MX
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "implicit")
    wait_gone(r, qid)
    assert len(peer.with_marker(marker)) == 1
    mx = dns.queries_for("foreign.test", "MX")
    assert mx and all(q.rcode == "NOERROR" for q in mx), mx  # it did ask for MX first, and got NODATA


def test_a_truncated_udp_answer_is_asked_again_over_tcp(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN).truncate("foreign.test")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "tcpfallback")
    wait_gone(r, qid)
    assert len(peer.with_marker(marker)) == 1
    kinds = {(q.transport, q.rcode) for q in dns.queries_for("foreign.test", "MX")}
    assert ("udp", "TRUNCATED") in kinds and ("tcp", "NOERROR") in kinds, kinds


def test_domain_names_are_matched_without_regard_to_case(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    # (other.test has no return path, so its recipients share a transaction)
    qid, marker, _ = send(r, ["one@foreign.test", "two@FOREIGN.TEST"], "case", sender="a@other.test")
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)  # one destination domain: one transaction with both recipients
    assert sorted(a.lower() for a in t.rcpt_tos) == ["one@foreign.test", "two@foreign.test"], t.rcpt_tos


def test_mail_to_a_return_path_domain_is_never_queued_or_delivered_by_mx(relays, dns, peers):
    """bounces.example.test is example.test's return_path: the relay is its MX and reads what comes there.
    Its MX record points at a live peer that must never see that mail; a later message to foreign.test
    through the same peer shows the engine was at work."""
    peer = peers.aio(FOREIGN)
    dns.route("bounces.example.test", FOREIGN).route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    before = set(r.queue_by_id())
    local_marker = unique("local")
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 ")
        c.expect("RCPT TO:<fbl@bounces.example.test>", "250 ")
        end = c.data(make_message(local_marker, to="fbl@bounces.example.test"))
        assert end.starts("250 ") and end.queue_id is None, end
    sentinel, _, _ = send(r, ["bob@foreign.test"], "sentinel")
    wait_gone(r, sentinel)
    assert set(r.queue_by_id()) - before == set()
    assert not peer.with_marker(local_marker)
    assert not peer.rcpt_replies("fbl@bounces.example.test")


# ---------------------------------------------------------------------------------------------------------
# DNS outcomes


def test_null_mx_bounces_with_5_1_10(relays, dns, peers, mailbox):
    dns.null_mx("foreign.test").a("foreign.test", FOREIGN)
    peer = peers.aio(FOREIGN)  # must not be used: a null MX means no mail at all, not implicit MX
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "nullmx")
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)
    d = parse_dsn(t.data)
    assert status_field(d.recipient("bob@foreign.test")) == "5.1.10", str(d.recipient("bob@foreign.test"))
    assert peer.connections == 0
    assert wait_event(r, qid, "bounced")


def test_nxdomain_bounces_with_5_1_2(relays, dns, peers, mailbox):
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@nowhere.test"], "nxdomain")
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)
    d = parse_dsn(t.data)
    rb = d.recipient("bob@nowhere.test")
    assert status_field(rb) == "5.1.2", str(rb)
    assert rb["Remote-MTA"] is None, f"no MX was involved, yet the DSN names one: {rb}"
    assert any(q.rcode == "NXDOMAIN" for q in dns.queries_for("nowhere.test", "MX"))


def _has_status(r, qid: str, rcpt: str, code: str) -> bool:
    """The status code shows in the recipient's last_reply or in the delivery log's reply."""
    s = states(r, qid) or {}
    if code in str(s.get(rcpt, {}).get("last_reply") or ""):
        return True
    return any(code in str(e.get("reply")) for e in delivery_events(r, qid))


def test_servfail_defers_with_4_4_3_and_after_the_fix_a_flush_delivers(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN).servfail("foreign.test")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "servfail")
    s = wait_state(r, qid, {"bob@foreign.test": "deferred"})
    e = s["bob@foreign.test"]
    assert e["attempts"] >= 1 and e["next_attempt"], e
    next_at = rfc3339(e["next_attempt"])
    assert next_at > datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=30), (
        f"retry.first is 1h, next_attempt is {e['next_attempt']}")
    assert _has_status(r, qid, "bob@foreign.test", "4.4.3"), (s, delivery_events(r, qid))
    assert peer.connections == 0
    dns.heal("foreign.test")
    flush(r)
    wait_gone(r, qid)
    assert len(peer.with_marker(marker)) == 1


def test_a_dns_timeout_defers_with_4_4_3(relays, dns, peers):
    dns.route("foreign.test", FOREIGN).drop("foreign.test")
    peer = peers.aio(FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, ["bob@foreign.test"], "dnstimeout")
    wait_state(r, qid, {"bob@foreign.test": "deferred"}, timeout=90)
    assert _has_status(r, qid, "bob@foreign.test", "4.4.3"), (states(r, qid), delivery_events(r, qid))
    assert any(q.rcode == "DROPPED" for q in dns.queries_for("foreign.test"))
    assert peer.connections == 0


def test_when_no_mx_accepts_a_connection_the_recipient_is_deferred_with_4_4_1(relays, dns, peers):
    dns.route("foreign.test", SPARE, SPARE2)  # nothing listens on either
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, ["bob@foreign.test"], "allrefused")
    wait_state(r, qid, {"bob@foreign.test": "deferred"})
    assert _has_status(r, qid, "bob@foreign.test", "4.4.1"), (states(r, qid), delivery_events(r, qid))


def test_when_every_mx_answers_4xx_at_greeting_the_recipient_is_deferred_with_that_reply(relays, dns, peers):
    busy = peers.greeter(FOREIGN, "421 4.3.2 too busy, try later")
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, ["bob@foreign.test"], "allbusy")
    wait_state(r, qid, {"bob@foreign.test": "deferred"})
    assert busy.connections >= 1
    assert _has_status(r, qid, "bob@foreign.test", "4.3.2"), (states(r, qid), delivery_events(r, qid))


# ---------------------------------------------------------------------------------------------------------
# Outcomes per recipient, retries


def test_each_recipient_gets_its_own_outcome_from_one_transaction(relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN)
    peer.on_rcpt("gone@foreign.test", "550 5.1.1 <gone@foreign.test>: Recipient address rejected: User unknown")
    peer.on_rcpt("full@foreign.test", "452 4.2.2 <full@foreign.test>: Mailbox full")
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    rcpts = ["ok@foreign.test", "gone@foreign.test", "full@foreign.test"]
    qid, marker, _ = send(r, rcpts, "mixed")
    s = wait_state(r, qid, {"ok@foreign.test": "delivered", "gone@foreign.test": "bounced",
                            "full@foreign.test": "deferred"})
    assert "550 5.1.1" in (s["gone@foreign.test"]["last_reply"] or ""), s
    assert "452" in (s["full@foreign.test"]["last_reply"] or ""), s
    [t] = peer.with_marker(marker)
    assert t.rcpt_tos == ["ok@foreign.test"], t.rcpt_tos
    assert len(peer.transactions) == 1 and peer.connections == 1, "all three recipients in one transaction"
    # the bounce (and only the bounce) is reported to the sender
    [d] = wait_dsn(mailbox, marker)
    assert parse_dsn(d.data).final_recipients == ["gone@foreign.test"]
    assert get_message(r, qid) is not None, "a deferred recipient keeps the message queued"


@pytest.mark.parametrize("reply", ["451 4.3.0 try again later", "421 4.3.2 closing connection"],
                         ids=["451", "421-and-close"])
def test_a_temporary_failure_is_retried_and_then_delivered_once(relays, dns, peers, reply):
    peer = peers.aio(FOREIGN)
    peer.on_rcpt("bob@foreign.test", reply, times=1)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, delivery={"retry": {"first": "1s", "max": "2s", "factor": 2.0}})
    qid, marker, _ = send(r, ["bob@foreign.test"], "retry")
    wait_gone(r, qid)
    assert peer.rcpt_replies("bob@foreign.test") == [reply, "250 2.1.5 Ok"]
    assert len(peer.with_marker(marker)) == 1
    assert [e["result"] for e in delivery_events(r, qid)] == ["deferred", "delivered"]


@pytest.mark.parametrize("reply,state", [("554 5.6.0 message content rejected", "bounced"),
                                         ("451 4.3.0 queue full, try later", "deferred")], ids=["5xx", "4xx"])
def test_the_data_reply_applies_to_every_accepted_recipient(relays, dns, peers, mailbox, reply, state):
    peer = peers.aio(FOREIGN)
    peer.on_rcpt("gone@foreign.test", "550 5.1.1 user unknown")
    peer.on_data(reply, times=1)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    # one transaction for all three: a sender without a return path (with one, each recipient gets its own)
    dns.route("other.test", MAILBOX)
    qid, marker, _ = send(r, ["one@foreign.test", "two@foreign.test", "gone@foreign.test"], "datareply",
                          sender="a@other.test")
    want = {"one@foreign.test": state, "two@foreign.test": state, "gone@foreign.test": "bounced"}
    if state == "bounced":
        wait_gone(r, qid)
        [t] = wait_dsn(mailbox, marker)
        d = parse_dsn(t.data)
        got = {a: status_field(d.recipient(a)) for a in want}
        assert got == {"one@foreign.test": "5.6.0", "two@foreign.test": "5.6.0", "gone@foreign.test": "5.1.1"}, got
    else:
        s = wait_state(r, qid, want)
        for a in ("one@foreign.test", "two@foreign.test"):
            assert "451" in (s[a]["last_reply"] or ""), s


def test_retry_delays_follow_first_times_factor_up_to_max(relays, dns, peers):
    """delay before attempt n+1 = min(max, first * factor^(n-1)), +-10% jitter: 1h, 2h, 4h, 4h."""
    dns.servfail("foreign.test")
    r = start_outbound(relays, dns, peers, delivery={"retry": {"first": "1h", "max": "4h", "factor": 2.0}})
    now = lambda: datetime.datetime.now(datetime.timezone.utc)  # noqa: E731
    start = now()
    qid, _, _ = send(r, ["bob@foreign.test"], "schedule")
    for n, hours in enumerate([1, 2, 4, 4], start=1):
        if n > 1:
            start = now()
            flush(r, qid)
        e = wait_until(lambda: (s := states(r, qid)) and s["bob@foreign.test"]["attempts"] >= n
                       and s["bob@foreign.test"]["state"] == "deferred" and s["bob@foreign.test"], 30, 0.1)
        assert e and e["attempts"] == n, f"attempt {n}: {states(r, qid)}"
        end = now()
        delay = datetime.timedelta(hours=hours)
        slack = datetime.timedelta(seconds=2)
        next_at = rfc3339(e["next_attempt"])
        assert start + delay * 0.9 - slack <= next_at <= end + delay * 1.1 + slack, (
            f"after attempt {n} the next should be {hours}h (+-10%) away, is {next_at - end}")


def test_a_peer_that_does_not_answer_the_end_of_data_in_time_is_deferred(relays, dns, peers):
    peer = peers.aio(FOREIGN, data_delay=4.0)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, delivery={"timeouts": {"connect": "3s", "command": "30s", "data": "1s"}})
    qid, _, _ = send(r, ["bob@foreign.test"], "stall")
    wait_state(r, qid, {"bob@foreign.test": "deferred"}, timeout=20)
    assert [e["result"] for e in delivery_events(r, qid)] == ["deferred"]
    assert peer.connections == 1


# ---------------------------------------------------------------------------------------------------------
# Queue API


def test_delete_removes_a_deferred_message_without_a_dsn(relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN).servfail("foreign.test")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "delete")
    wait_state(r, qid, {"bob@foreign.test": "deferred"})
    status, body = r.http("DELETE", f"/queue/{qid}")
    assert status == 200, (status, body)
    assert get_message(r, qid) is None
    assert qid not in r.queue_by_id()
    assert r.http("DELETE", f"/queue/{qid}")[0] == 404
    assert r.http("GET", "/queue/0123456789abcdef")[0] == 404
    dns.heal("foreign.test")
    flush(r)
    # a message to the sender's own mailbox after the delete: once it is there, a DSN would have been too
    sentinel, sentinel_marker, _ = send(r, ["postmaster@example.test"], "sentinel")
    wait_gone(r, sentinel)
    assert mailbox.with_marker(sentinel_marker)
    assert not dsn_about(mailbox, marker), "DELETE must not send a DSN"
    assert not peer.with_marker(marker), "a deleted message was delivered"


def test_flushing_one_message_retries_only_its_deferred_recipients(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN).servfail("foreign.test")
    r = start_outbound(relays, dns, peers)
    a, marker_a, _ = send(r, ["a1@foreign.test"], "flush-a")
    b, marker_b, _ = send(r, ["b1@foreign.test"], "flush-b")
    wait_state(r, a, {"a1@foreign.test": "deferred"})
    wait_state(r, b, {"b1@foreign.test": "deferred"})
    dns.heal("foreign.test")
    flush(r, a)
    wait_gone(r, a)
    assert len(peer.with_marker(marker_a)) == 1
    time.sleep(0.5)
    assert states(r, b)["b1@foreign.test"]["state"] == "deferred", states(r, b)
    assert not peer.with_marker(marker_b)


def test_queue_api_lists_per_recipient_status(relays, dns, peers):
    dns.servfail("foreign.test")
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, ["x@foreign.test", "y@foreign.test"], "status")
    wait_state(r, qid, {"x@foreign.test": "deferred", "y@foreign.test": "deferred"})
    status, body = r.http("GET", "/queue")
    doc = json.loads(body)
    assert status == 200 and isinstance(doc.get("total"), int) and doc["total"] >= 1, doc
    [m] = [m for m in doc["messages"] if m["id"] == qid]
    assert m["sender"] == SENDER and sorted(m["recipients"]) == ["x@foreign.test", "y@foreign.test"], m
    assert {"size", "received_at", "listener"} <= set(m), m
    assert m["listener"] == "trusted", m
    for e in m["status"]:
        assert set(e) >= {"recipient", "state", "attempts", "next_attempt", "last_reply"}, e
        assert e["state"] == "deferred" and e["attempts"] >= 1, e


def test_helo_is_used_when_the_peer_refuses_ehlo(relays, dns, peers):
    sink = peers.sink(FOREIGN, args=["-e"])  # -e: no ESMTP, EHLO gets 500
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "helo")
    wait_gone(r, qid)
    got = [m for m in sink.messages() if marker.encode() in m.raw]
    assert len(got) == 1
    assert got[0].message["X-Client-Proto"] == "SMTP" and got[0].message["X-Helo-Args"] == HOSTNAME, got[0].raw[:300]
