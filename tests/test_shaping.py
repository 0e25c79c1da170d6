"""Traffic shaping on real connections: IP warm-up caps per source address per day, overflow to the pool's
warm addresses at once, a wait for the next day when every address is capped (untried, not deferred), and
expiry at max_age of mail still waiting. Sources are loopback addresses; the peers record which address each
connection came from. Days are `shaping.day_length` long, counted from the epoch, so a test about the turn of
a day starts its work just after one."""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path

import pytest

from harness.outbound import FOREIGN, parse_dsn, send, start_outbound, status_field, wait_dsn, wait_until
from harness.tools import smtp_source

COLD, WARM = "127.0.0.30", "127.0.0.31"
EHLO = {COLD: "out30.example.test", WARM: "out31.example.test"}


def warming_pool(sources: list[dict], warmup: dict, day_length: str | None = None, **delivery):
    """A config edit: example.test's mail goes from pool `warming` with `sources` and `warmup`."""

    def edit(cfg):
        cfg["ip_pools"] = [{"name": "warming", "warmup": warmup, "sources": sources}]
        for d in cfg["domains"]:
            if d["name"] == "example.test":
                d["ip_pool"] = "warming"
        if day_length:
            cfg["shaping"] = {"day_length": day_length}
        cfg["delivery"].update(delivery)

    return edit


def source(address: str, weight: int = 1, start: str | None = None) -> dict:
    s = {"address": address, "ehlo": EHLO[address], "weight": weight}
    if start:
        s["warmup_start"] = start
    return s


def series(relay, name: str) -> dict[str, float]:
    """The samples of metric `name` on /metrics, by their label text (`source="127.0.0.30"`)."""
    status, body = relay.http_get("/metrics")
    assert status == 200, status
    out = {}
    for line in body.decode().splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def shaping(relay) -> dict:
    status, body = relay.http("GET", "/shaping")
    assert status == 200, (status, body)
    return json.loads(body)


def by_address(view: dict) -> dict[str, dict]:
    return {s["address"]: s for s in view["sources"]}


def after_a_day_turns(length: float, margin: float = 0.3) -> None:
    """Sleeps until just after the next turn of a day of `length` seconds."""
    now = time.time()
    time.sleep((now // length + 1) * length - now + margin)


def test_a_cold_source_sends_exactly_its_cap_and_the_rest_leaves_from_the_warm_one_at_once(relays, dns, peers):
    """A cold address (weight 3, on day 3 of a 5/10/25/50 schedule: cap 25) and a warm one (weight 1):
    of 200 messages the cold one sends exactly 25 and the warm one the other 175, with nothing deferred; the
    admin API and the gauges say where the cold address stands."""
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    two_days_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * 86400))
    r = start_outbound(relays, dns, peers, config=warming_pool(
        [source(COLD, 3, two_days_ago), source(WARM)], {"schedule": [5, 10, 25, 50]}))
    day = shaping(r)["day"]
    host, port = r.listener("trusted")
    log = r.workdir / "smtp-source.log"
    load = smtp_source(host, port, "-s", "5", "-m", "200", "-l", "512",
                       "-f", "load@example.test", "-t", "bob@foreign.test", log=log)
    try:
        assert load.wait(timeout=120) == 0, log.read_text()[:500]
    finally:
        if load.poll() is None:
            load.kill()
    assert wait_until(lambda: len(peer.accepted()) >= 200, 120), len(peer.accepted())
    view = shaping(r)
    assert view["day"] == day, "the UTC day turned during the test; its counts start again"
    done = peer.accepted()
    by_source = collections.Counter(t.client[0] for t in done)
    assert by_source == {COLD: 25, WARM: 175}, by_source
    assert all(t.helo == EHLO[t.client[0]] for t in done)
    assert r.queue() == []
    # Overflow is not a delivery attempt: nothing was deferred, and the wait is counted as one.
    deliveries = series(r, "herald_deliveries_total")
    assert deliveries.get('result="deferred"', 0) == 0, deliveries
    assert deliveries.get('result="delivered"') == 200, deliveries
    assert series(r, "herald_delivery_waits_total").get('reason="warmup"', 0) >= 1
    cold = by_address(view)[COLD]
    assert (cold["warmup_day"], cold["daily_cap"], cold["sent_today"], cold["warmup_start"]) == (3, 25, 25, two_days_ago), cold
    assert "full_until" in cold, cold
    warm = by_address(view)[WARM]
    assert "daily_cap" not in warm and "full_until" not in warm and warm["sent_today"] == 175, warm
    gauges = wait_until(lambda: (g := series(r, "herald_source_sent_today")).get(f'source="{WARM}"') == 175 and g, 10)
    assert gauges == {f'source="{COLD}"': 25, f'source="{WARM}"': 175}, gauges
    assert series(r, "herald_source_daily_cap") == {f'source="{COLD}"': 25}


