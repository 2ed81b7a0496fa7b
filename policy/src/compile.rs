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
use std::sync::Arc;

use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange, SharedVec};
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
        // The multiply leaves the low bits (hashbrown's bucket index) depending only on the
        // inputs' low bits, e.g. the constant first octet of addresses: mix high into low.
        let x = (self.0 ^ (self.0 >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
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

/// Identities computed once, by the first host that needs them.
type EnvSlot = Arc<std::sync::OnceLock<Arc<IdentEnv>>>;

/// What every host of one compile shares, computed once.
pub(crate) struct Shared<'a> {
    res: &'a Resolved,
    default: Verdict,
    /// The rules section of [`canonical_bytes`]: identical on every host, so encoded once.
    rules_enc: Vec<u8>,
    /// Rule index → id, one list held by every host's tables.
    rule_ids: SharedVec<String>,
    /// Host → its VMs sorted by name; built on first use (an incremental compile may need
    /// no host at all).
    by_host: std::sync::OnceLock<HashMap<&'a str, Vec<usize>>>,
    /// Identities per distinct list of used peer sets: hosts using the same sets (usually
    /// most of them) share one computation (at 1000 hosts × 10k addresses, 7-15 s -> 0.8 s).
    envs: std::sync::Mutex<FxMap<Vec<usize>, EnvSlot>>,
}

impl<'a> Shared<'a> {
    pub(crate) fn new(res: &'a Resolved) -> Shared<'a> {
        let mut rules_enc = Vec::new();
        encode_rule_ids(res, &mut rules_enc);
        Shared {
            res,
            default: default_verdict(res),
            rules_enc,
            rule_ids: res.rule_ids().into(),
            by_host: std::sync::OnceLock::new(),
            envs: std::sync::Mutex::new(FxMap::default()),
        }
    }

    /// The identities for hosts using `used`; computed by the first of them, outside the
    /// map's lock so that other hosts' lookups go on meanwhile.
    fn env(&self, used: &[usize], key: impl FnOnce() -> Vec<u8>) -> Arc<IdentEnv> {
        let slot = {
            // A panic while holding the lock leaves the map intact.
            let mut m = self.envs.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(used.to_vec()).or_default().clone()
        };
        slot.get_or_init(|| Arc::new(identities(self.res, used, key())))
            .clone()
    }

    pub(crate) fn rules_enc(&self) -> &[u8] {
        &self.rules_enc
    }

    /// VMs of `host` by one scan (for a few hosts: cheaper than indexing them all).
    fn scan(&self, host: &str) -> Vec<usize> {
        let res = self.res;
        let mut v: Vec<usize> = (0..res.vms.len())
            .filter(|&i| res.vms[i].host == host)
            .collect();
        v.sort_by(|&a, &b| res.vms[a].name.cmp(&res.vms[b].name));
        v
    }

    fn vms_of(&self, host: &str) -> &[usize] {
        let res = self.res;
        let m = self.by_host.get_or_init(|| {
            let mut m: HashMap<&str, Vec<usize>> = HashMap::new();
            for (i, vm) in res.vms.iter().enumerate() {
                m.entry(vm.host.as_str()).or_default().push(i);
            }
            for v in m.values_mut() {
                v.sort_by(|&a, &b| res.vms[a].name.cmp(&res.vms[b].name));
            }
            m
        });
        m.get(host).map_or(&[], |v| v.as_slice())
    }
}

/// Orders like `IpAddr` (IPv4 first, then numerically).
fn addr_key(a: &IpAddr) -> (u8, u128) {
    match a {
        IpAddr::V4(v) => (4, u128::from(u32::from(*v))),
        IpAddr::V6(v) => (6, u128::from(*v)),
    }
}

/// Sorts like `(len, Net)`.
type NetKey = (u8, (u8, u128));

fn net_key(n: &Net) -> NetKey {
    (n.len, addr_key(&n.addr))
}

/// `encode_rules(&res.rule_ids())` without building the strings.
fn encode_rule_ids(res: &Resolved, b: &mut Vec<u8>) {
    let n = 1 + res.system.len() + res.quarantine.len() + res.rules.len();
    // An estimate: summing the ids' lengths would be a second pass over 20k scattered rules.
    b.reserve(24 * n);
    b.extend((n as u32).to_le_bytes());
    let mut put = |parts: &[&str]| {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        b.extend((len as u32).to_le_bytes());
        parts.iter().for_each(|p| b.extend(p.as_bytes()));
    };
    put(&["default"]);
    for s in &res.system {
        put(&["system/", &s.name]);
    }
    for q in &res.quarantine {
        put(&["quarantine/", &res.vms[q.vm].name]);
    }
    for r in &res.rules {
        put(&[&r.id]);
    }
}

/// Compile several hosts, in parallel on the available cores (hosts are independent).
pub fn compile_hosts(res: &Resolved, hosts: &[String]) -> Vec<HostOutput> {
    compile_hosts_in(res, hosts, &Shared::new(res), None)
        .into_iter()
        .map(|(o, _)| o)
        .collect()
}

/// A host's identities: a function of the contents of the peer sets its lists use, in the
/// order of their indices, which `key` holds (their sha256 digests). Kept by the incremental
/// compiler: a recompiled host whose sets are unchanged reuses them.
pub(crate) struct IdentEnv {
    key: Vec<u8>,
    ipcache: SharedVec<IpcacheEntry>,
    /// sha256 of the ipcache section of the canonical encoding: hashed once for every host
    /// that shares these identities.
    ipcache_digest: [u8; 32],
    /// Local set → identities whose addresses are all in it (ascending).
    inv: Vec<Vec<u32>>,
    nids: u32,
}

/// A distinct entry list's policy entries without slot and direction:
/// (identity, protocol, port class, verdict), sorted by (identity, class, protocol).
type Template = Vec<(u32, u8, u32, Verdict)>;

/// What a recompile of a host can reuse: its identities, and the templates of its entry lists
/// while the identities, port classes and default action (`ctx_key`) are unchanged.
pub(crate) struct HostMemo {
    env: Arc<IdentEnv>,
    ctx_key: Vec<u8>,
    /// [`list_key`] → template.
    lists: FxMap<Vec<u8>, Arc<Template>>,
}

/// Previous memos per host, and the digests of this revision's sets.
pub(crate) struct EnvCache<'a> {
    pub(crate) set_hash: &'a [[u8; 32]],
    pub(crate) prev: &'a HashMap<String, Arc<HostMemo>>,
}

type HostResult = (HostOutput, Arc<HostMemo>);

/// Everything `list_template` reads of a list, given the host's context: per entry its peer set
/// (local index), tier, action, flags, rule index and services.
fn list_key(res: &Resolved, list: &[Entry], local: &FxMap<usize, u32>) -> Vec<u8> {
    let mut b = Vec::with_capacity(list.len() * 24);
    for e in list {
        let peers = if e.peers == usize::MAX {
            u32::MAX
        } else {
            local[&e.peers]
        };
        b.extend(peers.to_le_bytes());
        b.extend(e.tier.map_or(u32::MAX, |t| t as u32).to_le_bytes());
        b.extend([e.action as u8, u8::from(e.monitor), u8::from(e.log)]);
        b.extend(e.rule_index.to_le_bytes());
        svc_key(&mut b, res.entry_svc(e).iter());
    }
    b
}

pub(crate) fn svc_key<'s>(b: &mut Vec<u8>, svc: impl ExactSizeIterator<Item = &'s SvcEntry>) {
    b.extend((svc.len() as u32).to_le_bytes());
    for s in svc {
        let (lo, hi) = s.range.unwrap_or((0, 0));
        b.extend([
            s.proto.unwrap_or(0),
            u8::from(s.proto.is_some()),
            u8::from(s.range.is_some()),
        ]);
        b.extend(lo.to_le_bytes());
        b.extend(hi.to_le_bytes());
    }
}

