"""Open-relay battery: nobody who is neither trusted nor authenticated gets mail relayed anywhere.

On the inbound listener (auth none, no allow_networks) only the configured return_path domains
(bounces.example.test) are accepted. The recipient forms below are the classic relay-test battery: source
routes, percent hack, bang paths, quoted local parts, address literals, case and suffix tricks.
"""

from __future__ import annotations

import uuid

import pytest

from harness.relay import HOSTNAME, RelayPool, addr, free_port
from harness.smtp import SmtpConn, dot_stuff, make_message

LOCAL = "bounces.example.test"  # the return_path domain of example.test

REFUSED = ("554 5.7.1", "501 5.1.3")

FOREIGN_FORMS = [
    "user@foreign.test",
    "USER@FOREIGN.TEST",
    "user@Foreign.Test",
    "user@example.test",  # a sending domain is not a return_path domain
    "user@other.test",  # a sending domain without return_path
    "user@foreign.test.",
    f"user@{LOCAL}.foreign.test",  # local domain as a prefix
    f"user@evil-{LOCAL}",  # local domain as a string suffix
    f"user@evil{LOCAL}",
    f"user@sub.{LOCAL}",  # not configured
    f"@{LOCAL}:user@foreign.test",  # source route ending abroad
    f"@{LOCAL},@foreign.test:user@foreign.test",
    f"user@foreign.test@{LOCAL}",
    '"user@foreign.test"',
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "foreign.test!user",
    "user%foreign.test",
]

# Routing tricks dressed up with the local domain. A relay that implements the percent hack, bang paths or
# quoted '@' would send these abroad; they must be refused outright.
LOCAL_TRICK_FORMS = [
    f"user%foreign.test@{LOCAL}",
    f"USER%FOREIGN.TEST@{LOCAL.upper()}",
    f'"user@foreign.test"@{LOCAL}',
    f"foreign.test!user@{LOCAL}",
    f'"user%foreign.test"@{LOCAL}',
]


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def session(relay, listener) -> SmtpConn:
    host, port = relay.listener(listener)
    c = SmtpConn(host, port)
    c.greeting()
    c.ehlo()
    return c


def try_relay(relay, listener: str, rcpt_arg: str, sender: str = "attacker@foreign.test") -> tuple[str, str]:
    """MAIL, RCPT TO:<rcpt_arg>, DATA (and the message if 354 came). Returns (RCPT reply, DATA reply)."""
    with session(relay, listener) as c:
        c.expect(f"MAIL FROM:<{sender}>", "250 2.1.0")
        rcpt = c.cmd(f"RCPT TO:{rcpt_arg}")
        data = c.cmd("DATA")
        if data.code == 354:
            c.send(dot_stuff(make_message(unique("relaytest"), to="victim@foreign.test")) + b".\r\n")
            data = c.read_reply()
        c.cmd("QUIT")
    return rcpt.last, data.last


@pytest.mark.parametrize("form", FOREIGN_FORMS)
def test_inbound_listener_refuses_foreign_recipient_forms(relay, form):
    before = set(relay.queue_by_id())
    rcpt, data = try_relay(relay, "inbound", f"<{form}>")
    assert rcpt.startswith(REFUSED), f"RCPT TO:<{form}> on inbound: {rcpt}"
    assert not data.startswith("250"), f"DATA after refused RCPT: {data}"
    assert relay.new_messages(before) == {}


@pytest.mark.parametrize("form", LOCAL_TRICK_FORMS)
def test_inbound_listener_refuses_routing_tricks_at_the_local_domain(relay, form):
    before = set(relay.queue_by_id())
    rcpt, data = try_relay(relay, "inbound", f"<{form}>")
    assert rcpt.startswith(REFUSED), f"RCPT TO:<{form}> on inbound: {rcpt}"
    assert relay.new_messages(before) == {}


@pytest.mark.parametrize("arg", ["user@foreign.test", " <user@foreign.test>", "<user@foreign.test> NOTIFY=NEVER"])
def test_inbound_listener_refuses_foreign_recipients_in_odd_syntax(relay, arg):
    before = set(relay.queue_by_id())
    rcpt, _ = try_relay(relay, "inbound", arg)
    assert rcpt.startswith(REFUSED + ("501 5.5.4", "555 5.5.4")), f"RCPT TO:{arg}: {rcpt}"
    assert relay.new_messages(before) == {}


@pytest.mark.parametrize("sender", ["", "someone@foreign.test", "postmaster@example.test"])
def test_inbound_listener_takes_reports_for_the_return_path_domain_and_queues_nothing(relay, sender):
    """The relay is the return-path domain's MX: its feedback mailboxes take mail from anyone, and what
    arrives there is read as a report at acceptance, never queued or relayed."""
    before = set(relay.queue_by_id())
    with session(relay, "inbound") as c:
        c.expect(f"MAIL FROM:<{sender}>", "250 2.1.0")
        c.expect(f"RCPT TO:<fbl@{LOCAL}>", "250 2.1.5")
        r = c.data(make_message(unique("dsn"), sender="mailer-daemon@foreign.test", to=f"fbl@{LOCAL}"))
        assert r.starts("250 2.0.0") and "report" in r.last, r
    assert relay.new_messages(before) == {}


def test_inbound_listener_matches_the_return_path_domain_without_regard_to_case(relay):
    with session(relay, "inbound") as c:
        c.expect("MAIL FROM:<>", "250 2.1.0")
        c.expect("RCPT TO:<PostMaster@Bounces.Example.TEST>", "250 2.1.5")


