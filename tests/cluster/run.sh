#!/usr/bin/env bash
# Runs a command against a private Kubernetes control plane on loopback.
#
#   tests/cluster/run.sh [--controller-manager] -- COMMAND [ARGS...]
#
# Builds (or takes from the cache) the binaries with build.sh, starts etcd and kube-apiserver on free
# 127.0.0.1 ports with a fresh CA, serving and client certificates (openssl), writes an admin kubeconfig,
# waits for /readyz, then runs COMMAND with KUBECONFIG set and the binaries' directory (kubectl, helm, ...)
# first on PATH. Exits with COMMAND's exit code. Every process it started is killed by PID and its
# temporary directory removed on exit, on failure and on Ctrl-C.
#
# --controller-manager  also run kube-controller-manager (garbage collection of owned objects, namespace
#                       deletion, Deployment/ReplicaSet/StatefulSet controllers; no kubelet, so no pods run)
#
# Exported to COMMAND: KUBECONFIG, HERALD_CLUSTER=1, HERALD_CLUSTER_CONTROLLER_MANAGER=0|1, PATH.
# Environment: HERALD_CLUSTER_BIN  use binaries from this directory instead of build.sh
#              HERALD_CLUSTER_TIMEOUT  seconds to wait for readiness (default 90)
#              HERALD_CLUSTER_LOG_DIR  keep the components' logs here (default: a temp dir, removed)
# shellcheck disable=SC2317  # functions called from traps
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

usage() { echo "usage: $0 [--controller-manager] -- COMMAND [ARGS...]" >&2; exit 2; }
with_kcm=0
while (($#)); do
  case "$1" in
    --controller-manager) with_kcm=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
(($#)) || usage
timeout_s="${HERALD_CLUSTER_TIMEOUT:-90}"

log() { echo "run.sh: $*" >&2; }

for tool in openssl curl python3; do
  command -v "$tool" >/dev/null || { log "$tool is not installed"; exit 1; }
done
bin="${HERALD_CLUSTER_BIN:-$("$here/build.sh")}"
for b in etcd kube-apiserver kubectl; do
  [[ -x "$bin/$b" ]] || { log "$bin/$b is missing"; exit 1; }
done

tmp="$(mktemp -d "${TMPDIR:-/tmp}/herald-cluster.XXXXXX")"
logs="${HERALD_CLUSTER_LOG_DIR:-$tmp/logs}"
mkdir -p "$logs"
pids=()

stop_all() {
  local pid i
  # Newest first (controller-manager, apiserver, then etcd), each given 5 s to exit before SIGKILL.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid="${pids[i]}"
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
cleanup() {
  stop_all
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- certificates: one CA signs the apiserver's serving certificate and the admin's client certificate.
pki="$tmp/pki"
mkdir -p "$pki"
(
  cd "$pki"
  newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 7 -subj "/CN=herald-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  sign() { # name subject extensions
    newkey "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 7 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  sans="IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  sign apiserver "/CN=kube-apiserver" "extendedKeyUsage=serverAuth
subjectAltName=$sans,DNS:kubernetes.default.svc.cluster.local"
  sign admin "/O=system:masters/CN=herald-admin" "extendedKeyUsage=clientAuth"
  newkey sa.key
  openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
)

free_ports() { # prints N currently free loopback ports
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

b64() { base64 -w0 < "$1"; }
write_kubeconfig() { # file server
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: herald-test
  cluster:
    server: $2
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: herald-admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
contexts:
- name: herald-test
  context: { cluster: herald-test, user: herald-admin, namespace: default }
current-context: herald-test
EOF
  chmod 600 "$1"
}

# wait_for NAME PID URL WANT [curl options]: polls URL until its body contains WANT, the process dies or
# time runs out.
wait_for() {
  local name="$1" pid="$2" url="$3" want="$4"
  shift 4
  local deadline=$((SECONDS + timeout_s))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during start-up; last lines of $logs/$name.log:"
      tail -n 30 "$logs/$name.log" >&2
      return 1
    fi
    if [[ "$(curl -sf --max-time 2 "$@" "$url" 2>/dev/null)" == *"$want"* ]]; then
      return 0
    fi
    sleep 0.2
  done
  log "$name not ready after ${timeout_s} s; last lines of $logs/$name.log:"
  tail -n 30 "$logs/$name.log" >&2
  return 1
}

start_cluster() {
  local etcd_port peer_port api_port kcm_port
  read -r etcd_port peer_port api_port kcm_port < <(free_ports 4)
  rm -rf "$tmp/etcd" "$tmp/apiserver" "$tmp/kcm"
  server="https://127.0.0.1:$api_port"

  "$bin/etcd" --name herald-test --data-dir "$tmp/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "herald-test=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn \
    > "$logs/etcd.log" 2>&1 &
  pids+=($!)
  wait_for etcd $! "http://127.0.0.1:$etcd_port/health" '"health":"true"' || return 1

  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --secure-port "$api_port" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
    --cert-dir "$tmp/apiserver" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --authorization-mode RBAC --disable-admission-plugins ServiceAccount --endpoint-reconciler-type none \
    --allow-privileged=true \
    > "$logs/kube-apiserver.log" 2>&1 &
  pids+=($!)
  wait_for kube-apiserver $! "$server/readyz" ok --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    || return 1
  write_kubeconfig "$tmp/kubeconfig" "$server"

  if ((with_kcm)); then
    "$bin/kube-controller-manager" \
      --kubeconfig "$tmp/kubeconfig" --authentication-kubeconfig "$tmp/kubeconfig" \
      --authorization-kubeconfig "$tmp/kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$tmp/kcm" --leader-elect=false \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
      > "$logs/kube-controller-manager.log" 2>&1 &
    pids+=($!)
    wait_for kube-controller-manager $! "https://127.0.0.1:$kcm_port/healthz" ok -k || return 1
  fi
}

started=$(date +%s%N)
for attempt in 1 2 3; do
  # A free port can be taken by someone else between the probe and the bind: start again on new ones.
  start_cluster && break
  stop_all
  ((attempt < 3)) || { log "control plane did not start"; exit 1; }
  log "start-up failed; trying again on other ports"
done
elapsed_ms=$((($(date +%s%N) - started) / 1000000))
log "control plane ready at $server in $((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000))) s" \
  "(kubeconfig $tmp/kubeconfig)"

export KUBECONFIG="$tmp/kubeconfig" HERALD_CLUSTER=1 HERALD_CLUSTER_CONTROLLER_MANAGER="$with_kcm" PATH="$bin:$PATH"
rc=0
if [[ -t 0 ]]; then
  # At a terminal the command runs in the foreground: Ctrl-C reaches it, and the cleanup follows its exit.
  "$@" || rc=$?
  exit "$rc"
fi
# Otherwise (CI) it runs in the background, its stdin passed on, so that a SIGTERM or SIGINT to this script
# is handled at once: the command and its descendants get SIGTERM, then the control plane is stopped.
cmd=""
descendants() {
  local p
  for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$p"; descendants "$p"; done
}
stop_cmd() {
  [[ -n "$cmd" ]] || exit "$1"
  local -a tree
  mapfile -t tree < <(descendants "$cmd")
  tree=("$cmd" "${tree[@]}")
  kill -TERM "${tree[@]}" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$cmd" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "${tree[@]}" 2>/dev/null || true
  exit "$1"
}
trap 'stop_cmd 130' INT
trap 'stop_cmd 143' TERM
"$@" <&0 &
cmd=$!
wait "$cmd" || rc=$?
# A trapped signal interrupts wait; the trap exits. Otherwise this is the command's own status.
cmd=""
exit "$rc"
