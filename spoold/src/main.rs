//! `spoold`: the Spoolpair daemon.
//!
//! It is the wiring: configuration, startup recovery, the group-commit writer, the SMTP
//! listener, `/metrics` `/healthz` `/readyz`, signals (SIGTERM/SIGINT stop, SIGUSR2 inserts
//! `input/`) and systemd notification. It is the only crate that touches sockets, signals and
//! systemd; the storage and protocol logic live in `spool` and `smtp`.

mod admin;
mod archiving;
mod clock;
mod clustered;
mod config;
mod delivery;
mod ha;
mod http;
mod ingest;
mod last_words;
mod lifecycle;
mod metrics;
mod queue;
mod storage;
mod tls;

use anyhow::{Context, Result};
use clap::Parser;
use config::Config;
use ha::role::follow_role;
use http::serve_http;
use ingest::accept::accept_loop;
use ingest::sink::{self, SpoolSink};
use metrics::Metrics;
use queue::Queue;
use spool::recovery::{recover, InsertOutcome};
use spool::{Backend, BackendChoice, Folder, IdGenerator, Layout, SpoolWriter};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::sync_mode;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How long sessions get to finish after SIGTERM before the writer stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Command line. With no arguments spoold runs on the embedded default configuration.
#[derive(Parser, Debug)]
#[command(version, about = "Spoolpair mail gateway spool daemon")]
struct Cli {
    /// TOML configuration file (default: the embedded configuration).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (overrides `state_dir`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// SMTP listen address (overrides `smtp.listen`).
    #[arg(long, value_name = "ADDR")]
    smtp_listen: Option<SocketAddr>,
    /// HTTP listen address for metrics and health (overrides `http.listen`).
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Node name (overrides `node_name`).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Start in this HA role (`active` or `passive`), overriding the persisted one: what a
    /// cluster manager does when it starts a unit as backup.
    #[arg(long, value_name = "ROLE")]
    role: Option<String>,
    /// Accept and spool mail but deliver nothing (overrides `delivery.enabled`).
    #[arg(long)]
    no_delivery: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn load_config(cli: &Cli) -> Result<Config> {
    let mut cfg = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = &cli.state_dir {
        cfg.state_dir = d.clone();
    }
    if let Some(a) = cli.smtp_listen {
        cfg.smtp.listen = a;
    }
    if let Some(a) = cli.http_listen {
        cfg.http.listen = a;
    }
    if let Some(n) = &cli.node_name {
        cfg.node_name = n.clone();
    }
    if cli.no_delivery {
        cfg.delivery.enabled = false;
    }
    if let Some(role) = &cli.role {
        let ha = cfg.ha.as_mut().context("--role needs an [ha] section")?;
        if hasync::proto::Role::parse(role).is_none() {
            anyhow::bail!("--role {role:?}: must be active or passive");
        }
        ha.role = role.clone();
        ha.role_forced = true;
    }
    cfg.validate().context("command-line overrides")?;
    Ok(cfg)
}

/// glibc malloc arenas at most. By default glibc gives each thread that allocates its own
/// arena (up to 8 per core) and keeps freed memory in them: the threads that hash and compress
/// mail for the archive left 160 MiB resident under a 50-session relay load, 46 MiB with 2
/// arenas (BENCHMARKS.md, "Memory").
const MALLOC_ARENAS_MAX: libc::c_int = 2;

/// With `SPOOLPAIR_MAN_DIR` set, spoold writes its manual page (`spoold.1`, from the same
/// definitions that parse its command line, so the two cannot drift) there and exits: the
/// Debian package is built with it.
fn write_manual(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    std::fs::write(dir.join("spoold.1"), page)
}

fn main() -> ExitCode {
    // SAFETY: mallopt is called before any other thread exists; it only sets a limit.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX) };
    if let Some(dir) = std::env::var_os("SPOOLPAIR_MAN_DIR") {
        return match write_manual(std::path::Path::new(&dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "spoold: write the manual page to {}: {e}",
                    dir.to_string_lossy()
                );
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPOOLD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    last_words::log_panics();
    last_words::log_fatal_signals();
    if let Ok(point) = std::env::var("SPOOLD_FAILPOINT") {
        tracing::warn!(
            failpoint = %point,
            "SPOOLD_FAILPOINT is set: this daemon will fail on purpose at that point (a test hook; never set it in production)"
        );
    }
    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spoold: {e:#}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    // A shared secret that is too short is a configuration error; one whose file cannot be
    // read stops the start, and `--check-config` (which may run before the files are made, as
    // on a fresh install) warns of it.
    if let Err(e) = cfg.check_secrets() {
        let unreadable = e.root_cause().downcast_ref::<std::io::Error>().is_some();
        if cli.check_config && unreadable {
            println!("spoold: warning: {e:#} (spoold will not start until it can be read)");
        } else {
            eprintln!("spoold: {e:#}");
            return ExitCode::from(78);
        }
    }
    if cli.check_config {
        if let Some(o) = cfg
            .archive
            .object_store
            .as_ref()
            .filter(|_| cfg.archive.enabled)
        {
            match o
                .resolve()
                .and_then(|store| archiving::probe_object_store(&store))
            {
                Ok(None) => {}
                Ok(Some(why)) => println!(
                    "spoold: warning: the archive's object store does not answer now ({why})"
                ),
                Err(e) => {
                    eprintln!("spoold: {}{e:#}", config_file_prefix(&cli));
                    return ExitCode::from(78);
                }
            }
        }
        println!("spoold: configuration ok");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spoold: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(|c| c.is::<config::Misconfigured>()) => {
            let line = format!("{}{e:#}", config_file_prefix(&cli));
            tracing::error!("fatal: {line}");
            eprintln!("spoold: {line}");
            ExitCode::from(78)
        }
        Err(e) => {
            tracing::error!("fatal: {e:#}");
            eprintln!("spoold: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// "config file PATH: " for a configuration error found after the file was read, or nothing
/// on the embedded default.
fn config_file_prefix(cli: &Cli) -> String {
    cli.config
        .as_ref()
        .map(|p| format!("config file {}: ", p.display()))
        .unwrap_or_default()
}

/// Inserts `input/` off the async threads (see [`lifecycle::Lifecycle::insert_input`]).
async fn insert(lifecycle: &Arc<lifecycle::Lifecycle>) -> Result<Vec<InsertOutcome>> {
    let l = lifecycle.clone();
    tokio::task::spawn_blocking(move || l.insert_input())
        .await
        .context("insertion task")?
}

async fn run(cfg: Config) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tls::server(&cfg)?;
    let client_tls = tls::client(&cfg)?;
    // Clustered settings on top of the file; every change (here or from another unit) reaches
    // SMTP sessions, delivery attempts and retention passes that start after it.
    let (live, live_rx) = clustered::LiveConfig::channels(&cfg, tls);
    let settings = Arc::new(clustered::Settings::open(
        &cfg.node_name,
        &cfg.state_dir,
        cfg.clone(),
        live,
    )?);
    let metrics = Arc::new(Metrics::new().context("register metrics")?);
    let layout = Layout::new(&cfg.state_dir);
    layout
        .create()
        .with_context(|| format!("create state directory {}", cfg.state_dir.display()))?;

    let started = Instant::now();
    let l = layout.clone();
    let report = tokio::task::spawn_blocking(move || recover(&l))
        .await
        .context("recovery task")?
        .with_context(|| format!("recover {}", cfg.state_dir.display()))?;
    metrics
        .recovery_seconds
        .set(started.elapsed().as_secs_f64());
    for folder in Folder::ALL {
        metrics.queue.with_label_values(&[folder.name()]).set(0);
    }
    let queue = Arc::new(Queue::default());
    for m in &report.found {
        metrics.queue_add(m.folder, 1);
        if Folder::SCHEDULED.contains(&m.folder) {
            queue.add(m.id.clone(), m.next_attempt_ms);
        }
    }
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
        messages = report.found.len(),
        tmp_removed = report.tmp_removed,
        orphans_removed = report.orphans_removed,
        reunited = report.reunited,
        corrupt = report.corrupt.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovery done"
    );

    let choice = if cfg.spool.io_uring {
        BackendChoice::Auto
    } else {
        BackendChoice::Portable
    };
    let options = spool::writer::WriterOptions {
        backend: choice,
        batch_max: cfg.spool.batch_max,
        sync: sync_mode(cfg.spool.sync, &layout),
        nameless: cfg.spool.nameless_files,
    };
    layout.set_recycling(cfg.spool.recycle_files);
    let ha_setup = ha::prepare(&cfg, &layout)?;
    let track = track::Tracker::open(
        &cfg.node_name,
        &cfg.state_dir.join("track"),
        Box::new({
            let dropped = metrics.track_dropped.clone();
            move || dropped.inc()
        }),
    )
    .context("open the message tracking log")?;
    let lifecycle = Arc::new(lifecycle::Lifecycle::new(
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

    let smtp_listener = TcpListener::bind(cfg.smtp.listen)
        .await
        .with_context(|| format!("bind SMTP listener {}", cfg.smtp.listen))?;
    let http_listener = TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("bind HTTP listener {}", cfg.http.listen))?;

    let replicator = match &ha_setup {
        Some(s) => Some(
            ha::finish(
                s,
                &layout,
                writer.clone(),
                lifecycle.clone(),
                settings.clone(),
                metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let activity = Arc::new(ha::handover::Activity::default());
    let sink = Arc::new(SpoolSink {
        lifecycle: lifecycle.clone(),
        activity: activity.clone(),
        layout: layout.clone(),
        ids: IdGenerator::new(&cfg.node_name).context("key `node_name`")?,
        writer,
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
            .map(|h| sink::SyncPolicy {
                timeout: Duration::from_millis(h.sync_timeout_ms),
                reject: h.sync_partner_down == "reject",
            }),
    });

    let scanner: Option<Arc<dyn filter::Filter>> = match &cfg.filter.clamd {
        Some(addr) => Some(Arc::new(filter::Clamd::new(
            addr.parse()
                .map_err(|e: String| anyhow::anyhow!("key `filter.clamd`: {e}"))?,
            Duration::from_secs(cfg.filter.timeout_secs),
        ))),
        None => None,
    };
    let archiving = archiving::Archiving::open(&cfg, metrics.clone(), live_rx.retention_days)?;
    if let Some(a) = &archiving {
        a.start(&cfg).await?;
    }
    let (connect_timeout, command_timeout, data_timeout) = cfg.delivery_timeouts();
    let delivery = Arc::new(delivery::Delivery::new(
        &cfg,
        layout.clone(),
        queue.clone(),
        sink.clone(),
        metrics.clone(),
        filter::VscanStage::new(layout.clone(), scanner, lifecycle.clone()),
        smtp::client::ClientConfig {
            helo: cfg.hostname.clone(),
            connect_timeout,
            command_timeout,
            data_timeout,
            tls: Some(client_tls),
        },
        live_rx.delivery,
        replicator.clone(),
        spool::remover::Remover::start(layout.clone()).context("start the spool remover")?,
        activity.clone(),
        archiving.clone(),
    ));

    // The cluster link: bound now, so a taken port fails the start.
    let (cluster_link, cluster_listener) = match &cfg.cluster {
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
    let membership = Arc::new(clustered::Membership::new(
        settings.clone(),
        lifecycle.track().clone(),
        replicator
            .clone()
            .map(|r| Arc::new(ha::PartnerLink(r)) as Arc<dyn cluster::Partner>),
        cluster_link,
        cluster::Gauges {
            member_up: metrics.cluster_member_up.clone(),
            conflicts: metrics.cluster_conflicts.clone(),
            auth_failures: metrics.cluster_auth_failures.clone(),
        },
    ));
    Arc::new(admin::Admin {
        membership: membership.clone(),
        layout: layout.clone(),
        queue: queue.clone(),
        replicator: replicator.clone(),
        activity,
        lifecycle: lifecycle.clone(),
        archiving: archiving.clone(),
    })
    .serve()
    .await
    .with_context(|| {
        format!(
            "admin socket {}",
            admin::Admin::socket_path(&layout).display()
        )
    })?;
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(r) = &replicator {
        tokio::spawn(follow_role(
            r.clone(),
            queue.clone(),
            layout.clone(),
            metrics.clone(),
        ));
    }
    tokio::spawn(serve_http(
        http_listener,
        metrics.clone(),
        ready.clone(),
        replicator.clone(),
        archiving.clone(),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let sessions = ingest::accept::Sessions::new();
    let mut accept = tokio::spawn(accept_loop(
        smtp_listener,
        live_rx.smtp,
        sink.clone(),
        shutdown_rx.clone(),
        sessions.clone(),
        cfg.smtp.sessions_max,
        replicator.clone(),
    ));
    let mut delivery_task = tokio::spawn(delivery.clone().run(shutdown_rx.clone()));
    if let Some(l) = cluster_listener {
        tokio::spawn(membership.clone().serve(l));
    }
    tokio::spawn(membership.keep_in_sync());
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

    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("install SIGUSR2 handler")?;
    // The accept loop and the queue manager run until shutdown: either ending before it is a
    // daemon that can no longer do its job, said in the log and ended with exit 1 (systemd
    // restarts it).
    let mut failure = None;
    let (mut accept_ended, mut delivery_ended) = (false, !cfg.delivery.enabled);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            ended = &mut accept, if !accept_ended => {
                accept_ended = true;
                failure = Some(format!("the SMTP accept loop ended: {}", task_end(ended)));
                break;
            }
            ended = &mut delivery_task, if !delivery_ended => {
                delivery_ended = true;
                failure = Some(format!("the queue manager ended: {}", task_end(ended)));
                break;
            }
            _ = usr2.recv() => {
                match insert(&lifecycle).await {
                    Ok(o) => tracing::info!(pairs = o.len(), "input/ insertion done"),
                    Err(e) => tracing::error!("input/ insertion failed: {e:#}"),
                }
            }
        }
    }

    tracing::info!("shutting down: refusing new sessions, finishing messages in flight");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    ready.store(false, Ordering::SeqCst);
    let _ = shutdown_tx.send(true);
    if !sessions.wait_closed(SHUTDOWN_GRACE).await {
        tracing::warn!("sessions still open after the grace period: their messages get 451");
    }
    if !accept_ended {
        accept.abort();
        let _ = accept.await;
    }
    if !delivery_ended {
        let _ = delivery_task.await;
    }
    drop(delivery);
    // Finishes what was submitted; anything later is refused (a 451 to its client).
    let s = sink.clone();
    tokio::task::spawn_blocking(move || s.writer.shutdown())
        .await
        .context("writer shutdown")?;
    let _ = std::fs::remove_file(admin::Admin::socket_path(&layout));
    if let Some(why) = failure {
        anyhow::bail!("{why}");
    }
    tracing::info!("spoold stopped");
    Ok(())
}

/// How a task that should have run until shutdown ended.
fn task_end<T>(ended: Result<T, tokio::task::JoinError>) -> String {
    match ended {
        Ok(_) => "it returned".into(),
        Err(e) if e.is_panic() => "it panicked (the panic is logged above)".into(),
        Err(e) => format!("it was cancelled: {e}"),
    }
}
