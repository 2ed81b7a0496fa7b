//! The chained, append-only, crash-safe store.
//!
//! Layout of a store directory:
//!
//! ```text
//! segments/seg-00000000000000000000.log.gz   closed, compressed segments
//! segments/seg-00000000000001048576.log      the active segment
//! checkpoints.jsonl                          signed checkpoints (seq, chain hash, time)
//! keys/checkpoint.key, keys/checkpoint.pub   ed25519 checkpoint key (0600) and public key (hex)
//! quarantine/                                torn tails cut off at open (kept, never deleted)
//! forward-<name>.cursor                      forwarding cursors
//! ```
//!
//! A segment starts with a header line `{"bulkhead_audit_segment":1,"first_seq":N,"prev":"<hex>",…}`
//! followed by one record per line. A record line is a JSON object whose last member is
//! `"h":"<64 hex>"`: `h = SHA-256(h_prev || P)` where `P` is the line up to (not including)
//! `,"h":"`, and `h_prev` is the previous record's `h` (for seq 0, [`genesis_hash`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::{Error, IoCtx, Result};
use crate::record::{format_ts, parse_ts, ClockState, Event, Record};

/// Minimum retention: six calendar months can be 184 days (Cybersecurity Law art. 21).
pub const MIN_RETENTION_DAYS: u32 = 184;
/// Length of the `,"h":"<64 hex>"}` suffix (without the newline).
pub const SUFFIX_LEN: usize = 6 + 64 + 2;
const SUFFIX_HEAD: &[u8] = b",\"h\":\"";
const SEGMENT_PREFIX: &str = "seg-";

/// Hash that precedes seq 0.
pub fn genesis_hash() -> [u8; 32] {
    Sha256::digest(b"bulkhead-audit genesis v1").into()
}

/// `SHA-256(prev || body)`.
pub fn chain_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

pub fn to_hex(b: &[u8]) -> String {
    let mut v = Vec::with_capacity(b.len() * 2);
    push_hex(&mut v, b);
    String::from_utf8(v).unwrap_or_default()
}

/// Append lowercase hex.
pub fn push_hex(out: &mut Vec<u8>, b: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        out.push(HEX[(x >> 4) as usize]);
        out.push(HEX[(x & 15) as usize]);
    }
}

const HEX_DECODE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Decode 64 lowercase hex characters.
pub fn from_hex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (i, o) in out.iter_mut().enumerate() {
        let hi = HEX_DECODE[s[2 * i] as usize];
        let lo = HEX_DECODE[s[2 * i + 1] as usize];
        bad |= (hi | lo) & 0xf0;
        *o = (hi << 4) | (lo & 0x0f);
    }
    (bad == 0).then_some(out)
}

/// A record line split into its parts (`line` excludes the newline).
pub struct LineParts<'a> {
    pub seq: u64,
    pub body: &'a [u8],
    pub hash: [u8; 32],
}

/// Split a record line. `None` if it is not a well-formed record line.
pub fn split_line(line: &[u8]) -> Option<LineParts<'_>> {
    if line.len() < SUFFIX_LEN + 10 || !line.ends_with(b"\"}") {
        return None;
    }
    let cut = line.len() - SUFFIX_LEN;
    if &line[cut..cut + SUFFIX_HEAD.len()] != SUFFIX_HEAD {
        return None;
    }
    let hash = from_hex32(&line[cut + SUFFIX_HEAD.len()..line.len() - 2])?;
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let mut seq: u64 = 0;
    let mut n = 0;
    for &c in rest.iter().take(20) {
        if c.is_ascii_digit() {
            seq = seq.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            n += 1;
        } else {
            break;
        }
    }
    if n == 0 || rest.get(n) != Some(&b',') {
        return None;
    }
    Some(LineParts {
        seq,
        body: &line[..cut],
        hash,
    })
}

/// Segment header (first line of every segment file).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SegmentHeader {
    pub bulkhead_audit_segment: u32,
    pub first_seq: u64,
    /// Chain hash preceding `first_seq`.
    pub prev: String,
    pub created: String,
    pub host: String,
}

/// A signed checkpoint: "the chain reached `seq` with hash `hash` at `ts`".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub ts: String,
    pub sig: String,
}

