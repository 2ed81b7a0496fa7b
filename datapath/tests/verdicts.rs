//! The datapath programs loaded into this kernel and run on crafted packets
//! (`BPF_PROG_TEST_RUN`). Needs root and bpffs; skips with a message otherwise.
//!
//! The first tests write raw maps; the rest install a [`HostTables`] through
//! [`Tables::apply`] (see `base_tables`) and cover every per-packet behaviour.
mod packets;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};

use bulkhead_abi::model::{EndpointTable, FlowQuery, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::*;
use bulkhead_datapath::events::EventReader;
use bulkhead_datapath::{Datapath, FlowCountFlush, Hook, Maps, Tables};
use etherparse::PacketBuilder;
use packets::*;

const TC_ACT_SHOT: i32 = 2;
const PASS: i32 = -1;
const IFINDEX: u32 = 1; // loopback: BPF_PROG_TEST_RUN runs the skb on it
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

/// A pin directory of this test's own, removed on drop (even when the test fails).
struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str) -> Option<(PinRoot, Datapath, Maps)> {
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/sys/fs/bpf").exists() {
        eprintln!("SKIPPED {name}: needs root and bpffs at /sys/fs/bpf");
        return None;
    }
    let root = PinRoot(PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-test-{name}-{}",
        std::process::id()
    )));
    let mut dp = Datapath::load(&root.0).expect("load datapath");
    let maps = dp.maps().expect("maps");
    Some((root, dp, maps))
}

fn tcp_syn(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(40000, dport, 1000, 64240)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("build packet");
    out
}

/// One endpoint (slot 0, ifindex 1, 192.0.2.10) in generation 0 whose ingress allows TCP/5432
/// from 10.0.0.0/8 (identity 2) and denies everything else.
fn install_policy(m: &mut Maps) {
    let gen = 0;
    m.endpoints
        .insert(
            &EndpointKey {
                gen,
                ifindex: IFINDEX,
            },
            &EndpointInfo {
                slot: 0,
                flags: 0,
                mac: VM_MAC,
                _pad: [0; 2],
            },
            0,
        )
        .unwrap();
    m.ep_addrs
        .insert(
            &EndpointAddrKey {
                gen,
                slot: 0,
                addr: v4_mapped([192, 0, 2, 10]),
            },
            &1,
            0,
        )
        .unwrap();
    let prefix = aya::maps::lpm_trie::Key::new(
        IPCACHE_GEN_BITS + 96 + 8,
        IpcacheKey {
            gen,
            addr: v4_mapped([10, 0, 0, 0]),
        },
    );
    m.ipcache.insert(&prefix, &2, 0).unwrap();
    m.port_class
        .set(port_class_index(gen, PORT_KIND_L4, 5432), &1, 0)
        .unwrap();
    let refine = Verdict::new(ACTION_DENY, VERDICT_REFINE, RULE_DEFAULT);
    for dir in [DIR_INGRESS, DIR_EGRESS] {
        m.policy
            .insert(
                &PolicyKey::new(gen, 0, dir, IDENTITY_ANY, PROTO_ANY, 0),
                &Verdict::new(ACTION_DENY, 0, RULE_DEFAULT),
                0,
            )
            .unwrap();
    }
    m.policy
        .insert(
            &PolicyKey::new(gen, 0, DIR_INGRESS, 2, PROTO_ANY, 0),
            &refine,
            0,
        )
        .unwrap();
    m.policy
        .insert(&PolicyKey::new(gen, 0, DIR_INGRESS, 2, 6, 0), &refine, 0)
        .unwrap();
    m.policy
        .insert(
            &PolicyKey::new(gen, 0, DIR_INGRESS, 2, 6, 1),
            &Verdict::new(ACTION_ALLOW, 0, 7),
            0,
        )
        .unwrap();
}

#[test]
fn unknown_interface_gets_the_bootstrap_posture() {
    let Some((_root, dp, mut m)) = setup("bootstrap") else {
        return;
    };
    let syn = tcp_syn(PEER_MAC, VM_MAC, [10, 1, 1, 1], [192, 0, 2, 10], 5432);
    let before = m.stat(STAT_DROP_BOOTSTRAP).unwrap();
    let r = dp.test_run(Hook::ToVm, &syn, IFINDEX, 0, 1).unwrap();
    assert_eq!(r.action, TC_ACT_SHOT, "zeroed config must fail closed");
    assert_eq!(m.stat(STAT_DROP_BOOTSTRAP).unwrap(), before + 1);

    let cfg = Config {
        bootstrap: BOOTSTRAP_ALLOW,
        ..Config::default()
    };
    m.config.set(0, &cfg, 0).unwrap();
    let r = dp.test_run(Hook::ToVm, &syn, IFINDEX, 0, 1).unwrap();
    assert_eq!(r.action, PASS, "bootstrap allow passes");
}

