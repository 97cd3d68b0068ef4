//! `lockstep-operator`: turns `ReplicatedStateMachine` objects into running, self-healing,
//! lockstep-upgraded replica clusters.
//!
//! The reconcile loop is a pipeline with a client-free middle:
//! [`observe`] (pods, volumes, nodes, replica Admin.Status) -> [`translate`] (pure) ->
//! `lockstep_planner::plan` (pure, shared with `lockstep up`) -> [`build`] (pure objects) ->
//! apply ([`controller`]: server-side apply, creates, deletes, admin RPCs) -> [`status`]
//! (pure compute, optimistic-concurrency write).

pub mod admin;
pub mod adopt;
pub mod build;
pub mod byzantine;
pub mod cert_manager;
pub mod controller;
pub mod crd;
pub mod events;
pub mod execute;
pub mod guards;
pub mod http;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod rsm_metrics;
pub mod status;
pub mod tls;
pub mod translate;
