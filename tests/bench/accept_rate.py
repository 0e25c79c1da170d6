#!/usr/bin/env python3
"""Accept-rate benchmark: herald-relay vs. a private Postfix instance.

Runs Postfix's smtp-source load generator against

  * herald-relay (target/release/herald-relay, trusted loopback listener), and
  * a private, throw-away Postfix instance from the distribution package
    (own config_directory / queue_directory / data_directory in a temp dir,
    smtpd on a free 127.0.0.1 port, qmgr disabled so nothing is delivered),

one after the other in the same invocation, and prints accepted messages per
second for both, the ratio, and peak memory.  Both servers queue to a durable
on-disk spool on the same filesystem: Postfix's cleanup(8) fsyncs every queue
file before smtpd answers 250 to the end of DATA (the default,
untouched here).

This is a benchmark, not a test: the exit status is non-zero only when
something is broken (setup failure, smtp-source failure, queue count != number
of messages sent), never because of the numbers.

Python 3.11, standard library only.  Linux only (/proc).  Must run as root
(Postfix's master runs as root and its queue must be owned by the postfix
user).  See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# Exit codes.
EXIT_OK = 0
EXIT_MISMATCH = 1  # smtp-source failed or queue count != messages sent
EXIT_SETUP = 2  # could not set up / start / stop a target


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else default


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    # state is the first field after the ")" closing comm
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] != b"Z"


def wait_until(pred, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------
# Child reaping.  Postfix's master daemonizes; in containers PID 1 often does
# not reap orphans.  We become a "child subreaper" so the daemonized master
# (and any of its leftovers) is re-parented to us, and reap those zombies
# ourselves -- but never a child that a subprocess.Popen object owns.

_OWNED_PIDS: set[int] = set()


def become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log("warning: prctl(PR_SET_CHILD_SUBREAPER) failed; ignoring")
    except Exception as e:  # pragma: no cover - non-glibc platforms
        log(f"warning: cannot become subreaper: {e}")


def reap_orphans() -> None:
    me = os.getpid()
    for ent in os.listdir("/proc"):
        if not ent.isdigit():
            continue
        pid = int(ent)
        if pid in _OWNED_PIDS:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        if rest[0] == b"Z" and int(rest[1]) == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


# --------------------------------------------------------------------------
# Memory sampling.


def proc_table() -> dict[int, int]:
    """pid -> ppid for all live (non-zombie) processes."""
    out = {}
    for ent in os.listdir("/proc"):
        if not ent.isdigit():
            continue
        try:
            with open(f"/proc/{ent}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        if rest[0] == b"Z":
            continue
        out[int(ent)] = int(rest[1])
    return out


def descendants(root: int, table: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        if p not in table:
            continue
        out.append(p)
        stack.extend(children.get(p, ()))
    return out


def status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Sampler:
    """Samples the summed RSS (and PSS) of a process tree rooted at `root`."""

    root: int
    with_pss: bool = True
    pss_every: int = 5  # smaps_rollup is ~4x as expensive as statm; read it less often
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    peak_procs: int = 0
    samples: int = 0
    seen: set[int] = field(default_factory=set)

    def sample(self, full: bool = False) -> None:
        pids = descendants(self.root, proc_table())
        self.seen.update(pids)
        rss = sum(rss_kb(p) for p in pids)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        if self.with_pss and (full or self.samples % self.pss_every == 0):
            self.peak_pss_kb = max(self.peak_pss_kb, sum(pss_kb(p) for p in pids))
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1


# --------------------------------------------------------------------------
# Targets.


class Target:
    name = "?"
    port: int
    root_pid: int
    seen_pids: set[int]  # every pid the memory sampler saw in this target's tree

    def start(self) -> None: ...

    def queued(self) -> int: ...

    def vm_hwm_kb(self) -> int | None:
        return None

    def stop(self) -> None: ...

    def diagnostics(self) -> str:
        return ""


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(lines[-n:])


class Herald(Target):
    name = "herald"

    def __init__(self, binary: Path, workdir: Path, ready_timeout: float, expected: int):
        self.binary = binary
        self.expected = expected
        self.dir = workdir
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.seen_pids = set()
        self.logfile = self.dir / "herald.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "spool").mkdir()
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        cfg = self.dir / "herald.yaml"
        cfg.write_text(
            "hostname: bench.herald.test\n"
            f"spool_dir: {self.dir / 'spool'}\n"
            "listeners:\n"
            "  - name: trusted\n"
            f"    address: 127.0.0.1:{self.port}\n"
            "    allow_networks: [127.0.0.0/8]\n"
            f"admin: {{ address: 127.0.0.1:{self.admin_port} }}\n"
        )
        with open(self.logfile, "wb") as lf:
            self.proc = subprocess.Popen(
                [str(self.binary), "--config", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=lf,
                stderr=subprocess.STDOUT,
            )
        _OWNED_PIDS.add(self.proc.pid)
        self.root_pid = self.proc.pid

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise SetupError(
                    f"herald-relay exited with status {self.proc.returncode} before "
                    f"becoming ready (log {self.logfile}):\n{tail(self.logfile)}"
                )
            try:
                with urllib.request.urlopen(self.admin_url("/readyz"), timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        if not wait_until(ready, self.ready_timeout, 0.1):
            raise SetupError(
                f"herald-relay not ready (GET /readyz != 200) after "
                f"{self.ready_timeout:.0f}s (log {self.logfile}):\n{tail(self.logfile)}"
            )

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def queued(self) -> int:
        # /queue lists at most `limit` messages (server default 100000); ask for
        # more than we sent so the listing is never the thing that's short.
        limit = max(100_000, 2 * self.expected)
        with urllib.request.urlopen(self.admin_url(f"/queue?limit={limit}"), timeout=120) as r:
            body = json.load(r)
        n = len(body["messages"])
        total = body.get("total")
        if total is not None and total != n:
            log(f"herald /queue: total={total} but {n} messages listed")
        return n

    def vm_hwm_kb(self) -> int | None:
        return status_kb(self.proc.pid, "VmHWM") if self.proc else None

    def stop(self) -> None:
        if not self.proc:
            return
        p = self.proc
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log("herald-relay did not exit 20s after SIGTERM; sending SIGKILL")
                p.kill()
                p.wait(timeout=10)
        _OWNED_PIDS.discard(p.pid)
        self.proc = None

    def diagnostics(self) -> str:
        return f"herald log ({self.logfile}):\n{tail(self.logfile)}"


POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix(Target):
    """A private Postfix instance; never touches the system instance."""

    name = "postfix"

    def __init__(self, workdir: Path, ready_timeout: float, postfix_cmd: str):
        self.dir = workdir
        self.ready_timeout = ready_timeout
        self.postfix = postfix_cmd
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.started = False
        self.master_pid: int | None = None
        self.seen_pids: set[int] = set()

    def write_config(self) -> None:
        d = self.dir
        # main.cf: everything that matters is explicit.  Durability settings
        # (cleanup fsync of queue files) are left at their defaults.
        (self.conf / "main.cf").write_text(
            f"""\
