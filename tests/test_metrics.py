"""Metrics on the admin endpoint (observability spec): what a real Prometheus scrapes, the exposition format
(`promtool check metrics`), the bound on destination-domain labels, and the rejection counter.

Each test runs its own relay, so every counter starts at zero and the values asserted are exactly what the
test sent. Delivery goes to the test DNS server and loopback peers (harness/outbound.py): smtp-sink accepts
(delivered), an aiosmtpd peer answers 451 (deferred; the first retry is an hour away, so it stays deferred)
and one answers 550 5.1.1 (bounced). The bounced messages use the null sender, so they produce no DSN and
the delivery counters hold only the test's own recipients.
"""

from __future__ import annotations

import time

import pytest

from harness.outbound import get_message, send, start_outbound, wait_gone, wait_state, wait_until
from harness.prometheus import Prometheus, prometheus_bin, promtool, promtool_check, scrape
from harness import reports
from harness.relay import addr, free_port, split_addr
from harness.smtp import SmtpConn

DELIVER = "127.0.0.2"  # smtp-sink: MX of deliver.test
DEFER = "127.0.0.3"  # aiosmtpd, 451 to every recipient of defer.test
BOUNCE = "127.0.0.4"  # aiosmtpd, 550 5.1.1 to every recipient of bounce.test

CONTRACT_TYPES = {
    "herald_queue_depth": "gauge",
    "herald_queue_messages": "gauge",
    "herald_queue_oldest_message_age_seconds": "gauge",
    "herald_messages_received_total": "counter",
    "herald_deliveries_total": "counter",
    "herald_bounces_total": "counter",
    "herald_delivery_latency_seconds": "histogram",
    "herald_smtp_sessions": "gauge",
    "herald_smtp_rejections_total": "counter",
    "herald_spool_bytes": "gauge",
    "herald_suppressions": "gauge",
    "herald_suppression_streaks": "gauge",
    "herald_events_dropped_total": "counter",
    "herald_webhook_failures_total": "counter",
    "herald_feedback_reports_total": "counter",
    "herald_complaints_total": "counter",
    "herald_config_reload_total": "counter",
    "herald_tls_certificate_expiry_timestamp_seconds": "gauge",
    "herald_throttled_total": "counter",
    "herald_shaping_suspended": "gauge",
}
CONTRACT_LABELS = {
    "herald_queue_depth": {"domain"},
    "herald_messages_received_total": {"listener"},
    "herald_deliveries_total": {"result"},
    "herald_bounces_total": {"class", "category", "domain"},
    "herald_smtp_sessions": {"listener"},
    "herald_smtp_rejections_total": {"reason"},
    "herald_feedback_reports_total": {"kind", "result"},
    "herald_complaints_total": {"feedback_type", "domain"},
    "herald_config_reload_total": {"result"},
    "herald_throttled_total": {"provider", "reason"},
    "herald_shaping_suspended": {"provider", "source"},
}
CATEGORIES = {
    "invalid-recipient", "invalid-domain", "mailbox-full", "message-too-large", "rate-limited", "greylisted", "reputation-block",
    "authentication-failure", "policy-block", "spam-content", "transient-network", "transient-other", "permanent-other",
}
REJECTION_REASONS = {
    "relay_denied", "sender_not_allowed", "authentication", "message_too_large", "too_many_recipients",
    "smtputf8_required", "malformed_message", "suppressed", "too_many_errors", "timeout", "spool_error",
    "memory_budget", "shutting_down", "protocol", "network_denied", "connection_limit", "unknown_recipient", "other",
}


def admin_target(relay) -> str:
    host, port = split_addr(relay.config["metrics"]["address"])
    return addr(host, port)


class Traffic:
    """Counts of what `send_mixed_traffic` sent, and the ids it got back."""

    def __init__(self, delivered: list[str], deferred: list[str], bounced: list[str]):
        self.delivered, self.deferred, self.bounced = delivered, deferred, bounced

    @property
    def received(self) -> int:
        return len(self.delivered) + len(self.deferred) + len(self.bounced)