pub(crate) fn compile_hosts_in(
    res: &Resolved,
    hosts: &[String],
    sh: &Shared,
    cache: Option<&EnvCache>,
) -> Vec<HostResult> {
    // An incremental compile usually recompiles a few hosts: find their VMs by scanning.
    let few: Option<Vec<Vec<usize>>> =
        (hosts.len() <= 4).then(|| hosts.iter().map(|h| sh.scan(h)).collect());
    let one = |i: usize| {
        let vms = few
            .as_ref()
            .map_or_else(|| sh.vms_of(&hosts[i]), |f| f[i].as_slice());
        compile_host_in(res, &hosts[i], vms, sh, cache)
    };
    let n = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(hosts.len().max(1));
    if n <= 1 || hosts.len() < 2 {
        return (0..hosts.len()).map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut outs: Vec<Option<HostResult>> = (0..hosts.len()).map(|_| None).collect();
    let results: Vec<Vec<(usize, HostResult)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= hosts.len() {
                            break;
                        }
                        mine.push((i, one(i)));
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
    outs.into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| one(i)))
        .collect()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Canonical byte encoding of a host's tables (the input of the revision hash). The ipcache
/// section is its entry count and the sha256 of its entries: hosts share one ipcache, so it is
/// hashed once per compile, not once per host.
pub fn canonical_bytes(t: &HostTables) -> Vec<u8> {
    let mut e = Enc {
        b: Vec::new(),
        h: None,
    };
    encode_head(t, &ipcache_digest(&t.ipcache), &mut e);
    encode_rules(&t.rules, &mut e.b);
    e.b
}

