//! The controller–agent protocol: generated gRPC types ([`pb`]), conversions between the
//! compiler's [`HostTables`] and the wire form, the tables digest both ends agree on, deltas,
//! and the PKI (CA, host and admin certificates; identities from peer certificates).
pub mod pki;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange, SharedVec};
use bulkhead_abi::{PolicyKey, Verdict};
use sha2::{Digest, Sha256};

pub mod pb {
    tonic::include_proto!("bulkhead.v1");
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("address of {len} bytes (4 or 16 expected)")]
    Address { len: usize },
    #[error("MAC of {len} bytes (6 expected)")]
    Mac { len: usize },
    #[error("field {field} = {value} out of range")]
    Range { field: &'static str, value: u32 },
    #[error("policy entry names unknown endpoint {0:?}")]
    UnknownEndpoint(String),
    #[error("delta is against {base}, the agent holds {held}")]
    BaseMismatch { base: String, held: String },
    #[error("tables after the delta have digest {got}, the controller said {want}")]
    DigestMismatch { got: String, want: String },
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn addr_from(b: &[u8]) -> Result<IpAddr, WireError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(b);
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        len => Err(WireError::Address { len }),
    }
}

fn narrow<T: TryFrom<u32>>(field: &'static str, value: u32) -> Result<T, WireError> {
    T::try_from(value).map_err(|_| WireError::Range { field, value })
}

fn policy_to_pb(t: &HostTables, k: &PolicyKey, v: &Verdict) -> pb::PolicyEntry {
    pb::PolicyEntry {
        endpoint: t
            .endpoints
            .get(k.slot as usize)
            .map(|e| e.id.clone())
            .unwrap_or_default(),
        identity: k.identity,
        port_class: k.port_class,
        direction: u32::from(k.direction),
        proto: u32::from(k.proto),
        action: u32::from(v.action),
        flags: u32::from(v.flags),
        rule: v.rule,
    }
}

fn endpoint_to_pb(e: &EndpointTable) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id.clone(),
        mac: e.mac.to_vec(),
        addrs: e.addrs.iter().map(addr_bytes).collect(),
        flags: e.flags,
    }
}

fn endpoint_from_pb(e: &pb::Endpoint) -> Result<EndpointTable, WireError> {
    let mac: [u8; 6] = e
        .mac
        .as_slice()
        .try_into()
        .map_err(|_| WireError::Mac { len: e.mac.len() })?;
    Ok(EndpointTable {
        id: e.id.clone(),
        mac,
        addrs: e
            .addrs
            .iter()
            .map(|a| addr_from(a))
            .collect::<Result<_, _>>()?,
        flags: e.flags,
    })
}

fn ipcache_to_pb(e: &IpcacheEntry) -> pb::IpcacheEntry {
    pb::IpcacheEntry {
        addr: addr_bytes(&e.addr),
        prefix_len: u32::from(e.prefix_len),
        identity: e.identity,
    }
}

fn ipcache_from_pb(e: &pb::IpcacheEntry) -> Result<IpcacheEntry, WireError> {
    Ok(IpcacheEntry {
        addr: addr_from(&e.addr)?,
        prefix_len: narrow("prefix_len", e.prefix_len)?,
        identity: e.identity,
    })
}

fn port_class_to_pb(r: &PortClassRange) -> pb::PortClass {
    pb::PortClass {
        kind: r.kind,
        first: u32::from(r.first),
        last: u32::from(r.last),
        class: r.class,
    }
}

fn port_class_from_pb(r: &pb::PortClass) -> Result<PortClassRange, WireError> {
    Ok(PortClassRange {
        kind: r.kind,
        first: narrow("first", r.first)?,
        last: narrow("last", r.last)?,
        class: r.class,
    })
}

/// Put tables in canonical order (endpoints by id, everything else sorted), so that equal
/// content has one encoding and one digest.
pub fn canonicalize(t: &HostTables) -> HostTables {
    canonicalize_with(t, false)
}

/// [`canonicalize`], told whether the ipcache is known to be canonical already (the bulk of
/// large tables: not scanned again).
fn canonicalize_with(t: &HostTables, ipcache_canonical: bool) -> HostTables {
    let mut order: Vec<usize> = (0..t.endpoints.len()).collect();
    order.sort_by(|a, b| t.endpoints[*a].id.cmp(&t.endpoints[*b].id));
    let mut new_slot = vec![0u32; t.endpoints.len()];
    for (new, old) in order.iter().enumerate() {
        new_slot[*old] = new as u32;
    }
    let mut out = HostTables {
        endpoints: order.iter().map(|i| t.endpoints[*i].clone()).collect(),
        ipcache: t.ipcache.clone(),
        port_classes: t.port_classes.clone(),
        policy: t
            .policy
            .iter()
            .filter(|(k, _)| (k.slot as usize) < new_slot.len())
            .map(|(k, v)| {
                let mut k = *k;
                k.slot = new_slot[k.slot as usize];
                (k, *v)
            })
            .collect(),
        rules: t.rules.clone(),
    };
    for e in &mut out.endpoints {
        e.addrs.sort();
        e.addrs.dedup();
    }
    if !ipcache_canonical && !ipcache_is_canonical(&out.ipcache) {
        let mut ipcache = out.ipcache.to_vec();
        ipcache.sort();
        ipcache.dedup();
        out.ipcache = ipcache.into();
    }
    out.port_classes.sort();
    out.policy.sort_by_key(|(k, _)| *k);
    out
}

/// Are the tables already what [`canonicalize`] makes of them? (The compiler's output is,
/// as a rule: then nothing needs copying.)
pub fn is_canonical(t: &HostTables) -> bool {
    is_canonical_but_ipcache(t) && ipcache_is_canonical(&t.ipcache)
}

