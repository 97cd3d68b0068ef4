//! `/healthz`, `/readyz` and Prometheus `/metrics` over plain HTTP.

use crate::node::{Role, Shared};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use std::sync::Arc;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Ready when the replica serves its role in the current configuration: the primary, or a
/// backup holding every entry (learners are still catching up).
async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (role, epoch) = {
        let n = shared.lock();
        (n.role, n.epoch)
    };
    let body = format!("{} epoch {epoch}\n", role.as_str());
    if ready(role) {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Readiness decides two things on Kubernetes: which replicas the client Service sends to
/// (a backup answers clients with a hint to the primary, which clients follow), and which
/// count as healthy for the PodDisruptionBudget (`minAvailable: n - 1`). Only voters that
/// serve their role count: a learner still catching up (a replacement), a fenced or removed
/// replica, or one never configured must not, or an eviction could be allowed while
/// redundancy is reduced.
pub fn ready(role: Role) -> bool {
    match role {
        Role::Primary | Role::Backup => true,
        Role::Unconfigured | Role::Learner | Role::Removed | Role::Fenced => false,
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serving_voters_are_ready() {
        assert!(ready(Role::Primary) && ready(Role::Backup));
        for r in [Role::Unconfigured, Role::Learner, Role::Removed, Role::Fenced] {
            assert!(!ready(r), "{r:?} must not count as ready (Service, PDB)");
        }
    }
}