def route_mixed(dns, peers):
    peers.sink(DELIVER)
    deferring = peers.aio(DEFER, "deferring")
    bouncing = peers.aio(BOUNCE, "bouncing")
    dns.route("deliver.test", DELIVER).route("defer.test", DEFER).route("bounce.test", BOUNCE)
    return deferring, bouncing


def send_mixed_traffic(relay, deferring, bouncing, n_delivered=3, n_deferred=2, n_bounced=2) -> Traffic:
    """One recipient per message, each to its own outcome; waits until every outcome is recorded."""
    delivered, deferred, bounced = [], [], []
    for i in range(n_delivered):
        delivered.append(send(relay, [f"ok{i}@deliver.test"], "m-ok")[0])
    for i in range(n_deferred):
        rcpt = f"later{i}@defer.test"
        deferring.on_rcpt(rcpt, "451 4.3.0 <%s>: temporarily unavailable, try again later" % rcpt)
        deferred.append((send(relay, [rcpt], "m-defer")[0], rcpt))
    for i in range(n_bounced):
        rcpt = f"nouser{i}@bounce.test"
        bouncing.on_rcpt(rcpt, "550 5.1.1 <%s>: Recipient address rejected: User unknown" % rcpt)
        bounced.append(send(relay, [rcpt], "m-bounce", sender="")[0])
    for qid in delivered + bounced:
        wait_gone(relay, qid)
    for qid, rcpt in deferred:
        wait_state(relay, qid, {rcpt: "deferred"})
    return Traffic(delivered, [q for q, _ in deferred], bounced)


# ---------------------------------------------------------------------------------------------------------
# A real Prometheus


@pytest.fixture
def prometheus_factory(tmp_path):
    if prometheus_bin() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path / f"prometheus{len(started)}", targets)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_exactly_the_traffic_the_relay_handled(relays, dns, peers, prometheus_factory):
    deferring, bouncing = route_mixed(dns, peers)
    relay = start_outbound(relays, dns, peers, name="scraped")
    prom = prometheus_factory([admin_target(relay)])
    # Prometheus scrapes while the mail goes through: wait for its first successful scrape first.
    up = wait_until(lambda: prom.scalar('up{job="herald"}') == 1, timeout=30, step=0.5)
    assert up, f"Prometheus never scraped the relay: {prom.targets_up()}\n{prom.log_tail()}"

    t = send_mixed_traffic(relay, deferring, bouncing)

    want = {
        'sum(herald_messages_received_total{listener="trusted"})': t.received,
        'sum(herald_deliveries_total{result="delivered"})': len(t.delivered),
        'sum(herald_deliveries_total{result="deferred"})': len(t.deferred),
        'sum(herald_deliveries_total{result="bounced"})': len(t.bounced),
        'sum(herald_bounces_total{class="hard",category="invalid-recipient",domain="bounce.test"})': len(t.bounced),
        'sum(herald_bounces_total{class="soft",domain="defer.test"})': len(t.deferred),
        'sum(herald_bounces_total{domain="deliver.test"}) or vector(0)': 0,
        # final outcomes only: the deferred recipients have none yet
        "sum(herald_delivery_latency_seconds_count)": len(t.delivered) + len(t.bounced),
        'sum(herald_delivery_latency_seconds_bucket{le="+Inf"})': len(t.delivered) + len(t.bounced),
        'sum(herald_queue_depth{domain="defer.test"})': len(t.deferred),
        'sum(herald_queue_depth{domain=~"deliver.test|bounce.test"}) or vector(0)': 0,
        "sum(herald_queue_messages)": len(t.deferred),
        # 5.1.1 hard bounces put the recipient on the suppression list (delivery spec)
        "sum(herald_suppressions)": len(t.bounced),
    }
    got = prom.wait_for(want, timeout=30)
    wrong = {q: (got[q], v) for q, v in want.items() if got[q] != v}
    assert not wrong, (
        "Prometheus's values (got, want) after sending "
        f"{len(t.delivered)} delivered, {len(t.deferred)} deferred (451), {len(t.bounced)} bounced (550 5.1.1):\n"
        + "\n".join(f"  {q}: got {g}, want {w}" for q, (g, w) in wrong.items())
        + f"\nthe relay's /metrics now:\n{scrape(relay).text}"
    )
    hist = prom.query("herald_delivery_latency_seconds_sum")
    assert hist and float(hist[0]["value"][1]) >= 0, hist


