use std::path::Path;

use bulkhead_abi::model::FlowQuery;
use bulkhead_abi::*;
use bulkhead_policy::*;

fn example() -> (load::PolicySet, Resolved) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    load_dir(&dir, None).unwrap_or_else(|e| panic!("{e}"))
}

fn judge(res: &Resolved, vm: &str, dir: u8, peer: &str, proto: u8, port: u16) -> Decision {
    evaluate(
        res,
        res.vm_by_name[vm],
        dir,
        peer.parse().unwrap(),
        proto,
        port,
    )
}

#[test]
fn example_policies_are_valid_and_mean_what_they_say() {
    let (_, res) = example();
    assert_eq!(res.vms.len(), 15);
    // clinic → HIS web https allowed
    let d = judge(&res, "his-web-1", DIR_INGRESS, "172.16.3.4", 6, 443);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_ALLOW, "app-his-web-from-clinic")
    );
    // clinic → HIS web ssh: rejected by the security tier
    let d = judge(&res, "his-web-1", DIR_INGRESS, "172.16.3.4", 6, 22);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_REJECT, "sec-ssh-from-elsewhere")
    );
    // jump → db ssh allowed
    let d = judge(&res, "db-his-1", DIR_INGRESS, "10.10.9.21", 6, 22);
    assert_eq!(d.action, ACTION_ALLOW);
    // his-app → his-db oracle: pass in security, allow in application
    let d = judge(&res, "db-his-1", DIR_INGRESS, "10.10.2.11", 6, 1521);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_ALLOW, "app-his-db-from-app")
    );
    assert!(d
        .trace
        .iter()
        .any(|s| s.rule == "sec-db-pass-apps" && s.outcome == "matched"));
    // symmetric: his-app egress to db oracle opened by the db's ingress rule
    let d = judge(&res, "his-app-1", DIR_EGRESS, "10.10.5.12", 6, 1521);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_ALLOW, "app-his-db-from-app")
    );
    // web → db directly: passes the security boundary (a clinical app) but no application
    // rule allows it: baseline deny
    let d = judge(&res, "db-his-1", DIR_INGRESS, "10.10.1.11", 6, 1521);
    assert_eq!((d.action, d.rule.as_str()), (ACTION_DENY, "base-deny-in"));
    // DMZ → db: denied at the security boundary
    let d = judge(&res, "db-his-1", DIR_INGRESS, "10.30.0.11", 6, 1521);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_DENY, "sec-db-deny-rest")
    );
    // IPv6 clinic → emr https
    let d = judge(&res, "emr-app-1", DIR_INGRESS, "fd00:172:16:7::9", 6, 443);
    assert_eq!(d.action, ACTION_ALLOW);
    // default deny for an unknown peer/port
    let d = judge(&res, "pacs-1", DIR_INGRESS, "192.0.2.1", 17, 9999);
    assert_eq!(d.action, ACTION_DENY);
    // monitor policy: lis deny becomes monitor
    let d = judge(&res, "lis-1", DIR_INGRESS, "10.10.1.11", 6, 80);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_MONITOR, "app-lis-deny-rest")
    );
    // system endpoint beats baseline deny
    let d = judge(&res, "pacs-1", DIR_EGRESS, "10.0.0.53", 17, 53);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_ALLOW, "system/dns-ntp")
    );
    // partial quarantine: forensics only
    let d = judge(&res, "his-test-1", DIR_INGRESS, "172.16.99.3", 6, 22);
    assert_eq!(d.action, ACTION_ALLOW);
    let d = judge(&res, "his-test-1", DIR_INGRESS, "10.10.9.21", 6, 22);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_DENY, "quarantine/his-test-1")
    );
    // ICMP echo from jump host
    let d = judge(&res, "his-web-1", DIR_INGRESS, "10.10.9.21", 1, 8 << 8);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_ALLOW, "sec-jump-ping-out")
    );
    // emergency blocklist
    let d = judge(&res, "dmz-proxy-1", DIR_EGRESS, "203.0.113.7", 6, 443);
    assert_eq!((d.action, d.rule.as_str()), (ACTION_DENY, "emg-block-c2"));
    let d = judge(&res, "dmz-proxy-1", DIR_EGRESS, "198.51.100.7", 6, 443);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (ACTION_ALLOW, "app-dmz-to-internet")
    );
}

