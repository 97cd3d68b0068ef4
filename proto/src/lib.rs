//! lockstep's gRPC wire protocol. The schema lives in `proto/lockstep.proto`.

#![allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("lockstep.v1");
}

pub use v1::*;

/// Largest gRPC message a replica or client accepts or sends (4 MiB plus headroom for
/// snapshot framing). Larger requests are rejected with `OUT_OF_RANGE`, never a crash.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

impl SessionError {
    /// A failed request of a client session, as the unary call would have failed: code,
    /// message and the ASCII metadata (binary metadata is not carried).
    pub fn from_status(status: &tonic::Status) -> SessionError {
        let metadata = status
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        SessionError {
            code: status.code() as i32,
            message: status.message().to_string(),
            metadata,
        }
    }

    /// The [`tonic::Status`] this error stands for (what [`Self::from_status`] was given).
    pub fn into_status(self) -> tonic::Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (k, v) in self.metadata {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
                tonic::metadata::AsciiMetadataValue::try_from(v.as_str()),
            ) {
                metadata.insert(k, v);
            }
        }
        tonic::Status::with_metadata(tonic::Code::from_i32(self.code), self.message, metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_error_carries_code_message_and_the_primary_hint() {
        let mut status = tonic::Status::failed_precondition("replica kv-1 is not the primary");
        status
            .metadata_mut()
            .insert("x-lockstep-primary", "127.0.0.1:7001".parse().expect("ascii"));
        let back = SessionError::from_status(&status).into_status();
        assert_eq!(back.code(), tonic::Code::FailedPrecondition);
        assert_eq!(back.message(), "replica kv-1 is not the primary");
        assert_eq!(
            back.metadata().get("x-lockstep-primary").and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:7001")
        );
    }
}
