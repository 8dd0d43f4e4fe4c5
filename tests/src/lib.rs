//! Test harness for real `spoold` processes: start one on free loopback ports in a temporary
//! state directory, talk SMTP to it, kill it, and read its spool back.
//!
//! It is not a unit-test helper for the libraries; each library tests itself. The daemon binary
//! must be built first (`cargo build --workspace --bins`, which `scripts/test` does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use spool;

pub mod clamd;
pub mod dovecot;
pub mod garage;
pub mod milters;
pub mod powercut;
pub mod proxy;
pub mod webdriver;

/// The `spoold` binary next to the test executable's profile directory.
pub fn spoold_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("spoold");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace --bins` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// Fails the calling test, naming `what`, unless what it needs is there: a test whose tool is
/// missing never passes by skipping.
pub fn needs(what: &str, available: bool) {
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed)")
        .to_string();
    assert!(available, "{test} needs {what} (scripts/test installs it)");
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs `spoolctl` and asserts that it succeeded; returns its standard output.
pub fn spoolctl_ok(d: &Daemon, args: &[&str]) -> String {
    let (code, out, err) = spoolctl(d, args);
    assert_eq!(code, 0, "spoolctl {args:?} failed: {out}{err}");
    out
}

/// Runs `spoolctl` against the daemon's state directory; returns exit code, stdout, stderr.
pub fn spoolctl(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = spoolctl_output(d, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `spoolctl` against the daemon's state directory; its output as bytes.
pub fn spoolctl_output(d: &Daemon, args: &[&str]) -> std::process::Output {
    let bin = spoold_bin().with_file_name("spoolctl");
    assert!(
        bin.exists(),
        "{} not found: cargo build --workspace --bins",
        bin.display()
    );
    Command::new(bin)
        .arg("--state-dir")
        .arg(&d.state)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `cmd` with `input` on its standard input; returns its output.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A free loopback TCP port (bound and released).
///
/// Ports come from below the kernel's ephemeral range (32768 and up), so no outgoing
/// connection can take one between this call and the daemon's bind; within this process a
/// counter keeps them unique, and the process id spreads concurrent test binaries apart.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 10_000 + (std::process::id() % 200) * 100;
    for _ in 0..20_000 {
        let port = 10_000 + (base - 10_000 + NEXT.fetch_add(1, Ordering::SeqCst)) % 22_000;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap();
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub smtp: SocketAddr,
    pub http: SocketAddr,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    /// Extra environment for the next (re)start, e.g. `SPOOLD_FAILPOINT`.
    pub extra_env: Vec<(String, String)>,
    /// The network namespace it runs in (`ip netns`), if not the test's own.
    pub netns: Option<String>,
    /// Where its web console listens; `None`: the console is off (`--console-listen off`),
    /// so that tests of other features start no console.
    pub console: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts a daemon in a fresh temporary state directory.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Starts a daemon with extra command-line arguments; it spools but does not deliver, so
    /// tests can inspect `spool/` without the queue manager moving files under them.
    pub fn start_with(args: &[&str]) -> Daemon {
        let mut all = vec!["--no-delivery"];
        all.extend_from_slice(args);
        Self::start_raw(&all)
    }

    /// Starts a daemon that delivers (give it a config with a next hop).
    pub fn start_delivering(args: &[&str]) -> Daemon {
        Self::start_raw(args)
    }

    /// Starts a daemon (`--no-delivery`) whose state directory is `state` (on a file system of
    /// the test's choosing); its log stays in a temporary directory.
    pub fn start_in(state: &Path, args: &[&str]) -> Daemon {
        let mut all = vec!["--no-delivery"];
        all.extend_from_slice(args);
        let mut d = Self::unstarted(&all);
        d.state = state.to_path_buf();
        d.restart();
        d
    }

    /// Starts a delivering daemon in the network namespace `ns`, SMTP on `smtp` (e.g. every
    /// address, to answer on a virtual one), HTTP on the namespace's loopback.
    pub fn start_in_netns(ns: &str, smtp: SocketAddr, args: &[&str]) -> Daemon {
        let mut d = Self::unstarted(args);
        d.netns = Some(ns.to_string());
        d.smtp = smtp;
        d.http = SocketAddr::from(([127, 0, 0, 1], 9425));
        d.restart();
        d
    }

    /// `GET path` on the daemon's HTTP port, from its network namespace.
    pub fn http(&self, path: &str) -> std::io::Result<(u16, String)> {
        let (addr, path) = (self.http, path.to_string());
        match &self.netns {
            None => http_get(addr, &path),
            Some(ns) => in_netns(ns, move || http_get(addr, &path)),
        }
    }

    fn start_raw(args: &[&str]) -> Daemon {
        let mut d = Self::unstarted(args);
        d.restart();
        d
    }

    /// A daemon handle, not started.
    pub fn unstarted(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Daemon {
            child: None,
            state: dir.path().join("state"),
            smtp: free_addr(),
            http: free_addr(),
            log: dir.path().join("spoold.log"),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            extra_env: Vec::new(),
            netns: None,
            console: None,
            _dir: Some(dir),
        }
    }

    /// (Re)starts the process on the same state directory and ports; waits for `/readyz`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.netns {
            None => Command::new(spoold_bin()),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(spoold_bin());
                c
            }
        };
        let child = cmd
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--smtp-listen")
            .arg(self.smtp.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .arg("--console-listen")
            .arg(
                self.console
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "off".into()),
            )
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env(
                "SPOOLD_LOG",
                std::env::var("TEST_SPOOLD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.http("/readyz").map(|(s, _)| s == 200).unwrap_or(false) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("spoold exited early ({status}): {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("spoold not ready: {}", self.log_text());
    }

    /// A handle that only knows an SMTP address (for sending from another thread).
    pub fn handle_for(smtp: SocketAddr) -> Daemon {
        Daemon {
            child: None,
            state: PathBuf::new(),
            smtp,
            http: smtp,
            log: PathBuf::new(),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            netns: None,
            console: None,
            _dir: None,
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let status = self.child.take().unwrap().wait().unwrap();
        status.code()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Files of a folder of the state directory.
    pub fn folder(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state.join(name))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Ids with an `.env` in `spool/`.
    pub fn spooled_ids(&self) -> Vec<String> {
        self.folder("spool")
            .into_iter()
            .filter_map(|n| n.strip_suffix(".env").map(str::to_string))
            .collect()
    }

    /// The body of a spooled message with its `Received:` header (our first header) removed.
    pub fn body_without_received(&self, id: &str) -> Vec<u8> {
        let body = std::fs::read(self.state.join("spool").join(format!("{id}.body"))).unwrap();
        strip_received(&body).to_vec()
    }

    /// The envelope of a spooled message, decoded and verified.
    pub fn envelope(&self, id: &str) -> spool::Envelope {
        let bytes = std::fs::read(self.state.join("spool").join(format!("{id}.env"))).unwrap();
        spool::Envelope::decode(&bytes).unwrap()
    }

    /// A metric's value from `/metrics` (first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http("/metrics").ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Drops the first header block line group starting with `Received:` (with its folded lines).
pub fn strip_received(body: &[u8]) -> &[u8] {
    assert!(
        body.starts_with(b"Received: "),
        "body must start with our Received: header"
    );
    let mut i = 0;
    loop {
        let nl = body[i..].iter().position(|&b| b == b'\n').unwrap() + i + 1;
        i = nl;
        if !matches!(body.get(i), Some(b' ') | Some(b'\t')) {
            return &body[i..];
        }
    }
}

/// A minimal HTTP/1.0 GET; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http(addr, "GET", path)
}

/// A minimal HTTP/1.0 POST without a body; returns status and body.
pub fn http_post(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http(addr, "POST", path)
}

fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A plain-text SMTP client speaking line by line: enough to script any conversation.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> (Client, String) {
        Self::wrap(TcpStream::connect(addr).unwrap())
    }

    /// Connects within `timeout` and reads the greeting; `None` when nothing answers (a server
    /// down, an address moving between units).
    pub fn try_connect(addr: SocketAddr, timeout: Duration) -> Option<(Client, String)> {
        TcpStream::connect_timeout(&addr, timeout)
            .ok()
            .map(Self::wrap)
    }

    /// How long a reply may take before `reply()` gives up (30 s unless set).
    pub fn set_timeout(&self, t: Duration) {
        let _ = self.writer.set_read_timeout(Some(t));
        let _ = self.reader.get_ref().set_read_timeout(Some(t));
    }

    /// Connects from the source address `from` (see [`stranger_ip`]) and reads the greeting.
    pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> (Client, String) {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        s.connect(&addr.into()).unwrap();
        Self::wrap(s.into())
    }

    fn wrap(s: TcpStream) -> (Client, String) {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = c.reply();
        (c, greeting)
    }

    /// Sends raw bytes. A write error (the server closed the connection) is not a panic: the
    /// next `reply()` returns the empty string, which the caller checks.
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// Reads one complete (possibly multi-line) reply; empty string on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Sends a command line and returns its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// One whole transaction with a dot-stuffed body; returns the final reply to DATA.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "RCPT: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(&dot_stuff(body));
        self.send(b".\r\n");
        self.reply()
    }

    /// Closes the write side (the server sees EOF).
    pub fn shutdown_write(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }
}

/// Dot-stuffs a CRLF body for transmission.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_start = true;
    for &b in body {
        if at_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_start = b == b'\n';
    }
    out
}

/// The queue id from a `250 2.0.0 Ok: queued as ID` reply.
pub fn queued_id(reply: &str) -> Option<String> {
    reply
        .trim_end()
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .map(str::to_string)
}

/// A self-signed certificate and key for `localhost`, written as PEM files into `dir`.
pub fn write_self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// After a crash and a restart: no half pair is visible in `spool/`, and every acknowledged
/// message (id → the body sent) is there, whole (its body matches its envelope's length and
/// checksum) and byte-identical. `what` names the round in failure messages.
pub fn assert_acknowledged_whole(
    d: &Daemon,
    acked: &std::collections::HashMap<String, Vec<u8>>,
    what: &str,
) {
    let spool = d.folder("spool");
    for name in &spool {
        let (stem, ext) = name.rsplit_once('.').unwrap();
        let other = if ext == "env" { "body" } else { "env" };
        assert!(
            spool.contains(&format!("{stem}.{other}")),
            "{what}: half a pair visible: {name}"
        );
        // Every pair whole, acknowledged or not: recovery works from names and would not
        // notice a torn one (the queue manager would set it aside later).
        if ext == "env" {
            let layout = spool::Layout::new(&d.state);
            if let Err(why) =
                spool::recovery::validate_pair(&layout, spool::Folder::Spool, stem, true)
            {
                panic!("{what}: {stem} not whole: {why}");
            }
        }
    }
    for (id, body) in acked {
        assert!(
            spool.contains(&format!("{id}.env")),
            "{what}: acknowledged {id} lost"
        );
        assert!(
            &d.body_without_received(id) == body,
            "{what}: {id} bytes differ"
        );
    }
}

/// A source address outside the default `trusted_networks` (TEST-NET-1, RFC 5737), added to
/// `lo` so that a test client reaches the daemon as a stranger would, not as a loopback client
/// with an emptied trust list. Needs root (CI runs as root); a test that needs it fails without.
pub fn stranger_ip() -> std::net::IpAddr {
    let ip = "192.0.2.77";
    let out = Command::new("ip")
        .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .output()
        .expect("ip (iproute2) is needed to add a TEST-NET address to lo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            || stderr.contains("File exists")
            || stderr.contains("already assigned"),
        "cannot add {ip} to lo (root needed): {stderr}"
    );
    ip.parse().unwrap()
}

/// True when `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A distinctive message body of about `len` bytes, CRLF lines, some starting with a dot.
pub fn sample_body(seed: usize, len: usize) -> Vec<u8> {
    let mut body = format!("From: test{seed}@example.com\r\nSubject: message {seed}\r\nMessage-ID: <{seed}@test>\r\n\r\n").into_bytes();
    let mut line = 0;
    while body.len() < len {
        let l = if line % 7 == 3 {
            format!(".dotted line {seed} {line}\r\n")
        } else {
            format!(
                "line {line} of message {seed}: the quick brown fox jumps over the lazy dog\r\n"
            )
        };
        body.extend_from_slice(l.as_bytes());
        line += 1;
    }
    body
}

