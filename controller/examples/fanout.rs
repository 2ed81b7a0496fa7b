//! Commit-to-enforced latency at scale: the real controller (library, real policy compiler,
//! real git repository, gRPC over mutual TLS) and N simulated agents — in-process gRPC clients
//! with their own host certificates that report an inventory, apply what they receive (the
//! delta checks included) and acknowledge.
//!
//! `cargo run --release -p bulkhead-controller --example fanout -- 100 1000`
//! prints a Markdown table for BENCHMARKS.md.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_controller::repo::Repo;
use bulkhead_controller::server::{AdminService, EnforcementService};
use bulkhead_controller::Controller;
use bulkhead_wire::pb;
use bulkhead_wire::pki::{self, Subject};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

const VMS_PER_HOST: usize = 10;

/// CPU time the simulated agents spent applying and verifying what they received (snapshot
/// conversion, delta application, digest check; not the protobuf decoding inside tonic), in
/// nanoseconds: on real hosts this runs on each host's own CPU, here on the controller's.
static AGENT_APPLY_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn thread_cpu_nanos() -> u64 {
    // SAFETY: clock_gettime fills a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn git(dir: &Path, args: &[&str]) {
    let ok = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.org")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.org")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "git {args:?}");
}

fn policy(port: u16) -> String {
    format!(
        "settings:\n  tiers: [application]\n  default_action: deny\n\
         groups:\n  - name: app\n    members: [{{labels: {{role: app}}}}]\n  - name: db\n    members: [{{labels: {{role: db}}}}]\n\
         services:\n  - name: svc\n    ports: [{{protocol: tcp, ports: {port}}}]\n\
         policies:\n  - name: db\n    tier: application\n    priority: 10\n    applies_to: [{{group: db}}]\n    ingress:\n      - id: app-to-db\n        action: allow\n        peers: [{{group: app}}]\n        services: [svc]\n"
    )
}

fn inventory(host: usize) -> pb::Inventory {
    pb::Inventory {
        vms: (0..VMS_PER_HOST)
            .map(|v| {
                let n = host * VMS_PER_HOST + v;
                pb::Vm {
                    name: format!("vm-{n}"),
                    uuid: format!("uuid-{n}"),
                    labels: [(
                        "role".to_string(),
                        if v % 2 == 0 { "app" } else { "db" }.to_string(),
                    )]
                    .into(),
                    interfaces: vec![pb::Interface {
                        device: format!("vnet{v}"),
                        mac: vec![0x52, 0x54, (n >> 16) as u8, (n >> 8) as u8, n as u8, 1],
                        addresses: vec![format!(
                            "10.{}.{}.{}",
                            (n >> 16) & 0xff,
                            (n >> 8) & 0xff,
                            n & 0xff
                        )],
                    }],
                }
            })
            .collect(),
    }
}

/// One simulated agent: hello, inventory, then apply and ack forever; reports each digest.
async fn agent(
    port: u16,
    ca: String,
    cert: pki::Pem,
    host: usize,
    acked: mpsc::UnboundedSender<(usize, String, Instant)>,
) {
    let ch = loop {
        match bulkhead_wire::connect(
            &format!("https://127.0.0.1:{port}"),
            "localhost",
            &ca,
            &cert.cert,
            &cert.key,
        )
        .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut client =
        pb::enforcement_client::EnforcementClient::new(ch).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(8);
    let _ = tx
        .send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello::default())),
        })
        .await;
    let _ = tx
        .send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Inventory(inventory(host))),
        })
        .await;
    let Ok(resp) = client.sync(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut inbound = resp.into_inner();
    let mut held = bulkhead_wire::Canonical::default();
    let mut held_digests = bulkhead_wire::digests(&held);
    while let Ok(Some(msg)) = inbound.message().await {
        let started = thread_cpu_nanos();
        let applied = match msg.kind {
            // As the real agent does: a snapshot's tables are checked against its digest; a
            // delta's base is named by the digests it acknowledged, and the result is checked
            // against the delta's digest (an untouched ipcache is not hashed again).
            Some(pb::controller_message::Kind::Snapshot(s)) => {
                bulkhead_wire::snapshot_tables(&s).map_err(|_| s.digest)
            }
            Some(pb::controller_message::Kind::Delta(d)) => {
                bulkhead_wire::apply_delta_to(&held, &held_digests, &d).map_err(|_| d.digest)
            }
            None => continue,
        };
        let (tables, digests) = match applied {
            Ok(a) => a,
            // As the real agent does: keep what it has, ask for a snapshot.
            Err(digest) => {
                let _ = tx
                    .send(pb::AgentMessage {
                        kind: Some(pb::agent_message::Kind::Ack(pb::Ack {
                            digest,
                            resync: true,
                            ..Default::default()
                        })),
                    })
                    .await;
                continue;
            }
        };
        let digest = digests.tables.clone();
        held = tables;
        held_digests = digests;
        AGENT_APPLY_NANOS.fetch_add(
            thread_cpu_nanos().saturating_sub(started),
            std::sync::atomic::Ordering::Relaxed,
        );
        let _ = acked.send((host, digest.clone(), Instant::now()));
        let _ = tx
            .send(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Ack(pb::Ack {
                    digest,
                    ok: true,
                    ..Default::default()
                })),
            })
            .await;
    }
}

