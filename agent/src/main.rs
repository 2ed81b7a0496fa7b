//! `bulkhead-agent`: runs on every hypervisor host.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bulkhead_abi::{BOOTSTRAP_ALLOW, BOOTSTRAP_DENY, PIN_ROOT};
use bulkhead_agent::enforcer::Enforcer;
use bulkhead_agent::flows::{self, Pending};
use bulkhead_agent::inventory::Source;
use bulkhead_agent::metrics::{self, Metrics};
use bulkhead_agent::netwatch;
use bulkhead_agent::session::{self, SessionConfig, Shared};
use bulkhead_audit::alerts::AlertConfig;
use clap::{Parser, ValueEnum};
use tokio::sync::watch;

/// Bulkhead host agent: enforces the controller's policy on every VM interface of this host.
///
/// At start it loads (or takes over) the eBPF datapath, re-applies the policy it persisted
/// last, attaches to every VM interface it finds, and only then connects to the controller.
/// While the controller is unreachable it keeps enforcing and reconnects with backoff. A
/// restart or kill -9 leaves enforcement in place: programs, maps and links are pinned.
///
/// Example:
///   bulkhead-agent --controller https://ctl.example:7443 --pki /etc/bulkhead/pki \
///     --libvirt /run/libvirt/qemu
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Controller gRPC address.
    #[arg(
        long,
        env = "BULKHEAD_CONTROLLER",
        default_value = "https://127.0.0.1:7443"
    )]
    controller: String,
    /// Name the controller's certificate must carry (defaults to the address's host).
    #[arg(long)]
    server_name: Option<String>,
    /// Directory with ca.crt and this host's host.crt / host.key (`bulkhead cert host`).
    #[arg(long, env = "BULKHEAD_PKI", default_value = "/etc/bulkhead/pki")]
    pki: PathBuf,
    /// Static inventory file (YAML: vms with interfaces: device, mac, addresses).
    #[arg(long, conflicts_with = "libvirt", required_unless_present = "libvirt")]
    inventory: Option<PathBuf>,
    /// Directory of running libvirt domains' XML (usually /run/libvirt/qemu).
    #[arg(long)]
    libvirt: Option<PathBuf>,
    /// Where the last applied policy is persisted.
    #[arg(long, default_value = "/var/lib/bulkhead/agent")]
    state_dir: PathBuf,
    /// bpffs directory for pinned programs, maps and links.
    #[arg(long, default_value = PIN_ROOT)]
    pin_root: PathBuf,
    /// What an interface with no policy yet gets: deny (the safe default) or allow.
    #[arg(long, value_enum, default_value_t = Posture::Deny)]
    bootstrap: Posture,
    /// Prometheus metrics listener.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: SocketAddr,
    /// How often the inventory is rescanned even without interface events.
    #[arg(long, value_parser = humantime_secs, default_value = "5")]
    rescan_secs: Duration,
    /// How often aggregated flow events are sent to the controller.
    #[arg(long, value_parser = humantime_secs, default_value = "1")]
    flush_secs: Duration,
    /// How often rule hit counters and interface enforcement state are sent to the
    /// controller (compliance evidence); also after every apply.
    #[arg(long, value_parser = humantime_secs, default_value = "10")]
    report_secs: Duration,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

#[derive(Clone, Copy, ValueEnum)]
enum Posture {
    Deny,
    Allow,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let source = match (&args.inventory, &args.libvirt) {
        (Some(f), _) => Source::File(f.clone()),
        (None, Some(d)) => Source::Libvirt(d.clone()),
        (None, None) => anyhow::bail!("give --inventory FILE or --libvirt DIR"),
    };
    let read = |f: &str| {
        let p = args.pki.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let server_name = match &args.server_name {
        Some(n) => n.clone(),
        None => args
            .controller
            .split("://")
            .nth(1)
            .and_then(|r| r.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])))
            .unwrap_or("localhost")
            .to_string(),
    };
    let cfg = SessionConfig {
        controller: args.controller.clone(),
        server_name,
        ca_pem: read("ca.crt")?,
        cert_pem: read("host.crt")?,
        key_pem: read("host.key")?,
        flush: args.flush_secs,
        report: args.report_secs,
    };

    // Enforcement first: persisted policy, then interfaces.
    let posture = match args.bootstrap {
        Posture::Deny => BOOTSTRAP_DENY,
        Posture::Allow => BOOTSTRAP_ALLOW,
    };
    let mut enforcer = Enforcer::start(&args.pin_root, &args.state_dir, posture)?;
    let vms = source.scan().context("scanning the inventory")?;
    if let Some(a) = enforcer.current().cloned() {
        tracing::info!(digest = bulkhead_agent::enforcer::short(&a.digests.tables),
            commit = %a.revision.commit, "re-applying the persisted policy");
        enforcer
            .apply(a)
            .context("re-applying the persisted policy")?;
    }
    if let Err(e) = enforcer.set_inventory(&vms) {
        // An interface that cannot be attached must not take the agent (and the reports on
        // every other interface) down: it is reported to the controller as not enforced, with
        // the error, and retried at every rescan.
        tracing::error!(error = format!("{e:#}"), "attaching to VM interfaces");
    }
    let events = enforcer.take_events()?;
    let metrics = Arc::new(Metrics::new()?);
    metrics.vms.set(vms.len() as i64);
    let names = enforcer.names.clone();
    let enforcer = Arc::new(Mutex::new(enforcer));
    let pending = Arc::new(Mutex::new(Pending::default()));
    flows::spawn_reader(events, pending.clone(), names, AlertConfig::default());
    let (vms_tx, vms_rx) = watch::channel(vms);

    tokio::spawn(metrics::serve(
        args.metrics,
        metrics.clone(),
        enforcer.clone(),
    ));
    tokio::spawn(session::run(
        cfg,
        Shared {
            enforcer: enforcer.clone(),
            metrics: metrics.clone(),
            pending,
            vms: vms_rx,
        },
    ));

    // Inventory: rescan on every link event, and periodically.
    let mut links = netwatch::watch_links().context("subscribing to link events")?;
    let mut tick = tokio::time::interval(args.rescan_secs);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = links.recv() => {
                // Let a burst of link events settle.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while links.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let vms = match source.scan() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "inventory scan failed; keeping the previous one");
                continue;
            }
        };
        let e = enforcer.clone();
        let v = vms.clone();
        let attached = tokio::task::spawn_blocking(move || -> Result<usize> {
            let mut e = e
                .lock()
                .map_err(|_| anyhow::anyhow!("enforcer lock poisoned"))?;
            e.set_inventory(&v)?;
            Ok(v.iter().map(|vm| vm.interfaces.len()).sum())
        })
        .await?;
        match attached {
            Ok(n) => metrics.interfaces.set(n as i64),
            Err(e) => tracing::error!(error = format!("{e:#}"), "updating interfaces"),
        }
        metrics.vms.set(vms.len() as i64);
        vms_tx.send_if_modified(|old| {
            let changed = *old != vms;
            *old = vms;
            changed
        });
    }
    // Leaving enforcement pinned in place is the point: nothing to tear down.
    tracing::info!("stopping; the datapath keeps enforcing the last applied policy");
    Ok(())
}