fn is_canonical_but_ipcache(t: &HostTables) -> bool {
    t.endpoints.windows(2).all(|w| w[0].id <= w[1].id)
        && t.endpoints
            .iter()
            .all(|e| e.addrs.windows(2).all(|w| w[0] < w[1]))
        && t.port_classes.windows(2).all(|w| w[0] <= w[1])
        && t.policy.windows(2).all(|w| w[0].0 <= w[1].0)
        && t.policy
            .iter()
            .all(|(k, _)| (k.slot as usize) < t.endpoints.len())
}

fn ipcache_is_canonical(ipcache: &[IpcacheEntry]) -> bool {
    ipcache
        .windows(2)
        .all(|w| ipcache_order(&w[0]) < ipcache_order(&w[1]))
}

/// The order of [`IpcacheEntry`] (address family, address, prefix length, identity) as
/// integers: compared without going through the addresses' byte arrays.
#[inline]
fn ipcache_order(e: &IpcacheEntry) -> (u8, u128, u8, u32) {
    match e.addr {
        IpAddr::V4(a) => (0, u128::from(u32::from(a)), e.prefix_len, e.identity),
        IpAddr::V6(a) => (1, u128::from(a), e.prefix_len, e.identity),
    }
}

/// The canonical form of `t`, borrowed when `t` already is canonical.
pub fn canonical(t: &HostTables) -> Cow<'_, HostTables> {
    if is_canonical(t) {
        Cow::Borrowed(t)
    } else {
        Cow::Owned(canonicalize(t))
    }
}

/// Tables in canonical order ([`canonicalize`]): what encodings, digests and deltas are
/// defined over. Both ends hold their tables in this form, so that nothing is checked or
/// sorted again on the way (the ipcache alone is tens of thousands of entries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canonical(HostTables);

impl Canonical {
    /// `t` in canonical order (copied and sorted only where it is not).
    pub fn new(t: HostTables) -> Self {
        Self::with_ipcache_known(t, false)
    }

    /// [`Canonical::new`], told whether the ipcache is known to be canonical already.
    fn with_ipcache_known(t: HostTables, ipcache_canonical: bool) -> Self {
        if is_canonical_but_ipcache(&t) && (ipcache_canonical || ipcache_is_canonical(&t.ipcache)) {
            Self(t)
        } else {
            Self(canonicalize_with(&t, ipcache_canonical))
        }
    }

    pub fn into_inner(self) -> HostTables {
        self.0
    }

    /// The digests of these tables (see [`Digests`]).
    pub fn digests(&self) -> Digests {
        digests_canonical(&self.0)
    }
}

impl std::ops::Deref for Canonical {
    type Target = HostTables;
    fn deref(&self) -> &HostTables {
        &self.0
    }
}

/// Wire form of (canonicalised) tables.
pub fn tables_to_pb(t: &HostTables) -> pb::Tables {
    let t = canonical(t);
    pb::Tables {
        endpoints: t.endpoints.iter().map(endpoint_to_pb).collect(),
        ipcache: t.ipcache.iter().map(ipcache_to_pb).collect(),
        port_classes: t.port_classes.iter().map(port_class_to_pb).collect(),
        policy: t
            .policy
            .iter()
            .map(|(k, v)| policy_to_pb(&t, k, v))
            .collect(),
        rules: t.rules.to_vec(),
    }
}

/// Policy entries of wire form in the tables' slots: endpoint ids must name endpoints.
fn policy_from_pb(
    endpoints: &[EndpointTable],
    entries: &[pb::PolicyEntry],
) -> Result<Vec<(PolicyKey, Verdict)>, WireError> {
    let slots: BTreeMap<&str, u32> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i as u32))
        .collect();
    let mut policy = Vec::with_capacity(entries.len());
    for e in entries {
        let slot = *slots
            .get(e.endpoint.as_str())
            .ok_or_else(|| WireError::UnknownEndpoint(e.endpoint.clone()))?;
        policy.push((
            PolicyKey::new(
                0,
                slot,
                narrow("direction", e.direction)?,
                e.identity,
                narrow("proto", e.proto)?,
                e.port_class,
            ),
            Verdict::new(
                narrow("action", e.action)?,
                narrow("flags", e.flags)?,
                e.rule,
            ),
        ));
    }
    Ok(policy)
}

pub fn tables_from_pb(p: &pb::Tables) -> Result<HostTables, WireError> {
    canonical_from_pb(p).map(Canonical::into_inner)
}

fn canonical_from_pb(p: &pb::Tables) -> Result<Canonical, WireError> {
    let endpoints: Vec<EndpointTable> = p
        .endpoints
        .iter()
        .map(endpoint_from_pb)
        .collect::<Result<_, _>>()?;
    let policy = policy_from_pb(&endpoints, &p.policy)?;
    Ok(Canonical::new(HostTables {
        ipcache: p
            .ipcache
            .iter()
            .map(ipcache_from_pb)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        port_classes: p
            .port_classes
            .iter()
            .map(port_class_from_pb)
            .collect::<Result<_, _>>()?,
        endpoints,
        policy,
        rules: p.rules.clone().into(),
    }))
}

/// The tables a snapshot carries, checked against the digest it names (a snapshot is what
/// an agent will enforce and later apply deltas to: its digest must be the tables').
pub fn snapshot_tables(s: &pb::Snapshot) -> Result<(Canonical, Digests), WireError> {
    let tables = match &s.tables {
        Some(t) => canonical_from_pb(t)?,
        None => Canonical::default(),
    };
    let got = tables.digests();
    if got.tables != s.digest {
        return Err(WireError::DigestMismatch {
            got: got.tables,
            want: s.digest.clone(),
        });
    }
    Ok((tables, got))
}

/// Protobuf encoding written straight from [`HostTables`], byte for byte what prost makes of
/// [`tables_to_pb`] (proto3: fields in number order, zero scalars and empty strings left out,
/// repeated elements always written) without building the intermediate messages. Every field
/// number here is below 16, so every key is one byte.
mod encode {
    use super::*;

    const VARINT: u8 = 0;
    const LEN: u8 = 2;