impl Checkpoint {
    pub fn message(seq: u64, hash: &str, ts: &str) -> Vec<u8> {
        format!("bulkhead-audit checkpoint v1\n{seq}\n{hash}\n{ts}\n").into_bytes()
    }

    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let Some(sig) = from_hex64(self.sig.as_bytes()) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        key.verify_strict(&Self::message(self.seq, &self.hash, &self.ts), &sig)
            .is_ok()
    }
}

fn from_hex64(s: &[u8]) -> Option<[u8; 64]> {
    if s.len() != 128 {
        return None;
    }
    let a = from_hex32(&s[..64])?;
    let b = from_hex32(&s[64..])?;
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&a);
    out[32..].copy_from_slice(&b);
    Some(out)
}

/// Clock used to timestamp records (injectable for tests).
pub type Clock = fn() -> OffsetDateTime;

fn system_clock() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Store configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Recorder host name written into every record.
    pub host: String,
    /// Rotate when the active segment reaches this size.
    pub segment_max_bytes: u64,
    /// Rotate when the active segment is this old.
    pub segment_max_age: Duration,
    /// Retention in days; must be at least [`MIN_RETENTION_DAYS`].
    pub retention_days: u32,
    /// Compress closed segments (gzip) at rotation.
    pub compress: bool,
    /// Sign a checkpoint at most this often (and at every rotation / close).
    pub checkpoint_interval: Duration,
    pub clock: Clock,
    /// Sample the clock-sync state at most this often.
    pub clock_sample_interval: Duration,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>, host: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            host: host.into(),
            segment_max_bytes: 64 << 20,
            segment_max_age: Duration::from_secs(86_400),
            retention_days: MIN_RETENTION_DAYS,
            compress: true,
            checkpoint_interval: Duration::from_secs(10),
            clock: system_clock,
            clock_sample_interval: Duration::from_secs(10),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.retention_days < MIN_RETENTION_DAYS {
            return Err(Error::Config(format!(
                "retention_days = {} is below the legal floor of {MIN_RETENTION_DAYS} days",
                self.retention_days
            )));
        }
        if self.segment_max_bytes < 4096 {
            return Err(Error::Config("segment_max_bytes must be >= 4096".into()));
        }
        Ok(())
    }
}

/// What happened at open.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpenReport {
    /// Torn tail cut off: (segment, quarantined bytes, quarantine file).
    pub repaired: Option<(String, u64, PathBuf)>,
    pub next_seq: u64,
}

/// A segment file on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    pub first_seq: u64,
    pub path: PathBuf,
    pub compressed: bool,
}

impl SegmentFile {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whole decompressed contents.
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(&mut out, &mut Vec::new())?;
        Ok(out)
    }

    /// Whole decompressed contents into `out`, reusing `out` and `scratch` allocations.
    pub fn read_into(&self, out: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Result<()> {
        let mut f = File::open(&self.path).ctx(&self.path)?;
        out.clear();
        if self.compressed {
            scratch.clear();
            f.read_to_end(scratch).ctx(&self.path)?;
            gunzip_into(scratch, out).ctx(&self.path)?;
        } else {
            f.read_to_end(out).ctx(&self.path)?;
        }
        Ok(())
    }
}

pub fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

pub fn checkpoints_path(dir: &Path) -> PathBuf {
    dir.join("checkpoints.jsonl")
}

pub fn public_key_path(dir: &Path) -> PathBuf {
    dir.join("keys").join("checkpoint.pub")
}

/// List segments, sorted by first seq. Leftovers of an interrupted compression are cleaned
/// up only by [`Store::open`]; here a `.log` wins over a `.log.gz` of the same first seq.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>> {
    let sdir = segments_dir(dir);
    let mut out: Vec<SegmentFile> = Vec::new();
    let rd = match fs::read_dir(&sdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).ctx(&sdir),
    };
    for ent in rd {
        let ent = ent.ctx(&sdir)?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SEGMENT_PREFIX) else {
            continue;
        };
        let (num, compressed) = if let Some(n) = rest.strip_suffix(".log.gz") {
            (n, true)
        } else if let Some(n) = rest.strip_suffix(".log") {
            (n, false)
        } else {
            continue;
        };
        let Ok(first_seq) = num.parse::<u64>() else {
            continue;
        };
        out.push(SegmentFile {
            first_seq,
            path: ent.path(),
            compressed,
        });
    }
    out.sort_by_key(|s| (s.first_seq, s.compressed));
    out.dedup_by_key(|s| s.first_seq);
    Ok(out)
}

