//! Exports for assessors and tools: JSON lines (the stored lines, chain hash included) and CSV,
//! filtered by time, type, VM, host, rule, plus the 8.1.3.5 d views (internet-bound and
//! remote-administration flows).

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::record::{parse_ts, Event, Record};
use crate::store::{list_segments, split_line};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

/// Export filter; every set criterion must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
    /// Record types (`flow_verdict`, `admin_action`, …); empty = all.
    pub types: Vec<String>,
    pub vm: Option<String>,
    pub host: Option<String>,
    /// Rule index, rule name or policy name.
    pub rule: Option<String>,
    pub subject: Option<String>,
    /// Only flows to/from public (internet) addresses.
    pub internet: bool,
    /// Only remote administration flows (SSH 22, RDP 3389, VNC 5900, WinRM 5985/5986).
    pub remote_admin: bool,
}

pub const REMOTE_ADMIN_PORTS: [u16; 5] = [22, 3389, 5900, 5985, 5986];

/// Whether an address is public (not private, loopback, link-local, CGNAT, ULA, …).
pub fn is_public(ip: &str) -> bool {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            let o = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        Ok(IpAddr::V6(a)) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(&v4.to_string());
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
        Err(_) => false,
    }
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        if self.from.is_some() || self.to.is_some() {
            let Some(t) = r.time() else { return false };
            if self.from.is_some_and(|f| t < f) || self.to.is_some_and(|x| t >= x) {
                return false;
            }
        }
        if !self.types.is_empty() && !self.types.contains(&r.kind) {
            return false;
        }
        if let Some(vm) = &self.vm {
            if !r.detail.vms().contains(&vm.as_str()) {
                return false;
            }
        }
        if let Some(h) = &self.host {
            if r.host != *h && r.detail.host() != Some(h.as_str()) {
                return false;
            }
        }
        if let Some(rule) = &self.rule {
            if !r.detail.rules().iter().any(|x| x == rule) {
                return false;
            }
        }
        if let Some(s) = &self.subject {
            if r.subject != *s {
                return false;
            }
        }
        if self.internet || self.remote_admin {
            let Event::FlowVerdict(f) = &r.detail else {
                return false;
            };
            if self.internet && !(is_public(&f.src_ip) || is_public(&f.dst_ip)) {
                return false;
            }
            if self.remote_admin && !REMOTE_ADMIN_PORTS.contains(&f.dst_port) {
                return false;
            }
        }
        true
    }
}

/// Walk every record from `from_seq` on, in order. `f` gets the decoded record and the raw
/// stored line; it returns `false` to stop. Unreadable lines are an error (run `verify`).
pub fn for_each_record(
    dir: &Path,
    from_seq: u64,
    mut f: impl FnMut(&Record, &[u8]) -> Result<bool>,
) -> Result<()> {
    let segs = list_segments(dir)?;
    let start = segs
        .iter()
        .rposition(|s| s.first_seq <= from_seq)
        .unwrap_or(0);
    for seg in &segs[start..] {
        let data = seg.read_all()?;
        for (i, line) in data.split(|&c| c == b'\n').enumerate() {
            if i == 0 || line.is_empty() {
                continue;
            }
            let Some(parts) = split_line(line) else {
                return Err(Error::Corrupt(format!(
                    "{} line {}: not a record",
                    seg.name(),
                    i + 1
                )));
            };
            if parts.seq < from_seq {
                continue;
            }
            let rec: Record = serde_json::from_slice(line)
                .map_err(|e| Error::Corrupt(format!("{} line {}: {e}", seg.name(), i + 1)))?;
            if !f(&rec, line)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

pub const CSV_COLUMNS: [&str; 31] = [
    "seq",
    "ts",
    "host",
    "clock",
    "type",
    "subject",
    "outcome",
    "role",
    "source",
    "operation",
    "object",
    "vm",
    "src_vm",
    "dst_vm",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "proto",
    "direction",
    "verdict",
    "reason",
    "tier",
    "policy",
    "rule",
    "rule_name",
    "packets",
    "bytes",
    "first_seen",
    "last_seen",
    "detail",
];

/// Append `v` as one CSV field (RFC 4180 quoting).
pub fn csv_field(out: &mut String, v: &str) {
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

/// One CSV row for a record (columns [`CSV_COLUMNS`]).
pub fn csv_row(r: &Record) -> String {
    let mut c: Vec<String> = vec![String::new(); CSV_COLUMNS.len()];
    c[0] = r.seq.to_string();
    c[1] = r.ts.clone();
    c[2] = r.host.clone();
    c[3] = serde_json::to_value(r.clock)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    c[4] = r.kind.clone();
    c[5] = r.subject.clone();
    c[6] = r.outcome.as_str().into();
    match &r.detail {
        Event::AdminAction {
            role,
            source,
            operation,
            object,
            ..
        } => {
            c[7] = role.map(|x| x.as_str().to_string()).unwrap_or_default();
            c[8] = source.clone();
            c[9] = operation.clone();
            c[10] = object.clone();
        }
        Event::FlowVerdict(f) => {
            c[11] = f.vm.clone();
            c[12] = f.src_vm.clone().unwrap_or_default();
            c[13] = f.dst_vm.clone().unwrap_or_default();
            c[14] = f.src_ip.clone();
            c[15] = f.src_port.to_string();
            c[16] = f.dst_ip.clone();
            c[17] = f.dst_port.to_string();
            c[18] = f.proto.to_string();
            c[19] = f.direction.clone();
            c[20] = f.verdict.clone();
            c[21] = f.reason.clone();
            c[22] = f.tier.clone().unwrap_or_default();
            c[23] = f.policy.clone().unwrap_or_default();
            c[24] = f.rule.to_string();
            c[25] = f.rule_name.clone().unwrap_or_default();
            c[26] = f.packets.to_string();
            c[27] = f.bytes.to_string();
            c[28] = f.first_seen.clone();
            c[29] = f.last_seen.clone();
        }
        Event::Alert(a) => {
            c[11] = a.source_vm.clone().unwrap_or_default();
            c[12] = a.source_vm.clone().unwrap_or_default();
            c[14] = a.source_ip.clone();
            c[16] = a.target.clone();
            c[21] = a.attack.clone();
            c[26] = a.count.to_string();
            c[28] = a.first_seen.clone();
            c[29] = a.last_seen.clone();
        }
        _ => {}
    }
    c[30] = serde_json::to_string(&r.detail).unwrap_or_default();
    let mut s = String::new();
    for (i, v) in c.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        csv_field(&mut s, v);
    }
    s
}

/// Export matching records. Returns the number written.
pub fn export(dir: &Path, filter: &Filter, format: Format, out: &mut dyn Write) -> Result<u64> {
    let mut n = 0u64;
    if format == Format::Csv {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    for_each_record(dir, 0, |r, line| {
        if filter.matches(r) {
            match format {
                Format::Jsonl => {
                    out.write_all(line)?;
                    out.write_all(b"\n")?;
                }
                Format::Csv => writeln!(out, "{}", csv_row(r))?,
            }
            n += 1;
        }
        Ok(true)
    })?;
    out.flush()?;
    Ok(n)
}

/// Parse a CLI time bound: RFC 3339, or a date `YYYY-MM-DD` (UTC midnight).
pub fn parse_time_arg(s: &str) -> Option<OffsetDateTime> {
    parse_ts(s).or_else(|| parse_ts(&format!("{s}T00:00:00Z")))
}