    #[inline]
    fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }
    #[inline]
    fn varint(b: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            b.push(v as u8 | 0x80);
            v >>= 7;
        }
        b.push(v as u8);
    }
    #[inline]
    fn key(b: &mut Vec<u8>, field: u8, wire: u8) {
        b.push(field << 3 | wire);
    }
    /// A scalar field (left out when zero).
    #[inline]
    fn uint(b: &mut Vec<u8>, field: u8, v: u32) {
        if v != 0 {
            key(b, field, VARINT);
            varint(b, u64::from(v));
        }
    }
    #[inline]
    fn len_uint(v: u32) -> usize {
        if v == 0 {
            0
        } else {
            1 + varint_len(u64::from(v))
        }
    }
    /// A string or bytes element of a repeated field (always written).
    #[inline]
    fn bytes_elem(b: &mut Vec<u8>, field: u8, v: &[u8]) {
        key(b, field, LEN);
        varint(b, v.len() as u64);
        b.extend_from_slice(v);
    }
    #[inline]
    fn len_bytes_elem(n: usize) -> usize {
        1 + varint_len(n as u64) + n
    }
    /// A singular string or bytes field (left out when empty).
    #[inline]
    fn bytes(b: &mut Vec<u8>, field: u8, v: &[u8]) {
        if !v.is_empty() {
            bytes_elem(b, field, v);
        }
    }
    #[inline]
    fn len_bytes(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            len_bytes_elem(n)
        }
    }
    /// Key and length of an embedded message.
    #[inline]
    fn message(b: &mut Vec<u8>, field: u8, len: usize) {
        key(b, field, LEN);
        varint(b, len as u64);
    }
    #[inline]
    fn octets(a: &IpAddr) -> ([u8; 16], usize) {
        let mut o = [0u8; 16];
        match a {
            IpAddr::V4(v) => {
                o[..4].copy_from_slice(&v.octets());
                (o, 4)
            }
            IpAddr::V6(v) => (v.octets(), 16),
        }
    }

    fn endpoint(b: &mut Vec<u8>, e: &EndpointTable) {
        let addrs: usize = e
            .addrs
            .iter()
            .map(|a| len_bytes_elem(if a.is_ipv4() { 4 } else { 16 }))
            .sum();
        let len = len_bytes(e.id.len()) + len_bytes(e.mac.len()) + addrs + len_uint(e.flags);
        message(b, 1, len);
        bytes(b, 1, e.id.as_bytes());
        bytes(b, 2, &e.mac);
        for a in &e.addrs {
            let (o, n) = octets(a);
            bytes_elem(b, 3, &o[..n]);
        }
        uint(b, 4, e.flags);
    }
    /// Varint into a small buffer at `at`; returns the new position.
    #[inline]
    fn put_varint(x: &mut [u8], mut at: usize, mut v: u32) -> usize {
        while v >= 0x80 {
            x[at] = v as u8 | 0x80;
            v >>= 7;
            at += 1;
        }
        x[at] = v as u8;
        at + 1
    }
    /// One ipcache element, assembled on the stack (its body is at most 27 bytes, so its
    /// length is one byte) and appended at once: the bulk of large tables.
    #[inline]
    fn ipcache(b: &mut Vec<u8>, e: &IpcacheEntry) {
        let (o, n) = octets(&e.addr);
        let (plen, id) = (u32::from(e.prefix_len), e.identity);
        let mut x = [0u8; 32];
        x[0] = 2 << 3 | LEN;
        x[1] = (2 + n + len_uint(plen) + len_uint(id)) as u8;
        x[2] = 1 << 3 | LEN;
        x[3] = n as u8;
        x[4..4 + n].copy_from_slice(&o[..n]);
        let mut at = 4 + n;
        if plen != 0 {
            x[at] = 2 << 3 | VARINT;
            at = put_varint(&mut x, at + 1, plen);
        }
        if id != 0 {
            x[at] = 3 << 3 | VARINT;
            at = put_varint(&mut x, at + 1, id);
        }
        b.extend_from_slice(&x[..at]);
    }
    fn port_class(b: &mut Vec<u8>, r: &PortClassRange) {
        let (first, last) = (u32::from(r.first), u32::from(r.last));
        message(
            b,
            3,
            len_uint(r.kind) + len_uint(first) + len_uint(last) + len_uint(r.class),
        );
        uint(b, 1, r.kind);
        uint(b, 2, first);
        uint(b, 3, last);
        uint(b, 4, r.class);
    }
    fn policy(b: &mut Vec<u8>, id: &str, k: &PolicyKey, v: &Verdict) {
        let (dir, proto) = (u32::from(k.direction), u32::from(k.proto));
        let (action, flags) = (u32::from(v.action), u32::from(v.flags));
        let len = len_bytes(id.len())
            + len_uint(k.identity)
            + len_uint(k.port_class)
            + len_uint(dir)
            + len_uint(proto)
            + len_uint(action)
            + len_uint(flags)
            + len_uint(v.rule);
        message(b, 4, len);
        bytes(b, 1, id.as_bytes());
        uint(b, 2, k.identity);
        uint(b, 3, k.port_class);
        uint(b, 4, dir);
        uint(b, 5, proto);
        uint(b, 6, action);
        uint(b, 7, flags);
        uint(b, 8, v.rule);
    }

    /// Which sections of the `pb::Tables` encoding [`tables`] writes.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(super) enum Sections {
        All,
        /// The host's own sections: everything but the ipcache and the rules (the parts
        /// shared with other hosts, whose digests stand in for them).
        Own,
    }

    /// The rule ids of the `pb::Tables` encoding; `flush` as in [`tables`].
    pub(super) fn rules_section(
        rules: &[String],
        b: &mut Vec<u8>,
        flush: &mut dyn FnMut(&mut Vec<u8>),
    ) {
        for r in rules {
            bytes_elem(b, 5, r.as_bytes());
            flush(b);
        }
    }

    /// The ipcache elements of the `pb::Tables` encoding; `flush` as in [`tables`].
    pub(super) fn ipcache_section(
        ipc: &[IpcacheEntry],
        b: &mut Vec<u8>,
        flush: &mut dyn FnMut(&mut Vec<u8>),
    ) {
        // The bulk of large tables: flushed in runs.
        for run in ipc.chunks(256) {
            b.reserve(run.len() * 29);
            for e in run {
                ipcache(b, e);
            }
            flush(b);
        }
    }

    /// `pb::Tables` encoding of canonical tables into `b`; `flush` is offered the buffer
    /// after every element (to hash it in pieces instead of holding it whole).
    pub(super) fn tables(
        t: &HostTables,
        sections: Sections,
        b: &mut Vec<u8>,
        flush: &mut dyn FnMut(&mut Vec<u8>),
    ) {
        for e in &t.endpoints {
            endpoint(b, e);
            flush(b);
        }
        if sections == Sections::All {
            ipcache_section(&t.ipcache, b, flush);
        }
        for r in &t.port_classes {
            port_class(b, r);
        }
        flush(b);
        let id = |slot: u32| t.endpoints.get(slot as usize).map_or("", |e| e.id.as_str());
        for (k, v) in &t.policy {
            policy(b, id(k.slot), k, v);
            flush(b);
        }
        if sections == Sections::All {
            rules_section(&t.rules, b, flush);
        }
    }

    /// An upper bound on the encoded size, for one allocation.
    pub(super) fn size_hint(t: &HostTables) -> usize {
        64 + t.ipcache.len() * 24
            + t.policy.len() * 48
            + t.port_classes.len() * 16
            + t.endpoints
                .iter()
                .map(|e| e.id.len() + 24 + e.addrs.len() * 18)
                .sum::<usize>()
            + t.rules.iter().map(|r| r.len() + 6).sum::<usize>()
    }
}