/// sha256 of [`canonical_bytes`], with the ipcache and rules sections already encoded.
fn revision_of(t: &HostTables, ipcache: &[u8; 32], rules_enc: &[u8]) -> String {
    let mut h = Sha256::new();
    let mut e = Enc {
        b: Vec::with_capacity(ENC_CHUNK + 256),
        h: Some(&mut h),
    };
    encode_head(t, ipcache, &mut e);
    let rest = std::mem::take(&mut e.b);
    h.update(&rest);
    h.update(rules_enc);
    hex(&h.finalize())
}

fn ipcache_digest(ipcache: &[IpcacheEntry]) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut e = Enc {
        b: Vec::with_capacity(ENC_CHUNK + 64),
        h: Some(&mut h),
    };
    for c in ipcache {
        encode_ip(&mut e, &c.addr);
        e.put(&[c.prefix_len]);
        e.put(&c.identity.to_le_bytes());
        e.flush();
    }
    let rest = std::mem::take(&mut e.b);
    h.update(&rest);
    h.finalize().into()
}

fn encode_ip(e: &mut Enc, a: &IpAddr) {
    match a {
        IpAddr::V4(v) => {
            e.put(&[4]);
            e.put(&v.octets());
        }
        IpAddr::V6(v) => {
            e.put(&[6]);
            e.put(&v.octets());
        }
    }
}

const ENC_CHUNK: usize = 1 << 16;

/// Encoder output: kept whole, or handed to a hasher in chunks (no megabyte buffer per host).
struct Enc<'h> {
    b: Vec<u8>,
    h: Option<&'h mut Sha256>,
}

impl Enc<'_> {
    fn put(&mut self, x: &[u8]) {
        self.b.extend_from_slice(x);
    }
    /// Called between records: flushes a full chunk to the hasher.
    fn flush(&mut self) {
        if self.b.len() >= ENC_CHUNK {
            if let Some(h) = self.h.as_mut() {
                h.update(&self.b);
                self.b.clear();
            }
        }
    }
}

pub(crate) fn encode_str(b: &mut Vec<u8>, x: &str) {
    b.extend((x.len() as u32).to_le_bytes());
    b.extend(x.as_bytes());
}

/// The rules section of the canonical encoding (last).
fn encode_rules(rules: &[String], b: &mut Vec<u8>) {
    b.extend((rules.len() as u32).to_le_bytes());
    for r in rules {
        encode_str(b, r);
    }
}

