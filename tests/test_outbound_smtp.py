"""The relay's SMTP client: STARTTLS policy, smarthost with AUTH (only once its certificate verified: an
unknown CA or another name defers the attempt, with no AUTH sent), the extensions it must respect (SIZE,
8BITMIME, SMTPUTF8, PIPELINING), connection reuse and the per-domain connection limit, source addresses and
EHLO names from ip_pools."""

from __future__ import annotations

import collections
import signal

import pytest

from harness.certs import issue
from harness.outbound import (
    FOREIGN, SENDER, delivery_events, flush, log_records, parse_dsn, send, start_outbound, states, status_field, submit,
    unique, wait_dsn, wait_event, wait_gone, wait_state, wait_until,
)
from harness.relay import HOSTNAME
from harness.tools import smtp_source

SOURCE = "127.0.0.9"  # the ip_pool source address in the ip_pool test


def only_status(t) -> str:
    d = parse_dsn(t.data)
    assert len(d.per_recipient) == 1, [str(b) for b in d.per_recipient]
    return status_field(d.per_recipient[0])


# ---------------------------------------------------------------------------------------------------------
# TLS


def test_starttls_offered_by_the_mx_is_used(relays, dns, peers):
    peer = peers.aio(FOREIGN, starttls=True)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)  # tls: opportunistic; the peer's certificate is not trusted: no matter
    qid, marker, _ = send(r, ["bob@foreign.test"], "starttls")
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)
    assert t.tls and t.tls.startswith("TLS"), t.tls
    ev = wait_event(r, qid, "delivered")
    assert str(ev["tls"]).lower() not in ("", "none") and "tls" in str(ev["tls"]).lower(), ev


def test_tls_none_does_not_use_starttls_even_when_offered(relays, dns, peers):
    peer = peers.aio(FOREIGN, starttls=True)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, delivery={"tls": "none"})
    qid, marker, _ = send(r, ["bob@foreign.test"], "tlsnone")
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)
    assert t.tls is None and "STARTTLS" not in peer.verbs(), peer.verbs()


def test_tls_required_defers_with_4_7_when_the_mx_offers_no_starttls(relays, dns, peers):
    peer = peers.aio(FOREIGN)  # no STARTTLS
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, delivery={"tls": "required"})
    qid, marker, _ = send(r, ["bob@foreign.test"], "tlsreq")
    s = wait_state(r, qid, {"bob@foreign.test": "deferred"})
    reply = str(s["bob@foreign.test"].get("last_reply") or "") + " ".join(str(e.get("reply")) for e in delivery_events(r, qid))
    assert "4.7." in reply, (s, delivery_events(r, qid))
    assert "MAIL" not in peer.verbs() and not peer.transactions, peer.verbs()


def test_tls_required_delivers_over_starttls_without_verifying_the_certificate(relays, dns, peers):
    peer = peers.aio(FOREIGN, starttls=True)  # certificate for localhost from a CA the relay does not know
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers, delivery={"tls": "required"})
    qid, marker, _ = send(r, ["bob@foreign.test"], "tlsreqok")
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)
    assert t.tls and t.tls.startswith("TLS"), t.tls


# ---------------------------------------------------------------------------------------------------------
# Smarthost


SMARTHOST = "smarthost.test"  # the smarthost's name: in the test DNS (-> FOREIGN) and in its certificate


def smarthost_peer(peers, tls: dict, mode: str):
    """An aiosmtpd smarthost on FOREIGN serving `tls` (a certificate and key), wanting AUTH as relayuser."""
    return peers.aio(FOREIGN, "smarthost", certs=tls, starttls=(mode == "starttls"), implicit_tls=(mode == "implicit"),
                     auth={"relayuser": "s3cret-pw"}, auth_required=True)


def through_smarthost(relays, dns, peers, tmp_path, mode: str, **over):
    """A relay whose smarthost is SMARTHOST, in `mode`, with relayuser's password; `over` adds keys (ca_file)."""
    dns.a(SMARTHOST, FOREIGN)
    pw = tmp_path / "smarthost.password"
    pw.write_text("s3cret-pw")
    return start_outbound(relays, dns, peers, delivery={"smarthost": {
        "host": SMARTHOST, "port": peers.port, "tls": mode, "username": "relayuser", "password_file": str(pw), **over}})


