//! Flow records from agents into the controller's durable, hash-chained audit store, at a
//! sustained rate: the real controller binary (mutual TLS, its `--audit-dir` store) and
//! simulated agents (host certificates, the agents' `Sync` stream) sending `FlowEvents`
//! batches of distinct flows every 100 ms, as the agent's aggregator does. Afterwards the store
//! is read back: every offered record must be stored, or counted in an `events_dropped` record
//! — nothing unaccounted.
//!
//! `cargo run --release -p bulkhead-e2e --example flow_pipeline -- [records/s] [seconds] [agents]`
//! (defaults 100000 10 4). Needs `cargo build --release -p bulkhead-controller` first.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bulkhead_audit::record::Event;
use bulkhead_e2e::{audit_records, ControllerProc, PolicyRepo, TestPki};
use bulkhead_wire::{pb, pki};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const TICK: Duration = Duration::from_millis(100);

fn batch(agent: usize, tick: u64, n: usize) -> pb::FlowEvents {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let records = (0..n)
        .map(|i| {
            // Distinct flows: nothing for an aggregator to merge.
            let k = tick as usize * n + i;
            pb::FlowRecord {
                first_seen_unix_nanos: now,
                last_seen_unix_nanos: now,
                vm: format!("vm-{agent}"),
                endpoint: format!("vm-{agent}/52:54:00:00:00:01"),
                kind: u32::from(bulkhead_abi::EVENT_DENY),
                direction: u32::from(bulkhead_abi::DIR_INGRESS),
                reason: 0,
                src: vec![10, (k >> 16) as u8, (k >> 8) as u8, k as u8],
                dst: vec![10, 200, agent as u8, 1],
                sport: (k % 60000) as u32 + 1024,
                dport: 5432,
                proto: 6,
                rule: "default".into(),
                digest: String::new(),
                packets: 1,
                bytes: 60,
            }
        })
        .collect();
    pb::FlowEvents {
        records,
        suppressed: 0,
        alerts: vec![],
    }
}

/// One simulated agent: hello, an empty inventory, then a batch every tick until `end`.
/// Returns the records it offered.
async fn agent(
    port: u16,
    ca: String,
    cert: pki::Pem,
    i: usize,
    per_tick: usize,
    end: Instant,
) -> Result<u64> {
    let ch = bulkhead_wire::connect(
        &format!("https://127.0.0.1:{port}"),
        "localhost",
        &ca,
        &cert.cert,
        &cert.key,
    )
    .await
    .context("connecting to the controller")?;
    let mut client = pb::enforcement_client::EnforcementClient::new(ch);
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello::default())),
    })
    .await?;
    tx.send(pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Inventory(pb::Inventory::default())),
    })
    .await?;
    let mut inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();
    // Tables arrive; this agent only reports flows.
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let mut offered = 0u64;
    let mut tick = 0u64;
    let mut next = Instant::now();
    while Instant::now() < end {
        let b = batch(i, tick, per_tick);
        offered += b.records.len() as u64;
        tx.send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Events(b)),
        })
        .await?;
        tick += 1;
        next += TICK;
        tokio::time::sleep_until(next.into()).await;
    }
    // Keep the stream open until everything sent is taken in.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(offered)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rate = args.first().copied().unwrap_or(100_000);
    let secs = args.get(1).copied().unwrap_or(10);
    let agents = args.get(2).copied().unwrap_or(4).max(1) as usize;
    let per_tick = (rate as usize / agents / 10).max(1);

    let root = tempfile::tempdir()?;
    let pki = TestPki::new(root.path())?;
    let repo = PolicyRepo::new(root.path(), &bulkhead_e2e::workspace_dir().join("policies"))?;
    let ctl = ControllerProc::start(root.path(), &repo.dir, &pki.dir)?;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..agents {
        let cert = pki::issue(&pki.ca, &pki::Subject::Host(format!("bench-{i}")), 1, 0)?;
        tasks.push(tokio::spawn(agent(
            ctl.port,
            pki.ca.cert.clone(),
            cert,
            i,
            per_tick,
            end,
        )));
    }
    let mut offered = 0;
    for t in tasks {
        offered += t.await??;
    }
    let sent_secs = start.elapsed().as_secs_f64() - 1.0;
    // Wait until the store stops growing, then read it back.
    let mut last = 0;
    let stored_at = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = std::fs::read_dir(bulkhead_e2e::audit_dir(root.path()).join("segments"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        if n == last {
            break start.elapsed().as_secs_f64() - 1.0;
        }
        last = n;
    };
    drop(ctl);
    let (mut stored, mut dropped) = (0u64, 0u64);
    for r in audit_records(root.path())? {
        match &r.detail {
            Event::FlowVerdict(_) => stored += 1,
            Event::EventsDropped { count, .. } => dropped += count,
            _ => {}
        }
    }
    let unaccounted = offered as i64 - (stored + dropped) as i64;
    println!("| agents | offered records | offered per s | stored (chained, fsynced) | dropped, counted and audited | unaccounted | stored per s |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {agents} | {offered} | {:.0} | {stored} | {dropped} | {unaccounted} | {:.0} |",
        offered as f64 / sent_secs,
        stored as f64 / stored_at.max(sent_secs),
    );
    anyhow::ensure!(unaccounted == 0, "{unaccounted} records unaccounted");
    Ok(())
}