/// Everything of the canonical encoding but the rules section.
fn encode_head(t: &HostTables, ipcache: &[u8; 32], e: &mut Enc) {
    let ip = encode_ip;
    e.put(b"bulkhead-tables-v1");
    e.put(&(t.endpoints.len() as u32).to_le_bytes());
    for ep in &t.endpoints {
        encode_str(&mut e.b, &ep.id);
        e.put(&ep.mac);
        e.put(&(ep.addrs.len() as u32).to_le_bytes());
        for a in &ep.addrs {
            ip(e, a);
        }
        e.put(&ep.flags.to_le_bytes());
        e.flush();
    }
    e.put(&(t.ipcache.len() as u32).to_le_bytes());
    e.put(ipcache);
    e.put(&(t.port_classes.len() as u32).to_le_bytes());
    for r in &t.port_classes {
        e.put(&r.kind.to_le_bytes());
        e.put(&r.first.to_le_bytes());
        e.put(&r.last.to_le_bytes());
        e.put(&r.class.to_le_bytes());
        e.flush();
    }
    e.put(&(t.policy.len() as u32).to_le_bytes());
    for (k, v) in &t.policy {
        let mut r = [0u8; 21];
        r[0..4].copy_from_slice(&k.slot.to_le_bytes());
        r[4] = k.direction;
        r[5..9].copy_from_slice(&k.identity.to_le_bytes());
        r[9] = k.proto;
        r[10..14].copy_from_slice(&k.port_class.to_le_bytes());
        r[14] = v.action;
        r[15] = v.flags;
        r[16..20].copy_from_slice(&v.rule.to_le_bytes());
        e.put(&r[..20]);
        e.flush();
    }
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

    /// Per kind and distinct range: the positions (in `of_kind(kind)`) of the classes inside it.
    fn range_positions(&self) -> [Vec<Vec<u32>>; 2] {
        let mut out: [Vec<Vec<u32>>; 2] = [
            vec![vec![]; self.ranges[0].len()],
            vec![vec![]; self.ranges[1].len()],
        ];
        for kind in 0..2u32 {
            for (pos, c) in self.of_kind(kind).into_iter().enumerate().skip(1) {
                for &ri in &self.classes[c as usize].1 {
                    out[kind as usize][ri as usize].push(pos as u32);
                }
            }
        }
        out
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

/// How one entry's services match one protocol.
#[derive(Clone)]
enum Match {
    No,
    All,
    /// Class positions (in the kind's class list); never position 0 (no range).
    Classes(Vec<u32>),
}

/// What every list of one host shares.
struct HostCtx<'r> {
    res: &'r Resolved,
    default: Verdict,
    /// Peer set → local index (position in `inv`).
    local: FxMap<usize, u32>,
    /// Local set → identities whose addresses are all in it (ascending).
    inv: &'r [Vec<u32>],
    nids: u32,
    protos: Vec<u8>,
    kind_classes: [Vec<u32>; 2],
    ranges: [Vec<(u16, u16)>; 2],
    range_pos: [Vec<Vec<u32>>; 2],
}

/// First-match state of one walk over several port classes at once.
struct Walk {
    out: Vec<Option<Verdict>>,
    /// Per class: the tier a `pass` skips the rest of.
    skip: Vec<Option<usize>>,
    left: usize,
}

impl Walk {
    fn new(n: usize) -> Walk {
        Walk {
            out: vec![None; n],
            skip: vec![None; n],
            left: n,
        }
    }

    fn apply(&mut self, c: usize, e: &Entry) {
        if self.out[c].is_some() || (self.skip[c].is_some() && e.tier == self.skip[c]) {
            return;
        }
        if e.action == RAction::Pass {
            self.skip[c] = e.tier;
        } else {
            self.out[c] = Some(verdict_of(e));
            self.left -= 1;
        }
    }

    /// Feed the entries of `ids` in order; `m(j)` says which classes entry `j` matches.
    fn run<'m>(
        mut self,
        list: &[Entry],
        ids: &[u32],
        m: impl Fn(usize) -> &'m Match,
        default: Verdict,
    ) -> Vec<Verdict> {
        let n = self.out.len();
        for &j in ids {
            let e = &list[j as usize];
            match m(j as usize) {
                Match::No => continue,
                Match::All => (0..n).for_each(|c| self.apply(c, e)),
                Match::Classes(cs) => cs.iter().for_each(|&c| self.apply(c as usize, e)),
            }
            if self.left == 0 {
                break;
            }
        }
        self.out.into_iter().map(|v| v.unwrap_or(default)).collect()
    }
}

