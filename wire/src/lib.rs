//! The controller–agent protocol: generated gRPC types ([`pb`]), conversions between the
//! compiler's [`HostTables`] and the wire form, the tables digest both ends agree on, deltas,
//! and the PKI (CA, host and admin certificates; identities from peer certificates).
pub mod pki;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_abi::model::{EndpointTable, HostTables, IpcacheEntry, PortClassRange};
use bulkhead_abi::{PolicyKey, Verdict};
use prost::Message;
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
    out.ipcache.sort();
    out.ipcache.dedup();
    out.port_classes.sort();
    out.policy.sort_by_key(|(k, _)| *k);
    out
}

/// Wire form of (canonicalised) tables.
pub fn tables_to_pb(t: &HostTables) -> pb::Tables {
    let t = canonicalize(t);
    pb::Tables {
        endpoints: t.endpoints.iter().map(endpoint_to_pb).collect(),
        ipcache: t.ipcache.iter().map(ipcache_to_pb).collect(),
        port_classes: t.port_classes.iter().map(port_class_to_pb).collect(),
        policy: t
            .policy
            .iter()
            .map(|(k, v)| policy_to_pb(&t, k, v))
            .collect(),
        rules: t.rules.clone(),
    }
}

pub fn tables_from_pb(p: &pb::Tables) -> Result<HostTables, WireError> {
    let endpoints: Vec<EndpointTable> = p
        .endpoints
        .iter()
        .map(endpoint_from_pb)
        .collect::<Result<_, _>>()?;
    let slots: BTreeMap<&str, u32> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i as u32))
        .collect();
    let mut policy = Vec::with_capacity(p.policy.len());
    for e in &p.policy {
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
    Ok(canonicalize(&HostTables {
        ipcache: p
            .ipcache
            .iter()
            .map(ipcache_from_pb)
            .collect::<Result<_, _>>()?,
        port_classes: p
            .port_classes
            .iter()
            .map(port_class_from_pb)
            .collect::<Result<_, _>>()?,
        endpoints,
        policy,
        rules: p.rules.clone(),
    }))
}

