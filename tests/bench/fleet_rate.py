#!/usr/bin/env python3
"""Fleet benchmark: two herald relays sharing a store (Debian's redis-server, wire-compatible with Valkey)
against the same two relays in local mode, in one run.

1. Throughput: each relay gets its own smtp-source (`-s` sessions, `-m` messages of `-l` bytes) at the same
   time, and both deliver to one smtp-sink. Reported per relay: delivered msg/s (N / time until the sink has
   all 2N), once with a `store:` section and once without; the ratio is the cost of being in a fleet. With
   the store, `per_domain.max_connections` is the fleet's limit, so that run sets twice `--connections`:
   the sink sees the same number of connections either way. The
   store's `total_commands_processed` before and after gives its round trips per message.
2. Propagation: `--propagation K` suppressions added through relay A's admin API, one at a time; for each,
   the time until relay B's admin API shows it (polled every 0.5 ms). Reported p50/p99/max, with the same
   for relay A itself (the admin API's own time, a floor under the figure for B).
3. With `--shaping`: the cost of IP warm-up at a load that reaches no cap. The sender's domain sends from
   a pool of one address; the same throughput run with that address warming up (a cap far above the run's
   messages, so every message takes a turn under it) against the address warm, in local mode and with the
   store (where each message's turn is a round trip to it).
4. With `--providers`: the cost of limits per mailbox provider at a load that hits none. Delivery goes by
   MX (a DNS server serving dest.test, TTL 5 minutes) instead of the smarthost (which has no provider);
   the same throughput run with `shaping.default` limits far above the load (a connection place and a
   turn under a rate for every message) against none (the provider unshaped), in local mode and with the
   store.

A benchmark, not a test: the exit status is non-zero only when a run is broken, never for the numbers.
Linux, root (smtp-sink), Python 3.11 standard library.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib  # noqa: E402
from harness.dns import DnsServer  # noqa: E402
from benchlib import (  # noqa: E402
    Herald, SetupError, SourceRun, find_herald, free_port, herald_delivery_yaml, log, percentile,
    smtp_source_cmd, terminate, wait_until,
)
from e2e_rate import Sink  # noqa: E402


class Store:
    """A private redis-server on loopback, with a password and no persistence."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None
        self.cli = shutil.which("redis-cli")
        server = shutil.which("redis-server")
        if not server or not self.cli:
            raise SetupError("redis-server and redis-cli are needed (Debian package redis-server)")
        self.server = server

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "store.log", "wb") as out:
            self.proc = subprocess.Popen(
                [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        benchlib.OWNED_PIDS.add(self.proc.pid)
        if not wait_until(lambda: self.cmd("PING") == "PONG", 10, 0.05):
            raise SetupError("redis-server did not answer PING")

    def cmd(self, *args: str) -> str:
        try:
            out = subprocess.run([self.cli, "-p", str(self.port), "-a", self.password, "--no-auth-warning",
                                  "--raw", *args], capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def commands(self) -> int:
        for line in self.cmd("INFO", "stats").splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":")[1])
        raise SetupError("INFO stats has no total_commands_processed")

    def yaml(self) -> str:
        pw = self.dir / "password"
        pw.write_text(self.password + "\n")
        return (f"store: {{ url: \"redis://127.0.0.1:{self.port}/0\", password_file: {pw}, "
                "resync_interval: 1h }\n")

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)
            benchlib.OWNED_PIDS.discard(self.proc.pid)
            self.proc = None


def pool_yaml(warming: bool) -> str:
    """bench.test's mail from pool `bench` (127.0.0.1); `warming`: on day 23 of the standard warm-up, a
    cap of 125,000 messages, above what a run sends (up to 2 x 62,499 messages)."""
    start = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 22 * 86400))
    warm = f", warmup_start: \"{start}\"" if warming else ""
    return (
        "domains:\n  - { name: bench.test, ip_pool: bench }\n"
        "ip_pools:\n  - name: bench\n    warmup: { preset: standard }\n"
        f"    sources: [ {{ address: 127.0.0.1, ehlo: bench.herald.test{warm} }} ]\n"
    )


def mx_delivery_yaml(dns_port: int, sink_port: int, connections: int) -> str:
    """Delivery by MX through the bench's DNS server, to the sink's port."""
    return (
        "delivery:\n"
        f"  dns: {{ nameservers: [\"127.0.0.1:{dns_port}\"] }}\n"
        f"  port: {sink_port}\n"
        "  tls: none\n"
        f"  per_domain: {{ max_connections: {connections}, messages_per_connection: 1000 }}\n"
    )


