//! The compiler: [`Resolved`] → one [`HostTables`] per host.
//!
//! Per host: (1) the ordered entry list of every (VM, direction); (2) identities = classes of
//! addresses with the same membership in every peer set those lists use; (3) port classes =
//! classes of ports with the same membership in every port range used; (4) for every
//! (VM, direction, identity) the first-match walk with tiers and pass, per protocol and port
//! class, collapsed into the three lookup levels; the most common identity result goes under
//! `IDENTITY_ANY`.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::*;
use sha2::{Digest, Sha256};

use crate::load::{Entry, RAction, Resolved, SvcEntry};
use crate::net::Net;
use crate::types::DefaultAction;

/// A small, fast, deterministic hasher for the compiler's internal maps (FxHash).
#[derive(Default, Clone, Copy)]
pub(crate) struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fx>>;

/// A compiled revision: tables per host, and content hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// sha256 over the canonical encoding of every host's tables, in host order.
    pub revision: String,
    /// Shared so that an incremental compile reuses unchanged hosts without copying them.
    pub hosts: BTreeMap<String, std::sync::Arc<HostOutput>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostOutput {
    pub tables: HostTables,
    /// sha256 of this host's canonical encoding.
    pub revision: String,
    /// Per slot: (VM index, interface index) in [`Resolved::vms`].
    pub slots: Vec<(usize, usize)>,
}

pub fn compile(res: &Resolved) -> Compiled {
    let names: Vec<String> = res.hosts().into_iter().collect();
    let outs = compile_hosts(res, &names);
    let mut hosts = BTreeMap::new();
    let mut h = Sha256::new();
    for (host, out) in names.into_iter().zip(outs) {
        h.update(host.as_bytes());
        h.update([0]);
        h.update(out.revision.as_bytes());
        hosts.insert(host, std::sync::Arc::new(out));
    }
    Compiled {
        revision: hex(&h.finalize()),
        hosts,
    }
}

/// Compile several hosts, in parallel on the available cores (hosts are independent).
pub fn compile_hosts(res: &Resolved, hosts: &[String]) -> Vec<HostOutput> {
    let n = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(hosts.len().max(1));
    let cache = CompileCache::default();
    if n <= 1 || hosts.len() < 2 {
        return hosts
            .iter()
            .map(|h| compile_host_with(res, h, &cache))
            .collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut outs: Vec<Option<HostOutput>> = vec![None; hosts.len()];
    let results: Vec<Vec<(usize, HostOutput)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= hosts.len() {
                            break;
                        }
                        mine.push((i, compile_host_with(res, &hosts[i], &cache)));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    for (i, o) in results.into_iter().flatten() {
        outs[i] = Some(o);
    }
    hosts
        .iter()
        .zip(outs)
        .map(|(h, o)| o.unwrap_or_else(|| compile_host_with(res, h, &cache)))
        .collect()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Canonical byte encoding of a host's tables (the input of the revision hash).
pub fn canonical_bytes(t: &HostTables) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u32).to_le_bytes());
        b.extend(x.as_bytes());
    };
    let ip = |b: &mut Vec<u8>, a: &IpAddr| match a {
        IpAddr::V4(v) => {
            b.push(4);
            b.extend(v.octets());
        }
        IpAddr::V6(v) => {
            b.push(6);
            b.extend(v.octets());
        }
    };
    b.extend(b"bulkhead-tables-v1");
    b.extend((t.endpoints.len() as u32).to_le_bytes());
    for e in &t.endpoints {
        s(&mut b, &e.id);
        b.extend(e.mac);
        b.extend((e.addrs.len() as u32).to_le_bytes());
        for a in &e.addrs {
            ip(&mut b, a);
        }
        b.extend(e.flags.to_le_bytes());
    }
    b.extend((t.ipcache.len() as u32).to_le_bytes());
    for e in &t.ipcache {
        ip(&mut b, &e.addr);
        b.push(e.prefix_len);
        b.extend(e.identity.to_le_bytes());
    }
    b.extend((t.port_classes.len() as u32).to_le_bytes());
    for r in &t.port_classes {
        b.extend(r.kind.to_le_bytes());
        b.extend(r.first.to_le_bytes());
        b.extend(r.last.to_le_bytes());
        b.extend(r.class.to_le_bytes());
    }
    b.extend((t.policy.len() as u32).to_le_bytes());
    for (k, v) in &t.policy {
        b.extend(k.slot.to_le_bytes());
        b.push(k.direction);
        b.extend(k.identity.to_le_bytes());
        b.push(k.proto);
        b.extend(k.port_class.to_le_bytes());
        b.push(v.action);
        b.push(v.flags);
        b.extend(v.rule.to_le_bytes());
    }
    b.extend((t.rules.len() as u32).to_le_bytes());
    for r in &t.rules {
        s(&mut b, r);
    }
    b
}

