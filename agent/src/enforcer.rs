//! The agent's hold on the datapath: which interfaces are attached, which tables are applied,
//! and the persisted copy that lets a restarted agent enforce before the controller answers.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use bulkhead_datapath::{ApplyReport, Datapath, Tables};
use bulkhead_wire::pb;
use prost::Message;

use crate::inventory::{self, Vm};

/// Tables as the controller sent them, with their revision and digests (checked by the
/// agent; the ipcache's is reused by deltas that leave it alone).
#[derive(Clone, Debug)]
pub struct Applied {
    pub revision: pb::Revision,
    pub digests: bulkhead_wire::Digests,
    pub tables: bulkhead_wire::Canonical,
}

/// What events need to name things: per epoch, slot → endpoint id and rule index → rule id;
/// from the inventory, interface → VM and address → VM (for alerts).
#[derive(Default)]
pub struct Names {
    pub by_epoch: BTreeMap<u32, EpochNames>,
    /// This host's name as the kernel knows it (the controller names hosts by certificate).
    pub host: String,
    pub ifindex_vm: HashMap<u32, String>,
    pub ip_vm: HashMap<std::net::IpAddr, String>,
}

/// Enforcement state of one VM interface, as last seen by `set_inventory`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAttach {
    pub vm: String,
    pub device: String,
    pub endpoint: String,
    pub ifindex: Option<u32>,
    /// Both programs attached (pinned links in place).
    pub attached: bool,
    pub error: Option<String>,
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
    bootstrap: u8,
    interfaces: Vec<InterfaceAttach>,
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
            tables.adopt_rule_names(a.tables.rules.to_vec())?;
        }
        Ok(Self {
            dp,
            tables,
            state_file,
            current,
            bindings: HashMap::new(),
            names: Arc::new(RwLock::new(Names {
                host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default(),
                ..Names::default()
            })),
            last_report: None,
            bootstrap,
            interfaces: Vec::new(),
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
    /// bootstrap posture); interfaces that left are detached. An interface that cannot be
    /// attached does not stop the others; it is reported (`interfaces`) and the first such
    /// error is returned.
    pub fn set_inventory(&mut self, vms: &[Vm]) -> Result<()> {
        let mut bindings = HashMap::new();
        let mut ifaces = Vec::new();
        let mut addresses: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
        for vm in vms {
            addresses.entry(vm.name.clone()).or_default().extend(
                vm.interfaces
                    .iter()
                    .flat_map(|i| i.addresses.iter().copied()),
            );
            for iface in &vm.interfaces {
                let endpoint = vm.endpoint_id(iface);
                let ifindex = inventory::ifindex(&iface.device);
                if let Some(ifindex) = ifindex {
                    bindings.insert(endpoint.clone(), ifindex);
                }
                ifaces.push(InterfaceAttach {
                    vm: vm.name.clone(),
                    device: iface.device.clone(),
                    endpoint,
                    ifindex,
                    attached: false,
                    error: ifindex
                        .is_none()
                        .then(|| format!("no interface {} on this host", iface.device)),
                });
            }
        }
        if let Ok(mut n) = self.names.write() {
            (n.ifindex_vm, n.ip_vm) = crate::flows::inventory_names(&bindings, &addresses);
        }
        if bindings != self.bindings {
            self.bindings = bindings;
            if let Some(a) = self.current.clone() {
                self.write_tables(&a)?;
            }
        }
        let wanted: BTreeSet<u32> = self.bindings.values().copied().collect();
        let mut first_error = None;
        let mut failed: HashMap<u32, String> = HashMap::new();
        for &ifindex in &wanted {
            if let Err(e) = self.dp.attach(ifindex) {
                let e = anyhow::Error::from(e).context(format!("attaching to interface {ifindex}"));
                failed.insert(ifindex, format!("{e:#}"));
                first_error.get_or_insert(e);
            }
        }
        for ifindex in self.dp.attached_interfaces()? {
            if !wanted.contains(&ifindex) {
                self.dp
                    .detach(ifindex)
                    .with_context(|| format!("detaching from interface {ifindex}"))?;
                tracing::info!(ifindex, "detached: interface gone or no longer a VM's");
            }
        }
        let pinned: BTreeSet<u32> = self.dp.attached_interfaces()?.into_iter().collect();
        for i in &mut ifaces {
            if let Some(ifindex) = i.ifindex {
                i.attached = pinned.contains(&ifindex) && !failed.contains_key(&ifindex);
                if let Some(e) = failed.get(&ifindex) {
                    i.error = Some(e.clone());
                }
            }
        }
        self.interfaces = ifaces;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Evidence for the controller: every VM interface's enforcement state, per-rule hit
    /// counters (over revisions), the bootstrap posture and this host's clock state.
    pub fn host_report(&mut self) -> Result<pb::HostReport> {
        let rules = self
            .tables
            .rule_counters()
            .context("reading the rule counters")?
            .into_iter()
            .map(|(rule, c)| pb::RuleHits {
                rule,
                packets: c.packets,
                bytes: c.bytes,
                last_hit_unix_nanos: c.last_hit_unix_nanos().unwrap_or(0) as i64,
            })
            .collect();
        let bound = self.last_report.as_ref().map(|r| &r.slots);
        let interfaces = self
            .interfaces
            .iter()
            .map(|i| pb::InterfaceState {
                vm: i.vm.clone(),
                device: i.device.clone(),
                endpoint: if bound.is_some_and(|b| b.contains_key(&i.endpoint)) {
                    i.endpoint.clone()
                } else {
                    String::new()
                },
                attached: i.attached,
                error: i.error.clone().unwrap_or_default(),
            })
            .collect();
        let c = bulkhead_audit::timesync::clock_status();
        Ok(pb::HostReport {
            rules,
            interfaces,
            conntrack_entries: self.tables.conntrack_entries() as u64,
            conntrack_capacity: u64::from(bulkhead_abi::CT_ENTRIES),
            bootstrap_posture: if self.bootstrap == bulkhead_abi::BOOTSTRAP_ALLOW {
                "allow".into()
            } else {
                "deny".into()
            },
            clock: Some(pb::ClockState {
                synced: c.synced,
                offset_us: c.offset_us,
                max_error_us: c.max_error_us,
                source: c.source,
                problem: c.problem.unwrap_or_default(),
            }),
        })
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
            .with_context(|| format!("applying tables {}", short(&a.digests.tables)))?;
        let names = EpochNames {
            endpoints: report
                .slots
                .iter()
                .map(|(id, slot)| (*slot, id.clone()))
                .collect(),
            rules: a.tables.rules.to_vec(),
            digest: a.digests.tables.clone(),
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
    let (tables, digests) = bulkhead_wire::snapshot_tables(&snap)
        .map_err(|e| anyhow::anyhow!("persisted state {} is corrupt: {e}", path.display()))?;
    Ok(Some(Applied {
        revision: snap.revision.unwrap_or_default(),
        digests,
        tables,
    }))
}

/// Write-to-temporary, fsync, rename, fsync the directory: the file is always whole.
fn write_state(path: &Path, a: &Applied) -> Result<()> {
    let snap = pb::Snapshot {
        revision: Some(a.revision.clone()),
        digest: a.digests.tables.clone(),
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
