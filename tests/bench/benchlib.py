"""Shared pieces of the herald-relay benchmarks in tests/bench/.

Used by accept_rate.py (accept into a durable queue), e2e_rate.py
(smtp-source -> relay -> smtp-sink) and memory_ceiling.py (large messages to
a slow sink).  Python 3.11, standard library only,
Linux only (/proc).  Nothing in here measures anything by itself; see
tests/bench/README.md for what the scripts do with it.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
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
EXIT_MISMATCH = 1  # smtp-source failed or a count differs from the messages sent
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


def add_common_args(ap, *, messages: int = 20000, sessions: int = 20,
                    size: int | None = 2048) -> None:
    """The options every benchmark takes (load shape, targets, binaries, work
    dir, sampling), with the script's defaults for the load shape; size None:
    the script has its own way to give it, -l overrides that when set."""
    ap.add_argument("-m", "--messages", type=int, default=env_int("BENCH_MESSAGES", messages),
                    help=f"messages per run (env BENCH_MESSAGES, default {messages})")
    ap.add_argument("-s", "--sessions", type=int, default=env_int("BENCH_SESSIONS", sessions),
                    help=f"parallel SMTP sessions (env BENCH_SESSIONS, default {sessions})")
    ap.add_argument("-l", "--size", type=int,
                    default=env_int("BENCH_MSG_SIZE", size) if size is not None
                    else (env_int("BENCH_MSG_SIZE", 0) or None),
                    help="message size in bytes (env BENCH_MSG_SIZE, "
                         + (f"default {size})" if size is not None else "default: see below)"))
    ap.add_argument("-r", "--rounds", type=int, default=env_int("BENCH_ROUNDS", 1),
                    help="runs per target, alternating (env BENCH_ROUNDS, default 1)")
    ap.add_argument("--targets", default=os.environ.get("BENCH_TARGETS", "herald,postfix"),
                    help="comma-separated subset of herald,postfix (env BENCH_TARGETS)")
    ap.add_argument("--workdir", default=os.environ.get("BENCH_DIR") or None,
                    help="parent of the temporary directory holding the spools "
                         "(env BENCH_DIR, default: $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", default=os.environ.get("BENCH_KEEP") == "1",
                    help="keep the temporary directory (env BENCH_KEEP=1)")
    ap.add_argument("--herald-bin", default=os.environ.get("HERALD_BIN") or None,
                    help="herald-relay binary (env HERALD_BIN, default target/release/herald-relay, "
                         "built with cargo if missing or HERALD_BUILD=1)")
    ap.add_argument("--source-args", default=os.environ.get("BENCH_SOURCE_ARGS", ""),
                    help="extra smtp-source arguments, e.g. '-d' to reuse connections "
                         "(env BENCH_SOURCE_ARGS)")
    ap.add_argument("--ready-timeout", type=float, default=env_float("BENCH_READY_TIMEOUT", 60),
                    help="max seconds for a server to become ready (default 60)")
    ap.add_argument("--build-timeout", type=float, default=env_float("BENCH_BUILD_TIMEOUT", 3600))
    ap.add_argument("--sample-interval", type=float, default=env_float("BENCH_SAMPLE_INTERVAL", 0.1),
                    help="RSS sampling period in seconds (default 0.1)")
    ap.add_argument("--no-pss", action="store_true", help="don't sample PSS (smaps_rollup)")


def free_port(avoid: tuple[int, ...] = ()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    # state is the first field after the ")" closing comm
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] != b"Z"


def terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to a process this benchmark started, SIGKILL if it is still there after `timeout` s; returns
    once it has exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def wait_until(pred, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def smtp_banner_ok(port: int, host: str = "127.0.0.1") -> bool:
    """True if host:port answers with a 220 greeting (then QUITs)."""
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(5)
            ok = s.recv(512).startswith(b"220")
            s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(lines[-n:])


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


# --------------------------------------------------------------------------
# Child reaping.  Postfix's master daemonizes; in containers PID 1 often does
# not reap orphans.  We become a "child subreaper" so the daemonized master
# (and any of its leftovers) is re-parented to us, and reap those zombies
# ourselves -- but never a child that a subprocess.Popen object owns.

OWNED_PIDS: set[int] = set()


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
        if pid in OWNED_PIDS:
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


def install_signal_handlers() -> None:
    """Make SIGTERM/SIGHUP unwind through finally blocks (Ctrl-C already does)."""

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


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


class Herald(Target):
    """herald-relay with one trusted loopback listener, the metrics port and the admin port.

    The listener's clients may send as `senders` (its `trusted_senders`,
    checked in MAIL FROM and the From: header, as a deployed trusted listener
    does): pass [sender_domain(args)]; None writes `trusted_senders: any`.
    `extra_yaml` is appended to the config (e.g. a `delivery:` section);
    `log_format` is passed as `--log-format` when set.  Everything the
    process writes (stdout and stderr) goes to `herald.log` in `workdir`.
    """

    name = "herald"

    def __init__(self, binary: Path, workdir: Path, ready_timeout: float, expected: int,
                 extra_yaml: str = "", log_format: str | None = None,
                 spool_dir: Path | None = None, senders: list[str] | None = None):
        self.binary = binary
        self.senders = senders
        self.expected = expected
        self.dir = workdir
        self.ready_timeout = ready_timeout
        self.extra_yaml = extra_yaml
        self.log_format = log_format
        self.spool = spool_dir or self.dir / "spool"
        self.proc: subprocess.Popen | None = None
        self.seen_pids = set()
        self.logfile = self.dir / "herald.log"
        self.port = 0
        self.metrics_port = 0
        self.admin_port = 0

    def config_text(self) -> str:
        return (
            "hostname: bench.herald.test\n"
            f"spool_dir: {self.spool}\n"
            "listeners:\n"
            "  - name: trusted\n"
            f"    address: 127.0.0.1:{self.port}\n"
            "    allow_networks: [127.0.0.0/8]\n"
            f"    trusted_senders: {'any' if self.senders is None else '[' + ', '.join(self.senders) + ']'}\n"
            f"metrics: {{ address: 127.0.0.1:{self.metrics_port} }}\n"
            f"admin: {{ address: 127.0.0.1:{self.admin_port} }}\n"
            + self.extra_yaml
        )

    def start(self) -> None:
        """Start herald; a second start() (after stop()) reuses ports and spool."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port()
            self.metrics_port = free_port(avoid=(self.port,))
            self.admin_port = free_port(avoid=(self.port, self.metrics_port))
        cfg = self.dir / "herald.yaml"
        cfg.write_text(self.config_text())
        cmd = [str(self.binary), "--config", str(cfg)]
        if self.log_format:
            cmd += ["--log-format", self.log_format]
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
            )
        OWNED_PIDS.add(self.proc.pid)
        self.root_pid = self.proc.pid

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise SetupError(
                    f"herald-relay exited with status {self.proc.returncode} before "
                    f"becoming ready (log {self.logfile}):\n{tail(self.logfile)}"
                )
            try:
                with urllib.request.urlopen(self.metrics_url("/readyz"), timeout=2) as r:
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

    def metrics_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def get_queue(self, limit: int, timeout: float = 120) -> dict:
        """The whole queue, page by page (1000 a page, the API's largest), stopping after `limit` messages;
        `total` is the API's count."""
        messages: list = []
        after, total = None, 0
        deadline = time.monotonic() + timeout
        while len(messages) < limit and time.monotonic() < deadline:
            path = f"/queue?limit={min(1000, limit - len(messages))}" + (f"&after={after}" if after else "")
            with urllib.request.urlopen(self.admin_url(path), timeout=timeout) as r:
                page = json.load(r)
            messages += page["messages"]
            total, after = page["total"], page.get("next")
            if not after:
                break
        return {"total": total, "messages": messages}

    def queue_total(self) -> int:
        """`total` of GET /queue?limit=1 (lists one message, so it is cheap)."""
        return int(self.get_queue(1)["total"])

    def queued(self) -> int:
        # Ask for more than we sent so the listing is never the thing that's short.
        limit = max(100_000, 2 * self.expected)
        body = self.get_queue(limit)
        n = len(body["messages"])
        total = body.get("total")
        if total is not None and total != n:
            log(f"herald /queue: total={total} but {n} messages listed")
        return n

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def vm_hwm_kb(self) -> int | None:
        return status_kb(self.proc.pid, "VmHWM") if self.proc else None

    def vm_rss_kb(self) -> int | None:
        return status_kb(self.proc.pid, "VmRSS") if self.proc else None

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
        OWNED_PIDS.discard(p.pid)
        self.proc = None

    def diagnostics(self) -> str:
        return f"\nherald log ({self.logfile}):\n{tail(self.logfile)}"


