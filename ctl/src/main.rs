//! `spoolctl`: the operator's tool for a running `spoold`, like postqueue/postsuper or
//! `exim -bp`/`-M`: queue listing and surgery, `input/` insertion, roles and status. It talks to
//! the daemon's admin socket (`<state_dir>/spoold.sock`, mode 0600): one JSON request, one JSON
//! answer. It is not: a second writer of the spool; every change goes through the daemon.
//!
//! Exit codes: 0 done; 1 the daemon refused or part of the request failed; 2 usage error;
//! 3 the daemon could not be reached.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "spoolctl",
    about = "Operate a running spoold",
    after_help = "Exit codes: 0 done; 1 refused or partly failed; 2 usage error; 3 spoold not reachable."
)]
struct Cli {
    /// spoold's state directory (its admin socket is spoold.sock in it).
    #[arg(
        long,
        env = "SPOOLD_STATE_DIR",
        default_value = "./var/spoold",
        global = true
    )]
    state_dir: PathBuf,
    /// Print the daemon's answer as JSON (stable, for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Role, partner link, lag, pending replication actions, queue depth by folder.
    Status,
    /// Set this unit's role.
    Role {
        /// active or passive
        role: String,
    },
    /// Insert the pairs in input/ (what SIGUSR2 does), reporting each id.
    Insert,
    /// Queue tools.
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Retry every deferred message now.
    Flush,
    /// Takeover recovery, run on the unit that is active after takeback: list the partner's
    /// leftovers in spool/ and vscan/ over the authenticated peer link, keep there the copies
    /// of messages held here (they are replicas), copy the rest that was not delivered here
    /// into input/ with checksums, insert and verify them, then remove on the partner what was
    /// moved and what was delivered here; finally remove here what the partner delivered while
    /// it was active, and replicate anew. Every step is idempotent: run it again after any
    /// crash.
    Recover {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Offline: a spool folder copied out of a dead unit instead of the partner.
        #[arg(long, value_name = "PATH")]
        from_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// List messages (spool, vscan, hold, quarantine unless --folder).
    List {
        /// Only this folder.
        #[arg(long)]
        folder: Option<String>,
        /// Sender contains.
        #[arg(long)]
        sender: Option<String>,
        /// A recipient contains.
        #[arg(long)]
        rcpt: Option<String>,
        /// Older than this many seconds.
        #[arg(long)]
        older_than: Option<u64>,
    },
    /// Envelope, headers and delivery history of one message.
    Show { id: String },
    /// Keep messages from delivery (moves them to hold/).
    Hold(Ids),
    /// Release held messages and retry them now.
    Release(Ids),
    /// Retry messages now.
    Requeue(Ids),
    /// Remove messages for good.
    Delete(Ids),
}

#[derive(clap::Args)]
struct Ids {
    /// Message ids.
    ids: Vec<String>,
    /// Every message the filters select (as for `queue list`).
    #[arg(long)]
    all: bool,
    /// With --all: only this folder.
    #[arg(long)]
    folder: Option<String>,
    /// With --all: sender contains.
    #[arg(long)]
    sender: Option<String>,
    /// With --all: a recipient contains.
    #[arg(long)]
    rcpt: Option<String>,
}

fn call(state_dir: &std::path::Path, req: &Value) -> Result<Value, (u8, String)> {
    call_with_progress(state_dir, req, |_| {})
}

