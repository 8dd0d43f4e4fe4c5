//! `smtp`: Spoolpair's SMTP protocol code.
//!
//! It is: the command parser ([`command`]), the DATA decoder with its smuggling defences
//! ([`data`]), the relay policy ([`policy`]) and the server session ([`server`]), which hands
//! complete messages to a [`server::Sink`] and replies `250` only after the sink's commit.
//!
//! The client side ([`client`]) delivers one message at a time over a reusable connection.
//!
//! It is not: storage. It knows nothing of files, spools, queues or metrics libraries.

pub mod client;
pub mod command;
pub mod data;
pub mod policy;
pub mod server;

pub use policy::RelayPolicy;
pub use server::{serve, BodySink, ServerConfig, SessionEnd, Sink, SinkError, Transaction};
