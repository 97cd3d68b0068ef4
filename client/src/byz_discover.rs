//! A Byzantine cluster learned from one address: every replica reports the era it is in,
//! signed by the configuration master (`Status.byzantine.signed_era`). A client that knows
//! only the client Service's address and the master's public key asks there, verifies the
//! signature, and takes members, endpoints, replica public keys, t and the ordering bounds
//! from the era. A faulty replica can at worst show an older (still master-signed) era or
//! none; the client also asks every member of the era it found and keeps the newest one.
//!
//! This is how the CLI works inside a Kubernetes cluster (`lockstep -c kv-byz:7000
//! --master-public-key HEX --identity alice --identity-key alice.key put k v`): nothing to
//! mount but the client's own key, and nothing to trust but the master's public key, which
//! the operator publishes in the resource's status.

use crate::byz::{ClusterInfo, ReplicaInfo};
use ed25519_dalek::VerifyingKey;
use lockstep_proto::{Era, SignedEra};
use lockstep_replica::byz::keys;
use prost::Message;
use std::time::Duration;

/// Where and how to (re)learn the cluster: an address and the master's public key.
#[derive(Clone, Debug)]
pub struct Discovery {
    pub endpoint: String,
    pub master: VerifyingKey,
    /// How to reach the replicas (TLS or plaintext).
    pub transport: crate::Transport,
}

/// The era in `signed`, if the master signed it.
pub fn verified_era(signed: &[u8], master: &VerifyingKey) -> Option<Era> {
    let signed = SignedEra::decode(signed).ok()?;
    if !keys::verify(master, &signed.era, &signed.signature) {
        return None;
    }
    Era::decode(signed.era.as_slice()).ok()
}

/// What a client needs, from a verified era.
pub fn info_of(name: &str, era: &Era) -> ClusterInfo {
    let machine = era.machine.clone().unwrap_or_default();
    ClusterInfo {
        name: name.to_string(),
        t: era.faults as usize,
        era: era.number,
        replicas: era
            .members
            .iter()
            .map(|m| ReplicaInfo {
                id: m.id.clone(),
                endpoint: m.endpoint.clone(),
                public_key: hex::encode(&m.public_key),
            })
            .collect(),
        stability: era.stability.clone(),
        max_delay_millis: era.max_delay_micros / 1000,
        max_skew_millis: era.max_skew_micros / 1000,
        machine_name: machine.name,
        machine_version: machine.version,
    }
}

/// How often (within the timeout) the first endpoint is asked for an era before discovery
/// gives up.
const DISCOVERY_ATTEMPTS: usize = 8;

/// The newest master-signed era among what `endpoints` report.
async fn newest(
    transport: &crate::Transport,
    endpoints: &[String],
    master: &VerifyingKey,
    timeout: Duration,
) -> Option<Era> {
    let probes = endpoints.iter().map(|ep| crate::status_of(transport, ep, timeout));
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .filter_map(|s| verified_era(&s.byzantine?.signed_era, master))
        .max_by_key(|e| e.number)
}

/// Learn the cluster behind `d.endpoint` (and the members of the era found there).
pub async fn discover(d: &Discovery, timeout: Duration) -> Result<ClusterInfo, String> {
    // Behind a Service, each connection may reach another replica, and a replica that has
    // not been given the era yet (it started last) reports none: ask again, a few times, so
    // one replica that is behind does not decide for the cluster.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = None;
    for _ in 0..DISCOVERY_ATTEMPTS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        first = newest(&d.transport, std::slice::from_ref(&d.endpoint), &d.master, left).await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200).min(left)).await;
    }
    let first = first.ok_or_else(|| {
        format!(
            "{} reports no era signed by master key {} (not a Byzantine replica, not configured yet, \
                 or another master key)",
            d.endpoint,
            hex::encode(d.master.to_bytes())
        )
    })?;
    let members: Vec<String> = first.members.iter().map(|m| m.endpoint.clone()).collect();
    let best = match newest(&d.transport, &members, &d.master, timeout).await {
        Some(e) if e.number > first.number => e,
        _ => first,
    };
    Ok(info_of(&d.endpoint, &best))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_proto::ByzMember;

    fn signed(key: &ed25519_dalek::SigningKey, number: u64) -> Vec<u8> {
        let era = Era {
            number,
            faults: 1,
            members: vec![ByzMember {
                id: "kv-0".into(),
                endpoint: "kv-0.kv-peers:7000".into(),
                public_key: vec![7; 32],
            }],
            max_delay_micros: 10_000,
            stability: "LamportClock".into(),
            ..Default::default()
        };
        let bytes = era.encode_to_vec();
        SignedEra {
            signature: keys::sign(key, &bytes),
            era: bytes,
        }
        .encode_to_vec()
    }

    #[test]
    fn an_era_counts_only_with_the_masters_signature() {
        let master = keys::random_signing_key();
        let other = keys::random_signing_key();
        let era = verified_era(&signed(&master, 3), &master.verifying_key()).expect("verifies");
        let info = info_of("kv:7000", &era);
        assert_eq!((info.era, info.t, info.max_delay_millis), (3, 1, 10));
        assert_eq!(info.replicas[0].public_key, "07".repeat(32));
        assert!(verified_era(&signed(&other, 3), &master.verifying_key()).is_none());
        assert!(verified_era(b"garbage", &master.verifying_key()).is_none());
    }
}
