//! Provider webhooks: the events payretry understands. Their signatures are the provider's
//! format, in [`crate::provider::signature`].

pub mod event;
pub mod refund_event;
