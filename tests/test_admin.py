"""The admin API and its client: a bearer token guards the queue and the suppression list, the metrics port
serves nothing but metrics and probes, lists come a page at a time, and `herald-relay admin` does from a shell
what the API does (it reads the address and the token from the relay's config).

Every relay the harness starts runs as a pod does: `metrics` and `admin` on separate ports, a token file."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any
import smtplib
import urllib.error
import urllib.request

import pytest
import yaml

from harness.outbound import wait_until
from harness.relay import relay_bin, run_cli


def request(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"raw": body.decode(errors="replace")}
        return e.code, e.headers, doc


def queue_some(r, count: int, tag: str) -> None:
    """`count` messages to a foreign domain: the harness's DNS answers nothing, so they stay queued."""
    host, port = r.listener("trusted")
    with smtplib.SMTP(host, port, timeout=30) as s:
        for i in range(count):
            s.sendmail("a@example.test", [f"{tag}-{i}@foreign.test"],
                       f"From: a@example.test\r\nSubject: {tag} {i}\r\n\r\nbody\r\n")


def cli(r, *args: str, token_file: str | None = None):
    extra = ["--token-file", token_file] if token_file else []
    return run_cli("--config", str(r.config_path), "admin", *extra, *args)


def test_the_queue_api_needs_the_token(relays):
    r = relays.start("admin-token")
    token = r.admin_token()
    assert token, "the harness runs every relay with admin.token_file"
    url = r.admin_base + "/queue"

    status, headers, doc = request(url)
    assert status == 401, (status, doc)
    assert headers.get("WWW-Authenticate", "").startswith("Bearer"), headers
    assert "Bearer" in doc["error"], doc
    for wrong in ("", token[:-1], token + "x", "Basic " + token):
        assert request(url, token=wrong)[0] == 401, wrong
    for method, path in (("DELETE", "/queue/0000000000000001"), ("POST", "/queue/flush"),
                         ("PUT", "/suppressions/x@y.test"), ("GET", "/suppressions"),
                         ("GET", "/suppressions/x@y.test"), ("GET", "/suppressions/streaks"), ("GET", "/counters")):
        assert request(r.admin_base + path, method)[0] == 401, (method, path)
    status, _, doc = request(url, token=token)
    assert status == 200 and doc["messages"] == [], doc

    # The token is read at each request: a rotated Secret applies without a restart.
    token_file = r.config["admin"]["token_file"]
    with open(token_file, "w") as f:
        f.write("rotated-token-0123456789\n")
    assert request(url, token=token)[0] == 401
    assert request(url, token="rotated-token-0123456789")[0] == 200


def test_metrics_and_admin_are_apart(relays):
    r = relays.start("admin-apart")
    for path in ("/metrics", "/healthz", "/readyz"):
        assert urllib.request.urlopen(r.metrics_base + path, timeout=10).status == 200, path
    # The metrics port has no queue API, and the admin port has no metrics: neither leaks the other.
    for path in ("/queue", "/suppressions", "/queue/flush"):
        assert request(r.metrics_base + path)[0] == 404, path
    assert request(r.admin_base + "/metrics", token=r.admin_token())[0] == 404


def test_lists_are_paged_with_a_cursor(relays):
    r = relays.start("admin-pages")
    queue_some(r, 7, "paged")
    assert wait_until(lambda: len(r.queue()) == 7, timeout=20, step=0.2), r.queue()
    token = r.admin_token()
    seen, after, pages = [], None, 0
    for _ in range(10):
        url = r.admin_base + "/queue?limit=3" + (f"&after={after}" if after else "")
        status, _, page = request(url, token=token)
        assert status == 200, page
        assert page["total"] == 7 and len(page["messages"]) <= 3, page
        seen += [m["id"] for m in page["messages"]]
        pages += 1
        after = page.get("next")
        if not after:
            break
    assert len(seen) == 7 and len(set(seen)) == 7 and seen == sorted(seen), seen
    assert pages == 3, pages

    for bad in ("limit=0", "limit=1001", "after=nothex"):
        status, _, doc = request(r.admin_base + "/queue?" + bad, token=token)
        assert status == 400 and doc["error"], (bad, doc)

    for i in range(5):
        assert r.http("PUT", f"/suppressions/s{i}@x.test", {"reason": "test"})[0] == 200
    status, _, first = request(r.admin_base + "/suppressions?limit=2", token=token)
    assert status == 200 and [e["address"] for e in first["suppressions"]] == ["s0@x.test", "s1@x.test"], first
    status, _, rest = request(r.admin_base + f"/suppressions?limit=10&after={first['next']}", token=token)
    assert [e["address"] for e in rest["suppressions"]] == ["s2@x.test", "s3@x.test", "s4@x.test"], rest
    assert "next" not in rest, rest