def saw_auth(peer) -> bool:
    """Did the peer get an AUTH command, in clear or inside TLS (its raw reads and its login attempts)?"""
    return bool(peer.logins) or any(b"AUTH" in chunk.upper() for conn in peer.chunks() for chunk in conn)


def unverified_log_lines(relay) -> list[dict]:
    out = []
    for rec in log_records(relay):
        f = rec.get("fields") if isinstance(rec.get("fields"), dict) else rec
        if "certificate did not verify" in str(f.get("message", "")):
            out.append(f)
    return out


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_smarthost_gets_every_message_with_checked_credentials(relays, dns, peers, certs, tmp_path, mode):
    # The smarthost's certificate is for its name, from the test CA, which ca_file names.
    smarthost = smarthost_peer(peers, issue(certs, tmp_path / "smarthost-tls", [SMARTHOST]), mode)
    r = through_smarthost(relays, dns, peers, tmp_path, mode, ca_file=str(certs["ca"]))
    # neither domain resolves in the test DNS: in smarthost mode nothing is looked up
    qid, marker, _ = send(r, ["bob@foreign.test", "carol@elsewhere.test"], "smarthost")
    wait_gone(r, qid)
    got = smarthost.with_marker(marker)
    assert sorted(a for t in got for a in t.rcpt_tos) == ["bob@foreign.test", "carol@elsewhere.test"], got
    for t in got:
        assert t.login == "relayuser" and t.tls and t.tls.startswith("TLS"), t
    assert any(ok and login == "relayuser" and password == "s3cret-pw" for _, login, password, ok in smarthost.logins)
    assert not dns.queries_for("foreign.test") and not dns.queries_for("elsewhere.test"), dns.queries


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_a_smarthost_certificate_from_an_unknown_ca_defers_without_auth_until_the_ca_is_trusted(
        relays, dns, peers, certs, tmp_path, mode):
    smarthost = smarthost_peer(peers, issue(certs, tmp_path / "smarthost-tls", [SMARTHOST]), mode)
    r = through_smarthost(relays, dns, peers, tmp_path, mode)  # no ca_file: the test CA is not among the system's
    qid, marker, _ = send(r, ["bob@foreign.test"], "unknownca")
    reply = wait_state(r, qid, {"bob@foreign.test": "deferred"})["bob@foreign.test"]["last_reply"]
    assert reply.startswith("451 4.7.5") and "certificate not verified" in reply, reply
    assert "delivery.smarthost.ca_file" in reply, reply  # the reason says where a CA is missing
    # (a verification error means the handshake reached the smarthost's certificate)
    assert not saw_auth(smarthost), (smarthost.logins, smarthost.chunks())
    assert not smarthost.transactions, smarthost.transactions
    [line, *_] = unverified_log_lines(r) or [None]
    assert line and line.get("smarthost") == SMARTHOST and "ca_file" in str(line.get("error")), r.log_tail(20)

    # The message stays queued: once the relay trusts the CA, the next attempt delivers it, with AUTH.
    r.config["delivery"]["smarthost"]["ca_file"] = str(certs["ca"])
    r.write_config()
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reloaded" in r.log_text(), timeout=15, step=0.1), r.log_tail(30)
    flush(r, qid)
    wait_gone(r, qid)
    [t] = smarthost.with_marker(marker)
    assert t.login == "relayuser" and t.rcpt_tos == ["bob@foreign.test"], t


def test_a_smarthost_certificate_for_another_name_defers_without_auth(relays, dns, peers, certs, tmp_path):
    # From the trusted CA, but for another name than delivery.smarthost.host.
    smarthost = smarthost_peer(peers, issue(certs, tmp_path / "other-tls", ["other.test"]), "starttls")
    r = through_smarthost(relays, dns, peers, tmp_path, "starttls", ca_file=str(certs["ca"]))
    qid, _, _ = send(r, ["bob@foreign.test"], "wrongname")
    reply = wait_state(r, qid, {"bob@foreign.test": "deferred"})["bob@foreign.test"]["last_reply"]
    assert reply.startswith("451 4.7.5") and "certificate not verified" in reply, reply
    assert f'not valid for name "{SMARTHOST}"' in reply, reply
    assert any(b"STARTTLS" in chunk for conn in smarthost.chunks() for chunk in conn), smarthost.chunks()
    assert not saw_auth(smarthost), (smarthost.logins, smarthost.chunks())
    assert not smarthost.transactions, smarthost.transactions
    assert unverified_log_lines(r), r.log_tail(20)


