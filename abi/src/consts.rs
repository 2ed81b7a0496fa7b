//! Constants of the table contract: sizes, reserved values, flags.

/// Bumped whenever any map layout or map set changes. Pins live under
/// `PIN_ROOT/v{LAYOUT_VERSION}`, so a loader of another layout never reuses these maps.
pub const LAYOUT_VERSION: u32 = 2;
/// bpffs directory under which each layout version gets its own subdirectory.
pub const PIN_ROOT: &str = "/sys/fs/bpf/bulkhead";

// ---- Directions, always from the VM's point of view --------------------------------------
/// VM → network. Seen at the TC *ingress* hook of the VM's tap (the host receives from the VM).
pub const DIR_EGRESS: u8 = 0;
/// network → VM. Seen at the TC *egress* hook of the VM's tap (the host transmits to the VM).
pub const DIR_INGRESS: u8 = 1;

// ---- Actions ---------------------------------------------------------------------------
/// Drop. Zero on purpose: a zeroed or missing value fails closed.
pub const ACTION_DENY: u8 = 0;
pub const ACTION_ALLOW: u8 = 1;
/// Drop and answer: TCP RST for TCP, ICMP/ICMPv6 administratively prohibited otherwise.
pub const ACTION_REJECT: u8 = 2;
/// Would deny: record an event, then pass (and track the flow like an allow).
pub const ACTION_MONITOR: u8 = 3;

// ---- Verdict flags ---------------------------------------------------------------------
/// Emit a flow event even though the action is allow (the rule's `log` flag).
pub const VERDICT_LOG: u8 = 1 << 0;
/// A more specific level exists below this entry; look it up (see [`crate::PolicyKey`]).
pub const VERDICT_REFINE: u8 = 1 << 1;

// ---- Wildcards in policy keys ----------------------------------------------------------
/// Any peer. Also what an address resolves to when the ipcache has no entry for it.
pub const IDENTITY_ANY: u32 = 0;
/// Any protocol. IP protocol 0 (hop-by-hop) is never a final L4 protocol after the IPv6
/// extension-header walk, so it is free to serve as the wildcard.
pub const PROTO_ANY: u8 = 0;
/// Any port class.
pub const PORT_CLASS_ANY: u32 = 0;

// ---- Port classes ----------------------------------------------------------------------
/// Port-class table kind for TCP, UDP and SCTP destination ports.
pub const PORT_KIND_L4: u32 = 0;
/// Port-class table kind for ICMP and ICMPv6, indexed by `type << 8 | code`.
pub const PORT_KIND_ICMP: u32 = 1;
pub const PORT_KINDS: u32 = 2;
/// Entries in the port-class array: generations × kinds × 65536 ports.
pub const PORT_CLASS_ENTRIES: u32 = GENERATIONS * PORT_KINDS * 65536;

// ---- Generations (atomic policy swap) --------------------------------------------------
/// Two table generations live side by side; `Config::epoch & 1` selects the active one.
pub const GENERATIONS: u32 = 2;
/// Rule-statistics slots per generation. Rule index 0 is the default action.
pub const RULES_PER_GEN: u32 = 1 << 17;
pub const RULE_DEFAULT: u32 = 0;

// ---- Endpoints -------------------------------------------------------------------------
/// Endpoint slots (VM interfaces) per host; slots are stable for an interface's lifetime.
pub const MAX_ENDPOINTS: u32 = 4096;
/// Endpoint is in monitor mode: every deny becomes a would-deny event and passes.
pub const EP_MONITOR: u32 = 1 << 0;
/// Endpoint may act as a DHCP / DHCPv6 server or send router advertisements.
pub const EP_INFRA_SERVER: u32 = 1 << 1;

// ---- Bootstrap posture (interface attached, no policy for it in the active generation) --
/// Drop everything. Zero on purpose: the default of a zeroed config.
pub const BOOTSTRAP_DENY: u8 = 0;
pub const BOOTSTRAP_ALLOW: u8 = 1;

/// Default flow-event budget per endpoint, per CPU, per second when `Config` leaves it 0.
pub const DEFAULT_EVENT_RATE: u32 = 2000;
/// `skb->mark` put on packets the datapath itself generated (reject answers), so that the
/// hooks they traverse on the way out do not judge them again.
pub const REJECT_MARK: u32 = 0x0b0c_4ead;

// ---- Map sizes (defaults; the loader may resize conntrack) -----------------------------
pub const CT_ENTRIES: u32 = 262_144;
pub const FRAG_ENTRIES: u32 = 16_384;
pub const POLICY_ENTRIES: u32 = 4 * 1024 * 1024;
pub const IPCACHE_ENTRIES: u32 = 1024 * 1024;
pub const ENDPOINT_ENTRIES: u32 = GENERATIONS * MAX_ENDPOINTS;
pub const EP_ADDR_ENTRIES: u32 = GENERATIONS * MAX_ENDPOINTS * 16;
pub const EVENT_RING_BYTES: u32 = 4 * 1024 * 1024;

