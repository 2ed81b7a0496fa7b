//! Reading flow events from the `EVENTS` ring buffer.
//!
//! Events the kernel could not deliver (per-endpoint rate limit, full ring) are counted in
//! `EP_STATS.events_suppressed`, `DP_STATS` and in the next delivered event's
//! `suppressed_before`, so a reader always knows how many it did not see.
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use bulkhead_abi::FlowEvent;

/// Decode one ring-buffer record; `None` if it is not a whole event (never expected: the
/// kernel side writes only `FlowEvent`s).
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < core::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is repr(C) plain data; length checked; read_unaligned copes with the
    // ring's 8-byte alignment not being guaranteed to match.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// A blocking reader over the ring buffer, for a dedicated thread.
pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Records that did not decode (a layout mismatch would show here, never silently).
    pub undecodable: u64,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            undecodable: 0,
        }
    }

    /// Hand every event now in the ring to `f`; returns how many.
    pub fn drain(&mut self, mut f: impl FnMut(FlowEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            match decode(&item) {
                Some(ev) => {
                    f(ev);
                    n += 1;
                }
                None => self.undecodable += 1,
            }
        }
        n
    }

    /// Wait until the ring has data or `timeout` passes; true if readable.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0 && pfd.revents & libc::POLLIN != 0
    }
}
