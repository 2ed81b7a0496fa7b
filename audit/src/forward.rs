//! Forwarding to a SIEM: syslog RFC 5424 over TCP with octet-counting framing (RFC 6587 §3.4.1)
//! or over TLS (RFC 5425), payload JSON (the stored record line) or CEF.
//!
//! The store is the spool: records are durable before they are forwarded, and the forwarder
//! only keeps a cursor (`forward-<name>.cursor`, the next seq to deliver). Delivery is
//! **at least once**: syslog over TCP/TLS has no application acknowledgement, so a batch is
//! only *confirmed* (and the cursor persisted past it) once the connection has stayed healthy
//! for `confirm_after` after writing it. When a connection breaks, everything unconfirmed is
//! re-sent on the next connection; duplicates are possible and carry the same `seq` (in the
//! structured data and in the payload), so a SIEM can de-duplicate.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoCtx, Result};
use crate::record::{Event, Outcome, Record};
use crate::store::{list_segments, split_line};

/// Syslog facility 13 ("log audit").
pub const FACILITY_LOG_AUDIT: u8 = 13;
/// Private enterprise number used in structured data. 32473 is the RFC 5612 documentation
/// number: replace with Bulkhead's own PEN once assigned.
pub const SD_PEN: u32 = 32473;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    Json,
    Cef,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Transport {
    Tcp,
    Tls {
        /// CA bundle (PEM) that signs the SIEM's certificate.
        ca: PathBuf,
        /// Client certificate chain and key (PEM) for mutual TLS.
        client: Option<(PathBuf, PathBuf)>,
        /// Name to verify in the server certificate (DNS name or IP address).
        server_name: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardConfig {
    /// Cursor file name component.
    pub name: String,
    /// `host:port`.
    pub addr: String,
    pub transport: Transport,
    pub payload: Payload,
    pub app_name: String,
    pub max_batch: usize,
    pub confirm_after: Duration,
    pub io_timeout: Duration,
}

impl ForwardConfig {
    pub fn new(name: &str, addr: &str, transport: Transport, payload: Payload) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
            transport,
            payload,
            app_name: "bulkhead".into(),
            max_batch: 1000,
            confirm_after: Duration::from_millis(1000),
            io_timeout: Duration::from_secs(5),
        }
    }
}

fn severity(r: &Record) -> u8 {
    match (&r.detail, r.outcome) {
        (Event::Alert(_), _) => 1,             // alert
        (Event::StoreRepaired { .. }, _) => 3, // error
        (_, Outcome::Failure) => 4,            // warning
        (Event::FlowVerdict(f), _) if f.verdict == "deny" || f.verdict == "reject" => 5,
        (Event::VmUncovered { .. } | Event::InterfaceUnenforced { .. }, _) => 4,
        (Event::EventsDropped { .. }, _) => 4,
        _ => 6, // informational
    }
}

fn sd_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

fn header_token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

/// CEF timestamps: milliseconds since the epoch (accepted by every CEF consumer).
fn cef_time(ts: &str) -> String {
    crate::record::parse_ts(ts)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000).to_string())
        .unwrap_or_default()
}

fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

fn cef_ext(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\r', "\\r")
        .replace('\n', "\\n")
}

