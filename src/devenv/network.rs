//! The host side of a development or test cluster's network, so nothing its API server or
//! its node dials can leave this machine.
//!
//! Each control plane gets a *slot*: a port-less bridge `sbxcp<slot>` holding the API
//! server's address (`10.201.<slot>.1`, bound and advertised, so pods reach the `kubernetes`
//! Service), and its own Service CIDR (a /20 of 10.96.0.0/12) routed into that bridge. A
//! ClusterIP the API server dials (a webhook registered by Service) therefore ends in a dead
//! end on this machine — not in a blackhole route, which also breaks host→ClusterIP through
//! kube-proxy — until a node's kube-proxy can answer it: then the Service CIDR and the pod
//! CIDR are routed via the node (`10.201.<slot>.2`, a veth whose host end joins the bridge).
//! The node itself lives in its own network namespace with no route off the machine (see
//! [`super::node`]).
//!
//! The host forwards nothing that comes in from the bridge (an iptables FORWARD rule per
//! bridge), whatever its `ip_forward`.
//!
//! Slots are taken atomically (creating the bridge fails when another run holds it); each
//! bridge's alias names its owner's pid, so the next allocation removes what a dead run left.

use std::net::Ipv4Addr;
use std::process::Command;

use super::{Error, io};

/// How many slots there are.
const SLOTS: u8 = 64;
/// Bridge names: the prefix and the slot.
const BRIDGE_PREFIX: &str = "sbxcp";
/// The alias prefix that marks a bridge as ours, followed by the owner's pid.
const ALIAS_PREFIX: &str = "sandboxd-dev-cluster pid=";

/// One control plane's addresses and routes on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNetwork {
    /// The slot (0..64).
    pub slot: u8,
    /// The port-less bridge (`sbxcp<slot>`).
    pub(crate) bridge: String,
    /// The API server's address on the bridge.
    pub host_ip: Ipv4Addr,
    /// The node's address (its end of the veth on the bridge).
    pub node_ip: Ipv4Addr,
    /// The Service CIDR of this control plane.
    pub(crate) service_cidr: String,
    /// The first Service IP (the `kubernetes` Service).
    pub(crate) first_service_ip: Ipv4Addr,
    /// The pod CIDR of the node.
    pub pod_cidr: String,
}

impl HostNetwork {
    /// The addresses of `slot` (pure; nothing is created).
    pub(crate) fn for_slot(slot: u8) -> Self {
        let (a, b) = (96 + slot / 16, (slot % 16) * 16);
        Self {
            slot,
            bridge: format!("{BRIDGE_PREFIX}{slot}"),
            host_ip: Ipv4Addr::new(10, 201, slot, 1),
            node_ip: Ipv4Addr::new(10, 201, slot, 2),
            service_cidr: format!("10.{a}.{b}.0/20"),
            first_service_ip: Ipv4Addr::new(10, a, b, 1),
            pod_cidr: format!("10.244.{slot}.0/24"),
        }
    }

    /// Takes the first free slot: creates the bridge with the host address and routes the
    /// Service CIDR into it. Needs root (CAP_NET_ADMIN). Removes bridges of dead owners first.
    pub fn allocate() -> Result<Self, Error> {
        sweep_dead();
        let me = std::process::id();
        for slot in 0..SLOTS {
            let net = Self::for_slot(slot);
            // Creating the bridge is the lock: it fails when the name is taken.
            if ip(&["link", "add", "name", &net.bridge, "type", "bridge"]).is_err() {
                continue;
            }
            let alias = format!("{ALIAS_PREFIX}{me}");
            let setup = ip(&["link", "set", "dev", &net.bridge, "alias", &alias])
                .and_then(|_| {
                    ip(&[
                        "addr",
                        "add",
                        &format!("{}/24", net.host_ip),
                        "dev",
                        &net.bridge,
                    ])
                })
                .and_then(|_| ip(&["link", "set", "dev", &net.bridge, "up"]))
                .and_then(|_| net.route_into_dead_end())
                .and_then(|_| forward_drop(&net.bridge, "-I"));
            if let Err(e) = setup {
                let _ = ip(&["link", "del", "dev", &net.bridge]);
                return Err(e);
            }
            return Ok(net);
        }
        Err(Error::Io(format!(
            "no free network slot: {SLOTS} bridges {BRIDGE_PREFIX}* exist"
        )))
    }

