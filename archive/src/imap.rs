//! The little of IMAP4rev1 (RFC 3501) an import needs, over TLS only: `imaps://` (TLS from the
//! start) or `imap://` with STARTTLS (refused if the server does not offer it); LOGIN, EXAMINE
//! (read-only: an import never changes the mailbox), UID SEARCH and UID FETCH of
//! `(UID INTERNALDATE BODY.PEEK[])`, literals read by their length. Written here because the
//! maintained crates (`async-imap`, `imap` 3 alpha) bring their own runtime or TLS stack for
//! these few commands; what it parses is only what those commands answer.
//!
//! Not here: which messages to import, or archiving them (`importer.rs`).

use rustls::pki_types::ServerName;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where to import from: `imaps://user@host[:port]/mailbox` or `imap://…` (STARTTLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImapUrl {
    /// TLS from the first byte (`imaps`), else STARTTLS.
    pub implicit_tls: bool,
    /// The login name.
    pub user: String,
    /// The server's name (checked against its certificate).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The mailbox (default `INBOX`).
    pub mailbox: String,
}

impl ImapUrl {
    /// Parses the URL; the reason when it is not one.
    pub fn parse(url: &str) -> Result<ImapUrl, String> {
        let (implicit_tls, rest) = if let Some(r) = url.strip_prefix("imaps://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("imap://") {
            (false, r)
        } else {
            return Err(format!("{url:?}: not imaps://… or imap://…"));
        };
        let (authority, mailbox) = rest.split_once('/').unwrap_or((rest, ""));
        let (user, hostport) = authority
            .rsplit_once('@')
            .ok_or_else(|| format!("{url:?}: no user (imaps://user@host/mailbox)"))?;
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("{url:?}: port {p:?}"))?,
            ),
            None => (hostport.to_string(), if implicit_tls { 993 } else { 143 }),
        };
        if user.is_empty() || host.is_empty() {
            return Err(format!("{url:?}: no user or host"));
        }
        Ok(ImapUrl {
            implicit_tls,
            user: user.to_string(),
            host,
            port,
            mailbox: if mailbox.is_empty() {
                "INBOX".into()
            } else {
                mailbox.to_string()
            },
        })
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A logged-in session.
pub struct Session {
    io: BufReader<Tls>,
    tag: u32,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("IMAP {what}: {e}")
}

/// A quoted IMAP string (no CR or LF allowed in it).
fn quoted(s: &str) -> Result<String, String> {
    if s.contains(['\r', '\n']) {
        return Err("a line break in a login name, password or mailbox".into());
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| err(&format!("CA file {}", path.display()), e))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| err("CA file", e))?;
                roots.add(cert).map_err(|e| err("CA file", e))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

