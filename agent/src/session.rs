//! The stream to the controller: hello and inventory out, snapshots and deltas in, acks out.
//! Reconnects forever with exponential backoff and jitter; enforcement never waits for it.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bulkhead_wire::pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::enforcer::{short, Applied, Enforcer};
use crate::flows::Pending;
use crate::inventory::Vm;
use crate::metrics::Metrics;

pub struct SessionConfig {
    pub controller: String,
    /// Name the controller's certificate is checked against.
    pub server_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub flush: Duration,
    /// How often the host report (rule counters, interface state) is sent.
    pub report: Duration,
}

pub struct Shared {
    pub enforcer: Arc<Mutex<Enforcer>>,
    pub metrics: Arc<Metrics>,
    pub pending: Arc<Mutex<Pending>>,
    pub vms: watch::Receiver<Vec<Vm>>,
}

async fn connect(cfg: &SessionConfig) -> Result<Channel> {
    bulkhead_wire::connect(
        &cfg.controller,
        &cfg.server_name,
        &cfg.ca_pem,
        &cfg.cert_pem,
        &cfg.key_pem,
    )
    .await
    .with_context(|| format!("connecting to the controller at {}", cfg.controller))
}

/// Run sessions forever.
pub async fn run(cfg: SessionConfig, shared: Shared) {
    let mut backoff = Duration::from_millis(250);
    loop {
        shared.metrics.reconnects.inc();
        let started = Instant::now();
        match session(&cfg, &shared).await {
            Ok(()) => tracing::warn!("controller closed the stream"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "controller session ended"),
        }
        shared.metrics.connected.set(0);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        // Full jitter: hundreds of agents must not reconnect in lockstep after an outage.
        let sleep = backoff.mul_f64(rand::random_range(0.5..1.0));
        tracing::info!(
            retry_in_ms = sleep.as_millis() as u64,
            "still enforcing the last applied policy"
        );
        tokio::time::sleep(sleep).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn inventory_msg(vms: &[Vm]) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Inventory(pb::Inventory {
            vms: vms
                .iter()
                .map(|v| pb::Vm {
                    name: v.name.clone(),
                    uuid: v.uuid.clone(),
                    labels: v.labels.clone().into_iter().collect(),
                    interfaces: v
                        .interfaces
                        .iter()
                        .map(|i| pb::Interface {
                            device: i.device.clone(),
                            mac: crate::inventory::parse_mac(&i.mac)
                                .map(|m| m.to_vec())
                                .unwrap_or_default(),
                            addresses: i.addresses.iter().map(|a| a.to_string()).collect(),
                        })
                        .collect(),
                })
                .collect(),
        })),
    }
}

async fn session(cfg: &SessionConfig, shared: &Shared) -> Result<()> {
    let channel = connect(cfg).await?;
    let mut client = pb::enforcement_client::EnforcementClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let enforced_digest = shared
        .enforcer
        .lock()
        .ok()
        .and_then(|e| e.current().map(|a| a.digests.tables.clone()))
        .unwrap_or_default();
    tx.send(pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            layout_version: bulkhead_abi::LAYOUT_VERSION,
            enforced_digest,
        })),
    })
    .await?;
    let mut vms = shared.vms.clone();
    let first = inventory_msg(&vms.borrow_and_update());
    tx.send(first).await?;
    let mut inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .context("opening the sync stream")?
        .into_inner();
    shared.metrics.connected.set(1);
    tracing::info!(controller = %cfg.controller, "connected");
    let mut flush = tokio::time::interval(cfg.flush);
    let mut report = tokio::time::interval(cfg.report);
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg.context("receiving from the controller")? else {
                    return Ok(());
                };
                let ack = handle(shared, msg).await;
                tx.send(pb::AgentMessage { kind: Some(pb::agent_message::Kind::Ack(ack)) }).await?;
                // What is enforced changed: the evidence follows at once.
                report.reset_immediately();
            }
            _ = report.tick() => {
                if let Some(r) = host_report(shared).await {
                    tx.send(pb::AgentMessage { kind: Some(pb::agent_message::Kind::Report(r)) }).await?;
                }
            }
            changed = vms.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let msg = inventory_msg(&vms.borrow_and_update());
                tx.send(msg).await?;
            }
            _ = flush.tick() => {
                let batch = {
                    let Ok(mut p) = shared.pending.lock() else { continue };
                    if p.is_empty() {
                        continue;
                    }
                    let Ok(e) = shared.enforcer.lock() else { continue };
                    p.take(&e.names)
                };
                shared.metrics.events_forwarded.inc_by(batch.records.len() as u64);
                tx.send(pb::AgentMessage { kind: Some(pb::agent_message::Kind::Events(batch)) }).await?;
            }
        }
    }
}

