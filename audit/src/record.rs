//! Audit record types.
//!
//! Every record carries the MLPS 8.1.3.5 b fields at top level — date/time (UTC with an explicit
//! `+00:00` offset), subject (user / agent / VM), event type, outcome — plus the recorder host and
//! the clock-sync state at the time of recording; the event-specific details follow in `detail`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::roles::Role;

/// Format a UTC timestamp as RFC 3339 with an explicit `+00:00` offset and microseconds.
pub fn format_ts(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]+00:00"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000000+00:00"))
}

/// Parse an RFC 3339 timestamp (any offset).
pub fn parse_ts(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Success or failure of the audited action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    /// Observations (flow verdicts, alerts) that are neither.
    Observed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Observed => "observed",
        }
    }
}

/// Clock synchronisation state at the time a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockState {
    Synced,
    Unsynced,
    Unknown,
}

/// One stored record (what a line of a segment decodes to).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Time of recording, RFC 3339, UTC with offset.
    pub ts: String,
    /// Recorder host.
    pub host: String,
    pub clock: ClockState,
    /// Event type (mirrors `detail.kind`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Who or what: user, agent, VM.
    pub subject: String,
    pub outcome: Outcome,
    pub detail: Event,
}

impl Record {
    pub fn time(&self) -> Option<OffsetDateTime> {
        parse_ts(&self.ts)
    }
}

/// Result of compiling a policy revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompileResult {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
}

/// One aggregated flow verdict (see [`crate::flow::FlowAggregator`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// `deny`, `monitor` (would-deny), `allow_log`, `reject`, `spoof`, `revoked`, `bootstrap`.
    pub verdict: String,
    /// `policy`, `spoof_mac`, `spoof_ip`, …
    pub reason: String,
    /// `ingress` or `egress`, seen from `vm`.
    pub direction: String,
    pub proto: u8,
    pub src_ip: String,
    pub dst_ip: String,
    pub src_port: u16,
    pub dst_port: u16,
    /// The VM whose interface enforced the verdict.
    pub vm: String,
    pub src_vm: Option<String>,
    pub dst_vm: Option<String>,
    pub ifindex: u32,
    pub host: String,
    pub tier: Option<String>,
    pub policy: Option<String>,
    /// Rule index within the revision (0 = default action).
    pub rule: u32,
    pub rule_name: Option<String>,
    pub epoch: u32,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// Events the datapath suppressed (rate limit / full ring) before these: counted, never silent.
    #[serde(default)]
    pub suppressed: u64,
}

/// A security alert derived from the datapath (8.1.3.3: source, attack type, target, time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// `spoof_ip`, `spoof_mac`, `spoof_arp`, `spoof_nd`, `rogue_dhcp`, `rogue_ra`, `scan`.
    pub attack: String,
    pub source_ip: String,
    pub source_vm: Option<String>,
    /// Target description: an address, or `N hosts / M ports` for a scan.
    pub target: String,
    pub host: String,
    pub first_seen: String,
    pub last_seen: String,
    pub count: u64,
    #[serde(default)]
    pub detail: String,
}

/// The event-specific part of a record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An administrator action through the controller (refused attempts included).
    AdminAction {
        user: String,
        role: Option<Role>,
        source: String,
        operation: String,
        object: String,
        before: Option<Value>,
        after: Option<Value>,
        success: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    PolicyRevision {
        commit: String,
        author: String,
        committer: String,
        committed_at: String,
        rules_added: Vec<String>,
        rules_removed: Vec<String>,
        rules_changed: Vec<String>,
        compile: CompileResult,
    },
    /// A host began enforcing a revision.
    PolicyEnforced {
        commit: String,
        host: String,
        enforced_at: String,
        epoch: u32,
    },
    AgentConnected {
        host: String,
        peer: String,
        cert_subject: String,
    },
    AgentDisconnected {
        host: String,
        peer: String,
        reason: String,
    },
    AgentCertFailure {
        peer: String,
        cert_subject: Option<String>,
        error: String,
    },
    /// A VM that no policy covers (or unknown to the inventory).
    VmUncovered {
        vm: String,
        host: String,
        reason: String,
    },
    /// A VM now runs on another host (live migration, restart elsewhere); its policy is
    /// compiled for the new host from the same revision (cloud CES2-02/03).
    VmMoved {
        vm: String,
        from: String,
        to: String,
        /// The revision served to the new host.
        commit: String,
    },
    /// A VM interface that is not enforced in the datapath.
    InterfaceUnenforced {
        vm: String,
        host: String,
        interface: String,
        reason: String,
    },
    FlowVerdict(FlowRecord),
    Alert(AlertRecord),
    /// Events that were not recorded individually: counted and audited, never silent.
    EventsDropped {
        source: String,
        count: u64,
        reason: String,
    },
    /// The store repaired a torn tail at open (the bytes are kept in `quarantine/`).
    StoreRepaired {
        segment: String,
        last_good_seq: Option<u64>,
        quarantined_bytes: u64,
        quarantine_file: String,
    },
    /// A closed segment older than the retention period was removed (automatically; no role can).
    RetentionPurged {
        segment: String,
        first_seq: u64,
        last_seq: u64,
        /// Chain hash of `last_seq`: the `prev` of the next remaining segment.
        last_hash: String,
        newest_record: String,
        retention_days: u32,
    },
    /// Clock-sync state sample (alarm when unsynced or offset too large).
    TimeSync {
        synced: bool,
        offset_us: i64,
        max_error_us: i64,
        source: String,
    },
    /// Audit subsystem lifecycle / configuration change (8.1.4.3 d).
    AuditService {
        action: String,
        #[serde(default)]
        detail: String,
    },
}

