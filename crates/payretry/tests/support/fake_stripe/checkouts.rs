//! Checkout Sessions: create (at Stripe's idempotency layer), retrieve, expire, and the
//! checks on what payretry sends.

use super::*;

impl Shared {
    /// A create at Stripe's idempotency layer; `fail` makes it a 500 saved under its key.
    fn create(&self, headers: &HeaderMap, body: &Bytes, fail: bool) -> Response {
        let (form, mut problems) = read_form(headers, body);
        let key = header_text(headers, "idempotency-key");

        let mut ledger = self.ledger();
        if let Some(key) = &key
            && let Some(answer) = ledger.replay("create", key, &form)
        {
            return answer;
        }

        let now = now_unix();
        problems.extend(validate_create(&form, key.as_deref(), now));
        if !problems.is_empty() {
            ledger
                .violations
                .extend(problems.iter().map(|p| format!("create: {p}")));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid"),
                &problems.join("; "),
            );
        }

        if fail {
            let body = json!({"error": {"type": "api_error", "code": null,
                "message": "An unknown error occurred (saved under this Idempotency-Key)"}});
            if let Some(key) = key {
                ledger.saved_failures.insert(
                    key,
                    Stored {
                        params: form,
                        body: body.clone(),
                    },
                );
            }
            drop(ledger);
            return saved_server_error(body, false);
        }

        let id = format!("cs_test_{}", uuid::Uuid::new_v4().simple());
        let checkout = FakeCheckout {
            url: format!("{}/pay/{id}", self.base_url),
            id,
            payment_session_id: form["client_reference_id"].clone(),
            retry_attempt: form["metadata[retry_attempt]"].parse().unwrap_or_default(),
            idempotency_key: key.clone().unwrap_or_default(),
            status: "open".to_owned(),
            payment_status: "unpaid".to_owned(),
            expires_at: form["expires_at"].parse().unwrap_or_default(),
            created: now,
            form: form.clone(),
            payment_intent: None,
            payment_intent_status: None,
        };
        let body = checkout_json(&checkout);
        if let Some(key) = key {
            ledger.idempotency.insert(
                key,
                Stored {
                    params: form,
                    body: body.clone(),
                },
            );
        }
        ledger.checkouts.push(checkout);
        drop(ledger);
        stripe_json(StatusCode::OK, body)
    }
}

pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    let key = header_text(&headers, "idempotency-key");
    let mode = {
        let mut ledger = shared.ledger();
        if let Some(key) = &key
            && ledger.in_flight.contains(key)
        {
            ledger.conflicts += 1;
            drop(ledger);
            return stripe_error(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("idempotency_key_in_use"),
                "There is currently another in-progress request using this Idempotency-Key. \
                 Please try again later.",
            );
        }
        let fresh = key.as_ref().is_none_or(|k| {
            !ledger.idempotency.contains_key(k) && !ledger.saved_failures.contains_key(k)
        });
        if fresh {
            ledger.create_modes.pop_front()
        } else {
            None
        }
    };
    match mode {
        Some(CreateMode::InFlight(duration)) => {
            if let Some(key) = &key {
                shared.ledger().in_flight.insert(key.clone());
            }
            // Runs to the end even if the client hangs up and this handler is dropped.
            let running = tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                let response = shared.create(&headers, &body, false);
                if let Some(key) = &key {
                    shared.ledger().in_flight.remove(key);
                }
                response
            });
            running.await.expect("the in-flight create")
        }
        Some(CreateMode::SavedServerError) => shared.create(&headers, &body, true),
        None => shared.create(&headers, &body, false),
    }
}

pub(super) async fn retrieve(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    // `expand[]=payment_intent` (or `expand[0]=…`) turns the id into the object.
    let expand = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .any(|(name, value)| name.starts_with("expand[") && value == "payment_intent");
    let mut ledger = shared.ledger();
    let now = now_unix();
    match ledger.checkouts.iter_mut().find(|c| c.id == id) {
        Some(checkout) => {
            expire_if_due(checkout, now);
            let mut body = checkout_json(checkout);
            if expand && let Some(intent) = &checkout.payment_intent {
                body["payment_intent"] = json!({"id": intent, "object": "payment_intent",
                    "status": checkout.payment_intent_status});
            }
            stripe_json(StatusCode::OK, body)
        }
        None => no_such_checkout(&id),
    }
}

pub(super) async fn expire(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    let mut ledger = shared.ledger();
    let now = now_unix();
    let Some(checkout) = ledger.checkouts.iter_mut().find(|c| c.id == id) else {
        return no_such_checkout(&id);
    };
    expire_if_due(checkout, now);
    if checkout.status != "open" {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            &format!(
                "Only Checkout Sessions with a status in [\"open\"] can be expired. This \
                 Checkout Session has a status of \"{}\".",
                checkout.status
            ),
        );
    }
    checkout.status = "expired".to_owned();
    let body = checkout_json(checkout);
    ledger.expired_ids.push(id);
    stripe_json(StatusCode::OK, body)
}

