//! Project tasks: `cargo xtask demo` (the README's first command runs it after setup).
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulkhead_abi::*;
use bulkhead_datapath::events::EventReader;
use bulkhead_datapath::{Datapath, Tables};
use bulkhead_testbed::rules::{self, allow, Rule};
use bulkhead_testbed::{echo_roundtrip, Lab, PinRoot, Vm};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Bulkhead project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Namespace "VMs" of a small hospital on a bridge, enforced by the real datapath: prints
    /// who can reach whom before and after a policy change, then cleans everything up.
    /// Needs root.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Demo => demo(),
    }
}

const T: Duration = Duration::from_millis(600);
const PG: u16 = 5432;
const SSH: u16 = 22;
const HTTPS: u16 = 443;
const PORTS: [u16; 3] = [PG, SSH, HTTPS];

// VM indices in the lab.
const EMR_APP: usize = 0;
const EMR_DB: usize = 1;
const PACS: usize = 2;
const JUMP: usize = 3;

/// The embedded default policy: default deny, the EMR application reaches its database, the
/// PACS server serves HTTPS to the EMR application, and the jump host may SSH anywhere.
fn hospital_policy(jump_ssh: bool) -> Vec<Rule> {
    let mut r = vec![
        allow(EMR_APP, DIR_EGRESS, None, PROTO_ANY, None),
        allow(EMR_DB, DIR_INGRESS, Some(EMR_APP), 6, Some(PG)),
        allow(PACS, DIR_INGRESS, Some(EMR_APP), 6, Some(HTTPS)),
        allow(JUMP, DIR_EGRESS, None, 6, Some(SSH)),
    ];
    if jump_ssh {
        for vm in [EMR_APP, EMR_DB, PACS] {
            r.push(allow(vm, DIR_INGRESS, Some(JUMP), 6, Some(SSH)));
        }
    }
    r
}

fn step(msg: &str) {
    println!("\n\x1b[1m== {msg}\x1b[0m");
}

fn demo() -> Result<()> {
    if let Some(why) = bulkhead_testbed::unprivileged_reason() {
        bail!("the demo {why}; run it as root after ./scripts/setup.sh");
    }
    step("Creating four namespace VMs on a bridge");
    let mut lab = Lab::new().context("creating the lab bridge")?;
    for name in ["emr-app", "emr-db", "pacs", "jump"] {
        let vm = lab
            .add_vm(name)
            .with_context(|| format!("creating VM {name}"))?;
        println!(
            "  {:<8} {:<11} {:<9} tap {}",
            vm.name, vm.ipv4, vm.ipv6, vm.host_if
        );
    }
    let vms = lab.vms.clone();
    let _servers: Vec<_> = vms
        .iter()
        .flat_map(|vm| PORTS.iter().map(move |p| vm.serve(*p)))
        .collect::<Result<_, _>>()
        .context("starting echo servers in the VMs")?;

    let pins = PinRoot::new("demo");
    let mut dp = Datapath::load(&pins.0).context("loading the eBPF datapath")?;
    let mut tables = dp.tables()?;
    let mut events = EventReader::new(dp.events()?);
    for vm in &vms {
        dp.attach(vm.ifindex)
            .with_context(|| format!("attaching to {} ({})", vm.host_if, vm.name))?;
    }
    step("Attached, no policy yet: the bootstrap posture (deny) holds");
    matrix(&vms);

    step("Policy revision 1: default deny; emr-app → emr-db:5432, emr-app → pacs:443, jump → *:22");
    apply(&mut tables, &vms, &hospital_policy(true))?;
    matrix(&vms);

    step("An SSH session from jump to emr-db stays open across the next change…");
    let ssh_to = SocketAddr::new(IpAddr::V4(vms[EMR_DB].ipv4), SSH);
    let mut session = vms[JUMP].connect(ssh_to, T)?;
    println!("  session echo: {}", ok(echo_roundtrip(&mut session, T)));

    step("Policy revision 2: SSH from the jump host revoked");
    apply(&mut tables, &vms, &hospital_policy(false))?;
    let cut = !echo_roundtrip(&mut session, T);
    println!(
        "  the open SSH session: {}",
        if cut { "cut" } else { "STILL OPEN" }
    );
    matrix(&vms);

    step("Flow events from the ring buffer (denies, with the rule that decided)");
    let names: BTreeMap<u32, &str> = vms.iter().map(|v| (v.ifindex, v.name.as_str())).collect();
    let mut shown = 0;
    events.drain(|e| {
        if shown < 8 && e.kind != EVENT_BOOTSTRAP {
            shown += 1;
            println!("  {}", describe(&e, &names));
        }
    });
    step("Datapath counters");
    let m = tables.maps();
    for (i, name) in STAT_NAMES.iter().enumerate() {
        let v = m.stat(i as u32)?;
        if v > 0 {
            print!("  {name}={v}");
        }
    }
    println!();
    step("Cleaning up (links, pins, namespaces, bridge)");
    drop(tables);
    drop(dp);
    drop(pins);
    drop(lab);
    println!("  done");
    Ok(())
}

fn apply(tables: &mut Tables, vms: &[Vm], rules_: &[Rule]) -> Result<()> {
    let t = rules::tables(vms, rules_);
    let r = tables
        .apply(&t, &rules::bindings(vms))
        .context("applying the policy")?;
    println!(
        "  epoch {} active: {} table entries written, {} deleted, in {:.1} ms",
        r.epoch,
        r.written,
        r.deleted,
        r.duration.as_secs_f64() * 1e3
    );
    Ok(())
}

fn ok(b: bool) -> &'static str {
    if b {
        "\x1b[32mok\x1b[0m"
    } else {
        "\x1b[31mdenied\x1b[0m"
    }
}

/// Reachability from real TCP connections: each cell lists the ports that answered.
fn matrix(vms: &[Vm]) {
    print!("  {:<9}", "from\\to");
    for v in vms {
        print!("{:<16}", v.name);
    }
    println!();
    for from in vms {
        print!("  {:<9}", from.name);
        for to in vms {
            if from.name == to.name {
                print!("{:<16}", "-");
                continue;
            }
            let open: Vec<String> = PORTS
                .iter()
                .filter(|p| from.tcp_works(SocketAddr::new(IpAddr::V4(to.ipv4), **p), T))
                .map(|p| p.to_string())
                .collect();
            let cell = if open.is_empty() {
                "·".to_string()
            } else {
                open.join(",")
            };
            print!("{cell:<16}");
        }
        println!();
        let _ = std::io::stdout().flush();
    }
}

fn describe(e: &FlowEvent, names: &BTreeMap<u32, &str>) -> String {
    let addr = |a: &[u8; 16]| -> String {
        if e.family == 4 {
            format!("{}.{}.{}.{}", a[12], a[13], a[14], a[15])
        } else {
            std::net::Ipv6Addr::from(*a).to_string()
        }
    };
    let kind = match e.kind {
        EVENT_DENY => "deny",
        EVENT_MONITOR => "would-deny",
        EVENT_ALLOW_LOG => "allow",
        EVENT_REJECT => "reject",
        EVENT_SPOOF => "spoof",
        EVENT_REVOKED => "revoked",
        _ => "other",
    };
    let dir = if e.direction == DIR_EGRESS {
        "egress"
    } else {
        "ingress"
    };
    format!(
        "{kind:<8} {} {dir:<7} {}:{} → {}:{} proto {} rule #{} epoch {}",
        names.get(&e.ifindex).copied().unwrap_or("?"),
        addr(&e.src),
        e.sport,
        addr(&e.dst),
        e.dport,
        e.proto,
        e.rule,
        e.epoch
    )
}
