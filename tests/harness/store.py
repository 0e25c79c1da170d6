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


class Store:
    def __init__(self, workdir: Path, password: str = "fleet-secret"):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
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
        log = open(self.workdir / "store.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
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
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def cmd(self, *args: str) -> str:
        """One command; its reply as redis-cli prints it (raw mode: one line per element)."""
        out = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning", "-a", self.password,
             "--raw", *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()

    def section(self, prefix: str = "herald:", **over) -> dict:
        """The relay's `store:` config for this server (password from a file, as from a Secret)."""
        pw = self.workdir / "password"
        pw.write_text(self.password + "\n")
        pw.chmod(0o600)
        return {"url": self.url, "password_file": str(pw), "key_prefix": prefix, **over}
