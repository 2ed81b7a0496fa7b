//! The controller's half of the MLPS compliance evidence, live: default deny in force per
//! scope, per-interface enforcement, rule analysis with the agents' hit counters, policy
//! distribution per host, role assignments, clock state per host and the retention setting
//! (`Admin.Evidence`, audit administrator only). Also the audit housekeeping the controller
//! runs on a schedule: retention and clock-sync records.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_audit::record::{format_ts, Event};
use bulkhead_audit::report::{
    Evidence, HostPolicy, InterfaceStatus, RetentionEvidence, RuleAnalysis, RuleStat, ScopeDefault,
};
use bulkhead_audit::roles::{admin_event, authorize, Operation, RoleAssignments};
use bulkhead_audit::store::MIN_RETENTION_DAYS;
use bulkhead_audit::timesync::{clock_status, ClockStatus};
use bulkhead_wire::pb;
use tonic::{Request, Response, Status};

use crate::compile::TreeAnalysis;
use crate::{unix_now, Controller};

/// The role registry `bulkhead-controller pki admin` keeps in the PKI directory.
pub const ROLES_FILE: &str = "roles.json";

#[derive(Clone, Debug)]
pub struct EvidenceConfig {
    /// PKI directory holding the role registry ([`ROLES_FILE`]).
    pub pki_dir: Option<PathBuf>,
    /// Retention the controller's store enforces.
    pub retention_days: u32,
    /// Controller host name (for its own clock state).
    pub host: String,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        Self {
            pki_dir: None,
            retention_days: MIN_RETENTION_DAYS,
            host: "controller".into(),
        }
    }
}

fn ns_to_ts(ns: i64) -> Option<String> {
    (ns != 0).then(|| {
        format_ts(
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        )
    })
}

fn s_to_ts(s: i64) -> Option<String> {
    ns_to_ts(s.saturating_mul(1_000_000_000))
}

fn clock_of(c: &pb::ClockState) -> ClockStatus {
    ClockStatus {
        synced: c.synced,
        offset_us: c.offset_us,
        max_error_us: c.max_error_us,
        est_error_us: 0,
        source: c.source.clone(),
        problem: (!c.problem.is_empty()).then(|| c.problem.clone()),
    }
}

/// Whether an interface state counts as enforced, and why not.
fn judge(i: &pb::InterfaceState, posture: &str) -> (bool, Option<String>) {
    if !i.attached {
        let why = if i.error.is_empty() {
            "the datapath is not attached".to_string()
        } else {
            i.error.clone()
        };
        return (false, Some(why));
    }
    if i.endpoint.is_empty() {
        let deny = posture != "allow";
        return (
            deny,
            Some(format!(
                "no compiled policy for this interface: bootstrap posture {} ({})",
                if deny { "deny" } else { "allow" },
                if deny {
                    "all its traffic is dropped"
                } else {
                    "all its traffic passes unjudged"
                }
            )),
        );
    }
    (true, None)
}

/// What the evidence needs of one host, copied out of the controller state.
struct HostView {
    name: String,
    connected: bool,
    connected_since: i64,
    enforced_digest: String,
    enforced_commit: String,
    enforced_since: i64,
    desired_digest: String,
    endpoints: usize,
    vms: Vec<pb::Vm>,
    report: Option<(i64, pb::HostReport)>,
}

impl HostView {
    fn in_sync(&self) -> bool {
        !self.desired_digest.is_empty() && self.desired_digest == self.enforced_digest
    }
}

