//! Who acts, and what the append-only audit log records (DESIGN.md §6).

use crate::ids::UserId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A caller's role, from the JWT's `role` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Buyer,
    Support,
    Admin,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Buyer => "buyer",
            Self::Support => "support",
            Self::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "buyer" => Ok(Self::Buyer),
            "support" => Ok(Self::Support),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role `{other}` (expected buyer, support or admin)"
            )),
        }
    }
}

/// Who caused an audit entry: a person with a role, or payretry itself (the worker, the
/// sweeper, or a provider event it verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    User { id: UserId, role: Role },
    System,
}

impl fmt::Display for Actor {
    /// `sub:role` or `system` — the form stored in the audit log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User { id, role } => write!(f, "{id}:{}", role.as_str()),
            Self::System => f.write_str("system"),
        }
    }
}

/// The audit log's actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    CheckoutCreated,
    PaymentFailed,
    RetryRequested,
    RetryInitiated,
    RetryAbandoned,
    PaymentSucceeded,
    /// A checkout was completed with a payment that settles later.
    PaymentProcessing,
    RetryDeadLettered,
    RetryRedriven,
    SessionExpired,
    /// A second checkout of an already paid session was paid too (the buyer was charged
    /// twice); the first payment stands.
    DoublePaymentDetected,
    /// The duplicate charge was refunded through the provider (the provider says the refund
    /// succeeded).
    DuplicateRefunded,
    /// The provider took the duplicate charge's refund but settles it later (not refunded yet).
    DuplicateRefundPending,
    /// The duplicate charge's refund was refused, failed or was canceled: support must act.
    DuplicateRefundFailed,
}

impl AuditAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CheckoutCreated => "checkout_created",
            Self::PaymentFailed => "payment_failed",
            Self::RetryRequested => "retry_requested",
            Self::RetryInitiated => "retry_initiated",
            Self::RetryAbandoned => "retry_abandoned",
            Self::PaymentSucceeded => "payment_succeeded",
            Self::PaymentProcessing => "payment_processing",
            Self::RetryDeadLettered => "retry_dead_lettered",
            Self::RetryRedriven => "retry_redriven",
            Self::SessionExpired => "session_expired",
            Self::DoublePaymentDetected => "double_payment_detected",
            Self::DuplicateRefunded => "duplicate_refunded",
            Self::DuplicateRefundPending => "duplicate_refund_pending",
            Self::DuplicateRefundFailed => "duplicate_refund_failed",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub role: Role,
}

impl Principal {
    /// A buyer sees only their own sessions; support and admin see all. Anyone else's
    /// session must look exactly like a missing one (404, never 403).
    pub fn can_see(&self, buyer: &UserId) -> bool {
        self.role != Role::Buyer || &self.user == buyer
    }

    pub fn actor(&self) -> Actor {
        Actor::User {
            id: self.user.clone(),
            role: self.role,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buyers_see_only_their_own_sessions() {
        let alice = UserId::new("alice");
        let bob = UserId::new("bob");
        let buyer = Principal {
            user: alice.clone(),
            role: Role::Buyer,
        };
        assert!(buyer.can_see(&alice));
        assert!(!buyer.can_see(&bob));
        for role in [Role::Support, Role::Admin] {
            assert!(
                Principal {
                    user: alice.clone(),
                    role
                }
                .can_see(&bob)
            );
        }
        assert_eq!(buyer.actor().to_string(), "alice:buyer");
        assert_eq!(Actor::System.to_string(), "system");
    }
}
