"""The suppression list: only a dead address is suppressed (a 5xx invalid-recipient reply, a complaint, a mailbox
full across a streak of messages over a configured span), never a rate, policy, reputation, authentication or
domain verdict nor a 4xx; suppressions expire per their TTL; RCPT to a suppressed address is refused on every
listener; the admin API reads and edits the list and the streaks; entries and streaks survive a restart."""

from __future__ import annotations

import base64
import json
import signal
import time

import pytest

from harness.outbound import dsn_about, send, start_outbound, unique, wait_dsn, wait_gone, wait_until
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


def lookup(r, address: str) -> dict:
    status, body = r.http("GET", f"/suppressions/{address}")
    assert status == 200, (status, body[:300])
    return json.loads(body)


def streaks(r) -> list[dict]:
    status, body = r.http("GET", "/suppressions/streaks")
    assert status == 200, (status, body[:300])
    return json.loads(body)["streaks"]


def with_suppression(section: dict):
    return lambda cfg: cfg.update(suppression=section)


def bounce_one(r, addr: str, tag: str) -> None:
    """One message to addr, until it has left the queue (the peer's reply decides how)."""
    qid, _, _ = send(r, [addr], tag)
    wait_gone(r, qid)


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
    assert e["category"] == "invalid-recipient", e
    assert e["reply"]["code"] == 550 and e["reply"]["enhanced"] == "5.1.1", e
    assert "User unknown" in e["reply"]["text"] and e["reply"]["source"] == "smtp", e
    assert e["expires_at"] and e["expires_at"] > e["added_at"], e  # the default TTL: 365d
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
    assert entry(r, put)["category"] == "manual" and entry(r, bounced)["category"] == "invalid-recipient"


def test_one_full_mailbox_reply_never_suppresses_and_starts_a_streak(relays, dns, peers, foreign, mailbox):
    addr = f"{unique('full')}@foreign.test"
    foreign.on_rcpt(addr, "552 5.2.2 <%s>: Mailbox full" % addr, times=1)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, [addr], "full")
    wait_gone(r, qid)
    wait_dsn(mailbox, marker)
    assert entry(r, addr) is None, suppressions(r)
    s = wait_until(lambda: lookup(r, addr)["streak"], 10)
    assert s and s["replies"] == 1 and s["reply"]["code"] == 552, lookup(r, addr)
    assert s["address"].lower() == addr.lower() and s in streaks(r)
    assert wait_until(lambda: r.metric("herald_suppression_streaks") == 1, 10), r.metric("herald_suppression_streaks")
    assert rcpt_reply(r, addr).starts("250 2.1.5")
    # The next message is delivered: the streak is over.
    bounce_one(r, addr, "delivered")
    assert foreign.delivered_to(addr)
    assert wait_until(lambda: lookup(r, addr)["streak"] is None, 10), lookup(r, addr)
    assert lookup(r, addr)["suppression"] is None
    assert wait_until(lambda: r.metric("herald_suppression_streaks") == 0, 10), r.metric("herald_suppression_streaks")


@pytest.mark.parametrize("reply", [
    "550 5.7.28 Our system has detected an unusual rate of unsolicited mail",  # rate-limited
    "550 5.7.26 This mail has been blocked because the sender is unauthenticated.",  # authentication
    "550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus.",  # reputation
], ids=["rate", "authentication", "reputation"])
def test_sender_side_verdicts_never_suppress(relays, dns, peers, foreign, mailbox, reply):
    addr = f"{unique('sender-side')}@foreign.test"
    foreign.on_rcpt(addr, reply, times=1)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, [addr], "verdict")
    wait_gone(r, qid)
    wait_dsn(mailbox, marker)
    assert lookup(r, addr) == {"address": addr, "suppression": None, "streak": None}
    assert rcpt_reply(r, addr).starts("250 2.1.5")


def test_a_4xx_unknown_user_that_expires_does_not_suppress(relays, dns, peers, foreign, mailbox):
    addr = f"{unique('maybe')}@foreign.test"
    foreign.on_rcpt(addr, "450 4.1.1 <%s>: Recipient address rejected: User unknown in local recipient table" % addr)
    r = start_outbound(relays, dns, peers, delivery={
        "max_age": "2s", "retry": {"first": "1s", "max": "1s", "factor": 2.0}})
    qid, marker, _ = send(r, [addr], "expire")
    wait_gone(r, qid, timeout=40)
    wait_dsn(mailbox, marker)
    assert entry(r, addr) is None, suppressions(r)
    assert rcpt_reply(r, addr).starts("250 2.1.5")


def test_full_mailbox_replies_suppress_once_n_of_them_span_the_configured_time(relays, dns, peers, foreign):
    addr = f"{unique('abandoned')}@foreign.test"
    foreign.on_rcpt(addr, "552 5.2.2 Mailbox full")  # every time
    r = start_outbound(relays, dns, peers, config=with_suppression(
        {"mailbox_full": {"replies": 3, "over": "1s"}, "ttl": {"mailbox_full": "30d"}}))
    sent = 0
    while entry(r, addr) is None and sent < 10:
        bounce_one(r, addr, f"full{sent}")
        sent += 1

        def settled():
            # The list is written just after the message leaves the queue: wait for this failure's effect.
            now = lookup(r, addr)
            counted = now["streak"] is not None and now["streak"]["replies"] == sent
            return now if now["suppression"] is not None or counted else None

        now = wait_until(settled, 10)
        assert now, f"after {sent} full-mailbox bounces: {lookup(r, addr)}"
        if now["suppression"] is None and sent >= 3:
            time.sleep(0.5)  # the count is reached, the span (1 s) not yet
    e = entry(r, addr)
    assert e, f"not suppressed after {sent} full-mailbox bounces: {lookup(r, addr)}"
    assert sent >= 3, f"suppressed after {sent} full-mailbox bounces, fewer than replies: 3"
    assert e["reason"].startswith(f"mailbox full {sent} times since "), e
    assert e["category"] == "mailbox-full" and e["reply"]["code"] == 552, e
    assert e["expires_at"], e
    assert lookup(r, addr)["streak"] is None
    assert_suppressed_reply(rcpt_reply(r, addr), addr)
    assert len(foreign.rcpt_replies(addr)) == sent


