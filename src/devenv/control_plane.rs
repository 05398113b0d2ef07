//! `sandboxd dev control-plane`: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler on loopback with an in-memory CA, from the binaries
//! `scripts/control-plane.sh` caches. Writes `admin.kubeconfig` into `--dir` and runs until
//! a signal, then stops every component.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::network::HostNetwork;
use super::{Error, io};
use crate::pki::{Ca, CertKey, Usage};

/// Flags of `dev control-plane`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Working directory: certificates, etcd data, logs and `admin.kubeconfig`.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Directory with etcd, kube-apiserver, kube-controller-manager and kube-scheduler
    /// (default: the newest under `$SANDBOXD_CACHE/control-plane/*/bin`).
    #[arg(long, env = "SANDBOXD_CONTROL_PLANE_BIN")]
    pub(crate) bin: Option<PathBuf>,
}

/// The cached binaries directory.
pub(crate) fn find_binaries(given: Option<&Path>) -> Result<PathBuf, Error> {
    let ok = |d: &Path| {
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ]
        .iter()
        .all(|b| d.join(b).is_file())
    };
    if let Some(d) = given {
        return ok(d)
            .then(|| d.to_path_buf())
            .ok_or_else(|| Error::Binaries(d.display().to_string()));
    }
    let cache = std::env::var_os("SANDBOXD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sandboxd")))
        .ok_or_else(|| Error::Binaries("neither SANDBOXD_CACHE nor HOME is set".into()))?;
    let root = cache.join("control-plane");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::Binaries(format!("{}: {e}", root.display())))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| ok(d))
        .collect();
    dirs.sort();
    dirs.pop()
        .ok_or_else(|| Error::Binaries(format!("nothing under {}", root.display())))
}

/// A free TCP port on loopback (bound and released; the caller binds it soon after).
pub(crate) fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| io("free port", e))?;
    Ok(l.local_addr().map_err(|e| io("free port", e))?.port())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// How a kubeconfig's user authenticates.
pub enum UserAuth<'a> {
    /// A client certificate.
    Cert(&'a CertKey),
    /// A bearer token (e.g. from a TokenRequest).
    Token(&'a str),
}

/// Kubeconfig YAML for `server` trusting `ca_pem`, with one user and one context.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, user: UserAuth<'_>) -> String {
    let user = match user {
        UserAuth::Cert(ck) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&ck.cert_pem),
            b64(&ck.key_pem)
        ),
        UserAuth::Token(t) => format!("    token: {t}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    \
         user: admin\ncurrent-context: local\nusers:\n- name: admin\n  user:\n{user}",
        b64(ca_pem)
    )
}

/// The loopback ports a control plane listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// etcd clients.
    pub(crate) etcd: u16,
    /// etcd peers.
    pub(crate) etcd_peer: u16,
    /// kube-apiserver (HTTPS).
    pub(crate) apiserver: u16,
    /// kube-controller-manager's secure port.
    pub(crate) controller_manager: u16,
    /// kube-scheduler's secure port.
    pub(crate) scheduler: u16,
}

impl Ports {
    /// Free ports for every component.
    pub fn free() -> Result<Self, Error> {
        Ok(Self {
            etcd: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
            controller_manager: free_port()?,
            scheduler: free_port()?,
        })
    }
}

