#![no_std]
//! Library half of the eBPF crate: lets userspace crates depend on it so cargo rebuilds the
//! eBPF object when it changes. The programs are in `main.rs`.
