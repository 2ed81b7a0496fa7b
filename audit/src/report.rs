//! `compliance report`: maps every MLPS Level 3 control item the product carries
//! (/work/shared/notes/mlps-l3.md) to live evidence. The controller fills [`Evidence`];
//! integrity, retention, audit coverage, refusals and alerts can be filled from the store
//! itself ([`Evidence::from_store`]). Where an item has no evidence, the report says so.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::export::{for_each_record, is_public, REMOTE_ADMIN_PORTS};
use crate::forward::ForwardStatus;
use crate::record::{format_ts, AlertRecord, Event};
use crate::roles::{Role, RoleAssignments};
use crate::store::{list_segments, MIN_RETENTION_DAYS};
use crate::timesync::ClockStatus;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScopeDefault {
    pub scope: String,
    /// `deny` or `allow` (also `reject`, or `monitor` for a VM whose denies are only recorded).
    pub action: String,
    /// Where it is in force (e.g. compiled into which endpoints, enforced by which hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub vm: String,
    pub host: String,
    pub interface: String,
    pub enforced: bool,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuleStat {
    pub id: String,
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    pub last_hit: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuleAnalysis {
    pub rules: Vec<RuleStat>,
    /// (rule, shadowed by).
    pub shadowed: Vec<(String, String)>,
    /// (rule, duplicate of).
    pub redundant: Vec<(String, String)>,
    pub never_matching: Vec<String>,
    pub never_hit: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostPolicy {
    pub host: String,
    pub commit: String,
    /// Datapath epoch, when known.
    #[serde(default)]
    pub epoch: Option<u32>,
    /// Whether the host's agent is connected now (`None`: not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    pub enforced_at: Option<String>,
    pub in_sync: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IntegrityEvidence {
    pub verified_at: String,
    pub ok: bool,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints_matched: usize,
    pub last_checkpoint: Option<String>,
    pub public_key: String,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RetentionEvidence {
    pub retention_days: u32,
    pub oldest_record: Option<String>,
    pub newest_record: Option<String>,
    pub segments: usize,
    pub compressed_segments: usize,
    pub bytes_on_disk: u64,
}

/// Counts over the audit trail (8.1.3.5 a, d; 8.1.4.3 d).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AuditCoverage {
    pub flow_records: u64,
    pub admin_actions: u64,
    pub refused_admin_actions: u64,
    /// Refused attempts to reconfigure/stop auditing (8.1.4.3 d).
    pub refused_audit_config: u64,
    pub policy_revisions: u64,
    pub internet_flows: u64,
    pub remote_admin_flows: u64,
    pub uncovered_vm_records: u64,
    pub unenforced_interface_records: u64,
    pub events_dropped_accounted: u64,
    /// A sample record showing every mandated field (8.1.3.5 b).
    pub sample_record: Option<serde_json::Value>,
}

/// Everything the report can show. `None` = no evidence supplied.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Evidence {
    pub generated_at: String,
    pub default_deny: Option<Vec<ScopeDefault>>,
    pub enforcement: Option<Vec<InterfaceStatus>>,
    pub rule_analysis: Option<RuleAnalysis>,
    /// Where the rule export with src/dst address, ports, protocol is available.
    pub rule_export: Option<String>,
    /// Stateful tracking evidence (e.g. session-table summary, test run id).
    pub stateful: Option<String>,
    pub integrity: Option<IntegrityEvidence>,
    pub retention: Option<RetentionEvidence>,
    pub coverage: Option<AuditCoverage>,
    pub forwarding: Option<Vec<ForwardStatus>>,
    pub time_sync: Option<Vec<(String, ClockStatus)>>,
    pub roles: Option<RoleAssignments>,
    pub policy_distribution: Option<Vec<HostPolicy>>,
    pub recent_alerts: Option<Vec<AlertRecord>>,
    /// Zones and the rules between them (cloud ABS2-01/02).
    pub zones: Option<Vec<String>>,
    /// Live-migration evidence (cloud CES2-02/03).
    pub migration: Option<String>,
}

impl Evidence {
    /// Fill integrity, retention, coverage and recent alerts from a store.
    pub fn from_store(dir: &Path, retention_days: u32, max_alerts: usize) -> Result<Evidence> {
        let mut ev = Evidence {
            generated_at: format_ts(time::OffsetDateTime::now_utc()),
            ..Default::default()
        };
        let v = crate::verify::verify(dir, None)?;
        ev.integrity = Some(IntegrityEvidence {
            verified_at: ev.generated_at.clone(),
            ok: v.ok(),
            records: v.records,
            first_seq: v.first_seq,
            last_seq: v.last_seq,
            checkpoints_matched: v.checkpoints_matched,
            last_checkpoint: v
                .last_checkpoint
                .as_ref()
                .map(|c| format!("seq {} at {}", c.seq, c.ts)),
            public_key: v.public_key.clone(),
            problems: v.problems.iter().map(|p| p.to_string()).collect(),
        });
        let segs = list_segments(dir)?;
        let mut ret = RetentionEvidence {
            retention_days,
            segments: segs.len(),
            compressed_segments: segs.iter().filter(|s| s.compressed).count(),
            bytes_on_disk: segs
                .iter()
                .filter_map(|s| std::fs::metadata(&s.path).ok())
                .map(|m| m.len())
                .sum(),
            ..Default::default()
        };
        let mut cov = AuditCoverage::default();
        let mut alerts: Vec<AlertRecord> = Vec::new();
        let (mut moves, mut last_move) = (0u64, None);
        for_each_record(dir, 0, |r, _| {
            if ret.oldest_record.is_none() {
                ret.oldest_record = Some(r.ts.clone());
            }
            ret.newest_record = Some(r.ts.clone());
            match &r.detail {
                Event::FlowVerdict(f) => {
                    cov.flow_records += 1;
                    if is_public(&f.src_ip) || is_public(&f.dst_ip) {
                        cov.internet_flows += 1;
                    }
                    if REMOTE_ADMIN_PORTS.contains(&f.dst_port) {
                        cov.remote_admin_flows += 1;
                    }
                }
                Event::AdminAction {
                    success, operation, ..
                } => {
                    cov.admin_actions += 1;
                    if !success {
                        cov.refused_admin_actions += 1;
                        if operation == "audit_configure" {
                            cov.refused_audit_config += 1;
                        }
                    }
                    if cov.sample_record.is_none() {
                        cov.sample_record = serde_json::to_value(r).ok();
                    }
                }
                Event::PolicyRevision { .. } => cov.policy_revisions += 1,
                Event::VmUncovered { .. } => cov.uncovered_vm_records += 1,
                Event::InterfaceUnenforced { .. } => cov.unenforced_interface_records += 1,
                Event::VmMoved {
                    vm,
                    from,
                    to,
                    commit,
                } => {
                    moves += 1;
                    last_move = Some(format!(
                        "latest: {vm} from {from} to {to} at {} (record {}), its policy compiled for {to} from revision {}",
                        r.ts,
                        r.seq,
                        commit.get(..12).unwrap_or(commit)
                    ));
                }
                Event::EventsDropped { count, .. } => cov.events_dropped_accounted += count,
                Event::Alert(a) => {
                    alerts.push(a.clone());
                    if alerts.len() > max_alerts {
                        alerts.remove(0);
                    }
                }
                _ => {}
            }
            Ok(true)
        })?;
        ev.retention = Some(ret);
        if let Some(last) = last_move {
            ev.migration = Some(format!(
                "{moves} VM move(s) between hosts recorded; policy follows the VM's identity and labels, never a host — {last}"
            ));
        }
        // This host's clock; the controller replaces it with every host's state.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "local".into());
        ev.time_sync = Some(vec![(host, crate::timesync::clock_status())]);
        // Forwarders publish their status next to the store.
        let fwd = crate::forward::read_statuses(dir);
        if !fwd.is_empty() {
            ev.forwarding = Some(fwd);
        }
        ev.coverage = Some(cov);
        ev.recent_alerts = Some(alerts);
        Ok(ev)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Met,
    Partial,
    NotMet,
    NoEvidence,
    OutOfScope,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Met => "MET",
            Status::Partial => "PARTIAL",
            Status::NotMet => "NOT MET",
            Status::NoEvidence => "NO EVIDENCE",
            Status::OutOfScope => "OUT OF SCOPE",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Item {
    pub control: String,
    pub unit: String,
    pub title: String,
    pub requirement: String,
    pub status: Status,
    pub evidence: Vec<String>,
    pub gaps: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub title: String,
    pub generated_at: String,
    pub items: Vec<Item>,
    pub summary: Vec<(Status, usize)>,
    pub evidence: Evidence,
}

const NONE: &str = "No evidence supplied for this item.";

fn item(control: &str, unit: &str, title: &str, req: &str) -> Item {
    Item {
        control: control.into(),
        unit: unit.into(),
        title: title.into(),
        requirement: req.into(),
        status: Status::NoEvidence,
        evidence: Vec::new(),
        gaps: Vec::new(),
    }
}

fn no_evidence(mut i: Item, what: &str) -> Item {
    i.status = Status::NoEvidence;
    i.gaps.push(format!("{NONE} Needed: {what}."));
    i
}

/// Build the report.
pub fn build(ev: &Evidence) -> Report {
    let mut items = Vec::new();

    // 8.1.3.1 a boundary protection.
    let mut i = item("8.1.3.1 a", "L3-ABS1-01", "Boundary protection",
        "Every vNIC of every VM is enforced in the hypervisor datapath; no unenforced vNIC goes unnoticed.");
    i = match &ev.enforcement {
        None => no_evidence(i, "per-vNIC enforcement status from the agents"),
        Some(ifs) => {
            let bad: Vec<&InterfaceStatus> = ifs.iter().filter(|x| !x.enforced).collect();
            i.evidence.push(format!(
                "{} of {} VM interfaces enforced",
                ifs.len() - bad.len(),
                ifs.len()
            ));
            for b in &bad {
                i.gaps.push(format!(
                    "NOT ENFORCED: {} {} on {} ({})",
                    b.vm,
                    b.interface,
                    b.host,
                    b.reason.as_deref().unwrap_or("no reason given")
                ));
            }
            if let Some(c) = &ev.coverage {
                i.evidence.push(format!(
                    "{} interface_unenforced and {} vm_uncovered alert records in the audit trail",
                    c.unenforced_interface_records, c.uncovered_vm_records
                ));
            }
            i.status = if ifs.is_empty() {
                Status::NoEvidence
            } else if bad.is_empty() {
                Status::Met
            } else {
                Status::NotMet
            };
            i
        }
    };
    items.push(i);

    // 8.1.3.2 a default deny.
    let mut i = item(
        "8.1.3.2 a",
        "L3-ABS1-05",
        "Access control: default deny",
        "Rules between zones; default deny except allowed traffic.",
    );
    i = match &ev.default_deny {
        None => no_evidence(i, "the default action of every scope from the controller"),
        Some(scopes) => {
            for s in scopes {
                i.evidence.push(format!(
                    "scope {}: default {}{}",
                    s.scope,
                    s.action,
                    s.detail
                        .as_ref()
                        .map(|d| format!(" — {d}"))
                        .unwrap_or_default()
                ));
                if s.action != "deny" && s.action != "reject" {
                    i.gaps
                        .push(format!("scope {} defaults to {}", s.scope, s.action));
                }
            }
            i.status = if scopes.is_empty() {
                Status::NoEvidence
            } else if i.gaps.is_empty() {
                Status::Met
            } else {
                Status::NotMet
            };
            i
        }
    };
    items.push(i);

    // 8.1.3.2 b redundant rules.
    let mut i = item(
        "8.1.3.2 b",
        "L3-ABS1-06",
        "Redundant / ineffective rules",
        "Find shadowed, duplicate, never-matching and never-hit rules; per-rule hit counters.",
    );
    i = match &ev.rule_analysis {
        None => no_evidence(
            i,
            "rule analysis and per-rule counters from the policy compiler and agents",
        ),
        Some(ra) => {
            i.evidence
                .push(format!("{} rules with hit counters", ra.rules.len()));
            for r in ra.rules.iter().take(50) {
                i.evidence.push(format!(
                    "rule {} {}: {} packets, {} bytes, last hit {}",
                    r.id,
                    r.name,
                    r.packets,
                    r.bytes,
                    r.last_hit.as_deref().unwrap_or("never")
                ));
            }
            for (r, by) in &ra.shadowed {
                i.gaps.push(format!("rule {r} is shadowed by {by}"));
            }
            for (r, by) in &ra.redundant {
                i.gaps.push(format!("rule {r} duplicates {by}"));
            }
            for r in &ra.never_matching {
                i.gaps.push(format!("rule {r} can never match"));
            }
            for r in &ra.never_hit {
                i.gaps.push(format!("rule {r} was never hit"));
            }
            // Finding redundant rules is the requirement; listing them is the evidence.
            i.status = if i.gaps.is_empty() {
                Status::Met
            } else {
                Status::Partial
            };
            i
        }
    };
    items.push(i);

    let mut i = item(
        "8.1.3.2 c",
        "L3-ABS1-07",
        "5-tuple matching",
        "Check source/destination address, ports and protocol; rule export with those columns.",
    );
    i = match &ev.rule_export {
        None => no_evidence(i, "a rule export (CSV/JSON) with 5-tuple columns"),
        Some(p) => {
            i.evidence.push(format!("rule export: {p}"));
            i.status = Status::Met;
            i
        }
    };
    items.push(i);

    let mut i = item(
        "8.1.3.2 d",
        "L3-ABS1-08",
        "Session state",
        "Stateful connection tracking; unsolicited packets dropped.",
    );
    i = match &ev.stateful {
        None => no_evidence(i, "session table view or stateful test evidence"),
        Some(s) => {
            i.evidence.push(s.clone());
            i.status = Status::Met;
            i
        }
    };
    items.push(i);

    let mut i = item(
        "8.1.3.2 e",
        "L3-ABS1-09",
        "Application protocol / content control",
        "L3/L4 product: out of scope, or integrate an application-layer control.",
    );
    i.status = Status::OutOfScope;
    i.evidence.push("Bulkhead is an L3/L4 distributed firewall; application-content control is out of scope (documented).".into());
    items.push(i);

    // 8.1.3.3 intrusion prevention + cloud ABS2-03..06.
    for (control, unit, title) in [
        (
            "8.1.3.3 a–d",
            "L3-ABS1-10..13",
            "Intrusion prevention: detect, record (source, type, target, time), alarm",
        ),
        (
            "cloud ABS2-03..06",
            "L3-ABS2-03..06",
            "Abnormal VM↔VM / VM↔host traffic detection and alarm",
        ),
    ] {
        let mut i = item(control, unit, title,
            "East-west detection from the datapath (scans = bursts of denied flows, spoofed source addresses); alert records; alarm forwarding.");
        match &ev.recent_alerts {
            None => i = no_evidence(i, "alert records"),
            Some(a) => {
                i.evidence.push(format!(
                    "{} recent alert records (source, attack type, target, time)",
                    a.len()
                ));
                for x in a.iter().rev().take(20) {
                    i.evidence.push(format!(
                        "{} {} from {} ({}) → {} ×{} on {}",
                        x.last_seen,
                        x.attack,
                        x.source_ip,
                        x.source_vm.as_deref().unwrap_or("-"),
                        x.target,
                        x.count,
                        x.host
                    ));
                }
                let fwd = ev.forwarding.as_ref().is_some_and(|f| !f.is_empty());
                if fwd {
                    i.evidence
                        .push("alarms are forwarded to the SIEM (see 8.1.3.5 c)".into());
                } else {
                    i.gaps.push(
                        "no SIEM forwarding configured: alarms stay on the controller".into(),
                    );
                }
                i.status = if fwd { Status::Met } else { Status::Partial };
                if a.is_empty() {
                    i.evidence
                        .push("detection active; no attack detected in the retained period".into());
                }
            }
        }
        items.push(i);
    }

    // 8.1.3.5 a security audit.
    let mut i = item("8.1.3.5 a", "L3-ABS1-16", "Security audit at boundaries, every user",
        "Flow verdict log per VM and a log of every administrator action; searchable and exportable.");
    i = match &ev.coverage {
        None => no_evidence(i, "audit trail statistics"),
        Some(c) => {
            i.evidence.push(format!(
                "{} flow verdict records, {} administrator action records, {} policy revisions",
                c.flow_records, c.admin_actions, c.policy_revisions
            ));
            i.evidence.push("export: `bulkhead audit export --format csv|jsonl --from --to --type --vm --host --rule`".into());
            if c.events_dropped_accounted > 0 {
                i.evidence.push(format!("{} flow events not stored individually, each counted in an events_dropped record", c.events_dropped_accounted));
            }
            i.status = if c.flow_records > 0 && c.admin_actions > 0 {
                Status::Met
            } else {
                Status::Partial
            };
            if c.flow_records == 0 {
                i.gaps.push("no flow verdict records yet".into());
            }
            if c.admin_actions == 0 {
                i.gaps.push("no administrator action records yet".into());
            }
            i
        }
    };
    items.push(i);

    let mut i = item(
        "8.1.3.5 b",
        "L3-ABS1-17",
        "Audit record content",
        "Date/time, user, event type, success or failure, other relevant information.",
    );
    match ev.coverage.as_ref().and_then(|c| c.sample_record.as_ref()) {
        None => i = no_evidence(i, "a sample administrator record"),
        Some(s) => {
            i.evidence.push("every record has ts (UTC with offset), subject, type, outcome, host, clock-sync state, detail (subject id, object id, before/after); sample:".into());
            i.evidence.push(s.to_string());
            i.status = Status::Met;
        }
    }
    items.push(i);

    let mut i = item(
        "8.1.3.5 c",
        "L3-ABS1-18",
        "Audit record protection and backup",
        "Append-only, tamper-evident store; no delete for any role; forwarding/backup off-box.",
    );
    match &ev.integrity {
        None => i = no_evidence(i, "integrity verification result"),
        Some(g) => {
            i.evidence.push(format!("verified {}: {} records (seq {}..={}), {} signed checkpoints matched, last checkpoint {}, key {}",
                g.verified_at, g.records, g.first_seq.map(|x| x.to_string()).unwrap_or_default(),
                g.last_seq.map(|x| x.to_string()).unwrap_or_default(), g.checkpoints_matched,
                g.last_checkpoint.as_deref().unwrap_or("none"), g.public_key));
            i.evidence.push("no delete operation exists for any role; segments are removed only by the retention job, each removal recorded".into());
            for p in &g.problems {
                i.gaps.push(format!("INTEGRITY: {p}"));
            }
            let fwd = ev.forwarding.as_ref().filter(|f| !f.is_empty());
            match fwd {
                Some(f) => {
                    for s in f {
                        i.evidence.push(format!(
                            "forwarding {} → {} over {} ({}), confirmed up to seq {}{}{}",
                            s.name,
                            s.addr,
                            s.transport,
                            s.payload,
                            s.confirmed,
                            s.updated_at
                                .as_ref()
                                .map(|t| format!(" (status of {t})"))
                                .unwrap_or_default(),
                            s.last_error
                                .as_ref()
                                .map(|e| format!(", last error: {e}"))
                                .unwrap_or_default()
                        ));
                    }
                }
                None => i
                    .gaps
                    .push("no off-box forwarding/backup configured".into()),
            }
            i.status = if !g.ok {
                Status::NotMet
            } else if fwd.is_some() {
                Status::Met
            } else {
                Status::Partial
            };
        }
    }
    items.push(i);

    let mut i = item(
        "8.1.3.5 d",
        "L3-ABS1-19",
        "Remote-access and internet-access behaviour",
        "Reports filtered to internet-bound flows and remote-admin flows (SSH/RDP).",
    );
    match &ev.coverage {
        None => i = no_evidence(i, "audit trail statistics"),
        Some(c) => {
            i.evidence.push(format!(
                "{} internet-bound flow records: `bulkhead audit export --internet`",
                c.internet_flows
            ));
            i.evidence.push(format!("{} remote-administration flow records (ports 22, 3389, 5900, 5985/6): `bulkhead audit export --remote-admin`", c.remote_admin_flows));
            i.status = Status::Met;
        }
    }
    items.push(i);

    let mut i = item(
        "8.1.4.3 d",
        "L3-CES1-15",
        "Audit process protected from interruption",
        "Only the audit administrator can stop or reconfigure auditing; every attempt is audited.",
    );
    match &ev.coverage {
        None => i = no_evidence(i, "refused attempts in the audit log"),
        Some(c) => {
            i.evidence.push("auditing has no stop switch; its one setting (retention, `bulkhead compliance retention`) is operation audit_configure, audit-admin only; every attempt is an admin_action record (refusals with outcome failure, changes with before and after)".into());
            i.evidence.push(format!("{} refused audit-configuration attempts, {} refused administrator actions in total", c.refused_audit_config, c.refused_admin_actions));
            i.status = if c.refused_audit_config > 0 {
                Status::Met
            } else {
                Status::Partial
            };
            if c.refused_audit_config == 0 {
                i.gaps.push("no refused attempt on record yet to show the assessor (try `bulkhead compliance retention --days 200` as a system or security administrator)".into());
            }
        }
    }
    items.push(i);

    let mut i = item("8.1.5.1–8.1.5.3, 8.1.4.2 d", "L3-CES1-08, L3-SMC1-01..06", "Role separation",
        "System, audit and security administrators; least privilege; one account cannot combine roles; admin actions audited.");
    match &ev.roles {
        None => i = no_evidence(i, "role assignment export"),
        Some(r) => {
            for role in Role::ALL {
                let users: Vec<&str> = r
                    .accounts
                    .iter()
                    .filter(|(_, x)| **x == role)
                    .map(|(u, _)| u.as_str())
                    .collect();
                i.evidence.push(format!(
                    "{role}: {}",
                    if users.is_empty() {
                        "(none)".to_string()
                    } else {
                        users.join(", ")
                    }
                ));
                if users.is_empty() {
                    i.gaps.push(format!("no account holds {role}"));
                }
            }
            i.evidence
                .push("an identity carrying two roles is refused (and the refusal audited)".into());
            i.status = if r.separated() {
                Status::Met
            } else {
                Status::Partial
            };
        }
    }
    items.push(i);

    let mut i = item("8.1.5.4", "L3-SMC1-07..12", "Centralised control",
        "Collect audit data centrally; retention meets the law (≥ 6 months); central policy management.");
    let mut have = false;
    if let Some(r) = &ev.retention {
        have = true;
        i.evidence.push(format!("retention {} days (legal floor {MIN_RETENTION_DAYS}); oldest record {}, newest {}; {} segments ({} compressed), {} bytes",
            r.retention_days, r.oldest_record.as_deref().unwrap_or("-"), r.newest_record.as_deref().unwrap_or("-"), r.segments, r.compressed_segments, r.bytes_on_disk));
        if r.retention_days < MIN_RETENTION_DAYS {
            i.gaps.push("retention below 184 days".into());
        }
    } else {
        i.gaps.push(format!("{NONE} Needed: retention setting."));
    }
    match &ev.policy_distribution {
        Some(p) => {
            have = true;
            for h in p {
                i.evidence.push(format!(
                    "host {}: revision {}{} enforced since {}{}{}",
                    h.host,
                    h.commit,
                    h.epoch.map(|e| format!(" (epoch {e})")).unwrap_or_default(),
                    h.enforced_at.as_deref().unwrap_or("-"),
                    if h.in_sync { "" } else { " — OUT OF SYNC" },
                    if h.connected == Some(false) {
                        " (agent not connected now)"
                    } else {
                        ""
                    }
                ));
                if !h.in_sync {
                    i.gaps.push(format!(
                        "host {} does not enforce the current revision",
                        h.host
                    ));
                }
            }
        }
        None => i.gaps.push(format!(
            "{NONE} Needed: policy distribution status per host."
        )),
    }
    if ev.forwarding.as_ref().is_none_or(|f| f.is_empty()) {
        i.gaps.push("no central/SIEM forwarding configured".into());
    }
    i.status = if !have {
        Status::NoEvidence
    } else if i.gaps.is_empty() {
        Status::Met
    } else {
        Status::Partial
    };
    items.push(i);

    let mut i = item(
        "cloud ABS2-01/02",
        "L3-ABS2-01/02",
        "Access control at virtual network boundaries and between zones",
        "Policy between VM groups/zones; ruleset per zone.",
    );
    i = match &ev.zones {
        None => no_evidence(i, "ruleset per zone from the controller"),
        Some(z) => {
            i.evidence.extend(z.iter().cloned());
            i.status = if z.is_empty() {
                Status::NoEvidence
            } else {
                Status::Met
            };
            i
        }
    };
    items.push(i);

    let mut i = item("cloud CES2-02/03", "L3-CES2-02/03", "Policy migrates with the VM",
        "Policy bound to VM identity/labels, never to a host; same verdicts before and after a live migration.");
    i = match &ev.migration {
        None => no_evidence(i, "live-migration evidence (verdicts before/after a move)"),
        Some(m) => {
            i.evidence.push(m.clone());
            i.status = Status::Met;
            i
        }
    };
    items.push(i);

    let mut i = item(
        "cloud intrusion (L3)",
        "L3-CES2",
        "Unauthorised new or re-enabled VMs",
        "Alert when a VM appears that no policy covers or that is unknown to the inventory.",
    );
    match &ev.coverage {
        None => i = no_evidence(i, "vm_uncovered alert records"),
        Some(c) => {
            i.evidence.push(format!(
                "{} vm_uncovered records in the audit trail",
                c.uncovered_vm_records
            ));
            i.status = Status::Met;
        }
    }
    items.push(i);

    let mut i = item(
        "time (no clause)",
        "—",
        "Clock synchronisation",
        "Timestamps are mandatory; show time-sync state and alarm on offset.",
    );
    match &ev.time_sync {
        None => i = no_evidence(i, "clock-sync state per host"),
        Some(t) => {
            for (host, c) in t {
                i.evidence.push(format!(
                    "{host}: {} (offset {} µs, max error {} µs, via {})",
                    if c.synced {
                        "synchronised"
                    } else {
                        "NOT synchronised"
                    },
                    c.offset_us,
                    c.max_error_us,
                    c.source
                ));
                if !c.synced {
                    i.gaps.push(format!(
                        "{host}: {}",
                        c.problem.as_deref().unwrap_or("clock not synchronised")
                    ));
                }
            }
            i.evidence.push(
                "every audit record carries the recorder's clock state (synced/unsynced/unknown)"
                    .into(),
            );
            i.status = if t.is_empty() {
                Status::NoEvidence
            } else if i.gaps.is_empty() {
                Status::Met
            } else {
                Status::NotMet
            };
        }
    }
    items.push(i);

    let mut summary = Vec::new();
    for s in [
        Status::Met,
        Status::Partial,
        Status::NotMet,
        Status::NoEvidence,
        Status::OutOfScope,
    ] {
        summary.push((s, items.iter().filter(|i| i.status == s).count()));
    }
    Report {
        title: "Bulkhead — MLPS 2.0 Level 3 (GB/T 22239-2019) compliance evidence".into(),
        generated_at: if ev.generated_at.is_empty() {
            format_ts(time::OffsetDateTime::now_utc())
        } else {
            ev.generated_at.clone()
        },
        items,
        summary,
        evidence: ev.clone(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Self-contained HTML rendering.
pub fn html(r: &Report) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>");
    h.push_str(&esc(&r.title));
    h.push_str("</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;width:100%}td,th{border:1px solid #999;padding:6px;vertical-align:top}th{background:#eee}.met{background:#cfc}.partial{background:#ffc}.not_met{background:#fcc}.no_evidence{background:#ddd}.out_of_scope{background:#eef}code{font-size:85%;word-break:break-all}</style></head><body>");
    h.push_str(&format!(
        "<h1>{}</h1><p>Generated {}</p><p>",
        esc(&r.title),
        esc(&r.generated_at)
    ));
    for (s, n) in &r.summary {
        h.push_str(&format!("{}: {n} &nbsp; ", s.label()));
    }
    h.push_str("</p><table><tr><th>Control</th><th>Unit</th><th>Requirement</th><th>Status</th><th>Evidence</th><th>Gaps</th></tr>");
    for i in &r.items {
        let class = serde_json::to_value(i.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        h.push_str(&format!(
            "<tr><td><b>{}</b><br>{}</td><td>{}</td><td>{}</td><td class=\"{class}\"><b>{}</b></td><td><ul>{}</ul></td><td><ul>{}</ul></td></tr>",
            esc(&i.control), esc(&i.title), esc(&i.unit), esc(&i.requirement), i.status.label(),
            i.evidence.iter().map(|e| format!("<li><code>{}</code></li>", esc(e))).collect::<String>(),
            i.gaps.iter().map(|e| format!("<li>{}</li>", esc(e))).collect::<String>(),
        ));
    }
    h.push_str("</table></body></html>\n");
    h
}
