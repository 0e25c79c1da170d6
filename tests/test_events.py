"""Logs and delivery events (observability spec).

Logs: with `--log-format json` every line the relay writes to stderr is one JSON object; each delivery
attempt outcome is one `delivery` line with its fields; recipient addresses appear in the log only with
`log: {recipients: true}` (then at the end of the reply field), never by default, not even where a peer's
reply or a refusal quotes the address.

Events: JSON lines appended to `events.file`, and POSTed in signed JSON arrays to `events.webhook`, retried
with backoff while the endpoint fails, kept in order, and never in the way of delivery. The events file is
the reference for the webhook tests: what the endpoint accepted must be that same sequence, none missing,
none repeated.

Each test runs its own relay delivering through the test DNS server to aiosmtpd peers on loopback
(harness/outbound.py); the endpoint is a Python http.server on loopback (harness/webhook.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from harness.outbound import (
    FOREIGN, SENDER, delivery_section, send, start_outbound, wait_gone, wait_state, wait_until,
)
from harness.prometheus import scrape
from harness.relay import ALL_RELAYS, Relay, relay_bin
from harness.smtp import SmtpConn
from harness.webhook import WebhookReceiver, signature_ok

WAIT = 30.0

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$")
EVENT_TYPES = {"accepted", "delivered", "deferred", "bounced", "expired", "suppressed"}
CATEGORIES = {
    "invalid-recipient", "mailbox-full", "message-too-large", "rate-limited", "greylisted", "reputation-block",
    "authentication-failure", "policy-block", "spam-content", "transient-network", "transient-other", "permanent-other",
}


def token() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def foreign(dns, peers):
    dns.route("foreign.test", FOREIGN)
    return peers.aio(FOREIGN, "foreign", starttls=True)


# ---------------------------------------------------------------------------------------------------------
# Logs


class StderrRelay(Relay):
    """A relay whose stderr alone goes to `log_path` (stdout to `stdout_path`), to check what stderr holds."""

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.label}.stdout"

    def start(self, wait: bool = True) -> "StderrRelay":
        assert self.proc is None or self.proc.poll() is not None, "relay already running"
        self.write_config()
        self.starts += 1
        with open(self.log_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(relay_bin()), "--config", str(self.config_path), *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.workdir, start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_json_logged(relays, dns, peers, name: str, log: dict | None = None) -> StderrRelay:
    cfg = relays.config(name)
    cfg["delivery"] = delivery_section(dns.address, peers.port)
    if log is not None:
        cfg["log"] = log
    relay = StderrRelay(relays.base / name, cfg, label=name, extra_args=["--log-format", "json"])
    relays.relays.append(relay)
    ALL_RELAYS.append(relay)
    return relay.start()


def stderr_records(relay: StderrRelay) -> list[dict]:
    """Every stderr line as JSON; a line that is not one JSON object fails the test."""
    out = []
    for n, line in enumerate(relay.log_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"stderr line {n} is not JSON: {line!r}")
        assert isinstance(rec, dict), f"stderr line {n} is JSON but not an object: {line!r}"
        out.append(rec)
    return out


def delivery_lines(relay: StderrRelay, qid: str) -> list[dict]:
    return [r["fields"] for r in stderr_records(relay)
            if r.get("fields", {}).get("message") == "delivery"
            and str(r["fields"].get("queue_id", "")).lower() == qid.lower()]


class MixedMail:
    """Submit: one message to a delivered recipient, one to a deferred (451) and a bounced (550 5.1.1)
    recipient whose peer replies quote the address; then a relay-denied RCPT and a RCPT to the now
    suppressed address. All recipient addresses are unique to the test."""

    def __init__(self, relay, foreign):
        t = token()
        self.ok = f"ok-{t}@foreign.test"
        self.ok2 = f"ok2-{t}@foreign.test"
        self.later = f"later-{t}@foreign.test"
        self.nouser = f"nouser-{t}@foreign.test"
        self.denied = f"denied-{t}@elsewhere.test"
        foreign.on_rcpt(self.later, f"451 4.2.0 <{self.later}>: Recipient address rejected: try again later")
        foreign.on_rcpt(self.nouser, f"550 5.1.1 <{self.nouser}>: Recipient address rejected: User unknown")
        self.q_ok = send(relay, [self.ok, self.ok2], "log-ok")[0]
        self.q_mixed = send(relay, [self.later, self.nouser], "log-mixed")[0]
        wait_gone(relay, self.q_ok, WAIT)
        wait_state(relay, self.q_mixed, {self.later: "deferred"})
        host, port = relay.listener("inbound")
        with SmtpConn(host, port) as c:
            c.greeting()
            c.ehlo()
            c.expect("MAIL FROM:<someone@foreign.test>", "250 ")
            c.expect(f"RCPT TO:<{self.denied}>", "554 5.7.1")
            c.cmd("QUIT")
        host, port = relay.listener("trusted")
        with SmtpConn(host, port) as c:
            c.greeting()
            c.ehlo()
            c.expect(f"MAIL FROM:<{SENDER}>", "250 ")
            c.expect(f"RCPT TO:<{self.nouser}>", "550 5.1.1")
            c.cmd("QUIT")

    @property
    def recipients(self) -> list[str]:
        return [self.ok, self.ok2, self.later, self.nouser, self.denied]


def test_json_logs_are_one_object_per_stderr_line_and_each_delivery_has_its_fields(relays, dns, peers, foreign,
                                                                                  mailbox):
    relay = start_json_logged(relays, dns, peers, "json-log")
    m = MixedMail(relay, foreign)
    wait_until(lambda: mailbox.accepted(), WAIT)  # the DSN for the bounce, so its lines are in too
    assert relay.stop() == 0

    records = stderr_records(relay)
    assert records, "nothing on stderr"
    for rec in records:
        assert {"timestamp", "level", "fields", "target"} <= set(rec), f"log record without the spec's keys: {rec}"
        assert isinstance(rec["fields"], dict) and "message" in rec["fields"], rec

    [ok] = delivery_lines(relay, m.q_ok)
    [t] = foreign.delivered_to(m.ok)
    assert ok["domain"] == "foreign.test" and ok["result"] == "delivered", ok
    assert "mx1.foreign.test" in str(ok["mx"]), ok
    assert ok["tls"] == t.tls, f"log says tls={ok['tls']!r}, the peer saw {t.tls!r}"
    assert str(ok["reply"]).startswith("250"), ok
    assert isinstance(ok["delay"], (int, float)) and ok["delay"] >= 0, ok
    assert ok["recipients"] == 2, ok

    mixed = delivery_lines(relay, m.q_mixed)
    by_result = {f["result"]: f for f in mixed}
    assert sorted(f["result"] for f in mixed) == ["bounced", "deferred"], mixed
    assert str(by_result["deferred"]["reply"]).startswith("451 4.2.0"), mixed
    assert str(by_result["bounced"]["reply"]).startswith("550 5.1.1"), mixed
    for f in mixed:
        assert {"queue_id", "domain", "mx", "tls", "result", "reply", "delay", "recipients"} <= set(f), f
        assert f["recipients"] == 1, f


def test_recipient_addresses_appear_nowhere_in_the_log_by_default(relays, dns, peers, foreign, mailbox):
    relay = start_json_logged(relays, dns, peers, "private-log")
    m = MixedMail(relay, foreign)
    wait_until(lambda: mailbox.accepted(), WAIT)
    assert relay.stop() == 0
    text = (relay.log_text() + relay.stdout_text()).lower()
    assert delivery_lines(relay, m.q_ok), "no delivery line at all: nothing was checked"
    leaked = {}
    for a in m.recipients:
        lines = [l for l in text.splitlines() if a.lower() in l]
        if lines:
            leaked[a] = lines[:3]
    assert not leaked, "recipient addresses in the default log:\n" + "\n".join(
        f"  {a}:\n    " + "\n    ".join(ls) for a, ls in leaked.items())


def test_with_log_recipients_true_delivery_replies_end_with_the_recipient_addresses(relays, dns, peers, foreign,
                                                                                   mailbox):
    relay = start_json_logged(relays, dns, peers, "named-log", log={"recipients": True})
    m = MixedMail(relay, foreign)
    assert relay.stop() == 0

    [ok] = delivery_lines(relay, m.q_ok)
    reply = str(ok["reply"])
    tail = re.findall(r" <([^<>\s]+)>", reply)
    assert reply.startswith("250"), ok
    assert sorted(tail[-2:]) == sorted([m.ok, m.ok2]) and reply.endswith(">"), (
        f"delivered line's reply should end with ' <{m.ok}>' and ' <{m.ok2}>': {reply!r}")
    mixed = {f["result"]: str(f["reply"]) for f in delivery_lines(relay, m.q_mixed)}
    assert mixed.get("deferred", "").endswith(f" <{m.later}>"), mixed
    assert mixed.get("bounced", "").endswith(f" <{m.nouser}>"), mixed


# ---------------------------------------------------------------------------------------------------------
# Events: the file


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            raise AssertionError(f"events file line {n} is not JSON: {line!r}")
        assert isinstance(ev, dict), f"events file line {n} is not an object: {line!r}"
        out.append(ev)
    return out


def of(events: list[dict], qid: str) -> list[dict]:
    return [e for e in events if str(e.get("queue_id", "")).lower() == qid.lower()]


def check_common(ev: dict, qid: str) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", str(ev.get("id", ""))), f"no 128-bit hex id: {ev}"
    assert ev.get("type") in EVENT_TYPES, ev
    assert RFC3339_MS.match(str(ev.get("timestamp", ""))), f"timestamp not RFC 3339 with milliseconds: {ev}"
    assert str(ev.get("queue_id", "")).lower() == qid.lower(), ev
    assert ev.get("sender") == SENDER, ev


def with_events(events: dict):
    def edit(cfg: dict) -> None:
        cfg["events"] = events
    return edit


def test_events_file_gets_accepted_then_one_outcome_event_per_recipient(relays, dns, peers, foreign, mailbox,
                                                                       tmp_path):
    path = tmp_path / "events.jsonl"
    relay = start_outbound(relays, dns, peers, name="events-file", config=with_events({"file": str(path)}))
    t = token()
    ok, later, nouser = f"ok-{t}@foreign.test", f"later-{t}@foreign.test", f"nouser-{t}@foreign.test"
    foreign.on_rcpt(later, "451 4.3.0 try again later")
    foreign.on_rcpt(nouser, "550 5.1.1 no such user")
    qid, _, msg = send(relay, [ok, later, nouser], "events")
    wait_state(relay, qid, {later: "deferred"})

    def complete():
        evs = of(read_events(path), qid)
        return evs if len(evs) >= 4 else None

    all_evs = wait_until(complete, WAIT) or of(read_events(path), qid)
    # The hard bounce also puts the address on the suppression list; a `suppressed` event for it may follow
    # the bounce (the spec lists the type without saying when it is sent), and is left out of the count.
    evs = [e for e in all_evs if e.get("type") != "suppressed"]
    types = [e.get("type") for e in all_evs]
    for i, e in enumerate(all_evs):
        if e.get("type") == "suppressed":
            assert e.get("recipient") == nouser and "bounced" in types[:i], f"unexpected suppressed event: {all_evs}"
    assert [e.get("type") for e in evs][:1] == ["accepted"], f"first event of {qid} is not 'accepted': {all_evs}"
    assert sorted(e.get("type") for e in evs[1:]) == ["bounced", "deferred", "delivered"], (
        f"want accepted, then one event per recipient (delivered, deferred, bounced); got {all_evs}")
    for e in evs:
        check_common(e, qid)
    assert len({e["id"] for e in all_evs}) == len(all_evs), f"event ids repeat: {all_evs}"

    acc = evs[0]
    assert acc.get("recipients") == 3 and acc.get("listener") == "trusted", acc
    assert isinstance(acc.get("size"), int) and len(msg) <= acc["size"] <= len(msg) + 2048, (
        f"size {acc.get('size')} for a message of {len(msg)} bytes (plus at most a Received: header)")

    outcome = {e["type"]: e for e in evs[1:]}
    [tx] = foreign.delivered_to(ok)
    d = outcome["delivered"]
    assert d.get("recipient") == ok and d.get("domain") == "foreign.test", d
    assert "mx1.foreign.test" in str(d.get("mx")), d
    assert d.get("tls") == tx.tls, f"event tls={d.get('tls')!r}, the peer saw {tx.tls!r}"
    assert str(d.get("reply", "")).startswith("250") and d.get("attempts") == 1, d

    f = outcome["deferred"]
    assert f.get("recipient") == later and str(f.get("reply", "")).startswith("451"), f
    assert f.get("class") == "soft" and f.get("category") in CATEGORIES and f.get("attempts") == 1, f

    b = outcome["bounced"]
    assert b.get("recipient") == nouser and str(b.get("reply", "")).startswith("550"), b
    assert b.get("class") == "hard" and b.get("category") == "invalid-recipient" and b.get("attempts") == 1, b


# ---------------------------------------------------------------------------------------------------------
# Events: the webhook


@pytest.fixture
def hooks():
    started: list[WebhookReceiver] = []

    def make(**kw) -> WebhookReceiver:
        r = WebhookReceiver(**kw)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def webhook_relay(relays, dns, peers, tmp_path, name: str, url: str, secret: bytes | None = None,
                  **webhook) -> tuple[Relay, Path, bytes]:
    """A relay posting events to url (and writing them to a file, the reference order); returns the secret."""
    secret = secret or f"s3cret-{token()}".encode()
    secret_file = tmp_path / f"{name}.secret"
    secret_file.write_bytes(secret + b"\n")  # the trailing newline is not part of the secret (spec)
    events_file = tmp_path / f"{name}.events.jsonl"
    cfg = {"file": str(events_file), "webhook": {"url": url, "secret_file": str(secret_file), **webhook}}
    relay = start_outbound(relays, dns, peers, name=name, config=with_events(cfg))
    return relay, events_file, secret


def send_delivered(relay, peer, n: int, tag: str) -> list[str]:
    ids = [send(relay, [f"{tag}{i}-{token()}@foreign.test"], tag)[0] for i in range(n)]
    for qid in ids:
        wait_gone(relay, qid, WAIT)
    return ids


def assert_same_stream(hook: WebhookReceiver, events_file: Path, ids: list[str], timeout: float = WAIT) -> None:
    """Wait until the endpoint has accepted the file's whole stream of events (2 per id), then compare."""

    def done():
        want = read_events(events_file)
        got = hook.delivered_events()
        return (got, want) if len(want) >= 2 * len(ids) and len(got) >= len(want) else None

    res = wait_until(done, timeout, 0.2)
    want = read_events(events_file)
    got = hook.delivered_events()
    assert res, (f"the endpoint accepted {len(got)} of the {len(want)} events in the file within {timeout}s; "
                 f"requests (n, status, events): {[(r.n, r.status, len(r.events)) for r in hook.all_requests()]}")
    assert got == want, ("the events the endpoint accepted differ from the events file (order, loss or repeats):\n"
                         f"  webhook: {[(e.get('type'), e.get('queue_id')) for e in got]}\n"
                         f"  file:    {[(e.get('type'), e.get('queue_id')) for e in want]}")
    for qid in ids:
        assert [e["type"] for e in of(got, qid)] == ["accepted", "delivered"], of(got, qid)


