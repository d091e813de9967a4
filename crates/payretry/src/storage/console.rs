//! What the operator console reads (DESIGN.md §6c): sessions newest first, and the retry
//! funnel. Both are reads only; nothing here changes a session.
//!
//! Sessions page by their creation key `(created_at, id)`, newest first: a page is the rows
//! below the last key of the page before, so rows created meanwhile never shift a page (they
//! sort above the first one) and no row is skipped or repeated.

use super::{Paged, SessionRecord, StorageResult};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::{AttemptNumber, Currency, PaymentSessionId, SessionStatus, UserId};

/// Which sessions an operator lists. Filters combine (a buyer's sessions in one status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only this buyer's sessions.
    pub buyer: Option<UserId>,
    /// Only sessions whose stored status is this one. A session whose window passed but which
    /// the sweeper has not expired yet is still stored under its live status.
    pub status: Option<SessionStatus>,
}

/// Where a session sorts in the newest-first list: what a page continues below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    pub created_at: DateTime<Utc>,
    pub id: PaymentSessionId,
}

impl SessionKey {
    pub fn of(session: &SessionRecord) -> Self {
        Self {
            created_at: session.created_at,
            id: session.id.clone(),
        }
    }
}

/// Which page of the newest-first session list to read: the sessions that sort below
/// `before` (from the newest when `None`), at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPage {
    pub before: Option<SessionKey>,
    pub limit: u32,
}

impl SessionPage {
    /// How many rows to fetch: one more than the page, to learn whether another follows.
    pub fn fetch(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}

/// How many retries of one attempt number, created in the funnel's period, stand where; and,
/// for one currency, what their payments recovered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunnelCounts {
    /// Retries accepted (one attempt row each).
    pub scheduled: u64,
    /// Retries that got a provider checkout.
    pub checkout_created: u64,
    /// Retries whose checkout was paid.
    pub paid: u64,
    /// Retries whose checkout failed.
    pub failed_again: u64,
    /// Retries dropped before their checkout (the window closed first).
    pub abandoned: u64,
    /// Retries whose job kept failing.
    pub dead_lettered: u64,
    /// Retries scheduled, with an open checkout, or with a payment settling.
    pub in_progress: u64,
}

/// One group of the funnel: the retries of one attempt number whose sessions are in one
/// currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunnelRow {
    pub attempt: AttemptNumber,
    pub currency: Currency,
    pub counts: FunnelCounts,
    /// The sum of the session amounts of the paid retries, in `currency`'s minor units.
    pub recovered: i64,
}

/// The operator console's reads.
#[async_trait]
pub trait ConsoleReads: Send + Sync {
    /// One page of sessions matching `filter`, newest first (by `created_at`, then `id`).
    async fn sessions(
        &self,
        filter: &SessionFilter,
        page: &SessionPage,
    ) -> StorageResult<Paged<SessionRecord, SessionKey>>;

    /// The retries (attempt rows past attempt 0) created from `since` to `until`, counted by
    /// attempt number and currency, ordered by both.
    async fn retry_funnel(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StorageResult<Vec<FunnelRow>>;
}