#[test]
fn ingress_policy_allows_the_named_port_and_denies_the_rest() {
    let Some((_root, dp, mut m)) = setup("ingress") else {
        return;
    };
    install_policy(&mut m);
    let allowed = tcp_syn(PEER_MAC, VM_MAC, [10, 1, 1, 1], [192, 0, 2, 10], 5432);
    assert_eq!(
        dp.test_run(Hook::ToVm, &allowed, IFINDEX, 0, 1)
            .unwrap()
            .action,
        PASS
    );
    let other_port = tcp_syn(PEER_MAC, VM_MAC, [10, 1, 1, 2], [192, 0, 2, 10], 22);
    assert_eq!(
        dp.test_run(Hook::ToVm, &other_port, IFINDEX, 0, 1)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    let other_peer = tcp_syn(PEER_MAC, VM_MAC, [172, 16, 0, 1], [192, 0, 2, 10], 5432);
    assert_eq!(
        dp.test_run(Hook::ToVm, &other_peer, IFINDEX, 0, 1)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    // The reply of the allowed flow passes the VM's egress though egress denies everything:
    // conntrack, not rules.
    let b = PacketBuilder::ethernet2(VM_MAC, PEER_MAC)
        .ipv4([192, 0, 2, 10], [10, 1, 1, 1], 64)
        .tcp(5432, 40000, 5000, 64240)
        .syn()
        .ack(1001);
    let mut reply = Vec::new();
    b.write(&mut reply, &[]).unwrap();
    assert_eq!(
        dp.test_run(Hook::FromVm, &reply, IFINDEX, 0, 1)
            .unwrap()
            .action,
        PASS
    );
    assert!(m.stat(STAT_CT_HIT).unwrap() >= 1);
}

#[test]
fn vm_cannot_send_from_a_foreign_mac_or_address() {
    let Some((_root, dp, mut m)) = setup("spoof") else {
        return;
    };
    install_policy(&mut m);
    let foreign_mac = tcp_syn(
        [2, 0, 0, 0, 0, 9],
        PEER_MAC,
        [192, 0, 2, 10],
        [10, 1, 1, 1],
        80,
    );
    assert_eq!(
        dp.test_run(Hook::FromVm, &foreign_mac, IFINDEX, 0, 1)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    let foreign_ip = tcp_syn(VM_MAC, PEER_MAC, [192, 0, 2, 99], [10, 1, 1, 1], 80);
    assert_eq!(
        dp.test_run(Hook::FromVm, &foreign_ip, IFINDEX, 0, 1)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    assert!(m.stat(STAT_DROP_SPOOF).unwrap() >= 2);
    let _ = Ipv4Addr::LOCALHOST;
}

// ---- Tables-based tests -------------------------------------------------------------------

const TC_ACT_REDIRECT: i32 = 7;
const VM4: [u8; 4] = [192, 0, 2, 10];
const VM6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const VM_LL: [u8; 16] = [
    0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0, 0, 1,
];
const EP_ID: &str = "vm0/52:54:00:00:00:01";

const WORLD: u32 = 1;
/// 10.0.0.0/8, 2001:db8:a::/48: TCP 5432 and 8000-8099, any UDP port, ICMP echo.
const ID_NET: u32 = 2;
/// 10.1.0.0/16, 2001:db8:a:1::/64 (inside ID_NET's prefix): denied outright.
const ID_SUBNET: u32 = 3;
/// 192.168.0.0/16, 2001:db8:c::/48: any protocol allowed.
const ID_TRUSTED: u32 = 4;
/// 198.51.100.0/24, 2001:db8:5::/48: allowed with the log flag.
const ID_LOGGED: u32 = 5;
/// 198.51.101.0/24, 2001:db8:6::/48: monitor.
const ID_MONITORED: u32 = 6;
/// 198.51.102.0/24, 2001:db8:7::/48: reject (both directions).
const ID_REJECTED: u32 = 7;

const C_DB: u32 = 1;
const C_RANGE: u32 = 2;
const C_ECHO: u32 = 3;
const C_HTTPS: u32 = 4;
const C_DNS: u32 = 5;

const R_DB: u32 = 1;
const R_RANGE: u32 = 2;
const R_UDP: u32 = 3;
const R_ECHO: u32 = 4;
const R_SUBNET: u32 = 5;
const R_TRUSTED: u32 = 6;
const R_ANY_HTTPS: u32 = 7;
const R_LOGGED: u32 = 8;
const R_MONITOR: u32 = 9;
const R_REJECT: u32 = 10;
const R_OUT_HTTPS: u32 = 11;
const R_OUT_DNS: u32 = 12;
const R_OUT_ECHO: u32 = 13;

fn a6(prefix: [u16; 4], last: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    for (i, w) in prefix.iter().enumerate() {
        a[i * 2..i * 2 + 2].copy_from_slice(&w.to_be_bytes());
    }
    a[14..16].copy_from_slice(&last.to_be_bytes());
    a
}

fn ipc(addr: &str, prefix_len: u8, identity: u32) -> IpcacheEntry {
    IpcacheEntry {
        addr: addr.parse().unwrap(),
        prefix_len,
        identity,
    }
}

fn pk(dir: u8, id: u32, proto: u8, class: u32) -> PolicyKey {
    PolicyKey::new(0, 0, dir, id, proto, class)
}

/// One endpoint (VM_MAC, 192.0.2.10, 2001:db8:1::10) and a policy exercising every level.
fn base_tables(flags: u32) -> HostTables {
    use ACTION_ALLOW as A;
    use ACTION_DENY as D;
    let v = Verdict::new;
    let r = VERDICT_REFINE;
    let (i, e) = (DIR_INGRESS, DIR_EGRESS);
    let mut policy = vec![
        (pk(i, ID_NET, 0, 0), v(D, r, 0)),
        (pk(i, ID_NET, 6, 0), v(D, r, 0)),
        (pk(i, ID_NET, 6, C_DB), v(A, 0, R_DB)),
        (pk(i, ID_NET, 6, C_RANGE), v(A, 0, R_RANGE)),
        (pk(i, ID_NET, 17, 0), v(A, 0, R_UDP)),
        (pk(i, ID_NET, 1, 0), v(D, r, 0)),
        (pk(i, ID_NET, 1, C_ECHO), v(A, 0, R_ECHO)),
        (pk(i, ID_NET, 58, 0), v(D, r, 0)),
        (pk(i, ID_NET, 58, C_ECHO), v(A, 0, R_ECHO)),
        (pk(i, ID_SUBNET, 0, 0), v(D, 0, R_SUBNET)),
        (pk(i, ID_TRUSTED, 0, 0), v(A, 0, R_TRUSTED)),
        (pk(i, ID_LOGGED, 0, 0), v(A, VERDICT_LOG, R_LOGGED)),
        (pk(i, ID_MONITORED, 0, 0), v(ACTION_MONITOR, 0, R_MONITOR)),
        (pk(i, ID_REJECTED, 0, 0), v(ACTION_REJECT, 0, R_REJECT)),
        (pk(i, IDENTITY_ANY, 0, 0), v(D, r, 0)),
        (pk(i, IDENTITY_ANY, 6, 0), v(D, r, 0)),
        (pk(i, IDENTITY_ANY, 6, C_HTTPS), v(A, 0, R_ANY_HTTPS)),
        (pk(e, ID_REJECTED, 0, 0), v(ACTION_REJECT, 0, R_REJECT)),
        (pk(e, IDENTITY_ANY, 0, 0), v(D, r, 0)),
        (pk(e, IDENTITY_ANY, 6, 0), v(D, r, 0)),
        (pk(e, IDENTITY_ANY, 6, C_HTTPS), v(A, 0, R_OUT_HTTPS)),
        (pk(e, IDENTITY_ANY, 17, 0), v(D, r, 0)),
        (pk(e, IDENTITY_ANY, 17, C_DNS), v(A, 0, R_OUT_DNS)),
        (pk(e, IDENTITY_ANY, 1, 0), v(D, r, 0)),
        (pk(e, IDENTITY_ANY, 1, C_ECHO), v(A, 0, R_OUT_ECHO)),
        (pk(e, IDENTITY_ANY, 58, 0), v(D, r, 0)),
        (pk(e, IDENTITY_ANY, 58, C_ECHO), v(A, 0, R_OUT_ECHO)),
    ];
    policy.sort_by_key(|(k, _)| *k);
    let l4 = |first, last, class| PortClassRange {
        kind: PORT_KIND_L4,
        first,
        last,
        class,
    };
    let ic = |t: u16, class| PortClassRange {
        kind: PORT_KIND_ICMP,
        first: t << 8,
        last: t << 8,
        class,
    };
    HostTables {
        endpoints: vec![EndpointTable {
            id: EP_ID.into(),
            mac: VM_MAC,
            addrs: vec![
                IpAddr::from(VM4),
                IpAddr::from(VM6),
                // Not needed for link-local (always the VM's own), listed anyway.
                IpAddr::from(VM_LL),
            ],
            flags,
        }],
        ipcache: vec![
            ipc("0.0.0.0", 0, WORLD),
            ipc("::", 0, WORLD),
            ipc("10.0.0.0", 8, ID_NET),
            ipc("2001:db8:a::", 48, ID_NET),
            ipc("10.1.0.0", 16, ID_SUBNET),
            ipc("2001:db8:a:1::", 64, ID_SUBNET),
            ipc("192.168.0.0", 16, ID_TRUSTED),
            ipc("2001:db8:c::", 48, ID_TRUSTED),
            ipc("198.51.100.0", 24, ID_LOGGED),
            ipc("2001:db8:5::", 48, ID_LOGGED),
            ipc("198.51.101.0", 24, ID_MONITORED),
            ipc("2001:db8:6::", 48, ID_MONITORED),
            ipc("198.51.102.0", 24, ID_REJECTED),
            ipc("2001:db8:7::", 48, ID_REJECTED),
        ]
        .into(),
        port_classes: vec![
            l4(53, 53, C_DNS),
            l4(443, 443, C_HTTPS),
            l4(5432, 5432, C_DB),
            l4(8000, 8099, C_RANGE),
            ic(8, C_ECHO),
            ic(128, C_ECHO),
        ],
        policy,
        rules: (0..=R_OUT_ECHO).map(|r| format!("r{r}")).collect(),
    }
}

fn bindings() -> HashMap<String, u32> {
    [(EP_ID.to_string(), IFINDEX)].into()
}

/// Source ports never used twice in a test binary: new flows are new to conntrack.
fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(20000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// Field order is drop order: map handles and programs before the pin directory.
struct Env {
    t: Tables,
    dp: Datapath,
    slot: u32,
    root: PinRoot,
}

fn env(name: &str) -> Option<Env> {
    env_with(name, base_tables(0))
}

fn env_with(name: &str, tables: HostTables) -> Option<Env> {
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/sys/fs/bpf").exists() {
        eprintln!("SKIPPED {name}: needs root and bpffs at /sys/fs/bpf");
        return None;
    }
    let root = PinRoot(PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-test-{name}-{}",
        std::process::id()
    )));
    let mut dp = Datapath::load(&root.0).expect("load datapath");
    let mut t = dp.tables().expect("tables");
    let report = t.apply(&tables, &bindings()).expect("apply");
    assert!(report.unbound.is_empty());
    let slot = report.slots[EP_ID];
    Some(Env { t, dp, slot, root })
}

impl Env {
    fn run(&self, hook: Hook, frame: &[u8]) -> i32 {
        self.dp.test_run(hook, frame, IFINDEX, 0, 1).unwrap().action
    }
    fn vm_receives(&self, frame: &[u8]) -> i32 {
        self.run(Hook::ToVm, frame)
    }
    fn vm_sends(&self, frame: &[u8]) -> i32 {
        self.run(Hook::FromVm, frame)
    }
    fn stat(&self, i: u32) -> u64 {
        self.t.maps().stat(i).unwrap()
    }
    fn apply(&mut self, tables: &HostTables) -> u32 {
        self.t.apply(tables, &bindings()).unwrap().epoch
    }
    fn ct(&self, key: &CtKey) -> Option<CtEntry> {
        self.t.maps().conntrack.get(key, 0).ok()
    }
    /// A TCP handshake opened by the VM, every segment passing.
    fn handshake(&self, out: impl Fn(u8) -> Vec<u8>, inn: impl Fn(u8) -> Vec<u8>) {
        assert_eq!(self.vm_sends(&out(SYN)), PASS);
        assert_eq!(self.vm_receives(&inn(SYN | ACK)), PASS);
        assert_eq!(self.vm_sends(&out(ACK)), PASS);
    }
    /// The endpoint's allowed packets (per direction) and allowed egress bytes, and the
    /// packets of rule `r11`.
    fn allowed(&mut self) -> [u64; 4] {
        let st = self.t.endpoint_stats(self.slot).unwrap();
        let rule = self.t.rule_counters().unwrap()["r11"].packets;
        [
            st.allow_packets[0],
            st.allow_packets[1],
            st.allow_bytes[0],
            rule,
        ]
    }
    /// What [`Env::allowed`] counted since `before`.
    fn allowed_since(&mut self, before: [u64; 4]) -> [u64; 4] {
        let now = self.allowed();
        [0, 1, 2, 3].map(|i| now[i] - before[i])
    }
    /// Counter deltas around `f`.
    fn delta<const N: usize>(&self, stats: [u32; N], f: impl FnOnce()) -> [u64; N] {
        let before = stats.map(|s| self.stat(s));
        f();
        let mut out = [0; N];
        for (i, s) in stats.iter().enumerate() {
            out[i] = self.stat(*s) - before[i];
        }
        out
    }
}

fn events(e: &mut Env) -> EventReader {
    EventReader::new(e.dp.events().expect("events"))
}

fn drain(r: &mut EventReader) -> Vec<FlowEvent> {
    let mut v = Vec::new();
    r.drain(|ev| v.push(ev));
    v
}

// Frames from a peer to the VM (`in*`) and from the VM to a peer (`out*`).
fn in4(src: [u8; 4], proto: u8, l4: Vec<u8>) -> Vec<u8> {
    v4(PEER_MAC, VM_MAC, src, VM4, proto, l4)
}
fn out4(dst: [u8; 4], proto: u8, l4: Vec<u8>) -> Vec<u8> {
    v4(VM_MAC, PEER_MAC, VM4, dst, proto, l4)
}
fn in6(src: [u8; 16], proto: u8, l4: Vec<u8>) -> Vec<u8> {
    v6(PEER_MAC, VM_MAC, src, VM6, proto, l4)
}
fn out6(dst: [u8; 16], proto: u8, l4: Vec<u8>) -> Vec<u8> {
    v6(VM_MAC, PEER_MAC, VM6, dst, proto, l4)
}
fn syn(dport: u16) -> Vec<u8> {
    tcp(port(), dport, 1000, 0, SYN)
}

fn ct_key(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, proto: u8) -> CtKey {
    let ((addr_a, port_a), (addr_b, port_b)) = if (src, sport) <= (dst, dport) {
        ((src, sport), (dst, dport))
    } else {
        ((dst, dport), (src, sport))
    };
    CtKey {
        ifindex: IFINDEX,
        addr_a,
        addr_b,
        port_a,
        port_b,
        proto,
        _pad: [0; 3],
    }
}

fn verdict_name(a: i32) -> &'static str {
    match a {
        PASS => "PASS",
        TC_ACT_SHOT => "DROP",
        TC_ACT_REDIRECT => "REDIRECT",
        _ => "?",
    }
}

#[test]
fn identity_prefix_and_policy_levels_v4_v6() {
    let Some(e) = env("levels") else {
        return;
    };
    let tables = base_tables(0);
    let idx = tables.index();
    let net6 = |l| a6([0x2001, 0xdb8, 0xa, 2], l);
    let sub6 = |l| a6([0x2001, 0xdb8, 0xa, 1], l);
    let trusted6 = |l| a6([0x2001, 0xdb8, 0xc, 0], l);
    let world6 = |l| a6([0x2001, 0xdb8, 0xff, 0], l);
    // (what, peer, proto, port, frame, expected)
    type Case = (&'static str, IpAddr, u8, u16, Vec<u8>, i32);
    let mut cases: Vec<Case> = Vec::new();
    let mut c4 = |what, src: [u8; 4], proto, dport: u16, l4: Vec<u8>, want| {
        cases.push((what, src.into(), proto, dport, in4(src, proto, l4), want))
    };
    c4(
        "/8 TCP 5432 (level 3)",
        [10, 2, 0, 1],
        6,
        5432,
        syn(5432),
        PASS,
    );
    c4(
        "/8 TCP 8050 (range)",
        [10, 2, 0, 1],
        6,
        8050,
        syn(8050),
        PASS,
    );
    c4(
        "/8 TCP 8000 (range start)",
        [10, 2, 0, 1],
        6,
        8000,
        syn(8000),
        PASS,
    );
    c4(
        "/8 TCP 8099 (range end)",
        [10, 2, 0, 1],
        6,
        8099,
        syn(8099),
        PASS,
    );
    c4(
        "/8 TCP 8100 (past range)",
        [10, 2, 0, 1],
        6,
        8100,
        syn(8100),
        TC_ACT_SHOT,
    );
    c4(
        "/8 TCP 22 (level-2 deny)",
        [10, 2, 0, 1],
        6,
        22,
        syn(22),
        TC_ACT_SHOT,
    );
    c4(
        "/8 UDP any port (level 2)",
        [10, 2, 0, 1],
        17,
        9999,
        udp(port(), 9999, b"x"),
        PASS,
    );
    c4(
        "/8 ICMP echo (level 3)",
        [10, 2, 0, 1],
        1,
        8 << 8,
        echo(8, port()),
        PASS,
    );
    c4(
        "/8 ICMP timestamp",
        [10, 2, 0, 1],
        1,
        13 << 8,
        icmp(13, 0, [0; 4], &[0; 12]),
        TC_ACT_SHOT,
    );
    c4(
        "/8 GRE (level-1 deny)",
        [10, 2, 0, 1],
        47,
        0,
        vec![0; 8],
        TC_ACT_SHOT,
    );
    c4(
        "/16 inside /8: longest prefix denies",
        [10, 1, 0, 1],
        6,
        5432,
        syn(5432),
        TC_ACT_SHOT,
    );
    c4(
        "trusted: any protocol (GRE)",
        [192, 168, 3, 4],
        47,
        0,
        vec![0; 8],
        PASS,
    );
    c4(
        "trusted: any TCP port",
        [192, 168, 3, 4],
        6,
        22,
        syn(22),
        PASS,
    );
    c4(
        "world: any-peer HTTPS",
        [203, 0, 113, 5],
        6,
        443,
        syn(443),
        PASS,
    );
    c4(
        "world: any-peer port 80 denied",
        [203, 0, 113, 5],
        6,
        80,
        syn(80),
        TC_ACT_SHOT,
    );
    c4(
        "/8 has entries: no any-peer fallback",
        [10, 5, 5, 5],
        6,
        443,
        syn(443),
        TC_ACT_SHOT,
    );
    let mut c6 = |what, src: [u8; 16], proto, dport: u16, l4: Vec<u8>, want| {
        cases.push((what, src.into(), proto, dport, in6(src, proto, l4), want))
    };
    c6("v6 /48 TCP 5432", net6(1), 6, 5432, syn(5432), PASS);
    c6("v6 /48 TCP 8042 (range)", net6(1), 6, 8042, syn(8042), PASS);
    c6("v6 /48 TCP 22", net6(1), 6, 22, syn(22), TC_ACT_SHOT);
    c6(
        "v6 /48 UDP any port",
        net6(1),
        17,
        1,
        udp(port(), 1, b"x"),
        PASS,
    );
    c6(
        "v6 /48 ICMPv6 echo",
        net6(1),
        58,
        128 << 8,
        echo(128, port()),
        PASS,
    );
    c6(
        "v6 /64 inside /48 denied",
        sub6(1),
        6,
        5432,
        syn(5432),
        TC_ACT_SHOT,
    );
    c6(
        "v6 trusted any protocol",
        trusted6(9),
        132,
        0,
        vec![0; 12],
        PASS,
    );
    c6("v6 world HTTPS", world6(9), 6, 443, syn(443), PASS);
    c6(
        "v6 world UDP denied",
        world6(9),
        17,
        443,
        udp(port(), 443, b""),
        TC_ACT_SHOT,
    );
    for (what, peer, proto, dport, frame, want) in &cases {
        let got = e.vm_receives(frame);
        assert_eq!(
            verdict_name(got),
            verdict_name(*want),
            "{what}: {peer} proto {proto} port {dport}"
        );
        // The model agrees with every expectation above.
        let q = FlowQuery {
            slot: 0,
            direction: DIR_INGRESS,
            peer: *peer,
            proto: *proto,
            port: *dport,
        };
        let model = idx.decide(&q).expect("endpoint has policy");
        assert_eq!(model.action == ACTION_ALLOW, *want == PASS, "model: {what}");
    }
    // Egress: HTTPS anywhere but the rejected identity, DNS, echo; nothing else.
    assert_eq!(e.vm_sends(&out4([203, 0, 113, 5], 6, syn(443))), PASS);
    assert_eq!(e.vm_sends(&out4([203, 0, 113, 5], 6, syn(80))), TC_ACT_SHOT);
    assert_eq!(
        e.vm_sends(&out6(world6(3), 17, udp(port(), 53, b"q"))),
        PASS
    );
    assert_eq!(
        e.vm_sends(&out6(world6(3), 17, udp(port(), 54, b"q"))),
        TC_ACT_SHOT
    );
}

#[test]
fn tcp_handshake_fast_path_and_close() {
    let Some(e) = env("tcp-ct") else {
        return;
    };
    let peer = [10, 2, 0, 7];
    let sp = port();
    let key = ct_key(v4_mapped(peer), sp, v4_mapped(VM4), 5432, 6);
    let seg_in = |flags| in4(peer, 6, tcp(sp, 5432, 1000, 5001, flags));
    let seg_out = |flags| out4(peer, 6, tcp(5432, sp, 5000, 1001, flags));

    let [created, pass_policy] = e.delta([STAT_CT_CREATED, STAT_PASS_POLICY], || {
        assert_eq!(e.vm_receives(&seg_in(SYN)), PASS)
    });
    assert_eq!((created, pass_policy), (1, 1));
    assert_eq!(e.ct(&key).unwrap().state, CT_TCP_SYN_SENT);

    // Egress policy allows no TCP to this peer: replies pass on conntrack alone, and the
    // policy is not consulted again (one lookup: STAT_CT_HIT, no STAT_PASS_POLICY).
    let [hit, policy] = e.delta([STAT_CT_HIT, STAT_PASS_POLICY], || {
        assert_eq!(e.vm_sends(&seg_out(SYN | ACK)), PASS);
    });
    assert_eq!((hit, policy), (1, 0));
    assert_eq!(e.ct(&key).unwrap().state, CT_TCP_SYN_RECV);
    let [hit, policy] = e.delta([STAT_CT_HIT, STAT_PASS_POLICY], || {
        assert_eq!(e.vm_receives(&seg_in(ACK)), PASS);
        assert_eq!(e.vm_receives(&seg_in(ACK | PSH)), PASS);
        assert_eq!(e.vm_sends(&seg_out(ACK | PSH)), PASS);
    });
    assert_eq!((hit, policy), (3, 0));
    let ent = e.ct(&key).unwrap();
    assert_eq!(ent.state, CT_TCP_ESTABLISHED);
    assert_eq!(ent.rule, R_DB);
    assert_eq!(ent.flags & CT_ORIG_EGRESS, 0, "originated by the peer");

    // FIN from both sides: closing; then a RST closes.
    assert_eq!(e.vm_sends(&seg_out(FIN | ACK)), PASS);
    assert_eq!(e.ct(&key).unwrap().state, CT_TCP_FIN_WAIT);
    assert_eq!(e.vm_receives(&seg_in(FIN | ACK)), PASS);
    assert_eq!(e.ct(&key).unwrap().state, CT_TCP_CLOSING);
    let [closed] = e.delta([STAT_CT_CLOSED], || {
        assert_eq!(e.vm_sends(&seg_out(RST)), PASS)
    });
    assert_eq!(closed, 1);
    assert_eq!(e.ct(&key).unwrap().state, CT_TCP_CLOSED);

    // A new SYN on the closed tuple is a new flow, judged by policy again.
    let [expired, pass_policy] = e.delta([STAT_CT_EXPIRED, STAT_PASS_POLICY], || {
        assert_eq!(e.vm_receives(&seg_in(SYN)), PASS);
    });
    assert_eq!((expired, pass_policy), (1, 1));
    assert_eq!(e.ct(&key).unwrap().state, CT_TCP_SYN_SENT);
    // RST straight from a fresh flow closes it too.
    let [closed] = e.delta([STAT_CT_CLOSED], || {
        assert_eq!(e.vm_receives(&seg_in(RST | ACK)), PASS)
    });
    assert_eq!(closed, 1);

    // A VM-originated flow: the peer's reply is not judged by ingress policy.
    let world = [203, 0, 113, 80];
    let sp = port();
    assert_eq!(e.vm_sends(&out4(world, 6, tcp(sp, 443, 1, 0, SYN))), PASS);
    let k = ct_key(v4_mapped(VM4), sp, v4_mapped(world), 443, 6);
    assert_ne!(e.ct(&k).unwrap().flags & CT_ORIG_EGRESS, 0);
    assert_eq!(
        e.vm_receives(&in4(world, 6, tcp(443, sp, 9, 2, SYN | ACK))),
        PASS
    );
    assert_eq!(e.ct(&k).unwrap().state, CT_TCP_SYN_RECV);
}

#[test]
fn tcp_without_syn_is_picked_up_mid_stream_or_judged() {
    let Some(e) = env("tcp-pickup") else {
        return;
    };
    // Documented (conntrack::initial_state): a non-SYN first segment of an allowed flow is a
    // mid-stream pickup (e.g. after eviction): tracked as established, flagged CT_PICKUP.
    let peer = [10, 2, 0, 8];
    let sp = port();
    let [pickup, created] = e.delta([STAT_CT_PICKUP, STAT_CT_CREATED], || {
        assert_eq!(e.vm_receives(&in4(peer, 6, tcp(sp, 5432, 7, 7, ACK))), PASS);
    });
    assert_eq!((pickup, created), (1, 1));
    let ent = e
        .ct(&ct_key(v4_mapped(peer), sp, v4_mapped(VM4), 5432, 6))
        .unwrap();
    assert_eq!(ent.state, CT_TCP_ESTABLISHED);
    assert_ne!(ent.flags & CT_PICKUP, 0);
    assert_eq!(e.vm_sends(&out4(peer, 6, tcp(5432, sp, 7, 8, ACK))), PASS);

    // Not allowed by policy: a non-SYN is judged and dropped like a SYN.
    let [policy, pickup] = e.delta([STAT_DROP_POLICY, STAT_CT_PICKUP], || {
        assert_eq!(
            e.vm_receives(&in4(peer, 6, tcp(port(), 22, 7, 7, ACK))),
            TC_ACT_SHOT
        );
    });
    assert_eq!((policy, pickup), (1, 0));

    // SYN+RST and SYN+FIN never open a flow, whatever the policy.
    for flags in [SYN | RST, SYN | FIN, SYN | FIN | ACK] {
        let [invalid] = e.delta([STAT_DROP_INVALID_TCP], || {
            assert_eq!(
                e.vm_receives(&in4(peer, 6, tcp(port(), 5432, 7, 0, flags))),
                TC_ACT_SHOT
            );
        });
        assert_eq!(invalid, 1, "flags {flags:#x}");
    }
    // A lone RST of an allowed tuple passes but opens nothing.
    let sp = port();
    let [created] = e.delta([STAT_CT_CREATED], || {
        assert_eq!(e.vm_receives(&in4(peer, 6, tcp(sp, 5432, 7, 0, RST))), PASS);
    });
    assert_eq!(created, 0);
    assert!(e
        .ct(&ct_key(v4_mapped(peer), sp, v4_mapped(VM4), 5432, 6))
        .is_none());
}

#[test]
fn udp_and_icmp_echo_replies_pass_on_conntrack() {
    let Some(e) = env("replies") else {
        return;
    };
    let dns4 = [203, 0, 113, 53];
    let dns6 = a6([0x2001, 0xdb8, 0xff, 0], 53);
    for (out, reply, other) in [
        (
            out4(dns4, 17, udp(31000, 53, b"q")),
            in4(dns4, 17, udp(53, 31000, b"a")),
            in4(dns4, 17, udp(53, 31001, b"a")),
        ),
        (
            out6(dns6, 17, udp(31000, 53, b"q")),
            in6(dns6, 17, udp(53, 31000, b"a")),
            in6(dns6, 17, udp(53, 31001, b"a")),
        ),
        (
            out4(dns4, 1, echo(8, 4242)),
            in4(dns4, 1, echo(0, 4242)),
            in4(dns4, 1, echo(0, 4243)),
        ),
        (
            out6(dns6, 58, echo(128, 4242)),
            in6(dns6, 58, echo(129, 4242)),
            in6(dns6, 58, echo(129, 4243)),
        ),
    ] {
        assert_eq!(e.vm_sends(&out), PASS);
        // Ingress policy allows nothing of this from the world: the reply passes on
        // conntrack, a packet of another flow is judged and dropped.
        let [hit] = e.delta([STAT_CT_HIT], || assert_eq!(e.vm_receives(&reply), PASS));
        assert_eq!(hit, 1);
        assert_eq!(e.vm_receives(&other), TC_ACT_SHOT);
    }
    let k = ct_key(v4_mapped(VM4), 31000, v4_mapped(dns4), 53, 17);
    assert_eq!(e.ct(&k).unwrap().state, CT_REPLIED);
}

#[test]
fn icmp_errors_quoting_tracked_flows_pass() {
    let Some(e) = env("icmp-errors") else {
        return;
    };
    let router4 = [203, 0, 113, 1];
    let peer4 = [203, 0, 113, 53];
    let router6 = a6([0x2001, 0xdb8, 0xff, 0], 1);
    let peer6 = a6([0x2001, 0xdb8, 0xff, 0], 53);
    assert_eq!(e.vm_sends(&out4(peer4, 17, udp(32000, 53, b"q"))), PASS);
    assert_eq!(e.vm_sends(&out6(peer6, 17, udp(32000, 53, b"q"))), PASS);
    let quote4 = |sport| ipv4_packet(VM4, peer4, 17, &[], 0, 9, udp(sport, 53, b""));
    let quote6 = |sport| ipv6_packet(VM6, peer6, 17, &[], 17, udp(sport, 53, b""), false);
    // Destination unreachable (port) from a router quoting the tracked flow.
    let known4 = in4(router4, 1, icmp(3, 3, [0; 4], &quote4(32000)));
    let unknown4 = in4(router4, 1, icmp(3, 3, [0; 4], &quote4(32001)));
    let known6 = in6(router6, 58, icmp(1, 4, [0; 4], &quote6(32000)));
    let unknown6 = in6(router6, 58, icmp(1, 4, [0; 4], &quote6(32001)));
    // Time exceeded / packet too big too.
    let ttl4 = in4(router4, 1, icmp(11, 0, [0; 4], &quote4(32000)));
    let ptb6 = in6(router6, 58, icmp(2, 0, [0, 0, 5, 0], &quote6(32000)));
    let [hit, policy] = e.delta([STAT_CT_HIT, STAT_PASS_POLICY], || {
        for f in [&known4, &known6, &ttl4, &ptb6] {
            assert_eq!(e.vm_receives(f), PASS);
        }
    });
    assert_eq!((hit, policy), (4, 0));
    // Quoting an unknown flow: judged as ICMP from the world, which ingress denies.
    let [denied] = e.delta([STAT_DROP_POLICY], || {
        assert_eq!(e.vm_receives(&unknown4), TC_ACT_SHOT);
        assert_eq!(e.vm_receives(&unknown6), TC_ACT_SHOT);
    });
    assert_eq!(denied, 2);
    // Truncated quote: judged by policy too.
    let short = in4(router4, 1, icmp(3, 3, [0; 4], &quote4(32000)[..10]));
    assert_eq!(e.vm_receives(&short), TC_ACT_SHOT);
}

#[test]
fn ipv4_options_and_ipv6_extension_headers() {
    let Some(e) = env("ext-headers") else {
        return;
    };
    let net4 = [10, 2, 0, 9];
    let opt4 = |opts: &[u8], dport| {
        eth(
            PEER_MAC,
            VM_MAC,
            ETH_P_IP,
            &ipv4_packet(net4, VM4, 6, opts, 0, 3, syn(dport)),
        )
    };
    // IPv4 options are skipped via IHL and the packet judged on its real ports.
    let nops = [1, 1, 1, 1];
    let record_route = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(e.vm_receives(&opt4(&nops, 5432)), PASS);
    assert_eq!(e.vm_receives(&opt4(&record_route, 5432)), PASS);
    assert_eq!(e.vm_receives(&opt4(&nops, 22)), TC_ACT_SHOT);
    assert_eq!(e.vm_receives(&opt4(&[1; 40], 8001)), PASS, "maximum IHL");

    let net6 = a6([0x2001, 0xdb8, 0xa, 2], 9);
    let trusted6 = a6([0x2001, 0xdb8, 0xc, 0], 9);
    let x6 = |src, first: u8, ext: Vec<u8>, proto: u8, l4: Vec<u8>| {
        eth(
            PEER_MAC,
            VM_MAC,
            ETH_P_IPV6,
            &ipv6_packet(src, VM6, first, &ext, proto, l4, false),
        )
    };
    let hbh = ext8(6, 0, 0);
    let dst_opts = ext8(6, 60, 0);
    let srh = ext8(6, 43, 4);
    let rh2 = ext8(6, 43, 2);
    let rh0 = ext8(6, 43, 0);
    let ah = vec![6, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
    let chained = [ext8(60, 0, 0), ext8(43, 60, 0), ext8(6, 43, 4)].concat();
    for (what, first, ext) in [
        ("hop-by-hop", 0, &hbh),
        ("destination options", 60, &dst_opts),
        ("segment routing header", 43, &srh),
        ("routing type 2", 43, &rh2),
        ("authentication header", 51, &ah),
        ("hop-by-hop, dest opts, routing", 0, &chained),
    ] {
        // Walked to TCP and judged on the real port.
        assert_eq!(
            e.vm_receives(&x6(net6, first, ext.clone(), 6, syn(5432))),
            PASS,
            "{what}"
        );
        let [policy] = e.delta([STAT_DROP_POLICY], || {
            assert_eq!(
                e.vm_receives(&x6(net6, first, ext.clone(), 6, syn(22))),
                TC_ACT_SHOT
            );
        });
        assert_eq!(policy, 1, "{what}: denied by policy on the real port");
    }
    // Routing header type 0 (source routing): dropped.
    let [ext] = e.delta([STAT_DROP_IPV6_EXT], || {
        assert_eq!(e.vm_receives(&x6(net6, 43, rh0, 6, syn(5432))), TC_ACT_SHOT);
    });
    assert_eq!(ext, 1);
    // More than six extension headers: dropped.
    let seven: Vec<u8> = (0..7)
        .flat_map(|i| ext8(if i == 6 { 6 } else { 60 }, 60, 0))
        .collect();
    let six: Vec<u8> = (0..6)
        .flat_map(|i| ext8(if i == 5 { 6 } else { 60 }, 60, 0))
        .collect();
    assert_eq!(
        e.vm_receives(&x6(net6, 60, six, 6, syn(5432))),
        PASS,
        "six headers"
    );
    let [ext] = e.delta([STAT_DROP_IPV6_EXT], || {
        assert_eq!(
            e.vm_receives(&x6(net6, 60, seven, 6, syn(5432))),
            TC_ACT_SHOT
        );
    });
    assert_eq!(ext, 1);
    // An unknown next header ends the walk and is judged as the L4 protocol: allowed where
    // the policy allows any protocol, denied elsewhere.
    assert_eq!(
        e.vm_receives(&x6(trusted6, 253, vec![], 253, vec![0; 16])),
        PASS
    );
    assert_eq!(
        e.vm_receives(&x6(trusted6, 0, ext8(253, 0, 0), 253, vec![0; 16])),
        PASS
    );
    assert_eq!(
        e.vm_receives(&x6(net6, 0, ext8(253, 0, 0), 253, vec![0; 16])),
        TC_ACT_SHOT
    );
    // No next header (59): a protocol like any other.
    assert_eq!(e.vm_receives(&x6(trusted6, 59, vec![], 59, vec![])), PASS);
    assert_eq!(
        e.vm_receives(&x6(net6, 59, vec![], 59, vec![])),
        TC_ACT_SHOT
    );
    // An extension header cut short: truncated.
    let [trunc] = e.delta([STAT_DROP_TRUNCATED], || {
        assert_eq!(e.vm_receives(&x6(net6, 0, vec![], 6, vec![])), TC_ACT_SHOT);
    });
    assert_eq!(trunc, 1);
}

#[test]
fn fragments_follow_their_first_fragment() {
    let Some(e) = env("fragments") else {
        return;
    };
    let frag4 = |src, frag: u16, id: u16, l4: Vec<u8>| {
        eth(
            PEER_MAC,
            VM_MAC,
            ETH_P_IP,
            &ipv4_packet(src, VM4, 6, &[], frag, id, l4),
        )
    };
    let allowed = [10, 2, 0, 10];
    let denied = [10, 1, 0, 10];
    // First fragment (MF, offset 0): judged on its ports.
    let [pass] = e.delta([STAT_PASS_POLICY], || {
        assert_eq!(e.vm_receives(&frag4(allowed, 0x2000, 77, syn(5432))), PASS);
    });
    assert_eq!(pass, 1);
    // Later fragments of that datagram (offset 8 and the last one) pass.
    let [fp] = e.delta([STAT_FRAG_PASS], || {
        assert_eq!(
            e.vm_receives(&frag4(allowed, 0x2000 | 3, 77, vec![0; 24])),
            PASS
        );
        assert_eq!(e.vm_receives(&frag4(allowed, 6, 77, vec![0; 8])), PASS);
    });
    assert_eq!(fp, 2);
    // Later fragments of another datagram, or of one whose first fragment was denied: drop.
    assert_eq!(
        e.vm_receives(&frag4(denied, 0x2000, 78, syn(5432))),
        TC_ACT_SHOT
    );
    let [df] = e.delta([STAT_DROP_FRAGMENT], || {
        assert_eq!(
            e.vm_receives(&frag4(allowed, 3, 79, vec![0; 8])),
            TC_ACT_SHOT
        );
        assert_eq!(
            e.vm_receives(&frag4(denied, 3, 78, vec![0; 8])),
            TC_ACT_SHOT
        );
        // Same id, other source: another datagram.
        assert_eq!(
            e.vm_receives(&frag4([10, 2, 0, 11], 3, 77, vec![0; 8])),
            TC_ACT_SHOT
        );
    });
    assert_eq!(df, 3);
    // A first fragment denied on its ports.
    assert_eq!(
        e.vm_receives(&frag4(allowed, 0x2000, 80, syn(22))),
        TC_ACT_SHOT
    );
    assert_eq!(
        e.vm_receives(&frag4(allowed, 3, 80, vec![0; 8])),
        TC_ACT_SHOT
    );

    // IPv6 fragment header.
    let net6 = a6([0x2001, 0xdb8, 0xa, 2], 10);
    let sub6 = a6([0x2001, 0xdb8, 0xa, 1], 10);
    let frag6p = |src, off, more, id, l4: Vec<u8>| {
        eth(
            PEER_MAC,
            VM_MAC,
            ETH_P_IPV6,
            &ipv6_packet(src, VM6, 44, &frag6(17, off, more, id), 17, l4, true),
        )
    };
    assert_eq!(
        e.vm_receives(&frag6p(net6, 0, true, 0xabcd, udp(port(), 7, &[1; 32]))),
        PASS
    );
    let [fp, df] = e.delta([STAT_FRAG_PASS, STAT_DROP_FRAGMENT], || {
        assert_eq!(
            e.vm_receives(&frag6p(net6, 5, false, 0xabcd, vec![2; 16])),
            PASS
        );
        assert_eq!(
            e.vm_receives(&frag6p(net6, 5, false, 0xabce, vec![2; 16])),
            TC_ACT_SHOT
        );
    });
    assert_eq!((fp, df), (1, 1));
    assert_eq!(
        e.vm_receives(&frag6p(sub6, 0, true, 0x1111, udp(port(), 7, &[1; 32]))),
        TC_ACT_SHOT
    );
    assert_eq!(
        e.vm_receives(&frag6p(sub6, 5, false, 0x1111, vec![2; 16])),
        TC_ACT_SHOT
    );
}

#[test]
fn truncated_headers_and_non_ip_frames_drop() {
    let Some(e) = env("truncated") else {
        return;
    };
    let good4 = in4([10, 2, 0, 1], 6, syn(5432));
    let good6 = in6(a6([0x2001, 0xdb8, 0xa, 2], 1), 6, syn(5432));
    let udp4 = in4([10, 2, 0, 1], 17, udp(port(), 5, b""));
    let mut bad_ihl = good4.clone();
    bad_ihl[14] = 0x43;
    let mut long_ihl = good4[..14 + 20].to_vec();
    long_ihl[14] = 0x4f; // 60-byte header in a 20-byte packet: no TCP header to read
    let mut wrong_version = good6.clone();
    wrong_version[14] = 0x40;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 header cut", good4[..14 + 10].to_vec()),
        ("IPv4 header only, no TCP", good4[..14 + 20].to_vec()),
        ("TCP header cut", good4[..14 + 20 + 10].to_vec()),
        ("UDP header cut", udp4[..14 + 20 + 2].to_vec()),
        ("IHL below 5", bad_ihl),
        ("IHL past the packet", long_ihl),
        ("IPv6 header cut", good6[..14 + 30].to_vec()),
        ("IPv6 TCP header cut", good6[..14 + 40 + 8].to_vec()),
        ("IPv6 ethertype, IPv4 version", wrong_version),
    ];
    let mut ran = Vec::new();
    for hook in [Hook::ToVm, Hook::FromVm] {
        for (what, frame) in &cases {
            let mut f = frame.clone();
            if hook == Hook::FromVm {
                f[6..12].copy_from_slice(&VM_MAC);
            }
            let before = e.stat(STAT_DROP_TRUNCATED);
            match e.dp.test_run(hook, &f, IFINDEX, 0, 1) {
                Ok(r) => {
                    assert_eq!(r.action, TC_ACT_SHOT, "{what} {hook:?}");
                    let t = e.stat(STAT_DROP_TRUNCATED) - before;
                    assert_eq!(t, 1, "{what} {hook:?}");
                    ran.push(*what);
                }
                // BPF_PROG_TEST_RUN itself refuses an IP ethertype whose IP header is
                // not all there: such frames never reach the program here.
                Err(err) => eprintln!("{what} {hook:?}: kernel refused: {err}"),
            }
        }
    }
    // Only the two cut IP headers are refused by the kernel; every other case ran.
    assert_eq!(ran.len(), 2 * (cases.len() - 2), "{ran:?}");
    // Shorter than an Ethernet header: the kernel refuses to run it at all (the program's
    // own check of the Ethernet header cannot be reached through BPF_PROG_TEST_RUN).
    match e.dp.test_run(Hook::ToVm, &good4[..13], IFINDEX, 0, 1) {
        Err(_) => {}
        Ok(r) => assert_eq!(r.action, TC_ACT_SHOT),
    }
    // Non-IP, non-ARP: LLDP, a VLAN tag, IPX: dropped both ways.
    for ethertype in [0x88cc, 0x8100, 0x8137, 0x88a8] {
        let f_in = eth(PEER_MAC, VM_MAC, ethertype, &[0; 46]);
        let f_out = eth(VM_MAC, PEER_MAC, ethertype, &[0; 46]);
        let [n] = e.delta([STAT_DROP_NON_IP], || {
            assert_eq!(e.vm_receives(&f_in), TC_ACT_SHOT);
            assert_eq!(e.vm_sends(&f_out), TC_ACT_SHOT);
        });
        assert_eq!(n, 2, "ethertype {ethertype:#x}");
    }
    // Packets we generated ourselves (reject answers) are never judged.
    let r =
        e.dp.test_run(
            Hook::ToVm,
            &eth(PEER_MAC, VM_MAC, 0x88cc, &[0; 46]),
            IFINDEX,
            REJECT_MARK,
            1,
        )
        .unwrap();
    assert_eq!(r.action, PASS);
}

fn arp(oper: u16, sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&oper.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa);
    eth(sha, [0xff; 6], ETH_P_ARP, &a)
}

#[test]
fn arp_ndp_and_rogue_infrastructure_from_the_vm() {
    let Some(mut e) = env("spoofing") else {
        return;
    };
    let mut ev = events(&mut e);
    let gw = [192, 0, 2, 1];
    let spoofs = |e: &Env, f: &[u8]| {
        let [s] = e.delta([STAT_DROP_SPOOF], || assert_eq!(e.vm_sends(f), TC_ACT_SHOT));
        assert_eq!(s, 1);
    };
    let infra = |e: &Env, hook: Hook, f: &[u8]| {
        let [s] = e.delta([STAT_PASS_INFRA], || assert_eq!(e.run(hook, f), PASS));
        assert_eq!(s, 1);
    };
    // ARP: the VM's own MAC and address (or a 0.0.0.0 probe) pass, anything else drops.
    infra(&e, Hook::FromVm, &arp(1, VM_MAC, VM4, gw));
    infra(&e, Hook::FromVm, &arp(2, VM_MAC, VM4, gw));
    infra(&e, Hook::FromVm, &arp(1, VM_MAC, [0; 4], VM4));
    spoofs(&e, &arp(2, VM_MAC, gw, gw)); // claims the gateway's address
    let mut foreign_sha = arp(2, [2, 0, 0, 0, 0, 9], VM4, gw);
    foreign_sha[6..12].copy_from_slice(&VM_MAC); // own Ethernet source, foreign ARP sender
    spoofs(&e, &foreign_sha);
    // ARP towards the VM passes.
    infra(&e, Hook::ToVm, &arp(1, PEER_MAC, gw, VM4));
    let arp_events: Vec<_> = drain(&mut ev);
    assert_eq!(arp_events.len(), 2);
    for x in &arp_events {
        assert_eq!((x.kind, x.reason), (EVENT_SPOOF, REASON_SPOOF_ARP));
        assert_eq!(x.slot, e.slot);
    }

    // NDP neighbour advertisement: own, link-local targets pass; a foreign target drops.
    let all_nodes = a6([0xff02, 0, 0, 0], 1);
    let na = |target: [u8; 16]| {
        hop_limit(
            out6(all_nodes, 58, icmp(136, 0, [0x20, 0, 0, 0], &target)),
            255,
        )
    };
    infra(&e, Hook::FromVm, &na(VM6));
    infra(&e, Hook::FromVm, &na(VM_LL));
    spoofs(&e, &na(a6([0x2001, 0xdb8, 1, 0], 0x99)));
    spoofs(&e, &na(a6([0x2001, 0xdb8, 0xa, 2], 1)));
    let x = drain(&mut ev);
    assert_eq!(x.len(), 2);
    assert!(x
        .iter()
        .all(|x| x.reason == REASON_SPOOF_ND && x.family == 6));
    // Neighbour solicitation with the unspecified source (DAD) passes.
    let dad = v6(
        VM_MAC,
        PEER_MAC,
        [0; 16],
        all_nodes,
        58,
        icmp(135, 0, [0; 4], &VM6),
    );
    let dad = hop_limit(dad, 255);
    infra(&e, Hook::FromVm, &dad);
    // Only link-local infrastructure passes without policy: NDP that could have been forwarded
    // (hop limit below 255) and MLD with a hop limit above 1 are judged by policy (here: no
    // ICMPv6 but echo).
    let policy_drop = |e: &Env, hook: Hook, f: &[u8], what: &str| {
        let [infra, dropped] = e.delta([STAT_PASS_INFRA, STAT_DROP_POLICY], || {
            assert_eq!(e.run(hook, f), TC_ACT_SHOT, "{what}")
        });
        assert_eq!((infra, dropped), (0, 1), "{what}");
    };
    policy_drop(&e, Hook::FromVm, &hop_limit(na(VM6), 64), "forwarded NA");
    let mld = out6(
        a6([0xff02, 0, 0, 0], 0x16),
        58,
        icmp(143, 0, [0; 4], &[0; 20]),
    );
    let mld_ll = v6(
        VM_MAC,
        PEER_MAC,
        VM_LL,
        a6([0xff02, 0, 0, 0], 0x16),
        58,
        icmp(143, 0, [0; 4], &[0; 20]),
    );
    infra(&e, Hook::FromVm, &hop_limit(mld_ll.clone(), 1));
    policy_drop(
        &e,
        Hook::FromVm,
        &hop_limit(mld_ll, 2),
        "MLD report with hop limit 2",
    );
    policy_drop(
        &e,
        Hook::FromVm,
        &hop_limit(mld, 1),
        "MLD report from a global address",
    );
    let x = drain(&mut ev);
    assert_eq!(x.len(), 3);
    assert!(x.iter().all(|x| x.kind == EVENT_DENY));

    // Rogue infrastructure: DHCP/DHCPv6 server replies and router advertisements.
    let dhcp_offer = out4([255; 4], 17, udp(67, 68, &[0; 32]));
    let dhcp6_reply = v6(
        VM_MAC,
        PEER_MAC,
        VM_LL,
        all_nodes,
        17,
        udp(547, 546, &[0; 16]),
    );
    let ra = hop_limit(
        v6(
            VM_MAC,
            PEER_MAC,
            VM_LL,
            all_nodes,
            58,
            icmp(134, 0, [64, 0, 0, 0], &[0; 8]),
        ),
        255,
    );
    let redirect = v6(
        VM_MAC,
        PEER_MAC,
        VM_LL,
        all_nodes,
        58,
        icmp(137, 0, [0; 4], &[0; 32]),
    );
    for f in [&dhcp_offer, &dhcp6_reply, &ra, &redirect] {
        spoofs(&e, f);
    }
    let reasons: Vec<u8> = drain(&mut ev).iter().map(|x| x.reason).collect();
    assert_eq!(
        reasons,
        [
            REASON_ROGUE_DHCP,
            REASON_ROGUE_DHCP,
            REASON_ROGUE_RA,
            REASON_ROGUE_RA
        ]
    );
    // DHCP client traffic passes without policy, before the VM has an address too.
    let discover = v4(
        VM_MAC,
        PEER_MAC,
        [0; 4],
        [255; 4],
        17,
        udp(68, 67, &[0; 32]),
    );
    infra(&e, Hook::FromVm, &discover);
    infra(&e, Hook::ToVm, &in4(gw, 17, udp(67, 68, &[0; 32])));
    let all_dhcp = a6([0xff02, 0, 0, 0], 0);
    let mut all_dhcp = all_dhcp;
    all_dhcp[13] = 1;
    all_dhcp[15] = 2;
    infra(
        &e,
        Hook::FromVm,
        &out6(all_dhcp, 17, udp(546, 547, &[0; 16])),
    );
    let dhcp6_from_server = v6(
        PEER_MAC,
        VM_MAC,
        a6([0xfe80, 0, 0, 0], 1),
        VM6,
        17,
        udp(547, 546, &[0; 16]),
    );
    infra(&e, Hook::ToVm, &dhcp6_from_server);
    // Client ports towards anything but the broadcast / servers' group are not a way around
    // policy (here: egress UDP only to DNS).
    policy_drop(
        &e,
        Hook::FromVm,
        &out4([203, 0, 113, 9], 17, udp(68, 67, &[0; 32])),
        "DHCP to a unicast address",
    );
    policy_drop(
        &e,
        Hook::FromVm,
        &out6(a6([0x2001, 0xdb8, 0x99, 0], 1), 17, udp(546, 547, &[0; 16])),
        "DHCPv6 to a global address",
    );
    policy_drop(
        &e,
        Hook::ToVm,
        &in6(a6([0x2001, 0xdb8, 0x99, 0], 1), 17, udp(547, 546, &[0; 16])),
        "DHCPv6 answer from a global address",
    );

    // An endpoint with EP_INFRA_SERVER may send router advertisements; its DHCP replies are
    // not spoofing (they are judged by policy, which here allows no UDP 68).
    e.apply(&base_tables(EP_INFRA_SERVER));
    infra(&e, Hook::FromVm, &ra);
    let [spoof, policy] = e.delta([STAT_DROP_SPOOF, STAT_DROP_POLICY], || {
        assert_eq!(e.vm_sends(&dhcp_offer), TC_ACT_SHOT);
    });
    assert_eq!((spoof, policy), (0, 1));
    let st = e.t.endpoint_stats(e.slot).unwrap();
    assert_eq!(st.spoof_drops, 8);
}

/// Check that `out` is the RST answering `sent` (a segment without payload): addresses,
/// ports and MACs swapped, sequence numbers per RFC 793, and valid IP and TCP checksums.
fn assert_valid_rst(sent: &[u8], out: &[u8]) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let s = SlicedPacket::from_ethernet(sent).expect("sent packet parses");
    let o = SlicedPacket::from_ethernet(out).expect("RST parses");
    assert_eq!(out.len(), sent.len());
    assert_eq!(&out[0..6], &sent[6..12], "dst MAC = sender's MAC");
    assert_eq!(&out[6..12], &sent[0..6]);
    let (Some(TransportSlice::Tcp(st)), Some(TransportSlice::Tcp(ot))) =
        (&s.transport, &o.transport)
    else {
        panic!("not TCP");
    };
    assert_eq!(
        (ot.source_port(), ot.destination_port()),
        (st.destination_port(), st.source_port())
    );
    assert!(ot.rst());
    assert!(!ot.syn() && !ot.fin() && !ot.psh());
    if st.ack() {
        assert_eq!(ot.sequence_number(), st.acknowledgment_number());
        assert!(!ot.ack());
    } else {
        assert!(ot.ack());
        assert_eq!(ot.sequence_number(), 0);
        let consumed = u32::from(st.syn()) + u32::from(st.fin());
        assert_eq!(
            ot.acknowledgment_number(),
            st.sequence_number().wrapping_add(consumed)
        );
    }
    assert!(ot.payload().is_empty());
    let seg = ot.slice();
    match (s.net.unwrap(), o.net.unwrap()) {
        (NetSlice::Ipv4(si), NetSlice::Ipv4(oi)) => {
            let (sh, oh) = (si.header(), oi.header());
            assert_eq!(oh.source(), sh.destination());
            assert_eq!(oh.destination(), sh.source());
            // Our own checksum arithmetic: a valid header sums to 0xffff.
            assert_eq!(checksum(oh.slice(), 0), 0, "IPv4 header checksum");
            assert_eq!(
                oh.to_header().calc_header_checksum(),
                oh.header_checksum(),
                "IPv4 header checksum (etherparse)"
            );
            let ps = pseudo(&oh.source(), &oh.destination(), 6, seg.len());
            assert_eq!(checksum(seg, ps), 0, "TCP checksum over IPv4");
            assert_eq!(
                ot.calc_checksum_ipv4(oh.source(), oh.destination())
                    .unwrap(),
                ot.checksum()
            );
        }
        (NetSlice::Ipv6(si), NetSlice::Ipv6(oi)) => {
            let (sh, oh) = (si.header(), oi.header());
            assert_eq!(oh.source(), sh.destination());
            assert_eq!(oh.destination(), sh.source());
            let ps = pseudo(&oh.source(), &oh.destination(), 6, seg.len());
            assert_eq!(checksum(seg, ps), 0, "TCP checksum over IPv6");
            assert_eq!(
                ot.calc_checksum_ipv6(oh.source(), oh.destination())
                    .unwrap(),
                ot.checksum()
            );
        }
        _ => panic!("address family changed"),
    }
}

