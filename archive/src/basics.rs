//! Leaf helpers the archive's modules share: hex text and the wall clock. It uses nothing of
//! the crate, so any module may use it without a cycle.

pub use evidence::hex;

/// Milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