def test_when_every_source_is_capped_mail_waits_untried_and_goes_the_next_day(relays, dns, peers):
    """Two cold addresses with a cap of 3 a day each and days of 6 s: of 15 messages, 6 go on the first
    day and the other 9 wait, queued and never attempted, then go over the next days, at most 3 per address
    per day; nothing is deferred and nothing bounces."""
    length = 6
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    # With days of seconds, a start of today is thousands of days ago: the start is now.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    r = start_outbound(relays, dns, peers, config=warming_pool(
        [source(COLD, 1, now), source(WARM, 1, now)], {"schedule": [3] * 30}, f"{length}s"))
    after_a_day_turns(length)
    first_day = shaping(r)["day"]
    sent = [send(r, ["bob@foreign.test"], f"capped{i}")[0] for i in range(15)]
    assert wait_until(lambda: len(peer.accepted()) >= 6, length - 1), len(peer.accepted())
    time.sleep(0.5)
    assert shaping(r)["day"] == first_day, "submitting took longer than a day"
    assert len(peer.accepted()) == 6, len(peer.accepted())
    waiting = r.queue()
    assert len(waiting) == 9, waiting
    for m in waiting:
        [st] = m["status"]
        assert (st["state"], st["attempts"]) == ("queued", 0), m
    view = by_address(shaping(r))
    assert all("full_until" in view[a] for a in (COLD, WARM)), view
    assert wait_until(lambda: len(peer.accepted()) >= 15, 5 * length), len(peer.accepted())
    last_day = shaping(r)["day"]
    assert last_day >= first_day + 2, (first_day, last_day)
    # The relay's own count per day: 3 per address on the first two days, the rest on the third.
    per_day = {}
    for day in range(first_day, last_day + 1):
        status, body = r.http("GET", f"/counters?day={day}")
        assert status == 200
        per_day[day] = json.loads(body)["sources"]
    assert all(n <= 3 for counts in per_day.values() for n in counts.values()), per_day
    assert sum(n for counts in per_day.values() for n in counts.values()) == 15, per_day
    assert per_day[first_day] == {COLD: 3, WARM: 3}, per_day
    assert r.queue() == []
    deliveries = series(r, "herald_deliveries_total")
    assert deliveries.get('result="deferred"', 0) == 0 and deliveries.get('result="bounced"', 0) == 0, deliveries
    assert len(peer.accepted()) == 15 and len(set(sent)) == 15


def test_mail_still_waiting_for_a_capped_source_at_max_age_expires_with_a_dsn(relays, dns, peers, mailbox):
    """One cold address with a cap of 1 a day and days of 40 s, max_age 3 s: the first message goes, the second
    waits and expires at max_age, untried, and its sender gets a DSN saying why."""
    length = 40
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    r = start_outbound(relays, dns, peers, config=warming_pool(
        [source(COLD, 1, now)], {"schedule": [1, 1, 1]}, f"{length}s", max_age="3s"))
    # Well inside one day: the wait must outlast the message, not end with the day.
    if time.time() % length > length - 10:
        after_a_day_turns(length)
    first, _, _ = send(r, ["bob@foreign.test"], "goes")
    assert wait_until(lambda: len(peer.accepted()) >= 1, 10)
    qid, marker, _ = send(r, ["carol@foreign.test"], "waits")
    [t] = wait_dsn(mailbox, marker, timeout=20)
    d = parse_dsn(t.data)
    [block] = d.per_recipient
    assert status_field(block).startswith("4.4."), str(block)
    assert "warm-up cap" in (block.get("Diagnostic-Code") or ""), str(block)
    assert [t.rcpt_tos for t in peer.accepted()] == [["bob@foreign.test"]]
    assert wait_until(lambda: r.queue() == [], 10), r.queue()
    deliveries = series(r, "herald_deliveries_total")
    # An expiry counts as a bounce; the wait before it was no attempt.
    assert (deliveries.get('result="bounced"'), deliveries.get('result="deferred"', 0)) == (1, 0), deliveries