#[test]
fn reject_answers_tcp_with_a_valid_rst_v4_v6() {
    let Some(mut e) = env("reject") else {
        return;
    };
    let mut ev = events(&mut e);
    let rej4 = [198, 51, 102, 7];
    let rej6 = a6([0x2001, 0xdb8, 7, 0], 7);
    let cases: Vec<(&str, Hook, Vec<u8>)> = vec![
        (
            "v4 SYN to the VM",
            Hook::ToVm,
            in4(rej4, 6, tcp(port(), 22, 0x1234_5678, 0, SYN)),
        ),
        (
            "v4 SYN from the VM",
            Hook::FromVm,
            out4(rej4, 6, tcp(port(), 22, 0xffff_ffff, 0, SYN)),
        ),
        (
            "v4 bare ACK",
            Hook::ToVm,
            in4(rej4, 6, tcp(port(), 22, 5, 0xdead_beef, ACK)),
        ),
        (
            "v4 FIN",
            Hook::ToVm,
            in4(rej4, 6, tcp(port(), 22, 5, 0, FIN)),
        ),
        (
            "v6 SYN to the VM",
            Hook::ToVm,
            in6(rej6, 6, tcp(port(), 22, 0x0102_0304, 0, SYN)),
        ),
        (
            "v6 SYN from the VM",
            Hook::FromVm,
            out6(rej6, 6, tcp(port(), 443, 77, 0, SYN)),
        ),
        (
            "v6 bare ACK",
            Hook::FromVm,
            out6(rej6, 6, tcp(port(), 443, 77, 0x8000_0001, ACK)),
        ),
    ];
    for (what, hook, frame) in &cases {
        let [sent] = e.delta([STAT_REJECT_SENT], || {
            let r = e.dp.test_run(*hook, frame, IFINDEX, 0, 1).unwrap();
            assert_eq!(r.action, TC_ACT_REDIRECT, "{what}");
            assert_valid_rst(frame, &r.packet_out);
        });
        assert_eq!(sent, 1, "{what}");
    }
    let got = drain(&mut ev);
    assert_eq!(got.len(), cases.len());
    for x in &got {
        assert_eq!(
            (x.kind, x.rule, x.identity),
            (EVENT_REJECT, R_REJECT, ID_REJECTED)
        );
    }
    // A segment with payload cannot be answered in place: dropped, counted.
    let mut with_payload = tcp(port(), 22, 1, 0, ACK | PSH);
    with_payload.extend_from_slice(b"data");
    let [failed] = e.delta([STAT_REJECT_FAILED], || {
        assert_eq!(e.vm_receives(&in4(rej4, 6, with_payload)), TC_ACT_SHOT);
        // A RST is never answered.
        assert_eq!(
            e.vm_receives(&in4(rej4, 6, tcp(port(), 22, 1, 0, RST))),
            TC_ACT_SHOT
        );
    });
    assert_eq!(failed, 2);
}

