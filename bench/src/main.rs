//! `bench`: load generators and side-by-side comparisons. Figures, not tests: each command prints
//! a table (medians over `--runs`) and, where it applies, the ratio against Postfix measured in
//! the same run on the same machine.
//!
//! - `ingest`: N concurrent SMTP sessions sending fixed-size mail to spoold (and, with
//!   `--compare-postfix`, to a local Postfix that holds every message in its hold queue).
//! - `spool-raw`: the disk's own limit for durable small files, one at a time and batched with
//!   io_uring, next to spoold's group-commit writer.
//! - `recovery`: startup recovery time for a spool of N messages.
//! - `relay`: end to end through spoold (with and without clamd) and through Postfix.
//! - `backlog`: a large spool after a crash: ready, drained, the spool empty, RSS while draining.
//! - `replicate`: ingest with replication off and async, and the replication lag.
//! - `archive`: archive ingest beside the spool's, bytes stored, search latency at a million
//!   items, mirror catch-up.
//! - `milter`: ingest through rspamd and OpenDKIM as milters, beside no milters and beside
//!   Postfix with the same milters.
//!
//! Every command first keeps the VM's memory backed by its host (see [`memory`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod archive;
mod backlog;
mod cluster;
mod console;
mod ingest;
mod instant_partner;
mod memory;
mod milter;
mod raw;
mod relay;
mod replicate;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Spoolpair benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// SMTP ingest throughput and DATA-end→250 latency.
    Ingest(ingest::Args),
    /// Durable small-file writes: one at a time, io_uring batches, spoold's writer.
    SpoolRaw(raw::RawArgs),
    /// Startup recovery time for a spool of N messages.
    Recovery(raw::RecoveryArgs),
    /// End to end: SMTP in, optional clamd, SMTP out to smtp-sink; next to Postfix.
    Relay(relay::Args),
    /// A large backlog after a crash: ready, drained, the spool empty, RSS while draining.
    Backlog(backlog::Args),
    /// Ingest with replication off and async, and the lag under that load.
    Replicate(replicate::Args),
    /// Archive ingest beside spool ingest, bytes stored, search latency, mirror catch-up.
    Archive(archive::Args),
    /// Clustered settings: a change on one member until it is in effect on every other.
    Cluster(cluster::Args),
    /// The console's search page on a large archive, beside spoolctl's search.
    Console(console::Args),
    /// Ingest through rspamd and OpenDKIM as milters; beside Postfix with the same.
    Milter(milter::Args),
}

fn main() -> Result<()> {
    let cmd = Cli::parse().cmd;
    let _backed = memory::keep_backed();
    match cmd {
        Cmd::Ingest(a) => ingest::run(a),
        Cmd::SpoolRaw(a) => raw::run(a),
        Cmd::Recovery(a) => raw::recovery(a),
        Cmd::Relay(a) => relay::run(a),
        Cmd::Backlog(a) => backlog::run(a),
        Cmd::Replicate(a) => replicate::run(a),
        Cmd::Archive(a) => archive::run(a),
        Cmd::Cluster(a) => cluster::run(a),
        Cmd::Console(a) => console::run(a),
        Cmd::Milter(a) => milter::run(a),
    }
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median of `v` with `digits` decimals, or `missing` when there is nothing to show.
pub fn median_shown(v: Vec<f64>, digits: usize, missing: &str) -> String {
    if v.is_empty() {
        missing.to_string()
    } else {
        format!("{:.*}", digits, median(v))
    }
}

/// A field of a `/proc/<pid>/status` text (`VmRSS:`, `VmHWM:`, `RssAnon:`…) in MiB; 0 when
/// absent.
pub fn status_field_mib(status: &str, field: &str) -> f64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Describes the file system holding `path` (type from /proc/mounts), for the report.
pub fn describe_fs(path: &std::path::Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() >= 4
            && path.starts_with(f[1])
            && best.as_ref().is_none_or(|(l, _)| f[1].len() > *l)
        {
            best = Some((
                f[1].len(),
                format!("{} on {} ({}, {})", f[0], f[1], f[2], f[3]),
            ));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "unknown".into())
}

/// What a block device has done so far: bytes written and cache flushes completed.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceIo {
    pub bytes_written: u64,
    pub flushes: u64,
}

impl DeviceIo {
    /// The counters of the block device holding `path` (its `/sys/dev/block/.../stat`), if the
    /// device can be found.
    pub fn of(path: &std::path::Path) -> Option<DeviceIo> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        let stat = std::fs::read_to_string(format!(
            "/sys/dev/block/{}:{}/stat",
            libc::major(dev),
            libc::minor(dev)
        ))
        .ok()?;
        // Documentation/block/stat.rst: field 7 counts 512-byte sectors written, field 16
        // flush requests completed (kernels since 5.5).
        let field = |n: usize| stat.split_whitespace().nth(n - 1)?.parse::<u64>().ok();
        Some(DeviceIo {
            bytes_written: field(7)? * 512,
            flushes: field(16).unwrap_or(0),
        })
    }

    /// Per message of `messages`: KiB written and flushes.
    pub fn per_message(&self, messages: usize) -> (f64, f64) {
        let n = messages.max(1) as f64;
        (
            self.bytes_written as f64 / 1024.0 / n,
            self.flushes as f64 / n,
        )
    }
}

