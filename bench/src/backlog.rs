//! A large backlog: spool N messages with delivery off, stop spoold with kill -9, start it
//! delivering to `smtp-sink`, and time how long until it is ready, until the sink has every
//! message, and until the spool is empty, sampling its RSS while it drains; beside a small
//! backlog's drain rate, in the same invocation.

use crate::ingest::{free_addr, load, spoold_binary, Load, Spoold};
use crate::relay::sink;
use anyhow::Result;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Messages in the large backlog.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Messages in the small backlog whose drain rate the large one is compared with.
    #[arg(long, default_value_t = 5_000)]
    small: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Concurrent SMTP sessions filling the spool.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
}

/// What one backlog's drain measured.
struct Drain {
    messages: usize,
    ready: Duration,
    sink_has_all: Duration,
    spool_empty: Option<Duration>,
    peak_rss_mib: f64,
    /// Peak of the anonymous part alone (heap, stacks).
    peak_anon_mib: f64,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.messages as f64 / (self.sink_has_all - self.ready).as_secs_f64()
    }
}

fn spool_files(state: &Path) -> usize {
    std::fs::read_dir(state.join("spool")).map_or(0, |d| d.count())
}

fn drain(a: &Args, messages: usize) -> Result<Drain> {
    let bin = spoold_binary()?;
    let dir = crate::scratch_dir(None)?;
    let state = dir.path().join("state");
    let sink_addr = free_addr()?;
    let config = format!(
        "[delivery]\ndefault_next_hop = \"{sink_addr}\"\nconcurrency_max = 20\nper_destination_max = 20\n"
    );
    {
        let d = Spoold::start_config(&bin, &state, &config, false)?;
        load(
            d.smtp,
            Load {
                rate: None,
                sessions: a.sessions,
                messages,
                size: a.size,
            },
        )?;
        // Dropped: kill -9, as a crash or a power cut would leave it.
    }
    anyhow::ensure!(
        spool_files(&state) == 2 * messages,
        "{} files spooled for {messages} messages",
        spool_files(&state)
    );
    // The sink exits on receiving its last message, before it answers it: spoold keeps that
    // one message for a later attempt, which is why "the spool is empty" allows one message.
    let mut sink = sink(sink_addr, messages)?;
    let started = Instant::now();
    let d = Spoold::start_config(&bin, &state, &config, true)?;
    let ready = started.elapsed();
    let mut peak: f64 = 0.0;
    let mut peak_anon: f64 = 0.0;
    let mut sample = |d: &Spoold| {
        peak = peak.max(d.rss_mib().0);
        peak_anon = peak_anon.max(d.rss_split_mib().0);
    };
    let deadline = started + Duration::from_secs(3600);
    while sink.try_wait()?.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "not drained within an hour");
        sample(&d);
        std::thread::sleep(Duration::from_millis(200));
    }
    let sink_has_all = started.elapsed();
    let empty_by = Instant::now() + (sink_has_all * 2).max(Duration::from_secs(60));
    let mut spool_empty = None;
    while Instant::now() < empty_by {
        sample(&d);
        if spool_files(&state) <= 2 {
            spool_empty = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(d);
    crate::note_deletions();
    Ok(Drain {
        messages,
        ready,
        sink_has_all,
        spool_empty,
        peak_rss_mib: peak,
        peak_anon_mib: peak_anon,
    })
}

pub fn run(a: Args) -> Result<()> {
    let small = drain(&a, a.small)?;
    let large = drain(&a, a.messages)?;
    println!(
        "backlog: messages of {} B spooled with delivery off, spoold killed -9 and started delivering to smtp-sink (archive on, 20 connections)",
        a.size
    );
    println!(
        "{:>10} {:>9} {:>14} {:>14} {:>12} {:>14} {:>14} {:>15}",
        "backlog",
        "ready s",
        "sink has all s",
        "spool empty s",
        "empty/sink",
        "drain msgs/s",
        "peak RSS MiB",
        "of it anon MiB"
    );
    for d in [&small, &large] {
        let empty = d
            .spool_empty
            .map_or("not yet".to_string(), |e| format!("{:.1}", e.as_secs_f64()));
        let ratio = d.spool_empty.map_or("-".to_string(), |e| {
            format!("{:.2}", e.as_secs_f64() / d.sink_has_all.as_secs_f64())
        });
        println!(
            "{:>10} {:>9.2} {:>14.1} {:>14} {:>12} {:>14.0} {:>14.0} {:>15.0}",
            d.messages,
            d.ready.as_secs_f64(),
            d.sink_has_all.as_secs_f64(),
            empty,
            ratio,
            d.rate(),
            d.peak_rss_mib,
            d.peak_anon_mib
        );
    }
    println!(
        "drain rate at {} / at {}: {:.2} (goal: >= 0.8)",
        large.messages,
        small.messages,
        large.rate() / small.rate()
    );
    Ok(())
}