/// CEF rendering of a record.
pub fn cef(r: &Record) -> String {
    let sev = match severity(r) {
        0..=1 => 9,
        2..=3 => 7,
        4 => 5,
        5 => 3,
        _ => 1,
    };
    let name = match &r.detail {
        Event::FlowVerdict(f) => format!("flow {}", f.verdict),
        Event::Alert(a) => format!("alert {}", a.attack),
        Event::AdminAction { operation, .. } => format!("admin {operation}"),
        _ => r.kind.replace('_', " "),
    };
    let mut ext: Vec<(&str, String)> = vec![
        ("rt", cef_time(&r.ts)),
        ("dvchost", r.host.clone()),
        ("externalId", r.seq.to_string()),
        ("outcome", r.outcome.as_str().into()),
        ("suser", r.subject.clone()),
    ];
    match &r.detail {
        Event::FlowVerdict(f) => {
            ext.extend([
                ("act", f.verdict.clone()),
                ("src", f.src_ip.clone()),
                ("dst", f.dst_ip.clone()),
                ("spt", f.src_port.to_string()),
                ("dpt", f.dst_port.to_string()),
                ("proto", f.proto.to_string()),
                (
                    "deviceDirection",
                    if f.direction == "ingress" { "0" } else { "1" }.into(),
                ),
                ("cnt", f.packets.to_string()),
                ("in", f.bytes.to_string()),
                ("cs1Label", "vm".into()),
                ("cs1", f.vm.clone()),
                ("cs2Label", "rule".into()),
                (
                    "cs2",
                    f.rule_name.clone().unwrap_or_else(|| f.rule.to_string()),
                ),
                ("cs3Label", "policy".into()),
                ("cs3", f.policy.clone().unwrap_or_default()),
                ("shost", f.src_vm.clone().unwrap_or_default()),
                ("dhost", f.dst_vm.clone().unwrap_or_default()),
                ("start", cef_time(&f.first_seen)),
                ("end", cef_time(&f.last_seen)),
            ]);
        }
        Event::Alert(a) => ext.extend([
            ("cat", a.attack.clone()),
            ("src", a.source_ip.clone()),
            ("shost", a.source_vm.clone().unwrap_or_default()),
            ("dst", a.target.clone()),
            ("cnt", a.count.to_string()),
            ("start", cef_time(&a.first_seen)),
            ("end", cef_time(&a.last_seen)),
            ("msg", a.detail.clone()),
        ]),
        Event::AdminAction {
            role,
            source,
            operation,
            object,
            reason,
            ..
        } => ext.extend([
            ("act", operation.clone()),
            ("src", source.clone()),
            ("duser", object.clone()),
            ("cs1Label", "role".into()),
            (
                "cs1",
                role.map(|r| r.as_str().to_string()).unwrap_or_default(),
            ),
            ("reason", reason.clone().unwrap_or_default()),
        ]),
        _ => ext.push(("msg", serde_json::to_string(&r.detail).unwrap_or_default())),
    }
    let ext: Vec<String> = ext
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", cef_ext(&v)))
        .collect();
    format!(
        "CEF:0|Bulkhead|Bulkhead DFW|{}|{}|{}|{sev}|{}",
        env!("CARGO_PKG_VERSION"),
        cef_header(&r.kind),
        cef_header(&name),
        ext.join(" ")
    )
}

/// One RFC 5424 message (without framing) for a stored line.
pub fn syslog_message(r: &Record, line: &[u8], payload: Payload, app: &str) -> Vec<u8> {
    let pri = u16::from(FACILITY_LOG_AUDIT) * 8 + u16::from(severity(r));
    let hash = split_line(line)
        .map(|p| crate::store::to_hex(&p.hash))
        .unwrap_or_default();
    let mut m = format!(
        "<{pri}>1 {} {} {} - {} [bulkhead@{SD_PEN} seq=\"{}\" type=\"{}\" h=\"{}\"] ",
        header_token(&r.ts, 64),
        header_token(&r.host, 255),
        header_token(app, 48),
        header_token(&r.kind, 32),
        r.seq,
        sd_escape(&r.kind),
        hash
    )
    .into_bytes();
    match payload {
        Payload::Json => m.extend_from_slice(line),
        Payload::Cef => m.extend_from_slice(cef(r).as_bytes()),
    }
    m
}

/// Octet-counting frame: `MSG-LEN SP SYSLOG-MSG`.
pub fn frame(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

enum Conn {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.write_all(b)?;
                s.flush()
            }
            Conn::Tls(s) => {
                s.write_all(b)?;
                s.flush()
            }
        }
    }

    /// Whether the peer is still there (no EOF, no error pending). Non-destructive for TCP.
    fn alive(&mut self) -> bool {
        let sock = match self {
            Conn::Tcp(s) => s,
            Conn::Tls(s) => &mut s.sock,
        };
        if sock.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 512];
        let r = match self {
            Conn::Tcp(s) => s.peek(&mut b),
            Conn::Tls(s) => s.read(&mut b),
        };
        let ok = match r {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(_) => false,
        };
        let sock = match self {
            Conn::Tcp(s) => s,
            Conn::Tls(s) => &mut s.sock,
        };
        ok && sock.set_nonblocking(false).is_ok()
    }
}

