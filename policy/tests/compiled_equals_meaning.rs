//! Property: for random policy sets, inventories and flows, the compiled tables read the way
//! the datapath reads them (`TableIndex::decide`) give exactly the reference evaluator's
//! verdict and rule.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_abi::model::FlowQuery;
use bulkhead_abi::*;
use bulkhead_policy::eval::{evaluate, Flow};
use bulkhead_policy::model::*;
use bulkhead_policy::resolve::Resolved;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng};
use rand::{Rng, SeedableRng};

fn pick<'a, T>(rng: &mut impl Rng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

fn random_case(seed: u64) -> (PolicyFile, Inventory) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let apps = ["emr", "pacs", "his", "lis"];
    let roles = ["web", "app", "db"];
    let mut inv = Inventory::default();
    let n_vms = rng.random_range(3..10);
    for i in 0..n_vms {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), pick(&mut rng, &apps).to_string());
        if rng.random_bool(0.7) {
            labels.insert("role".to_string(), pick(&mut rng, &roles).to_string());
        }
        if rng.random_bool(0.5) {
            labels.insert(
                "env".to_string(),
                pick(&mut rng, &["prod", "test"]).to_string(),
            );
        }
        let net = rng.random_range(0..3u8);
        inv.vms.push(VmRecord {
            name: format!("vm{i}"),
            uuid: String::new(),
            host: format!("h{}", rng.random_range(1..3)),
            labels,
            interfaces: vec![InterfaceRecord {
                device: format!("tap{i}"),
                mac: format!("52:54:00:00:00:{i:02x}"),
                addresses: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 0, net, 10 + i as u8)),
                    IpAddr::V6(Ipv6Addr::new(
                        0xfd00,
                        0,
                        0,
                        u16::from(net),
                        0,
                        0,
                        0,
                        10 + i as u16,
                    )),
                ],
            }],
        });
    }
    let mut pf = PolicyFile {
        settings: Some(Settings {
            default_action: *pick(
                &mut rng,
                &[Action::Deny, Action::Deny, Action::Allow, Action::Reject],
            ),
            tiers: default_tiers(),
        }),
        ..Default::default()
    };
    let blocks = [
        ("10.0.0.0/24", vec![]),
        ("10.0.1.0/24", vec!["10.0.1.16/28".to_string()]),
        ("10.0.0.0/8", vec!["10.0.2.0/24".to_string()]),
        ("0.0.0.0/0", vec!["10.0.0.0/8".to_string()]),
        ("fd00::/16", vec![]),
        ("fd00:0:0:1::/64", vec![]),
    ];
    for g in 0..rng.random_range(2..7) {
        let mut group = Group {
            name: format!("g{g}"),
            ..Default::default()
        };
        match rng.random_range(0..5) {
            0 => {
                group
                    .labels
                    .insert("app".into(), pick(&mut rng, &apps).to_string());
            }
            1 => group.expressions.push(Expression {
                key: "role".into(),
                operator: *pick(&mut rng, &[Operator::In, Operator::NotIn]),
                values: vec![pick(&mut rng, &roles).to_string()],
            }),
            2 => group.expressions.push(Expression {
                key: "env".into(),
                operator: *pick(&mut rng, &[Operator::Exists, Operator::DoesNotExist]),
                values: vec![],
            }),
            3 => group.vms.push(format!("vm{}", rng.random_range(0..n_vms))),
            _ => {
                let (cidr, except) = pick(&mut rng, &blocks).clone();
                group.ip_blocks.push(IpBlock {
                    cidr: cidr.into(),
                    except,
                });
            }
        }
        if g > 0 && rng.random_bool(0.3) {
            group.groups.push(format!("g{}", rng.random_range(0..g)));
        }
        pf.groups.push(group);
    }
    let n_groups = pf.groups.len();
    let port = |p: PortValue| PortSpec {
        protocol: Protocol::Tcp,
        port: Some(p),
        icmp_type: None,
        icmp_code: None,
    };
    pf.services = vec![
        Service {
            name: "ssh".into(),
            description: String::new(),
            ports: vec![port(PortValue::One(22))],
        },
        Service {
            name: "web".into(),
            description: String::new(),
            ports: vec![
                port(PortValue::One(443)),
                port(PortValue::Range("8000-8100".into())),
            ],
        },
        Service {
            name: "alt".into(),
            description: String::new(),
            ports: vec![port(PortValue::Range("8050-8200".into()))],
        },
        Service {
            name: "dns".into(),
            description: String::new(),
            ports: vec![PortSpec {
                protocol: Protocol::Udp,
                port: Some(PortValue::One(53)),
                icmp_type: None,
                icmp_code: None,
            }],
        },
        Service {
            name: "ping".into(),
            description: String::new(),
            ports: vec![
                PortSpec {
                    protocol: Protocol::Icmp,
                    port: None,
                    icmp_type: Some(8),
                    icmp_code: None,
                },
                PortSpec {
                    protocol: Protocol::Icmpv6,
                    port: None,
                    icmp_type: Some(128),
                    icmp_code: Some(0),
                },
            ],
        },
        Service {
            name: "udp-all".into(),
            description: String::new(),
            ports: vec![PortSpec {
                protocol: Protocol::Udp,
                port: None,
                icmp_type: None,
                icmp_code: None,
            }],
        },
    ];
    let services = ["ssh", "web", "alt", "dns", "ping", "udp-all", "any"];
    let tiers = default_tiers();
    let mut rule_no = 0;
    for p in 0..rng.random_range(1..6) {
        let mut rules = |rng: &mut rand::rngs::StdRng, ingress: bool| -> Vec<Rule> {
            (0..rng.random_range(0..4))
                .map(|_| {
                    rule_no += 1;
                    let peers: Vec<String> = (0..rng.random_range(1..3))
                        .map(|_| {
                            if rng.random_bool(0.2) {
                                "any".to_string()
                            } else {
                                format!("g{}", rng.random_range(0..n_groups))
                            }
                        })
                        .collect();
                    let svcs = (0..rng.random_range(0..3))
                        .map(|_| pick(rng, &services).to_string())
                        .collect();
                    Rule {
                        id: format!("r{rule_no}"),
                        action: *pick(
                            rng,
                            &[
                                Action::Allow,
                                Action::Allow,
                                Action::Deny,
                                Action::Reject,
                                Action::Pass,
                            ],
                        ),
                        from: if ingress { peers.clone() } else { vec![] },
                        to: if ingress { vec![] } else { peers },
                        services: svcs,
                        log: rng.random_bool(0.3),
                        description: String::new(),
                        symmetric: rng.random_bool(0.7),
                    }
                })
                .collect()
        };
        let ingress = rules(&mut rng, true);
        let egress = rules(&mut rng, false);
        pf.policies.push(Policy {
            name: format!("p{p}"),
            description: String::new(),
            tier: pick(&mut rng, &tiers).clone(),
            priority: 10 * p as u32,
            mode: if rng.random_bool(0.2) {
                Mode::Monitor
            } else {
                Mode::Enforce
            },
            applies_to: vec![format!("g{}", rng.random_range(0..n_groups))],
            ingress,
            egress,
        });
    }
    if rng.random_bool(0.3) {
        pf.quarantine.push(Quarantine {
            vm: format!("vm{}", rng.random_range(0..n_vms)),
            allow: if rng.random_bool(0.5) {
                vec![format!("g{}", rng.random_range(0..n_groups))]
            } else {
                vec![]
            },
            reason: String::new(),
        });
    }
    if rng.random_bool(0.3) {
        pf.infrastructure.push(Infrastructure {
            name: "dns".into(),
            ip_blocks: vec![IpBlock {
                cidr: "10.0.0.53/32".into(),
                except: vec![],
            }],
            services: vec!["dns".into()],
        });
    }
    (pf, inv)
}