/// Policy entries of one distinct entry list, without slot and direction:
/// (identity, protocol, port class, verdict).
fn list_template(ctx: &HostCtx, list: &[Entry]) -> Vec<(u32, u8, u32, Verdict)> {
    let res = ctx.res;
    // How each entry matches "another protocol" and each protocol named on the host.
    let other: Vec<Match> = list
        .iter()
        .map(|e| {
            let svc = res.entry_svc(e);
            if svc.is_empty() || svc.iter().any(|s| s.proto.is_none()) {
                Match::All
            } else {
                Match::No
            }
        })
        .collect();
    let per_proto: Vec<Vec<Match>> = ctx
        .protos
        .iter()
        .map(|&p| {
            list.iter()
                .map(|e| {
                    let svc = res.entry_svc(e);
                    if svc.is_empty()
                        || svc
                            .iter()
                            .any(|s| s.proto.is_none() || (s.proto == Some(p) && s.range.is_none()))
                    {
                        return Match::All;
                    }
                    let Some(k) = port_kind(p) else {
                        return Match::No;
                    };
                    let k = k as usize;
                    let mut cs: Vec<u32> = svc
                        .iter()
                        .filter(|s| s.proto == Some(p))
                        .filter_map(|s| s.range)
                        .filter_map(|r| ctx.ranges[k].binary_search(&r).ok())
                        .flat_map(|ri| ctx.range_pos[k][ri].iter().copied())
                        .collect();
                    if cs.is_empty() {
                        return Match::No;
                    }
                    cs.sort_unstable();
                    cs.dedup();
                    Match::Classes(cs)
                })
                .collect()
        })
        .collect();
    // Entries with `any` peers match every identity; the others only the identities their peer
    // set contains. So per identity only its specific entries are listed, as (identity, entry)
    // pairs: the work is proportional to what the list names, not to the host's identities.
    let any_js: Vec<u32> = (0..list.len() as u32)
        .filter(|&j| list[j as usize].peers == usize::MAX)
        .collect();
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for (j, e) in list.iter().enumerate() {
        if e.peers != usize::MAX {
            let ids = &ctx.inv[ctx.local[&e.peers] as usize];
            pairs.extend(ids.iter().map(|&id| (id, j as u32)));
        }
    }
    pairs.sort_unstable();
    let spec: Vec<u32> = pairs.iter().map(|&(_, j)| j).collect();
    // specific entries → structure id; structures deduplicated by value.
    let mut memo: FxMap<&[u32], u32> = FxMap::default();
    let mut uniq: Vec<IdStruct> = vec![];
    let mut uniq_ids: FxMap<IdStruct, u32> = FxMap::default();
    let mut merged: Vec<u32> = Vec::new();
    let mut structure = |specific: &[u32]| -> u32 {
        // The identity's entries in list order: the specific ones merged with the `any` ones.
        merged.clear();
        let (mut a, mut b) = (0, 0);
        while a < any_js.len() || b < specific.len() {
            if b == specific.len() || (a < any_js.len() && any_js[a] < specific[b]) {
                merged.push(any_js[a]);
                a += 1;
            } else {
                merged.push(specific[b]);
                b += 1;
            }
        }
        let st = id_struct(ctx, list, &merged, &other, &per_proto);
        match uniq_ids.get(&st) {
            Some(&x) => x,
            None => {
                let x = uniq.len() as u32;
                uniq_ids.insert(st.clone(), x);
                uniq.push(st);
                x
            }
        }
    };
    // (identity, structure) for identities with specific entries, ascending.
    let mut touched: Vec<(u32, u32)> = Vec::new();
    let mut k = 0;
    while k < pairs.len() {
        let id = pairs[k].0;
        let e = k + pairs[k..].iter().take_while(|p| p.0 == id).count();
        let specific = &spec[k..e];
        let sid = match memo.get(specific).copied() {
            Some(x) => x,
            None => {
                let x = structure(specific);
                memo.insert(specific, x);
                x
            }
        };
        touched.push((id, sid));
        k = e;
    }
    // The other identities share one structure (the `any` entries alone).
    let nids = ctx.nids;
    let untouched = nids as usize - touched.len();
    let first_untouched = {
        let mut want = 1;
        for &(id, _) in &touched {
            if id != want {
                break;
            }
            want += 1;
        }
        want
    };
    let bg = (untouched > 0).then(|| match memo.get(&[][..]).copied() {
        Some(x) => x,
        None => structure(&[]),
    });
    // Most common structure → IDENTITY_ANY (ties: the one seen first, i.e. lowest identity).
    let mut count: Vec<(usize, u32)> = vec![(0, u32::MAX); uniq.len()];
    for &(id, sid) in &touched {
        let c = &mut count[sid as usize];
        c.0 += 1;
        c.1 = c.1.min(id);
    }
    if let Some(b) = bg {
        let c = &mut count[b as usize];
        c.0 += untouched;
        c.1 = c.1.min(first_untouched);
    }
    let any_sid = (0..uniq.len() as u32).max_by(|&a, &b| {
        let (ca, cb) = (count[a as usize], count[b as usize]);
        ca.0.cmp(&cb.0).then(cb.1.cmp(&ca.1))
    });
    let fallback = IdStruct {
        other: ctx.default,
        protos: vec![],
    };
    let any = any_sid.map_or(&fallback, |a| &uniq[a as usize]);
    let mut out = Vec::new();
    emit(&mut out, IDENTITY_ANY, any);
    if let Some(b) = bg.filter(|&b| Some(b) != any_sid) {
        let mut t = touched.iter().peekable();
        for id in 1..=nids {
            if t.peek().is_some_and(|x| x.0 == id) {
                t.next();
            } else {
                emit(&mut out, id, &uniq[b as usize]);
            }
        }
    }
    for &(id, sid) in &touched {
        if Some(sid) != any_sid {
            emit(&mut out, id, &uniq[sid as usize]);
        }
    }
    out
}

