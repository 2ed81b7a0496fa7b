//! Prometheus metrics of the agent, refreshed from the datapath at every scrape.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bulkhead_abi::{STAT_EVENTS_RATE_LIMITED, STAT_EVENTS_RING_FULL, STAT_NAMES};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::enforcer::Enforcer;

pub struct Metrics {
    pub registry: Registry,
    pub apply_seconds: Histogram,
    pub applies: IntCounter,
    pub apply_failures: IntCounter,
    pub connected: IntGauge,
    pub reconnects: IntCounter,
    pub vms: IntGauge,
    pub interfaces: IntGauge,
    applied_epoch: IntGauge,
    applied_commit_time: IntGauge,
    map_entries: IntGaugeVec,
    conntrack: IntGauge,
    datapath: IntGaugeVec,
    events_not_delivered: IntGauge,
    unflushed_cpus: IntGauge,
    pub events_forwarded: IntCounter,
    pub events_dropped_by_agent: IntCounter,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique: registration cannot fail.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let r = Registry::new_custom(Some("bulkhead_agent".into()), None)?;
        Ok(Self {
            apply_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("apply_seconds", "Time to apply a snapshot or delta")
                        .buckets(vec![0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                )?,
            ),
            applies: reg(&r, IntCounter::new("applies_total", "Tables applied")?),
            apply_failures: reg(
                &r,
                IntCounter::new("apply_failures_total", "Tables the datapath refused")?,
            ),
            connected: reg(
                &r,
                IntGauge::new("controller_connected", "1 while the controller stream is up")?,
            ),
            reconnects: reg(
                &r,
                IntCounter::new("controller_connects_total", "Connection attempts")?,
            ),
            vms: reg(&r, IntGauge::new("vms", "VMs found on this host")?),
            interfaces: reg(
                &r,
                IntGauge::new("interfaces_enforced", "VM interfaces with the datapath attached")?,
            ),
            applied_epoch: reg(
                &r,
                IntGauge::new("applied_epoch", "Datapath policy epoch in force")?,
            ),
            applied_commit_time: reg(
                &r,
                IntGauge::new(
                    "applied_commit_timestamp_seconds",
                    "Commit time of the policy revision in force",
                )?,
            ),
            map_entries: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("map_entries", "Entries of the active table generation"),
                    &["table"],
                )?,
            ),
            conntrack: reg(
                &r,
                IntGauge::new("conntrack_entries", "Live connection-tracking entries")?,
            ),
            datapath: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "datapath_events",
                        "Datapath counters since load (packets, allows, denies, …)",
                    ),
                    &["counter"],
                )?,
            ),
            events_not_delivered: reg(
                &r,
                IntGauge::new(
                    "events_not_delivered",
                    "Flow events the kernel could not deliver (rate limit or full ring)",
                )?,
            ),
            unflushed_cpus: reg(
                &r,
                IntGauge::new(
                    "flow_cache_unflushed_cpus",
                    "CPUs whose flow-cache hits the last counter read could not flush (cpuset, or a CPU busy with a real-time task): counters lag there",
                )?,
            ),
            events_forwarded: reg(
                &r,
                IntCounter::new("events_forwarded_total", "Flow records sent to the controller")?,
            ),
            events_dropped_by_agent: reg(
                &r,
                IntCounter::new(
                    "events_dropped_total",
                    "Flow records dropped by the agent (buffer full while disconnected); each is reported as suppressed",
                )?,
            ),
            registry: r,
        })
    }

    /// Read the datapath and encode everything in the text format.
    pub fn render(&self, enforcer: &Mutex<Enforcer>) -> String {
        if let Ok(mut e) = enforcer.lock() {
            let t = e.tables_mut();
            if let Ok(epoch) = t.epoch() {
                self.applied_epoch.set(i64::from(epoch));
            }
            if let Ok(o) = t.occupancy() {
                for (name, v) in [
                    ("endpoints", o.endpoints),
                    ("addresses", o.addresses),
                    ("ipcache", o.ipcache),
                    ("port_classes", o.port_classes),
                    ("policy", o.policy),
                    ("rules", o.rules),
                ] {
                    self.map_entries.with_label_values(&[name]).set(v as i64);
                }
            }
            self.conntrack.set(t.conntrack_entries() as i64);
            match t.maps().stats() {
                Ok(all) => {
                    for (name, v) in STAT_NAMES.iter().zip(&all) {
                        self.datapath.with_label_values(&[name]).set(*v as i64);
                    }
                    let lost = all[STAT_EVENTS_RATE_LIMITED as usize]
                        + all[STAT_EVENTS_RING_FULL as usize];
                    self.events_not_delivered.set(lost as i64);
                }
                Err(err) => tracing::warn!(%err, "reading datapath counters"),
            }
            let flush = t.maps().flow_flush.last_report();
            self.unflushed_cpus.set(flush.unreached.len() as i64);
            if !flush.unreached.is_empty() {
                tracing::warn!(cpus = ?flush.unreached, problems = ?flush.problems,
                    "flow-cache hits not flushed on some CPUs: their counters lag");
            }
            if let Some(a) = e.current() {
                self.applied_commit_time.set(a.revision.commit_time_unix);
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serve `/metrics` on `addr`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    enforcer: Arc<Mutex<Enforcer>>,
) -> Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (m, e) = (metrics.clone(), enforcer.clone());
            async move {
                tokio::task::spawn_blocking(move || m.render(&e))
                    .await
                    .unwrap_or_default()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    axum::serve(listener, app).await.context("metrics server")
}
