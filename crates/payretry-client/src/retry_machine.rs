//! The buyer-side retry state machine: what the payment status page shows and what it may do.
//!
//! Pure: [`transition`] takes a state and an event and returns the next state and the
//! [`Effect`]s a driver must perform (HTTP calls, timers, navigation). No I/O, no clock, no
//! randomness: time arrives in events, idempotency keys arrive in [`RetryEvent::RetryPressed`].
//!
//! The rules:
//! - **The server decides eligibility.** The retry button is enabled exactly when the last
//!   status said `retryAvailable: true` and no press is in flight; the machine never
//!   recomputes eligibility from attempts, clocks or reasons. A press in any other state is
//!   ignored.
//! - **One press, one request.** A press moves to [`RetryState::Submitting`] with that press's
//!   key; only the press's outcome ([`RetryEvent::RetryAccepted`], [`RetryEvent::RetryRefused`],
//!   [`RetryEvent::RetrySubmitFailed`]) leaves it, so a status that arrives meanwhile cannot
//!   re-enable the button under an in-flight press.
//! - **A refusal says something about the session.** Each contract code maps to the state it
//!   implies; when that state needs data the refusal does not carry (a success, a scheduled
//!   retry's time, an open checkout's URL) the machine also asks for a fresh status.
//! - **A scheduled retry counts down** on [`RetryEvent::Tick`]s and, once due, asks for the
//!   status; when that shows the retry's new checkout, the buyer is sent to it.
//!
//! Ignored events return the state unchanged and no effects.

use crate::api::{PaymentStatus, RetryScheduled};
use crate::error::ApiErrorCode;
use chrono::{DateTime, Utc};
use payretry_domain::{IdempotencyKey, PaymentSessionId, RetryUnavailableReason, SessionStatus};

/// Where the buyer's payment stands, as far as the retry button is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryState {
    /// Nothing known yet; the first status is being fetched.
    Loading,
    /// A provider checkout is live: the buyer should pay there, not retry.
    AwaitingPayment {
        status: PaymentStatus,
        /// Where to send the buyer; the status's `checkoutUrl`.
        checkout_url: Option<String>,
    },
    /// The last checkout failed and the server says a retry may be requested now.
    FailedRetryAvailable { status: PaymentStatus },
    /// A press is in flight; the button stays disabled until its outcome arrives.
    Submitting {
        /// The status the press was made from (refreshed if a new one arrives meanwhile).
        status: PaymentStatus,
        /// The press's key, reused by every network try of this press.
        idempotency_key: IdempotencyKey,
        /// When the buyer pressed, for showing or logging how long the request has taken.
        pressed_at: DateTime<Utc>,
    },
    /// A retry is queued; its checkout is due at `next_retry_at`.
    RetryScheduled {
        status: PaymentStatus,
        next_retry_at: DateTime<Utc>,
        /// Whole seconds until `next_retry_at` (rounded up); `None` until the first
        /// [`RetryEvent::Tick`] tells the machine what time it is.
        seconds_left: Option<u64>,
    },
    /// Every allowed retry is spent.
    Exhausted { status: PaymentStatus },
    /// The payment window has closed (or a retry could no longer start inside it).
    Expired { status: PaymentStatus },
    /// Paid.
    Succeeded { status: PaymentStatus },
    /// A retry is not possible for another reason, most often a decline that needs a
    /// different payment method. `reason` is the server's `retryUnavailableReason`.
    Unavailable {
        status: PaymentStatus,
        reason: Option<RetryUnavailableReason>,
    },
    /// Something went wrong talking to the server. `message` is buyer-facing; `last` is what
    /// was known before, so the page can keep showing it.
    Error {
        message: String,
        last: Option<Box<RetryState>>,
    },
}

impl RetryState {
    /// The latest status the state is built on, if any (for an error, the one before it).
    pub fn status(&self) -> Option<&PaymentStatus> {
        match self {
            Self::Loading => None,
            Self::AwaitingPayment { status, .. }
            | Self::FailedRetryAvailable { status }
            | Self::Submitting { status, .. }
            | Self::RetryScheduled { status, .. }
            | Self::Exhausted { status }
            | Self::Expired { status }
            | Self::Succeeded { status }
            | Self::Unavailable { status, .. } => Some(status),
            Self::Error { last, .. } => last.as_deref().and_then(Self::status),
        }
    }

    /// Whether the buyer is waiting for a scheduled retry's checkout, directly or behind an
    /// error that interrupted the wait.
    fn is_waiting_for_retry(&self) -> bool {
        match self {
            Self::RetryScheduled { .. } => true,
            Self::Error {
                last: Some(last), ..
            } => last.is_waiting_for_retry(),
            _ => false,
        }
    }
}

