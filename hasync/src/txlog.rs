//! The replication transaction log in LMDB (`txlog/`): pending actions keyed by a sequence
//! number that only grows, the partner-side "last applied" mark, the persisted role, and the
//! ledger of delivered ids.
//!
//! Each write is one LMDB transaction; LMDB's commit is durable (it fsyncs), so an action that
//! `append` returned survives a crash. Besides, in memory only: which logged `ADD`s are still
//! being published by the spool writer (their files may be in no folder yet).

use heed::byteorder::BE;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvOpenOptions};
use spool::MessageId;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

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
    env: Env,
    actions: Database<U64<BE>, Bytes>,
    meta: Database<Str, U64<BE>>,
    strings: Database<Str, Str>,
    ledger: Database<Str, U64<BE>>,
    pending_max: u64,
    publishing: Mutex<HashSet<MessageId>>,
    outbox: crate::outbox::Outbox,
}

const NEXT_SEQ: &str = "next_seq";
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
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(1 << 30)
                .max_dbs(8)
                .open(dir)?
        };
        let mut w = env.write_txn()?;
        let actions = env.create_database(&mut w, Some("actions"))?;
        let meta = env.create_database(&mut w, Some("meta"))?;
        let strings = env.create_database(&mut w, Some("strings"))?;
        let ledger = env.create_database(&mut w, Some("ledger"))?;
        w.commit()?;
        Ok(TxLog {
            env,
            actions,
            meta,
            strings,
            ledger,
            pending_max,
            publishing: Mutex::new(HashSet::new()),
            outbox: crate::outbox::Outbox::new(crate::outbox::OUTBOX_BYTES_DEFAULT),
        })
    }

    /// Marks ids whose `ADD` is about to be logged while their files are not yet in `spool/`:
    /// the sender waits for them instead of taking them for gone.
    pub fn mark_publishing(&self, ids: &[&MessageId]) {
        let mut set = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        set.extend(ids.iter().map(|id| (*id).clone()));
    }

    /// The ids are published (or failed and gone).
    pub fn mark_published(&self, ids: &[&MessageId]) {
        let mut set = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            set.remove(*id);
        }
    }

    /// Bounds the outbox at `max_bytes` (0: hold nothing; the sender reads the files).
    pub fn with_outbox_bytes(mut self, max_bytes: usize) -> TxLog {
        self.outbox = crate::outbox::Outbox::new(max_bytes);
        self
    }

    /// Contents of published messages the sender has not sent yet, held in memory.
    pub fn outbox(&self) -> &crate::outbox::Outbox {
        &self.outbox
    }

    /// Whether the spool writer is still publishing `id`.
    pub fn is_publishing(&self, id: &MessageId) -> bool {
        let set = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        set.contains(id)
    }

    /// Appends actions in one durable transaction; returns their sequence numbers.
    pub fn append(&self, items: &[(Kind, &MessageId)], now_ms: u64) -> Result<Vec<u64>, LogError> {
        let mut w = self.env.write_txn()?;
        let pending = self.actions.len(&w)?;
        if pending + items.len() as u64 > self.pending_max {
            return Err(LogError::Full(pending));
        }
        let mut seq = self.meta.get(&w, NEXT_SEQ)?.unwrap_or(1);
        let mut out = Vec::with_capacity(items.len());
        for (kind, id) in items {
            self.actions.put(&mut w, &seq, &encode(*kind, id, now_ms))?;
            out.push(seq);
            seq += 1;
        }
        self.meta.put(&mut w, NEXT_SEQ, &seq)?;
        w.commit()?;
        Ok(out)
    }

    /// Up to `limit` pending actions with a sequence number above `after`, in order.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<Action>, LogError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.actions.range(&r, &(after + 1..))?.take(limit) {
            let (seq, b) = item?;
            out.push(decode(seq, b)?);
        }
        Ok(out)
    }

    /// Drops every action up to and including `seq`: the partner has them durably.
    pub fn acknowledge(&self, seq: u64) -> Result<usize, LogError> {
        let mut w = self.env.write_txn()?;
        let n = self.actions.delete_range(&mut w, &(..=seq))?;
        w.commit()?;
        Ok(n)
    }

    /// Pending actions and the logged time of the oldest, ms since the epoch.
    pub fn depth(&self) -> Result<(u64, Option<u64>), LogError> {
        let r = self.env.read_txn()?;
        let n = self.actions.len(&r)?;
        let oldest = match self.actions.first(&r)? {
            Some((seq, b)) => Some(decode(seq, b)?.logged_ms),
            None => None,
        };
        Ok((n, oldest))
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
    fn append_read_acknowledge_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = spool::IdGenerator::new("a").unwrap();
        let (x, y, z) = (ids.next_id(), ids.next_id(), ids.next_id());
        {
            let log = TxLog::open(dir.path(), 100).unwrap();
            assert_eq!(
                log.append(&[(Kind::Add, &x), (Kind::Add, &y)], 5).unwrap(),
                vec![1, 2]
            );
            assert_eq!(log.append(&[(Kind::Delete, &x)], 6).unwrap(), vec![3]);
            log.set_applied(42).unwrap();
            log.set_role("active").unwrap();
        }
        let log = TxLog::open(dir.path(), 100).unwrap();
        let p = log.pending_after(0, 10).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[2],
            Action {
                seq: 3,
                kind: Kind::Delete,
                id: x.clone(),
                logged_ms: 6
            }
        );
        assert_eq!(log.pending_after(1, 1).unwrap()[0].id, y);
        assert_eq!(log.acknowledge(2).unwrap(), 2);
        assert_eq!(log.depth().unwrap(), (1, Some(6)));
        assert_eq!(
            log.append(&[(Kind::Add, &z)], 7).unwrap(),
            vec![4],
            "sequence only grows"
        );
        assert_eq!(log.applied().unwrap(), 42);
        assert_eq!(log.role().unwrap().as_deref(), Some("active"));
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
