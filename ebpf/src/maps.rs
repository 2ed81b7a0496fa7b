//! Every map of the datapath, pinned by name under the versioned pin directory.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use bulkhead_abi::*;

#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> = HashMap::pinned(ENDPOINT_ENTRIES, 0);
#[map]
pub static EP_ADDRS: HashMap<EndpointAddrKey, u8> =
    HashMap::pinned(EP_ADDR_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
pub static IPCACHE: LpmTrie<IpcacheKey, u32> = LpmTrie::pinned(IPCACHE_ENTRIES, 0);
#[map]
pub static POLICY: HashMap<PolicyKey, Verdict> = HashMap::pinned(POLICY_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
pub static PORT_CLASS: Array<u32> = Array::pinned(PORT_CLASS_ENTRIES, 0);
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_ENTRIES, 0);
#[map]
pub static FRAGS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(FRAG_ENTRIES, 0);
#[map]
pub static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::pinned(GENERATIONS * RULES_PER_GEN, 0);
#[map]
pub static EP_STATS: PerCpuArray<EndpointStats> = PerCpuArray::pinned(MAX_ENDPOINTS, 0);
#[map]
pub static DP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(MAX_ENDPOINTS, 0);
/// Per-CPU scratch space: [0] the parsed packet, [1] the packet an ICMP error quotes.
/// Not pinned: it holds no state.
#[map]
pub static SCRATCH_PKT: PerCpuArray<crate::parse::Pkt> = PerCpuArray::with_max_entries(2, 0);
/// Per-CPU scratch space for building an ICMP reject answer. Not pinned.
#[map]
pub static SCRATCH_ICMP: PerCpuArray<crate::reject::IcmpScratch> =
    PerCpuArray::with_max_entries(1, 0);
/// One slot of the per-CPU endpoint cache (see `datapath::endpoint`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EpCacheEntry {
    pub valid: u32,
    pub epoch: u32,
    pub ifindex: u32,
    pub info: EndpointInfo,
}

/// Slots of the endpoint cache (direct-mapped by ifindex).
pub const EP_CACHE_SLOTS: u32 = 256;

/// The per-CPU working state of the established path in one value (one map, adjacent
/// lines): the fast path's header copy and key next to the endpoint cache and the flow
/// cache. Pinned: the flow cache holds hits not yet in the counters (both caches are
/// tagged with the epoch and rebuilt from the pinned tables on a miss), which the next
/// loader's flush program must find. A change of this layout needs a new `LAYOUT_VERSION`.
#[repr(C)]
pub struct CpuState {
    /// Non-zero while the flush program runs on this CPU (see `flowcache::flush_all`).
    pub flush_running: u64,
    pub fast: crate::fast::Scratch,
    /// Cache of `ENDPOINTS` for the current epoch, direct-mapped by ifindex (see
    /// `datapath::endpoint`).
    pub ep: [EpCacheEntry; EP_CACHE_SLOTS as usize],
    /// Established IPv4 flows (see `flowcache.rs`).
    pub flows:
        [[crate::flowcache::FlowSlot; crate::flowcache::FLOW_WAYS]; crate::flowcache::FLOW_SETS],
}

#[map]
pub static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::pinned(1, 0);

// A per-CPU map value is at most 32 KiB (the per-CPU allocator's unit).
const _: () = assert!(core::mem::size_of::<CpuState>() <= 32 * 1024);
// Pinned: a change of this layout (size or meaning) needs a new LAYOUT_VERSION, or the next
// loader reuses (or fails on) the old map. Update this size with the version.
const _: () = assert!(core::mem::size_of::<CpuState>() == 23_680 && LAYOUT_VERSION == 2);

/// Flow generations: a counter per hash of a flow's addresses and ports, bumped by the full
/// path whenever it creates a conntrack entry or moves a TCP entry to another state, so that
/// flow-cache slots of that flow on every CPU stop standing for it (see `flowcache.rs`).
/// Pinned with the flow cache it guards.
#[map]
pub static FLOW_GEN: Array<u32> = Array::pinned(crate::flowcache::FLOW_GENS, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);

/// Count one occurrence of a datapath counter.
#[inline(always)]
pub fn stat(index: u32) {
    if let Some(p) = DP_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}
