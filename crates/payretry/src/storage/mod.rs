//! Durable state: payment sessions, attempts, the audit log, idempotency records, processed
//! webhook events, the retry-job outbox, dead letters and detected double payments.
//!
//! The rule this module enforces: every state change is one [`Transition`], committed in one
//! database transaction together with everything that must happen because of it (audit
//! entries, queued jobs, the idempotent response). Transitions are compare-and-set on the
//! session's `version`, so of two concurrent writers exactly one wins and the other re-reads.
//!
//! Each statement is written once, for both backends:
//! - [`plan`]: what a transition (and every other write) writes, as pure values;
//! - [`reads`]: the reads both backends make;
//! - [`rows`]: rows into domain values;
//! - [`sql`]: binding and running those statements on either backend;
//! - [`engine`]: [`Storage`], the embedded queue and the sandbox checkouts, once over an
//!   engine that says how a transaction's writes are committed and where reads go.
//!
//! The roles beside [`Storage`]'s own: [`deliveries`] (merchant webhook deliveries) and
//! [`console`] (what the operator console reads).
//!
//! [`sqlite`] and [`postgres`] are those engines. SQLite commits every write on one thread,
//! several callers to a commit ([`group_commit`]); PostgreSQL sends a transition as one
//! statement ([`one_statement`]). Each keeps the few statements that truly differ (claims
//! with `SKIP LOCKED`, array binds, idempotency claims).

pub mod console;
pub mod deliveries;
mod engine;
mod group_commit;
mod one_statement;
mod plan;
pub mod postgres;
mod reads;
mod rows;
mod sql;
pub mod sqlite;
pub mod wakeups;

use wakeups::Wakeups;

pub use console::{ConsoleReads, FunnelCounts, FunnelRow, SessionFilter, SessionKey, SessionPage};
pub use deliveries::{
    DeliveryFilter, DeliveryOutcome, DeliveryStatus, LeasedDelivery, NewMerchantEvent, Redelivery,
    WebhookDelivery, WebhookOutbox,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::{
    AttemptNumber, AuditAction, DeadLetterId, Lifecycle, Money, PaymentSessionId,
    ProviderSessionId, RetryJob, UserId, eligibility::SessionSnapshot,
};
use serde_json::Value;

use crate::provider::sandbox::{SandboxCheckoutError, SandboxCheckouts};
use crate::telemetry::analytics::{AnalyticsEvent, AnalyticsOutbox, AnalyticsOutboxError};

/// Storage failures. Details are logged, never shown to API callers.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A statement on SQLite's write connection failed (see `group_commit`).
    #[error("database error: {0}")]
    Sqlite(String),
    /// The commit that held the work failed, so none of its writes are on disk.
    #[error("commit failed: {0}")]
    Commit(String),
    /// Another request with the same idempotency key stored its response first; the
    /// transaction that wanted to store one was rolled back, and that response stands.
    #[error("the idempotency key was answered by another request")]
    IdempotencyKeyTaken,
}

pub type StorageResult<T> = Result<T, StorageError>;

/// The embedded queue and the outbox live in the database: their failures are storage's.
impl From<StorageError> for crate::queue::QueueError {
    fn from(error: StorageError) -> Self {
        Self::Storage(Box::new(error))
    }
}

impl From<sqlx::Error> for crate::queue::QueueError {
    fn from(error: sqlx::Error) -> Self {
        StorageError::from(error).into()
    }
}

/// The sandbox's checkouts are a table of the database: their failures are storage's.
impl From<StorageError> for SandboxCheckoutError {
    fn from(error: StorageError) -> Self {
        Self(Box::new(error))
    }
}

impl From<sqlx::Error> for SandboxCheckoutError {
    fn from(error: sqlx::Error) -> Self {
        StorageError::from(error).into()
    }
}

/// The analytics outbox is a table of the database: its failures are storage's.
impl From<StorageError> for AnalyticsOutboxError {
    fn from(error: StorageError) -> Self {
        Self(Box::new(error))
    }
}

impl From<sqlx::Error> for AnalyticsOutboxError {
    fn from(error: sqlx::Error) -> Self {
        StorageError::from(error).into()
    }
}

