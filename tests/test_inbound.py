"""Receiving messages larger than a session keeps in memory.

A session holds up to 256 KiB of a message; beyond, it moves what it has to an unnamed spill file beside
the spool's segments and goes on, and the spool writer copies the spill into the message's record at the
end. What that must not change, through real SMTP clients over loopback:

- a message sent with DATA (dot-stuffed) or with BDAT chunks of odd sizes, split mid-CRLF, arrives byte for
  byte, after a kill -9 and a restart on the same spool too;
- a session that drops mid-message, or whose message is refused at its end, leaves no spill open and
  nothing queued;
- many sessions each sending a message far larger than the in-memory budget (`limits.max_inbound_bytes`)
  are all accepted: the budget bounds what is in memory, not how large a message may be.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from harness.outbound import (
    FOREIGN, SENDER, flush, get_message, start_outbound, submit, unique, wait_gone, wait_state, wait_until,
)
from harness.smtp import SmtpConn, make_message

MB = 1024 * 1024
# What the relay puts in front of a message (Received:) is shorter than this.
MAX_PREFIX = 8 * 1024


def body_of(size: int, seed: int) -> bytes:
    """About `size` bytes of lines of varied length, some starting with "." and some blank, CRLF-ended."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(10)
        if kind == 0:
            out += b"\r\n"
        elif kind == 1:
            out += b"." + os.urandom(rng.randrange(1, 40)).hex().encode() + b"\r\n"
        else:
            out += os.urandom(rng.randrange(1, 400)).hex().encode() + b"\r\n"
    return bytes(out)


def send_bdat(relay, rcpt: str, message: bytes, seed: int) -> str:
    """One transaction whose message goes in BDAT chunks of random sizes (so chunk ends fall mid-line and
    between CR and LF); returns the queue id."""
    rng = random.Random(seed)
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        assert "CHUNKING" in c.ehlo().keywords()
        c.expect(f"MAIL FROM:<{SENDER}>", "250 ")
        c.expect(f"RCPT TO:<{rcpt}>", "250 ")
        # The first chunk ends between a CR and its LF, past what a session keeps in memory; the others
        # end wherever chance puts them.
        first = message.index(b"\r\n", 300_000) + 1
        pos, cr_splits = 0, 0
        while True:
            n = first if pos == 0 else min(rng.randrange(1, 300_000), len(message) - pos)
            chunk = message[pos:pos + n]
            pos += n
            if chunk.endswith(b"\r") and pos < len(message):
                cr_splits += 1
            if pos == len(message):
                c.send(f"BDAT {n} LAST\r\n".encode() + chunk)
                end = c.read_reply()
                break
            c.send(f"BDAT {n}\r\n".encode() + chunk)
            assert c.read_reply().starts("250 2.0.0")
        assert cr_splits >= 1
        assert end.queue_id, f"not queued: {end}"
        return end.queue_id


def test_large_messages_by_data_and_bdat_arrive_byte_for_byte_after_a_kill_9(relays, dns, peers):
    dns.route("foreign.test", FOREIGN)
    # No MX listens yet: the messages wait in the queue through the kill and the restart.
    r = start_outbound(relays, dns, peers, limits={"max_message_size": 40 * MB},
                       delivery={"timeouts": {"connect": "2s"}})
    sent = []
    for k, size in enumerate([300 * 1024, 5 * MB, 17 * MB]):
        marker = unique(f"data{k}")
        msg = make_message(marker, body=body_of(size, k), sender=SENDER, to=f"d{k}@foreign.test")
        sent.append((submit(r, [f"d{k}@foreign.test"], msg), f"d{k}@foreign.test", marker, msg))
    for k, size in enumerate([600 * 1024, 9 * MB]):
        marker = unique(f"bdat{k}")
        msg = make_message(marker, body=body_of(size, 100 + k), sender=SENDER, to=f"b{k}@foreign.test")
        sent.append((send_bdat(r, f"b{k}@foreign.test", msg, seed=k), f"b{k}@foreign.test", marker, msg))
    for qid, rcpt, _, msg in sent:
        wait_state(r, qid, {rcpt: "deferred"}, timeout=60)
        stored = get_message(r, qid)["size"]
        assert 0 <= stored - len(msg) < MAX_PREFIX, f"{qid}: {stored} bytes stored for {len(msg)} sent"

    r.kill()
    r.start()
    peer = peers.aio(FOREIGN)
    flush(r)
    for qid, _, _, _ in sent:
        wait_gone(r, qid, timeout=180)
    for qid, rcpt, marker, msg in sent:
        [got] = peer.with_marker(marker)
        assert got.rcpt_tos == [rcpt]
        assert got.data.endswith(msg), (
            f"{qid}: {len(got.data)} bytes delivered for {len(msg)} sent; first difference at "
            f"{next((i for i, (a, b) in enumerate(zip(got.data[::-1], msg[::-1])) if a != b), None)} from the end")
        assert got.data[: len(got.data) - len(msg)].startswith(b"Received:")


