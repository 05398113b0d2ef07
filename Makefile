# sandboxd — build, lint, test.
#
#   make test     everything CI runs: installs what is missing, lint, static build, image,
#                 unit and integration tests against a real control plane
#   make build    the static x86_64-unknown-linux-musl binary (profile dist: release + LTO),
#                 as shipped: without the `dev` feature
#   make image    the OCI image (FROM scratch) of that binary plus the pod VM build inputs
#                 (kernel, modules, systemd-boot; PODVM_INPUTS= leaves them out), checked
#                 with skopeo
#   make dev-image  the same image of the binary built with the `dev` feature (ARM test
#                 server, dev environment, local provider, crash points): what the
#                 integration tests, benchmarks and the demo run
#   make lint     rustfmt, clippy, and promtool on the alert rules of deploy/monitoring
#   make demo     the setup guide end to end on this machine, narrated (root), on a real
#                 node (kubelet, containerd, kube-proxy) running the image

SHELL := /bin/bash
CARGO ?= cargo
TARGET := x86_64-unknown-linux-musl
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# Cargo writes both variants to one path; each is copied out under its own name.
DIST_OUT := $(TARGET_DIR)/$(TARGET)/dist/sandboxd
BIN := $(TARGET_DIR)/shipped/sandboxd
DEV_BIN := $(TARGET_DIR)/dev-feature/sandboxd
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE_DIR := $(TARGET_DIR)/oci/sandboxd
DEV_IMAGE_DIR := $(TARGET_DIR)/oci/sandboxd-dev
STAGE := scripts/stage.sh
# The CSV's minKubeVersion (src/ctl/bundle.rs): the validators check deprecated APIs for it.
MIN_KUBE_VERSION := $(shell sed -n 's/^pub const MIN_KUBE_VERSION: &str = "\(.*\)";/\1/p' src/ctl/bundle.rs)
# The image carries the pod VM build inputs so the in-cluster image Job needs nothing else
# (fetched with apt by scripts/podvm-inputs.sh; left out where apt is missing).
PODVM_INPUTS ?= $(shell command -v apt-get >/dev/null 2>&1 && echo --podvm-inputs)
export CARGO_BUILD_JOBS ?= 2

.PHONY: all build dev-build image dev-image lint fmt unit integration test bootstrap control-plane node olm-bundle clean

all: build

bootstrap:
	@$(STAGE) bootstrap scripts/bootstrap.sh

control-plane:
	@$(STAGE) control-plane scripts/control-plane.sh >/dev/null

# The test node's kubelet, kube-proxy, containerd, its runc shim, ctr and pause image.
node: control-plane
	@$(STAGE) node scripts/node.sh >/dev/null

build:
	@$(STAGE) build $(CARGO) build --profile dist --locked --target $(TARGET) --bin sandboxd
	@install -D -m 0755 $(DIST_OUT) $(BIN)
	@ls -l $(BIN) | awk '{printf "binary: %s (%.1f MiB)\n", $$9, $$5/1048576}'

# The same build with the `dev` feature (dependencies are shared; only sandboxd is rebuilt).
dev-build:
	@$(STAGE) dev-build $(CARGO) build --profile dist --locked --target $(TARGET) --bin sandboxd --features dev
	@install -D -m 0755 $(DIST_OUT) $(DEV_BIN)
	@ls -l $(DEV_BIN) | awk '{printf "binary: %s (%.1f MiB)\n", $$9, $$5/1048576}'

image: build
	@$(STAGE) image scripts/oci-image.sh $(PODVM_INPUTS) $(BIN) $(IMAGE_DIR) $(VERSION)

dev-image: dev-build
	@$(STAGE) dev-image scripts/oci-image.sh $(PODVM_INPUTS) $(DEV_BIN) $(DEV_IMAGE_DIR) $(VERSION)

fmt:
	$(CARGO) fmt --all

lint:
	@$(STAGE) fmt $(CARGO) fmt --all -- --check
	@$(STAGE) clippy $(CARGO) clippy --all-targets --locked --features dev -- -D warnings
	@$(STAGE) clippy-shipped $(CARGO) clippy --lib --bins --locked -- -D warnings
	@$(STAGE) no-openssl-no-aws-lc scripts/check-deps.sh
	@$(STAGE) monitoring-rules scripts/check-monitoring.sh

unit:
	@$(STAGE) unit $(CARGO) test --locked --features dev --lib --bins

integration:
	@$(STAGE) integration env SANDBOXD_STATIC_BINARY=$(abspath $(DEV_BIN)) \
		SANDBOXD_IMAGE_ARCHIVE=$(abspath $(DEV_IMAGE_DIR)).tar \
		SANDBOXD_SHIPPED_BINARY=$(abspath $(BIN)) \
		$(CARGO) test --locked --features dev --test integration

