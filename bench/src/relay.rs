//! End to end: SMTP in, (optionally) clamd, SMTP out to Postfix's smtp-sink; spoold next to
//! Postfix relaying the same load to the same kind of sink, in the same run.

use crate::ingest::{
    clear_postfix_queue, free_addr, load, spoold_binary, start_postfix, Load, Spoold,
};
use crate::median;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Messages per run.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Runs per setup; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also relay through the local Postfix (needs root; reconfigures the system Postfix).
    #[arg(long)]
    compare_postfix: bool,
    /// Postfix's SMTP address.
    #[arg(long, default_value = "127.0.0.1:25")]
    postfix_addr: SocketAddr,
    /// Seconds to wait before each measured run, so that no run starts right after the previous
    /// run's deletions (ext4 without a journal slows inode allocation for a minute or more after
    /// them; see BENCHMARKS.md). Each run still pays for its own deletions, as a gateway does.
    #[arg(long, default_value_t = 35)]
    settle: u64,
    /// spoold's `spool.sync`: `auto` (the default: fsync here), `fsync` or `syncfs`.
    #[arg(long, default_value = "auto")]
    sync: String,
}

/// smtp-sink that exits after `n` messages: its exit marks the last delivery.
pub fn sink(addr: SocketAddr, n: usize) -> Result<Child> {
    let child = Command::new("smtp-sink")
        .args([
            "-u",
            "nobody",
            "-M",
            &n.to_string(),
            &addr.to_string(),
            "256",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("start smtp-sink (apt-get install postfix)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "smtp-sink did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn wait_sink(mut child: Child, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("not everything was delivered within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A clamd with only the EICAR test signature, for the scan path.
fn clamd(dir: &Path) -> Result<Child> {
    std::fs::create_dir_all(dir.join("db"))?;
    std::fs::write(
        dir.join("db/eicar.hdb"),
        "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature\n",
    )?;
    let conf = dir.join("clamd.conf");
    std::fs::write(
        &conf,
        format!(
            "LocalSocket {0}/clamd.sock\nDatabaseDirectory {0}/db\nForeground yes\nLogFile {0}/clamd.log\n\
             PidFile {0}/clamd.pid\nTemporaryDirectory {0}\nScanMail yes\nUser root\nMaxThreads 20\n",
            dir.display()
        ),
    )?;
    let child = Command::new("clamd")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn()
        .context("start clamd")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(dir.join("clamd.sock")).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "clamd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// One spoold relay run: msgs/s end to end, spoold's peak RSS in MiB, and spoold's CPU
/// (user + system) per message in µs, from its start to the sink's last message.
fn run_spoold(a: &Args, clamd_sock: Option<&Path>, archive: bool) -> Result<(f64, f64, f64)> {
    let bin = spoold_binary()?;
    let dir = crate::scratch_dir(None)?;
    let sink_addr = free_addr()?;
    let filter = clamd_sock
        .map(|p| format!("[filter]\nclamd = \"unix:{}\"\n", p.display()))
        .unwrap_or_default();
    let config = format!(
        "[spool]\nsync = \"{}\"\n[delivery]\ndefault_next_hop = \"{sink_addr}\"\nconcurrency_max = 20\nper_destination_max = 20\n{filter}[archive]\nenabled = {archive}\n",
        a.sync
    );
    let sink = sink(sink_addr, a.messages)?;
    let d = Spoold::start_config(&bin, &dir.path().join("state"), &config, true)?;
    let t = Instant::now();
    let shape = Load {
        rate: None,
        sessions: a.sessions,
        messages: a.messages,
        size: a.size,
    };
    load(d.smtp, shape)?;
    let result = wait_sink(sink, Duration::from_secs(600));
    let secs = t.elapsed().as_secs_f64();
    let (_, peak) = d.rss_mib();
    let cpu_us = d.cpu_seconds() * 1e6 / a.messages as f64;
    drop(d);
    result?;
    Ok((a.messages as f64 / secs, peak, cpu_us))
}

fn run_postfix(a: &Args) -> Result<f64> {
    let sink_addr = free_addr()?;
    start_postfix(&[
        "smtpd_client_restrictions =",
        &format!("relayhost = [{}]:{}", sink_addr.ip(), sink_addr.port()),
        "default_destination_concurrency_limit = 20",
        "smtp_tls_security_level = none",
    ])?;
    clear_postfix_queue();
    let sink = sink(sink_addr, a.messages)?;
    let t = Instant::now();
    load(
        a.postfix_addr,
        Load {
            rate: None,
            sessions: a.sessions,
            messages: a.messages,
            size: a.size,
        },
    )?;
    wait_sink(sink, Duration::from_secs(600))?;
    Ok(a.messages as f64 / t.elapsed().as_secs_f64())
}

pub fn run(a: Args) -> Result<()> {
    let (mut plain, mut plain_cpu) = (Vec::new(), Vec::new());
    let (mut unarchived, mut unarchived_cpu) = (Vec::new(), Vec::new());
    let (mut scanned, mut scanned_cpu) = (Vec::new(), Vec::new());
    let mut rss = Vec::new();
    let mut postfix = Vec::new();
    let clam_dir = tempfile::tempdir_in("target")?;
    let mut clam = clamd(clam_dir.path())?;
    crate::settle_after_deletions();
    let settle = || std::thread::sleep(Duration::from_secs(a.settle));
    for _ in 0..a.runs {
        settle();
        let (rate, peak, cpu) = run_spoold(&a, None, true)?;
        plain.push(rate);
        plain_cpu.push(cpu);
        rss.push(peak);
        settle();
        let (rate, _, cpu) = run_spoold(&a, None, false)?;
        unarchived.push(rate);
        unarchived_cpu.push(cpu);
        settle();
        let (rate, _, cpu) = run_spoold(&a, Some(&clam_dir.path().join("clamd.sock")), true)?;
        scanned.push(rate);
        scanned_cpu.push(cpu);
        if a.compare_postfix {
            settle();
            postfix.push(run_postfix(&a)?);
        }
    }
    let _ = clam.kill();
    let _ = clam.wait();
    crate::note_deletions();
    println!(
        "relay: {} sessions, {} messages of {} B per run, SMTP in → spool → SMTP out to smtp-sink, median of {} runs; spool.sync = {}",
        a.sessions, a.messages, a.size, a.runs, a.sync
    );
    println!(
        "{:<30} {:>10} {:>16}",
        "setup", "msgs/s", "spoold CPU µs/msg"
    );
    let p = median(plain);
    println!(
        "{:<30} {:>10.0} {:>16.0}",
        "spoold, no scan",
        p,
        median(plain_cpu)
    );
    println!(
        "{:<30} {:>10.0} {:>16.0}",
        "spoold, no scan, no archive",
        median(unarchived),
        median(unarchived_cpu)
    );
    println!(
        "{:<30} {:>10.0} {:>16.0}",
        "spoold + clamd",
        median(scanned),
        median(scanned_cpu)
    );
    println!(
        "spoold peak RSS (no scan, archive on, {} sessions): {:.0} MiB",
        a.sessions,
        median(rss)
    );
    if !postfix.is_empty() {
        let f = median(postfix);
        println!("{:<30} {:>10.0}", "postfix (no scan)", f);
        println!("spoold / postfix end to end = {:.2} (goal: >= 3)", p / f);
    }
    Ok(())
}
