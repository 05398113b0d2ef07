//! NSG rule evaluation as Azure does it: the rules of one direction in priority order, the
//! first rule matching protocol, destination port, source and destination decides; the
//! default rules (`AllowVnetInBound`, `DenyAllInBound`, ...) come last. Flows are between
//! address ranges (the worker subnet and the pod VMs' subnet): an Allow rule must cover the
//! whole range, a Deny rule hits as soon as it overlaps part of it.

use std::net::Ipv4Addr;

use super::azure_arm::{Direction, Nsg, Rule};

/// An IPv4 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prefix {
    base: u32,
    len: u8,
}

impl Prefix {
    /// Parses `10.0.1.0/24` or a single address.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 32)?),
            None => (s.trim(), 32),
        };
        let ip: Ipv4Addr = addr.parse().ok()?;
        let mask = mask(len);
        Some(Self {
            base: u32::from(ip) & mask,
            len,
        })
    }

    fn last(&self) -> u32 {
        self.base | !mask(self.len)
    }

    /// Whether `other` lies entirely inside this prefix.
    pub(crate) fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && (other.base & mask(self.len)) == self.base
    }

    /// Whether the two prefixes share an address.
    pub(crate) fn overlaps(&self, other: &Prefix) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

/// Transport protocol of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// As NSG rules and `az` spell it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "Tcp",
            Protocol::Udp => "Udp",
        }
    }
}

/// A flow to check.
#[derive(Clone, Debug)]
pub(crate) struct Flow {
    /// Which rules apply.
    pub(crate) direction: Direction,
    /// Protocol.
    pub(crate) protocol: Protocol,
    /// Source range.
    pub(crate) source: Prefix,
    /// Destination range.
    pub(crate) destination: Prefix,
    /// Destination port.
    pub(crate) port: u16,
}

/// What the NSG does with a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Allowed by this rule.
    Allowed {
        /// Rule name.
        rule: String,
    },
    /// Denied by this rule (priority given for the fix).
    Denied {
        /// Rule name.
        rule: String,
        /// Its priority.
        priority: u32,
    },
}

fn port_matches(spec: &str, port: u16) -> bool {
    let spec = spec.trim();
    if spec == "*" {
        return true;
    }
    match spec.split_once('-') {
        Some((a, b)) => match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
            (Ok(a), Ok(b)) => a <= port && port <= b,
            _ => false,
        },
        None => spec.parse::<u16>() == Ok(port),
    }
}

/// Whether `spec` (prefix or service tag) matches `range`: covering it for Allow,
/// overlapping it for Deny.
fn address_matches(spec: &str, range: &Prefix, vnet: &[Prefix], allow: bool) -> bool {
    let spec = spec.trim();
    let hit = |p: &Prefix| {
        if allow {
            p.covers(range)
        } else {
            p.overlaps(range)
        }
    };
    if spec == "*" || spec.eq_ignore_ascii_case("Any") {
        return true;
    }
    if spec.eq_ignore_ascii_case("VirtualNetwork") {
        return vnet.iter().any(hit);
    }
    match Prefix::parse(spec) {
        Some(p) => hit(&p),
        // Other service tags (Internet, AzureLoadBalancer, ...) name no private VNet range.
        None => false,
    }
}

fn rule_matches(r: &Rule, flow: &Flow, vnet: &[Prefix]) -> bool {
    r.direction == flow.direction
        && (r.protocol == "*" || r.protocol.eq_ignore_ascii_case(flow.protocol.as_str()))
        && r.ports.iter().any(|p| port_matches(p, flow.port))
        && r.sources
            .iter()
            .any(|s| address_matches(s, &flow.source, vnet, r.allow))
        && r.destinations
            .iter()
            .any(|d| address_matches(d, &flow.destination, vnet, r.allow))
}

/// Evaluates `flow` against `nsg`; `vnet` is the address space `VirtualNetwork` stands for.
pub(crate) fn evaluate(nsg: &Nsg, flow: &Flow, vnet: &[Prefix]) -> Verdict {
    let mut rules: Vec<&Rule> = nsg
        .rules
        .iter()
        .filter(|r| r.direction == flow.direction)
        .collect();
    rules.sort_by_key(|r| r.priority);
    for r in rules {
        if rule_matches(r, flow, vnet) {
            return if r.allow {
                Verdict::Allowed {
                    rule: r.name.clone(),
                }
            } else {
                Verdict::Denied {
                    rule: r.name.clone(),
                    priority: r.priority,
                }
            };
        }
    }
    Verdict::Denied {
        rule: "(no rule matches)".into(),
        priority: 65500,
    }
}