def test_two_relays_sharing_a_store_keep_to_one_cap_for_the_fleet(relays, dns, peers, store):
    """Two relays, one pool: a cold address (cap 7 today) and a warm one, 30 messages through each. The
    cold address sends exactly 7 for the fleet, counted once in the store; the warm one carries the rest."""
    peer = peers.aio(FOREIGN)
    dns.route("foreign.test", FOREIGN)
    two_days_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * 86400))
    pool = warming_pool([source(COLD, 3, two_days_ago), source(WARM)], {"schedule": [1, 2, 7, 50]})

    def edit(cfg):
        pool(cfg)
        cfg["store"] = store.section(resync_interval="6h")

    a = start_outbound(relays, dns, peers, name="a", config=edit)
    b = start_outbound(relays, dns, peers, name="b", config=edit)
    day = shaping(a)["day"]
    threads = []
    for r in (a, b):
        host, port = r.listener("trusted")
        log = r.workdir / "smtp-source.log"
        threads.append((smtp_source(host, port, "-s", "4", "-m", "30", "-l", "256",
                                    "-f", "load@example.test", "-t", "bob@foreign.test", log=log), log))
    for load, log in threads:
        try:
            assert load.wait(timeout=120) == 0, log.read_text()[:500]
        finally:
            if load.poll() is None:
                load.kill()
    assert wait_until(lambda: len(peer.accepted()) >= 60, 120), len(peer.accepted())
    assert shaping(a)["day"] == day, "the UTC day turned during the test; its counts start again"
    by_source = collections.Counter(t.client[0] for t in peer.accepted())
    assert by_source == {COLD: 7, WARM: 53}, by_source
    assert store.cmd("HGET", f"herald:count:{{src}}:{day}", COLD) == "7"
    for r in (a, b):
        cold = by_address(shaping(r))[COLD]
        assert (cold["sent_today"], cold["daily_cap"]) == (7, 7), cold


# ---------------------------------------------------------------------------------------------------------
# Providers: limits shared by every domain a provider hosts, and back-off when it pushes back.


def provider_config(shaping: dict, pool: list[dict] | None = None, events: Path | None = None, **delivery):
    """A config edit: the `shaping` section, example.test's mail from `pool` (when given), events to a file."""

    def edit(cfg):
        cfg["shaping"] = shaping
        if pool:
            cfg["ip_pools"] = [{"name": "shaped", "sources": pool}]
            for d in cfg["domains"]:
                if d["name"] == "example.test":
                    d["ip_pool"] = "shaped"
        if events is not None:
            cfg["events"] = {"file": str(events)}
        cfg["delivery"].update(delivery)

    return edit


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pair(view: dict, provider: str, source: str | None) -> dict | None:
    return next((p for p in view["providers"] if p["provider"] == provider and p.get("source") == source), None)


