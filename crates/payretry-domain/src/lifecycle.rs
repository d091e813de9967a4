//! What each event does to a payment session (DESIGN.md §1, §2, §4, §5): one pure rule per
//! event, each returning the session's new state and the effects to record with it.
//!
//! The service loads a session, calls the rule, turns the [`Change`] into one storage
//! transition and commits it; it decides nothing itself. A rule that returns `None` means
//! "nothing to do for the session as it now is" (an older attempt, a repeated payment, a job
//! that is no longer current).
//!
//! The rules, by event:
//! - [`open_checkout`]: a new session with its first checkout (attempt 0).
//! - [`Lifecycle::paid`]: a payment from ANY attempt's checkout wins, also after the window
//!   (money moved; flagged `afterWindow`); a second payment of a paid session is a double
//!   payment, and the session stays `succeeded`.
//! - [`Lifecycle::processing`]: the current attempt's checkout was completed with a payment
//!   method that settles later (a bank debit). Money may still move, so no retry is offered,
//!   the window does not expire the session, and a scheduled retry is dropped.
//! - [`Lifecycle::async_payment_failed`]: that payment failed to settle: `failed` (a retry may
//!   be possible), or `expired` when the window has passed meanwhile. Only this event ends
//!   `processing` unpaid; a card decline arriving late does not.
//! - [`Lifecycle::failed`]: a failure of the current attempt; an older attempt's is ignored.
//!   The last allowed retry failing abandons the retry (`attempts_exhausted`).
//! - [`Lifecycle::checkout_expired`]: the provider closed the current checkout unpaid.
//! - [`Lifecycle::request_retry`]: the buyer's retry, after [`check_retry`].
//! - [`Lifecycle::retry_checkout_opened`]: the worker created the retry's checkout.
//! - [`Lifecycle::window_closed`]: the window passed (sweeper or worker, whichever first).
//! - [`Lifecycle::dead_lettered`] and [`Lifecycle::redriven`]: a job that kept failing, and
//!   an admin sending it again.
//! - [`job_standing`]: whether a retry job is still the session's current one; the single
//!   check every job-driven rule starts from. [`plan_job`] is the worker's whole decision.

use crate::audit::{Actor, AuditAction};
use crate::eligibility::{RetryPlan, RetryRefusal, SessionSnapshot, check_retry};
use crate::failure::FailureReason;
use crate::ids::{AttemptNumber, DeadLetterId, PaymentSessionId, ProviderSessionId};
use crate::job::RetryJob;
use crate::money::Money;
use crate::policy::RetryPolicy;
use crate::status::SessionStatus;
use chrono::{DateTime, TimeDelta, Utc};

/// The mutable part of a session: what one transition replaces as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub status: SessionStatus,
    /// The latest failure (the latest decline stands).
    pub failure_reason: Option<FailureReason>,
    /// Retries spent (the original checkout is not one).
    pub retry_attempts: u32,
    pub last_retry_at: Option<DateTime<Utc>>,
    /// The failure reason the latest retry was requested for.
    pub retry_reason: Option<FailureReason>,
    /// When the scheduled retry's checkout is due.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// The attempt whose checkout is live (or was last live).
    pub current_attempt: AttemptNumber,
    pub provider_session_id: Option<ProviderSessionId>,
    pub checkout_url: Option<String>,
    /// Which attempt's checkout was paid.
    pub paid_attempt: Option<AttemptNumber>,
}

impl SessionState {
    /// A session whose first checkout (attempt 0) is live.
    pub fn opened(checkout: &ProviderCheckout) -> Self {
        Self {
            status: SessionStatus::Open,
            failure_reason: None,
            retry_attempts: 0,
            last_retry_at: None,
            retry_reason: None,
            next_retry_at: None,
            current_attempt: AttemptNumber::ORIGINAL,
            provider_session_id: Some(checkout.id.clone()),
            checkout_url: Some(checkout.url.clone()),
            paid_attempt: None,
        }
    }
}

/// Where one attempt (one provider checkout) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptStatus {
    Scheduled,
    Open,
    /// Completed with a payment that settles later.
    Processing,
    Failed,
    Succeeded,
    Abandoned,
    DeadLettered,
}

impl AttemptStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Open => "open",
            Self::Processing => "processing",
            Self::Failed => "failed",
            Self::Succeeded => "succeeded",
            Self::Abandoned => "abandoned",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// Insert-or-update of one attempt row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptChange {
    pub attempt: AttemptNumber,
    pub status: AttemptStatus,
    pub provider_session_id: Option<ProviderSessionId>,
    pub failure_reason: Option<FailureReason>,
    pub scheduled_for: Option<DateTime<Utc>>,
}

impl AttemptChange {
    fn new(attempt: AttemptNumber, status: AttemptStatus) -> Self {
        Self {
            attempt,
            status,
            provider_session_id: None,
            failure_reason: None,
            scheduled_for: None,
        }
    }
}

/// Why a retry was dropped (the `reason` of `retry_abandoned`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonReason {
    WindowExpired,
    AttemptsExhausted,
}

impl AbandonReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WindowExpired => "window_expired",
            Self::AttemptsExhausted => "attempts_exhausted",
        }
    }
}

/// A provider checkout as created: its id, the page the buyer pays on, when it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderCheckout {
    pub id: ProviderSessionId,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// What an audit entry says, one variant per kind of entry; the service writes it as the
/// entry's JSON `details`.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditDetails {
    CheckoutCreated {
        provider_session_id: ProviderSessionId,
        money: Money,
        expires_at: DateTime<Utc>,
    },
    PaymentFailed {
        failure_reason: FailureReason,
    },
    RetryRequested {
        failure_reason: Option<FailureReason>,
        delay_seconds: u64,
        scheduled_for: DateTime<Utc>,
    },
    RetryInitiated {
        provider_session_id: ProviderSessionId,
        retry_reason: Option<FailureReason>,
        checkout_expires_at: DateTime<Utc>,
        receive_count: u32,
    },
    RetryAbandoned {
        reason: AbandonReason,
    },
    PaymentSucceeded {
        after_window: bool,
        /// The scheduled retry the payment made unnecessary (its attempt number).
        dropped_scheduled_retry: Option<u32>,
    },
    PaymentProcessing {
        after_window: bool,
        /// The scheduled retry dropped because money may now move (its attempt number).
        dropped_scheduled_retry: Option<u32>,
    },
    RetryDeadLettered {
        last_error: String,
        receive_count: u32,
    },
    RetryRedriven {
        dead_letter_id: DeadLetterId,
        last_error: String,
    },
    SessionExpired {
        expires_at: DateTime<Utc>,
        previous_status: SessionStatus,
    },
    DoublePaymentDetected {
        paid_attempt: AttemptNumber,
        duplicate_attempt: AttemptNumber,
        provider_session_id: Option<ProviderSessionId>,
        payment_intent: Option<String>,
        refund_requested: bool,
    },
}

