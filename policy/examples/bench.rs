//! Generated large policy set: 10k VMs, 500 groups, 2k policies / 20k rules.
//!
//!   cargo run --release -p bulkhead-policy --example bench [-- VMS GROUPS POLICIES RULES_PER_POLICY HOSTS [--spread]]
//!
//! By default VM i runs on host i % HOSTS, so a host's VMs have only VMS/HOSTS/(VMS/GROUPS)
//! distinct apps (5 at the default size) and share entry lists. `--spread` puts consecutive
//! VMs on a host instead: every VM of a host has a different app (harder for the compiler).
use std::collections::BTreeMap;
use std::time::Instant;

use bulkhead_policy::incremental::Incremental;
use bulkhead_policy::types::*;
use bulkhead_policy::*;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |k| k / 1024.0)
}

/// CPU time of the whole process (all threads), in ms: less sensitive to other jobs'
/// load than wall time.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let nvm = *a.first().unwrap_or(&10_000);
    let ngroups = *a.get(1).unwrap_or(&500);
    let npol = *a.get(2).unwrap_or(&2_000);
    let rpp = *a.get(3).unwrap_or(&10);
    let nhosts = *a.get(4).unwrap_or(&100);
    let napps = ngroups; // one app label per group
    let spread = std::env::args().any(|a| a == "--spread");
    let host_of = |i: usize| {
        if spread {
            i * nhosts / nvm
        } else {
            i % nhosts
        }
    };
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let roles = ["web", "app", "db"];
    let vms: Vec<Vm> = (0..nvm)
        .map(|i| Vm {
            name: format!("vm-{i:05}"),
            uuid: format!("00000000-0000-0000-0000-{i:012}"),
            labels: BTreeMap::from([
                ("app".to_string(), format!("app{}", i % napps)),
                ("role".to_string(), roles[i % 3].to_string()),
                (
                    "env".to_string(),
                    if i % 10 == 0 { "test" } else { "prod" }.to_string(),
                ),
            ]),
            host: format!("kvm-{:03}", host_of(i)),
            interfaces: vec![Interface {
                mac: format!(
                    "52:54:00:{:02x}:{:02x}:{:02x}",
                    (i >> 16) & 0xff,
                    (i >> 8) & 0xff,
                    i & 0xff
                ),
                ips: vec![
                    format!("10.{}.{}.{}", 16 + (i >> 16), (i >> 8) & 0xff, i & 0xff),
                    format!("fd00:10::{:x}", i + 1),
                ],
            }],
            infra_server: false,
        })
        .collect();
    let groups: Vec<Group> = (0..ngroups)
        .map(|g| Group {
            name: format!("g{g}"),
            members: if g % 25 == 24 {
                vec![Peer {
                    ip_block: Some(IpBlock {
                        cidr: format!("172.{}.0.0/16", 16 + g % 16),
                        except: vec![format!("172.{}.1.0/24", 16 + g % 16)],
                    }),
                    ..Default::default()
                }]
            } else {
                vec![Peer {
                    labels: Some(BTreeMap::from([("app".to_string(), format!("app{g}"))])),
                    ..Default::default()
                }]
            },
            description: None,
        })
        .collect();
    let services: Vec<Service> = (0..30)
        .map(|s| Service {
            name: format!("svc{s}"),
            ports: vec![PortSpec {
                protocol: if s % 5 == 4 { "udp" } else { "tcp" }.into(),
                ports: Some(PortList::List(if s % 7 == 0 {
                    format!("{}-{}", 8000 + s * 10, 8005 + s * 10)
                } else {
                    format!("{}", 1000 + s)
                })),
                icmp_type: None,
                icmp_code: None,
            }],
            description: None,
        })
        .collect();
    let tiers = ["emergency", "security", "application", "baseline"];
    let mut policies = Vec::new();
    for p in 0..npol {
        let mut pol = Policy {
            name: format!("pol{p}"),
            tier: tiers[if p < npol / 20 { 1 } else { 2 }].into(),
            priority: p as u32,
            mode: Mode::Enforce,
            symmetric: true,
            applies_to: vec![Peer {
                group: Some(format!("g{}", {
                    let g = (p * 7) % ngroups;
                    if g % 25 == 24 {
                        (g + 1) % ngroups
                    } else {
                        g
                    }
                })),
                ..Default::default()
            }],
            ingress: vec![],
            egress: vec![],
            description: None,
        };
        for r in 0..rpp {
            let g = rng.below(ngroups);
            let rule = Rule {
                id: format!("pol{p}-r{r}"),
                action: match rng.below(10) {
                    0 => Action::Deny,
                    1 => Action::Pass,
                    _ => Action::Allow,
                },
                peers: vec![Peer {
                    group: Some(format!("g{g}")),
                    ..Default::default()
                }],
                services: vec![ServiceRef::Named(format!("svc{}", rng.below(30)))],
                log: rng.below(4) == 0,
                description: None,
            };
            if r % 3 == 2 {
                pol.egress.push(rule)
            } else {
                pol.ingress.push(rule)
            }
        }
        policies.push(pol);
    }
    policies.push(Policy {
        name: "baseline".into(),
        tier: "baseline".into(),
        priority: 1,
        mode: Mode::Enforce,
        symmetric: false,
        applies_to: vec![Peer {
            expressions: Some(vec![LabelExpr {
                key: "app".into(),
                operator: LabelOp::Exists,
                values: vec![],
            }]),
            ..Default::default()
        }],
        ingress: vec![Rule {
            id: "base-in".into(),
            action: Action::Deny,
            peers: vec![],
            services: vec![],
            log: true,
            description: None,
        }],
        egress: vec![Rule {
            id: "base-out".into(),
            action: Action::Deny,
            peers: vec![],
            services: vec![],
            log: true,
            description: None,
        }],
        description: None,
    });
    let file = PolicyFile {
        settings: Some(Settings {
            tiers: tiers.iter().map(|s| s.to_string()).collect(),
            default_action: DefaultAction::Deny,
            system_endpoints: vec![SystemEndpoint {
                name: "dns".into(),
                addresses: vec!["10.0.0.53".into()],
                services: vec![],
                description: None,
            }],
            shared_addresses: vec![],
            monitor_endpoints: vec![],
        }),
        groups,
        services,
        policies,
        quarantine: vec![],
    };
    let nrules: usize = file
        .policies
        .iter()
        .map(|p| p.ingress.len() + p.egress.len())
        .sum();
    let policy_yaml = serde_yaml::to_string(&file).unwrap();
    let inv_yaml = serde_yaml::to_string(&Inventory { vms }).unwrap();
    println!("input: {nvm} VMs on {nhosts} hosts{}, {ngroups} groups, {} policies, {nrules} rules ({} KiB YAML)", if spread { " (spread)" } else { "" }, file.policies.len(), (policy_yaml.len() + inv_yaml.len()) / 1024);

    let src = |t: &str, n: &str| Source::new(n, t);
    let (t0, c0) = (Instant::now(), cpu_ms());
    let (_, res) = load_sources(
        vec![src(&policy_yaml, "policy.yaml")],
        Some(src(&inv_yaml, "inventory.yaml")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (t_load, c_load) = (t0.elapsed(), cpu_ms() - c0);
    let rss_load = peak_rss_mb();
    let (t1, c1) = (Instant::now(), cpu_ms());
    let mut inc = Incremental::default();
    let c = inc.compile(&res);
    let (t_compile, c_compile) = (t1.elapsed(), cpu_ms() - c1);
    let entries: usize = c.hosts.values().map(|h| h.tables.policy.len()).sum();
    let ipc: usize = c
        .hosts
        .values()
        .map(|h| h.tables.ipcache.len())
        .max()
        .unwrap_or(0);
    let pe: usize = c
        .hosts
        .values()
        .map(|h| h.tables.policy.len())
        .max()
        .unwrap_or(0);

    // One rule change: the services of one rule.
    let mut file2 = file.clone();
    file2.policies[npol / 2].ingress[0].services = vec![ServiceRef::Named("svc3".into())];
    let yaml2 = serde_yaml::to_string(&file2).unwrap();
    let t2 = Instant::now();
    let (_, res2) = load_sources(
        vec![src(&yaml2, "policy.yaml")],
        Some(src(&inv_yaml, "inventory.yaml")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let t_load2 = t2.elapsed();
    let (t3, c3) = (Instant::now(), cpu_ms());
    let c2 = inc.compile(&res2);
    let (t_inc, c_inc) = (t3.elapsed(), cpu_ms() - c3);
    let changed = c
        .hosts
        .iter()
        .filter(|(h, o)| c2.hosts[*h].revision != o.revision)
        .count();
    let check = compile(&res2);
    assert_eq!(check, c2, "incremental result must equal a full compile");

    println!("| step | wall time | CPU time (all threads) |");
    println!("|---|---|---|");
    println!(
        "| parse + validate + resolve (YAML → Resolved; not part of compile) | {:.0} ms | {c_load:.0} ms |",
        t_load.as_secs_f64() * 1e3
    );
    println!(
        "| full compile, Resolved → tables of all {} hosts (first `Incremental::compile`) | {:.0} ms | {c_compile:.0} ms |",
        c.hosts.len(),
        t_compile.as_secs_f64() * 1e3
    );
    println!(
        "| re-parse after one rule change | {:.0} ms | |",
        t_load2.as_secs_f64() * 1e3
    );
    println!("| incremental compile after one rule change ({changed} host(s) changed, {} recomputed) | {:.1} ms | {c_inc:.1} ms |", inc.last_recomputed, t_inc.as_secs_f64() * 1e3);
    println!("| peak RSS after parse + resolve | {rss_load:.0} MiB | |");
    println!(
        "| peak RSS (whole run: two sets, full + incremental, cache) | {:.0} MiB | |",
        peak_rss_mb()
    );
    println!("policy entries total {entries}, max per host {pe}, max ipcache per host {ipc}");
    // Lets runs of different compiler versions be compared byte for byte.
    println!(
        "revisions: full {} / after the change {}",
        c.revision, c2.revision
    );
}
