"""SMTP smuggling: only CRLF.CRLF ends DATA; bare CR or LF anywhere rejects the whole message (554 5.6.0).

Each attempt hides a second transaction behind a look-alike end-of-data sequence. A relay that takes the
look-alike for the end would answer the smuggled commands (extra replies) and queue the smuggled message.
"""

from __future__ import annotations

import uuid

import pytest

from harness.smtp import SmtpConn, make_message

SEPARATORS = {
    "LF.LF": b"\n.\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CR": b"\r.\r",
    "LF.CR": b"\n.\r",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
}


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def session(relay, listener="trusted") -> SmtpConn:
    host, port = relay.listener(listener)
    c = SmtpConn(host, port)
    c.greeting()
    c.ehlo()
    return c


def smuggled_transaction(marker: str) -> bytes:
    return (
        b"MAIL FROM:<evil@example.test>\r\n"
        b"RCPT TO:<victim@foreign.test>\r\n"
        b"DATA\r\n"
        b"From: <ceo@example.test>\r\n"
        b"To: <victim@foreign.test>\r\n"
        b"Subject: smuggled-" + marker.encode() + b"\r\n"
        b"\r\n"
        b"smuggled body\r\n"
    )


def assert_nothing_from(relay, before: set[str], what: str) -> None:
    new = relay.new_messages(before)
    smuggled = [m for m in new.values() if m["sender"] == "evil@example.test" or "victim@foreign.test" in m["recipients"]]
    assert not smuggled, f"{what}: smuggled message queued: {smuggled}"
    assert new == {}, f"{what}: messages queued: {new}"


@pytest.mark.parametrize("sep", list(SEPARATORS.values()), ids=list(SEPARATORS))
@pytest.mark.parametrize("listener", ["trusted", "inbound"])
def test_smuggling_behind_a_fake_end_of_data_is_rejected_whole_with_554_5_6_0(relay, sep, listener):
    marker = unique("smuggle")
    # on the inbound listener: a return-path feedback address (read as a report at acceptance, not queued)
    rcpt = "x@foreign.test" if listener == "trusted" else "fbl@bounces.example.test"
    head = make_message(marker, to=rcpt, body=b"hello")
    before = set(relay.queue_by_id())
    with session(relay, listener) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect(f"RCPT TO:<{rcpt}>", "250 2.1.5")
        c.expect("DATA", "354")
        # the real end is the CRLF.CRLF after the smuggled message; NOOP comes after it
        c.send(head + sep + smuggled_transaction(marker) + b".\r\nNOOP\r\n")
        first = c.read_reply()
        assert first.starts("554 5.6.0"), (
            f"separator {sep!r}: expected the whole message rejected with 554 5.6.0, got {first}\n{c.dump()}"
        )
        second = c.read_reply()
        assert second.starts("250 2.0.0"), (
            f"separator {sep!r}: the reply after the 554 should be NOOP's 250 2.0.0, got {second} "
            f"(smuggled commands were executed)\n{c.dump()}"
        )
        # the session stays usable
        ok = c.transaction("a@example.test", [rcpt], make_message(unique("after-smuggle"), to=rcpt))
        assert ok.starts("250 2.0.0"), ok
        if ok.queue_id:
            before.add(ok.queue_id)
    assert_nothing_from(relay, before, f"separator {sep!r}")


@pytest.mark.parametrize(
    "body",
    [
        b"line one\nline two\r\n",  # bare LF in the body
        b"line one\rline two\r\n",  # bare CR in the body
        b"ends with a bare CR\r",  # bare CR right before the real end (the CRLF.CRLF follows)
    ],
    ids=["bare-LF", "bare-CR", "bare-CR-at-end"],
)
def test_bare_cr_or_lf_in_the_body_rejects_the_message_with_554_5_6_0(relay, body):
    marker = unique("bare")
    before = set(relay.queue_by_id())
    with session(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.expect("DATA", "354")
        c.send(make_message(marker, body=b"") + body + b"\r\n.\r\n")
        c.expect_reply("554 5.6.0", f"body {body!r}")
        c.expect("NOOP", "250 2.0.0")
    assert_nothing_from(relay, before, f"body {body!r}")


@pytest.mark.parametrize("header", [b"Subject: a\nBcc: victim@foreign.test", b"Subject: a\rBcc: victim@foreign.test"],
                         ids=["LF", "CR"])
def test_bare_cr_or_lf_in_a_header_rejects_the_message_with_554_5_6_0(relay, header):
    before = set(relay.queue_by_id())
    with session(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.expect("DATA", "354")
        c.send(b"From: <a@example.test>\r\n" + header + b"\r\n\r\nbody\r\n.\r\n")
        c.expect_reply("554 5.6.0", f"header {header!r}")
        c.expect("NOOP", "250 2.0.0")
    assert_nothing_from(relay, before, f"header {header!r}")


@pytest.mark.parametrize("sep", [b"\n.\n", b"\r\n.\n", b"\r.\r\n"], ids=["LF.LF", "CRLF.LF", "CR.CRLF"])
def test_bdat_content_with_bare_line_endings_is_rejected_at_last_with_554_5_6_0(relay, sep):
    marker = unique("bdat-smuggle")
    content = make_message(marker, body=b"hello") + sep + smuggled_transaction(marker) + b".\r\n"
    before = set(relay.queue_by_id())
    with session(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.send(b"BDAT %d LAST\r\n" % len(content) + content + b"NOOP\r\n")
        c.expect_reply("554 5.6.0", f"BDAT content with {sep!r}")
        c.expect_reply("250 2.0.0", "NOOP after rejected BDAT")
    assert_nothing_from(relay, before, f"BDAT {sep!r}")


def test_bdat_message_ending_in_a_bare_cr_split_across_chunks_is_rejected(relay):
    """A CR at the end of one chunk followed by a non-LF at the start of the next is a bare CR."""
    marker = unique("bdat-cr")
    part1 = make_message(marker, body=b"line\r")
    part2 = b"next line\r\n"
    before = set(relay.queue_by_id())
    with session(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        c.send(b"BDAT %d\r\n" % len(part1) + part1)
        c.expect_reply("250 2.0.0", "first chunk")
        c.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
        c.expect_reply("554 5.6.0", "bare CR across chunks")
    assert_nothing_from(relay, before, "bare CR across BDAT chunks")


def test_only_crlf_dot_crlf_ends_data_and_a_stuffed_dot_line_is_content(relay):
    """A body line '.' sent stuffed as '..' and look-alikes inside lines do not end the message."""
    marker = unique("realend")
    body = b"before\r\n..\r\nafter . dot\r\n.. leading dots\r\n"
    before = set(relay.queue_by_id())
    with session(relay) as c:
        c.expect("MAIL FROM:<a@example.test>", "250 2.1.0")
        c.expect("RCPT TO:<x@foreign.test>", "250 2.1.5")
        r = c.data(make_message(marker, body=body), stuff=False)
        assert r.queue_id, r
        c.expect("NOOP", "250 2.0.0")
    assert list(relay.new_messages(before)) == [r.queue_id]
