//! `GET /pay/{sessionId}`: the buyer's status page. The bearer token travels in the URL
//! fragment (`#token=…`), which browsers never send to the server, so it cannot reach logs;
//! the page's script reads it, keeps it in `sessionStorage`, clears the fragment and calls
//! the JSON API. The page has no build step and no external assets: its one style sheet and
//! one script are inline, allowed by a per-response CSP nonce.

use super::AppState;
use super::page::{STYLE, escape, nonce, page_headers};
use axum::Router;
use axum::extract::Path;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

/// The buyer's status page.
pub fn router() -> Router<AppState> {
    Router::new().route("/pay/{session_id}", get(show))
}

fn render(session_id: &str, nonce: &str) -> String {
    // The nonce and style go in first, so a session id cannot smuggle a placeholder in.
    include_str!("pay_page.html")
        .replace("{{STYLE}}", STYLE)
        .replace("{{NONCE}}", nonce)
        .replace("{{SESSION_ID}}", &escape(session_id))
}

pub async fn show(Path(id): Path<String>) -> Response {
    let nonce = nonce();
    (page_headers(&nonce, true), Html(render(&id, &nonce))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_is_escaped_and_placeholders_filled() {
        let html = render("ps_<script>\"x\"{{NONCE}}", "abc123");
        assert!(html.contains("data-session-id=\"ps_&lt;script&gt;&quot;x&quot;{{NONCE}}\""));
        assert!(!html.contains("{{STYLE}}"));
        assert!(!html.contains("{{SESSION_ID}}"));
        assert_eq!(html.matches("nonce=\"abc123\"").count(), 2);
        assert!(html.contains(r#"<meta name="referrer" content="no-referrer">"#));
    }
}
