//! `bulkhead status`: what the controller serves and what every host enforces, over the
//! admin API with an administrator certificate.
use std::path::PathBuf;

use anyhow::{Context, Result};
use bulkhead_wire::pb;
use clap::Args;
use serde_json::json;

/// How to reach the controller's admin API, and as whom.
#[derive(Args)]
pub struct Connection {
    /// Controller admin/gRPC address.
    #[arg(
        long,
        env = "BULKHEAD_CONTROLLER",
        default_value = "https://127.0.0.1:7443"
    )]
    pub controller: String,
    /// Name the controller's certificate carries.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Directory with ca.crt and USER.crt / USER.key (`bulkhead-controller pki admin USER`).
    #[arg(long, env = "BULKHEAD_PKI", default_value = ".")]
    pub pki: PathBuf,
    /// Administrator whose certificate to use.
    #[arg(long, env = "BULKHEAD_USER")]
    pub user: String,
}

impl Connection {
    /// Run `call` against the admin API over mutual TLS with the user's certificate.
    pub fn call<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(pb::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let read = |f: String| {
            let p = self.pki.join(&f);
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let (ca, cert, key) = (
            read("ca.crt".into())?,
            read(format!("{}.crt", self.user))?,
            read(format!("{}.key", self.user))?,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let ch = bulkhead_wire::connect(&self.controller, &self.server_name, &ca, &cert, &key)
                .await
                .with_context(|| format!("connecting to {}", self.controller))?;
            let reply = call(pb::admin_client::AdminClient::new(ch))
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "controller {}: {}: {}",
                        self.controller,
                        s.code(),
                        s.message()
                    )
                })?;
            Ok(reply.into_inner())
        })
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// (system-admin or security-admin role)
    #[command(flatten)]
    pub conn: Connection,
}

fn short(s: &str) -> &str {
    s.get(..10).unwrap_or(s)
}

fn when(unix: i64) -> String {
    if unix == 0 {
        return "-".into();
    }
    let ago = crate_now() - unix;
    match ago {
        i64::MIN..=59 => format!("{ago}s ago"),
        60..=3599 => format!("{}m ago", ago / 60),
        _ => format!("{}h ago", ago / 3600),
    }
}

fn crate_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn fetch(a: &StatusArgs) -> Result<pb::StatusReply> {
    a.conn
        .call(|mut c| async move { c.status(pb::StatusRequest {}).await })
}

pub fn to_json(s: &pb::StatusReply) -> serde_json::Value {
    let rev = |r: &Option<pb::Revision>| {
        r.as_ref().map(|r| {
            json!({"commit": r.commit, "author": r.author, "committer": r.committer,
                   "commit_time_unix": r.commit_time_unix, "summary": r.summary})
        })
    };
    json!({
        "serving": rev(&s.serving),
        "rejected": s.rejected.iter().map(|r| json!({
            "revision": rev(&r.revision), "errors": r.errors, "at_unix": r.at_unix})).collect::<Vec<_>>(),
        "hosts": s.hosts.iter().map(|h| json!({
            "host": h.host, "connected": h.connected, "connected_since_unix": h.connected_since_unix,
            "enforced_digest": h.enforced_digest, "enforced_commit": h.enforced_commit,
            "enforced_since_unix": h.enforced_since_unix, "desired_digest": h.desired_digest,
            "in_sync": !h.desired_digest.is_empty() && h.desired_digest == h.enforced_digest,
            "vms": h.vms, "last_error": h.last_error, "unbound": h.unbound})).collect::<Vec<_>>(),
    })
}

