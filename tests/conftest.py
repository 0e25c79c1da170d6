"""Fixtures for the herald-relay integration suite: the binary, TLS material, password hashes, relays, and for
the delivery tests a loopback DNS server and receiving SMTP peers.

Relays are real processes on loopback ports; `harness/relay.py` holds the plumbing. When a test fails, the
log of every relay it used is attached to the report.
"""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from harness.certs import make_certs
from harness.dns import DnsServer
from harness.outbound import FOREIGN, MAILBOX
from harness.store import Store
from harness.peers import PeerPool
from harness.relay import ALL_RELAYS, USERS, RelayPool, hash_password, relay_bin, run_cli
from harness.smtp import client_tls_context


# ---------------------------------------------------------------------------------------------------------
# Attach relay logs to failing tests


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._herald_mark = len(ALL_RELAYS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        mark = getattr(item, "_herald_mark", len(ALL_RELAYS))
        for i, r in enumerate(ALL_RELAYS):
            if i >= mark or r.running:
                report.sections.append((f"herald-relay log: {r.label} ({r.workdir})", r.log_tail(150)))


# ---------------------------------------------------------------------------------------------------------
# Binary, TLS, users


@pytest.fixture(scope="session")
def relay_binary() -> Path:
    path = relay_bin()
    if not path.exists():
        pytest.fail(f"herald-relay binary not found at {path} (build it, or set HERALD_RELAY_BIN)", pytrace=False)
    if not os.stat(path).st_mode & stat.S_IXUSR:
        pytest.fail(f"{path} is not executable", pytrace=False)
    r = run_cli("--version", timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.fail(
            f"{path} --version exited {r.returncode} with stdout {r.stdout!r}: not the relay yet?", pytrace=False
        )
    return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_ctx(certs) -> ssl.SSLContext:
    """Client context that trusts only the test CA and checks the name."""
    return client_tls_context(certs["ca"])


@pytest.fixture(scope="session")
def users(relay_binary) -> list[dict]:
    """Config `users:` entries with argon2 hashes made by `herald-relay hash-password`."""
    return [
        {"username": name, "password_hash": hash_password(u["password"]), "allowed_domains": u["allowed_domains"]}
        for name, u in USERS.items()
    ]


# ---------------------------------------------------------------------------------------------------------
# Relays


@pytest.fixture
def relays(tmp_path, relay_binary, certs, users):
    """Factory for relays with a config of the test's own: `relays.start("name", limits={...})`."""
    pool = RelayPool(tmp_path, certs, users)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, relay_binary, certs, users):
    """One relay with the standard config (see harness.relay.standard_config) shared by a test module.

    Tests that share it assert on queue differences (ids before/after), never on absolute queue contents.
    """
    pool = RelayPool(tmp_path_factory.mktemp("relay"), certs, users)
    r = pool.start("shared")
    yield r
    pool.stop_all()


# ---------------------------------------------------------------------------------------------------------
# Delivery: DNS and receiving peers


@pytest.fixture
def dns():
    """A DNS server on loopback, authoritative for `test` (every *.test name is NXDOMAIN until a test adds it)."""
    server = DnsServer().start()
    server.zone("test")
    yield server
    server.stop()


@pytest.fixture
def peers(tmp_path, certs):
    """Receiving SMTP peers on 127.0.0.2-11, all on one port (the relay's delivery.port); stopped by the test's end."""
    pool = PeerPool(tmp_path / "peers", certs)
    yield pool
    pool.stop_all()


@pytest.fixture
def store(tmp_path):
    """A private store (redis-server, wire-compatible with Valkey) on loopback, for the fleet's shared state."""
    s = Store(tmp_path / "store").start()
    yield s
    s.stop()


@pytest.fixture
def foreign(dns, peers):
    """foreign.test's MX: an aiosmtpd peer scripted per recipient."""
    dns.route("foreign.test", FOREIGN)
    return peers.aio(FOREIGN, "foreign")


@pytest.fixture
def mailbox(dns, peers):
    """The envelope sender's mailbox: example.test's MX, an aiosmtpd peer where DSNs arrive."""
    dns.route("example.test", MAILBOX)
    return peers.aio(MAILBOX, "mailbox")


# ---------------------------------------------------------------------------------------------------------
# Small file systems that fill up


class Tmpfs:
    """tmpfs mounts for one test: `mount("256k")` returns the mount point (skips the test without the right to
    mount). Relays passed through `uses(relay)` are stopped before the file systems are unmounted."""

    def __init__(self, base):
        self.base = base
        self.mounts: list = []
        self.relays: list = []

    def mount(self, size: str):
        mnt = self.base / f"tmpfs{len(self.mounts)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs for the spool (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
        self.mounts.append(mnt)
        return mnt

    def uses(self, relay):
        self.relays.append(relay)
        return relay

    def cleanup(self) -> None:
        for r in self.relays:
            r.stop()
        for mnt in reversed(self.mounts):
            if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path):
    t = Tmpfs(tmp_path)
    yield t
    t.cleanup()
