//! Datapath benchmarks; prints Markdown tables for BENCHMARKS.md.
//!
//! `cargo bench -p bulkhead-datapath --bench datapath` (root). Three parts:
//! 1. per-packet cost through `BPF_PROG_TEST_RUN` at 10 … 100k rules, against a program that
//!    passes everything, for new flows (policy lookups + conntrack insert) and established
//!    flows (the ACK of a completed handshake: one conntrack lookup);
//! 2. TCP between two namespace VMs (iperf3 throughput, request/response and
//!    connect/request/close rates): no program, an empty TC program, this datapath at 10 and
//!    100k rules, iptables with the same policy at 10 and 10k rules. The whole part runs on
//!    one CPU (client, server and their softirq work), so the figures are CPU-bound rather
//!    than bound by idle vCPUs' wake-up latency; each condition's ratio is taken against the
//!    baseline of the same round. Then the programs' own cost per run in this real path, from
//!    the kernel's run-time statistics (`-- netns-cost` runs only that);
//!    `-- rr-interleaved`: request/response on one connection while no program, the empty
//!    program and this datapath at 100k rules take turns under it every 250 ms, on one CPU
//!    and on two (`BENCH_CYCLES`, `BENCH_WINDOW_MS`, `BENCH_PLACEMENT=one|two`): the
//!    tightest comparison a noisy host allows, with a confidence interval;
//!    `-- stream-interleaved` does the same for one TCP stream's throughput (one CPU unless
//!    `BENCH_PLACEMENT=two|both`);
//! 3. flow events from the kernel to a reader thread through the ring buffer: denied packets
//!    offered paced at 100k/s and unpaced, every event delivered or counted as suppressed.
//!
//! Every figure is a median over interleaved rounds, reported next to a baseline measured in
//! the same run. `BENCH_QUICK=1` shortens everything (for a smoke run); `BENCH_ROUNDS=n`
//! runs the namespace part in n rounds instead of 9. `-- hold` (with
//! `BENCH_HOLD=none|empty|10|100000|iptables`) sets one condition up and keeps it, for
//! `perf` or `ethtool` by hand.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::*;
use bulkhead_datapath::{Datapath, Hook};
use bulkhead_testbed::{run, Lab, PinRoot, Vm};
use etherparse::PacketBuilder;

const SERVER_PORTS: [u16; 2] = [5201, 5432];
const FILLER_PORTS_PER_IDENTITY: u16 = 10;

struct Ep {
    id: String,
    mac: [u8; 6],
    addrs: Vec<IpAddr>,
}

/// Server (slot 0) accepts TCP on `SERVER_PORTS` from the client only; the client (slot 1)
/// may send anywhere. `rules` allow-rules for other peers fill the server's ingress table:
/// one identity (a /32) per ten rules, each rule one port.
fn policy_tables(rules: usize, server: &Ep, client: &Ep) -> HostTables {
    let mut t = HostTables::default();
    for ep in [server, client] {
        t.endpoints.push(EndpointTable {
            id: ep.id.clone(),
            mac: ep.mac,
            addrs: ep.addrs.clone(),
            flags: 0,
        });
    }
    let world = 1;
    let client_id = 2;
    t.ipcache
        .push(ipc(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, world));
    t.ipcache
        .push(ipc(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0, world));
    for a in &client.addrs {
        t.ipcache
            .push(ipc(*a, if a.is_ipv4() { 32 } else { 128 }, client_id));
    }
    t.rules = vec![
        "default-deny".into(),
        "client-to-server".into(),
        "client-egress".into(),
    ]
    .into();
    for (i, p) in SERVER_PORTS.iter().enumerate() {
        t.port_classes.push(PortClassRange {
            kind: PORT_KIND_L4,
            first: *p,
            last: *p,
            class: i as u32 + 1,
        });
    }
    let filler_class0 = SERVER_PORTS.len() as u32 + 1;
    for f in 0..FILLER_PORTS_PER_IDENTITY {
        t.port_classes.push(PortClassRange {
            kind: PORT_KIND_L4,
            first: 10000 + f,
            last: 10000 + f,
            class: filler_class0 + u32::from(f),
        });
    }
    let deny = Verdict::new(ACTION_DENY, 0, RULE_DEFAULT);
    let refine = Verdict::new(ACTION_DENY, VERDICT_REFINE, RULE_DEFAULT);
    let key = |slot, dir, id, proto, class| PolicyKey::new(0, slot, dir, id, proto, class);
    let p = &mut t.policy;
    p.push((key(0, DIR_INGRESS, IDENTITY_ANY, 0, 0), deny));
    p.push((key(0, DIR_EGRESS, IDENTITY_ANY, 0, 0), deny));
    p.push((
        key(1, DIR_EGRESS, IDENTITY_ANY, 0, 0),
        Verdict::new(ACTION_ALLOW, 0, 2),
    ));
    p.push((key(1, DIR_INGRESS, IDENTITY_ANY, 0, 0), deny));
    p.push((key(0, DIR_INGRESS, client_id, 0, 0), refine));
    p.push((key(0, DIR_INGRESS, client_id, 6, 0), refine));
    for c in 1..=SERVER_PORTS.len() as u32 {
        p.push((
            key(0, DIR_INGRESS, client_id, 6, c),
            Verdict::new(ACTION_ALLOW, 0, 1),
        ));
    }
    let identities = rules.div_ceil(usize::from(FILLER_PORTS_PER_IDENTITY));
    let mut left = rules;
    for i in 0..identities {
        let id = 3 + i as u32;
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i as u32);
        t.ipcache.push(ipc(IpAddr::V4(addr), 32, id));
        p.push((key(0, DIR_INGRESS, id, 0, 0), refine));
        p.push((key(0, DIR_INGRESS, id, 6, 0), refine));
        for f in 0..u32::from(FILLER_PORTS_PER_IDENTITY) {
            if left == 0 {
                break;
            }
            left -= 1;
            let n = t.rules.len();
            t.rules.push(format!("filler-{n}"));
            let rule = t.rules.len() as u32 - 1;
            p.push((
                key(0, DIR_INGRESS, id, 6, filler_class0 + f),
                Verdict::new(ACTION_ALLOW, 0, rule),
            ));
        }
    }
    t.policy.sort_by_key(|(k, _)| *k);
    t
}

