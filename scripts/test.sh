#!/usr/bin/env bash
# Sets the machine up (idempotent) and runs every test that has landed.
# Privileged tests (eBPF loaded into this kernel, network namespaces, agents) run as root and
# print "SKIPPED ..." otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
CRATES=(-p bulkhead-abi -p bulkhead-datapath -p bulkhead-testbed -p bulkhead-wire
  -p bulkhead-policy -p bulkhead-cli -p bulkhead-agent -p bulkhead-controller -p bulkhead-e2e -p bulkhead-audit -p xtask)
cargo fmt "${CRATES[@]}" -p bulkhead-ebpf -- --check
cargo clippy "${CRATES[@]}" --all-targets -- -D warnings
# The end-to-end tests run the real binaries.
cargo build -p bulkhead-agent -p bulkhead-controller -p bulkhead-cli
cargo test -p bulkhead-abi --features user
cargo test "${CRATES[@]:2}"
# The example policy repository must stay valid and lint-clean.
cargo run -q -p bulkhead-cli -- policy validate -p policies
cargo run -q -p bulkhead-cli -- policy lint -p policies --deny-findings
# The benchmarks must keep working: short smoke runs (full runs: BENCHMARKS.md).
BENCH_QUICK=1 cargo bench -p bulkhead-datapath --bench datapath -- testrun events rr-interleaved stream-interleaved
cargo run --release -q -p bulkhead-policy --example bench -- 1000 50 200 10 10
cargo run --release -q -p bulkhead-controller --example fanout -- 20
cargo build --release -q -p bulkhead-controller
cargo run --release -q -p bulkhead-e2e --example flow_pipeline -- 20000 2 2