# ---------------------------------------------------------------------------------------------------------
# Extensions the peer may lack


UTF8_RCPT = "üser@foreign.test"


def _utf8_message(marker: str) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{UTF8_RCPT}>\r\nSubject: {marker}\r\nMessage-ID: <{marker}@client.example.test>\r\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus dem Test\r\n").encode()


def test_a_smtputf8_message_to_a_peer_without_smtputf8_bounces_5_6_7(relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN, smtputf8=False)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    marker = unique("utf8")
    qid = submit(r, [UTF8_RCPT], _utf8_message(marker), mail_params="SMTPUTF8 BODY=8BITMIME")
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)
    assert only_status(t) == "5.6.7"
    assert not peer.transactions, peer.transactions


def test_a_smtputf8_message_to_a_peer_with_smtputf8_is_sent_with_the_parameter(relays, dns, peers):
    peer = peers.aio(FOREIGN)  # SMTPUTF8 and 8BITMIME advertised
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    marker = unique("utf8ok")
    qid = submit(r, [UTF8_RCPT], _utf8_message(marker), mail_params="SMTPUTF8 BODY=8BITMIME")
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)
    assert "SMTPUTF8" in t.mail_options and t.rcpt_tos == [UTF8_RCPT], (t.mail_options, t.rcpt_tos)
    assert "Grüße".encode() in t.data


def _8bit(marker: str) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <bob@foreign.test>\r\nSubject: {marker}\r\nMessage-ID: <{marker}@c.example.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            f"Stra\u00dfe, caf\u00e9\r\n").encode()


def test_an_8bitmime_message_to_a_peer_without_8bitmime_bounces_5_6_3(relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN, eightbitmime=False)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    marker = unique("8bit")
    qid = submit(r, ["bob@foreign.test"], _8bit(marker), mail_params="BODY=8BITMIME")
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)
    assert only_status(t) == "5.6.3"
    assert not peer.transactions, peer.transactions


