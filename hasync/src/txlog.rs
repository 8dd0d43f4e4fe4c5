//! The replication transaction log in LMDB (`txlog/`): pending actions keyed by a sequence
//! number that only grows, the partner-side "last applied" mark, the persisted role, and the
//! ledger of delivered ids.
//!
//! `DELETE`s are written to LMDB, one durable transaction each (LMDB's commit fsyncs): a
//! message that left the spool leaves no trace but its `DELETE`, so that must survive a crash.
//! `ADD`s are kept in memory only. The spool itself is their durable record: an `ADD` is
//! appended in the writer's round, before the message's rename into `spool/` and that
//! folder's fsync, so a message the spool holds after a crash either had its `ADD` shipped and
//! acknowledged or is found again by [`TxLog::needs_rebuild`]'s pass at the next start (the
//! replicator asks the partner which of the messages held here it lacks and appends their
//! `ADD`s before it ships anything). This keeps two LMDB fsyncs out of every spool round.
//!
//! Sequence numbers are shared by both kinds and only grow across restarts: they are handed
//! out in memory from a block reserved durably in LMDB ([`SEQ_BLOCK`] at a time), and a
//! restart continues after the reserved block.
//!
//! Besides, in memory only: which logged `ADD`s are still being published by the spool writer
//! (their files may be in no folder yet).

use heed::byteorder::BE;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use spool::MessageId;
use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Sequence numbers reserved durably at a time; a restart skips what was left of the block.
pub const SEQ_BLOCK: u64 = 1 << 20;

/// What happened to a message on the active node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The message was spooled: copy it.
    Add,
    /// The message left the spool: remove the replica.
    Delete,
}

/// One logged action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    /// Its sequence number.
    pub seq: u64,
    /// Add or delete.
    pub kind: Kind,
    /// The message.
    pub id: MessageId,
    /// When it was logged, ms since the epoch (for the lag metric).
    pub logged_ms: u64,
}

/// Why the log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// LMDB failed.
    #[error("txlog: {0}")]
    Lmdb(#[from] heed::Error),
    /// The log holds more than its cap; nothing is dropped, new actions are refused.
    #[error("txlog is full ({0} pending actions); replication is not keeping up")]
    Full(u64),
    /// A record does not decode.
    #[error("txlog: corrupt record at seq {0}")]
    Corrupt(u64),
}

/// The log.
pub struct TxLog {
    env: Env<WithoutTls>,
    actions: Database<U64<BE>, Bytes>,
    meta: Database<Str, U64<BE>>,
    strings: Database<Str, Str>,
    ledger: Database<Str, U64<BE>>,
    pending_max: u64,
    /// Sequence allocation and the pending `ADD`s; also held across a `DELETE`'s commit, so
    /// actions become visible in sequence order (the sender never skips a gap).
    volatile: Mutex<Volatile>,
    /// Rebuilds asked for (the opening asks one) and the last asked one done: a request
    /// during a rebuild is not lost when that rebuild ends.
    rebuild_asked: AtomicU64,
    rebuild_done: AtomicU64,
}

/// The log's state that lives in memory.
struct Volatile {
    /// The next sequence number to hand out.
    next_seq: u64,
    /// Sequence numbers below this one are reserved durably.
    reserved: u64,
    /// Pending `ADD`s in sequence order: (seq, id, logged ms).
    adds: VecDeque<(u64, MessageId, u64)>,
    /// Pending `DELETE`s in LMDB, counted here so the cap needs no read of LMDB per round.
    logged: u64,
}

/// Before sequence numbers were reserved in blocks: the next one, stored by every commit.
const NEXT_SEQ: &str = "next_seq";
/// Every sequence number below this one may have been handed out.
const SEQ_RESERVED: &str = "seq_reserved";
const APPLIED: &str = "applied_seq";
const ROLE: &str = "role";

fn encode(kind: Kind, id: &MessageId, logged_ms: u64) -> Vec<u8> {
    let k = match kind {
        Kind::Add => 'A',
        Kind::Delete => 'D',
    };
    format!("{k} {logged_ms} {id}").into_bytes()
}

fn decode(seq: u64, b: &[u8]) -> Result<Action, LogError> {
    let s = std::str::from_utf8(b).map_err(|_| LogError::Corrupt(seq))?;
    let mut it = s.splitn(3, ' ');
    let kind = match it.next() {
        Some("A") => Kind::Add,
        Some("D") => Kind::Delete,
        _ => return Err(LogError::Corrupt(seq)),
    };
    let logged_ms = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or(LogError::Corrupt(seq))?;
    let id = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or(LogError::Corrupt(seq))?;
    Ok(Action {
        seq,
        kind,
        id,
        logged_ms,
    })
}