/// Something that happened: a server answer, a buyer's press, or the passing of time.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryEvent {
    /// A status fetched because the machine asked ([`Effect::FetchStatus`]).
    Loaded(PaymentStatus),
    /// The buyer pressed the retry button. The driver makes one fresh key per press.
    RetryPressed {
        idempotency_key: IdempotencyKey,
        now: DateTime<Utc>,
    },
    /// The server accepted the press (202).
    RetryAccepted(RetryScheduled),
    /// The server refused the press with this contract code.
    RetryRefused(ApiErrorCode),
    /// The press's outcome is unknown: no answer arrived even after the use case's own
    /// retries. The message is buyer-facing.
    RetrySubmitFailed(String),
    /// Fetching the status failed. The message is buyer-facing.
    LoadFailed(String),
    /// A timer fired (see [`Effect::ScheduleTick`]).
    Tick { now: DateTime<Utc> },
    /// A status the driver learned on its own (a push, another tab). Handled like
    /// [`RetryEvent::Loaded`]: the server's latest word always wins.
    StatusChanged(PaymentStatus),
    /// The buyer or the page asked for fresh data (reload button, page regained focus).
    Refresh,
}

/// Work the driver must do after a transition; its results come back as events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Run the retry use case for this press; report its outcome as `RetryAccepted`,
    /// `RetryRefused` or `RetrySubmitFailed`.
    SubmitRetry {
        session_id: PaymentSessionId,
        idempotency_key: IdempotencyKey,
    },
    /// Fetch the status; report it as `Loaded` or `LoadFailed`.
    FetchStatus,
    /// Deliver one `Tick` about a second from now. A driver keeps at most one tick pending:
    /// asking again while one is pending changes nothing.
    ScheduleTick,
    /// Send the buyer to this provider checkout: the retry they asked for is ready.
    OpenCheckout(String),
}

/// What the retry button looks like in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAction {
    pub enabled: bool,
    /// Buyer-facing text for why it is disabled; `None` when enabled.
    pub disabled_reason: Option<&'static str>,
}

impl RetryAction {
    const ENABLED: Self = Self {
        enabled: true,
        disabled_reason: None,
    };

    const fn disabled(reason: &'static str) -> Self {
        Self {
            enabled: false,
            disabled_reason: Some(reason),
        }
    }
}

/// The machine's starting point: nothing known, and a status fetch to find out.
pub fn start() -> (RetryState, Vec<Effect>) {
    (RetryState::Loading, vec![Effect::FetchStatus])
}

/// The whole machine: the next state and the effects to perform.
pub fn transition(state: RetryState, event: RetryEvent) -> (RetryState, Vec<Effect>) {
    use RetryEvent as E;
    use RetryState as S;

    match (state, event) {
        (state, E::Loaded(status) | E::StatusChanged(status)) => on_status(state, status),

        (state, E::Refresh) => (state, vec![Effect::FetchStatus]),

        (
            S::FailedRetryAvailable { status },
            E::RetryPressed {
                idempotency_key,
                now,
            },
        ) => {
            let effect = Effect::SubmitRetry {
                session_id: status.session_id.clone(),
                idempotency_key: idempotency_key.clone(),
            };
            let next = S::Submitting {
                status,
                idempotency_key,
                pressed_at: now,
            };
            (next, vec![effect])
        }

        (S::Submitting { status, .. }, E::RetryAccepted(accepted))
            if accepted.session_id == status.session_id =>
        {
            on_accepted(status, accepted)
        }

        (S::Submitting { status, .. }, E::RetryRefused(code)) => on_refused(status, &code),

        (S::Submitting { status, .. }, E::RetrySubmitFailed(message)) => (
            S::Error {
                message,
                last: Some(Box::new(S::FailedRetryAvailable { status })),
            },
            // The press may have taken effect; only the server can say.
            vec![Effect::FetchStatus],
        ),

        // A background load failing does not end an in-flight press.
        (state @ S::Submitting { .. }, E::LoadFailed(_)) => (state, vec![]),
        (S::Loading, E::LoadFailed(message)) => (
            S::Error {
                message,
                last: None,
            },
            vec![],
        ),
        (S::Error { last, .. }, E::LoadFailed(message)) => (S::Error { message, last }, vec![]),
        (state, E::LoadFailed(message)) => (
            S::Error {
                message,
                last: Some(Box::new(state)),
            },
            vec![],
        ),

        (
            S::RetryScheduled {
                status,
                next_retry_at,
                ..
            },
            E::Tick { now },
        ) => {
            let left = seconds_until(next_retry_at, now);
            let effect = if left == 0 {
                // Due: the worker should have opened the new checkout; ask, stop ticking.
                Effect::FetchStatus
            } else {
                Effect::ScheduleTick
            };
            let next = S::RetryScheduled {
                status,
                next_retry_at,
                seconds_left: Some(left),
            };
            (next, vec![effect])
        }

        // Presses outside FailedRetryAvailable, press outcomes outside Submitting, ticks
        // outside RetryScheduled: nothing to do.
        (state, _) => (state, vec![]),
    }
}

