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
    match role {
        Role::Primary | Role::Backup => (StatusCode::OK, body),
        _ => (StatusCode::SERVICE_UNAVAILABLE, body),
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
