//! Flow verdict records from datapath events ([`bulkhead_abi::FlowEvent`]): name resolution and
//! an aggregator that folds identical repeating flows (packets, bytes, first/last seen).
//!
//! The agent reads the `EVENTS` ring, calls [`FlowAggregator::add`] for each event (and
//! [`crate::alerts::AlertDetector::observe`]), and every second calls
//! [`FlowAggregator::flush`] and submits the returned records to the recorder. Nothing is lost
//! silently: events the kernel suppressed (`suppressed_before`) are carried in the records'
//! `suppressed` field, and when the aggregation table is full the overflow is counted and
//! flushed as an `events_dropped` record.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bulkhead_abi as abi;
use time::OffsetDateTime;

use crate::record::{format_ts, Event, FlowRecord};

/// Tier / policy / rule a datapath rule index stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleInfo {
    pub tier: Option<String>,
    pub policy: Option<String>,
    pub name: Option<String>,
}

/// Names the agent resolves (inventory + the compiled revision).
pub trait Names {
    fn host(&self) -> &str;
    /// VM owning the interface.
    fn vm_of_ifindex(&self, ifindex: u32) -> Option<String>;
    /// VM owning an address (any host).
    fn vm_of_ip(&self, ip: &IpAddr) -> Option<String>;
    /// Rule `rule` of the revision active at `epoch`.
    fn rule(&self, epoch: u32, rule: u32) -> Option<RuleInfo>;
    /// Wall-clock time of a `bpf_ktime_get_boot_ns()` timestamp.
    fn wall_time(&self, boot_ns: u64) -> OffsetDateTime;
}

/// A simple map-backed [`Names`] (tests, and a starting point for the agent).
#[derive(Clone, Debug, Default)]
pub struct StaticNames {
    pub host: String,
    pub ifindex_vm: HashMap<u32, String>,
    pub ip_vm: HashMap<IpAddr, String>,
    pub rules: HashMap<(u32, u32), RuleInfo>,
    /// Wall clock minus boot clock, in ns (see [`boot_offset_ns`]).
    pub boot_offset_ns: i128,
}

impl Names for StaticNames {
    fn host(&self) -> &str {
        &self.host
    }
    fn vm_of_ifindex(&self, ifindex: u32) -> Option<String> {
        self.ifindex_vm.get(&ifindex).cloned()
    }
    fn vm_of_ip(&self, ip: &IpAddr) -> Option<String> {
        self.ip_vm.get(ip).cloned()
    }
    fn rule(&self, epoch: u32, rule: u32) -> Option<RuleInfo> {
        self.rules.get(&(epoch, rule)).cloned()
    }
    fn wall_time(&self, boot_ns: u64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(boot_ns) + self.boot_offset_ns)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// `CLOCK_REALTIME - CLOCK_BOOTTIME` now, in ns.
pub fn boot_offset_ns() -> i128 {
    let get = |clk| {
        // SAFETY: clock_gettime writes a timespec.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clk, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    get(libc::CLOCK_REALTIME) - get(libc::CLOCK_BOOTTIME)
}

/// Address of an event field (v4-mapped for IPv4).
pub fn event_ip(addr: &[u8; 16], family: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match (family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) | (0, Some(v4)) => IpAddr::V4(v4),
        (4, None) => IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15])),
        _ => IpAddr::V6(v6),
    }
}

pub fn verdict_name(kind: u8) -> &'static str {
    match kind {
        abi::EVENT_DENY => "deny",
        abi::EVENT_MONITOR => "monitor",
        abi::EVENT_ALLOW_LOG => "allow_log",
        abi::EVENT_REJECT => "reject",
        abi::EVENT_SPOOF => "spoof",
        abi::EVENT_REVOKED => "revoked",
        abi::EVENT_BOOTSTRAP => "bootstrap",
        _ => "unknown",
    }
}

pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        abi::REASON_POLICY => "policy",
        abi::REASON_SPOOF_MAC => "spoof_mac",
        abi::REASON_SPOOF_IP => "spoof_ip",
        abi::REASON_SPOOF_ARP => "spoof_arp",
        abi::REASON_SPOOF_ND => "spoof_nd",
        abi::REASON_ROGUE_DHCP => "rogue_dhcp",
        abi::REASON_ROGUE_RA => "rogue_ra",
        abi::REASON_BOOTSTRAP => "bootstrap",
        abi::REASON_REVOKED => "revoked",
        _ => "unknown",
    }
}

