//! The agent's hold on the datapath: which interfaces are attached, which tables are applied,
//! and the persisted copy that lets a restarted agent enforce before the controller answers.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use bulkhead_abi::model::HostTables;
use bulkhead_datapath::{ApplyReport, Datapath, Tables};
use bulkhead_wire::pb;
use prost::Message;

use crate::inventory::{self, Vm};

/// Tables as the controller sent them, with their revision and digest.
#[derive(Clone, Debug)]
pub struct Applied {
    pub revision: pb::Revision,
    pub digest: String,
    pub tables: HostTables,
}

/// What events need to name things: per epoch, slot → endpoint id and rule index → rule id.
#[derive(Default)]
pub struct Names {
    pub by_epoch: BTreeMap<u32, EpochNames>,
}

#[derive(Clone, Default)]
pub struct EpochNames {
    pub endpoints: BTreeMap<u32, String>,
    pub rules: Vec<String>,
    pub digest: String,
}

pub struct Enforcer {
    dp: Datapath,
    tables: Tables,
    state_file: PathBuf,
    current: Option<Applied>,
    bindings: HashMap<String, u32>,
    pub names: Arc<RwLock<Names>>,
    pub last_report: Option<ApplyReport>,
}

impl Enforcer {
    /// Load (or take over) the datapath and read the persisted state, if any.
    pub fn start(pin_root: &Path, state_dir: &Path, bootstrap: u8) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let mut dp = Datapath::load(pin_root)
            .with_context(|| format!("loading the datapath (pins under {})", pin_root.display()))?;
        let mut tables = dp.tables()?;
        let cfg = tables.config()?;
        tables.set_posture(bootstrap, cfg.event_rate)?;
        let state_file = state_dir.join("applied.pb");
        let current = read_state(&state_file)?;
        if let Some(a) = &current {
            tables.adopt_rule_names(a.tables.rules.clone())?;
        }
        Ok(Self {
            dp,
            tables,
            state_file,
            current,
            bindings: HashMap::new(),
            names: Arc::new(RwLock::new(Names::default())),
            last_report: None,
        })
    }

    pub fn current(&self) -> Option<&Applied> {
        self.current.as_ref()
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }

    pub fn take_events(&mut self) -> Result<bulkhead_datapath::events::EventReader> {
        Ok(bulkhead_datapath::events::EventReader::new(
            self.dp.events()?,
        ))
    }

    /// Bring attachments and bindings in line with the VMs found on the host. New interfaces
    /// get their tables before they are attached (so a VM with policy never sees the
    /// bootstrap posture); interfaces that left are detached.
    pub fn set_inventory(&mut self, vms: &[Vm]) -> Result<()> {
        let mut bindings = HashMap::new();
        for vm in vms {
            for iface in &vm.interfaces {
                if let Some(ifindex) = inventory::ifindex(&iface.device) {
                    bindings.insert(vm.endpoint_id(iface), ifindex);
                }
            }
        }
        if bindings != self.bindings {
            self.bindings = bindings;
            if let Some(a) = self.current.clone() {
                self.write_tables(&a)?;
            }
        }
        let wanted: BTreeSet<u32> = self.bindings.values().copied().collect();
        for &ifindex in &wanted {
            self.dp
                .attach(ifindex)
                .with_context(|| format!("attaching to interface {ifindex}"))?;
        }
        for ifindex in self.dp.attached_interfaces()? {
            if !wanted.contains(&ifindex) {
                self.dp
                    .detach(ifindex)
                    .with_context(|| format!("detaching from interface {ifindex}"))?;
                tracing::info!(ifindex, "detached: interface gone or no longer a VM's");
            }
        }
        Ok(())
    }

    /// Apply tables atomically, then persist them (a crash between the two re-applies the
    /// older persisted tables at start, and the controller sends these again).
    pub fn apply(&mut self, a: Applied) -> Result<ApplyReport> {
        let report = self.write_tables(&a)?;
        write_state(&self.state_file, &a)?;
        self.current = Some(a);
        Ok(report)
    }

    fn write_tables(&mut self, a: &Applied) -> Result<ApplyReport> {
        let report = self
            .tables
            .apply(&a.tables, &self.bindings)
            .with_context(|| format!("applying tables {}", short(&a.digest)))?;
        let names = EpochNames {
            endpoints: report
                .slots
                .iter()
                .map(|(id, slot)| (*slot, id.clone()))
                .collect(),
            rules: a.tables.rules.clone(),
            digest: a.digest.clone(),
        };
        if let Ok(mut n) = self.names.write() {
            n.by_epoch.insert(report.epoch, names);
            while n.by_epoch.len() > 4 {
                n.by_epoch.pop_first();
            }
        }
        self.last_report = Some(report.clone());
        Ok(report)
    }
}

pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn read_state(path: &Path) -> Result<Option<Applied>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let snap = pb::Snapshot::decode(bytes.as_slice())
        .with_context(|| format!("decoding persisted state {}", path.display()))?;
    let tables = bulkhead_wire::tables_from_pb(&snap.tables.unwrap_or_default())
        .with_context(|| format!("persisted tables in {}", path.display()))?;
    let digest = bulkhead_wire::digest(&tables);
    anyhow::ensure!(
        digest == snap.digest,
        "persisted state {} is corrupt (digest {} ≠ {})",
        path.display(),
        short(&digest),
        short(&snap.digest)
    );
    Ok(Some(Applied {
        revision: snap.revision.unwrap_or_default(),
        digest,
        tables,
    }))
}

/// Write-to-temporary, fsync, rename, fsync the directory: the file is always whole.
fn write_state(path: &Path, a: &Applied) -> Result<()> {
    let snap = pb::Snapshot {
        revision: Some(a.revision.clone()),
        digest: a.digest.clone(),
        tables: Some(bulkhead_wire::tables_to_pb(&a.tables)),
    };
    let tmp = path.with_extension("tmp");
    let ctx = || format!("persisting state to {}", path.display());
    let mut f = std::fs::File::create(&tmp).with_context(ctx)?;
    f.write_all(&snap.encode_to_vec()).with_context(ctx)?;
    f.sync_all().with_context(ctx)?;
    std::fs::rename(&tmp, path).with_context(ctx)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(ctx)?;
    }
    Ok(())
}
