"""Receiving SMTP peers for the delivery tests: the MX hosts and smarthosts the relay delivers to.

- `AioPeer`: an aiosmtpd server in a thread of its own, scripted per recipient (250 / 451 / 452 / 550 5.1.1 /
  552 / 421-and-close, optionally only for the first N attempts), with optional STARTTLS or implicit TLS (the
  test certificates), AUTH, a SIZE limit, a DATA delay, and 8BITMIME / SMTPUTF8 / PIPELINING / DSN advertised or not.
  It records every connection, command and transaction (envelope, data bytes, TLS version, login, time).
- `SmtpSink`: Postfix's `smtp-sink` (a separate process, stopped by PID), dumping each transaction to a file.
- `GreetingPeer`: a raw TCP listener that answers every connection with a fixed greeting (e.g. 421) and closes.
- `SilentPeer`: a raw TCP listener that accepts every connection and never sends a byte (no greeting).

Faults an `AioPeer` can inject on its first N transactions: drop the connection part-way through the message
(after the 354, with the rest of the body unread), or answer 250 to the end of data and close at once, with no
reply to what follows (QUIT included).

Peers bind distinct 127.0.0.x addresses on one port (`free_port_on`), because the relay uses a single
`delivery.port` for every MX host: the DNS server maps each MX name to the address of one peer.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import logging
import os
import random
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, syntax

from .relay import _ephemeral_range, _handed_out

# aiosmtpd logs every command at INFO; the suite does not need that in failure reports.
logging.getLogger("mail.log").setLevel(logging.WARNING)
# aiosmtpd 1.4 sets the deprecated Session.login_data itself after every AUTH; the warning is its own business.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def free_port_on(hosts: list[str]) -> int:
    """A port free on every one of the given loopback addresses (below the ephemeral range, as free_port)."""
    lo, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(max(1024, lo - 12000), lo)
        ok = True
        for h in hosts:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok and all((h, port) not in _handed_out for h in hosts):
            _handed_out.update((h, port) for h in hosts)
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def wait_listening(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s: {last!r}")


# ---------------------------------------------------------------------------------------------------------
# aiosmtpd peer


@dataclass
class Transaction:
    """One completed DATA at a peer (whatever the reply was: see `reply`)."""

    peer: str
    conn: int  # connection number at this peer, from 1
    client: tuple  # (ip, port) of the relay's socket
    helo: str | None  # EHLO/HELO argument
    mail_from: str  # "" for the null sender
    mail_options: list[str]
    rcpt_tos: list[str]  # the recipients the peer accepted in this transaction
    data: bytes  # message as received, dot-unstuffed, CRLF line ends
    reply: str  # what the peer answered to the end of data
    tls: str | None  # TLS version (e.g. "TLSv1.3") or None
    login: str | None  # AUTH user name, if any
    at: float  # time.monotonic() when the data was complete

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")

    @property
    def message(self) -> email.message.Message:
        return email.message_from_bytes(self.data)


@dataclass
class Command:
    conn: int
    verb: str  # EHLO, HELO, STARTTLS, MAIL, RCPT, DATA (end of data), RSET, QUIT
    arg: str
    reply: str


@dataclass
class _Rule:
    reply: str
    times: int | None  # None: every time; N: the first N times only
    used: int = 0
    client: str | None = None  # only commands from this client address
    skip: int = 0  # let this many matching commands through first

    def take(self, client: str | None = None) -> str | None:
        if self.client is not None and client != self.client:
            return None
        if self.skip > 0:
            self.skip -= 1
            return None
        if self.times is not None and self.used >= self.times:
            return None
        self.used += 1
        return self.reply


@dataclass
class _Conn:
    n: int
    client: tuple
    chunks: list[bytes] = field(default_factory=list)
    closed_by_rule: bool = False
    open: bool = True


class _PeerSMTP(SMTP):
    """aiosmtpd's SMTP with connection accounting and a record of the raw chunks read (pipelining checks)."""

    def __init__(self, peer: "AioPeer", **kw):
        self._peer = peer
        self._conn: _Conn | None = None
        # While a message is being read after 354: drop the connection once this many bytes have come in.
        self._cut_after: int | None = None
        self._cut_seen = 0
        super().__init__(peer, **kw)

    def connection_made(self, transport):
        first = self._original_transport is None and self._conn is None
        super().connection_made(transport)
        if first:
            self._conn = self._peer._opened(transport.get_extra_info("peername"))

    def connection_lost(self, exc):
        self._peer._closed(self._conn)
        super().connection_lost(exc)

    def eof_received(self):
        # The client is done with this connection as soon as it shuts its side: count it closed now, not when
        # aiosmtpd gets round to connection_lost (a loop iteration or two later, possibly after the client's
        # next connection was accepted, which would count one connection too many).
        self._peer._closed(self._conn)
        return super().eof_received()

    def data_received(self, data):
        if self._conn is not None:
            self._conn.chunks.append(bytes(data))
        if self._cut_after is not None:
            self._cut_seen += len(data)
            if self._cut_seen >= self._cut_after and self._peer._take_fault("mid_data"):
                # Part of the body is read and the rest never will be: RST, no reply, no transaction.
                self._cut_after = None
                if self.transport is not None:
                    self.transport.abort()
                return
        super().data_received(data)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg):
        await super().smtp_MAIL(self._peer._take_dsn("MAIL", arg, ("RET", "ENVID")))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg):
        await super().smtp_RCPT(self._peer._take_dsn("RCPT", arg, ("NOTIFY", "ORCPT")))

    @syntax("DATA")
    async def smtp_DATA(self, arg):
        # Every byte read after the DATA command line is the message (the client waits for 354 to send it).
        if self.envelope is not None and self.envelope.rcpt_tos:
            self._cut_after, self._cut_seen = self._peer._mid_data_cut(), 0
        try:
            await super().smtp_DATA(arg)
        finally:
            self._cut_after = None


