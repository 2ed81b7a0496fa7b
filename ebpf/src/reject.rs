//! The reject action: turn a payload-less TCP segment (a SYN, a bare ACK) into the RST that
//! answers it, in place, and send it back where the segment came from.
//!
//! Swapping addresses and ports leaves every checksum unchanged (one's complement sums
//! commute), so only sequence numbers and flags need incremental checksum updates — and
//! `bpf_l4_csum_replace` applies those correctly whether the skb carries a full checksum or
//! a partial one still to be completed by the stack. Segments with payload or IP extras
//! are dropped instead (counted as `STAT_REJECT_FAILED`); non-TCP rejects are drops for now.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use bulkhead_abi::*;

use crate::{
    maps::stat,
    parse::{EthHdr, Pkt, ETH_HLEN, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Returns the TC action: `TC_ACT_REDIRECT` with the RST on its way, or `TC_ACT_SHOT` when
/// the packet could not be answered. A BPF subprogram.
#[inline(never)]
pub fn tcp_reset(ctx: &TcContext, eth: &EthHdr, p: &Pkt, dir: u8, ifindex: u32) -> i32 {
    match answer(ctx, eth, p, dir, ifindex) {
        Some(rc) => rc,
        None => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn answer(ctx: &TcContext, eth: &EthHdr, p: &Pkt, dir: u8, ifindex: u32) -> Option<i32> {
    if p.proto != IPPROTO_TCP || p.payload_len != 0 || p.has_ip_extras || p.tcp_flags & TCP_RST != 0
    {
        stat(STAT_REJECT_FAILED);
        return None;
    }
    match write_reset(ctx, eth, p) {
        Ok(()) => {}
        Err(()) => {
            stat(STAT_REJECT_FAILED);
            return None;
        }
    }
    ctx.set_mark(REJECT_MARK);
    // From the VM (tap ingress): answer the VM, out of the same tap.
    // To the VM (tap egress): answer the sender, as if the VM had replied.
    let flags = if dir == DIR_EGRESS {
        0
    } else {
        u64::from(BPF_F_INGRESS)
    };
    let rc = unsafe { bpf_redirect(ifindex, flags) };
    if rc != i64::from(TC_ACT_REDIRECT) {
        stat(STAT_REJECT_FAILED);
        return None;
    }
    stat(STAT_REJECT_SENT);
    Some(TC_ACT_REDIRECT as i32)
}

#[inline(always)]
fn write_reset(ctx: &TcContext, eth: &EthHdr, p: &Pkt) -> Result<(), ()> {
    let swapped = EthHdr {
        dst: eth.src,
        src: eth.dst,
        proto: eth.proto,
    };
    ctx.store(0, &swapped, 0).map_err(|_| ())?;
    let addr_off = if p.family == 4 {
        (ETH_HLEN + 12) as usize
    } else {
        (ETH_HLEN + 8) as usize
    };
    if p.family == 4 {
        let src4 = [p.src[12], p.src[13], p.src[14], p.src[15]];
        let dst4 = [p.dst[12], p.dst[13], p.dst[14], p.dst[15]];
        ctx.store(addr_off, &dst4, 0).map_err(|_| ())?;
        ctx.store(addr_off + 4, &src4, 0).map_err(|_| ())?;
    } else {
        ctx.store(addr_off, &p.dst, 0).map_err(|_| ())?;
        ctx.store(addr_off + 16, &p.src, 0).map_err(|_| ())?;
    }
    let l4 = p.l4_off as usize;
    let ports = [
        (p.dport >> 8) as u8,
        p.dport as u8,
        (p.sport >> 8) as u8,
        p.sport as u8,
    ];
    ctx.store(l4, &ports, 0).map_err(|_| ())?;

    let (seq, ack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (p.ack, 0u32, TCP_RST)
    } else {
        let consumed =
            u32::from(p.tcp_flags & TCP_SYN != 0) + u32::from(p.tcp_flags & TCP_FIN != 0);
        (0u32, p.seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
    };
    let csum_off = (p.l4_off + 16) as usize;
    replace32(ctx, l4 + 4, csum_off, p.seq, seq)?;
    replace32(ctx, l4 + 8, csum_off, p.ack, ack)?;
    let old: [u8; 4] = ctx.load(l4 + 12).map_err(|_| ())?;
    let new = [old[0], flags, 0, 0];
    ctx.l4_csum_replace(
        csum_off,
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
        4,
    )
    .map_err(|_| ())?;
    ctx.store(l4 + 12, &new, 0).map_err(|_| ())?;
    Ok(())
}

#[inline(always)]
fn replace32(ctx: &TcContext, off: usize, csum_off: usize, old: u32, new: u32) -> Result<(), ()> {
    let (old, new) = (old.to_be_bytes(), new.to_be_bytes());
    ctx.l4_csum_replace(
        csum_off,
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
        4,
    )
    .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}
