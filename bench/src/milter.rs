//! Ingest with a milter chain (a real rspamd and a real OpenDKIM, started here on loopback)
//! against the same without milters, and against Postfix without and with the same two
//! milters (`smtpd_milters`), in one run on one machine. Every server holds what it accepts
//! (spoold `--no-delivery`, Postfix its hold queue); a sample of what each kept is checked for
//! both milters' headers, so a chain that silently did nothing cannot be measured.

use crate::ingest::{
    clear_postfix_queue, load, postconf, spoold_binary, start_postfix, Load, RunResult, Spoold,
};
use crate::median;
use anyhow::{ensure, Context, Result};
use std::net::SocketAddr;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Messages per run.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Runs per server; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also measure a local Postfix without and with the same milters (needs root;
    /// reconfigures and restarts the system Postfix).
    #[arg(long)]
    compare_postfix: bool,
    /// Postfix's SMTP address.
    #[arg(long, default_value = "127.0.0.1:25")]
    postfix_addr: SocketAddr,
}

fn chain(rspamd: SocketAddr, opendkim: SocketAddr) -> String {
    format!(
        "[[filter.milter]]\nname = \"rspamd\"\nsocket = \"inet:{rspamd}\"\nend_timeout_secs = 60\n\
         [[filter.milter]]\nname = \"opendkim\"\nsocket = \"inet:{opendkim}\"\nclients = \"trusted\"\n"
    )
}

/// Whether a kept message carries both milters' marks.
fn both_marks(message: &str) -> bool {
    message.contains("DKIM-Signature:") && message.contains("X-Spamd-Result:")
}

/// One message from spoold's spool.
fn spooled_sample(state: &std::path::Path) -> Result<String> {
    let entry = std::fs::read_dir(state.join("spool"))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".body"))
        .context("nothing spooled")?;
    Ok(String::from_utf8_lossy(&std::fs::read(entry.path())?).into_owned())
}

/// One message from Postfix's hold queue, headers included.
fn held_sample() -> Result<String> {
    let list = Command::new("postqueue").arg("-j").output()?;
    let first = String::from_utf8_lossy(&list.stdout)
        .lines()
        .next()
        .and_then(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["queue_id"].as_str().map(str::to_string)
        })
        .context("postfix holds nothing")?;
    let shown = Command::new("postcat").args(["-hbq", &first]).output()?;
    Ok(String::from_utf8_lossy(&shown.stdout).into_owned())
}

pub fn run(a: Args) -> Result<()> {
    let bin = spoold_binary()?;
    let milters = tempfile::tempdir()?;
    let rspamd_dir = milters.path().join("rspamd");
    let dkim_dir = milters.path().join("opendkim");
    std::fs::create_dir_all(&rspamd_dir)?;
    std::fs::create_dir_all(&dkim_dir)?;
    let rspamd = tests::milters::Rspamd::start(&rspamd_dir);
    let dkim = tests::milters::OpenDkim::start(&dkim_dir);
    let shape = Load {
        rate: None,
        sessions: a.sessions,
        messages: a.messages,
        size: a.size,
    };
    let with_chain = chain(rspamd.addr, dkim.addr);
    let postfix_chain = format!("smtpd_milters = inet:{}, inet:{}", rspamd.addr, dkim.addr);
    let mut rows: Vec<(&str, Vec<RunResult>)> =
        vec![("spoold", Vec::new()), ("spoold+milters", Vec::new())];
    if a.compare_postfix {
        rows.push(("postfix", Vec::new()));
        rows.push(("postfix+milters", Vec::new()));
    }
    let mut keep = Vec::new();
    for _ in 0..a.runs {
        for (name, results) in rows.iter_mut() {
            let r = match *name {
                "spoold" | "spoold+milters" => {
                    let dir = crate::scratch_dir(None)?;
                    let state = dir.path().join("state");
                    let config = if *name == "spoold" { "" } else { &with_chain };
                    let d = Spoold::start_config(&bin, &state, config, false)?;
                    let r = load(d.smtp, shape)?;
                    drop(d);
                    if *name == "spoold+milters" {
                        ensure!(
                            both_marks(&spooled_sample(&state)?),
                            "spoold kept a message without both milters' headers"
                        );
                    }
                    keep.push(dir);
                    r
                }
                _ => {
                    let milters_on = *name == "postfix+milters";
                    start_postfix(&[
                        "smtpd_client_restrictions = check_client_access static:HOLD",
                        "relayhost =",
                        "milter_default_action = tempfail",
                        "milter_protocol = 6",
                        if milters_on {
                            &postfix_chain
                        } else {
                            "smtpd_milters ="
                        },
                    ])?;
                    clear_postfix_queue();
                    let r = load(a.postfix_addr, shape)?;
                    if milters_on {
                        ensure!(
                            both_marks(&held_sample()?),
                            "postfix held a message without both milters' headers"
                        );
                    }
                    r
                }
            };
            ensure!(r.errors == 0, "{name}: {} messages refused", r.errors);
            results.push(r);
        }
    }
    if a.compare_postfix {
        clear_postfix_queue();
        postconf(&["smtpd_milters ="])?;
    }
    println!(
        "milter ingest: {} sessions, {} messages of {} B per run, median of {} runs; milters: rspamd {} (milter mode, self-scan), OpenDKIM (signing, simple/simple, RSA 2048)",
        a.sessions,
        a.messages,
        a.size,
        a.runs,
        rspamd.addr
    );
    println!(
        "{:<18} {:>10} {:>9} {:>9}",
        "server", "msgs/s", "p50 ms", "p99 ms"
    );
    let mut medians = std::collections::HashMap::new();
    for (name, results) in &rows {
        let m = median(results.iter().map(|r| r.msgs_per_s).collect());
        medians.insert(*name, m);
        println!(
            "{:<18} {:>10.0} {:>9.2} {:>9.2}",
            name,
            m,
            median(results.iter().map(|r| r.p50_ms).collect()),
            median(results.iter().map(|r| r.p99_ms).collect()),
        );
    }
    let ratio = |a: &str, b: &str| medians[a] / medians[b];
    println!(
        "spoold+milters / spoold = {:.2} (what the chain costs)",
        ratio("spoold+milters", "spoold")
    );
    if a.compare_postfix {
        println!(
            "spoold+milters / postfix+milters = {:.2} (goal: >= 1)",
            ratio("spoold+milters", "postfix+milters")
        );
        println!(
            "postfix+milters / postfix = {:.2}",
            ratio("postfix+milters", "postfix")
        );
    }
    crate::remove_scratch(keep);
    Ok(())
}
