"""Bounces and expiry produce delivery status notifications (RFC 3464) to the envelope sender.

A DSN goes through the relay's own queue like any message: with MAIL FROM:<> to the original envelope sender,
whose domain (example.test) has the "mailbox" peer as MX. DSNs are parsed with Python's email package.
"""

from __future__ import annotations

import email.utils
import time

from harness.outbound import (
    MAILBOX, SENDER, delivery_events, dsn_about, dsns, flush, get_message, parse_dsn, send, start_outbound, status_field, unique,
    wait_dsn, wait_event, wait_gone, wait_state, wait_until,
)
from harness.relay import HOSTNAME
from harness.smtp import SmtpConn


def field_value(block, name: str) -> str:
    """A DSN field with its type prefix normalised: 'dns; relay.example.test' -> 'dns;relay.example.test'."""
    v = " ".join((block.get(name) or "").split())
    return v.replace("; ", ";")


def test_a_hard_bounce_returns_an_rfc3464_report_to_the_envelope_sender(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("gone@foreign.test", "550 5.1.1 <gone@foreign.test>: Recipient address rejected: User unknown")
    r = start_outbound(relays, dns, peers)
    body_marker = unique("bodyonly")
    qid, marker, _ = send(r, ["gone@foreign.test"], "bounce", body=f"{body_marker}\r\n")
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)

    assert t.mail_from == "", "a DSN is sent with the null reverse path"
    assert t.rcpt_tos == [SENDER], t.rcpt_tos
    m = t.message
    assert email.utils.parseaddr(m["From"])[1].lower() == f"mailer-daemon@{HOSTNAME}", m["From"]
    assert m["Subject"] == "Undelivered Mail Returned to Sender", m["Subject"]

    d = parse_dsn(t.data)
    assert field_value(d.per_message, "Reporting-MTA") == f"dns;{HOSTNAME}", str(d.per_message)
    assert d.final_recipients == ["gone@foreign.test"]
    rb = d.recipient("gone@foreign.test")
    assert field_value(rb, "Final-Recipient").lower() == "rfc822;gone@foreign.test", str(rb)
    assert (rb["Action"] or "").strip().lower() == "failed", str(rb)
    assert status_field(rb) == "5.1.1", str(rb)
    assert "mx1.foreign.test" in (rb["Remote-MTA"] or "") and field_value(rb, "Remote-MTA").startswith("dns;"), str(rb)
    diag = field_value(rb, "Diagnostic-Code")
    assert diag.startswith("smtp;") and "550 5.1.1" in diag and "User unknown" in diag, str(rb)

    assert marker in d.headers, "the original headers are returned"
    assert body_marker not in d.headers, "text/rfc822-headers returns headers only"
    assert d.explanation.strip(), "the text/plain part explains"
    assert wait_event(r, qid, "bounced")


def test_recipients_that_fail_in_one_attempt_share_one_dsn(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("gone@foreign.test", "550 5.1.1 user unknown")
    foreign.on_rcpt("blocked@foreign.test", "550 5.7.1 rejected by policy")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["ok@foreign.test", "gone@foreign.test", "blocked@foreign.test"], "shared")
    wait_gone(r, qid)
    wait_dsn(mailbox, marker)
    time.sleep(1.0)  # room for a (wrong) second DSN to arrive
    [t] = dsn_about(mailbox, marker)
    d = parse_dsn(t.data)
    assert d.final_recipients == ["blocked@foreign.test", "gone@foreign.test"]
    assert status_field(d.recipient("gone@foreign.test")) == "5.1.1"
    assert status_field(d.recipient("blocked@foreign.test")) == "5.7.1"
    assert len(foreign.with_marker(marker)) == 1


