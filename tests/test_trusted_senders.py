"""Who a trusted listener's clients may send as (`listeners[].trusted_senders`).

A trusted listener (allow_networks, no AUTH) relays for its networks, and the relay DKIM-signs what it relays
for its sending domains; so its clients may send, in MAIL FROM and in the From: header, only as:

- the relay's sending domains (`domains[].name`: here example.test and other.test) when the key is absent;
- exactly the listed domains with `trusted_senders: [...]`;
- anyone with `trusted_senders: any`.

A sender outside gets 550 5.7.1 at MAIL FROM; a From: address outside gets 550 5.7.1 at the end of DATA;
both are counted as herald_smtp_rejections_total{reason="sender_not_allowed"}. The inbound listener relays
nothing and takes reports from any sender. Clients are swaks and Python's smtplib, on loopback.
"""

from __future__ import annotations

import signal
import smtplib
import time
import uuid

import pytest

from harness.prometheus import scrape
from harness.relay import RelayPool, addr, free_port
from harness.smtp import SmtpConn, make_message
from harness.tools import swaks, swaks_queue_id

LOOPBACK = ["127.0.0.0/8"]


def listeners() -> list[dict]:
    return [
        {"name": "trusted", "address": addr("127.0.0.1", free_port()), "allow_networks": LOOPBACK},
        {"name": "listed", "address": addr("127.0.0.1", free_port()), "allow_networks": LOOPBACK,
         "trusted_senders": ["Other.Test"]},
        {"name": "open", "address": addr("127.0.0.1", free_port()), "allow_networks": LOOPBACK,
         "trusted_senders": "any"},
        {"name": "inbound", "address": addr("127.0.0.1", free_port())},
    ]


@pytest.fixture(scope="module")
def relay(tmp_path_factory, relay_binary):
    pool = RelayPool(tmp_path_factory.mktemp("senders"), None, None)
    r = pool.start("senders", listeners=listeners())
    yield r
    pool.stop_all()


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def send(relay, listener: str, sender: str, header_from: str | None = None) -> tuple[str | None, str]:
    """swaks from `sender` (envelope) with a From: header of `header_from` (default: the sender); returns the
    queue id (None when refused) and swaks's transcript."""
    host, port = relay.listener(listener)
    r = swaks(host, port, "--from", sender, "--to", "x@foreign.test",
              "--header", f"From: <{header_from or sender}>", "--header", f"Subject: {unique(listener)}")
    return swaks_queue_id(r), r.stdout


def refusals(relay) -> float:
    return scrape(relay).value("herald_smtp_rejections_total", reason="sender_not_allowed")


# ---------------------------------------------------------------------------------------------------------
# The default: the relay's sending domains


@pytest.mark.parametrize("sender", ["app@example.test", "App@EXAMPLE.Test", "ops@other.test"])
def test_a_trusted_listener_takes_the_relays_sending_domains(relay, sender):
    qid, out = send(relay, "trusted", sender)
    assert qid, out
    assert relay.queue_by_id()[qid]["sender"] == sender


@pytest.mark.parametrize(
    "sender, domain",
    [
        ("a@foreign.test", "foreign.test"),
        ("a@sub.example.test", "sub.example.test"),  # a subdomain is another domain
        ("a@example.test.foreign.test", "example.test.foreign.test"),
        ("a@bounces.example.test", "bounces.example.test"),  # a return-path domain is not a sending domain
        ("a@[127.0.0.1]", "[127.0.0.1]"),
    ],
)
def test_a_trusted_listener_refuses_another_mail_from_domain_with_550_5_7_1(relay, sender, domain):
    before = refusals(relay)
    qid, out = send(relay, "trusted", sender)
    assert qid is None, out
    assert f"<** 550 5.7.1 Sender domain {domain} is not one of this relay's sending domains" in out, out
    assert refusals(relay) == before + 1


