//! The datapath programs loaded into this kernel and run on crafted packets
//! (`BPF_PROG_TEST_RUN`). Needs root and bpffs; skips with a message otherwise.
use std::net::Ipv4Addr;
use std::path::PathBuf;

use bulkhead_abi::*;
use bulkhead_datapath::{Datapath, Hook, Maps};
use etherparse::PacketBuilder;

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
