//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and, optionally,
//! kube-controller-manager and kube-scheduler, built by `scripts/control-plane.sh`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sandboxd::pki::{Ca, CertKey, Usage};

use super::process::{Process, free_port, run_dir};

/// What to start besides etcd and the API server.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Start kube-controller-manager (GC, namespaces, Deployments, DaemonSets, Jobs, ...).
    pub controller_manager: bool,
    /// Start kube-scheduler.
    pub scheduler: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            controller_manager: true,
            scheduler: true,
        }
    }
}

/// A running control plane. Dropping it stops every process.
pub struct ControlPlane {
    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub server: String,
    /// Admin kubeconfig (system:masters), also written to [`ControlPlane::kubeconfig_path`].
    pub kubeconfig_path: PathBuf,
    /// The cluster CA (PEM).
    pub ca_pem: String,
    /// Working directory (certificates, etcd data, logs).
    pub dir: PathBuf,
    // Stopped in reverse start order by `stop` and Drop.
    processes: std::sync::Mutex<Vec<Process>>,
}

/// Where the control plane binaries are: `SANDBOXD_CONTROL_PLANE_BIN`, or whatever the
/// build script prints (it returns at once when they are cached).
pub fn binaries() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("SANDBOXD_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/control-plane.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir.trim()))
}

fn write(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A kubeconfig for `server` trusting `ca_pem`, authenticating with a client certificate
/// or a bearer token.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &UserAuth) -> String {
    let user = match user {
        UserAuth::Cert(ck) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&ck.cert_pem),
            b64(&ck.key_pem)
        ),
        UserAuth::Token(t) => format!("    token: {t}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    \
         user: test\ncurrent-context: test\nusers:\n- name: test\n  user:\n{user}",
        b64(ca_pem)
    )
}

/// How a kubeconfig's user authenticates.
pub enum UserAuth {
    /// A client certificate.
    Cert(CertKey),
    /// A bearer token (e.g. from a TokenRequest).
    Token(String),
}

/// A client from kubeconfig YAML.
pub async fn client_from_yaml(yaml: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing generated kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading generated kubeconfig")?;
    Ok(Client::try_from(config)?)
}

impl ControlPlane {
    /// Starts etcd and the API server (and the optional components), returning once
    /// `/readyz` answers ok.
    pub fn start(options: Options) -> Result<Self> {
        let started = Instant::now();
        let bin = binaries()?;
        let dir = run_dir().join(format!("cp-{}", free_port()));
        fs::create_dir_all(dir.join("etcd"))?;
        let mut processes = Vec::new();

        // --- PKI, generated in-process.
        let validity = time::Duration::days(2);
        let ca = Ca::new("sandboxd-test-ca", validity)?;
        let serving = ca.issue(
            "kube-apiserver",
            &[],
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.96.0.1",
            ],
            Usage::Server,
            validity,
        )?;
        let admin = ca.issue(
            "sandboxd-test-admin",
            &["system:masters"],
            &[],
            Usage::Client,
            validity,
        )?;
        let (sa_key, sa_pub) = sandboxd::pki::key_pair_pem()?;
        let ca_pem = ca.cert_pem();
        let path = |name: &str| dir.join(name).to_string_lossy().to_string();
        write(&dir.join("ca.crt"), &ca_pem)?;
        write(&dir.join("apiserver.crt"), &serving.cert_pem)?;
        write(&dir.join("apiserver.key"), &serving.key_pem)?;
        write(&dir.join("sa.key"), &sa_key)?;
        write(&dir.join("sa.pub"), &sa_pub)?;

        // --- etcd
        let etcd_client = free_port();
        let etcd_peer = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        processes.push(Process::start(
            "etcd",
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", path("etcd")),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
                "--quota-backend-bytes=4294967296".into(),
            ],
            &[],
        )?);

        // --- kube-apiserver
        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        processes.push(Process::start(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", path("apiserver-certs")),
                format!("--tls-cert-file={}", path("apiserver.crt")),
                format!("--tls-private-key-file={}", path("apiserver.key")),
                format!("--client-ca-file={}", path("ca.crt")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", path("sa.pub")),
                format!("--service-account-signing-key-file={}", path("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--enable-priority-and-fairness=false".into(),
                "--max-requests-inflight=2000".into(),
                "--max-mutating-requests-inflight=1000".into(),
                "--v=1".into(),
            ],
            &[],
        )?);
        let admin_yaml = kubeconfig_yaml(&server, &ca_pem, &UserAuth::Cert(admin));
        let kubeconfig_path = dir.join("admin.kubeconfig");
        write(&kubeconfig_path, &admin_yaml)?;
        let cp = Self {
            server,
            kubeconfig_path,
            ca_pem,
            dir: dir.clone(),
            processes: std::sync::Mutex::new(processes),
        };
        cp.wait_ready(Duration::from_secs(90))?;

        let kubeconfig = path("admin.kubeconfig");
        let common = |port: u16| {
            vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--leader-elect=false".to_string(),
                "--bind-address=127.0.0.1".to_string(),
                format!("--secure-port={port}"),
                "--v=1".to_string(),
            ]
        };
        if options.controller_manager {
            let mut args = common(free_port());
            args.extend([
                format!("--cert-dir={}", path("kcm-certs")),
                // No kubelet renews node leases here: fake nodes stay Ready.
                "--controllers=*,-node-lifecycle-controller".into(),
                format!("--service-account-private-key-file={}", path("sa.key")),
                format!("--root-ca-file={}", path("ca.crt")),
                "--use-service-account-credentials=false".into(),
                "--concurrent-gc-syncs=20".into(),
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
            ]);
            cp.processes.lock().unwrap().push(Process::start(
                "kube-controller-manager",
                &bin.join("kube-controller-manager"),
                &args,
                &[],
            )?);
        }
        if options.scheduler {
            let mut args = common(free_port());
            args.push(format!("--cert-dir={}", path("scheduler-certs")));
            cp.processes.lock().unwrap().push(Process::start(
                "kube-scheduler",
                &bin.join("kube-scheduler"),
                &args,
                &[],
            )?);
        }
        std::thread::sleep(Duration::from_millis(300));
        cp.check_running()?;
        eprintln!(
            "harness: control plane at {} ready in {:.1}s (logs in {})",
            cp.server,
            started.elapsed().as_secs_f64(),
            cp.dir.display()
        );
        Ok(cp)
    }

    /// Polls `/readyz` with the admin credentials (blocking; used before any runtime).
    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + timeout;
        let yaml = fs::read_to_string(&self.kubeconfig_path)?;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_running()?;
            let res: Result<String> = rt.block_on(async {
                let client = client_from_yaml(&yaml).await?;
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client.request_text(req).await?)
            });
            match res {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "kube-apiserver not ready after {timeout:?}: {last}\napiserver log:\n{}",
            self.processes.lock().unwrap()[1].log_tail(30)
        )
    }

    /// Fails naming the first component that has exited.
    pub fn check_running(&self) -> Result<()> {
        for p in self.processes.lock().unwrap().iter_mut() {
            p.check_running()?;
        }
        Ok(())
    }

    /// A client with cluster-admin rights.
    pub async fn admin_client(&self) -> Result<Client> {
        client_from_yaml(&fs::read_to_string(&self.kubeconfig_path)?).await
    }

    /// Stops every process (newest first).
    pub fn stop(&self) {
        let mut processes = self.processes.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut p) = processes.pop() {
            p.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
