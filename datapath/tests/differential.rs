//! Differential test: the eBPF program's verdict on random packets against random tables
//! equals the plain-Rust model `TableIndex::decide` (no verdict: the bootstrap posture).
//!
//! Seeded and reproducible: `BULKHEAD_DIFF_SEED=<n>` reruns a printed seed,
//! `BULKHEAD_DIFF_SETS` / `BULKHEAD_DIFF_PACKETS` scale the run. Needs root and bpffs.
mod packets;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Instant;

use bulkhead_abi::model::{EndpointTable, FlowQuery, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::*;
use bulkhead_datapath::{Datapath, Hook};
use packets::*;

const PASS: i32 = -1;
const DROP: i32 = 2;
const REDIRECT: i32 = 7;
const IFINDEX: u32 = 1;
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0xee, 0xee];
const ENDPOINTS: usize = 3;
const IDENTITIES: u32 = 8;

/// SplitMix64: small, seedable, good enough to draw tables and packets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.next() as usize % xs.len()]
    }
}

struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn endpoint(i: usize, flags: u32) -> EndpointTable {
    EndpointTable {
        id: format!("vm{i}/52:54:00:00:01:{i:02x}"),
        mac: [0x52, 0x54, 0, 0, 1, i as u8],
        addrs: vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + i as u8)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10 + i as u16)),
        ],
        flags,
    }
}

fn mask(addr: u128, bits: u32) -> u128 {
    if bits == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - bits))
    }
}