fn ipc(addr: IpAddr, prefix_len: u8, identity: u32) -> IpcacheEntry {
    IpcacheEntry {
        addr,
        prefix_len,
        identity,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn quick() -> bool {
    std::env::var_os("BENCH_QUICK").is_some()
}

// ---- Part 1: BPF_PROG_TEST_RUN --------------------------------------------------------

const LO: u32 = 1;
const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const SERVER_IP: [u8; 4] = [192, 0, 2, 10];
const CLIENT_IP: [u8; 4] = [192, 0, 2, 20];

fn tcp(sport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT_IP, SERVER_IP, 64)
        .tcp(sport, 5432, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("build packet");
    out
}

/// The server's SYN-ACK answering `tcp(sport, true)`.
fn tcp_syn_ack(sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
        .ipv4(SERVER_IP, CLIENT_IP, 64)
        .tcp(5432, sport, 5000, 64240)
        .syn()
        .ack(1001);
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("build packet");
    out
}

struct PacketCost {
    new_flow_ns: f64,
    established_ns: f64,
}

fn packet_costs(dp: &Datapath, hook: Hook, flows: u16, repeat: u32) -> PacketCost {
    // New flows: one run each (the kernel times the run itself, not the syscall).
    let mut samples: Vec<f64> = (0..flows)
        .map(|i| {
            let r = dp
                .test_run(hook, &tcp(20000 + i, true), LO, 0, 1)
                .expect("test run");
            assert!(r.action == -1, "benchmark flow must be allowed");
            r.duration.as_nanos() as f64
        })
        .collect();
    let new_flow_ns = median(&mut samples);
    // Complete the first flow's handshake (the server's SYN-ACK leaves through `from_vm`,
    // the client's ACK arrives through `to_vm`): its entry is ESTABLISHED.
    let answer = if hook == Hook::ToVm {
        Hook::FromVm
    } else {
        hook
    };
    let r = dp
        .test_run(answer, &tcp_syn_ack(20000), LO, 0, 1)
        .expect("test run");
    assert!(r.action == -1, "the SYN-ACK must pass");
    dp.test_run(hook, &tcp(20000, false), LO, 0, 1)
        .expect("test run");
    // Established: the ACK of the first flow, repeated in the kernel.
    let mut est: Vec<f64> = (0..5)
        .map(|_| {
            let r = dp
                .test_run(hook, &tcp(20000, false), LO, 0, repeat)
                .expect("test run");
            assert!(r.action == -1);
            r.duration.as_nanos() as f64
        })
        .collect();
    PacketCost {
        new_flow_ns,
        established_ns: median(&mut est),
    }
}

/// The server endpoint bound to loopback (where `BPF_PROG_TEST_RUN` runs the skb) and a
/// remote client, with the server's binding.
fn loopback_endpoints() -> (Ep, Ep, HashMap<String, u32>) {
    let server = Ep {
        id: "server/lo".into(),
        mac: SERVER_MAC,
        addrs: vec![IpAddr::V4(SERVER_IP.into())],
    };
    let client = Ep {
        id: "client/remote".into(),
        mac: CLIENT_MAC,
        addrs: vec![IpAddr::V4(CLIENT_IP.into())],
    };
    let bindings = [(server.id.clone(), LO)].into();
    (server, client, bindings)
}

fn bench_test_run() {
    let pins = PinRoot::new("bench-testrun");
    let mut dp = Datapath::load(&pins.0).expect("load");
    let mut tables = dp.tables().expect("tables");
    let (server, client, bindings) = loopback_endpoints();
    let (flows, repeat) = if quick() {
        (500, 20_000)
    } else {
        (5000, 1_000_000)
    };
    let sizes = [10usize, 1_000, 10_000, 100_000];

    println!("### Per-packet cost, BPF_PROG_TEST_RUN (to_vm, IPv4 TCP, allowed)\n");
    println!("| rules | policy entries | apply | new flow ns (median of {flows}) | vs 10 rules | established ns (repeat {repeat}) | vs 10 rules |");
    println!("|---|---|---|---|---|---|---|");
    let base = packet_costs(&dp, Hook::BenchBaseline, flows, repeat);
    let mut first: Option<PacketCost> = None;
    for &n in &sizes {
        let t = policy_tables(n, &server, &client);
        let report = tables.apply(&t, &bindings).expect("apply");
        // Fresh conntrack for every size: new flows must be new.
        let keys: Vec<CtKey> = tables.maps().conntrack.keys().flatten().collect();
        for k in keys {
            let _ = tables.maps_mut().conntrack.remove(&k);
        }
        let c = packet_costs(&dp, Hook::ToVm, flows, repeat);
        let f = first.get_or_insert(PacketCost {
            new_flow_ns: c.new_flow_ns,
            established_ns: c.established_ns,
        });
        println!(
            "| {n} | {} | {:.0} ms | {:.0} | {:.2}x | {:.1} | {:.2}x |",
            t.policy.len(),
            report.duration.as_secs_f64() * 1e3,
            c.new_flow_ns,
            c.new_flow_ns / f.new_flow_ns,
            c.established_ns,
            c.established_ns / f.established_ns,
        );
    }
    println!(
        "| baseline: empty TC program | – | – | {:.0} | – | {:.1} | – |\n",
        base.new_flow_ns, base.established_ns
    );
}

// ---- Part 2: TCP between namespace VMs ------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Enforcement {
    None,
    /// The pass-everything program on both hooks: what TCX itself costs.
    EmptyProgram,
    Bulkhead(usize),
    Iptables(usize),
}

impl Enforcement {
    fn label(self) -> String {
        match self {
            Enforcement::None => "no program".into(),
            Enforcement::EmptyProgram => "empty TC program".into(),
            Enforcement::Bulkhead(n) => format!("bulkhead, {n} rules"),
            Enforcement::Iptables(n) => format!("iptables, {n} rules"),
        }
    }
}

/// A chain of ours in FORWARD, removed on drop.
struct IptablesChain(String);

impl IptablesChain {
    /// Stateful, as iptables firewalls are written: established traffic is accepted by the
    /// first rule; new flows walk the rules, the allowed one last.
    fn install(rules: usize, client: &Vm, server: &Vm) -> Self {
        let name = format!("BHBENCH{}", std::process::id());
        let mut script = String::from("*filter\n");
        script += &format!(":{name} - [0:0]\n-I FORWARD 1 -j {name}\n");
        script += &format!("-A {name} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
        for i in 0..rules.saturating_sub(1) {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + (i / 10) as u32);
            script += &format!(
                "-A {name} -s {a}/32 -d {} -p tcp --dport {} -j ACCEPT\n",
                server.ipv4,
                10000 + i % 10
            );
        }
        script += &format!(
            "-A {name} -s {} -d {} -p tcp -m multiport --dports 5201,5432 -j ACCEPT\n",
            client.ipv4, server.ipv4
        );
        script += &format!("-A {name} -s 10.77.0.0/24 -j DROP\nCOMMIT\n");
        let mut child = std::process::Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write rules");
        assert!(child.wait().expect("wait").success(), "iptables-restore");
        Self(name)
    }
}

impl Drop for IptablesChain {
    fn drop(&mut self) {
        let _ = run("iptables", &["-D", "FORWARD", "-j", &self.0]);
        let _ = run("iptables", &["-F", &self.0]);
        let _ = run("iptables", &["-X", &self.0]);
    }
}

struct Traffic {
    gbps: f64,
    rr: f64,
    crr: f64,
}

/// iperf3 throughput, one TCP stream for `secs` (Gbit/s received). Inherits the bench's CPU
/// affinity (both ends on one CPU: CPU-bound, every cycle of the datapath shows).
fn iperf(client: &Vm, server: &Vm, secs: f64) -> f64 {
    let mut srv = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &server.netns,
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            &client.netns,
            "iperf3",
            "-c",
            &server.ipv4.to_string(),
            "-p",
            "5201",
            "-t",
            &format!("{secs}"),
            "-J",
        ],
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let Ok(out) = out else {
        return 0.0;
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// Transactions per second over one connection (1-byte request, 1-byte response), after
/// 100 warm-up transactions (the echo thread has started, caches and entries are hot).
fn rr(client: &Vm, to: SocketAddr, dur: Duration) -> f64 {
    client
        .enter(move || {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1))
            else {
                return 0.0;
            };
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            rr_window(&mut s, 100, dur)
        })
        .unwrap_or(0.0)
}

