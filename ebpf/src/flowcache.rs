//! The per-CPU flow cache: an exact-match cache of established IPv4 flows in front of
//! conntrack, read straight from the packet (no helper call, no copy, no hash-table
//! lookup). A packet that hits it passes, counted in its slot; anything else goes on to the
//! fast path (`fast.rs`), which fills the cache when it passes a packet.
//!
//! Counting: a hit adds to its slot's `pending` (its own cache line, already read) what the
//! fast path would add to `RULE_STATS`, `EP_STATS` and `DP_STATS` (six more lines). The
//! fast path moves a slot's pending hits into those counters before it overwrites the slot
//! ([`fill`]), and userspace runs the flush program ([`flush_all`]) on every CPU before it
//! reads them, so readers see exact counters that never go back. See [`flush_slot`] for why
//! the flush program and TC programs cannot spoil each other's updates.
//!
//! Why a hit passes what the fast path would, without looking at conntrack:
//! - a slot is filled by the fast path for one packet-direction tuple (interface, direction,
//!   source, destination, ports, protocol) after every check of that path passed, and it
//!   carries the policy epoch: a policy swap (new epoch) ends every slot, and the tables of
//!   an epoch never change;
//! - the hit path repeats every check that depends on the packet (Ethernet type, no IP
//!   options, no fragment, TCP without SYN/FIN/RST, the VM's source MAC); the checks that
//!   depend on the tuple alone hold through the match (the fast path fills TCP and UDP
//!   flows outside the DHCP ports only);
//! - the entry behind a slot changes only through the full path (the fast path passes
//!   packets that change nothing), and the full path bumps the flow's generation
//!   (`FLOW_GEN`, per hash of addresses and ports, both directions alike) whenever it creates
//!   an entry (a reused or re-created tuple) or moves a TCP entry to another state (FIN, RST,
//!   the handshake): a slot carries the generation read before the entry it was filled
//!   from, so it stops matching on every CPU at once;
//! - a slot lives at most `FLOW_CACHE_TTL` (1 s) and never past the entry's expiry; then the
//!   fast path looks at the entry again and refreshes its expiry (within a tenth of the
//!   refresh slack, so expiries stay within the lifetime and the slack of exact). The
//!   lifetime is counted in jiffies, each taken as the longest one (`MAX_JIFFY_NS`, HZ=100),
//!   so it is shorter at a higher tick rate: reading `jiffies` costs a load, not a helper;
//! - what a slot cannot see is an entry removed behind the datapath's back: LRU eviction
//!   from a full table. A cached flow then keeps passing for at most its slot's lifetime;
//!   then the full path judges its packets as new flows. (A hot flow is also looked up in
//!   the table only once a lifetime per CPU and direction, so under eviction pressure it
//!   looks colder to the LRU than it is.)
//!
//! Assumes a CPU with efficient unaligned loads (x86-64, arm64: the verifier allows them on
//! packet data there) and HZ >= 100. IPv6 flows take the fast path (their tuple would not
//! fit the slot's cache line).

use aya_ebpf::{helpers::bpf_jiffies64, programs::TcContext};
use bulkhead_abi::*;

use core::sync::atomic::{compiler_fence, Ordering};

