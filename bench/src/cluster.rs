//! Clustered settings: how long a change made on one member of a cluster takes to be in effect
//! on every other member. N spoold processes on loopback form a cluster (`create` on the
//! first, `join` on the others); then each change (a new `smtp.relay_domains`, made on the
//! members in turn through their admin sockets) is timed from the request to the moment the
//! last other member's effective value equals it, polled on their admin sockets. Postfix has
//! no clustered configuration, so there is no ratio here.

use crate::ingest::{free_addr, spoold_binary, Spoold};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `bench cluster`.
#[derive(clap::Args)]
pub struct Args {
    /// Members of the cluster.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Changes made (on the members in turn).
    #[arg(long, default_value_t = 200)]
    changes: usize,
}

/// One request on a member's admin socket; its answer's data.
fn ask(state: &Path, req: &api::Request) -> Result<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(state.join("spoold.sock"))
        .with_context(|| format!("admin socket in {}", state.display()))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    match serde_json::from_str(&answer)? {
        api::Line::Answer {
            ok: true,
            data: Some(d),
            ..
        } => Ok(d),
        api::Line::Answer { error, .. } => bail!("refused: {}", error.unwrap_or_default()),
        api::Line::Progress { .. } => bail!("unexpected progress line"),
    }
}

fn effective(state: &Path) -> Result<serde_json::Value> {
    let shown = ask(
        state,
        &api::Request::from(api::Local::ConfigShow {
            key: Some("smtp.relay_domains".into()),
        }),
    )?;
    Ok(shown["keys"][0]["effective"].clone())
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Runs the benchmark and prints its table.
pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.members >= 2 && a.changes >= 1,
        "at least 2 members and 1 change"
    );
    let bin = spoold_binary()?;
    let dir = crate::scratch_dir(None)?;
    let mut units: Vec<(Spoold, PathBuf, std::net::SocketAddr)> = Vec::new();
    for i in 0..a.members {
        let state = dir.path().join(format!("m{i}"));
        let link = free_addr()?;
        let config = format!(
            "node_name = \"m{i}\"\n[cluster]\nlisten = \"{link}\"\nsecret = \"benchmark cluster secret\"\n"
        );
        let d = Spoold::start_config(&bin, &state, &config, false)?;
        // The admin socket comes up just after SMTP.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ask(&state, &api::Request::from(api::Cluster::ClusterList)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "m{i}: no admin socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        units.push((d, state, link));
    }
    ask(
        &units[0].1,
        &api::Request::from(api::Cluster::ClusterCreate {
            name: "bench".into(),
        }),
    )?;
    for u in &units[1..] {
        ask(
            &u.1,
            &api::Request::from(api::Cluster::ClusterJoin {
                addr: units[0].2.to_string(),
            }),
        )?;
    }
    let (mut set_ms, mut all_ms) = (Vec::new(), Vec::new());
    for k in 0..a.changes {
        let origin = k % a.members;
        let value = format!(r#"["c{k}.example"]"#);
        let want = serde_json::json!([format!("c{k}.example")]);
        let t = Instant::now();
        ask(
            &units[origin].1,
            &api::Request::from(api::Cluster::ConfigSet {
                key: "smtp.relay_domains".into(),
                value: Some(value),
                level: "cluster".into(),
            }),
        )?;
        set_ms.push(t.elapsed().as_secs_f64() * 1e3);
        for (i, u) in units.iter().enumerate() {
            if i == origin {
                continue;
            }
            while effective(&u.1)? != want {
                anyhow::ensure!(
                    t.elapsed() < Duration::from_secs(10),
                    "change {k} never reached m{i}"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        all_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rss: Vec<f64> = units.iter().map(|u| u.0.rss_mib().0).collect();
    println!(
        "{} members on loopback, {} changes of smtp.relay_domains made on the members in turn; state on {}",
        a.members,
        a.changes,
        crate::describe_fs(dir.path())
    );
    println!("| path | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, v) in [
        (
            "`config set` answered (validated, stored, sent to every member)",
            &mut set_ms,
        ),
        ("in effect on every other member", &mut all_ms),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            quantile(v, 0.5),
            quantile(v, 0.99),
            quantile(v, 1.0)
        );
    }
    println!(
        "RSS per member after the run: {} MiB",
        rss.iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    drop(units);
    crate::remove_scratch(vec![dir]);
    Ok(())
}