fn rule_analysis(a: &TreeAnalysis, hosts: &[HostView]) -> RuleAnalysis {
    // Counters summed over hosts (each agent's counters span the revisions it enforced).
    let mut hits: HashMap<&str, (u64, u64, i64)> = HashMap::new();
    let mut reported = false;
    for h in hosts {
        if let Some((_, r)) = &h.report {
            reported = true;
            for c in &r.rules {
                let e = hits.entry(c.rule.as_str()).or_default();
                e.0 += c.packets;
                e.1 += c.bytes;
                e.2 = e.2.max(c.last_hit_unix_nanos);
            }
        }
    }
    let mut ra = RuleAnalysis::default();
    for r in &a.rules {
        let (packets, bytes, last) = hits.get(r.id.as_str()).copied().unwrap_or_default();
        ra.rules.push(RuleStat {
            id: r.id.clone(),
            name: r.name.clone(),
            packets,
            bytes,
            last_hit: ns_to_ts(last),
        });
    }
    for f in &a.findings {
        match f.kind.as_str() {
            "shadowed" => ra.shadowed.push((
                f.subject.clone(),
                "the rules above it (earlier rules or higher tiers)".into(),
            )),
            "duplicate" => {
                // "rule `a` repeats rule `b` (…)": the second quoted name is the original.
                let first = f.message.split('`').nth(3).unwrap_or("an earlier rule");
                ra.redundant.push((f.subject.clone(), first.to_string()));
            }
            "no-vm" | "no-peer" => ra.never_matching.push(f.subject.clone()),
            _ => {}
        }
    }
    if reported {
        let listed: BTreeSet<&str> = ra
            .never_matching
            .iter()
            .map(String::as_str)
            .chain(ra.shadowed.iter().map(|(r, _)| r.as_str()))
            .chain(ra.redundant.iter().map(|(r, _)| r.as_str()))
            .collect();
        ra.never_hit = a
            .rules
            .iter()
            .filter(|r| r.policy_rule && !listed.contains(r.id.as_str()))
            .filter(|r| hits.get(r.id.as_str()).is_none_or(|h| h.0 == 0))
            .map(|r| r.id.clone())
            .collect();
    }
    ra
}

fn default_deny(a: &TreeAnalysis, commit: &str, hosts: &[HostView]) -> Vec<ScopeDefault> {
    let endpoints: usize = hosts.iter().map(|h| h.endpoints).sum();
    let with_tables: Vec<&HostView> = hosts.iter().filter(|h| h.endpoints > 0).collect();
    let enforcing: Vec<&str> = with_tables
        .iter()
        .filter(|h| h.in_sync())
        .map(|h| h.name.as_str())
        .collect();
    let lagging: Vec<&str> = with_tables
        .iter()
        .filter(|h| !h.in_sync())
        .map(|h| h.name.as_str())
        .collect();
    let mut detail = format!(
        "settings.default_action of revision {}; compiled into the tables of {endpoints} VM interface(s) on {} host(s); in force on {}",
        commit.get(..12).unwrap_or(commit),
        with_tables.len(),
        if enforcing.is_empty() { "no host yet".to_string() } else { enforcing.join(", ") }
    );
    if !lagging.is_empty() {
        detail += &format!("; NOT yet enforced by {}", lagging.join(", "));
    }
    let mut out = vec![ScopeDefault {
        scope: "global".into(),
        action: a.default_action.clone(),
        detail: Some(detail),
    }];
    for vm in &a.monitor_vms {
        out.push(ScopeDefault {
            scope: format!("vm {vm} (settings.monitor_endpoints)"),
            action: "monitor".into(),
            detail: Some("monitor mode: denies are recorded as would-deny, traffic passes".into()),
        });
    }
    for h in hosts {
        if let Some((_, r)) = &h.report {
            out.push(ScopeDefault {
                scope: format!("host {}: VM interfaces without compiled policy", h.name),
                action: if r.bootstrap_posture.is_empty() {
                    "deny".into()
                } else {
                    r.bootstrap_posture.clone()
                },
                detail: Some("the agent's bootstrap posture (--bootstrap)".into()),
            });
        }
    }
    out
}