/// Everything needed to start a control plane in one directory: the files to write first
/// and each component's command line, in start order. Pure data, so the developer
/// environment and the test harness start the same control plane their own way.
pub struct Plan {
    /// The API server's URL.
    pub server: String,
    /// The cluster CA (PEM).
    pub ca_pem: String,
    /// An admin (`system:masters`) client certificate.
    pub admin: CertKey,
    /// Files (name in the directory, content) the components read.
    pub files: Vec<(&'static str, String)>,
    /// etcd's arguments.
    pub etcd: Vec<String>,
    /// kube-apiserver's arguments.
    pub apiserver: Vec<String>,
    /// kube-controller-manager's arguments.
    pub controller_manager: Vec<String>,
    /// kube-scheduler's arguments.
    pub scheduler: Vec<String>,
}

/// The file in the control plane directory that holds its host network slot
/// ([`HostNetwork::for_slot`]), when it has one.
pub const NETWORK_SLOT: &str = "network.slot";

/// The cluster CA's private key in the control plane directory (for the node's certificates).
pub(crate) const CA_KEY: &str = "ca.key";

/// The kubeconfig file the controller manager and scheduler read (an admin kubeconfig).
pub(crate) const COMPONENTS_KUBECONFIG: &str = "components.kubeconfig";

/// Plans a control plane in `dir` on `ports`, with a fresh in-memory CA called `ca_name`.
/// etcd runs without fsync (throw-away data), API priority and fairness is off and the
/// in-flight limits are high, because tests and demos drive many requests from one client.
pub fn plan(
    dir: &Path,
    ca_name: &str,
    ports: Ports,
    net: Option<&HostNetwork>,
) -> Result<Plan, Error> {
    let pki = |e: crate::pki::Error| Error::Pki(e.to_string());
    let validity = time::Duration::days(2);
    let ca = Ca::new(ca_name, validity).map_err(pki)?;
    // Without a host network (not root): loopback only, and the historical Service CIDR.
    let (address, service_cidr, first_service_ip) = match net {
        Some(n) => (
            n.host_ip.to_string(),
            n.service_cidr.clone(),
            n.first_service_ip.to_string(),
        ),
        None => (
            "127.0.0.1".into(),
            "10.96.0.0/16".into(),
            "10.96.0.1".into(),
        ),
    };
    let serving = ca
        .issue(
            "kube-apiserver",
            &[],
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                &address,
                &first_service_ip,
            ],
            Usage::Server,
            validity,
        )
        .map_err(pki)?;
    // The API server's client certificate towards kubelets (logs, exec, port-forward).
    let kubelet_client = ca
        .issue(
            "kube-apiserver-kubelet-client",
            &["system:masters"],
            &[],
            Usage::Client,
            validity,
        )
        .map_err(pki)?;
    let admin = ca
        .issue(
            &format!("{ca_name}-admin"),
            &["system:masters"],
            &[],
            Usage::Client,
            validity,
        )
        .map_err(pki)?;
    let (sa_key, sa_pub) = crate::pki::key_pair_pem().map_err(pki)?;
    let ca_pem = ca.cert_pem();
    let server = format!("https://{address}:{}", ports.apiserver);
    let p = |n: &str| dir.join(n).display().to_string();
    let etcd = format!("http://127.0.0.1:{}", ports.etcd);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    let etcd_args = vec![
        format!("--data-dir={}", p("etcd")),
        format!("--listen-client-urls={etcd}"),
        format!("--advertise-client-urls={etcd}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
        "--quota-backend-bytes=4294967296".into(),
    ];
    let apiserver = vec![
        format!("--etcd-servers={etcd}"),
        format!("--bind-address={address}"),
        format!("--advertise-address={address}"),
        format!("--secure-port={}", ports.apiserver),
        format!("--cert-dir={}", p("apiserver-certs")),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--service-cluster-ip-range={service_cidr}"),
        // Node authorization and NodeRestriction: a real kubelet gets exactly its own rights.
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        format!("--kubelet-client-certificate={}", p("kubelet-client.crt")),
        format!("--kubelet-client-key={}", p("kubelet-client.key")),
        format!("--kubelet-certificate-authority={}", p("ca.crt")),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        "--enable-priority-and-fairness=false".into(),
        "--max-requests-inflight=2000".into(),
        "--max-mutating-requests-inflight=1000".into(),
        "--v=1".into(),
    ];
    let kubeconfig = p(COMPONENTS_KUBECONFIG);
    let common = |port: u16, certs: &str| {
        vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p(certs)),
            "--v=1".to_string(),
        ]
    };
    let mut controller_manager = common(ports.controller_manager, "kcm-certs");
    controller_manager.extend([
        // No kubelet renews node leases here: fake nodes stay Ready.
        "--controllers=*,-node-lifecycle-controller".into(),
        format!("--service-account-private-key-file={}", p("sa.key")),
        format!("--root-ca-file={}", p("ca.crt")),
        "--use-service-account-credentials=false".into(),
        "--concurrent-gc-syncs=20".into(),
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
    ]);
    let scheduler = common(ports.scheduler, "scheduler-certs");
    let admin_yaml = kubeconfig_yaml(&server, &ca_pem, UserAuth::Cert(&admin));
    Ok(Plan {
        files: vec![
            ("ca.crt", ca_pem.clone()),
            // The CA's key stays with the control plane's throw-away directory, so a node
            // started later gets its kubelet and kube-proxy certificates from it.
            (CA_KEY, ca.cert_key().key_pem),
            ("kubelet-client.crt", kubelet_client.cert_pem),
            ("kubelet-client.key", kubelet_client.key_pem),
            ("apiserver.crt", serving.cert_pem),
            ("apiserver.key", serving.key_pem),
            ("sa.key", sa_key),
            ("sa.pub", sa_pub),
            (COMPONENTS_KUBECONFIG, admin_yaml),
        ],
        server,
        ca_pem,
        admin,
        etcd: etcd_args,
        apiserver,
        controller_manager,
        scheduler,
    })
}

