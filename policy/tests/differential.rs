//! Property test: for random inventories and policy sets, the compiled tables read through
//! `TableIndex::decide` (the datapath's model) agree with the reference evaluator on every
//! sampled flow.
#![allow(clippy::type_complexity)]
use std::collections::BTreeMap;

use bulkhead_abi::model::FlowQuery;
use bulkhead_abi::*;
use bulkhead_policy::types::*;
use bulkhead_policy::*;
use proptest::prelude::*;

const ADDRS: [&str; 12] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3",
    "10.2.0.0/16",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "fd00::/8",
    "fd00:1::/32",
    "fd00:1::5",
    "::/0",
    "10.1.2.128/25",
];
const LABELS: [(&str, &str); 4] = [("app", "a"), ("app", "b"), ("role", "db"), ("role", "web")];

fn vm_strategy(i: usize) -> impl Strategy<Value = Vm> {
    (
        proptest::collection::vec(0..LABELS.len(), 0..3),
        0..2usize,
        1..3usize,
    )
        .prop_map(move |(ls, host, nif)| {
            let labels: BTreeMap<String, String> = ls
                .into_iter()
                .map(|l| (LABELS[l].0.to_string(), LABELS[l].1.to_string()))
                .collect();
            let interfaces = (0..nif)
                .map(|k| Interface {
                    mac: format!("52:54:00:00:{:02x}:{:02x}", k, i),
                    ips: if k == 0 {
                        vec![format!("10.1.2.{}", i + 1), format!("fd00:1::{:x}", i + 1)]
                    } else {
                        vec![format!("10.2.0.{}", i + 1)]
                    },
                })
                .collect();
            Vm {
                name: format!("vm{i}"),
                uuid: format!("u{i}"),
                labels,
                host: format!("h{host}"),
                interfaces,
                infra_server: false,
            }
        })
}

fn peer_strategy(nvms: usize) -> impl Strategy<Value = Peer> {
    prop_oneof![
        (0..LABELS.len()).prop_map(|l| Peer {
            labels: Some([(LABELS[l].0.to_string(), LABELS[l].1.to_string())].into()),
            ..Default::default()
        }),
        (0..nvms).prop_map(|v| Peer {
            vm: Some(format!("vm{v}")),
            ..Default::default()
        }),
        (0..ADDRS.len(), proptest::option::of(0..ADDRS.len())).prop_map(|(a, e)| {
            let cidr = ADDRS[a].to_string();
            let outer = bulkhead_policy::net::Net::parse(&cidr).unwrap();
            let except = e
                .map(|e| ADDRS[e].to_string())
                .filter(|e| {
                    let n = bulkhead_policy::net::Net::parse(e).unwrap();
                    outer.contains(&n) && n != outer
                })
                .into_iter()
                .collect();
            Peer {
                ip_block: Some(IpBlock { cidr, except }),
                ..Default::default()
            }
        }),
        (0..2usize).prop_map(|_| Peer {
            group: Some("g".into()),
            ..Default::default()
        }),
        Just(Peer {
            expressions: Some(vec![LabelExpr {
                key: "role".into(),
                operator: LabelOp::DoesNotExist,
                values: vec![]
            }]),
            ..Default::default()
        }),
    ]
}

fn svc_strategy() -> impl Strategy<Value = ServiceRef> {
    prop_oneof![
        (prop_oneof![Just("tcp"), Just("udp")], 1u32..30, 0u32..10).prop_map(|(p, a, w)| {
            ServiceRef::Inline(PortSpec {
                protocol: p.into(),
                ports: Some(PortList::List(format!("{}-{}", a, a + w))),
                icmp_type: None,
                icmp_code: None,
            })
        }),
        (0u8..3, proptest::option::of(0u8..2)).prop_map(|(t, c)| ServiceRef::Inline(PortSpec {
            protocol: "icmp".into(),
            ports: None,
            icmp_type: Some(t),
            icmp_code: c,
        })),
        Just(ServiceRef::Inline(PortSpec {
            protocol: "tcp".into(),
            ports: None,
            icmp_type: None,
            icmp_code: None
        })),
        Just(ServiceRef::Inline(PortSpec {
            protocol: "47".into(),
            ports: None,
            icmp_type: None,
            icmp_code: None
        })),
        Just(ServiceRef::Named("web".into())),
    ]
}

fn rule_strategy(nvms: usize) -> impl Strategy<Value = (Action, Vec<Peer>, Vec<ServiceRef>, bool)> {
    (
        prop_oneof![
            Just(Action::Allow),
            Just(Action::Deny),
            Just(Action::Reject),
            Just(Action::Pass)
        ],
        proptest::collection::vec(peer_strategy(nvms), 0..3),
        proptest::collection::vec(svc_strategy(), 0..3),
        any::<bool>(),
    )
}

