//! `bulkhead audit …` subcommands. The admin CLI embeds [`AuditCommand`] and calls [`run`].
//! There is deliberately no subcommand that deletes or edits records.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::export::{export, parse_time_arg, Filter, Format};
use crate::forward::{ForwardConfig, Forwarder, Payload, Transport};
use crate::report::{build, html, Evidence};
use crate::store::{from_hex32, load_public_key, MIN_RETENTION_DAYS};
use crate::verify::verify;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Html,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints; report every problem and where.
    /// Exit status 0 = intact, 2 = problems found.
    Verify {
        /// Audit store directory.
        #[arg(long, env = "BULKHEAD_AUDIT_DIR")]
        dir: PathBuf,
        /// Checkpoint public key (64 hex chars or a file), pinned off-box; default: the store's.
        #[arg(long)]
        pubkey: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export records (JSON lines or CSV) for assessors and tools.
    Export {
        #[arg(long, env = "BULKHEAD_AUDIT_DIR")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: Format,
        /// From (inclusive): RFC 3339 or YYYY-MM-DD (UTC).
        #[arg(long)]
        from: Option<String>,
        /// To (exclusive): RFC 3339 or YYYY-MM-DD (UTC).
        #[arg(long)]
        to: Option<String>,
        /// Record type (repeatable): flow_verdict, admin_action, alert, policy_revision, …
        #[arg(long = "type")]
        types: Vec<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        host: Option<String>,
        /// Rule index, rule name or policy name.
        #[arg(long)]
        rule: Option<String>,
        /// Only flows to or from public addresses (8.1.3.5 d).
        #[arg(long)]
        internet: bool,
        /// Only remote administration flows: SSH, RDP, VNC, WinRM (8.1.3.5 d).
        #[arg(long)]
        remote_admin: bool,
        /// Output file (default: stdout). Not `-o`/`--output`: the admin CLI uses those
        /// globally for the output format.
        #[arg(id = "out_file", long = "out")]
        output: Option<PathBuf>,
    },
    /// MLPS Level 3 compliance report (HTML or JSON).
    Report {
        #[arg(long, env = "BULKHEAD_AUDIT_DIR")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "html")]
        format: ReportFormat,
        /// Evidence JSON from the controller (merged with what the store provides).
        #[arg(long)]
        evidence: Option<PathBuf>,
        #[arg(long, default_value_t = MIN_RETENTION_DAYS)]
        retention_days: u32,
        /// Report file (default: stdout).
        #[arg(id = "out_file", long = "out")]
        output: Option<PathBuf>,
    },
    /// Forward records to a SIEM (syslog RFC 5424 over TCP or TLS), from the persisted cursor.
    Forward {
        #[arg(long, env = "BULKHEAD_AUDIT_DIR")]
        dir: PathBuf,
        /// host:port of the SIEM.
        #[arg(long)]
        addr: String,
        /// Cursor name.
        #[arg(long, default_value = "siem")]
        name: String,
        #[arg(long, value_enum, default_value = "json")]
        payload: Payload,
        /// CA bundle: enables TLS (RFC 5425).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Name expected in the SIEM certificate (default: host part of --addr).
        #[arg(long)]
        tls_server_name: Option<String>,
        /// Send what is there, wait for confirmation, exit.
        #[arg(long)]
        once: bool,
    },
    /// Show the clock synchronisation state the recorder writes into records.
    TimeSync,
}

fn parse_pubkey(s: &str) -> Result<ed25519_dalek::VerifyingKey> {
    if let Some(b) = from_hex32(s.trim().as_bytes()) {
        return ed25519_dalek::VerifyingKey::from_bytes(&b)
            .map_err(|e| Error::Config(format!("public key: {e}")));
    }
    load_public_key(std::path::Path::new(s))
}

fn time_arg(s: &Option<String>) -> Result<Option<time::OffsetDateTime>> {
    match s {
        None => Ok(None),
        Some(s) => parse_time_arg(s)
            .map(Some)
            .ok_or_else(|| Error::Config(format!("bad time {s:?}: use RFC 3339 or YYYY-MM-DD"))),
    }
}

