//! `spool`: Spoolpair's durable on-disk message store.
//!
//! It is: message ids ([`id`]), the `.env` envelope format ([`envelope`], byte by byte in
//! `FORMAT.md`), the state directory and moves between its folders ([`layout`]), bodies in and
//! out ([`body`]), the group-commit writer with its io_uring and portable backends ([`writer`]),
//! and startup recovery plus `input/` insertion ([`recovery`]).
//!
//! It is not: a protocol. It knows nothing of SMTP, peers, async runtimes or metrics libraries;
//! callers get plain callbacks and reports and turn them into replies and metrics.

pub mod body;
pub mod envelope;
pub mod failpoint;
pub mod id;
pub mod layout;
mod mapped;
pub mod recovery;
pub mod remover;
pub mod writer;

pub use body::{BodyParts, MappedBody, PendingBody};
pub use envelope::{hex, BodyType, Envelope, RcptState, Recipient, ScanState};
pub use id::{IdGenerator, MessageId};
pub use layout::{Folder, Layout, Part};
pub use writer::{Backend, BackendChoice, CommitError, CommitReceipt, CommitRequest, SpoolWriter};
