//! The "schedule a payment retry" use case: one buyer press, delivered at most once.
//!
//! The rule: **one idempotency key per press, reused by every network try of that press.**
//! If the connection drops after the server scheduled the retry, asking again with the same
//! key gets the stored answer back instead of spending a second attempt. A new press (the
//! buyer clicking again later) gets a new key, because it is a new request.
//!
//! What is asked again, with backoff: anything [`ClientError::is_transient`] says may give a
//! different answer (no answer, 5xx, `idempotency_key_in_use`). A contract refusal (4xx) is
//! the answer and is returned at once.
//!
//! It also holds the glue from client results to [`RetryEvent`]s, so a driver of the retry
//! machine does not have to decide which failure is which.

use crate::api::{PaymentStatus, RetryScheduled};
use crate::client::Client;
use crate::error::ClientError;
use crate::retry_machine::{RetryEvent, error_message};
use payretry_domain::{IdempotencyKey, PaymentSessionId};
use std::future::Future;
use std::time::Duration;

/// The one call this use case needs from the server, so tests can script it.
pub trait RetryApi {
    /// `POST /payments/retry/{sessionId}` with `Idempotency-Key: key`, once.
    fn request_retry(
        &self,
        session_id: &PaymentSessionId,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<RetryScheduled, ClientError>> + Send;
}

impl RetryApi for Client {
    fn request_retry(
        &self,
        session_id: &PaymentSessionId,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<RetryScheduled, ClientError>> + Send {
        self.retry(session_id, key)
    }
}

/// Waiting between tries, behind a trait so tests neither sleep nor need a paused clock.
pub trait Sleeper {
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send;
}

/// Sleeps on the tokio timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(duration)
    }
}

/// How often, and how patiently, one press is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Network tries per press, the first included; 0 is treated as 1.
    pub max_tries: u32,
    /// The wait after the first failed try; it doubles after each further one.
    pub first_delay: Duration,
    /// The doubling stops here.
    pub max_delay: Duration,
}

impl Backoff {
    /// Three tries over about 0.75 s: enough to ride out a dropped connection or a server
    /// restart, short enough that the buyer is not left staring at a spinner.
    pub const DEFAULT: Self = Self {
        max_tries: 3,
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(2),
    };

