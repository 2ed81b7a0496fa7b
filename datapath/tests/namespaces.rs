//! The datapath attached to real interfaces: namespace VMs on a bridge, real TCP, UDP, ICMP
//! and IPv6 traffic through the kernel. Needs root; skips with a message otherwise.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bulkhead_abi::*;
use bulkhead_datapath::{AttachOutcome, Datapath, Tables};
use bulkhead_testbed::rules::{self, allow, bindings, Rule};
use bulkhead_testbed::{echo_roundtrip, skip, Lab, PinRoot, Vm};

const T: Duration = Duration::from_millis(800);
const DB: u16 = 5432;
const SSH: u16 = 22;
const DNS: u16 = 5353;
const ICMP_ECHO: u16 = 8 << 8;
const ICMP6_ECHO: u16 = 128 << 8;

fn v4(vm: &Vm, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(vm.ipv4), port)
}
fn v6(vm: &Vm, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(vm.ipv6), port)
}

/// vm0 (client) may reach vm1 (database) on TCP 5432, UDP 5353 and ping it; vm1 may send
/// nothing on its own (its replies pass as part of the tracked flows).
fn client_server_rules() -> Vec<Rule> {
    vec![
        allow(0, DIR_EGRESS, None, PROTO_ANY, None),
        allow(1, DIR_INGRESS, Some(0), 6, Some(DB)),
        allow(1, DIR_INGRESS, Some(0), 17, Some(DNS)),
        allow(1, DIR_INGRESS, Some(0), 1, Some(ICMP_ECHO)),
        allow(1, DIR_INGRESS, Some(0), 58, Some(ICMP6_ECHO)),
    ]
}

struct Setup {
    // Field order is drop order: detach (pins) after the loader, then remove the lab.
    dp: Datapath,
    tables: Tables,
    _pins: PinRoot,
    lab: Lab,
}

fn setup(test: &str, vms: usize) -> Option<Setup> {
    if skip(test) {
        return None;
    }
    let mut lab = Lab::new().expect("create lab");
    for i in 0..vms {
        lab.add_vm(&format!("vm{i}")).expect("add vm");
    }
    let pins = PinRoot::new(test);
    let mut dp = Datapath::load(&pins.0).expect("load datapath");
    let tables = dp.tables().expect("tables");
    for vm in &lab.vms {
        dp.attach(vm.ifindex).expect("attach");
    }
    Some(Setup {
        dp,
        tables,
        _pins: pins,
        lab,
    })
}

impl Setup {
    fn apply(&mut self, rules: &[Rule]) {
        let t = rules::tables(&self.lab.vms, rules);
        let report = self
            .tables
            .apply(&t, &bindings(&self.lab.vms))
            .expect("apply");
        assert!(report.unbound.is_empty(), "{report:?}");
    }
}