/// Non-overlapping random ranges in `lo..=hi`, each at most `width` wide.
fn ranges(rng: &mut Rng, kind: u32, n: usize, lo: u32, hi: u32, width: u32) -> Vec<PortClassRange> {
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    while cuts.len() < n {
        cuts.insert(rng.range(u64::from(lo), u64::from(hi)) as u32);
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut out = Vec::new();
    for (i, &first) in cuts.iter().enumerate() {
        let limit = cuts.get(i + 1).map_or(hi, |next| next - 1);
        let last = (first + rng.range(0, u64::from(width)) as u32).min(limit);
        out.push(PortClassRange {
            kind,
            first: first as u16,
            last: last as u16,
            class: rng.range(1, 4) as u32,
        });
    }
    out
}

fn random_tables(rng: &mut Rng) -> HostTables {
    let mut t = HostTables {
        rules: (0..20).map(|r| format!("rule-{r}")).collect(),
        ..Default::default()
    };
    for i in 0..ENDPOINTS {
        let flags = if rng.chance(15) { EP_MONITOR } else { 0 }
            | if rng.chance(20) { EP_INFRA_SERVER } else { 0 };
        t.endpoints.push(endpoint(i, flags));
    }
    // The two defaults (the contract says they should exist, but either may be missing),
    // then random prefixes.
    let identity = |rng: &mut Rng| rng.range(0, u64::from(IDENTITIES)) as u32;
    if rng.chance(75) {
        t.ipcache.push(IpcacheEntry {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix_len: 0,
            identity: identity(rng),
        });
    }
    if rng.chance(75) {
        t.ipcache.push(IpcacheEntry {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix_len: 0,
            identity: identity(rng),
        });
    }
    // IPv6 prefixes that cover the v4-mapped space the datapath keys IPv4 in: a short
    // all-zero one, and one inside ::ffff:10.0.0.0/104.
    if rng.chance(20) {
        t.ipcache.push(IpcacheEntry {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix_len: rng.range(1, 96) as u8,
            identity: identity(rng),
        });
    }
    if rng.chance(20) {
        let len = rng.range(104, 128) as u32;
        let a = mask(
            u128::from(Ipv4Addr::new(10, 0, 0, 0).to_ipv6_mapped()) | u128::from(rng.next() as u16),
            len,
        );
        t.ipcache.push(IpcacheEntry {
            addr: IpAddr::V6(a.into()),
            prefix_len: len as u8,
            identity: identity(rng),
        });
    }
    let mut seen = BTreeSet::new();
    for _ in 0..rng.range(3, 10) {
        // Nested prefixes are likely: a few /8 bases, random lengths.
        let base = u32::from_be_bytes([10, *rng.pick(&[0u8, 1, 2]), 0, 0]);
        let len = rng.range(8, 32) as u32;
        let addr = base | (rng.next() as u32 & 0x0003_ffff);
        let addr = if len == 0 {
            0
        } else {
            addr & (u32::MAX << (32 - len))
        };
        if seen.insert((4, u128::from(addr), len)) {
            t.ipcache.push(IpcacheEntry {
                addr: IpAddr::V4(addr.into()),
                prefix_len: len as u8,
                identity: identity(rng),
            });
        }
    }
    for _ in 0..rng.range(3, 10) {
        let base = u128::from(Ipv6Addr::new(
            0x2001,
            0xdb8,
            *rng.pick(&[0xau16, 0xb]),
            0,
            0,
            0,
            0,
            0,
        ));
        let len = rng.range(32, 128) as u32;
        let addr = base | (u128::from(rng.next() as u16) << 64) | u128::from(rng.next() as u16);
        let addr = mask(addr, len);
        if seen.insert((6, addr, len)) {
            t.ipcache.push(IpcacheEntry {
                addr: IpAddr::V6(addr.into()),
                prefix_len: len as u8,
                identity: identity(rng),
            });
        }
    }
    let n = rng.range(2, 6) as usize;
    t.port_classes
        .extend(ranges(rng, PORT_KIND_L4, n, 1, 65535, 1500));
    // ICMP: type << 8 | code, around the echo types (0, 8, 128, 129).
    for ty in [0u32, 8, 128, 129] {
        if rng.chance(60) {
            let first = ty << 8;
            t.port_classes.push(PortClassRange {
                kind: PORT_KIND_ICMP,
                first: first as u16,
                last: (first + rng.range(0, 3) as u32) as u16,
                class: rng.range(1, 4) as u32,
            });
        }
    }
    // Policy: per endpoint and direction, a level-1 entry for some identities (always
    // considered for IDENTITY_ANY), refined by protocol and by class.
    let verdict = |rng: &mut Rng, refine: bool| {
        let action = *rng.pick(&[
            ACTION_ALLOW,
            ACTION_ALLOW,
            ACTION_ALLOW,
            ACTION_DENY,
            ACTION_DENY,
            ACTION_MONITOR,
            ACTION_REJECT,
        ]);
        let mut flags = if rng.chance(10) { VERDICT_LOG } else { 0 };
        if refine {
            flags |= VERDICT_REFINE;
        }
        Verdict::new(action, flags, rng.range(0, 19) as u32)
    };
    let mut policy: HashMap<PolicyKey, Verdict> = HashMap::new();
    for slot in 0..ENDPOINTS as u32 {
        if rng.chance(10) {
            continue; // no policy at all: bootstrap posture
        }
        for dir in [DIR_EGRESS, DIR_INGRESS] {
            for id in 0..=IDENTITIES {
                if !rng.chance(if id == IDENTITY_ANY { 85 } else { 45 }) {
                    continue;
                }
                let l1_refine = rng.chance(70);
                let v1 = verdict(rng, l1_refine);
                policy.insert(PolicyKey::new(0, slot, dir, id, PROTO_ANY, 0), v1);
                // Entries below a non-refining level must be ignored: add some anyway.
                if !l1_refine && !rng.chance(20) {
                    continue;
                }
                for proto in [6u8, 17, 1, 58] {
                    if !rng.chance(60) {
                        continue;
                    }
                    let l2_refine = rng.chance(60);
                    let v2 = verdict(rng, l2_refine);
                    policy.insert(PolicyKey::new(0, slot, dir, id, proto, 0), v2);
                    if !l2_refine && !rng.chance(20) {
                        continue;
                    }
                    for class in 1..=4 {
                        if rng.chance(50) {
                            let refine3 = rng.chance(10);
                            let v3 = verdict(rng, refine3);
                            policy.insert(PolicyKey::new(0, slot, dir, id, proto, class), v3);
                        }
                    }
                }
            }
        }
    }
    t.policy = policy.into_iter().collect();
    t.policy.sort_by_key(|(k, _)| *k);
    t
}

/// An address near one of the table's prefixes of the family (inside or just outside), or
/// anywhere.
fn peer(rng: &mut Rng, t: &HostTables, v6: bool) -> IpAddr {
    let pool: Vec<&IpcacheEntry> = t
        .ipcache
        .iter()
        .filter(|e| e.addr.is_ipv6() == v6 && e.prefix_len > 0)
        .collect();
    let width = if v6 { 128 } else { 32 };
    let (mut a, len) = if pool.is_empty() || rng.chance(10) {
        (u128::from(rng.next()) << 64 | u128::from(rng.next()), 0)
    } else {
        let e = rng.pick(&pool);
        let a = match e.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        (a, u32::from(e.prefix_len))
    };
    // Random host bits below the prefix.
    if len < width {
        let host = u128::from(rng.next()) << 64 | u128::from(rng.next());
        a = mask(a << (128 - width), len) >> (128 - width)
            | (host & (u128::MAX >> (128 - (width - len))));
    }
    // Sometimes step just outside: flip one of the last few prefix bits.
    if len > 0 && rng.chance(30) {
        let bit = rng.range(0, u64::from(len.min(4) - 1)) as u32;
        a ^= 1u128 << (width - len + bit);
    }
    if v6 {
        let mut x = Ipv6Addr::from(a);
        // Never a v4-mapped address (the datapath keys IPv4 that way).
        if x.to_ipv4_mapped().is_some() {
            x = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        }
        IpAddr::V6(x)
    } else {
        IpAddr::V4(Ipv4Addr::from(a as u32))
    }
}

#[derive(Debug)]
struct Case {
    dir: u8,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
    sport: u16,
}

fn frame(c: &Case, vm_mac: [u8; 6]) -> Vec<u8> {
    let l4 = match c.proto {
        6 => tcp(c.sport, c.port, 1000, 0, SYN),
        17 => udp(c.sport, c.port, b"diff"),
        _ => {
            let id = c.sport.to_be_bytes();
            icmp(
                (c.port >> 8) as u8,
                c.port as u8,
                [id[0], id[1], 0, 1],
                b"diff",
            )
        }
    };
    let (smac, dmac) = if c.dir == DIR_EGRESS {
        (vm_mac, PEER_MAC)
    } else {
        (PEER_MAC, vm_mac)
    };
    match (c.src, c.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => v4(smac, dmac, s.octets(), d.octets(), c.proto, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => v6(smac, dmac, s.octets(), d.octets(), c.proto, l4),
        _ => unreachable!(),
    }
}

/// What the program must return for the model's verdict.
fn expected(t: &HostTables, slot: usize, bootstrap: u8, v: Option<Verdict>, c: &Case) -> i32 {
    let Some(v) = v else {
        return if bootstrap == BOOTSTRAP_ALLOW {
            PASS
        } else {
            DROP
        };
    };
    let monitor_ep = t.endpoints[slot].flags & EP_MONITOR != 0;
    match v.action {
        ACTION_ALLOW | ACTION_MONITOR => PASS,
        ACTION_DENY | ACTION_REJECT if monitor_ep => PASS,
        // A payload-less SYN is answered in place with a RST, anything else with ICMP
        // "administratively prohibited" — but never an ICMP error or a packet to a
        // multicast or broadcast address.
        ACTION_REJECT if c.proto == 6 || icmp_may_answer(c) => REDIRECT,
        _ => DROP,
    }
}

fn icmp_may_answer(c: &Case) -> bool {
    let icmp_type = (c.port >> 8) as u8;
    let error = match c.proto {
        1 => matches!(icmp_type, 3 | 11 | 12),
        58 => matches!(icmp_type, 1..=4),
        _ => false,
    };
    let group = match c.dst {
        IpAddr::V4(a) => a.octets()[0] >= 224 || a.is_unspecified(),
        IpAddr::V6(a) => a.is_multicast(),
    };
    !error && !group
}

#[test]
fn program_verdicts_equal_the_model() {
    let name = "differential";
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/sys/fs/bpf").exists() {
        eprintln!("SKIPPED {name}: needs root and bpffs at /sys/fs/bpf");
        return;
    }
    let seed = env_u64("BULKHEAD_DIFF_SEED", 0x5eed_b01d_2026);
    let sets = env_u64("BULKHEAD_DIFF_SETS", 30);
    let per_set = env_u64("BULKHEAD_DIFF_PACKETS", 200);
    eprintln!("differential: seed {seed} (BULKHEAD_DIFF_SEED={seed}), {sets} table sets x {per_set} packets");
    let root = PinRoot(PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-test-{name}-{}",
        std::process::id()
    )));
    let mut dp = Datapath::load(&root.0).expect("load datapath");
    let mut tables = dp.tables().expect("tables");
    let mut rng = Rng(seed);
    let mut sport: u16 = 1024;
    let started = Instant::now();
    let (mut total, mut failures) = (0u64, Vec::new());
    let mut outcomes: HashMap<&str, u64> = HashMap::new();
    for set in 0..sets {
        let t = random_tables(&mut rng);
        let idx = t.index();
        let bootstrap = if rng.chance(50) {
            BOOTSTRAP_ALLOW
        } else {
            BOOTSTRAP_DENY
        };
        tables.set_posture(bootstrap, 0).unwrap();
        // Each endpoint in turn on the interface the test runs on; the others elsewhere.
        for slot in 0..ENDPOINTS {
            let bindings: HashMap<String, u32> = t
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    (
                        e.id.clone(),
                        if i == slot { IFINDEX } else { 1000 + i as u32 },
                    )
                })
                .collect();
            tables.apply(&t, &bindings).expect("apply");
            let ep = &t.endpoints[slot];
            let n =
                per_set / ENDPOINTS as u64 + u64::from((slot as u64) < per_set % ENDPOINTS as u64);
            for case_no in 0..n {
                let v6 = rng.chance(50);
                let dir = if rng.chance(50) {
                    DIR_EGRESS
                } else {
                    DIR_INGRESS
                };
                let proto = *rng.pick(&[6u8, 6, 17, 17, 1]);
                let proto = if v6 && proto == 1 { 58 } else { proto };
                let port = match proto {
                    6 | 17 => {
                        let l4: Vec<&PortClassRange> = t
                            .port_classes
                            .iter()
                            .filter(|r| r.kind == PORT_KIND_L4)
                            .collect();
                        if !l4.is_empty() && rng.chance(60) {
                            let r = rng.pick(&l4);
                            rng.range(u64::from(r.first), u64::from(r.last)) as u16
                        } else {
                            rng.range(1, 65535) as u16
                        }
                    }
                    1 => u16::from(*rng.pick(&[8u8, 8, 0])) << 8,
                    _ => u16::from(*rng.pick(&[128u8, 128, 129])) << 8,
                };
                let peer = peer(&mut rng, &t, v6);
                let own = ep.addrs[usize::from(v6)];
                let (src, dst) = if dir == DIR_EGRESS {
                    (own, peer)
                } else {
                    (peer, own)
                };
                sport = sport
                    .checked_add(1)
                    .expect("more packets than source ports");
                let c = Case {
                    dir,
                    src,
                    dst,
                    proto,
                    port,
                    sport,
                };
                let q = FlowQuery {
                    slot: slot as u32,
                    direction: dir,
                    peer,
                    proto,
                    port,
                };
                let model = idx.decide(&q);
                let want = expected(&t, slot, bootstrap, model, &c);
                let hook = if dir == DIR_EGRESS {
                    Hook::FromVm
                } else {
                    Hook::ToVm
                };
                let got = dp
                    .test_run(hook, &frame(&c, ep.mac), IFINDEX, 0, 1)
                    .expect("test run")
                    .action;
                total += 1;
                *outcomes
                    .entry(match want {
                        PASS => "pass",
                        DROP => "drop",
                        _ => "reject",
                    })
                    .or_default() += 1;
                *outcomes
                    .entry(if model.is_none() {
                        "bootstrap"
                    } else {
                        "policy"
                    })
                    .or_default() += 1;
                if got != want {
                    failures.push(format!(
                        "seed {seed} set {set} endpoint {slot} case {case_no}: {c:?} \
                         identity {} class {} model {model:?} (bootstrap {bootstrap}, \
                         endpoint flags {:#x}) want {want} got {got}",
                        idx.identity(&peer),
                        idx.port_class(proto, port),
                        ep.flags
                    ));
                }
            }
        }
    }
    eprintln!(
        "differential: {total} packets in {:?}, outcomes {outcomes:?}, {} mismatches",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} verdicts differ from the model; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(tables);
    drop(dp);
    drop(root);
}
