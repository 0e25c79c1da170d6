"""The operator against a real kube-apiserver (tests/cluster/run.sh provides one and sets KUBECONFIG):
CRDs apply, bad objects are refused by the schema naming the field, a SendingDomain + SmtpRelay become the
DKIM Secret, config Secret, StatefulSet, Services and PDB with owner references, status lists the DNS
records and follows the loopback DNS server as records appear and disappear, and spec edits flow through."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from harness.kube import (
    REPO, Namespace, Operator, get_json, install_crds, kubeconfig, kubectl, kubectl_bin, publish_record, secret_data,
    wait_for,
)
from harness.relay import relay_bin

pytestmark = pytest.mark.skipif(
    not (kubeconfig() and kubectl_bin()),
    reason="needs a test control plane: run under tests/cluster/run.sh (CI always does)",
)


@pytest.fixture(scope="module")
def crds():
    r = kubectl("apply", "--server-side", "--field-manager=test", "-f", str(REPO / "crds" / "herald.dev.yaml"))
    for crd in ("sendingdomains.herald.dev", "smtprelays.herald.dev", "ippools.herald.dev"):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    return r


@pytest.fixture
def ns(crds):
    n = Namespace()
    yield n
    n.delete()


@pytest.fixture
def operator(tmp_path, dns, ns):
    op = Operator(tmp_path, dns.address, ns.name)
    yield op
    op.stop()


RELAY = """
apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: {{ name: relay }}
spec:
  replicas: {replicas}
  listeners:
    - {{ name: submission, port: 587, tls: starttls, auth: required }}
    - {{ name: trusted, port: 2525, allowNetworks: [10.0.0.0/8], trustedSenders: [example.test] }}
  tlsSecretRef: {{ name: relay-tls }}
  users:
    - name: app
      passwordSecretRef: {{ name: app-password }}
      allowedDomains: [example.test]
"""

DOMAIN = """
apiVersion: herald.dev/v1alpha1
kind: SendingDomain
metadata: { name: example }
spec:
  domain: example.test
  relayRef: { name: relay }
  dkim: { selector: herald1, algorithm: ed25519 }
  dmarc: { policy: quarantine, reportAddress: dmarc@example.test }
