"""Config reload: SIGHUP, or a change of the file, applies a new config to every part of the running relay
(sessions, queue, delivery) without dropping the sessions in flight; what cannot change live (a listener's
address, the spool) is reported and left as it runs; a bad new config is refused and the running one stays
in force. Each reload is counted in herald_config_reload_total{result}."""

from __future__ import annotations

import signal
import time

from harness.certs import issue, make_self_signed
from harness.outbound import FOREIGN, flush, send, start_outbound, wait_gone, wait_state
from harness.prometheus import scrape
from harness.relay import HOSTNAME
from harness.smtp import SmtpConn, make_message

SOURCE = "127.0.0.9"  # a source address the reload adds through ip_pools
SMARTHOST = "127.0.0.10"  # a smarthost the reload adds


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
    assert reloads(r) == {"applied": 0, "partial": 0, "rejected": 1}


def reloads(relay) -> dict[str, float]:
    exp = scrape(relay)
    return {k: exp.get("herald_config_reload_total", result=k) for k in ("applied", "partial", "rejected")}


def reload(relay, before: int) -> None:
    """Writes relay.config and sends SIGHUP; waits for the reload after the `before`-th."""
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    ok = wait_until(lambda: relay.log_text().count("config reloaded") > before, attempts=150)
    assert ok, relay.log_tail(30)


def test_a_reload_reaches_delivery_ehlo_name_source_address_and_connection_cap(relays, dns, peers):
    peer = peers.aio(FOREIGN, data_delay=0.3)
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers,
                       delivery={"per_domain": {"max_connections": 1, "messages_per_connection": 1}})
    before = [send(r, [f"b{i}@foreign.test"], f"before{i}", sender="a@example.test") for i in range(3)]
    for qid, _, _ in before:
        wait_gone(r, qid)
    first = peer.with_marker(before[0][1])[0]
    assert first.helo == HOSTNAME and first.client[0] != SOURCE, (first.helo, first.client)
    assert peer.max_concurrent == 1, peer.max_concurrent

    # A session opened before the reload, in the middle of nothing, outlives it.
    host, port = r.listener("trusted")
    early = SmtpConn(host, port)
    early.greeting()
    early.ehlo()

    r.config["hostname"] = "renamed.example.test"
    r.config["ip_pools"] = [{"name": "pool9", "sources": [{"address": SOURCE, "ehlo": "out9.example.test"}]}]
    for d in r.config["domains"]:
        if d["name"] == "example.test":
            d["ip_pool"] = "pool9"
    r.config["delivery"]["per_domain"] = {"max_connections": 3, "messages_per_connection": 1}
    reload(r, 0)
    assert reloads(r) == {"applied": 1, "partial": 0, "rejected": 0}

    pooled, marker_pooled, _ = send(r, ["p@foreign.test"], "pooled", sender="a@example.test")
    plain, marker_plain, _ = send(r, ["q@foreign.test"], "plain", sender="a@other.test")
    wait_gone(r, pooled)
    wait_gone(r, plain)
    [tp] = peer.with_marker(marker_pooled)
    assert (tp.client[0], tp.helo) == (SOURCE, "out9.example.test"), (tp.client, tp.helo)
    [tn] = peer.with_marker(marker_plain)
    assert tn.client[0] != SOURCE and tn.helo == "renamed.example.test", (tn.client, tn.helo)

    # The cap went from 1 to 3: a backlog of six now goes out over more than one connection, never four.
    dns.servfail("foreign.test")
    backlog = [send(r, [f"c{i}@foreign.test"], f"cap{i}", sender="a@other.test") for i in range(6)]
    for i, (qid, _, _) in enumerate(backlog):
        wait_state(r, qid, {f"c{i}@foreign.test": "deferred"})
    dns.heal("foreign.test")
    peer.max_concurrent = 0
    flush(r)
    for qid, _, _ in backlog:
        wait_gone(r, qid, timeout=60)
    assert 1 < peer.max_concurrent <= 3, f"{peer.max_concurrent} connections at once after the cap became 3"

    with early:
        end = early.transaction("a@example.test", ["x@foreign.test"], make_message("early session"))
        assert end.queue_id, end
        wait_gone(r, end.queue_id)


def test_a_reload_can_switch_delivery_to_a_smarthost(relays, dns, peers):
    mx = peers.aio(FOREIGN, "mx")
    relay_host = peers.aio(SMARTHOST, "smarthost")
    dns.route("foreign.test", FOREIGN)
    r = start_outbound(relays, dns, peers)
    qid, marker, _ = send(r, ["a@foreign.test"], "direct")
    wait_gone(r, qid)
    assert mx.with_marker(marker) and not relay_host.with_marker(marker)
    r.config["delivery"]["smarthost"] = {"host": SMARTHOST, "port": peers.port, "tls": "none"}
    reload(r, 0)
    qid, marker, _ = send(r, ["b@foreign.test"], "via-smarthost")
    wait_gone(r, qid)
    assert relay_host.with_marker(marker) and not mx.with_marker(marker)


