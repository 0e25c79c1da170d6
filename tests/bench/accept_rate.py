#!/usr/bin/env python3
"""Accept-rate benchmark: herald-relay vs. a private Postfix instance.

Runs Postfix's smtp-source load generator against

  * herald-relay (target/release/herald-relay, trusted loopback listener), and
  * a private, throw-away Postfix instance from the distribution package
    (own config_directory / queue_directory / data_directory in a temp dir,
    smtpd on a free 127.0.0.1 port, qmgr disabled so nothing is delivered),

one after the other in the same invocation, and prints accepted messages per
second for both, the ratio, and peak memory.  Both servers queue to a durable
on-disk spool on the same filesystem: Postfix's cleanup(8) fsyncs every queue
file before smtpd answers 250 to the end of DATA (the default,
untouched here).

This is a benchmark, not a test: the exit status is non-zero only when
something is broken (setup failure, smtp-source failure, queue count != number
of messages sent), never because of the numbers.

Python 3.11, standard library only.  Linux only (/proc).  Must run as root
(Postfix's master runs as root and its queue must be owned by the postfix
user).  See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_SETUP,
    Herald,
    Postfix,
    Sampler,
    SetupError,
    SourceRun,
    Target,
    add_common_args,
    become_subreaper,
    env_float,
    environment_warnings,
    find_herald,
    find_tool,
    fmt_mb,
    free_port,
    herald_delivery_yaml,
    install_signal_handlers,
    log,
    postfix_version,
    print_host_info,
    reap_orphans,
    sender_domain,
    smtp_source_cmd,
)


def no_delivery_yaml(closed_port: int) -> str:
    """herald has no switch to turn delivery off.  Its smarthost is a loopback
    port where nothing listens, so each message's first attempt is refused
    (one connect() on loopback) and it is deferred for an hour: it stays
    queued, like the qmgr-less Postfix's.  Without this, herald would look up
    dest.test, bounce every message and suppress the recipient."""
    return herald_delivery_yaml(closed_port, retry_first="1h")


class AcceptPostfix(Postfix):
    """Private Postfix instance that accepts into its queue and never delivers."""

    def main_cf(self) -> str:
        return self.common_main_cf("tests/bench/accept_rate.py") + """\
# Flow control: cleanup(8) waits up to in_flow_delay for a token that qmgr(8)
# puts back after it has picked up a message.  qmgr is disabled here (nothing
# is delivered), so without this every message would stall for 1s.
in_flow_delay = 0
"""

    def master_cf(self) -> str:
        # smtpd on a private loopback port plus the services smtpd/cleanup
        # need.  qmgr (and pickup, the delivery agents, ...) are deliberately
        # absent: mail is accepted into the durable queue (incoming/) and
        # stays there.
        return f"""\