fn segment_path(dir: &Path, first_seq: u64, compressed: bool) -> PathBuf {
    segments_dir(dir).join(format!(
        "{SEGMENT_PREFIX}{first_seq:020}.log{}",
        if compressed { ".gz" } else { "" }
    ))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).ctx(dir)?.sync_all().ctx(dir)
}

/// Read all signed checkpoints (a torn last line is ignored).
pub fn read_checkpoints(dir: &Path) -> Result<Vec<Checkpoint>> {
    let p = checkpoints_path(dir);
    let data = match fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx(&p),
    };
    let mut out = Vec::new();
    for line in data.split(|&c| c == b'\n') {
        if line.is_empty() {
            continue;
        }
        if let Ok(c) = serde_json::from_slice::<Checkpoint>(line) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Load the store's public checkpoint key.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey> {
    let s = fs::read_to_string(path).ctx(path)?;
    let b = from_hex32(s.trim().as_bytes())
        .ok_or_else(|| Error::Corrupt(format!("{}: not a hex ed25519 key", path.display())))?;
    VerifyingKey::from_bytes(&b).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

fn load_or_create_key(dir: &Path) -> Result<SigningKey> {
    let kdir = dir.join("keys");
    fs::create_dir_all(&kdir).ctx(&kdir)?;
    let kp = kdir.join("checkpoint.key");
    match fs::read(&kp) {
        Ok(b) => {
            let seed: [u8; 32] = b
                .as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt(format!("{}: expected 32 bytes", kp.display())))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut seed))
                .ctx(Path::new("/dev/urandom"))?;
            let key = SigningKey::from_bytes(&seed);
            let tmp = kdir.join("checkpoint.key.tmp");
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .ctx(&tmp)?;
            f.write_all(&seed).ctx(&tmp)?;
            f.sync_all().ctx(&tmp)?;
            fs::rename(&tmp, &kp).ctx(&kp)?;
            let pp = public_key_path(dir);
            fs::write(&pp, format!("{}\n", to_hex(key.verifying_key().as_bytes()))).ctx(&pp)?;
            fsync_dir(&kdir)?;
            Ok(key)
        }
        Err(e) => Err(e).ctx(&kp),
    }
}

/// State at the end of a scanned segment.
struct ScanEnd {
    /// Byte length of the valid prefix.
    valid_len: u64,
    next_seq: u64,
    last_hash: [u8; 32],
    created: Option<OffsetDateTime>,
}

/// Scan a segment's bytes: header + the longest valid chained prefix.
/// `None` if even the header is incomplete/invalid.
fn scan_valid_prefix(data: &[u8]) -> Option<ScanEnd> {
    let nl = memchr::memchr(b'\n', data)?;
    let hdr: SegmentHeader = serde_json::from_slice(&data[..nl]).ok()?;
    let mut prev = from_hex32(hdr.prev.as_bytes())?;
    let mut next_seq = hdr.first_seq;
    let mut pos = nl + 1;
    while pos < data.len() {
        let Some(rel) = memchr::memchr(b'\n', &data[pos..]) else {
            break;
        };
        let line = &data[pos..pos + rel];
        let Some(parts) = split_line(line) else {
            break;
        };
        if parts.seq != next_seq || chain_hash(&prev, parts.body) != parts.hash {
            break;
        }
        prev = parts.hash;
        next_seq += 1;
        pos += rel + 1;
    }
    Some(ScanEnd {
        valid_len: pos as u64,
        next_seq,
        last_hash: prev,
        created: parse_ts(&hdr.created),
    })
}

