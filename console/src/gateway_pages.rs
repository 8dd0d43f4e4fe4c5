//! The gateway's pages, for admins: the pair's status (refreshing by itself), the queue with
//! hold, release, requeue and delete, and the clustered settings, changed with the same
//! validation as `spoolctl config set` and its error shown. No page here shows message content.

use crate::pages::{self, when};
use crate::policy::Action;
use crate::web::{page, Backend, Console, Who};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{html, Markup};
use std::sync::Arc;

/// Seconds between the status page's refreshes.
const REFRESH_SECS: u32 = 5;
/// Queued messages listed at most.
const QUEUE_SHOWN_MAX: usize = 500;

/// `/status`: role, partner link, replication lag, queue by folder, recent deferrals.
pub async fn status<B: Backend>(State(c): State<Arc<Console<B>>>, headers: HeaderMap) -> Response {
    let (who, _) = match c.require(&headers, Action::Status) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let st: Result<api::Status, String> = c.ask(&who, api::Local::Status).await;
    let queue = list(&c, &who).await;
    let members: Result<api::ClusterStatus, String> =
        c.ask(&who, api::Cluster::ClusterStatus).await;
    let day_ago = crate::web::now_ms().saturating_sub(24 * 3600 * 1000);
    let bounces: Result<api::Tracked, String> = c
        .ask(
            &who,
            api::Cluster::Track {
                query: format!("ev:bounced after:{day_ago}"),
                limit: 1000,
            },
        )
        .await;
    let body = html! {
        @match &st {
            Err(e) => { p.error role="alert" { (e) } }
            Ok(st) => {
                section.cards {
                    div.card { h2 { "Role" } p.big { (st.role) } }
                    @if let Some(ha) = &st.ha {
                        div.card {
                            h2 { "Partner" }
                            p.big { (ha.partner.as_deref().unwrap_or("—")) " · " (ha.partner_role.as_deref().unwrap_or("unknown")) }
                            p { "link " strong { (ha.link) } @if ha.split_brain { " · " strong.error { "split brain" } } }
                        }
                        div.card {
                            h2 { "Replication" }
                            p.big { (ha.pending_actions) " pending" }
                            p { "last lag " (ha.last_lag_ms) " ms" }
                        }
                    } @else {
                        div.card { h2 { "Partner" } p.big { "none (standalone)" } }
                    }
                    div.card { h2 { "Scheduled" } p.big { (st.scheduled) } }
                }
                h2 { "Queue by folder" }
                table.folders {
                    thead { tr { th { "Folder" } th { "Messages" } } }
                    tbody { @for (f, n) in &st.queue { tr { td { (f) } td { (n) } } } }
                }
            }
        }
        h2 { "Units sharing settings" }
        @match &members {
            Err(e) => { p.error { (e) } }
            Ok(m) if m.members.is_empty() => { p { "None: this unit shares its settings with no other." } }
            Ok(m) => {
                @if let Some(name) = &m.cluster { p { "Cluster " strong { (name) } ", this unit " (m.node) } }
                table.members {
                    thead { tr { th { "Unit" } th { "Link" } th { "Last contact" } th { "Settings version" } th { "Last error" } } }
                    tbody {
                        @for u in &m.members {
                            tr {
                                td { (u.node) }
                                td { @if u.paused { "disconnected by an operator" } @else if u.connected { "connected" } @else { strong.error { "not connected" } } }
                                td { @if let Some(s) = u.last_contact_secs { (s) " s ago" } @else { "never" } }
                                td { code { (u.version.as_deref().unwrap_or("—")) } }
                                td { (u.error.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Bounces in the last 24 hours" }
        @match &bounces {
            Err(e) => { p.error { (e) } }
            Ok(t) => {
                @let mut list: Vec<&api::TrackEvent> = t.events.iter().filter(|e| e.kind.as_str() == "bounced").collect();
                @if list.is_empty() { p { "None." } } @else {
                    table.bounces {
                        thead { tr { th { "When (UTC)" } th { "Unit" } th { "Spool id" } th { "Detail" } } }
                        tbody {
                            @for e in { list.sort_by_key(|e| std::cmp::Reverse(e.at_ms)); list.iter().take(20) } {
                                tr { td { (when(e.at_ms)) } td { (e.unit) } td.id { (e.spool_id) } td { (e.detail) } }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Recent deferrals" }
        @match &queue {
            Err(e) => { p.error { (e) } }
            Ok(q) => {
                @let mut deferred: Vec<&api::Listed> = q.iter().filter(|m| m.last_error.is_some()).collect();
                @if deferred.is_empty() { p { "None." } } @else {
                    table.queue {
                        thead { tr { th { "Id" } th { "Attempts" } th { "Next attempt (UTC)" } th { "Last error" } } }
                        tbody {
                            @for m in { deferred.sort_by_key(|m| std::cmp::Reverse(m.next_attempt_ms)); deferred.iter().take(20) } {
                                tr { td { (m.id) } td { (m.attempts) } td { (when(m.next_attempt_ms)) } td { (m.last_error.as_deref().unwrap_or("")) } }
                            }
                        }
                    }
                }
            }
        }
    };
    page(
        StatusCode::OK,
        pages::layout("Pair status", Some(&who.viewer()), Some(REFRESH_SECS), body),
    )
}

async fn list<B: Backend>(c: &Console<B>, who: &Who) -> Result<Vec<api::Listed>, String> {
    c.ask(
        who,
        api::Local::List {
            folder: None,
            sender: None,
            rcpt: None,
            older_than_secs: None,
        },
    )
    .await
}

fn queue_page(who: &Who, q: Result<Vec<api::Listed>, String>, flash: Option<Markup>) -> Response {
    let body = html! {
        @if let Some(f) = flash { (f) }
        @match &q {
            Err(e) => { p.error role="alert" { (e) } }
            Ok(q) if q.is_empty() => { p { "The queue is empty." } }
            Ok(q) => {
                form.queue method="post" action="/queue" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    p.actions {
                        button type="submit" name="action" value="hold" { "Hold" }
                        button type="submit" name="action" value="release" { "Release" }
                        button type="submit" name="action" value="requeue" { "Retry now" }
                        button.danger type="submit" name="action" value="delete" { "Delete" }
                    }
                    p.count { (q.len()) " queued" @if q.len() > QUEUE_SHOWN_MAX { ", the oldest " (QUEUE_SHOWN_MAX) " shown" } }
                    table.queue {
                        thead { tr { th { input type="checkbox" id="select-all" aria-label="select all"; } th { "Id" } th { "Folder" } th { "Arrived (UTC)" } th { "Sender" } th { "Recipients" } th { "Size" } th { "Attempts" } th { "Last error" } } }
                        tbody {
                            @for m in q.iter().take(QUEUE_SHOWN_MAX) {
                                tr {
                                    td { input type="checkbox" name="id" value=(m.id) aria-label={ "select " (m.id) }; }
                                    td.id { (m.id) }
                                    td { (m.folder) }
                                    td { (when(m.arrived_ms)) }
                                    td { (m.sender) }
                                    td { (m.recipients.join(", ")) }
                                    td { (m.size) }
                                    td { (m.attempts) }
                                    td { (m.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(
        StatusCode::OK,
        pages::layout("Queue", Some(&who.viewer()), None, body),
    )
}

/// `/queue`: the messages waiting, oldest first.
pub async fn queue<B: Backend>(State(c): State<Arc<Console<B>>>, headers: HeaderMap) -> Response {
    let (who, _) = match c.require(&headers, Action::QueueList) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let q = list(&c, &who).await;
    queue_page(&who, q, None)
}

/// `POST /queue`: hold, release, requeue or delete the ids ticked.
pub async fn queue_action<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, _, f) = match c.require_form(&headers, Action::QueueChange, &body) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let ids = f.all("id");
    let req = match f.get("action") {
        Some("hold") => api::Local::Hold { ids },
        Some("release") => api::Local::Release { ids },
        Some("requeue") => api::Local::Requeue { ids },
        Some("delete") => api::Local::Delete { ids },
        other => {
            return page(
                StatusCode::BAD_REQUEST,
                pages::problem(
                    Some(&who.viewer()),
                    "Unknown action",
                    &format!("{other:?} is not a queue action"),
                ),
            )
        }
    };
    let done: Result<api::Each, String> = c.ask(&who, req).await;
    let flash = match &done {
        Ok(e) => html! {
            p.flash role="status" { (e.done.len()) " done" @if !e.failed.is_empty() { ", " (e.failed.len()) " failed" } }
            @if !e.failed.is_empty() { ul.error { @for f in &e.failed { li { (f.id) ": " (f.error) } } } }
        },
        Err(e) => html! { p.error role="alert" { (e) } },
    };
    let q = list(&c, &who).await;
    queue_page(&who, q, Some(flash))
}

/// Keys the settings page does not show or change: the users table (hashes) has `spoolctl user`.
const HIDDEN_KEYS: &[&str] = &["console.users"];

fn settings_page(
    who: &Who,
    shown: Result<api::ConfigShown, String>,
    groups: &[String],
    flash: Option<Markup>,
    status: StatusCode,
) -> Response {
    let body = html! {
        @if let Some(f) = flash { (f) }
        p.hint { "A value is written as in the configuration file (TOML): 30, \"text\", [\"a.example\", \"b.example\"]. The cluster level applies on every unit, a group's on its machines, machine on this one only; the most specific level set wins." }
        @match &shown {
            Err(e) => { p.error role="alert" { (e) } }
            Ok(s) => {
                table.settings {
                    thead { tr { th { "Key" } th { "In effect here" } th { "Set at" } th { "Change" } } }
                    tbody {
                        @for k in s.keys.iter().filter(|k| !HIDDEN_KEYS.contains(&k.key.as_str())) {
                            tr {
                                td.key { code { (k.key) } }
                                td { code { (json(&k.effective)) } }
                                td {
                                    @for l in &k.levels {
                                        form.unset method="post" action="/settings" {
                                            input type="hidden" name="csrf" value=(who.csrf);
                                            input type="hidden" name="key" value=(k.key);
                                            input type="hidden" name="level" value=(l.level);
                                            input type="hidden" name="unset" value="1";
                                            (l.level) ": " code { (json(&l.value)) } " "
                                            button type="submit" aria-label={ "unset " (k.key) " at " (l.level) } { "unset" }
                                        }
                                    }
                                }
                                td {
                                    form.setting method="post" action="/settings" {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="key" value=(k.key);
                                        input type="text" name="value" value=(toml_value(&k.effective)) aria-label={ "new value of " (k.key) };
                                        select name="level" aria-label="level" {
                                            option value="cluster" { "cluster" }
                                            @for g in groups { option value={ "group:" (g) } { "group " (g) } }
                                            option value="machine" { "machine" }
                                        }
                                        button type="submit" { "Set" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(
        status,
        pages::layout("Settings", Some(&who.viewer()), None, body),
    )
}

fn json(v: &Option<serde_json::Value>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "unset".into())
}

/// A JSON value written as TOML (strings, numbers, booleans and arrays of them look alike;
/// a table is left for the command line).
fn toml_value(v: &Option<serde_json::Value>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_default()
}

/// `/settings`: every clusterable key, its levels, what applies here.
pub async fn settings<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
) -> Response {
    let (who, _) = match c.require(&headers, Action::SettingsRead) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let shown = c.ask(&who, api::Local::ConfigShow { key: None }).await;
    let groups = group_names(&c, &who).await;
    settings_page(&who, shown, &groups, None, StatusCode::OK)
}

/// The cluster's groups (none outside a cluster, or when the list cannot be had).
async fn group_names<B: Backend>(c: &Console<B>, who: &Who) -> Vec<String> {
    let listed: Result<api::ClusterList, String> = c.ask(who, api::Cluster::ClusterList).await;
    listed
        .map(|l| l.groups.into_iter().map(|g| g.name).collect())
        .unwrap_or_default()
}

/// `POST /settings`: set one key at a level; refused with the daemon's reason, changing
/// nothing, when the value or the configuration it makes is invalid.
pub async fn settings_change<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, _, f) = match c.require_form(&headers, Action::SettingsChange, &body) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let key = f.get("key").unwrap_or("").to_string();
    let (flash, status) = if HIDDEN_KEYS.contains(&key.as_str()) {
        (
            html! { p.error role="alert" { (key) " is changed with spoolctl user" } },
            StatusCode::BAD_REQUEST,
        )
    } else {
        // The daemon checks the level (`cluster`, `group:NAME`, `machine[:NODE]`) as it
        // checks the value.
        let level = f.get("level").unwrap_or("cluster").to_string();
        let unset = f.get("unset") == Some("1");
        let changed: Result<serde_json::Value, String> = c
            .ask(
                &who,
                api::Cluster::ConfigSet {
                    key: key.clone(),
                    value: (!unset).then(|| f.get("value").unwrap_or("").to_string()),
                    level: level.clone(),
                },
            )
            .await;
        let done = if unset { "unset" } else { "set" };
        match changed {
            Ok(_) => (
                html! { p.flash role="status" { (key) " " (done) " at the " (level) " level." } },
                StatusCode::OK,
            ),
            Err(e) => (
                html! { p.error role="alert" { (key) " not changed: " (e) } },
                StatusCode::BAD_REQUEST,
            ),
        }
    };
    let shown = c.ask(&who, api::Local::ConfigShow { key: None }).await;
    let groups = group_names(&c, &who).await;
    settings_page(&who, shown, &groups, Some(flash), status)
}

/// `/track?q=…`: every event of the messages a query selects, on every unit (no content:
/// envelopes, replies, verdicts).
pub async fn track<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let (who, _) = match c.require(&headers, Action::Track) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let f = crate::web::Fields::parse(uri.query().unwrap_or("").as_bytes());
    let q = f.get("q").unwrap_or("").trim().to_string();
    let found: Option<Result<api::Tracked, String>> = if q.is_empty() {
        None
    } else {
        Some(
            c.ask(
                &who,
                api::Cluster::Track {
                    query: q.clone(),
                    limit: 500,
                },
            )
            .await,
        )
    };
    let body = html! {
        form.search method="get" action="/track" role="search" {
            label for="q" { "Track" }
            input #q type="search" name="q" value=(q) placeholder="msgid:<id@example.org>  from:alice@example.org  id:SPOOL-ID" autofocus;
            button type="submit" { "Track" }
        }
        @match &found {
            None => { p.hint { "msgid:, id:, from:, to:, or a bare term; after:/before: narrow it." } }
            Some(Err(e)) => { p.error role="alert" { (e) } }
            Some(Ok(t)) => {
                @for n in &t.notes { p.error { (n) } }
                p.count { (t.events.len()) " events" @if t.capped { ", more matched (the first 500 shown)" } }
                table.track {
                    thead { tr { th { "When (UTC)" } th { "Unit" } th { "Spool id" } th { "Event" } th { "Detail" } } }
                    tbody {
                        @for e in &t.events {
                            tr { td { (when(e.at_ms)) } td { (e.unit) } td.id { (e.spool_id) } td { (e.kind.as_str()) } td { (e.detail) } }
                        }
                    }
                }
            }
        }
    };
    page(
        StatusCode::OK,
        pages::layout("Message tracking", Some(&who.viewer()), None, body),
    )
}