/// New connections per second, each carrying one request and response.
fn crr(client: &Vm, to: SocketAddr, dur: Duration) -> f64 {
    client
        .enter(move || {
            let start = Instant::now();
            let mut n = 0u64;
            let mut b = [0u8; 1];
            while start.elapsed() < dur {
                let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1))
                else {
                    return 0.0;
                };
                let _ = s.set_nodelay(true);
                if s.write_all(b"x").is_err() || s.read_exact(&mut b).is_err() {
                    return 0.0;
                }
                n += 1;
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
        .unwrap_or(0.0)
}

/// Pin this process (and every thread and child it starts from now on) to one CPU: client,
/// server and the softirq work they raise then share it, so the figures are CPU-bound rather
/// than bound by the wake-up latency of idle vCPUs.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Two namespace VMs on a bridge, the datapath loaded, and the policies of the benchmark.
struct NetnsBench {
    lab: Lab,
    client: Vm,
    server: Vm,
    _echo: bulkhead_testbed::Server,
    dp: Datapath,
    tables: bulkhead_datapath::Tables,
    tables_10: HostTables,
    tables_100k: HostTables,
    bindings: HashMap<String, u32>,
    /// The rule count of the tables last applied (applying 100k rules takes a while; the
    /// interleaved part switches conditions hundreds of times).
    applied: Option<usize>,
    _pins: PinRoot,
}

/// What one condition installed, undone by [`NetnsBench::clear`].
struct Installed {
    baseline_links: Vec<aya::programs::tc::SchedClassifierLinkId>,
    _chain: Option<IptablesChain>,
}

impl NetnsBench {
    fn new() -> Self {
        let mut lab = Lab::new().expect("lab");
        let client = lab.add_vm("client").expect("vm");
        // Connect/close loops leave TIME_WAIT sockets behind; let new connections reuse them
        // rather than exhaust the ephemeral ports (the CRR figure would measure that instead).
        for (key, value) in [
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.ip_local_port_range", "1024 65000"),
        ] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &client.netns,
                    "sysctl",
                    "-qw",
                    &format!("{key}={value}"),
                ],
            )
            .expect("sysctl");
        }
        let server = lab.add_vm("server").expect("vm");
        let echo = server.serve(5432).expect("echo server");
        let pins = PinRoot::new("bench-netns");
        let mut dp = Datapath::load(&pins.0).expect("load");
        let tables = dp.tables().expect("tables");
        let ep = |vm: &Vm| Ep {
            id: vm.name.clone(),
            mac: vm.mac,
            addrs: vec![IpAddr::V4(vm.ipv4), IpAddr::V6(vm.ipv6)],
        };
        let (sep, cep) = (ep(&server), ep(&client));
        let bindings: HashMap<String, u32> = [
            (sep.id.clone(), server.ifindex),
            (cep.id.clone(), client.ifindex),
        ]
        .into();
        let tables_10 = policy_tables(10, &sep, &cep);
        let tables_100k = policy_tables(100_000, &sep, &cep);
        Self {
            lab,
            client,
            server,
            _echo: echo,
            dp,
            tables,
            tables_10,
            tables_100k,
            bindings,
            applied: None,
            _pins: pins,
        }
    }

    fn install(&mut self, c: Enforcement) -> Installed {
        let mut baseline_links = Vec::new();
        let mut chain = None;
        match c {
            Enforcement::None => {}
            Enforcement::EmptyProgram => {
                for ifindex in [self.client.ifindex, self.server.ifindex] {
                    baseline_links.extend(
                        self.dp
                            .attach_bench_baseline(ifindex)
                            .expect("attach baseline"),
                    );
                }
            }
            Enforcement::Bulkhead(n) => {
                if self.applied != Some(n) {
                    let t = if n == 10 {
                        &self.tables_10
                    } else {
                        &self.tables_100k
                    };
                    self.tables.apply(t, &self.bindings).expect("apply");
                    self.applied = Some(n);
                }
                for ifindex in [self.client.ifindex, self.server.ifindex] {
                    self.dp.attach(ifindex).expect("attach");
                }
            }
            Enforcement::Iptables(n) => {
                self.lab.set_bridge_netfilter(true).expect("br_netfilter");
                chain = Some(IptablesChain::install(n, &self.client, &self.server));
            }
        }
        Installed {
            baseline_links,
            _chain: chain,
        }
    }

    fn clear(&mut self, i: Installed) {
        self.dp
            .detach_bench_baseline(i.baseline_links)
            .expect("detach baseline");
        for ifindex in [self.client.ifindex, self.server.ifindex] {
            self.dp.detach(ifindex).expect("detach");
        }
        drop(i._chain);
        self.lab.set_bridge_netfilter(false).expect("br_netfilter");
    }

    fn echo_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server.ipv4), 5432)
    }

    /// Kernel-measured run time per run of each program (`BPF_ENABLE_STATS` on), summed
    /// over both interfaces: (runs, ns per run) for from_vm and to_vm, or the baseline's.
    fn run_stats(&self, hooks: &[Hook]) -> Vec<(u64, Duration)> {
        hooks
            .iter()
            .map(|h| {
                let (t, n) = self.dp.run_stats(*h).expect("run stats");
                (n, t)
            })
            .collect()
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// "median (p25–p75)" of per-round ratios against the baseline of the same round.
fn ratio_cell(v: &[f64]) -> String {
    if v.len() < 4 {
        return format!("{:.2}x", quantile(v, 0.5));
    }
    format!(
        "{:.2}x ({:.2}–{:.2})",
        quantile(v, 0.5),
        quantile(v, 0.25),
        quantile(v, 0.75)
    )
}

const BENCH_CPU: usize = 1;

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn bench_namespaces() {
    let cpu = BENCH_CPU.min(num_cpus() - 1);
    pin_to_cpu(cpu);
    let mut b = NetnsBench::new();
    let conditions = [
        Enforcement::None,
        Enforcement::EmptyProgram,
        Enforcement::Bulkhead(10),
        Enforcement::Bulkhead(100_000),
        Enforcement::Iptables(10),
        Enforcement::Iptables(10_000),
    ];
    // `BENCH_ROUNDS=n`: more rounds for a noisy machine (best-of and paired medians tighten).
    let rounds_wanted = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let (rounds, secs, dur) = if quick() {
        (1, 1.0, Duration::from_millis(500))
    } else {
        (rounds_wanted.unwrap_or(9), 2.0, Duration::from_secs(1))
    };
    let load_before = load_average();
    let to = b.echo_addr();
    let mut results: HashMap<String, Vec<Traffic>> = HashMap::new();
    for round in 0..rounds {
        // Rotate the order each round: no condition always runs first (or last).
        for i in 0..conditions.len() {
            let c = conditions[(i + round) % conditions.len()];
            let installed = b.install(c);
            let t = Traffic {
                gbps: iperf(&b.client, &b.server, secs),
                rr: rr(&b.client, to, dur),
                crr: crr(&b.client, to, dur),
            };
            assert!(
                t.gbps > 0.0 && t.rr > 0.0 && t.crr > 0.0,
                "{c:?}: traffic failed"
            );
            results.entry(c.label()).or_default().push(t);
            b.clear(installed);
        }
    }
    let load_after = load_average();
    let none = Enforcement::None.label();
    // Rotation puts every condition next to the baseline run of the same round: ratios are
    // taken per round, then summarised.
    let ratios = |label: &str, f: fn(&Traffic) -> f64| -> Vec<f64> {
        results[label]
            .iter()
            .zip(&results[&none])
            .map(|(t, n)| f(t) / f(n))
            .collect()
    };
    // Other work on the CPU only ever slows a run down: the best run of each condition is
    // its least disturbed one.
    let best = |label: &str, f: fn(&Traffic) -> f64| -> f64 {
        results[label].iter().map(f).fold(0.0, f64::max)
    };
    let cell = |label: &str, f: fn(&Traffic) -> f64| -> String {
        format!(
            "{:.2}x · {}",
            best(label, f) / best(&none, f),
            ratio_cell(&ratios(label, f))
        )
    };
    println!(
        "### TCP between two namespace VMs on a bridge, everything on CPU {cpu} ({rounds} rotated rounds, load average {load_before} → {load_after})\n"
    );
    println!(
        "| enforcement | iperf3 Gbit/s (best) | vs none: best · paired median (p25–p75) | RR txn/s (best) | vs none | CRR conn/s (best) | vs none |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in conditions {
        let l = c.label();
        println!(
            "| {l} | {:.2} | {} | {:.0} | {} | {:.0} | {} |",
            best(&l, |t| t.gbps),
            cell(&l, |t| t.gbps),
            best(&l, |t| t.rr),
            cell(&l, |t| t.rr),
            best(&l, |t| t.crr),
            cell(&l, |t| t.crr),
        );
    }
    println!();
    bench_real_path_cost(&mut b, secs, dur);
}

/// Transactions per second on an open connection for `dur`, after `warmup` transactions.
fn rr_window(s: &mut std::net::TcpStream, warmup: u32, dur: Duration) -> f64 {
    let mut b = [0u8; 1];
    for _ in 0..warmup {
        s.write_all(b"x").expect("RR write");
        s.read_exact(&mut b).expect("RR read");
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        s.write_all(b"x").expect("RR write");
        s.read_exact(&mut b).expect("RR read");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Mean and the half-width of its 95 % confidence interval (normal approximation).
fn mean_ci95(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, 1.96 * (var / n).sqrt())
}

/// Where the two ends of the interleaved RR run.
#[derive(Clone, Copy)]
enum Placement {
    /// Client, server and all their softirq work on one CPU: every nanosecond of the
    /// datapath shows (the worst case for a per-packet cost).
    OneCpu(usize),
    /// Server on one CPU, client on another, as two VMs' vCPUs are: each transaction also
    /// waits for two cross-CPU wake-ups.
    TwoCpus { client: usize, server: usize },
}

/// Part 2b: request/response (or one stream) on one long-lived connection while the enforcement under it is
/// switched every `BENCH_WINDOW_MS` (default 250): no program, the empty program, bulkhead
/// at 100k rules, in rotated order, `BENCH_CYCLES` (default 60) times, in each placement.
/// The tables stay applied and only the TCX links come and go, so a switch takes
/// milliseconds and the three conditions are measured within a second of each other, again
/// and again: slow drifts of a shared host's load (what makes whole-run comparisons swing by
/// several percent) fall on all three alike, and the per-cycle ratios give a confidence
/// interval.
fn bench_interleaved(workload: Workload) {
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(d)
    };
    let (cycles, window) = if quick() {
        (3, Duration::from_millis(100))
    } else {
        (
            env_num("BENCH_CYCLES", 60) as usize,
            Duration::from_millis(env_num("BENCH_WINDOW_MS", 250)),
        )
    };
    // `BENCH_PLACEMENT=one`, `two` or `both`. A single stream's rate on two CPUs follows the
    // scheduler more than the datapath (per-cycle ratios of ±20 %), so streams default to one.
    let only = std::env::var("BENCH_PLACEMENT").unwrap_or_else(|_| {
        if workload == Workload::Stream {
            "one".into()
        } else {
            "both".into()
        }
    });
    let last = num_cpus() - 1;
    let mut placements = Vec::new();
    if only != "two" {
        placements.push(Placement::OneCpu(BENCH_CPU.min(last)));
    }
    if last >= 1 && only != "one" {
        placements.push(Placement::TwoCpus {
            client: 0,
            server: BENCH_CPU.max(1).min(last),
        });
    }
    for placement in placements {
        interleaved(workload, placement, cycles, window);
    }
}

/// What runs on the connection while the enforcement is switched under it.
#[derive(Clone, Copy, PartialEq)]
enum Workload {
    /// 1-byte request, 1-byte response (transactions per second).
    Rr,
    /// One TCP stream, 64 KiB writes into a reader that discards (Gbit/s written).
    Stream,
}

/// Bytes written per second on `s` for `dur`, as Gbit/s (the socket's buffers hold ~4 MiB,
/// well under 1 % of a 250 ms window at these rates).
fn stream_window(s: &mut std::net::TcpStream, buf: &[u8], dur: Duration) -> f64 {
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < dur {
        s.write_all(buf).expect("stream write");
        bytes += buf.len() as u64;
    }
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

fn interleaved(workload: Workload, placement: Placement, cycles: usize, window: Duration) {
    // The echo server's and the sink's threads start on the server's CPU and keep it; the
    // client's loop runs on this thread.
    let (client_cpu, server_cpu) = match placement {
        Placement::OneCpu(cpu) => (cpu, cpu),
        Placement::TwoCpus { client, server } => (client, server),
    };
    pin_to_cpu(server_cpu);
    let mut b = NetnsBench::new();
    let port = if workload == Workload::Rr {
        b.echo_addr().port()
    } else {
        // A reader that discards, on a port the benchmark's policy allows.
        let addr = SocketAddr::new(IpAddr::V4(b.server.ipv4), SERVER_PORTS[0]);
        let listener = b
            .server
            .enter(move || std::net::TcpListener::bind(addr))
            .expect("enter server")
            .expect("bind the sink");
        std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else {
                return;
            };
            let mut buf = vec![0u8; 1 << 16];
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        });
        SERVER_PORTS[0]
    };
    pin_to_cpu(client_cpu);
    let conditions = [
        Enforcement::None,
        Enforcement::EmptyProgram,
        Enforcement::Bulkhead(100_000),
    ];
    // Apply the tables once, before the connection opens.
    let first = b.install(Enforcement::Bulkhead(100_000));
    b.clear(first);
    let to = SocketAddr::new(IpAddr::V4(b.server.ipv4), port);
    let mut s = b
        .client
        .enter(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .expect("enter client")
        .expect("connect to the server");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(1)))
        .expect("write timeout");
    let buf = vec![0x5au8; 1 << 16];
    let load_before = load_average();
    let mut rates: HashMap<String, Vec<f64>> = HashMap::new();
    for cycle in 0..cycles {
        for i in 0..conditions.len() {
            let c = conditions[(i + cycle) % conditions.len()];
            let installed = b.install(c);
            let rate = match workload {
                Workload::Rr => rr_window(&mut s, 200, window),
                Workload::Stream => {
                    // Warm-up: the stream's window and the caches settle after the switch.
                    stream_window(&mut s, &buf, window / 10);
                    stream_window(&mut s, &buf, window)
                }
            };
            rates.entry(c.label()).or_default().push(rate);
            b.clear(installed);
        }
    }
    let load_after = load_average();
    let none = &rates[&Enforcement::None.label()];
    let place = match placement {
        Placement::OneCpu(cpu) => format!("client and server on CPU {cpu}"),
        Placement::TwoCpus { client, server } => {
            format!("client on CPU {client}, server on CPU {server}")
        }
    };
    let (what, unit, digits) = match workload {
        Workload::Rr => ("RR on one connection", "RR txn/s", 0),
        Workload::Stream => ("One TCP stream", "Gbit/s", 2),
    };
    println!(
        "### {what}, enforcement switched under it: {place} ({cycles} cycles of {} ms per condition, rotated; load average {load_before} → {load_after})\n",
        window.as_millis()
    );
    println!("| enforcement | {unit} (median) | vs none, per cycle: median (p25–p75) | mean ± 95 % CI | all windows pooled |");
    println!("|---|---|---|---|---|");
    for c in conditions {
        let l = c.label();
        let v = &rates[&l];
        let ratios: Vec<f64> = v.iter().zip(none).map(|(x, n)| x / n).collect();
        let (mean, ci) = mean_ci95(&ratios);
        println!(
            "| {l} | {:.digits$} | {} | {mean:.3}x ± {ci:.3} | {:.3}x |",
            quantile(v, 0.5),
            ratio_cell(&ratios),
            v.iter().sum::<f64>() / none.iter().sum::<f64>()
        );
    }
    println!();
}

