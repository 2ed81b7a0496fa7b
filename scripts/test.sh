#!/usr/bin/env bash
# Sets the machine up (idempotent) and runs every test that has landed.
# Privileged tests (eBPF loaded into this kernel) run as root and skip with a message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt -p bulkhead-abi -p bulkhead-datapath -p bulkhead-testbed -- --check
cargo clippy -p bulkhead-abi -p bulkhead-datapath -p bulkhead-testbed --all-targets -- -D warnings
cargo test -p bulkhead-abi --features user
cargo test -p bulkhead-datapath
