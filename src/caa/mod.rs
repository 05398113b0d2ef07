//! `sandboxd caa`: the cloud-api-adaptor of one worker node. It serves the remote hypervisor
//! API (`hypervisor.Hypervisor`, `podvminfo.PodVMInfo`) over ttrpc on a unix socket and
//! drives pod VMs through a cloud [`Provider`](crate::cloud::Provider).
//!
//! Zero leaks by design: a `PeerPod` (owned by the pod, finalizer `peer.pod/finalizer`)
//! records the deterministic VM name before any create call; on start every PeerPod of the
//! node is reconciled; a periodic sweep deletes VMs carrying this cluster's and node's tags
//! that no PeerPod references. The one Kubernetes write on a pod's critical path is that
//! record: the other writes (phase, instance id, IP, the release of a record whose VM is
//! gone) overlap the cloud calls or follow in the background, ordered per record.

pub mod crashpoint;
mod datapath;
mod error;
mod metrics;
pub mod noderelay;
pub mod pki;
mod pods;
pub mod relay;
mod service;
mod state;
mod sweep;
pub(crate) mod tunnel;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use error::Error;
pub(crate) use service::Caa;

/// Readiness modes of StartVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Readiness {
    /// ARM says Succeeded and the VM has an IP.
    Provisioned,
    /// Provisioned, and the kata agent in the VM answers a health check through its
    /// forwarder (the default: the shim's own first health check has only 30 s).
    Agent,
}

/// Flags of `sandboxd caa`, as the DaemonSet gives them (the `peer-pods-cm` and
/// `peer-pods-secret` keys arrive as environment variables through `envFrom`).
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Kubernetes client flags.
    #[command(flatten)]
    pub(crate) kube: crate::k8s::KubeArgs,
    /// Unix socket of the remote hypervisor service.
    #[arg(long, env = "CAA_SOCKET", default_value = crate::api::names::HYPERVISOR_SOCKET)]
    pub(crate) socket: PathBuf,
    /// The node agent relay's control socket (`sandboxd caa-relay`, its own DaemonSet):
    /// when set, the relay serves the pods' agent sockets and the hypervisor socket in
    /// front of `--socket`, so they outlive this process; unset, CAA serves them itself.
    #[arg(long, env = "CAA_RELAY_SOCKET")]
    pub(crate) relay_socket: Option<PathBuf>,
    /// Directory of per-pod agent sockets.
    #[arg(long, env = "CAA_PODS_DIR", default_value = crate::api::names::PODS_DIR)]
    pub(crate) pods_dir: PathBuf,
    /// This node's name (downward API).
    #[arg(long, env = "NODE_NAME")]
    pub(crate) node_name: String,
    /// This node's IP (downward API `status.hostIP`): the worker end of every pod tunnel.
    #[arg(long, env = "NODE_IP")]
    pub(crate) node_ip: Option<String>,
    /// This node's IPs, comma-separated (downward API `status.hostIPs`, dual stack): the
    /// first IPv4 one is used.
    #[arg(long, env = "NODE_IPS")]
    pub(crate) node_ips: Option<String>,
    /// When StartVM returns.
    #[arg(long, env = "CAA_READINESS", value_enum, default_value = "agent")]
    pub(crate) readiness: Readiness,
    /// SSH public key file put on every VM.
    #[arg(
        long,
        env = "CAA_SSH_PUBLIC_KEY",
        default_value = "/etc/sandboxd/ssh-key/id_rsa.pub"
    )]
    pub(crate) ssh_public_key: PathBuf,
    /// The Azure cloud and the development endpoint flags (command line only).
    #[command(flatten)]
    pub(crate) azure: crate::cloud::azure::EndpointArgs,
    /// Address of `/healthz`, `/readyz` and `/metrics` (on the node's network: CAA runs
    /// with hostNetwork). `off` serves none; an address already in use is a warning, as
    /// pods do not depend on it.
    #[arg(long, env = "CAA_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub(crate) metrics_addr: String,
    /// Seconds between sweeps for VMs no PeerPod references.
    #[arg(long, env = "CAA_SWEEP_SECONDS", default_value_t = 300)]
    pub(crate) sweep_seconds: u64,
    /// Seconds an unreferenced VM is left alone before the sweep deletes it.
    #[arg(long, env = "CAA_SWEEP_GRACE_SECONDS", default_value_t = 600)]
    pub(crate) sweep_grace_seconds: u64,
    /// Fastest LRO polling interval in milliseconds (tests lower it).
    #[arg(long, env = "CAA_MIN_POLL_MS", default_value_t = 1000, hide = true)]
    pub(crate) min_poll_ms: u64,
    /// ARM reads per second per subscription the client-side token bucket refills (ARM: 25).
    #[arg(
        long,
        env = "CAA_ARM_READS_PER_SECOND",
        default_value_t = 25.0,
        hide = true
    )]
    pub(crate) arm_reads_per_second: f64,
    /// Burst of ARM reads per subscription (ARM: 250).
    #[arg(long, env = "CAA_ARM_READ_BURST", default_value_t = 250.0, hide = true)]
    pub(crate) arm_read_burst: f64,
    /// ARM writes per second per subscription the client-side token bucket refills (ARM: 10).
    #[arg(
        long,
        env = "CAA_ARM_WRITES_PER_SECOND",
        default_value_t = 10.0,
        hide = true
    )]
    pub(crate) arm_writes_per_second: f64,
    /// Burst of ARM writes per subscription (ARM: 200).
    #[arg(
        long,
        env = "CAA_ARM_WRITE_BURST",
        default_value_t = 200.0,
        hide = true
    )]
    pub(crate) arm_write_burst: f64,
}

