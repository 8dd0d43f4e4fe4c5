//! Parsing of SMTP command lines (RFC 5321 §4.1) into [`Command`]s. Pure functions, no I/O.

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain`.
    Ehlo(String),
    /// `HELO domain`.
    Helo(String),
    /// `MAIL FROM:<path> [params]`; empty path for the null sender.
    Mail {
        /// Reverse-path without brackets.
        from: String,
        /// ESMTP parameters, keyword upper-cased.
        params: Vec<(String, Option<String>)>,
    },
    /// `RCPT TO:<path> [params]`.
    Rcpt {
        /// Forward-path without brackets and without a source route.
        to: String,
        /// The path carried an obsolete source route (`<@a,@b:user@d>`), which was dropped.
        source_route: bool,
        /// ESMTP parameters, keyword upper-cased.
        params: Vec<(String, Option<String>)>,
    },
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP [string]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY string`.
    Vrfy,
    /// `HELP [string]`.
    Help,
    /// `STARTTLS`.
    StartTls,
}

/// Why a line is not a usable command; each maps to one reply.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Verb unknown: `500 5.5.1`.
    Unknown,
    /// Verb known, arguments malformed: `501 5.5.4` with this text.
    Syntax(&'static str),
    /// A mailbox that is not a valid address: `501 5.1.7` (sender) / `501 5.1.3` (recipient).
    BadAddress {
        /// True for MAIL, false for RCPT.
        sender: bool,
    },
}

/// Parses one command line, without its CRLF.
pub fn parse(line: &str) -> Result<Command, CommandError> {
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax("Syntax: no arguments allowed"))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let domain = rest.trim();
            if domain.is_empty() || domain.contains(char::is_whitespace) {
                return Err(CommandError::Syntax("Syntax: EHLO/HELO hostname"));
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(domain.to_string())
            } else {
                Command::Helo(domain.to_string())
            })
        }
        "MAIL" => {
            let (from, _, params) = path_and_params(rest, "FROM:", true)?;
            Ok(Command::Mail { from, params })
        }
        "RCPT" => {
            let (to, source_route, params) = path_and_params(rest, "TO:", false)?;
            if to.is_empty() {
                return Err(CommandError::BadAddress { sender: false });
            }
            Ok(Command::Rcpt {
                to,
                source_route,
                params,
            })
        }
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" => {
            if rest.trim().is_empty() {
                Err(CommandError::Syntax("Syntax: VRFY address"))
            } else {
                Ok(Command::Vrfy)
            }
        }
        _ => Err(CommandError::Unknown),
    }
}

type Params = Vec<(String, Option<String>)>;

/// The address of a path (source route dropped), whether it had a source route, and the params.
fn path_and_params(
    rest: &str,
    prefix: &str,
    sender: bool,
) -> Result<(String, bool, Params), CommandError> {
    let syntax = if sender {
        "Syntax: MAIL FROM:<address>"
    } else {
        "Syntax: RCPT TO:<address>"
    };
    let head = rest
        .get(..prefix.len())
        .ok_or(CommandError::Syntax(syntax))?;
    if !head.eq_ignore_ascii_case(prefix) {
        return Err(CommandError::Syntax(syntax));
    }
    // RFC 5321 has no space after the colon, but many clients send one; accept it like Postfix.
    let rest = rest[prefix.len()..].trim_start();
    if !rest.starts_with('<') {
        return Err(CommandError::Syntax(syntax));
    }
    let close = find_path_end(rest).ok_or(CommandError::Syntax(syntax))?;
    let path = &rest[1..close];
    let after = &rest[close + 1..];
    if !after.is_empty() && !after.starts_with(' ') {
        return Err(CommandError::Syntax(syntax));
    }
    let address = strip_source_route(path);
    let source_route = address.len() != path.len();
    if !address.is_empty() && !valid_mailbox(address) {
        return Err(CommandError::BadAddress { sender });
    }
    let mut params = Vec::new();
    for p in after.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (p, None),
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(CommandError::Syntax("Syntax: bad ESMTP parameter"));
        }
        params.push((k.to_ascii_uppercase(), v));
    }
    Ok((address.to_string(), source_route, params))
}

/// Index of the `>` closing a path that starts with `<`, skipping quoted strings.
fn find_path_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Drops an obsolete source route (`@a,@b:user@c`), which RFC 5321 says to accept and ignore.
fn strip_source_route(path: &str) -> &str {
    if path.starts_with('@') {
        if let Some(i) = path.find(':') {
            return &path[i + 1..];
        }
    }
    path
}

/// A mailbox per RFC 5321 §4.1.2 (or the bare `postmaster`): a local part that is a
/// Dot-string of `atext` (UTF-8 allowed, for SMTPUTF8) or a Quoted-string, `@`, and a domain or
/// an address literal. An unquoted `@` in the local part is therefore invalid. Dots are not
/// checked for placement (`a..b`, `a.`), as Postfix does not: such addresses exist in the wild.
fn valid_mailbox(addr: &str) -> bool {
    if addr.eq_ignore_ascii_case("postmaster") {
        return true;
    }
    let Some(at) = addr.rfind('@') else {
        return false;
    };
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    let local_ok = if local.starts_with('"') {
        dequote(local).is_some()
    } else {
        !local.is_empty() && local.chars().all(|c| c == '.' || is_atext(c))
    };
    local_ok && valid_domain_or_literal(domain)
}

/// RFC 5322 `atext`, widened to non-ASCII characters for SMTPUTF8 (RFC 6531).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(c)
        || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
}

