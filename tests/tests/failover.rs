//! Failover as operators run it, counted at a real next hop (Postfix's `smtp-sink` behind a
//! proxy that makes it slow, so a backlog stays in the spool): a planned switchover and takeback
//! deliver nothing twice; mail accepted during a split brain is neither stranded nor delivered
//! twice; two units started active deliver nothing twice; a prompt failover raises no
//! split-brain alarm. Every message that got a `250` from either unit arrives exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use tests::proxy::FaultProxy;
use tests::{
    pair_config, send_numbered, spoolctl, wait_until, Client, Daemon, PairConfig, SmtpSink,
};

/// A pair delivering to `next_hop`, retrying every second.
fn pair(next_hop: std::net::SocketAddr) -> PairConfig {
    pair_config(
        &format!("[delivery]\ndefault_next_hop = \"{next_hop}\"\nretry_schedule_secs = [1]\n"),
        None,
    )
}

fn role(d: &Daemon, role: &str) -> String {
    let (code, out, err) = spoolctl(d, &["role", role]);
    assert_eq!(code, 0, "spoolctl role {role}: {out}{err}");
    out
}

fn held(d: &Daemon) -> usize {
    d.spooled_ids().len()
        + d.folder("vscan")
            .iter()
            .filter(|n| n.ends_with(".env"))
            .count()
}

/// Waits until both units hold nothing and the sink has at least `n` messages.
fn drained(a: &Daemon, b: &Daemon, sink: &SmtpSink, n: usize, secs: u64) {
    let quiet = |d: &Daemon| {
        let first = d.spooled_ids().first().cloned().unwrap_or_default();
        d.log_text()
            .lines()
            .filter(|l| {
                !l.contains("message accepted") || (!first.is_empty() && l.contains(&first))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        wait_until(secs, || held(a) == 0
            && held(b) == 0
            && sink.dumped().len() >= n),
        "not drained: A holds {}, B holds {}, the sink has {} of {n}\nA:\n{}\nB:\n{}",
        held(a),
        held(b),
        sink.dumped().len(),
        quiet(a),
        quiet(b)
    );
    // Anything delivered twice would arrive now.
    std::thread::sleep(Duration::from_millis(1500));
}

#[test]
fn planned_switchover_and_takeback_under_a_backlog_deliver_nothing_twice() {
    let sink = SmtpSink::start();
    // Slow enough that A still holds more than 50 of the 150 when it hands over: each message
    // waits for two delayed replies (MAIL/RCPT/DATA pipelined, then the end of data).
    let slow = FaultProxy::start(sink.addr);
    slow.set_reply_delay_ms(250);
    let p = pair(slow.addr);
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));

    let mut acked = send_numbered(a.smtp, 0, 150);
    assert_eq!(acked.len(), 150);
    assert!(
        wait_until(30, || sink.dumped().len() >= 10),
        "delivery under way"
    );
    // A session opened before the switchover gets 421 at its next command.
    let (mut open, _) = Client::connect(a.smtp);
    assert!(open.cmd("EHLO early").starts_with("250"));

    let backlog = held(&a);
    let started = Instant::now();
    let out = role(&a, "passive");
    eprintln!(
        "switchover: A handed over with {backlog} held in {:?}: {out}",
        started.elapsed()
    );
    assert!(backlog > 50, "a backlog at the switchover: {backlog}");
    assert!(out.contains("passive"), "{out}");
    assert!(
        open.cmd("MAIL FROM:<late@example.com>")
            .starts_with("421 4.3.2"),
        "an open session is refused once the unit is passive"
    );
    role(&b, "active");
    acked.extend(send_numbered(b.smtp, 10_000, 50));
    assert!(wait_until(30, || sink.dumped().len() >= 80));

    // Takeback.
    let backlog = held(&b);
    role(&b, "passive");
    role(&a, "active");
    let (code, out, err) = spoolctl(&a, &["recover"]);
    assert_eq!(code, 0, "recover: {out}{err}");
    eprintln!("takeback with {backlog} held on B; recover: {out}");
    acked.extend(send_numbered(a.smtp, 20_000, 20));
    assert_eq!(acked.len(), 220, "every message was acknowledged");
    slow.set_reply_delay_ms(0);
    drained(&a, &b, &sink, acked.len(), 120);
    sink.assert_exactly_once(&acked);
}

