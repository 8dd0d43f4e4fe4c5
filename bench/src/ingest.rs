//! SMTP ingest: N sessions sending fixed-size mail, as fast as replies allow; against spoold and,
//! in the same run, against a local Postfix that keeps every message in its hold queue.

use crate::{describe_fs, median};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Messages per run, spread over the sessions.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Runs per server; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also measure a local Postfix (needs root; reconfigures and starts the system Postfix).
    #[arg(long)]
    compare_postfix: bool,
    /// Offered load in msgs/s (paced over the sessions); default: as fast as the server answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Postfix's SMTP address.
    #[arg(long, default_value = "127.0.0.1:25")]
    postfix_addr: SocketAddr,
    /// Also measure the machine's protocol ceiling: the same load into Postfix's smtp-sink
    /// (no disk), and smtp-source into smtp-sink, in the same run.
    #[arg(long)]
    compare_ceiling: bool,
    /// spoold's `spool.sync` settings to measure, comma-separated: `fsync`, `syncfs`.
    #[arg(long, default_value = "fsync,syncfs", value_delimiter = ',')]
    sync: Vec<String>,
    /// spoold state directory (default: a temporary directory under ./target).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Run spoold with its portable writer (`spool.io_uring = false`), the path taken where
    /// io_uring is blocked.
    #[arg(long)]
    portable: bool,
}

pub struct RunResult {
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: bench@example.com\r\nTo: sink@example.org\r\nSubject: ingest benchmark\r\n\r\n"
            .to_vec();
    let line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnop\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    while m.len() < size - 2 {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n");
    m
}

async fn read_reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(all);
        }
    }
}