# Limits far above any run's load: every message takes a connection place and a turn under the rate.
UNREACHED_LIMITS = "shaping:\n  default: { max_connections: 100000, max_message_rates: [\"1000000000/s\"] }\n"


def relays(binary: Path, base: Path, sink_port: int, store: Store | None, args,
           pool: str = "", dns_port: int | None = None) -> list[Herald]:
    out = []
    for name in ("a", "b"):
        # With the store, per_domain.max_connections is the fleet's limit: twice the per-relay value gives
        # the sink the same connections in both runs, so the ratio is the store's cost, not a smaller cap.
        per_domain = args.connections * (2 if store else 1)
        if dns_port is None:
            extra = herald_delivery_yaml(sink_port, connections=per_domain, msgs_per_conn=1000)
        else:
            extra = mx_delivery_yaml(dns_port, sink_port, per_domain)
        if store:
            extra += store.yaml()
        extra += pool
        h = Herald(binary, base / name, ready_timeout=60, expected=args.messages, extra_yaml=extra)
        h.start()
        out.append(h)
    return out


def throughput(binary: Path, base: Path, store: Store | None, args, pool: str = "",
               dns_port: int | None = None) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    sink = Sink(args.smtp_sink, base, ready_timeout=10)
    sink.start()
    hs = relays(binary, base, sink.port, store, args, pool, dns_port)
    try:
        before = store.commands() if store else 0
        sink.expect(2 * args.messages)
        runs = [SourceRun(smtp_source_cmd(args, h.port), base / f"source-{i}.out") for i, h in enumerate(hs)]
        t0 = min(r.start() for r in runs)
        for r in runs:
            r.done.wait(args.timeout)
            if r.returncode != 0:
                r.report_problems()
                raise SetupError("smtp-source failed")
        if not wait_until(lambda: sink.count >= 2 * args.messages, args.timeout, 0.05):
            raise SetupError(f"the sink got {sink.count} of {2 * args.messages}")
        took = (sink.time_reached(2 * args.messages) or time.monotonic()) - t0
        after = store.commands() if store else 0
        return {"seconds": took, "per_relay": args.messages / took,
                "store_commands": after - before}
    finally:
        for h in hs:
            h.stop()
        sink.stop()


