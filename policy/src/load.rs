//! Loading and validation: YAML files → [`Resolved`], the checked, resolved form the
//! compiler, the reference evaluator and the linter share. Every error is collected (never
//! the first only), each with file, line and column.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use bulkhead_abi::{DIR_EGRESS, DIR_INGRESS};

use crate::net::{parse_mac, Net};
use crate::types::*;

/// One problem in the input, located.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
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

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} error(s) in the policy set:\n{}", .0.len(), .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

/// `(key, value)` → positions (line, column) of the value.
pub type LocIndex = HashMap<(String, String), Vec<(usize, usize)>>;

type Resolution = (BTreeSet<usize>, Vec<(Net, Vec<Net>)>);

/// A source file kept for locating semantic errors.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    /// Lazily built `key: value` → positions index (see [`Source::locate`]).
    pub index: std::sync::OnceLock<LocIndex>,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Source {
        Source {
            path: path.into(),
            text: text.into(),
            index: Default::default(),
        }
    }
}

impl Source {
    /// Line and column (1-based) of the `nth` line whose `key:` holds `value` (quotes and a
    /// leading `- ` ignored); else of the first occurrence of `value`; else 1:1.
    pub fn locate(&self, key: &str, value: &str, nth: usize) -> (usize, usize) {
        let idx = self.index.get_or_init(|| Self::build_index(&self.text));
        match idx
            .get(&(key.to_string(), value.to_string()))
            .and_then(|v| v.get(nth))
        {
            Some(&at) => at,
            None => self.find(value),
        }
    }

    /// Every `key: value` in the text (block and flow style) → positions of the value.
    #[allow(clippy::type_complexity)]
    fn build_index(text: &str) -> HashMap<(String, String), Vec<(usize, usize)>> {
        let mut out: HashMap<(String, String), Vec<(usize, usize)>> = HashMap::new();
        let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
        for (i, line) in text.lines().enumerate() {
            let code = line.split(" #").next().unwrap_or(line);
            let mut from = 0;
            while let Some(off) = code[from..].find(':') {
                let colon = from + off;
                from = colon + 1;
                // key: the word before the colon
                let kstart = code[..colon]
                    .char_indices()
                    .rev()
                    .take_while(|(_, c)| is_word(*c))
                    .last()
                    .map(|(j, _)| j);
                let Some(kstart) = kstart else { continue };
                let key = &code[kstart..colon];
                let rest = &code[colon + 1..];
                if !rest.is_empty() && !rest.starts_with(' ') {
                    continue; // not a mapping colon (e.g. inside an IPv6 address)
                }
                let trimmed = rest.trim_start();
                let vstart = code.len() - trimmed.len();
                let (quoted, body) = match trimmed.chars().next() {
                    Some(q @ ('"' | '\'')) => (1, trimmed[1..].split(q).next().unwrap_or("")),
                    _ => (
                        0,
                        trimmed
                            .split([',', '}', ']'])
                            .next()
                            .unwrap_or("")
                            .trim_end(),
                    ),
                };
                out.entry((key.to_string(), body.to_string()))
                    .or_default()
                    .push((i + 1, vstart + quoted + 1));
            }
        }
        out
    }

    /// Like [`Source::locate`], but the first match at or after line `from` (1-based).
    pub fn locate_from(&self, from: usize, key: &str, value: &str) -> (usize, usize) {
        let rest: String = self
            .text
            .lines()
            .skip(from.saturating_sub(1))
            .collect::<Vec<_>>()
            .join("\n");
        let sub = Source::new(self.path.clone(), rest);
        let (l, c) = sub.locate(key, value, 0);
        if (l, c) == (1, 1) {
            self.locate(key, value, 0)
        } else {
            (l + from - 1, c)
        }
    }

    /// Line and column of the first occurrence of `needle` at or after line `from`.
    pub fn find_from(&self, from: usize, needle: &str) -> (usize, usize) {
        for (i, line) in self.text.lines().enumerate().skip(from.saturating_sub(1)) {
            if let Some(c) = line.find(needle) {
                return (i + 1, c + 1);
            }
        }
        self.find(needle)
    }

    /// Line and column of the first occurrence of `needle`.
    pub fn find(&self, needle: &str) -> (usize, usize) {
        let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-' || c == '.';
        if !needle.is_empty() {
            for (i, line) in self.text.lines().enumerate() {
                for (c, _) in line.match_indices(needle) {
                    let b = line[..c].chars().next_back().is_none_or(|x| !is_word(x));
                    let a = line[c + needle.len()..]
                        .chars()
                        .next()
                        .is_none_or(|x| !is_word(x));
                    if a && b {
                        return (i + 1, c + 1);
                    }
                }
            }
            for (i, line) in self.text.lines().enumerate() {
                if let Some(c) = line.find(needle) {
                    return (i + 1, c + 1);
                }
            }
        }
        (1, 1)
    }
}

// --------------------------------------------------------------- resolved form ----

/// A set of addresses: a union of blocks, each a prefix minus exceptions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrSet {
    pub blocks: Vec<(Net, Vec<Net>)>,
}

impl AddrSet {
    pub fn contains(&self, a: &IpAddr) -> bool {
        self.blocks
            .iter()
            .any(|(n, ex)| n.contains_addr(a) && !ex.iter().any(|e| e.contains_addr(a)))
    }
    pub fn any() -> AddrSet {
        AddrSet {
            blocks: vec![(Net::all_v4(), vec![]), (Net::all_v6(), vec![])],
        }
    }
}

/// A protocol/port match. `proto: None` = every protocol. `range: None` = every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcEntry {
    pub proto: Option<u8>,
    /// Destination port range, or ICMP `type<<8|code` range.
    pub range: Option<(u16, u16)>,
}

