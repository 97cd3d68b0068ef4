//! Planner tests: one per transition. The planner is pure, so each test builds an
//! observation and checks the decision.
use super::*;

fn kv(version: &str) -> MachineRef {
    MachineRef {
        name: "kv".into(),
        version: version.into(),
        image: None,
    }
}

fn desired(t: u32) -> Desired {
    Desired {
        faults_tolerated: t,
        failure_model: FailureModel::FailStop,
        machine: kv("1.0.0"),
        paused: false,
    }
}

fn running(id: &str, epoch: u64, last: u64) -> ObservedReplica {
    ObservedReplica {
        id: id.into(),
        endpoint: format!("http://{id}"),
        machine: kv("1.0.0"),
        health: Health::Running,
        status: Some(ReplicaStatus {
            epoch,
            applied_index: last,
            commit_index: last,
            last_index: last,
            ..Default::default()
        }),
    }
}

fn voter(id: &str) -> ConfigMember {
    ConfigMember {
        id: id.into(),
        endpoint: format!("http://{id}"),
        role: Role::Voter,
    }
}

fn learner(id: &str) -> ConfigMember {
    ConfigMember {
        role: Role::Learner,
        ..voter(id)
    }
}

fn config(epoch: u64, primary: &str, members: Vec<ConfigMember>) -> Config {
    Config {
        epoch,
        primary: primary.into(),
        members,
    }
}

fn steady(t: u32, epoch: u64) -> Observed {
    let ids: Vec<String> = (0..=t).map(|i| format!("kv-{i}")).collect();
    Observed {
        config: Some(config(epoch, "kv-0", ids.iter().map(|i| voter(i)).collect())),
        replicas: ids.iter().map(|i| running(i, epoch, 10)).collect(),
        ..Default::default()
    }
}

