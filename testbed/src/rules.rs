//! Hand-written tables for tests, benchmarks and the demo: a few first-match rules over lab VMs,
//! resolved into the three-level table form by brute force (the policy compiler's job in
//! production, kept independent of it here).
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use crate::Vm;
use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::*;

pub const WORLD: u32 = 1;

/// Identity of the `i`-th VM.
pub fn vm_identity(i: usize) -> u32 {
    10 + i as u32
}

/// One rule of a VM: first match wins, unmatched traffic is denied by rule 0.
#[derive(Clone, Debug)]
pub struct Rule {
    pub vm: usize,
    pub dir: u8,
    /// Peer VM index; `None` = any peer.
    pub peer: Option<usize>,
    /// `PROTO_ANY` = any protocol.
    pub proto: u8,
    /// Destination port (`type << 8 | code` for ICMP); `None` = any.
    pub port: Option<u16>,
    pub action: u8,
    pub flags: u8,
}

pub fn allow(vm: usize, dir: u8, peer: Option<usize>, proto: u8, port: Option<u16>) -> Rule {
    Rule {
        vm,
        dir,
        peer,
        proto,
        port,
        action: ACTION_ALLOW,
        flags: 0,
    }
}

pub fn endpoint_id(vm: &Vm) -> String {
    bulkhead_abi::model::endpoint_id(&vm.name, &vm.mac)
}

pub fn bindings(vms: &[Vm]) -> HashMap<String, u32> {
    vms.iter().map(|v| (endpoint_id(v), v.ifindex)).collect()
}

pub fn tables(vms: &[Vm], rules: &[Rule]) -> HostTables {
    let mut t = HostTables {
        rules: std::iter::once("default-deny".to_string())
            .chain((1..=rules.len()).map(|i| format!("rule-{i}")))
            .collect(),
        ..Default::default()
    };
    for v in vms {
        t.endpoints.push(EndpointTable {
            id: endpoint_id(v),
            mac: v.mac,
            addrs: vec![IpAddr::V4(v.ipv4), IpAddr::V6(v.ipv6)],
            flags: 0,
        });
    }
    t.ipcache.push(entry("0.0.0.0", 0, WORLD));
    t.ipcache.push(entry("::", 0, WORLD));
    for (i, v) in vms.iter().enumerate() {
        t.ipcache.push(IpcacheEntry {
            addr: IpAddr::V4(v.ipv4),
            prefix_len: 32,
            identity: vm_identity(i),
        });
        t.ipcache.push(IpcacheEntry {
            addr: IpAddr::V6(v.ipv6),
            prefix_len: 128,
            identity: vm_identity(i),
        });
    }
    // One class per distinct (kind, port).
    let mut classes: HashMap<(u32, u16), u32> = HashMap::new();
    for r in rules {
        if let (Some(p), Some(kind)) = (r.port, port_kind(r.proto)) {
            let n = classes.len() as u32 + 1;
            classes.entry((kind, p)).or_insert(n);
        }
    }
    for (&(kind, port), &class) in &classes {
        t.port_classes.push(PortClassRange {
            kind,
            first: port,
            last: port,
            class,
        });
    }
    t.port_classes.sort();
    let class_of = |proto: u8, port: u16| {
        port_kind(proto)
            .and_then(|k| classes.get(&(k, port)).copied())
            .unwrap_or(PORT_CLASS_ANY)
    };
    let decide = |vm: usize, dir: u8, id: u32, proto: u8, class: u32| -> Verdict {
        for (i, r) in rules.iter().enumerate() {
            let peer_ok = match r.peer {
                None => true,
                Some(p) => id != IDENTITY_ANY && vm_identity(p) == id,
            };
            let proto_ok = r.proto == PROTO_ANY || r.proto == proto;
            let port_ok = match r.port {
                None => true,
                Some(p) => proto != PROTO_ANY && class != 0 && class_of(r.proto, p) == class,
            };
            if r.vm == vm && r.dir == dir && peer_ok && proto_ok && port_ok {
                return Verdict::new(r.action, r.flags, i as u32 + 1);
            }
        }
        Verdict::new(ACTION_DENY, 0, RULE_DEFAULT)
    };
    let mut ids: BTreeSet<u32> = [IDENTITY_ANY].into();
    ids.extend(rules.iter().filter_map(|r| r.peer.map(vm_identity)));
    let protos: BTreeSet<u8> = rules
        .iter()
        .map(|r| r.proto)
        .filter(|&p| p != PROTO_ANY)
        .collect();
    let mut class_list: HashMap<u8, Vec<u32>> = HashMap::new();
    for r in rules {
        if let Some(p) = r.port {
            let c = class_of(r.proto, p);
            if c != 0 {
                class_list.entry(r.proto).or_default().push(c);
            }
        }
    }
    // Wildcard-protocol rules with ports are not used by these tests.
    for vm in 0..vms.len() {
        for dir in [DIR_EGRESS, DIR_INGRESS] {
            for &id in &ids {
                // The verdict for a protocol no rule names.
                let l1 = decide(vm, dir, id, 255, 0);
                let mut l1_refine = false;
                for &p in &protos {
                    let l2 = decide(vm, dir, id, p, 0);
                    let mut l2_refine = false;
                    for &c in class_list.get(&p).into_iter().flatten() {
                        let l3 = decide(vm, dir, id, p, c);
                        if l3 != l2 {
                            l2_refine = true;
                            t.policy
                                .push((PolicyKey::new(0, vm as u32, dir, id, p, c), l3));
                        }
                    }
                    if l2_refine || l2 != l1 {
                        l1_refine = true;
                        let flags = l2.flags | if l2_refine { VERDICT_REFINE } else { 0 };
                        t.policy.push((
                            PolicyKey::new(0, vm as u32, dir, id, p, 0),
                            Verdict::new(l2.action, flags, l2.rule),
                        ));
                    }
                }
                let flags = l1.flags | if l1_refine { VERDICT_REFINE } else { 0 };
                t.policy.push((
                    PolicyKey::new(0, vm as u32, dir, id, PROTO_ANY, 0),
                    Verdict::new(l1.action, flags, l1.rule),
                ));
            }
        }
    }
    t.policy.sort_by_key(|(k, _)| *k);
    t.policy.dedup_by_key(|(k, _)| *k);
    t
}

fn entry(addr: &str, prefix_len: u8, identity: u32) -> IpcacheEntry {
    IpcacheEntry {
        addr: addr.parse().expect("literal"),
        prefix_len,
        identity,
    }
}
