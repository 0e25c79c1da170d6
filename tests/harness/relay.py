"""Start and stop a real herald-relay process for the integration suite.

Everything a test needs to run the binary lives here once: free loopback ports, the config file (written as
YAML into the test's tmp dir), the subprocess with its log captured to a file, readiness via GET /readyz on
the admin port, the queue API, and teardown by PID (SIGTERM, then SIGKILL). Every wait is bounded.
"""

from __future__ import annotations

import copy
import json
import secrets
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

READY_TIMEOUT = 20.0  # seconds to wait for /readyz == 200 after start
STOP_TIMEOUT = 15.0  # seconds to wait for exit after SIGTERM before SIGKILL

HOSTNAME = "relay.example.test"
# Users of the standard config (passwords in clear only here; the hashes are made by the binary itself).
USERS = {
    "app": {"password": "app-secret-1", "allowed_domains": ["example.test"]},
    "ops": {"password": "ops-secret-2", "allowed_domains": ["other.test"]},
}
QUEUED_RE = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9A-Fa-f]{16})$")


def relay_bin() -> Path:
    """The binary under test: $HERALD_RELAY_BIN, else <repo>/target/debug/herald-relay."""
    env = os.environ.get("HERALD_RELAY_BIN")
    return Path(env) if env else REPO / "target" / "debug" / "herald-relay"


# ---------------------------------------------------------------------------------------------------------
# Ports

_handed_out: set[tuple[str, int]] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port that nothing listens on now and that this process has not handed out before.

    Picked below the kernel's ephemeral range, so that the suite's own client connections (thousands in the
    durability test) cannot take it between now and the moment the relay binds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lo, _ = _ephemeral_range()
    candidates = range(max(1024, lo - 12000), lo) if lo - 12000 >= 1024 else None
    for _ in range(200):
        port = random.choice(candidates) if candidates else 0
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if (host, port) not in _handed_out:
            _handed_out.add((host, port))
            return port
    raise RuntimeError("could not find a free port")


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------------------
# YAML (block style; every string double-quoted, which is JSON-compatible, so no YAML library is needed)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, Raw):
        return v.text
    return json.dumps(str(v))


class Raw:
    """A scalar written into the YAML exactly as given (for deliberately odd values)."""

    def __init__(self, text: str):
        self.text = text


def to_yaml(obj: Any, indent: int = 0) -> str:
    pad = "  " * indent
    out: list[str] = []
    if isinstance(obj, dict):
        if not obj:
            return pad + "{}\n"
        for k, v in obj.items():
            if isinstance(v, dict) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 1)}")
            elif isinstance(v, list) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 1)}")
            elif isinstance(v, (dict, list)):
                out.append(f"{pad}{k}: {'{}' if isinstance(v, dict) else '[]'}\n")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}\n")
        return "".join(out)
    if isinstance(obj, list):
        for item in obj:
            if isinstance(item, (dict, list)) and item:
                body = to_yaml(item, indent + 1)
                # "- " takes the place of the first line's indentation
                first, _, rest = body.partition("\n")
                out.append(f"{pad}- {first.lstrip()}\n{rest}")
            else:
                out.append(f"{pad}- {_scalar(item) if not isinstance(item, (dict, list)) else ('{}' if isinstance(item, dict) else '[]')}\n")
        return "".join(out)
    return pad + _scalar(obj) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Config


# The return-path token key of every standard config.
BOUNCE_KEY = "herald-test-bounce-key-0123456789"