use crate::{
    datapath::PASS,
    maps::{CONFIG, CPU_STATE, DP_STATS, EP_STATS, FLOW_GEN, RULE_STATS},
    parse::{Pkt, IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Sets per CPU (chosen by a hash of the tuple), of [`FLOW_WAYS`] slots each: two flows
/// whose tuples hash alike (the two directions of one connection, say) both stay cached.
pub const FLOW_SETS: usize = 128;
/// Slots per set: the most recently filled first.
pub const FLOW_WAYS: usize = 2;

/// One cached flow: the tuple as the packet carries it, packed into three words the hit
/// path compares whole (loads from the packet in network byte order, as they lie), what it
/// needs to pass the packet, and the hits not yet added to the counters.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowSlot {
    /// Source address in the low half, destination in the high half (packet bytes 26..34).
    pub addrs: u64,
    /// The ports word (packet bytes 34..38, source port first) in the low half, the
    /// interface in the high half.
    pub ports_if: u64,
    /// Policy epoch, protocol and direction (see [`tag`]).
    pub tag: u64,
    /// `bpf_jiffies64()` until which the slot may be used; 0 = empty.
    pub valid_until: u64,
    /// The VM's MAC as [`source_mac`] reads it, compared on packets the VM sends.
    pub mac: u64,
    /// Hits not yet in the counters: packets times [`PENDING_PACKET`] plus bytes (see
    /// [`flush_slot`]).
    pub pending: u64,
    /// `RULE_STATS` index of the rule that admitted the flow (in the slot's epoch).
    pub rule_index: u32,
    /// `EP_STATS` slot of the endpoint, with [`SLOT_EP_MONITOR`] when the flow passes as a
    /// monitor would-deny.
    pub ep: u32,
    /// `FLOW_GEN` of the flow when the fast path looked its entry up.
    pub gen: u32,
    pub _pad: u32,
}

/// One packet in [`FlowSlot::pending`]: the low 40 bits count bytes (a terabyte), the high
/// 24 packets.
pub const PENDING_PACKET: u64 = 1 << 40;
/// A hit leaves a slot whose pending packets reach 2^23 to the fast path, which flushes it
/// as it refills it: neither field can overflow (a slot lives at most a second anyway).
const PENDING_FULL: u64 = 1 << 63;
/// [`FlowSlot::ep`]'s flag for a flow admitted as a monitor would-deny.
pub const SLOT_EP_MONITOR: u32 = 1 << 31;

const _: () = assert!(MAX_ENDPOINTS < SLOT_EP_MONITOR);

// One cache line per slot (where the per-CPU value's placement lets it be).
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 64);

/// A slot's `tag`: whatever else must match besides addresses, ports and interface.
#[inline(always)]
pub fn tag(epoch: u32, proto: u8, dir: u8) -> u64 {
    u64::from(epoch) | u64::from(proto) << 32 | u64::from(dir) << 40
}

/// A slot's `addrs` or `ports_if` from two words.
#[inline(always)]
pub fn pair(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | u64::from(hi) << 32
}