# The OLM bundle through the operator framework's own validators (default bundle checks,
# OperatorHub, good practices), built once from github.com/operator-framework/api.
olm-bundle:
	@$(STAGE) olm-bundle scripts/olm-validator.sh --run deploy/olm/bundle $(MIN_KUBE_VERSION)

test: bootstrap control-plane node lint olm-bundle image dev-image unit integration

clean:
	$(CARGO) clean

# The setup guide end to end on this machine, narrated (scripts/demo.sh; needs root): a
# control plane and a real node running the image.
.PHONY: demo
demo: dev-image control-plane node
	SANDBOXD=$(abspath $(DEV_BIN)) IMAGE_ARCHIVE=$(abspath $(DEV_IMAGE_DIR)).tar scripts/demo.sh

# Re-records link/hot-symbols.txt, the functions the linker lays out first (build.rs).
.PHONY: symbol-order
symbol-order:
	scripts/symbol-order.sh

# Benchmark of `sandboxd webhook` against the upstream Go webhook (docs/BENCHMARKS.md).
.PHONY: bench-webhook
bench-webhook: build
	SANDBOXD=$(abspath $(BIN)) scripts/bench-webhook.sh

# Upload throughput of `sandboxd image publish` to Azurite: a dense 256 MiB VHD at 1, 4 and 8
# parallel Put Page requests (docs/image.md).
.PHONY: bench-image
bench-image:
	SANDBOXD_BENCH_IMAGE=1 $(CARGO) test --locked --features dev --test integration -- image_publish::bench_upload_throughput_to_azurite --exact --nocapture

# Every benchmark (docs/BENCHMARKS.md says what each measures and how to read it).
.PHONY: bench
bench: bench-operator bench-caa bench-relay bench-webhook

# Benchmark of `sandboxd operator`: 1000 fake Nodes, one KataConfig (docs/BENCHMARKS.md).
.PHONY: bench-operator
bench-operator: build
	SANDBOXD_BENCH=1 SANDBOXD_BENCH_BIN=$(abspath $(BIN)) \
		$(CARGO) test --locked --features dev --test integration -- operator::bench_1000_nodes_one_kataconfig --exact

# Benchmark of `sandboxd caa` (docs/BENCHMARKS.md): overhead per pod, 100 concurrent pods vs
# one. The CAA under test is the release binary; results are appended to docs/BENCHMARKS.md.
# The test side (ARM test server, ttrpc clients) is built in release too: its CPU shares the
# two cores with the CAA and the API server, where a real ARM would cost none.
.PHONY: bench-caa
bench-caa: build
	SANDBOXD_BENCH_CAA=1 SANDBOXD_BENCH_CAA_BIN=$(abspath $(BIN)) \
		SANDBOXD_BENCH_CAA_OUT=$(abspath docs/BENCHMARKS.md) \
		$(CARGO) test --release --locked --features dev --test integration -- caa::bench_overhead_per_pod_and_100_concurrent_pods_vs_one --exact

# Benchmark of the pod data path (docs/BENCHMARKS.md): small-call latency and 1 MiB message
# throughput through CAA's agent relay + mTLS + the forwarder relay vs a direct unix socket,
# a plain TLS tunnel (byte copies) and a plain TLS echo over loopback. The relays run in the
# (release) test binary.
.PHONY: bench-relay
bench-relay:
	SANDBOXD_BENCH_RELAY=1 $(CARGO) test --release --locked --features dev --test integration -- \
		datapath::bench_relay_latency_and_throughput_vs_direct_socket --exact --nocapture

# Benchmark of the pod VM (docs/BENCHMARKS.md): /init -> agent ready, CreateSandbox -> first
# container running (image uncached and cached) against libcontainer's own part, agent RSS.
# The image boots under qemu (TCG here, KVM where it runs); SANDBOXD_BENCH_PODVM_RUNS runs.
.PHONY: bench-podvm
bench-podvm: build
	SANDBOXD_BENCH_PODVM=1 SANDBOXD_STATIC_BINARY=$(abspath $(BIN)) \
		$(CARGO) test --locked --features dev --test integration -- image::bench_podvm --exact --nocapture

# Benchmark of pod start on the real node (docs/BENCHMARKS.md): create → Ready of a
# kata-remote pod (sandboxd shim, CAA, a qemu pod VM running sandboxd agent) against the same
# pod with runc on the same node, image uncached and cached on the node;
# SANDBOXD_BENCH_RUNS runs (default 3). Needs root, like the node tests.
.PHONY: bench-podstart
bench-podstart: dev-image control-plane node
	SANDBOXD_BENCH_PODSTART=1 SANDBOXD_STATIC_BINARY=$(abspath $(DEV_BIN)) \
		SANDBOXD_IMAGE_ARCHIVE=$(abspath $(DEV_IMAGE_DIR)).tar \
		$(CARGO) test --locked --features dev --test integration -- node::bench_pod_start_kata_remote_vs_runc --exact --nocapture