# ---------------------------------------------------------------------------------------------------------
# The exposition format


def relay_with_every_series(relays, dns, peers, name: str, store=None):
    """A relay after one delivered, one deferred and one bounced message, one refused RCPT and one complaint, so that every
    family has a series (test_chart.py uses it too); with `store` (harness.store.Store) it shares its
    suppressions there, so that the store's families have series too. Returns the relay and whether the
    queue gauges showed the deferred message within 15 s."""
    deferring, bouncing = route_mixed(dns, peers)

    def config(cfg):
        if store:
            cfg["store"] = store.section()
        # example.test's mail leaves from a pool whose one address is warming up, so that the per-source
        # gauges have series too (the standard schedule's first day allows 50 messages).
        today = time.strftime("%Y-%m-%d", time.gmtime())
        cfg["ip_pools"] = [{"name": "every", "warmup": {"preset": "standard"},
                            "sources": [{"address": "127.0.0.1", "ehlo": "relay.example.test", "warmup_start": today}]}]
        for d in cfg["domains"]:
            if d["name"] == "example.test":
                d["ip_pool"] = "every"
        # The deferral suspends its source for defer.test's provider (its MX host's registrable domain), so
        # that the traffic shaping families have series too.
        cfg["shaping"] = {"rules": [{"provider": "defer.test", "category": "transient-other", "action": "suspend",
                                     "duration": "1h"}]}

    relay = start_outbound(relays, dns, peers, name=name, config=config)
    send_mixed_traffic(relay, deferring, bouncing, n_delivered=1, n_deferred=1, n_bounced=1)
    # and one refused RCPT, so that the rejection counter has a series too
    host, port = relay.listener("inbound")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<a@example.test>", "250 ")
        c.expect("RCPT TO:<x@deliver.test>", "554 5.7.1")
        c.cmd("QUIT")
    # and a feedback-loop complaint about a delivered recipient, so that the report counters have series too
    reader = "reader@deliver.test"
    report = reports.build("arf", report_to=reports.mailbox("fbl"), recipient=reader,
                           return_path=reports.token("0000000000000001", reader).address)
    assert reports.send_report(relay, reports.mailbox("fbl"), report)[0] == 250
    # the queue gauges are refreshed every 2 s: wait until they show the deferred message
    refreshed = wait_until(lambda: scrape(relay).get("herald_queue_depth", domain="defer.test") == 1, 15, 0.2)
    refreshed = refreshed and wait_until(
        lambda: scrape(relay).get("herald_source_sent_today", source="127.0.0.1") is not None, 15, 0.2)
    refreshed = refreshed and wait_until(lambda: scrape(relay).series("herald_shaping_suspended"), 15, 0.2)
    return relay, refreshed


