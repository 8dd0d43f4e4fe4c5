//! The HA pair as operators run it: two real `keepalived` (VRRP) and two spoolds in network
//! namespaces on one segment, with the keepalived kit of `systemd/keepalived/` (track script and
//! notify script). A client in a third namespace sends to the virtual address all along; a sink
//! beside it counts what arrives. Kill -9 of the active spoold (async and sync replication), a
//! stopped keepalived on the active unit, and the active unit's cable cut: the address moves,
//! the partner is promoted, mail goes on, and every message that got `250` arrives (in async
//! mode after `spoolctl recover` for the replication window; in sync mode without it; a session
//! cut by the address move may make its client send a message twice). And both units booting
//! at once settle on one active holder of the address.
//! Needs root and keepalived (scripts/test installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::{
    have, in_netns, queued_id, sample_body, sample_message_id, spoolctl, wait_until,
    write_self_signed, Client, Daemon, SmtpSink,
};

const VIP: [u8; 4] = [10, 99, 0, 25];
const SECRET: &str = "keepalived pair secret 0123456789";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three hosts (a, b: the units; c: client and next hop) on a bridge in a fourth namespace.
/// Removed on drop, with everything running in them.
struct Lan {
    tag: String,
}

impl Lan {
    fn new() -> Lan {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("ka{}x{n}", std::process::id() % 100_000);
        let lan = Lan { tag };
        let sw = lan.ns("sw");
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (host, addr) in [
            ("a", "10.99.0.1/24"),
            ("b", "10.99.0.2/24"),
            ("c", "10.99.0.3/24"),
        ] {
            let ns = lan.ns(host);
            let port = format!("{}{host}", lan.tag);
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &port, "netns", &sw]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lan
    }

    fn ns(&self, host: &str) -> String {
        format!("{}_{host}", self.tag)
    }

    /// Cuts or restores `host`'s cable: its port on the bridge goes down or up (its own
    /// interface then loses or regains its carrier, as with a pulled cable).
    fn set_cable(&self, host: &str, up: bool) {
        let port = format!("{}{host}", self.tag);
        ip(&[
            "-n",
            &self.ns("sw"),
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ]);
    }

