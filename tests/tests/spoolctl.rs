//! `spoolctl` against a running daemon: status, queue list/show/hold/release/requeue/delete,
//! flush, insert, role, `--json`, and the documented exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::spool::{Envelope, IdGenerator};
use tests::{pair_config, queued_id, spoolctl, Client, Daemon};

fn spool_mail(d: &Daemon, from: &str, to: &str) -> String {
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO ctl");
    let id = queued_id(&c.send_mail(from, &[to], b"Subject: ctl\r\n\r\nbody\r\n")).unwrap();
    c.cmd("QUIT");
    id
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn queue_tools_list_show_hold_release_requeue_delete() {
    let d = Daemon::start();
    let a = spool_mail(&d, "alice@example.com", "x@example.org");
    let b = spool_mail(&d, "bob@example.com", "y@example.org");

    let (code, out, _) = spoolctl(&d, &["queue", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&a) && out.contains(&b) && out.contains("-- 2 message(s)"),
        "{out}"
    );
    let out = tests::spoolctl_ok(&d, &["--json", "queue", "list", "--sender", "alice"]);
    let list = json(&out);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], a.as_str());
    assert_eq!(list[0]["recipients"][0], "x@example.org");
    let out = tests::spoolctl_ok(&d, &["--json", "queue", "list", "--rcpt", "y@"]);
    assert_eq!(json(&out)[0]["id"], b.as_str());

    let (code, out, _) = spoolctl(&d, &["queue", "show", &a]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("id {a}")) && out.contains("Subject: ctl"),
        "{out}"
    );

    assert_eq!(spoolctl(&d, &["queue", "hold", &a]).0, 0);
    assert!(d.folder("hold").contains(&format!("{a}.env")));
    assert!(!d.spooled_ids().contains(&a));
    let out = tests::spoolctl_ok(&d, &["--json", "queue", "list", "--folder", "hold"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 1);
    assert_eq!(spoolctl(&d, &["queue", "release", &a]).0, 0);
    assert!(d.spooled_ids().contains(&a));

    assert_eq!(spoolctl(&d, &["queue", "requeue", &a, &b]).0, 0);
    let out = tests::spoolctl_ok(&d, &["--json", "flush"]);
    assert_eq!(json(&out)["requeued"], 2);

    let (code, _, _) = spoolctl(&d, &["queue", "delete", "--all", "--sender", "bob"]);
    assert_eq!(code, 0);
    assert_eq!(d.spooled_ids(), vec![a.clone()]);
    // A missing id: partly failed, exit 1, the rest done.
    let (code, out, _) = spoolctl(&d, &["queue", "delete", &a, "0000000000000001-node1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("ok {a}")) && out.contains("not queued"),
        "{out}"
    );
    assert!(d.spooled_ids().is_empty());
}

#[test]
fn status_insert_and_exit_codes() {
    let d = Daemon::start();
    spool_mail(&d, "s@example.com", "r@example.org");
    let (code, out, _) = spoolctl(&d, &["--json", "status"]);
    assert_eq!(code, 0);
    let s = json(&out);
    assert_eq!(s["role"], "active");
    assert_eq!(s["queue"]["spool"], 1);

    // insert: one good pair, one with a wrong checksum.
    let ids = IdGenerator::new("other").unwrap();
    for (good, body) in [
        (true, b"Subject: in\r\n\r\nx\r\n".as_slice()),
        (false, b"Subject: bad\r\n\r\ny\r\n".as_slice()),
    ] {
        let id = ids.next_id();
        let mut env = Envelope::new(id.clone(), "p@example.com", &["q@example.org"], body);
        if !good {
            env.body_sha256 = [0; 32];
        }
        std::fs::write(d.state.join("input").join(format!("{id}.body")), body).unwrap();
        std::fs::write(
            d.state.join("input").join(format!("{id}.env")),
            env.encode(),
        )
        .unwrap();
    }
    let (code, out, _) = spoolctl(&d, &["insert"]);
    assert_eq!(
        code, 1,
        "a rejected pair makes the run partly failed: {out}"
    );
    assert!(
        out.contains("new mail inserted (id=") && out.contains("rejected "),
        "{out}"
    );
    assert_eq!(d.spooled_ids().len(), 2);

    let (code, _, err) = spoolctl(&d, &["queue", "show", "not-an-id"]);
    assert_eq!(code, 1);
    assert!(err.contains("malformed message id"), "{err}");
    let (code, _, _) = spoolctl(&d, &["queue", "frobnicate"]);
    assert_eq!(code, 2, "usage error");
    let (code, _, err) = spoolctl(&d, &["role", "passive"]);
    assert_eq!(code, 1, "a standalone unit has no role to change");
    assert!(err.contains("standalone"), "{err}");
    let mut d = d;
    d.kill9();
    let (code, _, err) = spoolctl(&d, &["status"]);
    assert_eq!(code, 3, "daemon unreachable");
    assert!(err.contains("cannot reach spoold"), "{err}");
}

#[test]
fn role_switch_through_spoolctl() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let (code, out, _) = spoolctl(&a, &["--json", "status"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["ha"]["role"], "active");
    assert_eq!(spoolctl(&a, &["role", "passive"]).0, 0);
    let (_, greeting) = Client::connect(a.smtp);
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");
    assert_eq!(spoolctl(&a, &["role", "active"]).0, 0);
    let (_, greeting) = Client::connect(a.smtp);
    assert!(greeting.starts_with("220 "), "{greeting}");
}

#[test]
fn role_changes_over_http_are_refused_and_change_nothing() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    for path in ["/admin/role/passive", "/admin/role/active", "/admin/status"] {
        let (status, body) = tests::http_post(a.http, path).unwrap();
        assert!(
            (400..500).contains(&status),
            "POST {path} answered {status}: {body}"
        );
    }
    let (_, status) = tests::http_get(a.http, "/admin/status").unwrap();
    assert!(status.starts_with("role active\n"), "{status}");
    let (_, greeting) = Client::connect(a.smtp);
    assert!(greeting.starts_with("220 "), "still active: {greeting}");
}
