//! A soak of the mixed delivery load that once stopped a daemon without a word (accepting for
//! 0.8 s after its start, then gone): 2,000 messages of varied sizes (a few past the spill and
//! recycling limits) and recipients over 8 sessions, routed to two next hops, from the daemon's
//! start. Each round: the daemon stays alive and says nothing fatal, and each next hop gets
//! exactly the acknowledged messages addressed to it, once. `SPOOLPAIR_SOAK_ROUNDS` sets the
//! rounds (2 by default; more to hunt a rare failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tests::{
    free_addr, message_id_of, queued_id, wait_until, write_config, Client, Daemon, SmtpSink,
};

/// Message `n`: its recipients (on a.example, b.example or both) and its size.
fn shape(n: usize) -> (Vec<String>, usize) {
    let rcpts = match n % 5 {
        0 | 1 => vec![format!("u{n}@a.example")],
        2 | 3 => vec![format!("u{n}@b.example")],
        _ => vec![format!("u{n}@a.example"), format!("v{n}@b.example")],
    };
    let size = match n % 37 {
        0 => 300_000, // past spool.spill_bytes and the recycling limit
        1..=5 => 40_000,
        _ => 300 + (n * 97) % 6_000,
    };
    (rcpts, size)
}

fn round(r: usize) {
    let sink_a = SmtpSink::start();
    let sink_b = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[delivery]\nretry_schedule_secs = [1]\n\
             [[delivery.routes]]\ndomain = \"a.example\"\nnext_hop = \"{}\"\n\
             [[delivery.routes]]\ndomain = \"b.example\"\nnext_hop = \"{}\"\n",
            sink_a.addr, sink_b.addr
        ),
    );
    let mut d = Daemon::unstarted(&["--config", &cfg]);
    d.smtp = free_addr();
    d.restart();
    let started = Instant::now();
    // message-id → recipients, for every message that got a 250
    let acked: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let sessions: Vec<_> = (0..8)
        .map(|t| {
            let (addr, acked) = (d.smtp, acked.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                assert!(c.cmd("EHLO soak").starts_with("250"));
                for i in 0..250 {
                    let n = r * 1_000_000 + t * 1_000 + i;
                    let (rcpts, size) = shape(n);
                    let body = tests::sample_body(n, size);
                    let to: Vec<&str> = rcpts.iter().map(String::as_str).collect();
                    let reply = c.send_mail("soak@example.com", &to, &body);
                    assert!(queued_id(&reply).is_some(), "message {n}: {reply}");
                    let mid = message_id_of(&String::from_utf8_lossy(&body)).unwrap();
                    acked.lock().unwrap().insert(mid, rcpts);
                }
            })
        })
        .collect();
    for s in sessions {
        if let Err(p) = s.join() {
            let alive = d.child.as_mut().unwrap().try_wait().unwrap();
            panic!(
                "round {r}: a session failed ({p:?}); daemon exit: {alive:?}\n{}",
                d.log_text()
            );
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 2000);
    let want = |domain: &str| -> BTreeSet<String> {
        acked
            .iter()
            .filter(|(_, rcpts)| rcpts.iter().any(|a| a.ends_with(domain)))
            .map(|(mid, _)| mid.clone())
            .collect()
    };
    let (want_a, want_b) = (want("@a.example"), want("@b.example"));
    let drained = wait_until(120, || {
        sink_a.arrivals().len() >= want_a.len() && sink_b.arrivals().len() >= want_b.len()
    });
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "round {r}: the daemon died:\n{}",
        d.log_text()
    );
    assert!(drained, "round {r}: not all delivered in 120 s");
    for (sink, want) in [(&sink_a, &want_a), (&sink_b, &want_b)] {
        let arrivals = sink.arrivals();
        let got: BTreeSet<String> = arrivals.keys().cloned().collect();
        assert_eq!(&got, want, "round {r}: the next hop got other messages");
        assert!(
            arrivals.values().all(|&n| n == 1),
            "round {r}: a message twice"
        );
    }
    let log = d.log_text();
    for fatal in ["panic", "fatal", "runtime has run no task"] {
        assert!(
            !log.contains(fatal),
            "round {r}: {fatal} in the log:\n{log}"
        );
    }
    eprintln!(
        "round {r}: 2,000 accepted and delivered to two next hops in {:?}",
        started.elapsed()
    );
}

#[test]
fn a_mixed_delivery_load_from_the_start_keeps_the_daemon_alive_and_delivers_once() {
    let rounds: usize = std::env::var("SPOOLPAIR_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for r in 0..rounds {
        round(r);
    }
}
