//! Loads, pins, attaches and programs the Bulkhead eBPF datapath.
//!
//! - [`Datapath::load`] verifies both programs and pins every map under
//!   `pin_root/v{LAYOUT_VERSION}` (reused by the next loader of the same layout);
//! - [`Datapath::attach`] puts them on a VM interface with pinned TCX links, swapping the
//!   program of an existing link in place (no unenforced instant across restarts);
//! - [`Tables::apply`] writes compiled tables into the inactive generation and flips to it.
use std::path::{Path, PathBuf};
use std::time::Duration;

mod attach;
pub mod events;
mod flush;
mod tables;

pub use attach::AttachOutcome;
pub use flush::{FlowCountFlush, FlushReport, FLUSH_PROGRAM};
pub use tables::{counter_stamp_unix_nanos, ApplyReport, Occupancy, RuleCounters, Tables, GRACE};

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use bulkhead_abi::*;

/// The compiled eBPF object (both TC programs and every map).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("compiled tables rejected, nothing applied: {0}")]
    BadTables(String),
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("starting the flow-cache flush worker of CPU {cpu}: {source}")]
    FlushWorker { cpu: u32, source: std::io::Error },
}

/// The loaded datapath: programs verified by this kernel, maps pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pin_root: PathBuf,
    pin_dir: PathBuf,
}

/// Which TC program: `from_vm` judges what a VM sends, `to_vm` what it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    FromVm,
    ToVm,
    /// A program that passes everything, for benchmark baselines; never attached.
    BenchBaseline,
}

impl Hook {
    pub fn program_name(self) -> &'static str {
        match self {
            Hook::FromVm => "from_vm",
            Hook::ToVm => "to_vm",
            Hook::BenchBaseline => "bench_baseline",
        }
    }
}

/// Result of running a program on one crafted packet.
#[derive(Debug)]
pub struct TestRunOutcome {
    /// The TC action returned (as the kernel reports it).
    pub action: i32,
    pub packet_out: Vec<u8>,
    pub duration: Duration,
}

impl Datapath {
    /// Load the programs with every map pinned under `pin_root/v{LAYOUT_VERSION}` (existing
    /// pins of the same layout are reused: enforcement state survives the loader).
    pub fn load(pin_root: &Path) -> Result<Self, DatapathError> {
        Self::load_layout(pin_root, LAYOUT_VERSION)
    }