/// The port of CAA's `/metrics`: the `metrics` port of the DaemonSet the operator writes.
pub(crate) const METRICS_PORT: u16 = 8092;
/// Where CAA serves its metrics by default (on [`METRICS_PORT`]; a unit test keeps them
/// equal).
pub(crate) const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:8092";

/// Runs `sandboxd caa` until a signal arrives.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let env = crate::config::env_map();
    let cfg = crate::config::PeerPodsConfig::from_map(&env)?;
    // The provider, and ARM's request counters for /metrics when it is Azure.
    let (provider, arm_counters): (Arc<dyn crate::cloud::Provider>, _) = match cfg.cloud_provider {
        crate::config::CloudProvider::Azure => {
            let secret = crate::config::CloudSecret::from_map(&env)?;
            let az = cfg.azure.clone().expect("validated azure config");
            let provider = Arc::new(crate::cloud::azure::AzureProvider::new(
                &secret.subscription_id,
                &secret.credentials,
                az,
                args.azure.resolve(Some(cfg.azure_cloud)),
                crate::cloud::azure::Manners {
                    reads_per_second: args.arm_reads_per_second.max(0.1),
                    read_burst: args.arm_read_burst.max(1.0),
                    writes_per_second: args.arm_writes_per_second.max(0.1),
                    write_burst: args.arm_write_burst.max(1.0),
                    ..Default::default()
                },
                crate::cloud::azure::Polling {
                    min_interval: Duration::from_millis(args.min_poll_ms),
                    ..Default::default()
                },
            )?);
            let counters = provider.counters();
            (provider, Some(counters))
        }
        #[cfg(feature = "dev")]
        crate::config::CloudProvider::Local => (
            Arc::new(crate::cloud::local::LocalProvider::from_env()?),
            None,
        ),
        #[cfg(not(feature = "dev"))]
        crate::config::CloudProvider::Local => anyhow::bail!(
            "CLOUD_PROVIDER=local (peer-pods-cm) is the development provider, which runs pod VMs \
             as processes on the node; this build of sandboxd does not include it (it is built \
             with the `dev` feature for tests and demos): set CLOUD_PROVIDER=azure"
        ),
    };
    let client = args.kube.client().await?;
    let ssh_key = match std::fs::read_to_string(&args.ssh_public_key) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) => {
            tracing::warn!(path = %args.ssh_public_key.display(), error = %e, "no SSH public key; pod VMs get a generated key whose private half is not kept (no SSH login)");
            None
        }
    };
    let telemetry = serve_metrics(&args.metrics_addr, arm_counters, &shutdown).await?;
    let caa = Caa::start(client, provider, cfg, args.clone(), ssh_key).await?;
    let server = service::serve(caa.clone(), &args.socket).await?;
    if let Some(ready) = &telemetry {
        ready.set(true);
    }
    tracing::info!(socket = %args.socket.display(), node = %args.node_name, "CAA serving");
    let sweeper = tokio::spawn(sweep::run(
        caa.clone(),
        Duration::from_secs(args.sweep_seconds),
        Duration::from_secs(args.sweep_grace_seconds),
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    sweeper.abort();
    drop(server);
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Serves `/healthz`, `/readyz` (ready once CAA serves its socket) and `/metrics` on
/// `addr` until `shutdown`; `off` serves nothing.
async fn serve_metrics(
    addr: &str,
    arm: Option<Arc<crate::cloud::azure::policy::Counters>>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<crate::telemetry::ReadyFlag>> {
    if addr.is_empty() || addr == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| {
        anyhow::anyhow!(
            "--metrics-addr (CAA_METRICS_ADDR) {addr:?}: expected host:port or off: {e}"
        )
    })?;
    let mut registry = crate::telemetry::Metrics::for_component("caa");
    metrics::METRICS.register(registry.registry_mut(), arm);
    let readiness = crate::telemetry::Readiness::new();
    let ready = readiness.register("hypervisor-socket");
    let listener = match crate::telemetry::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "no /metrics: the address is taken; CAA serves pods without it");
            return Ok(None);
        }
    };
    let router = crate::telemetry::router(registry.finish(), readiness);
    tokio::spawn(crate::telemetry::serve(listener, router, shutdown.clone()));
    Ok(Some(ready))
}
