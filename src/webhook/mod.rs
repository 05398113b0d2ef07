//! `sandboxd webhook`: the peer pods mutating admission webhook.
//!
//! Pods whose `spec.runtimeClassName` is the target runtime class (`kata-remote`) lose
//! their container resources, ask for one unit of the per-node VM extended resource, and
//! carry their size as kata hypervisor annotations for the cloud-api-adaptor. Everything
//! else is admitted untouched. The server speaks HTTPS only, with a certificate reloaded
//! from `--cert-dir` when it changes.

pub mod manifest;
pub(crate) mod metrics;
pub(crate) mod mutate;
mod pod;
pub(crate) mod policy;
pub(crate) mod quantity;
pub(crate) mod review;
pub(crate) mod singleton;
pub(crate) mod tls;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub(crate) use metrics::WebhookMetrics;
pub(crate) use policy::{NamespacePattern, NamespacePolicy};
pub(crate) use review::{Settings, Webhook};

use crate::telemetry::{Metrics, Readiness};

/// The default request body limit: a pod object is at most ~1.5 MiB in etcd.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Flags of `sandboxd webhook` (names follow the Go webhook's conventions).
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Directory holding `tls.crt` and `tls.key` (a mounted `kubernetes.io/tls` Secret);
    /// re-read when the files change.
    #[arg(
        long,
        env = "CERT_DIR",
        default_value = "/tmp/k8s-webhook-server/serving-certs"
    )]
    pub(crate) cert_dir: PathBuf,
    /// HTTPS port.
    #[arg(long, env = "WEBHOOK_PORT", default_value_t = 9443)]
    pub(crate) port: u16,
    /// Address to listen on (default: all IPv4 interfaces).
    #[arg(long, default_value = "0.0.0.0")]
    pub(crate) bind_address: IpAddr,
    /// Runtime class of peer pods. Also read from `TARGET_RUNTIME_CLASS` (the OpenShift
    /// spelling). Default `kata-remote`.
    #[arg(long, env = "TARGET_RUNTIMECLASS")]
    pub(crate) target_runtime_class: Option<String>,
    /// Extended resource that counts pod VMs per node.
    #[arg(
        long,
        env = "POD_VM_EXTENDED_RESOURCE",
        default_value = crate::api::names::VM_RESOURCE
    )]
    pub(crate) pod_vm_extended_resource: String,
    /// The operator's namespace: peer pods there are refused.
    #[arg(
        long,
        env = "OPERATOR_NAMESPACE",
        default_value = crate::api::names::DEFAULT_NAMESPACE
    )]
    pub(crate) operator_namespace: String,
    /// If set, peer pods are refused outside these namespaces (comma list; `prefix-*`
    /// patterns allowed).
    #[arg(long, env = "PEERPODS_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub(crate) allowed_namespaces: Vec<String>,
    /// Namespaces whose pods are never mutated, whatever the webhook configuration sends
    /// (comma list; `prefix-*` patterns allowed).
    #[arg(
        long,
        env = "PEERPODS_NEVER_MUTATE_NAMESPACES",
        value_delimiter = ',',
        default_values_t = policy::DEFAULT_NEVER_MUTATE.iter().map(|s| s.to_string())
    )]
    pub(crate) never_mutate_namespaces: Vec<String>,
    /// Minimum TLS version: `VersionTLS12` (default) or `VersionTLS13`.
    #[arg(long, env = "TLS_MIN_VERSION")]
    pub(crate) tls_min_version: Option<String>,
    /// Allowed cipher suites by IANA (Go) name, comma separated.
    #[arg(long, env = "TLS_CIPHER_SUITES", value_delimiter = ',')]
    pub(crate) tls_cipher_suites: Vec<String>,
    /// Largest AdmissionReview body accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub(crate) max_body_bytes: usize,
    /// How often the certificate files are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub(crate) cert_reload_interval_ms: u64,
}

