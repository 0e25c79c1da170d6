"""ESMTP on the wire: PIPELINING, CHUNKING (BDAT), line length, error limits, idle timeouts."""

from __future__ import annotations

import uuid

import pytest

from harness.smtp import SmtpConn, dot_stuff, make_message

MAX_LINE = 2048  # default limits.max_line_length, octets including CRLF


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def conn(relay, listener="trusted") -> SmtpConn:
    host, port = relay.listener(listener)
    c = SmtpConn(host, port)
    c.greeting()
    c.ehlo()
    return c


def read_n(c: SmtpConn, n: int):
    return [c.read_reply() for _ in range(n)]


def codes(replies) -> list[str]:
    return [r.last for r in replies]


# ---------------------------------------------------------------------------------------------------------
# PIPELINING


def test_pipelined_envelope_gets_its_replies_in_order(relay):
    msg = make_message(unique("pipe"))
    before = set(relay.queue_by_id())
    with conn(relay) as c:
        c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<x@foreign.test>\r\nRCPT TO:<y@foreign.test>\r\nDATA\r\n")
        rs = read_n(c, 4)
        assert rs[0].starts("250 2.1.0") and rs[1].starts("250 2.1.5") and rs[2].starts("250 2.1.5"), codes(rs)
        assert rs[3].code == 354, codes(rs)
        c.send(dot_stuff(msg) + b".\r\nQUIT\r\n")
        end, quit_ = read_n(c, 2)
        assert end.queue_id, end
        assert quit_.starts("221 2.0.0"), quit_
    new = relay.new_messages(before)
    assert sorted(new[end.queue_id]["recipients"]) == ["x@foreign.test", "y@foreign.test"]


def test_pipelined_refused_recipient_is_answered_in_its_place_and_left_out(relay):
    """On the inbound listener only return_path domains are accepted; replies keep the order of commands."""
    before = set(relay.queue_by_id())
    with conn(relay, "inbound") as c:
        c.send(
            b"MAIL FROM:<>\r\n"
            b"RCPT TO:<postmaster@bounces.example.test>\r\n"
            b"RCPT TO:<victim@foreign.test>\r\n"
            b"RCPT TO:<abuse@bounces.example.test>\r\n"
            b"DATA\r\n"
        )
        rs = read_n(c, 5)
        assert rs[0].starts("250 2.1.0"), codes(rs)
        assert rs[1].starts("250 2.1.5"), codes(rs)
        assert rs[2].starts("554 5.7.1"), codes(rs)
        assert rs[3].starts("250 2.1.5"), codes(rs)
        assert rs[4].code == 354, codes(rs)
        c.send(dot_stuff(make_message(unique("pipe-mixed"), sender="mailer-daemon@foreign.test")) + b".\r\n")
        end = c.read_reply()
        assert end.code == 250, end
    # mail to a return-path domain is read as a report at acceptance; the refused recipient got nothing
    assert relay.new_messages(before) == {}


def test_whole_bdat_transactions_can_be_pipelined_in_one_write(relay):
    m1 = make_message(unique("pipe-bdat1"))
    m2 = make_message(unique("pipe-bdat2"))
    before = set(relay.queue_by_id())
    with conn(relay) as c:
        c.send(
            b"MAIL FROM:<a@example.test>\r\nRCPT TO:<p1@foreign.test>\r\nBDAT %d LAST\r\n" % len(m1) + m1
            + b"RSET\r\n"
            + b"MAIL FROM:<b@example.test>\r\nRCPT TO:<p2@foreign.test>\r\nBDAT %d LAST\r\n" % len(m2) + m2
            + b"QUIT\r\n"
        )
        rs = read_n(c, 8)
    expected = ["250 2.1.0", "250 2.1.5", "250 2.0.0 Ok: queued as", "250 2.0.0",
                "250 2.1.0", "250 2.1.5", "250 2.0.0 Ok: queued as", "221 2.0.0"]
    assert all(r.starts(e) for r, e in zip(rs, expected)), codes(rs)
    new = relay.new_messages(before)
    assert new[rs[2].queue_id]["recipients"] == ["p1@foreign.test"]
    assert new[rs[6].queue_id]["recipients"] == ["p2@foreign.test"]


# ---------------------------------------------------------------------------------------------------------
# CHUNKING


