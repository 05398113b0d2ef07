//! Netlink (rtnetlink) and network namespace helpers: the local provider's VM links, and
//! shared with the forwarder (pod namespace in the VM) and CAA (worker side of the tunnel),
//! which import them from here so that `cloud` itself imports nothing else of the crate.
//!
//! A netlink socket belongs to the network namespace it was opened in, so [`Netlink::in_netns`]
//! opens one from a short-lived thread that entered the namespace; the connection then runs
//! on the tokio runtime like any other.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

/// A failed network operation, naming what was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {detail}")]
pub struct NetError {
    /// What was attempted.
    pub(crate) op: String,
    /// Why it failed.
    pub(crate) detail: String,
}

impl NetError {
    fn new(op: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self {
            op: op.into(),
            detail: detail.to_string(),
        }
    }
}

/// Whether a netlink error means "already exists".
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_eexist())
}

const fn libc_eexist() -> i32 {
    17
}

/// Parses `a.b.c.d/len`.
pub(crate) fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((ip.parse().ok()?, len))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// Formats a MAC address.
pub(crate) fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One interface as netlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    /// Interface index.
    pub(crate) index: u32,
    /// Name.
    pub name: String,
    /// MAC address.
    pub(crate) mac: Vec<u8>,
    /// MTU.
    pub(crate) mtu: u32,
    /// IPv4 addresses with prefix lengths.
    pub(crate) addrs: Vec<(Ipv4Addr, u8)>,
}

/// One IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route4 {
    /// Destination.
    pub(crate) dst: Ipv4Addr,
    /// Prefix length.
    pub(crate) prefix: u8,
    /// Gateway, if any.
    pub(crate) gw: Option<Ipv4Addr>,
    /// Output interface index.
    pub(crate) oif: Option<u32>,
}

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    /// The rtnetlink handle.
    pub handle: Handle,
}

impl Netlink {
    /// A connection in the calling thread's network namespace (inside a tokio runtime).
    pub(crate) fn here() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::new("opening netlink", e))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A connection in the node's network namespace: `SANDBOXD_NODE_NETNS` when set (tests
    /// run a whole node inside a namespace), else the calling thread's.
    pub(crate) async fn node() -> Result<Self, NetError> {
        match std::env::var_os("SANDBOXD_NODE_NETNS") {
            Some(p) => Self::in_netns(Path::new(&p)).await,
            None => Self::here(),
        }
    }

    /// A connection in the network namespace at `path` (a bind-mounted nsfs file or
    /// `/proc/<pid>/ns/net`).
    pub async fn in_netns(path: &Path) -> Result<Self, NetError> {
        let path = path.to_path_buf();
        let rt = tokio::runtime::Handle::current();
        let op = format!("opening netlink in {}", path.display());
        let (conn, handle) = tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || -> Result<_, String> {
                let f = File::open(&path).map_err(|e| e.to_string())?;
                setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
                let _g = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
                Ok((conn, handle))
            })
            .join()
            .map_err(|_| "thread panicked".to_string())?
        })
        .await
        .map_err(|e| NetError::new(&op, e))?
        .map_err(|e| NetError::new(&op, e))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Every interface with its IPv4 addresses.
    pub async fn interfaces(&self) -> Result<Vec<Iface>, NetError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::new("listing links", e))?;
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::new("listing addresses", e))?;
        Ok(links
            .into_iter()
            .map(|l| {
                let mut i = Iface {
                    index: l.header.index,
                    name: String::new(),
                    mac: Vec::new(),
                    mtu: 0,
                    addrs: Vec::new(),
                };
                for a in &l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => i.name = n.clone(),
                        LinkAttribute::Address(m) => i.mac = m.clone(),
                        LinkAttribute::Mtu(m) => i.mtu = *m,
                        _ => {}
                    }
                }
                for a in addrs.iter().filter(|a| a.header.index == i.index) {
                    for attr in &a.attributes {
                        if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                            i.addrs.push((*ip, a.header.prefix_len));
                        }
                    }
                }
                i
            })
            .collect())
    }

    /// The index of the link `name`, if it exists.
    pub async fn index_of(&self, name: &str) -> Result<Option<u32>, NetError> {
        Ok(self
            .interfaces()
            .await?
            .into_iter()
            .find(|i| i.name == name)
            .map(|i| i.index))
    }

    /// IPv4 routes of the main table.
    pub(crate) async fn routes(&self) -> Result<Vec<Route4>, NetError> {
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::new("listing routes", e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.table == 254)
            .map(|m| {
                let mut r = Route4 {
                    dst: Ipv4Addr::UNSPECIFIED,
                    prefix: m.header.destination_prefix_length,
                    gw: None,
                    oif: None,
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => r.dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gw = Some(*ip),
                        RouteAttribute::Oif(i) => r.oif = Some(*i),
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    async fn set(&self, msg: LinkMessage, op: String) -> Result<(), NetError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetError::new(op, e))
    }

    /// Brings a link up.
    pub async fn up(&self, index: u32) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_index(index).up().build(),
            format!("bringing link {index} up"),
        )
        .await
    }

    /// Renames a (down) link and sets its MTU and, if given, its MAC address.
    pub async fn configure(
        &self,
        index: u32,
        name: &str,
        mtu: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<(), NetError> {
        let mut b = LinkUnspec::new_with_index(index)
            .name(name.to_string())
            .mtu(mtu);
        if let Some(m) = mac {
            b = b.address(m.to_vec());
        }
        self.set(b.build(), format!("configuring link {name}"))
            .await
    }

    /// Moves a link into the network namespace of the open nsfs file `ns`.
    pub async fn move_to(&self, index: u32, ns: &File) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
            format!("moving link {index} to another namespace"),
        )
        .await
    }

    /// Deletes a link.
    pub(crate) async fn delete(&self, index: u32) -> Result<(), NetError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| NetError::new(format!("deleting link {index}"), e))
    }

    /// Adds an IPv4 address (no error when present).
    pub async fn add_addr(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
        {
            Err(e) if !exists(&e) => Err(NetError::new(format!("adding {ip}/{prefix}"), e)),
            _ => Ok(()),
        }
    }

    /// Adds a route (no error when present).
    pub async fn add_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        gw: Option<Ipv4Addr>,
        oif: u32,
    ) -> Result<(), NetError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(oif);
        if let Some(g) = gw {
            b = b.gateway(g);
        }
        match self.handle.route().add(b.build()).execute().await {
            Err(e) if !exists(&e) => Err(NetError::new(format!("adding route {dst}/{prefix}"), e)),
            _ => Ok(()),
        }
    }

    /// Adds a permanent neighbour entry.
    pub(crate) async fn add_neighbor(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(rtnetlink::packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NetError::new(format!("adding neighbour {ip}"), e))
    }

    /// Creates a VXLAN device; returns its index.
    pub(crate) async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        remote: Ipv4Addr,
        local: Option<Ipv4Addr>,
        port: u16,
    ) -> Result<u32, NetError> {
        let mut b = LinkVxlan::new(name, vni).port(port).remote(remote);
        if let Some(l) = local {
            b = b.local(l);
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(|e| NetError::new(format!("creating vxlan {name} (id {vni})"), e))?;
        self.index_of(name)
            .await?
            .ok_or_else(|| NetError::new(format!("creating vxlan {name}"), "link vanished"))
    }

    /// Creates a veth pair; returns the index of `name`.
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<u32, NetError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(|e| NetError::new(format!("creating veth {name}/{peer}"), e))?;
        self.index_of(name)
            .await?
            .ok_or_else(|| NetError::new(format!("creating veth {name}"), "link vanished"))
    }

    /// Redirects every frame arriving on `from` out of `to` (ingress qdisc + u32 match-all
    /// filter with a mirred egress redirect), like `tc ... action mirred egress redirect`.
    pub(crate) async fn redirect(&self, from: u32, to: u32) -> Result<(), NetError> {
        let op = format!("redirecting link {from} to {to}");
        match self
            .handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
        {
            Err(e) if !exists(&e) => return Err(NetError::new(&op, e)),
            _ => {}
        }
        self.handle
            .traffic_filter(from as i32)
            .add()
            .parent(0xffff_0000)
            .protocol(0x0003u16.to_be())
            .redirect(to)
            .map_err(|e| NetError::new(&op, e))?
            .execute()
            .await
            .map_err(|e| NetError::new(&op, e))
    }
}