pub fn print_text(s: &pb::StatusReply) {
    match &s.serving {
        Some(r) => println!(
            "serving   {} \"{}\" by {}",
            short(&r.commit),
            r.summary,
            r.author
        ),
        None => println!("serving   nothing yet (no valid commit)"),
    }
    println!(
        "\n{:<12} {:<10} {:<12} {:<9} {:<10} {:>4}  note",
        "HOST", "AGENT", "ENFORCES", "IN SYNC", "SINCE", "VMS"
    );
    for h in &s.hosts {
        let in_sync = !h.desired_digest.is_empty() && h.desired_digest == h.enforced_digest;
        let note = if !h.last_error.is_empty() {
            format!("error: {}", h.last_error)
        } else if !h.unbound.is_empty() {
            format!("not on this host: {}", h.unbound.join(", "))
        } else {
            String::new()
        };
        println!(
            "{:<12} {:<10} {:<12} {:<9} {:<10} {:>4}  {}",
            h.host,
            if h.connected { "connected" } else { "away" },
            short(&h.enforced_commit),
            if in_sync { "yes" } else { "NO" },
            when(h.enforced_since_unix),
            h.vms.len(),
            note
        );
    }
    if !s.rejected.is_empty() {
        println!("\nrejected commits (newest first):");
        for r in &s.rejected {
            let (c, summary) = r
                .revision
                .as_ref()
                .map_or(("", ""), |v| (short(&v.commit), v.summary.as_str()));
            println!("  {c} \"{summary}\"");
            for e in &r.errors {
                println!("    {e}");
            }
        }
    }
}

/// `bulkhead compliance report`: the MLPS Level 3 report with the controller's live evidence.
#[derive(Args)]
pub struct ComplianceArgs {
    /// (audit-admin role)
    #[command(flatten)]
    pub conn: Connection,
    /// A local copy of the audit store to verify and summarise here; by default the
    /// controller verifies and summarises its own store.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "html")]
    pub format: bulkhead_audit::cli::ReportFormat,
    /// Report file (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also save the evidence the report was built from (JSON; `audit report --evidence`).
    #[arg(long)]
    pub save_evidence: Option<PathBuf>,
}

/// Ask the controller for its live compliance evidence (the audit administrator's operation;
/// refused for other roles, and every call audited by the controller).
pub fn fetch_evidence(
    a: &ComplianceArgs,
    include_store: bool,
) -> Result<bulkhead_audit::report::Evidence> {
    let reply = a
        .conn
        .call(|mut c| async move { c.evidence(pb::EvidenceRequest { include_store }).await })?;
    serde_json::from_str(&reply.evidence_json)
        .with_context(|| format!("evidence from the controller at {}", a.conn.controller))
}

/// `bulkhead compliance retention`: read or change the audit retention period.
#[derive(Args)]
pub struct RetentionArgs {
    /// (audit-admin role)
    #[command(flatten)]
    pub conn: Connection,
    /// New retention period in days (at least 184); without it the current one is shown.
    #[arg(long)]
    pub days: Option<u32>,
}

pub fn retention(a: &RetentionArgs) -> Result<u32> {
    let retention_days = a.days.unwrap_or(0);
    let reply = a.conn.call(|mut c| async move {
        c.audit_settings(pb::AuditSettingsRequest { retention_days })
            .await
    })?;
    Ok(reply.retention_days)
}

/// Build the report: the controller's evidence, merged with a local store's when `--dir`
/// is given. Returns the report and the evidence it used.
pub fn compliance_report(
    a: &ComplianceArgs,
) -> Result<(
    bulkhead_audit::report::Report,
    bulkhead_audit::report::Evidence,
)> {
    use bulkhead_audit::report::{build, Evidence};
    let given = fetch_evidence(a, a.dir.is_none())?;
    let ev = match &a.dir {
        None => given,
        Some(d) => {
            let days = given
                .retention
                .as_ref()
                .map_or(bulkhead_audit::store::MIN_RETENTION_DAYS, |r| {
                    r.retention_days
                });
            let mut ev = Evidence::from_store(d, days, 50)
                .with_context(|| format!("reading the audit store {}", d.display()))?;
            bulkhead_audit::cli::merge(&mut ev, given);
            ev
        }
    };
    Ok((build(&ev), ev))
}

pub fn run_compliance_report(a: &ComplianceArgs) -> Result<()> {
    use bulkhead_audit::cli::ReportFormat;
    let (r, ev) = compliance_report(a)?;
    if let Some(p) = &a.save_evidence {
        std::fs::write(p, serde_json::to_string_pretty(&ev)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let text = match a.format {
        ReportFormat::Html => bulkhead_audit::report::html(&r),
        ReportFormat::Json => serde_json::to_string_pretty(&r)? + "\n",
    };
    match &a.out {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
            println!("report written to {}", p.display());
            for (s, n) in &r.summary {
                println!("  {s:?}: {n}");
            }
        }
        None => print!("{text}"),
    }
    Ok(())
}
