use super::*;
use k8s_openapi::api::core::v1::Pod;
use lockstep_proto::{Member, StatusResponse};
use lockstep_resource::ReplicatedStateMachineStatus;

use crate::translate::ReplicaObservation;

fn rsm(status: Option<ReplicatedStateMachineStatus>) -> ReplicatedStateMachine {
    let text = "apiVersion: lockstep.dev/v1alpha1\nkind: ReplicatedStateMachine\n\
                metadata: {name: kv, namespace: apps, uid: u-2}\n\
                spec: {faultsTolerated: 1, failureModel: FailStop, machine: {name: kv, version: 1.0.0, image: 'img:1'}, \
                storage: {retainOnDelete: true}}\n";
    let mut r = lockstep_resource::from_yaml(text).expect("fixture");
    r.status = status;
    r
}

fn on_disk(epoch: u64, primary: &str, voters: &[&str]) -> Configuration {
    Configuration {
        epoch,
        primary_id: primary.into(),
        members: voters
            .iter()
            .map(|id| Member {
                id: id.to_string(),
                endpoint: format!("http://{id}.old:7000"),
                role: MemberRole::Voter as i32,
            })
            .collect(),
    }
}

fn replica(id: &str, config: Option<Configuration>, answered: bool) -> ReplicaObservation {
    let mut pod = Pod::default();
    pod.metadata.name = Some(id.into());
    ReplicaObservation {
        pod,
        admin: if answered {
            Admin::Answered(Box::new(StatusResponse {
                id: id.into(),
                epoch: config.as_ref().map_or(0, |c| c.epoch),
                config,
                ..Default::default()
            }))
        } else {
            Admin::NotAsked
        },
        node_lost: None,
        connection_lost: false,
    }
}

fn world(claims: &[&str], replicas: Vec<ReplicaObservation>) -> World {
    World {
        replicas,
        pvcs: claims.iter().map(|c| format!("data-{c}")).collect(),
        ..Default::default()
    }
}

#[test]
fn kept_claims_without_pods_get_their_replicas_back() {
    let w = world(&["kv-3", "kv-4"], vec![]);
    assert_eq!(
        adoption(&rsm(None), &w),
        Adoption::Revive(vec!["kv-3".into(), "kv-4".into()])
    );
}

#[test]
fn the_newest_configuration_on_disk_is_adopted_once_every_replica_answers() {
    let old = on_disk(7, "kv-4", &["kv-3", "kv-4"]);
    let stale = on_disk(5, "kv-1", &["kv-1", "kv-3"]);
    let w = world(
        &["kv-3", "kv-4"],
        vec![replica("kv-3", Some(old.clone()), true), replica("kv-4", None, false)],
    );
    match adoption(&rsm(None), &w) {
        Adoption::Wait(why) => assert!(why.contains("epoch 7") && why.contains("kv-4"), "{why}"),
        other => panic!("must wait for kv-4: {other:?}"),
    }
    let w = world(
        &["kv-1", "kv-3", "kv-4"],
        vec![
            replica("kv-1", Some(stale), true),
            replica("kv-3", Some(old.clone()), true),
            replica("kv-4", Some(old), true),
        ],
    );
    let Adoption::Adopt { config, max_ordinal } = adoption(&rsm(None), &w) else {
        panic!("adopts");
    };
    assert_eq!((config.epoch, config.primary.as_str(), max_ordinal), (7, "kv-4", 4));
    let ids: Vec<&str> = config.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["kv-3", "kv-4"]);
    assert_eq!(config.members[0].endpoint, names::endpoint("kv", "apps", "kv-3"));
    assert!(config.members.iter().all(|m| m.role == Role::Voter));
}

#[test]
fn fresh_replicas_and_persisted_configurations_are_left_to_the_planner() {
    let fresh = world(
        &["kv-0", "kv-1"],
        vec![replica("kv-0", None, true), replica("kv-1", None, false)],
    );
    assert_eq!(adoption(&rsm(None), &fresh), Adoption::None, "an ordinary bootstrap");
    let configured = ReplicatedStateMachineStatus {
        epoch: Some(2),
        primary: Some("kv-0".into()),
        members: vec![lockstep_resource::MemberStatus {
            pod: "kv-0".into(),
            role: Some("Voter".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let missing_pod = world(&["kv-0"], vec![]);
    assert_eq!(adoption(&rsm(Some(configured)), &missing_pod), Adoption::None);
    let bootstrapping = ReplicatedStateMachineStatus {
        next_ordinal: Some(2),
        ..Default::default()
    };
    assert_eq!(
        adoption(&rsm(Some(bootstrapping)), &missing_pod),
        Adoption::None,
        "claims this RSM created itself are the planner's"
    );
}

#[test]
fn claims_being_collected_are_not_adopted() {
    let mut w = world(&["kv-0"], vec![]);
    w.terminating_pvcs = vec!["data-kv-0".into()];
    assert_eq!(adoption(&rsm(None), &w), Adoption::None);
}

#[test]
fn retained_claims_have_no_owner_reference() {
    let claim = build::replica_pvc(&rsm(None), "kv-0")
        .expect("builds")
        .expect("a claim");
    assert!(claim.metadata.owner_references.is_none());
    assert!(!owned_by(&claim, &rsm(None)) && !owned_by_other(&claim, &rsm(None)));
    let mut owned = claim.clone();
    owned.metadata.owner_references = Some(vec![build::owner_reference(&rsm(None)).expect("uid")]);
    assert!(owned_by(&owned, &rsm(None)));
    let mut other = rsm(None);
    other.metadata.uid = Some("u-1".into());
    assert!(owned_by_other(&owned, &other));
}
