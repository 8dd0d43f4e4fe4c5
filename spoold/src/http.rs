//! The read-only HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/admin/status`. Role
//! changes go through the admin socket (mode 0600) only, since this port may be opened to a
//! remote Prometheus.

use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves the endpoints until the listener fails.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    replicator: Option<Arc<hasync::Replicator>>,
    archiving: Option<Arc<crate::archiving::Archiving>>,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    // Read-only: role changes go through the admin socket (mode 0600) only, since this port may
    // be opened to a remote Prometheus.
    let app = axum::Router::new()
        .route(
            "/admin/status",
            get(move || {
                let r = replicator.clone();
                async move {
                    let Some(r) = r else { return "role active\nha off\n".to_string() };
                    let (pending, _) = r.log().depth().unwrap_or((0, None));
                    let peer = r.peer();
                    format!(
                        "role {}\nlink {}\nsplit_brain {}\npending {}\nlast_lag_ms {}\npeer {}\npeer_role {}\n",
                        r.role().as_str(),
                        if r.link_is_up() { "up" } else { "down" },
                        r.split_brain(),
                        pending,
                        r.last_lag_ms(),
                        peer.as_ref().map(|p| p.node.as_str()).unwrap_or("-"),
                        peer.as_ref().map(|p| p.role.as_str()).unwrap_or("-"),
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::SeqCst);
                // An archive that cannot write holds delivery back but not ingest: still ready,
                // and the body says why mail is piling up.
                let archive = archiving
                    .as_ref()
                    .and_then(|a| a.failing())
                    .map(|e| format!("archive failing, delivered mail held in the spool: {e}\n"))
                    .unwrap_or_default();
                async move {
                    if ready {
                        (StatusCode::OK, format!("ready\n{archive}"))
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{archive}"))
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}
