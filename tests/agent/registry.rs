//! A real registry (Debian's `docker-registry`) for the agent to pull from, started by the
//! test in the network namespace the agent sees, with or without htpasswd auth, and a small
//! image built here from Debian's `busybox-static` (one gzip layer, an OCI config) pushed to
//! it with `oci-client`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::harness::process::Process;

pub const REGISTRY: &str = "/usr/bin/docker-registry";

pub fn skip_reason() -> Option<String> {
    (!Path::new(REGISTRY).exists()).then(|| {
        format!("{REGISTRY} missing (Debian docker-registry; scripts/bootstrap.sh installs it)")
    })
}

/// A running registry.
pub struct Registry {
    pub addr: String,
    /// The CA the registry's certificate chains to (TLS registries).
    pub ca_pem: Option<String>,
    pub storage: PathBuf,
    pub auth: Option<(String, String)>,
    _process: Process,
    _dir: tempfile::TempDir,
}

/// Runs `f` on a thread in the network namespace `netns` (a `/proc/<pid>/ns/net`), or in this
/// one; sockets it opens stay in that namespace.
pub fn in_netns<T: Send + 'static>(
    netns: Option<PathBuf>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            let fd =
                std::fs::File::open(&ns).with_context(|| format!("opening {}", ns.display()))?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

impl Registry {
    /// Starts a registry on 127.0.0.1 in `netns` (a `/proc/<pid>/ns/net`, or this namespace).
    pub fn start(
        name: &str,
        netns: Option<&Path>,
        auth: Option<(&str, &str)>,
        port: u16,
    ) -> Result<Self> {
        Self::start_with(name, netns, auth, port, None)
    }

    /// [`Self::start`] serving TLS with `tls` = (CA PEM, certificate PEM, key PEM).
    pub fn start_with(
        name: &str,
        netns: Option<&Path>,
        auth: Option<(&str, &str)>,
        port: u16,
        tls: Option<(String, String, String)>,
    ) -> Result<Self> {
        Self::start_full(name, netns, auth, format!("127.0.0.1:{port}"), tls)
    }

    /// A registry without auth listening on `addr` (`ip:port`) in `netns`, serving TLS with
    /// `tls` (CA PEM, certificate PEM, key PEM) when given.
    pub fn start_on(
        name: &str,
        netns: Option<&Path>,
        addr: &str,
        tls: Option<(String, String, String)>,
    ) -> Result<Self> {
        Self::start_full(name, netns, None, addr.to_string(), tls)
    }

    fn start_full(
        name: &str,
        netns: Option<&Path>,
        auth: Option<(&str, &str)>,
        addr: String,
        tls: Option<(String, String, String)>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let storage = dir.path().join("storage");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        let mut ca_pem = None;
        if let Some((ca, cert, key)) = tls {
            let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
            std::fs::write(&c, cert)?;
            std::fs::write(&k, key)?;
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            ));
            ca_pem = Some(ca);
        }
        if let Some((u, p)) = auth {
            let hash = bcrypt::hash(p, 5)?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{u}:{hash}\n"))?;
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg)?;
        let mut args = Vec::new();
        let program = match netns {
            Some(ns) => {
                args.push(format!("--net={}", ns.display()));
                args.push("--".into());
                args.push(REGISTRY.into());
                PathBuf::from("nsenter")
            }
            None => PathBuf::from(REGISTRY),
        };
        args.extend(["serve".to_string(), cfg_path.display().to_string()]);
        let mut process = Process::start(name, &program, &args, &[])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let ns = netns.map(Path::to_path_buf);
        let a = addr.clone();
        loop {
            let a2 = a.clone();
            let up = in_netns(ns.clone(), move || {
                Ok(std::net::TcpStream::connect(&a2).is_ok())
            })?;
            if up {
                break;
            }
            process.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "the registry did not listen on {a}:\n{}",
                    process.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            addr,
            ca_pem,
            storage,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            _process: process,
            _dir: dir,
        })
    }

    /// The requests the registry has answered so far, as `METHOD /path` from its access log.
    pub fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self._process.log_path()).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once(" \"")?;
                let (request, _) = rest.split_once(" HTTP/")?;
                let (method, path) = request.split_once(' ')?;
                Some(format!("{method} {path}"))
            })
            .collect()
    }

    fn registry_auth(&self) -> RegistryAuth {
        match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Pushes a busybox image as `<addr>/<repo>:<tag>` (`marker` makes its layer unique);
    /// answers the reference and the layer's digest.
    pub fn push_busybox(
        &self,
        netns: Option<&Path>,
        repo: &str,
        tag: &str,
        marker: &str,
    ) -> Result<(String, String)> {
        let layer = busybox_layer(marker)?;
        let reference = format!("{}/{repo}:{tag}", self.addr);
        let (diff_id, gz) = layer;
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        });
        let digest = format!(
            "sha256:{}",
            hex(ring::digest::digest(&ring::digest::SHA256, &gz).as_ref())
        );
        let auth = self.registry_auth();
        let r = reference.clone();
        let addr = self.addr.clone();
        let ca = self.ca_pem.clone();
        in_netns(netns.map(Path::to_path_buf), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut cfg = ClientConfig {
                    protocol: ClientProtocol::HttpsExcept(vec![addr]),
                    ..Default::default()
                };
                if let Some(ca) = ca {
                    cfg.protocol = ClientProtocol::Https;
                    cfg.extra_root_certificates = vec![oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Pem,
                        data: ca.into_bytes(),
                    }];
                }
                let client = Client::new(cfg);
                let reference: Reference = r.parse()?;
                client
                    .push(
                        &reference,
                        &[ImageLayer::new(
                            gz,
                            oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
                            None,
                        )],
                        Config::new(
                            serde_json::to_vec(&config)?,
                            oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE.into(),
                            None,
                        ),
                        &auth,
                        None,
                    )
                    .await
                    .with_context(|| format!("pushing {r}"))?;
                Ok(())
            })
        })?;
        Ok((reference, digest))
    }

    /// Flips a byte in the middle of a blob in the registry's storage.
    pub fn corrupt_blob(&self, digest: &str) -> Result<()> {
        let hex = digest.trim_start_matches("sha256:");
        let p = self.storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ));
        let mut b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(&p, b)?;
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// A layer with busybox and its applets (`marker` as `/etc/marker`): (diff id, tar.gz).
pub fn busybox_layer(marker: &str) -> Result<(String, Vec<u8>)> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = |name: &str| -> Result<()> {
        let mut h = header();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, &b""[..])?;
        Ok(())
    };
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        dir(d)?;
    }
    let busybox = std::fs::read(super::host::BUSYBOX)?;
    let mut h = header();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..])?;
    for applet in super::host::APPLETS {
        let mut h = header();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    let mut h = header();
    h.set_mode(0o644);
    h.set_size(marker.len() as u64);
    b.append_data(&mut h, "etc/marker", marker.as_bytes())?;
    let tar = b.into_inner()?;
    let diff_id = format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, &tar).as_ref())
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    Ok((diff_id, gz.finish()?))
}