impl TxLog {
    /// Opens (creating) the log in `dir`, refusing new actions beyond `pending_max`.
    pub fn open(dir: &Path, pending_max: u64) -> Result<TxLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Lmdb(heed::Error::Io(e)))?;
        // SAFETY: the environment is opened once per process (spoold owns its state dir).
        // Reader slots held per transaction, not per thread that ever read (see the archive's
        // catalog: the blocking threads that read are many).
        let env = unsafe {
            EnvOpenOptions::new()
                .read_txn_without_tls()
                .max_readers(1024)
                .map_size(1 << 30)
                .max_dbs(8)
                .open(dir)?
        };
        let mut w = env.write_txn()?;
        let actions = env.create_database(&mut w, Some("actions"))?;
        let meta = env.create_database(&mut w, Some("meta"))?;
        let strings = env.create_database(&mut w, Some("strings"))?;
        let ledger = env.create_database(&mut w, Some("ledger"))?;
        let after_last = actions.last(&w)?.map_or(1, |(seq, _)| seq + 1);
        let logged = actions.len(&w)?;
        let next_seq = [
            meta.get(&w, NEXT_SEQ)?,
            meta.get(&w, SEQ_RESERVED)?,
            Some(after_last),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(1);
        w.commit()?;
        Ok(TxLog {
            env,
            actions,
            meta,
            strings,
            ledger,
            pending_max,
            volatile: Mutex::new(Volatile {
                next_seq,
                reserved: next_seq,
                adds: VecDeque::new(),
                logged,
            }),
            rebuild_asked: AtomicU64::new(1),
            rebuild_done: AtomicU64::new(0),
        })
    }

    fn volatile(&self) -> std::sync::MutexGuard<'_, Volatile> {
        self.volatile.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends actions; returns their sequence numbers. `DELETE`s are durable when this
    /// returns; `ADD`s are in memory (see the module doc).
    pub fn append(&self, items: &[(Kind, &MessageId)], now_ms: u64) -> Result<Vec<u64>, LogError> {
        let items: Vec<(Kind, &MessageId, u64)> =
            items.iter().map(|(k, id)| (*k, *id, now_ms)).collect();
        self.append_logged(&items)
    }

    /// [`TxLog::append`] with each action's own logged time.
    fn append_logged(&self, items: &[(Kind, &MessageId, u64)]) -> Result<Vec<u64>, LogError> {
        let mut v = self.volatile();
        let pending = v.logged + v.adds.len() as u64;
        if pending + items.len() as u64 > self.pending_max {
            return Err(LogError::Full(pending));
        }
        let first = v.next_seq;
        let end = first + items.len() as u64;
        let deletes = items.iter().filter(|(k, _, _)| *k == Kind::Delete).count() as u64;
        if deletes > 0 || end > v.reserved {
            let mut w = self.env.write_txn()?;
            for (seq, (kind, id, logged_ms)) in (first..).zip(items) {
                if *kind == Kind::Delete {
                    self.actions
                        .put(&mut w, &seq, &encode(*kind, id, *logged_ms))?;
                }
            }
            let reserved = if end > v.reserved {
                end + SEQ_BLOCK
            } else {
                v.reserved
            };
            self.meta.put(&mut w, SEQ_RESERVED, &reserved)?;
            w.commit()?;
            v.reserved = reserved;
            v.logged += deletes;
        }
        for (seq, (kind, id, logged_ms)) in (first..).zip(items) {
            if *kind == Kind::Add {
                v.adds.push_back((seq, (*id).clone(), *logged_ms));
            }
        }
        v.next_seq = end;
        Ok((first..end).collect())
    }

    /// Makes every sequence number handed out from now on greater than `seq`, the partner's
    /// applied mark: were this log lost or replaced, the sender would otherwise resume behind
    /// numbers the partner has already applied and ship nothing.
    pub fn advance_past(&self, seq: u64) {
        let mut v = self.volatile();
        if v.next_seq <= seq {
            tracing::warn!(
                partner_applied = seq,
                next = v.next_seq,
                "the partner has applied sequence numbers this log never handed out (log lost or replaced?): continuing after them"
            );
            v.next_seq = seq + 1;
        }
    }

    /// Whether `ADD`s may have been lost since the spool last matched the partner: true from
    /// the log's opening until [`TxLog::rebuilt`].
    pub fn needs_rebuild(&self) -> bool {
        self.rebuild_done.load(Ordering::SeqCst) < self.rebuild_asked.load(Ordering::SeqCst)
    }

    /// Asks for a rebuild (the sender starts a new session for it): after takeover recovery,
    /// whose moves and removals change what the partner should hold.
    pub fn request_rebuild(&self) {
        self.rebuild_asked.fetch_add(1, Ordering::SeqCst);
    }

    /// The rebuild a pass starting now answers, for [`TxLog::rebuilt`]: taken before the
    /// pass looks at the spool, so that a request arriving during the pass asks another.
    pub fn rebuild_asked(&self) -> u64 {
        self.rebuild_asked.load(Ordering::SeqCst)
    }

    /// Appends the `ADD`s of the messages found missing on the partner (logged at their
    /// arrival), except those with an `ADD` still pending above `after`, the sequence the
    /// partner resumes from (the sender ships those anyway), and marks the rebuilds asked up to
    /// `asked` ([`TxLog::rebuild_asked`] when the pass began) done. Returns the sequence
    /// numbers appended.
    pub fn rebuilt(
        &self,
        missing: &[MessageId],
        after: u64,
        asked: u64,
    ) -> Result<Vec<u64>, LogError> {
        let queued: HashSet<MessageId> = {
            let v = self.volatile();
            let start = v.adds.partition_point(|(seq, _, _)| *seq <= after);
            v.adds.range(start..).map(|(_, id, _)| id.clone()).collect()
        };
        let items: Vec<(Kind, &MessageId, u64)> = missing
            .iter()
            .filter(|id| !queued.contains(*id))
            .map(|id| (Kind::Add, id, id.arrival_micros() / 1000))
            .collect();
        let seqs = self.append_logged(&items)?;
        self.rebuild_done.fetch_max(asked, Ordering::SeqCst);
        Ok(seqs)
    }

    /// Up to `limit` pending actions with a sequence number above `after`, in order.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<Action>, LogError> {
        let v = self.volatile();
        let r = self.env.read_txn()?;
        let start = v.adds.partition_point(|(seq, _, _)| *seq <= after);
        let adds = v
            .adds
            .range(start..)
            .take(limit)
            .map(|(seq, id, logged_ms)| Action {
                seq: *seq,
                kind: Kind::Add,
                id: id.clone(),
                logged_ms: *logged_ms,
            });
        let mut out: Vec<Action> = adds.collect();
        for item in self.actions.range(&r, &(after + 1..))?.take(limit) {
            let (seq, b) = item?;
            out.push(decode(seq, b)?);
        }
        out.sort_unstable_by_key(|a| a.seq);
        out.truncate(limit);
        Ok(out)
    }

    /// Drops every action up to and including `seq`: the partner has them durably.
    pub fn acknowledge(&self, seq: u64) -> Result<usize, LogError> {
        let (acked_adds, logged) = {
            let mut v = self.volatile();
            let acked = v.adds.partition_point(|(s, _, _)| *s <= seq);
            v.adds.drain(..acked);
            (acked, v.logged)
        };
        if logged == 0 {
            return Ok(acked_adds);
        }
        let r = self.env.read_txn()?;
        let due = self
            .actions
            .first(&r)?
            .is_some_and(|(first, _)| first <= seq);
        drop(r);
        let mut acked_deletes = 0;
        if due {
            let mut w = self.env.write_txn()?;
            acked_deletes = self.actions.delete_range(&mut w, &(..=seq))?;
            w.commit()?;
            let mut v = self.volatile();
            v.logged = v.logged.saturating_sub(acked_deletes as u64);
        }
        Ok(acked_adds + acked_deletes)
    }

    /// Pending actions and the logged time of the oldest, ms since the epoch.
    pub fn depth(&self) -> Result<(u64, Option<u64>), LogError> {
        let v = self.volatile();
        let r = self.env.read_txn()?;
        let n = self.actions.len(&r)? + v.adds.len() as u64;
        let logged = match self.actions.first(&r)? {
            Some((seq, b)) => Some(decode(seq, b)?.logged_ms),
            None => None,
        };
        let added = v.adds.iter().map(|(_, _, ms)| *ms).min();
        Ok((n, logged.into_iter().chain(added).min()))
    }

    /// The highest sequence this node applied from its partner (receiver side).
    pub fn applied(&self) -> Result<u64, LogError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, APPLIED)?.unwrap_or(0))
    }

    /// Records the highest applied sequence durably (before it is acknowledged).
    pub fn set_applied(&self, seq: u64) -> Result<(), LogError> {
        let mut w = self.env.write_txn()?;
        self.meta.put(&mut w, APPLIED, &seq)?;
        w.commit()?;
        Ok(())
    }

    /// The persisted role, if one was set.
    pub fn role(&self) -> Result<Option<String>, LogError> {
        let r = self.env.read_txn()?;
        Ok(self.strings.get(&r, ROLE)?.map(str::to_string))
    }

    /// Persists the role.
    pub fn set_role(&self, role: &str) -> Result<(), LogError> {
        let mut w = self.env.write_txn()?;
        self.strings.put(&mut w, ROLE, role)?;
        w.commit()?;
        Ok(())
    }

    /// Records ids as delivered (for dedup at takeover recovery), dropping entries older than
    /// `retention_ms`.
    pub fn record_delivered(
        &self,
        ids: &[&MessageId],
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<(), LogError> {
        let mut w = self.env.write_txn()?;
        for id in ids {
            self.ledger.put(&mut w, &id.to_string(), &now_ms)?;
        }
        let cutoff = now_ms.saturating_sub(retention_ms);
        let old: Vec<String> = self
            .ledger
            .iter(&w)?
            .filter_map(|r| r.ok())
            .filter(|(_, t)| *t < cutoff)
            .map(|(k, _)| k.to_string())
            .take(1000)
            .collect();
        for k in old {
            self.ledger.delete(&mut w, &k)?;
        }
        w.commit()?;
        Ok(())
    }

    /// Every id in the delivered ledger.
    pub fn delivered(&self) -> Result<Vec<String>, LogError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.ledger.iter(&r)? {
            out.push(item?.0.to_string());
        }
        Ok(out)
    }

    /// Whether `id` is in the delivered ledger.
    pub fn was_delivered(&self, id: &MessageId) -> Result<bool, LogError> {
        let r = self.env.read_txn()?;
        Ok(self.ledger.get(&r, &id.to_string())?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_survive_reopen_adds_are_rebuilt_and_sequence_only_grows() {
        let dir = tempfile::tempdir().unwrap();
        let ids = spool::IdGenerator::new("a").unwrap();
        let (x, y, z, w) = (ids.next_id(), ids.next_id(), ids.next_id(), ids.next_id());
        {
            let log = TxLog::open(dir.path(), 100).unwrap();
            assert!(log.needs_rebuild());
            assert_eq!(
                log.append(&[(Kind::Add, &x), (Kind::Add, &y)], 5).unwrap(),
                vec![1, 2]
            );
            assert_eq!(log.append(&[(Kind::Delete, &x)], 6).unwrap(), vec![3]);
            assert_eq!(log.append(&[(Kind::Add, &z)], 7).unwrap(), vec![4]);
            let p = log.pending_after(0, 10).unwrap();
            let order: Vec<(u64, Kind)> = p.iter().map(|a| (a.seq, a.kind)).collect();
            assert_eq!(
                order,
                vec![
                    (1, Kind::Add),
                    (2, Kind::Add),
                    (3, Kind::Delete),
                    (4, Kind::Add)
                ],
                "ADDs in memory and DELETEs in LMDB come back merged in sequence order"
            );
            assert_eq!(log.pending_after(2, 1).unwrap()[0].kind, Kind::Delete);
            assert_eq!(log.depth().unwrap(), (4, Some(5)));
            assert_eq!(log.acknowledge(1).unwrap(), 1);
            assert_eq!(log.depth().unwrap(), (3, Some(5)));
            log.set_applied(42).unwrap();
            log.set_role("active").unwrap();
        }
        let log = TxLog::open(dir.path(), 100).unwrap();
        assert!(log.needs_rebuild(), "a start may have lost ADDs");
        let p = log.pending_after(0, 10).unwrap();
        assert_eq!(
            p,
            vec![Action {
                seq: 3,
                kind: Kind::Delete,
                id: x.clone(),
                logged_ms: 6
            }],
            "only the DELETE is durable"
        );
        let asked = log.rebuild_asked();
        let seqs = log.rebuilt(std::slice::from_ref(&y), 0, asked).unwrap();
        assert!(!log.needs_rebuild());
        let during = log.rebuild_asked();
        log.request_rebuild(); // while a pass that began at `during` runs
        log.rebuilt(&[], 0, during).unwrap();
        assert!(log.needs_rebuild(), "a request during a pass is not lost");
        log.rebuilt(&[], 0, log.rebuild_asked()).unwrap();
        assert!(!log.needs_rebuild());
        assert!(
            seqs[0] > 4,
            "a restart continues after every sequence handed out before it (got {})",
            seqs[0]
        );
        let rebuilt = &log.pending_after(3, 10).unwrap()[0];
        assert_eq!((rebuilt.kind, &rebuilt.id), (Kind::Add, &y));
        assert_eq!(
            rebuilt.logged_ms,
            y.arrival_micros() / 1000,
            "logged at arrival"
        );
        assert_eq!(
            log.append(&[(Kind::Add, &w)], 8).unwrap(),
            vec![seqs[0] + 1]
        );
        assert_eq!(
            log.rebuilt(&[y.clone(), w.clone(), z.clone()], seqs[0], asked)
                .unwrap(),
            vec![seqs[0] + 2, seqs[0] + 3],
            "w's ADD, pending above the partner's mark, is not appended twice; y's, at it, is"
        );
        assert_eq!(log.acknowledge(seqs[0] + 3).unwrap(), 5);
        assert_eq!(log.depth().unwrap(), (0, None));
        assert_eq!(log.applied().unwrap(), 42);
        assert_eq!(log.role().unwrap().as_deref(), Some("active"));
    }

    #[test]
    fn a_replaced_log_continues_after_the_partners_mark() {
        let dir = tempfile::tempdir().unwrap();
        let ids = spool::IdGenerator::new("a").unwrap();
        let log = TxLog::open(dir.path(), 10).unwrap();
        log.advance_past(0);
        assert_eq!(
            log.append(&[(Kind::Add, &ids.next_id())], 1).unwrap(),
            vec![1]
        );
        log.advance_past(5_000);
        assert_eq!(
            log.append(&[(Kind::Delete, &ids.next_id())], 1).unwrap(),
            vec![5_001]
        );
        drop(log);
        let log = TxLog::open(dir.path(), 10).unwrap();
        assert!(log.append(&[(Kind::Add, &ids.next_id())], 1).unwrap()[0] > 5_001);
    }

    #[test]
    fn sequence_reservation_is_renewed_before_it_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let ids = spool::IdGenerator::new("a").unwrap();
        let id = ids.next_id();
        let last = {
            let log = TxLog::open(dir.path(), SEQ_BLOCK * 4).unwrap();
            let batch: Vec<(Kind, &MessageId)> = vec![(Kind::Add, &id); 4096];
            let mut last = 0;
            for _ in 0..(SEQ_BLOCK / 4096 + 2) {
                last = *log.append(&batch, 1).unwrap().last().unwrap();
            }
            assert!(last > SEQ_BLOCK, "ran past the first block");
            last
        };
        let log = TxLog::open(dir.path(), 10).unwrap();
        assert!(log.append(&[(Kind::Add, &id)], 1).unwrap()[0] > last);
    }

    #[test]
    fn a_full_log_refuses_instead_of_dropping() {
        let dir = tempfile::tempdir().unwrap();
        let ids = spool::IdGenerator::new("a").unwrap();
        let log = TxLog::open(dir.path(), 2).unwrap();
        let (x, y, z) = (ids.next_id(), ids.next_id(), ids.next_id());
        log.append(&[(Kind::Add, &x), (Kind::Add, &y)], 1).unwrap();
        assert!(matches!(
            log.append(&[(Kind::Add, &z)], 1),
            Err(LogError::Full(2))
        ));
        assert_eq!(log.depth().unwrap().0, 2);
    }

    #[test]
    fn ledger_remembers_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let ids = spool::IdGenerator::new("a").unwrap();
        let log = TxLog::open(dir.path(), 10).unwrap();
        let (x, y) = (ids.next_id(), ids.next_id());
        log.record_delivered(&[&x], 1_000, 500).unwrap();
        assert!(log.was_delivered(&x).unwrap());
        log.record_delivered(&[&y], 2_000, 500).unwrap();
        assert!(
            !log.was_delivered(&x).unwrap(),
            "expired after the retention window"
        );
        assert!(log.was_delivered(&y).unwrap());
    }
}