impl Session {
    /// Connects (TLS from the start, or STARTTLS), logs in, and opens `url.mailbox` read-only;
    /// answers the session and the mailbox's UIDVALIDITY.
    pub fn open(
        url: &ImapUrl,
        password: &str,
        ca_file: Option<&Path>,
    ) -> Result<(Session, u32), String> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .map_err(|e| err(&format!("connect to {}:{}", url.host, url.port), e))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))
            .and_then(|()| tcp.set_write_timeout(Some(Duration::from_secs(60))))
            .map_err(|e| err("socket", e))?;
        let mut tcp = tcp;
        if !url.implicit_tls {
            // In clear only to ask for TLS: nothing else is said before it.
            let mut plain = BufReader::new(tcp.try_clone().map_err(|e| err("socket", e))?);
            let mut line = String::new();
            plain.read_line(&mut line).map_err(|e| err("greeting", e))?;
            tcp.write_all(b"s STARTTLS\r\n")
                .map_err(|e| err("STARTTLS", e))?;
            loop {
                line.clear();
                plain.read_line(&mut line).map_err(|e| err("STARTTLS", e))?;
                if line.starts_with("s OK") {
                    break;
                }
                if line.starts_with("s ") || line.is_empty() {
                    return Err(format!("IMAP server refused STARTTLS: {}", line.trim()));
                }
            }
        }
        let name = ServerName::try_from(url.host.clone()).map_err(|e| err("server name", e))?;
        let conn =
            rustls::ClientConnection::new(tls_config(ca_file)?, name).map_err(|e| err("TLS", e))?;
        let mut s = Session {
            io: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            tag: 0,
        };
        if url.implicit_tls {
            let mut greeting = Vec::new();
            s.io.read_until(b'\n', &mut greeting)
                .map_err(|e| err("greeting", e))?;
            if !greeting.starts_with(b"* OK") {
                return Err(format!(
                    "IMAP greeting: {}",
                    String::from_utf8_lossy(&greeting).trim()
                ));
            }
        }
        s.command(&format!(
            "LOGIN {} {}",
            quoted(&url.user)?,
            quoted(password)?
        ))
        .map_err(|e| format!("{e} (login as {})", url.user))?;
        let selected = s.command(&format!("EXAMINE {}", quoted(&url.mailbox)?))?;
        let validity = selected
            .iter()
            .find_map(|r| {
                let text = String::from_utf8_lossy(&r.line).into_owned();
                let at = text.find("[UIDVALIDITY ")? + "[UIDVALIDITY ".len();
                text[at..].split(']').next()?.trim().parse().ok()
            })
            .ok_or("IMAP EXAMINE: no UIDVALIDITY")?;
        Ok((s, validity))
    }

    /// Sends a command; answers its untagged responses, once its tagged `OK` came.
    fn command(&mut self, command: &str) -> Result<Vec<Response>, String> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        let verb = command.split(' ').next().unwrap_or("").to_string();
        let stream = self.io.get_mut();
        stream
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| err(&verb, e))?;
        let mut out = Vec::new();
        loop {
            let r = self.response().map_err(|e| err(&verb, e))?;
            if r.line.starts_with(tag.as_bytes()) {
                let rest = String::from_utf8_lossy(&r.line[tag.len()..])
                    .trim()
                    .to_string();
                return if rest.starts_with("OK") {
                    Ok(out)
                } else {
                    Err(format!("IMAP {verb}: {rest}"))
                };
            }
            out.push(r);
        }
    }

    /// One response: its text with each literal's place marked, and the literals.
    fn response(&mut self) -> std::io::Result<Response> {
        let mut r = Response::default();
        loop {
            let mut part = Vec::new();
            if self.io.read_until(b'\n', &mut part)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            let trimmed = part
                .strip_suffix(b"\r\n")
                .or_else(|| part.strip_suffix(b"\n"))
                .unwrap_or(&part);
            let literal = trimmed
                .strip_suffix(b"}")
                .and_then(|t| t.iter().rposition(|&b| b == b'{').map(|i| &t[i + 1..]))
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok());
            r.line.extend_from_slice(trimmed);
            match literal {
                Some(n) => {
                    let mut bytes = vec![0u8; n];
                    self.io.read_exact(&mut bytes)?;
                    r.literals.push(bytes);
                }
                None => return Ok(r),
            }
        }
    }

    /// The UIDs above `after` (and, with `since`, of messages the server dated on or after
    /// it: `d-Mon-yyyy`), ascending.
    pub fn uids(&mut self, after: u32, since: Option<&str>) -> Result<Vec<u32>, String> {
        let mut query = format!("UID SEARCH UID {}:*", after.saturating_add(1));
        if let Some(day) = since {
            query.push_str(&format!(" SINCE {day}"));
        }
        let mut uids: Vec<u32> = self
            .command(&query)?
            .iter()
            .filter_map(|r| r.line.strip_prefix(b"* SEARCH"))
            .flat_map(|rest| {
                String::from_utf8_lossy(rest)
                    .split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect::<Vec<u32>>()
            })
            // `n:*` names the highest UID even when it is below n.
            .filter(|&u| u > after)
            .collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// The messages with these UIDs, by UID, each with its bytes and the server's arrival date
    /// (ms); one that is not there (expunged meanwhile) is left out. One command for all.
    pub fn fetch(
        &mut self,
        uids: &[u32],
    ) -> Result<std::collections::HashMap<u32, Fetched>, String> {
        let mut out = std::collections::HashMap::new();
        if uids.is_empty() {
            return Ok(out);
        }
        let set: Vec<String> = uids.iter().map(u32::to_string).collect();
        let responses = self.command(&format!(
            "UID FETCH {} (UID INTERNALDATE BODY.PEEK[])",
            set.join(",")
        ))?;
        for r in responses {
            let text = String::from_utf8_lossy(&r.line).into_owned();
            if !text.contains(" FETCH (") {
                continue;
            }
            let uid = text
                .split_once("UID ")
                .and_then(|(_, rest)| rest.split([' ', ')']).next()?.parse::<u32>().ok());
            let (Some(uid), Some(body)) = (uid, r.literals.into_iter().next()) else {
                continue;
            };
            let date = text
                .split_once("INTERNALDATE \"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .and_then(|(d, _)| {
                    chrono::DateTime::parse_from_str(d.trim(), "%d-%b-%Y %H:%M:%S %z").ok()
                })
                .map(|t| t.timestamp_millis().max(0) as u64);
            out.insert(uid, (body, date));
        }
        Ok(out)
    }

    /// Logs out (best effort).
    pub fn logout(mut self) {
        let _ = self.command("LOGOUT");
    }
}

/// A message fetched: its bytes, and the server's arrival date (ms since the epoch).
pub type Fetched = (Vec<u8>, Option<u64>);

/// A server response: its lines joined, and the literals it carried.
#[derive(Default)]
struct Response {
    line: Vec<u8>,
    literals: Vec<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_tls_user_host_port_and_mailbox() {
        assert_eq!(
            ImapUrl::parse("imaps://journal@mail.example:1993/Archive/2024"),
            Ok(ImapUrl {
                implicit_tls: true,
                user: "journal".into(),
                host: "mail.example".into(),
                port: 1993,
                mailbox: "Archive/2024".into(),
            })
        );
        let plain = ImapUrl::parse("imap://a@b@host").unwrap();
        assert_eq!(
            (
                plain.user.as_str(),
                plain.port,
                plain.mailbox.as_str(),
                plain.implicit_tls
            ),
            ("a@b", 143, "INBOX", false)
        );
        for bad in ["http://x@y/", "imaps://host/INBOX", "imaps://u@h:port/"] {
            assert!(ImapUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(quoted("p\"a\\ss").unwrap(), "\"p\\\"a\\\\ss\"");
        assert!(quoted("two\r\nlines").is_err());
    }
}
