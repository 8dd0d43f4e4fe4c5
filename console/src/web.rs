//! The console's HTTP side: sessions and CSRF on every form, login with its rate limit, and
//! the one check each page makes before it asks the daemon anything ([`Console::require`]).
//! The pages themselves are in `archive_pages` and `gateway_pages`; the routes and the
//! security headers every answer carries in `routes`.

use crate::limiter::{Failed, Gate, Limiter};
use crate::pages::{self, Viewer};
use crate::policy::{self, Action, Role, Scope};
use crate::session::{self, Sessions};
use crate::users::{self, Users};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// What the console needs of the daemon: its admin requests, asked on behalf of a named console
/// user (the daemon audits them under that name), and the clustered users table.
pub trait Backend: Send + Sync + 'static {
    /// Answers `req` as the admin socket would, for `who` (`console:NAME`).
    fn ask(
        &self,
        who: String,
        req: api::Request,
    ) -> impl Future<Output = Result<serde_json::Value, String>> + Send;
    /// The users as the cluster's settings hold them now.
    fn users(&self) -> Arc<Users>;
    /// A directory of the daemon's own where bulk exports for download are written (emptied
    /// at start; an export is removed an hour after it was made).
    fn export_dir(&self) -> std::path::PathBuf;
    /// Counts an event for the daemon's metrics: `login`, `login_failed`, `login_locked` (an
    /// attempt during a lockout), `lockout` (one begun), `csrf_refused`, `forbidden`.
    fn counted(&self, _event: &'static str) {}
}

/// The console: the daemon behind it, sessions, the login limiter.
pub struct Console<B> {
    pub(crate) backend: B,
    sessions: Mutex<Sessions>,
    limiter: Mutex<Limiter>,
    /// Bulk exports waiting for their download, by token.
    pub(crate) exports: Mutex<std::collections::HashMap<String, Export>>,
}

/// A bulk export waiting for its download.
pub struct Export {
    /// The user who made it: the only one who may download it.
    pub(crate) owner: String,
    /// The messages (an mbox or a zip of `.eml` files).
    pub(crate) data: std::path::PathBuf,
    /// Its signed manifest.
    pub(crate) manifest: std::path::PathBuf,
    /// When it was made, ms since the epoch.
    pub(crate) made_ms: u64,
}

/// A client's address, for the login limiter and the log.
#[derive(Clone, Copy, Debug)]
pub struct Client(pub SocketAddr);

/// The logged-in user behind a request.
pub struct Who {
    /// Their name.
    pub name: String,
    /// Their role.
    pub role: Role,
    /// The addresses a `user` reads mail of.
    pub addresses: Vec<String>,
    /// Their session's CSRF token.
    pub csrf: String,
}

impl Who {
    /// The page frame's view of them.
    pub fn viewer(&self) -> Viewer<'_> {
        Viewer {
            name: &self.name,
            role: self.role,
            csrf: &self.csrf,
        }
    }

    /// The name the daemon audits their requests under.
    pub fn asker(&self) -> String {
        format!("console:{}", self.name)
    }
}

