//! Prometheus metrics of the controller.
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::Controller;

pub struct Metrics {
    pub registry: Registry,
    pub compile_seconds: Histogram,
    pub commit_to_enforced_seconds: Histogram,
    pub rejected_commits: IntCounter,
    pub sessions: IntCounter,
    pub snapshots: IntCounter,
    pub deltas: IntCounter,
    pub flow_records: IntCounter,
    pub events_suppressed: IntCounter,
    pub serving_commit_time: IntGauge,
    hosts: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique: registration cannot fail.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let r = Registry::new_custom(Some("bulkhead_controller".into()), None)?;
        let latency = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];
        Ok(Self {
            compile_seconds: reg(
                &r,
                Histogram::with_opts(HistogramOpts::new("compile_seconds", "Policy compile time"))?,
            ),
            commit_to_enforced_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "commit_to_enforced_seconds",
                        "From a commit being seen to a host acknowledging its tables",
                    )
                    .buckets(latency),
                )?,
            ),
            rejected_commits: reg(
                &r,
                IntCounter::new("rejected_commits_total", "Commits that did not compile")?,
            ),
            sessions: reg(
                &r,
                IntCounter::new("agent_sessions_total", "Agent sessions opened")?,
            ),
            snapshots: reg(
                &r,
                IntCounter::new("snapshots_sent_total", "Full snapshots sent")?,
            ),
            deltas: reg(&r, IntCounter::new("deltas_sent_total", "Deltas sent")?),
            flow_records: reg(
                &r,
                IntCounter::new("flow_records_total", "Flow records received from agents")?,
            ),
            events_suppressed: reg(
                &r,
                IntCounter::new(
                    "flow_events_suppressed_total",
                    "Flow events agents report as not delivered",
                )?,
            ),
            serving_commit_time: reg(
                &r,
                IntGauge::new(
                    "serving_commit_timestamp_seconds",
                    "Commit time of the revision being served",
                )?,
            ),
            hosts: reg(
                &r,
                IntGaugeVec::new(Opts::new("hosts", "Hosts by state"), &["state"])?,
            ),
            registry: r,
        })
    }

    pub fn render(&self, ctl: &Controller) -> String {
        let status = ctl.status();
        let connected = status.hosts.iter().filter(|h| h.connected).count();
        let in_sync = status
            .hosts
            .iter()
            .filter(|h| !h.desired_digest.is_empty() && h.desired_digest == h.enforced_digest)
            .count();
        self.hosts
            .with_label_values(&["known"])
            .set(status.hosts.len() as i64);
        self.hosts
            .with_label_values(&["connected"])
            .set(connected as i64);
        self.hosts
            .with_label_values(&["in_sync"])
            .set(in_sync as i64);
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serve `/metrics` on `addr`.
pub async fn serve(addr: SocketAddr, ctl: Arc<Controller>) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let ctl = ctl.clone();
            async move { ctl.metrics.render(&ctl) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    axum::serve(listener, app).await.context("metrics server")
}
