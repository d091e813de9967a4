//! Statements as values, and the one place that runs them on either backend.
//!
//! Both schemas store the same types (`BIGINT`/`INTEGER` for every number and timestamp,
//! `TEXT` for strings and JSON, a blob for idempotent response bodies) and both drivers
//! accept `$n` placeholders, so a statement is written once, as a [`Write`] or a read with
//! [`Columns`], and runs unchanged on SQLite and PostgreSQL. What stays in each backend is
//! its pool, how it begins a transaction, and the few statements that truly differ.

use super::{Committed, StorageError, StorageResult};
use sqlx::query::Query;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, Row, Type};

/// One bound value. Every column payretry writes is one of these three types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Arg {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Vec<u8>),
}

impl From<i64> for Arg {
    fn from(value: i64) -> Self {
        Self::Int(Some(value))
    }
}

impl From<Option<i64>> for Arg {
    fn from(value: Option<i64>) -> Self {
        Self::Int(value)
    }
}

impl From<&str> for Arg {
    fn from(value: &str) -> Self {
        Self::Text(Some(value.to_owned()))
    }
}

impl From<String> for Arg {
    fn from(value: String) -> Self {
        Self::Text(Some(value))
    }
}

impl From<Option<&str>> for Arg {
    fn from(value: Option<&str>) -> Self {
        Self::Text(value.map(str::to_owned))
    }
}

/// What it means when a write touches no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfNone {
    /// Nothing: an upsert that found its row, a delete of what was already gone.
    Continue,
    /// The transaction stops and rolls back, answering this (a compare-and-set that lost, an
    /// event seen before).
    Stop(Committed),
    /// The transaction stops and rolls back with this error.
    Fail(Refusal),
}

impl IfNone {
    /// What a write that touched no row means: nothing (`Ok(None)`), an outcome that stops
    /// the transaction (`Ok(Some(_))`), or an error that stops it.
    pub fn missed(self) -> StorageResult<Option<Committed>> {
        match self {
            IfNone::Continue => Ok(None),
            IfNone::Stop(outcome) => Ok(Some(outcome)),
            IfNone::Fail(refusal) => Err(refusal.into()),
        }
    }
}

/// The errors a write can stop a transaction with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Another response is stored under the idempotency key.
    IdempotencyKeyTaken,
}

impl From<Refusal> for StorageError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::IdempotencyKeyTaken => StorageError::IdempotencyKeyTaken,
        }
    }
}

/// One statement of a transaction, with its arguments (`$1`, `$2`, … in order) and what
/// touching no row means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Write {
    pub sql: &'static str,
    pub args: Vec<Arg>,
    pub if_none: IfNone,
}

impl Write {
    pub fn new(sql: &'static str, args: impl IntoIterator<Item = Arg>) -> Self {
        Self {
            sql,
            args: args.into_iter().collect(),
            if_none: IfNone::Continue,
        }
    }

    /// Zero rows touched stops the transaction with `if_none`.
    pub fn or(mut self, if_none: IfNone) -> Self {
        self.if_none = if_none;
        self
    }
}

/// The backends payretry runs on: what sqlx does not say the same way for both.
pub(crate) trait Backend:
    Database<Row: Columns, Arguments: sqlx::IntoArguments<Self>> + sqlx::database::HasStatementCache
{
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// `sql` with `args` bound.
    fn query(sql: &'static str, args: &[Arg]) -> Query<'static, Self, Self::Arguments>;

    /// A statement built at run time (see `one_statement`), with `args` bound.
    fn query_owned(sql: String, args: &[Arg]) -> Query<'static, Self, Self::Arguments>;
}

impl Backend for sqlx::Sqlite {
    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }

    fn query(sql: &'static str, args: &[Arg]) -> Query<'static, Self, Self::Arguments> {
        bind_all(sql, args)
    }

    fn query_owned(sql: String, args: &[Arg]) -> Query<'static, Self, Self::Arguments> {
        bind_all(sqlx::AssertSqlSafe(sql), args)
    }
}

impl Backend for sqlx::Postgres {
    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }

    fn query(sql: &'static str, args: &[Arg]) -> Query<'static, Self, Self::Arguments> {
        bind_all(sql, args)
    }

    fn query_owned(sql: String, args: &[Arg]) -> Query<'static, Self, Self::Arguments> {
        bind_all(sqlx::AssertSqlSafe(sql), args)
    }
}

fn bind_all<'a, DB>(
    sql: impl sqlx::SqlSafeStr,
    args: &'a [Arg],
) -> Query<'static, DB, DB::Arguments>
where
    DB: Database,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
{
    args.iter()
        .fold(sqlx::query::<DB>(sql), |query, arg| match arg {
            Arg::Int(value) => query.bind(*value),
            Arg::Text(value) => query.bind(value.as_deref()),
            Arg::Bytes(value) => query.bind(value.as_slice()),
        })
}

/// Runs one `write` on `db` by itself (no transaction around it) and answers how many rows
/// it touched.
pub(crate) async fn execute<'e, E>(db: E, write: &Write) -> StorageResult<u64>
where
    E: Executor<'e, Database: Backend>,
{
    let result = <E::Database as Backend>::query(write.sql, &write.args)
        .execute(db)
        .await?;
    Ok(<E::Database as Backend>::rows_affected(&result))
}

/// The rows `sql` selects, each through `decode`.
pub(crate) async fn fetch_all<'e, E, T>(
    executor: E,
    sql: &'static str,
    args: &[Arg],
    decode: impl Fn(&<E::Database as Database>::Row) -> StorageResult<T>,
) -> StorageResult<Vec<T>>
where
    E: Executor<'e, Database: Backend>,
{
    let rows = <E::Database as Backend>::query(sql, args)
        .fetch_all(executor)
        .await?;
    rows.iter().map(decode).collect()
}

/// The row `sql` selects, if any, through `decode`.
pub(crate) async fn fetch_optional<'e, E, T>(
    executor: E,
    sql: &'static str,
    args: &[Arg],
    decode: impl Fn(&<E::Database as Database>::Row) -> StorageResult<T>,
) -> StorageResult<Option<T>>
where
    E: Executor<'e, Database: Backend>,
{
    let row = <E::Database as Backend>::query(sql, args)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Reading a row's columns by name, the same on both backends.
pub(crate) trait Columns {
    fn int(&self, column: &str) -> StorageResult<i64>;
    fn opt_int(&self, column: &str) -> StorageResult<Option<i64>>;
    fn text(&self, column: &str) -> StorageResult<String>;
    fn opt_text(&self, column: &str) -> StorageResult<Option<String>>;
    fn opt_bytes(&self, column: &str) -> StorageResult<Option<Vec<u8>>>;
}

impl<R> Columns for R
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn int(&self, column: &str) -> StorageResult<i64> {
        Ok(self.try_get(column)?)
    }

    fn opt_int(&self, column: &str) -> StorageResult<Option<i64>> {
        Ok(self.try_get(column)?)
    }

    fn text(&self, column: &str) -> StorageResult<String> {
        Ok(self.try_get(column)?)
    }

    fn opt_text(&self, column: &str) -> StorageResult<Option<String>> {
        Ok(self.try_get(column)?)
    }

    fn opt_bytes(&self, column: &str) -> StorageResult<Option<Vec<u8>>> {
        Ok(self.try_get(column)?)
    }
}
