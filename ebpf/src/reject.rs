//! The reject action: the denied packet is rewritten, in place, into the answer its sender
//! would get from a host that refuses it, and sent back where it came from.
//!
//! - TCP: a payload-less segment (a SYN, a bare ACK) becomes the RST that answers it.
//!   Swapping addresses and ports leaves every checksum unchanged (one's complement sums
//!   commute), so only sequence numbers and flags need incremental checksum updates — and
//!   `bpf_l4_csum_replace` applies those correctly whether the skb carries a full checksum
//!   or a partial one still to be completed by the stack. Segments with payload are dropped
//!   instead (counted as `STAT_REJECT_FAILED`).
//! - Everything else (UDP, ICMP echo, other protocols): ICMP destination unreachable,
//!   "communication administratively prohibited" (type 3 code 13; ICMPv6 type 1 code 1),
//!   from the original destination, quoting the IP header and the first 8 bytes after it.
//!   The packet is trimmed to the quote and the new IP and ICMP headers are inserted in
//!   front; both checksums are computed here. A VM's UDP datagram may still carry a
//!   *partial* checksum (offload: the stack or the guest completes it later at the UDP
//!   checksum's place, which is now inside the quote). The quoted UDP checksum is therefore
//!   set to the fixed point of that completion — the value it would compute over the quoted
//!   header — so a late completion rewrites it to itself and the ICMP checksum stays valid.
//!   Never answered: ICMP errors, multicast and broadcast destinations, packets with IP
//!   options or IPv6 extension headers, SCTP (its CRC is offloaded differently).
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, TC_ACT_REDIRECT,
        TC_ACT_SHOT,
    },
    helpers::{bpf_redirect, bpf_skb_load_bytes},
    programs::TcContext,
    EbpfContext,
};
use bulkhead_abi::*;
use core::ffi::c_void;

use crate::{
    maps::{stat, SCRATCH_ICMP},
    parse::{
        EthHdr, Pkt, ETH_HLEN, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN,
    },
};

/// Returns the TC action: `TC_ACT_REDIRECT` with the answer on its way, or `TC_ACT_SHOT`
/// when the packet could not be answered. A BPF subprogram.
#[inline(never)]
pub fn answer(ctx: &TcContext, eth: &EthHdr, p: &Pkt, dir: u8, ifindex: u32) -> i32 {
    let written = if p.proto == IPPROTO_TCP {
        if p.payload_len != 0 || p.has_ip_extras || p.tcp_flags & TCP_RST != 0 {
            Err(())
        } else {
            write_reset(ctx, eth, p)
        }
    } else if !answerable(eth, p) {
        Err(())
    } else {
        unreachable(ctx, eth, p)
    };
    if written.is_err() {
        stat(STAT_REJECT_FAILED);
        return TC_ACT_SHOT as i32;
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
        return TC_ACT_SHOT as i32;
    }
    stat(STAT_REJECT_SENT);
    TC_ACT_REDIRECT as i32
}

/// ICMP may answer this packet (RFC 1122 3.2.2, RFC 4443 2.4 e).
#[inline(always)]
fn answerable(eth: &EthHdr, p: &Pkt) -> bool {
    if p.has_ip_extras || p.proto == IPPROTO_SCTP || p.is_icmp_error() || eth.dst[0] & 1 != 0 {
        return false;
    }
    if p.family == 4 {
        let d = p.dst[12];
        !(d >= 224 || p.dst[12..16] == [0, 0, 0, 0])
    } else {
        p.dst[0] != 0xff
    }
}

/// Bytes of the original packet an ICMP error quotes after its IP header.
const QUOTE_L4: u32 = 8;
const ICMP_HLEN: u32 = 8;

/// Headers of an ICMP answer under construction: per-CPU, off the 512-byte stack (the
/// answer runs below the main program's frame).
/// Aligned, every array at an even offset: checksums read 16-bit words.
#[repr(C, align(8))]
pub struct IcmpScratch {
    ip4: [u8; 20],
    orig4: [u8; 20],
    ip6: [u8; 40],
    orig6: [u8; 40],
    icmp: [u8; 8],
    quote: [u8; 8],
    eth: [u8; 14],
}

/// Read the original IP header into `orig` and the quoted L4 bytes into `quote` (the UDP
/// checksum set to the fixed point of a pending completion); trim the packet to the quote
/// and insert `room` bytes after the Ethernet header.
#[inline(always)]
fn make_room<const N: usize>(
    ctx: &TcContext,
    p: &Pkt,
    orig: &mut [u8; N],
    quote: &mut [u8; 8],
) -> Result<(), ()> {
    load_into(ctx, ETH_HLEN, orig)?;
    load_into(ctx, p.l4_off, quote)?;
    if p.proto == IPPROTO_UDP {
        let f = completion_fixed_point(quote);
        quote[6] = (f >> 8) as u8;
        quote[7] = f as u8;
    }
    ctx.change_tail(p.l4_off + QUOTE_L4, 0).map_err(|_| ())?;
    ctx.adjust_room((N as u32 + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())
}

/// `bpf_skb_load_bytes` of exactly `N` bytes into `dst` (a short packet is an error).
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, off: u32, dst: &mut [u8; N]) -> Result<(), ()> {
    // SAFETY: `dst` is valid for `N` bytes; the helper checks the packet bounds.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            off,
            dst.as_mut_ptr() as *mut c_void,
            N as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// The UDP checksum value `f` for which completing the checksum over `hdr` (the quoted
/// header, `f` in place) writes `f` again: `x + 2f = 0 (mod 0xffff)`, where `x` is the sum of
/// the other header words; 32768 is the inverse of 2 modulo 0xffff.
#[inline(always)]
fn completion_fixed_point(hdr: &[u8; 8]) -> u16 {
    let x = fold(sum_words(
        0,
        &[hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5]],
    ));
    let f = ((0xffff - x) * 32768) % 0xffff;
    // Zero is written back as 0xffff (a computed zero checksum is sent as all ones).
    if f == 0 {
        0xffff
    } else {
        f as u16
    }
}

