//! Flow events from the datapath, aggregated until the session forwards them, and the
//! security alerts derived from them.
//!
//! Aggregation is the audit library's [`FlowAggregator`]: identical flows (same interface,
//! slot, kind, reason, direction, 5-tuple, rule, epoch) within one flush interval become one
//! record with packet and byte counts. While the controller is away the table is bounded; what
//! does not fit is counted and reported as suppressed — never silently lost. Every event also
//! goes through the audit library's [`AlertDetector`] (spoofing, scans), here on the host,
//! where events arrive unaggregated and in time order.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bulkhead_abi::FlowEvent;
use bulkhead_audit::alerts::{AlertConfig, AlertDetector};
use bulkhead_audit::flow::{boot_offset_ns, FlowAggregator, RuleInfo};
use bulkhead_audit::record::Event;
use bulkhead_datapath::events::EventReader;
use bulkhead_wire::pb;
use time::OffsetDateTime;

use crate::enforcer::Names;

pub const MAX_PENDING: usize = 100_000;
/// Alerts kept while the controller is away (alerts are rate limited per source already).
pub const MAX_ALERTS: usize = 10_000;

pub struct Pending {
    agg: FlowAggregator,
    pub alerts: Vec<pb::Alert>,
    /// Alerts that did not fit while the controller was away.
    pub alerts_dropped: u64,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            // The window does not matter: `take` drains everything at every flush.
            agg: FlowAggregator::new(Duration::from_secs(1), MAX_PENDING),
            alerts: Vec::new(),
            alerts_dropped: 0,
        }
    }
}

/// The audit library's view of the agent's names (ifindex → VM, address → VM, rule ids).
pub struct AgentNames<'a> {
    pub names: &'a Names,
    pub boot_offset_ns: i128,
}

