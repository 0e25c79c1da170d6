"""DKIM signing: messages from a configured sending domain arrive signed, and the signatures verify with an
independent verifier (dkimpy), reading the public keys through a DNS lookup function; a modified body fails.
RSA-SHA256 (2048-bit) and Ed25519-SHA256 (RFC 8463), each alone and both at once."""

from __future__ import annotations

import base64
import subprocess

import dkim
import pytest

from harness.outbound import FOREIGN, send, start_outbound, wait_gone, wait_until


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
