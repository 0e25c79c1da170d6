"""The submission listeners (auth: required): AUTH, its ordering with TLS, and who may send as which domain."""

from __future__ import annotations

import base64
import collections
import re
import threading
import uuid

import pytest

from harness.outbound import wait_until
from harness.prometheus import scrape
from harness.relay import USERS, header_region
from harness.smtp import SmtpConn, make_message

APP_PW = USERS["app"]["password"]
OPS_PW = USERS["ops"]["password"]


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def plain(user: str, pw: str) -> str:
    return b64(f"\0{user}\0{pw}")


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def plaintext_session(relay, listener="submission") -> SmtpConn:
    host, port = relay.listener(listener)
    c = SmtpConn(host, port)
    c.greeting()
    return c


def tls_session(relay, tls_ctx, listener="submission", source: str | None = None) -> SmtpConn:
    """Connected (from `source`, if given), TLS up (STARTTLS or implicit), EHLO done, not authenticated."""
    host, port = relay.listener(listener)
    if listener == "smtps":
        c = SmtpConn(host, port, tls_context=tls_ctx, server_hostname="localhost", source=source)
        c.greeting()
    else:
        c = SmtpConn(host, port, source=source)
        c.greeting()
        c.ehlo()
        c.starttls(tls_ctx)
    c.ehlo()
    return c


def authed_session(relay, tls_ctx, user="app", pw=APP_PW, listener="submission") -> SmtpConn:
    c = tls_session(relay, tls_ctx, listener)
    c.expect(f"AUTH PLAIN {plain(user, pw)}", "235 2.7.0")
    return c


def auth_mechanisms(ehlo) -> set[str]:
    mechs: set[str] = set()
    for k in ehlo.keywords():
        if k.startswith("AUTH ") or k.startswith("AUTH="):
            mechs |= set(re.split(r"[ =]", k)[1:])
    return mechs


# ---------------------------------------------------------------------------------------------------------
# What EHLO offers


def test_ehlo_before_tls_offers_starttls_but_not_auth(relay):
    with plaintext_session(relay) as c:
        r = c.ehlo()
        assert "STARTTLS" in r.keywords(), r
        assert not any(k.startswith("AUTH") for k in r.keywords()), f"AUTH offered in clear: {r}"


def test_ehlo_after_starttls_offers_auth_plain_login_and_no_starttls(relay, tls_ctx):
    host, port = relay.listener("submission")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.starttls(tls_ctx)
        r = c.ehlo()
        assert {"PLAIN", "LOGIN"} <= auth_mechanisms(r), r
        assert "STARTTLS" not in r.keywords(), r


def test_implicit_tls_listener_offers_auth_from_the_start(relay, tls_ctx):
    with tls_session(relay, tls_ctx, "smtps") as c:
        r = c.ehlo()
        assert {"PLAIN", "LOGIN"} <= auth_mechanisms(r), r
        assert "STARTTLS" not in r.keywords(), r


# ---------------------------------------------------------------------------------------------------------
# Ordering: TLS before AUTH, AUTH before MAIL


@pytest.mark.parametrize("command", [f"AUTH PLAIN {plain('app', APP_PW)}", "AUTH PLAIN", "AUTH LOGIN"])
def test_auth_before_starttls_gets_538_5_7_11(relay, command):
    with plaintext_session(relay) as c:
        c.ehlo()
        c.expect(command, "538 5.7.11")


def test_mail_before_auth_gets_530_5_7_0_in_clear(relay):
    with plaintext_session(relay) as c:
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "530 5.7.0")


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_mail_before_auth_gets_530_5_7_0_inside_tls(relay, tls_ctx, listener):
    with tls_session(relay, tls_ctx, listener) as c:
        c.expect("MAIL FROM:<a@example.test>", "530 5.7.0")
        c.expect("RCPT TO:<x@foreign.test>", "5")  # no transaction, no relay
        c.expect("DATA", "5")


def test_unauthenticated_submission_queues_nothing_even_when_the_client_pushes_on(relay, tls_ctx):
    before = set(relay.queue_by_id())
    with tls_session(relay, tls_ctx) as c:
        # pipelined as a careless (or hostile) client would: no 354 may come back
        c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<x@foreign.test>\r\nDATA\r\n")
        replies = [c.read_reply() for _ in range(3)]
        assert replies[0].starts("530 5.7.0"), [str(r) for r in replies]
        assert all(r.code >= 500 for r in replies), [str(r) for r in replies]
    assert relay.new_messages(before) == {}


# ---------------------------------------------------------------------------------------------------------
# Credentials


def test_auth_plain_with_initial_response_succeeds(relay, tls_ctx):
    with tls_session(relay, tls_ctx) as c:
        c.expect(f"AUTH PLAIN {plain('app', APP_PW)}", "235 2.7.0")


def test_auth_plain_after_empty_challenge_succeeds(relay, tls_ctx):
    with tls_session(relay, tls_ctx) as c:
        c.expect("AUTH PLAIN", "334")
        c.expect(plain("app", APP_PW), "235 2.7.0")


