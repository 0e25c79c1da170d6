"""Probes on the admin endpoint (observability spec): /healthz answers while the process runs; /readyz is 200
once the spool is loaded and the listeners are bound, 503 from SIGTERM until the process exits (the admin
port keeps answering while sessions drain), and never 200 for a relay that cannot bind its listeners.
"""

from __future__ import annotations

import socket
import subprocess
import time

from harness.relay import split_addr
from harness.smtp import SmtpConn

EXIT_TIMEOUT = 20.0


def probe(relay, path: str):
    """Status of GET path, or the exception if nothing answered (connection refused, reset...)."""
    try:
        return relay.http_get(path, timeout=3)[0]
    except OSError as e:
        return e


def test_healthz_and_readyz_answer_200_once_the_relay_is_ready(relays):
    relay = relays.start("probed")  # start() itself waits for /readyz 200
    assert probe(relay, "/healthz") == 200
    assert probe(relay, "/readyz") == 200
    # and they go on answering 200 while nothing changes
    assert [probe(relay, "/readyz") for _ in range(5)] == [200] * 5


def test_after_sigterm_readyz_is_503_while_a_session_drains_and_the_admin_port_answers_until_exit(relays):
    relay = relays.start("draining")
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        # a transaction in progress: the session is not idle, so the relay must wait for it
        c.expect("MAIL FROM:<a@example.test>", "250 ")
        # (a return-path feedback address: read at acceptance, so no delivery attempt is in flight when the
        # relay stops)
        c.expect("RCPT TO:<fbl@bounces.example.test>", "250 ")

        relay.proc.terminate()  # SIGTERM, by PID
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = probe(relay, "/readyz")
            seen.append(s)
            if s != 200:
                break
            time.sleep(0.02)
        assert seen and seen[-1] == 503, f"/readyz after SIGTERM (session held open): {seen}\n{relay.log_tail(20)}"

        # While the session is held the process keeps running and the admin port keeps answering: 503, and
        # /healthz still 200.
        later = []
        for _ in range(10):
            assert relay.running, f"relay exited with {relay.proc.returncode} while a transaction was open"
            later.append((probe(relay, "/readyz"), probe(relay, "/healthz")))
            time.sleep(0.1)
        assert all(r == (503, 200) for r in later), f"(/readyz, /healthz) while draining: {later}"

        # The session finishes its transaction, then the relay exits.
        end = c.data(b"Subject: drained\r\n\r\nbody\r\n")
        assert end.code == 250, f"the transaction in flight at SIGTERM was not accepted: {end}\n{c.dump()}"
        try:
            c.cmd("QUIT", timeout=5)
        except (AssertionError, OSError):
            pass  # the relay may close with 421 first; either way the session is over

    after_quit = []
    deadline = time.monotonic() + EXIT_TIMEOUT
    while relay.running and time.monotonic() < deadline:
        after_quit.append(probe(relay, "/readyz"))
        time.sleep(0.05)
    try:
        code = relay.proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, f"relay did not exit 0 after its last session ended (exit: {code})\n{relay.log_tail(20)}"
    answered = [s for s in after_quit if isinstance(s, int)]
    assert all(s == 503 for s in answered), f"/readyz between the end of the session and exit: {after_quit}"
    assert not isinstance(probe(relay, "/healthz"), int), "the admin port still answers after the process exited"


def test_a_relay_whose_listener_port_is_taken_exits_non_zero_and_is_never_ready(relays):
    cfg = relays.config("clash")
    # the last listener's port is taken, so the others (and the admin endpoint) may already be up when it fails
    host, port = split_addr(cfg["listeners"][-1]["address"])
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind((host, port))
        blocker.listen(1)
        relay = relays.start("clash", config=cfg, wait=False)
        statuses = []
        deadline = time.monotonic() + EXIT_TIMEOUT
        while relay.running and time.monotonic() < deadline:
            statuses.append(probe(relay, "/readyz"))
            time.sleep(0.02)
        code = relay.proc.poll()
        assert code is not None, (
            f"relay still running {EXIT_TIMEOUT}s after failing to bind {host}:{port}; /readyz said "
            f"{sorted(set(map(str, statuses)))}\n{relay.log_tail(20)}")
        assert code != 0, f"relay exited 0 although {host}:{port} was taken\n{relay.log_tail(20)}"
        assert 200 not in statuses, f"/readyz answered 200 for a relay that could not bind {host}:{port}: {statuses}"
        assert str(port) in relay.log_text(), f"the error does not name the port {port}:\n{relay.log_tail(20)}"
    finally:
        blocker.close()
