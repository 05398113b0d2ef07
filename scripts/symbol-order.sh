#!/usr/bin/env bash
# Regenerates link/hot-symbols.txt: the functions `sandboxd webhook` runs from start-up
# through serving admissions, certificate reload and shutdown, recorded with callgrind on
# an unstripped build of the shipped binary. The linker (build.rs) places these functions
# next to each other at the start of the text segment, so the pages a long-running
# component touches are few and dense instead of spread over the whole 19 MiB binary:
# resident memory of the webhook drops by megabytes (the other components share part of this
# code: runtime, TLS, HTTP). A stale list costs memory only, never correctness: symbols it
# names that no longer exist are ignored by the linker.
#
# Needs valgrind and wrk (Debian packages) and openssl. Takes one static build (~7 min).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$ROOT/link/hot-symbols.txt}
PORT=${PORT:-9466}
BODY=$ROOT/src/webhook/fixtures/kata-remote-pod.json
for tool in valgrind wrk openssl curl; do
  command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done

WORK=$(mktemp -d)
PID=
cleanup() {
  [[ -n $PID ]] && kill "$PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The shipped profile with its symbols kept; only the final link differs from `make build`,
# so the dependencies are not rebuilt. The output replaces the dist binary until the next
# `make build`.
(cd "$ROOT" && cargo rustc --profile dist --locked --target "$TARGET" --bin sandboxd -- -C strip=none)
BIN=$WORK/sandboxd
cp "$TARGET_DIR/$TARGET/dist/sandboxd" "$BIN"

mkdir -p "$WORK/certs"
cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=$1" -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$WORK/certs/tls.key.new" -out "$WORK/certs/tls.crt.new" 2>/dev/null
  mv "$WORK/certs/tls.key.new" "$WORK/certs/tls.key"
  mv "$WORK/certs/tls.crt.new" "$WORK/certs/tls.crt"
}
cert order-1

cat > "$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$BODY"); wrk.body = f:read("*a"); f:close()
EOF

valgrind --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no \
  --callgrind-out-file="$WORK/callgrind.out" \
  "$BIN" webhook --cert-dir "$WORK/certs" --port "$PORT" 2>"$WORK/valgrind.log" &
PID=$!
for _ in $(seq 1 300); do
  curl -sk -o /dev/null "https://127.0.0.1:$PORT/healthz" && break
  sleep 0.2
done
url=https://127.0.0.1:$PORT
curl -sk -o /dev/null "$url/readyz"
curl -sk -o /dev/null "$url/metrics"
curl -sk -o /dev/null -X POST -H 'Content-Type: application/json' -d '{"kind":' "$url/mutate-v1-pod"
wrk -t1 -c8 -d5s -s "$WORK/post.lua" "$url/mutate-v1-pod" >/dev/null
cert order-2
sleep 2
wrk -t1 -c32 -d5s -s "$WORK/post.lua" "$url/mutate-v1-pod" >/dev/null
curl -sk -o /dev/null "$url/metrics"
kill -TERM "$PID"
wait "$PID" || true
PID=

mkdir -p "$(dirname "$OUT")"
{
  echo "# Functions \`sandboxd webhook\` runs, sorted by name; written by scripts/symbol-order.sh,"
  echo "# read by build.rs (the linker's --symbol-ordering-file)."
  # Every function callgrind saw run, as caller (fn=) or callee (cfn=), each once. Sorted, so
  # that a new recording differs from the last only where the set of functions did.
  sed -n 's/^c\{0,1\}fn=\(.*\)$/\1/p' "$WORK/callgrind.out" | grep -v '^0x' | sed "s/'[0-9]*$//" | LC_ALL=C sort -u
} > "$OUT"
echo "$(grep -vc '^#' "$OUT") symbols -> $OUT"
