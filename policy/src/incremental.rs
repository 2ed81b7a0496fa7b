//! Incremental compilation: a host's tables are recomputed only when inputs that host
//! depends on change. Those inputs are hashed in three parts: global (rule-id table, default
//! action, tiers, system endpoints: a change recompiles everything), per VM (name, host,
//! interfaces, addresses, flags, quarantine) and per rule (what its entries read, with the
//! *contents* of its address sets and services, and whom it applies to or is reflected onto).
//! A changed VM stales its old and new host; a changed rule the hosts of the VMs it reaches
//! before and after the change.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::compile::{compile_host, compile_hosts_in, hex, Compiled, HostOutput, Shared};
use crate::load::Resolved;

#[derive(Default)]
pub struct Incremental {
    cache: HashMap<String, Arc<HostOutput>>,
    /// Hosts recomputed by the last call.
    pub last_recomputed: usize,
    /// See [`global_fingerprint`]; a change recompiles every host.
    global: Option<[u8; 32]>,
    /// Per VM index: its hash and host.
    vms: Vec<([u8; 32], String)>,
    rules: RuleState,
    /// Whether the last call could limit itself to the hosts of changed VMs and rules
    /// (same rule-id table and settings).
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

/// What `compile_host` reads that is the same on every host: the rule-id table (which also
/// fixes the rule indices), the default action, tiers and system endpoints.
fn global_fingerprint(res: &Resolved, rules_enc: &[u8], set_hash: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(rules_enc);
    h.update(format!("{:?}{:?}", res.default_action, res.tiers));
    h.update((res.system.len() as u32).to_le_bytes());
    for s in &res.system {
        h.update((s.name.len() as u32).to_le_bytes());
        h.update(s.name.as_bytes());
        h.update(set_hash[s.set]);
        svc_bytes(&mut h, &s.svc);
    }
    h.finalize().into()
}

/// Per VM: everything its host's tables read of it besides the rules (name, host,
/// interfaces, addresses, flags, its quarantine).
fn vm_hashes(res: &Resolved, set_hash: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut quar: Vec<Vec<usize>> = vec![Vec::new(); res.vms.len()];
    for (i, q) in res.quarantine.iter().enumerate() {
        if let Some(v) = quar.get_mut(q.vm) {
            v.push(i);
        }
    }
    let ip = |b: &mut Vec<u8>, a: &std::net::IpAddr| match a {
        std::net::IpAddr::V4(x) => {
            b.push(4);
            b.extend(x.octets());
        }
        std::net::IpAddr::V6(x) => {
            b.push(6);
            b.extend(x.octets());
        }
    };
    let mut b = Vec::new();
    res.vms
        .iter()
        .enumerate()
        .map(|(v, vm)| {
            b.clear();
            for s in [&vm.name, &vm.host] {
                b.extend((s.len() as u32).to_le_bytes());
                b.extend(s.as_bytes());
            }
            b.push(u8::from(vm.infra_server));
            b.push(u8::from(res.monitor_vms.contains(&v)));
            b.extend((vm.interfaces.len() as u32).to_le_bytes());
            for (mac, ips) in &vm.interfaces {
                b.extend(mac);
                b.extend((ips.len() as u32).to_le_bytes());
                ips.iter().for_each(|a| ip(&mut b, a));
            }
            b.extend((vm.addrs.len() as u32).to_le_bytes());
            vm.addrs.iter().for_each(|a| ip(&mut b, a));
            b.extend((quar[v].len() as u32).to_le_bytes());
            for &q in &quar[v] {
                let q_ = &res.quarantine[q];
                b.extend((q as u32).to_le_bytes());
                b.push(u8::from(q_.full));
                b.extend(set_hash[q_.allow]);
            }
            Sha256::digest(&b).into()
        })
        .collect()
}

/// Per rule: a hash of everything an entry of it reads (and of whom it applies to or is
/// reflected onto), and the VMs whose lists hold it, flattened (`vms[off[i]..off[i + 1]]`).
#[derive(Default)]
struct RuleState {
    hash: Vec<[u8; 32]>,
    off: Vec<usize>,
    vms: Vec<u32>,
}

fn rule_state(res: &Resolved, set_hash: &[[u8; 32]]) -> RuleState {
    let mut st = RuleState {
        hash: Vec::with_capacity(res.rules.len()),
        off: vec![0],
        vms: Vec::new(),
    };
    let mut b = Vec::new();
    for r in &res.rules {
        b.clear();
        b.extend((r.tier as u32).to_le_bytes());
        b.extend(r.priority.to_le_bytes());
        b.extend((r.pos as u32).to_le_bytes());
        b.extend([
            r.dir,
            r.action as u8,
            u8::from(r.monitor),
            u8::from(r.log),
            u8::from(r.symmetric),
        ]);
        for l in [&r.applies, &r.peer_vms] {
            b.extend((l.len() as u32).to_le_bytes());
            for v in l {
                b.extend((*v as u32).to_le_bytes());
            }
        }
        b.extend(set_hash[r.applies_set]);
        b.extend(set_hash[r.peers]);
        b.extend((r.svc.len() as u32).to_le_bytes());
        for s in &r.svc {
            let (lo, hi) = s.range.unwrap_or((0, 0));
            b.extend([
                s.proto.unwrap_or(0),
                u8::from(s.proto.is_some()),
                u8::from(s.range.is_some()),
            ]);
            b.extend(lo.to_le_bytes());
            b.extend(hi.to_le_bytes());
        }
        st.hash.push(Sha256::digest(&b).into());
        let start = st.vms.len();
        st.vms
            .extend(r.applies.iter().chain(&r.peer_vms).map(|&v| v as u32));
        st.vms[start..].sort_unstable();
        let mut n = start;
        for i in start..st.vms.len() {
            if i == start || st.vms[i] != st.vms[n - 1] {
                st.vms[n] = st.vms[i];
                n += 1;
            }
        }
        st.vms.truncate(n);
        st.off.push(n);
    }
    st
}

impl Incremental {
    /// Compile, reusing every host whose inputs are unchanged since the previous call.
    /// The result is identical to [`crate::compile`].
    pub fn compile(&mut self, res: &Resolved) -> Compiled {
        let timing = std::env::var_os("BULKHEAD_TIMING").is_some();
        let t0 = std::time::Instant::now();
        let sh = Shared::new(res);
        let set_hash = set_hashes(res);
        let global = global_fingerprint(res, sh.rules_enc(), &set_hash);
        let t1 = t0.elapsed();
        let vms: Vec<([u8; 32], String)> = vm_hashes(res, &set_hash)
            .into_iter()
            .zip(&res.vms)
            .map(|(h, vm)| (h, vm.host.clone()))
            .collect();
        let rules = rule_state(res, &set_hash);
        let t2 = t0.elapsed();
        let names: Vec<String> = res.hosts().into_iter().collect();
        // Same rule-id table (so same rule indices) and settings: only the hosts of changed
        // VMs and of the VMs changed rules reach (before or after) can differ.
        let fast = self.global == Some(global) && self.rules.hash.len() == rules.hash.len();
        self.last_fast_path = fast;
        let stale: Vec<String> = if fast {
            let mut touched: BTreeSet<&str> = BTreeSet::new();
            for v in 0..vms.len().max(self.vms.len()) {
                let (old, new) = (self.vms.get(v), vms.get(v));
                if old.map(|o| o.0) != new.map(|n| n.0) {
                    touched.extend(old.iter().chain(&new).map(|x| x.1.as_str()));
                }
            }
            for (i, (old, new)) in self.rules.hash.iter().zip(&rules.hash).enumerate() {
                if old != new {
                    let was = &self.rules.vms[self.rules.off[i]..self.rules.off[i + 1]];
                    let is = &rules.vms[rules.off[i]..rules.off[i + 1]];
                    touched.extend(
                        was.iter()
                            .filter_map(|&v| self.vms.get(v as usize))
                            .map(|x| x.1.as_str()),
                    );
                    touched.extend(
                        is.iter()
                            .filter_map(|&v| vms.get(v as usize))
                            .map(|x| x.1.as_str()),
                    );
                }
            }
            names
                .iter()
                .filter(|h| touched.contains(h.as_str()) || !self.cache.contains_key(*h))
                .cloned()
                .collect()
        } else {
            names.clone()
        };
        self.global = Some(global);
        self.vms = vms;
        self.rules = rules;
        let t3 = t0.elapsed();
        self.last_recomputed = stale.len();
        let mut fresh: HashMap<String, Arc<HostOutput>> = stale
            .iter()
            .cloned()
            .zip(compile_hosts_in(res, &stale, &sh).into_iter().map(Arc::new))
            .collect();
        let t4 = t0.elapsed();
        let mut hosts = BTreeMap::new();
        let mut total = Sha256::new();
        let mut next = HashMap::new();
        for host in names {
            let out = match fresh.remove(&host) {
                Some(o) => o,
                None => match self.cache.remove(&host) {
                    Some(o) => o,
                    None => Arc::new(compile_host(res, &host)),
                },
            };
            total.update(host.as_bytes());
            total.update([0]);
            total.update(out.revision.as_bytes());
            next.insert(host.clone(), out.clone());
            hosts.insert(host, out);
        }
        self.cache = next;
        if timing {
            eprintln!(
                "incremental: shared tables + global {t1:?}, VM and rule hashes {:?}, stale hosts {:?}, compile {:?} ({} hosts), assemble {:?}",
                t2 - t1,
                t3 - t2,
                t4 - t3,
                self.last_recomputed,
                t0.elapsed() - t4
            );
        }
        Compiled {
            revision: hex(&total.finalize()),
            hosts,
        }
    }
}