/// A value of a transition's statement, as [`postgres_transition_sql`] hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiteralArg<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// The one statement PostgreSQL runs to commit `t` at `now`, with each argument written as
/// `literal` returns it. For `payretry-bench`'s S2p ceiling, which runs payretry's own
/// transition through `pgbench` (a tool without binds); not for running transitions.
#[doc(hidden)]
pub fn postgres_transition_sql(
    t: &Transition,
    now: DateTime<Utc>,
    literal: impl Fn(LiteralArg<'_>) -> String,
) -> StorageResult<String> {
    let writes = plan::transition(t, to_millis(now))?;
    let statement = one_statement::combine(&writes);
    Ok(one_statement::with_literals(&statement, |arg| {
        literal(match arg {
            sql::Arg::Int(Some(n)) => LiteralArg::Int(*n),
            sql::Arg::Text(Some(text)) => LiteralArg::Text(text),
            sql::Arg::Bytes(bytes) => LiteralArg::Bytes(bytes),
            sql::Arg::Int(None) | sql::Arg::Text(None) => LiteralArg::Null,
        })
    }))
}

/// The mutable part of a session, and the attempt rows: the domain's lifecycle types.
pub use payretry_domain::lifecycle::{AttemptChange, AttemptStatus, SessionState};

/// A payment session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: PaymentSessionId,
    pub buyer: UserId,
    pub money: Money,
    pub description: String,
    pub metadata: Value,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Incremented by every transition; the compare-and-set token.
    pub version: i64,
    /// The `sequence` of the session's last merchant event (0: none yet).
    pub event_sequence: i64,
    pub state: SessionState,
}

impl SessionRecord {
    /// The session as the lifecycle rules see it.
    pub fn lifecycle(&self) -> Lifecycle<'_> {
        Lifecycle::new(&self.id, self.expires_at, &self.state)
    }

    pub fn snapshot(&self) -> SessionSnapshot {
        self.lifecycle().snapshot()
    }
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    pub action: AuditAction,
    pub attempt: Option<AttemptNumber>,
    /// `sub:role`, `provider` or `system`.
    pub actor: String,
    pub details: Value,
}

/// An audit entry as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub action: String,
    pub attempt: Option<AttemptNumber>,
    pub actor: String,
    pub details: Value,
}

/// Which page of a list to read: the rows whose id is greater than `after` (from the start
/// when `None`), oldest first, at most `limit` of them. Every list (audit log, dead letters,
/// double payments) pages this way, by its integer primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub after: Option<i64>,
    pub limit: u32,
}

impl Page {
    /// The most rows one page may hold.
    pub const MAX_LIMIT: u32 = 100;
    /// Rows per page when the caller does not say.
    pub const DEFAULT_LIMIT: u32 = 50;

    /// The first page, `limit` rows long.
    pub const fn first(limit: u32) -> Self {
        Self { after: None, limit }
    }

    /// The lower bound to bind in `WHERE id > ?`.
    pub fn after_id(self) -> i64 {
        self.after.unwrap_or(i64::MIN)
    }

    /// How many rows to fetch: one more than the page, to learn whether another follows.
    pub fn fetch(self) -> i64 {
        i64::from(self.limit) + 1
    }
}

/// One page of a list, and the key to continue after when another page follows: the id of
/// the last row for lists paged by id ([`Page`]), another key for the others (such as
/// [`SessionKey`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Paged<T, K = i64> {
    pub items: Vec<T>,
    /// The key of the last item here when more rows follow; `None` on the last page.
    pub next: Option<K>,
}

impl<T> Paged<T> {
    /// The page from the up to `page.limit + 1` rows (with their ids) a query fetched.
    pub fn from_rows(page: Page, rows: Vec<(i64, T)>) -> Self {
        Self::from_keyed_rows(page.limit, rows)
    }
}

impl<T, K> Paged<T, K> {
    /// The page of `limit` items from the up to `limit + 1` rows (with their keys) a query
    /// fetched.
    pub fn from_keyed_rows(limit: u32, rows: Vec<(K, T)>) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(rows.len().min(limit));
        let mut last = None;
        for (key, item) in rows.into_iter().take(limit) {
            last = Some(key);
            items.push(item);
        }
        Self {
            items,
            next: if more { last } else { None },
        }
    }
}