/// The append-only store. One writer per directory (the caller serialises; see
/// [`crate::recorder::Recorder`] for group commit from many threads).
pub struct Store {
    cfg: StoreConfig,
    key: SigningKey,
    active: File,
    active_path: PathBuf,
    active_first_seq: u64,
    active_bytes: u64,
    active_created: OffsetDateTime,
    next_seq: u64,
    last_hash: [u8; 32],
    ckpt: File,
    last_ckpt_seq: Option<u64>,
    last_ckpt_at: Instant,
    clock_state: ClockState,
    clock_sampled: Option<Instant>,
    buf: Vec<u8>,
    /// Background compression of the previous segment (at most one outstanding).
    compressor: Option<std::thread::JoinHandle<Result<PathBuf>>>,
    /// Exclusive lock on `LOCK`: one writer per store.
    _lock: File,
}

impl Store {
    /// Open (or create) a store, repairing a torn tail. Appends an `audit_service` "started"
    /// record (and a `store_repaired` record when it repaired something).
    pub fn open(cfg: StoreConfig) -> Result<(Store, OpenReport)> {
        cfg.validate()?;
        let dir = cfg.dir.clone();
        for d in [dir.clone(), segments_dir(&dir), dir.join("quarantine")] {
            fs::create_dir_all(&d).ctx(&d)?;
        }
        let lock = lock_dir(&dir)?;
        let key = load_or_create_key(&dir)?;
        let now = (cfg.clock)();
        let sdir = segments_dir(&dir);
        // Interrupted compression: a complete .gz is only renamed into place after fsync, so
        // when both exist the .gz is complete and the .log can go; *.tmp are incomplete.
        for ent in fs::read_dir(&sdir).ctx(&sdir)? {
            let p = ent.ctx(&sdir)?.path();
            let name = p.to_string_lossy().into_owned();
            let leftover = name.ends_with(".tmp")
                || (name.ends_with(".log") && Path::new(&format!("{name}.gz")).exists());
            if leftover {
                fs::remove_file(&p).ctx(&p)?;
            }
        }
        let checkpoints = read_checkpoints(&dir)?;
        let last_ckpt = checkpoints.last().cloned();
        let mut report = OpenReport::default();
        let mut segs = list_segments(&dir)?;

        // Find the state to continue from.
        let mut state: Option<(SegmentFile, ScanEnd)> = None;
        while let Some(seg) = segs.pop() {
            let data = seg.read_all()?;
            match scan_valid_prefix(&data) {
                Some(end) => {
                    if (end.valid_len as usize) < data.len() {
                        if seg.compressed {
                            return Err(Error::Tampered(format!(
                                "closed segment {} is invalid after byte {}",
                                seg.name(),
                                end.valid_len
                            )));
                        }
                        if let Some(c) = &last_ckpt {
                            if c.seq >= end.next_seq {
                                return Err(Error::Tampered(format!(
                                    "segment {} is invalid from seq {} but checkpoint {} covers seq {}",
                                    seg.name(),
                                    end.next_seq,
                                    c.ts,
                                    c.seq
                                )));
                            }
                        }
                        let q = quarantine(&dir, &seg, &data[end.valid_len as usize..], now)?;
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&seg.path)
                            .ctx(&seg.path)?;
                        f.set_len(end.valid_len).ctx(&seg.path)?;
                        f.sync_all().ctx(&seg.path)?;
                        report.repaired =
                            Some((seg.name(), (data.len() as u64) - end.valid_len, q));
                    }
                    state = Some((seg, end));
                    break;
                }
                None => {
                    // Header torn (crash while creating a segment): quarantine the file.
                    if seg.compressed {
                        return Err(Error::Tampered(format!(
                            "closed segment {} has no valid header",
                            seg.name()
                        )));
                    }
                    if let Some(c) = &last_ckpt {
                        if c.seq >= seg.first_seq {
                            return Err(Error::Tampered(format!(
                                "segment {} has no valid header but checkpoint covers seq {}",
                                seg.name(),
                                c.seq
                            )));
                        }
                    }
                    let q = quarantine(&dir, &seg, &data, now)?;
                    fs::remove_file(&seg.path).ctx(&seg.path)?;
                    fsync_dir(&sdir)?;
                    report.repaired = Some((seg.name(), data.len() as u64, q));
                }
            }
        }