#[test]
fn reject_answers_other_protocols_with_icmp_admin_prohibited_v4_v6() {
    let Some(mut e) = env("reject-icmp") else {
        return;
    };
    let mut ev = events(&mut e);
    let rej4 = [198, 51, 102, 7];
    let rej6 = a6([0x2001, 0xdb8, 7, 0], 7);
    let big = vec![0x5a; 1000];
    let cases: Vec<(&str, Hook, Vec<u8>)> = vec![
        (
            "v4 UDP to the VM",
            Hook::ToVm,
            in4(rej4, 17, udp(port(), 53, b"query")),
        ),
        (
            "v4 UDP from the VM",
            Hook::FromVm,
            out4(rej4, 17, udp(port(), 5060, &big)),
        ),
        (
            "v4 echo from the VM",
            Hook::FromVm,
            out4(rej4, 1, echo(8, 0x4242)),
        ),
        (
            "v4 GRE to the VM",
            Hook::ToVm,
            in4(rej4, 47, vec![0, 0, 8, 0, 1, 2, 3, 4, 5]),
        ),
        (
            "v6 UDP to the VM",
            Hook::ToVm,
            in6(rej6, 17, udp(port(), 123, b"ntp")),
        ),
        (
            "v6 UDP from the VM",
            Hook::FromVm,
            out6(rej6, 17, udp(port(), 514, &big)),
        ),
        ("v6 echo to the VM", Hook::ToVm, in6(rej6, 58, echo(128, 7))),
    ];
    for (what, hook, frame) in &cases {
        let [sent] = e.delta([STAT_REJECT_SENT], || {
            let r = e.dp.test_run(*hook, frame, IFINDEX, 0, 1).unwrap();
            assert_eq!(r.action, TC_ACT_REDIRECT, "{what}");
            assert_valid_unreachable(what, frame, &r.packet_out);
        });
        assert_eq!(sent, 1, "{what}");
    }
    let got = drain(&mut ev);
    assert_eq!(got.len(), cases.len());
    assert!(got
        .iter()
        .all(|x| x.kind == EVENT_REJECT && x.rule == R_REJECT));

    // Never answered (RFC 1122 3.2.2, RFC 4443 2.4): dropped, counted.
    let mut quoted = v4(VM_MAC, PEER_MAC, VM4, rej4, 17, udp(1, 2, b""));
    quoted.drain(..14);
    let icmp_error = in4(rej4, 1, icmp(3, 3, [0; 4], &quoted));
    let mut to_multicast = in4(rej4, 17, udp(port(), 5353, b"mdns"));
    to_multicast[0..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 0xfb]);
    let sctp = in4(rej4, IPPROTO_SCTP_TEST, vec![0; 12]);
    let [failed] = e.delta([STAT_REJECT_FAILED], || {
        assert_eq!(e.vm_receives(&icmp_error), TC_ACT_SHOT);
        assert_eq!(e.vm_receives(&to_multicast), TC_ACT_SHOT);
        assert_eq!(e.vm_receives(&sctp), TC_ACT_SHOT);
    });
    assert_eq!(failed, 3);
}

