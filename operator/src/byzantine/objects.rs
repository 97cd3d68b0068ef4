//! The Kubernetes objects of Byzantine mode (pure): the master's Secret, each replica's key
//! Secret, and what a replica pod needs to use them.
//!
//! - `<rsm>-byz-master` holds the master's Ed25519 secret key (`master.key`), its public key
//!   (`master.pub`, given to replicas as `LOCKSTEP_MASTER_PUBLIC_KEY` through a secretKeyRef,
//!   so the pod never sees the secret key) and the last era the master signed (`era`, written
//!   before the era is pushed: a new operator leader resumes from it) and, during a rollout,
//!   the sealing barrier t + 1 members reached (`sealed`: era, index, digest), written before
//!   any replica is restarted: restarted members report no era and so no barrier, and a new
//!   operator leader resumes the next era from this record.
//! - `<replica>-byz-key` holds one replica's key (`replica.key`), mounted read-only at
//!   `/etc/lockstep/replica-key/replica.key` (`LOCKSTEP_REPLICA_KEY_FILE`). The operator
//!   creates it before the pod, so it knows every member's public key without trusting what a
//!   (possibly faulty) replica reports about itself.
//!
//! Both are owned by the resource (deleted with it).

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, KeyToPath, Secret, SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
};
use lockstep_proto::SignedEra;
use lockstep_replica::byz::keys;
use lockstep_resource::ReplicatedStateMachine;
use prost::Message;

use crate::build::{BuildError, meta};

pub const COMPONENT_BYZ_KEYS: &str = "byzantine-keys";
pub const MASTER_KEY: &str = "master.key";
pub const MASTER_PUB: &str = "master.pub";
pub const ERA: &str = "era";
pub const SEALED: &str = "sealed";
pub const REPLICA_KEY: &str = "replica.key";
pub const REPLICA_KEY_DIR: &str = "/etc/lockstep/replica-key";

pub fn master_secret_name(cluster: &str) -> String {
    format!("{cluster}-byz-master")
}

pub fn replica_key_secret_name(replica_id: &str) -> String {
    format!("{replica_id}-byz-key")
}

fn secret(
    rsm: &ReplicatedStateMachine,
    name: String,
    data: BTreeMap<String, ByteString>,
) -> Result<Secret, BuildError> {
    Ok(Secret {
        metadata: meta(rsm, name, COMPONENT_BYZ_KEYS)?,
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

fn text(s: String) -> ByteString {
    ByteString(s.into_bytes())
}

/// The master's Secret for a new key (no era yet).
pub fn master_secret(rsm: &ReplicatedStateMachine, key: &SigningKey) -> Result<Secret, BuildError> {
    let data = BTreeMap::from([
        (MASTER_KEY.to_string(), text(keys::encode_key(&key.to_bytes()))),
        (
            MASTER_PUB.to_string(),
            text(hex::encode(key.verifying_key().to_bytes())),
        ),
    ]);
    secret(
        rsm,
        master_secret_name(&rsm.metadata.name.clone().unwrap_or_default()),
        data,
    )
}

/// A replica's key Secret.
pub fn replica_key_secret(rsm: &ReplicatedStateMachine, id: &str, key: &SigningKey) -> Result<Secret, BuildError> {
    let data = BTreeMap::from([(REPLICA_KEY.to_string(), text(keys::encode_key(&key.to_bytes())))]);
    secret(rsm, replica_key_secret_name(id), data)
}

/// A signing key stored under `field`.
pub fn key_in(secret: &Secret, field: &str) -> Option<SigningKey> {
    let bytes = secret.data.as_ref()?.get(field)?;
    keys::parse_key_bytes(&bytes.0).ok().map(|b| SigningKey::from_bytes(&b))
}

/// The signed era stored in the master's Secret.
pub fn era_in(secret: &Secret) -> Option<SignedEra> {
    let bytes = secret.data.as_ref()?.get(ERA)?;
    SignedEra::decode(bytes.0.as_slice()).ok()
}

/// The merge patch that records `era` in the master's Secret.
pub fn era_patch(era: &SignedEra) -> serde_json::Value {
    let b64 = serde_json::to_value(ByteString(era.encode_to_vec())).unwrap_or_default();
    serde_json::json!({ "data": { ERA: b64 } })
}

/// A sealing barrier of a rollout: execution in `era` stopped at `index`, whose state has
/// `digest`. The next era resumes there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedBarrier {
    pub era: u64,
    pub index: u64,
    #[serde(with = "hex::serde")]
    pub digest: Vec<u8>,
}

/// The sealing barrier recorded in the master's Secret.
pub fn sealed_in(secret: &Secret) -> Option<SealedBarrier> {
    let bytes = secret.data.as_ref()?.get(SEALED)?;
    serde_json::from_slice(&bytes.0).ok()
}

/// The merge patch that records `barrier` in the master's Secret.
pub fn sealed_patch(barrier: &SealedBarrier) -> serde_json::Value {
    let json = serde_json::to_vec(barrier).unwrap_or_default();
    let b64 = serde_json::to_value(ByteString(json)).unwrap_or_default();
    serde_json::json!({ "data": { SEALED: b64 } })
}

/// Env, mounts and volumes a Byzantine replica pod gets on top of the common ones.
pub fn pod_additions(cluster: &str, id: &str) -> (Vec<EnvVar>, VolumeMount, Volume) {
    let env = vec![
        EnvVar {
            name: "LOCKSTEP_MASTER_PUBLIC_KEY".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: master_secret_name(cluster),
                    key: MASTER_PUB.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        EnvVar {
            name: "LOCKSTEP_REPLICA_KEY_FILE".into(),
            value: Some(format!("{REPLICA_KEY_DIR}/{REPLICA_KEY}")),
            ..Default::default()
        },
    ];
    let mount = VolumeMount {
        name: "replica-key".into(),
        mount_path: REPLICA_KEY_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let volume = Volume {
        name: "replica-key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(replica_key_secret_name(id)),
            items: Some(vec![KeyToPath {
                key: REPLICA_KEY.into(),
                path: REPLICA_KEY.into(),
                mode: Some(0o440),
            }]),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    };
    (env, mount, volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealing_barrier_reads_back_from_the_patch_that_records_it() {
        let barrier = SealedBarrier {
            era: 7,
            index: 1234,
            digest: vec![0xab, 0x01, 0xff],
        };
        let patch = sealed_patch(&barrier);
        let secret: Secret = serde_json::from_value(patch).expect("a Secret's data");
        assert_eq!(sealed_in(&secret), Some(barrier));
        assert_eq!(sealed_in(&Secret::default()), None, "no record, no barrier");
    }
}
