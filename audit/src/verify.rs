//! `audit verify`: re-walk the chain and the signed checkpoints and say where anything was
//! modified, deleted, inserted, reordered or truncated.

use std::fmt;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use crate::error::Result;
use crate::record::Record;
use crate::store::{
    chain_hash, from_hex32, genesis_hash, list_segments, load_public_key, public_key_path,
    read_checkpoints, split_line, to_hex, Checkpoint, SegmentFile, SegmentHeader,
};

/// What kind of damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Record content does not match its chain hash.
    Modified,
    /// Sequence numbers missing (records or whole segments deleted).
    Deleted,
    /// A record whose sequence number is not the next one: inserted or reordered.
    OutOfOrder,
    /// A line that is not a record.
    Malformed,
    /// The chain does not link (segment header / previous record).
    ChainBreak,
    /// The log ends before a signed checkpoint: records were cut off the end.
    Truncated,
    /// A checkpoint whose hash differs from the record's hash at that seq.
    CheckpointMismatch,
    /// A checkpoint whose signature does not verify.
    BadSignature,
    /// An incomplete last line (torn write; repaired at next open).
    TornTail,
    /// A closed segment's last record has no signed checkpoint (every rotation signs one):
    /// checkpoints were removed.
    CheckpointMissing,
    Unreadable,
}