/// Session-state control (8.1.3.2 d): every enforced interface tracks connections; the
/// session tables' live sizes as the agents last reported them.
fn stateful(hosts: &[HostView]) -> Option<String> {
    let reports: Vec<String> = hosts
        .iter()
        .filter_map(|h| {
            h.report.as_ref().map(|(_, r)| {
                format!(
                    "{}: {} of {} session entries",
                    h.name, r.conntrack_entries, r.conntrack_capacity
                )
            })
        })
        .collect();
    if reports.is_empty() {
        return None;
    }
    Some(format!(
        "stateful connection tracking on every enforced interface: TCP through handshake, established and FIN/RST close, UDP and ICMP with timeouts; a packet outside an admitted session is judged as a new flow (default deny); a policy change re-judges open sessions. Session tables now: {}",
        reports.join("; ")
    ))
}

fn enforcement(hosts: &[HostView]) -> Vec<InterfaceStatus> {
    let mut out = Vec::new();
    for h in hosts {
        match &h.report {
            Some((at, r)) => {
                let stale = (!h.connected).then(|| {
                    format!(
                        "agent not connected since {}; state as reported at {}",
                        s_to_ts(h.connected_since).unwrap_or_else(|| "-".into()),
                        s_to_ts(*at).unwrap_or_else(|| "-".into())
                    )
                });
                for i in &r.interfaces {
                    let (enforced, why) = judge(i, &r.bootstrap_posture);
                    let reason = match (why, &stale) {
                        (Some(w), Some(s)) => Some(format!("{w}; {s}")),
                        (w, s) => w.or_else(|| s.clone()),
                    };
                    out.push(InterfaceStatus {
                        vm: i.vm.clone(),
                        host: h.name.clone(),
                        interface: if i.endpoint.is_empty() {
                            i.device.clone()
                        } else {
                            format!("{} ({})", i.device, i.endpoint)
                        },
                        enforced,
                        reason,
                    });
                }
            }
            None => {
                for vm in &h.vms {
                    for i in &vm.interfaces {
                        out.push(InterfaceStatus {
                            vm: vm.name.clone(),
                            host: h.name.clone(),
                            interface: i.device.clone(),
                            enforced: false,
                            reason: Some(
                                "the host's agent has not reported the interface's enforcement state"
                                    .into(),
                            ),
                        });
                    }
                }
            }
        }
    }
    out
}

impl Controller {
    fn host_views(&self) -> (Option<pb::Revision>, Vec<HostView>) {
        let st = self.state();
        let serving = st.serving.clone();
        let views = st
            .hosts
            .iter()
            .map(|(name, h)| {
                let t = serving.as_ref().and_then(|s| s.hosts.get(name));
                HostView {
                    name: name.clone(),
                    connected: h.connected,
                    connected_since: h.connected_since,
                    enforced_digest: h.enforced_digest.clone(),
                    enforced_commit: h.enforced_commit.clone(),
                    enforced_since: h.enforced_since,
                    desired_digest: t.map(|t| t.digests.tables.clone()).unwrap_or_default(),
                    endpoints: t.map_or(0, |t| t.tables.endpoints.len()),
                    vms: h.vms.clone(),
                    report: h.report.clone(),
                }
            })
            .collect();
        (serving.map(|s| s.revision.clone()), views)
    }

