mod common;

use std::sync::atomic::{AtomicI64, Ordering};

use bulkhead_audit::export::{export, parse_time_arg, Filter, Format, CSV_COLUMNS};
use bulkhead_audit::record::Event;
use bulkhead_audit::Store;
use common::*;
use time::OffsetDateTime;

static NOW: AtomicI64 = AtomicI64::new(1_790_000_000);

fn test_clock() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(NOW.load(Ordering::SeqCst)).unwrap()
}

fn flow_with(i: u64, vm: &str, host: &str, dst: &str, dport: u16) -> Event {
    let Event::FlowVerdict(mut f) = flow(i) else {
        unreachable!()
    };
    f.vm = vm.into();
    f.dst_vm = Some(vm.into());
    f.host = host.into();
    f.dst_ip = dst.into();
    f.dst_port = dport;
    Event::FlowVerdict(f)
}

static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup() -> tempfile::TempDir {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    NOW.store(1_790_000_000, Ordering::SeqCst);
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.clock = test_clock;
    let (mut s, _) = Store::open(c).unwrap();
    // 2026-09-21T..: first hour admin + flows, second hour more flows.
    s.append(admin(1)).unwrap();
    s.append(flow_with(1, "db-01", "hv-a", "10.2.0.10", 5432))
        .unwrap();
    s.append(flow_with(2, "web-01", "hv-b", "8.8.8.8", 443))
        .unwrap();
    NOW.fetch_add(3600, Ordering::SeqCst);
    s.append(flow_with(3, "db-01", "hv-a", "10.2.0.10", 22))
        .unwrap();
    s.append(flow_with(4, "web-01", "hv-b", "10.2.0.11", 3389))
        .unwrap();
    s.append(admin(2)).unwrap();
    s.close().unwrap();
    d
}

fn run(d: &std::path::Path, f: &Filter, fmt: Format) -> (u64, String) {
    let mut out = Vec::new();
    let n = export(d, f, fmt, &mut out).unwrap();
    (n, String::from_utf8(out).unwrap())
}

#[test]
fn filters() {
    let d = setup();
    let all = run(d.path(), &Filter::default(), Format::Jsonl).0;
    assert_eq!(all, 8); // started + 6 + stopped
    let t = |types: &[&str]| Filter {
        types: types.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(run(d.path(), &t(&["flow_verdict"]), Format::Jsonl).0, 4);
    assert_eq!(run(d.path(), &t(&["admin_action"]), Format::Jsonl).0, 2);
    let vm = Filter {
        vm: Some("db-01".into()),
        ..Default::default()
    };
    assert_eq!(run(d.path(), &vm, Format::Jsonl).0, 2);
    let host = Filter {
        host: Some("hv-b".into()),
        ..Default::default()
    };
    assert_eq!(run(d.path(), &host, Format::Jsonl).0, 2);
    let rule = Filter {
        rule: Some("rule-3".into()),
        ..Default::default()
    };
    assert_eq!(run(d.path(), &rule, Format::Jsonl).0, 1);
    let from = parse_time_arg("2026-09-21T15:00:00Z").unwrap();
    let late = Filter {
        from: Some(from),
        types: vec!["flow_verdict".into()],
        ..Default::default()
    };
    let (n, text) = run(d.path(), &late, Format::Jsonl);
    assert_eq!(n, 2, "{text}");
    let early = Filter {
        to: Some(from),
        ..Default::default()
    };
    assert_eq!(run(d.path(), &early, Format::Jsonl).0, 4);
    let internet = Filter {
        internet: true,
        ..Default::default()
    };
    assert_eq!(run(d.path(), &internet, Format::Jsonl).0, 1);
    let ra = Filter {
        remote_admin: true,
        ..Default::default()
    };
    assert_eq!(run(d.path(), &ra, Format::Jsonl).0, 2);
}

#[test]
fn jsonl_lines_are_stored_lines_and_csv_is_rectangular() {
    let d = setup();
    let (_, text) = run(d.path(), &Filter::default(), Format::Jsonl);
    let seg = std::fs::read_to_string(active_segment(d.path())).unwrap();
    assert_eq!(text, seg.split_once('\n').unwrap().1);
    let (n, csv) = run(d.path(), &Filter::default(), Format::Csv);
    assert_eq!(n, 8);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], CSV_COLUMNS.join(","));
    assert_eq!(lines.len(), 9);
    // A flow row carries the 5-tuple.
    let flow_row = lines.iter().find(|l| l.contains(",flow_verdict,")).unwrap();
    assert!(
        flow_row.contains("10.2.0.10,5432,6,ingress,deny"),
        "{flow_row}"
    );
    // Quoting: the detail column is JSON with commas and quotes, doubled inside quotes.
    assert!(flow_row.ends_with("}\""), "{flow_row}");
}
