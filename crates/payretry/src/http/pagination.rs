//! How every list route pages (DESIGN.md §3): `?limit=` (1 to 100, 50 by default) and
//! `?cursor=` (the `nextCursor` of the previous page), answered with one page oldest first
//! and `nextCursor`, null on the last page.
//!
//! A cursor is opaque to clients: today it is `v1.` followed by the id of the last row of the
//! page it came from, but only a value this server handed out is meaningful, and the format
//! may change. Anything that is not a cursor is refused with 400 `invalid_request`.
//!
//! The session list (`GET /admin/sessions`) pages the same way but newest first, by the
//! sessions' creation key: its cursor is `v1.{created_at in ms}.{session id}` of the last
//! session of the page ([`SessionPageQuery`]).

use super::error::ApiError;
use crate::storage::{Page, SessionKey, SessionPage};
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use payretry_domain::PaymentSessionId;
use serde::Deserialize;
use utoipa::IntoParams;

/// The query parameters of a list route, as documented in the OpenAPI document.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Rows per page, 1 to 100; 50 when absent.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100, default = 50)]
    pub limit: Option<String>,
    /// The `nextCursor` of the previous page, as received (opaque); absent for the first page.
    /// The pattern documents the cursors this server hands out, so that a generated request
    /// that matches it is one the server accepts.
    #[param(pattern = r"^v1\.[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// The page a list request asks for. Rejects a bad `limit` or `cursor` with 400
/// `invalid_request` naming the parameter; other query parameters are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery(pub Page);

const CURSOR_PREFIX: &str = "v1.";

impl PageParams {
    /// Validates the parameters into a storage page.
    pub fn page(&self) -> Result<Page, ApiError> {
        let limit = page_limit(self.limit.as_deref())?;
        let after = page_cursor(self.cursor.as_deref(), parse_cursor)?;
        Ok(Page { after, limit })
    }
}

/// The `cursor` parameter read by `parse`: `None` when absent, 400 when it is not a cursor
/// this server handed out.
fn page_cursor<T>(
    raw: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    raw.map(|raw| {
        parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest(
                "`cursor` is not a cursor this server returned as `nextCursor`".to_owned(),
            )
        })
    })
    .transpose()
}

/// The `limit` parameter: 50 when absent, else 1 to 100.
fn page_limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(Page::DEFAULT_LIMIT),
        Some(raw) => parse_limit(raw).ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "`limit` must be a whole number from 1 to {}",
                Page::MAX_LIMIT
            ))
        }),
    }
}

fn parse_limit(raw: &str) -> Option<u32> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let limit: u32 = raw.parse().ok()?;
    (1..=Page::MAX_LIMIT).contains(&limit).then_some(limit)
}

