//! Connection tracking: the normalised key, TCP state and timeouts.
use bulkhead_abi::*;

use crate::parse::{split16, Pkt, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// The normalised key for a tuple, and whether `src` is the `a` side.
#[inline(always)]
pub fn key(
    ifindex: u32,
    proto: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
) -> (CtKey, bool) {
    let (s0, s1) = split16(src);
    let (d0, d1) = split16(dst);
    let src_is_a = (s0, s1, sport) <= (d0, d1, dport);
    let k = if src_is_a {
        CtKey {
            ifindex,
            addr_a: *src,
            addr_b: *dst,
            port_a: sport,
            port_b: dport,
            proto,
            _pad: [0; 3],
        }
    } else {
        CtKey {
            ifindex,
            addr_a: *dst,
            addr_b: *src,
            port_a: dport,
            port_b: sport,
            proto,
            _pad: [0; 3],
        }
    };
    (k, src_is_a)
}

#[inline(always)]
pub fn key_for(ifindex: u32, p: &Pkt) -> (CtKey, bool) {
    key(ifindex, p.proto, &p.src, &p.dst, p.sport, p.dport)
}

/// State of a new entry created by an allowed first packet.
#[inline(always)]
pub fn initial_state(p: &Pkt) -> u8 {
    if p.proto != IPPROTO_TCP {
        CT_STATE_NEW
    } else if p.tcp_flags & TCP_SYN != 0 && p.tcp_flags & TCP_ACK == 0 {
        CT_TCP_SYN_SENT
    } else {
        // Mid-stream pickup (for example after the entry was evicted).
        CT_TCP_ESTABLISHED
    }
}

/// Advance the TCP state machine for a packet of a tracked flow.
#[inline(always)]
pub fn tcp_advance(e: &mut CtEntry, flags: u8, is_orig: bool) {
    if flags & TCP_RST != 0 {
        e.state = CT_TCP_CLOSED;
        return;
    }
    match e.state {
        CT_TCP_SYN_SENT => {
            if !is_orig && flags & TCP_SYN != 0 && flags & TCP_ACK != 0 {
                e.state = CT_TCP_SYN_RECV;
            }
        }
        CT_TCP_SYN_RECV => {
            if is_orig && flags & TCP_ACK != 0 && flags & TCP_SYN == 0 {
                e.state = CT_TCP_ESTABLISHED;
            }
        }
        _ => {}
    }
    if flags & TCP_FIN != 0 {
        e.flags |= if is_orig { CT_FIN_ORIG } else { CT_FIN_REPLY };
        e.state = if e.flags & CT_FIN_ORIG != 0 && e.flags & CT_FIN_REPLY != 0 {
            CT_TCP_CLOSING
        } else {
            CT_TCP_FIN_WAIT
        };
    }
}

#[inline(always)]
pub fn timeout(proto: u8, state: u8, is_icmp: bool) -> u64 {
    if proto == IPPROTO_TCP {
        return match state {
            CT_TCP_ESTABLISHED => CT_TIMEOUT_TCP_ESTABLISHED,
            CT_TCP_FIN_WAIT | CT_TCP_CLOSING => CT_TIMEOUT_TCP_CLOSING,
            CT_TCP_CLOSED => CT_TIMEOUT_TCP_CLOSED,
            _ => CT_TIMEOUT_TCP_SYN,
        };
    }
    if is_icmp {
        return CT_TIMEOUT_ICMP;
    }
    if proto == crate::parse::IPPROTO_UDP {
        return if state == CT_REPLIED {
            CT_TIMEOUT_UDP_REPLIED
        } else {
            CT_TIMEOUT_UDP
        };
    }
    CT_TIMEOUT_OTHER
}