    /// The wait after failed try number `failed_try` (1-based).
    pub fn delay_after(&self, failed_try: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failed_try.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A fresh key for one press: a random (v4) UUID, so two presses never collide and a key
/// says nothing about the buyer or the session.
pub fn new_idempotency_key() -> IdempotencyKey {
    IdempotencyKey::parse(&uuid::Uuid::new_v4().to_string())
        .expect("a hyphenated UUID is 36 printable ASCII characters")
}

/// What one press came to: its key (for logs and support) and the server's answer.
#[derive(Debug)]
pub struct PressOutcome {
    pub idempotency_key: IdempotencyKey,
    pub result: Result<RetryScheduled, ClientError>,
}

/// The use case, over any [`RetryApi`] and [`Sleeper`].
#[derive(Debug, Clone)]
pub struct SchedulePaymentRetry<A, S = TokioSleeper> {
    api: A,
    sleeper: S,
    backoff: Backoff,
}

impl<A: RetryApi> SchedulePaymentRetry<A, TokioSleeper> {
    /// The use case with the default backoff on the tokio timer.
    pub fn new(api: A) -> Self {
        Self::with(api, TokioSleeper, Backoff::DEFAULT)
    }
}

impl<A: RetryApi, S: Sleeper> SchedulePaymentRetry<A, S> {
    pub fn with(api: A, sleeper: S, backoff: Backoff) -> Self {
        Self {
            api,
            sleeper,
            backoff,
        }
    }

    /// One buyer press: makes the press's key, then [`Self::submit`]s it.
    pub async fn press(&self, session_id: &PaymentSessionId) -> PressOutcome {
        let idempotency_key = new_idempotency_key();
        let result = self.submit(session_id, &idempotency_key).await;
        PressOutcome {
            idempotency_key,
            result,
        }
    }

    /// Sends one press whose key already exists (the retry machine's
    /// [`crate::retry_machine::Effect::SubmitRetry`]), trying up to `max_tries` times with
    /// that same key. Returns the first non-transient answer, or the last transient error.
    pub async fn submit(
        &self,
        session_id: &PaymentSessionId,
        key: &IdempotencyKey,
    ) -> Result<RetryScheduled, ClientError> {
        let max_tries = self.backoff.max_tries.max(1);
        let mut tries = 0;
        loop {
            tries += 1;
            match self.api.request_retry(session_id, key).await {
                Err(error) if error.is_transient() && tries < max_tries => {
                    self.sleeper.sleep(self.backoff.delay_after(tries)).await;
                }
                answer => return answer,
            }
        }
    }
}

/// The retry machine's event for a press's outcome.
pub fn submission_event(result: Result<RetryScheduled, ClientError>) -> RetryEvent {
    match result {
        Ok(accepted) => RetryEvent::RetryAccepted(accepted),
        Err(ClientError::Api { code, status, .. })
            if !ClientError::is_api_transient(status, &code) =>
        {
            RetryEvent::RetryRefused(code)
        }
        // No final answer (no answer, 5xx, key still in use, unreadable body): the retry
        // may or may not be scheduled, and only a fresh status can tell.
        Err(_) => RetryEvent::RetrySubmitFailed(
            "We could not confirm your retry. Checking your payment…".to_owned(),
        ),
    }
}

/// The retry machine's event for a status fetch.
pub fn load_event(result: Result<PaymentStatus, ClientError>) -> RetryEvent {
    match result {
        Ok(status) => RetryEvent::Loaded(status),
        Err(ClientError::Api { code, .. }) => RetryEvent::LoadFailed(error_message(&code).into()),
        Err(_) => RetryEvent::LoadFailed(
            "We could not reach the payment service. Refresh to try again".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiErrorCode;
    use chrono::DateTime;
    use payretry_domain::AttemptNumber;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Answers from a script and records the key of every request.
    struct ScriptedApi {
        answers: Mutex<VecDeque<Result<RetryScheduled, ClientError>>>,
        keys_seen: Mutex<Vec<IdempotencyKey>>,
    }

    impl ScriptedApi {
        fn new(answers: Vec<Result<RetryScheduled, ClientError>>) -> Self {
            Self {
                answers: Mutex::new(answers.into()),
                keys_seen: Mutex::new(Vec::new()),
            }
        }

        fn keys_seen(&self) -> Vec<IdempotencyKey> {
            self.keys_seen.lock().unwrap().clone()
        }
    }

    impl RetryApi for &ScriptedApi {
        fn request_retry(
            &self,
            _session_id: &PaymentSessionId,
            key: &IdempotencyKey,
        ) -> impl Future<Output = Result<RetryScheduled, ClientError>> + Send {
            self.keys_seen.lock().unwrap().push(key.clone());
            let answer = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("the script ran out: too many tries");
            std::future::ready(answer)
        }
    }

    /// Records the waits instead of waiting.
    #[derive(Default)]
    struct RecordingSleeper(Mutex<Vec<Duration>>);

    impl Sleeper for &RecordingSleeper {
        fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send {
            self.0.lock().unwrap().push(duration);
            std::future::ready(())
        }
    }

    const BACKOFF: Backoff = Backoff {
        max_tries: 4,
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(250),
    };

    fn session() -> PaymentSessionId {
        PaymentSessionId::parse("ps_abc").unwrap()
    }

    fn accepted(attempt: u32) -> Result<RetryScheduled, ClientError> {
        Ok(RetryScheduled {
            session_id: session(),
            attempt_number: AttemptNumber::new(attempt),
            delay_seconds: 60,
            delay_minutes: 1.0,
            scheduled_for: DateTime::from_timestamp(1_800_000_060, 0).unwrap(),
            retry_attempts_remaining: 3 - attempt,
        })
    }

    fn api_error(status: u16, code: ApiErrorCode) -> Result<RetryScheduled, ClientError> {
        Err(ClientError::Api {
            status,
            code,
            detail: String::new(),
        })
    }

    fn bad_gateway() -> Result<RetryScheduled, ClientError> {
        Err(ClientError::Decode {
            status: 502,
            source: serde_json::from_str::<serde_json::Value>("<html>").unwrap_err(),
        })
    }

    #[tokio::test]
    async fn server_failures_are_retried_with_the_same_key_and_backoff() {
        let api = ScriptedApi::new(vec![
            api_error(503, ApiErrorCode::Other("unavailable".into())),
            bad_gateway(),
            api_error(409, ApiErrorCode::IdempotencyKeyInUse),
            accepted(1),
        ]);
        let sleeper = RecordingSleeper::default();
        let use_case = SchedulePaymentRetry::with(&api, &sleeper, BACKOFF);

        let outcome = use_case.press(&session()).await;

        let retry = outcome.result.unwrap();
        assert_eq!(retry.attempt_number, AttemptNumber::new(1));
        assert_eq!(api.keys_seen(), vec![outcome.idempotency_key.clone(); 4]);
        assert_eq!(
            *sleeper.0.lock().unwrap(),
            [
                Duration::from_millis(100),
                Duration::from_millis(200),
                Duration::from_millis(250)
            ]
        );
    }

    #[tokio::test]
    async fn a_contract_refusal_is_returned_at_once() {
        for code in ApiErrorCode::ALL_KNOWN {
            if code == ApiErrorCode::IdempotencyKeyInUse {
                continue;
            }
            let status = code.http_status().unwrap();
            let api = ScriptedApi::new(vec![api_error(status, code.clone())]);
            let sleeper = RecordingSleeper::default();
            let use_case = SchedulePaymentRetry::with(&api, &sleeper, BACKOFF);

            let outcome = use_case.press(&session()).await;

            assert!(
                matches!(&outcome.result, Err(ClientError::Api { code: got, .. }) if *got == code),
                "{code}"
            );
            assert_eq!(api.keys_seen().len(), 1, "{code}: asked once");
            assert!(sleeper.0.lock().unwrap().is_empty(), "{code}: no wait");
        }
    }

    #[tokio::test]
    async fn it_gives_up_after_max_tries_with_the_last_error() {
        let api = ScriptedApi::new(vec![
            api_error(500, ApiErrorCode::Other("internal".into())),
            api_error(500, ApiErrorCode::Other("internal".into())),
            api_error(409, ApiErrorCode::IdempotencyKeyInUse),
        ]);
        let sleeper = RecordingSleeper::default();
        let backoff = Backoff {
            max_tries: 3,
            ..BACKOFF
        };
        let use_case = SchedulePaymentRetry::with(&api, &sleeper, backoff);

        let outcome = use_case.press(&session()).await;

        assert!(matches!(
            outcome.result,
            Err(ClientError::Api {
                code: ApiErrorCode::IdempotencyKeyInUse,
                ..
            })
        ));
        assert_eq!(api.keys_seen().len(), 3);
        assert_eq!(sleeper.0.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn each_press_gets_a_fresh_key_reused_by_its_own_tries() {
        let api = ScriptedApi::new(vec![
            api_error(503, ApiErrorCode::Other("unavailable".into())),
            accepted(1),
            accepted(2),
        ]);
        let sleeper = RecordingSleeper::default();
        let use_case = SchedulePaymentRetry::with(&api, &sleeper, BACKOFF);

        let first = use_case.press(&session()).await;
        let second = use_case.press(&session()).await;

        assert_ne!(first.idempotency_key, second.idempotency_key);
        assert_eq!(
            api.keys_seen(),
            [
                first.idempotency_key.clone(),
                first.idempotency_key.clone(),
                second.idempotency_key.clone()
            ]
        );
        for key in [&first.idempotency_key, &second.idempotency_key] {
            let uuid = uuid::Uuid::parse_str(key.as_str()).unwrap();
            assert_eq!(uuid.get_version_num(), 4);
        }
    }

    #[tokio::test]
    async fn submit_uses_the_key_the_machine_was_given() {
        let api = ScriptedApi::new(vec![accepted(1)]);
        let sleeper = RecordingSleeper::default();
        let use_case = SchedulePaymentRetry::with(&api, &sleeper, BACKOFF);
        let key = IdempotencyKey::parse("press-from-the-page").unwrap();

        use_case.submit(&session(), &key).await.unwrap();

        assert_eq!(api.keys_seen(), [key]);
    }

    #[tokio::test]
    async fn zero_max_tries_still_sends_the_press_once() {
        let api = ScriptedApi::new(vec![api_error(
            503,
            ApiErrorCode::Other("unavailable".into()),
        )]);
        let sleeper = RecordingSleeper::default();
        let backoff = Backoff {
            max_tries: 0,
            ..BACKOFF
        };
        let use_case = SchedulePaymentRetry::with(&api, &sleeper, backoff);

        assert!(use_case.press(&session()).await.result.is_err());
        assert_eq!(api.keys_seen().len(), 1);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let delays: Vec<u64> = (1..=5)
            .map(|n| Backoff::DEFAULT.delay_after(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 2000]);
        assert_eq!(Backoff::DEFAULT.delay_after(200), Duration::from_secs(2));
    }

    #[test]
    fn outcomes_become_machine_events() {
        assert!(matches!(
            submission_event(accepted(1)),
            RetryEvent::RetryAccepted(_)
        ));
        assert_eq!(
            submission_event(api_error(409, ApiErrorCode::RetryLimitReached)),
            RetryEvent::RetryRefused(ApiErrorCode::RetryLimitReached)
        );
        assert!(matches!(
            submission_event(api_error(409, ApiErrorCode::IdempotencyKeyInUse)),
            RetryEvent::RetrySubmitFailed(_)
        ));
        assert!(matches!(
            submission_event(api_error(503, ApiErrorCode::Other("unavailable".into()))),
            RetryEvent::RetrySubmitFailed(_)
        ));
        assert!(matches!(
            submission_event(bad_gateway()),
            RetryEvent::RetrySubmitFailed(_)
        ));
        assert_eq!(
            load_event(Err(ClientError::Api {
                status: 404,
                code: ApiErrorCode::SessionNotFound,
                detail: String::new()
            })),
            RetryEvent::LoadFailed("We could not find this payment".into())
        );
    }
}