def test_a_listener_address_cannot_change_live_and_the_rest_still_applies(relays):
    r = relays.start("partial", limits={"max_recipients": 2})
    trusted = next(lst for lst in r.config["listeners"] if lst["name"] == "trusted")
    served = trusted["address"]
    host, port = r.listener("trusted")
    trusted["address"] = f"{host}:{port + 1}" if ":" not in host else f"[{host}]:{port + 1}"
    r.config["limits"] = {"max_recipients": 4}
    reload(r, 0)
    assert "cannot change while running" in r.log_text(), r.log_tail(20)
    assert reloads(r) == {"applied": 0, "partial": 1, "rejected": 0}
    # The old address still serves, with the new limit.
    trusted["address"] = served
    assert rcpt_limit_reply(r, 4).startswith("452 4.5.3")
    assert rcpt_limit_reply(r, 3).startswith("250 2.1.5")


def test_a_rotated_smarthost_password_file_is_used_without_a_signal(relays, dns, peers, certs, tmp_path):
    # The Secret behind password_file changes in place; the config file does not.
    smarthost = peers.aio(SMARTHOST, "smarthost", certs=issue(certs, tmp_path / "smarthost-tls", [SMARTHOST]),
                          starttls=True, auth={"relayuser": "old-password"}, auth_required=True)
    pw = tmp_path / "smarthost.password"
    pw.write_text("old-password")
    r = start_outbound(relays, dns, peers, delivery={"smarthost": {
        "host": SMARTHOST, "port": peers.port, "tls": "starttls", "username": "relayuser", "password_file": str(pw),
        "ca_file": str(certs["ca"])}})
    qid, marker, _ = send(r, ["a@foreign.test"], "old-pw")
    wait_gone(r, qid)
    assert smarthost.with_marker(marker)
    smarthost.users = {"relayuser": "new-password"}
    pw.write_text("new-password")
    assert wait_until(lambda: "config reloaded" in r.log_text(), attempts=150), r.log_tail(30)
    qid, marker, _ = send(r, ["b@foreign.test"], "new-pw")
    wait_gone(r, qid)
    assert smarthost.with_marker(marker)
    assert any(ok and password == "new-password" for _, _, password, ok in smarthost.logins), smarthost.logins


def test_a_renewed_smarthost_ca_file_is_used_without_a_signal(relays, dns, peers, certs, tmp_path):
    # A self-signed smarthost certificate (cert-manager's selfSigned Issuer) is its own CA: a renewal changes
    # the Secret's ca.crt in place, and the relay must trust the new one without a signal.
    old = make_self_signed(tmp_path / "old", [SMARTHOST])
    new = make_self_signed(tmp_path / "new", [SMARTHOST])
    ca = tmp_path / "ca.crt"
    ca.write_bytes(old["ca"].read_bytes())
    smarthost = peers.aio(SMARTHOST, "smarthost", certs=new, starttls=True, auth={"relayuser": "pw"},
                          auth_required=True)
    pw = tmp_path / "smarthost.password"
    pw.write_text("pw")
    r = start_outbound(relays, dns, peers, delivery={"smarthost": {
        "host": SMARTHOST, "port": peers.port, "tls": "starttls", "username": "relayuser", "password_file": str(pw),
        "ca_file": str(ca)}})
    qid, marker, _ = send(r, ["a@foreign.test"], "renewed-ca")
    reply = wait_state(r, qid, {"a@foreign.test": "deferred"})["a@foreign.test"]["last_reply"]
    assert "certificate not verified" in reply and not smarthost.logins, (reply, smarthost.logins)
    assert "renewed with a new key" in reply, reply  # same issuer name, another key: the reason says so
    staged = tmp_path / "ca.crt.new"
    staged.write_bytes(new["ca"].read_bytes())
    staged.replace(ca)
    assert wait_until(lambda: "config reloaded" in r.log_text(), attempts=150), r.log_tail(30)
    flush(r, qid)
    wait_gone(r, qid)
    [t] = smarthost.with_marker(marker)
    assert t.login == "relayuser", t


def test_an_unreadable_smarthost_ca_file_on_reload_is_refused_and_the_old_one_stays(relays, dns, peers, certs, tmp_path):
    smarthost = peers.aio(SMARTHOST, "smarthost", certs=issue(certs, tmp_path / "smarthost-tls", [SMARTHOST]),
                          starttls=True)
    r = start_outbound(relays, dns, peers, delivery={"smarthost": {
        "host": SMARTHOST, "port": peers.port, "tls": "starttls", "ca_file": str(certs["ca"])}})
    r.config["delivery"]["smarthost"]["ca_file"] = str(tmp_path / "missing-ca.crt")
    r.write_config()
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reload refused" in r.log_text()), r.log_tail(30)
    assert "delivery.smarthost.ca_file" in r.log_text(), r.log_tail(10)
    # The write and the SIGHUP may each start a reload (the config file is watched too): both are refused.
    assert reloads(r)["rejected"] >= 1
    qid, marker, _ = send(r, ["a@foreign.test"], "old-ca-stays")
    wait_gone(r, qid)
    assert smarthost.with_marker(marker)