    /// The client's neighbour entry for the virtual address (`ip neigh` output).
    fn client_neighbour_of_vip(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns("c"), "neigh", "show", "10.99.0.25"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Each unit's MAC address, to read [`Lan::client_neighbour_of_vip`] by.
    fn macs(&self) -> String {
        ["a", "b"]
            .iter()
            .map(|host| {
                let out = Command::new("ip")
                    .args(["-n", &self.ns(host), "-br", "link", "show", "dev", "eth0"])
                    .output()
                    .unwrap();
                format!("{host}: {}", String::from_utf8_lossy(&out.stdout).trim())
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Whether `host` holds the virtual address.
    fn holds_vip(&self, host: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns(host), "-4", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("10.99.0.25/")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in ["a", "b", "c", "sw"] {
            // Processes in a namespace keep it alive: end them first.
            let ns = self.ns(host);
            let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
            if let Ok(out) = pids {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// One unit: spoold and keepalived in namespace `ns`.
struct Unit {
    name: &'static str,
    spoold: Daemon,
    keepalived: Option<Child>,
    /// The kit's scripts as installed for this unit's keepalived.
    scripts: Option<tempfile::TempDir>,
    dir: tempfile::TempDir,
    ns: String,
}

fn kit(file: &str) -> String {
    tests::workspace_root()
        .join("systemd/keepalived")
        .join(file)
        .display()
        .to_string()
}

impl Unit {
    /// spoold alone, with `ha_extra` appended to its `[ha]` section.
    fn start_spoold(lan: &Lan, host: &'static str, role: &str, ha_extra: &str) -> Unit {
        let ns = lan.ns(host);
        let dir = tempfile::tempdir().unwrap();
        let (me, partner) = if host == "a" {
            ("10.99.0.1", "10.99.0.2")
        } else {
            ("10.99.0.2", "10.99.0.1")
        };
        let (cert, key) = write_self_signed(dir.path());
        let config = dir.path().join("spoold.toml");
        std::fs::write(
            &config,
            format!(
                "node_name = \"gw_{host}\"\n[smtp]\ntrusted_networks = [\"10.99.0.0/24\", \"127.0.0.0/8\"]\n\
                 [delivery]\ndefault_next_hop = \"10.99.0.3:2526\"\nretry_schedule_secs = [1]\n\
                 [ha]\npartner = \"{partner}:7400\"\nlisten = \"{me}:7400\"\nsecret = \"{SECRET}\"\nrole = \"{role}\"\n\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\n{ha_extra}",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let spoold = Daemon::start_in_netns(
            &ns,
            SocketAddr::from(([0, 0, 0, 0], 2525)),
            &["--config", config.to_str().unwrap()],
        );
        Unit {
            name: host,
            spoold,
            keepalived: None,
            scripts: None,
            dir,
            ns,
        }
    }

    fn run_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("run")
    }

    /// keepalived with the kit as shipped (see [`Unit::start_keepalived_with`]).
    fn start_keepalived(&mut self, priority: u32) {
        self.start_keepalived_with(priority, |conf| conf)
    }

    /// keepalived with the kit as shipped: `enable_script_security` on, the scripts unchanged
    /// (copied byte for byte into a root-only directory, as the package installs them under
    /// `/usr/share`), and only what README tells an operator to change changed: the address,
    /// the priority and the scripts' paths. The scripts get their settings from keepalived's
    /// own environment, as the kit's systemd drop-in gives them. `edit` may change the
    /// configuration further (a timing under measurement).
    fn start_keepalived_with(&mut self, priority: u32, edit: impl FnOnce(String) -> String) {
        let d = self.dir.path();
        std::fs::create_dir_all(self.run_dir()).unwrap();
        // Script security refuses a script in a directory others can write (a temporary
        // directory under /tmp is one): /run is root's, and tempdir makes 0700 directories.
        let scripts = tempfile::tempdir_in("/run").unwrap();
        for script in ["check-spoold", "notify-spoold"] {
            std::fs::copy(kit(script), scripts.path().join(script)).unwrap();
        }
        let conf = std::fs::read_to_string(kit("keepalived.conf"))
            .unwrap()
            .replace("192.0.2.25/24", "10.99.0.25/24")
            .replace("priority 100", &format!("priority {priority}"))
            .replace(
                "/usr/share/spoolpair/keepalived/",
                &format!("{}/", scripts.path().display()),
            );
        assert!(
            conf.contains("enable_script_security")
                && conf.contains(&scripts.path().join("notify-spoold").display().to_string()),
            "kit config changed: {conf}"
        );
        let conf = edit(conf);
        std::fs::write(d.join("keepalived.conf"), conf).unwrap();
        let log = std::fs::File::create(d.join("keepalived.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--vrrp",
            ])
            .arg("--use-file")
            .arg(d.join("keepalived.conf"))
            .arg("--pid")
            .arg(d.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(d.join("vrrp.pid"))
            // What `keepalived-spoolpair.conf` (the kit's drop-in) sets for the service.
            .env("SPOOLD_STATE_DIR", &self.spoold.state)
            .env("SPOOLPAIR_RUN", self.run_dir())
            .env("SPOOLD_HTTP", "127.0.0.1:9425")
            .env("SPOOLCTL", tests::spoold_bin().with_file_name("spoolctl"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.keepalived = Some(child);
        self.scripts = Some(scripts);
    }

    fn stop_keepalived(&mut self) {
        if let Some(c) = self.keepalived.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let mut c = c;
            let _ = c.wait();
        }
    }

    fn role(&self) -> String {
        let (_, out, _) = spoolctl(&self.spoold, &["--json", "status"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .map(|v| v["role"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!(
            "--- {} spoold:\n{}\n--- keepalived:\n{}\n--- notify:\n{}",
            self.name,
            self.spoold.log_text(),
            std::fs::read_to_string(self.dir.path().join("keepalived.log")).unwrap_or_default(),
            std::fs::read_to_string(self.run_dir().join("notify.log")).unwrap_or_default()
        )
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        if let Some(mut c) = self.keepalived.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client in namespace c sending to the virtual address, one message per connection, until
/// stopped: every `250` is recorded with its time and the node that queued it.
struct VipLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(Instant, String, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VipLoad {
    /// A client as a sending MTA runs one: a session caught by the address moving is given up
    /// after 3 s and its message sent again.
    fn start(ns: &str, seed_base: usize) -> VipLoad {
        Self::start_with(ns, seed_base, Duration::from_secs(3), false)
    }

    /// A probe of the address for new sessions: short timeouts, and every try a new message
    /// (so one whose `250` was lost is not sent twice). What it measures is when the partner
    /// answers new connections, not how long a client's session left hanging by the move
    /// waits for its own timeout.
    fn probe(ns: &str, seed_base: usize) -> VipLoad {
        Self::start_with(ns, seed_base, Duration::from_millis(1_000), true)
    }

    fn start_with(ns: &str, seed_base: usize, timeout: Duration, new_each_try: bool) -> VipLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a, ns) = (stop.clone(), acked.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let vip = SocketAddr::from((IpAddr::from(VIP), 2525));
                let mut seed = seed_base;
                while !s.load(Ordering::SeqCst) {
                    let body = sample_body(seed, 1200);
                    let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let (mut c, greeting) =
                            Client::try_connect(vip, timeout.min(Duration::from_secs(1)))?;
                        // A session caught by the address moving hangs (its packets go to a
                        // unit that no longer has the address): give it up soon, as a client
                        // with a short timeout would.
                        c.set_timeout(timeout);
                        if !greeting.starts_with("220") || !c.cmd("EHLO client").starts_with("250")
                        {
                            return None;
                        }
                        let reply = c.send_mail("client@example.com", &["rcpt@example.org"], &body);
                        let _ = c.cmd("QUIT");
                        queued_id(&reply)
                    }));
                    match sent.ok().flatten() {
                        Some(id) => {
                            let node = id.rsplit('-').next().unwrap_or("").to_string();
                            a.lock()
                                .unwrap()
                                .push((Instant::now(), sample_message_id(seed), node));
                            seed += 1;
                        }
                        None => {
                            if new_each_try {
                                seed += 1;
                            }
                            std::thread::sleep(Duration::from_millis(50))
                        }
                    }
                }
            })
        });
        VipLoad {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Who answered when, relative to `t`: runs of consecutive `250`s from one node.
    fn timeline(&self, t: Instant) -> String {
        let mut runs: Vec<(String, f64, f64, usize)> = Vec::new();
        for (at, _, node) in self.acked.lock().unwrap().iter() {
            let ms = at.saturating_duration_since(t).as_secs_f64() * 1000.0
                - t.saturating_duration_since(*at).as_secs_f64() * 1000.0;
            match runs.last_mut() {
                Some((n, _, last, count)) if n == node => {
                    *last = ms;
                    *count += 1;
                }
                _ => runs.push((node.clone(), ms, ms, 1)),
            }
        }
        runs.iter()
            .map(|(n, a, b, c)| format!("{n}: {c} from {a:.0} to {b:.0} ms"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The first `250` from `node` after `t`.
    fn first_from(&self, node: &str, t: Instant) -> Option<Instant> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .find(|(at, _, n)| *at > t && n == node)
            .map(|(at, _, _)| *at)
    }

    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, id, _)| id.clone())
            .collect()
    }
}

/// Which unit answers on the virtual address once things settle: (active, other).
fn wait_for_master(lan: &Lan, units: &[Unit; 2]) -> (usize, usize) {
    let settled = wait_until(30, || {
        (0..2).any(|i| lan.holds_vip(units[i].name) && units[i].role() == "active")
    });
    assert!(
        settled,
        "no unit took the address:\n{}\n{}",
        units[0].logs(),
        units[1].logs()
    );
    let active = (0..2).find(|&i| lan.holds_vip(units[i].name)).unwrap();
    (active, 1 - active)
}

/// One pair at a time: VRRP timing is what these tests measure.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

type Setup = (std::sync::MutexGuard<'static, ()>, Lan, SmtpSink);

/// The segment and the sink, once root and keepalived are there.
fn lan() -> Setup {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    tests::needs("root", tests::is_root());
    tests::needs("keepalived", have("keepalived"));
    let lan = Lan::new();
    let sink = SmtpSink::start_in_netns(&lan.ns("c"), "10.99.0.3:2526".parse().unwrap());
    (guard, lan, sink)
}

/// A pair in service: A active holding the address, B passive; `ha_extra` goes in both `[ha]`.
fn setup_with(ha_extra: &str) -> (Setup, [Unit; 2]) {
    let (guard, lan, sink) = lan();
    let mut a = Unit::start_spoold(&lan, "a", "active", ha_extra);
    a.start_keepalived(150);
    // A's keepalived claims the address first; B joins as backup.
    assert!(wait_until(20, || lan.holds_vip("a")), "{}", a.logs());
    let mut b = Unit::start_spoold(&lan, "b", "passive", ha_extra);
    b.start_keepalived(100);
    ((guard, lan, sink), [a, b])
}

fn setup() -> (std::sync::MutexGuard<'static, ()>, Lan, SmtpSink, [Unit; 2]) {
    let ((guard, lan, sink), units) = setup_with("");
    (guard, lan, sink, units)
}

/// What README promises for each way the active unit fails: the partner's first `250` on the
/// address within this long of the failure. README quotes one run's figure; these are those
/// figures plus a margin of 1.5 s for a loaded machine (the VRRP timers themselves do not
/// stretch, the scripts and the promotion do).
const TAKEOVER_AFTER_KILL: Duration = Duration::from_millis(2_600 + 1_500);
const TAKEOVER_AFTER_KEEPALIVED_STOP: Duration = Duration::from_millis(500 + 1_500);
const TAKEOVER_AFTER_CABLE_CUT: Duration = Duration::from_millis(1_800 + 1_500);
const ELECTION_AT_COLD_BOOT: Duration = Duration::from_millis(1_900 + 1_500);

/// Mail through the address, then `fail` on the unit holding it, until the partner has
/// answered 50 more: the ids that got `250`, the time from the failure to the partner's first
/// `250` (asserted within `promised`), and (failed unit, partner).
fn fail_the_active_under_load(
    lan: &Lan,
    units: &mut [Unit; 2],
    seed: usize,
    what: &str,
    promised: Duration,
    fail: impl FnOnce(&Lan, &mut Unit),
) -> (Vec<String>, Duration, usize, usize) {
    let (x, y) = wait_for_master(lan, units);
    let load = VipLoad::start(&lan.ns("c"), seed);
    assert!(
        wait_until(20, || load.count() >= 50),
        "no mail through the address"
    );
    let probe = VipLoad::probe(&lan.ns("c"), seed + 900_000);
    let before_failure = lan.client_neighbour_of_vip();
    let failed = Instant::now();
    fail(lan, &mut units[x]);
    let new_node = format!("gw_{}", units[y].name);
    // The first `250` from the partner that either client saw (each may have a session left
    // hanging by the move).
    let first_from_partner = || {
        [&probe, &load]
            .iter()
            .filter_map(|l| l.first_from(&new_node, failed))
            .min()
    };
    // What the client's neighbour table says of the address, each time it changes: a slow
    // handover that is the client still sending to the old holder's MAC shows as such.
    let mut neighbour = vec![(0, before_failure)];
    let answered = wait_until(60, || {
        let now = lan.client_neighbour_of_vip();
        if neighbour.last().is_none_or(|(_, last)| *last != now) {
            neighbour.push((failed.elapsed().as_millis(), now));
        }
        first_from_partner().is_some()
    });
    assert!(
        answered,
        "{what}: the partner never answered on the address:\n{}\n{}",
        units[x].logs(),
        units[y].logs()
    );
    let took = first_from_partner().unwrap() - failed;
    let timeline = format!(
        "probe {}; load {}; the client's neighbour entry for the address (ms: entry) {neighbour:?}; \
         MAC addresses: {}",
        probe.timeline(failed),
        load.timeline(failed),
        lan.macs()
    );
    let before = load.count();
    let more = Instant::now();
    assert!(wait_until(40, || load.count() >= before + 50));
    eprintln!(
        "{what}: 50 more 250s {} ms after the first from the partner",
        more.elapsed().as_millis()
    );
    let mut acked = load.stop();
    acked.extend(probe.stop());
    eprintln!("{what}: {timeline}");
    eprintln!(
        "{what}: first 250 from the partner after {} ms; {} acknowledged",
        took.as_millis(),
        acked.len()
    );
    assert!(
        took <= promised,
        "{what}: the partner's first 250 came {} ms after the failure; README promises {} ms\n{timeline}\n{}\n{}",
        took.as_millis(),
        promised.as_millis(),
        units[x].logs(),
        units[y].logs()
    );
    (acked, took, x, y)
}

/// Waits until every acknowledged id has arrived at the sink; returns how many arrived twice.
fn all_arrive(sink: &SmtpSink, acked: &[String], within_secs: u64) -> usize {
    let arrived = wait_until(within_secs, || {
        let seen = sink.arrivals();
        acked.iter().all(|id| seen.contains_key(id))
    });
    let seen = sink.arrivals();
    let lost: Vec<&String> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(arrived && lost.is_empty(), "lost {}: {lost:?}", lost.len());
    seen.values().filter(|n| **n > 1).count()
}

#[test]
fn kill9_of_the_active_spoold_moves_the_address_and_loses_nothing_after_recover() {
    let (_one, lan, sink, mut units) = setup();
    let (acked, _, x, y) = fail_the_active_under_load(
        &lan,
        &mut units,
        0,
        "kill -9 of the active spoold",
        TAKEOVER_AFTER_KILL,
        |_, u| u.spoold.kill9(),
    );
    assert!(lan.holds_vip(units[y].name) && units[y].role() == "active");
    // The killed unit comes back passive (as after any takeover) and its keepalived backs off;
    // recovery on the active unit brings what the partner had not yet received.
    units[x]
        .spoold
        .extra_args
        .extend(["--role".to_string(), "passive".to_string()]);
    units[x].spoold.restart();
    assert!(wait_until(20, || units[x].role() == "passive"));
    let (code, out, err) = spoolctl(&units[y].spoold, &["recover"]);
    assert_eq!(code, 0, "recover: {out}{err}");
    eprintln!("recover: {}", out.lines().last().unwrap_or(""));
    let twice = all_arrive(&sink, &acked, 60);
    eprintln!(
        "at the sink: {} acknowledged, all arrived, {twice} delivered twice (the crash window)",
        acked.len()
    );
    assert!(
        lan.holds_vip(units[y].name),
        "the address stays with the unit that took over"
    );
}

#[test]
fn kill9_of_the_active_spoold_in_sync_mode_loses_nothing_even_before_recover() {
    let ((_one, lan, sink), mut units) = setup_with(
        "replication = \"sync\"
",
    );
    let (acked, _, x, _) = fail_the_active_under_load(
        &lan,
        &mut units,
        200_000,
        "sync mode, kill -9 of the active spoold",
        TAKEOVER_AFTER_KILL,
        |_, u| u.spoold.kill9(),
    );
    // Every 250 meant the partner had the message: it delivers them all as the new active
    // unit, with the killed unit still down and no recovery run.
    let twice = all_arrive(&sink, &acked, 60);
    eprintln!(
        "sync mode at the sink before recover: {} acknowledged, 0 lost, {twice} delivered twice",
        acked.len()
    );
    assert!(units[x].spoold.child.is_none());
}

#[test]
fn cutting_the_active_units_cable_moves_the_address_and_loses_nothing_after_recover() {
    let (_one, lan, sink, mut units) = setup();
    let (acked, _, x, y) = fail_the_active_under_load(
        &lan,
        &mut units,
        300_000,
        "the active unit's cable cut",
        TAKEOVER_AFTER_CABLE_CUT,
        |lan, u| lan.set_cable(u.name, false),
    );
    // Its keepalived saw the carrier go (FAULT) and made its spoold hand over: no unit delivers
    // its partner's mail, and the cut unit accepts none. It is `leaving` until work in flight
    // ends (a delivery caught by the cut waits for the cable, so that nothing is delivered
    // twice by its doing), then passive.
    assert!(
        wait_until(10, || matches!(
            units[x].role().as_str(),
            "leaving" | "passive"
        )),
        "the cut unit stayed active:\n{}",
        units[x].logs()
    );
    assert_eq!(units[y].role(), "active");
    lan.set_cable(units[x].name, true);
    // Back on the segment it stays backup (nopreempt) and passive; recovery on the active
    // unit brings what the cut unit had acknowledged and not yet replicated.
    let mut recovered = false;
    for _ in 0..30 {
        let (code, out, err) = spoolctl(&units[y].spoold, &["recover"]);
        if code == 0 {
            eprintln!("recover: {}", out.lines().last().unwrap_or(""));
            recovered = true;
            break;
        }
        eprintln!(
            "recover (partner not yet reachable): {}{}",
            out.trim(),
            err.trim()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(recovered, "recover never succeeded:\n{}", units[y].logs());
    let twice = all_arrive(&sink, &acked, 60);
    eprintln!(
        "cable cut, at the sink: {} acknowledged, 0 lost, {twice} delivered twice",
        acked.len()
    );
    assert!(lan.holds_vip(units[y].name) && !lan.holds_vip(units[x].name));
    assert!(
        wait_until(60, || units[x].role() == "passive"),
        "the cut unit never finished its handover:\n{}",
        units[x].logs()
    );
}

#[test]
fn both_units_booting_at_once_settle_on_one_active_holder() {
    let (_one, lan, sink) = lan();
    // A cold start of the whole pair: both spoolds passive, both keepalived started together
    // with the same priority (the kit's configuration as shipped).
    let mut units = [
        Unit::start_spoold(&lan, "a", "passive", ""),
        Unit::start_spoold(&lan, "b", "passive", ""),
    ];
    let booted = Instant::now();
    for u in units.iter_mut() {
        u.start_keepalived(100);
    }
    let (x, y) = wait_for_master(&lan, &units);
    let elected = booted.elapsed();
    // Both keepalived may time out waiting for a master at the same moment and both turn
    // MASTER until their adverts meet: the loser's notify then makes it active, and its
    // BACKUP passive again. Settled: the holder active, the other passive.
    let loser_passive = wait_until(10, || units[y].role() == "passive");
    let settled = booted.elapsed();
    eprintln!(
        "both booting at once: gw_{} active holding the address after {} ms, gw_{} passive after {} ms",
        units[x].name,
        elected.as_millis(),
        units[y].name,
        settled.as_millis()
    );
    assert!(
        loser_passive,
        "gw_{} never went back to passive",
        units[y].name
    );
    assert!(
        settled <= ELECTION_AT_COLD_BOOT,
        "one unit active on the address and the other passive after {} ms; README promises {} ms",
        settled.as_millis(),
        ELECTION_AT_COLD_BOOT.as_millis()
    );
    // And it stays that way: never both holders, never both active.
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(4) {
        assert!(
            !(lan.holds_vip("a") && lan.holds_vip("b")),
            "both hold the address"
        );
        assert!(lan.holds_vip(units[x].name));
        assert_eq!(units[y].role(), "passive");
        std::thread::sleep(Duration::from_millis(200));
    }
    let load = VipLoad::start(&lan.ns("c"), 400_000);
    assert!(wait_until(20, || load.count() >= 30));
    let acked = load.stop();
    assert_eq!(all_arrive(&sink, &acked, 30), 0);
}

#[test]
fn stopping_the_active_units_keepalived_hands_over_without_loss() {
    let (_one, lan, sink, mut units) = setup();
    let (acked, _, x, y) = fail_the_active_under_load(
        &lan,
        &mut units,
        500_000,
        "keepalived stopped on the active unit",
        TAKEOVER_AFTER_KEEPALIVED_STOP,
        |_, u| u.stop_keepalived(),
    );
    assert!(
        wait_until(20, || units[x].role() == "passive"),
        "the stopped unit did not hand over:\n{}",
        units[x].logs()
    );
    assert_eq!(units[y].role(), "active");
    // Nothing lost. A session the address moved away from in the middle of its reply is
    // retried by the client (it never saw the 250), so that message may arrive twice: SMTP's
    // at-least-once, not a unit delivering its partner's mail.
    let twice = all_arrive(&sink, &acked, 60);
    eprintln!(
        "at the sink: {} acknowledged, 0 lost, {twice} delivered twice",
        acked.len()
    );
    assert!(twice <= 2, "{twice} delivered twice");
    // The notify script logs each transition when it starts and when spoolctl returns, to the
    // millisecond, so a long handover shows as what it was.
    let log = std::fs::read_to_string(units[x].run_dir().join("notify.log")).unwrap();
    let stamped =
        |line: &str| line.len() > 24 && line.as_bytes()[19] == b'.' && line.as_bytes()[23] == b'Z';
    let started = log
        .lines()
        .find(|l| l.contains("VRRP STOP: spoolctl role passive: started"));
    let ended = log
        .lines()
        .find(|l| l.contains("VRRP STOP: spoolctl role passive: rc=0 in "));
    assert!(
        started.is_some_and(stamped) && ended.is_some_and(stamped),
        "notify.log:\n{log}"
    );
}