def admin(h: Herald, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(h.admin_url(path), data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None


def propagation(binary: Path, base: Path, store: Store, args) -> dict:
    hs = relays(binary, base, free_port(), store, args)
    a, b = hs
    try:
        far, near = [], []
        for i in range(args.propagation):
            addr = f"p{i}-{secrets.token_hex(4)}@bench.test"
            t0 = time.monotonic()
            status, _ = admin(a, "PUT", f"/suppressions/{addr}", {"reason": "bench"})
            if status != 200:
                raise SetupError(f"PUT /suppressions on relay a: {status}")
            near.append(time.monotonic() - t0)
            deadline = t0 + 10
            while time.monotonic() < deadline:
                status, doc = admin(b, "GET", f"/suppressions/{addr}")
                if status == 200 and doc and doc.get("suppression"):
                    far.append(time.monotonic() - t0)
                    break
                time.sleep(0.0005)
            else:
                raise SetupError(f"{addr} did not reach relay b within 10 s")
        return {"b": sorted(far), "a": sorted(near)}
    finally:
        for h in hs:
            h.stop()


def print_ratios(runs: dict, off: str, on: str, messages: int) -> None:
    """One line per mode of `runs` (keyed `<mode>-<off|on>`): both rates, on ÷ off, and with the store the
    store commands per message of each."""
    for mode in ("local", "store"):
        a, b = runs[f"{mode}-{off}"], runs[f"{mode}-{on}"]
        print(f"  {mode:5}: {off} {a['per_relay']:8.0f} msg/s per relay, {on} {b['per_relay']:8.0f}; "
              f"ratio {b['per_relay'] / a['per_relay']:.2f} (goal: at least 0.95)"
              + (f"; store commands per message {b['store_commands'] / (2 * messages):.2f} "
                 f"vs {a['store_commands'] / (2 * messages):.2f}" if mode == "store" else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--messages", type=int, default=10000, help="messages per relay (default 10000)")
    ap.add_argument("-s", "--sessions", type=int, default=10, help="smtp-source sessions per relay")
    ap.add_argument("-l", "--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("--connections", type=int, default=10,
                    help="delivery connections per relay (the fleet's limit is twice this in the store run)")
    ap.add_argument("--propagation", type=int, default=200, help="suppressions timed from relay a to b")
    ap.add_argument("--shaping", action="store_true", help="also time IP warm-up at a load under its cap")
    ap.add_argument("--providers", action="store_true",
                    help="also time provider limits at a load under them (delivery by MX)")
    ap.add_argument("--only-extra", action="store_true",
                    help="skip the store-vs-local and propagation runs (with --shaping or --providers)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--herald-bin", help="herald-relay binary (default target/release/herald-relay, built if missing)")
    ap.add_argument("--build-timeout", type=float, default=1800)
    ap.add_argument("--source-args", default="")
    args = ap.parse_args()
    args.smtp_source = benchlib.find_tool("smtp-source")
    args.smtp_sink = benchlib.find_tool("smtp-sink")
    if not args.smtp_source or not args.smtp_sink:
        raise SetupError("smtp-source and smtp-sink are needed (Debian package postfix)")
    benchlib.install_signal_handlers()
    binary = find_herald(args)
    base = Path(tempfile.mkdtemp(prefix="herald-fleet."))
    store = Store(base / "store")
    store.start()
    dns = None
    try:
        local = shared = prop = None
        if not args.only_extra:
            local = throughput(binary, base / "local", None, args)
            shared = throughput(binary, base / "shared", store, args)
            prop = propagation(binary, base / "propagation", store, args)
        providers = {}
        if args.providers:
            dns = DnsServer(ttl=300).start()
            dns.mx("dest.test", (10, "mx.sink.test")).a("mx.sink.test", "127.0.0.1")
            dns_port = int(dns.address.rsplit(":", 1)[1])
            for mode, st in (("local", None), ("store", store)):
                for shaped in (False, True):
                    name = f"{mode}-{'limits' if shaped else 'none'}"
                    providers[name] = throughput(binary, base / name, st, args,
                                                 UNREACHED_LIMITS if shaped else "", dns_port)
        shaping = {}
        if args.shaping:
            if 2 * args.messages >= 125_000:
                raise SetupError("--shaping needs -m under 62,500: the warming address's cap is 125,000")
            for mode, st in (("local", None), ("store", store)):
                for warming in (False, True):
                    name = f"{mode}-{'warming' if warming else 'warm'}"
                    if st:
                        # The earlier runs' messages count against today's cap of the same address.
                        st.cmd("FLUSHALL")
                    shaping[name] = throughput(binary, base / name, st, args, pool_yaml(warming))
    finally:
        store.stop()
        if dns:
            dns.stop()
    print(f"two relays, each {args.messages} messages of {args.size} bytes from {args.sessions} sessions, "
          "one smtp-sink")
    if providers:
        print("provider limits at a load under them (delivery by MX; no limits vs limits never reached):")
        print_ratios(providers, "none", "limits", args.messages)
    if local is not None and shared is not None and prop is not None:
        print(f"local mode:  {local['per_relay']:8.0f} msg/s per relay ({local['seconds']:.2f} s for both)")
        print(f"with store:  {shared['per_relay']:8.0f} msg/s per relay ({shared['seconds']:.2f} s for both)")
        print(f"ratio with store / local: {shared['per_relay'] / local['per_relay']:.2f}  (goal: at least 0.90)")
        print(f"store commands during the run: {shared['store_commands']} "
              f"({shared['store_commands'] / (2 * args.messages):.4f} per message; feed reads and the redis-cli "
              "INFO calls included)")
        b, a = prop["b"], prop["a"]
        ms = lambda v: f"{1000 * v:.1f} ms"  # noqa: E731
        print(f"suppression propagation, {len(b)} additions through relay a's admin API:")
        print(f"  visible on relay b: p50 {ms(percentile(b, 50))}, p99 {ms(percentile(b, 99))}, max {ms(b[-1])}")
        print(f"  the PUT on relay a itself (floor): p50 {ms(percentile(a, 50))}, p99 {ms(percentile(a, 99))}")
    if shaping:
        print("IP warm-up at a load under its cap (one pool address, warm vs warming up):")
        print_ratios(shaping, "warm", "warming", args.messages)
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SetupError as e:
        log(f"setup failed: {e}")
        sys.exit(2)