def test_recipients_that_fail_in_different_attempts_get_one_dsn_each(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("first@foreign.test", "550 5.1.1 user unknown")
    foreign.on_rcpt("second@foreign.test", "451 4.3.0 later", times=1)
    foreign.on_rcpt("second@foreign.test", "550 5.2.1 mailbox disabled")
    r = start_outbound(relays, dns, peers, delivery={"retry": {"first": "1s", "max": "2s", "factor": 2.0}})
    qid, marker, _ = send(r, ["first@foreign.test", "second@foreign.test"], "twoattempts")
    wait_gone(r, qid)
    got = wait_until(lambda: len(dsn_about(mailbox, marker)) >= 2 and dsn_about(mailbox, marker), 30, 0.1)
    assert got, f"DSNs about {marker}: {len(dsn_about(mailbox, marker))}"
    time.sleep(0.5)
    assert sorted(parse_dsn(t.data).final_recipients[0] for t in dsn_about(mailbox, marker)) == [
        "first@foreign.test", "second@foreign.test"]
    assert all(len(parse_dsn(t.data).per_recipient) == 1 for t in dsn_about(mailbox, marker))


def test_a_bounce_of_a_null_sender_message_produces_no_dsn(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("gone@foreign.test", "550 5.1.1 user unknown")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["gone@foreign.test"], "nullsender", sender="")
    wait_event(r, qid, "bounced")
    wait_gone(r, qid)
    # a bounce with a real sender afterwards: once its DSN is in, a DSN for the first would have been too
    foreign.on_rcpt("gone2@foreign.test", "550 5.1.1 user unknown")  # gone@ is suppressed by now
    qid2, marker2, _ = send(r, ["gone2@foreign.test"], "sentinel")
    wait_dsn(mailbox, marker2)
    everything = [t for p in (foreign, mailbox) for t in p.transactions]
    assert not [t for t in everything if marker.encode() in t.data and t.mail_from == ""], "a DSN about a DSN"
    assert not [m for m in r.queue() if m["sender"] == "" and marker in str(m)], r.queue()
    assert len(dsns(mailbox)) == 1, [t.rcpt_tos for t in dsns(mailbox)]


def test_an_expired_recipient_bounces_with_4_4_7(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("slow@foreign.test", "451 4.3.0 try again later")  # every time
    r = start_outbound(relays, dns, peers, delivery={
        "max_age": "3s", "retry": {"first": "1s", "max": "1s", "factor": 2.0}})
    qid, marker, _ = send(r, ["slow@foreign.test"], "expire")
    wait_gone(r, qid, timeout=40)
    [t] = wait_dsn(mailbox, marker)
    rb = parse_dsn(t.data).recipient("slow@foreign.test")
    assert (rb["Action"] or "").strip().lower() == "failed", str(rb)
    assert status_field(rb) == "4.4.7", str(rb)
    assert len(foreign.rcpt_replies("slow@foreign.test")) >= 1
    assert not foreign.with_marker(marker)
    results = [e["result"] for e in delivery_events(r, qid)]
    assert results[0] == "deferred" and results[-1] == "expired", f"delivery log results for {qid}: {results}"


def test_a_message_from_a_return_path_address_bounces_without_a_dsn(relays, dns, peers, foreign, mailbox):
    """A DSN to our own return-path domain would come straight back as a report about itself: none is made,
    even though the test DNS gives that domain a live MX."""
    dns.route("bounces.example.test", MAILBOX)
    foreign.on_rcpt("gone@foreign.test", "550 5.1.1 user unknown")
    r = start_outbound(relays, dns, peers)
    bounce_addr = "fbl@bounces.example.test"
    qid, marker, _ = send(r, ["gone@foreign.test"], "rpdsn", sender=bounce_addr)
    wait_gone(r, qid)
    assert wait_until(lambda: "from a return-path address: no DSN" in r.log_text(), 10), r.log_tail(30)
    assert not [m for m in r.queue() if m["sender"] == ""], r.queue()
    assert not dsns(mailbox), "a DSN to a return_path address was sent by MX"

# ---------------------------------------------------------------------------------------------------------
# The DSN extension (RFC 3461): the sender's RET, ENVID, NOTIFY and ORCPT.

DSN_PEER = "127.0.0.4"  # dsnpeer.test's MX: an aiosmtpd peer that advertises DSN


def dsn_peer(dns, peers):
    dns.route("dsnpeer.test", DSN_PEER)
    return peers.aio(DSN_PEER, "dsnpeer", dsn=True)


def sentinel_dsn(r, foreign, mailbox) -> None:
    """Bounce a fresh message with a real sender and wait for its DSN: a DSN the relay made before would be in
    by then too (DSNs queue in order, to the one mailbox)."""
    foreign.on_rcpt("sentinel@foreign.test", "550 5.1.1 user unknown")
    _, marker, _ = send(r, ["sentinel@foreign.test"], "sentinel")
    wait_dsn(mailbox, marker)


def test_ehlo_advertises_dsn_and_a_bad_parameter_is_refused_naming_it(relays, dns, peers):
    r = start_outbound(relays, dns, peers)
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        ehlo = c.ehlo()
        assert "DSN" in [line.split()[0].upper() for line in ehlo.lines[1:]], ehlo.lines
        for params, names in [("RET=BODY", "RET"), ("ENVID=a=b", "ENVID"), ("RET=FULL RET=HDRS", "RET")]:
            reply = c.expect(f"MAIL FROM:<{SENDER}> {params}", "501 5.5.4")
            assert names in str(reply), reply
        c.expect(f"MAIL FROM:<{SENDER}> RET=HDRS ENVID=QQ+2B1", "250 ")
        for params, names in [("NOTIFY=NEVER,SUCCESS", "NOTIFY"), ("NOTIFY=SUCCESS,SUCCESS", "NOTIFY"),
                              ("ORCPT=x@foreign.test", "ORCPT"), ("NOTIFY=DELAY NOTIFY=DELAY", "NOTIFY")]:
            reply = c.expect(f"RCPT TO:<x@foreign.test> {params}", "501 5.5.4")
            assert names in str(reply), reply
        c.expect("RCPT TO:<x@foreign.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@foreign.test", "250 ")
        c.cmd("QUIT")


def test_notify_never_gets_no_dsn_for_a_bounce(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("gone@foreign.test", "550 5.1.1 user unknown")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["gone@foreign.test"], "never", rcpt_params={"gone@foreign.test": "NOTIFY=NEVER"})
    wait_event(r, qid, "bounced")
    wait_gone(r, qid)
    assert wait_until(lambda: "asked for no failure notice" in r.log_text(), 10), r.log_tail(30)
    sentinel_dsn(r, foreign, mailbox)
    assert not dsn_about(mailbox, marker), "a DSN for a recipient with NOTIFY=NEVER"


def test_notify_success_to_a_peer_without_dsn_gets_a_relayed_dsn(relays, dns, peers, foreign, mailbox):
    r = start_outbound(relays, dns, peers)
    envid = unique("env")
    qid, marker, _ = send(r, ["ok@foreign.test"], "relayed", mail_params=f"ENVID={envid} RET=FULL",
                          body="secret body\r\n",
                          rcpt_params={"ok@foreign.test": "NOTIFY=SUCCESS ORCPT=rfc822;Orig+2Bok@foreign.test"})
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)
    assert t.mail_from == "" and t.rcpt_tos == [SENDER]
    assert t.message["Subject"] == "Successful Mail Delivery Report", t.message["Subject"]
    d = parse_dsn(t.data)
    assert field_value(d.per_message, "Original-Envelope-Id") == envid, str(d.per_message)
    rb = d.recipient("ok@foreign.test")
    assert (rb["Action"] or "").strip().lower() == "relayed", str(rb)
    assert status_field(rb).startswith("2."), str(rb)
    assert field_value(rb, "Original-Recipient") == "rfc822;Orig+ok@foreign.test", str(rb)
    # A success returns the headers only, RET=FULL or not.
    assert d.returned_type == "text/rfc822-headers" and "secret body" not in d.headers
    # The peer does not advertise DSN: the parameters were not passed on.
    [delivered] = foreign.with_marker(marker)
    assert not [o for o in delivered.mail_options if o.split("=")[0] in ("RET", "ENVID")], delivered.mail_options


def test_a_peer_that_advertises_dsn_gets_the_parameters_and_the_relay_sends_none(relays, dns, peers, foreign,
                                                                                  mailbox):
    peer = dsn_peer(dns, peers)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["ok@dsnpeer.test"], "passed", mail_params="RET=HDRS ENVID=Batch+2B7",
                          rcpt_params={"ok@dsnpeer.test": "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig@dsnpeer.test"})
    wait_gone(r, qid)
    assert peer.with_marker(marker)
    assert peer.dsn_params == [
        ("MAIL", ["RET=HDRS", "ENVID=Batch+2B7"]),
        ("RCPT", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Orig@dsnpeer.test"]),
    ], peer.dsn_params
    sentinel_dsn(r, foreign, mailbox)
    assert not dsn_about(mailbox, marker), "the relay reported a success the next hop was asked to report"


def test_ret_hdrs_returns_headers_and_ret_full_the_message(relays, dns, peers, foreign, mailbox):
    r = start_outbound(relays, dns, peers)
    for ret, returned in [("HDRS", "text/rfc822-headers"), ("FULL", "message/rfc822")]:
        # One recipient each: the first bounce suppresses its address.
        rcpt = f"gone-{ret.lower()}@foreign.test"
        foreign.on_rcpt(rcpt, "550 5.1.1 user unknown")
        body_marker = unique("bodyonly")
        qid, marker, _ = send(r, [rcpt], f"ret{ret}", mail_params=f"RET={ret}", body=f"{body_marker}\r\n")
        wait_gone(r, qid)
        [t] = wait_dsn(mailbox, marker)
        d = parse_dsn(t.data)
        assert d.returned_type == returned, (ret, d.returned_type)
        assert marker in d.headers
        assert (body_marker in d.headers) == (ret == "FULL"), (ret, d.headers)


def test_dsn_parameters_survive_a_restart_before_delivery(relays, dns, peers):
    peer = dsn_peer(dns, peers)
    peer.on_rcpt("later@dsnpeer.test", "451 4.3.0 try again later", times=1)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["later@dsnpeer.test"], "restart", mail_params="ENVID=kept+2B1",
                          rcpt_params={"later@dsnpeer.test": "NOTIFY=FAILURE ORCPT=rfc822;kept@dsnpeer.test"})
    wait_state(r, qid, {"later@dsnpeer.test": "deferred"})
    assert r.stop() == 0
    r.start()
    flush(r, qid)
    wait_gone(r, qid)
    assert peer.with_marker(marker)
    mails = [p for verb, p in peer.dsn_params if verb == "MAIL"]
    rcpts = [p for verb, p in peer.dsn_params if verb == "RCPT"]
    assert mails[-1] == ["ENVID=kept+2B1"], peer.dsn_params
    assert rcpts[-1] == ["NOTIFY=FAILURE", "ORCPT=rfc822;kept@dsnpeer.test"], peer.dsn_params


