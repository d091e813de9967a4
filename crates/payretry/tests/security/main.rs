//! Security round two: each refusal a hostile outsider's probe found missing, tested through
//! the real server on an ephemeral port. One module per concern.

mod connections;
mod lists;
#[path = "../support/mod.rs"]
mod support;

mod auth;
mod events;
mod rate_limits;
mod sandbox;
mod settings;
