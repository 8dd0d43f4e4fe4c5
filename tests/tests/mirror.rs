//! The partner mirrors the active unit whatever way mail came in or moved: SMTP, `spoolctl
//! insert`, SIGUSR2, a DSN; hold, release, requeue, delete. After a mixed run the partner holds
//! exactly the active unit's messages, in the same folders (`spool/` and `vscan/` as `spool/`,
//! `hold/` as `hold/`), byte-identical, and every folder gauge equals a count of its folder on
//! both units.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use tests::spool::{Envelope, IdGenerator};
use tests::{pair_config, send_numbered, spoolctl, wait_until, Daemon, PySink};

/// `folder` → ids held there (by `.env`).
fn holdings(d: &Daemon, folders: &[&str]) -> BTreeMap<String, Vec<String>> {
    folders
        .iter()
        .map(|f| {
            let mut ids: Vec<String> = d
                .folder(f)
                .iter()
                .filter_map(|n| n.strip_suffix(".env").map(str::to_string))
                .collect();
            ids.sort();
            (f.to_string(), ids)
        })
        .collect()
}

/// What the partner should hold given the active unit's folders.
fn mirrored(a: &Daemon) -> BTreeMap<String, Vec<String>> {
    let held = holdings(a, &["spool", "vscan", "hold"]);
    let mut spool = held["spool"].clone();
    spool.extend(held["vscan"].clone());
    spool.sort();
    BTreeMap::from([
        ("hold".to_string(), held["hold"].clone()),
        ("spool".to_string(), spool),
    ])
}

fn drop_into_input(d: &Daemon, n: usize, tag: &str) -> Vec<String> {
    let ids = IdGenerator::new("dropped").unwrap();
    (0..n)
        .map(|i| {
            let id = ids.next_id();
            let body = format!("Subject: {tag} {i}\r\n\r\ndropped into input/\r\n");
            let env = Envelope::new(
                id.clone(),
                "drop@example.com",
                &["r@example.org"],
                body.as_bytes(),
            );
            std::fs::write(d.state.join("input").join(format!("{id}.body")), &body).unwrap();
            std::fs::write(
                d.state.join("input").join(format!("{id}.env")),
                env.encode(),
            )
            .unwrap();
            id.to_string()
        })
        .collect()
}

fn assert_gauges_match_folders(d: &Daemon, who: &str) {
    for f in ["spool", "vscan", "hold", "quarantine", "corrupt"] {
        let counted = d.folder(f).iter().filter(|n| n.ends_with(".env")).count();
        let gauge = d
            .metric(&format!("spoold_queue_messages{{folder=\"{f}\"}}"))
            .unwrap_or(-1.0);
        eprintln!("{who} {f}/: {counted} on disk, gauge {gauge}");
        assert_eq!(gauge, counted as f64, "{who}: gauge of {f}/");
    }
}

#[test]
fn every_way_in_and_every_folder_change_reaches_the_partner() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));

    // Ways in.
    assert_eq!(send_numbered(a.smtp, 0, 10).len(), 10, "SMTP");
    let inserted = drop_into_input(&a, 5, "insert");
    let (code, out, err) = spoolctl(&a, &["insert"]);
    assert_eq!(code, 0, "{out}{err}");
    let signalled = drop_into_input(&a, 5, "sigusr2");
    a.signal(libc::SIGUSR2);
    assert!(
        wait_until(5, || a.folder("input").is_empty()),
        "SIGUSR2 inserted"
    );
    for id in inserted.iter().chain(&signalled) {
        assert!(a.spooled_ids().contains(id), "{id} inserted on A");
    }

    // Folder changes.
    let smtp_ids: Vec<String> = a
        .spooled_ids()
        .into_iter()
        .filter(|id| id.ends_with("-gw_a"))
        .collect();
    assert_eq!(smtp_ids.len(), 10);
    for id in &smtp_ids[..3] {
        assert_eq!(spoolctl(&a, &["queue", "hold", id]).0, 0);
    }
    assert_eq!(spoolctl(&a, &["queue", "release", &smtp_ids[0]]).0, 0);
    assert_eq!(spoolctl(&a, &["queue", "requeue", &smtp_ids[3]]).0, 0);
    assert_eq!(
        spoolctl(&a, &["queue", "delete", &smtp_ids[4], &inserted[0]]).0,
        0
    );
    assert_eq!(spoolctl(&a, &["queue", "hold", &signalled[0]]).0, 0);

    let want = mirrored(&a);
    assert_eq!(want["hold"].len(), 3, "{want:?}");
    assert_eq!(want["spool"].len(), 20 - 2 - 3, "{want:?}");
    assert!(
        wait_until(10, || holdings(&b, &["spool", "hold"]) == want),
        "the partner mirrors A:\nA: {want:?}\nB: {:?}",
        holdings(&b, &["spool", "hold"])
    );
    for (folder, ids) in &want {
        for id in ids {
            for ext in ["env", "body"] {
                let on_a = ["spool", "vscan", "hold"]
                    .iter()
                    .find_map(|f| std::fs::read(a.state.join(f).join(format!("{id}.{ext}"))).ok())
                    .unwrap();
                let on_b = std::fs::read(b.state.join(folder).join(format!("{id}.{ext}"))).unwrap();
                assert!(on_a == on_b, "{folder}/{id}.{ext} differs");
            }
        }
    }
    eprintln!(
        "mirrored: {} in spool/, {} in hold/, byte-identical",
        want["spool"].len(),
        want["hold"].len()
    );
    assert_gauges_match_folders(&a, "A");
    assert_gauges_match_folders(&b, "B");
}

#[test]
fn a_bounce_is_mirrored_and_its_original_removed_on_the_partner() {
    let rejecting = PySink::start("x", None);
    let p = pair_config(
        &format!(
            "[delivery]\nretry_schedule_secs = [3600]\n[[delivery.routes]]\ndomain = \"bounce.test\"\nnext_hop = \"{}\"\n",
            rejecting.addr
        ),
        None,
    );
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let (mut c, _) = tests::Client::connect(a.smtp);
    c.cmd("EHLO bounce");
    let r = c.send_mail(
        "sender@nowhere.test",
        &["x@bounce.test"],
        b"Subject: will bounce\r\n\r\nbody\r\n",
    );
    let original = tests::queued_id(&r).unwrap();
    // The original bounces; its DSN (to a domain with no route) stays queued on A.
    assert!(
        wait_until(20, || {
            let ids = a.spooled_ids();
            ids.len() == 1 && ids[0] != original
        }),
        "A holds only the DSN: {:?}",
        a.spooled_ids()
    );
    let dsn = a.spooled_ids().remove(0);
    assert!(
        wait_until(10, || b.spooled_ids() == vec![dsn.clone()]),
        "B holds the DSN and not the original: {:?}",
        b.spooled_ids()
    );
    let body =
        |d: &Daemon| std::fs::read(d.state.join("spool").join(format!("{dsn}.body"))).unwrap();
    assert_eq!(body(&a), body(&b), "the DSN replica is byte-identical");
    assert_gauges_match_folders(&a, "A");
    assert_gauges_match_folders(&b, "B");
}