fn check(seed: u64) -> Result<usize, TestCaseError> {
    let (pf, inv) = random_case(seed);
    let yaml = serde_yaml::to_string(&pf).expect("serialise");
    let set =
        bulkhead_policy::load_sources(&[("random.yaml".into(), yaml.clone())]).map_err(|e| {
            TestCaseError::fail(format!("seed {seed}: generated set invalid: {e:?}\n{yaml}"))
        })?;
    let res = Resolved::new(&set, &inv);
    let hosts = bulkhead_policy::compile(&set, &inv);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut peers: Vec<IpAddr> = inv
        .vms
        .iter()
        .flat_map(|v| v.interfaces[0].addresses.clone())
        .collect();
    for a in [
        "10.0.0.53",
        "10.0.1.20",
        "10.0.1.200",
        "10.0.2.7",
        "10.9.9.9",
        "192.0.2.1",
        "8.8.8.8",
        "fd00::1",
        "fd00:0:0:1::99",
        "2001:db8::1",
    ] {
        peers.push(a.parse().expect("literal"));
    }
    let mut checked = 0;
    for (host, tables) in &hosts {
        let idx = tables.index();
        for (slot, ep) in tables.endpoints.iter().enumerate() {
            let vm = inv
                .vms
                .iter()
                .position(|v| ep.id.starts_with(&format!("{}/", v.name)))
                .expect("endpoint of a VM");
            for _ in 0..40 {
                let peer = *pick(&mut rng, &peers);
                let proto = *pick(&mut rng, &[6u8, 6, 17, 1, 58, 47]);
                let port = match proto {
                    1 => *pick(&mut rng, &[8 << 8, 0, 3 << 8 | 1]),
                    58 => *pick(&mut rng, &[128 << 8, 128 << 8 | 1, 129 << 8]),
                    47 => 0,
                    _ => *pick(
                        &mut rng,
                        &[
                            22u16, 53, 443, 8000, 8049, 8050, 8100, 8101, 8200, 8201, 9999,
                        ],
                    ),
                };
                let direction = *pick(&mut rng, &[DIR_EGRESS, DIR_INGRESS]);
                let want = evaluate(
                    &res,
                    &Flow {
                        vm,
                        direction,
                        peer,
                        proto,
                        port,
                    },
                );
                let got = idx
                    .decide(&FlowQuery {
                        slot: slot as u32,
                        direction,
                        peer,
                        proto,
                        port,
                    })
                    .ok_or_else(|| {
                        TestCaseError::fail(format!("seed {seed}: no entries for {}", ep.id))
                    })?;
                let got_rule = &tables.rules[got.rule as usize];
                let want_rule = want.rule.as_ref().map_or("default", |r| r.id.as_str());
                prop_assert_eq!(
                    (got.action, got.flags & VERDICT_LOG, got_rule.as_str()),
                    (want.action, want.flags, want_rule),
                    "seed {} host {} {} dir {} peer {} proto {} port {}\n{}",
                    seed,
                    host,
                    ep.id,
                    direction,
                    peer,
                    proto,
                    port,
                    yaml
                );
                checked += 1;
            }
        }
    }
    Ok(checked)
}

proptest! {
    #![proptest_config(Config { cases: 300, rng_algorithm: RngAlgorithm::ChaCha, ..Config::default() })]
    #[test]
    fn compiled_tables_agree_with_the_reference_evaluator(seed in any::<u64>()) {
        check(seed)?;
    }
}

#[test]
fn fixed_seeds_cover_thousands_of_flows() {
    let mut total = 0;
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    for _ in 0..50 {
        total += check(rng.random()).expect("agree");
    }
    assert!(total > 2000, "only {total} flows checked");
}
