//! The in-memory schedule of queued messages: which id is due when, and which are being worked
//! on. The disk is the truth (a restart rebuilds this from recovery); this is an index of it.
//! A message due at once (new mail, everything recovery found) costs an ordered set entry,
//! about 30 bytes; one due later about 150.

use spool::MessageId;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;

/// How long a parked message waits at most before it is looked at again anyway.
pub const PARK_FALLBACK_MS: u64 = 30_000;

#[derive(Default)]
struct Schedule {
    /// Due at once (scheduled at 0), in arrival order: most of a backlog. An ordered set of ids
    /// alone, because a restart after a crash may schedule a million of them.
    now: BTreeSet<MessageId>,
    /// Due at a time, by time; `when` has each one's time.
    later: BTreeSet<(u64, MessageId)>,
    when: HashMap<MessageId, u64>,
    in_flight: HashSet<MessageId>,
    /// Messages waiting for a connection slot of a busy next hop, oldest first per hop; an id
    /// no longer in `parked_at` (rescheduled or taken meanwhile) is skipped when popped. A
    /// parked message is also due at a fallback time ([`PARK_FALLBACK_MS`]), so a release
    /// that wakes a message which then no longer needs the slot cannot strand the others.
    parked: HashMap<Arc<str>, VecDeque<MessageId>>,
    parked_at: HashMap<MessageId, Arc<str>>,
}

impl Schedule {
    /// Schedules `id` at `due_ms`, replacing its earlier schedule.
    fn schedule(&mut self, id: MessageId, due_ms: u64) {
        self.unschedule(&id);
        if due_ms == 0 {
            self.now.insert(id);
        } else {
            self.when.insert(id.clone(), due_ms);
            self.later.insert((due_ms, id));
        }
    }

    /// Removes `id`'s schedule; whether it had one.
    fn unschedule(&mut self, id: &MessageId) -> bool {
        if self.now.remove(id) {
            return true;
        }
        match self.when.remove(id) {
            Some(due) => self.later.remove(&(due, id.clone())),
            None => false,
        }
    }

    fn is_scheduled(&self, id: &MessageId) -> bool {
        self.now.contains(id) || self.when.contains_key(id)
    }

    /// The next message due at `now_ms`: those due at once first, then by time.
    fn pop_due(&mut self, now_ms: u64) -> Option<MessageId> {
        if let Some(id) = self.now.pop_first() {
            return Some(id);
        }
        let (due, _) = self.later.first()?;
        if *due > now_ms {
            return None;
        }
        let (_, id) = self.later.pop_first()?;
        self.when.remove(&id);
        Some(id)
    }
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

    /// Schedules `id` at `due_ms` (0: at once; replacing an earlier schedule). Ignored while in
    /// flight: the worker reschedules it when done.
    pub fn add(&self, id: MessageId, due_ms: u64) {
        self.add_all([id], due_ms);
    }

