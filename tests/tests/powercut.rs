//! Power loss, not just a killed process: spoold's state directory lives on a FUSE file system
//! (`tests::powercut`) that forgets everything not yet fsynced, files and directory entries
//! alike, when the power is "cut". Under SMTP load the daemon is killed and the power cut at a
//! random instant, the file system remounted and the daemon restarted: every message that got a
//! `250` must be there, whole, and no half-written pair may be visible. The harness is shown
//! to forget what a writer that skips an fsync would lose, and the check to fail a daemon built
//! to skip its directory fsync (a fail-point of debug builds). Writer modes: io_uring and the portable writer (both
//! with named files: FUSE has no `O_TMPFILE` here); `syncfs` is not tested, since it does not
//! reach a FUSE server, and `spool.sync = auto` must not choose it on such a file system.
//! The random seed is printed; `TEST_SEED=<n>` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::{Rng, SeedableRng};
use std::io::Write;
use std::time::Duration;
use tests::powercut::PowerCut;
use tests::{write_config, Acked, CrashLoad, Daemon};

fn mounted() -> (tempfile::TempDir, PowerCut, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fs = PowerCut::mount(&mnt)
        .expect("mount the power-cut FUSE file system (needs /dev/fuse and fusermount3)");
    (dir, fs, mnt)
}

fn sync_dir(path: &std::path::Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// What a writer that skips one fsync would lose, this file system loses: a synced file whose
/// directory was not synced, the bytes of a file never synced, a rename not synced.
#[test]
fn the_harness_keeps_only_what_was_synced() {
    let (_dir, mut fs, mnt) = mounted();
    let d = mnt.join("d");
    std::fs::create_dir(&d).unwrap();
    sync_dir(&mnt);
    let write = |name: &str, bytes: &[u8], sync_file: bool| {
        let mut f = std::fs::File::create(d.join(name)).unwrap();
        f.write_all(bytes).unwrap();
        if sync_file {
            f.sync_all().unwrap();
        }
    };
    write("kept", b"synced file, synced directory", true);
    write("empty", b"never synced bytes", false);
    sync_dir(&d);
    write("lost", b"synced file, directory not synced", true);
    std::fs::rename(d.join("kept"), d.join("renamed")).unwrap();
    fs.cut().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["empty", "kept"], "only synced entries survive");
    assert_eq!(
        std::fs::read(d.join("kept")).unwrap(),
        b"synced file, synced directory"
    );
    assert!(
        std::fs::read(d.join("empty")).unwrap().is_empty(),
        "unsynced bytes are gone"
    );
}

fn power_cuts_under_load(mode: &str, spool_settings: &str, rounds: usize) {
    let seed: u64 = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{mode}: TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (dir, mut fs, mnt) = mounted();
    // The state directory is the mount's root: `auto` would choose syncfs there, were it not
    // a FUSE file system that syncfs does not reach.
    let cfg = write_config(dir.path(), &format!("[spool]\n{spool_settings}\n"));
    let mut d = Daemon::start_in(&mnt, &["--config", &cfg]);
    assert!(
        d.log_text().contains("fsync per file"),
        "{mode}: sync = auto picked per-file fsync on FUSE: {}",
        d.log_text()
    );
    let acked = Acked::default();
    for round in 0..rounds {
        let before = acked.lock().unwrap().len();
        let load = CrashLoad::start(
            d.smtp,
            4,
            round * 10,
            |i| {
                if i % 8 == 7 {
                    200_000
                } else {
                    2_500
                }
            },
            &acked,
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        d.kill9();
        load.stop();
        fs.cut().unwrap();
        d.restart();
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() > before,
            "{mode} round {round} (TEST_SEED={seed}): nothing acknowledged before the cut"
        );
        tests::assert_acknowledged_whole(
            &d,
            &acked,
            &format!("{mode} round {round} (TEST_SEED={seed}), after the power cut"),
        );
        let (file_syncs, dir_syncs) = fs.syncs();
        eprintln!(
            "{mode} round {round}: {} acknowledged ({} this round), all whole after the power cut; {file_syncs} file and {dir_syncs} directory syncs so far",
            acked.len(),
            acked.len() - before
        );
    }
}

#[test]
fn power_cut_under_load_with_io_uring() {
    power_cuts_under_load("io_uring", "", 3);
}

#[test]
fn power_cut_under_load_with_the_portable_writer() {
    power_cuts_under_load("portable writer", "io_uring = false", 3);
}

/// The check above catches the bug it exists for: a daemon that acknowledges before the names
/// of its files are durable (the `skip-spool-dir-fsync` fail-point: no fsync of `spool/` after
/// linking a round) loses acknowledged messages at the cut, and the same check fails.
#[test]
fn a_daemon_that_skips_its_directory_fsync_fails_the_power_cut_check() {
    for (mode, settings) in [("io_uring", ""), ("portable writer", "io_uring = false")] {
        let (dir, mut fs, mnt) = mounted();
        let cfg = write_config(dir.path(), &format!("[spool]\n{settings}\n"));
        let mut d = Daemon::unstarted(&["--no-delivery", "--config", &cfg]);
        d.state = mnt.clone();
        d.extra_env = vec![("SPOOLD_FAILPOINT".into(), "skip-spool-dir-fsync".into())];
        d.restart();
        let acked = Acked::default();
        let load = CrashLoad::start(d.smtp, 4, 90, |_| 2_500, &acked);
        std::thread::sleep(Duration::from_millis(800));
        d.kill9();
        load.stop();
        fs.cut().unwrap();
        d.extra_env.clear();
        d.restart();
        let acked = acked.lock().unwrap();
        assert!(acked.len() > 20, "{mode}: too little load: {}", acked.len());
        let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tests::assert_acknowledged_whole(&d, &acked, mode)
        }));
        let held = d.spooled_ids().len();
        eprintln!(
            "{mode}, directory fsync skipped: {} acknowledged, {held} in spool/ after the cut",
            acked.len()
        );
        assert!(
            check.is_err(),
            "{mode}: the power-cut check passed a daemon that skips its directory fsync"
        );
    }
}
