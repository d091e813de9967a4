//! Every list route is bounded and pages the same way (DESIGN.md §3): `limit` 1 to 100
//! (50 by default), an opaque `cursor`, and `nextCursor`, null on the last page. A session's
//! audit log that anonymous sandbox traffic grew to thousands of rows no longer comes back in
//! one answer, and a bad `limit` or `cursor` is a 400 `invalid_request`, never a 500.

use crate::support::app::{TestApp, assert_problem, session_id};
use payretry::storage::{
    Committed, DuplicatePaymentStatus, NewAuditEntry, NewDeadLetter, NewDuplicatePayment,
    SessionRecord, Transition,
};
use payretry_domain::{
    AttemptNumber, AuditAction, PaymentSessionId, RetryJob, Role, SessionStatus,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// More than the largest page, so no single answer can hold them all.
const AUDIT_ENTRIES: usize = 130;
const DEAD_LETTERS: usize = 105;

async fn reload(app: &TestApp, id: &PaymentSessionId) -> SessionRecord {
    app.payments
        .storage
        .session(id)
        .await
        .expect("read session")
        .expect("session exists")
}

async fn commit(app: &TestApp, t: Transition) {
    assert_eq!(
        app.payments.storage.commit(t).await.expect("commit"),
        Committed::Applied
    );
}

/// A session whose audit log holds [`AUDIT_ENTRIES`] entries (checkout_created first), each
/// numbered in its details so order and coverage can be checked.
async fn session_with_long_audit_log(app: &TestApp) -> String {
    let created = app.create_checkout(&app.buyer()).await;
    let raw = session_id(&created);
    let id = PaymentSessionId::parse(&raw).unwrap();
    let mut n = 1;
    while n < AUDIT_ENTRIES {
        let session = reload(app, &id).await;
        let mut t = Transition::new(&session, session.state.clone());
        while n < AUDIT_ENTRIES && t.audit.len() < 25 {
            t.audit.push(NewAuditEntry {
                action: AuditAction::PaymentFailed,
                attempt: Some(AttemptNumber::ORIGINAL),
                actor: "provider".to_owned(),
                details: json!({"n": n}),
            });
            n += 1;
        }
        commit(app, t).await;
    }
    raw
}

async fn get(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.request(Method::GET, path, Some(token), None, None)
        .await
}

/// `GET path` (which may carry a query already); asserts 200 and returns the body.
async fn page(app: &TestApp, path: &str, token: &str) -> Value {
    let response = get(app, path, token).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    response.json().await.unwrap()
}

/// `path` with `query` appended after `?` or `&`.
fn with_query(path: &str, query: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}{query}")
}

/// Follows `nextCursor` from the first page of `path` (`limit` per page); returns every page's
/// `field` items, checking that each page but the last is full and the last has a null
/// `nextCursor`.
async fn walk(
    app: &TestApp,
    path: &str,
    field: &str,
    limit: usize,
    token: &str,
) -> Vec<Vec<Value>> {
    let first = with_query(path, &format!("limit={limit}"));
    let mut body = page(app, &first, token).await;
    let mut pages = Vec::new();
    loop {
        let items = body[field].as_array().expect("a list").clone();
        assert!(items.len() <= limit, "a page over its limit");
        pages.push(items);
        match &body["nextCursor"] {
            Value::Null => return pages,
            Value::String(cursor) => {
                assert_eq!(
                    pages.last().unwrap().len(),
                    limit,
                    "only the last page is short"
                );
                assert!(pages.len() < 50, "paging never ends");
                let next = with_query(path, &format!("limit={limit}&cursor={cursor}"));
                body = page(app, &next, token).await;
            }
            other => panic!("nextCursor must be a string or null, not {other}"),
        }
    }
}

/// A bad `limit` or `cursor` on `path`: 400 `invalid_request` naming the parameter, with
/// nothing internal in the body.
async fn assert_bad_parameters_refused(app: &TestApp, path: &str, token: &str) {
    let cases = [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("limit=", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=", "cursor"),
        ("limit=10&cursor=%27%20OR%201%3D1--", "cursor"),
    ];
    for (query, parameter) in cases {
        let response = get(app, &with_query(path, query), token).await;
        let body = assert_problem(response, 400, "invalid_request").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(parameter), "{query}: {body}");
        let text = body.to_string().to_lowercase();
        for internal in [
            "select",
            "sqlx",
            "sqlite",
            "postgres",
            "panicked",
            "deserialize",
        ] {
            assert!(!text.contains(internal), "{query} leaks {internal}: {body}");
        }
    }
}

