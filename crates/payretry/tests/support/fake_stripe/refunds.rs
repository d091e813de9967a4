//! Refunds: the create, its checks, pending refunds and their outcome, and the signed refund
//! events.

use super::*;

pub(super) async fn refund(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    let mut gate = shared.ledger().refund_desk.gate.subscribe();
    let _ = gate.wait_for(|held| !held).await;
    shared.refund(&headers, &body)
}

impl Shared {
    fn refund(&self, headers: &HeaderMap, body: &Bytes) -> Response {
        let (form, mut problems) = read_form(headers, body);
        let key = header_text(headers, "idempotency-key");

        let mut ledger = self.ledger();
        if let Some(key) = &key
            && let Some(answer) = ledger.replay("refund", key, &form)
        {
            return answer;
        }

        problems.extend(validate_refund(&form, key.as_deref()));
        if !problems.is_empty() {
            ledger
                .violations
                .extend(problems.iter().map(|p| format!("refund: {p}")));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid"),
                &problems.join("; "),
            );
        }

        let payment_intent = form["payment_intent"].clone();
        let paid = ledger.checkouts.iter().any(|c| {
            c.payment_intent.as_deref() == Some(payment_intent.as_str())
                && c.payment_status == "paid"
        });
        if !paid {
            ledger
                .violations
                .push(format!("refund: no paid charge for {payment_intent}"));
            drop(ledger);
            return stripe_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such payment_intent: '{payment_intent}'"),
            );
        }
        if ledger.refunds.iter().any(|r| {
            r.payment_intent == payment_intent
                && !["failed", "canceled"].contains(&r.status.as_str())
        }) {
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("charge_already_refunded"),
                &format!("Charge for {payment_intent} has already been refunded."),
            );
        }

        let (status, failure_reason) = ledger.refund_desk.answer.status();
        let refund = FakeRefund {
            id: format!("re_test_{}", uuid::Uuid::new_v4().simple()),
            payment_intent,
            idempotency_key: key.clone().unwrap_or_default(),
            reason: form.get("reason").cloned(),
            created: now_unix(),
            status: status.to_owned(),
            failure_reason: failure_reason.map(str::to_owned),
            metadata: refund_metadata(&form),
        };
        let body = refund_json(&refund);
        if let Some(key) = key {
            ledger.idempotency.insert(
                key,
                Stored {
                    params: form,
                    body: body.clone(),
                },
            );
        }
        ledger.refunds.push(refund);
        drop(ledger);
        stripe_json(StatusCode::OK, body)
    }
}

/// Every problem with a refund request's form and idempotency key.
pub(super) fn validate_refund(form: &BTreeMap<String, String>, key: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    match form.get("payment_intent") {
        None => problems.push("missing parameter payment_intent".to_owned()),
        Some(pi) if !pi.starts_with("pi_") => {
            problems.push(format!("payment_intent {pi:?} is not a pi_… id"));
        }
        Some(_) => {}
    }
    for field in form.keys() {
        if !REFUND_FIELDS.contains(&field.as_str()) && metadata_key(field).is_none() {
            problems.push(format!("unexpected parameter {field}"));
        }
    }
    problems.extend(validate_refund_metadata(form, key));
    if let Some(reason) = form.get("reason")
        && !["duplicate", "fraudulent", "requested_by_customer"].contains(&reason.as_str())
    {
        problems.push(format!("reason {reason:?} is not one of Stripe's"));
    }
    let well_formed = key
        .and_then(|k| k.strip_prefix("payretry-"))
        .and_then(|rest| rest.split_once("-refund-attempt-"))
        .is_some_and(|(session, attempt)| {
            PaymentSessionId::parse(session).is_ok() && canonical_integer(attempt).is_some()
        });
    if !well_formed {
        problems.push(format!(
            "Idempotency-Key is {key:?}, expected payretry-{{sessionId}}-refund-attempt-{{N}}"
        ));
    }
    problems
}

// --- Refund settlement: pending refunds, their outcome, and the signed refund events. ---

