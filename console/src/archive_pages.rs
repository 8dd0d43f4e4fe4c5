//! The archive's pages: search, a message (envelope, headers, MIME tree, text parts; an HTML
//! part as escaped source, never live), downloads of the message and its parts, legal hold,
//! and the audit log. Every read of content is a daemon request made in the console user's
//! name, so the daemon audits it and applies the user's scope (a `user` reaches only mail from
//! or to their own addresses, whatever URL they type).

use crate::pages::{self, when};
use crate::policy::{Action, Role};
use crate::web::{page, scope_field, Backend, Console, Fields, Who};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use maud::{html, Markup};
use std::sync::Arc;

/// Results per page.
const PAGE: usize = 50;
/// The deepest page a search shows (the daemon lists at most 10,000).
const PAGES_MAX: usize = 10_000 / PAGE;

fn query_fields(uri: &Uri) -> Fields {
    Fields::parse(uri.query().unwrap_or("").as_bytes())
}

/// `/search?q=…&page=N`.
pub async fn search<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let (who, scope) = match c.require(&headers, Action::Search) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let f = query_fields(&uri);
    let q = f.get("q").unwrap_or("").trim().to_string();
    let page_no = f
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, PAGES_MAX);
    let found = if q.is_empty() && who.role != Role::User {
        None
    } else {
        Some(
            c.ask::<api::ArchiveFound>(
                &who,
                api::Local::ArchiveSearch {
                    query: q.clone(),
                    limit: PAGE,
                    offset: (page_no - 1) * PAGE,
                    scope: scope_field(&scope),
                },
            )
            .await,
        )
    };
    let body = html! {
        form.search method="get" action="/search" role="search" {
            label for="q" { "Search" }
            input #q type="search" name="q" value=(q) placeholder="from:alice subject:\"quarterly report\" after:2026-01-01" autofocus;
            button type="submit" { "Search" }
        }
        p.hint { "from: to: subject: body: filename: msgid: after: before: has:attachment size:>1m, words and \"phrases\"; all must match." }
        @match &found {
            None => {}
            Some(Err(e)) => { p.error role="alert" { (e) } }
            Some(Ok(found)) => {
                @let shown: Vec<&api::ArchiveItem> = found.items.iter().collect();
                p.count {
                    @if found.total_exact { (found.total) } @else { "at least " (found.total) }
                    " matching"
                    @if !shown.is_empty() {
                        ", " ((page_no - 1) * PAGE + 1) "–" ((page_no - 1) * PAGE + shown.len()) " shown"
                    }
                }
                @if !shown.is_empty() {
                    table.results {
                        thead { tr { th { "Arrived (UTC)" } th { "From" } th { "To" } th { "Subject" } th { "Message-ID" } th { "Matched" } } }
                        tbody {
                            @for i in &shown {
                                tr {
                                    td { a href={ "/message/" (i.seq) } { (when(i.arrived_ms)) } }
                                    td { (i.sender) }
                                    td { (i.recipients.join(", ")) }
                                    td { a href={ "/message/" (i.seq) } { (i.subject.as_deref().unwrap_or("(no subject)")) } }
                                    td.msgid { (i.message_id.as_deref().unwrap_or("")) }
                                    td { (i.matched.join(", ")) }
                                }
                            }
                        }
                    }
                }
                @if who.role == Role::Auditor && found.total > 0 {
                    form.export method="post" action="/export" {
                        input type="hidden" name="csrf" value=(who.csrf);
                        input type="hidden" name="q" value=(q);
                        label for="format" { "Export every match" }
                        select #format name="format" {
                            option value="mbox" { "mbox" }
                            option value="eml-zip" { ".eml files in a zip" }
                        }
                        button type="submit" { "Export" }
                    }
                }
                nav.pages {
                    @if page_no > 1 {
                        a href={ "/search?" (pair("q", &q)) "&page=" (page_no - 1) } rel="prev" { "Newer" }
                    }
                    @if found.total > page_no * PAGE && page_no < PAGES_MAX {
                        a href={ "/search?" (pair("q", &q)) "&page=" (page_no + 1) } rel="next" { "Older" }
                    }
                }
            }
        }
    };
    let title = if who.role == Role::User {
        "My mail"
    } else {
        "Search the archive"
    };
    page(
        StatusCode::OK,
        pages::layout(title, Some(&who.viewer()), None, body),
    )
}

