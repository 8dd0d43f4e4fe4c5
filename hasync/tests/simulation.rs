//! Deterministic simulation of the replication protocol: one seed drives message arrivals and
//! removals on the active node, link drops, crashes of either side and restarts; at the end the
//! link heals and the partner must hold exactly the active node's spool. The two logs are the
//! real `TxLog` (LMDB for `DELETE`s, memory for `ADD`s, so a crash of the active node reopens
//! its log and loses the `ADD`s); the sender takes its decisions from `hasync::decide`, the
//! functions the daemon's sender calls (where to resume and whether to rebuild, how many to
//! send, `ADD` or `DELETE`); the rest follows `Replicator`'s rules: resume after the receiver's applied mark (in memory, persisted only now and
//! then, so a crash loses some of it), after a start ask the partner which messages it lacks
//! and log their `ADD`s before shipping anything, ship `ADD` for a message still held and
//! `DELETE` otherwise, apply idempotently, make it durable, then acknowledge; the sender prunes
//! acknowledged actions from its log only now and then too.
//!
//! The partner also loses its whole state directory now and then (a replaced disk).
//!
//! A failing seed is printed; `SIM_SEED=n cargo test -p hasync --test simulation` replays it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use hasync::decide;
use hasync::txlog::{Kind, TxLog};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spool::{IdGenerator, MessageId};
use std::collections::{BTreeSet, VecDeque};

enum ToReceiver {
    Resume,
    Add(u64, MessageId),
    Delete(u64, MessageId),
    /// Which of these does the partner lack? (the rebuild after a start)
    Missing(Vec<MessageId>),
}

enum ToSender {
    Ack(u64),
    Missing(Vec<MessageId>),
}

