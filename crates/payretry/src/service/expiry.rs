//! Closing a session whose payment window passed (DESIGN.md §2, §5). Used by the window
//! sweeper and by the worker when a due retry arrives too late; whichever notices first
//! records `retry_abandoned` (reason `window_expired`) for a scheduled retry.

use super::{Payments, ServiceResult, record};
use payretry_domain::PaymentSessionId;

impl Payments {
    /// Expires the session if its window has passed and it is still live. Returns whether
    /// this call expired it. The live provider checkout is recorded for closing in the same
    /// commit (see `closures`; a checkout paid late all the same is still recorded as paid).
    pub async fn expire_if_window_passed(&self, id: &PaymentSessionId) -> ServiceResult<bool> {
        let outcome = self
            .transition(id, |session, now| {
                Ok(session
                    .lifecycle()
                    .window_closed(now)
                    .map(|change| self.record(session, change, now)))
            })
            .await?;
        let Some((_, metrics)) = outcome else {
            return Ok(false);
        };
        record::emit(&metrics);
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
