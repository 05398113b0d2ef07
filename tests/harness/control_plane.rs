//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and, optionally,
//! kube-controller-manager and kube-scheduler, built by `scripts/control-plane.sh`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sandboxd::devenv::control_plane as plan;
use sandboxd::devenv::network::{self, HostNetwork};
use sandboxd::pki::CertKey;

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
    /// The host network slot (root only): bridge, addresses, Service and pod CIDRs.
    pub net: Option<HostNetwork>,
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

/// A kubeconfig for `server` trusting `ca_pem`, authenticating with a client certificate
/// or a bearer token.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &UserAuth) -> String {
    let user = match user {
        UserAuth::Cert(ck) => plan::UserAuth::Cert(ck),
        UserAuth::Token(t) => plan::UserAuth::Token(t),
    };
    plan::kubeconfig_yaml(server, ca_pem, user)
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
        Self::start_with(options, &[])
    }

    /// [`ControlPlane::start`] with `apiserver_args` added to kube-apiserver's (e.g. a
    /// `--runtime-config` that turns an API off, for a second, separate control plane).
    pub fn start_with(options: Options, apiserver_args: &[&str]) -> Result<Self> {
        // Free ports are found by binding and releasing them; another process of this
        // machine can take one before etcd or the API server binds it. Such a start is
        // retried with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(options, apiserver_args) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("harness: a control plane port was taken meanwhile; retrying");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn start_once(options: Options, apiserver_args: &[&str]) -> Result<Self> {
        let started = Instant::now();
        let bin = binaries()?;
        let dir = run_dir().join(format!("cp-{}", free_port()));
        fs::create_dir_all(dir.join("etcd"))?;
        // As root, every control plane gets its host network slot: the API server binds and
        // advertises a bridge address, and its Service CIDR is routed into a dead end on
        // this machine (a webhook registered by Service can never make it dial elsewhere).
        let net = if network::can_configure() {
            Some(HostNetwork::allocate().context("allocating the host network")?)
        } else {
            eprintln!(
                "harness: not root: the control plane stays on loopback; the Service CIDR is not \
                 routed into a dead end and no node can join"
            );
            None
        };
        let mut plan = plan::plan(&dir, "sandboxd-test-ca", plan::Ports::free()?, net.as_ref())?;
        plan.apiserver
            .extend(apiserver_args.iter().map(|a| a.to_string()));
        for (name, content) in &plan.files {
            write(&dir.join(name), content)?;
        }
        if let Some(n) = &net {
            write(&dir.join(plan::NETWORK_SLOT), &n.slot.to_string())?;
        }
        let processes = vec![
            Process::start("etcd", &bin.join("etcd"), &plan.etcd, &[])?,
            Process::start(
                "kube-apiserver",
                &bin.join("kube-apiserver"),
                &plan.apiserver,
                &[],
            )?,
        ];
        let kubeconfig_path = dir.join("admin.kubeconfig");
        write(
            &kubeconfig_path,
            &kubeconfig_yaml(&plan.server, &plan.ca_pem, &UserAuth::Cert(plan.admin)),
        )?;
        let cp = Self {
            server: plan.server,
            kubeconfig_path,
            ca_pem: plan.ca_pem,
            dir: dir.clone(),
            net,
            processes: std::sync::Mutex::new(processes),
        };
        cp.wait_ready(Duration::from_secs(90))?;

        if options.controller_manager {
            cp.processes.lock().unwrap().push(Process::start(
                "kube-controller-manager",
                &bin.join("kube-controller-manager"),
                &plan.controller_manager,
                &[],
            )?);
        }
        if options.scheduler {
            cp.processes.lock().unwrap().push(Process::start(
                "kube-scheduler",
                &bin.join("kube-scheduler"),
                &plan.scheduler,
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
        if let Some(n) = &self.net {
            n.release();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
