//! The per-packet path. In order: own packets (reject answers) pass; the interface's
//! endpoint in the active generation (none: bootstrap posture); anti-spoofing on what the VM
//! sends; ARP/NDP/DHCP infrastructure; later fragments; ICMP errors of tracked flows;
//! conntrack (one lookup for established flows, re-judged when the policy epoch changed);
//! otherwise a new flow judged by policy.
use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_coarse_ns,
    programs::TcContext,
    EbpfContext,
};
use bulkhead_abi::*;

use crate::{
    conntrack,
    events::{emit, EventInfo},
    fast, flowcache,
    maps::{
        stat, EpCacheEntry, CONFIG, CONNTRACK, CPU_STATE, ENDPOINTS, EP_ADDRS, EP_CACHE_SLOTS,
        EP_STATS, FRAGS, RULE_STATS, SCRATCH_PKT,
    },
    parse::*,
    policy::{decide, Decision, Query},
    reject,
};

/// Not ours to object: TCX runs the next program, classic TC the default action (pass).
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT as i32;

/// Per-packet context, read once.
struct Cx<'a> {
    tc: &'a TcContext,
    dir: u8,
    ifindex: u32,
    cfg: Config,
    ep: EndpointInfo,
    gen: u32,
    len: u32,
}

#[inline(always)]
pub fn run(ctx: &TcContext, dir: u8) -> i32 {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer of a TC program is a valid __sk_buff.
    let (mark, ifindex, vlan) = unsafe { ((*skb).mark, (*skb).ifindex, (*skb).vlan_present) };
    if mark == REJECT_MARK {
        stat(STAT_PACKETS);
        return PASS;
    }
    // A frame's 802.1Q tag is in the metadata by now (the frame's data is what it carried
    // inside). From a VM: no VM picks its own segment. To a VM: the frame would reach it
    // tagged, another segment's traffic (from a trunk, say) on a VLAN interface of its own.
    if vlan != 0 {
        stat(STAT_PACKETS);
        stat(STAT_DROP_VLAN);
        return DROP;
    }
    // One read of the config: the whole packet is judged in one generation. Field by field:
    // a copy of the whole value would read the padding a byte at a time.
    let cfg = CONFIG
        .get(0)
        .map(|c| Config {
            epoch: c.epoch,
            event_rate: c.event_rate,
            bootstrap: c.bootstrap,
            _pad: [0; 7],
        })
        .unwrap_or_default();
    // Counts itself in `STAT_FLOW_CACHE` only, as the fast path does in `STAT_CT_FAST`.
    if let Some(rc) = flowcache::hit(ctx, dir, ifindex, &cfg) {
        return rc;
    }
    let gen = cfg.generation();
    let Some(ep) = endpoint(&cfg, ifindex) else {
        stat(STAT_PACKETS);
        return bootstrap(&cfg);
    };
    // Counts itself in `STAT_CT_FAST` only (which readers add to packets and conntrack hits).
    let rc = fast::established(ctx, dir, ifindex, &cfg, &ep);
    if rc != fast::FULL_PATH {
        return rc;
    }
    stat(STAT_PACKETS);
    let c = Cx {
        tc: ctx,
        dir,
        ifindex,
        cfg,
        ep,
        gen,
        len: ctx.len(),
    };
    match judge(&c) {
        Ok(rc) => rc,
        Err(counter) => {
            stat(counter);
            DROP
        }
    }
}