/// The collapsed decisions of one identity whose matching entries are `ids` (list order).
fn id_struct(
    ctx: &HostCtx,
    list: &[Entry],
    ids: &[u32],
    other: &[Match],
    per_proto: &[Vec<Match>],
) -> IdStruct {
    let other_v = Walk::new(1).run(list, ids, |j| &other[j], ctx.default)[0];
    let mut ps = Vec::new();
    for (pi, &p) in ctx.protos.iter().enumerate() {
        let m = &per_proto[pi];
        let p2 = match port_kind(p) {
            None => P2::Plain(Walk::new(1).run(list, ids, |j| &m[j], ctx.default)[0]),
            Some(k) => {
                let cls = &ctx.kind_classes[k as usize];
                let vs = Walk::new(cls.len()).run(list, ids, |j| &m[j], ctx.default);
                let v0 = vs[0];
                let diff: Vec<(u32, Verdict)> = cls
                    .iter()
                    .zip(vs)
                    .filter(|(_, v)| *v != v0)
                    .map(|(&c, v)| (c, v))
                    .collect();
                if diff.is_empty() {
                    P2::Plain(v0)
                } else {
                    P2::Refine(v0, diff)
                }
            }
        };
        if p2 != P2::Plain(other_v) {
            ps.push((p, p2));
        }
    }
    IdStruct {
        other: other_v,
        protos: ps,
    }
}

/// (2) Identities of the addresses the peer sets `used` name (local set i = `used[i]`).
fn identities(res: &Resolved, used: &[usize], key: Vec<u8>) -> IdentEnv {
    // Every prefix the used sets mention (plus both default routes) in (length, prefix)
    // order, each with its annotations (local set, block, is_except): `ann[at[i]..at[i + 1]]`.
    // Sorted by an integer key (comparing `IpAddr`s is slow) in (length, prefix) order.
    let mut raw: Vec<(NetKey, Net, u32, u32, bool)> = vec![
        (net_key(&Net::all_v4()), Net::all_v4(), u32::MAX, 0, false),
        (net_key(&Net::all_v6()), Net::all_v6(), u32::MAX, 0, false),
    ];
    for (li, &s) in used.iter().enumerate() {
        for (bi, (n, ex)) in res.sets[s].blocks.iter().enumerate() {
            raw.push((net_key(n), *n, li as u32, bi as u32, false));
            raw.extend(
                ex.iter()
                    .map(|e| (net_key(e), *e, li as u32, bi as u32, true)),
            );
        }
    }
    raw.sort_unstable_by_key(|&(k, _, s, b, ex)| (k, s, b, ex));
    let mut prefixes: Vec<Net> = Vec::new();
    let mut at: Vec<usize> = Vec::new();
    let mut ann: Vec<(u32, u32, bool)> = Vec::with_capacity(raw.len());
    for &(_, n, s, b, ex) in &raw {
        if prefixes.last() != Some(&n) {
            prefixes.push(n);
            at.push(ann.len());
        }
        // The default routes' placeholders carry no annotation.
        if s != u32::MAX {
            ann.push((s, b, ex));
        }
    }
    at.push(ann.len());
    drop(raw);
    let index: FxMap<Net, u32> = prefixes
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i as u32))
        .collect();
    // Prefix lengths present per family: ancestors are looked up only at these lengths.
    let lens: [Vec<u8>; 2] = {
        let mut l = [Vec::new(), Vec::new()];
        for p in &prefixes {
            l[usize::from(!p.is_v4())].push(p.len);
        }
        l.iter_mut().for_each(|v| v.dedup());
        l
    };
    let mut id_of_members: FxMap<Vec<u32>, u32> = FxMap::default();
    let mut members: Vec<Vec<u32>> = vec![vec![]]; // index = identity; 0 unused
    let mut ipcache = Vec::new();
    // Per prefix: its identity if it got an ipcache entry, else 0.
    let mut kept: Vec<u32> = vec![0; prefixes.len()];
    let mut pos: Vec<(u32, u32)> = Vec::new();
    let mut neg: Vec<(u32, u32)> = Vec::new();
    let mut m: Vec<u32> = Vec::new();
    for (i, x) in prefixes.iter().enumerate() {
        pos.clear();
        neg.clear();
        // Nearest ancestor with an ipcache entry (LPM parent).
        let mut parent = 0;
        let fam = &lens[usize::from(!x.is_v4())];
        for &l in fam.iter().take_while(|&&l| l <= x.len) {
            let j = if l == x.len {
                i
            } else {
                match index.get(&Net::new(x.addr, l)) {
                    Some(&j) => j as usize,
                    None => continue,
                }
            };
            if j != i && kept[j] != 0 {
                parent = kept[j];
            }
            for &(s, b, ex) in &ann[at[j]..at[j + 1]] {
                if ex {
                    neg.push((s, b));
                } else {
                    pos.push((s, b));
                }
            }
        }
        pos.sort_unstable();
        pos.dedup();
        neg.sort_unstable();
        m.clear();
        m.extend(
            pos.iter()
                .filter(|sb| neg.binary_search(sb).is_err())
                .map(|&(s, _)| s),
        );
        m.dedup();
        let id = match id_of_members.get(m.as_slice()) {
            Some(&id) => id,
            None => {
                let id = members.len() as u32;
                id_of_members.insert(m.clone(), id);
                members.push(m.clone());
                id
            }
        };
        // Drop entries that resolve to the same identity as their LPM parent.
        if parent != id {
            kept[i] = id;
            ipcache.push(IpcacheEntry {
                addr: x.addr,
                prefix_len: x.len,
                identity: id,
            });
        }
    }
    // = `sort()` ((address, length) order; no two entries share both), on integer keys.
    ipcache.sort_unstable_by_key(|e| (addr_key(&e.addr), e.prefix_len));
    let nids = members.len() as u32 - 1;
    // inverted index: local set → identities containing it
    let mut inv: Vec<Vec<u32>> = vec![vec![]; used.len()];
    for (id, m) in members.iter().enumerate().skip(1) {
        for &s in m {
            inv[s as usize].push(id as u32);
        }
    }
    IdentEnv {
        key,
        ipcache_digest: ipcache_digest(&ipcache),
        ipcache: ipcache.into(),
        inv,
        nids,
    }
}

