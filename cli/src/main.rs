//! `bulkhead`, the Bulkhead admin CLI.
mod admin;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use bulkhead_abi::*;
use bulkhead_policy::eval::action_name;
use bulkhead_policy::load::{dir_name, LoadError, PolicySet, Resolved};
use bulkhead_policy::net::fmt_mac;
use bulkhead_policy::plan::proto_name;
use bulkhead_policy::{compile, evaluate, lint, load_dir, plan};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Bulkhead: a distributed firewall for KVM virtual machines.
///
/// Policy lives in git as YAML (see `bulkhead policy schema`); these commands check it,
/// explain it, and show what a change would do before it is applied.
#[derive(Parser)]
#[command(name = "bulkhead", version, propagate_version = true)]
struct Cli {
    /// Output format: human-readable text, or JSON for tools.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Top,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Top {
    /// Work with a policy repository: validate, explain, lint, compile, plan.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// What the controller serves, what every host enforces and since when, rejected
    /// commits (needs a system- or security-admin certificate).
    ///
    ///   bulkhead status --pki ~/.bulkhead --user alice
    Status(admin::StatusArgs),
    /// The audit trail: verify, export, compliance report, SIEM forwarding (audit-admin).
    #[command(subcommand)]
    Audit(bulkhead_audit::cli::AuditCommand),
    /// MLPS Level 3 compliance evidence from the live controller (audit-admin).
    #[command(subcommand)]
    Compliance(ComplianceCmd),
}

#[derive(Subcommand)]
enum ComplianceCmd {
    /// The compliance report: every control item of MLPS Level 3 this product carries, with
    /// live evidence from the controller (default deny per scope, per-interface enforcement,
    /// rule analysis with hit counters, policy distribution, roles, clocks) and from the
    /// audit store (integrity, retention, coverage, alerts).
    ///
    ///   bulkhead compliance report --pki ~/.bulkhead --user carol --out report.html
    Report(admin::ComplianceArgs),
    /// Show or change how long the controller keeps the audit trail (at least 184 days; the
    /// audit administrator's operation — a refusal for any other role is itself audited, as
    /// is every change, with before and after). The setting survives controller restarts.
    ///
    ///   bulkhead compliance retention --pki ~/.bulkhead --user carol
    ///   bulkhead compliance retention --pki ~/.bulkhead --user carol --days 365
    Retention(admin::RetentionArgs),
}

