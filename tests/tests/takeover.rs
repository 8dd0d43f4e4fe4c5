//! The scripted two-node scenario: A active and B passive under load; kill -9 A; B takes over and
//! delivers while more mail arrives at B; A comes back as passive; roles switch back; `spoolctl
//! recover` on A. At the sink every message that ever got a 250 from either unit arrives, once,
//! except the documented window (messages A delivered whose DELETE had not reached B before the
//! kill), which is measured and reported. `--dry-run` changes nothing; a second run finds nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::Duration;
use tests::{pair_config, queued_id, sample_body, spoolctl, wait_until, Client, Daemon, SmtpSink};

use tests::message_id_of as message_id;

/// Sends `n` messages numbered from `first`; returns the Message-IDs that got a 250 (stops at a
/// 421 or a closed connection, fails on any other reply).
fn send(d: &Daemon, first: usize, n: usize) -> Vec<String> {
    tests::send_numbered(d.smtp, first, n)
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn takeover_takeback_and_recover_lose_nothing() {
    let sink = SmtpSink::start();
    // A slow next hop, so that A holds a backlog when it is killed.
    let slow = tests::proxy::FaultProxy::start(sink.addr);
    slow.set_reply_delay_ms(100);
    let p = tests::pair_delivering_to(slow.addr);
    let mut a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));

    // A active under load, then killed.
    let loader = {
        let a_smtp = a.smtp;
        std::thread::spawn(move || {
            let fake = Daemon::handle_for(a_smtp);
            send(&fake, 0, 400)
        })
    };
    assert!(
        wait_until(30, || sink.dumped().len() >= 10
            && a.metric("spoold_accepted_messages_total").unwrap_or(0.0)
                >= 60.0),
        "delivery under way before the kill"
    );
    let held_at_kill = a.spooled_ids().len();
    a.kill9();
    let mut acked = loader.join().unwrap();
    assert!(
        acked.len() >= 50 && held_at_kill > 0,
        "the kill landed mid-work: {} acknowledged, {held_at_kill} held by A",
        acked.len()
    );
    eprintln!(
        "killed A with {} acknowledged, {held_at_kill} held, {} at the sink",
        acked.len(),
        sink.dumped().len()
    );
    slow.set_reply_delay_ms(0);

    // B takes over, delivers its replicas, and takes new mail.
    assert_eq!(spoolctl(&b, &["role", "active"]).0, 0);
    let on_b = send(&b, 10_000, 60);
    assert_eq!(
        on_b.len(),
        60,
        "the promoted partner acknowledges every message"
    );
    acked.extend(on_b);

    // A comes back as passive; B replicates to it. Then takeback: B passive, A active.
    a.extra_args
        .extend(["--role".to_string(), "passive".to_string()]);
    a.restart();
    assert!(wait_until(20, || b.metric("spoold_ha_link_up") == Some(1.0)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(spoolctl(&b, &["role", "passive"]).0, 0);
    assert_eq!(spoolctl(&a, &["role", "active"]).0, 0);

    // Dry run: a plan, no change.
    let b_before = b.folder("spool");
    let (code, out, err) = spoolctl(&a, &["--json", "recover", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let plan = json(&out);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(b.folder("spool"), b_before, "--dry-run changed nothing");

    let (code, out, err) = spoolctl(&a, &["--json", "recover"]);
    assert_eq!(code, 0, "{out}{err}");
    let report = json(&out);
    eprintln!(
        "recover: moved {}, duplicates {}, removed here {}",
        report["moved"].as_array().unwrap().len(),
        report["duplicates"].as_array().unwrap().len(),
        report["delivered_by_partner_removed_here"]
            .as_array()
            .unwrap()
            .len()
    );
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");
    // B keeps replicas only of what A holds (A's DELETEs remove them as A delivers).
    let a_ids: std::collections::BTreeSet<String> = a.spooled_ids().into_iter().collect();
    let b_extra: Vec<String> = b
        .spooled_ids()
        .into_iter()
        .filter(|id| !a_ids.contains(id))
        .collect();
    assert!(
        b_extra.is_empty()
            || wait_until(10, || b
                .spooled_ids()
                .iter()
                .all(|id| a.spooled_ids().contains(id))),
        "B holds what A does not: {b_extra:?}"
    );
    // Idempotent: a second run finds nothing to do. Its plan may list replicas on B of mail A
    // still holds (a delivery waiting for its retry): "held here (kept)" is the no-op.
    let (code, out, err) = spoolctl(&a, &["--json", "recover"]);
    assert_eq!(code, 0, "{out}{err}");
    let again = json(&out);
    assert!(
        again["moved"].as_array().unwrap().is_empty()
            && again["duplicates"].as_array().unwrap().is_empty()
            && again["delivered_by_partner_removed_here"]
                .as_array()
                .unwrap()
                .is_empty()
            && again["plan"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["action"] == "held here (kept)"),
        "{again}"
    );

    // Everything reaches the sink.
    assert!(
        wait_until(60, || a.spooled_ids().is_empty()),
        "A still holds {}",
        a.spooled_ids().len()
    );
    assert!(
        wait_until(30, || b.spooled_ids().is_empty()),
        "B converges to A's empty spool: still holds {}",
        b.spooled_ids().len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let count = sink.arrivals();
    for mid in &acked {
        assert!(
            count.contains_key(mid),
            "{mid} got a 250 and was never delivered"
        );
    }
    let duplicates: usize = count.values().map(|n| n - 1).sum();
    eprintln!("takeover: {} acknowledged, {} delivered distinct, {duplicates} duplicates (the documented window)", acked.len(), count.len());
    // The window: attempts in flight at the kill (at most `per_destination_max` = 5
    // connections to this next hop) and DELETEs logged in A's last milliseconds but not yet
    // shipped. `delivery.concurrency_max` (20) bounds both.
    assert!(
        duplicates <= 20,
        "{duplicates} duplicates is more than the attempts in flight at the kill allow"
    );
}

fn send_to(d: &Daemon, rcpt: &str, first: usize, n: usize) -> Vec<String> {
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO recover");
    (first..first + n)
        .map(|i| {
            let body = sample_body(i, 800);
            assert!(queued_id(&c.send_mail("t@example.com", &[rcpt], &body)).is_some());
            message_id(&String::from_utf8_lossy(&body)).unwrap()
        })
        .collect()
}

/// The deterministic leftover scenario; with `failpoint`, the first recovery dies there and a
/// second one (after a restart) must finish the job with the same result.
fn leftover_scenario(failpoint: Option<&str>) {
    let sink = SmtpSink::start();
    let dead = tests::free_addr(); // a next hop that is down: mail for later.example waits
    let routes = format!(
        "[delivery]\ndefault_next_hop = \"{}\"\nretry_schedule_secs = [3600]\n[[delivery.routes]]\ndomain = \"later.example\"\nnext_hop = \"{dead}\"\n",
        sink.addr
    );
    let p = pair_config(&routes, None);
    // A spools without delivering; everything it takes is replicated to B.
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let a_ok = send_to(&a, "r@ok.example", 0, 10);
    let a_later = send_to(&a, "r@later.example", 100, 5);
    assert!(wait_until(10, || b.spooled_ids().len() == 15));
    a.kill9();

    // B takes over: delivers A's 10 deliverable replicas, keeps 5; takes 3 + 2 of its own.
    assert_eq!(spoolctl(&b, &["role", "active"]).0, 0);
    let b_ok = send_to(&b, "r@ok.example", 200, 3);
    let b_later = send_to(&b, "r@later.example", 300, 2);
    assert!(
        wait_until(20, || sink.dumped().len() == 13),
        "B delivered {}",
        sink.dumped().len()
    );
    assert!(wait_until(10, || b.spooled_ids().len() == 7));
    assert_eq!(spoolctl(&b, &["role", "passive"]).0, 0);

    // A comes back active (without having heard from B) and recovers.
    a.extra_args
        .extend(["--role".to_string(), "active".to_string()]);
    if let Some(fp) = failpoint {
        a.extra_env = vec![("SPOOLD_FAILPOINT".into(), fp.into())];
        a.restart();
        let (code, _, err) = spoolctl(&a, &["recover"]);
        assert_ne!(code, 0, "{fp}: the daemon died mid-recovery: {err}");
        assert!(
            wait_until(5, || a
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_some()),
            "{fp}: daemon still alive"
        );
        a.child = None;
        a.extra_env.clear();
    }
    a.restart();
    if failpoint.is_none() {
        assert_eq!(a.spooled_ids().len(), 15, "A still holds its own 15");
        let (code, out, _) = spoolctl(&a, &["recover", "--dry-run"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("dry run: nothing changed")
                && out.contains("move")
                && out.contains("held here (kept)"),
            "{out}"
        );
        assert_eq!(b.spooled_ids().len(), 7, "dry run changed nothing on B");
        assert_eq!(a.spooled_ids().len(), 15, "dry run changed nothing on A");
    }

    let (code, out, err) = spoolctl(&a, &["--json", "recover"]);
    assert_eq!(code, 0, "{err}");
    let r = json(&out);
    if failpoint.is_none() {
        assert_eq!(r["moved"].as_array().unwrap().len(), 2, "{r}");
        assert_eq!(r["duplicates"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["held_here_kept"].as_array().unwrap().len(), 5, "{r}");
        assert_eq!(
            r["delivered_by_partner_removed_here"]
                .as_array()
                .unwrap()
                .len(),
            10,
            "{r}"
        );
        assert_eq!(r["removed_on_partner"], 2);
        assert!(a.log_text().contains("new mail inserted (id="));
    }
    assert_eq!(
        a.spooled_ids().len(),
        7,
        "{failpoint:?}: A holds its 5 waiting + B's 2 moved"
    );
    // B keeps no leftovers: what it holds now is a replica of A's spool, the moved mail
    // included (replicated anew after the recovery).
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert!(
        wait_until(10, || sorted(b.spooled_ids()) == sorted(a.spooled_ids())),
        "{failpoint:?}: B holds {:?}, A {:?}",
        b.spooled_ids(),
        a.spooled_ids()
    );

    // Idempotent: a second run moves and removes nothing and keeps the replicas.
    let out = tests::spoolctl_ok(&a, &["--json", "recover"]);
    let again = json(&out);
    assert!(
        again["plan"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["action"] == "held here (kept)")
            && again["moved"].as_array().unwrap().is_empty()
            && again["removed_on_partner"] == 0
            && again["delivered_by_partner_removed_here"]
                .as_array()
                .unwrap()
                .is_empty(),
        "{again}"
    );
    assert_eq!(
        again["held_here_kept"].as_array().unwrap().len(),
        7,
        "{again}"
    );

    // Nothing delivered twice: the 13 deliverable went out once, the 7 wait (their hop is down).
    std::thread::sleep(Duration::from_millis(300));
    let count = sink.arrivals();
    for mid in a_ok.iter().chain(&b_ok) {
        assert_eq!(count.get(mid), Some(&1), "{failpoint:?}: {mid}");
    }
    assert_eq!(count.len(), 13);
    // What waits on A is byte for byte what was sent, the mail moved from B included.
    let held: HashMap<String, Vec<u8>> = a
        .spooled_ids()
        .iter()
        .map(|id| {
            let body = a.body_without_received(id);
            (message_id(&String::from_utf8_lossy(&body)).unwrap(), body)
        })
        .collect();
    for (seed, mid) in (100..105)
        .chain(300..302)
        .zip(a_later.iter().chain(&b_later))
    {
        assert_eq!(
            held.get(mid).map(Vec::as_slice),
            Some(sample_body(seed, 800).as_slice()),
            "{failpoint:?}: {mid} waiting on A, byte-identical"
        );
    }
}

#[test]
fn recover_moves_leftovers_dedups_and_removes_what_the_partner_delivered() {
    leftover_scenario(None);
}

#[test]
fn recover_killed_at_each_step_then_rerun_loses_nothing_and_duplicates_nothing() {
    for fp in [
        "recover-after-plan",
        "recover-mid-copy",
        "recover-after-copy",
        "recover-after-insert",
        "recover-after-partner-removal",
        "recover-mid-local-removal",
        "recover-after-local-removal",
    ] {
        leftover_scenario(Some(fp));
    }
}

#[test]
fn recover_from_a_copied_out_spool_folder() {
    let p = pair_config("", None);
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    let sent = send_to(&a, "r@example.org", 0, 4);
    assert!(wait_until(10, || b.spooled_ids().len() == 4));
    a.kill9();
    // An operator copied B's spool out; recover it into a fresh standalone unit.
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir(copy.path().join("spool")).unwrap();
    for n in b.folder("spool") {
        std::fs::copy(
            b.state.join("spool").join(&n),
            copy.path().join("spool").join(&n),
        )
        .unwrap();
    }
    // One pair tampered with: it must be refused, not inserted.
    let victim = b.spooled_ids()[0].clone();
    std::fs::write(
        copy.path().join("spool").join(format!("{victim}.body")),
        b"tampered",
    )
    .unwrap();
    let fresh = Daemon::start();
    let (code, out, _) = spoolctl(
        &fresh,
        &[
            "--json",
            "recover",
            "--from-dir",
            copy.path().to_str().unwrap(),
        ],
    );
    let r = json(&out);
    assert_eq!(code, 1, "one failed: {r}");
    assert_eq!(r["moved"].as_array().unwrap().len(), 3);
    assert_eq!(r["failed"].as_array().unwrap().len(), 1);
    assert_eq!(fresh.spooled_ids().len(), 3);
    let (code, out, _) = spoolctl(
        &fresh,
        &[
            "--json",
            "recover",
            "--from-dir",
            copy.path().to_str().unwrap(),
        ],
    );
    let again = json(&out);
    assert_eq!(code, 1, "the tampered pair still fails: {again}");
    assert_eq!(again["failed"].as_array().unwrap().len(), 1);
    assert_eq!(
        again["held_here_kept"].as_array().unwrap().len(),
        3,
        "second run: all held already"
    );
    assert_eq!(sent.len(), 4);

    // What spoolctl's progress bar reads: asked for, the socket counts each step before the answer.
    let other = Daemon::start();
    let lines = admin_lines(
        &other,
        &serde_json::json!({ "cmd": "recover", "dry_run": false, "progress": true,
                             "from_dir": copy.path().to_str().unwrap() }),
    );
    let steps: Vec<String> = lines[..lines.len() - 1]
        .iter()
        .map(|l| {
            let p = &l["progress"];
            format!(
                "{} {}/{}",
                p["step"].as_str().unwrap(),
                p["done"],
                p["total"]
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            "list 4/4",
            "copy 1/4",
            "copy 2/4",
            "copy 3/4",
            "copy 4/4",
            "insert 3/4"
        ]
    );
    let answer = lines.last().unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["data"]["moved"].as_array().unwrap().len(), 3);
    assert_eq!(other.spooled_ids().len(), 3);
}

/// Sends one request to the daemon's admin socket and returns every line it answers with.
fn admin_lines(d: &Daemon, req: &serde_json::Value) -> Vec<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.state.join("spoold.sock")).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    std::io::BufReader::new(s)
        .lines()
        .map(|l| json(&l.unwrap()))
        .collect()
}

/// A recovery with many leftovers whose partner or `spoolctl` dies part-way (after some
/// copies): running it again finishes the job; every message ends on the active unit exactly
/// once and the partner converges to a replica of it.
#[test]
fn recovery_interrupted_by_the_partner_or_the_client_dying_finishes_when_run_again() {
    for who in ["partner", "client"] {
        let dead = tests::free_addr(); // a next hop that is down: everything waits
        let p = pair_config(
            &format!("[delivery]\ndefault_next_hop = \"{dead}\"\nretry_schedule_secs = [3600]\n"),
            None,
        );
        let mut a = Daemon::start_delivering(&["--config", &p.a_config]);
        let mut b = Daemon::start_delivering(&["--config", &p.b_config]);
        assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
        a.kill9();
        assert_eq!(spoolctl(&b, &["role", "active"]).0, 0);
        let on_b = send(&b, 0, 150);
        assert_eq!(on_b.len(), 150);
        assert_eq!(spoolctl(&b, &["role", "passive"]).0, 0);
        a.extra_args.extend(["--role".into(), "active".into()]);
        a.restart();

        // Ask for the recovery on the admin socket, as spoolctl does, and interrupt it.
        let sock = a.state.join("spoold.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(
            b"{\"cmd\":\"recover\",\"dry_run\":false,\"from_dir\":null,\"progress\":true}\n",
        )
        .unwrap();
        let mut lines = std::io::BufReader::new(s.try_clone().unwrap()).lines();
        loop {
            let line = lines.next().expect("progress lines").unwrap();
            if line.contains("\"step\":\"copy\"") && !line.contains("\"done\":0,") {
                break;
            }
        }
        match who {
            "partner" => b.kill9(),
            _ => drop(s), // spoolctl killed: its socket closes
        }
        if who == "partner" {
            let rest: Vec<String> = lines.map_while(Result::ok).collect();
            assert!(
                rest.last().is_some_and(|l| l.contains("\"ok\":false")),
                "the recovery failed when the partner died: {rest:?}"
            );
            b.restart();
            assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
        }
        // Run again until it reports success (a run cut short by the client may still be
        // finishing in the daemon).
        assert!(
            wait_until(60, || spoolctl(&a, &["recover"]).0 == 0),
            "{who}: recovery completes when run again"
        );
        let held_a: std::collections::BTreeSet<String> = a
            .spooled_ids()
            .iter()
            .map(|id| message_id(&String::from_utf8_lossy(&a.body_without_received(id))).unwrap())
            .collect();
        assert_eq!(a.spooled_ids().len(), 150, "{who}: each message once on A");
        for mid in &on_b {
            assert!(held_a.contains(mid), "{who}: {mid} on A after recovery");
        }
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert!(
            wait_until(20, || sorted(b.spooled_ids()) == sorted(a.spooled_ids())),
            "{who}: B converges to A: B {} A {}",
            b.spooled_ids().len(),
            a.spooled_ids().len()
        );
        eprintln!("{who} died mid-recovery: rerun moved the rest; 150 on A once, B a replica");
    }
}