class AioPeer:
    """An aiosmtpd SMTP server on host:port, run in its own thread and event loop.

    Scripting: `on_rcpt(addr, "550 5.1.1 no such user", times=None)`, `on_mail(...)`, `on_data(...)`; a reply
    starting with 421 is sent and the connection closed. Unscripted: 250 for everything.
    """

    def __init__(
        self,
        host: str,
        port: int,
        name: str = "peer",
        *,
        certs: dict[str, Path] | None = None,
        starttls: bool = False,
        implicit_tls: bool = False,
        auth: dict[str, str] | None = None,  # user -> password; AUTH PLAIN LOGIN advertised
        auth_required: bool = False,
        auth_require_tls: bool = True,
        size_limit: int | None = None,  # advertised as SIZE n and enforced; None: no SIZE
        eightbitmime: bool = True,
        smtputf8: bool = True,
        pipelining: bool = True,
        data_delay: float = 0.0,  # seconds to wait before answering the end of data
        ehlo_reply: str | None = None,  # e.g. "502 5.5.1 no EHLO here" (then HELO works)
        dsn: bool = False,  # advertise DSN (RFC 3461) and take its parameters: see `dsn_params`
    ):
        self.host, self.port, self.name = host, port, name
        self.certs = certs
        self.starttls, self.implicit_tls = starttls, implicit_tls
        # (no attribute may start with auth_: aiosmtpd takes the handler's auth_* members for AUTH mechanisms)
        self.users, self.require_auth, self.tls_before_auth = auth, auth_required, auth_require_tls
        self.size_limit = size_limit
        self.eightbitmime, self.smtputf8, self.pipelining = eightbitmime, smtputf8, pipelining
        self.data_delay = data_delay
        self.ehlo_reply = ehlo_reply
        self.dsn = dsn
        # With dsn: (verb, the parameters it carried, as sent) for every MAIL and RCPT, in order. aiosmtpd
        # knows no DSN parameters (it refuses them, and upper-cases the xtext), so they are taken off the
        # command here before aiosmtpd sees it.
        self.dsn_params: list[tuple[str, list[str]]] = []

        self._lock = threading.Lock()
        self._rcpt_rules: dict[str, list[_Rule]] = {}
        self._mail_rules: list[_Rule] = []
        self._data_rules: list[_Rule] = []
        self.transactions: list[Transaction] = []
        self.commands: list[Command] = []
        self.logins: list[tuple[str, str, str, bool]] = []  # AUTH attempts: (mechanism, login, password, success)
        self.conns: list[_Conn] = []
        # Faults still to inject and injected so far, by kind ("mid_data", "after_data").
        self._fault_budget: dict[str, int] = {"mid_data": 0, "after_data": 0}
        self._mid_data_after = 0
        self.faults: dict[str, int] = {"mid_data": 0, "after_data": 0}
        self.concurrent = 0
        self.max_concurrent = 0

        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._transports: set[Any] = set()

    # -- scripting -------------------------------------------------------------------------------------

    def on_rcpt(self, address: str, reply: str, times: int | None = None) -> "AioPeer":
        with self._lock:
            self._rcpt_rules.setdefault(address.lower(), []).append(_Rule(reply, times))
        return self

    def on_mail(self, reply: str, times: int | None = None, client: str | None = None,
                after: int = 0) -> "AioPeer":
        """`client`: only MAIL commands from that address count; `after`: the first `after` of them pass."""
        with self._lock:
            self._mail_rules.append(_Rule(reply, times, client=client, skip=after))
        return self

    def on_data(self, reply: str, times: int | None = None) -> "AioPeer":
        with self._lock:
            self._data_rules.append(_Rule(reply, times))
        return self

    def drop_mid_data(self, times: int = 1, after: int = 4096) -> "AioPeer":
        """On the next `times` messages longer than `after` bytes: answer DATA with 354, read `after` bytes of
        the message and drop the connection (RST) with no reply. `faults["mid_data"]` counts them."""
        with self._lock:
            self._fault_budget["mid_data"] += times
            self._mid_data_after = after
        return self

    def close_after_data(self, times: int = 1) -> "AioPeer":
        """On the next `times` accepted messages: answer 250 to the end of data, then close the connection at
        once, answering nothing more (not even QUIT). `faults["after_data"]` counts them."""
        with self._lock:
            self._fault_budget["after_data"] += times
        return self

    def _mid_data_cut(self) -> int | None:
        with self._lock:
            return self._mid_data_after if self._fault_budget["mid_data"] > 0 else None

    def _take_fault(self, kind: str) -> bool:
        with self._lock:
            if self._fault_budget[kind] <= 0:
                return False
            self._fault_budget[kind] -= 1
            self.faults[kind] += 1
            return True

    def _take_dsn(self, verb: str, arg: str | None, keys: tuple[str, ...]) -> str | None:
        if not self.dsn or arg is None:
            return arg
        words = arg.split(" ")
        taken = [w for w in words if w.split("=", 1)[0].upper() in keys]
        with self._lock:
            self.dsn_params.append((verb, taken))
        return " ".join(w for w in words if w not in taken)

    def clear_rules(self) -> None:
        with self._lock:
            self._rcpt_rules.clear()
            self._mail_rules.clear()
            self._data_rules.clear()

    @staticmethod
    def _first(rules: list[_Rule], client: str | None = None) -> str | None:
        for r in rules:
            reply = r.take(client)
            if reply is not None:
                return reply
        return None

    # -- what happened ---------------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.conns)

    def accepted(self) -> list[Transaction]:
        """Transactions whose end of data got a 2xx."""
        with self._lock:
            return [t for t in self.transactions if t.accepted]

    def delivered_to(self, rcpt: str) -> list[Transaction]:
        return [t for t in self.accepted() if rcpt.lower() in (r.lower() for r in t.rcpt_tos)]

    def with_marker(self, marker: str | bytes) -> list[Transaction]:
        m = marker.encode() if isinstance(marker, str) else marker
        return [t for t in self.accepted() if m in t.data]

    def rcpt_replies(self, rcpt: str) -> list[str]:
        with self._lock:
            return [c.reply for c in self.commands if c.verb == "RCPT" and c.arg.lower() == rcpt.lower()]

    def verbs(self, conn: int | None = None) -> list[str]:
        with self._lock:
            return [c.verb for c in self.commands if conn is None or c.conn == conn]

    def chunks(self) -> list[list[bytes]]:
        with self._lock:
            return [list(c.chunks) for c in self.conns]

    # -- aiosmtpd hooks (run in the peer's loop) --------------------------------------------------------

    def _opened(self, client) -> _Conn:
        with self._lock:
            c = _Conn(len(self.conns) + 1, client)
            self.conns.append(c)
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
            return c

    def _closed(self, c: _Conn | None) -> None:
        """Idempotent: called on QUIT, on EOF and on connection loss, whichever comes first counts."""
        if c is None:
            return
        with self._lock:
            if c.open:
                c.open = False
                self.concurrent -= 1

    def _record(self, server, verb: str, arg: str, reply: str) -> None:
        conn = server._conn.n if server._conn else 0
        with self._lock:
            self.commands.append(Command(conn, verb, arg, reply))

    def _maybe_close(self, server, reply: str) -> str:
        if reply.startswith("421"):
            self._close_after_reply(server)
        return reply

    @staticmethod
    def _close_after_reply(server) -> None:
        if server._conn is None:
            return
        server._conn.closed_by_rule = True
        transport = server.transport
        # after the reply is written: close() flushes what is buffered, then drops the connection
        asyncio.get_running_loop().call_soon(lambda: transport and transport.close())

    @staticmethod
    def _closing(server) -> bool:
        return server._conn is not None and server._conn.closed_by_rule

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        reply = f"250 {server.hostname}"
        self._record(server, "HELO", hostname, reply)
        return reply

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        if self.ehlo_reply:
            self._record(server, "EHLO", hostname, self.ehlo_reply)
            return [self.ehlo_reply]
        session.host_name = hostname
        out = [r for r in responses[:-1] if not (
            (r.startswith("250-AUTH") and not self.users)
            or (r == "250-8BITMIME" and not self.eightbitmime)
        )]
        if self.pipelining:
            out.append("250-PIPELINING")
        out.append("250-ENHANCEDSTATUSCODES")
        if self.dsn:
            out.append("250-DSN")
        out.append(responses[-1])
        self._record(server, "EHLO", hostname, " | ".join(out))
        return out

    def handle_STARTTLS(self, server, session, envelope):  # aiosmtpd calls this one synchronously
        self._record(server, "STARTTLS", "", "220")
        return True

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self._closing(server):
            return "421 4.3.2 closing"
        with self._lock:
            reply = self._first(self._mail_rules, server._conn.client[0] if server._conn else None)
        reply = reply or "250 2.1.0 Ok"
        self._record(server, "MAIL", address, reply)
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return self._maybe_close(server, reply)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self._closing(server):
            return "421 4.3.2 closing"
        with self._lock:
            reply = self._first(self._rcpt_rules.get(address.lower(), []))
        reply = reply or "250 2.1.5 Ok"
        self._record(server, "RCPT", address, reply)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return self._maybe_close(server, reply)

    async def handle_DATA(self, server, session, envelope):
        if self._closing(server):
            return "421 4.3.2 closing"
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self._lock:
            reply = self._first(self._data_rules)
        reply = reply or "250 2.0.0 Ok: queued"
        ssl_obj = server.transport.get_extra_info("ssl_object") if server.transport else None
        auth_data = getattr(session, "auth_data", None)
        login = auth_data.login.decode("utf-8", "replace") if auth_data is not None and hasattr(auth_data, "login") else None
        mail_from = "" if envelope.mail_from in ("<>", None) else envelope.mail_from
        t = Transaction(
            peer=self.name,
            conn=server._conn.n if server._conn else 0,
            client=server._conn.client if server._conn else ("?", 0),
            helo=session.host_name,
            mail_from=mail_from,
            mail_options=list(envelope.mail_options),
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            reply=reply,
            tls=ssl_obj.version() if ssl_obj is not None else None,
            login=login,
            at=time.monotonic(),
        )
        with self._lock:
            self.transactions.append(t)
        self._record(server, "DATA", "", reply)
        if reply.startswith("2") and self._take_fault("after_data"):
            self._close_after_reply(server)
            return reply
        return self._maybe_close(server, reply)

    async def handle_RSET(self, server, session, envelope):
        self._record(server, "RSET", "", "250 2.0.0 Ok")
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server, session, envelope):
        self._record(server, "QUIT", "", "221 2.0.0 Bye")
        self._closed(server._conn)
        return "221 2.0.0 Bye"

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = bool(self.users) and self.users.get(login) == password
        with self._lock:
            self.logins.append((mechanism, login, password, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    # -- lifecycle -------------------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        assert self.certs, "TLS needs the test certificates (certs fixture)"
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.certs["cert"]), str(self.certs["key"]))
        return ctx

    def _factory(self) -> SMTP:
        kw: dict[str, Any] = dict(
            hostname=f"{self.name}.peer.test",
            data_size_limit=self.size_limit,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            loop=self.loop,
            timeout=60,
        )
        if self.starttls:
            kw["tls_context"] = self._tls_context()
        if self.users is not None:
            kw.update(authenticator=self._authenticator, auth_required=self.require_auth,
                      auth_require_tls=self.tls_before_auth)
        proto = _PeerSMTP(self, **kw)
        if self.implicit_tls:
            # TLS from the first byte: aiosmtpd only knows STARTTLS as "TLS" and would answer AUTH with 538.
            # (Set after construction: passing auth_require_tls=False with auth_required makes aiosmtpd warn.)
            proto._auth_require_tls = False
        return proto

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(loop.create_server(
                self._factory, self.host, self.port, reuse_address=True,
                ssl=self._tls_context() if self.implicit_tls else None,
            ))
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=2))
            loop.close()

    def start(self) -> "AioPeer":
        self._thread = threading.Thread(target=self._run, name=f"peer-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError(f"peer {self.name} did not start within {START_TIMEOUT}s")
        if self._error is not None:
            raise RuntimeError(f"peer {self.name} on {self.host}:{self.port}: {self._error!r}")
        return self

    def stop(self) -> None:
        if self.loop is None or self._thread is None or not self._thread.is_alive():
            return

        def shutdown():
            if self._server is not None:
                self._server.close()
            for t in asyncio.all_tasks(self.loop):
                t.cancel()
            self.loop.call_later(0.1, self.loop.stop)

        try:
            self.loop.call_soon_threadsafe(shutdown)
        except RuntimeError:  # loop already closed
            return
        self._thread.join(STOP_TIMEOUT)

    def __repr__(self) -> str:
        return f"<AioPeer {self.name} {self.host}:{self.port} conns={self.connections} tx={len(self.transactions)}>"


# ---------------------------------------------------------------------------------------------------------
# Postfix smtp-sink


@dataclass
class SinkMessage:
    path: Path
    raw: bytes  # the dump file: smtp-sink's X- headers and Received:, then the message as received

    @property
    def message(self) -> email.message.Message:
        return email.message_from_bytes(self.raw)

    @property
    def mail_from(self) -> str:
        return self.message.get("X-Mail-Args", "").split()[0].strip("<>") if self.message.get("X-Mail-Args") else ""

    @property
    def rcpt_tos(self) -> list[str]:
        return [a.split()[0].strip("<>") for a in self.message.get_all("X-Rcpt-Args", [])]


class SmtpSink:
    """Postfix's smtp-sink on host:port, each transaction dumped to a file in `directory`; stopped by PID."""

    def __init__(self, host: str, port: int, directory: Path, name: str = "sink", args: list[str] | None = None):
        self.host, self.port, self.name = host, port, name
        self.directory = Path(directory)
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.directory.parent / f"{name}.log"

    def start(self) -> "SmtpSink":
        exe = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
        if exe is None:
            pytest.skip("smtp-sink (postfix) is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        # As root, smtp-sink insists on -u (the user it switches to after binding); root keeps the dump dir writable.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, *user, "-d", f"{self.directory}/%H%M%S.", "-h", f"{self.name}.sink.test", *self.args,
                 f"{self.host}:{self.port}", "64"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        try:
            wait_listening(self.host, self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"smtp-sink did not start: {self.log_path.read_text(errors='replace')[-500:]}")
        return self

    def messages(self) -> list[SinkMessage]:
        return [SinkMessage(p, p.read_bytes()) for p in sorted(self.directory.rglob("*")) if p.is_file()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# A peer that only greets


class GreetingPeer:
    """Answers every connection with `greeting` (e.g. "421 4.3.2 busy") and closes it; counts connections."""

    def __init__(self, host: str, port: int, greeting: str = "421 4.3.2 Service not available, try later"):
        self.host, self.port, self.greeting = host, port, greeting
        self.connections = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "GreetingPeer":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(16)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            self.connections += 1
            with c:
                try:
                    c.sendall(self.greeting.encode() + b"\r\n")
                    c.settimeout(1)
                    c.recv(1024)  # let the client say QUIT (or not), then close
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()


# ---------------------------------------------------------------------------------------------------------
# A peer that never speaks


class SilentPeer:
    """Accepts every connection and sends nothing, ever: the MX that hangs after connect. Each connection is
    held open (and whatever the client sends is read and dropped) until the client closes it or the peer
    stops; `connections` counts them and `closed_by_client` those the client gave up on."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.connections = 0
        self.closed_by_client = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "SilentPeer":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        self._sock = s
        self._thread = threading.Thread(target=self._run, name=f"silent-{self.host}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    if key.fileobj is self._sock:
                        try:
                            c, _ = self._sock.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        sel.register(c, selectors.EVENT_READ)
                        with self._lock:
                            self.connections += 1
                        continue
                    c = key.fileobj
                    try:
                        data = c.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(c)
                        c.close()
                        with self._lock:
                            self.closed_by_client += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# ---------------------------------------------------------------------------------------------------------


class PeerPool:
    """Every peer a test starts, on one shared port (the relay's `delivery.port`); stops them all."""

    HOSTS = [f"127.0.0.{i}" for i in range(2, 12)]

    def __init__(self, workdir: Path, certs: dict[str, Path] | None):
        self.workdir = Path(workdir)
        self.certs = certs
        self.port = free_port_on(self.HOSTS)
        self.peers: list[Any] = []

    def aio(self, host: str, name: str | None = None, **kw) -> AioPeer:
        kw.setdefault("certs", self.certs)
        p = AioPeer(host, self.port, name or f"peer-{host}", **kw).start()
        self.peers.append(p)
        return p

    def sink(self, host: str, name: str = "sink", args: list[str] | None = None) -> SmtpSink:
        s = SmtpSink(host, self.port, self.workdir / f"{name}-dump", name=name, args=args).start()
        self.peers.append(s)
        return s

    def greeter(self, host: str, greeting: str = "421 4.3.2 Service not available, try later") -> GreetingPeer:
        g = GreetingPeer(host, self.port, greeting).start()
        self.peers.append(g)
        return g

    def silent(self, host: str) -> SilentPeer:
        p = SilentPeer(host, self.port).start()
        self.peers.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.peers):
            try:
                p.stop()
            except Exception:  # teardown must reach every peer
                pass
