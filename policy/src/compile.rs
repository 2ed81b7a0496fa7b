//! The compiler: a resolved policy set → per-host datapath tables (`bulkhead_abi::model`).
//!
//! 1. **Identities.** Every prefix any peer of the host's rules is made of (plus `0.0.0.0/0`
//!    and `::/0`) is a candidate; the addresses whose longest match is a prefix share one
//!    membership vector over the host's peer sets. Prefixes whose vector equals their nearest
//!    kept ancestor's are dropped; equal vectors share an identity.
//! 2. **Port classes.** The port space of each kind is cut at every service range boundary;
//!    pieces covered by the same ranges share a class (ranges cost nothing per packet).
//! 3. **Decisions.** For each endpoint, direction and identity, first match over the VM's
//!    ordered rules for each (protocol, class), encoded in the three lookup levels; an
//!    identity whose verdicts equal the wildcard's gets no entries.
//!
//! Deterministic: the same policy and inventory give the same tables, byte for byte.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::*;
use ipnetwork::IpNetwork;

use crate::eval::verdict_of;
use crate::resolve::{first_match, part_matches, FlatRule, Peer, Resolved, ServicePart};

/// A protocol number no rule names: what "any other protocol" is judged as.
const OTHER_PROTO: u8 = 255;

pub fn mac_bytes(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Tables for every host in the inventory.
pub fn compile_all(res: &Resolved) -> BTreeMap<String, HostTables> {
    let hosts: BTreeSet<&str> = res.inventory.vms.iter().map(|v| v.host.as_str()).collect();
    hosts
        .into_iter()
        .map(|h| (h.to_string(), compile_host(res, h)))
        .collect()
}

struct Endpoint {
    vm: usize,
    table: EndpointTable,
}

/// The verdict (action, flags, rule id) for every (protocol, class) an identity can meet,
/// `(OTHER_PROTO, 0)` first, then each protocol's classes with class 0 first.
type VerdictFn = Vec<((u8, u32), (u8, u8, Option<String>))>;

/// A policy entry before rule ids become indices.
struct RawEntry {
    slot: usize,
    dir: u8,
    identity: u32,
    proto: u8,
    class: u32,
    action: u8,
    flags: u8,
    rule: Option<String>,
}

pub fn compile_host(res: &Resolved, host: &str) -> HostTables {
    // Endpoints, ordered by id.
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for (i, vm) in res.inventory.vms.iter().enumerate() {
        if vm.host != host {
            continue;
        }
        for iface in &vm.interfaces {
            let Some(mac) = mac_bytes(&iface.mac) else {
                continue;
            };
            endpoints.push(Endpoint {
                vm: i,
                table: EndpointTable {
                    id: format!("{}/{}", vm.name, format_mac(&mac)),
                    mac,
                    addrs: iface.addresses.clone(),
                    flags: 0,
                },
            });
        }
    }
    endpoints.sort_by(|a, b| a.table.id.cmp(&b.table.id));
    let rule_lists: Vec<[Vec<FlatRule>; 2]> = endpoints
        .iter()
        .map(|e| {
            [
                res.rules_for(e.vm, DIR_EGRESS),
                res.rules_for(e.vm, DIR_INGRESS),
            ]
        })
        .collect();

    // Peer sets used on this host.
    let mut peers: Vec<Peer> = rule_lists
        .iter()
        .flatten()
        .flatten()
        .flat_map(|r| r.peers.iter().cloned())
        .filter(|p| *p != Peer::Any)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    peers.sort();
    let peer_sets: Vec<_> = peers
        .iter()
        .map(|p| res.peer_addrs(p).unwrap_or_default())
        .collect();
    let peer_index: HashMap<&Peer, usize> = peers.iter().enumerate().map(|(i, p)| (p, i)).collect();

    // 1. Identities.
    let mut prefixes: BTreeSet<(bool, u8, IpAddr)> = BTreeSet::new();
    for root in ["0.0.0.0/0", "::/0"] {
        if let Ok(n) = root.parse::<IpNetwork>() {
            prefixes.insert((n.is_ipv6(), 0, n.network()));
        }
    }
    for s in &peer_sets {
        for p in s.prefixes() {
            prefixes.insert((p.is_ipv6(), p.prefix(), p.network()));
        }
    }
    let mut kept: HashMap<(bool, u8, IpAddr), Vec<bool>> = HashMap::new();
    let mut ipcache_vectors: Vec<(IpNetwork, Vec<bool>)> = Vec::new();
    for &(v6, len, addr) in &prefixes {
        let Ok(net) = IpNetwork::new(addr, len) else {
            continue;
        };
        let vector: Vec<bool> = peer_sets.iter().map(|s| s.region_member(net)).collect();
        // Nearest kept ancestor (all shorter prefixes were processed first).
        let parent = (0..len).rev().find_map(|l| {
            let anc = IpNetwork::new(addr, l).ok()?;
            kept.get(&(v6, l, anc.network()))
        });
        if parent != Some(&vector) {
            kept.insert((v6, len, addr), vector.clone());
            ipcache_vectors.push((net, vector));
        }
    }
    let mut identity_of: BTreeMap<Vec<bool>, u32> = BTreeMap::new();
    let mut ipcache = Vec::new();
    for (net, vector) in &ipcache_vectors {
        let next = identity_of.len() as u32 + 1;
        let id = *identity_of.entry(vector.clone()).or_insert(next);
        ipcache.push(IpcacheEntry {
            addr: net.network(),
            prefix_len: net.prefix(),
            identity: id,
        });
    }

    // 2. Port classes (per kind).
    let parts: BTreeSet<ServicePart> = rule_lists
        .iter()
        .flatten()
        .flatten()
        .flat_map(|r| r.services.iter().copied())
        .collect();
    let mut port_classes = Vec::new();
    // kind → sorted (first, last, class, covering ranges)
    let mut classes_of_kind: BTreeMap<u32, Vec<(u16, u16, u32)>> = BTreeMap::new();
    for kind in [PORT_KIND_L4, PORT_KIND_ICMP] {
        let ranges: BTreeSet<(u16, u16)> = parts
            .iter()
            .filter_map(|p| p.range)
            .filter(|r| r.0 == kind)
            .map(|r| (r.1, r.2))
            .collect();
        let mut cuts: BTreeSet<u32> = BTreeSet::new();
        for (a, b) in &ranges {
            cuts.insert(u32::from(*a));
            cuts.insert(u32::from(*b) + 1);
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        let mut class_ids: BTreeMap<Vec<(u16, u16)>, u32> = BTreeMap::new();
        let mut pieces = Vec::new();
        for w in cuts.windows(2) {
            let (a, b) = (w[0] as u16, (w[1] - 1) as u16);
            let cover: Vec<(u16, u16)> = ranges
                .iter()
                .filter(|(x, y)| *x <= a && b <= *y)
                .copied()
                .collect();
            if cover.is_empty() {
                continue;
            }
            let next = class_ids.len() as u32 + 1;
            let class = *class_ids.entry(cover).or_insert(next);
            pieces.push((a, b, class));
            port_classes.push(PortClassRange {
                kind,
                first: a,
                last: b,
                class,
            });
        }
        classes_of_kind.insert(kind, pieces);
    }
    // A representative port for each class of each kind.
    let representative: BTreeMap<(u32, u32), u16> = classes_of_kind
        .iter()
        .flat_map(|(k, pieces)| pieces.iter().map(move |(a, _, c)| ((*k, *c), *a)))
        .fold(BTreeMap::new(), |mut m, (k, p)| {
            m.entry(k).or_insert(p);
            m
        });
    // A port in no class (0), if there is one, per kind.
    let unclassified = |kind: u32| -> Option<u16> {
        let pieces = &classes_of_kind[&kind];
        let mut next = 0u32;
        for (a, b, _) in pieces {
            if u32::from(*a) > next {
                return Some(next as u16);
            }
            next = u32::from(*b) + 1;
        }
        (next <= 0xffff).then_some(next as u16)
    };

    // 3. Decisions.
    let mut rule_ids: BTreeSet<String> = BTreeSet::new();
    let mut raw: Vec<RawEntry> = Vec::new();
    let default = res.set.settings.default_action;
    for (slot, (_, lists)) in endpoints.iter().zip(&rule_lists).enumerate() {
        for (dir, rules) in [(DIR_EGRESS, &lists[0]), (DIR_INGRESS, &lists[1])] {
            let protos: BTreeSet<u8> = rules
                .iter()
                .flat_map(|r| r.services.iter().filter_map(|s| s.proto))
                .collect();
            let eval = |vector: Option<&Vec<bool>>, proto: u8, port: u16| {
                first_match(
                    rules,
                    |r| {
                        r.peers.iter().any(|p| match p {
                            Peer::Any => true,
                            _ => vector.is_some_and(|v| v[peer_index[p]]),
                        }) && r.services.iter().any(|s| part_matches(s, proto, port))
                    },
                    None,
                )
            };
            let decide = |vector: Option<&Vec<bool>>| -> VerdictFn {
                let mut out = Vec::new();
                let mut push = |proto: u8, class: u32, port: u16| {
                    let r = eval(vector, proto, port);
                    let (action, flags) = verdict_of(default, r);
                    out.push(((proto, class), (action, flags, r.map(|r| r.id.clone()))));
                };
                push(OTHER_PROTO, 0, 0);
                for &p in &protos {
                    match port_kind(p) {
                        Some(kind) => {
                            push(p, 0, unclassified(kind).unwrap_or(0));
                            for (a, _, c) in &classes_of_kind[&kind] {
                                if representative[&(kind, *c)] == *a {
                                    push(p, *c, *a);
                                }
                            }
                        }
                        None => push(p, 0, 0),
                    }
                }
                out
            };
            let any_fn = decide(None);
            let mut emit = |identity: u32, f: &VerdictFn| {
                let l1 = f[0].1.clone();
                let mut l1_refine = false;
                let mut i = 1;
                while i < f.len() {
                    let p = f[i].0 .0;
                    let l2 = f[i].1.clone();
                    let mut j = i + 1;
                    let mut l3 = Vec::new();
                    while j < f.len() && f[j].0 .0 == p {
                        if f[j].1 != l2 {
                            l3.push((f[j].0 .1, f[j].1.clone()));
                        }
                        j += 1;
                    }
                    let l2_refine = !l3.is_empty();
                    if l2_refine || l2 != l1 {
                        l1_refine = true;
                        for (class, v) in l3 {
                            raw.push(RawEntry {
                                slot,
                                dir,
                                identity,
                                proto: p,
                                class,
                                action: v.0,
                                flags: v.1,
                                rule: v.2,
                            });
                        }
                        let flags = l2.1 | if l2_refine { VERDICT_REFINE } else { 0 };
                        raw.push(RawEntry {
                            slot,
                            dir,
                            identity,
                            proto: p,
                            class: 0,
                            action: l2.0,
                            flags,
                            rule: l2.2,
                        });
                    }
                    i = j;
                }
                let flags = l1.1 | if l1_refine { VERDICT_REFINE } else { 0 };
                raw.push(RawEntry {
                    slot,
                    dir,
                    identity,
                    proto: PROTO_ANY,
                    class: 0,
                    action: l1.0,
                    flags,
                    rule: l1.2,
                });
            };
            emit(IDENTITY_ANY, &any_fn);
            // Identities differing only in peers this list does not use decide alike.
            let used: Vec<usize> = rules
                .iter()
                .flat_map(|r| r.peers.iter())
                .filter_map(|p| peer_index.get(p).copied())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut memo: HashMap<Vec<bool>, Option<VerdictFn>> = HashMap::new();
            for (vector, &id) in &identity_of {
                let key: Vec<bool> = used.iter().map(|&i| vector[i]).collect();
                let f = memo.entry(key).or_insert_with(|| {
                    let f = decide(Some(vector));
                    (f != any_fn).then_some(f)
                });
                if let Some(f) = f {
                    emit(id, f);
                }
            }
        }
    }
    for r in raw.iter().filter_map(|r| r.rule.clone()) {
        rule_ids.insert(r);
    }
    let mut rules = vec!["default".to_string()];
    rules.extend(rule_ids.iter().cloned());
    let rule_index: HashMap<&str, u32> = rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_str(), i as u32))
        .collect();
    let mut policy: Vec<(PolicyKey, Verdict)> = raw
        .into_iter()
        .map(|e| {
            let idx = e.rule.as_deref().map_or(0, |r| rule_index[r]);
            (
                PolicyKey::new(0, e.slot as u32, e.dir, e.identity, e.proto, e.class),
                Verdict::new(e.action, e.flags, idx),
            )
        })
        .collect();
    policy.sort_by_key(|(k, _)| *k);
    policy.dedup_by_key(|(k, _)| *k);
    HostTables {
        endpoints: endpoints.into_iter().map(|e| e.table).collect(),
        ipcache,
        port_classes,
        policy,
        rules,
    }
}
