//! Project tasks: `cargo xtask demo` (the README's first command runs it after setup).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_e2e::{Cluster, CLUSTER_VMS, SERVED_PORTS};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Bulkhead project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Two hypervisor hosts of namespace VMs, the controller on a git repository holding
    /// policies/, one agent per host over mutual TLS: prints who can reach whom from real
    /// connections, commits a policy change, prints the new matrix and the measured
    /// commit-to-enforced time, then removes everything. Needs root and the release binaries
    /// (scripts/demo.sh builds them).
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Demo => demo(),
    }
}

fn step(msg: &str) {
    println!("\n\x1b[1m== {msg}\x1b[0m");
}

fn demo() -> Result<()> {
    if let Some(why) = bulkhead_testbed::unprivileged_reason() {
        bail!("the demo {why}; run it as root through ./scripts/demo.sh");
    }
    step("Starting: 2 hosts of namespace VMs, a CA, the controller on a git repository of policies/, 2 agents");
    let started = Instant::now();
    let c = Cluster::start().context("starting the demo cluster")?;
    for (name, host, _, labels) in CLUSTER_VMS {
        let vm = c.vm(name);
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  {:<8} on {}  {:<11} tap {:<14} {}",
            name,
            c.hosts[host].name,
            vm.ipv4,
            vm.host_if,
            labels.join(",")
        );
    }
    let status = c.status()?;
    let serving = status.serving.clone().unwrap_or_default();
    println!(
        "  all hosts enforce commit {} \"{}\" ({:.1} s from an empty machine)",
        &serving.commit[..serving.commit.len().min(10)],
        serving.summary,
        started.elapsed().as_secs_f64()
    );
    step("Reachability from real TCP connections (ports that answered)");
    let before = matrix(&c);

    step(
        "A security administrator commits: the jump host loses SSH/RDP (policies/30-security.yaml)",
    );
    let t0 = Instant::now();
    let commit = c.commit_revoke_jump_ssh()?;
    c.wait_enforced(&commit, Duration::from_secs(10))?;
    let took = t0.elapsed();
    println!(
        "  commit {} enforced on every host {:.0} ms after `git commit`",
        &commit[..10],
        took.as_secs_f64() * 1e3
    );
    let after = matrix(&c);
    step("What changed");
    for (k, v) in &before {
        if after.get(k) != Some(v) {
            println!("  {} → {}: {} ⇒ {}", k.0, k.1, v, after[k]);
        }
    }
    step("An invalid commit is rejected whole; the hosts keep the last good revision");
    let bad = c.repo.commit_file(
        "policies/50-typo.yaml",
        "policies:\n  - name: typo\n    tier: application\n    priority: 900\n    applies_to: [{group: emr-dbb}]\n",
        "Typo in a group name",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.status()?;
        if let Some(r) = s
            .rejected
            .iter()
            .find(|r| r.revision.as_ref().is_some_and(|v| v.commit == bad))
        {
            for e in &r.errors {
                println!("  rejected {}: {e}", &bad[..10]);
            }
            let enforced: Vec<String> = s
                .hosts
                .iter()
                .map(|h| {
                    format!(
                        "{} enforces {}",
                        h.host,
                        &h.enforced_commit[..10.min(h.enforced_commit.len())]
                    )
                })
                .collect();
            println!("  {}", enforced.join(", "));
            break;
        }
        if Instant::now() > deadline {
            bail!("the invalid commit was not reported");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    step("Cleaning up (agents, controller, links, pins, namespaces, bridges)");
    drop(c);
    println!("  done");
    Ok(())
}

/// Print and return the matrix: (from, to) → open ports.
fn matrix(c: &Cluster) -> BTreeMap<(String, String), String> {
    let names: Vec<&str> = CLUSTER_VMS.iter().map(|v| v.0).collect();
    let mut out = BTreeMap::new();
    print!("  {:<9}", "from\\to");
    for n in &names {
        print!("{n:<12}");
    }
    println!();
    for from in &names {
        print!("  {from:<9}");
        for to in &names {
            if from == to {
                print!("{:<12}", "-");
                continue;
            }
            let open: Vec<String> = SERVED_PORTS
                .iter()
                .filter(|p| c.reach(from, to, **p))
                .map(|p| p.to_string())
                .collect();
            let cell = if open.is_empty() {
                "·".to_string()
            } else {
                open.join(",")
            };
            print!("{cell:<12}");
            out.insert((from.to_string(), to.to_string()), cell);
        }
        println!();
    }
    out
}
