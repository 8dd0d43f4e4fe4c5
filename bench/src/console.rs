//! The console's archive search page on a large archive: N messages imported into a real
//! spoold (`spoolctl archive import`, default settings: encryption on), then each query's page
//! fetched over HTTPS by a logged-in auditor (curl, a new TLS connection each time, the audit
//! line fsynced as in production), beside `spoolctl archive search` of the same query over
//! the admin socket (the same search without the web; it includes spoolctl's own start).

use crate::ingest::{free_addr, spoold_binary};
use crate::median;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Messages in the archive.
    #[arg(long, default_value_t = 1_000_000)]
    items: usize,
    /// Fetches of each page (the median is shown).
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// Keep the state here (and reuse it when it already holds the archive).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Message `i`: one of 1,000 senders and recipients, a subject shared by 1,000 messages, a
/// word of its own.
fn message(i: usize) -> String {
    format!(
        "From: Sender {s} <sender{s}@example.org>\nTo: rcpt{r}@example.net\nSubject: report {k} week {w}\n\
         Message-ID: <{i}@bench.console>\nDate: Sat, 3 Jan 2026 01:05:34 +0000\n\n\
         The quarterly figures for region {k} are attached in the usual place.\nunique{i}\n",
        s = i % 1000,
        r = (i / 7) % 1000,
        k = i % 1000,
        w = i % 52,
    )
}

fn write_mbox(path: &Path, items: usize) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = Vec::with_capacity(512);
    for i in 0..items {
        buf.clear();
        buf.extend_from_slice(b"From sender@example.org Sat Jan  3 01:05:34 2026\n");
        archive::import::quote(message(i).as_bytes(), &mut buf);
        buf.push(b'\n');
        out.write_all(&buf)?;
    }
    out.flush()?;
    Ok(())
}

fn spoolctl(bin: &Path, state: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin.with_file_name("spoolctl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .context("spoolctl")?;
    anyhow::ensure!(
        out.status.success(),
        "spoolctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(bin: &Path, state: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&spoolctl(
        bin,
        state,
        &["--json", "archive", "status"],
    )?)?)
}

/// curl with the session's cookie jar; answers (HTTP status, seconds, body).
fn curl(jar: &Path, url: &str, form: Option<&str>) -> Result<(u16, f64, String)> {
    let mut c = Command::new("curl");
    c.args(["-sk", "-b"])
        .arg(jar)
        .arg("-c")
        .arg(jar)
        .args(["-w", "\n%{http_code} %{time_total}"]);
    if let Some(f) = form {
        c.args(["--data", f]);
    }
    let out = c
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .context("curl (apt-get install curl)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut t = tail.split_whitespace();
    let code = t.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let secs = t.next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    Ok((code, secs, body.to_string()))
}

pub fn run(args: Args) -> Result<()> {
    let bin = spoold_binary()?;
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root)?;
    let state = root.join("state");
    let console = free_addr()?;
    let mut child = Command::new(&bin)
        .args(["--no-delivery", "--state-dir"])
        .arg(&state)
        .args([
            "--smtp-listen",
            &free_addr()?.to_string(),
            "--http-listen",
            &free_addr()?.to_string(),
            "--console-listen",
            &console.to_string(),
        ])
        .env("SPOOLD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let result = measure(&args, &bin, &root, &state, console);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn measure(
    args: &Args,
    bin: &Path,
    root: &Path,
    state: &Path,
    console: std::net::SocketAddr,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(console).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "spoold did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let held = status(bin, state)?["items"].as_u64().unwrap_or(0) as usize;
    if held < args.items {
        let mbox = root.join("bench.mbox");
        eprintln!("writing {} messages to {}", args.items, mbox.display());
        write_mbox(&mbox, args.items)?;
        let started = Instant::now();
        spoolctl(bin, state, &["archive", "import", &mbox.to_string_lossy()])?;
        let imported = started.elapsed();
        eprintln!(
            "imported in {:.0} s ({:.0} msgs/s); waiting for the index",
            imported.as_secs_f64(),
            args.items as f64 / imported.as_secs_f64()
        );
        let _ = std::fs::remove_file(&mbox);
    }
    let started = Instant::now();
    loop {
        let st = status(bin, state)?;
        if st["indexed_through"] == st["last_seq"] {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!(
        "index caught up {:.0} s after the import",
        started.elapsed().as_secs_f64()
    );
    let items = status(bin, state)?["items"].as_u64().unwrap_or(0);

    let password = root.join("aud.password");
    std::fs::write(&password, "bench-auditor-password\n")?;
    let _ = spoolctl(
        bin,
        state,
        &[
            "user",
            "add",
            "aud",
            "--role",
            "auditor",
            "--password-file",
            &password.to_string_lossy(),
        ],
    );
    let base = format!("https://{console}");
    let jar = root.join("cookies.txt");
    let _ = std::fs::remove_file(&jar);
    let (_, _, login_page) = curl(&jar, &format!("{base}/login"), None)?;
    let csrf = login_page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("no CSRF token on the login page")?
        .to_string();
    let (code, _, _) = curl(
        &jar,
        &format!("{base}/login"),
        Some(&format!(
            "csrf={csrf}&user=aud&password=bench-auditor-password"
        )),
    )?;
    anyhow::ensure!(code == 303, "login answered {code}");

    let queries: [(&str, &str, usize); 6] = [
        ("every message, newest 50", "report", 1),
        ("every message, page 20", "report", 20),
        ("a subject, 0.1 % of them", "subject:\"report 7 week\"", 1),
        ("a sender, 0.1 %", "from:sender42@example.org", 1),
        ("one old message", "unique777", 1),
        ("nothing", "zzznomatch", 1),
    ];
    println!(
        "\nconsole search page on {items} archived items ({} fetches each, medians; the page includes a new TLS connection and the fsynced audit line)\n",
        args.runs
    );
    println!("| query | console page (ms) | spoolctl archive search (ms) | console / spoolctl |");
    println!("|---|---:|---:|---:|");
    for (what, q, page) in queries {
        let url = format!(
            "{base}/search?{}&page={page}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("q", q)
                .finish()
        );
        let mut web = Vec::new();
        let mut cli = Vec::new();
        for _ in 0..args.runs {
            let (code, secs, body) = curl(&jar, &url, None)?;
            anyhow::ensure!(
                code == 200 && body.contains("matching"),
                "{q}: {code} {}",
                &body[..body.len().min(300)]
            );
            web.push(secs * 1000.0);
            let started = Instant::now();
            spoolctl(
                bin,
                state,
                &[
                    "--json",
                    "archive",
                    "search",
                    q,
                    "--offset",
                    &((page - 1) * 50).to_string(),
                ],
            )?;
            cli.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let (w, c) = (median(web), median(cli));
        println!("| {what}: `{q}` | {w:.1} | {c:.1} | {:.2} |", w / c);
    }
    Ok(())
}
