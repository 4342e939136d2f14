//! Generates the gRPC code into OUT_DIR with a protoc shipped as a crate, so
//! a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(config, &["strata.proto"], &["."])?;
    println!("cargo:rerun-if-changed=strata.proto");
    Ok(())
}
