//! What the controller writes into the audit trail (MLPS 8.1.3.3 / 8.1.4.3): policy revisions
//! and their compile results, when each host began enforcing, agent connections and identity
//! failures, administrator actions (refusals included), flow verdicts and dropped-event counts
//! from the agents.
use std::path::Path;

use anyhow::Context;

use bulkhead_audit::record::{CompileResult, Event, FlowRecord};
use bulkhead_audit::recorder::Recorder;
use bulkhead_audit::roles::CertIdentity;
use bulkhead_audit::{Store, StoreConfig};
use bulkhead_wire::pb;

pub struct Audit {
    recorder: Recorder,
    dir: std::path::PathBuf,
    names: std::sync::RwLock<FlowNames>,
    retention_days: std::sync::atomic::AtomicU32,
}

/// The audit administrator's settings, kept next to the store so that they outlive a restart
/// (they override `--retention-days`).
const SETTINGS_FILE: &str = "settings.json";

/// What flow records are named with beyond what the agent sends: the tier and policy of each
/// rule id of the served revision, and the VM owning each address of the live inventory.
#[derive(Clone, Debug, Default)]
pub struct FlowNames {
    /// Rule id → (tier, policy).
    pub rules: std::collections::HashMap<String, (String, String)>,
    pub vm_of_ip: std::collections::HashMap<std::net::IpAddr, String>,
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Flow times as every record's `ts`: UTC, explicit `+00:00`, microseconds.
fn ts_nanos(ns: i64) -> String {
    bulkhead_audit::record::format_ts(
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

pub fn cert_identity(der: &[u8]) -> CertIdentity {
    let n = bulkhead_wire::pki::cert_names(der).unwrap_or_default();
    CertIdentity {
        common_name: n.common_name,
        organizational_units: n.organizational_units,
        san_uris: n.san_uris,
    }
}

impl Audit {
    pub fn open(dir: &Path, host: &str) -> anyhow::Result<Self> {
        Self::open_with(dir, host, bulkhead_audit::store::MIN_RETENTION_DAYS)
    }

    /// Open with a retention period (at least 184 days: the store refuses less).
    pub fn open_with(dir: &Path, host: &str, retention_days: u32) -> anyhow::Result<Self> {
        let settings = dir.join(SETTINGS_FILE);
        let retention_days = match std::fs::read(&settings) {
            Ok(b) => {
                let v: serde_json::Value = serde_json::from_slice(&b)
                    .with_context(|| format!("reading {}", settings.display()))?;
                let days = v["retention_days"]
                    .as_u64()
                    .and_then(|d| u32::try_from(d).ok())
                    .with_context(|| format!("{}: no retention_days", settings.display()))?;
                tracing::info!(path = %settings.display(), days, "retention set by the audit administrator");
                days
            }
            Err(_) => retention_days,
        };
        let mut cfg = StoreConfig::new(dir, host);
        cfg.retention_days = retention_days;
        let (store, report) = Store::open(cfg)
            .map_err(|e| anyhow::anyhow!("opening the audit store {}: {e}", dir.display()))?;
        tracing::info!(dir = %dir.display(), retention_days, ?report, "audit trail open");
        Ok(Self {
            recorder: Recorder::spawn(store, 4096, 1024),
            dir: dir.to_path_buf(),
            names: std::sync::RwLock::new(FlowNames::default()),
            retention_days: std::sync::atomic::AtomicU32::new(retention_days),
        })
    }

    /// The retention period the store enforces now.
    pub fn retention_days(&self) -> u32 {
        self.retention_days
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Change the retention period (refused below 184 days); kept across restarts. Returns
    /// the previous period.
    pub fn set_retention_days(&self, days: u32) -> anyhow::Result<u32> {
        let before = self
            .recorder
            .set_retention_days(days)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let path = self.dir.join(SETTINGS_FILE);
        let tmp = self.dir.join(format!("{SETTINGS_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::json!({ "retention_days": days }).to_string(),
        )
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
        self.retention_days
            .store(days, std::sync::atomic::Ordering::Relaxed);
        Ok(before)
    }

    /// Run the retention job now (in the writer; each removal is recorded first).
    pub fn enforce_retention(&self) -> anyhow::Result<Vec<String>> {
        self.recorder
            .enforce_retention()
            .map_err(|e| anyhow::anyhow!("audit retention in {}: {e}", self.dir.display()))
    }

    /// Integrity, retention, coverage and recent alerts from the store, read while the
    /// writer is paused (so the live verify sees no half-written tail).
    pub fn store_evidence(
        &self,
        retention_days: u32,
        max_alerts: usize,
    ) -> anyhow::Result<bulkhead_audit::report::Evidence> {
        let _paused = self
            .recorder
            .pause()
            .map_err(|e| anyhow::anyhow!("pausing the audit writer: {e}"))?;
        bulkhead_audit::report::Evidence::from_store(&self.dir, retention_days, max_alerts)
            .map_err(|e| anyhow::anyhow!("reading the audit store {}: {e}", self.dir.display()))
    }

    /// Security alerts an agent derived from its datapath; the host is its certificate's.
    pub fn alerts(&self, host: &str, alerts: &[pb::Alert]) {
        if alerts.is_empty() {
            return;
        }
        self.submit(
            alerts
                .iter()
                .map(|a| {
                    Event::Alert(bulkhead_audit::record::AlertRecord {
                        attack: a.attack.clone(),
                        source_ip: a.source_ip.clone(),
                        source_vm: (!a.source_vm.is_empty()).then(|| a.source_vm.clone()),
                        target: a.target.clone(),
                        host: host.to_string(),
                        first_seen: a.first_seen.clone(),
                        last_seen: a.last_seen.clone(),
                        count: a.count,
                        detail: a.detail.clone(),
                    })
                })
                .collect(),
        );
    }

    /// Durable before return (administrator actions, revisions, enforcement).
    pub fn record(&self, ev: Event) {
        if let Err(e) = self.recorder.record(ev) {
            tracing::error!(error = %e, "audit record not written");
        }
    }

    /// Never blocks; overflow is counted and itself recorded.
    pub fn submit(&self, evs: Vec<Event>) {
        if let Err(e) = self.recorder.submit_batch(evs) {
            tracing::error!(error = %e, "audit records not queued");
        }
    }

    pub fn revision(
        &self,
        rev: &pb::Revision,
        added: Vec<String>,
        removed: Vec<String>,
        result: Result<(), String>,
    ) {
        self.revision_changes(rev, added, removed, Vec::new(), result);
    }

    /// A policy revision with the rules added, removed and changed (by id).
    pub fn revision_changes(
        &self,
        rev: &pb::Revision,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        result: Result<(), String>,
    ) {
        self.record(Event::PolicyRevision {
            commit: rev.commit.clone(),
            author: rev.author.clone(),
            committer: rev.committer.clone(),
            committed_at: rfc3339(rev.commit_time_unix),
            rules_added: added,
            rules_removed: removed,
            rules_changed: changed,
            compile: CompileResult {
                ok: result.is_ok(),
                message: result.err().unwrap_or_default(),
            },
        });
    }

    /// Replace the names flow records are completed with (after every served change).
    pub fn set_flow_names(&self, names: FlowNames) {
        if let Ok(mut n) = self.names.write() {
            *n = names;
        }
    }

    /// Flow records from an agent, with the count of events it could not deliver.
    pub fn flows(&self, host: &str, ev: &pb::FlowEvents) {
        let ip = |b: &[u8]| -> Option<std::net::IpAddr> {
            match b.len() {
                4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
                16 => {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(b);
                    Some(std::net::Ipv6Addr::from(o).into())
                }
                _ => None,
            }
        };
        let addr = |b: &[u8]| ip(b).map(|a| a.to_string()).unwrap_or_default();
        let names = self.names.read().ok();
        let vm_of = |b: &[u8]| {
            let a = ip(b)?;
            names.as_ref()?.vm_of_ip.get(&a).cloned()
        };
        let rule_of = |id: &str| names.as_ref()?.rules.get(id).cloned();
        let mut out: Vec<Event> = ev
            .records
            .iter()
            .map(|r| {
                let (tier, policy) = rule_of(&r.rule).unzip();
                Event::FlowVerdict(FlowRecord {
                    verdict: bulkhead_audit::flow::verdict_name(r.kind as u8).into(),
                    reason: bulkhead_audit::flow::reason_name(r.reason as u8).into(),
                    direction: bulkhead_audit::flow::direction_name(r.direction as u8).into(),
                    proto: r.proto as u8,
                    src_ip: addr(&r.src),
                    dst_ip: addr(&r.dst),
                    src_port: r.sport as u16,
                    dst_port: r.dport as u16,
                    vm: r.vm.clone(),
                    src_vm: vm_of(&r.src),
                    dst_vm: vm_of(&r.dst),
                    ifindex: 0,
                    host: host.to_string(),
                    tier,
                    policy,
                    rule: 0,
                    rule_name: (!r.rule.is_empty()).then(|| r.rule.clone()),
                    epoch: 0,
                    packets: r.packets,
                    bytes: r.bytes,
                    first_seen: ts_nanos(r.first_seen_unix_nanos),
                    last_seen: ts_nanos(r.last_seen_unix_nanos),
                    suppressed: 0,
                })
            })
            .collect();
        drop(names);
        if ev.suppressed > 0 {
            out.push(Event::EventsDropped {
                source: format!("datapath on {host}"),
                count: ev.suppressed,
                reason: "per-endpoint rate limit or full ring buffer (counted in the kernel)"
                    .into(),
            });
        }
        self.submit(out);
    }
}
