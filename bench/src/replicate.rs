//! Ingest with replication off and async, and the replication lag under that load.

use crate::ingest::{free_addr, load, metric_value as value, spoold_binary, Load, Spoold};
use crate::median;
use anyhow::Result;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Messages per run.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Runs per mode; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Offered load in msgs/s (paced over the sessions); default: as fast as the server answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Directory for the partner's state (default: beside the active unit's, on the same
    /// disk). A tmpfs such as /dev/shm takes the partner's writes off the active unit's disk,
    /// as a real pair's second machine does; the two still share the CPUs.
    #[arg(long)]
    partner_dir: Option<std::path::PathBuf>,
    /// Run the partner at idle CPU priority (`SCHED_IDLE`): it gets only the CPU time unit A
    /// leaves, so that A's throughput shows what replication costs A itself, as on a real
    /// pair's two machines (with `--partner-dir` on a tmpfs, B's disk writes are off A's disk
    /// too). The lag then says nothing about a real pair: B runs late by design.
    #[arg(long)]
    partner_idle: bool,
    /// Replace the partner with a stand-in in this process that acknowledges every action as
    /// soon as it is read and stores nothing: A's throughput then shows what replication costs
    /// A itself with a partner that takes nothing from A's machine. Lag figures are then the
    /// link's, not a real partner's.
    #[arg(long, conflicts_with_all = ["partner_dir", "partner_idle"])]
    instant_partner: bool,
    /// Model two one-vCPU machines: the load generator and unit A (also with replication off)
    /// on CPU 0, unit B on CPU 1, so that B's work does not take A's CPU time. The kernel's
    /// own threads (block I/O completion, writeback) and the disk stay shared.
    #[arg(long, conflicts_with_all = ["instant_partner", "partner_idle"])]
    split_cpus: bool,
}

fn quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    tests::quantile_in_metrics(metrics, name, q)
}

/// Configurations of units A and B, and B's replication address.
fn pair_configs(dir: &Path) -> Result<(String, String, std::net::SocketAddr)> {
    let (a_peer, b_peer) = (free_addr()?, free_addr()?);
    let mut texts = Vec::new();
    for (name, role, listen, partner) in [
        ("gw_a", "active", a_peer, b_peer),
        ("gw_b", "passive", b_peer, a_peer),
    ] {
        let cert = rcgen::generate_simple_self_signed(vec!["spoolpair-peer".into()])?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem())?;
        std::fs::write(&k, cert.key_pair.serialize_pem())?;
        texts.push(format!(
            "node_name = \"{name}\"\n[ha]\npartner = \"{partner}\"\nlisten = \"{listen}\"\nsecret = \"{}\"\n\
             role = \"{role}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            crate::instant_partner::SECRET,
            c.display(),
            k.display()
        ));
    }
    Ok((texts.remove(0), texts.remove(0), b_peer))
}

/// Per run of one mode: msgs/s, DATA-end→250 p99 ms, lag p50 ms, lag p99 ms, and the CPU µs
/// per message that unit A and its partner B spent.
#[derive(Default)]
struct ModeRuns {
    rate: Vec<f64>,
    reply_p99: Vec<f64>,
    lag_p50: Vec<f64>,
    lag_p99: Vec<f64>,
    cpu_a: Vec<f64>,
    cpu_b: Vec<f64>,
    /// A's mean commit round, and the mean part of it spent logging the round's ADDs, in ms.
    round_ms: Vec<f64>,
    log_ms: Vec<f64>,
    /// A's device: KiB written and cache flushes per message (B's too when it shares it).
    disk_kib: Vec<f64>,
    flushes: Vec<f64>,
}