/// The response of an idempotent request, stored for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Identifies one idempotency record: the caller's `sub` and the key they sent, with the
/// fingerprint of the request (method, path, body) the key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyScope {
    pub caller: UserId,
    pub key: String,
    pub fingerprint: String,
}

/// Storing a response under an idempotency key, inside the transaction of its effect, so the
/// response and the effect commit together. The record is written whether or not the key was
/// claimed beforehand; if another request already stored a response under the key, the
/// whole transaction fails with [`StorageError::IdempotencyKeyTaken`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyCompletion {
    pub scope: IdempotencyScope,
    pub response: StoredResponse,
}

/// What [`Storage::begin_idempotent`] or [`Storage::lookup_idempotent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// Nothing live is recorded (never seen, expired, or abandoned): go ahead. From
    /// `begin_idempotent`, the key is now claimed by this request.
    Started,
    /// Done before: send this back byte for byte.
    Replay(StoredResponse),
    /// The same key is being processed right now.
    InFlight,
    /// The same key was used for a different request.
    Mismatch,
}

/// A job that kept failing, moved aside for manual review.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: DeadLetterId,
    pub job: RetryJob,
    pub receive_count: u32,
    pub last_error: String,
    pub dead_at: DateTime<Utc>,
}

/// A dead letter to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    pub job: RetryJob,
    pub receive_count: u32,
    pub last_error: String,
}

/// Where a detected double payment stands. `RefundRequested` moves on once the provider
/// answers: to `RefundPending` (the provider settles it later), `Refunded` or `RefundFailed`;
/// `RefundPending` moves on when the provider reports the outcome; and a refund the provider
/// reported `Refunded` can still fail later (a card refund can bounce). Each move is a
/// conditional update ([`Storage::settle_duplicate_refund`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicatePaymentStatus {
    /// Recorded for support; automatic refunds are off (or the charge cannot be identified).
    Detected,
    /// An automatic refund was decided in the detecting transaction and is owed: the refund
    /// runner has not had the provider's answer yet.
    RefundRequested,
    /// The provider took the refund but has not settled it (Stripe `pending` or
    /// `requires_action`); its outcome arrives by webhook. Not done: no money moved yet.
    RefundPending,
    /// The provider refunded the charge (Stripe `succeeded`).
    Refunded,
    /// The provider refused the refund, or the refund failed or was canceled: support must act.
    RefundFailed,
}

impl DuplicatePaymentStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Detected => "detected",
            Self::RefundRequested => "refund_requested",
            Self::RefundPending => "refund_pending",
            Self::Refunded => "refunded",
            Self::RefundFailed => "refund_failed",
        }
    }
}

impl std::str::FromStr for DuplicatePaymentStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "detected" => Ok(Self::Detected),
            "refund_requested" => Ok(Self::RefundRequested),
            "refund_pending" => Ok(Self::RefundPending),
            "refunded" => Ok(Self::Refunded),
            "refund_failed" => Ok(Self::RefundFailed),
            other => Err(format!("unknown duplicate payment status `{other}`")),
        }
    }
}

/// A double payment to record with the transition that detected it. At most one is kept per
/// session and duplicate attempt: a second record for the same checkout (the provider sent
/// another event about the same payment) makes the whole commit a no-op
/// ([`Committed::DuplicateEvent`]), so the audit entry, the metric and the refund happen once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDuplicatePayment {
    /// The attempt whose payment stands.
    pub paid_attempt: AttemptNumber,
    /// The attempt whose checkout was paid as well.
    pub duplicate_attempt: AttemptNumber,
    pub provider_session_id: Option<ProviderSessionId>,
    /// The provider's id of the duplicate charge (`pi_…`), what a refund needs.
    pub payment_intent: Option<String>,
    /// `Detected` or `RefundRequested`.
    pub status: DuplicatePaymentStatus,
}

