//! Every way the daemon can die or hang leaves a line in its log: a panic on any thread (with
//! its location and a backtrace), a fatal signal (a bad memory access, an abort), and an async
//! runtime that stops running tasks. A daemon that stops without a word cannot be operated.
//!
//! It is not: recovery. A panic still unwinds or aborts as before, a fatal signal still kills
//! the process (systemd's `Restart=` and startup recovery take it from there), and a stalled
//! runtime is reported, and no longer reported alive to systemd's watchdog, not repaired.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Logs every panic through `tracing`, with the thread, the location and a backtrace, then
/// runs the default hook (which prints to stderr as before).
pub fn log_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("(unnamed)"),
            %location,
            backtrace = %std::backtrace::Backtrace::force_capture(),
            "panic: {payload}"
        );
        default(info);
    }));
}

/// The signals that end a process without running any of its code.
const FATAL: [(libc::c_int, &str); 5] = [
    (libc::SIGSEGV, "SIGSEGV (invalid memory access)"),
    (
        libc::SIGBUS,
        "SIGBUS (a mapped file shrank under a reader, or the disk failed a read)",
    ),
    (libc::SIGILL, "SIGILL (illegal instruction)"),
    (libc::SIGFPE, "SIGFPE (arithmetic fault)"),
    (libc::SIGABRT, "SIGABRT (abort)"),
];

/// The handlers that were in place before ours (Rust's own stack-overflow reporter for SIGSEGV
/// and SIGBUS), called after our line.
static PREVIOUS_ACTIONS: std::sync::OnceLock<Vec<libc::sigaction>> = std::sync::OnceLock::new();

/// Writes one line to stderr (the log) when a fatal signal arrives, then lets the signal do
/// what it did before: the previous handler runs, or the default action ends the process.
pub fn log_fatal_signals() {
    // The previous actions are read first and stored before any handler of ours is installed,
    // so that a handler always finds them.
    let previous: Vec<libc::sigaction> = FATAL
        .iter()
        .map(|(sig, _)| {
            // SAFETY: sigaction(2) with a null new action only reads the current one.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(*sig, std::ptr::null(), &mut old);
                old
            }
        })
        .collect();
    if PREVIOUS_ACTIONS.set(previous).is_err() {
        return; // installed already
    }
    for (sig, _) in FATAL.iter() {
        // SAFETY: sigaction(2) with a zeroed, then filled, struct; the handler only calls
        // async-signal-safe functions (write, sigaction, raise) and the previous handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal_signal as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(*sig, &action, std::ptr::null_mut());
        }
    }
}

extern "C" fn on_fatal_signal(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let Some(i) = FATAL.iter().position(|(s, _)| *s == sig) else {
        return;
    };
    let mut line = [0u8; 160];
    let text = FATAL[i].1.as_bytes();
    let prefix = b"spoold: fatal signal ";
    let mut n = 0;
    for part in [&prefix[..], text, b"; the process ends here\n"] {
        let take = part.len().min(line.len() - n);
        line[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    // SAFETY: write(2) and sigaction(2)/raise(3) are async-signal-safe; the previous action was
    // stored before this handler could run; `info` is the kernel's.
    unsafe {
        libc::write(2, line.as_ptr().cast(), n);
        // Sent by kill(2) (a code of 0 or less), not caused by an instruction: returning would
        // not fault again, so the default action is raised.
        let sent = info.is_null() || (*info).si_code <= 0;
        let previous = PREVIOUS_ACTIONS.get().and_then(|p| p.get(i));
        match previous {
            Some(old)
                if old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN
                    && old.sa_flags & libc::SA_SIGINFO != 0 =>
            {
                // Rust's handler: reports a stack overflow, else restores the default action
                // and returns, so the faulting access runs again and ends the process.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(old.sa_sigaction);
                f(sig, info, ctx);
                if sent {
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                    libc::raise(sig);
                }
            }
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
                if sent || sig == libc::SIGABRT {
                    libc::raise(sig);
                }
                // A fault returns to the faulting instruction, which faults again, now fatally.
            }
        }
    }
}

/// How long the async runtime may go without running a task before it counts as stalled.
const STALL_AFTER: Duration = Duration::from_secs(10);

/// A stall detector for the async runtime: a task stamps a clock every 500 ms; a plain thread
/// checks the stamp every second and logs an error when it is older than [`STALL_AFTER`] (and
/// once more when the runtime runs again). With systemd's `WatchdogSec=`, this thread is the one
/// that tells systemd the daemon is alive, only while the runtime runs tasks: a hung runtime
/// is then restarted by systemd rather than answering nothing for ever.
pub fn watch_runtime() {
    static LAST_TICK_MS: AtomicU64 = AtomicU64::new(0);
    let started = Instant::now();
    let now_ms = move || started.elapsed().as_millis() as u64;
    LAST_TICK_MS.store(now_ms(), Ordering::SeqCst);
    tokio::spawn(async move {
        loop {
            LAST_TICK_MS.store(now_ms(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut usec = 0u64;
    let systemd_every = (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| Duration::from_micros(usec / 2));
    let spawned = std::thread::Builder::new()
        .name("runtime-watch".into())
        .spawn(move || {
            let mut stalled_since: Option<u64> = None;
            let mut last_ping = Instant::now();
            let every = systemd_every.map_or(Duration::from_secs(1), |e| e.min(Duration::from_secs(1)));
            loop {
                std::thread::sleep(every);
                let silent_ms = now_ms().saturating_sub(LAST_TICK_MS.load(Ordering::SeqCst));
                if silent_ms >= STALL_AFTER.as_millis() as u64 {
                    if stalled_since.is_none() {
                        tracing::error!(
                            silent_ms,
                            "the async runtime has run no task for {} s: SMTP, delivery and replication are stuck",
                            silent_ms / 1000
                        );
                        stalled_since = Some(silent_ms);
                    }
                    continue;
                }
                if let Some(after) = stalled_since.take() {
                    tracing::warn!(stalled_ms = after, "the async runtime runs tasks again");
                }
                if let Some(every) = systemd_every {
                    if last_ping.elapsed() >= every {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                        last_ping = Instant::now();
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("start the runtime watch thread: {e}");
    }
    if spool::failpoint::active("stall-runtime") {
        // Every worker blocked for 13 s: what a blocking call on the async threads does.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // One blocking task per worker; the barrier holds each until all have a worker.
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            let all = std::sync::Arc::new(std::sync::Barrier::new(workers));
            for _ in 0..workers {
                let all = all.clone();
                tokio::spawn(async move {
                    all.wait();
                    std::thread::sleep(Duration::from_secs(13));
                });
            }
        });
    }
}