impl ModeRuns {
    fn note_io(&mut self, io: Option<crate::DeviceIo>, messages: usize) {
        if let Some(io) = io {
            let (kib, flushes) = io.per_message(messages);
            self.disk_kib.push(kib);
            self.flushes.push(flushes);
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let bin = spoold_binary()?;
    let shape = Load {
        rate: a.rate,
        sessions: a.sessions,
        messages: a.messages,
        size: a.size,
    };
    let mut modes: Vec<(&str, ModeRuns)> = ["off", "async", "sync"]
        .into_iter()
        .map(|m| (m, ModeRuns::default()))
        .collect();
    // Every run's directory stays until the end (see `settle_after_deletions`).
    crate::settle_after_deletions();
    if a.split_cpus {
        // The generator's threads and every spoold started from here inherit it; B moves.
        crate::ingest::pin_this_thread(0)?;
    }
    let mut keep = Vec::new();
    for _ in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        for (mode, runs) in modes.iter_mut() {
            let sub = dir.path().join(*mode);
            std::fs::create_dir_all(&sub)?;
            let per_msg = |cpu_s: f64| cpu_s * 1e6 / a.messages as f64;
            let result = if *mode == "off" {
                let solo =
                    Spoold::start_config(&bin, &sub.join("solo"), "node_name = \"solo\"\n", false)?;
                let cpu_before = solo.cpu_seconds();
                let (result, io) = crate::with_device_io(&sub, || load(solo.smtp, shape))?;
                runs.note_io(io, a.messages);
                runs.cpu_a.push(per_msg(solo.cpu_seconds() - cpu_before));
                runs.round_ms.push(solo.rounds().2);
                result
            } else {
                let (ca, cb, b_listen) = pair_configs(&sub)?;
                let extra = format!("replication = \"{mode}\"\n");
                let partner_scratch = match &a.partner_dir {
                    Some(p) => Some(tempfile::tempdir_in(p)?),
                    None => None,
                };
                let b_state = partner_scratch
                    .as_ref()
                    .map_or_else(|| sub.join("b"), |d| d.path().join("b"));
                let node_b = if a.instant_partner {
                    crate::instant_partner::start(b_listen)?;
                    None
                } else {
                    let b = Spoold::start_config(&bin, &b_state, &format!("{cb}{extra}"), false)?;
                    if a.partner_idle {
                        b.run_when_idle()?;
                    }
                    if a.split_cpus {
                        b.pin_to_cpu(1)?;
                    }
                    Some(b)
                };
                let cpu_b = || node_b.as_ref().map(Spoold::cpu_seconds);
                let node_a =
                    Spoold::start_config(&bin, &sub.join("a"), &format!("{ca}{extra}"), false)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while value(&node_a.metrics(), "spoold_ha_link_up") != Some(1.0) {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "replication link did not come up"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                let cpu_before = (node_a.cpu_seconds(), cpu_b());
                let (result, io) = crate::with_device_io(&sub, || {
                    let result = load(node_a.smtp, shape)?;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while value(&node_a.metrics(), "spoold_ha_pending_actions") != Some(0.0) {
                        anyhow::ensure!(Instant::now() < deadline, "replication did not drain");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Ok(result)
                })?;
                runs.note_io(io, a.messages);
                let m = node_a.metrics();
                runs.round_ms.push(node_a.rounds().2);
                let log_metric = "spoold_ha_log_append_duration_seconds";
                runs.log_ms.push(
                    value(&m, &format!("{log_metric}_sum")).unwrap_or(f64::NAN) * 1e3
                        / value(&m, &format!("{log_metric}_count")).unwrap_or(f64::NAN),
                );
                let lag_ms = |q| {
                    quantile(&m, "spoold_ha_replication_lag_seconds", q)
                        .map_or(f64::NAN, |s| s * 1e3)
                };
                runs.lag_p50.push(lag_ms(0.50));
                runs.lag_p99.push(lag_ms(0.99));
                // Until drained: B's share includes catching up after the load.
                runs.cpu_a
                    .push(per_msg(node_a.cpu_seconds() - cpu_before.0));
                if let (Some(after), Some(before)) = (cpu_b(), cpu_before.1) {
                    runs.cpu_b.push(per_msg(after - before));
                }
                result
            };
            runs.rate.push(result.msgs_per_s);
            runs.reply_p99.push(result.p99_ms);
        }
        keep.push(dir);
    }
    let offered = a.rate.map_or("as fast as answered".to_string(), |r| {
        format!("offered {r:.0} msgs/s")
    });
    println!(
        "replicate: {} sessions, {} messages of {} B per run ({offered}), median of {} runs, both units on this machine{}; partner's spool on {}",
        a.sessions,
        a.messages,
        a.size,
        a.runs,
        if a.instant_partner {
            ", the partner an instant stand-in that stores nothing"
        } else if a.partner_idle {
            ", the partner at idle CPU priority"
        } else if a.split_cpus {
            ", the generator and A on CPU 0, the partner on CPU 1"
        } else {
            ""
        },
        crate::describe_fs(a.partner_dir.as_deref().unwrap_or(&crate::scratch_base()))
    );
    println!(
        "{:<12} {:>10} {:>14} {:>12} {:>12} {:>12} {:>12} {:>11} {:>11} {:>12} {:>11}",
        "replication",
        "msgs/s",
        "250 p99 ms",
        "lag p50 ms",
        "lag p99 ms",
        "A CPU µs/msg",
        "B CPU µs/msg",
        "A ms/round",
        "log ms/rnd",
        "disk KiB/msg",
        "flushes/msg"
    );
    let runs_of = |m: &str| {
        modes
            .iter()
            .find(|(mode, _)| *mode == m)
            .map(|(_, r)| r.rate.clone())
            .unwrap_or_default()
    };
    let (off, asynch, sync) = (runs_of("off"), runs_of("async"), runs_of("sync"));
    let mut rate = std::collections::HashMap::new();
    for (mode, runs) in modes {
        let r = median(runs.rate);
        rate.insert(mode, r);
        let cpu_a = median(runs.cpu_a);
        let shown_to = |v: Vec<f64>, digits: usize| crate::median_shown(v, digits, "-");
        let shown = |v: Vec<f64>| shown_to(v, 1);
        println!(
            "{:<12} {:>10.0} {:>14.1} {:>12} {:>12} {:>12.0} {:>12} {:>11.2} {:>11} {:>12} {:>11}",
            mode,
            r,
            median(runs.reply_p99),
            shown(runs.lag_p50),
            shown(runs.lag_p99),
            cpu_a,
            shown_to(runs.cpu_b, 0),
            median(runs.round_ms),
            shown(runs.log_ms),
            shown(runs.disk_kib),
            shown_to(runs.flushes, 3)
        );
    }
    println!(
        "async costs {:.1} % of ingest throughput (goal: < 10 %); off / sync = {:.2} (goal: < 2)",
        (1.0 - rate["async"] / rate["off"]) * 100.0,
        rate["off"] / rate["sync"]
    );
    // Each run measures off, async and sync back to back: their ratios within a run are not
    // moved by the disk's drift between runs, which here is as large as the effect.
    let paired = |values: Vec<f64>, digits: usize| {
        let each: Vec<String> = values.iter().map(|v| format!("{v:.digits$}")).collect();
        format!(
            "median {:.digits$} (runs: {})",
            median(values),
            each.join(", ")
        )
    };
    let async_cost = off.iter().zip(&asynch).map(|(o, a)| (1.0 - a / o) * 100.0);
    let sync_factor = off.iter().zip(&sync).map(|(o, s)| o / s);
    println!(
        "paired within each run: async costs {} %; off / sync {}",
        paired(async_cost.collect(), 1),
        paired(sync_factor.collect(), 2)
    );
    println!(
        "lag: local commit -> partner ack, quantiles interpolated in spoold_ha_replication_lag_seconds buckets"
    );
    crate::remove_scratch(keep);
    Ok(())
}
