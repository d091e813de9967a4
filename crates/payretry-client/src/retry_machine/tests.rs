//! Every transition of the retry machine: each state × each event, the rule that the button
//! follows `retryAvailable`, and one buyer's whole story.

use super::*;
use chrono::TimeDelta;
use payretry_domain::{
    Amount, AttemptNumber, Currency, FailureReason, PaymentSessionId, ProviderSessionId,
};

// ---------------------------------------------------------------- fixtures

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn session() -> PaymentSessionId {
    PaymentSessionId::parse("ps_abc").unwrap()
}

fn key(n: u32) -> IdempotencyKey {
    IdempotencyKey::parse(&format!("press-{n}")).unwrap()
}

/// A session whose first checkout failed with a retryable decline.
fn failed_available() -> PaymentStatus {
    PaymentStatus {
        session_id: session(),
        status: SessionStatus::Failed,
        amount: Amount::new(2500).unwrap(),
        currency: Currency::parse("usd").unwrap(),
        failure_reason: Some(FailureReason::from_code("insufficient_funds")),
        retry_attempts: 0,
        max_retry_attempts: 3,
        retry_attempts_remaining: 3,
        retry_available: true,
        retry_unavailable_reason: None,
        next_retry_at: None,
        last_retry_at: None,
        expires_at: t0() + TimeDelta::hours(24),
        checkout_url: Some("https://pay.example/cs_0".into()),
        provider_session_id: Some(ProviderSessionId::new("cs_0")),
    }
}

fn failed_unavailable(reason: Option<RetryUnavailableReason>) -> PaymentStatus {
    PaymentStatus {
        retry_available: false,
        retry_unavailable_reason: reason,
        ..failed_available()
    }
}

fn with_status(status: SessionStatus, reason: Option<RetryUnavailableReason>) -> PaymentStatus {
    PaymentStatus {
        status,
        ..failed_unavailable(reason)
    }
}

fn open(url: Option<&str>) -> PaymentStatus {
    PaymentStatus {
        checkout_url: url.map(str::to_owned),
        failure_reason: None,
        ..with_status(
            SessionStatus::Open,
            Some(RetryUnavailableReason::PaymentNotFailed),
        )
    }
}

fn due() -> DateTime<Utc> {
    t0() + TimeDelta::minutes(1)
}

fn scheduled(next_retry_at: Option<DateTime<Utc>>) -> PaymentStatus {
    PaymentStatus {
        next_retry_at,
        retry_attempts: 1,
        retry_attempts_remaining: 2,
        last_retry_at: Some(t0()),
        ..with_status(
            SessionStatus::RetryScheduled,
            Some(RetryUnavailableReason::RetryScheduled),
        )
    }
}

fn succeeded() -> PaymentStatus {
    with_status(
        SessionStatus::Succeeded,
        Some(RetryUnavailableReason::PaymentSucceeded),
    )
}

fn expired() -> PaymentStatus {
    with_status(
        SessionStatus::Expired,
        Some(RetryUnavailableReason::WindowExpired),
    )
}

fn accepted() -> RetryScheduled {
    RetryScheduled {
        session_id: session(),
        attempt_number: AttemptNumber::new(1),
        delay_seconds: 60,
        delay_minutes: 1.0,
        scheduled_for: due(),
        retry_attempts_remaining: 2,
    }
}

fn submitting() -> RetryState {
    RetryState::Submitting {
        status: failed_available(),
        idempotency_key: key(1),
        pressed_at: t0(),
    }
}

fn retry_scheduled(seconds_left: Option<u64>) -> RetryState {
    RetryState::RetryScheduled {
        status: scheduled(Some(due())),
        next_retry_at: due(),
        seconds_left,
    }
}