/// Runs `work` and returns its result with what the device under `path` did meanwhile,
/// including what the work left dirty (flushed with `sync` before counting), so that metadata
/// written back late is counted too. Device-wide: anything else written meanwhile counts too.
pub fn with_device_io<T>(
    path: &std::path::Path,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<DeviceIo>)> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let before = DeviceIo::of(path);
    let out = work()?;
    // SAFETY: as above.
    unsafe { libc::sync() };
    let done = before.zip(DeviceIo::of(path)).map(|(b, a)| DeviceIo {
        bytes_written: a.bytes_written.saturating_sub(b.bytes_written),
        flushes: a.flushes.saturating_sub(b.flushes),
    });
    Ok((out, done))
}

/// The directory the benchmarks' scratch directories go in: `target/bench-scratch`, marked as
/// the top of a directory hierarchy (`chattr +T`) so that ext4 places each new scratch
/// directory in a block group of its own choosing, not next to `target/`, where cargo has just
/// replaced (deleted) files, which slows inode allocation there (see `DELETION_SHADOW`).
pub fn scratch_base() -> std::path::PathBuf {
    let base = std::path::PathBuf::from("target/bench-scratch");
    let _ = std::fs::create_dir_all(&base);
    if let Ok(dir) = std::fs::File::open(&base) {
        use std::os::fd::AsRawFd;
        const FS_TOPDIR_FL: libc::c_long = 0x0002_0000;
        let mut flags: libc::c_long = 0;
        // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one long through a valid pointer.
        unsafe {
            if libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0
                && flags & FS_TOPDIR_FL == 0
            {
                flags |= FS_TOPDIR_FL;
                libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
            }
        }
    }
    base
}

/// A new scratch directory under `base` (created if need be), or under [`scratch_base`].
pub fn scratch_dir(base: Option<&std::path::Path>) -> anyhow::Result<tempfile::TempDir> {
    let base = base.map_or_else(scratch_base, std::path::Path::to_path_buf);
    std::fs::create_dir_all(&base)?;
    Ok(tempfile::tempdir_in(base)?)
}

/// Where the time of the benchmarks' last large deletion is kept.
const DELETED_AT: &str = "target/bench-deleted-at";

/// How long after a large deletion ext4 without a journal still slows inode allocation: it
/// skips a free inode deleted less than 60 s ago, or 360 s ago while its inode table block is
/// dirty (`recently_deleted()` in `fs/ext4/ialloc.c`), and every skip is a buffer-cache lookup.
const DELETION_SHADOW: std::time::Duration = std::time::Duration::from_secs(370);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Deletes the scratch directories of a benchmark and notes the deletion; with
/// `SPOOLPAIR_BENCH_KEEP=1` leaves them (for back-to-back experiments, which any deletion
/// would skew).
pub fn remove_scratch(dirs: Vec<tempfile::TempDir>) {
    if std::env::var_os("SPOOLPAIR_BENCH_KEEP").is_some() {
        for d in dirs {
            eprintln!("kept {}", d.keep().display());
        }
        return;
    }
    let many = dirs
        .iter()
        .map(|d| count_files(d.path(), 1000))
        .sum::<usize>()
        >= 1000;
    drop(dirs);
    if many {
        note_deletions();
    }
}

/// Files under `dir`, counted up to about `limit`.
fn count_files(dir: &std::path::Path, limit: usize) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            n += 1;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
            if n >= limit {
                return n;
            }
        }
    }
    n
}

/// Records that a benchmark has just deleted many files.
pub fn note_deletions() {
    let _ = std::fs::write(DELETED_AT, unix_now().to_string());
}

/// Waits until the last recorded large deletion can no longer slow file creation, so that a
/// measurement does not depend on what ran before it. `SPOOLPAIR_BENCH_NO_SETTLE=1` skips the
/// wait (for quick experiments; figures taken so are not comparable).
pub fn settle_after_deletions() {
    // SAFETY: sync(2) has no preconditions; it writes back the dirty inode table blocks.
    unsafe { libc::sync() };
    if std::env::var_os("SPOOLPAIR_BENCH_NO_SETTLE").is_some() {
        return;
    }
    let Some(at) = std::fs::read_to_string(DELETED_AT)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let until = at + DELETION_SHADOW.as_secs();
    let now = unix_now();
    if now < until {
        eprintln!(
            "waiting {} s: files were deleted {} s ago, and ext4 without a journal slows file creation for a while after that",
            until - now,
            now - at
        );
        std::thread::sleep(std::time::Duration::from_secs(until - now));
    }
}