/// A double payment as stored, for support and for the refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicatePayment {
    pub id: String,
    pub session_id: PaymentSessionId,
    pub paid_attempt: AttemptNumber,
    pub duplicate_attempt: AttemptNumber,
    pub provider_session_id: Option<ProviderSessionId>,
    pub payment_intent: Option<String>,
    pub status: DuplicatePaymentStatus,
    /// The provider's refund id once the provider took the refund.
    pub refund_id: Option<String>,
    /// Why the refund failed, when it did.
    pub last_error: Option<String>,
    /// The provider's own reason for a failed refund (Stripe's `failure_reason`, e.g.
    /// `expired_or_canceled_card`), when it gave one.
    pub failure_reason: Option<String>,
    pub detected_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a refund moved: the provider's answer to the refund call, or a refund event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundSettlement {
    /// Taken, settling later (Stripe `pending` / `requires_action`).
    Pending { refund_id: String },
    /// Refunded. `refund_id` is `None` when the provider only said the charge is refunded
    /// already; an id recorded before is kept.
    Refunded { refund_id: Option<String> },
    /// Refused, failed or canceled: support must act.
    Failed {
        refund_id: Option<String>,
        /// The provider's reason (Stripe's `failure_reason`), if any.
        failure_reason: Option<String>,
        /// What happened, for people.
        error: String,
    },
}

impl RefundSettlement {
    /// The status this settlement writes.
    pub const fn status(&self) -> DuplicatePaymentStatus {
        match self {
            Self::Pending { .. } => DuplicatePaymentStatus::RefundPending,
            Self::Refunded { .. } => DuplicatePaymentStatus::Refunded,
            Self::Failed { .. } => DuplicatePaymentStatus::RefundFailed,
        }
    }

    /// The statuses it may move a record from; any other status makes it a no-op, so of two
    /// settlers exactly one writes a move (and its audit entry). A refund only ever moves
    /// forward: requested → pending → refunded → failed (a refund can fail after succeeding).
    pub const fn moves_from(&self) -> &'static [DuplicatePaymentStatus] {
        use DuplicatePaymentStatus::{RefundPending, RefundRequested, Refunded};
        match self {
            Self::Pending { .. } => &[RefundRequested],
            Self::Refunded { .. } => &[RefundRequested, RefundPending],
            Self::Failed { .. } => &[RefundRequested, RefundPending, Refunded],
        }
    }
}

/// One atomic state change of a session and everything that goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub session_id: PaymentSessionId,
    /// The `version` the decision was based on; the commit fails with
    /// [`Committed::Conflict`] if the session changed since.
    pub expected_version: i64,
    pub state: SessionState,
    pub attempt: Option<AttemptChange>,
    pub audit: Vec<NewAuditEntry>,
    /// A retry job to queue (outbox), due at its `scheduled_for`.
    pub enqueue: Option<RetryJob>,
    pub dead_letter: Option<NewDeadLetter>,
    /// A dead letter being redriven: removed in the same commit.
    pub redrive: Option<DeadLetterId>,
    /// The provider event that caused this, recorded so a redelivery is ignored.
    pub webhook_event_id: Option<String>,
    pub idempotency: Option<IdempotencyCompletion>,
    /// Segment events describing this change (analytics outbox).
    pub analytics: Vec<AnalyticsEvent>,
    /// Merchant events announcing this change (the webhook outbox), numbered on from the
    /// session's [`SessionRecord::event_sequence`].
    pub merchant_events: Vec<NewMerchantEvent>,
    /// A double payment this change detected, recorded for support (and a refund).
    pub duplicate_payment: Option<NewDuplicatePayment>,
    /// Provider checkouts nobody should pay any more, recorded to be closed (see
    /// [`Storage::due_checkout_closures`]).
    pub close_checkouts: Vec<ProviderSessionId>,
    /// The receipt of an embedded-queue delivery this change completes: the job is deleted
    /// in the same commit (if this delivery still holds it), saving the worker a separate
    /// acknowledgement. See [`crate::queue::JobQueue::settles_in_transition`].
    pub settles: Option<String>,
}

impl Transition {
    /// A transition of `session` to `state`, with nothing else attached yet.
    pub fn new(session: &SessionRecord, state: SessionState) -> Self {
        Self {
            session_id: session.id.clone(),
            expected_version: session.version,
            state,
            attempt: None,
            audit: Vec::new(),
            enqueue: None,
            dead_letter: None,
            redrive: None,
            webhook_event_id: None,
            idempotency: None,
            analytics: Vec::new(),
            merchant_events: Vec::new(),
            duplicate_payment: None,
            close_checkouts: Vec::new(),
            settles: None,
        }
    }
}

