#!/usr/bin/env bash
# Sets the machine up (idempotent) and runs every test that has landed.
# Privileged tests (eBPF loaded into this kernel, network namespaces) run as root and print
# "SKIPPED ..." otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
CRATES=(-p bulkhead-abi -p bulkhead-datapath -p bulkhead-testbed -p xtask)
cargo fmt "${CRATES[@]}" -- --check
cargo clippy "${CRATES[@]}" --all-targets -- -D warnings
cargo test -p bulkhead-abi --features user
cargo test -p bulkhead-datapath -p bulkhead-testbed
# The benchmark binary must keep working: a short smoke run of its TestRun part.
BENCH_QUICK=1 cargo bench -p bulkhead-datapath --bench datapath -- testrun
