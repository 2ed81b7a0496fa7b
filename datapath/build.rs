//! Builds the eBPF programs (crate `bulkhead-ebpf`) for bpfel-unknown-none with the pinned
//! nightly (see scripts/setup.sh). `AYA_BUILD_SKIP=1` skips it for clippy/doc-only runs.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    println!("cargo::rerun-if-changed=../abi/src");
    aya_build::build_ebpf(
        [Package {
            name: "bulkhead-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom("nightly-2026-08-01"),
    )
}
