//! The pod data path as CAA drives it, hooked into the VM lifecycle: the forwarder config
//! (pod network, VNI, per-VM server certificate) in the VM's user data at StartVM; once the
//! VM has an IP, readiness `agent` (a mutual-TLS handshake with its forwarder), the worker
//! end of the tunnel and the agent socket; all of it removed before the VM is deleted, and
//! resumed from the PeerPod after a CAA restart. Active for sandboxes whose CreateVM named
//! a network namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::relay::{self, AgentSockets, Pki};
use super::state::{self, Record};
use super::tunnel;
use super::{Caa, Error, Readiness};
use crate::api::peerpod::{PeerPod, PeerPodStatus};
use crate::cloud::Vm;
use crate::forwarder::Config;

/// Annotation on the PeerPod with the pod's network namespace on the worker.
pub const ANNOTATION_NETNS: &str = "sandboxd.io/pod-netns";

#[derive(Clone, Debug)]
struct Path_ {
    netns: String,
    vni: Option<u32>,
}

/// Data path state of one CAA.
pub struct Datapath {
    pki: Pki,
    sockets: AgentSockets,
    sandboxes: Mutex<HashMap<String, Path_>>,
    vni_lock: tokio::sync::Mutex<()>,
    node_ip: Option<Ipv4Addr>,
}

fn dp(e: impl std::fmt::Display) -> Error {
    Error::DataPath(e.to_string())
}

impl Datapath {
    /// Loads (or creates) the CAA certificates from the Secret `CAA_TLS_SECRET` in
    /// `POD_NAMESPACE`; without access to it, certificates are kept in memory only.
    pub async fn new(client: &kube::Client) -> Self {
        let ns = std::env::var("POD_NAMESPACE")
            .unwrap_or_else(|_| "openshift-sandboxed-containers-operator".into());
        let name = std::env::var("CAA_TLS_SECRET").unwrap_or_else(|_| relay::DEFAULT_SECRET.into());
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
        let node_ip = std::env::var("NODE_IP").ok().and_then(|s| s.parse().ok());
        Self {
            pki,
            sockets: AgentSockets::default(),
            sandboxes: Mutex::new(HashMap::new()),
            vni_lock: tokio::sync::Mutex::new(()),
            node_ip,
        }
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
    pub fn remember_netns(&self, id: &str, netns: &str) {
        if !netns.is_empty() {
            self.put(
                id,
                Path_ {
                    netns: netns.to_string(),
                    vni: None,
                },
            );
        }
    }

    /// StartVM, before the create call: the user data carrying the forwarder config (a VNI
    /// no live VM of this node holds, recorded on the PeerPod first).
    pub async fn user_data(&self, caa: &Caa, r: &Record) -> Result<Option<String>, Error> {
        let Some(mut p) = self.get(&r.sandbox_id) else {
            return Ok(None);
        };
        let node_ip = self
            .node_ip
            .ok_or_else(|| dp("NODE_IP is not set: the pod tunnel needs the worker's IP"))?;
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
    pub async fn ready(
        &self,
        caa: &Caa,
        r: &Record,
        vm: &Vm,
        budget: Duration,
    ) -> Result<(), Error> {
        let Some(p) = self.get(&r.sandbox_id) else {
            return Ok(());
        };
        let Some(IpAddr::V4(ip)) = vm.private_ip else {
            return Err(dp(format!("VM {} has no IPv4 address", vm.name)));
        };
        if caa.args.readiness == Readiness::Agent {
            let addr = SocketAddr::new(IpAddr::V4(ip), crate::forwarder::PORT);
            relay::handshake(&self.pki.client_config(), addr, &r.vm_name, budget)
                .await
                .map_err(dp)?;
            tracing::info!(vm = %r.vm_name, %addr, "forwarder answered");
        }
        let node_ip = self.node_ip.ok_or_else(|| dp("NODE_IP is not set"))?;
        let vni = p.vni.ok_or_else(|| dp("no VNI recorded"))?;
        tunnel::setup(Path::new(&p.netns), vni, ip, node_ip, caa.config.vxlan_port)
            .await
            .map_err(dp)?;
        self.serve(caa, r, IpAddr::V4(ip))
    }

    fn serve(&self, caa: &Caa, r: &Record, ip: IpAddr) -> Result<(), Error> {
        self.sockets
            .serve(
                &r.sandbox_id,
                &socket_path(&caa.args.pods_dir, &r.sandbox_id),
                self.pki.client_config(),
                SocketAddr::new(ip, crate::forwarder::PORT),
                &r.vm_name,
                caa.config.proxy_timeout,
            )
            .map_err(dp)
    }

    /// After a CAA restart: serves the agent socket of a running VM again (the tunnel lives
    /// in the kernel and stayed).
    pub fn resume(&self, caa: &Caa, r: &Record, pp: &PeerPod) {
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
            && let Err(e) = self.serve(caa, r, ip)
        {
            tracing::warn!(vm = %r.vm_name, error = %e, "could not serve the agent socket again");
        }
    }

    /// Before the VM is deleted: stops the agent socket and removes the worker end of the
    /// tunnel.
    pub async fn stop(&self, r: &Record) {
        self.sockets.stop(&r.sandbox_id);
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
pub fn socket_path(pods_dir: &Path, id: &str) -> PathBuf {
    pods_dir.join(id).join("agent.ttrpc")
}
