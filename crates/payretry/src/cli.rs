//! The `payretry` command line (DESIGN.md §8).

use crate::app::{self, App, ServeRole, Tuning};
use crate::config::Config;
use crate::http::admin::DeadLetterView;
use crate::http::auth::JwtKeys;
use crate::http::webhook_deliveries::DeliveryView;
use crate::shutdown;
use crate::storage::{DeliveryFilter, DeliveryStatus, Page};
use anyhow::Context;
use clap::{Parser, Subcommand};
use payretry_domain::{DeadLetterId, DeliveryId, PaymentSessionId, Principal, Role, UserId};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "payretry",
    version,
    about = "Safe, bounded retries of failed card payments inside the payment window."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (configuration from the environment).
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        role: ServeRole,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print a signed access token.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Review retry jobs that kept failing.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Review merchant webhook deliveries, and redeliver failed ones.
    Webhooks {
        #[command(subcommand)]
        action: WebhookAction,
    },
    /// Walk through the whole retry story on a throw-away database, narrated.
    Demo,
    /// Amazon SQS administration.
    Sqs {
        #[command(subcommand)]
        action: SqsAction,
    },
    /// Show a payment session's status (through the HTTP API).
    Status {
        session: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Ask for a retry of a failed payment (through the HTTP API). One Idempotency-Key is
    /// made per invocation and reused across network retries.
    Retry {
        session: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// How the client commands reach a running payretry.
#[derive(Debug, clap::Args)]
pub struct Remote {
    /// Bearer token (see `payretry token`).
    #[arg(long, env = "PAYRETRY_TOKEN", hide_env_values = true)]
    token: String,
    /// Base URL; default `PAYRETRY_PUBLIC_URL`, else `http://{PAYRETRY_LISTEN}`.
    #[arg(long)]
    url: Option<String>,
    /// Print the contract's JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SqsAction {
    /// Create `payments-retry-{PAYRETRY_ENV}` and its dead-letter queue with the redrive
    /// policy (`maxReceiveCount` = PAYRETRY_MAX_RECEIVES). Safe to run again.
    Setup,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List every dead letter as JSON lines, oldest first (read a page of 100 at a time).
    List,
    /// Queue a dead letter again.
    Redrive { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WebhookAction {
    /// List deliveries as JSON lines, oldest first (read a page of 100 at a time).
    List {
        /// Only `pending`, `delivered` or `failed` ones.
        #[arg(long, value_parser = parse_delivery_status)]
        status: Option<DeliveryStatus>,
        /// Only this payment session's.
        #[arg(long, value_parser = parse_session_id)]
        session: Option<PaymentSessionId>,
    },
    /// Queue a delivery again (same webhook-id and body).
    Redeliver { id: String },
}

fn parse_delivery_status(raw: &str) -> Result<DeliveryStatus, String> {
    DeliveryStatus::parse(raw).ok_or_else(|| "expected pending, delivered or failed".to_owned())
}

fn parse_session_id(raw: &str) -> Result<PaymentSessionId, String> {
    PaymentSessionId::parse(raw).map_err(|e| e.to_string())
}

fn parse_role(raw: &str) -> Result<Role, String> {
    raw.parse()
}

pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { role } => {
            require_public_url(&config, role)?;
            crate::telemetry::logs::init(config.log_format, "info");
            let listener = TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("PAYRETRY_LISTEN: cannot bind {}", config.listen))?;
            let public_url = app::public_url(&config, &listener)?;
            let app = App::build(&config, public_url.clone(), Tuning::from_config(&config)).await?;
            let (trigger, shutdown) = shutdown::channel();
            tokio::spawn(async move {
                shutdown::os_signal().await;
                tracing::info!("shutting down");
                trigger.trigger();
            });
            tracing::info!(%public_url, ?role, "payretry ready");
            app.serve(listener, role, shutdown).await
        }
        Command::Migrate => {
            app::open_storage(&config).await?;
            println!("migrations applied to {}", config.database_url);
            Ok(())
        }
        Command::Token { sub, role, ttl } => {
            let storage = app::open_storage(&config).await?;
            let secret = app::jwt_secret(&config, storage.as_ref()).await?;
            println!("{}", JwtKeys::new(&secret).issue(&sub, role, ttl));
            Ok(())
        }
        Command::DeadLetters { action } => {
            let app = build_for_admin(&config).await?;
            let payments = &app.state.payments;
            match action {
                DeadLetterAction::List => {
                    let mut page = Page::first(Page::MAX_LIMIT);
                    loop {
                        let dead = payments.dead_letters(page).await?;
                        for dead in &dead.items {
                            println!("{}", serde_json::to_string(&DeadLetterView::from(dead))?);
                        }
                        match dead.next {
                            Some(after) => page.after = Some(after),
                            None => break,
                        }
                    }
                }
                DeadLetterAction::Redrive { id } => {
                    let operator = Principal {
                        user: UserId::new("cli"),
                        role: Role::Admin,
                    };
                    let id = DeadLetterId::parse(&id)
                        .map_err(|e| anyhow::anyhow!("dead letter id {id:?}: {e}"))?;
                    let dead = payments.redrive(id, &operator).await.map_err(|e| {
                        anyhow::anyhow!(
                            "redrive refused: {}",
                            crate::http::error::ApiError::from(e)
                        )
                    })?;
                    println!(
                        "redriven: session {} attempt {}",
                        dead.job.payment_session_id, dead.job.attempt_number
                    );
                }
            }
            Ok(())
        }
        Command::Webhooks { action } => {
            let app = build_for_admin(&config).await?;
            webhooks(&app.state.payments, action).await
        }
        Command::Demo => crate::demo::run().await,
        Command::Sqs {
            action: SqsAction::Setup,
        } => {
            let client = crate::queue::sqs::client(config.sqs_endpoint.as_deref()).await;
            let (main, dlq) =
                crate::queue::sqs::setup(&client, &config.env, config.max_receives).await?;
            println!("queue             {main}");
            println!(
                "dead-letter queue {dlq} (after {} receives)",
                config.max_receives
            );
            Ok(())
        }
        Command::Status { session, remote } => client_status(&config, &session, &remote).await,
        Command::Retry { session, remote } => client_retry(&config, &session, &remote).await,
    }
}

/// payretry as the admin commands use it (no server, no background tasks).
async fn build_for_admin(config: &Config) -> anyhow::Result<App> {
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen));
    App::build(config, public_url, Tuning::from_config(config)).await
}

