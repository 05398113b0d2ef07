//! Worker side of the pod tunnel. CNI made the pod's network namespace (an interface with
//! the pod IP, usually a veth on a bridge); CAA reads that interface, creates a VXLAN device
//! towards the VM on `VXLAN_PORT` (in the node's namespace, so its socket is on the node's
//! network), moves it into the pod namespace as `vxlan0` and redirects every frame between
//! the pod interface and it with tc (ingress qdisc + u32 match-all + mirred egress redirect,
//! both ways). The pod interface keeps its IP and MAC, which the VM's interface takes over,
//! so peers on the pod network reach the VM through the unchanged CNI plumbing.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::cloud::net::{self, Iface, NetError, Netlink};
use crate::forwarder::config::{PodNetwork, Route};

/// Name of the tunnel device inside the pod namespace.
pub(crate) const POD_VXLAN: &str = "vxlan0";
/// First VNI handed out (as upstream).
pub(crate) const FIRST_VNI: u32 = 555000;

/// The pod interface CNI configured.
#[derive(Clone, Debug)]
pub(crate) struct PodIface {
    /// The interface.
    pub(crate) iface: Iface,
    /// Routes through it.
    pub(crate) routes: Vec<Route>,
}

fn nerr(op: &str, d: impl std::fmt::Display) -> NetError {
    NetError {
        op: op.to_string(),
        detail: d.to_string(),
    }
}

/// Reads the pod interface (the one with an IPv4 address that is not loopback or the tunnel).
pub(crate) async fn inspect(netns: &Path) -> Result<PodIface, NetError> {
    let nl = Netlink::in_netns(netns).await?;
    let iface = nl
        .interfaces()
        .await?
        .into_iter()
        .find(|i| i.name != "lo" && i.name != POD_VXLAN && !i.addrs.is_empty())
        .ok_or_else(|| {
            nerr(
                &format!("inspecting {}", netns.display()),
                "no interface with an IPv4 address",
            )
        })?;
    let routes = nl
        .routes()
        .await?
        .into_iter()
        .filter(|r| r.oif == Some(iface.index) && r.gw.is_some())
        .map(|r| Route {
            dst: format!("{}/{}", r.dst, r.prefix),
            gw: r.gw.map(|g| g.to_string()).unwrap_or_default(),
            dev: iface.name.clone(),
        })
        .collect();
    Ok(PodIface { iface, routes })
}

/// The VM's view of the pod network for `pod`.
pub(crate) fn pod_network(pod: &PodIface, worker: Ipv4Addr, vni: u32, port: u16) -> PodNetwork {
    let (ip, prefix) = pod.iface.addrs[0];
    PodNetwork {
        podip: format!("{ip}/{prefix}"),
        pod_hw_addr: net::format_mac(&pod.iface.mac),
        interface: pod.iface.name.clone(),
        worker_node_ip: worker.to_string(),
        tunnel_type: "vxlan".into(),
        mtu: pod.iface.mtu.min(crate::forwarder::config::MAX_MTU),
        vxlan_port: port,
        vxlan_id: vni,
        routes: pod.routes.clone(),
        neighbors: Vec::new(),
    }
}

/// Creates the worker end of the tunnel for the pod in `netns` towards `vm`.
pub(crate) async fn setup(
    netns: &Path,
    vni: u32,
    vm: Ipv4Addr,
    local: Ipv4Addr,
    port: u16,
) -> Result<(), NetError> {
    let pod = inspect(netns).await?;
    let node = Netlink::node().await?;
    let staging = format!("sbxv{vni}");
    if let Some(i) = node.index_of(&staging).await? {
        node.delete(i).await?;
    }
    let pn = Netlink::in_netns(netns).await?;
    if let Some(i) = pn.index_of(POD_VXLAN).await? {
        pn.delete(i).await?;
    }
    let vx = node.add_vxlan(&staging, vni, vm, Some(local), port).await?;
    let ns = std::fs::File::open(netns).map_err(|e| nerr("opening the pod namespace", e))?;
    node.move_to(vx, &ns).await?;
    let vx = pn
        .index_of(&staging)
        .await?
        .ok_or_else(|| nerr("moving the VXLAN device", "not in the pod namespace"))?;
    let mtu = pod.iface.mtu.min(crate::forwarder::config::MAX_MTU);
    pn.configure(vx, POD_VXLAN, mtu, None).await?;
    pn.up(vx).await?;
    pn.redirect(pod.iface.index, vx).await?;
    pn.redirect(vx, pod.iface.index).await?;
    tracing::info!(netns = %netns.display(), vni, %vm, "worker end of the pod tunnel ready");
    Ok(())
}

/// Removes the worker end of the tunnel; nothing to do when it is gone.
pub(crate) async fn teardown(netns: &Path, vni: u32) -> Result<(), NetError> {
    let node = Netlink::node().await?;
    if let Some(i) = node.index_of(&format!("sbxv{vni}")).await? {
        node.delete(i).await?;
    }
    if !netns.exists() {
        return Ok(());
    }
    let pn = match Netlink::in_netns(netns).await {
        Ok(p) => p,
        // The pod namespace is gone: so is everything in it.
        Err(_) => return Ok(()),
    };
    if let Some(i) = pn.index_of(POD_VXLAN).await? {
        pn.delete(i).await?;
    }
    for iface in pn.interfaces().await? {
        if iface.name != "lo" {
            // Removing the ingress qdisc removes its redirect filter.
            pn.del_ingress(iface.index).await;
        }
    }
    Ok(())
}

/// The smallest VNI from [`FIRST_VNI`] that none of `held` is.
pub(crate) fn next_vni(held: &[u32]) -> u32 {
    (FIRST_VNI..)
        .find(|v| !held.contains(v))
        .expect("VNIs left")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vni_held_by_a_live_vm_is_never_handed_out_again() {
        assert_eq!(next_vni(&[]), FIRST_VNI);
        assert_eq!(next_vni(&[FIRST_VNI, FIRST_VNI + 2]), FIRST_VNI + 1);
        assert_eq!(next_vni(&[FIRST_VNI + 1]), FIRST_VNI);
    }
}