def test_a_suppression_lifts_when_its_ttl_passes(relays, dns, peers, foreign):
    gone = f"{unique('gone')}@foreign.test"
    foreign.on_rcpt(gone, "550 5.1.1 user unknown", times=1)
    r = start_outbound(relays, dns, peers, config=with_suppression({"ttl": {"invalid_recipient": "3s"}}))
    bounce_one(r, gone, "ttl")
    e = wait_until(lambda: entry(r, gone), 10)
    assert e and e["category"] == "invalid-recipient" and e["expires_at"], e
    assert_suppressed_reply(rcpt_reply(r, gone), gone)
    # A manual entry with a TTL of its own.
    brief = f"{unique('brief')}@foreign.test"
    status, body = r.http("PUT", f"/suppressions/{brief}", {"reason": "for a moment", "ttl": "2s"})
    assert status == 200, (status, body)
    assert json.loads(body)["entry"]["expires_at"], body
    assert_suppressed_reply(rcpt_reply(r, brief), brief)
    for addr in (gone, brief):
        assert wait_until(lambda: rcpt_reply(r, addr).starts("250 2.1.5"), 15, step=0.2), rcpt_reply(r, addr)
        assert entry(r, addr) is None, suppressions(r)
    # Sent to again, it is delivered.
    bounce_one(r, gone, "after-ttl")
    assert foreign.delivered_to(gone)


def test_a_manual_suppression_never_expires_unless_given_a_ttl_and_a_bad_ttl_is_refused(relays, dns, peers):
    r = start_outbound(relays, dns, peers)
    addr = f"{unique('manual')}@foreign.test"
    status, body = r.http("PUT", f"/suppressions/{addr}", {"reason": "asked to stop"})
    assert status == 200, (status, body)
    e = entry(r, addr)
    assert e["category"] == "manual" and e["expires_at"] is None and e["reply"]["source"] == "admin", e
    status, body = r.http("PUT", f"/suppressions/{addr}", {"ttl": "soon"})
    assert status == 400 and b"ttl" in body, (status, body)
    # An export restored keeps its expiry.
    status, body = r.http("PUT", f"/suppressions/{addr}", {"reason": "restored", "expires_at": "2999-01-02T03:04:05Z"})
    assert status == 200, (status, body)
    assert entry(r, addr)["expires_at"].startswith("2999-01-02T03:04:05"), entry(r, addr)
    status, body = r.http("PUT", f"/suppressions/{addr}", {"ttl": "1d", "expires_at": "2999-01-02T03:04:05Z"})
    assert status == 400 and b"not both" in body, (status, body)


def test_streaks_and_old_format_entries_survive_a_restart(relays, dns, peers, foreign):
    full = f"{unique('full')}@foreign.test"
    foreign.on_rcpt(full, "552 5.2.2 Mailbox full", times=1)
    r = start_outbound(relays, dns, peers)
    bounce_one(r, full, "streak")
    assert wait_until(lambda: lookup(r, full)["streak"], 10), lookup(r, full)
    assert r.stop() == 0
    # An entry as a relay before this version wrote it: no category, reply or expiry.
    old = f"{unique('old')}@foreign.test"
    with open(r.spool_dir / "suppressions", "a") as f:
        f.write(json.dumps({"op": "add", "address": old, "reason": "550 5.1.1 no such user",
                            "added_at": "2025-01-02T03:04:05.123456789+00:00"}) + "\n")
    r.start()
    s = lookup(r, full)["streak"]
    assert s and s["replies"] == 1, lookup(r, full)
    e = entry(r, old)
    assert e and e["reason"] == "550 5.1.1 no such user" and e["expires_at"] is None, e
    assert_suppressed_reply(rcpt_reply(r, old), old)


def test_a_reloaded_suppression_policy_applies_to_the_next_failure(relays, dns, peers, foreign):
    """With `mailbox_full.replies: 0` a full mailbox never suppresses (and starts no streak); after SIGHUP with
    `replies: 2, over: 0s`, two more full replies do."""
    addr = f"{unique('reload')}@foreign.test"
    foreign.on_rcpt(addr, "552 5.2.2 Mailbox full")  # every time
    r = start_outbound(relays, dns, peers, config=with_suppression({"mailbox_full": {"replies": 0}}))
    for i in range(2):
        bounce_one(r, addr, f"off{i}")
    assert lookup(r, addr) == {"address": addr, "suppression": None, "streak": None}
    before = r.log_text().count("config reloaded")
    r.config["suppression"] = {"mailbox_full": {"replies": 2, "over": "0s"}}
    r.write_config()
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: r.log_text().count("config reloaded") > before, 15), r.log_tail(30)
    bounce_one(r, addr, "on0")
    assert wait_until(lambda: lookup(r, addr)["streak"], 10), lookup(r, addr)
    bounce_one(r, addr, "on1")
    e = wait_until(lambda: entry(r, addr), 10)
    assert e and e["category"] == "mailbox-full", lookup(r, addr)