fn parse_cursor(raw: &str) -> Option<i64> {
    let digits = raw.strip_prefix(CURSOR_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The `nextCursor` for a page whose storage read said to continue after `next`.
pub fn next_cursor(next: Option<i64>) -> Option<String> {
    next.map(|id| format!("{CURSOR_PREFIX}{id}"))
}

/// The paging parameters of the newest-first session list, as documented in the OpenAPI
/// document: [`PageParams`] with the session list's own cursor.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionPageParams {
    /// Rows per page, 1 to 100; 50 when absent.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100, default = 50)]
    pub limit: Option<String>,
    /// The `nextCursor` of the previous page, as received (opaque); absent for the first page.
    /// The pattern documents the cursors this server hands out, and every value it matches
    /// is accepted.
    #[param(pattern = r"^v1\.(0|[1-9][0-9]{0,14})\.ps_[A-Za-z0-9_]{1,64}$")]
    pub cursor: Option<String>,
}

/// The page of the session list a request asks for; a bad `limit` or `cursor` is refused with
/// 400 `invalid_request` naming the parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPageQuery(pub SessionPage);

impl SessionPageParams {
    /// Validates the parameters into a storage page.
    pub fn page(&self) -> Result<SessionPage, ApiError> {
        let limit = page_limit(self.limit.as_deref())?;
        let before = page_cursor(self.cursor.as_deref(), parse_session_cursor)?;
        Ok(SessionPage { before, limit })
    }
}

/// The most digits a cursor's time has: up to the year 33658, and within what a time holds.
const MAX_CURSOR_MILLIS_DIGITS: usize = 15;

/// `v1.{ms}.{session id}`, exactly as [`next_session_cursor`] writes it: the time in
/// canonical digits (no sign, no leading zero), the id a valid session id.
fn parse_session_cursor(raw: &str) -> Option<SessionKey> {
    let rest = raw.strip_prefix(CURSOR_PREFIX)?;
    let (millis, id) = rest.split_once('.')?;
    if millis.is_empty()
        || millis.len() > MAX_CURSOR_MILLIS_DIGITS
        || !millis.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let ms: i64 = millis.parse().ok()?;
    if ms.to_string() != millis {
        return None;
    }
    Some(SessionKey {
        created_at: chrono::DateTime::from_timestamp_millis(ms)?,
        id: PaymentSessionId::parse(id).ok()?,
    })
}

/// The `nextCursor` for a page of the session list that continues below `next`.
pub fn next_session_cursor(next: Option<&SessionKey>) -> Option<String> {
    next.map(|key| {
        format!(
            "{CURSOR_PREFIX}{}.{}",
            key.created_at.timestamp_millis(),
            key.id
        )
    })
}

impl<S: Send + Sync> FromRequestParts<S> for SessionPageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(params) = Query::<SessionPageParams>::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                ApiError::InvalidRequest(
                    "the query string is malformed (`limit` and `cursor` may appear once each)"
                        .to_owned(),
                )
            })?;
        params.page().map(Self)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(params) = Query::<PageParams>::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                ApiError::InvalidRequest(
                    "the query string is malformed (`limit` and `cursor` may appear once each)"
                        .to_owned(),
                )
            })?;
        params.page().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(limit: Option<&str>, cursor: Option<&str>) -> Result<Page, ApiError> {
        PageParams {
            limit: limit.map(str::to_owned),
            cursor: cursor.map(str::to_owned),
        }
        .page()
    }

    #[test]
    fn defaults_to_the_first_page_of_fifty() {
        assert_eq!(page(None, None).unwrap(), Page::first(50));
    }

    #[test]
    fn accepts_limits_from_one_to_a_hundred() {
        assert_eq!(page(Some("1"), None).unwrap().limit, 1);
        assert_eq!(page(Some("100"), None).unwrap().limit, 100);
        for bad in [
            "0",
            "101",
            "abc",
            "",
            "-1",
            "+5",
            " 5",
            "5.0",
            "99999999999",
        ] {
            let error = page(Some(bad), None).unwrap_err();
            assert_eq!(error.code(), "invalid_request", "{bad:?}");
            assert!(error.to_string().contains("`limit`"), "{bad:?}");
        }
    }

    fn session_page(limit: Option<&str>, cursor: Option<&str>) -> Result<SessionPage, ApiError> {
        SessionPageParams {
            limit: limit.map(str::to_owned),
            cursor: cursor.map(str::to_owned),
        }
        .page()
    }

    #[test]
    fn a_session_cursor_round_trips_and_anything_else_is_refused() {
        let key = SessionKey {
            created_at: chrono::DateTime::from_timestamp_millis(1_742_000_000_123).unwrap(),
            id: PaymentSessionId::parse("ps_0a1b2c").unwrap(),
        };
        let cursor = next_session_cursor(Some(&key)).unwrap();
        assert_eq!(cursor, "v1.1742000000123.ps_0a1b2c");
        let page = session_page(Some("2"), Some(&cursor)).unwrap();
        assert_eq!(page.before, Some(key));
        assert_eq!(page.limit, 2);
        assert_eq!(session_page(None, None).unwrap().limit, 50);
        assert_eq!(next_session_cursor(None), None);
        for bad in [
            "",
            "garbage",
            "v1.",
            "v1.1742",
            "v1.1742.",
            "v1.1742.ps_",
            "v1..ps_abc",
            "v1.-5.ps_abc",
            "v1.+5.ps_abc",
            "v1.05.ps_abc",
            "v1.1742.xx_abc",
            "v1.1742.ps_a-b",
            "v1.1742.ps_abc.",
            "v2.1742.ps_abc",
            "v1.99999999999999999999.ps_abc",
            "v1.9223372036854775807.ps_abc",
            "v1.1000000000000000.ps_abc",
        ] {
            let error = session_page(None, Some(bad)).unwrap_err();
            assert_eq!(error.code(), "invalid_request", "{bad:?}");
            assert!(error.to_string().contains("`cursor`"), "{bad:?}");
        }
        // The extremes the pattern allows are accepted.
        for good in ["v1.0.ps_a", "v1.999999999999999.ps_a"] {
            assert!(session_page(None, Some(good)).is_ok(), "{good:?}");
        }
        for bad in ["0", "101", "abc"] {
            let error = session_page(Some(bad), None).unwrap_err();
            assert!(error.to_string().contains("`limit`"), "{bad:?}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_anything_else_is_refused() {
        let cursor = next_cursor(Some(1742)).unwrap();
        assert_eq!(page(None, Some(&cursor)).unwrap().after, Some(1742));
        assert_eq!(next_cursor(None), None);
        for bad in [
            "",
            "garbage",
            "1742",
            "v1.",
            "v1.-3",
            "v1.12a",
            "v2.5",
            "v1.99999999999999999999",
        ] {
            let error = page(None, Some(bad)).unwrap_err();
            assert_eq!(error.code(), "invalid_request", "{bad:?}");
            assert!(error.to_string().contains("`cursor`"), "{bad:?}");
        }
    }
}