impl SvcEntry {
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        match self.proto {
            None => true,
            Some(p) if p != proto => false,
            Some(_) => match self.range {
                None => true,
                Some((a, b)) => crate::port_kind(proto).is_some() && a <= port && port <= b,
            },
        }
    }
}

/// Empty = every protocol and port.
pub type SvcSet = Vec<SvcEntry>;

pub fn svc_matches(s: &SvcSet, proto: u8, port: u16) -> bool {
    s.is_empty() || s.iter().any(|e| e.matches(proto, port))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmR {
    pub name: String,
    pub uuid: String,
    pub labels: BTreeMap<String, String>,
    pub host: String,
    pub interfaces: Vec<([u8; 6], Vec<IpAddr>)>,
    /// Own addresses plus shared ones.
    pub addrs: Vec<IpAddr>,
    pub infra_server: bool,
}

/// The final action of a rule, in language terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RAction {
    Allow,
    Deny,
    Reject,
    Pass,
}

/// A rule resolved: whom it protects, whom it names, what it does.
#[derive(Clone, Debug)]
pub struct RuleR {
    /// Stable id (also the index into `Resolved::rule_ids` minus the specials).
    pub id: String,
    pub policy: String,
    pub tier: usize,
    pub priority: u32,
    /// Position inside the policy (ingress rules first, then egress).
    pub pos: usize,
    pub dir: u8,
    pub action: RAction,
    pub monitor: bool,
    pub log: bool,
    pub symmetric: bool,
    /// Sorted VM indices the policy applies to.
    pub applies: Vec<usize>,
    /// Addresses of the applied-to VMs (peer set of the reflected rule).
    pub applies_set: usize,
    /// Peer address set id.
    pub peers: usize,
    /// Sorted managed VMs the peers name (reflection targets).
    pub peer_vms: Vec<usize>,
    pub svc: SvcSet,
    pub file: PathBuf,
    pub line: usize,
}

#[derive(Clone, Debug)]
pub struct SystemR {
    pub name: String,
    pub set: usize,
    pub svc: SvcSet,
}

#[derive(Clone, Debug)]
pub struct QuarantineR {
    pub vm: usize,
    pub full: bool,
    /// Allowed peers (partial).
    pub allow: usize,
}

/// The validated, resolved policy set and inventory.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub tiers: Vec<String>,
    pub default_action: DefaultAction,
    pub vms: Vec<VmR>,
    pub vm_by_name: HashMap<String, usize>,
    /// Every address set, deduplicated; rules refer to them by index.
    pub sets: Vec<AddrSet>,
    pub system: Vec<SystemR>,
    pub quarantine: Vec<QuarantineR>,
    pub monitor_vms: BTreeSet<usize>,
    /// Sorted by (tier, priority, pos).
    pub rules: Vec<RuleR>,
    /// Groups and which VMs/sets they resolve to (for lint).
    pub groups: Vec<(String, Vec<usize>, usize)>,
    /// Group names referenced anywhere.
    pub used_groups: BTreeSet<String>,
    /// Per VM: the rules that judge it, in order, `true` = reflected (symmetric) instance.
    pub vm_rules: Vec<Vec<(u32, bool)>>,
}

/// Kind of an entry in an endpoint's ordered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    System(usize),
    Quarantine(usize),
    Rule { rule: usize, reflected: bool },
}

/// One entry in the ordered rule list of (VM, direction): the compiled meaning of the
/// language for that endpoint. `tier` is `None` above all tiers (system, quarantine).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub kind: EntryKind,
    pub tier: Option<usize>,
    pub action: RAction,
    pub monitor: bool,
    pub log: bool,
    pub peers: usize,
    /// Index into `Resolved::rule_ids()`.
    pub rule_index: u32,
}

impl Resolved {
    /// Stable rule ids: 0 = default, then system endpoints, quarantines, then rules in
    /// evaluation order.
    pub fn rule_ids(&self) -> Vec<String> {
        let mut v = vec!["default".to_string()];
        v.extend(self.system.iter().map(|s| format!("system/{}", s.name)));
        v.extend(
            self.quarantine
                .iter()
                .map(|q| format!("quarantine/{}", self.vms[q.vm].name)),
        );
        v.extend(self.rules.iter().map(|r| r.id.clone()));
        v
    }

    /// The ordered entries that judge traffic of `vm` in direction `dir` (from the VM's
    /// point of view). This *is* the language's meaning: system endpoints, then quarantine,
    /// then tiers in order, priority inside a tier, rule order inside a policy; symmetric
    /// allows reflected onto the peer VM's opposite direction at the same position.
    pub fn entries(&self, vm: usize, dir: u8) -> Vec<Entry> {
        let mut out = Vec::new();
        let nsys = self.system.len() as u32;
        for (i, s) in self.system.iter().enumerate() {
            let _ = &s.svc;
            out.push(Entry {
                kind: EntryKind::System(i),
                tier: None,
                action: RAction::Allow,
                monitor: false,
                log: false,
                peers: s.set,
                rule_index: 1 + i as u32,
            });
        }
        for (i, q) in self.quarantine.iter().enumerate() {
            if q.vm != vm {
                continue;
            }
            let idx = 1 + nsys + i as u32;
            if !q.full {
                out.push(Entry {
                    kind: EntryKind::Quarantine(i),
                    tier: None,
                    action: RAction::Allow,
                    monitor: false,
                    log: true,
                    peers: q.allow,
                    rule_index: idx,
                });
            }
            out.push(Entry {
                kind: EntryKind::Quarantine(i),
                tier: None,
                action: RAction::Deny,
                monitor: false,
                log: true,
                peers: usize::MAX,
                rule_index: idx,
            });
        }
        let base = 1 + nsys + self.quarantine.len() as u32;
        for &(i, reflected) in &self.vm_rules[vm] {
            let r = &self.rules[i as usize];
            // Original rules judge the rule's own direction; reflected ones the opposite.
            if (r.dir == dir) == reflected {
                continue;
            }
            out.push(Entry {
                kind: EntryKind::Rule {
                    rule: i as usize,
                    reflected,
                },
                tier: Some(r.tier),
                action: r.action,
                monitor: r.monitor,
                log: r.log,
                peers: if reflected { r.applies_set } else { r.peers },
                rule_index: base + i,
            });
        }
        out
    }

