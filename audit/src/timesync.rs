//! Clock synchronisation state (the kernel's NTP discipline via `adjtimex(2)`, read-only).

use serde::{Deserialize, Serialize};

use crate::record::{ClockState, Event};

/// Offset beyond which the clock is reported as not synchronised, even if the kernel says it is.
pub const MAX_OFFSET_US: i64 = 500_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockStatus {
    pub synced: bool,
    pub offset_us: i64,
    pub max_error_us: i64,
    pub est_error_us: i64,
    /// Where the state came from.
    pub source: String,
    /// Why it is not synced, if it is not.
    pub problem: Option<String>,
}

impl ClockStatus {
    pub fn state(&self) -> ClockState {
        if self.source == "unavailable" {
            ClockState::Unknown
        } else if self.synced {
            ClockState::Synced
        } else {
            ClockState::Unsynced
        }
    }

    /// An audit record of this sample (the controller records one periodically and on change).
    pub fn event(&self) -> Event {
        Event::TimeSync {
            synced: self.synced,
            offset_us: self.offset_us,
            max_error_us: self.max_error_us,
            source: self.source.clone(),
        }
    }
}

/// Read the kernel clock discipline state (no modification: `modes = 0`).
pub fn clock_status() -> ClockStatus {
    // SAFETY: timex is plain old data; adjtimex with modes = 0 only reads.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = 0;
    let rc = unsafe { libc::adjtimex(&mut tx) };
    if rc < 0 {
        return ClockStatus {
            synced: false,
            offset_us: 0,
            max_error_us: 0,
            est_error_us: 0,
            source: "unavailable".into(),
            problem: Some(std::io::Error::last_os_error().to_string()),
        };
    }
    let nano = tx.status & libc::STA_NANO != 0;
    let offset_us = if nano { tx.offset / 1000 } else { tx.offset };
    let unsync = tx.status & libc::STA_UNSYNC != 0 || rc == libc::TIME_ERROR;
    let too_far = offset_us.abs() > MAX_OFFSET_US;
    ClockStatus {
        synced: !unsync && !too_far,
        offset_us,
        max_error_us: tx.maxerror,
        est_error_us: tx.esterror,
        source: "adjtimex".into(),
        problem: if unsync {
            Some("kernel reports the clock unsynchronised (STA_UNSYNC / TIME_ERROR): no NTP/PTP discipline".into())
        } else if too_far {
            Some(format!("offset {offset_us} us exceeds {MAX_OFFSET_US} us"))
        } else {
            None
        },
    }
}
