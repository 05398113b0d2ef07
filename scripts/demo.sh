#!/usr/bin/env bash
# make demo: the Azure peer pods guide, step by step, with `sandboxd ctl` on this machine.
#
# A local control plane (etcd, kube-apiserver, controller-manager, scheduler from the cached
# test binaries) and a REAL NODE (`sandboxd dev node`: kubelet, containerd, runc, the CNI
# plugins and kube-proxy in their own network and mount namespaces, with the image from
# `make image` imported). sandboxd is installed from deploy/ as a user would; the operator,
# the webhook, the node installer and the cloud-api-adaptor run as pods on that node, and the
# node installer puts sandboxd's shim on it for kata-remote. The ARM test server stands in
# for Azure: its VMs are the pod VM image `sandboxd image build` makes, booted under qemu
# (TCG) with their NIC in the node's network namespace; the workload's image comes from a
# registry on the test network (Debian's docker-registry). Needs root. Leaves nothing behind.
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
IMAGE_ARCHIVE="${IMAGE_ARCHIVE:-$ROOT/target/oci/sandboxd-dev.tar}"
NS=openshift-sandboxed-containers-operator
APP_NS=demo
SUB=11111111-2222-3333-4444-555555555555
START=$(date +%s)

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
run() { printf '\033[36m$ %s\033[0m\n' "$*"; "$@"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the node needs namespaces, mounts and cgroups): sudo make demo"
[ -x "${SANDBOXD:-/nonexistent}" ] || die "no sandboxd binary: run make dev-build (or set SANDBOXD)"
[ -f "$IMAGE_ARCHIVE" ] || die "no image archive $IMAGE_ARCHIVE: run make image (or set IMAGE_ARCHIVE)"
for tool in ip curl jq runc dbus-daemon iptables nsenter unshare docker-registry skopeo openssl qemu-system-x86_64; do
  command -v "$tool" >/dev/null || die "$tool is required (scripts/bootstrap.sh installs it)"