fn reconfig(p: &Plan) -> &Config {
    p.actions
        .iter()
        .find_map(|a| match a {
            Action::Reconfigure { config, .. } => Some(config),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected a Reconfigure, got {:?}", p.actions))
}

#[test]
fn sizing_follows_the_failure_model() {
    assert_eq!(replicas_for(FailureModel::FailStop, 0), 1);
    assert_eq!(replicas_for(FailureModel::FailStop, 1), 2);
    assert_eq!(replicas_for(FailureModel::FailStop, 2), 3);
    assert_eq!(replicas_for(FailureModel::Byzantine, 1), 3);
    assert_eq!(replicas_for(FailureModel::Byzantine, 2), 5);
}

#[test]
fn bootstrap_creates_then_configures_all_voters() {
    let p = plan("kv", &desired(2), &Observed::default());
    let created: Vec<_> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::CreateReplica { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(created, vec!["kv-0", "kv-1", "kv-2"]);

    let mut o = Observed {
        replicas: created.iter().map(|i| running(i, 0, 0)).collect(),
        ..Default::default()
    };
    o.replicas[2].health = Health::Starting;
    o.replicas[2].status = None;
    assert!(
        plan("kv", &desired(2), &o).actions.is_empty(),
        "waits for every replica to answer"
    );

    o.replicas[2] = running("kv-2", 0, 0);
    let c = reconfig(&plan("kv", &desired(2), &o)).clone();
    assert_eq!(c.epoch, 1);
    assert_eq!(c.primary, "kv-0");
    assert_eq!(c.voters().count(), 3);
}

#[test]
fn steady_state_does_nothing() {
    let p = plan("kv", &desired(1), &steady(1, 4));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(p.conditions.ready && p.conditions.available);
    assert_eq!(p.conditions.degraded, None);
}

#[test]
fn failed_backup_is_fenced_before_it_is_replaced() {
    for failure in [
        Health::Failed {
            reason: "process exited: signal 9".into(),
        },
        Health::Failed {
            reason: "unreachable for 1s".into(),
        },
    ] {
        let mut o = steady(1, 3);
        o.replicas[1].health = failure.clone();
        let p = plan("kv", &desired(1), &o);
        let c = reconfig(&p);
        assert_eq!(c.epoch, 4);
        assert_eq!(c.primary, "kv-0");
        assert!(c.member("kv-1").is_none());
        assert!(
            p.actions.iter().all(|a| !matches!(a, Action::CreateReplica { .. })),
            "no replacement before fence"
        );
        assert!(p.actions.contains(&Action::DeleteReplica {
            id: "kv-1".into(),
            reason: format!(
                "fail-stopped: {}",
                match &failure {
                    Health::Failed { reason } => reason,
                    _ => unreachable!(),
                }
            )
        }));
    }
}

#[test]
fn failed_primary_moves_primary_to_longest_surviving_log() {
    let mut o = steady(2, 7);
    o.replicas[0].health = Health::Failed {
        reason: "exited".into(),
    };
    o.replicas[1].status.as_mut().unwrap().last_index = 11;
    o.replicas[2].status.as_mut().unwrap().last_index = 12;
    let c = reconfig(&plan("kv", &desired(2), &o)).clone();
    assert_eq!(c.primary, "kv-2");
    assert_eq!(c.epoch, 8);
    assert_eq!(c.voters().count(), 2);
}

#[test]
fn vanished_replica_counts_as_failed() {
    let mut o = steady(1, 2);
    o.replicas.remove(1); // pod deleted
    let p = plan("kv", &desired(1), &o);
    assert!(reconfig(&p).member("kv-1").is_none());
    assert!(
        p.actions.iter().all(|a| !matches!(a, Action::DeleteReplica { .. })),
        "nothing left to delete"
    );
}

#[test]
fn t_failures_at_once_are_survivable_more_are_not() {
    let mut o = steady(2, 5);
    o.replicas[0].health = Health::Failed { reason: "x".into() };
    o.replicas[1].health = Health::Failed { reason: "y".into() };
    let c = reconfig(&plan("kv", &desired(2), &o)).clone();
    assert_eq!(c.voters().map(|m| m.id.as_str()).collect::<Vec<_>>(), vec!["kv-2"]);

    o.replicas[2].health = Health::Failed { reason: "z".into() };
    let p = plan("kv", &desired(2), &o);
    assert!(p.actions.is_empty(), "no data-losing action: {:?}", p.actions);
    assert!(
        p.conditions
            .degraded
            .as_deref()
            .unwrap_or("")
            .contains("not taking a data-losing action")
    );
}

#[test]
fn replacement_is_created_added_as_learner_then_promoted() {
    let o = Observed {
        config: Some(config(4, "kv-0", vec![voter("kv-0")])),
        replicas: vec![running("kv-0", 4, 20)],
        ..Default::default()
    };
    let p = plan("kv", &desired(1), &o);
    assert!(p.actions.contains(&Action::CreateReplica {
        id: "kv-1".into(),
        machine: kv("1.0.0")
    }));
    assert!(p.conditions.degraded.is_some());

    // Starting: wait.
    let mut o2 = o.clone();
    o2.replicas.push(ObservedReplica {
        health: Health::Starting,
        status: None,
        ..running("kv-1", 0, 0)
    });
    assert!(plan("kv", &desired(1), &o2).actions.is_empty());

    // Running: joins as a learner.
    o2.replicas[1] = running("kv-1", 0, 0);
    let c = reconfig(&plan("kv", &desired(1), &o2)).clone();
    assert_eq!(c.epoch, 5);
    assert_eq!(c.member("kv-1").map(|m| m.role), Some(Role::Learner));

    // Learner behind: wait. Caught up: promoted.
    let mut o3 = o2.clone();
    o3.config = Some(c);
    o3.replicas[1].status.as_mut().unwrap().epoch = 5;
    o3.replicas[0].status.as_mut().unwrap().epoch = 5;
    o3.replicas[0]
        .status
        .as_mut()
        .unwrap()
        .peer_match
        .insert("kv-1".into(), 15);
    assert!(plan("kv", &desired(1), &o3).actions.is_empty());
    o3.replicas[0]
        .status
        .as_mut()
        .unwrap()
        .peer_match
        .insert("kv-1".into(), 20);
    let c = reconfig(&plan("kv", &desired(1), &o3)).clone();
    assert_eq!(c.epoch, 6);
    assert_eq!(c.member("kv-1").map(|m| m.role), Some(Role::Voter));
}

#[test]
fn replacements_never_reuse_an_ordinal_handed_out_before() {
    let o = Observed {
        config: Some(config(4, "kv-0", vec![voter("kv-0")])),
        replicas: vec![running("kv-0", 4, 20)],
        next_ordinal: 2, // kv-1 existed and was fenced
        ..Default::default()
    };
    // The same when only kv-1's kept volume tells (no persisted next ordinal).
    let kept = Observed {
        next_ordinal: 0,
        volumes: vec!["kv-0".into(), "kv-1".into()],
        ..o.clone()
    };
    for o in [o, kept] {
        replacement_is_kv_2(&plan("kv", &desired(1), &o));
    }
}

fn replacement_is_kv_2(p: &Plan) {
    assert!(
        p.actions.contains(&Action::CreateReplica {
            id: "kv-2".into(),
            machine: kv("1.0.0")
        }),
        "{:?}",
        p.actions
    );
}

#[test]
fn at_most_t_replacements_in_flight() {
    let o = Observed {
        config: Some(config(4, "kv-0", vec![voter("kv-0")])),
        replicas: vec![running("kv-0", 4, 20)],
        ..Default::default()
    };
    // t = 3 wants 4 replicas: 3 missing, budget 3.
    let creates = |p: &Plan| {
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::CreateReplica { .. }))
            .count()
    };
    assert_eq!(creates(&plan("kv", &desired(3), &o)), 3);
    let mut o2 = o.clone();
    o2.config = Some(config(5, "kv-0", vec![voter("kv-0"), learner("kv-1"), learner("kv-2")]));
    o2.replicas.push(running("kv-1", 5, 0));
    o2.replicas.push(running("kv-2", 5, 0));
    o2.replicas[0].status.as_mut().unwrap().epoch = 5;
    assert_eq!(creates(&plan("kv", &desired(3), &o2)), 1);
}

#[test]
fn failed_learner_is_dropped() {
    let mut o = steady(1, 5);
    o.config = Some(config(5, "kv-0", vec![voter("kv-0"), voter("kv-1"), learner("kv-2")]));
    o.replicas.push(ObservedReplica {
        health: Health::Failed { reason: "oom".into() },
        ..running("kv-2", 5, 0)
    });
    let c = reconfig(&plan("kv", &desired(1), &o)).clone();
    assert!(c.member("kv-2").is_none());
    assert_eq!(c.voters().count(), 2);
}

#[test]
fn raising_t_grows_and_lowering_t_shrinks() {
    let p = plan("kv", &desired(2), &steady(1, 3));
    assert!(p.actions.contains(&Action::CreateReplica {
        id: "kv-2".into(),
        machine: kv("1.0.0")
    }));

    let p = plan("kv", &desired(1), &steady(2, 3));
    let c = reconfig(&p);
    assert_eq!(c.voters().count(), 2);
    assert!(c.member("kv-2").is_none(), "removes the highest non-primary ordinal");
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::DeleteReplica { id, .. } if id == "kv-2"))
    );
}

