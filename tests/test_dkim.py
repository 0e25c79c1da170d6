"""DKIM signing: messages from a configured sending domain arrive signed, and the signatures verify with an
independent verifier (dkimpy), reading the public keys through a DNS lookup function; a modified body fails.
RSA-SHA256 (2048-bit) and Ed25519-SHA256 (RFC 8463), each alone and both at once; bodies that exercise relaxed
body canonicalization (long lines, WSP runs, trailing blank and whitespace-only lines, empty, ~2 MB), sent with
DATA and with BDAT chunks that split the header block, a CRLF and a WSP run."""

from __future__ import annotations

import base64
import subprocess

import dkim
import pytest

from harness.outbound import FOREIGN, send, start_outbound, unique, wait_gone, wait_until
from harness.smtp import SmtpConn, make_message


def make_key(tmp_path, algorithm: str) -> tuple[str, str]:
    """(PKCS#8 PEM private key file, the p= value of its DKIM record)."""
    key = tmp_path / f"{algorithm}.pem"
    if algorithm == "rsa":
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        return str(key), base64.b64encode(der).decode()
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    der = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    # RFC 8463: the record holds the raw 32-byte key, the tail of the SubjectPublicKeyInfo.
    return str(key), base64.b64encode(der[-32:]).decode()


@pytest.fixture
def signed_relay(tmp_path, relays, dns, peers):
    rsa_key, rsa_p = make_key(tmp_path, "rsa")
    ed_key, ed_p = make_key(tmp_path, "ed25519")

    def domains(cfg):
        cfg["domains"] = [
            {"name": "example.test", "return_path": "bounces.example.test",
             "dkim": {"selector": "s1", "algorithm": "rsa-sha256", "key_file": rsa_key}},
            {"name": "other.test", "dkim": {"selector": "ed", "algorithm": "ed25519-sha256", "key_file": ed_key}},
            # both kinds at once (RFC 8463): two signatures
            {"name": "both.test", "dkim": [
                {"selector": "e2", "algorithm": "ed25519-sha256", "key_file": ed_key},
                {"selector": "r2", "algorithm": "rsa-sha256", "key_file": rsa_key},
            ]},
        ]

    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    relay = start_outbound(relays, dns, peers, config=domains)
    records = {
        b"s1._domainkey.example.test.": f"v=DKIM1; k=rsa; p={rsa_p}".encode(),
        b"ed._domainkey.other.test.": f"v=DKIM1; k=ed25519; p={ed_p}".encode(),
        b"r2._domainkey.both.test.": f"v=DKIM1; k=rsa; p={rsa_p}".encode(),
        b"e2._domainkey.both.test.": f"v=DKIM1; k=ed25519; p={ed_p}".encode(),
    }

    def dnsfunc(name, timeout=5):
        return records.get(name if name.endswith(b".") else name + b".")

    return relay, peer, dnsfunc


def fetch(relay, peer, sender, tag, body="hello\r\n") -> bytes:
    qid, marker, _ = send(relay, ["rcpt@foreign.test"], tag, sender=sender, body=body)
    wait_gone(relay, qid)
    got = wait_until(lambda: peer.with_marker(marker))
    assert len(got) == 1, got
    return got[0].data


@pytest.mark.parametrize("sender, selector, algo", [
    ("app@example.test", b"s1", b"rsa-sha256"),
    ("app@other.test", b"ed", b"ed25519-sha256"),
])
def test_signatures_verify_with_dkimpy_and_a_modified_body_fails(signed_relay, sender, selector, algo):
    relay, peer, dnsfunc = signed_relay
    data = fetch(relay, peer, sender, "dkim", body="line one\r\n.dotted line\r\nlast\r\n")
    assert data.count(b"DKIM-Signature:") == 1, data[:800]
    sig = data[data.index(b"DKIM-Signature:"):].split(b"\r\n\r\n")[0]
    assert b"s=" + selector in sig and b"a=" + algo in sig and b"c=relaxed/relaxed" in sig, sig
    # From is over-signed: listed once more than it occurs.
    h = sig.replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b"").split(b"h=")[1].split(b";")[0].lower()
    assert h.split(b":").count(b"from") == 2, h
    assert dkim.verify(data, dnsfunc=dnsfunc), "dkimpy rejected the signature"
    tampered = data.replace(b"last\r\n", b"LAST\r\n")
    assert tampered != data
    assert not dkim.verify(tampered, dnsfunc=dnsfunc), "a modified body still verified"


def test_a_domain_with_both_keys_gets_an_rsa_and_an_ed25519_signature_that_each_verify(signed_relay):
    relay, peer, dnsfunc = signed_relay
    data = fetch(relay, peer, "app@both.test", "dual", body="one\r\ntwo\r\n")
    assert data.count(b"DKIM-Signature:") == 2, data[:1500]
    d = dkim.DKIM(data)
    sigs = [data[i:].split(b"\r\n\r\n")[0] for i in range(len(data)) if data.startswith(b"DKIM-Signature:", i)]
    assert b"a=rsa-sha256" in sigs[0] and b"a=ed25519-sha256" in sigs[1], sigs
    for idx in (0, 1):
        assert d.verify(idx=idx, dnsfunc=dnsfunc), f"dkimpy rejected signature {idx}"
    tampered = dkim.DKIM(data.replace(b"two\r\n", b"TWO\r\n"))
    for idx in (0, 1):
        # DKIM.verify raises on a body hash mismatch where the module-level verify returns False
        with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
            tampered.verify(idx=idx, dnsfunc=dnsfunc)


