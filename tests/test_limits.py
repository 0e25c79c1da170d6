"""Limits: message size, recipients per message, connections, and who may connect at all."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from harness.outbound import wait_until
from harness.relay import RelayPool, addr, free_port
from harness.smtp import ConnectionClosed, SmtpConn, make_message

MAX_SIZE = 10000
MAX_RCPTS = 5


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def limited(tmp_path_factory, relay_binary, certs, users):
    pool = RelayPool(tmp_path_factory.mktemp("limited"), certs, users)
    r = pool.start("limited", limits={"max_message_size": MAX_SIZE, "max_recipients": MAX_RCPTS})
    yield r
    pool.stop_all()


def session(relay, listener="trusted", source=None) -> SmtpConn:
    host, port = relay.listener(listener)
    c = SmtpConn(host, port, source=source)
    c.greeting()
    c.ehlo()
    return c


# ---------------------------------------------------------------------------------------------------------
# Size


def test_ehlo_advertises_the_configured_size(limited):
    with session(limited) as c:
        assert f"SIZE {MAX_SIZE}" in c.ehlo().keywords()


def test_mail_with_size_over_the_limit_gets_552_5_3_4(limited):
    with session(limited) as c:
        c.expect(f"MAIL FROM:<a@example.test> SIZE={MAX_SIZE + 1}", "552 5.3.4")
        c.expect(f"MAIL FROM:<a@example.test> SIZE={MAX_SIZE}", "250 2.1.0")


def test_mail_with_an_absurd_size_gets_552_5_3_4(limited):
    with session(limited) as c:
        c.expect("MAIL FROM:<a@example.test> SIZE=99999999999999999999", "552 5.3.4")  # 20 digits (RFC 1870 max), > u64


def test_data_over_max_message_size_gets_552_5_3_4_and_nothing_is_queued(limited):
    msg = make_message(unique("big"), body=("z" * 98 + "\r\n").encode() * (MAX_SIZE // 100 + 50))
    assert len(msg) > MAX_SIZE * 1.3
    before = set(limited.queue_by_id())
    with session(limited) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        r = c.data(msg)
        assert r.starts("552 5.3.4"), r
        c.expect("NOOP", "250 2.0.0")
        # and the session can still send a message that fits
        ok = c.transaction("a@example.test", ["x@foreign.test"], make_message(unique("small")))
        assert ok.queue_id, ok
    assert list(limited.new_messages(before)) == [ok.queue_id]


def test_data_under_a_lying_size_declaration_is_still_held_to_the_limit(limited):
    msg = make_message(unique("liar"), body=("z" * 98 + "\r\n").encode() * (MAX_SIZE // 100 + 50))
    before = set(limited.queue_by_id())
    with session(limited) as c:
        c.expect("MAIL FROM:<a@example.test> SIZE=100", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        assert c.data(msg).starts("552 5.3.4")
    assert limited.new_messages(before) == {}


def test_bdat_over_max_message_size_gets_552_5_3_4_and_nothing_is_queued(limited):
    chunk = (b"y" * 98 + b"\r\n") * 40
    before = set(limited.queue_by_id())
    with session(limited) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        replies = []
        for i in range(5):  # 5 x 4002 octets: the limit is crossed in the third chunk
            last = i == 4
            c.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
            r = c.read_reply()
            replies.append(r.last)
            if r.code != 250:
                break
        assert replies[-1].startswith("552 5.3.4"), replies
        assert not any("queued" in x for x in replies), replies
        c.expect("RSET", "250 2.0.0")
    assert limited.new_messages(before) == {}


# ---------------------------------------------------------------------------------------------------------
# Recipients


def test_recipient_beyond_max_recipients_gets_452_4_5_3_and_the_rest_are_kept(limited):
    before = set(limited.queue_by_id())
    rcpts = [f"r{i}@foreign.test" for i in range(MAX_RCPTS)]
    with session(limited) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        for r in rcpts:
            c.expect(f"RCPT TO:<{r}>", "250 2.1.5")
        c.expect("RCPT TO:<one-too-many@foreign.test>", "452 4.5.3")
        c.expect("RCPT TO:<two-too-many@foreign.test>", "452 4.5.3")
        end = c.data(make_message(unique("rcpts")))
        assert end.queue_id, end
    m = limited.new_messages(before)[end.queue_id]
    assert sorted(m["recipients"]) == sorted(rcpts), m


# ---------------------------------------------------------------------------------------------------------
# Connections


def connect_and_read_first_reply(host, port, source=None):
    c = SmtpConn(host, port, source=source)
    try:
        return c, c.read_reply()
    except BaseException:
        c.close()
        raise


def wait_for_greeting(host, port, source=None, attempts=50):
    """The server may take a moment to notice a closed connection: retry (bounded) until a 220 comes."""
    last = None
    for _ in range(attempts):
        c = None
        try:
            c, r = connect_and_read_first_reply(host, port, source)
            if r.code == 220:
                return c
            last = r
        except (ConnectionClosed, OSError) as e:
            last = e
        if c is not None:
            c.close()
        time.sleep(0.1)
    raise AssertionError(f"no 220 after {attempts} attempts; last reply {last}")


def test_connections_beyond_max_per_client_get_421_4_7_0_at_connect(relays):
    r = relays.start("perclient", limits={"max_connections_per_client": 2, "max_connections": 50})
    host, port = r.listener("trusted")
    held = [wait_for_greeting(host, port), wait_for_greeting(host, port)]
    try:
        extra, rep = connect_and_read_first_reply(host, port)
        with extra:
            assert rep.starts("421 4.7.0"), rep
            assert extra.closed_by_peer(10), "still open after 421"
        # another client address is not affected
        other = wait_for_greeting(host, port, source="127.0.0.2")
        other.close()
        # when one of ours goes away, there is room again
        held.pop().close()
        held.append(wait_for_greeting(host, port))
    finally:
        for c in held:
            c.close()


def test_connections_beyond_max_connections_get_421_4_7_0_at_connect(relays):
    r = relays.start("global", limits={"max_connections": 3, "max_connections_per_client": 100})
    host, port = r.listener("trusted")
    held = [
        wait_for_greeting(host, port, source="127.0.0.1"),
        wait_for_greeting(host, port, source="127.0.0.2"),
        wait_for_greeting(host, port, source="127.0.0.3"),
    ]
    try:
        extra, rep = connect_and_read_first_reply(host, port, source="127.0.0.4")
        with extra:
            assert rep.starts("421 4.7.0"), rep
            assert extra.closed_by_peer(10)
        held.pop(0).close()
        held.append(wait_for_greeting(host, port, source="127.0.0.4"))
    finally:
        for c in held:
            c.close()


# ---------------------------------------------------------------------------------------------------------
# allow_networks


def only_listener(name: str, host: str, allow: list[str]) -> list[dict]:
    return [{"name": name, "address": addr(host, free_port(host)), "auth": "none", "allow_networks": allow}]


def test_client_outside_allow_networks_gets_554_5_7_1_at_connect_and_is_closed(relays):
    r = relays.start("outside", listeners=only_listener("trusted", "127.0.0.1", ["10.9.9.0/24"]))
    host, port = r.listener("trusted")
    c, rep = connect_and_read_first_reply(host, port)
    with c:
        assert rep.starts("554 5.7.1"), rep
        assert c.closed_by_peer(10), "still open after 554"
    assert r.queue() == []


def test_allow_networks_is_matched_on_the_client_address(relays):
    r = relays.start("narrow", listeners=only_listener("trusted", "127.0.0.1", ["127.0.0.2/32"]))
    host, port = r.listener("trusted")
    c, rep = connect_and_read_first_reply(host, port, source="127.0.0.2")
    with c:
        assert rep.code == 220, rep
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
    c, rep = connect_and_read_first_reply(host, port, source="127.0.0.1")
    with c:
        assert rep.starts("554 5.7.1"), rep


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_loopback_client_is_matched_against_ipv6_networks(relays):
    listeners = (
        only_listener("v6ok", "::1", ["::1/128"])
        + only_listener("v6no", "::1", ["127.0.0.0/8"])
    )
    r = relays.start("v6", listeners=listeners)
    host, port = r.listener("v6ok")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        r1 = c.transaction("a@example.test", ["x@foreign.test"], make_message(unique("v6")))
        assert r1.queue_id, r1
    host, port = r.listener("v6no")
    c, rep = connect_and_read_first_reply(host, port)
    with c:
        assert rep.starts("554 5.7.1"), rep


# ---------------------------------------------------------------------------------------------------------
# Slow clients


def test_a_client_that_trickles_commands_is_closed_at_the_session_lifetime(relays):
    r = relays.start("lifetime", limits={"max_session_duration": "2s"})
    host, port = r.listener("trusted")
    c = SmtpConn(host, port)
    c.greeting()
    c.ehlo()
    # Each NOOP is well within command_timeout; only the lifetime can end this session.
    last = None
    for _ in range(100):  # at most ~20 s
        try:
            last = c.cmd("NOOP")
        except (ConnectionClosed, OSError):
            break
        if not last.starts("250"):
            break
        time.sleep(0.2)
    assert last is not None and last.starts("421 4.4.2"), last
    assert c.closed_by_peer()


def test_a_client_that_stops_reading_is_closed_after_the_command_timeout(relays):
    r = relays.start("nonreader", limits={"command_timeout": "2s"})
    host, port = r.listener("trusted")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # replies pile up in the relay's send buffer
    s.connect((host, port))
    s.settimeout(0.5)
    # Pipeline NOOPs and never read: the relay's replies cannot be written once both buffers are full.
    closed = False
    for _ in range(60):  # bounded: at most ~30 s of blocked sends
        try:
            s.sendall(b"NOOP\r\n" * 10000)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
    if not closed:
        # Drain what was written before the relay closed; then the end of the stream.
        s.settimeout(5)
        for _ in range(100000):
            try:
                if s.recv(65536) == b"":
                    closed = True
                    break
            except socket.timeout:
                break  # still open, and silent: not closed
            except OSError:
                closed = True
                break
    s.close()
    assert closed, "the relay kept a session whose client reads nothing"
    status, body = r.http_get("/metrics")
    assert b'herald_smtp_rejections_total{reason="timeout"} 1' in body, body.decode()[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Memory: the bodies all sessions hold at once are bounded by limits.max_inbound_bytes


def test_bodies_beyond_the_memory_budget_get_452_4_3_1_and_fit_once_it_is_free(relays):
    # A session holds at most about 320 KiB of a body in memory (more goes to the spool as it arrives), so
    # the bodies here stay below that: each is held whole until it ends.
    budget = 512 * 1024
    r = relays.start("budget", limits={"max_message_size": budget, "max_inbound_bytes": budget})
    line = b"y" * 998 + b"\r\n"
    half = line * 200  # 200 kB, reserved in 64 KiB steps: two fill the budget, a third does not fit
    holders = []
    try:
        # Two sessions each hold 200 kB of an unfinished body.
        for i in range(2):
            c = session(r)
            holders.append(c)
            c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
            c.expect(f"RCPT TO:<held{i}@foreign.test>", "250 2.1.5")
            c.expect("DATA", "354")
            c.send(make_message(unique("held"), body=half))
        # Wait until the relay has read them and holds them against the budget (a third body sent before
        # that could take the budget first and make a holder fail instead).
        assert wait_until(lambda: r.metric("herald_inbound_bytes") == budget, 10), r.metric("herald_inbound_bytes")
        refused = None
        for _ in range(50):
            with session(r) as c:
                c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
                c.expect("RCPT TO:<third@foreign.test>", "250 2.1.5")
                reply = c.data(make_message(unique("third"), body=half))
                if reply.starts("452 4.3.1"):
                    refused = reply
                    c.expect("NOOP", "250 2.0.0")  # the session goes on after the refusal
                    break
            time.sleep(0.1)
        assert refused, "a third body was never refused while two held the budget"
        assert "try again later" in refused.last, refused
        # The holders finish: their messages are accepted, and the budget is free again.
        for c in holders:
            c.send(b".\r\n")
            assert c.read_reply().starts("250 2.0.0")
    finally:
        for c in holders:
            c.close()
    with session(r) as c:
        ok = c.transaction("a@example.test", ["third@foreign.test"], make_message(unique("again"), body=half))
        assert ok.queue_id, ok
    status, body = r.http_get("/metrics")
    assert status == 200
    assert b'herald_smtp_rejections_total{reason="memory_budget"} ' in body
    assert b'herald_smtp_rejections_total{reason="memory_budget"} 0' not in body, body.decode()[-2000:]