#[test]
fn surplus_outsider_is_deleted() {
    let mut o = steady(1, 3);
    o.replicas.push(running("kv-9", 0, 0));
    let p = plan("kv", &desired(1), &o);
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::DeleteReplica { id, .. } if id == "kv-9"))
    );
}

#[test]
fn moved_endpoints_get_a_new_epoch_and_lagging_members_get_the_config_again() {
    let mut o = steady(1, 3);
    o.replicas[1].endpoint = "http://elsewhere".into();
    let c = reconfig(&plan("kv", &desired(1), &o)).clone();
    assert_eq!(c.member("kv-1").map(|m| m.endpoint.as_str()), Some("http://elsewhere"));
    assert_eq!(c.epoch, 4);

    // A restarted member whose new address is not known yet is left alone.
    let mut o = steady(1, 3);
    o.replicas[1].endpoint = String::new();
    o.replicas[1].health = Health::Starting;
    assert!(plan("kv", &desired(1), &o).actions.is_empty());

    let mut o = steady(1, 3);
    o.replicas[1].status.as_mut().unwrap().epoch = 2;
    assert_eq!(
        plan("kv", &desired(1), &o).actions,
        vec![Action::PushConfig { id: "kv-1".into() }]
    );
}

#[test]
fn paused_plans_nothing() {
    let mut o = steady(1, 3);
    o.replicas[1].health = Health::Failed { reason: "x".into() };
    let d = Desired {
        paused: true,
        ..desired(1)
    };
    let p = plan("kv", &d, &o);
    assert!(p.actions.is_empty());
    assert!(p.conditions.paused);
}