@pytest.mark.parametrize("case", ["provider-1", "provider-3", "registrable-1"])
def test_domains_of_one_provider_share_its_connection_limit(relays, dns, peers, case):
    """Two recipient domains whose MX hosts belong to one provider (a configured one, by its MX host suffix,
    or an unknown one, by the registrable domain of its MX hosts) share the provider's connection limit:
    with slow answers and 10 connections allowed per domain, the peer never sees more connections at once
    than the provider's limit, and every message is delivered, none deferred."""
    kind, limit = case.split("-")
    limit = int(limit)
    peer = peers.aio(FOREIGN, data_delay=0.2)
    if kind == "provider":
        section = {"providers": [{"name": "hosting", "mx": ["mx.hosting.test"], "max_connections": limit}]}
        hosts = {"one.test": "in.mx.hosting.test", "two.test": "out.mx.hosting.test"}
        provider = "hosting"
    else:
        # Neither host is a known provider's: both roll up to rollup.test by the public suffix list.
        section = {"default": {"max_connections": limit}}
        hosts = {"one.test": "mx-a.rollup.test", "two.test": "mx-b.eu.rollup.test"}
        provider = "rollup.test"
    for domain, host in hosts.items():
        dns.mx(domain, (10, host)).a(host, FOREIGN)
    r = start_outbound(relays, dns, peers, config=provider_config(section))
    for i in range(8):
        for domain in hosts:
            send(r, [f"rcpt{i}@{domain}"], f"rollup{i}")
    assert wait_until(lambda: len(peer.accepted()) >= 16, 60), len(peer.accepted())
    assert r.queue() == []
    assert peer.max_concurrent <= limit, (peer.max_concurrent, limit)
    if limit > 1:
        # The limit is what held them back: with room, the two domains do run at once.
        assert peer.max_concurrent > 1, peer.max_concurrent
    deliveries = series(r, "herald_deliveries_total")
    assert deliveries.get('result="deferred"', 0) == 0, deliveries
    if limit == 1:
        assert series(r, "herald_delivery_waits_total").get('reason="provider"', 0) >= 1
    # The last connection closes once it has waited a moment for more.
    view = wait_until(lambda: (v := shaping(r)) and (p := pair(v, provider, None)) and p["connections"] == 0 and v, 15)
    assert view, shaping(r)["providers"]
    p = pair(view, provider, None)
    assert (p["max_connections"], p["share"], p["connections"]) == (limit, 1.0, 0), p
    if kind == "provider":
        assert any(l["provider"] == "hosting" and l["max_connections"] == limit for l in view["limits"]), view["limits"]
    else:
        assert view["default_limits"] == {"max_connections": limit}, view["default_limits"]


A, B = COLD, WARM


def test_a_provider_pushing_back_suspends_that_source_then_it_resumes_at_a_reduced_rate(relays, dns, peers, tmp_path):
    """A Gmail MX (by its host name) answers `421 4.7.28` to the fourth message from one source address: the
    back-off rule suspends that address for Gmail (12 s here), the other address carries the mail meanwhile
    (the refused message too, on its retry), a `suspended` event and gauge say so, and when the suspension
    ends (`resumed`) the address sends to Gmail again at half its rate."""
    peer = peers.aio(FOREIGN)
    peer.on_mail("421 4.7.28 [127.0.0.30] Our system has detected an unusual rate of unsolicited mail. gsmtp",
                 times=1, client=A, after=3)
    gmail_mx = "gmail-smtp-in.l.google.com"
    dns.mx("gm.test", (5, gmail_mx)).a(gmail_mx, FOREIGN)
    events = tmp_path / "events.jsonl"
    shaping_section = {
        # One connection per address: nothing of A's is in flight on another connection when it is suspended.
        "providers": [{"name": "gmail", "max_connections": 1, "max_message_rates": ["40/s"]}],
        "rules": [{"provider": "gmail", "category": "rate-limited", "status": "4.7.28", "action": "suspend",
                   "duration": "12s"}],
        "recovery": "1h",
    }
    r = start_outbound(relays, dns, peers, config=provider_config(
        shaping_section, [source(A), source(B)], events, retry={"first": "1s", "max": "1s", "factor": 1.0}))
    batch = [send(r, [f"user{i}@gm.test"], f"first{i}")[1] for i in range(30)]
    assert wait_until(lambda: any(e["type"] == "suspended" for e in read_events(events)), 30), read_events(events)
    [suspended] = [e for e in read_events(events) if e["type"] == "suspended"]
    assert (suspended["provider"], suspended["source_ip"], suspended["category"]) == ("gmail", A, "rate-limited"), suspended
    assert "4.7.28" in suspended["reply"] and "until" in suspended, suspended
    gauge = wait_until(lambda: series(r, "herald_shaping_suspended"), 6)
    assert gauge == {f'provider="gmail",source="{A}"': 1}, gauge
    view = pair(shaping(r), "gmail", A)
    assert view["share"] == 0 and "suspended_until" in view and "4.7.28" in view["reply"], view
    # The other address carries on: the whole batch is delivered while A is suspended, and A sent three.
    assert wait_until(lambda: all(peer.with_marker(m) for m in batch), 30), [m for m in batch if not peer.with_marker(m)]
    resumed_events = [e for e in read_events(events) if e["type"] == "resumed"]
    assert resumed_events == [], "every message went out before the suspension ended: B carried them"
    from_a = [t for t in peer.accepted() if t.client[0] == A]
    assert len(from_a) == 3, [t.client for t in peer.accepted()]
    assert series(r, "herald_throttled_total") == {'provider="gmail",reason="rate-limited"': 1}
    assert series(r, "herald_delivery_waits_total").get('reason="suspended"', 0) >= 1
    # The suspension ends by itself; A sends to Gmail again, at half its rate (recovery is an hour away).
    assert wait_until(lambda: any(e["type"] == "resumed" for e in read_events(events)), 15), read_events(events)
    [resumed] = [e for e in read_events(events) if e["type"] == "resumed"]
    assert (resumed["provider"], resumed["source_ip"]) == ("gmail", A), resumed
    assert "queue_id" not in resumed and "sender" not in resumed, "about the address, not a message"
    assert wait_until(lambda: series(r, "herald_shaping_suspended") == {}, 5)
    second = [send(r, [f"later{i}@gm.test"], f"second{i}")[1] for i in range(20)]
    assert wait_until(lambda: all(peer.with_marker(m) for m in second), 30)
    again = [t for t in peer.accepted() if t.client[0] == A and any(m.encode() in t.data for m in second)]
    assert again, "the address did not resume"
    view = shaping(r)
    a, b = pair(view, "gmail", A), pair(view, "gmail", B)
    assert (a["share"], a["max_message_rates"], a["action"]) == (0.5, ["20/s"], "suspend"), a
    assert "suspended_until" not in a, a
    assert (b["share"], b["max_message_rates"]) == (1.0, ["40/s"]), b
    deliveries = series(r, "herald_deliveries_total")
    assert deliveries.get('result="deferred"') == 1, deliveries
    assert deliveries.get('result="delivered"') == 50, deliveries