done
CP_BIN="$("$ROOT/scripts/control-plane.sh" | tail -1)"
NODE_BIN="$("$ROOT/scripts/node.sh" | tail -1)"
TAG=$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"]' "${IMAGE_ARCHIVE%.tar}/index.json")
IMAGE="localhost/sandboxd:$TAG"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sandboxd-demo.XXXXXX")"
PIDS=()
cleanup() {
  set +e
  bold "Teardown"
  if [ -n "${KUBECONFIG:-}" ] && [ -n "${NODE_PID:-}" ]; then
    # Peer pods left by a demo that stopped early would (rightly) hold the KataConfig.
    if kapi GET "/api/v1/namespaces/$APP_NS" >/dev/null 2>&1; then
      say "deleting the demo's workload first"
      kapi DELETE "/api/v1/namespaces/$APP_NS" >/dev/null 2>&1
      for _ in $(seq 120); do
        kapi GET "/api/v1/namespaces/$APP_NS" >/dev/null 2>&1 || break
        sleep 1
      done
    fi
    say "uninstall: the KataConfig first (the node installer restores containerd), then the operator"
    kapi DELETE /apis/kataconfiguration.openshift.io/v1/kataconfigs/cluster-kataconfig >/dev/null 2>&1
    for _ in $(seq 120); do
      kapi GET /apis/kataconfiguration.openshift.io/v1/kataconfigs/cluster-kataconfig >/dev/null 2>&1 || break
      sleep 1
    done
    "$SANDBOXD" ctl uninstall >/dev/null 2>&1
    if [ -n "${ORIGINAL_CONFIG:-}" ]; then
      if cmp -s "$ORIGINAL_CONFIG" "/proc/$(cat "$WORK/node/holder.pid")/root/etc/containerd/config.toml"; then
        say "the node's /etc/containerd/config.toml is byte for byte as before the install"
      else
        say "the node's /etc/containerd/config.toml differs from before the install"
      fi
    fi
  fi
  # Each started process leads its own process group; the node stops its pods itself.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null
    for _ in $(seq 300); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-${PIDS[i]}" 2>/dev/null
  done
  wait 2>/dev/null
  if [ -n "${DEMO_LOGS:-}" ]; then
    mkdir -p "$DEMO_LOGS" && cp "$WORK"/*.log "$DEMO_LOGS"/ && cp -r "$WORK/node/logs" "$DEMO_LOGS/node"
  fi
  rm -rf "$WORK"
  say "processes, pods, namespaces, cgroups, routes and $WORK removed; kernel settings restored"
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
  for f in "$WORK"/*.log "$WORK"/node/logs/*.log; do printf -- '--- %s\n' "$f"; tail -n 15 "$f"; done >&2
  die "timed out waiting for $what"
}
free_port() { shuf -i 20000-60000 -n 1; }

bold "0. A control plane (kube-apiserver, etcd, controller-manager, scheduler)"
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
SLOT=$(cat "$WORK/cp/network.slot")
HOST_IP="10.201.$SLOT.1"
say "API server $SERVER on the port-less bridge sbxcp$SLOT (its Service CIDR is routed there: a dead end)"
ctl() { run "$SANDBOXD" ctl "$@"; }

bold "0. A real node: kubelet, containerd, runc, CNI, kube-proxy (own network and mount namespaces)"
start node "$SANDBOXD" dev node --control-plane-dir "$WORK/cp" --dir "$WORK/node" --bin "$NODE_BIN" \
  --image "localhost/sandboxd=$IMAGE_ARCHIVE" --label topology.kubernetes.io/region=eastus
NODE_PID=${PIDS[-1]}
wait_for "the node" 180 test -f "$WORK/node/ready"
NODE=$(cat "$WORK/node/ready")
ORIGINAL_CONFIG="$WORK/containerd-config.orig"
cp "/proc/$(cat "$WORK/node/holder.pid")/root/etc/containerd/config.toml" "$ORIGINAL_CONFIG"
grep '^node: imported' "$WORK/node.log" | sed 's/^/   /'
say "node $NODE Ready (named by its IP; no route off this machine; logs in $WORK/node/logs)"
say "its system bus has a SYSTEMD STAND-IN: RestartUnit(containerd.service) restarts its containerd"

HOLDER=$(cat "$WORK/node/holder.pid")
NODE_ROOT="/proc/$HOLDER/root"

bold "0. A registry on the test network, holding the workload's image"
REG="$NODE:$(free_port)"
R="$WORK/registry"
mkdir -p "$R/certs" "$R/storage"
# A CA of the demo's own: the node's containerd and the pod VM image trust it, nothing else does.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=sandboxd-demo-registry-ca -keyout "$R/ca.key" -out "$R/certs/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=registry \
  -keyout "$R/tls.key" -out "$R/tls.csr" 2>/dev/null
openssl x509 -req -in "$R/tls.csr" -CA "$R/certs/ca.crt" -CAkey "$R/ca.key" -CAcreateserial -days 1 \
  -extfile <(printf 'subjectAltName=IP:%s\n' "$NODE") -out "$R/tls.crt" 2>/dev/null
cat >"$R/config.yml" <<EOF
version: 0.1
storage: {filesystem: {rootdirectory: $R/storage}}
http: {addr: "$REG", tls: {certificate: $R/tls.crt, key: $R/tls.key}}
EOF
start registry nsenter --net="/proc/$HOLDER/ns/net" -- docker-registry serve "$R/config.yml"
wait_for "the registry" 30 curl -sf --cacert "$R/certs/ca.crt" "https://$REG/v2/"
mkdir -p "$NODE_ROOT/etc/containerd/certs.d/$REG"
cp "$R/certs/ca.crt" "$NODE_ROOT/etc/containerd/certs.d/$REG/ca.crt"
cat >"$NODE_ROOT/etc/containerd/certs.d/$REG/hosts.toml" <<EOF
server = "https://$REG"
[host."https://$REG"]
  capabilities = ["pull", "resolve"]
  ca = "/etc/containerd/certs.d/$REG/ca.crt"
EOF
APP_IMAGE="$REG/sandboxd:$TAG"
run skopeo copy -q --dest-cert-dir "$R/certs" "oci-archive:$IMAGE_ARCHIVE" "docker://$APP_IMAGE"
say "registry $REG (TLS, the demo's CA) in the node's network namespace; the node's containerd trusts it"

bold "0. The pod VM image (sandboxd image build), trusting the registry's CA"
eval "$("$ROOT/scripts/podvm-inputs.sh")"
run "$SANDBOXD" image build --kernel "$KERNEL" --modules-dir "$MODULES_DIR" --systemd-boot "$SYSTEMD_BOOT" \
  --sandboxd "$SANDBOXD" --out "$WORK/podvm" --format qcow2 --ca-certs "$R/certs/ca.crt" >/dev/null
say "$(ls -l "$WORK/podvm/podvm.qcow2" | awk '{printf "%s (%.1f MiB)", $9, $5/1048576}')"

ARM_PORT=$(free_port)
start arm-server env SANDBOXD_NODE_NETNS="/proc/$HOLDER/ns/net" \
  "$SANDBOXD" dev arm-server --addr "$HOST_IP:$ARM_PORT" --lro-ms 100 --seed-subscription "$SUB" \
  --local-vms "$WORK/vms" --local-vm-subnet 10.251.0.0 --local-vm-image "$WORK/podvm/podvm.qcow2"
ARM="http://$HOST_IP:$ARM_PORT/"

bold "Install the operator from deploy/ (the vanilla overlay) — the guide's OLM Subscription"
# The ARM test server is a development endpoint: a command-line flag of the operator, which
# hands it on to the CAA and the image Job it deploys; never the ConfigMap.
ctl install --vanilla --image "$IMAGE" --wait --timeout 180 --dev-arm-endpoint "$ARM"
kapi GET "/api/v1/namespaces/$NS/pods" | jq -r '.items[] | "   pod \(.metadata.name) \(.status.phase) on \(.spec.nodeName)"'
wait_for "the ARM test server" 30 grep -q '^AZURE_IMAGE_ID=' "$WORK/arm-server.log"
IMAGE_ID=$(sed -n 's/^AZURE_IMAGE_ID=//p' "$WORK/arm-server.log")
say "the ARM test server listens on the bridge, where the node's pods reach it; each VM it"
say "creates boots the pod VM image under qemu, its NIC a tap in the node's network namespace"

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

bold "4. KataConfig with peer pods: the node installer pod edits the node's containerd"
ctl kataconfig create --peer-pods
ctl status --watch --timeout 240 || say "(status reported a failure; see above)"
say "the node's CRI now reports these runtime handlers:"
kapi GET "/api/v1/nodes/$NODE" | jq -r '.status.runtimeHandlers[].name | select(. != "") | "     \(.)"'
say "the node installer put sandboxd's shim on the node (it has no kata shim):"
say "     $("$NODE_ROOT/opt/sandboxd/bin/containerd-shim-sandboxd-v2" -v)"
say "the node's containerd was restarted through the systemd stand-in:"
grep 'systemd stand-in' "$WORK/node.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/     /' | tail -2
kapi GET "/api/v1/namespaces/$NS/pods" | jq -r '.items[] | "   pod \(.metadata.name) \(.status.phase)"'

bold "5. VM limit per node"
ctl limit get
ctl limit set 2
for _ in $(seq 60); do
  [ "$(kapi GET "/api/v1/nodes/$NODE" | jq -r '.status.capacity["kata.peerpods.io/vm"] // ""')" = 2 ] && break
  sleep 1
done
say "node capacity kata.peerpods.io/vm: $(kapi GET "/api/v1/nodes/$NODE" | jq -r '.status.capacity["kata.peerpods.io/vm"]')"

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
        image: $APP_IMAGE
        # Any server will do: the image's own ARM test server answers HTTP on 8080.
        args: ["dev", "arm-server", "--addr", "0.0.0.0:8080", "--seed-subscription", "$SUB"]
        resources: {requests: {cpu: 250m, memory: 256Mi}}
EOF
cat >"$WORK/svc.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: $APP_NS}
spec: {selector: {app: hello}, ports: [{port: 80, targetPort: 8080}]}
EOF
cat "$WORK/deploy.yaml"
kapi POST /api/v1/namespaces "$WORK/ns.yaml" >/dev/null
kapi POST "/apis/apps/v1/namespaces/$APP_NS/deployments" "$WORK/deploy.yaml" >/dev/null
for _ in $(seq 60); do
  [ "$(kapi GET "/api/v1/namespaces/$APP_NS/pods" | jq '[.items[] | select(.spec.nodeName)] | length')" -ge 2 ] && break
  sleep 1
done
say "the webhook (registered by Service, reached through kube-proxy) mutated each pod:"
kapi GET "/api/v1/namespaces/$APP_NS/pods" | jq -c '.items[0].spec.containers[0].resources' | sed 's/^/     /'
kapi GET "/api/v1/namespaces/$APP_NS/pods" | jq -c '.items[0].metadata.annotations' | sed 's/^/     /'
say "two pods scheduled (the node advertises kata.peerpods.io/vm=2); their pod VMs boot under qemu..."
running() { [ "$(kapi GET "/api/v1/namespaces/$APP_NS/pods" | jq '[.items[] | select(.status.phase == "Running")] | length')" -ge 2 ]; }
wait_for "two kata-remote pods Running" 300 running
kapi GET "/api/v1/namespaces/$APP_NS/pods" |
  jq -r '.items[] | "     \(.metadata.name) \(.status.phase) node=\(.spec.nodeName // "-") ip=\(.status.podIP // "-")"'
kapi GET "/api/v1/namespaces/$APP_NS/events" |
  jq -r '[.items[] | select(.reason == "FailedScheduling")][0].message // empty' | sed 's/^/   scheduler: /'
say "each Running pod has its PeerPod and its VM (a qemu process of the ARM test server):"
kapi GET "/apis/confidentialcontainers.org/v1alpha1/namespaces/$APP_NS/peerpods" |
  jq -r '.items[] | "     PeerPod \(.metadata.name) instance \(.spec.instanceID | split("/") | last)"'
for vm in "$WORK"/vms/*/; do
  say "     $(basename "$vm"): $(sed -n 's/.*sandboxd-init: \(eth0: [^ ]*\).*/\1/p' "$vm/console.log" | head -1)"
done
kapi POST "/api/v1/namespaces/$APP_NS/services" "$WORK/svc.yaml" >/dev/null
CLUSTER_IP=$(kapi GET "/api/v1/namespaces/$APP_NS/services/hello" | jq -r .spec.clusterIP)
say "a ClusterIP Service reaches them from the host (kube-proxy, the pod's namespace, VXLAN to the VM):"
wait_for "the Service" 60 curl -sf -m 3 "http://$CLUSTER_IP/armtest/resources"
printf '\033[36m$ %s\033[0m\n' "curl http://$CLUSTER_IP/armtest/resources"
curl -sS -m 3 "http://$CLUSTER_IP/armtest/resources" | jq -r '.[:3][]' | sed 's/^/     /'

bold "Doctor: the whole chain"
ctl doctor --dev-arm-endpoint "$ARM" || say "(doctor reported failures above)"

bold "Delete the workload: the pod VMs go with their pods"
kapi DELETE "/apis/apps/v1/namespaces/$APP_NS/deployments/hello" >/dev/null
kapi DELETE "/api/v1/namespaces/$APP_NS/services/hello" >/dev/null
no_vms() { [ -z "$(ls -A "$WORK/vms")" ] && [ "$(kapi GET "/apis/confidentialcontainers.org/v1alpha1/namespaces/$APP_NS/peerpods" | jq '.items | length')" = 0 ]; }
wait_for "the pod VMs deleted" 180 no_vms
say "no VM, no PeerPod left"

bold "7. One more peer pod: its output, read back through kubectl logs"
cat >"$WORK/once.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: hello-once, namespace: $APP_NS}
spec:
  runtimeClassName: kata-remote
  restartPolicy: Never
  containers:
  - {name: hello, image: $APP_IMAGE, args: ["version"]}
EOF
kapi POST "/api/v1/namespaces/$APP_NS/pods" "$WORK/once.yaml" >/dev/null
done_once() { [ "$(kapi GET "/api/v1/namespaces/$APP_NS/pods/hello-once" | jq -r .status.phase)" = Succeeded ]; }
wait_for "hello-once Succeeded" 300 done_once
run "$NODE_BIN/kubectl" -n "$APP_NS" logs hello-once
kapi DELETE "/api/v1/namespaces/$APP_NS" >/dev/null
wait_for "its pod VM deleted" 180 no_vms