fn policy_strategy(
    nvms: usize,
) -> impl Strategy<
    Value = (
        usize,
        bool,
        bool,
        Vec<Peer>,
        Vec<(bool, (Action, Vec<Peer>, Vec<ServiceRef>, bool))>,
    ),
> {
    (
        0..3usize,
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(
            peer_strategy(nvms)
                .prop_filter("vms only", |p| p.ip_block.is_none() && p.group.is_none()),
            1..3,
        ),
        proptest::collection::vec((any::<bool>(), rule_strategy(nvms)), 0..5),
    )
}

fn setup() -> impl Strategy<Value = (Vec<Vm>, PolicyFile, Vec<(usize, u8, u16)>)> {
    (2..7usize)
        .prop_flat_map(|n| {
            (
                (0..n).map(vm_strategy).collect::<Vec<_>>(),
                proptest::collection::vec(policy_strategy(n), 1..6),
                proptest::collection::vec(
                    peer_strategy(n).prop_filter("no self", |p| p.group.is_none()),
                    1..3,
                ),
                proptest::option::of((0..n, any::<bool>())),
                prop_oneof![
                    Just(DefaultAction::Deny),
                    Just(DefaultAction::Allow),
                    Just(DefaultAction::Reject)
                ],
                proptest::collection::vec((0..40usize, 0u8..6, 0u16..40), 60),
            )
        })
        .prop_map(|(vms, pols, group, quar, default_action, flows)| {
            let policies = pols
                .into_iter()
                .enumerate()
                .map(|(i, (tier, monitor, symmetric, applies_to, rules))| {
                    let mut p = Policy {
                        name: format!("p{i}"),
                        tier: format!("t{tier}"),
                        priority: i as u32,
                        mode: if monitor {
                            Mode::Monitor
                        } else {
                            Mode::Enforce
                        },
                        symmetric,
                        applies_to,
                        ingress: vec![],
                        egress: vec![],
                        description: None,
                    };
                    for (j, (ingress, (action, peers, services, log))) in
                        rules.into_iter().enumerate()
                    {
                        let r = Rule {
                            id: format!("p{i}-r{j}"),
                            action,
                            peers,
                            services,
                            log,
                            description: None,
                        };
                        if ingress {
                            p.ingress.push(r)
                        } else {
                            p.egress.push(r)
                        }
                    }
                    p
                })
                .collect();
            let file = PolicyFile {
                settings: Some(Settings {
                    tiers: vec!["t0".into(), "t1".into(), "t2".into()],
                    default_action,
                    system_endpoints: vec![SystemEndpoint {
                        name: "dns".into(),
                        addresses: vec!["192.168.0.53".into()],
                        services: vec![ServiceRef::Named("web".into())],
                        description: None,
                    }],
                    shared_addresses: vec![SharedAddress {
                        address: "10.1.2.200".into(),
                        vms: vec!["vm0".into(), "vm1".into()],
                    }],
                    monitor_endpoints: vec![],
                }),
                groups: vec![Group {
                    name: "g".into(),
                    members: group,
                    description: None,
                }],
                services: vec![Service {
                    name: "web".into(),
                    ports: vec![PortSpec {
                        protocol: "tcp".into(),
                        ports: Some(PortList::List("5,8-12".into())),
                        icmp_type: None,
                        icmp_code: None,
                    }],
                    description: None,
                }],
                policies,
                quarantine: quar
                    .map(|(v, full)| Quarantine {
                        vm: format!("vm{v}"),
                        mode: if full {
                            QuarantineMode::Full
                        } else {
                            QuarantineMode::Partial
                        },
                        allow: if full {
                            vec![]
                        } else {
                            vec![Peer {
                                vm: Some("vm0".into()),
                                ..Default::default()
                            }]
                        },
                        reason: None,
                    })
                    .into_iter()
                    .collect(),
            };
            (vms, file, flows)
        })
}

const PEERS: [&str; 14] = [
    "10.1.2.1",
    "10.1.2.2",
    "10.1.2.3",
    "10.1.2.5",
    "10.2.0.1",
    "10.2.0.3",
    "10.1.2.200",
    "10.1.2.130",
    "10.9.9.9",
    "192.168.0.53",
    "8.8.8.8",
    "fd00:1::1",
    "fd00:1::5",
    "2001:db8::1",
];
const EXTRA: [&str; 26] = [
    "fd00:1::2",
    "fd00:1::3",
    "fd00:2::1",
    "10.1.9.9",
    "192.168.3.3",
    "10.2.0.2",
    "10.1.2.4",
    "10.1.2.6",
    "10.2.0.4",
    "10.2.0.5",
    "10.2.0.6",
    "fd00:1::4",
    "fd00:1::6",
    "1.1.1.1",
    "::1",
    "10.1.2.255",
    "10.0.0.1",
    "10.1.0.1",
    "10.255.255.255",
    "192.168.255.255",
    "fd00::1",
    "fd01::1",
    "10.1.2.127",
    "10.1.2.128",
    "172.16.0.1",
    "fe80::1",
];