/// What the retry button shows in `state`. Enabled exactly in
/// [`RetryState::FailedRetryAvailable`], which is entered exactly when the server's status
/// says `retryAvailable: true`.
pub fn retry_action(state: &RetryState) -> RetryAction {
    match state {
        RetryState::FailedRetryAvailable { .. } => RetryAction::ENABLED,
        RetryState::Loading => RetryAction::disabled("Loading your payment…"),
        RetryState::AwaitingPayment { .. } => {
            RetryAction::disabled(unavailable_text(RetryUnavailableReason::PaymentNotFailed))
        }
        RetryState::Submitting { .. } => RetryAction::disabled("Your retry is being requested"),
        RetryState::RetryScheduled { .. } => {
            RetryAction::disabled(unavailable_text(RetryUnavailableReason::RetryScheduled))
        }
        RetryState::Exhausted { .. } => {
            RetryAction::disabled(unavailable_text(RetryUnavailableReason::LimitReached))
        }
        RetryState::Expired { .. } => {
            RetryAction::disabled(unavailable_text(RetryUnavailableReason::WindowExpired))
        }
        RetryState::Succeeded { .. } => {
            RetryAction::disabled(unavailable_text(RetryUnavailableReason::PaymentSucceeded))
        }
        RetryState::Unavailable { reason, .. } => RetryAction::disabled(
            reason.map_or("Retry is not available for this payment", unavailable_text),
        ),
        RetryState::Error { .. } => {
            RetryAction::disabled("We could not reach the payment service. Refresh to try again")
        }
    }
}

/// Buyer-facing text for a refusal or load failure that does not map to a session state.
pub fn error_message(code: &ApiErrorCode) -> &'static str {
    match code {
        ApiErrorCode::Unauthenticated => "Your sign-in has expired. Sign in again to continue",
        ApiErrorCode::Forbidden => "This account cannot retry this payment",
        ApiErrorCode::SessionNotFound => "We could not find this payment",
        ApiErrorCode::RateLimited => "Too many attempts. Wait a moment and try again",
        ApiErrorCode::IdempotencyKeyInUse => "Your retry is still being processed",
        _ => "We could not retry your payment. Try again in a moment",
    }
}

/// Buyer-facing text for each `retryUnavailableReason`.
const fn unavailable_text(reason: RetryUnavailableReason) -> &'static str {
    match reason {
        RetryUnavailableReason::LimitReached => "No retries left",
        RetryUnavailableReason::WindowExpired => "The payment window has closed",
        RetryUnavailableReason::PaymentSucceeded => "This payment has already succeeded",
        RetryUnavailableReason::RetryScheduled => "A retry is already scheduled",
        RetryUnavailableReason::PaymentProcessing => {
            "Your payment is being processed: a retry is not needed"
        }
        RetryUnavailableReason::PaymentNotFailed => {
            "Your payment is still open: complete it at checkout"
        }
        RetryUnavailableReason::FailureNotRetryable => "Use a different payment method",
    }
}

/// A new status from the server, applied to whatever the machine knew.
fn on_status(previous: RetryState, status: PaymentStatus) -> (RetryState, Vec<Effect>) {
    if let RetryState::Submitting {
        idempotency_key,
        pressed_at,
        ..
    } = previous
    {
        let next = RetryState::Submitting {
            status,
            idempotency_key,
            pressed_at,
        };
        return (next, vec![]);
    }

    let (mut next, mut effects) = from_status(status);
    keep_countdown(&previous, &mut next);
    effects.extend(retry_checkout_ready(&previous, &next));
    (next, effects)
}

/// Keeps the countdown steady when a refresh confirms the same schedule, so the page does
/// not blank its timer until the next tick.
fn keep_countdown(previous: &RetryState, next: &mut RetryState) {
    let RetryState::RetryScheduled {
        next_retry_at: was_due,
        seconds_left: was_left,
        ..
    } = previous
    else {
        return;
    };
    let RetryState::RetryScheduled {
        next_retry_at,
        seconds_left,
        ..
    } = next
    else {
        return;
    };
    if was_due == next_retry_at {
        *seconds_left = *was_left;
    }
}

/// Sends the buyer to the new checkout when the retry they were waiting for is ready.
/// Only then: a buyer who merely reloads an open session is not redirected.
fn retry_checkout_ready(previous: &RetryState, next: &RetryState) -> Option<Effect> {
    if !previous.is_waiting_for_retry() {
        return None;
    }
    match next {
        RetryState::AwaitingPayment {
            checkout_url: Some(url),
            ..
        } => Some(Effect::OpenCheckout(url.clone())),
        _ => None,
    }
}