fn tls_config(transport: &Transport) -> Result<Arc<rustls::ClientConfig>> {
    let Transport::Tls { ca, client, .. } = transport else {
        return Err(Error::Tls("not a TLS transport".into()));
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
    for c in certs {
        let c = c.map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?;
            b.with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(e.to_string()))?
        }
    };
    Ok(Arc::new(cfg))
}

/// Forwarding state, for status pages and the compliance report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForwardStatus {
    pub name: String,
    pub addr: String,
    pub transport: String,
    pub payload: String,
    /// Next seq not yet confirmed delivered (persisted).
    pub confirmed: u64,
    /// Next seq not yet written to the connection.
    pub sent: u64,
    pub connected: bool,
    pub last_error: Option<String>,
    pub reconnects: u64,
    pub resent: u64,
    /// Records removed by retention before they could be forwarded (never silently).
    pub skipped_purged: u64,
    /// When the forwarder last wrote this status (its `forward-<name>.status.json` in the
    /// store directory, read by the compliance report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// The status files forwarders keep in a store directory (`forward-<name>.status.json`).
pub fn read_statuses(store_dir: &Path) -> Vec<ForwardStatus> {
    let Ok(entries) = fs::read_dir(store_dir) else {
        return Vec::new();
    };
    let mut out: Vec<ForwardStatus> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("forward-") && n.ends_with(".status.json"))
        })
        .filter_map(|p| fs::read_to_string(p).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Reads records from the store incrementally.
struct Tail {
    dir: PathBuf,
    next_seq: u64,
    /// Records purged by retention before they were forwarded.
    skipped: u64,
    /// Current segment: first seq, file (for a .log) or decompressed data, read position.
    cur: Option<(u64, Option<File>, Vec<u8>, usize)>,
}

impl Tail {
    fn new(dir: &Path, next_seq: u64) -> Self {
        Tail {
            dir: dir.to_path_buf(),
            next_seq,
            skipped: 0,
            cur: None,
        }
    }

    fn seek(&mut self, seq: u64) {
        self.next_seq = seq;
        self.cur = None;
    }

    fn open_for(&mut self, seq: u64) -> Result<bool> {
        let segs = list_segments(&self.dir)?;
        let i = match segs.iter().rposition(|s| s.first_seq <= seq) {
            Some(i) => i,
            None => match segs.first() {
                // The cursor points before the oldest retained segment: those records were
                // purged by retention before they could be forwarded. Skip them, counted.
                Some(first) if first.first_seq > seq => {
                    self.skipped += first.first_seq - seq;
                    self.next_seq = first.first_seq;
                    0
                }
                _ => return Ok(false),
            },
        };
        let s = &segs[i];
        if s.compressed {
            self.cur = Some((s.first_seq, None, s.read_all()?, 0));
        } else {
            let f = File::open(&s.path).ctx(&s.path)?;
            self.cur = Some((s.first_seq, Some(f), Vec::new(), 0));
        }
        Ok(true)
    }

    /// Up to `max` complete records from `next_seq` on.
    fn read(&mut self, max: usize) -> Result<Vec<(Record, Vec<u8>)>> {
        let mut out = Vec::new();
        for _attempt in 0..3 {
            if self.cur.is_none() && !self.open_for(self.next_seq)? {
                return Ok(out);
            }
            let Some((first, file, data, pos)) = self.cur.as_mut() else {
                return Ok(out);
            };
            if let Some(f) = file {
                f.read_to_end(data).map_err(Error::IoBare)?;
            }
            while out.len() < max {
                let Some(rel) = memchr::memchr(b'\n', &data[*pos..]) else {
                    break;
                };
                let line = &data[*pos..*pos + rel];
                *pos += rel + 1;
                let Some(parts) = split_line(line) else {
                    continue; // header
                };
                if parts.seq < self.next_seq {
                    continue;
                }
                if parts.seq > self.next_seq {
                    return Err(Error::Corrupt(format!(
                        "forwarding: expected seq {} but found {} (run audit verify)",
                        self.next_seq, parts.seq
                    )));
                }
                let rec: Record = serde_json::from_slice(line)?;
                out.push((rec, line.to_vec()));
                self.next_seq += 1;
            }
            // Compact consumed bytes of a growing file.
            if *pos > (1 << 20) && file.is_some() {
                data.drain(..*pos);
                *pos = 0;
            }
            if !out.is_empty() {
                return Ok(out);
            }
            // Nothing new here: has the store moved on to a newer segment?
            let first = *first;
            let newer = list_segments(&self.dir)?
                .iter()
                .any(|s| s.first_seq > first && s.first_seq <= self.next_seq);
            if !newer {
                return Ok(out);
            }
            self.cur = None;
        }
        Ok(out)
    }
}

/// A syslog forwarder reading from a store directory.
pub struct Forwarder {
    cfg: ForwardConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    dir: PathBuf,
    cursor_path: PathBuf,
    conn: Option<Conn>,
    tail: Tail,
    /// (next seq after the batch, time written) of unconfirmed batches.
    unconfirmed: Vec<(u64, Instant)>,
    status: ForwardStatus,
}

impl Forwarder {
    pub fn new(store_dir: &Path, cfg: ForwardConfig) -> Result<Self> {
        if cfg.name.is_empty() || cfg.name.contains(['/', '\\']) {
            return Err(Error::Config(format!("bad forwarder name {:?}", cfg.name)));
        }
        let tls = match &cfg.transport {
            Transport::Tcp => None,
            t => Some(tls_config(t)?),
        };
        let cursor_path = store_dir.join(format!("forward-{}.cursor", cfg.name));
        let confirmed = match fs::read_to_string(&cursor_path) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|e| Error::Corrupt(format!("{}: {e}", cursor_path.display())))?,
            Err(e) if e.kind() == ErrorKind::NotFound => 0,
            Err(e) => return Err(e).ctx(&cursor_path),
        };
        let status = ForwardStatus {
            name: cfg.name.clone(),
            addr: cfg.addr.clone(),
            transport: match cfg.transport {
                Transport::Tcp => "tcp (RFC 6587 octet counting)".into(),
                Transport::Tls { .. } => "tls (RFC 5425)".into(),
            },
            payload: format!("{:?}", cfg.payload).to_lowercase(),
            confirmed,
            sent: confirmed,
            ..Default::default()
        };
        Ok(Forwarder {
            tail: Tail::new(store_dir, confirmed),
            cfg,
            tls,
            dir: store_dir.to_path_buf(),
            cursor_path,
            conn: None,
            unconfirmed: Vec::new(),
            status,
        })
    }

    pub fn status(&self) -> &ForwardStatus {
        &self.status
    }

    fn connect(&mut self) -> Result<()> {
        let addr = self
            .cfg
            .addr
            .to_socket_addrs()
            .map_err(|e| Error::Forward(format!("{}: {e}", self.cfg.addr)))?
            .next()
            .ok_or_else(|| Error::Forward(format!("{}: no address", self.cfg.addr)))?;
        let sock = TcpStream::connect_timeout(&addr, self.cfg.io_timeout)
            .map_err(|e| Error::Forward(format!("connect {addr}: {e}")))?;
        sock.set_write_timeout(Some(self.cfg.io_timeout))
            .map_err(Error::IoBare)?;
        sock.set_read_timeout(Some(self.cfg.io_timeout))
            .map_err(Error::IoBare)?;
        let _ = sock.set_nodelay(true);
        let conn = match (&self.cfg.transport, &self.tls) {
            (Transport::Tls { server_name, .. }, Some(cfg)) => {
                let name = ServerName::try_from(server_name.clone())
                    .map_err(|e| Error::Tls(format!("server name {server_name:?}: {e}")))?;
                let c = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| Error::Tls(e.to_string()))?;
                let mut s = rustls::StreamOwned::new(c, sock);
                while s.conn.is_handshaking() {
                    s.conn
                        .complete_io(&mut s.sock)
                        .map_err(|e| Error::Tls(format!("handshake with {addr}: {e}")))?;
                }
                Conn::Tls(Box::new(s))
            }
            _ => Conn::Tcp(sock),
        };
        self.conn = Some(conn);
        self.status.connected = true;
        Ok(())
    }

    fn persist_cursor(&mut self, seq: u64) -> Result<()> {
        if seq == self.status.confirmed {
            return Ok(());
        }
        let tmp = self.cursor_path.with_extension("cursor.tmp");
        fs::write(&tmp, format!("{seq}\n")).ctx(&tmp)?;
        fs::rename(&tmp, &self.cursor_path).ctx(&self.cursor_path)?;
        self.status.confirmed = seq;
        self.write_status();
        Ok(())
    }

    /// Publish the status for the compliance report (best effort, no fsync: the cursor is
    /// what delivery relies on; this is information).
    fn write_status(&mut self) {
        self.status.updated_at = Some(crate::record::format_ts(time::OffsetDateTime::now_utc()));
        let path = self
            .dir
            .join(format!("forward-{}.status.json", self.cfg.name));
        let tmp = path.with_extension("json.tmp");
        if let Ok(text) = serde_json::to_string_pretty(&self.status) {
            if fs::write(&tmp, text).is_ok() {
                let _ = fs::rename(&tmp, &path);
            }
        }
    }

    fn drop_conn(&mut self, err: &Error) {
        self.conn = None;
        self.status.connected = false;
        self.status.last_error = Some(err.to_string());
        // Everything unconfirmed goes again on the next connection.
        if self.status.sent > self.status.confirmed {
            self.status.resent += self.status.sent - self.status.confirmed;
        }
        self.unconfirmed.clear();
        self.status.sent = self.status.confirmed;
        self.tail.seek(self.status.confirmed);
        self.write_status();
    }

    /// Confirm batches that have been on a healthy connection for `confirm_after`.
    fn confirm(&mut self, force_all: bool) -> Result<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if !conn.alive() {
            let e = Error::Forward("connection closed by the SIEM".into());
            self.drop_conn(&e);
            return Err(e);
        }
        let mut upto = None;
        self.unconfirmed.retain(|(seq, at)| {
            if force_all || at.elapsed() >= self.cfg.confirm_after {
                upto = Some(*seq);
                false
            } else {
                true
            }
        });
        if let Some(s) = upto {
            self.persist_cursor(s)?;
        }
        Ok(())
    }

    /// Send everything available. Returns the number of records written to the connection.
    /// On a connection error, the connection is dropped and unconfirmed records are re-queued.
    pub fn pump(&mut self) -> Result<u64> {
        let r = self.pump_inner();
        if let Err(e) = &r {
            if !matches!(e, Error::Corrupt(_)) {
                self.drop_conn(e);
            }
        }
        r
    }

    fn pump_inner(&mut self) -> Result<u64> {
        if self.conn.is_none() {
            self.connect()?;
            self.status.reconnects += 1;
        }
        self.confirm(false)?;
        let mut sent = 0u64;
        loop {
            let recs = self.tail.read(self.cfg.max_batch)?;
            if recs.is_empty() {
                break;
            }
            let mut buf = Vec::with_capacity(recs.len() * 600);
            for (r, line) in &recs {
                frame(
                    &syslog_message(r, line, self.cfg.payload, &self.cfg.app_name),
                    &mut buf,
                );
            }
            let conn = self
                .conn
                .as_mut()
                .ok_or_else(|| Error::Forward("not connected".into()))?;
            conn.write_all(&buf)
                .map_err(|e| Error::Forward(format!("send: {e}")))?;
            sent += recs.len() as u64;
            self.status.sent = self.tail.next_seq;
            self.status.skipped_purged = self.tail.skipped;
            self.unconfirmed.push((self.tail.next_seq, Instant::now()));
        }
        Ok(sent)
    }

    /// Wait until everything sent is confirmed (or the connection fails).
    pub fn settle(&mut self) -> Result<()> {
        if !self.unconfirmed.is_empty() {
            std::thread::sleep(self.cfg.confirm_after);
        }
        self.confirm(false)
    }

    /// Forward until `stop`, polling the store every `poll`, backing off on errors.
    pub fn run(&mut self, stop: &AtomicBool, poll: Duration) {
        let mut backoff = poll;
        while !stop.load(Ordering::Relaxed) {
            match self.pump() {
                Ok(_) => {
                    backoff = poll;
                    std::thread::sleep(poll);
                }
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let _ = self.confirm(false);
    }

    pub fn store_dir(&self) -> &Path {
        &self.dir
    }
}
