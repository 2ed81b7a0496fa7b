#!/usr/bin/env bash
# Sets the machine up (idempotent), builds, and runs the demo: two hosts of namespace VMs,
# the controller on a git repository holding policies/, one agent per host. Run as root.
# Everything it creates is removed when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "building (release)…"
cargo build --release --quiet -p bulkhead-agent -p bulkhead-controller -p xtask
exec ./target/release/xtask demo "$@"
