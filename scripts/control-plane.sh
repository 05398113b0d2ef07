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

# --- Kubernetes: the wrapper module shared with scripts/node.sh (scripts/k8s-module.sh).
# shellcheck source=scripts/k8s-module.sh
. "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"
log "go mod tidy of k8s.io/kubernetes@$K8S_VERSION (downloads modules on a cold cache)"
k8s_module "$work/k8s" "$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler
cd "$work/k8s"
ldflags=$(k8s_ldflags "$K8S_VERSION")
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
