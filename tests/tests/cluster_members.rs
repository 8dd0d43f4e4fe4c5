//! A cluster of three units on loopback, each a standalone spoold with a `[cluster]` link: one
//! creates the cluster, the others join (one through the first, one through the second); a
//! wrong secret cannot join; a change made on any member reaches the others' SMTP listeners
//! within a second (latency printed); machine-only keys and machine overrides stay home; an
//! invalid change is refused where it is made and changes nothing anywhere; a member killed
//! during a change catches up when it returns; concurrent changes resolve to the newer stamp
//! everywhere and the loser is reported; groups; tracking answers from every member; a member
//! that leaves keeps the settings it used and exchanges nothing more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::{free_addr, pair_config, spoolctl, wait_until, Client, Daemon};

const SECRET: &str = "cluster secret: eleven pipers piping";

struct Member {
    d: Daemon,
    link: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

fn member(name: &str, secret: &str) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let link = free_addr();
    let path = dir.path().join("spoold.toml");
    // Loopback is not trusted here, so the tests' client is a stranger.
    std::fs::write(
        &path,
        format!(
            "node_name = \"{name}\"\n[smtp]\nrelay_domains = [\"file.example\"]\ntrusted_networks = [\"192.0.2.0/24\"]\n\
             [cluster]\nlisten = \"{link}\"\nsecret = \"{secret}\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    Member {
        d,
        link,
        _dir: Some(dir),
    }
}

/// Sends one message to `m` (a stranger, to a relay domain); answers the `250` line.
fn send(m: &Member, msgid: &str) -> String {
    let (mut cl, _) = Client::connect(m.d.smtp);
    cl.cmd("EHLO stranger");
    cl.cmd("MAIL FROM:<tracked@example.com>");
    assert!(cl.cmd("RCPT TO:<x@file.example>").starts_with("250"));
    assert!(cl.cmd("DATA").starts_with("354"));
    let r = cl.cmd(&format!("Message-ID: {msgid}\r\nSubject: t\r\n\r\nhi\r\n."));
    let _ = cl.cmd("QUIT");
    assert!(r.starts_with("250"), "{r}");
    r
}

/// The units that logged event `ev` for the message with this Message-ID, asked of `m`.
fn tracked_units(m: &Member, msgid: &str, ev: &str) -> Vec<String> {
    let mut units: Vec<String> = json(m, &["track", &format!("msgid:{msgid}")])["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ev"] == ev)
        .map(|e| e["unit"].as_str().unwrap().to_string())
        .collect();
    units.sort();
    units
}

fn ctl(m: &Member, args: &[&str]) -> (i32, String, String) {
    spoolctl(&m.d, args)
}

