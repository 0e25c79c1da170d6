#!/usr/bin/env python3
"""End-to-end benchmark: smtp-source -> relay -> smtp-sink, herald vs. Postfix.

Default mode, for each target in one invocation:

    smtp-source -s 20 -m N -l 2048 ...  ->  relay  ->  smtp-sink (127.0.0.1)

where the relay is

  * herald-relay (target/release/herald-relay) with a trusted loopback
    listener and `delivery.smarthost` pointing at the sink, or
  * a private, throw-away Postfix instance (own config/queue/data directory,
    qmgr and the smtp client enabled, `relayhost = [127.0.0.1]:SINKPORT`).

Both queue durably (herald: group-committed spool; Postfix: cleanup(8)
fsyncs every queue file, the default).  Printed per target: delivered
messages per second (N / time from the start of smtp-source until the sink
has received all N), p50/p99 of the accept-to-delivery delay taken from the
relay's own log, peak memory; then the herald/Postfix ratios.

`--dkim ed25519|rsa` makes herald sign every message (one DKIM signature per
message, d= the smtp-source sender's domain); `--return-path` gives that
domain a return path, so herald sends with per-recipient VERP envelope
senders.  Postfix has no DKIM signer or VERP here and runs unchanged; the
report says so.  Before the rounds, one message goes through herald with the
same config to an smtp-sink that dumps it, and its DKIM-Signature is
verified with openssl (a benchmark that silently did not sign would measure
nothing).

`--backlog R` mode (herald only): feed R recipients (R/100 messages with 100
recipients each) to a herald whose smarthost is a closed port, so everything
is deferred and stays queued, and report herald's RSS with that backlog.

A benchmark, not a test: the exit status is non-zero only when a run is
broken (counts differ, a server fails), never because of the numbers.

Python 3.11, standard library only, Linux only (/proc), root.  See
tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
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
    SourceRun,
    Target,
    add_common_args,
    become_subreaper,
    env_float,
    env_int,
    environment_warnings,
    find_herald,
    find_tool,
    fmt_mb,
    install_signal_handlers,
    log,
    descendants,
    percentile,
    proc_table,
    postfix_version,
    print_host_info,
    reap_orphans,
    sender_domain,
    smtp_banner_ok,
    smtp_source_cmd,
    status_kb,
    tail,
    wait_until,
    free_port,
    herald_delivery_yaml,
)

# herald's `result` values that mean "the sink took it".  The delivery log
# line is {"fields": {"message": "delivery", "queue_id", "domain", "mx",
# "tls", "result", "reply", "delay", "recipients"}}.
HERALD_SUCCESS = {"delivered", "sent", "ok", "success", "accepted", "relayed"}

# Postfix settings that govern the delivery side; printed, not changed.
POSTFIX_DELIVERY_PARAMS = (
    "default_destination_concurrency_limit",
    "smtp_destination_concurrency_limit",
    "initial_destination_concurrency",
    "default_destination_recipient_limit",
    "default_process_limit",
    "qmgr_message_active_limit",
    "in_flow_delay",
    "smtp_connection_cache_on_demand",
    "smtp_connection_reuse_count_limit",
    "smtp_connection_reuse_time_limit",
)


# --------------------------------------------------------------------------
# The final destination: Postfix's smtp-sink with its -c counter.


class Sink:
    """smtp-sink on a free loopback port.  `-c` makes it print
    "sess=S quit=Q mesg=M\\r" to stdout every time a session ends, a QUIT
    is executed or a "." (end of DATA) is received; a reader thread keeps
    the latest mesg= value and the monotonic time it first reached `target`.
    smtp-sink accepts everything and writes nothing to disk, unless `dump`
    names a file to append every message to (-D; the DKIM preflight only)."""

    def __init__(self, binary: str, workdir: Path, ready_timeout: float,
                 dump: Path | None = None, dump_dir: Path | None = None):
        self.binary = binary
        self.dir = workdir
        self.ready_timeout = ready_timeout
        self.dump = dump
        self.dump_dir = dump_dir  # -d: one file per message in this directory
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.count = 0
        self.target = math.inf
        self.t_target: float | None = None
        self.t_first: float | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.history: list[tuple[float, int]] = []  # (monotonic time, mesg=) as it rose

    def start(self) -> None:
        self.port = free_port()
        errlog = self.dir / "smtp-sink.err"
        with open(errlog, "wb") as err:
            # -u: smtp-sink refuses to run as root without it.  The last
            # argument is the listen(2) backlog.
            dump = ["-D", str(self.dump)] if self.dump else []
            if self.dump_dir:
                dump += ["-d", f"{self.dump_dir}/%H%M%S."]
            self.proc = subprocess.Popen(
                [self.binary, "-c", "-u", "nobody", *dump, f"127.0.0.1:{self.port}", "1024"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )
        OWNED_PIDS.add(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise SetupError(f"smtp-sink exited with status {self.proc.returncode}:\n"
                                 f"{tail(errlog)}")
            return smtp_banner_ok(self.port)

        if not wait_until(up, self.ready_timeout, 0.1):
            raise SetupError(f"smtp-sink on 127.0.0.1:{self.port} did not answer 220")

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            *records, buf = buf.split(b"\r")
            if not records:
                continue
            m = re.search(rb"mesg=(\d+)", records[-1])
            if not m:
                continue
            n = int(m.group(1))
            with self._lock:
                if n > 0 and self.t_first is None:
                    self.t_first = now
                self.count = n
                self.history.append((now, n))
                if n >= self.target and self.t_target is None:
                    self.t_target = now

    def expect(self, n: int) -> None:
        with self._lock:
            self.target = n
            self.t_target = None if self.count < n else time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def time_reached(self, n: int) -> float | None:
        """When the count first reached n (the history is in rising order)."""
        with self._lock:
            return next((t for t, c in self.history if c >= n), None)

    def stop(self) -> None:
        if not self.proc:
            return
        terminate(self.proc)
        if self._reader:
            self._reader.join(timeout=5)
        OWNED_PIDS.discard(self.proc.pid)
        self.proc = None


# --------------------------------------------------------------------------
# Targets.


def herald_yaml(smarthost_port: int, args, retry_first: str | None = None) -> str:
    y = herald_delivery_yaml(smarthost_port, connections=args.herald_connections,
                             msgs_per_conn=args.herald_msgs_per_conn, retry_first=retry_first)
    if args.sending_domain:
        y += args.sending_domain.yaml()
    return y


# --------------------------------------------------------------------------
# The sending domain (--dkim, --return-path): herald only.

# --dkim value -> herald's `algorithm` and the `openssl genpkey` arguments.
# PKCS#8 PEM ("BEGIN PRIVATE KEY", genpkey's output) is what relay/src/dkim.rs
# reads for both algorithms.
DKIM_KEYS = {
    "ed25519": ("ed25519-sha256", ["-algorithm", "ed25519"]),
    "rsa": ("rsa-sha256", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
}
# The selector of each kind of key (--dkim both uses both).
DKIM_SELECTORS = {"rsa": "r1", "ed25519": "e1"}


@dataclass
class SendingDomain:
    """The `domains:` entry (and `bounces:` section) added to herald's config,
    with the files it names; created once per invocation in the work dir."""
    name: str
    dkim: str  # "none", "ed25519", "rsa" or "both"
    # kind ("rsa", "ed25519") -> (private key file, public key file)
    keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    return_path: str | None = None
    secret_file: Path | None = None

    @property
    def kinds(self) -> list[str]:
        return list(DKIM_KEYS) if self.dkim == "both" else [k for k in DKIM_KEYS if k == self.dkim]

    def yaml(self) -> str:
        y = f"domains:\n  - name: {self.name}\n"
        if self.keys:
            y += "    dkim:\n" + "".join(
                f"      - {{ selector: {DKIM_SELECTORS[k]}, algorithm: {DKIM_KEYS[k][0]}, "
                f"key_file: {key} }}\n" for k, (key, _) in self.keys.items())
        if self.return_path:
            y += f"    return_path: {self.return_path}\nbounces: {{ secret_file: {self.secret_file} }}\n"
        return y

    def describe(self) -> str:
        parts = [" + ".join(f"DKIM {DKIM_KEYS[k][0]} (d={self.name}, s={DKIM_SELECTORS[k]})"
                            for k in self.keys) or "no DKIM"]
        if self.return_path:
            parts.append(f"return_path {self.return_path} (VERP envelope sender per recipient)")
        return ", ".join(parts)


def make_sending_domain(args, base: Path) -> SendingDomain | None:
    if args.dkim == "none" and not args.return_path:
        return None
    d = SendingDomain(name=sender_domain(args), dkim=args.dkim)
    keydir = base / "keys"
    keydir.mkdir(mode=0o700)
    for kind in d.kinds:
        openssl = shutil.which("openssl")
        if not openssl:
            raise SetupError("--dkim needs openssl to generate the key (apt-get install openssl)")
        key, pub = keydir / f"dkim-{kind}.pem", keydir / f"dkim-{kind}.pub.pem"
        for cmd in ([openssl, "genpkey", *DKIM_KEYS[kind][1], "-out", str(key)],
                    [openssl, "pkey", "-in", str(key), "-pubout", "-out", str(pub)]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise SetupError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        d.keys[kind] = (key, pub)
    if args.return_path:
        d.return_path = f"bounces.{d.name}"
        d.secret_file = keydir / "bounce-keys"
        d.secret_file.write_text(secrets.token_hex(32) + "\n")  # 64 characters
    return d


# --------------------------------------------------------------------------
# Postfix's signer (--dkim): OpenDKIM as a milter, private to the run.


class OpenDkim:
    """opendkim in the foreground (-f) on a free loopback port, signing for
    the sending domain with the same keys and selectors as herald, from its
    own config file in `workdir`; started and stopped by PID, never as the
    system service.  Postfix reaches it through `smtpd_milters`."""

    def __init__(self, binary: str, workdir: Path, d: SendingDomain, ready_timeout: float):
        self.binary = binary
        self.dir = workdir
        self.d = d
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.logfile = workdir / "opendkim.log"

    def config_text(self) -> str:
        keytable, signingtable = self.dir / "opendkim.keys", self.dir / "opendkim.signing"
        # One KeyTable entry per key; MultipleSignatures makes --dkim both sign twice, like herald.
        keytable.write_text("".join(
            f"{DKIM_SELECTORS[k]}._domainkey.{self.d.name} {self.d.name}:{DKIM_SELECTORS[k]}:{key}\n"
            for k, (key, _) in self.d.keys.items()))
        signingtable.write_text("".join(
            f"*@{self.d.name} {DKIM_SELECTORS[k]}._domainkey.{self.d.name}\n" for k in self.d.keys))
        algorithm = DKIM_KEYS[next(iter(self.d.keys))][0] if len(self.d.keys) == 1 else "rsa-sha256"
        return f"""\
