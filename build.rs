//! Compiles the Envoy rate-limit protos and the admin proto with protox, so no system `protoc` is
//! needed, and writes a descriptor set for gRPC server reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &["envoy/service/ratelimit/v3/rls.proto"];
const ADMIN_PROTOS: &[&str] = &["fikra/admin/v1/admin.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("rls_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;

    // The codec decides requests whose entry values are not UTF-8 (see src/codec.rs).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LenientCodec")
        .compile_fds(descriptors)?;

    // The admin service has its own descriptor set, so only the admin port's
    // reflection lists it.
    let admin = protox::compile(ADMIN_PROTOS, ["proto"])?;
    std::fs::write(out_dir.join("admin_descriptor.bin"), prost::Message::encode_to_vec(&admin))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(admin)?;
    Ok(())
}