fn json(m: &Member, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = spoolctl(&m.d, &all);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

fn effective(m: &Member, key: &str) -> Value {
    json(m, &["config", "show", key])["keys"][0]["effective"].clone()
}

fn members(m: &Member) -> Vec<String> {
    json(m, &["cluster", "list"])["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["node"].as_str().unwrap().to_string())
        .collect()
}

/// Whether this member's SMTP listener accepts a recipient in `domain` from a stranger.
fn accepts(m: &Member, domain: &str) -> bool {
    let (mut c, _) = Client::connect(m.d.smtp);
    assert!(c.cmd("EHLO stranger").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<s@example.com>").starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<x@{domain}>"));
    let _ = c.cmd("QUIT");
    assert!(
        r.starts_with("250") || r.starts_with("554 5.7.1"),
        "RCPT: {r}"
    );
    r.starts_with("250")
}

/// Sets `key` on `on` and answers how long until every one of `others` has it in effect.
fn propagate(on: &Member, others: &[&Member], key: &str, value: &str) -> Duration {
    let t = Instant::now();
    let (code, out, err) = ctl(on, &["config", "set", key, value]);
    assert_eq!(code, 0, "{out}{err}");
    let want = effective(on, key);
    for m in others {
        assert!(
            wait_until(5, || effective(m, key) == want),
            "{key} never reached a member: {}",
            effective(m, key)
        );
    }
    t.elapsed()
}

#[test]
fn three_members_share_settings() {
    let a = member("gw_a", SECRET);
    let b = member("gw_b", SECRET);
    let c = member("gw_c", SECRET);

    // No cluster yet: a join has nobody to ask of.
    let (code, _, err) = ctl(&b, &["cluster", "join", &a.link.to_string()]);
    assert_ne!(code, 0);
    assert!(err.contains("in no cluster"), "{err}");
    assert_eq!(ctl(&a, &["cluster", "create", "edge"]).0, 0);

    // B had a setting of its own: the join replaces it with the cluster's, after a backup.
    assert_eq!(ctl(&b, &["config", "set", "smtp.recipients_max", "7"]).0, 0);
    let (code, out, err) = ctl(&b, &["cluster", "join", &a.link.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replaced by the cluster's"), "{out}");
    assert_eq!(effective(&b, "smtp.recipients_max"), 100);
    let backups: Vec<_> = std::fs::read_dir(b.d.state.join("cluster"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("settings.before-join.")
        })
        .collect();
    assert_eq!(backups.len(), 1);
    let saved = std::fs::read_to_string(backups[0].path()).unwrap();
    assert!(saved.contains("smtp.recipients_max"), "{saved}");

    // A wrong secret cannot join, and nothing changes on the member asked.
    let intruder = member("gw_x", "not the cluster's secret, at all");
    let (code, _, err) = ctl(&intruder, &["cluster", "join", &a.link.to_string()]);
    assert_ne!(code, 0);
    assert!(err.contains("authentication"), "{err}");
    assert_eq!(members(&a), ["gw_a", "gw_b"]);
    assert!(json(&intruder, &["cluster", "list"])["cluster"].is_null());
    assert_eq!(a.d.metric("spoold_cluster_auth_failures_total"), Some(1.0));
    drop(intruder);

    // C joins through B; A learns of it from B.
    let (code, out, err) = ctl(&c, &["cluster", "join", &b.link.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_until(3, || members(&a).len() == 3),
        "{:?}",
        members(&a)
    );
    assert_eq!(members(&c), ["gw_a", "gw_b", "gw_c"]);

    // A change on any member reaches the others' SMTP listeners within a second.
    for (on, others, domain) in [
        (&a, [&b, &c], "from-a.example"),
        (&c, [&a, &b], "from-c.example"),
    ] {
        assert!(!accepts(others[0], domain));
        let t = Instant::now();
        let value = format!(r#"["file.example", "{domain}"]"#);
        assert_eq!(
            ctl(on, &["config", "set", "smtp.relay_domains", &value]).0,
            0
        );
        for m in others {
            assert!(wait_until(5, || accepts(m, domain)));
        }
        let took = t.elapsed();
        eprintln!(
            "relay domain set on one member, accepted by both others' listeners after {} ms",
            took.as_millis()
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    let took = propagate(&b, &[&a, &c], "smtp.recipients_max", "50");
    eprintln!(
        "recipients limit set on gw_b, in effect on the two others after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Machine-only keys are refused; a machine override stays on its unit.
    let (code, _, err) = ctl(&a, &["config", "set", "cluster.listen", "\"127.0.0.1:1\""]);
    assert_ne!(code, 0);
    assert!(err.contains("machine-only"), "{err}");
    assert_eq!(
        ctl(
            &b,
            &[
                "config",
                "set",
                "smtp.relay_domains",
                "[]",
                "--level",
                "machine"
            ]
        )
        .0,
        0
    );
    assert!(!accepts(&b, "from-c.example"));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(accepts(&a, "from-c.example") && accepts(&c, "from-c.example"));

    // An invalid change is refused on its origin and changes nothing anywhere.
    let before: Vec<Value> = [&a, &b, &c]
        .iter()
        .map(|m| json(m, &["config", "show"]))
        .collect();
    let (code, _, err) = ctl(&c, &["config", "set", "smtp.message_bytes_max", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("smtp.message_bytes_max"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    for (m, was) in [&a, &b, &c].iter().zip(&before) {
        assert_eq!(&json(m, &["config", "show"]), was);
    }

    // A member killed during a change catches up when it returns.
    let mut c = c;
    c.d.kill9();
    assert_eq!(ctl(&a, &["config", "set", "smtp.recipients_max", "3"]).0, 0);
    let status = json(&a, &["cluster", "status"]);
    let gw_c = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node"] == "gw_c")
        .unwrap()
        .clone();
    assert_eq!(gw_c["connected"], false, "{status}");
    // The error names the link it happened on (the replication link's read the same before).
    assert!(
        gw_c["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cluster link to ")),
        "{status}"
    );
    let t = Instant::now();
    c.d.restart();
    assert!(
        wait_until(10, || effective(&c, "smtp.recipients_max") == 3),
        "{}",
        effective(&c, "smtp.recipients_max")
    );
    eprintln!(
        "a member back from kill -9 caught up {} ms after its start began",
        t.elapsed().as_millis()
    );

    // Concurrent changes: B cut off, a change on A, a later one on B; reconnected, B's newer
    // one wins everywhere and A's is reported as lost on every member.
    assert_eq!(ctl(&b, &["cluster", "disconnect"]).0, 0);
    assert_eq!(
        ctl(&a, &["config", "set", "smtp.idle_timeout_secs", "111"]).0,
        0
    );
    std::thread::sleep(Duration::from_millis(20));
    let (code, out, _) = ctl(&b, &["config", "set", "smtp.idle_timeout_secs", "222"]);
    assert_eq!(code, 0);
    assert!(out.contains("disconnected"), "{out}");
    assert_eq!(effective(&c, "smtp.idle_timeout_secs"), 111);
    assert_eq!(ctl(&b, &["cluster", "reconnect"]).0, 0);
    for m in [&a, &b, &c] {
        assert!(
            wait_until(5, || effective(m, "smtp.idle_timeout_secs") == 222),
            "{}",
            effective(m, "smtp.idle_timeout_secs")
        );
        assert!(
            wait_until(5, || json(m, &["config", "show"])["conflicts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["key"] == "smtp.idle_timeout_secs"
                    && c["level"] == "cluster"
                    && c["value"] == 111
                    && c["lost_to"].is_string())),
            "{}",
            json(m, &["config", "show"])["conflicts"]
        );
        assert!(json(m, &["cluster", "status"])["conflicts"].as_u64() >= Some(1));
    }
    assert!(wait_until(5, || a.d.metric("spoold_cluster_conflicts") >= Some(1.0)));
    assert!(a.d.log_text().contains("lost"), "the log reports the loser");

    // Groups: a group's value applies to its machines only, and follows a rename.
    assert_eq!(ctl(&a, &["group", "add", "dmz"]).0, 0);
    let (code, _, err) = ctl(&a, &["machine", "setgroup", "gw_c", "nogroup"]);
    assert_ne!(code, 0);
    assert!(err.contains("no group"), "{err}");
    assert_eq!(ctl(&b, &["machine", "setgroup", "gw_c", "dmz"]).0, 0);
    assert_eq!(
        ctl(
            &a,
            &[
                "config",
                "set",
                "smtp.relay_domains",
                r#"["dmz.example"]"#,
                "--level",
                "group:dmz"
            ]
        )
        .0,
        0
    );
    assert!(wait_until(3, || accepts(&c, "dmz.example")));
    assert!(!accepts(&a, "dmz.example"));
    assert_eq!(ctl(&c, &["group", "rename", "dmz", "edge_in"]).0, 0);
    let list = json(&a, &["cluster", "list"]);
    assert!(
        wait_until(3, || json(&a, &["cluster", "list"])["groups"]
            == serde_json::json!([{"name": "edge_in", "machines": ["gw_c"]}])),
        "{list}"
    );
    assert!(accepts(&c, "dmz.example"), "the group's settings followed");
    let (code, _, err) = ctl(&a, &["group", "delete", "edge_in"]);
    assert_ne!(code, 0);
    assert!(err.contains("gw_c"), "{err}");

    // Status: both others connected, at this member's version; check finds no difference.
    assert!(wait_until(5, || {
        let s = json(&a, &["cluster", "status"]);
        s["members"].as_array().unwrap().len() == 2
            && s["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["connected"] == true && m["version"] == s["version"])
    }));
    for member in ["gw_b", "gw_c"] {
        let up = format!("spoold_cluster_member_up{{member=\"{member}\"}}");
        assert_eq!(a.d.metric(&up), Some(1.0), "{up}");
    }
    let checked = json(&a, &["cluster", "check"]);
    assert_eq!(checked["differences"], serde_json::json!([]), "{checked}");
    let (_, text, _) = ctl(&a, &["cluster", "status"]);
    eprintln!("{text}");
    // One member disconnected by name: shown, and changes wait for it.
    assert_eq!(ctl(&a, &["cluster", "disconnect", "gw_c"]).0, 0);
    let (_, text, _) = ctl(&a, &["cluster", "status"]);
    assert!(
        text.contains("gw_c (") && text.contains("DISCONNECTED"),
        "{text}"
    );
    assert_eq!(ctl(&a, &["cluster", "reconnect", "gw_c"]).0, 0);

    // Tracking answers from every member: a message accepted on A, found from C.
    send(&a, "<three@example.com>");
    assert!(wait_until(5, || tracked_units(
        &c,
        "<three@example.com>",
        "accepted"
    ) == ["gw_a"]));

    // C leaves: it keeps the settings it used; nothing more is exchanged either way.
    let kept = json(&c, &["config", "show"]);
    let (code, out, err) = ctl(&c, &["cluster", "leave"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(json(&c, &["cluster", "list"])["cluster"].is_null());
    let after = json(&c, &["config", "show"]);
    for (k, was) in kept["keys"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["keys"].as_array().unwrap())
    {
        assert_eq!(k["effective"], was["effective"], "{}", k["key"]);
    }
    assert!(accepts(&c, "dmz.example"));
    assert!(wait_until(3, || members(&a) == ["gw_a", "gw_b"]));
    assert!(wait_until(3, || members(&b) == ["gw_a", "gw_b"]));
    assert_eq!(ctl(&a, &["config", "set", "smtp.recipients_max", "9"]).0, 0);
    assert_eq!(ctl(&c, &["config", "set", "smtp.recipients_max", "4"]).0, 0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(effective(&c, "smtp.recipients_max"), 4);
    assert_eq!(effective(&a, "smtp.recipients_max"), 9);
    assert_eq!(effective(&b, "smtp.recipients_max"), 9);

    // C joins again, then leaves while the others are down: they still list it when they come
    // back, and since it answers from no cluster, `cluster remove` clears it.
    assert_eq!(ctl(&c, &["cluster", "join", &a.link.to_string()]).0, 0);
    assert_eq!(
        effective(&c, "smtp.recipients_max"),
        9,
        "the cluster's, again"
    );
    assert!(wait_until(3, || members(&b).len() == 3));
    let (mut a, mut b) = (a, b);
    a.d.kill9();
    b.d.kill9();
    let (code, out, err) = ctl(&c, &["cluster", "leave"]);
    assert_eq!(code, 0, "{out}{err}");
    a.d.restart();
    b.d.restart();
    assert_eq!(members(&a), ["gw_a", "gw_b", "gw_c"]);
    let (code, out, err) = ctl(&a, &["cluster", "remove", "gw_c"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(wait_until(3, || members(&b) == ["gw_a", "gw_b"]));
}

/// Both units of an HA pair and a third unit in one cluster: the pair joins like any member
/// (each unit on its own cluster link), a change made on the third unit reaches both units of
/// the pair, and tracking asked of the third unit follows a message accepted on the active
/// unit and replicated to the passive one.
#[test]
fn a_pair_and_a_third_unit_in_one_cluster() {
    let p = pair_config(
        "[smtp]\nrelay_domains = [\"file.example\"]\ntrusted_networks = [\"192.0.2.0/24\"]\n",
        None,
    );
    let with_link = |config: &str| {
        let link = free_addr();
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(
            config,
            format!("{text}[cluster]\nlisten = \"{link}\"\nsecret = \"{SECRET}\"\n"),
        )
        .unwrap();
        link
    };
    let (la, lb) = (with_link(&p.a_config), with_link(&p.b_config));
    let a = Member {
        d: Daemon::start_with(&["--config", &p.a_config]),
        link: la,
        _dir: None,
    };
    let b = Member {
        d: Daemon::start_with(&["--config", &p.b_config]),
        link: lb,
        _dir: None,
    };
    let c = member("gw_c", SECRET);
    assert!(wait_until(10, || a.d.metric("spoold_ha_link_up") == Some(1.0)));

    assert_eq!(ctl(&a, &["cluster", "create", "pairs"]).0, 0);
    assert_eq!(ctl(&b, &["cluster", "join", &a.link.to_string()]).0, 0);
    assert_eq!(ctl(&c, &["cluster", "join", &b.link.to_string()]).0, 0);
    assert!(wait_until(3, || members(&a).len() == 3));

    let t = Instant::now();
    assert_eq!(
        ctl(
            &c,
            &[
                "config",
                "set",
                "smtp.relay_domains",
                r#"["file.example", "third.example"]"#
            ]
        )
        .0,
        0
    );
    // The active unit's listener takes it; the passive one (which accepts no mail) has it in
    // effect for when it becomes active.
    assert!(wait_until(5, || accepts(&a, "third.example")));
    let want = serde_json::json!(["file.example", "third.example"]);
    assert!(wait_until(5, || effective(&b, "smtp.relay_domains") == want));
    eprintln!(
        "relay domain set on the third unit, accepted by the active unit's listener and in effect on the passive one after {} ms",
        t.elapsed().as_millis()
    );
    assert!(t.elapsed() < Duration::from_secs(1));

    send(&a, "<paired@example.com>");
    assert!(
        wait_until(5, || tracked_units(&c, "<paired@example.com>", "accepted")
            == ["gw_a"]
            && tracked_units(&c, "<paired@example.com>", "replicated")
                == ["gw_b"]),
        "{}",
        json(&c, &["track", "msgid:<paired@example.com>"])
    );
    let s = json(&c, &["cluster", "status"]);
    assert_eq!(s["cluster"], "pairs");
    assert_eq!(s["members"].as_array().unwrap().len(), 2, "{s}");

    // A member that answers cannot be removed; once dead, it can, and the others drop it.
    let (code, _, err) = ctl(&a, &["cluster", "remove", "gw_c"]);
    assert_ne!(code, 0);
    assert!(err.contains("cluster leave"), "{err}");
    let mut c = c;
    c.d.kill9();
    let (code, out, err) = ctl(&a, &["cluster", "remove", "gw_c"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(members(&a), ["gw_a", "gw_b"]);
    assert!(wait_until(3, || members(&b) == ["gw_a", "gw_b"]));
    // Back, it is no longer a member: its exchanges are refused and say why.
    c.d.restart();
    let (code, out, err) = ctl(
        &c,
        &["config", "set", "smtp.relay_domains", r#"["late.example"]"#],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gw_c is not a member"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!accepts(&a, "late.example"));
}