const IPPROTO_SCTP_TEST: u8 = 132;

/// Check that `out` is the ICMP "administratively prohibited" answering `sent`: MACs and
/// addresses swapped, valid IP and ICMP checksums, the original IP header and 8 bytes quoted
/// — a quoted UDP checksum replaced by the fixed point of a pending checksum completion.
fn assert_valid_unreachable(what: &str, sent: &[u8], out: &[u8]) {
    assert_eq!(&out[0..6], &sent[6..12], "{what}: dst MAC = sender's MAC");
    assert_eq!(&out[6..12], &sent[0..6], "{what}");
    assert_eq!(&out[12..14], &sent[12..14], "{what}: ethertype");
    let v4 = sent[12..14] == ETH_P_IP.to_be_bytes();
    let (ihl, src, dst) = if v4 { (20, 26, 30) } else { (40, 22, 38) };
    let alen = if v4 { 4 } else { 16 };
    let (ip, icmp_msg) = out[14..].split_at(ihl);
    let quote = &icmp_msg[8..];
    assert_eq!(out.len(), 14 + ihl + 8 + ihl + 8, "{what}: length");
    assert_eq!(
        &ip[src - 14..src - 14 + alen],
        &sent[dst..dst + alen],
        "{what}: source = refused destination"
    );
    assert_eq!(
        &ip[dst - 14..dst - 14 + alen],
        &sent[src..src + alen],
        "{what}: destination = sender"
    );
    let proto = if v4 {
        assert_eq!(ip[0], 0x45);
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            out.len() - 14
        );
        assert_eq!(checksum(ip, 0), 0, "{what}: IPv4 header checksum");
        assert_eq!(ip[9], 1);
        assert_eq!((icmp_msg[0], icmp_msg[1]), (3, 13), "{what}: type/code");
        assert_eq!(checksum(icmp_msg, 0), 0, "{what}: ICMP checksum");
        sent[23]
    } else {
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            icmp_msg.len()
        );
        assert_eq!(ip[6], 58);
        assert_eq!((icmp_msg[0], icmp_msg[1]), (1, 1), "{what}: type/code");
        let ps = pseudo(&ip[8..24], &ip[24..40], 58, icmp_msg.len());
        assert_eq!(checksum(icmp_msg, ps), 0, "{what}: ICMPv6 checksum");
        sent[20]
    };
    let orig = &sent[14..14 + ihl + 8];
    if proto == 17 {
        assert_eq!(&quote[..ihl + 6], &orig[..ihl + 6], "{what}: quote");
        // A checksum completion over the quoted header (offload) must write back the same.
        let l4 = &quote[ihl..];
        let mut c = checksum(l4, 0);
        if c == 0 {
            c = 0xffff;
        }
        assert_eq!(
            c.to_be_bytes(),
            [l4[6], l4[7]],
            "{what}: completion fixed point"
        );
    } else {
        assert_eq!(quote, orig, "{what}: quote");
    }
}

#[test]
fn monitor_action_and_monitor_endpoint_pass_with_an_event() {
    let Some(mut e) = env("monitor") else {
        return;
    };
    let mut ev = events(&mut e);
    let mon = [198, 51, 101, 1];
    let sp = port();
    let f = in4(mon, 6, tcp(sp, 22, 1, 0, SYN));
    let [mp] = e.delta([STAT_MONITOR_PASS], || assert_eq!(e.vm_receives(&f), PASS));
    assert_eq!(mp, 1);
    let x = drain(&mut ev);
    assert_eq!(x.len(), 1);
    assert_eq!(
        (x[0].kind, x[0].rule, x[0].identity),
        (EVENT_MONITOR, R_MONITOR, ID_MONITORED)
    );
    // Tracked like an allow, flagged.
    let ent = e
        .ct(&ct_key(v4_mapped(mon), sp, v4_mapped(VM4), 22, 6))
        .unwrap();
    assert_ne!(ent.flags & CT_MONITOR, 0);
    assert_eq!(
        e.vm_sends(&out4(mon, 6, tcp(22, sp, 1, 2, SYN | ACK))),
        PASS
    );
    assert_eq!(e.t.endpoint_stats(e.slot).unwrap().monitor_packets, [1, 1]);

    // EP_MONITOR: every deny (and reject) becomes a would-deny event and passes.
    e.apply(&base_tables(EP_MONITOR));
    let denied = in4([10, 1, 0, 1], 6, syn(5432));
    let rejected = in4([198, 51, 102, 1], 6, syn(22));
    let allowed = in4([10, 2, 0, 1], 6, syn(5432));
    let [mp, dp] = e.delta([STAT_MONITOR_PASS, STAT_DROP_POLICY], || {
        assert_eq!(e.vm_receives(&denied), PASS);
        assert_eq!(e.vm_receives(&rejected), PASS);
        assert_eq!(e.vm_receives(&allowed), PASS);
    });
    assert_eq!((mp, dp), (2, 0));
    let x = drain(&mut ev);
    let kinds: Vec<(u8, u32)> = x.iter().map(|x| (x.kind, x.rule)).collect();
    assert_eq!(
        kinds,
        [(EVENT_MONITOR, R_SUBNET), (EVENT_MONITOR, R_REJECT)]
    );
}