@pytest.mark.parametrize("key", ["text", "binary"])
def test_webhook_posts_are_json_arrays_of_events_signed_with_the_shared_secret(relays, dns, peers, foreign, hooks,
                                                                               tmp_path, key):
    hook = hooks().start()
    # A key is bytes: one that is not UTF-8 signs as it is, not as its lossy text.
    secret = b"\xff\xfe\x00k3y-" + token().encode() if key == "binary" else None
    relay, events_file, secret = webhook_relay(relays, dns, peers, tmp_path, "signed", hook.url, secret=secret)
    ids = send_delivered(relay, foreign, 2, "signed")
    assert_same_stream(hook, events_file, ids)
    for req in hook.all_requests():
        assert req.path == "/hook", req.path
        assert re.fullmatch(r"\d+", req.headers.get("x-herald-timestamp", "")), req.headers
        assert signature_ok(secret, req), (
            f"X-Herald-Signature {req.headers.get('x-herald-signature')!r} is not v1=HMAC-SHA256(secret, "
            f"'{req.headers.get('x-herald-timestamp')}.' + body) for body {req.body[:200]!r}")
        assert req.events and all(isinstance(e, dict) and e.get("type") in EVENT_TYPES for e in req.events), req.body


def test_a_failing_webhook_is_retried_until_every_event_arrives_in_order(relays, dns, peers, foreign, hooks,
                                                                         tmp_path):
    fails = 3
    hook = hooks(fail_first=fails).start()
    relay, events_file, _ = webhook_relay(relays, dns, peers, tmp_path, "retried", hook.url, batch=2)
    ids = send_delivered(relay, foreign, 4, "retry")
    assert_same_stream(hook, events_file, ids, timeout=45)
    assert sum(1 for r in hook.all_requests() if r.status == 500) == fails
    got = scrape(relay).value("herald_webhook_failures_total")
    assert got == fails, f"herald_webhook_failures_total is {got} after the endpoint answered 500 {fails} times"
    assert all(len(r.events) <= 2 for r in hook.all_requests()), "a POST carried more than batch=2 events"