/// `payretry webhooks list|redeliver`.
async fn webhooks(
    payments: &crate::service::Payments,
    action: WebhookAction,
) -> anyhow::Result<()> {
    match action {
        WebhookAction::List { status, session } => {
            let filter = DeliveryFilter { status, session };
            let mut page = Page::first(Page::MAX_LIMIT);
            loop {
                let found = payments.webhook_deliveries(&filter, page).await?;
                for delivery in &found.items {
                    println!("{}", serde_json::to_string(&DeliveryView::from(delivery))?);
                }
                match found.next {
                    Some(after) => page.after = Some(after),
                    None => break,
                }
            }
        }
        WebhookAction::Redeliver { id } => {
            let operator = Principal {
                user: UserId::new("cli"),
                role: Role::Admin,
            };
            let id =
                DeliveryId::parse(&id).map_err(|e| anyhow::anyhow!("delivery id {id:?}: {e}"))?;
            let delivery = payments
                .redeliver_webhook(id, &operator)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "redelivery refused: {}",
                        crate::http::error::ApiError::from(e)
                    )
                })?;
            println!(
                "queued: delivery {} ({} {} of session {})",
                delivery.id, delivery.event_type, delivery.event_id, delivery.session_id
            );
        }
    }
    Ok(())
}

/// With Stripe the public address must be spelled out, whatever the role. Stripe sends the
/// buyer back to the checkout's return links: derived from the listen address they would
/// point at `http://127.0.0.1:…`, a page no buyer can reach. And a redelivered job re-sends
/// the create-checkout parameters, links included, under the same Idempotency-Key, so
/// every process (separate API and worker processes listen on different addresses) must
/// derive the same links.
fn require_public_url(config: &Config, role: ServeRole) -> Result<(), crate::config::ConfigError> {
    if config.provider == crate::config::ProviderKind::Stripe && config.public_url.is_none() {
        let expected = if role == ServeRole::All {
            "required with PAYRETRY_PROVIDER=stripe: Stripe sends buyers back to it (expected the http:// or https:// address buyers reach payretry at)"
        } else {
            "required with PAYRETRY_PROVIDER=stripe, the same on every process: Stripe sends buyers back to it (expected the http:// or https:// address buyers reach payretry at)"
        };
        return Err(crate::config::ConfigError {
            var: "PAYRETRY_PUBLIC_URL",
            expected: expected.to_owned(),
            got: String::new(),
        });
    }
    Ok(())
}