/// The interface's endpoint in the active generation, through a per-CPU direct-mapped
/// cache in front of `ENDPOINTS`: an entry tagged with the current epoch is exact, since the
/// active generation's tables never change while its epoch lasts (the writer fills the
/// inactive one, then bumps the epoch). Saves a hash lookup per packet.
#[inline(always)]
fn endpoint(cfg: &Config, ifindex: u32) -> Option<EndpointInfo> {
    // SAFETY: per-CPU value, used by this packet only.
    let cache = CPU_STATE.get_ptr_mut(0).and_then(|st| unsafe {
        (*st)
            .ep
            .get_mut((ifindex % EP_CACHE_SLOTS) as usize)
            .map(|c| c as *mut EpCacheEntry)
    });
    if let Some(c) = cache {
        // SAFETY: per-CPU value, used by this packet only.
        let c = unsafe { &*c };
        if c.valid != 0 && c.epoch == cfg.epoch && c.ifindex == ifindex {
            return Some(c.info);
        }
    }
    let gen = cfg.generation();
    // SAFETY: endpoint entries are written only in the inactive generation.
    let info = (unsafe { ENDPOINTS.get(&EndpointKey { gen, ifindex }) }).copied()?;
    if let Some(c) = cache {
        // SAFETY: per-CPU value, used by this packet only.
        let c = unsafe { &mut *c };
        c.valid = 1;
        c.epoch = cfg.epoch;
        c.ifindex = ifindex;
        c.info = info;
    }
    Some(info)
}

#[inline(always)]
fn bootstrap(cfg: &Config) -> i32 {
    if cfg.bootstrap == BOOTSTRAP_ALLOW {
        stat(STAT_PASS_BOOTSTRAP);
        PASS
    } else {
        stat(STAT_DROP_BOOTSTRAP);
        DROP
    }
}

#[inline(always)]
fn judge(c: &Cx) -> Result<i32, u32> {
    let eth: EthHdr = read(c.tc, 0).map_err(|_| STAT_DROP_TRUNCATED)?;
    if c.dir == DIR_EGRESS && !eq6(&eth.src, &c.ep.mac) {
        return Ok(spoof(c, REASON_SPOOF_MAC, None));
    }
    let ethertype = be16(eth.proto);
    // The parsed packet lives in a per-CPU scratch slot, not on the 512-byte stack
    // (TC programs do not nest on a CPU).
    let pkt = SCRATCH_PKT.get_ptr_mut(0).ok_or(STAT_DROP_TRUNCATED)?;
    // SAFETY: per-CPU value, used by this packet only.
    let pkt = unsafe { &mut *pkt };
    match ethertype {
        ETH_P_ARP => return Ok(arp(c)),
        ETH_P_IP | ETH_P_IPV6 => {
            let counter = parse_ip(c.tc, ethertype, pkt);
            if counter != 0 {
                return Err(counter);
            }
        }
        _ => return Err(STAT_DROP_NON_IP),
    }
    let pkt: &Pkt = pkt;
    if c.dir == DIR_EGRESS {
        let reason = source_check(c, pkt);
        if reason != SOURCE_OK {
            return Ok(spoof(c, reason, Some(pkt)));
        }
    }
    if is_infrastructure(c, pkt) {
        stat(STAT_PASS_INFRA);
        return Ok(PASS);
    }
    // The per-packet clock (expiries, last-hit stamps): CLOCK_MONOTONIC at tick resolution,
    // a tenth of the established path's cost cheaper than the precise boot-time clock that
    // events carry.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if pkt.frag == FRAG_LATER {
        return Ok(later_fragment(c, pkt, now));
    }
    // An ICMP error not about a tracked flow is judged by policy like any other ICMP message.
    if pkt.is_icmp_error() {
        if let Some(inner) = SCRATCH_PKT.get_ptr_mut(1) {
            // SAFETY: per-CPU value, used by this packet only.
            let inner = unsafe { &mut *inner };
            if parse_icmp_inner(c.tc, pkt, inner) && quotes_tracked_flow(c, inner, now) {
                return Ok(PASS);
            }
        }
    }
    let (key, src_is_a) = conntrack::key_for(c.ifindex, pkt);
    if let Some(e) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a valid map value; concurrent updates of one flow's entry only race on
        // timestamps and state bits, as in every eBPF conntrack.
        let e = unsafe { &mut *e };
        // A SYN on a closing or closed tuple opens a new connection (a client reusing its
        // port, as `tcp_tw_reuse` does): judged by policy again, tracked from its handshake.
        let reopen = pkt.proto == IPPROTO_TCP
            && matches!(e.state, CT_TCP_FIN_WAIT | CT_TCP_CLOSING | CT_TCP_CLOSED)
            && syn_only(pkt);
        if e.expires_ns > now && !reopen {
            return Ok(tracked(c, &eth, pkt, &key, e, src_is_a, now));
        }
        stat(STAT_CT_EXPIRED);
    }
    Ok(new_flow(c, &eth, pkt, &key, src_is_a, now))
}

