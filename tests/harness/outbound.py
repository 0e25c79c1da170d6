"""Plumbing for the delivery tests: a relay whose delivery goes to the test DNS server and peers, submitting
mail, reading per-recipient state from the queue API, the `delivery` log events, and parsing DSNs.

The relay under test resolves through `harness.dns.DnsServer` and delivers to `harness.peers` on one port
(`delivery.port`), with JSON logs so that each `delivery` event can be read field by field. Every wait here
is bounded in time and polls at a fixed step.
"""

from __future__ import annotations

import copy
import datetime
import email
import email.message
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .relay import Relay, RelayPool
from .smtp import SmtpConn, make_message

# The usual peers: foreign.test's MX, and example.test's (the envelope sender's mailbox, where DSNs arrive).
FOREIGN = "127.0.0.2"
MAILBOX = "127.0.0.3"
SENDER = "a@example.test"  # example.test is a configured sending domain; its MX is the "mailbox" peer
WAIT = 30.0  # default bound for "the relay gets round to it" (debug build, 2 cores, other tests' relays)


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def wait_until(pred: Callable[[], Any], timeout: float = WAIT, step: float = 0.05) -> Any:
    """Poll pred until it returns something truthy (returned) or timeout passes (then one last try)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def delivery_section(dns_address: str, port: int, **over) -> dict:
    """The `delivery:` config for tests: the test resolver, the peers' port, short timeouts, and a first retry
    an hour away (tests about retries set their own), so that a deferred recipient stays deferred."""
    base = {
        "dns": {"nameservers": [dns_address]},
        "port": port,
        "tls": "opportunistic",
        "retry": {"first": "1h", "max": "4h", "factor": 2.0},
        "max_age": "5d",
        "per_domain": {"max_connections": 10, "messages_per_connection": 100},
        "timeouts": {"connect": "3s", "command": "30s", "data": "30s"},
    }
    return merge(base, over)


def start_outbound(relays: RelayPool, dns, peers, name: str = "out", delivery: dict | None = None,
                   config: Callable[[dict], None] | None = None, **kw) -> Relay:
    """A relay with the standard listeners whose delivery goes to `dns` and the `peers` port; JSON logs.
    `config` may edit the whole config dict before start (ip_pools, domains...)."""
    cfg = relays.config(name, **kw)
    cfg["delivery"] = delivery_section(dns.address, peers.port, **(delivery or {}))
    if config is not None:
        config(cfg)
    return relays.start(name, config=cfg, extra_args=["--log-format", "json"])


# ---------------------------------------------------------------------------------------------------------
# Submitting


def submit(relay: Relay, rcpts: list[str], message: bytes, sender: str = SENDER, listener: str = "trusted",
           mail_params: str = "", rcpt_params: dict[str, str] | None = None) -> str:
    """One transaction on a listener (each step must succeed); returns the queue id. `rcpt_params`: the
    parameters to give on a recipient's RCPT, by recipient."""
    host, port = relay.listener(listener)
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect(f"MAIL FROM:<{sender}>{' ' + mail_params if mail_params else ''}", "250 ")
        for r in rcpts:
            params = (rcpt_params or {}).get(r)
            c.expect(f"RCPT TO:<{r}>{' ' + params if params else ''}", "250 ")
        end = c.data(message)
        assert end.queue_id, f"message not queued: {end}\n{c.dump()}"
        c.cmd("QUIT")
        return end.queue_id


def send(relay: Relay, rcpts: list[str], tag: str = "msg", sender: str = SENDER, body: str | bytes = "hello\r\n",
         extra_headers: list[str] | None = None, mail_params: str = "",
         rcpt_params: dict[str, str] | None = None) -> tuple[str, str, bytes]:
    """Submit a fresh message whose Subject and Message-ID hold a unique marker: (queue id, marker, bytes)."""
    marker = unique(tag)
    msg = make_message(marker, body=body, sender=sender, to=rcpts[0], extra_headers=extra_headers)
    qid = submit(relay, rcpts, msg, sender=sender, mail_params=mail_params, rcpt_params=rcpt_params)
    return qid, marker, msg


# ---------------------------------------------------------------------------------------------------------
# Queue API


def get_message(relay: Relay, qid: str) -> dict | None:
    """GET /queue/{id}: the message object, or None on 404 (anything else fails the test)."""
    status, body = relay.http("GET", f"/queue/{qid}")
    if status == 404:
        return None
    assert status == 200, f"GET /queue/{qid} -> {status}: {body[:300]!r}"
    return json.loads(body)


def states(relay: Relay, qid: str) -> dict[str, dict] | None:
    """recipient -> its status entry (state, attempts, next_attempt, last_reply); None if the message is gone."""
    m = get_message(relay, qid)
    if m is None:
        return None
    assert isinstance(m.get("status"), list), f"/queue/{qid} has no status list: {m}"
    return {s["recipient"]: s for s in m["status"]}


def wait_gone(relay: Relay, qid: str, timeout: float = WAIT) -> None:
    ok = wait_until(lambda: get_message(relay, qid) is None, timeout, step=0.1)
    assert ok, f"message {qid} still in the queue after {timeout}s: {get_message(relay, qid)}\n{relay.log_tail(40)}"