impl AuditDetails {
    /// The audit log's action for these details.
    pub const fn action(&self) -> AuditAction {
        match self {
            Self::CheckoutCreated { .. } => AuditAction::CheckoutCreated,
            Self::PaymentFailed { .. } => AuditAction::PaymentFailed,
            Self::RetryRequested { .. } => AuditAction::RetryRequested,
            Self::RetryInitiated { .. } => AuditAction::RetryInitiated,
            Self::RetryAbandoned { .. } => AuditAction::RetryAbandoned,
            Self::PaymentSucceeded { .. } => AuditAction::PaymentSucceeded,
            Self::PaymentProcessing { .. } => AuditAction::PaymentProcessing,
            Self::RetryDeadLettered { .. } => AuditAction::RetryDeadLettered,
            Self::RetryRedriven { .. } => AuditAction::RetryRedriven,
            Self::SessionExpired { .. } => AuditAction::SessionExpired,
            Self::DoublePaymentDetected { .. } => AuditAction::DoublePaymentDetected,
        }
    }
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditNote {
    pub attempt: Option<AttemptNumber>,
    pub actor: Actor,
    pub details: AuditDetails,
}

/// An analytics (Segment) event to record, with its properties (DESIGN.md §6).
#[derive(Debug, Clone, PartialEq)]
pub enum Track {
    /// `payments.retry.scheduled`: the buyer's retry was accepted.
    Scheduled {
        attempt: AttemptNumber,
        failure_reason: Option<FailureReason>,
        delay_minutes: f64,
    },
    /// `payments.retry.initiated`: the retry's checkout was created.
    Initiated {
        attempt: AttemptNumber,
        failure_reason: Option<FailureReason>,
        delay_minutes: f64,
    },
    /// `payments.retry.completed`: a retried checkout ended.
    Completed {
        attempt: AttemptNumber,
        success: bool,
        failure_reason: Option<FailureReason>,
    },
    /// `payments.retry.abandoned`.
    Abandoned {
        attempt: AttemptNumber,
        reason: AbandonReason,
        failure_reason: Option<FailureReason>,
    },
}

/// A metric to emit once the change is committed (never for a lost race).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricNote {
    /// The worker created the checkout of retry `attempt`, retrying `reason`.
    RetryCheckoutCreated {
        attempt: AttemptNumber,
        reason: Option<FailureReason>,
    },
    /// A retried checkout ended: paid (`failure` none) or failed.
    RetryFinished {
        attempt: AttemptNumber,
        failure: Option<FailureReason>,
    },
    RetryAbandoned(AbandonReason),
    RetryDeadLettered,
    DoublePaymentDetected {
        duplicate_attempt: AttemptNumber,
    },
}

/// A second payment of an already paid session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateCharge {
    /// The attempt whose payment stands.
    pub paid_attempt: AttemptNumber,
    /// The attempt whose checkout was paid as well.
    pub duplicate_attempt: AttemptNumber,
    pub provider_session_id: Option<ProviderSessionId>,
    /// The provider's id of the duplicate charge, what a refund needs.
    pub payment_intent: Option<String>,
    /// A refund is owed (automatic refunds are on and the charge is identified).
    pub refund_requested: bool,
}

/// A retry job moved aside, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterNote {
    pub job: RetryJob,
    pub receive_count: u32,
    pub last_error: String,
}

/// Everything a change records besides the new state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Effects {
    pub attempt: Option<AttemptChange>,
    pub audit: Vec<AuditNote>,
    pub analytics: Vec<Track>,
    /// A retry job to queue, due at its `scheduled_for`.
    pub enqueue: Option<RetryJob>,
    pub duplicate: Option<DuplicateCharge>,
    pub dead_letter: Option<DeadLetterNote>,
    /// The id of a dead letter being redriven: removed with this change.
    pub redrive: Option<DeadLetterId>,
    /// Provider checkouts nobody should pay any more (superseded by a newer attempt's, left
    /// payable after a payment through another, or past the window): closed durably, retried
    /// until the provider says they are closed.
    pub close_checkouts: Vec<ProviderSessionId>,
    pub metrics: Vec<MetricNote>,
}

/// A session's new state and what goes with it, committed together.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub state: SessionState,
    pub effects: Effects,
}

impl Change {
    fn to(state: SessionState) -> Self {
        Self {
            state,
            effects: Effects::default(),
        }
    }
}

/// What a provider event did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventEffect {
    Succeeded,
    /// A payment that settles later: the session waits for its outcome.
    Processing,
    Failed,
    /// A later decline of an already failed attempt: only the reason changed.
    ReasonUpdated,
    /// A second payment on a session already paid by another attempt's checkout.
    DuplicatePayment,
    Expired,
    /// Nothing to do: an older attempt, an unknown session, a repeated event.
    Ignored,
}

/// The payment an event (or a reconciliation with the provider) reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payment<'a> {
    /// `None`: the provider did not echo the attempt; the current one is assumed.
    pub attempt: Option<AttemptNumber>,
    pub provider_session_id: Option<&'a ProviderSessionId>,
    pub payment_intent: Option<&'a str>,
}

/// Where a retry job stands against its session: the "is this job still current" rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStanding {
    /// The session is `retry_scheduled` for exactly this attempt: the job is due work.
    Scheduled,
    /// The session is `failed` with this attempt the last one spent: what a dead-lettered
    /// job leaves behind, and the only state a redrive may start from.
    Parked,
    /// The session moved on (paid, expired, another attempt, a checkout opened).
    MovedOn,
}

/// Whether the job for retry `attempt` is still the session's current one.
pub fn job_standing(state: &SessionState, attempt: AttemptNumber) -> JobStanding {
    if state.retry_attempts != attempt.get() {
        return JobStanding::MovedOn;
    }
    match state.status {
        SessionStatus::RetryScheduled => JobStanding::Scheduled,
        SessionStatus::Failed => JobStanding::Parked,
        _ => JobStanding::MovedOn,
    }
}

/// How early a delivered job may be processed (clock skew between processes).
const DUE_TOLERANCE: TimeDelta = TimeDelta::seconds(1);

/// Whether a delivered job is due; one delivered early (an SQS delay is at most 15 minutes)
/// is queued again.
pub fn job_is_due(job: &RetryJob, now: DateTime<Utc>) -> bool {
    job.scheduled_for - now <= DUE_TOLERANCE
}

/// What the worker does with a due job, given the session as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStep {
    /// Nothing: acknowledge the job.
    Drop(&'static str),
    /// The window closed first: expire the session ([`Lifecycle::window_closed`]).
    Abandon,
    /// Create the retry's checkout, after asking the provider whether `check_paid` (the
    /// current checkout) was paid meanwhile.
    OpenCheckout {
        check_paid: Option<ProviderSessionId>,
    },
}

