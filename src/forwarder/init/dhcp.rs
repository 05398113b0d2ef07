//! A minimal DHCPv4 client (RFC 2131/2132) for the VM's primary NIC: DISCOVER, OFFER,
//! REQUEST, ACK over a UDP socket bound to the interface, with the broadcast flag set so the
//! answers reach an interface that has no address yet.

use std::net::Ipv4Addr;
use std::time::Duration;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// `op` of a client's message.
pub(crate) const BOOTREQUEST: u8 = 1;
/// `op` of a server's message.
pub(crate) const BOOTREPLY: u8 = 2;
const FLAG_BROADCAST: u16 = 0x8000;

/// DHCP message types (option 53).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MessageType {
    /// Client looks for servers.
    Discover = 1,
    /// Server offers an address.
    Offer = 2,
    /// Client asks for the offered address.
    Request = 3,
    /// Server refuses.
    Decline = 4,
    /// Server confirms the lease.
    Ack = 5,
    /// Server refuses the request.
    Nak = 6,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            _ => return None,
        })
    }
}

/// One DHCP message (the fields this client uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Message {
    /// BOOTREQUEST (1) or BOOTREPLY (2).
    pub(crate) op: u8,
    /// Transaction id.
    pub(crate) xid: u32,
    /// Flags (broadcast bit).
    pub(crate) flags: u16,
    /// "Your" address: the address offered.
    pub(crate) yiaddr: Ipv4Addr,
    /// Client hardware address.
    pub(crate) chaddr: [u8; 6],
    /// Options as (code, value), in order.
    pub(crate) options: Vec<(u8, Vec<u8>)>,
}

/// A lease: what the interface gets configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The address.
    pub(crate) address: Ipv4Addr,
    /// Prefix length from the subnet mask.
    pub(crate) prefix: u8,
    /// Default gateway (option 3).
    pub(crate) router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    pub(crate) dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    pub(crate) domain: Option<String>,
    /// Classless static routes (option 121): destination, prefix, gateway.
    pub(crate) routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    /// The server that granted it (option 54).
    pub(crate) server: Ipv4Addr,
    /// Lease time in seconds (option 51).
    pub(crate) lease_seconds: u32,
}

impl Message {
    /// A client request of `kind` from `mac`.
    pub(crate) fn request(
        kind: MessageType,
        xid: u32,
        mac: [u8; 6],
        extra: Vec<(u8, Vec<u8>)>,
    ) -> Self {
        let mut options = vec![(53, vec![kind as u8])];
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&mac);
        options.push((61, client_id));
        options.extend(extra);
        // Subnet mask, router, DNS, domain, MTU, classless routes.
        options.push((55, vec![1, 3, 6, 15, 26, 121]));
        Self {
            op: BOOTREQUEST,
            xid,
            flags: FLAG_BROADCAST,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: mac,
            options,
        }
    }

    /// The wire form (at least 300 bytes, as BOOTP relays expect).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 236];
        b[0] = self.op;
        b[1] = 1; // Ethernet
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[10..12].copy_from_slice(&self.flags.to_be_bytes());
        b[16..20].copy_from_slice(&self.yiaddr.octets());
        b[28..34].copy_from_slice(&self.chaddr);
        b.extend_from_slice(&MAGIC);
        for (code, value) in &self.options {
            b.push(*code);
            b.push(value.len() as u8);
            b.extend_from_slice(value);
        }
        b.push(255);
        if b.len() < 300 {
            b.resize(300, 0);
        }
        b
    }

    /// Parses a message; `None` when it is not DHCP.
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 240 || b[236..240] != MAGIC || b[1] != 1 || b[2] != 6 {
            return None;
        }
        let mut options = Vec::new();
        let mut i = 240;
        while i < b.len() {
            match b[i] {
                0 => i += 1,
                255 => break,
                code => {
                    let len = *b.get(i + 1)? as usize;
                    options.push((code, b.get(i + 2..i + 2 + len)?.to_vec()));
                    i += 2 + len;
                }
            }
        }
        Some(Self {
            op: b[0],
            xid: u32::from_be_bytes(b[4..8].try_into().ok()?),
            flags: u16::from_be_bytes([b[10], b[11]]),
            yiaddr: Ipv4Addr::from(<[u8; 4]>::try_from(&b[16..20]).ok()?),
            chaddr: b[28..34].try_into().ok()?,
            options,
        })
    }

    /// The value of option `code`.
    pub(crate) fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// The message type (option 53).
    pub(crate) fn kind(&self) -> Option<MessageType> {
        MessageType::from_u8(*self.option(53)?.first()?)
    }

    fn ip(&self, code: u8) -> Option<Ipv4Addr> {
        let v = self.option(code)?;
        Some(Ipv4Addr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?))
    }

    /// The lease an ACK grants.
    pub(crate) fn lease(&self) -> Option<Lease> {
        let mask = self.ip(1).map(u32::from).unwrap_or(0xffff_ff00);
        let dns = self
            .option(6)
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect();
        Some(Lease {
            address: self.yiaddr,
            prefix: mask.leading_ones() as u8,
            router: self.ip(3),
            dns,
            domain: self.option(15).map(|d| {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            }),
            routes: self.option(121).map(classless_routes).unwrap_or_default(),
            server: self.ip(54)?,
            lease_seconds: self
                .option(51)
                .and_then(|v| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)))
                .unwrap_or(0),
        })
    }
}