/// Rule counters and interface state, read off the I/O threads.
async fn host_report(shared: &Shared) -> Option<pb::HostReport> {
    let enforcer = shared.enforcer.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<pb::HostReport> {
        let mut e = enforcer
            .lock()
            .map_err(|_| anyhow::anyhow!("enforcer lock poisoned"))?;
        e.host_report()
    })
    .await;
    match r {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::warn!(error = format!("{e:#}"), "host report not sent");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "host report not sent");
            None
        }
    }
}

/// Apply one controller message; the ack says what happened.
async fn handle(shared: &Shared, msg: pb::ControllerMessage) -> pb::Ack {
    let enforcer = shared.enforcer.clone();
    let metrics = shared.metrics.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(
        move || -> Result<(String, Vec<String>), (String, String, bool)> {
            let mut e = enforcer
                .lock()
                .map_err(|_| (String::new(), "enforcer lock poisoned".to_string(), false))?;
            let applied = match msg.kind {
                Some(pb::controller_message::Kind::Snapshot(s)) => {
                    let (tables, digests) = bulkhead_wire::snapshot_tables(&s)
                        .map_err(|err| (s.digest.clone(), err.to_string(), false))?;
                    Applied {
                        revision: s.revision.unwrap_or_default(),
                        digests,
                        tables,
                    }
                }
                Some(pb::controller_message::Kind::Delta(d)) => {
                    // The digests of what we hold are the ones we checked and acknowledged:
                    // no need to hash them again (the result's digest is still checked).
                    let applied = match e.current() {
                        Some(a) => bulkhead_wire::apply_delta_to(&a.tables, &a.digests, &d),
                        None => {
                            let empty = bulkhead_wire::Canonical::default();
                            bulkhead_wire::apply_delta_to(&empty, &empty.digests(), &d)
                        }
                    };
                    match applied {
                        Ok((tables, digests)) => Applied {
                            revision: d.revision.unwrap_or_default(),
                            digests,
                            tables,
                        },
                        // Ask for a snapshot; keep enforcing what we have.
                        Err(err) => return Err((d.digest, err.to_string(), true)),
                    }
                }
                None => return Err((String::new(), "empty controller message".into(), false)),
            };
            let digest = applied.digests.tables.clone();
            let commit = applied.revision.commit.clone();
            let report = e
                .apply(applied)
                .map_err(|err| (digest.clone(), format!("{err:#}"), false))?;
            tracing::info!(digest = short(&digest), commit = %commit, epoch = report.epoch,
            written = report.written, deleted = report.deleted, "applied");
            Ok((digest, report.unbound))
        },
    )
    .await;
    let micros = started.elapsed().as_micros() as u64;
    metrics
        .apply_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok((digest, unbound))) => {
            metrics.applies.inc();
            pb::Ack {
                digest,
                ok: true,
                apply_micros: micros,
                unbound,
                ..Default::default()
            }
        }
        Ok(Err((digest, error, resync))) => {
            metrics.apply_failures.inc();
            tracing::error!(%error, resync, "not applied; the previous policy stays in force");
            pb::Ack {
                digest,
                ok: false,
                error,
                resync,
                apply_micros: micros,
                ..Default::default()
            }
        }
        Err(join) => pb::Ack {
            ok: false,
            error: join.to_string(),
            ..Default::default()
        },
    }
}