fn rollout_at(phase: RolloutPhase, seal: Option<u64>) -> Rollout {
    Rollout {
        from: kv("1.0.0"),
        to: kv("2.0.0"),
        phase,
        seal_index: seal,
    }
}

fn set_rollout(p: &Plan) -> Option<Option<Rollout>> {
    p.actions.iter().find_map(|a| match a {
        Action::SetRollout { rollout } => Some(rollout.clone()),
        _ => None,
    })
}

#[test]
fn rollout_walks_stage_seal_replace_resume() {
    let d = Desired {
        machine: kv("2.0.0"),
        ..desired(1)
    };
    // Start: staging.
    let o = steady(1, 3);
    let p = plan("kv", &d, &o);
    assert_eq!(set_rollout(&p), Some(Some(rollout_at(RolloutPhase::Staging, None))));
    assert!(p.actions.contains(&Action::Stage { machine: kv("2.0.0") }));
    assert!(p.conditions.progressing.is_some());

    // Staging, not yet staged: keep staging. Staged: seal.
    let mut o = steady(1, 3);
    o.rollout = Some(rollout_at(RolloutPhase::Staging, None));
    assert!(
        plan("kv", &d, &o)
            .actions
            .contains(&Action::Stage { machine: kv("2.0.0") })
    );
    o.staged = true;
    let p = plan("kv", &d, &o);
    assert!(p.actions.contains(&Action::Seal));
    assert_eq!(set_rollout(&p).flatten().map(|r| r.phase), Some(RolloutPhase::Sealing));

    // Sealing: one voter sealed: wait. All sealed, same digest: replace all.
    o.rollout = Some(rollout_at(RolloutPhase::Sealing, None));
    o.replicas[0].status.as_mut().unwrap().sealed_at = Some(11);
    o.replicas[0].status.as_mut().unwrap().sealed_digest = Some(vec![1]);
    let p = plan("kv", &d, &o);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    o.replicas[1].status.as_mut().unwrap().sealed_at = Some(11);
    o.replicas[1].status.as_mut().unwrap().sealed_digest = Some(vec![1]);
    let p = plan("kv", &d, &o);
    assert_eq!(
        set_rollout(&p).flatten(),
        Some(rollout_at(RolloutPhase::Replacing, Some(11)))
    );
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::RestartReplica { .. }))
            .count(),
        2
    );

    // Replacing: one still old -> restart it; all new -> resume.
    o.rollout = Some(rollout_at(RolloutPhase::Replacing, Some(11)));
    o.replicas[0].machine = kv("2.0.0");
    let p = plan("kv", &d, &o);
    assert_eq!(
        p.actions,
        vec![Action::RestartReplica {
            id: "kv-1".into(),
            machine: kv("2.0.0")
        }]
    );
    o.replicas[1].machine = kv("2.0.0");
    let p = plan("kv", &d, &o);
    assert!(p.actions.contains(&Action::Resume { machine: kv("2.0.0") }));

    // Resuming: once unsealed, done.
    o.rollout = Some(rollout_at(RolloutPhase::Resuming, Some(11)));
    for r in &mut o.replicas {
        r.status.as_mut().unwrap().sealed_at = None;
    }
    let p = plan("kv", &d, &o);
    assert_eq!(set_rollout(&p), Some(None));
    assert!(plan("kv", &d, &Observed { rollout: None, ..o }).actions.is_empty());
}