/// How the fake answers a new refund.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RefundAnswer {
    /// `succeeded` (Stripe's usual answer for a card).
    #[default]
    Succeeded,
    /// `pending`: settled later by [`FakeStripe::settle_refund`].
    Pending,
    /// `requires_action`: settled later too.
    RequiresAction,
    /// `failed` at once, with this `failure_reason`.
    Failed(String),
}

impl RefundAnswer {
    fn status(&self) -> (&'static str, Option<&str>) {
        match self {
            Self::Succeeded => ("succeeded", None),
            Self::Pending => ("pending", None),
            Self::RequiresAction => ("requires_action", None),
            Self::Failed(reason) => ("failed", Some(reason)),
        }
    }
}

/// How a pending refund ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    Succeeded,
    /// `failed` with this `failure_reason` (e.g. `expired_or_canceled_card`).
    Failed(String),
    /// `canceled` (a `requires_action` refund that timed out).
    Canceled,
}

/// Which event type reports a settled refund. Stripe sends `refund.updated` /
/// `refund.failed` for every refund from API version `2024-10-28`; before that (payretry pins
/// `2024-06-20`) a refund of a charge is reported as `charge.refund.updated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundEventStyle {
    /// `refund.updated`, or `refund.failed` for a failure.
    Refund,
    /// `charge.refund.updated` for every change.
    ChargeRefund,
}

/// The refund side of the ledger.
pub(super) struct RefundDesk {
    answer: RefundAnswer,
    /// `true` while refund requests are held (they wait, already recorded, until released).
    gate: tokio::sync::watch::Sender<bool>,
    /// Where refund events go, and the secret they are signed with.
    webhook: Option<(String, String)>,
}

impl Default for RefundDesk {
    fn default() -> Self {
        Self {
            answer: RefundAnswer::default(),
            gate: tokio::sync::watch::Sender::new(false),
            webhook: None,
        }
    }
}

impl FakeStripe {
    /// How new refunds are answered from now on.
    pub fn answer_refunds_with(&self, answer: RefundAnswer) {
        self.shared.ledger().refund_desk.answer = answer;
    }

    /// Holds refund requests (recorded, not answered) until [`FakeStripe::release_refunds`]:
    /// a slow refund endpoint. Keep the hold shorter than the client's timeout.
    pub fn hold_refunds(&self) {
        self.shared.ledger().refund_desk.gate.send_replace(true);
    }

    pub fn release_refunds(&self) {
        self.shared.ledger().refund_desk.gate.send_replace(false);
    }

    /// Refund events go to `url` (payretry's `/webhooks/stripe`), signed with `secret` as
    /// Stripe signs them.
    pub fn deliver_webhooks_to(&self, url: &str, secret: &str) {
        self.shared.ledger().refund_desk.webhook = Some((url.to_owned(), secret.to_owned()));
    }

    /// Settles refund `id` and delivers its event ([`RefundEventStyle::Refund`]); returns the
    /// webhook's HTTP status.
    pub async fn settle_refund(&self, id: &str, outcome: RefundOutcome) -> u16 {
        self.settle_refund_as(id, outcome, RefundEventStyle::Refund)
            .await
    }

    /// [`FakeStripe::settle_refund`] with the event type of `style`.
    pub async fn settle_refund_as(
        &self,
        id: &str,
        outcome: RefundOutcome,
        style: RefundEventStyle,
    ) -> u16 {
        let (refund, (url, secret)) = {
            let mut ledger = self.shared.ledger();
            let webhook = ledger
                .refund_desk
                .webhook
                .clone()
                .expect("deliver_webhooks_to first");
            let refund = ledger
                .refunds
                .iter_mut()
                .find(|r| r.id == id)
                .unwrap_or_else(|| panic!("fake Stripe has no refund {id}"));
            assert!(
                ["pending", "requires_action"].contains(&refund.status.as_str()),
                "refund {id} is {}, not pending",
                refund.status
            );
            let (status, reason) = match &outcome {
                RefundOutcome::Succeeded => ("succeeded", None),
                RefundOutcome::Failed(reason) => ("failed", Some(reason.clone())),
                RefundOutcome::Canceled => ("canceled", None),
            };
            refund.status = status.to_owned();
            refund.failure_reason = reason;
            (refund.clone(), webhook)
        };
        let kind = match (style, &outcome) {
            (RefundEventStyle::ChargeRefund, _) => "charge.refund.updated",
            (RefundEventStyle::Refund, RefundOutcome::Failed(_)) => "refund.failed",
            (RefundEventStyle::Refund, _) => "refund.updated",
        };
        let event = refund_event(kind, &refund);
        self.deliver(&url, &secret, &event).await
    }

