//! The archive on a real Garage cluster (three nodes on loopback, replication factor 3): sealed
//! segments land as objects and leave the local disk (a cache of 0 bytes), one node killed
//! changes nothing (quorum), the whole store stopped keeps ingest, delivery and search going
//! while segments wait locally and uploads back off, and everything is uploaded once it
//! returns; every body then reads back from the store, byte for byte. A key denied at run time
//! is a counted failure, not a crash; a wrong secret fails `--check-config` and the start. A
//! second unit on a prefix that holds another archive is refused (exit 78) and writes nothing
//! there; two new units racing for one empty prefix: exactly one owns it.
//! Needs `garage` (scripts/test installs it with cargo).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use tests::garage::{garage_bin, Garage};
use tests::{spoolctl, wait_until, write_config, Client, Daemon, SmtpSink};

fn status(d: &Daemon) -> Value {
    let (code, out, err) = spoolctl(d, &["--json", "archive", "status"]);
    assert_eq!(code, 0, "archive status: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Garage's own count of the bucket's objects against the unit's: its segments, the manifest,
/// and at most one object per checkpoint it signed (checkpoints go up in batches).
fn assert_objects(g: &Garage, d: &Daemon, segments: u64, what: &str) {
    let signed = std::fs::read_to_string(d.state.join("archive/checkpoints"))
        .map_or(0, |t| t.lines().count() as u64);
    let n = g.objects();
    assert!(
        n > segments && n <= segments + 1 + signed,
        "{what}: {n} objects for {segments} segments, the manifest and {signed} checkpoints"
    );
}

/// The objects under `prefix` that hold `plaintext`.
fn objects_holding(g: &Garage, prefix: &str, plaintext: &[u8]) -> Vec<String> {
    g.objects_under(prefix)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(plaintext.len()).any(|w| w == plaintext))
        .map(|(name, _)| name)
        .collect()
}

fn store_state(d: &Daemon, key: &str) -> u64 {
    status(d)["object_store"][key].as_u64().unwrap()
}

/// A body of `len` bytes that compresses like real mail with attachments (about 3:4), so that
/// a few thousand messages fill several 1 MiB segments.
fn body(seed: usize, len: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
    let mut b = format!(
        "From: s{seed}@example.com\r\nSubject: object store {seed}\r\nMessage-ID: <{seed}@os.test>\r\n\r\n"
    )
    .into_bytes();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    while b.len() < len {
        for _ in 0..76 {
            b.push(ALPHABET[rng.gen_range(0..64)]);
        }
        b.extend_from_slice(b"\r\n");
    }
    b
}

/// Sends messages `first..first + n` over 4 sessions; every one must get `250`.
fn send(addr: SocketAddr, first: usize, n: usize) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                assert!(c.cmd("EHLO os").starts_with("250"));
                for seed in (first..first + n).filter(|s| s % 4 == t) {
                    let r = c.send_mail("s@example.com", &["r@example.org"], &body(seed, 3000));
                    assert!(r.starts_with("250"), "message {seed}: {r}");
                }
                let _ = c.cmd("QUIT");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn items(d: &Daemon) -> u64 {
    status(d)["items"].as_u64().unwrap()
}

/// Waits until `n` items are archived and nothing waits for upload; answers the segments in
/// the store.
fn all_uploaded(d: &Daemon, g: &Garage, n: u64, secs: u64) -> u64 {
    assert!(
        wait_until(secs, || items(d) == n
            && store_state(d, "pending_segments") == 0),
        "not all uploaded: {}\n{}\n{}",
        status(d),
        d.log_text(),
        g.diagnose()
    );
    store_state(d, "remote_segments")
}

fn local_segments(d: &Daemon) -> usize {
    std::fs::read_dir(d.state.join("archive/segments"))
        .unwrap()
        .count()
}

/// A unit `node` delivering to `sink`, its archive on the store under `prefix` with the
/// `[archive]` keys `archive` (TOML lines).
fn delivering_unit(
    g: &Garage,
    sink: &SmtpSink,
    dir: &std::path::Path,
    node: &str,
    prefix: &str,
    archive: &str,
) -> Daemon {
    let cfg = write_config(
        dir,
        &format!(
            "node_name = \"{node}\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\n{archive}{}",
            sink.addr,
            g.archive_config(0, prefix, dir)
        ),
    );
    Daemon::start_delivering(&["--config", &cfg])
}

fn needs_garage() {
    tests::needs("garage", garage_bin().is_some());
}

#[test]
fn archive_on_a_garage_cluster_survives_a_node_and_the_whole_store_going_down() {
    needs_garage();
    let mut g = Garage::start(3);
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"os_a\"\n[delivery]\ndefault_next_hop = \"{}\"\nretry_schedule_secs = [1]\n\
             [archive]\nsegment_bytes_max = 1048576\ncache_bytes = 0\n{}",
            sink.addr,
            g.archive_config(0, "units/os_a", dir.path())
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let t0 = std::time::Instant::now();
    let at = || format!("[{:.1} s]", t0.elapsed().as_secs_f64());

    // A few thousand messages: every sealed segment becomes an object and leaves the disk.
    send(d.smtp, 0, 2500);
    let stored = all_uploaded(&d, &g, 2500, 120);
    eprintln!("{} 2500 messages: {stored} segments in the store", at());
    assert!(stored >= 4, "{}", status(&d));
    assert_objects(&g, &d, stored, "Garage's own count");
    assert_eq!(local_segments(&d), 1, "only the open segment stays local");

    // One node down: the other two are a quorum; uploads go on.
    g.kill(2);
    send(d.smtp, 2500, 1000);
    let with_one_down = all_uploaded(&d, &g, 3500, 120);
    eprintln!(
        "{} one Garage node killed: {with_one_down} segments in the store",
        at()
    );
    assert!(with_one_down > stored);
    // Retrieval too: an evicted item read back from the two nodes left.
    let export = |seed: usize| {
        // The index follows the catalog: after a burst (and an outage) it may be behind by
        // a moment, so the item is looked for until it is found.
        let found = || -> Option<String> {
            let out = tests::spoolctl_ok(
                &d,
                &[
                    "--json",
                    "archive",
                    "search",
                    &format!("msgid:<{seed}@os.test>"),
                ],
            );
            let v: Value = serde_json::from_str(&out).unwrap();
            v["items"][0]["id"].as_str().map(str::to_string)
        };
        assert!(
            wait_until(30, || found().is_some()),
            "message {seed} not indexed"
        );
        let id = found().unwrap();
        let out = tests::spoolctl_output(&d, &["archive", "export", &id]);
        assert!(out.status.success(), "export {seed}");
        assert_eq!(
            tests::strip_received(&out.stdout),
            &body(seed, 3000)[..],
            "message {seed} exported from the store"
        );
    };
    export(10);

    // The whole store down: ingest, delivery and search go on, segments wait locally.
    g.kill(0);
    g.kill(1);
    send(d.smtp, 3500, 1500);
    assert!(wait_until(60, || items(&d) == 5000), "{}", status(&d));
    assert!(
        wait_until(30, || store_state(&d, "pending_segments") >= 1
            && store_state(&d, "upload_failures") >= 1),
        "{}",
        status(&d)
    );
    let waiting = store_state(&d, "pending_segments");
    assert!(
        local_segments(&d) as u64 > waiting,
        "waiting segments stay on disk"
    );
    let pending_metric = d
        .metric("spoold_archive_remote_segments{state=\"pending\"}")
        .unwrap_or(0.0);
    assert!(pending_metric >= 1.0, "{pending_metric}");
    let metric = |name: &str| d.metric(name).unwrap_or(0.0);
    assert!(
        wait_until(20, || metric("spoold_archive_remote_pending_bytes") > 0.0
            && metric("spoold_archive_remote_pending_oldest_age_seconds") > 0.0
            && metric(
                "spoold_archive_remote_operations_total{op=\"upload\",result=\"failed\"}"
            ) >= 1.0),
        "store-down metrics"
    );
    let (code, out, err) = spoolctl(
        &d,
        &[
            "--json",
            "archive",
            "search",
            "--limit",
            "10",
            "msgid:<7@os.test>",
        ],
    );
    assert_eq!(code, 0, "search with the store down: {err}");
    let found: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(found["total"], 1, "{found}");
    eprintln!(
        "{} store down: {waiting} segments waiting locally, search answers",
        at()
    );

    // Back: everything is uploaded, and every body reads back from the store.
    for i in 0..3 {
        g.restart(i);
    }
    let after = all_uploaded(&d, &g, 5000, 180);
    assert_objects(&g, &d, after, "after the outage");
    // Uploaded segments leave the disk once confirmed; on a loaded machine that may follow
    // the last confirmation by a moment.
    assert!(
        wait_until(30, || local_segments(&d) == 1),
        "{} local segments",
        local_segments(&d)
    );
    eprintln!("{} store back, all uploaded", at());
    assert!(
        wait_until(20, || metric("spoold_archive_remote_upload_bytes_total")
            > 5e6
            && metric(
                "spoold_archive_remote_operations_total{op=\"evict\",result=\"ok\"}"
            ) >= after as f64
            && metric("spoold_archive_remote_pending_bytes") == 0.0),
        "upload metrics"
    );
    assert_eq!(metric("spoold_archive_cache_bytes"), 0.0);
    let (code, out, err) = spoolctl(&d, &["--json", "archive", "verify"]);
    assert_eq!(code, 0, "verify: {out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], 5000, "{v}");
    // One GET per segment (verify brings each back whole, then lets it be evicted).
    assert!(store_state(&d, "fetches") >= after, "{}", status(&d));
    assert!(wait_until(10, || local_segments(&d) == 1));
    let fetches = store_state(&d, "fetches");
    eprintln!("{} verified from the store", at());
    for seed in [0usize, 2600, 4999] {
        export(seed);
    }
    assert!(
        store_state(&d, "fetches") >= fetches + 3,
        "each export reads its record from the store"
    );
    assert!(
        wait_until(30, || sink.arrivals().len() == 5000),
        "{} delivered",
        sink.arrivals().len()
    );
    assert!(
        sink.arrivals().values().all(|n| *n == 1),
        "every message delivered once"
    );

    // The key denied at run time: counted failures, no crash; allowed again: caught up.
    let failed_before = store_state(&d, "upload_failures");
    g.allow(false);
    send(d.smtp, 5000, 1000);
    assert!(
        wait_until(60, || store_state(&d, "upload_failures") > failed_before),
        "{}",
        status(&d)
    );
    assert!(d.http("/healthz").map(|(c, _)| c == 200).unwrap_or(false));
    g.allow(true);
    all_uploaded(&d, &g, 6000, 180);
    eprintln!(
        "{} key denied then allowed: {} upload failures counted, all uploaded after",
        at(),
        store_state(&d, "upload_failures") - failed_before
    );
}

#[test]
fn a_wrong_secret_fails_the_config_check_and_the_start() {
    needs_garage();
    let g = Garage::start(3);
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(
        dir.path(),
        &format!("[archive]\n{}", g.archive_config(0, "check", dir.path())),
    );
    let ok = Command::new(tests::spoold_bin())
        .args(["--config", &good, "--check-config"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(dir.path().join("s3.secret"), "0".repeat(64)).unwrap();
    let bad = Command::new(tests::spoold_bin())
        .args(["--config", &good, "--check-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(78), "{err}");
    assert!(
        err.contains("archive.object_store") && err.contains("refused"),
        "{err}"
    );
    assert!(
        !err.contains(&"0".repeat(64)),
        "the secret is never printed"
    );
    let start = Command::new(tests::spoold_bin())
        .args(["--config", &good])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--smtp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--console-listen",
            "off",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&start.stderr);
    assert_eq!(
        start.status.code(),
        Some(78),
        "a refused key is a configuration error: {err}"
    );
    assert!(err.contains("archive.object_store"), "{err}");
    assert!(err.contains(&good), "the message names the file: {err}");
}

/// A `spoold` child, killed when dropped (a failed assertion must not leave it running).
struct Unit(std::process::Child);

impl Drop for Unit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `spoold` on the store's `prefix` with a fresh state directory under `dir`, started and left
/// running (or exiting).
fn spawn_unit(g: &Garage, dir: &std::path::Path, node: &str, prefix: &str) -> Unit {
    let (unit, cfg) = unit_config(g, dir, node, prefix);
    Unit(
        spoold(&cfg, &unit.join("state"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// `spoold` with `cfg` and the state directory `state`, on ports of its own choosing.
fn spoold(cfg: &str, state: &std::path::Path) -> Command {
    let mut c = Command::new(tests::spoold_bin());
    c.args(["--config", cfg])
        .arg("--state-dir")
        .arg(state)
        .args([
            "--smtp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--console-listen",
            "off",
        ])
        .stdout(std::process::Stdio::null());
    c
}

/// `spoold --check-config` of `cfg` with the state directory `state`.
fn check_config(cfg: &str, state: &std::path::Path) -> std::process::Output {
    Command::new(tests::spoold_bin())
        .args(["--config", cfg, "--check-config", "--state-dir"])
        .arg(state)
        .output()
        .unwrap()
}

/// The directory and configuration file of unit `node` on the store's `prefix`.
fn unit_config(
    g: &Garage,
    dir: &std::path::Path,
    node: &str,
    prefix: &str,
) -> (std::path::PathBuf, String) {
    let unit = dir.join(node);
    std::fs::create_dir_all(&unit).unwrap();
    let cfg = write_config(
        &unit,
        &format!(
            "node_name = \"{node}\"\n[archive]\nsegment_bytes_max = 1048576\n{}",
            g.archive_config(0, prefix, &unit)
        ),
    );
    (unit, cfg)
}

/// Waits up to `secs` for `child` to exit: its exit code and stderr, or `None` while it runs.
fn exited(unit: &mut Unit, secs: u64) -> Option<(Option<i32>, String)> {
    use std::io::Read;
    let child = &mut unit.0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Some((status.code(), err));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

#[test]
fn a_prefix_belongs_to_one_archive_and_a_second_unit_there_is_refused() {
    needs_garage();
    let g = Garage::start(3);
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let d = delivering_unit(
        &g,
        &sink,
        dir.path(),
        "os_a",
        "units/shared",
        "segment_bytes_max = 1048576\ncache_bytes = 0\n",
    );
    send(d.smtp, 0, 600);
    let stored = all_uploaded(&d, &g, 600, 120);
    assert!(stored >= 1, "{}", status(&d));
    let before = g.objects();
    assert_eq!(before, stored + 1, "the segments and the manifest");

    // The same store settings on a unit with an empty state directory (a reinstall, a copied
    // configuration): `--check-config` says so, the start is refused, and the store unchanged.
    let (unit_b, cfg_b) = unit_config(&g, dir.path(), "os_b", "units/shared");
    let check = check_config(&cfg_b, &unit_b.join("state"));
    let said = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(78), "{said}");
    assert!(
        said.contains("archive.object_store.prefix") && said.contains("os_a"),
        "{said}"
    );
    // The running unit's own configuration checks fine (its catalog read beside the daemon).
    let own = check_config(&dir.path().join("spoold.toml").to_string_lossy(), &d.state);
    assert!(
        own.status.success(),
        "{}{}",
        String::from_utf8_lossy(&own.stdout),
        String::from_utf8_lossy(&own.stderr)
    );
    let mut b = spawn_unit(&g, dir.path(), "os_b", "units/shared");
    let (code, err) = exited(&mut b, 30).expect("the second unit was not refused");
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("archive.object_store.prefix") && err.contains("os_a"),
        "names the setting and the other archive's unit: {err}"
    );
    assert_eq!(g.objects(), before, "nothing written there");
    // The first unit goes on archiving and uploading.
    send(d.smtp, 600, 300);
    assert!(all_uploaded(&d, &g, 900, 120) >= stored);

    // Two new units started at once on one empty prefix: exactly one owns it; the other stops
    // with exit 78 and the one that runs keeps running.
    let mut racers = [
        spawn_unit(&g, dir.path(), "os_c", "units/race"),
        spawn_unit(&g, dir.path(), "os_d", "units/race"),
    ];
    let outcomes: Vec<_> = racers.iter_mut().map(|r| exited(r, 20)).collect();
    let refused: Vec<_> = outcomes.iter().flatten().collect();
    assert_eq!(refused.len(), 1, "exactly one refused: {outcomes:?}");
    assert_eq!(refused[0].0, Some(78), "{outcomes:?}");
}

#[test]
fn archived_mail_reaches_the_store_within_seal_secs() {
    needs_garage();
    let g = Garage::start(3);
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    // The default segment size (256 MiB): without sealing by age, nothing would leave.
    let d = delivering_unit(
        &g,
        &sink,
        dir.path(),
        "os_s",
        "units/os_s",
        "seal_secs = 2\ncheckpoint_secs = 1\n",
    );
    send(d.smtp, 0, 40);
    assert!(wait_until(60, || items(&d) == 40), "{}", status(&d));
    let archived = std::time::Instant::now();
    // Counted by Garage itself: the manifest and one segment holding the 40 (and, once a
    // checkpoint is signed, the checkpoints), and confirmed by the unit.
    assert!(
        wait_until(30, || g.objects() >= 2
            && store_state(&d, "remote_segments") >= 1),
        "not in the store: {}\n{}",
        status(&d),
        d.log_text()
    );
    let took = archived.elapsed();
    eprintln!(
        "40 messages archived: in the store {} ms later (seal_secs = 2)",
        took.as_millis()
    );
    assert!(
        took.as_secs() <= 2 + 10,
        "seal_secs plus the upload: {took:?}"
    );
    assert_eq!(store_state(&d, "pending_segments"), 0);
    // Encryption at rest (the default): the store sees no plaintext of the mail.
    for plaintext in [
        &b"r@example.org"[..],
        b"s@example.com",
        b"Subject: object store",
    ] {
        assert_eq!(
            objects_holding(&g, "units/os_s", plaintext),
            Vec::<String>::new(),
            "{}",
            String::from_utf8_lossy(plaintext)
        );
    }
    // The checkpoint signed a second later goes to the store too, and a proof compares with it.
    let mut last = String::new();
    assert!(
        wait_until(20, || {
            let (code, out, err) =
                spoolctl(&d, &["--json", "archive", "verify", "--against-store"]);
            last = format!("{out}{err}");
            code == 0
                && serde_json::from_str::<Value>(&out)
                    .is_ok_and(|v| v["proof"]["compared"].as_u64().unwrap_or(0) >= 1)
        }),
        "{last}"
    );
    // `seal_secs = 0`: by size only, until `spoolctl archive seal` seals it at once.
    drop(d);
    let d = delivering_unit(
        &g,
        &sink,
        dir.path(),
        "os_t",
        "units/os_t",
        "seal_secs = 0\nencryption = false\n",
    );
    // Its manifest is written as it starts.
    let before = g.objects();
    send(d.smtp, 100, 5);
    assert!(wait_until(60, || items(&d) == 5));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(g.objects(), before, "nothing sealed by age");
    let (code, out, err) = spoolctl(&d, &["archive", "seal"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("segment 1 sealed;"), "{out}");
    assert!(
        wait_until(10, || g.objects() == before + 1),
        "{}",
        status(&d)
    );
    // With encryption off the store sees the mail (what the check above would catch).
    // (Bodies are compressed, so their words need not show; the envelope in the chain does.)
    assert!(!objects_holding(&g, "units/os_t", b"r@example.org").is_empty());
    let (code, out, _) = spoolctl(&d, &["archive", "seal"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing sealed"), "{out}");
}

/// Every archived item as `spoolctl archive search` lists it, by Message-ID query of all.
fn listing(d: &Daemon) -> Value {
    let (code, out, err) = spoolctl(
        d,
        &[
            "--json",
            "archive",
            "search",
            "from:s@example.com",
            "--limit",
            "100000",
        ],
    );
    assert_eq!(code, 0, "archive search: {err}");
    serde_json::from_str(&out).unwrap()
}

/// `show --json` and the exported bytes of item `seq`.
fn item(d: &Daemon, seq: u64) -> (Value, Vec<u8>) {
    let (code, out, err) = spoolctl(d, &["--json", "archive", "show", &seq.to_string()]);
    assert_eq!(code, 0, "archive show {seq}: {err}");
    let shown = serde_json::from_str(&out).unwrap();
    let export = tests::spoolctl_output(d, &["archive", "export", &seq.to_string()]);
    assert!(export.status.success(), "archive export {seq}");
    (shown, export.stdout)
}

/// The archive id a refused start names ("… belongs to archive <32 hex digits> …").
fn archive_id_in(err: &str) -> String {
    let at = err
        .find("belongs to archive ")
        .unwrap_or_else(|| panic!("no archive id in: {err}"))
        + "belongs to archive ".len();
    err[at..at + 32].to_string()
}

/// A unit is destroyed (kill -9, state directory deleted); a new unit with the same store
/// settings is refused until told to adopt the archive, then rebuilds catalog and index from the
/// store alone: every item's envelope, verdict, hold state and exact bytes equal the old one's,
/// and search finds the same. A rebuild killed after its second segment resumes and ends equal.
#[test]
fn a_lost_unit_is_rebuilt_from_the_store_alone_and_a_killed_rebuild_resumes() {
    needs_garage();
    let g = Garage::start(3);
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let mut old = delivering_unit(
        &g,
        &sink,
        dir.path(),
        "os_lost",
        "units/lost",
        "segment_bytes_max = 1048576\n",
    );
    const N: u64 = 3000;
    send(old.smtp, 0, N as usize);
    assert!(wait_until(120, || items(&old) == N), "{}", status(&old));
    for seq in [3, 70, N] {
        let (code, _, err) = spoolctl(&old, &["archive", "hold", &seq.to_string()]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(spoolctl(&old, &["archive", "seal"]).0, 0);
    let segments = all_uploaded(&old, &g, N, 120);
    // Search answers from the index, which follows the catalog within about a second.
    assert!(wait_until(30, || status(&old)["indexed_through"] == N));
    let before = listing(&old);
    assert_eq!(before["items"].as_array().unwrap().len() as u64, N);
    let sample: Vec<u64> = (1..=N).step_by(97).chain([N]).collect();
    let before_items: Vec<_> = sample.iter().map(|&s| item(&old, s)).collect();
    let held_before = status(&old)["held"].clone();
    assert_eq!(held_before, 3);
    // The operator's copy of the keyring (encryption at rest is on by default): the store holds
    // ciphertext only, which nothing else opens.
    let keyring_backup = dir.path().join("keyring.backup");
    std::fs::copy(old.state.join("keys/archive.keyring"), &keyring_backup).unwrap();
    old.kill9();
    std::fs::remove_dir_all(&old.state).unwrap();

    // A new unit with the same store settings and nothing on disk: refused, naming the archive.
    let mut refused = spawn_unit(&g, dir.path(), "os_new", "units/lost");
    let (code, err) = exited(&mut refused, 30).expect("the new unit was not refused");
    assert_eq!(code, Some(78), "{err}");
    let id = archive_id_in(&err);
    assert!(
        err.contains(&format!("archive.object_store.adopt = \"{id}\"")),
        "says how a replacement takes the archive over: {err}"
    );

    // Told to adopt it without the keyring: the rebuild is refused, naming the key it lacks.
    let adopting = |name: &str| {
        let unit = dir.path().join(name);
        std::fs::create_dir_all(&unit).unwrap();
        let cfg = write_config(
            &unit,
            &format!(
                "node_name = \"{name}\"\n[archive]\nsegment_bytes_max = 1048576\n{}adopt = \"{id}\"\n",
                g.archive_config(0, "units/lost", &unit)
            ),
        );
        (unit, cfg)
    };
    {
        let (unit, cfg) = adopting("os_keyless");
        let keyless = Daemon::start_in(&unit.join("state"), &["--config", &cfg]);
        let (code, out, err) = spoolctl(&keyless, &["archive", "rebuild"]);
        assert_ne!(code, 0, "{out}");
        assert!(
            err.contains("which the keyring does not have")
                && err.contains("cannot be rebuilt without its keyring"),
            "{err}"
        );
    }

    // Told to adopt it, with the keyring restored: the rebuild dies after its second segment
    // (the failpoint), then resumes.
    let (unit, cfg) = adopting("os_adopt");
    let state = unit.join("state");
    std::fs::create_dir_all(state.join("keys")).unwrap();
    std::fs::copy(&keyring_backup, state.join("keys/archive.keyring")).unwrap();
    let mut dying = Unit(
        spoold(&cfg, &state)
            .arg("--no-delivery")
            .env("SPOOLD_FAILPOINT", "archive-rebuild")
            .stderr(std::fs::File::create(unit.join("dying.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(unit.join("dying.log")).unwrap_or_default();
    let (code, _) = exited(&mut dying, 60)
        .unwrap_or_else(|| panic!("the rebuild did not reach its failpoint:\n{}", log()));
    assert_eq!(code, None, "killed by the failpoint's abort: {}", log());
    assert!(log().contains("failpoint reached"), "{}", log());

    let new = Daemon::start_in(&state, &["--config", &cfg]);
    let t0 = std::time::Instant::now();
    let (code, out, err) = spoolctl(&new, &["--json", "archive", "rebuild"]);
    assert_eq!(code, 0, "archive rebuild: {out}{err}\n{}", new.log_text());
    let rebuilt: Value = serde_json::from_str(&out).unwrap();
    eprintln!(
        "rebuild resumed: {rebuilt} ({} segments in the store; {:.1} s after the restart)",
        segments,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        rebuilt["segments"].as_u64().unwrap() < segments,
        "the resumed rebuild read only the segments not done before the kill: {rebuilt}"
    );
    assert_eq!(rebuilt["items"], N);
    assert_eq!(rebuilt["held"], 3);
    assert_eq!(rebuilt["verified"]["ok"], N);
    assert_eq!(rebuilt["verified"]["index_entries"], N);
    assert_eq!(rebuilt["verified"]["proof"]["break_count"], 0, "{rebuilt}");
    assert!(rebuilt["without_body"].as_array().unwrap().is_empty());
    // The lost unit's checkpoints came back from the store with the chain they sign.
    let (code, out, err) = spoolctl(&new, &["--json", "archive", "verify", "--against-store"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    assert!(v["proof"]["compared"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["proof"]["checkpoints"], v["proof"]["compared"], "{v}");

    // The same archive, item for item and byte for byte; search finds the same.
    assert_eq!(listing(&new), before);
    for (&seq, was) in sample.iter().zip(&before_items) {
        assert_eq!(&item(&new, seq), was, "item {seq}");
    }
    assert_eq!(status(&new)["held"], held_before);
    assert_eq!(status(&new)["object_store"]["archive"], id.as_str());
    assert_eq!(status(&new)["rebuilding"], Value::Null);
    // Its new segments are numbered after the store's: nothing there is overwritten.
    let st = status(&new);
    assert_eq!(st["last_seq"], N);
    assert_eq!(st["segments"], segments + 1, "{st}");
}

/// With two of the store's nodes listed in `endpoint`, the first one killed changes nothing the
/// user sees: the unit goes on uploading through the second, and every body reads back from the
/// store (a cache of 0 bytes: each read is a request to the store).
#[test]
fn a_dead_endpoint_is_skipped_for_the_next() {
    needs_garage();
    let mut g = Garage::start(3);
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let one = format!("endpoint = \"{}\"", g.endpoint(0));
    let store = g.archive_config(0, "units/two", dir.path());
    assert!(store.contains(&one), "{store}");
    let store = store.replace(
        &one,
        &format!("endpoint = [\"{}\", \"{}\"]", g.endpoint(0), g.endpoint(1)),
    );
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"os_two\"\n[delivery]\ndefault_next_hop = \"{}\"\n\
             [archive]\nsegment_bytes_max = 1048576\ncache_bytes = 0\n{store}",
            sink.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    send(d.smtp, 0, 300);
    assert_eq!(spoolctl(&d, &["archive", "seal"]).0, 0);
    let before = all_uploaded(&d, &g, 300, 120);
    g.kill(0);
    send(d.smtp, 300, 600);
    assert_eq!(spoolctl(&d, &["archive", "seal"]).0, 0);
    let after = all_uploaded(&d, &g, 900, 120);
    assert!(after > before, "uploads went on: {before} → {after}");
    let (code, out, err) = spoolctl(&d, &["--json", "archive", "verify"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["items"].as_u64(), v["ok"].as_u64()),
        (Some(900), Some(900)),
        "{v}"
    );
    assert!(
        d.log_text().contains("object store endpoint now in use"),
        "the switch is logged"
    );
}
