"""Config reload: SIGHUP, or a change of the file, applies a new config to new sessions without dropping the
ones in flight; a bad new config is refused and the running one stays in force."""

from __future__ import annotations

import signal
import time

from harness.smtp import SmtpConn, make_message


def wait_until(check, attempts: int = 100, pause: float = 0.1):
    """Poll `check` (bounded) until it returns a truthy value; return that value or the last falsy one."""
    last = None
    for _ in range(attempts):
        last = check()
        if last:
            return last
        time.sleep(pause)
    return last


def rcpt_limit_reply(relay, n: int) -> str:
    """Send MAIL and n+1 RCPTs on the trusted port; return the reply to the last one."""
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        for i in range(n):
            c.expect(f"RCPT TO:<r{i}@foreign.test>", "250 2.1.5")
        last = c.cmd("RCPT TO:<extra@foreign.test>")
        c.cmd("QUIT")
        return str(last)


def test_sighup_applies_new_limits_to_new_sessions_and_keeps_the_open_one(relays):
    r = relays.start("hup", limits={"max_recipients": 2})
    host, port = r.listener("trusted")
    assert rcpt_limit_reply(r, 2).startswith("452 4.5.3")

    # A session opened before the reload keeps working across it.
    early = SmtpConn(host, port)
    early.greeting()
    early.ehlo()
    r.config["limits"] = {"max_recipients": 5}
    r.write_config()
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reloaded" in r.log_text()), r.log_tail(30)
    assert rcpt_limit_reply(r, 5).startswith("452 4.5.3")
    assert rcpt_limit_reply(r, 3).startswith("250 2.1.5")
    with early:
        end = early.transaction("a@example.test", ["x@foreign.test"], make_message("early session"))
        assert end.queue_id, end


def test_a_changed_config_file_is_picked_up_without_a_signal(relays):
    r = relays.start("poll", limits={"max_recipients": 2})
    r.config["limits"] = {"max_recipients": 4}
    r.write_config()
    assert wait_until(lambda: "config reloaded" in r.log_text(), attempts=150), r.log_tail(30)
    assert rcpt_limit_reply(r, 4).startswith("452 4.5.3")


def test_a_bad_config_on_reload_is_refused_and_the_old_one_stays(relays):
    r = relays.start("bad", limits={"max_recipients": 2})
    r.config_path.write_text(r.config_path.read_text() + "bogus_key: 1\n")
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reload refused" in r.log_text()), r.log_tail(30)
    assert "bogus_key" in r.log_text()
    assert r.running
    assert rcpt_limit_reply(r, 2).startswith("452 4.5.3")
    status, _ = r.http_get("/readyz")
    assert status == 200
