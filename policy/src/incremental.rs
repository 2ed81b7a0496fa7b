//! Incremental compilation: a host's tables are recomputed only when the inputs that host
//! depends on change. The key of a host is a sha256 over exactly those inputs: its VMs
//! (names, interfaces, addresses, flags), the ordered entry lists of each of its VMs (rule
//! actions, tiers, log/monitor flags, rule indices, the *contents* of the peer address sets
//! and services they use), the default action and the rule-id table.
use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::compile::{compile_host, compile_hosts, hex, Compiled, HostOutput};
use crate::load::{EntryKind, Resolved};

#[derive(Default)]
pub struct Incremental {
    cache: HashMap<String, ([u8; 32], Arc<HostOutput>)>,
    /// Hosts recomputed by the last call.
    pub last_recomputed: usize,
    /// Fingerprint of everything but the rules (VMs, rule-id table, settings, quarantine).
    global: Option<[u8; 32]>,
    /// Per rule: content hash and the VMs it can touch (applied-to ∪ reflected peers).
    rules: Vec<([u8; 32], Vec<usize>)>,
    /// Whether the last call took the fast path (only rules changed).
    pub last_fast_path: bool,
}

fn net_bytes(h: &mut Sha256, n: &crate::net::Net) {
    match n.addr {
        std::net::IpAddr::V4(a) => h.update(a.octets()),
        std::net::IpAddr::V6(a) => h.update(a.octets()),
    }
    h.update([n.len]);
}

fn set_hashes(res: &Resolved) -> Vec<[u8; 32]> {
    res.sets
        .iter()
        .map(|s| {
            let mut h = Sha256::new();
            for (n, ex) in &s.blocks {
                net_bytes(&mut h, n);
                h.update((ex.len() as u32).to_le_bytes());
                for e in ex {
                    net_bytes(&mut h, e);
                }
            }
            h.finalize().into()
        })
        .collect()
}

fn svc_bytes(h: &mut Sha256, svc: &crate::load::SvcSet) {
    h.update((svc.len() as u32).to_le_bytes());
    for s in svc {
        h.update([
            s.proto.unwrap_or(0),
            u8::from(s.proto.is_some()),
            u8::from(s.range.is_some()),
        ]);
        let (a, b) = s.range.unwrap_or((0, 0));
        h.update(a.to_le_bytes());
        h.update(b.to_le_bytes());
    }
}

/// Everything `compile_host` reads except the rules themselves.
fn global_fingerprint(res: &Resolved, ids: &[u8], set_hash: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ids);
    h.update(format!("{:?}{:?}", res.default_action, res.tiers));
    for s in &res.system {
        h.update(s.name.as_bytes());
        h.update(set_hash[s.set]);
        svc_bytes(&mut h, &s.svc);
    }
    for q in &res.quarantine {
        h.update((q.vm as u64).to_le_bytes());
        h.update([u8::from(q.full)]);
        h.update(set_hash[q.allow]);
    }
    for v in &res.monitor_vms {
        h.update((*v as u64).to_le_bytes());
    }
    for vm in &res.vms {
        h.update(format!(
            "{}|{}|{:?}|{:?}|{}\n",
            vm.name, vm.host, vm.interfaces, vm.addrs, vm.infra_server
        ));
    }
    h.finalize().into()
}

fn rule_state(res: &Resolved, set_hash: &[[u8; 32]]) -> Vec<([u8; 32], Vec<usize>)> {
    res.rules
        .iter()
        .map(|r| {
            let mut h = Sha256::new();
            h.update((r.tier as u32).to_le_bytes());
            h.update(r.priority.to_le_bytes());
            h.update((r.pos as u32).to_le_bytes());
            h.update([
                r.dir,
                r.action as u8,
                u8::from(r.monitor),
                u8::from(r.log),
                u8::from(r.symmetric),
            ]);
            h.update((r.applies.len() as u32).to_le_bytes());
            for v in &r.applies {
                h.update((*v as u32).to_le_bytes());
            }
            h.update((r.peer_vms.len() as u32).to_le_bytes());
            for v in &r.peer_vms {
                h.update((*v as u32).to_le_bytes());
            }
            h.update(set_hash[r.applies_set]);
            h.update(set_hash[r.peers]);
            svc_bytes(&mut h, &r.svc);
            let mut vms: Vec<usize> = r.applies.iter().chain(&r.peer_vms).copied().collect();
            vms.sort_unstable();
            vms.dedup();
            (h.finalize().into(), vms)
        })
        .collect()
}