def test_the_admin_command_reads_address_and_token_from_the_config(relays):
    r = relays.start("admin-cli")
    queue_some(r, 2, "cli")
    assert wait_until(lambda: len(r.queue()) == 2, timeout=20, step=0.2)

    listed = cli(r, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert page["total"] == 2, page
    first, second = (m["id"] for m in page["messages"])

    shown = cli(r, "queue", "show", first)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == first, shown.stdout + shown.stderr
    assert cli(r, "queue", "flush", first).returncode == 0
    assert json.loads(cli(r, "queue", "flush").stdout) == {"flushed": "all"}
    assert cli(r, "queue", "delete", first).returncode == 0
    assert [m["id"] for m in r.queue()] == [second]

    missing = cli(r, "queue", "show", first)
    assert missing.returncode != 0 and "404" in missing.stderr and first in missing.stderr, missing.stderr
    bad = cli(r, "queue", "show", "zz")
    assert bad.returncode != 0 and "400" in bad.stderr, bad.stderr

    # Addresses with characters that mean something in a URL arrive intact.
    odd = "a+b/c%d@x.test"
    added = cli(r, "suppressions", "add", odd, "--reason", "asked to stop")
    assert added.returncode == 0, added.stderr
    listed = json.loads(cli(r, "suppressions", "list").stdout)["suppressions"]
    assert [(e["address"], e["reason"]) for e in listed] == [(odd, "asked to stop")], listed
    assert listed[0]["category"] == "manual" and listed[0]["expires_at"] is None, listed
    assert cli(r, "suppressions", "remove", odd).returncode == 0
    assert json.loads(cli(r, "suppressions", "list").stdout)["suppressions"] == []

    # --ttl gives an expiry; show and streaks read one address and the mailbox-full streaks.
    assert cli(r, "suppressions", "add", "brief@x.test", "--ttl", "30d").returncode == 0
    shown = json.loads(cli(r, "suppressions", "show", "brief@x.test").stdout)
    assert shown["suppression"]["expires_at"] > shown["suppression"]["added_at"], shown
    assert shown["streak"] is None, shown
    assert json.loads(cli(r, "suppressions", "streaks", "--limit", "5").stdout) == {"streaks": []}
    bad = cli(r, "suppressions", "add", "brief@x.test", "--ttl", "soon")
    assert bad.returncode != 0 and "400" in bad.stderr and "ttl" in bad.stderr, bad.stderr

    # Counters: nothing was delivered, so today has none; another day is asked for with --day.
    today = json.loads(cli(r, "counters").stdout)
    assert today["sources"] == {} and today["domains"] == {} and today["day"] > 20000, today
    assert json.loads(cli(r, "counters", "--day", "3").stdout) == {"day": 3, "sources": {}, "domains": {}}
    assert request(r.admin_base + "/counters?day=soon", token=r.admin_token())[0] == 400


def test_the_admin_command_with_a_wrong_token_is_refused(relays, tmp_path):
    r = relays.start("admin-cli-refused")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    refused = cli(r, "queue", "list", token_file=str(wrong))
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
    missing = cli(r, "queue", "list", token_file=str(tmp_path / "absent"))
    assert missing.returncode != 0 and "token file" in missing.stderr, missing.stderr


@pytest.mark.parametrize("what", ["admin", "metrics"])
def test_an_endpoint_cannot_share_an_smtp_port(relays, tmp_path, what):
    cfg = relays.config("admin-ports")
    cfg[what] = {**cfg[what], "address": cfg["listeners"][0]["address"]}
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("check-config", "--config", str(path))
    assert out.returncode != 0 and f"{what}.address:" in out.stderr, out.stderr


def test_the_admin_command_finds_the_config_through_herald_config(relays):
    """In a pod the operator sets HERALD_CONFIG, so `kubectl exec <pod> -- herald-relay admin ...` needs no
    --config."""
    r = relays.start("admin-env")
    out = subprocess.run([str(relay_bin()), "admin", "queue", "list"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HERALD_CONFIG": str(r.config_path)}, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and json.loads(out.stdout)["total"] == 0, out.stderr