    /// Posts `event` to `url` signed with `secret` (the `Stripe-Signature` payretry checks).
    pub async fn deliver(&self, url: &str, secret: &str, event: &Value) -> u16 {
        let body = serde_json::to_vec(event).expect("event JSON");
        let signature =
            payretry::provider::signature::sign(&body, secret, chrono::Utc::now().timestamp());
        reqwest::Client::new()
            .post(url)
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(body)
            .send()
            .await
            .expect("deliver the refund event")
            .status()
            .as_u16()
    }
}

/// A Stripe event about `refund`, as the pinned API version shapes it.
pub fn refund_event(kind: &str, refund: &FakeRefund) -> Value {
    json!({
        "id": format!("evt_test_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "api_version": payretry::provider::stripe::STRIPE_VERSION,
        "created": now_unix(),
        "livemode": false,
        "type": kind,
        "data": {"object": refund_json(refund)},
    })
}

/// A Refund object.
pub(super) fn refund_json(refund: &FakeRefund) -> Value {
    json!({
        "id": refund.id,
        "object": "refund",
        "amount": null,
        "currency": "usd",
        "payment_intent": refund.payment_intent,
        "reason": refund.reason,
        "status": refund.status,
        "failure_reason": refund.failure_reason,
        "metadata": refund.metadata,
        "created": refund.created,
    })
}

/// `metadata[key]` → `key`.
pub(super) fn metadata_key(field: &str) -> Option<&str> {
    field.strip_prefix("metadata[")?.strip_suffix(']')
}

pub(super) fn refund_metadata(form: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    form.iter()
        .filter_map(|(field, value)| metadata_key(field).map(|k| (k.to_owned(), value.clone())))
        .collect()
}

/// Stripe's metadata rules (up to 50 keys, names up to 40 characters without square
/// brackets, values up to 500 characters), and payretry's: exactly `payment_session_id` and
/// `duplicate_attempt`, naming the session and attempt of the idempotency key.
pub(super) fn validate_refund_metadata(
    form: &BTreeMap<String, String>,
    key: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let metadata = refund_metadata(form);
    if metadata.len() > 50 {
        problems.push("more than 50 metadata keys".to_owned());
    }
    for (name, value) in &metadata {
        if name.is_empty() || name.chars().count() > 40 || name.contains(['[', ']']) {
            problems.push(format!("metadata key {name:?} is not a valid key"));
        }
        if value.chars().count() > 500 {
            problems.push(format!("metadata[{name}] is longer than 500 characters"));
        }
        if !REFUND_METADATA.contains(&name.as_str()) {
            problems.push(format!("unexpected metadata[{name}]"));
        }
    }
    let keyed = key
        .and_then(|k| k.strip_prefix("payretry-"))
        .and_then(|rest| rest.split_once("-refund-attempt-"));
    match (
        metadata.get("payment_session_id"),
        metadata.get("duplicate_attempt"),
    ) {
        (Some(session), Some(attempt)) => {
            if canonical_integer(attempt).is_none_or(|n| n < 0) {
                problems.push(format!(
                    "metadata[duplicate_attempt] {attempt:?} is not a whole number"
                ));
            }
            if let Some((key_session, key_attempt)) = keyed
                && (key_session != session || key_attempt != attempt)
            {
                problems.push(format!(
                    "metadata names {session} attempt {attempt}, the Idempotency-Key another"
                ));
            }
        }
        _ => problems
            .push("missing metadata[payment_session_id] or metadata[duplicate_attempt]".to_owned()),
    }
    problems
}
