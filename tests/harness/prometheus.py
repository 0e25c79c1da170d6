"""Reading the relay's metrics: its own `/metrics` text, `promtool check metrics`, and a real Prometheus server.

- `parse(text)` reads the Prometheus text exposition format into samples (name, labels, value) and the
  `# TYPE` of each family, strictly enough that a malformed line fails the test instead of being skipped.
- `Prometheus` runs `/usr/bin/prometheus` as a subprocess on a free loopback port with a generated config
  that scrapes the relay's admin endpoint every second, storage in the test's tmp dir; it is stopped by PID
  (SIGTERM, then SIGKILL). Queries go through its HTTP API (`/api/v1/query`). Every wait is bounded.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .relay import Relay, free_port, to_yaml

START_TIMEOUT = 60.0  # Prometheus opens its TSDB and replays the (empty) WAL; slow on a busy 2-core machine
STOP_TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------------------------
# The text format


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]  # sorted (name, value) pairs
    value: float

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass
class Exposition:
    samples: list[Sample]
    types: dict[str, str] = field(default_factory=dict)  # family name -> counter|gauge|histogram|...
    helps: dict[str, str] = field(default_factory=dict)
    text: str = ""

    def series(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the one series of `name` with exactly these labels, or None if it is not exported."""
        want = tuple(sorted(labels.items()))
        got = [s for s in self.samples if s.name == name and s.labels == want]
        assert len(got) <= 1, f"{name}{labels} exported {len(got)} times"
        return got[0].value if got else None

    def value(self, name: str, **labels: str) -> float:
        """Like get(), but a series not (yet) exported counts as 0 (a counter vector shows a label set only
        once it has been incremented)."""
        v = self.get(name, **labels)
        return 0.0 if v is None else v

    def total(self, name: str, **labels: str) -> float:
        """Sum of every series of `name` whose labels include the given ones."""
        return sum(s.value for s in self.samples if s.name == name
                   and all(s.label_dict.get(k) == v for k, v in labels.items()))


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+-?\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n", "\\": "\\", '"': '"'}.get(m.group(1), "\\" + m.group(1)), v)


def _labels(body: str, line: str) -> tuple[tuple[str, str], ...]:
    inner = body[1:-1]
    out: dict[str, str] = {}
    pos = 0
    while pos < len(inner):
        m = _LABEL_RE.match(inner, pos)
        assert m, f"malformed labels in exposition line {line!r}"
        assert m.group(1) not in out, f"label {m.group(1)} twice in {line!r}"
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return tuple(sorted(out.items()))


def parse(text: str) -> Exposition:
    exp = Exposition(samples=[], text=text)
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] == "TYPE":
                exp.types[parts[2]] = parts[3].strip() if len(parts) > 3 else ""
            elif len(parts) >= 3 and parts[1] == "HELP":
                exp.helps[parts[2]] = parts[3] if len(parts) > 3 else ""
            continue
        m = _SAMPLE_RE.match(line)
        assert m, f"malformed exposition line {line!r}"
        value = float(m.group(3))  # also accepts NaN, +Inf
        exp.samples.append(Sample(m.group(1), _labels(m.group(2), line) if m.group(2) else (), value))
    return exp


def scrape(relay: Relay) -> Exposition:
    status, body = relay.http_get("/metrics", timeout=10)
    assert status == 200, f"GET /metrics -> {status}: {body[:300]!r}"
    return parse(body.decode("utf-8"))


def promtool() -> str | None:
    return shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)


def promtool_check(text: str) -> subprocess.CompletedProcess:
    """`promtool check metrics` with the exposition on stdin (exit 0: no format or lint problem)."""
    exe = promtool()
    assert exe, "promtool is not installed"
    return subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
                          start_new_session=True)


# ---------------------------------------------------------------------------------------------------------
# A Prometheus server


def prometheus_bin() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


class Prometheus:
    """A Prometheus server scraping `targets` (host:port of admin endpoints) every `interval`."""

    def __init__(self, workdir: Path, targets: list[str], interval: str = "1s"):
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.interval = interval
        self.port = free_port()
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        exe = prometheus_bin()
        assert exe, "prometheus is not installed (Debian package prometheus)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "scrape_configs": [{
                "job_name": "herald",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": self.targets}],
            }],
        }
        self.config_path.write_text(to_yaml(cfg))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self._get("/-/ready")
                if status == 200:
                    return self
                last = status
            except OSError as e:
                last = e
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"prometheus not ready within {START_TIMEOUT}s (last: {last!r})\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def query(self, expr: str) -> list[dict]:
        """Instant query: the result vector ([{"metric": {...}, "value": [ts, "v"]}, ...])."""
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10)
        assert status == 200, f"query {expr!r} -> HTTP {status}: {body[:300]!r}"
        doc = json.loads(body)
        assert doc.get("status") == "success" and doc["data"]["resultType"] == "vector", doc
        return doc["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        """The value of a query that selects at most one series (None when it selects none)."""
        res = self.query(expr)
        assert len(res) <= 1, f"{expr!r} selected {len(res)} series: {res}"
        return float(res[0]["value"][1]) if res else None

    def targets_up(self) -> list[dict]:
        status, body = self._get("/api/v1/targets")
        assert status == 200, body[:300]
        return json.loads(body)["data"]["activeTargets"]

    def wait_for(self, checks: dict[str, float], timeout: float = 30.0) -> dict[str, float | None]:
        """Poll until every query in `checks` returns exactly its value; returns the last values seen."""
        deadline = time.monotonic() + timeout
        got: dict[str, float | None] = {}
        while True:
            got = {q: self.scalar(q) for q in checks}
            if all(got[q] == v for q, v in checks.items()) or time.monotonic() >= deadline:
                return got
            time.sleep(0.5)
