#!/usr/bin/env bash
# Builds upstream's e2e suite binary, e2e.test, from k8s.io/kubernetes/test/e2e at the
# version pinned in hack/k8s/go.mod (`go test -c` in that module, whose tools.go imports
# everything the suite needs and whose replace lines resolve the staging modules).
# Cached by version outside the repo; a second run does nothing.
#
# Prints the binary's path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VOLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/volplane}
K8S_VERSION=$(awk '$1 == "k8s.io/kubernetes" && NF == 2 {print $2} $1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/k8s/go.mod" | head -n1)
out="$cache/e2e-upstream-$K8S_VERSION/e2e.test"
if [ -x "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$(dirname "$out")"

# The version stamps upstream's hack/lib/version.sh writes: the suite reports and
# compares against them (e.g. skips by server version).
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
kv="-s -w"
for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  kv="$kv -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  kv="$kv -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}" GOTOOLCHAIN=local
export GOPROXY=${GOPROXY:-https://proxy.golang.org}
start=$SECONDS
echo "building e2e.test $K8S_VERSION (go test -c k8s.io/kubernetes/test/e2e)" >&2
(cd "$here/k8s" && go test -c -vet=off -trimpath -ldflags "$kv" -o "$out.tmp" k8s.io/kubernetes/test/e2e)
mv "$out.tmp" "$out"
echo "e2e.test built in $((SECONDS - start)) s" >&2
echo "$out"
