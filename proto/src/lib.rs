//! lockstep's gRPC wire protocol. The schema lives in `proto/lockstep.proto`.

#![allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("lockstep.v1");
}

pub use v1::*;

/// Largest gRPC message a replica or client accepts or sends (4 MiB plus headroom for
/// snapshot framing). Larger requests are rejected with `OUT_OF_RANGE`, never a crash.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
