//! The Bulkhead datapath: two TC programs per VM interface (tap).
//!
//! `from_vm` runs at the tap's TC ingress hook (the VM sending, `DIR_EGRESS`), `to_vm` at its
//! TC egress hook (traffic to the VM, `DIR_INGRESS`). Both share every map. The table
//! contract and lookup semantics live in `bulkhead-abi` and ARCHITECTURE.md.
//!
//! Rules for this crate: no panic paths (no slice indexing that can fail), packet access
//! through `bpf_skb_load_bytes` (bounds-checked, and it reads non-linear skbs too) except the
//! flow cache's direct loads of linear headers (bounds-checked against `data_end`, and a
//! packet whose headers are not linear misses the cache), no logging, small stack.
#![no_std]
#![no_main]
// One-instruction unaligned packet loads (`flowcache::pkt`).
#![feature(asm_experimental_arch)]

mod conntrack;
mod datapath;
mod events;
mod fast;
mod flowcache;
mod maps;
mod parse;
mod policy;
mod reject;

use aya_ebpf::{macros::classifier, programs::TcContext};
use bulkhead_abi::{DIR_EGRESS, DIR_INGRESS};

#[classifier]
pub fn from_vm(ctx: TcContext) -> i32 {
    datapath::run(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn to_vm(ctx: TcContext) -> i32 {
    datapath::run(&ctx, DIR_INGRESS)
}

/// Passes everything: the benchmarks' baseline (the cost of running any TC program at all).
/// Never attached by the loader.
#[classifier]
pub fn bench_baseline(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

/// Adds the flow cache's pending hits on this CPU to the counters and returns the CPU.
/// Never attached: userspace runs it on each CPU (`BPF_PROG_TEST_RUN` on a dummy frame)
/// before it reads counters. A TC program rather than a raw tracepoint because the kernel
/// runs TC test runs with bottom halves disabled: no TC program runs on the CPU meanwhile,
/// on `PREEMPT_RT` kernels too.
#[classifier]
pub fn flush_flow_counts(_ctx: TcContext) -> i32 {
    flowcache::flush_all() as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program with a reachable panic path.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
