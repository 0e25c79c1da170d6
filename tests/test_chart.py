"""The Helm chart charts/herald, from `helm lint` to an operator reconciling what `helm install` created.

Without a cluster: the chart's CRDs are the operator's (`crds/`); `helm lint --strict` and `helm template` with
the default values and with every switch on; values.schema.json refuses values of the wrong type; the
PrometheusRule's groups pass `promtool check rules` and the unit tests in tests/chart/alerts.test.yaml.

Against the test control plane (tests/cluster/run.sh sets KUBECONFIG; pods never run there, there are no
nodes): `helm install` with every switch on, then herald-operator as a local process authenticated as the
chart's ServiceAccount (a token from `kubectl create token`), so a permission the chart's RBAC lacks fails
the test; NOTES.txt's commands run as printed; the rendered manifests pass a server-side dry-run apply (with
stand-ins for the Prometheus Operator's CRDs, tests/cluster/testdata/prometheus-operator-crds.yaml); and
every metric the dashboard and the alerts use is one a real relay (after real traffic) or the operator
exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from harness.kube import (
    REPO, Namespace, Operator, get_json, install_crds, kubeconfig, kubectl, publish_record, service_account_kubeconfig,
    wait_for,
)
from harness.prometheus import parse, promtool, scrape
from test_metrics import relay_with_every_series

CHART = REPO / "charts" / "herald"
TESTDATA = REPO / "tests" / "cluster" / "testdata"
PROMETHEUS_CRDS = TESTDATA / "prometheus-operator-crds.yaml"
HERALD_CRDS = REPO / "crds" / "herald.dev.yaml"
ALL_ON = [
    "--set", "relay.enabled=true",
    "--set", "monitoring.serviceMonitor.enabled=true",
    "--set", "monitoring.podMonitor.enabled=true",
    "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "monitoring.grafanaDashboard.enabled=true",
]
VALKEY = ["--set", "valkey.enabled=true"]
VALUES = {"default": [], "all-on": ALL_ON, "valkey": [*ALL_ON, *VALKEY]}
# Prometheus makes `up` itself; every other name an expression uses must come from Herald.
PROMETHEUS_OWN = {"up"}

needs_cluster = pytest.mark.skipif(
    not (kubeconfig() and shutil.which("kubectl")),
    reason="needs a test control plane: run under tests/cluster/run.sh (CI always does)",
)


def helm(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("helm")
    if exe is None:
        pytest.skip("helm is not on PATH (tests/cluster/run.sh puts the one it builds there)")
    r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def render(*values: str, namespace: str = "mail") -> list[dict]:
    out = helm("template", "herald", str(CHART), "-n", namespace, *values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    got = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(got) == 1, f"{len(got)} {kind} {name or ''} in the rendered chart: {[d['metadata']['name'] for d in got]}"
    return got[0]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Herald's all start with herald_; plus Prometheus's up)."""
    names = set(re.findall(r"\b(herald_[a-z0-9_]+)", expr))
    names |= {n for n in PROMETHEUS_OWN if re.search(rf"\b{n}\s*\{{", expr)}
    return names