"""

PASSWORD = """
apiVersion: v1
kind: Secret
metadata: { name: app-password }
stringData: { password: s3cret }
"""


def test_crds_are_established_and_list_in_kubectl_get(ns):
    r = kubectl("get", "sendingdomains,smtprelays,ippools", "-n", ns.name)
    assert r.returncode == 0


@pytest.mark.parametrize(
    "manifest, field",
    [
        ("kind: SendingDomain\nmetadata: {name: bad}\nspec: {domain: 'Not A Domain', relayRef: {name: r}}", "spec.domain"),
        ("kind: SendingDomain\nmetadata: {name: bad}\nspec: {domain: a.test}", "spec.relayRef"),
        ("kind: SendingDomain\nmetadata: {name: bad}\nspec: {domain: a.test, relayRef: {name: r}, dkim: {algorithm: dsa}}", "spec.dkim.algorithm"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25}, {name: a, port: 26}]}", "listener names must be unique"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 587, auth: required}]}", "auth: required needs tls"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 465, tls: implicit}]}", "tlsSecretRef"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {replicas: 0, listeners: [{name: a, port: 25}]}", "spec.replicas"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {image: 'herald relay:latest', listeners: [{name: a, port: 25}]}", "spec.image"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {image: 'Registry.test/Herald/Relay', listeners: [{name: a, port: 25}]}", "spec.image"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {tlsSecretRef: {name: 'Bad_Name'}, listeners: [{name: a, port: 25}]}", "spec.tlsSecretRef.name"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {addresses: [{address: nonsense, ehlo: mta.a.test}]}", "address must be an IPv4 or IPv6 address"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {addresses: [{address: 192.0.2.1, ehlo: mta.a.test, weight: 0}]}", "every weight is 0"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {addresses: [{address: 192.0.2.1, ehlo: mta.a.test, weight: 1001}]}", "weight"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {warmup: [50, 100], warmupPreset: standard, addresses: [{address: 192.0.2.1, ehlo: mta.a.test}]}", "not both"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {addresses: [{address: 192.0.2.1, ehlo: mta.a.test, warmupStart: '2026-12-01'}]}", "no warm-up schedule"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {warmupPreset: standard, addresses: [{address: 192.0.2.1, ehlo: mta.a.test, warmupStart: '1 December'}]}", "warmupStart"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {warmup: [0, 10], addresses: [{address: 192.0.2.1, ehlo: mta.a.test, warmupStart: '2026-12-01'}]}", "spec.warmup[0]"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {warmupPreset: gentle, addresses: [{address: 192.0.2.1, ehlo: mta.a.test}]}", "spec.warmupPreset"),
        ("kind: IpPool\nmetadata: {name: bad}\nspec: {addresses: [{address: 192.0.2.1, ehlo: mta.a.test}, {address: 192.0.2.1, ehlo: mta.b.test}]}",
         'spec.addresses: duplicate entries for key [address="192.0.2.1"]'),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 9091}]}", "port 9091 (name admin)"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: metrics, port: 25}]}", "port 9090 (name metrics)"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25, allowNetworks: [10.0.0.0/8], allowNamespaces: {matchLabels: {a: b}}}]}",
         "allowNamespaces narrows a listener without allowNetworks"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25}], shutdown: {deliveries: 'two minutes'}}", "spec.shutdown.deliveries"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25, allowNetworks: [10.0.0.0/8], trustedSenders: [any, a.test]}]}", "[any] stands alone"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25, allowNetworks: [10.0.0.0/8], trustedSenders: ['Not A Domain']}]}", "spec.listeners[0].trustedSenders[0]"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25, allowNetworks: [10.0.0.0/8], trustedSenders: []}]}", "spec.listeners[0].trustedSenders"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {listeners: [{name: a, port: 25, trustedSenders: [a.test]}]}", "trustedSenders is for a listener with allowNetworks and no auth"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {inboundService: {}, listeners: [{name: a, port: 25, allowNetworks: [10.0.0.0/8]}]}",
         "port 25 is the inbound listener"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {inboundService: {}, listeners: [{name: inbound, port: 2525}]}",
         "the listener name inbound is the inbound listener on port 25"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {inboundService: {type: ClusterIP, loadBalancerClass: x.test/lb}, listeners: [{name: a, port: 587}]}",
         "loadBalancerClass is for type LoadBalancer"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {inboundService: {type: External}, listeners: [{name: a, port: 587}]}",
         "spec.inboundService.type"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {hostname: 'Not A Name', listeners: [{name: a, port: 587}]}", "spec.hostname"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {suppression: {mailboxFull: {replies: 1}}, listeners: [{name: a, port: 587}]}",
         "1 would suppress on a single full-mailbox reply"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {suppression: {ttl: {complaint: forever}}, listeners: [{name: a, port: 587}]}",
         "spec.suppression.ttl.complaint"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {suppression: {ttl: {invalidRecipient: 0d}}, listeners: [{name: a, port: 587}]}",
         "spec.suppression.ttl.invalidRecipient"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://valkey:6379', secretRef: {name: cache}}, listeners: [{name: a, port: 587}]}",
         "store: set exactly one of url"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {required: true}, listeners: [{name: a, port: 587}]}",
         "store: set exactly one of url"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://:secret@valkey:6379'}, listeners: [{name: a, port: 587}]}",
         "spec.store.url"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://valkey:6379', caSecretRef: {name: ca}}, listeners: [{name: a, port: 587}]}",
         "store.caSecretRef is for a rediss:// url"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {secretRef: {name: cache}, passwordSecretRef: {name: pw}}, listeners: [{name: a, port: 587}]}",
         "store.passwordSecretRef goes with store.url"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://v:6379', cluster: true, sentinelMaster: m}, listeners: [{name: a, port: 587}]}",
         "a cluster has no Sentinels"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://v:6379', nodes: ['w:6379']}, listeners: [{name: a, port: 587}]}",
         "store.nodes are for cluster or sentinelMaster"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://v:6379/2', cluster: true}, listeners: [{name: a, port: 587}]}",
         "a cluster has only database 0"),
        ("kind: SmtpRelay\nmetadata: {name: bad}\nspec: {store: {url: 'redis://v:6379', cluster: true, nodes: ['redis://w:6379']}, listeners: [{name: a, port: 587}]}",
         "spec.store.nodes[0]"),
    ],
)
def test_bad_objects_are_refused_by_the_schema_naming_the_field(ns, manifest, field):
    r = ns.apply("apiVersion: herald.dev/v1alpha1\n" + manifest)
    assert r.returncode != 0, f"accepted: {r.stdout}"
    assert field in r.stderr, r.stderr


@pytest.mark.parametrize(
    "store",
    [
        "{url: 'redis://valkey-0.valkey:6379/0', cluster: true, nodes: ['valkey-1.valkey:6379', '[fd00::1]:6379']}",
        "{url: 'rediss://sentinel-0.sentinel:26379/1', sentinelMaster: herald, nodes: ['sentinel-1.sentinel:26379']}",
    ],
)
def test_a_cluster_or_sentinel_store_is_accepted(ns, store):
    r = ns.apply("apiVersion: herald.dev/v1alpha1\nkind: SmtpRelay\nmetadata: {name: fleet}\n"
                 f"spec: {{store: {store}, listeners: [{{name: a, port: 587}}]}}")
    assert r.returncode == 0, r.stderr


def test_a_domain_and_relay_become_owned_objects_and_a_config_the_relay_accepts(ns, operator, tmp_path):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=2)).returncode == 0
    assert ns.apply(DOMAIN).returncode == 0
    for kind, name in [
        ("secret", "example-dkim"),
        ("secret", "relay-config"),
        ("statefulset", "relay"),
        ("service", "relay"),
        ("service", "relay-headless"),
        ("poddisruptionbudget", "relay"),
    ]:
        obj = wait_for(lambda: get_json(kind, name, ns.name), f"{kind}/{name}\n{operator.log_text()[-3000:]}")
        owners = obj["metadata"].get("ownerReferences", [])
        assert owners and owners[0]["kind"] in ("SmtpRelay", "SendingDomain"), obj["metadata"]
    cfg = secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml")
    assert "example.test" in cfg and "$argon2id$" in cfg and "s3cret" not in cfg
    trusted = next(l for l in yaml.safe_load(cfg)["listeners"] if l["name"] == "trusted")
    assert trusted["trusted_senders"] == ["example.test"], trusted
    path = tmp_path / "relay.yaml"
    path.write_text(cfg)
    r = subprocess.run([str(relay_bin()), "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    sts = get_json("statefulset", "relay", ns.name)
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["metadata"]["annotations"]["herald.dev/config-hash"]
    # The return-path token key: generated once, shared by every replica through the config Secret, and
    # kept across reconciles (a new key would make every bounce in flight unverifiable).
    assert "/etc/herald/config/bounce-keys" in cfg, cfg
    keys = secret_data(get_json("secret", "relay-config", ns.name), "bounce-keys")
    assert re.fullmatch(r"[0-9a-f]{64}\n", keys), repr(keys)
    assert ns.apply(RELAY.format(replicas=3)).returncode == 0
    wait_for(lambda: (get_json("statefulset", "relay", ns.name) or {}).get("spec", {}).get("replicas") == 3,
             "StatefulSet scaled to 3")
    assert secret_data(get_json("secret", "relay-config", ns.name), "bounce-keys") == keys
    # The DKIM private key stays in its Secret: never in status, never in the log.
    key = secret_data(get_json("secret", "example-dkim", ns.name), "herald1.pem")
    body = "".join(l for l in key.splitlines() if not l.startswith("-----"))
    sd = wait_for(lambda: (get_json("sendingdomain", "example", ns.name) or {}).get("status"), "SendingDomain status")
    assert body not in json.dumps(sd) and body not in operator.log_text()


HARDENED = """
apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: {{ name: relay }}
spec:
  replicas: {replicas}
  listeners:
    - {{ name: mx, port: 25 }}
    - {{ name: trusted, port: 2525, allowNetworks: [10.1.2.3/8, "fd00::/8"] }}
    - {{ name: internal, port: 2526, allowNamespaces: {{ matchLabels: {{ team: apps }} }} }}
  shutdown: {{ deliveries: 2m }}
