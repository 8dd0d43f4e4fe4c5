//! The web console in a real browser (Debian's Chromium through ChromeDriver): each role kept
//! to its own work whatever URL it types, HTML mail shown inert, forms refused without their
//! CSRF token, login lockout, settings validated, a queue hold from the page on disk, spam a
//! milter held released by its recipient with a click, and
//! every view in the audit log under the console user's name. Screenshots of the main pages
//! go to `target/console-screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use tests::webdriver::Browser;
use tests::{spoolctl, spoolctl_ok, wait_until, Client, Daemon};

/// A daemon that spools but does not deliver, with its console on a port of its own.
fn console_daemon() -> Daemon {
    let mut d = Daemon::unstarted(&["--no-delivery"]);
    d.console = Some(tests::free_addr());
    d.restart();
    d
}

fn base(d: &Daemon) -> String {
    format!("https://{}", d.console.unwrap())
}

fn admin_password(d: &Daemon) -> String {
    std::fs::read_to_string(d.state.join("console/admin.password"))
        .unwrap()
        .trim()
        .to_string()
}

/// Adds a console user with `password` through spoolctl.
fn add_user(d: &Daemon, dir: &Path, name: &str, role: &str, addresses: &[&str], password: &str) {
    let file = dir.join(format!("{name}.password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let mut args = vec![
        "user",
        "add",
        name,
        "--role",
        role,
        "--password-file",
        file.to_str().unwrap(),
    ];
    for a in addresses {
        args.extend(["--address", a]);
    }
    spoolctl_ok(d, &args);
}

fn login(b: &Browser, d: &Daemon, user: &str, password: &str) {
    b.go(&format!("{}/login", base(d)));
    b.find("#user").type_text(user);
    b.find("#password").type_text(password);
    b.find("form.login button").click_to_next_page();
}

fn logout(b: &Browser) {
    b.find("form.logout button").click_to_next_page();
    assert!(b.url().ends_with("/login"), "{}", b.url());
}

fn screenshots() -> PathBuf {
    tests::workspace_root().join("target/console-screenshots")
}

/// Imports `messages` into the archive (an mbox) and waits until they are searchable.
fn archive(d: &Daemon, dir: &Path, messages: &[String]) {
    let mut mbox = Vec::new();
    for m in messages {
        mbox.extend_from_slice(b"From sender@example.org Sat Jan  3 01:05:34 2026\n");
        archive::import::quote(m.as_bytes(), &mut mbox);
        mbox.extend_from_slice(b"\n");
    }
    let file = dir.join("mail.mbox");
    std::fs::write(&file, mbox).unwrap();
    spoolctl_ok(d, &["archive", "import", file.to_str().unwrap()]);
    assert!(wait_until(30, || {
        let st: Value =
            serde_json::from_str(&spoolctl_ok(d, &["--json", "archive", "status"])).unwrap();
        st["indexed_through"] == st["last_seq"] && st["items"] == messages.len() as u64
    }));
}

/// The archive's item number of the message with this Message-ID.
fn seq_of(d: &Daemon, msgid: &str) -> u64 {
    let v: Value = serde_json::from_str(&spoolctl_ok(
        d,
        &["--json", "archive", "search", &format!("msgid:<{msgid}>")],
    ))
    .unwrap();
    v["items"][0]["seq"].as_u64().unwrap()
}

fn mail(from: &str, to: &str, subject: &str, msgid: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{msgid}>\r\nDate: Sat, 3 Jan 2026 01:05:34 +0000\r\n\r\n{body}\r\n"
    )
}

