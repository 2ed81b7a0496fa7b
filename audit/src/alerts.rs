//! Security alerts derived from datapath events (8.1.3.3, cloud ABS2-03..06): spoofing
//! attempts and scans (bursts of denied flows from one source to many targets), with source,
//! attack type, target and time.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use bulkhead_abi as abi;

use crate::flow::{event_ip, reason_name, Names};
use crate::record::{format_ts, AlertRecord, Event};

#[derive(Clone, Debug)]
pub struct AlertConfig {
    /// Scan: at least this many distinct denied (destination, port) targets …
    pub scan_min_targets: usize,
    /// … from one source within this window.
    pub scan_window: Duration,
    /// After an alert, the same source/attack is not alerted again for this long (the events
    /// in between are counted into the next alert).
    pub cooldown: Duration,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            scan_min_targets: 20,
            scan_window: Duration::from_secs(10),
            cooldown: Duration::from_secs(60),
        }
    }
}

#[derive(Default)]
struct ScanState {
    window_start: u64,
    targets: HashSet<(IpAddr, u16)>,
    hosts: HashSet<IpAddr>,
    ports: HashSet<u16>,
    first: u64,
    denied: u64,
    alerted_at: Option<u64>,
}

#[derive(Default)]
struct SpoofState {
    first: u64,
    last: u64,
    count: u64,
    alerted_at: Option<u64>,
    last_target: String,
}

