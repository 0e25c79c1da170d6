"""A private Valkey-compatible store for fleet tests: Debian's redis-server on a loopback port, with a password,
without persistence (so a restart comes back empty, like a Valkey pod without a volume). Stopped by its PID.
Commands go through redis-cli, the client that ships with it."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .tools import require
from .relay import free_port

START_TIMEOUT = 10.0


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """A server in its own session, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    """Stops a server this harness started, by its PID: TERM, then KILL after 10 s."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Store:
    def __init__(self, workdir: Path, password: str = "fleet-secret", extra: tuple[str, ...] = ()):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.extra = list(extra)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.server = require("redis-server")
        self.cli = shutil.which("redis-cli") or pytest.skip("redis-cli is not installed")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Store":
        """Starts the server on its port (the same one after a stop), empty, and waits for PONG."""
        assert self.proc is None, "already running"
        self.proc = spawn(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no", *self.extra],
            self.workdir / "store.log")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {(self.workdir / 'store.log').read_text()[-2000:]}")
            try:
                if self.cmd("PING") == "PONG":
                    return self
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise AssertionError("redis-server did not answer PING")

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None

    def cmd(self, *args: str, cluster: bool = False) -> str:
        """One command; its reply as redis-cli prints it (raw mode: one line per element). `cluster`: follow
        the cluster's redirections to the key's shard."""
        out = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning", "-a", self.password,
             *(["-c"] if cluster else []), "--raw", *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()

    def section(self, prefix: str = "herald:", **over) -> dict:
        """The relay's `store:` config for this server (password from a file, as from a Secret)."""
        return {"url": self.url, "password_file": password_file(self.workdir, self.password), "key_prefix": prefix,
                **over}


def password_file(workdir: Path, password: str) -> str:
    pw = workdir / "password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    return str(pw)


class ClusterStore:
    """A Redis Cluster of `shards` primaries (no replicas) on loopback ports, with a password: the slots
    spread over all of them, so keys with different hash tags land on different shards."""

    def __init__(self, workdir: Path, shards: int = 3, password: str = "fleet-secret"):
        self.workdir = workdir
        self.password = password
        self.nodes = [
            Store(workdir / f"node{i}", password,
                  extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-port", str(free_port()), "--masterauth", password))
            for i in range(shards)
        ]

    def start(self) -> "ClusterStore":
        for n in self.nodes:
            n.start()
        first = self.nodes[0]
        subprocess.run(
            [first.cli, "--no-auth-warning", "-a", self.password, "--cluster", "create",
             *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cmd("CLUSTER", "INFO") for n in self.nodes):
                return self
            time.sleep(0.1)
        raise AssertionError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def cmd(self, *args: str) -> str:
        """One command, sent to whichever shard holds its key."""
        return self.nodes[0].cmd(*args, cluster=True)

    def shard_of(self, key: str) -> int:
        """The index of the node that serves `key`'s slot."""
        slot = int(self.nodes[0].cmd("CLUSTER", "KEYSLOT", key))
        for i, n in enumerate(self.nodes):
            if any(lo <= slot <= hi for lo, hi in _own_slots(n)):
                return i
        raise AssertionError(f"no node serves slot {slot}")

    def section(self, prefix: str = "herald:", **over) -> dict:
        """The relay's `store:` config: one node in the url, the others as `nodes`."""
        return {"url": f"redis://127.0.0.1:{self.nodes[0].port}", "cluster": True,
                "nodes": [f"127.0.0.1:{n.port}" for n in self.nodes[1:]],
                "password_file": password_file(self.workdir, self.password), "key_prefix": prefix, **over}


def _own_slots(node: Store) -> list[tuple[int, int]]:
    """The slot ranges `node` serves, from its own line of CLUSTER NODES."""
    for line in node.cmd("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if len(fields) > 2 and "myself" in fields[2].split(","):
            return [(int(r.partition("-")[0]), int(r.partition("-")[2] or r)) for r in fields[8:]
                    if not r.startswith("[")]
    return []


class SentinelStore:
    """A primary, one replica and one Sentinel watching them as `herald` (quorum 1), all with one password,
    on loopback. `failover()` makes the replica the primary, as a failed node would."""

    MASTER = "herald"

    def __init__(self, workdir: Path, password: str = "fleet-secret"):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.primary = Store(workdir / "a", password, extra=("--masterauth", password))
        self.replica = Store(workdir / "b", password, extra=("--masterauth", password))
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen | None = None

    def start(self) -> "SentinelStore":
        self.primary.start()
        self.replica.extra += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.workdir}\nrequirepass {self.password}\n"
            f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel auth-pass {self.MASTER} {self.password}\n"
            f"sentinel down-after-milliseconds {self.MASTER} 2000\n"
            f"sentinel failover-timeout {self.MASTER} 10000\n"
        )
        self.sentinel = spawn([self.primary.server, str(conf), "--sentinel"], self.workdir / "sentinel.log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.primary_port() == self.primary.port and self.ask("SENTINEL", "REPLICAS", self.MASTER) and \
                        "master_link_status:up" in self.replica.cmd("INFO", "replication"):
                    return self
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the Sentinel did not see the primary and its replica: "
                             f"{(self.workdir / 'sentinel.log').read_text()[-2000:]}")

    def ask(self, *args: str) -> str:
        """One command to the Sentinel."""
        return subprocess.run(
            [self.primary.cli, "-h", "127.0.0.1", "-p", str(self.sentinel_port), "--no-auth-warning",
             "-a", self.password, "--raw", *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()

    def primary_port(self) -> int:
        _, port = self.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER).splitlines()
        return int(port)

    def failover(self) -> None:
        """Hands the primary role to the replica, and returns once the Sentinel names it."""
        self.ask("SENTINEL", "FAILOVER", self.MASTER)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.primary_port() == self.replica.port and "role:master" in self.replica.cmd("INFO", "replication"):
                self.primary, self.replica = self.replica, self.primary
                return
            time.sleep(0.1)
        raise AssertionError("the Sentinel did not fail over")

    def stop(self) -> None:
        stop(self.sentinel)
        self.sentinel = None
        self.primary.stop()
        self.replica.stop()

    def section(self, prefix: str = "herald:", **over) -> dict:
        """The relay's `store:` config: the Sentinel in the url, the primary by its name."""
        return {"url": f"redis://127.0.0.1:{self.sentinel_port}/0", "sentinel_master": self.MASTER,
                "password_file": password_file(self.workdir, self.password), "key_prefix": prefix, **over}
