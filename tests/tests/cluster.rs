//! Clustered settings on a pair: a relay domain set on the passive unit is accepted by the
//! active unit's SMTP listener within a second; an invalid change and a machine-only key are
//! refused where they are made and change nothing anywhere; a machine-level override (an
//! explicit empty list) stays on its unit; a unit that was down catches up; concurrent changes
//! converge on the newer one and the loser is reported; settings survive a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::time::{Duration, Instant};
use tests::{pair_config, spoolctl, wait_until, Client, Daemon};

/// The reply to `RCPT TO:<x@domain>` from a client outside the trusted networks.
fn rcpt(d: &Daemon, domain: &str) -> String {
    let (mut c, _) = Client::connect(d.smtp);
    assert!(c.cmd("EHLO stranger").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<s@example.com>").starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<x@{domain}>"));
    let _ = c.cmd("QUIT");
    r
}

fn effective(d: &Daemon) -> Value {
    let (code, out, err) = spoolctl(d, &["--json", "config", "show", "smtp.relay_domains"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["keys"][0]["effective"].clone()
}

fn set(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    spoolctl(d, &all)
}

#[test]
fn clustered_settings_reach_the_partner_live_and_converge() {
    // Loopback is not trusted here, so the tests' client is a stranger.
    let p = pair_config(
        "[smtp]\nrelay_domains = [\"file.example\"]\ntrusted_networks = [\"192.0.2.0/24\"]\n",
        None,
    );
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let mut b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    assert!(rcpt(&a, "file.example").starts_with("250"));
    assert!(rcpt(&a, "added.example").starts_with("554 5.7.1"));

    // Set on the passive unit, accepted by the active unit's listener.
    let t = Instant::now();
    let (code, out, err) = set(
        &b,
        &[
            "set",
            "smtp.relay_domains",
            r#"["file.example", "added.example"]"#,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent to gw_a in"), "{out}");
    assert!(wait_until(5, || rcpt(&a, "added.example").starts_with("250")));
    let took = t.elapsed();
    eprintln!(
        "a relay domain set on B accepted by A's listener after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(effective(&a), effective(&b));

    // A limit too: recipients per message, set on B, enforced by A's next session.
    let (code, _, err) = set(&b, &["set", "smtp.recipients_max", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("smtp.recipients_max"), "{err}");
    assert_eq!(set(&b, &["set", "smtp.recipients_max", "2"]).0, 0);
    let replies = || {
        let (mut c, _) = Client::connect(a.smtp);
        c.cmd("EHLO stranger");
        c.cmd("MAIL FROM:<s@example.com>");
        let r: Vec<String> = (0..3)
            .map(|i| c.cmd(&format!("RCPT TO:<r{i}@file.example>")))
            .collect();
        let _ = c.cmd("QUIT");
        r
    };
    assert!(
        wait_until(5, || replies()[2].starts_with("452")),
        "{:?}",
        replies()
    );
    assert_eq!(set(&b, &["unset", "smtp.recipients_max"]).0, 0);
    assert!(wait_until(5, || replies()[2].starts_with("250")));

    // Refused at the origin, changing nothing anywhere.
    let before = effective(&a);
    let (code, _, err) = set(&a, &["set", "smtp.relay_domains", r#"["bad domain"]"#]);
    assert_ne!(code, 0);
    assert!(
        err.contains("smtp.relay_domains") && err.contains("not a domain"),
        "{err}"
    );
    let (code, _, err) = set(&a, &["set", "smtp.listen", r#""0.0.0.0:25""#]);
    assert_ne!(code, 0);
    assert!(err.contains("machine-only"), "{err}");
    let (code, _, err) = set(&a, &["set", "smtp.relay_domains", "[unclosed"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a TOML value"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (effective(&a), effective(&b)),
        (before.clone(), before.clone())
    );

    // A machine-level explicit empty list: A relays nothing, B is unchanged.
    let (code, out, err) = set(
        &a,
        &["set", "smtp.relay_domains", "[]", "--level", "machine"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(rcpt(&a, "file.example").starts_with("554"));
    assert_eq!(effective(&a), serde_json::json!([]));
    assert_eq!(effective(&b), before);
    let (code, _, _) = set(&a, &["unset", "smtp.relay_domains", "--level", "machine"]);
    assert_eq!(code, 0);
    assert!(rcpt(&a, "added.example").starts_with("250"));

    // B down during a change: it catches up when it returns.
    b.kill9();
    let (code, out, _) = set(
        &a,
        &[
            "set",
            "smtp.relay_domains",
            r#"["file.example", "later.example"]"#,
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("next exchange"), "{out}");
    let status = |d: &Daemon| {
        let (code, out, err) = spoolctl(d, &["--json", "cluster", "status"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let down = status(&a);
    assert_eq!(down["members"][0]["connected"], false, "{down}");
    assert!(down["members"][0]["error"].is_string(), "{down}");
    b.restart();
    let later = serde_json::json!(["file.example", "later.example"]);
    assert!(
        wait_until(15, || effective(&b) == later),
        "B did not catch up: {}",
        effective(&b)
    );

    // Concurrent changes: both units end with the newer, and the loser is reported.
    let (a_args, b_args) = (
        [
            "config",
            "set",
            "smtp.relay_domains",
            r#"["from-a.example"]"#,
        ],
        [
            "config",
            "set",
            "smtp.relay_domains",
            r#"["from-b.example"]"#,
        ],
    );
    // A true race: neither sees the other's change before making its own (A is cut off from
    // the exchanges meanwhile; without that, one change may well reach the other unit first,
    // and the later one is then an override, not a conflict).
    assert_eq!(spoolctl(&a, &["cluster", "disconnect"]).0, 0);
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(spoolctl(&a, &a_args).0, 0));
        s.spawn(|| assert_eq!(spoolctl(&b, &b_args).0, 0));
    });
    assert_eq!(spoolctl(&a, &["cluster", "reconnect"]).0, 0);
    assert!(
        wait_until(15, || effective(&a) == effective(&b)),
        "not converged: {} vs {}",
        effective(&a),
        effective(&b)
    );
    let conflicts = |d: &Daemon| {
        let out = tests::spoolctl_ok(d, &["--json", "config", "show"]);
        serde_json::from_str::<Value>(&out).unwrap()["conflicts"]
            .as_array()
            .unwrap()
            .len()
    };
    assert!(
        wait_until(15, || conflicts(&a) + conflicts(&b) >= 1),
        "the losing change is reported"
    );
    let (_, text, _) = spoolctl(&a, &["config", "show"]);
    eprintln!("{text}");
    // Both see the other connected, at the same settings version.
    assert!(
        wait_until(15, || {
            let (sa, sb) = (status(&a), status(&b));
            sa["members"][0]["connected"] == true
                && sa["members"][0]["node"] == "gw_b"
                && sa["members"][0]["version"] == sa["version"]
                && sb["members"][0]["version"] == sb["version"]
                && sa["version"] == sb["version"]
        }),
        "{} {}",
        status(&a),
        status(&b)
    );
    let (_, text, _) = spoolctl(&a, &["cluster", "status"]);
    eprintln!("{text}");

    // Exported, the configuration in effect is a file spoold accepts, with the clustered value.
    let (code, exported, err) = spoolctl(&a, &["config", "export"]);
    assert_eq!(code, 0, "{err}");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &exported).unwrap();
    let check = std::process::Command::new(tests::spoold_bin())
        .arg("--config")
        .arg(file.path())
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{exported}",
        String::from_utf8_lossy(&check.stderr)
    );
    let domain = effective(&a)[0].as_str().unwrap().to_string();
    assert!(exported.contains(&domain), "{exported}");

    // Groups: B put in group `edge` from A; a value for the group applies on B only; moved to
    // the cluster level, it applies on both.
    let before_a = effective(&a);
    assert_eq!(
        set(
            &a,
            &[
                "set",
                "machine.group",
                "\"edge\"",
                "--level",
                "machine:gw_b"
            ]
        )
        .0,
        0
    );
    let edge = serde_json::json!(["edge.example"]);
    let (code, out, err) = set(
        &a,
        &[
            "set",
            "smtp.relay_domains",
            r#"["edge.example"]"#,
            "--level",
            "group:edge",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(wait_until(5, || effective(&b) == edge), "{}", effective(&b));
    assert_eq!(effective(&a), before_a, "A is in no group");
    let (code, out, err) = set(
        &a,
        &[
            "move",
            "smtp.relay_domains",
            "--from",
            "group:edge",
            "--to",
            "cluster",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(wait_until(5, || effective(&a) == edge && effective(&b) == edge));

    // Disconnected for an upgrade: a change stays on A; reconnected, it reaches B at once.
    assert_eq!(spoolctl(&a, &["cluster", "disconnect"]).0, 0);
    let (code, out, _) = set(&a, &["set", "smtp.relay_domains", r#"["upgrade.example"]"#]);
    assert_eq!(code, 0);
    assert!(out.contains("disconnected"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(effective(&b), edge, "B kept its settings");
    assert_eq!(status(&a)["disconnected"], true);
    let check = |d: &Daemon, extra: &[&str]| {
        let mut args = vec!["--json", "cluster", "check"];
        args.extend_from_slice(extra);
        let (code, out, err) = spoolctl(d, &args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let differs = check(&a, &[]);
    assert!(
        differs["differences"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("smtp.relay_domains cluster"),
        "{differs}"
    );
    assert_eq!(spoolctl(&a, &["cluster", "reconnect"]).0, 0);
    let upgrade = serde_json::json!(["upgrade.example"]);
    assert!(
        wait_until(3, || effective(&b) == upgrade),
        "{}",
        effective(&b)
    );
    assert!(wait_until(3, || check(&a, &[])["differences"]
        .as_array()
        .unwrap()
        .is_empty()));
    // A difference settled from one member: A takes B's value back.
    assert_eq!(spoolctl(&a, &["cluster", "disconnect"]).0, 0);
    assert_eq!(
        set(&a, &["set", "smtp.relay_domains", r#"["stray.example"]"#]).0,
        0
    );
    let resolved = check(&a, &["--resolve-from", "gw_b"]);
    assert_eq!(resolved["resolved"], 1, "{resolved}");
    assert_eq!(effective(&a), upgrade);
    assert_eq!(spoolctl(&a, &["cluster", "reconnect"]).0, 0);
    assert!(wait_until(3, || effective(&b) == upgrade && effective(&a) == upgrade));

    // The exchanges (request sessions the partner hangs up) are not faults in the log.
    assert!(
        !a.log_text().contains("replication receiver"),
        "{}",
        a.log_text()
    );

    // Durable: after a restart A applies the same.
    let now = effective(&a);
    a.kill9();
    a.restart();
    assert_eq!(effective(&a), now);
    let domain = now[0].as_str().unwrap().to_string();
    assert!(rcpt(&a, &domain).starts_with("250"));
}

/// Delivery settings apply live too: a message waiting for lack of a route on A is delivered
/// once its next hop is set on B.
#[test]
fn a_next_hop_set_on_the_partner_delivers_waiting_mail() {
    let sink = tests::SmtpSink::start();
    let p = pair_config("[delivery]\nretry_schedule_secs = [1]\n", None);
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let (mut c, _) = Client::connect(a.smtp);
    assert!(c.cmd("EHLO hop").starts_with("250"));
    let r = c.send_mail(
        "s@example.com",
        &["r@example.org"],
        &tests::sample_body(5, 600),
    );
    let id = tests::queued_id(&r).unwrap();
    let track = |d: &Daemon| {
        let out = tests::spoolctl_ok(d, &["--json", "track", &format!("id:{id}")]);
        serde_json::from_str::<Value>(&out).unwrap()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["ev"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(wait_until(5, || track(&a).contains(&"deferred".to_string())));
    assert!(sink.dumped().is_empty());
    let hop = format!("\"{}\"", sink.addr);
    let (code, out, err) = set(&b, &["set", "delivery.default_next_hop", &hop]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_until(10, || sink.dumped().len() == 1),
        "not delivered: {:?}",
        track(&a)
    );
    assert!(track(&a).contains(&"delivered".to_string()));
    // An invalid hop is refused where it is typed.
    let (code, _, err) = set(&b, &["set", "delivery.default_next_hop", "\"nowhere\""]);
    assert_ne!(code, 0);
    assert!(err.contains("delivery.default_next_hop"), "{err}");
}
