"""Durability: a 250 means the message survives kill -9; a full spool says 452 4.3.1 and loses nothing;
SIGTERM drains sessions and exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid

import pytest

from harness.outbound import wait_until
from harness.relay import reassign_ports
from harness.smtp import ConnectionClosed, SmtpConn, dot_stuff, make_message
from harness.tools import smtp_source

pytestmark = pytest.mark.slow


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


class Recorder:
    """Client threads that send as fast as they can and record every queue id answered with 250.

    Each thread uses its own envelope so the restarted relay can be checked for the envelope too.
    """

    MAX_ITERATIONS = 5000  # per thread, a bound on top of the stop event

    def __init__(self, host: str, port: int, threads: int, tag: str):
        self.host, self.port = host, port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[str, str]] = {}  # id -> (sender, recipient)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i, tag), daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "recorder thread did not stop"

    def _run(self, n: int, tag: str) -> None:
        sender, rcpt = f"rec{n}-{tag}@example.test", f"sink{n}-{tag}@foreign.test"
        body = ("durable payload line\r\n" * 40).encode()
        for _ in range(self.MAX_ITERATIONS):
            if self.stop.is_set():
                return
            try:
                with SmtpConn(self.host, self.port, timeout=10) as c:
                    c.greeting()
                    c.ehlo()
                    for _ in range(20):
                        if self.stop.is_set():
                            return
                        c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
                        replies = [c.read_reply() for _ in range(3)]
                        if replies[2].code != 354:
                            self.errors.append(" / ".join(map(str, replies)))
                            c.cmd("RSET")
                            continue
                        c.send(dot_stuff(make_message(unique("rec"), body=body, sender=sender, to=rcpt)) + b".\r\n")
                        r = c.read_reply()
                        if r.queue_id:
                            with self.lock:
                                self.acked[r.queue_id] = (sender, rcpt)
                        else:
                            self.errors.append(str(r))
            except (ConnectionClosed, OSError, AssertionError):
                time.sleep(0.02)  # relay killed or restarting: try again until told to stop


def stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=5)


ROUNDS = 3
ACKS_PER_ROUND = 150


def test_kill_during_load_loses_no_acknowledged_message(relays):
    r = relays.start("crash")
    acked: dict[str, tuple[str, str]] = {}
    for rnd in range(ROUNDS):
        host, port = r.listener("trusted")
        load_log = r.workdir / f"smtp-source-{rnd}.log"
        load = smtp_source(host, port, "-s", "20", "-m", "2000", "-l", "2048",
                           "-f", "load@example.test", "-t", "load@foreign.test", log=load_log)
        rec = Recorder(host, port, threads=4, tag=f"r{rnd}")
        try:
            rec.start()
            enough = wait_until(lambda: rec.count() >= ACKS_PER_ROUND, timeout=60)
            assert enough, f"round {rnd}: only {rec.count()} acknowledgements in 60 s; errors: {rec.errors[:5]}"
            assert load.poll() is None or load.returncode == 0, f"smtp-source failed early: {load_log.read_text()[:500]!r}"
            r.kill()  # kill -9 while smtp-source and the recorder are mid-flight
        finally:
            rec.finish()
            stop_process(load)
        overlap = set(rec.acked) & set(acked)
        assert not overlap, f"round {rnd}: queue ids handed out twice across restarts: {sorted(overlap)[:5]}"
        acked.update(rec.acked)
        reassign_ports(r.config)
        r.start()
        q = r.queue_by_id()
        print(f"round {rnd}: recorder acked {len(rec.acked)}, queue after restart {len(q)}, "
              f"load from smtp-source {sum(1 for m in q.values() if m['sender'] == 'load@example.test')}")
        missing = sorted(i for i in acked if i not in q)
        assert not missing, (
            f"round {rnd}: {len(missing)} of {len(acked)} acknowledged messages missing after kill -9 "
            f"and restart, e.g. {missing[:5]}"
        )
        wrong = [(i, q[i]["sender"], q[i]["recipients"], env) for i, env in acked.items()
                 if (q[i]["sender"], q[i]["recipients"]) != (env[0], [env[1]])]
        assert not wrong, f"round {rnd}: envelope changed across restart: {wrong[:3]}"

    # the restarted relay answers normally
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        end = c.transaction("a@example.test", ["x@foreign.test"], make_message(unique("after-crash")))
        assert end.queue_id and end.queue_id not in acked, end
    assert end.queue_id in r.queue_by_id()


def test_sigterm_lets_a_session_in_flight_finish_then_exits_0_and_the_queue_survives(relays):
    r = relays.start("term")
    host, port = r.listener("trusted")
    c = SmtpConn(host, port)
    try:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.expect("DATA", "354")
        r.proc.send_signal(signal.SIGTERM)

        def not_served() -> bool:
            """New clients are no longer served: refused, 421, closed, or no greeting."""
            try:
                with SmtpConn(host, port, timeout=2) as n:
                    rep = n.read_reply()
                    return rep.code != 220
            except (ConnectionClosed, OSError):
                return True

        assert wait_until(not_served, timeout=10, step=0.1), "relay still greets new clients after SIGTERM"
        c.send(dot_stuff(make_message(unique("drain"))) + b".\r\n")
        end = c.read_reply()
        assert end.queue_id, f"session in flight was not allowed to finish: {end}"
        # the transaction in flight is what must finish; once it has, a 421 (shutting down) is as good as 221
        bye = c.cmd("QUIT")
        assert bye.starts("221 2.0.0") or bye.starts("421 4."), bye
    finally:
        c.close()
    code = r.proc.wait(timeout=30)
    assert code == 0, f"exit code after SIGTERM: {code}"
    reassign_ports(r.config)
    r.start()
    assert end.queue_id in r.queue_by_id()


def test_readyz_answers_503_while_draining_after_sigterm(relays):
    r = relays.start("drain")
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:  # a session in flight keeps the relay draining
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        r.proc.send_signal(signal.SIGTERM)
        seen = []

        def readyz_503() -> bool:
            try:
                seen.append(r.http_get("/readyz", timeout=2)[0])
            except OSError as e:
                seen.append(repr(e))
            return seen[-1] == 503

        assert wait_until(readyz_503, timeout=10, step=0.1), f"/readyz while draining: {seen[-3:]}"
        assert r.running, "relay exited while a session was still open"


def test_the_session_drain_ends_at_shutdown_sessions_and_the_relay_exits(relays):
    # A client stuck in the middle of a transaction holds the drain only as long as shutdown.sessions.
    cfg = relays.config("drain-short")
    cfg["shutdown"] = {"sessions": "1s", "deliveries": "1s", "events": "1s"}
    r = relays.start("drain-short", config=cfg)
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        r.proc.send_signal(signal.SIGTERM)
        # The default drain would keep it alive for 30 s; bounded wait well below that.
        assert wait_until(lambda: not r.running, timeout=20, step=0.1), r.log_tail(20)
    assert "drain grace period over" in r.log_text(), r.log_tail(20)
    assert r.proc.returncode == 0, r.proc.returncode


def test_full_spool_answers_452_4_3_1_and_keeps_every_acknowledged_message(relays, tmpfs):
    mnt = tmpfs.mount("256k")
    r = tmpfs.uses(relays.start("full", spool_dir=mnt / "spool"))
    host, port = r.listener("trusted")
    acked: list[str] = []
    full = None
    body = ("spool filler " * 6 + "\r\n").encode() * 200  # ~16 KB; 256 KB fill in about 16 messages
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        for i in range(60):
            rep = c.cmd("MAIL FROM:<a@example.test>")
            if rep.code != 250:
                full = rep
                break
            c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
            rep = c.data(make_message(unique(f"fill{i}"), body=body))
            if rep.queue_id:
                acked.append(rep.queue_id)
                continue
            full = rep
            break
        print(f"spool full after {len(acked)} messages: {full}")
        assert full is not None, f"256 KB spool took {len(acked)} messages of 16 KB and never said it was full"
        assert full.starts("452 4.3.1"), f"after {len(acked)} messages: {full}"
        c.expect("RSET", "250")  # the session survives the failure
    assert acked, "not a single message fit into the spool"
    q = r.queue_by_id()
    assert not [i for i in acked if i not in q], "acknowledged messages missing from /queue while full"
    assert r.stop() == 0
    reassign_ports(r.config)
    r.start()
    q = r.queue_by_id()
    missing = [i for i in acked if i not in q]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages missing after restart on a full spool"
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.expect("NOOP", "250 2.0.0")
