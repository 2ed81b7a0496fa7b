//! The compiler's output for one host, and a plain-Rust model of how the datapath reads it.
//!
//! [`HostTables`] is what the policy compiler emits and the agent writes into the maps
//! (stamping the generation into every key). [`TableIndex::decide`] answers a flow the way
//! the eBPF program does — the differential test holds the program to it, and the compiler's
//! property tests hold the compiled tables to the language's meaning through it.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::*;

/// One host's compiled policy, generation-free (`gen` is 0 in every key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostTables {
    /// Endpoints (VM interfaces); the index is the `slot` used in `policy` keys. The agent maps
    /// each to its stable datapath slot when writing the maps.
    pub endpoints: Vec<EndpointTable>,
    /// Address prefix → identity. Should contain `0.0.0.0/0` and `::/0` (else unmatched
    /// addresses resolve to `IDENTITY_ANY`). Shared: the hosts of one compile whose peers
    /// are the same hold one copy, and an unchanged ipcache compares by pointer.
    pub ipcache: SharedVec<IpcacheEntry>,
    /// Port ranges → port class; ports not covered are class `PORT_CLASS_ANY`.
    pub port_classes: Vec<PortClassRange>,
    /// Policy entries, sorted by key.
    pub policy: Vec<(PolicyKey, Verdict)>,
    /// Rule index → stable rule id (what counters and events name). Index 0 is the default.
    /// Shared: every host of one compile holds the same list.
    pub rules: SharedVec<String>,
}

/// A vector shared by reference counting and copied on first write (`DerefMut`): large
/// parts of many hosts' tables (the ipcache) are one allocation until one host changes its
/// own, and two handles to one allocation compare equal without reading it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedVec<T>(Arc<Vec<T>>);

impl<T> SharedVec<T> {
    /// Do both handles hold the same allocation (so the same contents)?
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl<T> Default for SharedVec<T> {
    fn default() -> Self {
        Self(Arc::new(Vec::new()))
    }
}

impl<T> std::ops::Deref for SharedVec<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Clone> std::ops::DerefMut for SharedVec<T> {
    /// Copies the contents first if another handle shares them.
    fn deref_mut(&mut self) -> &mut Vec<T> {
        Arc::make_mut(&mut self.0)
    }
}

impl<T> From<Vec<T>> for SharedVec<T> {
    fn from(v: Vec<T>) -> Self {
        Self(Arc::new(v))
    }
}

impl<T> FromIterator<T> for SharedVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self(Arc::new(iter.into_iter().collect()))
    }
}

impl<'a, T> IntoIterator for &'a SharedVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'a, T: Clone> IntoIterator for &'a mut SharedVec<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        Arc::make_mut(&mut self.0).iter_mut()
    }
}

/// `aa:bb:cc:dd:ee:ff`, lower case: how MACs are written in ids, inventories and commands.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The id of a VM interface (`<vm-name>/<mac>`): how the compiler names an endpoint and how
/// the agent finds the interface it binds to.
pub fn endpoint_id(vm: &str, mac: &[u8; 6]) -> String {
    format!("{vm}/{}", format_mac(mac))
}

/// One VM interface in the compiled tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointTable {
    /// Inventory id of the interface: `<vm-name>/<interface-mac>`.
    pub id: String,
    pub mac: [u8; 6],
    /// Addresses the VM may send from (anti-spoofing).
    pub addrs: Vec<IpAddr>,
    /// `EP_*` flags.
    pub flags: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheEntry {
    pub addr: IpAddr,
    /// Prefix length in the address's own family (0..=32 or 0..=128).
    pub prefix_len: u8,
    pub identity: u32,
}

impl IpcacheEntry {
    /// The LPM key: data and prefix length in bits, including the generation bits.
    pub fn lpm_key(&self, gen: u32) -> (u32, IpcacheKey) {
        let (addr, bits) = match self.addr {
            IpAddr::V4(a) => (v4_mapped(a.octets()), 96 + u32::from(self.prefix_len)),
            IpAddr::V6(a) => (a.octets(), u32::from(self.prefix_len)),
        };
        (IPCACHE_GEN_BITS + bits, IpcacheKey { gen, addr })
    }

    fn contains(&self, addr: &IpAddr) -> bool {
        let (mine, other, bits) = match (self.addr, addr) {
            (IpAddr::V4(m), IpAddr::V4(o)) => (
                u128::from(u32::from(m)) << 96,
                u128::from(u32::from(*o)) << 96,
                u32::from(self.prefix_len),
            ),
            (IpAddr::V6(m), IpAddr::V6(o)) => {
                (u128::from(m), u128::from(*o), u32::from(self.prefix_len))
            }
            _ => return false,
        };
        if bits == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - bits.min(128));
        mine & mask == other & mask
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortClassRange {
    /// `PORT_KIND_L4` or `PORT_KIND_ICMP`.
    pub kind: u32,
    pub first: u16,
    pub last: u16,
    pub class: u32,
}

/// A flow as the datapath judges it (new flow, or a re-judge on an epoch change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowQuery {
    pub slot: u32,
    pub direction: u8,
    /// The other end: destination for egress, source for ingress.
    pub peer: IpAddr,
    pub proto: u8,
    /// Destination port, or `type << 8 | code` for ICMP; 0 for protocols without ports.
    pub port: u16,
}