/// The worker's decision for a due job; `session` is `None` when it does not exist.
pub fn plan_job(job: &RetryJob, session: Option<&Lifecycle<'_>>, now: DateTime<Utc>) -> JobStep {
    let Some(session) = session else {
        return JobStep::Drop("unknown session");
    };
    if job_standing(session.state, job.attempt_number) != JobStanding::Scheduled {
        return JobStep::Drop("session moved on");
    }
    if now >= session.expires_at {
        return JobStep::Abandon;
    }
    JobStep::OpenCheckout {
        check_paid: session.state.provider_session_id.clone(),
    }
}

/// A new session's first checkout: its state and the `checkout_created` entry.
pub fn open_checkout(
    checkout: &ProviderCheckout,
    money: &Money,
    expires_at: DateTime<Utc>,
    actor: Actor,
) -> Change {
    let mut change = Change::to(SessionState::opened(checkout));
    change.effects.audit.push(AuditNote {
        attempt: Some(AttemptNumber::ORIGINAL),
        actor,
        details: AuditDetails::CheckoutCreated {
            provider_session_id: checkout.id.clone(),
            money: money.clone(),
            expires_at,
        },
    });
    change
}

/// A stored session as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle<'a> {
    pub id: &'a PaymentSessionId,
    /// The payment window's end.
    pub expires_at: DateTime<Utc>,
    pub state: &'a SessionState,
}

impl<'a> Lifecycle<'a> {
    pub fn new(
        id: &'a PaymentSessionId,
        expires_at: DateTime<Utc>,
        state: &'a SessionState,
    ) -> Self {
        Self {
            id,
            expires_at,
            state,
        }
    }

