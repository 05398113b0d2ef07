//! The pod data path as CAA drives it, hooked into the VM lifecycle: the forwarder config
//! (pod network, VNI, per-VM server certificate) in the VM's user data at StartVM; once the
//! VM has an IP, readiness `agent` (the kata agent answers `grpc.Health/Check` through its
//! forwarder, over mutual TLS), the worker
//! end of the tunnel and the agent socket; all of it removed before the VM is deleted, and
//! resumed from the PeerPod after a CAA restart. Active for sandboxes whose CreateVM named
//! a network namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::noderelay;
use super::pki::Pki;
use super::relay::{self, AgentSockets};
use super::state::{self, Record};
use super::tunnel;
use super::{Caa, Error, Readiness};
use crate::api::names;
use crate::api::peerpod::{PeerPod, PeerPodStatus};
use crate::cloud::Vm;
use crate::forwarder::Config;

/// Annotation on the PeerPod with the pod's network namespace on the worker.
pub(crate) const ANNOTATION_NETNS: &str = "sandboxd.io/pod-netns";

#[derive(Clone, Debug)]
struct Path_ {
    netns: String,
    vni: Option<u32>,
}

/// Who serves the pods' agent sockets.
enum Sockets {
    /// This process (they end with it).
    InProcess(AgentSockets),
    /// The node agent relay (they outlive this process).
    Node(Arc<noderelay::Client>),
}

/// Data path state of one CAA.
pub(crate) struct Datapath {
    pki: Pki,
    sockets: Sockets,
    sandboxes: Mutex<HashMap<String, Path_>>,
    vni_lock: tokio::sync::Mutex<()>,
    node_ip: Ipv4Addr,
}

fn dp(e: impl std::fmt::Display) -> Error {
    Error::DataPath(e.to_string())
}

