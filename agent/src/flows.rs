//! Flow events from the datapath, aggregated until the session forwards them.
//!
//! Identical flows (same endpoint, kind, direction, 5-tuple) within one flush interval become
//! one record with packet and byte counts. While the controller is away the buffer is
//! bounded; what does not fit is counted and reported as suppressed — never silently lost.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulkhead_abi::FlowEvent;
use bulkhead_datapath::events::EventReader;
use bulkhead_wire::pb;

use crate::enforcer::Names;

pub const MAX_PENDING: usize = 100_000;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    epoch: u32,
    slot: u32,
    rule: u32,
    kind: u8,
    direction: u8,
    reason: u8,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    family: u8,
}

struct FlowAgg {
    first_ns: u64,
    last_ns: u64,
    packets: u64,
    bytes: u64,
}

#[derive(Default)]
pub struct Pending {
    flows: HashMap<FlowKey, FlowAgg>,
    /// Suppressed in the kernel plus dropped here, since the last take.
    pub suppressed: u64,
    pub dropped_here: u64,
}

impl Pending {
    fn add(&mut self, e: &FlowEvent) {
        self.suppressed += u64::from(e.suppressed_before);
        let key = FlowKey {
            epoch: e.epoch,
            slot: e.slot,
            rule: e.rule,
            kind: e.kind,
            direction: e.direction,
            reason: e.reason,
            proto: e.proto,
            src: e.src,
            dst: e.dst,
            sport: e.sport,
            dport: e.dport,
            family: e.family,
        };
        if let Some(a) = self.flows.get_mut(&key) {
            a.last_ns = a.last_ns.max(e.timestamp_ns);
            a.packets += 1;
            a.bytes += u64::from(e.packet_len);
        } else if self.flows.len() >= MAX_PENDING {
            self.suppressed += 1;
            self.dropped_here += 1;
        } else {
            self.flows.insert(
                key,
                FlowAgg {
                    first_ns: e.timestamp_ns,
                    last_ns: e.timestamp_ns,
                    packets: 1,
                    bytes: u64::from(e.packet_len),
                },
            );
        }
    }

    /// Everything pending as wire records, names resolved; the buffer is emptied.
    pub fn take(&mut self, names: &RwLock<Names>) -> pb::FlowEvents {
        let offset = boot_to_unix_offset_ns();
        let names = names.read().ok();
        let records = self
            .flows
            .drain()
            .map(|(k, a)| {
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
        let out = pb::FlowEvents {
            records,
            suppressed: self.suppressed,
        };
        self.suppressed = 0;
        out
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty() && self.suppressed == 0
    }
}

/// Unix time minus boot time, in ns: converts `bpf_ktime_get_boot_ns` stamps.
fn boot_to_unix_offset_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let boot = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    unix - boot
}

/// Read the ring buffer on a thread of its own, forever.
pub fn spawn_reader(mut reader: EventReader, pending: Arc<Mutex<Pending>>) {
    let _ = std::thread::Builder::new()
        .name("flow-events".into())
        .spawn(move || loop {
            reader.wait(Duration::from_millis(200));
            let mut batch = Vec::new();
            reader.drain(|e| batch.push(e));
            if batch.is_empty() {
                continue;
            }
            if let Ok(mut p) = pending.lock() {
                for e in &batch {
                    p.add(e);
                }
            }
        });
}
