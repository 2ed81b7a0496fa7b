fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/bulkhead.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/bulkhead.proto");
    Ok(())
}