/// A MAC address as [`source_mac`] reads it from a frame.
#[inline(always)]
pub fn mac_word(m: &[u8; 6]) -> u64 {
    u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// Entries of `FLOW_GEN`.
pub const FLOW_GENS: u32 = 4096;

/// Ethernet + IPv4 without options + a UDP header: the shortest frame a hit can be.
const V4_MIN: usize = 14 + 20 + 8;
/// Through the TCP flags byte.
const V4_TCP: usize = 14 + 20 + 14;

/// Loads from the packet at any alignment. The BPF backend turns a Rust load it cannot
/// prove aligned into byte loads and shifts; the kernel allows unaligned packet loads on
/// this architecture (the verifier checks packet alignment only where the CPU needs it),
/// so one instruction does.
mod pkt {
    use core::arch::asm;

    /// A 32-bit word at `p`, as it lies in memory.
    ///
    /// # Safety
    /// `p..p + 4` lies within the packet (bounds checked against `data_end` by the caller).
    #[inline(always)]
    pub unsafe fn word(p: usize) -> u32 {
        let v: u64;
        // SAFETY: per the caller; a plain load, no side effects.
        unsafe {
            asm!("{v} = *(u32 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
                 options(readonly, nostack, preserves_flags));
        }
        v as u32
    }

    /// A 64-bit word at `p`, as it lies in memory.
    ///
    /// # Safety
    /// As for [`word`], for eight bytes.
    #[inline(always)]
    pub unsafe fn dword(p: usize) -> u64 {
        let v: u64;
        // SAFETY: per the caller.
        unsafe {
            asm!("{v} = *(u64 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
                 options(readonly, nostack, preserves_flags));
        }
        v
    }

    /// A 16-bit half word at `p`, as it lies in memory.
    ///
    /// # Safety
    /// As for [`word`], for two bytes.
    #[inline(always)]
    pub unsafe fn half(p: usize) -> u16 {
        let v: u64;
        // SAFETY: per the caller.
        unsafe {
            asm!("{v} = *(u16 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
                 options(readonly, nostack, preserves_flags));
        }
        v as u16
    }

    /// The byte at `p`.
    ///
    /// # Safety
    /// `p` lies within the packet.
    #[inline(always)]
    pub unsafe fn byte(p: usize) -> u8 {
        // SAFETY: per the caller; bytes have no alignment.
        unsafe { *(p as *const u8) }
    }
}

#[inline(always)]
fn set_index(addrs: u64, ports_if: u64) -> usize {
    // Multiplicative hashing of a fold of the tuple: cheap, and a slot is checked in full.
    let x = (addrs as u32)
        ^ ((addrs >> 32) as u32).rotate_left(16)
        ^ ports_if as u32
        ^ ((ports_if >> 32) as u32).rotate_left(8);
    (x.wrapping_mul(0x9e37_79b1) >> 25) as usize % FLOW_SETS
}

/// The `FLOW_GEN` entry of a flow: the same for both directions (and every interface).
#[inline(always)]
fn gen_index(saddr: u32, daddr: u32, ports: u32) -> u32 {
    let x = saddr ^ daddr ^ (ports & 0xffff) ^ (ports >> 16);
    (x.wrapping_mul(0x9e37_79b1) >> 20) % FLOW_GENS
}

/// The flow's generation now. The fast path reads it before its conntrack lookup, the full
/// path bumps it after changing the entry: a slot filled from an entry older than a bump
/// carries an older generation.
#[inline(always)]
pub fn current_gen(saddr: u32, daddr: u32, ports: u32) -> u32 {
    match FLOW_GEN.get_ptr(gen_index(saddr, daddr, ports)) {
        // SAFETY: a valid map value; a volatile read keeps it before the lookup that follows.
        Some(g) => unsafe { core::ptr::read_volatile(g) },
        None => 0,
    }
}

/// End every slot of the flow of `p` on every CPU (the full path created its conntrack
/// entry or changed its TCP state). Only TCP and UDP over IPv4 are cached.
#[inline(always)]
pub fn invalidate(p: &Pkt) {
    if p.family != 4 || (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) {
        return;
    }
    let word = |a: &[u8; 16]| u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    // The ports word as the hit path reads it: network byte order, source first.
    let ports = u32::from(p.sport.to_be()) | u32::from(p.dport.to_be()) << 16;
    if let Some(g) = FLOW_GEN.get_ptr_mut(gen_index(word(&p.src), word(&p.dst), ports)) {
        // SAFETY: a valid map value. Concurrent bumps may lose one another's increment; the
        // value still differs from every generation read before them.
        unsafe { core::ptr::write_volatile(g, core::ptr::read_volatile(g).wrapping_add(1)) };
    }
}

/// Whether a slot is for this packet-direction tuple in this epoch.
#[inline(always)]
fn is_flow(s: &FlowSlot, addrs: u64, ports_if: u64, tag: u64) -> bool {
    s.addrs == addrs && s.ports_if == ports_if && s.tag == tag
}

/// `PASS` for a packet of a cached flow (counted), or `None` for the fast path.
///
/// Kept short on purpose: in the real path a hit costs mostly the cache lines it touches
/// (its own instructions among them), and what it evicts costs the network stack later.
#[inline(always)]
pub fn hit(ctx: &TcContext, dir: u8, ifindex: u32, cfg: &Config) -> Option<i32> {
    // The per-CPU value first: fewer values live across the lookup (a helper call to the
    // compiler), so fewer stack slots in a frame shared with the full path.
    let st = CPU_STATE.get_ptr_mut(0)?;
    let data = ctx.data();
    let end = ctx.data_end();
    if data + V4_MIN > end {
        return None;
    }
    // SAFETY (every load below): within `data..data + V4_MIN`, checked above, or within
    // `data..data + V4_TCP` where checked.
    // Ethertype IPv4 (bytes 12..14) and version 4 with a 20-byte header (byte 14); neither a
    // later fragment nor a first one (bytes 20..22: MF and offset clear).
    if unsafe { pkt::word(data + 12) } & 0x00ff_ffff != 0x0045_0008
        || unsafe { pkt::half(data + 20) } & 0x3fffu16.to_be() != 0
    {
        return None;
    }
    let proto = unsafe { pkt::byte(data + 23) };
    // Only TCP and UDP flows outside the DHCP ports are ever filled (the fast path takes
    // nothing else), so a packet of another protocol or port cannot match a slot; a TCP
    // packet that would change the flow's state goes on.
    if proto == IPPROTO_TCP
        && (data + V4_TCP > end
            || unsafe { pkt::byte(data + 47) } & (TCP_SYN | TCP_FIN | TCP_RST) != 0)
    {
        return None;
    }
    let addrs = unsafe { pkt::dword(data + 26) };
    let ports = unsafe { pkt::word(data + 34) };
    let ports_if = pair(ports, ifindex);
    let tag = tag(cfg.epoch, proto, dir);
    // SAFETY: per-CPU value, used by this packet only (TC programs do not nest on a CPU).
    let set = unsafe { (*st).flows.get_mut(set_index(addrs, ports_if))? };
    let is = |s: &FlowSlot| is_flow(s, addrs, ports_if, tag);
    let s = if is(&set[0]) {
        &mut set[0]
    } else if is(&set[1]) {
        &mut set[1]
    } else {
        return None;
    };
    if dir == DIR_EGRESS && unsafe { source_mac(data) } != s.mac {
        return None;
    }
    if current_gen(addrs as u32, (addrs >> 32) as u32, ports) != s.gen
        // The verifier turns this helper into a load of `jiffies`: no call (a call's
        // return goes through a mitigation thunk on CPUs that need one).
        || jiffies() >= s.valid_until
        || s.pending >= PENDING_FULL
    {
        return None;
    }
    // Counted in the slot's own line, flushed into the counters later (see `flush_slot`):
    // the counters' lines are most of what a hit would otherwise touch. The last-hit stamps
    // need nothing: the fast path stamped them when it filled the slot, under a second ago.
    // A plain add: the flush program never runs in the middle of a TC program.
    s.pending += PENDING_PACKET | u64::from(ctx.len());
    Some(PASS)
}

/// The frame's source MAC (bytes 6..12) in the low six bytes: one load of bytes 4..12.
///
/// # Safety
/// Reads `data + 4..data + 12`: the caller has checked at least that much of the frame.
#[inline(always)]
unsafe fn source_mac(data: usize) -> u64 {
    // SAFETY: per the caller.
    unsafe { pkt::dword(data + 4) >> 16 }
}

/// How many jiffies a slot filled at `now` may live for an entry expiring at `expires`:
/// `FLOW_CACHE_TTL`, and never past the entry's expiry, counting every jiffy as the longest
/// one there is.
#[inline(always)]
pub fn lifetime(now: u64, expires: u64) -> u64 {
    FLOW_CACHE_TTL.min(expires.saturating_sub(now)) / MAX_JIFFY_NS
}

/// The jiffies clock (an inlined load, see [`hit`]).
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// Remember a flow the fast path has just passed (IPv4 only): claims the first way of the
/// tuple's set (its flow moves to the second way, unless it is this one) and lets `write`
/// set the rest of the slot in place (a slot built on the stack would grow the fast path's
/// frame past what the verifier allows with the main program's). The slot it overwrites
/// has its pending hits flushed first. Nothing is filled while the flush program runs on
/// this CPU (this packet interrupted it): it reads slots it must find unchanged.
#[inline(always)]
pub fn fill(addrs: u64, ports_if: u64, tag: u64, write: impl FnOnce(&mut FlowSlot)) {
    let Some(st) = CPU_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value; the flag is written by the flush program only.
    if unsafe { core::ptr::read_volatile(&(*st).flush_running) } != 0 {
        return;
    }
    // SAFETY: per-CPU value, used by this packet only.
    let Some(set) = (unsafe { (*st).flows.get_mut(set_index(addrs, ports_if)) }) else {
        return;
    };
    // The same flow in an earlier epoch counts as this one: moving that dead slot to the
    // second way would push out a live flow.
    let w0 = &set[0];
    let epoch = tag as u32;
    if w0.addrs == addrs && w0.ports_if == ports_if && w0.tag >> 32 == tag >> 32 {
        flush_slot(&mut set[0], epoch);
    } else {
        flush_slot(&mut set[1], epoch);
        set[1] = set[0];
    }
    let s = &mut set[0];
    s.addrs = addrs;
    s.ports_if = ports_if;
    s.tag = tag;
    s.pending = 0;
    write(s);
}

/// Add a slot's pending hits to the counters they belong to and take them out of the slot:
/// `DP_STATS`, and the rule and endpoint when the slot is of the current `epoch`. A slot of
/// an earlier epoch names a rule index (and endpoint slot) of a generation that may have
/// been folded and rewritten since: its hits go to `STAT_FLOW_CACHE_UNATTRIBUTED` instead.
///
/// Run by the fast path before it overwrites a slot, and by [`flush_all`] (the flush
/// program) for every slot. The flush program runs with bottom halves disabled on the
/// kernels this is built for, so no TC program runs on its CPU meanwhile; where a kernel
/// runs it with preemption disabled only, TC programs may interrupt it (never the reverse,
/// as TC programs never run in an interrupt): every change made here is then one atomic
/// instruction, so that no TC update falls between its read and its write, and [`fill`]
/// leaves slots alone while it runs.
#[inline(always)]
fn flush_slot(s: &mut FlowSlot, epoch: u32) {
    // SAFETY: a field of a live per-CPU value.
    let p = unsafe { core::ptr::read_volatile(&s.pending) };
    if p == 0 {
        return;
    }
    // Subtract what was read (not zero): a hit that interrupts us here stays pending.
    atomic_add(&mut s.pending, p.wrapping_neg());
    let packets = p / PENDING_PACKET;
    let bytes = p % PENDING_PACKET;
    add_stat(STAT_FLOW_CACHE, packets);
    if s.tag as u32 != epoch {
        add_stat(STAT_FLOW_CACHE_UNATTRIBUTED, packets);
        return;
    }
    if let Some(r) = RULE_STATS.get_ptr_mut(s.rule_index) {
        // SAFETY: per-CPU value.
        let r = unsafe { &mut *r };
        atomic_add(&mut r.packets, packets);
        atomic_add(&mut r.bytes, bytes);
    }
    if let Some(e) = EP_STATS.get_ptr_mut(s.ep & !SLOT_EP_MONITOR) {
        // SAFETY: per-CPU value.
        let e = unsafe { &mut *e };
        let d = ((s.tag >> 40) & 1) as usize;
        atomic_add(&mut e.allow_packets[d], packets);
        atomic_add(&mut e.allow_bytes[d], bytes);
        if s.ep & SLOT_EP_MONITOR != 0 {
            atomic_add(&mut e.monitor_packets[d], packets);
        }
    }
}

/// `DP_STATS[index] += v`, atomically.
#[inline(always)]
fn add_stat(index: u32, v: u64) {
    if let Some(c) = DP_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value.
        atomic_add(unsafe { &mut *c }, v);
    }
}