    /// The live evidence. `include_store` adds what the audit store shows (a live verify,
    /// retention, coverage, recent alerts). CPU and I/O heavy: call off the I/O threads.
    pub fn evidence(&self, include_store: bool) -> anyhow::Result<Evidence> {
        let mut cfg = self.evidence_config.get().cloned().unwrap_or_default();
        if let Some(a) = &self.audit {
            cfg.retention_days = a.retention_days();
        }
        let mut ev = match (&self.audit, include_store) {
            (Some(a), true) => a.store_evidence(cfg.retention_days, 50)?,
            _ => Evidence::default(),
        };
        ev.generated_at = format_ts(time::OffsetDateTime::now_utc());
        if ev.retention.is_none() {
            ev.retention = Some(RetentionEvidence {
                retention_days: cfg.retention_days,
                ..Default::default()
            });
        }
        let (serving, hosts) = self.host_views();
        match (self.good_tree(), serving) {
            (Some((rev, tree)), Some(_)) => {
                match crate::compile::analyse_tree(&tree, &self.inventory_vms()) {
                    Ok(a) => {
                        ev.default_deny = Some(default_deny(&a, &rev.commit, &hosts));
                        ev.rule_analysis = Some(rule_analysis(&a, &hosts));
                        ev.rule_export = Some(format!(
                            "{} rule rows at commit {}, each with source and destination addresses, protocol and ports, in evaluation order: `bulkhead policy rules --csv` on that commit",
                            a.rule_rows,
                            rev.commit
                        ));
                        ev.zones = Some(
                            a.zones
                                .iter()
                                .map(|(g, vms, i, e)| {
                                    format!("group {g}: {vms} VM(s), {i} ingress and {e} egress rule(s) apply")
                                })
                                .collect(),
                        );
                    }
                    Err(errors) => tracing::warn!(
                        ?errors,
                        "compliance evidence: the serving revision could not be analysed"
                    ),
                }
            }
            _ => tracing::info!("compliance evidence: no revision served yet"),
        }
        ev.enforcement = Some(enforcement(&hosts));
        ev.stateful = stateful(&hosts);
        ev.policy_distribution = Some(
            hosts
                .iter()
                .map(|h| HostPolicy {
                    host: h.name.clone(),
                    commit: h.enforced_commit.clone(),
                    epoch: None,
                    connected: Some(h.connected),
                    enforced_at: s_to_ts(h.enforced_since),
                    in_sync: h.in_sync(),
                })
                .collect(),
        );
        if let Some(dir) = &cfg.pki_dir {
            let path = dir.join(ROLES_FILE);
            match RoleAssignments::load(&path) {
                Ok(r) if !r.accounts.is_empty() => ev.roles = Some(r),
                Ok(_) => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "role registry"),
            }
        }
        let mut clocks = vec![(format!("{} (controller)", cfg.host), clock_status())];
        for h in &hosts {
            if let Some(c) = h.report.as_ref().and_then(|(_, r)| r.clock.as_ref()) {
                clocks.push((h.name.clone(), clock_of(c)));
            }
        }
        ev.time_sync = Some(clocks);
        Ok(ev)
    }

    /// An agent's compliance evidence arrived. Interfaces that became unenforced are audited.
    pub fn host_report(&self, host: &str, report: pb::HostReport) {
        let unenforced = |r: &pb::HostReport| -> BTreeMap<(String, String), String> {
            r.interfaces
                .iter()
                .filter_map(|i| {
                    let (ok, why) = judge(i, &r.bootstrap_posture);
                    (!ok).then(|| ((i.vm.clone(), i.device.clone()), why.unwrap_or_default()))
                })
                .collect()
        };
        let now = unenforced(&report);
        let new: Vec<((String, String), String)> = {
            let mut st = self.state();
            let h = st.hosts.entry(host.to_string()).or_default();
            let before = h
                .report
                .as_ref()
                .map(|(_, r)| unenforced(r))
                .unwrap_or_default();
            h.report = Some((unix_now(), report));
            now.into_iter()
                .filter(|(k, _)| !before.contains_key(k))
                .collect()
        };
        if let (Some(a), false) = (&self.audit, new.is_empty()) {
            a.submit(
                new.into_iter()
                    .map(|((vm, device), reason)| Event::InterfaceUnenforced {
                        vm,
                        host: host.to_string(),
                        interface: device,
                        reason,
                    })
                    .collect(),
            );
        }
    }

    /// After every change of the served output (new commit or inventory change): record every
    /// running VM that no policy covers (cloud extension: unauthorised new or re-enabled VMs),
    /// once each time it becomes uncovered, and refresh the names flow records get (tier and
    /// policy of each rule, VM of each address).
    pub async fn follow_coverage(self: Arc<Self>) {
        if self.audit.is_none() {
            return;
        }
        let mut serving = self.serving_tx.subscribe();
        let mut known: BTreeSet<(String, String)> = BTreeSet::new();
        // Where each VM ran at the last served output (kept while it is away, so a VM that
        // stops on one host and starts on another counts as moved).
        let mut placed: BTreeMap<String, String> = BTreeMap::new();
        loop {
            if serving.changed().await.is_err() {
                return;
            }
            // Coalesce bursts of recompiles.
            tokio::time::sleep(Duration::from_millis(200)).await;
            serving.borrow_and_update();
            let me = self.clone();
            let analysis = tokio::task::spawn_blocking(move || {
                let (rev, tree) = me.good_tree()?;
                let vms = me.inventory_vms();
                let a = crate::compile::analyse_tree(&tree, &vms).ok()?;
                Some((a, vms, rev.commit))
            })
            .await;
            let Ok(Some((a, vms, commit))) = analysis else {
                continue;
            };
            let moves: Vec<Event> = vms
                .iter()
                .filter_map(|v| {
                    let from = placed.insert(v.vm.name.clone(), v.host.clone())?;
                    (from != v.host).then(|| Event::VmMoved {
                        vm: v.vm.name.clone(),
                        from,
                        to: v.host.clone(),
                        commit: commit.clone(),
                    })
                })
                .collect();
            if let (Some(au), false) = (&self.audit, moves.is_empty()) {
                au.submit(moves);
            }
            if let Some(au) = &self.audit {
                au.set_flow_names(crate::audit::FlowNames {
                    rules: a
                        .rules
                        .iter()
                        .filter_map(|r| Some((r.id.clone(), (r.tier.clone()?, r.policy.clone()?))))
                        .collect(),
                    vm_of_ip: vms
                        .iter()
                        .flat_map(|v| {
                            v.vm.interfaces.iter().flat_map(move |i| {
                                i.addresses
                                    .iter()
                                    .filter_map(|a| a.parse().ok())
                                    .map(move |a| (a, v.vm.name.clone()))
                            })
                        })
                        .collect(),
                });
            }
            let now: BTreeSet<(String, String)> = a.uncovered.into_iter().collect();
            let new: Vec<Event> = now
                .difference(&known)
                .map(|(vm, host)| Event::VmUncovered {
                    vm: vm.clone(),
                    host: host.clone(),
                    reason: format!(
                        "no policy applies to it: only the default action ({}) and system endpoints judge its traffic",
                        a.default_action
                    ),
                })
                .collect();
            if let (Some(au), false) = (&self.audit, new.is_empty()) {
                au.submit(new);
            }
            known = now;
        }
    }

    /// Audit housekeeping on a schedule: retention (at start, then every `retention_every`)
    /// and the clock-sync state (checked every 10 s; recorded when it changes and at least
    /// every `clock_every`).
    pub async fn audit_housekeeping(
        self: Arc<Self>,
        retention_every: Duration,
        clock_every: Duration,
    ) {
        if self.audit.is_none() {
            return;
        }
        let mut retention = tokio::time::interval(retention_every);
        let mut clock = tokio::time::interval(Duration::from_secs(10).min(clock_every));
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(bool, Instant)> = None;
        loop {
            tokio::select! {
                _ = retention.tick() => {
                    let me = self.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        me.audit.as_ref().map(|a| a.enforce_retention())
                    })
                    .await;
                    match r {
                        Ok(Some(Ok(purged))) if !purged.is_empty() => {
                            tracing::info!(?purged, "audit retention: segments past the retention period removed (each removal recorded)");
                        }
                        Ok(Some(Err(e))) => tracing::error!(error = format!("{e:#}"), "audit retention"),
                        Err(e) => tracing::error!(error = %e, "audit retention"),
                        _ => {}
                    }
                }
                _ = clock.tick() => {
                    let c = clock_status();
                    let due = last.is_none_or(|(synced, at)| synced != c.synced || at.elapsed() >= clock_every);
                    if due {
                        if !c.synced {
                            tracing::warn!(problem = ?c.problem, "clock not synchronised");
                        }
                        last = Some((c.synced, Instant::now()));
                        if let Some(a) = &self.audit {
                            a.submit(vec![c.event()]);
                        }
                    }
                }
            }
        }
    }
}

