//! The disk's own limit for durable small files, and spoold's writer against it.

use crate::{describe_fs, median};
use anyhow::Result;
use bytes::Bytes;
use spool::writer::{SyncMode, WriterOptions};
use spool::{BackendChoice, BodyParts, Envelope, IdGenerator, Layout, SpoolWriter};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct RawArgs {
    /// Files (messages) per run.
    #[arg(long, default_value_t = 4096)]
    files: usize,
    /// Bytes per file.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Files per io_uring batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Concurrent submitters for spoold's writer.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Directory to write in (default: a temporary directory under ./target).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn one_at_a_time(dir: &Path, n: usize, data: &[u8]) -> Result<f64> {
    let d = File::open(dir)?;
    let t = Instant::now();
    for i in 0..n {
        let tmp = dir.join(format!("s{i}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(format!("s{i}")))?;
        d.sync_all()?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Linked write → fsync → rename per file in one submit per batch, then one directory fsync.
fn uring_batches(dir: &Path, n: usize, data: &[u8], batch: usize) -> Result<f64> {
    use io_uring::{opcode, squeue::Flags, types};
    let mut ring = io_uring::IoUring::new((batch * 4) as u32)?;
    let d = File::open(dir)?;
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let k = batch.min(n - done);
        let mut files = Vec::with_capacity(k);
        let mut names = Vec::with_capacity(k);
        for i in done..done + k {
            let tmp = dir.join(format!("b{i}.tmp"));
            files.push(File::create(&tmp)?);
            let from = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes())?;
            let to =
                std::ffi::CString::new(dir.join(format!("b{i}")).as_os_str().as_encoded_bytes())?;
            names.push((from, to));
        }
        for (f, (from, to)) in files.iter().zip(&names) {
            let fd = types::Fd(f.as_raw_fd());
            let entries = [
                opcode::Write::new(fd, data.as_ptr(), data.len() as u32)
                    .offset(0)
                    .build()
                    .flags(Flags::IO_LINK),
                opcode::Fsync::new(fd).build().flags(Flags::IO_LINK),
                opcode::RenameAt::new(
                    types::Fd(libc::AT_FDCWD),
                    from.as_ptr(),
                    types::Fd(libc::AT_FDCWD),
                    to.as_ptr(),
                )
                .build(),
            ];
            for e in entries {
                // SAFETY: buffers, fds and names outlive the wait below.
                unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("ring full"))?;
            }
        }
        ring.submit_and_wait(3 * k)?;
        for cqe in ring.completion() {
            anyhow::ensure!(cqe.result() >= 0, "io_uring op failed: {}", cqe.result());
        }
        d.sync_all()?;
        done += k;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn writer_rate(
    dir: &Path,
    n: usize,
    data: &[u8],
    backend: BackendChoice,
    sync: SyncMode,
    nameless: bool,
    submitters: usize,
) -> Result<f64> {
    let layout = Layout::new(dir);
    layout.create()?;
    let writer = Arc::new(SpoolWriter::start(
        layout,
        WriterOptions {
            backend,
            batch_max: 64,
            sync,
            nameless,
        },
        None,
    )?);
    let ids = Arc::new(IdGenerator::new("bench")?);
    let body = Bytes::copy_from_slice(data);
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..submitters {
            let (writer, ids, body) = (writer.clone(), ids.clone(), body.clone());
            s.spawn(move || {
                for _ in (k..n).step_by(submitters) {
                    let id = ids.next_id();
                    let env = envelope(&id, &body).encode();
                    writer
                        .commit_blocking(
                            id,
                            env,
                            BodyParts {
                                spilled: None,
                                chunks: vec![body.clone()],
                            },
                        )
                        .expect("commit");
                }
            });
        }
    });
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

pub fn envelope(id: &spool::MessageId, body: &[u8]) -> Envelope {
    Envelope::new(id.clone(), "bench@example.com", &["sink@example.org"], body)
}

/// A new scratch directory that stays until `keep` is dropped.
fn kept_scratch(
    dir: &Option<std::path::PathBuf>,
    keep: &mut Vec<tempfile::TempDir>,
) -> Result<std::path::PathBuf> {
    let d = crate::scratch_dir(dir.as_deref())?;
    let path = d.path().to_path_buf();
    keep.push(d);
    Ok(path)
}

pub fn run(a: RawArgs) -> Result<()> {
    let data = vec![b'x'; a.size];
    let writers = [
        (
            "spoold writer, io_uring, fsync, nameless (2 files/msg)",
            BackendChoice::Auto,
            SyncMode::PerFile,
            true,
        ),
        (
            "spoold writer, io_uring, fsync, tmp/+rename (2 files/msg)",
            BackendChoice::Auto,
            SyncMode::PerFile,
            false,
        ),
        (
            "spoold writer, portable, fsync, nameless (2 files/msg)",
            BackendChoice::Portable,
            SyncMode::PerFile,
            true,
        ),
        (
            "spoold writer, io_uring, syncfs, nameless (2 files/msg)",
            BackendChoice::Auto,
            SyncMode::FileSystem,
            true,
        ),
    ];
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("one at a time: write, fsync, rename, fsync dir", vec![]),
        (
            "io_uring batch: linked write→fsync→rename, 1 dir fsync",
            vec![],
        ),
    ];
    rows.extend(writers.iter().map(|w| (w.0, vec![])));
    let probe = crate::scratch_dir(a.dir.as_deref())?;
    let fs = describe_fs(probe.path());
    // Every scratch directory lives until the end: deleting thousands of files just before a
    // measurement slows the next one down (see `settle_after_deletions`).
    crate::settle_after_deletions();
    let mut keep = Vec::new();
    for _ in 0..a.runs {
        let d = kept_scratch(&a.dir, &mut keep)?;
        rows[0].1.push(one_at_a_time(&d, a.files.min(2048), &data)?);
        let d = kept_scratch(&a.dir, &mut keep)?;
        rows[1].1.push(uring_batches(&d, a.files, &data, a.batch)?);
        for (k, (_, backend, sync, nameless)) in writers.iter().enumerate() {
            let d = kept_scratch(&a.dir, &mut keep)?;
            rows[2 + k].1.push(writer_rate(
                &d,
                a.files,
                &data,
                *backend,
                *sync,
                *nameless,
                a.submitters,
            )?);
        }
    }
    println!(
        "spool-raw: {} files of {} B, batch {}, {} submitters, median of {} runs",
        a.files, a.size, a.batch, a.submitters, a.runs
    );
    println!("file system: {fs}");
    println!("{:<58} {:>12}", "method", "msgs/s");
    let raw = median(rows[1].1.clone());
    let ours = median(rows[2].1.clone());
    for (name, v) in rows {
        println!("{:<58} {:>12.0}", name, median(v));
    }
    println!(
        "raw io_uring batch limit / spoold io_uring writer = {:.2} (goal: <= 2)",
        raw / ours
    );
    crate::remove_scratch(keep);
    Ok(())
}

#[derive(clap::Args)]
pub struct RecoveryArgs {
    /// Messages in the spool.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Directory to build the spool in (default: under ./target).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

pub fn recovery(a: RecoveryArgs) -> Result<()> {
    let d = crate::scratch_dir(a.dir.as_deref())?;
    let layout = Layout::new(d.path().join("state"));
    layout.create()?;
    let t = Instant::now();
    writer_rate(
        layout.root(),
        a.messages,
        &vec![b'r'; a.size],
        BackendChoice::Auto,
        SyncMode::PerFile,
        true,
        64,
    )?;
    let filled = t.elapsed();
    // Drop the page cache's copy of the directory where allowed, for a colder figure.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
    let t = Instant::now();
    let report = spool::recovery::recover(&layout)?;
    let elapsed = t.elapsed();
    anyhow::ensure!(
        report.found.len() == a.messages,
        "recovered {} of {}",
        report.found.len(),
        a.messages
    );
    println!(
        "recovery: {} messages of {} B on {}",
        a.messages,
        a.size,
        describe_fs(layout.root())
    );
    println!("spool filled in {:.1} s", filled.as_secs_f64());
    println!(
        "recovery took {:.2} s ({:.0} msgs/s)",
        elapsed.as_secs_f64(),
        a.messages as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