def test_an_8bitmime_message_is_sent_with_body_8bitmime(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    marker = unique("8bitok")
    qid = submit(r, ["bob@foreign.test"], _8bit(marker), mail_params="BODY=8BITMIME")
    wait_gone(r, qid)
    [t] = peer.with_marker(marker)
    assert "BODY=8BITMIME" in t.mail_options, t.mail_options


def test_a_message_over_the_peers_size_limit_bounces_5_3_4_without_being_sent(relays, dns, peers, mailbox):
    peer = peers.aio(FOREIGN, size_limit=2000)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test"], "toobig", body=("y" * 78 + "\r\n") * 60)
    wait_gone(r, qid)
    [t] = wait_dsn(mailbox, marker)
    assert only_status(t) == "5.3.4"
    assert "DATA" not in peer.verbs() and not peer.transactions, peer.verbs()


def test_pipelining_sends_mail_rcpts_and_data_in_one_write(relays, dns, peers):
    peer = peers.aio(FOREIGN)  # PIPELINING advertised
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    # (a sender without a return path: its recipients share one transaction)
    qid, _, _ = send(r, ["a1@foreign.test", "a2@foreign.test", "a3@foreign.test"], "pipe", sender="a@other.test")
    wait_gone(r, qid)
    [chunks] = peer.chunks()
    with_mail = [c for c in chunks if b"MAIL FROM:" in c.upper()]
    assert with_mail, chunks
    c = with_mail[0].upper()
    assert c.count(b"RCPT TO:") == 3 and c.endswith(b"DATA\r\n"), f"MAIL/RCPT/DATA not in one write: {chunks}"


def test_without_pipelining_each_command_waits_for_its_reply(relays, dns, peers):
    peer = peers.aio(FOREIGN, pipelining=False)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, _, _ = send(r, ["a1@foreign.test", "a2@foreign.test"], "nopipe")
    wait_gone(r, qid)
    [chunks] = peer.chunks()
    for c in chunks:
        if b"MAIL FROM:" in c.upper() or b"RCPT TO:" in c.upper():
            assert c.count(b"\r\n") == 1, f"commands sent without waiting for replies: {chunks}"


# ---------------------------------------------------------------------------------------------------------
# Connections


def _backlog(r, dns, n: int, tag: str) -> list[tuple[str, str, bytes]]:
    """n messages to foreign.test, all deferred by a failing resolver, then the resolver healed (not flushed)."""
    dns.servfail("foreign.test")
    ids = [send(r, [f"{tag}{i}@foreign.test"], f"{tag}{i}") for i in range(n)]
    for i, (qid, _, _) in enumerate(ids):
        wait_state(r, qid, {f"{tag}{i}@foreign.test": "deferred"})
    dns.heal("foreign.test")
    return ids


def test_messages_to_one_domain_share_a_connection_up_to_messages_per_connection(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers,
                       delivery={"per_domain": {"max_connections": 1, "messages_per_connection": 3}})
    ids = _backlog(r, dns, 7, "reuse")
    flush(r)
    for qid, _, _ in ids:
        wait_gone(r, qid)
    per_conn = collections.Counter(t.conn for t in peer.accepted())
    assert sum(per_conn.values()) == 7, per_conn
    assert max(per_conn.values()) <= 3, f"more than messages_per_connection on one connection: {per_conn}"
    assert max(per_conn.values()) >= 2, f"no connection carried more than one message: {per_conn}"
    assert peer.max_concurrent == 1, peer.max_concurrent


def test_a_message_that_comes_soon_after_the_last_goes_over_the_same_connection(relays, dns, peers):
    # A connection with nothing to send waits a moment (1 s) for its destination's next message rather
    # than say QUIT at once; a message accepted within that moment goes over it, not a new connection.
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    shared = []
    for attempt in range(3):  # bounded: each pair is sent back to back, well inside the moment
        first, _, _ = send(r, [f"soon{attempt}a@foreign.test"], f"soon{attempt}a")
        wait_gone(r, first)
        second, _, _ = send(r, [f"soon{attempt}b@foreign.test"], f"soon{attempt}b")
        wait_gone(r, second)
        conns = {t.rcpt_tos[0]: t.conn for t in peer.accepted()}
        if conns[f"soon{attempt}a@foreign.test"] == conns[f"soon{attempt}b@foreign.test"]:
            shared.append(attempt)
            break
    assert shared, f"every second message opened a connection of its own: {conns}"
    # The idle connection does say QUIT in the end.
    assert wait_until(lambda: all(peer.verbs(c)[-1:] == ["QUIT"] for c in set(conns.values())), timeout=30)


def test_transactions_on_one_connection_are_separated_by_rset(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers,
                       delivery={"per_domain": {"max_connections": 1, "messages_per_connection": 3}})
    ids = _backlog(r, dns, 3, "rset")
    flush(r)
    for qid, _, _ in ids:
        wait_gone(r, qid)
    per_conn = collections.Counter(t.conn for t in peer.accepted())
    shared = [conn for conn, n in per_conn.items() if n >= 2]
    assert shared, f"no connection carried two messages: {per_conn}"
    for conn in shared:
        verbs = [v for v in peer.verbs(conn) if v in ("MAIL", "DATA", "RSET")]
        seq = "".join({"MAIL": "M", "DATA": "D", "RSET": "R"}[v] for v in verbs)
        assert "DM" not in seq, f"connection {conn}: no RSET between transactions (spec: 'RSET between'): {verbs}"


def test_the_per_domain_connection_limit_caps_concurrent_connections(relays, dns, peers):
    peer = peers.aio(FOREIGN, data_delay=0.3)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers,
                       delivery={"per_domain": {"max_connections": 2, "messages_per_connection": 1}})
    ids = _backlog(r, dns, 8, "conc")
    flush(r)
    for qid, _, _ in ids:
        wait_gone(r, qid, timeout=60)
    assert len(peer.accepted()) == 8
    assert peer.max_concurrent <= 2, f"{peer.max_concurrent} connections at once, limit 2"
    per_conn = collections.Counter(t.conn for t in peer.accepted())
    assert max(per_conn.values()) == 1, per_conn


