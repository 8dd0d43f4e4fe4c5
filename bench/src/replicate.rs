//! Ingest with replication off and async, and the replication lag under that load.

use crate::ingest::{free_addr, load, spoold_binary, Load, Spoold};
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
}

fn quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    tests::quantile_in_metrics(metrics, name, q)
}

fn value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn pair_configs(dir: &Path) -> Result<(String, String)> {
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
            "node_name = \"{name}\"\n[ha]\npartner = \"{partner}\"\nlisten = \"{listen}\"\nsecret = \"benchmark shared secret\"\n\
             role = \"{role}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    Ok((texts.remove(0), texts.remove(0)))
}

/// Per run of one mode: msgs/s, DATA-end→250 p99 ms, lag p50 ms, lag p99 ms.
#[derive(Default)]
struct ModeRuns {
    rate: Vec<f64>,
    reply_p99: Vec<f64>,
    lag_p50: Vec<f64>,
    lag_p99: Vec<f64>,
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
    let mut keep = Vec::new();
    for _ in 0..a.runs {
        let dir = crate::scratch_dir(None)?;
        for (mode, runs) in modes.iter_mut() {
            let sub = dir.path().join(*mode);
            std::fs::create_dir_all(&sub)?;
            let result = if *mode == "off" {
                let solo =
                    Spoold::start_config(&bin, &sub.join("solo"), "node_name = \"solo\"\n", false)?;
                load(solo.smtp, shape)?
            } else {
                let (ca, cb) = pair_configs(&sub)?;
                let extra = format!("replication = \"{mode}\"\n");
                let partner_scratch = match &a.partner_dir {
                    Some(p) => Some(tempfile::tempdir_in(p)?),
                    None => None,
                };
                let b_state = partner_scratch
                    .as_ref()
                    .map_or_else(|| sub.join("b"), |d| d.path().join("b"));
                let _b = Spoold::start_config(&bin, &b_state, &format!("{cb}{extra}"), false)?;
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
                let result = load(node_a.smtp, shape)?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while value(&node_a.metrics(), "spoold_ha_pending_actions") != Some(0.0) {
                    anyhow::ensure!(Instant::now() < deadline, "replication did not drain");
                    std::thread::sleep(Duration::from_millis(50));
                }
                let m = node_a.metrics();
                let lag_ms = |q| {
                    quantile(&m, "spoold_ha_replication_lag_seconds", q)
                        .map_or(f64::NAN, |s| s * 1e3)
                };
                runs.lag_p50.push(lag_ms(0.50));
                runs.lag_p99.push(lag_ms(0.99));
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
        "replicate: {} sessions, {} messages of {} B per run ({offered}), median of {} runs, both units on this machine; partner's spool on {}",
        a.sessions,
        a.messages,
        a.size,
        a.runs,
        crate::describe_fs(a.partner_dir.as_deref().unwrap_or(&crate::scratch_base()))
    );
    println!(
        "{:<12} {:>10} {:>14} {:>12} {:>12}",
        "replication", "msgs/s", "250 p99 ms", "lag p50 ms", "lag p99 ms"
    );
    let mut rate = std::collections::HashMap::new();
    for (mode, runs) in modes {
        let r = median(runs.rate);
        rate.insert(mode, r);
        let lag = |v: Vec<f64>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", median(v))
            }
        };
        println!(
            "{:<12} {:>10.0} {:>14.1} {:>12} {:>12}",
            mode,
            r,
            median(runs.reply_p99),
            lag(runs.lag_p50),
            lag(runs.lag_p99)
        );
    }
    println!(
        "async costs {:.1} % of ingest throughput (goal: < 10 %); off / sync = {:.2} (goal: < 2)",
        (1.0 - rate["async"] / rate["off"]) * 100.0,
        rate["off"] / rate["sync"]
    );
    println!(
        "lag: local commit -> partner ack, quantiles interpolated in spoold_ha_replication_lag_seconds buckets"
    );
    crate::remove_scratch(keep);
    Ok(())
}