        let ckpt_path = checkpoints_path(&dir);
        let ckpt = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ckpt_path)
            .ctx(&ckpt_path)?;

        let (active, active_path, first, bytes, created, next_seq, last_hash) = match state {
            Some((seg, end)) if !seg.compressed => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .ctx(&seg.path)?;
                (
                    f,
                    seg.path.clone(),
                    seg.first_seq,
                    end.valid_len,
                    end.created.unwrap_or(now),
                    end.next_seq,
                    end.last_hash,
                )
            }
            Some((_seg, end)) => {
                let (f, p, n) = create_segment(&cfg, end.next_seq, &end.last_hash, now)?;
                (f, p, end.next_seq, n, now, end.next_seq, end.last_hash)
            }
            None => {
                if let Some(c) = &last_ckpt {
                    return Err(Error::Tampered(format!(
                        "no segments, but a checkpoint covers seq {}",
                        c.seq
                    )));
                }
                let g = genesis_hash();
                let (f, p, n) = create_segment(&cfg, 0, &g, now)?;
                (f, p, 0, n, now, 0, g)
            }
        };
        if let Some(c) = &last_ckpt {
            if c.seq >= next_seq {
                return Err(Error::Tampered(format!(
                    "the log ends at seq {} but checkpoint {} covers seq {} (truncated)",
                    next_seq as i128 - 1,
                    c.ts,
                    c.seq
                )));
            }
        }
        report.next_seq = next_seq;
        let mut store = Store {
            cfg,
            key,
            active,
            active_path,
            active_first_seq: first,
            active_bytes: bytes,
            active_created: created,
            next_seq,
            last_hash,
            ckpt,
            last_ckpt_seq: last_ckpt.map(|c| c.seq),
            last_ckpt_at: Instant::now(),
            clock_state: ClockState::Unknown,
            clock_sampled: None,
            buf: Vec::with_capacity(1 << 20),
            compressor: None,
            _lock: lock,
        };
        let mut evs = Vec::new();
        if let Some((seg, n, q)) = &report.repaired {
            evs.push(Event::StoreRepaired {
                segment: seg.clone(),
                last_good_seq: next_seq.checked_sub(1),
                quarantined_bytes: *n,
                quarantine_file: q.display().to_string(),
            });
        }
        evs.push(Event::AuditService {
            action: "started".into(),
            detail: format!("store {} opened at seq {next_seq}", dir.display()),
        });
        store.append_batch(evs)?;
        Ok((store, report))
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Next sequence number to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Chain hash of the last record.
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Override the clock-sync state written into records (otherwise sampled from the kernel).
    pub fn set_clock_state(&mut self, s: ClockState) {
        self.clock_state = s;
        self.clock_sampled = Some(Instant::now());
    }

    fn sample_clock(&mut self) {
        let due = match self.clock_sampled {
            None => true,
            Some(t) => t.elapsed() >= self.cfg.clock_sample_interval,
        };
        if due {
            self.clock_state = crate::timesync::clock_status().state();
            self.clock_sampled = Some(Instant::now());
        }
    }

    /// Append one record durably. Returns its sequence number.
    pub fn append(&mut self, ev: Event) -> Result<u64> {
        let r = self.append_batch(std::iter::once(ev))?;
        Ok(r.start)
    }

    /// Append records with a single fsync; they are durable when this returns `Ok`.
    pub fn append_batch(
        &mut self,
        evs: impl IntoIterator<Item = Event>,
    ) -> Result<std::ops::Range<u64>> {
        self.sample_clock();
        let now = (self.cfg.clock)();
        if (now - self.active_created).unsigned_abs() >= self.cfg.segment_max_age {
            // Age-based rotation happens before the write, so a segment holds one period.
            self.rotate()?;
        }
        let ts = format_ts(now);
        self.buf.clear();
        let start = self.next_seq;
        let mut seq = self.next_seq;
        let mut prev = self.last_hash;
        // The constant parts of every line of this batch, serialised once. The layout is
        // exactly that of `serde_json::to_vec(&Record)` minus the closing brace.
        let ts_json = serde_json::to_string(&ts)?;
        let host_json = serde_json::to_string(&self.cfg.host)?;
        let clock: &[u8] = match self.clock_state {
            ClockState::Synced => b"\"synced\"",
            ClockState::Unsynced => b"\"unsynced\"",
            ClockState::Unknown => b"\"unknown\"",
        };
        for ev in evs {
            let at = self.buf.len();
            self.buf.extend_from_slice(b"{\"seq\":");
            self.buf.extend_from_slice(seq.to_string().as_bytes());
            self.buf.extend_from_slice(b",\"ts\":");
            self.buf.extend_from_slice(ts_json.as_bytes());
            self.buf.extend_from_slice(b",\"host\":");
            self.buf.extend_from_slice(host_json.as_bytes());
            self.buf.extend_from_slice(b",\"clock\":");
            self.buf.extend_from_slice(clock);
            self.buf.extend_from_slice(b",\"type\":\"");
            self.buf.extend_from_slice(ev.kind().as_bytes());
            self.buf.extend_from_slice(b"\",\"subject\":");
            serde_json::to_writer(&mut self.buf, &ev.subject())?;
            self.buf.extend_from_slice(b",\"outcome\":\"");
            self.buf.extend_from_slice(ev.outcome().as_str().as_bytes());
            self.buf.extend_from_slice(b"\",\"detail\":");
            serde_json::to_writer(&mut self.buf, &ev)?;
            let h = chain_hash(&prev, &self.buf[at..]);
            self.buf.extend_from_slice(SUFFIX_HEAD);
            push_hex(&mut self.buf, &h);
            self.buf.extend_from_slice(b"\"}\n");
            prev = h;
            seq += 1;
        }
        if seq == start {
            return Ok(start..start);
        }
        if let Err(e) = self
            .active
            .write_all(&self.buf)
            .and_then(|_| self.active.sync_data())
        {
            // Undo a partial write so the chain stays valid; the batch is not acknowledged.
            let _ = self.active.set_len(self.active_bytes);
            return Err(Error::Io {
                path: self.active_path.clone(),
                source: e,
            });
        }
        self.active_bytes += self.buf.len() as u64;
        self.next_seq = seq;
        self.last_hash = prev;
        if self.last_ckpt_at.elapsed() >= self.cfg.checkpoint_interval {
            self.checkpoint()?;
        }
        if self.active_bytes >= self.cfg.segment_max_bytes {
            self.rotate()?;
        }
        Ok(start..seq)
    }

    /// Sign and persist a checkpoint for the current head (if it moved).
    pub fn checkpoint(&mut self) -> Result<Option<Checkpoint>> {
        self.last_ckpt_at = Instant::now();
        if self.next_seq == 0 {
            return Ok(None);
        }
        let seq = self.next_seq - 1;
        if self.last_ckpt_seq == Some(seq) {
            return Ok(None);
        }
        let hash = to_hex(&self.last_hash);
        let ts = format_ts((self.cfg.clock)());
        let sig = self.key.sign(&Checkpoint::message(seq, &hash, &ts));
        let c = Checkpoint {
            seq,
            hash,
            ts,
            sig: to_hex(&sig.to_bytes()),
        };
        let mut line = serde_json::to_vec(&c)?;
        line.push(b'\n');
        let p = checkpoints_path(&self.cfg.dir);
        // The records it covers are already fsynced, so a checkpoint can never get ahead of
        // durable data; it is fsynced itself so that a truncation after it is caught.
        self.ckpt.write_all(&line).ctx(&p)?;
        self.ckpt.sync_data().ctx(&p)?;
        self.last_ckpt_seq = Some(seq);
        Ok(Some(c))
    }

    /// Close the active segment and start a new one (compressing the old one if configured).
    pub fn rotate(&mut self) -> Result<()> {
        if self.next_seq == self.active_first_seq {
            return Ok(());
        }
        self.checkpoint()?;
        let now = (self.cfg.clock)();
        let (f, p, n) = create_segment(&self.cfg, self.next_seq, &self.last_hash, now)?;
        let old = std::mem::replace(&mut self.active_path, p);
        self.active = f;
        self.active_first_seq = self.next_seq;
        self.active_bytes = n;
        self.active_created = now;
        if self.cfg.compress {
            // Off the append path: at most one compression runs; wait for the previous one.
            self.wait_compression()?;
            self.compressor = Some(std::thread::spawn(move || {
                // Compression must never starve the writer: lowest CPU priority (this thread).
                // SAFETY: setpriority on the calling thread's id.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 19);
                }
                compress_segment(&old)
            }));
        }
        Ok(())
    }

    /// Wait for the background compression of the last closed segment, if any.
    pub fn wait_compression(&mut self) -> Result<()> {
        if let Some(h) = self.compressor.take() {
            h.join()
                .map_err(|_| Error::Corrupt("segment compression thread panicked".into()))??;
        }
        Ok(())
    }

    /// Change the retention period (the audit administrator's setting); below the legal floor
    /// is refused. Returns the previous period. The change itself is an `audit_service`
    /// record.
    pub fn set_retention_days(&mut self, days: u32) -> Result<u32> {
        let mut cfg = self.cfg.clone();
        cfg.retention_days = days;
        cfg.validate()?;
        let before = self.cfg.retention_days;
        if before != days {
            self.append(Event::AuditService {
                action: "retention_changed".into(),
                detail: format!("retention {before} -> {days} days"),
            })?;
            self.cfg.retention_days = days;
        }
        Ok(before)
    }

    /// Remove closed segments whose newest record is older than the retention period.
    /// A `retention_purged` record is appended (durably) before each file is removed.
    /// Returns the purged segment names.
    pub fn enforce_retention(&mut self) -> Result<Vec<String>> {
        self.wait_compression()?;
        let now = (self.cfg.clock)();
        let limit = now - time::Duration::days(i64::from(self.cfg.retention_days));
        let mut purged = Vec::new();
        for seg in list_segments(&self.cfg.dir)? {
            if seg.first_seq >= self.active_first_seq {
                break;
            }
            let data = seg.read_all()?;
            let Some(last) = last_record_line(&data) else {
                break;
            };
            let (Some(parts), Ok(rec)) = (split_line(last), serde_json::from_slice::<Record>(last))
            else {
                return Err(Error::Corrupt(format!(
                    "{}: last record unreadable",
                    seg.name()
                )));
            };
            let Some(t) = rec.time() else { break };
            if t >= limit {
                break;
            }
            self.append(Event::RetentionPurged {
                segment: seg.name(),
                first_seq: seg.first_seq,
                last_seq: parts.seq,
                last_hash: to_hex(&parts.hash),
                newest_record: rec.ts.clone(),
                retention_days: self.cfg.retention_days,
            })?;
            fs::remove_file(&seg.path).ctx(&seg.path)?;
            fsync_dir(&segments_dir(&self.cfg.dir))?;
            purged.push(seg.name());
        }
        Ok(purged)
    }

    /// Record that the audit service stops, checkpoint, and close.
    pub fn close(mut self) -> Result<()> {
        self.append(Event::AuditService {
            action: "stopped".into(),
            detail: String::new(),
        })?;
        self.checkpoint()?;
        self.wait_compression()
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let p = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .ctx(&p)?;
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Config(format!(
            "{} is already open by another writer",
            dir.display()
        )));
    }
    Ok(f)
}

