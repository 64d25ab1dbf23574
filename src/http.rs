//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (alive),
//! `/readyz` (ready for traffic). Both health endpoints answer 200 or 503
//! with the reasons in the body.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::health::{Health, Verdict};

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `listen` and serves in the background.
pub async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|err| format!("cannot listen on {listen} (http.listen): {err}"))?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    tracing::info!(%listen, "http endpoint up");
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "http endpoint failed");
        }
    }))
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    respond(state.health.liveness())
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    respond(state.health.readiness())
}

fn respond(verdict: Verdict) -> (StatusCode, String) {
    if verdict.ok {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            verdict.reasons.join("\n") + "\n",
        )
    }
}
