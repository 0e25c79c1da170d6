"""Reports that come back to the return-path domain: delivery status notifications, feedback-loop complaints
(ARF) and prose bounces, read at acceptance and turned into metrics, events and suppressions; forged ones
ignored.

Each test runs a relay that delivers through the test DNS server to one accepting peer (`mx`) and writes
events to a file. A test first sends real mail and reads the envelope sender the peer received: that is the
return-path token the report goes back to (or quotes), so every report is about a message the relay really
sent. The reports are built from the provider-shaped templates in `tests/fixtures/reports/`
(`harness/reports.py`) and handed to the `inbound` listener as a remote MTA would: MAIL FROM:<>.

Expected outcomes come from the feedback spec: a hard bounce of an invalid recipient and a complaint
suppress; a delay, a full mailbox, a policy or reputation block, a not-spam report and an auto-reply do not;
a token that does not verify makes the report `forged`, a report with no token `unverified`, and either
changes nothing else.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.outbound import send, start_outbound, unique, wait_gone, wait_until
from harness.prometheus import Exposition, scrape
from harness.reports import (
    OTHER_KEY, Token, build, mailbox, other_queue_id, rcpt_reply, send_report, token,
)
from harness.smtp import SmtpConn

MX = "127.0.0.2"
DOMAINS = ["gmail.test", "outlook.test", "yahoo.test", "univ.test", "foreign.test"]
WAIT = 30.0


@pytest.fixture
def mx(dns, peers):
    """The MX of every recipient domain of these tests: it accepts everything (the bounce comes later)."""
    for d in DOMAINS:
        dns.route(d, MX)
    return peers.aio(MX, "mx")


class Loop:
    """A relay delivering to `mx`, with an events file; sends mail and reports, reads what came of them."""

    def __init__(self, relays, dns, peers, mx, tmp_path: Path, name: str = "feedback"):
        self.mx = mx
        self.events_path = tmp_path / f"{name}.events.jsonl"

        def edit(cfg: dict) -> None:
            cfg["events"] = {"file": str(self.events_path)}

        self.relay = start_outbound(relays, dns, peers, name=name, config=edit)

    def deliver(self, *rcpts: str) -> tuple[str, dict[str, str]]:
        """Send one message to rcpts and wait until the peer has it: (queue id, recipient -> MAIL FROM)."""
        qid, marker, _ = send(self.relay, list(rcpts), "fb")
        wait_gone(self.relay, qid)
        senders = {}
        for rcpt in rcpts:
            got = [t for t in self.mx.delivered_to(rcpt) if marker.encode() in t.data]
            assert len(got) == 1 and got[0].rcpt_tos == [rcpt], (
                f"{rcpt}: want one transaction for it alone, got {[(t.mail_from, t.rcpt_tos) for t in got]}")
            senders[rcpt] = got[0].mail_from
        return qid, senders

    def report(self, rcpt: str, data: bytes) -> None:
        code, text = send_report(self.relay, rcpt, data)
        assert code == 250 and "report received" in text, f"report to {rcpt}: {code} {text}"

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def report_events(self) -> list[dict]:
        """Once every event emitted so far is in the file: the events that came of reports (they name a source).

        Events are written by one task in order; the `accepted` event of a message submitted now comes
        after every event of the reports before it."""
        qid, _, _ = send(self.relay, [f"{unique('settle')}@foreign.test"], "settle")
        ok = wait_until(lambda: any(e["type"] == "accepted" and e["queue_id"] == qid for e in self.events()), WAIT)
        assert ok, f"the accepted event of {qid} never reached {self.events_path}"
        return [e for e in self.events() if "source" in e]

    def suppression(self, address: str) -> dict | None:
        status, body = self.relay.http("GET", "/suppressions")
        assert status == 200, (status, body[:300])
        found = [e for e in json.loads(body)["suppressions"] if e["address"].lower() == address.lower()]
        return found[0] if found else None

    def submission_rcpt(self, address: str):
        """The reply to RCPT TO:<address> from the sending application (trusted listener)."""
        host, port = self.relay.listener("trusted")
        with SmtpConn(host, port) as c:
            c.greeting()
            c.ehlo()
            c.expect("MAIL FROM:<a@example.test>", "250 ")
            reply = c.cmd(f"RCPT TO:<{address}>")
            c.cmd("QUIT")
            return reply

    def assert_suppressed(self, address: str, reason_start: str) -> dict:
        e = self.suppression(address)
        assert e is not None, f"{address} is not on the suppression list"
        assert e["reason"].startswith(reason_start), e
        reply = self.submission_rcpt(address)
        assert reply.starts("550 5.1.1"), f"RCPT to the suppressed {address}: {reply}"
        return e

    def assert_not_suppressed(self, *addresses: str) -> None:
        for a in addresses:
            assert self.suppression(a) is None, f"{a} suppressed: {self.suppression(a)}"
            reply = self.submission_rcpt(a)
            assert reply.starts("250 2.1.5"), f"RCPT to {a}: {reply}"


def changes(before: Exposition, after: Exposition, name: str) -> dict[tuple, float]:
    """Series of `name` whose value changed: sorted label pairs -> difference."""
    labels = {s.labels for s in before.series(name)} | {s.labels for s in after.series(name)}
    out = {}
    for ls in labels:
        d = after.value(name, **dict(ls)) - before.value(name, **dict(ls))
        if d:
            out[ls] = d
    return out


def series(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


@dataclass
class Metrics:
    """What one report changed: feedback reports, bounces, complaints."""

    feedback: dict
    bounces: dict
    complaints: dict


def measured(loop: Loop, rcpt: str, data: bytes) -> Metrics:
    before = scrape(loop.relay)
    loop.report(rcpt, data)
    after = scrape(loop.relay)
    return Metrics(*(changes(before, after, n) for n in (
        "herald_feedback_reports_total", "herald_bounces_total", "herald_complaints_total")))


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


# ---------------------------------------------------------------------------------------------------------
# What each provider's report means


@dataclass
class Case:
    template: str
    recipient: str  # local part prefix and domain of the recipient the relay delivered to
    kind: str  # herald_feedback_reports_total{kind}
    result: str  # herald_feedback_reports_total{result}
    to: str = "token"  # where the report is sent: the token, or a feedback mailbox
    fields: dict = field(default_factory=dict)
    category: str | None = None  # of a bounce (class follows the reply code: all 5xx here)
    feedback_type: str | None = None  # of a complaint
    suppressed: bool = False
    reason_has: str | None = None  # a piece of the diagnostic, found again in the suppression reason


LONG = "subscriber.with-a-rather-long-name"  # its token cannot carry it: the report has to name it

CASES = {
    "gmail-550-5.1.1-no-such-user": Case(
        "gmail-dsn", "jo@gmail.test", "dsn", "bounce", category="invalid-recipient", suppressed=True,
        reason_has="550-5.1.1 The email account"),
    "microsoft-365-5.1.10-recipient-not-found": Case(
        "microsoft-ndr", "pat@outlook.test", "dsn", "bounce", category="invalid-recipient", suppressed=True,
        reason_has="550 5.1.10 RESOLVER.ADR.RecipientNotFound"),
    "microsoft-5.7.606-banned-sending-ip": Case(
        "postfix-bounce", "kim@outlook.test", "dsn", "bounce", category="reputation-block", fields=dict(
            mta="smtp-out.isp.test", remote_mta="outlook-com.olc.protection.outlook.com", status="5.7.606",
            diagnostic="550 5.7.606 Access denied, banned sending IP [192.0.2.10]. To request removal from\n"
                       "    this list please visit https://sender.office.com/ and follow the directions.\n"
                       "    For more information please go to  http://go.microsoft.com/fwlink/?LinkID=526655\n"
                       "    AS(1430)")),
    "spamhaus-5.7.1-blocked": Case(
        "postfix-bounce", "lee@foreign.test", "dsn", "bounce", category="reputation-block", fields=dict(
            status="5.7.1",
            diagnostic="554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using\n"
                       "    zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.10")),
    "postfix-5.7.1-access-denied": Case(
        "postfix-bounce", "max@foreign.test", "dsn", "bounce", category="policy-block", fields=dict(
            status="5.7.1", diagnostic="554 5.7.1 <{rcpt}>: Recipient address rejected: Access denied")),
    "yahoo-554-dd-no-account-via-forwarder": Case(
        "postfix-bounce", "alumni.kai@univ.test", "dsn", "bounce", category="invalid-recipient",
        suppressed=True, reason_has="554 delivery error: dd", fields=dict(
            final="kai.w@yahoo.test", mta="mx.univ.test", remote_mta="mta7.am0.yahoodns.net",
            remote_ip="198.51.100.72", status="5.0.0",
            diagnostic="554 delivery error: dd This user doesn't have a yahoo.test account\n"
                       "    (kai.w@yahoo.test) [-5] - mta4012.mail.gq1.yahoo.com")),
    "postfix-5.2.2-mailbox-full": Case(
        "postfix-bounce", "sam@foreign.test", "dsn", "bounce", category="mailbox-full", fields=dict(
            status="5.2.2", diagnostic="552 5.2.2 <{rcpt}> Quota exceeded (mailbox for user is full)")),
    "postfix-delayed-4.2.2-mailbox-full": Case(
        "postfix-delayed", "ria@foreign.test", "dsn", "delay", fields=dict(
            status="4.2.2", diagnostic="452 4.2.2 <{rcpt}> Quota exceeded (mailbox for user is full)")),
    "exim-x-failed-recipients": Case(
        "exim-bounce", f"{LONG}@foreign.test", "text", "bounce", category="invalid-recipient", suppressed=True,
        reason_has="550 5.1.1", fields=dict(
            diagnostic="550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table")),
    "qmail-#5.1.1": Case(
        "qmail-bounce", "old@foreign.test", "text", "bounce", category="invalid-recipient", suppressed=True,
        reason_has="(#5.1.1)"),
    "yahoo-cfl-abuse": Case(
        "yahoo-cfl-arf", "ann@yahoo.test", "arf", "complaint", to="fbl", feedback_type="abuse", suppressed=True),
    "outlook-jmrp-abuse": Case(
        "outlook-jmrp-arf", "bo@outlook.test", "arf", "complaint", to="abuse", feedback_type="abuse",
        suppressed=True),
    "arf-fraud": Case(
        "arf", "cy@foreign.test", "arf", "complaint", to="fbl", feedback_type="fraud", suppressed=True,
        fields=dict(feedback_type="fraud")),
    "arf-not-spam": Case(
        "arf", "dee@foreign.test", "arf", "other", to="fbl", fields=dict(feedback_type="not-spam")),
    "auto-reply": Case("auto-reply-en", "eve@foreign.test", "none", "not-a-report"),
    "auto-reply-with-a-dotted-date": Case("auto-reply-de", "fritz@foreign.test", "none", "not-a-report"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_provider_report_is_classified_counted_and_suppresses_only_what_it_should(
        relays, dns, peers, mx, tmp_path, case):
    loop = Loop(relays, dns, peers, mx, tmp_path)
    local, _, domain = case.recipient.rpartition("@")
    rcpt = f"{unique(local)}@{domain}"
    qid, senders = loop.deliver(rcpt)
    return_path = senders[rcpt]
    to = return_path if case.to == "token" else mailbox(case.to)
    fields = {k: v.replace("{rcpt}", rcpt) for k, v in case.fields.items()}
    data = build(case.template, report_to=to, recipient=rcpt, return_path=return_path, **fields)

    got = measured(loop, to, data)

    # The decision that matters most first: whether the recipient may be mailed again.
    if case.suppressed and case.feedback_type:
        entry = loop.assert_suppressed(rcpt, f"complaint ({case.feedback_type}, arf report)")
        # Complaints never expire by default; the entry names the report it came in.
        assert entry["category"] == "complaint" and entry["expires_at"] is None, entry
        assert entry["reply"] == {"source": "arf", "text": case.feedback_type}, entry
    elif case.suppressed:
        entry = loop.assert_suppressed(rcpt, f"bounce ({case.kind} report): ")
        assert case.reason_has in entry["reason"], entry
        assert entry["category"] == "invalid-recipient" and entry["expires_at"], entry
        assert entry["reply"]["source"] == case.kind and case.reason_has in entry["reply"]["text"], entry
    else:
        loop.assert_not_suppressed(rcpt)

    assert got.feedback == {series(kind=case.kind, result=case.result): 1}, got.feedback
    want_bounces = {series(**{"class": "hard"}, category=case.category, domain=domain): 1} if case.category else {}
    assert got.bounces == want_bounces, got.bounces
    want_complaints = {series(feedback_type=case.feedback_type, domain=domain): 1} if case.feedback_type else {}
    assert got.complaints == want_complaints, got.complaints
    # The sending domain's counters for the day: the report came to example.test's return path.
    status, body = loop.relay.http("GET", "/counters")
    assert status == 200, body
    counted = json.loads(body)["domains"].get("example.test", {})
    assert counted.get("delivered", 0) >= 1, counted
    assert counted.get("bounced", 0) == (1 if case.category else 0), counted
    assert counted.get("complained", 0) == (1 if case.feedback_type else 0), counted

    evs = loop.report_events()
    outcomes = [e for e in evs if e["type"] != "suppressed"]
    want_types = ["bounced"] if case.category else ["complained"] if case.feedback_type else []
    assert [e["type"] for e in outcomes] == want_types, evs
    for e in evs:
        assert e["queue_id"].lower() == qid.lower() and e["recipient"] == rcpt and e["source"] == case.kind, e
    if case.category:
        [b] = outcomes
        assert (b["class"], b["category"]) == ("hard", case.category), b
    if case.feedback_type:
        assert outcomes[0]["feedback_type"] == case.feedback_type, outcomes
    if not case.suppressed:
        assert not [e for e in evs if e["type"] == "suppressed"], evs


# ---------------------------------------------------------------------------------------------------------
# Forged and unverified reports


FORGERIES = ["wrong-key", "another-recipient", "tampered-queue-id"]


def forge(real: Token, forgery: str, owner: str, victim: str) -> tuple[Token, str]:
    """A token that differs from the real one in one respect, and the recipient the forged report names."""
    if forgery == "wrong-key":
        return token(real.queue_id, owner, key=OTHER_KEY), owner
    if forgery == "another-recipient":
        # A token that carries its recipient gets the victim's address pasted in; one that does not is
        # used as it is, in a report about the victim.
        return (real.replace(recipient=victim) if real.recipient else real), victim
    assert forgery == "tampered-queue-id"
    return real.replace(queue_id=other_queue_id(real.queue_id)), owner


@dataclass
class Channel:
    """How a forger gets a report in: a DSN to a token that does not carry its recipient (the RCPT is
    accepted, the report must name the recipient), or a complaint to the fbl@ mailbox quoting a token."""

    owner_local: str
    victim_local: str
    kind: str
    genuine_result: str

    def send(self, loop: Loop, tok: Token, named: str) -> Metrics:
        if self.kind == "dsn":
            data = build("postfix-bounce", report_to=tok.address, recipient=named, return_path=tok.address,
                         status="5.1.1", diagnostic=f"550 5.1.1 <{named}>: Recipient address rejected: User unknown")
            return measured(loop, tok.address, data)
        data = build("arf", report_to=mailbox("fbl"), recipient=named, return_path=tok.address)
        return measured(loop, mailbox("fbl"), data)


CHANNELS = {
    "dsn-to-token": Channel(LONG, f"victim.{LONG}", "dsn", "bounce"),
    "arf-to-fbl": Channel("owner", "victim", "arf", "complaint"),
}


@pytest.mark.parametrize("forgery", FORGERIES)
@pytest.mark.parametrize("channel", CHANNELS.values(), ids=CHANNELS.keys())
def test_a_forged_report_is_counted_as_forged_and_changes_nothing(relays, dns, peers, mx, tmp_path, channel,
                                                                   forgery):
    loop = Loop(relays, dns, peers, mx, tmp_path)
    owner = f"{unique(channel.owner_local)}@foreign.test"
    victim = f"{unique(channel.victim_local)}@foreign.test"
    qid, senders = loop.deliver(owner)
    real = Token.parse(senders[owner])
    assert (real.recipient is None) == (channel.kind == "dsn"), real
    forged, named = forge(real, forgery, owner, victim)
    assert forged != real or named != owner

    got = channel.send(loop, forged, named)
    assert got.feedback == {series(kind=channel.kind, result="forged"): 1}, got.feedback
    assert got.bounces == {} and got.complaints == {}, got
    loop.assert_not_suppressed(owner, victim)

    # The same report with the real token is believed: only the forgery made the difference.
    got = channel.send(loop, real, owner)
    assert got.feedback == {series(kind=channel.kind, result=channel.genuine_result): 1}, got.feedback
    assert loop.suppression(owner) is not None
    evs = loop.report_events()
    assert len([e for e in evs if e["type"] != "suppressed"]) == 1, evs
    assert all(e["queue_id"].lower() == qid.lower() and e["recipient"] == owner for e in evs), evs
    assert loop.suppression(victim) is None


@pytest.mark.parametrize("template,to", [("gmail-dsn", "postmaster"), ("arf", "abuse")])
def test_a_report_without_any_token_is_unverified_and_changes_nothing(relays, dns, peers, mx, tmp_path,
                                                                      template, to):
    loop = Loop(relays, dns, peers, mx, tmp_path)
    rcpt = f"{unique('jo')}@gmail.test"
    # About mail sent with a plain envelope sender (no return path): nothing in it verifies.
    data = build(template, report_to=mailbox(to), recipient=rcpt, return_path="a@example.test")
    got = measured(loop, mailbox(to), data)
    kind = "dsn" if template == "gmail-dsn" else "arf"
    assert got.feedback == {series(kind=kind, result="unverified"): 1}, got.feedback
    assert got.bounces == {} and got.complaints == {}, got
    assert loop.report_events() == []
    loop.assert_not_suppressed(rcpt)


def test_rcpt_at_the_return_path_domain_takes_the_feedback_mailboxes_and_genuine_tokens_only(
        relays, dns, peers, mx, tmp_path):
    loop = Loop(relays, dns, peers, mx, tmp_path)
    owner = f"{unique('owner')}@foreign.test"
    _, senders = loop.deliver(owner)
    real = Token.parse(senders[owner])
    assert real.recipient == owner, real
    refused = {
        "a random local part": mailbox(unique("nobody")),
        "b+ without a token": mailbox("b+newsletter-2024"),
        **{forgery: forge(real, forgery, owner, f"{unique('victim')}@foreign.test")[0].address
           for forgery in FORGERIES},
    }
    before = scrape(loop.relay)
    for what, address in refused.items():
        code, text = rcpt_reply(loop.relay, address)
        assert (code, text.split()[0]) == (550, "5.1.1"), f"{what}: RCPT TO:<{address}> -> {code} {text}"
    after = scrape(loop.relay)
    # Counted as what they are, not as suppressed recipients (which share the reply code).
    for reason, grew in [("unknown_recipient", len(refused)), ("suppressed", 0)]:
        delta = (after.value("herald_smtp_rejections_total", reason=reason)
                 - before.value("herald_smtp_rejections_total", reason=reason))
        assert delta == grew, f"herald_smtp_rejections_total{{reason={reason!r}}} grew by {delta}, not {grew}"
    for address in [mailbox("postmaster"), mailbox("abuse"), mailbox("fbl"), real.address]:
        code, text = rcpt_reply(loop.relay, address)
        assert code == 250, f"RCPT TO:<{address}> -> {code} {text}"


# ---------------------------------------------------------------------------------------------------------
# The loop closes


def test_a_dsn_back_to_the_envelope_sender_a_peer_received_bounces_that_message_and_recipient(
        relays, dns, peers, mx, tmp_path):
    loop = Loop(relays, dns, peers, mx, tmp_path)
    short, long = f"{unique('ann')}@foreign.test", f"{unique(LONG)}@foreign.test"
    qid, senders = loop.deliver(short, long)

    # One transaction per recipient, each with the token its definition gives (recipient carried if it fits).
    assert senders == {short: token(qid, short).address, long: token(qid, long).address}, senders
    assert Token.parse(senders[short]).recipient == short and Token.parse(senders[long]).recipient is None

    # The peer took the message; days later its mailstore bounces it, to exactly that envelope sender.
    data = build("postfix-bounce", report_to=senders[short], recipient=short, return_path=senders[short],
                 status="5.1.1", diagnostic=f"550 5.1.1 <{short}>: Recipient address rejected: User unknown")
    loop.report(senders[short], data)

    [ev] = [e for e in loop.report_events() if e["type"] == "bounced"]
    assert ev["queue_id"].lower() == qid.lower(), f"bounced event {ev} is not about {qid}, accepted earlier"
    assert (ev["recipient"], ev["source"], ev["class"], ev["category"]) == (short, "dsn", "hard",
                                                                           "invalid-recipient"), ev
    loop.assert_suppressed(short, "bounce (dsn report): 550 5.1.1")
    loop.assert_not_suppressed(long)


# ---------------------------------------------------------------------------------------------------------
# Operator rules, applied by a reload


def test_a_bounce_rule_loaded_by_sighup_changes_the_category_and_the_suppression(relays, dns, peers, mx,
                                                                                 tmp_path):
    loop = Loop(relays, dns, peers, mx, tmp_path)
    r = loop.relay
    first, second = f"{unique('pat')}@outlook.test", f"{unique('pat')}@outlook.test"
    _, senders = loop.deliver(first, second)

    def ndr(rcpt: str) -> Metrics:
        return measured(loop, senders[rcpt], build("microsoft-ndr", report_to=senders[rcpt], recipient=rcpt,
                                                   return_path=senders[rcpt]))

    got = ndr(first)
    assert got.bounces == {series(**{"class": "hard"}, category="invalid-recipient", domain="outlook.test"): 1}
    assert loop.suppression(first) is not None

    # A tenant in the middle of a migration answers 5.1.10 for mailboxes that still live on premises: the
    # operator says that is no reason to suppress.
    pid, reloads = r.pid, r.log_text().count("config reloaded")
    r.config["bounces"]["rules"] = [
        {"status": "5.1.10", "text": [r"RESOLVER\.ADR\.RecipientNotFound"], "category": "permanent-other"}]
    r.write_config()
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: r.log_text().count("config reloaded") > reloads, WAIT), r.log_tail(30)
    assert r.running and r.pid == pid

    got = ndr(second)
    assert got.bounces == {series(**{"class": "hard"}, category="permanent-other", domain="outlook.test"): 1}
    assert got.feedback == {series(kind="dsn", result="bounce"): 1}
    loop.assert_not_suppressed(second)
    [ev] = [e for e in loop.report_events() if e["type"] == "bounced" and e["recipient"] == second]
    assert ev["category"] == "permanent-other", ev


def _dsn_with_blocks(rcpt_count: int, padding: int = 0) -> bytes:
    """A DSN to postmaster naming `rcpt_count` failed recipients, with `padding` bytes of returned message."""
    blocks = "".join(
        f"Final-Recipient: rfc822; r{i}@gmail.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\r\n" for i in range(rcpt_count))
    body = "x" * 76 + "\r\n"
    return (
        f"From: MAILER-DAEMON@gmail.test\r\nTo: {mailbox('postmaster')}\r\nSubject: Undelivered\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nSome addresses failed.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.gmail.test\r\n\r\n"
        f"{blocks}"
        "--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: the original\r\n\r\n"
        f"{body * (padding // len(body))}"
        "--b--\r\n"
    ).encode()


def test_a_report_is_read_only_up_to_its_limits_and_the_cut_is_counted(relays, dns, peers, mx, tmp_path):
    # Anyone may write to postmaster@ the return-path domain; what a report can cost is bounded.
    loop = Loop(relays, dns, peers, mx, tmp_path)
    before = scrape(loop.relay)
    loop.report(mailbox("postmaster"), _dsn_with_blocks(3))
    small = scrape(loop.relay)
    assert small.get("herald_feedback_limited_total") == before.get("herald_feedback_limited_total") == 0
    loop.report(mailbox("postmaster"), _dsn_with_blocks(150))
    loop.report(mailbox("postmaster"), _dsn_with_blocks(1, padding=3 << 20))
    after = scrape(loop.relay)
    assert after.get("herald_feedback_limited_total") == 2, after.text
    # Nothing in them verified (no token): counted, and nobody suppressed.
    assert loop.report_events() == []
    loop.assert_not_suppressed("r0@gmail.test", "r149@gmail.test")
