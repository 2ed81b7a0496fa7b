//! Linker flags for the eBPF object.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        // bpf-linker passes LLVM `--bpf-expand-memcpy-in-order` by default, which also
        // stops LLVM from expanding small memsets inline: every zeroed key pad or address
        // prefix became a call to a byte-at-a-time memset subprogram on the per-packet path.
        println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