struct Sim {
    rng: StdRng,
    ids: IdGenerator,
    // Active node: its spool (truth) and its log.
    spool: BTreeSet<MessageId>,
    log: Option<TxLog>,
    // Sender's volatile state; `None` while disconnected.
    sender: Option<(u64, VecDeque<u64>)>,
    // Waiting for the partner's answer to the rebuild's question.
    rebuilding: bool,
    // The highest sequence the partner acknowledged (the sender's memory).
    a_acked: u64,
    crashes: usize,
    lost_states: usize,
    window: usize,
    // The network of the current connection.
    to_b: VecDeque<ToReceiver>,
    to_a: VecDeque<ToSender>,
    // Passive node: durable replicas, the applied mark in memory (lost when it crashes) and
    // the one persisted lazily in its own log.
    replicas: BTreeSet<MessageId>,
    b_applied: u64,
    b_log: TxLog,
    // The final stable phase, where pruning is not skipped so the log can drain.
    healing: bool,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    // State directories of the partner that replaced a lost one.
    _lost: Vec<tempfile::TempDir>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        // tmpfs where there is one: LMDB's fsyncs cost nothing there, and durability across a
        // simulated crash is modelled by what the code committed, not by the disk.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let (da, db) = (
            tempfile::tempdir_in(base).unwrap(),
            tempfile::tempdir_in(base).unwrap(),
        );
        Sim {
            rng: StdRng::seed_from_u64(seed),
            ids: IdGenerator::new("sim").unwrap(),
            spool: BTreeSet::new(),
            log: Some(TxLog::open(da.path(), 1_000_000).unwrap()),
            sender: None,
            rebuilding: false,
            a_acked: 0,
            crashes: 0,
            lost_states: 0,
            window: 8,
            to_b: VecDeque::new(),
            to_a: VecDeque::new(),
            replicas: BTreeSet::new(),
            b_applied: 0,
            healing: false,
            b_log: TxLog::open(db.path(), 1_000_000).unwrap(),
            _dirs: (da, db),
            _lost: Vec::new(),
        }
    }

    fn log(&self) -> &TxLog {
        self.log.as_ref().unwrap()
    }

    /// The active node's process dies: the sender's state and the log's `ADD`s with it.
    fn crash_active(&mut self) {
        self.disconnect();
        self.log = None;
        self.log = Some(TxLog::open(self._dirs.0.path(), 1_000_000).unwrap());
        self.a_acked = 0;
        self.crashes += 1;
    }

    /// The partner's state directory is lost (a replaced disk): no replicas, a fresh log whose
    /// applied mark is 0. Only a rebuild sends it what it had acknowledged.
    fn lose_partner_state(&mut self) {
        self.disconnect();
        let fresh = tempfile::tempdir().unwrap();
        self.b_log = TxLog::open(fresh.path(), 1_000_000).unwrap();
        self._lost.push(fresh);
        self.replicas.clear();
        self.b_applied = 0;
        self.lost_states += 1;
    }

    fn disconnect(&mut self) {
        self.sender = None;
        self.rebuilding = false;
        self.to_b.clear();
        self.to_a.clear();
    }

    fn connect(&mut self) {
        self.disconnect();
        // The receiver answers the handshake with Resume(applied); the sender learns it below.
        self.to_b.push_back(ToReceiver::Resume);
    }

    /// Active node: spool a message (log ADD before it becomes visible, like the writer hook).
    fn spool_one(&mut self) {
        let id = self.ids.next_id();
        self.log().append(&[(Kind::Add, &id)], 0).unwrap();
        self.spool.insert(id);
    }

    /// Active node: a message leaves (log DELETE before the files go, like Delivery).
    fn remove_one(&mut self) {
        let n = self.spool.len();
        if n == 0 {
            return;
        }
        let id = self
            .spool
            .iter()
            .nth(self.rng.gen_range(0..n))
            .unwrap()
            .clone();
        self.log().append(&[(Kind::Delete, &id)], 0).unwrap();
        self.spool.remove(&id);
    }

    fn sender_step(&mut self) {
        if self.rebuilding {
            return;
        }
        let log = self.log.as_ref().unwrap();
        let Some((next, in_flight)) = self.sender.as_mut() else {
            return;
        };
        let room = decide::room(in_flight.len(), 0, self.window, u64::MAX);
        for a in log.pending_after(*next, room).unwrap() {
            // Nothing is being published here: an ADD is logged with its message in the spool.
            let frame = match decide::ship(a.kind, false, self.spool.contains(&a.id)) {
                decide::Ship::Add => ToReceiver::Add(a.seq, a.id),
                decide::Ship::Delete => ToReceiver::Delete(a.seq, a.id),
                decide::Ship::Wait => break,
            };
            self.to_b.push_back(frame);
            in_flight.push_back(a.seq);
            *next = a.seq;
        }
    }

    /// Receiver handles one frame; `crash_mid_apply` stops after the replica write and before
    /// the applied mark (the mark is what makes the action count as applied).
    fn receiver_step(&mut self, crash_mid_apply: bool) -> bool {
        let Some(frame) = self.to_b.pop_front() else {
            return true;
        };
        let seq = match frame {
            ToReceiver::Resume => {
                let applied = self.b_log.applied().unwrap().max(self.b_applied);
                // Sender side of the handshake: resume after the partner's mark.
                let resume = decide::on_resume(applied, self.a_acked);
                self.sender = Some((resume.next, VecDeque::new()));
                if resume.request_rebuild {
                    self.log().request_rebuild(); // the partner forgot what it acknowledged
                }
                if self.log().needs_rebuild() {
                    // Asked with the spool as it is now; it may change before the answer.
                    self.rebuilding = true;
                    let ours = self.spool.iter().cloned().collect();
                    self.to_b.push_back(ToReceiver::Missing(ours));
                }
                return true;
            }
            ToReceiver::Missing(ids) => {
                let lacking = ids
                    .into_iter()
                    .filter(|id| !self.replicas.contains(id))
                    .collect();
                self.to_a.push_back(ToSender::Missing(lacking));
                return true;
            }
            ToReceiver::Add(seq, id) => {
                self.replicas.insert(id); // idempotent
                seq
            }
            ToReceiver::Delete(seq, id) => {
                self.replicas.remove(&id); // a missing id is fine
                seq
            }
        };
        if crash_mid_apply {
            self.b_applied = 0; // the in-memory mark dies with the process
            return false;
        }
        self.b_applied = self.b_applied.max(seq);
        if self.rng.gen_bool(0.1) {
            self.b_log.set_applied(self.b_applied).unwrap(); // the lazy persist
        }
        self.to_a.push_back(ToSender::Ack(seq));
        true
    }

    fn ack_step(&mut self) {
        let seq = match self.to_a.pop_front() {
            None => return,
            Some(ToSender::Missing(ids)) => {
                // Nothing was shipped while rebuilding: `next` is still the partner's mark.
                let resume = self.sender.as_ref().map_or(0, |s| s.0);
                let asked = self.log().rebuild_asked();
                self.log().rebuilt(&ids, resume, asked).unwrap();
                self.rebuilding = false;
                return;
            }
            Some(ToSender::Ack(seq)) => seq,
        };
        self.a_acked = self.a_acked.max(seq);
        if self.healing || self.rng.gen_bool(0.3) {
            self.log().acknowledge(seq).unwrap(); // lazy pruning
        }
        if let Some((_, in_flight)) = self.sender.as_mut() {
            while in_flight.front().is_some_and(|s| *s <= seq) {
                in_flight.pop_front();
            }
        }
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            match self.rng.gen_range(0..100) {
                0..=24 => self.spool_one(),
                25..=34 => self.remove_one(),
                35..=54 => self.sender_step(),
                55..=79 => {
                    let crash = self.rng.gen_bool(0.02);
                    if !self.receiver_step(crash) {
                        self.disconnect(); // receiver crashed: connection gone, disk kept
                    }
                }
                80..=94 => self.ack_step(),
                95..=96 => self.disconnect(), // link drop
                97 => self.crash_active(),    // active node crash: its memory is lost
                98 if self.rng.gen_bool(0.05) => self.lose_partner_state(),
                _ => {
                    if self.sender.is_none() {
                        self.connect();
                    }
                }
            }
            if self.sender.is_none() && self.to_b.is_empty() && self.rng.gen_bool(0.2) {
                self.connect(); // reconnect with backoff
            }
        }
        // Heal: a stable link until the log drains.
        self.healing = true;
        self.connect();
        for _ in 0..1_000_000 {
            self.sender_step();
            while !self.to_b.is_empty() {
                self.receiver_step(false);
            }
            while !self.to_a.is_empty() {
                self.ack_step();
            }
            if self.log().depth().unwrap().0 == 0 && !self.log().needs_rebuild() {
                return;
            }
        }
        panic!("log never drained");
    }
}

#[test]
fn partner_converges_to_the_active_spool_under_faults() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..100).collect(),
    };
    let (mut crashes, mut lost_states) = (0, 0);
    for seed in seeds {
        let mut sim = Sim::new(seed);
        sim.run(1000);
        assert!(
            sim.replicas == sim.spool,
            "seed {seed}: partner diverged ({} replicas, {} on the active); replay with SIM_SEED={seed}",
            sim.replicas.len(),
            sim.spool.len()
        );
        crashes += sim.crashes;
        lost_states += sim.lost_states;
    }
    assert!(crashes > 0, "the seeds crashed the active node");
    eprintln!(
        "simulation: {crashes} crashes of the active node, {lost_states} lost partner states, all converged"
    );
}