#[test]
fn seal_with_different_snapshots_stops_the_rollout() {
    let d = Desired {
        machine: kv("2.0.0"),
        ..desired(1)
    };
    let mut o = steady(1, 3);
    o.rollout = Some(rollout_at(RolloutPhase::Sealing, None));
    for (i, r) in o.replicas.iter_mut().enumerate() {
        let s = r.status.as_mut().unwrap();
        s.sealed_at = Some(11);
        s.sealed_digest = Some(vec![i as u8]);
    }
    let p = plan("kv", &d, &o);
    assert!(p.actions.is_empty());
    assert!(p.conditions.degraded.unwrap().contains("DIFFERENT"));
}

#[test]
fn byzantine_seal_needs_t_plus_one_matching_voters_not_all() {
    let d = Desired {
        machine: kv("2.0.0"),
        failure_model: FailureModel::Byzantine,
        ..desired(1)
    };
    let ids = ["kv-0", "kv-1", "kv-2"];
    let mut o = Observed {
        config: Some(config(3, "kv-0", ids.iter().map(|i| voter(i)).collect())),
        replicas: ids.iter().map(|i| running(i, 3, 10)).collect(),
        rollout: Some(rollout_at(RolloutPhase::Sealing, None)),
        ..Default::default()
    };
    let seal = |o: &mut Observed, i: usize, digest: u8| {
        let s = o.replicas[i].status.as_mut().unwrap();
        s.sealed_at = Some(11);
        s.sealed_digest = Some(vec![digest]);
    };
    // One sealed, and one (faulty) sealed with another snapshot: no t + 1 agree yet.
    seal(&mut o, 0, 1);
    seal(&mut o, 2, 9);
    let p = plan("kv", &d, &o);
    assert_eq!(set_rollout(&p), None, "{:?}", p.actions);
    assert!(p.conditions.degraded.is_none());
    // A second voter with the same snapshot: t + 1 vouch for it; the third (lagging or
    // lying) is replaced with the rest and state-transfers from the barrier.
    seal(&mut o, 1, 1);
    let p = plan("kv", &d, &o);
    assert_eq!(
        set_rollout(&p).flatten(),
        Some(rollout_at(RolloutPhase::Replacing, Some(11)))
    );
    let restarts = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::RestartReplica { .. }))
        .count();
    assert_eq!(restarts, 3);
    // Resuming: done once t + 1 voters are unsealed.
    o.rollout = Some(rollout_at(RolloutPhase::Resuming, Some(11)));
    o.replicas[0].status.as_mut().unwrap().sealed_at = None;
    assert_ne!(set_rollout(&plan("kv", &d, &o)), Some(None));
    o.replicas[1].status.as_mut().unwrap().sealed_at = None;
    assert_eq!(set_rollout(&plan("kv", &d, &o)), Some(None));
}

