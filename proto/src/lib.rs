//! The `sevplace.v1` gRPC API: messages, client and server generated from
//! `proto/sevplace/v1/sevplace.proto`, with serde impls that follow
//! protobuf's JSON mapping (lowerCamelCase names, enum names as strings).

/// Messages, client and server generated from `sevplace/v1/sevplace.proto`
/// (the generated items are documented by the `.proto` comments, not here).
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("sevplace.v1");
    include!(concat!(env!("OUT_DIR"), "/sevplace.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of the API and its imports, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sevplace_descriptor.bin"));

/// The well-known types (`Timestamp`, `Duration`) the messages use.
pub use pbjson_types;

pub mod doc;
