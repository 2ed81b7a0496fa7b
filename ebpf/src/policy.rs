//! Policy lookup: peer address → identity (one LPM lookup), port → class (one array
//! lookup), then at most four hash lookups. The same semantics as
//! `bulkhead_abi::model::TableIndex::decide`, which the differential test holds us to.
use aya_ebpf::maps::lpm_trie::Key;
use bulkhead_abi::*;

use crate::maps::{IPCACHE, POLICY, PORT_CLASS};

/// A flow to judge (BPF subprograms take at most five arguments: hence a struct).
pub struct Query {
    pub peer: [u8; 16],
    pub gen: u32,
    pub slot: u32,
    pub port: u16,
    pub dir: u8,
    pub proto: u8,
}

pub struct Decision {
    /// `None`: the endpoint has no entries in this generation (bootstrap posture applies).
    pub verdict: Option<Verdict>,
    pub identity: u32,
}

/// A BPF subprogram: its keys stay off the caller's stack.
#[inline(never)]
pub fn decide(q: &Query, out: &mut Decision) {
    let (gen, slot, dir, proto, port) = (q.gen, q.slot, q.dir, q.proto, q.port);
    let key = Key::new(IPCACHE_GEN_BITS + 128, IpcacheKey { gen, addr: q.peer });
    let identity = IPCACHE.get(&key).copied().unwrap_or(IDENTITY_ANY);
    let class = match port_kind(proto) {
        Some(kind) => PORT_CLASS
            .get(port_class_index(gen, kind, port))
            .copied()
            .unwrap_or(PORT_CLASS_ANY),
        None => PORT_CLASS_ANY,
    };
    let mut verdict = None;
    if identity != IDENTITY_ANY {
        verdict = lookup(gen, slot, dir, identity, proto, class);
    }
    if verdict.is_none() {
        verdict = lookup(gen, slot, dir, IDENTITY_ANY, proto, class);
    }
    out.verdict = verdict;
    out.identity = identity;
}

#[inline(always)]
fn lookup(gen: u32, slot: u32, dir: u8, identity: u32, proto: u8, class: u32) -> Option<Verdict> {
    // SAFETY (all `get`s): entries are only replaced in the inactive generation.
    let v1 = *unsafe { POLICY.get(&PolicyKey::new(gen, slot, dir, identity, PROTO_ANY, 0)) }?;
    if v1.flags & VERDICT_REFINE == 0 {
        return Some(v1);
    }
    let Some(v2) = (unsafe { POLICY.get(&PolicyKey::new(gen, slot, dir, identity, proto, 0)) })
    else {
        return Some(v1);
    };
    if v2.flags & VERDICT_REFINE == 0 || class == PORT_CLASS_ANY {
        return Some(*v2);
    }
    match unsafe { POLICY.get(&PolicyKey::new(gen, slot, dir, identity, proto, class)) } {
        Some(v3) => Some(*v3),
        None => Some(*v2),
    }
}
