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
    assert_eq!(row("delivered to the next hop"), acked);
    assert_eq!(row("lost"), 0);
    assert!(row("delivered twice") <= 5);
    assert!(started.elapsed() < Duration::from_secs(60));
}
