//! `sandboxd forwarder`: the agent-protocol forwarder inside a pod VM.
//!
//! It reads its configuration (`apf.json`) from `--config FILE`, a NoCloud seed
//! (`/media/cidata/user-data`) or Azure IMDS `userData`; creates the pod network namespace
//! `/run/netns/podns` with the pod's interface on a VXLAN tunnel to the worker; and serves
//! mutual TLS on :15150, relaying every ttrpc frame to kata-agent at
//! `/run/kata-containers/agent.sock` (CreateSandbox and CreateContainer rewritten, see
//! [`rewrite`]).

pub mod config;
pub mod init;
pub mod ns;
pub(crate) mod podns;
pub mod relay;
pub(crate) mod rewrite;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) use config::Config;

use crate::api::names;
use crate::cloud::net;

/// Errors of the forwarder.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The configuration is missing or invalid.
    #[error("forwarder config: {0}")]
    Config(String),
    /// Reading the configuration from its source failed.
    #[error("reading the forwarder config from {source_name}: {detail}")]
    Source {
        /// `--config`, the NoCloud seed or IMDS.
        source_name: String,
        /// What went wrong.
        detail: String,
    },
    /// Setting up the pod network failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding the listener failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// Flags of `sandboxd forwarder`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Read `apf.json` (or a `#cloud-config` carrying it) from this file.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// NoCloud seed user data, used when it exists and `--config` is not given.
    #[arg(long, default_value = "/media/cidata/user-data")]
    pub(crate) seed: PathBuf,
    /// Azure IMDS userData endpoint, used when neither file is there.
    #[arg(
        long,
        env = "FORWARDER_IMDS_URL",
        default_value = "http://169.254.169.254/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
    )]
    pub(crate) imds_url: url::Url,
    /// Address of the mTLS listener.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], names::FORWARDER_PORT)))]
    pub(crate) listen: SocketAddr,
    /// kata-agent's socket.
    #[arg(long, default_value = names::AGENT_SOCKET)]
    pub(crate) agent_socket: PathBuf,
    /// The pod network namespace to create.
    #[arg(long, default_value = names::POD_NETNS)]
    pub(crate) pod_netns: PathBuf,
    /// Seconds a connection waits for the agent socket.
    #[arg(long, default_value_t = 150)]
    pub(crate) agent_wait_seconds: u64,
    /// Start in a new network namespace (local pod VMs; done before the runtime starts).
    #[arg(long, hide = true)]
    pub unshare_net: bool,
    /// Start in a new mount namespace with this directory as a private `/run` (local pod
    /// VMs; done before the runtime starts).
    #[arg(long, hide = true)]
    pub private_run: Option<PathBuf>,
}

/// Loads the configuration from the first source available.
pub(crate) async fn load_config(args: &Args) -> Result<Config, Error> {
    let read = |p: &PathBuf, name: &str| {
        std::fs::read_to_string(p).map_err(|e| Error::Source {
            source_name: format!("{name} {}", p.display()),
            detail: e.to_string(),
        })
    };
    if let Some(p) = &args.config {
        return Config::from_user_data(&read(p, "--config")?);
    }
    if args.seed.exists() {
        return Config::from_user_data(&read(&args.seed, "NoCloud seed")?);
    }
    let text = imds_user_data(&args.imds_url, Duration::from_secs(300)).await?;
    Config::from_user_data(&text)
}

/// Fetches userData from IMDS (header `Metadata: true`), retrying until `wait` passes.
pub(crate) async fn imds_user_data(url: &url::Url, wait: Duration) -> Result<String, Error> {
    use base64::Engine;
    let src = |detail: String| Error::Source {
        source_name: format!("IMDS {url}"),
        detail,
    };
    let client = reqwest_like::Client::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match client.get(url).await {
            Ok(body) => {
                let body = body.trim();
                // IMDS returns userData base64-encoded.
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .map_err(|e| src(format!("userData is not base64: {e}")))?;
                return String::from_utf8(raw).map_err(|_| src("userData is not UTF-8".into()));
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(src(e)),
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// A minimal HTTP/1.1 GET for the link-local IMDS endpoint (plain HTTP, no proxy).
mod reqwest_like {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub(crate) struct Client;

    impl Client {
        pub(crate) fn new() -> Self {
            Self
        }

        pub(crate) async fn get(&self, url: &url::Url) -> Result<String, String> {
            let host = url.host_str().ok_or("no host")?;
            let port = url.port_or_known_default().unwrap_or(80);
            let mut s = tokio::net::TcpStream::connect((host, port))
                .await
                .map_err(|e| e.to_string())?;
            let path = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            };
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&buf);
            let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP answer")?;
            let status = head.lines().next().unwrap_or_default();
            if !status.contains(" 200 ") {
                return Err(format!("IMDS answered {status}"));
            }
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                return Err("chunked answers are not supported".into());
            }
            Ok(body.to_string())
        }
    }
}

/// Runs the forwarder until a signal arrives.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let cfg = load_config(&args).await?;
    tracing::info!(pod = %format!("{}/{}", cfg.pod_namespace, cfg.pod_name), "forwarder config loaded");
    let tls = tls::server_config(
        &cfg.tls_server_cert,
        &cfg.tls_server_key,
        &cfg.tls_client_ca,
    )?;
    podns::setup(&cfg, &args.pod_netns).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: args.listen,
            source,
        })?;
    tracing::info!(addr = %args.listen, agent = %args.agent_socket.display(), "forwarder listening");
    relay::serve(
        listener,
        tls,
        relay::RelayOptions {
            agent_socket: args.agent_socket.clone(),
            netns: names::POD_NETNS.to_string(),
            agent_wait: Duration::from_secs(args.agent_wait_seconds),
        },
        shutdown,
    )
    .await;
    net::remove_named_netns(&args.pod_netns);
    Ok(())
}
