#!/usr/bin/env bash
# Renders docs/images/dashboard.png from real data: the peer pods world as local processes
# (a control plane from the cached test binaries; the operator, the webhook and the CAA with
# the local provider, where a pod VM is a network namespace running the forwarder; the ARM
# test server; the kubelet stand-in `sandboxd dev kubelet`, which calls CAA's hypervisor API
# as the kata shim does), with a Prometheus (Debian's `prometheus`) scraping the operator,
# the webhook and CAA every second from the operator's start. The guide's steps run with
# `sandboxd ctl`, then a 3-replica kata-remote Deployment against a VM limit of 2 (one pod
# stays Pending), `ctl doctor`, the deletion; before the teardown
# scripts/dashboard-picture.py plots the main panels of
# deploy/monitoring/dashboards/peer-pods.json with their own queries.
#
# Usage: sudo scripts/dashboard-picture.sh [OUT.png]   (SANDBOXD=<binary> picks the build)
# Needs root (network namespaces), ip, curl, Debian's prometheus and python3-matplotlib.
# Leaves nothing behind.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SANDBOXD="${SANDBOXD:-}"
if [ -z "$SANDBOXD" ]; then
  # The newest build with the `dev` feature: `make dev-build` (static release) or
  # `cargo build --features dev` (debug).
  for b in "$ROOT/target/dev-feature/sandboxd" "$ROOT/target/debug/sandboxd"; do
    if [ -x "$b" ] && { [ -z "$SANDBOXD" ] || [ "$b" -nt "$SANDBOXD" ]; }; then SANDBOXD="$b"; fi
  done