# service  type  private unpriv chroot wakeup maxproc command
127.0.0.1:{self.port} inet n - n - - smtpd
cleanup    unix  n       -      n      -      0       cleanup
rewrite    unix  -       -      n      -      -       trivial-rewrite
bounce     unix  -       -      n      -      0       bounce
defer      unix  -       -      n      -      0       bounce
trace      unix  -       -      n      -      0       bounce
proxymap   unix  -       -      n      -      -       proxymap
anvil      unix  -       -      n      -      1       anvil
postlog    unix-dgram n  -      n      -      1       postlogd
#qmgr      unix  n       -      n      300    1       qmgr   (disabled: no delivery)
"""


# --------------------------------------------------------------------------
# One measured run.


@dataclass
class Result:
    target: str
    round: int
    messages: int
    seconds: float
    queued: int
    source_rc: int
    peak_rss_kb: int
    peak_pss_kb: int
    peak_procs: int
    vm_hwm_kb: int | None
    samples: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.source_rc == 0 and self.queued == self.messages

    @property
    def peak_kb(self) -> int:
        """Headline peak-memory number (see README)."""
        return self.vm_hwm_kb if self.vm_hwm_kb else self.peak_rss_kb


def run_load(t: Target, args, rnd: int, rundir: Path) -> Result:
    cmd = smtp_source_cmd(args, t.port)
    sampler = Sampler(t.root_pid, with_pss=not args.no_pss, seen=t.seen_pids)
    sampler.sample()
    os.sync()  # don't make this run pay for the previous run's dirty pages
    log(f"{t.name} round {rnd}: {' '.join(cmd)}")
    src = SourceRun(cmd, rundir / "smtp-source.out")
    t0 = src.start()
    try:
        # The main thread samples memory while smtp-source runs.
        deadline = t0 + args.timeout
        while not src.done.wait(args.sample_interval):
            sampler.sample()
            if isinstance(t, Postfix):
                reap_orphans()
            if time.monotonic() > deadline:
                raise SetupError(
                    f"smtp-source against {t.name} did not finish within "
                    f"{args.timeout:.0f}s{t.diagnostics()}"
                )
        elapsed = src.elapsed
    finally:
        src.kill()
    sampler.sample(full=True)
    src.report_problems()
    # VmHWM first: herald's /queue listing (in queued()) builds a JSON
    # document of every queued message and would raise the high-water mark.
    hwm = t.vm_hwm_kb()
    queued = t.queued()
    return Result(
        target=t.name, round=rnd, messages=args.messages, seconds=elapsed,
        queued=queued, source_rc=src.returncode, peak_rss_kb=sampler.peak_rss_kb,
        peak_pss_kb=sampler.peak_pss_kb, peak_procs=sampler.peak_procs,
        vm_hwm_kb=hwm, samples=sampler.samples,
    )


# --------------------------------------------------------------------------


def print_report(results: list[Result], args) -> None:
    print()
    print(f"smtp-source: {args.sessions} parallel sessions, {args.messages} messages/run, "
          f"{args.size}-byte messages, one message per connection"
          + (f", extra args '{args.source_args}'" if args.source_args else ""))
    print()
    hdr = (f"{'target':<8} {'round':>5} {'msgs':>7} {'queued':>7} {'seconds':>8} "
           f"{'msg/s':>9} {'peakMB':>7} {'sumRSS':>7} {'sumPSS':>7} {'procs':>5}  check")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r.target:<8} {r.round:>5} {r.messages:>7} {r.queued:>7} {r.seconds:>8.2f} "
              f"{r.rate:>9.1f} {fmt_mb(r.peak_kb):>7} {fmt_mb(r.peak_rss_kb):>7} "
              f"{fmt_mb(r.peak_pss_kb):>7} {r.peak_procs:>5}  "
              + ("ok" if r.ok else f"FAIL (smtp-source rc={r.source_rc}, queued {r.queued} != {r.messages})"))
    print()
    print("peakMB: herald = VmHWM of the herald-relay process (/proc/PID/status);")
    print(f"        postfix = peak over samples (every {args.sample_interval * 1000:.0f} ms) of the summed "
          "VmRSS of the master and all its children")
    print("        (smtpd, cleanup, trivial-rewrite, anvil, proxymap, postlogd, ...).")
    print("sumRSS/sumPSS: the same sampling for both targets (PSS from smaps_rollup, every "
          f"{args.sample_interval * 5000:.0f} ms);")
    print("        RSS counts shared pages (libc, libpostfix-*.so, ...) once per process, PSS splits")
    print("        them between processes, so sumPSS is the fairer multi-process total.")
    print()

    by = {name: [r for r in results if r.target == name] for name in ("herald", "postfix")}
    med = {}
    for name, rs in by.items():
        if rs:
            med[name] = (
                statistics.median(r.rate for r in rs),
                statistics.median(r.peak_kb for r in rs),
                statistics.median(r.peak_pss_kb for r in rs) if not args.no_pss else 0,
            )
            rounds = "" if len(rs) == 1 else f" (median of {len(rs)} rounds)"
            print(f"{name:<8} accept rate: {med[name][0]:9.1f} msg/s, peak memory: "
                  f"{fmt_mb(med[name][1])} MB{rounds}")
    if "herald" in med and "postfix" in med:
        h, p = med["herald"], med["postfix"]
        print()
        print(f"ratio herald/postfix accept rate: {h[0] / p[0]:.2f}x" if p[0] else
              "ratio herald/postfix accept rate: n/a")
        print(f"RSS ratio herald/postfix (peakMB): {h[1] / p[1]:.2f}x" if p[1] else
              "RSS ratio herald/postfix: n/a")
        if not args.no_pss and p[2]:
            print(f"PSS ratio herald/postfix (sumPSS): {h[2] / p[2]:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Accepted-messages/s of herald-relay vs. a private Postfix instance "
                    "(smtp-source, loopback, durable queue).",
        epilog="All options also have environment-variable defaults; see tests/bench/README.md.",
    )
    add_common_args(ap)
    ap.add_argument("--timeout", type=float, default=env_float("BENCH_TIMEOUT", 1800),
                    help="max seconds for one smtp-source run (env BENCH_TIMEOUT, default 1800)")
    args = ap.parse_args()

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in ("herald", "postfix") for t in targets):
        ap.error("--targets must be a subset of herald,postfix")
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1:
        ap.error("--messages, --sessions and --rounds must be >= 1")
    if sys.platform != "linux":
        log("Linux only (/proc)")
        return EXIT_SETUP

    args.smtp_source = find_tool("smtp-source")
    if not args.smtp_source:
        log("smtp-source not found (Debian: apt-get install postfix)")
        return EXIT_SETUP
    postfix_cmd = None
    if "postfix" in targets:
        if os.geteuid() != 0:
            log("the Postfix target must run as root")
            return EXIT_SETUP
        postfix_cmd = find_tool("postfix")
        if not postfix_cmd:
            log("postfix not found (Debian: apt-get install postfix)")
            return EXIT_SETUP

    become_subreaper()
    install_signal_handlers()

    base = Path(tempfile.mkdtemp(prefix="herald-bench.", dir=args.workdir)).resolve()
    os.chmod(base, 0o755)  # the postfix user must traverse into its queue
    results: list[Result] = []
    current: Target | None = None
    failed: dict[str, str] = {}
    status = EXIT_OK
    try:
        herald_bin = find_herald(args) if "herald" in targets else None

        pv = postfix_version() if postfix_cmd else ""
        print_host_info(base)
        if herald_bin:
            print(f"herald-relay: {herald_bin}")
        if pv:
            print(f"postfix: {pv} ({postfix_cmd}), private instance, qmgr disabled")
        environment_warnings(base, check_system_postfix=bool(postfix_cmd))

        for rnd in range(1, args.rounds + 1):
            order = targets if rnd % 2 == 1 else list(reversed(targets))
            for name in order:
                if name in failed:
                    continue
                rundir = base / f"r{rnd}-{name}"
                rundir.mkdir()
                current = (Herald(herald_bin, rundir, args.ready_timeout, args.messages,
                                  extra_yaml=no_delivery_yaml(free_port()),
                                  senders=[sender_domain(args)]) if name == "herald"
                           else AcceptPostfix(rundir, args.ready_timeout, postfix_cmd))
                try:
                    current.start()
                    res = run_load(current, args, rnd, rundir)
                except SetupError as e:
                    # Keep going with the other target; report and fail at the end.
                    log(f"error: {name}: {e}")
                    failed[name] = str(e).splitlines()[0]
                    status = EXIT_SETUP
                    continue
                finally:
                    try:
                        current.stop()
                    except Exception as e:  # report, but don't mask the run's outcome
                        log(f"error while stopping {name}: {e}")
                        status = EXIT_SETUP
                    current = None
                results.append(res)
                log(f"{name} round {rnd}: {res.rate:.1f} msg/s, queued {res.queued}/{res.messages}")
                if not res.ok:
                    log(f"{name}: count mismatch or smtp-source failure; kept {rundir}")
                elif not args.keep:
                    shutil.rmtree(rundir, ignore_errors=True)
    except SetupError as e:
        log(f"error: {e}")
        status = EXIT_SETUP
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        status = 130
    finally:
        if current is not None:
            try:
                current.stop()
            except Exception as e:  # keep cleaning up
                log(f"error while stopping {current.name}: {e}")
        reap_orphans()
        if args.keep:
            log(f"kept {base}")
        elif status == EXIT_SETUP or any(not r.ok for r in results):
            log(f"keeping {base} for inspection")
        else:
            shutil.rmtree(base, ignore_errors=True)

    if results:
        print_report(results, args)
    for name, why in failed.items():
        print(f"{name}: NOT MEASURED: {why}")
    if status != EXIT_OK:
        return status
    if any(not r.ok for r in results):
        log("FAIL: queue count differs from messages sent (or smtp-source failed)")
        return EXIT_MISMATCH
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
