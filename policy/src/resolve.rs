//! The meaning of a policy set for one inventory: group members and addresses, and for each
//! VM and direction the ordered list of rules that apply to it (infrastructure first, then
//! quarantine, then the tiers by priority, symmetric counterparts in their policy's place).
//! Both the reference evaluator and the compiler start from here.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::load::{port_range, PolicySet, ANY};
use crate::model::*;

/// Who a rule's peers are.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Any,
    /// A group: its member VMs' addresses and its IP blocks.
    Group(String),
    /// Only the member VMs of these groups (the far end of a symmetric rule).
    VmsOf(Vec<String>),
    /// An infrastructure entry's blocks.
    Infra(String),
}

/// One protocol/port item of a service. `proto: None` = any protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePart {
    pub proto: Option<u8>,
    /// (port kind, first, last) where the item names ports or ICMP types.
    pub range: Option<(u32, u16, u16)>,
}

impl ServicePart {
    pub const ANY: ServicePart = ServicePart {
        proto: None,
        range: None,
    };
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatRule {
    /// 0 infrastructure, 1 quarantine, then 2 + tier index.
    pub rank: usize,
    pub tier: String,
    pub policy: String,
    pub id: String,
    pub action: Action,
    pub peers: Vec<Peer>,
    pub services: Vec<ServicePart>,
    pub log: bool,
    pub monitor: bool,
    /// Derived from another VM's rule (symmetric mode).
    pub derived: bool,
}

/// A set of addresses: host addresses plus blocks with exceptions.
#[derive(Clone, Debug, Default)]
pub struct AddrSet {
    pub hosts: BTreeSet<IpAddr>,
    pub blocks: Vec<(IpNetwork, Vec<IpNetwork>)>,
}

impl AddrSet {
    pub fn contains(&self, a: IpAddr) -> bool {
        self.hosts.contains(&a)
            || self
                .blocks
                .iter()
                .any(|(net, except)| net.contains(a) && !except.iter().any(|e| e.contains(a)))
    }

    /// Whether every address whose longest match in a prefix set containing all of this
    /// set's prefixes is `p` belongs to the set (membership is uniform over that region).
    pub fn region_member(&self, p: IpNetwork) -> bool {
        let full = if p.is_ipv4() { 32 } else { 128 };
        if p.prefix() == full && self.hosts.contains(&p.ip()) {
            return true;
        }
        self.blocks
            .iter()
            .any(|(net, except)| covers(*net, p) && !except.iter().any(|e| covers(*e, p)))
    }

    /// Every prefix this set is made of.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.hosts.iter().map(|h| host_net(*h)).chain(
            self.blocks
                .iter()
                .flat_map(|(n, e)| std::iter::once(*n).chain(e.iter().copied())),
        )
    }
}

pub fn host_net(a: IpAddr) -> IpNetwork {
    let len = if a.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(a, len).unwrap_or_else(|_| IpNetwork::from(a))
}

/// `outer` contains all of `inner`.
pub fn covers(outer: IpNetwork, inner: IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.network())
}

fn parse_block(b: &IpBlock) -> Option<(IpNetwork, Vec<IpNetwork>)> {
    let net: IpNetwork = b.cidr.parse().ok()?;
    let net = IpNetwork::new(net.network(), net.prefix()).ok()?;
    let except = b
        .except
        .iter()
        .filter_map(|e| e.parse::<IpNetwork>().ok())
        .filter_map(|e| IpNetwork::new(e.network(), e.prefix()).ok())
        .collect();
    Some((net, except))
}

pub fn service_parts(set: &PolicySet, names: &[String]) -> Vec<ServicePart> {
    if names.is_empty() || names.iter().any(|n| n == ANY) {
        return vec![ServicePart::ANY];
    }
    let mut out = BTreeSet::new();
    for n in names {
        let Some(s) = set.services.get(n) else {
            continue;
        };
        for p in &s.ports {
            let proto = p.protocol.number();
            let range = match p.protocol {
                Protocol::Icmp | Protocol::Icmpv6 => p.icmp_type.map(|t| {
                    let base = u16::from(t) << 8;
                    match p.icmp_code {
                        Some(c) => (
                            bulkhead_abi::PORT_KIND_ICMP,
                            base | u16::from(c),
                            base | u16::from(c),
                        ),
                        None => (bulkhead_abi::PORT_KIND_ICMP, base, base | 0xff),
                    }
                }),
                Protocol::Any => None,
                _ => p
                    .port
                    .as_ref()
                    .and_then(port_range)
                    .map(|(a, b)| (bulkhead_abi::PORT_KIND_L4, a, b)),
            };
            out.insert(ServicePart { proto, range });
        }
    }
    out.into_iter().collect()
}

