//! Dead letters: retry jobs that kept failing (DESIGN.md §2). Redrive puts the session back
//! into `retry_scheduled` for the same attempt and queues the job again, in one commit that
//! also removes the dead letter.

use super::{Payments, ServiceError, ServiceResult};
use crate::storage::{DeadLetter, Page, Paged};
use payretry_domain::{DeadLetterId, PaymentSessionId, Principal};

impl Payments {
    /// One page of the dead letters, oldest first.
    pub async fn dead_letters(&self, page: Page) -> ServiceResult<Paged<DeadLetter>> {
        Ok(self.storage.dead_letters(page).await?)
    }

    /// Re-enqueues a dead-lettered job for immediate processing.
    pub async fn redrive(&self, id: DeadLetterId, admin: &Principal) -> ServiceResult<DeadLetter> {
        let dead = self
            .storage
            .dead_letter(id)
            .await?
            .ok_or(ServiceError::DeadLetterNotFound)?;
        let session_id: PaymentSessionId = dead.job.payment_session_id.clone();
        self.transition(&session_id, |session, now| {
            let change = session.lifecycle().redriven(
                &dead.job,
                dead.id,
                &dead.last_error,
                admin.actor(),
                now,
            )?;
            Ok(Some(self.record(session, change, now)))
        })
        .await?
        .ok_or(ServiceError::Contended)?;
        Ok(dead)
    }
}