#[test]
fn mail_accepted_during_a_split_brain_is_delivered_once_and_not_stranded() {
    let sink = SmtpSink::start();
    let slow = FaultProxy::start(sink.addr);
    slow.set_reply_delay_ms(50);
    let p = pair(slow.addr);
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));

    role(&b, "active");
    assert!(
        wait_until(5, || b.metric("spoold_ha_split_brain") == Some(1.0)
            && a.metric("spoold_ha_split_brain") == Some(1.0)),
        "both units see the split brain"
    );
    let mut acked = send_numbered(b.smtp, 0, 100);
    acked.extend(send_numbered(a.smtp, 1000, 50));
    assert_eq!(acked.len(), 150);
    role(&b, "passive");
    let (code, out, err) = spoolctl(&a, &["recover"]);
    assert_eq!(code, 0, "recover: {out}{err}");
    assert!(wait_until(5, || a.metric("spoold_ha_split_brain") == Some(0.0)));
    slow.set_reply_delay_ms(0);
    drained(&a, &b, &sink, acked.len(), 60);
    sink.assert_exactly_once(&acked);
}

#[test]
fn two_units_started_active_deliver_nothing_twice() {
    let sink = SmtpSink::start();
    let hop = FaultProxy::start(sink.addr);
    hop.partition(true);
    let p = pair(hop.addr);
    let mut a = Daemon::start_delivering(&["--config", &p.a_config]);
    let mut b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let acked = send_numbered(a.smtp, 0, 80);
    assert_eq!(acked.len(), 80);
    assert!(
        wait_until(10, || held(&b) == 80),
        "replicated: {}",
        held(&b)
    );
    a.stop();
    b.stop();
    hop.partition(false);
    for d in [&mut b, &mut a] {
        d.extra_args.extend(["--role".into(), "active".into()]);
    }
    // The unit that loses the split-brain priority (gw_b) starts first: it must not deliver
    // before it has heard its partner.
    b.restart();
    a.restart();
    assert!(
        wait_until(30, || held(&a) == 0),
        "A delivered: holds {}",
        held(&a)
    );
    assert!(wait_until(5, || b.metric("spoold_ha_split_brain") == Some(1.0)));
    assert_eq!(
        b.metric("spoold_delivery_attempts_total{result=\"delivered\"}"),
        None,
        "B stood down: it delivered nothing"
    );
    // The operator resolves the split brain: B's replicas go with A's DELETEs.
    role(&b, "passive");
    drained(&a, &b, &sink, acked.len(), 30);
    sink.assert_exactly_once(&acked);
}

#[test]
fn a_prompt_failover_raises_no_split_brain_alarm() {
    let sink = SmtpSink::start();
    let hop = FaultProxy::start(sink.addr);
    hop.partition(true);
    let p = pair(hop.addr);
    let mut a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let acked = send_numbered(a.smtp, 0, 30);
    assert!(wait_until(10, || held(&b) == 30));
    a.kill9();
    let killed = Instant::now();
    role(&b, "active");
    hop.partition(false);
    let mut alarm = false;
    while killed.elapsed() < Duration::from_secs(4) {
        alarm |= b.metric("spoold_ha_split_brain") == Some(1.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alarm, "spoold_ha_split_brain rose on a prompt failover");
    assert!(
        !b.log_text().contains("SPLIT BRAIN"),
        "no split-brain log line"
    );
    assert!(wait_until(30, || held(&b) == 0 && sink.dumped().len() >= 30));
    sink.assert_exactly_once(&acked);
}
