//! Map keys, map values, counters and events. All `#[repr(C)]`, explicit padding.

/// Global configuration, `CONFIG[0]`. Written by the agent; read once per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Policy epoch. Bumped by one at every swap; `epoch & 1` is the active generation.
    /// Conntrack entries remember the epoch that admitted them and are re-judged on mismatch.
    /// Never set back: an epoch names one content of the active generation (conntrack
    /// entries and the datapath's per-CPU endpoint cache rely on it).
    pub epoch: u32,
    /// Flow events per endpoint, per CPU, per second (0 = [`crate::DEFAULT_EVENT_RATE`]).
    pub event_rate: u32,
    /// [`crate::BOOTSTRAP_DENY`] or [`crate::BOOTSTRAP_ALLOW`].
    pub bootstrap: u8,
    pub _pad: [u8; 7],
}

impl Config {
    pub const fn generation(&self) -> u32 {
        self.epoch & 1
    }
}

/// `ENDPOINTS` key: which endpoint an interface is, in one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub gen: u32,
    pub ifindex: u32,
}

/// `ENDPOINTS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Stable slot of this interface (0..MAX_ENDPOINTS): policy keys, addresses and stats use it.
    pub slot: u32,
    /// `EP_*` flags.
    pub flags: u32,
    /// The only source MAC the VM may use.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// `EP_ADDRS` key: an address the endpoint owns (anti-spoofing). IPv4 as v4-mapped IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointAddrKey {
    pub gen: u32,
    pub slot: u32,
    pub addr: [u8; 16],
}

/// `IPCACHE` LPM key data (the kernel's `bpf_lpm_trie_key` prefix length precedes it).
/// The prefix always covers `gen` (32 bits) and then the address bits; IPv4 addresses are
/// stored v4-mapped (`::ffff:a.b.c.d`), so an IPv4 /n is a prefix of 32 + 96 + n bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    pub gen: u32,
    pub addr: [u8; 16],
}

/// Bits of [`IpcacheKey`] before the address.
pub const IPCACHE_GEN_BITS: u32 = 32;

/// `POLICY` key. Looked up at three levels, first for the peer's identity, then — only if the
/// identity has no level-3 entry at all — for [`crate::IDENTITY_ANY`]:
///
/// 1. identity level: `proto = PROTO_ANY`, `port_class = PORT_CLASS_ANY`;
/// 2. protocol level: `proto = p`, `port_class = PORT_CLASS_ANY` (only if level 1 has `REFINE`);
/// 3. port level: `proto = p`, `port_class = c` (only if level 2 has `REFINE`).
///
/// A miss at a deeper level means the shallower verdict holds. So at most four hash lookups
/// decide a new flow, whatever the number of rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub gen: u32,
    pub slot: u32,
    pub identity: u32,
    pub port_class: u32,
    pub direction: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

impl PolicyKey {
    pub const fn new(
        gen: u32,
        slot: u32,
        direction: u8,
        identity: u32,
        proto: u8,
        port_class: u32,
    ) -> Self {
        Self {
            gen,
            slot,
            identity,
            port_class,
            direction,
            proto,
            _pad: [0; 2],
        }
    }
}

/// `POLICY` value: the decision, fully resolved by the compiler (tiers, priorities, pass and
/// first match already applied).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// `ACTION_*`.
    pub action: u8,
    /// `VERDICT_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Rule index within the revision (0 = default action); names the rule in counters/events.
    pub rule: u32,
}

impl Verdict {
    pub const fn new(action: u8, flags: u8, rule: u32) -> Self {
        Self {
            action,
            flags,
            _pad: [0; 2],
            rule,
        }
    }
}

/// `CONNTRACK` key, normalised so both directions of a flow find the same entry:
/// `(addr_a, port_a) <= (addr_b, port_b)`. Per interface, because the two VMs of a local
/// flow each judge it under their own policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) after which the entry
    /// is dead.
    pub expires_ns: u64,
    /// Policy epoch that admitted (or last re-judged) the flow.
    pub epoch: u32,
    /// Rule index (within the epoch's generation) that admitted the flow.
    pub rule: u32,
    /// The port key the flow was judged on: destination port of the originator, or
    /// `type << 8 | code` for ICMP. Kept so a new policy can re-judge the flow.
    pub judged_port: u16,
    /// `CT_*` state.
    pub state: u8,
    /// `CT_*` flags.
    pub flags: u8,
    pub _pad: [u8; 4],
}

/// `FRAGS` key: fragments of one datagram after its first fragment was allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub ifindex: u32,
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `FRAGS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    /// `bpf_ktime_get_coarse_ns()`.
    pub expires_ns: u64,
}

/// `RULE_STATS[gen * RULES_PER_GEN + rule]`, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the last hit.
    pub last_hit_ns: u64,
}

/// `EP_STATS[slot]`, per CPU. Arrays are indexed by direction (`DIR_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub allow_packets: [u64; 2],
    pub allow_bytes: [u64; 2],
    pub deny_packets: [u64; 2],
    pub deny_bytes: [u64; 2],
    pub monitor_packets: [u64; 2],
    pub spoof_drops: u64,
    /// Events not delivered for this endpoint (rate limit or full ring): never a silent loss.
    pub events_suppressed: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution).
    pub last_hit_ns: u64,
}

/// `EVENT_BUDGET[slot]`, per CPU: the in-kernel event rate limiter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub sent: u32,
    pub suppressed: u32,
}

/// A record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_boot_ns()`.
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub slot: u32,
    pub epoch: u32,
    pub rule: u32,
    pub identity: u32,
    pub packet_len: u32,
    /// Events suppressed for this endpoint since the last delivered one.
    pub suppressed_before: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// `EVENT_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub direction: u8,
    pub proto: u8,
    /// 4 or 6; 0 for non-IP (ARP).
    pub family: u8,
    /// `REASON_*`.
    pub reason: u8,
    pub tcp_flags: u8,
    pub _pad: [u8; 10],
}

// The layouts are the contract: a size change must be a deliberate LAYOUT_VERSION bump.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Config>() == 16);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(size_of::<EndpointAddrKey>() == 24);
    assert!(size_of::<IpcacheKey>() == 20);
    assert!(size_of::<PolicyKey>() == 20);
    assert!(size_of::<Verdict>() == 8);
    assert!(size_of::<CtKey>() == 44);
    assert!(size_of::<CtEntry>() == 24);
    assert!(size_of::<FragKey>() == 44);
    assert!(size_of::<RuleStats>() == 24);
    assert!(size_of::<EndpointStats>() == 104);
    assert!(size_of::<EventBudget>() == 16);
    assert!(size_of::<FlowEvent>() == 88);
};

/// Convert an IPv4 address (network order octets) to the v4-mapped form used in keys.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Index into `PORT_CLASS` for a generation, kind and port key.
pub const fn port_class_index(gen: u32, kind: u32, port: u16) -> u32 {
    ((gen * crate::PORT_KINDS + kind) << 16) | port as u32
}

/// Index into `RULE_STATS`.
pub const fn rule_stats_index(gen: u32, rule: u32) -> u32 {
    gen * crate::RULES_PER_GEN + (rule & (crate::RULES_PER_GEN - 1))
}

/// Which port-class kind a protocol uses, if any.
pub const fn port_kind(proto: u8) -> Option<u32> {
    match proto {
        6 | 17 | 132 => Some(crate::PORT_KIND_L4),
        1 | 58 => Some(crate::PORT_KIND_ICMP),
        _ => None,
    }
}
