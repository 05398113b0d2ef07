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

use super::{Error, io};
use crate::pki::{Ca, Usage};

/// Flags of `dev control-plane`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Working directory: certificates, etcd data, logs and `admin.kubeconfig`.
    #[arg(long)]
    pub dir: PathBuf,
    /// Directory with etcd, kube-apiserver, kube-controller-manager and kube-scheduler
    /// (default: the newest under `$SANDBOXD_CACHE/control-plane/*/bin`).
    #[arg(long, env = "SANDBOXD_CONTROL_PLANE_BIN")]
    pub bin: Option<PathBuf>,
}

/// The cached binaries directory.
pub fn find_binaries(given: Option<&Path>) -> Result<PathBuf, Error> {
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

fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| io("free port", e))?;
    Ok(l.local_addr().map_err(|e| io("free port", e))?.port())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Admin kubeconfig YAML for `server` with a client certificate.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: demo\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\ncontexts:\n- name: demo\n  context:\n    cluster: demo\n    \
         user: admin\ncurrent-context: demo\nusers:\n- name: admin\n  user:\n    \
         client-certificate-data: {}\n    client-key-data: {}\n",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem)
    )
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
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| io(&format!("writing {name}"), e))
    };
    let pki = |e: crate::pki::Error| Error::Pki(e.to_string());
    let validity = time::Duration::days(2);
    let ca = Ca::new("sandboxd-demo-ca", validity).map_err(pki)?;
    let serving = ca
        .issue(
            "kube-apiserver",
            &[],
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default.svc",
                "10.96.0.1",
            ],
            Usage::Server,
            validity,
        )
        .map_err(pki)?;
    let admin = ca
        .issue(
            "sandboxd-demo-admin",
            &["system:masters"],
            &[],
            Usage::Client,
            validity,
        )
        .map_err(pki)?;
    let (sa_key, sa_pub) = crate::pki::key_pair_pem().map_err(pki)?;
    write("ca.crt", &ca.cert_pem())?;
    write("apiserver.crt", &serving.cert_pem)?;
    write("apiserver.key", &serving.key_pem)?;
    write("sa.key", &sa_key)?;
    write("sa.pub", &sa_pub)?;
    let p = |n: &str| dir.join(n).display().to_string();

    let mut children: Vec<(&str, Child)> = Vec::new();
    let (etcd_port, peer_port) = (free_port()?, free_port()?);
    let etcd = format!("http://127.0.0.1:{etcd_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    children.push((
        "etcd",
        spawn(
            dir,
            &bin,
            "etcd",
            &[
                format!("--data-dir={}", p("etcd")),
                format!("--listen-client-urls={etcd}"),
                format!("--advertise-client-urls={etcd}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster=default={peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?,
    ));
    let port = free_port()?;
    let server = format!("https://127.0.0.1:{port}");
    children.push((
        "kube-apiserver",
        spawn(
            dir,
            &bin,
            "kube-apiserver",
            &[
                format!("--etcd-servers={etcd}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", p("apiserver-certs")),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
            ],
        )?,
    ));
    // Written under a temporary name and renamed: whoever waits for the file sees it whole.
    let kubeconfig = dir.join("admin.kubeconfig");
    let yaml = kubeconfig_yaml(&server, &ca.cert_pem(), &admin.cert_pem, &admin.key_pem);
    write("admin.kubeconfig.tmp", &yaml)?;
    wait_ready(&yaml, &mut children, Duration::from_secs(90)).await?;
    let common = |port: u16, certs: &str| {
        vec![
            format!("--kubeconfig={}", p("admin.kubeconfig.tmp")),
            format!("--authentication-kubeconfig={}", p("admin.kubeconfig.tmp")),
            format!("--authorization-kubeconfig={}", p("admin.kubeconfig.tmp")),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p(certs)),
        ]
    };
    let mut kcm = common(free_port()?, "kcm-certs");
    kcm.extend([
        // No kubelet renews node leases here.
        "--controllers=*,-node-lifecycle-controller".into(),
        format!("--service-account-private-key-file={}", p("sa.key")),
        format!("--root-ca-file={}", p("ca.crt")),
    ]);
    children.push((
        "kube-controller-manager",
        spawn(dir, &bin, "kube-controller-manager", &kcm)?,
    ));
    let sched = common(free_port()?, "scheduler-certs");
    children.push((
        "kube-scheduler",
        spawn(dir, &bin, "kube-scheduler", &sched)?,
    ));
    std::fs::rename(dir.join("admin.kubeconfig.tmp"), &kubeconfig)
        .map_err(|e| io("writing admin.kubeconfig", e))?;
    // The components keep reading the file they were given.
    std::fs::copy(&kubeconfig, dir.join("admin.kubeconfig.tmp")).map_err(|e| io("copy", e))?;
    println!(
        "control plane at {server} ready in {:.1}s; kubeconfig {}",
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
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", "CA", "CERT", "KEY");
        let k = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.client_certificate_data.as_deref(),
            Some(b64("CERT").as_str())
        );
        assert_eq!(k.current_context.as_deref(), Some("demo"));
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