#[test]
fn interrupted_rollout_rolls_back_or_retargets() {
    // Back to the old version while sealing: resume under the old one.
    let mut o = steady(1, 3);
    o.rollout = Some(rollout_at(RolloutPhase::Sealing, None));
    let p = plan("kv", &desired(1), &o);
    assert!(p.actions.contains(&Action::Resume { machine: kv("1.0.0") }));
    assert_eq!(set_rollout(&p), Some(None));

    // Back to the old version while replacing: the replace phase goes on towards 1.0.0.
    o.rollout = Some(rollout_at(RolloutPhase::Replacing, Some(11)));
    let p = plan("kv", &desired(1), &o);
    assert_eq!(set_rollout(&p).flatten().map(|r| r.to), Some(kv("1.0.0")));

    // A failure during a rollout is fenced first.
    let mut o = steady(1, 3);
    o.rollout = Some(rollout_at(RolloutPhase::Sealing, None));
    o.replicas[1].health = Health::Failed {
        reason: "killed".into(),
    };
    let d = Desired {
        machine: kv("2.0.0"),
        ..desired(1)
    };
    assert!(reconfig(&plan("kv", &d, &o)).member("kv-1").is_none());
}

#[test]
fn no_rollout_while_repairing() {
    let d = Desired {
        machine: kv("2.0.0"),
        ..desired(1)
    };
    let o = Observed {
        config: Some(config(4, "kv-0", vec![voter("kv-0")])),
        replicas: vec![running("kv-0", 4, 20)],
        ..Default::default()
    };
    let p = plan("kv", &d, &o);
    assert!(set_rollout(&p).is_none());
    assert!(p.actions.iter().any(|a| matches!(a, Action::CreateReplica { .. })));
}

fn starting(id: &str) -> ObservedReplica {
    ObservedReplica {
        health: Health::Starting,
        status: None,
        ..running(id, 0, 0)
    }
}

#[test]
fn no_new_epoch_until_a_surviving_voter_is_confirmed_running() {
    // Both voters of t = 1 died; kv-1's pod still looks alive for a moment (not answering).
    // Fencing kv-0 into an epoch whose only voter is kv-1 would throw kv-0's full copy away
    // if kv-1 is dead too: wait, report Degraded.
    let mut o = steady(1, 3);
    o.replicas[0].health = Health::Failed {
        reason: "container exited with code 137".into(),
    };
    o.replicas[1] = starting("kv-1");
    let p = plan("kv", &desired(1), &o);
    assert!(
        p.actions.is_empty(),
        "no fence without a running survivor: {:?}",
        p.actions
    );
    let why = p.conditions.degraded.unwrap_or_default();
    assert!(why.contains("kv-0") && why.contains("kv-1 starting"), "{why}");

    // kv-1 answers: now kv-0 is fenced and kv-1 leads.
    o.replicas[1] = running("kv-1", 3, 10);
    let c = reconfig(&plan("kv", &desired(1), &o)).clone();
    assert_eq!((c.epoch, c.primary.as_str()), (4, "kv-1"));

    // kv-1 fails too: every voter failed, nothing data-losing.
    o.replicas[1].health = Health::Failed { reason: "gone".into() };
    let p = plan("kv", &desired(1), &o);
    assert!(p.actions.is_empty());
}

#[test]
fn new_primary_is_one_that_answers() {
    // t = 2: the primary failed; kv-1 has the longer log but does not answer yet, kv-2 does.
    let mut o = steady(2, 7);
    o.replicas[0].health = Health::Failed {
        reason: "exited".into(),
    };
    o.replicas[1] = ObservedReplica {
        health: Health::Starting,
        ..running("kv-1", 7, 50)
    };
    o.replicas[2].status.as_mut().unwrap().last_index = 12;
    let c = reconfig(&plan("kv", &desired(2), &o)).clone();
    assert_eq!(c.primary, "kv-2");
}

fn deletes_volume(p: &Plan, id: &str) -> bool {
    p.actions.contains(&Action::DeleteVolume { id: id.into() })
}

