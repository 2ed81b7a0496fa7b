//! The established fast path: a packet of a tracked TCP or UDP flow whose entry was judged
//! under the current policy epoch passes after one conntrack lookup, on its headers copied
//! once — no parser subprogram, no parsed-packet scratch, no address lookup. An IPv4 flow
//! it passes goes into the per-CPU flow cache (`flowcache.rs`), which takes the flow's
//! next packets on this CPU without the conntrack lookup. Everything else (and anything this path is unsure of) returns `None` and takes
//! the full path in `datapath.rs`, which judges the packet from the start: the fast path has
//! no effect but on packets it passes, and on those it does exactly what the full path would
//! (the same counters, the same conntrack updates).
//!
//! Why it may skip checks of the full path, for the packets it takes:
//! - anti-spoofing: the source MAC is compared as always. The source address is not looked
//!   up: the entry's `CT_SRC_CHECKED` says the VM's address of this flow passed the lookup on
//!   this interface under the entry's epoch, and the tables of an epoch never change (the
//!   writer fills the inactive generation and flips). The packet's source must be that side
//!   of the key. DHCP ports are left to the full path (rogue-server check, infrastructure).
//! - infrastructure: only UDP DHCP/DHCPv6 and ICMPv6 are; neither is taken here.
//! - fragments, IPv4 options, IPv6 extension headers, ICMP: not taken here.
//! - IPv6 with IPv4-mapped addresses (dropped by the parser): not taken here.
//! - TCP state: only `ESTABLISHED` entries and segments without SYN, FIN or RST, for which
//!   the state machine does nothing; UDP: only when the reply state is already recorded.
use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes},
    programs::TcContext,
    EbpfContext,
};
use bulkhead_abi::*;
use core::ffi::c_void;

use crate::{
    conntrack,
    datapath::{count_raw, PASS},
    flowcache,
    maps::{stat, CONNTRACK, CPU_STATE},
    parse::{IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Returned by [`established`] for a packet the full path must judge (never a TC action).
pub const FULL_PATH: i32 = 0x7fff_0000;

/// The headers, copied two bytes in so that the IP header starts 8-byte aligned: every
/// field below is read with one aligned load (the BPF backend turns unaligned reads into
/// byte loads).
#[repr(C, align(8))]
pub struct Headers([u32; 18]);

/// Byte offset of the packet's first byte in [`Headers`].
const SHIFT: usize = 2;
/// Ethernet + IPv4 without options + the first 14 bytes of TCP (through the flags).
const V4_LEN: u32 = 14 + 20 + 14;
/// Ethernet + IPv4 without options + a UDP header: the shortest frame taken here.
const V4_MIN: u32 = 14 + 20 + 8;
/// The rest of an IPv6 header without extension headers and the first 14 bytes of TCP.
const V6_MORE: u32 = 14 + 40 + 14 - V4_LEN;
/// The same for a UDP header.
const V6_MORE_MIN: u32 = 14 + 40 + 8 - V4_LEN;

/// The conntrack key as words, with the layout of [`CtKey`] (little-endian target): the
/// fast path fills it a word at a time.
#[repr(C, align(8))]
pub struct KeyWords([u32; 11]);

/// The fast path's working memory, in the per-CPU `CPU_STATE` value (the stack is for the
/// full path).
#[repr(C)]
pub struct Scratch {
    h: Headers,
    k: KeyWords,
}

const _: () = assert!(core::mem::size_of::<KeyWords>() >= core::mem::size_of::<CtKey>());

/// Bytes 8..12 of a v4-mapped address (`::ffff:a.b.c.d`), as the word they read as.
const V4_MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// DHCP and DHCPv6 ports: such datagrams are left to the full path (rogue-server check,
/// infrastructure). This path never passes them, so the flow cache never holds them.
#[inline(always)]
pub fn dhcp_port(p: u16) -> bool {
    matches!(p, 67 | 68 | 546 | 547)
}

/// The TC action for a packet of an established flow judged under this epoch (counted,
/// conntrack refreshed), or [`FULL_PATH`]. A BPF subprogram: its frame (headers, key) is
/// not added to the main one, and its code stays together.
#[inline(never)]
pub fn established(ctx: &TcContext, dir: u8, ifindex: u32, cfg: &Config, ep: &EndpointInfo) -> i32 {
    match try_established(ctx, dir, ifindex, cfg, ep) {
        Some(rc) => rc,
        None => FULL_PATH,
    }
}

#[inline(always)]
fn load(ctx: &TcContext, h: &mut Headers, off: u32, len: u32) -> Option<()> {
    let base = h.0.as_mut_ptr() as *mut u8;
    // SAFETY: `base + SHIFT + off .. + len` lies within `h` (72 bytes, checked by the
    // callers' constants); the helper checks the packet bounds and fails on a short packet.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            off,
            base.add(SHIFT + off as usize) as *mut c_void,
            len,
        )
    };
    if rc == 0 {
        Some(())
    } else {
        None
    }
}