fn last_record_line(data: &[u8]) -> Option<&[u8]> {
    let body = data.strip_suffix(b"\n")?;
    let start = memchr::memrchr(b'\n', body).map(|i| i + 1)?;
    let line = &body[start..];
    // The header is not a record.
    split_line(line).map(|_| line)
}

fn quarantine(dir: &Path, seg: &SegmentFile, bytes: &[u8], now: OffsetDateTime) -> Result<PathBuf> {
    let q = dir.join("quarantine").join(format!(
        "{}.{}.torn",
        seg.name(),
        now.unix_timestamp_nanos()
    ));
    let mut f = File::create(&q).ctx(&q)?;
    f.write_all(bytes).ctx(&q)?;
    f.sync_all().ctx(&q)?;
    fsync_dir(&dir.join("quarantine"))?;
    Ok(q)
}

fn create_segment(
    cfg: &StoreConfig,
    first_seq: u64,
    prev: &[u8; 32],
    now: OffsetDateTime,
) -> Result<(File, PathBuf, u64)> {
    let p = segment_path(&cfg.dir, first_seq, false);
    let hdr = SegmentHeader {
        bulkhead_audit_segment: 1,
        first_seq,
        prev: to_hex(prev),
        created: format_ts(now),
        host: cfg.host.clone(),
    };
    let mut line = serde_json::to_vec(&hdr)?;
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&p)
        .ctx(&p)?;
    f.write_all(&line).ctx(&p)?;
    f.sync_all().ctx(&p)?;
    fsync_dir(&segments_dir(&cfg.dir))?;
    drop(f);
    let f = OpenOptions::new().append(true).open(&p).ctx(&p)?;
    Ok((f, p, line.len() as u64))
}

