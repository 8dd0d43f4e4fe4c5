//! Sessions: a random 256-bit token in a cookie (`Secure; HttpOnly; SameSite=Strict`), a CSRF
//! token of its own that every form carries back, idle expiry, and a bounded table. A session
//! holds a user's name only: their role and addresses are looked up in the clustered users
//! table on every request, so a user deleted or changed on any unit loses what they lost at
//! once.

use base64::Engine;
use std::collections::HashMap;

/// A session unused this long is gone.
pub const IDLE_MS: u64 = 15 * 60 * 1000;
/// Sessions kept at most; past it the least recently used goes.
pub const SESSIONS_MAX: usize = 10_000;
/// The cookie's name.
pub const COOKIE: &str = "spoolpair_console";

/// One session.
#[derive(Clone, Debug)]
pub struct Session {
    /// The logged-in user; `None` before login (the login form's CSRF token lives here).
    pub user: Option<String>,
    /// The token every form of this session carries.
    pub csrf: String,
    last_ms: u64,
}

/// The table of sessions.
#[derive(Default)]
pub struct Sessions {
    by_token: HashMap<String, Session>,
}

/// 32 random bytes from the OS, base64url without padding.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Compares two tokens in time that does not depend on where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// A new session (anonymous until [`Sessions::log_in`]); answers its token. A full table
    /// drops the idle first, then the least recently used anonymous session (anyone can make
    /// those by opening the login page: a flood of them must not log real users out), and
    /// only then the least recently used of all.
    pub fn start(&mut self, now_ms: u64) -> (String, Session) {
        if self.by_token.len() >= SESSIONS_MAX {
            self.by_token
                .retain(|_, s| now_ms.saturating_sub(s.last_ms) < IDLE_MS);
            if self.by_token.len() >= SESSIONS_MAX {
                let victim = self
                    .by_token
                    .iter()
                    .filter(|(_, s)| s.user.is_none())
                    .min_by_key(|(_, s)| s.last_ms)
                    .or_else(|| self.by_token.iter().min_by_key(|(_, s)| s.last_ms))
                    .map(|(t, _)| t.clone());
                if let Some(t) = victim {
                    self.by_token.remove(&t);
                }
            }
        }
        let token = random_token();
        let s = Session {
            user: None,
            csrf: random_token(),
            last_ms: now_ms,
        };
        self.by_token.insert(token.clone(), s.clone());
        (token, s)
    }

    /// The live session of `token`, touched; an idle one is dropped.
    pub fn get(&mut self, token: &str, now_ms: u64) -> Option<Session> {
        let s = self.by_token.get_mut(token)?;
        if now_ms.saturating_sub(s.last_ms) >= IDLE_MS {
            self.by_token.remove(token);
            return None;
        }
        s.last_ms = now_ms;
        Some(s.clone())
    }

    /// Logs `user` in: the old token ends and a new one (with a new CSRF token) begins, so a
    /// token known before login is worth nothing after it.
    pub fn log_in(&mut self, old: &str, user: &str, now_ms: u64) -> String {
        self.by_token.remove(old);
        let (token, _) = self.start(now_ms);
        if let Some(s) = self.by_token.get_mut(&token) {
            s.user = Some(user.to_string());
        }
        token
    }

    /// Ends a session.
    pub fn end(&mut self, token: &str) {
        self.by_token.remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_expires_when_idle_and_login_changes_both_tokens() {
        let mut s = Sessions::default();
        let (anon, first) = s.start(0);
        assert!(s.get(&anon, IDLE_MS - 1).is_some());
        let token = s.log_in(&anon, "alice", 10);
        assert!(s.get(&anon, 11).is_none(), "the pre-login token is gone");
        let live = s.get(&token, 12).unwrap();
        assert_eq!(live.user.as_deref(), Some("alice"));
        assert_ne!(live.csrf, first.csrf);
        assert!(s.get(&token, 12 + IDLE_MS - 1).is_some(), "touched");
        assert!(s.get(&token, 12 + 2 * IDLE_MS).is_none(), "idle");
        assert!(s.get(&token, 0).is_none(), "and gone");
    }

    #[test]
    fn the_table_is_bounded_and_a_flood_of_login_pages_logs_no_one_out() {
        let mut s = Sessions::default();
        let (anon, _) = s.start(0);
        let alice = s.log_in(&anon, "alice", 0);
        for i in 0..(SESSIONS_MAX as u64 + 5) {
            s.start(1 + i);
        }
        assert_eq!(s.by_token.len(), SESSIONS_MAX);
        assert!(
            s.get(&alice, 20_000).is_some(),
            "the logged-in session stays"
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
        assert_ne!(random_token(), random_token());
    }
}
