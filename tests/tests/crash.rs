//! Crash test: SMTP load from several sessions, SIGKILL at a random moment, restart. Every
//! message that got a 250 must be in spool/ exactly once and whole; no partial pair may be
//! visible; repeated several times on the same state directory, for every writer mode (io_uring
//! with nameless files, the portable writer, named files in `tmp/`, one `syncfs` per round).
//! The random seed is printed; `TEST_SEED=<n>` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tests::{queued_id, sample_body, write_config, Client, Daemon};

const SESSIONS: usize = 8;
const ROUNDS: usize = 5;

/// `rounds` of load and SIGKILL on one daemon started with `spool_settings` (a `[spool]`
/// section's lines).
fn sigkill_rounds(mode: &str, spool_settings: &str, rounds: usize) {
    let seed: u64 = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{mode}: TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &format!("[spool]\n{spool_settings}\n"));
    let mut d = Daemon::start_with(&["--config", &cfg]);
    let acked: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    for round in 0..rounds {
        let acked_before = acked.lock().unwrap().len();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..SESSIONS)
            .map(|t| {
                let (addr, acked, stop) = (d.smtp, acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let (mut c, _) = Client::connect(addr);
                    if !c.cmd("EHLO crash").starts_with("250") {
                        return;
                    }
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let seed = (round * 100 + t) * 1_000_000 + i;
                        // Mix small and large (spilled to tmp/) messages.
                        let len = if i % 10 == 9 {
                            300_000
                        } else {
                            2_000 + (i % 7) * 500
                        };
                        let body = sample_body(seed, len);
                        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            c.send_mail("crash@example.com", &["sink@example.org"], &body)
                        })) {
                            Ok(r) => r,
                            Err(_) => return,
                        };
                        match queued_id(&r) {
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
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        d.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            let _ = t.join();
        }
        let pending_tmp = d.folder("tmp").len();
        d.restart();
        assert_eq!(
            d.folder("tmp").len(),
            0,
            "tmp/ emptied at restart (had {pending_tmp})"
        );
        assert!(
            d.folder("corrupt").is_empty(),
            "nothing corrupt: {:?}",
            d.folder("corrupt")
        );
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() > acked_before,
            "{mode} round {round} (TEST_SEED={seed}): the kill landed before any message was acknowledged"
        );
        tests::assert_acknowledged_whole(
            &d,
            &acked,
            &format!("{mode} round {round} (TEST_SEED={seed})"),
        );
        let spooled = d.spooled_ids().len();
        assert!(
            spooled >= acked.len(),
            "spooled {spooled} < acknowledged {}",
            acked.len()
        );
        assert!(
            spooled <= acked.len() + SESSIONS,
            "at most one unacknowledged message per session"
        );
        eprintln!(
            "{mode} round {round}: {} acknowledged ({} this round), {spooled} spooled",
            acked.len(),
            acked.len() - acked_before
        );
    }
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    sigkill_rounds("io_uring, nameless files", "", ROUNDS);
}

#[test]
fn sigkill_under_load_with_the_portable_writer() {
    sigkill_rounds("portable writer", "io_uring = false", 3);
}

#[test]
fn sigkill_under_load_with_named_files() {
    sigkill_rounds("named files in tmp/", "nameless_files = false", 3);
}

#[test]
fn sigkill_under_load_with_one_syncfs_per_round() {
    sigkill_rounds("syncfs", "sync = \"syncfs\"", 3);
}