def test_auth_login_succeeds(relay, tls_ctx):
    with tls_session(relay, tls_ctx) as c:
        c.expect("AUTH LOGIN", "334")
        c.expect(b64("app"), "334")
        c.expect(b64(APP_PW), "235 2.7.0")


@pytest.mark.parametrize(
    "user, pw",
    [("app", "wrong-password"), ("app", APP_PW + "x"), ("nobody", APP_PW), ("ops", APP_PW), ("app", "")],
)
def test_auth_plain_with_bad_credentials_gets_535_5_7_8(relay, tls_ctx, user, pw):
    with tls_session(relay, tls_ctx) as c:
        c.expect(f"AUTH PLAIN {plain(user, pw)}", "535 5.7.8")
        c.expect("MAIL FROM:<a@example.test>", "530 5.7.0")  # still not authenticated


def test_auth_login_with_bad_password_gets_535_5_7_8(relay, tls_ctx):
    with tls_session(relay, tls_ctx, "smtps") as c:
        c.expect("AUTH LOGIN", "334")
        c.expect(b64("app"), "334")
        c.expect(b64("not-the-password"), "535 5.7.8")


def test_good_credentials_work_after_a_failed_attempt(relay, tls_ctx):
    with tls_session(relay, tls_ctx) as c:
        c.expect(f"AUTH PLAIN {plain('app', 'bad')}", "535 5.7.8")
        c.expect(f"AUTH PLAIN {plain('app', APP_PW)}", "235 2.7.0")


def test_second_auth_after_success_is_a_sequence_error(relay, tls_ctx):
    with authed_session(relay, tls_ctx) as c:
        c.expect(f"AUTH PLAIN {plain('app', APP_PW)}", "503 5.5.1")


# ---------------------------------------------------------------------------------------------------------
# Who may send as which domain


@pytest.mark.parametrize("sender", ["a@example.test", "A.B@Example.Test", ""])
def test_authenticated_user_may_use_its_own_domains_and_the_null_sender(relay, tls_ctx, sender):
    with authed_session(relay, tls_ctx) as c:
        c.expect(f"MAIL FROM:<{sender}>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")  # authenticated: may relay anywhere


@pytest.mark.parametrize(
    "sender",
    [
        "a@other.test",  # another user's domain
        "a@foreign.test",
        "a@notexample.test",  # suffix match
        "a@example.test.evil.test",  # prefix match
        "a@sub.evil-example.test",
    ],
)
def test_authenticated_user_may_not_use_other_domains_in_mail_from(relay, tls_ctx, sender):
    with authed_session(relay, tls_ctx) as c:
        c.expect(f"MAIL FROM:<{sender}>", "550 5.7.1")


def test_each_user_is_held_to_its_own_allowed_domains(relay, tls_ctx):
    with authed_session(relay, tls_ctx, user="ops", pw=OPS_PW, listener="smtps") as c:
        c.expect("MAIL FROM:<a@example.test>", "550 5.7.1")
        c.expect("MAIL FROM:<a@other.test>", "250 2.1.0")


