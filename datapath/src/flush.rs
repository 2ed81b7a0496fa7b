//! Flushing the flow cache's pending hits into the counters before they are read.
//!
//! A flow-cache hit counts in its slot (one cache line it has already touched), not in
//! `RULE_STATS`, `EP_STATS` and `DP_STATS`; the fast path moves a slot's hits into them when
//! it overwrites the slot, and the `flush_flow_counts` program moves every slot's on one
//! CPU. Readers run that program on every CPU first, so counters read exact and never go
//! back.
//!
//! The program must run *on* the CPU whose slots it flushes, and TC test runs run on the
//! caller's CPU: one worker thread per CPU, pinned there, runs it on request. Flushing is
//! best effort: a CPU this process may not run on (a cpuset, `AllowedCPUs=` on its slice),
//! or whose worker does not answer in time (a real-time task owns the CPU), is reported
//! in [`FlushReport::unreached`] and its hits stay pending, to be counted later; what is
//! read is then a lower bound that still never goes back. A worker still busy with an
//! earlier request is not waited for again.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

use crate::DatapathError;

/// Name of the flush program in the object, and of its pin in the layout's directory.
pub const FLUSH_PROGRAM: &str = "flush_flow_counts";

/// How long one flush waits for the workers, all together.
const DEADLINE: Duration = Duration::from_millis(500);

/// What one flush reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// CPUs whose pending hits were not flushed (their counters lag until the next flush
    /// or until the fast path overwrites the slots).
    pub unreached: Vec<u32>,
    /// Why, where a worker said (a worker that did not answer in time says nothing).
    pub problems: Vec<String>,
}

struct Worker {
    cpu: u32,
    requests: SyncSender<()>,
    answers: Receiver<Result<(), String>>,
    /// A request sent and not answered yet.
    busy: bool,
}

/// The per-CPU flush workers over the pinned flush program.
pub struct FlowCountFlush {
    /// The flush program's pin.
    path: PathBuf,
    workers: Mutex<Vec<Worker>>,
    last: Mutex<FlushReport>,
}

impl FlowCountFlush {
    /// Start a worker on every online CPU, each with its own handle on the flush program
    /// pinned in `pin_dir` (by [`crate::Datapath::load`]). Workers end with this value.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let cpus = aya::util::online_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        Self::open_on(pin_dir, &cpus)
    }

    /// [`FlowCountFlush::open`] for the given CPUs: lets tests add one that cannot be
    /// reached.
    #[doc(hidden)]
    pub fn open_on(pin_dir: &Path, cpus: &[u32]) -> Result<Self, DatapathError> {
        let path = pin_dir.join(FLUSH_PROGRAM);
        let workers = cpus
            .iter()
            .map(|&cpu| start_worker(&path, cpu))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            path,
            workers: Mutex::new(workers),
            last: Mutex::new(FlushReport::default()),
        })
    }

    /// Move the pending hits of every CPU it can reach into the counters.
    pub fn run(&self) -> FlushReport {
        let mut workers = match self.workers.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut report = FlushReport::default();
        // A CPU brought online since gets its worker now.
        if let Ok(online) = aya::util::online_cpus() {
            for cpu in online {
                if workers.iter().any(|w| w.cpu == cpu) {
                    continue;
                }
                match start_worker(&self.path, cpu) {
                    Ok(w) => workers.push(w),
                    Err(e) => {
                        report.unreached.push(cpu);
                        report.problems.push(format!("CPU {cpu}: {e}"));
                    }
                }
            }
        }
        // A late answer to an earlier request: that worker is free again, and the flush it
        // reports is older than this one, so it gets a new request below.
        for w in workers.iter_mut().filter(|w| w.busy) {
            match w.answers.try_recv() {
                Ok(_) | Err(TryRecvError::Disconnected) => w.busy = false,
                Err(TryRecvError::Empty) => {}
            }
        }
        for w in workers.iter_mut().filter(|w| !w.busy) {
            w.busy = w.requests.send(()).is_ok();
            if !w.busy {
                report.unreached.push(w.cpu);
            }
        }
        let deadline = Instant::now() + DEADLINE;
        for w in workers.iter_mut() {
            if !w.busy {
                continue;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            match w.answers.recv_timeout(wait) {
                Ok(Ok(())) => w.busy = false,
                Ok(Err(problem)) => {
                    w.busy = false;
                    report.unreached.push(w.cpu);
                    report.problems.push(problem);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    w.busy = false;
                    report.unreached.push(w.cpu);
                }
                Err(RecvTimeoutError::Timeout) => report.unreached.push(w.cpu),
            }
        }
        report.unreached.sort_unstable();
        if let Ok(mut last) = self.last.lock() {
            *last = report.clone();
        }
        report
    }

    /// What the last flush reached (for metrics).
    pub fn last_report(&self) -> FlushReport {
        self.last.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Start the worker of `cpu` with its own handle on the flush program pinned at `path`.
fn start_worker(path: &Path, cpu: u32) -> Result<Worker, DatapathError> {
    let prog = SchedClassifier::from_pin(path).map_err(|source| DatapathError::Program {
        name: FLUSH_PROGRAM,
        source,
    })?;
    let (requests, inbox) = mpsc::sync_channel::<()>(1);
    let (reply, answers) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("flush-cpu{cpu}"))
        .spawn(move || worker(cpu, prog, inbox, reply))
        .map_err(|source| DatapathError::FlushWorker { cpu, source })?;
    Ok(Worker {
        cpu,
        requests,
        answers,
        busy: false,
    })
}

/// One CPU's worker: pinned to `cpu`, runs the flush program on each request and answers
/// whether it ran there.
fn worker(
    cpu: u32,
    prog: SchedClassifier,
    inbox: Receiver<()>,
    reply: SyncSender<Result<(), String>>,
) {
    // The smallest frame a TC test run takes; the program does not look at it.
    let frame = [0u8; 14];
    while inbox.recv().is_ok() {
        let answer = pin_to(cpu).and_then(|()| {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            let ran = prog.test_run(opts).map_err(|e| e.to_string())?;
            if ran.return_value == cpu {
                Ok(())
            } else {
                Err(format!("ran on CPU {} instead", ran.return_value))
            }
        });
        if reply.send(answer).is_err() {
            return;
        }
    }
}

/// Move this thread to `cpu` (a no-op when it is there already and allowed nowhere else).
fn pin_to(cpu: u32) -> Result<(), String> {
    // A mask as long as `cpu` needs, and at least a `cpu_set_t`'s 1024 bits: hosts may have
    // more CPUs than `cpu_set_t` holds.
    let cpu = cpu as usize;
    let mut mask = vec![0u64; (cpu / 64 + 1).max(16)];
    mask[cpu / 64] |= 1 << (cpu % 64);
    // SAFETY: pid 0 is this thread; `mask` is a CPU bit mask of the size passed (the
    // kernel reads it as bytes of bits, as `cpu_set_t` is). The kernel moves the thread
    // before it returns when its CPU is not in the mask.
    let rc = unsafe {
        libc::sched_setaffinity(
            0,
            std::mem::size_of_val(mask.as_slice()),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "CPU {cpu}: sched_setaffinity: {}",
            std::io::Error::last_os_error()
        ))
    }
}
