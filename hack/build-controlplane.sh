#!/usr/bin/env bash
# Builds the upstream control plane volplane's e2e tests and `make run` use:
# kube-apiserver, kube-controller-manager and kube-scheduler from k8s.io/kubernetes,
# etcd from go.etcd.io/etcd/server/v3 and kwok from sigs.k8s.io/kwok, all through
# the Go module proxy. Versions are read from the go.mod files beside this script
# (the one place each is pinned). Binaries land in a cache outside the repo keyed
# by version; a second run finds them there and does nothing.
#
# Prints the bin directory on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${VOLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/volplane}

modversion() { awk -v m="$2" '$1 == "require" && $2 == m {print $3} $1 == m && NF == 2 {print $2}' "$here/$1/go.mod" | head -n1; }
K8S_VERSION=$(modversion k8s k8s.io/kubernetes)
ETCD_VERSION=$(modversion etcd go.etcd.io/etcd/server/v3)
KWOK_VERSION=$(modversion kwok sigs.k8s.io/kwok)
bin="$cache/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin"
mkdir -p "$bin"

export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
start=$SECONDS
built=0

build() { # module output package [ldflags]
  local mod=$1 out=$2 pkg=$3 ldflags=${4:-}
  if [ -x "$bin/$out" ]; then return; fi
  echo "building $out from $pkg" >&2
  (cd "$here/$mod" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$out.tmp" "$pkg")
  mv "$bin/$out.tmp" "$bin/$out"
  built=1
}

# The same version stamps upstream's hack/lib/version.sh writes, so that
# `kubectl version` and /version report the pinned release.
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
kv=""
for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  kv="$kv -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  kv="$kv -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

build k8s kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kv"
build k8s kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kv"
build k8s kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kv"
build etcd etcd .
build kwok kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"

if [ "$built" = 1 ]; then
  echo "control plane built in $((SECONDS - start)) s" >&2
fi
echo "$bin"