/// A free custom priority just below `deny_priority` (custom rules use 100-4096).
pub(crate) fn free_priority_below(nsg: &Nsg, deny_priority: u32) -> u32 {
    let top = deny_priority.saturating_sub(1).clamp(100, 4096);
    (100..=top)
        .rev()
        .find(|p| !nsg.rules.iter().any(|r| r.priority == *p))
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        name: &str,
        prio: u32,
        dir: Direction,
        allow: bool,
        proto: &str,
        src: &str,
        ports: &str,
    ) -> Rule {
        Rule {
            name: name.into(),
            priority: prio,
            direction: dir,
            allow,
            protocol: proto.into(),
            sources: vec![src.into()],
            destinations: vec!["*".into()],
            ports: vec![ports.into()],
        }
    }

    fn defaults() -> Vec<Rule> {
        let mut v = vec![
            rule(
                "AllowVnetInBound",
                65000,
                Direction::Inbound,
                true,
                "*",
                "VirtualNetwork",
                "*",
            ),
            rule(
                "DenyAllInBound",
                65500,
                Direction::Inbound,
                false,
                "*",
                "*",
                "*",
            ),
        ];
        v[0].destinations = vec!["VirtualNetwork".into()];
        v
    }

    fn flow(proto: Protocol, port: u16) -> Flow {
        Flow {
            direction: Direction::Inbound,
            protocol: proto,
            source: Prefix::parse("10.0.1.0/24").unwrap(),
            destination: Prefix::parse("10.0.1.0/24").unwrap(),
            port,
        }
    }

    fn vnet() -> Vec<Prefix> {
        vec![Prefix::parse("10.0.0.0/16").unwrap()]
    }

    #[test]
    fn the_default_vnet_rule_allows_traffic_inside_the_vnet() {
        let nsg = Nsg {
            id: "n".into(),
            name: "n".into(),
            rules: defaults(),
        };
        assert_eq!(
            evaluate(&nsg, &flow(Protocol::Udp, 9000), &vnet()),
            Verdict::Allowed {
                rule: "AllowVnetInBound".into()
            }
        );
    }

    #[test]
    fn a_deny_all_rule_before_the_defaults_blocks_vxlan_unless_an_allow_comes_first() {
        let mut rules = defaults();
        rules.push(rule(
            "deny-all",
            4000,
            Direction::Inbound,
            false,
            "*",
            "*",
            "*",
        ));
        rules.push(rule(
            "agent",
            300,
            Direction::Inbound,
            true,
            "Tcp",
            "10.0.1.0/24",
            "15150",
        ));
        let mut nsg = Nsg {
            id: "n".into(),
            name: "n".into(),
            rules,
        };
        assert_eq!(
            evaluate(&nsg, &flow(Protocol::Udp, 9000), &vnet()),
            Verdict::Denied {
                rule: "deny-all".into(),
                priority: 4000
            }
        );
        assert!(matches!(
            evaluate(&nsg, &flow(Protocol::Tcp, 15150), &vnet()),
            Verdict::Allowed { .. }
        ));
        assert_eq!(free_priority_below(&nsg, 4000), 3999);
        nsg.rules.push(rule(
            "vxlan",
            310,
            Direction::Inbound,
            true,
            "Udp",
            "10.0.0.0/8",
            "8000-9999",
        ));
        assert_eq!(
            evaluate(&nsg, &flow(Protocol::Udp, 9000), &vnet()),
            Verdict::Allowed {
                rule: "vxlan".into()
            }
        );
    }

    #[test]
    fn an_allow_for_part_of_the_subnet_does_not_count_but_a_partial_deny_does() {
        let mut rules = defaults();
        rules.push(rule(
            "narrow",
            200,
            Direction::Inbound,
            true,
            "Udp",
            "10.0.1.0/25",
            "9000",
        ));
        rules.push(rule(
            "deny-half",
            300,
            Direction::Inbound,
            false,
            "Udp",
            "10.0.1.128/25",
            "9000",
        ));
        let nsg = Nsg {
            id: "n".into(),
            name: "n".into(),
            rules,
        };
        assert_eq!(
            evaluate(&nsg, &flow(Protocol::Udp, 9000), &vnet()),
            Verdict::Denied {
                rule: "deny-half".into(),
                priority: 300
            }
        );
        // The wrong protocol or port is not matched at all.
        assert!(matches!(
            evaluate(&nsg, &flow(Protocol::Tcp, 9000), &vnet()),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            evaluate(&nsg, &flow(Protocol::Udp, 9001), &vnet()),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn prefixes_parse_cover_and_overlap() {
        let a = Prefix::parse("10.0.0.0/16").unwrap();
        let b = Prefix::parse("10.0.1.7/24").unwrap();
        assert!(a.covers(&b) && !b.covers(&a) && b.overlaps(&a));
        assert!(!Prefix::parse("10.1.0.0/16").unwrap().overlaps(&a));
        assert_eq!(Prefix::parse("10.0.0.300/8"), None);
        assert!(Prefix::parse("0.0.0.0/0").unwrap().covers(&a));
    }
}