/// One finding, with its location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub segment: String,
    /// 1-based line within the (decompressed) segment; the header is line 1.
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if !self.segment.is_empty() {
            write!(f, " in {}", self.segment)?;
        }
        if let Some(l) = self.line {
            write!(f, " line {l}")?;
        }
        if let Some(s) = self.seq {
            write!(f, " seq {s}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Result of a verification.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records removed by retention (covered by `retention_purged` records).
    pub purged_through: Option<u64>,
    pub checkpoints: usize,
    pub checkpoints_matched: usize,
    pub last_checkpoint: Option<Checkpoint>,
    pub public_key: String,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct SegResult {
    header: Option<SegmentHeader>,
    first_record: Option<(u64, [u8; 32])>,
    last: Option<(u64, [u8; 32])>,
    records: u64,
    problems: Vec<Problem>,
    /// (seq, hash) for each checkpointed seq found here.
    found: Vec<(u64, [u8; 32])>,
    /// `retention_purged` records: (first_seq, last_seq, last_hash).
    purges: Vec<(u64, u64, String)>,
}

fn scan_segment(
    seg: &SegmentFile,
    is_last: bool,
    ckpt_seqs: &[u64],
    data: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> SegResult {
    let name = seg.name();
    let mut r = SegResult {
        header: None,
        first_record: None,
        last: None,
        records: 0,
        problems: Vec::new(),
        found: Vec::new(),
        purges: Vec::new(),
    };
    match seg.read_into(data, scratch) {
        Ok(()) => {}
        Err(e) => {
            r.problems.push(Problem {
                kind: ProblemKind::Unreadable,
                segment: name,
                line: None,
                seq: None,
                detail: e.to_string(),
            });
            return r;
        }
    };
    let purge_tag = memchr::memmem::Finder::new(b"\"type\":\"retention_purged\"");
    let mut pos = 0usize;
    let mut lineno = 0u64;
    let mut prev: Option<[u8; 32]> = None;
    let mut expected: Option<u64> = None;
    let mut ck = 0usize;
    while pos < data.len() {
        lineno += 1;
        let (line, complete) = match memchr::memchr(b'\n', &data[pos..]) {
            Some(rel) => (&data[pos..pos + rel], true),
            None => (&data[pos..], false),
        };
        pos += line.len() + 1;
        if lineno == 1 {
            match serde_json::from_slice::<SegmentHeader>(line) {
                Ok(h) if complete => {
                    prev = from_hex32(h.prev.as_bytes());
                    if prev.is_none() {
                        r.problems.push(Problem {
                            kind: ProblemKind::Malformed,
                            segment: name.clone(),
                            line: Some(1),
                            seq: None,
                            detail: "segment header has an invalid prev hash".into(),
                        });
                    }
                    expected = Some(h.first_seq);
                    if h.first_seq != seg.first_seq {
                        r.problems.push(Problem {
                            kind: ProblemKind::ChainBreak,
                            segment: name.clone(),
                            line: Some(1),
                            seq: Some(h.first_seq),
                            detail: format!(
                                "header first_seq {} does not match the file name",
                                h.first_seq
                            ),
                        });
                    }
                    r.header = Some(h);
                }
                _ => {
                    r.problems.push(Problem {
                        kind: if !complete && is_last {
                            ProblemKind::TornTail
                        } else {
                            ProblemKind::Malformed
                        },
                        segment: name.clone(),
                        line: Some(1),
                        seq: None,
                        detail: "segment header missing or unreadable".into(),
                    });
                }
            }
            continue;
        }
        if !complete {
            r.problems.push(Problem {
                kind: if is_last {
                    ProblemKind::TornTail
                } else {
                    ProblemKind::Malformed
                },
                segment: name.clone(),
                line: Some(lineno),
                seq: None,
                detail: format!("incomplete last line ({} bytes, no newline)", line.len()),
            });
            break;
        }
        let Some(parts) = split_line(line) else {
            r.problems.push(Problem {
                kind: ProblemKind::Malformed,
                segment: name.clone(),
                line: Some(lineno),
                seq: None,
                detail: "not a record line (bad structure or hash field)".into(),
            });
            // Resynchronise on the next line's own hash.
            prev = None;
            continue;
        };
        let seq = parts.seq;
        let hash_ok = prev.map(|p| chain_hash(&p, parts.body) == parts.hash);
        match expected {
            Some(e) if seq > e => r.problems.push(Problem {
                kind: ProblemKind::Deleted,
                segment: name.clone(),
                line: Some(lineno),
                seq: Some(seq),
                detail: if seq - 1 == e {
                    format!("record seq {e} is missing before seq {seq}")
                } else {
                    format!("records seq {e}..={} are missing before seq {seq}", seq - 1)
                },
            }),
            Some(e) if seq < e => r.problems.push(Problem {
                kind: ProblemKind::OutOfOrder,
                segment: name.clone(),
                line: Some(lineno),
                seq: Some(seq),
                detail: format!(
                    "seq {seq} found where seq {e} was expected (inserted or reordered record)"
                ),
            }),
            _ => {
                if hash_ok == Some(false) {
                    r.problems.push(Problem {
                        kind: ProblemKind::Modified,
                        segment: name.clone(),
                        line: Some(lineno),
                        seq: Some(seq),
                        detail: "content does not match the chain hash: this record was modified, or the previous one was rewritten with a recomputed hash".into(),
                    });
                }
            }
        }
        if r.first_record.is_none() {
            r.first_record = Some((seq, parts.hash));
        }
        while ck < ckpt_seqs.len() && ckpt_seqs[ck] < seq {
            ck += 1;
        }
        if ck < ckpt_seqs.len() && ckpt_seqs[ck] == seq {
            r.found.push((seq, parts.hash));
        }
        if purge_tag.find(parts.body).is_some() {
            if let Ok(rec) = serde_json::from_slice::<Record>(line) {
                if let crate::record::Event::RetentionPurged {
                    first_seq,
                    last_seq,
                    last_hash,
                    ..
                } = rec.detail
                {
                    r.purges.push((first_seq, last_seq, last_hash));
                }
            }
        }
        prev = Some(parts.hash);
        expected = Some(seq + 1);
        r.last = Some((seq, parts.hash));
        r.records += 1;
    }
    r
}

/// Verify the store in `dir`. The public key defaults to the store's own
/// `keys/checkpoint.pub`; pass one pinned elsewhere (off-box) to resist key replacement.
pub fn verify(dir: &Path, pubkey: Option<VerifyingKey>) -> Result<VerifyReport> {
    let key = match pubkey {
        Some(k) => Some(k),
        None => load_public_key(&public_key_path(dir)).ok(),
    };
    let mut report = VerifyReport {
        public_key: key.map(|k| to_hex(k.as_bytes())).unwrap_or_default(),
        ..Default::default()
    };
    let segs = list_segments(dir)?;
    let checkpoints = read_checkpoints(dir)?;
    report.checkpoints = checkpoints.len();
    report.last_checkpoint = checkpoints.last().cloned();
    let mut ckpts: Vec<(u64, [u8; 32])> = Vec::with_capacity(checkpoints.len());
    for c in &checkpoints {
        let sig_ok = key.map(|k| c.verify(&k)).unwrap_or(false);
        match (sig_ok, from_hex32(c.hash.as_bytes())) {
            (true, Some(h)) => ckpts.push((c.seq, h)),
            _ => report.problems.push(Problem {
                kind: ProblemKind::BadSignature,
                segment: "checkpoints.jsonl".into(),
                line: None,
                seq: Some(c.seq),
                detail: if key.is_none() {
                    "no public key to verify checkpoint signatures".into()
                } else {
                    format!("checkpoint at {} does not verify", c.ts)
                },
            }),
        }
    }
    ckpts.sort_unstable_by_key(|c| c.0);
    let ckpt_seqs: Vec<u64> = ckpts.iter().map(|c| c.0).collect();

    // Scan segments in parallel (they are independent given their headers).
    let n = segs.len();
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let mut results: Vec<Option<SegResult>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let chunks: Vec<Vec<usize>> = (0..threads)
            .map(|t| (t..n).step_by(threads).collect())
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|idx| {
                let segs = &segs;
                let ckpt_seqs = &ckpt_seqs;
                s.spawn(move || {
                    let (mut data, mut scratch) = (Vec::new(), Vec::new());
                    idx.into_iter()
                        .map(|i| {
                            let r = scan_segment(
                                &segs[i],
                                i + 1 == n,
                                ckpt_seqs,
                                &mut data,
                                &mut scratch,
                            );
                            (i, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            if let Ok(v) = h.join() {
                for (i, r) in v {
                    results[i] = Some(r);
                }
            }
        }
    });

    // Join segments.
    let mut expected: Option<u64> = None;
    let mut prev_hash: Option<[u8; 32]> = None;
    let mut found: Vec<(u64, [u8; 32])> = Vec::new();
    let mut purges: Vec<(u64, u64, String)> = Vec::new();
    let mut first_header: Option<(String, SegmentHeader)> = None;
    for (seg, r) in segs.iter().zip(results) {
        let Some(r) = r else {
            report.problems.push(Problem {
                kind: ProblemKind::Unreadable,
                segment: seg.name(),
                line: None,
                seq: None,
                detail: "verification thread failed".into(),
            });
            continue;
        };
        report.segments += 1;
        report.records += r.records;
        if let Some(h) = &r.header {
            if first_header.is_none() {
                first_header = Some((seg.name(), h.clone()));
            }
            if let (Some(e), Some(p)) = (expected, prev_hash) {
                if h.first_seq > e {
                    report.problems.push(Problem {
                        kind: ProblemKind::Deleted,
                        segment: seg.name(),
                        line: Some(1),
                        seq: Some(h.first_seq),
                        detail: format!(
                            "records seq {e}..={} are missing before this segment (segment deleted?)",
                            h.first_seq - 1
                        ),
                    });
                } else if h.first_seq < e {
                    report.problems.push(Problem {
                        kind: ProblemKind::OutOfOrder,
                        segment: seg.name(),
                        line: Some(1),
                        seq: Some(h.first_seq),
                        detail: format!(
                            "segment starts at seq {} but seq {e} was expected",
                            h.first_seq
                        ),
                    });
                } else if from_hex32(h.prev.as_bytes()) != Some(p) {
                    report.problems.push(Problem {
                        kind: ProblemKind::ChainBreak,
                        segment: seg.name(),
                        line: Some(1),
                        seq: Some(h.first_seq),
                        detail:
                            "segment header prev does not match the previous segment's last hash"
                                .into(),
                    });
                }
            }
            if let Some((s, _)) = r.first_record {
                if s != h.first_seq && r.problems.is_empty() {
                    report.problems.push(Problem {
                        kind: ProblemKind::Deleted,
                        segment: seg.name(),
                        line: Some(2),
                        seq: Some(s),
                        detail: format!(
                            "segment should start at seq {} but starts at {s}",
                            h.first_seq
                        ),
                    });
                }
            }
        }
        report.problems.extend(r.problems);
        found.extend(r.found);
        purges.extend(r.purges);
        if let Some((s, h)) = r.last {
            if report.first_seq.is_none() {
                report.first_seq = r.first_record.map(|f| f.0);
            }
            report.last_seq = Some(s);
            expected = Some(s + 1);
            prev_hash = Some(h);
        } else if let Some(h) = &r.header {
            expected = Some(h.first_seq);
            prev_hash = from_hex32(h.prev.as_bytes());
        }
    }

    // The start of the chain: genesis, or justified by a retention purge record.
    if let Some((name, h)) = &first_header {
        if h.first_seq == 0 {
            if from_hex32(h.prev.as_bytes()) != Some(genesis_hash()) {
                report.problems.push(Problem {
                    kind: ProblemKind::ChainBreak,
                    segment: name.clone(),
                    line: Some(1),
                    seq: Some(0),
                    detail: "first segment does not start from the genesis hash".into(),
                });
            }
        } else {
            let justified = purges
                .iter()
                .any(|(_, last, hash)| *last + 1 == h.first_seq && *hash == h.prev);
            if justified {
                report.purged_through = Some(h.first_seq - 1);
            } else {
                report.problems.push(Problem {
                    kind: ProblemKind::Deleted,
                    segment: name.clone(),
                    line: Some(1),
                    seq: Some(h.first_seq),
                    detail: format!(
                        "records seq 0..={} are missing and no retention_purged record accounts for them",
                        h.first_seq - 1
                    ),
                });
            }
        }
    } else if !ckpts.is_empty() {
        report.problems.push(Problem {
            kind: ProblemKind::Truncated,
            segment: String::new(),
            line: None,
            seq: None,
            detail: "no segments, but signed checkpoints exist".into(),
        });
    }

    // Every rotation signs a checkpoint at the end of the closed segment.
    for w in segs.windows(2) {
        let end = w[1].first_seq;
        if end == 0 || report.purged_through.is_some_and(|p| end - 1 <= p) {
            continue;
        }
        if ckpt_seqs.binary_search(&(end - 1)).is_err() {
            report.problems.push(Problem {
                kind: ProblemKind::CheckpointMissing,
                segment: w[0].name(),
                line: None,
                seq: Some(end - 1),
                detail:
                    "no signed checkpoint for the end of this closed segment (checkpoints removed?)"
                        .into(),
            });
        }
    }

    // Checkpoints.
    found.sort_unstable_by_key(|f| f.0);
    let floor = report.first_seq.unwrap_or(0);
    for (seq, h) in &ckpts {
        if *seq < floor && report.purged_through.is_some_and(|p| *seq <= p) {
            continue;
        }
        match found.binary_search_by_key(seq, |f| f.0) {
            Ok(i) => {
                if found[i].1 == *h {
                    report.checkpoints_matched += 1;
                } else {
                    report.problems.push(Problem {
                        kind: ProblemKind::CheckpointMismatch,
                        segment: String::new(),
                        line: None,
                        seq: Some(*seq),
                        detail: "the record at this seq differs from the signed checkpoint (rewritten history)".into(),
                    });
                }
            }
            Err(_) => {
                if report.last_seq.is_none_or(|l| *seq > l) {
                    report.problems.push(Problem {
                        kind: ProblemKind::Truncated,
                        segment: segs.last().map(|s| s.name()).unwrap_or_default(),
                        line: None,
                        seq: Some(*seq),
                        detail: format!(
                            "a signed checkpoint covers seq {seq} but the log ends at {}",
                            report
                                .last_seq
                                .map(|l| l.to_string())
                                .unwrap_or_else(|| "nothing".into())
                        ),
                    });
                } else {
                    report.problems.push(Problem {
                        kind: ProblemKind::Deleted,
                        segment: String::new(),
                        line: None,
                        seq: Some(*seq),
                        detail: "a signed checkpoint covers this seq but the record is missing"
                            .into(),
                    });
                }
            }
        }
    }
    Ok(report)
}
