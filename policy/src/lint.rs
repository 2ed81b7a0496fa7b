//! The linter: the MLPS 8.1.3.2 b "delete redundant and ineffective rules" report.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::compile::Compiled;
use crate::load::{PolicySet, RAction, Resolved};
use crate::types::Peer;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// shadowed, duplicate, no-vm, no-peer, unused-group, empty-group, over-broad
    pub kind: String,
    /// The rule id or group name.
    pub subject: String,
    pub file: String,
    pub line: usize,
    pub message: String,
}

fn walk_peer_groups(p: &Peer, out: &mut BTreeSet<String>) {
    if let Some(g) = &p.group {
        out.insert(g.clone());
    }
}

/// Lint a loaded, compiled set.
pub fn lint(set: &PolicySet, res: &Resolved, compiled: &Compiled) -> Vec<Finding> {
    let mut out = Vec::new();
    let ids = res.rule_ids();
    let base = 1 + res.system.len() + res.quarantine.len();
    // Rules that decide at least one (endpoint, direction, identity, protocol, port class).
    let mut deciding: BTreeSet<u32> = BTreeSet::new();
    for h in compiled.hosts.values() {
        for (_, v) in &h.tables.policy {
            deciding.insert(v.rule);
        }
    }
    let mut seen: BTreeMap<(String, u8, usize, String, String), String> = BTreeMap::new();
    for (i, r) in res.rules.iter().enumerate() {
        let f = |kind: &str, message: String| Finding {
            kind: kind.into(),
            subject: r.id.clone(),
            file: r.file.display().to_string(),
            line: r.line,
            message,
        };
        if r.applies.is_empty() {
            out.push(f("no-vm", format!("rule `{}`: policy `{}` applies to no VM in the inventory; the rule can never match", r.id, r.policy)));
            continue;
        }
        if res.sets[r.peers].blocks.is_empty() {
            out.push(f(
                "no-peer",
                format!(
                    "rule `{}`: its peers select no VM and no address; the rule can never match",
                    r.id
                ),
            ));
            continue;
        }
        if r.action != RAction::Pass && !deciding.contains(&((base + i) as u32)) {
            out.push(f("shadowed", format!("rule `{}` never decides a flow: earlier rules (or tiers above) match everything it matches; delete it or move it up", r.id)));
        }
        let key = (
            r.policy.clone(),
            r.dir,
            r.peers,
            format!("{:?}", r.svc),
            format!("{:?}", r.action),
        );
        if let Some(first) = seen.get(&key) {
            out.push(f("duplicate", format!("rule `{}` repeats rule `{first}` (same policy, direction, peers, services and action)", r.id)));
        } else {
            seen.insert(key, r.id.clone());
        }
        if r.action == RAction::Allow {
            let broad_peer = res.sets[r.peers]
                .blocks
                .iter()
                .any(|(n, ex)| ex.is_empty() && n.len < if n.is_v4() { 8 } else { 16 });
            let ports: u32 = if r.svc.is_empty() {
                u32::MAX
            } else {
                r.svc
                    .iter()
                    .map(|s| s.range.map_or(65536, |(a, b)| u32::from(b - a) + 1))
                    .sum()
            };
            if broad_peer && ports > 1024 {
                out.push(f("over-broad", format!("rule `{}` allows {} from/to any address; name the peers and services it needs", r.id, if ports == u32::MAX { "every protocol" } else { "over 1024 ports" })));
            } else if ports == u32::MAX {
                out.push(f(
                    "over-broad",
                    format!(
                        "rule `{}` allows every protocol and port; name the services it needs",
                        r.id
                    ),
                ));
            }
        }
    }
    let _ = ids;
    // Groups: unused and empty.
    let mut used = BTreeSet::new();
    for (_, f) in &set.files {
        for p in &f.policies {
            for x in p
                .applies_to
                .iter()
                .chain(p.ingress.iter().chain(&p.egress).flat_map(|r| &r.peers))
            {
                walk_peer_groups(x, &mut used);
            }
        }
        for q in &f.quarantine {
            q.allow.iter().for_each(|x| walk_peer_groups(x, &mut used));
        }
        if let Some(s) = &f.settings {
            s.monitor_endpoints
                .iter()
                .for_each(|x| walk_peer_groups(x, &mut used));
        }
    }
    // transitive
    loop {
        let before = used.len();
        for (_, f) in &set.files {
            for g in &f.groups {
                if used.contains(&g.name) {
                    for m in &g.members {
                        walk_peer_groups(m, &mut used);
                    }
                }
            }
        }
        if used.len() == before {
            break;
        }
    }
    for (src, f) in &set.files {
        for g in &f.groups {
            let line = src.locate("name", &g.name, 0).0;
            let file = src.path.display().to_string();
            if !used.contains(&g.name) {
                out.push(Finding {
                    kind: "unused-group".into(),
                    subject: g.name.clone(),
                    file: file.clone(),
                    line,
                    message: format!(
                        "group `{}` is not used by any policy, quarantine or setting",
                        g.name
                    ),
                });
            }
            if let Some((_, vms, set_id)) = res.groups.iter().find(|(n, _, _)| n == &g.name) {
                if vms.is_empty() && res.sets[*set_id].blocks.is_empty() {
                    out.push(Finding {
                        kind: "empty-group".into(),
                        subject: g.name.clone(),
                        file,
                        line,
                        message: format!(
                            "group `{}` selects no VM of the inventory and no address",
                            g.name
                        ),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.file, a.line, &a.kind).cmp(&(&b.file, b.line, &b.kind)));
    out
}