/// The programs' own cost per run in the real path (kernel run-time statistics), during one
/// iperf3 and one RR run: what `BPF_PROG_TEST_RUN` measures, but with the caches, packet
/// sizes and CPUs of real traffic.
fn bench_real_path_cost(b: &mut NetnsBench, secs: f64, dur: Duration) {
    let Ok(_stats) = aya::sys::enable_stats(aya::sys::Stats::RunTime) else {
        println!("(kernel run-time statistics unavailable: real-path cost not measured)\n");
        return;
    };
    let to = b.echo_addr();
    println!("### Program cost in the real path (kernel run-time statistics, same CPU)\n");
    println!(
        "| enforcement | workload | hook | runs | runs/s | ns per run | fast path (flow cache) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in [
        Enforcement::EmptyProgram,
        Enforcement::Bulkhead(10),
        Enforcement::Bulkhead(100_000),
    ] {
        let hooks: &[Hook] = if c == Enforcement::EmptyProgram {
            &[Hook::BenchBaseline]
        } else {
            &[Hook::FromVm, Hook::ToVm]
        };
        let installed = b.install(c);
        for workload in ["iperf3", "RR"] {
            let counters = |b: &NetnsBench| {
                let all = b.tables.maps().stats().expect("stats");
                [STAT_CT_HIT, STAT_CT_FAST, STAT_FLOW_CACHE].map(|i| all[i as usize])
            };
            let c0 = counters(b);
            let before = b.run_stats(hooks);
            let start = Instant::now();
            if workload == "iperf3" {
                iperf(&b.client, &b.server, secs);
            } else {
                rr(&b.client, to, dur);
            }
            let elapsed = start.elapsed().as_secs_f64();
            let after = b.run_stats(hooks);
            let c1 = counters(b);
            let fast = if hooks.len() > 1 {
                let share =
                    |i: usize| 100.0 * (c1[i] - c0[i]) as f64 / (c1[0] - c0[0]).max(1) as f64;
                format!("{:.1} % ({:.1} %) of conntrack hits", share(1), share(2))
            } else {
                "–".into()
            };
            for (i, h) in hooks.iter().enumerate() {
                let runs = after[i].0 - before[i].0;
                let ns = (after[i].1 - before[i].1).as_nanos() as f64;
                println!(
                    "| {} | {workload} | {} | {runs} | {:.0} | {:.0} | {fast} |",
                    c.label(),
                    h.program_name(),
                    runs as f64 / elapsed,
                    ns / runs.max(1) as f64
                );
            }
        }
        b.clear(installed);
    }
    println!();
}