/// The hash of everything `compile_host(res, host)` reads.
pub fn host_key(
    res: &Resolved,
    host: &str,
    rule_ids_hash: &[u8],
    set_hash: &[[u8; 32]],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(rule_ids_hash);
    h.update(format!("{:?}", res.default_action));
    let mut vms: Vec<usize> = (0..res.vms.len())
        .filter(|&i| res.vms[i].host == host)
        .collect();
    vms.sort_by(|&a, &b| res.vms[a].name.cmp(&res.vms[b].name));
    for v in vms {
        let vm = &res.vms[v];
        h.update(format!(
            "{}|{:?}|{:?}|{}|{}\n",
            vm.name,
            vm.interfaces,
            vm.addrs,
            vm.infra_server,
            res.monitor_vms.contains(&v)
        ));
        for dir in [0u8, 1] {
            for e in res.entries(v, dir) {
                let kind = match e.kind {
                    EntryKind::System(_) => 0u8,
                    EntryKind::Quarantine(_) => 1,
                    EntryKind::Rule { .. } => 2,
                };
                h.update([
                    dir,
                    kind,
                    e.tier.map_or(255, |t| t as u8),
                    e.action as u8,
                    u8::from(e.monitor),
                    u8::from(e.log),
                ]);
                h.update(e.rule_index.to_le_bytes());
                if e.peers == usize::MAX {
                    h.update(b"*");
                } else {
                    h.update(set_hash[e.peers]);
                }
                for s in res.entry_svc(&e) {
                    h.update([s.proto.unwrap_or(0), u8::from(s.range.is_some())]);
                    let (a, b) = s.range.unwrap_or((0, 0));
                    h.update(a.to_le_bytes());
                    h.update(b.to_le_bytes());
                }
                h.update(b"\n");
            }
        }
    }
    h.finalize().into()
}

impl Incremental {
    /// Compile, reusing every host whose inputs are unchanged since the previous call.
    /// The result is identical to [`crate::compile`].
    pub fn compile(&mut self, res: &Resolved) -> Compiled {
        let timing = std::env::var_os("BULKHEAD_TIMING").is_some();
        let t0 = std::time::Instant::now();
        let ids = Sha256::digest(res.rule_ids().join("\n"));
        let set_hash = set_hashes(res);
        let t1 = t0.elapsed();
        let global = global_fingerprint(res, &ids, &set_hash);
        let t2 = t0.elapsed();
        let rules = rule_state(res, &set_hash);
        let t3 = t0.elapsed();
        let mut hosts = std::collections::BTreeMap::new();
        let mut total = Sha256::new();
        let mut next = HashMap::new();
        let names: Vec<String> = res.hosts().into_iter().collect();
        let fast = self.global == Some(global)
            && self.rules.len() == rules.len()
            && names.iter().all(|h| self.cache.contains_key(h));
        self.last_fast_path = fast;
        let keys: Vec<[u8; 32]>;
        let stale: Vec<String>;
        if fast {
            // Only rules changed: the hosts of the VMs those rules touch (before or after).
            let mut touched: std::collections::BTreeSet<&str> = Default::default();
            for (old, new) in self.rules.iter().zip(&rules) {
                if old.0 != new.0 {
                    for &v in old.1.iter().chain(&new.1) {
                        if let Some(vm) = res.vms.get(v) {
                            touched.insert(vm.host.as_str());
                        }
                    }
                }
            }
            stale = touched.iter().map(|h| h.to_string()).collect();
            keys = names
                .iter()
                .map(|h| {
                    if touched.contains(h.as_str()) {
                        host_key(res, h, &ids, &set_hash)
                    } else {
                        self.cache.get(h).map(|c| c.0).unwrap_or_default()
                    }
                })
                .collect();
        } else {
            keys = names
                .iter()
                .map(|h| host_key(res, h, &ids, &set_hash))
                .collect();
            stale = names
                .iter()
                .zip(&keys)
                .filter(|(h, k)| self.cache.get(*h).is_none_or(|(old, _)| old != *k))
                .map(|(h, _)| h.clone())
                .collect();
        }
        self.global = Some(global);
        self.rules = rules;
        let t4 = t0.elapsed();
        self.last_recomputed = stale.len();
        let mut fresh: HashMap<String, Arc<HostOutput>> = stale
            .iter()
            .cloned()
            .zip(compile_hosts(res, &stale).into_iter().map(Arc::new))
            .collect();
        for (host, key) in names.into_iter().zip(keys) {
            let out = match fresh.remove(&host) {
                Some(o) => o,
                None => match self.cache.remove(&host) {
                    Some((_, o)) => o,
                    None => Arc::new(compile_host(res, &host)),
                },
            };
            total.update(host.as_bytes());
            total.update([0]);
            total.update(out.revision.as_bytes());
            next.insert(host.clone(), (key, out.clone()));
            hosts.insert(host, out);
        }
        self.cache = next;
        if timing {
            eprintln!(
                "incremental: sets {t1:?}, global {:?}, rules {:?}, keys {:?}, compile+assemble {:?}",
                t2 - t1,
                t3 - t2,
                t4 - t3,
                t0.elapsed() - t4
            );
        }
        Compiled {
            revision: hex(&total.finalize()),
            hosts,
        }
    }
}