fn pair(k: &str, v: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair(k, v)
        .finish()
}

/// The item and its bytes, read in `who`'s name within their scope; `view` audits it as a
/// view rather than a download.
async fn read<B: Backend>(
    c: &Console<B>,
    who: &Who,
    scope: &crate::policy::Scope,
    seq: u64,
    view: bool,
) -> Result<(api::ArchiveItem, Vec<u8>), Response> {
    let got: Result<api::ArchiveExported, String> = c
        .ask(
            who,
            api::Local::ArchiveExport {
                id: seq.to_string(),
                view,
                scope: scope_field(scope),
            },
        )
        .await;
    let refused = |e: String| {
        page(
            StatusCode::NOT_FOUND,
            pages::problem(Some(&who.viewer()), "Not available", &e),
        )
    };
    let e = got.map_err(refused)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(e.base64.as_bytes())
        .map_err(|e| refused(e.to_string()))?;
    Ok((e.item, raw))
}

/// The logged-in viewer of item `seq` and its bytes, read in their name within their scope
/// (`view`: audited as a view, else as an export); the login page, 403 or 404 otherwise.
async fn viewed<B: Backend>(
    c: &Console<B>,
    headers: &HeaderMap,
    seq: u64,
    view: bool,
) -> Result<(Who, api::ArchiveItem, Vec<u8>), Response> {
    let (who, scope) = c.require(headers, Action::View)?;
    let (item, raw) = read(c, &who, &scope, seq, view).await?;
    Ok((who, item, raw))
}

/// `/message/N`: one archived message, shown inert.
pub async fn message<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    Path(seq): Path<u64>,
) -> Response {
    let (who, item, raw) = match viewed(&c, &headers, seq, true).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let header_end = find(&raw, b"\r\n\r\n")
        .or_else(|| find(&raw, b"\n\n"))
        .unwrap_or(raw.len());
    let header_text = String::from_utf8_lossy(&raw[..header_end]);
    let parsed = MessageParser::default().parse(&raw);
    let subject = parsed
        .as_ref()
        .and_then(|m| m.subject())
        .unwrap_or("(no subject)")
        .to_string();
    let body = html! {
        section.envelope {
            h2 { "Envelope" }
            dl {
                dt { "Item" } dd { (item.seq) " (spool id " (item.id) ", accepted on " (item.origin) ")" }
                dt { "Arrived" } dd { (when(item.arrived_ms)) " UTC" }
                dt { "Sender" } dd { "<" (item.sender) ">" }
                dt { "Recipients" } dd { (item.recipients.join(", ")) }
                dt { "Verdict" } dd { (item.verdict) }
                dt { "Size" } dd { (item.size) " bytes" }
                dt { "SHA-256" } dd.hash { (item.sha256) }
                dt { "Legal hold" } dd { @if item.held { "on" } @else { "off" } }
            }
            p.actions {
                a.button href={ "/message/" (seq) "/eml" } download { "Download .eml" }
                @if who.role == Role::Auditor {
                    form.inline method="post" action={ "/message/" (seq) "/hold" } {
                        input type="hidden" name="csrf" value=(who.csrf);
                        input type="hidden" name="held" value=(if item.held { "0" } else { "1" });
                        button type="submit" { @if item.held { "Release legal hold" } @else { "Put on legal hold" } }
                    }
                }
            }
        }
        section.headers {
            h2 { "Headers" }
            pre.headers { (header_text) }
        }
        section.parts {
            h2 { "Parts" }
            @match &parsed {
                Some(m) => { (part_tree(m, seq, 0, 0)) }
                None => { p { "The message could not be parsed; download it to read it." } }
            }
        }
    };
    page(
        StatusCode::OK,
        pages::layout(&subject, Some(&who.viewer()), None, body),
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

const TREE_DEPTH_MAX: usize = 16;

/// Part `i` of `m` and the parts under it.
fn part_tree(m: &mail_parser::Message<'_>, seq: u64, i: u32, depth: usize) -> Markup {
    let Some(part) = m.parts.get(i as usize) else {
        return html! {};
    };
    let ctype = part
        .content_type()
        .map(|t| match t.subtype() {
            Some(s) => format!("{}/{}", t.ctype(), s),
            None => t.ctype().to_string(),
        })
        .unwrap_or_else(|| "text/plain".into());
    let name = part.attachment_name();
    html! {
        div.part {
            p.part-head {
                code { (ctype) }
                @if !matches!(part.body, PartType::Multipart(_)) {
                    " · " (part.contents().len()) " bytes"
                    @if let Some(n) = name { " · " strong { (n) } }
                    " · " a href={ "/message/" (seq) "/part/" (i) } download { "download" }
                }
            }
            @match &part.body {
                PartType::Text(t) if name.is_none() => { pre.text { (t) } }
                PartType::Html(h) if name.is_none() => {
                    p.note { "HTML part, shown as its source: nothing in it runs or loads." }
                    pre.html-source { (h) }
                }
                PartType::Multipart(children) if depth < TREE_DEPTH_MAX => {
                    @for c in children { (part_tree(m, seq, *c, depth + 1)) }
                }
                PartType::Message(_) => { p.note { "An attached message: download it to read it." } }
                _ => {}
            }
        }
    }
}

/// `/message/N/eml`: the exact accepted bytes, as a download.
pub async fn eml<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    Path(seq): Path<u64>,
) -> Response {
    match viewed(&c, &headers, seq, false).await {
        Ok((_, _, raw)) => download(raw, "message/rfc822", &format!("item-{seq}.eml")),
        Err(r) => r,
    }
}

/// `/message/N/part/I`: one part's decoded content, as a download (never shown inline).
pub async fn part<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    Path((seq, i)): Path<(u64, u32)>,
) -> Response {
    let (who, _, raw) = match viewed(&c, &headers, seq, false).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(m) = MessageParser::default().parse(&raw) else {
        return page(
            StatusCode::NOT_FOUND,
            pages::problem(Some(&who.viewer()), "Not available", "unparseable message"),
        );
    };
    let Some(p) = m.parts.get(i as usize) else {
        return page(
            StatusCode::NOT_FOUND,
            pages::problem(Some(&who.viewer()), "Not available", "no such part"),
        );
    };
    let name = p
        .attachment_name()
        .map(safe_file_name)
        .unwrap_or_else(|| format!("item-{seq}-part-{i}.bin"));
    download(p.contents().to_vec(), "application/octet-stream", &name)
}