/// A form's or a query string's fields, in order (a field may repeat: the queue's ids).
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    /// Parses `application/x-www-form-urlencoded` bytes.
    pub fn parse(bytes: &[u8]) -> Fields {
        Fields(
            form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the form carries `expected` as its CSRF token.
    pub fn carries_token(&self, expected: &str) -> bool {
        self.get("csrf")
            .is_some_and(|t| session::same_token(t, expected))
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Now, ms since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An HTML page with a status.
pub fn page(status: StatusCode, markup: maud::Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

fn session_cookie(token: &str) -> HeaderValue {
    // Tokens are base64url: always a valid header value.
    HeaderValue::from_str(&format!(
        "{}={token}; Path=/; Secure; HttpOnly; SameSite=Strict",
        session::COOKIE
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == session::COOKIE)
        .map(|(_, v)| v.to_string())
}

impl<B: Backend> Console<B> {
    /// A console in front of `backend`.
    pub fn new(backend: B) -> Console<B> {
        Console {
            backend,
            sessions: Mutex::new(Sessions::default()),
            limiter: Mutex::new(Limiter::default()),
            exports: Mutex::new(Default::default()),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The logged-in user of a request, looked up in the users table now; else the login page.
    pub fn who(&self, headers: &HeaderMap) -> Result<Who, Response> {
        let to_login = || Redirect::to("/login").into_response();
        let token = cookie_token(headers).ok_or_else(to_login)?;
        let s = self.sessions().get(&token, now_ms()).ok_or_else(to_login)?;
        let name = s.user.ok_or_else(to_login)?;
        let users = self.backend.users();
        let Some(u) = users.get(&name) else {
            // Deleted since login, on this unit or another.
            self.sessions().end(&token);
            return Err(to_login());
        };
        Ok(Who {
            name,
            role: u.role,
            addresses: u.addresses.clone(),
            csrf: s.csrf,
        })
    }

    /// The logged-in user if their role may do `action`, with the scope it has for them; the
    /// login page, or 403.
    pub fn require(&self, headers: &HeaderMap, action: Action) -> Result<(Who, Scope), Response> {
        let who = self.who(headers)?;
        match policy::scope_for(who.role, &who.addresses, action) {
            Some(scope) => Ok((who, scope)),
            None => Err(self.forbidden(&who)),
        }
    }

    /// The 403 page for `who`.
    pub fn forbidden(&self, who: &Who) -> Response {
        self.backend.counted("forbidden");
        page(
            StatusCode::FORBIDDEN,
            pages::problem(
                Some(&who.viewer()),
                "Not allowed",
                &format!("The {} role may not do this.", who.role.name()),
            ),
        )
    }

    /// [`Console::require`] for a form: also its CSRF token, checked against the session's.
    pub fn require_form(
        &self,
        headers: &HeaderMap,
        action: Action,
        body: &Bytes,
    ) -> Result<(Who, Scope, Fields), Response> {
        let (who, scope) = self.require(headers, action)?;
        let fields = Fields::parse(body);
        if fields.carries_token(&who.csrf) {
            Ok((who, scope, fields))
        } else {
            Err(self.csrf_refused())
        }
    }

    fn csrf_refused(&self) -> Response {
        self.backend.counted("csrf_refused");
        page(
            StatusCode::FORBIDDEN,
            pages::problem(
                None,
                "Refused",
                "This form's security token is missing or out of date. Reload the page and try again.",
            ),
        )
    }

    /// Asks the daemon, typed; an error is the daemon's message.
    pub async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        who: &Who,
        req: impl Into<api::Request>,
    ) -> Result<T, String> {
        let v = self.backend.ask(who.asker(), req.into()).await?;
        serde_json::from_value(v).map_err(|e| format!("unexpected answer from the daemon: {e}"))
    }
}

/// The scope as the admin requests carry it.
pub fn scope_field(scope: &Scope) -> Option<Vec<String>> {
    match scope {
        Scope::All => None,
        Scope::Addresses(a) => Some(a.clone()),
    }
}

pub(crate) async fn home<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
) -> Response {
    match c.who(&headers) {
        Ok(w) if w.role == Role::Admin => Redirect::to("/status").into_response(),
        Ok(_) => Redirect::to("/search").into_response(),
        Err(r) => r,
    }
}

/// The login form; a session (anonymous) is begun for its CSRF token.
pub(crate) async fn login_form<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
) -> Response {
    if c.who(&headers).is_ok() {
        return Redirect::to("/").into_response();
    }
    let (token, s) = c.sessions().start(now_ms());
    let mut r = page(StatusCode::OK, pages::login(&s.csrf, "", None));
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&token));
    r
}

pub(crate) async fn login<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    ConnectInfo(Client(addr)): ConnectInfo<Client>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = now_ms();
    let fields = Fields::parse(&body);
    let token = cookie_token(&headers).unwrap_or_default();
    let Some(s) = c.sessions().get(&token, now) else {
        return c.csrf_refused();
    };
    if !fields.carries_token(&s.csrf) {
        return c.csrf_refused();
    }
    let user = fields.get("user").unwrap_or("").to_string();
    let password = fields.get("password").unwrap_or("").to_string();
    let client = addr.ip().to_string();
    let again = |status, message: &str| page(status, pages::login(&s.csrf, &user, Some(message)));
    if let Gate::Locked { until_ms } = c.limiter().gate(&user, &client, now) {
        c.backend.counted("login_locked");
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Too many failed logins. Try again after {} UTC.",
                pages::when(until_ms)
            ),
        );
    }
    let hash = c.backend.users().get(&user).map(|u| u.password.clone());
    // An unknown name costs a hash check too, so timing does not tell names apart.
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(h) => users::verify_password(&h, &password),
        None => {
            users::verify_password(DUMMY_HASH, &password);
            false
        }
    })
    .await
    .unwrap_or(false);
    if !ok {
        c.backend.counted("login_failed");
        if c.limiter().failed(&user, &client, now) == Failed::LockedOut {
            c.backend.counted("lockout");
            tracing::warn!(
                user = %user.escape_debug(),
                client = %client,
                "console: login locked out after repeated failures"
            );
        }
        return again(StatusCode::UNAUTHORIZED, "Wrong user name or password.");
    }
    c.limiter().succeeded(&user);
    c.backend.counted("login");
    tracing::info!(user = %user, client = %client, "console: logged in");
    let token = c.sessions().log_in(&token, &user, now);
    let mut r = Redirect::to("/").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&token));
    r
}

/// A valid argon2id hash of a random password, checked for unknown names.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c3Bvb2xwYWlyZHVtbXk$Vf0dG7o5uQm2Xj6cJ0m4dY8M5bqk3n4c5cS7fQ8n1pY";

pub(crate) async fn logout<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let who = match c.who(&headers) {
        Ok(w) => w,
        Err(r) => return r,
    };
    if !Fields::parse(&body).carries_token(&who.csrf) {
        return c.csrf_refused();
    }
    if let Some(t) = cookie_token(&headers) {
        c.sessions().end(&t);
    }
    Redirect::to("/login").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_checked_for_unknown_names_parses_so_it_costs_a_real_check() {
        assert!(argon2::PasswordHash::new(DUMMY_HASH).is_ok());
        let t = std::time::Instant::now();
        assert!(!users::verify_password(DUMMY_HASH, "guess"));
        assert!(t.elapsed() > std::time::Duration::from_millis(2));
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; spoolpair_console=tok_en; b=2"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("tok_en"));
        let c = session_cookie("xyz");
        let c = c.to_str().unwrap();
        for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(attr), "{c}");
        }
    }
}
