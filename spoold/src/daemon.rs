//! The daemon's start, life and stop: the parts started in order, each by a function that
//! returns its handles (storage and its recovery, HA, ingest, delivery, the cluster, the admin
//! socket, HTTP), then the signals (SIGTERM/SIGINT stop, SIGUSR2 inserts `input/`) and the
//! shutdown that lets sessions finish before the writer stops.
//!
//! It is not: the command line and exit codes (`main.rs`) or any part's own work.

use crate::clustered::{LiveConfig, Membership, Settings};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::ha::handover::Activity;
use crate::ingest::accept::{accept_loop, Sessions};
use crate::ingest::sink::{SpoolSink, SyncPolicy};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::{admin, archiving, ha, http, last_words, storage, tls, webconsole};
use anyhow::{Context, Result};
use spool::recovery::{recover, InsertOutcome};
use spool::{Backend, BackendChoice, Folder, IdGenerator, Layout, SpoolWriter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long sessions get to finish after SIGTERM before the writer stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs the daemon until a signal stops it, or until a part that must run until then ends
/// (an error: systemd restarts it).
pub async fn run(cfg: Config) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::new().context("register metrics")?);
    // Clustered settings on top of the file; every change (here or from another unit) reaches
    // SMTP sessions, delivery attempts and retention passes that start after it.
    let (live, live_rx) = LiveConfig::channels(&cfg, tls::server(&cfg)?);
    let settings = Arc::new(Settings::open(
        &cfg.node_name,
        &cfg.state_dir,
        cfg.clone(),
        live,
    )?);
    let storage = start_storage(&cfg, &metrics).await?;
    let smtp_listener = bind(cfg.smtp.listen, "SMTP listener").await?;
    let http_listener = bind(cfg.http.listen, "HTTP listener").await?;
    let desk = Arc::new(crate::quarantine::Desk {
        layout: storage.layout.clone(),
        node: cfg.node_name.clone(),
        lifecycle: storage.lifecycle.clone(),
        learners: cfg
            .filter
            .milter
            .iter()
            .filter(|m| !m.learn_on_release.is_empty())
            .map(|m| (m.name.clone(), m.learn_on_release.clone()))
            .collect(),
    });
    let replicator = match &storage.ha {
        Some(setup) => Some(
            ha::finish(
                setup,
                &storage.layout,
                storage.writer.clone(),
                storage.lifecycle.clone(),
                settings.clone(),
                desk.clone(),
                metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let activity = Arc::new(Activity::default());
    let sink = ingest_sink(&cfg, &storage, &metrics, &replicator, &activity)?;
    let archiving = archiving::Archiving::open(&cfg, metrics.clone(), live_rx.retention_days)?;
    if let Some(a) = &archiving {
        a.start(&cfg).await?;
    }
    let delivery = delivery(
        &cfg,
        &storage,
        &sink,
        &metrics,
        live_rx.delivery,
        &replicator,
        &activity,
        &archiving,
    )?;
    let (membership, cluster_listener) =
        cluster(&cfg, &settings, &storage, desk, &replicator, &metrics).await?;
    let admin = Arc::new(admin::Admin {
        membership: membership.clone(),
        layout: storage.layout.clone(),
        queue: storage.queue.clone(),
        replicator: replicator.clone(),
        activity,
        lifecycle: storage.lifecycle.clone(),
        archiving: archiving.clone(),
    });
    admin.clone().serve().await.with_context(|| {
        format!(
            "admin socket {}",
            admin::Admin::socket_path(&storage.layout).display()
        )
    })?;
    webconsole::start(
        &cfg,
        &settings,
        admin.clone(),
        live_rx.users,
        metrics.clone(),
    )
    .await?;

    let ready = Arc::new(AtomicBool::new(false));
    if let Some(r) = &replicator {
        tokio::spawn(ha::role::follow_role(
            r.clone(),
            storage.queue.clone(),
            storage.layout.clone(),
            metrics.clone(),
        ));
    }
    tokio::spawn(http::serve_http(
        http_listener,
        metrics.clone(),
        ready.clone(),
        replicator.clone(),
        archiving,
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let sessions = Sessions::new();
    let running = Running {
        accept: tokio::spawn(accept_loop(
            smtp_listener,
            live_rx.smtp,
            sink.clone(),
            shutdown_rx.clone(),
            sessions.clone(),
            cfg.smtp.sessions_max,
            replicator,
        )),
        delivery: tokio::spawn(delivery.clone().run(shutdown_rx)),
        accept_ended: false,
        // Without delivery the queue manager returns at once: neither watched nor waited for.
        delivery_ended: !cfg.delivery.enabled,
    };
    if let Some(l) = cluster_listener {
        tokio::spawn(membership.clone().serve(l));
    }
    tokio::spawn(membership.keep_in_sync());
    // Handlers before readiness: until they exist a SIGUSR2 or SIGTERM takes the default
    // action and kills the daemon, and a supervisor may signal as soon as it hears "ready".
    let signals = Signals::install()?;
    ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    last_words::watch_runtime();
    tracing::info!(
        smtp = %cfg.smtp.listen,
        http = %cfg.http.listen,
        state_dir = %cfg.state_dir.display(),
        node = %cfg.node_name,
        "spoold ready"
    );

    let (running, failure) = until_stopped(running, signals, &storage.lifecycle).await;

    tracing::info!("shutting down: refusing new sessions, finishing messages in flight");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    ready.store(false, Ordering::SeqCst);
    let _ = shutdown_tx.send(true);
    if !sessions.wait_closed(SHUTDOWN_GRACE).await {
        tracing::warn!("sessions still open after the grace period: their messages get 451");
    }
    running.stop().await;
    drop(delivery);
    // Finishes what was submitted; anything later is refused (a 451 to its client).
    let s = sink.clone();
    tokio::task::spawn_blocking(move || s.writer.shutdown())
        .await
        .context("writer shutdown")?;
    let _ = std::fs::remove_file(admin::Admin::socket_path(&storage.layout));
    if let Some(why) = failure {
        anyhow::bail!("{why}");
    }
    tracing::info!("spoold stopped");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))
}

/// The spool, recovered and open: its paths, the schedule, the owner of moves, the writer,
/// and the first half of the HA setup (the log the writer's hook appends to).
struct Storage {
    layout: Layout,
    queue: Arc<Queue>,
    lifecycle: Arc<Lifecycle>,
    writer: Arc<SpoolWriter>,
    ha: Option<ha::HaSetup>,
}

/// Recovers the state directory, counts and schedules what it holds, opens the tracking log
/// and the replication log, inserts `input/`, and starts the group-commit writer.
async fn start_storage(cfg: &Config, metrics: &Arc<Metrics>) -> Result<Storage> {
    let layout = Layout::new(&cfg.state_dir);
    layout
        .create()
        .with_context(|| format!("create state directory {}", cfg.state_dir.display()))?;
    let queue = Arc::new(Queue::default());
    recover_spool(cfg, &layout, &queue, metrics).await?;
    let choice = if cfg.spool.io_uring {
        BackendChoice::Auto
    } else {
        BackendChoice::Portable
    };
    let options = spool::writer::WriterOptions {
        backend: choice,
        batch_max: cfg.spool.batch_max,
        sync: storage::sync_mode(cfg.spool.sync, &layout),
        nameless: cfg.spool.nameless_files,
    };
    layout.set_recycling(cfg.spool.recycle_files);
    let ha_setup = ha::prepare(cfg, &layout)?;
    let track = track::Tracker::open(
        &cfg.node_name,
        &cfg.state_dir.join("track"),
        Box::new({
            let dropped = metrics.track_dropped.clone();
            move || dropped.inc()
        }),
    )
    .context("open the message tracking log")?;
    let lifecycle = Arc::new(Lifecycle::new(
        layout.clone(),
        metrics.clone(),
        queue.clone(),
        ha_setup.as_ref().map(|s| s.repl.clone()),
        cfg.ha
            .as_ref()
            .map_or(0, |h| h.ledger_retention_secs.saturating_mul(1000)),
        track,
    ));
    // Pairs dropped into input/ while the daemon was down: their ADDs are logged at once.
    insert(&lifecycle).await?;
    let hook = ha_setup.as_ref().map(|s| {
        Arc::new(ha::LogHook {
            repl: s.repl.clone(),
            metrics: metrics.clone(),
        }) as Arc<dyn spool::writer::PublishHook>
    });
    let writer = Arc::new(
        SpoolWriter::start_with_hook(layout.clone(), options, Some(metrics.clone()), hook)
            .context("start spool writer")?,
    );
    metrics
        .io_uring
        .set(i64::from(writer.backend() == Backend::IoUring));
    tracing::info!(backend = ?writer.backend(), sync = ?options.sync, "spool writer started");
    Ok(Storage {
        layout,
        queue,
        lifecycle,
        writer,
        ha: ha_setup,
    })
}

/// Startup recovery: what the state directory holds is counted and scheduled; leftovers of a
/// crash are cleaned up or set aside (`spool::recovery`).
async fn recover_spool(
    cfg: &Config,
    layout: &Layout,
    queue: &Queue,
    metrics: &Metrics,
) -> Result<()> {
    let started = Instant::now();
    let l = layout.clone();
    let report = tokio::task::spawn_blocking(move || recover(&l))
        .await
        .context("recovery task")?
        .with_context(|| format!("recover {}", cfg.state_dir.display()))?;
    metrics
        .recovery_seconds
        .set(started.elapsed().as_secs_f64());
    let found = report.found.len();
    for folder in Folder::ALL {
        let held = report.found.iter().filter(|m| m.folder == folder).count();
        metrics
            .queue
            .with_label_values(&[folder.name()])
            .set(held as i64);
    }
    // Due now, in arrival order: envelopes were not read (see `spool::recovery`); the queue
    // manager reads each, sets aside what fails its checks, and puts a deferred message
    // back to its retry time.
    queue.add_all(
        report
            .found
            .into_iter()
            .filter(|m| Folder::SCHEDULED.contains(&m.folder))
            .map(|m| m.id),
        0,
    );
    metrics.corrupt.inc_by(report.corrupt.len() as u64);
    let corrupt_now = std::fs::read_dir(layout.dir(Folder::Corrupt))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".env"))
                .count()
        })
        .unwrap_or(0);
    metrics
        .queue
        .with_label_values(&[Folder::Corrupt.name()])
        .set(corrupt_now as i64);
    tracing::info!(
        messages = found,
        tmp_removed = report.tmp_removed,
        orphans_removed = report.orphans_removed,
        reunited = report.reunited,
        corrupt = report.corrupt.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovery done"
    );
    Ok(())
}