pub fn compile_host(res: &Resolved, host: &str) -> HostOutput {
    let sh = Shared::new(res);
    compile_host_in(res, host, &sh.scan(host), &sh, None).0
}

fn compile_host_in(
    res: &Resolved,
    host: &str,
    vms: &[usize],
    sh: &Shared,
    cache: Option<&EnvCache>,
) -> HostResult {
    let default = sh.default;
    // (1) entry lists; VMs with equal lists (same policies) share the work below.
    let lists: Vec<Vec<Entry>> = vms
        .iter()
        .flat_map(|&v| [res.entries(v, DIR_EGRESS), res.entries(v, DIR_INGRESS)])
        .collect();
    let mut distinct: Vec<usize> = Vec::new();
    let list_of: Vec<usize> = {
        let mut seen: FxMap<&[Entry], usize> = FxMap::default();
        lists
            .iter()
            .enumerate()
            .map(|(i, l)| {
                *seen.entry(l.as_slice()).or_insert_with(|| {
                    distinct.push(i);
                    distinct.len() - 1
                })
            })
            .collect()
    };
    // (2) identities.
    let mut used: BTreeSet<usize> = BTreeSet::new();
    let mut svcs: BTreeSet<SvcEntry> = BTreeSet::new();
    for &d in &distinct {
        for l in &lists[d] {
            if l.peers != usize::MAX {
                used.insert(l.peers);
            }
            svcs.extend(res.entry_svc(l).iter().copied());
        }
    }
    let used: Vec<usize> = used.into_iter().collect();
    let local: FxMap<usize, u32> = used
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, i as u32))
        .collect();
    let prev = cache.and_then(|c| c.prev.get(host));
    let env = match cache {
        Some(c) => {
            let key: Vec<u8> = used.iter().flat_map(|&s| c.set_hash[s]).collect();
            match prev {
                Some(p) if p.env.key == key => p.env.clone(),
                _ => sh.env(&used, move || key),
            }
        }
        None => sh.env(&used, Vec::new),
    };
    // (3) port classes.
    let pc = PortClasses::build(&svcs);
    let ctx = HostCtx {
        res,
        default,
        local,
        inv: &env.inv,
        nids: env.nids,
        protos: svcs
            .iter()
            .filter_map(|s| s.proto)
            .collect::<BTreeSet<u8>>()
            .into_iter()
            .collect(),
        kind_classes: [pc.of_kind(0), pc.of_kind(1)],
        range_pos: pc.range_positions(),
        ranges: pc.ranges.clone(),
    };
    // (4) decisions per distinct list, then stamped onto each endpoint. Templates are sorted
    // by (identity, class, proto) so that merging a slot's two directions yields key order.
    // Incremental: a list whose key is unchanged, in an unchanged context, has the same template.
    let ctx_key: Vec<u8> = match cache {
        Some(_) => {
            let mut k = env.key.clone();
            svc_key(&mut k, svcs.iter());
            k.extend([default.action, default.flags]);
            k.extend(default.rule.to_le_bytes());
            k
        }
        None => Vec::new(),
    };
    let reuse = prev.filter(|p| p.ctx_key == ctx_key);
    let mut kept: FxMap<Vec<u8>, Arc<Template>> = FxMap::default();
    let templates: Vec<Arc<Template>> = distinct
        .iter()
        .map(|&d| {
            let key = cache.map(|_| list_key(res, &lists[d], &ctx.local));
            if let Some(t) = key.as_ref().and_then(|k| reuse?.lists.get(k)) {
                kept.insert(key.unwrap_or_default(), t.clone());
                return t.clone();
            }
            let mut t = list_template(&ctx, &lists[d]);
            t.sort_unstable_by_key(|&(id, proto, class, _)| (id, class, proto));
            let t = Arc::new(t);
            if let Some(k) = key {
                kept.insert(k, t.clone());
            }
            t
        })
        .collect();
    let mut endpoints = Vec::new();
    let mut slots = Vec::new();
    let mut policy = Vec::with_capacity(
        vms.iter()
            .enumerate()
            .map(|(vi, &v)| {
                res.vms[v].interfaces.len()
                    * (templates[list_of[2 * vi]].len() + templates[list_of[2 * vi + 1]].len())
            })
            .sum(),
    );
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
        for (ii, (mac, ips)) in vm.interfaces.iter().enumerate() {
            let slot = endpoints.len() as u32;
            let mut addrs = ips.clone();
            addrs.extend(shared.iter().copied());
            endpoints.push(EndpointTable {
                id: bulkhead_abi::model::endpoint_id(&vm.name, mac),
                mac: *mac,
                addrs,
                flags,
            });
            slots.push((v, ii));
            let key = |dir: u8, &(id, proto, class, verdict): &(u32, u8, u32, Verdict)| {
                (PolicyKey::new(0, slot, dir, id, proto, class), verdict)
            };
            let eg = templates[list_of[2 * vi]]
                .iter()
                .map(|t| key(DIR_EGRESS, t));
            let ing = templates[list_of[2 * vi + 1]]
                .iter()
                .map(|t| key(DIR_INGRESS, t));
            merge_into(&mut policy, eg, ing);
        }
    }
    debug_assert!(policy.windows(2).all(|w| w[0].0 < w[1].0));
    let tables = HostTables {
        endpoints,
        ipcache: env.ipcache.clone(),
        port_classes: pc.table,
        policy,
        rules: sh.rule_ids.clone(),
    };
    let revision = revision_of(&tables, &env.ipcache_digest, &sh.rules_enc);
    let out = HostOutput {
        tables,
        revision,
        slots,
    };
    let memo = HostMemo {
        env,
        ctx_key,
        lists: kept,
    };
    (out, Arc::new(memo))
}