/// `*p += v` in one instruction (BPF_XADD). Written out: `core` has no atomic
/// read-modify-write for this target, which lacks compare-and-swap.
#[inline(always)]
fn atomic_add(p: &mut u64, v: u64) {
    // SAFETY: `p` is a valid, aligned u64; the instruction writes only `*p`.
    unsafe {
        core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p as *mut u64,
                         v = in(reg) v, options(nostack, preserves_flags));
    }
}

/// The flush program's work on this CPU: every slot's pending hits into the counters. The
/// flag keeps TC programs that interrupt it from refilling slots meanwhile (a refilled slot
/// would take another rule's hits under the rule index read here). Returns the CPU, so
/// that the caller can check it ran where it meant to.
#[inline(always)]
pub fn flush_all() -> u32 {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    let Some(st) = CPU_STATE.get_ptr_mut(0) else {
        return cpu;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return cpu;
    };
    let epoch = cfg.epoch;
    // SAFETY: per-CPU value; see `flush_slot` for the TC programs that may interrupt us.
    unsafe { core::ptr::write_volatile(&mut (*st).flush_running, 1) };
    compiler_fence(Ordering::SeqCst);
    let mut i = 0;
    while i < FLOW_SETS {
        // SAFETY: per-CPU value.
        if let Some(set) = unsafe { (*st).flows.get_mut(i) } {
            flush_slot(&mut set[0], epoch);
            flush_slot(&mut set[1], epoch);
        }
        i += 1;
    }
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&mut (*st).flush_running, 0) };
    cpu
}