/// The canonical wire encoding of the tables: the protobuf encoding of [`tables_to_pb`],
/// written directly.
pub fn encode_tables(t: &HostTables) -> Vec<u8> {
    let t = canonical(t);
    let mut b = Vec::with_capacity(encode::size_hint(&t));
    encode::tables(&t, encode::Sections::All, &mut b, &mut |_| {});
    b
}

/// What both ends name tables by, and the parts of it that many hosts and revisions share.
///
/// `ipcache` = SHA-256 of the ipcache elements' canonical wire encoding; `rules` = SHA-256 of
/// the rule ids' wire encoding; `tables` = hex SHA-256 of (`ipcache` ‖ `rules` ‖ the
/// canonical wire encoding of the rest: endpoints, port classes, policy). The ipcache and
/// the rule ids are the bulk of large tables and the same on every host whose rules name
/// the same peers, and across revisions that move no address or rename no rule: each is
/// hashed once per content (the controller, once per compile for all hosts sharing it; the
/// agent, only when a delta changes it), while the digest still covers every byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    pub tables: String,
    pub ipcache: [u8; 32],
    pub rules: [u8; 32],
}

/// Feed an encoder's output to a hash in pieces, never holding the encoding whole.
fn hash_encoded(write: impl FnOnce(&mut Vec<u8>, &mut dyn FnMut(&mut Vec<u8>))) -> [u8; 32] {
    const PIECE: usize = 16 << 10;
    let mut h = Sha256::new();
    let mut b = Vec::with_capacity(PIECE + 4096);
    write(&mut b, &mut |b: &mut Vec<u8>| {
        if b.len() >= PIECE {
            h.update(&b[..]);
            b.clear();
        }
    });
    h.update(&b);
    h.finalize().into()
}

/// The digest of a (canonical) ipcache: see [`Digests`].
pub fn ipcache_digest(ipcache: &[IpcacheEntry]) -> [u8; 32] {
    hash_encoded(|b, flush| encode::ipcache_section(ipcache, b, flush))
}

/// The digest of a rule id list: see [`Digests`].
pub fn rules_digest(rules: &[String]) -> [u8; 32] {
    hash_encoded(|b, flush| encode::rules_section(rules, b, flush))
}

/// The digests of canonical tables whose shared parts' digests are known.
fn digests_with(t: &HostTables, ipcache: [u8; 32], rules: [u8; 32]) -> Digests {
    let tables = hex(&hash_encoded(|b, flush| {
        b.extend_from_slice(&ipcache);
        b.extend_from_slice(&rules);
        encode::tables(t, encode::Sections::Own, b, flush)
    }));
    Digests {
        tables,
        ipcache,
        rules,
    }
}

fn digests_canonical(t: &HostTables) -> Digests {
    digests_with(t, ipcache_digest(&t.ipcache), rules_digest(&t.rules))
}

/// The digests of `t` (see [`Digests`]).
pub fn digests(t: &HostTables) -> Digests {
    digests_canonical(&canonical(t))
}

/// The tables digest of `t` (see [`Digests`]).
pub fn digest(t: &HostTables) -> String {
    digests(t).tables
}

/// Shared parts already held elsewhere (the previous revision's), by their digests.
#[derive(Default)]
pub struct HeldParts {
    pub ipcaches: HashMap<[u8; 32], SharedVec<IpcacheEntry>>,
    pub rules: HashMap<[u8; 32], SharedVec<String>>,
}

impl HeldParts {
    /// Hold the shared parts of `t`, whose digests are `d`.
    pub fn hold(&mut self, t: &HostTables, d: &Digests) {
        self.ipcaches
            .entry(d.ipcache)
            .or_insert_with(|| t.ipcache.clone());
        self.rules.entry(d.rules).or_insert_with(|| t.rules.clone());
    }
}

/// One shared part over a call of [`digests_of_many`]: by the address of an input's part,
/// its digest and the (canonical, possibly held) part that replaces it. The inputs are kept
/// until the memo is dropped, so no other allocation can take one of their addresses.
struct PartMemo<T> {
    seen: HashMap<*const T, ([u8; 32], SharedVec<T>)>,
    inputs: Vec<SharedVec<T>>,
}

