//! Bearer-token authentication: HS256 JWTs only (the algorithm is pinned, so `none` and
//! RS256-with-the-HMAC-key tricks fail), `exp` required and `nbf` honoured (RFC 7519
//! §4.1.5), `sub` and `role` required.
//!
//! Ambiguity is refused rather than resolved: two `Authorization` headers are a 400 (a proxy
//! and the origin could each read a different one), and a `sub` with surrounding spaces is
//! not silently trimmed into another user's id. The scheme is case-insensitive (RFC 9110
//! §11.1).

use super::AppState;
use super::error::ApiError;
use crate::secret::Secret;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use payretry_domain::{Principal, Role, UserId};
use serde::{Deserialize, Serialize};

/// The claims payretry reads and issues.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub exp: u64,
}

/// Keys derived once from the HS256 secret.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl JwtKeys {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        }
    }

    /// Issues a token for `sub` with `role`, valid for `ttl_secs`.
    pub fn issue(&self, sub: &str, role: Role, ttl_secs: u64) -> String {
        let exp = chrono::Utc::now().timestamp().max(0) as u64 + ttl_secs;
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding cannot fail")
    }

    /// Verifies a token; any failure is simply "unauthenticated".
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| ApiError::Unauthenticated)?;
        let sub = data.claims.sub.as_str();
        if sub.is_empty() || sub.len() > 255 || sub.trim() != sub {
            return Err(ApiError::Unauthenticated);
        }
        Ok(Principal {
            user: UserId::new(sub),
            role: data.claims.role,
        })
    }
}

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

impl Caller {
    /// Refuses with 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<&Principal, ApiError> {
        if roles.contains(&self.0.role) {
            Ok(&self.0)
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let mut headers = parts.headers.get_all(AUTHORIZATION).iter();
        let header = headers.next().ok_or(ApiError::Unauthenticated)?;
        if headers.next().is_some() {
            return Err(ApiError::InvalidRequest(
                "send one Authorization header, not several".to_owned(),
            ));
        }
        let value = header.to_str().map_err(|_| ApiError::Unauthenticated)?;
        let token = bearer_token(value).ok_or(ApiError::Unauthenticated)?;
        state.jwt.verify(token).map(Caller)
    }
}

/// The token of a `Bearer` credential; the scheme is matched case-insensitively.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR  abc "] {
            assert_eq!(bearer_token(value), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }
}