/// A provider checkout to close, and how often closing it has failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutClosure {
    pub provider_session_id: ProviderSessionId,
    pub session_id: PaymentSessionId,
    pub tries: u32,
    pub created_at: DateTime<Utc>,
}

/// How a transition ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Applied,
    /// The session changed since it was read; nothing was written.
    Conflict,
    /// The webhook event was processed before, or the double payment it reports was recorded
    /// before (another event about the same payment); nothing was written.
    DuplicateEvent,
}

/// A new session with its first checkout.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    pub id: PaymentSessionId,
    pub buyer: UserId,
    pub money: Money,
    pub description: String,
    pub metadata: Value,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub provider_session_id: ProviderSessionId,
    pub checkout_url: String,
    pub audit: NewAuditEntry,
    pub idempotency: Option<IdempotencyCompletion>,
}

/// Sessions and the transitions that change them: what the service, the worker and the sweeper
/// read and commit.
#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn insert_session(&self, session: NewSession) -> StorageResult<()>;

    async fn session(&self, id: &PaymentSessionId) -> StorageResult<Option<SessionRecord>>;

    /// Commits a transition atomically (see the module doc).
    async fn commit(&self, transition: Transition) -> StorageResult<Committed>;

    /// One page of the session's audit log, oldest first.
    async fn audit_log(
        &self,
        id: &PaymentSessionId,
        page: Page,
    ) -> StorageResult<Paged<AuditEntry>>;

    /// Sessions still live (open, failed, retry scheduled) whose window closed by `now`.
    async fn sessions_past_window(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<SessionRecord>>;

    /// The earliest window end among live sessions, so the sweeper can sleep until then.
    async fn next_window_end(&self) -> StorageResult<Option<DateTime<Utc>>>;

    /// Which attempt of `session` created the provider checkout `checkout`; `None` when no
    /// attempt did (an event about a checkout payretry never made).
    async fn checkout_attempt(
        &self,
        session: &PaymentSessionId,
        checkout: &ProviderSessionId,
    ) -> StorageResult<Option<AttemptNumber>>;
}

/// Idempotency records: what a request with an `Idempotency-Key` finds, claims and settles.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims an idempotency key (a write), for a request whose work is long (it calls the
    /// provider) and must not run twice concurrently.
    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin>;

    /// What is recorded under an idempotency key, without claiming it (a read), for a request
    /// whose effect is one transaction: that transaction stores the response, and of two
    /// concurrent requests with one key the second fails with
    /// [`StorageError::IdempotencyKeyTaken`] and replays the first.
    async fn lookup_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin>;

    /// [`IdempotencyStore::lookup_idempotent`] and the session `id` (`None` when it does not
    /// exist), read together in one round trip: what a retry request needs before it decides.
    async fn lookup_idempotent_with_session(
        &self,
        scope: &IdempotencyScope,
        id: &PaymentSessionId,
        now: DateTime<Utc>,
    ) -> StorageResult<(IdempotencyBegin, Option<SessionRecord>)>;

    /// Stores the response of a request that reached the business logic without a transition
    /// (a refusal); [`StorageError::IdempotencyKeyTaken`] if another response stands.
    async fn complete_idempotent(&self, completion: &IdempotencyCompletion) -> StorageResult<()>;

    /// Forgets an in-flight claim (the request failed internally; the client may try again).
    async fn abandon_idempotent(&self, scope: &IdempotencyScope) -> StorageResult<()>;

    /// Deletes idempotency records and processed event ids older than `before`.
    async fn purge_expired(&self, before: DateTime<Utc>) -> StorageResult<u64>;
}

/// Provider checkouts to close, for the sweeper.
#[async_trait]
pub trait ClosureStore: Send + Sync {
    /// Records checkouts of `session` to close, due at once, outside any transition (a
    /// checkout created for a session that moved on meanwhile). Already recorded ones stay.
    async fn schedule_checkout_closures(
        &self,
        session: &PaymentSessionId,
        checkouts: &[ProviderSessionId],
    ) -> StorageResult<()>;