def family(name: str, types: dict[str, str]) -> str:
    """A histogram's _bucket, _sum and _count series belong to its family."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and types.get(base) == "histogram":
            return base
    return name


def rbac_denials(log: str) -> list[str]:
    """The operator's log lines where the API server refused it for want of a permission. A cluster-wide
    operator also meets the namespaces other tests are deleting, where even a permitted write is refused
    ("forbidden: ... because it is being terminated"): that says nothing about its RBAC."""
    return [l for l in log.splitlines() if "forbidden" in l.lower() and "is being terminated" not in l]


# ---------------------------------------------------------------------------------------------------------
# Without a cluster


def test_the_chart_ships_the_crds_the_operator_generates():
    """One source of truth: crds/herald.dev.yaml (which a cargo test keeps equal to the Rust types) is copied
    into the chart, because a chart is packaged and installed from its own directory. This test is what
    keeps the copy equal; `cp crds/herald.dev.yaml charts/herald/crds/` after regenerating."""
    copy = CHART / "crds" / "herald.dev.yaml"
    assert copy.read_bytes() == HERALD_CRDS.read_bytes(), (
        "charts/herald/crds/herald.dev.yaml differs from crds/herald.dev.yaml: "
        "cp crds/herald.dev.yaml charts/herald/crds/"
    )
    shown = [d for d in yaml.safe_load_all(helm("show", "crds", str(CHART)).stdout) if d]
    assert sorted(d["metadata"]["name"] for d in shown) == [
        "ippools.herald.dev", "sendingdomains.herald.dev", "smtprelays.herald.dev"]


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_lint_strict_and_template(values):
    helm("lint", "--strict", str(CHART), *values)
    docs = render(*values)
    kinds = sorted(d["kind"] for d in docs)
    base = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    if values:
        base += ["ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule", "ServiceMonitor", "ServiceMonitor", "SmtpRelay"]
    if "valkey.enabled=true" in values:
        base += ["NetworkPolicy", "Secret", "Service", "StatefulSet"]
    assert kinds == sorted(base), kinds
    dep = find(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = c["ports"][0]["containerPort"]
    assert f"--health-address=0.0.0.0:{port}" in c["args"]
    svc = find(docs, "Service", dep["metadata"]["name"])
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]


def test_the_chart_relay_is_the_smtp_relay_the_values_describe():
    docs = render(*ALL_ON, "--set", "relay.replicas=3", "--set", "relay.storage.storageClassName=fast",
                  "--set", "relay.delivery.maxAge=2d", "--set", "relay.hostname=smtp.example.com")
    spec = find(docs, "SmtpRelay", "relay")["spec"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["relay"]
    assert spec["replicas"] == 3 and spec["hostname"] == "smtp.example.com"
    assert spec["image"] == f"herald/relay:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    assert spec["listeners"] == values["listeners"] and spec["users"] == values["users"]
    assert spec["tlsSecretRef"] == {"name": "relay-tls"}
    assert spec["delivery"]["maxAge"] == "2d" and spec["delivery"]["retry"] == values["delivery"]["retry"]
    assert spec["storage"] == {"size": "10Gi", "storageClassName": "fast"}
    # The chart's monitors scrape the relay, so the operator's own ServiceMonitor is off; and on without them.
    assert spec["metrics"] == {"serviceMonitor": False}
    assert find(render("--set", "relay.enabled=true"), "SmtpRelay")["spec"]["metrics"] == {"serviceMonitor": True}


def test_the_chart_relay_receives_bounces_only_when_the_values_ask():
    """relay.hostname and relay.inboundService reach the SmtpRelay as they are (the operator makes the inbound
    listener and Service from them); without inboundService the SmtpRelay has none, and the operator's
    ClusterRole may watch the Services (the load balancer's address) and delete the inbound one."""
    spec = find(render("--set", "relay.enabled=true"), "SmtpRelay")["spec"]
    assert "inboundService" not in spec and "hostname" not in spec
    inbound = {"type": "LoadBalancer", "annotations": {"lb.example.com/scheme": "internet"}, "externalTrafficPolicy": "Local"}
    spec = find(render("--set", "relay.enabled=true", "--set", "relay.hostname=mx.example.com",
                       "--set-json", f"relay.inboundService={json.dumps(inbound)}"), "SmtpRelay")["spec"]
    assert spec["hostname"] == "mx.example.com" and spec["inboundService"] == inbound
    rules = find(render(), "ClusterRole")["rules"]
    services = next(r for r in rules if r["resources"] == ["services"])
    assert {"get", "list", "watch", "create", "patch", "delete"} <= set(services["verbs"]), services


def test_the_relay_monitors_scrape_the_metrics_port_never_the_admin_port():
    """The relay's admin port serves the queue API (it can delete mail): Prometheus scrapes port `metrics`,
    which the operator's headless Service carries and the admin port is on no Service at all."""
    docs = render(*ALL_ON)
    relay_monitors = [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor") and d["metadata"]["name"].endswith("-relay")]
    assert len(relay_monitors) == 2, [d["metadata"]["name"] for d in relay_monitors]
    for m in relay_monitors:
        endpoints = m["spec"].get("endpoints") or m["spec"]["podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == ["metrics"], m
        assert m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "herald-relay"
    text = yaml.safe_dump_all(docs)
    assert "port: admin" not in text


def test_the_chart_relay_carries_its_network_policy_and_drain_settings_to_the_operator():
    """The chart renders an SmtpRelay, not relay pods: the operator makes the relay's NetworkPolicy from the
    SmtpRelay's listeners and metrics selector, so the chart renders none of its own and lets the RBAC
    apply it."""
    docs = render("--set", "relay.enabled=true", "--set", "relay.metricsNamespaceSelector.matchLabels.prometheus=yes",
                  "--set", "relay.shutdown.deliveries=2m")
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = find(docs, "SmtpRelay")["spec"]
    assert spec["metrics"]["namespaceSelector"] == {"matchLabels": {"prometheus": "yes"}}
    assert spec["shutdown"] == {"deliveries": "2m"}
    # Without the values the SmtpRelay's own defaults apply (namespace monitoring; 30s, 30s, 10s).
    spec = find(render("--set", "relay.enabled=true"), "SmtpRelay")["spec"]
    assert "namespaceSelector" not in spec["metrics"] and "shutdown" not in spec
    rules = find(render(), "ClusterRole")["rules"]
    assert {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "patch"]} in rules


def test_watch_namespaces_makes_the_operator_namespace_scoped_with_no_cluster_wide_permission():
    cluster = find(render(), "ClusterRole")["rules"]
    docs = render("--set", "watchNamespaces={mail,apps}", namespace="mail")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"}
    bindings = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "RoleBinding"}
    assert sorted(roles) == [("apps", "herald-operator"), ("mail", "herald-operator"), ("mail", "herald-operator-leader")]
    for ns in ("mail", "apps"):
        # The same rules as the ClusterRole, in each watched namespace only, Secrets included.
        assert roles[(ns, "herald-operator")]["rules"] == cluster
        b = bindings[(ns, "herald-operator")]
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "herald-operator"}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "herald-operator", "namespace": "mail"}]
    args = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--watch-namespace")] == ["--watch-namespace=mail", "--watch-namespace=apps"]
    # The chart's own relay must be in a watched namespace, or nothing would ever reconcile it.
    r = helm("template", "herald", str(CHART), "-n", "mail", "--set", "watchNamespaces={apps}", "--set", "relay.enabled=true",
             check=False)
    assert r.returncode != 0 and "watchNamespaces [apps] leaves out" in r.stderr, r.stderr


