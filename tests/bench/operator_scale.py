#!/usr/bin/env python3
"""Benchmark: N SendingDomains (default 1000) reconciled by herald-operator against the test API server, with
their DNS records served by a loopback DNS server as soon as the operator has computed them. Prints the time
from the operator's start to every domain Ready, reconciles done (SendingDomain, and SmtpRelay: each of those
renders the whole relay config), and the operator's peak RSS.

Run inside a test control plane:  tests/cluster/run.sh -- tests/bench/operator_scale.py [-n 1000]
This is a benchmark, not a test: it exits non-zero only when the run is broken (not all Ready in time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness.dns import DnsServer  # noqa: E402
from harness.kube import REPO, Namespace, Operator, kubectl  # noqa: E402


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def manifests(n: int) -> str:
    docs = [
        """apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: {name: relay}
spec:
  replicas: 1
  listeners: [{name: trusted, port: 2525, allowNetworks: [10.0.0.0/8]}]
"""
    ]
    for i in range(n):
        docs.append(
            f"""apiVersion: herald.dev/v1alpha1
kind: SendingDomain
metadata: {{name: d{i}}}
spec:
  domain: d{i}.bench.test
  relayRef: {{name: relay}}
  dkim: {{algorithm: ed25519}}
  dmarc: {{policy: none}}
"""
        )
    return "---\n".join(docs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=int(os.environ.get("BENCH_DOMAINS", 1000)))
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if not os.environ.get("KUBECONFIG"):
        print("run me inside a control plane: tests/cluster/run.sh -- tests/bench/operator_scale.py", file=sys.stderr)
        return 2
    binary = REPO / "target" / "release" / "herald-operator"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "herald-operator"], cwd=REPO, check=True)
    os.environ.setdefault("HERALD_OPERATOR_BIN", str(binary))
    kubectl("apply", "--server-side", "--field-manager=bench", "-f", str(REPO / "crds" / "herald.dev.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/sendingdomains.herald.dev", "--timeout=30s")
    dns = DnsServer().start()
    dns.zone("test")
    ns = Namespace()
    work = Path(tempfile.mkdtemp(prefix="herald-opbench-"))
    kubectl("apply", "--server-side", "--field-manager=bench", "-n", ns.name, "-f", "-", stdin=manifests(args.n), timeout=300)
    print(f"created {args.n} SendingDomains in namespace {ns.name}", file=sys.stderr)
    op = Operator(work, dns.address, ns.name)
    start = time.monotonic()
    published: set[str] = set()
    ready = 0
    peak = 0
    ok = False
    try:
        while time.monotonic() - start < args.timeout:
            items = json.loads(kubectl("get", "sendingdomains", "-n", ns.name, "-o", "json", timeout=120).stdout)["items"]
            ready = 0
            for sd in items:
                st = sd.get("status") or {}
                name = sd["metadata"]["name"]
                if name not in published and st.get("records"):
                    for rec in st["records"]:
                        if rec["type"] == "TXT":
                            dns.txt(rec["name"], *[s.strip('"') for s in rec["value"].split('" "')])
                        elif rec["type"] == "MX":
                            pref, host = rec["value"].split()
                            dns.mx(rec["name"], (int(pref), host.rstrip(".")))
                    published.add(name)
                if any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", [])):
                    ready += 1
            peak = max(peak, vm_hwm_kib(op.proc.pid))
            if ready == args.n:
                break
            time.sleep(1)
        elapsed = time.monotonic() - start
        reconciles = op.metric("herald_operator_reconcile_total", 'kind="SendingDomain"')
        relay_reconciles = op.metric("herald_operator_reconcile_total", 'kind="SmtpRelay"')
        print(f"domains            {args.n}")
        print(f"all Ready after    {elapsed:.1f} s" if ready == args.n else f"Ready              {ready}/{args.n} after {elapsed:.1f} s (timeout)")
        print(f"reconciles         {reconciles:.0f} (SendingDomain, {reconciles / max(args.n, 1):.1f} per domain)")
        print(f"relay renders      {relay_reconciles:.0f} (SmtpRelay reconciles)")
        print(f"operator peak RSS  {peak / 1024:.1f} MiB (VmHWM)")
        ok = ready == args.n
        return 0 if ok else 1
    finally:
        op.stop()
        ns.delete()
        dns.stop()
        # The operator's log is only worth keeping when the run went wrong.
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"operator log kept in {op.log_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