impl<T: Clone> PartMemo<T> {
    fn new() -> Self {
        Self {
            seen: HashMap::new(),
            inputs: Vec::new(),
        }
    }

    /// Has an input with this part's allocation been seen?
    fn knows(&self, input: &SharedVec<T>) -> bool {
        self.seen.contains_key(&input.as_ptr())
    }

    /// The digest of `part`, the canonical form of `input`, and `part` set to what the
    /// output holds: the replacement recorded for `input` if it was seen, else `part` or a
    /// held part with the same digest (recorded for later inputs sharing `input`).
    fn share(
        &mut self,
        input: SharedVec<T>,
        part: &mut SharedVec<T>,
        digest: fn(&[T]) -> [u8; 32],
        held: &HashMap<[u8; 32], SharedVec<T>>,
    ) -> [u8; 32] {
        if let Some((d, shared)) = self.seen.get(&input.as_ptr()) {
            *part = shared.clone();
            return *d;
        }
        let d = digest(part);
        if let Some(h) = held.get(&d) {
            *part = h.clone();
        }
        self.seen.insert(input.as_ptr(), (d, part.clone()));
        self.inputs.push(input);
        d
    }
}

/// Many hosts' tables in canonical form, with their digests; each shared part (ipcache, rule
/// ids) is checked and hashed once. The compiler gives hosts with the same peers one ipcache
/// and every host one rule list ([`SharedVec`]s), recognised here by address. A part whose
/// contents equal one in `held` (same digest) is replaced by that one: one allocation across
/// revisions, and a delta between them sees the unchanged part by pointer.
pub fn digests_of_many(tables: Vec<HostTables>, held: &HeldParts) -> Vec<(Canonical, Digests)> {
    let mut ipcaches = PartMemo::new();
    let mut rules = PartMemo::new();
    tables
        .into_iter()
        .map(|t| {
            let (ipcache_in, rules_in) = (t.ipcache.clone(), t.rules.clone());
            // A seen ipcache is replaced by its canonical form below: not checked again.
            let known = ipcaches.knows(&ipcache_in);
            let mut t = Canonical::with_ipcache_known(t, known).0;
            let ipcache =
                ipcaches.share(ipcache_in, &mut t.ipcache, ipcache_digest, &held.ipcaches);
            let rules = rules.share(rules_in, &mut t.rules, rules_digest, &held.rules);
            let digests = digests_with(&t, ipcache, rules);
            (Canonical(t), digests)
        })
        .collect()
}

pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// A policy entry's identity in deltas: endpoint id and the key fields.
type PolicyId<'a> = (&'a str, u32, u32, u8, u8);

fn policy_ids<'a>(t: &'a HostTables) -> BTreeMap<PolicyId<'a>, &'a Verdict> {
    t.policy
        .iter()
        .filter_map(|(k, v)| {
            let id = t.endpoints.get(k.slot as usize)?.id.as_str();
            Some(((id, k.identity, k.port_class, k.direction, k.proto), v))
        })
        .collect()
}

fn policy_entry(k: &PolicyId<'_>, v: &Verdict) -> pb::PolicyEntry {
    pb::PolicyEntry {
        endpoint: k.0.to_string(),
        identity: k.1,
        port_class: k.2,
        direction: u32::from(k.3),
        proto: u32::from(k.4),
        action: u32::from(v.action),
        flags: u32::from(v.flags),
        rule: v.rule,
    }
}

/// An ipcache entry's identity in deltas: the prefix.
fn ipcache_id(e: &IpcacheEntry) -> (IpAddr, u8) {
    (e.addr, e.prefix_len)
}

/// The last entry per prefix of a sorted ipcache (the one a keyed lookup would keep).
fn per_prefix(v: &[IpcacheEntry]) -> impl Iterator<Item = &IpcacheEntry> {
    v.iter()
        .enumerate()
        .filter(|(i, e)| v.get(i + 1).is_none_or(|n| ipcache_id(n) != ipcache_id(e)))
        .map(|(_, e)| e)
}

/// Ipcache changes between two sorted ipcaches: (added or changed, removed).
fn ipcache_changes(
    b: &[IpcacheEntry],
    n: &[IpcacheEntry],
) -> (Vec<IpcacheEntry>, Vec<IpcacheEntry>) {
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    if b == n {
        return (add, remove);
    }
    let (mut bi, mut ni) = (per_prefix(b).peekable(), per_prefix(n).peekable());
    loop {
        match (bi.peek(), ni.peek()) {
            (None, None) => break,
            (Some(x), None) => {
                remove.push(**x);
                bi.next();
            }
            (None, Some(y)) => {
                add.push(**y);
                ni.next();
            }
            (Some(x), Some(y)) => match ipcache_id(x).cmp(&ipcache_id(y)) {
                std::cmp::Ordering::Less => {
                    remove.push(**x);
                    bi.next();
                }
                std::cmp::Ordering::Greater => {
                    add.push(**y);
                    ni.next();
                }
                std::cmp::Ordering::Equal => {
                    if x != y {
                        add.push(**y);
                    }
                    bi.next();
                    ni.next();
                }
            },
        }
    }
    (add, remove)
}

/// The changes from `base` to `next`.
pub fn delta(base: &HostTables, next: &HostTables, revision: pb::Revision) -> pb::Delta {
    let (base, next) = (Canonical::new(base.clone()), Canonical::new(next.clone()));
    delta_with_digests(
        &base,
        &base.digests().tables,
        &next,
        &next.digests().tables,
        revision,
    )
}