    /// The services an entry matches.
    pub fn entry_svc(&self, e: &Entry) -> &SvcSet {
        static EMPTY: SvcSet = Vec::new();
        match e.kind {
            EntryKind::System(i) => &self.system[i].svc,
            EntryKind::Quarantine(_) => &EMPTY,
            EntryKind::Rule { rule, .. } => &self.rules[rule].svc,
        }
    }

    /// Does the entry's peer set contain `a`? (`usize::MAX` = every address.)
    pub fn entry_peer_contains(&self, e: &Entry, a: &IpAddr) -> bool {
        e.peers == usize::MAX || self.sets[e.peers].contains(a)
    }

    pub fn hosts(&self) -> BTreeSet<String> {
        self.vms.iter().map(|v| v.host.clone()).collect()
    }
}

pub fn dir_name(d: u8) -> &'static str {
    if d == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

// ------------------------------------------------------------------- loading ----

/// The raw policy set: every file parsed, with its source.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub files: Vec<(Source, PolicyFile)>,
    pub inventory: Option<(Source, Inventory)>,
    /// The inventory is what runs right now (the controller's view): a VM the policy names
    /// that is not running is not an error, its references simply match nothing.
    pub live_inventory: bool,
}

impl PolicySet {
    /// Whether naming a VM the inventory lacks is an error.
    fn strict_vm_names(&self) -> bool {
        self.inventory.is_some() && !self.live_inventory
    }
}

/// Read every `*.yaml`/`*.yml` in `dir` (sorted; `inventory.yaml` is the inventory unless
/// `inventory` names another file) and validate them together.
pub fn load_dir(dir: &Path, inventory: Option<&Path>) -> Result<(PolicySet, Resolved), LoadError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            )
        })
        .collect();
    names.sort();
    let inv_path = inventory
        .map(Path::to_path_buf)
        .or_else(|| names.iter().find(|p| is_inventory_name(p)).cloned());
    let mut texts = Vec::new();
    for p in &names {
        if Some(p) == inv_path.as_ref() || is_inventory_name(p) {
            continue;
        }
        texts.push(read(p)?);
    }
    let inv = match inv_path {
        Some(p) => Some(read(&p)?),
        None => None,
    };
    load_sources(texts, inv)
}

fn is_inventory_name(p: &Path) -> bool {
    matches!(
        p.file_name().and_then(|n| n.to_str()),
        Some("inventory.yaml") | Some("inventory.yml")
    )
}

fn read(p: &Path) -> Result<Source, LoadError> {
    let text = std::fs::read_to_string(p).map_err(|e| LoadError::Io {
        path: p.to_path_buf(),
        source: e,
    })?;
    Ok(Source::new(p, text))
}

fn yaml_diag(src: &Source, e: &serde_yaml::Error) -> Diagnostic {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    let mut message = e.to_string();
    // serde_yaml appends " at line X column Y"; we print the location ourselves.
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    Diagnostic {
        file: src.path.clone(),
        line,
        column,
        message,
    }
}

/// Parse and validate sources (policy files and an optional inventory).
pub fn load_sources(
    files: Vec<Source>,
    inventory: Option<Source>,
) -> Result<(PolicySet, Resolved), LoadError> {
    load_sources_with(files, inventory, false)
}

/// As [`load_sources`], for an inventory of what runs now (see [`PolicySet::live_inventory`]).
pub fn load_sources_live(
    files: Vec<Source>,
    inventory: Source,
) -> Result<(PolicySet, Resolved), LoadError> {
    load_sources_with(files, Some(inventory), true)
}

/// [`load_sources_live`] with the inventory already as data (the controller builds it from
/// what its agents report): nothing to parse. `inventory` names it in diagnostics; its text
/// may be left empty, then diagnostics about the inventory carry no line (a caller can load
/// again from text to locate them — invalid inventories are rare, large ones are not).
pub fn load_sources_live_parsed(
    files: Vec<Source>,
    inventory: Source,
    parsed: Inventory,
) -> Result<(PolicySet, Resolved), LoadError> {
    load_sources_inner(files, Some((inventory, Some(parsed))), true)
}

fn load_sources_with(
    files: Vec<Source>,
    inventory: Option<Source>,
    live_inventory: bool,
) -> Result<(PolicySet, Resolved), LoadError> {
    load_sources_inner(files, inventory.map(|s| (s, None)), live_inventory)
}

fn load_sources_inner(
    files: Vec<Source>,
    inventory: Option<(Source, Option<Inventory>)>,
    live_inventory: bool,
) -> Result<(PolicySet, Resolved), LoadError> {
    let mut diags = Vec::new();
    let mut set = PolicySet {
        live_inventory,
        ..PolicySet::default()
    };
    for src in files {
        if src.text.trim().is_empty() {
            continue;
        }
        match serde_yaml::from_str::<PolicyFile>(&src.text) {
            Ok(f) => set.files.push((src, f)),
            Err(e) => diags.push(yaml_diag(&src, &e)),
        }
    }
    match inventory {
        Some((src, Some(i))) => set.inventory = Some((src, i)),
        Some((src, None)) => match serde_yaml::from_str::<Inventory>(&src.text) {
            Ok(i) => set.inventory = Some((src, i)),
            Err(e) => diags.push(yaml_diag(&src, &e)),
        },
        None => {}
    }
    let parse_failed = !diags.is_empty();
    let resolved = Resolver::new(&set, &mut diags).run();
    if parse_failed || !diags.is_empty() {
        diags.sort();
        diags.dedup();
        return Err(LoadError::Invalid(diags));
    }
    Ok((set, resolved))
}

