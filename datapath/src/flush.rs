//! Flushing the flow cache's pending hits into the counters before they are read.
//!
//! A flow-cache hit counts in its slot (one cache line it has already touched), not in
//! `RULE_STATS`, `EP_STATS` and `DP_STATS`; the fast path moves a slot's hits into them when
//! it overwrites the slot, and the `flush_flow_counts` program moves every slot's on one
//! CPU. Readers run that program on every CPU first, so counters read exact and never go
//! back.
//!
//! The program must run *on* the CPU whose slots it flushes and never interrupt a TC
//! program there (TC's counter updates are plain read-modify-writes): so it runs in this
//! thread, moved to each CPU in turn, not by `BPF_F_TEST_RUN_ON_CPU`, whose cross-CPU call
//! runs it in an interrupt. TC programs may interrupt it; the program is written for that
//! (see `flowcache::flush_all` in the eBPF crate).
use std::path::Path;

use aya::programs::{RawTracePoint, RawTracePointRunOptions, TestRun};

use crate::DatapathError;

/// Name of the flush program in the object, and of its pin in the layout's directory.
pub const FLUSH_PROGRAM: &str = "flush_flow_counts";

/// Tries per CPU: the thread can be moved off a CPU between pinning and running (CPU
/// hotplug, another thread changing our affinity).
const TRIES: usize = 3;

/// A handle on the pinned flush program.
pub struct FlowCountFlush {
    prog: RawTracePoint,
}

impl FlowCountFlush {
    /// Open the flush program pinned in `pin_dir` (by [`crate::Datapath::load`]).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let prog = RawTracePoint::from_pin(pin_dir.join(FLUSH_PROGRAM)).map_err(|source| {
            DatapathError::Program {
                name: FLUSH_PROGRAM,
                source,
            }
        })?;
        Ok(Self { prog })
    }

    /// Move the pending hits of every online CPU into the counters. The calling thread's CPU
    /// affinity is restored afterwards.
    pub fn run(&self) -> Result<(), DatapathError> {
        let cpus = aya::util::online_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let saved = current_affinity().map_err(DatapathError::Cpus)?;
        let result = cpus.iter().try_for_each(|&cpu| self.run_on(cpu));
        let restored = set_affinity(&saved).map_err(DatapathError::Cpus);
        result.and(restored)
    }

    fn run_on(&self, cpu: u32) -> Result<(), DatapathError> {
        let mut only = cpu_set();
        // SAFETY: `only` is a valid cpu_set_t; CPU_SET ignores numbers beyond the set's size.
        unsafe { libc::CPU_SET(cpu as usize, &mut only) };
        for _ in 0..TRIES {
            set_affinity(&only).map_err(|source| DatapathError::FlushCpu { cpu, source })?;
            let ran = self
                .prog
                .test_run(RawTracePointRunOptions::new())
                .map_err(|source| DatapathError::Program {
                    name: FLUSH_PROGRAM,
                    source,
                })?;
            if ran.return_value == cpu {
                return Ok(());
            }
        }
        Err(DatapathError::FlushCpu {
            cpu,
            source: std::io::Error::other("the flush program kept running on another CPU"),
        })
    }
}

fn cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    unsafe { std::mem::zeroed() }
}

fn current_affinity() -> std::io::Result<libc::cpu_set_t> {
    let mut set = cpu_set();
    // SAFETY: pid 0 is this thread; `set` is a valid buffer of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc == 0 {
        Ok(set)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: pid 0 is this thread; `set` is a valid cpu_set_t. The kernel moves the thread
    // before it returns when its CPU is not in the set.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
