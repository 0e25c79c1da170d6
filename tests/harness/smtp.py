"""A raw-socket SMTP client for tests that need byte-exact control (pipelining, BDAT, smuggling, TLS).

smtplib hides what goes on the wire and normalises line endings, so the protocol tests use this instead: the
caller decides every byte sent; replies are parsed into (code, lines). Every read has a timeout.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass

from .relay import QUEUED_RE

READ_TIMEOUT = 20.0  # generous: argon2 verification in a debug build is slow

ENHANCED_RE = re.compile(r"^\d{3}[ -](\d)\.(\d{1,3})\.(\d{1,3})(\s|$)")


class ConnectionClosed(AssertionError):
    """The server closed the connection before a complete reply arrived."""


@dataclass
class Reply:
    code: int
    lines: list[str]  # text of each line without the "250-" / "250 " prefix

    @property
    def raw(self) -> list[str]:
        return [f"{self.code}{'-' if i < len(self.lines) - 1 else ' '}{l}" for i, l in enumerate(self.lines)]

    @property
    def last(self) -> str:
        """The final line including the code, e.g. '250 2.0.0 Ok: queued as 0123456789ABCDEF'."""
        return self.raw[-1]

    @property
    def enhanced(self) -> str | None:
        m = ENHANCED_RE.match(self.last)
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None

    def starts(self, prefix: str) -> bool:
        """True if the final line starts with prefix, e.g. '554 5.6.0'."""
        return self.last.startswith(prefix)

    @property
    def queue_id(self) -> str | None:
        m = QUEUED_RE.match(self.last)
        return m.group(1) if m else None

    def keywords(self) -> list[str]:
        """EHLO keywords (upper-cased lines after the first)."""
        return [l.upper() for l in self.lines[1:]]

    def __str__(self) -> str:
        return " | ".join(self.raw)


class SmtpConn:
    def __init__(
        self,
        host: str,
        port: int,
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = READ_TIMEOUT,
        source: str | None = None,
    ):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0) if source else None)
        self.sock.settimeout(timeout)
        if tls_context is not None:
            self.sock = tls_context.wrap_socket(self.sock, server_hostname=server_hostname or host)
        self.buf = b""
        self.transcript: list[str] = []

    # -- I/O -------------------------------------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(f"C: {data[:200]!r}{'...' if len(data) > 200 else ''}")
        self.sock.sendall(data)

    def _fill(self, timeout: float | None) -> bool:
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError) as e:
            self.transcript.append(f"S: <{e!r}>")
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_line(self, timeout: float | None = None) -> str:
        while b"\n" not in self.buf:
            if not self._fill(timeout):
                raise ConnectionClosed(f"connection closed; partial={self.buf!r}\n" + self.dump())
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def read_reply(self, timeout: float | None = None) -> Reply:
        lines: list[str] = []
        code = None
        for _ in range(1000):  # bounded: no sane reply has more lines
            line = self.read_line(timeout)
            self.transcript.append(f"S: {line}")
            m = re.match(r"^(\d{3})([ -])(.*)$", line)
            assert m, f"malformed reply line {line!r}\n" + self.dump()
            if code is None:
                code = int(m.group(1))
            assert int(m.group(1)) == code, f"code changed inside a multi-line reply: {line!r}"
            lines.append(m.group(3))
            if m.group(2) == " ":
                return Reply(code, lines)
        raise AssertionError("reply with more than 1000 lines")

    def cmd(self, line: str | bytes, timeout: float | None = None) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def expect(self, line: str | bytes, prefix: str, timeout: float | None = None) -> Reply:
        r = self.cmd(line, timeout)
        assert r.starts(prefix), f"{line!r}: expected {prefix!r}, got {r}\n" + self.dump()
        return r

    def expect_reply(self, prefix: str, what: str = "", timeout: float | None = None) -> Reply:
        r = self.read_reply(timeout)
        assert r.starts(prefix), f"{what}: expected {prefix!r}, got {r}\n" + self.dump()
        return r

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True if the server closes the connection within timeout (bytes that arrive first are kept in buf)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(max(0.05, deadline - time.monotonic())):
                    return True
            except (TimeoutError, socket.timeout):
                return False
            except OSError:
                return True
        return False

    def dump(self) -> str:
        return "transcript:\n  " + "\n  ".join(self.transcript[-40:])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "SmtpConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- SMTP steps ------------------------------------------------------------------------------------

    def greeting(self) -> Reply:
        return self.expect_reply("220 ", "greeting")

    def ehlo(self, name: str = "client.example.test") -> Reply:
        return self.expect(f"EHLO {name}", "250")

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        self.expect("STARTTLS", "220 2.0.0")
        assert self.buf == b"", f"server sent bytes after 220 to STARTTLS: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.transcript.append("-- TLS established --")

    def data(self, message: bytes, stuff: bool = True) -> Reply:
        """DATA, wait for 354, send message (dot-stuffed unless stuff=False) and the terminator; return the reply."""
        self.expect("DATA", "354")
        self.send((dot_stuff(message) if stuff else message) + b".\r\n")
        return self.read_reply()

    def transaction(self, sender: str, rcpts: list[str], message: bytes) -> Reply:
        """MAIL/RCPT/DATA one step at a time, each step must succeed; returns the end-of-data reply."""
        self.expect(f"MAIL FROM:<{sender}>", "250 2.1.0")
        for r in rcpts:
            self.expect(f"RCPT TO:<{r}>", "250 2.1.5")
        return self.data(message)


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, and make sure the message ends in CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    out = b"\r\n".join((b"." + l if l.startswith(b".") else l) for l in message.split(b"\r\n"))
    return out


def make_message(
    subject: str,
    body: str | bytes = "hello\r\n",
    sender: str = "a@example.test",
    to: str = "x@foreign.test",
    extra_headers: list[str] | None = None,
    message_id: bool = True,
    date: bool = True,
) -> bytes:
    hdrs = [f"From: <{sender}>", f"To: <{to}>", f"Subject: {subject}"]
    if date:
        hdrs.append("Date: Mon, 1 Jan 2024 00:00:00 +0000")
    if message_id:
        hdrs.append(f"Message-ID: <{subject.replace(' ', '-')}@client.example.test>")
    hdrs += extra_headers or []
    if isinstance(body, str):
        body = body.encode()
    return ("\r\n".join(hdrs) + "\r\n\r\n").encode() + body


def client_tls_context(ca_file) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