/// The `Message-ID` of a message written by [`sample_body`] with `seed`.
pub fn sample_message_id(seed: usize) -> String {
    format!("<{seed}@test>")
}

/// The `Message-ID:` header's value in a message's text.
pub fn message_id_of(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix("Message-ID: ")
            .map(|v| v.trim_end().to_string())
    })
}

/// Sends `n` distinct messages ([`sample_body`] numbered from `first`, about 1,500 bytes) over
/// one session to `addr`; returns the Message-IDs that got `250`. Stops at the first `421`
/// (the unit stopped accepting) or a closed connection; any other reply fails the test, so a
/// load that silently did nothing cannot pass.
pub fn send_numbered(addr: SocketAddr, first: usize, n: usize) -> Vec<String> {
    let (mut c, greeting) = Client::connect(addr);
    let mut acked = Vec::new();
    if greeting.starts_with("421") {
        return acked;
    }
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let r = c.cmd("EHLO load");
    assert!(r.starts_with("250"), "EHLO: {r}");
    for seed in first..first + n {
        let steps = [
            "MAIL FROM:<load@example.com>".to_string(),
            "RCPT TO:<rcpt@example.org>".to_string(),
            "DATA".to_string(),
        ];
        for (step, want) in steps.iter().zip(["250", "250", "354"]) {
            let r = c.cmd(step);
            if r.is_empty() || r.starts_with("421") {
                return acked;
            }
            assert!(r.starts_with(want), "{step}: {r}");
        }
        c.send(&dot_stuff(&sample_body(seed, 1500)));
        c.send(b".\r\n");
        let r = c.reply();
        if r.is_empty() || r.starts_with("421") {
            return acked;
        }
        assert!(r.starts_with("250 2.0.0"), "end of data: {r}");
        acked.push(sample_message_id(seed));
    }
    acked
}