/// The digest both ends name tables by: SHA-256 of the canonical wire encoding, hex.
pub fn digest(t: &HostTables) -> String {
    let bytes = tables_to_pb(t).encode_to_vec();
    hex(&Sha256::digest(&bytes))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn policy_key(e: &pb::PolicyEntry) -> (String, u32, u32, u32, u32) {
    (
        e.endpoint.clone(),
        e.identity,
        e.port_class,
        e.direction,
        e.proto,
    )
}

fn ipcache_key(e: &pb::IpcacheEntry) -> (Vec<u8>, u32) {
    (e.addr.clone(), e.prefix_len)
}

/// The changes from `base` to `next`.
pub fn delta(base: &HostTables, next: &HostTables, revision: pb::Revision) -> pb::Delta {
    delta_with_digests(base, &digest(base), next, &digest(next), revision)
}

/// [`delta`] when both digests are already known (the controller keeps them).
pub fn delta_with_digests(
    base: &HostTables,
    base_digest: &str,
    next: &HostTables,
    next_digest: &str,
    revision: pb::Revision,
) -> pb::Delta {
    let (b, n) = (tables_to_pb(base), tables_to_pb(next));
    let b_eps: BTreeMap<&str, &pb::Endpoint> =
        b.endpoints.iter().map(|e| (e.id.as_str(), e)).collect();
    let n_eps: BTreeMap<&str, &pb::Endpoint> =
        n.endpoints.iter().map(|e| (e.id.as_str(), e)).collect();
    let b_ipc: BTreeMap<_, &pb::IpcacheEntry> =
        b.ipcache.iter().map(|e| (ipcache_key(e), e)).collect();
    let n_ipc: BTreeMap<_, &pb::IpcacheEntry> =
        n.ipcache.iter().map(|e| (ipcache_key(e), e)).collect();
    let b_pol: BTreeMap<_, &pb::PolicyEntry> =
        b.policy.iter().map(|e| (policy_key(e), e)).collect();
    let n_pol: BTreeMap<_, &pb::PolicyEntry> =
        n.policy.iter().map(|e| (policy_key(e), e)).collect();
    pb::Delta {
        revision: Some(revision),
        base_digest: base_digest.to_string(),
        digest: next_digest.to_string(),
        endpoints_upsert: n
            .endpoints
            .iter()
            .filter(|e| b_eps.get(e.id.as_str()) != Some(e))
            .cloned()
            .collect(),
        endpoints_remove: b_eps
            .keys()
            .filter(|id| !n_eps.contains_key(*id))
            .map(|id| id.to_string())
            .collect(),
        ipcache_add: n_ipc
            .iter()
            .filter(|(k, v)| b_ipc.get(*k) != Some(v))
            .map(|(_, v)| (*v).clone())
            .collect(),
        ipcache_remove: b_ipc
            .iter()
            .filter(|(k, _)| !n_ipc.contains_key(*k))
            .map(|(_, v)| (*v).clone())
            .collect(),
        port_classes_changed: b.port_classes != n.port_classes,
        port_classes: if b.port_classes != n.port_classes {
            n.port_classes.clone()
        } else {
            Vec::new()
        },
        policy_upsert: n_pol
            .iter()
            .filter(|(k, v)| b_pol.get(*k) != Some(v))
            .map(|(_, v)| (*v).clone())
            .collect(),
        policy_remove: b_pol
            .iter()
            .filter(|(k, _)| !n_pol.contains_key(*k))
            .map(|(_, v)| (*v).clone())
            .collect(),
        rules_changed: b.rules != n.rules,
        rules: if b.rules != n.rules {
            n.rules.clone()
        } else {
            Vec::new()
        },
    }
}

/// Apply a delta to the tables it was computed against; the result's digest is checked.
pub fn apply_delta(base: &HostTables, d: &pb::Delta) -> Result<HostTables, WireError> {
    let held = digest(base);
    if held != d.base_digest {
        return Err(WireError::BaseMismatch {
            base: d.base_digest.clone(),
            held,
        });
    }
    let mut t = tables_to_pb(base);
    let removed: BTreeSet<&str> = d.endpoints_remove.iter().map(String::as_str).collect();
    let upserted: BTreeMap<&str, &pb::Endpoint> = d
        .endpoints_upsert
        .iter()
        .map(|e| (e.id.as_str(), e))
        .collect();
    t.endpoints
        .retain(|e| !removed.contains(e.id.as_str()) && !upserted.contains_key(e.id.as_str()));
    t.endpoints.extend(d.endpoints_upsert.iter().cloned());

    let drop_ipc: BTreeSet<_> = d
        .ipcache_remove
        .iter()
        .chain(d.ipcache_add.iter())
        .map(ipcache_key)
        .collect();
    t.ipcache.retain(|e| !drop_ipc.contains(&ipcache_key(e)));
    t.ipcache.extend(d.ipcache_add.iter().cloned());

    if d.port_classes_changed {
        t.port_classes = d.port_classes.clone();
    }
    let drop_pol: BTreeSet<_> = d
        .policy_remove
        .iter()
        .chain(d.policy_upsert.iter())
        .map(policy_key)
        .collect();
    t.policy
        .retain(|e| !drop_pol.contains(&policy_key(e)) && !removed.contains(e.endpoint.as_str()));
    t.policy.extend(d.policy_upsert.iter().cloned());
    if d.rules_changed {
        t.rules = d.rules.clone();
    }
    let out = tables_from_pb(&t)?;
    let got = digest(&out);
    if got != d.digest {
        return Err(WireError::DigestMismatch {
            got,
            want: d.digest.clone(),
        });
    }
    Ok(out)
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
            }],
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
            rules: vec!["default".into(), "web".into()],
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