def standard_config(
    workdir: Path,
    certs: dict[str, Path] | None,
    users: list[dict] | None = None,
    limits: dict | None = None,
    listeners: list[dict] | None = None,
    spool_dir: Path | None = None,
) -> dict:
    """A config with the four kinds of listener the spec describes, on fresh loopback ports.

    trusted     auth none, allow_networks loopback, trusted_senders any: may relay anywhere as anyone
    inbound     auth none, no allow_networks: only the return_path domains are accepted
    submission  STARTTLS, auth required
    smtps       implicit TLS, auth required
    trusted_tls STARTTLS offered, auth none, allow_networks loopback, trusted_senders any (TLS without AUTH
                in the way)

    The trusted listeners take any sender because the front-door tests use whatever senders they are
    about; test_trusted_senders.py holds the checks of a trusted listener's senders.
    """
    if listeners is None:
        listeners = [
            {
                "name": "trusted",
                "address": addr("127.0.0.1", free_port()),
                "tls": "none",
                "auth": "none",
                "allow_networks": ["127.0.0.0/8", "::1/128"],
                "trusted_senders": "any",
            },
            # defaults on purpose: tls none, auth none, no allow_networks
            {"name": "inbound", "address": addr("127.0.0.1", free_port())},
        ]
        if certs is not None:
            listeners += [
                {"name": "submission", "address": addr("127.0.0.1", free_port()), "tls": "starttls", "auth": "required"},
                {"name": "smtps", "address": addr("127.0.0.1", free_port()), "tls": "implicit", "auth": "required"},
                {
                    "name": "trusted_tls",
                    "address": addr("127.0.0.1", free_port()),
                    "tls": "starttls",
                    "auth": "none",
                    "allow_networks": ["127.0.0.0/8"],
                    "trusted_senders": "any",
                },
            ]
    cfg: dict[str, Any] = {
        "hostname": HOSTNAME,
        "spool_dir": str(spool_dir or (workdir / "spool")),
        "listeners": listeners,
    }
    if certs is not None:
        cfg["tls"] = {"cert_file": str(certs["cert"]), "key_file": str(certs["key"])}
    if users:
        cfg["users"] = copy.deepcopy(users)
    cfg["domains"] = [
        {"name": "example.test", "return_path": "bounces.example.test"},
        {"name": "other.test"},
    ]
    # The HMAC key of return-path tokens (harness.reports reads it to make real and forged tokens).
    workdir.mkdir(parents=True, exist_ok=True)
    secret = workdir / "bounce-keys"
    if not secret.exists():
        secret.write_text(BOUNCE_KEY + "\n")
        secret.chmod(0o600)
    cfg["bounces"] = {"secret_file": str(secret)}
    # Many tests send wrong passwords from 127.0.0.1 to one shared relay; the per-address AUTH throttle
    # (limits.auth_failures_per_client, 10 by default) would turn later ones into 454s. Its own test sets it.
    cfg["limits"] = {"auth_failures_per_client": 1000, **(limits or {})}
    # The front-door tests queue mail for foreign domains; with the delivery engine running, that mail must
    # stay queued: the resolver is a loopback port nobody answers on (every look-up fails: deferred once),
    # and the first retry is an hour away. The delivery tests (harness/outbound.py) replace this section.
    cfg["delivery"] = {
        "dns": {"nameservers": [addr("127.0.0.1", free_port())]},
        "retry": {"first": "1h", "max": "4h", "factor": 2.0},
    }
    # As in a pod: metrics and probes on one port, the queue API on another behind a bearer token.
    token = workdir / "admin-token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
    cfg["metrics"] = {"address": addr("127.0.0.1", free_port())}
    cfg["admin"] = {"address": addr("127.0.0.1", free_port()), "token_file": str(token)}
    return cfg


def reassign_ports(cfg: dict) -> None:
    """Give every listener and the metrics and admin endpoints a fresh port (used when restarting after kill -9)."""
    for lst in cfg["listeners"]:
        host, _ = split_addr(lst["address"])
        lst["address"] = addr(host, free_port(host))
    cfg["metrics"]["address"] = addr("127.0.0.1", free_port())
    cfg["admin"]["address"] = addr("127.0.0.1", free_port())


def split_addr(a: str) -> tuple[str, int]:
    if a.startswith("["):
        host, _, port = a[1:].partition("]:")
        return host, int(port)
    host, _, port = a.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------------------------------
# The process


class RelayError(AssertionError):
    pass