    /// Schedules many ids at `due_ms`, each as [`Queue::add`] would, under one lock.
    pub fn add_all(&self, ids: impl IntoIterator<Item = MessageId>, due_ms: u64) {
        let mut s = self.lock();
        if due_ms == 0 && s.now.is_empty() && s.when.is_empty() && s.in_flight.is_empty() {
            // Recovery's case, a million ids into an empty schedule: built in bulk, the set's
            // nodes are full (inserted one by one in order, they are half full).
            s.now = ids.into_iter().collect();
        } else {
            for id in ids {
                if s.in_flight.contains(&id) {
                    continue;
                }
                s.parked_at.remove(&id);
                s.schedule(id, due_ms);
            }
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Schedules `id` at `due_ms` unless it is scheduled or in flight already.
    pub fn ensure(&self, id: MessageId, due_ms: u64) {
        let mut s = self.lock();
        if s.in_flight.contains(&id) || s.is_scheduled(&id) || s.parked_at.contains_key(&id) {
            return;
        }
        s.schedule(id, due_ms);
        drop(s);
        self.wake.notify_one();
    }

    /// Takes up to `max` messages due at `now_ms`, marking them in flight.
    pub fn take_due(&self, now_ms: u64, max: usize) -> Vec<MessageId> {
        let mut s = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = s.pop_due(now_ms) else { break };
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
            s.schedule(id.clone(), due);
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
        s.schedule(id.clone(), due);
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
            s.schedule(id, 0);
            drop(s);
            self.wake.notify_one();
            return;
        }
    }

    /// Forgets `id` (its files are gone), unless it is in flight: its worker finds it gone.
    pub fn forget(&self, id: &MessageId) {
        let mut s = self.lock();
        s.unschedule(id);
        s.parked_at.remove(id);
    }

    /// When the next message is due, if any is waiting.
    pub fn next_due(&self) -> Option<u64> {
        let s = self.lock();
        if s.now.is_empty() {
            s.later.first().map(|(d, _)| *d)
        } else {
            Some(0)
        }
    }

    /// Waiting plus in-flight messages.
    pub fn len(&self) -> usize {
        let s = self.lock();
        s.now.len() + s.when.len() + s.in_flight.len()
    }

    /// Messages waiting for a retry (due in the future, not parked for a busy next hop).
    pub fn deferred(&self, now_ms: u64) -> usize {
        let s = self.lock();
        s.later
            .iter()
            .filter(|(d, id)| *d > now_ms && !s.parked_at.contains_key(id))
            .count()
    }

    /// Arrival time (µs since the epoch) of the oldest message known, from its id.
    pub fn oldest_arrival_micros(&self) -> Option<u64> {
        let s = self.lock();
        // Ordered by stamp first, so the first of `now` is its oldest.
        s.now
            .first()
            .into_iter()
            .chain(s.when.keys())
            .chain(s.in_flight.iter())
            .map(MessageId::arrival_micros)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts live heap bytes per thread (tests run side by side), to measure the queue's
    /// cost per message.
    struct Counting;
    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }
    fn live() -> isize {
        LIVE.with(Cell::get)
    }
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let _ = LIVE.try_with(|c| c.set(c.get() + l.size() as isize));
            // SAFETY: forwarded to the system allocator with the caller's layout.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            let _ = LIVE.try_with(|c| c.set(c.get() - l.size() as isize));
            // SAFETY: `p` came from `alloc` above with this layout.
            unsafe { System.dealloc(p, l) }
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Heap bytes `f` leaves allocated on this thread.
    fn heap_growth(f: impl FnOnce()) -> isize {
        let before = live();
        f();
        live() - before
    }

    #[test]
    fn a_queued_message_costs_a_few_hundred_bytes() {
        let ids = spool::IdGenerator::new("gw_a").unwrap();
        let batch: Vec<MessageId> = (0..100_000).map(|_| ids.next_id()).collect();
        let q = Queue::default();
        let per_message = heap_growth(|| {
            for (i, id) in batch.iter().enumerate() {
                q.add(id.clone(), i as u64);
            }
        }) / 100_000;
        eprintln!("queue: {per_message} bytes per message");
        assert!(per_message < 300, "{per_message} bytes per queued message");
    }

    #[test]
    fn a_recovered_backlog_costs_about_thirty_bytes_a_message() {
        let ids = spool::IdGenerator::new("gw_a").unwrap();
        let batch: Vec<MessageId> = (0..100_000).map(|_| ids.next_id()).collect();
        let q = Queue::default();
        let per_message = heap_growth(|| q.add_all(batch.iter().cloned(), 0)) / 100_000;
        eprintln!("queue: {per_message} bytes per recovered message");
        assert!(
            per_message <= 32,
            "{per_message} bytes per recovered message"
        );
        assert_eq!(q.len(), 100_000);
        assert_eq!(q.take_due(0, 3), batch[..3].to_vec(), "arrival order");
        // New mail after the backlog, one by one.
        let more: Vec<MessageId> = (0..100_000).map(|_| ids.next_id()).collect();
        let per_message = heap_growth(|| {
            for id in &more {
                q.add(id.clone(), 0);
            }
        }) / 100_000;
        eprintln!("queue: {per_message} bytes per new message due at once");
        assert!(per_message <= 64, "{per_message} bytes per new message");
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