/// Append the merge of two key-sorted runs (keys never equal: they differ in direction).
fn merge_into(
    out: &mut Vec<(PolicyKey, Verdict)>,
    a: impl Iterator<Item = (PolicyKey, Verdict)>,
    b: impl Iterator<Item = (PolicyKey, Verdict)>,
) {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 < y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
}

fn refine(v: Verdict) -> Verdict {
    Verdict::new(v.action, v.flags | VERDICT_REFINE, v.rule)
}

fn emit(out: &mut Vec<(u32, u8, u32, Verdict)>, id: u32, s: &IdStruct) {
    if s.protos.is_empty() {
        out.push((id, PROTO_ANY, PORT_CLASS_ANY, s.other));
        return;
    }
    out.push((id, PROTO_ANY, PORT_CLASS_ANY, refine(s.other)));
    for (p, p2) in &s.protos {
        match p2 {
            P2::Plain(v) => out.push((id, *p, PORT_CLASS_ANY, *v)),
            P2::Refine(v0, cls) => {
                out.push((id, *p, PORT_CLASS_ANY, refine(*v0)));
                for (c, v) in cls {
                    out.push((id, *p, *c, *v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_encoded_without_strings_match_the_table() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let (_, res) = crate::load_dir(&dir, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(!res.quarantine.is_empty() && !res.system.is_empty());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_rule_ids(&res, &mut a);
        encode_rules(&res.rule_ids(), &mut b);
        assert_eq!(a, b);
    }
}
