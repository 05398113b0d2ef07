#!/usr/bin/env bash
# Builds the sandboxd container image as an OCI image layout (image-spec 1.1)
# without a container daemon: one reproducible layer (two with --podvm-inputs),
# FROM scratch.
#
# Usage: scripts/oci-image.sh [--podvm-inputs] BINARY OUTDIR [TAG]
#
#   --podvm-inputs  add a second layer with the pod VM build inputs, so the
#           in-cluster image Job (`sandboxd image job`) builds the VHD with
#           nothing else: the kernel, only the kernel modules the image loads
#           (with their dependencies) and systemd-boot, laid out by
#           `sandboxd image stage-inputs` at /usr/share/sandboxd/podvm:
#             vmlinuz, systemd-bootx64.efi, modules/<version>/...
#           The inputs are PODVM_KERNEL, PODVM_MODULES_DIR and
#           PODVM_SYSTEMD_BOOT when all three are set, else what
#           scripts/podvm-inputs.sh fetches. BINARY does the staging unless
#           PODVM_STAGER names another sandboxd (it runs on this machine).
#   BINARY  the static sandboxd binary (x86_64, no ELF interpreter)
#   OUTDIR  directory to write the layout into (replaced if it already holds
#           an OCI layout; refused if it holds anything else)
#   TAG     the reference name in index.json (default: latest); also the
#           org.opencontainers.image.version label (default: dev)
#
# The image contains exactly:
#   /sandboxd                            0755  the binary (the entrypoint)
#   /bin/bash, /usr/bin/gather, /tar     links to /sandboxd: what an `oc adm
#                                        must-gather --image` pod runs (the gather
#                                        and copy containers' `bash -c`, gather,
#                                        and oc's `tar` on PATH=/), answered by the
#                                        binary itself (src/ctl/support_bundle/pod.rs)
#   /etc/ssl/certs/ca-certificates.crt   0644  copied from the host
#   /etc, /etc/ssl, /etc/ssl/certs       0755
#   /tmp                                 1777  (the webhook keeps its
#                                               certificates below /tmp)
#
# Also writes OUTDIR.tar, an oci-archive of the layout. Same inputs give
# byte-identical output. The layer and config timestamps come from
# SOURCE_DATE_EPOCH (default 0). CA_BUNDLE overrides the host CA bundle path.
#
# When skopeo is installed the result is inspected and the entrypoint and
# architecture are checked.
set -euo pipefail
export LC_ALL=C