/// One example of every state.
fn all_states() -> Vec<RetryState> {
    vec![
        RetryState::Loading,
        RetryState::AwaitingPayment {
            status: open(Some("https://pay.example/cs_0")),
            checkout_url: Some("https://pay.example/cs_0".into()),
        },
        RetryState::FailedRetryAvailable {
            status: failed_available(),
        },
        submitting(),
        retry_scheduled(Some(30)),
        RetryState::Exhausted {
            status: failed_unavailable(Some(RetryUnavailableReason::LimitReached)),
        },
        RetryState::Expired { status: expired() },
        RetryState::Succeeded {
            status: succeeded(),
        },
        RetryState::Unavailable {
            status: failed_unavailable(Some(RetryUnavailableReason::FailureNotRetryable)),
            reason: Some(RetryUnavailableReason::FailureNotRetryable),
        },
        RetryState::Error {
            message: "offline".into(),
            last: Some(Box::new(RetryState::FailedRetryAvailable {
                status: failed_available(),
            })),
        },
    ]
}

fn state_name(state: &RetryState) -> &'static str {
    match state {
        RetryState::Loading => "Loading",
        RetryState::AwaitingPayment { .. } => "AwaitingPayment",
        RetryState::FailedRetryAvailable { .. } => "FailedRetryAvailable",
        RetryState::Submitting { .. } => "Submitting",
        RetryState::RetryScheduled { .. } => "RetryScheduled",
        RetryState::Exhausted { .. } => "Exhausted",
        RetryState::Expired { .. } => "Expired",
        RetryState::Succeeded { .. } => "Succeeded",
        RetryState::Unavailable { .. } => "Unavailable",
        RetryState::Error { .. } => "Error",
    }
}

/// One example of every event. The statuses differ from every state's own status, so a
/// handled status event is visible as a change.
fn all_events() -> Vec<RetryEvent> {
    let fresh = PaymentStatus {
        amount: Amount::new(9999).unwrap(),
        ..failed_available()
    };
    vec![
        RetryEvent::Loaded(fresh.clone()),
        RetryEvent::StatusChanged(fresh),
        RetryEvent::RetryPressed {
            idempotency_key: key(2),
            now: t0(),
        },
        RetryEvent::RetryAccepted(accepted()),
        RetryEvent::RetryRefused(ApiErrorCode::RetryLimitReached),
        RetryEvent::RetrySubmitFailed("no answer".into()),
        RetryEvent::LoadFailed("timed out".into()),
        RetryEvent::Tick {
            now: t0() + TimeDelta::seconds(10),
        },
        RetryEvent::Refresh,
    ]
}

fn event_name(event: &RetryEvent) -> &'static str {
    match event {
        RetryEvent::Loaded(_) => "Loaded",
        RetryEvent::StatusChanged(_) => "StatusChanged",
        RetryEvent::RetryPressed { .. } => "RetryPressed",
        RetryEvent::RetryAccepted(_) => "RetryAccepted",
        RetryEvent::RetryRefused(_) => "RetryRefused",
        RetryEvent::RetrySubmitFailed(_) => "RetrySubmitFailed",
        RetryEvent::LoadFailed(_) => "LoadFailed",
        RetryEvent::Tick { .. } => "Tick",
        RetryEvent::Refresh => "Refresh",
    }
}

/// The specification of which (state, event) pairs do nothing at all.
fn is_ignored(state: &str, event: &str) -> bool {
    match event {
        "Loaded" | "StatusChanged" | "Refresh" => false,
        "RetryPressed" => state != "FailedRetryAvailable",
        "RetryAccepted" | "RetryRefused" | "RetrySubmitFailed" => state != "Submitting",
        "LoadFailed" => state == "Submitting",
        "Tick" => state != "RetryScheduled",
        other => panic!("unknown event {other}"),
    }
}

// ---------------------------------------------------------------- the whole matrix