def test_a_return_path_domain_has_no_mailboxes_but_its_feedback_addresses_and_tokens(relay):
    with session(relay, "inbound") as c:
        c.expect("MAIL FROM:<>", "250 2.1.0")
        for guess in ("bounce-1", "info", "b+0123", "b+0123456789abcdef-0123456789-victim=foreign.test"):
            c.expect(f"RCPT TO:<{guess}@{LOCAL}>", "550 5.1.1")


def test_inbound_listener_refused_recipient_does_not_spoil_an_accepted_one(relay):
    before = set(relay.queue_by_id())
    with session(relay, "inbound") as c:
        c.expect("MAIL FROM:<>", "250 2.1.0")
        c.expect("RCPT TO:<victim@foreign.test>", "554 5.7.1")
        c.expect(f"RCPT TO:<abuse@{LOCAL}>", "250 2.1.5")
        r = c.data(make_message(unique("mixed"), to=f"abuse@{LOCAL}"))
        assert r.code == 250, r
    assert relay.new_messages(before) == {}


@pytest.mark.parametrize("form", ["user@foreign.test", f"user%foreign.test@{LOCAL}", f"@{LOCAL}:user@foreign.test"])
def test_submission_without_auth_relays_nothing(relay, tls_ctx, form):
    """In clear and inside TLS: no AUTH, no transaction (530 at MAIL), so nothing is queued."""
    before = set(relay.queue_by_id())
    host, port = relay.listener("submission")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "530 5.7.0")
        r = c.cmd(f"RCPT TO:<{form}>")
        assert r.code >= 500, r
        c.starttls(tls_ctx)
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "530 5.7.0")
        r = c.cmd(f"RCPT TO:<{form}>")
        assert r.code >= 500, r
        assert c.cmd("DATA").code >= 500
    assert relay.new_messages(before) == {}


def test_trusted_listener_relays_anywhere(relay):
    """The control: the same foreign recipient is accepted where the client is trusted."""
    before = set(relay.queue_by_id())
    with session(relay, "trusted") as c:
        r = c.transaction("attacker@foreign.test", ["user@foreign.test"], make_message(unique("trusted")))
        assert r.queue_id, r
    assert r.queue_id in relay.new_messages(before)


def test_the_inbound_listener_takes_mail_for_a_bare_postmaster_and_its_own_postmaster_and_nobody_else(relay):
    """RFC 5321 section 4.5.1: every SMTP server takes `RCPT TO:<Postmaster>` without a domain. It is the
    relay's own postmaster (postmaster@<hostname>), read like the return-path domains' postmaster: as a
    report, never queued. Other bare names are not addresses, and the relay's name has no other mailbox."""
    before = set(relay.queue_by_id())
    with session(relay, "inbound") as c:
        c.expect("MAIL FROM:<mailer-daemon@foreign.test>", "250 2.1.0")
        c.expect("RCPT TO:<abuse>", "501 5.1.3")
        c.expect(f"RCPT TO:<abuse@{HOSTNAME}>", "554 5.7.1")
        c.expect("RCPT TO:<Postmaster>", "250 2.1.5")
        c.expect(f"RCPT TO:<POSTMASTER@{HOSTNAME.upper()}>", "250 2.1.5")
        r = c.data(make_message(unique("bare"), sender="mailer-daemon@foreign.test", to="postmaster"))
        assert r.starts("250 2.0.0") and "report" in r.last, r
    assert relay.new_messages(before) == {}


def test_the_inbound_listener_as_the_operator_renders_it_offers_starttls_never_auth_and_relays_nothing(
        tmp_path_factory, relay_binary, certs, users, tls_ctx):
    """What spec.inboundService makes (operator/src/inbound.rs): a listener on port 25's shape, STARTTLS
    because the relay has a certificate, no auth, no networks. Bounces come from anyone: before and inside
    TLS it advertises and takes no AUTH, takes postmaster, abuse and fbl at the return-path domain (read as
    reports, never queued) and refuses every other domain as relaying with 554 5.7.1."""
    pool = RelayPool(tmp_path_factory.mktemp("inbound"), certs, users)
    try:
        cfg = pool.config("inbound")
        cfg["listeners"] = [{"name": "inbound", "address": addr("127.0.0.1", free_port()), "tls": "starttls"}]
        relay = pool.start("inbound", config=cfg)
        before = set(relay.queue_by_id())
        host, port = relay.listener("inbound")
        with SmtpConn(host, port) as c:
            c.greeting()
            offered = [l.split()[0].upper() for l in c.ehlo().lines]
            assert "STARTTLS" in offered and "AUTH" not in offered, offered
            assert c.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=").code >= 500
            c.starttls(tls_ctx)
            offered = [l.split()[0].upper() for l in c.ehlo().lines]
            assert "AUTH" not in offered, offered
            assert c.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=").code >= 500
            c.expect("MAIL FROM:<mailer-daemon@foreign.test>", "250 2.1.0")
            c.expect("RCPT TO:<victim@foreign.test>", "554 5.7.1")
            c.expect(f"RCPT TO:<user%foreign.test@{LOCAL}>", "554 5.7.1")
            c.expect(f"RCPT TO:<nobody@{LOCAL}>", "550 5.1.1")
            for mailbox in ("postmaster", "Abuse", "fbl"):
                c.expect(f"RCPT TO:<{mailbox}@{LOCAL}>", "250 2.1.5")
            r = c.data(make_message(unique("bounce"), sender="mailer-daemon@foreign.test", to=f"postmaster@{LOCAL}"))
            assert r.starts("250 2.0.0") and "report" in r.last, r
        assert relay.new_messages(before) == {}
    finally:
        pool.stop_all()
