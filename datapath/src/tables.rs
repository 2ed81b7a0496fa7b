//! Writing a host's compiled tables into the inactive generation and switching to it.
//!
//! Every table key carries a generation (0 or 1); `CONFIG.epoch & 1` names the active one and
//! every packet reads the epoch once. [`Tables::apply`] writes only the inactive generation
//! (nothing reads it), then bumps the epoch with one map write: a packet is judged wholly by
//! the old or wholly by the new tables. Writes are a diff against what the generation held,
//! so a small policy change costs a few syscalls whatever the table size.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{MapError, PerCpuValues};
use bulkhead_abi::model::{HostTables, IpcacheEntry};
use bulkhead_abi::*;

use crate::{DatapathError, Maps};

/// Minimum time between a flip and the next write into the generation it retired: a packet
/// that read the old epoch finishes its lookups well within it (TC programs run to
/// completion in microseconds, under RCU).
pub const GRACE: Duration = Duration::from_millis(20);

/// What one generation of the maps holds, as written by us (generation field zeroed).
#[derive(Clone, Debug, Default, PartialEq)]
struct GenImage {
    /// ifindex → endpoint.
    endpoints: HashMap<u32, EndpointInfo>,
    /// (slot, v4-mapped address).
    addrs: HashSet<(u32, [u8; 16])>,
    /// (LPM prefix length including the generation bits, masked address) → identity.
    ipcache: HashMap<(u32, [u8; 16]), u32>,
    /// `kind << 16 | port` → class, non-zero classes only.
    port_class: HashMap<u32, u32>,
    policy: HashMap<PolicyKey, Verdict>,
    /// Rule index → id; empty when unknown (generation read back after a restart).
    rules: Vec<String>,
}

/// Counters of one rule, summed over CPUs and over the revisions that carried it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the last hit
    /// (0 = never).
    pub last_hit_ns: u64,
}

impl RuleCounters {
    fn add(&mut self, s: &RuleStats) {
        self.merge(&RuleCounters {
            packets: s.packets,
            bytes: s.bytes,
            last_hit_ns: s.last_hit_ns,
        });
    }

    fn merge(&mut self, o: &RuleCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.last_hit_ns = self.last_hit_ns.max(o.last_hit_ns);
    }

    /// The last hit as Unix time in ns; `None` if never hit.
    pub fn last_hit_unix_nanos(&self) -> Option<i128> {
        counter_stamp_unix_nanos(self.last_hit_ns)
    }
}

/// Unix time in ns of a counter stamp (`last_hit_ns` of rule and endpoint counters: the
/// per-packet clock, CLOCK_MONOTONIC); `None` for 0 (never).
pub fn counter_stamp_unix_nanos(stamp_ns: u64) -> Option<i128> {
    if stamp_ns == 0 {
        return None;
    }
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec for clock_gettime to fill.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let offset = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC);
    Some(i128::from(stamp_ns) + offset)
}

/// Entries of the active generation, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub endpoints: usize,
    pub addresses: usize,
    pub ipcache: usize,
    pub port_classes: usize,
    pub policy: usize,
    pub rules: usize,
}

/// What an apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The epoch now active.
    pub epoch: u32,
    /// Map entries written and deleted in the new generation.
    pub written: usize,
    pub deleted: usize,
    /// Endpoints of the tables with no interface on this host (not enforced here).
    pub unbound: Vec<String>,
    /// Endpoint id → slot, for the endpoints enforced.
    pub slots: BTreeMap<String, u32>,
    pub duration: Duration,
}

/// The table writer: owns the map handles and knows what each generation holds.
pub struct Tables {
    maps: Maps,
    images: [Option<GenImage>; 2],
    last_flip: Option<Instant>,
    /// Counters of rules whose generation has been overwritten since this writer started.
    retired: BTreeMap<String, RuleCounters>,
    nr_cpus: usize,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn masked(addr: [u8; 16], bits: u32) -> [u8; 16] {
    let v = u128::from_be_bytes(addr);
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits.min(128))
    };
    (v & mask).to_be_bytes()
}

