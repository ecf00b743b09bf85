//! Generated protobuf and gRPC code for `tally.v1`, and the descriptor set for reflection.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("tally.v1");

/// Encoded `FileDescriptorSet` of `proto/`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tally_descriptor.bin"));
