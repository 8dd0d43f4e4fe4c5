//! How the spool's writes are made durable on this machine: `spool.sync = auto` resolved
//! against the file system the state directory is on.
//!
//! It is not: the writer (`spool`), which takes the resolved mode.

use crate::config;
use spool::{Folder, Layout};

/// Resolves `spool.sync`. `auto` picks `syncfs` only when the state directory is the root of a
/// file system that holds all of its folders: then one `syncfs` per round flushes nothing but
/// the spool's own writes.
pub fn sync_mode(setting: config::SyncSetting, layout: &Layout) -> spool::writer::SyncMode {
    use spool::writer::SyncMode;
    use std::os::unix::fs::MetadataExt;
    match setting {
        config::SyncSetting::Fsync => SyncMode::PerFile,
        config::SyncSetting::Syncfs => SyncMode::FileSystem,
        config::SyncSetting::Auto => {
            let device = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.dev()).ok();
            let root = layout.root();
            let own = device(root);
            let parent = root
                .canonicalize()
                .ok()
                .and_then(|r| r.parent().map(|p| p.to_path_buf()))
                .and_then(|p| device(&p));
            let folders_inside = Folder::ALL.iter().all(|f| device(&layout.dir(*f)) == own);
            let dedicated = own.is_some() && own != parent && folders_inside;
            let (mode, why) = if is_fuse(root) {
                (
                    SyncMode::PerFile,
                    "fsync per file, syncfs(2) does not reach a FUSE file system",
                )
            } else if dedicated {
                (
                    SyncMode::FileSystem,
                    "syncfs, the state directory is the root of its own file system",
                )
            } else {
                (
                    SyncMode::PerFile,
                    "fsync per file, the state directory shares its file system",
                )
            };
            tracing::info!(dedicated, "spool.sync = auto: {why}");
            mode
        }
    }
}

/// Whether `path` is on a FUSE file system (statfs magic), where `syncfs(2)` makes nothing
/// durable: it is not passed to the FUSE server.
fn is_fuse(path: &std::path::Path) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == FUSE_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool::writer::SyncMode;

    /// `auto` syncs per file in a directory that shares its file system, and per file system
    /// at the root of a file system of its own (a tmpfs mounted for the test; needs root).
    #[test]
    fn auto_sync_picks_syncfs_only_on_a_dedicated_file_system() {
        let shared = tempfile::tempdir().unwrap();
        let layout = Layout::new(shared.path().join("state"));
        layout.create().unwrap();
        assert_eq!(
            sync_mode(config::SyncSetting::Auto, &layout),
            SyncMode::PerFile
        );
        assert_eq!(
            sync_mode(config::SyncSetting::Syncfs, &layout),
            SyncMode::FileSystem
        );

        let mount_point = shared.path().join("dedicated");
        std::fs::create_dir(&mount_point).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&mount_point)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        // The dedicated case needs root (CI runs as root); like every test here, it fails
        // rather than passing untested.
        assert!(
            mounted,
            "the dedicated case needs to mount a tmpfs (root; scripts/test runs as root in CI)"
        );
        let dedicated = Layout::new(&mount_point);
        dedicated.create().unwrap();
        let mode = sync_mode(config::SyncSetting::Auto, &dedicated);
        let _ = std::process::Command::new("umount")
            .arg(&mount_point)
            .status();
        assert_eq!(mode, SyncMode::FileSystem);
    }
}