/// Whether the packet an ICMP error quotes belongs to a tracked flow. A BPF subprogram
/// (parsing the quote is another), so neither frame adds to the main one.
#[inline(never)]
fn quotes_tracked_flow(c: &Cx, inner: &Pkt, now: u64) -> bool {
    let (k, _) = conntrack::key_for(c.ifindex, inner);
    // SAFETY: read-only look at a conntrack entry.
    match unsafe { CONNTRACK.get(&k) } {
        Some(e) if e.expires_ns > now => {
            stat(STAT_CT_HIT);
            count(c, e.rule, ACTION_ALLOW, now);
            true
        }
        _ => false,
    }
}

#[inline(always)]
fn syn_only(p: &Pkt) -> bool {
    p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A packet of a tracked flow: one lookup, unless the policy changed since the flow was
/// admitted, in which case the flow is judged again as its first packet was.
#[inline(always)]
fn tracked(
    c: &Cx,
    eth: &EthHdr,
    pkt: &Pkt,
    key: &CtKey,
    e: &mut CtEntry,
    src_is_a: bool,
    now: u64,
) -> i32 {
    let orig_is_a = e.flags & CT_ORIG_IS_A != 0;
    let is_orig = src_is_a == orig_is_a;
    if e.epoch != c.cfg.epoch {
        stat(STAT_CT_REJUDGED);
        let orig_dir = if e.flags & CT_ORIG_EGRESS != 0 {
            DIR_EGRESS
        } else {
            DIR_INGRESS
        };
        // The peer is the originator's destination for a flow the VM opened, else the
        // originator itself.
        let peer_is_a = (orig_dir == DIR_EGRESS) != orig_is_a;
        let peer = if peer_is_a { &key.addr_a } else { &key.addr_b };
        let d = judge_flow(c, orig_dir, peer, key.proto, e.judged_port);
        let (action, rule) = effective(c, d.verdict);
        if action == ACTION_ALLOW || action == ACTION_MONITOR {
            // The source check of an earlier epoch does not carry over (the VM's addresses
            // may have changed). Flags and rule before the epoch: the fast path trusts an
            // entry only once its epoch is the current one.
            let mut flags = e.flags & !(CT_MONITOR | CT_SRC_CHECKED);
            if action == ACTION_MONITOR {
                flags |= CT_MONITOR;
            }
            // SAFETY: valid pointers into the map value; volatile keeps the store order.
            unsafe {
                core::ptr::write_volatile(&mut e.flags, flags);
                core::ptr::write_volatile(&mut e.rule, rule);
                core::ptr::write_volatile(&mut e.epoch, c.cfg.epoch);
            }
        } else {
            let _ = CONNTRACK.remove(key);
            stat(STAT_CT_REVOKED);
            count(c, rule, ACTION_DENY, now);
            event(
                c,
                EVENT_REVOKED,
                REASON_REVOKED,
                rule,
                d.identity,
                Some(pkt),
            );
            if action == ACTION_REJECT {
                return reject::answer(c.tc, eth, pkt, c.dir, c.ifindex);
            }
            return DROP;
        }
    }
    stat(STAT_CT_HIT);
    if c.dir == DIR_EGRESS && e.flags & CT_SRC_CHECKED == 0 {
        // This packet passed the source check: if its source is the VM's side of the
        // entry, later ones may take the fast path.
        let vm_is_a = (e.flags & CT_ORIG_EGRESS != 0) == orig_is_a;
        if src_is_a == vm_is_a {
            e.flags |= CT_SRC_CHECKED;
        }
    }
    if pkt.proto == IPPROTO_TCP {
        let state = e.state;
        conntrack::tcp_advance(e, pkt.tcp_flags, is_orig);
        if e.state != state {
            // Cached slots stand for an ESTABLISHED entry only.
            flowcache::invalidate(pkt);
        }
        if e.state == CT_TCP_CLOSED {
            stat(STAT_CT_CLOSED);
        }
    } else if !is_orig && e.state != CT_REPLIED {
        // Written once: the entry's cache line is shared by both directions' CPUs.
        e.state = CT_REPLIED;
    }
    let expires = now + conntrack::timeout(pkt.proto, e.state, pkt.is_icmp());
    // A shorter timeout (closing) always applies; a longer one only past the slack.
    if expires < e.expires_ns || expires - e.expires_ns > CT_REFRESH_SLACK {
        e.expires_ns = expires;
    }
    if pkt.frag == FRAG_FIRST {
        remember_fragments(c, pkt, now);
    }
    let outcome = if e.flags & CT_MONITOR != 0 {
        ACTION_MONITOR
    } else {
        ACTION_ALLOW
    };
    count(c, e.rule, outcome, now);
    PASS
}

#[inline(always)]
fn new_flow(c: &Cx, eth: &EthHdr, pkt: &Pkt, key: &CtKey, src_is_a: bool, now: u64) -> i32 {
    if pkt.proto == IPPROTO_TCP
        && pkt.tcp_flags & TCP_SYN != 0
        && pkt.tcp_flags & (TCP_RST | TCP_FIN) != 0
    {
        stat(STAT_DROP_INVALID_TCP);
        return DROP;
    }
    let peer = if c.dir == DIR_EGRESS {
        &pkt.dst
    } else {
        &pkt.src
    };
    let d = judge_flow(c, c.dir, peer, pkt.proto, pkt.port_key);
    let log = matches!(d.verdict, Some(v) if v.flags & VERDICT_LOG != 0);
    let (action, rule) = effective(c, d.verdict);
    if action == ACTION_ALLOW || action == ACTION_MONITOR {
        // A RST opens nothing: pass it, track nothing.
        if !(pkt.proto == IPPROTO_TCP && pkt.tcp_flags & TCP_RST != 0) {
            let state = conntrack::initial_state(pkt);
            let mut flags = 0;
            if src_is_a {
                flags |= CT_ORIG_IS_A;
            }
            if c.dir == DIR_EGRESS {
                // The source check passed for this packet, whose source is the VM's side.
                flags |= CT_ORIG_EGRESS | CT_SRC_CHECKED;
            }
            if action == ACTION_MONITOR {
                flags |= CT_MONITOR;
            }
            if log {
                flags |= CT_LOG;
            }
            if pkt.proto == IPPROTO_TCP && state == CT_TCP_ESTABLISHED {
                flags |= CT_PICKUP;
                stat(STAT_CT_PICKUP);
            }
            let entry = CtEntry {
                expires_ns: now + conntrack::timeout(pkt.proto, state, pkt.is_icmp()),
                epoch: c.cfg.epoch,
                rule,
                judged_port: pkt.port_key,
                state,
                flags,
                _pad: [0; 4],
            };
            if CONNTRACK.insert(key, &entry, 0).is_ok() {
                stat(STAT_CT_CREATED);
            } else {
                stat(STAT_CT_INSERT_FAILED);
            }
            // A new entry (a tuple reused, or one evicted before): no cached slot of the
            // tuple's earlier entry may pass this flow's packets.
            flowcache::invalidate(pkt);
        }
        if pkt.frag == FRAG_FIRST {
            remember_fragments(c, pkt, now);
        }
        count(c, rule, action, now);
        if action == ACTION_MONITOR {
            stat(STAT_MONITOR_PASS);
            event(c, EVENT_MONITOR, REASON_POLICY, rule, d.identity, Some(pkt));
        } else {
            stat(STAT_PASS_POLICY);
            if log {
                event(
                    c,
                    EVENT_ALLOW_LOG,
                    REASON_POLICY,
                    rule,
                    d.identity,
                    Some(pkt),
                );
            }
        }
        return PASS;
    }
    count(c, rule, ACTION_DENY, now);
    if d.verdict.is_none() {
        stat(STAT_DROP_BOOTSTRAP);
        event(
            c,
            EVENT_BOOTSTRAP,
            REASON_BOOTSTRAP,
            rule,
            d.identity,
            Some(pkt),
        );
        return DROP;
    }
    stat(STAT_DROP_POLICY);
    if action == ACTION_REJECT {
        event(c, EVENT_REJECT, REASON_POLICY, rule, d.identity, Some(pkt));
        return reject::answer(c.tc, eth, pkt, c.dir, c.ifindex);
    }
    event(c, EVENT_DENY, REASON_POLICY, rule, d.identity, Some(pkt));
    DROP
}

#[inline(always)]
fn judge_flow(c: &Cx, dir: u8, peer: &[u8; 16], proto: u8, port: u16) -> Decision {
    let q = Query {
        peer: *peer,
        gen: c.gen,
        slot: c.ep.slot,
        port,
        dir,
        proto,
    };
    let mut d = Decision {
        verdict: None,
        identity: IDENTITY_ANY,
    };
    decide(&q, &mut d);
    d
}

/// The action to take for a verdict, with the endpoint's monitor mode and the bootstrap
/// posture (no verdict: the endpoint has no policy in this generation) applied.
#[inline(always)]
fn effective(c: &Cx, verdict: Option<Verdict>) -> (u8, u32) {
    match verdict {
        None if c.cfg.bootstrap == BOOTSTRAP_ALLOW => (ACTION_ALLOW, RULE_DEFAULT),
        None => (ACTION_DENY, RULE_DEFAULT),
        Some(v) => {
            let monitor = c.ep.flags & EP_MONITOR != 0;
            if monitor && (v.action == ACTION_DENY || v.action == ACTION_REJECT) {
                (ACTION_MONITOR, v.rule)
            } else {
                (v.action, v.rule)
            }
        }
    }
}

#[inline(always)]
fn frag_key(c: &Cx, p: &Pkt) -> FragKey {
    FragKey {
        ifindex: c.ifindex,
        id: p.frag_id,
        src: p.src,
        dst: p.dst,
        proto: p.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn remember_fragments(c: &Cx, p: &Pkt, now: u64) {
    let e = FragEntry {
        expires_ns: now + FRAG_TIMEOUT,
    };
    let _ = FRAGS.insert(&frag_key(c, p), &e, 0);
}

#[inline(always)]
fn later_fragment(c: &Cx, p: &Pkt, now: u64) -> i32 {
    // SAFETY: read-only look at a fragment entry.
    match unsafe { FRAGS.get(&frag_key(c, p)) } {
        Some(e) if e.expires_ns > now => {
            stat(STAT_FRAG_PASS);
            PASS
        }
        _ => {
            stat(STAT_DROP_FRAGMENT);
            DROP
        }
    }
}

#[inline(always)]
fn owns(c: &Cx, addr: &[u8; 16]) -> bool {
    let k = EndpointAddrKey {
        gen: c.gen,
        slot: c.ep.slot,
        addr: *addr,
    };
    // SAFETY: read-only presence check.
    unsafe { EP_ADDRS.get(&k) }.is_some()
}

#[inline(always)]
fn is_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

#[inline(always)]
fn is_unspecified(a: &[u8; 16]) -> bool {
    let (x, y) = split16(a);
    x == 0 && y == 0
}

const V4_UNSPECIFIED: [u8; 16] = v4_mapped([0, 0, 0, 0]);

const SOURCE_OK: u8 = 0xff;

/// What the VM sends must come from its own addresses; it may not act as DHCP server or
/// router, nor claim others' addresses in neighbour discovery. Returns `SOURCE_OK` or the
/// `REASON_*` of the spoofing attempt. A BPF subprogram.
#[inline(never)]
fn source_check(c: &Cx, p: &Pkt) -> u8 {
    match spoof_reason(c, p) {
        Some(reason) => reason,
        None => SOURCE_OK,
    }
}

#[inline(always)]
fn spoof_reason(c: &Cx, p: &Pkt) -> Option<u8> {
    let icmp6 = p.family == 6 && p.proto == IPPROTO_ICMPV6 && p.frag != FRAG_LATER;
    if c.ep.flags & EP_INFRA_SERVER == 0 {
        let dhcp_server = if p.family == 4 { 67 } else { 547 };
        if p.proto == IPPROTO_UDP && p.frag != FRAG_LATER && p.sport == dhcp_server {
            return Some(REASON_ROGUE_DHCP);
        }
        if icmp6 && (p.icmp_type == 134 || p.icmp_type == 137) {
            return Some(REASON_ROGUE_RA);
        }
    }
    if icmp6 && p.icmp_type == 136 {
        let Ok(target) = c.tc.load::<[u8; 16]>(p.l4_off as usize + 8) else {
            return Some(REASON_SPOOF_ND);
        };
        if !is_link_local(&target) && !owns(c, &target) {
            return Some(REASON_SPOOF_ND);
        }
    }
    if owns(c, &p.src) {
        return None;
    }
    if p.family == 4 {
        // DHCP discover/request before the VM has an address.
        if eq16(&p.src, &V4_UNSPECIFIED) && p.proto == IPPROTO_UDP && p.sport == 68 && p.dport == 67
        {
            return None;
        }
        return Some(REASON_SPOOF_IP);
    }
    if is_link_local(&p.src) {
        return None;
    }
    // Duplicate address detection, router solicitation and MLD reports before an address.
    if is_unspecified(&p.src) && icmp6 && matches!(p.icmp_type, 133 | 135 | 143) {
        return None;
    }
    Some(REASON_SPOOF_IP)
}

/// DHCP, DHCPv6, neighbour discovery and MLD keep working whatever the policy says (after
/// the source checks above) — and only they: nothing else may pass as infrastructure.
/// - DHCP client requests only to the broadcast address (v4) or the DHCPv6 servers' link-scope
///   group; a unicast renewal to a server is judged by policy (declare the server a system
///   endpoint; without it the client falls back to a broadcast rebind).
/// - DHCP answers to the client port; DHCPv6 answers only from a link-local address (servers
///   and relays on the link answer from theirs).
/// - NDP only with hop limit 255 (RFC 4861 7.1.1: it was not forwarded); MLD only with hop
///   limit 1 from a link-local or unspecified source (RFC 3810 5.1.15, 7.4).
#[inline(always)]
fn is_infrastructure(c: &Cx, p: &Pkt) -> bool {
    if p.frag == FRAG_LATER {
        return false;
    }
    if p.proto == IPPROTO_UDP {
        return match (p.family, c.dir == DIR_EGRESS) {
            (4, true) => p.sport == 68 && p.dport == 67 && eq16(&p.dst, &V4_BROADCAST),
            (4, false) => p.sport == 67 && p.dport == 68,
            (_, true) => p.sport == 546 && p.dport == 547 && eq16(&p.dst, &ALL_DHCP_SERVERS),
            (_, false) => p.sport == 547 && p.dport == 546 && is_link_local(&p.src),
        };
    }
    if p.family != 6 || p.proto != IPPROTO_ICMPV6 {
        return false;
    }
    match p.icmp_type {
        133..=137 => p.hop_limit == 255,
        130..=132 | 143 => p.hop_limit == 1 && (is_link_local(&p.src) || is_unspecified(&p.src)),
        _ => false,
    }
}

const V4_BROADCAST: [u8; 16] = v4_mapped([255, 255, 255, 255]);
/// ff02::1:2, All_DHCP_Relay_Agents_and_Servers.
const ALL_DHCP_SERVERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];

/// ARP: what the VM sends must name its own MAC and one of its addresses (or 0.0.0.0 for a
/// probe); ARP towards the VM passes. A BPF subprogram.
#[inline(never)]
fn arp(c: &Cx) -> i32 {
    match arp_check(c) {
        Ok(rc) => rc,
        Err(counter) => {
            stat(counter);
            DROP
        }
    }
}

#[inline(always)]
fn arp_check(c: &Cx) -> Result<i32, u32> {
    if c.dir == DIR_INGRESS {
        stat(STAT_PASS_INFRA);
        return Ok(PASS);
    }
    let a: [u8; 28] =
        c.tc.load(ETH_HLEN as usize)
            .map_err(|_| STAT_DROP_TRUNCATED)?;
    // Ethernet/IPv4 ARP only.
    if a[0] != 0 || a[1] != 1 || a[2] != 8 || a[3] != 0 || a[4] != 6 || a[5] != 4 {
        return Err(STAT_DROP_NON_IP);
    }
    let sha = [a[8], a[9], a[10], a[11], a[12], a[13]];
    let spa = [a[14], a[15], a[16], a[17]];
    if !eq6(&sha, &c.ep.mac) {
        return Ok(spoof(c, REASON_SPOOF_ARP, None));
    }
    if spa != [0, 0, 0, 0] && !owns(c, &v4_mapped(spa)) {
        return Ok(spoof(c, REASON_SPOOF_ARP, None));
    }
    stat(STAT_PASS_INFRA);
    Ok(PASS)
}

#[inline(always)]
fn spoof(c: &Cx, reason: u8, pkt: Option<&Pkt>) -> i32 {
    stat(STAT_DROP_SPOOF);
    if let Some(s) = EP_STATS.get_ptr_mut(c.ep.slot) {
        // SAFETY: per-CPU value.
        unsafe { (*s).spoof_drops += 1 };
    }
    event(c, EVENT_SPOOF, reason, RULE_DEFAULT, IDENTITY_ANY, pkt);
    DROP
}

#[inline(always)]
fn event(c: &Cx, kind: u8, reason: u8, rule: u32, identity: u32, pkt: Option<&Pkt>) {
    let info = EventInfo {
        kind,
        reason,
        direction: c.dir,
        ifindex: c.ifindex,
        slot: c.ep.slot,
        epoch: c.cfg.epoch,
        rule,
        identity,
        packet_len: c.len,
    };
    emit(c.cfg.event_rate, &info, pkt);
}

/// Per-rule and per-endpoint counters (per CPU). `now` is the packet's one clock read,
/// shared with conntrack.
#[inline(always)]
fn count(c: &Cx, rule: u32, outcome: u8, now: u64) {
    count_raw(c.gen, c.ep.slot, c.dir, c.len, rule, outcome, now);
}

#[inline(always)]
pub fn count_raw(gen: u32, slot: u32, dir: u8, len: u32, rule: u32, outcome: u8, now: u64) {
    count_rule(rule_stats_index(gen, rule), len, now);
    count_endpoint(slot, dir, len, outcome, now);
}

/// One packet of `len` bytes for the rule at `RULE_STATS[index]`, last hit at `now`.
#[inline(always)]
fn count_rule(index: u32, len: u32, now: u64) {
    if let Some(r) = RULE_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value.
        let r = unsafe { &mut *r };
        r.packets += 1;
        r.bytes += u64::from(len);
        if now > r.last_hit_ns {
            r.last_hit_ns = now;
        }
    }
}

/// One packet of `len` bytes in direction `dir` for the endpoint at `EP_STATS[slot]`.
#[inline(always)]
fn count_endpoint(slot: u32, dir: u8, len: u32, outcome: u8, now: u64) {
    if let Some(s) = EP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value.
        let s = unsafe { &mut *s };
        let d = usize::from(dir & 1);
        let len = u64::from(len);
        if outcome == ACTION_DENY || outcome == ACTION_REJECT {
            s.deny_packets[d] += 1;
            s.deny_bytes[d] += len;
        } else {
            s.allow_packets[d] += 1;
            s.allow_bytes[d] += len;
            if outcome == ACTION_MONITOR {
                s.monitor_packets[d] += 1;
            }
        }
        if now > s.last_hit_ns {
            s.last_hit_ns = now;
        }
    }
}
