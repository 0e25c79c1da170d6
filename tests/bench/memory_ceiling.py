#!/usr/bin/env python3
"""Memory ceiling: large messages to slow MX connections, herald vs. Postfix.

For each target in one invocation:

    N sender clients (smtplib) -- M messages of S MiB -->  relay
        --> a slow sink on 127.0.0.1 (asyncio, reads DATA at R bytes/s per
            connection, answers 250, checks every message)

where the relay is

  * herald-relay (target/release/herald-relay), `delivery.smarthost` = the
    sink, `per_domain: {max_connections: 50}`, `delivery.max_connections: 50`,
    `limits.max_message_size` = S + 1 MiB and the default inbound budget
    (`limits.max_inbound_bytes` absent), or
  * a private, throw-away Postfix instance, `relayhost` = the sink,
    `default_destination_concurrency_limit` and
    `smtp_destination_concurrency_limit` = 50, `message_size_limit` = S + 1 MiB.

The sink is slow on purpose: a relay that holds a whole message in memory for
as long as it takes to send it holds 50 of them at once.  The question is
whether the relay's memory stays flat, whatever the backlog.  herald runs a
second time with fewer messages (--flat-messages) so the report shows
whether its peak depends on the backlog.

Printed per run: peak RSS of the relay's process tree (sampled from /proc
every --sample-interval), herald's VmHWM, messages accepted and delivered,
4xx replies retried, accept and delivery wall times; then the herald/Postfix
ratios and whether herald's peak met the goal (< 256 MiB).

A benchmark, not a test: the exit status is non-zero only when a run is
broken (a message refused with 5xx or lost, a truncated or altered delivery,
a process dead), never because of the numbers.

Python 3.11, standard library only, Linux only (/proc), root.  See
tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    terminate,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_SETUP,
    OWNED_PIDS,
    DeliveringPostfix,
    Herald,
    Postfix,
    Sampler,
    SetupError,
    Target,
    add_common_args,
    become_subreaper,
    descendants,
    env_float,
    env_int,
    environment_warnings,
    find_herald,
    find_tool,
    fmt_mb,
    herald_delivery_yaml,
    install_signal_handlers,
    log,
    postfix_version,
    print_host_info,
    proc_table,
    reap_orphans,
    rss_kb,
    smtp_banner_ok,
    tail,
    wait_until,
)

MIB = 1024 * 1024
GOAL_KB = 256 * 1024  # herald's peak RSS goal, 256 MiB
SENDER = "sender@bench.test"
RCPT = "rcpt@dest.test"

# Postfix settings that shape this load; printed with the results.
POSTFIX_PARAMS = (
    "default_destination_concurrency_limit",
    "smtp_destination_concurrency_limit",
    "initial_destination_concurrency",
    "default_process_limit",
    "message_size_limit",
    "qmgr_message_active_limit",
    "smtp_connection_cache_on_demand",
)


# --------------------------------------------------------------------------
# The message: a header that names it, and a body every message shares.


def message_body(nbytes: int) -> bytes:
    """`nbytes` of numbered 78-character lines ending in CRLF.  No line starts
    with a dot, so SMTP dot-stuffing never changes a byte and the sink can
    hash what arrives against what was sent."""
    pad = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-abcdefghij"
    lines = [f"{i:06d}{pad}\r\n" for i in range(nbytes // 80 + 1)]  # 80 bytes each
    body = "".join(lines).encode("ascii")[:nbytes]
    # The cut may end mid-line: end with CRLF, as DATA needs.
    return body[:-2] + b"\r\n" if nbytes >= 2 else b"\r\n"


def message_header(marker: str, index: int, total: int) -> bytes:
    """The header of message `index`; the same length for every index of a run
    (fixed-width numbers), so every message has the same size."""
    return (
        f"From: <{SENDER}>\r\n"
        f"To: <{RCPT}>\r\n"
        f"Subject: memory ceiling {index:06d} of {total:06d}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"  # fixed width
        f"Message-ID: <{marker}@bench.test>\r\n"
        f"X-Bench-Id: {marker}\r\n"
        "\r\n"
    ).encode("ascii")


def marker_of(token: str, index: int) -> str:
    return f"{token}-{index:06d}"


# --------------------------------------------------------------------------
# The slow sink: an asyncio SMTP server run as a child process of this
# script (`memory_ceiling.py _sink ...`), so its reading and hashing do not
# compete with the sender threads for this process's GIL.  It prints one line
# per event on stdout:
#
#   port P                 listening
#   conn C                 a connection opened; C are open now
#   msg MARKER ok BYTES    a message arrived whole (BYTES: header + body)
#   msg MARKER bad WHY BYTES


class Conn:
    """Buffered reading on one sink connection: command lines, or DATA at a
    limited rate."""

    CHUNK = 65536

    def __init__(self, reader: asyncio.StreamReader, rate: float):
        self.reader = reader
        self.rate = rate
        self.buf = bytearray()

    async def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > 65536:
                raise ConnectionError("command line too long")
            chunk = await self.reader.read(self.CHUNK)
            if not chunk:
                return b""
            self.buf += chunk

    async def read_data(self, body_len: int, body_sha: str) -> tuple[str, str, int]:
        """Reads one message up to the "." line, no faster than `rate` bytes
        per second; returns (marker, "ok" or "bad <why>", bytes)."""
        loop = asyncio.get_running_loop()
        start, got = loop.time(), 0
        # The stream of the message as the client sent it, with the CRLF that
        # ended the DATA command in front: the end is then always CRLF . CRLF.
        pending = b"\r\n"
        skip = 2
        header = bytearray()
        in_header = True
        h = hashlib.sha256()
        nbody = nbytes = 0
        first = bytes(self.buf)
        self.buf.clear()
        while True:
            if first:
                chunk, first = first, b""
            else:
                chunk = await self.reader.read(self.CHUNK)
                if not chunk:
                    raise ConnectionError("connection closed during DATA")
                got += len(chunk)
                # Pace the reads: the client's writes (and the relay behind
                # them) block once the socket buffers are full.
                delay = start + got / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            data = pending + chunk
            end = data.find(b"\r\n.\r\n")
            if end >= 0:
                raw, pending = data[: end + 2], b""
                self.buf += data[end + 5:]  # whatever the client pipelined after the end
            else:
                # Keep the last 4 bytes back: they may begin the end marker.
                raw, pending = data[:-4], data[-4:]
            piece = raw[skip:]
            skip = max(0, skip - len(raw))
            nbytes += len(piece)
            if in_header:
                header += piece
                i = header.find(b"\r\n\r\n")
                if i >= 0:
                    rest = bytes(header[i + 4:])
                    del header[i + 4:]
                    in_header = False
                    h.update(rest)
                    nbody += len(rest)
                elif len(header) > 1 << 20:
                    in_header = False  # no header end in the first MiB: judged below
            else:
                h.update(piece)
                nbody += len(piece)
            if end >= 0:
                break
        marker = "?"
        for line in bytes(header).split(b"\r\n"):
            if line.lower().startswith(b"x-bench-id:"):
                marker = line.split(b":", 1)[1].strip().decode("ascii", "replace")
        if marker == "?":
            verdict = "bad no-X-Bench-Id-header"
        elif nbody != body_len:
            verdict = f"bad body-{nbody}-bytes-expected-{body_len}"
        elif h.hexdigest() != body_sha:
            verdict = "bad body-differs"
        else:
            verdict = "ok"
        return marker, verdict, nbytes


async def sink_main(rate: float, body_len: int) -> None:
    body_sha = hashlib.sha256(message_body(body_len)).hexdigest()
    open_conns = 0

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_conns
        open_conns += 1
        say(f"conn {open_conns}")
        c = Conn(reader, rate)
        try:
            writer.write(b"220 sink.bench.test ESMTP memory_ceiling.py slow sink\r\n")
            await writer.drain()
            while True:
                line = await c.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.bench.test\r\n250-PIPELINING\r\n"
                                 b"250-SIZE 0\r\n250 8BITMIME\r\n")
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    marker, verdict, nbytes = await c.read_data(body_len, body_sha)
                    say(f"msg {marker} {verdict} {nbytes}")
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 5.5.2 not here\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            open_conns -= 1
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0, backlog=1024)
    say(f"port {server.sockets[0].getsockname()[1]}")
    async with server:
        await server.serve_forever()


class SlowSink:
    """The sink child process, and what it reported: which markers arrived
    (how often), which arrived damaged, the most connections open at once."""

    def __init__(self, workdir: Path, rate: float, body_len: int, ready_timeout: float):
        self.dir = workdir
        self.rate = rate
        self.body_len = body_len
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.received: Counter = Counter()  # marker -> good deliveries
        self.bad: list[str] = []
        self.bytes = 0
        self.max_conns = 0
        self.t_last: float | None = None
        self._lock = threading.Lock()
        self._port_seen = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        errlog = self.dir / "sink.err"
        with open(errlog, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_sink", str(self.rate),
                 str(self.body_len)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )
        OWNED_PIDS.add(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._port_seen.wait(self.ready_timeout) or not self.port:
            raise SetupError(f"the slow sink did not start:\n{tail(errlog)}")
        if not wait_until(lambda: smtp_banner_ok(self.port), self.ready_timeout, 0.1):
            raise SetupError(f"the slow sink on 127.0.0.1:{self.port} did not answer 220")

    def _read(self) -> None:
        for raw in self.proc.stdout:
            words = raw.decode("ascii", "replace").split()
            now = time.monotonic()
            with self._lock:
                if words[:1] == ["port"]:
                    self.port = int(words[1])
                    self._port_seen.set()
                elif words[:1] == ["conn"]:
                    self.max_conns = max(self.max_conns, int(words[1]))
                elif words[:1] == ["msg"] and len(words) >= 4:
                    marker, verdict, nbytes = words[1], words[2], int(words[-1])
                    self.bytes += nbytes
                    self.t_last = now
                    if verdict == "ok":
                        self.received[marker] += 1
                    else:
                        self.bad.append(f"{marker}: {' '.join(words[3:-1])} ({nbytes} bytes)")
        self._port_seen.set()

    def snapshot(self) -> tuple[Counter, list[str], int, int, float | None]:
        with self._lock:
            return Counter(self.received), list(self.bad), self.bytes, self.max_conns, self.t_last

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.proc:
            return
        terminate(self.proc)
        if self._reader:
            self._reader.join(timeout=5)
        OWNED_PIDS.discard(self.proc.pid)
        self.proc = None


# --------------------------------------------------------------------------
# The sender: `clients` threads with smtplib, one connection each, reused.


@dataclass
class SendStats:
    accepted: dict[str, float] = field(default_factory=dict)  # marker -> monotonic time of the 250
    retries: Counter = field(default_factory=Counter)  # "452 4.3.1" -> how many 4xx replies
    disconnects: int = 0  # connections lost without a reply (the message was sent again)
    failures: list[str] = field(default_factory=list)  # 5xx, or not accepted in time


class Sender:
    """Submits `total` messages of `size` bytes each; a 4xx reply is retried
    after `pause` seconds on the same connection (or a new one), a 5xx is a
    failure.  Bounded: by `deadline` (monotonic) and `max_attempts` per message."""

    def __init__(self, port: int, total: int, clients: int, header_len: int, body: bytes,
                 token: str, pause: float, deadline: float, max_attempts: int):
        self.port = port
        self.total = total
        self.clients = clients
        self.body = body
        self.size = header_len + len(body)
        self.token = token
        self.pause = pause
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.stats = SendStats()
        self.lock = threading.Lock()
        self.work: queue.Queue[int] = queue.Queue()
        for i in range(total):
            self.work.put(i)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, daemon=True)
                        for _ in range(self.clients)]
        for t in self.threads:
            t.start()

    def done(self) -> bool:
        return all(not t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(max(0.0, timeout))

    def _transaction(self, smtp: smtplib.SMTP, header: bytes) -> tuple[int, str]:
        """One MAIL/RCPT/DATA; the reply that ended it.  The body goes out
        with sendall() straight from the shared bytes object: no per-message
        copy, so the sender stays cheap next to the relay it measures."""
        opts = [f"SIZE={self.size}"] if smtp.has_extn("size") else []
        for code, text in (smtp.mail(SENDER, opts), smtp.rcpt(RCPT)):
            if code != 250:
                return code, text.decode(errors="replace")
        smtp.putcmd("data")
        code, text = smtp.getreply()
        if code != 354:
            return code, text.decode(errors="replace")
        smtp.send(header)
        smtp.send(self.body)
        smtp.send(b".\r\n")
        code, text = smtp.getreply()
        return code, text.decode(errors="replace")

    def _client(self) -> None:
        smtp: smtplib.SMTP | None = None
        try:
            while not self.stop.is_set():
                try:
                    i = self.work.get_nowait()
                except queue.Empty:
                    break
                smtp = self._send(i, smtp)
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    smtp.close()

    def _send(self, i: int, smtp: smtplib.SMTP | None) -> smtplib.SMTP | None:
        marker = marker_of(self.token, i)
        header = message_header(marker, i, self.total)
        for _attempt in range(self.max_attempts):
            if self.stop.is_set() or time.monotonic() > self.deadline:
                break
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="sender.bench.test",
                                        timeout=300)
                    smtp.ehlo()
                code, text = self._transaction(smtp, header)
            except (smtplib.SMTPException, OSError):
                # No reply to this attempt: it was not accepted (as far as
                # the client can know); send it again on a new connection.
                with self.lock:
                    self.stats.disconnects += 1
                if smtp is not None:
                    smtp.close()
                smtp = None
                time.sleep(self.pause)
                continue
            if code == 250:
                with self.lock:
                    self.stats.accepted[marker] = time.monotonic()
                return smtp
            if 400 <= code < 500:
                enhanced = text.split()[0] if text.split() and text[0].isdigit() else ""
                with self.lock:
                    self.stats.retries[f"{code} {enhanced}".strip()] += 1
                try:
                    smtp.rset()
                except (smtplib.SMTPException, OSError):
                    smtp.close()
                    smtp = None
                time.sleep(self.pause)
                continue
            with self.lock:
                self.stats.failures.append(f"{marker}: {code} {text}")
            try:
                smtp.rset()
            except (smtplib.SMTPException, OSError):
                smtp.close()
                smtp = None
            return smtp
        with self.lock:
            self.stats.failures.append(f"{marker}: not accepted (timeout or {self.max_attempts} "
                                       "attempts)")
        return smtp


# --------------------------------------------------------------------------
# Targets.


def herald_yaml(sink_port: int, args) -> str:
    return (
        f"limits:\n  max_message_size: {args.max_size}\n"
        + herald_delivery_yaml(sink_port, connections=args.connections,
                               msgs_per_conn=args.herald_msgs_per_conn,
                               total_connections=args.connections)
    )


def postfix_extra(args) -> str:
    return (
        "# memory_ceiling.py: the same connection count and size limit as herald's;\n"
        "# no slow start, so the 50 connections are open as soon as there is mail\n"
        "# for them (as herald's are), not after dozens of deliveries\n"
        f"default_destination_concurrency_limit = {args.connections}\n"
        f"smtp_destination_concurrency_limit = {args.connections}\n"
        f"initial_destination_concurrency = {args.connections}\n"
        f"message_size_limit = {args.max_size}\n"
    )


def herald_budget(logfile: Path) -> str:
    """herald's "memory budgets" start-up line, for the report."""
    try:
        with open(logfile, "rb") as f:
            for line in f:
                if b"memory budgets" not in line:
                    continue
                fl = json.loads(line).get("fields") or {}
                inbound = fl.get("inbound_bytes")
                inbound = f"{int(inbound) / MIB:.0f} MiB" if str(inbound).isdigit() else inbound
                return f"inbound budget {inbound}, memory limit {fl.get('memory_limit')}"
    except (OSError, ValueError):
        pass
    return "(no 'memory budgets' line in herald's log)"