/// Sends one request and returns its answer; `{"progress": ...}` lines that come before the
/// answer go to `on_progress`.
fn call_with_progress(
    state_dir: &std::path::Path,
    req: &Value,
    mut on_progress: impl FnMut(&Value),
) -> Result<Value, (u8, String)> {
    let path = state_dir.join("spoold.sock");
    let mut s = UnixStream::connect(&path)
        .map_err(|e| (3, format!("cannot reach spoold at {}: {e}", path.display())))?;
    let line = format!("{req}\n");
    s.write_all(line.as_bytes())
        .map_err(|e| (3, format!("send to spoold: {e}")))?;
    let mut answer = BufReader::new(s);
    let v: Value = loop {
        let mut reply = String::new();
        answer
            .read_line(&mut reply)
            .map_err(|e| (3, format!("read from spoold: {e}")))?;
        let v: Value = serde_json::from_str(&reply)
            .map_err(|e| (3, format!("bad answer from spoold: {e}")))?;
        match v.get("progress") {
            Some(p) => on_progress(p),
            None => break v,
        }
    };
    if v["ok"] == json!(true) {
        Ok(v["data"].clone())
    } else {
        Err((1, v["error"].as_str().unwrap_or("refused").to_string()))
    }
}

fn ids_for(cli: &Cli, ids: &Ids) -> Result<Vec<String>, (u8, String)> {
    if !ids.all {
        if ids.ids.is_empty() {
            return Err((2, "give message ids or --all".into()));
        }
        return Ok(ids.ids.clone());
    }
    let list = call(
        &cli.state_dir,
        &json!({ "cmd": "list", "folder": ids.folder, "sender": ids.sender, "rcpt": ids.rcpt, "older_than_secs": null }),
    )?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect())
}

fn human(cmd: &Cmd, data: &Value) -> String {
    let mut out = String::new();
    match cmd {
        Cmd::Queue {
            cmd: QueueCmd::List { .. },
        } => {
            let list = data.as_array().cloned().unwrap_or_default();
            for m in &list {
                out.push_str(&format!(
                    "{:<28} {:<10} {:>9} {:<30} {}\n",
                    m["id"].as_str().unwrap_or(""),
                    m["folder"].as_str().unwrap_or(""),
                    m["size"],
                    format!("<{}>", m["sender"].as_str().unwrap_or("")),
                    m["recipients"]
                        .as_array()
                        .map(|r| r
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(" "))
                        .unwrap_or_default()
                ));
                if let Some(e) = m["last_error"].as_str() {
                    out.push_str(&format!("    ({e})\n"));
                }
            }
            out.push_str(&format!("-- {} message(s)\n", list.len()));
        }
        Cmd::Queue {
            cmd: QueueCmd::Show { .. },
        } => {
            out.push_str(data["envelope"].as_str().unwrap_or(""));
            out.push('\n');
            out.push_str(&data["headers"].as_str().unwrap_or("").replace("\r\n", "\n"));
        }
        Cmd::Insert => {
            for id in data["inserted"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "new mail inserted (id={})\n",
                    id.as_str().unwrap_or("")
                ));
            }
            for id in data["duplicates"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "duplicate removed from input/ (id={})\n",
                    id.as_str().unwrap_or("")
                ));
            }
            for c in data["corrupt"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "rejected {}: {}\n",
                    c["name"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                ));
            }
        }
        Cmd::Recover { .. } => {
            for p in data["plan"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<28} {:<8} {:>9}  {}\n",
                    p["id"].as_str().unwrap_or(""),
                    p["folder"]
                        .as_str()
                        .unwrap_or("")
                        .rsplit('/')
                        .next()
                        .unwrap_or(""),
                    p["size"],
                    p["action"].as_str().unwrap_or("")
                ));
            }
            for f in data["failed"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "FAILED {}: {}\n",
                    f["id"].as_str().unwrap_or(""),
                    f["error"].as_str().unwrap_or("")
                ));
            }
            if data["dry_run"] == json!(true) {
                out.push_str("dry run: nothing changed\n");
            } else {
                let n = |k: &str| data[k].as_array().map(|a| a.len()).unwrap_or(0);
                out.push_str(&format!(
                    "moved {} / duplicates removed {} / held here, kept {} / removed here (delivered by partner) {} / failed {}\n",
                    n("moved"),
                    n("duplicates"),
                    n("held_here_kept"),
                    n("delivered_by_partner_removed_here"),
                    n("failed")
                ));
            }
        }
        Cmd::Status => {
            out.push_str(&format!("role: {}\n", data["role"].as_str().unwrap_or("?")));
            if let Some(ha) = data["ha"].as_object() {
                for (k, v) in ha {
                    if k != "role" {
                        out.push_str(&format!("{k}: {v}\n"));
                    }
                }
            }
            if let Some(q) = data["queue"].as_object() {
                for (k, v) in q {
                    out.push_str(&format!("queue {k}: {v}\n"));
                }
            }
        }
        _ => {
            if let Some(done) = data["done"].as_array() {
                for id in done {
                    out.push_str(&format!("ok {}\n", id.as_str().unwrap_or("")));
                }
                for f in data["failed"].as_array().into_iter().flatten() {
                    out.push_str(&format!("failed {}\n", f["error"].as_str().unwrap_or("")));
                }
            } else {
                out.push_str(&format!("{data}\n"));
            }
        }
    }
    out
}