def spills_open(pid: int, spool: Path) -> list[str]:
    """The relay's open files in the segment directory that are not segments: its spills."""
    seg = str((spool / "segments").resolve())
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(seg) and not target.endswith(".seg"):
            out.append(target)
    return out


def test_a_message_dropped_or_refused_midway_leaves_no_spill_and_nothing_queued(relays):
    r = relays.start("drop", limits={"max_message_size": 6 * MB})
    host, port = r.listener("trusted")
    line = b"z" * 998 + b"\r\n"

    # Dropped: 3 MB of DATA and the connection closes.
    c = SmtpConn(host, port)
    c.greeting()
    c.ehlo()
    c.expect("MAIL FROM:<a@example.test>", "250 ")
    c.expect("RCPT TO:<x@foreign.test>", "250 ")
    c.expect("DATA", "354")
    c.send(make_message(unique("dropped"), body=line * 3000))
    # The relay has the bytes once it holds a spill; then the client goes.
    wait_until(lambda: spills_open(r.pid, r.spool_dir), timeout=30)
    c.close()
    wait_until(lambda: not spills_open(r.pid, r.spool_dir), timeout=30)

    # Refused at its end: too large, after the spill began.
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 ")
        c.expect("RCPT TO:<x@foreign.test>", "250 ")
        reply = c.data(make_message(unique("toolarge"), body=line * 7000))
        assert reply.starts("552 5.3.4"), reply
        # A bare LF after 1 MB: refused at the end too.
        c.expect("MAIL FROM:<a@example.test>", "250 ")
        c.expect("RCPT TO:<x@foreign.test>", "250 ")
        reply = c.data(make_message(unique("barelf"), body=line * 1000 + b"bare\nlf\r\n"), stuff=True)
        assert reply.starts("554 5.6.0"), reply
        c.expect("NOOP", "250 ")
        assert not spills_open(r.pid, r.spool_dir), spills_open(r.pid, r.spool_dir)
    assert r.queue() == [], r.queue()


def test_sessions_together_far_beyond_the_memory_budget_are_all_accepted(relays, dns, peers):
    # 12 sessions x 4 MB at once against a 4 MiB budget: held whole, at most one would fit at a time.
    n, size = 12, 4 * MB
    dns.route("foreign.test", FOREIGN)
    peer = peers.aio(FOREIGN)
    r = start_outbound(relays, dns, peers, name="wide",
                       limits={"max_message_size": 8 * MB, "max_inbound_bytes": 4 * MB})
    line = b"w" * 998 + b"\r\n"
    results: dict[int, str] = {}
    barrier = threading.Barrier(n)

    def one(k: int) -> None:
        host, port = r.listener("trusted")
        with SmtpConn(host, port) as c:
            c.greeting()
            c.ehlo()
            c.expect(f"MAIL FROM:<{SENDER}>", "250 ")
            c.expect(f"RCPT TO:<w{k}@foreign.test>", "250 ")
            c.expect("DATA", "354")
            msg = make_message(f"wide-{k}-{unique('m')}", body=line * (size // len(line)))
            half = len(msg) // 2
            c.send(msg[:half])
            barrier.wait(timeout=60)  # every session is mid-message before any finishes
            c.send(msg[half:] + b".\r\n")
            results[k] = str(c.read_reply(timeout=60))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == n, f"only {len(results)} sessions finished"
    refused = {k: v for k, v in results.items() if not v.startswith("250")}
    assert not refused, f"refused: {refused}"
    wait_until(lambda: len(peer.accepted()) >= n, timeout=120)
    assert sorted(t.rcpt_tos[0] for t in peer.accepted()) == sorted(f"w{k}@foreign.test" for k in range(n))
