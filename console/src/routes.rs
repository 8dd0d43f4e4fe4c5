//! The console's routes, and the security headers every answer carries.

use crate::web::{home, login, login_form, logout, page, Backend, Console};
use crate::{archive_pages as a, gateway_pages as g, pages};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// The console's routes over `console`.
pub fn router<B: Backend>(console: Arc<Console<B>>) -> Router {
    Router::new()
        .route("/", get(home::<B>))
        .route("/login", get(login_form::<B>).post(login::<B>))
        .route("/logout", post(logout::<B>))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .route("/search", get(a::search::<B>))
        .route("/message/{seq}", get(a::message::<B>))
        .route("/message/{seq}/eml", get(a::eml::<B>))
        .route("/message/{seq}/part/{part}", get(a::part::<B>))
        .route("/message/{seq}/hold", post(a::hold::<B>))
        .route("/audit", get(a::audit::<B>))
        .route("/export", post(a::export::<B>))
        .route("/export/{token}/{part}", get(a::export_download::<B>))
        .route(
            "/quarantine",
            get(a::quarantine::<B>).post(a::quarantine_act::<B>),
        )
        .route("/status", get(g::status::<B>))
        .route("/track", get(g::track::<B>))
        .route("/queue", get(g::queue::<B>).post(g::queue_action::<B>))
        .route(
            "/settings",
            get(g::settings::<B>).post(g::settings_change::<B>),
        )
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

/// Headers on every answer: no script or style but the console's own files, no framing, no
/// caching of pages that show mail, no sniffing of downloads as HTML.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        pages::problem(None, "Not found", "There is no such page."),
    )
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../static/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../static/console.js"),
    )
        .into_response()
}
