//! `scripts/demo`, the takeover a newcomer runs first, keeps working: it ends with every
//! acknowledged message delivered within a minute (a few twice at most: what the killed unit
//! delivered in the instant before its `DELETE` reached the partner).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

#[test]
fn the_demo_runs_a_takeover_and_loses_nothing() {
    let root = tests::workspace_root();
    let bins = tests::spoold_bin().parent().unwrap().to_path_buf();
    let started = Instant::now();
    let out = std::process::Command::new(root.join("scripts/demo"))
        .env("SPOOLPAIR_BIN_DIR", &bins)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap();
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    let acked = row("acknowledged (250)");
    assert!(
        acked > 50,
        "the client sent too little to show anything: {acked}"
    );
    // The takeover is the point: the promoted partner must have answered `250`s of its own.
    let by_b = row("acknowledged by gw_b");
    assert!(by_b > 10, "gw_b acknowledged {by_b} after its promotion");
    assert!(by_b < acked, "gw_a acknowledged nothing before the kill");
    let first_b_ms = text
        .lines()
        .find(|l| l.starts_with("| kill -9 of gw_a -> first 250 from gw_b"))
        .and_then(|l| l.split('|').nth(2))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap();
    assert!(
        (1..5_000).contains(&first_b_ms),
        "first 250 from gw_b {first_b_ms} ms after the kill"
    );
    assert_eq!(row("delivered to the next hop"), acked);
    assert_eq!(row("lost"), 0);
    assert!(row("delivered twice") <= 5);
    assert!(started.elapsed() < Duration::from_secs(60));
}