/// Run a subcommand, writing human output to `out`. Returns the process exit status.
pub fn run(cmd: AuditCommand, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        AuditCommand::Verify { dir, pubkey, json } => {
            let key = pubkey.as_deref().map(parse_pubkey).transpose()?;
            let r = verify(&dir, key)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &r)?;
                writeln!(out)?;
            } else {
                writeln!(out, "store:        {}", dir.display())?;
                writeln!(out, "segments:     {}", r.segments)?;
                writeln!(
                    out,
                    "records:      {} (seq {}..={})",
                    r.records,
                    r.first_seq.map(|x| x.to_string()).unwrap_or_default(),
                    r.last_seq.map(|x| x.to_string()).unwrap_or_default()
                )?;
                if let Some(p) = r.purged_through {
                    writeln!(out, "purged:       seq 0..={p} (retention, on record)")?;
                }
                writeln!(
                    out,
                    "checkpoints:  {} signed, {} matched; last: {}",
                    r.checkpoints,
                    r.checkpoints_matched,
                    r.last_checkpoint
                        .as_ref()
                        .map(|c| format!("seq {} at {}", c.seq, c.ts))
                        .unwrap_or_else(|| "none".into())
                )?;
                writeln!(out, "public key:   {}", r.public_key)?;
                if r.ok() {
                    writeln!(out, "result:       OK — chain intact, no record modified, deleted, inserted, reordered or truncated")?;
                } else {
                    writeln!(
                        out,
                        "result:       FAILED — {} problem(s):",
                        r.problems.len()
                    )?;
                    for p in &r.problems {
                        writeln!(out, "  {p}")?;
                    }
                }
            }
            Ok(if r.ok() { 0 } else { 2 })
        }
        AuditCommand::Export {
            dir,
            format,
            from,
            to,
            types,
            vm,
            host,
            rule,
            internet,
            remote_admin,
            output,
        } => {
            let filter = Filter {
                from: time_arg(&from)?,
                to: time_arg(&to)?,
                types,
                vm,
                host,
                rule,
                subject: None,
                internet,
                remote_admin,
            };
            let n = match output {
                Some(p) => {
                    let mut f =
                        std::io::BufWriter::new(std::fs::File::create(&p).map_err(|e| {
                            Error::Io {
                                path: p.clone(),
                                source: e,
                            }
                        })?);
                    let n = export(&dir, &filter, format, &mut f)?;
                    writeln!(out, "exported {n} records to {}", p.display())?;
                    n
                }
                None => export(&dir, &filter, format, out)?,
            };
            let _ = n;
            Ok(0)
        }
        AuditCommand::Report {
            dir,
            format,
            evidence,
            retention_days,
            output,
        } => {
            let mut ev = Evidence::from_store(&dir, retention_days, 50)?;
            if let Some(p) = evidence {
                let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
                    path: p.clone(),
                    source: e,
                })?;
                let given: Evidence = serde_json::from_str(&text)?;
                merge(&mut ev, given);
            }
            let r = build(&ev);
            let text = match format {
                ReportFormat::Html => html(&r),
                ReportFormat::Json => serde_json::to_string_pretty(&r)? + "\n",
            };
            match output {
                Some(p) => {
                    std::fs::write(&p, text).map_err(|e| Error::Io {
                        path: p.clone(),
                        source: e,
                    })?;
                    writeln!(out, "report written to {}", p.display())?;
                    for (s, n) in &r.summary {
                        writeln!(out, "  {s:?}: {n}")?;
                    }
                }
                None => out.write_all(text.as_bytes())?,
            }
            Ok(0)
        }
        AuditCommand::Forward {
            dir,
            addr,
            name,
            payload,
            tls_ca,
            tls_cert,
            tls_key,
            tls_server_name,
            once,
        } => {
            let transport = match tls_ca {
                None => Transport::Tcp,
                Some(ca) => Transport::Tls {
                    ca,
                    client: tls_cert.zip(tls_key),
                    server_name: tls_server_name.unwrap_or_else(|| {
                        addr.rsplit_once(':')
                            .map(|x| x.0)
                            .unwrap_or(&addr)
                            .to_string()
                    }),
                },
            };
            let mut f = Forwarder::new(&dir, ForwardConfig::new(&name, &addr, transport, payload))?;
            if once {
                let n = f.pump()?;
                f.settle()?;
                writeln!(
                    out,
                    "sent {n} records; confirmed up to seq {}",
                    f.status().confirmed
                )?;
            } else {
                let stop = AtomicBool::new(false);
                f.run(&stop, Duration::from_millis(200));
            }
            Ok(0)
        }
        AuditCommand::TimeSync => {
            let c = crate::timesync::clock_status();
            serde_json::to_writer_pretty(&mut *out, &c)?;
            writeln!(out)?;
            Ok(if c.synced { 0 } else { 3 })
        }
    }
}

/// Controller-supplied evidence overrides the store-derived parts it sets; its retention
/// setting (the one the controller enforces) replaces the assumed one.
pub fn merge(ev: &mut Evidence, g: Evidence) {
    if let Some(r) = &g.retention {
        match &mut ev.retention {
            Some(mine) => mine.retention_days = r.retention_days,
            None => ev.retention = Some(r.clone()),
        }
    }
    if ev.integrity.is_none() {
        ev.integrity = g.integrity.clone();
    }
    if ev.coverage.is_none() {
        ev.coverage = g.coverage.clone();
    }
    if ev.recent_alerts.is_none() {
        ev.recent_alerts = g.recent_alerts.clone();
    }
    macro_rules! take {
        ($($f:ident),*) => { $( if g.$f.is_some() { ev.$f = g.$f; } )* };
    }
    take!(
        default_deny,
        enforcement,
        rule_analysis,
        rule_export,
        stateful,
        forwarding,
        time_sync,
        roles,
        policy_distribution,
        zones,
        migration
    );
}
