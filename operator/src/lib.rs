//! `lockstep-operator`: turns `ReplicatedStateMachine` objects into running, self-healing,
//! lockstep-upgraded replica clusters.

pub mod crd;