/// Map a language action to the datapath verdict (monitor policies never drop).
pub(crate) fn verdict_of(e: &Entry) -> Verdict {
    let action = match (e.action, e.monitor) {
        (RAction::Allow, _) => ACTION_ALLOW,
        (RAction::Deny | RAction::Reject, true) => ACTION_MONITOR,
        (RAction::Deny, false) => ACTION_DENY,
        (RAction::Reject, false) => ACTION_REJECT,
        (RAction::Pass, _) => unreachable!("pass is not a final verdict"),
    };
    Verdict::new(action, if e.log { VERDICT_LOG } else { 0 }, e.rule_index)
}

pub(crate) fn default_verdict(res: &Resolved) -> Verdict {
    let a = match res.default_action {
        DefaultAction::Deny => ACTION_DENY,
        DefaultAction::Reject => ACTION_REJECT,
        DefaultAction::Allow => ACTION_ALLOW,
    };
    Verdict::new(a, 0, RULE_DEFAULT)
}

/// Port classes of one kind: class id → the distinct ranges (indices) it lies in.
struct PortClasses {
    /// Distinct ranges per kind.
    ranges: [Vec<(u16, u16)>; 2],
    /// class id → sorted range indices (of its kind); index 0 = class 0 (no range).
    classes: Vec<(u32, Vec<u32>)>,
    table: Vec<PortClassRange>,
}

impl PortClasses {
    fn build(svcs: &BTreeSet<SvcEntry>) -> PortClasses {
        let mut ranges: [Vec<(u16, u16)>; 2] = [vec![], vec![]];
        for e in svcs {
            if let (Some(p), Some(r)) = (e.proto, e.range) {
                if let Some(k) = port_kind(p) {
                    ranges[k as usize].push(r);
                }
            }
        }
        for r in &mut ranges {
            r.sort();
            r.dedup();
        }
        let mut classes: Vec<(u32, Vec<u32>)> = vec![(0, vec![])];
        let mut table = Vec::new();
        let mut ids: HashMap<(u32, Vec<u32>), u32> = HashMap::new();
        for kind in 0..2u32 {
            let rs = &ranges[kind as usize];
            let mut cuts: BTreeSet<u32> = BTreeSet::new();
            cuts.insert(0);
            cuts.insert(65536);
            for &(a, b) in rs {
                cuts.insert(u32::from(a));
                cuts.insert(u32::from(b) + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            for w in cuts.windows(2) {
                let (s, e) = (w[0], w[1] - 1);
                let vec: Vec<u32> = rs
                    .iter()
                    .enumerate()
                    .filter(|(_, &(a, b))| u32::from(a) <= s && e <= u32::from(b))
                    .map(|(i, _)| i as u32)
                    .collect();
                if vec.is_empty() {
                    continue;
                }
                let n = classes.len() as u32;
                let id = *ids.entry((kind, vec.clone())).or_insert_with(|| {
                    classes.push((kind, vec));
                    n
                });
                match table.last_mut() {
                    Some(PortClassRange {
                        kind: k,
                        last,
                        class,
                        ..
                    }) if *k == kind && *class == id && u32::from(*last) + 1 == s => {
                        *last = e as u16;
                    }
                    _ => table.push(PortClassRange {
                        kind,
                        first: s as u16,
                        last: e as u16,
                        class: id,
                    }),
                }
            }
        }
        PortClasses {
            ranges,
            classes,
            table,
        }
    }

    /// Classes of a kind (always including class 0).
    fn of_kind(&self, kind: u32) -> Vec<u32> {
        let mut v = vec![0];
        v.extend(
            self.classes
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, (k, _))| *k == kind)
                .map(|(i, _)| i as u32),
        );
        v
    }