/// An HTML mail that would run script and load an image if it were rendered.
fn hostile_html(to: &str) -> String {
    concat!(
        "From: alice@example.org\r\nTo: TO\r\nSubject: newsletter\r\nMessage-ID: <m3@console.test>\r\n",
        "Date: Sat, 3 Jan 2026 01:05:34 +0000\r\nMIME-Version: 1.0\r\n",
        "Content-Type: multipart/alternative; boundary=b\r\n\r\n",
        "--b\r\nContent-Type: text/plain\r\n\r\nplain version\r\n",
        "--b\r\nContent-Type: text/html\r\n\r\n",
        "<p>hello</p><script>window.__pwned = 1; document.title = 'pwned'; console.log('pwned by script')</script>",
        "<img src=\"https://attacker.invalid/x.png\" onerror=\"window.__pwned = 2; console.log('pwned by onerror')\">\r\n",
        "--b--\r\n"
    )
    .replace("TO", to)
}

/// The audit log's entries by (user, action, items).
fn audit(d: &Daemon) -> Vec<(String, String, Vec<String>)> {
    let v: Value = serde_json::from_str(&spoolctl_ok(d, &["--json", "audit", "list"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap_or("").to_string(),
                e["action"].as_str().unwrap_or("").to_string(),
                serde_json::from_value(e["which"].clone()).unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn each_role_sees_only_its_own_and_html_mail_is_shown_inert() {
    let dir = tempfile::tempdir().unwrap();
    let d = console_daemon();
    add_user(&d, dir.path(), "aud", "auditor", &[], "auditor-password-1");
    add_user(
        &d,
        dir.path(),
        "bob",
        "user",
        &["Bob@Example.org"],
        "bob-password-123",
    );
    archive(
        &d,
        dir.path(),
        &[
            mail(
                "alice@example.org",
                "bob@example.org",
                "lunch plans",
                "m1@console.test",
                "see you at noon",
            ),
            mail(
                "alice@example.org",
                "carol@example.org",
                "zanzibar merger",
                "m2@console.test",
                "strictly confidential figures",
            ),
            hostile_html("bob@example.org"),
        ],
    );
    let (m1, m2, m3) = (
        seq_of(&d, "m1@console.test"),
        seq_of(&d, "m2@console.test"),
        seq_of(&d, "m3@console.test"),
    );
    let b = Browser::start();

    // A wrong password is refused, and the page says so.
    login(&b, &d, "bob", "not-his-password");
    assert!(b.url().ends_with("/login"), "{}", b.url());
    assert!(
        b.text().contains("Wrong user name or password"),
        "{}",
        b.text()
    );

    // bob (role user) sees his own mail, and only his.
    login(&b, &d, "bob", "bob-password-123");
    assert!(b.url().ends_with("/search"), "{}", b.url());
    let listed = b.text();
    assert!(
        listed.contains("lunch plans") && listed.contains("newsletter"),
        "{listed}"
    );
    assert!(!listed.contains("zanzibar"), "{listed}");
    b.find("#q").type_text("zanzibar");
    b.find("form.search button").click_to_next_page();
    assert!(b.text().contains("0 matching"), "{}", b.text());
    // Typing the URL of another's message does not open it.
    b.go(&format!("{}/message/{m2}", base(&d)));
    let refused = b.text();
    assert!(
        refused.contains("Not available") && !refused.contains("confidential"),
        "{refused}"
    );
    let (code, _, _) = curl_status(&b, &d, &format!("/message/{m2}/eml"));
    assert_eq!(code, 404, "the download is refused too");

    // The hostile HTML message: shown as source, nothing in it ran or loaded.
    b.console_log();
    b.go(&format!("{}/message/{m3}", base(&d)));
    let probe = b.run(
        "return [typeof window.__pwned, document.title, \
         document.querySelectorAll('main img').length, \
         document.querySelectorAll('script:not([src])').length]",
    );
    assert_eq!(
        probe,
        serde_json::json!(["undefined", "newsletter · Spoolpair", 0, 0]),
        "no script ran, no image element exists"
    );
    assert!(
        b.find("pre.html-source").text().contains("<script>"),
        "the HTML is shown as its source"
    );
    assert!(b.source().contains("&lt;script&gt;window.__pwned"));
    let log = b.console_log();
    assert!(
        log.iter().all(|l| !l.contains("pwned")),
        "nothing from the message reached the console log: {log:?}"
    );
    b.screenshot(&screenshots().join("message.png"));
    logout(&b);

    // The auditor finds what bob could not, reads it, and holds it.
    login(&b, &d, "aud", "auditor-password-1");
    b.find("#q").type_text("zanzibar");
    b.find("form.search button").click_to_next_page();
    let results = b.text();
    assert!(
        results.contains("1 matching")
            && results.contains("m2@console.test")
            && results.contains("subject"),
        "the Message-ID and the field that matched: {results}"
    );
    b.screenshot(&screenshots().join("search.png"));
    b.find("table.results a").click_to_next_page();
    assert!(
        b.text().contains("strictly confidential figures"),
        "{}",
        b.text()
    );
    b.find("form.inline button").click_to_next_page();
    assert!(b.text().contains("Legal hold\non"), "{}", b.text());
    let shown: Value = serde_json::from_str(&spoolctl_ok(
        &d,
        &["--json", "archive", "show", &m2.to_string()],
    ))
    .unwrap();
    assert_eq!(shown["item"]["held"], true, "held on the server");
    // The auditor reads mail; the gateway is not theirs.
    b.go(&format!("{}/status", base(&d)));
    assert!(b.text().contains("Not allowed"), "{}", b.text());
    b.go(&format!("{}/audit", base(&d)));
    assert!(b.text().contains("console:bob"), "{}", b.text());
    b.screenshot(&screenshots().join("audit.png"));

    // Every view is in the audit log under the console user's name, the refusal too.
    let log = audit(&d);
    let has = |user: &str, action: &str, item: Option<u64>| {
        log.iter().any(|(u, a, w)| {
            u == user && a == action && item.is_none_or(|i| w == &vec![i.to_string()])
        })
    };
    for (user, action, item) in [
        ("console:bob", "archive search", None),
        ("console:bob", "archive view", Some(m3)),
        (
            "console:bob",
            "archive read refused (outside the user's addresses)",
            None,
        ),
        ("console:aud", "archive search", None),
        ("console:aud", "archive view", Some(m2)),
        ("console:aud", "archive hold", Some(m2)),
    ] {
        assert!(has(user, action, item), "{user} {action} {item:?}: {log:?}");
    }
    assert!(
        !has("console:bob", "archive view", Some(m2)),
        "bob never read m2: {log:?}"
    );

    // A bulk export of a query from the search page: downloaded with its signed manifest,
    // which spoolctl's offline check accepts; audited; for its maker only.
    b.go(&format!("{}/search?q=zanzibar", base(&d)));
    b.find("form.export button").click_to_next_page();
    assert!(b.text().contains("1 messages"), "{}", b.text());
    let href = |part: &str| b.find(&format!("a[href$='/{part}']")).attr("href").unwrap();
    let (data, manifest) = (href("data"), href("manifest"));
    let saved = dir.path().join("export.mbox");
    for (path, file) in [
        (&data, saved.clone()),
        (&manifest, dir.path().join("export.mbox.manifest.jsonl")),
    ] {
        let (code, _, body) = curl(&b, &d, path, None);
        assert_eq!(code, 200, "{path}");
        std::fs::write(file, body).unwrap();
    }
    assert!(std::fs::read_to_string(&saved)
        .unwrap()
        .contains("strictly confidential figures"));
    let key: Value = serde_json::from_str(&spoolctl_ok(&d, &["--json", "archive", "key"])).unwrap();
    let verified = std::process::Command::new(tests::spoold_bin().with_file_name("spoolctl"))
        .args(["archive", "verify-export"])
        .arg(&saved)
        .args(["--public-key", key["public_key"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(audit(&d).iter().any(|(u, a, w)| u == "console:aud"
        && a == "archive export"
        && w == &vec![m2.to_string()]));
    logout(&b);
    login(&b, &d, "bob", "bob-password-123");
    let (code, _, _) = curl(&b, &d, &data, None);
    assert_eq!(code, 403, "a user may not download the auditor's export");
    let _ = m1;
}

/// `curl` with the browser's session cookie: status, headers, body.
fn curl_status(b: &Browser, d: &Daemon, path: &str) -> (u16, String, String) {
    curl(b, d, path, None)
}

fn curl(b: &Browser, d: &Daemon, path: &str, form: Option<&str>) -> (u16, String, String) {
    let cookie = b.cookie("spoolpair_console").unwrap_or_default();
    let mut c = std::process::Command::new("curl");
    c.args(["-sk", "-i", "-b", &format!("spoolpair_console={cookie}")]);
    if let Some(f) = form {
        c.args(["-d", f]);
    }
    let out = c.arg(format!("{}{path}", base(d))).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (code, head.to_string(), body.to_string())
}

#[test]
fn admins_run_the_gateway_without_reading_mail_and_every_form_needs_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = console_daemon();
    archive(
        &d,
        dir.path(),
        &[mail(
            "alice@example.org",
            "bob@example.org",
            "board minutes",
            "a1@console.test",
            "not for admins",
        )],
    );
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO console.test");
    let reply = c.send_mail(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: queued\r\n\r\nwaiting for its next hop\r\n",
    );
    let id = tests::queued_id(&reply).unwrap();
    let b = Browser::start();
    login(&b, &d, "admin", &admin_password(&d));

    // Status, refreshing by itself.
    assert!(b.url().ends_with("/status"), "{}", b.url());
    let status = b.text();
    assert!(
        status.contains("active")
            && status.contains("spool")
            && status.contains("Bounces in the last 24 hours"),
        "{status}"
    );
    assert!(b.source().contains("http-equiv=\"refresh\""));
    b.screenshot(&screenshots().join("status.png"));
    b.resize(390, 844);
    b.screenshot(&screenshots().join("status-phone.png"));
    b.resize(1280, 900);

    // Tracking: the message's events (envelopes and verdicts, no content).
    b.go(&format!("{}/track?q=id:{id}", base(&d)));
    let t = b.text();
    assert!(t.contains("accepted") && t.contains(&id), "{t}");

    // No message content for an admin, whatever the URL.
    for path in ["/search?q=board", "/message/1", "/message/1/eml", "/audit"] {
        b.go(&format!("{}{path}", base(&d)));
        let t = b.text();
        assert!(
            t.contains("Not allowed") && !t.contains("not for admins"),
            "{path}: {t}"
        );
    }

    // The session cookie's flags, as the browser keeps them.
    let cookies = b.cookies();
    let session = cookies
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "spoolpair_console")
        .unwrap();
    assert_eq!(
        (
            &session["httpOnly"],
            &session["secure"],
            &session["sameSite"]
        ),
        (
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::String("Strict".into())
        )
    );

    // A hold from the queue page holds the message on disk.
    b.go(&format!("{}/queue", base(&d)));
    b.find(&format!("input[name=id][value=\"{id}\"]")).click();
    b.find("button[value=hold]").click_to_next_page();
    assert!(b.text().contains("1 done"), "{}", b.text());
    let pair = vec![format!("{id}.body"), format!("{id}.env")];
    assert_eq!(d.folder("hold"), pair);
    assert!(d.folder("spool").is_empty());
    b.screenshot(&screenshots().join("queue.png"));

    // A form without its CSRF token (or with another) changes nothing.
    for form in [
        format!("action=release&id={id}"),
        format!("action=release&id={id}&csrf=forged"),
    ] {
        let (code, _, body) = curl(&b, &d, "/queue", Some(&form));
        assert_eq!(code, 403, "{form}: {body}");
        assert!(body.contains("security token"), "{body}");
    }
    assert_eq!(d.folder("hold"), pair, "still held");
    assert_eq!(
        d.metric("spoold_console_events_total{event=\"csrf_refused\"}"),
        Some(2.0)
    );
    // Released from the page, with its token.
    b.go(&format!("{}/queue", base(&d)));
    b.find(&format!("input[name=id][value=\"{id}\"]")).click();
    b.find("button[value=release]").click_to_next_page();
    assert!(wait_until(5, || d.folder("spool") == pair));

    // Settings: an invalid value shows the daemon's reason and changes nothing.
    b.go(&format!("{}/settings", base(&d)));
    let form = "form.setting:has(input[name=key][value=\"smtp.recipients_max\"])";
    b.find(&format!("{form} input[name=value]"))
        .clear()
        .type_text("0");
    b.find(&format!("{form} button")).click_to_next_page();
    let t = b.text();
    assert!(
        t.contains("smtp.recipients_max not changed") && t.contains("outside 1..=10000"),
        "{t}"
    );
    let shown = || -> Value {
        serde_json::from_str(&spoolctl_ok(
            &d,
            &["--json", "config", "show", "smtp.recipients_max"],
        ))
        .unwrap()
    };
    assert_eq!(
        shown()["keys"][0]["levels"],
        serde_json::json!([]),
        "nothing set"
    );
    b.screenshot(&screenshots().join("settings-error.png"));
    b.find(&format!("{form} input[name=value]"))
        .clear()
        .type_text("50");
    b.find(&format!("{form} button")).click_to_next_page();
    assert!(
        b.text()
            .contains("smtp.recipients_max set at the cluster level"),
        "{}",
        b.text()
    );
    assert_eq!(shown()["keys"][0]["effective"], 50);
    b.find("form.unset:has(input[name=key][value=\"smtp.recipients_max\"]) button")
        .click_to_next_page();
    assert!(
        b.text()
            .contains("smtp.recipients_max unset at the cluster level"),
        "{}",
        b.text()
    );
    assert_eq!(
        shown()["keys"][0]["effective"],
        100,
        "the file's value again"
    );
    logout(&b);

    // Five wrong passwords lock the name out: the right one is refused until the lockout ends,
    // and the lockout is logged and counted.
    add_user(&d, dir.path(), "vic", "auditor", &[], "victim-password-1");
    for i in 0..5 {
        login(&b, &d, "vic", &format!("guess-{i}"));
        assert!(b
            .wait_text("Wrong user name or password")
            .contains("Wrong user name or password"));
    }
    login(&b, &d, "vic", "victim-password-1");
    assert!(
        b.wait_text("Too many failed logins")
            .contains("Too many failed logins")
            && b.url().ends_with("/login"),
        "{}",
        b.text()
    );
    assert_eq!(
        d.metric("spoold_console_events_total{event=\"lockout\"}"),
        Some(1.0)
    );
    assert!(d.log_text().contains("login locked out"));
    assert!(
        !d.log_text().contains("victim-password-1") && !d.log_text().contains("guess-0"),
        "no password in the log"
    );

    // Security headers on every page.
    let (code, head, _) = curl_status(&b, &d, "/login");
    assert_eq!(code, 200);
    let head = head.to_ascii_lowercase();
    for h in [
        "content-security-policy: default-src 'none'; script-src 'self'",
        "x-frame-options: deny",
        "cache-control: no-store",
    ] {
        assert!(head.contains(h), "{h}: {head}");
    }
    let (code, _, _) = spoolctl(&d, &["user", "del", "vic"]);
    assert_eq!(code, 0);
}

/// A user's quarantine inbox, served by the passive unit of a pair while the message is held
/// by the active one (the passive unit dropped its replica): shown with its reason, another
/// user's held mail not shown, and a forged release of a virus refused by the unit holding it.
#[test]
fn a_users_quarantine_inbox_spans_the_pair_and_a_virus_stays_held() {
    use tests::clamd::{eicar, mime_with_attachment, Clamd};
    let work = tempfile::tempdir().unwrap();
    let clamd = Clamd::start(&work.path().join("clamd"));
    let sink = tests::SmtpSink::start();
    let p = tests::pair_config(&clamd.scanning_config(sink.addr), None);
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let mut b = Daemon::unstarted(&["--config", &p.b_config]);
    b.console = Some(tests::free_addr());
    b.restart();
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    // A user added on one unit can log in on the other.
    add_user(
        &a,
        work.path(),
        "bob",
        "user",
        &["bob@example.org"],
        "bob-password-123",
    );
    assert!(wait_until(20, || spoolctl_ok(&b, &["user", "list"]).contains("bob")));

    let (mut c, _) = Client::connect(a.smtp);
    c.cmd("EHLO scan");
    let for_bob = tests::queued_id(&c.send_mail(
        "mallory@example.net",
        &["bob@example.org"],
        &mime_with_attachment("virus for bob", &eicar()),
    ))
    .unwrap();
    let for_carol = tests::queued_id(&c.send_mail(
        "mallory@example.net",
        &["carol@example.org"],
        &mime_with_attachment("virus for carol", &eicar()),
    ))
    .unwrap();
    let held = |d: &Daemon| -> Vec<String> {
        d.folder("quarantine")
            .into_iter()
            .filter_map(|n| n.strip_suffix(".env").map(str::to_string))
            .collect()
    };
    assert!(wait_until(30, || held(&a).len() == 2));
    assert!(
        wait_until(10, || held(&b).is_empty() && b.spooled_ids().is_empty()),
        "the passive unit holds no copy"
    );

    let bb = Browser::start();
    login(&bb, &b, "bob", "bob-password-123");
    bb.go(&format!("{}/quarantine", base(&b)));
    let t = bb.text();
    assert!(
        t.contains("virus for bob")
            && t.contains("virus: Eicar-Test-Signature")
            && t.contains("gw_a")
            && t.contains("administrators only"),
        "{t}"
    );
    assert!(!t.contains("virus for carol"), "{t}");
    assert!(
        bb.try_find("form.inline button").is_none(),
        "no release button"
    );
    bb.screenshot(&screenshots().join("quarantine.png"));

    // A forged release, with a valid token, is refused by the unit that holds the message.
    let csrf = bb
        .find("form.logout input[name=csrf]")
        .attr("value")
        .unwrap();
    for (id, why) in [
        (&for_bob, "only an administrator can release it"),
        (&for_carol, "no quarantined message"),
    ] {
        let (code, _, body) = curl(
            &bb,
            &b,
            "/quarantine",
            Some(&format!("csrf={csrf}&unit=gw_a&id={id}&action=release")),
        );
        assert_eq!(code, 403, "{body}");
        assert!(body.contains(why), "{why}: {body}");
    }
    assert_eq!(held(&a).len(), 2, "both still held");
    assert!(sink.dumped().is_empty(), "nothing delivered");
    assert!(a
        .log_text()
        .contains("a recipient's request refused by the policy"));
    logout(&bb);

    // Settings from the passive unit's console: an invalid value changes nothing on either
    // unit; a valid one is in effect on both.
    add_user(&a, work.path(), "ops", "admin", &[], "ops-password-1234");
    assert!(wait_until(20, || spoolctl_ok(&b, &["user", "list"]).contains("ops")));
    login(&bb, &b, "ops", "ops-password-1234");
    bb.go(&format!("{}/settings", base(&b)));
    let form = "form.setting:has(input[name=key][value=\"smtp.recipients_max\"])";
    let set = |value: &str| {
        bb.find(&format!("{form} input[name=value]"))
            .clear()
            .type_text(value);
        bb.find(&format!("{form} button")).click_to_next_page();
        bb.text()
    };
    let effective = |d: &Daemon| -> Value {
        let v: Value = serde_json::from_str(&spoolctl_ok(
            d,
            &["--json", "config", "show", "smtp.recipients_max"],
        ))
        .unwrap();
        v["keys"][0]["effective"].clone()
    };
    assert!(set("100001").contains("not changed"));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        (effective(&a), effective(&b)),
        (Value::from(100), Value::from(100))
    );
    assert!(set("42").contains("set at the cluster level"));
    assert!(
        wait_until(10, || effective(&a) == 42 && effective(&b) == 42),
        "in effect on both units"
    );
    let _ = for_carol;
}

/// Mail a milter quarantined (spam) is its recipient's: in their inbox with the milter's
/// reason, released with a click (back on its way out, through the scan stage), and the milter's
/// `learn_on_release` command is given the message.
#[test]
fn a_recipient_releases_spam_a_milter_held_with_a_click() {
    use tests::milters::{Behaviour, FakeMilter};
    let work = tempfile::tempdir().unwrap();
    let scorer = FakeMilter::start(Behaviour::Quarantine);
    let learned = work.path().join("ham.eml");
    let cfg = tests::write_config(
        work.path(),
        &format!(
            "[delivery]\ndefault_next_hop = \"127.0.0.1:9\"\n{}",
            scorer.config(
                "scorer",
                &format!(
                    "learn_on_release = [\"sh\", \"-c\", \"cat > {}\"]",
                    learned.display()
                )
            )
        ),
    );
    let mut d = Daemon::unstarted(&["--config", &cfg]);
    d.console = Some(tests::free_addr());
    d.restart();
    add_user(
        &d,
        work.path(),
        "bob",
        "user",
        &["bob@example.org"],
        "bob-password-123",
    );
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let id = tests::queued_id(&c.send_mail(
        "mallory@example.net",
        &["bob@example.org"],
        b"Subject: cheap pills\r\n\r\nBuy now.\r\n",
    ))
    .unwrap();
    let in_quarantine = || d.folder("quarantine").contains(&format!("{id}.env"));
    assert!(wait_until(20, in_quarantine), "not quarantined");

    let bb = Browser::start();
    login(&bb, &d, "bob", "bob-password-123");
    bb.go(&format!("{}/quarantine", base(&d)));
    let t = bb.text();
    assert!(
        t.contains("cheap pills") && t.contains("held by a filter: scorer: fake score 20"),
        "{t}"
    );
    bb.find("form.inline button[value=release]")
        .click_to_next_page();
    let t = bb.text();
    assert!(t.contains(&format!("{id} released on")), "{t}");
    assert!(!in_quarantine(), "still in quarantine/");
    assert!(
        wait_until(10, || std::fs::read(&learned)
            .is_ok_and(|b| b.ends_with(b"\r\n\r\nBuy now.\r\n"))),
        "the scorer was not given the message"
    );
    bb.screenshot(&screenshots().join("quarantine-release.png"));
}

/// Connections are bounded: 300 clients that connect and say nothing fill the console's 256
/// places (the page waits), and their handshakes' 10 s deadline frees them again.
#[test]
fn silent_connections_are_bounded_and_dropped_at_their_deadline() {
    let d = console_daemon();
    let addr = d.console.unwrap();
    let fetch = |secs: &str| {
        std::process::Command::new("curl")
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                secs,
            ])
            .arg(format!("{}/login", base(&d)))
            .output()
            .expect("curl")
    };
    assert_eq!(String::from_utf8_lossy(&fetch("5").stdout), "200");
    let silent: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = fetch("2");
    assert_ne!(
        String::from_utf8_lossy(&during.stdout),
        "200",
        "every place is taken by a silent client"
    );
    let started = std::time::Instant::now();
    assert!(
        wait_until(20, || String::from_utf8_lossy(&fetch("3").stdout) == "200"),
        "served again once the silent handshakes timed out"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    drop(silent);
}