impl Datapath {
    /// Loads (or creates) the CAA certificates from the Secret `CAA_TLS_SECRET` in
    /// `POD_NAMESPACE`; without access to it, certificates are kept in memory only.
    /// `node_ip` is the worker's end of every pod tunnel ([`node_ip`]). With `relay` (the
    /// node agent relay's control socket) the agent sockets are served by it.
    pub(crate) async fn new(
        client: &kube::Client,
        node_ip: Ipv4Addr,
        relay: Option<PathBuf>,
    ) -> Self {
        let ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| names::DEFAULT_NAMESPACE.into());
        let name = std::env::var("CAA_TLS_SECRET").unwrap_or_else(|_| names::CAA_TLS_SECRET.into());
        let pki = match Pki::load_or_create(client, &ns, &name).await {
            Ok(p) => {
                // Rotated before expiry while CAA runs (the previous CA stays trusted).
                let stop = tokio_util::sync::CancellationToken::new();
                tokio::spawn(
                    p.clone()
                        .keep_fresh(client.clone(), ns.clone(), name.clone(), stop),
                );
                p
            }
            Err(e) => {
                tracing::warn!(error = %e, "CAA certificates kept in memory only: agent connections will not survive a restart");
                Pki::generate().expect("generating certificates")
            }
        };
        let sockets = match relay {
            Some(path) => {
                let c = noderelay::Client::new(path, pki.clone());
                // A rotated identity reaches the relay; a restarted relay is told again.
                tokio::spawn(c.clone().keep_fresh(
                    Duration::from_secs(30),
                    tokio_util::sync::CancellationToken::new(),
                ));
                Sockets::Node(c)
            }
            None => Sockets::InProcess(AgentSockets::default()),
        };
        Self {
            pki,
            sockets,
            sandboxes: Mutex::new(HashMap::new()),
            vni_lock: tokio::sync::Mutex::new(()),
            node_ip,
        }
    }

    /// The network namespace a shim names, as a path inside this container. Runtimes send
    /// `/var/run/netns/<id>` (CRI-O, containerd) or `/run/netns/<id>`; `/var/run` is a link
    /// to `/run` on every current distribution, and the DaemonSet mounts the host's
    /// `/run/netns` (the image has no `/var`), so `/var/run/...` is read as `/run/...`.
    /// Empty: no pod network (no data path).
    pub(crate) fn resolve_netns(&self, path: &str) -> Result<Option<PathBuf>, Error> {
        if path.is_empty() {
            return Ok(None);
        }
        let given = Path::new(path);
        if !given.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "the network namespace path {path:?} is not absolute"
            )));
        }
        let mut candidates = vec![given.to_path_buf()];
        if let Ok(rest) = given.strip_prefix("/var/run") {
            candidates.push(Path::new("/run").join(rest));
        }
        candidates
            .iter()
            .find(|p| p.exists())
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "the pod's network namespace {path} does not exist in the CAA container \
                     (it mounts the host's /run/netns; /var/run/netns is read as /run/netns)"
                ))
            })
    }

    fn get(&self, id: &str) -> Option<Path_> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn put(&self, id: &str, p: Path_) {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), p);
    }

    /// CreateVM: remembers the pod's network namespace.
    pub(crate) fn remember_netns(&self, id: &str, netns: Option<PathBuf>) {
        if let Some(netns) = netns {
            self.put(
                id,
                Path_ {
                    netns: netns.display().to_string(),
                    vni: None,
                },
            );
        }
    }

    /// Forgets a sandbox that never started (nothing of its data path exists).
    pub(crate) fn forget(&self, id: &str) {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// StartVM, before the create call: the user data carrying the forwarder config (a VNI
    /// no live VM of this node holds, recorded on the PeerPod first).
    pub(crate) async fn user_data(&self, caa: &Caa, r: &Record) -> Result<Option<String>, Error> {
        let Some(mut p) = self.get(&r.sandbox_id) else {
            return Ok(None);
        };
        let node_ip = self.node_ip;
        let pod = tunnel::inspect(Path::new(&p.netns)).await.map_err(dp)?;
        let vni = {
            let _g = self.vni_lock.lock().await;
            let records = state::of_node(&caa.client, &caa.args.node_name).await?;
            let own = records
                .iter()
                .find(|pp| pp.spec.sandbox_id == r.sandbox_id)
                .and_then(|pp| pp.status.as_ref().and_then(|s| s.vni));
            let vni = match own.or(p.vni) {
                Some(v) => v,
                None => {
                    let mut held: Vec<u32> = records
                        .iter()
                        .filter_map(|pp| pp.status.as_ref().and_then(|s| s.vni))
                        .collect();
                    held.extend(
                        self.sandboxes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .values()
                            .filter_map(|x| x.vni),
                    );
                    tunnel::next_vni(&held)
                }
            };
            let api: Api<PeerPod> = Api::namespaced(caa.client.clone(), &r.namespace);
            api.patch(
                &r.vm_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION_NETNS: p.netns}}})),
            )
            .await?;
            state::set_status(
                &caa.client,
                &r.namespace,
                &r.vm_name,
                &PeerPodStatus {
                    vni: Some(vni),
                    ..Default::default()
                },
            )
            .await?;
            p.vni = Some(vni);
            self.put(&r.sandbox_id, p.clone());
            vni
        };
        let cert = self.pki.server_cert(&r.vm_name).map_err(dp)?;
        let cfg = Config {
            pod_network: tunnel::pod_network(&pod, node_ip, vni, caa.config.vxlan_port),
            pod_namespace: r.namespace.clone(),
            pod_name: r.pod_name.clone(),
            tls_server_key: cert.key_pem,
            tls_server_cert: cert.cert_pem,
            tls_client_ca: self.pki.ca_pem(),
        };
        Ok(Some(cfg.to_user_data()))
    }

    /// StartVM, once the VM has an IP: readiness `agent`, the worker end of the tunnel and
    /// the agent socket.
    pub(crate) async fn ready(
        &self,
        caa: &Caa,
        r: &Record,
        vm: &Vm,
        budget: Duration,
    ) -> Result<(), Error> {
        let Some(p) = self.get(&r.sandbox_id) else {
            return Ok(());
        };
        let Some(IpAddr::V4(ip)) = vm.address() else {
            return Err(dp(format!("VM {} has no IPv4 address", vm.name)));
        };
        if caa.args.readiness == Readiness::Agent {
            let addr = SocketAddr::new(IpAddr::V4(ip), names::FORWARDER_PORT);
            relay::agent_health(&self.pki.client_config(), addr, &r.vm_name, budget)
                .await
                .map_err(dp)?;
            tracing::info!(vm = %r.vm_name, %addr, "the kata agent answered a health check through the forwarder");
        }
        let node_ip = self.node_ip;
        let vni = p.vni.ok_or_else(|| dp("no VNI recorded"))?;
        tunnel::setup(Path::new(&p.netns), vni, ip, node_ip, caa.config.vxlan_port)
            .await
            .map_err(dp)?;
        self.serve(caa, r, IpAddr::V4(ip)).await
    }

    async fn serve(&self, caa: &Caa, r: &Record, ip: IpAddr) -> Result<(), Error> {
        let path = socket_path(&caa.args.pods_dir, &r.sandbox_id);
        let addr = SocketAddr::new(ip, names::FORWARDER_PORT);
        match &self.sockets {
            Sockets::InProcess(s) => {
                let pki = self.pki.clone();
                s.serve_with(
                    &r.sandbox_id,
                    &path,
                    Arc::new(move || Some(pki.client_config())),
                    addr,
                    &r.vm_name,
                    caa.config.proxy_timeout,
                )
            }
            Sockets::Node(c) => {
                c.serve(noderelay::Serve {
                    id: r.sandbox_id.clone(),
                    path,
                    addr,
                    vm: r.vm_name.clone(),
                    timeout_ms: caa.config.proxy_timeout.as_millis() as u64,
                })
                .await
            }
        }
        .map_err(dp)
    }

    /// After the start-up reconcile: the node agent relay stops serving sandboxes this CAA
    /// does not know (their VMs went while no CAA ran).
    pub(crate) async fn retain(&self) {
        if let Sockets::Node(c) = &self.sockets
            && let Err(e) = c.retain().await
        {
            tracing::warn!(error = %e, "telling the node agent relay which sandboxes remain");
        }
    }

    /// After a CAA restart: serves the agent socket of a running VM again (the tunnel lives
    /// in the kernel and stayed).
    pub(crate) async fn resume(&self, caa: &Caa, r: &Record, pp: &PeerPod) {
        let netns = pp
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_NETNS))
            .cloned();
        let status = pp.status.clone().unwrap_or_default();
        let Some(netns) = netns else { return };
        self.put(
            &r.sandbox_id,
            Path_ {
                netns,
                vni: status.vni,
            },
        );
        if let Some(ip) = status.vm_ip.and_then(|s| s.parse().ok())
            && let Err(e) = self.serve(caa, r, ip).await
        {
            tracing::warn!(vm = %r.vm_name, error = %e, "could not serve the agent socket again");
        }
    }

    /// Before the VM is deleted: stops the agent socket and removes the worker end of the
    /// tunnel.
    pub(crate) async fn stop(&self, r: &Record) {
        match &self.sockets {
            Sockets::InProcess(s) => s.stop(&r.sandbox_id),
            Sockets::Node(c) => c.stop(&r.sandbox_id).await,
        }
        let p = self
            .sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.sandbox_id);
        if let Some(Path_ {
            netns,
            vni: Some(vni),
        }) = p
            && let Err(e) = tunnel::teardown(Path::new(&netns), vni).await
        {
            tracing::warn!(vm = %r.vm_name, error = %e, "removing the pod tunnel");
        }
    }
}

