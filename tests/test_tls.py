"""STARTTLS and implicit TLS, verified against the test CA, with swaks and with smtplib."""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import uuid
from pathlib import Path

from cryptography import x509

from harness.certs import make_certs
from harness.outbound import wait_until
from harness.prometheus import scrape
from harness.relay import USERS, RelayPool
from harness.smtp import SmtpConn, make_message
from harness.tools import swaks, swaks_queue_id

APP_PW = USERS["app"]["password"]


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def assert_queued_by_swaks(relay, res, before, sender, rcpt):
    assert res.returncode == 0, res.stdout
    qid = swaks_queue_id(res)
    assert qid, f"no queued-as reply in swaks output:\n{res.stdout}"
    new = relay.new_messages(before)
    assert qid in new, (qid, list(new))
    assert new[qid]["sender"] == sender and new[qid]["recipients"] == [rcpt], new[qid]
    return qid


def test_swaks_starttls_verified_against_test_ca_delivers(relay, certs):
    host, port = relay.listener("trusted_tls")
    before = set(relay.queue_by_id())
    res = swaks(
        host, port, "--tls", "--tls-verify", "--tls-ca-path", str(certs["ca"]),
        "--from", "a@example.test", "--to", "x@foreign.test", "--h-Subject", unique("swaks-starttls"),
    )
    assert "TLS started" in res.stdout, res.stdout
    assert_queued_by_swaks(relay, res, before, "a@example.test", "x@foreign.test")


def test_swaks_starttls_and_auth_plain_on_submission_delivers(relay, certs):
    host, port = relay.listener("submission")
    before = set(relay.queue_by_id())
    res = swaks(
        host, port, "--tls", "--tls-verify", "--tls-ca-path", str(certs["ca"]),
        "--auth", "PLAIN", "--auth-user", "app", "--auth-password", APP_PW,
        "--from", "a@example.test", "--to", "x@foreign.test",
        "--h-From", "<a@example.test>", "--h-Subject", unique("swaks-submission"),
    )
    assert re.search(r"^<~\s+235 2\.7\.0", res.stdout, re.M), res.stdout
    assert_queued_by_swaks(relay, res, before, "a@example.test", "x@foreign.test")


def test_swaks_implicit_tls_and_auth_login_delivers(relay, certs):
    host, port = relay.listener("smtps")
    before = set(relay.queue_by_id())
    res = swaks(
        host, port, "--tlsc", "--tls-verify", "--tls-ca-path", str(certs["ca"]),
        "--auth", "LOGIN", "--auth-user", "app", "--auth-password", APP_PW,
        "--from", "a@example.test", "--to", "x@foreign.test",
        "--h-From", "<a@example.test>", "--h-Subject", unique("swaks-smtps"),
    )
    assert re.search(r"^<~\s+235 2\.7\.0", res.stdout, re.M), res.stdout
    assert_queued_by_swaks(relay, res, before, "a@example.test", "x@foreign.test")


def _smtplib_send(s: smtplib.SMTP, relay, subject: str) -> str:
    before = set(relay.queue_by_id())
    assert s.mail("a@example.test")[0] == 250
    assert s.rcpt("x@foreign.test")[0] == 250
    code, text = s.data(make_message(subject))
    assert code == 250, text
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Fa-f]{16})", text)
    assert m, text
    qid = m.group(1).decode()
    assert qid in relay.new_messages(before)
    return qid


def test_smtplib_starttls_verified_against_test_ca_then_login_delivers(relay, tls_ctx):
    host, port = relay.listener("submission")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("smtplib.example.test")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=tls_ctx)
        assert code == 220
        assert isinstance(s.sock, ssl.SSLSocket)
        s.ehlo("smtplib.example.test")
        assert not s.has_extn("starttls"), "STARTTLS still advertised inside TLS"
        code, _ = s.login("app", APP_PW)
        assert code == 235
        _smtplib_send(s, relay, unique("smtplib-starttls"))


def test_smtplib_smtp_ssl_implicit_tls_delivers(relay, tls_ctx):
    host, port = relay.listener("smtps")
    with smtplib.SMTP_SSL(host, port, timeout=30, context=tls_ctx) as s:
        s.ehlo("smtplib.example.test")
        assert not s.has_extn("starttls"), "STARTTLS advertised on an implicit-TLS listener"
        s.login("app", APP_PW)
        _smtplib_send(s, relay, unique("smtplib-smtps"))


def test_implicit_tls_listener_presents_a_certificate_the_test_ca_verifies_for_localhost(relay, tls_ctx):
    host, port = relay.listener("smtps")
    with SmtpConn(host, port, tls_context=tls_ctx, server_hostname="localhost") as c:
        cert = c.sock.getpeercert()
        assert cert, "no peer certificate"
        c.greeting()


def test_starttls_discards_plaintext_pipelined_behind_it(relay, tls_ctx):
    """Command injection (CVE-2011-0411 class): bytes sent in clear after STARTTLS must not run inside TLS."""
    host, port = relay.listener("trusted_tls")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.send(b"STARTTLS\r\nHELP\r\n")
        r = c.read_reply()
        assert r.starts("220"), r
        try:
            c.sock = tls_ctx.wrap_socket(c.sock, server_hostname="localhost")
        except (ssl.SSLError, OSError) as e:
            print(f"handshake refused after injected plaintext: {e!r}")
            return  # refusing the handshake is a safe outcome too
        c.buf = b""
        r = c.cmd("EHLO client.example.test")
        assert r.code == 250 and not r.starts("214"), f"plaintext HELP was executed inside TLS: {r}\n{c.dump()}"
        assert any(k.startswith("PIPELINING") for k in r.keywords()), r


def test_certificate_expiry_metric_follows_the_served_certificate_across_a_renewal(tmp_path, relay_binary, users):
    certs = make_certs(tmp_path / "tls", days=30)
    pool = RelayPool(tmp_path, certs, users)
    try:
        r = pool.start("expiry")
        metric = "herald_tls_certificate_expiry_timestamp_seconds"
        assert scrape(r).value(metric) == not_after(certs["cert"]), scrape(r).text

        # cert-manager renews the mounted Secret in place; the gauge must follow without a restart.
        renewed = make_certs(tmp_path / "renewed", days=90)
        for kind in ("key", "cert"):
            staged = certs[kind].with_suffix(".new")
            staged.write_bytes(renewed[kind].read_bytes())
            os.replace(staged, certs[kind])
        expected = not_after(renewed["cert"])
        assert expected > not_after(tmp_path / "tls" / "ca.pem") + 86400 * 50
        assert wait_until(lambda: scrape(r).value(metric) == expected, 20, 0.25), (scrape(r).value(metric), expected)
        # and the listener serves the renewed certificate
        ctx = ssl.create_default_context(cafile=str(renewed["ca"]))
        host, port = r.listener("smtps")
        with smtplib.SMTP_SSL(host, port, context=ctx, timeout=10) as s:
            s.noop()
    finally:
        pool.stop_all()


def not_after(pem: Path) -> float:
    return x509.load_pem_x509_certificate(pem.read_bytes()).not_valid_after_utc.timestamp()
