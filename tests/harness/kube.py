"""Plumbing for the operator tests: kubectl against the test control plane, a namespace per test, and the
operator binary run as a local process (there are no nodes, so pods never run; the operator's objects do
appear)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from harness.relay import free_port

REPO = Path(__file__).resolve().parents[2]


def kubeconfig() -> str | None:
    return os.environ.get("KUBECONFIG")


def kubectl_bin() -> str | None:
    return shutil.which("kubectl")


def kubectl(*args: str, stdin: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def get_json(kind: str, name: str, ns: str) -> dict | None:
    r = kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)


def wait_for(check, what: str, attempts: int = 150, pause: float = 0.2):
    """Poll `check` (bounded) until it returns a truthy value; fail naming `what` otherwise."""
    last = None
    for _ in range(attempts):
        last = check()
        if last:
            return last
        time.sleep(pause)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def install_crds(path: Path) -> None:
    """Apply the CRDs in `path` (server-side) and wait until the API server serves them."""
    kubectl("apply", "--server-side", "--field-manager=test", "-f", str(path))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(path))


def service_account_kubeconfig(namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig for the test cluster that authenticates as a ServiceAccount (a bound token from
    `kubectl create token`), so that a process using it gets that account's RBAC and nothing more."""
    token = kubectl("create", "token", account, "-n", namespace, "--duration=2h").stdout.strip()
    admin = json.loads(kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
    cluster = admin["clusters"][0]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": cluster["name"], "user": account, "namespace": namespace}}],
        "current-context": account,
    }))
    return path


def publish_record(dns, rec: dict) -> None:
    """Serve one of a SendingDomain's `status.records` from the test DNS server (harness.dns), as its owner
    would publish it."""
    if rec["type"] == "TXT":
        value = rec["value"]
        strings = [s.strip('"') for s in value.split('" "')]
        dns.txt(rec["name"], *strings)
    elif rec["type"] == "MX":
        pref, host = rec["value"].split()
        dns.mx(rec["name"], (int(pref), host.rstrip(".")))
    elif rec["type"] == "A":
        dns.a(rec["name"], rec["value"])
    elif rec["type"] == "AAAA":
        dns.aaaa(rec["name"], rec["value"])
    elif rec["type"] == "CNAME":
        dns.cname(rec["name"], rec["value"].rstrip("."))
    else:
        raise AssertionError(f"no way to publish a {rec['type']} record: {rec}")


def secret_data(obj: dict, key: str) -> str:
    return base64.b64decode(obj["data"][key]).decode()


class Namespace:
    def __init__(self):
        self.name = f"t-{uuid.uuid4().hex[:10]}"
        kubectl("create", "namespace", self.name)

    def apply(self, manifest: str) -> subprocess.CompletedProcess:
        return kubectl("apply", "--server-side", "--field-manager=test", "-n", self.name, "-f", "-", stdin=manifest, check=False)

    def delete(self) -> None:
        # Without kube-controller-manager the namespace stays Terminating; the name is unique anyway.
        kubectl("delete", "namespace", self.name, "--wait=false", check=False)


class Operator:
    """herald-operator run, as a local process against the test API server."""

    def __init__(self, workdir: Path, nameserver: str, lease_namespace: str, extra: list[str] | None = None,
                 kubeconfig: str | None = None):
        """`kubeconfig`: run with that identity instead of the test cluster's admin (e.g. a ServiceAccount's
        token, to prove its RBAC is enough)."""
        self.health = f"127.0.0.1:{free_port()}"
        self.log_path = workdir / "operator.log"
        binary = os.environ.get("HERALD_OPERATOR_BIN", str(REPO / "target" / "debug" / "herald-operator"))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                binary, "run", "--dns-nameserver", nameserver, "--health-address", self.health,
                # Short recheck periods so a test sees DNS changes within its bounded waits.
                "--dns-recheck-pending", "1s", "--dns-recheck-verified", "2s",
                # Each test's operator elects itself in the test's own namespace.
                "--lease-namespace", lease_namespace,
                *(extra or []),
            ],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "KUBECONFIG": kubeconfig} if kubeconfig else None,
        )

    def metrics_text(self) -> str:
        """The operator's /metrics ("" while it does not answer)."""
        import urllib.request

        try:
            return urllib.request.urlopen(f"http://{self.health}/metrics", timeout=5).read().decode()
        except OSError:
            return ""

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of the operator's /metrics (0 when absent)."""
        for line in self.metrics_text().splitlines():
            if line.startswith(name) and (not labels or labels in line):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self.log.closed:
            self.log.close()