    /// Up to `limit` checkouts to close whose next try is due by `now`, the most overdue first.
    async fn due_checkout_closures(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<CheckoutClosure>>;

    /// Resolves when this process recorded checkouts to close (the sweeper need not wait for
    /// its interval).
    async fn checkouts_to_close(&self);

    /// The checkout is closed (or need not be any more): forget it.
    async fn checkout_closed(&self, checkout: &ProviderSessionId) -> StorageResult<()>;

    /// A try to close the checkout failed: try again at `retry_at`.
    async fn checkout_close_failed(
        &self,
        checkout: &ProviderSessionId,
        retry_at: DateTime<Utc>,
        error: &str,
    ) -> StorageResult<()>;
}

/// Dead-lettered jobs, for review and redrive.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// One page of the dead letters, oldest first.
    async fn dead_letters(&self, page: Page) -> StorageResult<Paged<DeadLetter>>;

    async fn dead_letter(&self, id: DeadLetterId) -> StorageResult<Option<DeadLetter>>;
}

/// Detected double payments and their refunds, for support and the refund runner.
#[async_trait]
pub trait DuplicateStore: Send + Sync {
    /// Resolves when this process committed a double payment with a refund owed (so the
    /// refund runner makes the call at once rather than at its next poll).
    async fn refund_owed(&self);

    /// One page of the recorded double payments, oldest first.
    async fn duplicate_payments(&self, page: Page) -> StorageResult<Paged<DuplicatePayment>>;

    /// The double payment recorded for this session's `attempt`, if any.
    async fn duplicate_payment(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
    ) -> StorageResult<Option<DuplicatePayment>>;

    /// The double payment whose duplicate charge is `payment_intent`, if any (what a refund
    /// event names).
    async fn duplicate_payment_by_intent(
        &self,
        payment_intent: &str,
    ) -> StorageResult<Option<DuplicatePayment>>;

    /// Refunds still owed (`refund_requested`) whose provider call was never tried, or last
    /// claimed at or before `before`; at most `limit`, oldest first.
    async fn duplicate_refunds_owed(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<DuplicatePayment>>;

    /// Claims the provider call of an owed refund at `now`: `true` when the record is still
    /// `refund_requested` and was not claimed after `before`. Of two processes that try at
    /// once, one gets it; the other sees a claim newer than `before`.
    async fn claim_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StorageResult<bool>;

    /// Records where a refund moved, with `audit` appended to the session's log in the same
    /// transaction. Only a record in one of [`RefundSettlement::moves_from`] changes, so of
    /// two settlers one records the move; returns whether this one did. With `event_id` (a
    /// provider event), the event id is recorded as processed in the same transaction, and an
    /// event already processed changes nothing.
    async fn settle_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        settlement: &RefundSettlement,
        audit: Option<&NewAuditEntry>,
        event_id: Option<&str>,
    ) -> StorageResult<bool>;
}

/// Secrets every process on the database shares.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// A named secret, generated by `generate` and stored on first use, so every process on
    /// this database shares it.
    async fn service_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Sync),
    ) -> StorageResult<String>;
}

/// The repository of payment sessions and everything attached to them, every role at once
/// (what a backend implements). It is the analytics outbox too (a transition's
/// [`Transition::analytics`] events are committed with it), and keeps the sandbox provider's
/// checkouts, so every process on the database sees them. A consumer that needs one role
/// takes that role.
#[async_trait]
pub trait Storage:
    SessionStore
    + IdempotencyStore
    + ClosureStore
    + DeadLetterStore
    + DuplicateStore
    + SecretStore
    + WebhookOutbox
    + ConsoleReads
    + AnalyticsOutbox
    + SandboxCheckouts
    + Send
    + Sync
    + 'static
{
    /// Applies pending migrations.
    async fn migrate(&self) -> StorageResult<()>;

    /// Answers when the database is reachable.
    async fn ping(&self) -> StorageResult<()>;
}

/// Milliseconds since the epoch: how every timestamp is stored.
pub(crate) fn to_millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> StorageResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StorageError::Corrupt(format!("time {ms}")))
}

/// How long an in-flight idempotency claim blocks the same key before it is presumed
/// abandoned (its process died) and may be taken over.
pub(crate) const IDEMPOTENCY_LOCK_TIMEOUT_MS: i64 = 60_000;
/// How long a stored idempotent response is replayed.
pub(crate) const IDEMPOTENCY_TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// An idempotency record as found when a key is used again.
pub(crate) struct IdempotencyRecord {
    pub fingerprint: String,
    pub response: Option<StoredResponse>,
    pub locked_at: i64,
    pub created_at: i64,
}