def _send_with_from(relay, tls_ctx, envelope_from: str, from_lines: list[str], marker: str):
    hdrs = "".join(f"{l}\r\n" for l in from_lines)
    msg = (f"{hdrs}To: <x@foreign.test>\r\nSubject: {marker}\r\n"
           "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           f"Message-ID: <{marker}@client.example.test>\r\n\r\nbody\r\n").encode()
    with authed_session(relay, tls_ctx) as c:
        c.expect(f"MAIL FROM:<{envelope_from}>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        r = c.data(msg)
        c.expect("NOOP", "250")  # session usable after the rejection
    return r


@pytest.mark.parametrize(
    "from_lines",
    [
        ["From: <boss@other.test>"],
        ["From: Boss <boss@other.test>"],
        ["From: boss@foreign.test"],
        ['From: "a@example.test" <boss@other.test>'],  # allowed domain only in the display name
        ["From: <a@example.test>, <boss@other.test>"],  # one of two authors not allowed
        ["From: <boss@notexample.test>"],
    ],
    ids=["angle", "display-name", "bare", "display-name-spoof", "two-authors", "suffix"],
)
def test_from_header_with_a_disallowed_domain_is_rejected_at_end_of_data(relay, tls_ctx, from_lines):
    marker = unique("fromhdr")
    before = set(relay.queue_by_id())
    r = _send_with_from(relay, tls_ctx, "a@example.test", from_lines, marker)
    assert r.starts("550 5.7.1"), f"{from_lines} with envelope <a@example.test>: got {r}"
    assert relay.new_messages(before) == {}


def test_null_sender_does_not_exempt_the_from_header_check(relay, tls_ctx):
    marker = unique("fromhdr-null")
    before = set(relay.queue_by_id())
    r = _send_with_from(relay, tls_ctx, "", ["From: <boss@other.test>"], marker)
    assert r.starts("550 5.7.1"), r
    assert relay.new_messages(before) == {}


def test_two_from_headers_one_disallowed_are_not_queued(relay, tls_ctx):
    marker = unique("twofrom")
    before = set(relay.queue_by_id())
    r = _send_with_from(relay, tls_ctx, "a@example.test", ["From: <a@example.test>", "From: <boss@other.test>"], marker)
    assert r.code >= 500 and r.queue_id is None, r
    assert relay.new_messages(before) == {}


def test_two_allowed_from_headers_are_refused_too(relay, tls_ctx):
    # Which of two From: fields a check, a DKIM signer or a reader's client uses is anyone's guess.
    marker = unique("twofrom-ok")
    before = set(relay.queue_by_id())
    r = _send_with_from(relay, tls_ctx, "a@example.test", ["From: <a@example.test>", "From: <b@example.test>"], marker)
    assert r.starts("550 5.7.1") and "From: header fields" in str(r), r
    assert relay.new_messages(before) == {}


def test_two_from_headers_are_refused_on_the_trusted_listener(relay):
    host, port = relay.listener("trusted")
    msg = ("From: <a@example.test>\r\nFrom: <b@example.test>\r\nSubject: two\r\n\r\nhi\r\n").encode()
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 ")
        c.expect("RCPT TO:<x@foreign.test>", "250 ")
        end = c.data(msg)
        assert end.starts("550 5.7.1") and end.queue_id is None, end


@pytest.mark.parametrize("from_line", ["From: <a@example.test>", "From: App <noreply@EXAMPLE.test>"])
def test_from_header_with_an_allowed_domain_is_queued(relay, tls_ctx, from_line):
    marker = unique("fromok")
    before = set(relay.queue_by_id())
    r = _send_with_from(relay, tls_ctx, "a@example.test", [from_line], marker)
    assert r.queue_id, r
    m = relay.new_messages(before)[r.queue_id]
    assert m["sender"] == "a@example.test" and m["recipients"] == ["x@foreign.test"], m


def test_submission_adds_missing_message_id_and_date(relay, tls_ctx):
    """Stored content is only visible if the spool keeps it in clear; otherwise this is skipped."""
    marker = unique("nomsgid")
    msg = make_message(marker, sender="a@example.test", message_id=False, date=False)
    with authed_session(relay, tls_ctx) as c:
        r = c.transaction("a@example.test", ["x@foreign.test"], msg)
        assert r.queue_id, r
    stored = relay.find_spooled(marker.encode())
    if stored is None:
        pytest.skip("spool does not keep message bytes in clear; no API to read the stored message")
    head = header_region(stored, marker.encode())
    assert re.search(rb"(?im)^message-id:[ \t]*<[^>@\s]+@[^>\s]+>", head), head
    assert re.search(rb"(?im)^date:[ \t]*\S", head), head


def test_submission_keeps_existing_message_id_and_date(relay, tls_ctx):
    marker = unique("hasmsgid")
    msg = make_message(marker, sender="a@example.test")
    with authed_session(relay, tls_ctx) as c:
        r = c.transaction("a@example.test", ["x@foreign.test"], msg)
        assert r.queue_id, r
    stored = relay.find_spooled(marker.encode())
    if stored is None:
        pytest.skip("spool does not keep message bytes in clear; no API to read the stored message")
    head = header_region(stored, marker.encode())
    assert len(re.findall(rb"(?im)^message-id:", head)) == 1, head
    assert len(re.findall(rb"(?im)^date:", head)) == 1, head


# ---------------------------------------------------------------------------------------------------------
# Password guessing


def test_a_password_flood_from_one_address_is_throttled_and_others_still_get_in(relays, tls_ctx):
    # 500 wrong passwords from 127.0.0.1: argon2 runs for the first few only; the rest get 454 unchecked,
    # and meanwhile a client at another address logs in.
    r = relays.start("flood", limits={"auth_failures_per_client": 5, "auth_failure_window": "1h"})
    replies: list[str] = []

    def flood():
        while len(replies) < 500:
            c = tls_session(r, tls_ctx, source="127.0.0.1")
            # The session allows max_errors bad commands, then closes; reconnect and go on.
            for _ in range(9):
                replies.append(str(c.cmd(f"AUTH PLAIN {plain('app', 'guess')}")))
                if len(replies) >= 500:
                    break
            c.close()

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        assert wait_until(lambda: len(replies) >= 50, timeout=60), "the flood did not get going"
        c = tls_session(r, tls_ctx, source="127.0.0.2")
        c.expect(f"AUTH PLAIN {plain('app', APP_PW)}", "235 2.7.0")
        c.close()
    finally:
        flooder.join(timeout=120)
    assert len(replies) >= 500
    assert sum(x.startswith("535 5.7.8") for x in replies) == 5, collections.Counter(x[:9] for x in replies)
    assert sum(x.startswith("454 4.7.0") for x in replies) == len(replies) - 5
    # The right password from the flooding address is refused too until the window passes.
    c = tls_session(r, tls_ctx, source="127.0.0.1")
    c.expect(f"AUTH PLAIN {plain('app', APP_PW)}", "454 4.7.0")
    c.close()
    exp = scrape(r)
    assert exp.get("herald_auth_attempts_total", result="failed") == 5, exp.text
    assert exp.get("herald_auth_attempts_total", result="throttled") == len(replies) - 5 + 1
    assert exp.get("herald_auth_attempts_total", result="accepted") == 1