impl Netlink {
    /// Removes the ingress qdisc of a link (and with it its filters); no error when absent.
    pub(crate) async fn del_ingress(&self, index: u32) {
        use rtnetlink::packet_route::tc::TcHandle;
        let mut req = self.handle.qdisc().del(index as i32);
        let m = req.message_mut();
        m.header.parent = TcHandle::INGRESS;
        m.header.handle = TcHandle::from(0xffff_0000);
        let _ = req.execute().await;
    }
}

/// Connects to `addr` from the node's network namespace (see [`Netlink::node`]).
pub(crate) async fn connect_from_node(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(ns) = std::env::var_os("SANDBOXD_NODE_NETNS") else {
        return tokio::net::TcpStream::connect(addr).await;
    };
    let s = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
            let f = File::open(&ns)?;
            setns(&f, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .join()
        .map_err(|_| std::io::Error::other("connect thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    tokio::net::TcpStream::from_std(s)
}

/// Creates a named network namespace: a new namespace bind-mounted on `path` (like
/// `ip netns add`). The calling thread's namespace is unchanged.
pub fn create_named_netns(path: &Path) -> Result<(), NetError> {
    let op = format!("creating network namespace {}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NetError::new(&op, e))?;
    }
    File::create(path).map_err(|e| NetError::new(&op, e))?;
    let target: PathBuf = path.to_path_buf();
    std::thread::spawn(move || -> Result<(), String> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))
    })
    .join()
    .map_err(|_| NetError::new(&op, "thread panicked"))?
    .map_err(|e| NetError::new(&op, e))
}

/// Unmounts and removes a named network namespace; nothing to do when it is gone.
pub fn remove_named_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_macs_parse_and_print() {
        assert_eq!(
            parse_cidr("10.244.1.5/24"),
            Some((Ipv4Addr::new(10, 244, 1, 5), 24))
        );
        assert_eq!(parse_cidr("10.244.1.5"), None);
        assert_eq!(parse_cidr("10.244.1.5/33"), None);
        let mac = parse_mac("0a:58:0A:f4:01:05").unwrap();
        assert_eq!(format_mac(&mac), "0a:58:0a:f4:01:05");
        assert_eq!(parse_mac("0a:58:0a"), None);
    }
}
