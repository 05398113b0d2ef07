//! The server side of DHCP on one link: what Azure's platform does for a VM's NIC, for the
//! ARM test server's pod VMs under qemu ([`super::qemu`], one tap link per VM). The messages
//! are the pod VM's own client's ([`crate::forwarder::init::dhcp`]).

use std::net::Ipv4Addr;
use std::path::Path;

use crate::forwarder::init::dhcp::{BOOTREPLY, BOOTREQUEST, DhcpError, Message, MessageType};

/// What a server grants the one client of its link (see [`serve`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The client's address.
    pub(crate) address: Ipv4Addr,
    /// Its prefix length.
    pub(crate) prefix: u8,
    /// Its default gateway.
    pub(crate) router: Option<Ipv4Addr>,
    /// The server's own address (option 54).
    pub(crate) server: Ipv4Addr,
    /// Lease time in seconds.
    pub(crate) lease_seconds: u32,
}

/// The server's answer of `kind` to `request`, granting `grant` (a NAK grants nothing).
pub(crate) fn reply(request: &Message, kind: MessageType, grant: &Grant) -> Message {
    let mut options = vec![(53, vec![kind as u8]), (54, grant.server.octets().to_vec())];
    if kind != MessageType::Nak {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(grant.prefix.min(32)))
            .unwrap_or(0);
        options.push((51, grant.lease_seconds.to_be_bytes().to_vec()));
        options.push((1, mask.to_be_bytes().to_vec()));
        if let Some(r) = grant.router {
            options.push((3, r.octets().to_vec()));
        }
    }
    Message {
        op: BOOTREPLY,
        xid: request.xid,
        flags: request.flags,
        yiaddr: if kind == MessageType::Nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            grant.address
        },
        chaddr: request.chaddr,
        options,
    }
}

/// A server's answer to `request` on a link whose one client gets `grant`: an OFFER to a
/// DISCOVER, an ACK to a REQUEST for the granted address (a NAK to one for another), nothing
/// to the rest (a REQUEST selecting another server included).
pub(crate) fn answer(request: &Message, grant: &Grant) -> Option<Message> {
    if request.op != BOOTREQUEST {
        return None;
    }
    match request.kind()? {
        MessageType::Discover => Some(reply(request, MessageType::Offer, grant)),
        MessageType::Request => {
            if request
                .option(54)
                .is_some_and(|s| s != grant.server.octets())
            {
                return None;
            }
            let asked = request
                .option(50)
                .and_then(|v| <[u8; 4]>::try_from(v).ok())
                .map(Ipv4Addr::from);
            let kind = if asked.is_none_or(|a| a == grant.address) {
                MessageType::Ack
            } else {
                MessageType::Nak
            };
            Some(reply(request, kind, grant))
        }
        _ => None,
    }
}

/// A server socket (port 67, broadcast allowed) bound to `iface` in the network namespace
/// `netns` (a `/proc/<pid>/ns/net` or a bind mount; `None`: the calling thread's).
pub(crate) fn server_socket(
    iface: &str,
    netns: Option<&Path>,
) -> Result<std::net::UdpSocket, DhcpError> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
    use std::os::fd::AsRawFd;
    let err = |d: &dyn std::fmt::Display| DhcpError::Socket {
        iface: iface.into(),
        detail: d.to_string(),
    };
    let name = std::ffi::OsString::from(iface);
    let netns = netns.map(Path::to_path_buf);
    let open = move || -> Result<std::net::UdpSocket, String> {
        if let Some(ns) = netns {
            let f = std::fs::File::open(&ns).map_err(|e| format!("{}: {e}", ns.display()))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering {}: {e}", ns.display()))?;
        }
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| e.to_string())?;
        // One server per link: sockets bound to different links share the port.
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e.to_string())?;
        socket::setsockopt(&fd, sockopt::Broadcast, &true).map_err(|e| e.to_string())?;
        socket::setsockopt(&fd, sockopt::BindToDevice, &name).map_err(|e| e.to_string())?;
        socket::bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, 67))
            .map_err(|e| e.to_string())?;
        let s = std::net::UdpSocket::from(fd);
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(s)
    };
    // A thread of its own: entering a namespace changes the calling thread for good.
    std::thread::spawn(open)
        .join()
        .map_err(|_| err(&"the socket thread panicked"))?
        .map_err(|e| err(&e))
}

/// Serves `grant` on `sock` (see [`server_socket`]) until the client holds it: returns
/// once an ACK is sent.
pub(crate) async fn serve(sock: tokio::net::UdpSocket, grant: Grant) -> Result<(), DhcpError> {
    let io = |e: std::io::Error| DhcpError::Socket {
        iface: "server".into(),
        detail: e.to_string(),
    };
    let mut buf = vec![0u8; 1500];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        let Some(req) = Message::decode(&buf[..n]) else {
            continue;
        };
        let Some(reply) = answer(&req, &grant) else {
            continue;
        };
        // The client has no address yet: the answer is broadcast on the link.
        sock.send_to(&reply.encode(), (Ipv4Addr::BROADCAST, 68))
            .await
            .map_err(io)?;
        if reply.kind() == Some(MessageType::Ack) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn a_server_offers_and_acks_its_grant_and_naks_another_address() {
        let grant = Grant {
            address: Ipv4Addr::new(10, 251, 0, 2),
            prefix: 30,
            router: Some(Ipv4Addr::new(10, 251, 0, 1)),
            server: Ipv4Addr::new(10, 251, 0, 1),
            lease_seconds: 86400,
        };
        let discover = Message::request(MessageType::Discover, 9, MAC, vec![]);
        let offer = answer(&discover, &grant).unwrap();
        let back = Message::decode(&offer.encode()).unwrap();
        assert_eq!(back.op, BOOTREPLY);
        assert_eq!(back.kind(), Some(MessageType::Offer));
        assert_eq!(back.xid, 9);
        assert_eq!(back.chaddr, MAC);
        let request = Message::request(
            MessageType::Request,
            9,
            MAC,
            vec![
                (50, back.yiaddr.octets().to_vec()),
                (54, back.option(54).unwrap().to_vec()),
            ],
        );
        // The pod VM's own client reads the lease.
        let lease = answer(&request, &grant).unwrap().lease().unwrap();
        assert_eq!(lease.address, grant.address);
        assert_eq!(lease.prefix, 30);
        assert_eq!(lease.router, grant.router);
        assert_eq!(lease.server, grant.server);
        assert_eq!(lease.lease_seconds, 86400);
        let other = Message::request(MessageType::Request, 9, MAC, vec![(50, vec![10, 0, 0, 9])]);
        assert_eq!(
            answer(&other, &grant).unwrap().kind(),
            Some(MessageType::Nak)
        );
        let elsewhere =
            Message::request(MessageType::Request, 9, MAC, vec![(54, vec![1, 2, 3, 4])]);
        assert!(answer(&elsewhere, &grant).is_none());
        assert!(answer(&offer, &grant).is_none());
    }
}