def test_a_foreign_from_header_is_refused_at_the_end_of_data(relay):
    """smtplib: MAIL FROM and RCPT TO are fine, the From: header is not; nothing is queued."""
    host, port = relay.listener("trusted")
    before, queued = refusals(relay), set(relay.queue_by_id())
    msg = make_message(unique("from-header"), sender="boss@foreign.test")
    with smtplib.SMTP(host, port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("app@example.test", ["x@foreign.test"], msg)
        assert e.value.smtp_code == 550, e.value
        assert e.value.smtp_error.decode() == (
            "5.7.1 From: address boss@foreign.test: domain foreign.test is not one of this relay's sending domains")
        assert s.noop()[0] == 250  # the session carries on
    assert relay.new_messages(queued) == {}
    assert refusals(relay) == before + 1


@pytest.mark.parametrize(
    "header",
    ["From: <a@example.test>, <boss@foreign.test>", 'From: "a@example.test" <boss@foreign.test>'],
    ids=["second-author", "display-name"],
)
def test_every_from_address_is_checked_not_the_display_name(relay, header):
    host, port = relay.listener("trusted")
    body = f"{header}\r\nTo: <x@foreign.test>\r\nSubject: {unique('authors')}\r\n\r\nhi\r\n".encode()
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        end = c.data(body)
    assert end.starts("550 5.7.1") and "boss@foreign.test" in str(end) and end.queue_id is None, end


def test_the_null_sender_does_not_exempt_the_from_header(relay):
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        refused = c.data(make_message(unique("null"), sender="boss@foreign.test"))
        c.expect("MAIL FROM:<>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        ok = c.data(make_message(unique("null"), sender="mailer-daemon@example.test"))
    assert refused.starts("550 5.7.1"), refused
    assert ok.queue_id, ok


def test_a_message_without_from_is_refused_where_the_sender_is_checked(relay):
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        end = c.data(f"To: <x@foreign.test>\r\nSubject: {unique('nofrom')}\r\n\r\nhi\r\n".encode())
    assert end.starts("554 5.6.0") and "no From:" in str(end), end


# ---------------------------------------------------------------------------------------------------------
# trusted_senders: a list, or any


def test_a_list_narrows_the_listener_to_those_domains(relay):
    qid, out = send(relay, "listed", "ops@other.test")
    assert qid, out
    qid, out = send(relay, "listed", "app@example.test")
    assert qid is None and "<** 550 5.7.1 Sender domain example.test is not in this listener's trusted_senders" in out, out
    qid, out = send(relay, "listed", "ops@other.test", header_from="app@example.test")
    assert qid is None and "550 5.7.1 From: address app@example.test: domain example.test is not in this " \
        "listener's trusted_senders" in out, out


def test_trusted_senders_any_takes_any_mail_from_and_any_from_header(relay):
    before = refusals(relay)
    qid, out = send(relay, "open", "a@foreign.test", header_from="boss@elsewhere.test")
    assert qid, out
    assert relay.queue_by_id()[qid]["sender"] == "a@foreign.test"
    assert refusals(relay) == before


def test_the_inbound_listener_takes_reports_from_any_sender(relay):
    """Bounces and complaints come from anyone: no sender check where nothing is relayed."""
    host, port = relay.listener("inbound")
    before = refusals(relay)
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<feedback@mailbox-provider.test>", "250 2.1.0")
        c.expect("RCPT TO:<fbl@bounces.example.test>", "250 2.1.5")
        end = c.data(make_message(unique("report"), sender="feedback@mailbox-provider.test",
                                  to="fbl@bounces.example.test"))
    assert end.starts("250 2.0.0"), end
    assert refusals(relay) == before


# ---------------------------------------------------------------------------------------------------------
# Live changes


def test_trusted_senders_and_the_sending_domains_change_on_reload(relays):
    r = relays.start("reload-senders", listeners=listeners()[:1])
    assert send(r, "trusted", "a@foreign.test")[0] is None

    def reload(n: int) -> None:
        r.write_config()
        r.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if r.log_text().count("config reloaded") >= n:
                return
            time.sleep(0.1)
        raise AssertionError(f"no reload {n}:\n{r.log_tail(30)}")

    # A new sending domain is one the listener takes...
    r.config["domains"].append({"name": "foreign.test"})
    reload(1)
    qid, out = send(r, "trusted", "a@foreign.test")
    assert qid, out
    # ... and a list replaces the sending domains.
    r.config["listeners"][0]["trusted_senders"] = ["other.test"]
    reload(2)
    assert send(r, "trusted", "a@foreign.test")[0] is None
    assert send(r, "trusted", "a@other.test")[0]
