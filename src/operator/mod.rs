//! `sandboxd operator`: its controllers ([`Controllers`]: the KataConfig lifecycle, peer
//! pods, the PeerPod collector) with leader election; plus the `crd` and `node-install`
//! subcommands.

pub mod admission;
pub mod controller;
pub mod installer;
pub mod kataconfig;
pub mod leader;
pub mod machineconfig;
pub mod metrics;
pub mod node_install;
pub mod nodes;
pub mod peer_pod_metrics;
pub mod peerpod_gc;
pub mod peerpods;
pub mod runtimeclass;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use self::controller::Shared;
use self::metrics::OperatorMetrics;
use self::nodes::Flavor;
use crate::api::names;

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The controller failed.
    #[error(transparent)]
    Controller(#[from] kataconfig::Error),
    /// Leader election failed.
    #[error(transparent)]
    Leader(#[from] leader::Error),
    /// The admission policy could not be installed.
    #[error("installing the single-KataConfig admission policy: {0}")]
    Admission(#[source] crate::k8s::apply::Error),
    /// API discovery failed.
    #[error("discovering API groups: {0}")]
    Discovery(#[source] kube::Error),
}

/// Which platform the operator runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    /// OpenShift when the `machineconfiguration.openshift.io` API exists, else Kubernetes.
    #[default]
    Auto,
    /// Plain Kubernetes.
    Kubernetes,
    /// OpenShift.
    Openshift,
}

/// Everything the operator needs, as plain data (tests build it directly).
#[derive(Clone, Debug)]
pub struct Options {
    /// The operator namespace.
    pub namespace: String,
    /// The sandboxd image (the node installer runs it).
    pub image: String,
    /// The platform.
    pub platform: Platform,
    /// Leader election: `None` runs without it (tests, single replica).
    pub leader: Option<leader::LeaderConfig>,
    /// Keep the one-KataConfig rule: a ValidatingAdmissionPolicy where the API server has
    /// one (installed at start), else the peer pods webhook (see [`admission::detect`]).
    pub admission_policy: bool,
    /// How the peer pods webhook is rolled out.
    pub webhook: peerpods::webhook::Settings,
    /// How the pod VM image Jobs run.
    pub image_job: peerpods::image_job::Settings,
    /// The PeerPod collector's Azure cloud and development endpoint flags.
    pub azure: crate::cloud::azure::EndpointArgs,
}

/// Flags of `sandboxd operator`.
#[derive(Clone, Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// A tool instead of the controllers.
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    /// The operator namespace.
    #[arg(long, env = "SANDBOXD_NAMESPACE", default_value = names::DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// The sandboxd image the node installer DaemonSet runs.
    #[arg(long, env = "SANDBOXD_IMAGE", default_value = "sandboxd:latest")]
    pub(crate) image: String,
    /// The platform (decides the workers of an empty selector).
    #[arg(long, value_enum, default_value_t = Platform::Auto)]
    pub(crate) platform: Platform,
    /// This replica's identity for leader election.
    #[arg(long, env = "POD_NAME")]
    pub(crate) identity: Option<String>,
    /// Run without leader election (one replica only).
    #[arg(long)]
    pub(crate) no_leader_election: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub(crate) metrics_addr: SocketAddr,
    /// Development only: `https://IP:PORT` of a peer pods webhook running outside the
    /// cluster. The webhook configuration then uses `clientConfig.url` and the serving
    /// certificate gets that IP as SAN; the Deployment and Service are still applied.
    #[arg(long, value_parser = peerpods::webhook::check_url)]
    pub(crate) webhook_url: Option<String>,
    /// Validity of the webhook's serving certificate (Go duration; renewed at 2/3).
    #[arg(long, default_value = "8760h", value_parser = parse_validity)]
    pub(crate) webhook_cert_validity: Duration,
    /// Validity of the webhook's CA (Go duration; renewed at 2/3 with overlap).
    #[arg(long, default_value = "87600h", value_parser = parse_validity)]
    pub(crate) webhook_ca_validity: Duration,
    /// Who provides the webhook's serving certificate: `operator` (its own CA) or
    /// `service-ca` (OpenShift's service CA).
    #[arg(long, value_enum, default_value_t = peerpods::webhook::TlsSource::Operator)]
    pub(crate) webhook_tls: peerpods::webhook::TlsSource,
    /// Arguments of the pod VM image creation Job's container, space-separated (default
    /// `image job`: the operator image builds, publishes and records the image).
    #[arg(long, env = "SANDBOXD_IMAGE_JOB_ARGS")]
    pub(crate) image_job_args: Option<String>,
    /// `backoffLimit` of the pod VM image Jobs.
    #[arg(long, default_value_t = 2)]
    pub(crate) image_job_backoff_limit: i32,
    /// The PeerPod collector's Azure cloud and development endpoint flags (command line
    /// only: `peer-pods-cm` names at most the cloud).
    #[command(flatten)]
    pub(crate) azure: crate::cloud::azure::EndpointArgs,
    /// How to reach the API server.
    #[command(flatten)]
    pub(crate) kube: crate::k8s::KubeArgs,
}

fn parse_validity(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
        .filter(|d| *d >= Duration::from_secs(3))
        .ok_or_else(|| format!("{s:?} is not a Go duration of at least 3s (e.g. 8760h)"))
}

/// Tools of `sandboxd operator`.
#[derive(Clone, Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Print every CRD sandboxd owns (YAML).
    Crd,
    /// Run the privileged per-node installer (in the node installer DaemonSet).
    NodeInstall(node_install::Args),
}