def test_mail_from_a_domain_without_a_key_is_not_signed(signed_relay):
    relay, peer, _ = signed_relay
    data = fetch(relay, peer, "app@unsigned.test", "nodkim")
    assert b"DKIM-Signature:" not in data


def test_a_key_that_does_not_load_stops_the_relay_with_the_field_named(tmp_path, relays, dns, peers):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")

    def domains(cfg):
        cfg["domains"] = [{"name": "example.test", "dkim": {"selector": "s1", "key_file": str(bad)}}]

    cfg = relays.config("badkey")
    domains(cfg)
    r = relays.start("badkey", config=cfg, wait=False)
    assert r.proc.wait(timeout=20) != 0
    assert "domains[0].dkim.key_file" in r.log_text(), r.log_tail(20)


# The sending domains of `signed_relay` and how many signatures each gets.
SENDERS = [("app@example.test", 1), ("app@other.test", 1), ("app@both.test", 2)]

# Bodies where relaxed canonicalization changes something, or that are large; lines stay under aiosmtpd's
# 1001-octet line limit (the peer the relay delivers to).
BODIES = {
    "long lines": ("x" * 990 + "\r\n") * 3 + "y " * 495 + "\r\n",
    "trailing blank lines": "text\r\n\r\n\r\n\r\n",
    # RFC 6376 3.4.4: a whitespace-only line at the end is empty once its WSP has gone, and so ignored
    "trailing whitespace-only lines": "text\r\n \r\n\t \r\n",
    "empty": "",
    "WSP runs": "a  \t b\r\n\t indented\t \r\n\r\n   x   y\r\nend  \r\n",
    "2 MB": "".join(f"{n:08} {'z' * 60}  \tword \r\n" for n in range(2 * 1024 * 1024 // 80)),
}


def verify_all(data: bytes, dnsfunc, count: int, what: str) -> None:
    """dkimpy verifies each of the `count` signatures; an added body line breaks each."""
    assert data.count(b"DKIM-Signature:") == count, f"{what}: {data[:1500]!r}"
    d = dkim.DKIM(data)
    for idx in range(count):
        assert d.verify(idx=idx, dnsfunc=dnsfunc), f"{what}: dkimpy rejected signature {idx}"
    tampered = dkim.DKIM(data + b"added\r\n")
    for idx in range(count):
        with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
            tampered.verify(idx=idx, dnsfunc=dnsfunc)


@pytest.mark.parametrize("sender, count", SENDERS)
def test_bodies_that_canonicalization_changes_verify_with_dkimpy(signed_relay, sender, count):
    relay, peer, dnsfunc = signed_relay
    sent = {name: send(relay, ["rcpt@foreign.test"], "canon", sender=sender, body=body)
            for name, body in BODIES.items()}
    for name, (qid, marker, _) in sent.items():
        wait_gone(relay, qid)
        got = wait_until(lambda: peer.with_marker(marker))
        assert len(got) == 1, got
        verify_all(got[0].data, dnsfunc, count, f"{sender} {name}")


@pytest.mark.parametrize("sender, count", SENDERS)
def test_a_message_sent_in_bdat_chunks_that_split_a_crlf_and_the_header_block_verifies(signed_relay, sender,
                                                                                        count):
    relay, peer, dnsfunc = signed_relay
    marker = unique("bdat")
    msg = make_message(marker, sender=sender, to="rcpt@foreign.test",
                       body="first  line\r\n\r\nsecond\t\tline \r\n" * 20 + "last\r\n\r\n")
    body_at = msg.index(b"\r\n\r\n") + 4
    cuts = [
        msg.index(b"Subject:") + 4,  # inside the header block, mid-name
        msg.index(b"\r\n", msg.index(b"Subject:")) + 1,  # between the CR and LF of a header line
        body_at - 1,  # between the CR and LF of the blank line
        msg.index(b"\r\n", body_at + 30) + 1,  # between a body CR and its LF
        msg.index(b"\t\t", body_at) + 1,  # inside a WSP run
        msg.index(b"  line", body_at + 100) + 1,  # inside another
    ]
    assert len(set(cuts)) == len(cuts), cuts
    cuts.sort()
    chunks = [msg[a:b] for a, b in zip([0] + cuts, cuts + [len(msg)])]
    host, port = relay.listener("trusted")
    with SmtpConn(host, port) as c:
        c.greeting()
        assert "CHUNKING" in c.ehlo().keywords(), c.dump()
        c.expect(f"MAIL FROM:<{sender}>", "250 ")
        c.expect("RCPT TO:<rcpt@foreign.test>", "250 ")
        for ch in chunks[:-1]:
            c.send(b"BDAT %d\r\n" % len(ch) + ch)
            c.expect_reply("250 ", "BDAT chunk")
        c.send(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
        end = c.read_reply()
        assert end.queue_id, f"{end}\n{c.dump()}"
        c.cmd("QUIT")
    wait_gone(relay, end.queue_id)
    got = wait_until(lambda: peer.with_marker(marker))
    assert len(got) == 1, got
    assert got[0].data.endswith(msg), got[0].data[-300:]
    verify_all(got[0].data, dnsfunc, count, f"{sender} BDAT")
