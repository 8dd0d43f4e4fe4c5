//! Every way of dying or hanging leaves a line in the log: a fatal signal, a panic in a task
//! that must run until shutdown (which also ends the daemon with exit 1, for systemd to restart
//! it), and an async runtime that stops running tasks. The panic and the stall are made with
//! fail-points of debug builds (`SPOOLD_FAILPOINT`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use tests::{wait_until, Daemon};

fn exited(d: &mut Daemon, secs: u64) -> std::process::ExitStatus {
    let child = d.child.as_mut().unwrap();
    assert!(
        wait_until(secs, || child.try_wait().unwrap().is_some()),
        "still running: {}",
        d.log_text()
    );
    let status = d.child.as_mut().unwrap().wait().unwrap();
    d.child = None;
    status
}

#[test]
fn a_fatal_signal_leaves_a_line_naming_it() {
    for (sig, name) in [(libc::SIGBUS, "SIGBUS"), (libc::SIGSEGV, "SIGSEGV")] {
        let mut d = Daemon::start();
        d.signal(sig);
        let status = exited(&mut d, 10);
        assert_eq!(status.signal(), Some(sig), "{name}: {status:?}");
        let log = d.log_text();
        assert!(
            log.contains(&format!("spoold: fatal signal {name}")),
            "{name}: {log}"
        );
    }
}

#[test]
fn a_panic_in_the_queue_manager_is_logged_and_ends_the_daemon_with_exit_1() {
    let mut d = Daemon::unstarted(&[]);
    d.extra_env = vec![("SPOOLD_FAILPOINT".into(), "panic-in-queue-manager".into())];
    d.restart();
    let status = exited(&mut d, 10);
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = d.log_text();
    let panic_line = log
        .lines()
        .find(|l| l.contains("panic: fail-point panic-in-queue-manager"))
        .unwrap_or_else(|| panic!("no panic line: {log}"));
    assert!(
        panic_line.contains("location=spoold/src/delivery/mod.rs:"),
        "{panic_line}"
    );
    assert!(
        log.contains("fatal: the queue manager ended: it panicked"),
        "{log}"
    );
}

#[test]
fn a_stalled_runtime_is_reported_and_its_end_too() {
    let mut d = Daemon::unstarted(&["--no-delivery"]);
    d.extra_env = vec![("SPOOLD_FAILPOINT".into(), "stall-runtime".into())];
    d.restart();
    assert!(
        wait_until(20, || d
            .log_text()
            .contains("the async runtime has run no task for")),
        "{}",
        d.log_text()
    );
    assert!(
        wait_until(20, || d
            .log_text()
            .contains("the async runtime runs tasks again")),
        "{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
}