/// Diagnosis aid: set up one condition (`BENCH_HOLD=none|empty|10|100000|iptables`) and keep
/// it until the file it names is removed, for `perf`, `ethtool` or `bpftool` by hand.
fn hold_namespaces() {
    let what = std::env::var("BENCH_HOLD").unwrap_or_else(|_| "10".into());
    let c = match what.as_str() {
        "none" => Enforcement::None,
        "empty" => Enforcement::EmptyProgram,
        "iptables" => Enforcement::Iptables(10),
        n => Enforcement::Bulkhead(n.parse().unwrap_or(10)),
    };
    let mut b = NetnsBench::new();
    let installed = b.install(c);
    let flag = std::env::temp_dir().join(format!("bulkhead-bench-hold.{}", std::process::id()));
    std::fs::write(&flag, "").expect("hold file");
    println!(
        "holding {}: client netns {} (tap {}, ifindex {}), server netns {} {} (tap {}, ifindex {}); echo on 5432; remove {} to end",
        c.label(),
        b.client.netns,
        b.client.host_if,
        b.client.ifindex,
        b.server.netns,
        b.server.ipv4,
        b.server.host_if,
        b.server.ifindex,
        flag.display()
    );
    // `BENCH_HOLD_RR=secs`: run the request/response loop on the bench CPU meanwhile.
    if let Some(secs) = std::env::var("BENCH_HOLD_RR")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        pin_to_cpu(BENCH_CPU.min(num_cpus() - 1));
        let rate = rr(&b.client, b.echo_addr(), Duration::from_secs_f64(secs));
        println!("RR: {rate:.0} transactions/s");
    }
    while flag.exists() {
        std::thread::sleep(Duration::from_millis(200));
    }
    b.clear(installed);
}

