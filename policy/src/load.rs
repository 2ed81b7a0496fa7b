//! Reading a policy directory and validating it: every error at once, each with file, line,
//! column and a sentence a person understands. An invalid set yields no [`PolicySet`].
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;

use crate::model::*;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// A validated policy set, policies in evaluation order.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub settings: Settings,
    pub groups: BTreeMap<String, Group>,
    pub services: BTreeMap<String, Service>,
    /// Ordered by tier, then priority (lower first).
    pub policies: Vec<Policy>,
    pub quarantine: Vec<Quarantine>,
    pub infrastructure: Vec<Infrastructure>,
    /// Where each rule id and group is defined (for explain and lint).
    pub origin: BTreeMap<String, (PathBuf, usize)>,
}

impl PolicySet {
    pub fn tier_index(&self, tier: &str) -> usize {
        self.settings
            .tiers
            .iter()
            .position(|t| t == tier)
            .unwrap_or(usize::MAX)
    }
}

/// The reserved peer/service name meaning "anything".
pub const ANY: &str = "any";

/// Read every `*.yaml` / `*.yml` file under `dir` (recursively, sorted) and validate.
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<Diagnostic>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    collect(dir, &mut files, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    files.sort();
    let mut sources = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((f, text)),
            Err(e) => errors.push(diag(&f, 1, 1, format!("cannot read the file: {e}"))),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    load_sources(&sources)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(diag(dir, 1, 1, format!("cannot read the directory: {e}")));
            return;
        }
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out, errors);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

fn diag(file: &Path, line: usize, column: usize, message: String) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Line and column (1-based) of the first occurrence of `needle` in `text`, preferring an
/// occurrence after `key`. Semantic errors point at the value they are about.
fn locate(text: &str, key: &str, needle: &str) -> (usize, usize) {
    let find = |pat: &str| text.find(pat);
    let pos = find(&format!("{key}: {needle}"))
        .map(|p| p + key.len() + 2)
        .or_else(|| find(&format!("{key}: \"{needle}\"")).map(|p| p + key.len() + 2))
        .or_else(|| find(needle))
        .unwrap_or(0);
    let line = text[..pos].matches('\n').count() + 1;
    let col = pos - text[..pos].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn err(&mut self, key: &str, needle: &str, message: String) {
        let (l, c) = locate(self.text, key, needle);
        self.errors.push(diag(self.file, l, c, message));
    }
}

