#!/usr/bin/env bash
# Fetches the pod VM image inputs from Debian packages, without root:
#   - the concrete kernel package that linux-image-cloud-amd64 depends on
#     (vmlinuz with the EFI stub, and its modules),
#   - systemd-boot-efi (the UEFI boot manager, systemd-bootx64.efi).
# Each is `apt-get download`ed and unpacked with `dpkg-deb -x` under
# ${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/podvm-inputs. Idempotent: a package
# already unpacked is not fetched again.
#
# Prints the paths `sandboxd image build` takes, one `NAME=PATH` a line:
#   KERNEL=…/boot/vmlinuz-<version>
#   MODULES_DIR=…/lib/modules/<version>
#   SYSTEMD_BOOT=…/usr/lib/systemd/boot/efi/systemd-bootx64.efi
set -euo pipefail

CACHE="${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}/podvm-inputs"
KERNEL_META="${PODVM_KERNEL_PACKAGE:-linux-image-cloud-amd64}"
log() { printf '[podvm-inputs] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v apt-get >/dev/null || die "apt-get is required (a Debian or Ubuntu build machine)"
command -v dpkg-deb >/dev/null || die "dpkg-deb is required"
mkdir -p "$CACHE/debs"

# The concrete kernel package behind the metapackage (linux-image-6.1.0-N-cloud-amd64).
kernel_pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
  sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)
if [ -z "$kernel_pkg" ]; then
  log "no candidate for $KERNEL_META; running apt-get update"
  apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed (run as root once)"
  kernel_pkg=$(apt-cache depends "$KERNEL_META" |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)
fi
[ -n "$kernel_pkg" ] || die "cannot resolve the kernel package behind $KERNEL_META"

# fetch PACKAGE -> unpacked directory on stdout
fetch() {
  local pkg=$1 version dir deb
  version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then die "no candidate version of $pkg"; fi
  dir="$CACHE/$pkg/${version//:/%}"
  if [ ! -e "$dir/.done" ]; then
    log "downloading $pkg $version"
    (cd "$CACHE/debs" && apt-get download -qq "$pkg=$version" >/dev/null) ||
      die "apt-get download $pkg=$version failed"
    deb=$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*.deb" -printf '%T@ %p\n' |
      sort -rn | head -1 | cut -d' ' -f2-)
    rm -rf "$dir" && mkdir -p "$dir"
    dpkg-deb -x "$deb" "$dir"
    touch "$dir/.done"
  fi
  echo "$dir"
}

kdir=$(fetch "$kernel_pkg")
bdir=$(fetch systemd-boot-efi)

kernel=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | head -1)
modules=$( (find "$kdir/lib/modules" "$kdir/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d \
  2>/dev/null || true) | sort | head -1)
sdboot=$(find "$bdir" -name 'systemd-bootx64.efi' | head -1)
[ -f "$kernel" ] || die "no vmlinuz in $kernel_pkg"
[ -d "$modules" ] || die "no modules in $kernel_pkg"
[ -f "$sdboot" ] || die "no systemd-bootx64.efi in systemd-boot-efi"
echo "KERNEL=$kernel"
echo "MODULES_DIR=$modules"
echo "SYSTEMD_BOOT=$sdboot"