fn spawn(dir: &Path, bin: &Path, name: &str, args: &[String]) -> Result<Child, Error> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| io(&format!("{name} log"), e))?;
    let err = log.try_clone().map_err(|e| io("log", e))?;
    Command::new(bin.join(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Process {
            name: name.into(),
            reason: e.to_string(),
        })
}

/// Runs the control plane until `shutdown`.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), Error> {
    let started = Instant::now();
    let bin = find_binaries(args.bin.as_deref())?;
    let dir = &args.dir;
    std::fs::create_dir_all(dir.join("etcd")).map_err(|e| io("creating --dir", e))?;
    // As root: a host network slot (a port-less bridge for the API server's address and a
    // dead end for the Service CIDR), released when the control plane stops.
    let net = if super::network::can_configure() {
        Some(HostNetwork::allocate()?)
    } else {
        println!("not root: the control plane stays on loopback (no node can join it)");
        None
    };
    let result = run_with(dir, &bin, net.as_ref(), started, shutdown).await;
    if let Some(n) = &net {
        n.release();
    }
    result
}

async fn run_with(
    dir: &Path,
    bin: &Path,
    net: Option<&HostNetwork>,
    started: Instant,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let plan = plan(dir, "sandboxd-demo-ca", Ports::free()?, net)?;
    for (name, text) in &plan.files {
        std::fs::write(dir.join(name), text).map_err(|e| io(&format!("writing {name}"), e))?;
    }
    if let Some(n) = net {
        std::fs::write(dir.join(NETWORK_SLOT), n.slot.to_string())
            .map_err(|e| io("writing the network slot", e))?;
    }
    let mut children: Vec<(&str, Child)> = Vec::new();
    children.push(("etcd", spawn(dir, bin, "etcd", &plan.etcd)?));
    children.push((
        "kube-apiserver",
        spawn(dir, bin, "kube-apiserver", &plan.apiserver)?,
    ));
    let yaml = kubeconfig_yaml(&plan.server, &plan.ca_pem, UserAuth::Cert(&plan.admin));
    wait_ready(&yaml, &mut children, Duration::from_secs(90)).await?;
    children.push((
        "kube-controller-manager",
        spawn(
            dir,
            bin,
            "kube-controller-manager",
            &plan.controller_manager,
        )?,
    ));
    children.push((
        "kube-scheduler",
        spawn(dir, bin, "kube-scheduler", &plan.scheduler)?,
    ));
    // Written under a temporary name and renamed: whoever waits for the file sees it whole.
    let kubeconfig = dir.join("admin.kubeconfig");
    std::fs::write(dir.join("admin.kubeconfig.tmp"), &yaml)
        .map_err(|e| io("writing admin.kubeconfig", e))?;
    std::fs::rename(dir.join("admin.kubeconfig.tmp"), &kubeconfig)
        .map_err(|e| io("writing admin.kubeconfig", e))?;
    println!(
        "control plane at {} ready in {:.1}s; kubeconfig {}",
        plan.server,
        started.elapsed().as_secs_f64(),
        kubeconfig.display()
    );
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Some(e) = exited(&mut children) {
                    break Err(e);
                }
            }
        }
    };
    while let Some((_, mut c)) = children.pop() {
        let _ = c.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    result
}

