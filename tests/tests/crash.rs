//! Crash test: SMTP load from several sessions, SIGKILL at a random moment, restart. Every
//! message that got a 250 must be in spool/ exactly once and whole; no partial pair may be
//! visible; repeated several times on the same state directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tests::{queued_id, sample_body, Client, Daemon};

const SESSIONS: usize = 8;
const ROUNDS: usize = 5;

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let mut d = Daemon::start();
    let acked: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
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
        let spool = d.folder("spool");
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
        for name in &spool {
            let (stem, ext) = name.rsplit_once('.').unwrap();
            let other = if ext == "env" { "body" } else { "env" };
            assert!(
                spool.contains(&format!("{stem}.{other}")),
                "partial pair {name}"
            );
        }
        let acked = acked.lock().unwrap();
        for (id, body) in acked.iter() {
            assert!(
                spool.contains(&format!("{id}.env")),
                "round {round}: acknowledged {id} lost"
            );
            let got = d.body_without_received(id);
            assert!(
                &got == body,
                "round {round}: {id} body differs ({} vs {} bytes)",
                got.len(),
                body.len()
            );
            let env = d.envelope(id);
            let path = d.state.join("spool").join(format!("{id}.body"));
            assert!(
                tests::spool::MappedBody::open_verified(&path, env.body_len, &env.body_sha256)
                    .is_ok(),
                "{id}: body does not match its envelope's length and checksum"
            );
        }
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
            "round {round}: {} acknowledged, {spooled} spooled",
            acked.len()
        );
        assert!(!acked.is_empty());
    }
}