/// Inserts `input/` off the async threads (see [`Lifecycle::insert_input`]).
async fn insert(lifecycle: &Arc<Lifecycle>) -> Result<Vec<InsertOutcome>> {
    let l = lifecycle.clone();
    tokio::task::spawn_blocking(move || l.insert_input())
        .await
        .context("insertion task")?
}

/// The bridge from SMTP transactions to the spool.
fn ingest_sink(
    cfg: &Config,
    storage: &Storage,
    metrics: &Arc<Metrics>,
    replicator: &Option<Arc<hasync::Replicator>>,
    activity: &Arc<Activity>,
) -> Result<Arc<SpoolSink>> {
    let milters = cfg
        .filter
        .milter
        .iter()
        .map(|m| m.spec().map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(SpoolSink {
        milters,
        lifecycle: storage.lifecycle.clone(),
        activity: activity.clone(),
        layout: storage.layout.clone(),
        ids: IdGenerator::new(&cfg.node_name).context("key `node_name`")?,
        writer: storage.writer.clone(),
        metrics: metrics.clone(),
        hostname: cfg.hostname.clone(),
        node: cfg.node_name.clone(),
        spill_bytes: cfg.spool.spill_bytes,
        free_bytes_min: cfg.spool.free_bytes_min,
        replicator: replicator.clone(),
        sync: cfg
            .ha
            .as_ref()
            .filter(|h| h.replication == "sync")
            .map(|h| SyncPolicy {
                timeout: Duration::from_millis(h.sync_timeout_ms),
                reject: h.sync_partner_down == "reject",
            }),
    }))
}