def test_notify_delay_gets_one_delayed_dsn_past_delay_warning(relays, dns, peers, foreign, mailbox):
    foreign.on_rcpt("slow@foreign.test", "451 4.3.0 try again later")  # every time
    foreign.on_rcpt("quiet@foreign.test", "451 4.3.0 try again later")
    r = start_outbound(relays, dns, peers, delivery={
        "delay_warning": "2s", "retry": {"first": "1s", "max": "1s", "factor": 2.0}})
    qid, marker, _ = send(r, ["slow@foreign.test", "quiet@foreign.test"], "delay", rcpt_params={
        "slow@foreign.test": "NOTIFY=DELAY,FAILURE ORCPT=rfc822;slow@foreign.test",
        "quiet@foreign.test": "NOTIFY=FAILURE"})
    [t] = wait_dsn(mailbox, marker)
    assert t.message["Subject"] == "Delayed Mail (still being retried)", t.message["Subject"]
    d = parse_dsn(t.data)
    assert d.final_recipients == ["slow@foreign.test"], "only the recipient that asked hears of a delay"
    rb = d.recipient("slow@foreign.test")
    assert (rb["Action"] or "").strip().lower() == "delayed", str(rb)
    assert status_field(rb) == "4.3.0", str(rb)
    assert rb["Will-Retry-Until"], str(rb)
    # Tried on, and the notice is not repeated: a few more attempts go by without another.
    attempts = len(foreign.rcpt_replies("slow@foreign.test"))
    assert wait_until(lambda: len(foreign.rcpt_replies("slow@foreign.test")) >= attempts + 2, 20, 0.1)
    assert len(dsn_about(mailbox, marker)) == 1, [t.message["Subject"] for t in dsn_about(mailbox, marker)]
    assert get_message(r, qid) is not None