fi
NS=openshift-sandboxed-containers-operator
APP_NS=demo
NODE=worker-0
SUB=11111111-2222-3333-4444-555555555555
START=$(date +%s)
OUT="$(realpath -m "${1:-$ROOT/docs/images/dashboard.png}")"
PLOTTER="$ROOT/scripts/dashboard-picture.py"
export DASHBOARD_PNG="$OUT"

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
run() { printf '\033[36m$ %s\033[0m\n' "$*"; "$@"; }
die() { printf 'dashboard-picture: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (pod VMs are network namespaces)"
command -v prometheus >/dev/null || die "prometheus missing: apt-get install prometheus"
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || die "matplotlib missing: apt-get install python3-matplotlib"
mkdir -p "$(dirname "$OUT")"
[ -x "${SANDBOXD:-/nonexistent}" ] || die "no sandboxd binary: run make dev-build (or set SANDBOXD)"
command -v ip >/dev/null || die "the ip command (iproute2) is required"
command -v curl >/dev/null || die "curl is required"
CP_BIN="$("$ROOT/scripts/control-plane.sh" | tail -1)"

# Short: the pod VMs' agent sockets live below it (unix socket paths are at most 107 bytes).
WORK="$(mktemp -d /tmp/sbxdash.XXXXXX)"
NETNS="sbxdash$$"
PIDS=()
cleanup() {
  set +e
  bold "Teardown"
  # The kubelet stand-in first: it stops the VMs it still runs while CAA is up.
  if [ -n "${KUBELET_PID:-}" ]; then
    kill -TERM "$KUBELET_PID" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$KUBELET_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  # Each started process leads its own process group: its children (control plane
  # components, pod VM processes) go with it.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null
    for _ in $(seq 50); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-${PIDS[i]}" 2>/dev/null
  done
  wait 2>/dev/null
  awk -v w="$WORK" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  ip netns del "$NETNS" 2>/dev/null
  if [ -n "${DEMO_LOGS:-}" ]; then mkdir -p "$DEMO_LOGS" && cp "$WORK"/*.log "$DEMO_LOGS"/; fi
  rm -rf "$WORK"
  say "processes stopped, network namespace $NETNS and $WORK removed"
  say "wall time: $(($(date +%s) - START))s"
}
trap cleanup EXIT

# start NAME CMD...: a background process logging to $WORK/NAME.log
start() {
  local name=$1; shift
  setsid "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
}
wait_for() { # wait_for WHAT SECONDS CMD...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  for f in "$WORK"/*.log; do printf -- '--- %s\n' "$f"; tail -n 15 "$f"; done >&2
  die "timed out waiting for $what"
}
free_port() { shuf -i 20000-60000 -n 1; }

bold "0. A control plane on loopback (kube-apiserver, etcd, controller-manager, scheduler)"
start control-plane "$SANDBOXD" dev control-plane --dir "$WORK/cp" --bin "$CP_BIN"
wait_for "the control plane" 120 test -f "$WORK/cp/admin.kubeconfig"
export KUBECONFIG="$WORK/cp/admin.kubeconfig"
SERVER=$(sed -n 's/^ *server: //p' "$KUBECONFIG")
base64 -d <<<"$(sed -n 's/^ *certificate-authority-data: //p' "$KUBECONFIG")" >"$WORK/ca.crt"
base64 -d <<<"$(sed -n 's/^ *client-certificate-data: //p' "$KUBECONFIG")" >"$WORK/admin.crt"
base64 -d <<<"$(sed -n 's/^ *client-key-data: //p' "$KUBECONFIG")" >"$WORK/admin.key"
# kapi METHOD PATH [YAML-FILE]: the API server with the admin certificate (no kubectl needed).
kapi() {
  local args=(-sS --fail-with-body --cacert "$WORK/ca.crt" --cert "$WORK/admin.crt" --key "$WORK/admin.key" -X "$1")
  if [ $# -gt 2 ]; then args+=(-H 'Content-Type: application/yaml' --data-binary "@$3"); fi
  curl "${args[@]}" "$SERVER$2"
}
say "API server $SERVER, kubeconfig $KUBECONFIG, sandboxd $SANDBOXD"
ctl() { run "$SANDBOXD" ctl "$@"; }

bold "0. The node: network namespace with a bridge (what a worker's CNI has), kubelet stand-in"
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
ip -n "$NETNS" link add br0 type bridge
ip -n "$NETNS" addr add 10.77.0.1/24 dev br0
ip -n "$NETNS" link set br0 up
say "network namespace $NETNS, bridge br0 10.77.0.1/24 (pod IPs 10.77.0.x)"
mkdir -p "$WORK/node"
start kubelet "$SANDBOXD" dev kubelet --kubeconfig "$KUBECONFIG" --node "$NODE" \
  --socket "$WORK/node/hypervisor.sock" --state-dir "$WORK/node" \
  --node-netns "/run/netns/$NETNS" --local-vm-dir "$WORK/node/vms"
KUBELET_PID=$!
say "KUBELET STAND-IN: registers $NODE, runs the node installer protocol on a scratch root,"
say "and for kata-remote pods calls the CAA hypervisor API as the kata shim would."

bold "Install the operator (CRDs, namespace, RBAC, Deployment) — the guide's OLM Subscription"
ctl install --vanilla
OP_PORT=$(free_port); WH_PORT=$(free_port)
start operator "$SANDBOXD" operator --kubeconfig "$KUBECONFIG" --namespace "$NS" \
  --platform kubernetes --no-leader-election --metrics-addr "127.0.0.1:$OP_PORT" \
  --webhook-url "https://127.0.0.1:$WH_PORT"
say "the operator runs as a local process (its Deployment's pod is marked Running by the stand-in)"
CAA_PORT=$(free_port)
if true; then
  # The webhook's CA is known once the operator made it: until then the file holds another
  # CA (Prometheus rereads it when it changes) and those scrapes fail.
  cp "$WORK/ca.crt" "$WORK/webhook-ca.crt"
  cat >"$WORK/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - {job_name: sandboxd-operator, static_configs: [{targets: ['127.0.0.1:$OP_PORT'], labels: {node: $NODE}}]}
  - {job_name: sandboxd-caa, static_configs: [{targets: ['127.0.0.1:$CAA_PORT'], labels: {node: $NODE}}]}
  - {job_name: peer-pods-webhook-svc, scheme: https, tls_config: {ca_file: '$WORK/webhook-ca.crt', server_name: 127.0.0.1},
     static_configs: [{targets: ['127.0.0.1:$WH_PORT'], labels: {node: $NODE}}]}
EOF
  PROM_PORT=$(free_port)
  start prometheus prometheus --config.file "$WORK/prometheus.yml" --storage.tsdb.path "$WORK/prometheus" \
    --web.listen-address "127.0.0.1:$PROM_PORT"
  wait_for "Prometheus" 30 curl -sf "http://127.0.0.1:$PROM_PORT/-/ready"
  say "Prometheus at http://127.0.0.1:$PROM_PORT scrapes the operator, the webhook and CAA every second"
fi

ARM_PORT=$(free_port)
start arm-server "$SANDBOXD" dev arm-server --addr "127.0.0.1:$ARM_PORT" --lro-ms 100 --seed-subscription "$SUB"
wait_for "the ARM test server" 30 grep -q '^AZURE_IMAGE_ID=' "$WORK/arm-server.log"
IMAGE_ID=$(sed -n 's/^AZURE_IMAGE_ID=//p' "$WORK/arm-server.log")
ARM="http://127.0.0.1:$ARM_PORT/"

bold "1. peer-pods-secret (the guide: az ad sp create-for-rbac, then a Secret)"
say "the ARM test server accepts any service principal; the secret is never printed"
export AZURE_CLIENT_SECRET=demo-not-a-real-secret
ctl azure secret \
  --client-id aaaaaaaa-0000-0000-0000-000000000001 --tenant-id aaaaaaaa-0000-0000-0000-000000000002 \
  --subscription-id "$SUB"

bold "2. peer-pods-cm: discovered through ARM (the guide's five az queries)"
ctl azure configmap --subscription "$SUB" --resource-group rg \
  --dev-arm-endpoint "$ARM" --image-id "$IMAGE_ID"

bold "3. ssh-key-secret: generated in memory, nothing to shred"
ctl ssh-key

bold "4. KataConfig with peer pods"
ctl kataconfig create --peer-pods
ctl status --watch --timeout 120 || say "(status reported a failure; see above)"

bold "   the webhook and CAA run as local processes"
wait_for "the webhook serving certificate" 60 kapi GET "/api/v1/namespaces/$NS/secrets/peer-pods-webhook-cert"
mkdir -p "$WORK/webhook-certs"
SECRET_JSON=$(kapi GET "/api/v1/namespaces/$NS/secrets/peer-pods-webhook-cert")
for f in tls.crt tls.key; do
  base64 -d <<<"$(printf '%s' "$SECRET_JSON" | tr -d '\n ' | sed -n "s/.*\"$f\":\"\([^\"]*\)\".*/\1/p")" >"$WORK/webhook-certs/$f"
done
start webhook "$SANDBOXD" webhook --cert-dir "$WORK/webhook-certs" --port "$WH_PORT" --bind-address 127.0.0.1
# The local provider has no instance sizes: the demo's pods use the default size.
start caa env CLOUD_PROVIDER=local VXLAN_PORT=9000 PROXY_TIMEOUT=60s NODE_NAME="$NODE" \
  CAA_METRICS_ADDR="127.0.0.1:$CAA_PORT" \
  SANDBOXD_NODE_NETNS="/run/netns/$NETNS" NODE_IP=10.77.0.1 POD_NAMESPACE="$NS" \
  LOCAL_VM_DIR="$WORK/node/vms" LOCAL_VM_SUBNET=10.250.0.0 \
  "$SANDBOXD" caa --kubeconfig "$KUBECONFIG" --socket "$WORK/node/hypervisor.sock" \
  --pods-dir "$WORK/node/pods" --readiness agent --ssh-public-key /nonexistent
wait_for "the CAA hypervisor socket" 60 test -S "$WORK/node/hypervisor.sock"
say "CAA: CLOUD_PROVIDER=local — a pod VM is a network namespace running the forwarder"
if true; then
  base64 -d <<<"$(printf '%s' "$SECRET_JSON" | tr -d '\n ' | sed -n 's/.*"ca.crt":"\([^"]*\)".*/\1/p')" >"$WORK/webhook-ca.crt"
fi

bold "5. VM limit per node"
ctl limit get
ctl limit set 2
sleep 2

bold "6. A kata-remote Deployment with 3 replicas (limit 2: one stays Pending)"
cat >"$WORK/ns.yaml" <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: $APP_NS}
EOF
cat >"$WORK/deploy.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: $APP_NS}
spec:
  replicas: 3
  selector: {matchLabels: {app: hello}}
  template:
    metadata:
      labels: {app: hello}
    spec:
      runtimeClassName: kata-remote
      containers:
      - name: hello
        image: registry.example.com/hello:1
EOF
cat "$WORK/deploy.yaml"
kapi POST /api/v1/namespaces "$WORK/ns.yaml" >/dev/null
kapi POST "/apis/apps/v1/namespaces/$APP_NS/deployments" "$WORK/deploy.yaml" >/dev/null
sleep 8
say "the webhook's mutation: kata.peerpods.io/vm added (and any cpu/memory requests removed)"
kapi GET "/api/v1/namespaces/$APP_NS/pods" | tr -d ' \n' | grep -o '"resources":{[^}]*}[^}]*}' | head -3 | sed 's/^/   /'
pods() { # NAME PHASE POD-IP of the demo pods
  kapi GET "/api/v1/namespaces/$APP_NS/pods" | tr -d ' \n' | sed 's/{"metadata":{"name":"/\n/g' | tail -n +2 |
    while read -r line || [ -n "$line" ]; do
      printf '%s %s %s\n' "${line%%\"*}" \
        "$(grep -o '"phase":"[A-Za-z]*"' <<<"$line" | cut -d'"' -f4)" \
        "$(grep -o '"podIP":"[0-9.]*"' <<<"$line" | cut -d'"' -f4 || true)"
    done
}
for _ in $(seq 60); do
  [ "$(pods | grep -c ' Running ')" -ge 2 ] && break
  sleep 1
done
say "pods (the third is Pending: the node advertises kata.peerpods.io/vm=2):"
pods | sed 's/^/   /'
kapi GET "/api/v1/namespaces/$APP_NS/events" | tr -d '\n' | grep -o '"message": *"[^"]*Insufficient[^"]*"' | head -1 | sed 's/^/   scheduler: /' || true

bold "   get VMs"
ctl vm list

bold "   reach a pod through its IP, from the node"
POD_IP=$(pods | awk '$2 == "Running" && $3 != "" {print $3; exit}')
if [ -n "$POD_IP" ]; then
  run ip netns exec "$NETNS" curl -sS --max-time 10 "http://$POD_IP:8080/" || say "NOT REACHED (see $WORK/kubelet.log, $WORK/caa.log)"
else
  say "no pod got an IP (see $WORK/kubelet.log)"
fi

bold "Doctor: the whole chain"
ctl doctor --dev-arm-endpoint "$ARM" || say "(doctor reported failures above)"

bold "Delete the workload: StopVM for each VM"
kapi DELETE "/apis/apps/v1/namespaces/$APP_NS/deployments/hello" >/dev/null
kapi DELETE "/api/v1/namespaces/$APP_NS" >/dev/null
for _ in $(seq 60); do
  "$SANDBOXD" ctl vm list 2>/dev/null | grep -q podvm- || break
  sleep 1
done
ctl vm list

bold "Dashboard: the run's series from Prometheus"
sleep 5
run "$PLOTTER" "http://127.0.0.1:$PROM_PORT"
[ -s "$OUT" ] || die "no picture was written"