#[tokio::test]
async fn the_audit_log_pages_fifty_by_default_and_at_most_a_hundred() {
    // Arrange: a session whose log is longer than any page.
    let app = TestApp::spawn().await;
    let id = session_with_long_audit_log(&app).await;
    let path = format!("/payments/checkout/{id}/audit");
    let support = app.token("support-1", Role::Support);

    // Act + assert: the default page is 50 entries with a cursor to the rest.
    let first = page(&app, &path, &support).await;
    assert_eq!(first["entries"].as_array().unwrap().len(), 50);
    assert_eq!(first["entries"][0]["action"], "checkout_created");
    assert!(first["nextCursor"].is_string(), "{}", first["nextCursor"]);

    let hundred = page(&app, &format!("{path}?limit=100"), &support).await;
    assert_eq!(hundred["entries"].as_array().unwrap().len(), 100);
    assert!(hundred["nextCursor"].is_string());

    // An unknown query parameter is ignored.
    let ignored = page(&app, &format!("{path}?limit=5&sort=desc"), &support).await;
    assert_eq!(ignored["entries"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn following_next_cursor_visits_every_audit_entry_once_in_order() {
    let app = TestApp::spawn().await;
    let id = session_with_long_audit_log(&app).await;
    let path = format!("/payments/checkout/{id}/audit");

    for limit in [50, 100, 7] {
        let pages = walk(&app, &path, "entries", limit, &app.admin()).await;

        assert_eq!(pages.len(), AUDIT_ENTRIES.div_ceil(limit), "limit {limit}");
        let entries: Vec<Value> = pages.concat();
        assert_eq!(entries.len(), AUDIT_ENTRIES);
        assert_eq!(entries[0]["action"], "checkout_created");
        let numbers: Vec<u64> = entries[1..]
            .iter()
            .map(|e| e["details"]["n"].as_u64().expect("numbered entry"))
            .collect();
        let expected: Vec<u64> = (1..AUDIT_ENTRIES as u64).collect();
        assert_eq!(
            numbers, expected,
            "each entry once, oldest first (limit {limit})"
        );
    }
}

#[tokio::test]
async fn bad_audit_page_parameters_are_invalid_requests() {
    let app = TestApp::spawn().await;
    let created = app.create_checkout(&app.buyer()).await;
    let id = created["sessionId"].as_str().unwrap();
    let path = format!("/payments/checkout/{id}/audit");

    assert_bad_parameters_refused(&app, &path, &app.admin()).await;

    // Roles are checked before parameters: a buyer learns nothing from a bad limit.
    let response = get(&app, &format!("{path}?limit=0"), &app.buyer()).await;
    assert_problem(response, 403, "forbidden").await;
    // A well-formed cursor past the end is an empty last page.
    let past = page(&app, &format!("{path}?cursor=v1.999999999"), &app.admin()).await;
    assert_eq!(past, json!({"entries": [], "nextCursor": null}));
}

/// [`DEAD_LETTERS`] dead letters, each naming its number in `lastError`.
async fn many_dead_letters(app: &TestApp) {
    let created = app.create_checkout(&app.buyer()).await;
    let id = PaymentSessionId::parse(created["sessionId"].as_str().unwrap()).unwrap();
    for n in 0..DEAD_LETTERS {
        let session = reload(app, &id).await;
        let mut state = session.state.clone();
        state.status = SessionStatus::Failed;
        let mut t = Transition::new(&session, state);
        let now = chrono::Utc::now();
        t.dead_letter = Some(NewDeadLetter {
            job: RetryJob::new(id.clone(), AttemptNumber::new(1), 60, now, now),
            receive_count: 5,
            last_error: format!("failure {n}"),
        });
        commit(app, t).await;
    }
}

#[tokio::test]
async fn dead_letters_page_like_every_list() {
    // Arrange
    let app = TestApp::spawn().await;
    many_dead_letters(&app).await;
    let admin = app.admin();

    // Act + assert: 50 by default, 100 at most, and a walk sees each one once, in order.
    let first = page(&app, "/admin/dead-letters", &admin).await;
    assert_eq!(first["deadLetters"].as_array().unwrap().len(), 50);
    assert!(first["nextCursor"].is_string());
    let hundred = page(&app, "/admin/dead-letters?limit=100", &admin).await;
    assert_eq!(hundred["deadLetters"].as_array().unwrap().len(), 100);

    let pages = walk(&app, "/admin/dead-letters", "deadLetters", 40, &admin).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [40, 40, DEAD_LETTERS - 80]
    );
    let errors: Vec<String> = pages
        .concat()
        .iter()
        .map(|d| d["lastError"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..DEAD_LETTERS).map(|n| format!("failure {n}")).collect();
    assert_eq!(errors, expected);

    assert_bad_parameters_refused(&app, "/admin/dead-letters", &admin).await;
    let support = app.token("support-1", Role::Support);
    let response = get(&app, "/admin/dead-letters?limit=0", &support).await;
    assert_problem(response, 403, "forbidden").await;
}

#[tokio::test]
async fn duplicate_payments_page_like_every_list() {
    // Arrange: three double payments of one session (attempts 0 to 2 paid besides 3).
    let app = TestApp::spawn().await;
    let created = app.create_checkout(&app.buyer()).await;
    let id = PaymentSessionId::parse(created["sessionId"].as_str().unwrap()).unwrap();
    for attempt in 0..3 {
        let session = reload(&app, &id).await;
        let mut t = Transition::new(&session, session.state.clone());
        t.duplicate_payment = Some(NewDuplicatePayment {
            paid_attempt: AttemptNumber::new(3),
            duplicate_attempt: AttemptNumber::new(attempt),
            provider_session_id: None,
            payment_intent: Some(format!("pi_dup_{attempt}")),
            status: DuplicatePaymentStatus::Detected,
        });
        commit(&app, t).await;
    }
    let admin = app.admin();

    // Act + assert: one page holds all three, with no cursor after it.
    let all = page(&app, "/admin/duplicate-payments", &admin).await;
    assert_eq!(all["duplicatePayments"].as_array().unwrap().len(), 3);
    assert_eq!(all["nextCursor"], Value::Null);

    let pages = walk(
        &app,
        "/admin/duplicate-payments",
        "duplicatePayments",
        1,
        &admin,
    )
    .await;
    let intents: Vec<&str> = pages
        .iter()
        .flatten()
        .map(|d| d["paymentIntent"].as_str().unwrap())
        .collect();
    assert_eq!(intents, ["pi_dup_0", "pi_dup_1", "pi_dup_2"]);

    assert_bad_parameters_refused(&app, "/admin/duplicate-payments", &admin).await;
}

#[tokio::test]
async fn the_openapi_document_declares_paging_on_every_list() {
    let app = TestApp::spawn().await;
    let document: Value = app
        .request(Method::GET, "/openapi.json", None, None, None)
        .await
        .json()
        .await
        .unwrap();

    let lists = [
        ("/payments/checkout/{sessionId}/audit", "AuditLogView"),
        ("/admin/dead-letters", "DeadLettersView"),
        ("/admin/duplicate-payments", "DuplicatePaymentsView"),
        ("/admin/sessions", "AdminSessionsView"),
    ];
    for (path, schema) in lists {
        let operation = &document["paths"][path]["get"];
        let params: Vec<(&str, &str)> = operation["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path} has parameters"))
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["in"].as_str().unwrap()))
            .collect();
        assert!(params.contains(&("limit", "query")), "{path}: {params:?}");
        assert!(params.contains(&("cursor", "query")), "{path}: {params:?}");
        assert!(
            operation["responses"]["400"].is_object(),
            "{path} declares 400"
        );
        assert!(
            document["components"]["schemas"][schema]["properties"]["nextCursor"].is_object(),
            "{schema} has nextCursor"
        );
    }
}
