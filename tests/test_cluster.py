"""Smoke tests of the test Kubernetes control plane (tests/cluster/): a real kube-apiserver with etcd.

They run when KUBECONFIG is set and skip otherwise; CI runs the whole suite under `tests/cluster/run.sh`, which
starts the control plane and sets KUBECONFIG (and puts its kubectl and helm first on PATH). Locally:

    tests/cluster/run.sh --controller-manager -- python3 -m pytest -q tests/test_cluster.py

Checked: the server version; the project's CRDs (crds/*.yaml, once they exist) and a test CRD apply with
`kubectl apply --server-side`; schema validation (required field, pattern, bounds, CEL rule) rejects invalid
objects naming the field; server-side apply conflicts; the status subresource; RBAC; watches; garbage
collection of owned objects (with kube-controller-manager); `helm lint` and `helm template` on the charts.
Each test gets its own namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO / "tests" / "cluster" / "testdata"
WIDGET_CRD = TESTDATA / "widget-crd.yaml"
CHARTS = [TESTDATA / "chart-smoke"] + sorted(p for p in [REPO / "charts" / "herald"] if (p / "Chart.yaml").exists())

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"),
    reason="KUBECONFIG not set: run under tests/cluster/run.sh (CI does) or point it at a test cluster",
)

# Set by tests/cluster/run.sh: the cluster is its private control plane.
OWN_CLUSTER = os.environ.get("HERALD_CLUSTER") == "1"
HAS_KCM = os.environ.get("HERALD_CLUSTER_CONTROLLER_MANAGER") == "1"


def run(*cmd: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def kubectl(*args: str, **kw) -> subprocess.CompletedProcess:
    return run("kubectl", "--request-timeout=30s", *args, **kw)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH (tests/cluster/run.sh puts the built one there)", pytrace=False)
    return path


def widget(name: str, **spec) -> str:
    return json.dumps(
        {"apiVersion": "test.herald.dev/v1alpha1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}
    )


def apply(namespace: str, manifest: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return kubectl("apply", "--server-side", "-n", namespace, *args, "-f", "-", input=manifest, check=check)


def get(namespace: str, *what: str) -> dict:
    return json.loads(kubectl("get", "-n", namespace, *what, "-o", "json", "--show-managed-fields").stdout)


def can_i(namespace: str, verb: str, user: str) -> str:
    r = kubectl("auth", "can-i", verb, "widgets.test.herald.dev", "-n", namespace, f"--as={user}", check=False)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def widget_crd() -> None:
    tool("kubectl")
    kubectl("apply", "--server-side", "--field-manager=herald-tests", "-f", str(WIDGET_CRD))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.test.herald.dev")


@pytest.fixture
def namespace() -> str:
    """A namespace of the test's own, deleted afterwards (it lingers as Terminating without the controller
    manager's namespace controller, which is harmless: the control plane is thrown away)."""
    tool("kubectl")
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def test_server_version():
    r = kubectl("version", "-o", "json")
    v = json.loads(r.stdout)
    server = v["serverVersion"]["gitVersion"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+.*", server), server
    if OWN_CLUSTER:
        gomod = (REPO / "tests" / "cluster" / "go.mod").read_text()
        want = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", gomod, re.M).group(1)
        assert server == want, f"server reports {server}, tests/cluster/go.mod builds {want}"
        assert v["clientVersion"]["gitVersion"] == want, v["clientVersion"]


def test_project_crds_apply_server_side():
    files = sorted((REPO / "crds").glob("*.yaml")) if (REPO / "crds").is_dir() else []
    if not files:
        pytest.skip("no CRDs in crds/ yet (the test CRD is applied by the other tests)")
    for f in files:
        kubectl("apply", "--server-side", "--field-manager=herald-tests", "-f", str(f))
    for f in files:
        kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(f))


def test_valid_widget_applies(widget_crd, namespace):
    apply(namespace, widget("ok", hostname="relay.example.test", replicas=3))
    assert get(namespace, "widget", "ok")["spec"] == {"hostname": "relay.example.test", "replicas": 3}
    # The schema default fills replicas in.
    apply(namespace, widget("defaulted", hostname="a.example.test"))
    assert get(namespace, "widget", "defaulted")["spec"]["replicas"] == 1


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ({"replicas": 2}, "spec.hostname", "Required value"),
        ({"hostname": "Not_A_Host"}, "spec.hostname", "should match"),
        ({"hostname": "a.example.test", "replicas": 11}, "spec.replicas", "less than or equal to 10"),
        ({"hostname": "a.b", "replicas": 2, "minReplicas": 3}, "spec", "minReplicas must not exceed replicas"),
    ],
    ids=["required", "pattern", "maximum", "cel-rule"],
)
def test_invalid_widget_rejected(widget_crd, namespace, spec, field, words):
    r = apply(namespace, widget("bad", **spec), check=False)
    assert r.returncode != 0, f"accepted: {r.stdout}"
    assert "is invalid" in r.stderr and f"{field}:" in r.stderr and words in r.stderr, r.stderr
    assert kubectl("get", "-n", namespace, "widget", "bad", check=False).returncode != 0


