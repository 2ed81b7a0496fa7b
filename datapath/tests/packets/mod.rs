//! Hand-built frames for `BPF_PROG_TEST_RUN`: every header byte under the test's control
//! (IPv4 options, IPv6 extension headers, fragments, truncation), checksums computed here.
#![allow(dead_code)]

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// One's complement sum, folded, not inverted.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    let (pairs, rest) = data.as_chunks::<2>();
    for c in pairs {
        acc += u32::from(u16::from_be_bytes(*c));
    }
    if let [last] = rest {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

pub fn checksum(data: &[u8], acc: u32) -> u16 {
    !(sum(data, acc) as u16)
}

/// Pseudo-header sum for an L4 checksum.
pub fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut acc = sum(src, 0);
    acc = sum(dst, acc);
    if src.len() == 4 {
        sum(&[0, proto, (len >> 8) as u8, len as u8], acc)
    } else {
        let l = (len as u32).to_be_bytes();
        sum(&[l[0], l[1], l[2], l[3], 0, 0, 0, proto], acc)
    }
}

/// Fill in the checksum of a whole L4 segment (TCP, UDP, ICMP, ICMPv6).
pub fn fix_l4(src: &[u8], dst: &[u8], proto: u8, l4: &mut [u8]) {
    let off = match proto {
        6 => 16,
        17 => 6,
        1 | 58 => 2,
        _ => return,
    };
    if l4.len() < off + 2 {
        return;
    }
    l4[off] = 0;
    l4[off + 1] = 0;
    let acc = if proto == 1 {
        0
    } else {
        pseudo(src, dst, proto, l4.len())
    };
    let c = checksum(l4, acc);
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

pub fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    h
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// ICMP/ICMPv6 header: type, code, and the 4 bytes after the checksum (echo: id, seq).
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![ty, code, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(payload);
    h
}

pub fn echo(ty: u8, id: u16) -> Vec<u8> {
    let i = id.to_be_bytes();
    icmp(ty, 0, [i[0], i[1], 0, 1], b"ping")
}

pub fn eth(src: [u8; 6], dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet. `options` is padded to 4 bytes; `frag` is the flags/offset field (MF is
/// 0x2000, the offset in 8-byte units below it). The L4 checksum is filled in when the
/// packet is not a fragment.
pub fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    options: &[u8],
    frag: u16,
    id: u16,
    mut l4: Vec<u8>,
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    if frag == 0 {
        fix_l4(&src, &dst, proto, &mut l4);
    }
    let ihl = (20 + opts.len()) / 4;
    let total = (ihl * 4 + l4.len()) as u16;
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&opts);
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&l4);
    h
}

/// An IPv6 packet: `first_nh` names the first header after the fixed one, `ext` is the raw
/// extension-header chain, `proto` the final L4 protocol (for its checksum).
pub fn ipv6_packet(
    src: [u8; 16],
    dst: [u8; 16],
    first_nh: u8,
    ext: &[u8],
    proto: u8,
    mut l4: Vec<u8>,
    fragment: bool,
) -> Vec<u8> {
    if !fragment {
        fix_l4(&src, &dst, proto, &mut l4);
    }
    let plen = (ext.len() + l4.len()) as u16;
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&plen.to_be_bytes());
    h.extend_from_slice(&[first_nh, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(ext);
    h.extend_from_slice(&l4);
    h
}

/// `frame` (Ethernet + IPv6) with its hop limit set.
pub fn hop_limit(mut frame: Vec<u8>, limit: u8) -> Vec<u8> {
    frame[14 + 7] = limit;
    frame
}

pub fn v4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: Vec<u8>,
) -> Vec<u8> {
    eth(
        src_mac,
        dst_mac,
        ETH_P_IP,
        &ipv4_packet(src, dst, proto, &[], 0, 1, l4),
    )
}

pub fn v6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    l4: Vec<u8>,
) -> Vec<u8> {
    eth(
        src_mac,
        dst_mac,
        ETH_P_IPV6,
        &ipv6_packet(src, dst, proto, &[], proto, l4, false),
    )
}

/// An 8-byte extension header (hop-by-hop / destination options with PadN, or routing).
pub fn ext8(next: u8, kind: u8, routing_type: u8) -> Vec<u8> {
    match kind {
        43 => vec![next, 0, routing_type, 0, 0, 0, 0, 0],
        _ => vec![next, 0, 1, 4, 0, 0, 0, 0],
    }
}

/// IPv6 fragment header: offset in 8-byte units, more-fragments flag.
pub fn frag6(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let f = offset << 3 | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&f.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}