    fn contains(&self, kind: u32, class: u32, range: (u16, u16)) -> bool {
        if class == 0 {
            return false;
        }
        let Ok(ri) = self.ranges[kind as usize].binary_search(&range) else {
            return false;
        };
        self.classes[class as usize]
            .1
            .binary_search(&(ri as u32))
            .is_ok()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum P2 {
    Plain(Verdict),
    Refine(Verdict, Vec<(u32, Verdict)>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdStruct {
    other: Verdict,
    protos: Vec<(u8, P2)>,
}

/// First-match walk over `entries` (already filtered to the peer), for `proto` (None = a
/// protocol no rule names) and port class `class`.
fn walk(
    res: &Resolved,
    entries: &[&Entry],
    proto: Option<u8>,
    class: u32,
    pc: &PortClasses,
    default: Verdict,
) -> Verdict {
    let mut skip: Option<usize> = None;
    for e in entries {
        if skip.is_some() && e.tier == skip {
            continue;
        }
        let svc = res.entry_svc(e);
        let m = svc.is_empty()
            || svc.iter().any(|s| match (s.proto, proto) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(p)) if a != p => false,
                (Some(_), Some(p)) => match s.range {
                    None => true,
                    Some(r) => port_kind(p).is_some_and(|k| pc.contains(k, class, r)),
                },
            });
        if !m {
            continue;
        }
        if e.action == RAction::Pass {
            skip = e.tier;
            continue;
        }
        return verdict_of(e);
    }
    default
}

/// A host's identities: the classes of addresses its entries' peer sets tell apart, the
/// ipcache that maps addresses to them, and per used set the identities inside it. They
/// depend only on which sets the host's entries use, so hosts using the same sets (usually
/// most of them) share one computation.
pub(crate) struct Identities {
    local: FxMap<usize, u32>,
    ipcache: Vec<IpcacheEntry>,
    /// Local set → identities containing it.
    inv: Vec<Vec<u32>>,
    nids: u32,
}

fn identities(res: &Resolved, used: &[usize]) -> Identities {
    let local: FxMap<usize, u32> = used
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, i as u32))
        .collect();
    // prefix → annotations (local set, block, is_except)
    let mut ann: FxMap<Net, Vec<(u32, u32, bool)>> = FxMap::default();
    ann.entry(Net::all_v4()).or_default();
    ann.entry(Net::all_v6()).or_default();
    for (li, &s) in used.iter().enumerate() {
        for (bi, (n, ex)) in res.sets[s].blocks.iter().enumerate() {
            ann.entry(*n)
                .or_default()
                .push((li as u32, bi as u32, false));
            for e in ex {
                ann.entry(*e)
                    .or_default()
                    .push((li as u32, bi as u32, true));
            }
        }
    }
    let mut prefixes: Vec<Net> = ann.keys().copied().collect();
    // Prefix lengths present per family: ancestors are looked up only at these lengths.
    let lens: [Vec<u8>; 2] = {
        let mut l4: BTreeSet<u8> = BTreeSet::new();
        let mut l6: BTreeSet<u8> = BTreeSet::new();
        for p in &prefixes {
            if p.is_v4() {
                l4.insert(p.len);
            } else {
                l6.insert(p.len);
            }
        }
        [l4.into_iter().collect(), l6.into_iter().collect()]
    };
    prefixes.sort_by(|a, b| (a.len, a).cmp(&(b.len, b)));
    let mut id_of_members: FxMap<Vec<u32>, u32> = FxMap::default();
    let mut members: Vec<Vec<u32>> = vec![vec![]]; // index = identity; 0 unused
    let mut prefix_id: FxMap<Net, u32> = FxMap::default();
    let mut ipcache = Vec::new();
    let mut kept: FxMap<Net, u32> = FxMap::default();
    for x in &prefixes {
        let mut pos: BTreeSet<(u32, u32)> = BTreeSet::new();
        let mut neg: BTreeSet<(u32, u32)> = BTreeSet::new();
        let fam = &lens[usize::from(!x.is_v4())];
        for &l in fam.iter().take_while(|&&l| l <= x.len) {
            let a = Net::new(x.addr, l);
            if let Some(v) = ann.get(&a) {
                for &(s, b, ex) in v {
                    if ex {
                        neg.insert((s, b));
                    } else {
                        pos.insert((s, b));
                    }
                }
            }
        }
        let mut m: Vec<u32> = pos.difference(&neg).map(|&(s, _)| s).collect();
        m.dedup();
        let n = members.len() as u32;
        let id = *id_of_members.entry(m.clone()).or_insert_with(|| {
            members.push(m);
            n
        });
        prefix_id.insert(*x, id);
        // Drop entries that resolve to the same identity as their LPM parent.
        let parent = fam
            .iter()
            .rev()
            .filter(|&&l| l < x.len)
            .find_map(|&l| kept.get(&Net::new(x.addr, l)).copied());
        if parent != Some(id) {
            kept.insert(*x, id);
            ipcache.push(IpcacheEntry {
                addr: x.addr,
                prefix_len: x.len,
                identity: id,
            });
        }
    }
    ipcache.sort();
    let nids = members.len() as u32 - 1;
    // inverted index: local set → identities containing it
    let mut inv: Vec<Vec<u32>> = vec![vec![]; used.len()];
    for (id, m) in members.iter().enumerate().skip(1) {
        for &s in m {
            inv[s as usize].push(id as u32);
        }
    }
    Identities {
        local,
        ipcache,
        inv,
        nids,
    }
}