/// Every CRD as one multi-document YAML stream.
pub(crate) fn crds_yaml() -> String {
    crate::api::all_crds()
        .iter()
        .map(|(_, crd)| format!("---\n{}", crate::api::crd_yaml(crd)))
        .collect::<Vec<_>>()
        .join("")
}

async fn detect_flavor(client: &Client, platform: Platform) -> Result<Flavor, Error> {
    Ok(match platform {
        Platform::Kubernetes => Flavor::Kubernetes,
        Platform::Openshift => Flavor::OpenShift,
        Platform::Auto => {
            let groups = client.list_api_groups().await.map_err(Error::Discovery)?;
            if groups
                .groups
                .iter()
                .any(|g| g.name == "machineconfiguration.openshift.io")
            {
                Flavor::OpenShift
            } else {
                Flavor::Kubernetes
            }
        }
    })
}

/// The controllers the operator runs, with what each needs beyond [`Shared`].
pub(crate) struct Controllers {
    /// The KataConfig controller: nodes, the RuntimeClass, the node installer, status,
    /// uninstall.
    pub(crate) kataconfig: kataconfig::Options,
    /// The peer-pods controller: how it rolls out the webhook ...
    pub(crate) webhook: peerpods::webhook::Settings,
    /// ... and runs the pod VM image Jobs.
    pub(crate) image_job: peerpods::image_job::Settings,
    /// The PeerPod collector, the backstop for VMs no CAA releases.
    pub(crate) collector: peerpod_gc::Options,
}

impl Controllers {
    /// Runs every controller on `shared` until `shutdown`, or until the KataConfig
    /// controller fails. The peer-pods controller and the PeerPod collector run beside it
    /// and never stop the operator: they retry their own failures.
    pub(crate) async fn run(
        self,
        shared: Shared,
        shutdown: CancellationToken,
    ) -> Result<(), kataconfig::Error> {
        let token = shutdown.child_token();
        let beside = [
            tokio::spawn(peerpods::run(
                shared.clone(),
                self.webhook,
                self.image_job,
                token.clone(),
            )),
            tokio::spawn(peerpod_gc::run(
                shared.client.clone(),
                self.collector,
                token.clone(),
            )),
        ];
        let result = kataconfig::run(shared, self.kataconfig, token.clone()).await;
        token.cancel();
        for task in beside {
            let _ = task.await;
        }
        result
    }
}

