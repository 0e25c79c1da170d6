"""The suppression list: 5.1.x hard bounces add the recipient, RCPT to a suppressed address is refused on every
listener, the admin API reads and edits the list, and it survives a restart."""

from __future__ import annotations

import base64
import json

import pytest

from harness.outbound import dsn_about, send, start_outbound, unique, wait_gone, wait_until
from harness.relay import USERS
from harness.smtp import SmtpConn


def suppressions(r) -> list[dict]:
    status, body = r.http("GET", "/suppressions")
    assert status == 200, (status, body[:300])
    doc = json.loads(body)
    assert isinstance(doc.get("suppressions"), list), doc
    return doc["suppressions"]


def entry(r, address: str) -> dict | None:
    for e in suppressions(r):
        if e["address"].lower() == address.lower():
            return e
    return None


def session(r, listener: str, tls_ctx=None) -> SmtpConn:
    """A session on a listener, ready for MAIL: TLS and AUTH done where the listener needs them."""
    host, port = r.listener(listener)
    if listener == "smtps":
        c = SmtpConn(host, port, tls_context=tls_ctx, server_hostname="localhost")
        c.greeting()
    else:
        c = SmtpConn(host, port)
        c.greeting()
        c.ehlo()
        if listener in ("submission", "trusted_tls"):
            c.starttls(tls_ctx)
    c.ehlo()
    if listener in ("submission", "smtps"):
        cred = base64.b64encode(f"\0app\0{USERS['app']['password']}".encode()).decode()
        c.expect(f"AUTH PLAIN {cred}", "235 2.7.0")
    return c


def rcpt_reply(r, address: str, listener: str = "trusted", tls_ctx=None):
    with session(r, listener, tls_ctx) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        reply = c.cmd(f"RCPT TO:<{address}>")
        c.cmd("RSET")
        return reply


def assert_suppressed_reply(reply, address: str) -> None:
    assert reply.starts("550 5.1.1"), reply
    assert address.lower() in reply.last.lower() and "suppressed" in reply.last, reply


def test_a_5_1_1_bounce_suppresses_the_recipient_and_later_rcpt_is_refused(relays, dns, peers, foreign, mailbox):
    addr = f"{unique('gone')}@foreign.test"
    foreign.on_rcpt(addr, f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown")
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, [addr], "suppress")
    wait_gone(r, qid)
    e = wait_until(lambda: entry(r, addr), 10)
    assert e, f"{addr} not in /suppressions: {suppressions(r)}"
    assert e.get("reason") and e.get("added_at"), e
    assert_suppressed_reply(rcpt_reply(r, addr), addr)
    assert_suppressed_reply(rcpt_reply(r, addr.upper()), addr)  # case-insensitive
    assert len(foreign.rcpt_replies(addr)) == 1, "the suppressed address was tried again"


def test_a_domain_that_does_not_exist_bounces_as_invalid_domain_and_suppresses_no_one(relays, dns, peers, mailbox):
    """NXDOMAIN (the relay's own 5.1.2) says the domain cannot receive mail, nothing about the address: the
    sender gets a DSN, the address stays sendable (the domain may exist tomorrow; on a machine without DNS
    every domain looks like this, the sender's own included)."""
    addr = f"{unique('nodomain')}@nowhere.test"
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, [addr], "nxdomain")
    wait_gone(r, qid)
    assert wait_until(lambda: dsn_about(mailbox, marker), 30), "the bounce was not reported"
    assert entry(r, addr) is None, suppressions(r)
    assert rcpt_reply(r, addr).starts("250 2.1.5")
    status, body = r.http_get("/metrics")
    assert status == 200
    line = next(l for l in body.decode().splitlines()
                if l.startswith("herald_bounces_total{") and 'category="invalid-domain"' in l and 'class="hard"' in l)
    assert not line.endswith(" 0"), line


def test_a_policy_bounce_5_7_1_does_not_suppress(relays, dns, peers, foreign, mailbox):
    addr = f"{unique('blocked')}@foreign.test"
    foreign.on_rcpt(addr, "550 5.7.1 Service unavailable; client host blocked")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, [addr], "policy")
    wait_gone(r, qid)
    assert wait_until(lambda: dsn_about(mailbox, marker), 30), "the bounce was not reported"
    assert entry(r, addr) is None, suppressions(r)
    assert rcpt_reply(r, addr).starts("250 2.1.5")


def test_put_adds_and_delete_removes_a_suppression(relays, dns, peers):
    r = start_outbound(relays, dns, peers)
    addr = f"{unique('complainer')}@foreign.test"
    assert rcpt_reply(r, addr).starts("250 2.1.5")
    status, body = r.http("PUT", f"/suppressions/{addr}", {"reason": "complaint"})
    assert status == 200, (status, body)
    e = entry(r, addr)
    assert e and e["reason"] == "complaint" and e.get("added_at"), e
    assert_suppressed_reply(rcpt_reply(r, addr), addr)
    status, body = r.http("DELETE", f"/suppressions/{addr}")
    assert status == 200, (status, body)
    assert entry(r, addr) is None
    assert rcpt_reply(r, addr).starts("250 2.1.5")
    assert r.http("DELETE", f"/suppressions/{addr}")[0] == 404


def test_put_without_a_body_is_accepted(relays, dns, peers):
    r = start_outbound(relays, dns, peers)
    addr = f"{unique('nobody')}@foreign.test"
    status, body = r.http("PUT", f"/suppressions/{addr}")
    assert status == 200, (status, body)
    assert entry(r, addr) is not None


@pytest.mark.parametrize("listener", ["trusted", "inbound", "submission", "smtps", "trusted_tls"])
def test_a_suppressed_address_is_refused_on_every_listener(relays, dns, peers, tls_ctx, listener):
    r = start_outbound(relays, dns, peers)
    addr = "fbl@bounces.example.test"  # a return-path feedback address: the inbound listener takes it too
    assert r.http("PUT", f"/suppressions/{addr}", {"reason": "test"})[0] == 200
    assert_suppressed_reply(rcpt_reply(r, addr, listener, tls_ctx), addr)


def test_suppressions_survive_a_restart(relays, dns, peers, foreign, mailbox):
    bounced = f"{unique('gone')}@foreign.test"
    foreign.on_rcpt(bounced, "550 5.1.1 user unknown")
    r = start_outbound(relays, dns, peers)
    put = f"{unique('put')}@foreign.test"
    assert r.http("PUT", f"/suppressions/{put}", {"reason": "manual"})[0] == 200
    qid, _, _ = send(r, [bounced], "persist")
    wait_gone(r, qid)
    assert wait_until(lambda: entry(r, bounced), 10), suppressions(r)
    assert (r.spool_dir / "suppressions").exists(), f"no {r.spool_dir / 'suppressions'}"
    assert r.stop() == 0
    r.start()
    for addr in (put, bounced):
        assert entry(r, addr) is not None, f"{addr} forgotten across restart: {suppressions(r)}"
        assert_suppressed_reply(rcpt_reply(r, addr), addr)
    assert entry(r, put)["reason"] == "manual"