/// A policy set resolved against an inventory.
pub struct Resolved<'a> {
    pub set: &'a PolicySet,
    pub inventory: &'a Inventory,
    members: BTreeMap<String, BTreeSet<usize>>,
    addrs: BTreeMap<String, AddrSet>,
    infra: BTreeMap<String, AddrSet>,
    vm_index: BTreeMap<&'a str, usize>,
}

fn vm_matches(g: &Group, vm: &VmRecord) -> bool {
    if g.labels.is_empty() && g.expressions.is_empty() {
        return false;
    }
    g.labels.iter().all(|(k, v)| vm.labels.get(k) == Some(v))
        && g.expressions.iter().all(|e| {
            let v = vm.labels.get(&e.key);
            match e.operator {
                Operator::In => v.is_some_and(|v| e.values.contains(v)),
                Operator::NotIn => v.is_none_or(|v| !e.values.contains(v)),
                Operator::Exists => v.is_some(),
                Operator::DoesNotExist => v.is_none(),
            }
        })
}

impl<'a> Resolved<'a> {
    pub fn new(set: &'a PolicySet, inventory: &'a Inventory) -> Self {
        let vm_index: BTreeMap<&str, usize> = inventory
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.as_str(), i))
            .collect();
        let mut r = Self {
            set,
            inventory,
            members: BTreeMap::new(),
            addrs: BTreeMap::new(),
            infra: BTreeMap::new(),
            vm_index,
        };
        for name in set.groups.keys() {
            r.resolve_group(name, &mut BTreeSet::new());
        }
        for i in &set.infrastructure {
            r.infra.insert(
                i.name.clone(),
                AddrSet {
                    hosts: BTreeSet::new(),
                    blocks: i.ip_blocks.iter().filter_map(parse_block).collect(),
                },
            );
        }
        r
    }

    fn resolve_group(&mut self, name: &str, visiting: &mut BTreeSet<String>) {
        if self.members.contains_key(name) || !visiting.insert(name.to_string()) {
            return;
        }
        let Some(g) = self.set.groups.get(name) else {
            return;
        };
        let mut members: BTreeSet<usize> = self
            .inventory
            .vms
            .iter()
            .enumerate()
            .filter(|(_, vm)| vm_matches(g, vm))
            .map(|(i, _)| i)
            .collect();
        members.extend(
            g.vms
                .iter()
                .filter_map(|n| self.vm_index.get(n.as_str()).copied()),
        );
        let mut blocks: Vec<_> = g.ip_blocks.iter().filter_map(parse_block).collect();
        for sub in &g.groups {
            self.resolve_group(sub, visiting);
            members.extend(self.members.get(sub).into_iter().flatten().copied());
            blocks.extend(
                self.addrs
                    .get(sub)
                    .into_iter()
                    .flat_map(|a| a.blocks.clone()),
            );
        }
        let hosts = members.iter().flat_map(|i| self.vm_addrs(*i)).collect();
        self.addrs
            .insert(name.to_string(), AddrSet { hosts, blocks });
        self.members.insert(name.to_string(), members);
    }

    fn vm_addrs(&self, vm: usize) -> Vec<IpAddr> {
        self.inventory.vms[vm]
            .interfaces
            .iter()
            .flat_map(|i| i.addresses.iter().copied())
            .collect()
    }

    pub fn members(&self, group: &str) -> BTreeSet<usize> {
        self.members.get(group).cloned().unwrap_or_default()
    }

    /// The addresses a peer stands for (`None` for `Any`).
    pub fn peer_addrs(&self, p: &Peer) -> Option<AddrSet> {
        match p {
            Peer::Any => None,
            Peer::Group(g) => Some(self.addrs.get(g).cloned().unwrap_or_default()),
            Peer::VmsOf(gs) => Some(AddrSet {
                hosts: gs
                    .iter()
                    .flat_map(|g| self.members(g))
                    .flat_map(|i| self.vm_addrs(i))
                    .collect(),
                blocks: Vec::new(),
            }),
            Peer::Infra(n) => Some(self.infra.get(n).cloned().unwrap_or_default()),
        }
    }

    fn peers(names: &[String]) -> Vec<Peer> {
        names
            .iter()
            .map(|n| {
                if n == ANY {
                    Peer::Any
                } else {
                    Peer::Group(n.clone())
                }
            })
            .collect()
    }

    fn applies(&self, p: &Policy, vm: usize) -> bool {
        p.applies_to.iter().any(|g| self.members(g).contains(&vm))
    }

    /// The rules that apply to `vm` in `dir` (`bulkhead_abi::DIR_*`), in evaluation order.
    pub fn rules_for(&self, vm: usize, dir: u8) -> Vec<FlatRule> {
        let ingress = dir == bulkhead_abi::DIR_INGRESS;
        let name = &self.inventory.vms[vm].name;
        let mut out = Vec::new();
        for i in &self.set.infrastructure {
            out.push(FlatRule {
                rank: 0,
                tier: "infrastructure".into(),
                policy: format!("infrastructure:{}", i.name),
                id: format!("infrastructure:{}", i.name),
                action: Action::Allow,
                peers: vec![Peer::Infra(i.name.clone())],
                services: service_parts(self.set, &i.services),
                log: false,
                monitor: false,
                derived: false,
            });
        }
        for q in self.set.quarantine.iter().filter(|q| &q.vm == name) {
            if !q.allow.is_empty() {
                out.push(FlatRule {
                    rank: 1,
                    tier: "quarantine".into(),
                    policy: format!("quarantine:{name}"),
                    id: format!("quarantine:{name}:allowed"),
                    action: Action::Allow,
                    peers: Self::peers(&q.allow),
                    services: vec![ServicePart::ANY],
                    log: true,
                    monitor: false,
                    derived: false,
                });
            }
            out.push(FlatRule {
                rank: 1,
                tier: "quarantine".into(),
                policy: format!("quarantine:{name}"),
                id: format!("quarantine:{name}"),
                action: Action::Deny,
                peers: vec![Peer::Any],
                services: vec![ServicePart::ANY],
                log: false,
                monitor: false,
                derived: false,
            });
        }
        for p in &self.set.policies {
            let rank = 2 + self.set.tier_index(&p.tier);
            let monitor = p.mode == Mode::Monitor;
            let flat = |r: &Rule, peers: Vec<Peer>, derived: bool| FlatRule {
                rank,
                tier: p.tier.clone(),
                policy: p.name.clone(),
                id: r.id.clone(),
                action: r.action,
                peers,
                services: service_parts(self.set, &r.services),
                log: r.log,
                monitor,
                derived,
            };
            let (own, other) = if ingress {
                (&p.ingress, &p.egress)
            } else {
                (&p.egress, &p.ingress)
            };
            if self.applies(p, vm) {
                for r in own {
                    let names = if ingress { &r.from } else { &r.to };
                    out.push(flat(r, Self::peers(names), false));
                }
            }
            // The other end of this policy's allows between managed VMs.
            for r in other {
                let names = if ingress { &r.to } else { &r.from };
                let names_vm = names
                    .iter()
                    .any(|g| g != ANY && self.members(g).contains(&vm));
                if r.action == Action::Allow && r.symmetric && names_vm {
                    out.push(flat(r, vec![Peer::VmsOf(p.applies_to.clone())], true));
                }
            }
        }
        // Stable: infrastructure, quarantine, then tiers (policies are already in order).
        out.sort_by_key(|r| r.rank);
        out
    }
}

/// How a flow fares against an ordered rule list: the deciding rule (None = the default
/// action), and every rule looked at on the way (for `explain`).
pub fn first_match<'r>(
    rules: &'r [FlatRule],
    mut matches: impl FnMut(&FlatRule) -> bool,
    mut considered: Option<&mut Vec<(&'r FlatRule, bool)>>,
) -> Option<&'r FlatRule> {
    let mut skip_rank: Option<usize> = None;
    for r in rules {
        if skip_rank == Some(r.rank) {
            continue;
        }
        let m = matches(r);
        if let Some(c) = considered.as_deref_mut() {
            c.push((r, m));
        }
        if !m {
            continue;
        }
        if r.action == Action::Pass {
            skip_rank = Some(r.rank);
            continue;
        }
        return Some(r);
    }
    None
}

/// Whether a service part covers protocol `proto` and port key `port` (destination port, or
/// `type << 8 | code` for ICMP).
pub fn part_matches(s: &ServicePart, proto: u8, port: u16) -> bool {
    if s.proto.is_some_and(|p| p != proto) {
        return false;
    }
    match s.range {
        None => true,
        Some((kind, a, b)) => {
            bulkhead_abi::port_kind(proto) == Some(kind) && (a..=b).contains(&port)
        }
    }
}