def test_the_chart_renders_no_trusted_listener_by_default():
    """A trusted listener lets every client of its networks relay without AUTH: the user adds one, with their
    pods' networks; the default is the submission port alone."""
    listeners = find(render("--set", "relay.enabled=true"), "SmtpRelay")["spec"]["listeners"]
    assert listeners == [{"name": "submission", "port": 587, "tls": "starttls", "auth": "required"}], listeners
    assert not any(l.get("allowNetworks") for l in listeners), listeners


def test_a_trusted_listener_the_user_adds_reaches_the_smtp_relay_with_its_trusted_senders():
    trusted = {"name": "trusted", "port": 2525, "allowNetworks": ["10.42.7.0/24"], "trustedSenders": ["example.com"]}
    submission = {"name": "submission", "port": 587, "tls": "starttls", "auth": "required"}
    docs = render("--set", "relay.enabled=true", "--set-json", f"relay.listeners={json.dumps([submission, trusted])}")
    assert find(docs, "SmtpRelay")["spec"]["listeners"] == [submission, trusted]
    # trustedSenders is a list (the CRD's field has one type): `any` alone is the list [any].
    r = helm("template", "herald", str(CHART), "--set", "relay.enabled=true",
             "--set-json", f"relay.listeners={json.dumps([{**trusted, 'trustedSenders': 'any'}])}", check=False)
    assert r.returncode != 0 and "'/relay/listeners/0/trustedSenders'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "setting, path",
    [
        ("replicaCount=abc", "/replicaCount"),
        ("relay.replicas=abc", "/relay/replicas"),
        ("relay.enabled=yes", "/relay/enabled"),
        ("relay.listeners[0].port=smtp", "/relay/listeners/0/port"),
        ("relay.listeners[0].tls=sometimes", "/relay/listeners/0/tls"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("monitoring.prometheusRule.hardBounceRate.percent=lots", "/monitoring/prometheusRule/hardBounceRate/percent"),
        ("monitoring.prometheusRule.queueGrowing.for=half an hour", "/monitoring/prometheusRule/queueGrowing/for"),
        ("relay.replica=3", "/relay"),
        ("relay.shutdown.sessions=half a minute", "/relay/shutdown/sessions"),
        ("relay.metricsNamespaceSelector.matchLabel.a=b", "/relay/metricsNamespaceSelector"),
        ("relay.inboundService.type=External", "/relay/inboundService/type"),
        ("relay.inboundService.ports=25", "/relay/inboundService"),
        ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
    ],
)
def test_values_of_the_wrong_type_are_refused(setting, path):
    r = helm("template", "herald", str(CHART), "--set", setting, check=False)
    assert r.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in r.stderr and f"'{path}'" in r.stderr, r.stderr