#[test]
fn deny_and_logged_allow_emit_events() {
    let Some(mut e) = env("events") else {
        return;
    };
    let mut ev = events(&mut e);
    let src = [10, 1, 2, 3];
    let sp = port();
    let f = in4(src, 6, tcp(sp, 5432, 1, 0, SYN));
    assert_eq!(e.vm_receives(&f), TC_ACT_SHOT);
    let sub6 = a6([0x2001, 0xdb8, 0xa, 1], 3);
    let f6 = out6(sub6, 17, udp(sp, 99, b"x"));
    assert_eq!(e.vm_sends(&f6), TC_ACT_SHOT);
    let logged = [198, 51, 100, 4];
    let fl = in4(logged, 17, udp(sp, 7, b"hello"));
    assert_eq!(e.vm_receives(&fl), PASS);
    let echo6 = in6(a6([0x2001, 0xdb8, 0xff, 0], 1), 58, echo(128, 9));
    assert_eq!(e.vm_receives(&echo6), TC_ACT_SHOT);

    let x = drain(&mut ev);
    assert_eq!(x.len(), 4, "{x:?}");
    let epoch = e.t.epoch().unwrap();
    let d = &x[0];
    assert_eq!(
        (d.kind, d.reason, d.direction),
        (EVENT_DENY, REASON_POLICY, DIR_INGRESS)
    );
    assert_eq!((d.src, d.dst), (v4_mapped(src), v4_mapped(VM4)));
    assert_eq!((d.sport, d.dport, d.proto, d.family), (sp, 5432, 6, 4));
    assert_eq!(
        (d.rule, d.identity, d.tcp_flags),
        (R_SUBNET, ID_SUBNET, SYN)
    );
    assert_eq!((d.ifindex, d.slot, d.epoch), (IFINDEX, e.slot, epoch));
    assert_eq!(d.packet_len as usize, f.len());
    assert_eq!(d.suppressed_before, 0);
    assert!(d.timestamp_ns > 0);
    // Egress deny of the default rule: identity of the destination, direction egress.
    let d = &x[1];
    assert_eq!(
        (d.kind, d.direction, d.family, d.proto),
        (EVENT_DENY, DIR_EGRESS, 6, 17)
    );
    assert_eq!((d.src, d.dst, d.sport, d.dport), (VM6, sub6, sp, 99));
    assert_eq!((d.rule, d.identity), (RULE_DEFAULT, ID_SUBNET));
    let d = &x[2];
    assert_eq!(
        (d.kind, d.rule, d.identity),
        (EVENT_ALLOW_LOG, R_LOGGED, ID_LOGGED)
    );
    assert_eq!((d.sport, d.dport, d.proto), (sp, 7, 17));
    // ICMP: the event's dport is type << 8 | code.
    let d = &x[3];
    assert_eq!(
        (d.kind, d.proto, d.dport, d.identity),
        (EVENT_DENY, 58, 128 << 8, WORLD)
    );
}

#[test]
fn event_rate_limit_counts_every_suppressed_event() {
    let Some(mut e) = env("ratelimit") else {
        return;
    };
    let mut ev = events(&mut e);
    // The budget is per CPU: run every packet on one CPU so the arithmetic is exact.
    pin_to_current_cpu();
    e.t.set_posture(BOOTSTRAP_DENY, 3).unwrap();
    const TOTAL: u64 = 40;
    let deny = || in4([10, 1, 0, 1], 6, syn(5432));
    let [limited, sent] = e.delta([STAT_EVENTS_RATE_LIMITED, STAT_EVENTS_SENT], || {
        for _ in 0..TOTAL {
            assert_eq!(e.vm_receives(&deny()), TC_ACT_SHOT);
        }
    });
    let x = drain(&mut ev);
    let delivered = x.len() as u64;
    let st = e.t.endpoint_stats(e.slot).unwrap();
    assert!(st.events_suppressed > 0, "the budget was exceeded");
    assert_eq!(delivered + st.events_suppressed, TOTAL, "no silent loss");
    assert_eq!((limited, sent), (st.events_suppressed, delivered));
    // 3 per second: 40 packets take far less than a second (if not, a window rolled over).
    assert!((3..=6).contains(&delivered), "{delivered} delivered");
    // Each delivered event reports the suppressions since the previous one; what is not yet
    // reported goes with the next delivered event, after the window refills.
    let reported: u64 = x.iter().map(|x| u64::from(x.suppressed_before)).sum();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(e.vm_receives(&deny()), TC_ACT_SHOT);
    let y = drain(&mut ev);
    assert_eq!(y.len(), 1);
    assert_eq!(
        reported + u64::from(y[0].suppressed_before),
        st.events_suppressed,
        "every suppressed event is reported by a later delivered one"
    );
}

/// Keep the calling thread on the CPU it is on now (BPF_PROG_TEST_RUN runs the program on
/// the caller's CPU, so every run then shares one per-CPU budget).
fn pin_to_current_cpu() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

#[test]
fn policy_epoch_change_rejudges_established_flows() {
    let Some(mut e) = env("rejudge") else {
        return;
    };
    let mut ev = events(&mut e);
    // Three established flows: two from the /8 (port 5432 and 8050), one the VM opened.
    let handshake_in = |e: &Env, peer: [u8; 4], sp: u16, dp: u16| {
        assert_eq!(e.vm_receives(&in4(peer, 6, tcp(sp, dp, 1, 0, SYN))), PASS);
        assert_eq!(
            e.vm_sends(&out4(peer, 6, tcp(dp, sp, 9, 2, SYN | ACK))),
            PASS
        );
        assert_eq!(e.vm_receives(&in4(peer, 6, tcp(sp, dp, 2, 10, ACK))), PASS);
    };
    let (pa, pb, world) = ([10, 2, 0, 1], [10, 2, 0, 2], [203, 0, 113, 9]);
    let (sa, sb, sc) = (port(), port(), port());
    handshake_in(&e, pa, sa, 5432);
    handshake_in(&e, pb, sb, 8050);
    assert_eq!(e.vm_sends(&out4(world, 6, tcp(sc, 443, 1, 0, SYN))), PASS);
    assert_eq!(
        e.vm_receives(&in4(world, 6, tcp(443, sc, 9, 2, SYN | ACK))),
        PASS
    );
    let key_a = ct_key(v4_mapped(pa), sa, v4_mapped(VM4), 5432, 6);
    let key_b = ct_key(v4_mapped(pb), sb, v4_mapped(VM4), 8050, 6);
    let old_epoch = e.ct(&key_a).unwrap().epoch;
    drain(&mut ev);

    // New policy: port 5432 no longer allowed from the /8 (the level-3 entry is gone, so
    // the level-2 deny holds); everything else unchanged.
    let mut t = base_tables(0);
    t.policy
        .retain(|(k, _)| *k != pk(DIR_INGRESS, ID_NET, 6, C_DB));
    let epoch = e.apply(&t);
    assert_eq!(epoch, old_epoch + 1);

    let [rejudged, revoked, hit] =
        e.delta([STAT_CT_REJUDGED, STAT_CT_REVOKED, STAT_CT_HIT], || {
            assert_eq!(
                e.vm_receives(&in4(pa, 6, tcp(sa, 5432, 2, 10, ACK | PSH))),
                TC_ACT_SHOT
            );
        });
    assert_eq!((rejudged, revoked, hit), (1, 1, 0));
    assert!(e.ct(&key_a).is_none(), "revoked flow forgotten");
    // And stays cut: its next segment is a new (non-SYN) flow that policy denies.
    assert_eq!(
        e.vm_sends(&out4(pa, 6, tcp(5432, sa, 10, 3, ACK))),
        TC_ACT_SHOT
    );
    let x = drain(&mut ev);
    assert_eq!(x[0].kind, EVENT_REVOKED);
    assert_eq!(
        (x[0].reason, x[0].rule, x[0].epoch),
        (REASON_REVOKED, RULE_DEFAULT, epoch)
    );
    assert_eq!((x[0].src, x[0].sport), (v4_mapped(pa), sa));

    // Unchanged verdict: re-judged once, kept, stamped with the new epoch; later packets
    // take the one-lookup path.
    let [rejudged, revoked, hit] =
        e.delta([STAT_CT_REJUDGED, STAT_CT_REVOKED, STAT_CT_HIT], || {
            assert_eq!(
                e.vm_sends(&out4(pb, 6, tcp(8050, sb, 10, 3, ACK | PSH))),
                PASS
            );
        });
    assert_eq!((rejudged, revoked, hit), (1, 0, 1));
    let ent = e.ct(&key_b).unwrap();
    assert_eq!(
        (ent.epoch, ent.rule, ent.state),
        (epoch, R_RANGE, CT_TCP_ESTABLISHED)
    );
    let [rejudged, hit] = e.delta([STAT_CT_REJUDGED, STAT_CT_HIT], || {
        assert_eq!(e.vm_receives(&in4(pb, 6, tcp(sb, 8050, 3, 11, ACK))), PASS);
    });
    assert_eq!((rejudged, hit), (0, 1));
    // The VM-opened flow is re-judged on the egress rule towards its peer (the reply's
    // source), even when the packet is the peer's.
    let [rejudged, revoked] = e.delta([STAT_CT_REJUDGED, STAT_CT_REVOKED], || {
        assert_eq!(
            e.vm_receives(&in4(world, 6, tcp(443, sc, 10, 2, ACK))),
            PASS
        );
    });
    assert_eq!((rejudged, revoked), (1, 0));

    // Revoking egress HTTPS cuts the VM-opened flow, seen from either side.
    let mut t2 = t.clone();
    t2.policy
        .retain(|(k, _)| *k != pk(DIR_EGRESS, IDENTITY_ANY, 6, C_HTTPS));
    e.apply(&t2);
    let [revoked] = e.delta([STAT_CT_REVOKED], || {
        assert_eq!(
            e.vm_receives(&in4(world, 6, tcp(443, sc, 11, 2, ACK))),
            TC_ACT_SHOT
        );
    });
    assert_eq!(revoked, 1);
}

#[test]
fn generation_swap_is_atomic_and_only_the_active_generation_judges() {
    let Some(mut e) = env("swap") else {
        return;
    };
    // Generation of epoch 1 (gen 1): the base policy (5432 allowed from the /8).
    // Epoch 2 (gen 0): the same, but 5432 denied.
    let mut deny = base_tables(0);
    deny.policy
        .retain(|(k, _)| *k != pk(DIR_INGRESS, ID_NET, 6, C_DB));
    assert_eq!(e.apply(&deny), 2);
    // Both generations are in the maps side by side.
    let gens: std::collections::BTreeSet<u32> =
        e.t.maps().policy.keys().map(|k| k.unwrap().gen).collect();
    assert_eq!(gens, [0, 1].into());
    let mut config = {
        use aya::maps::{Array, Map, MapData};
        let pin = e.root.0.join(format!("v{LAYOUT_VERSION}/CONFIG"));
        let map = Map::from_map_data(MapData::from_pin(pin).unwrap()).unwrap();
        Array::<MapData, Config>::try_from(map).unwrap()
    };
    let db = || in4([10, 2, 0, 1], 6, syn(5432));
    let set_epoch = |config: &mut aya::maps::Array<aya::maps::MapData, Config>, epoch| {
        let mut c = config.get(&0, 0).unwrap();
        c.epoch = epoch;
        config.set(0, &c, 0).unwrap();
    };
    // Epochs only ever grow (conntrack entries and the per-CPU endpoint cache are tagged
    // with them): flip generations by moving on to the next even or odd epoch.
    let mut epoch = 2;
    for round in 0..4 {
        assert_eq!(
            e.vm_receives(&db()),
            TC_ACT_SHOT,
            "round {round}: epoch {epoch} (gen 0) denies"
        );
        epoch += 1;
        set_epoch(&mut config, epoch);
        assert_eq!(
            e.vm_receives(&db()),
            PASS,
            "round {round}: epoch {epoch} (gen 1) allows"
        );
        epoch += 1;
        set_epoch(&mut config, epoch);
    }
    // Rule indices are per generation: the allow was counted in gen 1's slot of rule 1.
    let rc = e.t.rule_counters().unwrap();
    assert_eq!(rc["r1"].packets, 4);
    // Each generation also carries its own endpoint entry: an epoch whose generation has
    // no entry for the interface gets the bootstrap posture.
    e.apply(&HostTables {
        rules: vec!["r0".into()].into(),
        ..Default::default()
    });
    let [boot] = e.delta([STAT_DROP_BOOTSTRAP], || {
        assert_eq!(e.vm_receives(&db()), TC_ACT_SHOT)
    });
    assert_eq!(boot, 1);
    e.t.set_posture(BOOTSTRAP_ALLOW, 0).unwrap();
    let [boot] = e.delta([STAT_PASS_BOOTSTRAP], || {
        assert_eq!(e.vm_receives(&db()), PASS)
    });
    assert_eq!(boot, 1);
    drop(config);
}

#[test]
fn rule_and_endpoint_counters_count_packets_and_bytes() {
    let Some(mut e) = env("counters") else {
        return;
    };
    let allowed = in4([10, 2, 0, 1], 17, udp(port(), 9, &[0; 100]));
    let allowed_len = allowed.len() as u64;
    for _ in 0..5 {
        assert_eq!(
            e.vm_receives(&in4([10, 2, 0, 1], 17, udp(port(), 9, &[0; 100]))),
            PASS
        );
    }
    let denied = in6(a6([0x2001, 0xdb8, 0xa, 1], 1), 6, syn(5432));
    for _ in 0..3 {
        assert_eq!(
            e.vm_receives(&in6(a6([0x2001, 0xdb8, 0xa, 1], 1), 6, syn(5432))),
            TC_ACT_SHOT
        );
    }
    // Egress: two allowed DNS queries, one denied packet.
    let q = out4([203, 0, 113, 53], 17, udp(port(), 53, b"q"));
    assert_eq!(e.vm_sends(&q), PASS);
    assert_eq!(
        e.vm_sends(&out4([203, 0, 113, 53], 17, udp(port(), 53, b"q"))),
        PASS
    );
    let bad = out4([203, 0, 113, 53], 17, udp(port(), 54, b"qq"));
    assert_eq!(e.vm_sends(&bad), TC_ACT_SHOT);
    // Tracked replies count on the rule that admitted the flow.
    assert_eq!(
        e.vm_receives(&in4(
            [203, 0, 113, 53],
            17,
            udp(53, u16::from_be_bytes([q[34], q[35]]), b"a")
        )),
        PASS
    );

    let rc = e.t.rule_counters().unwrap();
    assert_eq!((rc["r3"].packets, rc["r3"].bytes), (5, 5 * allowed_len));
    assert_eq!(
        (rc["r5"].packets, rc["r5"].bytes),
        (3, 3 * denied.len() as u64)
    );
    let q_len = q.len() as u64;
    let reply_len = q_len; // same sizes: one-byte payloads
    assert_eq!(
        (rc["r12"].packets, rc["r12"].bytes),
        (3, 2 * q_len + reply_len)
    );
    assert_eq!((rc["r0"].packets, rc["r0"].bytes), (1, bad.len() as u64));
    assert!(rc["r3"].last_hit_ns > 0);
    // The stamp converts to the wall clock: just now (the coarse clock lags by a tick).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let hit = rc["r3"].last_hit_unix_nanos().expect("hit");
    assert!(hit <= now && now - hit < 60_000_000_000, "{hit} vs {now}");
    assert_eq!(rc["r1"].last_hit_unix_nanos(), None);
    assert_eq!(rc["r1"].packets, 0);
    let st = e.t.endpoint_stats(e.slot).unwrap();
    assert_eq!(st.allow_packets, [2, 6]);
    assert_eq!(st.allow_bytes, [2 * q_len, 5 * allowed_len + reply_len]);
    assert_eq!(st.deny_packets, [1, 3]);
    assert_eq!(st.deny_bytes, [bad.len() as u64, 3 * denied.len() as u64]);
    assert_eq!(st.monitor_packets, [0, 0]);
    assert!(st.last_hit_ns > 0);
}