# Private benchmark instance generated by tests/bench/accept_rate.py
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
myhostname = bench.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks_style = host
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
# no DNS: no reverse lookup of SMTP clients, no DNS in the (unused) SMTP client
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
# Flow control: cleanup(8) waits up to in_flow_delay for a token that qmgr(8)
# puts back after it has picked up a message.  qmgr is disabled here (nothing
# is delivered), so without this every message would stall for 1s.
in_flow_delay = 0
# no local aliases / biff / TLS
alias_maps =
alias_database =
biff = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
# log to a file in the instance directory (via postlogd(8)), not syslog
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
"""
        )
        # master.cf: smtpd on a private loopback port plus the services
        # smtpd/cleanup need.  qmgr (and pickup, the delivery agents, ...)
        # are deliberately absent: mail is accepted into the durable queue
        # (incoming/) and stays there.
        (self.conf / "master.cf").write_text(
            f"""\
# service  type  private unpriv chroot wakeup maxproc command
127.0.0.1:{self.port} inet n - n - - smtpd
cleanup    unix  n       -      n      -      0       cleanup
rewrite    unix  -       -      n      -      -       trivial-rewrite
bounce     unix  -       -      n      -      0       bounce
defer      unix  -       -      n      -      0       bounce
trace      unix  -       -      n      -      0       bounce
proxymap   unix  -       -      n      -      -       proxymap
anvil      unix  -       -      n      -      1       anvil
postlog    unix-dgram n  -      n      -      1       postlogd
#qmgr      unix  n       -      n      300    1       qmgr   (disabled: no delivery)
"""
        )

    def pfx(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.postfix, "-c", str(self.conf), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        for p in (self.conf, self.queue, self.data):
            p.mkdir()
        shutil.chown(self.data, "postfix", "postfix")
        self.port = free_port()
        self.write_config()
        # `postfix start` runs `postfix-script check-fatal`, which runs
        # `post-install create-missing` and creates/chowns the queue subdirs.
        self.started = True  # from now on, always try `postfix stop`
        r = self.pfx("start")
        if r.returncode != 0:
            raise SetupError(
                f"`postfix -c {self.conf} start` failed (status {r.returncode})\n"
                f"{r.stdout}{r.stderr}{self.diagnostics()}"
            )
        pidfile = self.queue / "pid" / "master.pid"

        def have_pid() -> bool:
            try:
                self.master_pid = int(pidfile.read_text().strip())
                return pid_alive(self.master_pid)
            except (OSError, ValueError):
                return False

        if not wait_until(have_pid, self.ready_timeout):
            raise SetupError(f"no live Postfix master ({pidfile})\n{self.diagnostics()}")
        self.root_pid = self.master_pid

        def banner() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.settimeout(5)
                    ok = s.recv(512).startswith(b"220")
                    s.sendall(b"QUIT\r\n")
                    return ok
            except OSError:
                return False

        if not wait_until(banner, self.ready_timeout, 0.2):
            raise SetupError(
                f"Postfix smtpd on 127.0.0.1:{self.port} did not answer 220 within "
                f"{self.ready_timeout:.0f}s\n{self.diagnostics()}"
            )

    def queued(self) -> int:
        n = 0
        for q in POSTFIX_QUEUES:
            for _dirpath, _dirs, files in os.walk(self.queue / q):
                n += len(files)
        return n

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            r = self.pfx("stop", timeout=60)
            if r.returncode != 0:
                log(f"`postfix -c {self.conf} stop` status {r.returncode}: "
                    f"{(r.stdout + r.stderr).strip()}")
        except subprocess.TimeoutExpired:
            log("`postfix stop` timed out")
        mp = self.master_pid
        if mp and not wait_until(lambda: not pid_alive(mp), 30):
            log(f"Postfix master {mp} still running 30s after stop; trying `postfix abort`")
            try:
                self.pfx("abort", timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if not wait_until(lambda: not pid_alive(mp), 10):
                log(f"killing Postfix master {mp}")
                try:
                    os.kill(mp, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Children notice the master is gone and exit on their own; give them
        # a moment, then SIGKILL whatever of *this instance* is left.
        leftovers = {p for p in self.seen_pids if p != mp} | self._instance_pids()

        def gone() -> bool:
            reap_orphans()
            return not any(pid_alive(p) and self._is_ours(p) for p in leftovers)

        if not wait_until(gone, 15):
            for p in leftovers:
                if pid_alive(p) and self._is_ours(p):
                    log(f"killing leftover Postfix process {p}")
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            wait_until(gone, 5)
        reap_orphans()

    def _instance_pids(self) -> set[int]:
        return {p for p in proc_table() if p != os.getpid() and self._is_ours(p)}

    def _is_ours(self, pid: int) -> bool:
        """Guard against pid reuse: a process of this instance has
        MAIL_CONFIG=<our conf dir> in its environment (master exports it)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f"MAIL_CONFIG={self.conf}".encode() in f.read().split(b"\0")
        except OSError:
            return False

    def diagnostics(self) -> str:
        return f"\nPostfix maillog ({self.maillog}):\n{tail(self.maillog)}"


