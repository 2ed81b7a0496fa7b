//! The reference evaluator: judges one flow straight from the language's meaning — walk the
//! endpoint's ordered entries, test the peer address against each peer set's CIDRs and the
//! protocol/port against each service, honour pass. Slow and obviously correct; the
//! property tests hold the compiled tables to it.
use std::net::IpAddr;

use bulkhead_abi::*;
use serde::Serialize;

use crate::load::{svc_matches, EntryKind, RAction, Resolved};

/// One rule looked at on the way to a decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub rule: String,
    /// `system`, `quarantine`, or the tier name.
    pub tier: String,
    pub policy: String,
    pub action: String,
    /// matched, no-peer-match, no-service-match, skipped-by-pass
    pub outcome: String,
    pub reflected: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// `ACTION_*`
    pub action: u8,
    pub log: bool,
    /// Index into the rule table (0 = default).
    pub rule_index: u32,
    pub rule: String,
    pub trace: Vec<Step>,
}

impl Decision {
    pub fn verdict(&self) -> Verdict {
        Verdict::new(
            self.action,
            if self.log { VERDICT_LOG } else { 0 },
            self.rule_index,
        )
    }
}

pub fn action_name(a: u8) -> &'static str {
    match a {
        ACTION_ALLOW => "allow",
        ACTION_DENY => "deny",
        ACTION_REJECT => "reject",
        ACTION_MONITOR => "monitor (would deny)",
        _ => "?",
    }
}

/// Judge a new flow of `vm` in `dir` (from the VM's side) with `peer`, `proto`, `port`
/// (destination port, or ICMP `type<<8|code`).
pub fn evaluate(
    res: &Resolved,
    vm: usize,
    dir: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> Decision {
    let ids = res.rule_ids();
    let mut trace = Vec::new();
    let mut skip: Option<usize> = None;
    for e in res.entries(vm, dir) {
        let (tier, policy, reflected) = match e.kind {
            EntryKind::System(_) => ("system".to_string(), String::new(), false),
            EntryKind::Quarantine(_) => ("quarantine".to_string(), String::new(), false),
            EntryKind::Rule { rule, reflected } => (
                res.tiers[e.tier.unwrap_or(0)].clone(),
                res.rules[rule].policy.clone(),
                reflected,
            ),
        };
        let action = format!("{:?}", e.action).to_lowercase();
        let mut step = Step {
            rule: ids[e.rule_index as usize].clone(),
            tier,
            policy,
            action,
            outcome: String::new(),
            reflected,
        };
        if skip.is_some() && e.tier == skip {
            step.outcome = "skipped-by-pass".into();
            trace.push(step);
            continue;
        }
        if !res.entry_peer_contains(&e, &peer) {
            step.outcome = "no-peer-match".into();
            trace.push(step);
            continue;
        }
        if !svc_matches(res.entry_svc(&e), proto, port) {
            step.outcome = "no-service-match".into();
            trace.push(step);
            continue;
        }
        step.outcome = "matched".into();
        trace.push(step);
        if e.action == RAction::Pass {
            skip = e.tier;
            continue;
        }
        let v = crate::compile::verdict_of(&e);
        return Decision {
            action: v.action,
            log: e.log,
            rule_index: e.rule_index,
            rule: ids[e.rule_index as usize].clone(),
            trace,
        };
    }
    let v = crate::compile::default_verdict(res);
    Decision {
        action: v.action,
        log: false,
        rule_index: 0,
        rule: "default".into(),
        trace,
    }
}
