#!/usr/bin/env bash
# Fails if any dependency links OpenSSL or aws-lc: the binary uses rustls with ring only.
set -euo pipefail
bad=0
for crate in openssl-sys openssl aws-lc-sys aws-lc-rs native-tls; do
  if cargo tree --locked --target all -i "$crate" >/dev/null 2>&1; then
    echo "dependency on $crate found:" >&2
    cargo tree --locked --target all -i "$crate" >&2 || true
    bad=1
  fi
done
[ $bad -eq 0 ] && echo "no OpenSSL, no aws-lc, no native-tls"
exit $bad
