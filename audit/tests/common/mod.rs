#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bulkhead_audit::record::{Event, FlowRecord};
use bulkhead_audit::store::list_segments;
use bulkhead_audit::{Store, StoreConfig};

pub fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir, "hv-test-01");
    c.compress = false;
    c
}

pub fn admin(i: u64) -> Event {
    Event::AdminAction {
        user: format!("alice{i}"),
        role: Some(bulkhead_audit::roles::Role::SecurityAdmin),
        source: "10.0.0.5".into(),
        operation: "policy_apply".into(),
        object: format!("policy/web-{i}"),
        before: Some(serde_json::json!({"rules": i})),
        after: Some(serde_json::json!({"rules": i + 1})),
        success: true,
        reason: None,
    }
}

pub fn flow(i: u64) -> Event {
    Event::FlowVerdict(FlowRecord {
        verdict: "deny".into(),
        reason: "policy".into(),
        direction: "ingress".into(),
        proto: 6,
        src_ip: format!("10.1.{}.{}", (i / 250) % 250, i % 250),
        dst_ip: "10.2.0.10".into(),
        src_port: 40000 + (i % 20000) as u16,
        dst_port: 443,
        vm: "db-01".into(),
        src_vm: Some("web-01".into()),
        dst_vm: Some("db-01".into()),
        ifindex: 7,
        host: "hv-test-01".into(),
        tier: Some("app".into()),
        policy: Some("db-access".into()),
        rule: (i % 5) as u32,
        rule_name: Some(format!("rule-{}", i % 5)),
        epoch: 3,
        packets: 1,
        bytes: 60,
        first_seen: "2026-11-23T08:00:00.000000+00:00".into(),
        last_seen: "2026-11-23T08:00:00.000000+00:00".into(),
        suppressed: 0,
    })
}

/// Create a store with `n` admin records (plus the "started" record at seq 0), closed.
pub fn populated(dir: &Path, n: u64) -> PathBuf {
    let (mut s, _) = Store::open(cfg(dir)).unwrap();
    for i in 0..n {
        s.append(admin(i)).unwrap();
    }
    s.close().unwrap();
    active_segment(dir)
}

pub fn active_segment(dir: &Path) -> PathBuf {
    list_segments(dir).unwrap().last().unwrap().path.clone()
}

pub fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn write_lines(p: &Path, l: &[String]) {
    let mut s = l.join("\n");
    s.push('\n');
    std::fs::write(p, s).unwrap();
}
