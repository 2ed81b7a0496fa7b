//! Flow events to userspace, rate-limited per endpoint in the kernel. Every event not
//! delivered is counted (per endpoint and globally) and the next delivered event for the
//! endpoint carries how many were suppressed before it: loss is never silent.
use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use bulkhead_abi::*;

use crate::{
    maps::{stat, EP_STATS, EVENTS, EVENT_BUDGET},
    parse::Pkt,
};

pub struct EventInfo {
    pub kind: u8,
    pub reason: u8,
    pub direction: u8,
    pub ifindex: u32,
    pub slot: u32,
    pub epoch: u32,
    pub rule: u32,
    pub identity: u32,
    pub packet_len: u32,
}

/// A BPF subprogram; the record is written straight into the ring buffer.
#[inline(never)]
pub fn emit(cfg_rate: u32, info: &EventInfo, pkt: Option<&Pkt>) {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let limit = if cfg_rate == 0 {
        DEFAULT_EVENT_RATE
    } else {
        cfg_rate
    };
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(info.slot) else {
        return;
    };
    // SAFETY: per-CPU value.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.window_start_ns) >= SEC {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= limit {
        suppressed(budget, info.slot, STAT_EVENTS_RATE_LIMITED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        suppressed(budget, info.slot, STAT_EVENTS_RING_FULL);
        return;
    };
    // SAFETY: every field is written below before submit (the padding too).
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.timestamp_ns = now;
    ev.ifindex = info.ifindex;
    ev.slot = info.slot;
    ev.epoch = info.epoch;
    ev.rule = info.rule;
    ev.identity = info.identity;
    ev.packet_len = info.packet_len;
    ev.suppressed_before = budget.suppressed;
    ev.kind = info.kind;
    ev.direction = info.direction;
    ev.reason = info.reason;
    ev._pad = [0; 10];
    match pkt {
        Some(p) => {
            ev.src = p.src;
            ev.dst = p.dst;
            ev.sport = p.sport;
            ev.dport = if p.is_icmp() { p.port_key } else { p.dport };
            ev.proto = p.proto;
            ev.family = p.family;
            ev.tcp_flags = p.tcp_flags;
        }
        None => {
            ev.src = [0; 16];
            ev.dst = [0; 16];
            ev.sport = 0;
            ev.dport = 0;
            ev.proto = 0;
            ev.family = 0;
            ev.tcp_flags = 0;
        }
    }
    entry.submit(0);
    budget.sent += 1;
    budget.suppressed = 0;
    stat(STAT_EVENTS_SENT);
}

#[inline(always)]
fn suppressed(budget: &mut EventBudget, slot: u32, counter: u32) {
    budget.suppressed = budget.suppressed.wrapping_add(1);
    stat(counter);
    if let Some(s) = EP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value.
        unsafe { (*s).events_suppressed += 1 };
    }
}
