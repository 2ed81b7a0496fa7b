//! The rule table for assessors (MLPS 8.1.3.2 c: rules name source and destination
//! addresses, protocol and ports): one row per rule of the resolved set, in evaluation order
//! (system endpoints, quarantines, then tier and priority), addresses resolved.
use serde::Serialize;

use crate::load::{AddrSet, RAction, Resolved, SvcSet};
use crate::plan::proto_name;
use crate::types::DefaultAction;

/// One rule as an assessor reads it. For an ingress rule the source is the peer set and the
/// destination the VMs the policy applies to; for an egress rule the other way round.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleRow {
    pub rule: String,
    /// Tier name; `system` and `quarantine` sit above every tier, `default` below.
    pub tier: String,
    pub priority: u32,
    pub policy: String,
    pub direction: String,
    pub action: String,
    /// `enforce` or `monitor` (would-deny recorded, nothing dropped).
    pub mode: String,
    pub log: bool,
    pub source: String,
    pub destination: String,
    /// `any`, or entries such as `tcp/5432`, `udp/53-54`, `icmp/8:0`.
    pub services: String,
    /// `file:line`, empty for generated rows.
    pub defined_at: String,
}

/// Column names, in [`RuleRow`] order.
pub const COLUMNS: [&str; 12] = [
    "rule",
    "tier",
    "priority",
    "policy",
    "direction",
    "action",
    "mode",
    "log",
    "source",
    "destination",
    "services",
    "defined_at",
];

impl RuleRow {
    /// The row's fields, in [`COLUMNS`] order.
    pub fn fields(&self) -> [String; 12] {
        [
            self.rule.clone(),
            self.tier.clone(),
            self.priority.to_string(),
            self.policy.clone(),
            self.direction.clone(),
            self.action.clone(),
            self.mode.clone(),
            self.log.to_string(),
            self.source.clone(),
            self.destination.clone(),
            self.services.clone(),
            self.defined_at.clone(),
        ]
    }
}

/// `10.0.0.0/8 except 10.9.0.0/16; fd00::/8`, or `any`.
pub fn addr_set_text(s: &AddrSet) -> String {
    if *s == AddrSet::any() {
        return "any".into();
    }
    if s.blocks.is_empty() {
        return "none".into();
    }
    s.blocks
        .iter()
        .map(|(net, except)| {
            if except.is_empty() {
                net.to_string()
            } else {
                let ex: Vec<String> = except.iter().map(|e| e.to_string()).collect();
                format!("{net} except {}", ex.join(" "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn services_text(s: &SvcSet) -> String {
    if s.is_empty() {
        return "any".into();
    }
    s.iter()
        .map(|e| match (e.proto, e.range) {
            (None, _) => "any".to_string(),
            (Some(p), None) => proto_name(p),
            (Some(p @ (1 | 58)), Some((a, b))) => {
                let one = |v: u16| format!("{}:{}", v >> 8, v & 0xff);
                if a == b {
                    format!("{}/{}", proto_name(p), one(a))
                } else {
                    format!("{}/{}-{}", proto_name(p), one(a), one(b))
                }
            }
            (Some(p), Some((a, b))) if a == b => format!("{}/{a}", proto_name(p)),
            (Some(p), Some((a, b))) => format!("{}/{a}-{b}", proto_name(p)),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn action_text(a: RAction) -> &'static str {
    match a {
        RAction::Allow => "allow",
        RAction::Deny => "deny",
        RAction::Reject => "reject",
        RAction::Pass => "pass",
    }
}

/// The VMs a policy applies to, by name with their addresses.
fn vms_text(r: &Resolved, vms: &[usize]) -> String {
    if vms.is_empty() {
        return "no VM".into();
    }
    vms.iter()
        .filter_map(|i| r.vms.get(*i))
        .map(|v| {
            let a: Vec<String> = v.addrs.iter().map(|a| a.to_string()).collect();
            format!("{} ({})", v.name, a.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn set_text(r: &Resolved, set: usize) -> String {
    r.sets.get(set).map(addr_set_text).unwrap_or_default()
}

/// How many rows [`rule_rows`] gives, without formatting them (for a summary).
pub fn row_count(r: &Resolved) -> usize {
    let quarantine: usize = r
        .quarantine
        .iter()
        .map(|q| if q.full { 2 } else { 4 })
        .sum();
    2 * r.system.len() + quarantine + r.rules.len() + 2
}

/// Every rule of `r`, in evaluation order, then the default action.
pub fn rule_rows(r: &Resolved) -> Vec<RuleRow> {
    let mut rows = Vec::new();
    for s in &r.system {
        for (direction, source, destination) in [
            ("egress", "every managed VM".to_string(), set_text(r, s.set)),
            (
                "ingress",
                set_text(r, s.set),
                "every managed VM".to_string(),
            ),
        ] {
            rows.push(RuleRow {
                rule: format!("system:{}", s.name),
                tier: "system".into(),
                priority: 0,
                policy: "settings.system_endpoints".into(),
                direction: direction.into(),
                action: "allow".into(),
                mode: "enforce".into(),
                log: false,
                source,
                destination,
                services: services_text(&s.svc),
                defined_at: String::new(),
            });
        }
    }
    for q in &r.quarantine {
        let vm = vms_text(r, &[q.vm]);
        let name = r.vms.get(q.vm).map(|v| v.name.clone()).unwrap_or_default();
        // Partial: the named group only, then nothing; full: nothing.
        let mut steps = Vec::new();
        if !q.full {
            steps.push(("allow", set_text(r, q.allow)));
        }
        steps.push(("deny", "any".to_string()));
        for (action, peers) in steps {
            for (direction, source, destination) in [
                ("ingress", peers.clone(), vm.clone()),
                ("egress", vm.clone(), peers.clone()),
            ] {
                rows.push(RuleRow {
                    rule: format!("quarantine:{name}"),
                    tier: "quarantine".into(),
                    priority: 0,
                    policy: "quarantine".into(),
                    direction: direction.into(),
                    action: action.into(),
                    mode: "enforce".into(),
                    log: true,
                    source,
                    destination,
                    services: "any".into(),
                    defined_at: String::new(),
                });
            }
        }
    }
    for rule in &r.rules {
        let applies = vms_text(r, &rule.applies);
        let peers = set_text(r, rule.peers);
        let ingress = rule.dir == bulkhead_abi::DIR_INGRESS;
        let (source, destination) = if ingress {
            (peers, applies)
        } else {
            (applies, peers)
        };
        rows.push(RuleRow {
            rule: rule.id.clone(),
            tier: r.tiers.get(rule.tier).cloned().unwrap_or_default(),
            priority: rule.priority,
            policy: rule.policy.clone(),
            direction: if ingress { "ingress" } else { "egress" }.into(),
            action: action_text(rule.action).into(),
            mode: if rule.monitor { "monitor" } else { "enforce" }.into(),
            log: rule.log,
            source,
            destination,
            services: services_text(&rule.svc),
            defined_at: format!("{}:{}", rule.file.display(), rule.line),
        });
    }
    let default = match r.default_action {
        DefaultAction::Deny => "deny",
        DefaultAction::Reject => "reject",
        DefaultAction::Allow => "allow",
    };
    for direction in ["ingress", "egress"] {
        rows.push(RuleRow {
            rule: "default".into(),
            tier: "default".into(),
            priority: u32::MAX,
            policy: "settings.default_action".into(),
            direction: direction.into(),
            action: default.into(),
            mode: "enforce".into(),
            log: false,
            source: "any".into(),
            destination: "any".into(),
            services: "any".into(),
            defined_at: String::new(),
        });
    }
    rows
}
