//! Conversions between the planner's types and the replicas' wire types (feature `wire`),
//! shared by every backend that talks to replicas (`lockstep up`, the operator).

use crate::{Config, ReplicaStatus, Role};
use lockstep_proto::{Configuration, Member, MemberRole, StatusResponse};

/// The configuration as the admin `Reconfigure` RPC carries it.
pub fn to_proto(config: &Config) -> Configuration {
    Configuration {
        epoch: config.epoch,
        primary_id: config.primary.clone(),
        members: config
            .members
            .iter()
            .map(|m| Member {
                id: m.id.clone(),
                endpoint: m.endpoint.clone(),
                role: match m.role {
                    Role::Voter => MemberRole::Voter as i32,
                    Role::Learner => MemberRole::Learner as i32,
                },
            })
            .collect(),
    }
}

/// What the planner needs from a replica's admin `Status`.
pub fn replica_status(s: &StatusResponse) -> ReplicaStatus {
    ReplicaStatus {
        epoch: s.epoch,
        applied_index: s.applied_index,
        commit_index: s.commit_index,
        last_index: s.last_index,
        sealed_at: (s.sealed_at > 0).then_some(s.sealed_at),
        sealed_digest: (!s.sealed_digest.is_empty()).then(|| s.sealed_digest.clone()),
        peer_match: s.peers.iter().map(|p| (p.id.clone(), p.match_index)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigMember;

    #[test]
    fn config_round_trips_roles() {
        let c = Config {
            epoch: 3,
            primary: "a".into(),
            members: vec![
                ConfigMember {
                    id: "a".into(),
                    endpoint: "http://a".into(),
                    role: Role::Voter,
                },
                ConfigMember {
                    id: "b".into(),
                    endpoint: "http://b".into(),
                    role: Role::Learner,
                },
            ],
        };
        let p = to_proto(&c);
        assert_eq!(p.members[0].role(), MemberRole::Voter);
        assert_eq!(p.members[1].role(), MemberRole::Learner);
        assert_eq!((p.epoch, p.primary_id.as_str()), (3, "a"));
    }

    #[test]
    fn status_maps_zero_to_none() {
        let s = replica_status(&StatusResponse {
            sealed_at: 0,
            epoch: 2,
            ..Default::default()
        });
        assert_eq!((s.sealed_at, s.sealed_digest, s.epoch), (None, None, 2));
        let s = replica_status(&StatusResponse {
            sealed_at: 9,
            sealed_digest: vec![1],
            ..Default::default()
        });
        assert_eq!((s.sealed_at, s.sealed_digest), (Some(9), Some(vec![1])));
    }
}