/// Stateful detector; feed it every datapath event in timestamp order.
pub struct AlertDetector {
    cfg: AlertConfig,
    /// Keyed by (0, source address): per host, across interfaces.
    scans: HashMap<(u32, IpAddr), ScanState>,
    spoofs: HashMap<(u32, u8, IpAddr), SpoofState>,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl AlertDetector {
    pub fn new(cfg: AlertConfig) -> Self {
        AlertDetector {
            cfg,
            scans: HashMap::new(),
            spoofs: HashMap::new(),
        }
    }

    /// Observe one event; returns alerts to record (usually none).
    pub fn observe(&mut self, e: &abi::FlowEvent, names: &dyn Names) -> Vec<Event> {
        match e.kind {
            abi::EVENT_SPOOF => self.spoof(e, names).into_iter().collect(),
            abi::EVENT_DENY | abi::EVENT_REJECT | abi::EVENT_MONITOR => {
                self.scan(e, names).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    fn spoof(&mut self, e: &abi::FlowEvent, names: &dyn Names) -> Option<Event> {
        let src = event_ip(&e.src, e.family);
        let dst = event_ip(&e.dst, e.family);
        let cooldown = ns(self.cfg.cooldown);
        let st = self.spoofs.entry((e.ifindex, e.reason, src)).or_default();
        if st.count == 0 {
            st.first = e.timestamp_ns;
        }
        st.count += 1 + u64::from(e.suppressed_before);
        st.last = e.timestamp_ns;
        st.last_target = dst.to_string();
        if st
            .alerted_at
            .is_some_and(|t| e.timestamp_ns < t.saturating_add(cooldown))
        {
            return None;
        }
        st.alerted_at = Some(e.timestamp_ns);
        let vm = names.vm_of_ifindex(e.ifindex);
        let ev = Event::Alert(AlertRecord {
            attack: reason_name(e.reason).into(),
            source_ip: src.to_string(),
            source_vm: vm.clone(),
            target: st.last_target.clone(),
            host: names.host().to_string(),
            first_seen: format_ts(names.wall_time(st.first)),
            last_seen: format_ts(names.wall_time(st.last)),
            count: st.count,
            detail: format!(
                "{} from interface {} ({}): source address/MAC not owned by the VM, dropped",
                reason_name(e.reason),
                e.ifindex,
                vm.as_deref().unwrap_or("unknown VM")
            ),
        });
        st.count = 0;
        Some(ev)
    }

    fn scan(&mut self, e: &abi::FlowEvent, names: &dyn Names) -> Option<Event> {
        let src = event_ip(&e.src, e.family);
        let dst = event_ip(&e.dst, e.family);
        let window = ns(self.cfg.scan_window);
        let cooldown = ns(self.cfg.cooldown);
        // Key by source address across all interfaces of the host: an external or remote
        // scanner shows up as ingress denies on many local VMs' interfaces, a local scanner
        // as egress denies on its own.
        let st = self.scans.entry((0, src)).or_default();
        if st.targets.is_empty() || e.timestamp_ns >= st.window_start.saturating_add(window) {
            st.window_start = e.timestamp_ns;
            st.targets.clear();
            st.hosts.clear();
            st.ports.clear();
            st.first = e.timestamp_ns;
            st.denied = 0;
        }
        st.targets.insert((dst, e.dport));
        st.hosts.insert(dst);
        st.ports.insert(e.dport);
        st.denied += 1 + u64::from(e.suppressed_before);
        if st.targets.len() < self.cfg.scan_min_targets {
            return None;
        }
        if st
            .alerted_at
            .is_some_and(|t| e.timestamp_ns < t.saturating_add(cooldown))
        {
            return None;
        }
        st.alerted_at = Some(e.timestamp_ns);
        let kind = if st.hosts.len() == 1 {
            "port scan"
        } else if st.ports.len() == 1 {
            "host sweep"
        } else {
            "network scan"
        };
        let mut sample: Vec<String> = st
            .targets
            .iter()
            .take(5)
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        sample.sort();
        let target = if st.hosts.len() == 1 {
            format!("{dst} ({} ports)", st.ports.len())
        } else {
            format!("{} hosts / {} ports", st.hosts.len(), st.ports.len())
        };
        Some(Event::Alert(AlertRecord {
            attack: "scan".into(),
            source_ip: src.to_string(),
            source_vm: if e.direction == abi::DIR_EGRESS {
                names.vm_of_ifindex(e.ifindex)
            } else {
                None
            }
            .or_else(|| names.vm_of_ip(&src)),
            target,
            host: names.host().to_string(),
            first_seen: format_ts(names.wall_time(st.first)),
            last_seen: format_ts(names.wall_time(e.timestamp_ns)),
            count: st.denied,
            detail: format!(
                "{kind}: {} distinct denied targets within {:?} (e.g. {})",
                st.targets.len(),
                self.cfg.scan_window,
                sample.join(", ")
            ),
        }))
    }

    /// Forget state older than `horizon` before `now_ns` (call periodically).
    pub fn expire(&mut self, now_ns: u64, horizon: Duration) {
        let h = ns(horizon);
        self.scans
            .retain(|_, s| s.window_start.saturating_add(h) > now_ns);
        self.spoofs.retain(|_, s| s.last.saturating_add(h) > now_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tests::{ev, names};

    #[test]
    fn scan_alert_after_threshold_then_cooldown() {
        let n = names();
        let mut d = AlertDetector::new(AlertConfig::default());
        let mut alerts = Vec::new();
        // 19 distinct ports on one host: below threshold.
        for p in 0..19u16 {
            alerts.extend(d.observe(
                &ev(
                    1000 + u64::from(p),
                    abi::EVENT_DENY,
                    [10, 0, 0, 9],
                    1000 + p,
                    60,
                ),
                &n,
            ));
        }
        assert!(alerts.is_empty());
        // Repeats of the same target do not count as new targets.
        for _ in 0..50 {
            alerts.extend(d.observe(&ev(1100, abi::EVENT_DENY, [10, 0, 0, 9], 1000, 60), &n));
        }
        assert!(alerts.is_empty());
        alerts.extend(d.observe(&ev(1200, abi::EVENT_DENY, [10, 0, 0, 9], 2000, 60), &n));
        assert_eq!(alerts.len(), 1);
        let Event::Alert(a) = &alerts[0] else {
            panic!()
        };
        assert_eq!(a.attack, "scan");
        assert_eq!(a.source_ip, "10.0.0.7");
        assert_eq!(a.source_vm.as_deref(), Some("web-01"));
        assert_eq!(a.target, "10.0.0.9 (20 ports)");
        assert_eq!(a.count, 70);
        assert!(a.detail.starts_with("port scan"));
        assert_eq!(a.first_seen, "2026-09-21T14:13:21.000000+00:00");
        // Cooldown: more targets do not alert again within 60 s.
        for p in 0..100u16 {
            assert!(d
                .observe(&ev(1300, abi::EVENT_DENY, [10, 0, 1, p as u8], 22, 60), &n)
                .is_empty());
        }
        // Allowed traffic never counts.
        let mut d = AlertDetector::new(AlertConfig::default());
        for p in 0..100u16 {
            assert!(d
                .observe(&ev(1000, abi::EVENT_ALLOW_LOG, [10, 0, 0, 9], p, 60), &n)
                .is_empty());
        }
        // A sweep spread over more than the window does not alert.
        for p in 0..40u16 {
            let t = 1000 + u64::from(p) * 1000;
            assert!(d
                .observe(&ev(t, abi::EVENT_DENY, [10, 0, 2, p as u8], 22, 60), &n)
                .is_empty());
        }
    }

    #[test]
    fn external_sweep_across_local_vms_alerts() {
        let n = names();
        let mut d = AlertDetector::new(AlertConfig::default());
        let mut alerts = Vec::new();
        for i in 0..20u32 {
            let mut e = ev(1000 + u64::from(i), abi::EVENT_DENY, [10, 0, 0, 9], 22, 60);
            e.direction = abi::DIR_INGRESS;
            e.ifindex = 100 + i;
            e.src = abi::v4_mapped([203, 0, 113, 5]);
            e.dst = abi::v4_mapped([10, 0, 3, i as u8]);
            alerts.extend(d.observe(&e, &n));
        }
        assert_eq!(alerts.len(), 1);
        let Event::Alert(a) = &alerts[0] else {
            panic!()
        };
        assert_eq!(a.source_ip, "203.0.113.5");
        assert_eq!(a.source_vm, None);
        assert_eq!(a.target, "20 hosts / 1 ports");
        assert!(a.detail.starts_with("host sweep"));
    }

    #[test]
    fn spoof_alert_with_fields_and_rate_limit() {
        let n = names();
        let mut d = AlertDetector::new(AlertConfig::default());
        let mut e = ev(5000, abi::EVENT_SPOOF, [10, 0, 0, 9], 80, 60);
        e.reason = abi::REASON_SPOOF_IP;
        e.src = abi::v4_mapped([10, 0, 0, 99]);
        let a = d.observe(&e, &n);
        assert_eq!(a.len(), 1);
        let Event::Alert(r) = &a[0] else { panic!() };
        assert_eq!(r.attack, "spoof_ip");
        assert_eq!(r.source_ip, "10.0.0.99");
        assert_eq!(r.source_vm.as_deref(), Some("web-01"));
        assert_eq!(r.target, "10.0.0.9");
        assert_eq!(r.host, "hv-01");
        assert_eq!(r.count, 1);
        for i in 0..10 {
            e.timestamp_ns += 1_000_000;
            assert!(d.observe(&e, &n).is_empty(), "{i}");
        }
        e.timestamp_ns += 61_000_000_000;
        let a = d.observe(&e, &n);
        let Event::Alert(r) = &a[0] else { panic!() };
        assert_eq!(r.count, 11);
    }
}
