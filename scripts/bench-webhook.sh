#!/usr/bin/env bash
# Benchmark `sandboxd webhook` against the upstream Go peer-pods webhook: same certificate,
# same AdmissionReview body (src/webhook/fixtures/kata-remote-pod.json, a 3-container pod
# with an init container), same load generator (wrk) over loopback, each server pinned to
# one core and wrk to the other.
#
# The upstream webhook is built outside the repository, in $BENCH_CACHE, from its Go module
# github.com/confidential-containers/cloud-api-adaptor/src/webhook at $UPSTREAM_VERSION.
# When the module proxy does not serve that module, set UPSTREAM_WEBHOOK_BIN to an upstream
# webhook binary you built yourself. Without either, only sandboxd is measured.
#
# The Go webhook needs a kubeconfig (it starts a controller-runtime manager): any reachable
# API server will do, e.g. the test control plane (KUBECONFIG=...). It binds :9443, so
# sandboxd runs on $SANDBOXD_PORT.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandboxd-bench}
UPSTREAM_VERSION=${UPSTREAM_VERSION:-v0.22.0}
SANDBOXD_PORT=${SANDBOXD_PORT:-9444}
DURATION=${DURATION:-20s}
CONNECTIONS=${CONNECTIONS:-32}
# Paced latency run at a rate both servers hold: RATE_WORKERS connections, each waiting
# 1000*RATE_WORKERS/RATE ms before every request (wrk's delay()), so the offered load is
# about RATE req/s whatever the server's speed.
RATE=${RATE:-500}
RATE_WORKERS=${RATE_WORKERS:-4}
BODY=$ROOT/src/webhook/fixtures/kata-remote-pod.json
SANDBOXD=${SANDBOXD:-${CARGO_TARGET_DIR:-$ROOT/target}/shipped/sandboxd}
mkdir -p "$BENCH_CACHE"
WORK=$(mktemp -d "$BENCH_CACHE/run.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is missing (Debian package wrk)" >&2; exit 1; }
if [[ ! -x $SANDBOXD ]]; then
  make -C "$ROOT" build
fi

# One certificate for both servers, for 127.0.0.1 (openssl is only a test tool here).
CERTS=$WORK/certs
mkdir -p "$CERTS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=bench -addext subjectAltName=IP:127.0.0.1 \
  -keyout "$CERTS/tls.key" -out "$CERTS/tls.crt" 2>/dev/null

# Upstream build (cached per version).
UPSTREAM=${UPSTREAM_WEBHOOK_BIN:-$BENCH_CACHE/upstream-webhook-$UPSTREAM_VERSION}
if [[ ! -x $UPSTREAM ]]; then
  SRC=
  MOD=$BENCH_CACHE/modsrc
  mkdir -p "$MOD"
  if (cd "$MOD" && GOFLAGS=-mod=mod go mod download -json \
      "github.com/confidential-containers/cloud-api-adaptor/src/webhook@$UPSTREAM_VERSION" \
      > "$MOD/download.json" 2>/dev/null); then
    SRC=$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' "$MOD/download.json")
  fi
  if [[ -n $SRC ]]; then
    BUILD=$BENCH_CACHE/upstream-src-$UPSTREAM_VERSION
    rm -rf "$BUILD" && cp -r "$SRC" "$BUILD" && chmod -R u+w "$BUILD"
    (cd "$BUILD" && CGO_ENABLED=0 go build -o "$UPSTREAM" .)
  else
    echo "upstream webhook $UPSTREAM_VERSION is not available from the module proxy;" \
         "set UPSTREAM_WEBHOOK_BIN to measure it" >&2
  fi
fi

rss_kib() { awk '$1 == "VmHWM:" {print $2}' "/proc/$1/status"; }
rps() { awk '$1 == "Requests/sec:" {print $2}'; }
pct() { awk -v p="$1" '$1 == p {print $2}'; }

wait_tls() {
  for _ in $(seq 1 100); do
    if curl -sk -o /dev/null "https://127.0.0.1:$1/mutate-v1-pod" -X POST -d @"$BODY" \
        -H 'Content-Type: application/json'; then return 0; fi
    sleep 0.2
  done
  echo "server on port $1 did not come up" >&2; return 1
}