/// Parse and validate a set of (file name, content).
pub fn load_sources(sources: &[(PathBuf, String)]) -> Result<PolicySet, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for (file, text) in sources {
        if text.trim().is_empty() {
            continue;
        }
        match serde_yaml::from_str::<PolicyFile>(text) {
            Ok(pf) => parsed.push((file, text, pf)),
            Err(e) => {
                let (l, c) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
                errors.push(diag(file, l, c, explain_yaml_error(&e.to_string())));
            }
        }
    }
    let mut set = PolicySet::default();
    let mut settings_seen: Option<&PathBuf> = None;
    // Pass 1: definitions.
    for (file, text, pf) in &parsed {
        let mut cx = Ctx {
            file,
            text,
            errors: &mut errors,
        };
        if let Some(s) = &pf.settings {
            if let Some(first) = settings_seen {
                cx.err(
                    "settings",
                    "settings",
                    format!("settings are already given in {}", first.display()),
                );
            } else {
                settings_seen = Some(file);
                if s.tiers.is_empty() {
                    cx.err("tiers", "tiers", "at least one tier is needed".into());
                }
                let mut seen = BTreeSet::new();
                for t in &s.tiers {
                    if !seen.insert(t) {
                        cx.err("tiers", t, format!("tier {t:?} is listed twice"));
                    }
                }
                if s.default_action == Action::Pass {
                    cx.err(
                        "default_action",
                        "pass",
                        "the default action cannot be `pass`: nothing comes after it".into(),
                    );
                }
                set.settings = s.clone();
            }
        }
        for g in &pf.groups {
            if g.name == ANY {
                cx.err(
                    "name",
                    ANY,
                    "`any` is reserved; choose another group name".into(),
                );
            } else if set.groups.contains_key(&g.name) {
                cx.err(
                    "name",
                    &g.name,
                    format!("group {:?} is defined twice", g.name),
                );
            } else {
                let (l, _) = locate(text, "name", &g.name);
                set.origin
                    .insert(format!("group:{}", g.name), ((*file).clone(), l));
                set.groups.insert(g.name.clone(), g.clone());
            }
        }
        for s in &pf.services {
            if s.name == ANY {
                cx.err(
                    "name",
                    ANY,
                    "`any` is reserved; choose another service name".into(),
                );
            } else if set.services.contains_key(&s.name) {
                cx.err(
                    "name",
                    &s.name,
                    format!("service {:?} is defined twice", s.name),
                );
            } else {
                set.services.insert(s.name.clone(), s.clone());
            }
        }
    }
    // Pass 2: everything that refers to definitions.
    let mut policy_names = BTreeSet::new();
    let mut rule_ids: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut slots: BTreeMap<(String, u32), String> = BTreeMap::new();
    for (file, text, pf) in &parsed {
        let mut cx = Ctx {
            file,
            text,
            errors: &mut errors,
        };
        for g in &pf.groups {
            check_group(&mut cx, &set, g);
        }
        for s in &pf.services {
            check_service(&mut cx, s);
        }
        for p in &pf.policies {
            if !policy_names.insert(p.name.clone()) {
                cx.err(
                    "name",
                    &p.name,
                    format!("policy {:?} is defined twice", p.name),
                );
            }
            if !set.settings.tiers.contains(&p.tier) {
                cx.err(
                    "tier",
                    &p.tier,
                    format!(
                        "policy {:?}: tier {:?} is not one of the tiers ({})",
                        p.name,
                        p.tier,
                        set.settings.tiers.join(", ")
                    ),
                );
            }
            if let Some(other) = slots.insert((p.tier.clone(), p.priority), p.name.clone()) {
                cx.err(
                    "priority",
                    &p.priority.to_string(),
                    format!(
                        "priority clash: policies {other:?} and {:?} both have priority {} in tier {:?}; \
                         first match would depend on file order",
                        p.name, p.priority, p.tier
                    ),
                );
            }
            if p.applies_to.is_empty() {
                cx.err(
                    "applies_to",
                    &p.name,
                    format!("policy {:?} applies to no group", p.name),
                );
            }
            for g in &p.applies_to {
                check_group_ref(&mut cx, &set, "applies_to", g, false);
            }
            for (dir, rules) in [("ingress", &p.ingress), ("egress", &p.egress)] {
                for r in rules {
                    if let Some(first) = rule_ids.insert(r.id.clone(), (*file).clone()) {
                        cx.err(
                            "id",
                            &r.id,
                            format!(
                                "rule id {:?} is already used (in {}); rule ids must be unique",
                                r.id,
                                first.display()
                            ),
                        );
                    } else {
                        let (l, _) = locate(text, "id", &r.id);
                        set.origin.insert(r.id.clone(), ((*file).clone(), l));
                    }
                    check_rule(&mut cx, &set, dir, r);
                }
            }
            set.policies.push(p.clone());
        }
        for q in &pf.quarantine {
            for g in &q.allow {
                check_group_ref(&mut cx, &set, "allow", g, false);
            }
        }
        for i in &pf.infrastructure {
            for b in &i.ip_blocks {
                check_block(&mut cx, b);
            }
            for s in &i.services {
                check_service_ref(&mut cx, &set, s);
            }
            set.infrastructure.push(i.clone());
        }
        set.quarantine.extend(pf.quarantine.iter().cloned());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let tiers = set.settings.tiers.clone();
    set.policies.sort_by_key(|p| {
        (
            tiers
                .iter()
                .position(|t| *t == p.tier)
                .unwrap_or(usize::MAX),
            p.priority,
            p.name.clone(),
        )
    });
    Ok(set)
}

/// serde's messages, in the words of this language.
fn explain_yaml_error(msg: &str) -> String {
    msg.replace("unknown field", "unknown field (check the spelling)")
        .replace("invalid type", "wrong kind of value")
}

fn check_group_ref(cx: &mut Ctx, set: &PolicySet, key: &str, name: &str, any_ok: bool) {
    if name == ANY {
        if !any_ok {
            cx.err(key, name, "`any` is not allowed here; name a group".into());
        }
    } else if !set.groups.contains_key(name) {
        cx.err(key, name, format!("group {name:?} is not defined"));
    }
}

fn check_service_ref(cx: &mut Ctx, set: &PolicySet, name: &str) {
    if name != ANY && !set.services.contains_key(name) {
        cx.err("services", name, format!("service {name:?} is not defined"));
    }
}

fn check_group(cx: &mut Ctx, set: &PolicySet, g: &Group) {
    for r in &g.groups {
        check_group_ref(cx, set, "groups", r, false);
    }
    if reaches(set, &g.name, &g.name, &mut BTreeSet::new()) {
        cx.err(
            "name",
            &g.name,
            format!("group {:?} includes itself (through its groups)", g.name),
        );
    }
    for e in &g.expressions {
        let needs_values = matches!(e.operator, Operator::In | Operator::NotIn);
        if needs_values && e.values.is_empty() {
            cx.err(
                "key",
                &e.key,
                format!("{:?} on {:?} needs values", e.operator, e.key),
            );
        }
        if !needs_values && !e.values.is_empty() {
            cx.err(
                "key",
                &e.key,
                format!("{:?} on {:?} takes no values", e.operator, e.key),
            );
        }
    }
    for b in &g.ip_blocks {
        check_block(cx, b);
    }
}

fn reaches(set: &PolicySet, from: &str, target: &str, seen: &mut BTreeSet<String>) -> bool {
    let Some(g) = set.groups.get(from) else {
        return false;
    };
    for next in &g.groups {
        if next == target {
            return true;
        }
        if seen.insert(next.clone()) && reaches(set, next, target, seen) {
            return true;
        }
    }
    false
}

