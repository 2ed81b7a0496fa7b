//! The reference evaluator: judges one flow straight from the language's meaning — the
//! ordered rules of the VM, address membership tested directly, first match. Slow and
//! obviously right; the compiler is tested against it.
use std::net::IpAddr;

use bulkhead_abi::*;

use crate::model::Action;
use crate::resolve::{first_match, part_matches, FlatRule, Peer, Resolved};

/// A flow as seen by one VM: `peer` is the other end (source for ingress, destination for
/// egress); `port` the destination port or `type << 8 | code` for ICMP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub vm: usize,
    pub direction: u8,
    pub peer: IpAddr,
    pub proto: u8,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `ACTION_*`.
    pub action: u8,
    /// `VERDICT_LOG` when the deciding rule logs allows.
    pub flags: u8,
    /// The deciding rule; `None` = the default action.
    pub rule: Option<FlatRule>,
    /// Rules looked at on the way, and whether each matched.
    pub considered: Vec<(FlatRule, bool)>,
}

/// `ACTION_*` and flags for a deciding rule (or the default).
pub fn verdict_of(default: Action, rule: Option<&FlatRule>) -> (u8, u8) {
    let Some(r) = rule else {
        return (action_code(default), 0);
    };
    match r.action {
        Action::Allow => (ACTION_ALLOW, if r.log { VERDICT_LOG } else { 0 }),
        Action::Deny | Action::Reject if r.monitor => (ACTION_MONITOR, 0),
        a => (action_code(a), 0),
    }
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => ACTION_ALLOW,
        Action::Reject => ACTION_REJECT,
        Action::Deny | Action::Pass => ACTION_DENY,
    }
}

pub fn peer_contains(res: &Resolved, p: &Peer, addr: IpAddr) -> bool {
    match res.peer_addrs(p) {
        None => true,
        Some(set) => set.contains(addr),
    }
}

/// Judge `flow` from the policy's meaning.
pub fn evaluate(res: &Resolved, flow: &Flow) -> Decision {
    let rules = res.rules_for(flow.vm, flow.direction);
    let mut considered = Vec::new();
    let decided = first_match(
        &rules,
        |r| {
            r.peers.iter().any(|p| peer_contains(res, p, flow.peer))
                && r.services
                    .iter()
                    .any(|s| part_matches(s, flow.proto, flow.port))
        },
        Some(&mut considered),
    )
    .cloned();
    let (action, flags) = verdict_of(res.set.settings.default_action, decided.as_ref());
    Decision {
        action,
        flags,
        rule: decided,
        considered: considered
            .into_iter()
            .map(|(r, m)| (r.clone(), m))
            .collect(),
    }
}
