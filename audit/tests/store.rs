mod common;

use bulkhead_audit::record::Record;
use bulkhead_audit::store::{checkpoints_path, split_line, to_hex};
use bulkhead_audit::verify::{verify, ProblemKind};
use bulkhead_audit::Store;
use common::*;

fn kinds(dir: &std::path::Path) -> Vec<(ProblemKind, Option<u64>, Option<u64>)> {
    let r = verify(dir, None).unwrap();
    for p in &r.problems {
        eprintln!("{p}");
    }
    r.problems.iter().map(|p| (p.kind, p.line, p.seq)).collect()
}

#[test]
fn append_and_verify_clean() {
    let d = tempfile::tempdir().unwrap();
    populated(d.path(), 100);
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    // started + 100 + stopped
    assert_eq!(r.records, 102);
    assert_eq!(r.last_seq, Some(101));
    assert!(r.checkpoints_matched >= 1);
    // Every line is a JSON object with the mandated fields.
    let seg = active_segment(d.path());
    let l = lines(&seg);
    let rec: Record = serde_json::from_str(&l[2]).unwrap();
    assert_eq!(rec.seq, 1);
    assert!(rec.ts.ends_with("+00:00"), "{}", rec.ts);
    assert_eq!(rec.kind, "admin_action");
    assert_eq!(rec.subject, "alice0");
    let v: serde_json::Value = serde_json::from_str(&l[2]).unwrap();
    for f in [
        "seq", "ts", "host", "clock", "type", "subject", "outcome", "detail", "h",
    ] {
        assert!(v.get(f).is_some(), "missing {f}");
    }
}

#[test]
fn reopen_continues_chain() {
    let d = tempfile::tempdir().unwrap();
    populated(d.path(), 10);
    let (mut s, rep) = Store::open(cfg(d.path())).unwrap();
    assert_eq!(rep.next_seq, 12);
    assert!(rep.repaired.is_none());
    s.append(admin(99)).unwrap();
    s.close().unwrap();
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records, 15);
}

#[test]
fn detects_modification() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 20);
    let mut l = lines(&seg);
    // line index 11 = seq 10 (line 12 in 1-based numbering).
    l[11] = l[11].replace("alice9", "mallory");
    write_lines(&seg, &l);
    assert_eq!(
        kinds(d.path()),
        vec![(ProblemKind::Modified, Some(12), Some(10))]
    );
}

#[test]
fn detects_modification_with_recomputed_hash() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 20);
    let mut l = lines(&seg);
    let relink = |prev: [u8; 32], line: &str| -> (String, [u8; 32]) {
        let body = split_line(line.as_bytes()).unwrap().body.to_vec();
        let h = bulkhead_audit::store::chain_hash(&prev, &body);
        (
            format!(
                "{},\"h\":\"{}\"}}",
                String::from_utf8(body).unwrap(),
                to_hex(&h)
            ),
            h,
        )
    };
    let prev = split_line(l[10].as_bytes()).unwrap().hash;
    let (forged, _) = relink(prev, &l[11].replace("alice9", "mallory"));
    let mut l1 = l.clone();
    l1[11] = forged;
    write_lines(&seg, &l1);
    // The forged record itself links, so the break shows at the next record.
    assert_eq!(
        kinds(d.path()),
        vec![(ProblemKind::Modified, Some(13), Some(11))]
    );

    // Rewrite the whole rest of the chain: every link is valid, but the signed checkpoint
    // no longer matches.
    let mut prev = prev;
    l[11] = l[11].replace("alice9", "mallory");
    for line in l.iter_mut().skip(11) {
        let (n, h) = relink(prev, line);
        *line = n;
        prev = h;
    }
    write_lines(&seg, &l);
    assert_eq!(
        kinds(d.path()),
        vec![(ProblemKind::CheckpointMismatch, None, Some(21))]
    );
}

#[test]
fn detects_deletion() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 20);
    let mut l = lines(&seg);
    l.remove(6); // seq 5
    write_lines(&seg, &l);
    assert_eq!(
        kinds(d.path()),
        vec![(ProblemKind::Deleted, Some(7), Some(6))]
    );
}

#[test]
fn detects_insertion() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 20);
    let mut l = lines(&seg);
    let forged = l[5].replace("alice4", "ghost");
    l.insert(6, forged); // duplicate seq 4 after the real seq 4
    write_lines(&seg, &l);
    let k = kinds(d.path());
    assert_eq!(k[0], (ProblemKind::OutOfOrder, Some(7), Some(4)));
    assert!(k.len() <= 2, "{k:?}");
}

#[test]
fn detects_reorder() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 20);
    let mut l = lines(&seg);
    l.swap(8, 9); // seq 7 and 8
    write_lines(&seg, &l);
    let k = kinds(d.path());
    assert!(
        k.contains(&(ProblemKind::Deleted, Some(9), Some(8))),
        "{k:?}"
    );
    assert!(
        k.contains(&(ProblemKind::OutOfOrder, Some(10), Some(7))),
        "{k:?}"
    );
}

#[test]
fn detects_truncation() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 20);
    let mut l = lines(&seg);
    l.truncate(l.len() - 3); // cut the last three complete records
    write_lines(&seg, &l);
    let k = kinds(d.path());
    assert_eq!(k.len(), 1, "{k:?}");
    assert_eq!(k[0].0, ProblemKind::Truncated);
    assert_eq!(k[0].2, Some(21));
    // And the store refuses to open on top of it (it is not a torn tail).
    assert!(matches!(
        Store::open(cfg(d.path())),
        Err(bulkhead_audit::Error::Tampered(_))
    ));
}

