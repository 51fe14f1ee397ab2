//! Generates the tonic/prost code for `proto/loractl/v1/*.proto` with the protoc shipped by
//! `protoc-bin-vendored`, so building this crate needs no system protoc. `PROTOC` still wins
//! when set.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/loractl/v1/common.proto",
    "proto/loractl/v1/jobs.proto",
    "proto/loractl/v1/workers.proto",
    "proto/loractl/v1/artifacts.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, PROTOS, &["proto"])?;
    Ok(())
}