def wait_state(relay: Relay, qid: str, want: dict[str, str], timeout: float = WAIT) -> dict[str, dict]:
    """Wait until every recipient in `want` has the given state (and has been attempted for 'deferred')."""

    def check():
        s = states(relay, qid)
        if s is None:
            return None
        for rcpt, state in want.items():
            e = s.get(rcpt)
            if e is None or e["state"] != state:
                return None
            if state == "deferred" and not e.get("attempts"):
                return None
        return s

    got = wait_until(check, timeout, step=0.1)
    assert got, f"{qid}: wanted {want}, queue says {states(relay, qid)}\n{relay.log_tail(40)}"
    return got


def flush(relay: Relay, qid: str | None = None) -> None:
    path = f"/queue/{qid}/flush" if qid else "/queue/flush"
    status, body = relay.http("POST", path)
    assert status == 200, f"POST {path} -> {status}: {body[:300]!r}"


# ---------------------------------------------------------------------------------------------------------
# Log events


def log_records(relay: Relay) -> list[dict]:
    out = []
    for line in relay.log_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def delivery_events(relay: Relay, qid: str | None = None) -> list[dict]:
    """The fields of every `delivery` log event (tracing JSON: {"fields": {"message": "delivery", ...}})."""
    out = []
    for rec in log_records(relay):
        f = rec.get("fields") if isinstance(rec.get("fields"), dict) else rec
        if str(f.get("message", "")).split(" ")[0] != "delivery" or "result" not in f:
            continue
        if qid is not None and str(f.get("queue_id", "")).lower() != qid.lower():
            continue
        out.append(f)
    return out


def wait_event(relay: Relay, qid: str, result: str, timeout: float = WAIT) -> dict:
    ev = wait_until(lambda: [e for e in delivery_events(relay, qid) if e.get("result") == result], timeout, 0.1)
    assert ev, f"no 'delivery' event with result={result} for {qid}: {delivery_events(relay, qid)}\n{relay.log_tail(40)}"
    return ev[0]


# ---------------------------------------------------------------------------------------------------------
# DSNs


@dataclass
class Dsn:
    msg: email.message.Message
    explanation: str  # the text/plain part
    per_message: email.message.Message  # first block of message/delivery-status
    per_recipient: list[email.message.Message]
    headers: str  # the returned message: the text/rfc822-headers part, or the message/rfc822 one (RET=FULL)
    returned_type: str  # text/rfc822-headers or message/rfc822

    def recipient(self, addr: str) -> email.message.Message:
        for r in self.per_recipient:
            if r.get("Final-Recipient", "").split(";", 1)[-1].strip().lower() == addr.lower():
                return r
        raise AssertionError(f"no per-recipient block for {addr} in {[str(r) for r in self.per_recipient]}")

    @property
    def final_recipients(self) -> list[str]:
        return sorted(r.get("Final-Recipient", "").split(";", 1)[-1].strip().lower() for r in self.per_recipient)


def parse_dsn(data: bytes) -> Dsn:
    """Parse an RFC 3464 report; assert the structure the delivery spec gives (parts in order)."""
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "multipart/report", f"DSN content type {msg.get_content_type()}\n{data[:800]!r}"
    assert (msg.get_param("report-type") or "").lower() == "delivery-status", msg["Content-Type"]
    parts = msg.get_payload()
    types = [p.get_content_type() for p in parts]
    assert types[:2] == ["text/plain", "message/delivery-status"] and len(types) == 3 and types[2] in (
        "text/rfc822-headers", "message/rfc822"), f"DSN parts: {types}"
    status = parts[1].get_payload()
    # Python parses message/delivery-status into a list of header blocks: per-message, then per-recipient.
    assert isinstance(status, list) and len(status) >= 2, f"delivery-status blocks: {status!r}"
    if types[2] == "message/rfc822":
        # Python parses it into a list of one Message.
        headers_part = parts[2].get_payload()[0].as_bytes()
    else:
        headers_part = parts[2].get_payload(decode=True) or b""
    return Dsn(
        msg=msg,
        explanation=(parts[0].get_payload(decode=True) or b"").decode("utf-8", "replace"),
        per_message=status[0],
        per_recipient=list(status[1:]),
        headers=headers_part.decode("utf-8", "replace"),
        returned_type=types[2],
    )


def dsns(peer) -> list:
    """Transactions at a peer that are DSNs (null reverse path)."""
    return [t for t in peer.accepted() if t.mail_from == ""]


def dsn_about(peer, marker: str) -> list:
    """DSN transactions at peer whose returned headers mention marker."""
    return [t for t in dsns(peer) if marker.encode() in t.data]


def wait_dsn(peer, marker: str, timeout: float = WAIT) -> list:
    """The DSN transactions about marker at peer, once there is at least one."""
    got = wait_until(lambda: dsn_about(peer, marker), timeout, 0.1)
    assert got, f"no DSN about {marker} at {peer}: {[(t.mail_from, t.rcpt_tos) for t in peer.transactions]}"
    return got


def rfc3339(s: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def status_field(block: email.message.Message) -> str:
    return (block.get("Status") or "").split()[0] if block.get("Status") else ""
