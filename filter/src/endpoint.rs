//! Where a filter daemon listens (clamd, a milter) and the connection to it: a unix socket
//! (`unix:/path`) or a TCP address (`tcp:host:port`, `inet:host:port`, or Sendmail's
//! `inet:port@host`, as Postfix's `smtpd_milters` writes them).
//!
//! Not here: what is said over the connection.

use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};

/// A filter daemon's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket's absolute path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: a unix socket's path must be absolute"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        let Some(rest) = s.strip_prefix("inet:").or_else(|| s.strip_prefix("tcp:")) else {
            return Err(format!(
                "`{s}`: expected unix:/path or inet:HOST:PORT (also tcp:HOST:PORT)"
            ));
        };
        let hostport = match rest.split_once('@') {
            Some((port, host)) => format!("{host}:{port}"),
            None => rest.to_string(),
        };
        let valid = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(format!("`{s}`: expected inet:HOST:PORT"));
        }
        Ok(Endpoint::Tcp(hostport))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(h) => write!(f, "inet:{h}"),
        }
    }
}

/// A connected stream of either kind.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Endpoint {
    /// Connects (TCP without Nagle's delay: filters speak in small packets).
    pub async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Endpoint::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            Endpoint::Tcp(hostport) => {
                let s = tokio::net::TcpStream::connect(hostport.as_str()).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoints_parse_or_say_what_is_wrong() {
        let table: &[(&str, Result<Endpoint, &str>)] = &[
            (
                "unix:/run/rspamd/milter.sock",
                Ok(Endpoint::Unix("/run/rspamd/milter.sock".into())),
            ),
            (
                "inet:127.0.0.1:11332",
                Ok(Endpoint::Tcp("127.0.0.1:11332".into())),
            ),
            (
                "tcp:127.0.0.1:3310",
                Ok(Endpoint::Tcp("127.0.0.1:3310".into())),
            ),
            (
                "inet:8891@localhost",
                Ok(Endpoint::Tcp("localhost:8891".into())),
            ),
            ("inet:[::1]:8891", Ok(Endpoint::Tcp("[::1]:8891".into()))),
            ("unix:run/x", Err("must be absolute")),
            ("inet:localhost", Err("expected inet:HOST:PORT")),
            ("inet::25", Err("expected inet:HOST:PORT")),
            (
                "/run/clamd.sock",
                Err("expected unix:/path or inet:HOST:PORT"),
            ),
        ];
        for (text, expected) in table {
            match (text.parse::<Endpoint>(), expected) {
                (Ok(a), Ok(e)) => assert_eq!(&a, e),
                (Err(a), Err(e)) => assert!(a.contains(e), "{text}: {a}"),
                (a, e) => panic!("{text}: {a:?}, expected {e:?}"),
            }
        }
    }
}
