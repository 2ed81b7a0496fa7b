//! Plan / diff: which VM-to-VM verdicts change between two revisions of a policy set.
use std::collections::BTreeSet;
use std::net::IpAddr;

use bulkhead_abi::*;
use serde::Serialize;

use crate::eval::{action_name, evaluate};
use crate::load::Resolved;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Change {
    pub src: String,
    pub dst: String,
    /// e.g. `tcp/443`, `icmp/8:0`, `udp/*`, `proto 47`
    pub service: String,
    pub before: String,
    pub before_rule: String,
    pub after: String,
    pub after_rule: String,
}

/// The end-to-end verdict of a VM-to-VM flow: the source's egress, then the destination's
/// ingress; allowed only when both allow. Returns (action name, deciding rule).
pub fn vm_to_vm(
    res: &Resolved,
    src: usize,
    dst: usize,
    proto: u8,
    port: u16,
) -> Option<(String, String)> {
    let sip = *res.vms[src].addrs.first()?;
    let dip = *res.vms[dst]
        .addrs
        .iter()
        .find(|a| a.is_ipv4() == sip.is_ipv4())?;
    let e = evaluate(res, src, DIR_EGRESS, dip, proto, port);
    if e.action != ACTION_ALLOW && e.action != ACTION_MONITOR {
        return Some((
            action_name(e.action).into(),
            format!("{} (egress of {})", e.rule, res.vms[src].name),
        ));
    }
    let i = evaluate(res, dst, DIR_INGRESS, sip, proto, port);
    if i.action != ACTION_ALLOW && i.action != ACTION_MONITOR {
        return Some((
            action_name(i.action).into(),
            format!("{} (ingress of {})", i.rule, res.vms[dst].name),
        ));
    }
    let act = if e.action == ACTION_MONITOR || i.action == ACTION_MONITOR {
        ACTION_MONITOR
    } else {
        ACTION_ALLOW
    };
    Some((action_name(act).into(), format!("{} / {}", e.rule, i.rule)))
}

fn probes(res: &[&Resolved]) -> Vec<(u8, u16, String)> {
    let mut s: BTreeSet<(u8, u16, String)> = BTreeSet::new();
    for r in res {
        for rule in &r.rules {
            for e in &rule.svc {
                if let Some(p) = e.proto {
                    let (port, label) = match (p, e.range) {
                        (1 | 58, Some((a, _))) => (
                            a,
                            format!(
                                "{}/{}:{}",
                                if p == 1 { "icmp" } else { "icmpv6" },
                                a >> 8,
                                a & 0xff
                            ),
                        ),
                        (_, Some((a, _))) => (a, format!("{}/{a}", proto_name(p))),
                        (_, None) => (0, format!("{}/*", proto_name(p))),
                    };
                    s.insert((p, port, label));
                }
            }
        }
    }
    s.insert((6, 1, "tcp/other".into()));
    s.insert((17, 1, "udp/other".into()));
    s.into_iter().collect()
}

pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => format!("proto{n}"),
    }
}

/// Every VM pair × probe whose verdict differs between `before` and `after` (VMs matched
/// by name; a VM present on one side only is compared against "absent").
pub fn plan(before: &Resolved, after: &Resolved) -> Vec<Change> {
    let names: BTreeSet<&String> = before
        .vms
        .iter()
        .chain(&after.vms)
        .map(|v| &v.name)
        .collect();
    let probes = probes(&[before, after]);
    let mut out = Vec::new();
    let look = |r: &Resolved, s: &str, d: &str, p: u8, port: u16| -> (String, String) {
        match (r.vm_by_name.get(s), r.vm_by_name.get(d)) {
            (Some(&a), Some(&b)) => {
                vm_to_vm(r, a, b, p, port).unwrap_or(("n/a".into(), String::new()))
            }
            _ => ("absent".into(), String::new()),
        }
    };
    for s in &names {
        for d in &names {
            if s == d {
                continue;
            }
            for (p, port, label) in &probes {
                let (b, br) = look(before, s, d, *p, *port);
                let (a, ar) = look(after, s, d, *p, *port);
                if a != b {
                    out.push(Change {
                        src: (*s).clone(),
                        dst: (*d).clone(),
                        service: label.clone(),
                        before: b,
                        before_rule: br,
                        after: a,
                        after_rule: ar,
                    });
                }
            }
        }
    }
    out
}

/// Parse an address for explain.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}