LUA=$WORK/post.lua
cat > "$LUA" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$BODY", "r")
wrk.body = f:read("*a")
f:close()
LUA
PACED=$WORK/paced.lua
cat "$LUA" > "$PACED"
echo "function delay() return $((1000 * RATE_WORKERS / RATE)) end" >> "$PACED"
# The floor of this machine: the same paced run of a request that does no work (GET of a
# path neither server serves: TLS, HTTP and a 404), so the paced latency can be read
# against what any server here gets.
FLOOR=$WORK/floor.lua
echo "function delay() return $((1000 * RATE_WORKERS / RATE)) end" > "$FLOOR"

measure() { # name port pid
  local name=$1 port=$2 pid=$3
  # Warm up, then throughput at $CONNECTIONS connections, then latency at one connection.
  taskset -c 1 wrk -t1 -c4 -d3s -s "$LUA" "https://127.0.0.1:$port/mutate-v1-pod" >/dev/null
  local max lat
  max=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$LUA" --latency \
        "https://127.0.0.1:$port/mutate-v1-pod")
  lat=$(taskset -c 1 wrk -t1 -c1 -d"$DURATION" -s "$LUA" --latency \
        "https://127.0.0.1:$port/mutate-v1-pod")
  local fixed
  fixed=$(taskset -c 1 wrk -t1 -c"$RATE_WORKERS" -d"$DURATION" -s "$PACED" --latency \
          "https://127.0.0.1:$port/mutate-v1-pod")
  local floor
  floor=$(taskset -c 1 wrk -t1 -c"$RATE_WORKERS" -d"$DURATION" -s "$FLOOR" --latency \
          "https://127.0.0.1:$port/no-such-path")
  local rps1 p50 p99 rps2 l50 l99 f50 f99 frps n50 n99
  rps1=$(rps <<<"$max"); p50=$(pct 50% <<<"$max"); p99=$(pct 99% <<<"$max")
  rps2=$(rps <<<"$lat"); l50=$(pct 50% <<<"$lat"); l99=$(pct 99% <<<"$lat")
  frps=$(rps <<<"$fixed"); f50=$(pct 50% <<<"$fixed"); f99=$(pct 99% <<<"$fixed")
  n50=$(pct 50% <<<"$floor"); n99=$(pct 99% <<<"$floor")
  printf '%s\t%s\t%s\t%s\t%s\t%s/%s\t%s: %s/%s\t%s/%s\t%s KiB\n' \
    "$name" "$rps1" "$p50" "$p99" "$rps2" "$l50" "$l99" "$frps" "$f50" "$f99" "$n50" "$n99" \
    "$(rss_kib "$pid")"
  grep -qE "Non-2xx|Socket errors" <<<"$max$lat$fixed" && { echo "$name: errors during the run:" >&2; grep -E "Non-2xx|Socket errors" <<<"$max$lat$fixed" >&2; }
  return 0
}

echo -e "server\treq/s (c=$CONNECTIONS)\tp50\tp99\treq/s (c=1)\tp50/p99 (c=1)\tat ${RATE}/s: req/s p50/p99\tfloor p50/p99 (no-op at ${RATE}/s)\tpeak RSS"

taskset -c 0 "$SANDBOXD" webhook --cert-dir "$CERTS" --port "$SANDBOXD_PORT" \
  --bind-address 127.0.0.1 --log-level warn &
PIDS+=($!)
wait_tls "$SANDBOXD_PORT"
measure sandboxd "$SANDBOXD_PORT" "${PIDS[-1]}"

if [[ -x $UPSTREAM ]]; then
  : "${KUBECONFIG:?the Go webhook needs KUBECONFIG (e.g. the test control plane kubeconfig)}"
  # controller-runtime reads certificates from its default directory.
  mkdir -p /tmp/k8s-webhook-server
  rm -rf /tmp/k8s-webhook-server/serving-certs
  cp -r "$CERTS" /tmp/k8s-webhook-server/serving-certs
  TARGET_RUNTIMECLASS=kata-remote GOMAXPROCS=1 taskset -c 0 "$UPSTREAM" \
    --metrics-bind-address=0 --health-probe-bind-address=127.0.0.1:0 2>"$WORK/upstream.log" &
  PIDS+=($!)
  wait_tls 9443 || { tail -20 "$WORK/upstream.log" >&2; exit 1; }
  measure upstream-go "9443" "${PIDS[-1]}"
fi
