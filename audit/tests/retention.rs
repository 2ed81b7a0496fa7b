mod common;

use std::sync::atomic::{AtomicI64, Ordering};

use bulkhead_audit::recorder::Recorder;
use bulkhead_audit::store::list_segments;
use bulkhead_audit::verify::verify;
use bulkhead_audit::Store;
use common::*;
use time::OffsetDateTime;

static NOW: AtomicI64 = AtomicI64::new(0);

fn test_clock() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(NOW.load(Ordering::SeqCst)).unwrap()
}

const DAY: i64 = 86_400;

#[test]
fn rotation_compression_and_retention() {
    let base = 1_790_000_000i64;
    NOW.store(base, Ordering::SeqCst);
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.compress = true;
    c.clock = test_clock;
    c.segment_max_bytes = 1 << 30;
    let (mut s, _) = Store::open(c.clone()).unwrap();
    // One segment per day for 200 days (age-based rotation), 5 records a day.
    for day in 0..200 {
        NOW.store(base + day * DAY, Ordering::SeqCst);
        for i in 0..5 {
            s.append(admin(day as u64 * 5 + i)).unwrap();
        }
    }
    s.wait_compression().unwrap();
    let segs = list_segments(d.path()).unwrap();
    assert!(segs.len() >= 199, "{}", segs.len());
    assert!(segs[..segs.len() - 1].iter().all(|s| s.compressed));
    assert!(!segs.last().unwrap().compressed);
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);

    // Nothing is older than 184 days yet relative to day 199 -> purge days 0..=14.
    let purged = s.enforce_retention().unwrap();
    assert_eq!(purged.len(), 15, "{purged:?}");
    // Idempotent.
    assert!(s.enforce_retention().unwrap().is_empty());
    s.close().unwrap();

    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert!(r.purged_through.is_some());
    // The oldest remaining record is no more than 185 days old, the purge is on record.
    let segs = list_segments(d.path()).unwrap();
    let first = segs[0].read_all().unwrap();
    let text = String::from_utf8(first).unwrap();
    assert!(text.lines().nth(1).unwrap().contains("\"seq\":"));
    let active = std::fs::read_to_string(active_segment(d.path())).unwrap();
    assert_eq!(active.matches("\"type\":\"retention_purged\"").count(), 15);

    // Deleting one more old segment by hand (no record) is caught.
    std::fs::remove_file(&segs[0].path).unwrap();
    let r = verify(d.path(), None).unwrap();
    assert!(!r.ok());
}

#[test]
fn interrupted_compression_is_cleaned_up() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.segment_max_bytes = 4096;
    let (mut s, _) = Store::open(c.clone()).unwrap();
    for i in 0..30 {
        s.append(admin(i)).unwrap();
    }
    s.close().unwrap();
    let segs = list_segments(d.path()).unwrap();
    // Crash after the .gz was renamed into place but before the .log was removed, and a
    // leftover temp file from another interrupted compression.
    let gz = bulkhead_audit::store::compress_segment(&segs[0].path).unwrap();
    let data = segs[0].read_all();
    assert!(data.is_err());
    let orig = bulkhead_audit::store::SegmentFile {
        first_seq: 0,
        path: gz.clone(),
        compressed: true,
    }
    .read_all()
    .unwrap();
    std::fs::write(&segs[0].path, &orig).unwrap();
    std::fs::write(format!("{}.gz.tmp", segs[1].path.display()), b"partial").unwrap();
    let (s, _) = Store::open(c).unwrap();
    s.close().unwrap();
    assert!(!segs[0].path.exists());
    assert!(gz.exists());
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

#[test]
fn recorder_group_commit_and_drop_accounting() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Store::open(cfg(d.path())).unwrap();
    let rec = Recorder::spawn(s, 2, 10_000);
    let seq = rec.record(admin(1)).unwrap();
    assert_eq!(seq, 1);
    // Nothing is old enough to purge; the call goes through the writer thread.
    assert!(rec.enforce_retention().unwrap().is_empty());
    let mut dropped = 0u64;
    for i in 0..2000u64 {
        if rec
            .submit_batch((0..10).map(|j| flow(i * 10 + j)).collect())
            .is_err()
        {
            dropped += 10;
        }
    }
    assert_eq!(rec.stats().dropped.load(Ordering::Relaxed), dropped);
    rec.shutdown().unwrap();
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    // Every event is either stored or counted in an events_dropped record.
    let text = std::fs::read_to_string(active_segment(d.path())).unwrap();
    let stored = text.matches("\"type\":\"flow_verdict\"").count() as u64;
    let mut counted = 0u64;
    for l in text.lines().skip(1) {
        let r: bulkhead_audit::Record = serde_json::from_str(l).unwrap();
        if let bulkhead_audit::Event::EventsDropped { count, .. } = r.detail {
            counted += count;
        }
    }
    assert_eq!(counted, dropped);
    assert_eq!(stored + counted, 20_000);
    eprintln!("stored {stored}, dropped and accounted {counted}");
}