/// The queue manager: the vscan stage, the SMTP client, the remover.
#[allow(clippy::too_many_arguments)] // the parts it is wired to, each named
fn delivery(
    cfg: &Config,
    storage: &Storage,
    sink: &Arc<SpoolSink>,
    metrics: &Arc<Metrics>,
    policy: watch::Receiver<Arc<crate::delivery::DeliveryPolicy>>,
    replicator: &Option<Arc<hasync::Replicator>>,
    activity: &Arc<Activity>,
    archiving: &Option<Arc<archiving::Archiving>>,
) -> Result<Arc<Delivery>> {
    let scanner: Option<Arc<dyn filter::Filter>> = match &cfg.filter.clamd {
        Some(addr) => Some(Arc::new(filter::Clamd::new(
            addr.parse()
                .map_err(|e: String| anyhow::anyhow!("key `filter.clamd`: {e}"))?,
            Duration::from_secs(cfg.filter.timeout_secs),
        ))),
        None => None,
    };
    let (connect_timeout, command_timeout, data_timeout) = cfg.delivery_timeouts();
    Ok(Arc::new(Delivery::new(
        cfg,
        storage.layout.clone(),
        storage.queue.clone(),
        sink.clone(),
        metrics.clone(),
        filter::VscanStage::new(storage.layout.clone(), scanner, storage.lifecycle.clone()),
        smtp::client::ClientConfig {
            helo: cfg.hostname.clone(),
            connect_timeout,
            command_timeout,
            data_timeout,
            tls: Some(tls::client(cfg)?),
        },
        policy,
        replicator.clone(),
        spool::remover::Remover::start(storage.layout.clone())
            .context("start the spool remover")?,
        activity.clone(),
        archiving.clone(),
    )))
}