def test_metrics_text_passes_promtool_and_names_every_contract_series_with_its_type(relays, dns, peers):
    if promtool() is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    relay, refreshed = relay_with_every_series(relays, dns, peers, "linted")
    exp = scrape(relay)
    assert refreshed, f"herald_queue_depth{{domain=\"defer.test\"}} never became 1 for one deferred message:\n{exp.text}"
    r = promtool_check(exp.text)
    assert r.returncode == 0, f"promtool check metrics exited {r.returncode}:\n{r.stdout}{r.stderr}\n---\n{exp.text}"

    wrong_types = {n: exp.types.get(n) for n, t in CONTRACT_TYPES.items() if exp.types.get(n) != t}
    assert not wrong_types, f"families missing or of the wrong type (name: TYPE found): {wrong_types}\n{exp.text}"
    for name, labels in CONTRACT_LABELS.items():
        series = exp.series(name)
        assert series, f"no {name} series after traffic that must produce one\n{exp.text}"
        for s in series:
            assert set(s.label_dict) == labels, f"{name} has labels {s.label_dict}, the contract says {labels}"
    for s in exp.series("herald_deliveries_total"):
        assert s.label_dict["result"] in {"delivered", "deferred", "bounced"}, s
    for s in exp.series("herald_bounces_total"):
        assert s.label_dict["class"] in {"hard", "soft"}, s
        assert s.label_dict["category"] in CATEGORIES, s
    for s in exp.series("herald_smtp_rejections_total"):
        assert s.label_dict["reason"] in REJECTION_REASONS, s
    assert exp.value("herald_smtp_rejections_total", reason="relay_denied") == 1, exp.text
    assert exp.value("herald_feedback_reports_total", kind="arf", result="complaint") == 1, exp.text
    assert exp.value("herald_complaints_total", feedback_type="abuse", domain="deliver.test") == 1, exp.text
    at = [(s.name, s.label_dict) for s in exp.samples if any("@" in v for _, v in s.labels)]
    assert not at, f"label values holding an address: {at}"


def test_a_fresh_relay_shows_every_bounded_series_at_zero(relays, dns, peers):
    # Dashboards and alerts read 0, not "no data", before the first event of a kind.
    exp = scrape(start_outbound(relays, dns, peers, name="fresh"))
    for reason in REJECTION_REASONS:
        assert exp.get("herald_smtp_rejections_total", reason=reason) == 0, reason
    for result in ("delivered", "deferred", "bounced"):
        assert exp.get("herald_deliveries_total", result=result) == 0, result
    for result in ("applied", "partial", "rejected"):
        assert exp.get("herald_config_reload_total", result=result) == 0, result
    for category in CATEGORIES:
        for cls in ("hard", "soft"):
            assert exp.get("herald_bounces_total", **{"class": cls}, category=category, domain="other") == 0
    listeners = {s.label_dict["listener"] for s in exp.series("herald_messages_received_total")}
    assert listeners and listeners == {s.label_dict["listener"] for s in exp.series("herald_smtp_sessions")}


# ---------------------------------------------------------------------------------------------------------
# Label bounds


def test_queue_depth_keeps_the_50_busiest_domains_and_folds_the_rest_into_other(relays, dns, peers):
    # Every *.nowhere.test look-up gets SERVFAIL: each recipient is deferred (4.4.3) and stays queued.
    dns.servfail("nowhere.test")
    relay = start_outbound(relays, dns, peers, name="many-domains")
    quiet = [f"d{i:02d}.nowhere.test" for i in range(55)]
    busy = "zz-busy.nowhere.test"  # last by name, first by count: it must keep its own series
    ids = [send(relay, [f"rcpt{i}@{d}" for i, d in enumerate(quiet)], "many")[0]]
    ids += [send(relay, [f"r{i}@{busy}"], "busy")[0] for i in range(3)]
    n_domains = len(quiet) + 1
    n_pending = len(quiet) + 3  # per domain: messages with pending recipients

    def converged():
        exp = scrape(relay)
        depth = exp.series("herald_queue_depth")
        assert len(depth) <= 51, f"{len(depth)} herald_queue_depth series (at most 50 domains + other):\n{exp.text}"
        by = {s.label_dict["domain"]: s.value for s in depth}
        ok = (sum(by.values()) == n_pending and by.get("other") == n_domains - 50 and by.get(busy) == 3
              and exp.value("herald_deliveries_total", result="deferred") == n_pending)
        return exp if ok else None

    exp = wait_until(converged, timeout=40, step=0.5)
    last = scrape(relay)
    by = {s.label_dict["domain"]: s.value for s in last.series("herald_queue_depth")}
    assert exp, (
        f"sent {n_pending} recipients in {n_domains} domains ({busy}: 3 messages, the others 1); want "
        f"herald_queue_depth summing to {n_pending}, other={n_domains - 50}, {busy}=3, and every recipient "
        f"deferred once; got depth {by} (sum {sum(by.values())}), deferred="
        f"{last.value('herald_deliveries_total', result='deferred')}"
    )
    at = [(s.name, s.label_dict) for s in exp.samples if any("@" in v for _, v in s.labels)]
    assert not at, f"label values holding an address: {at}"