fn addr16(a: &IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl Tables {
    pub fn new(maps: Maps) -> Result<Self, DatapathError> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DatapathError::Cpus(e))?
            .get() as usize;
        Ok(Self {
            maps,
            images: [None, None],
            last_flip: None,
            retired: BTreeMap::new(),
            nr_cpus,
        })
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Direct map access, for tests and benchmarks (writes bypass the generation images).
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        self.maps.config.get(&0, 0).map_err(map_err("CONFIG"))
    }

    /// The active epoch (0 until the first apply: every interface on the bootstrap posture).
    pub fn epoch(&self) -> Result<u32, DatapathError> {
        Ok(self.config()?.epoch)
    }

    /// Set the posture for interfaces without policy, and the per-endpoint event budget
    /// (per CPU, per second; 0 = the default). Takes effect for the next packet.
    pub fn set_posture(&mut self, bootstrap: u8, event_rate: u32) -> Result<(), DatapathError> {
        let mut cfg = self.config()?;
        cfg.bootstrap = bootstrap;
        cfg.event_rate = event_rate;
        self.maps.config.set(0, &cfg, 0).map_err(map_err("CONFIG"))
    }

    /// Tell the writer the rule ids of the active generation after a restart (the maps hold
    /// rule indices only), so counters keep their names.
    pub fn adopt_rule_names(&mut self, rules: Vec<String>) -> Result<(), DatapathError> {
        let gen = self.config()?.generation() as usize;
        self.image(gen)?;
        if let Some(img) = self.images[gen].as_mut() {
            img.rules = rules;
        }
        Ok(())
    }

    /// Interfaces enforced by the active generation: ifindex → slot.
    pub fn active_slots(&mut self) -> Result<BTreeMap<u32, u32>, DatapathError> {
        let gen = self.config()?.generation() as usize;
        Ok(self
            .image(gen)?
            .endpoints
            .iter()
            .map(|(ifindex, info)| (*ifindex, info.slot))
            .collect())
    }

    /// Write `tables` into the inactive generation and make it active.
    ///
    /// `bindings` maps endpoint ids of the tables to interfaces of this host; endpoints without
    /// one are reported, not enforced. On error nothing changes for traffic: the active
    /// generation is untouched and the epoch is not bumped.
    pub fn apply(
        &mut self,
        tables: &HostTables,
        bindings: &HashMap<String, u32>,
    ) -> Result<ApplyReport, DatapathError> {
        let started = Instant::now();
        let cfg = self.config()?;
        let active = cfg.generation() as usize;
        let target = 1 - active;
        self.image(active)?;
        self.image(target)?;
        let mut report = ApplyReport::default();
        let desired = self.desired_image(tables, bindings, active, target, &mut report)?;

        self.wait_grace();
        self.retire_rule_stats(target)?;
        let old = self.images[target].take().unwrap_or_default();
        // Until the writes finish the generation's content is unknown; on error it is
        // re-read from the maps by the next apply.
        let (written, deleted) = self.write_diff(target as u32, &old, &desired)?;
        report.written = written;
        report.deleted = deleted;
        self.images[target] = Some(desired);

        let next = Config {
            epoch: cfg.epoch.wrapping_add(1),
            ..cfg
        };
        // Flow-cache hits of this epoch still pending after the flip would count as
        // unattributed (`STAT_FLOW_CACHE_UNATTRIBUTED`): flush them under their rules now.
        self.maps.flow_flush.run();
        self.maps
            .config
            .set(0, &next, 0)
            .map_err(map_err("CONFIG"))?;
        self.last_flip = Some(Instant::now());
        report.epoch = next.epoch;
        report.duration = started.elapsed();
        Ok(report)
    }

    fn wait_grace(&self) {
        let since = self.last_flip.map_or(Duration::ZERO, |t| t.elapsed());
        // After a restart the last flip is unknown: wait the full grace once.
        if self.last_flip.is_none() || since < GRACE {
            std::thread::sleep(GRACE.saturating_sub(since));
        }
    }

    fn desired_image(
        &self,
        tables: &HostTables,
        bindings: &HashMap<String, u32>,
        active: usize,
        target: usize,
        report: &mut ApplyReport,
    ) -> Result<GenImage, DatapathError> {
        let bad = |msg: String| Err(DatapathError::BadTables(msg));
        if tables.rules.len() > RULES_PER_GEN as usize {
            return bad(format!(
                "{} rules, the datapath holds {RULES_PER_GEN}",
                tables.rules.len()
            ));
        }
        let known: HashMap<u32, u32> = self.images[active]
            .iter()
            .chain(self.images[target].iter())
            .flat_map(|img| img.endpoints.iter().map(|(i, e)| (*i, e.slot)))
            .collect();
        let mut used: HashSet<u32> = known.values().copied().collect();
        let mut next_free = 0u32;
        let mut img = GenImage {
            rules: tables.rules.to_vec(),
            ..Default::default()
        };
        // Table endpoint index → datapath slot, for bound endpoints.
        let mut slot_of: HashMap<u32, u32> = HashMap::new();
        for (index, ep) in tables.endpoints.iter().enumerate() {
            let Some(&ifindex) = bindings.get(&ep.id) else {
                report.unbound.push(ep.id.clone());
                continue;
            };
            if img.endpoints.contains_key(&ifindex) {
                return bad(format!(
                    "endpoint {} bound to interface {ifindex}, which another endpoint has",
                    ep.id
                ));
            }
            let slot = match known.get(&ifindex) {
                Some(&s) => s,
                None => {
                    while used.contains(&next_free) {
                        next_free += 1;
                    }
                    if next_free >= MAX_ENDPOINTS {
                        return bad(format!("more than {MAX_ENDPOINTS} endpoints"));
                    }
                    used.insert(next_free);
                    next_free
                }
            };
            slot_of.insert(index as u32, slot);
            report.slots.insert(ep.id.clone(), slot);
            img.endpoints.insert(
                ifindex,
                EndpointInfo {
                    slot,
                    flags: ep.flags,
                    mac: ep.mac,
                    _pad: [0; 2],
                },
            );
            for a in &ep.addrs {
                img.addrs.insert((slot, addr16(a)));
            }
        }
        // IPv4 is keyed v4-mapped, inside `::/0` and `::ffff:0:0/96`. An IPv6 prefix inside
        // the latter can only ever match IPv4 packets (the datapath drops IPv6 packets with
        // v4-mapped addresses): it is not written. And an IPv4 default is always written
        // (`IDENTITY_ANY` unless the tables name one), so an IPv4 address outside every IPv4
        // prefix never takes the identity of a shorter IPv6 prefix such as `::/0`.
        let v4_default = IpcacheEntry {
            addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            prefix_len: 0,
            identity: IDENTITY_ANY,
        };
        for e in std::iter::once(&v4_default).chain(&tables.ipcache) {
            let max = if e.addr.is_ipv4() { 32 } else { 128 };
            if e.prefix_len > max {
                return bad(format!("ipcache prefix {}/{}", e.addr, e.prefix_len));
            }
            if let IpAddr::V6(a) = e.addr {
                if e.prefix_len >= 96 && a.to_ipv4_mapped().is_some() {
                    continue;
                }
            }
            let (bits, key) = e.lpm_key(0);
            let addr_bits = bits - IPCACHE_GEN_BITS;
            img.ipcache
                .insert((bits, masked(key.addr, addr_bits)), e.identity);
        }
        for r in &tables.port_classes {
            if r.kind >= PORT_KINDS || r.first > r.last {
                return bad(format!("port class range {r:?}"));
            }
            if r.class == PORT_CLASS_ANY {
                continue;
            }
            for port in r.first..=r.last {
                img.port_class
                    .insert(r.kind << 16 | u32::from(port), r.class);
            }
        }
        for (key, verdict) in &tables.policy {
            if verdict.rule as usize >= tables.rules.len().max(1) {
                return bad(format!("policy entry {key:?} names rule {}", verdict.rule));
            }
            let Some(&slot) = slot_of.get(&key.slot) else {
                if key.slot as usize >= tables.endpoints.len() {
                    return bad(format!("policy entry {key:?} for a missing endpoint"));
                }
                continue; // endpoint not on this host
            };
            let mut k = *key;
            k.gen = 0;
            k.slot = slot;
            img.policy.insert(k, *verdict);
        }
        Ok(img)
    }

    /// Bring the maps' generation `gen` from `old` to `new`. Returns (written, deleted).
    fn write_diff(
        &mut self,
        gen: u32,
        old: &GenImage,
        new: &GenImage,
    ) -> Result<(usize, usize), DatapathError> {
        let m = &mut self.maps;
        let (mut written, mut deleted) = (0, 0);
        // Additions and changes first, removals last: harmless either way (nothing reads
        // this generation), but it keeps map occupancy peaks predictable.
        for (k, v) in &new.policy {
            if old.policy.get(k) != Some(v) {
                let key = PolicyKey { gen, ..*k };
                m.policy.insert(&key, v, 0).map_err(map_err("POLICY"))?;
                written += 1;
            }
        }
        for (&(bits, addr), id) in &new.ipcache {
            if old.ipcache.get(&(bits, addr)) != Some(id) {
                let key = LpmKey::new(bits, IpcacheKey { gen, addr });
                m.ipcache.insert(&key, id, 0).map_err(map_err("IPCACHE"))?;
                written += 1;
            }
        }
        for (&ifindex, info) in &new.endpoints {
            if old.endpoints.get(&ifindex) != Some(info) {
                let key = EndpointKey { gen, ifindex };
                m.endpoints
                    .insert(&key, info, 0)
                    .map_err(map_err("ENDPOINTS"))?;
                written += 1;
            }
        }
        for &(slot, addr) in new.addrs.difference(&old.addrs) {
            let key = EndpointAddrKey { gen, slot, addr };
            m.ep_addrs
                .insert(&key, &1, 0)
                .map_err(map_err("EP_ADDRS"))?;
            written += 1;
        }
        let base = port_class_index(gen, 0, 0);
        for (&idx, class) in &new.port_class {
            if old.port_class.get(&idx) != Some(class) {
                m.port_class
                    .set(base | idx, class, 0)
                    .map_err(map_err("PORT_CLASS"))?;
                written += 1;
            }
        }
        for &idx in old.port_class.keys() {
            if !new.port_class.contains_key(&idx) {
                m.port_class
                    .set(base | idx, &0, 0)
                    .map_err(map_err("PORT_CLASS"))?;
                deleted += 1;
            }
        }
        for &(slot, addr) in old.addrs.difference(&new.addrs) {
            remove(
                &mut m.ep_addrs,
                &EndpointAddrKey { gen, slot, addr },
                "EP_ADDRS",
            )?;
            deleted += 1;
        }
        for &ifindex in old.endpoints.keys() {
            if !new.endpoints.contains_key(&ifindex) {
                remove(&mut m.endpoints, &EndpointKey { gen, ifindex }, "ENDPOINTS")?;
                deleted += 1;
            }
        }
        for &(bits, addr) in old.ipcache.keys() {
            if !new.ipcache.contains_key(&(bits, addr)) {
                let key = LpmKey::new(bits, IpcacheKey { gen, addr });
                match m.ipcache.remove(&key) {
                    Err(MapError::KeyNotFound) | Ok(()) => {}
                    Err(e) => return Err(map_err("IPCACHE")(e)),
                }
                deleted += 1;
            }
        }
        for k in old.policy.keys() {
            if !new.policy.contains_key(k) {
                remove(&mut m.policy, &PolicyKey { gen, ..*k }, "POLICY")?;
                deleted += 1;
            }
        }
        Ok((written, deleted))
    }

    /// Read generation `gen` back from the maps if we do not know it yet (after a restart).
    fn image(&mut self, gen: usize) -> Result<&GenImage, DatapathError> {
        if self.images[gen].is_none() {
            self.images[gen] = Some(self.read_image(gen as u32)?);
        }
        Ok(self.images[gen].get_or_insert_with(GenImage::default))
    }

    fn read_image(&self, gen: u32) -> Result<GenImage, DatapathError> {
        let m = &self.maps;
        let mut img = GenImage::default();
        for item in m.endpoints.iter() {
            let (k, v) = item.map_err(map_err("ENDPOINTS"))?;
            if k.gen == gen {
                img.endpoints.insert(k.ifindex, v);
            }
        }
        for k in m.ep_addrs.keys() {
            let k = k.map_err(map_err("EP_ADDRS"))?;
            if k.gen == gen {
                img.addrs.insert((k.slot, k.addr));
            }
        }
        for item in m.ipcache.iter() {
            let (k, v) = item.map_err(map_err("IPCACHE"))?;
            let data = k.data();
            if data.gen == gen {
                img.ipcache.insert((k.prefix_len(), data.addr), v);
            }
        }
        for item in m.policy.iter() {
            let (k, v) = item.map_err(map_err("POLICY"))?;
            if k.gen == gen {
                img.policy.insert(PolicyKey { gen: 0, ..k }, v);
            }
        }
        let base = port_class_index(gen, 0, 0);
        for idx in 0..(PORT_KINDS << 16) {
            let class = m
                .port_class
                .get(&(base | idx), 0)
                .map_err(map_err("PORT_CLASS"))?;
            if class != PORT_CLASS_ANY {
                img.port_class.insert(idx, class);
            }
        }
        Ok(img)
    }

    /// Fold the rule counters of generation `gen` into the retired totals and zero them,
    /// before the generation is rewritten with other rule indices.
    fn retire_rule_stats(&mut self, gen: usize) -> Result<(), DatapathError> {
        let names = self.images[gen]
            .as_ref()
            .map(|i| i.rules.clone())
            .unwrap_or_default();
        let zero = || PerCpuValues::try_from(vec![RuleStats::default(); self.nr_cpus]);
        // With names unknown (read back after a restart), the rules the generation's entries
        // name are the only ones the datapath can have counted for it.
        let count = if names.is_empty() {
            self.images[gen]
                .as_ref()
                .and_then(|i| i.policy.values().map(|v| v.rule + 1).max())
                .unwrap_or(1)
        } else {
            names.len() as u32
        };
        for rule in 0..count {
            let idx = rule_stats_index(gen as u32, rule);
            let per_cpu = self
                .maps
                .rule_stats
                .get(&idx, 0)
                .map_err(map_err("RULE_STATS"))?;
            let mut sum = RuleCounters::default();
            per_cpu.iter().for_each(|s| sum.add(s));
            if sum == RuleCounters::default() {
                continue;
            }
            let name = names
                .get(rule as usize)
                .cloned()
                .unwrap_or_else(|| format!("rule#{rule}@unknown-revision"));
            self.retired.entry(name).or_default().merge(&sum);
            self.maps
                .rule_stats
                .set(idx, zero().map_err(DatapathError::Cpus)?, 0)
                .map_err(map_err("RULE_STATS"))?;
        }
        Ok(())
    }

    /// Counters per rule id: retired revisions plus both live generations.
    pub fn rule_counters(&mut self) -> Result<BTreeMap<String, RuleCounters>, DatapathError> {
        self.maps.flow_flush.run();
        let mut out = self.retired.clone();
        for gen in 0..2 {
            let names = self.image(gen)?.rules.clone();
            for (rule, name) in names.iter().enumerate() {
                let idx = rule_stats_index(gen as u32, rule as u32);
                let per_cpu = self
                    .maps
                    .rule_stats
                    .get(&idx, 0)
                    .map_err(map_err("RULE_STATS"))?;
                let entry = out.entry(name.clone()).or_default();
                per_cpu.iter().for_each(|s| entry.add(s));
            }
        }
        Ok(out)
    }

    /// Counters of the endpoint in `slot`, summed over CPUs (`last_hit_ns` is the maximum).
    pub fn endpoint_stats(&self, slot: u32) -> Result<EndpointStats, DatapathError> {
        self.maps.flow_flush.run();
        let per_cpu = self
            .maps
            .ep_stats
            .get(&slot, 0)
            .map_err(map_err("EP_STATS"))?;
        let mut t = EndpointStats::default();
        for s in per_cpu.iter() {
            for d in 0..2 {
                t.allow_packets[d] += s.allow_packets[d];
                t.allow_bytes[d] += s.allow_bytes[d];
                t.deny_packets[d] += s.deny_packets[d];
                t.deny_bytes[d] += s.deny_bytes[d];
                t.monitor_packets[d] += s.monitor_packets[d];
            }
            t.spoof_drops += s.spoof_drops;
            t.events_suppressed += s.events_suppressed;
            t.last_hit_ns = t.last_hit_ns.max(s.last_hit_ns);
        }
        Ok(t)
    }

    /// Entries the active generation holds, per table.
    pub fn occupancy(&mut self) -> Result<Occupancy, DatapathError> {
        let gen = self.config()?.generation() as usize;
        let img = self.image(gen)?;
        Ok(Occupancy {
            endpoints: img.endpoints.len(),
            addresses: img.addrs.len(),
            ipcache: img.ipcache.len(),
            port_classes: img.port_class.len(),
            policy: img.policy.len(),
            rules: img.rules.len(),
        })
    }

    /// Number of live conntrack entries (walks the map: for metrics, not per packet).
    pub fn conntrack_entries(&self) -> usize {
        self.maps.conntrack.keys().filter(|k| k.is_ok()).count()
    }
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}
