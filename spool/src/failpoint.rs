//! Fault injection for the power-cut harness: a way to build the bug a test exists to catch,
//! so that the test is seen to catch it.
//!
//! Only debug builds (the ones the test suite runs) read `SPOOLD_FAILPOINT`; in a release build
//! every fail-point is `false` and compiled away.

/// `SPOOLD_FAILPOINT=skip-spool-dir-fsync`: the writer links a round's files into `spool/` and
/// acknowledges them without syncing the directory, so a power cut forgets their names.
pub fn skip_spool_dir_fsync() -> bool {
    #[cfg(debug_assertions)]
    {
        static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SET.get_or_init(|| {
            std::env::var("SPOOLD_FAILPOINT").is_ok_and(|v| v == "skip-spool-dir-fsync")
        })
    }
    #[cfg(not(debug_assertions))]
    {
        false
    }
}