fn main() {
    if bulkhead_testbed::skip("datapath benchmarks") {
        return;
    }
    // `cargo bench` passes `--bench`; any other argument selects a part.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let want = |p: &str| args.is_empty() || args.iter().any(|a| a == p);
    if want("testrun") {
        bench_test_run();
    }
    if want("netns") {
        bench_namespaces();
    }
    if want("rr-interleaved") {
        bench_interleaved(Workload::Rr);
    }
    if want("stream-interleaved") {
        bench_interleaved(Workload::Stream);
    }
    if args.iter().any(|a| a == "netns-cost") {
        // Only the real-path program cost (quick to repeat while optimising).
        pin_to_cpu(BENCH_CPU.min(num_cpus() - 1));
        let mut b = NetnsBench::new();
        let secs = if quick() { 1.0 } else { 3.0 };
        bench_real_path_cost(&mut b, secs, Duration::from_secs_f64(secs));
    }
    if args.iter().any(|a| a == "hold") {
        hold_namespaces();
    }
    if want("events") {
        bench_events();
    }
}

// ---- Part 3: flow events through the ring buffer --------------------------------------

struct EventRun {
    offered: u64,
    delivered: u64,
    rate_limited: u64,
    ring_full: u64,
    secs: f64,
}

/// Offer denied packets (each one a deny event) for `dur`, `per_tick` every millisecond
/// (`None`: as fast as the kernel runs them), while a thread drains the ring.
fn event_run(
    dp: &Datapath,
    tables: &bulkhead_datapath::Tables,
    reader: &mut Option<bulkhead_datapath::events::EventReader>,
    dur: Duration,
    per_tick: Option<u32>,
) -> EventRun {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let stats = [
        STAT_DROP_POLICY,
        STAT_EVENTS_SENT,
        STAT_EVENTS_RATE_LIMITED,
        STAT_EVENTS_RING_FULL,
    ];
    let read = || {
        let all = tables.maps().stats().expect("stats");
        stats.map(|s| all[s as usize])
    };
    let before = read();
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let mut r = reader.take().expect("reader");
    let handle = {
        let (stop, got) = (stop.clone(), got.clone());
        std::thread::spawn(move || loop {
            let done = stop.load(Ordering::Acquire);
            r.wait(Duration::from_millis(5));
            let n = r.drain(|_| {}) as u64;
            got.fetch_add(n, Ordering::Relaxed);
            if done && n == 0 {
                return r;
            }
        })
    };
    // A SYN from a peer no rule admits: denied, one event per packet.
    let denied = {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([203, 0, 113, 7], SERVER_IP, 64)
            .tcp(40000, 22, 1, 64240)
            .syn();
        let mut out = Vec::with_capacity(b.size(0));
        b.write(&mut out, &[]).expect("build packet");
        out
    };
    let start = Instant::now();
    let mut tick = start;
    while start.elapsed() < dur {
        match per_tick {
            Some(n) => {
                let r = dp
                    .test_run(Hook::ToVm, &denied, LO, 0, n)
                    .expect("test run");
                assert_eq!(r.action, 2, "the benchmark packet must be denied");
                tick += Duration::from_millis(1);
                if let Some(wait) = tick.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            None => {
                dp.test_run(Hook::ToVm, &denied, LO, 0, 10_000)
                    .expect("test run");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    *reader = Some(handle.join().expect("reader thread"));
    let after = read();
    let d: Vec<u64> = (0..4).map(|i| after[i] - before[i]).collect();
    EventRun {
        offered: d[0],
        delivered: got.load(Ordering::Relaxed),
        rate_limited: d[2],
        ring_full: d[3],
        secs,
    }
}

fn bench_events() {
    let pins = PinRoot::new("bench-events");
    let mut dp = Datapath::load(&pins.0).expect("load");
    let mut tables = dp.tables().expect("tables");
    let (server, client, bindings) = loopback_endpoints();
    tables
        .apply(&policy_tables(10, &server, &client), &bindings)
        .expect("apply");
    // No per-endpoint limit: what the ring and one reader thread carry.
    tables
        .set_posture(BOOTSTRAP_DENY, u32::MAX)
        .expect("posture");
    let mut reader = Some(bulkhead_datapath::events::EventReader::new(
        dp.events().expect("events"),
    ));
    let dur = if quick() {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    };
    println!(
        "### Flow events, kernel to a reader thread (ring buffer, {} MiB)\n",
        EVENT_RING_BYTES >> 20
    );
    println!("| load | events offered | delivered | delivered per second | suppressed: rate limit | suppressed: ring full | unaccounted |");
    println!("|---|---|---|---|---|---|---|");
    for (label, per_tick) in [("paced, 100k/s", Some(100)), ("unpaced", None)] {
        let r = event_run(&dp, &tables, &mut reader, dur, per_tick);
        let unaccounted = r.offered as i64 - (r.delivered + r.rate_limited + r.ring_full) as i64;
        println!(
            "| {label} | {} | {} | {:.0} | {} | {} | {unaccounted} |",
            r.offered,
            r.delivered,
            r.delivered as f64 / r.secs,
            r.rate_limited,
            r.ring_full,
        );
        assert_eq!(unaccounted, 0, "every event delivered or counted");
    }
    println!();
}