pub fn direction_name(d: u8) -> &'static str {
    match d {
        abi::DIR_INGRESS => "ingress",
        abi::DIR_EGRESS => "egress",
        _ => "unknown",
    }
}

/// What makes two events "the same flow".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub kind: u8,
    pub reason: u8,
    pub direction: u8,
    pub proto: u8,
    pub family: u8,
    pub ifindex: u32,
    /// Endpoint slot in the tables of `epoch` (stable per interface; names the endpoint).
    pub slot: u32,
    pub epoch: u32,
    pub rule: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    pub fn of(e: &abi::FlowEvent) -> Self {
        FlowKey {
            kind: e.kind,
            reason: e.reason,
            direction: e.direction,
            proto: e.proto,
            family: e.family,
            ifindex: e.ifindex,
            slot: e.slot,
            epoch: e.epoch,
            rule: e.rule,
            src: e.src,
            dst: e.dst,
            sport: e.sport,
            dport: e.dport,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowAgg {
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub suppressed: u64,
}

/// Folds identical flows over a window. Pure: no I/O, no clock (times come from the events).
pub struct FlowAggregator {
    window_ns: u64,
    max_entries: usize,
    map: HashMap<FlowKey, FlowAgg>,
    overflow: u64,
    /// Totals, for accounting.
    pub events_in: u64,
    pub records_out: u64,
}

impl FlowAggregator {
    /// `window`: how long a flow is folded before it is emitted. `max_entries`: table bound.
    pub fn new(window: Duration, max_entries: usize) -> Self {
        FlowAggregator {
            window_ns: window.as_nanos().min(u128::from(u64::MAX)) as u64,
            max_entries: max_entries.max(1),
            map: HashMap::new(),
            overflow: 0,
            events_in: 0,
            records_out: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn add(&mut self, e: &abi::FlowEvent) {
        self.events_in += 1;
        let key = FlowKey::of(e);
        let len = u64::from(e.packet_len);
        let suppressed = u64::from(e.suppressed_before);
        if let Some(a) = self.map.get_mut(&key) {
            a.packets += 1;
            a.bytes += len;
            a.first_ns = a.first_ns.min(e.timestamp_ns);
            a.last_ns = a.last_ns.max(e.timestamp_ns);
            a.suppressed += suppressed;
        } else if self.map.len() < self.max_entries {
            self.map.insert(
                key,
                FlowAgg {
                    packets: 1,
                    bytes: len,
                    first_ns: e.timestamp_ns,
                    last_ns: e.timestamp_ns,
                    suppressed,
                },
            );
        } else {
            self.overflow += 1 + suppressed;
        }
    }

    /// Events not folded into any flow since the last drain (table full), kernel-suppressed
    /// counts of those events included.
    pub fn overflow(&self) -> u64 {
        self.overflow
    }

    /// Take the flows first seen at least `window` before `now_boot_ns` (all when `force`),
    /// oldest first, with the overflow count since the last drain (which is reset).
    pub fn drain(&mut self, now_boot_ns: u64, force: bool) -> (Vec<(FlowKey, FlowAgg)>, u64) {
        let mut due: Vec<(FlowKey, FlowAgg)> = Vec::new();
        let w = self.window_ns;
        self.map.retain(|k, a| {
            if force || a.first_ns.saturating_add(w) <= now_boot_ns {
                due.push((*k, *a));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|(_, a)| a.first_ns);
        self.records_out += due.len() as u64;
        (due, std::mem::take(&mut self.overflow))
    }

    /// Emit flows first seen at least `window` before `now_boot_ns` (all when `force`),
    /// plus an `events_dropped` record for any overflow.
    pub fn flush(&mut self, now_boot_ns: u64, names: &dyn Names, force: bool) -> Vec<Event> {
        let (due, overflow) = self.drain(now_boot_ns, force);
        let mut out: Vec<Event> = due.iter().map(|(k, a)| to_record(k, a, names)).collect();
        if overflow > 0 {
            out.push(Event::EventsDropped {
                source: format!("flow-aggregator@{}", names.host()),
                count: overflow,
                reason: "aggregation table full: flow events counted, not stored individually"
                    .into(),
            });
        }
        out
    }
}

/// Build the flow record for an aggregated flow.
pub fn to_record(k: &FlowKey, a: &FlowAgg, names: &dyn Names) -> Event {
    let src = event_ip(&k.src, k.family);
    let dst = event_ip(&k.dst, k.family);
    let rule = names.rule(k.epoch, k.rule).unwrap_or_default();
    let vm = names
        .vm_of_ifindex(k.ifindex)
        .unwrap_or_else(|| format!("ifindex:{}", k.ifindex));
    Event::FlowVerdict(FlowRecord {
        verdict: verdict_name(k.kind).into(),
        reason: reason_name(k.reason).into(),
        direction: direction_name(k.direction).into(),
        proto: k.proto,
        src_ip: src.to_string(),
        dst_ip: dst.to_string(),
        src_port: k.sport,
        dst_port: k.dport,
        vm,
        src_vm: names.vm_of_ip(&src),
        dst_vm: names.vm_of_ip(&dst),
        ifindex: k.ifindex,
        host: names.host().to_string(),
        tier: rule.tier,
        policy: rule.policy,
        rule: k.rule,
        rule_name: rule.name,
        epoch: k.epoch,
        packets: a.packets,
        bytes: a.bytes,
        first_seen: format_ts(names.wall_time(a.first_ns)),
        last_seen: format_ts(names.wall_time(a.last_ns)),
        suppressed: a.suppressed,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn names() -> StaticNames {
        let mut n = StaticNames {
            host: "hv-01".into(),
            boot_offset_ns: 1_790_000_000_000_000_000,
            ..Default::default()
        };
        n.ifindex_vm.insert(7, "web-01".into());
        n.ip_vm.insert("10.0.0.7".parse().unwrap(), "web-01".into());
        n.ip_vm.insert("10.0.0.9".parse().unwrap(), "db-01".into());
        n.rules.insert(
            (3, 12),
            RuleInfo {
                tier: Some("app".into()),
                policy: Some("db-access".into()),
                name: Some("deny-web-to-db-ssh".into()),
            },
        );
        n
    }

    pub fn ev(ts_ms: u64, kind: u8, dst: [u8; 4], dport: u16, len: u32) -> abi::FlowEvent {
        abi::FlowEvent {
            timestamp_ns: ts_ms * 1_000_000,
            ifindex: 7,
            slot: 1,
            epoch: 3,
            rule: 12,
            identity: 100,
            packet_len: len,
            suppressed_before: 0,
            src: abi::v4_mapped([10, 0, 0, 7]),
            dst: abi::v4_mapped(dst),
            sport: 40000,
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

    #[test]
    fn folds_identical_flows() {
        let n = names();
        let mut a = FlowAggregator::new(Duration::from_secs(10), 1000);
        for i in 0..100 {
            a.add(&ev(1000 + i * 10, abi::EVENT_DENY, [10, 0, 0, 9], 22, 60));
        }
        let mut other = ev(1500, abi::EVENT_DENY, [10, 0, 0, 9], 23, 60);
        other.suppressed_before = 42;
        a.add(&other);
        assert_eq!(a.len(), 2);
        // Not due yet.
        assert!(a.flush(5_000 * 1_000_000, &n, false).is_empty());
        let out = a.flush(12_000 * 1_000_000, &n, false);
        assert_eq!(out.len(), 2);
        let Event::FlowVerdict(f) = &out[0] else {
            panic!()
        };
        assert_eq!(f.packets, 100);
        assert_eq!(f.bytes, 6000);
        assert_eq!(f.verdict, "deny");
        assert_eq!(f.direction, "egress");
        assert_eq!(f.src_ip, "10.0.0.7");
        assert_eq!(f.dst_vm.as_deref(), Some("db-01"));
        assert_eq!(f.vm, "web-01");
        assert_eq!(f.rule_name.as_deref(), Some("deny-web-to-db-ssh"));
        assert_eq!(f.tier.as_deref(), Some("app"));
        assert_eq!(f.first_seen, "2026-09-21T14:13:21.000000+00:00");
        assert_eq!(f.last_seen, "2026-09-21T14:13:21.990000+00:00");
        let Event::FlowVerdict(g) = &out[1] else {
            panic!()
        };
        assert_eq!(g.suppressed, 42);
        assert!(a.is_empty());
    }

    #[test]
    fn overflow_is_counted() {
        let n = names();
        let mut a = FlowAggregator::new(Duration::from_secs(1), 2);
        for p in 0..5 {
            a.add(&ev(0, abi::EVENT_DENY, [10, 0, 0, 9], p, 60));
        }
        let out = a.flush(0, &n, true);
        assert_eq!(out.len(), 3);
        assert!(matches!(out[2], Event::EventsDropped { count: 3, .. }));
    }
}