# --------------------------------------------------------------------------
# One measured run.


@dataclass
class Result:
    target: str
    round: int
    messages: int
    seconds: float
    queued: int
    source_rc: int
    peak_rss_kb: int
    peak_pss_kb: int
    peak_procs: int
    vm_hwm_kb: int | None
    samples: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.source_rc == 0 and self.queued == self.messages

    @property
    def peak_kb(self) -> int:
        """Headline peak-memory number (see README)."""
        return self.vm_hwm_kb if self.vm_hwm_kb else self.peak_rss_kb


def run_load(t: Target, args, rnd: int, rundir: Path) -> Result:
    cmd = [
        args.smtp_source,
        "-s", str(args.sessions),
        "-m", str(args.messages),
        "-l", str(args.size),
        "-f", "sender@bench.test",
        "-t", "rcpt@dest.test",
        *args.source_args.split(),
        f"127.0.0.1:{t.port}",
    ]
    sampler = Sampler(t.root_pid, with_pss=not args.no_pss, seen=t.seen_pids)
    sampler.sample()
    os.sync()  # don't make this run pay for the previous run's dirty pages
    out_path = rundir / "smtp-source.out"
    log(f"{t.name} round {rnd}: {' '.join(cmd)}")
    with open(out_path, "wb") as out:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _OWNED_PIDS.add(p.pid)
        # A thread blocks in waitpid() so the end time is exact, not rounded up
        # to the sampling period; the main thread samples memory meanwhile.
        t_end: list[float] = []
        done = threading.Event()

        def waiter() -> None:
            p.wait()
            t_end.append(time.monotonic())
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        try:
            deadline = t0 + args.timeout
            while not done.wait(args.sample_interval):
                sampler.sample()
                if isinstance(t, Postfix):
                    reap_orphans()
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"smtp-source against {t.name} did not finish within "
                        f"{args.timeout:.0f}s{t.diagnostics()}"
                    )
            elapsed = t_end[0] - t0
        finally:
            if not done.is_set():
                p.kill()
                done.wait(30)
            _OWNED_PIDS.discard(p.pid)
    sampler.sample(full=True)
    text = out_path.read_text(errors="replace").strip()
    if p.returncode != 0 or text:
        log(f"smtp-source exit status {p.returncode}; output:\n{text[-3000:]}")
    queued = t.queued()
    hwm = t.vm_hwm_kb()
    return Result(
        target=t.name, round=rnd, messages=args.messages, seconds=elapsed,
        queued=queued, source_rc=p.returncode, peak_rss_kb=sampler.peak_rss_kb,
        peak_pss_kb=sampler.peak_pss_kb, peak_procs=sampler.peak_procs,
        vm_hwm_kb=hwm, samples=sampler.samples,
    )