# ---------------------------------------------------------------------------------------------------------
# Source address and EHLO name


def test_source_address_and_ehlo_name_come_from_the_sending_domains_ip_pool(relays, dns, peers):
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)

    def with_pool(cfg):
        cfg["ip_pools"] = [{"name": "pool9", "sources": [{"address": SOURCE, "ehlo": "out9.example.test"}]}]
        for d in cfg["domains"]:
            if d["name"] == "example.test":
                d["ip_pool"] = "pool9"

    r = start_outbound(relays, dns, peers, config=with_pool)
    pooled, marker_pooled, _ = send(r, ["bob@foreign.test"], "pooled", sender="a@example.test")
    wait_gone(r, pooled)
    plain, marker_plain, _ = send(r, ["bob@foreign.test"], "nopool", sender="a@other.test")
    wait_gone(r, plain)
    [tp] = peer.with_marker(marker_pooled)
    assert tp.client[0] == SOURCE and tp.helo == "out9.example.test", (tp.client, tp.helo)
    [tn] = peer.with_marker(marker_plain)
    assert tn.client[0] != SOURCE and tn.helo == HOSTNAME, (tn.client, tn.helo)


def test_weighted_sources_split_a_pools_mail_by_their_weights(relays, dns, peers):
    """Two sources weighing 3 and 1, and a third weighing 0: 4,000 messages leave 3:1 (within ±5 %) from
    the first two, none from the third, each with its own source's EHLO name, and no connection carries
    another source's mail."""
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    heavy, light, retired = "127.0.0.20", "127.0.0.21", "127.0.0.22"
    ehlo = {heavy: "out20.example.test", light: "out21.example.test", retired: "out22.example.test"}

    def with_pool(cfg):
        cfg["ip_pools"] = [{"name": "weighted", "sources": [
            {"address": heavy, "ehlo": ehlo[heavy], "weight": 3},
            {"address": light, "ehlo": ehlo[light]},  # weight 1, the default
            {"address": retired, "ehlo": ehlo[retired], "weight": 0},
        ]}]
        for d in cfg["domains"]:
            if d["name"] == "example.test":
                d["ip_pool"] = "weighted"

    r = start_outbound(relays, dns, peers, config=with_pool)
    host, port = r.listener("trusted")
    log = r.workdir / "smtp-source.log"
    load = smtp_source(host, port, "-s", "10", "-m", "4000", "-l", "512",
                       "-f", "load@example.test", "-t", "bob@foreign.test", log=log)
    try:
        assert load.wait(timeout=300) == 0, log.read_text()[:500]
    finally:
        if load.poll() is None:
            load.kill()
    assert wait_until(lambda: len(peer.accepted()) >= 4000, 300), len(peer.accepted())
    done = peer.accepted()
    assert len(done) == 4000, len(done)
    by_source = collections.Counter(t.client[0] for t in done)
    assert set(by_source) == {heavy, light}, by_source
    assert 2850 <= by_source[heavy] <= 3150, f"{by_source}: 3 of 4 should leave from {heavy}"
    assert all(t.helo == ehlo[t.client[0]] for t in done)
    sources_per_conn = collections.defaultdict(set)
    for t in done:
        sources_per_conn[t.conn].add(t.client[0])
    assert all(len(s) == 1 for s in sources_per_conn.values())


def test_mixed_outcomes_do_not_leak_between_recipients_of_different_domains(relays, dns, peers):
    """Two destination domains, one deferred by DNS, one delivered: each keeps its own state."""
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN).route("elsewhere.test", FOREIGN).servfail("elsewhere.test")
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["bob@foreign.test", "carol@elsewhere.test"], "twodomains")
    s = wait_state(r, qid, {"bob@foreign.test": "delivered", "carol@elsewhere.test": "deferred"})
    assert [t.rcpt_tos for t in peer.with_marker(marker)] == [["bob@foreign.test"]], s
    assert states(r, qid) is not None