fn check_block(cx: &mut Ctx, b: &IpBlock) {
    let Ok(net) = b.cidr.parse::<IpNetwork>() else {
        cx.err(
            "cidr",
            &b.cidr,
            format!(
                "{:?} is not a CIDR block (like 10.0.0.0/8 or fd00::/64)",
                b.cidr
            ),
        );
        return;
    };
    for e in &b.except {
        match e.parse::<IpNetwork>() {
            Ok(x)
                if x.is_ipv4() == net.is_ipv4()
                    && net.contains(x.network())
                    && x.prefix() >= net.prefix() => {}
            Ok(_) => cx.err(
                "except",
                e,
                format!("except {e:?} is not inside {:?}", b.cidr),
            ),
            Err(_) => cx.err("except", e, format!("{e:?} is not a CIDR block")),
        }
    }
}

/// A port value as an inclusive range.
pub fn port_range(v: &PortValue) -> Option<(u16, u16)> {
    match v {
        PortValue::One(p) => Some((*p, *p)),
        PortValue::Range(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a <= b).then_some((a, b))
        }
    }
}

fn check_service(cx: &mut Ctx, s: &Service) {
    if s.ports.is_empty() {
        cx.err(
            "name",
            &s.name,
            format!("service {:?} has no ports", s.name),
        );
    }
    for p in &s.ports {
        let icmp = matches!(p.protocol, Protocol::Icmp | Protocol::Icmpv6);
        if let Some(v) = &p.port {
            let shown = match v {
                PortValue::One(n) => n.to_string(),
                PortValue::Range(r) => r.clone(),
            };
            if icmp || p.protocol == Protocol::Any {
                cx.err(
                    "port",
                    &shown,
                    format!("service {:?}: {:?} has no ports", s.name, p.protocol),
                );
            } else if port_range(v).is_none() {
                cx.err(
                    "port",
                    &shown,
                    format!(
                        "service {:?}: {shown:?} is not a port or a range like \"8000-8099\"",
                        s.name
                    ),
                );
            }
        }
        if !icmp && (p.icmp_type.is_some() || p.icmp_code.is_some()) {
            cx.err(
                "icmp_type",
                &s.name,
                format!(
                    "service {:?}: icmp_type/icmp_code need protocol icmp or icmpv6",
                    s.name
                ),
            );
        }
        if p.icmp_code.is_some() && p.icmp_type.is_none() {
            cx.err(
                "icmp_code",
                &s.name,
                format!("service {:?}: icmp_code needs icmp_type", s.name),
            );
        }
    }
}

fn check_rule(cx: &mut Ctx, set: &PolicySet, dir: &str, r: &Rule) {
    let (peers, wrong) = if dir == "ingress" {
        (&r.from, &r.to)
    } else {
        (&r.to, &r.from)
    };
    if !wrong.is_empty() {
        let (right, bad) = if dir == "ingress" {
            ("from", "to")
        } else {
            ("to", "from")
        };
        cx.err(
            bad,
            &r.id,
            format!(
                "rule {:?}: {dir} rules name peers with `{right}`, not `{bad}`",
                r.id
            ),
        );
    }
    if peers.is_empty() {
        cx.err(
            "id",
            &r.id,
            format!(
                "rule {:?} names no peers (write `[any]` to mean any peer)",
                r.id
            ),
        );
    }
    for p in peers {
        check_group_ref(
            cx,
            set,
            if dir == "ingress" { "from" } else { "to" },
            p,
            true,
        );
    }
    for s in &r.services {
        check_service_ref(cx, set, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_reported_with_its_location() {
        let a = "groups:\n  - name: web\n    labels: {app: web}\n  - name: bad\n    ip_blocks: [{cidr: 10.0.0.0/33}]\nservices:\n  - name: http\n    ports: [{protocol: tcp, port: \"90-80\"}]\n";
        let b = "policies:\n  - name: p1\n    tier: application\n    priority: 10\n    applies_to: [web]\n    ingress:\n      - {id: r1, action: allow, from: [dbb], services: [http, smtp]}\n  - name: p2\n    tier: application\n    priority: 10\n    applies_to: [web]\n    ingress:\n      - {id: r1, action: allow, from: [any]}\n";
        let c = "policies:\n  - name: p3\n    tier: application\n    priority: 20\n    applies_to: [web]\n    colour: red\n";
        let errs = load_sources(&[
            ("a.yaml".into(), a.into()),
            ("b.yaml".into(), b.into()),
            ("c.yaml".into(), c.into()),
        ])
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        let has = |s: &str| text.iter().any(|t| t.contains(s));
        assert!(has("a.yaml:5:"), "bad CIDR located: {text:#?}");
        assert!(has("is not a CIDR block"));
        assert!(has("a.yaml:8:") && has("\"90-80\" is not a port"));
        assert!(has("b.yaml:7:") && has("group \"dbb\" is not defined"));
        assert!(has("service \"smtp\" is not defined"));
        assert!(has("priority clash"));
        assert!(has("rule id \"r1\" is already used"));
        assert!(has("c.yaml:6:") && has("unknown field"), "{text:#?}");
    }
}
