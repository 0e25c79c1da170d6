"""Reports that come back to return-path addresses, for the feedback tests: return-path tokens recomputed
from their definition (independently of the relay), real-world-shaped reports built from the templates in
`tests/fixtures/reports/`, and an SMTP client that hands them to the relay as a remote MTA would.

A token is the local part `b+<16 hex queue id>-<10 hex mac>[-<local>=<domain>]` at the sending domain's
return-path domain; mac is the first 5 bytes of HMAC-SHA256(key, queue id as 8 bytes big-endian || NUL ||
lower-cased recipient), in lower-case hex; the recipient rides along when the whole local part still fits
RFC 5321's 64 octets. The tests compare what a peer received with what is computed here, so forged tokens
made here are forged in exactly one respect.

The templates are written for these tests in the shape their senders use (a Gmail DSN, an Exchange Online
NDR, Postfix bounce and delay notices, a classic Exim bounce, a qmail failure notice, Yahoo's and Outlook.com's
feedback-loop reports, a generic RFC 5965 report, out-of-office replies). They are `string.Template` files
with LF line ends; `build()` fills them and sends CRLF, as SMTP carries them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import hashlib
import hmac
import re
import smtplib
from pathlib import Path
from string import Template

from .relay import BOUNCE_KEY, Relay

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reports"
RETURN_PATH_DOMAIN = "bounces.example.test"  # example.test's return_path in the standard config
OTHER_KEY = "not-the-relay-key-but-long-enough"  # a key the relay does not have
MAILBOXES = ("postmaster", "abuse", "fbl")  # accepted at the return-path domain without a token

_MAX_LOCAL_PART = 64
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_TOKEN = re.compile(r"^b\+([0-9a-fA-F]{16})-([0-9a-fA-F]{10})(?:-(.+)=([^=@]+))?@(.+)$")


# ---------------------------------------------------------------------------------------------------------
# Tokens


def mac(queue_id: str, recipient: str, key: str = BOUNCE_KEY) -> str:
    """The 10 hex digit MAC of a token for message `queue_id` (hex) and `recipient`."""
    msg = int(queue_id, 16).to_bytes(8, "big") + b"\0" + recipient.lower().encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Token:
    queue_id: str  # 16 hex digits
    mac: str
    recipient: str | None  # None: not carried (the report has to name it)
    domain: str = RETURN_PATH_DOMAIN

    @property
    def address(self) -> str:
        local = f"b+{self.queue_id}-{self.mac}"
        if self.recipient is not None:
            rl, _, rd = self.recipient.rpartition("@")
            local += f"-{rl}={rd}"
        return f"{local}@{self.domain}"

    @classmethod
    def parse(cls, address: str) -> "Token":
        m = _TOKEN.match(address)
        assert m, f"not a return-path token: {address!r}"
        rcpt = f"{m.group(3)}@{m.group(4)}" if m.group(3) else None
        return cls(m.group(1), m.group(2), rcpt, m.group(5))

    def replace(self, **changes) -> "Token":
        return dataclasses.replace(self, **changes)


def token(queue_id: str, recipient: str, key: str = BOUNCE_KEY, domain: str = RETURN_PATH_DOMAIN) -> Token:
    """The token the relay should write for `recipient` of message `queue_id` (with `key`)."""
    qid = f"{int(queue_id, 16):016x}"
    m = mac(qid, recipient, key)
    rl, _, rd = recipient.rpartition("@")
    embedded = f"b+{qid}-{m}-{rl}={rd}"
    fits = len(embedded) <= _MAX_LOCAL_PART and _DOT_ATOM.fullmatch(embedded) and not set("%!") & set(embedded)
    return Token(qid, m, recipient if fits else None, domain)


def other_queue_id(queue_id: str) -> str:
    """The same queue id with its last bit flipped."""
    return f"{int(queue_id, 16) ^ 1:016x}"


def mailbox(local: str) -> str:
    return f"{local}@{RETURN_PATH_DOMAIN}"


# ---------------------------------------------------------------------------------------------------------
# Reports


def build(template: str, *, report_to: str, recipient: str, return_path: str, subject: str = "Weekly news",
          message_id: str = "weekly-news@client.example.test", **fields: str) -> bytes:
    """The report `template` (a file name without .eml) about `recipient` of a message sent with envelope
    sender `return_path`, addressed to `report_to`. Postfix templates take status and diagnostic; `final`
    (the address the remote MTA gave up on, when a forwarder expanded `recipient`), `mta`, `remote_mta`,
    `remote_ip` and `feedback_type` have defaults."""
    local, _, domain = recipient.rpartition("@")
    final = fields.pop("final", recipient)
    values = {
        "date": email.utils.formatdate(),
        "marker": message_id.partition("@")[0],
        "mta": f"mx.{domain}",
        "remote_mta": f"mailstore.{domain}",
        "remote_ip": "192.0.2.25",
        "feedback_type": "abuse",
        "final": final,
        "who": f"<{final}>" if final == recipient else f"<{final}> (expanded from <{recipient}>)",
        **fields,
        "report_to": report_to,
        "recipient": recipient,
        "local": local,
        "domain": domain,
        "return_path": return_path,
        "subject": subject,
        "message_id": message_id,
    }
    text = Template((FIXTURES / f"{template}.eml").read_text()).substitute(values)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


# ---------------------------------------------------------------------------------------------------------
# SMTP, as a remote MTA sending a report (null reverse path)


@contextlib.contextmanager
def _null_sender(relay: Relay, listener: str):
    host, port = relay.listener(listener)
    with smtplib.SMTP(host, port, local_hostname="mx.reporter.test", timeout=60) as s:
        s.ehlo()
        code, text = s.mail("")
        assert code == 250, f"MAIL FROM:<> -> {code} {text!r}"
        yield s


def rcpt_reply(relay: Relay, rcpt: str, listener: str = "inbound") -> tuple[int, str]:
    """MAIL FROM:<> and RCPT TO:<rcpt> on a listener: the reply to the RCPT."""
    with _null_sender(relay, listener) as s:
        code, text = s.rcpt(rcpt)
        s.rset()
        return code, text.decode("utf-8", "replace")


def send_report(relay: Relay, rcpt: str, data: bytes, listener: str = "inbound") -> tuple[int, str]:
    """Deliver a report to `rcpt` (MAIL FROM:<>): the reply to the end of data. A refused RCPT fails the test."""
    with _null_sender(relay, listener) as s:
        code, text = s.rcpt(rcpt)
        assert code == 250, f"RCPT TO:<{rcpt}> -> {code} {text!r}"
        code, text = s.data(data)
        return code, text.decode("utf-8", "replace")