    /// Routes the Service CIDR into the bridge (a dead end: nothing on it answers for a
    /// Service IP) and drops the pod CIDR route.
    pub(crate) fn route_into_dead_end(&self) -> Result<(), Error> {
        let _ = ip(&["route", "del", &self.pod_cidr]);
        ip(&["route", "replace", &self.service_cidr, "dev", &self.bridge])
    }

    /// Routes the Service CIDR and the pod CIDR via the node (its kube-proxy answers).
    pub(crate) fn route_via_node(&self) -> Result<(), Error> {
        let via = self.node_ip.to_string();
        ip(&[
            "route",
            "replace",
            &self.service_cidr,
            "via",
            &via,
            "dev",
            &self.bridge,
        ])?;
        ip(&[
            "route",
            "replace",
            &self.pod_cidr,
            "via",
            &via,
            "dev",
            &self.bridge,
        ])
    }

    /// Removes the bridge (and with it every route through it) and its forwarding rule.
    pub fn release(&self) {
        release_bridge(&self.bridge);
    }
}

fn release_bridge(bridge: &str) {
    let _ = ip(&["link", "del", "dev", bridge]);
    while forward_drop(bridge, "-D").is_ok() {}
}

/// Inserts (`-I`) or deletes (`-D`) the host's rule that drops whatever would be forwarded
/// from `bridge`: whatever the host's `ip_forward`, nothing from the control plane's bridge
/// (the node, a pod that made itself a route) is routed on by this machine.
fn forward_drop(bridge: &str, op: &str) -> Result<(), Error> {
    let comment = format!("sandboxd: nothing from {bridge} is forwarded");
    run(
        "iptables",
        &[
            "-w",
            op,
            "FORWARD",
            "-i",
            bridge,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "DROP",
        ],
    )
    .map(|_| ())
}

/// Runs `ip ARGS`, failing with its error output.
pub(crate) fn ip(args: &[&str]) -> Result<(), Error> {
    run("ip", args).map(|_| ())
}

/// Runs a command, returning its stdout; fails with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| io(&format!("running {program}"), e))?;
    if !out.status.success() {
        return Err(Error::Io(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes bridges whose owner process is gone.
fn sweep_dead() {
    let Ok(out) = run("ip", &["-o", "link", "show", "type", "bridge"]) else {
        return;
    };
    for line in out.lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        if !name.starts_with(BRIDGE_PREFIX) {
            continue;
        }
        let Some(pid) = line
            .split(ALIAS_PREFIX)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            release_bridge(name);
        }
    }
}

/// Whether this process may change the host's network (root).
pub fn can_configure() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_share_an_address_or_a_cidr() {
        let all: Vec<HostNetwork> = (0..SLOTS).map(HostNetwork::for_slot).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.service_cidr, b.service_cidr);
                assert_ne!(a.pod_cidr, b.pod_cidr);
                assert_ne!(a.host_ip, b.host_ip);
                assert_ne!(a.bridge, b.bridge);
            }
            assert!(
                a.bridge.len() <= 15,
                "interface names have at most 15 bytes"
            );
        }
        let first = HostNetwork::for_slot(0);
        assert_eq!(first.service_cidr, "10.96.0.0/20");
        assert_eq!(first.first_service_ip, Ipv4Addr::new(10, 96, 0, 1));
        let last = HostNetwork::for_slot(SLOTS - 1);
        assert_eq!(last.service_cidr, "10.99.240.0/20");
    }
}