struct Resolver<'a> {
    set: &'a PolicySet,
    diags: &'a mut Vec<Diagnostic>,
    vms: Vec<VmR>,
    vm_by_name: HashMap<String, usize>,
    groups: HashMap<String, (&'a Source, &'a Group)>,
    services: HashMap<String, (&'a Source, &'a Service)>,
    sets: Vec<AddrSet>,
    set_ids: HashMap<AddrSet, usize>,
    /// group name → (vms, blocks), memoised.
    group_cache: HashMap<String, Resolution>,
    used_groups: BTreeSet<String>,
    /// (label key, value) → VMs carrying it; built on first use, after the inventory.
    label_index: Option<HashMap<(String, String), Vec<usize>>>,
}

impl<'a> Resolver<'a> {
    fn new(set: &'a PolicySet, diags: &'a mut Vec<Diagnostic>) -> Self {
        Resolver {
            set,
            diags,
            vms: Vec::new(),
            vm_by_name: HashMap::new(),
            groups: HashMap::new(),
            services: HashMap::new(),
            sets: Vec::new(),
            set_ids: HashMap::new(),
            group_cache: HashMap::new(),
            used_groups: BTreeSet::new(),
            label_index: None,
        }
    }

    /// VMs carrying label `k: v` (a superset of a selector's matches when it requires it).
    fn with_label(&mut self, k: &str, v: &str) -> Vec<usize> {
        let vms = &self.vms;
        let index = self.label_index.get_or_insert_with(|| {
            let mut m: HashMap<(String, String), Vec<usize>> = HashMap::new();
            for (i, vm) in vms.iter().enumerate() {
                for (k, v) in &vm.labels {
                    m.entry((k.clone(), v.clone())).or_default().push(i);
                }
            }
            m
        });
        index
            .get(&(k.to_string(), v.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    fn err(&mut self, src: &Source, at: (usize, usize), message: String) {
        self.diags.push(Diagnostic {
            file: src.path.clone(),
            line: at.0,
            column: at.1,
            message,
        });
    }

    fn intern(&mut self, s: AddrSet) -> usize {
        if let Some(&i) = self.set_ids.get(&s) {
            return i;
        }
        let i = self.sets.len();
        self.sets.push(s.clone());
        self.set_ids.insert(s, i);
        i
    }

    fn run(mut self) -> Resolved {
        self.inventory();
        let set = self.set;
        // Settings.
        let settings: Vec<(&Source, &Settings)> = set
            .files
            .iter()
            .filter_map(|(s, f)| f.settings.as_ref().map(|x| (s, x)))
            .collect();
        if settings.len() > 1 {
            for (s, _) in &settings[1..] {
                let at = s.find("settings:");
                self.err(
                    s,
                    at,
                    format!(
                        "`settings` appears again; it is already set in {} (keep one)",
                        settings[0].0.path.display()
                    ),
                );
            }
        }
        let (tiers, default_action) = match settings.first() {
            Some((s, st)) => {
                let mut seen = BTreeSet::new();
                for t in &st.tiers {
                    if !seen.insert(t.clone()) {
                        let at = s.locate("tiers", t, 0);
                        self.err(s, at, format!("tier `{t}` is listed twice"));
                    }
                }
                if st.tiers.is_empty() {
                    let at = s.find("tiers");
                    self.err(s, at, "`tiers` must name at least one tier".into());
                }
                (st.tiers.clone(), st.default_action)
            }
            None => {
                if !set.files.is_empty() {
                    let s = &set.files[0].0;
                    self.err(
                        s,
                        (1, 1),
                        "no file of the policy set has a `settings` section (tiers and default action are required)".into(),
                    );
                }
                (vec![], DefaultAction::Deny)
            }
        };
        // Named groups and services (duplicates reported; their bodies still checked).
        let mut dup_groups: Vec<(&Source, &Group)> = Vec::new();
        for (src, f) in &set.files {
            for (n, g) in f.groups.iter().enumerate() {
                let _ = n;
                if let Some((other, _)) = self.groups.get(&g.name) {
                    let o = other.path.display().to_string();
                    let nth = if other.path == src.path { 1 } else { 0 };
                    let at = src.locate("name", &g.name, nth);
                    self.err(
                        src,
                        at,
                        format!("group `{}` is defined twice (also in {o})", g.name),
                    );
                    dup_groups.push((src, g));
                } else {
                    self.groups.insert(g.name.clone(), (src, g));
                }
            }
            for s in &f.services {
                if let Some((other, _)) = self.services.get(&s.name) {
                    let o = other.path.display().to_string();
                    let nth = if other.path == src.path { 1 } else { 0 };
                    let at = src.locate("name", &s.name, nth);
                    self.err(
                        src,
                        at,
                        format!("service `{}` is defined twice (also in {o})", s.name),
                    );
                } else {
                    self.services.insert(s.name.clone(), (src, s));
                }
                for p in &s.ports {
                    let _ = self.port_spec(src, p);
                }
            }
        }
        // Group bodies: resolve each once so errors inside appear even if unused.
        let mut names: Vec<String> = self.groups.keys().cloned().collect();
        names.sort();
        let mut groups_out = Vec::new();
        for n in names {
            let (vms, blocks) = self.group(&n, &mut Vec::new());
            let vms: Vec<usize> = vms.into_iter().collect();
            let id = self.intern(AddrSet { blocks });
            groups_out.push((n, vms, id));
        }
        for (src, g) in dup_groups {
            for m in &g.members {
                let _ = self.peer(src, m, &mut vec![g.name.clone()]);
            }
        }
        self.used_groups.clear();
        // Shared addresses and system endpoints, monitor endpoints.
        let mut system = Vec::new();
        let mut monitor_vms = BTreeSet::new();
        if let Some((src, st)) = settings.first() {
            for sa in &st.shared_addresses {
                let addr: Result<IpAddr, _> = sa.address.parse();
                let Ok(addr) = addr else {
                    let at = src.locate("address", &sa.address, 0);
                    self.err(
                        src,
                        at,
                        format!("shared address `{}` is not a single IP address", sa.address),
                    );
                    continue;
                };
                for v in &sa.vms {
                    match self.vm_by_name.get(v) {
                        Some(&i) => {
                            if !self.vms[i].addrs.contains(&addr) {
                                self.vms[i].addrs.push(addr);
                            }
                        }
                        None if set.strict_vm_names() => {
                            let at = src.find(v);
                            self.err(src, at, format!("shared address {addr} names VM `{v}`, which is not in the inventory"));
                        }
                        None => {}
                    }
                }
            }
            let mut names = BTreeSet::new();
            for se in &st.system_endpoints {
                if !names.insert(se.name.clone()) {
                    let at = src.locate("name", &se.name, 1);
                    self.err(
                        src,
                        at,
                        format!("system endpoint `{}` is defined twice", se.name),
                    );
                }
                let mut blocks = Vec::new();
                for a in &se.addresses {
                    match Net::parse(a) {
                        Ok(n) => blocks.push((n, vec![])),
                        Err(m) => {
                            let at = src.find(a);
                            self.err(src, at, format!("system endpoint `{}`: {m}", se.name));
                        }
                    }
                }
                let svc = self.services_of(src, &se.services);
                let set = self.intern(AddrSet { blocks });
                system.push(SystemR {
                    name: se.name.clone(),
                    set,
                    svc,
                });
            }
            for p in &st.monitor_endpoints {
                let (vms, blocks) = self.peer(src, p, &mut Vec::new());
                if !blocks.is_empty() {
                    let at = src.find("monitor_endpoints");
                    self.err(src, at, "`monitor_endpoints` selects VMs; an ip_block or `any` cannot be put in monitor mode".into());
                }
                monitor_vms.extend(vms);
            }
        }
        // Policies.
        let mut rules = Vec::new();
        let mut policy_names: HashMap<String, PathBuf> = HashMap::new();
        let mut rule_ids: HashMap<String, PathBuf> = HashMap::new();
        let mut prio: HashMap<(String, u32), String> = HashMap::new();
        for (src, f) in &set.files {
            for p in &f.policies {
                let at = src.locate("name", &p.name, 0);
                if let Some(o) = policy_names.get(&p.name) {
                    let nth = usize::from(o == &src.path);
                    let at = src.locate("name", &p.name, nth);
                    self.err(
                        src,
                        at,
                        format!(
                            "policy `{}` is defined twice (also in {})",
                            p.name,
                            o.display()
                        ),
                    );
                }
                policy_names.insert(p.name.clone(), src.path.clone());
                let tier = tiers.iter().position(|t| t == &p.tier);
                if tier.is_none() {
                    let at = src.locate("tier", &p.tier, 0);
                    self.err(
                        src,
                        at,
                        format!(
                            "policy `{}` names tier `{}`, which is not in settings.tiers ({})",
                            p.name,
                            p.tier,
                            tiers.join(", ")
                        ),
                    );
                }
                if let Some(o) = prio.get(&(p.tier.clone(), p.priority)) {
                    let from = src.locate("name", &p.name, 0).0;
                    let at = src.locate_from(from, "priority", &p.priority.to_string());
                    self.err(src, at, format!("policy `{}` has priority {} in tier `{}`, the same as policy `{o}`; give each policy of a tier its own priority so the order is unambiguous", p.name, p.priority, p.tier));
                } else {
                    prio.insert((p.tier.clone(), p.priority), p.name.clone());
                }
                // Applied-to.
                let mut applies = BTreeSet::new();
                for a in &p.applies_to {
                    let (vms, blocks) = self.peer(src, a, &mut Vec::new());
                    if !blocks.is_empty() {
                        let from = src.locate("name", &p.name, 0).0;
                        let at = src.find_from(from, "applies_to");
                        self.err(src, at, format!("policy `{}`: `applies_to` must select VMs (group of VMs, vm, labels); addresses (ip_block, any) cannot be protected", p.name));
                    }
                    applies.extend(vms);
                }
                let applies: Vec<usize> = applies.into_iter().collect();
                let applies_set = {
                    let mut blocks: Vec<(Net, Vec<Net>)> = applies
                        .iter()
                        .flat_map(|&v| self.vms[v].addrs.iter().map(|a| (Net::host(*a), vec![])))
                        .collect();
                    blocks.sort();
                    blocks.dedup();
                    self.intern(AddrSet { blocks })
                };
                let all = p
                    .ingress
                    .iter()
                    .map(|r| (DIR_INGRESS, r))
                    .chain(p.egress.iter().map(|r| (DIR_EGRESS, r)));
                for (pos, (dir, r)) in all.enumerate() {
                    if let Some(o) = rule_ids.get(&r.id) {
                        let nth = usize::from(o == &src.path);
                        let at = src.locate("id", &r.id, nth);
                        self.err(src, at, format!("rule id `{}` is used twice (also in {}); rule ids must be unique, the audit trail names them", r.id, o.display()));
                    }
                    rule_ids.insert(r.id.clone(), src.path.clone());
                    let line = src.locate("id", &r.id, 0).0;
                    let mut vms = BTreeSet::new();
                    let mut blocks = Vec::new();
                    if r.peers.is_empty() {
                        blocks = AddrSet::any().blocks;
                    }
                    for pe in &r.peers {
                        let (v, b) = self.peer(src, pe, &mut Vec::new());
                        vms.extend(v);
                        blocks.extend(b);
                    }
                    for &v in &vms {
                        for a in &self.vms[v].addrs {
                            blocks.push((Net::host(*a), vec![]));
                        }
                    }
                    blocks.sort();
                    blocks.dedup();
                    let peers = self.intern(AddrSet { blocks });
                    let svc = self.services_of(src, &r.services);
                    rules.push(RuleR {
                        id: r.id.clone(),
                        policy: p.name.clone(),
                        tier: tier.unwrap_or(0),
                        priority: p.priority,
                        pos,
                        dir,
                        action: match r.action {
                            Action::Allow => RAction::Allow,
                            Action::Deny => RAction::Deny,
                            Action::Reject => RAction::Reject,
                            Action::Pass => RAction::Pass,
                        },
                        monitor: p.mode == Mode::Monitor,
                        log: r.log,
                        symmetric: p.symmetric,
                        applies: applies.clone(),
                        applies_set,
                        peers,
                        peer_vms: vms.into_iter().collect(),
                        svc,
                        file: src.path.clone(),
                        line,
                    });
                }
                let _ = at;
            }
        }
        rules.sort_by_key(|a| (a.tier, a.priority, a.pos));
        // Quarantine.
        let mut quarantine = Vec::new();
        let mut qseen = BTreeSet::new();
        for (src, f) in &set.files {
            for q in &f.quarantine {
                let vm = self.vm_by_name.get(&q.vm).copied();
                if vm.is_none() && set.strict_vm_names() {
                    let at = src.locate("vm", &q.vm, 0);
                    self.err(
                        src,
                        at,
                        format!(
                            "quarantine names VM `{}`, which is not in the inventory",
                            q.vm
                        ),
                    );
                }
                if !qseen.insert(q.vm.clone()) {
                    let at = src.locate("vm", &q.vm, 1);
                    self.err(src, at, format!("VM `{}` is quarantined twice", q.vm));
                }
                let mut blocks = Vec::new();
                for pe in &q.allow {
                    let (v, b) = self.peer(src, pe, &mut Vec::new());
                    blocks.extend(b);
                    for v in v {
                        for a in &self.vms[v].addrs {
                            blocks.push((Net::host(*a), vec![]));
                        }
                    }
                }
                match (q.mode, q.allow.is_empty()) {
                    (QuarantineMode::Partial, true) => {
                        let at = src.locate("vm", &q.vm, 0);
                        self.err(src, at, format!("partial quarantine of `{}` needs `allow` (the forensic or management peers)", q.vm));
                    }
                    (QuarantineMode::Full, false) => {
                        let at = src.locate("vm", &q.vm, 0);
                        self.err(src, at, format!("full quarantine of `{}` allows nothing; remove `allow` or use mode: partial", q.vm));
                    }
                    _ => {}
                }
                blocks.sort();
                blocks.dedup();
                let allow = self.intern(AddrSet { blocks });
                if let Some(vm) = vm {
                    quarantine.push(QuarantineR {
                        vm,
                        full: q.mode == QuarantineMode::Full,
                        allow,
                    });
                }
            }
        }
        quarantine.sort_by_key(|q| q.vm);
        let mut vm_rules: Vec<Vec<(u32, bool)>> = vec![Vec::new(); self.vms.len()];
        for (i, r) in rules.iter().enumerate() {
            for &v in &r.applies {
                vm_rules[v].push((i as u32, false));
            }
            if r.symmetric && r.action == RAction::Allow {
                for &v in &r.peer_vms {
                    vm_rules[v].push((i as u32, true));
                }
            }
        }
        Resolved {
            vm_rules,
            tiers,
            default_action,
            vms: self.vms,
            vm_by_name: self.vm_by_name,
            sets: self.sets,
            system,
            quarantine,
            monitor_vms,
            rules,
            groups: groups_out,
            used_groups: self.used_groups,
        }
    }

    fn inventory(&mut self) {
        let Some((src, inv)) = &self.set.inventory else {
            return;
        };
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        let mut macs: HashMap<[u8; 6], String> = HashMap::new();
        for vm in &inv.vms {
            if self.vm_by_name.contains_key(&vm.name) {
                let at = src.locate("name", &vm.name, 1);
                self.err(
                    src,
                    at,
                    format!("VM `{}` appears twice in the inventory", vm.name),
                );
                continue;
            }
            let mut ifs = Vec::new();
            let mut addrs = Vec::new();
            for i in &vm.interfaces {
                let mac = match parse_mac(&i.mac) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        let at = src.locate("mac", &i.mac, 0);
                        self.err(src, at, format!("VM `{}`: {e}", vm.name));
                        None
                    }
                };
                if let Some(o) = mac.and_then(|m| macs.insert(m, vm.name.clone())) {
                    let at = src.locate("mac", &i.mac, 1);
                    self.err(
                        src,
                        at,
                        format!("MAC {} of VM `{}` is also used by VM `{o}`", i.mac, vm.name),
                    );
                }
                let mut ips = Vec::new();
                for s in &i.ips {
                    match s.parse::<IpAddr>() {
                        Ok(a) => {
                            if let Some(o) = ip_owner.insert(a, vm.name.clone()) {
                                let at = src.find(s);
                                self.err(src, at, format!("address {a} of VM `{}` is also VM `{o}`'s; list shared addresses (VIP/VRRP) under settings.shared_addresses", vm.name));
                            }
                            ips.push(a);
                            addrs.push(a);
                        }
                        Err(_) => {
                            let at = src.find(s);
                            self.err(
                                src,
                                at,
                                format!("VM `{}`: `{s}` is not an IP address", vm.name),
                            );
                        }
                    }
                }
                if let Some(mac) = mac {
                    ifs.push((mac, ips));
                }
            }
            self.vm_by_name.insert(vm.name.clone(), self.vms.len());
            self.vms.push(VmR {
                name: vm.name.clone(),
                uuid: vm.uuid.clone(),
                labels: vm.labels.clone(),
                host: vm.host.clone(),
                interfaces: ifs,
                addrs,
                infra_server: vm.infra_server,
            });
        }
    }

    fn services_of(&mut self, src: &Source, refs: &[ServiceRef]) -> SvcSet {
        let mut out = Vec::new();
        for r in refs {
            match r {
                ServiceRef::Named(n) => match self.services.get(n) {
                    Some((ssrc, s)) => {
                        let (ssrc, s) = (*ssrc, *s);
                        for p in &s.ports {
                            if let Ok(mut e) = self.port_spec(ssrc, p) {
                                out.append(&mut e);
                            }
                        }
                    }
                    None => {
                        let at = src.locate("services", n, 0);
                        let at = if at == (1, 1) { src.find(n) } else { at };
                        self.err(
                            src,
                            at,
                            format!(
                                "service `{n}` is not defined (named services: {})",
                                self.known_services()
                            ),
                        );
                    }
                },
                ServiceRef::Inline(p) => {
                    if let Ok(mut e) = self.port_spec(src, p) {
                        out.append(&mut e);
                    }
                }
            }
        }
        if out.iter().any(|e| e.proto.is_none()) {
            return Vec::new();
        }
        out.sort();
        out.dedup();
        out
    }

    fn known_services(&self) -> String {
        let mut v: Vec<&String> = self.services.keys().collect();
        v.sort();
        v.into_iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Entries of one protocol/port spec; reports errors.
    #[allow(clippy::result_unit_err)]
    fn port_spec(&mut self, src: &Source, p: &PortSpec) -> Result<Vec<SvcEntry>, ()> {
        let proto: Option<u8> = match p.protocol.to_ascii_lowercase().as_str() {
            "any" => None,
            "tcp" => Some(6),
            "udp" => Some(17),
            "sctp" => Some(132),
            "icmp" => Some(1),
            "icmpv6" => Some(58),
            other => match other.parse::<u8>() {
                Ok(n) if n != 0 => Some(n),
                _ => {
                    let at = src.locate("protocol", &p.protocol, 0);
                    self.err(src, at, format!("unknown protocol `{}` (use tcp, udp, sctp, icmp, icmpv6, any or a protocol number 1-255)", p.protocol));
                    return Err(());
                }
            },
        };
        let is_icmp = matches!(proto, Some(1) | Some(58));
        let is_l4 = matches!(proto, Some(6) | Some(17) | Some(132));
        if !is_icmp && (p.icmp_type.is_some() || p.icmp_code.is_some()) {
            let at = src.locate("protocol", &p.protocol, 0);
            self.err(
                src,
                at,
                format!(
                    "icmp_type/icmp_code only apply to icmp and icmpv6, not `{}`",
                    p.protocol
                ),
            );
            return Err(());
        }
        if is_icmp {
            if p.ports.is_some() {
                let at = src.locate("protocol", &p.protocol, 0);
                self.err(
                    src,
                    at,
                    "ICMP has no ports; use icmp_type and icmp_code".into(),
                );
                return Err(());
            }
            return Ok(vec![SvcEntry {
                proto,
                range: match (p.icmp_type, p.icmp_code) {
                    (None, None) => None,
                    (Some(t), None) => Some((u16::from(t) << 8, u16::from(t) << 8 | 0xff)),
                    (Some(t), Some(c)) => {
                        let v = u16::from(t) << 8 | u16::from(c);
                        Some((v, v))
                    }
                    (None, Some(_)) => {
                        let at = src.find("icmp_code");
                        self.err(src, at, "icmp_code needs icmp_type".into());
                        return Err(());
                    }
                },
            }]);
        }
        let Some(ports) = &p.ports else {
            return Ok(vec![SvcEntry { proto, range: None }]);
        };
        if !is_l4 {
            let at = src.locate("protocol", &p.protocol, 0);
            self.err(
                src,
                at,
                format!(
                    "protocol `{}` has no ports; only tcp, udp and sctp take ports",
                    p.protocol
                ),
            );
            return Err(());
        }
        let text = match ports {
            PortList::One(n) => n.to_string(),
            PortList::List(s) => s.clone(),
        };
        let mut out = Vec::new();
        let mut bad = false;
        for part in text.split(',') {
            let part = part.trim();
            let parse =
                |s: &str| -> Option<u16> { s.trim().parse::<u16>().ok().filter(|&n| n > 0) };
            let r = match part.split_once('-') {
                Some((a, b)) => match (parse(a), parse(b)) {
                    (Some(a), Some(b)) if a <= b => Some((a, b)),
                    _ => None,
                },
                None => parse(part).map(|a| (a, a)),
            };
            match r {
                Some(r) => out.push(SvcEntry {
                    proto,
                    range: Some(r),
                }),
                None => {
                    bad = true;
                    let at = src.locate("ports", &text, 0);
                    let at = (at.0, at.1 + text.find(part).unwrap_or(0));
                    self.err(src, at, format!("`{part}` is not a port or port range: ports are 1-65535, ranges `low-high` with low <= high, separated by commas"));
                }
            }
        }
        if bad {
            Err(())
        } else {
            Ok(out)
        }
    }

    /// Resolve a group by name (cycle-safe).
    fn group(
        &mut self,
        name: &str,
        stack: &mut Vec<String>,
    ) -> (BTreeSet<usize>, Vec<(Net, Vec<Net>)>) {
        self.used_groups.insert(name.to_string());
        if let Some(r) = self.group_cache.get(name) {
            return r.clone();
        }
        let Some((src, g)) = self.groups.get(name).map(|(s, g)| (*s, *g)) else {
            return Default::default();
        };
        if stack.iter().any(|s| s == name) {
            let at = src.locate("name", name, 0);
            self.err(
                src,
                at,
                format!(
                    "group `{name}` includes itself: {} -> {name}",
                    stack.join(" -> ")
                ),
            );
            return Default::default();
        }
        stack.push(name.to_string());
        let mut vms = BTreeSet::new();
        let mut blocks = Vec::new();
        for m in &g.members {
            let (v, b) = self.peer(src, m, stack);
            vms.extend(v);
            blocks.extend(b);
        }
        stack.pop();
        let r = (vms, blocks);
        self.group_cache.insert(name.to_string(), r.clone());
        r
    }

    /// Resolve one selector: managed VMs it names, and address blocks it names directly.
    fn peer(
        &mut self,
        src: &Source,
        p: &Peer,
        stack: &mut Vec<String>,
    ) -> (BTreeSet<usize>, Vec<(Net, Vec<Net>)>) {
        let kinds = [
            p.group.is_some(),
            p.vm.is_some(),
            p.labels.is_some() || p.expressions.is_some(),
            p.ip_block.is_some(),
            p.any.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        let mut vms = BTreeSet::new();
        let mut blocks = Vec::new();
        if kinds != 1 {
            let at = match (&p.group, &p.vm) {
                (Some(g), _) => src.locate("group", g, 0),
                (_, Some(v)) => src.locate("vm", v, 0),
                _ => src.find("peers"),
            };
            self.err(src, at, format!("a selector must have exactly one of `group`, `vm`, `labels`/`expressions`, `ip_block`, `any` (this one has {kinds})"));
            return (vms, blocks);
        }
        if let Some(g) = &p.group {
            if !self.groups.contains_key(g) {
                let at = src.locate("group", g, 0);
                let mut known: Vec<&String> = self.groups.keys().collect();
                known.sort();
                let hint = known
                    .iter()
                    .filter(|k| edit_distance(k, g) <= 2)
                    .min_by_key(|k| edit_distance(k, g))
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                self.err(src, at, format!("group `{g}` is not defined{hint}"));
            } else {
                return self.group(g, stack);
            }
        }
        if let Some(v) = &p.vm {
            match self.vm_by_name.get(v) {
                Some(&i) => {
                    vms.insert(i);
                }
                None if self.set.strict_vm_names() => {
                    let at = src.locate("vm", v, 0);
                    self.err(src, at, format!("VM `{v}` is not in the inventory"));
                }
                None => {}
            }
        }
        if p.labels.is_some() || p.expressions.is_some() {
            if let Some(ex) = &p.expressions {
                for e in ex {
                    let needs = matches!(e.operator, LabelOp::In | LabelOp::NotIn);
                    if needs == e.values.is_empty() {
                        let at = src.locate("key", &e.key, 0);
                        self.err(
                            src,
                            at,
                            format!(
                                "label expression on `{}`: operator {:?} {}",
                                e.key,
                                e.operator,
                                if needs {
                                    "needs `values`"
                                } else {
                                    "takes no `values`"
                                }
                            ),
                        );
                    }
                }
            }
            // A required label narrows the scan to the VMs carrying it (10k VMs × 500 groups).
            let cands: Vec<usize> = match p.labels.as_ref().and_then(|l| l.iter().next()) {
                Some((k, v)) => self.with_label(k, v),
                None => (0..self.vms.len()).collect(),
            };
            for i in cands {
                let vm = &self.vms[i];
                if label_match(&vm.labels, p.labels.as_ref(), p.expressions.as_deref()) {
                    vms.insert(i);
                }
            }
        }
        if let Some(b) = &p.ip_block {
            match Net::parse(&b.cidr) {
                Ok(n) => {
                    let mut ex = Vec::new();
                    for e in &b.except {
                        match Net::parse(e) {
                            Ok(en) if n.contains(&en) => ex.push(en),
                            Ok(_) => {
                                let at = src.find(e);
                                self.err(
                                    src,
                                    at,
                                    format!("except `{e}` is not inside cidr `{}`", b.cidr),
                                );
                            }
                            Err(m) => {
                                let at = src.find(e);
                                self.err(src, at, m);
                            }
                        }
                    }
                    ex.sort();
                    blocks.push((n, ex));
                }
                Err(m) => {
                    let at = src.locate("cidr", &b.cidr, 0);
                    self.err(src, at, m);
                }
            }
        }
        if let Some(a) = p.any {
            if a {
                blocks.extend(AddrSet::any().blocks);
            } else {
                let at = src.find("any:");
                self.err(src, at, "`any: false` selects nothing; remove it".into());
            }
        }
        (vms, blocks)
    }
}

/// Do labels satisfy `labels` (key = value, all) and `expressions` (all)?
pub fn label_match(
    have: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
    exprs: Option<&[LabelExpr]>,
) -> bool {
    labels
        .into_iter()
        .flatten()
        .all(|(k, v)| have.get(k) == Some(v))
        && exprs.into_iter().flatten().all(|e| match e.operator {
            LabelOp::In => have.get(&e.key).is_some_and(|v| e.values.contains(v)),
            LabelOp::NotIn => !have.get(&e.key).is_some_and(|v| e.values.contains(v)),
            LabelOp::Exists => have.contains_key(&e.key),
            LabelOp::DoesNotExist => !have.contains_key(&e.key),
        })
}

/// Levenshtein distance (for "did you mean" hints).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
