#!/usr/bin/env bash
# Builds the test control plane from Go modules: etcd, kube-apiserver, kube-controller-manager, kubectl
# (through the wrapper module beside this script) and helm (go install from the module proxy).
#
#   tests/cluster/build.sh            build what is missing; print the bin directory on stdout
#
# Binaries are cached in ${HERALD_CLUSTER_CACHE:-$HOME/.cache/herald-cluster}/<version>-<hash>/bin, keyed by
# go.mod, go.sum and the recipe below, so a second run is instant. Progress goes to stderr. Honours GOFLAGS
# (e.g. GOFLAGS=-p=1 on a busy machine) and GOCACHE/GOMODCACHE. Needs Go >= the go line of go.mod.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

HELM_VERSION=v4.3.1
# Bump when the build commands below change, so caches built by an older recipe are not reused.
RECIPE=1

k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")"
if [[ ! "$k8s_version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
  echo "build.sh: no k8s.io/kubernetes version in go.mod" >&2
  exit 1
fi
k8s_major="${BASH_REMATCH[1]}" k8s_minor="${BASH_REMATCH[2]}"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")"

key="$( { cat "$here/go.mod" "$here/go.sum"; echo "helm=$HELM_VERSION recipe=$RECIPE"; } | sha256sum | cut -c1-12)"
cache="${HERALD_CLUSTER_CACHE:-$HOME/.cache/herald-cluster}"
dest="$cache/$k8s_version-$key"
bins=(etcd kube-apiserver kube-controller-manager kubectl helm)

complete() { [[ -f "$dest/.complete" ]]; }
if complete; then
  echo "$dest/bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
mkdir -p "$cache"
# One build at a time per cache; a second caller waits, then finds the finished build.
exec 9>"$cache/.lock"
flock 9
if complete; then
  echo "$dest/bin"
  exit 0
fi

tmp="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"
start=$SECONDS
echo "build.sh: building Kubernetes $k8s_version, etcd $etcd_version, helm $HELM_VERSION into $dest" \
  "(the first build takes about 15 minutes)" >&2

export CGO_ENABLED=0 GOTOOLCHAIN=local
goflags=(-trimpath -buildvcs=false)

# The same -X stamps as Kubernetes' hack/lib/version.sh; without them the binaries report v0.0.0-master.
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

(
  cd "$here"
  echo "build.sh: kube-apiserver, kube-controller-manager, kubectl" >&2
  go build "${goflags[@]}" -mod=readonly -tags selinux,notest,grpcnotrace -ldflags "$k8s_ldflags" -o "$tmp/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
  echo "build.sh: etcd" >&2
  go build "${goflags[@]}" -mod=readonly -ldflags "-s -w" -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3
)
echo "build.sh: helm" >&2
# go install pkg@version resolves helm's own go.mod, outside the wrapper module.
GOBIN="$tmp/bin" go install "${goflags[@]}" -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"

for b in "${bins[@]}"; do
  [[ -x "$tmp/bin/$b" ]] || { echo "build.sh: $b was not built" >&2; exit 1; }
done
"$tmp/bin/kube-apiserver" --version >&2
"$tmp/bin/kubectl" version --client >&2
# Not `| head -1`: under pipefail, etcd writing on after head exits fails the build with SIGPIPE.
"$tmp/bin/etcd" --version | sed -n 1p >&2
"$tmp/bin/helm" version --short >&2

rm -rf "$dest"
touch "$tmp/.complete"
mv "$tmp" "$dest"
trap - EXIT
echo "build.sh: done in $((SECONDS - start)) s" >&2
echo "$dest/bin"
