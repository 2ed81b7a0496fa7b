//! Audit store benchmark:
//!
//! ```text
//! cargo run --release -p bulkhead-audit --example bench -- [--dir DIR] [--seconds S] [--rate R]
//!        [--verify-records N]
//! ```
//!
//! 1. max-rate ingest: producers submit batches of flow verdict records to the group-commit
//!    recorder for S seconds as fast as they can (fsync per batch, chained, signed checkpoints);
//! 2. paced ingest at R events/s (default 100 000) for S seconds: zero unaccounted loss;
//! 3. build a store of N records (default 10 000 000) and time `verify` over it.
//!
//! Every event is either stored or counted in an `events_dropped` record; the bench checks
//! `stored + accounted == offered` by re-reading the store.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bulkhead_abi as abi;
use bulkhead_audit::flow::{to_record, FlowAgg, FlowKey, StaticNames};
use bulkhead_audit::record::Event;
use bulkhead_audit::recorder::Recorder;
use bulkhead_audit::{Store, StoreConfig};

fn flow_event(i: u64, names: &StaticNames) -> Event {
    let k = FlowKey {
        kind: abi::EVENT_DENY,
        reason: abi::REASON_POLICY,
        direction: abi::DIR_INGRESS,
        proto: 6,
        family: 4,
        ifindex: 7 + (i % 16) as u32,
        slot: 1 + (i % 16) as u32,
        epoch: 3,
        rule: (i % 200) as u32,
        src: abi::v4_mapped([10, 1, (i >> 8) as u8, i as u8]),
        dst: abi::v4_mapped([10, 2, 0, 10]),
        sport: 32768 + (i % 28000) as u16,
        dport: 443,
    };
    let a = FlowAgg {
        packets: 1 + i % 7,
        bytes: 60 * (1 + i % 7),
        first_ns: i * 1000,
        last_ns: i * 1000 + 500,
        suppressed: 0,
    };
    to_record(&k, &a, names)
}

fn names() -> StaticNames {
    let mut n = StaticNames {
        host: "hv-bench-01".into(),
        boot_offset_ns: bulkhead_audit::flow::boot_offset_ns(),
        ..Default::default()
    };
    for i in 0..16u32 {
        n.ifindex_vm.insert(7 + i, format!("vm-{i:03}"));
    }
    n
}

/// Process CPU time (user + system, all threads), seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: clock_gettime fills the struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Load-independent cost: CPU time of the writer thread per record (serialise, chain, write,
/// fdatasync per 1000-record batch), and of gzip per record, on this CPU.
fn cpu_cost(dir: &Path, n: u64) {
    let _ = std::fs::remove_dir_all(dir);
    let mut cfg = StoreConfig::new(dir, "hv-bench-01");
    cfg.compress = false;
    cfg.segment_max_bytes = 1 << 40;
    let (mut s, _) = Store::open(cfg).expect("open");
    let names = names();
    let pool: Vec<Event> = (0..1000u64).map(|i| flow_event(i, &names)).collect();
    let mut cpu = 0.0;
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = pool.clone(); // outside the measured section
        let c0 = thread_cpu_seconds();
        s.append_batch(batch).expect("append");
        cpu += thread_cpu_seconds() - c0;
        done += 1000;
    }
    let wall = t.elapsed().as_secs_f64();
    s.close().expect("close");
    let seg = bulkhead_audit::store::list_segments(dir).expect("segments");
    let c0 = thread_cpu_seconds();
    let bytes = std::fs::metadata(&seg[0].path)
        .map(|m| m.len())
        .unwrap_or(0);
    bulkhead_audit::store::compress_segment(&seg[0].path).expect("gzip");
    let gz = thread_cpu_seconds() - c0;
    let c0 = thread_cpu_seconds();
    let r = bulkhead_audit::verify(dir, None).expect("verify");
    let v = thread_cpu_seconds() - c0; // verify's own threads are not counted here: see below
    let _ = v;
    println!();
    println!("| CPU cost per record (this CPU, load-independent) | µs CPU / record | records/s per core |");
    println!("|---|---:|---:|");
    let per = cpu / n as f64 * 1e6;
    println!("| append: serialise + chain + write + fdatasync per 1000 ({} records, wall {:.1} s) | {:.2} | {:.0} |", n, wall, per, 1e6 / per);
    let gper = gz / n as f64 * 1e6;
    println!(
        "| gzip of the closed segment ({:.0} MiB) | {:.2} | {:.0} |",
        bytes as f64 / 1048576.0,
        gper,
        1e6 / gper
    );
    println!(
        "| append + gzip | {:.2} | {:.0} |",
        per + gper,
        1e6 / (per + gper)
    );
    assert!(r.ok());
    let _ = std::fs::remove_dir_all(dir);
}

struct Counts {
    cpu: f64,
    offered: u64,
    stored: u64,
    accounted: u64,
    elapsed: Duration,
    batches: u64,
    bytes: u64,
}

