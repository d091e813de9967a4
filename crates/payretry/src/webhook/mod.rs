//! Provider webhooks: signature verification and the events payretry understands.

pub mod event;
pub mod refund_event;
pub mod signature;
