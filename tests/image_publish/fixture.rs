//! Azurite, the ARM test server pointing storage accounts at it (optionally through a TCP
//! proxy that can stall uploads), and runs of the `sandboxd` binary.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use sandboxd::armtest::{self, Handle, StorageConfig, storage_account_key};
use sandboxd::image::publish::blob::BlobClient;
use sandboxd::image::publish::sharedkey::SharedKey;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::process::{Process, free_port, run_dir};

pub const SUB: &str = "22222222-3333-4444-5555-666666666666";

fn azurite_bin() -> PathBuf {
    let cache = std::env::var_os("SANDBOXD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sandboxd")
        });
    cache.join("azurite/node_modules/.bin/azurite-blob")
}

/// Why the Azurite tests cannot run, if they cannot.
pub fn azurite_missing() -> Option<String> {
    let bin = azurite_bin();
    (!bin.exists()).then(|| {
        format!(
            "{} is missing: run scripts/bootstrap.sh (installs the npm package azurite)",
            bin.display()
        )
    })
}

/// What a run of the binary printed.
pub struct Run {
    /// Exit code.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A TCP proxy that counts client-to-server bytes and can stall once a budget is spent.
#[derive(Clone)]
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    budget: Arc<AtomicU64>,
    count: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let p = Proxy {
            addr: listener.local_addr()?,
            budget: Arc::new(AtomicU64::new(u64::MAX)),
            count: Arc::new(AtomicU64::new(0)),
            stalled: Arc::new(AtomicBool::new(false)),
        };
        let me = p.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let before = me.count.fetch_add(n as u64, Ordering::SeqCst);
                            if before + n as u64 > me.budget.load(Ordering::SeqCst) {
                                me.stalled.store(true, Ordering::SeqCst);
                                // Hold the connection open and send nothing more.
                                std::future::pending::<()>().await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Ok(p)
    }

    /// Stall every connection once `bytes` in total have gone upstream.
    pub fn stall_after(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
        if bytes == u64::MAX {
            self.stalled.store(false, Ordering::SeqCst);
        }
    }

    /// Whether the budget is spent.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Bytes sent upstream since the last reset.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Starts counting anew.
    pub fn reset_count(&self) {
        self.count.store(0, Ordering::SeqCst);
    }
}

/// An HTTP forward proxy (what `HTTP_PROXY` names): each request arrives in absolute form
/// and is forwarded to the origin it names; every forwarded `METHOD url` is recorded.
#[derive(Clone)]
pub struct HttpProxy {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    _stop: Arc<tokio_util::sync::DropGuard>,
}

