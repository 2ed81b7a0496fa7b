#!/usr/bin/env bash
# Sets the machine up (idempotent) and runs the demo: namespace VMs on a bridge enforced by
# the real eBPF datapath. Run as root. Everything it creates is removed when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo xtask demo "$@"
