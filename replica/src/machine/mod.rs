//! The deterministic state machine users write, and the built-in ones.
//!
//! A [`StateMachine`] sees only the commands the log hands it: no clock, no randomness, no
//! I/O. Same commands in the same order give the same state and the same outputs on every
//! replica. Commands that cannot be understood are rejected by [`StateMachine::validate`]
//! before they enter the log; `apply` must still be total (never panic) because a log
//! written by another version may reach it.

pub mod counter;
pub mod kv;

use lockstep_proto::MachineIdentity;

/// Error a machine reports for a malformed command or query. Shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MachineError(pub String);

pub trait StateMachine: Send + 'static {
    /// Name, version and digest. Replicas refuse peers with a different identity.
    fn identity(&self) -> MachineIdentity;
    /// Check a command before it is ordered. Rejected commands never reach the log.
    fn validate(&self, command: &[u8]) -> Result<(), MachineError>;
    /// Execute one command. Deterministic and total.
    fn apply(&mut self, command: &[u8]) -> Vec<u8>;
    /// Answer a read-only query against the current state.
    fn query(&self, query: &[u8]) -> Result<Vec<u8>, MachineError>;
    /// Serialize the whole state.
    fn snapshot(&self) -> Vec<u8>;
    /// Replace the state with a snapshot taken by `snapshot` (possibly by the previous
    /// version of this machine, during a lockstep upgrade).
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), MachineError>;
}

/// Builds a fresh machine. A replica binary carries a list of these.
pub type MachineFactory = fn() -> Box<dyn StateMachine>;

/// The machines built into `lockstep-replica`.
pub fn builtin(name: &str) -> Option<MachineFactory> {
    match name {
        "kv" => Some(|| Box::new(kv::Kv::default())),
        "counter" => Some(|| Box::new(counter::Counter::default())),
        _ => None,
    }
}

pub const BUILTIN_NAMES: &[&str] = &["kv", "counter"];

/// An identity with the digest computed from name and version and a machine-chosen
/// code/format revision, so two builds that disagree on the format do not pair up.
pub fn identity(name: &str, version: &str, revision: &str) -> MachineIdentity {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{name}\0{version}\0{revision}").as_bytes());
    MachineIdentity {
        name: name.into(),
        version: version.into(),
        digest: hex::encode(&digest[..8]),
    }
}