    /// What eligibility needs.
    pub fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            status: self.state.status,
            retry_attempts: self.state.retry_attempts,
            failure_reason: self.state.failure_reason.clone(),
            expires_at: self.expires_at,
        }
    }

    fn system(&self, attempt: AttemptNumber, details: AuditDetails) -> AuditNote {
        AuditNote {
            attempt: Some(attempt),
            actor: Actor::System,
            details,
        }
    }

    /// A payment through some attempt's checkout. `auto_refund`: a double payment is to be
    /// refunded (when the charge is identified).
    pub fn paid(
        &self,
        payment: &Payment<'_>,
        now: DateTime<Utc>,
        auto_refund: bool,
    ) -> Option<(Change, EventEffect)> {
        let state = self.state;
        let attempt = payment.attempt.unwrap_or(state.current_attempt);
        if state.status == SessionStatus::Succeeded {
            return self.paid_twice(attempt, payment, auto_refund);
        }
        let mut change = Change::to(SessionState {
            status: SessionStatus::Succeeded,
            next_retry_at: None,
            paid_attempt: Some(attempt),
            ..state.clone()
        });
        let effects = &mut change.effects;
        effects.attempt = Some(AttemptChange::new(attempt, AttemptStatus::Succeeded));
        // Paid through an older attempt's checkout: the current one must not be paid too.
        effects.close_checkouts.extend(
            state
                .provider_session_id
                .clone()
                .filter(|current| payment.provider_session_id != Some(current)),
        );
        effects.audit.push(self.system(
            attempt,
            AuditDetails::PaymentSucceeded {
                after_window: now >= self.expires_at,
                dropped_scheduled_retry:
                    (state.status == SessionStatus::RetryScheduled).then_some(state.retry_attempts),
            },
        ));
        if attempt.is_retry() {
            effects.analytics.push(Track::Completed {
                attempt,
                success: true,
                failure_reason: state.retry_reason.clone(),
            });
            effects.metrics.push(MetricNote::RetryFinished {
                attempt,
                failure: None,
            });
        }
        Some((change, EventEffect::Succeeded))
    }

    /// Money moved twice: the first success stands, the second is recorded for support and,
    /// when asked and possible, a refund is owed (made after the commit).
    fn paid_twice(
        &self,
        attempt: AttemptNumber,
        payment: &Payment<'_>,
        auto_refund: bool,
    ) -> Option<(Change, EventEffect)> {
        let state = self.state;
        let paid_attempt = state.paid_attempt.unwrap_or(state.current_attempt);
        if paid_attempt == attempt {
            // The payment already recorded, reported again.
            return None;
        }
        // Without the payment intent there is nothing to refund by.
        let refund_requested = auto_refund && payment.payment_intent.is_some();
        let mut change = Change::to(state.clone());
        let effects = &mut change.effects;
        effects.audit.push(self.system(
            attempt,
            AuditDetails::DoublePaymentDetected {
                paid_attempt,
                duplicate_attempt: attempt,
                provider_session_id: payment.provider_session_id.cloned(),
                payment_intent: payment.payment_intent.map(str::to_owned),
                refund_requested,
            },
        ));
        effects.duplicate = Some(DuplicateCharge {
            paid_attempt,
            duplicate_attempt: attempt,
            provider_session_id: payment.provider_session_id.cloned(),
            payment_intent: payment.payment_intent.map(str::to_owned),
            refund_requested,
        });
        effects.metrics.push(MetricNote::DoublePaymentDetected {
            duplicate_attempt: attempt,
        });
        Some((change, EventEffect::DuplicatePayment))
    }

    /// A failed payment of `attempt` (`None`: an event that names no attempt, ignored).
    pub fn failed(
        &self,
        attempt: Option<AttemptNumber>,
        reason: &FailureReason,
        max_attempts: u32,
    ) -> Option<(Change, EventEffect)> {
        let state = self.state;
        let attempt = attempt?;
        if attempt != state.current_attempt {
            return None;
        }
        let entry = self.system(
            attempt,
            AuditDetails::PaymentFailed {
                failure_reason: reason.clone(),
            },
        );
        match state.status {
            SessionStatus::Open => {
                let mut change = Change::to(SessionState {
                    status: SessionStatus::Failed,
                    failure_reason: Some(reason.clone()),
                    ..state.clone()
                });
                let effects = &mut change.effects;
                effects.attempt = Some(AttemptChange {
                    failure_reason: Some(reason.clone()),
                    ..AttemptChange::new(attempt, AttemptStatus::Failed)
                });
                effects.audit.push(entry);
                if attempt.is_retry() {
                    let exhausted = state.retry_attempts >= max_attempts;
                    effects.analytics.push(Track::Completed {
                        attempt,
                        success: false,
                        failure_reason: Some(reason.clone()),
                    });
                    effects.metrics.push(MetricNote::RetryFinished {
                        attempt,
                        failure: Some(reason.clone()),
                    });
                    if exhausted {
                        self.abandon(effects, attempt, AbandonReason::AttemptsExhausted, reason);
                    }
                }
                Some((change, EventEffect::Failed))
            }
            SessionStatus::Failed => {
                // The latest decline stands.
                let mut change = Change::to(SessionState {
                    failure_reason: Some(reason.clone()),
                    ..state.clone()
                });
                change.effects.audit.push(entry);
                Some((change, EventEffect::ReasonUpdated))
            }
            _ => None,
        }
    }

    /// The last allowed retry failed: no retry is left.
    fn abandon(
        &self,
        effects: &mut Effects,
        attempt: AttemptNumber,
        reason: AbandonReason,
        failure: &FailureReason,
    ) {
        effects
            .audit
            .push(self.system(attempt, AuditDetails::RetryAbandoned { reason }));
        effects.analytics.push(Track::Abandoned {
            attempt,
            reason,
            failure_reason: Some(failure.clone()),
        });
        effects.metrics.push(MetricNote::RetryAbandoned(reason));
    }

    /// The current attempt's checkout was completed with a payment that settles later
    /// (`attempt` `None`: not matched to a checkout, ignored). Also after the window, and
    /// also from `expired`: money may still move, so the session waits for the outcome.
    pub fn processing(
        &self,
        attempt: Option<AttemptNumber>,
        now: DateTime<Utc>,
    ) -> Option<(Change, EventEffect)> {
        let state = self.state;
        let attempt = attempt?;
        let waiting = matches!(
            state.status,
            SessionStatus::Open
                | SessionStatus::Failed
                | SessionStatus::RetryScheduled
                | SessionStatus::Expired
        );
        if attempt != state.current_attempt || !waiting {
            return None;
        }
        let mut change = Change::to(SessionState {
            status: SessionStatus::Processing,
            next_retry_at: None,
            ..state.clone()
        });
        let effects = &mut change.effects;
        effects.attempt = Some(AttemptChange::new(attempt, AttemptStatus::Processing));
        effects.audit.push(self.system(
            attempt,
            AuditDetails::PaymentProcessing {
                after_window: now >= self.expires_at,
                dropped_scheduled_retry:
                    (state.status == SessionStatus::RetryScheduled).then_some(state.retry_attempts),
            },
        ));
        Some((change, EventEffect::Processing))
    }

    /// The processing payment of `attempt` did not settle: the session is `failed` as after
    /// any failure of that checkout, or `expired` when the window has passed meanwhile.
    pub fn async_payment_failed(
        &self,
        attempt: Option<AttemptNumber>,
        reason: &FailureReason,
        max_attempts: u32,
        now: DateTime<Utc>,
    ) -> Option<(Change, EventEffect)> {
        if self.state.status != SessionStatus::Processing {
            return None;
        }
        // The checkout's outcome, decided as a failure of the open checkout it was.
        let as_open = SessionState {
            status: SessionStatus::Open,
            ..self.state.clone()
        };
        let (mut change, effect) = Lifecycle::new(self.id, self.expires_at, &as_open).failed(
            attempt,
            reason,
            max_attempts,
        )?;
        if let Some(closed) =
            Lifecycle::new(self.id, self.expires_at, &change.state).window_closed(now)
        {
            change.state = closed.state;
            change.effects.audit.extend(closed.effects.audit);
            change
                .effects
                .close_checkouts
                .extend(closed.effects.close_checkouts);
        }
        Some((change, effect))
    }

    /// The provider closed `attempt`'s checkout unpaid. Counts only for the current, open
    /// checkout inside the window (after it, the window's own rule expires the session).
    pub fn checkout_expired(
        &self,
        attempt: Option<AttemptNumber>,
        now: DateTime<Utc>,
    ) -> Option<(Change, EventEffect)> {
        let state = self.state;
        if attempt != Some(state.current_attempt)
            || state.status != SessionStatus::Open
            || now >= self.expires_at
        {
            return None;
        }
        let reason = FailureReason::from_code(FailureReason::CHECKOUT_EXPIRED);
        let mut change = Change::to(SessionState {
            status: SessionStatus::Failed,
            failure_reason: Some(reason.clone()),
            ..state.clone()
        });
        change.effects.attempt = Some(AttemptChange {
            failure_reason: Some(reason.clone()),
            ..AttemptChange::new(state.current_attempt, AttemptStatus::Failed)
        });
        change.effects.audit.push(self.system(
            state.current_attempt,
            AuditDetails::PaymentFailed {
                failure_reason: reason,
            },
        ));
        Some((change, EventEffect::Expired))
    }

    /// The buyer's retry: refused as [`check_retry`] says, or the attempt spent and the job
    /// queued.
    pub fn request_retry(
        &self,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
        actor: Actor,
    ) -> Result<(Change, RetryPlan), RetryRefusal> {
        let plan = check_retry(&self.snapshot(), policy, now)?;
        let reason = self.state.failure_reason.clone();
        let mut change = Change::to(SessionState {
            status: SessionStatus::RetryScheduled,
            retry_attempts: plan.attempt.get(),
            last_retry_at: Some(now),
            retry_reason: reason.clone(),
            next_retry_at: Some(plan.scheduled_for),
            ..self.state.clone()
        });
        let effects = &mut change.effects;
        effects.attempt = Some(AttemptChange {
            scheduled_for: Some(plan.scheduled_for),
            ..AttemptChange::new(plan.attempt, AttemptStatus::Scheduled)
        });
        effects.audit.push(AuditNote {
            attempt: Some(plan.attempt),
            actor,
            details: AuditDetails::RetryRequested {
                failure_reason: reason.clone(),
                delay_seconds: plan.delay.as_secs(),
                scheduled_for: plan.scheduled_for,
            },
        });
        effects.enqueue = Some(RetryJob::new(
            self.id.clone(),
            plan.attempt,
            plan.delay.as_secs(),
            plan.scheduled_for,
            now,
        ));
        effects.analytics.push(Track::Scheduled {
            attempt: plan.attempt,
            failure_reason: reason,
            delay_minutes: plan.delay.as_secs_f64() / 60.0,
        });
        Ok((change, plan))
    }

    /// The worker created `job`'s checkout: the session is open on it. `None` when the job
    /// is no longer current.
    pub fn retry_checkout_opened(
        &self,
        job: &RetryJob,
        checkout: &ProviderCheckout,
        receive_count: u32,
    ) -> Option<Change> {
        if job_standing(self.state, job.attempt_number) != JobStanding::Scheduled {
            return None;
        }
        let state = self.state;
        let attempt = job.attempt_number;
        let mut change = Change::to(SessionState {
            status: SessionStatus::Open,
            next_retry_at: None,
            current_attempt: attempt,
            provider_session_id: Some(checkout.id.clone()),
            checkout_url: Some(checkout.url.clone()),
            ..state.clone()
        });
        let effects = &mut change.effects;
        effects.attempt = Some(AttemptChange {
            provider_session_id: Some(checkout.id.clone()),
            ..AttemptChange::new(attempt, AttemptStatus::Open)
        });
        // The previous attempt's checkout stays payable after a decline: close it.
        effects.close_checkouts.extend(
            state
                .provider_session_id
                .clone()
                .filter(|previous| *previous != checkout.id),
        );
        effects.audit.push(self.system(
            attempt,
            AuditDetails::RetryInitiated {
                provider_session_id: checkout.id.clone(),
                retry_reason: state.retry_reason.clone(),
                checkout_expires_at: checkout.expires_at,
                receive_count,
            },
        ));
        effects.analytics.push(Track::Initiated {
            attempt,
            failure_reason: state.retry_reason.clone(),
            delay_minutes: job.delay_minutes,
        });
        effects.metrics.push(MetricNote::RetryCheckoutCreated {
            attempt,
            reason: state.retry_reason.clone(),
        });
        Some(change)
    }

    /// The payment window passed: a live session expires, and a scheduled retry is
    /// abandoned (`window_expired`). `None` when the window is open or the session is final.
    pub fn window_closed(&self, now: DateTime<Utc>) -> Option<Change> {
        let state = self.state;
        // A processing payment may still move money: only its outcome ends the session.
        if state.status.is_terminal()
            || state.status == SessionStatus::Processing
            || now < self.expires_at
        {
            return None;
        }
        let mut change = Change::to(SessionState {
            status: SessionStatus::Expired,
            next_retry_at: None,
            ..state.clone()
        });
        let effects = &mut change.effects;
        // A retry's checkout may outlive the window (Stripe's 30-minute minimum): close it.
        effects
            .close_checkouts
            .extend(state.provider_session_id.clone());
        if state.status == SessionStatus::RetryScheduled {
            let attempt = AttemptNumber::new(state.retry_attempts);
            let reason = AbandonReason::WindowExpired;
            effects.attempt = Some(AttemptChange::new(attempt, AttemptStatus::Abandoned));
            effects
                .audit
                .push(self.system(attempt, AuditDetails::RetryAbandoned { reason }));
            effects.analytics.push(Track::Abandoned {
                attempt,
                reason,
                failure_reason: state.retry_reason.clone(),
            });
            effects.metrics.push(MetricNote::RetryAbandoned(reason));
        }
        effects.audit.push(self.system(
            state.current_attempt,
            AuditDetails::SessionExpired {
                expires_at: self.expires_at,
                previous_status: state.status,
            },
        ));
        Some(change)
    }

    /// The job kept failing: it is moved aside and the session handed back to the buyer
    /// (`failed`, `retry_processing_failed`; the attempt stays spent). `None` when the job is
    /// no longer current.
    pub fn dead_lettered(&self, job: &RetryJob, receive_count: u32, error: &str) -> Option<Change> {
        if job_standing(self.state, job.attempt_number) != JobStanding::Scheduled {
            return None;
        }
        let mut change = Change::to(SessionState {
            status: SessionStatus::Failed,
            failure_reason: Some(FailureReason::from_code(
                FailureReason::RETRY_PROCESSING_FAILED,
            )),
            next_retry_at: None,
            ..self.state.clone()
        });
        let effects = &mut change.effects;
        effects.attempt = Some(AttemptChange::new(
            job.attempt_number,
            AttemptStatus::DeadLettered,
        ));
        effects.audit.push(self.system(
            job.attempt_number,
            AuditDetails::RetryDeadLettered {
                last_error: error.to_owned(),
                receive_count,
            },
        ));
        effects.dead_letter = Some(DeadLetterNote {
            job: job.clone(),
            receive_count,
            last_error: error.to_owned(),
        });
        effects.metrics.push(MetricNote::RetryDeadLettered);
        Some(change)
    }

    /// An admin sends dead letter `dead_letter_id` (its `job`) again: the session is back in
    /// `retry_scheduled` for that attempt, due now. Refused when the session has moved on or
    /// the window has passed.
    ///
    /// The job is queued again as it was, only its `enqueuedAt` new: its `scheduledFor` fixes
    /// the checkout's parameters (`expires_at`), and the provider's idempotency key names the
    /// attempt, so the redrive repeats the first request exactly. A key reused with other
    /// parameters would be refused (Stripe: 400 `idempotency_error`), and a new key for the
    /// same attempt could open a second live checkout if the first request did get through.
    pub fn redriven(
        &self,
        job: &RetryJob,
        dead_letter_id: DeadLetterId,
        last_error: &str,
        actor: Actor,
        now: DateTime<Utc>,
    ) -> Result<Change, RetryRefusal> {
        match crate::eligibility::effective_status(&self.snapshot(), now) {
            SessionStatus::Succeeded => return Err(RetryRefusal::PaymentAlreadySucceeded),
            SessionStatus::Processing => return Err(RetryRefusal::PaymentProcessing),
            SessionStatus::Expired => return Err(RetryRefusal::WindowExpired),
            _ => {}
        }
        let attempt = job.attempt_number;
        if job_standing(self.state, attempt) != JobStanding::Parked {
            return Err(RetryRefusal::RetryAlreadyScheduled);
        }
        let mut change = Change::to(SessionState {
            status: SessionStatus::RetryScheduled,
            next_retry_at: Some(now),
            failure_reason: self.state.retry_reason.clone(),
            ..self.state.clone()
        });
        let effects = &mut change.effects;
        effects.attempt = Some(AttemptChange {
            scheduled_for: Some(now),
            ..AttemptChange::new(attempt, AttemptStatus::Scheduled)
        });
        effects.audit.push(AuditNote {
            attempt: Some(attempt),
            actor,
            details: AuditDetails::RetryRedriven {
                dead_letter_id,
                last_error: last_error.to_owned(),
            },
        });
        effects.enqueue = Some(RetryJob {
            enqueued_at: now,
            ..job.clone()
        });
        effects.redrive = Some(dead_letter_id);
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    //! Random sequences of events and clock steps, applied through the rules as the service
    //! applies them, with the lifecycle's invariants checked after every step.

    use super::*;
    use crate::eligibility::retry_unavailable_reason;
    use crate::status::RetryUnavailableReason;
    use proptest::prelude::*;
    use std::time::Duration;

    const MAX_ATTEMPTS: u32 = 3;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(900),
            ],
            MAX_ATTEMPTS,
            Duration::from_secs(2 * 3600),
            vec![FailureReason::from_code("stolen_card")],
        )
        .unwrap()
    }

    fn start() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn checkout(attempt: AttemptNumber, now: DateTime<Utc>) -> ProviderCheckout {
        ProviderCheckout {
            id: ProviderSessionId::new(format!("cs_{attempt}")),
            url: format!("https://pay.example/cs_{attempt}"),
            expires_at: now + TimeDelta::hours(1),
        }
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// The clock moves on this many minutes.
        Clock(i64),
        /// A payment through the checkout of one of the attempts that have one.
        Paid {
            attempt: usize,
            intent: bool,
        },
        Failed {
            attempt: usize,
            non_retryable: bool,
        },
        CheckoutExpired {
            attempt: usize,
        },
        /// A checkout completed with a payment that settles later.
        Processing {
            attempt: usize,
        },
        /// That payment did not settle.
        AsyncFailed {
            attempt: usize,
        },
        RequestRetry,
        /// The worker takes a queued job (delivered when due).
        RunJob(usize),
        /// A queued job kept failing.
        DeadLetter(usize),
        Redrive(usize),
        /// The window sweeper runs.
        Sweep,
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0i64..90).prop_map(Event::Clock),
            (0usize..4, any::<bool>())
                .prop_map(|(attempt, intent)| Event::Paid { attempt, intent }),
            (0usize..4, prop::bool::weighted(0.2)).prop_map(|(attempt, non_retryable)| {
                Event::Failed {
                    attempt,
                    non_retryable,
                }
            }),
            (0usize..4).prop_map(|attempt| Event::CheckoutExpired { attempt }),
            (0usize..4).prop_map(|attempt| Event::Processing { attempt }),
            (0usize..4).prop_map(|attempt| Event::AsyncFailed { attempt }),
            Just(Event::RequestRetry),
            (0usize..3).prop_map(Event::RunJob),
            (0usize..3).prop_map(Event::DeadLetter),
            (0usize..3).prop_map(Event::Redrive),
            Just(Event::Sweep),
        ]
    }

    /// How an accepted retry (a request or a redrive) ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ending {
        CheckoutOpened,
        Abandoned,
        DeadLettered,
        /// The session was paid while the retry waited (DESIGN.md §1: pending retries
        /// dropped), recorded as `droppedScheduledRetry`.
        DroppedByPayment,
    }

    /// What caused a change, for the rules about leaving a state.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Cause {
        /// Money moved.
        Payment,
        /// Money may move (a payment that settles later).
        PaymentPending,
        /// The pending payment did not settle.
        AsyncFailure,
        Other,
    }

    /// One session driven through the rules, as the service would.
    struct World {
        id: PaymentSessionId,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        state: SessionState,
        /// Attempts that got a checkout (the ones a provider event can be about).
        checkouts: Vec<AttemptNumber>,
        /// Checkouts still payable at the provider: created, neither closed nor expired.
        live: std::collections::BTreeSet<String>,
        queue: Vec<RetryJob>,
        dead: Vec<(DeadLetterId, RetryJob)>,
        /// The last dead letter id given out (storage's row ids start at 1).
        next_dead_letter: i64,
        /// Every accepted retry, in order, with how it ended so far.
        accepted: Vec<(AttemptNumber, Option<Ending>)>,
    }

    impl World {
        fn new() -> Self {
            let now = start();
            let expires_at = now + TimeDelta::hours(2);
            let opened = open_checkout(
                &checkout(AttemptNumber::ORIGINAL, now),
                &Money {
                    amount: crate::money::Amount::new(2500).unwrap(),
                    currency: crate::money::Currency::parse("usd").unwrap(),
                },
                expires_at,
                Actor::System,
            );
            Self {
                id: PaymentSessionId::parse("ps_prop").unwrap(),
                expires_at,
                now,
                state: opened.state,
                checkouts: vec![AttemptNumber::ORIGINAL],
                live: [checkout(AttemptNumber::ORIGINAL, now).id.to_string()].into(),
                queue: Vec::new(),
                dead: Vec::new(),
                next_dead_letter: 0,
                accepted: Vec::new(),
            }
        }

        fn lifecycle(&self) -> Lifecycle<'_> {
            Lifecycle::new(&self.id, self.expires_at, &self.state)
        }

        fn checkout_of(&self, pick: usize) -> AttemptNumber {
            self.checkouts[pick % self.checkouts.len()]
        }

        /// Records a change and checks what must hold across it.
        fn apply(&mut self, change: Change, cause: Cause) -> Result<(), TestCaseError> {
            let before = self.state.clone();
            let after = &change.state;
            prop_assert!(
                after.retry_attempts <= MAX_ATTEMPTS,
                "attempts over the cap: {after:?}"
            );
            prop_assert!(
                after.retry_attempts >= before.retry_attempts,
                "an attempt was given back"
            );
            match before.status {
                // A double payment keeps `succeeded`; nothing else changes a paid session.
                SessionStatus::Succeeded => {
                    prop_assert_eq!(after.status, SessionStatus::Succeeded);
                    prop_assert_eq!(after.paid_attempt, before.paid_attempt);
                }
                // Only money that moved or may move leaves `expired`: a payment (flagged as
                // after the window) or one that settles later.
                SessionStatus::Expired => {
                    prop_assert!(
                        after.status == SessionStatus::Expired
                            || (cause == Cause::Payment
                                && after.status == SessionStatus::Succeeded)
                            || (cause == Cause::PaymentPending
                                && after.status == SessionStatus::Processing),
                        "left expired for {:?}",
                        after.status
                    );
                }
                // Only the pending payment's outcome ends `processing`.
                SessionStatus::Processing => {
                    prop_assert!(
                        after.status == SessionStatus::Processing
                            || (cause == Cause::Payment
                                && after.status == SessionStatus::Succeeded)
                            || (cause == Cause::AsyncFailure
                                && matches!(
                                    after.status,
                                    SessionStatus::Failed | SessionStatus::Expired
                                )),
                        "left processing for {:?} ({cause:?})",
                        after.status
                    );
                    if after.status == SessionStatus::Failed {
                        prop_assert!(self.now < self.expires_at, "failed after the window");
                    }
                }
                _ => {}
            }
            for note in &change.effects.audit {
                if let AuditDetails::PaymentSucceeded {
                    after_window,
                    dropped_scheduled_retry,
                }
                | AuditDetails::PaymentProcessing {
                    after_window,
                    dropped_scheduled_retry,
                } = &note.details
                {
                    prop_assert_eq!(*after_window, self.now >= self.expires_at);
                    if let Some(n) = dropped_scheduled_retry {
                        self.end(AttemptNumber::new(*n), Ending::DroppedByPayment)?;
                    }
                }
            }
            if let Some(attempt) = &change.effects.attempt {
                let ending = match attempt.status {
                    AttemptStatus::Open if attempt.attempt.is_retry() => {
                        self.checkouts.push(attempt.attempt);
                        Some(Ending::CheckoutOpened)
                    }
                    AttemptStatus::Abandoned => Some(Ending::Abandoned),
                    AttemptStatus::DeadLettered => Some(Ending::DeadLettered),
                    AttemptStatus::Scheduled => {
                        self.accepted.push((attempt.attempt, None));
                        None
                    }
                    _ => None,
                };
                if let Some(ending) = ending {
                    self.end(attempt.attempt, ending)?;
                }
            }
            if let Some(AttemptChange {
                status: AttemptStatus::Open,
                provider_session_id: Some(id),
                ..
            }) = &change.effects.attempt
            {
                self.live.insert(id.to_string());
            }
            for id in &change.effects.close_checkouts {
                self.live.remove(&id.to_string());
            }
            match change.state.status {
                // Paid: no other checkout of the session can be paid any more.
                SessionStatus::Succeeded => {
                    let paid = change
                        .state
                        .paid_attempt
                        .map(|a| checkout(a, self.now).id.to_string());
                    prop_assert!(
                        self.live.iter().all(|id| Some(id) == paid.as_ref()),
                        "paid through {paid:?}, still payable: {:?}",
                        self.live
                    );
                }
                // Closed unpaid: nothing can be paid.
                SessionStatus::Expired => {
                    prop_assert!(
                        self.live.is_empty(),
                        "expired, still payable: {:?}",
                        self.live
                    );
                }
                // At most the current attempt's checkout is payable.
                _ => {
                    let current = change
                        .state
                        .provider_session_id
                        .as_ref()
                        .map(ToString::to_string);
                    prop_assert!(
                        self.live.iter().all(|id| Some(id) == current.as_ref()),
                        "current {current:?}, payable: {:?}",
                        self.live
                    );
                }
            }
            if let Some(job) = change.effects.enqueue {
                prop_assert_eq!(job.attempt_number.get(), change.state.retry_attempts);
                self.queue.push(job);
            }
            if let Some(dead) = change.effects.dead_letter {
                self.next_dead_letter += 1;
                let id = DeadLetterId::from_row(self.next_dead_letter).expect("positive");
                self.dead.push((id, dead.job));
            }
            if let Some(id) = &change.effects.redrive {
                self.dead.retain(|(d, _)| d != id);
            }
            self.state = change.state;
            // At most one queued job is ever the current one.
            let current = self
                .queue
                .iter()
                .filter(|j| job_standing(&self.state, j.attempt_number) == JobStanding::Scheduled)
                .count();
            prop_assert!(current <= 1, "{current} current jobs");
            Ok(())
        }

        /// An accepted retry of `attempt` ended: exactly one open acceptance must end.
        fn end(&mut self, attempt: AttemptNumber, ending: Ending) -> Result<(), TestCaseError> {
            let open = self
                .accepted
                .iter_mut()
                .find(|(a, end)| *a == attempt && end.is_none());
            prop_assert!(
                open.is_some(),
                "{ending:?} for retry {attempt}, which had no open acceptance: {:?}",
                self.accepted
            );
            if let Some((_, end)) = open {
                *end = Some(ending);
            }
            Ok(())
        }

        fn step(&mut self, event: &Event) -> Result<(), TestCaseError> {
            let now = self.now;
            let policy = policy();
            match event {
                Event::Clock(minutes) => self.now += TimeDelta::minutes(*minutes),
                Event::Paid { attempt, intent } => {
                    let attempt = self.checkout_of(*attempt);
                    let id = ProviderSessionId::new(format!("cs_{attempt}"));
                    let payment = Payment {
                        attempt: Some(attempt),
                        provider_session_id: Some(&id),
                        payment_intent: intent.then_some("pi_1"),
                    };
                    if let Some((change, _)) = self.lifecycle().paid(&payment, now, true) {
                        self.apply(change, Cause::Payment)?;
                    }
                }
                Event::Failed {
                    attempt,
                    non_retryable,
                } => {
                    let attempt = self.checkout_of(*attempt);
                    let reason = FailureReason::from_code(if *non_retryable {
                        "stolen_card"
                    } else {
                        "card_declined"
                    });
                    let decided = self
                        .lifecycle()
                        .failed(Some(attempt), &reason, MAX_ATTEMPTS);
                    if let Some((change, _)) = decided {
                        self.apply(change, Cause::Other)?;
                    }
                }
                Event::CheckoutExpired { attempt } => {
                    let attempt = self.checkout_of(*attempt);
                    // The provider closed it, whatever payretry makes of that.
                    self.live.remove(&checkout(attempt, now).id.to_string());
                    if let Some((change, _)) = self.lifecycle().checkout_expired(Some(attempt), now)
                    {
                        self.apply(change, Cause::Other)?;
                    }
                }
                Event::Processing { attempt } => {
                    let attempt = self.checkout_of(*attempt);
                    if let Some((change, _)) = self.lifecycle().processing(Some(attempt), now) {
                        self.apply(change, Cause::PaymentPending)?;
                    }
                }
                Event::AsyncFailed { attempt } => {
                    let attempt = self.checkout_of(*attempt);
                    let reason = FailureReason::from_code(FailureReason::ASYNC_PAYMENT_FAILED);
                    let decided = self.lifecycle().async_payment_failed(
                        Some(attempt),
                        &reason,
                        MAX_ATTEMPTS,
                        now,
                    );
                    if let Some((change, _)) = decided {
                        self.apply(change, Cause::AsyncFailure)?;
                    }
                }
                Event::RequestRetry => {
                    if let Ok((change, plan)) =
                        self.lifecycle().request_retry(&policy, now, Actor::System)
                    {
                        prop_assert!(plan.attempt.get() <= MAX_ATTEMPTS);
                        self.apply(change, Cause::Other)?;
                    }
                }
                Event::RunJob(pick) => self.run_job(*pick)?,
                Event::DeadLetter(pick) => {
                    if !self.queue.is_empty() {
                        let job = self.queue.remove(pick % self.queue.len());
                        if let Some(change) =
                            self.lifecycle().dead_lettered(&job, 5, "provider down")
                        {
                            self.apply(change, Cause::Other)?;
                        }
                    }
                }
                Event::Redrive(pick) => {
                    if !self.dead.is_empty() {
                        let (id, job) = self.dead[pick % self.dead.len()].clone();
                        let redriven = self.lifecycle().redriven(
                            &job,
                            id,
                            "provider down",
                            Actor::System,
                            now,
                        );
                        if let Ok(change) = redriven {
                            self.apply(change, Cause::Other)?;
                        }
                    }
                }
                Event::Sweep => self.sweep()?,
            }
            self.check_eligibility_agrees(&policy)
        }

        fn run_job(&mut self, pick: usize) -> Result<(), TestCaseError> {
            if self.queue.is_empty() {
                return Ok(());
            }
            let job = self.queue.remove(pick % self.queue.len());
            // Delivered when due (an early delivery is only deferred).
            self.now = self.now.max(job.scheduled_for);
            prop_assert!(job_is_due(&job, self.now));
            let now = self.now;
            match plan_job(&job, Some(&self.lifecycle()), now) {
                JobStep::Drop(_) => {}
                JobStep::Abandon => self.sweep()?,
                JobStep::OpenCheckout { .. } => {
                    let opened = self.lifecycle().retry_checkout_opened(
                        &job,
                        &checkout(job.attempt_number, now),
                        1,
                    );
                    prop_assert!(
                        opened.is_some(),
                        "a current job could not open its checkout"
                    );
                    if let Some(change) = opened {
                        self.apply(change, Cause::Other)?;
                    }
                }
            }
            Ok(())
        }

        fn sweep(&mut self) -> Result<(), TestCaseError> {
            if let Some(change) = self.lifecycle().window_closed(self.now) {
                prop_assert_eq!(change.state.status, SessionStatus::Expired);
                self.apply(change, Cause::Other)?;
            }
            Ok(())
        }

        /// The status view's `retryUnavailableReason` is what the retry rule decides.
        fn check_eligibility_agrees(&self, policy: &RetryPolicy) -> Result<(), TestCaseError> {
            let lifecycle = self.lifecycle();
            let reason = retry_unavailable_reason(&lifecycle.snapshot(), policy, self.now);
            match lifecycle.request_retry(policy, self.now, Actor::System) {
                Ok(_) => prop_assert_eq!(reason, None),
                Err(refusal) => prop_assert_eq!(reason, Some(refusal.unavailable_reason())),
            }
            let state = &self.state;
            let expected = if state.status == SessionStatus::Succeeded {
                Some(RetryUnavailableReason::PaymentSucceeded)
            } else if state.status == SessionStatus::Processing {
                Some(RetryUnavailableReason::PaymentProcessing)
            } else if self.now >= self.expires_at || state.status == SessionStatus::Expired {
                Some(RetryUnavailableReason::WindowExpired)
            } else if state.status == SessionStatus::RetryScheduled {
                Some(RetryUnavailableReason::RetryScheduled)
            } else if state.status == SessionStatus::Open {
                Some(RetryUnavailableReason::PaymentNotFailed)
            } else if state.retry_attempts >= MAX_ATTEMPTS {
                Some(RetryUnavailableReason::LimitReached)
            } else {
                reason
            };
            prop_assert_eq!(reason, expected);
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_lifecycle_keeps_its_invariants(events in prop::collection::vec(any_event(), 0..40)) {
            let mut world = World::new();
            for event in &events {
                world.step(event)?;
            }
            // Let everything play out: the window closes, the sweeper and the worker run.
            world.now = world.expires_at + TimeDelta::minutes(1);
            world.sweep()?;
            while !world.queue.is_empty() {
                world.run_job(0)?;
            }
            for (attempt, ending) in &world.accepted {
                prop_assert!(ending.is_some(), "accepted retry {} never ended: {:?}", attempt, world.accepted);
            }
            // A processing payment waits for its outcome, whatever the window.
            prop_assert!(world.state.status.is_terminal()
                || matches!(world.state.status, SessionStatus::Failed | SessionStatus::Processing),
                "after the window: {:?}", world.state.status);
        }
    }

    /// The buyer's card is declined, then the buyer pays by bank debit on the same page:
    /// no retry is offered while the debit settles, a late card decline changes nothing, and
    /// the debit's outcome decides.
    #[test]
    fn a_payment_that_settles_later_blocks_retries_until_its_outcome() {
        let mut world = World::new();
        let declined = FailureReason::from_code("card_declined");
        let (change, _) = world
            .lifecycle()
            .failed(Some(AttemptNumber::ORIGINAL), &declined, MAX_ATTEMPTS)
            .unwrap();
        world.state = change.state;
        let (change, effect) = world
            .lifecycle()
            .processing(Some(AttemptNumber::ORIGINAL), world.now)
            .unwrap();
        assert_eq!(effect, EventEffect::Processing);
        assert_eq!(change.state.status, SessionStatus::Processing);
        world.state = change.state;
        assert_eq!(
            world
                .lifecycle()
                .request_retry(&policy(), world.now, Actor::System)
                .unwrap_err(),
            RetryRefusal::PaymentProcessing
        );
        assert!(
            world
                .lifecycle()
                .failed(Some(AttemptNumber::ORIGINAL), &declined, MAX_ATTEMPTS)
                .is_none(),
            "a late card decline does not end processing"
        );
        let past = world.expires_at + TimeDelta::minutes(1);
        assert!(world.lifecycle().window_closed(past).is_none());
        let async_failed = FailureReason::from_code(FailureReason::ASYNC_PAYMENT_FAILED);
        let (failed, _) = world
            .lifecycle()
            .async_payment_failed(
                Some(AttemptNumber::ORIGINAL),
                &async_failed,
                MAX_ATTEMPTS,
                world.now,
            )
            .unwrap();
        assert_eq!(failed.state.status, SessionStatus::Failed);
        assert_eq!(failed.state.failure_reason, Some(async_failed.clone()));
        let (late, _) = world
            .lifecycle()
            .async_payment_failed(
                Some(AttemptNumber::ORIGINAL),
                &async_failed,
                MAX_ATTEMPTS,
                past,
            )
            .unwrap();
        assert_eq!(late.state.status, SessionStatus::Expired);
        let id = ProviderSessionId::new("cs_0");
        let (paid, _) = world
            .lifecycle()
            .paid(
                &Payment {
                    attempt: Some(AttemptNumber::ORIGINAL),
                    provider_session_id: Some(&id),
                    payment_intent: None,
                },
                past,
                false,
            )
            .unwrap();
        assert_eq!(paid.state.status, SessionStatus::Succeeded);
    }

    #[test]
    fn a_payment_after_the_window_is_recorded_and_flagged() {
        let mut world = World::new();
        world.now = world.expires_at + TimeDelta::minutes(5);
        let change = world.lifecycle().window_closed(world.now).unwrap();
        world.state = change.state;
        let id = ProviderSessionId::new("cs_0");
        let (change, effect) = world
            .lifecycle()
            .paid(
                &Payment {
                    attempt: Some(AttemptNumber::ORIGINAL),
                    provider_session_id: Some(&id),
                    payment_intent: None,
                },
                world.now,
                false,
            )
            .unwrap();
        assert_eq!(effect, EventEffect::Succeeded);
        assert_eq!(change.state.status, SessionStatus::Succeeded);
        assert!(matches!(
            change.effects.audit[0].details,
            AuditDetails::PaymentSucceeded {
                after_window: true,
                ..
            }
        ));
    }
}
