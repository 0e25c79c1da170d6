"""The command line: --version, check-config (names the bad field), hash-password, refusing bad configs."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib

import pytest

from harness.relay import REPO, Raw, Relay, run_cli, standard_config, to_yaml

@pytest.fixture
def good(tmp_path, certs, users) -> dict:
    return standard_config(tmp_path, certs, users=users)


def check(tmp_path, cfg: dict | str) -> subprocess.CompletedProcess:
    p = tmp_path / "check.yaml"
    p.write_text(cfg if isinstance(cfg, str) else to_yaml(cfg))
    return run_cli("check-config", "--config", str(p), timeout=60)


def assert_rejected(r: subprocess.CompletedProcess, path: str | None, *needles: str) -> None:
    """Exit 1 and a first stderr line `error: <path>...` (the spec's `error: <field path>: <what>`) naming needles."""
    assert r.returncode == 1, f"exit {r.returncode}, stdout={r.stdout!r}, stderr={r.stderr!r}"
    assert "config OK" not in r.stdout
    first = (r.stderr.splitlines() or [""])[0]
    assert first.startswith("error: "), f"stderr does not start with 'error: ': {r.stderr!r}"
    if path is not None:
        assert first.startswith(f"error: {path}"), f"first line does not name the field {path!r}: {first!r}"
    for n in needles:
        assert n in first, f"{n!r} not named in the first line of stderr: {first!r}"


def test_version_prints_the_crate_version(relay_binary):
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert version in r.stdout, r.stdout


def test_check_config_accepts_a_valid_config(tmp_path, good):
    r = check(tmp_path, good)
    assert r.returncode == 0, r.stderr
    assert "config OK" in r.stdout, r.stdout


def test_check_config_accepts_a_minimal_config(tmp_path, relay_binary):
    cfg = {
        "hostname": "relay.example.test",
        "spool_dir": str(tmp_path / "spool"),
        "listeners": [{"name": "trusted", "address": "127.0.0.1:2525", "allow_networks": ["127.0.0.0/8"]}],
        "admin": {"address": "127.0.0.1:9090"},
    }
    r = check(tmp_path, cfg)
    assert r.returncode == 0 and "config OK" in r.stdout, (r.stdout, r.stderr)


def test_check_config_accepts_all_limits_with_duration_strings(tmp_path, good):
    good["limits"] = {
        "max_message_size": 1000000, "max_recipients": 10, "max_connections": 10, "max_connections_per_client": 2,
        "max_errors": 3, "max_line_length": 1000, "command_timeout": "30s", "data_timeout": "2m",
    }
    r = check(tmp_path, good)
    assert r.returncode == 0, r.stderr


def _bad(mutate):
    def apply(cfg):
        cfg = copy.deepcopy(cfg)
        mutate(cfg)
        return cfg
    return apply


BAD_CONFIGS = {
    # name: (mutation, field path the first stderr line must start with, other strings it must contain)
    "unknown-top-level-key": (_bad(lambda c: c.update(bogus_key=1)), None, ["bogus_key"]),
    "unknown-listener-key": (_bad(lambda c: c["listeners"][0].update(colour="red")), "listeners[0]", ["colour"]),
    "unknown-limits-key": (_bad(lambda c: c.update(limits={"max_bananas": 3})), "limits", ["max_bananas"]),
    "bad-tls-mode": (_bad(lambda c: c["listeners"][2].update(tls="sometimes")), "listeners[2].tls", []),
    "bad-auth-mode": (_bad(lambda c: c["listeners"][1].update(auth="maybe")), "listeners[1].auth", []),
    "bad-address": (_bad(lambda c: c["listeners"][1].update(address="not-an-address")), "listeners[1].address", []),
    "bad-port": (_bad(lambda c: c["listeners"][0].update(address="127.0.0.1:99999")), "listeners[0].address", []),
    "bad-cidr": (_bad(lambda c: c["listeners"][0].update(allow_networks=["10.0.0.0/33"])), "listeners[0].allow_networks", []),
    "bad-cidr-text": (
        _bad(lambda c: c["listeners"][0].update(allow_networks=["127.0.0.0/8", "localnet"])), "listeners[0].allow_networks", [],
    ),
    "bad-password-hash": (_bad(lambda c: c["users"][0].update(password_hash="hunter2")), "users[0].password_hash", []),
    "bcrypt-password-hash": (
        _bad(lambda c: c["users"][1].update(password_hash="$2b$12$abcdefghijklmnopqrstuuJ8d6x5b0fIYq0H2mJ7nS9Q9Qm1Yl2zS")),
        "users[1].password_hash", [],
    ),
    "tls-listener-without-tls-section": (_bad(lambda c: c.pop("tls")), "tls", ["submission"]),
    "duplicate-listener-name": (_bad(lambda c: c["listeners"][1].update(name="trusted")), "listeners", ["trusted"]),
    "bad-duration": (_bad(lambda c: c.update(limits={"command_timeout": "forever"})), "limits.command_timeout", []),
    "negative-size": (_bad(lambda c: c.update(limits={"max_message_size": -1})), "limits.max_message_size", []),
    "bad-admin-address": (_bad(lambda c: c["admin"].update(address="nowhere")), "admin.address", []),
    "listeners-not-a-list": (_bad(lambda c: c.update(listeners=Raw('"trusted"'))), "listeners", []),
    "smarthost-credentials-in-clear": (
        _bad(lambda c: c.update(delivery={"smarthost": {
            "host": "relay.example.test", "tls": "none", "username": "u", "password_file": "/p"}})),
        "delivery.smarthost.tls", ["never in clear"],
    ),
    "smarthost-ca-file-without-tls": (
        _bad(lambda c: c.update(delivery={"smarthost": {"host": "relay.example.test", "ca_file": "/ca.crt"}})),
        "delivery.smarthost.ca_file", [],
    ),
    "smarthost-host-not-a-name": (
        _bad(lambda c: c.update(delivery={"smarthost": {"host": "relay_1", "tls": "starttls"}})),
        "delivery.smarthost.host", ["relay_1"],
    ),
    "bad-trusted-sender": (
        _bad(lambda c: c["listeners"][0].update(trusted_senders=["example.test", "not a domain"])),
        "listeners[0].trusted_senders[1]", ["not a domain name"],
    ),
    "trusted-senders-neither-any-nor-list": (
        _bad(lambda c: c["listeners"][0].update(trusted_senders="anyone")), "listeners[0].trusted_senders", ["any"],
    ),
    "suppression-on-one-full-reply": (
        _bad(lambda c: c.update(suppression={"mailbox_full": {"replies": 1}})),
        "suppression.mailbox_full.replies", ["single full-mailbox reply"],
    ),
    "suppression-ttl-neither-duration-nor-never": (
        _bad(lambda c: c.update(suppression={"ttl": {"complaint": "forever"}})),
        "suppression.ttl.complaint", ["never"],
    ),
    "shaping-rule-bad-status": (
        _bad(lambda c: c.update(shaping={"rules": [
            {"provider": "gmail", "category": "rate-limited", "status": "4.7.28.1", "action": "suspend", "duration": "1m"}]})),
        "shaping.rules[0].status", ["4.7.28.1"],
    ),
    "shaping-rule-unknown-provider": (
        _bad(lambda c: c.update(shaping={"rules": [{"provider": "gmial", "category": "rate-limited", "action": "halve"}]})),
        "shaping.rules[0].provider", ["gmial", "gmail"],
    ),
    "shaping-suspend-without-duration": (
        _bad(lambda c: c.update(shaping={"rules": [{"category": "rate-limited", "action": "suspend"}]})),
        "shaping.rules[0].duration", [],
    ),
    "shaping-provider-mx-wildcard": (
        _bad(lambda c: c.update(shaping={"providers": [{"name": "esp", "mx": ["*.mx.example.net"]}]})),
        "shaping.providers[0].mx[0]", ["*.mx.example.net"],
    ),
    "shaping-provider-connections-0": (
        _bad(lambda c: c.update(shaping={"default": {"max_connections": 0}})),
        "shaping.default.max_connections", [],
    ),
    "trusted-senders-on-submission": (
        _bad(lambda c: c["listeners"][2].update(trusted_senders="any")), "listeners[2].trusted_senders",
        ["allowed_domains"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_check_config_rejects_a_bad_config_naming_the_field(tmp_path, good, name):
    mutate, path, needles = BAD_CONFIGS[name]
    assert_rejected(check(tmp_path, mutate(good)), path, *needles)


def test_check_config_rejects_yaml_that_does_not_parse(tmp_path, relay_binary):
    r = check(tmp_path, "hostname: [unclosed\nlisteners: {\n")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: "), r.stderr


def test_check_config_rejects_a_missing_file(tmp_path, relay_binary):
    r = run_cli("check-config", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "nope.yaml" in r.stderr, r.stderr


def test_relay_refuses_to_start_with_a_bad_config(tmp_path, good):
    bad = copy.deepcopy(good)
    bad["listeners"][0]["tls"] = "sometimes"
    relay = Relay(tmp_path / "bad", bad, label="bad")
    relay.start(wait=False)
    try:
        code = relay.proc.wait(timeout=30)
    finally:
        relay.kill()
    assert code != 0
    assert "listeners[0].tls" in relay.log_text(), relay.log_tail()


def test_relay_refuses_to_start_with_a_smarthost_ca_file_that_holds_no_certificate(tmp_path, good):
    cfg = copy.deepcopy(good)
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate\n")
    cfg["delivery"] = {"smarthost": {"host": "relay.example.test", "tls": "starttls", "ca_file": str(ca)}}
    relay = Relay(tmp_path / "bad-ca", cfg, label="bad-ca")
    relay.start(wait=False)
    try:
        code = relay.proc.wait(timeout=30)
    finally:
        relay.kill()
    assert code != 0
    assert f"delivery.smarthost.ca_file {ca}: no CERTIFICATE block" in relay.log_text(), relay.log_tail()


def test_hash_password_prints_a_salted_argon2id_phc_string(relay_binary):
    r1 = run_cli("hash-password", stdin="correct horse\n", timeout=120)
    r2 = run_cli("hash-password", stdin="correct horse\n", timeout=120)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr)
    h1, h2 = r1.stdout.strip().splitlines()[-1], r2.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+", h1), h1
    assert h1 != h2, "same hash twice: no salt?"
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:
        return
    if hasattr(Argon2id, "verify_phc_encoded"):
        Argon2id.verify_phc_encoded(b"correct horse", h1)  # raises InvalidKey on mismatch
        with pytest.raises(Exception):
            Argon2id.verify_phc_encoded(b"correct horsf", h1)


def test_hash_password_output_is_accepted_by_check_config(tmp_path, good, relay_binary):
    r = run_cli("hash-password", stdin="another secret\n", timeout=120)
    h = r.stdout.strip().splitlines()[-1]
    good["users"][0]["password_hash"] = h
    c = check(tmp_path, good)
    assert c.returncode == 0, c.stderr


def test_log_format_json_writes_one_json_object_per_line(relays):
    r = relays.start("jsonlog", extra_args=["--log-format", "json"])
    lines = [l for l in r.log_text().splitlines() if l.strip() and not l.startswith("=====")]
    assert lines, r.log_tail()
    records = []
    for l in lines:
        try:
            records.append(json.loads(l))
        except ValueError:
            raise AssertionError(f"not JSON: {l!r}")
    assert sum("listening" in json.dumps(rec) for rec in records) >= len(r.config["listeners"]), lines
