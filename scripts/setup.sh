#!/usr/bin/env bash
# Installs everything Bulkhead needs on a fresh Debian (bookworm) machine.
# Idempotent: each step checks first and says what it does; a second run takes seconds.
# Versions are pinned as measured in ../shared/notes/toolchain.md.
set -euo pipefail

STABLE=1.98.0
NIGHTLY=nightly-2026-08-01
BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
APT_PACKAGES=(
  "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" libzstd-dev zlib1g-dev # bpf-linker
  protobuf-compiler      # tonic-build (controller/agent gRPC)
  iproute2 iptables iperf3 ethtool util-linux iputils-ping # namespace tests, iptables baseline, throughput bench
  git rsyslog rsyslog-gnutls openssl # policy repo, SIEM tests
)

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (installs Debian packages)" >&2
    exit 1
  fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

if ! command -v rustup >/dev/null; then
  echo "setup: rustup not found; this machine kind ships it (see ../shared/notes/toolchain.md)" >&2
  exit 1
fi

if ! rustup toolchain list | grep -q "^${STABLE}-"; then
  say "installing Rust ${STABLE} (userspace)"
  rustup toolchain install "$STABLE" --profile minimal --component clippy,rustfmt
else
  say "Rust ${STABLE} present"
fi
if ! rustup toolchain list | grep -q "^${NIGHTLY}-"; then
  say "installing Rust ${NIGHTLY} with rust-src (eBPF)"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
elif ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q rust-src; then
  rustup component add rust-src --toolchain "$NIGHTLY"
else
  say "Rust ${NIGHTLY} present"
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR} (about a minute)"
  PATH="/usr/lib/llvm-${LLVM_MAJOR}/bin:$PATH" LLVM_SYS_221_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" \
    cargo "+${STABLE}" install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
    --no-default-features --features "llvm-${LLVM_MAJOR}"
else
  say "bpf-linker ${BPF_LINKER_VERSION} present"
fi

if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    say "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
  fi
fi
say "ready"
