#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine (running as root) lacks to build,
# lint and test this repository:
#   - Debian packages: musl-tools (musl-gcc for the static build), skopeo
#     (image checks), ca-certificates (bundled into the image), util-linux
#     (setpriv), iproute2 (ip, network namespaces in tests), jq, qemu-system-x86,
#     qemu-utils and ovmf (the pod VM image boot test); runc,
#     containernetworking-plugins (bridge, host-local, loopback), iptables and
#     dbus-daemon for the test node (scripts/node.sh builds the rest), curl;
#     docker-registry and busybox-static (the agent tests' registry and image);
#     prometheus (promtool checks and tests the alert rules of deploy/monitoring;
#     the Prometheus server renders the dashboard picture of docs/monitoring.md).
#   - rustup: the x86_64-unknown-linux-musl target and the clippy and
#     rustfmt components of the toolchain this repository selects.
#   - Azurite (npm), the storage emulator the image publish tests start, under
#     ${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/azurite.
#
# Idempotent: it checks before it installs, prints each thing it installs
# and how long each stage took, and prints a single line when everything is
# already present.
set -euo pipefail

APT_PACKAGES=(musl-tools skopeo ca-certificates util-linux iproute2 jq qemu-system-x86 qemu-utils ovmf
  runc containernetworking-plugins iptables dbus-daemon curl docker-registry busybox-static prometheus)
RUST_TARGETS=(x86_64-unknown-linux-musl)
RUST_COMPONENTS=(clippy rustfmt)

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Milliseconds since the epoch, from bash's own clock (no fork).
now_ms() {
  local t=${EPOCHREALTIME/[.,]/}
  echo $((t / 1000))
}
elapsed() { # start_ms -> "1.234s"
  local d=$(($(now_ms) - $1))
  printf '%d.%03ds' $((d / 1000)) $((d % 1000))
}

# Run from the repository root so rustup honours a rust-toolchain file there.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

total_start=$(now_ms)
installed_any=0

# --- Debian packages -------------------------------------------------------
stage_start=$(now_ms)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages (${missing[*]}); run as root to install them"
  for pkg in "${missing[@]}"; do log "installing Debian package $pkg"; done
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  log "apt: installed ${#missing[@]} package(s) in $(elapsed "$stage_start")"
  installed_any=1
fi

# --- Rust targets and components -------------------------------------------
command -v rustup >/dev/null 2>&1 || die "rustup is required (the Rust toolchain is expected to be installed by rustup)"

stage_start=$(now_ms)
installed_targets=$(rustup target list --installed)
for target in "${RUST_TARGETS[@]}"; do
  if ! grep -qxF "$target" <<<"$installed_targets"; then
    log "installing rust target $target"
    rustup target add "$target" >/dev/null 2>&1 || die "rustup target add $target failed"
    log "rustup: target $target installed in $(elapsed "$stage_start")"
    installed_any=1
  fi
done

stage_start=$(now_ms)
installed_components=$(rustup component list --installed)
for component in "${RUST_COMPONENTS[@]}"; do
  # Installed components are listed with their host triple: clippy-x86_64-...
  if ! grep -qE "^${component}(-preview)?-" <<<"$installed_components"; then
    log "installing rust component $component"
    rustup component add "$component" >/dev/null 2>&1 || die "rustup component add $component failed"
    log "rustup: component $component installed in $(elapsed "$stage_start")"
    installed_any=1
  fi
done

# --- Azurite (storage emulator of the image publish tests), from npm ----------
AZURITE_VERSION=3.37.0
azurite_dir="${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/azurite"
stage_start=$(now_ms)
if ! grep -qs "\"version\": \"$AZURITE_VERSION\"" "$azurite_dir/node_modules/azurite/package.json"; then
  if ! command -v npm >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "npm is missing (for azurite); run as root to install it"
    log "installing Debian packages nodejs npm"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  log "installing azurite $AZURITE_VERSION into $azurite_dir"
  mkdir -p "$azurite_dir"
  npm install --silent --no-audit --no-fund --prefix "$azurite_dir" "azurite@$AZURITE_VERSION" >/dev/null \
    || die "npm install azurite@$AZURITE_VERSION failed"
  log "npm: azurite installed in $(elapsed "$stage_start")"
  installed_any=1
fi

if [ "$installed_any" -eq 0 ]; then
  log "everything present ($(elapsed "$total_start"))"
else
  log "done in $(elapsed "$total_start")"
fi