def herald_outcomes(logfile: Path) -> Counter:
    """`result` of herald's delivery log lines: deferrals show up here."""
    out: Counter = Counter()
    try:
        with open(logfile, "rb") as f:
            for line in f:
                if b'"message":"delivery"' in line:
                    try:
                        out[str((json.loads(line).get("fields") or {}).get("result"))] += 1
                    except ValueError:
                        out["?"] += 1
    except OSError:
        pass
    return out


def postfix_outcomes(maillog: Path) -> Counter:
    out: Counter = Counter()
    try:
        with open(maillog, errors="replace") as f:
            for line in f:
                if "postfix/smtp[" in line and " status=" in line:
                    out[line.split(" status=", 1)[1].split()[0]] += 1
    except OSError:
        pass
    return out


def queue_left(t: Target) -> int | None:
    try:
        return t.queue_total() if isinstance(t, Herald) else t.queued()
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        log(f"{t.name}: cannot read the queue: {e}")
        return None


# --------------------------------------------------------------------------
# One run.


@dataclass
class Result:
    label: str
    target: str
    messages: int
    flat: bool = False  # herald's second run, with --flat-messages
    accepted: int = 0
    delivered: int = 0  # distinct messages the sink received whole
    duplicates: int = 0
    lost: int = 0
    bad: list[str] = field(default_factory=list)
    retries: Counter = field(default_factory=Counter)
    disconnects: int = 0
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    sink_bytes: int = 0
    sink_max_conns: int = 0
    peak_rss_kb: int = 0  # summed RSS of the process tree, sampled
    peak_pss_kb: int = 0
    peak_procs: int = 0
    vm_hwm_kb: int | None = None  # herald only
    curve: list[tuple[float, int]] = field(default_factory=list)  # (s, summed RSS kB) every second
    outcomes: Counter = field(default_factory=Counter)
    budget: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def peak_kb(self) -> int:
        """The headline: herald's VmHWM (exact), Postfix's sampled tree peak."""
        return self.vm_hwm_kb or self.peak_rss_kb