/// CPU time of this process so far (controller and simulated agents together).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a zeroed rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn monotonic_seconds() -> f64 {
    // SAFETY: clock_gettime fills a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A memory figure of this process from /proc/self/status (`VmRSS`, `VmHWM`), MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Reset the peak resident set size to the current one (clear_refs "5"), so the next peak
/// read is that of what follows.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(n: usize) -> Run {
    let root = tempfile::tempdir().expect("tempdir");
    let repo = root.path().join("repo");
    std::fs::create_dir_all(repo.join("policies")).expect("mkdir");
    std::fs::write(repo.join("policies/policy.yaml"), policy(5432)).expect("write");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "initial"]);

    let ca = pki::new_ca("bench CA", 1).expect("ca");
    let server = pki::issue(
        &ca,
        &Subject::Controller {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().expect("ip")],
        },
        1,
        0,
    )
    .expect("cert");
    let ctl = Controller::new(
        Repo::new(&repo, "main"),
        Arc::new(bulkhead_controller::compile::compile_tree),
        None,
    )
    .expect("controller");
    tokio::spawn(ctl.clone().follow_repo(Duration::from_millis(100)));
    tokio::spawn(ctl.clone().follow_inventory());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.cert, &server.key))
        .client_ca_root(Certificate::from_pem(&ca.cert));
    let svc_ctl = ctl.clone();
    tokio::spawn(async move {
        Server::builder()
            .tls_config(tls)
            .expect("tls")
            .add_service(pb::enforcement_server::EnforcementServer::new(
                EnforcementService(svc_ctl.clone()),
            ))
            .add_service(pb::admin_server::AdminServer::new(AdminService(svc_ctl)))
            .serve(([127, 0, 0, 1], port).into())
            .await
    });

    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
    for h in 0..n {
        let cert = pki::issue(&ca, &Subject::Host(format!("hv-{h}")), 1, 0).expect("cert");
        tokio::spawn(agent(port, ca.cert.clone(), cert, h, ack_tx.clone()));
    }
    // Wait until every host has acknowledged tables that include every host's inventory.
    let settle = Instant::now();
    let mut last: std::collections::HashMap<usize, Instant> = Default::default();
    loop {
        tokio::select! {
            Some((h, _, t)) = ack_rx.recv() => { last.insert(h, t); }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                if last.len() == n { break; }
                assert!(settle.elapsed() < Duration::from_secs(300), "agents did not settle");
            }
        }
    }
    // The measured change: a commit that changes every host's tables.
    let mut serving = ctl.serving_tx.subscribe();
    serving.borrow_and_update();
    // The measured window in CLOCK_MONOTONIC seconds, for profiles of just the commit
    // (`perf record -k CLOCK_MONOTONIC`, then `perf report --time start,end`).
    let window_start = monotonic_seconds();
    let connect_peak = status_mib("VmHWM:");
    let settled_rss = status_mib("VmRSS:");
    let peak_reset = reset_peak_rss();
    let cpu0 = cpu_seconds();
    let agents0 = AGENT_APPLY_NANOS.load(std::sync::atomic::Ordering::Relaxed);
    std::fs::write(repo.join("policies/policy.yaml"), policy(6432)).expect("write");
    git(&repo, &["commit", "-q", "-am", "change the service port"]);
    let committed = Instant::now();
    let head = String::from_utf8(
        std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["rev-parse", "HEAD"])
            .output()
            .expect("git rev-parse")
            .stdout,
    )
    .expect("utf-8");
    let head = head.trim();
    // Wait for the controller to serve the new commit, and learn each host's new digest: only
    // acknowledgements of those digests count.
    let want: std::collections::HashMap<usize, String> = loop {
        tokio::time::timeout(Duration::from_secs(120), serving.changed())
            .await
            .expect("the controller serves the commit")
            .expect("controller alive");
        let st = ctl.state();
        let Some(s) = st.serving.as_ref().filter(|s| s.revision.commit == head) else {
            continue;
        };
        break s
            .hosts
            .iter()
            .filter_map(|(h, t)| {
                Some((
                    h.strip_prefix("hv-")?.parse().ok()?,
                    t.digests.tables.clone(),
                ))
            })
            .collect();
    };
    let served = committed.elapsed().as_secs_f64();
    assert_eq!(want.len(), n, "every host has tables");
    let mut latency: std::collections::HashMap<usize, f64> = Default::default();
    while latency.len() < n {
        match tokio::time::timeout(Duration::from_secs(120), ack_rx.recv()).await {
            Ok(Some((h, d, t))) if want.get(&h) == Some(&d) => {
                latency.insert(h, (t - committed).as_secs_f64());
            }
            Ok(Some(_)) => {}
            _ => panic!("only {} of {n} hosts enforced the change", latency.len()),
        }
    }
    let cpu = cpu_seconds() - cpu0;
    let agents_cpu =
        (AGENT_APPLY_NANOS.load(std::sync::atomic::Ordering::Relaxed) - agents0) as f64 / 1e9;
    let commit_peak = status_mib("VmHWM:");
    eprintln!(
        "{n} hosts: commit window {window_start:.6},{:.6} (CLOCK_MONOTONIC s)",
        monotonic_seconds()
    );
    let mut v: Vec<f64> = latency.into_values().collect();
    Run {
        settled_rss,
        commit_peak: peak_reset.then_some(commit_peak),
        peak: connect_peak.max(commit_peak),
        served,
        p50: pct(&mut v, 0.5),
        p99: pct(&mut v, 0.99),
        max: pct(&mut v, 1.0),
        cpu,
        agents_cpu,
    }
}

