#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/) and the dictionaries (fuzz/dict/) from the hand-made
inputs below, in each target's input format (the `//!` comment of fuzz/fuzz_targets/<target>.rs says it).

The seeds are committed; run this again after changing an input format or adding a seed, and commit what
changed. It replaces the directories it writes, so nothing the fuzzer found ends up there.
"""

import hmac
import hashlib
import re
import shutil
import struct
import zlib
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
# The key and return path of herald_fuzz::return_paths().
KEY = b"fuzz-key-0123456789abcdef"
RETURN_PATH = "bounces.example.test"


def write(target, seeds):
    d = FUZZ / "corpus" / target
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name, data in seeds.items():
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def token(queue_id, rcpt, embed=True):
    """The return-path local part the relay makes (relay/src/outcome/verp.rs)."""
    mac = hmac.new(KEY, struct.pack(">Q", queue_id) + b"\0" + rcpt.lower().encode(), hashlib.sha256)
    local = f"b+{queue_id:016x}-{mac.hexdigest()[:10]}"
    if embed:
        l, d = rcpt.rsplit("@", 1)
        local += f"-{l}={d}"
    return local


COMMANDS = {
    "ehlo": "EHLO client.example.test",
    "helo": "helo client",
    "mail": "MAIL FROM:<sender@example.test> SIZE=1000 BODY=8BITMIME",
    "mail_null": "MAIL FROM:<>",
    "mail_utf8": "MAIL FROM:<jöran@bücher.test> SMTPUTF8 AUTH=<>",
    "mail_space": "mail from: <a@[192.0.2.1]>",
    "rcpt": "RCPT TO:<user@example.net>",
    "rcpt_route": "RCPT TO:<@relay.test,@other.test:user@example.net>",
    "rcpt_quoted": 'RCPT TO:<"odd >local"@[IPv6:2001:db8::1]>',
    "data": "DATA",
    "bdat": "BDAT 100 LAST",
    "bdat_more": "bdat 0",
    "rset": "RSET",
    "noop": "NOOP ignored",
    "quit": "QUIT",
    "vrfy": "VRFY postmaster",
    "expn": "EXPN list",
    "help": "HELP",
    "starttls": "STARTTLS",
    "auth_plain": "AUTH PLAIN AGFwcABzZWNyZXQ=",
    "auth_login": "AUTH LOGIN",
}

ADDRESSES = {
    "plain": "<user@example.net> SIZE=10",
    "null": "<>",
    "quoted": '<"a>b\\"c"@x.test> BODY=7BIT',
    "route": "<@a.test,@b.test:u@c.test>",
    "v4": "<u@[192.0.2.1]>",
    "v6": "<u@[IPv6:2001:db8::1]>",
    "utf8": "<jöran@bücher.test>",
    "mailbox": "first.last+tag@sub.example.test",
    "domain": "mx-1.example.test",
}

HEADER_DEFAULT = bytes([0, 0xE8, 0x03, 4, 10, 0xFF, 0, 0]) + bytes([0xFF] * 8)


def session_header(flags=0, size=999, rcpts=4, errors=10, line=255, outcomes=0, reads=(0xFF,) * 8):
    return bytes([flags]) + struct.pack("<H", size) + bytes([rcpts, errors, line - 8]) + \
        struct.pack("<H", outcomes) + bytes(reads)


def crlf(*lines):
    return ("\r\n".join(lines) + "\r\n").encode()


SESSIONS = {
    "data": session_header() + crlf(
        "EHLO client.test", "MAIL FROM:<a@example.test> SIZE=20", "RCPT TO:<b@example.net>",
        "RCPT TO:<rejected@relay.example>", "DATA", "Subject: hi", "", "..dot", ".", "QUIT"),
    "pipelined_small_reads": session_header(reads=(0, 2, 6, 1, 30, 3, 0, 12)) + crlf(
        "EHLO c", "MAIL FROM:<>", "RCPT TO:<x@y.test>", "DATA", "body", ".", "RSET", "NOOP", "QUIT"),
    "bdat": session_header(outcomes=1) + crlf("EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>") +
    b"BDAT 7\r\nline\r\nxBDAT 3 LAST\r\nyz\nQUIT\r\n",
    "helo_errors": session_header(errors=3) + crlf(
        "HELO c", "MAIL FROM:<a@b.test> BODY=8BITMIME", "RCPT TO:<c@d.test>", "DATA", "VRFY x", "EXPN y",
        "HELP", "BOGUS", "MAIL FROM:<a@e.test>"),
    "limits": session_header(size=10, rcpts=1, line=20) + crlf(
        "EHLO c", "MAIL FROM:<a@b.test> SIZE=99999999999999999999", "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@d.test>", "RCPT TO:<e@d.test>", "DATA", "a line longer than twenty octets", ".",
        "x" * 40, "QUIT"),
    "starttls_auth_plain": session_header(flags=3) + crlf(
        "EHLO c", "MAIL FROM:<a@b.test>", "STARTTLS", "EHLO c", "AUTH PLAIN AGFwcABzZWNyZXQ=",
        "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "DATA", "x", ".", "QUIT"),
    "implicit_tls_auth_login": session_header(flags=6, outcomes=0b0001) + crlf(
        "EHLO c", "AUTH LOGIN", "YXBw", "c2VjcmV0", "AUTH LOGIN YXBw", "*", "AUTH PLAIN", "=",
        "AUTH CRAM-MD5", "QUIT"),
    "utf8": session_header(flags=8) + crlf(
        "EHLO c", "MAIL FROM:<jöran@bücher.test>", "MAIL FROM:<jöran@bücher.test> SMTPUTF8",
        "RCPT TO:<ü@example.test>", "RSET"),
    "smuggling": session_header() + crlf("EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "DATA") +
    b"a\n.\nMAIL FROM:<x@y.test>\r\n.\r\n",
}

BODIES = {
    "stuffed": struct.pack("<H", 999) + bytes([97, 0]) + b"Subject: x\r\n\r\n..one\r\n.\r\n",
    "cut": struct.pack("<H", 999) + bytes([97, 3, 1, 4, 2]) + b"a\r\n..b\r\nc\r\n.\r\nMAIL",
    "bare_lf": struct.pack("<H", 999) + bytes([97, 1, 3]) + b"a\n.\nb\r\n.\r\n",
    "long_line": struct.pack("<H", 999) + bytes([7, 2, 5, 5]) + b"0123456789abc\r\nok\r\n.\r\n",
    "too_big": struct.pack("<H", 8) + bytes([97, 0]) + b"0123456789\r\n.\r\n",
    "cr_across_chunks": struct.pack("<H", 999) + bytes([97, 2, 2, 1]) + b"a\r\nb\r\n",
}


def frame(kind, payload):
    return bytes([0xE7, kind]) + struct.pack("<II", len(payload), zlib.crc32(bytes([kind]) + payload)) + payload


def pstr(s):
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def message(qid, rcpts, data, auth=""):
    p = struct.pack("<QQB", qid, 1_700_000_000_000, 3) + pstr("trusted") + pstr(auth) + \
        pstr("127.0.0.1:4000") + pstr("a@b.test") + struct.pack("<I", len(rcpts))
    for i, r in enumerate(rcpts):
        p += pstr(r) + struct.pack("<BHQ", i % 5, i, 1_700_000_060_000 * i)
    return frame(1, p + struct.pack("<Q", len(data)) + data)


SPOOL = {
    "message": message(0x1234, ["x@y.test", "z@y.test"], b"Received: x\r\n\r\nbody\r\n"),
    "message_auth": message(7, ["u@example.net"], b"", auth="app"),
    "results": frame(2, struct.pack("<QI", 0x1234, 2) + struct.pack("<IBHQ", 0, 2, 1, 0) +
                     struct.pack("<IBHQ", 1, 1, 3, 1_700_000_000_000)),
    "delete": frame(3, struct.pack("<Q", 0x1234)),
}
SEGMENT = SPOOL["message"] + SPOOL["message_auth"] + SPOOL["results"] + message(9, ["q@example.net"], b"x\r\n")
SPOOL["segment"] = SEGMENT
# A flipped bit in the second record's body, and a torn tail.
SPOOL["segment_damaged"] = SEGMENT[:len(SPOOL["message"]) + 20] + bytes([SEGMENT[len(SPOOL["message"]) + 20] ^ 0x10]) + \
    SEGMENT[len(SPOOL["message"]) + 21:-5]

DESIGN_CONFIG = """hostname: relay.example.test
spool_dir: /var/lib/herald/spool
listeners:
  - name: submission
    address: 0.0.0.0:587
    tls: starttls
    auth: required
  - name: trusted
    address: 0.0.0.0:2525
    auth: none
    allow_networks: [10.0.0.0/8]
