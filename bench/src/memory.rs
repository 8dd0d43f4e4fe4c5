//! Keeps the guest's memory backed by its host for the length of a benchmark.
//!
//! A VM whose balloon device reports free pages (`virtio_balloon` with free page reporting, as
//! on the Firecracker VMs these figures come from) hands every block of memory the kernel frees
//! back to the host within seconds, and the host maps it again, a fault at a time, when the
//! guest next touches it. Writing into the page cache then costs a host fault per fresh 4 KiB
//! page: measured here, `dd` into the page cache ran at 445 MB/s on memory handed back and at
//! 4.6 GB/s on memory still backed, and 100 KiB messages spent about half of spoold's CPU in
//! that copy. A host whose memory is in use (any production gateway) never pays it, and how
//! much a run pays depends on what freed memory before it. So, when the kernel has free page
//! reporting and the benchmark runs as root, this turns reporting off for the run (the order
//! of pages reported is raised past the largest there is), touches the free memory once so the
//! host backs it, and restores the setting when the benchmark ends, also when it is stopped by
//! `SIGINT`, `SIGTERM` or `SIGHUP` (not by `SIGKILL`: then write the printed order back by hand).
//! `SPOOLPAIR_BENCH_NO_PREFAULT=1` leaves the machine as it is.
//!
//! Not a measurement: it prints what it did and how long it took.

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// The same path for the signal handler, which may not allocate.
const REPORTING_ORDER_C: &std::ffi::CStr =
    c"/sys/module/page_reporting/parameters/page_reporting_order";
/// Past the kernel's largest page order (10): no free block is ever that large.
const NEVER_REPORTED: &str = "11";
/// Memory left untouched, for everything else on the machine.
const HEADROOM_BYTES: u64 = 1 << 30;
const CHUNK_BYTES: usize = 64 << 20;

/// The reporting order to write back when the benchmark ends (−1: nothing to restore). An
/// atomic, so that the signal handler and the guard's drop restore it exactly once between them.
static ORDER_TO_RESTORE: AtomicI32 = AtomicI32::new(-1);

/// Restores free page reporting when dropped.
pub struct MemoryBacked;

impl Drop for MemoryBacked {
    fn drop(&mut self) {
        let order = ORDER_TO_RESTORE.swap(-1, Ordering::SeqCst);
        if order >= 0 && std::fs::write(REPORTING_ORDER, order.to_string()).is_ok() {
            eprintln!("memory: free page reporting restored (order {order})");
        }
    }
}

/// Turns free page reporting off and backs the free memory, where there is reporting to turn
/// off; see the module documentation.
pub fn keep_backed() -> MemoryBacked {
    if std::env::var_os("SPOOLPAIR_BENCH_NO_PREFAULT").is_some() {
        return MemoryBacked;
    }
    let Ok(order) = std::fs::read_to_string(REPORTING_ORDER) else {
        return MemoryBacked;
    };
    let order = order.trim();
    // An order that is not a small number is left as it is (and never written back).
    let Some(order) = order
        .parse::<i32>()
        .ok()
        .filter(|o| (0..100).contains(o) && order != NEVER_REPORTED)
    else {
        return MemoryBacked;
    };
    ORDER_TO_RESTORE.store(order, Ordering::SeqCst);
    restore_on_signals();
    if let Err(e) = std::fs::write(REPORTING_ORDER, NEVER_REPORTED) {
        ORDER_TO_RESTORE.store(-1, Ordering::SeqCst);
        eprintln!(
            "memory: this VM hands freed memory back to its host (free page reporting) and it could not be turned off ({e}): page-cache writes cost more than on a host whose memory is in use"
        );
        return MemoryBacked;
    }
    let started = Instant::now();
    let touched = touch_free_memory();
    eprintln!(
        "memory: free page reporting off for this run (order {order} restored at the end); {:.1} GiB of free memory touched once in {:.1} s, so that the page cache is written at a backed host's speed",
        touched as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    MemoryBacked
}

/// Has `SIGINT`, `SIGTERM` and `SIGHUP` write the saved order back before they end the process
/// as they would have.
fn restore_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only makes async-signal-safe calls (open, write, close, signal,
        // raise) and touches an atomic; the sigaction struct is zeroed, then filled.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = restore_then_die as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

extern "C" fn restore_then_die(sig: libc::c_int) {
    let order = ORDER_TO_RESTORE.swap(-1, Ordering::SeqCst);
    if order >= 0 {
        let mut buf = [0u8; 2];
        let text = order_text(order, &mut buf);
        // SAFETY: open, write and close are async-signal-safe; the path is a static C string
        // and `text` a valid slice.
        unsafe {
            let fd = libc::open(REPORTING_ORDER_C.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, text.as_ptr().cast(), text.len());
                libc::close(fd);
            }
        }
    }
    // SAFETY: back to the default disposition, then the signal again: the process ends the
    // way it would have without this handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// An order (0 to 99) as decimal digits, without allocating.
fn order_text(order: i32, buf: &mut [u8; 2]) -> &[u8] {
    let order = order.clamp(0, 99) as u8;
    if order < 10 {
        buf[0] = b'0' + order;
        &buf[..1]
    } else {
        buf[0] = b'0' + order / 10;
        buf[1] = b'0' + order % 10;
        &buf[..2]
    }
}

/// Touches every page of (free memory − headroom) once, in anonymous chunks released at the
/// end; returns the bytes touched.
fn touch_free_memory() -> u64 {
    let free = mem_free_bytes(Path::new("/proc/meminfo")).unwrap_or(0);
    let want = free.saturating_sub(HEADROOM_BYTES);
    let mut chunks = Vec::new();
    let mut touched = 0u64;
    while touched + CHUNK_BYTES as u64 <= want {
        // SAFETY: a private anonymous mapping of CHUNK_BYTES, written within its bounds and
        // unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break;
        }
        let bytes = p.cast::<u8>();
        for offset in (0..CHUNK_BYTES).step_by(4096) {
            // SAFETY: within the mapping.
            unsafe { bytes.add(offset).write_volatile(1) };
        }
        chunks.push(p);
        touched += CHUNK_BYTES as u64;
    }
    for p in chunks {
        // SAFETY: each was mapped above with this length.
        unsafe { libc::munmap(p, CHUNK_BYTES) };
    }
    touched
}

/// `MemFree` from a `/proc/meminfo`-shaped file, in bytes.
fn mem_free_bytes(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemFree:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_written_as_its_digits() {
        let mut buf = [0u8; 2];
        for (order, text) in [(0, "0"), (9, "9"), (10, "10"), (11, "11"), (99, "99")] {
            assert_eq!(
                order_text(order, &mut buf),
                text.as_bytes(),
                "order {order}"
            );
        }
    }

    #[test]
    fn mem_free_is_read_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        std::fs::write(
            &path,
            "MemTotal:       24683620 kB\nMemFree:        13409000 kB\nMemAvailable:   23549000 kB\n",
        )
        .unwrap();
        assert_eq!(mem_free_bytes(&path), Some(13_409_000 * 1024));
        std::fs::write(&path, "MemTotal: 1 kB\n").unwrap();
        assert_eq!(mem_free_bytes(&path), None);
    }
}