impl Args {
    /// The target runtime class: the flag / `TARGET_RUNTIMECLASS`, else
    /// `TARGET_RUNTIME_CLASS`, else `kata-remote`.
    pub(crate) fn target_runtime_class(&self) -> String {
        self.target_runtime_class
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::env::var("TARGET_RUNTIME_CLASS")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| crate::api::names::RUNTIME_CLASS.into())
    }

    /// The mutation settings.
    pub(crate) fn settings(&self) -> Settings {
        Settings {
            target_runtime_class: self.target_runtime_class(),
            extended_resource: self.pod_vm_extended_resource.clone(),
        }
    }

    /// The namespace policy.
    pub(crate) fn policy(&self) -> NamespacePolicy {
        let patterns = |list: &[String]| {
            list.iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| NamespacePattern::new(s))
                .collect()
        };
        NamespacePolicy {
            operator_namespace: self.operator_namespace.clone(),
            allowed: patterns(&self.allowed_namespaces),
            never_mutate: patterns(&self.never_mutate_namespaces),
        }
    }

    /// The TLS options.
    pub(crate) fn tls(&self) -> tls::TlsOptions {
        tls::TlsOptions {
            min_version: self.tls_min_version.clone(),
            cipher_suites: self.tls_cipher_suites.clone(),
        }
    }
}

#[derive(Clone)]
struct AppState {
    webhook: Webhook,
}

/// The webhook's routes (`POST /mutate-v1-pod`, `POST /validate-kataconfig/{name}`) merged with `/healthz`, `/livez`,
/// `/readyz` and `/metrics`. Tests call it directly with JSON bodies.
pub(crate) fn router(
    webhook: Webhook,
    registry: Arc<Registry>,
    readiness: Readiness,
    max_body_bytes: usize,
) -> Router {
    Router::new()
        .route(manifest::MUTATE_PATH, post(mutate_pod))
        .route(
            &format!("{}/{{active}}", singleton::PATH_PREFIX),
            post(validate_kataconfig),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(AppState { webhook })
        .merge(crate::telemetry::router(registry, readiness))
}

async fn mutate_pod(State(state): State<AppState>, body: Bytes) -> Response {
    match state.webhook.review(&body) {
        Ok(review) => axum::Json(review).into_response(),
        Err(e) => {
            state.webhook.metrics().error(e.metric_label());
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

/// The one-KataConfig rule on clusters without ValidatingAdmissionPolicy (see
/// [`singleton`]): `active` is the KataConfig in force, from the path.
async fn validate_kataconfig(
    State(state): State<AppState>,
    Path(active): Path<String>,
    body: Bytes,
) -> Response {
    match singleton::review(&active, &body) {
        Ok(review) => {
            if review["response"]["allowed"] == false {
                tracing::info!(active, "refused a second KataConfig");
            }
            axum::Json(review).into_response()
        }
        Err(e) => {
            state.webhook.metrics().error(e.metric_label());
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

/// Runs `sandboxd webhook` until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    serve(args, shutdown).await
}

/// Serves the webhook until `shutdown` is cancelled (for callers that own the shutdown).
pub(crate) async fn serve(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let settings = args.settings();
    let certs = tls::CertReloader::load(&args.cert_dir).with_context(|| {
        format!(
            "loading the serving certificate from --cert-dir {}",
            args.cert_dir.display()
        )
    })?;
    let tls_config = args
        .tls()
        .server_config(certs.clone())
        .context("TLS settings (TLS_MIN_VERSION / TLS_CIPHER_SUITES)")?;

    let mut metrics = Metrics::for_component("webhook");
    let webhook_metrics = WebhookMetrics::register(metrics.registry_mut());
    let registry = metrics.finish();
    let readiness = Readiness::new();
    readiness.register("serving-certificate").set(true);

    let reload_metrics = webhook_metrics.clone();
    tokio::spawn(certs.watch(
        Duration::from_millis(args.cert_reload_interval_ms.max(10)),
        shutdown.clone(),
        move |result| reload_metrics.reload(result.map_or_else(|e| e.metric_label(), |()| "ok")),
    ));

    tracing::info!(
        target_runtime_class = %settings.target_runtime_class,
        extended_resource = %settings.extended_resource,
        "peer pods webhook starting"
    );
    let webhook = Webhook::new(settings, Arc::new(args.policy()), webhook_metrics);
    let app = router(webhook, registry, readiness, args.max_body_bytes);

    let addr = SocketAddr::new(args.bind_address, args.port);
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!("shutting down: finishing requests in flight");
        stopper.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    tracing::info!(%addr, path = manifest::MUTATE_PATH, "serving HTTPS");
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls_config));
    axum_server::from_tcp_rustls(listener, config)?
        .handle(handle)
        .serve(app.into_make_service())
        .await
        .context("serving HTTPS")?;
    Ok(())
}

#[cfg(test)]
mod tests;