tls: { cert_file: /etc/herald/tls/tls.crt, key_file: /etc/herald/tls/tls.key }
users:
  - username: app
    password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$5gqTt8S6NUXAwTCq+3eE1QKqPzB3P7vQ5ny1dB1Hd5w"
    allowed_domains: [example.test]
domains:
  - name: example.test
    dkim: { selector: herald1, algorithm: rsa-sha256, key_file: /etc/herald/dkim/example.test.pem }
    return_path: bounces.example.test
    ip_pool: default
bounces:
  secret_file: /etc/herald/bounces/keys
  mailboxes: [postmaster, fbl]
  rules:
    - { status: "5.7.26", category: policy }
    - { code: 550, text: ["mailbox (is )?unavailable", "no such user"], category: invalid-recipient }
ip_pools:
  - name: default
    sources: [ { address: 0.0.0.0, ehlo: relay.example.test } ]
delivery:
  dns: { nameservers: ["127.0.0.1:5353"] }
  port: 25
  smarthost: null
  retry: { first: 1m, max: 4h, factor: 2.0 }
  max_age: 5d
  per_domain: { max_connections: 10, messages_per_connection: 100 }
limits: { max_message_size: 10485760, max_recipients: 100, command_timeout: 5m }
admin: { address: 127.0.0.1:9090 }
"""


def config_seeds():
    default = re.search(r'DEFAULT_CONFIG: &str = r#"\n(.*?)"#;', (ROOT / "config/src/file.rs").read_text(), re.S)
    return {
        "default.yaml": default.group(1),
        "local.yaml": (ROOT / "examples/local/relay.yaml").read_text(),
        "design.yaml": DESIGN_CONFIG,
        "flow.yaml": "{hostname: h, spool_dir: s, listeners: [{name: x, address: '[::1]:25'}]}\n",
    }


def report_seeds():
    rcpt = "user@example.net"
    local = token(1, rcpt)
    values = {
        "date": "Mon, 1 Jan 2024 00:00:00 +0000", "recipient": rcpt, "report_to": f"{local}@{RETURN_PATH}",
        "return_path": f"{local}@{RETURN_PATH}", "domain": "example.net", "local": "user",
        "feedback_type": "abuse", "marker": "m1", "message_id": "id1@example.test", "mta": "mx.example.net",
        "remote_ip": "192.0.2.25", "remote_mta": "mx.example.net", "status": "5.1.1",
        "diagnostic": "550 5.1.1 The email account that you tried to reach does not exist",
        "final": rcpt, "subject": "Hello", "who": "example.net",
    }
    seeds = {}
    for f in sorted((ROOT / "tests/fixtures/reports").glob("*.eml")):
        text = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], f.read_text())
        seeds[f.name] = text.replace("\r\n", "\n").replace("\n", "\r\n")
    return seeds


VERP = {
    "embedded": struct.pack("<Q", 1) + token(1, "user@example.net").encode(),
    "long": struct.pack("<Q", 2) + token(2, "a.very.long.recipient.local.part.indeed@example-mail.test", False).encode(),
    "mailbox": struct.pack("<Q", 0xFFFFFFFFFFFFFFFF) + "Jo.Smith=x@gmail.test".encode(),
    "quoted": struct.pack("<Q", 3) + b'"a b"@[192.0.2.1]',
    "postmaster": struct.pack("<Q", 0) + b"postmaster",
}

SMTP_WORDS = ["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "BDAT", "LAST", "RSET", "NOOP", "QUIT",
              "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH", "PLAIN", "LOGIN", "SIZE=", "BODY=", "8BITMIME",
              "7BIT", "SMTPUTF8", "AUTH=", "<>", "\r\n", "\r\n.\r\n", "[IPv6:", "@", ".", "\"", "\\"]


def dict_file(words):
    def esc(w):
        return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\x{ord(c):02X}" for c in w)
    return "".join(f'"{esc(w)}"\n' for w in words)


def main():
    write("smtp_command", COMMANDS)
    write("address", ADDRESSES)
    write("smtp_session", SESSIONS)
    write("body_framing", BODIES)
    write("spool_record", SPOOL)
    write("config", config_seeds())
    write("report", report_seeds())
    write("verp", VERP)
    keys = sorted(set(re.findall(r"pub ([a-z_0-9]+):", (ROOT / "config/src/file.rs").read_text())))
    words = {
        "smtp_command": SMTP_WORDS,
        "smtp_session": SMTP_WORDS,
        "config": [f"{k}: " for k in keys] + ["starttls", "implicit", "required", "opportunistic",
                                              "rsa-sha256", "ed25519-sha256", "{ ", " }", "[", "]", "- ",
                                              "\n  ", "127.0.0.1:25", "10.0.0.0/8", "5m", "null"],
        "report": ["Content-Type: ", "multipart/report", "report-type=delivery-status",
                   "report-type=feedback-report", "message/delivery-status", "message/feedback-report",
                   "message/rfc822", "text/rfc822-headers", "message/global-delivery-status",
                   "boundary=", "Final-Recipient: rfc822;", "Original-Recipient: rfc822;", "Action: failed",
                   "Action: delayed", "Status: 5.1.1", "Diagnostic-Code: smtp;", "Feedback-Type: abuse",
                   "Original-Mail-From: ", "Original-Rcpt-To: ", "Return-Path: ", "X-Failed-Recipients: ",
                   f"@{RETURN_PATH}", "user@example.net", "\r\n\r\n", "--"],
    }
    d = FUZZ / "dict"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for target, ws in words.items():
        (d / f"{target}.dict").write_text(dict_file(ws))


if __name__ == "__main__":
    main()
