//! Incremental compilation: a host's tables are recomputed only when the inputs that host
//! depends on change. The key of a host is a sha256 over exactly those inputs: its VMs
//! (names, interfaces, addresses, flags), the ordered entry lists of each of its VMs (rule
//! actions, tiers, log/monitor flags, rule indices, the *contents* of the peer address sets
//! and services they use), the default action and the rule-id table.
use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::compile::{compile_host, compile_hosts, hex, Compiled, HostOutput};
use crate::load::{EntryKind, Resolved};

#[derive(Default)]
pub struct Incremental {
    cache: HashMap<String, ([u8; 32], HostOutput)>,
    /// Hosts recomputed by the last call.
    pub last_recomputed: usize,
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
        let ids = Sha256::digest(res.rule_ids().join("\n"));
        let set_hash: Vec<[u8; 32]> = res
            .sets
            .iter()
            .map(|s| {
                let mut h = Sha256::new();
                for (n, ex) in &s.blocks {
                    h.update(n.to_string());
                    for e in ex {
                        h.update(b"-");
                        h.update(e.to_string());
                    }
                    h.update(b",");
                }
                h.finalize().into()
            })
            .collect();
        let mut hosts = std::collections::BTreeMap::new();
        let mut total = Sha256::new();
        let mut next = HashMap::new();
        let names: Vec<String> = res.hosts().into_iter().collect();
        let keys: Vec<[u8; 32]> = names
            .iter()
            .map(|h| host_key(res, h, &ids, &set_hash))
            .collect();
        let stale: Vec<String> = names
            .iter()
            .zip(&keys)
            .filter(|(h, k)| self.cache.get(*h).is_none_or(|(old, _)| old != *k))
            .map(|(h, _)| h.clone())
            .collect();
        self.last_recomputed = stale.len();
        let mut fresh: HashMap<String, HostOutput> = stale
            .iter()
            .cloned()
            .zip(compile_hosts(res, &stale))
            .collect();
        for (host, key) in names.into_iter().zip(keys) {
            let out = match fresh.remove(&host) {
                Some(o) => o,
                None => match self.cache.remove(&host) {
                    Some((_, o)) => o,
                    None => compile_host(res, &host),
                },
            };
            total.update(host.as_bytes());
            total.update([0]);
            total.update(out.revision.as_bytes());
            next.insert(host.clone(), (key, out.clone()));
            hosts.insert(host, out);
        }
        self.cache = next;
        Compiled {
            revision: hex(&total.finalize()),
            hosts,
        }
    }
}
