//! The pages, as maud templates: every value is escaped by construction (maud escapes whatever
//! it splices unless told `PreEscaped`, which this module uses only for its own constant
//! markup). No inline script or style anywhere: the Content-Security-Policy forbids both.

use crate::policy::Role;
use maud::{html, Markup, DOCTYPE};

/// Who a page is shown to: their name and role, and the session's CSRF token for its forms.
pub struct Viewer<'a> {
    /// The user name.
    pub name: &'a str,
    /// Their role.
    pub role: Role,
    /// The token each form carries back.
    pub csrf: &'a str,
}

/// The frame around every page: navigation by role, the logout form.
pub fn layout(title: &str, viewer: Option<&Viewer>, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = refresh {
                    meta http-equiv="refresh" content=(s);
                }
                title { (title) " · Spoolpair" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "Spoolpair" }
                    @if let Some(v) = viewer {
                        nav {
                            @match v.role {
                                Role::Admin => {
                                    a href="/status" { "Status" }
                                    a href="/queue" { "Queue" }
                                    a href="/settings" { "Settings" }
                                    a href="/track" { "Tracking" }
                                }
                                Role::Auditor => {
                                    a href="/search" { "Search" }
                                    a href="/audit" { "Audit log" }
                                    a href="/track" { "Tracking" }
                                }
                                Role::User => {
                                    a href="/search" { "My mail" }
                                    a href="/quarantine" { "Quarantine" }
                                }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            span.who { (v.name) " (" (v.role.name()) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// The login form, with a message when the last attempt failed.
pub fn login(csrf: &str, user: &str, message: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        None,
        html! {
            @if let Some(m) = message {
                p.error role="alert" { (m) }
            }
            form.login method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label for="user" { "User" }
                input #user type="text" name="user" value=(user) autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
        },
    )
}

/// A refusal (403), a missing item (404), or an error the daemon gave.
pub fn problem(viewer: Option<&Viewer>, title: &str, message: &str) -> Markup {
    layout(
        title,
        viewer,
        None,
        html! { p.error role="alert" { (message) } },
    )
}

/// `YYYY-MM-DD HH:MM:SS` UTC of ms since the epoch.
pub fn when(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}