fn client(config: &Config, remote: &Remote) -> anyhow::Result<payretry_client::Client> {
    let base = remote
        .url
        .clone()
        .or_else(|| config.public_url.clone())
        .unwrap_or_else(|| format!("http://{}", config.listen));
    Ok(payretry_client::Client::new(&base, &remote.token)?)
}

fn session_id(raw: &str) -> anyhow::Result<payretry_domain::PaymentSessionId> {
    payretry_domain::PaymentSessionId::parse(raw).map_err(|e| anyhow::anyhow!("{raw}: {e}"))
}

async fn client_status(config: &Config, session: &str, remote: &Remote) -> anyhow::Result<()> {
    let status = client(config, remote)?
        .status(&session_id(session)?)
        .await?;
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("session   {}", status.session_id);
    println!("status    {}", status.status);
    println!(
        "amount    {} {}",
        status.amount.minor_units(),
        status.currency
    );
    if let Some(reason) = &status.failure_reason {
        println!("failure   {reason}");
    }
    println!(
        "retries   {} used, {} left of {}",
        status.retry_attempts, status.retry_attempts_remaining, status.max_retry_attempts
    );
    match (status.retry_available, status.retry_unavailable_reason) {
        (true, _) => println!("retry     available"),
        (false, Some(reason)) => println!("retry     unavailable ({})", reason.as_str()),
        (false, None) => println!("retry     unavailable"),
    }
    if let Some(at) = status.next_retry_at {
        println!("next      {at}");
    }
    println!("window    until {}", status.expires_at);
    if let Some(url) = &status.checkout_url {
        println!("checkout  {url}");
    }
    Ok(())
}

async fn client_retry(config: &Config, session: &str, remote: &Remote) -> anyhow::Result<()> {
    let use_case =
        payretry_client::schedule_payment_retry::SchedulePaymentRetry::new(client(config, remote)?);
    let outcome = use_case.press(&session_id(session)?).await;
    let accepted = outcome.result?;
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&accepted)?);
    } else {
        println!(
            "retry #{} scheduled for {} (in {} s); {} retries left",
            accepted.attempt_number,
            accepted.scheduled_for,
            accepted.delay_seconds,
            accepted.retry_attempts_remaining
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn stripe_needs_a_public_url_in_every_role() {
        let stripe = Config {
            provider: crate::config::ProviderKind::Stripe,
            ..Config::default()
        };
        for role in [ServeRole::All, ServeRole::Api, ServeRole::Worker] {
            let error = require_public_url(&stripe, role).unwrap_err();
            assert_eq!(error.var, "PAYRETRY_PUBLIC_URL");
            let line = error.to_string();
            assert!(
                line.starts_with("PAYRETRY_PUBLIC_URL: ")
                    && line.contains("PAYRETRY_PROVIDER=stripe")
                    && !line.contains('\n'),
                "{line}"
            );
        }
        let with_url = Config {
            public_url: Some("https://pay.example.com".to_owned()),
            ..stripe
        };
        for role in [ServeRole::All, ServeRole::Api, ServeRole::Worker] {
            assert!(require_public_url(&with_url, role).is_ok());
        }
        // The sandbox's links are this process's own pages: the listen address will do.
        for role in [ServeRole::All, ServeRole::Api, ServeRole::Worker] {
            assert!(require_public_url(&Config::default(), role).is_ok());
        }
    }
}
