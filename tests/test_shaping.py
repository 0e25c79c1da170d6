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