"""


def test_a_relay_gets_a_network_policy_per_port_and_an_admin_token_made_once(ns, tmp_path, dns):
    """What the API server accepts and keeps: the NetworkPolicy with one rule per listener (its networks as
    ipBlocks, its namespaces as a selector, or open), the metrics port from the monitoring namespace and the
    admin port from the operator's pods; the admin token Secret created once, mounted where the config says,
    and kept across reconciles; probes on the metrics port; the drain in the config and the grace period."""
    op = Operator(tmp_path, dns.address, ns.name, ["--operator-namespace", "herald-system"])
    try:
        assert ns.apply(HARDENED.format(replicas=1)).returncode == 0
        policy = wait_for(lambda: get_json("networkpolicy", "relay", ns.name), f"the NetworkPolicy\n{op.log_text()[-3000:]}")
        assert policy["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        # The relay's pods: the StatefulSet's own selector.
        sts = wait_for(lambda: get_json("statefulset", "relay", ns.name), "the StatefulSet")
        assert spec["podSelector"] == sts["spec"]["selector"], (spec["podSelector"], sts["spec"]["selector"])
        rules = spec["ingress"]
        assert [[p["port"] for p in r["ports"]] for r in rules] == [[25], [2525], [2526], [9090], [9091]], rules
        assert all(p["protocol"] == "TCP" for r in rules for p in r["ports"])
        mx, trusted, internal, metrics, admin = rules
        assert "from" not in mx, mx
        assert [f["ipBlock"]["cidr"] for f in trusted["from"]] == ["10.0.0.0/8", "fd00::/8"], trusted
        assert internal["from"] == [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}], internal
        assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "herald-system"}},
                                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "herald-operator"}}}], admin

        secret = wait_for(lambda: get_json("secret", "relay-admin-token", ns.name), "the admin token Secret")
        assert secret["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
        token = secret_data(secret, "token")
        assert re.fullmatch(r"[0-9a-f]{64}", token), token
        cfg = yaml.safe_load(secret_data(wait_for(lambda: get_json("secret", "relay-config", ns.name), "config"), "relay.yaml"))
        assert cfg["metrics"] == {"address": "0.0.0.0:9090"}
        assert cfg["admin"] == {"address": "0.0.0.0:9091", "token_file": "/etc/herald/admin/token"}
        assert cfg["shutdown"] == {"sessions": "30s", "deliveries": "2m", "events": "10s"}, cfg["shutdown"]
        sts = wait_for(lambda: get_json("statefulset", "relay", ns.name), "the StatefulSet")
        pod = sts["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 30 + 120 + 10 + 10
        c = pod["containers"][0]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"mx": 25, "trusted": 2525, "internal": 2526, "metrics": 9090, "admin": 9091}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] == "metrics", (probe, c[probe])
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/herald/admin")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "relay-admin-token" and mount["readOnly"] is True
        headless = get_json("service", "relay-headless", ns.name)
        assert [p["name"] for p in headless["spec"]["ports"]] == ["mx", "trusted", "internal", "metrics"]
        assert "admin" not in [p["name"] for p in get_json("service", "relay", ns.name)["spec"]["ports"]]

        # Reconciles after a spec edit keep the token: the same Secret, never rewritten.
        assert ns.apply(HARDENED.format(replicas=2)).returncode == 0
        wait_for(lambda: get_json("statefulset", "relay", ns.name)["spec"]["replicas"] == 2, "the edit reconciled")
        again = get_json("secret", "relay-admin-token", ns.name)
        assert again["metadata"]["uid"] == secret["metadata"]["uid"]
        assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
        # Deleted (to rotate it), a new token is made at the next reconcile.
        kubectl("delete", "secret", "relay-admin-token", "-n", ns.name)
        assert ns.apply(HARDENED.format(replicas=3)).returncode == 0
        new = wait_for(lambda: get_json("secret", "relay-admin-token", ns.name), "a new token Secret")
        assert secret_data(new, "token") != token
    finally:
        op.stop()


def test_an_operator_watching_one_namespace_leaves_the_others_alone(ns, crds, tmp_path, dns):
    other = Namespace()
    op = Operator(tmp_path, dns.address, ns.name, ["--watch-namespace", ns.name])
    try:
        for n in (ns, other):
            assert n.apply(PASSWORD).returncode == 0
            assert n.apply(RELAY.format(replicas=1)).returncode == 0
        wait_for(lambda: get_json("statefulset", "relay", ns.name), f"the watched namespace's relay\n{op.log_text()[-3000:]}")
        # A second change in the watched namespace is reconciled too; by then the other relay would have been.
        assert ns.apply(RELAY.format(replicas=2)).returncode == 0
        wait_for(lambda: get_json("statefulset", "relay", ns.name)["spec"]["replicas"] == 2, "the edit reconciled")
        for kind in ("statefulset", "secret", "networkpolicy"):
            assert kubectl("get", kind, "-n", other.name, "-o", "name").stdout.strip() in ("", "secret/app-password"), kind
        assert (get_json("smtprelay", "relay", other.name) or {}).get("status") is None
    finally:
        op.stop()
        other.delete()


def _records(ns):
    st = (get_json("sendingdomain", "example", ns.name) or {}).get("status") or {}
    return st.get("records") or []


def _condition(ns, type_):
    st = (get_json("sendingdomain", "example", ns.name) or {}).get("status") or {}
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def test_status_follows_the_dns_records_as_they_are_published_and_removed(ns, operator, dns):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=1)).returncode == 0
    assert ns.apply(DOMAIN).returncode == 0
    records = wait_for(lambda: len(_records(ns)) == 4 and _records(ns), "four records in status")
    purposes = sorted(r["purpose"] for r in records)
    assert purposes == ["dkim", "dmarc", "return-path-mx", "spf"], records
    assert all(r["state"] == "Missing" for r in records), records
    c = _condition(ns, "DnsVerified")
    assert c and c["status"] == "False" and c["observedGeneration"] >= 1, c
    for rec in records:
        publish_record(dns, rec)
    wait_for(lambda: (_condition(ns, "DnsVerified") or {}).get("status") == "True", "DnsVerified=True", attempts=300)
    assert all(r["state"] == "Published" for r in _records(ns))
    assert (_condition(ns, "Ready") or {}).get("status") == "True"
    # A record that changes is a Mismatch that says what the nameserver served and which one.
    dmarc = next(r for r in records if r["purpose"] == "dmarc")
    dns.remove(dmarc["name"])
    dns.txt(dmarc["name"], "v=DMARC1; p=none")
    wait_for(lambda: (_condition(ns, "DnsVerified") or {}).get("status") == "False", "DnsVerified=False", attempts=300)
    bad = next(r for r in _records(ns) if r["purpose"] == "dmarc")
    assert bad["state"] == "Mismatch" and bad["observed"] == "v=DMARC1; p=none", bad
    assert bad["nameserver"] == dns.address, bad
    # A record that disappears is Missing again.
    spf = next(r for r in records if r["purpose"] == "spf")
    dns.remove(spf["name"], "TXT")
    wait_for(lambda: next(r for r in _records(ns) if r["purpose"] == "spf")["state"] == "Missing", "SPF Missing", attempts=300)


def test_status_is_not_rewritten_when_nothing_changed(ns, operator):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=1)).returncode == 0
    assert ns.apply(DOMAIN).returncode == 0
    wait_for(lambda: len(_records(ns)) == 4, "records")
    wait_for(lambda: _condition(ns, "Ready") is not None, "conditions")
    before = get_json("sendingdomain", "example", ns.name)
    # Any change makes the controller reconcile; an annotation changes nothing the status depends on.
    kubectl("annotate", "sendingdomain", "example", "-n", ns.name, "test/poke=1")
    poked = get_json("sendingdomain", "example", ns.name)["metadata"]["resourceVersion"]
    reconciles = lambda: operator.metric("herald_operator_reconcile_duration_seconds_count", 'kind="SendingDomain"')
    n = reconciles()
    wait_for(lambda: reconciles() > n, "a reconcile after the annotation")
    after = get_json("sendingdomain", "example", ns.name)
    assert after["metadata"]["resourceVersion"] == poked, "status was written although nothing changed"
    assert after["status"]["conditions"] == before["status"]["conditions"]


def test_editing_the_relay_spec_updates_its_objects(ns, operator):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=1)).returncode == 0
    wait_for(lambda: (get_json("statefulset", "relay", ns.name) or {}).get("spec", {}).get("replicas") == 1, "sts 1")
    h1 = get_json("statefulset", "relay", ns.name)["spec"]["template"]["metadata"]["annotations"]["herald.dev/config-hash"]
    assert ns.apply(RELAY.format(replicas=3).replace("2525", "2526")).returncode == 0
    wait_for(lambda: get_json("statefulset", "relay", ns.name)["spec"]["replicas"] == 3, "sts 3")
    wait_for(
        lambda: get_json("statefulset", "relay", ns.name)["spec"]["template"]["metadata"]["annotations"]["herald.dev/config-hash"] != h1,
        "a new config hash after the listener port changed",
    )
    svc = get_json("service", "relay", ns.name)
    assert 2526 in [p["port"] for p in svc["spec"]["ports"]]
    relay = get_json("smtprelay", "relay", ns.name)
    assert relay["status"]["configHash"]


POOL = """
apiVersion: herald.dev/v1alpha1
kind: IpPool
metadata: { name: pool }
spec:
  addresses:
    - { address: 192.0.2.10, ehlo: mta1.example.test, warmupStart: "2026-01-01" }
  warmup: [100, 1000]