/// [`delta`] when both digests are already known (the controller keeps them). Works on the
/// tables themselves: only what changed is converted to wire form, and an unchanged ipcache
/// (the largest part, and the same on many hosts) costs one comparison.
pub fn delta_with_digests(
    base: &Canonical,
    base_digest: &str,
    next: &Canonical,
    next_digest: &str,
    revision: pb::Revision,
) -> pb::Delta {
    let (b, n): (&HostTables, &HostTables) = (base, next);
    let b_eps: BTreeMap<&str, &EndpointTable> =
        b.endpoints.iter().map(|e| (e.id.as_str(), e)).collect();
    let n_eps: BTreeMap<&str, &EndpointTable> =
        n.endpoints.iter().map(|e| (e.id.as_str(), e)).collect();
    let (ipc_add, ipc_remove) = if SharedVec::ptr_eq(&b.ipcache, &n.ipcache) {
        (Vec::new(), Vec::new())
    } else {
        ipcache_changes(&b.ipcache, &n.ipcache)
    };
    let (b_pol, n_pol) = (policy_ids(b), policy_ids(n));
    let port_classes_changed = b.port_classes != n.port_classes;
    let rules_changed = !SharedVec::ptr_eq(&b.rules, &n.rules) && b.rules != n.rules;
    pb::Delta {
        revision: Some(revision),
        base_digest: base_digest.to_string(),
        digest: next_digest.to_string(),
        endpoints_upsert: n
            .endpoints
            .iter()
            .filter(|e| b_eps.get(e.id.as_str()) != Some(e))
            .map(endpoint_to_pb)
            .collect(),
        endpoints_remove: b_eps
            .keys()
            .filter(|id| !n_eps.contains_key(*id))
            .map(|id| id.to_string())
            .collect(),
        ipcache_add: ipc_add.iter().map(ipcache_to_pb).collect(),
        ipcache_remove: ipc_remove.iter().map(ipcache_to_pb).collect(),
        port_classes_changed,
        port_classes: if port_classes_changed {
            n.port_classes.iter().map(port_class_to_pb).collect()
        } else {
            Vec::new()
        },
        policy_upsert: n_pol
            .iter()
            .filter(|(k, v)| b_pol.get(*k) != Some(v))
            .map(|(k, v)| policy_entry(k, v))
            .collect(),
        policy_remove: b_pol
            .iter()
            .filter(|(k, _)| !n_pol.contains_key(*k))
            .map(|(k, v)| policy_entry(k, v))
            .collect(),
        rules_changed,
        rules: if rules_changed {
            n.rules.to_vec()
        } else {
            Vec::new()
        },
    }
}

/// Apply a delta to the tables it was computed against; the result's digest is checked.
pub fn apply_delta(base: &HostTables, d: &pb::Delta) -> Result<HostTables, WireError> {
    let base = Canonical::new(base.clone());
    apply_delta_to(&base, &base.digests(), d).map(|(t, _)| t.into_inner())
}

/// [`apply_delta`] when the caller knows the digests of `base` (it acknowledged them): the
/// delta must be against that digest, and the result must have the digest the delta names.
/// Returns the result's digests; an ipcache the delta leaves alone is not hashed again.
pub fn apply_delta_to(
    base: &Canonical,
    base_digests: &Digests,
    d: &pb::Delta,
) -> Result<(Canonical, Digests), WireError> {
    if base_digests.tables != d.base_digest {
        return Err(WireError::BaseMismatch {
            base: d.base_digest.clone(),
            held: base_digests.tables.clone(),
        });
    }
    let b: &HostTables = base;
    let removed: BTreeSet<&str> = d.endpoints_remove.iter().map(String::as_str).collect();
    let upserted: BTreeSet<&str> = d.endpoints_upsert.iter().map(|e| e.id.as_str()).collect();
    let mut endpoints: Vec<EndpointTable> = b
        .endpoints
        .iter()
        .filter(|e| !removed.contains(e.id.as_str()) && !upserted.contains(e.id.as_str()))
        .cloned()
        .collect();
    for e in &d.endpoints_upsert {
        endpoints.push(endpoint_from_pb(e)?);
    }

    let ipcache_unchanged = d.ipcache_add.is_empty() && d.ipcache_remove.is_empty();
    let ipcache: SharedVec<IpcacheEntry> = if ipcache_unchanged {
        b.ipcache.clone()
    } else {
        let add: Vec<IpcacheEntry> = d
            .ipcache_add
            .iter()
            .map(ipcache_from_pb)
            .collect::<Result<_, _>>()?;
        let mut drop: BTreeSet<(IpAddr, u8)> = add.iter().map(ipcache_id).collect();
        for e in &d.ipcache_remove {
            drop.insert(ipcache_id(&ipcache_from_pb(e)?));
        }
        let mut v: Vec<IpcacheEntry> = b
            .ipcache
            .iter()
            .filter(|e| !drop.contains(&ipcache_id(e)))
            .copied()
            .collect();
        v.extend(add);
        v.into()
    };

    let port_classes = if d.port_classes_changed {
        d.port_classes
            .iter()
            .map(port_class_from_pb)
            .collect::<Result<_, _>>()?
    } else {
        b.port_classes.clone()
    };

    let drop_pol: BTreeSet<_> = d
        .policy_remove
        .iter()
        .chain(d.policy_upsert.iter())
        .map(|e| {
            Ok::<_, WireError>((
                e.endpoint.as_str(),
                e.identity,
                e.port_class,
                narrow::<u8>("direction", e.direction)?,
                narrow::<u8>("proto", e.proto)?,
            ))
        })
        .collect::<Result<_, _>>()?;
    let mut policy: Vec<pb::PolicyEntry> = b
        .policy
        .iter()
        .filter_map(|(k, v)| {
            let id = b.endpoints.get(k.slot as usize)?.id.as_str();
            let key = (id, k.identity, k.port_class, k.direction, k.proto);
            (!drop_pol.contains(&key) && !removed.contains(id)).then(|| policy_entry(&key, v))
        })
        .collect();
    policy.extend(d.policy_upsert.iter().cloned());
    let policy = policy_from_pb(&endpoints, &policy)?;

    let rules = if d.rules_changed {
        d.rules.clone().into()
    } else {
        b.rules.clone()
    };
    let out = Canonical::with_ipcache_known(
        HostTables {
            endpoints,
            ipcache,
            port_classes,
            policy,
            rules,
        },
        ipcache_unchanged,
    );
    // The base was canonical, so its ipcache still is when the delta leaves it alone; a
    // part still shared with the base has the base's digest.
    let ipcache = if SharedVec::ptr_eq(&out.ipcache, &b.ipcache) {
        base_digests.ipcache
    } else {
        ipcache_digest(&out.ipcache)
    };
    let rules = if SharedVec::ptr_eq(&out.rules, &b.rules) {
        base_digests.rules
    } else {
        rules_digest(&out.rules)
    };
    let got = digests_with(&out, ipcache, rules);
    if got.tables != d.digest {
        return Err(WireError::DigestMismatch {
            got: got.tables,
            want: d.digest.clone(),
        });
    }
    Ok((out, got))
}