impl Event {
    /// Stable type name (the serde tag).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::AdminAction { .. } => "admin_action",
            Event::PolicyRevision { .. } => "policy_revision",
            Event::PolicyEnforced { .. } => "policy_enforced",
            Event::AgentConnected { .. } => "agent_connected",
            Event::AgentDisconnected { .. } => "agent_disconnected",
            Event::AgentCertFailure { .. } => "agent_cert_failure",
            Event::VmUncovered { .. } => "vm_uncovered",
            Event::VmMoved { .. } => "vm_moved",
            Event::InterfaceUnenforced { .. } => "interface_unenforced",
            Event::FlowVerdict(_) => "flow_verdict",
            Event::Alert(_) => "alert",
            Event::EventsDropped { .. } => "events_dropped",
            Event::StoreRepaired { .. } => "store_repaired",
            Event::RetentionPurged { .. } => "retention_purged",
            Event::TimeSync { .. } => "time_sync",
            Event::AuditService { .. } => "audit_service",
        }
    }

    /// Subject (who/what) for the top-level field.
    pub fn subject(&self) -> String {
        match self {
            Event::AdminAction { user, .. } => user.clone(),
            Event::PolicyRevision { committer, .. } => committer.clone(),
            Event::PolicyEnforced { host, .. } => host.clone(),
            Event::AgentConnected { host, .. } | Event::AgentDisconnected { host, .. } => {
                host.clone()
            }
            Event::AgentCertFailure {
                peer, cert_subject, ..
            } => cert_subject.clone().unwrap_or_else(|| peer.clone()),
            Event::VmUncovered { vm, .. }
            | Event::InterfaceUnenforced { vm, .. }
            | Event::VmMoved { vm, .. } => vm.clone(),
            Event::FlowVerdict(f) => f.vm.clone(),
            Event::Alert(a) => a.source_vm.clone().unwrap_or_else(|| a.source_ip.clone()),
            Event::EventsDropped { source, .. } => source.clone(),
            Event::StoreRepaired { .. }
            | Event::RetentionPurged { .. }
            | Event::TimeSync { .. }
            | Event::AuditService { .. } => "bulkhead-audit".into(),
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Event::AdminAction { success, .. } => {
                if *success {
                    Outcome::Success
                } else {
                    Outcome::Failure
                }
            }
            Event::PolicyRevision { compile, .. } => {
                if compile.ok {
                    Outcome::Success
                } else {
                    Outcome::Failure
                }
            }
            Event::AgentCertFailure { .. } => Outcome::Failure,
            Event::TimeSync { synced, .. } => {
                if *synced {
                    Outcome::Success
                } else {
                    Outcome::Failure
                }
            }
            Event::PolicyEnforced { .. }
            | Event::AgentConnected { .. }
            | Event::StoreRepaired { .. }
            | Event::RetentionPurged { .. }
            | Event::AuditService { .. } => Outcome::Success,
            _ => Outcome::Observed,
        }
    }

    /// VMs this record concerns (export filter).
    pub fn vms(&self) -> Vec<&str> {
        match self {
            Event::FlowVerdict(f) => {
                let mut v = vec![f.vm.as_str()];
                v.extend(f.src_vm.as_deref());
                v.extend(f.dst_vm.as_deref());
                v
            }
            Event::Alert(a) => a.source_vm.as_deref().into_iter().collect(),
            Event::VmUncovered { vm, .. }
            | Event::InterfaceUnenforced { vm, .. }
            | Event::VmMoved { vm, .. } => vec![vm],
            Event::AdminAction { object, .. } => vec![object.as_str()],
            _ => vec![],
        }
    }

    /// Host this record concerns, if other than the recorder.
    pub fn host(&self) -> Option<&str> {
        match self {
            Event::FlowVerdict(f) => Some(&f.host),
            Event::Alert(a) => Some(&a.host),
            Event::PolicyEnforced { host, .. }
            | Event::AgentConnected { host, .. }
            | Event::AgentDisconnected { host, .. }
            | Event::VmUncovered { host, .. }
            | Event::InterfaceUnenforced { host, .. }
            | Event::VmMoved { to: host, .. } => Some(host),
            _ => None,
        }
    }

    /// Rule identifiers this record concerns: the rule index and name of a flow record.
    pub fn rules(&self) -> Vec<String> {
        match self {
            Event::FlowVerdict(f) => {
                let mut v = vec![f.rule.to_string()];
                v.extend(f.rule_name.clone());
                if let Some(p) = &f.policy {
                    v.push(p.clone());
                }
                v
            }
            Event::PolicyRevision {
                rules_added,
                rules_removed,
                rules_changed,
                ..
            } => rules_added
                .iter()
                .chain(rules_removed)
                .chain(rules_changed)
                .cloned()
                .collect(),
            _ => vec![],
        }
    }
}