/// [`HostTables`] indexed for lookups.
pub struct TableIndex<'a> {
    tables: &'a HostTables,
    policy: HashMap<PolicyKey, Verdict>,
    ports: HashMap<(u32, u16), u32>,
}

impl HostTables {
    pub fn index(&self) -> TableIndex<'_> {
        let mut ports = HashMap::new();
        for r in &self.port_classes {
            for p in r.first..=r.last {
                ports.insert((r.kind, p), r.class);
            }
        }
        TableIndex {
            tables: self,
            policy: self.policy.iter().copied().collect(),
            ports,
        }
    }
}

impl TableIndex<'_> {
    /// Identity of an address: longest matching prefix, `IDENTITY_ANY` if none.
    pub fn identity(&self, addr: &IpAddr) -> u32 {
        self.tables
            .ipcache
            .iter()
            .filter(|e| e.contains(addr))
            .max_by_key(|e| e.prefix_len)
            .map_or(IDENTITY_ANY, |e| e.identity)
    }

    pub fn port_class(&self, proto: u8, port: u16) -> u32 {
        match port_kind(proto) {
            Some(kind) => self.ports.get(&(kind, port)).copied().unwrap_or(0),
            None => PORT_CLASS_ANY,
        }
    }

    /// The verdict the datapath reaches for a new flow; `None` when the endpoint has no
    /// entries at all (the datapath then applies the bootstrap posture).
    pub fn decide(&self, q: &FlowQuery) -> Option<Verdict> {
        let identity = self.identity(&q.peer);
        let class = self.port_class(q.proto, q.port);
        let key = |id, proto, class| PolicyKey::new(0, q.slot, q.direction, id, proto, class);
        let ids = [identity, IDENTITY_ANY];
        let ids = if identity == IDENTITY_ANY {
            &ids[1..]
        } else {
            &ids[..]
        };
        for &id in ids {
            let Some(v1) = self.policy.get(&key(id, PROTO_ANY, PORT_CLASS_ANY)) else {
                continue;
            };
            if v1.flags & VERDICT_REFINE == 0 || q.proto == PROTO_ANY {
                return Some(*v1);
            }
            let Some(v2) = self.policy.get(&key(id, q.proto, PORT_CLASS_ANY)) else {
                return Some(*v1);
            };
            if v2.flags & VERDICT_REFINE == 0 || class == PORT_CLASS_ANY {
                return Some(*v2);
            }
            return Some(*self.policy.get(&key(id, q.proto, class)).unwrap_or(v2));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(action: u8, flags: u8, rule: u32) -> Verdict {
        Verdict::new(action, flags, rule)
    }

    #[test]
    fn levels_fall_back_to_the_shallower_verdict() {
        let t = HostTables {
            ipcache: vec![
                IpcacheEntry {
                    addr: "0.0.0.0".parse().unwrap(),
                    prefix_len: 0,
                    identity: 1,
                },
                IpcacheEntry {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix_len: 8,
                    identity: 2,
                },
            ]
            .into(),
            port_classes: vec![PortClassRange {
                kind: PORT_KIND_L4,
                first: 5432,
                last: 5432,
                class: 1,
            }],
            policy: vec![
                (
                    PolicyKey::new(0, 0, DIR_INGRESS, IDENTITY_ANY, 0, 0),
                    v(0, 0, 0),
                ),
                (
                    PolicyKey::new(0, 0, DIR_INGRESS, 2, 0, 0),
                    v(0, VERDICT_REFINE, 0),
                ),
                (
                    PolicyKey::new(0, 0, DIR_INGRESS, 2, 6, 0),
                    v(0, VERDICT_REFINE, 0),
                ),
                (PolicyKey::new(0, 0, DIR_INGRESS, 2, 6, 1), v(1, 0, 7)),
            ],
            ..Default::default()
        };
        let idx = t.index();
        let q = |peer: &str, proto, port| FlowQuery {
            slot: 0,
            direction: DIR_INGRESS,
            peer: peer.parse().unwrap(),
            proto,
            port,
        };
        assert_eq!(idx.decide(&q("10.1.2.3", 6, 5432)), Some(v(1, 0, 7)));
        assert_eq!(idx.decide(&q("10.1.2.3", 6, 22)).map(|v| v.action), Some(0));
        assert_eq!(
            idx.decide(&q("10.1.2.3", 17, 5432)).map(|v| v.action),
            Some(0)
        );
        assert_eq!(idx.decide(&q("192.0.2.1", 6, 5432)), Some(v(0, 0, 0)));
        let mut other = q("10.1.2.3", 6, 5432);
        other.slot = 1;
        assert_eq!(idx.decide(&other), None);
    }
}