/// Runs the operator's controllers with `client` until `shutdown` (the library entry point:
/// tests run it in-process and restart it).
pub async fn run_operator(
    client: Client,
    opts: Options,
    metrics: Arc<OperatorMetrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut opts = opts;
    let rule = if opts.admission_policy {
        let mechanism = admission::detect(&client).await.map_err(Error::Discovery)?;
        match mechanism {
            admission::Mechanism::ValidatingAdmissionPolicy => {
                admission::ensure(&client).await.map_err(Error::Admission)?;
            }
            admission::Mechanism::Webhook => opts.webhook.kataconfig_singleton = true,
        }
        tracing::info!(mechanism = mechanism.reason(), "{}", mechanism.message());
        Some(mechanism)
    } else {
        None
    };
    let flavor = detect_flavor(&client, opts.platform).await?;
    let shared = Shared {
        client: client.clone(),
        namespace: opts.namespace.clone(),
        image: opts.image.clone(),
        instance: opts
            .leader
            .as_ref()
            .map(|l| l.identity.clone())
            .unwrap_or_else(|| names::OPERATOR.into()),
        metrics,
    };
    let controllers = Controllers {
        kataconfig: kataconfig::Options { flavor, rule },
        webhook: opts.webhook,
        image_job: opts.image_job,
        collector: peerpod_gc::Options {
            azure: opts.azure,
            ..peerpod_gc::Options::new(opts.namespace)
        },
    };
    match opts.leader {
        None => Ok(controllers.run(shared, shutdown).await?),
        Some(cfg) => {
            let run = move |token| controllers.run(shared, token);
            Ok(leader::run_as_leader(client, cfg, shutdown, run).await??)
        }
    }
}

/// Runs `sandboxd operator` (or one of its tools).
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Crd) => {
            print!("{}", crds_yaml());
            return Ok(());
        }
        Some(Command::NodeInstall(a)) => return node_install::run(a).await,
        None => {}
    }
    let client = args.kube.client().await?;
    let shutdown = crate::shutdown::on_signals()?;
    let mut registry = crate::telemetry::Metrics::for_component("operator");
    let metrics = Arc::new(OperatorMetrics::default());
    metrics.register(registry.registry_mut());
    peer_pod_metrics::GAUGES.register(registry.registry_mut());
    peer_pod_metrics::watch(client.clone(), shutdown.clone());
    let readiness = crate::telemetry::Readiness::default();
    let listener = crate::telemetry::bind(args.metrics_addr).await?;
    let router = crate::telemetry::router(registry.finish(), readiness);
    let server = tokio::spawn(crate::telemetry::serve(listener, router, shutdown.clone()));
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", names::OPERATOR, std::process::id()));
    let opts = Options {
        namespace: args.namespace,
        image: args.image,
        platform: args.platform,
        leader: (!args.no_leader_election).then(|| leader::LeaderConfig {
            namespace: String::new(),
            name: names::OPERATOR.into(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }),
        admission_policy: true,
        webhook: peerpods::webhook::Settings {
            url: args.webhook_url,
            cert_validity: args.webhook_cert_validity,
            ca_validity: args.webhook_ca_validity,
            tls: args.webhook_tls,
            kataconfig_singleton: false,
        },
        image_job: peerpods::image_job::Settings {
            args: match &args.image_job_args {
                Some(a) => a.split_whitespace().map(String::from).collect(),
                None => peerpods::image_job::Settings::default().args,
            },
            backoff_limit: args.image_job_backoff_limit.max(0),
            azure: args.azure.clone().with_proxy_env_of_this_process(),
            ..Default::default()
        },
        azure: args.azure.with_proxy_env_of_this_process(),
    };
    let opts = Options {
        leader: opts.leader.map(|mut l| {
            l.namespace = opts.namespace.clone();
            l
        }),
        ..opts
    };
    run_operator(client, opts, metrics, shutdown.clone()).await?;
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
