//! `spoold`: the Spoolpair daemon.
//!
//! It is the wiring and the daemon's own jobs: here the command line, the configuration and
//! the exit codes (78 for a bad configuration); `daemon.rs` starts the parts in order and
//! stops them. By job: `ingest/` (SMTP in, to a durable spool pair), `delivery/` (the queue
//! manager, next hops, DSNs), `ha/` (replication's daemon side, handover, the role),
//! `admin/` (the admin socket, takeover recovery), `lifecycle.rs` (the one owner of every
//! move of a message), `archiving.rs`, `clustered.rs` (the clusterable keys), `http.rs`,
//! `metrics.rs`, `last_words.rs`. It is the only crate that touches signals and systemd; the
//! storage, protocol and replication logic live in the library crates (`spool`, `smtp`,
//! `filter`, `peer`, `hasync`, `archive`, `cluster`, `track`).

mod admin;
mod archiving;
mod clock;
mod clustered;
mod config;
mod daemon;
mod delivery;
mod ha;
mod http;
mod ingest;
mod last_words;
mod lifecycle;
mod metrics;
mod quarantine;
mod queue;
mod storage;
mod tls;
mod webconsole;

use anyhow::{Context, Result};
use clap::Parser;
use config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Console HTTPS listen address, or `off` (overrides `console.listen` and
    /// `console.enabled`).
    #[arg(long, value_name = "ADDR|off")]
    console_listen: Option<String>,
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
    match cli.console_listen.as_deref() {
        None => {}
        Some("off") => cfg.console.enabled = false,
        Some(a) => {
            cfg.console.listen = a
                .parse()
                .with_context(|| format!("--console-listen {a:?}: not ip:port or off"))?;
            cfg.console.enabled = true;
        }
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
                Ok(None) => {
                    if let Err(e) = archiving::check_prefix(&cfg, o) {
                        eprintln!("spoold: {}{e:#}", config_file_prefix(&cli));
                        return ExitCode::from(78);
                    }
                }
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
    match runtime.block_on(daemon::run(cfg)) {
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