def rules_file(tmp_path: Path, *values: str) -> Path:
    rule = find(render(*ALL_ON, *values), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return path


def test_alert_rules_pass_promtool_check_and_the_unit_tests(tmp_path):
    exe = promtool()
    if exe is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = rules_file(tmp_path)
    r = subprocess.run([exe, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool check rules:\n{r.stdout}{r.stderr}\n{rules.read_text()}"
    alerts = [rule["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for rule in g["rules"]]
    assert alerts == [
        "HeraldRelayDown", "HeraldRelayUnavailable", "HeraldQueueGrowing", "HeraldQueueOldestMessageTooOld",
        "HeraldHardBounceRateHigh", "HeraldComplaintRateHigh", "HeraldDeliveriesFailing",
        "HeraldTlsCertificateExpiresSoon", "HeraldStoreDown",
        "HeraldSendingDomainNotVerified", "HeraldOperatorDown", "HeraldReconcileErrors",
    ], alerts
    # The unit tests are written against the default thresholds; rules.yaml sits next to a copy of them.
    tests = tmp_path / "alerts.test.yaml"
    shutil.copy(REPO / "tests" / "chart" / "alerts.test.yaml", tests)
    r = subprocess.run([exe, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, f"promtool test rules:\n{r.stdout}{r.stderr}"
    # The thresholds are the values': with the hard-bounce threshold above the tests' 10%, that alert's
    # firing case fails, so the tests do read the rendered threshold.
    rules_file(tmp_path, "--set", "monitoring.prometheusRule.hardBounceRate.percent=20")
    r = subprocess.run([exe, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "HeraldHardBounceRateHigh" in r.stdout + r.stderr, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------
# Against the test control plane
#
# The install tests come first: in a fresh control plane (CI) it is `helm install` that creates the herald CRDs.


@pytest.fixture
def installed(tmp_path):
    """`helm install` with every switch on into a namespace of the test's own (a unique release name: the
    ClusterRole is named after it); uninstalled afterwards. Yields (namespace, release, NOTES text)."""
    if not kubeconfig():
        pytest.skip("needs a test control plane: run under tests/cluster/run.sh (CI always does)")
    install_crds(PROMETHEUS_CRDS)
    ns = Namespace()
    release = f"herald-{uuid.uuid4().hex[:6]}"
    try:
        out = helm("install", release, str(CHART), "-n", ns.name, *ALL_ON).stdout
        assert "NOTES:" in out, out
        yield ns, release, out[out.index("NOTES:"):]
    finally:
        helm("uninstall", release, "-n", ns.name, "--wait=false", check=False)
        ns.delete()


def notes_command(notes: str, pattern: str) -> str:
    lines = [l.strip() for l in notes.splitlines() if re.search(pattern, l)]
    assert len(lines) == 1, f"{len(lines)} NOTES lines match {pattern!r}:\n{notes}"
    return lines[0]


def bash(script: str) -> str:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{script}\nexited {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def test_helm_install_creates_the_crds_the_operator_and_the_monitoring_objects(installed):
    ns, release, _ = installed
    for crd in ("sendingdomains.herald.dev", "smtprelays.herald.dev", "ippools.herald.dev"):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    op = f"{release}-operator"
    for kind, name in [
        ("deployment", op), ("serviceaccount", op), ("service", op), ("role", f"{op}-leader"),
        ("rolebinding", f"{op}-leader"), ("smtprelay", "relay"), ("servicemonitor", op),
        ("servicemonitor", f"{release}-relay"), ("podmonitor", op), ("podmonitor", f"{release}-relay"),
        ("prometheusrule", release), ("configmap", f"{release}-dashboard"),
    ]:
        obj = get_json(kind, name, ns.name)
        assert obj, f"{kind}/{name} not installed"
        assert obj["metadata"]["annotations"]["meta.helm.sh/release-name"] == release, obj["metadata"]
    for kind in ("clusterrole", "clusterrolebinding"):
        assert kubectl("get", kind, op, "-o", "name").stdout.strip() == f"{kind}.rbac.authorization.k8s.io/{op}"
    dash = get_json("configmap", f"{release}-dashboard", ns.name)
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["herald.json"])["uid"] == "herald-overview"
    # The Deployment is there; its pods would run as the chart's ServiceAccount (no nodes here to run them).
    dep = get_json("deployment", op, ns.name)
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == op


def test_the_operator_with_the_chart_service_account_reconciles_the_chart_relay_and_notes_work(installed, tmp_path, dns):
    ns, release, notes = installed
    sa = f"{release}-operator"
    kc = service_account_kubeconfig(ns.name, sa, tmp_path / "kubeconfig")
    # The identity is the ServiceAccount's, not an administrator's: what its RBAC lacks is refused.
    r = kubectl("--kubeconfig", str(kc), "get", "configmaps", "-n", ns.name, check=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    # NOTES: create the user's password Secret as printed.
    bash(notes_command(notes, r"create secret generic app-smtp-password"))
    op = Operator(tmp_path, dns.address, ns.name, kubeconfig=str(kc))
    try:
        for kind, name in [("secret", "relay-config"), ("secret", "relay-admin-token"), ("statefulset", "relay"),
                           ("service", "relay"), ("service", "relay-headless"), ("poddisruptionbudget", "relay"),
                           ("networkpolicy", "relay")]:
            obj = wait_for(lambda: get_json(kind, name, ns.name), f"{kind}/{name}\n{op.log_text()[-3000:]}")
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
        sts = get_json("statefulset", "relay", ns.name)
        assert sts["spec"]["replicas"] == 2 and sts["spec"]["template"]["spec"]["containers"][0]["image"] == "herald/relay:0.1.0"
        rendered = wait_for(lambda: next((c for c in ((get_json("smtprelay", "relay", ns.name) or {}).get("status") or {})
                                          .get("conditions", []) if c["type"] == "ConfigRendered"), None), "ConfigRendered")
        assert rendered["status"] == "True", rendered
        # NOTES: the SendingDomain as printed, then its records as printed.
        heredoc = re.search(r"^cat <<EOF .*?^EOF$", notes, re.S | re.M)
        assert heredoc, notes
        bash(heredoc.group(0))
        records = wait_for(lambda: ((get_json("sendingdomain", "example-com", ns.name) or {}).get("status") or {}).get("records"),
                           f"example-com's records\n{op.log_text()[-3000:]}")
        printed = bash(notes_command(notes, r"jsonpath='\{range \.status\.records\[\*\]\}\{\.name\}"))
        assert sorted(printed.splitlines()) == sorted(f"{r['name']}\t{r['type']}\t{r['value']}" for r in records)
        # The chart's relay has no public name: the condition printed says which field to set.
        routable = bash(notes_command(notes, r'type=="ReturnPathRoutable"'))
        assert "set spec.hostname of SmtpRelay relay" in routable, routable
        states = bash(notes_command(notes, r"jsonpath='\{range \.status\.records\[\*\]\}\{\.state\}"))
        assert sorted(l.split("\t")[0] for l in states.splitlines()) == ["Missing"] * len(records), states
        # The DNS alert's metric: 0 while records are missing, 1 once they are all published.
        verified = 'herald_operator_sending_domain_verified{name="example-com",namespace="%s"}' % ns.name
        wait_for(lambda: verified + " 0" in op.metrics_text(), "verified = 0")
        dns.zone("example.com")
        for rec in records:
            publish_record(dns, rec)
        wait_for(lambda: verified + " 1" in op.metrics_text(), f"verified = 1\n{op.log_text()[-2000:]}", attempts=300)
        message = bash(notes_command(notes, r'type=="DnsVerified"'))
        assert message.strip() == f"all {len(records)} records are published", message
        # ... and goes with the domain.
        kubectl("delete", "sendingdomain", "example-com", "-n", ns.name)
        wait_for(lambda: "example-com" not in op.metrics_text(), "the deleted domain's series to go", attempts=300)
        assert not rbac_denials(op.log_text()), op.log_text()[-3000:]
    finally:
        op.stop()


SMTP_RELAY = """
apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: { name: other }
spec:
  replicas: 1
  listeners: [ { name: trusted, port: 2525, allowNetworks: [10.0.0.0/8] } ]
"""

ROTATING = """
apiVersion: herald.dev/v1alpha1
kind: SendingDomain
metadata: { name: rotating }
spec:
  domain: rotating.test
  relayRef: { name: other }
  publishWithExternalDns: true
  dkim: { selector: s1, algorithm: ed25519, rotationPeriod: 3s }
"""


def test_the_chart_rbac_covers_every_call_the_operator_makes(installed, tmp_path, dns):
    """What the first reconcile does not reach: the ServiceMonitor of a relay that asks for one (its CRD is
    installed here), an external-dns DNSEndpoint, a DKIM key rotation (the next key is created, merged into
    the active Secret, deleted), the events, and the inbound Service (applied, watched, deleted); all as the
    chart's ServiceAccount."""
    ns, release, _ = installed
    install_crds(TESTDATA / "dnsendpoint-crd.yaml")
    kc = service_account_kubeconfig(ns.name, f"{release}-operator", tmp_path / "kubeconfig")
    op = Operator(tmp_path, dns.address, ns.name, kubeconfig=str(kc))
    try:
        assert ns.apply(SMTP_RELAY).returncode == 0
        assert ns.apply(ROTATING).returncode == 0
        sm = wait_for(lambda: get_json("servicemonitor", "other", ns.name), f"the relay's ServiceMonitor\n{op.log_text()[-3000:]}")
        # its relays get job="herald-relay", which the chart's relaySelector matches
        assert sm["spec"]["jobLabel"] == "app.kubernetes.io/name", sm["spec"]
        wait_for(lambda: get_json("dnsendpoint", "rotating-records", ns.name), f"the DNSEndpoint\n{op.log_text()[-3000:]}")
        status = lambda: (get_json("sendingdomain", "rotating", ns.name) or {}).get("status") or {}
        first = wait_for(lambda: len(status().get("records") or []) >= 4 and status()["records"], "records")
        for rec in first:
            publish_record(dns, rec)
        dkim = lambda: [r for r in status().get("records") or [] if r["purpose"] == "dkim"]
        wait_for(lambda: len(dkim()) == 2, f"the next selector's record\n{op.log_text()[-3000:]}", attempts=300)
        for rec in dkim():
            publish_record(dns, rec)
        wait_for(lambda: status().get("activeSelector", "s1") != "s1", f"the rotation\n{op.log_text()[-3000:]}", attempts=300)
        wait_for(lambda: get_json("secret", "rotating-dkim-next", ns.name) is None, "the next-key Secret deleted")
        events = json.loads(kubectl("get", "events.events.k8s.io", "-n", ns.name, "-o", "json").stdout)["items"]
        reasons = {e["reason"] for e in events if e.get("reportingController") == "herald-operator"}
        assert {"DnsVerified", "DkimKeyRotated"} <= reasons, reasons
        # The inbound Service: applied, its load-balancer address read back (the Services' watch), and
        # deleted when the spec drops it.
        inbound = SMTP_RELAY.replace("  replicas: 1\n", "  replicas: 1\n  hostname: mx.rotating.test\n  inboundService: {}\n")
        assert ns.apply(inbound).returncode == 0
        wait_for(lambda: get_json("service", "other-inbound", ns.name), f"the inbound Service\n{op.log_text()[-3000:]}")
        kubectl("patch", "service", "other-inbound", "-n", ns.name, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.26"}]}}}))
        wait_for(lambda: ((get_json("smtprelay", "other", ns.name).get("status") or {}).get("inbound") or {}).get("addresses") == ["192.0.2.26"],
                 f"the load balancer's address in the relay's status\n{op.log_text()[-3000:]}")
        assert ns.apply(SMTP_RELAY).returncode == 0
        wait_for(lambda: get_json("service", "other-inbound", ns.name) is None, f"the inbound Service deleted\n{op.log_text()[-3000:]}")
        log = op.log_text()
        assert not rbac_denials(log) and "cannot publish an event" not in log, log[-3000:]
    finally:
        op.stop()


def test_a_namespace_scoped_install_reconciles_its_namespace_with_roles_only(tmp_path, dns):
    """`watchNamespaces`: no cluster-wide permission at all, and the operator (as the chart's ServiceAccount,
    watching only that namespace) still makes everything for a relay and a domain there."""
    if not kubeconfig():
        pytest.skip("needs a test control plane: run under tests/cluster/run.sh (CI always does)")
    install_crds(PROMETHEUS_CRDS)
    ns = Namespace()
    release = f"herald-{uuid.uuid4().hex[:6]}"
    op = None
    try:
        helm("install", release, str(CHART), "-n", ns.name, "--set", f"watchNamespaces={{{ns.name}}}",
             "--set", "relay.enabled=true", "--set", "monitoring.serviceMonitor.enabled=true")
        sa = f"{release}-operator"
        assert kubectl("get", "clusterrole", sa, check=False).returncode != 0, "a ClusterRole was installed"
        assert get_json("role", sa, ns.name) and get_json("rolebinding", sa, ns.name)
        kc = service_account_kubeconfig(ns.name, sa, tmp_path / "kubeconfig")
        # Secrets of any other namespace are out of reach.
        r = kubectl("--kubeconfig", str(kc), "get", "secrets", "-n", "default", check=False)
        assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
        kubectl("create", "secret", "generic", "app-smtp-password", "-n", ns.name, "--from-literal=password=pw")
        op = Operator(tmp_path, dns.address, ns.name, ["--watch-namespace", ns.name], kubeconfig=str(kc))
        for kind, name in [("secret", "relay-config"), ("secret", "relay-admin-token"), ("statefulset", "relay"),
                           ("service", "relay-headless"), ("poddisruptionbudget", "relay"), ("networkpolicy", "relay")]:
            wait_for(lambda: get_json(kind, name, ns.name), f"{kind}/{name}\n{op.log_text()[-3000:]}")
        assert ns.apply(ROTATING.replace("relayRef: { name: other }", "relayRef: { name: relay }")
                        .replace("  publishWithExternalDns: true\n", "")).returncode == 0
        wait_for(lambda: ((get_json("sendingdomain", "rotating", ns.name) or {}).get("status") or {}).get("records"),
                 f"the domain's records\n{op.log_text()[-3000:]}")
        assert get_json("secret", "rotating-dkim", ns.name)
        ready = wait_for(lambda: next((c for c in ((get_json("smtprelay", "relay", ns.name) or {}).get("status") or {})
                                       .get("conditions", []) if c["type"] == "ConfigRendered"), None), "ConfigRendered")
        assert ready["status"] == "True", ready
        assert not rbac_denials(op.log_text()), op.log_text()[-3000:]
    finally:
        if op:
            op.stop()
        helm("uninstall", release, "-n", ns.name, "--wait=false", check=False)
        ns.delete()


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
@needs_cluster
def test_the_rendered_manifests_pass_a_server_side_dry_run(values):
    install_crds(PROMETHEUS_CRDS)
    install_crds(HERALD_CRDS)
    ns = Namespace()
    try:
        docs = render(*values, namespace=ns.name)
        r = kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=test", "-f", "-",
                    stdin=yaml.safe_dump_all(docs), check=False)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        lines = r.stdout.splitlines()
        assert len(lines) == len(docs) and all(l.endswith("serverside-applied (server dry run)") for l in lines), r.stdout
        # Nothing was created.
        assert kubectl("get", "deployments", "-n", ns.name, "-o", "name").stdout.strip() == ""
    finally:
        ns.delete()


# ---------------------------------------------------------------------------------------------------------
# The dashboard and the alerts read only metrics Herald exports

BROKEN_RELAY = """
apiVersion: herald.dev/v1alpha1
kind: SmtpRelay
metadata: { name: broken }
spec:
  listeners: [ { name: trusted, port: 2525 } ]
"""

# An immutable Secret where the operator applies the relay's config: the apply fails every time, so the
# reconcile-error counter (which has no series until something fails) is exported.
IMMUTABLE_CONFIG = """
apiVersion: v1
kind: Secret
metadata: { name: broken-config }
immutable: true
stringData: { relay.yaml: "taken" }
"""

DOMAIN = """
apiVersion: herald.dev/v1alpha1
kind: SendingDomain
metadata: { name: example }
spec:
  domain: example.test
  relayRef: { name: broken }
"""


@pytest.fixture
def operator_exposition(tmp_path, dns):
    """The operator's /metrics after it reconciled a SendingDomain and failed a reconcile (every family has a
    series then)."""
    if not kubeconfig():
        pytest.skip("needs a test control plane for the operator: run under tests/cluster/run.sh (CI always does)")
    install_crds(HERALD_CRDS)
    ns = Namespace()
    op = Operator(tmp_path, dns.address, ns.name)
    try:
        for manifest in (IMMUTABLE_CONFIG, BROKEN_RELAY, DOMAIN):
            assert ns.apply(manifest).returncode == 0
        wanted = ("herald_operator_reconcile_errors_total{", "herald_operator_sending_domain_verified{",
                  "herald_operator_reconcile_duration_seconds_bucket{")
        text = wait_for(lambda: (t := op.metrics_text()) and all(w in t for w in wanted) and t,
                        f"every operator family\n{op.metrics_text()}\n{op.log_text()[-2000:]}")
        yield parse(text)
    finally:
        op.stop()
        ns.delete()


def test_the_dashboard_and_the_alerts_use_only_metrics_herald_exports(relays, dns, peers, operator_exposition,
                                                                     store):
    relay, refreshed = relay_with_every_series(relays, dns, peers, "exported", store=store)
    relay_exp = scrape(relay)
    assert refreshed, f"the queue gauges never showed the deferred message:\n{relay_exp.text}"
    types = {**relay_exp.types, **operator_exposition.types}
    exported = set(types) | PROMETHEUS_OWN

    dashboard = json.loads((CHART / "dashboards" / "herald.json").read_text())
    exprs = {}
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            exprs[f"panel {p['title']!r} {t['refId']}"] = t["expr"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            exprs[f"variable {v['name']}"] = v["query"]["query"]
    rule = find(render(*ALL_ON), "PrometheusRule")
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            exprs[f"alert {r['alert']}"] = r["expr"]
    assert len([k for k in exprs if k.startswith("panel")]) >= 20, exprs.keys()

    unknown = {}
    for where, expr in exprs.items():
        names = {family(n, types) for n in metric_names(expr)}
        assert names, f"{where} reads no Herald metric: {expr}"
        if names - exported:
            unknown[where] = sorted(names - exported)
    assert not unknown, f"expressions read metrics nobody exports: {unknown}\nexported: {sorted(exported)}"
    # The promised views are there.
    for family_ in ("herald_messages_received_total", "herald_deliveries_total", "herald_queue_depth",
                    "herald_delivery_latency_seconds", "herald_bounces_total", "herald_smtp_rejections_total",
                    "herald_smtp_sessions"):
        assert any(family_ in e for k, e in exprs.items() if k.startswith("panel")), family_
    assert sum("histogram_quantile" in e and "herald_delivery_latency_seconds_bucket" in e for e in exprs.values()) >= 3


def test_a_smarthost_ca_secret_reaches_the_smtp_relay():
    smarthost = {"host": "smtp.provider.test", "port": 587, "tls": "starttls", "caSecretRef": {"name": "provider-ca"}}
    docs = render("--set", "relay.enabled=true", "--set-json", f"relay.delivery.smarthost={json.dumps(smarthost)}")
    assert find(docs, "SmtpRelay")["spec"]["delivery"]["smarthost"]["caSecretRef"] == {"name": "provider-ca"}


def test_the_chart_valkey_is_a_persistent_store_the_chart_relay_shares_its_suppressions_through():
    """valkey.enabled: one Valkey (the official image, append-only), its Service, a generated password Secret
    and a NetworkPolicy admitting relay pods; the chart's SmtpRelay gets spec.store pointing at it, with the
    password as a Secret key the operator mounts (never in the SmtpRelay or a ConfigMap)."""
    helm("lint", "--strict", str(CHART), "--set", "relay.enabled=true", *VALKEY)
    docs = render("--set", "relay.enabled=true", *VALKEY)
    sts = find(docs, "StatefulSet", "herald-valkey")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"].startswith("valkey/valkey:"), c["image"]
    script = " ".join(c["command"])
    assert "--appendonly yes" in script and "--dir /data" in script, script
    assert "requirepass" in script and "$VALKEY_PASSWORD" in script and "valkey-server" in script
    assert "PONG" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data", "/run/valkey"}
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    secret = find(docs, "Secret", "herald-valkey")
    assert len(secret["data"]["password"]) > 20
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["VALKEY_PASSWORD"] == {"name": "herald-valkey", "key": "password"}
    svc = find(docs, "Service", "herald-valkey")
    assert svc["spec"]["ports"][0]["port"] == 6379
    assert svc["spec"]["selector"].items() <= pod_labels(sts).items()
    policy = find(docs, "NetworkPolicy", "herald-valkey")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "herald-relay"}
    store = find(docs, "SmtpRelay")["spec"]["store"]
    assert store == {"url": "redis://herald-valkey:6379/0", "passwordSecretRef": {"name": "herald-valkey", "key": "password"}}
    # Without the relay the Valkey is there for relays of your own; without valkey.enabled nothing of it is.
    assert find(render(*VALKEY), "StatefulSet", "herald-valkey")
    docs = render("--set", "relay.enabled=true")
    assert not [d for d in docs if "valkey" in d["metadata"]["name"]]
    assert "store" not in find(docs, "SmtpRelay")["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_the_chart_valkey_takes_an_existing_password_secret_and_the_relays_key_prefix():
    docs = render("--set", "relay.enabled=true", *VALKEY, "--set", "valkey.auth.existingSecret=my-valkey",
                  "--set", "valkey.auth.secretKey=pw", "--set", "relay.store.keyPrefix=mail:",
                  "--set", "valkey.image.tag=8.1.1")
    assert not [d for d in docs if d["kind"] == "Secret"], "the user's Secret is used, none generated"
    c = find(docs, "StatefulSet", "herald-valkey")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "valkey/valkey:8.1.1"
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "my-valkey", "key": "pw"}
    store = find(docs, "SmtpRelay")["spec"]["store"]
    assert store["passwordSecretRef"] == {"name": "my-valkey", "key": "pw"} and store["keyPrefix"] == "mail:"


def test_an_external_store_reaches_the_smtp_relay_as_given():
    external = {"url": "rediss://primary.cache.example.com:6379/0", "passwordSecretRef": {"name": "cache", "key": "password"},
                "caSecretRef": {"name": "cache-ca"}, "required": True}
    docs = render("--set", "relay.enabled=true", "--set-json", f"relay.store={json.dumps(external)}")
    assert find(docs, "SmtpRelay")["spec"]["store"] == external
    assert not [d for d in docs if "valkey" in d["metadata"]["name"]]
    by_secret = {"secretRef": {"name": "cache-url", "key": "url"}}
    docs = render("--set", "relay.enabled=true", "--set-json", f"relay.store={json.dumps(by_secret)}")
    assert find(docs, "SmtpRelay")["spec"]["store"] == by_secret


@pytest.mark.parametrize(
    "setting, path",
    [
        ("relay.store.url=redis://:secret@cache:6379", "/relay/store/url"),
        ("relay.store.urls=redis://cache", "/relay/store"),
        ("valkey.enabled=yes", "/valkey/enabled"),
        ("valkey.persistence.size=lots", "/valkey/persistence/size"),
    ],
)
def test_store_values_of_the_wrong_shape_are_refused(setting, path):
    r = helm("template", "herald", str(CHART), "--set", setting, check=False)
    assert r.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in r.stderr and f"'{path}'" in r.stderr, r.stderr
