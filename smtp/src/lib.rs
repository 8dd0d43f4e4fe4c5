//! `smtp`: Spoolpair's SMTP protocol code.
//!
//! It is: the command parser ([`command`]), the DATA decoder with its smuggling defences
//! ([`data`]), the relay policy ([`policy`]) and the server session ([`server`]), which hands
//! complete messages to a [`server::Sink`] and replies `250` only after the sink's commit.
//!
//! It is not: storage. It knows nothing of files, spools or metrics libraries. The delivery
//! client arrives with the delivery stage.

pub mod command;
pub mod data;
pub mod policy;
pub mod server;

pub use policy::RelayPolicy;
pub use server::{serve, BodySink, ServerConfig, SessionEnd, Sink, SinkError, Transaction};
