fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    tonic_build::configure().compile(&["proto/coordinator.proto"], &["proto"])?;
    Ok(())
}
