//! Message tracking across a pair: `spoolctl track` on either unit answers with the events of
//! both, merged by time, naming the unit of each. One message is accepted on A and replicated
//! to B, which delivers it after A dies; another is accepted on A while B is down, moved to B by
//! takeover recovery, and delivered there. A partner that cannot be asked is named; a capped
//! answer says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use tests::{sample_body, sample_message_id, spoolctl, wait_until, Client, Daemon, SmtpSink};

fn track(d: &Daemon, query: &str) -> Value {
    let (code, out, err) = spoolctl(d, &["--json", "track", query]);
    assert_eq!(code, 0, "track {query}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// `unit event` for each event, in the order given.
fn timeline(t: &Value) -> Vec<String> {
    let events = t["events"].as_array().unwrap();
    let times: Vec<u64> = events.iter().map(|e| e["t"].as_u64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "merged by time: {t}"
    );
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["unit"].as_str().unwrap(),
                e["ev"].as_str().unwrap()
            )
        })
        .collect()
}

fn send(d: &Daemon, seed: usize) {
    let (mut c, _) = Client::connect(d.smtp);
    assert!(c.cmd("EHLO track").starts_with("250"));
    let r = c.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        &sample_body(seed, 900),
    );
    assert!(r.starts_with("250"), "{r}");
}

#[test]
fn track_follows_messages_through_replication_takeover_recovery_and_delivery() {
    let sink = SmtpSink::start();
    let p = tests::pair_delivering_to(sink.addr);
    // A spools (delivers nothing): message 2 is replicated to B.
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let mut b = Daemon::start_delivering(&["--config", &p.b_config]);
    // (The sending side, A, reports the link.)
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    send(&a, 2);
    let replicated = |b: &Daemon, seed: usize| {
        timeline(&track(b, &format!("msgid:{}", sample_message_id(seed))))
            .contains(&"gw_b replicated".to_string())
    };
    assert!(wait_until(10, || replicated(&b, 2)));
    // B goes down: message 1 stays on A alone. Then A dies.
    b.kill9();
    send(&a, 1);
    // (The log is written by its own thread: the last events before a kill -9 may be lost.)
    assert!(wait_until(5, || track(
        &a,
        &format!("msgid:{}", sample_message_id(1))
    )["events"]
        .as_array()
        .is_some_and(|e| !e.is_empty())));
    a.kill9();
    // B comes back and takes over: it delivers message 2, and cannot ask A.
    b.restart();
    assert_eq!(spoolctl(&b, &["role", "active"]).0, 0);
    let partner_down = track(&b, &format!("msgid:{}", sample_message_id(2)));
    assert!(
        partner_down["notes"][0]
            .as_str()
            .unwrap_or("")
            .contains("partner"),
        "{partner_down}"
    );
    assert!(
        wait_until(20, || sink.dumped().len() == 1),
        "{} delivered\n{}",
        sink.dumped().len(),
        b.log_text()
    );
    // A comes back passive; recovery on B moves message 1, which only A had, and B delivers it.
    a.extra_args
        .extend(["--role".to_string(), "passive".to_string()]);
    a.restart();
    assert!(
        wait_until(10, || b.metric("spoold_ha_link_up") == Some(1.0)),
        "{}",
        b.log_text()
    );
    let (code, out, err) = spoolctl(&b, &["recover"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("moved 1"), "{out}");
    assert!(wait_until(20, || sink.dumped().len() == 2));
    std::thread::sleep(std::time::Duration::from_millis(500));

    for (seed, path) in [(1, "gw_b recovered"), (2, "gw_b replicated")] {
        let q = format!("msgid:{}", sample_message_id(seed));
        let on_b = track(&b, &q);
        let on_a = track(&a, &q);
        assert_eq!(
            on_a["events"], on_b["events"],
            "the same answer from either unit"
        );
        let tl = timeline(&on_b);
        eprintln!("message {seed}: {tl:?}");
        // Accepted on A first. The one event that may come before it is B storing the replica:
        // the ADD leaves A as the message is committed, and B can hold it a millisecond before
        // A's session has answered `250` and logged `accepted` (seen under load).
        let starts =
            |e: &[&str]| tl.len() >= e.len() && tl[..e.len()].iter().zip(e).all(|(a, b)| a == b);
        assert!(
            starts(&["gw_a accepted"]) || starts(&["gw_b replicated", "gw_a accepted"]),
            "{tl:?}"
        );
        let via = tl.iter().position(|e| e == path);
        assert!(via.is_some(), "{tl:?}");
        assert_eq!(
            tl.iter().filter(|e| e.ends_with(" delivered")).count(),
            1,
            "{tl:?}"
        );
        let delivered = tl.iter().position(|e| e == "gw_b delivered").unwrap();
        assert!(via < Some(delivered), "{tl:?}");
        assert!(tl.contains(&"gw_b archived".to_string()), "{tl:?}");
        assert!(on_b["notes"].as_array().unwrap().is_empty(), "{on_b}");
    }
    assert_eq!(sink.dumped().len(), 2, "each delivered once");
    assert_eq!(b.metric("spoold_track_events_dropped_total"), Some(0.0));

    // Capped: the human form says so.
    let (code, text, _) = spoolctl(&b, &["track", "--limit", "2", "from:alice@example.com"]);
    assert_eq!(code, 0);
    assert_eq!(
        text.lines().filter(|l| l.contains("gw_")).count(),
        2,
        "{text}"
    );
    assert!(text.contains("capped at 2 events"), "{text}");
    let (code, _, err) = spoolctl(&b, &["track", "after:yesterday"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a time"), "{err}");
}