"""


def _pool_status(ns):
    return (get_json("ippool", "pool", ns.name) or {}).get("status") or {}


def test_ip_pool_reports_forward_confirmed_reverse_dns(ns, operator, dns):
    from dnslib import PTR, QTYPE, RR

    assert ns.apply(POOL).returncode == 0
    st = wait_for(lambda: _pool_status(ns).get("addresses") and _pool_status(ns), "IpPool status")
    a = st["addresses"][0]
    assert a["reverseDns"] != "Published", a
    # The warm-up schedule has two days and started long ago: no cap any more.
    assert a["warmupDay"] > 2 and "dailyCap" not in a, a
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "192.0.2.10" in ready["message"], ready
    # A PTR alone is not enough: the EHLO name must resolve back to the address.
    dns.zone("in-addr.arpa")
    dns._add("10.2.0.192.in-addr.arpa", RR("10.2.0.192.in-addr.arpa.", QTYPE.PTR, rdata=PTR("mta1.example.test."), ttl=0))
    wait_for(lambda: (_pool_status(ns).get("addresses") or [{}])[0].get("observedPtr", "").find("resolve") >= 0,
             "a mismatch saying the EHLO name does not resolve")
    dns.a("mta1.example.test", "192.0.2.10")
    wait_for(lambda: _pool_status(ns)["addresses"][0]["reverseDns"] == "Published", "reverse DNS confirmed")
    ready = next(c for c in _pool_status(ns)["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready


def test_two_operators_elect_one_leader_and_the_other_takes_over(tmp_path, dns, ns):
    import time

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Operator(tmp_path / "a", dns.address, ns.name)
    second = Operator(tmp_path / "b", dns.address, ns.name)
    try:
        leaders = lambda: [op for op in (first, second) if "is the leader" in op.log_text()]
        wait_for(lambda: len(leaders()) == 1, "one leader")
        # Give the other a few renewal periods to (wrongly) become leader too.
        time.sleep(6)
        assert len(leaders()) == 1, [op.log_text()[-500:] for op in (first, second)]
        leader = leaders()[0]
        follower = second if leader is first else first
        assert ns.apply(PASSWORD).returncode == 0
        assert ns.apply(RELAY.format(replicas=1)).returncode == 0
        wait_for(lambda: get_json("statefulset", "relay", ns.name), "the leader reconciles")
        assert follower.metric("herald_operator_reconcile_total", 'kind="SmtpRelay"') == 0
        leader.stop()
        wait_for(lambda: "is the leader" in follower.log_text(), "the follower takes over", attempts=250)
        assert ns.apply(RELAY.format(replicas=2)).returncode == 0
        wait_for(lambda: get_json("statefulset", "relay", ns.name)["spec"]["replicas"] == 2, "the new leader reconciles")
    finally:
        first.stop()
        second.stop()


EXAMPLES = ("app-password.yaml", "certificate.yaml", "ip-pool.yaml", "smtp-relay.yaml", "sending-domain.yaml",
            "app-deployment.yaml", "sidecar.yaml")


def test_every_example_is_applied_by_the_examples_test():
    assert sorted(EXAMPLES) == sorted(p.name for p in (REPO / "examples").glob("*.yaml"))


def test_the_examples_apply_unchanged_and_come_up(ns, operator):
    examples = REPO / "examples"
    # cert-manager is not installed in the test cluster: stand-ins for its Certificate and Issuer CRDs, with
    # cert-manager's schema for the fields the example uses, let the API server validate certificate.yaml
    # (strict field validation: a misspelt field is an error). Issuing the certificate is cert-manager's job.
    install_crds(REPO / "tests" / "cluster" / "testdata" / "cert-manager-crds.yaml")
    for name in EXAMPLES:
        r = ns.apply((examples / name).read_text())
        assert r.returncode == 0, f"{name}: {r.stderr}"
    wait_for(lambda: get_json("statefulset", "relay", ns.name), f"the example relay's StatefulSet\n{operator.log_text()[-2000:]}")
    records = wait_for(
        lambda: ((get_json("sendingdomain", "example-com", ns.name) or {}).get("status") or {}).get("records"),
        "the example domain's records",
    )
    spf = next(r for r in records if r["purpose"] == "spf")
    assert "ip4:192.0.2.10" in spf["value"] and "ip4:192.0.2.11" in spf["value"], spf
    cfg = secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml")
    assert "mta1.example.com" in cfg and "bounces.example.com" in cfg
    shaping = yaml.safe_load(cfg)["shaping"]
    assert shaping["providers"] == [{"name": "gmail", "max_connections": 10, "max_message_rates": ["3000/min"]}], shaping
    assert shaping["rules"][0]["action"] == "suspend" and shaping["rules"][0]["duration"] == "1h", shaping
    # The certificate lands in the Secret the relay mounts; the applications reach the relay's Service on
    # a port it has (test_examples.py runs their mail path for real).
    cert = get_json("certificate", "relay-tls", ns.name)
    relay = get_json("smtprelay", "relay", ns.name)
    assert cert["spec"]["secretName"] == relay["spec"]["tlsSecretRef"]["name"]
    assert get_json("issuer", cert["spec"]["issuerRef"]["name"], ns.name)
    svc = wait_for(lambda: get_json("service", "relay", ns.name), "the relay Service")
    ports = {p["port"] for p in svc["spec"]["ports"]}
    env = {e["name"]: e.get("value") for e in get_json("deployment", "mail-demo", ns.name)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SMTP_HOST"] == svc["metadata"]["name"] and int(env["SMTP_PORT"]) in ports, (env, ports)
    sidecar = yaml.safe_load(get_json("configmap", "mail-sidecar-relay", ns.name)["data"]["relay.yaml"])
    assert sidecar["delivery"]["smarthost"]["host"] == svc["metadata"]["name"]
    assert sidecar["delivery"]["smarthost"]["port"] in ports
    assert get_json("deployment", "mail-sidecar", ns.name)


def test_records_are_published_as_an_external_dns_endpoint_when_asked(ns, operator):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=1)).returncode == 0
    # A public name: without one the MX and the SPF name a placeholder, which is never published.
    assert ns.apply(RELAY.format(replicas=1).replace("spec:\n", "spec:\n  hostname: mx.example.test\n")).returncode == 0
    assert ns.apply(DOMAIN.replace("dkim:", "publishWithExternalDns: true\n  dkim:")).returncode == 0
    have_crd = kubectl("get", "crd", "dnsendpoints.externaldns.k8s.io", check=False).returncode == 0
    if not have_crd:
        cond = wait_for(lambda: _condition(ns, "ExternalDnsPublished"), "ExternalDnsPublished condition")
        assert cond["status"] == "False" and "not installed" in cond["message"], cond
        kubectl("apply", "--server-side", "--field-manager=test", "-f",
                str(REPO / "tests" / "cluster" / "testdata" / "dnsendpoint-crd.yaml"))
        kubectl("wait", "--for=condition=Established", "crd/dnsendpoints.externaldns.k8s.io", "--timeout=30s")
    ep = wait_for(lambda: get_json("dnsendpoint", "example-records", ns.name), f"the DNSEndpoint\n{operator.log_text()[-2000:]}")
    endpoints = ep["spec"]["endpoints"]
    assert sorted(e["recordType"] for e in endpoints) == ["MX", "TXT", "TXT", "TXT"], endpoints
    dkim = next(e for e in endpoints if e["dnsName"].startswith("herald1._domainkey."))
    assert dkim["targets"][0].startswith("v=DKIM1; k=ed25519; p="), dkim
    assert ep["metadata"]["ownerReferences"][0]["kind"] == "SendingDomain"
    wait_for(lambda: (_condition(ns, "ExternalDnsPublished") or {}).get("status") == "True", "ExternalDnsPublished=True")


def test_dkim_key_rotation_publishes_the_new_selector_before_it_signs(ns, operator, dns):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=1)).returncode == 0
    assert ns.apply(DOMAIN.replace("algorithm: ed25519 }", "algorithm: ed25519, rotationPeriod: 3s }")).returncode == 0
    first = wait_for(lambda: len(_records(ns)) >= 4 and _records(ns), "records")
    for rec in first:
        publish_record(dns, rec)
    wait_for(lambda: (_condition(ns, "DnsVerified") or {}).get("status") == "True", "DnsVerified=True", attempts=300)
    # After the rotation period a second DKIM record appears: the next selector, not signing yet.
    two = wait_for(lambda: [r for r in _records(ns) if r["purpose"] == "dkim"] if len([r for r in _records(ns) if r["purpose"] == "dkim"]) == 2 else None,
                   "a second DKIM record", attempts=300)
    status = get_json("sendingdomain", "example", ns.name)["status"]
    assert status["activeSelector"] == "herald1", status
    nxt = next(r for r in two if not r["name"].startswith("herald1._domainkey."))
    new_selector = nxt["name"].split("._domainkey.")[0]
    assert new_selector.startswith("herald1-"), nxt
    first_key = secret_data(get_json("secret", "example-dkim", ns.name), "herald1.pem")
    next_key = secret_data(get_json("secret", "example-dkim-next", ns.name), f"{new_selector}.pem")
    cfg = secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml")
    assert "selector: herald1\n" in cfg or "selector: herald1\r" in cfg or "herald1.pem" in cfg, cfg
    # Once receivers can find it, it signs: the relay config and the mount switch to it.
    publish_record(dns, nxt)
    wait_for(lambda: get_json("sendingdomain", "example", ns.name)["status"].get("activeSelector") == new_selector,
             "the new selector to become active", attempts=300)
    wait_for(lambda: get_json("secret", "example-dkim-next", ns.name) is None, "the next-key Secret to go")
    wait_for(lambda: f"example.test.{new_selector}.pem" in secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml"),
             "the relay config to use the new key", attempts=300)
    sts = get_json("statefulset", "relay", ns.name)
    dkim_vol = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "dkim")
    item = dkim_vol["projected"]["sources"][0]["secret"]["items"][0]
    assert item["path"] == f"example.test.{new_selector}.pem"
    # Each selector's file is projected from that selector's own key: the new key joined the Secret under
    # its selector's name, and the old key is still there, unchanged, under the old one (pods that have not
    # rolled yet read it, with the old selector).
    assert item["key"] == f"{new_selector}.pem"
    active = get_json("secret", "example-dkim", ns.name)
    assert secret_data(active, "herald1.pem") == first_key
    assert secret_data(active, f"{new_selector}.pem") == next_key and next_key != first_key


def test_liveness_fails_while_watches_are_stalled_and_recovers(tmp_path, dns, ns):
    """Freezes kube-apiserver (SIGSTOP): the operator's watches go silent, /healthz must fail; after SIGCONT
    it must pass again."""
    import os
    import signal
    import urllib.error
    import urllib.request

    pids = [int(p) for p in subprocess.run(["pgrep", "-x", "kube-apiserver"], capture_output=True, text=True).stdout.split()]
    if len(pids) != 1:
        pytest.skip(f"needs exactly one kube-apiserver process on this machine, found {len(pids)}")
    op = Operator(tmp_path, dns.address, ns.name, ["--stale-after", "4s"])

    def health() -> int:
        try:
            return urllib.request.urlopen(f"http://{op.health}/healthz", timeout=3).status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    try:
        wait_for(lambda: health() == 200 and "is the leader" in op.log_text(), "a healthy leader")
        os.kill(pids[0], signal.SIGSTOP)
        try:
            wait_for(lambda: health() == 503, "/healthz to fail while the API server is frozen", attempts=100)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        wait_for(lambda: health() == 200, "/healthz to recover", attempts=150)
    finally:
        op.stop()


SMARTHOST_RELAY = """
apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: { name: relay }
spec:
  listeners:
    - { name: trusted, port: 2525, allowNetworks: [10.0.0.0/8] }
  delivery:
    smarthost: { host: smtp.provider.test, port: 587, tls: starttls, caSecretRef: { name: provider-ca } }