/// A file name safe in a `Content-Disposition` header: printable ASCII without quotes,
/// backslashes or path separators.
fn safe_file_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !"\"\\/;".contains(c) || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if s.trim().is_empty() {
        "attachment.bin".into()
    } else {
        s
    }
}

fn download(bytes: Vec<u8>, ctype: &'static str, name: &str) -> Response {
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        safe_file_name(name)
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// `POST /message/N/hold`: legal hold on (`held=1`) or off.
pub async fn hold<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    Path(seq): Path<u64>,
    body: Bytes,
) -> Response {
    let (who, _, f) = match c.require_form(&headers, Action::LegalHold, &body) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let held = f.get("held") == Some("1");
    let r: Result<api::ArchiveHeld, String> = c
        .ask(
            &who,
            api::Local::ArchiveHold {
                target: seq.to_string(),
                held,
            },
        )
        .await;
    match r {
        Ok(_) => Redirect::to(&format!("/message/{seq}")).into_response(),
        Err(e) => page(
            StatusCode::BAD_REQUEST,
            pages::problem(Some(&who.viewer()), "Legal hold not changed", &e),
        ),
    }
}

/// The inbox of `who` within `scope`, as every unit holds it now, after `flash`.
async fn quarantine_page<B: Backend>(
    c: &Console<B>,
    who: &Who,
    scope: &crate::policy::Scope,
    flash: Option<Markup>,
    status: StatusCode,
) -> Response {
    let found: Result<api::QuarantineFound, String> = c
        .ask(
            who,
            api::Cluster::QuarantineList {
                scope: scope_field(scope),
            },
        )
        .await;
    let body = html! {
        @if let Some(f) = flash { (f) }
        p.hint { "Mail for your addresses that the gateway held back, on every unit. A message with a virus stays with the administrators." }
        @match &found {
            Err(e) => { p.error role="alert" { (e) } }
            Ok(q) => {
                @for n in &q.notes { p.error { (n) } }
                @if q.items.is_empty() { p { "Nothing is held for you." } } @else {
                    table.quarantine {
                        thead { tr { th { "Arrived (UTC)" } th { "From" } th { "To" } th { "Subject" } th { "Why" } th { "Unit" } th { "" } } }
                        tbody {
                            @for m in &q.items {
                                tr {
                                    td { (when(m.arrived_ms)) }
                                    td { (m.sender) }
                                    td { (m.recipients.join(", ")) }
                                    td { (m.subject.as_deref().unwrap_or("(no subject)")) }
                                    td { (m.reason) }
                                    td { (m.unit) }
                                    td {
                                        @if m.releasable || m.deletable {
                                            form.inline method="post" action="/quarantine" {
                                                input type="hidden" name="csrf" value=(who.csrf);
                                                input type="hidden" name="unit" value=(m.unit);
                                                input type="hidden" name="id" value=(m.id);
                                                @if m.releasable { button type="submit" name="action" value="release" { "Release" } }
                                                @if m.deletable { button.danger type="submit" name="action" value="delete" { "Delete" } }
                                            }
                                        } @else { span.note { "administrators only" } }
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
        pages::layout("Quarantine", Some(&who.viewer()), None, body),
    )
}

/// `/quarantine`: the messages held for the user's addresses, on every unit.
pub async fn quarantine<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
) -> Response {
    let (who, scope) = match c.require(&headers, Action::Quarantine) {
        Ok(w) => w,
        Err(r) => return r,
    };
    quarantine_page(&c, &who, &scope, None, StatusCode::OK).await
}

/// `POST /quarantine`: release or delete one, on the unit holding it, if its policy allows
/// a recipient to (never for a virus).
pub async fn quarantine_act<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, scope, f) = match c.require_form(&headers, Action::Quarantine, &body) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let acted: Result<api::QuarantineActed, String> = c
        .ask(
            &who,
            api::Cluster::QuarantineAct {
                unit: f.get("unit").unwrap_or("").to_string(),
                id: f.get("id").unwrap_or("").to_string(),
                action: f.get("action").unwrap_or("").to_string(),
                scope: scope_field(&scope),
                who: who.asker(),
            },
        )
        .await;
    let (flash, status) = match acted {
        Ok(a) => (
            html! { p.flash role="status" { (a.id) " " (a.done) " on " (a.unit) "." } },
            StatusCode::OK,
        ),
        Err(e) => (
            html! { p.error role="alert" { "Refused: " (e) } },
            StatusCode::FORBIDDEN,
        ),
    };
    quarantine_page(&c, &who, &scope, Some(flash), status).await
}

/// How long an export waits for its download.
const EXPORT_KEPT_MS: u64 = 60 * 60 * 1000;

/// `POST /export`: every item a query selects exported by the daemon (audited as an export,
/// exact bytes, with its signed manifest), offered for download to the auditor who asked.
pub async fn export<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, _, f) = match c.require_form(&headers, Action::BulkExport, &body) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let now = crate::web::now_ms();
    {
        let mut exports = c.exports.lock().unwrap_or_else(|p| p.into_inner());
        exports.retain(|_, e| {
            let keep = now.saturating_sub(e.made_ms) < EXPORT_KEPT_MS;
            if !keep {
                let _ = std::fs::remove_file(&e.data);
                let _ = std::fs::remove_file(&e.manifest);
            }
            keep
        });
    }
    let query = f.get("q").unwrap_or("").trim().to_string();
    let (format, ext) = match f.get("format") {
        Some("eml-zip") => ("eml-zip", "zip"),
        _ => ("mbox", "mbox"),
    };
    let token = crate::session::random_token();
    let dir = c.backend.export_dir();
    let out = dir.join(format!("{token}.{ext}"));
    let done: Result<api::ArchiveBulkExported, String> = c
        .ask(
            &who,
            api::Long::ArchiveBulkExport {
                query: query.clone(),
                format: format.into(),
                out: out.display().to_string(),
                progress: false,
            },
        )
        .await;
    let body = match done {
        Err(e) => html! { p.error role="alert" { "Not exported: " (e) } },
        Ok(d) => {
            c.exports.lock().unwrap_or_else(|p| p.into_inner()).insert(
                token.clone(),
                crate::web::Export {
                    owner: who.name.clone(),
                    data: out.clone(),
                    manifest: std::path::PathBuf::from(&d.manifest),
                    made_ms: now,
                },
            );
            html! {
                p.flash role="status" { (d.items) " messages (" (d.bytes) " bytes) exported for " code { (query) } "." }
                p.actions {
                    a.button href={ "/export/" (token) "/data" } download { "Download the " (format) }
                    a.button href={ "/export/" (token) "/manifest" } download { "Download the signed manifest" }
                }
                p.hint { "Keep the manifest beside the export: spoolctl archive verify-export checks that the set is complete and unaltered. The download is kept for an hour." }
            }
        }
    };
    page(
        StatusCode::OK,
        pages::layout("Export", Some(&who.viewer()), None, body),
    )
}

/// `/export/TOKEN/data|manifest`: an export's file, for the auditor who made it.
pub async fn export_download<B: Backend>(
    State(c): State<Arc<Console<B>>>,
    headers: HeaderMap,
    Path((token, part)): Path<(String, String)>,
) -> Response {
    let (who, _) = match c.require(&headers, Action::BulkExport) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let found = {
        let exports = c.exports.lock().unwrap_or_else(|p| p.into_inner());
        exports
            .get(&token)
            .filter(|e| e.owner == who.name)
            .map(|e| (e.data.clone(), e.manifest.clone()))
    };
    let Some((data, manifest)) = found else {
        return page(
            StatusCode::NOT_FOUND,
            pages::problem(Some(&who.viewer()), "Not available", "no such export"),
        );
    };
    let (path, ctype) = match part.as_str() {
        "data" => (data, "application/octet-stream"),
        "manifest" => (manifest, "application/jsonl"),
        _ => {
            return page(
                StatusCode::NOT_FOUND,
                pages::problem(Some(&who.viewer()), "Not available", "no such part"),
            )
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(&token, "export"))
        .unwrap_or_else(|| "export".into());
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return page(
                StatusCode::NOT_FOUND,
                pages::problem(Some(&who.viewer()), "Not available", &e.to_string()),
            )
        }
    };
    // Streamed a chunk at a time: an export may be larger than memory.
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut r = axum::body::Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        safe_file_name(&name)
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// One line of the audit log, as the daemon lists it.
#[derive(serde::Deserialize)]
struct AuditLine {
    n: u64,
    time_ms: u64,
    user: String,
    action: String,
    detail: String,
    items: u64,
}

/// `/audit`: the newest entries of the audit log, newest first.
pub async fn audit<B: Backend>(State(c): State<Arc<Console<B>>>, headers: HeaderMap) -> Response {
    let (who, _) = match c.require(&headers, Action::AuditLog) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let lines: Result<Vec<AuditLine>, String> = c
        .ask(
            &who,
            api::Local::AuditList {
                from: 0,
                limit: Some(500),
            },
        )
        .await;
    let body = match lines {
        Err(e) => html! { p.error role="alert" { (e) } },
        Ok(lines) => html! {
            table.audit {
                thead { tr { th { "#" } th { "When (UTC)" } th { "Who" } th { "What" } th { "Detail" } th { "Items" } } }
                tbody {
                    @for l in lines.iter().rev() {
                        tr {
                            td { (l.n) }
                            td { (when(l.time_ms)) }
                            td { (l.user) }
                            td { (l.action) }
                            td { (l.detail) }
                            td { (l.items) }
                        }
                    }
                }
            }
        },
    };
    page(
        StatusCode::OK,
        pages::layout("Audit log", Some(&who.viewer()), None, body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_in_headers_lose_what_could_break_out() {
        let table = [
            ("report.pdf", "report.pdf"),
            ("a\"b.txt", "a_b.txt"),
            ("../../etc/passwd", ".._.._etc_passwd"),
            ("x\r\nSet-Cookie: y", "x__Set-Cookie: y"),
            ("", "attachment.bin"),
            ("Grüße.txt", "Gr__e.txt"),
        ];
        for (name, want) in table {
            assert_eq!(safe_file_name(name), want, "{name:?}");
        }
    }
}
