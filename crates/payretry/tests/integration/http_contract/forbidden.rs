//! 403: what each role may do.

use super::*;

#[tokio::test]
async fn only_buyers_may_create_checkouts() {
    let app = TestApp::spawn().await;
    let baseline = writes(&app).await;

    for role in [Role::Support, Role::Admin] {
        let token = app.token("staff-1", role);
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&token),
                Some("staff"),
                Some(json!({"amount": 2500, "currency": "usd"})),
            )
            .await;

        assert_problem(response, 403, "forbidden").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn buyer_may_not_read_the_audit_log_but_support_may() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let path = format!("/payments/checkout/{id}/audit");

    let as_buyer = get(&app, &path, Some(&buyer)).await;
    let as_support = get(&app, &path, Some(&app.token("support-1", Role::Support))).await;

    assert_problem(as_buyer, 403, "forbidden").await;
    assert_eq!(as_support.status(), StatusCode::OK);
    let log: Value = as_support.json().await.unwrap();
    let entries = log["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{log}");
    for entry in entries {
        assert_eq!(
            keys_of(entry),
            field_set(&["at", "action", "attemptNumber", "actor", "details"]),
            "{entry}"
        );
        rfc3339_utc(&entry["at"]);
    }
    assert_eq!(entries[0]["action"], "checkout_created");
    assert_eq!(entries[1]["action"], "payment_failed");
}

#[tokio::test]
async fn only_admins_may_use_dead_letters() {
    let app = TestApp::spawn().await;

    for role in [Role::Buyer, Role::Support] {
        let token = app.token("someone", role);
        let list = get(&app, "/admin/dead-letters", Some(&token)).await;
        let redrive = app
            .request(
                Method::POST,
                "/admin/dead-letters/1/redrive",
                Some(&token),
                None,
                None,
            )
            .await;

        assert_problem(list, 403, "forbidden").await;
        assert_problem(redrive, 403, "forbidden").await;
    }
    let as_admin = get(&app, "/admin/dead-letters", Some(&app.admin())).await;
    assert_eq!(as_admin.status(), StatusCode::OK);
    let body: Value = as_admin.json().await.unwrap();
    assert_eq!(body, json!({"deadLetters": [], "nextCursor": null}));
}
