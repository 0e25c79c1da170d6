"""Delivery's memory ceiling: messages are streamed from the spool, and connections have a global cap.

- A large message goes out byte for byte (the relay reads the spool in 128 KiB pieces and dot-stuffs each
  as it goes; lines that start with "." sit at every piece boundary), and several such deliveries at once
  raise the relay's peak resident memory by far less than one message: the whole message is never held.
- With `delivery.max_connections: 2`, mail to five destinations whose MX is slow never has more than two
  connections open at the MX, and all of it is delivered.

Peak memory is VmHWM from /proc/<pid>/status, reset (`echo 5 > /proc/<pid>/clear_refs`) once the messages
are spooled and deferred, so that what receiving them cost does not hide what delivering them costs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.outbound import (
    FOREIGN, SENDER, flush, get_message, send, start_outbound, submit, unique, wait_gone, wait_state, wait_until,
)
from harness.prometheus import scrape
from harness.smtp import make_message

MB = 1024 * 1024
# The relay's spool read size (spool::READ_CHUNK): the test puts "." lines around each multiple of it.
PIECE = 128 * 1024
# What the relay adds in front of a submitted message (Received:, perhaps DKIM-Signature:) is assumed to be
# shorter than this; the test checks it.
MAX_PREFIX = 8 * 1024


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status that matter here, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Resets the process's VmHWM to its current RSS (Linux 4.0+); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def big_body(size: int, head: int) -> bytes:
    """About `size` bytes of ordinary 78-byte lines (every 50th starting with "."), except that from
    MAX_PREFIX before to 1 KiB after each multiple of PIECE (counted in the whole message, `head` bytes of
    header before the body) every line is ".": whatever the relay puts in front, each piece it reads then
    starts at, inside or right after such a line, in all three positions across the piece sizes' residues."""
    out = bytearray()
    i = 0
    while len(out) < size:
        pos = head + len(out)
        boundary = -(-pos // PIECE) * PIECE
        if boundary - pos <= MAX_PREFIX or pos % PIECE < 1024:
            out += b".\r\n"
        else:
            i += 1
            lead = b"." if i % 50 == 0 else b""
            out += lead + f"{i:08d} ".encode() + b"x" * (67 - len(lead)) + b"\r\n"
    return bytes(out)


def test_large_messages_go_out_byte_for_byte_without_being_held_whole(relays, dns, peers):
    dns.route("foreign.test", FOREIGN)
    # Nothing listens at the MX yet: each message is deferred with nothing read, until the flush below.
    r = start_outbound(relays, dns, peers, limits={"max_message_size": 40 * MB, "data_timeout": "5m"},
                       delivery={"timeouts": {"connect": "3s", "command": "2m", "data": "2m"}})
    pid = r.pid
    n, size = 4, 20 * MB
    sent = []
    for k in range(n):
        marker = unique(f"big{k}")
        headers = make_message(marker, body=b"", sender=SENDER, to=f"bob{k}@foreign.test")
        msg = headers + big_body(size, len(headers))
        qid = submit(r, [f"bob{k}@foreign.test"], msg)
        sent.append((qid, marker, msg))
    for k, (qid, _, msg) in enumerate(sent):
        wait_state(r, qid, {f"bob{k}@foreign.test": "deferred"}, timeout=60)
        stored = get_message(r, qid)["size"]
        assert 0 <= stored - len(msg) < MAX_PREFIX, f"the relay put {stored - len(msg)} bytes in front of {qid}"

    if not reset_peak(pid):
        pytest.skip(f"/proc/{pid}/clear_refs is not writable here: the delivery peak cannot be told apart")
    before = proc_status(pid)
    peer = peers.aio(FOREIGN)
    flush(r)
    for qid, _, _ in sent:
        wait_gone(r, qid, timeout=300)
    after = proc_status(pid)
    rise = after["VmHWM"] - before["VmRSS"]
    print(f"\nrelay pid {pid}: RSS before the flush {before['VmRSS'] / MB:.1f} MiB; peak during {n} concurrent "
          f"deliveries of {size / MB:.0f} MiB: {after['VmHWM'] / MB:.1f} MiB (+{rise / MB:.1f} MiB); "
          f"peer connections open at once: {peer.max_concurrent}")

    for k, (qid, marker, msg) in enumerate(sent):
        [t] = peer.with_marker(marker)
        assert t.rcpt_tos == [f"bob{k}@foreign.test"]
        # Behind the relay's own header fields, the message exactly as submitted: no line lost or doubled.
        assert t.data.endswith(msg), (
            f"{qid}: {len(t.data)} bytes received for {len(msg)} submitted; first difference at "
            f"{next((i for i, (a, b) in enumerate(zip(t.data[::-1], msg[::-1])) if a != b), None)} from the end")
        assert t.data[: len(t.data) - len(msg)].startswith(b"Received:") or b"\r\nReceived:" in t.data[:MAX_PREFIX]
    assert peer.max_concurrent >= 2, "the deliveries did not overlap; the peak says nothing about concurrency"
    # Held whole (the message and a stuffed copy) that would be about 2 x 20 MiB per delivery at once.
    assert rise < 60 * MB, f"peak resident memory rose by {rise / MB:.1f} MiB during the deliveries"


def test_a_global_connection_cap_holds_concurrent_deliveries_and_delivers_everything(relays, dns, peers):
    domains = [f"d{i}.test" for i in range(1, 6)]
    for d in domains:
        dns.route(d, FOREIGN)
    # A slow MX: each transaction takes a second, so connections overlap unless something holds them back.
    peer = peers.aio(FOREIGN, data_delay=1.0)
    r = start_outbound(relays, dns, peers, delivery={"max_connections": 2})
    sent = []
    for k in range(2):
        rcpts = [f"u{k}@{d}" for d in domains]
        qid, marker, _ = send(r, rcpts, f"capped{k}")
        sent.append((qid, marker, rcpts))
    seen = []

    def all_gone():
        seen.append(scrape(r).get("herald_delivery_connections"))
        return all(get_message(r, qid) is None for qid, _, _ in sent)

    assert wait_until(all_gone, timeout=90, step=0.2), f"not delivered: {[get_message(r, q) for q, _, _ in sent]}"
    for qid, marker, rcpts in sent:
        for rcpt in rcpts:
            got = [t for t in peer.delivered_to(rcpt) if marker.encode() in t.data]
            assert len(got) == 1, f"{rcpt} of {qid}: {len(got)} deliveries"
    assert peer.max_concurrent == 2, f"the MX saw {peer.max_concurrent} connections at once; the cap is 2"
    assert max(v for v in seen if v is not None) <= 2, seen
    # Every connection closed: the gauge (refreshed every 2 s) comes back to 0.
    assert wait_until(lambda: scrape(r).get("herald_delivery_connections") == 0, timeout=10, step=0.5)