/// Decodes option 121 (RFC 3442): width, significant destination octets, gateway.
pub(crate) fn classless_routes(v: &[u8]) -> Vec<(Ipv4Addr, u8, Ipv4Addr)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let width = v[i];
        if width > 32 {
            break;
        }
        let n = (width as usize).div_ceil(8);
        let Some(dst) = v.get(i + 1..i + 1 + n) else {
            break;
        };
        let Some(gw) = v.get(i + 1 + n..i + 5 + n) else {
            break;
        };
        let mut d = [0u8; 4];
        d[..n].copy_from_slice(dst);
        out.push((
            Ipv4Addr::from(d),
            width,
            Ipv4Addr::new(gw[0], gw[1], gw[2], gw[3]),
        ));
        i += 5 + n;
    }
    out
}

/// Errors of the DHCP exchange.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DhcpError {
    /// The socket cannot be set up.
    #[error("DHCP socket on {iface}: {detail}")]
    Socket {
        /// The interface.
        iface: String,
        /// What failed.
        detail: String,
    },
    /// No server answered in time.
    #[error("no DHCP lease on {0} in time")]
    Timeout(String),
    /// The server refused.
    #[error("DHCP server refused the request (NAK)")]
    Nak,
}

fn socket(iface: &str) -> Result<tokio::net::UdpSocket, DhcpError> {
    let err = |d: &dyn std::fmt::Display| DhcpError::Socket {
        iface: iface.into(),
        detail: d.to_string(),
    };
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68)).map_err(|e| err(&e))?;
    s.set_broadcast(true).map_err(|e| err(&e))?;
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(iface),
    )
    .map_err(|e| err(&e))?;
    s.set_nonblocking(true).map_err(|e| err(&e))?;
    tokio::net::UdpSocket::from_std(s).map_err(|e| err(&e))
}

/// Sends `msg` and waits up to `wait` for a reply of `xid` whose type is one of `want`.
async fn exchange(
    sock: &tokio::net::UdpSocket,
    msg: &Message,
    want: &[MessageType],
    wait: Duration,
) -> Option<Message> {
    let dst = (Ipv4Addr::BROADCAST, 67);
    sock.send_to(&msg.encode(), dst).await.ok()?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 1500];
    loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => n,
            _ => return None,
        };
        if let Some(m) = Message::decode(&buf[..n])
            && m.op == BOOTREPLY
            && m.xid == msg.xid
            && m.chaddr == msg.chaddr
            && m.kind().is_some_and(|k| want.contains(&k))
        {
            return Some(m);
        }
    }
}