fn count_store(dir: &Path) -> (u64, u64) {
    let mut stored = 0u64;
    let mut accounted = 0u64;
    bulkhead_audit::export::for_each_record(dir, 0, |r, _| {
        match &r.detail {
            Event::FlowVerdict(_) => stored += 1,
            Event::EventsDropped { count, .. } => accounted += count,
            _ => {}
        }
        Ok(true)
    })
    .expect("read store");
    (stored, accounted)
}

fn dir_bytes(dir: &Path) -> u64 {
    bulkhead_audit::store::list_segments(dir)
        .map(|v| {
            v.iter()
                .filter_map(|s| std::fs::metadata(&s.path).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `rate = None`: as fast as possible.
fn ingest(dir: &Path, seconds: f64, rate: Option<u64>, batch: usize) -> Counts {
    let _ = std::fs::remove_dir_all(dir);
    let (store, _) = Store::open(StoreConfig::new(dir, "hv-bench-01")).expect("open");
    let rec = Recorder::spawn(store, 64, 20_000);
    let n = names();
    // Pre-build a pool of records (the agent's aggregation/naming cost is not the store's).
    let pool: Vec<Event> = (0..batch as u64 * 4).map(|i| flow_event(i, &n)).collect();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut offered = 0u64;
    let mut k = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        if let Some(r) = rate {
            let due = (start.elapsed().as_secs_f64() * r as f64) as u64;
            if offered >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        let b: Vec<Event> = pool[k * batch..(k + 1) * batch].to_vec();
        k = (k + 1) % 4;
        offered += b.len() as u64;
        let _ = rec.submit_batch(b);
    }
    let batches = rec.stats().batches.load(Ordering::Relaxed);
    rec.shutdown().expect("shutdown");
    let elapsed = start.elapsed();
    let (stored, accounted) = count_store(dir);
    Counts {
        cpu: cpu_seconds() - cpu0,
        offered,
        stored,
        accounted,
        elapsed,
        batches,
        bytes: dir_bytes(dir),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let base = PathBuf::from(arg("--dir").unwrap_or_else(|| "/tmp/bulkhead-audit-bench".into()));
    let seconds: f64 = arg("--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let rate: u64 = arg("--rate")
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let verify_n: u64 = arg("--verify-records")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    std::fs::create_dir_all(&base).expect("bench dir");
    let sample = serde_json::to_vec(&flow_event(1, &names()))
        .map(|v| v.len())
        .unwrap_or(0);
    println!(
        "flow record detail ≈ {sample} bytes JSON (stored line ≈ {} bytes)",
        sample + 260
    );
    println!();
    if args.iter().any(|a| a == "--cpu-only") {
        cpu_cost(&base.join("cpu"), 1_000_000);
        return;
    }
    println!("| scenario | offered | stored | dropped (accounted) | unaccounted | seconds | stored/s | fsync batches | on disk | process CPU s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, r) in [("max rate", None), ("paced", Some(rate))] {
        let dir = base.join(name.replace(' ', "-"));
        let c = ingest(&dir, seconds, r, 1000);
        let unaccounted = c.offered as i64 - (c.stored + c.accounted) as i64;
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.0} | {} | {:.0} MiB | {:.1} |",
            match r {
                None => "max rate".to_string(),
                Some(r) => format!("paced {r}/s"),
            },
            c.offered,
            c.stored,
            c.accounted,
            unaccounted,
            c.elapsed.as_secs_f64(),
            c.stored as f64 / c.elapsed.as_secs_f64(),
            c.batches,
            c.bytes as f64 / 1048576.0,
            c.cpu
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    cpu_cost(&base.join("cpu"), 1_000_000);

    if verify_n > 0 {
        let dir = base.join("verify");
        let _ = std::fs::remove_dir_all(&dir);
        let (mut s, _) = Store::open(StoreConfig::new(&dir, "hv-bench-01")).expect("open");
        let n = names();
        let pool: Vec<Event> = (0..10_000u64).map(|i| flow_event(i, &n)).collect();
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        let mut done = 1u64;
        while done < verify_n {
            let k = (verify_n - done).min(10_000) as usize;
            s.append_batch(pool[..k].iter().cloned()).expect("append");
            done += k as u64;
        }
        s.close().expect("close");
        let build = t.elapsed();
        let build_cpu = cpu_seconds() - cpu0;
        let bytes = dir_bytes(&dir);
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        let r = bulkhead_audit::verify(&dir, None).expect("verify");
        let v = t.elapsed();
        let verify_cpu = cpu_seconds() - cpu0;
        println!();
        println!("| verify | records | segments | on disk (gzip) | build (append) wall / CPU | verify wall / CPU | verified records/s (wall) | result |");
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        println!(
            "| {} records | {} | {} | {:.0} MiB | {:.1} s / {:.1} s | {:.1} s / {:.1} s | {:.0} | {} |",
            verify_n,
            r.records,
            r.segments,
            bytes as f64 / 1048576.0,
            build.as_secs_f64(),
            build_cpu,
            v.as_secs_f64(),
            verify_cpu,
            r.records as f64 / v.as_secs_f64(),
            if r.ok() { "OK" } else { "PROBLEMS" }
        );
        if !args.iter().any(|a| a == "--keep") {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