#[test]
fn compiled_example_agrees_with_reference_on_a_grid() {
    let (_, res) = example();
    let c = compile(&res);
    let peers = [
        "10.10.1.11",
        "10.10.2.11",
        "10.10.5.12",
        "10.10.9.21",
        "172.16.3.4",
        "172.16.50.5",
        "172.16.50.20",
        "172.16.99.3",
        "203.0.113.7",
        "8.8.8.8",
        "10.0.0.53",
        "10.0.0.10",
        "10.30.0.10",
        "fd00::10",
        "fd00:172:16:7::9",
        "2001:db8::1",
        "fd00:10:10:1::12",
    ];
    let flows: [(u8, u16); 12] = [
        (6, 22),
        (6, 443),
        (6, 1521),
        (6, 5432),
        (6, 8085),
        (17, 53),
        (17, 123),
        (1, 8 << 8),
        (58, 128 << 8),
        (6, 10005),
        (47, 0),
        (17, 67),
    ];
    let mut n = 0;
    for (host, out) in &c.hosts {
        let idx = out.tables.index();
        for (slot, &(vm, _)) in out.slots.iter().enumerate() {
            for dir in [DIR_EGRESS, DIR_INGRESS] {
                for p in peers {
                    for (proto, port) in flows {
                        let want =
                            evaluate(&res, vm, dir, p.parse().unwrap(), proto, port).verdict();
                        let got = idx
                            .decide(&FlowQuery {
                                slot: slot as u32,
                                direction: dir,
                                peer: p.parse().unwrap(),
                                proto,
                                port,
                            })
                            .expect("endpoint has entries");
                        assert_eq!(
                            (got.action, got.flags & !VERDICT_REFINE, got.rule),
                            (want.action, want.flags, want.rule),
                            "{host} {} dir {dir} {p} {proto}/{port}",
                            res.vms[vm].name
                        );
                        n += 1;
                    }
                }
            }
        }
    }
    assert!(n > 1000);
}

#[test]
fn compile_is_deterministic() {
    let (_, a) = example();
    let (_, b) = example();
    let (ca, cb) = (compile(&a), compile(&b));
    assert_eq!(ca, cb);
    assert_eq!(ca.revision.len(), 64);
    for t in ca.hosts.values() {
        let t = &t.tables;
        assert!(t
            .ipcache
            .iter()
            .any(|e| e.prefix_len == 0 && e.addr.is_ipv4()));
        assert!(t
            .ipcache
            .iter()
            .any(|e| e.prefix_len == 0 && e.addr.is_ipv6()));
        assert!(t.policy.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(t.rules[0], "default");
    }
    // Hosts of one compile share identities: each equals its host compiled alone.
    for (host, out) in &ca.hosts {
        assert_eq!(
            **out,
            bulkhead_policy::compile::compile_host(&a, host),
            "{host}"
        );
    }
}

#[test]
fn endpoint_flags_and_shared_addresses_reach_the_tables() {
    let (_, res) = example();
    let c = compile(&res);
    let ep = |host: &str, id_prefix: &str| {
        c.hosts[host]
            .tables
            .endpoints
            .iter()
            .find(|e| e.id.starts_with(id_prefix))
            .cloned()
            .unwrap_or_else(|| panic!("{id_prefix} on {host}"))
    };
    assert_eq!(ep("kvm-02", "his-test-1/").flags & EP_MONITOR, EP_MONITOR);
    assert_eq!(
        ep("kvm-01", "dhcp-1/").flags & EP_INFRA_SERVER,
        EP_INFRA_SERVER
    );
    assert_eq!(ep("kvm-01", "his-app-1/").flags, 0);
    let vip: std::net::IpAddr = "10.30.0.10".parse().unwrap();
    assert!(ep("kvm-02", "dmz-proxy-1/").addrs.contains(&vip));
    assert!(ep("kvm-03", "dmz-proxy-2/").addrs.contains(&vip));
    // backup-1 has two interfaces: two slots with their own addresses.
    let b: Vec<_> = c.hosts["kvm-03"]
        .tables
        .endpoints
        .iter()
        .filter(|e| e.id.starts_with("backup-1/"))
        .collect();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].id, "backup-1/52:54:00:10:00:0a");
    // The VIP is a managed address: internet → VIP https is allowed on both proxies.
    let d = evaluate(
        &res,
        res.vm_by_name["dmz-proxy-1"],
        DIR_INGRESS,
        "198.51.100.9".parse().unwrap(),
        6,
        443,
    );
    assert_eq!(d.action, ACTION_ALLOW);
}

#[test]
fn rule_table_rows_match_their_count() {
    let (_, res) = example();
    let rows = bulkhead_policy::export::rule_rows(&res);
    assert_eq!(rows.len(), bulkhead_policy::export::row_count(&res));
    assert!(rows.iter().any(|r| r.tier == "quarantine"));
}