#[test]
fn detects_forged_checkpoint_and_deleted_segment() {
    let d = tempfile::tempdir().unwrap();
    populated(d.path(), 5);
    let cp = checkpoints_path(d.path());
    let mut c = std::fs::read_to_string(&cp).unwrap();
    c = c.replacen("\"seq\":6", "\"seq\":7", 1);
    std::fs::write(&cp, c).unwrap();
    assert!(kinds(d.path())
        .iter()
        .any(|k| k.0 == ProblemKind::BadSignature));

    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.segment_max_bytes = 4096;
    let (mut s, _) = Store::open(c).unwrap();
    for i in 0..60 {
        s.append(admin(i)).unwrap();
    }
    s.close().unwrap();
    let segs = bulkhead_audit::store::list_segments(d.path()).unwrap();
    assert!(segs.len() >= 3);
    std::fs::remove_file(&segs[1].path).unwrap();
    let k = kinds(d.path());
    assert!(
        k.iter()
            .any(|x| x.0 == ProblemKind::Deleted && x.1 == Some(1)),
        "{k:?}"
    );
    // Deleting the oldest segment without a retention record is caught too.
    std::fs::remove_file(&segs[0].path).unwrap();
    let k = kinds(d.path());
    assert!(k.iter().any(|x| x.0 == ProblemKind::Deleted), "{k:?}");
}

#[test]
fn torn_tail_is_repaired_and_recorded() {
    let d = tempfile::tempdir().unwrap();
    let (mut s, _) = Store::open(cfg(d.path())).unwrap();
    for i in 0..10 {
        s.append(admin(i)).unwrap();
    }
    s.checkpoint().unwrap();
    // Acknowledged after the checkpoint: must survive.
    let acked = s.append(admin(10)).unwrap();
    drop(s); // crash: no close record
    let seg = active_segment(d.path());
    // Power loss in the middle of an unacknowledged batch: a complete-looking but unchained
    // line, then a half line and zeros.
    let mut data = std::fs::read(&seg).unwrap();
    let good_len = data.len();
    let l = lines(&seg);
    data.extend_from_slice(l[3].as_bytes());
    data.push(b'\n');
    data.extend_from_slice(&l[4].as_bytes()[..40]);
    data.extend_from_slice(&[0u8; 300]);
    std::fs::write(&seg, &data).unwrap();
    let r = verify(d.path(), None).unwrap();
    assert!(!r.ok());

    let (s, rep) = Store::open(cfg(d.path())).unwrap();
    let (_, n, q) = rep.repaired.clone().expect("repaired");
    assert_eq!(n as usize, data.len() - good_len);
    assert_eq!(std::fs::read(&q).unwrap(), data[good_len..].to_vec());
    assert_eq!(rep.next_seq, acked + 1);
    s.close().unwrap();
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    // The repair itself is on the record.
    let text = std::fs::read_to_string(active_segment(d.path())).unwrap();
    assert!(text.contains("\"type\":\"store_repaired\""));
    assert!(text.contains("alice10"));
}

#[test]
fn torn_segment_header_is_repaired() {
    let d = tempfile::tempdir().unwrap();
    populated(d.path(), 3);
    // Crash while creating the next segment: a half-written header.
    let p = d.path().join("segments").join(format!("seg-{:020}.log", 5));
    std::fs::write(&p, b"{\"bulkhead_audit_seg").unwrap();
    let (s, rep) = Store::open(cfg(d.path())).unwrap();
    assert!(rep.repaired.is_some());
    assert_eq!(rep.next_seq, 5);
    s.close().unwrap();
    assert!(verify(d.path(), None).unwrap().ok());
}

#[test]
fn retention_floor_enforced() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.retention_days = 30;
    assert!(matches!(
        Store::open(c),
        Err(bulkhead_audit::Error::Config(_))
    ));
}

#[test]
fn stored_layout_is_serde_layout() {
    let d = tempfile::tempdir().unwrap();
    let (mut s, _) = Store::open(cfg(d.path())).unwrap();
    s.append(admin(1)).unwrap();
    s.append(flow(2)).unwrap();
    s.close().unwrap();
    for l in lines(&active_segment(d.path())).iter().skip(1) {
        let rec: Record = serde_json::from_str(l).unwrap();
        let mut v = serde_json::to_vec(&rec).unwrap();
        v.pop();
        assert_eq!(split_line(l.as_bytes()).unwrap().body, &v[..]);
    }
}

#[test]
fn one_writer_per_store() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Store::open(cfg(d.path())).unwrap();
    assert!(matches!(
        Store::open(cfg(d.path())),
        Err(bulkhead_audit::Error::Config(_))
    ));
    s.close().unwrap();
    let (s, _) = Store::open(cfg(d.path())).unwrap();
    s.close().unwrap();
}

#[test]
fn detects_removed_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.segment_max_bytes = 4096;
    let (mut s, _) = Store::open(c).unwrap();
    for i in 0..40 {
        s.append(admin(i)).unwrap();
    }
    s.close().unwrap();
    assert!(verify(d.path(), None).unwrap().ok());
    std::fs::write(checkpoints_path(d.path()), b"").unwrap();
    let k = kinds(d.path());
    assert!(!k.is_empty());
    assert!(
        k.iter().all(|x| x.0 == ProblemKind::CheckpointMissing),
        "{k:?}"
    );
}
