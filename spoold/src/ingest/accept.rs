//! The SMTP accept loop: the session limit, the role check (a passive unit answers `421`),
//! and the count of open sessions that a shutdown waits for.
//!
//! It is not: the SMTP protocol (`smtp`) or what becomes of a message (`sink.rs`).

use super::sink::SpoolSink;
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