/// Obtains a lease on `iface` (which must be up), retrying until `total` passes.
pub(crate) async fn acquire(
    iface: &str,
    mac: [u8; 6],
    total: Duration,
) -> Result<Lease, DhcpError> {
    let sock = socket(iface)?;
    let deadline = tokio::time::Instant::now() + total;
    let mut wait = Duration::from_secs(1);
    let mut xid = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ std::process::id();
    while tokio::time::Instant::now() < deadline {
        xid = xid.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let discover = Message::request(MessageType::Discover, xid, mac, vec![]);
        if let Some(offer) = exchange(&sock, &discover, &[MessageType::Offer], wait).await
            && let Some(server) = offer.option(54).map(|s| s.to_vec())
        {
            let request = Message::request(
                MessageType::Request,
                xid,
                mac,
                vec![(50, offer.yiaddr.octets().to_vec()), (54, server)],
            );
            match exchange(&sock, &request, &[MessageType::Ack, MessageType::Nak], wait).await {
                Some(m) if m.kind() == Some(MessageType::Nak) => return Err(DhcpError::Nak),
                Some(ack) => {
                    if let Some(l) = ack.lease() {
                        return Ok(l);
                    }
                }
                None => {}
            }
        }
        wait = (wait * 2).min(Duration::from_secs(8));
    }
    Err(DhcpError::Timeout(iface.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn a_discover_is_a_broadcast_bootp_request_with_our_mac() {
        let m = Message::request(MessageType::Discover, 0xdeadbeef, MAC, vec![]);
        let b = m.encode();
        assert!(b.len() >= 300);
        assert_eq!(b[0], 1);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[10..12], &[0x80, 0]);
        assert_eq!(&b[28..34], &MAC);
        assert_eq!(&b[236..240], &MAGIC);
        assert_eq!(&b[240..243], &[53, 1, 1]);
        let back = Message::decode(&b).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.kind(), Some(MessageType::Discover));
    }

    #[test]
    fn an_ack_yields_address_prefix_router_dns_and_routes() {
        let mut ack = Message::request(MessageType::Ack, 7, MAC, vec![]);
        ack.op = BOOTREPLY;
        ack.yiaddr = Ipv4Addr::new(10, 0, 2, 15);
        ack.options = vec![
            (53, vec![5]),
            (1, vec![255, 255, 255, 0]),
            (3, vec![10, 0, 2, 2]),
            (6, vec![10, 0, 2, 3, 8, 8, 8, 8]),
            (15, b"example.internal".to_vec()),
            (51, 86400u32.to_be_bytes().to_vec()),
            (54, vec![10, 0, 2, 2]),
            // 168.63.129.16/32 via 10.0.2.1 and 0/0 via 10.0.2.2.
            (121, vec![32, 168, 63, 129, 16, 10, 0, 2, 1, 0, 10, 0, 2, 2]),
        ];
        let l = Message::decode(&ack.encode()).unwrap().lease().unwrap();
        assert_eq!(l.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(
            l.dns,
            vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert_eq!(l.domain.as_deref(), Some("example.internal"));
        assert_eq!(l.lease_seconds, 86400);
        assert_eq!(
            l.routes,
            vec![
                (
                    Ipv4Addr::new(168, 63, 129, 16),
                    32,
                    Ipv4Addr::new(10, 0, 2, 1)
                ),
                (Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 0, 2, 2)),
            ]
        );
    }

    #[test]
    fn garbage_and_truncated_options_are_not_dhcp() {
        assert!(Message::decode(&[0u8; 100]).is_none());
        let mut b = Message::request(MessageType::Discover, 1, MAC, vec![]).encode();
        b.truncate(241);
        b[240] = 53; // option without its length
        assert!(Message::decode(&b).is_none());
        assert!(classless_routes(&[33, 1]).is_empty());
    }
}