# Private benchmark instance generated by tests/bench/e2e_rate.py
Mode s
Socket inet:{self.port}@127.0.0.1
PidFile {self.dir}/opendkim.pid
Syslog no
LogWhy no
Canonicalization relaxed/relaxed
SignatureAlgorithm {algorithm}
KeyTable file:{keytable}
SigningTable refile:{signingtable}
MultipleSignatures yes
InternalHosts 127.0.0.0/8
# The throw-away keys live under the work dir, often in /tmp, whose mode
# OpenDKIM's safe-key check (every directory up to /) rejects.
RequireSafeKeys false
"""

    def start(self) -> None:
        self.port = free_port()
        conf = self.dir / "opendkim.conf"
        conf.write_text(self.config_text())
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen([self.binary, "-f", "-x", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        OWNED_PIDS.add(self.proc.pid)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise SetupError(f"opendkim exited with status {self.proc.returncode}:\n"
                                 f"{tail(self.logfile)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        if not wait_until(up, self.ready_timeout, 0.1):
            raise SetupError(f"opendkim did not listen on 127.0.0.1:{self.port}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def main_cf(self) -> str:
        # tempfail: with the milter unreachable smtpd answers 451 instead of
        # accepting the message unsigned, so nothing unsigned is counted.
        return (f"smtpd_milters = inet:127.0.0.1:{self.port}\n"
                "milter_default_action = tempfail\n")

    def stop(self) -> None:
        if not self.proc:
            return
        terminate(self.proc)
        OWNED_PIDS.discard(self.proc.pid)
        self.proc = None


# DKIM verification, enough for the preflight: relaxed/relaxed only (what
# herald signs with), no l= tag, the public key from our own key file rather
# than DNS.  RFC 6376 section 3.4.2 (relaxed canonicalization), 3.7 (hashes),
# 5.4.2 (headers listed more often than present); RFC 8463 (Ed25519 signs
# the SHA-256 of the header data).


def _header_fields(head: str) -> list[tuple[str, str]]:
    """(name, field with its continuation lines joined by CRLF)."""
    fields: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + "\r\n" + line)
        elif ":" in line:
            fields.append((line.split(":", 1)[0].strip(), line))
    return fields


def _relaxed_header(field: str) -> str:
    name, value = field.split(":", 1)
    value = re.sub(r"[ \t]+", " ", value.replace("\r\n", "")).strip(" ")
    return f"{name.strip().lower()}:{value}"


def _relaxed_body(body: str) -> bytes:
    lines = [re.sub(r"[ \t]+", " ", ln).rstrip(" ") for ln in body.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "".join(ln + "\r\n" for ln in lines).encode("latin-1")


def verify_dkim(message: str, d: SendingDomain, workdir: Path) -> str:
    """Checks that `message` (LF line ends, as smtp-sink dumps it) carries one
    DKIM-Signature per key of d, each verifying against its public key;
    returns their tags for the report, raises SetupError naming what is wrong."""
    head, _, body = message.replace("\r\n", "\n").partition("\n\n")
    fields = _header_fields(head)
    sigs = [f for name, f in fields if name.lower() == "dkim-signature"]
    if len(sigs) != len(d.keys):
        raise SetupError(f"the preflight message has {len(sigs)} DKIM-Signature headers, "
                         f"expected {len(d.keys)}; its header:\n{head}")
    algorithms = {DKIM_KEYS[k][0]: k for k in d.keys}
    notes = []
    for sig in sigs:
        tags = {}
        for part in sig.split(":", 1)[1].split(";"):
            if "=" in part:
                k, v = part.split("=", 1)
                tags[k.strip()] = re.sub(r"\s+", "", v)
        kind = algorithms.pop(tags.get("a", ""), None)
        if kind is None:
            raise SetupError(f"unexpected or repeated DKIM algorithm a={tags.get('a')}: {sig}")
        notes.append(_verify_one(sig, tags, kind, fields, body, d, workdir))
    return "; ".join(notes)


def _verify_one(sig: str, tags: dict[str, str], kind: str, fields: list[tuple[str, str]], body: str,
                d: SendingDomain, workdir: Path) -> str:
    want = {"v": "1", "a": DKIM_KEYS[kind][0], "d": d.name, "s": DKIM_SELECTORS[kind],
            "c": "relaxed/relaxed"}
    wrong = {k: tags.get(k) for k, v in want.items() if tags.get(k) != v}
    if wrong or "l" in tags:
        raise SetupError(f"DKIM-Signature tags {wrong or 'l='} differ from {want}: {sig}")
    bh = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode()
    if bh != tags.get("bh"):
        raise SetupError(f"DKIM body hash bh={tags.get('bh')} does not match the body "
                         f"received ({bh})")
    # The signed header data: each h= name takes the last not yet used field
    # of that name; then the signature field itself with b= empty, no CRLF.
    pool: dict[str, list[str]] = {}
    for name, f in fields:
        pool.setdefault(name.lower(), []).append(f)
    data = ""
    for name in tags.get("h", "").split(":"):
        if pool.get(name.lower()):
            data += _relaxed_header(pool[name.lower()].pop()) + "\r\n"
    name, value = sig.split(":", 1)
    data += _relaxed_header(name + ":" + re.sub(r"(^|;)(\s*b\s*=)[^;]*", r"\1\2", value))
    (workdir / "signed-data").write_bytes(data.encode("latin-1"))
    (workdir / "signature").write_bytes(base64.b64decode(tags.get("b", "")))
    pub = d.keys[kind][1]
    if kind == "rsa":
        cmd = ["openssl", "dgst", "-sha256", "-verify", str(pub),
               "-signature", str(workdir / "signature"), str(workdir / "signed-data")]
    else:
        (workdir / "signed-hash").write_bytes(hashlib.sha256(data.encode("latin-1")).digest())
        cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
               "-in", str(workdir / "signed-hash"), "-sigfile", str(workdir / "signature")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SetupError(f"the DKIM signature does not verify ({' '.join(cmd)}: "
                         f"{(r.stdout + r.stderr).strip()}); signed data:\n{data}")
    return (f"a={tags['a']} d={tags['d']} s={tags['s']}, "
            f"{len(tags.get('h', '').split(':'))} header names in h=")


def preflight(args, base: Path, herald_bin: Path, d: SendingDomain) -> str:
    """One message through herald with the benchmark's config, to an smtp-sink
    that dumps it: the DKIM signature must verify, and with a return path the
    envelope sender must be a token at it.  Returns a line for the report."""
    pdir = base / "preflight"
    pdir.mkdir()
    os.chmod(pdir, 0o777)  # smtp-sink writes its dump as nobody
    dump = pdir / "dump"
    sink = Sink(args.smtp_sink, pdir, args.ready_timeout, dump=dump)
    h: Herald | None = None
    try:
        sink.start()
        h = Herald(herald_bin, pdir, args.ready_timeout, 1,
                   extra_yaml=herald_yaml(sink.port, args), log_format="json",
                   senders=[sender_domain(args)])
        h.start()
        sink.expect(1)
        cmd = smtp_source_cmd(args, h.port, messages=1)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.drain_timeout)
        if r.returncode != 0:
            raise SetupError(f"preflight: {' '.join(cmd)} failed: {r.stdout}{r.stderr}")
        if not wait_until(lambda: sink.t_target is not None, args.drain_timeout, 0.1):
            raise SetupError(f"preflight: the sink got no message within "
                             f"{args.drain_timeout:.0f}s{h.diagnostics()}")
    finally:
        sink.stop()  # flushes the dump
        if h:
            h.stop()
    message = dump.read_text(encoding="latin-1") if dump.exists() else ""
    if not message:
        raise SetupError(f"preflight: smtp-sink wrote no dump to {dump}")
    notes = []
    if d.keys:
        notes.append("DKIM-Signature verified with openssl: " + verify_dkim(message, d, pdir))
    elif "\ndkim-signature:" in message.lower():
        raise SetupError("preflight: the message is signed although --dkim none")
    if d.return_path:
        m = re.search(r"^X-Mail-Args: <([^>]*)>", message, re.M)
        sender = m.group(1) if m else ""
        if not sender.lower().endswith("@" + d.return_path):
            raise SetupError(f"preflight: envelope sender <{sender}> is not at the return path "
                             f"{d.return_path}")
        notes.append(f"envelope sender <{sender}>")
    if not args.keep:
        shutil.rmtree(pdir, ignore_errors=True)
    return "; ".join(notes)


def postfix_preflight(args, base: Path, postfix_cmd: str, d: SendingDomain,
                      sample: int = 10) -> str:
    """`sample` messages through Postfix and OpenDKIM, configured as in the
    timed runs, to an smtp-sink that dumps each to its own file: every one
    must carry the expected DKIM-Signature(s), verified as in preflight(),
    or the signed comparison would be void.  Returns a line for the report."""
    pdir = base / "preflight-postfix"
    pdir.mkdir()
    dump_dir = pdir / "dump"
    dump_dir.mkdir()
    for p in (pdir, dump_dir):
        os.chmod(p, 0o777)  # smtp-sink writes its dumps as nobody
    sink = Sink(args.smtp_sink, pdir, args.ready_timeout, dump_dir=dump_dir)
    signer = OpenDkim(args.opendkim, pdir, d, args.ready_timeout)
    pf: Postfix | None = None
    try:
        sink.start()
        signer.start()
        pf = DeliveringPostfix(pdir / "postfix", args.ready_timeout, postfix_cmd, sink.port,
                               "tests/bench/e2e_rate.py (preflight)", signer.main_cf())
        pf.start()
        sink.expect(sample)
        cmd = smtp_source_cmd(args, pf.port, messages=sample)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.drain_timeout)
        if r.returncode != 0:
            raise SetupError(f"postfix preflight: {' '.join(cmd)} failed: {r.stdout}{r.stderr}")
        if not wait_until(lambda: sink.t_target is not None, args.drain_timeout, 0.1):
            raise SetupError(f"postfix preflight: the sink got {sink.count}/{sample} messages "
                             f"within {args.drain_timeout:.0f}s{pf.diagnostics()}\n"
                             f"opendkim:\n{tail(signer.logfile)}")
    finally:
        for thing in (pf, signer, sink):  # the sink last: it closes its dump files
            if thing is not None:
                thing.stop()
    files = sorted(p for p in dump_dir.rglob("*") if p.is_file())
    if len(files) != sample:
        raise SetupError(f"postfix preflight: {len(files)} dumped messages in {dump_dir}, "
                         f"expected {sample}")
    notes = set()
    for f in files:
        try:
            notes.add(verify_dkim(f.read_text(encoding="latin-1"), d, pdir))
        except SetupError as e:
            raise SetupError(f"postfix preflight: {f.name}: {e}") from None
    if not args.keep:
        shutil.rmtree(pdir, ignore_errors=True)
    return (f"{sample} of {sample} messages delivered by Postfix carry a DKIM-Signature "
            f"verified with openssl: " + "; ".join(sorted(notes)))


# --------------------------------------------------------------------------
# Delay extraction.


@dataclass
class Delays:
    delays: list[float] = field(default_factory=list)  # successful deliveries, seconds, sorted
    delivered: int = 0  # messages (herald) / recipients (Postfix) logged as delivered
    outcomes: Counter = field(default_factory=Counter)  # all attempt outcomes
    note: str = ""

    def pct(self, p: float) -> float | None:
        return percentile(self.delays, p)


def _ts(s: str) -> float | None:
    # "2026-11-25T19:59:09.540899Z" -> seconds; only differences matter.
    from datetime import datetime
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def herald_delays(logfile: Path) -> Delays:
    d = Delays()
    accepted_at: dict[str, float] = {}
    from_ts = 0
    try:
        f = open(logfile, errors="replace")
    except OSError:
        d.note = "no log"
        return d
    with f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            fl = obj.get("fields") or {}
            msg = fl.get("message")
            if msg == "accepted" and "queue_id" in fl:
                t = _ts(obj.get("timestamp"))
                if t is not None:
                    accepted_at[fl["queue_id"]] = t
                continue
            if msg != "delivery":
                continue
            result = str(fl.get("result", "?"))
            d.outcomes[result] += 1
            if result.lower() not in HERALD_SUCCESS:
                continue
            d.delivered += 1
            delay = fl.get("delay")
            if not isinstance(delay, (int, float)):
                # Fall back to the log timestamps of "accepted" and "delivery".
                t0, t1 = accepted_at.get(fl.get("queue_id")), _ts(obj.get("timestamp"))
                if t0 is None or t1 is None:
                    continue
                delay = t1 - t0
                from_ts += 1
            d.delays.append(float(delay))
    d.delays.sort()
    if from_ts:
        d.note = f"{from_ts} delays from log timestamps (no 'delay' field)"
    if not d.outcomes:
        d.note = "no 'delivery' lines in herald's log"
    return d


_PF_STATUS = re.compile(r"\bstatus=(\w+)")
_PF_DELAY = re.compile(r"\bdelay=([0-9.]+)")


def postfix_delays(maillog: Path) -> Delays:
    """One `status=` line per recipient and attempt from the smtp client;
    `delay=` is the time from the message's arrival (smtpd's MAIL FROM) to
    this outcome.  Postfix rounds it for the log: 0.01 s steps below 1 s,
    0.1 s below 10 s, whole seconds above (values under 10 ms print as 0)."""
    d = Delays()
    try:
        f = open(maillog, errors="replace")
    except OSError:
        d.note = "no maillog"
        return d
    with f:
        for line in f:
            if " status=" not in line or "postfix/smtp[" not in line:
                continue
            m = _PF_STATUS.search(line)
            status = m.group(1) if m else "?"
            d.outcomes[status] += 1
            if status != "sent":
                continue
            d.delivered += 1
            m = _PF_DELAY.search(line)
            if m:
                d.delays.append(float(m.group(1)))
    d.delays.sort()
    if not d.outcomes:
        d.note = "no status= lines in Postfix's maillog"
    return d


# --------------------------------------------------------------------------
# One end-to-end run.


@dataclass
class Result:
    target: str
    round: int
    messages: int
    accept_seconds: float | None  # smtp-source wall time
    deliver_seconds: float | None  # smtp-source start -> sink has N
    sink_count: int
    queue_left: int | None
    source_rc: int | None
    delays: Delays
    peak_rss_kb: int
    peak_pss_kb: int
    peak_procs: int
    vm_hwm_kb: int | None
    probe: list[float] = field(default_factory=list)  # accept latencies, seconds, sorted
    source_messages: int | None = None  # smtp-source's share of `messages` (the rest: the probe)
    cpu_seconds: float | None = None  # the relay's user+system CPU during the run (Postfix: + OpenDKIM)
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.deliver_seconds if self.deliver_seconds else 0.0

    @property
    def accept_rate(self) -> float:
        sent = self.source_messages if self.source_messages is not None else self.messages
        return sent / self.accept_seconds if self.accept_seconds else 0.0

    @property
    def cpu_us_per_msg(self) -> float | None:
        return self.cpu_seconds * 1e6 / self.messages if self.cpu_seconds is not None else None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def peak_kb(self) -> int:
        return self.vm_hwm_kb if self.vm_hwm_kb else self.peak_rss_kb


class Ceiling(Target):
    """No relay: smtp-source sends straight to the sink, which bounds what any
    relay can reach on this machine with this load (same sessions, size and
    count).  Nothing is queued and nothing is logged per message."""

    name = "ceiling"

    def __init__(self, sink: Sink):
        self.port = sink.port
        self.root_pid = sink.proc.pid
        self.seen_pids = set()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def vm_hwm_kb(self) -> int | None:
        return None

    def diagnostics(self) -> str:
        return ""


class Probe:
    """Accept latency, which smtp-source cannot give (it times nothing per
    message): `count` messages of the run's size sent from one smtplib
    connection beside smtp-source's sessions, one after another with `pause`
    between them, each timed from the DATA command to the reply after the
    final dot, i.e. until the relay has the message on disk.  It stops early
    when smtp-source is done, so that its pace never bounds the run; the run's
    N is smtp-source's messages plus those it sent, which reach the sink like
    the others."""

    def __init__(self, port: int, count: int, size: int, pause: float):
        self.port = port
        self.count = count
        self.pause = pause
        self.latencies: list[float] = []  # seconds, sorted once done
        self.error: str | None = None
        self.done = threading.Event()
        self.stop = threading.Event()
        head = ("From: <sender@bench.test>\r\nTo: <rcpt@dest.test>\r\nSubject: probe\r\n"
                "Message-ID: <{n}@probe.bench.test>\r\n\r\n")
        line = b"probe " + b"p" * 70 + b"\r\n"
        self.head = head
        self.body = line * max(1, (size - len(head)) // len(line))

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import smtplib
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as c:
                c.ehlo("probe.bench.test")
                for n in range(self.count):
                    if self.stop.is_set():
                        break
                    c.mail("sender@bench.test")
                    c.rcpt("rcpt@dest.test")
                    msg = self.head.format(n=n).encode() + self.body
                    t = time.monotonic()
                    code, reply = c.data(msg)
                    if code != 250:
                        self.error = f"message {n}: {code} {reply.decode(errors='replace')}"
                        return
                    self.latencies.append(time.monotonic() - t)
                    self.stop.wait(self.pause)
        except (OSError, smtplib.SMTPException) as e:
            self.error = f"after {len(self.latencies)} messages: {e}"
        finally:
            self.latencies.sort()
            self.done.set()


def target_alive(t: Target) -> bool:
    return t.alive()  # type: ignore[attr-defined]


def queue_left(t: Target) -> int | None:
    if isinstance(t, Ceiling):
        return 0
    try:
        return t.queue_total() if isinstance(t, Herald) else t.queued()
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        log(f"{t.name}: cannot read the queue: {e}")
        return None


def cpu_seconds(root: int) -> float | None:
    """User + system CPU time of the process tree under `root`: for every live
    process of it (all threads) utime + stime + cutime + cstime, from
    /proc/PID/stat.  A child's time moves into its parent's cutime/cstime when
    the parent reaps it, so Postfix's smtpd, cleanup and smtp processes that
    exit during a run (max_use, max_idle) are still counted, through master,
    without sampling them before they go; a process is counted once, live or
    reaped.  Only zombies not yet reaped at the instant of reading are missed."""
    table = proc_table()
    if root not in table:
        return None
    ticks = 0
    for pid in descendants(root, table):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited between the listing and the read: counted in its parent later
        fields = stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5): utime is 14, ..., cstime 17
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def run_e2e(t: Target, sink: Sink, args, rnd: int, rundir: Path,
            signer: OpenDkim | None = None) -> Result:
    n_src = args.messages - args.probe
    n = args.messages  # the most; smtp-source's plus the probe's once both are done
    base_count = sink.count
    sink.expect(base_count + n)
    probe = Probe(t.port, args.probe, args.size, args.probe_pause) if args.probe else None
    cmd = smtp_source_cmd(args, t.port, messages=n_src)

    def all_in() -> bool:
        # Whether the sink has every message sent, once the senders are done.
        if not src.done.is_set() or (probe and not probe.done.is_set()):
            return False
        return sink.count - base_count >= n_src + (len(probe.latencies) if probe else 0)

    sampler = Sampler(t.root_pid, with_pss=not args.no_pss, seen=t.seen_pids)
    sampler.sample()
    os.sync()  # don't make this run pay for the previous run's dirty pages
    # CPU time, unlike the rate, is hardly affected by other work on the
    # machine: the steadier measure of what a feature such as signing costs.
    # Postfix's is its whole tree under master plus its signer, OpenDKIM.
    def relay_cpu() -> float | None:
        if isinstance(t, Ceiling):
            return None
        c = cpu_seconds(t.root_pid)
        if c is not None and signer is not None:
            sc = cpu_seconds(signer.pid) if signer.pid else None
            c = None if sc is None else c + sc
        return c

    cpu0 = relay_cpu()
    log(f"{t.name} round {rnd}: {' '.join(cmd)}  (-> smtp-sink 127.0.0.1:{sink.port})")
    src = SourceRun(cmd, rundir / "smtp-source.out")
    problems: list[str] = []
    t0 = src.start()
    if probe:
        probe.start()
    deadline = t0 + args.timeout
    try:
        while True:
            if src.done.wait(args.sample_interval) and probe:
                probe.stop.set()
            if all_in():
                break
            sampler.sample()
            if isinstance(t, Postfix):
                reap_orphans()
            if not target_alive(t):
                raise SetupError(f"{t.name} died during the run{t.diagnostics()}")
            if signer is not None and not signer.alive():
                raise SetupError(f"opendkim died during the run:\n{tail(signer.logfile)}")
            if not sink.alive():
                raise SetupError("smtp-sink died during the run")
            if probe and probe.error:
                break  # its messages will never all reach the sink; reported below
            if src.done.is_set() and src.returncode != 0 and (not probe or probe.done.is_set()):
                break  # a failed run; reported below
            if time.monotonic() > deadline:
                problems.append(
                    f"timeout: after {args.timeout:.0f}s the sink has "
                    f"{sink.count - base_count}/{n} messages"
                    + ("" if src.done.is_set() else ", smtp-source still running"))
                log(f"{t.name}: {problems[-1]}{t.diagnostics()}")
                break
    finally:
        src.kill()
    if probe:
        probe.stop.set()
        if not probe.done.wait(30):
            problems.append("the accept-latency probe did not finish")
        elif probe.error:
            problems.append(f"accept-latency probe: {probe.error}")
        n = n_src + len(probe.latencies)
    sampler.sample(full=True)
    src.report_problems()
    if src.returncode != 0:
        problems.append(f"smtp-source exit status {src.returncode}")
    t_all = sink.time_reached(base_count + n)
    deliver_seconds = t_all - t0 if t_all is not None else None

    # Drain: the relay's queue must be empty and its log must show every
    # delivery (postlogd and herald's logger may lag the sink a little).
    left = None
    if not problems:
        wait_until(lambda: queue_left(t) == 0, args.drain_timeout, 0.2)
        left = queue_left(t)
        if left != 0:
            problems.append(f"{left} messages still queued {args.drain_timeout:.0f}s after "
                            "the sink had all of them")
        parse = (lambda: herald_delays(t.logfile)) if isinstance(t, Herald) \
            else (lambda: Delays(delivered=n)) if isinstance(t, Ceiling) \
            else (lambda: postfix_delays(t.maillog))
        # The log lags the sink by well under a second; don't wait long for
        # lines that may never come (an unrecognised log format).
        wait_until(lambda: parse().delivered >= n, min(args.drain_timeout, 15), 0.5)
    time.sleep(args.settle)  # catch duplicate deliveries arriving late
    sampler.sample(full=True)
    cpu1 = relay_cpu() if cpu0 is not None else None
    sink_count = sink.count - base_count
    if sink_count != n:
        problems.append(f"sink received {sink_count} messages, sent {n}")
    delays = herald_delays(t.logfile) if isinstance(t, Herald) \
        else Delays(delivered=n) if isinstance(t, Ceiling) else postfix_delays(t.maillog)
    if signer is not None:
        # With milter_default_action = tempfail a milter failure is a 4xx, never
        # an unsigned message; still, a run where the milter failed is void.
        milter = count_log_lines(t.maillog, b"milter")
        if milter:
            problems.append(f"{milter} lines about the milter in Postfix's maillog "
                            f"(signing with OpenDKIM failed; {t.maillog})")
    if isinstance(t, Herald) and args.sending_domain and args.sending_domain.keys:
        # herald sends a message unsigned (and logs this) when signing fails.
        unsigned = count_log_lines(t.logfile, b"DKIM signing failed")
        if unsigned:
            problems.append(f"{unsigned} messages went out unsigned ('DKIM signing failed' "
                            "in herald's log)")
    if isinstance(t, Herald):
        # Not a failure by itself, but worth seeing before the directory goes.
        try:
            with open(t.logfile, "rb") as f:
                bad = [ln for ln in f if b'"level":"WARN"' in ln or b'"level":"ERROR"' in ln]
        except OSError:
            bad = []
        if bad:
            log(f"herald: {len(bad)} WARN/ERROR lines in its log, the first: "
                + " | ".join(ln.decode(errors="replace").strip() for ln in bad[:3]))
    if delays.delivered != n:
        log(f"{t.name}: the log shows {delays.delivered} deliveries for {n} messages "
            f"(outcomes {dict(delays.outcomes)}){'; ' + delays.note if delays.note else ''}")
    return Result(
        target=t.name, round=rnd, messages=n, accept_seconds=src.elapsed,
        deliver_seconds=deliver_seconds, sink_count=sink_count, queue_left=left,
        source_rc=src.returncode, delays=delays, peak_rss_kb=sampler.peak_rss_kb,
        peak_pss_kb=sampler.peak_pss_kb, peak_procs=sampler.peak_procs,
        vm_hwm_kb=t.vm_hwm_kb(), probe=probe.latencies if probe else [], source_messages=n_src, cpu_seconds=cpu1 - cpu0 if cpu1 is not None else None,
        problems=problems,
    )


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f}"


def fmt_ms1(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "n/a"
    r = a / b
    if r >= 0.1 or r == 0:
        return f"{r:.2f}x"
    return f"{r:.3f}x (1/{1 / r:.0f})"


def print_report(results: list[Result], args, pf_params: dict[str, str]) -> None:
    print()
    print(f"smtp-source: {args.sessions} parallel sessions, {args.messages} messages/run, "
          f"{args.size}-byte messages, one recipient, one message per connection"
          + (f", extra args '{args.source_args}'" if args.source_args else ""))
    print(f"herald delivery: smarthost 127.0.0.1 (smtp-sink), tls none, per_domain "
          f"max_connections {args.herald_connections}, messages_per_connection "
          f"{args.herald_msgs_per_conn}")
    d = args.sending_domain
    print(f"herald signing: {d.describe() if d else 'none (--dkim none)'}")
    if args.preflight_note:
        print(f"        preflight message: {args.preflight_note}")
    if d and d.keys and pf_params:
        print(f"postfix signing: OpenDKIM milter ({args.opendkim}, smtpd_milters, "
              "milter_default_action = tempfail), the same key(s) and selector(s)")
        if args.postfix_preflight_note:
            print(f"        preflight: {args.postfix_preflight_note}")
    if d and d.return_path and pf_params:
        print("postfix: runs without VERP; the ratios compare herald doing that work against "
              "Postfix not doing it.")
    if pf_params:
        print("postfix delivery: relayhost = [127.0.0.1]:<sink>, defaults otherwise:")
        line = "   "
        for k, v in pf_params.items():
            item = f" {k} = {v},"
            if len(line) + len(item) > 100:
                print(line)
                line = "   "
            line += item
        print(line.rstrip(","))
    print()
    hdr = (f"{'target':<8} {'rnd':>3} {'msgs':>7} {'sink':>7} {'accept s':>8} {'deliv s':>8} "
           f"{'acc/s':>8} {'dlv/s':>8} {'p50ms':>6} {'p99ms':>6} {'maxms':>6} "
           f"{'peakMB':>7} {'sumPSS':>7} {'procs':>5} {'us/msg':>6} {'acc50':>5} {'acc99':>5}  check")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        d = r.delays
        acc = f"{r.accept_seconds:8.2f}" if r.accept_seconds else f"{'-':>8}"
        dlv = f"{r.deliver_seconds:8.2f}" if r.deliver_seconds else f"{'-':>8}"
        relay = r.target != "ceiling"
        print(f"{r.target:<8} {r.round:>3} {r.messages:>7} {r.sink_count:>7} {acc} {dlv} "
              f"{r.accept_rate:8.1f} {r.rate:8.1f} {fmt_ms(d.pct(50)):>6} {fmt_ms(d.pct(99)):>6} "
              f"{fmt_ms(d.delays[-1] if d.delays else None):>6} "
              f"{fmt_mb(r.peak_kb) if relay else '-':>7} "
              f"{fmt_mb(r.peak_pss_kb) if relay else '-':>7} {r.peak_procs if relay else '-':>5} "
              f"{'-' if r.cpu_us_per_msg is None else f'{r.cpu_us_per_msg:.0f}':>6} "
              f"{fmt_ms1(percentile(r.probe, 50)):>5} {fmt_ms1(percentile(r.probe, 99)):>5}  "
              + ("ok" if r.ok else "FAIL: " + "; ".join(r.problems)))
    print()
    print("accept s / acc/s: smtp-source wall time, and its messages (N less the probe's) divided "
          "by it;")
    print("        deliv s / dlv/s: from the start of smtp-source until smtp-sink had received all N, "
          "and N divided by it")
    print("        (the headline rate).")
    print("p50/p99/max: accept-to-delivery delay of each message from the relay's log (herald: "
          "'delay' of the")
    print("        delivery line; Postfix: 'delay=' of the status=sent line, logged with 2 "
          "significant digits).")
    print("peakMB: herald = VmHWM of the herald-relay process; postfix = peak over samples "
          f"(every {args.sample_interval * 1000:.0f} ms)")
    print("        of the summed VmRSS of the master and all its children. sumPSS: peak of "
          "the summed PSS (both targets).")
    print("us/msg: the relay's user+system CPU time during the run divided by N, in microseconds "
          "per message: herald's")
    print("        process; Postfix's tree under master (live processes' utime+stime+cutime+cstime, "
          "so children")
    print("        reaped during the run count through master's cutime) plus OpenDKIM's with --dkim.")
    print(f"acc50/acc99: p50/p99 accept latency in ms, DATA command to the reply after the dot, "
          f"of {args.probe} messages")
    print(f"        sent one at a time ({args.probe_pause * 1000:.0f} ms apart) from one smtplib "
          "connection beside smtp-source's sessions.")
    print("ceiling: smtp-source straight to smtp-sink, no relay: the most any relay can deliver "
          "here with this load.")
    print()

    by = {name: [r for r in results if r.target == name and r.ok]
          for name in ("ceiling", "herald", "postfix")}
    med: dict[str, dict[str, float | None]] = {}
    for name, rs in by.items():
        if not rs:
            continue
        m = {
            "rate": statistics.median(r.rate for r in rs),
            "p50": statistics.median(r.delays.pct(50) or 0 for r in rs) if all(r.delays.delays for r in rs) else None,
            "p99": statistics.median(r.delays.pct(99) or 0 for r in rs) if all(r.delays.delays for r in rs) else None,
            "peak": statistics.median(r.peak_kb for r in rs),
            "pss": statistics.median(r.peak_pss_kb for r in rs) if not args.no_pss else None,
            "acc99": statistics.median(percentile(r.probe, 99) for r in rs)
            if all(r.probe for r in rs) else None,
            "cpu": statistics.median(r.cpu_us_per_msg for r in rs)
            if all(r.cpu_us_per_msg is not None for r in rs) else None,
        }
        med[name] = m
        rounds = "" if len(rs) == 1 else f" (median of {len(rs)} rounds)"
        if name == "ceiling":
            print(f"{name:<8} no relay:   {m['rate']:8.1f} msg/s delivered"
                  + (f", accept p99 {fmt_ms1(m['acc99'])} ms" if m["acc99"] is not None else "")
                  + rounds)
            continue
        print(f"{name:<8} end-to-end: {m['rate']:8.1f} msg/s delivered, accept->delivery "
              f"p50 {fmt_ms(m['p50'])} ms, p99 {fmt_ms(m['p99'])} ms, peak memory "
              f"{fmt_mb(m['peak'])} MB"
              + (f", CPU {m['cpu']:.0f} us/msg" if m["cpu"] is not None else "")
              + (f", accept p99 {fmt_ms1(m['acc99'])} ms" if m["acc99"] is not None else "")
              + rounds)
    if "ceiling" in med:
        print()
        for name in ("herald", "postfix"):
            if name in med:
                print(f"{name} / ceiling delivered rate: "
                      f"{fmt_ratio(med[name]['rate'], med['ceiling']['rate'])}")
    if "herald" in med and "postfix" in med:
        h, p = med["herald"], med["postfix"]
        d = args.sending_domain
        print()
        print(f"ratio herald/postfix delivered rate: {fmt_ratio(h['rate'], p['rate'])}"
              "   (goal: at least 3x)"
              + (f"   [herald: {d.describe()}; Postfix: "
                 f"{'OpenDKIM, same keys' if d.keys else 'unsigned'}"
                 f"{', no VERP' if d.return_path else ''}]" if d else ""))
        print(f"ratio herald/postfix CPU per message: {fmt_ratio(h['cpu'], p['cpu'])}")
        print(f"ratio herald/postfix accept p99:      {fmt_ratio(h['acc99'], p['acc99'])}")
        print(f"ratio herald/postfix p50 delay:      {fmt_ratio(h['p50'], p['p50'])}")
        print(f"ratio herald/postfix p99 delay:      {fmt_ratio(h['p99'], p['p99'])}")
        print(f"RSS ratio herald/postfix (peakMB):   {fmt_ratio(h['peak'], p['peak'])}")
        if not args.no_pss:
            print(f"PSS ratio herald/postfix (sumPSS):   {fmt_ratio(h['pss'], p['pss'])}")


def run_compare(args, base: Path, targets: list[str], herald_bin: Path | None,
                postfix_cmd: str | None) -> int:
    results: list[Result] = []
    failed: dict[str, str] = {}
    status = EXIT_OK
    pf_params: dict[str, str] = {}
    current: Target | None = None
    sink: Sink | None = None
    signer: OpenDkim | None = None
    try:
        for rnd in range(1, args.rounds + 1):
            order = targets if rnd % 2 == 1 else list(reversed(targets))
            for name in order:
                if name in failed:
                    continue
                rundir = base / f"r{rnd}-{name}"
                rundir.mkdir()
                try:
                    # A fresh sink and a fresh relay with an empty queue for every run.
                    sink = Sink(args.smtp_sink, rundir, args.ready_timeout)
                    sink.start()
                    if name == "ceiling":
                        current = Ceiling(sink)
                    elif name == "herald":
                        current = Herald(herald_bin, rundir, args.ready_timeout, args.messages,
                                         extra_yaml=herald_yaml(sink.port, args),
                                         log_format="json", senders=[sender_domain(args)])
                    else:
                        if args.opendkim:
                            signer = OpenDkim(args.opendkim, rundir, args.sending_domain,
                                              args.ready_timeout)
                            signer.start()
                        current = DeliveringPostfix(
                            rundir, args.ready_timeout, postfix_cmd, sink.port,
                            "tests/bench/e2e_rate.py", signer.main_cf() if signer else "")
                    current.start()
                    if isinstance(current, Postfix) and not pf_params:
                        pf_params = current.postconf(*POSTFIX_DELIVERY_PARAMS)
                    res = run_e2e(current, sink, args, rnd, rundir, signer)
                except SetupError as e:
                    log(f"error: {name}: {e}")
                    failed[name] = str(e).splitlines()[0]
                    status = EXIT_SETUP
                    continue
                finally:
                    for thing, what in ((current, name), (signer, "opendkim"),
                                        (sink, "smtp-sink")):
                        if thing is None:
                            continue
                        try:
                            thing.stop()
                        except Exception as e:  # report, but don't mask the run's outcome
                            log(f"error while stopping {what}: {e}")
                            status = EXIT_SETUP
                    current = sink = signer = None
                results.append(res)
                log(f"{name} round {rnd}: {res.rate:.1f} msg/s delivered, "
                    f"sink {res.sink_count}/{res.messages}"
                    + ("" if res.ok else f" -- FAIL: {'; '.join(res.problems)}; kept {rundir}"))
                if res.ok and not args.keep:
                    shutil.rmtree(rundir, ignore_errors=True)
    finally:
        for thing in (current, signer, sink):
            if thing is not None:
                try:
                    thing.stop()
                except Exception as e:
                    log(f"error while stopping: {e}")
        reap_orphans()
    if results:
        print_report(results, args, pf_params)
    for name, why in failed.items():
        print(f"{name}: NOT MEASURED: {why}")
    if status != EXIT_OK:
        return status
    if any(not r.ok for r in results):
        log("FAIL: a count differs from the messages sent (see the check column)")
        return EXIT_MISMATCH
    return EXIT_OK


# --------------------------------------------------------------------------
# --backlog: herald's memory with a large deferred queue.


def dir_usage(path: Path) -> tuple[int, int]:
    """(files, bytes on disk) under path."""
    files = used = 0
    for dirpath, _dirs, names in os.walk(path):
        for nm in names:
            try:
                st = os.lstat(os.path.join(dirpath, nm))
            except OSError:
                continue
            files += 1
            used += st.st_blocks * 512
    return files, used


def count_log_lines(logfile: Path, needle: bytes) -> int:
    n = 0
    try:
        with open(logfile, "rb") as f:
            for line in f:
                if needle in line:
                    n += 1
    except OSError:
        pass
    return n


def count_delivery_lines(logfile: Path) -> int:
    return count_log_lines(logfile, b'"message":"delivery"')


def run_backlog(args, base: Path, herald_bin: Path) -> int:
    rcpts = args.backlog_rcpts
    msgs = math.ceil(args.backlog / rcpts)
    total_rcpts = msgs * rcpts
    rundir = base / "backlog-herald"
    rundir.mkdir()
    dead_port = free_port()  # nothing listens here: every attempt is refused
    h = Herald(herald_bin, rundir, args.ready_timeout, msgs,
               extra_yaml=herald_yaml(dead_port, args, retry_first=args.backlog_retry),
               log_format="json", senders=[sender_domain(args)])
    problems: list[str] = []
    out: dict[str, object] = {}
    status = EXIT_OK
    try:
        h.start()
        cmd = smtp_source_cmd(args, h.port, messages=msgs, extra=["-r", str(rcpts), "-N"])
        log(f"backlog: {' '.join(cmd)}  (smarthost 127.0.0.1:{dead_port} is closed, "
            f"retry.first {args.backlog_retry})")
        sampler = Sampler(h.root_pid, with_pss=False)
        os.sync()
        src = SourceRun(cmd, rundir / "smtp-source.out")
        t0 = src.start()
        rss_curve: list[tuple[float, int]] = []
        try:
            while not src.done.wait(1.0):
                sampler.sample()
                rss_curve.append((time.monotonic() - t0, status_kb(h.root_pid, "VmRSS") or 0))
                if not h.alive():
                    raise SetupError(f"herald died while being fed{h.diagnostics()}")
                if time.monotonic() - t0 > args.timeout:
                    problems.append(f"smtp-source did not finish within {args.timeout:.0f}s")
                    break
        finally:
            src.kill()
        src.report_problems()
        if src.returncode != 0:
            problems.append(f"smtp-source exit status {src.returncode}")
        out["feed_seconds"] = src.elapsed
        # Let every message get its first (refused) attempt and be deferred,
        # then let the process settle before reading its memory.
        t_settle = time.monotonic()
        wait_until(lambda: count_delivery_lines(h.logfile) >= msgs, args.drain_timeout, 1.0)
        out["attempted"] = count_delivery_lines(h.logfile)
        out["outcomes"] = dict(herald_delays(h.logfile).outcomes)
        out["settle_seconds"] = time.monotonic() - t_settle
        time.sleep(args.settle)
        out["vmrss_kb"] = h.vm_rss_kb()
        out["vmhwm_kb"] = h.vm_hwm_kb()
        out["rss_curve"] = rss_curve
        # Only now ask /queue: a full listing builds a large JSON document
        # inside herald and would inflate the numbers above.
        out["total"] = h.queue_total()
        out["spool"] = dir_usage(h.spool)
        if args.backlog_list:
            t1 = time.monotonic()
            body = h.get_queue(2 * msgs + 1000, timeout=args.drain_timeout)
            out["list_seconds"] = time.monotonic() - t1
            out["listed_msgs"] = len(body["messages"])
            out["listed_rcpts"] = sum(len(m.get("recipients") or ()) for m in body["messages"])
            del body
            if out["listed_rcpts"] != total_rcpts:
                problems.append(f"/queue lists {out['listed_rcpts']} recipients, sent {total_rcpts}")
            out["vmhwm_after_list_kb"] = h.vm_hwm_kb()
        if out["total"] != msgs:
            problems.append(f"/queue total is {out['total']}, sent {msgs} messages")
        if args.backlog_restart:
            h.stop()
            t1 = time.monotonic()
            h.start()
            out["restart_ready_s"] = time.monotonic() - t1
            wait_until(lambda: h.queue_total() >= msgs, args.drain_timeout, 0.5)
            out["restart_total"] = h.queue_total()
            out["restart_seconds"] = time.monotonic() - t1
            time.sleep(args.settle)
            out["restart_vmrss_kb"] = h.vm_rss_kb()
            out["restart_vmhwm_kb"] = h.vm_hwm_kb()
            if out["restart_total"] != msgs:
                problems.append(f"after restart /queue total is {out['restart_total']}, "
                                f"expected {msgs}")
    except SetupError as e:
        log(f"error: backlog: {e}")
        status = EXIT_SETUP
    except (urllib.error.URLError, OSError) as e:
        log(f"error: backlog: admin request failed: {e}{h.diagnostics()}")
        status = EXIT_SETUP
    finally:
        try:
            h.stop()
        except Exception as e:
            log(f"error while stopping herald: {e}")
            status = EXIT_SETUP

    print()
    print(f"backlog: herald only; {msgs} messages x {rcpts} recipients = {total_rcpts} "
          f"recipients, {args.size}-byte messages, {args.sessions} sessions,")
    print(f"         unique recipients (smtp-source -N); smarthost 127.0.0.1:{dead_port} "
          f"refuses connections, retry.first {args.backlog_retry}, so nothing leaves the queue")
    if args.sending_domain:
        print(f"         herald signing: {args.sending_domain.describe()}")
    if out.get("feed_seconds"):
        print(f"fed in {out['feed_seconds']:.1f} s ({msgs / out['feed_seconds']:.0f} msg/s, "
              f"{total_rcpts / out['feed_seconds']:.0f} rcpt/s); "
              f"{out.get('attempted', 0)} delivery attempts logged {out.get('outcomes', {})} "
              f"(waited {out.get('settle_seconds', 0):.1f} s for them after the feed)")
    if "vmrss_kb" in out:
        rss, hwm = out["vmrss_kb"], out["vmhwm_kb"]
        print(f"herald VmRSS {fmt_mb(rss)} MB, VmHWM {fmt_mb(hwm)} MB with the backlog queued "
              f"({(rss or 0) * 1024 / total_rcpts:.0f} bytes of RSS per recipient); "
              f"goal < 512 MiB at a million: {'met' if hwm and hwm < 512 * 1024 else 'NOT met'}")
    if "total" in out:
        files, used = out["spool"]
        print(f"/queue total: {out['total']} (sent {msgs} messages); spool on disk: "
              f"{files} files, {used / 2**20:.1f} MB")
    if "listed_rcpts" in out:
        print(f"full /queue listing: {out['listed_msgs']} messages, {out['listed_rcpts']} "
              f"recipients in {out['list_seconds']:.1f} s; VmHWM afterwards "
              f"{fmt_mb(out['vmhwm_after_list_kb'])} MB (the listing itself costs memory)")
    if "restart_vmrss_kb" in out:
        print(f"after a restart on the same spool: ready in {out['restart_ready_s']:.1f} s, "
              f"queue total {out['restart_total']} after {out['restart_seconds']:.1f} s, "
              f"VmRSS {fmt_mb(out['restart_vmrss_kb'])} MB, VmHWM "
              f"{fmt_mb(out['restart_vmhwm_kb'])} MB")
    curve = out.get("rss_curve") or []
    if curve:
        step = max(1, len(curve) // 10)
        print("VmRSS while feeding (s: MB): "
              + ", ".join(f"{t:.0f}: {kb / 1024:.0f}" for t, kb in curve[::step]))
    for p in problems:
        print(f"FAIL: {p}")
    if status != EXIT_OK:
        print("backlog: NOT MEASURED (setup error, see above)")
        return status
    if problems:
        log(f"keeping {rundir}")
        return EXIT_MISMATCH
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return EXIT_OK


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description="End-to-end delivered messages/s (smtp-source -> relay -> smtp-sink) of "
                    "herald-relay vs. a private Postfix instance, or (--backlog) herald's "
                    "memory with a large deferred queue.",
        epilog="All options also have environment-variable defaults; see tests/bench/README.md.",
    )
    add_common_args(ap)
    ap.add_argument("--herald-connections", type=int,
                    default=env_int("BENCH_HERALD_CONNECTIONS", 20),
                    help="herald delivery.per_domain.max_connections (default 20)")
    ap.add_argument("--herald-msgs-per-conn", type=int,
                    default=env_int("BENCH_HERALD_MSGS_PER_CONN", 100),
                    help="herald delivery.per_domain.messages_per_connection (default 100)")
    ap.add_argument("--dkim", default=os.environ.get("BENCH_DKIM", "none"),
                    choices=("none", "ed25519", "rsa", "both"),
                    help="herald signs every message with a fresh ed25519-sha256 or rsa-sha256 "
                         "(2048-bit) key, or both (two signatures), for the smtp-source sender's "
                         "domain, and Postfix with the same key(s) through a private OpenDKIM "
                         "milter (env BENCH_DKIM, default none)")
    ap.add_argument("--probe", type=int, default=env_int("BENCH_PROBE", 200),
                    help="messages of each run sent from a separate smtplib connection, one at a "
                         "time, to time accept latency (p50/p99); 0: none (env BENCH_PROBE, "
                         "default 200, at most a tenth of -m)")
    ap.add_argument("--probe-pause", type=float, default=env_float("BENCH_PROBE_PAUSE", 0.005),
                    help="seconds between two probe messages (default 0.005)")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                    default=os.environ.get("BENCH_CEILING", "1") != "0",
                    help="don't measure the ceiling (smtp-source straight to smtp-sink) in each "
                         "round (env BENCH_CEILING=0)")
    ap.add_argument("--return-path", action="store_true",
                    default=os.environ.get("BENCH_RETURN_PATH") == "1",
                    help="give the sender's domain return_path bounces.<domain>: herald then "
                         "sends with a VERP envelope sender per recipient; Postfix unchanged "
                         "(env BENCH_RETURN_PATH=1)")
    ap.add_argument("--backlog", type=int, default=env_int("BENCH_BACKLOG", 0), metavar="R",
                    help="instead of the comparison: queue R recipients in herald (deferred) "
                         "and report its RSS (env BENCH_BACKLOG; e.g. 1000000)")
    ap.add_argument("--backlog-rcpts", type=int, default=env_int("BENCH_BACKLOG_RCPTS", 100),
                    help="recipients per message in --backlog mode (default 100)")
    ap.add_argument("--backlog-retry", default=os.environ.get("BENCH_BACKLOG_RETRY", "1h"),
                    help="delivery.retry.first in --backlog mode (default 1h)")
    ap.add_argument("--no-backlog-list", dest="backlog_list", action="store_false",
                    help="--backlog: don't fetch the full /queue listing to count recipients")
    ap.add_argument("--no-backlog-restart", dest="backlog_restart", action="store_false",
                    help="--backlog: don't restart herald on the spool and measure again")
    ap.add_argument("--timeout", type=float, default=env_float("BENCH_TIMEOUT", 1800),
                    help="max seconds for one run until the sink has all messages, or for the "
                         "backlog feed (env BENCH_TIMEOUT, default 1800)")
    ap.add_argument("--drain-timeout", type=float, default=env_float("BENCH_DRAIN_TIMEOUT", 120),
                    help="max seconds to wait for the queue to empty / the log to catch up "
                         "(default 120)")
    ap.add_argument("--settle", type=float, default=env_float("BENCH_SETTLE", 1.0),
                    help="seconds to wait before the final counts (default 1)")
    args = ap.parse_args()

    if args.dkim not in ("none", "ed25519", "rsa", "both"):  # BENCH_DKIM bypasses choices
        ap.error(f"--dkim/BENCH_DKIM must be none, ed25519, rsa or both, not {args.dkim!r}")
    args.sending_domain = None
    args.preflight_note = ""
    args.postfix_preflight_note = ""
    args.opendkim = None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.backlog:
        targets = ["herald"]
    if not targets or any(t not in ("herald", "postfix") for t in targets):
        ap.error("--targets must be a subset of herald,postfix")
    if args.dkim == "both" and "postfix" in targets and not args.backlog:
        # OpenDKIM's SignatureAlgorithm applies to every key it signs with.
        ap.error("--dkim both: OpenDKIM signs with one algorithm only, so Postfix cannot match "
                 "it; use --targets herald")
    args.probe = 0 if args.backlog else max(0, min(args.probe, args.messages // 10))
    if args.ceiling and not args.backlog:
        targets = ["ceiling", *targets]
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1 or args.backlog < 0 \
            or args.backlog_rcpts < 1:
        ap.error("--messages, --sessions, --rounds and --backlog-rcpts must be >= 1")
    if sys.platform != "linux":
        log("Linux only (/proc)")
        return EXIT_SETUP
    if os.geteuid() != 0:
        log("must run as root (Postfix's master; smtp-sink -u)")
        return EXIT_SETUP

    args.smtp_source = find_tool("smtp-source")
    args.smtp_sink = find_tool("smtp-sink")
    if not args.smtp_source or not args.smtp_sink:
        log("smtp-source/smtp-sink not found (Debian: apt-get install postfix)")
        return EXIT_SETUP
    postfix_cmd = None
    if "postfix" in targets:
        postfix_cmd = find_tool("postfix")
        if not postfix_cmd:
            log("postfix not found (Debian: apt-get install postfix)")
            return EXIT_SETUP
        if args.dkim != "none":
            args.opendkim = find_tool("opendkim")
            if not args.opendkim:
                log("--dkim signs Postfix's mail with OpenDKIM, which is not installed "
                    "(Debian: apt-get install opendkim opendkim-tools; see tests/bench/README.md)")
                return EXIT_SETUP

    become_subreaper()
    install_signal_handlers()

    base = Path(tempfile.mkdtemp(prefix="herald-e2e.", dir=args.workdir)).resolve()
    os.chmod(base, 0o755)  # the postfix user must traverse into its queue
    status = EXIT_OK
    try:
        herald_bin = find_herald(args) if "herald" in targets else None
        print_host_info(base)
        if herald_bin:
            print(f"herald-relay: {herald_bin}")
        if postfix_cmd:
            print(f"postfix: {postfix_version()} ({postfix_cmd}), private instance, "
                  "relayhost = the sink")
        if not args.backlog:
            print(f"sink: {args.smtp_sink} -c on 127.0.0.1 (discards everything)")
        environment_warnings(base, check_system_postfix=bool(postfix_cmd))
        if herald_bin or args.opendkim:
            args.sending_domain = make_sending_domain(args, base)
        if args.sending_domain and herald_bin:
            print(f"herald signing: {args.sending_domain.describe()}; checking one message "
                  "first ...")
            args.preflight_note = preflight(args, base, herald_bin, args.sending_domain)
            print(f"preflight: {args.preflight_note}")
        if args.opendkim:
            print(f"postfix signing: OpenDKIM ({args.opendkim}) as a milter; checking a sample "
                  "first ...")
            args.postfix_preflight_note = postfix_preflight(args, base, postfix_cmd,
                                                            args.sending_domain)
            print(f"postfix preflight: {args.postfix_preflight_note}")
        if args.backlog:
            status = run_backlog(args, base, herald_bin)
        else:
            status = run_compare(args, base, targets, herald_bin, postfix_cmd)
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