/// A BPF subprogram: the ICMP answer's buffers live in a per-CPU map.
#[inline(never)]
fn unreachable(ctx: &TcContext, eth: &EthHdr, p: &Pkt) -> Result<(), ()> {
    let s = SCRATCH_ICMP.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU value, used by this packet only (TC programs do not nest on a CPU).
    let s = unsafe { &mut *s };
    if p.family == 4 {
        unreachable_v4(ctx, eth, p, s)
    } else {
        unreachable_v6(ctx, eth, p, s)
    }
}

#[inline(always)]
fn unreachable_v4(ctx: &TcContext, eth: &EthHdr, p: &Pkt, s: &mut IcmpScratch) -> Result<(), ()> {
    make_room(ctx, p, &mut s.orig4, &mut s.quote)?;
    let total = (20 + ICMP_HLEN + 20 + QUOTE_L4) as u16;
    // Written in place: an array literal would be built on the stack first.
    let ip = &mut s.ip4;
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2] = (total >> 8) as u8;
    ip[3] = total as u8;
    ip[4..8].copy_from_slice(&[0, 0, 0, 0]);
    ip[8] = 64;
    ip[9] = 1;
    ip[10] = 0;
    ip[11] = 0;
    // Source: the refused destination; destination: the sender.
    ip[12..16].copy_from_slice(&p.dst[12..16]);
    ip[16..20].copy_from_slice(&p.src[12..16]);
    let c = !fold(sum_words(0, ip));
    ip[10] = (c >> 8) as u8;
    ip[11] = c as u8;
    s.icmp.copy_from_slice(&[3, 13, 0, 0, 0, 0, 0, 0]);
    let c = !fold(sum_words(
        sum_words(sum_words(0, &s.icmp), &s.orig4),
        &s.quote,
    ));
    s.icmp[2] = (c >> 8) as u8;
    s.icmp[3] = c as u8;
    write_headers(ctx, eth, &mut s.eth, &s.ip4, &s.icmp, p, &s.quote)
}

#[inline(always)]
fn unreachable_v6(ctx: &TcContext, eth: &EthHdr, p: &Pkt, s: &mut IcmpScratch) -> Result<(), ()> {
    make_room(ctx, p, &mut s.orig6, &mut s.quote)?;
    let payload = (ICMP_HLEN + 40 + QUOTE_L4) as u16;
    let ip = &mut s.ip6;
    ip[0..8].copy_from_slice(&[0x60, 0, 0, 0, (payload >> 8) as u8, payload as u8, 58, 64]);
    ip[8..24].copy_from_slice(&p.dst);
    ip[24..40].copy_from_slice(&p.src);
    s.icmp.copy_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    // Pseudo-header: both addresses, the upper-layer length and next header.
    let pseudo = sum_words(sum_words(0, &p.dst), &p.src) + u32::from(payload) + 58;
    let c = !fold(sum_words(
        sum_words(sum_words(pseudo, &s.icmp), &s.orig6),
        &s.quote,
    ));
    s.icmp[2] = (c >> 8) as u8;
    s.icmp[3] = c as u8;
    write_headers(ctx, eth, &mut s.eth, &s.ip6, &s.icmp, p, &s.quote)
}

/// Write the answer's headers into the room made in front of the original IP header, and
/// the adjusted quote. `BPF_F_RECOMPUTE_CSUM` keeps a full (`CHECKSUM_COMPLETE`) skb sum right.
#[inline(always)]
fn write_headers<const N: usize>(
    ctx: &TcContext,
    eth: &EthHdr,
    eth_out: &mut [u8; 14],
    ip: &[u8; N],
    icmp: &[u8; 8],
    p: &Pkt,
    quote: &[u8; 8],
) -> Result<(), ()> {
    let room = N as u32 + ICMP_HLEN;
    let f = u64::from(BPF_F_RECOMPUTE_CSUM);
    eth_out[0..6].copy_from_slice(&eth.src);
    eth_out[6..12].copy_from_slice(&eth.dst);
    eth_out[12..14].copy_from_slice(&eth.proto);
    ctx.store(0, eth_out, f).map_err(|_| ())?;
    ctx.store(ETH_HLEN as usize, ip, f).map_err(|_| ())?;
    ctx.store((ETH_HLEN + N as u32) as usize, icmp, f)
        .map_err(|_| ())?;
    ctx.store((p.l4_off + room) as usize, quote, f)
        .map_err(|_| ())
}

/// One's complement sum of the big-endian 16-bit words of `b` (N even), folded. Summed in
/// native order (one load per word; the sum commutes with byte swapping) and swapped once.
#[inline(always)]
fn sum_words<const N: usize>(s: u32, b: &[u8; N]) -> u32 {
    let mut ne = 0u32;
    let mut i = 0;
    while i + 1 < N {
        ne += u32::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s + u32::from(u16::from_be(fold(ne) as u16))
}

#[inline(always)]
fn fold(s: u32) -> u32 {
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) & 0xffff
}

/// A BPF subprogram of its own (its frame is not stacked on the ICMP answer's).
#[inline(never)]
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