fn run(cli: &Cli, on_progress: impl FnMut(&Value)) -> Result<Value, (u8, String)> {
    let req = match &cli.cmd {
        Cmd::Status => json!({ "cmd": "status" }),
        Cmd::Role { role } => json!({ "cmd": "role", "role": role }),
        Cmd::Insert => json!({ "cmd": "insert" }),
        Cmd::Flush => json!({ "cmd": "flush" }),
        Cmd::Recover { dry_run, from_dir } => {
            let req = json!({ "cmd": "recover", "dry_run": dry_run, "progress": true, "from_dir": from_dir.as_ref().map(|p| p.display().to_string()) });
            return call_with_progress(&cli.state_dir, &req, on_progress);
        }
        Cmd::Queue { cmd } => match cmd {
            QueueCmd::List {
                folder,
                sender,
                rcpt,
                older_than,
            } => {
                json!({ "cmd": "list", "folder": folder, "sender": sender, "rcpt": rcpt, "older_than_secs": older_than })
            }
            QueueCmd::Show { id } => json!({ "cmd": "show", "id": id }),
            QueueCmd::Hold(ids) => json!({ "cmd": "hold", "ids": ids_for(cli, ids)? }),
            QueueCmd::Release(ids) => json!({ "cmd": "release", "ids": ids_for(cli, ids)? }),
            QueueCmd::Requeue(ids) => json!({ "cmd": "requeue", "ids": ids_for(cli, ids)? }),
            QueueCmd::Delete(ids) => json!({ "cmd": "delete", "ids": ids_for(cli, ids)? }),
        },
    };
    call(&cli.state_dir, &req)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Recovery can take a while on a large spool: count its steps (on a terminal only).
    let bar = matches!(cli.cmd, Cmd::Recover { .. })
        .then(|| std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .unwrap_or(false)
        .then(|| {
            let pb = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg:>16} [{bar:40}] {pos}/{len} {elapsed}",
            ) {
                pb.set_style(style.progress_chars("=> "));
            }
            pb.set_message("listing");
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        });
    let result = run(&cli, |p| {
        if let Some(pb) = &bar {
            pb.set_length(p["total"].as_u64().unwrap_or(0));
            pb.set_position(p["done"].as_u64().unwrap_or(0));
            pb.set_message(p["step"].as_str().unwrap_or("").to_string());
        }
    });
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    match result {
        Ok(data) => {
            let text = if cli.json {
                format!("{data}\n")
            } else {
                human(&cli.cmd, &data)
            };
            print!("{text}");
            let partly_failed = data["failed"].as_array().is_some_and(|f| !f.is_empty())
                || data["corrupt"].as_array().is_some_and(|c| !c.is_empty());
            let _ = std::io::stdout().flush();
            ExitCode::from(u8::from(partly_failed))
        }
        Err((code, msg)) => {
            eprintln!("spoolctl: {msg}");
            ExitCode::from(code)
        }
    }
}
