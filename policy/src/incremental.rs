//! Incremental compilation: a host's tables are recomputed only when the inputs that host
//! depends on change. The key of a host is a sha256 over exactly those inputs: its VMs
//! (names, interfaces, addresses, flags), the ordered entry lists of each of its VMs (rule
//! actions, tiers, log/monitor flags, rule indices, the *contents* of the peer address sets
//! and services they use), the default action and the rule-id table.
use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::compile::{compile_host, hex, Compiled, HostOutput};
use crate::load::{EntryKind, Resolved};

#[derive(Default)]
pub struct Incremental {
    cache: HashMap<String, ([u8; 32], HostOutput)>,
    /// Hosts recomputed by the last call.
    pub last_recomputed: usize,
}

/// The hash of everything `compile_host(res, host)` reads.
pub fn host_key(res: &Resolved, host: &str, rule_ids_hash: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(rule_ids_hash);
    h.update(format!("{:?}", res.default_action));
    let mut vms: Vec<usize> = (0..res.vms.len()).filter(|&i| res.vms[i].host == host).collect();
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
                h.update(format!(
                    "{dir}{kind}{:?}{:?}{}{}{}",
                    e.tier, e.action, e.monitor, e.log, e.rule_index
                ));
                if e.peers == usize::MAX {
                    h.update(b"*");
                } else {
                    h.update(format!("{:?}", res.sets[e.peers]));
                }
                h.update(format!("{:?}\n", res.entry_svc(&e)));
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
        let mut hosts = std::collections::BTreeMap::new();
        let mut total = Sha256::new();
        self.last_recomputed = 0;
        let mut next = HashMap::new();
        for host in res.hosts() {
            let key = host_key(res, &host, &ids);
            let out = match self.cache.remove(&host) {
                Some((k, out)) if k == key => out,
                _ => {
                    self.last_recomputed += 1;
                    compile_host(res, &host)
                }
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
