//! Header parsing. Fixed headers are read straight from the packet's linear part (bounds
//! checked against `data_end`), anything else through `bpf_skb_load_bytes`: a short packet is
//! an error, never an out-of-bounds access. Decisions on odd packets (documented in
//! ARCHITECTURE.md, "Packet edge cases"):
//! - truncated headers: drop (`STAT_DROP_TRUNCATED`);
//! - IPv4 options: skipped via IHL, the packet is judged like any other;
//! - IPv6 extension headers: walked (at most `MAX_EXT_HEADERS`); routing header type 0 and
//!   longer chains are dropped (`STAT_DROP_IPV6_EXT`);
//! - IPv6 packets with an IPv4-mapped source or destination (`::ffff:0:0/96`): dropped
//!   (`STAT_DROP_IPV6_EXT`). IPv4 is keyed in that form (ipcache, endpoint addresses,
//!   conntrack), so such an address would borrow an IPv4 peer's identity and policy; they
//!   are never valid on the wire (RFC 4291 2.5.5.2);
//! - fragments: the first fragment is judged on its ports; later fragments pass only if the
//!   first fragment of the same datagram was allowed (`FRAGS`), else drop;
//! - non-IP frames other than ARP: drop (`STAT_DROP_NON_IP`).
use aya_ebpf::programs::TcContext;
use bulkhead_abi::*;

pub const ETH_HLEN: u32 = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const MAX_EXT_HEADERS: u32 = 6;

pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

/// What the datapath knows about one IP packet. Eight-byte aligned, so that addresses are
/// compared and copied a word at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Pkt {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports used in the conntrack key (ICMP echo: the identifier on both sides).
    pub sport: u16,
    pub dport: u16,
    /// What policy judges: destination port, or `type << 8 | code` for ICMP.
    pub port_key: u16,
    pub l4_off: u32,
    pub frag_id: u32,
    pub seq: u32,
    pub ack: u32,
    /// TCP payload length (for RST acknowledgement numbers).
    pub payload_len: u32,
    pub family: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub frag: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// IPv4 TTL / IPv6 hop limit.
    pub hop_limit: u8,
    /// IPv4 header carried options / IPv6 carried extension headers.
    pub has_ip_extras: bool,
}

impl Pkt {
    pub const fn empty(family: u8) -> Self {
        Self {
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            port_key: 0,
            l4_off: 0,
            frag_id: 0,
            seq: 0,
            ack: 0,
            payload_len: 0,
            family,
            proto: 0,
            tcp_flags: 0,
            frag: FRAG_NONE,
            icmp_type: 0,
            icmp_code: 0,
            hop_limit: 0,
            has_ip_extras: false,
        }
    }

    pub fn is_icmp(&self) -> bool {
        (self.family == 4 && self.proto == IPPROTO_ICMP)
            || (self.family == 6 && self.proto == IPPROTO_ICMPV6)
    }

