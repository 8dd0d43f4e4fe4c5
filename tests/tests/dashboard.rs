//! The Grafana dashboard (`monitoring/spoold.dashboard.json`) against a real Prometheus server
//! (Debian's `prometheus`) scraping both units of a running pair while mail flows: every
//! panel's query returns data, with a number in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;
use tests::{
    free_addr, have, http_get, pair_config, send_numbered, wait_until, workspace_root, Daemon,
    SmtpSink,
};

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    tests::needs("prometheus", have("prometheus"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("monitoring/spoold.dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");

    let sink = SmtpSink::start();
    let pair = pair_config(
        &format!(
            "[delivery]\ndefault_next_hop = \"{}\"\nretry_schedule_secs = [1]\n",
            sink.addr
        ),
        None,
    );
    let a = Daemon::start_delivering(&["--config", &pair.a_config]);
    let b = Daemon::start_delivering(&["--config", &pair.b_config]);

    let dir = tempfile::tempdir().unwrap();
    let web = free_addr();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: spoold\n    static_configs:\n      - targets: ['{}', '{}']\n",
            a.http, b.http
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(
        wait_until(30, || http_get(web, "/-/ready")
            .map(|(s, _)| s == 200)
            .unwrap_or(false)),
        "prometheus did not start"
    );
    // Mail over several scrapes, so that every rate has increases to see.
    for round in 0..8 {
        assert_eq!(send_numbered(a.smtp, round * 20, 20).len(), 20);
        std::thread::sleep(Duration::from_millis(700));
    }
    let query = |expr: &str| -> serde_json::Value {
        let (status, body) =
            http_get(web, &format!("/api/v1/query?query={}", url_encode(expr))).unwrap();
        assert_eq!(status, 200, "{expr}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    let mut empty = Vec::new();
    for (title, expr) in &exprs {
        // A number (not NaN) in at least one series: the panel shows a line. Under load, a
        // panel built on a rate must show movement: a rate of 0 there means a counter that
        // never moves (a renamed metric, a label that no longer matches), not data.
        let under_load = expr.contains("rate(");
        let has_data = || {
            query(expr)["data"]["result"].as_array().is_some_and(|r| {
                r.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v.is_finite() && (!under_load || v > 0.0))
                })
            })
        };
        if !wait_until(15, has_data) {
            empty.push(format!("{title}: {expr}"));
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(empty.is_empty(), "panels without data: {empty:#?}");
    eprintln!("{} dashboard queries answered with data", exprs.len());
}