# --------------------------------------------------------------------------


def fs_of(path: Path) -> str:
    best, fstype = "", "?"
    p = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return f"{fstype} ({best})"


def find_herald(args) -> Path:
    binary = Path(args.herald_bin) if args.herald_bin else REPO / "target/release/herald-relay"
    if os.environ.get("HERALD_BUILD") == "1" or not binary.exists():
        if args.herald_bin:
            if not binary.exists():
                raise SetupError(f"{binary} does not exist")
        else:
            log("building herald-relay: cargo build --release -p herald-relay")
            r = subprocess.run(
                ["cargo", "build", "--release", "-p", "herald-relay"],
                cwd=REPO, stdin=subprocess.DEVNULL, timeout=args.build_timeout,
            )
            if r.returncode != 0 or not binary.exists():
                raise SetupError(f"cargo build failed (status {r.returncode})")
    return binary


def default_postfix_running() -> int | None:
    """PID of a running default-instance Postfix master, if any."""
    try:
        qd = subprocess.run(["postconf", "-h", "queue_directory"], capture_output=True,
                            text=True, timeout=30).stdout.strip() or "/var/spool/postfix"
        pid = int(Path(qd, "pid", "master.pid").read_text().strip())
        return pid if pid_alive(pid) else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def fmt_mb(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.1f}"


