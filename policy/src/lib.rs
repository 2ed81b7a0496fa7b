//! Bulkhead's policy language: the YAML types ([`model`]), loading and validation with
//! locations ([`load`]), its meaning for an inventory ([`resolve`]), the reference evaluator
//! ([`eval`]) and the compiler to the datapath's tables ([`compile`]).
pub mod compile;
pub mod eval;
pub mod load;
pub mod model;
pub mod resolve;

use std::collections::BTreeMap;

use bulkhead_abi::model::HostTables;

pub use load::{load_dir, load_sources, Diagnostic, PolicySet};
pub use model::{Inventory, VmRecord};

/// Compile a validated policy set for an inventory: tables per host.
pub fn compile(set: &PolicySet, inventory: &Inventory) -> BTreeMap<String, HostTables> {
    compile::compile_all(&resolve::Resolved::new(set, inventory))
}