def test_events_posted_while_the_endpoint_is_down_arrive_once_it_is_up(relays, dns, peers, foreign, hooks, tmp_path):
    hook = hooks()  # not started: its port refuses connections
    relay, events_file, secret = webhook_relay(relays, dns, peers, tmp_path, "down", hook.url)
    ids = send_delivered(relay, foreign, 3, "down")
    failed = wait_until(lambda: scrape(relay).value("herald_webhook_failures_total") >= 2, WAIT, 0.2)
    assert failed, f"herald_webhook_failures_total never reached 2 with the endpoint down:\n{scrape(relay).text}"
    hook.start()
    # backoff 0.5 s doubling: after a few failures the next try may be several seconds away
    assert_same_stream(hook, events_file, ids, timeout=60)
    assert all(signature_ok(secret, r) for r in hook.all_requests())


def test_a_hung_webhook_does_not_hold_up_delivery(relays, dns, peers, foreign, hooks, tmp_path):
    n = 4
    hook = hooks(hold=True).start()  # answers nothing until released
    relay, events_file, _ = webhook_relay(relays, dns, peers, tmp_path, "hung", hook.url, batch=1, timeout="60s")
    ids = send_delivered(relay, foreign, n, "hung")  # waits until each message has left the queue
    delivered = len([t for t in foreign.accepted() if "hung" in t.data.decode("utf-8", "replace")])
    received = len(hook.received_events())
    assert delivered == n, f"{delivered} of {n} messages at the peer"
    assert received < n, (f"all {n} messages delivered, yet the hung endpoint has already been sent {received} "
                          f"events with batch=1: it is not hung to the relay?")
    hook.release()
    assert_same_stream(hook, events_file, ids)