def test_bdat_chunks_then_last_are_queued_as_one_message(relay):
    msg = make_message(unique("bdat"), body=("chunked body line\r\n" * 40).encode())
    # the first cut splits a CRLF: CR ends chunk 1, LF starts chunk 2, which is not a bare CR or LF
    cut1, cut2 = msg.index(b"\r\n") + 1, 400
    chunks = [msg[:cut1], msg[cut1:cut2], msg[cut2:]]
    before = set(relay.queue_by_id())
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        for ch in chunks[:-1]:
            c.send(b"BDAT %d\r\n" % len(ch) + ch)
            c.expect_reply("250 2.0.0", "BDAT chunk")
        c.send(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
        r = c.read_reply()
        assert r.queue_id, r
    m = relay.new_messages(before)[r.queue_id]
    assert m["size"] >= len(msg), (m, len(msg))
    assert m["sender"] == "a@example.test" and m["recipients"] == ["x@foreign.test"]


def test_bdat_zero_last_ends_the_message(relay):
    msg = make_message(unique("bdat0"))
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.send(b"BDAT %d\r\n" % len(msg) + msg)
        c.expect_reply("250 2.0.0", "BDAT chunk")
        r = c.cmd("BDAT 0 LAST")
        assert r.queue_id, r
    assert r.queue_id in relay.queue_by_id()


def test_bdat_content_is_not_dot_unstuffed(relay):
    """BDAT is binary-safe: '..x' stays '..x' and '.\\r\\n' lines do not end anything."""
    marker = unique("bdatdots")
    head_a = make_message(marker + "-A", body=b"")
    head_b = make_message(marker + "-B", body=b"")
    dotted = b"".join(b"..line %03d\r\n" % i for i in range(100)) + b".\r\n"
    plain = b"".join(b"XXline %03d\r\n" % i for i in range(100)) + b"X\r\n"
    ids = []
    with conn(relay) as c:
        for m in (head_a + dotted, head_b + plain):
            c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
            c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
            c.send(b"BDAT %d LAST\r\n" % len(m) + m)
            r = c.read_reply()
            assert r.queue_id, r
            ids.append(r.queue_id)
        c.expect("NOOP", "250 2.0.0")
    q = relay.queue_by_id()
    assert abs(q[ids[0]]["size"] - q[ids[1]]["size"]) <= 2, (q[ids[0]], q[ids[1]])


def test_bdat_without_mail_is_a_sequence_error_and_its_chunk_is_not_run_as_commands(relay):
    with conn(relay) as c:
        c.send(b"BDAT 6\r\nHELP\r\n")
        c.expect_reply("503 5.5.1", "BDAT before MAIL")
        c.expect("NOOP", "250 2.0.0")  # a 214 here would mean the chunk was read as a command


def test_bdat_without_rcpt_is_a_sequence_error(relay):
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.send(b"BDAT 6 LAST\r\nHELP\r\n")
        c.expect_reply("503 5.5.1", "BDAT before RCPT")
        c.expect("NOOP", "250 2.0.0")


def test_data_after_a_bdat_chunk_is_a_sequence_error(relay):
    before = set(relay.queue_by_id())
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.send(b"BDAT 5\r\nhello")
        c.expect_reply("250 2.0.0", "BDAT chunk")
        c.expect("DATA", "503 5.5.1")
    assert relay.new_messages(before) == {}


def test_bdat_after_last_without_a_new_transaction_is_a_sequence_error(relay):
    msg = make_message(unique("bdat-after-last"))
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.send(b"BDAT %d LAST\r\n" % len(msg) + msg)
        assert c.read_reply().queue_id
        c.send(b"BDAT 6 LAST\r\nHELP\r\n")
        c.expect_reply("503 5.5.1", "BDAT after LAST")
        c.expect("NOOP", "250 2.0.0")


@pytest.mark.parametrize("arg", ["BDAT", "BDAT abc", "BDAT -5"])
def test_bdat_with_a_bad_argument_is_a_syntax_error(relay, arg):
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.expect(arg, "501 5.5.4")


# ---------------------------------------------------------------------------------------------------------
# Line length


def test_command_line_over_max_line_length_gets_500_5_5_2(relay):
    with conn(relay) as c:
        c.expect("NOOP " + "x" * (MAX_LINE + 500), "500 5.5.2")


def test_mail_from_over_max_line_length_gets_500_5_5_2(relay):
    with conn(relay) as c:
        c.expect("MAIL FROM:<" + "a" * (MAX_LINE + 100) + "@example.test>", "500 5.5.2")


def test_command_line_of_exactly_max_line_length_is_not_too_long(relay):
    line = "NOOP " + "x" * (MAX_LINE - len("NOOP ") - 2)
    assert len(line) + 2 == MAX_LINE
    with conn(relay) as c:
        r = c.cmd(line)
        assert not r.starts("500 5.5.2"), r


def test_message_line_over_max_line_length_rejects_the_message_with_554_5_6_0(relay):
    marker = unique("longline")
    body = b"short\r\n" + b"y" * (MAX_LINE - 1) + b"\r\n" + b"short again\r\n"  # MAX_LINE + 1 octets with CRLF
    before = set(relay.queue_by_id())
    with conn(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        r = c.data(make_message(marker, body=body))
        assert r.starts("554 5.6.0"), r
        c.expect("NOOP", "250 2.0.0")
    assert relay.new_messages(before) == {}


def test_message_line_of_exactly_max_line_length_is_accepted(relay):
    body = b"y" * (MAX_LINE - 2) + b"\r\n"
    with conn(relay) as c:
        r = c.transaction("a@example.test", ["x@foreign.test"], make_message(unique("maxline"), body=body))
        assert r.queue_id, r


# ---------------------------------------------------------------------------------------------------------
# Error limit, timeouts


def test_too_many_bad_commands_get_421_4_7_0_and_the_server_closes(relays):
    max_errors = 4
    r = relays.start("errors", limits={"max_errors": max_errors})
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        replies = []
        for i in range(max_errors + 2):
            try:
                rep = c.cmd(f"BOGUS{i}")
            except (AssertionError, OSError):
                break  # closed
            replies.append(rep)
            if rep.code == 421:
                break
        got = codes(replies)
        assert replies and replies[-1].starts("421 4.7.0"), got
        assert all(x.starts("500 5.5.2") for x in replies[:-1]), got
        # the max_errors-th bad command is the last one tolerated or the one that draws the 421
        assert len(replies) - 1 in (max_errors - 1, max_errors), got
        assert c.closed_by_peer(10), "connection still open after 421"
    with SmtpConn(host, port) as c:  # the relay itself carries on
        c.greeting()
        c.expect("NOOP", "250 2.0.0")


def test_good_commands_in_between_do_not_reset_the_error_count_to_let_a_client_go_on_forever(relays):
    """max_errors counts bad commands per session; interleaving NOOPs must not make the limit unreachable."""
    max_errors = 3
    r = relays.start("errors2", limits={"max_errors": max_errors})
    host, port = r.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        got = []
        bad_answered = 0
        for i in range(max_errors + 2):
            for cmd in (f"BOGUS{i}", "NOOP"):
                rep = c.cmd(cmd)
                got.append(f"{cmd} -> {rep.last}")
                if rep.code == 421:
                    break
                if cmd.startswith("BOGUS"):
                    bad_answered += 1
            if rep.code == 421:
                break
        assert rep.starts("421 4.7.0"), got
        assert bad_answered <= max_errors, got
        assert c.closed_by_peer(10)


def test_idle_session_gets_421_4_4_2_after_command_timeout(relays):
    r = relays.start("idle", limits={"command_timeout": "1s"})
    host, port = r.listener("trusted")
    with SmtpConn(host, port, timeout=30) as c:
        c.greeting()
        c.ehlo()
        c.expect_reply("421 4.4.2", "waiting idle", timeout=30)
        assert c.closed_by_peer(10)


def test_stalled_data_gets_421_4_4_2_after_data_timeout_and_nothing_is_queued(relays):
    r = relays.start("dataidle", limits={"data_timeout": "1s", "command_timeout": "60s"})
    host, port = r.listener("trusted")
    with SmtpConn(host, port, timeout=30) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.expect("DATA", "354")
        c.send(b"Subject: stalled\r\n\r\npartial body")
        c.expect_reply("421 4.4.2", "stalled DATA", timeout=30)
        assert c.closed_by_peer(10)
    assert r.queue() == []


def test_helo_is_accepted_and_ehlo_without_a_domain_is_a_syntax_error(relay):
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.expect("EHLO", "501 5.5.4")
        c.expect("HELO client.example.test", "250")
