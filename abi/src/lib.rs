//! Layouts shared by the Bulkhead eBPF datapath and userspace.
//!
//! This crate is the *table contract*: the policy compiler produces exactly these entries,
//! the agent writes them into the pinned maps, and the eBPF program reads them. Every type is
//! `#[repr(C)]` with explicit padding so that both sides agree byte for byte; padding must be
//! zero in hash keys (constructors here zero it).
//!
//! The lookup semantics are described in ARCHITECTURE.md and implemented twice: in the eBPF
//! program and in [`model`] (userspace, feature `user`), which tests compare.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod consts;
#[cfg(feature = "user")]
pub mod model;
#[cfg(feature = "user")]
mod pod;
pub mod types;

pub use consts::*;
pub use types::*;