/// The content of an RFC 5321 Quoted-string (`"..."` with `\x` pairs), unescaped; `None` if
/// `quoted` is not exactly one well-formed Quoted-string.
pub fn dequote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ' '..='~') => out.push(e),
                _ => return None,
            },
            '"' => return None,
            c if c.is_control() => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn valid_domain_or_literal(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        let Some(literal) = literal.strip_suffix(']') else {
            return false;
        };
        return match literal.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                literal[5..].parse::<std::net::Ipv6Addr>().is_ok()
            }
            _ => literal.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    !domain.is_empty()
        && domain.len() <= 255
        && domain.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

/// The local part of an address as the next hop will read it: de-quoted when quoted.
/// `None` for `postmaster` without a domain.
pub fn local_part(addr: &str) -> Option<String> {
    let at = addr.rfind('@')?;
    let local = &addr[..at];
    Some(if local.starts_with('"') {
        dequote(local).unwrap_or_else(|| local.to_string())
    } else {
        local.to_string()
    })
}

/// The domain of an address, lower-cased; `None` for `postmaster` without a domain.
pub fn domain_of(addr: &str) -> Option<String> {
    addr.rfind('@').map(|i| addr[i + 1..].to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_common_commands() {
        assert_eq!(
            parse("EHLO client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse("helo x"), Ok(Command::Helo("x".into())));
        assert_eq!(
            parse("MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: "a@b.example".into(),
                params: vec![
                    ("SIZE".into(), Some("100".into())),
                    ("BODY".into(), Some("8BITMIME".into()))
                ]
            })
        );
        assert_eq!(
            parse("mail from: <>"),
            Ok(Command::Mail {
                from: String::new(),
                params: vec![]
            })
        );
        assert_eq!(
            parse("RCPT TO:<@relay.example:user@d.example>"),
            Ok(Command::Rcpt {
                to: "user@d.example".into(),
                source_route: true,
                params: vec![]
            })
        );
        assert_eq!(
            parse("RCPT TO:<\"odd > name\"@d.example>"),
            Ok(Command::Rcpt {
                to: "\"odd > name\"@d.example".into(),
                source_route: false,
                params: vec![]
            })
        );
        assert_eq!(
            parse("RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt {
                to: "Postmaster".into(),
                source_route: false,
                params: vec![]
            })
        );
        assert_eq!(parse("DATA"), Ok(Command::Data));
        assert_eq!(parse("noop whatever"), Ok(Command::Noop));
        assert_eq!(parse("STARTTLS"), Ok(Command::StartTls));
        assert_eq!(parse("VRFY bob"), Ok(Command::Vrfy));
    }

    #[test]
    fn rejects_malformed_commands_precisely() {
        assert_eq!(parse("BDAT 100"), Err(CommandError::Unknown));
        assert_eq!(parse(""), Err(CommandError::Unknown));
        assert!(matches!(parse("EHLO"), Err(CommandError::Syntax(_))));
        assert!(matches!(
            parse("MAIL TO:<a@b>"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse("MAIL FROM:a@b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse("MAIL FROM:<a@b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(parse("DATA now"), Err(CommandError::Syntax(_))));
        assert!(matches!(
            parse("MAIL FROM:<a@b> SIZE=1=2 =x"),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(
            parse("MAIL FROM:<no-at-sign>"),
            Err(CommandError::BadAddress { sender: true })
        );
        assert_eq!(
            parse("RCPT TO:<>"),
            Err(CommandError::BadAddress { sender: false })
        );
        assert_eq!(
            parse("RCPT TO:<a b@c>"),
            Err(CommandError::BadAddress { sender: false })
        );
        assert_eq!(
            parse("RCPT TO:<a@-bad-.example>"),
            Err(CommandError::BadAddress { sender: false })
        );
    }

    #[test]
    fn local_parts_follow_rfc_5321_dot_string_or_quoted_string() {
        let rcpt = |a: &str| parse(&format!("RCPT TO:<{a}>"));
        let bad = Err(CommandError::BadAddress { sender: false });
        for ok in [
            "user@relay.test",
            "first.last+tag@relay.test",
            "user%other.example@relay.test",
            "other.example!user@relay.test",
            "\"user@other.example\"@relay.test",
            "\"john doe\"@relay.test",
            "\"q\\\"uote\"@relay.test",
            "a..b.@relay.test",
            "jörg@relay.test",
            "user@[192.0.2.1]",
            "user@[IPv6:2001:db8::1]",
            "user@[ipv6:::1]",
        ] {
            assert!(rcpt(ok).is_ok(), "{ok} is a valid mailbox");
        }
        for no in [
            "user@other.example@relay.test",
            "@relay.test",
            "us(er@relay.test",
            "\"a\"b@relay.test",
            "user@relay.test.",
            "user@.relay.test",
            "user@[192.0.2.300]",
            "user@[IPv6:nonsense]",
            "user@[other.example]",
            "user@[]",
        ] {
            assert_eq!(rcpt(no), bad, "{no} is not a valid mailbox");
        }
        assert!(matches!(
            rcpt("\"unterminated@relay.test"),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(
            parse("MAIL FROM:<a@b@c.example>"),
            Err(CommandError::BadAddress { sender: true })
        );
    }

    #[test]
    fn local_part_is_dequoted() {
        assert_eq!(local_part("\"a@b\"@c.test").as_deref(), Some("a@b"));
        assert_eq!(local_part("\"a\\%b\"@c.test").as_deref(), Some("a%b"));
        assert_eq!(local_part("a!b@c.test").as_deref(), Some("a!b"));
        assert_eq!(local_part("postmaster"), None);
    }

    #[test]
    fn domain_is_lower_cased() {
        assert_eq!(domain_of("a@Example.ORG").as_deref(), Some("example.org"));
        assert_eq!(domain_of("postmaster"), None);
    }
}
