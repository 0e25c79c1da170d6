"""Wrappers for the external SMTP clients the suite drives: swaks and Postfix's smtp-source."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SWAKS_QUEUED_RE = re.compile(r"^<[-~]\s+250 2\.0\.0 Ok: queued as ([0-9A-Fa-f]{16})\s*$", re.M)


def require(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if not path:
        pytest.skip(f"{tool} is not installed")
    return path


def swaks(host: str, port: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run swaks against host:port; output (stdout+stderr) in .stdout. Never prompts (no tty, stdin closed)."""
    exe = require("swaks")
    return subprocess.run(
        [exe, "--server", host, "--port", str(port), "--helo", "swaks.example.test", "--timeout", "20", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def swaks_queue_id(result: subprocess.CompletedProcess) -> str | None:
    m = SWAKS_QUEUED_RE.search(result.stdout)
    return m.group(1) if m else None


def smtp_source(host: str, port: int, *args: str, log: Path | None = None) -> subprocess.Popen:
    """Start smtp-source in the background (the caller stops it by PID); its stderr goes to `log`."""
    exe = require("smtp-source")
    err = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [exe, *args, f"{host}:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    finally:
        if log:
            err.close()
