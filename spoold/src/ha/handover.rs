//! Role changes as a handover, so that a planned switchover or takeback delivers nothing twice.
//!
//! A unit turning passive first becomes `leaving`: SMTP sessions get `421` at their next
//! command, delivery takes no new work and starts no new transaction, and the replication
//! sender keeps running. The unit waits until the work in flight has ended (an attempt already
//! past its check either completes and is recorded, or was never started) and until the
//! partner has acknowledged every action it logged (its last `ADD`s and `DELETE`s), and only
//! then reports itself passive. A unit turning active delivers only once it has heard its
//! partner passive (or not heard it at all for [`hasync::PARTNER_GRACE`]): see
//! [`hasync::Replicator::partner_released`].
//!
//! It is not: the decision of who is active (an operator or a cluster manager makes it).

use hasync::proto::Role;
use hasync::Replicator;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for each phase of a handover (work in flight, then shipping). Past it the unit
/// turns passive anyway and says what it left behind.
const HANDOVER_MAX: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

/// Work in flight that a handover waits for.
#[derive(Default)]
pub struct Activity {
    deliveries: AtomicUsize,
    transactions: AtomicUsize,
}

/// Counts one unit of work for as long as it lives.
pub struct InFlight(Arc<Activity>, fn(&Activity) -> &AtomicUsize);

impl Drop for InFlight {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn count(self: &Arc<Self>, counter: fn(&Activity) -> &AtomicUsize) -> InFlight {
        counter(self).fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone(), counter)
    }

    /// One message being processed by the queue manager (scan or delivery).
    pub fn delivery(self: &Arc<Self>) -> InFlight {
        self.count(|a| &a.deliveries)
    }

    /// One SMTP transaction between the end of its data and its reply.
    pub fn transaction(self: &Arc<Self>) -> InFlight {
        self.count(|a| &a.transactions)
    }

    fn idle(&self) -> bool {
        self.deliveries.load(Ordering::SeqCst) == 0 && self.transactions.load(Ordering::SeqCst) == 0
    }
}

/// Whether this unit may start a delivery transaction now: standalone, or active with its
/// partner released and not standing down in a split brain. Checked before each transaction,
/// not only when work is taken. Cheap: no I/O.
pub fn may_deliver(ha: Option<&Arc<Replicator>>) -> bool {
    ha.is_none_or(|r| r.role() == Role::Active && r.partner_released() && !r.stand_down())
}

/// Sets the role, as a handover when turning passive. Blocks (run it off the async threads)
/// until the unit is passive, at most about twice [`HANDOVER_MAX`].
pub fn set_role(r: &Replicator, activity: &Activity, role: Role) -> Result<Value, String> {
    if role != Role::Passive || r.role() == Role::Passive {
        r.set_role(role).map_err(|e| e.to_string())?;
        tracing::warn!(role = role.as_str(), "role changed by spoolctl");
        return Ok(json!({ "role": role.as_str() }));
    }
    r.set_role(Role::Leaving).map_err(|e| e.to_string())?;
    tracing::warn!(
        "turning passive: handing over (no new mail, no new deliveries, shipping the last actions)"
    );
    let started = Instant::now();
    let cancelled = || r.role() != Role::Leaving;
    let in_flight_ended = wait(HANDOVER_MAX, || activity.idle() || cancelled());
    let mut link_down_since: Option<Instant> = None;
    wait(HANDOVER_MAX, || {
        if cancelled() || r.drained().unwrap_or(false) {
            return true;
        }
        // A partner that cannot be reached gets the rest after the next start as active, or
        // through takeover recovery.
        if r.link_is_up() {
            link_down_since = None;
            false
        } else {
            link_down_since.get_or_insert_with(Instant::now).elapsed() >= hasync::PARTNER_GRACE
        }
    });
    let shipped = r.drained().unwrap_or(false);
    if cancelled() {
        return Err(format!(
            "handover cancelled: the role changed to {} meanwhile",
            r.role().as_str()
        ));
    }
    let unshipped = r.log().depth().map(|(n, _)| n).unwrap_or(0);
    r.set_role(Role::Passive).map_err(|e| e.to_string())?;
    let ms = started.elapsed().as_millis() as u64;
    if shipped && in_flight_ended {
        tracing::warn!(
            handover_ms = ms,
            "role changed by spoolctl: passive, everything handed over"
        );
    } else {
        tracing::error!(
            handover_ms = ms,
            in_flight_ended,
            unshipped,
            "role changed by spoolctl: passive, but the handover is incomplete; run `spoolctl recover` on the partner"
        );
    }
    Ok(json!({
        "role": "passive",
        "handover_ms": ms,
        "complete": shipped && in_flight_ended,
        "unshipped_actions": if shipped { 0 } else { unshipped },
    }))
}

/// Polls `done` until it holds or `max` passes; returns whether it held.
fn wait(max: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + max;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(POLL);
    }
}
