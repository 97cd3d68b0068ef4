//! The Kubernetes end-to-end suite: a real API server, kubelet and containerd, the operator
//! and replicas as pods from the images built from this workspace.
//!
//! Run it with `e2e/run.sh` (it starts a cluster, builds and loads the images, and calls
//! `cargo test -p lockstep-e2e --test e2e -- --ignored --test-threads=1`). The tests are
//! `#[ignore]`d so the default `cargo test` stays hermetic; run explicitly without a cluster,
//! each fails saying what it needs — it never counts as passed.

mod admission;
mod beyond_t;
mod byzantine;
mod byzantine_example;
mod cert_manager;
mod common;
mod deletion;
mod disruption;
mod failover;
mod gitops;
mod install_helm;
mod lifecycle;
mod operator_failover;
mod rollout;
mod scaling;
