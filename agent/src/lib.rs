//! The Bulkhead host agent (see `bulkhead-agent --help` and ARCHITECTURE.md).
pub mod enforcer;
pub mod flows;
pub mod inventory;
pub mod metrics;
pub mod netwatch;
pub mod session;