def herald_delivery_yaml(smarthost_port: int, *, connections: int | None = None,
                         msgs_per_conn: int | None = None, retry_first: str | None = None,
                         total_connections: int | None = None) -> str:
    """A `delivery:` section that sends everything to 127.0.0.1:smarthost_port
    in plain text.  With a port where nothing listens and a long retry_first,
    every message is deferred on its first attempt and stays queued: that is
    how the benchmarks keep herald from delivering (or looking up dest.test,
    which does not exist and would bounce and suppress the recipient).
    `connections` is per domain, `total_connections` (delivery.max_connections)
    for all destinations together."""
    y = (
        "delivery:\n"
        f"  smarthost: {{ host: 127.0.0.1, port: {smarthost_port}, tls: none }}\n"
        "  tls: none\n"
    )
    if connections is not None:
        y += (f"  per_domain: {{ max_connections: {connections}, "
              f"messages_per_connection: {msgs_per_conn} }}\n")
    if total_connections is not None:
        y += f"  max_connections: {total_connections}\n"
    if retry_first:
        y += f"  retry: {{ first: {retry_first}, max: 4h, factor: 2.0 }}\n"
    return y


POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix(Target):
    """A private Postfix instance; never touches the system instance.

    Subclasses provide main_cf() (usually common_main_cf() plus a few lines)
    and master_cf(); both are written by start() after self.port is chosen.
    """

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

    def common_main_cf(self, generator: str) -> str:
        """main.cf settings shared by all benchmark instances.  Durability
        settings (cleanup fsync of queue files) are left at their defaults."""
        d = self.dir
        return f"""\
# Private benchmark instance generated by {generator}
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
# no DNS: no reverse lookup of SMTP clients, no DNS in the SMTP client
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
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

    def main_cf(self) -> str:
        raise NotImplementedError

    def master_cf(self) -> str:
        raise NotImplementedError

    def write_config(self) -> None:
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(self.master_cf())

    def pfx(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.postfix, "-c", str(self.conf), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def postconf(self, *names: str) -> dict[str, str]:
        """Effective values of main.cf parameters of this instance."""
        r = subprocess.run(["postconf", "-c", str(self.conf), *names],
                           capture_output=True, text=True, timeout=30)
        out = {}
        for line in r.stdout.splitlines():
            k, _, v = line.partition(" = ")
            out[k.strip()] = v.strip()
        return out

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

        if not wait_until(lambda: smtp_banner_ok(self.port), self.ready_timeout, 0.2):
            raise SetupError(
                f"Postfix smtpd on 127.0.0.1:{self.port} did not answer 220 within "
                f"{self.ready_timeout:.0f}s\n{self.diagnostics()}"
            )

    def alive(self) -> bool:
        return self.master_pid is not None and pid_alive(self.master_pid)

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


class DeliveringPostfix(Postfix):
    """Private Postfix that relays everything to `relayhost` (a sink on
    loopback).  `generator` names the script in main.cf's first line;
    `extra_main_cf` is appended to main.cf (e.g. concurrency or size limits)."""

    def __init__(self, workdir: Path, ready_timeout: float, postfix_cmd: str, sink_port: int,
                 generator: str, extra_main_cf: str = ""):
        super().__init__(workdir, ready_timeout, postfix_cmd)
        self.sink_port = sink_port
        self.generator = generator
        self.extra_main_cf = extra_main_cf

    def main_cf(self) -> str:
        # Delivery settings (concurrency, connection cache, in_flow_delay)
        # stay at their defaults unless extra_main_cf says otherwise; the
        # scripts print their effective values with the results.
        return self.common_main_cf(self.generator) + f"""\