log() { printf '[oci-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

PODVM=0
if [ "${1:-}" = "--podvm-inputs" ]; then
  PODVM=1
  shift
fi
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 [--podvm-inputs] BINARY OUTDIR [TAG]" >&2
  exit 2
fi

BINARY=$1
OUTDIR=${2%/}
if [ $# -eq 3 ]; then
  TAG=$3
  VERSION=$3
else
  TAG=latest
  VERSION=dev
fi
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}

for tool in tar gzip sha256sum jq; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required (scripts/bootstrap.sh installs it)"
done
tar --version 2>/dev/null | head -n1 | grep -q 'GNU tar' || die "GNU tar is required"

case "$OUTDIR" in ""|.|..|/) die "OUTDIR must name a directory of its own, not '${2}'" ;; esac
[[ $TAG =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid tag: $TAG"
[[ $SOURCE_DATE_EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be a number of seconds"
[ -f "$BINARY" ] || die "binary not found: $BINARY"
[ -f "$CA_BUNDLE" ] || die "CA bundle not found: $CA_BUNDLE"

# The image has no loader and no libc: insist on an x86-64 ELF without an
# interpreter (a static or static-pie executable).
[ "$(head -c4 "$BINARY" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ] || die "$BINARY is not an ELF file"
[ "$(od -An -tx1 -j18 -N2 "$BINARY" | tr -d ' \n')" = "3e00" ] || die "$BINARY is not an x86-64 executable"
if command -v readelf >/dev/null 2>&1 && readelf -lW "$BINARY" 2>/dev/null | grep -q 'INTERP'; then
  die "$BINARY is dynamically linked; the image is FROM scratch and needs a static binary"
fi

if [ -e "$OUTDIR" ]; then
  [ -d "$OUTDIR" ] || die "$OUTDIR exists and is not a directory"
  if [ -n "$(ls -A "$OUTDIR")" ] && [ ! -f "$OUTDIR/oci-layout" ]; then
    die "$OUTDIR is not empty and is not an OCI layout; refusing to replace it"
  fi
fi

created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
work=$(mktemp -d "${TMPDIR:-/tmp}/oci-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Reproducible tar: fixed order, times, owners and pax header names.
repro_tar() {
  tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    "$@"
}
sha256() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
# Moves a file into the blob store; prints its hex digest.
add_blob() {
  local hex
  hex=$(sha256 "$1")
  mv "$1" "$layout/blobs/sha256/$hex"
  chmod 0644 "$layout/blobs/sha256/$hex"
  echo "$hex"
}

# --- Layer ------------------------------------------------------------------
root="$work/rootfs"
install -d -m 0755 "$root" "$root/etc" "$root/etc/ssl" "$root/etc/ssl/certs"
install -m 0755 "$BINARY" "$root/sandboxd"
install -m 0644 "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
mkdir "$root/tmp"
chmod 1777 "$root/tmp"
install -d -m 0755 "$root/bin" "$root/usr" "$root/usr/bin"
ln -s ../sandboxd "$root/bin/bash"
ln -s ../../sandboxd "$root/usr/bin/gather"
ln -s sandboxd "$root/tar"

# add_layer DIR NAME CREATED_BY PATH...: a reproducible gzip layer of PATH... under DIR,
# appended to the manifest's layers, the config's diff_ids and history; its sizes are left
# in added_size (gzip) and added_raw_size.
layers='[]' diff_ids='[]' history='[]'
add_layer() {
  local dir=$1 name=$2 by=$3 diff hex
  shift 3
  repro_tar -C "$dir" -cf "$work/$name.tar" "$@"
  diff=$(sha256 "$work/$name.tar")
  added_raw_size=$(size_of "$work/$name.tar")
  gzip -n -9 -c "$work/$name.tar" >"$work/$name.tar.gz"
  rm -f "$work/$name.tar"
  added_size=$(size_of "$work/$name.tar.gz")
  hex=$(add_blob "$work/$name.tar.gz")
  layers=$(jq -c --arg d "sha256:$hex" --argjson n "$added_size" \
    '. + [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $d, size: $n}]' <<<"$layers")
  diff_ids=$(jq -c --arg d "sha256:$diff" '. + [$d]' <<<"$diff_ids")
  history=$(jq -c --arg c "$created" --arg by "$by" '. + [{created: $c, created_by: $by}]' <<<"$history")
}

add_layer "$root" layer "scripts/oci-image.sh" bin etc sandboxd tar tmp usr
layer_size=$added_size layer_raw_size=$added_raw_size
podvm_size=0

# --- Pod VM build inputs (second layer) --------------------------------------
if [ "$PODVM" = 1 ]; then
  if [ -n "${PODVM_KERNEL:-}" ] && [ -n "${PODVM_MODULES_DIR:-}" ] && [ -n "${PODVM_SYSTEMD_BOOT:-}" ]; then
    kernel=$PODVM_KERNEL modules=$PODVM_MODULES_DIR sdboot=$PODVM_SYSTEMD_BOOT
  else
    inputs=$(bash "$(dirname "$0")/podvm-inputs.sh") || die "scripts/podvm-inputs.sh failed"
    kernel=$(sed -n 's/^KERNEL=//p' <<<"$inputs")
    modules=$(sed -n 's/^MODULES_DIR=//p' <<<"$inputs")
    sdboot=$(sed -n 's/^SYSTEMD_BOOT=//p' <<<"$inputs")
  fi
  proot="$work/podvm"
  stager=${PODVM_STAGER:-$BINARY}
  "$stager" image stage-inputs --kernel "$kernel" --modules-dir "$modules" \
    --systemd-boot "$sdboot" --out "$proot/usr/share/sandboxd/podvm" >/dev/null ||
    die "$stager image stage-inputs failed"
  find "$proot" -type d -exec chmod 0755 {} +
  find "$proot" -type f -exec chmod 0644 {} +
  add_layer "$proot" podvm "scripts/oci-image.sh --podvm-inputs (sandboxd image stage-inputs)" usr
  podvm_size=$added_size podvm_raw_size=$added_raw_size
  log "pod VM inputs layer: $podvm_size bytes gzip ($podvm_raw_size bytes uncompressed)"
fi

# --- Config -----------------------------------------------------------------
jq -cjn \
  --arg created "$created" \
  --argjson diff_ids "$diff_ids" \
  --argjson history "$history" \
  --arg version "$VERSION" \
  '{
    created: $created,
    architecture: "amd64",
    os: "linux",
    config: {
      User: "65532:65532",
      Env: ["PATH=/", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
      Entrypoint: ["/sandboxd"],
      Labels: {
        "org.opencontainers.image.title": "sandboxd",
        "org.opencontainers.image.version": $version
      }
    },
    rootfs: {type: "layers", diff_ids: $diff_ids},
    history: $history
  }' >"$work/config.json"
config_size=$(size_of "$work/config.json")
config_hex=$(add_blob "$work/config.json")

# --- Manifest ---------------------------------------------------------------
jq -cjn \
  --arg config "sha256:$config_hex" --argjson config_size "$config_size" \
  --argjson layers "$layers" \
  '{
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: {
      mediaType: "application/vnd.oci.image.config.v1+json",
      digest: $config,
      size: $config_size
    },
    layers: $layers
  }' >"$work/manifest.json"
manifest_size=$(size_of "$work/manifest.json")
manifest_hex=$(add_blob "$work/manifest.json")

# --- Index and layout marker ------------------------------------------------
jq -cjn \
  --arg manifest "sha256:$manifest_hex" --argjson manifest_size "$manifest_size" \
  --arg tag "$TAG" \
  '{
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [{
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      digest: $manifest,
      size: $manifest_size,
      platform: {architecture: "amd64", os: "linux"},
      annotations: {"org.opencontainers.image.ref.name": $tag}
    }]
  }' >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
chmod 0644 "$layout/index.json" "$layout/oci-layout"
chmod 0755 "$layout" "$layout/blobs" "$layout/blobs/sha256"

# --- Publish: the layout directory and its oci-archive ----------------------
repro_tar -C "$layout" -cf "$work/archive.tar" blobs index.json oci-layout
mkdir -p "$(dirname "$OUTDIR")"
rm -rf "$OUTDIR"
mv "$layout" "$OUTDIR"
mv "$work/archive.tar" "$OUTDIR.tar"
chmod 0644 "$OUTDIR.tar"

# --- Check ------------------------------------------------------------------
if command -v skopeo >/dev/null 2>&1; then
  inspect=$(skopeo inspect "oci:$OUTDIR:$TAG") || die "skopeo inspect oci:$OUTDIR:$TAG failed"
  config=$(skopeo inspect --config "oci:$OUTDIR:$TAG") || die "skopeo inspect --config oci:$OUTDIR:$TAG failed"
  archive_digest=$(skopeo inspect "oci-archive:$OUTDIR.tar" | jq -r .Digest) ||
    die "skopeo inspect oci-archive:$OUTDIR.tar failed"
  jq -e '.Architecture == "amd64" and .Os == "linux"' <<<"$inspect" >/dev/null ||
    die "unexpected platform: $(jq -c '[.Architecture, .Os]' <<<"$inspect")"
  jq -e '.Digest == $d' --arg d "sha256:$manifest_hex" <<<"$inspect" >/dev/null ||
    die "unexpected manifest digest: $(jq -r .Digest <<<"$inspect")"
  [ "$archive_digest" = "sha256:$manifest_hex" ] ||
    die "oci-archive digest $archive_digest differs from the layout's"
  jq -e '.architecture == "amd64" and .config.Entrypoint == ["/sandboxd"]
         and .config.User == "65532:65532"' <<<"$config" >/dev/null ||
    die "unexpected config: $(jq -c '{architecture, Entrypoint: .config.Entrypoint, User: .config.User}' <<<"$config")"
  jq -e '.Layers | length == $n' --argjson n $((1 + PODVM)) <<<"$inspect" >/dev/null ||
    die "unexpected layer count: $(jq -c '.Layers' <<<"$inspect")"
  log "skopeo: oci:$OUTDIR:$TAG and oci-archive:$OUTDIR.tar check out (amd64, entrypoint /sandboxd)"
else
  log "skopeo not installed; skipping the inspection"
fi

total_size=$((config_size + manifest_size + layer_size + podvm_size))
echo "manifest digest: sha256:$manifest_hex"
echo "image size: $total_size bytes (layer $layer_size bytes gzip, $layer_raw_size bytes uncompressed)"
if [ "$PODVM" = 1 ]; then
  echo "pod VM inputs layer: $podvm_size bytes gzip ($podvm_raw_size bytes uncompressed) at /usr/share/sandboxd/podvm"
fi
echo "layout: $OUTDIR (ref $TAG); archive: $OUTDIR.tar"