struct Run {
    /// Commit → the controller serves the compiled output (poll, export, compile, digests).
    served: f64,
    p50: f64,
    p99: f64,
    max: f64,
    cpu: f64,
    /// Of `cpu`: the simulated agents applying and verifying.
    agents_cpu: f64,
    /// MiB resident once every host holds its snapshot (controller and simulated agents).
    settled_rss: f64,
    /// Peak MiB resident from the commit to the last acknowledgement (None where the peak
    /// cannot be reset).
    commit_peak: Option<f64>,
    /// Peak MiB resident over the whole run (connects and snapshots included).
    peak: f64,
}

fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() { vec![100, 1000] } else { ns };
    println!("| simulated hosts | VMs | commit→served | p50 commit→enforced | p99 | slowest | CPU s (all threads) | of which agents apply+verify | RSS settled | peak RSS during the commit | peak RSS of the run |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in ns {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let r = rt.block_on(run(n));
        println!(
            "| {n} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} | {:.2} | {:.0} MiB | {} | {:.0} MiB |",
            n * VMS_PER_HOST,
            r.served * 1e3,
            r.p50 * 1e3,
            r.p99 * 1e3,
            r.max * 1e3,
            r.cpu,
            r.agents_cpu,
            r.settled_rss,
            r.commit_peak
                .map_or("–".to_string(), |m| format!("{m:.0} MiB")),
            r.peak,
        );
    }
}