/// `Admin.Evidence`: the audit administrator's operation (`compliance_report`); every call,
/// refused or not, is audited.
pub async fn evidence_rpc(
    ctl: Arc<Controller>,
    req: Request<pb::EvidenceRequest>,
) -> Result<Response<pb::EvidenceReply>, Status> {
    const OBJECT: &str = "compliance/evidence";
    let (principal, source) = authorized(&ctl, &req, Operation::ComplianceReport, OBJECT)?;
    let include_store = req.get_ref().include_store;
    let me = ctl.clone();
    let result = tokio::task::spawn_blocking(move || me.evidence(include_store))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
        .and_then(|ev| serde_json::to_string(&ev).context("encoding the evidence"));
    if let Some(a) = &ctl.audit {
        a.record(admin_event(
            &principal,
            &source,
            Operation::ComplianceReport,
            OBJECT,
            None,
            None,
            result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
        ));
    }
    match result {
        Ok(evidence_json) => Ok(Response::new(pb::EvidenceReply { evidence_json })),
        Err(e) => Err(Status::internal(format!("{e:#}"))),
    }
}

/// The caller's certificate identity, authorized for `op`; a refusal is audited and returned
/// as `PermissionDenied`. Also returns the caller's address.
fn authorized<T>(
    ctl: &Controller,
    req: &Request<T>,
    op: Operation,
    object: &str,
) -> Result<(bulkhead_audit::roles::Principal, String), Status> {
    let source = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let id = req
        .peer_certs()
        .and_then(|c| c.first().map(|c| crate::audit::cert_identity(c.as_ref())))
        .unwrap_or_default();
    match authorize(&id, op, &source, object) {
        Ok(p) => Ok((p, source)),
        Err(refused) => {
            if let Some(a) = &ctl.audit {
                a.record(refused.record);
            }
            Err(Status::permission_denied(refused.refusal.to_string()))
        }
    }
}