/// One session: EHLO, then per message MAIL+RCPT+DATA pipelined in one write (RFC 2920), the
/// body, and the wait for the final reply, which is what the latency measures.
async fn session(
    addr: SocketAddr,
    count: usize,
    body: std::sync::Arc<Vec<u8>>,
    period: Option<Duration>,
    phase: f64,
) -> Result<(Vec<f64>, usize)> {
    let mut pace = period.map(|p| {
        // Sessions start spread over one period, so a paced load arrives evenly, not in bursts.
        let start = tokio::time::Instant::now() + p.mul_f64(phase);
        let mut i = tokio::time::interval_at(start, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    read_reply(&mut r).await?;
    w.write_all(b"EHLO bench.example\r\n").await?;
    read_reply(&mut r).await?;
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0;
    for _ in 0..count {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        w.write_all(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
            .await?;
        for _ in 0..3 {
            let rep = read_reply(&mut r).await?;
            if !rep.starts_with('2') && !rep.starts_with('3') {
                bail!("server refused: {rep}");
            }
        }
        w.write_all(&body).await?;
        w.write_all(b".\r\n").await?;
        let t = Instant::now();
        let rep = read_reply(&mut r).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        if !rep.starts_with("250") {
            errors += 1;
        }
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok((lat, errors))
}

/// The shape of one load: sessions, messages in all, bytes per message.
#[derive(Clone, Copy)]
pub struct Load {
    /// Offered load in msgs/s over all sessions; `None` sends as fast as replies come.
    pub rate: Option<f64>,
    pub sessions: usize,
    pub messages: usize,
    pub size: usize,
}

/// Sends the load `a` to `addr` and measures it.
pub fn load(addr: SocketAddr, a: Load) -> Result<RunResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let body = std::sync::Arc::new(message(a.size));
    rt.block_on(async {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..a.sessions {
            let n = a.messages / a.sessions + usize::from(k < a.messages % a.sessions);
            // Each session takes its share of the offered rate, if one is set.
            let period = a
                .rate
                .map(|r| Duration::from_secs_f64(a.sessions as f64 / r.max(0.001)));
            let phase = k as f64 / a.sessions as f64;
            tasks.push(tokio::spawn(session(addr, n, body.clone(), period, phase)));
        }
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await??;
            lat.extend(l);
            errors += e;
        }
        let secs = t.elapsed().as_secs_f64();
        lat.sort_by(|x, y| x.total_cmp(y));
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        Ok(RunResult {
            msgs_per_s: a.messages as f64 / secs,
            mb_per_s: (a.messages * a.size) as f64 / secs / 1e6,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors,
        })
    })
}

/// The spoold binary to measure: built now in release mode, or the one named by
/// `SPOOLPAIR_BENCH_SPOOLD` (to compare two builds).
pub fn spoold_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SPOOLPAIR_BENCH_SPOOLD") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let status = Command::new(cargo)
        // The whole workspace, as `cargo build --release --workspace` builds it: building
        // spoold alone resolves features differently and rebuilds (and deletes) files in
        // target/ every time the two alternate.
        .args(["build", "--release", "--workspace", "--bins"])
        .status()
        .context("build spoold")?;
    anyhow::ensure!(status.success(), "cargo build spoold failed");
    if started.elapsed() > Duration::from_secs(5) {
        // A build writes (and replaces) hundreds of MB; measured right after it, the disk is
        // still busy with them.
        eprintln!("pausing 30 s after the build");
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        std::thread::sleep(Duration::from_secs(30));
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("spoold"))
}

/// A free loopback port from below the ephemeral range (the tests' helper): a port the kernel
/// picked from that range could be taken by an outgoing connection before spoold binds it,
/// which once made a benchmark fail with "Address already in use".
pub fn free_addr() -> Result<SocketAddr> {
    Ok(tests::free_addr())
}

/// A spoold process for a benchmark; killed on drop.
pub struct Spoold {
    child: Child,
    /// Its SMTP address.
    pub smtp: SocketAddr,
    /// Its metrics address.
    pub http: SocketAddr,
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

impl Spoold {
    fn start(bin: &PathBuf, state: &std::path::Path, sync: &str, portable: bool) -> Result<Spoold> {
        let io_uring = !portable;
        Self::start_config(
            bin,
            state,
            &format!("[spool]\nsync = \"{sync}\"\nio_uring = {io_uring}\n"),
            false,
        )
    }

    /// Starts spoold on `state` with the configuration `config`; `deliver` false adds
    /// `--no-delivery`.
    pub fn start_config(
        bin: &PathBuf,
        state: &std::path::Path,
        config_text: &str,
        deliver: bool,
    ) -> Result<Spoold> {
        let smtp = free_addr()?;
        let http = free_addr()?;
        let config = state.with_extension("toml");
        std::fs::write(&config, config_text)?;
        let mut cmd = Command::new(bin);
        if !deliver {
            cmd.arg("--no-delivery");
        }
        let child = cmd
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(state)
            .args([
                "--smtp-listen",
                &smtp.to_string(),
                "--http-listen",
                &http.to_string(),
                "--console-listen",
                "off",
            ])
            .env("SPOOLD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        // Owned at once, so that a start that fails below still kills the child (left running,
        // it met its state directory being deleted under it).
        let d = Spoold { child, smtp, http };
        // Generous: a spool of a million messages takes tens of seconds to recover.
        let deadline = Instant::now() + Duration::from_secs(300);
        // Ready as systemd and a load balancer see it: `/readyz` answers 200 once recovery is
        // done and every listener is bound (a bound SMTP port alone accepts into its backlog
        // before the daemon takes connections).
        while d.get("/readyz").split_whitespace().nth(1) != Some("200") {
            anyhow::ensure!(Instant::now() < deadline, "spoold did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// The raw HTTP answer to `GET path` (empty if there is none).
    fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(self.http) else {
            return String::new();
        };
        let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Calls `set` for every thread of the daemon; `set` returns the `errno`-style status of
    /// a scheduling call for that thread, named by `what` in the error.
    fn each_thread(&self, what: &str, set: impl Fn(libc::pid_t) -> libc::c_int) -> Result<()> {
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            if set(tid) != 0 {
                anyhow::bail!(
                    "{what} for thread {tid}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }

    /// Puts every thread of the daemon in the `SCHED_IDLE` class (threads it starts later
    /// inherit it), so that it runs only on CPU time nothing else wants.
    pub fn run_when_idle(&self) -> Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a thread id of our child and a valid parameter block.
        self.each_thread("SCHED_IDLE", |tid| unsafe {
            libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param)
        })
    }

    /// Keeps every thread of the daemon (and those they start later) on CPU `cpu` alone.
    pub fn pin_to_cpu(&self, cpu: usize) -> Result<()> {
        let set = cpu_set(cpu);
        // SAFETY: a thread id of our child and a valid CPU set of the size given.
        self.each_thread("sched_setaffinity", |tid| unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
        })
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// The writer's rounds so far from `/metrics`: (rounds, mean messages per round, mean
    /// round duration in ms).
    pub fn rounds(&self) -> (f64, f64, f64) {
        let m = self.metrics();
        let value = |name: &str| metric_value(&m, name).unwrap_or(0.0);
        let rounds = value("spoold_commit_batch_messages_count");
        let per = |sum: f64| if rounds > 0.0 { sum / rounds } else { 0.0 };
        (
            rounds,
            per(value("spoold_commit_batch_messages_sum")),
            per(value("spoold_commit_duration_seconds_sum")) * 1000.0,
        )
    }

    /// CPU seconds (user + system) the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz.max(1.0)
    }

    /// Resident memory now in MiB: the heap and other anonymous memory, and mapped files (the
    /// archive index's segments: page cache the kernel can take back, counted in RSS too).
    pub fn rss_split_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| crate::status_field_mib(&status, name);
        (field("RssAnon:"), field("RssFile:") + field("RssShmem:"))
    }

    /// Resident set size now and at its peak, in MiB.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| crate::status_field_mib(&status, name);
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Spoold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn postconf(settings: &[&str]) -> Result<()> {
    let status = Command::new("postconf")
        .arg("-e")
        .args(settings)
        .status()
        .context("postconf")?;
    anyhow::ensure!(status.success(), "postconf failed");
    Ok(())
}

/// Configures the system Postfix for loopback clients plus `extra` settings, and (re)starts it.
pub fn start_postfix(extra: &[&str]) -> Result<()> {
    // Debian's "No configuration" install (what the test script picks) leaves no main.cf.
    let main_cf = std::path::Path::new("/etc/postfix/main.cf");
    if !main_cf.exists() {
        std::fs::copy("/usr/share/postfix/main.cf.debian", main_cf).context(
            "no /etc/postfix/main.cf, and /usr/share/postfix/main.cf.debian to start one",
        )?;
    }
    postconf(extra)?;
    postconf(&[
        "inet_interfaces = loopback-only",
        "inet_protocols = ipv4",
        "mynetworks = 127.0.0.0/8",
        "mydestination =",
        "relay_domains =",
        "smtpd_recipient_restrictions = permit_mynetworks, reject",
        "in_flow_delay = 0s",
        "default_process_limit = 200",
        "smtpd_client_connection_count_limit = 0",
        "smtpd_client_message_rate_limit = 0",
        "anvil_rate_time_unit = 60s",
        "maillog_file = /var/log/postfix.log",
    ])?;
    let _ = Command::new("postfix")
        .arg("stop")
        .stderr(Stdio::null())
        .status();
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("postfix")
        .arg("start")
        .status()
        .context("postfix start")?;
    anyhow::ensure!(status.success(), "postfix start failed");
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

/// Deletes all of Postfix's queued mail; true if that was many messages (and the deletion is
/// noted, see `settle_after_deletions`).
pub fn clear_postfix_queue() -> bool {
    let queued = Command::new("postqueue")
        .arg("-j")
        .output()
        .map(|o| o.stdout.iter().filter(|&&b| b == b'\n').count() > 100)
        .unwrap_or(false);
    let _ = Command::new("postsuper")
        .args(["-d", "ALL"])
        .stderr(Stdio::null())
        .status();
    if queued {
        crate::note_deletions();
    }
    queued
}

/// A table row: medians of `r`, and of the device's KiB written and flushes per message where
/// they were counted.
fn row(name: &str, r: &[RunResult], io: &[(f64, f64)]) -> (f64, String) {
    let m = median(r.iter().map(|x| x.msgs_per_s).collect());
    let io_median = |f: fn(&(f64, f64)) -> f64, digits: usize| {
        crate::median_shown(io.iter().map(f).collect(), digits, "?")
    };
    let line = format!(
        "{:<16} {:>10.0} {:>8.1} {:>9.2} {:>9.2} {:>7} {:>12} {:>12}",
        name,
        m,
        median(r.iter().map(|x| x.mb_per_s).collect()),
        median(r.iter().map(|x| x.p50_ms).collect()),
        median(r.iter().map(|x| x.p99_ms).collect()),
        r.iter().map(|x| x.errors).sum::<usize>(),
        io_median(|x| x.0, 1),
        io_median(|x| x.1, 3)
    );
    (m, line)
}

impl Args {
    fn shape(&self) -> Load {
        Load {
            rate: self.rate,
            sessions: self.sessions,
            messages: self.messages,
            size: self.size,
        }
    }
}

/// A CPU set holding `cpu` alone.
fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid set; CPU_SET ignores numbers beyond its size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Keeps the calling thread, and every thread and process it starts from now on, on CPU `cpu`.
pub fn pin_this_thread(cpu: usize) -> Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: 0 names the calling thread; a valid CPU set of the size given.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where Debian's Postfix keeps its queue (for counting what its device takes).
const POSTFIX_QUEUE: &str = "/var/spool/postfix";

/// What one spoold run cost besides its throughput.
struct Cost {
    rounds: f64,
    per_round: f64,
    round_ms: f64,
    cpu_us_per_msg: f64,
    /// The device's KiB written and flushes per message, when counted.
    io: Option<(f64, f64)>,
}

/// Postfix's `smtp-sink` on a free loopback port: answers every command at once and writes
/// nothing (the protocol ceiling); stopped when dropped.
struct Sink {
    child: Child,
    addr: SocketAddr,
}

impl Sink {
    fn start() -> Result<Sink> {
        let addr = free_addr()?;
        let mut cmd = Command::new("smtp-sink");
        // It refuses to run as root without a user to become.
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .args([&addr.to_string(), "1024"])
            .stdout(Stdio::null())
            .spawn()
            .context("smtp-sink (apt-get install postfix)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "smtp-sink did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Sink { child, addr })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// smtp-source's rate into `sink`: `sessions` sessions, `messages` messages of `size` bytes,
/// each session keeping its connection (`-d`; smtp-source does not pipeline).
fn smtp_source(sink: SocketAddr, a: &Args) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new("smtp-source")
        .args([
            "-d",
            "-s",
            &a.sessions.to_string(),
            "-m",
            &a.messages.to_string(),
            "-l",
            &a.size.to_string(),
            "-f",
            "bench@example.com",
            "-t",
            "sink@example.org",
            &sink.to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .context("smtp-source (apt-get install postfix)")?;
    anyhow::ensure!(status.success(), "smtp-source failed");
    Ok(a.messages as f64 / started.elapsed().as_secs_f64())
}

pub fn run(a: Args) -> Result<()> {
    let bin = spoold_binary()?;
    let mut ceiling = Vec::new();
    let mut source_ceiling = Vec::new();
    crate::settle_after_deletions();
    let mut rss = (0.0f64, 0.0f64);
    let mut fs = String::new();
    // Scratch directories (and Postfix's held mail) stay until every run is done: deleting
    // thousands of files before a run slows the next one (see `settle_after_deletions`), and
    // that would favour whichever server runs first.
    let mut keep = Vec::new();
    let mut theirs = Vec::new();
    let mut their_io = Vec::new();
    if a.compare_postfix {
        start_postfix(&[
            "smtpd_client_restrictions = check_client_access static:HOLD",
            "relayhost =",
        ])?;
        if clear_postfix_queue() {
            crate::settle_after_deletions();
        }
    }
    let mut ours: Vec<(String, Vec<RunResult>, Vec<Cost>)> = a
        .sync
        .iter()
        .map(|s| (s.clone(), Vec::new(), Vec::new()))
        .collect();
    // Runs interleave (fsync, syncfs, Postfix, fsync, ...), so that whatever drifts on the
    // machine during the benchmark weighs on every server alike.
    for _ in 0..a.runs {
        for (sync, results, costs) in ours.iter_mut() {
            let dir = crate::scratch_dir(a.state_dir.as_deref())?;
            fs = describe_fs(dir.path());
            let d = Spoold::start(&bin, &dir.path().join("state"), sync, a.portable)?;
            let cpu_before = d.cpu_seconds();
            let (r, io) = crate::with_device_io(dir.path(), || load(d.smtp, a.shape()))?;
            let (rounds, per_round, round_ms) = d.rounds();
            costs.push(Cost {
                rounds,
                per_round,
                round_ms,
                cpu_us_per_msg: (d.cpu_seconds() - cpu_before) * 1e6 / a.messages as f64,
                io: io.map(|io| io.per_message(a.messages)),
            });
            results.push(r);
            let (now, peak) = d.rss_mib();
            rss = (rss.0.max(now), rss.1.max(peak));
            drop(d);
            keep.push(dir);
        }
        if a.compare_ceiling {
            let sink = Sink::start()?;
            ceiling.push(load(sink.addr, a.shape())?);
            source_ceiling.push(smtp_source(sink.addr, &a)?);
        }
        if a.compare_postfix {
            let queue = std::path::Path::new(POSTFIX_QUEUE);
            let (r, io) = crate::with_device_io(queue, || load(a.postfix_addr, a.shape()))?;
            theirs.push(r);
            their_io.extend(io.map(|io| io.per_message(a.messages)));
        }
    }
    if a.compare_postfix {
        clear_postfix_queue();
    }
    println!(
        "ingest: {} sessions, {} messages of {} B per run, median of {} runs; spool on {}; spoold's writer: {}",
        a.sessions,
        a.messages,
        a.size,
        a.runs,
        fs,
        if a.portable { "portable" } else { "io_uring" }
    );
    println!(
        "{:<16} {:>10} {:>8} {:>9} {:>9} {:>7} {:>12} {:>12}",
        "server", "msgs/s", "MB/s", "p50 ms", "p99 ms", "errors", "disk KiB/msg", "flushes/msg"
    );
    let mut medians = Vec::new();
    for (sync, results, costs) in &ours {
        let io: Vec<(f64, f64)> = costs.iter().filter_map(|c| c.io).collect();
        let (m, line) = row(&format!("spoold {sync}"), results, &io);
        println!("{line}");
        medians.push((sync, m));
    }
    if !theirs.is_empty() {
        let (m_theirs, line) = row("postfix", &theirs, &their_io);
        println!("{line}");
        for (sync, m) in &medians {
            println!(
                "spoold {sync} / postfix accepted msgs/s = {:.2} (goal: >= 5)",
                m / m_theirs
            );
        }
    }
    if !ceiling.is_empty() {
        let (m_ceiling, line) = row("ceiling", &ceiling, &[]);
        println!("{line}");
        let m_source = median(source_ceiling);
        println!(
            "ceiling: this load into smtp-sink (no disk); smtp-source into smtp-sink: {m_source:.0} msgs/s"
        );
        for (sync, m) in &medians {
            println!(
                "spoold {sync} / ceiling = {:.2}, / smtp-source ceiling = {:.2} (goal: >= 0.5)",
                m / m_ceiling,
                m / m_source
            );
        }
    }
    println!(
        "spoold's writer (medians): rounds, messages per round, ms per round, CPU µs per message"
    );
    for (sync, _, costs) in &ours {
        let med = |f: fn(&Cost) -> f64| median(costs.iter().map(f).collect());
        println!(
            "  {sync:<8} {:>8.0} {:>8.1} {:>8.2} {:>8.0}",
            med(|c| c.rounds),
            med(|c| c.per_round),
            med(|c| c.round_ms),
            med(|c| c.cpu_us_per_msg)
        );
    }
    println!(
        "disk KiB/msg, flushes/msg: what the spool's device wrote and how many cache flushes it did during a run, synced after it"
    );
    println!(
        "spoold RSS after the run: {:.1} MiB, peak {:.1} MiB (goal: well under 128 MiB)",
        rss.0, rss.1
    );
    crate::remove_scratch(keep);
    Ok(())
}