/// What the hosts of one compile share: [`Identities`] per distinct list of used sets, and
/// which VMs each host runs (one pass over the inventory instead of one per host).
#[derive(Default)]
pub struct CompileCache {
    identities:
        std::sync::Mutex<FxMap<Vec<usize>, std::sync::Arc<std::sync::OnceLock<Identities>>>>,
    by_host: std::sync::OnceLock<HashMap<String, Vec<usize>>>,
}

impl CompileCache {
    /// The slot for hosts using `used`; filled by the first of them (outside the map's lock,
    /// so that other hosts' lookups go on meanwhile).
    fn slot(&self, used: &[usize]) -> std::sync::Arc<std::sync::OnceLock<Identities>> {
        // A panic while holding the lock leaves the map intact.
        let mut m = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(used.to_vec()).or_default().clone()
    }

    /// The VMs of `host`, sorted by name.
    fn vms(&self, res: &Resolved, host: &str) -> Vec<usize> {
        let by_host = self.by_host.get_or_init(|| {
            let mut m: HashMap<String, Vec<usize>> = HashMap::new();
            for (i, vm) in res.vms.iter().enumerate() {
                m.entry(vm.host.clone()).or_default().push(i);
            }
            for v in m.values_mut() {
                v.sort_by(|&a, &b| res.vms[a].name.cmp(&res.vms[b].name));
            }
            m
        });
        by_host.get(host).cloned().unwrap_or_default()
    }
}

pub fn compile_host(res: &Resolved, host: &str) -> HostOutput {
    compile_host_with(res, host, &CompileCache::default())
}