/// Acknowledged messages under a crash load: id → the body that got `250`.
pub type Acked = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>;

/// `sessions` sessions sending [`sample_body`] messages to a daemon until [`CrashLoad::stop`]
/// or until the daemon dies under them, for crash and power-cut tests. Message `i` of session
/// `t` has seed `(seed_base + t) * 1_000_000 + i` and length `body_len(i)`; every acknowledged
/// one goes into `acked` for [`assert_acknowledged_whole`].
pub struct CrashLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sessions: Vec<std::thread::JoinHandle<()>>,
}

impl CrashLoad {
    pub fn start(
        addr: SocketAddr,
        sessions: usize,
        seed_base: usize,
        body_len: fn(usize) -> usize,
        acked: &Acked,
    ) -> CrashLoad {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let sessions = (0..sessions)
            .map(|t| {
                let (acked, stop) = (acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let (mut c, _) = Client::connect(addr);
                    if !c.cmd("EHLO crash").starts_with("250") {
                        return;
                    }
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let body = sample_body((seed_base + t) * 1_000_000 + i, body_len(i));
                        // The daemon may die mid-reply: the client panics, the session ends.
                        let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            c.send_mail("crash@example.com", &["sink@example.org"], &body)
                        }));
                        match sent.ok().as_deref().and_then(queued_id) {
                            Some(id) => {
                                acked.lock().unwrap().insert(id, body);
                            }
                            None => return, // connection died with the daemon
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        CrashLoad { stop, sessions }
    }

    /// Ends every session (call it after the kill) and waits for them.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.sessions {
            let _ = s.join();
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns` (made with `ip netns add`):
/// sockets it opens live there. Only that thread moves; the test stays where it is.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        // SAFETY: setns(2) moves only this thread, into the namespace `fd` names.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// Polls `cond` every 50 ms until it holds or `secs` pass; returns whether it held.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Postfix's `smtp-sink` dumping every transaction into a directory.
pub struct SmtpSink {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// One transaction as `smtp-sink -d` dumped it.
#[derive(Debug)]
pub struct Dumped {
    /// `X-Mail-Args:` (the MAIL FROM path with brackets).
    pub mail_args: String,
    /// `X-Rcpt-Args:` lines.
    pub rcpt_args: Vec<String>,
    /// The message after smtp-sink's own `X-` lines and `Received:` header, LF line endings.
    pub message: String,
}

/// The text of one smtp-sink dump file once smtp-sink has finished it: it has the envelope
/// headers, ends with the blank line smtp-sink adds after each message, and has not changed
/// for 50 ms. Gives up after 5 s and returns what is there.
fn read_finished_dump(path: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        let settled = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= Duration::from_millis(50));
        let looks_done = text.contains("X-Rcpt-Args: ") && text.ends_with("\n\n");
        if (looks_done && settled) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl SmtpSink {
    /// Starts smtp-sink on a free loopback port (as `nobody`, which it requires under root).
    pub fn start() -> SmtpSink {
        Self::start_on(free_addr())
    }

    /// Starts smtp-sink on `addr`.
    pub fn start_on(addr: SocketAddr) -> SmtpSink {
        Self::start_with(addr, &[])
    }

    /// Starts smtp-sink on `addr` with extra options (e.g. `-r rcpt`: a 4xx for every RCPT).
    pub fn start_with(addr: SocketAddr, options: &[&str]) -> SmtpSink {
        Self::start_where(None, addr, options)
    }

    /// Starts smtp-sink on `addr` in the network namespace `ns`.
    pub fn start_in_netns(ns: &str, addr: SocketAddr) -> SmtpSink {
        Self::start_where(Some(ns), addr, &[])
    }

    fn start_where(netns: Option<&str>, addr: SocketAddr, options: &[&str]) -> SmtpSink {
        assert!(
            have("smtp-sink"),
            "smtp-sink is required (apt-get install postfix)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dump");
        std::fs::create_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = match netns {
            None => Command::new("smtp-sink"),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "smtp-sink"]);
                c
            }
        };
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .args(options)
            .arg("-d")
            .arg(dir.join("msg-"))
            .arg(addr.to_string())
            .arg("256")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let reachable = || match netns {
            None => TcpStream::connect(addr).is_ok(),
            Some(ns) => in_netns(ns, move || TcpStream::connect(addr).is_ok()),
        };
        assert!(wait_until(10, reachable), "smtp-sink did not start");
        SmtpSink {
            child,
            addr,
            dir,
            _tmp: tmp,
        }
    }

    /// Every transaction dumped so far.
    /// Every message the sink has finished receiving so far, parsed. A dump file that
    /// smtp-sink is still writing is waited for (up to 5 s), so a count or a content check
    /// never sees half a message.
    pub fn dumped(&self) -> Vec<Dumped> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let text = read_finished_dump(&e.unwrap().path());
            let mut mail_args = String::new();
            let mut rcpt_args = Vec::new();
            let mut rest = text.as_str();
            while let Some((line, tail)) = rest.split_once('\n') {
                if let Some(v) = line.strip_prefix("X-Mail-Args: ") {
                    mail_args = v.to_string();
                } else if let Some(v) = line.strip_prefix("X-Rcpt-Args: ") {
                    rcpt_args.push(v.to_string());
                } else if !line.starts_with("X-") {
                    break;
                }
                rest = tail;
            }
            // smtp-sink's own Received: header (with its folded lines).
            let mut lines = rest.split_inclusive('\n').peekable();
            if lines.peek().is_some_and(|l| l.starts_with("Received: ")) {
                lines.next();
                while lines.peek().is_some_and(|l| l.starts_with([' ', '\t'])) {
                    lines.next();
                }
            }
            // smtp-sink ends each dumped message with one extra newline.
            let mut message: String = lines.collect();
            if message.ends_with("\n\n") {
                message.pop();
            }
            out.push(Dumped {
                mail_args,
                rcpt_args,
                message,
            });
        }
        out
    }

    /// How many times each Message-ID arrived.
    pub fn arrivals(&self) -> std::collections::HashMap<String, usize> {
        let mut seen = std::collections::HashMap::new();
        for d in self.dumped() {
            let id = message_id_of(&d.message).unwrap_or_else(|| "(none)".into());
            *seen.entry(id).or_insert(0) += 1;
        }
        seen
    }

    /// Asserts that every Message-ID in `acked` arrived exactly once and nothing else did;
    /// prints the counts.
    pub fn assert_exactly_once(&self, acked: &[String]) {
        let seen = self.arrivals();
        let lost: Vec<&String> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
        let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        let extra: Vec<&String> = seen.keys().filter(|id| !acked.contains(id)).collect();
        eprintln!(
            "at the sink: {} acknowledged, {} arrived, {} lost, {} duplicated, {} unexpected",
            acked.len(),
            seen.len(),
            lost.len(),
            twice.len(),
            extra.len()
        );
        assert!(lost.is_empty(), "lost: {lost:?}");
        assert!(twice.is_empty(), "delivered more than once: {twice:?}");
        assert!(extra.is_empty(), "never acknowledged: {extra:?}");
    }

    /// Stops the sink (the next hop goes down).
    pub fn stop(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python (aiosmtpd) next hop in `tests/peers/sink.py`: per-recipient 550s and STARTTLS.
pub struct PySink {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// One message the Python sink received.
#[derive(Debug)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub tls: bool,
    pub message: Vec<u8>,
}

impl PySink {
    /// Starts the sink; `reject` refuses recipients with that prefix; `tls` = (cert, key)
    /// requires STARTTLS.
    pub fn start(reject: &str, tls: Option<(&Path, &Path)>) -> PySink {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let addr = free_addr();
        let mut cmd = Command::new("python3");
        cmd.arg(workspace_root().join("tests/peers/sink.py"))
            .arg(addr.port().to_string())
            .arg(&dir)
            .args(["--reject", reject]);
        if let Some((cert, key)) = tls {
            cmd.arg("--tls").arg(cert).arg(key);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "sink.py did not start (pip install aiosmtpd)"
        );
        PySink {
            child,
            addr,
            dir,
            _tmp: tmp,
        }
    }

    /// Every message received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|eml| {
                let meta = std::fs::read_to_string(eml.with_extension("json")).unwrap();
                let field = |k: &str| -> String {
                    let start = meta.find(&format!("\"{k}\": ")).unwrap() + k.len() + 4;
                    meta[start..]
                        .split([',', '}'])
                        .next()
                        .unwrap()
                        .trim()
                        .to_string()
                };
                let rcpts_start = meta.find("\"rcpt_tos\": [").unwrap() + 13;
                let rcpts_end = meta[rcpts_start..].find(']').unwrap() + rcpts_start;
                Received {
                    mail_from: field("mail_from").trim_matches('"').to_string(),
                    rcpt_tos: meta[rcpts_start..rcpts_end]
                        .split(',')
                        .map(|s| s.trim().trim_matches('"').to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                    tls: field("tls") == "true",
                    message: std::fs::read(&eml).unwrap(),
                }
            })
            .collect()
    }
}

impl Drop for PySink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config file into `dir` and returns its path as a string.
pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("spoold.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Two configured units of an HA pair (not started): config files and peer addresses.
pub struct PairConfig {
    pub a_config: String,
    pub b_config: String,
    pub a_peer: SocketAddr,
    pub b_peer: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Writes configs for nodes `gw_a` (initially active) and `gw_b` (passive) that replicate to
/// each other; `extra` is appended to both (e.g. a `[delivery]` section), `b_secret` overrides
/// B's shared secret.
pub fn pair_config(extra: &str, b_secret: Option<&str>) -> PairConfig {
    pair_config_via(extra, b_secret, |b| b)
}

/// [`pair_config`] for a pair that delivers to `next_hop`, retrying every second.
pub fn pair_delivering_to(next_hop: SocketAddr) -> PairConfig {
    pair_config(
        &format!("[delivery]\ndefault_next_hop = \"{next_hop}\"\nretry_schedule_secs = [1]\n"),
        None,
    )
}

/// [`pair_config`] where A reaches B's peer link through a [`proxy::FaultProxy`] (to partition
/// the pair or slow its link).
pub fn pair_config_through_proxy(extra: &str) -> (PairConfig, proxy::FaultProxy) {
    let mut proxy = None;
    let p = pair_config_via(extra, None, |b| {
        let px = proxy::FaultProxy::start(b);
        let addr = px.addr;
        proxy = Some(px);
        addr
    });
    (p, proxy.unwrap())
}

/// [`pair_config`] where A reaches B's peer link through `route(b_peer)` (a fault proxy).
pub fn pair_config_via(
    extra: &str,
    b_secret: Option<&str>,
    route: impl FnOnce(SocketAddr) -> SocketAddr,
) -> PairConfig {
    let dir = tempfile::tempdir().unwrap();
    let (a_peer, b_peer) = (free_addr(), free_addr());
    let a_partner = route(b_peer);
    let write = |name: &str,
                 role: &str,
                 listen: SocketAddr,
                 partner: SocketAddr,
                 secret: &str,
                 prio: u32| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (cert, key) = write_self_signed(&d);
        let text = format!(
            "node_name = \"{name}\"\n{extra}\n[ha]\npartner = \"{partner}\"\nlisten = \"{listen}\"\nsecret = \"{secret}\"\n\
             role = \"{role}\"\npriority = {prio}\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        );
        let path = d.join("spoold.toml");
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let secret = "correct horse battery staple";
    let a_config = write("gw_a", "active", a_peer, a_partner, secret, 200);
    let b_config = write(
        "gw_b",
        "passive",
        b_peer,
        a_peer,
        b_secret.unwrap_or(secret),
        100,
    );
    PairConfig {
        a_config,
        b_config,
        a_peer,
        b_peer,
        _dir: dir,
    }
}

/// A histogram's quantile from a running daemon's `/metrics` (see [`quantile_in_metrics`]).
pub fn histogram_quantile(d: &Daemon, name: &str, q: f64) -> Option<f64> {
    let (_, body) = http_get(d.http, "/metrics").ok()?;
    quantile_in_metrics(&body, name, q)
}

/// Quantile `q` of histogram `name` in a Prometheus text exposition, estimated the way
/// PromQL's `histogram_quantile` does: linear interpolation inside the bucket that holds it
/// (infinite when that bucket is `+Inf`: beyond the last bound). `None` when the histogram is empty or absent.
pub fn quantile_in_metrics(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
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
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: not that bound, which would let an assertion
                // against it pass whatever the value.
                return Some(f64::INFINITY);
            }
            let inside = count - below;
            let share = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * share);
        }
        (lower, below) = (le, count);
    }
    None
}

/// A small tmpfs mounted for a test (a disk that fills), unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`3m`) at `at` (created); fails the test without root.
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a {size} tmpfs needs root (CI runs as root)"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[cfg(test)]
mod quantile_tests {
    use super::quantile_in_metrics;

    const TEXT: &str = "h_bucket{le=\"0.01\"} 10\nh_bucket{le=\"0.1\"} 90\nh_bucket{le=\"1\"} 100\nh_bucket{le=\"+Inf\"} 100\nh_sum 3\nh_count 100\n";

    #[test]
    fn interpolates_inside_the_bucket_like_promql() {
        // rank 50 lies 40/80 of the way through (0.01, 0.1].
        let p50 = quantile_in_metrics(TEXT, "h", 0.5).unwrap();
        assert!((p50 - 0.055).abs() < 1e-9, "{p50}");
        let p99 = quantile_in_metrics(TEXT, "h", 0.99).unwrap();
        assert!((p99 - 0.91).abs() < 1e-9, "{p99}");
        assert_eq!(quantile_in_metrics(TEXT, "other", 0.5), None);
        let inf = "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 10\n";
        assert_eq!(quantile_in_metrics(inf, "h", 0.99), Some(f64::INFINITY));
        assert_eq!(quantile_in_metrics(inf, "h", 0.05), Some(0.5));
    }
}
