//! Sessions for the operator console (DESIGN.md §3, §6c): every session, newest first, or
//! one buyer's, or those in one stored status.

use super::{Payments, ServiceResult};
use crate::storage::{Paged, SessionFilter, SessionKey, SessionPage, SessionRecord};

impl Payments {
    /// One page of the sessions matching `filter`, newest first.
    pub async fn sessions(
        &self,
        filter: &SessionFilter,
        page: &SessionPage,
    ) -> ServiceResult<Paged<SessionRecord, SessionKey>> {
        Ok(self.storage.sessions(filter, page).await?)
    }
}