    /// Load as if this object had layout `version`: lets tests stand in for a loader of an
    /// older layout. Production code calls [`Datapath::load`].
    #[doc(hidden)]
    pub fn load_layout(pin_root: &Path, version: u32) -> Result<Self, DatapathError> {
        let pin_dir = pin_root.join(format!("v{version}"));
        std::fs::create_dir_all(&pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)?;
        for hook in [Hook::FromVm, Hook::ToVm, Hook::BenchBaseline] {
            let name = hook.program_name();
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingMap(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        load_flush_program(&mut ebpf, &pin_dir)?;
        Ok(Self {
            ebpf,
            pin_root: pin_root.to_path_buf(),
            pin_dir,
        })
    }

    /// Attach both programs to `ifindex` (a VM's tap on the host). Where a pinned link of
    /// an earlier loader exists, its program is replaced atomically; otherwise a new link is
    /// created first in the TCX chain and pinned, so it outlives this process.
    pub fn attach(&mut self, ifindex: u32) -> Result<[AttachOutcome; 2], DatapathError> {
        let mut out = [AttachOutcome::Created; 2];
        let pin_root = self.pin_root.clone();
        for (i, hook) in [Hook::FromVm, Hook::ToVm].into_iter().enumerate() {
            let prog = self.program_mut(hook)?;
            out[i] = attach::attach_hook(prog, &pin_root, ifindex, hook)?;
        }
        Ok(out)
    }

    /// Detach both programs from `ifindex` (the VM left the host). Idempotent.
    pub fn detach(&self, ifindex: u32) -> Result<(), DatapathError> {
        attach::detach(&self.pin_root, ifindex)
    }

    /// Attach the pass-everything program at both hooks of `ifindex`, unpinned: the
    /// benchmarks' measure of what TCX itself costs, apart from the policy programs. The
    /// links live until [`Datapath::detach_bench_baseline`] or the end of this process.
    #[doc(hidden)]
    pub fn attach_bench_baseline(
        &mut self,
        ifindex: u32,
    ) -> Result<Vec<aya::programs::tc::SchedClassifierLinkId>, DatapathError> {
        let prog = self.program_mut(Hook::BenchBaseline)?;
        attach::attach_unpinned(prog, ifindex)
    }

    #[doc(hidden)]
    pub fn detach_bench_baseline(
        &mut self,
        links: Vec<aya::programs::tc::SchedClassifierLinkId>,
    ) -> Result<(), DatapathError> {
        let prog = self.program_mut(Hook::BenchBaseline)?;
        for id in links {
            prog.detach(id).map_err(|source| DatapathError::Program {
                name: Hook::BenchBaseline.program_name(),
                source,
            })?;
        }
        Ok(())
    }

    /// The loaded program of one hook.
    fn hook_program(&self, hook: Hook) -> Result<&SchedClassifier, DatapathError> {
        let name = hook.program_name();
        self.ebpf
            .program(name)
            .ok_or(DatapathError::MissingMap(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// What the kernel measured for one hook's program since it was loaded: total run time
    /// and number of runs, over every interface it is attached to. Counted only while run-time
    /// statistics are on (`kernel.bpf_stats_enabled`, or a `BPF_ENABLE_STATS` fd held):
    /// the per-packet cost in the real path, for benchmarks and diagnosis.
    #[doc(hidden)]
    pub fn run_stats(&self, hook: Hook) -> Result<(Duration, u64), DatapathError> {
        let name = hook.program_name();
        let info = self
            .hook_program(hook)?
            .info()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Interfaces that have pinned links (from any loader, this run or earlier).
    pub fn attached_interfaces(&self) -> Result<Vec<u32>, DatapathError> {
        attach::pinned_interfaces(&self.pin_root)
    }

    /// Remove the pinned maps of other layout versions. Call after every interface runs this
    /// loader's programs: maps still used by a program stay alive until it is replaced.
    pub fn prune_other_layouts(&self) -> Result<Vec<PathBuf>, DatapathError> {
        let mine = self
            .pin_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.pin_root) else {
            return Ok(removed);
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let versioned = name.len() > 1
                && name.starts_with('v')
                && name[1..].chars().all(|c| c.is_ascii_digit());
            if versioned && name != mine {
                std::fs::remove_dir_all(e.path()).map_err(|source| DatapathError::PinDir {
                    path: e.path(),
                    source,
                })?;
                removed.push(e.path());
            }
        }
        Ok(removed)
    }

    fn program_mut(&mut self, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
        let name = hook.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingMap(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Run one hook's program on a crafted Ethernet frame, as if seen on `ifindex` with
    /// `skb->mark = mark`.
    pub fn test_run(
        &self,
        hook: Hook,
        frame: &[u8],
        ifindex: u32,
        mark: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let name = hook.program_name();
        let prog = self.hook_program(hook)?;
        // struct __sk_buff up to `ifindex`: the fields BPF_PROG_TEST_RUN lets us set.
        let mut ctx = [0u8; 44];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat.max(1);
        let r = prog
            .test_run(opts)
            .map_err(|source| DatapathError::Program { name, source })?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutcome {
            action: r.return_value as i32,
            packet_out: out,
            duration: r.duration,
        })
    }

    fn take<T>(&mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        T::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    /// Typed handles on the maps (taken out of the loader; call once).
    pub fn maps(&mut self) -> Result<Maps, DatapathError> {
        Ok(Maps {
            config: self.take("CONFIG")?,
            endpoints: self.take("ENDPOINTS")?,
            ep_addrs: self.take("EP_ADDRS")?,
            ipcache: self.take("IPCACHE")?,
            policy: self.take("POLICY")?,
            port_class: self.take("PORT_CLASS")?,
            dp_stats: self.take("DP_STATS")?,
            rule_stats: self.take("RULE_STATS")?,
            ep_stats: self.take("EP_STATS")?,
            conntrack: self.take("CONNTRACK")?,
            flow_flush: FlowCountFlush::open(&self.pin_dir)?,
        })
    }

    /// The table writer over this datapath's maps (takes the maps; call once).
    pub fn tables(&mut self) -> Result<Tables, DatapathError> {
        Tables::new(self.maps()?)
    }

    /// The flow-event ring buffer (take once; see [`events`]).
    pub fn events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        self.take("EVENTS")
    }
}

/// Load the flush program and pin it in the layout's directory, replacing an earlier
/// loader's, for [`FlowCountFlush::open`].
fn load_flush_program(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), DatapathError> {
    let name = FLUSH_PROGRAM;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingMap(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    prog.load()
        .map_err(|source| DatapathError::Program { name, source })?;
    let path = pin_dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(DatapathError::PinDir { path, source }),
    }
    prog.pin(&path)
        .map_err(|source| DatapathError::Pin { path, source })
}

/// Typed map handles.
pub struct Maps {
    pub config: Array<MapData, Config>,
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub ep_addrs: HashMap<MapData, EndpointAddrKey, u8>,
    pub ipcache: LpmTrie<MapData, IpcacheKey, u32>,
    pub policy: HashMap<MapData, PolicyKey, Verdict>,
    pub port_class: Array<MapData, u32>,
    pub dp_stats: PerCpuArray<MapData, u64>,
    pub rule_stats: PerCpuArray<MapData, RuleStats>,
    pub ep_stats: PerCpuArray<MapData, EndpointStats>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// Run before reading counters (the readers here do).
    pub flow_flush: FlowCountFlush,
}

impl Maps {
    /// Sum of one datapath counter over all CPUs. The established path counts its packets
    /// in one counter only: `STAT_CT_FAST` includes the flow cache's (`STAT_FLOW_CACHE`), and
    /// `STAT_PACKETS` and `STAT_CT_HIT` include both.
    /// Flushes the flow cache's pending hits first (see [`FlowCountFlush`]).
    pub fn stat(&self, index: u32) -> Result<u64, DatapathError> {
        self.flow_flush.run();
        self.flushed_stat(index)
    }

    /// Every datapath counter (`STAT_COUNT`, indexed by `STAT_*`) as [`Maps::stat`] reads
    /// it, after one flush: for readers that take them all at once.
    pub fn stats(&self) -> Result<Vec<u64>, DatapathError> {
        self.flow_flush.run();
        (0..STAT_COUNT).map(|i| self.flushed_stat(i)).collect()
    }

    fn flushed_stat(&self, index: u32) -> Result<u64, DatapathError> {
        let raw = self.raw_stat(index)?;
        match index {
            STAT_PACKETS | STAT_CT_HIT => {
                Ok(raw + self.raw_stat(STAT_CT_FAST)? + self.raw_stat(STAT_FLOW_CACHE)?)
            }
            STAT_CT_FAST => Ok(raw + self.raw_stat(STAT_FLOW_CACHE)?),
            _ => Ok(raw),
        }
    }

    fn raw_stat(&self, index: u32) -> Result<u64, DatapathError> {
        let v = self
            .dp_stats
            .get(&index, 0)
            .map_err(|source| DatapathError::Map {
                name: "DP_STATS",
                source,
            })?;
        Ok(v.iter().sum())
    }
}