class Relay:
    """One herald-relay process. Logs (stdout and stderr) go to ``log_path``, appended across restarts."""

    def __init__(self, workdir: Path, config: dict, label: str = "relay", extra_args: list[str] | None = None):
        self.extra_args = list(extra_args or [])
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.label = label
        self.config_path = self.workdir / f"{label}.yaml"
        self.log_path = self.workdir / f"{label}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def write_config(self) -> None:
        self.config_path.write_text(to_yaml(self.config))

    def start(self, wait: bool = True) -> "Relay":
        assert self.proc is None or self.proc.poll() is not None, "relay already running"
        self.write_config()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} of {self.label} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(relay_bin()), "--config", str(self.config_path), *self.extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RelayError(
                    f"{self.label} exited with {self.proc.returncode} before /readyz was 200\n{self.log_tail()}"
                )
            try:
                status, _ = self.http_get("/readyz", timeout=2)
                if status == 200:
                    return
                last = status
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RelayError(f"{self.label}: /readyz not 200 within {timeout}s (last: {last!r})\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL. Returns the exit code of the SIGTERM path or None if killed."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """kill -9 by PID and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    # -- addresses -------------------------------------------------------------------------------------

    def listener(self, name: str) -> tuple[str, int]:
        for lst in self.config["listeners"]:
            if lst["name"] == name:
                return split_addr(lst["address"])
        raise KeyError(name)

    @property
    def spool_dir(self) -> Path:
        return Path(self.config["spool_dir"])

    @property
    def admin_base(self) -> str:
        host, port = split_addr(self.config["admin"]["address"])
        return f"http://{addr(host, port)}"

    @property
    def metrics_base(self) -> str:
        host, port = split_addr(self.config["metrics"]["address"])
        return f"http://{addr(host, port)}"

    def admin_token(self) -> str | None:
        f = self.config.get("admin", {}).get("token_file")
        return Path(f).read_text().strip() if f else None

    def _endpoint(self, path: str) -> tuple[str, dict]:
        """Probes and /metrics are on the metrics port; everything else is the admin API, with its token."""
        if path.split("?")[0] in ("/metrics", "/healthz", "/readyz"):
            return self.metrics_base, {}
        token = self.admin_token()
        return self.admin_base, ({"Authorization": f"Bearer {token}"} if token else {})

    # -- metrics, probes and the admin API -------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        base, headers = self._endpoint(path)
        req = urllib.request.Request(base + path, method="GET", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled series on /metrics (None when absent)."""
        status, body = self.http_get("/metrics")
        assert status == 200, status
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def http(self, method: str, path: str, body: Any = None, timeout: float = 15) -> tuple[int, bytes]:
        """Any admin API request; a dict/list body is sent as JSON. Returns (status, body) for every status."""
        data = None
        base, headers = self._endpoint(path)
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def queue(self, max_pages: int = 1000) -> list[dict]:
        """Every queued message, following the `next` cursor page by page."""
        messages: list[dict] = []
        after = None
        for _ in range(max_pages):
            path = "/queue?limit=1000" + (f"&after={after}" if after else "")
            status, body = self.http_get(path, timeout=15)
            assert status == 200, f"GET {path} -> {status}: {body[:500]!r}"
            doc = json.loads(body)
            assert isinstance(doc, dict) and isinstance(doc.get("messages"), list), f"unexpected /queue JSON: {body[:500]!r}"
            messages += doc["messages"]
            after = doc.get("next")
            if not after:
                return messages
        raise AssertionError(f"/queue still had a next page after {max_pages} pages")

    def queue_by_id(self) -> dict[str, dict]:
        return {m["id"]: m for m in self.queue()}

    def new_messages(self, before: set[str]) -> dict[str, dict]:
        """Messages in /queue whose id is not in `before`."""
        return {i: m for i, m in self.queue_by_id().items() if i not in before}

    def find_spooled(self, marker: bytes, max_files: int = 20000) -> bytes | None:
        """The content of the spool file holding `marker`, if the spool stores message bytes in clear.

        There is no API to read a message back; this is the only way to look at stored content. It returns
        None when no file holds the marker (e.g. the spool format is not plain), and callers then skip.
        """
        seen = 0
        for root, _dirs, files in os.walk(self.spool_dir):
            for f in files:
                seen += 1
                if seen > max_files:
                    return None
                p = Path(root) / f
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                if marker in data:
                    return data
        return None

    # -- logs ------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 200) -> str:
        text = self.log_text().splitlines()
        return f"--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


def header_region(stored: bytes, marker: bytes) -> bytes:
    """The header section of the stored message whose Subject holds `marker`: from the Received: line the
    relay prepends (or the start of the file) to the first blank line after the marker."""
    pos = stored.find(marker)
    assert pos >= 0, "marker not in stored content"
    end = stored.find(b"\r\n\r\n", pos)
    end = end if end >= 0 else len(stored)
    start = stored.rfind(b"Received:", 0, pos)
    return stored[max(start, 0):end]


# Every relay started during the session, in order (conftest attaches the logs of those a failed test used).
ALL_RELAYS: list[Relay] = []


class RelayPool:
    """Starts relays and stops every one it started (SIGTERM, then SIGKILL, by PID)."""

    def __init__(self, base: Path, certs: dict[str, Path] | None, users: list[dict] | None):
        self.base = Path(base)
        self.certs = certs
        self.users = users
        self.relays: list[Relay] = []

    def config(self, name: str = "relay", **kw) -> dict:
        kw.setdefault("users", self.users)
        return standard_config(self.base / name, self.certs, **kw)

    def start(
        self, name: str = "relay", config: dict | None = None, wait: bool = True,
        extra_args: list[str] | None = None, **kw,
    ) -> Relay:
        """Start a relay with `config`, or with the standard config built from the keyword arguments."""
        cfg = config if config is not None else self.config(name, **kw)
        relay = Relay(self.base / name, cfg, label=name, extra_args=extra_args)
        self.relays.append(relay)
        ALL_RELAYS.append(relay)
        relay.start(wait=wait)
        return relay

    def stop_all(self) -> None:
        for r in self.relays:
            r.stop()


def run_cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the binary with arguments (no controlling terminal, so nothing can prompt on /dev/tty)."""
    return subprocess.run(
        [str(relay_bin()), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def hash_password(password: str) -> str:
    """An argon2 PHC string made by `herald-relay hash-password` (password on stdin)."""
    r = run_cli("hash-password", stdin=password + "\n", timeout=120)
    assert r.returncode == 0, f"hash-password exited {r.returncode}: {r.stderr}"
    lines = [l.strip() for l in r.stdout.splitlines() if l.strip().startswith("$argon2")]
    assert lines, f"hash-password printed no $argon2 line: stdout={r.stdout!r} stderr={r.stderr!r}"
    return lines[-1]
