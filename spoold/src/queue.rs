//! The in-memory schedule of queued messages: which id is due when, and which are being worked
//! on. The disk is the truth (a restart rebuilds this from recovery); this is an index of it,
//! about 150 bytes per message.

use spool::MessageId;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

#[derive(Default)]
struct Schedule {
    due: BTreeSet<(u64, MessageId)>,
    when: HashMap<MessageId, u64>,
    in_flight: HashSet<MessageId>,
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
        if s.in_flight.contains(&id) || s.when.contains_key(&id) {
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

    /// When the next message is due, if any is waiting.
    pub fn next_due(&self) -> Option<u64> {
        self.lock().due.first().map(|(d, _)| *d)
    }

    /// Waiting plus in-flight messages.
    pub fn len(&self) -> usize {
        let s = self.lock();
        s.when.len() + s.in_flight.len()
    }

    /// Messages waiting for a retry (due in the future).
    pub fn deferred(&self, now_ms: u64) -> usize {
        self.lock().due.iter().filter(|(d, _)| *d > now_ms).count()
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
}