def test_no_metric_holds_more_than_51_destination_domain_label_values(relays, dns, peers):
    """Every `domain` label goes through the same bound (50 domains + other), not only the queue depth:
    the 4.4.3 verdicts for 60 domains must not make 60 herald_bounces_total series."""
    dns.servfail("nowhere.test")
    relay = start_outbound(relays, dns, peers, name="domain-labels")
    qid = send(relay, [f"rcpt{i}@d{i:02d}.nowhere.test" for i in range(60)], "labels")[0]
    ok = wait_until(lambda: scrape(relay).value("herald_deliveries_total", result="deferred") == 60, 40, 0.5)
    exp = scrape(relay)
    assert ok, f"60 recipients in 60 SERVFAIL domains were not all deferred once:\n{exp.text}"
    families = {s.name for s in exp.samples if "domain" in s.label_dict}
    for fam in families:
        values = {s.label_dict["domain"] for s in exp.samples if s.name == fam}
        assert len(values) <= 51, f"{fam} has {len(values)} distinct domain labels (at most 50 + other)"
    assert "other" in {s.label_dict["domain"] for s in exp.series("herald_bounces_total")}, (
        f"60 domains with soft bounces, yet no herald_bounces_total{{domain=\"other\"}}:\n{exp.text}")
    assert get_message(relay, qid) is not None, "the deferred message left the queue"


# ---------------------------------------------------------------------------------------------------------
# Rejections


def test_rejections_are_counted_by_reason(relays):
    cfg = relays.config("rejecting")
    # a listener whose allow_networks leaves out loopback: our connection is refused at connect
    cfg["listeners"].append({"name": "closed", "address": addr("127.0.0.1", free_port()),
                             "allow_networks": ["192.0.2.0/24"]})
    relay = relays.start("rejecting", config=cfg)

    def counts():
        exp = scrape(relay)
        return (exp.value("herald_smtp_rejections_total", reason="relay_denied"),
                exp.value("herald_smtp_rejections_total", reason="network_denied"),
                exp.total("herald_smtp_rejections_total"))

    def wait_counts(want):
        got = wait_until(lambda: counts() == want, timeout=10, step=0.1)
        assert got, f"(relay_denied, network_denied, all reasons): want {want}, got {counts()}\n{scrape(relay).text}"

    wait_counts((0, 0, 0))

    # accepted commands are no rejections
    host, port = relay.listener("inbound")
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<someone@foreign.test>", "250 ")
        c.expect("RCPT TO:<fbl@bounces.example.test>", "250 ")
        c.expect("RSET", "250 ")
        c.cmd("QUIT")
    wait_counts((0, 0, 0))

    # inbound listener, RCPT to a domain it does not receive for: relay denied
    with SmtpConn(host, port) as c:
        c.greeting()
        c.ehlo()
        c.expect("MAIL FROM:<someone@foreign.test>", "250 ")
        c.expect("RCPT TO:<victim@elsewhere.test>", "554 5.7.1")
        c.cmd("QUIT")
    wait_counts((1, 0, 1))

    # connection from outside allow_networks
    chost, cport = relay.listener("closed")
    with SmtpConn(chost, cport) as c:
        c.expect_reply("554 5.7.1", "greeting on a listener that does not allow 127.0.0.1")
    wait_counts((1, 1, 2))
