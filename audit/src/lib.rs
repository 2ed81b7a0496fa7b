//! Bulkhead audit trail: chained append-only store, verification, exports, SIEM forwarding,
//! roles, alert derivation, flow aggregation and the MLPS Level 3 compliance report.
//!
//! See `ARCHITECTURE-audit.md` for the formats and guarantees.

pub mod alerts;
pub mod cli;
pub mod error;
pub mod export;
pub mod flow;
pub mod forward;
pub mod record;
pub mod recorder;
pub mod report;
pub mod roles;
pub mod store;
pub mod timesync;
pub mod verify;

pub use error::{Error, Result};
pub use record::{Event, Outcome, Record};
pub use store::{Store, StoreConfig};
pub use verify::{verify, VerifyReport};
