#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler and etcd) from their Go modules, once per version.
#
# Output: $SANDBOXD_CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION/bin
# (default cache: ~/.cache/sandboxd). A warm cache returns at once.
# Prints the bin directory on stdout as its last line.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE="${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}"
DEST="$CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
BIN="$DEST/bin"
GO_JOBS="${GO_JOBS:-2}"

have_all() {
  for b in kube-apiserver kube-controller-manager kube-scheduler etcd; do
    [ -x "$BIN/$b" ] || return 1
  done
}

if have_all; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "control-plane: the go command is required" >&2; exit 1; }

log() { printf '[control-plane] %s\n' "$*" >&2; }
start=$(date +%s)
work="$DEST/src"
mkdir -p "$work/k8s" "$work/etcd" "$BIN.tmp"

# --- Kubernetes: a wrapper module that replaces the staging modules with
# their published versions (v0.X.Y for Kubernetes v1.X.Y).
minor_patch="${K8S_VERSION#v1.}"
staging_version="v0.$minor_patch"
gomod_file="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
log "resolving k8s.io/kubernetes@$K8S_VERSION"
( cd "$work/k8s" && GOFLAGS=-mod=mod go mod download k8s.io/kubernetes@"$K8S_VERSION" >/dev/null )
[ -f "$gomod_file" ] || { log "go.mod of k8s.io/kubernetes@$K8S_VERSION not found"; exit 1; }
go_line=$(grep -m1 '^go ' "$gomod_file")
{
  echo "module sandboxd.test/controlplane"
  echo
  echo "$go_line"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/' "$gomod_file" \
    | awk -v v="$staging_version" '{ print "\t" $1 " => " $1 " " v }'
  echo ")"
} > "$work/k8s/go.mod"
cat > "$work/k8s/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
cd "$work/k8s"
log "go mod tidy (downloads modules on a cold cache)"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>"$work/k8s/tidy.log" || { cat "$work/k8s/tidy.log" >&2; exit 1; }
ldflags="-s -w"
ldflags+=" -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/component-base/version.gitMinor=${minor_patch%%.*}"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
  t=$(date +%s)
  log "building $cmd $K8S_VERSION"
  CGO_ENABLED=0 go build -p "$GO_JOBS" -trimpath -tags tools -ldflags "$ldflags" \
    -o "$BIN.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  log "built $cmd in $(( $(date +%s) - t ))s"
done

# --- etcd: the server module's main package.
cd "$work/etcd"
cat > go.mod <<GOMOD
module sandboxd.test/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
log "go mod tidy (etcd $ETCD_VERSION)"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
t=$(date +%s)
log "building etcd $ETCD_VERSION"
CGO_ENABLED=0 go build -p "$GO_JOBS" -trimpath -ldflags "-s -w" -o "$BIN.tmp/etcd" go.etcd.io/etcd/server/v3
log "built etcd in $(( $(date +%s) - t ))s"

rm -rf "$BIN"
mv "$BIN.tmp" "$BIN"
log "control plane ready in $(( $(date +%s) - start ))s at $BIN"
echo "$BIN"
