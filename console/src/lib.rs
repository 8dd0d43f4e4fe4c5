//! `console`: the web console people use the archive and the gateway through. Users and roles
//! (`admin` runs the gateway and reads no mail, `auditor` reads the archive and its audit log,
//! `user` reads only their own mail), argon2id passwords, sessions with CSRF tokens and idle
//! expiry, login rate limiting with lockout, server-rendered pages escaped by construction
//! (maud), a strict Content-Security-Policy, HTTPS (rustls).
//!
//! It is not: the daemon's state or behaviour. Every page asks the daemon through
//! [`web::Backend`] with the same typed requests as `spoolctl` (`api`), in the console user's
//! name, so the daemon authorises the scope and audits every access to content the same way
//! whoever asks. The users table itself is a clustered setting the daemon keeps.

// A handler's early exit is the response it answers with: boxing it would only move the
// allocation axum makes anyway.
#![allow(clippy::result_large_err)]

pub mod archive_pages;
pub mod gateway_pages;
pub mod limiter;
pub mod pages;
pub mod policy;
pub mod routes;
pub mod session;
pub mod tls;
pub mod users;
pub mod web;

pub use routes::router;
pub use web::{Backend, Client, Console};

/// Serves the console on `tcp` with TLS from `acceptor` until the runtime ends.
pub async fn serve<B: Backend>(
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    console: std::sync::Arc<Console<B>>,
) -> std::io::Result<()> {
    let listener = tls::TlsListener::new(tcp, acceptor)?;
    axum::serve(
        listener,
        router(console).into_make_service_with_connect_info::<Client>(),
    )
    .await
}