#[test]
fn allowed_denied_and_replies_over_ipv4_and_ipv6() {
    let Some(mut s) = setup("ns-verdicts", 2) else {
        return;
    };
    let (c, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    let _srv = db.serve(DB).expect("serve");
    let _ssh = db.serve(SSH).expect("serve");
    let _dns = db.serve(DNS).expect("serve");
    let _csrv = c.serve(DB).expect("serve");
    s.apply(&client_server_rules());

    assert!(c.tcp_works(v4(&db, DB), T), "TCP/5432 over IPv4 allowed");
    assert!(c.tcp_works(v6(&db, DB), T), "TCP/5432 over IPv6 allowed");
    assert!(c.udp_works(v4(&db, DNS), T), "UDP/5353 over IPv4 allowed");
    assert!(c.udp_works(v6(&db, DNS), T), "UDP/5353 over IPv6 allowed");
    assert!(c.ping(IpAddr::V4(db.ipv4)), "ICMP echo allowed");
    assert!(c.ping(IpAddr::V6(db.ipv6)), "ICMPv6 echo allowed");

    assert!(!c.tcp_works(v4(&db, SSH), T), "TCP/22 denied");
    assert!(!c.tcp_works(v6(&db, SSH), T), "TCP/22 over IPv6 denied");
    assert!(!c.udp_works(v4(&db, SSH), T), "UDP/22 denied");
    assert!(
        !db.tcp_works(v4(&c, DB), T),
        "the server may not open connections"
    );
    assert!(!db.ping(IpAddr::V4(c.ipv4)), "the server may not ping");
    assert!(
        !db.ping(IpAddr::V6(c.ipv6)),
        "the server may not ping over IPv6"
    );

    let m = s.tables.maps();
    assert!(m.stat(STAT_DROP_POLICY).expect("stat") > 0);
    assert!(
        m.stat(STAT_CT_HIT).expect("stat") > 0,
        "replies took the fast path"
    );
    let slot = s.tables.active_slots().expect("slots")[&db.ifindex];
    let eps = s.tables.endpoint_stats(slot).expect("ep stats");
    assert!(eps.deny_packets[DIR_INGRESS as usize] > 0);
    assert!(eps.allow_packets[DIR_INGRESS as usize] > 0);
    let rules = s.tables.rule_counters().expect("rule counters");
    assert!(
        rules["rule-2"].packets > 0,
        "the TCP/5432 rule counted: {rules:?}"
    );
}

/// Reject answers at once, in both directions of a VM's interface: a TCP connect is refused
/// (RST), a UDP datagram raises "host unreachable" (ICMP 3/13) or "permission denied"
/// (ICMPv6 1/1) on the sender's socket — instead of a timeout.
#[test]
fn reject_answers_tcp_and_udp_senders_at_once_v4_v6() {
    let Some(mut s) = setup("ns-reject", 2) else {
        return;
    };
    let (c, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    let _srv = db.serve(DB).expect("serve");
    let _csrv = c.serve(DNS).expect("serve");
    let reject = |vm, dir, proto| Rule {
        action: ACTION_REJECT,
        ..allow(vm, dir, Some(1 - vm), proto, None)
    };
    s.apply(&[
        allow(0, DIR_EGRESS, None, PROTO_ANY, None),
        allow(1, DIR_INGRESS, Some(0), 6, Some(DB)),
        // The database's ingress rejects the rest (answered from its tap's egress hook).
        reject(1, DIR_INGRESS, PROTO_ANY),
        // Its egress rejects UDP (answered from its tap's ingress hook).
        reject(1, DIR_EGRESS, 17),
    ]);
    assert!(c.tcp_works(v4(&db, DB), T), "TCP/5432 allowed");
    let long = Duration::from_secs(3);
    for to in [v4(&db, SSH), v6(&db, SSH)] {
        let err = c.connect(to, long).expect_err("refused");
        assert!(
            format!("{err:?}").contains("ConnectionRefused"),
            "{to}: {err:?}"
        );
    }
    let expect = [
        (&c, v4(&db, DNS), libc::EHOSTUNREACH),
        (&c, v6(&db, DNS), libc::EACCES),
        (&db, v4(&c, DNS), libc::EHOSTUNREACH),
        (&db, v6(&c, DNS), libc::EACCES),
    ];
    for (from, to, errno) in expect {
        let t0 = std::time::Instant::now();
        let r = from.udp_probe(to, long);
        let err = r.as_ref().err().map(|e| e.raw_os_error());
        assert_eq!(err, Some(Some(errno)), "{} -> {to}: {r:?}", from.name);
        assert!(t0.elapsed() < long / 2, "answered at once");
    }
    let m = s.tables.maps();
    assert!(m.stat(STAT_REJECT_SENT).expect("stat") >= 6);
    assert_eq!(m.stat(STAT_REJECT_FAILED).expect("stat"), 0);
}

#[test]
fn policy_change_cuts_an_established_connection() {
    let Some(mut s) = setup("ns-revoke", 2) else {
        return;
    };
    let (c, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    let _srv = db.serve(DB).expect("serve");
    s.apply(&client_server_rules());
    let mut conn = c.connect(v4(&db, DB), T).expect("connect");
    assert!(echo_roundtrip(&mut conn, T));

    // The new revision no longer allows the database port.
    let mut rules = client_server_rules();
    rules.remove(1);
    s.apply(&rules);
    assert!(!echo_roundtrip(&mut conn, T), "established connection cut");
    assert!(s.tables.maps().stat(STAT_CT_REVOKED).expect("stat") > 0);

    // And allowed again: a new connection works.
    s.apply(&client_server_rules());
    assert!(c.tcp_works(v4(&db, DB), T));
}

#[test]
fn spoofed_sources_are_dropped_and_neighbour_discovery_works() {
    let Some(mut s) = setup("ns-spoof", 2) else {
        return;
    };
    let (c, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    s.apply(&client_server_rules());
    assert!(c.ping(IpAddr::V4(db.ipv4)), "ARP and ICMP work");
    assert!(c.ping(IpAddr::V6(db.ipv6)), "NDP and ICMPv6 work");
    let before = s.tables.maps().stat(STAT_DROP_SPOOF).expect("stat");

    // An address the VM does not own.
    bulkhead_testbed::run(
        "ip",
        &[
            "-n",
            &c.netns,
            "addr",
            "add",
            "10.77.0.200/24",
            "dev",
            "eth0",
        ],
    )
    .expect("add address");
    let spoofed = bulkhead_testbed::run(
        "ip",
        &[
            "netns",
            "exec",
            &c.netns,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "10.77.0.200",
            "10.77.0.2",
        ],
    );
    assert!(spoofed.is_err(), "ping from a foreign address passed");
    let after_ip = s.tables.maps().stat(STAT_DROP_SPOOF).expect("stat");
    assert!(after_ip > before, "IP spoof counted");

    // A MAC the VM does not own.
    bulkhead_testbed::run(
        "ip",
        &[
            "-n",
            &c.netns,
            "link",
            "set",
            "eth0",
            "address",
            "52:54:00:de:ad:01",
        ],
    )
    .expect("change mac");
    assert!(
        !c.ping(IpAddr::V4(db.ipv4)),
        "ping from a foreign MAC passed"
    );
    assert!(s.tables.maps().stat(STAT_DROP_SPOOF).expect("stat") > after_ip);
}

/// A VM that tags its frames does not reach another segment, nor get judged as the packet
/// inside: the kernel moves the tag into the packet's metadata before TC, and the datapath
/// drops such frames from a VM. The tagged frame here carries UDP the policy allows.
#[test]
fn vlan_tagged_frames_from_a_vm_are_dropped() {
    let Some(mut s) = setup("ns-vlan", 2) else {
        return;
    };
    let (c, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    s.apply(&client_server_rules());
    tagged_udp_is_dropped(&s, &c, &db, "every tagged frame dropped");
}

/// Nor does a VM receive tagged frames: here they come from a bridge port without the
/// datapath (as from a trunk uplink; the kernel moves the tag into the metadata on the way
/// in, and the bridge forwards it so), carrying UDP the policy allows to the VM.
#[test]
fn vlan_tagged_frames_to_a_vm_are_dropped() {
    let Some(mut s) = setup("ns-vlan-in", 2) else {
        return;
    };
    let (uplink, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    s.apply(&client_server_rules());
    s.dp.detach(uplink.ifindex)
        .expect("detach the uplink's port");
    tagged_udp_is_dropped(
        &s,
        &uplink,
        &db,
        "every tagged frame dropped on its way to the VM",
    );
}

/// `from` reaches `to` over UDP untagged, before and after sending it three tagged frames
/// of the same, allowed traffic, each of which the datapath counts as a VLAN drop.
fn tagged_udp_is_dropped(s: &Setup, from: &Vm, to: &Vm, dropped: &str) {
    let _dns = to.serve(DNS).expect("serve");
    assert!(
        from.udp_works(v4(to, DNS), T),
        "untagged, the datagram passes"
    );
    let frame = tagged_udp(from, to, 10, DNS);
    let before = s.tables.maps().stat(STAT_DROP_VLAN).expect("stat");
    let sent = from
        .enter(move || send_raw(&frame))
        .expect("enter the sender's namespace")
        .expect("send a raw frame");
    assert_eq!(sent, 3);
    let after = s.tables.maps().stat(STAT_DROP_VLAN).expect("stat");
    assert_eq!(after - before, 3, "{dropped}");
    assert!(
        from.udp_works(v4(to, DNS), T),
        "untagged traffic still passes"
    );
}

/// An Ethernet frame with an 802.1Q tag carrying IPv4/UDP from `from` to `to`.
fn tagged_udp(from: &Vm, to: &Vm, vlan: u16, port: u16) -> Vec<u8> {
    let payload = b"tagged";
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&from.ipv4.octets());
    ip.extend_from_slice(&to.ipv4.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&to.mac);
    f.extend_from_slice(&from.mac);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vlan.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4)
    f.extend_from_slice(payload);
    f
}

/// Send `frame` three times on this namespace's eth0 through a packet socket.
fn send_raw(frame: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls with valid, correctly sized arguments; the fd is owned.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _owned = OwnedFd::from_raw_fd(fd);
        let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let mut sent = 0;
        for _ in 0..3 {
            let rc = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            sent += 1;
        }
        // The frames reach the host's end of the veth before this returns (veth delivers in
        // the sender's context), but give the backlog a moment.
        std::thread::sleep(Duration::from_millis(100));
        Ok(sent)
    }
}

#[test]
fn bootstrap_posture_judges_an_interface_before_any_policy() {
    let Some(mut s) = setup("ns-bootstrap", 2) else {
        return;
    };
    let (c, db) = (s.lab.vms[0].clone(), s.lab.vms[1].clone());
    let _srv = db.serve(DB).expect("serve");
    // Attached, no policy: the documented default posture is deny.
    assert!(!c.tcp_works(v4(&db, DB), T), "bootstrap deny");
    assert!(s.tables.maps().stat(STAT_DROP_BOOTSTRAP).expect("stat") > 0);
    s.tables.set_posture(BOOTSTRAP_ALLOW, 0).expect("posture");
    assert!(c.tcp_works(v4(&db, DB), T), "bootstrap allow");
}

#[test]
fn loader_restart_keeps_enforcing_and_keeps_a_long_lived_connection() {
    let Some(s) = setup("ns-restart", 2) else {
        return;
    };
    let Setup {
        dp,
        mut tables,
        _pins: pins,
        lab,
    } = s;
    let (c, db) = (lab.vms[0].clone(), lab.vms[1].clone());
    let _srv = db.serve(DB).expect("serve");
    let _ssh = db.serve(SSH).expect("serve");
    let t = rules::tables(&lab.vms, &client_server_rules());
    tables.apply(&t, &bindings(&lab.vms)).expect("apply");
    let mut conn = c.connect(v4(&db, DB), T).expect("connect");
    assert!(echo_roundtrip(&mut conn, T));

    // The loader goes away: every fd it held is closed.
    drop(tables);
    drop(dp);
    assert!(
        echo_roundtrip(&mut conn, T),
        "connection survives the loader"
    );
    assert!(
        !c.tcp_works(v4(&db, SSH), T),
        "still enforcing without a loader"
    );

    // A new loader takes over the pinned links and maps, and re-applies the same policy.
    let mut dp = Datapath::load(&pins.0).expect("reload");
    let mut tables = dp.tables().expect("tables");
    for vm in &lab.vms {
        assert_eq!(
            dp.attach(vm.ifindex).expect("attach"),
            [AttachOutcome::Replaced; 2]
        );
    }
    assert_eq!(dp.attached_interfaces().expect("list"), {
        let mut v: Vec<u32> = lab.vms.iter().map(|v| v.ifindex).collect();
        v.sort();
        v
    });
    // The first apply fills the generation the old loader never wrote; the second finds,
    // read back from the maps, that the other generation already holds these tables.
    let report = tables.apply(&t, &bindings(&lab.vms)).expect("apply");
    assert!(report.written > 0, "{report:?}");
    assert!(
        echo_roundtrip(&mut conn, T),
        "connection survives the restart"
    );
    let report = tables.apply(&t, &bindings(&lab.vms)).expect("apply");
    assert_eq!(report.written + report.deleted, 0, "{report:?}");
    assert!(
        echo_roundtrip(&mut conn, T),
        "connection survives the restart"
    );
    assert!(!c.tcp_works(v4(&db, SSH), T));

    // Detaching an interface stops enforcement on it.
    dp.detach(db.ifindex).expect("detach");
    assert!(c.tcp_works(v4(&db, SSH), T), "detached: no longer judged");
    drop(tables);
    drop(dp);
    drop(pins);
    drop(lab);
}

#[test]
fn a_loader_of_another_layout_takes_over_without_a_gap() {
    if skip("ns-layout") {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    for i in 0..2 {
        lab.add_vm(&format!("vm{i}")).expect("vm");
    }
    let pins = PinRoot::new("ns-layout");
    let (c, db) = (lab.vms[0].clone(), lab.vms[1].clone());
    let _srv = db.serve(DB).expect("serve");
    let _ssh = db.serve(SSH).expect("serve");
    let t = rules::tables(&lab.vms, &client_server_rules());

    // The "old" loader: its own map directory, links pinned in the shared place.
    let old_layout = LAYOUT_VERSION + 1000;
    let mut old = Datapath::load_layout(&pins.0, old_layout).expect("old loader");
    let mut old_tables = old.tables().expect("tables");
    old_tables.apply(&t, &bindings(&lab.vms)).expect("apply");
    for vm in &lab.vms {
        old.attach(vm.ifindex).expect("attach");
    }
    let mut conn = c.connect(v4(&db, DB), T).expect("connect");
    assert!(echo_roundtrip(&mut conn, T));
    drop(old_tables);
    drop(old);

    // The new loader fills its own (empty) maps first, then swaps every link, then prunes.
    let mut dp = Datapath::load(&pins.0).expect("new loader");
    let mut tables = dp.tables().expect("tables");
    tables.apply(&t, &bindings(&lab.vms)).expect("apply");
    for vm in &lab.vms {
        assert_eq!(
            dp.attach(vm.ifindex).expect("attach"),
            [AttachOutcome::Replaced; 2]
        );
    }
    let removed = dp.prune_other_layouts().expect("prune");
    assert_eq!(removed, vec![pins.0.join(format!("v{old_layout}"))]);
    assert!(!c.tcp_works(v4(&db, SSH), T), "the new tables enforce");
    assert!(c.tcp_works(v4(&db, DB), T), "the new tables allow");
    // The new maps start with empty conntrack: the old connection is picked up mid-stream
    // and judged by policy, which allows it.
    assert!(
        echo_roundtrip(&mut conn, T),
        "allowed connection survives the upgrade"
    );
    drop(tables);
    drop(dp);
    drop(pins);
    drop(lab);
}
