//! The in-memory schedule of queued messages: which id is due when, and which are being worked
//! on. The disk is the truth (a restart rebuilds this from recovery); this is an index of it,
//! about 150 bytes per message.

use spool::MessageId;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;

/// How long a parked message waits at most before it is looked at again anyway.
pub const PARK_FALLBACK_MS: u64 = 30_000;

#[derive(Default)]
struct Schedule {
    due: BTreeSet<(u64, MessageId)>,
    when: HashMap<MessageId, u64>,
    in_flight: HashSet<MessageId>,
    /// Messages waiting for a connection slot of a busy next hop, oldest first per hop; an id
    /// no longer in `parked_at` (rescheduled or taken meanwhile) is skipped when popped. A
    /// parked message is also due at a fallback time ([`PARK_FALLBACK_MS`]), so a release
    /// that wakes a message which then no longer needs the slot cannot strand the others.
    parked: HashMap<Arc<str>, VecDeque<MessageId>>,
    parked_at: HashMap<MessageId, Arc<str>>,
}

/// Messages waiting for their next step.
#[derive(Default)]
pub struct Queue {
    inner: Mutex<Schedule>,
    /// Woken when a message is added that may be due now.
    pub wake: tokio::sync::Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Schedules `id` at `due_ms` (replacing an earlier schedule). Ignored while in flight: the
    /// worker reschedules it when done.
    pub fn add(&self, id: MessageId, due_ms: u64) {
        let mut s = self.lock();
        if s.in_flight.contains(&id) {
            return;
        }
        s.parked_at.remove(&id);
        if let Some(old) = s.when.insert(id.clone(), due_ms) {
            s.due.remove(&(old, id.clone()));
        }
        s.due.insert((due_ms, id));
        drop(s);
        self.wake.notify_one();
    }

    /// Schedules `id` at `due_ms` unless it is scheduled or in flight already.
    pub fn ensure(&self, id: MessageId, due_ms: u64) {
        let mut s = self.lock();
        if s.in_flight.contains(&id) || s.when.contains_key(&id) || s.parked_at.contains_key(&id) {
            return;
        }
        s.when.insert(id.clone(), due_ms);
        s.due.insert((due_ms, id));
        drop(s);
        self.wake.notify_one();
    }

