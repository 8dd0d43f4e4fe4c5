//! The daemon's long-running tasks around the core: the SMTP accept loop (session limit, role
//! check), the read-only HTTP endpoints (`/metrics`, `/healthz`, `/readyz`, `/admin/status`),
//! the task that follows the HA role (scheduling replicas on becoming active, the HA gauges),
//! and systemd's watchdog.
//!
//! It is not: the wiring (`main.rs`) or any message handling.

use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::sink::{self, SpoolSink};
use spool::{Folder, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Open SMTP sessions: counted as they start and end, so that the session limit holds and a
/// shutdown can wait for the last one to end without polling.
#[derive(Clone)]
pub struct Sessions(Arc<watch::Sender<usize>>);

/// One open session, counted until it is dropped.
pub struct SessionGuard(Sessions);

impl Sessions {
    /// No session open.
    pub fn new() -> Sessions {
        Sessions(Arc::new(watch::channel(0).0))
    }

    /// A place for one more session, unless `max` are open.
    fn enter(&self, max: usize) -> Option<SessionGuard> {
        let mut entered = false;
        self.0.send_if_modified(|n| {
            entered = *n < max;
            if entered {
                *n += 1;
            }
            entered
        });
        entered.then(|| SessionGuard(self.clone()))
    }

    /// Waits until no session is open, or `max` has passed; returns whether none is.
    pub async fn wait_closed(&self, max: Duration) -> bool {
        let mut rx = self.0.subscribe();
        tokio::time::timeout(max, rx.wait_for(|&n| n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pub async fn accept_loop(
    listener: TcpListener,
    cfg: watch::Receiver<Arc<smtp::ServerConfig>>,
    sink: Arc<SpoolSink>,
    shutdown: watch::Receiver<bool>,
    sessions: Sessions,
    sessions_max: usize,
    replicator: Option<Arc<hasync::Replicator>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Read the role at accept time, not through a task that follows it, so a session opened
        // right after a role change already sees the new role.
        let passive = replicator
            .as_ref()
            .is_some_and(|r| r.role() != hasync::proto::Role::Active);
        if passive {
            refuse(
                stream,
                b"421 4.3.2 This unit is passive (standby); use the active unit\r\n",
            );
            continue;
        }
        let Some(open) = sessions.enter(sessions_max) else {
            sink.metrics.smtp_sessions_refused.inc();
            refuse(
                stream,
                b"421 4.7.0 Error: too many connections, try again later\r\n",
            );
            continue;
        };
        sink.metrics.smtp_sessions.inc();
        // The settings in force now (clustered changes apply to sessions that start after).
        let current = cfg.borrow().clone();
        let (cfg, sink, shutdown) = (current, sink.clone(), shutdown.clone());
        tokio::spawn(async move {
            let metrics = sink.metrics.clone();
            let end = smtp::serve(stream, peer, cfg, sink, shutdown).await;
            tracing::debug!(%peer, ?end, "session ended");
            metrics.smtp_sessions.dec();
            drop(open);
        });
    }
}

/// Answers a connection we will not serve with one reply and closes it.
fn refuse(mut stream: tokio::net::TcpStream, reply: &'static [u8]) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(reply).await;
    });
}

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

/// Follows the role: becoming active schedules every message the spool holds (replicas
/// included). Also keeps the HA gauges current. (SMTP reads the role itself at accept time.)
pub async fn follow_role(
    r: Arc<hasync::Replicator>,
    queue: Arc<Queue>,
    layout: Layout,
    metrics: Arc<Metrics>,
) {
    let mut role = r.watch_role();
    let mut last = None;
    loop {
        let now = *role.borrow();
        if last != Some(now) {
            let active = now == hasync::proto::Role::Active;
            metrics.ha_active.set(i64::from(active));
            if active && last.is_some() {
                let mut n = 0;
                for folder in Folder::SCHEDULED {
                    for e in std::fs::read_dir(layout.dir(folder))
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let name = e.file_name();
                        let id = name
                            .to_str()
                            .and_then(|n| n.strip_suffix(".env"))
                            .and_then(|n| n.parse().ok());
                        if let Some(id) = id {
                            queue.add(id, 0);
                            n += 1;
                        }
                    }
                }
                tracing::warn!(
                    messages = n,
                    "now active: scheduling every message held, replicas included"
                );
            }
            last = Some(now);
        }
        if let Ok((pending, oldest)) = r.log().depth() {
            metrics.ha_pending.set(pending as i64);
            let age = oldest
                .map(|o| (sink::now_ms().saturating_sub(o)) as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics.ha_oldest_pending.set(age);
        }
        metrics
            .ha_rebuild_pending
            .set(i64::from(r.log().needs_rebuild()));
        let outbox = r.staging().outbox();
        metrics.ha_outbox_messages.set(outbox.len() as i64);
        metrics.ha_outbox_bytes.set(outbox.bytes() as i64);
        tokio::select! {
            c = role.changed() => if c.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
