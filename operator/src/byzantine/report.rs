//! What Byzantine replicas report, as `.status.byzantine` and metrics (pure).
//!
//! Each replica reports evidence against its peers (`Status.byzantine.evidence`: bad
//! signatures, refused or replayed relays, equivocation, corrupt snapshots). The operator
//! shows it per accused replica with who reported it: a faulty replica can also accuse
//! correct ones, so one reporter alone proves nothing; the same kind from t + 1 reporters
//! does. The operator never acts on it (a replica that keeps running is not detectable as
//! failed by the operator; a person decides).

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use k8s_openapi::api::core::v1::Secret;
use lockstep_proto::StatusResponse;
use lockstep_replica::byz::keys;
use lockstep_resource::{ByzantineEvidence, ByzantineReplicaStatus, ByzantineStatus};

use super::master::Seen;

/// Client identities in a `spec.clientIdentities` Secret: key = client id, value = public
/// key (64 hex characters, optionally `ed25519:`-prefixed, or 32 raw bytes).
pub fn identities_in(secret: &Secret) -> BTreeMap<String, VerifyingKey> {
    secret
        .data
        .iter()
        .flatten()
        .filter(|(id, _)| !id.starts_with('.') && id.as_str() != keys::MASTER_IDENTITY)
        .filter_map(|(id, v)| Some((id.clone(), keys::parse_public_key(&v.0).ok()?)))
        .collect()
}

/// `.status.byzantine` from what the master saw.
pub fn status(master_public_key: &str, seen: &Seen) -> ByzantineStatus {
    let mut replicas: BTreeMap<String, ByzantineReplicaStatus> = BTreeMap::new();
    for (id, s) in &seen.statuses {
        let entry = replicas.entry(id.clone()).or_insert_with(|| ByzantineReplicaStatus {
            id: id.clone(),
            ..Default::default()
        });
        entry.era = s.byzantine.as_ref().and_then(|b| i64::try_from(b.era).ok());
    }
    for (reporter, e) in evidence(&seen.statuses) {
        let entry = replicas
            .entry(e.peer.clone())
            .or_insert_with(|| ByzantineReplicaStatus {
                id: e.peer.clone(),
                ..Default::default()
            });
        entry.evidence.push(ByzantineEvidence {
            kind: e.kind.clone(),
            count: i64::try_from(e.count).unwrap_or(i64::MAX),
            reported_by: reporter.to_string(),
        });
    }
    ByzantineStatus {
        master_public_key: master_public_key.to_string(),
        era: (seen.era > 0).then(|| i64::try_from(seen.era).unwrap_or(i64::MAX)),
        replicas: replicas.into_values().collect(),
    }
}

/// (reporter, evidence) pairs, in a stable order.
pub fn evidence(statuses: &BTreeMap<String, StatusResponse>) -> Vec<(&str, &lockstep_proto::Evidence)> {
    statuses
        .iter()
        .flat_map(|(id, s)| {
            s.byzantine
                .iter()
                .flat_map(|b| b.evidence.iter())
                .map(move |e| (id.as_str(), e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use lockstep_proto::{ByzStatus, Evidence};

    fn reporting(era: u64, evidence: Vec<Evidence>) -> StatusResponse {
        StatusResponse {
            byzantine: Some(ByzStatus {
                era,
                evidence,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn evidence_is_shown_on_the_accused_replica_with_its_reporter() {
        let seen = Seen {
            era: 4,
            statuses: BTreeMap::from([
                (
                    "kv-0".to_string(),
                    reporting(
                        4,
                        vec![Evidence {
                            peer: "kv-2".into(),
                            kind: "bad-relay-signature".into(),
                            count: 3,
                        }],
                    ),
                ),
                ("kv-1".to_string(), reporting(4, vec![])),
                ("kv-2".to_string(), reporting(3, vec![])),
            ]),
            ..Default::default()
        };
        let s = status("ab", &seen);
        assert_eq!((s.master_public_key.as_str(), s.era), ("ab", Some(4)));
        let kv2 = s.replicas.iter().find(|r| r.id == "kv-2").expect("kv-2");
        assert_eq!(kv2.era, Some(3));
        assert_eq!(
            kv2.evidence,
            vec![ByzantineEvidence {
                kind: "bad-relay-signature".into(),
                count: 3,
                reported_by: "kv-0".into()
            }]
        );
        assert!(
            s.replicas
                .iter()
                .find(|r| r.id == "kv-0")
                .expect("kv-0")
                .evidence
                .is_empty()
        );
    }

    #[test]
    fn client_identities_skip_hidden_entries_and_bad_keys() {
        let key = keys::random_signing_key().verifying_key();
        let secret = Secret {
            data: Some(BTreeMap::from([
                (
                    "alice".to_string(),
                    ByteString(hex::encode(key.to_bytes()).into_bytes()),
                ),
                ("..data".to_string(), ByteString(b"x".to_vec())),
                ("bob".to_string(), ByteString(b"not a key".to_vec())),
            ])),
            ..Default::default()
        };
        let ids = identities_in(&secret);
        assert_eq!(ids.keys().collect::<Vec<_>>(), vec!["alice"]);
        assert_eq!(ids["alice"], key);
    }
}
