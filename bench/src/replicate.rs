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
}

/// Upper bound of the bucket holding quantile `q` of histogram `name` in a metrics text.
fn quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total && total > 0.0)
        .map(|(le, _)| *le)
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

/// A replication mode's name and, per run, msgs/s, lag p50 and lag p99.
type ModeRuns = (&'static str, Vec<f64>, Vec<f64>, Vec<f64>);

pub fn run(a: Args) -> Result<()> {
    let bin = spoold_binary()?;
    let shape = Load {
        sessions: a.sessions,
        messages: a.messages,
        size: a.size,
    };
    let mut off = Vec::new();
    // Per mode: msgs/s, lag p50, lag p99.
    let mut modes: Vec<ModeRuns> = vec![
        ("async", vec![], vec![], vec![]),
        ("sync", vec![], vec![], vec![]),
    ];
    for _ in 0..a.runs {
        let dir = tempfile::tempdir_in("target")?;
        let solo = Spoold::start_config(
            &bin,
            &dir.path().join("solo"),
            "node_name = \"solo\"\n",
            false,
        )?;
        off.push(load(solo.smtp, shape)?.msgs_per_s);
        drop(solo);
        for (mode, rates, p50s, p99s) in modes.iter_mut() {
            let sub = dir.path().join(*mode);
            std::fs::create_dir_all(&sub)?;
            let (ca, cb) = pair_configs(&sub)?;
            let extra = format!("replication = \"{mode}\"\n");
            let b = Spoold::start_config(&bin, &sub.join("b"), &format!("{cb}{extra}"), false)?;
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
            rates.push(load(node_a.smtp, shape)?.msgs_per_s);
            let deadline = Instant::now() + Duration::from_secs(60);
            while value(&node_a.metrics(), "spoold_ha_pending_actions") != Some(0.0) {
                anyhow::ensure!(Instant::now() < deadline, "replication did not drain");
                std::thread::sleep(Duration::from_millis(50));
            }
            let m = node_a.metrics();
            p50s.push(quantile(&m, "spoold_ha_replication_lag_seconds", 0.50).unwrap_or(f64::NAN));
            p99s.push(quantile(&m, "spoold_ha_replication_lag_seconds", 0.99).unwrap_or(f64::NAN));
            drop(b);
        }
    }
    println!(
        "replicate: {} sessions, {} messages of {} B per run, median of {} runs, both units on this machine",
        a.sessions, a.messages, a.size, a.runs
    );
    println!(
        "{:<22} {:>10} {:>14} {:>14}",
        "replication", "msgs/s", "lag p50 <= s", "lag p99 <= s"
    );
    let m_off = median(off);
    println!("{:<22} {:>10.0} {:>14} {:>14}", "off", m_off, "-", "-");
    let mut rate = std::collections::HashMap::new();
    for (mode, rates, p50s, p99s) in modes {
        let r = median(rates);
        rate.insert(mode, r);
        println!(
            "{:<22} {:>10.0} {:>14} {:>14}",
            mode,
            r,
            median(p50s),
            median(p99s)
        );
    }
    println!(
        "async costs {:.1} % of ingest throughput (goal: < 10 %); off / sync = {:.2} (goal: < 2)",
        (1.0 - rate["async"] / m_off) * 100.0,
        m_off / rate["sync"]
    );
    println!(
        "lag quantiles are upper bounds of histogram buckets; both units share this machine's disk"
    );
    Ok(())
}
