//! The pod network namespace inside the VM: `/run/netns/podns` with a VXLAN device towards
//! the worker carrying the pod's interface name, IP, MAC, MTU (≤ 1450), routes and
//! neighbours. The VXLAN device is created in the VM's own namespace (where the underlay
//! is) and then moved into the pod namespace, so its UDP socket stays on the VM's NIC.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;

use super::config::Config;
use crate::cloud::net::{self, NetError, Netlink};

/// Temporary name of the VXLAN device before it takes the pod interface's name.
const STAGING_NAME: &str = "sbx-podvx";

/// Creates the pod namespace at `path` and its interface from `cfg`.
pub(crate) async fn setup(cfg: &Config, path: &Path) -> Result<(), NetError> {
    let n = &cfg.pod_network;
    let err = |op: &str, d: &dyn std::fmt::Display| NetError {
        op: op.to_string(),
        detail: d.to_string(),
    };
    let (ip, prefix) = net::parse_cidr(&n.podip).ok_or_else(|| err("pod IP", &n.podip))?;
    let mac = net::parse_mac(&n.pod_hw_addr).ok_or_else(|| err("pod MAC", &n.pod_hw_addr))?;
    let worker: Ipv4Addr = n
        .worker_node_ip
        .parse()
        .map_err(|e| err("worker-node-ip", &e))?;

    // A restarted forwarder starts over.
    net::remove_named_netns(path);
    net::create_named_netns(path)?;
    let host = Netlink::here()?;
    if let Some(lo) = host.index_of("lo").await? {
        host.up(lo).await?;
    }
    if let Some(old) = host.index_of(STAGING_NAME).await? {
        host.delete(old).await?;
    }
    let vx = host
        .add_vxlan(STAGING_NAME, n.vxlan_id, worker, None, n.vxlan_port)
        .await?;
    let ns = File::open(path).map_err(|e| err("opening the pod namespace", &e))?;
    host.move_to(vx, &ns).await?;

    let pod = Netlink::in_netns(path).await?;
    let idx = pod
        .index_of(STAGING_NAME)
        .await?
        .ok_or_else(|| err("moving the VXLAN device", &"not found in the pod namespace"))?;
    pod.configure(idx, &n.interface, cfg.mtu(), Some(mac))
        .await?;
    pod.add_addr(idx, ip, prefix).await?;
    pod.up(idx).await?;
    if let Some(lo) = pod.index_of("lo").await? {
        pod.up(lo).await?;
    }
    for r in &n.routes {
        let (dst, len) = net::parse_cidr(&r.dst).ok_or_else(|| err("route", &r.dst))?;
        let gw = match r.gw.as_str() {
            "" => None,
            g => Some(
                g.parse::<Ipv4Addr>()
                    .map_err(|e| err("route gateway", &e))?,
            ),
        };
        let dev = if r.dev.is_empty() || r.dev == n.interface {
            idx
        } else {
            pod.index_of(&r.dev)
                .await?
                .ok_or_else(|| err("route device", &r.dev))?
        };
        pod.add_route(dst, len, gw, dev).await?;
    }
    for nb in &n.neighbors {
        let ip: Ipv4Addr = nb.ip.parse().map_err(|e| err("neighbour", &e))?;
        let mac = net::parse_mac(&nb.hw_addr).ok_or_else(|| err("neighbour MAC", &nb.hw_addr))?;
        pod.add_neighbor(idx, ip, mac).await?;
    }
    tracing::info!(ns = %path.display(), ip = %n.podip, vni = n.vxlan_id, worker = %worker, mtu = cfg.mtu(), "pod network namespace ready");
    Ok(())
}
