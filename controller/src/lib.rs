//! The Bulkhead controller: follows the policy repository, compiles every commit against the
//! inventory the agents report, and serves each host its own tables.
//!
//! Invariants: an invalid commit is rejected whole and the last good one keeps being served;
//! a host receives only its own tables (its identity is its certificate); every revision a
//! host acknowledges is recorded with the time it began enforcing it.
pub mod audit;
pub mod compile;
pub mod evidence;
pub mod metrics;
pub mod repo;
pub mod server;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead_abi::model::HostTables;
use bulkhead_wire::pb;
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;
use crate::repo::Repo;

/// A VM as reported by the agent of `host`.
#[derive(Clone, Debug, PartialEq)]
pub struct InventoryVm {
    pub host: String,
    pub vm: pb::Vm,
}

/// The policy compiler: the exported tree of a commit and the inventory in, tables per host
/// out, or every error found (an invalid commit is never partly applied).
pub type CompileFn = Arc<
    dyn Fn(&Path, &[InventoryVm]) -> Result<BTreeMap<String, HostTables>, Vec<String>>
        + Send
        + Sync,
>;

/// One host's compiled tables.
#[derive(Clone, Debug)]
pub struct HostTablesRev {
    /// `digests.tables` names these tables; the shared parts' digests come with it.
    pub digests: bulkhead_wire::Digests,
    pub tables: Arc<bulkhead_wire::Canonical>,
}

/// The output being served.
pub struct Compiled {
    pub revision: pb::Revision,
    pub hosts: BTreeMap<String, HostTablesRev>,
    /// Inventory version of each host that this compile included.
    pub inventory_versions: BTreeMap<String, u64>,
    /// When the commit was first seen (for commit-to-enforced latency).
    pub detected_at: Instant,
}

#[derive(Default)]
pub struct HostState {
    pub connected: bool,
    pub connected_since: i64,
    pub session: u64,
    pub enforced_digest: String,
    pub enforced_commit: String,
    pub enforced_since: i64,
    pub last_error: String,
    pub unbound: Vec<String>,
    pub vms: Vec<pb::Vm>,
    pub inventory_version: u64,
    pub inventory_at: Option<Instant>,
    /// Tables this host may hold, by digest (recent ones): the base for deltas.
    pub known: VecDeque<HostTablesRev>,
    /// The agent's last compliance evidence (rule counters, interfaces, clock) and when.
    pub report: Option<(i64, pb::HostReport)>,
}