/// gzip a closed segment: write `.log.gz.tmp`, fsync, rename to `.log.gz`, fsync the directory,
/// remove the `.log`. Safe to interrupt at any point (see [`Store::open`]).
pub fn compress_segment(path: &Path) -> Result<PathBuf> {
    let gz = PathBuf::from(format!("{}.gz", path.display()));
    let tmp = PathBuf::from(format!("{}.gz.tmp", path.display()));
    let mut src = File::open(path).ctx(path)?;
    let out = File::create(&tmp).ctx(&tmp)?;
    let out = gzip(&mut src, out).ctx(&tmp)?;
    out.sync_all().ctx(&tmp)?;
    fs::rename(&tmp, &gz).ctx(&gz)?;
    let parent = path.parent().unwrap_or(Path::new("."));
    fsync_dir(parent)?;
    fs::remove_file(path).ctx(path)?;
    fsync_dir(parent)?;
    Ok(gz)
}

/// Write a standard single-member gzip file (RFC 1952; `zcat` reads it). The CRC-32 is
/// computed with `crc32fast` (PCLMULQDQ when available) rather than by the deflate backend.
pub fn gzip(src: &mut impl Read, dst: File) -> std::io::Result<File> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, dst);
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255 (unknown).
    w.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
    let mut crc = crc32fast::Hasher::new();
    let mut size: u32 = 0;
    let mut enc = flate2::write::DeflateEncoder::new(w, flate2::Compression::fast());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        size = size.wrapping_add(n as u32);
        enc.write_all(&buf[..n])?;
    }
    let mut w = enc.finish()?;
    w.write_all(&crc.finalize().to_le_bytes())?;
    w.write_all(&size.to_le_bytes())?;
    w.into_inner().map_err(|e| e.into_error())
}

