#!/usr/bin/env bash
# Builds the test world's node binaries from their Go modules, once per version:
#   kubelet, kube-proxy, kubectl
#                          k8s.io/kubernetes, the wrapper module of scripts/k8s-module.sh
#                          (the same build and version as the control plane); kubectl is
#                          the tests' client for exec and logs
#   containerd, containerd-shim-runc-v2, ctr
#                          github.com/containerd/containerd/v2 (CGO_ENABLED=0, -tags no_btrfs)
#   pause, pause.tar       the pod sandbox image, built here from a few lines of Go and
#                          written as an oci-archive named $PAUSE_IMAGE, so containerd never
#                          pulls its sandbox image from a registry
# runc and the CNI plugins come from Debian (scripts/bootstrap.sh installs them).
#
# Output: $SANDBOXD_CACHE/node/k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION/bin
# (default cache: ~/.cache/sandboxd). A warm cache returns at once. Prints the bin directory
# on stdout as its last line.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
PAUSE_IMAGE="${PAUSE_IMAGE:-localhost/sandboxd-test/pause:1}"
CACHE="${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}"
DEST="$CACHE/node/k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION"
BIN="$DEST/bin"
GO_JOBS="${GO_JOBS:-2}"
BINARIES=(kubelet kube-proxy kubectl containerd containerd-shim-runc-v2 ctr pause pause.tar)

have_all() {
  for b in "${BINARIES[@]}"; do
    [ -s "$BIN/$b" ] || return 1
  done
}

if have_all; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "node: the go command is required" >&2; exit 1; }
for tool in tar sha256sum jq; do
  command -v "$tool" >/dev/null || { echo "node: $tool is required" >&2; exit 1; }
done

log() { printf '[node] %s\n' "$*" >&2; }
start=$(date +%s)
work="$DEST/src"
mkdir -p "$work" "$BIN.tmp"
# Binaries built by an interrupted run are kept in bin.tmp and not rebuilt.
built() { [ -s "$BIN.tmp/$1" ]; }

# --- containerd 2.x, its runc shim and ctr.
if ! built containerd || ! built containerd-shim-runc-v2 || ! built ctr; then
  mkdir -p "$work/containerd"
  cd "$work/containerd"
  cat > go.mod <<GOMOD
module sandboxd.test/containerd

go 1.24

require github.com/containerd/containerd/v2 $CONTAINERD_VERSION
GOMOD
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
GO
  log "go mod tidy (containerd $CONTAINERD_VERSION)"
  GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
  cldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION#v}"
  cldflags+=" -X github.com/containerd/containerd/v2/version.Revision=sandboxd-test"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    built "$cmd" && continue
    t=$(date +%s)
    log "building $cmd $CONTAINERD_VERSION"
    CGO_ENABLED=0 go build -p "$GO_JOBS" -trimpath -tags "tools no_btrfs" -ldflags "$cldflags" \
      -o "$BIN.tmp/$cmd" "github.com/containerd/containerd/v2/cmd/$cmd"
    log "built $cmd in $(( $(date +%s) - t ))s"
  done
fi

# --- pause: the process that holds a pod sandbox's namespaces. It waits for SIGINT or
# SIGTERM and reaps the children reparented to it.
if ! built pause || ! built pause.tar; then
  mkdir -p "$work/pause"
  cd "$work/pause"
  printf 'module sandboxd.test/pause\n\ngo 1.24\n' > go.mod
  cat > main.go <<'GO'
// The pod sandbox process of the test node: holds the pod's namespaces until told to stop.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN.tmp/pause" .
  # An oci-archive of one layer with /pause, named in index.json, reproducible.
  img="$work/pause/image"
  rm -rf "$img" && mkdir -p "$img/rootfs" "$img/layout/blobs/sha256"
  install -m 0755 "$BIN.tmp/pause" "$img/rootfs/pause"
  repro_tar() {
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime "$@"
  }
  blob() { # FILE -> digest hex, moved into the layout
    local hex
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$img/layout/blobs/sha256/$hex"
    echo "$hex"
  }
  repro_tar -C "$img/rootfs" -cf "$img/layer.tar" pause
  diff_id=$(sha256sum "$img/layer.tar" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$img/layer.tar")
  layer=$(blob "$img/layer.tar")
  jq -cjn --arg d "sha256:$diff_id" '{architecture: "amd64", os: "linux",
      config: {Entrypoint: ["/pause"], User: "65535:65535"},
      rootfs: {type: "layers", diff_ids: [$d]}}' > "$img/config.json"
  config_size=$(stat -c %s "$img/config.json")
  config=$(blob "$img/config.json")
  jq -cjn --arg c "sha256:$config" --argjson cs "$config_size" \
    --arg l "sha256:$layer" --argjson ls "$layer_size" '{schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls}]}' \
    > "$img/manifest.json"
  manifest_size=$(stat -c %s "$img/manifest.json")
  manifest=$(blob "$img/manifest.json")
  jq -cjn --arg m "sha256:$manifest" --argjson ms "$manifest_size" --arg name "$PAUSE_IMAGE" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m,
        size: $ms, platform: {architecture: "amd64", os: "linux"},
        annotations: {"io.containerd.image.name": $name,
                      "org.opencontainers.image.ref.name": ($name | split(":") | last)}}]}' \
    > "$img/layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$img/layout/oci-layout"
  repro_tar -C "$img/layout" -cf "$BIN.tmp/pause.tar" blobs index.json oci-layout
  log "pause image $PAUSE_IMAGE written"
fi

# --- kubelet and kube-proxy: the control plane's wrapper module.
# shellcheck source=scripts/k8s-module.sh
. "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"
if ! built kubelet || ! built kube-proxy || ! built kubectl; then
  log "go mod tidy of k8s.io/kubernetes@$K8S_VERSION"
  k8s_module "$work/k8s" "$K8S_VERSION" kubelet kube-proxy kubectl
  ldflags=$(k8s_ldflags "$K8S_VERSION")
  for cmd in kubelet kube-proxy kubectl; do
    built "$cmd" && continue
    t=$(date +%s)
    log "building $cmd $K8S_VERSION"
    ( cd "$work/k8s" && CGO_ENABLED=0 go build -p "$GO_JOBS" -trimpath -tags tools \
        -ldflags "$ldflags" -o "$BIN.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd" )
    log "built $cmd in $(( $(date +%s) - t ))s"
  done
fi

rm -rf "$BIN"
mv "$BIN.tmp" "$BIN"
printf '%s\n' "$PAUSE_IMAGE" > "$BIN/pause.image"
log "node binaries ready in $(( $(date +%s) - start ))s at $BIN"
echo "$BIN"