/// The columns an idempotency record is read from, in this order.
pub(crate) type IdempotencyColumns = (String, Option<i64>, Option<Vec<u8>>, i64, i64);

/// Selects [`IdempotencyColumns`] of one key (`$1`/`?` caller, `$2`/`?` key).
pub(crate) const IDEMPOTENCY_COLUMNS: &str = "SELECT fingerprint, response_status, response_body, locked_at, created_at FROM idempotency_keys";

impl IdempotencyRecord {
    pub fn from_columns(
        (fingerprint, status, body, locked_at, created_at): IdempotencyColumns,
    ) -> StorageResult<Self> {
        let response = match status {
            Some(status) => Some(StoredResponse {
                status: u16::try_from(status).map_err(corrupt)?,
                body: body.unwrap_or_default(),
            }),
            None => None,
        };
        Ok(Self {
            fingerprint,
            response,
            locked_at,
            created_at,
        })
    }

    /// What a request with `fingerprint` at `now` (ms) gets; `None` means the record is
    /// expired or its claim was abandoned, so the key may be used afresh.
    pub fn verdict(self, fingerprint: &str, now: i64) -> Option<IdempotencyBegin> {
        if self.created_at <= now - IDEMPOTENCY_TTL_MS {
            return None;
        }
        if self.fingerprint != fingerprint {
            return Some(IdempotencyBegin::Mismatch);
        }
        if let Some(response) = self.response {
            return Some(IdempotencyBegin::Replay(response));
        }
        (self.locked_at > now - IDEMPOTENCY_LOCK_TIMEOUT_MS).then_some(IdempotencyBegin::InFlight)
    }
}

pub(crate) fn opt_time(ms: Option<i64>) -> StorageResult<Option<DateTime<Utc>>> {
    ms.map(from_millis).transpose()
}

pub(crate) fn attempt(n: i64) -> AttemptNumber {
    AttemptNumber::new(u32::try_from(n).unwrap_or(0))
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(what.to_string())
}

/// A queue receipt is `{job id}:{locked_until}`: the lease end identifies the delivery, so
/// a worker whose lease ran out cannot settle a job another worker now holds.
/// The `(id, lease)` pairs of `deliveries`' receipts.
pub(crate) fn parse_receipts(
    deliveries: &[crate::queue::Delivery],
) -> StorageResult<(Vec<i64>, Vec<i64>)> {
    deliveries
        .iter()
        .map(|delivery| parse_receipt(&delivery.receipt))
        .collect()
}

pub(crate) fn parse_receipt(receipt: &str) -> StorageResult<(i64, i64)> {
    let (id, lease) = receipt.split_once(':').ok_or_else(|| corrupt("receipt"))?;
    Ok((
        id.parse().map_err(corrupt)?,
        lease.parse().map_err(corrupt)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip() {
        assert_eq!(
            parse_receipt("42:1700000000000").unwrap(),
            (42, 1700000000000)
        );
        assert!(parse_receipt("42").is_err());
    }

    fn key(
        fingerprint: &str,
        response: Option<StoredResponse>,
        locked_at: i64,
    ) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: fingerprint.to_owned(),
            response,
            locked_at,
            created_at: 0,
        }
    }

    #[test]
    fn idempotency_verdicts() {
        let done = StoredResponse {
            status: 202,
            body: b"{}".to_vec(),
        };
        assert_eq!(
            key("a", None, 0).verdict("b", 1),
            Some(IdempotencyBegin::Mismatch)
        );
        assert_eq!(
            key("a", Some(done.clone()), 0).verdict("a", 1),
            Some(IdempotencyBegin::Replay(done))
        );
        assert_eq!(
            key("a", None, 0).verdict("a", 1),
            Some(IdempotencyBegin::InFlight)
        );
        // The claim's process presumably died: take it over.
        assert_eq!(
            key("a", None, 0).verdict("a", IDEMPOTENCY_LOCK_TIMEOUT_MS),
            None
        );
        // Expired: even a different request may use the key again.
        assert_eq!(key("a", None, 0).verdict("b", IDEMPOTENCY_TTL_MS), None);
    }
}