impl HttpProxy {
    pub async fn start() -> Result<Self> {
        use axum::body::Body;
        use axum::extract::Request;
        use axum::response::Response;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = reqwest::Client::builder().no_proxy().build()?;
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let upstream = upstream.clone();
            let record = record.clone();
            async move {
                let (parts, body) = req.into_parts();
                // Only absolute-form requests are proxied; anything else is not a proxy's.
                if parts.uri.scheme().is_none() {
                    return Response::builder()
                        .status(400)
                        .body(Body::from("not a proxy request"))
                        .unwrap();
                }
                record
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", parts.method, parts.uri));
                let body = axum::body::to_bytes(body, 64 << 20)
                    .await
                    .unwrap_or_default();
                let mut forward = upstream.request(parts.method.clone(), parts.uri.to_string());
                for (k, v) in &parts.headers {
                    if !HOP_BY_HOP.contains(&k.as_str()) {
                        forward = forward.header(k, v);
                    }
                }
                match forward.body(body).send().await {
                    Ok(r) => {
                        let mut out = Response::builder().status(r.status());
                        for (k, v) in r.headers() {
                            if !HOP_BY_HOP.contains(&k.as_str()) && k != "content-length" {
                                out = out.header(k, v);
                            }
                        }
                        let bytes = r.bytes().await.unwrap_or_default();
                        out.body(Body::from(bytes)).unwrap()
                    }
                    Err(e) => Response::builder()
                        .status(502)
                        .body(Body::from(e.to_string()))
                        .unwrap(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self {
            url: format!("http://{addr}"),
            seen,
            _stop: Arc::new(token.drop_guard()),
        })
    }

    /// Every `METHOD url` forwarded so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Headers that concern one connection, not the request (RFC 9110 §7.6.1), and `Host`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Every storage account the suite uses: Azurite knows them (with the keys the ARM test
/// server hands out) from its start.
pub const ACCOUNTS: &[&str] = &[
    "acctsparse",
    "acctresume",
    "acctgallery",
    "acctfaults",
    "acctdelete",
    "acctcm",
    "acctjob",
    "acctcarried",
    "acctbench",
    "acctproxy",
];

/// The suite's one Azurite (blob service only, in memory, loopback); its port.
async fn azurite() -> Result<u16> {
    static AZURITE: tokio::sync::OnceCell<(std::sync::Mutex<Process>, u16)> =
        tokio::sync::OnceCell::const_new();
    let (_, port) = AZURITE
        .get_or_try_init(|| async {
            let port = free_port();
            let accounts_env = ACCOUNTS
                .iter()
                .map(|a| format!("{a}:{}", storage_account_key(a)))
                .collect::<Vec<_>>()
                .join(";");
            let args: Vec<String> = [
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--inMemoryPersistence",
                "--extentMemoryLimit",
                "2048",
                "--disableTelemetry",
                "--skipApiVersionCheck",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut azurite = Process::start(
                "azurite",
                &azurite_bin(),
                &args,
                &[("AZURITE_ACCOUNTS", &accounts_env)],
            )?;
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                azurite.check_running()?;
                if std::time::Instant::now() > deadline {
                    return Err(anyhow!(
                        "azurite did not listen within 90 s: {}",
                        azurite.log_tail(20)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>((std::sync::Mutex::new(azurite), port))
        })
        .await?;
    Ok(*port)
}

/// Azurite + the ARM test server, for one test.
pub struct Fixture {
    pub dir: PathBuf,
    pub handle: Handle,
    pub arm: String,
    pub azurite_port: u16,
    pub proxy: Option<Proxy>,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Fixture {
    /// Every ARM request this test's server served is an action the OpenShift
    /// CredentialsRequest grants (the image build included).
    pub fn ensure_arm_calls_granted(&self) -> Result<()> {
        let served = self.handle.requests();
        let missing = sandboxd::cloud::azure::permissions::ungranted(
            served.iter().map(|r| (r.method.as_str(), r.path.as_str())),
        );
        anyhow::ensure!(
            missing.is_empty(),
            "ARM calls the CredentialsRequest does not grant: {missing:?}"
        );
        Ok(())
    }

    /// Azurite knowing `accounts` (with the keys the ARM test server hands out) and an ARM
    /// test server with resource group `rg` in `eastus` whose storage accounts live there.
    pub async fn start(name: &str, accounts: &[&str]) -> Result<Self> {
        Self::start_inner(name, accounts, false).await
    }

    /// As [`Fixture::start`], with a [`Proxy`] between the accounts' endpoint and Azurite.
    pub async fn start_with_proxy(name: &str, accounts: &[&str]) -> Result<Self> {
        Self::start_inner(name, accounts, true).await
    }

    async fn start_inner(name: &str, accounts: &[&str], proxy: bool) -> Result<Self> {
        let dir = run_dir().join(format!("image-{name}-{}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir)?;
        for a in accounts {
            anyhow::ensure!(
                ACCOUNTS.contains(a),
                "account {a} is not in fixture::ACCOUNTS"
            );
        }
        let port = azurite().await?;
        let upstream: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let proxy = if proxy {
            Some(Proxy::start(upstream).await?)
        } else {
            None
        };
        let blob_addr = proxy.as_ref().map(|p| p.addr).unwrap_or(upstream);
        let token = tokio_util::sync::CancellationToken::new();
        let config = armtest::Config {
            lro_duration: Duration::from_millis(300),
            storage: StorageConfig {
                blob_endpoint: Some(url::Url::parse(&format!("http://{blob_addr}/"))?),
            },
            ..armtest::Config::default()
        };
        let (addr, handle, _task) =
            armtest::serve("127.0.0.1:0".parse()?, config, token.clone()).await?;
        handle.seed_peer_pods(SUB, "rg", "eastus");
        Ok(Self {
            dir,
            handle,
            arm: format!("http://{addr}/"),
            azurite_port: port,
            proxy,
            _shutdown: token.drop_guard(),
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        const CLIENT_ID: &str = "0a1b2c3d-0000-4000-8000-00000000000c";
        const TENANT_ID: &str = "0a1b2c3d-0000-4000-8000-00000000000e";
        [
            ("AZURE_SUBSCRIPTION_ID", SUB),
            ("AZURE_CLIENT_ID", CLIENT_ID),
            ("AZURE_CLIENT_SECRET", "test-secret"),
            ("AZURE_TENANT_ID", TENANT_ID),
            ("SANDBOXD_IMAGE_MIN_POLL_MS", "50"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn publish_args(args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = [
            "image",
            "publish",
            "--azure",
            "--resource-group",
            "rg",
            "--region",
            "eastus",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    /// `sandboxd image publish --azure --resource-group rg --region eastus <args>`.
    pub async fn publish(&self, args: &[&str]) -> Result<Run> {
        self.publish_with_env(args, &[]).await
    }

    /// The same, with `extra` environment.
    pub async fn publish_with_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Result<Run> {
        self.run(
            &Self::publish_args(args)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            extra,
        )
        .await
    }

    /// The same, started and left running.
    pub fn spawn_publish(&self, args: &[&str]) -> Result<tokio::process::Child> {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut args = Self::publish_args(args);
        args.extend(["--dev-arm-endpoint".to_string(), self.arm.clone()]);
        spawn(&args, &env)
    }

    /// `sandboxd <args>` with the credentials and endpoints, plus `extra` environment.
    pub async fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Result<Run> {
        let mut env = self.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // The ARM test server is a development endpoint: a command-line flag of the image
        // tools, never the environment (which the image Job fills from `peer-pods-cm`).
        if args.first().map(String::as_str) == Some("image")
            && matches!(
                args.get(1).map(String::as_str),
                Some("publish" | "delete" | "job")
            )
        {
            args.extend(["--dev-arm-endpoint".to_string(), self.arm.clone()]);
        }
        run_sandboxd(&args, &env).await
    }

    /// A Blob client for `account` on Azurite directly.
    pub fn blob_client(&self, account: &str) -> Result<BlobClient> {
        let key = SharedKey::new(account, &storage_account_key(account))?;
        Ok(BlobClient::new(
            url::Url::parse(&format!(
                "http://127.0.0.1:{}/{account}/",
                self.azurite_port
            ))?,
            key,
        ))
    }

    fn arm_client(&self) -> Result<sandboxd::cloud::azure::Arm> {
        const CLIENT_ID: &str = "0a1b2c3d-0000-4000-8000-00000000000c";
        const TENANT_ID: &str = "0a1b2c3d-0000-4000-8000-00000000000e";
        let creds = sandboxd::config::AzureCredentials::ClientSecret {
            tenant_id: TENANT_ID.into(),
            client_id: CLIENT_ID.into(),
            client_secret: sandboxd::config::SecretString::new("test-secret"),
        };
        let url = url::Url::parse(&self.arm)?;
        let arm = sandboxd::cloud::azure::Arm::new(
            &creds,
            &sandboxd::cloud::azure::Endpoints::development(Default::default(), url, None),
            Default::default(),
        )?;
        Ok(arm.with_polling(sandboxd::cloud::azure::Polling {
            min_interval: Duration::from_millis(50),
            default_interval: Duration::from_millis(50),
            timeout: Duration::from_secs(30),
        }))
    }

    /// GET of an ARM path (with its api-version); fails on 404.
    pub async fn arm_get(&self, path: &str) -> Result<Value> {
        self.arm_get_opt(path)
            .await?
            .with_context(|| format!("{path} not found"))
    }

    /// GET of an ARM path; `None` on 404.
    pub async fn arm_get_opt(&self, path: &str) -> Result<Option<Value>> {
        Ok(self.arm_client()?.get(path).await?)
    }
}

fn spawn(args: &[String], env: &[(&str, &str)]) -> Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().context("starting sandboxd")
}

/// Waits for a child started by [`spawn`] and collects its output.
pub async fn collect(child: tokio::process::Child) -> Result<Run> {
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .context("sandboxd ran for more than 180 s")??;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `sandboxd <args>` with exactly `env` (plus PATH) and collects its output.
pub async fn run_sandboxd(args: &[String], env: &[(&str, &str)]) -> Result<Run> {
    collect(spawn(args, env)?).await
}

/// A fixed VHD of `size_mib` MiB of data, mostly zeros: random runs at 0..4 KiB,
/// 1 MiB + 512..+1536, 4..9 MiB (from 8 MiB on, ending 1 MiB before the end at most) and
/// 16..20 MiB (from 24 MiB on), then the
/// footer. Returns its path and its bytes.
pub fn sparse_vhd(dir: &Path, name: &str, size_mib: usize) -> Result<(PathBuf, Vec<u8>)> {
    const MIB: usize = 1 << 20;
    let mut data = vec![0u8; size_mib * MIB];
    let mut runs = vec![0..4096, MIB + 512..MIB + 1536];
    if size_mib >= 8 {
        runs.push(4 * MIB..(9 * MIB).min(size_mib * MIB - MIB));
    }
    if size_mib >= 24 {
        runs.push(16 * MIB..20 * MIB);
    }
    let mut rng = fastrand::Rng::with_seed(size_mib as u64);
    for r in runs {
        for b in &mut data[r] {
            *b = rng.u8(1..);
        }
    }
    let footer =
        sandboxd::image::build::vhd::footer(data.len() as u64, rng.u128(..).to_be_bytes(), 0);
    data.extend_from_slice(&footer);
    let path = dir.join(name);
    std::fs::write(&path, &data)?;
    Ok((path, data))
}

/// The non-zero 512-byte pages of `data` as merged half-open ranges.
pub fn non_zero_ranges(data: &[u8]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, page) in data.chunks(512).enumerate() {
        if page.iter().any(|b| *b != 0) {
            let s = i as u64 * 512;
            match out.last_mut() {
                Some(r) if r.end == s => r.end = s + 512,
                _ => out.push(s..s + 512),
            }
        }
    }
    out
}

/// Ranges with adjacent ones joined.
pub fn merged(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(l) if l.end == r.start => l.end = r.end,
            _ => out.push(r),
        }
    }
    out
}