#[derive(Args, Clone)]
struct Input {
    /// Directory holding the policy files (*.yaml) and, unless --inventory says otherwise,
    /// inventory.yaml.
    #[arg(long, short = 'p', default_value = "policies")]
    policies: PathBuf,
    /// Inventory file (VMs with name, uuid, labels, host, interfaces).
    #[arg(long, short = 'i')]
    inventory: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Check every file of the policy set and the inventory; print every error with
    /// file:line:column.
    ///
    /// Exit codes: 0 valid, 1 invalid (errors printed), 2 usage or I/O error. Suitable
    /// for a pre-commit hook or the policy repository's CI:
    ///
    ///   bulkhead policy validate -p policies || exit 1
    Validate(Input),
    /// Say whether a flow is allowed, which tier/policy/rule decided, and every rule
    /// looked at on the way.
    ///
    /// SRC and DST are VM names or IP addresses. For a flow between two managed VMs both
    /// ends are judged: the source's egress and the destination's ingress.
    ///
    ///   bulkhead policy explain his-app-1 db-his-1 --proto tcp --port 1521
    Explain {
        #[command(flatten)]
        input: Input,
        /// Source: VM name or IP address.
        src: String,
        /// Destination: VM name or IP address.
        dst: String,
        /// tcp, udp, sctp, icmp, icmpv6 or a protocol number.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Destination port (tcp/udp/sctp).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// ICMP type (icmp/icmpv6).
        #[arg(long, default_value_t = 8)]
        icmp_type: u8,
        /// ICMP code (icmp/icmpv6).
        #[arg(long, default_value_t = 0)]
        icmp_code: u8,
    },
    /// Report redundant and ineffective rules (MLPS 8.1.3.2 b): shadowed rules, duplicates,
    /// rules matching no VM, unused or empty groups, over-broad allows.
    ///
    /// Exit code 0 even with findings unless --deny-findings is given.
    Lint {
        #[command(flatten)]
        input: Input,
        /// Exit with 1 when there are findings.
        #[arg(long)]
        deny_findings: bool,
    },
    /// Compile the policy set into per-host datapath tables and print a summary.
    Compile {
        #[command(flatten)]
        input: Input,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Also write the full tables as JSON to this file.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Export every rule with source and destination addresses, protocol and ports, in
    /// evaluation order (system endpoints, quarantines, tiers by priority, then the default)
    /// — the rule table an assessor asks for (MLPS 8.1.3.2 c).
    ///
    ///   bulkhead policy rules -p policies --csv > rules.csv
    ///   bulkhead -o json policy rules -p policies
    Rules {
        #[command(flatten)]
        input: Input,
        /// CSV with a header row instead of the text table.
        #[arg(long)]
        csv: bool,
    },
    /// Show which VM-to-VM verdicts change between two git revisions of the policy repo
    /// (like `terraform plan`).
    ///
    ///   bulkhead policy plan --repo . --from main            # main → working tree
    ///   bulkhead policy plan --repo . --from v12 --to v13
    #[command(alias = "diff")]
    Plan {
        /// The git repository.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Directory of the policy set inside the repository.
        #[arg(long, default_value = "policies")]
        path: PathBuf,
        /// Old revision (any git revision).
        #[arg(long, default_value = "HEAD")]
        from: String,
        /// New revision; the working tree when absent.
        #[arg(long)]
        to: Option<String>,
        /// Exit with 2 when something changes (like `terraform plan -detailed-exitcode`).
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Emergency isolation of a VM, above every tier: writes the quarantine into the policy
    /// set (file `90-quarantine.yaml`) and validates the whole set; nothing is written if the
    /// result would be invalid. Commit and push the file to apply it.
    ///
    ///   bulkhead policy quarantine add his-test-1 --mode full --reason INC-1142
    ///   bulkhead policy quarantine add his-test-1 --mode partial --allow-group forensics
    ///   bulkhead policy quarantine release his-test-1
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Print the JSON Schema of policy files (or of the inventory) for editors.
    Schema {
        #[arg(long)]
        inventory: bool,
    },
}

#[derive(Subcommand)]
enum QuarantineCmd {
    /// Isolate a VM: `full` = nothing in or out (system endpoints excepted); `partial` = only
    /// the given groups.
    Add {
        #[command(flatten)]
        input: Input,
        vm: String,
        #[arg(long, value_parser = ["full", "partial"], default_value = "full")]
        mode: String,
        /// Group that may still reach the VM (partial); repeatable.
        #[arg(long = "allow-group")]
        allow_group: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift the quarantine of a VM.
    Release {
        #[command(flatten)]
        input: Input,
        vm: String,
    },
}

const QUARANTINE_FILE: &str = "90-quarantine.yaml";

fn quarantine(cmd: &QuarantineCmd, out: Output) -> Result<ExitCode> {
    use bulkhead_policy::types::{Peer, PolicyFile, Quarantine, QuarantineMode};
    let (input, vm) = match cmd {
        QuarantineCmd::Add { input, vm, .. } | QuarantineCmd::Release { input, vm } => (input, vm),
    };
    let path = input.policies.join(QUARANTINE_FILE);
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut file: PolicyFile = match &old {
        Some(s) if !s.trim().is_empty() => {
            serde_yaml::from_str(s).with_context(|| format!("parsing {}", path.display()))?
        }
        _ => PolicyFile::default(),
    };
    // Quarantines of the same VM in other files would clash: they are reported by validation.
    file.quarantine.retain(|q| &q.vm != vm);
    if let QuarantineCmd::Add {
        mode,
        allow_group,
        reason,
        ..
    } = cmd
    {
        file.quarantine.push(Quarantine {
            vm: vm.clone(),
            mode: if mode == "full" {
                QuarantineMode::Full
            } else {
                QuarantineMode::Partial
            },
            allow: allow_group
                .iter()
                .map(|g| Peer {
                    group: Some(g.clone()),
                    ..Default::default()
                })
                .collect(),
            reason: reason.clone(),
        });
    }
    let text = format!(
        "# Quarantines (written by `bulkhead policy quarantine`).\n{}",
        serde_yaml::to_string(&file).context("encoding the quarantine file")?
    );
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    if load(input, out)?.is_none() {
        // Invalid: put the previous content back; never leave a half-applied set.
        match &old {
            Some(s) => std::fs::write(&path, s),
            None => std::fs::remove_file(&path),
        }
        .with_context(|| format!("restoring {}", path.display()))?;
        return Ok(ExitCode::from(1));
    }
    let verb = if matches!(cmd, QuarantineCmd::Add { .. }) {
        "quarantined"
    } else {
        "released"
    };
    if out == Output::Json {
        print_json(&json!({"vm": vm, "action": verb, "file": path}));
    } else {
        println!(
            "{vm} {verb} in {} (validated); commit and push it to apply",
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_json(v: &serde_json::Value) {
    use std::io::Write;
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    );
}

/// Load; on validation errors print them and return None.
fn load(input: &Input, out: Output) -> Result<Option<(PolicySet, Resolved)>> {
    match load_dir(&input.policies, input.inventory.as_deref()) {
        Ok(x) => Ok(Some(x)),
        Err(LoadError::Invalid(d)) => {
            if out == Output::Json {
                print_json(&json!({"valid": false, "errors": d}));
            } else {
                for e in &d {
                    eprintln!("{e}");
                }
                eprintln!("{} error(s); the policy set was not applied.", d.len());
            }
            Ok(None)
        }
        Err(e) => Err(anyhow!(e))
            .with_context(|| format!("loading the policy set in {}", input.policies.display())),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let out = cli.output;
    let cmd = match cli.command {
        Top::Policy(cmd) => cmd,
        Top::Status(a) => {
            let s = admin::fetch(&a)?;
            if out == Output::Json {
                print_json(&admin::to_json(&s));
            } else {
                admin::print_text(&s);
            }
            let all_in_sync = s
                .hosts
                .iter()
                .all(|h| !h.desired_digest.is_empty() && h.desired_digest == h.enforced_digest);
            return Ok(if all_in_sync {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Top::Compliance(ComplianceCmd::Report(a)) => {
            admin::run_compliance_report(&a)?;
            return Ok(ExitCode::SUCCESS);
        }
        Top::Compliance(ComplianceCmd::Retention(a)) => {
            let days = admin::retention(&a)?;
            if out == Output::Json {
                print_json(&json!({ "retention_days": days }));
            } else {
                println!("audit retention: {days} days");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Top::Audit(cmd) => {
            let code = bulkhead_audit::cli::run(cmd, &mut std::io::stdout().lock())?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
    };
    let cmd = &cmd;
    match cmd {
        PolicyCmd::Validate(input) => {
            let Some((set, res)) = load(input, out)? else {
                return Ok(ExitCode::from(1));
            };
            let rules = res.rules.len();
            if out == Output::Json {
                print_json(
                    &json!({"valid": true, "files": set.files.len(), "vms": res.vms.len(), "rules": rules, "tiers": res.tiers}),
                );
            } else {
                println!(
                    "ok: {} policy file(s), {} VM(s), {} rule(s) in tiers {}; default action {:?}",
                    set.files.len(),
                    res.vms.len(),
                    rules,
                    res.tiers.join(" > "),
                    res.default_action
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Explain {
            input,
            src,
            dst,
            proto,
            port,
            icmp_type,
            icmp_code,
        } => {
            let Some((_, res)) = load(input, out)? else {
                return Ok(ExitCode::from(1));
            };
            explain(&res, out, src, dst, proto, *port, *icmp_type, *icmp_code)
        }
        PolicyCmd::Lint {
            input,
            deny_findings,
        } => {
            let Some((set, res)) = load(input, out)? else {
                return Ok(ExitCode::from(1));
            };
            let c = compile(&res);
            let f = lint::lint(&set, &res, &c);
            if out == Output::Json {
                print_json(&json!({"findings": f}));
            } else if f.is_empty() {
                println!("no findings: no redundant or ineffective rules");
            } else {
                for x in &f {
                    println!("{}:{}: {}: {}", x.file, x.line, x.kind, x.message);
                }
                println!("{} finding(s)", f.len());
            }
            Ok(if *deny_findings && !f.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCmd::Rules { input, csv } => {
            let Some((_, res)) = load(input, out)? else {
                return Ok(ExitCode::from(1));
            };
            let rows = bulkhead_policy::export::rule_rows(&res);
            if out == Output::Json {
                print_json(&json!({"rules": rows}));
            } else if *csv {
                let mut text = bulkhead_policy::export::COLUMNS.join(",");
                text.push('\n');
                for r in &rows {
                    for (i, f) in r.fields().iter().enumerate() {
                        if i > 0 {
                            text.push(',');
                        }
                        bulkhead_audit::export::csv_field(&mut text, f);
                    }
                    text.push('\n');
                }
                print!("{text}");
            } else {
                for r in &rows {
                    println!(
                        "{:<28} {:<11} {:<7} {:<7} {} -> {} [{}]{}",
                        r.rule,
                        r.tier,
                        r.direction,
                        r.action,
                        r.source,
                        r.destination,
                        r.services,
                        if r.mode == "monitor" {
                            " (monitor)"
                        } else {
                            ""
                        }
                    );
                }
                println!("{} rule row(s)", rows.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Compile { input, host, dump } => {
            let Some((_, res)) = load(input, out)? else {
                return Ok(ExitCode::from(1));
            };
            let c = compile(&res);
            let hosts: Vec<_> = c
                .hosts
                .iter()
                .filter(|(h, _)| host.as_ref().is_none_or(|x| x == *h))
                .collect();
            if let Some(h) = host {
                if hosts.is_empty() {
                    bail!("host `{h}` runs no VM of the inventory");
                }
            }
            let full = json!({
                "revision": c.revision,
                "hosts": hosts.iter().map(|(h, o)| (h.to_string(), tables_json(&o.tables, &o.revision))).collect::<serde_json::Map<_, _>>(),
            });
            if let Some(p) = dump {
                std::fs::write(p, serde_json::to_string_pretty(&full)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if out == Output::Json {
                print_json(&full);
            } else {
                println!("revision {}", c.revision);
                println!(
                    "{:<10} {:>9} {:>10} {:>8} {:>11} {:>8} {:>6}  host revision",
                    "host", "endpoints", "identities", "ipcache", "portclasses", "policy", "rules"
                );
                for (h, o) in &hosts {
                    let t = &o.tables;
                    let ids: std::collections::BTreeSet<u32> =
                        t.ipcache.iter().map(|e| e.identity).collect();
                    let classes: std::collections::BTreeSet<u32> =
                        t.port_classes.iter().map(|e| e.class).collect();
                    println!(
                        "{:<10} {:>9} {:>10} {:>8} {:>11} {:>8} {:>6}  {}",
                        h,
                        t.endpoints.len(),
                        ids.len(),
                        t.ipcache.len(),
                        classes.len(),
                        t.policy.len(),
                        t.rules.len(),
                        &o.revision[..16]
                    );
                }
                if let Some(p) = dump {
                    println!("tables written to {}", p.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Plan {
            repo,
            path,
            from,
            to,
            detailed_exitcode,
        } => {
            let tmp = tempfile::tempdir().context("creating a temporary directory")?;
            let before_dir = checkout(repo, from, path, &tmp.path().join("before"))?;
            let after_dir = match to {
                Some(r) => checkout(repo, r, path, &tmp.path().join("after"))?,
                None => repo.join(path),
            };
            let to_name = to.clone().unwrap_or_else(|| "working tree".into());
            let before = load_rev(&before_dir, from)?;
            let after = load_rev(&after_dir, &to_name)?;
            let changes = plan::plan(&before, &after);
            let (cb, ca) = (compile(&before), compile(&after));
            let hosts: Vec<(String, String, String)> = ca
                .hosts
                .iter()
                .map(|(h, o)| {
                    let old = cb
                        .hosts
                        .get(h)
                        .map(|x| x.revision.clone())
                        .unwrap_or_default();
                    (h.clone(), old, o.revision.clone())
                })
                .filter(|(_, a, b)| a != b)
                .collect();
            if out == Output::Json {
                print_json(&json!({
                    "from": from, "to": to_name,
                    "revision_before": cb.revision, "revision_after": ca.revision,
                    "changes": changes,
                    "hosts_changed": hosts.iter().map(|(h, _, _)| h).collect::<Vec<_>>(),
                }));
            } else {
                println!("plan {from} → {to_name}");
                if changes.is_empty() {
                    println!("no VM-to-VM verdict changes.");
                }
                for c in &changes {
                    let sign = if c.after == "allow" {
                        "+"
                    } else if c.before == "allow" {
                        "-"
                    } else {
                        "~"
                    };
                    println!(
                        "{sign} {} → {} {}: {} [{}] ⇒ {} [{}]",
                        c.src, c.dst, c.service, c.before, c.before_rule, c.after, c.after_rule
                    );
                }
                let opened = changes.iter().filter(|c| c.after == "allow").count();
                let closed = changes.iter().filter(|c| c.before == "allow").count();
                println!(
                    "{} change(s): {opened} opened, {closed} closed, {} other; {} host(s) get new tables{}",
                    changes.len(),
                    changes.len() - opened - closed,
                    hosts.len(),
                    if hosts.is_empty() { String::new() } else { format!(" ({})", hosts.iter().map(|h| h.0.as_str()).collect::<Vec<_>>().join(", ")) }
                );
            }
            Ok(if *detailed_exitcode && !changes.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCmd::Quarantine(q) => quarantine(q, out),
        PolicyCmd::Schema { inventory } => {
            let s = if *inventory {
                bulkhead_policy::inventory_schema()
            } else {
                bulkhead_policy::policy_schema()
            };
            print_json(&s);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_rev(dir: &Path, rev: &str) -> Result<Resolved> {
    match load_dir(dir, None) {
        Ok((_, r)) => Ok(r),
        Err(LoadError::Invalid(d)) => bail!(
            "the policy set at {rev} is invalid:\n{}",
            d.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
        Err(e) => Err(anyhow!(e)).with_context(|| format!("loading the policy set at {rev}")),
    }
}

/// Write the files of `path` at git revision `rev` into `dest`.
fn checkout(repo: &Path, rev: &str, path: &Path, dest: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let spec = format!("{rev}:{}", path.display());
    let ls = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["ls-tree", "--name-only", &spec])
        .output()
        .context("running git (is it installed?)")?;
    if !ls.status.success() {
        bail!(
            "git cannot list {spec} in {}: {}",
            repo.display(),
            String::from_utf8_lossy(&ls.stderr).trim()
        );
    }
    for name in String::from_utf8_lossy(&ls.stdout).lines() {
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let show = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["show", &format!("{spec}/{name}")])
            .output()
            .context("running git show")?;
        if !show.status.success() {
            bail!(
                "git show {spec}/{name} failed: {}",
                String::from_utf8_lossy(&show.stderr).trim()
            );
        }
        std::fs::write(dest.join(name), &show.stdout)
            .with_context(|| format!("writing {}", dest.join(name).display()))?;
    }
    Ok(dest.to_path_buf())
}

fn parse_proto(s: &str) -> Result<u8> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "icmp" => 1,
        "icmpv6" => 58,
        n => n.parse::<u8>().ok().filter(|&n| n != 0).ok_or_else(|| {
            anyhow!("unknown protocol `{s}` (tcp, udp, sctp, icmp, icmpv6 or 1-255)")
        })?,
    })
}

/// A side of a flow: a managed VM (index, its address) or a bare address.
fn endpoint(res: &Resolved, s: &str, family: Option<bool>) -> Result<(Option<usize>, IpAddr)> {
    if let Some(&i) = res.vm_by_name.get(s) {
        let vm = &res.vms[i];
        let a = vm
            .addrs
            .iter()
            .find(|a| family.is_none_or(|v4| a.is_ipv4() == v4))
            .or(vm.addrs.first())
            .ok_or_else(|| anyhow!("VM `{s}` has no address"))?;
        return Ok((Some(i), *a));
    }
    let a: IpAddr = s
        .parse()
        .map_err(|_| anyhow!("`{s}` is neither a VM of the inventory nor an IP address"))?;
    let owner = res.vms.iter().position(|v| v.addrs.contains(&a));
    Ok((owner, a))
}

#[allow(clippy::too_many_arguments)]
fn explain(
    res: &Resolved,
    out: Output,
    src: &str,
    dst: &str,
    proto: &str,
    port: u16,
    icmp_type: u8,
    icmp_code: u8,
) -> Result<ExitCode> {
    let p = parse_proto(proto)?;
    let port = if p == 1 || p == 58 {
        u16::from(icmp_type) << 8 | u16::from(icmp_code)
    } else {
        port
    };
    let (si, sa) = endpoint(res, src, None)?;
    let (di, da) = endpoint(res, dst, Some(sa.is_ipv4()))?;
    let (si, sa) = if si.is_some() && sa.is_ipv4() != da.is_ipv4() {
        endpoint(res, src, Some(da.is_ipv4()))?
    } else {
        (si, sa)
    };
    if si.is_none() && di.is_none() {
        bail!(
            "neither {src} nor {dst} is a managed VM; Bulkhead judges traffic of managed VMs only"
        );
    }
    let svc = if p == 1 || p == 58 {
        format!("{}/{}:{}", proto_name(p), icmp_type, icmp_code)
    } else {
        format!("{}/{}", proto_name(p), port)
    };
    let mut sides = Vec::new();
    if let Some(s) = si {
        sides.push((s, DIR_EGRESS, da, evaluate(res, s, DIR_EGRESS, da, p, port)));
    }
    if let Some(d) = di {
        sides.push((
            d,
            DIR_INGRESS,
            sa,
            evaluate(res, d, DIR_INGRESS, sa, p, port),
        ));
    }
    let denied = sides
        .iter()
        .find(|s| s.3.action != ACTION_ALLOW && s.3.action != ACTION_MONITOR);
    let final_action = match denied {
        Some(s) => s.3.action,
        None if sides.iter().any(|s| s.3.action == ACTION_MONITOR) => ACTION_MONITOR,
        None => ACTION_ALLOW,
    };
    let rule_info = |d: &bulkhead_policy::Decision| -> (String, String) {
        let r = res.rules.iter().find(|r| r.id == d.rule);
        match r {
            Some(r) => (res.tiers[r.tier].clone(), r.policy.clone()),
            None if d.rule.starts_with("system/") => ("system".into(), String::new()),
            None if d.rule.starts_with("quarantine/") => ("quarantine".into(), String::new()),
            None => ("default".into(), String::new()),
        }
    };
    if out == Output::Json {
        print_json(&json!({
            "src": src, "src_addr": sa, "dst": dst, "dst_addr": da, "service": svc,
            "verdict": action_name(final_action),
            "sides": sides.iter().map(|(vm, dir, peer, d)| {
                let (tier, policy) = rule_info(d);
                json!({"vm": res.vms[*vm].name, "direction": dir_name(*dir), "peer": peer,
                       "verdict": action_name(d.action), "rule": d.rule, "tier": tier, "policy": policy,
                       "log": d.log, "considered": d.trace})
            }).collect::<Vec<_>>(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{src} ({sa}) → {dst} ({da}) {svc}: {}",
        action_name(final_action).to_uppercase()
    );
    for (vm, dir, peer, d) in &sides {
        let (tier, policy) = rule_info(d);
        println!(
            "  {} of {} (peer {peer}): {} by rule `{}`{}{}",
            dir_name(*dir),
            res.vms[*vm].name,
            action_name(d.action),
            d.rule,
            if policy.is_empty() {
                format!(" [{tier}]")
            } else {
                format!(" [tier {tier}, policy {policy}]")
            },
            if d.log { " (logged)" } else { "" }
        );
        for s in &d.trace {
            println!(
                "      {:<28} {:<12} {:<7} {}{}",
                s.rule,
                s.tier,
                s.action,
                s.outcome,
                if s.reflected {
                    " (reflected: symmetric rule of the peer)"
                } else {
                    ""
                }
            );
        }
        if d.rule == "default" {
            println!(
                "      {:<28} {:<12} {:<7} matched",
                "default",
                "default",
                action_name(d.action)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The full tables as JSON (the demo and tools read it).
fn tables_json(t: &bulkhead_abi::model::HostTables, revision: &str) -> serde_json::Value {
    json!({
        "revision": revision,
        "endpoints": t.endpoints.iter().enumerate().map(|(i, e)| json!({
            "slot": i, "id": e.id, "mac": fmt_mac(&e.mac), "addrs": e.addrs, "flags": e.flags,
        })).collect::<Vec<_>>(),
        "ipcache": t.ipcache.iter().map(|e| json!({
            "prefix": format!("{}/{}", e.addr, e.prefix_len), "identity": e.identity,
        })).collect::<Vec<_>>(),
        "port_classes": t.port_classes.iter().map(|r| json!({
            "kind": if r.kind == PORT_KIND_L4 { "l4" } else { "icmp" }, "first": r.first, "last": r.last, "class": r.class,
        })).collect::<Vec<_>>(),
        "policy": t.policy.iter().map(|(k, v)| json!({
            "slot": k.slot, "direction": dir_name(k.direction), "identity": k.identity, "proto": k.proto,
            "port_class": k.port_class, "action": action_name(v.action), "log": v.flags & VERDICT_LOG != 0,
            "refine": v.flags & VERDICT_REFINE != 0, "rule": v.rule,
        })).collect::<Vec<_>>(),
        "rules": t.rules.as_slice(),
    })
}