# everything goes to the sink; numeric next hop, so no DNS and no MX lookup
relayhost = [127.0.0.1]:{self.sink_port}
""" + self.extra_main_cf

    def master_cf(self) -> str:
        # The services of Debian's master.cf that relaying needs, unchrooted:
        # smtpd, cleanup, qmgr, trivial-rewrite, the bounce family, the smtp
        # client (+ scache for its connection cache), proxymap, anvil and
        # postlogd.  No pickup (nothing uses sendmail), no local delivery, no
        # tlsmgr (no TLS anywhere).
        return f"""\
# service  type  private unpriv chroot wakeup maxproc command
127.0.0.1:{self.port} inet n - n - - smtpd
cleanup    unix  n       -      n      -      0       cleanup
qmgr       unix  n       -      n      300    1       qmgr
rewrite    unix  -       -      n      -      -       trivial-rewrite
bounce     unix  -       -      n      -      0       bounce
defer      unix  -       -      n      -      0       bounce
trace      unix  -       -      n      -      0       bounce
verify     unix  -       -      n      -      1       verify
flush      unix  n       -      n      1000?  0       flush
proxymap   unix  -       -      n      -      -       proxymap
proxywrite unix  -       -      n      -      1       proxymap
smtp       unix  -       -      n      -      -       smtp
relay      unix  -       -      n      -      -       smtp
error      unix  -       -      n      -      -       error
retry      unix  -       -      n      -      -       error
discard    unix  -       -      n      -      -       discard
anvil      unix  -       -      n      -      1       anvil
scache     unix  -       -      n      -      1       scache
postlog    unix-dgram n  -      n      -      1       postlogd
"""


# --------------------------------------------------------------------------
# smtp-source.


def smtp_source_cmd(args, port: int, *, messages: int | None = None,
                    extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The smtp-source command line for `args` (sessions, size, source_args)."""
    return [
        args.smtp_source,
        "-s", str(args.sessions),
        "-m", str(args.messages if messages is None else messages),
        "-l", str(args.size),
        "-f", "sender@bench.test",
        "-t", "rcpt@dest.test",
        *extra,
        *args.source_args.split(),
        f"127.0.0.1:{port}",
    ]