/// [`compile_host`] with what hosts share kept in `cache` (one cache per [`Resolved`]).
pub fn compile_host_with(res: &Resolved, host: &str, cache: &CompileCache) -> HostOutput {
    let default = default_verdict(res);
    let vms = cache.vms(res, host);
    // (1) entry lists.
    let lists: Vec<[Vec<Entry>; 2]> = vms
        .iter()
        .map(|&v| [res.entries(v, DIR_EGRESS), res.entries(v, DIR_INGRESS)])
        .collect();
    // (2) identities.
    let mut used: BTreeSet<usize> = BTreeSet::new();
    let mut svcs: BTreeSet<SvcEntry> = BTreeSet::new();
    for l in lists.iter().flatten().flatten() {
        if l.peers != usize::MAX {
            used.insert(l.peers);
        }
        svcs.extend(res.entry_svc(l).iter().copied());
    }
    let used: Vec<usize> = used.into_iter().collect();
    let slot = cache.slot(&used);
    let Identities {
        local,
        ipcache,
        inv,
        nids,
    } = slot.get_or_init(|| identities(res, &used));
    let (nids, ipcache) = (*nids, ipcache.clone());
    // (3) port classes.
    let pc = PortClasses::build(&svcs);
    let protos: BTreeSet<u8> = svcs.iter().filter_map(|s| s.proto).collect();
    let kind_classes = [pc.of_kind(0), pc.of_kind(1)];
    // (4) per endpoint.
    let mut endpoints = Vec::new();
    let mut slots = Vec::new();
    let mut policy = Vec::new();
    for (vi, &v) in vms.iter().enumerate() {
        let vm = &res.vms[v];
        let shared: Vec<IpAddr> = vm
            .addrs
            .iter()
            .filter(|a| !vm.interfaces.iter().any(|(_, ips)| ips.contains(a)))
            .copied()
            .collect();
        let mut flags = 0;
        if res.monitor_vms.contains(&v) {
            flags |= EP_MONITOR;
        }
        if vm.infra_server {
            flags |= EP_INFRA_SERVER;
        }
        let first_slot = endpoints.len() as u32;
        for (ii, (mac, ips)) in vm.interfaces.iter().enumerate() {
            let mut addrs = ips.clone();
            addrs.extend(shared.iter().copied());
            endpoints.push(EndpointTable {
                id: bulkhead_abi::model::endpoint_id(&vm.name, mac),
                mac: *mac,
                addrs,
                flags,
            });
            slots.push((v, ii));
        }
        let nslots = vm.interfaces.len() as u32;
        for (di, dir) in [DIR_EGRESS, DIR_INGRESS].into_iter().enumerate() {
            let list = &lists[vi][di];
            // entry indices per identity
            let mut per_id: Vec<Vec<u32>> = vec![vec![]; nids as usize + 1];
            for (j, e) in list.iter().enumerate() {
                if e.peers == usize::MAX {
                    for p in per_id.iter_mut().skip(1) {
                        p.push(j as u32);
                    }
                } else {
                    for &id in &inv[local[&e.peers] as usize] {
                        per_id[id as usize].push(j as u32);
                    }
                }
            }
            // entry list → structure id; structures deduplicated by value.
            let mut memo: FxMap<&Vec<u32>, u32> = FxMap::default();
            let mut uniq: Vec<IdStruct> = vec![];
            let mut uniq_ids: FxMap<IdStruct, u32> = FxMap::default();
            let mut structs: Vec<u32> = Vec::with_capacity(per_id.len());
            for ids in per_id.iter().skip(1) {
                if let Some(&sid) = memo.get(ids) {
                    structs.push(sid);
                    continue;
                }
                let st = {
                    let es: Vec<&Entry> = ids.iter().map(|&j| &list[j as usize]).collect();
                    let other = walk(res, &es, None, 0, &pc, default);
                    let mut ps = Vec::new();
                    for &p in &protos {
                        // Only entries that can match protocol p matter for it.
                        let ep: Vec<&Entry> = es
                            .iter()
                            .copied()
                            .filter(|e| {
                                let svc = res.entry_svc(e);
                                svc.is_empty() || svc.iter().any(|s| s.proto.is_none_or(|x| x == p))
                            })
                            .collect();
                        let p2 = match port_kind(p) {
                            None => P2::Plain(walk(res, &ep, Some(p), 0, &pc, default)),
                            Some(k) => {
                                let cls = &kind_classes[k as usize];
                                let vs: Vec<(u32, Verdict)> = cls
                                    .iter()
                                    .map(|&c| (c, walk(res, &ep, Some(p), c, &pc, default)))
                                    .collect();
                                let v0 = vs[0].1;
                                let diff: Vec<(u32, Verdict)> =
                                    vs.into_iter().filter(|(_, v)| *v != v0).collect();
                                if diff.is_empty() {
                                    P2::Plain(v0)
                                } else {
                                    P2::Refine(v0, diff)
                                }
                            }
                        };
                        if p2 != P2::Plain(other) {
                            ps.push((p, p2));
                        }
                    }
                    IdStruct { other, protos: ps }
                };
                let sid = match uniq_ids.get(&st) {
                    Some(&x) => x,
                    None => {
                        let x = uniq.len() as u32;
                        uniq_ids.insert(st.clone(), x);
                        uniq.push(st);
                        x
                    }
                };
                memo.insert(ids, sid);
                structs.push(sid);
            }
            // Most common structure → IDENTITY_ANY (ties: the one seen first).
            let mut count: Vec<(usize, usize)> = vec![(0, usize::MAX); uniq.len()];
            for (i, &sid) in structs.iter().enumerate() {
                let c = &mut count[sid as usize];
                c.0 += 1;
                c.1 = c.1.min(i);
            }
            let any_sid = (0..uniq.len()).max_by(|&a, &b| {
                count[a]
                    .0
                    .cmp(&count[b].0)
                    .then(count[b].1.cmp(&count[a].1))
            });
            let fallback = IdStruct {
                other: default,
                protos: vec![],
            };
            let any = any_sid.map_or(&fallback, |a| &uniq[a]);
            for slot in first_slot..first_slot + nslots {
                emit(&mut policy, slot, dir, IDENTITY_ANY, any);
                for (i, &sid) in structs.iter().enumerate() {
                    if Some(sid as usize) != any_sid {
                        emit(&mut policy, slot, dir, i as u32 + 1, &uniq[sid as usize]);
                    }
                }
            }
        }
    }
    policy.sort_by_key(|a: &(PolicyKey, Verdict)| a.0);
    let tables = HostTables {
        endpoints,
        ipcache,
        port_classes: pc.table,
        policy,
        rules: res.rule_ids(),
    };
    let revision = hex(&Sha256::digest(canonical_bytes(&tables)));
    HostOutput {
        tables,
        revision,
        slots,
    }
}

fn refine(v: Verdict) -> Verdict {
    Verdict::new(v.action, v.flags | VERDICT_REFINE, v.rule)
}

fn emit(out: &mut Vec<(PolicyKey, Verdict)>, slot: u32, dir: u8, id: u32, s: &IdStruct) {
    let k = |proto, class| PolicyKey::new(0, slot, dir, id, proto, class);
    if s.protos.is_empty() {
        out.push((k(PROTO_ANY, PORT_CLASS_ANY), s.other));
        return;
    }
    out.push((k(PROTO_ANY, PORT_CLASS_ANY), refine(s.other)));
    for (p, p2) in &s.protos {
        match p2 {
            P2::Plain(v) => out.push((k(*p, PORT_CLASS_ANY), *v)),
            P2::Refine(v0, cls) => {
                out.push((k(*p, PORT_CLASS_ANY), refine(*v0)));
                for (c, v) in cls {
                    out.push((k(*p, *c), *v));
                }
            }
        }
    }
}