    /// Takes up to `max` messages due at `now_ms`, marking them in flight.
    pub fn take_due(&self, now_ms: u64, max: usize) -> Vec<MessageId> {
        let mut s = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let Some((due, _)) = s.due.first() else { break };
            if *due > now_ms {
                break;
            }
            let Some((_, id)) = s.due.pop_first() else {
                break;
            };
            s.when.remove(&id);
            s.parked_at.remove(&id);
            s.in_flight.insert(id.clone());
            out.push(id);
        }
        out
    }

    /// Ends the work on `id`: reschedules it at `next_ms`, or forgets it (`None`: delivered,
    /// bounced, quarantined or gone).
    pub fn finish(&self, id: &MessageId, next_ms: Option<u64>) {
        let mut s = self.lock();
        s.in_flight.remove(id);
        if let Some(due) = next_ms {
            s.when.insert(id.clone(), due);
            s.due.insert((due, id.clone()));
        }
    }

    /// Ends the work on `id`, which waits for a connection slot of `hop`: it is due again
    /// when [`Queue::unpark_one`] is called for `hop` (or at `now_ms` + [`PARK_FALLBACK_MS`]),
    /// unless `slot_free` says a slot is free by now. `slot_free` is asked under the queue's
    /// lock, and a slot is given back before its `unpark_one`, so no release is missed between
    /// the attempt and the parking.
    pub fn finish_parked(
        &self,
        id: &MessageId,
        hop: &str,
        now_ms: u64,
        slot_free: impl FnOnce() -> bool,
    ) {
        let mut s = self.lock();
        s.in_flight.remove(id);
        let due = if slot_free() {
            0
        } else {
            let key: Arc<str> = match s.parked.get_key_value(hop) {
                Some((k, _)) => k.clone(),
                None => Arc::from(hop),
            };
            s.parked
                .entry(key.clone())
                .or_default()
                .push_back(id.clone());
            s.parked_at.insert(id.clone(), key);
            now_ms + PARK_FALLBACK_MS
        };
        s.when.insert(id.clone(), due);
        s.due.insert((due, id.clone()));
        drop(s);
        if due == 0 {
            self.wake.notify_one();
        }
    }

    /// A connection slot of `hop` was given back: the oldest message parked for it is due now.
    pub fn unpark_one(&self, hop: &str) {
        let mut s = self.lock();
        loop {
            let Some(waiting) = s.parked.get_mut(hop) else {
                return;
            };
            let popped = waiting.pop_front();
            if waiting.is_empty() {
                s.parked.remove(hop);
            }
            let Some(id) = popped else { return };
            if s.parked_at.remove(&id).is_none() {
                continue; // rescheduled or taken since it parked
            }
            if let Some(old) = s.when.insert(id.clone(), 0) {
                s.due.remove(&(old, id.clone()));
            }
            s.due.insert((0, id));
            drop(s);
            self.wake.notify_one();
            return;
        }
    }

    /// Forgets `id` (its files are gone), unless it is in flight: its worker finds it gone.
    pub fn forget(&self, id: &MessageId) {
        let mut s = self.lock();
        if let Some(due) = s.when.remove(id) {
            s.due.remove(&(due, id.clone()));
        }
        s.parked_at.remove(id);
    }

    /// When the next message is due, if any is waiting.
    pub fn next_due(&self) -> Option<u64> {
        self.lock().due.first().map(|(d, _)| *d)
    }

    /// Waiting plus in-flight messages.
    pub fn len(&self) -> usize {
        let s = self.lock();
        s.when.len() + s.in_flight.len()
    }

    /// Messages waiting for a retry (due in the future, not parked for a busy next hop).
    pub fn deferred(&self, now_ms: u64) -> usize {
        let s = self.lock();
        s.due
            .iter()
            .filter(|(d, id)| *d > now_ms && !s.parked_at.contains_key(id))
            .count()
    }

    /// Arrival time (µs since the epoch) of the oldest message known, from its id.
    pub fn oldest_arrival_micros(&self) -> Option<u64> {
        let s = self.lock();
        s.when
            .keys()
            .chain(s.in_flight.iter())
            .map(MessageId::arrival_micros)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicIsize, Ordering};

    /// Counts live heap bytes of this test binary, to measure the queue's cost per message.
    struct Counting;
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            LIVE.fetch_add(l.size() as isize, Ordering::SeqCst);
            // SAFETY: forwarded to the system allocator with the caller's layout.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            LIVE.fetch_sub(l.size() as isize, Ordering::SeqCst);
            // SAFETY: `p` came from `alloc` above with this layout.
            unsafe { System.dealloc(p, l) }
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    #[test]
    fn a_queued_message_costs_a_few_hundred_bytes() {
        let ids = spool::IdGenerator::new("gw_a").unwrap();
        let batch: Vec<MessageId> = (0..100_000).map(|_| ids.next_id()).collect();
        let q = Queue::default();
        let before = LIVE.load(Ordering::SeqCst);
        for (i, id) in batch.iter().enumerate() {
            q.add(id.clone(), i as u64);
        }
        let per_message = (LIVE.load(Ordering::SeqCst) - before) / 100_000;
        eprintln!("queue: {per_message} bytes per message");
        assert!(per_message < 300, "{per_message} bytes per queued message");
    }

    #[test]
    fn due_order_in_flight_and_reschedule() {
        let ids = spool::IdGenerator::new("q").unwrap();
        let (a, b, c) = (ids.next_id(), ids.next_id(), ids.next_id());
        let q = Queue::default();
        q.add(a.clone(), 100);
        q.add(b.clone(), 50);
        q.add(c.clone(), 500);
        assert_eq!(q.take_due(200, 10), vec![b.clone(), a.clone()]);
        assert_eq!(q.len(), 3);
        q.add(a.clone(), 0); // in flight: ignored
        assert_eq!(q.take_due(200, 10), Vec::<MessageId>::new());
        q.finish(&a, Some(300));
        q.finish(&b, None);
        assert_eq!(q.next_due(), Some(300));
        assert_eq!(q.take_due(1000, 1), vec![a.clone()]);
        assert_eq!(q.deferred(0), 1);
        assert_eq!(q.oldest_arrival_micros(), Some(a.arrival_micros()));
    }

    #[test]
    fn parked_messages_wait_for_their_hop_and_a_release_is_never_missed() {
        let ids = spool::IdGenerator::new("q").unwrap();
        let (a, b, c) = (ids.next_id(), ids.next_id(), ids.next_id());
        let q = Queue::default();
        for id in [&a, &b, &c] {
            q.add(id.clone(), 0);
        }
        assert_eq!(q.take_due(10, 3).len(), 3);
        q.finish_parked(&a, "slow:25", 10, || false);
        q.finish_parked(&b, "slow:25", 10, || false);
        // A slot freed before the parking is seen, not missed.
        q.finish_parked(&c, "slow:25", 10, || true);
        assert_eq!(q.take_due(10, 10), vec![c.clone()], "only c is due");
        assert_eq!(q.len(), 3, "parked messages are still queued");
        q.unpark_one("fast:25");
        assert_eq!(q.take_due(10, 10), Vec::<MessageId>::new());
        q.unpark_one("slow:25");
        assert_eq!(q.take_due(10, 10), vec![a.clone()], "oldest first");
        // Rescheduled while parked: not unparked a second time.
        q.add(b.clone(), 5000);
        q.unpark_one("slow:25");
        assert_eq!(q.take_due(10, 10), Vec::<MessageId>::new());
        assert_eq!(q.take_due(6000, 10), vec![b.clone()]);
        // A parked message whose wake-up went elsewhere is due at the fallback anyway.
        q.finish_parked(&c, "slow:25", 10, || false);
        assert_eq!(q.deferred(20), 0, "parked is not deferred");
        assert_eq!(q.take_due(10 + PARK_FALLBACK_MS, 10), vec![c.clone()]);
        q.finish_parked(&c, "slow:25", 10, || false);
        q.forget(&c);
        assert_eq!(q.len(), 2, "a and b in flight, c forgotten");
    }
}
