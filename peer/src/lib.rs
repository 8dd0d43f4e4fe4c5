//! `peer`: the authenticated link between the units of an HA pair and between archive mirrors
//! and between cluster members, shared by every service that talks to a peer.
//!
//! It is: the TLS 1.3 link on which both sides prove the shared secret with an HMAC over the TLS
//! exporter ([`link`]), the frame codec and batched writes ([`proto`], [`link::FrameBatch`]), the
//! [`proto::Channel`] each connection declares in its `Hello` (replication, recovery requests,
//! the archive mirror, the cluster channel), self-signed link identities
//! ([`link::LinkConfig::self_signed`]: the secret authenticates), and the timing every service
//! uses: [`HEARTBEAT`], [`SILENCE_MAX`] with [`within`], and reconnection with [`Backoff`].
//!
//! It is not: what flows on a channel (replication lives in `hasync`), nor who is active.

pub mod link;
pub mod proto;

use std::future::Future;
use std::time::Duration;

pub use link::{LinkConfig, LinkError};
pub use proto::{Channel, Frame, Role};

/// Heartbeat period on every link.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A link on which nothing arrived for this long (a frozen peer, a black-holed network) is
/// dropped and reconnected; a write that takes this long fails the same way.
pub const SILENCE_MAX: Duration = Duration::from_secs(3);

/// Runs a write on a link, failing it when it takes `max` (a peer that stopped reading).
pub async fn within<T>(
    max: Duration,
    write: impl Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(max, write).await {
        Ok(r) => r,
        Err(_) => Err(LinkError::Protocol(format!("write blocked for {max:?}"))),
    }
}

/// Reconnection delays: from 100 ms, doubling, capped at 1 s; back to the start after a
/// session that worked.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// First delay.
    pub const MIN: Duration = Duration::from_millis(100);
    /// Longest delay.
    pub const MAX: Duration = Duration::from_secs(1);

    /// A fresh backoff.
    pub fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }

    /// The delay before the next attempt (each call doubles the following one).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    /// A session worked: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Backoff::MIN);
    }
}