"""


def test_a_smarthost_ca_secret_is_mounted_and_named_in_the_relay_config(ns, operator, tmp_path):
    """The relay verifies the smarthost's certificate before it sends credentials: a smarthost with a private
    CA gets it through caSecretRef, its ca.crt mounted (and nothing else of the Secret) as ca_file."""
    assert ns.apply(SMARTHOST_RELAY).returncode == 0
    secret = wait_for(lambda: get_json("secret", "relay-config", ns.name), f"relay-config\n{operator.log_text()[-3000:]}")
    cfg = secret_data(secret, "relay.yaml")
    assert yaml.safe_load(cfg)["delivery"]["smarthost"]["ca_file"] == "/etc/herald/smarthost-ca/ca.crt", cfg
    path = tmp_path / "relay.yaml"
    path.write_text(cfg)
    r = subprocess.run([str(relay_bin()), "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    sts = wait_for(lambda: get_json("statefulset", "relay", ns.name), "statefulset/relay")
    pod = sts["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "smarthost-ca")
    assert volume["secret"]["secretName"] == "provider-ca"
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "smarthost-ca")
    assert mount["mountPath"] == "/etc/herald/smarthost-ca" and mount["readOnly"] is True


STORE_RELAY = """
apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  listeners:
    - {{ name: trusted, port: 2525, allowNetworks: [10.0.0.0/8] }}
{store}"""

STORE_URL_SECRET = """
apiVersion: v1
kind: Secret
metadata: { name: cache-url }
stringData: { url: "rediss://default:s3cret-pw@primary.cache.example.test:6379/0" }
"""


def _relay_condition(ns, name, type_):
    st = (get_json("smtprelay", name, ns.name) or {}).get("status") or {}
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def test_a_store_url_from_a_secret_reaches_the_config_secret_only_and_shared_state_follows_the_spec(ns, operator, tmp_path):
    """spec.store.secretRef: the operator copies the URL, password included, into the relay's config Secret
    (with fleet_size from replicas and the relay's own key prefix) and nowhere else; SharedState says whether
    the replicas share their suppressions, and a missing password Secret is named in ConfigRendered."""
    assert ns.apply(STORE_URL_SECRET).returncode == 0
    store = "  store: { secretRef: { name: cache-url }, required: true }\n"
    assert ns.apply(STORE_RELAY.format(name="relay", replicas=3, store=store)).returncode == 0
    secret = wait_for(lambda: get_json("secret", "relay-config", ns.name), f"relay-config\n{operator.log_text()[-3000:]}")
    cfg = secret_data(secret, "relay.yaml")
    rendered = yaml.safe_load(cfg)["store"]
    assert rendered["url"] == "rediss://default:s3cret-pw@primary.cache.example.test:6379/0", cfg
    assert rendered["fleet_size"] == 3 and rendered["key_prefix"] == f"herald:{ns.name}/relay:" and rendered["required"] is True
    path = tmp_path / "relay.yaml"
    path.write_text(cfg)
    r = subprocess.run([str(relay_bin()), "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    shared = wait_for(lambda: _relay_condition(ns, "relay", "SharedState"), "SharedState")
    assert (shared["status"], shared["reason"]) == ("True", "StoreConfigured"), shared
    relay = get_json("smtprelay", "relay", ns.name)
    assert "s3cret-pw" not in json.dumps(relay) and "s3cret-pw" not in operator.log_text()
    # A new URL in the Secret renders the relay again at once (its periodic resync is 5 minutes away).
    assert ns.apply(STORE_URL_SECRET.replace("s3cret-pw@primary", "r0tated-pw@replica")).returncode == 0
    moved = wait_for(lambda: "r0tated-pw@replica" in secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml"),
                     f"the new store URL in relay-config\n{operator.log_text()[-3000:]}")
    assert moved and "r0tated-pw" not in operator.log_text()
    # The store dropped with two replicas left: each pod is on its own, and the condition says what that costs.
    assert ns.apply(STORE_RELAY.format(name="relay", replicas=2, store="")).returncode == 0
    alone = wait_for(lambda: (c := _relay_condition(ns, "relay", "SharedState")) and c["reason"] == "NoStore" and c,
                     "SharedState=False NoStore")
    assert alone["status"] == "False" and "suppression list" in alone["message"], alone
    # A password Secret that is not there: nothing is rendered, and the condition names it.
    store = "  store: { url: 'redis://valkey:6379/0', passwordSecretRef: { name: valkey } }\n"
    assert ns.apply(STORE_RELAY.format(name="other", replicas=2, store=store)).returncode == 0
    rendered = wait_for(lambda: _relay_condition(ns, "other", "ConfigRendered"), "ConfigRendered of other")
    assert rendered["status"] == "False", rendered
    assert "spec.store.passwordSecretRef: Secret valkey has no key password" in rendered["message"], rendered
    # Creating the Secret is enough: the relay renders without any edit of its own.
    kubectl("create", "secret", "generic", "valkey", "-n", ns.name, "--from-literal=password=pw")
    fixed = wait_for(lambda: (c := _relay_condition(ns, "other", "ConfigRendered")) and c["status"] == "True" and c,
                     f"ConfigRendered of other after its Secret appeared\n{operator.log_text()[-3000:]}")
    assert get_json("secret", "other-config", ns.name), fixed


PUBLIC_RELAY = RELAY + """  hostname: mx.example.test
  inboundService:
    type: LoadBalancer
    annotations: {{ lb.example.test/scheme: internet }}
    externalTrafficPolicy: Local
"""


def test_a_relay_with_a_public_name_and_a_load_balancer_receives_bounces_at_its_mx(ns, operator, dns, tmp_path):
    """spec.hostname and spec.inboundService: a LoadBalancer Service on port 25 to an inbound listener the
    NetworkPolicy opens to anyone; once the load balancer has an address (patched into the Service's status,
    as a cloud controller would), the domain's records name the MX host and its A record, both verify in
    DNS, and ReturnPathRoutable turns true. Dropping inboundService removes the Service."""
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(PUBLIC_RELAY.format(replicas=1)).returncode == 0
    assert ns.apply(DOMAIN).returncode == 0
    svc = wait_for(lambda: get_json("service", "relay-inbound", ns.name), f"the inbound Service\n{operator.log_text()[-3000:]}")
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
    assert svc["metadata"]["annotations"]["lb.example.test/scheme"] == "internet"
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local"
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("inbound", 25, "inbound")]
    sts = wait_for(lambda: get_json("statefulset", "relay", ns.name), "the StatefulSet")
    ports = {p["name"]: p["containerPort"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["inbound"] == 25, ports
    rule = next(r for r in get_json("networkpolicy", "relay", ns.name)["spec"]["ingress"] if r["ports"][0]["port"] == 25)
    assert "from" not in rule, rule
    cfg = yaml.safe_load(secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml"))
    assert cfg["hostname"] == "mx.example.test"
    inbound = next(l for l in cfg["listeners"] if l["name"] == "inbound")
    assert inbound["address"] == "0.0.0.0:25" and inbound.get("tls") == "starttls", inbound
    assert "auth" not in inbound or inbound["auth"] == "none", inbound
    assert not inbound.get("allow_networks"), inbound
    path = tmp_path / "relay.yaml"
    path.write_text(secret_data(get_json("secret", "relay-config", ns.name), "relay.yaml"))
    r = subprocess.run([str(relay_bin()), "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr

    pending = wait_for(lambda: (c := _condition(ns, "ReturnPathRoutable")) and c["reason"] == "LoadBalancerPending" and c,
                       f"ReturnPathRoutable pending\n{operator.log_text()[-2000:]}")
    assert pending["status"] == "False" and "relay-inbound" in pending["message"], pending
    mx = next(r for r in _records(ns) if r["purpose"] == "return-path-mx")
    assert (mx["name"], mx["value"]) == ("bounces.example.test", "10 mx.example.test."), mx

    kubectl("patch", "service", "relay-inbound", "-n", ns.name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.25"}]}}}))
    routable = wait_for(lambda: (c := _condition(ns, "ReturnPathRoutable")) and c["status"] == "True" and c,
                        f"ReturnPathRoutable=True\n{operator.log_text()[-2000:]}")
    assert routable["reason"] == "LoadBalancerReady" and "192.0.2.25" in routable["message"], routable
    assert get_json("smtprelay", "relay", ns.name)["status"]["inbound"] == {"service": "relay-inbound", "addresses": ["192.0.2.25"]}
    records = _records(ns)
    host = [r for r in records if r["purpose"] == "return-path-host"]
    assert [(r["name"], r["type"], r["value"]) for r in host] == [("mx.example.test", "A", "192.0.2.25")], records
    assert all("cluster.local" not in r["name"] + r["value"] for r in records), records
    # Every record, the MX host's A included, verifies against the nameserver.
    for rec in records:
        publish_record(dns, rec)
    wait_for(lambda: (_condition(ns, "DnsVerified") or {}).get("status") == "True", "DnsVerified=True", attempts=300)
    assert next(r for r in _records(ns) if r["purpose"] == "return-path-host")["state"] == "Published"
    # Rechecks that find nothing new write nothing: the status (and the condition's time) stay as they are.
    before = get_json("sendingdomain", "example", ns.name)
    reconciles = lambda: operator.metric("herald_operator_reconcile_duration_seconds_count", 'kind="SendingDomain"')
    n = reconciles()
    wait_for(lambda: reconciles() >= n + 2, "two more rechecks")
    after = get_json("sendingdomain", "example", ns.name)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], "status churned"

    # A cloud that names its load balancer instead: the relay's name becomes an alias of that name.
    kubectl("patch", "service", "relay-inbound", "-n", ns.name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"loadBalancer": {"ingress": [{"hostname": "abc.elb.example.net"}]}}}))
    alias = lambda: [r for r in _records(ns) if r["purpose"] == "return-path-host"]
    wait_for(lambda: [(r["type"], r["value"]) for r in alias()] == [("CNAME", "abc.elb.example.net.")],
             f"the CNAME record\n{operator.log_text()[-2000:]}")
    assert alias()[0]["state"] != "Published", "the A record served is no CNAME"
    dns.remove("mx.example.test")
    publish_record(dns, alias()[0])
    wait_for(lambda: alias()[0]["state"] == "Published", "the CNAME verified", attempts=300)
    assert (_condition(ns, "ReturnPathRoutable") or {}).get("status") == "True"

    # Without inboundService: no Service, no listener on 25, and the domain says what to set.
    assert ns.apply(PUBLIC_RELAY.format(replicas=1).split("  inboundService:")[0]).returncode == 0
    wait_for(lambda: get_json("service", "relay-inbound", ns.name) is None, "the inbound Service to go")
    gone = wait_for(lambda: (c := _condition(ns, "ReturnPathRoutable")) and c["reason"] == "NoInboundService" and c,
                    "ReturnPathRoutable=False NoInboundService")
    assert gone["status"] == "False" and "spec.inboundService" in gone["message"], gone
    assert not [r for r in _records(ns) if r["purpose"] == "return-path-host"]


def test_without_a_public_name_no_record_names_the_cluster_and_return_path_routable_says_what_to_set(ns, operator):
    assert ns.apply(PASSWORD).returncode == 0
    assert ns.apply(RELAY.format(replicas=1)).returncode == 0
    assert ns.apply(DOMAIN).returncode == 0
    c = wait_for(lambda: _condition(ns, "ReturnPathRoutable"), f"ReturnPathRoutable\n{operator.log_text()[-2000:]}")
    assert (c["status"], c["reason"]) == ("False", "NoPublicHostname"), c
    assert "spec.hostname" in c["message"] and "SmtpRelay relay" in c["message"], c
    records = wait_for(lambda: len(_records(ns)) == 4 and _records(ns), "four records")
    assert all("cluster.local" not in r["name"] + r["value"] and ".svc" not in r["value"] for r in records), records
    mx = next(r for r in records if r["purpose"] == "return-path-mx")
    assert mx["value"] == "10 set-smtprelay-spec-hostname.invalid.", mx
    # No Service exposes port 25 and the relay has no such listener unless inboundService asks.
    cfg = yaml.safe_load(secret_data(wait_for(lambda: get_json("secret", "relay-config", ns.name), "the config"), "relay.yaml"))
    assert get_json("service", "relay-inbound", ns.name) is None
    assert all(not l["address"].endswith(":25") for l in cfg["listeners"]), cfg["listeners"]
    # A name in the cluster's domain is no better than none.
    assert ns.apply(RELAY.format(replicas=1).replace("spec:\n", "spec:\n  hostname: relay.mail.svc.cluster.local\n")).returncode == 0
    c = wait_for(lambda: (c := _condition(ns, "ReturnPathRoutable")) and "relay.mail.svc.cluster.local" in c["message"] and c,
                 "the message to name the in-cluster hostname")
    assert (c["status"], c["reason"]) == ("False", "NoPublicHostname"), c
    assert all("cluster.local" not in r["name"] + r["value"] for r in _records(ns)), _records(ns)