/// Membership and the cluster link's listener (bound now, so a taken port fails the start).
async fn cluster(
    cfg: &Config,
    settings: &Arc<Settings>,
    storage: &Storage,
    desk: Arc<crate::quarantine::Desk>,
    replicator: &Option<Arc<hasync::Replicator>>,
    metrics: &Metrics,
) -> Result<(Arc<Membership>, Option<TcpListener>)> {
    let (link, listener) = match &cfg.cluster {
        Some(c) => {
            let secret = c.load_secret()?;
            let link = peer::link::LinkConfig::self_signed(&cfg.node_name, &secret, 0)
                .context("cluster link TLS settings")?;
            let listener = TcpListener::bind(c.listen)
                .await
                .with_context(|| format!("key `cluster.listen`: bind {}", c.listen))?;
            (Some((link, c.advertised())), Some(listener))
        }
        None => (None, None),
    };
    let membership = Arc::new(Membership::new(
        settings.clone(),
        storage.lifecycle.track().clone(),
        desk,
        replicator
            .clone()
            .map(|r| Arc::new(ha::PartnerLink(r)) as Arc<dyn cluster::Partner>),
        link,
        cluster::Gauges {
            member_up: metrics.cluster_member_up.clone(),
            conflicts: metrics.cluster_conflicts.clone(),
            auth_failures: metrics.cluster_auth_failures.clone(),
        },
    ));
    Ok((membership, listener))
}

/// The tasks that run until shutdown: ending before it is a daemon that can no longer do its
/// job.
struct Running {
    accept: JoinHandle<()>,
    delivery: JoinHandle<()>,
    /// Whether each has ended (its handle is not awaited again).
    accept_ended: bool,
    delivery_ended: bool,
}

impl Running {
    /// Stops what still runs after the sessions closed: the accept loop is cut, the queue
    /// manager finishes the attempts in flight.
    async fn stop(self) {
        if !self.accept_ended {
            self.accept.abort();
            let _ = self.accept.await;
        }
        if !self.delivery_ended {
            let _ = self.delivery.await;
        }
    }
}

/// The signals the daemon answers, caught from before it says it is ready.
struct Signals {
    term: Signal,
    int: Signal,
    usr2: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            usr2: signal(SignalKind::user_defined2()).context("install SIGUSR2 handler")?,
        })
    }
}

/// Waits for SIGTERM or SIGINT (inserting `input/` at each SIGUSR2), or for the accept loop or
/// the queue manager to end (said in the log and returned as the failure: exit 1, and systemd
/// restarts the daemon).
async fn until_stopped(
    mut running: Running,
    mut signals: Signals,
    lifecycle: &Arc<Lifecycle>,
) -> (Running, Option<String>) {
    let failure = loop {
        tokio::select! {
            _ = signals.term.recv() => break None,
            _ = signals.int.recv() => break None,
            ended = &mut running.accept, if !running.accept_ended => {
                running.accept_ended = true;
                break Some(format!("the SMTP accept loop ended: {}", task_end(ended)));
            }
            ended = &mut running.delivery, if !running.delivery_ended => {
                running.delivery_ended = true;
                break Some(format!("the queue manager ended: {}", task_end(ended)));
            }
            _ = signals.usr2.recv() => {
                match insert(lifecycle).await {
                    Ok(o) => tracing::info!(pairs = o.len(), "input/ insertion done"),
                    Err(e) => tracing::error!("input/ insertion failed: {e:#}"),
                }
            }
        }
    };
    (running, failure)
}

/// How a task that should have run until shutdown ended.
fn task_end<T>(ended: Result<T, tokio::task::JoinError>) -> String {
    match ended {
        Ok(_) => "it returned".into(),
        Err(e) if e.is_panic() => "it panicked (the panic is logged above)".into(),
        Err(e) => format!("it was cancelled: {e}"),
    }
}