impl bulkhead_audit::flow::Names for AgentNames<'_> {
    fn host(&self) -> &str {
        &self.names.host
    }
    fn vm_of_ifindex(&self, ifindex: u32) -> Option<String> {
        self.names.ifindex_vm.get(&ifindex).cloned()
    }
    fn vm_of_ip(&self, ip: &IpAddr) -> Option<String> {
        self.names.ip_vm.get(ip).cloned()
    }
    fn rule(&self, epoch: u32, rule: u32) -> Option<RuleInfo> {
        let id = self.names.by_epoch.get(&epoch)?.rules.get(rule as usize)?;
        Some(RuleInfo {
            name: Some(id.clone()),
            ..Default::default()
        })
    }
    fn wall_time(&self, boot_ns: u64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(boot_ns) + self.boot_offset_ns)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl Pending {
    pub fn add(&mut self, e: &FlowEvent) {
        self.agg.add(e);
    }

    pub fn add_alert(&mut self, a: pb::Alert) {
        if self.alerts.len() >= MAX_ALERTS {
            self.alerts_dropped += 1;
        } else {
            self.alerts.push(a);
        }
    }

    /// Everything pending as wire records, names resolved; the buffer is emptied.
    pub fn take(&mut self, names: &RwLock<Names>) -> pb::FlowEvents {
        let offset = boot_offset_ns();
        let names = names.read().ok();
        let (flows, overflow) = self.agg.drain(0, true);
        let mut suppressed = overflow;
        let records = flows
            .into_iter()
            .map(|(k, a)| {
                suppressed += a.suppressed;
                let epoch = names.as_ref().and_then(|n| n.by_epoch.get(&k.epoch));
                let endpoint = epoch
                    .and_then(|n| n.endpoints.get(&k.slot))
                    .cloned()
                    .unwrap_or_default();
                let addr = |a: &[u8; 16]| {
                    if k.family == 4 {
                        a[12..].to_vec()
                    } else {
                        a.to_vec()
                    }
                };
                pb::FlowRecord {
                    first_seen_unix_nanos: (i128::from(a.first_ns) + offset) as i64,
                    last_seen_unix_nanos: (i128::from(a.last_ns) + offset) as i64,
                    vm: endpoint.split('/').next().unwrap_or("").to_string(),
                    endpoint,
                    kind: u32::from(k.kind),
                    direction: u32::from(k.direction),
                    reason: u32::from(k.reason),
                    src: addr(&k.src),
                    dst: addr(&k.dst),
                    sport: u32::from(k.sport),
                    dport: u32::from(k.dport),
                    proto: u32::from(k.proto),
                    rule: epoch
                        .and_then(|n| n.rules.get(k.rule as usize))
                        .cloned()
                        .unwrap_or_default(),
                    digest: epoch.map(|n| n.digest.clone()).unwrap_or_default(),
                    packets: a.packets,
                    bytes: a.bytes,
                }
            })
            .collect();
        // Alerts that did not fit are counted with the undelivered events.
        suppressed += std::mem::take(&mut self.alerts_dropped);
        pb::FlowEvents {
            records,
            suppressed,
            alerts: std::mem::take(&mut self.alerts),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.agg.is_empty()
            && self.agg.overflow() == 0
            && self.alerts.is_empty()
            && self.alerts_dropped == 0
    }
}

/// An alert record as the wire carries it (the controller sets the host from the certificate).
pub fn alert_to_pb(ev: Event) -> Option<pb::Alert> {
    let Event::Alert(a) = ev else { return None };
    Some(pb::Alert {
        attack: a.attack,
        source_ip: a.source_ip,
        source_vm: a.source_vm.unwrap_or_default(),
        target: a.target,
        first_seen: a.first_seen,
        last_seen: a.last_seen,
        count: a.count,
        detail: a.detail,
    })
}

/// Read the ring buffer on a thread of its own, forever: every event is aggregated and
/// observed by the alert detector.
pub fn spawn_reader(
    mut reader: EventReader,
    pending: Arc<Mutex<Pending>>,
    names: Arc<RwLock<Names>>,
    alerts: AlertConfig,
) {
    let _ = std::thread::Builder::new()
        .name("flow-events".into())
        .spawn(move || {
            let mut detector = AlertDetector::new(alerts);
            let mut last_expire = 0u64;
            loop {
                reader.wait(Duration::from_millis(200));
                let mut batch = Vec::new();
                reader.drain(|e| batch.push(e));
                if batch.is_empty() {
                    continue;
                }
                let mut found = Vec::new();
                if let Ok(n) = names.read() {
                    let view = AgentNames {
                        names: &n,
                        boot_offset_ns: boot_offset_ns(),
                    };
                    for e in &batch {
                        found.extend(detector.observe(e, &view));
                    }
                }
                // Keep the detector's memory bounded: forget sources idle for 10 minutes.
                let now = batch.last().map_or(0, |e| e.timestamp_ns);
                if now.saturating_sub(last_expire) > 60_000_000_000 {
                    detector.expire(now, Duration::from_secs(600));
                    last_expire = now;
                }
                if let Ok(mut p) = pending.lock() {
                    for e in &batch {
                        p.add(e);
                    }
                    for a in found.into_iter().filter_map(alert_to_pb) {
                        tracing::warn!(attack = %a.attack, source = %a.source_ip, target = %a.target, "security alert");
                        p.add_alert(a);
                    }
                }
            }
        });
}

/// Resolution maps the alert detector needs, from the inventory and its interface bindings.
pub fn inventory_names(
    bindings: &HashMap<String, u32>,
    addresses: &BTreeMap<String, Vec<IpAddr>>,
) -> (HashMap<u32, String>, HashMap<IpAddr, String>) {
    let ifindex_vm = bindings
        .iter()
        .map(|(ep, ifx)| (*ifx, ep.split('/').next().unwrap_or("").to_string()))
        .collect();
    let ip_vm = addresses
        .iter()
        .flat_map(|(vm, ips)| ips.iter().map(move |ip| (*ip, vm.clone())))
        .collect();
    (ifindex_vm, ip_vm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_abi as abi;

    fn ev(ts_ms: u64, dport: u16, suppressed: u32) -> FlowEvent {
        FlowEvent {
            timestamp_ns: ts_ms * 1_000_000,
            ifindex: 7,
            slot: 2,
            epoch: 5,
            rule: 1,
            identity: 100,
            packet_len: 60,
            suppressed_before: suppressed,
            src: abi::v4_mapped([10, 0, 0, 7]),
            dst: abi::v4_mapped([10, 0, 0, 9]),
            sport: 40000,
            dport,
            kind: abi::EVENT_DENY,
            direction: abi::DIR_EGRESS,
            proto: 6,
            family: 4,
            reason: abi::REASON_POLICY,
            tcp_flags: 0x02,
            _pad: [0; 10],
        }
    }

    #[test]
    fn take_folds_flows_names_them_and_carries_suppressed_counts_and_alerts() {
        let mut names = Names::default();
        names.by_epoch.insert(
            5,
            crate::enforcer::EpochNames {
                endpoints: [(2, "web-01/52:54:00:00:00:07".to_string())].into(),
                rules: vec!["default".into(), "deny-ssh".into()],
                digest: "d1".into(),
            },
        );
        let names = RwLock::new(names);
        let mut p = Pending::default();
        assert!(p.is_empty());
        for i in 0..10 {
            p.add(&ev(1000 + i, 22, 0));
        }
        p.add(&ev(1100, 23, 4));
        p.add_alert(pb::Alert {
            attack: "scan".into(),
            ..Default::default()
        });
        assert!(!p.is_empty());
        let out = p.take(&names);
        assert!(p.is_empty());
        assert_eq!(out.records.len(), 2);
        assert_eq!(out.suppressed, 4);
        assert_eq!(out.alerts.len(), 1);
        let r = out.records.iter().find(|r| r.dport == 22).expect("port 22");
        assert_eq!((r.packets, r.bytes), (10, 600));
        assert_eq!(r.vm, "web-01");
        assert_eq!(r.rule, "deny-ssh");
        assert_eq!(r.digest, "d1");
        assert_eq!(r.src, vec![10, 0, 0, 7]);
        assert!(r.last_seen_unix_nanos - r.first_seen_unix_nanos == 9_000_000);
    }

    #[test]
    fn a_full_table_is_counted_as_suppressed() {
        let names = RwLock::new(Names::default());
        let mut p = Pending::default();
        for i in 0..(MAX_PENDING as u32 + 5) {
            let mut e = ev(1, (i % 60000) as u16, 0);
            e.sport = (i / 60000) as u16;
            p.add(&e);
        }
        let out = p.take(&names);
        assert_eq!(out.records.len(), MAX_PENDING);
        assert_eq!(out.suppressed, 5);
    }
}
