//! Stripe's wire format: the error envelope, injected failures, headers and the clock.

use super::*;

pub(super) async fn unknown_route(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
) -> Response {
    shared.violation(format!("unexpected request {method} {}", uri.path()));
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("Unrecognized request URL ({method}: {}).", uri.path()),
    )
}

pub(super) fn injected_failure(status: u16, retry_after: Option<Duration>) -> Response {
    let status = StatusCode::from_u16(status).expect("a valid HTTP status to inject");
    let (kind, code) = match status.as_u16() {
        429 => ("rate_limit_error", Some("rate_limit")),
        500.. => ("api_error", None),
        _ => ("invalid_request_error", None),
    };
    let mut response = stripe_error(
        status,
        kind,
        code,
        &format!("Injected failure (HTTP {})", status.as_u16()),
    );
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
    }
    response
}

/// Stripe's limiter refusing a request: 429 with code `rate_limit` and no `Retry-After`.
pub(super) fn rate_limit_refusal() -> Response {
    stripe_error(
        StatusCode::TOO_MANY_REQUESTS,
        "invalid_request_error",
        Some("rate_limit"),
        "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
    )
}

/// A 500 Stripe saved under the request's key: marked not worth retrying, and as a replay
/// when it is one.
pub(super) fn saved_server_error(body: Value, replayed: bool) -> Response {
    let mut response = stripe_json(StatusCode::INTERNAL_SERVER_ERROR, body);
    let headers = response.headers_mut();
    headers.insert("Stripe-Should-Retry", HeaderValue::from_static("false"));
    if replayed {
        headers.insert("Idempotent-Replayed", HeaderValue::from_static("true"));
    }
    response
}

pub(super) fn no_such_checkout(id: &str) -> Response {
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such checkout.session: '{id}'"),
    )
}

pub(super) fn stripe_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: &str,
) -> Response {
    stripe_json(
        status,
        json!({"error": {"type": kind, "code": code, "message": message}}),
    )
}

pub(super) fn stripe_json(status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    let request_id = format!("req_{}", &uuid::Uuid::new_v4().simple().to_string()[..14]);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("Request-Id", value);
    }
    response
}

pub(super) fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

pub(super) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A decimal integer written the one way (`"7"`, not `"07"`, `"+7"` or `"7.0"`).
pub(super) fn canonical_integer(text: &str) -> Option<i64> {
    let n = text.parse::<i64>().ok()?;
    (n.to_string() == text).then_some(n)
}

/// `2024-06-20`, optionally with a release name (`2024-09-30.acacia`).
pub(super) fn is_stripe_version(value: &str) -> bool {
    let date = value.split_once('.').map_or(value, |(date, _)| date);
    let bytes = date.as_bytes();
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        })
}

/// A form-encoded body as Stripe reads it, and what is wrong with its framing (not a form,
/// a parameter sent twice).
pub(super) fn read_form(
    headers: &HeaderMap,
    body: &Bytes,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut problems = Vec::new();
    let content_type = header_text(headers, header::CONTENT_TYPE.as_str()).unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        problems.push(format!("Content-Type is {content_type:?}, not a form"));
    }
    let mut form = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if form.insert(name.to_string(), value.to_string()).is_some() {
            problems.push(format!("parameter {name} sent twice"));
        }
    }
    (form, problems)
}