// ---- Connection tracking ---------------------------------------------------------------
pub const CT_STATE_NEW: u8 = 0;
pub const CT_TCP_SYN_SENT: u8 = 1;
pub const CT_TCP_SYN_RECV: u8 = 2;
pub const CT_TCP_ESTABLISHED: u8 = 3;
pub const CT_TCP_FIN_WAIT: u8 = 4;
pub const CT_TCP_CLOSING: u8 = 5;
pub const CT_TCP_CLOSED: u8 = 6;
/// Non-TCP flow seen in both directions.
pub const CT_REPLIED: u8 = 7;

/// The flow's originator is the `a` side of the normalised key.
pub const CT_ORIG_IS_A: u8 = 1 << 0;
/// The flow was originated by the VM (egress); otherwise by the peer (ingress).
pub const CT_ORIG_EGRESS: u8 = 1 << 1;
/// Admitted by a monitor verdict (would have been denied).
pub const CT_MONITOR: u8 = 1 << 2;
/// Picked up mid-stream (no SYN seen), e.g. after eviction.
pub const CT_PICKUP: u8 = 1 << 3;
pub const CT_FIN_ORIG: u8 = 1 << 4;
pub const CT_FIN_REPLY: u8 = 1 << 5;
/// Allowed by a rule with the log flag: report the flow again when it ends.
pub const CT_LOG: u8 = 1 << 6;
/// The VM's address in this entry passed the anti-spoofing source check on this interface
/// under the entry's epoch (whose tables cannot change): later packets the VM sends from it
/// may skip the address lookup. Cleared whenever the entry is re-judged under a new epoch.
pub const CT_SRC_CHECKED: u8 = 1 << 7;

pub const SEC: u64 = 1_000_000_000;
pub const CT_TIMEOUT_TCP_SYN: u64 = 60 * SEC;
pub const CT_TIMEOUT_TCP_ESTABLISHED: u64 = 6 * 3600 * SEC;
pub const CT_TIMEOUT_TCP_CLOSING: u64 = 60 * SEC;
pub const CT_TIMEOUT_TCP_CLOSED: u64 = 10 * SEC;
pub const CT_TIMEOUT_UDP: u64 = 60 * SEC;
pub const CT_TIMEOUT_UDP_REPLIED: u64 = 180 * SEC;
pub const CT_TIMEOUT_ICMP: u64 = 30 * SEC;
pub const CT_TIMEOUT_OTHER: u64 = 60 * SEC;
pub const FRAG_TIMEOUT: u64 = 30 * SEC;
/// A tracked packet moves its entry's expiry only when that gains more than this: the
/// entry's cache line is not written by every packet, from every CPU. Timeouts stay exact to
/// within one second (the shortest is 10 s); an IPv4 flow in the datapath's flow cache to
/// within `FLOW_CACHE_TTL` and a tenth of this.
pub const CT_REFRESH_SLACK: u64 = SEC;
/// The longest a slot of the datapath's per-CPU flow cache stands for its conntrack entry
/// before the entry is looked at again (never past the entry's expiry): the bound on how
/// long a cached flow outlives an entry evicted from a full table.
pub const FLOW_CACHE_TTL: u64 = CT_REFRESH_SLACK;
/// The longest a kernel tick (jiffy) lasts, at the lowest tick rate Linux offers (HZ=100).
/// The flow cache counts its lifetime in jiffies (a clock read without a helper call), and
/// with this bound a lifetime never exceeds `FLOW_CACHE_TTL` whatever the kernel's HZ (it
/// is shorter at higher rates: 100 ms at HZ=1000).
pub const MAX_JIFFY_NS: u64 = 10_000_000;

// ---- Events ----------------------------------------------------------------------------
pub const EVENT_DENY: u8 = 1;
pub const EVENT_MONITOR: u8 = 2;
pub const EVENT_ALLOW_LOG: u8 = 3;
pub const EVENT_REJECT: u8 = 4;
/// Source MAC or address not the VM's own; rogue DHCP/RA; ARP/NDP poisoning attempt.
pub const EVENT_SPOOF: u8 = 5;
/// An established flow cut because a new policy revision denies it.
pub const EVENT_REVOKED: u8 = 6;
/// Dropped by the bootstrap posture (interface without policy).
pub const EVENT_BOOTSTRAP: u8 = 7;