fn yaml_roundtrip(vms: &[Vm], file: &PolicyFile) -> Result<(load::PolicySet, Resolved), LoadError> {
    let inv = Inventory { vms: vms.to_vec() };
    load_sources(
        vec![Source::new(
            "gen.yaml",
            serde_yaml::to_string(file).unwrap(),
        )],
        Some(Source::new(
            "inventory.yaml",
            serde_yaml::to_string(&inv).unwrap(),
        )),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    #[test]
    fn compiled_tables_agree_with_reference((vms, file, flows) in setup()) {
        let (_, res) = match yaml_roundtrip(&vms, &file) {
            Ok(r) => r,
            Err(e) => panic!("generated set must be valid: {e}"),
        };
        let c = compile(&res);
        for out in c.hosts.values() {
            let idx = out.tables.index();
            for (slot, &(vm, _)) in out.slots.iter().enumerate() {
                for &(pi, proto_i, port) in &flows {
                    let peer = if pi < PEERS.len() { PEERS[pi] } else { EXTRA[pi - PEERS.len()] };
                    let proto = [6u8, 17, 1, 58, 47, 132][proto_i as usize];
                    let port = if proto == 1 || proto == 58 { ((port % 4) << 8) | ((port / 4) % 3) } else { port };
                    for dir in [DIR_EGRESS, DIR_INGRESS] {
                        let want = evaluate(&res, vm, dir, peer.parse().unwrap(), proto, port).verdict();
                        let got = idx.decide(&FlowQuery { slot: slot as u32, direction: dir, peer: peer.parse().unwrap(), proto, port })
                            .expect("every endpoint has entries");
                        prop_assert_eq!(
                            (got.action, got.flags & !VERDICT_REFINE, got.rule),
                            (want.action, want.flags, want.rule),
                            "vm {} dir {} peer {} proto {} port {}", res.vms[vm].name, dir, peer, proto, port
                        );
                    }
                }
            }
        }
        // determinism
        prop_assert_eq!(compile(&res), c);
    }
}

/// One small edit of a generated set (the kinds of change the incremental fast path sees).
fn mutate(vms: &mut [Vm], file: &mut PolicyFile, kind: usize, k: usize) {
    let nvm = vms.len();
    let vm = &mut vms[k % nvm];
    match kind {
        0 => vm.host = if vm.host == "h0" { "h1" } else { "h0" }.into(),
        1 => {
            if vm.labels.remove("app").is_none() {
                vm.labels.insert("app".into(), "b".into());
            }
        }
        2 => vm.interfaces[0].ips[0] = format!("10.1.2.{}", 100 + k % nvm),
        3 => vm.infra_server = !vm.infra_server,
        _ => {
            let np = file.policies.len();
            let p = &mut file.policies[k % np];
            let rule = p.ingress.first_mut().or(p.egress.first_mut());
            match (kind, rule) {
                (4, Some(r)) => r.services = vec![ServiceRef::Named("web".into())],
                (5, Some(r)) => {
                    r.action = match r.action {
                        Action::Allow => Action::Deny,
                        Action::Deny => Action::Pass,
                        _ => Action::Allow,
                    }
                }
                (6, Some(r)) => {
                    r.peers = vec![Peer {
                        vm: Some(format!("vm{}", k % nvm)),
                        ..Default::default()
                    }]
                }
                (7, Some(r)) => r.log = !r.log,
                (8, _) => {
                    p.applies_to = vec![Peer {
                        vm: Some(format!("vm{}", k % nvm)),
                        ..Default::default()
                    }]
                }
                (9, _) => p.symmetric = !p.symmetric,
                (10, _) => {
                    p.mode = match p.mode {
                        Mode::Enforce => Mode::Monitor,
                        Mode::Monitor => Mode::Enforce,
                    }
                }
                _ => {
                    file.groups[0].members = vec![Peer {
                        vm: Some(format!("vm{}", k % nvm)),
                        ..Default::default()
                    }]
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]
    /// An incremental compile after a sequence of small edits equals a full compile.
    #[test]
    fn incremental_equals_full_after_edits(
        (vms, file, _) in setup(),
        edits in proptest::collection::vec((0..12usize, 0..16usize), 1..4),
    ) {
        let (_, res) = yaml_roundtrip(&vms, &file).unwrap_or_else(|e| panic!("{e}"));
        let mut inc = incremental::Incremental::default();
        prop_assert_eq!(inc.compile(&res), compile(&res));
        let (mut vms, mut file) = (vms, file);
        for (kind, k) in edits {
            mutate(&mut vms, &mut file, kind, k);
            // An edit may make the set invalid (e.g. a duplicate address): skip those.
            let Ok((_, res)) = yaml_roundtrip(&vms, &file) else { continue };
            prop_assert_eq!(inc.compile(&res), compile(&res));
        }
    }
}
