//! `GET /pay/{sessionId}`: the buyer's status page. The bearer token travels in the URL
//! fragment (`#token=…`), which browsers never send to the server, so it cannot reach logs;
//! the page's script reads it and calls the JSON API.

use super::sandbox::escape;
use axum::extract::Path;
use axum::response::Html;

pub async fn show(Path(id): Path<String>) -> Html<String> {
    Html(include_str!("pay_page.html").replace("{{SESSION_ID}}", &escape(&id)))
}