/// A TLS channel to the controller with a client certificate (agent or administrator).
pub async fn connect(
    address: &str,
    server_name: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(server_name.to_string());
    Endpoint::from_shared(address.to_string())?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_abi::*;
    use prost::Message;

    /// A small deterministic generator (xorshift) for varied tables.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_tables(r: &mut Rng) -> HostTables {
        let addr = |r: &mut Rng| -> IpAddr {
            if r.below(4) == 0 {
                IpAddr::V6(Ipv6Addr::from(u128::from(r.below(6)) << 100 | 1))
            } else {
                IpAddr::V4(Ipv4Addr::from(r.below(40) as u32 * 0x0100_0001))
            }
        };
        let neps = r.below(5) as usize;
        let endpoints: Vec<EndpointTable> = (0..neps)
            .map(|i| EndpointTable {
                // Ids are unique within tables (policy entries name endpoints by id).
                id: if i == 0 && r.below(8) == 0 {
                    String::new()
                } else {
                    // Some long enough for two-byte lengths.
                    format!(
                        "vm-{}/{i}{}",
                        r.below(300),
                        "x".repeat(r.below(3) as usize * 90)
                    )
                },
                mac: [0x52, 0x54, 0, 0, r.below(3) as u8, i as u8],
                addrs: (0..r.below(4)).map(|_| addr(r)).collect(),
                flags: r.below(3) as u32 * 200,
            })
            .collect();
        HostTables {
            ipcache: (0..r.below(30))
                .map(|_| IpcacheEntry {
                    addr: addr(r),
                    prefix_len: r.below(33) as u8,
                    identity: r.below(4) as u32 * 100_000,
                })
                .collect(),
            port_classes: (0..r.below(4))
                .map(|_| PortClassRange {
                    kind: r.below(2) as u32,
                    first: r.below(3) as u16 * 1000,
                    last: r.below(3) as u16 * 30000,
                    class: r.below(3) as u32,
                })
                .collect(),
            policy: (0..if neps == 0 { 0 } else { r.below(12) })
                .map(|_| {
                    (
                        PolicyKey::new(
                            0,
                            r.below(neps as u64) as u32,
                            r.below(2) as u8,
                            r.below(4) as u32 * 70_000,
                            [0u8, 6, 17][r.below(3) as usize],
                            r.below(3) as u32,
                        ),
                        Verdict::new(r.below(4) as u8, r.below(2) as u8, r.below(3) as u32 * 300),
                    )
                })
                .collect(),
            rules: (0..r.below(4))
                .map(|i| "r".repeat(i as usize * 70))
                .collect(),
            endpoints,
        }
    }

    #[test]
    fn direct_encoding_is_the_prost_encoding_of_the_wire_form() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let t = random_tables(&mut r);
            let want = tables_to_pb(&t).encode_to_vec();
            assert_eq!(encode_tables(&t), want, "{t:?}");
            // The digest, from prost's encodings of the parts (see `Digests`).
            let mut wire = tables_to_pb(&t);
            let only_ipcache = pb::Tables {
                ipcache: std::mem::take(&mut wire.ipcache),
                ..Default::default()
            };
            let only_rules = pb::Tables {
                rules: std::mem::take(&mut wire.rules),
                ..Default::default()
            };
            let ipc: [u8; 32] = Sha256::digest(only_ipcache.encode_to_vec()).into();
            let rules: [u8; 32] = Sha256::digest(only_rules.encode_to_vec()).into();
            let mut h = Sha256::new();
            h.update(ipc);
            h.update(rules);
            h.update(wire.encode_to_vec());
            let want_digests = Digests {
                tables: hex(&h.finalize()),
                ipcache: ipc,
                rules,
            };
            assert_eq!(digests(&t), want_digests);
            let many = digests_of_many(vec![t.clone(), t.clone()], &HeldParts::default());
            assert!(many
                .iter()
                .all(|(c, d)| **c == canonicalize(&t) && *d == want_digests));
            assert!(is_canonical(&canonicalize(&t)));
            assert_eq!(is_canonical(&t), canonicalize(&t) == t);
            for w in t.ipcache.windows(2) {
                assert_eq!(
                    w[0].cmp(&w[1]),
                    ipcache_order(&w[0]).cmp(&ipcache_order(&w[1]))
                );
            }
        }
    }

    #[test]
    fn deltas_between_varied_tables_reproduce_the_next_tables() {
        let mut r = Rng(0x0123_4567_89ab_cdef);
        let mut applied = 0;
        for _ in 0..2000 {
            let a = random_tables(&mut r);
            // Mostly related tables (the usual case), sometimes unrelated ones.
            let b = if r.below(3) == 0 {
                random_tables(&mut r)
            } else {
                let mut b = canonicalize(&a);
                if r.below(2) == 0 {
                    let mut ipcache = b.ipcache.to_vec();
                    ipcache.truncate(r.below(ipcache.len() as u64 + 1) as usize);
                    let extra = random_tables(&mut r);
                    ipcache.extend(extra.ipcache.iter().take(3));
                    b.ipcache = ipcache.into();
                }
                if let Some(e) = b.endpoints.first_mut() {
                    e.flags ^= 1;
                }
                if r.below(4) == 0 {
                    // Copy on write: the base keeps its list.
                    b.rules.push("renamed".into());
                }
                b.policy.retain(|_| r.below(4) != 0);
                b
            };
            let d = delta(&a, &b, pb::Revision::default());
            // Dropped and rebuilt as the wire carries it.
            let d = pb::Delta::decode(d.encode_to_vec().as_slice()).unwrap();
            match apply_delta(&a, &d) {
                Ok(got) => {
                    assert_eq!(got, canonicalize(&b));
                    applied += 1;
                }
                // Tables with two entries for one key (never compiled) may need a snapshot;
                // a delta never yields anything but the named tables.
                Err(WireError::DigestMismatch { .. }) => {}
                Err(e) => panic!("{e}"),
            }
            // With the base's digests known, the result and its digests are the same as
            // computed from scratch (an untouched ipcache's digest carried over).
            let base = Canonical::new(a.clone());
            match apply_delta_to(&base, &base.digests(), &d) {
                Ok((got, got_digests)) => {
                    assert_eq!(got_digests, digests(&got));
                    assert_eq!(got_digests.tables, d.digest);
                }
                Err(e) => assert!(apply_delta(&a, &d).is_err(), "{e}"),
            }
        }
        assert!(applied > 1800, "{applied} of 2000 deltas applied");
    }

    fn sample(extra_rule: bool) -> HostTables {
        let ep = |id: &str, last: u8| EndpointTable {
            id: id.into(),
            mac: [0x52, 0x54, 0, 0, 0, last],
            addrs: vec![format!("10.0.0.{last}").parse().unwrap()],
            flags: 0,
        };
        let mut t = HostTables {
            endpoints: vec![ep("b/vm", 2), ep("a/vm", 1)],
            ipcache: vec![IpcacheEntry {
                addr: "10.0.0.0".parse().unwrap(),
                prefix_len: 8,
                identity: 5,
            }]
            .into(),
            port_classes: vec![PortClassRange {
                kind: PORT_KIND_L4,
                first: 80,
                last: 90,
                class: 1,
            }],
            policy: vec![
                (
                    PolicyKey::new(0, 0, DIR_INGRESS, 0, 0, 0),
                    Verdict::new(ACTION_DENY, 0, 0),
                ),
                (
                    PolicyKey::new(0, 1, DIR_EGRESS, 5, 6, 1),
                    Verdict::new(ACTION_ALLOW, 0, 1),
                ),
            ],
            rules: vec!["default".into(), "web".into()].into(),
        };
        if extra_rule {
            t.policy.push((
                PolicyKey::new(0, 0, DIR_EGRESS, 5, 17, 0),
                Verdict::new(ACTION_ALLOW, VERDICT_LOG, 1),
            ));
            t.endpoints.push(ep("c/vm", 3));
            t.endpoints.remove(1);
            t.policy.retain(|(k, _)| k.slot != 1);
        }
        t
    }

    #[test]
    fn hosts_share_one_ipcache_across_hosts_and_revisions() {
        let mut r = Rng(0x5eed);
        let mut t = random_tables(&mut r);
        while t.ipcache.len() < 3 {
            t = random_tables(&mut r);
        }
        // Unsorted on purpose: the shared copy is the canonical one.
        t.ipcache.reverse();
        let hosts = vec![t.clone(), t.clone(), t.clone()];
        let out = digests_of_many(hosts, &HeldParts::default());
        for (c, d) in &out {
            assert!(SharedVec::ptr_eq(&c.ipcache, &out[0].0.ipcache));
            assert!(SharedVec::ptr_eq(&c.rules, &t.rules));
            assert_eq!(*d, digests(&t));
        }
        // Next revision: same contents, a new allocation; it takes the held one.
        let mut held = HeldParts::default();
        held.hold(&out[0].0, &out[0].1);
        let mut next = t.clone();
        next.ipcache = next.ipcache.to_vec().into();
        let again = digests_of_many(vec![next], &held);
        assert!(SharedVec::ptr_eq(&again[0].0.ipcache, &out[0].0.ipcache));
        assert_eq!(again[0].1, out[0].1);
        // Different contents are never replaced.
        let mut other = t.clone();
        other.ipcache.pop();
        let other_out = digests_of_many(vec![other.clone()], &held);
        assert!(!SharedVec::ptr_eq(
            &other_out[0].0.ipcache,
            &out[0].0.ipcache
        ));
        assert_eq!(other_out[0].1, digests(&other));
    }

    #[test]
    fn wire_roundtrip_is_canonical_and_digest_is_order_independent() {
        let t = sample(false);
        let back = tables_from_pb(&tables_to_pb(&t)).unwrap();
        assert_eq!(back, canonicalize(&t));
        let mut shuffled = t.clone();
        shuffled.endpoints.reverse();
        for (k, _) in &mut shuffled.policy {
            k.slot = 1 - k.slot;
        }
        shuffled.policy.reverse();
        assert_eq!(digest(&shuffled), digest(&t));
        assert_ne!(digest(&sample(true)), digest(&t));
    }

    #[test]
    fn delta_reproduces_the_next_tables_and_refuses_a_wrong_base() {
        let (a, b) = (sample(false), sample(true));
        let d = delta(&a, &b, pb::Revision::default());
        assert_eq!(d.endpoints_remove, vec!["a/vm".to_string()]);
        let got = apply_delta(&a, &d).unwrap();
        assert_eq!(digest(&got), digest(&b));
        assert_eq!(got, canonicalize(&b));
        assert!(matches!(
            apply_delta(&b, &d),
            Err(WireError::BaseMismatch { .. })
        ));
        let mut forged = d.clone();
        forged.policy_upsert.clear();
        assert!(matches!(
            apply_delta(&a, &forged),
            Err(WireError::DigestMismatch { .. })
        ));
    }
}