/// `Admin.AuditSettings`: the audit administrator reads or changes the retention period
/// (operation `audit_configure`); every call, refused or not, is audited with before and after.
pub async fn audit_settings_rpc(
    ctl: Arc<Controller>,
    req: Request<pb::AuditSettingsRequest>,
) -> Result<Response<pb::AuditSettingsReply>, Status> {
    const OBJECT: &str = "audit/retention_days";
    let (principal, source) = authorized(&ctl, &req, Operation::AuditConfigure, OBJECT)?;
    let Some(audit) = &ctl.audit else {
        return Err(Status::failed_precondition(
            "this controller keeps no audit trail (--audit-dir)",
        ));
    };
    let days = req.get_ref().retention_days;
    let before = audit.retention_days();
    let result = if days == 0 {
        Ok(before)
    } else {
        let me = ctl.clone();
        tokio::task::spawn_blocking(move || {
            me.audit
                .as_ref()
                .map_or(Ok(before), |a| a.set_retention_days(days))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
    };
    let after = audit.retention_days();
    audit.record(admin_event(
        &principal,
        &source,
        Operation::AuditConfigure,
        OBJECT,
        Some(serde_json::json!(before)),
        Some(serde_json::json!(after)),
        result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
    ));
    match result {
        Ok(_) => Ok(Response::new(pb::AuditSettingsReply {
            retention_days: after,
        })),
        Err(e) => Err(Status::invalid_argument(format!("{e:#}"))),
    }
}