/// Decompress a single-member gzip file, checking its CRC-32 and length.
pub fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    gunzip_into(data, &mut out)?;
    Ok(out)
}

/// [`gunzip`] into a cleared, reusable buffer.
pub fn gunzip_into(data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    if data.len() < 18 || data[0] != 0x1f || data[1] != 0x8b || data[2] != 8 {
        return Err(bad("not a gzip file"));
    }
    let flg = data[3];
    let mut pos = 10usize;
    if flg & 4 != 0 {
        let xlen = usize::from(u16::from_le_bytes([data[10], data[11]]));
        pos += 2 + xlen;
    }
    for bit in [8u8, 16] {
        if flg & bit != 0 {
            let z = data
                .get(pos..)
                .and_then(|d| memchr::memchr(0, d))
                .ok_or_else(|| bad("truncated gzip header"))?;
            pos += z + 1;
        }
    }
    if flg & 2 != 0 {
        pos += 2;
    }
    if pos + 8 > data.len() {
        return Err(bad("truncated gzip file"));
    }
    let t = data.len() - 8;
    let crc = u32::from_le_bytes([data[t], data[t + 1], data[t + 2], data[t + 3]]);
    let isize = u32::from_le_bytes([data[t + 4], data[t + 5], data[t + 6], data[t + 7]]);
    out.clear();
    out.reserve(isize as usize);
    flate2::read::DeflateDecoder::new(&data[pos..t]).read_to_end(out)?;
    if crc32fast::hash(out) != crc || out.len() as u32 != isize {
        return Err(bad("gzip CRC/length mismatch"));
    }
    Ok(())
}