/// IPv4 addresses are keyed v4-mapped (`::ffff:a.b.c.d`) in the ipcache and endpoint
/// addresses, so an IPv6 packet carrying a v4-mapped address would resolve to an IPv4
/// identity: an IPv6 sender could borrow the policy of any IPv4 peer (the model gives it
/// the IPv6 identity of its longest IPv6 prefix). Such addresses are never valid on the wire
/// (RFC 4291 2.5.5.2): the datapath drops them.
#[test]
fn ipv6_packets_with_v4_mapped_addresses_drop() {
    let Some(e) = env("v4-mapped") else {
        return;
    };
    let tables = base_tables(0);
    let idx = tables.index();
    let mapped_net = v4_mapped([10, 2, 0, 1]);
    let q = FlowQuery {
        slot: 0,
        direction: DIR_INGRESS,
        peer: IpAddr::from(mapped_net),
        proto: 6,
        port: 5432,
    };
    // The model: an IPv6 peer, judged by the IPv6 prefixes (::/0, the world): denied.
    assert_eq!(idx.identity(&q.peer), WORLD);
    assert_eq!(idx.decide(&q).unwrap().action, ACTION_DENY);
    // 10.2.0.1 itself is allowed on 5432; its v4-mapped IPv6 twin must not be.
    assert_eq!(e.vm_receives(&in4([10, 2, 0, 1], 6, syn(5432))), PASS);
    let [ext] = e.delta([STAT_DROP_IPV6_EXT], || {
        assert_eq!(e.vm_receives(&in6(mapped_net, 6, syn(5432))), TC_ACT_SHOT);
        // Towards a v4-mapped destination, and from a v4-mapped form of the VM's own
        // IPv4 address (which EP_ADDRS holds in that form).
        let to_mapped = out6(mapped_net, 6, syn(443));
        assert_eq!(e.vm_sends(&to_mapped), TC_ACT_SHOT);
        let from_mapped = v6(
            VM_MAC,
            PEER_MAC,
            v4_mapped(VM4),
            a6([0x2001, 0xdb8, 0xff, 0], 1),
            6,
            syn(443),
        );
        assert_eq!(e.vm_sends(&from_mapped), TC_ACT_SHOT);
    });
    assert_eq!(ext, 3);
    // An ICMPv6 error quoting a v4-mapped packet would name a tracked IPv4 flow's conntrack
    // entry: it is not taken as a quote (and is judged, here denied, as ICMPv6).
    let peer4 = [203, 0, 113, 53];
    assert_eq!(e.vm_sends(&out4(peer4, 17, udp(33000, 53, b"q"))), PASS);
    let quote = ipv6_packet(
        v4_mapped(VM4),
        v4_mapped(peer4),
        17,
        &[],
        17,
        udp(33000, 53, b""),
        false,
    );
    let router6 = a6([0x2001, 0xdb8, 0xff, 0], 1);
    let err = in6(router6, 58, icmp(1, 4, [0; 4], &quote));
    let [hit] = e.delta([STAT_CT_HIT], || {
        assert_eq!(e.vm_receives(&err), TC_ACT_SHOT)
    });
    assert_eq!(hit, 0);
}

/// The ipcache keys IPv4 v4-mapped, which `::/0` (and any short all-zero IPv6 prefix, or a
/// prefix inside `::ffff:0:0/96`) covers. Tables without an IPv4 default must still resolve
/// an IPv4 address outside every IPv4 prefix to `IDENTITY_ANY`, as the model does — not to
/// the identity of an IPv6 prefix.
#[test]
fn ipv4_peers_never_take_an_ipv6_prefix_identity() {
    let mut t = base_tables(0);
    // No 0.0.0.0/0; ::/0 is the trusted identity (any protocol allowed); a v4-mapped IPv6
    // prefix claims 203.0.113.0/24's mapped form for the trusted identity too.
    t.ipcache
        .retain(|e| !(e.addr.is_ipv4() && e.prefix_len == 0));
    for e in &mut t.ipcache {
        if e.addr.is_ipv6() && e.prefix_len == 0 {
            e.identity = ID_TRUSTED;
        }
    }
    t.ipcache.push(ipc("::ffff:203.0.113.0", 120, ID_TRUSTED));
    let Some(e) = env_with("v6-prefix-v4-peer", t.clone()) else {
        return;
    };
    let idx = t.index();
    for (peer, port) in [([198, 18, 0, 1], 22), ([203, 0, 113, 5], 22)] {
        let q = FlowQuery {
            slot: 0,
            direction: DIR_INGRESS,
            peer: IpAddr::from(peer),
            proto: 6,
            port,
        };
        assert_eq!(idx.identity(&q.peer), IDENTITY_ANY);
        assert_eq!(idx.decide(&q).unwrap().action, ACTION_DENY);
        assert_eq!(
            e.vm_receives(&in4(peer, 6, syn(port))),
            TC_ACT_SHOT,
            "{peer:?}"
        );
    }
    // IPv6 peers still get ::/0's identity, IPv4 prefixes still work.
    let v6peer = a6([0x2001, 0xdb8, 0xff, 0], 1);
    assert_eq!(e.vm_receives(&in6(v6peer, 6, syn(22))), PASS);
    assert_eq!(e.vm_receives(&in4([10, 2, 0, 1], 6, syn(5432))), PASS);
}

/// The established fast path (`ebpf/src/fast.rs`): what it passes is counted as the full
/// path would count it (datapath, rule and endpoint counters; conntrack refreshed), and
/// whatever the full path must judge still reaches it — a reversed tuple from the VM (the
/// peer's address as source), a foreign source MAC, a new policy epoch, the first UDP reply,
/// SYN/FIN/RST segments.
#[test]
fn established_fast_path_counts_and_keeps_every_check() {
    let Some(mut e) = env("fast-path") else {
        return;
    };
    let world = [203, 0, 113, 80];
    let world6 = a6([0x2001, 0xdb8, 0xff, 0], 0x80);
    for ipv6 in [false, true] {
        let sp = port();
        let out = |flags| {
            let l4 = tcp(sp, 443, 1, 1, flags);
            if ipv6 {
                out6(world6, 6, l4)
            } else {
                out4(world, 6, l4)
            }
        };
        let inn = |flags| {
            let l4 = tcp(443, sp, 1, 2, flags);
            if ipv6 {
                in6(world6, 6, l4)
            } else {
                in4(world, 6, l4)
            }
        };
        let k = if ipv6 {
            ct_key(VM6, sp, world6, 443, 6)
        } else {
            ct_key(v4_mapped(VM4), sp, v4_mapped(world), 443, 6)
        };
        // The handshake changes the entry's state: the full path.
        let [fast] = e.delta([STAT_CT_FAST], || {
            e.handshake(out, inn);
        });
        assert_eq!(fast, 0);
        let ent = e.ct(&k).unwrap();
        assert_eq!(ent.state, CT_TCP_ESTABLISHED);
        assert_ne!(ent.flags & CT_SRC_CHECKED, 0, "the VM's source was checked");

        // Established segments both ways take the fast path and count everywhere.
        let before = e.allowed();
        let [fast, hit, packets, policy] = e.delta(
            [STAT_CT_FAST, STAT_CT_HIT, STAT_PACKETS, STAT_PASS_POLICY],
            || {
                for _ in 0..3 {
                    assert_eq!(e.vm_sends(&out(ACK | PSH)), PASS);
                    assert_eq!(e.vm_receives(&inn(ACK)), PASS);
                }
            },
        );
        assert_eq!((fast, hit, packets, policy), (6, 6, 6, 0));
        let seg = out(ACK | PSH).len() as u64;
        assert_eq!(e.allowed_since(before), [3, 3, 3 * seg, 6]);

        // The VM sending the flow's reversed tuple (the peer's address as its source) hits
        // the same entry but is a spoof, and so is a foreign source MAC.
        let reversed = if ipv6 {
            v6(VM_MAC, PEER_MAC, world6, VM6, 6, tcp(443, sp, 1, 2, ACK))
        } else {
            v4(VM_MAC, PEER_MAC, world, VM4, 6, tcp(443, sp, 1, 2, ACK))
        };
        let mut foreign_mac = out(ACK);
        foreign_mac[6..12].copy_from_slice(&PEER_MAC);
        let [spoof, fast] = e.delta([STAT_DROP_SPOOF, STAT_CT_FAST], || {
            assert_eq!(e.vm_sends(&reversed), TC_ACT_SHOT);
            assert_eq!(e.vm_sends(&foreign_mac), TC_ACT_SHOT);
        });
        assert_eq!((spoof, fast), (2, 0));

        // A new epoch: the next packet is judged again (full path), later ones are fast.
        let tables = base_tables(0);
        e.apply(&tables);
        assert_eq!(e.ct(&k).unwrap().flags & CT_SRC_CHECKED, CT_SRC_CHECKED);
        let [rejudged, fast] = e.delta([STAT_CT_REJUDGED, STAT_CT_FAST], || {
            assert_eq!(e.vm_receives(&inn(ACK)), PASS);
        });
        assert_eq!((rejudged, fast), (1, 0));
        // Re-judged by an ingress packet: the VM's source must be checked again.
        assert_eq!(e.ct(&k).unwrap().flags & CT_SRC_CHECKED, 0);
        let [fast] = e.delta([STAT_CT_FAST], || {
            assert_eq!(e.vm_receives(&inn(ACK)), PASS);
            assert_eq!(e.vm_sends(&out(ACK)), PASS);
            assert_eq!(e.vm_sends(&out(ACK)), PASS);
        });
        assert_eq!(fast, 2, "ingress fast, first egress checked, then fast");

        // FIN and RST still drive the state machine.
        assert_eq!(e.vm_sends(&out(FIN | ACK)), PASS);
        assert_eq!(e.ct(&k).unwrap().state, CT_TCP_FIN_WAIT);
        assert_eq!(e.vm_receives(&inn(RST)), PASS);
        assert_eq!(e.ct(&k).unwrap().state, CT_TCP_CLOSED);
    }

    // A client reusing its port while the old connection's entry is still closing (FIN
    // seen both ways): the SYN opens a new flow, judged by policy, which reaches ESTABLISHED
    // and the fast path again.
    let sp = port();
    let out = |flags| out4(world, 6, tcp(sp, 443, 1, 1, flags));
    let inn = |flags| in4(world, 6, tcp(443, sp, 1, 2, flags));
    let k = ct_key(v4_mapped(VM4), sp, v4_mapped(world), 443, 6);
    e.handshake(out, inn);
    assert_eq!(e.vm_sends(&out(FIN | ACK)), PASS);
    assert_eq!(e.vm_receives(&inn(FIN | ACK)), PASS);
    assert_eq!(e.ct(&k).unwrap().state, CT_TCP_CLOSING);
    let [reopened, policy] = e.delta([STAT_CT_EXPIRED, STAT_PASS_POLICY], || {
        assert_eq!(e.vm_sends(&out(SYN)), PASS);
    });
    assert_eq!((reopened, policy), (1, 1));
    assert_eq!(e.ct(&k).unwrap().state, CT_TCP_SYN_SENT);
    assert_eq!(e.vm_receives(&inn(SYN | ACK)), PASS);
    assert_eq!(e.vm_sends(&out(ACK)), PASS);
    let [fast] = e.delta([STAT_CT_FAST], || {
        assert_eq!(e.vm_sends(&out(ACK | PSH)), PASS);
        assert_eq!(e.vm_receives(&inn(ACK)), PASS);
    });
    assert_eq!(fast, 2);

    // UDP: the first reply records the reply state (full path), the next ones are fast.
    let sp = port();
    assert_eq!(e.vm_sends(&out4(world, 17, udp(sp, 53, b"q"))), PASS);
    let reply = in4(world, 17, udp(53, sp, b"a"));
    let [fast] = e.delta([STAT_CT_FAST], || assert_eq!(e.vm_receives(&reply), PASS));
    assert_eq!(fast, 0);
    let k = ct_key(v4_mapped(VM4), sp, v4_mapped(world), 53, 17);
    assert_eq!(e.ct(&k).unwrap().state, CT_REPLIED);
    let [fast] = e.delta([STAT_CT_FAST], || {
        assert_eq!(e.vm_receives(&reply), PASS);
        assert_eq!(e.vm_sends(&out4(world, 17, udp(sp, 53, b"q"))), PASS);
    });
    assert_eq!(fast, 2);
}