def print_report(results: list[Result], args) -> None:
    print()
    print(f"smtp-source: {args.sessions} parallel sessions, {args.messages} messages/run, "
          f"{args.size}-byte messages, one message per connection"
          + (f", extra args '{args.source_args}'" if args.source_args else ""))
    print()
    hdr = (f"{'target':<8} {'round':>5} {'msgs':>7} {'queued':>7} {'seconds':>8} "
           f"{'msg/s':>9} {'peakMB':>7} {'sumRSS':>7} {'sumPSS':>7} {'procs':>5}  check")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r.target:<8} {r.round:>5} {r.messages:>7} {r.queued:>7} {r.seconds:>8.2f} "
              f"{r.rate:>9.1f} {fmt_mb(r.peak_kb):>7} {fmt_mb(r.peak_rss_kb):>7} "
              f"{fmt_mb(r.peak_pss_kb):>7} {r.peak_procs:>5}  "
              + ("ok" if r.ok else f"FAIL (smtp-source rc={r.source_rc}, queued {r.queued} != {r.messages})"))
    print()
    print("peakMB: herald = VmHWM of the herald-relay process (/proc/PID/status);")
    print(f"        postfix = peak over samples (every {args.sample_interval * 1000:.0f} ms) of the summed "
          "VmRSS of the master and all its children")
    print("        (smtpd, cleanup, trivial-rewrite, anvil, proxymap, postlogd, ...).")
    print("sumRSS/sumPSS: the same sampling for both targets (PSS from smaps_rollup, every "
          f"{args.sample_interval * 5000:.0f} ms);")
    print("        RSS counts shared pages (libc, libpostfix-*.so, ...) once per process, PSS splits")
    print("        them between processes, so sumPSS is the fairer multi-process total.")
    print()

    by = {name: [r for r in results if r.target == name] for name in ("herald", "postfix")}
    med = {}
    for name, rs in by.items():
        if rs:
            med[name] = (
                statistics.median(r.rate for r in rs),
                statistics.median(r.peak_kb for r in rs),
                statistics.median(r.peak_pss_kb for r in rs) if not args.no_pss else 0,
            )
            rounds = "" if len(rs) == 1 else f" (median of {len(rs)} rounds)"
            print(f"{name:<8} accept rate: {med[name][0]:9.1f} msg/s, peak memory: "
                  f"{fmt_mb(med[name][1])} MB{rounds}")
    if "herald" in med and "postfix" in med:
        h, p = med["herald"], med["postfix"]
        print()
        print(f"ratio herald/postfix accept rate: {h[0] / p[0]:.2f}x" if p[0] else
              "ratio herald/postfix accept rate: n/a")
        print(f"RSS ratio herald/postfix (peakMB): {h[1] / p[1]:.2f}x" if p[1] else
              "RSS ratio herald/postfix: n/a")
        if not args.no_pss and p[2]:
            print(f"PSS ratio herald/postfix (sumPSS): {h[2] / p[2]:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Accepted-messages/s of herald-relay vs. a private Postfix instance "
                    "(smtp-source, loopback, durable queue).",
        epilog="All options also have environment-variable defaults; see tests/bench/README.md.",
    )
    ap.add_argument("-m", "--messages", type=int, default=env_int("BENCH_MESSAGES", 20000),
                    help="messages per run (env BENCH_MESSAGES, default 20000)")
    ap.add_argument("-s", "--sessions", type=int, default=env_int("BENCH_SESSIONS", 20),
                    help="parallel SMTP sessions (env BENCH_SESSIONS, default 20)")
    ap.add_argument("-l", "--size", type=int, default=env_int("BENCH_MSG_SIZE", 2048),
                    help="message size in bytes (env BENCH_MSG_SIZE, default 2048)")
    ap.add_argument("-r", "--rounds", type=int, default=env_int("BENCH_ROUNDS", 1),
                    help="runs per target, alternating (env BENCH_ROUNDS, default 1)")
    ap.add_argument("--targets", default=os.environ.get("BENCH_TARGETS", "herald,postfix"),
                    help="comma-separated subset of herald,postfix (env BENCH_TARGETS)")
    ap.add_argument("--workdir", default=os.environ.get("BENCH_DIR") or None,
                    help="parent of the temporary directory holding both spools "
                         "(env BENCH_DIR, default: $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", default=os.environ.get("BENCH_KEEP") == "1",
                    help="keep the temporary directory (env BENCH_KEEP=1)")
    ap.add_argument("--herald-bin", default=os.environ.get("HERALD_BIN") or None,
                    help="herald-relay binary (env HERALD_BIN, default target/release/herald-relay, "
                         "built with cargo if missing or HERALD_BUILD=1)")
    ap.add_argument("--source-args", default=os.environ.get("BENCH_SOURCE_ARGS", ""),
                    help="extra smtp-source arguments, e.g. '-d' to reuse connections "
                         "(env BENCH_SOURCE_ARGS)")
    ap.add_argument("--timeout", type=float, default=env_float("BENCH_TIMEOUT", 1800),
                    help="max seconds for one smtp-source run (env BENCH_TIMEOUT, default 1800)")
    ap.add_argument("--ready-timeout", type=float, default=env_float("BENCH_READY_TIMEOUT", 60),
                    help="max seconds for a server to become ready (default 60)")
    ap.add_argument("--build-timeout", type=float, default=env_float("BENCH_BUILD_TIMEOUT", 3600))
    ap.add_argument("--sample-interval", type=float, default=env_float("BENCH_SAMPLE_INTERVAL", 0.1),
                    help="RSS sampling period in seconds (default 0.1)")
    ap.add_argument("--no-pss", action="store_true", help="don't sample PSS (smaps_rollup)")
    args = ap.parse_args()

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in ("herald", "postfix") for t in targets):
        ap.error("--targets must be a subset of herald,postfix")
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1:
        ap.error("--messages, --sessions and --rounds must be >= 1")
    if sys.platform != "linux":
        log("Linux only (/proc)")
        return EXIT_SETUP

    args.smtp_source = shutil.which("smtp-source") or shutil.which("smtp-source", path="/usr/sbin")
    if not args.smtp_source:
        log("smtp-source not found (Debian: apt-get install postfix)")
        return EXIT_SETUP
    postfix_cmd = None
    if "postfix" in targets:
        if os.geteuid() != 0:
            log("the Postfix target must run as root")
            return EXIT_SETUP
        postfix_cmd = shutil.which("postfix") or shutil.which("postfix", path="/usr/sbin")
        if not postfix_cmd:
            log("postfix not found (Debian: apt-get install postfix)")
            return EXIT_SETUP

    become_subreaper()

    # Make SIGTERM/SIGHUP unwind through the finally blocks (Ctrl-C already does).
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    base = Path(tempfile.mkdtemp(prefix="herald-bench.", dir=args.workdir)).resolve()
    os.chmod(base, 0o755)  # the postfix user must traverse into its queue
    results: list[Result] = []
    current: Target | None = None
    failed: dict[str, str] = {}
    status = EXIT_OK
    try:
        herald_bin = find_herald(args) if "herald" in targets else None

        pv = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True,
                            text=True, timeout=30).stdout.strip() if postfix_cmd else ""
        print(f"host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}")
        print(f"spool/queue filesystem: {fs_of(base)}  ({base})")
        if herald_bin:
            print(f"herald-relay: {herald_bin}")
        if pv:
            print(f"postfix: {pv} ({postfix_cmd}), private instance, qmgr disabled")
        if fs_of(base).startswith("tmpfs"):
            log("warning: work directory is on tmpfs -- fsync is a no-op, "
                "numbers do not reflect a durable queue; set BENCH_DIR")
        load1 = os.getloadavg()[0]
        if load1 > 0.5 * (os.cpu_count() or 1):
            log(f"warning: 1-minute load average is {load1:.1f} on {os.cpu_count()} CPUs; "
                "something else is running and the numbers will be noisy")
        if postfix_cmd and (dp := default_postfix_running()):
            log(f"warning: the system Postfix instance is running (master pid {dp}); "
                "it is not used, but it competes for CPU")

        for rnd in range(1, args.rounds + 1):
            order = targets if rnd % 2 == 1 else list(reversed(targets))
            for name in order:
                if name in failed:
                    continue
                rundir = base / f"r{rnd}-{name}"
                rundir.mkdir()
                current = (Herald(herald_bin, rundir, args.ready_timeout, args.messages) if name == "herald"
                           else Postfix(rundir, args.ready_timeout, postfix_cmd))
                try:
                    current.start()
                    res = run_load(current, args, rnd, rundir)
                except SetupError as e:
                    # Keep going with the other target; report and fail at the end.
                    log(f"error: {name}: {e}")
                    failed[name] = str(e).splitlines()[0]
                    status = EXIT_SETUP
                    continue
                finally:
                    try:
                        current.stop()
                    except Exception as e:  # report, but don't mask the run's outcome
                        log(f"error while stopping {name}: {e}")
                        status = EXIT_SETUP
                    current = None
                results.append(res)
                log(f"{name} round {rnd}: {res.rate:.1f} msg/s, queued {res.queued}/{res.messages}")
                if not res.ok:
                    log(f"{name}: count mismatch or smtp-source failure; kept {rundir}")
                elif not args.keep:
                    shutil.rmtree(rundir, ignore_errors=True)
    except SetupError as e:
        log(f"error: {e}")
        status = EXIT_SETUP
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        status = 130
    finally:
        if current is not None:
            try:
                current.stop()
            except Exception as e:  # keep cleaning up
                log(f"error while stopping {current.name}: {e}")
        reap_orphans()
        if args.keep:
            log(f"kept {base}")
        elif status == EXIT_SETUP or any(not r.ok for r in results):
            log(f"keeping {base} for inspection")
        else:
            shutil.rmtree(base, ignore_errors=True)

    if results:
        print_report(results, args)
    for name, why in failed.items():
        print(f"{name}: NOT MEASURED: {why}")
    if status != EXIT_OK:
        return status
    if any(not r.ok for r in results):
        log("FAIL: queue count differs from messages sent (or smtp-source failed)")
        return EXIT_MISMATCH
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
