//! Group commit for removals: one thread takes every removal that arrived while the previous
//! group was being made durable, takes each pair out of its folder (envelope first, then body;
//! recycled or unlinked, see [`Layout::discard`]) and fsyncs each folder touched once, then
//! completes every request of the group.
//!
//! Delivery removes a message as soon as its last recipient is final; without grouping, every
//! removal paid a directory fsync of its own. Not here: the decision to remove (that is the
//! caller's) and the replication log's `DELETE` (logged by the caller before it asks).

use crate::id::MessageId;
use crate::layout::{fsync_dir, Folder, Layout};
use std::io;
use std::thread::JoinHandle;

/// Removals waiting before senders block.
const QUEUE_CAPACITY: usize = 4096;
/// Largest group.
const GROUP_MAX: usize = 256;

/// Called with the outcome once the removal is durable (or failed); runs on the remover thread.
pub type RemoveDone = Box<dyn FnOnce(io::Result<()>) + Send>;

struct Request {
    id: MessageId,
    folder: Folder,
    done: RemoveDone,
}

/// Handle to the remover thread; the thread ends when every handle is dropped.
pub struct Remover {
    tx: crossbeam_channel::Sender<Request>,
    _thread: JoinHandle<()>,
}

impl Remover {
    /// Starts the remover thread for `layout`.
    pub fn start(layout: Layout) -> io::Result<Remover> {
        let (tx, rx) = crossbeam_channel::bounded::<Request>(QUEUE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("spool-remover".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < GROUP_MAX {
                        match rx.try_recv() {
                            Ok(r) => group.push(r),
                            Err(_) => break,
                        }
                    }
                    remove_group(&layout, group);
                }
            })?;
        Ok(Remover {
            tx,
            _thread: thread,
        })
    }

    /// Removes the pair `id` from `folder` durably and then calls `done`.
    pub fn remove(&self, id: MessageId, folder: Folder, done: RemoveDone) {
        if let Err(e) = self.tx.send(Request { id, folder, done }) {
            (e.0.done)(Err(io::Error::other("spool remover stopped")));
        }
    }
}

fn remove_group(layout: &Layout, group: Vec<Request>) {
    let mut results: Vec<io::Result<()>> = group
        .iter()
        .map(|r| layout.discard_pair(&r.id, r.folder))
        .collect();
    let mut folders: Vec<Folder> = group.iter().map(|r| r.folder).collect();
    folders.sort_by_key(|f| f.name());
    folders.dedup();
    for folder in folders {
        if let Err(e) = fsync_dir(&layout.dir(folder)) {
            for (r, res) in group.iter().zip(results.iter_mut()) {
                if r.folder == folder && res.is_ok() {
                    *res = Err(io::Error::new(
                        e.kind(),
                        format!("fsync {}: {e}", folder.name()),
                    ));
                }
            }
        }
    }
    for (r, res) in group.into_iter().zip(results) {
        (r.done)(res);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{IdGenerator, Part};

    #[test]
    fn removes_every_pair_of_a_group_and_reports_each() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("state"));
        layout.create().unwrap();
        let ids = IdGenerator::new("rm").unwrap();
        let made: Vec<MessageId> = (0..20)
            .map(|_| {
                let id = ids.next_id();
                for part in [Part::Env, Part::Body] {
                    std::fs::write(layout.path(Folder::Spool, &id, part), b"x").unwrap();
                }
                id
            })
            .collect();
        let remover = Remover::start(layout.clone()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for id in &made {
            let tx = tx.clone();
            remover.remove(
                id.clone(),
                Folder::Spool,
                Box::new(move |r| tx.send(r.is_ok()).unwrap()),
            );
        }
        // A pair that is already gone is fine too.
        let tx2 = tx.clone();
        remover.remove(
            ids.next_id(),
            Folder::Spool,
            Box::new(move |r| tx2.send(r.is_ok()).unwrap()),
        );
        let oks: Vec<bool> = (0..21).map(|_| rx.recv().unwrap()).collect();
        assert!(oks.iter().all(|&ok| ok));
        assert_eq!(
            std::fs::read_dir(layout.dir(Folder::Spool))
                .unwrap()
                .count(),
            0
        );
    }
}