/// The per-CPU flow cache in front of the fast path (`ebpf/src/flowcache.rs`): after the
/// fast path passed a packet of an established IPv4 flow, the flow's next packets in that
/// direction on that CPU pass from the cache, counted as the fast path counts them; every
/// check that depends on the packet still runs (SYN/FIN/RST, source MAC, reversed tuple), a
/// new epoch ends every slot, IPv6 never uses it, and a slot outlives its conntrack entry
/// by at most `FLOW_CACHE_TTL`.
#[test]
fn flow_cache_passes_only_what_the_fast_path_would() {
    let Some(mut e) = env("flow-cache") else {
        return;
    };
    // The cache is per CPU, and BPF_PROG_TEST_RUN runs on the caller's.
    pin_to_current_cpu();
    let world = [203, 0, 113, 81];
    let sp = port();
    let out = |flags| out4(world, 6, tcp(sp, 443, 1, 1, flags));
    let inn = |flags| in4(world, 6, tcp(443, sp, 1, 2, flags));
    let k = ct_key(v4_mapped(VM4), sp, v4_mapped(world), 443, 6);
    e.handshake(out, inn);

    // The first established packet each way is the fast path's (it fills a slot), the
    // rest are the cache's, with the same counters.
    let before = e.allowed();
    let [cached, fast, hit, packets] = e.delta(
        [STAT_FLOW_CACHE, STAT_CT_FAST, STAT_CT_HIT, STAT_PACKETS],
        || {
            for _ in 0..4 {
                assert_eq!(e.vm_sends(&out(ACK | PSH)), PASS);
                assert_eq!(e.vm_receives(&inn(ACK)), PASS);
            }
        },
    );
    assert_eq!((cached, fast, hit, packets), (6, 8, 8, 8));
    let seg = out(ACK | PSH).len() as u64;
    assert_eq!(e.allowed_since(before), [4, 4, 4 * seg, 8]);

    // Checks that depend on the packet: a foreign source MAC and the reversed tuple from
    // the VM are spoofs; a FIN goes to the full path, moves the entry on, and ends the
    // flow's slots on every CPU (it bumps the flow's generation): the closing flow's next
    // segment is the full path's again.
    let reversed = v4(VM_MAC, PEER_MAC, world, VM4, 6, tcp(443, sp, 1, 2, ACK));
    let mut foreign_mac = out(ACK);
    foreign_mac[6..12].copy_from_slice(&PEER_MAC);
    let [spoof, cached] = e.delta([STAT_DROP_SPOOF, STAT_FLOW_CACHE], || {
        assert_eq!(e.vm_sends(&foreign_mac), TC_ACT_SHOT);
        assert_eq!(e.vm_sends(&reversed), TC_ACT_SHOT);
        assert_eq!(e.vm_sends(&out(FIN | ACK)), PASS);
    });
    assert_eq!((spoof, cached), (2, 0));
    assert_eq!(e.ct(&k).unwrap().state, CT_TCP_FIN_WAIT);
    let [cached, fast, hit] = e.delta([STAT_FLOW_CACHE, STAT_CT_FAST, STAT_CT_HIT], || {
        assert_eq!(e.vm_receives(&inn(ACK)), PASS);
    });
    assert_eq!((cached, fast, hit), (0, 0, 1));

    // The client reuses the tuple at once (`tcp_tw_reuse`): every packet of the new
    // handshake is the full path's, so the new entry reaches ESTABLISHED, and is cached.
    assert_eq!(e.vm_receives(&inn(FIN | ACK)), PASS);
    assert_eq!(e.ct(&k).unwrap().state, CT_TCP_CLOSING);
    let [cached] = e.delta([STAT_FLOW_CACHE], || {
        e.handshake(out, inn);
    });
    assert_eq!(cached, 0);
    assert_eq!(e.ct(&k).unwrap().state, CT_TCP_ESTABLISHED);
    let [cached] = e.delta([STAT_FLOW_CACHE], || {
        for _ in 0..3 {
            assert_eq!(e.vm_sends(&out(ACK | PSH)), PASS);
        }
    });
    assert_eq!(cached, 2);

    // UDP: cached both ways once the reply state is recorded.
    let usp = port();
    let q = out4(world, 17, udp(usp, 53, b"q"));
    let a = in4(world, 17, udp(53, usp, b"a"));
    assert_eq!(e.vm_sends(&q), PASS);
    assert_eq!(e.vm_receives(&a), PASS);
    let [cached, fast] = e.delta([STAT_FLOW_CACHE, STAT_CT_FAST], || {
        for _ in 0..3 {
            assert_eq!(e.vm_sends(&q), PASS);
            assert_eq!(e.vm_receives(&a), PASS);
        }
    });
    assert_eq!((cached, fast), (4, 6));

    // A new epoch: no slot of the old one is used.
    e.apply(&base_tables(0));
    let [cached, rejudged] = e.delta([STAT_FLOW_CACHE, STAT_CT_REJUDGED], || {
        assert_eq!(e.vm_receives(&inn(ACK)), PASS);
    });
    assert_eq!((cached, rejudged), (0, 1));

    // An entry gone from conntrack without the datapath knowing (LRU eviction, here removed
    // from userspace): the slot stands for it at most FLOW_CACHE_TTL, then the full path
    // judges the segment as a new flow (an inbound ACK to a port nothing allows: dropped).
    // A slot lives 100 ms at HZ=1000: on a machine too busy to send the next packet within
    // that, the attempt is repeated.
    let mut outlived = None;
    for _ in 0..5 {
        let sp = port();
        let out = |flags| out4(world, 6, tcp(sp, 443, 1, 1, flags));
        let inn = |flags| in4(world, 6, tcp(443, sp, 1, 2, flags));
        let k = ct_key(v4_mapped(VM4), sp, v4_mapped(world), 443, 6);
        e.handshake(out, inn);
        assert_eq!(e.vm_receives(&inn(ACK)), PASS);
        e.t.maps_mut().conntrack.remove(&k).unwrap();
        let mut rc = 0;
        let [cached] = e.delta([STAT_FLOW_CACHE], || rc = e.vm_receives(&inn(ACK)));
        if cached == 1 {
            assert_eq!(rc, PASS);
            outlived = Some(inn(ACK));
            break;
        }
        assert_eq!(rc, TC_ACT_SHOT, "without its entry, from the full path");
    }
    let inn = outlived.expect("a slot outlives its entry (within its lifetime)");
    std::thread::sleep(std::time::Duration::from_nanos(
        FLOW_CACHE_TTL + 100_000_000,
    ));
    let [cached] = e.delta([STAT_FLOW_CACHE], || {
        assert_eq!(e.vm_receives(&inn), TC_ACT_SHOT);
    });
    assert_eq!(cached, 0);

    // IPv6 flows take the fast path, never the cache.
    let sp6 = port();
    let world6 = a6([0x2001, 0xdb8, 0xff, 0], 0x81);
    let out6f = |flags| out6(world6, 6, tcp(sp6, 443, 1, 1, flags));
    let in6f = |flags| in6(world6, 6, tcp(443, sp6, 1, 2, flags));
    e.handshake(out6f, in6f);
    let [cached, fast] = e.delta([STAT_FLOW_CACHE, STAT_CT_FAST], || {
        for _ in 0..3 {
            assert_eq!(e.vm_sends(&out6f(ACK)), PASS);
            assert_eq!(e.vm_receives(&in6f(ACK)), PASS);
        }
    });
    assert_eq!((cached, fast), (0, 6));
}

/// A flow-cache hit counts in its slot and reaches the counters when they are read (the
/// readers run the flush program on every CPU first) or when the slot is overwritten. No
/// hit is lost or counted twice: not when a reader looks twice, not when slots are
/// overwritten with hits pending, not across two policy swaps (counted under the rule
/// that admitted it, not the rule that takes its index next), not across a loader restart
/// (the flow cache is pinned); monitor flows count as monitored.
#[test]
fn flow_cache_hits_are_counted_exactly_through_swaps_and_a_restart() {
    let Some(mut e) = env("flow-counts") else {
        return;
    };
    // The cache is per CPU, and BPF_PROG_TEST_RUN runs on the caller's.
    pin_to_current_cpu();
    let world = [203, 0, 113, 82];
    let sp = port();
    let out = |flags| out4(world, 6, tcp(sp, 443, 1, 1, flags));
    let inn = |flags| in4(world, 6, tcp(443, sp, 1, 2, flags));
    e.handshake(out, inn);
    let seg = out(ACK | PSH).len() as u64;
    let sends = |e: &Env, n: usize| {
        for _ in 0..n {
            assert_eq!(e.vm_sends(&out(ACK | PSH)), PASS);
        }
    };

    // Read at once, and again: exact both times.
    let before = e.allowed();
    let [cached] = e.delta([STAT_FLOW_CACHE], || sends(&e, 10));
    assert_eq!(cached, 9, "the first segment is the fast path's");
    assert_eq!(e.allowed_since(before), [10, 0, 10 * seg, 10]);
    assert_eq!(e.allowed_since(before), [10, 0, 10 * seg, 10]);

    // More flows than slots, three datagrams each (full path, fast path, cache), nothing
    // read in between: the fast path overwrites slots with a hit pending, flushing it.
    let dns = |e: &mut Env| e.t.rule_counters().unwrap()["r12"].packets;
    let dns_before = dns(&mut e);
    let flows = 300;
    let [cached] = e.delta([STAT_FLOW_CACHE], || {
        for _ in 0..flows {
            let q = out4([203, 0, 113, 53], 17, udp(port(), 53, b"q"));
            for _ in 0..3 {
                assert_eq!(e.vm_sends(&q), PASS);
            }
        }
    });
    assert_eq!(cached, flows);
    assert_eq!(dns(&mut e) - dns_before, 3 * flows);

    // A monitored peer's flow through the cache counts as monitored.
    let monitored = |e: &mut Env| {
        let st = e.t.endpoint_stats(e.slot).unwrap();
        let rule = e.t.rule_counters().unwrap()["r9"].packets;
        [st.monitor_packets[DIR_INGRESS as usize], rule]
    };
    let mon_before = monitored(&mut e);
    let d = in4([198, 51, 101, 7], 17, udp(port(), 9, b"m"));
    let [cached] = e.delta([STAT_FLOW_CACHE], || {
        for _ in 0..5 {
            assert_eq!(e.vm_receives(&d), PASS);
        }
    });
    assert_eq!(cached, 3, "full path, fast path, then the cache");
    let mon = monitored(&mut e);
    assert_eq!([mon[0] - mon_before[0], mon[1] - mon_before[1]], [5, 5]);

    // Hits pending in a slot of an epoch that two swaps retire: the second swap reuses the
    // generation, under other rule names. Nothing reads counters in between.
    let before = e.allowed();
    sends(&e, 5);
    let mut renamed = base_tables(0);
    renamed.rules = renamed
        .rules
        .iter()
        .map(|r| format!("renamed-{r}"))
        .collect();
    e.apply(&base_tables(0));
    e.apply(&renamed);
    assert_eq!(e.allowed_since(before), [5, 0, 5 * seg, 5]);
    let rc = e.t.rule_counters().unwrap();
    assert_eq!(
        rc["renamed-r11"].packets, 0,
        "no hit moved to the index's next rule"
    );

    // Hits still pending when the epoch moves without a flush (as on a CPU the flush could
    // not reach): counted, but under no rule or endpoint, whose indices a later policy may
    // give to others. The epoch is moved here by hand, as `apply` would after its flush.
    let ep_egress = |e: &Env| e.t.endpoint_stats(e.slot).unwrap().allow_packets[0];
    let [ep_before, unattributed_before] = [ep_egress(&e), e.stat(STAT_FLOW_CACHE_UNATTRIBUTED)];
    // Re-judged by the full path (new epoch), the fast path, then two hits left pending.
    sends(&e, 4);
    let cfg = e.t.config().unwrap();
    let moved = Config {
        epoch: cfg.epoch + 1,
        ..cfg
    };
    e.t.maps_mut().config.set(0, &moved, 0).unwrap();
    assert_eq!(
        e.stat(STAT_FLOW_CACHE_UNATTRIBUTED) - unattributed_before,
        2
    );
    assert_eq!(ep_egress(&e) - ep_before, 2, "the full and fast paths' own");

    // Hits pending when the loader exits are counted by the next one. (The established
    // path counts 7 whichever of the fast path and the cache took each segment: a slot
    // lives 100 ms at HZ=1000, so the first may refill it.)
    let [cached] = e.delta([STAT_FLOW_CACHE], || sends(&e, 6));
    assert_eq!(
        cached, 4,
        "after the swaps: re-judged by the full path, then the fast path"
    );
    let [fast_before, cached_before] = [STAT_CT_FAST, STAT_FLOW_CACHE].map(|s| e.stat(s));
    let ep_before = e.t.endpoint_stats(e.slot).unwrap();
    sends(&e, 7);
    let Env { t, dp, slot, root } = e;
    drop(t);
    drop(dp);
    let mut dp = Datapath::load(&root.0).expect("reload datapath");
    let t = dp.tables().expect("tables");
    let [fast, cached] = [STAT_CT_FAST, STAT_FLOW_CACHE].map(|s| t.maps().stat(s).unwrap());
    assert_eq!(fast - fast_before, 7);
    assert!(cached - cached_before >= 6, "{}", cached - cached_before);
    let ep = t.endpoint_stats(slot).unwrap();
    assert_eq!(
        ep.allow_packets[DIR_EGRESS as usize] - ep_before.allow_packets[DIR_EGRESS as usize],
        7
    );
    assert_eq!(
        ep.allow_bytes[DIR_EGRESS as usize] - ep_before.allow_bytes[DIR_EGRESS as usize],
        7 * seg
    );
}

/// Flushing is best effort: a CPU the flush cannot run on (here one that does not exist; on
/// a host, one outside the agent's cpuset) is reported, with why, and the CPUs it reaches
/// are flushed all the same.
#[test]
fn flush_reports_a_cpu_it_cannot_reach_and_flushes_the_rest() {
    let Some(e) = env("flush-unreached") else {
        return;
    };
    pin_to_current_cpu();
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() } as u32;
    let world = [203, 0, 113, 83];
    let sp = port();
    let out = |flags| out4(world, 6, tcp(sp, 443, 1, 1, flags));
    let inn = |flags| in4(world, 6, tcp(443, sp, 1, 2, flags));
    e.handshake(out, inn);
    // The fast path, then four hits left pending in the slot.
    for _ in 0..5 {
        assert_eq!(e.vm_sends(&out(ACK | PSH)), PASS);
    }
    // DP_STATS as the kernel holds it, without a flush.
    let raw = |e: &Env| -> u64 {
        let v = e.t.maps().dp_stats.get(&STAT_FLOW_CACHE, 0).unwrap();
        v.iter().sum()
    };
    let before = raw(&e);
    let flush = FlowCountFlush::open_on(e.dp.pin_dir(), &[cpu, 4095]).unwrap();
    let report = flush.run();
    assert_eq!(report.unreached, vec![4095]);
    assert!(
        report.problems.iter().any(|p| p.contains("CPU 4095")),
        "{:?}",
        report.problems
    );
    assert_eq!(flush.last_report(), report);
    assert_eq!(raw(&e) - before, 4, "this CPU's pending hits");
}
