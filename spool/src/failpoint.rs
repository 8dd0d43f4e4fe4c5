//! Fault injection for tests: a way to build the bug a test exists to catch, so that the test is
//! seen to catch it, and to make the daemon fail in ways that cannot be caused from outside.
//!
//! Only debug builds (the ones the test suite runs) read `SPOOLD_FAILPOINT`; in a release build
//! every fail-point is `false` and compiled away. (The takeover steps' fail-points, which abort
//! the process, are the daemon's own and exist in every build.)

/// Whether `SPOOLD_FAILPOINT` names `point` (debug builds only).
pub fn active(point: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static SET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        SET.get_or_init(|| std::env::var("SPOOLD_FAILPOINT").ok())
            .as_deref()
            == Some(point)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = point;
        false
    }
}

/// `skip-spool-dir-fsync`: the writer links a round's files into `spool/` and acknowledges them
/// without syncing the directory, so a power cut forgets their names.
pub fn skip_spool_dir_fsync() -> bool {
    active("skip-spool-dir-fsync")
}
