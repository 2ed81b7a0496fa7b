//! Populate a demo audit store with one of each record kind, fed through the same APIs the
//! controller and agent will use: `cargo run -p bulkhead-audit --example demo -- /tmp/audit-demo`.
use std::time::Duration;

use bulkhead_abi as abi;
use bulkhead_audit::alerts::{AlertConfig, AlertDetector};
use bulkhead_audit::flow::{FlowAggregator, RuleInfo, StaticNames};
use bulkhead_audit::record::{CompileResult, Event};
use bulkhead_audit::roles::{admin_event, authorize, CertIdentity, Operation};
use bulkhead_audit::{Store, StoreConfig};

fn ev(ts_ms: u64, kind: u8, src: [u8; 4], dst: [u8; 4], dport: u16) -> abi::FlowEvent {
    abi::FlowEvent {
        timestamp_ns: ts_ms * 1_000_000,
        ifindex: 7,
        slot: 1,
        epoch: 3,
        rule: 12,
        identity: 100,
        packet_len: 74,
        suppressed_before: 0,
        src: abi::v4_mapped(src),
        dst: abi::v4_mapped(dst),
        sport: 51514,
        dport,
        kind,
        direction: abi::DIR_EGRESS,
        proto: 6,
        family: 4,
        reason: abi::REASON_POLICY,
        tcp_flags: 0x02,
        _pad: [0; 10],
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/audit-demo".into());
    let (mut s, _) = Store::open(StoreConfig::new(&dir, "ctl-01"))?;

    let id = |uri: &str| CertIdentity {
        san_uris: vec![uri.to_string()],
        ..Default::default()
    };
    // A security administrator changes the global default.
    let alice = id("bulkhead://role/security-admin/alice");
    let p = authorize(
        &alice,
        Operation::GlobalDefaultSet,
        "10.10.0.5:51000",
        "global/default",
    )
    .map_err(|e| e.refusal)?;
    s.append(admin_event(
        &p,
        "10.10.0.5:51000",
        Operation::GlobalDefaultSet,
        "global/default",
        Some(serde_json::json!({"action": "allow"})),
        Some(serde_json::json!({"action": "deny"})),
        Ok(()),
    ))?;
    // A system administrator tries to reconfigure auditing: refused, and audited.
    let bob = id("bulkhead://role/system-admin/bob");
    if let Err(r) = authorize(
        &bob,
        Operation::AuditConfigure,
        "10.10.0.6:40022",
        "audit/forwarding",
    ) {
        s.append(r.record)?;
    }
    // A certificate combining two roles is refused.
    let mut mallory = id("bulkhead://role/security-admin/mallory");
    mallory
        .san_uris
        .push("bulkhead://role/audit-admin/mallory".into());
    if let Err(r) = authorize(&mallory, Operation::AuditExport, "10.10.0.9:3333", "audit") {
        s.append(r.record)?;
    }
    s.append(Event::PolicyRevision {
        commit: "3f2a9c1".into(),
        author: "alice <alice@hospital.example>".into(),
        committer: "alice".into(),
        committed_at: "2026-11-23T08:00:00+00:00".into(),
        rules_added: vec!["db-access/deny-web-ssh".into()],
        rules_removed: vec![],
        rules_changed: vec!["web/allow-https".into()],
        compile: CompileResult {
            ok: true,
            message: "412 entries, 3 tiers".into(),
        },
    })?;
    s.append(Event::PolicyEnforced {
        commit: "3f2a9c1".into(),
        host: "hv-01".into(),
        enforced_at: "2026-11-23T08:00:02.120000+00:00".into(),
        epoch: 3,
    })?;
    s.append(Event::AgentConnected {
        host: "hv-01".into(),
        peer: "10.10.1.1:50432".into(),
        cert_subject: "bulkhead://host/hv-01".into(),
    })?;
    s.append(Event::AgentCertFailure {
        peer: "10.10.1.77:41000".into(),
        cert_subject: None,
        error: "certificate signed by unknown authority".into(),
    })?;
    s.append(Event::VmUncovered {
        vm: "tmp-test-vm".into(),
        host: "hv-02".into(),
        reason: "VM unknown to the inventory; no policy selects it".into(),
    })?;

    // Datapath events through the aggregator and the alert detector (what the agent does).
    let mut names = StaticNames {
        host: "hv-01".into(),
        boot_offset_ns: bulkhead_audit::flow::boot_offset_ns(),
        ..Default::default()
    };
    names.ifindex_vm.insert(7, "his-web-01".into());
    names
        .ip_vm
        .insert("10.20.0.7".parse()?, "his-web-01".into());
    names.ip_vm.insert("10.30.0.9".parse()?, "his-db-01".into());
    names.rules.insert(
        (3, 12),
        RuleInfo {
            tier: Some("application".into()),
            policy: Some("db-access".into()),
            name: Some("deny-web-ssh".into()),
        },
    );
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let now_ms = ts.tv_sec as u64 * 1000;
    let mut agg = FlowAggregator::new(Duration::from_secs(10), 100_000);
    let mut det = AlertDetector::new(AlertConfig::default());
    let mut alerts = Vec::new();
    for i in 0..40 {
        let e = ev(
            now_ms + i,
            abi::EVENT_DENY,
            [10, 20, 0, 7],
            [10, 30, 0, 9],
            22,
        );
        agg.add(&e);
        alerts.extend(det.observe(&e, &names));
    }
    for p in 0..30u16 {
        let e = ev(
            now_ms + 100 + u64::from(p),
            abi::EVENT_DENY,
            [10, 20, 0, 7],
            [10, 30, 0, 9],
            3300 + p,
        );
        agg.add(&e);
        alerts.extend(det.observe(&e, &names));
    }
    let mut sp = ev(
        now_ms + 500,
        abi::EVENT_SPOOF,
        [10, 99, 0, 1],
        [10, 30, 0, 9],
        443,
    );
    sp.reason = abi::REASON_SPOOF_IP;
    agg.add(&sp);
    alerts.extend(det.observe(&sp, &names));
    let mut flows = agg.flush(u64::MAX, &names, true);
    flows.extend(alerts);
    s.append_batch(flows)?;
    s.append(bulkhead_audit::timesync::clock_status().event())?;
    s.close()?;
    println!("demo store written to {dir}");
    Ok(())
}