const _: () = assert!(SHIFT + (V4_LEN + V6_MORE) as usize <= core::mem::size_of::<Headers>());

/// The key's source address (words 1..5) against its destination (5..9), as numbers.
#[inline(always)]
fn addr_cmp(k: &KeyWords) -> core::cmp::Ordering {
    let mut i = 1;
    while i < 5 {
        let (x, y) = (u32::from_be(k.0[i]), u32::from_be(k.0[i + 4]));
        if x != y {
            return x.cmp(&y);
        }
        i += 1;
    }
    core::cmp::Ordering::Equal
}

#[inline(always)]
fn try_established(
    ctx: &TcContext,
    dir: u8,
    ifindex: u32,
    cfg: &Config,
    ep: &EndpointInfo,
) -> Option<i32> {
    let st = CPU_STATE.get_ptr_mut(0)?;
    // SAFETY: per-CPU value, used by this packet only (TC programs do not nest on a CPU).
    let sc = unsafe { &mut (*st).fast };
    let h = &mut sc.h;
    // Copy what the packet has of the longest headers taken here (TCP through its flags),
    // at least a UDP header's worth; `have` bytes of the packet are in `h`.
    let len = ctx.len();
    if len < V4_MIN {
        return None;
    }
    let mut have = if len >= V4_LEN { V4_LEN } else { V4_MIN };
    load(ctx, h, 0, have)?;
    let w = &h.0;
    // Packet byte b sits at byte b + 2 of `h`: the source MAC (6..12) in words 2 and 3,
    // the ethertype (12..14) in the high half of word 3.
    if dir == DIR_EGRESS {
        let m = &ep.mac;
        let mac_lo = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]);
        let mac_hi = u16::from_ne_bytes([m[4], m[5]]);
        if w[2] != mac_lo || w[3] as u16 != mac_hi {
            return None;
        }
    }
    let ethertype = u16::from_be((w[3] >> 16) as u16);
    // The IP header starts at word 4. The key is filled source first and swapped below.
    let k = &mut sc.k;
    k.0 = [0; 11];
    k.0[0] = ifindex;
    let proto: u8;
    let l4: usize;
    // IPv4 source and destination as read, for the flow cache.
    let mut v4 = None;
    if ethertype == 0x0800 {
        let vihl = w[4] as u8;
        let frag = u16::from_be((w[5] >> 16) as u16);
        // No options; neither a later fragment nor a first one (MF clear, offset 0).
        if vihl != 0x45 || frag & 0x3fff != 0 {
            return None;
        }
        proto = (w[6] >> 8) as u8;
        k.0[3] = V4_MAPPED_W2;
        k.0[4] = w[7];
        k.0[7] = V4_MAPPED_W2;
        k.0[8] = w[8];
        v4 = Some((w[7], w[8]));
        l4 = 9;
    } else if ethertype == 0x86dd {
        if len < V4_LEN + V6_MORE_MIN {
            return None;
        }
        let more = if len >= V4_LEN + V6_MORE {
            V6_MORE
        } else {
            V6_MORE_MIN
        };
        load(ctx, h, V4_LEN, more)?;
        have = V4_LEN + more;
        let w = &h.0;
        if (w[4] as u8) >> 4 != 6 {
            return None;
        }
        // The next header straight after the fixed header: no extension headers.
        proto = (w[5] >> 16) as u8;
        k.0[1] = w[6];
        k.0[2] = w[7];
        k.0[3] = w[8];
        k.0[4] = w[9];
        k.0[5] = w[10];
        k.0[6] = w[11];
        k.0[7] = w[12];
        k.0[8] = w[13];
        // IPv4-mapped addresses would name an IPv4 flow's entry (the parser drops them).
        if (w[6] == 0 && w[7] == 0 && w[8] == V4_MAPPED_W2)
            || (w[10] == 0 && w[11] == 0 && w[12] == V4_MAPPED_W2)
        {
            return None;
        }
        l4 = 14;
    } else {
        return None;
    }
    let w = &h.0;
    let ports = *w.get(l4)?;
    let sport = u16::from_be(ports as u16);
    let dport = u16::from_be((ports >> 16) as u16);
    if proto == IPPROTO_TCP {
        // The TCP header through its flags must have been copied.
        if (l4 * 4 - SHIFT) as u32 + 14 > have {
            return None;
        }
        // Flags: TCP byte 13, the second byte of the fourth word.
        let flags = (*w.get(l4 + 3)? >> 8) as u8;
        if flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            return None;
        }
    } else if proto != IPPROTO_UDP || dhcp_port(sport) || dhcp_port(dport) {
        return None;
    }
    // Normalised as `conntrack::key` does: the smaller (address, port) is side `a`.
    let src_is_a = match addr_cmp(k) {
        core::cmp::Ordering::Less => true,
        core::cmp::Ordering::Greater => false,
        core::cmp::Ordering::Equal => sport <= dport,
    };
    if src_is_a {
        k.0[9] = u32::from(sport) | u32::from(dport) << 16;
    } else {
        let mut i = 1;
        while i < 5 {
            k.0.swap(i, i + 4);
            i += 1;
        }
        k.0[9] = u32::from(dport) | u32::from(sport) << 16;
    }
    k.0[10] = u32::from(proto);
    // SAFETY: `KeyWords` has `CtKey`'s size and layout on this little-endian target, and
    // every bit pattern is a valid `CtKey`.
    let key = unsafe { &*(k as *const KeyWords as *const CtKey) };
    // The flow's generation before its entry (see `flowcache::current_gen`).
    let gen = match v4 {
        Some((saddr, daddr)) => flowcache::current_gen(saddr, daddr, ports),
        None => 0,
    };
    let e = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a valid map value; concurrent updates race only as in the full path.
    let e = unsafe { &mut *e };
    if e.epoch != cfg.epoch {
        return None;
    }
    let flags = e.flags;
    let orig_is_a = flags & CT_ORIG_IS_A != 0;
    if dir == DIR_EGRESS {
        // The VM's side of the key: the originator if the VM opened the flow.
        let vm_is_a = (flags & CT_ORIG_EGRESS != 0) == orig_is_a;
        if flags & CT_SRC_CHECKED == 0 || src_is_a != vm_is_a {
            return None;
        }
    }
    let state = e.state;
    if proto == IPPROTO_TCP {
        if state != CT_TCP_ESTABLISHED {
            return None;
        }
    } else if state != CT_REPLIED && src_is_a != orig_is_a {
        // The first reply of a UDP flow records the reply state: the full path does that.
        return None;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if e.expires_ns <= now {
        return None;
    }
    let expires = now + conntrack::timeout(proto, state, false);
    // As in the full path: a shorter timeout always applies, a longer one past the slack.
    // An IPv4 flow is cached next, and comes back here only a cache lifetime later: its
    // slack is a tenth, so that its expiry stays within the cache lifetime and the slack of
    // exact, as the full path keeps others within the slack.
    let slack = if v4.is_some() {
        CT_REFRESH_SLACK / 10
    } else {
        CT_REFRESH_SLACK
    };
    let mut expiry = e.expires_ns;
    if expires < expiry || expires - expiry > slack {
        e.expires_ns = expires;
        expiry = expires;
    }
    // The only datapath counter of this path: readers add it to `packets` and `ct_hit`.
    stat(STAT_CT_FAST);
    let outcome = if flags & CT_MONITOR != 0 {
        ACTION_MONITOR
    } else {
        ACTION_ALLOW
    };
    count_raw(
        cfg.generation(),
        ep.slot,
        dir,
        ctx.len(),
        e.rule,
        outcome,
        now,
    );
    if let Some((saddr, daddr)) = v4 {
        flowcache::fill(
            flowcache::pair(saddr, daddr),
            flowcache::pair(ports, ifindex),
            flowcache::tag(cfg.epoch, proto, dir),
            |s| {
                s.valid_until = flowcache::jiffies() + flowcache::lifetime(now, expiry);
                s.mac = if dir == DIR_EGRESS {
                    flowcache::mac_word(&ep.mac)
                } else {
                    0
                };
                s.rule_index = rule_stats_index(cfg.generation(), e.rule);
                s.ep = if outcome == ACTION_MONITOR {
                    ep.slot | flowcache::SLOT_EP_MONITOR
                } else {
                    ep.slot
                };
                s.gen = gen;
            },
        );
    }
    Some(PASS)
}
