//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes the descriptor set
//! that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(["tally/v1/credit_service.proto"], ["proto"])?;
    // prost-build ignores `file_descriptor_set_path` on the compile_fds path: write it ourselves.
    fs::write(out_dir.join("tally_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // prost's codec, with undecodable requests answered INVALID_ARGUMENT (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::Codec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
