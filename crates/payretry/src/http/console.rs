//! `GET /admin`: the operator console (DESIGN.md §6c), one self-contained page for support
//! and admins. Like the buyer's page it has no external assets: its style sheet and script
//! are inline, allowed by a per-response CSP nonce. The page itself is public and holds no
//! data: the operator pastes a token, kept in `sessionStorage` (never in a URL), and the
//! script reads everything through the JSON routes of §3, which decide what the token may
//! see and do. Buttons for admin actions are drawn only for an admin token.

use super::AppState;
use super::page::{STYLE, nonce, page_headers};
use axum::Router;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

pub fn router() -> Router<AppState> {
    Router::new().route("/admin", get(show))
}

fn render(nonce: &str) -> String {
    include_str!("console.html")
        .replace("{{STYLE}}", STYLE)
        .replace("{{NONCE}}", nonce)
}

pub async fn show() -> Response {
    let nonce = nonce();
    (page_headers(&nonce, true), Html(render(&nonce))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_and_nonced() {
        let html = render("abc123");
        assert!(!html.contains("{{"));
        assert_eq!(html.matches("nonce=\"abc123\"").count(), 2);
        assert!(!html.contains("src=\"http"), "no external script or image");
        assert!(
            !html.contains("<link rel=\"stylesheet\""),
            "no external style sheet"
        );
        assert!(html.contains(r#"<meta name="referrer" content="no-referrer">"#));
    }
}
