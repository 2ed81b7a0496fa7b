//! Incremental compilation: a host's tables are recomputed only when inputs that host
//! depends on change. Those inputs are kept, packed into bytes, in three parts and compared
//! exactly with the previous call's: global (rule-id table, default action, tiers, system
//! endpoints: a change recompiles everything), per VM (name, host, interfaces, addresses,
//! flags, quarantine) and per rule (what its entries read, with sha256 digests of its address
//! sets' *contents*, its services, and whom it applies to or is reflected onto). A changed VM
//! stales its old and new host; a changed rule the hosts of the VMs it reaches before and
//! after the change.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::compile::{
    compile_host, compile_hosts_in, encode_str, hex, svc_key, Compiled, EnvCache, HostMemo,
    HostOutput, Shared,
};
use crate::load::Resolved;

#[derive(Default)]
pub struct Incremental {
    cache: HashMap<String, Arc<HostOutput>>,
    /// Hosts recomputed by the last call.
    pub last_recomputed: usize,
    /// Whether the last call could limit itself to the hosts of changed VMs and rules
    /// (same rule-id table and settings).
    pub last_fast_path: bool,
    prev: Option<Inputs>,
    /// Per host: its identities and entry-list templates, reused by a recompile when its
    /// peer sets (and, for templates, port classes and the list itself) are unchanged.
    envs: HashMap<String, Arc<HostMemo>>,
}

/// Variable-length items in one buffer: item `i` is `bytes[off[i]..off[i + 1]]`.
struct Packed<T> {
    bytes: Vec<T>,
    off: Vec<usize>,
}

impl<T: PartialEq> Packed<T> {
    fn with_capacity(items: usize, bytes: usize) -> Self {
        let mut off = Vec::with_capacity(items + 1);
        off.push(0);
        Packed {
            bytes: Vec::with_capacity(bytes),
            off,
        }
    }
    fn end_item(&mut self) {
        self.off.push(self.bytes.len());
    }
    fn len(&self) -> usize {
        self.off.len() - 1
    }
    fn get(&self, i: usize) -> Option<&[T]> {
        (i < self.len()).then(|| &self.bytes[self.off[i]..self.off[i + 1]])
    }
}

/// Everything `compile_host` reads, in comparable form.
struct Inputs {
    global: Vec<u8>,
    /// sha256 of each address set's contents.
    set_hash: Vec<[u8; 32]>,
    /// Distinct host names, sorted; `vm_host` indexes it.
    hosts: Vec<String>,
    vm_host: Vec<u32>,
    vms: Packed<u8>,
    rules: Packed<u8>,
    /// Per rule: the VMs it applies to, then those it names as peers.
    rule_vms: Packed<u32>,
}

fn put_ip(b: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(x) => {
            b.push(4);
            b.extend(x.octets());
        }
        IpAddr::V6(x) => {
            b.push(6);
            b.extend(x.octets());
        }
    }
}

/// sha256 of each address set's contents (sets are shared by many rules: digested once).
fn set_hashes(res: &Resolved) -> Vec<[u8; 32]> {
    let mut b = Vec::new();
    res.sets
        .iter()
        .map(|s| {
            b.clear();
            for (n, ex) in &s.blocks {
                put_ip(&mut b, &n.addr);
                b.push(n.len);
                b.extend((ex.len() as u32).to_le_bytes());
                for e in ex {
                    put_ip(&mut b, &e.addr);
                    b.push(e.len);
                }
            }
            Sha256::digest(&b).into()
        })
        .collect()
}

impl Inputs {
    fn new(res: &Resolved, rules_enc: &[u8]) -> Inputs {
        let set_hash = set_hashes(res);
        let mut global = Vec::with_capacity(rules_enc.len() + 256);
        global.extend_from_slice(rules_enc);
        encode_str(&mut global, &format!("{:?}", res.default_action));
        global.extend((res.tiers.len() as u32).to_le_bytes());
        res.tiers.iter().for_each(|t| encode_str(&mut global, t));
        global.extend((res.system.len() as u32).to_le_bytes());
        for s in &res.system {
            encode_str(&mut global, &s.name);
            global.extend(set_hash[s.set]);
            svc_key(&mut global, s.svc.iter());
        }

        // Host numbers in first-seen order, then renumbered in name order.
        let mut seen: crate::compile::FxMap<&str, u32> = Default::default();
        let mut vm_host: Vec<u32> = res
            .vms
            .iter()
            .map(|v| {
                let n = seen.len() as u32;
                *seen.entry(v.host.as_str()).or_insert(n)
            })
            .collect();
        let mut hosts: Vec<(&str, u32)> = seen.into_iter().collect();
        hosts.sort_unstable();
        let mut rank = vec![0u32; hosts.len()];
        for (r, &(_, n)) in hosts.iter().enumerate() {
            rank[n as usize] = r as u32;
        }
        vm_host.iter_mut().for_each(|h| *h = rank[*h as usize]);
        let mut quar: Vec<Vec<usize>> = vec![Vec::new(); res.vms.len()];
        for (i, q) in res.quarantine.iter().enumerate() {
            if let Some(v) = quar.get_mut(q.vm) {
                v.push(i);
            }
        }
        let mut vms = Packed::with_capacity(res.vms.len(), 96 * res.vms.len());
        for (v, vm) in res.vms.iter().enumerate() {
            let b = &mut vms.bytes;
            encode_str(b, &vm.name);
            encode_str(b, &vm.host);
            b.push(u8::from(vm.infra_server));
            b.push(u8::from(res.monitor_vms.contains(&v)));
            b.extend((vm.interfaces.len() as u32).to_le_bytes());
            for (mac, ips) in &vm.interfaces {
                b.extend(mac);
                b.extend((ips.len() as u32).to_le_bytes());
                ips.iter().for_each(|a| put_ip(b, a));
            }
            b.extend((vm.addrs.len() as u32).to_le_bytes());
            vm.addrs.iter().for_each(|a| put_ip(b, a));
            b.extend((quar[v].len() as u32).to_le_bytes());
            for &q in &quar[v] {
                let qr = &res.quarantine[q];
                b.extend((q as u32).to_le_bytes());
                b.push(u8::from(qr.full));
                b.extend(set_hash[qr.allow]);
            }
            vms.end_item();
        }

        let n = res.rules.len();
        let mut rules = Packed::with_capacity(n, 96 * n);
        let nv = res.rules.iter().map(|r| r.applies.len() + r.peer_vms.len());
        let mut rule_vms = Packed::with_capacity(n, nv.sum());
        for r in &res.rules {
            let b = &mut rules.bytes;
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
            // Which of `rule_vms` are applied-to and which are peers.
            b.extend((r.applies.len() as u32).to_le_bytes());
            b.extend(set_hash[r.applies_set]);
            b.extend(set_hash[r.peers]);
            svc_key(b, r.svc.iter());
            rules.end_item();
            rule_vms
                .bytes
                .extend(r.applies.iter().chain(&r.peer_vms).map(|&v| v as u32));
            rule_vms.end_item();
        }
        Inputs {
            global,
            set_hash,
            hosts: hosts.into_iter().map(|(h, _)| h.to_string()).collect(),
            vm_host,
            vms,
            rules,
            rule_vms,
        }
    }