def test_server_side_apply_conflict(widget_crd, namespace):
    apply(namespace, widget("w", hostname="a.example.test", replicas=2), "--field-manager=one")
    r = apply(namespace, widget("w", hostname="a.example.test", replicas=5), "--field-manager=two", check=False)
    assert r.returncode != 0 and "conflict" in r.stderr.lower() and ".spec.replicas" in r.stderr, r.stderr
    apply(namespace, widget("w", hostname="a.example.test", replicas=5), "--field-manager=two", "--force-conflicts")
    got = get(namespace, "widget", "w")
    assert got["spec"]["replicas"] == 5
    managers = {m["manager"] for m in got["metadata"]["managedFields"]}
    assert {"one", "two"} <= managers, managers


def test_status_subresource(widget_crd, namespace):
    apply(namespace, widget("s", hostname="a.example.test"))

    def patch(body: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return kubectl("patch", "-n", namespace, "widget", "s", "--type=merge", "-p", body, *args, check=check)

    # The main resource ignores status; the status subresource ignores spec.
    patch('{"status":{"phase":"Ready"}}')
    assert "status" not in get(namespace, "widget", "s")
    patch('{"status":{"phase":"Ready"},"spec":{"replicas":7}}', "--subresource=status")
    got = get(namespace, "widget", "s")
    assert got["status"] == {"phase": "Ready"} and got["spec"]["replicas"] == 1
    r = patch('{"status":{"phase":"Gone"}}', "--subresource=status", check=False)
    assert r.returncode != 0 and "status.phase" in r.stderr, r.stderr


def test_rbac(widget_crd, namespace):
    sa = f"system:serviceaccount:{namespace}:operator"
    assert can_i(namespace, "create", sa) == "no"
    resource = "--resource=widgets.test.herald.dev"
    kubectl("create", "role", "widgets", "-n", namespace, "--verb=get,list,watch,create", resource)
    binding = f"--serviceaccount={namespace}:operator"
    kubectl("create", "rolebinding", "widgets", "-n", namespace, "--role=widgets", binding)
    deadline = time.monotonic() + 30
    while can_i(namespace, "create", sa) != "yes":
        assert time.monotonic() < deadline, "the RoleBinding never took effect"
        time.sleep(0.2)
    assert can_i(namespace, "delete", sa) == "no"
    r = kubectl("get", "widgets", "-n", "default", f"--as={sa}", check=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr


def test_watch_sees_new_object(widget_crd, namespace):
    watch = subprocess.Popen(
        ["kubectl", "get", "widgets", "-n", namespace, "--watch-only", "-o", "name", "--request-timeout=60s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1)  # let the watch open; an object created before it would not be an event
        apply(namespace, widget("watched", hostname="a.example.test"))
        line = ""
        deadline = time.monotonic() + 30
        while "watched" not in line and time.monotonic() < deadline:
            line = watch.stdout.readline()
            if not line and watch.poll() is not None:
                break
        assert line.strip() == "widget.test.herald.dev/watched", (line, watch.poll())
    finally:
        watch.kill()
        watch.wait(timeout=10)


@pytest.mark.skipif(not HAS_KCM, reason="needs kube-controller-manager (tests/cluster/run.sh --controller-manager)")
def test_owned_objects_garbage_collected(namespace):
    # A built-in owner: the garbage collector learns a custom resource's kind only at its discovery resync,
    # every 30 s (hard-coded in kube-controller-manager), so a CR owner could wait that long after its CRD.
    kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kubectl("get", "-n", namespace, "configmap", "owner", "-o", "jsonpath={.metadata.uid}").stdout.strip()
    owned = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "owned",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    apply(namespace, json.dumps(owned))
    kubectl("delete", "-n", namespace, "configmap", "owner", "--wait=true")
    kubectl("wait", "-n", namespace, "--for=delete", "configmap/owned", "--timeout=60s")


@pytest.mark.parametrize("chart", CHARTS, ids=[c.name for c in CHARTS])
def test_helm_lint_and_template(chart):
    helm = tool("helm")
    run(helm, "lint", "--strict", str(chart))
    out = run(helm, "template", "smoke", str(chart)).stdout
    assert "kind:" in out, out


def test_chart_smoke_dry_runs_on_server(namespace):
    out = run(tool("helm"), "template", "smoke", str(TESTDATA / "chart-smoke"), "--set", "hostname=mx.test").stdout
    r = apply(namespace, out, "--dry-run=server")
    assert "configmap/smoke-smoke serverside-applied (server dry run)" in r.stdout, r.stdout
    assert kubectl("get", "-n", namespace, "configmap", "smoke-smoke", check=False).returncode != 0
