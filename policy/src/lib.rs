//! Bulkhead policy as code: the YAML language ([`types`]), its loader and validator
//! ([`load`]), the compiler to the datapath tables ([`compile`]), a reference evaluator
//! ([`eval`]), the linter ([`lint`]) and plan/diff ([`plan`]).
pub mod compile;
pub mod eval;
pub mod export;
pub mod incremental;
pub mod lint;
pub mod load;
pub mod net;
pub mod plan;
pub mod types;

pub use bulkhead_abi::port_kind;
pub use compile::{compile, compile_host, Compiled, HostOutput};
pub use eval::{evaluate, Decision};
pub use load::{load_dir, load_sources, Diagnostic, LoadError, Resolved, Source};
pub use types::{Interface, Inventory, PolicyFile, Vm};

/// JSON Schema of a policy file, generated from the types.
pub fn policy_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(types::PolicyFile)).unwrap_or_default()
}

/// JSON Schema of the inventory file.
pub fn inventory_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(types::Inventory)).unwrap_or_default()
}
