"""The examples' mail path, run for real on loopback (test_operator.py applies the same files to an API server).

- app-deployment.yaml: its container's program, with its environment, submits through a relay that has the
  SmtpRelay example's submission listener (STARTTLS, AUTH) and user, and the password of app-password.yaml.
- sidecar.yaml: its relay config passes `check-config` as it is; then, with only addresses and paths moved
  to the test's (ports, spool, password file, the smarthost's address), a sidecar relay takes the app
  container's message on loopback and hands it to that relay as its smarthost.

The "relay Service" is a herald-relay with the standard test config whose users are the SmtpRelay
example's; its delivery resolver is a dead port, so what it accepts stays in its queue to be looked at.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from harness.outbound import wait_until
from harness.relay import REPO, addr, free_port, hash_password, run_cli, split_addr

EXAMPLES = REPO / "examples"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    got = [d for d in docs(name) if d["kind"] == kind]
    assert len(got) == 1, f"{name}: {len(got)} {kind}"
    return got[0]


def example_password() -> str:
    return one("app-password.yaml", "Secret")["stringData"]["password"]


@pytest.fixture
def relay_service(relays):
    """A relay standing in for the SmtpRelay example's Service: its submission listener and its users, with
    the example password."""
    spec = one("smtp-relay.yaml", "SmtpRelay")["spec"]
    listener = next(l for l in spec["listeners"] if l.get("auth") == "required")
    assert listener["tls"] == "starttls", listener
    password = hash_password(example_password())
    users = [{"username": u["name"], "password_hash": password, "allowed_domains": u["allowedDomains"]}
             for u in spec["users"]]
    return relays.start("relay-service", users=users)


def queued_from(relay, sender: str) -> list[dict]:
    status, body = relay.http("GET", "/queue")
    assert status == 200, body
    return [m for m in json.loads(body)["messages"] if m["sender"] == sender]


def container_program(container: dict) -> list[str]:
    assert container["command"][:2] == ["python3", "-c"], container["command"]
    return ["python3", "-c", *container["args"]]


def test_the_example_app_sends_through_the_relay_with_starttls_and_auth(relay_service, tmp_path):
    pod = one("app-deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    app = pod["containers"][0]
    env = {e["name"]: e["value"] for e in app["env"] if "value" in e}
    secret = next(e for e in app["env"] if e["name"] == "SMTP_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert secret["name"] == one("app-password.yaml", "Secret")["metadata"]["name"], secret
    host, port = relay_service.listener("submission")
    assert env["SMTP_PORT"] == "587" and env["SMTP_HOST"] == one("smtp-relay.yaml", "SmtpRelay")["metadata"]["name"]
    # Where the Service is in a cluster, the test relay's submission port is here; and it sends once.
    env.update(SMTP_HOST=host, SMTP_PORT=str(port), SMTP_PASSWORD=example_password(), SEND_EVERY_SECONDS="0")
    r = subprocess.run(container_program(app), env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "sent to" in r.stdout, f"{r.stdout}{r.stderr}\n{relay_service.log_tail(30)}"
    got = queued_from(relay_service, env["MAIL_FROM"])
    assert len(got) == 1 and got[0]["recipients"] == [env["MAIL_TO"]] and got[0]["listener"] == "submission", got


def test_the_sidecar_config_is_valid_as_it_is(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(one("sidecar.yaml", "ConfigMap")["data"]["relay.yaml"])
    r = run_cli("check-config", "--config", str(config))
    assert r.returncode == 0, r.stderr


def test_the_sidecar_relay_hands_the_apps_mail_to_the_relay_service(relay_service, relays, tmp_path):
    cm = one("sidecar.yaml", "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["relay.yaml"])
    pod = one("sidecar.yaml", "Deployment")["spec"]["template"]["spec"]
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always", "the relay must be a native sidecar"
    # The Deployment mounts what the config names: the config itself, the smarthost password, the spool.
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert sidecar["args"][:2] == ["--config", "/etc/herald/config/relay.yaml"]
    assert volumes[mounts["/etc/herald/config"]]["configMap"]["name"] == cm["metadata"]["name"]
    smarthost = cfg["delivery"]["smarthost"]
    password_dir, password_file = os.path.split(smarthost["password_file"])
    secret = volumes[mounts[password_dir]]["secret"]
    assert secret["secretName"] == one("app-password.yaml", "Secret")["metadata"]["name"]
    assert [i["path"] for i in secret["items"]] == [password_file]
    assert cfg["spool_dir"] in mounts and "emptyDir" in volumes[mounts[cfg["spool_dir"]]]
    # The smarthost is the SmtpRelay example's Service, on its STARTTLS + AUTH listener, as its user.
    spec = one("smtp-relay.yaml", "SmtpRelay")
    assert smarthost["host"] == spec["metadata"]["name"]
    assert any(l["port"] == smarthost["port"] and l.get("auth") == "required" and l["tls"] == smarthost["tls"]
               for l in spec["spec"]["listeners"]), (smarthost, spec["spec"]["listeners"])
    assert smarthost["username"] in [u["name"] for u in spec["spec"]["users"]]

    # Moved to the test's addresses and paths; nothing else changes.
    listener = cfg["listeners"][0]
    _, example_port = split_addr(listener["address"])
    listener["address"] = addr("127.0.0.1", free_port())
    cfg["admin"]["address"] = addr("127.0.0.1", free_port())
    cfg["spool_dir"] = str(tmp_path / "sidecar-spool")
    (tmp_path / "password").write_text(example_password() + "\n")
    smarthost["password_file"] = str(tmp_path / "password")
    host, port = relay_service.listener("submission")
    smarthost.update(host=host, port=port)
    side = relays.start("sidecar", config=cfg)

    app = pod["containers"][0]
    program = container_program(app)
    program[-1] = program[-1].replace(f'"127.0.0.1", {example_port}', f'"127.0.0.1", {split_addr(listener["address"])[1]}')
    program[-1] = program[-1].replace("time.sleep(10**9)", "")
    r = subprocess.run(program, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "handed to the sidecar" in r.stdout, f"{r.stdout}{r.stderr}\n{side.log_tail(30)}"
    got = wait_until(lambda: queued_from(relay_service, "app@example.com"), timeout=30, step=0.2)
    assert got and got[0]["listener"] == "submission", (
        f"the relay Service never got the message: {got}\nsidecar:\n{side.log_tail(40)}\nrelay:\n{relay_service.log_tail(20)}")
    assert wait_until(lambda: not queued_from(side, "app@example.com"), timeout=30, step=0.2), "still queued in the sidecar"