def run_one(t: Target, sink: SlowSink, args, label: str, messages: int, flat: bool,
            rundir: Path) -> Result:
    res = Result(label=label, target=t.name, messages=messages, flat=flat)
    body_len = len(args.body)
    token = secrets.token_hex(4)
    header_len = len(message_header(marker_of(token, 0), 0, messages))
    sampler = Sampler(t.root_pid, with_pss=not args.no_pss, seen=t.seen_pids)
    sampler.sample(full=True)
    os.sync()  # don't make this run pay for the previous run's dirty pages
    t0 = time.monotonic()
    sender = Sender(t.port, messages, args.sessions, header_len, args.body, token,
                    args.retry_pause, t0 + args.timeout, args.max_attempts)
    log(f"{label}: {messages} messages of {(header_len + body_len) / MIB:.2f} MiB from "
        f"{args.sessions} clients -> {t.name} 127.0.0.1:{t.port} -> slow sink "
        f"127.0.0.1:{sink.port} ({args.sink_rate / MIB:.2f} MiB/s per connection)")
    sender.start()
    next_curve = t0
    try:
        while True:
            time.sleep(args.sample_interval)
            sampler.sample()
            now = time.monotonic()
            if now >= next_curve:
                # The tree's RSS now (the sampler keeps only the peak).
                tree = descendants(t.root_pid, proc_table())
                res.curve.append((now - t0, sum(rss_kb(p) for p in tree)))
                # Once a second; a late sample (a busy machine) does not bunch the next ones.
                next_curve = max(next_curve + 1.0, now + 0.5)
            if isinstance(t, Postfix):
                reap_orphans()
            if not t.alive():  # type: ignore[attr-defined]
                sender.stop.set()
                raise SetupError(f"{t.name} died during the run{t.diagnostics()}")
            if not sink.alive():
                sender.stop.set()
                raise SetupError("the slow sink died during the run")
            if sender.done():
                received = sink.snapshot()[0]
                if all(m in received for m in sender.stats.accepted):
                    break
            if now - t0 > args.timeout:
                res.problems.append(f"timeout: {args.timeout:.0f}s after the start the sink has "
                                    f"{len(sink.snapshot()[0])}/{len(sender.stats.accepted)} "
                                    "accepted messages"
                                    + ("" if sender.done() else ", the sender is still sending"))
                break
    finally:
        sender.stop.set()
        sender.join(30)
    sampler.sample(full=True)
    stats = sender.stats
    res.accepted = len(stats.accepted)
    res.retries = stats.retries
    res.disconnects = stats.disconnects
    if stats.accepted:
        res.accept_seconds = max(stats.accepted.values()) - t0
    res.problems += [f"refused: {f}" for f in stats.failures[:5]]
    if len(stats.failures) > 5:
        res.problems.append(f"... {len(stats.failures) - 5} more refused")

    # The relay's queue must empty; then wait --settle so a late duplicate
    # would still be counted.
    if not any(p.startswith("timeout") for p in res.problems):
        wait_until(lambda: queue_left(t) == 0, args.drain_timeout, 0.5)
    left = queue_left(t)
    if left:
        res.problems.append(f"{left} messages still queued after the run")
    time.sleep(args.settle)
    sampler.sample(full=True)
    received, bad, nbytes, max_conns, t_last = sink.snapshot()
    res.delivered = sum(1 for m in received if m in stats.accepted)
    res.duplicates = sum(n - 1 for n in received.values() if n > 1)
    strangers = [m for m in received if m not in stats.accepted]
    res.lost = sum(1 for m in stats.accepted if m not in received)
    res.bad = bad
    res.sink_bytes = nbytes
    res.sink_max_conns = max_conns
    if t_last is not None and res.lost == 0:
        res.deliver_seconds = t_last - t0
    if res.lost:
        res.problems.append(f"{res.lost} accepted messages never reached the sink")
    if bad:
        res.problems.append(f"{len(bad)} messages reached the sink damaged, e.g. {bad[0]}")
    if strangers:
        res.problems.append(f"the sink got {len(strangers)} messages that were never accepted, "
                            f"e.g. {strangers[0]}")
    res.peak_rss_kb = sampler.peak_rss_kb
    res.peak_pss_kb = sampler.peak_pss_kb
    res.peak_procs = sampler.peak_procs
    res.vm_hwm_kb = t.vm_hwm_kb()
    if isinstance(t, Herald):
        res.budget = herald_budget(t.logfile)
        res.outcomes = herald_outcomes(t.logfile)
    else:
        res.outcomes = postfix_outcomes(t.maillog)
    return res