    /// ICMP error messages carry the header of the packet they answer.
    pub fn is_icmp_error(&self) -> bool {
        if !self.is_icmp() || self.frag == FRAG_LATER {
            return false;
        }
        if self.family == 4 {
            matches!(self.icmp_type, 3 | 11 | 12)
        } else {
            matches!(self.icmp_type, 1..=4)
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    vtcfl: [u8; 4],
    payload_len: [u8; 2],
    nexthdr: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn be32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// A `T` at `off`: read straight from the packet when it lies in the linear part (the common
/// case: no helper call, no copy), else through `bpf_skb_load_bytes`. Either way a short
/// packet is an error, never an out-of-bounds read.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: within [data, data_end), checked just above (and by the verifier).
        Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        ctx.load::<T>(off).map_err(|_| ())
    }
}

/// Parse the IP packet at `ETH_HLEN` into `p`. Returns 0, or the `STAT_*` counter of the
/// drop. A BPF subprogram of its own, to keep header copies off the caller's stack.
#[inline(never)]
pub fn parse_ip(ctx: &TcContext, ethertype: u16, p: &mut Pkt) -> u32 {
    let r = if ethertype == ETH_P_IP {
        parse_v4(ctx, p)
    } else {
        parse_v6(ctx, p)
    };
    match r {
        Ok(()) => 0,
        Err(counter) => counter,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, p: &mut Pkt) -> Result<(), u32> {
    let ip: Ipv4Hdr = read(ctx, ETH_HLEN as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
    let ihl = u32::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return Err(STAT_DROP_TRUNCATED);
    }
    *p = Pkt::empty(4);
    p.src = v4_mapped(ip.src);
    p.dst = v4_mapped(ip.dst);
    p.proto = ip.proto;
    p.hop_limit = ip.ttl;
    p.l4_off = ETH_HLEN + ihl;
    p.has_ip_extras = ihl > 20;
    let frag = be16(ip.frag);
    p.frag_id = u32::from(be16(ip.id));
    if frag & 0x1fff != 0 {
        p.frag = FRAG_LATER;
    } else if frag & 0x2000 != 0 {
        p.frag = FRAG_FIRST;
    }
    let tot_len = u32::from(be16(ip.tot_len));
    p.payload_len = tot_len.saturating_sub(ihl);
    parse_l4(ctx, p)
}

/// IPv6, walking extension headers.
#[inline(always)]
fn parse_v6(ctx: &TcContext, p: &mut Pkt) -> Result<(), u32> {
    let ip: Ipv6Hdr = read(ctx, ETH_HLEN as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
    if ip.vtcfl[0] >> 4 != 6 {
        return Err(STAT_DROP_TRUNCATED);
    }
    *p = Pkt::empty(6);
    p.src = ip.src;
    p.dst = ip.dst;
    p.hop_limit = ip.hop_limit;
    // Checked on the scratch copy: no extra stack in this frame.
    if is_v4_mapped(&p.src) || is_v4_mapped(&p.dst) {
        return Err(STAT_DROP_IPV6_EXT);
    }
    let mut nh = ip.nexthdr;
    let mut off = ETH_HLEN + 40;
    let mut payload = u32::from(be16(ip.payload_len));
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        i += 1;
        match nh {
            // Hop-by-hop, destination options.
            0 | 60 => {
                let h: [u8; 2] = ctx.load(off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
                let len = (u32::from(h[1]) + 1) * 8;
                nh = h[0];
                off += len;
                payload = payload.saturating_sub(len);
            }
            // Routing: type 0 (source routing) is deprecated and an attack vector.
            43 => {
                let h: [u8; 4] = ctx.load(off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
                if h[2] == 0 {
                    return Err(STAT_DROP_IPV6_EXT);
                }
                let len = (u32::from(h[1]) + 1) * 8;
                nh = h[0];
                off += len;
                payload = payload.saturating_sub(len);
            }
            44 => {
                let h: [u8; 8] = ctx.load(off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
                let frag = be16([h[2], h[3]]);
                p.frag_id = be32([h[4], h[5], h[6], h[7]]);
                if frag >> 3 != 0 {
                    p.frag = FRAG_LATER;
                } else if frag & 1 != 0 {
                    p.frag = FRAG_FIRST;
                }
                nh = h[0];
                off += 8;
                payload = payload.saturating_sub(8);
            }
            // Authentication header.
            51 => {
                let h: [u8; 2] = ctx.load(off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
                let len = (u32::from(h[1]) + 2) * 4;
                nh = h[0];
                off += len;
                payload = payload.saturating_sub(len);
            }
            _ => break,
        }
        p.has_ip_extras = true;
    }
    if matches!(nh, 0 | 60 | 43 | 44 | 51) {
        return Err(STAT_DROP_IPV6_EXT);
    }
    p.proto = nh;
    p.l4_off = off;
    p.payload_len = payload;
    parse_l4(ctx, p)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, p: &mut Pkt) -> Result<(), u32> {
    if p.frag == FRAG_LATER {
        return Ok(());
    }
    let off = p.l4_off as usize;
    match p.proto {
        IPPROTO_TCP => {
            let h: [u8; 14] = read(ctx, off).map_err(|_| STAT_DROP_TRUNCATED)?;
            p.sport = be16([h[0], h[1]]);
            p.dport = be16([h[2], h[3]]);
            p.seq = be32([h[4], h[5], h[6], h[7]]);
            p.ack = be32([h[8], h[9], h[10], h[11]]);
            let doff = u32::from(h[12] >> 4) * 4;
            p.tcp_flags = h[13];
            p.payload_len = p.payload_len.saturating_sub(doff);
            p.port_key = p.dport;
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let h: [u8; 4] = read(ctx, off).map_err(|_| STAT_DROP_TRUNCATED)?;
            p.sport = be16([h[0], h[1]]);
            p.dport = be16([h[2], h[3]]);
            p.port_key = p.dport;
        }
        _ if p.is_icmp() => {
            let h: [u8; 8] = ctx.load(off).map_err(|_| STAT_DROP_TRUNCATED)?;
            p.icmp_type = h[0];
            p.icmp_code = h[1];
            p.port_key = u16::from(h[0]) << 8 | u16::from(h[1]);
            let echo = if p.family == 4 {
                matches!(h[0], 0 | 8)
            } else {
                matches!(h[0], 128 | 129)
            };
            if echo {
                // Request and reply carry the same identifier: use it on both sides so the
                // normalised conntrack key is the same in both directions.
                let id = be16([h[4], h[5]]);
                p.sport = id;
                p.dport = id;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The tuple of the packet quoted inside an ICMP error (it was sent by the other side),
/// written into `inner`. Returns false if it cannot be read.
#[inline(never)]
pub fn parse_icmp_inner(ctx: &TcContext, p: &Pkt, inner: &mut Pkt) -> bool {
    parse_inner(ctx, p, inner).is_ok()
}

#[inline(always)]
fn parse_inner(ctx: &TcContext, p: &Pkt, inner: &mut Pkt) -> Result<(), u32> {
    let off = p.l4_off + 8;
    *inner = Pkt::empty(p.family);
    let l4_off;
    if p.family == 4 {
        let ip: Ipv4Hdr = ctx.load(off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
        inner.src = v4_mapped(ip.src);
        inner.dst = v4_mapped(ip.dst);
        inner.proto = ip.proto;
        l4_off = off + u32::from(ip.vihl & 0x0f) * 4;
    } else {
        let ip: Ipv6Hdr = ctx.load(off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
        inner.src = ip.src;
        inner.dst = ip.dst;
        // Would name an IPv4 flow's conntrack entry: not a quote of any IPv6 flow of ours.
        if is_v4_mapped(&inner.src) || is_v4_mapped(&inner.dst) {
            return Err(STAT_DROP_IPV6_EXT);
        }
        inner.proto = ip.nexthdr;
        l4_off = off + 40;
    }
    inner.l4_off = l4_off;
    match inner.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let h: [u8; 4] = ctx.load(l4_off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
            inner.sport = be16([h[0], h[1]]);
            inner.dport = be16([h[2], h[3]]);
        }
        _ if inner.is_icmp() => {
            let h: [u8; 8] = ctx.load(l4_off as usize).map_err(|_| STAT_DROP_TRUNCATED)?;
            let id = be16([h[4], h[5]]);
            inner.sport = id;
            inner.dport = id;
        }
        _ => {}
    }
    Ok(())
}

/// `::ffff:0:0/96`, the form IPv4 addresses take in keys.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let (hi, lo) = split16(a);
    hi == 0 && lo >> 32 == 0xffff
}

/// Byte-wise equality without `memcmp` (not available to eBPF).
#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a0, a1) = split16(a);
    let (b0, b1) = split16(b);
    a0 == b0 && a1 == b1
}

#[inline(always)]
pub fn split16(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

#[inline(always)]
pub fn eq6(a: &[u8; 6], b: &[u8; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}