pub(super) async fn pay_page(Path(id): Path<String>) -> Html<String> {
    Html(format!(
        "<!doctype html><title>Fake Stripe checkout</title><p>Checkout {id}</p>"
    ))
}

/// Every problem with a create request's form and idempotency key.
pub(super) fn validate_create(
    form: &BTreeMap<String, String>,
    key: Option<&str>,
    now: i64,
) -> Vec<String> {
    let mut problems = Vec::new();
    for field in CREATE_FIELDS {
        if !form.contains_key(field) {
            problems.push(format!("missing parameter {field}"));
        }
    }
    for field in form.keys() {
        if !CREATE_FIELDS.contains(&field.as_str()) {
            problems.push(format!("unexpected parameter {field}"));
        }
    }
    let field = |name: &str| form.get(name).map(String::as_str);
    let mut expect = |ok: bool, problem: &str| {
        if !ok {
            problems.push(problem.to_owned());
        }
    };

    expect(
        field("mode").is_none_or(|v| v == "payment"),
        "mode must be `payment`",
    );
    expect(
        field("line_items[0][price_data][currency]")
            .is_none_or(|v| v.len() == 3 && v.bytes().all(|b| b.is_ascii_lowercase())),
        "currency must be three lowercase letters",
    );
    expect(
        field("line_items[0][price_data][unit_amount]")
            .is_none_or(|v| canonical_integer(v).is_some_and(|n| (1..=99_999_999).contains(&n))),
        "unit_amount must be an integer from 1 to 99999999",
    );
    expect(
        field("line_items[0][price_data][product_data][name]").is_none_or(|v| !v.trim().is_empty()),
        "product_data[name] must not be empty",
    );
    expect(
        field("line_items[0][quantity]").is_none_or(|v| v == "1"),
        "quantity must be 1",
    );
    for name in ["success_url", "cancel_url"] {
        expect(
            field(name).is_none_or(|v| {
                reqwest::Url::parse(v).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
            }),
            &format!("{name} must be an absolute http(s) URL"),
        );
    }

    let session = field("client_reference_id");
    expect(
        session.is_none_or(|v| PaymentSessionId::parse(v).is_ok()),
        "client_reference_id must be a payment session id (ps_…)",
    );
    for name in [
        "metadata[payment_session_id]",
        "payment_intent_data[metadata][payment_session_id]",
    ] {
        expect(
            field(name).is_none_or(|v| Some(v) == session),
            &format!("{name} must equal client_reference_id"),
        );
    }
    let attempt = field("metadata[retry_attempt]");
    expect(
        attempt.is_none_or(|v| {
            canonical_integer(v).is_some_and(|n| (0..=i64::from(u32::MAX)).contains(&n))
        }),
        "metadata[retry_attempt] must be a whole number",
    );
    expect(
        field("payment_intent_data[metadata][retry_attempt]").is_none_or(|v| Some(v) == attempt),
        "payment_intent_data[metadata][retry_attempt] must equal metadata[retry_attempt]",
    );
    expect(
        field("expires_at").is_none_or(|v| {
            canonical_integer(v).is_some_and(|t| {
                (now + MIN_EXPIRES_IN_SECS..=now + MAX_EXPIRES_IN_SECS).contains(&t)
            })
        }),
        "expires_at must be unix seconds 30 minutes to 24 hours ahead",
    );

    match (key, session, attempt) {
        (None, _, _) => problems.push("Idempotency-Key header missing".to_owned()),
        (Some(key), Some(session), Some(attempt)) => {
            let expected = format!("payretry-{session}-attempt-{attempt}");
            if key != expected {
                problems.push(format!("Idempotency-Key is {key:?}, expected {expected:?}"));
            }
        }
        _ => {}
    }
    problems
}

pub(super) fn expire_if_due(checkout: &mut FakeCheckout, now: i64) {
    if checkout.status == "open" && now >= checkout.expires_at {
        checkout.status = "expired".to_owned();
    }
}

pub(super) fn checkout_json(checkout: &FakeCheckout) -> Value {
    let form = &checkout.form;
    let amount = form
        .get("line_items[0][price_data][unit_amount]")
        .and_then(|v| v.parse::<i64>().ok());
    json!({
        "id": checkout.id,
        "object": "checkout.session",
        "url": checkout.url,
        "mode": "payment",
        "status": checkout.status,
        "payment_status": checkout.payment_status,
        "expires_at": checkout.expires_at,
        "created": checkout.created,
        "livemode": false,
        "client_reference_id": checkout.payment_session_id,
        "currency": form.get("line_items[0][price_data][currency]"),
        "amount_total": amount,
        "metadata": {
            "payment_session_id": checkout.payment_session_id,
            "retry_attempt": checkout.retry_attempt.to_string(),
        },
        "success_url": form.get("success_url"),
        "cancel_url": form.get("cancel_url"),
        "payment_intent": checkout.payment_intent,
    })
}