// ---- Drop / pass reasons carried in events ---------------------------------------------
pub const REASON_POLICY: u8 = 0;
pub const REASON_SPOOF_MAC: u8 = 1;
pub const REASON_SPOOF_IP: u8 = 2;
pub const REASON_SPOOF_ARP: u8 = 3;
pub const REASON_SPOOF_ND: u8 = 4;
pub const REASON_ROGUE_DHCP: u8 = 5;
pub const REASON_ROGUE_RA: u8 = 6;
pub const REASON_BOOTSTRAP: u8 = 7;
pub const REASON_REVOKED: u8 = 8;

// ---- Datapath counters: indices into the per-CPU `DP_STATS` array ----------------------
pub const STAT_PACKETS: u32 = 0;
pub const STAT_CT_HIT: u32 = 1;
pub const STAT_CT_CREATED: u32 = 2;
pub const STAT_CT_REJUDGED: u32 = 3;
pub const STAT_CT_REVOKED: u32 = 4;
pub const STAT_CT_PICKUP: u32 = 5;
pub const STAT_CT_CLOSED: u32 = 6;
pub const STAT_CT_INSERT_FAILED: u32 = 7;
pub const STAT_DROP_TRUNCATED: u32 = 8;
pub const STAT_DROP_NON_IP: u32 = 9;
pub const STAT_DROP_FRAGMENT: u32 = 10;
pub const STAT_DROP_IPV6_EXT: u32 = 11;
pub const STAT_DROP_SPOOF: u32 = 12;
pub const STAT_DROP_BOOTSTRAP: u32 = 13;
pub const STAT_PASS_BOOTSTRAP: u32 = 14;
pub const STAT_DROP_INVALID_TCP: u32 = 15;
pub const STAT_DROP_POLICY: u32 = 16;
pub const STAT_PASS_POLICY: u32 = 17;
pub const STAT_MONITOR_PASS: u32 = 18;
pub const STAT_REJECT_SENT: u32 = 19;
pub const STAT_REJECT_FAILED: u32 = 20;
pub const STAT_EVENTS_SENT: u32 = 21;
pub const STAT_EVENTS_RATE_LIMITED: u32 = 22;
pub const STAT_EVENTS_RING_FULL: u32 = 23;
pub const STAT_PASS_INFRA: u32 = 24;
pub const STAT_FRAG_PASS: u32 = 25;
pub const STAT_CT_EXPIRED: u32 = 26;
/// Packets of established flows passed by the datapath's fast path. The fast path counts
/// them here only, not in `STAT_PACKETS` and `STAT_CT_HIT` (one per-CPU write per packet
/// instead of three): readers add this counter to those two (`Maps::stat` does).
pub const STAT_CT_FAST: u32 = 27;
/// Packets of established IPv4 flows passed by the per-CPU flow cache in front of the fast
/// path. Counted here only: readers add it to `STAT_CT_FAST` (the established path as a
/// whole), `STAT_PACKETS` and `STAT_CT_HIT` (`Maps::stat` does).
pub const STAT_FLOW_CACHE: u32 = 28;
/// Frames a VM sent with an 802.1Q/802.1ad tag, dropped: a VM's segment is the hypervisor's
/// to choose, never the VM's (the kernel strips the outer tag into the packet's metadata
/// before TC sees it, so the frame would otherwise be judged as the IP packet inside).
pub const STAT_DROP_VLAN: u32 = 29;
/// Flow-cache hits that reached the counters only after a policy swap: counted in
/// `STAT_FLOW_CACHE` and here, not under a rule or an endpoint (whose indices the new
/// policy may have given to others). The table writer flushes every CPU just before it
/// swaps, so these are the hits of the last microseconds, or of a CPU it could not reach.
pub const STAT_FLOW_CACHE_UNATTRIBUTED: u32 = 30;
pub const STAT_COUNT: u32 = 32;

/// Names of the datapath counters, in index order, for metrics and the CLI.
pub const STAT_NAMES: [&str; 31] = [
    "packets",
    "ct_hit",
    "ct_created",
    "ct_rejudged",
    "ct_revoked",
    "ct_pickup",
    "ct_closed",
    "ct_insert_failed",
    "drop_truncated",
    "drop_non_ip",
    "drop_fragment",
    "drop_ipv6_ext",
    "drop_spoof",
    "drop_bootstrap",
    "pass_bootstrap",
    "drop_invalid_tcp",
    "drop_policy",
    "pass_policy",
    "monitor_pass",
    "reject_sent",
    "reject_failed",
    "events_sent",
    "events_rate_limited",
    "events_ring_full",
    "pass_infra",
    "frag_pass",
    "ct_expired",
    "ct_fast",
    "flow_cache",
    "drop_vlan",
    "flow_cache_unattributed",
];