pub struct State {
    pub serving: Option<Arc<Compiled>>,
    /// The last good commit and its exported tree.
    good: Option<(pb::Revision, tempfile::TempDir, Instant)>,
    pub rejected: VecDeque<pb::RejectedCommit>,
    pub last_compile_error: Vec<String>,
    pub hosts: BTreeMap<String, HostState>,
    /// Commits already judged (so a rejected commit is not compiled again and again).
    seen_commit: String,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

const KNOWN_PER_HOST: usize = 4;

const REJECTED_KEPT: usize = 50;

/// Name each host's tables by their digest, before the state lock is taken. Hosts sharing
/// an ipcache (the compiler gives hosts with the same peers one copy) have it hashed once.
fn with_digests(
    hosts: BTreeMap<String, HostTables>,
    held: &bulkhead_wire::HeldParts,
) -> BTreeMap<String, HostTablesRev> {
    let (names, tables): (Vec<String>, Vec<HostTables>) = hosts.into_iter().unzip();
    names
        .into_iter()
        .zip(bulkhead_wire::digests_of_many(tables, held))
        .map(|(h, (t, d))| {
            (
                h,
                HostTablesRev {
                    digests: d,
                    tables: Arc::new(t),
                },
            )
        })
        .collect()
}

pub struct Controller {
    pub repo: Repo,
    compile: CompileFn,
    state: Mutex<State>,
    /// Bumped whenever `serving` changes; sessions wake on it.
    pub serving_tx: watch::Sender<u64>,
    inventory_changed: Notify,
    pub metrics: Metrics,
    pub audit: Option<audit::Audit>,
    /// Where the compliance evidence comes from (set once at start; defaults otherwise).
    pub evidence_config: std::sync::OnceLock<evidence::EvidenceConfig>,
}

impl Controller {
    pub fn new(
        repo: Repo,
        compile: CompileFn,
        audit: Option<audit::Audit>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            repo,
            compile,
            state: Mutex::new(State {
                serving: None,
                good: None,
                rejected: VecDeque::new(),
                last_compile_error: Vec::new(),
                hosts: BTreeMap::new(),
                seen_commit: String::new(),
            }),
            serving_tx: watch::channel(0).0,
            inventory_changed: Notify::new(),
            metrics: Metrics::new()?,
            audit,
            evidence_config: std::sync::OnceLock::new(),
        }))
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follow the repository: compile each new commit; every `poll`.
    pub async fn follow_repo(self: Arc<Self>, poll: Duration) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            let r = tokio::task::spawn_blocking(move || me.check_repo()).await;
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "reading the policy repository");
            }
        }
    }

    fn check_repo(&self) -> anyhow::Result<()> {
        let head = self.repo.head()?;
        if self.state().seen_commit == head {
            return Ok(());
        }
        let detected = Instant::now();
        let revision = self.repo.revision(&head)?;
        let dir = tempfile::tempdir()?;
        self.repo.export(&head, dir.path())?;
        // Rules whose text changed since the last good commit (for the revision's audit record).
        let changed = match &self.audit {
            Some(_) => {
                let before = self
                    .good_tree()
                    .map(|(_, t)| compile::rule_texts(&t))
                    .unwrap_or_default();
                compile::changed_rules(&before, &compile::rule_texts(dir.path()))
            }
            None => Vec::new(),
        };
        tracing::info!(commit = %head, author = %revision.author, summary = %revision.summary, "new commit");
        let inventory = self.inventory();
        let started = Instant::now();
        let result = (self.compile)(dir.path(), &inventory.0);
        self.metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        let held = self.held_parts();
        let result = result.map(|hosts| with_digests(hosts, &held));
        let mut st = self.state();
        st.seen_commit = head.clone();
        match result {
            Ok(hosts) => {
                let rule_ids =
                    |h: &BTreeMap<String, HostTablesRev>| -> std::collections::BTreeSet<String> {
                        h.values()
                            .flat_map(|t| t.tables.rules.iter().skip(1).cloned())
                            .collect()
                    };
                let before = st
                    .serving
                    .as_ref()
                    .map(|s| rule_ids(&s.hosts))
                    .unwrap_or_default();
                st.good = Some((revision.clone(), dir, detected));
                st.last_compile_error.clear();
                self.serve(&mut st, revision.clone(), hosts, inventory.1, detected);
                if let (Some(a), Some(s)) = (&self.audit, &st.serving) {
                    let after = rule_ids(&s.hosts);
                    a.revision_changes(
                        &revision,
                        after.difference(&before).cloned().collect(),
                        before.difference(&after).cloned().collect(),
                        changed,
                        Ok(()),
                    );
                }
            }
            Err(errors) => {
                if let Some(a) = &self.audit {
                    a.revision(&revision, Vec::new(), Vec::new(), Err(errors.join("\n")));
                }
                self.metrics.rejected_commits.inc();
                for e in &errors {
                    tracing::error!(commit = %head, error = %e, "commit rejected");
                }
                st.rejected.push_front(pb::RejectedCommit {
                    revision: Some(revision),
                    errors,
                    at_unix: unix_now(),
                });
                st.rejected.truncate(REJECTED_KEPT);
            }
        }
        Ok(())
    }

    /// The exported tree of the commit being served (for the compliance analysis).
    pub fn good_tree(&self) -> Option<(pb::Revision, std::path::PathBuf)> {
        let st = self.state();
        st.good
            .as_ref()
            .map(|(rev, dir, _)| (rev.clone(), dir.path().to_path_buf()))
    }

    /// All VMs reported by all hosts (where each was reported last).
    pub fn inventory_vms(&self) -> Vec<InventoryVm> {
        self.inventory().0
    }

    /// Recompile the last good commit whenever an agent's inventory changes (coalesced).
    pub async fn follow_inventory(self: Arc<Self>) {
        loop {
            self.inventory_changed.notified().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.recompile_for_inventory()).await;
        }
    }

    fn recompile_for_inventory(&self) {
        let inventory = self.inventory();
        let (revision, dir, detected) = {
            let st = self.state();
            let Some((rev, dir, detected)) = &st.good else {
                return;
            };
            (rev.clone(), dir.path().to_path_buf(), *detected)
        };
        let started = Instant::now();
        let result = (self.compile)(&dir, &inventory.0);
        self.metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        let held = self.held_parts();
        let result = result.map(|hosts| with_digests(hosts, &held));
        let mut st = self.state();
        match result {
            Ok(hosts) => {
                st.last_compile_error.clear();
                self.serve(&mut st, revision, hosts, inventory.1, detected);
            }
            Err(errors) => {
                tracing::error!(
                    ?errors,
                    "the inventory no longer compiles; serving the previous output"
                );
                st.last_compile_error = errors;
            }
        }
    }

    /// The shared parts (ipcaches, rule lists) being served: a new compile's equal ones take
    /// these (one copy across revisions; deltas between them see them unchanged by pointer).
    fn held_parts(&self) -> bulkhead_wire::HeldParts {
        let st = self.state();
        let mut held = bulkhead_wire::HeldParts::default();
        for t in st.serving.iter().flat_map(|s| s.hosts.values()) {
            held.hold(&t.tables, &t.digests);
        }
        held
    }

    /// All VMs reported by all hosts; a VM reported by two hosts (live migration in
    /// progress) counts where it was reported last.
    fn inventory(&self) -> (Vec<InventoryVm>, BTreeMap<String, u64>) {
        let st = self.state();
        let mut latest: BTreeMap<String, (Instant, InventoryVm)> = BTreeMap::new();
        let mut versions = BTreeMap::new();
        for (host, h) in &st.hosts {
            versions.insert(host.clone(), h.inventory_version);
            let at = h.inventory_at.unwrap_or_else(Instant::now);
            for vm in &h.vms {
                let newer = latest.get(&vm.name).is_none_or(|(t, _)| *t <= at);
                if newer {
                    latest.insert(
                        vm.name.clone(),
                        (
                            at,
                            InventoryVm {
                                host: host.clone(),
                                vm: vm.clone(),
                            },
                        ),
                    );
                }
            }
        }
        (latest.into_values().map(|(_, v)| v).collect(), versions)
    }

    fn serve(
        &self,
        st: &mut State,
        revision: pb::Revision,
        hosts: BTreeMap<String, HostTablesRev>,
        inventory_versions: BTreeMap<String, u64>,
        detected_at: Instant,
    ) {
        for (host, t) in &hosts {
            let h = st.hosts.entry(host.clone()).or_default();
            if !h.known.iter().any(|k| k.digests.tables == t.digests.tables) {
                h.known.push_front(t.clone());
                h.known.truncate(KNOWN_PER_HOST);
            }
        }
        self.metrics
            .serving_commit_time
            .set(revision.commit_time_unix);
        st.serving = Some(Arc::new(Compiled {
            revision,
            hosts,
            inventory_versions,
            detected_at,
        }));
        self.serving_tx.send_modify(|v| *v += 1);
    }

    /// An agent reported its VMs.
    pub fn set_inventory(&self, host: &str, vms: Vec<pb::Vm>) {
        {
            let mut st = self.state();
            let h = st.hosts.entry(host.to_string()).or_default();
            h.vms = vms;
            h.inventory_version += 1;
            h.inventory_at = Some(Instant::now());
        }
        self.inventory_changed.notify_one();
    }

    /// What `host` should enforce, once the serving output includes its current inventory.
    pub fn desired(&self, host: &str) -> Option<(pb::Revision, HostTablesRev, Instant)> {
        let st = self.state();
        let serving = st.serving.as_ref()?;
        let version = st.hosts.get(host).map_or(0, |h| h.inventory_version);
        if serving.inventory_versions.get(host).copied().unwrap_or(0) < version {
            return None;
        }
        let t = serving.hosts.get(host).cloned().unwrap_or_else(|| {
            let tables = Arc::<bulkhead_wire::Canonical>::default();
            HostTablesRev {
                digests: tables.digests(),
                tables,
            }
        });
        Some((serving.revision.clone(), t, serving.detected_at))
    }

    /// Tables of `host` with this digest, if the controller still has them.
    pub fn known(&self, host: &str, digest: &str) -> Option<Arc<bulkhead_wire::Canonical>> {
        let st = self.state();
        st.hosts
            .get(host)?
            .known
            .iter()
            .find(|k| k.digests.tables == digest)
            .map(|k| k.tables.clone())
    }

    pub fn status(&self) -> pb::StatusReply {
        let st = self.state();
        let desired: BTreeMap<&str, &str> = st
            .serving
            .as_ref()
            .map(|s| {
                s.hosts
                    .iter()
                    .map(|(h, t)| (h.as_str(), t.digests.tables.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        pb::StatusReply {
            serving: st.serving.as_ref().map(|s| s.revision.clone()),
            rejected: st.rejected.iter().cloned().collect(),
            hosts: st
                .hosts
                .iter()
                .map(|(name, h)| pb::HostStatus {
                    host: name.clone(),
                    connected: h.connected,
                    connected_since_unix: h.connected_since,
                    enforced_digest: h.enforced_digest.clone(),
                    enforced_commit: h.enforced_commit.clone(),
                    enforced_since_unix: h.enforced_since,
                    desired_digest: desired.get(name.as_str()).unwrap_or(&"").to_string(),
                    vms: h.vms.iter().map(|v| v.name.clone()).collect(),
                    last_error: h.last_error.clone(),
                    unbound: h.unbound.clone(),
                })
                .collect(),
        }
    }
}