#[test]
fn every_state_and_event_pair_is_either_handled_or_ignored_without_effects() {
    let mut checked = 0;
    for state in all_states() {
        for event in all_events() {
            let (s, e) = (state_name(&state), event_name(&event));

            let (next, effects) = transition(state.clone(), event);

            if is_ignored(s, e) {
                assert_eq!(next, state, "{s} × {e} must leave the state unchanged");
                assert!(effects.is_empty(), "{s} × {e} must have no effect");
            } else {
                assert!(
                    next != state || !effects.is_empty(),
                    "{s} × {e} must be handled"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 10 * 9);
}

#[test]
fn start_loads_the_status() {
    assert_eq!(start(), (RetryState::Loading, vec![Effect::FetchStatus]));
}

// ---------------------------------------------------------------- Loaded / StatusChanged

#[test]
fn a_status_settles_into_the_state_it_describes() {
    let cases: Vec<(PaymentStatus, RetryState, Vec<Effect>)> = vec![
        (
            failed_available(),
            RetryState::FailedRetryAvailable {
                status: failed_available(),
            },
            vec![],
        ),
        (
            open(Some("https://pay.example/cs_0")),
            RetryState::AwaitingPayment {
                status: open(Some("https://pay.example/cs_0")),
                checkout_url: Some("https://pay.example/cs_0".into()),
            },
            vec![],
        ),
        (
            open(None),
            RetryState::AwaitingPayment {
                status: open(None),
                checkout_url: None,
            },
            vec![],
        ),
        (
            scheduled(Some(due())),
            retry_scheduled(None),
            vec![Effect::ScheduleTick],
        ),
        (
            scheduled(None),
            RetryState::Unavailable {
                status: scheduled(None),
                reason: Some(RetryUnavailableReason::RetryScheduled),
            },
            vec![],
        ),
        (
            succeeded(),
            RetryState::Succeeded {
                status: succeeded(),
            },
            vec![],
        ),
        (expired(), RetryState::Expired { status: expired() }, vec![]),
    ];
    for (status, expected, effects) in cases {
        assert_eq!(
            transition(RetryState::Loading, RetryEvent::Loaded(status.clone())),
            (expected.clone(), effects.clone()),
            "Loaded {:?}",
            status.status
        );
        assert_eq!(
            transition(RetryState::Loading, RetryEvent::StatusChanged(status)),
            (expected, effects),
        );
    }
}

#[test]
fn a_failed_status_follows_its_unavailable_reason() {
    use RetryUnavailableReason as R;
    let cases = [
        (Some(R::LimitReached), "Exhausted"),
        (Some(R::WindowExpired), "Expired"),
        (Some(R::PaymentSucceeded), "Succeeded"),
        (Some(R::FailureNotRetryable), "Unavailable"),
        (Some(R::RetryScheduled), "Unavailable"),
        (Some(R::PaymentNotFailed), "Unavailable"),
        (None, "Unavailable"),
    ];
    for (reason, expected) in cases {
        let status = failed_unavailable(reason);

        let (next, effects) = transition(RetryState::Loading, RetryEvent::Loaded(status.clone()));

        assert_eq!(state_name(&next), expected, "{reason:?}");
        assert_eq!(next.status(), Some(&status));
        assert!(effects.is_empty());
        if let RetryState::Unavailable { reason: got, .. } = next {
            assert_eq!(got, reason);
        }
    }
}

#[test]
fn retry_available_wins_over_an_inconsistent_status() {
    let odd = PaymentStatus {
        retry_available: true,
        ..open(Some("https://pay.example/cs_0"))
    };
    let (next, _) = transition(RetryState::Loading, RetryEvent::Loaded(odd.clone()));
    assert_eq!(next, RetryState::FailedRetryAvailable { status: odd });
}

#[test]
fn a_status_during_a_press_is_recorded_but_keeps_the_press_in_flight() {
    let newer = PaymentStatus {
        retry_attempts: 1,
        ..scheduled(Some(due()))
    };
    for event in [
        RetryEvent::Loaded(newer.clone()),
        RetryEvent::StatusChanged(newer.clone()),
    ] {
        let (next, effects) = transition(submitting(), event);
        assert_eq!(
            next,
            RetryState::Submitting {
                status: newer.clone(),
                idempotency_key: key(1),
                pressed_at: t0(),
            }
        );
        assert!(effects.is_empty());
    }
}

#[test]
fn a_refresh_confirming_the_schedule_keeps_the_countdown() {
    let (next, effects) = transition(
        retry_scheduled(Some(42)),
        RetryEvent::Loaded(scheduled(Some(due()))),
    );
    assert_eq!(next, retry_scheduled(Some(42)));
    assert_eq!(effects, vec![Effect::ScheduleTick]);
}

#[test]
fn a_refresh_with_a_new_due_time_restarts_the_countdown() {
    let later = due() + TimeDelta::minutes(5);
    let (next, effects) = transition(
        retry_scheduled(Some(42)),
        RetryEvent::Loaded(scheduled(Some(later))),
    );
    assert_eq!(
        next,
        RetryState::RetryScheduled {
            status: scheduled(Some(later)),
            next_retry_at: later,
            seconds_left: None,
        }
    );
    assert_eq!(effects, vec![Effect::ScheduleTick]);
}

#[test]
fn the_retry_checkout_opens_when_the_scheduled_retry_is_ready() {
    let new_checkout = open(Some("https://pay.example/cs_1"));
    let waiting_behind_error = RetryState::Error {
        message: "offline".into(),
        last: Some(Box::new(retry_scheduled(Some(0)))),
    };
    for waiting in [retry_scheduled(Some(0)), waiting_behind_error] {
        let (next, effects) = transition(waiting, RetryEvent::Loaded(new_checkout.clone()));

        assert_eq!(
            next,
            RetryState::AwaitingPayment {
                status: new_checkout.clone(),
                checkout_url: Some("https://pay.example/cs_1".into()),
            }
        );
        assert_eq!(
            effects,
            vec![Effect::OpenCheckout("https://pay.example/cs_1".into())]
        );
    }
}

#[test]
fn an_open_checkout_is_not_opened_unless_the_buyer_was_waiting_for_a_retry() {
    let status = open(Some("https://pay.example/cs_1"));
    for state in all_states() {
        if matches!(
            state,
            RetryState::RetryScheduled { .. } | RetryState::Submitting { .. }
        ) {
            continue;
        }
        let (_, effects) = transition(state.clone(), RetryEvent::Loaded(status.clone()));
        assert!(effects.is_empty(), "{}", state_name(&state));
    }
    let (_, effects) = transition(retry_scheduled(Some(0)), RetryEvent::Loaded(open(None)));
    assert!(effects.is_empty(), "no URL, nowhere to send the buyer");
}

#[test]
fn an_error_recovers_on_the_next_status() {
    let error = RetryState::Error {
        message: "offline".into(),
        last: None,
    };
    let (next, effects) = transition(error, RetryEvent::Loaded(succeeded()));
    assert_eq!(
        next,
        RetryState::Succeeded {
            status: succeeded()
        }
    );
    assert!(effects.is_empty());
}

// ---------------------------------------------------------------- RetryPressed

#[test]
fn a_press_when_available_submits_with_that_press_key() {
    let (next, effects) = transition(
        RetryState::FailedRetryAvailable {
            status: failed_available(),
        },
        RetryEvent::RetryPressed {
            idempotency_key: key(7),
            now: t0(),
        },
    );

    assert_eq!(
        next,
        RetryState::Submitting {
            status: failed_available(),
            idempotency_key: key(7),
            pressed_at: t0(),
        }
    );
    assert_eq!(
        effects,
        vec![Effect::SubmitRetry {
            session_id: session(),
            idempotency_key: key(7),
        }]
    );
}

#[test]
fn a_second_press_while_submitting_sends_nothing() {
    let (next, effects) = transition(
        submitting(),
        RetryEvent::RetryPressed {
            idempotency_key: key(2),
            now: t0(),
        },
    );
    assert_eq!(next, submitting());
    assert!(effects.is_empty());
}

// ---------------------------------------------------------------- press outcomes

#[test]
fn an_accepted_press_counts_down_from_the_server_delay() {
    let (next, effects) = transition(submitting(), RetryEvent::RetryAccepted(accepted()));

    let RetryState::RetryScheduled {
        status,
        next_retry_at,
        seconds_left,
    } = next
    else {
        panic!("expected RetryScheduled, got {next:?}");
    };
    assert_eq!(next_retry_at, due());
    assert_eq!(seconds_left, Some(60));
    assert_eq!(status.status, SessionStatus::RetryScheduled);
    assert_eq!(status.retry_attempts, 1);
    assert_eq!(status.retry_attempts_remaining, 2);
    assert!(!status.retry_available);
    assert_eq!(
        status.retry_unavailable_reason,
        Some(RetryUnavailableReason::RetryScheduled)
    );
    assert_eq!(status.next_retry_at, Some(due()));
    assert_eq!(effects, vec![Effect::ScheduleTick]);
}

#[test]
fn an_acceptance_for_another_session_is_ignored() {
    let foreign = RetryScheduled {
        session_id: PaymentSessionId::parse("ps_other").unwrap(),
        ..accepted()
    };
    assert_eq!(
        transition(submitting(), RetryEvent::RetryAccepted(foreign)),
        (submitting(), vec![])
    );
}

#[test]
fn each_refusal_moves_to_the_state_its_code_implies() {
    use RetryUnavailableReason as R;
    let cases = [
        (
            ApiErrorCode::RetryLimitReached,
            "Exhausted",
            R::LimitReached,
            false,
        ),
        (
            ApiErrorCode::PaymentWindowExpired,
            "Expired",
            R::WindowExpired,
            false,
        ),
        (
            ApiErrorCode::FailureNotRetryable,
            "Unavailable",
            R::FailureNotRetryable,
            false,
        ),
        (
            ApiErrorCode::PaymentAlreadySucceeded,
            "Succeeded",
            R::PaymentSucceeded,
            true,
        ),
        (
            ApiErrorCode::RetryAlreadyScheduled,
            "Unavailable",
            R::RetryScheduled,
            true,
        ),
        (
            ApiErrorCode::PaymentNotFailed,
            "Unavailable",
            R::PaymentNotFailed,
            true,
        ),
    ];
    for (code, expected, reason, refetch) in cases {
        let (next, effects) = transition(submitting(), RetryEvent::RetryRefused(code.clone()));

        assert_eq!(state_name(&next), expected, "{code}");
        let status = next.status().unwrap();
        assert!(!status.retry_available, "{code}: button must go off");
        assert_eq!(status.retry_unavailable_reason, Some(reason), "{code}");
        assert!(!retry_action(&next).enabled, "{code}");
        let expected_effects = if refetch {
            vec![Effect::FetchStatus]
        } else {
            vec![]
        };
        assert_eq!(effects, expected_effects, "{code}");
    }
}

#[test]
fn the_limit_refusal_leaves_no_retries_remaining() {
    let (next, _) = transition(
        submitting(),
        RetryEvent::RetryRefused(ApiErrorCode::RetryLimitReached),
    );
    assert_eq!(next.status().unwrap().retry_attempts_remaining, 0);
    assert_eq!(retry_action(&next).disabled_reason, Some("No retries left"));
}

#[test]
fn other_refusals_show_an_error_and_ask_the_server_again() {
    let others = ApiErrorCode::ALL_KNOWN
        .into_iter()
        .filter(|code| code.retry_unavailable_reason().is_none())
        .chain([ApiErrorCode::Other("brand_new".into())]);
    for code in others {
        let (next, effects) = transition(submitting(), RetryEvent::RetryRefused(code.clone()));

        assert_eq!(
            next,
            RetryState::Error {
                message: error_message(&code).to_owned(),
                last: Some(Box::new(RetryState::FailedRetryAvailable {
                    status: failed_available()
                })),
            },
            "{code}"
        );
        assert_eq!(effects, vec![Effect::FetchStatus], "{code}");
    }
}

#[test]
fn an_unconfirmed_press_shows_an_error_and_asks_what_happened() {
    let (next, effects) = transition(
        submitting(),
        RetryEvent::RetrySubmitFailed("We could not confirm your retry".into()),
    );
    assert_eq!(
        next,
        RetryState::Error {
            message: "We could not confirm your retry".into(),
            last: Some(Box::new(RetryState::FailedRetryAvailable {
                status: failed_available()
            })),
        }
    );
    assert_eq!(effects, vec![Effect::FetchStatus]);
}

// ---------------------------------------------------------------- LoadFailed

#[test]
fn a_failed_load_keeps_what_was_known() {
    for state in all_states() {
        let name = state_name(&state);
        let (next, effects) = transition(state.clone(), RetryEvent::LoadFailed("offline".into()));
        assert!(effects.is_empty(), "{name}");

        let expected = match &state {
            RetryState::Submitting { .. } => state.clone(),
            RetryState::Loading => RetryState::Error {
                message: "offline".into(),
                last: None,
            },
            // An error does not nest inside an error: the last good state is kept.
            RetryState::Error { last, .. } => RetryState::Error {
                message: "offline".into(),
                last: last.clone(),
            },
            other => RetryState::Error {
                message: "offline".into(),
                last: Some(Box::new(other.clone())),
            },
        };
        assert_eq!(next, expected, "{name}");
    }
}

// ---------------------------------------------------------------- Tick

#[test]
fn a_tick_counts_down_rounding_up_to_whole_seconds() {
    let (next, effects) = transition(
        retry_scheduled(None),
        RetryEvent::Tick {
            now: due() - TimeDelta::milliseconds(29_500),
        },
    );
    assert_eq!(next, retry_scheduled(Some(30)));
    assert_eq!(effects, vec![Effect::ScheduleTick]);
}

#[test]
fn a_tick_at_or_past_the_due_time_fetches_and_stops_ticking() {
    for now in [due(), due() + TimeDelta::seconds(5)] {
        let (next, effects) = transition(retry_scheduled(Some(1)), RetryEvent::Tick { now });
        assert_eq!(next, retry_scheduled(Some(0)));
        assert_eq!(effects, vec![Effect::FetchStatus]);
    }
}

#[test]
fn a_retry_still_scheduled_after_its_due_time_is_polled_again() {
    // The worker is late: the status still says retry_scheduled at the due time.
    let (next, effects) = transition(
        retry_scheduled(Some(0)),
        RetryEvent::Loaded(scheduled(Some(due()))),
    );
    assert_eq!(effects, vec![Effect::ScheduleTick]);

    let (_, effects) = transition(next, RetryEvent::Tick { now: due() });
    assert_eq!(effects, vec![Effect::FetchStatus]);
}

// ---------------------------------------------------------------- Refresh

#[test]
fn refresh_fetches_in_every_state_without_changing_it() {
    for state in all_states() {
        assert_eq!(
            transition(state.clone(), RetryEvent::Refresh),
            (state.clone(), vec![Effect::FetchStatus]),
            "{}",
            state_name(&state)
        );
    }
}

// ---------------------------------------------------------------- retry_action

#[test]
fn the_action_is_enabled_only_when_a_retry_is_available() {
    for state in all_states() {
        let action = retry_action(&state);
        let available = matches!(state, RetryState::FailedRetryAvailable { .. });
        assert_eq!(action.enabled, available, "{}", state_name(&state));
        assert_eq!(action.disabled_reason.is_none(), available);
    }
}

/// Every status shape the contract allows, with `retryAvailable` both ways.
fn status_combinations() -> Vec<PaymentStatus> {
    let statuses = [
        SessionStatus::Open,
        SessionStatus::Failed,
        SessionStatus::RetryScheduled,
        SessionStatus::Succeeded,
        SessionStatus::Expired,
    ];
    let reasons = [
        None,
        Some(RetryUnavailableReason::LimitReached),
        Some(RetryUnavailableReason::WindowExpired),
        Some(RetryUnavailableReason::PaymentSucceeded),
        Some(RetryUnavailableReason::RetryScheduled),
        Some(RetryUnavailableReason::PaymentNotFailed),
        Some(RetryUnavailableReason::FailureNotRetryable),
    ];
    let mut all = Vec::new();
    for status in statuses {
        for reason in reasons {
            for available in [true, false] {
                for next_retry_at in [None, Some(due())] {
                    for checkout_url in [None, Some("https://pay.example/cs_9".to_owned())] {
                        all.push(PaymentStatus {
                            status,
                            retry_available: available,
                            retry_unavailable_reason: reason,
                            next_retry_at,
                            checkout_url,
                            ..failed_available()
                        });
                    }
                }
            }
        }
    }
    all
}

#[test]
fn after_any_status_the_button_is_enabled_exactly_when_retry_available_is_true() {
    for previous in all_states() {
        let press_in_flight = matches!(previous, RetryState::Submitting { .. });
        for status in status_combinations() {
            let expected = status.retry_available && !press_in_flight;

            let (next, _) = transition(previous.clone(), RetryEvent::Loaded(status.clone()));

            assert_eq!(
                retry_action(&next).enabled,
                expected,
                "after {} with {status:?}",
                state_name(&previous)
            );
        }
    }
}

#[test]
fn a_press_submits_exactly_when_the_button_is_enabled() {
    for state in all_states() {
        let enabled = retry_action(&state).enabled;
        let (_, effects) = transition(
            state.clone(),
            RetryEvent::RetryPressed {
                idempotency_key: key(3),
                now: t0(),
            },
        );
        let submitted = effects
            .iter()
            .any(|e| matches!(e, Effect::SubmitRetry { .. }));
        assert_eq!(submitted, enabled, "{}", state_name(&state));
    }
}

#[test]
fn disabled_reasons_speak_to_the_buyer() {
    let reason_of = |status: PaymentStatus| {
        let (state, _) = transition(RetryState::Loading, RetryEvent::Loaded(status));
        retry_action(&state).disabled_reason
    };
    use RetryUnavailableReason as R;
    assert_eq!(
        reason_of(failed_unavailable(Some(R::LimitReached))),
        Some("No retries left")
    );
    assert_eq!(reason_of(expired()), Some("The payment window has closed"));
    assert_eq!(
        reason_of(failed_unavailable(Some(R::WindowExpired))),
        Some("The payment window has closed")
    );
    assert_eq!(
        reason_of(scheduled(Some(due()))),
        Some("A retry is already scheduled")
    );
    assert_eq!(
        reason_of(scheduled(None)),
        Some("A retry is already scheduled")
    );
    assert_eq!(
        reason_of(succeeded()),
        Some("This payment has already succeeded")
    );
    assert_eq!(
        reason_of(failed_unavailable(Some(R::FailureNotRetryable))),
        Some("Use a different payment method")
    );
    assert_eq!(
        reason_of(open(None)),
        Some("Your payment is still open: complete it at checkout")
    );
    assert_eq!(
        reason_of(failed_unavailable(None)),
        Some("Retry is not available for this payment")
    );
    assert_eq!(
        retry_action(&submitting()).disabled_reason,
        Some("Your retry is being requested")
    );
}

// ---------------------------------------------------------------- a whole story

/// Applies events in order, collecting every effect.
fn run(mut state: RetryState, events: Vec<RetryEvent>) -> (RetryState, Vec<Effect>) {
    let mut all = Vec::new();
    for event in events {
        let (next, effects) = transition(state, event);
        state = next;
        all.extend(effects);
    }
    (state, all)
}

#[test]
fn a_buyer_retries_until_the_limit() {
    let (state, _) = start();
    let (state, effects) = run(
        state,
        vec![
            RetryEvent::Loaded(failed_available()),
            RetryEvent::RetryPressed {
                idempotency_key: key(1),
                now: t0(),
            },
            RetryEvent::RetryAccepted(accepted()),
            RetryEvent::Tick {
                now: t0() + TimeDelta::seconds(30),
            },
            RetryEvent::Tick { now: due() },
            RetryEvent::Loaded(PaymentStatus {
                retry_attempts: 1,
                retry_attempts_remaining: 2,
                ..open(Some("https://pay.example/cs_1"))
            }),
        ],
    );
    assert_eq!(
        effects,
        vec![
            Effect::SubmitRetry {
                session_id: session(),
                idempotency_key: key(1)
            },
            Effect::ScheduleTick,
            Effect::ScheduleTick,
            Effect::FetchStatus,
            Effect::OpenCheckout("https://pay.example/cs_1".into()),
        ]
    );
    assert_eq!(state_name(&state), "AwaitingPayment");

    // The third retry's checkout fails too; the server says the limit is reached.
    let (state, effects) = run(
        state,
        vec![RetryEvent::StatusChanged(PaymentStatus {
            retry_attempts: 3,
            retry_attempts_remaining: 0,
            ..failed_unavailable(Some(RetryUnavailableReason::LimitReached))
        })],
    );
    assert_eq!(state_name(&state), "Exhausted");
    assert!(effects.is_empty());
    assert_eq!(
        retry_action(&state).disabled_reason,
        Some("No retries left")
    );

    // Pressing now does nothing at all.
    let (after, effects) = transition(
        state.clone(),
        RetryEvent::RetryPressed {
            idempotency_key: key(4),
            now: t0(),
        },
    );
    assert_eq!(after, state);
    assert!(effects.is_empty());
}