/// `<pods dir>/<id>/agent.ttrpc`.
pub(crate) fn socket_path(pods_dir: &Path, id: &str) -> PathBuf {
    pods_dir.join(id).join(names::AGENT_SOCKET_FILE)
}

/// The worker's end of every pod tunnel, from what the DaemonSet gives CAA through the
/// downward API: the first IPv4 address of `NODE_IPS` (`status.hostIPs`, dual-stack nodes),
/// else `NODE_IP` (`status.hostIP`). The tunnel is VXLAN over IPv4.
pub(crate) fn node_ip(node_ip: Option<&str>, node_ips: Option<&str>) -> Result<Ipv4Addr, String> {
    let node_ip = node_ip.map(str::trim).filter(|s| !s.is_empty());
    let node_ips = node_ips.map(str::trim).filter(|s| !s.is_empty());
    if node_ip.is_none() && node_ips.is_none() {
        return Err(
            "NODE_IP is not set: CAA needs the node's IP (the DaemonSet sets it from \
                    the downward API, status.hostIP) as the worker end of every pod tunnel"
                .into(),
        );
    }
    let mut all: Vec<&str> = node_ips
        .map(|l| {
            l.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    all.extend(node_ip);
    let mut bad = Vec::new();
    for a in &all {
        match a.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => return Ok(v4),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => bad.push(*a),
        }
    }
    if !bad.is_empty() {
        return Err(format!(
            "NODE_IP/NODE_IPS hold {} which is not an IP address",
            bad.join(", ")
        ));
    }
    Err(format!(
        "the node has no IPv4 address (NODE_IP/NODE_IPS: {}): the pod tunnel is VXLAN over IPv4",
        all.join(", ")
    ))
}

/// Fails unless `ip` is an address of an interface in the node's network namespace (CAA runs
/// with the host's network): the VXLAN devices of every pod tunnel are bound to it.
pub(crate) async fn check_node_ip(ip: Ipv4Addr) -> Result<(), String> {
    let nl = crate::cloud::net::Netlink::node()
        .await
        .map_err(|e| format!("reading the node's interfaces: {e}"))?;
    let ifaces = nl
        .interfaces()
        .await
        .map_err(|e| format!("reading the node's interfaces: {e}"))?;
    if ifaces.iter().any(|i| i.addrs.iter().any(|(a, _)| *a == ip)) {
        return Ok(());
    }
    let have: Vec<String> = ifaces
        .iter()
        .flat_map(|i| {
            i.addrs
                .iter()
                .map(move |(a, p)| format!("{a}/{p} ({})", i.name))
        })
        .collect();
    Err(format!(
        "the node IP {ip} is not an address of this node (its addresses: {}): the pod tunnel \
         cannot work; CAA must run with the host's network (hostNetwork) and NODE_IP must be \
         the node's own address",
        if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_ip_is_the_first_ipv4_of_host_ips_else_host_ip() {
        let v4 = |s: &str| Ok(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(node_ip(Some("10.0.0.5"), None), v4("10.0.0.5"));
        assert_eq!(node_ip(Some("10.0.0.5"), Some("")), v4("10.0.0.5"));
        // Dual stack, IPv6 primary: hostIP is v6, hostIPs carries the v4.
        assert_eq!(
            node_ip(Some("fd00::5"), Some("fd00::5,10.0.0.5")),
            v4("10.0.0.5")
        );
        assert_eq!(
            node_ip(Some("10.0.0.5"), Some("10.0.0.5,fd00::5")),
            v4("10.0.0.5")
        );
        let e = node_ip(None, None).unwrap_err();
        assert!(e.contains("NODE_IP is not set"), "{e}");
        let e = node_ip(Some("fd00::5"), Some("fd00::5")).unwrap_err();
        assert!(e.contains("no IPv4 address"), "{e}");
        let e = node_ip(Some("node-1"), None).unwrap_err();
        assert!(
            e.contains("node-1") && e.contains("not an IP address"),
            "{e}"
        );
    }
}