def sender_domain(args) -> str:
    """The domain of smtp-source's envelope sender (the last -f wins, as in
    its getopt); smtp-source also writes it as the From: header, which is
    what herald checks against the listener's trusted_senders and picks the
    signing key by."""
    cmd = smtp_source_cmd(args, 0)
    senders = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "-f"]
    if not senders or "@" not in senders[-1]:
        raise SetupError(f"cannot tell smtp-source's sender domain from {' '.join(cmd)}")
    return senders[-1].rsplit("@", 1)[1].lower()


class SourceRun:
    """One smtp-source process.  A thread blocks in waitpid() so the end time
    is exact, not rounded up to whatever polling period the caller uses."""

    def __init__(self, cmd: list[str], out_path: Path):
        self.cmd = cmd
        self.out_path = out_path
        self.done = threading.Event()
        self.t0 = 0.0
        self.t_end: float | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        with open(self.out_path, "wb") as out:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        OWNED_PIDS.add(self.proc.pid)

        def waiter() -> None:
            self.proc.wait()
            self.t_end = time.monotonic()
            self.done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return self.t0

    @property
    def elapsed(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t0

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc and self.done.is_set() else None

    def output(self) -> str:
        return self.out_path.read_text(errors="replace").strip()

    def kill(self) -> None:
        if self.proc and not self.done.is_set():
            self.proc.kill()
            self.done.wait(30)
        if self.proc:
            OWNED_PIDS.discard(self.proc.pid)

    def report_problems(self) -> None:
        text = self.output()
        if self.returncode != 0 or text:
            log(f"smtp-source exit status {self.returncode}; output:\n{text[-3000:]}")


# --------------------------------------------------------------------------
# Environment.


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


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


def postfix_version() -> str:
    try:
        return subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def default_postfix_running() -> int | None:
    """PID of a running default-instance Postfix master, if any."""
    try:
        qd = subprocess.run(["postconf", "-h", "queue_directory"], capture_output=True,
                            text=True, timeout=30).stdout.strip() or "/var/spool/postfix"
        pid = int(Path(qd, "pid", "master.pid").read_text().strip())
        return pid if pid_alive(pid) else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def print_host_info(base: Path) -> None:
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}")
    print(f"spool/queue filesystem: {fs_of(base)}  ({base})")


def environment_warnings(base: Path, check_system_postfix: bool) -> None:
    if fs_of(base).startswith("tmpfs"):
        log("warning: work directory is on tmpfs -- fsync is a no-op, "
            "numbers do not reflect a durable queue; set BENCH_DIR")
    load1 = os.getloadavg()[0]
    if load1 > 0.5 * (os.cpu_count() or 1):
        log(f"warning: 1-minute load average is {load1:.1f} on {os.cpu_count()} CPUs; "
            "something else is running and the numbers will be noisy")
    if check_system_postfix and (dp := default_postfix_running()):
        log(f"warning: the system Postfix instance is running (master pid {dp}); "
            "it is not used, but it competes for CPU")


def fmt_mb(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.1f}"
