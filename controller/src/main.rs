//! `bulkhead-controller`: serves compiled policy to the agents, and issues their certificates.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bulkhead_audit::roles::{Role, RoleAssignments};
use bulkhead_controller::evidence::{EvidenceConfig, ROLES_FILE};
use bulkhead_controller::repo::Repo;
use bulkhead_controller::server::{AdminService, EnforcementService};
use bulkhead_controller::{metrics, Controller};
use bulkhead_wire::pb;
use bulkhead_wire::pki::{self, Subject};
use clap::{Parser, Subcommand};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Bulkhead controller: follows the policy repository, compiles each commit for every
/// hypervisor host, and pushes each host its own tables over mutual TLS.
///
/// First set up the PKI, then serve:
///   bulkhead-controller pki init --pki /etc/bulkhead/pki --name ctl.example --ip 10.0.0.5
///   bulkhead-controller pki host hv-01 --pki /etc/bulkhead/pki --out ./hv-01
///   bulkhead-controller pki admin alice --role security-admin --pki /etc/bulkhead/pki --out .
///   bulkhead-controller serve --repo /srv/policy.git --pki /etc/bulkhead/pki
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the agents and the admin API.
    Serve(ServeArgs),
    /// Create the CA and issue certificates.
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Policy repository: a clone or a bare repository.
    #[arg(long)]
    repo: PathBuf,
    /// Branch (or any revision) to follow.
    #[arg(long, default_value = "HEAD")]
    rev: String,
    /// How often to look for new commits, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// gRPC listener (agents and admins).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// PKI directory made by `pki init` (ca.crt, controller.crt, controller.key).
    #[arg(long, env = "BULKHEAD_PKI", default_value = "/etc/bulkhead/pki")]
    pki: PathBuf,
    /// Prometheus metrics listener.
    #[arg(long, default_value = "127.0.0.1:9465")]
    metrics: SocketAddr,
    /// The audit trail (append-only, hash-chained, signed checkpoints, 184-day retention).
    #[arg(long, default_value = "/var/lib/bulkhead/audit")]
    audit_dir: PathBuf,
    /// Audit retention in days (Cybersecurity Law: six months; less than 184 is refused).
    /// Older closed segments are removed by a scheduled job, each removal recorded first.
    #[arg(long, default_value_t = bulkhead_audit::store::MIN_RETENTION_DAYS)]
    retention_days: u32,
    /// How often the retention job runs, in hours (also once at start).
    #[arg(long, default_value_t = 24)]
    retention_check_hours: u64,
    /// Clock-sync state is recorded when it changes and at least this often, in minutes.
    #[arg(long, default_value_t = 10)]
    timesync_record_minutes: u64,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the CA and the controller's server certificate.
    Init {
        #[arg(long)]
        pki: PathBuf,
        /// DNS names agents use to reach the controller.
        #[arg(long = "name", default_value = "localhost")]
        names: Vec<String>,
        /// Addresses agents use to reach the controller.
        #[arg(long = "ip", default_value = "127.0.0.1")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a host certificate; writes ca.crt, host.crt and host.key into --out for that
    /// host's agent.
    Host {
        name: String,
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue an administrator certificate with exactly one role: system-admin,
    /// security-admin or audit-admin (MLPS: no account combines roles).
    Admin {
        user: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub const ROLES: [&str; 3] = ["system-admin", "security-admin", "audit-admin"];

fn pki_cmd(cmd: PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Init {
            pki: dir,
            names,
            ips,
            days,
        } => {
            anyhow::ensure!(
                !dir.join("ca.key").exists(),
                "{} already holds a CA; refusing to overwrite it",
                dir.display()
            );
            let ca = pki::new_ca("Bulkhead CA", days)?;
            pki::write_pair(&dir, "ca", &ca)?;
            let server = pki::issue(&ca, &Subject::Controller { dns: names, ips }, days, 0)?;
            pki::write_pair(&dir, "controller", &server)?;
            println!("CA and controller certificate written to {}", dir.display());
        }
        PkiCmd::Host {
            name,
            pki: dir,
            out,
            days,
        } => {
            let ca = pki::read_pair(&dir, "ca")?;
            let cert = pki::issue(&ca, &Subject::Host(name.clone()), days, 0)?;
            pki::write_pair(&out, "host", &cert)?;
            write_ca(&out, &ca)?;
            println!("certificate for host {name} written to {}", out.display());
        }
        PkiCmd::Admin {
            user,
            role,
            pki: dir,
            out,
            days,
        } => {
            anyhow::ensure!(
                ROLES.contains(&role.as_str()),
                "unknown role {role:?}; one of {}",
                ROLES.join(", ")
            );
            // The role registry: one role per account (MLPS 8.1.5), exported in the
            // compliance report. A second role for an existing account is refused.
            let registry = dir.join(ROLES_FILE);
            let mut roles = RoleAssignments::load(&registry)
                .with_context(|| format!("reading the role registry {}", registry.display()))?;
            let r = Role::parse(&role).with_context(|| format!("unknown role {role:?}"))?;
            roles.assign(&user, r).with_context(|| {
                format!(
                    "{user} already holds another role in {}; one account cannot combine roles",
                    registry.display()
                )
            })?;
            let ca = pki::read_pair(&dir, "ca")?;
            let cert = pki::issue(
                &ca,
                &Subject::Admin {
                    user: user.clone(),
                    role,
                },
                days,
                0,
            )?;
            pki::write_pair(&out, &user, &cert)?;
            write_ca(&out, &ca)?;
            roles
                .save(&registry)
                .with_context(|| format!("writing the role registry {}", registry.display()))?;
            println!("certificate for {user} written to {}", out.display());
        }
    }
    Ok(())
}

fn write_ca(out: &Path, ca: &pki::Pem) -> Result<()> {
    let p = out.join("ca.crt");
    std::fs::write(&p, &ca.cert).with_context(|| format!("writing {}", p.display()))
}

fn compiler() -> bulkhead_controller::CompileFn {
    Arc::new(bulkhead_controller::compile::compile_tree)
}

async fn serve(a: ServeArgs) -> Result<()> {
    let read = |f: &str| {
        let p = a.pki.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("controller.crt")?,
            read("controller.key")?,
        ))
        .client_ca_root(Certificate::from_pem(read("ca.crt")?));
    let repo = Repo::new(&a.repo, &a.rev);
    repo.head()
        .with_context(|| format!("policy repository {}", a.repo.display()))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "controller".into());
    let audit =
        bulkhead_controller::audit::Audit::open_with(&a.audit_dir, &host, a.retention_days)?;
    let ctl = Controller::new(repo, compiler(), Some(audit))?;
    let _ = ctl.evidence_config.set(EvidenceConfig {
        pki_dir: Some(a.pki.clone()),
        retention_days: a.retention_days,
        host: host.clone(),
    });
    tokio::spawn(ctl.clone().audit_housekeeping(
        Duration::from_secs(a.retention_check_hours.max(1) * 3600),
        Duration::from_secs(a.timesync_record_minutes.max(1) * 60),
    ));
    tokio::spawn(ctl.clone().follow_coverage());
    tokio::spawn(ctl.clone().follow_repo(Duration::from_millis(a.poll_ms)));
    tokio::spawn(ctl.clone().follow_inventory());
    tokio::spawn(metrics::serve(a.metrics, ctl.clone()));
    tracing::info!(listen = %a.listen, repo = %a.repo.display(), "serving");
    Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(
            pb::enforcement_server::EnforcementServer::new(EnforcementService(ctl.clone()))
                .max_encoding_message_size(256 * 1024 * 1024),
        )
        .add_service(pb::admin_server::AdminServer::new(AdminService(ctl)))
        .serve_with_shutdown(a.listen, async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(t) = term.as_mut() { t.recv().await; } } => {}
            }
        })
        .await
        .with_context(|| format!("serving on {}", a.listen))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Args::parse().cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Pki(p) => pki_cmd(p),
    }
}
