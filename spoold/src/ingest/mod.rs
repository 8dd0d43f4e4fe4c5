//! Mail coming in: the SMTP accept loop (`accept.rs`) and the bridge from an SMTP transaction
//! to a durable spool pair (`sink.rs`), whose `250` waits for the group-commit writer.
//!
//! It is not: the SMTP protocol (`smtp`), the writer (`spool`), what happens to a message
//! after it is spooled (`delivery/`, `lifecycle.rs`).

pub mod accept;
pub mod sink;