def test_when_the_buffer_overflows_the_oldest_events_are_dropped_and_counted(relays, dns, peers, foreign, hooks,
                                                                            tmp_path):
    hook = hooks()  # down at first
    relay, events_file, _ = webhook_relay(relays, dns, peers, tmp_path, "overflow", hook.url, buffer=2)
    ids = send_delivered(relay, foreign, 3, "overflow")
    total = 2 * len(ids)
    dropped = wait_until(lambda: scrape(relay).value("herald_events_dropped_total") >= total - 2, WAIT, 0.2)
    assert dropped, f"herald_events_dropped_total never reached {total - 2}:\n{scrape(relay).text}"
    hook.start()
    want = read_events(events_file)
    assert len(want) == total, want
    got = wait_until(lambda: hook.delivered_events() if len(hook.delivered_events()) >= 2 else None, 60, 0.2)
    assert got == want[-2:], (f"with buffer=2 the endpoint should get the newest 2 events: got "
                              f"{[(e.get('type'), e.get('queue_id')) for e in got or []]}, file ends with "
                              f"{[(e.get('type'), e.get('queue_id')) for e in want[-2:]]}")
    assert scrape(relay).value("herald_events_dropped_total") == total - 2


def test_sigterm_delivers_the_events_still_waiting_for_the_webhook(relays, dns, peers, foreign, hooks, tmp_path):
    fails = 3  # after the third failure the next try is 2 s away: SIGTERM comes first
    hook = hooks(fail_first=fails).start()
    relay, events_file, _ = webhook_relay(relays, dns, peers, tmp_path, "flush", hook.url)
    ids = send_delivered(relay, foreign, 2, "flush")
    ok = wait_until(lambda: scrape(relay).value("herald_webhook_failures_total") >= fails, WAIT, 0.05)
    assert ok, f"the endpoint never failed {fails} times: {[(r.n, r.status) for r in hook.all_requests()]}"
    accepted_before = len(hook.delivered_events())
    assert relay.stop() == 0
    got, want = hook.delivered_events(), read_events(events_file)
    assert len(want) == 2 * len(ids), want
    assert got == want, (f"after SIGTERM the endpoint has {len(got)} of the {len(want)} events "
                         f"({accepted_before} before the signal)")
