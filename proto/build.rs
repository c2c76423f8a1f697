//! Compiles `sevplace/v1/*.proto` with protox (a protobuf compiler in pure
//! Rust, so no `protoc` is needed), then generates the prost messages, the
//! tonic client and server, serde impls following protobuf's JSON mapping
//! (pbjson), and the descriptor set served by gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["sevplace/v1/sevplace.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::Compiler::new(["."])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(protos)?
        .file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = fds.encode_to_vec();
    std::fs::write(out.join("sevplace_descriptor.bin"), &bytes)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .emit_fields()
        .build(&[".sevplace"])?;
    Ok(())
}
