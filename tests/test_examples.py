"""The examples' mail path, run for real on loopback (test_operator.py applies the same files to an API server).

- The top README's first-use flow with examples/local/relay.yaml, command for command: an aiosmtpd sink,
  the relay with that config (only its ports and spool moved to the test's), swaks, curl of /queue and
  /metrics; then the sink stopped, a message deferred, the sink back and `POST /queue/flush`. The sink must
  print both messages.
- app-deployment.yaml: its container's program, with its environment, submits through a relay that has the
  SmtpRelay example's submission listener (STARTTLS, AUTH) and user, and the password of app-password.yaml.
- sidecar.yaml: its relay config passes `check-config` as it is; then, with only addresses and paths moved
  to the test's (ports, spool, password and CA files, the smarthost's address), a sidecar relay takes the app
  container's message on loopback and hands it to that relay as its smarthost, having verified the relay's
  certificate against the CA file it mounts from the relay's certificate Secret.

The "relay Service" is a herald-relay with the standard test config whose users are the SmtpRelay
example's, serving a certificate made as certificate.yaml's self-signed Issuer makes it (its names, its own
issuer, so that its Secret's ca.crt is the certificate itself); its delivery resolver is a dead port, so
what it accepts stays in its queue to be looked at.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess

import pytest
import yaml

from harness.certs import make_self_signed
from harness.outbound import wait_until
from harness.peers import wait_listening
from harness.relay import REPO, addr, free_port, hash_password, run_cli, split_addr
from harness.tools import require, swaks_queue_id

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
def relay_certificate(tmp_path) -> dict:
    """The relay Service's certificate as certificate.yaml has cert-manager make it: the Certificate's names
    (and 127.0.0.1, where the test's relay listens), signed by its own key (a selfSigned Issuer), so that
    the Secret's ca.crt (here "ca") is the certificate itself."""
    issuer = one("certificate.yaml", "Issuer")
    assert "selfSigned" in issuer["spec"], issuer
    cert = one("certificate.yaml", "Certificate")["spec"]
    assert cert["issuerRef"]["name"] == issuer["metadata"]["name"], cert["issuerRef"]
    assert cert["secretName"] == one("smtp-relay.yaml", "SmtpRelay")["spec"]["tlsSecretRef"]["name"]
    return make_self_signed(tmp_path / "relay-tls", [*cert["dnsNames"], "127.0.0.1"])


@pytest.fixture
def relay_service(relays, relay_certificate):
    """A relay standing in for the SmtpRelay example's Service: its submission listener and its users, with
    the example password, serving the example's certificate."""
    spec = one("smtp-relay.yaml", "SmtpRelay")["spec"]
    listener = next(l for l in spec["listeners"] if l.get("auth") == "required")
    assert listener["tls"] == "starttls", listener
    password = hash_password(example_password())
    users = [{"username": u["name"], "password_hash": password, "allowed_domains": u["allowedDomains"]}
             for u in spec["users"]]
    cfg = relays.config("relay-service", users=users)
    cfg["tls"] = {"cert_file": str(relay_certificate["cert"]), "key_file": str(relay_certificate["key"])}
    return relays.start("relay-service", config=cfg)


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


def test_the_sidecar_relay_hands_the_apps_mail_to_the_relay_service(relay_service, relay_certificate, relays, tmp_path):
    cm = one("sidecar.yaml", "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["relay.yaml"])
    pod = one("sidecar.yaml", "Deployment")["spec"]["template"]["spec"]
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always", "the relay must be a native sidecar"
    # The Deployment mounts what the config names: the config itself, the smarthost password and CA, the spool.
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert sidecar["args"][:2] == ["--config", "/etc/herald/config/relay.yaml"]
    assert volumes[mounts["/etc/herald/config"]]["configMap"]["name"] == cm["metadata"]["name"]
    smarthost = cfg["delivery"]["smarthost"]
    password_dir, password_file = os.path.split(smarthost["password_file"])
    secret = volumes[mounts[password_dir]]["secret"]
    assert secret["secretName"] == one("app-password.yaml", "Secret")["metadata"]["name"]
    assert [i["path"] for i in secret["items"]] == [password_file]
    # The CA is the ca.crt of the relay's certificate Secret, and nothing else of it (not the relay's key).
    ca_dir, ca_file = os.path.split(smarthost["ca_file"])
    ca_secret = volumes[mounts[ca_dir]]["secret"]
    assert ca_secret["secretName"] == one("certificate.yaml", "Certificate")["spec"]["secretName"], ca_secret
    assert ca_secret["items"] == [{"key": "ca.crt", "path": ca_file}], ca_secret["items"]
    assert cfg["spool_dir"] in mounts and "emptyDir" in volumes[mounts[cfg["spool_dir"]]]
    # The smarthost is the SmtpRelay example's Service, on its STARTTLS + AUTH listener, as its user, by a
    # name its certificate holds.
    spec = one("smtp-relay.yaml", "SmtpRelay")
    assert smarthost["host"] == spec["metadata"]["name"]
    assert smarthost["host"] in one("certificate.yaml", "Certificate")["spec"]["dnsNames"]
    assert any(l["port"] == smarthost["port"] and l.get("auth") == "required" and l["tls"] == smarthost["tls"]
               for l in spec["spec"]["listeners"]), (smarthost, spec["spec"]["listeners"])
    assert smarthost["username"] in [u["name"] for u in spec["spec"]["users"]]

    # Moved to the test's addresses and paths; nothing else changes.
    listener = cfg["listeners"][0]
    _, example_port = split_addr(listener["address"])
    listener["address"] = addr("127.0.0.1", free_port())
    cfg["metrics"]["address"] = addr("127.0.0.1", free_port())
    cfg["admin"]["address"] = addr("127.0.0.1", free_port())
    cfg["spool_dir"] = str(tmp_path / "sidecar-spool")
    (tmp_path / "password").write_text(example_password() + "\n")
    smarthost["password_file"] = str(tmp_path / "password")
    smarthost["ca_file"] = str(relay_certificate["ca"])  # what cert-manager puts in the Secret's ca.crt
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


# ---------------------------------------------------------------------------------------------------------
# The README's first-use flow: examples/local/relay.yaml and a sink on this machine

# The commands as the top README prints them; the test runs each with the addresses moved to free ports.
README_SINK = "python3 -m aiosmtpd -n -c aiosmtpd.handlers.Debugging -l 127.0.0.1:2526"
README_RELAY = "cargo run -p herald-relay -- --config examples/local/relay.yaml"
README_SEND = "swaks --server 127.0.0.1:2525 --from app@example.test --to someone@example.net"
README_QUEUE = "curl -s 127.0.0.1:9091/queue"
README_METRICS = "curl -s 127.0.0.1:9090/metrics | grep herald_deliveries_total"
README_FLUSH = "curl -s -X POST 127.0.0.1:9091/queue/flush"
LOCAL_CONFIG = EXAMPLES / "local" / "relay.yaml"


class Sink:
    """The README's sink command, run as printed (on another port) with its output in a file; stopped by PID
    with SIGINT, as Ctrl-C stops it in a terminal."""

    def __init__(self, command: str, log):
        self.command, self.log = command, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sink":
        host, port = split_addr(shlex.split(self.command)[-1])
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(shlex.split(self.command), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)
        wait_listening(host, port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def messages(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return re.findall(r"-+ MESSAGE FOLLOWS -+\n(.*?)\n-+ END MESSAGE -+", text, re.S)


@pytest.fixture
def sinks(tmp_path):
    started: list[Sink] = []

    def start(command: str) -> Sink:
        s = Sink(command, tmp_path / "sink.log").start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def moved(command: str, ports: dict[str, str]) -> list[str]:
    for old, new in ports.items():
        command = command.replace(old, new)
    return shlex.split(command)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          start_new_session=True)


def test_the_readme_first_use_flow_ends_in_a_delivered_message_the_sink_prints(relays, sinks, tmp_path):
    readme = (REPO / "README.md").read_text()
    for command in (README_SINK, README_RELAY, README_SEND, README_QUEUE, README_METRICS, README_FLUSH):
        assert command in readme, f"the README no longer runs {command!r}: update it and this test together"
    for tool in ("swaks", "curl"):
        require(tool)

    # The example config as it is, but for the addresses and the spool: free ports, the test's directory.
    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    assert run_cli("check-config", "--config", str(LOCAL_CONFIG)).returncode == 0
    smtp, metrics, admin, sink = (f"127.0.0.1:{free_port()}" for _ in range(4))
    ports = {"127.0.0.1:2525": smtp, "127.0.0.1:9090": metrics, "127.0.0.1:9091": admin, "127.0.0.1:2526": sink}
    assert [l["address"] for l in cfg["listeners"]] == ["127.0.0.1:2525"]
    assert cfg["metrics"]["address"] == "127.0.0.1:9090" and cfg["admin"] == {"address": "127.0.0.1:9091"}
    assert cfg["delivery"]["smarthost"] == {"host": "127.0.0.1", "port": 2526, "tls": "none"}, cfg["delivery"]
    cfg["listeners"][0]["address"] = smtp
    cfg["metrics"]["address"] = metrics
    cfg["admin"]["address"] = admin
    cfg["delivery"]["smarthost"]["port"] = split_addr(sink)[1]
    cfg["spool_dir"] = str(tmp_path / "herald-spool")
    out = sinks(README_SINK.replace("127.0.0.1:2526", sink))
    relay = relays.start("local", config=cfg)

    # swaks to the relay; the sink prints the message.
    sent = run(moved(README_SEND, ports))
    qid = swaks_queue_id(sent)
    assert sent.returncode == 0 and qid, f"swaks:\n{sent.stdout}{sent.stderr}"
    got = wait_until(lambda: [m for m in out.messages() if f"id {qid}" in m], timeout=30, step=0.1)
    assert got, f"the sink never printed message {qid}:\n{out.log.read_text()}\n{relay.log_tail(30)}"
    assert "From: app@example.test" in got[0] and "To: someone@example.net" in got[0], got[0]

    # Nothing left in the queue; one delivery in the metrics.
    queue = json.loads(run(moved(README_QUEUE, ports)).stdout)
    assert queue == {"total": 0, "messages": []}, queue
    metrics = run(["bash", "-c", README_METRICS.replace("127.0.0.1:9090", metrics)]).stdout
    assert 'herald_deliveries_total{result="delivered"} 1' in metrics, metrics

    # The sink stopped (Ctrl-C): the next message waits in the queue, deferred, and says why.
    out.stop()
    sent = run(moved(README_SEND, ports))
    qid = swaks_queue_id(sent)
    assert sent.returncode == 0 and qid, f"swaks:\n{sent.stdout}{sent.stderr}"

    def deferred():
        q = json.loads(run(moved(README_QUEUE, ports)).stdout)
        return [m for m in q["messages"] if m["id"] == qid and m["status"][0]["state"] == "deferred"]

    waiting = wait_until(deferred, timeout=30, step=0.2)
    assert waiting, f"message {qid} was not deferred:\n{relay.log_tail(30)}"
    assert "Connection refused" in waiting[0]["status"][0]["last_reply"], waiting

    # The sink back and the queue flushed: the message arrives now, not at its next attempt a minute away.
    out.start()
    flushed = run(moved(README_FLUSH, ports))
    assert json.loads(flushed.stdout) == {"flushed": "all"}, flushed.stdout
    got = wait_until(lambda: [m for m in out.messages() if f"id {qid}" in m], timeout=30, step=0.1)
    assert got, f"the flushed message {qid} never reached the sink:\n{out.log.read_text()}\n{relay.log_tail(30)}"
    assert wait_until(lambda: json.loads(run(moved(README_QUEUE, ports)).stdout)["total"] == 0, timeout=30, step=0.2)