    fn host_of(&self, vm: u32) -> Option<&str> {
        let h = *self.vm_host.get(vm as usize)?;
        self.hosts.get(h as usize).map(|s| s.as_str())
    }

    /// Hosts whose inputs may differ between `self` (before) and `new`, if only VMs and
    /// rules changed; `None` if something global did.
    fn touched<'a>(&'a self, new: &'a Inputs) -> Option<BTreeSet<&'a str>> {
        if self.global != new.global || self.rules.len() != new.rules.len() {
            return None;
        }
        let mut touched = BTreeSet::new();
        for v in 0..self.vms.len().max(new.vms.len()) {
            if self.vms.get(v) != new.vms.get(v) {
                touched.extend(self.host_of(v as u32));
                touched.extend(new.host_of(v as u32));
            }
        }
        for i in 0..new.rules.len() {
            let (was, is) = (self.rule_vms.get(i), new.rule_vms.get(i));
            if self.rules.get(i) != new.rules.get(i) || was != is {
                touched.extend(
                    was.unwrap_or_default()
                        .iter()
                        .filter_map(|&v| self.host_of(v)),
                );
                touched.extend(
                    is.unwrap_or_default()
                        .iter()
                        .filter_map(|&v| new.host_of(v)),
                );
            }
        }
        Some(touched)
    }
}

impl Incremental {
    /// Compile, reusing every host whose inputs are unchanged since the previous call.
    /// The result is identical to [`crate::compile`].
    pub fn compile(&mut self, res: &Resolved) -> Compiled {
        let timing = std::env::var_os("BULKHEAD_TIMING").is_some();
        let t0 = std::time::Instant::now();
        let sh = Shared::new(res);
        let inputs = Inputs::new(res, sh.rules_enc());
        let t1 = t0.elapsed();
        let touched = self.prev.as_ref().and_then(|p| p.touched(&inputs));
        self.last_fast_path = touched.is_some();
        let stale: Vec<String> = inputs
            .hosts
            .iter()
            .filter(|h| {
                touched.as_ref().is_none_or(|t| t.contains(h.as_str()))
                    || !self.cache.contains_key(*h)
            })
            .cloned()
            .collect();
        drop(touched);
        let t2 = t0.elapsed();
        self.last_recomputed = stale.len();
        let cache = EnvCache {
            set_hash: &inputs.set_hash,
            prev: &self.envs,
        };
        let mut fresh: HashMap<String, Arc<HostOutput>> = HashMap::new();
        for (host, (out, env)) in stale
            .iter()
            .zip(compile_hosts_in(res, &stale, &sh, Some(&cache)))
        {
            fresh.insert(host.clone(), Arc::new(out));
            self.envs.insert(host.clone(), env);
        }
        self.envs
            .retain(|h, _| inputs.hosts.binary_search(h).is_ok());
        let t3 = t0.elapsed();
        let mut hosts = BTreeMap::new();
        let mut total = Sha256::new();
        let mut next = HashMap::new();
        for host in &inputs.hosts {
            let out = match fresh.remove(host) {
                Some(o) => o,
                None => match self.cache.remove(host) {
                    Some(o) => o,
                    None => Arc::new(compile_host(res, host)),
                },
            };
            total.update(host.as_bytes());
            total.update([0]);
            total.update(out.revision.as_bytes());
            next.insert(host.clone(), out.clone());
            hosts.insert(host.clone(), out);
        }
        self.cache = next;
        self.prev = Some(inputs);
        if timing {
            eprintln!(
                "incremental: inputs {t1:?}, stale hosts {:?}, compile {:?} ({} hosts), assemble {:?}",
                t2 - t1,
                t3 - t2,
                self.last_recomputed,
                t0.elapsed() - t3
            );
        }
        Compiled {
            revision: hex(&total.finalize()),
            hosts,
        }
    }
}