def test_a_suspension_one_relay_applies_holds_on_the_relays_sharing_its_store(relays, dns, peers, store, tmp_path):
    """Relay `a` sends from address A alone and draws Gmail's `421 4.7.28`: A is suspended for Gmail in the
    store. Relay `b`, whose pool has A and B, then sends 12 messages to a Gmail-hosted domain: every one
    leaves from B (without the shared standing about half would pick A), and `b` shows the suspension with
    the reply `a` drew."""
    peer = peers.aio(FOREIGN)
    peer.on_mail("421 4.7.28 [127.0.0.30] Our system has detected an unusual rate of unsolicited mail. gsmtp",
                 times=1, client=A)
    gmail_mx = "gmail-smtp-in.l.google.com"
    dns.mx("gm.test", (5, gmail_mx)).a(gmail_mx, FOREIGN)
    section = {"rules": [{"provider": "gmail", "category": "rate-limited", "action": "suspend", "duration": "10m"}]}

    def edit(pool):
        def apply(cfg):
            provider_config(section, pool)(cfg)
            cfg["store"] = store.section(resync_interval="6h")
        return apply

    a = start_outbound(relays, dns, peers, name="a", config=edit([source(A)]))
    b = start_outbound(relays, dns, peers, name="b", config=edit([source(A), source(B)]))
    send(a, ["first@gm.test"], "first")
    assert wait_until(lambda: (p := pair(shaping(a), "gmail", A)) and "suspended_until" in p, 20), shaping(a)["providers"]
    stored = store.cmd("GET", f"herald:backoff:{{gmail/{A}}}")
    assert stored and json.loads(stored)["action"] == "suspend", stored
    markers = [send(b, [f"user{i}@gm.test"], f"fleet{i}")[1] for i in range(12)]
    assert wait_until(lambda: all(peer.with_marker(m) for m in markers), 30), [m for m in markers if not peer.with_marker(m)]
    by_source = collections.Counter(t.client[0] for t in peer.accepted())
    assert by_source == {B: 12}, by_source
    view = pair(shaping(b), "gmail", A)
    assert view and "suspended_until" in view and "4.7.28" in view["reply"], shaping(b)["providers"]
    assert series(b, "herald_delivery_waits_total").get('reason="suspended"', 0) >= 1
    assert series(b, "herald_throttled_total") == {}, "b drew no reply itself"