/// The state a status implies on its own. `retryAvailable` is checked first, so the button
/// follows the server even if the rest of the status were inconsistent.
fn from_status(status: PaymentStatus) -> (RetryState, Vec<Effect>) {
    if status.retry_available {
        return (RetryState::FailedRetryAvailable { status }, vec![]);
    }
    match status.status {
        SessionStatus::Succeeded => (RetryState::Succeeded { status }, vec![]),
        SessionStatus::Expired => (RetryState::Expired { status }, vec![]),
        SessionStatus::Open => {
            let checkout_url = status.checkout_url.clone();
            let next = RetryState::AwaitingPayment {
                status,
                checkout_url,
            };
            (next, vec![])
        }
        SessionStatus::RetryScheduled => match status.next_retry_at {
            Some(next_retry_at) => (
                RetryState::RetryScheduled {
                    status,
                    next_retry_at,
                    seconds_left: None,
                },
                vec![Effect::ScheduleTick],
            ),
            // Without a due time there is nothing to count down; say what we know.
            None => (
                RetryState::Unavailable {
                    status,
                    reason: Some(RetryUnavailableReason::RetryScheduled),
                },
                vec![],
            ),
        },
        SessionStatus::Failed => {
            let reason = status.retry_unavailable_reason;
            (unavailable(status, reason), vec![])
        }
        // Money may still move (a bank debit settling): no retry, whatever else is said.
        SessionStatus::Processing => (
            RetryState::Unavailable {
                status,
                reason: Some(RetryUnavailableReason::PaymentProcessing),
            },
            vec![],
        ),
    }
}

/// The state for a retry the server says is unavailable for `reason`.
fn unavailable(status: PaymentStatus, reason: Option<RetryUnavailableReason>) -> RetryState {
    match reason {
        Some(RetryUnavailableReason::LimitReached) => RetryState::Exhausted { status },
        Some(RetryUnavailableReason::WindowExpired) => RetryState::Expired { status },
        Some(RetryUnavailableReason::PaymentSucceeded) => RetryState::Succeeded { status },
        other => RetryState::Unavailable {
            status,
            reason: other,
        },
    }
}

/// The press was accepted: the status now has a retry scheduled for the 202's time.
fn on_accepted(mut status: PaymentStatus, accepted: RetryScheduled) -> (RetryState, Vec<Effect>) {
    status.status = SessionStatus::RetryScheduled;
    status.retry_attempts = accepted.attempt_number.get();
    status.retry_attempts_remaining = accepted.retry_attempts_remaining;
    status.retry_available = false;
    status.retry_unavailable_reason = Some(RetryUnavailableReason::RetryScheduled);
    status.next_retry_at = Some(accepted.scheduled_for);
    let next = RetryState::RetryScheduled {
        status,
        next_retry_at: accepted.scheduled_for,
        seconds_left: Some(accepted.delay_seconds),
    };
    (next, vec![Effect::ScheduleTick])
}

/// The press was refused: move to the state the code implies.
fn on_refused(mut status: PaymentStatus, code: &ApiErrorCode) -> (RetryState, Vec<Effect>) {
    let Some(reason) = code.retry_unavailable_reason() else {
        // Not a statement about the session (auth, rate limit, key in use...): show the
        // problem and let a fresh status decide what the button does next.
        let next = RetryState::Error {
            message: error_message(code).to_owned(),
            last: Some(Box::new(RetryState::FailedRetryAvailable { status })),
        };
        return (next, vec![Effect::FetchStatus]);
    };
    status.retry_available = false;
    status.retry_unavailable_reason = Some(reason);
    if reason == RetryUnavailableReason::LimitReached {
        status.retry_attempts_remaining = 0;
    }
    // These refusals leave out what the page needs next (the success, the due time, the
    // open checkout's URL): fetch it. The others are final for this session.
    let needs_status = matches!(
        reason,
        RetryUnavailableReason::PaymentSucceeded
            | RetryUnavailableReason::RetryScheduled
            | RetryUnavailableReason::PaymentNotFailed
    );
    let effects = if needs_status {
        vec![Effect::FetchStatus]
    } else {
        vec![]
    };
    (unavailable(status, Some(reason)), effects)
}

/// Whole seconds from `now` until `due`, rounded up, never negative.
fn seconds_until(due: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let millis = (due - now).num_milliseconds();
    if millis <= 0 {
        0
    } else {
        u64::try_from(millis).map_or(u64::MAX, |ms| ms.div_ceil(1000))
    }
}

#[cfg(test)]
mod tests;
