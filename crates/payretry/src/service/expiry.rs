//! Closing a session whose payment window passed (DESIGN.md §2, §5). Used by the window
//! sweeper and by the worker when a due retry arrives too late; whichever notices first
//! records `retry_abandoned` (reason `window_expired`) for a scheduled retry.

use super::{Payments, ServiceResult};
use crate::storage::{AttemptChange, AttemptStatus, NewAuditEntry, SessionState, Transition};
use crate::telemetry::analytics::{AnalyticsEvent, TrackEvent};
use crate::telemetry::metrics::{self, AbandonReason};
use payretry_domain::{Actor, AttemptNumber, AuditAction, PaymentSessionId, SessionStatus};
use serde_json::json;

impl Payments {
    /// Expires the session if its window has passed and it is still live. Returns whether
    /// this call expired it. The live provider checkout is then closed (best effort: an
    /// unclosed checkout that is paid late is still recorded as paid).
    pub async fn expire_if_window_passed(&self, id: &PaymentSessionId) -> ServiceResult<bool> {
        let outcome = self
            .transition(id, |session, now| {
                let state = &session.state;
                if state.status.is_terminal() || now < session.expires_at {
                    return Ok(None);
                }
                let mut t = Transition::new(
                    session,
                    SessionState {
                        status: SessionStatus::Expired,
                        next_retry_at: None,
                        ..state.clone()
                    },
                );
                let abandoned = state.status == SessionStatus::RetryScheduled;
                if abandoned {
                    t.attempt = Some(AttemptChange {
                        attempt: AttemptNumber::new(state.retry_attempts),
                        status: AttemptStatus::Abandoned,
                        provider_session_id: None,
                        failure_reason: None,
                        scheduled_for: None,
                    });
                    t.audit.push(NewAuditEntry {
                        action: AuditAction::RetryAbandoned,
                        attempt: Some(AttemptNumber::new(state.retry_attempts)),
                        actor: Actor::System.to_string(),
                        details: json!({"reason": AbandonReason::WindowExpired.as_str()}),
                    });
                    t.analytics.push(AnalyticsEvent::track(
                        TrackEvent::Abandoned,
                        &session.buyer,
                        &session.id,
                        AttemptNumber::new(state.retry_attempts),
                        json!({
                            "reason": AbandonReason::WindowExpired.as_str(),
                            "failureReason": state.retry_reason.as_ref().map(ToString::to_string),
                        }),
                        now,
                    ));
                }
                t.audit.push(NewAuditEntry {
                    action: AuditAction::SessionExpired,
                    attempt: Some(state.current_attempt),
                    actor: Actor::System.to_string(),
                    details: json!({"expiresAt": session.expires_at, "previousStatus": state.status.as_str()}),
                });
                Ok(Some((t, abandoned)))
            })
            .await?;
        let Some((session, abandoned)) = outcome else {
            return Ok(false);
        };
        if abandoned {
            metrics::retry_abandoned(AbandonReason::WindowExpired);
        }
        if let Some(checkout) = &session.state.provider_session_id
            && let Err(error) = self.provider.expire_checkout(checkout).await
        {
            tracing::warn!(session_id = %session.id, %error, "could not close the checkout at the window's end");
        }
        Ok(true)
    }

    /// Expires every live session whose window has passed; returns how many.
    pub async fn expire_due_sessions(&self) -> ServiceResult<usize> {
        let mut expired = 0;
        loop {
            let due = self
                .storage
                .sessions_past_window(chrono::Utc::now(), 100)
                .await?;
            if due.is_empty() {
                return Ok(expired);
            }
            let batch = due.len();
            for session in due {
                if self.expire_if_window_passed(&session.id).await? {
                    expired += 1;
                }
            }
            if batch < 100 {
                return Ok(expired);
            }
        }
    }
}