# --------------------------------------------------------------------------
# The report.


def fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def fmt_retries(c: Counter) -> str:
    return str(sum(c.values())) + (f" ({', '.join(f'{k}: {v}' for k, v in c.most_common())})"
                                   if c else "")


def print_report(results: list[Result], args, pf_params: dict[str, str]) -> None:
    size = len(args.body) + len(message_header(marker_of("00000000", 0), 0, 0))
    print()
    print(f"load: {args.messages} messages of {size / MIB:.2f} MiB ({size} bytes) from "
          f"{args.sessions} smtplib clients (a 4xx is retried after {args.retry_pause:g}s)"
          + (f"; herald again with {args.flat_messages} messages" if args.flat_messages else ""))
    print(f"sink: asyncio on 127.0.0.1, reads DATA at {args.sink_rate / MIB:.2f} MiB/s per "
          f"connection ({size / args.sink_rate:.1f}s per message), checks header id, body "
          "length and SHA-256")
    print(f"herald: delivery.smarthost = the sink, per_domain max_connections {args.connections}, "
          f"messages_per_connection {args.herald_msgs_per_conn}, delivery.max_connections "
          f"{args.connections}, limits.max_message_size {args.max_size}, "
          "limits.max_inbound_bytes absent")
    budgets = {r.budget for r in results if r.budget}
    for b in sorted(budgets):
        print(f"        herald at start: {b}")
    if pf_params:
        print("postfix: relayhost = [127.0.0.1]:<sink>; "
              + ", ".join(f"{k} = {v}" for k, v in pf_params.items()))
    print()
    hdr = (f"{'run':<16} {'msgs':>5} {'acc':>5} {'dlv':>5} {'retry':>5} {'accept s':>8} "
           f"{'deliv s':>8} {'conns':>5} {'peakMB':>7} {'sumRSS':>7} {'sumPSS':>7} {'procs':>5}  "
           "check")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r.label:<16} {r.messages:>5} {r.accepted:>5} {r.delivered:>5} "
              f"{sum(r.retries.values()):>5} {fmt_s(r.accept_seconds):>8} "
              f"{fmt_s(r.deliver_seconds):>8} {r.sink_max_conns:>5} {fmt_mb(r.peak_kb):>7} "
              f"{fmt_mb(r.peak_rss_kb):>7} {fmt_mb(r.peak_pss_kb):>7} {r.peak_procs:>5}  "
              + ("ok" if r.ok else "FAIL: " + "; ".join(r.problems)))
    print()
    print("acc / dlv: messages accepted (250 to the end of DATA) / distinct messages the sink "
          "received whole.")
    print("retry: 4xx replies, each followed by a pause and the same message again.")
    print("accept s: start until the last 250; deliv s: start until the sink had the last "
          "message.")
    print("conns: most connections open at once on the sink.")
    print("peakMB: herald = VmHWM of the herald-relay process; postfix = peak of the summed RSS "
          "of the master and")
    print(f"        all its children, sampled every {args.sample_interval * 1000:.0f} ms. "
          "sumRSS / sumPSS: sampled peaks (both targets).")
    print()
    for r in results:
        extras = []
        if r.retries:
            extras.append(f"retries {fmt_retries(r.retries)}")
        if r.disconnects:
            extras.append(f"{r.disconnects} attempts lost their connection and were sent again")
        if r.duplicates:
            extras.append(f"{r.duplicates} duplicate deliveries")
        extras.append(f"delivery outcomes {dict(r.outcomes)}")
        extras.append(f"sink got {r.sink_bytes / MIB:.0f} MiB")
        print(f"{r.label}: " + "; ".join(extras))
        if r.curve:
            step = max(1, len(r.curve) // 12)
            print("    RSS over time (s: MB): "
                  + ", ".join(f"{s:.0f}: {kb / 1024:.0f}" for s, kb in r.curve[::step]))
    print()

    ok = [r for r in results if r.ok]
    herald = [r for r in ok if r.target == "herald"]
    full = [r for r in herald if not r.flat]
    flat = [r for r in herald if r.flat]
    postfix = [r for r in ok if r.target == "postfix"]
    # The worst run of each is the ceiling.
    h = max((r.peak_kb for r in full), default=None)
    p = max((r.peak_kb for r in postfix), default=None)
    if h is not None:
        print(f"herald peak RSS ({args.messages} messages): {fmt_mb(h)} MB; goal < 256 MiB: "
              + ("met" if h < GOAL_KB else "NOT met"))
    if flat and h is not None:
        f = max(r.peak_kb for r in flat)
        print(f"herald peak RSS ({args.flat_messages} messages): {fmt_mb(f)} MB; "
              f"{args.messages} vs {args.flat_messages} messages: {fmt_ratio(h, f)} "
              "(1.00x = flat, whatever the backlog)")
    if p is not None:
        print(f"postfix peak summed RSS ({args.messages} messages): {fmt_mb(p)} MB, PSS "
              f"{fmt_mb(max(r.peak_pss_kb for r in postfix))} MB")
    if h is not None and p is not None:
        print(f"RSS ratio herald/postfix (peakMB): {fmt_ratio(h, p)}")
        if not args.no_pss:
            print(f"PSS ratio herald/postfix (sumPSS): "
                  f"{fmt_ratio(max(r.peak_pss_kb for r in full), max(r.peak_pss_kb for r in postfix))}")
        print(f"retries (4xx): herald {sum(sum(r.retries.values()) for r in full)}, postfix "
              f"{sum(sum(r.retries.values()) for r in postfix)}")
        hd = max((r.deliver_seconds or 0) for r in full)
        pd = max((r.deliver_seconds or 0) for r in postfix)
        print(f"delivery time ratio herald/postfix: {fmt_ratio(hd, pd)} (the sink's pace bounds "
              "both; not the point here)")


# --------------------------------------------------------------------------


def check_disk(base: Path, need: int) -> None:
    free = shutil.disk_usage(base).free
    if free < need:
        raise SetupError(f"{free / 1e9:.1f} GB free under {base}, this benchmark needs "
                         f"{need / 1e9:.1f} GB (spool + Postfix queue); free some space or "
                         "point --workdir / BENCH_DIR elsewhere")


def run_all(args, base: Path, targets: list[str], herald_bin: Path | None,
            postfix_cmd: str | None) -> int:
    plan: list[tuple[str, str, int, bool]] = []  # (label, target, messages, flat)
    for rnd in range(1, args.rounds + 1):
        order = targets if rnd % 2 == 1 else list(reversed(targets))
        suffix = f" r{rnd}" if args.rounds > 1 else ""
        plan += [(f"{name}{suffix}", name, args.messages, False) for name in order]
        if "herald" in targets and args.flat_messages:
            plan.append((f"herald {args.flat_messages}{suffix}", "herald", args.flat_messages,
                         True))
    results: list[Result] = []
    failed: dict[str, str] = {}
    status = EXIT_OK
    pf_params: dict[str, str] = {}
    for label, name, messages, flat in plan:
        if name in failed:
            continue
        rundir = base / label.replace(" ", "-")
        rundir.mkdir()
        os.chmod(rundir, 0o755)  # the postfix user must traverse into its queue
        current: Target | None = None
        sink: SlowSink | None = None
        try:
            check_disk(base, int(1.5 * messages * (len(args.body) + 4096)))
            sink = SlowSink(rundir, args.sink_rate, len(args.body), args.ready_timeout)
            sink.start()
            if name == "herald":
                current = Herald(herald_bin, rundir, args.ready_timeout, messages,
                                 extra_yaml=herald_yaml(sink.port, args), log_format="json")
            else:
                current = DeliveringPostfix(rundir, args.ready_timeout, postfix_cmd, sink.port,
                                            "tests/bench/memory_ceiling.py", postfix_extra(args))
            current.start()
            if isinstance(current, Postfix) and not pf_params:
                pf_params = current.postconf(*POSTFIX_PARAMS)
            res = run_one(current, sink, args, label, messages, flat, rundir)
        except SetupError as e:
            log(f"error: {label}: {e}")
            failed[name] = str(e).splitlines()[0]
            status = EXIT_SETUP
            continue
        finally:
            for thing, what in ((current, name), (sink, "slow sink")):
                if thing is None:
                    continue
                try:
                    thing.stop()
                except Exception as e:  # report, but don't mask the run's outcome
                    log(f"error while stopping {what}: {e}")
                    status = EXIT_SETUP
            reap_orphans()
        results.append(res)
        log(f"{label}: peak {fmt_mb(res.peak_kb)} MB, accepted {res.accepted}/{messages}, "
            f"delivered {res.delivered}, retries {sum(res.retries.values())}"
            + ("" if res.ok else f" -- FAIL: {'; '.join(res.problems)}; kept {rundir}"))
        if res.ok and not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
    if results:
        print_report(results, args, pf_params)
    for name, why in failed.items():
        print(f"{name}: NOT MEASURED: {why}")
    if status != EXIT_OK:
        return status
    if any(not r.ok for r in results):
        log("FAIL: a message was refused, lost or damaged (see the check column)")
        return EXIT_MISMATCH
    return EXIT_OK


def main() -> int:
    if sys.argv[1:2] == ["_sink"]:
        # The slow sink's own process (see SlowSink); not for use by hand.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        asyncio.run(sink_main(float(sys.argv[2]), int(sys.argv[3])))
        return 0

    ap = argparse.ArgumentParser(
        description="Peak memory of herald-relay vs. a private Postfix instance relaying large "
                    "messages to a slow destination over 50 connections.",
        epilog="All options also have environment-variable defaults; see tests/bench/README.md.",
    )
    add_common_args(ap, messages=200, sessions=8, size=None)
    ap.add_argument("--size-mb", type=float, default=env_float("BENCH_SIZE_MB", 10),
                    help="message size in MiB, header included (env BENCH_SIZE_MB, default 10); "
                         "-l gives it in bytes instead")
    ap.add_argument("--flat-messages", type=int, default=env_int("BENCH_FLAT_MESSAGES", 50),
                    help="run herald again with this many messages, to show whether its peak "
                         "depends on the backlog; 0: don't (env BENCH_FLAT_MESSAGES, default 50)")
    ap.add_argument("--connections", type=int, default=env_int("BENCH_CONNECTIONS", 50),
                    help="delivery connections to the sink: herald per_domain.max_connections and "
                         "delivery.max_connections, Postfix's destination concurrency limits "
                         "(env BENCH_CONNECTIONS, default 50)")
    ap.add_argument("--herald-msgs-per-conn", type=int,
                    default=env_int("BENCH_HERALD_MSGS_PER_CONN", 100),
                    help="herald delivery.per_domain.messages_per_connection (default 100)")
    ap.add_argument("--sink-rate", type=float, default=env_float("BENCH_SINK_RATE", MIB),
                    help="bytes per second the sink reads per connection "
                         "(env BENCH_SINK_RATE, default 1 MiB/s = 1048576)")
    ap.add_argument("--retry-pause", type=float, default=env_float("BENCH_RETRY_PAUSE", 0.5),
                    help="seconds before a message refused with 4xx is sent again (default 0.5)")
    ap.add_argument("--max-attempts", type=int, default=env_int("BENCH_MAX_ATTEMPTS", 1000),
                    help="attempts per message before it counts as refused (default 1000)")
    ap.add_argument("--timeout", type=float, default=env_float("BENCH_TIMEOUT", 1800),
                    help="max seconds for one run until the sink has every accepted message "
                         "(env BENCH_TIMEOUT, default 1800)")
    ap.add_argument("--drain-timeout", type=float, default=env_float("BENCH_DRAIN_TIMEOUT", 120),
                    help="max seconds for the relay's queue to empty afterwards (default 120)")
    ap.add_argument("--settle", type=float, default=env_float("BENCH_SETTLE", 1.0),
                    help="seconds to wait before the final counts (default 1)")
    args = ap.parse_args()

    if args.source_args:
        ap.error("--source-args does not apply: memory_ceiling.py sends with smtplib, not "
                 "smtp-source")
    size = args.size if args.size is not None else int(args.size_mb * MIB)
    header_len = len(message_header(marker_of("00000000", 0), 0, 0))
    if size < header_len + 2:
        ap.error(f"the message size must be at least {header_len + 2} bytes")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in ("herald", "postfix") for t in targets):
        ap.error("--targets must be a subset of herald,postfix")
    if min(args.messages, args.sessions, args.rounds, args.connections, args.max_attempts) < 1 \
            or args.flat_messages < 0 or args.sink_rate <= 0:
        ap.error("--messages, --sessions, --rounds, --connections and --max-attempts must be "
                 ">= 1, --flat-messages >= 0, --sink-rate > 0")
    # Room for the headers the relays add.
    args.max_size = size + MIB
    if sys.platform != "linux":
        log("Linux only (/proc)")
        return EXIT_SETUP
    if os.geteuid() != 0:
        log("must run as root (Postfix's master)")
        return EXIT_SETUP
    postfix_cmd = None
    if "postfix" in targets:
        postfix_cmd = find_tool("postfix")
        if not postfix_cmd:
            log("postfix not found (Debian: apt-get install postfix)")
            return EXIT_SETUP

    become_subreaper()
    install_signal_handlers()

    parent = Path(args.workdir or tempfile.gettempdir())
    # Both spools hold the whole load at worst (nothing delivered yet), one
    # after the other; a failed run's directory is kept.
    need = max(6 * 10**9, 3 * args.messages * size)
    try:
        check_disk(parent, need)
    except SetupError as e:
        log(f"error: {e}")
        return EXIT_SETUP
    base = Path(tempfile.mkdtemp(prefix="herald-memceil.", dir=parent)).resolve()
    os.chmod(base, 0o755)
    status = EXIT_OK
    try:
        args.body = message_body(size - header_len)
        herald_bin = find_herald(args) if "herald" in targets else None
        print_host_info(base)
        print(f"free space under {parent}: {shutil.disk_usage(parent).free / 1e9:.1f} GB")
        if herald_bin:
            print(f"herald-relay: {herald_bin}")
        if postfix_cmd:
            print(f"postfix: {postfix_version()} ({postfix_cmd}), private instance, "
                  "relayhost = the slow sink")
        environment_warnings(base, check_system_postfix=bool(postfix_cmd))
        status = run_all(args, base, targets, herald_bin, postfix_cmd)
    except SetupError as e:
        log(f"error: {e}")
        status = EXIT_SETUP
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        status = 130
    finally:
        reap_orphans()
        if args.keep:
            log(f"kept {base}")
        elif status != EXIT_OK:
            log(f"keeping {base} for inspection")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