#[test]
fn fenced_volume_is_kept_until_redundancy_is_restored() {
    // kv-1 was fenced (epoch 4); its pod is gone, its volume remains.
    let mut o = Observed {
        config: Some(config(4, "kv-0", vec![voter("kv-0")])),
        replicas: vec![running("kv-0", 4, 20)],
        next_ordinal: 2,
        volumes: vec!["kv-0".into(), "kv-1".into()],
        ..Default::default()
    };
    let p = plan("kv", &desired(1), &o);
    assert!(!deletes_volume(&p, "kv-1"), "1 of 2 voters: keep it: {:?}", p.actions);
    replacement_is_kv_2(&p); // a new name and volume
    // The replacement is a learner: still not fully redundant.
    o.config = Some(config(5, "kv-0", vec![voter("kv-0"), learner("kv-2")]));
    o.replicas = vec![running("kv-0", 5, 20), running("kv-2", 5, 20)];
    o.volumes.push("kv-2".into());
    assert!(!deletes_volume(&plan("kv", &desired(1), &o), "kv-1"));
    // Promoted, both voters answer: now the fenced volume goes, and only it.
    o.config = Some(config(6, "kv-0", vec![voter("kv-0"), voter("kv-2")]));
    o.replicas = vec![running("kv-0", 6, 20), running("kv-2", 6, 20)];
    let p = plan("kv", &desired(1), &o);
    assert!(deletes_volume(&p, "kv-1"), "{:?}", p.actions);
    assert!(!deletes_volume(&p, "kv-0") && !deletes_volume(&p, "kv-2"));
    // A voter down again before that happened: kept.
    o.replicas[1] = starting("kv-2");
    assert!(!deletes_volume(&plan("kv", &desired(1), &o), "kv-1"));
}

#[test]
fn voter_on_the_target_image_reporting_another_version_halts_the_rollout() {
    let img = |version: &str, image: &str| MachineRef {
        image: Some(image.into()),
        ..kv(version)
    };
    let d = Desired {
        machine: img("1.1.0", "img:2"),
        ..desired(1)
    };
    let mut o = steady(1, 3);
    o.rollout = Some(Rollout {
        from: img("1.0.0", "img:1"),
        to: img("1.1.0", "img:2"),
        phase: RolloutPhase::Replacing,
        seal_index: Some(11),
    });
    // Both restarted on img:2, but the binary in it reports 1.0.0.
    for r in &mut o.replicas {
        r.machine = img("1.0.0", "img:2");
    }
    let p = plan("kv", &d, &o);
    assert_eq!(set_rollout(&p), None, "never leaves Replacing: {:?}", p.actions);
    assert!(!p.actions.iter().any(|a| matches!(a, Action::Resume { .. })));
    assert_eq!(p.conditions.degraded_reason.as_deref(), Some("WrongMachineVersion"));
    let why = p.conditions.degraded.unwrap_or_default();
    assert!(
        why.contains("kv-0 runs img:2 but reports kv 1.0.0") && why.contains("does not contain the version"),
        "{why}"
    );
    // Reporting the target identity on the target image: resume.
    for r in &mut o.replicas {
        r.machine = img("1.1.0", "img:2");
    }
    let p = plan("kv", &d, &o);
    assert!(p.actions.iter().any(|a| matches!(a, Action::Resume { .. })));
    // The right version from the wrong image (an old image restarted): not done either.
    o.replicas[1].machine = img("1.1.0", "img:1");
    assert!(
        !plan("kv", &d, &o)
            .actions
            .iter()
            .any(|a| matches!(a, Action::Resume { .. }))
    );
    // Spec set back: the rollout is retargeted to the old machine (rollback).
    for r in &mut o.replicas {
        r.machine = img("1.0.0", "img:2");
    }
    let back = Desired {
        machine: img("1.0.0", "img:1"),
        ..desired(1)
    };
    let p = plan("kv", &back, &o);
    assert_eq!(set_rollout(&p).flatten().map(|r| r.to), Some(img("1.0.0", "img:1")));
}