fn exited(children: &mut [(&str, Child)]) -> Option<Error> {
    children
        .iter_mut()
        .find_map(|(name, c)| match c.try_wait() {
            Ok(Some(status)) => Some(Error::Process {
                name: name.to_string(),
                reason: format!("exited ({status}); see {name}.log"),
            }),
            _ => None,
        })
}

async fn wait_ready(
    yaml: &str,
    children: &mut [(&str, Child)],
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(yaml).map_err(|e| Error::NotReady(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| Error::NotReady(e.to_string()))?;
    let client = kube::Client::try_from(config)?;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(e) = exited(children) {
            return Err(e);
        }
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::NotReady(e.to_string()))?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::NotReady(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_kubeconfig_loads_with_its_server_and_certificate() {
        let ck = CertKey {
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        };
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", "CA", UserAuth::Cert(&ck));
        let k = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.client_certificate_data.as_deref(),
            Some(b64("CERT").as_str())
        );
        assert_eq!(k.current_context.as_deref(), Some("local"));
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", "CA", UserAuth::Token("t0k"));
        let k = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
    }

    #[test]
    fn every_file_a_component_is_given_is_written_by_the_plan() {
        let dir = Path::new("/cp");
        let ports = Ports {
            etcd: 1,
            etcd_peer: 2,
            apiserver: 3,
            controller_manager: 4,
            scheduler: 5,
        };
        let plan = plan(dir, "t", ports, Some(&HostNetwork::for_slot(3))).unwrap();
        assert_eq!(plan.server, "https://10.201.3.1:3");
        assert!(
            plan.apiserver
                .contains(&"--advertise-address=10.201.3.1".to_string())
        );
        assert!(
            plan.apiserver
                .contains(&"--service-cluster-ip-range=10.96.48.0/20".to_string())
        );
        let written: Vec<String> = plan.files.iter().map(|(n, _)| format!("/cp/{n}")).collect();
        for arg in plan
            .etcd
            .iter()
            .chain(&plan.apiserver)
            .chain(&plan.controller_manager)
            .chain(&plan.scheduler)
        {
            let Some((flag, value)) = arg.split_once('=') else {
                continue;
            };
            if !value.starts_with("/cp/") || flag.ends_with("-dir") {
                continue;
            }
            assert!(
                written.contains(&value.to_string()),
                "{arg} names a file the plan does not write"
            );
        }
        let kubeconfig = &plan
            .files
            .iter()
            .find(|(n, _)| *n == COMPONENTS_KUBECONFIG)
            .unwrap()
            .1;
        let k = kube::config::Kubeconfig::from_yaml(kubeconfig).unwrap();
        assert_eq!(
            k.clusters[0].cluster.as_ref().unwrap().server.as_deref(),
            Some("https://10.201.3.1:3")
        );
    }

    #[test]
    fn a_binaries_directory_missing_a_component_is_refused() {
        let dir = std::env::temp_dir().join(format!("sbx-cp-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("etcd"), "").unwrap();
        let e = find_binaries(Some(&dir)).unwrap_err();
        assert_eq!(e.metric_label(), "binaries");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
